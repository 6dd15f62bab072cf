// eth_io_bench: DST over raw Ethernet against DST over TCP, and sealed (AES-256-GCM) against
// unsealed Ethernet (issue 13 item 7, second and third ratios), in one run on one veth pair
// between two namespaces it creates and deletes.
//
//   eth_io_bench [--seconds S] [--reps R] [--size-mib N] [--mtu M] [--rx ring|recvmmsg] [--tx ring|sendmmsg]
//
// --mtu sets the veth pair's MTU (default 1500; 9000 for jumbo frames, which the transport uses
// when the link has them).  On veth TCP never segments (GSO packets of up to 64 KiB cross the
// pair whole), while raw Ethernet pays per MTU-sized frame: on a real NIC TCP segments too.
//
// --rx / --tx force the Ethernet link's modes (default: the endpoint's, recvmmsg and the TX
// ring); the RESULT lines name the modes used.
//
// Each transport serves the same export (a FileDevice on a tmpfs file, so the disk is not what
// is measured) from an Exporter whose io thread lives in namespace b, to a RemoteDevice whose io
// thread lives in namespace a:
//   tcp:        TCP over the veth pair (10.213.0.1 -> 10.213.0.2, addresses only inside the
//               namespaces), the anchor;
//   eth:        the raw-Ethernet transport, insecure_segment (no AEAD);
//   eth_sealed: the raw-Ethernet transport with a PSK (every frame sealed);
//   eth_first:  the first design of the transport, beside the current one: each endpoint on an
//               io thread of its own and one message per DST frame (eth and eth_sealed run their
//               endpoints on the client's and the exporter's io_context and coalesce the frames
//               of a batch, as dstd does).
// Workloads per transport and rep: 4 KiB random I/O (half reads, half writes) at queue depth
// 32, then 1 MiB sequential writes and reads at queue depth 8.  Transports are interleaved rep
// by rep and the median rep is reported.  Prints RESULT lines and RATIO lines (eth/tcp with the
// issue's targets, eth_sealed/eth, eth/eth_first); exits 77 without root.  docs/benchmarks.md: the CI smoke
// run is `--seconds 0.3 --reps 1`; a real run `--seconds 5 --reps 5`.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <future>
#include <iterator>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/strand.hpp>

#include "dst/file_device.h"
#include "dst/net/eth_transport.h"
#include "dst/net/exporter.h"
#include "dst/net/remote_device.h"
#include "dst/net/tcp_transport.h"
#include "veth_netns.h"

using namespace dst;
using namespace dst::net;
using Clock = std::chrono::steady_clock;

namespace {

EthLinkOptions::Rx g_rx = EthLinkOptions::Rx::kAuto;  // --rx
EthLinkOptions::Tx g_tx = EthLinkOptions::Tx::kAuto;  // --tx

const char* kAddrA = "10.213.0.1";
const char* kAddrB = "10.213.0.2";

// An io_context run by one thread that lives in a network namespace (sockets it makes are there).
struct NsIoThread {
  boost::asio::io_context io;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> guard{io.get_executor()};
  std::thread t;
  explicit NsIoThread(const std::string& ns) {
    t = std::thread([this, ns] {
      dst::test::InNetns in(ns);
      io.run();
    });
  }
  ~NsIoThread() {
    guard.reset();
    io.stop();
    t.join();
  }
};

// Keeps `depth` requests of `len` bytes in flight for `seconds`; returns completed requests per
// second (0 on an error).  seq: consecutive offsets (wrapping), else random 4 KiB-aligned ones;
// reads: the share of reads (0..1).
double Drive(BlockDevice& dev, std::uint64_t size, std::uint32_t len, int depth, bool seq, double reads,
             double seconds) {
  struct Slot {
    IoRequest req;
    std::vector<char> buf;
  };
  struct State {
    std::mutex mu;
    std::condition_variable cv;
    std::atomic<bool> stop{false};
    std::atomic<std::uint64_t> done{0}, errors{0};
    int active = 0;
    std::mt19937_64 rng{42};
    std::uint64_t next = 0, size = 0;
    std::uint32_t len = 0;
    bool seq = false;
    double reads = 0;
    BlockDevice* dev = nullptr;
    void Fill(IoRequest* r) {
      std::lock_guard<std::mutex> l(mu);
      if (seq) {
        r->offset = next;
        next = (next + len) % size;
      } else {
        r->offset = (rng() % (size / len)) * len;
      }
      r->op = std::uniform_real_distribution<double>(0, 1)(rng) < reads ? IoOp::kRead : IoOp::kWrite;
    }
  } st;
  st.size = size;
  st.len = len;
  st.seq = seq;
  st.reads = reads;
  st.dev = &dev;
  std::vector<Slot> slots(depth);
  for (auto& s : slots) {
    s.buf.assign(len, 'x');
    s.req.data = s.buf.data();
    s.req.length = len;
    s.req.ctx = &st;
    s.req.done = [](IoRequest* r, Status status) {
      auto* st = static_cast<State*>(r->ctx);
      if (!status.ok()) st->errors++;
      else st->done++;
      if (!st->stop.load() && status.ok()) {
        st->Fill(r);
        st->dev->Submit(r);
        return;
      }
      std::lock_guard<std::mutex> l(st->mu);
      if (--st->active == 0) st->cv.notify_all();
    };
  }
  st.active = depth;
  const auto t0 = Clock::now();
  for (auto& s : slots) {
    st.Fill(&s.req);
    dev.Submit(&s.req);
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  st.stop = true;
  const std::uint64_t n = st.done.load();
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  std::unique_lock<std::mutex> l(st.mu);
  st.cv.wait_for(l, std::chrono::seconds(60), [&] { return st.active == 0; });
  if (st.active != 0) {
    std::fprintf(stderr, "requests hung\n");
    std::exit(2);
  }
  return st.errors.load() ? 0 : double(n) / secs;
}

struct Sample {
  double iops = 0, write_mbs = 0, read_mbs = 0;
};

enum class Kind { kTcp, kEth, kEthSealed, kEthFirst };
bool g_only_4k = false;  // --only: the 4 KiB workload alone (a profile of it)
std::string g_modes;  // " tx=... rx=..." of the Ethernet runs

const char* Name(Kind k) {
  switch (k) {
    case Kind::kTcp: return "tcp";
    case Kind::kEth: return "eth";
    case Kind::kEthSealed: return "eth_sealed";
    case Kind::kEthFirst: return "eth_first";
  }
  return "?";
}

Result<std::shared_ptr<EthEndpoint>> OpenEp(const std::string& ns, const std::string& ifname, bool sealed,
                                            bool first, boost::asio::io_context* io) {
  dst::test::InNetns in(ns);
  EthEndpointOptions o;
  o.link.ifname = ifname;
  o.link.rx = g_rx;
  o.link.tx = g_tx;
  o.coalesce = !first;
  o.io = first ? nullptr : io;
  if (sealed) {
    o.psks.push_back({"bench", std::vector<std::uint8_t>(32, 0x42)});
  } else {
    o.insecure_segment = true;
  }
  return EthEndpoint::Open(o);
}

Sample RunOne(Kind kind, const dst::test::VethNetns& v, const std::shared_ptr<BlockDevice>& disk, std::uint64_t size,
              double seconds) {
  NsIoThread srv(v.ns(1)), cli(v.ns(0));
  std::shared_ptr<EthEndpoint> ea, eb;
  auto tcp_port = std::make_shared<std::uint16_t>(0);
  ExporterOptions eo;
  if (kind == Kind::kTcp) {
    eo.listener = [&srv, tcp_port](const Strand& ex) -> std::unique_ptr<Listener> {
      auto l = TcpListener::Open(srv.io, ex, kAddrB, 0);
      if (!l.ok()) return nullptr;
      *tcp_port = l.value()->port();
      return std::move(l).value();
    };
  } else {
    const bool sealed = kind == Kind::kEthSealed, first = kind == Kind::kEthFirst;
    auto a = OpenEp(v.ns(0), v.ifname(0), sealed, first, &cli.io);
    auto b = OpenEp(v.ns(1), v.ifname(1), sealed, first, &srv.io);
    if (!a.ok() || !b.ok()) {
      std::fprintf(stderr, "eth: %s\n", (a.ok() ? b.status() : a.status()).ToString().c_str());
      std::exit(2);
    }
    ea = a.value();
    eb = b.value();
    const EthEndpointStats es = ea->Stats();
    g_modes = " tx=" + es.tx_mode + " rx=" + es.rx_mode;
    eo.listener = [eb](const Strand& ex) { return eb->MakeListener(ex); };
  }
  Exporter exp(srv.io, eo);
  {
    dst::test::InNetns in(v.ns(1));
    if (Status st = exp.Start(); !st.ok()) {
      std::fprintf(stderr, "exporter: %s\n", st.ToString().c_str());
      std::exit(2);
    }
  }
  (void)exp.AddExport({"disk", disk, false, {}});
  RemoteOptions ro;
  ro.export_name = "disk";
  ro.queue_depth = 64;
  if (kind == Kind::kTcp) {
    ro.host = kAddrB;
    ro.port = *tcp_port;
  } else {
    std::array<std::uint8_t, 6> mac{};
    std::memcpy(mac.data(), eb->mac(), 6);
    ro.connector = [ea, mac](const Strand& s) { return ea->MakeConnector(s, mac); };
  }
  auto r = RemoteDevice::Connect(cli.io, ro);
  if (!r.ok()) {
    std::fprintf(stderr, "%s: connect: %s\n", Name(kind), r.status().ToString().c_str());
    std::exit(2);
  }
  auto dev = r.value();
  Sample s;
  s.iops = Drive(*dev, size, 4096, 32, false, 0.5, seconds);
  if (!g_only_4k) {
    s.write_mbs = Drive(*dev, size, 1 << 20, 8, true, 0.0, seconds);
    s.read_mbs = Drive(*dev, size, 1 << 20, 8, true, 1.0, seconds);
  }
  dev->Close();
  std::promise<Status> p;
  exp.Drain([&p](Status st) { p.set_value(st); });
  p.get_future().wait_for(std::chrono::seconds(10));
  if (ea) ea->Close();
  if (eb) eb->Close();
  return s;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 1;
  int reps = 3;
  std::uint64_t size_mib = 256;
  unsigned mtu = 1500;
  std::string only;  // --only KIND: run that transport alone (for profiling); no RATIO lines
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--seconds" && i + 1 < argc) seconds = std::atof(argv[++i]);
    else if (a == "--reps" && i + 1 < argc) reps = std::max(1, std::atoi(argv[++i]));
    else if (a == "--size-mib" && i + 1 < argc) size_mib = std::max<std::uint64_t>(16, std::atoll(argv[++i]));
    else if (a == "--mtu" && i + 1 < argc) mtu = unsigned(std::atoi(argv[++i]));
    else if (a == "--rx" && i + 1 < argc && std::string(argv[i + 1]) == "ring") g_rx = EthLinkOptions::Rx::kRing, ++i;
    else if (a == "--rx" && i + 1 < argc && std::string(argv[i + 1]) == "recvmmsg") g_rx = EthLinkOptions::Rx::kRecvmmsg, ++i;
    else if (a == "--tx" && i + 1 < argc && std::string(argv[i + 1]) == "ring") g_tx = EthLinkOptions::Tx::kRing, ++i;
    else if (a == "--tx" && i + 1 < argc && std::string(argv[i + 1]) == "sendmmsg") g_tx = EthLinkOptions::Tx::kSendmmsg, ++i;
    else if (a == "--only" && i + 1 < argc) only = argv[++i], g_only_4k = true;
    else {
      std::fprintf(stderr,
                   "usage: eth_io_bench [--seconds S] [--reps R] [--size-mib N] [--mtu M] [--rx ring|recvmmsg] "
                   "[--tx ring|sendmmsg] [--only tcp|eth|eth_sealed|eth_first]\n");
      return 2;
    }
  }
  const Kind kinds[] = {Kind::kTcp, Kind::kEth, Kind::kEthSealed, Kind::kEthFirst};
  constexpr int kKinds = 4;
  if (g_only_4k && std::none_of(std::begin(kinds), std::end(kinds), [&](Kind k) { return only == Name(k); })) {
    std::fprintf(stderr, "eth_io_bench: --only: unknown transport %s\n", only.c_str());
    return 2;
  }
  if (::geteuid() != 0) {
    std::fprintf(stderr, "eth_io_bench: needs root (network namespaces, AF_PACKET)\n");
    return 77;
  }
  dst::test::VethNetns v;
  std::string err;
  if (mtu < 576 || mtu > 9216) {
    std::fprintf(stderr, "eth_io_bench: --mtu must be 576..9216\n");
    return 2;
  }
  if (!v.Create(&err, mtu)) {
    std::fprintf(stderr, "eth_io_bench: %s\n", err.c_str());
    return 77;
  }
  const std::string ip_a = "ip -n " + v.ns(0) + " addr add " + kAddrA + "/24 dev " + v.ifname(0);
  const std::string ip_b = "ip -n " + v.ns(1) + " addr add " + kAddrB + "/24 dev " + v.ifname(1);
  if (std::system(ip_a.c_str()) != 0 || std::system(ip_b.c_str()) != 0) {
    std::fprintf(stderr, "eth_io_bench: cannot address the veth pair\n");
    return 2;
  }
  const std::uint64_t size = size_mib << 20;
  const std::string path = "/dev/shm/dst-eth-io-bench-" + std::to_string(::getpid()) + ".img";
  FileDeviceOptions fo;
  fo.create = true;
  fo.size = size;
  auto disk = FileDevice::Open(path, fo);
  ::unlink(path.c_str());
  if (!disk.ok()) {
    std::fprintf(stderr, "eth_io_bench: %s\n", disk.status().ToString().c_str());
    return 2;
  }
  std::printf("eth_io_bench: veth %s <-> %s (mtu %u), export %llu MiB on tmpfs, %.1f s per workload, %d reps\n",
              v.ifname(0).c_str(), v.ifname(1).c_str(), mtu, (unsigned long long)size_mib, seconds, reps);
  std::vector<Sample> samples[kKinds];
  for (int r = 0; r < reps; ++r)
    for (int k = 0; k < kKinds; ++k)
      if (only.empty() || only == Name(kinds[k])) samples[k].push_back(RunOne(kinds[k], v, disk.value(), size, seconds));
  Sample med[kKinds];
  for (int k = 0; k < kKinds; ++k) {
    if (samples[k].empty()) continue;  // --only another transport
    std::vector<double> iops, w, rd;
    for (const Sample& s : samples[k]) {
      iops.push_back(s.iops);
      w.push_back(s.write_mbs);
      rd.push_back(s.read_mbs);
    }
    med[k] = {Median(iops), Median(w), Median(rd)};
    if (g_only_4k) {
      std::printf("RESULT transport=%s rand4k_qd32_iops=%.0f (alone)%s\n", Name(kinds[k]), med[k].iops,
                  k ? g_modes.c_str() : "");
      continue;
    }
    std::printf("RESULT transport=%s rand4k_qd32_iops=%.0f seq1m_write_mib_s=%.1f seq1m_read_mib_s=%.1f%s\n",
                Name(kinds[k]), med[k].iops, med[k].write_mbs, med[k].read_mbs, k ? g_modes.c_str() : "");
  }
  if (g_only_4k) return 0;
  auto ratio = [](double a, double b) { return b > 0 ? a / b : 0.0; };
  std::printf("RATIO eth/tcp rand4k_qd32_iops=%.2f target=1.00\n", ratio(med[1].iops, med[0].iops));
  std::printf("RATIO eth/tcp seq1m_write=%.2f seq1m_read=%.2f\n", ratio(med[1].write_mbs, med[0].write_mbs),
              ratio(med[1].read_mbs, med[0].read_mbs));
  std::printf("RATIO eth_sealed/eth rand4k_qd32_iops=%.2f seq1m_write=%.2f seq1m_read=%.2f\n",
              ratio(med[2].iops, med[1].iops), ratio(med[2].write_mbs, med[1].write_mbs),
              ratio(med[2].read_mbs, med[1].read_mbs));
  std::printf("RATIO eth/eth_first rand4k_qd32_iops=%.2f seq1m_write=%.2f seq1m_read=%.2f\n",
              ratio(med[1].iops, med[3].iops), ratio(med[1].write_mbs, med[3].write_mbs),
              ratio(med[1].read_mbs, med[3].read_mbs));
  return 0;
}
