// Integration: the raw-Ethernet Transport (netdriver/include/dst/net/eth_transport.h) carrying
// real DST traffic: an Exporter listening on one end of a veth pair and a RemoteDevice dialling
// it from the other, each in a network namespace the test creates and removes.  Verified random
// workloads (plain, encrypted, with injected loss, reordering and duplication), a dead link
// (EIO after the dead time, no hang), an exporter restart, malformed frames and a wrong key.
#include <arpa/inet.h>
#include <execinfo.h>
#include <net/if.h>
#include <sys/socket.h>
#include <unistd.h>

#include <QTemporaryDir>
#include <QtTest/QtTest>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <future>
#include <mutex>
#include <new>
#include <memory>
#include <thread>

#include "dst/block_device.h"
#include "dst/file_device.h"
#include "dst/net/eth_format.h"
#include "dst/net/eth_transport.h"
#include "dst/net/exporter.h"
#include "dst/net/remote_device.h"
#include "io_thread.h"
#include "remote_workload.h"
#include "test_env.h"
#include "veth_netns.h"

// --- allocation counter (noAllocationPerIo) -------------------------------------------------
static std::atomic<bool> g_count_allocs{false};
static std::atomic<std::uint64_t> g_allocs{0};
static thread_local bool t_tracing = false;
// DST_ALLOC_TRACE=1 prints a backtrace of the first few counted allocations (to find them).
void* operator new(std::size_t n) {
  if (g_count_allocs.load(std::memory_order_relaxed) && !t_tracing &&
      g_allocs.fetch_add(1, std::memory_order_relaxed) < 6 && getenv("DST_ALLOC_TRACE")) {
    t_tracing = true;
    void* bt[30];
    const int k = backtrace(bt, 30);
    std::fprintf(stderr, "--- alloc %zu\n", n);
    backtrace_symbols_fd(bt, k, 2);
    t_tracing = false;
  }
  void* p = std::malloc(n ? n : 1);
  if (!p) throw std::bad_alloc();
  return p;
}
void* operator new[](std::size_t n) { return operator new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

using namespace dst;
using namespace dst::net;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

const std::vector<std::uint8_t> kKey(32, 0x5a);

// Polls pred every 10 ms until it holds or `ms` pass.
bool WaitFor(const std::function<bool()>& pred, int ms) {
  const auto end = Clock::now() + milliseconds(ms);
  while (!pred()) {
    if (Clock::now() >= end) return false;
    std::this_thread::sleep_for(milliseconds(10));
  }
  return true;
}

void RequireNetns() {
  DST_REQUIRE(dst::test::IsRoot(), "network namespaces and AF_PACKET sockets need root");
  DST_REQUIRE(dst::test::HaveTool("ip"), "iproute2 (ip) not installed");
}

// Opens a session from endpoint `a` to endpoint `b` on `strand` (null on failure).
std::unique_ptr<Transport> ConnectOn(EthEndpoint& a, EthEndpoint& b, const Strand& strand) {
  std::array<std::uint8_t, 6> mac{};
  std::memcpy(mac.data(), b.mac(), 6);
  auto conn = a.MakeConnector(strand, mac);
  std::promise<std::unique_ptr<Transport>> got;
  boost::asio::post(strand, [&] {
    conn->AsyncConnect(milliseconds(1000), [&](Status st, std::unique_ptr<Transport> t) {
      if (!st.ok()) t.reset();
      got.set_value(std::move(t));
    });
  });
  return got.get_future().get();
}

struct Setup {
  bool encrypted = true;
  EthFaultOptions fault;
  milliseconds dead_time{10000};
  std::uint64_t export_size = 64ull << 20;
  bool coalesce = true;
  bool shared_io = false;  // endpoints on the rig's io_context (as in dstd), not threads of their own
};

// A veth pair, an exporter on side b, endpoints on both sides.
class Rig {
 public:
  explicit Rig(Setup s) : s_(s) {}
  ~Rig() {
    if (dev) dev->Close();
    dev.reset();
    StopServer();
    if (a) a->Close();
  }

  bool Start(std::string* err) {
    if (!dir_.isValid()) return *err = "no temporary directory", false;
    if (!v_.Create(err)) return false;
    auto ra = OpenEndpoint(0, s_.fault, "host-a");
    if (!ra.ok()) return *err = ra.status().ToString(), false;
    a = ra.value();
    return StartServer(err);
  }

  Result<std::shared_ptr<EthEndpoint>> OpenEndpoint(int side, const EthFaultOptions& fault, const std::string& ident,
                                                    std::vector<std::uint8_t> key = kKey) {
    dst::test::InNetns in(v_.ns(side));
    if (!in.ok()) return Status::Unavailable("cannot enter " + v_.ns(side));
    EthEndpointOptions o;
    o.link.ifname = v_.ifname(side);
    if (s_.encrypted) {
      o.psks.push_back({ident, key});
      o.identity = ident;
    } else {
      o.insecure_segment = true;
    }
    o.dead_time = s_.dead_time;
    o.fault = fault;
    o.coalesce = s_.coalesce;
    if (s_.shared_io) o.io = &io.io;
    return EthEndpoint::Open(o);
  }

  // The veth pair and both endpoints (into a and b), no exporter: tests that drive sessions.
  bool OpenEndpoints(std::string* err) {
    if (!v_.Create(err)) return false;
    auto ra = OpenEndpoint(0, {}, "host-a");
    auto rb = OpenEndpoint(1, {}, "host-a");
    if (!ra.ok() || !rb.ok()) return *err = (ra.ok() ? rb.status() : ra.status()).ToString(), false;
    a = ra.value();
    b = rb.value();
    return true;
  }

  bool StartServer(std::string* err) {
    auto rb = OpenEndpoint(1, s_.fault, "host-a");
    if (!rb.ok()) return *err = rb.status().ToString(), false;
    b = rb.value();
    FileDeviceOptions fo;
    fo.create = true;
    fo.size = s_.export_size;
    auto fd = FileDevice::Open((dir_.path() + "/disk.img").toStdString(), fo);
    if (!fd.ok()) return *err = fd.status().ToString(), false;
    ExporterOptions eo;
    auto ep = b;
    eo.listener = [ep](const Strand& ex) { return ep->MakeListener(ex); };
    exp = std::make_unique<Exporter>(io.io, eo);
    if (Status st = exp->Start(); !st.ok()) return *err = st.ToString(), false;
    if (Status st = exp->AddExport({"disk", fd.value(), false, {}}); !st.ok()) return *err = st.ToString(), false;
    std::memcpy(mac_b.data(), b->mac(), 6);
    return true;
  }
  void StopServer() {
    if (exp) {
      std::promise<Status> p;
      exp->Drain([&p](Status s) { p.set_value(s); });
      p.get_future().wait_for(std::chrono::seconds(10));
      exp.reset();
    }
    if (b) b->Close();
    b.reset();
  }

  Result<std::shared_ptr<RemoteDevice>> Connect(RemoteOptions o = {}) {
    o.export_name = "disk";
    o.queue_depth = 32;
    auto ep = a;
    auto mac = mac_b;
    o.connector = [ep, mac](const Strand& s) { return ep->MakeConnector(s, mac); };
    return RemoteDevice::Connect(io.io, o);
  }

  // Start() and Connect() in one: the device lands in `dev`.
  Status StartConnected(RemoteOptions o = {}) {
    std::string err;
    if (!Start(&err)) return Status::Unavailable(err);
    auto d = Connect(o);
    if (!d.ok()) return d.status();
    dev = d.value();
    return Status::OK();
  }

  dst::test::VethNetns& veth() { return v_; }

  dst::test::IoThread io;
  std::shared_ptr<EthEndpoint> a, b;
  std::unique_ptr<Exporter> exp;
  std::shared_ptr<RemoteDevice> dev;
  std::array<std::uint8_t, 6> mac_b{};

 private:
  Setup s_;
  QTemporaryDir dir_;
  dst::test::VethNetns v_;
};

void PrintStats(const char* who, const EthEndpointStats& s) {
  qInfo("%s %s (%s, mtu %u, tx %s, rx %s): %llu frames in %llu send calls (%.1f per call), %llu received "
        "in %llu calls (%.1f per call), ring peak %llu, retransmits %llu, timeouts %llu, duplicates %llu, "
        "out of order %llu, malformed %llu, bad tag %llu, replayed %llu, faults drop/dup/reorder %llu/%llu/%llu",
        who, s.ifname.c_str(), s.mac.c_str(), s.mtu, s.tx_mode.c_str(), s.rx_mode.c_str(),
        (unsigned long long)s.frames_sent, (unsigned long long)s.send_calls, s.frames_per_send_call,
        (unsigned long long)s.frames_received, (unsigned long long)s.receive_calls, s.frames_per_receive_call,
        (unsigned long long)s.tx_ring_peak, (unsigned long long)s.retransmits, (unsigned long long)s.timeouts,
        (unsigned long long)s.duplicates, (unsigned long long)s.out_of_order, (unsigned long long)s.malformed,
        (unsigned long long)s.bad_tag, (unsigned long long)s.replayed, (unsigned long long)s.fault_dropped,
        (unsigned long long)s.fault_duplicated, (unsigned long long)s.fault_reordered);
}

// Runs a verified random workload of `bytes`, then reads everything back.
void RunWorkload(BlockDevice& dev, std::uint64_t size, std::uint64_t bytes, int seconds) {
  dst::test::Workload w(dev, size, 32, 7);
  const auto t0 = Clock::now();
  QVERIFY2(w.Run(bytes, nullptr, t0 + std::chrono::seconds(seconds)), "requests hung");
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  auto t = w.totals();
  qInfo("%llu ops, %.1f MiB in %.1f s = %.0f MiB/s, max latency %lld ms", (unsigned long long)t.ops,
        t.bytes / 1048576.0, secs, t.bytes / 1048576.0 / secs, (long long)t.max_latency.count());
  QCOMPARE(t.errors, std::uint64_t(0));
  QVERIFY2(t.mismatches == 0, t.first_mismatch.c_str());
  QVERIFY2(t.bytes >= bytes, "workload did not finish within the time budget");
  std::string first;
  const auto bad = w.VerifyAll(&first);
  QVERIFY2(bad == 0, (std::to_string(bad) + " bad blocks, first " + first).c_str());
}

void Inject(const std::string& ifname, const std::vector<std::uint8_t>& frame) {
  QVERIFY(dst::test::InjectFrame(ifname, frame));
}

}  // namespace

class EthTransportTest : public QObject {
  Q_OBJECT

 private slots:
  // 256 MiB of verified random I/O over an encrypted session (and the counters that show the
  // batching), with the endpoints on threads of their own and on the rig's io_context.
  void verifiedWorkloadEncrypted_data() {
    QTest::addColumn<bool>("shared_io");
    QTest::newRow("own thread") << false;
    QTest::newRow("shared io") << true;
  }
  void verifiedWorkloadEncrypted() {
    QFETCH(bool, shared_io);
    RequireNetns();
    Setup setup;
    setup.shared_io = shared_io;
    Rig r(setup);
    const Status up = r.StartConnected();
    QVERIFY2(up.ok(), up.ToString().c_str());
    QCOMPARE(r.dev->Info().size, std::uint64_t(64) << 20);
    RunWorkload(*r.dev, 64ull << 20, 256ull << 20, 150);
    const auto sa = r.a->Stats(), sb = r.b->Stats();
    PrintStats("client", sa);
    PrintStats("server", sb);
    QVERIFY(sa.encrypted && !sa.insecure_segment);
    QCOMPARE(sa.bad_tag + sb.bad_tag, std::uint64_t(0));
    QCOMPARE(sa.malformed + sb.malformed, std::uint64_t(0));
    QVERIFY2(sa.frames_per_send_call > 1.5, "the transmitter did not batch");
    QCOMPARE(QString::fromStdString(r.dev->Stats().state), QString("connected"));
    QCOMPARE(r.dev->Stats().reconnects, std::uint64_t(0));
  }

  // Loss, reordering and duplication from the transport's fault hook, on both ends: the data
  // stays right and the retransmits are counted.
  void faultsKeepDataIntact_data() {
    QTest::addColumn<bool>("encrypted");
    QTest::addColumn<bool>("shared_io");
    QTest::newRow("unencrypted") << false << false;
    QTest::newRow("encrypted") << true << false;
    QTest::newRow("encrypted, shared io") << true << true;
  }
  void faultsKeepDataIntact() {
    QFETCH(bool, encrypted);
    QFETCH(bool, shared_io);
    RequireNetns();
    Setup s;
    s.encrypted = encrypted;
    s.shared_io = shared_io;
    s.fault.drop = 0.01;
    s.fault.duplicate = 0.01;
    s.fault.reorder = 0.02;
    s.fault.seed = 99;
    Rig r(s);
    const Status up = r.StartConnected();
    QVERIFY2(up.ok(), up.ToString().c_str());
    RunWorkload(*r.dev, 64ull << 20, 48ull << 20, 150);
    const auto sa = r.a->Stats(), sb = r.b->Stats();
    PrintStats("client", sa);
    PrintStats("server", sb);
    QVERIFY(sa.fault_dropped > 0 && sa.fault_duplicated > 0 && sa.fault_reordered > 0);
    QVERIFY2(sa.retransmits + sb.retransmits > 0, "losses were not repaired by retransmits");
    if (encrypted)
      QVERIFY2(sa.replayed + sb.replayed > 0, "duplicated frames were not caught by the replay window");
    else
      QVERIFY2(sa.duplicates + sb.duplicates > 0, "duplicated fragments were not counted");
    QVERIFY(sa.out_of_order + sb.out_of_order > 0);
    QCOMPARE(sa.bad_tag + sb.bad_tag, std::uint64_t(0));
  }

  // The link goes down past the dead time: pending and new I/O fail with EIO, nothing hangs.
  void linkDownFailsWithEio() {
    RequireNetns();
    Setup s;
    s.dead_time = milliseconds(1000);
    Rig r(s);
    RemoteOptions o;
    o.io_timeout = milliseconds(3000);
    o.keepalive_timeout = milliseconds(2000);
    const Status up = r.StartConnected(o);
    QVERIFY2(up.ok(), up.ToString().c_str());
    std::vector<char> w(64 << 10, 'x'), rd(64 << 10);
    QVERIFY(WriteSync(*r.dev, 0, w.data(), w.size()).ok());
    QCOMPARE(std::system(("ip -n " + r.veth().ns(1) + " link set " + r.veth().ifname(1) + " down").c_str()), 0);
    const auto t0 = Clock::now();
    Status st = WriteSync(*r.dev, 65536, w.data(), w.size());
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    qInfo("write with the link down: %s after %.1f s", st.ToString().c_str(), secs);
    QVERIFY(!st.ok());
    QVERIFY2(st.IsIoError(), st.ToString().c_str());
    QVERIFY2(secs < 15, "the write hung");
    st = ReadSync(*r.dev, 0, rd.data(), rd.size());
    QVERIFY(!st.ok());
    QVERIFY(r.a->Stats().dead_sessions + r.dev->Stats().reconnects > 0);
    // The link comes back: the client reconnects by itself and the data written before is there.
    QCOMPARE(std::system(("ip -n " + r.veth().ns(1) + " link set " + r.veth().ifname(1) + " up").c_str()), 0);
    const auto end = Clock::now() + std::chrono::seconds(20);
    while (Clock::now() < end && QString::fromStdString(r.dev->Stats().state) != "connected")
      std::this_thread::sleep_for(milliseconds(100));
    QCOMPARE(QString::fromStdString(r.dev->Stats().state), QString("connected"));
    QVERIFY(ReadSync(*r.dev, 0, rd.data(), rd.size()).ok());
    QVERIFY(std::memcmp(rd.data(), w.data(), w.size()) == 0);
  }

  // The exporter (and its endpoint) go away and come back: the import recovers by itself.
  void exporterRestartRecovers() {
    RequireNetns();
    Setup s;
    s.dead_time = milliseconds(1500);
    Rig r(s);
    RemoteOptions o;
    o.io_timeout = milliseconds(30000);
    o.keepalive_timeout = milliseconds(1500);
    const Status up = r.StartConnected(o);
    QVERIFY2(up.ok(), up.ToString().c_str());
    std::vector<char> w(256 << 10), rd(256 << 10);
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = char(i * 7);
    QVERIFY(WriteSync(*r.dev, 1 << 20, w.data(), w.size()).ok());
    r.StopServer();
    std::this_thread::sleep_for(milliseconds(500));
    std::string err;
    QVERIFY2(r.StartServer(&err), err.c_str());
    const auto t0 = Clock::now();
    QVERIFY(ReadSync(*r.dev, 1 << 20, rd.data(), rd.size()).ok());
    qInfo("read after the restart took %.1f s, reconnects %llu",
          std::chrono::duration<double>(Clock::now() - t0).count(), (unsigned long long)r.dev->Stats().reconnects);
    QVERIFY(std::memcmp(rd.data(), w.data(), w.size()) == 0);
    QVERIFY(r.dev->Stats().reconnects >= 1);
  }

  // Garbage on the segment is dropped and counted; the sessions stay up.
  void malformedFramesIgnored() {
    RequireNetns();
    Rig r(Setup{});
    const Status up = r.StartConnected();
    QVERIFY2(up.ok(), up.ToString().c_str());
    std::vector<char> w(128 << 10, 'q'), rd(128 << 10);
    QVERIFY(WriteSync(*r.dev, 0, w.data(), w.size()).ok());
    const auto before = r.b->Stats();

    EthHeader h;
    std::memcpy(h.dst, r.b->mac(), 6);
    std::memcpy(h.src, r.a->mac(), 6);
    h.type = EthType::kData;
    h.session = 0x1234;
    h.msg_len = 100;
    h.frag_count = 1;
    std::vector<std::uint8_t> payload(100, 0xee);
    std::vector<std::uint8_t> good(kEthOverhead + payload.size());
    QVERIFY(EncodeEthFrame(h, payload.data(), payload.size(), good.data(), good.size()) == good.size());
    {
      dst::test::InNetns in(r.veth().ns(0));
      QVERIFY(in.ok());
      auto wrong_type = good;
      wrong_type[12] = 0x88, wrong_type[13] = 0xb6;  // another EtherType: never even delivered
      Inject(r.veth().ifname(0), wrong_type);
      Inject(r.veth().ifname(0), std::vector<std::uint8_t>(good.begin(), good.begin() + 40));  // truncated
      auto oversized = good;
      oversized.resize(good.size() + 8, 0);  // trailing bytes past payload_len
      Inject(r.veth().ifname(0), oversized);
      auto bad_magic = good;
      bad_magic[14] = 0;
      Inject(r.veth().ifname(0), bad_magic);
      // A well-formed first frame of a new session with a forged tag: no key opens it.
      auto forged = good;
      forged[14 + 5] |= 0x02;  // flag AEAD
      for (int i = 0; i < 16; ++i) forged[14 + 48 + i] = std::uint8_t(i + 1);
      Inject(r.veth().ifname(0), forged);
      // An unencrypted frame for the live session's peer: refused on an encrypted endpoint.
      Inject(r.veth().ifname(0), good);
    }
    std::this_thread::sleep_for(milliseconds(200));
    const auto after = r.b->Stats();
    PrintStats("server", after);
    QVERIFY2(after.malformed >= before.malformed + 3, "malformed frames were not counted");
    QVERIFY2(after.bad_tag >= before.bad_tag + 1, "the forged tag was not counted");
    QCOMPARE(after.sessions_opened, before.sessions_opened);  // garbage never makes a session
    QVERIFY(ReadSync(*r.dev, 0, rd.data(), rd.size()).ok());
    QVERIFY(std::memcmp(rd.data(), w.data(), w.size()) == 0);
    QCOMPARE(r.dev->Stats().reconnects, std::uint64_t(0));
  }

  // A client with another key never gets a session: its frames fail authentication.
  void wrongKeyRefused() {
    RequireNetns();
    Rig r(Setup{});
    std::string err;
    QVERIFY2(r.Start(&err), err.c_str());
    r.a->Close();
    auto other = r.OpenEndpoint(0, {}, "host-a", std::vector<std::uint8_t>(32, 0x11));
    QVERIFY2(other.ok(), other.status().ToString().c_str());
    r.a = other.value();
    RemoteOptions o;
    o.connect_timeout = milliseconds(1500);
    auto d = r.Connect(o);
    QVERIFY(!d.ok());
    qInfo("connect with the wrong key: %s", d.status().ToString().c_str());
    QVERIFY(r.b->Stats().bad_tag > 0);
  }

  // DISCOVER: a station with our key answers with its listing; one with another key hears
  // nothing it can read and answers nothing.
  void discovery() {
    RequireNetns();
    Rig r(Setup{});
    std::string err;
    QVERIFY2(r.Start(&err), err.c_str());
    r.b->SetDiscoveryResponder([](const std::string& identity, EthEndpoint::DiscoveryAnswer answer) {
      answer("disk 67108864 rw # " + identity + "\n");
    });
    auto found = r.a->Discover(milliseconds(300));
    QVERIFY2(found.ok(), found.status().ToString().c_str());
    QCOMPARE(found.value().size(), std::size_t(1));
    QCOMPARE(found.value()[0].mac, FormatMac(r.b->mac()));
    QCOMPARE(found.value()[0].listing, std::string("disk 67108864 rw # host-a\n"));
    r.a->Close();
    auto other = r.OpenEndpoint(0, {}, "host-a", std::vector<std::uint8_t>(32, 0x11));
    QVERIFY2(other.ok(), other.status().ToString().c_str());
    r.a = other.value();
    const auto before = r.b->Stats().bad_tag;
    found = r.a->Discover(milliseconds(300));
    QVERIFY(found.ok());
    QCOMPARE(found.value().size(), std::size_t(0));
    QCOMPARE(r.b->Stats().bad_tag, before + 1);
  }

  // Steady-state I/O over an encrypted session: heap allocations per request, counted on every
  // thread (client, exporter, endpoints, AEAD).
  void noAllocationPerIo_data() {
    QTest::addColumn<bool>("shared_io");
    QTest::newRow("own thread") << false;
    QTest::newRow("shared io") << true;
  }
  void noAllocationPerIo() {
    QFETCH(bool, shared_io);
    RequireNetns();
    Setup setup;
    setup.shared_io = shared_io;
    Rig r(setup);
    const Status up = r.StartConnected();
    QVERIFY2(up.ok(), up.ToString().c_str());
    constexpr int kDepth = 16;
    constexpr std::uint32_t kLen = 16 << 10;
    std::vector<char> buf(std::size_t(kDepth) * kLen, 'a');
    std::vector<IoRequest> reqs(kDepth);
    struct Batch {
      std::mutex mu;
      std::condition_variable cv;
      int done = 0, errors = 0;
      static void Done(IoRequest* q, Status st) {
        auto* b = static_cast<Batch*>(q->ctx);
        std::lock_guard<std::mutex> l(b->mu);
        b->errors += !st.ok();
        ++b->done;
        b->cv.notify_all();
      }
    };
    auto round = [&](Batch& b, int n) {
      for (int i = 0; i < kDepth; ++i) {
        IoRequest& q = reqs[i];
        q = IoRequest{};
        q.op = (n + i) % 3 == 0 ? IoOp::kRead : IoOp::kWrite;
        q.offset = std::uint64_t(i) * kLen;
        q.length = kLen;
        q.data = buf.data() + std::size_t(i) * kLen;
        q.done = &Batch::Done;
        q.ctx = &b;
        r.dev->Submit(&q);
      }
      std::unique_lock<std::mutex> l(b.mu);
      b.cv.wait_for(l, std::chrono::seconds(30), [&] { return b.done == kDepth; });
    };
    for (int n = 0; n < 100; ++n) {  // warm-up: sessions, pools and Asio's caches settle
      Batch b;
      round(b, n);
    }
    constexpr int kRounds = 300;
    int errors = 0;
    g_allocs = 0;
    g_count_allocs = true;
    for (int n = 0; n < kRounds; ++n) {
      Batch b;
      round(b, n);
      errors += b.errors + (kDepth - b.done);
    }
    g_count_allocs = false;
    const std::uint64_t allocs = g_allocs.load();
    const int ios = kRounds * kDepth;
    qInfo("allocations during %d I/Os over eth: %llu (%.4f per I/O)", ios, (unsigned long long)allocs,
          double(allocs) / ios);
    QCOMPARE(errors, 0);
    // Not zero yet (the TCP path is: remote_device_test).  With endpoint threads of their own,
    // completions cross to the owners' strands, and when a strand has more handlers queued Asio
    // re-posts its invoker with the io thread's one-slot recycling cache, which misses now and
    // then (0.001-0.03 per I/O measured); on a shared io_context (dstd) 0.0004-0.0008.  It was
    // 0.41 before the typed tick timer and the per-session handler arena, 0.16 before the client
    // core's kick wait got an arena, and 0.23 on a shared io_context before the link's waits and
    // the tick did; this bound fails if any comes back.
    QVERIFY2(double(allocs) / ios < 0.08, qPrintable(QString("allocations: %1").arg(allocs)));
  }

  // A session a peer opened but nobody accepted is dropped when the listener closes (it used to
  // stay in the endpoint's table, acknowledging, until the endpoint closed).
  void unacceptedSessionsGoWithTheListener() {
    RequireNetns();
    Rig r(Setup{});
    std::string err;
    QVERIFY2(r.OpenEndpoints(&err), err.c_str());
    Strand strand = boost::asio::make_strand(r.io.io);
    auto listener = r.b->MakeListener(strand);  // never accepts
    std::unique_ptr<Transport> t = ConnectOn(*r.a, *r.b, strand);
    QVERIFY(t);
    static const char kHello[] = "hello";
    std::promise<boost::system::error_code> wrote;
    boost::asio::post(strand, [&] {
      t->AsyncWrite(boost::asio::buffer(kHello, sizeof kHello),
                    [&](const boost::system::error_code& ec, std::size_t) { wrote.set_value(ec); });
    });
    QVERIFY(!wrote.get_future().get());
    QVERIFY(WaitFor([&] { return r.b->Stats().sessions == 1; }, 2000));
    listener->Close();
    QVERIFY2(WaitFor([&] { return r.b->Stats().sessions == 0; }, 2000),
             "the unaccepted session stayed after the listener closed");
    boost::asio::post(strand, [&] { t->Close(); });
    std::promise<void> closed;
    boost::asio::post(strand, [&] {
      t.reset();
      closed.set_value();
    });
    closed.get_future().wait();
    r.a->Close();
    r.b->Close();
  }

  // The DST frames of one SendFrames call share fragments (§12.7): 64 small frames and a few
  // with payloads that straddle fragment boundaries arrive byte for byte, in far fewer frames
  // than DST frames; with coalescing off each DST frame takes at least one fragment.
  void framesOfOneCallShareFragments_data() {
    QTest::addColumn<bool>("coalesce");
    QTest::newRow("coalesced") << true;
    QTest::newRow("per-frame") << false;
  }
  void framesOfOneCallShareFragments() {
    QFETCH(bool, coalesce);
    RequireNetns();
    Setup setup;
    setup.coalesce = coalesce;
    Rig r(setup);
    std::string err;
    QVERIFY2(r.OpenEndpoints(&err), err.c_str());
    Strand strand = boost::asio::make_strand(r.io.io);
    auto listener = r.b->MakeListener(strand);
    std::promise<std::unique_ptr<Transport>> accepted;
    boost::asio::post(strand, [&] {
      listener->AsyncAccept([&](const boost::system::error_code& ec, std::unique_ptr<Transport> t) {
        if (ec) t.reset();
        accepted.set_value(std::move(t));
      });
    });
    std::unique_ptr<Transport> t = ConnectOn(*r.a, *r.b, strand);
    QVERIFY(t);

    // 64 header-only frames, then three with payloads (one larger than a fragment), in one list.
    constexpr int kSmall = 64, kBig = 3;
    std::vector<TxFrame> frames(kSmall + kBig);
    std::vector<std::vector<char>> payloads(kBig);
    std::string expect;
    for (int i = 0; i < kSmall + kBig; ++i) {
      TxFrame& f = frames[i];
      f.header_len = std::uint8_t(i % 3 == 0 ? 20 : kHeaderSize);
      for (int k = 0; k < f.header_len; ++k) f.header[k] = std::uint8_t(i * 7 + k);
      expect.append(reinterpret_cast<const char*>(f.header), f.header_len);
      if (i >= kSmall) {
        auto& p = payloads[i - kSmall];
        p.resize(i == kSmall ? 3000 : 700 + i);
        for (std::size_t k = 0; k < p.size(); ++k) p[k] = char(k * 13 + i);
        f.payload = p.data();
        f.payload_len = std::uint32_t(p.size());
        expect.append(p.data(), p.size());
      }
      if (i + 1 < kSmall + kBig) f.next = &frames[i + 1];
    }
    const auto before = r.a->Stats();
    std::promise<std::pair<std::size_t, boost::system::error_code>> sent;
    boost::asio::post(strand, [&] {
      boost::system::error_code ec;
      const std::size_t n = t->SendFrames(&frames[0], 0, SendLimits{}, ec);
      sent.set_value({n, ec});
    });
    const auto [n, ec] = sent.get_future().get();
    QVERIFY2(!ec, ec.message().c_str());
    QCOMPARE(n, expect.size());

    std::unique_ptr<Transport> peer = accepted.get_future().get();
    QVERIFY(peer);
    std::string in(expect.size(), '\0');
    std::promise<boost::system::error_code> read;
    boost::asio::post(peer->strand(), [&] {
      peer->AsyncRead(boost::asio::buffer(in.data(), in.size()),
                      [&](const boost::system::error_code& e, std::size_t) { read.set_value(e); });
    });
    auto rf = read.get_future();
    QVERIFY(rf.wait_for(std::chrono::seconds(5)) == std::future_status::ready);
    QVERIFY2(!rf.get(), "read failed");
    QVERIFY2(in == expect, "the stream arrived different from what was sent");
    // frames_sent also counts retransmits (a slow CI machine may see one): not new data.
    const auto after = r.a->Stats();
    const std::uint64_t data_frames =
        (after.frames_sent - before.frames_sent) - (after.retransmits - before.retransmits);
    const std::uint32_t frag = std::uint32_t(EthMaxFragment(1500));
    qInfo("%zu bytes in %d DST frames went out as %llu Ethernet frames (coalesce=%d)", expect.size(),
          kSmall + kBig, (unsigned long long)data_frames, int(coalesce));
    if (coalesce)
      QCOMPARE(data_frames, std::uint64_t(EthFragmentCount(std::uint32_t(expect.size()), frag)));
    else
      QVERIFY(data_frames >= std::uint64_t(kSmall + kBig));
    std::promise<void> closed;
    boost::asio::post(strand, [&] {
      t->Close();
      t.reset();
      boost::asio::post(peer->strand(), [&] {
        peer->Close();
        peer.reset();
        closed.set_value();
      });
    });
    closed.get_future().wait();
    listener->Close();
    r.a->Close();
    r.b->Close();
  }

  // An endpoint on a given io_context: Discover on that io_context's thread is refused (it would
  // hold up its own answers); Close from another thread returns once the link is closed; Close on
  // the io thread itself neither blocks nor waits for itself.
  void sharedIoEndpointLife() {
    RequireNetns();
    Setup setup;
    setup.shared_io = true;
    Rig r(setup);
    std::string err;
    QVERIFY2(r.OpenEndpoints(&err), err.c_str());
    r.b->SetDiscoveryResponder([](const std::string&, EthEndpoint::DiscoveryAnswer answer) { answer("disk 1 rw\n"); });
    auto found = r.a->Discover(milliseconds(300));  // from this (non-io) thread: fine
    QVERIFY2(found.ok() && found.value().size() == 1, found.ok() ? "no answer" : found.status().ToString().c_str());
    std::promise<Status> on_io;
    boost::asio::post(r.io.io, [&] {
      auto f = r.a->Discover(milliseconds(300));
      on_io.set_value(f.ok() ? Status::OK() : f.status());
    });
    const Status st = on_io.get_future().get();
    QCOMPARE(st.code(), Status::Code::kNotSupported);
    QVERIFY2(st.message().find("blocks") != std::string::npos, st.ToString().c_str());
    // Close from here: once it returns the endpoint is closed for good.
    r.a->Close();
    auto after = r.a->Discover(milliseconds(10));
    QCOMPARE(after.status().code(), Status::Code::kUnavailable);
    // Close on the io thread (not on the endpoint's strand): returns without waiting for itself.
    std::promise<void> closed;
    boost::asio::post(r.io.io, [&] {
      r.b->Close();
      closed.set_value();
    });
    QVERIFY(closed.get_future().wait_for(std::chrono::seconds(5)) == std::future_status::ready);
    QVERIFY(WaitFor([&] { return r.b->Discover(milliseconds(10)).status().code() == Status::Code::kUnavailable; },
                    2000));
  }

  // Without CAP_NET_RAW, or without keys and without insecure_segment, opening says why.
  void openErrorsAreClear() {
    EthEndpointOptions o;
    o.link.ifname = "lo";
    auto r = EthEndpoint::Open(o);
    QVERIFY(!r.ok());
    QVERIFY2(r.status().message().find("insecure_segment") != std::string::npos, r.status().ToString().c_str());
    o.psks.push_back({"x", std::vector<std::uint8_t>(8, 1)});
    r = EthEndpoint::Open(o);
    QVERIFY(!r.ok());
    QVERIFY(r.status().message().find("16 bytes") != std::string::npos);
    std::array<std::uint8_t, 6> m{};
    QVERIFY(ParseMac("02:00:00:00:00:01", &m).ok());
    QCOMPARE(int(m[5]), 1);
    QVERIFY(!ParseMac("01:00:5e:00:00:01", &m).ok());  // multicast
    QVERIFY(!ParseMac("02:00:00:00:00", &m).ok());
  }
};

QTEST_GUILESS_MAIN(EthTransportTest)
#include "eth_transport_test.moc"
