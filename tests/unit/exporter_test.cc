// Unit tests for the DST exporter: an in-process server on 127.0.0.1 (port 0) over FileDevices
// on temp files, driven by a raw-socket client so every byte on the wire is under test control.
#include <arpa/inet.h>
#include <execinfo.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <QTemporaryDir>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <condition_variable>
#include <map>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include "dst/file_device.h"
#include "dst/net/codec.h"
#include "dst/net/exporter.h"
#include "fake_identity.h"
#include "slow_reader.h"
#include "test_env.h"

// ---- allocation counter ------------------------------------------------------------------------
// Every operator new in the process is counted while g_count_allocs is set.  The test client in
// the measured loop only makes system calls on preallocated buffers, so whatever is counted is the
// server's (or Asio's on its behalf).  DST_ALLOC_TRACE=1 prints a backtrace for each one.
namespace {
std::atomic<bool> g_count_allocs{false};
std::atomic<std::uint64_t> g_allocs{0};
bool g_trace = false;

void* CountedAlloc(std::size_t n, std::size_t align) {
  if (g_count_allocs.load(std::memory_order_relaxed)) {
    g_allocs.fetch_add(1, std::memory_order_relaxed);
    if (g_trace) {
      void* frames[24];
      int k = backtrace(frames, 24);
      backtrace_symbols_fd(frames, k, 2);
      write(2, "----\n", 5);
    }
  }
  if (n == 0) n = 1;
  void* p = align > alignof(std::max_align_t) ? std::aligned_alloc(align, (n + align - 1) / align * align)
                                                : std::malloc(n);
  if (!p) throw std::bad_alloc();
  return p;
}
}  // namespace

void* operator new(std::size_t n) { return CountedAlloc(n, 0); }
void* operator new[](std::size_t n) { return CountedAlloc(n, 0); }
void* operator new(std::size_t n, std::align_val_t a) { return CountedAlloc(n, std::size_t(a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return CountedAlloc(n, std::size_t(a)); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

using namespace dst;
using namespace dst::net;

namespace {

constexpr std::uint64_t kDiskSize = 8u << 20;

// A blocking raw-socket DST client.  No allocation after Connect()/Hello().
class RawClient {
 public:
  ~RawClient() { Close(); }
  // from: a local address to bind first (127.0.0.x: a fake identity, fake_identity.h).
  bool Connect(std::uint16_t port, const char* from = nullptr) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd_ < 0) return false;
    if (from) {
      sockaddr_in src{};
      src.sin_family = AF_INET;
      ::inet_pton(AF_INET, from, &src.sin_addr);
      if (::bind(fd_, reinterpret_cast<sockaddr*>(&src), sizeof src) != 0) return false;
    }
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return false;
    int one = 1;
    setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    timeval tv{10, 0};
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    return true;
  }
  void Close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  int fd() const { return fd_; }

  bool SendAll(const void* p, std::size_t n) {
    auto* c = static_cast<const char*>(p);
    while (n) {
      ssize_t w = ::send(fd_, c, n, MSG_NOSIGNAL);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) return false;
      c += w;
      n -= std::size_t(w);
    }
    return true;
  }
  bool RecvAll(void* p, std::size_t n) {
    auto* c = static_cast<char*>(p);
    while (n) {
      ssize_t r = ::recv(fd_, c, n, 0);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return false;
      c += r;
      n -= std::size_t(r);
    }
    return true;
  }
  bool Send(Cmd cmd, std::uint64_t id, std::uint64_t off, std::uint32_t len, const void* payload = nullptr,
            std::uint16_t flags = 0, std::uint64_t digest = 0) {
    Header h;
    h.cmd = static_cast<std::uint16_t>(cmd);
    h.flags = flags;
    h.digest = digest;
    h.id = id;
    h.offset = off;
    h.length = len;
    std::uint8_t hdr[kHeaderSize];
    EncodeHeader(h, hdr);
    if (!SendAll(hdr, kHeaderSize)) return false;
    return payload ? SendAll(payload, len) : true;
  }
  // Reads one reply header (and the READ payload into `data`, which must be big enough).
  bool Recv(Header* h, void* data = nullptr) {
    std::uint8_t hdr[kHeaderSize];
    if (!RecvAll(hdr, kHeaderSize)) return false;
    if (!DecodeHeader(hdr, h).ok() || !h->is_reply()) return false;
    if (HasPayload(*h) && h->length) {
      if (!data) return false;
      return RecvAll(data, h->length);
    }
    return true;
  }
  // Sends HELLO; returns the reply status (or -1 on a transport/format failure).
  long Hello(const std::string& name, std::uint64_t session = 0, HelloReply* out = nullptr,
             std::uint32_t features = 0) {
    HelloRequest r;
    r.export_name = name;
    r.session_id = session;
    r.features = features;
    std::uint8_t p[kMaxHelloPayload];
    std::size_t n = EncodeHelloRequest(r, p, sizeof p);
    if (!Send(Cmd::kHello, 1, 0, std::uint32_t(n), p)) return -1;
    std::uint8_t hdr[kHeaderSize];
    if (!RecvAll(hdr, kHeaderSize)) return -1;
    Header h;
    if (!DecodeHeader(hdr, &h).ok() || h.cmd != (std::uint16_t(Cmd::kHello) | kReplyBit)) return -1;
    std::uint8_t rp[kMaxHelloPayload];
    if (h.length && !RecvAll(rp, h.length)) return -1;
    if (h.status == 0) {
      HelloReply rep;
      if (!DecodeHelloReply(rp, h.length, &rep).ok()) return -1;
      if (out) *out = rep;
    }
    return long(h.status);
  }
  // True when the server closes the connection (EOF or reset) within `ms`.
  bool ClosedWithin(int ms) {
    char buf[4096];
    for (int waited = 0; waited < ms;) {
      pollfd p{fd_, POLLIN, 0};
      int r = ::poll(&p, 1, 100);
      waited += 100;
      if (r <= 0) continue;
      ssize_t n = ::recv(fd_, buf, sizeof buf, MSG_DONTWAIT);
      if (n == 0) return true;
      if (n < 0 && errno != EAGAIN && errno != EINTR) return true;
    }
    return false;
  }

 private:
  int fd_ = -1;
};

void Fill(std::vector<char>& v, std::uint32_t seed) {
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = char((i * 131 + seed * 7 + (i >> 9)) & 0xff);
}

// Delays every request by `delay` before handing it to the inner device, so a test can have
// requests in flight at a chosen moment.
class SlowDevice : public BlockDevice {
 public:
  SlowDevice(std::shared_ptr<BlockDevice> inner, std::chrono::milliseconds delay)
      : inner_(std::move(inner)), delay_(delay), worker_([this] { Run(); }) {}
  ~SlowDevice() override {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    worker_.join();
  }
  DeviceInfo Info() const override { return inner_->Info(); }
  std::string Describe() const override { return "slow " + inner_->Describe(); }
  void Submit(IoRequest* req) override {
    std::lock_guard<std::mutex> l(mu_);
    q_.push_back({req, std::chrono::steady_clock::now() + delay_});
    cv_.notify_all();
  }

 private:
  void Run() {
    std::unique_lock<std::mutex> l(mu_);
    for (;;) {
      cv_.wait(l, [&] { return stop_ || !q_.empty(); });
      if (q_.empty()) return;
      auto [req, when] = q_.front();
      q_.erase(q_.begin());
      l.unlock();
      std::this_thread::sleep_until(when);
      inner_->Submit(req);
      l.lock();
    }
  }
  std::shared_ptr<BlockDevice> inner_;
  std::chrono::milliseconds delay_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::pair<IoRequest*, std::chrono::steady_clock::time_point>> q_;
  bool stop_ = false;
  std::thread worker_;
};

// Completes requests on its own worker thread once the test opens the gate, and owns that
// thread like FileDevice does: the destructor joins it.  Destroying the device on its own worker
// (the last reference dropped in a completion) would make join() throw / deadlock, so it records
// that case instead and detaches.
class GatedDevice : public BlockDevice {
 public:
  static inline std::atomic<int> destroyed{0};
  static inline std::atomic<int> destroyed_on_worker{0};

  GatedDevice() : worker_([this] { Run(); }) {}
  ~GatedDevice() override {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (std::this_thread::get_id() == worker_.get_id()) {
      ++destroyed_on_worker;
      worker_.detach();  // the worker returns right after the completion that destroyed us
    } else {
      worker_.join();
    }
    ++destroyed;
  }
  DeviceInfo Info() const override {
    DeviceInfo i;
    i.size = 1 << 20;
    i.logical_block_size = 512;
    i.can_flush = true;
    return i;
  }
  std::string Describe() const override { return "gated"; }
  void Submit(IoRequest* req) override {
    std::lock_guard<std::mutex> l(mu_);
    q_.push_back(req);
    cv_.notify_all();
  }
  void Open() {
    std::lock_guard<std::mutex> l(mu_);
    open_ = true;
    cv_.notify_all();
  }
  int queued() {
    std::lock_guard<std::mutex> l(mu_);
    return int(q_.size());
  }

 private:
  void Run() {
    std::unique_lock<std::mutex> l(mu_);
    for (;;) {
      cv_.wait(l, [&] { return stop_ || (open_ && !q_.empty()); });
      if (stop_) return;
      IoRequest* req = q_.front();
      q_.erase(q_.begin());
      l.unlock();
      // The completion may destroy `this` (the bug under test); touch nothing after it.
      req->done(req, Status::OK());
      return;  // one completion is all the test needs
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<IoRequest*> q_;
  bool stop_ = false;
  bool open_ = false;
  std::thread worker_;
};

struct Server {
  boost::asio::io_context io;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> guard{io.get_executor()};
  std::vector<std::thread> threads;
  std::unique_ptr<Exporter> exporter;

  bool Start(ExporterOptions o, int nthreads) {
    o.listen_address = "127.0.0.1";
    o.port = 0;
    exporter = std::make_unique<Exporter>(io, o);
    if (!exporter->Start().ok()) return false;
    for (int i = 0; i < nthreads; ++i) threads.emplace_back([this] { io.run(); });
    return true;
  }
  ~Server() {
    exporter.reset();
    guard.reset();
    // Let the shutdown handlers run, then stop.
    for (int i = 0; i < 50 && !io.stopped(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    io.stop();
    for (auto& t : threads) t.join();
  }
};

}  // namespace

class ExporterTest : public QObject {
  Q_OBJECT

 private:
  QTemporaryDir dir_;
  std::shared_ptr<FileDevice> disk_, ro_;
  std::unique_ptr<Server> srv_;
  std::uint16_t port_ = 0;

  std::shared_ptr<FileDevice> MakeDisk(const QString& name, bool read_only) {
    FileDeviceOptions o;
    o.create = true;
    o.size = kDiskSize;
    std::string path = (dir_.path() + "/" + name).toStdString();
    if (read_only) {
      auto rw = FileDevice::Open(path, o);
      if (!rw.ok()) return nullptr;
      std::vector<char> pat(4096);
      Fill(pat, 99);
      (void)WriteSync(**rw, 0, pat.data(), 4096);
      o.read_only = true;
      o.create = false;
    }
    auto r = FileDevice::Open(path, o);
    return r.ok() ? *r : nullptr;
  }

  // A second, well-behaved client: HELLO, WRITE, READ back.
  bool Healthy() {
    RawClient c;
    if (!c.Connect(port_) || c.Hello("disk") != 0) return false;
    std::vector<char> w(4096), r(4096);
    Fill(w, 12345);
    Header h;
    if (!c.Send(Cmd::kWrite, 7, 1u << 20, 4096, w.data()) || !c.Recv(&h) || h.status != 0 || h.id != 7)
      return false;
    if (!c.Send(Cmd::kRead, 8, 1u << 20, 4096) || !c.Recv(&h, r.data()) || h.status != 0 || h.id != 8)
      return false;
    return w == r;
  }

  // Connects and handshakes on "disk".
  bool Open(RawClient& c, const std::string& name = "disk") {
    return c.Connect(port_) && c.Hello(name) == 0;
  }

 private slots:
  void initTestCase() {
    g_trace = std::getenv("DST_ALLOC_TRACE") != nullptr;
    QVERIFY(dir_.isValid());
    disk_ = MakeDisk("disk.img", false);
    ro_ = MakeDisk("ro.img", true);
    QVERIFY(disk_ && ro_);
    srv_ = std::make_unique<Server>();
    ExporterOptions o;
    o.buffer_count = 64;
    QVERIFY(srv_->Start(o, 2));
    port_ = srv_->exporter->port();
    QVERIFY(port_ != 0);
    QVERIFY(srv_->exporter->AddExport({"disk", disk_, false, {}}).ok());
    QVERIFY(srv_->exporter->AddExport({"ro", ro_, false, {}}).ok());
    QCOMPARE(srv_->exporter->AddExport({"disk", disk_, false, {}}).code(), Status::Code::kExists);
    QCOMPARE(srv_->exporter->AddExport({"bad name", disk_, false, {}}).code(), Status::Code::kInvalidArgument);
  }
  void cleanupTestCase() { srv_.reset(); }

  void handshake() {
    RawClient c;
    QVERIFY(c.Connect(port_));
    HelloReply r;
    QCOMPARE(c.Hello("disk", 0, &r), 0L);
    QCOMPARE(r.size, kDiskSize);
    QCOMPARE(r.block_size, 512u);
    QCOMPARE(r.max_payload, kDefaultMaxPayload);
    QCOMPARE(r.permissions, kPermRead | kPermWrite);
    QVERIFY(!(r.export_flags & kExportReadOnly));
    QVERIFY(r.export_flags & kExportCanFlush);
    RawClient d;
    QVERIFY(d.Connect(port_));
    QCOMPARE(d.Hello("ro", 0, &r), 0L);
    QCOMPARE(r.permissions, kPermRead);
    QVERIFY(r.export_flags & kExportReadOnly);
    auto list = srv_->exporter->ListExports();
    QCOMPARE(int(list.size()), 2);
  }

  void allCommands() {
    RawClient c;
    QVERIFY(Open(c));
    std::vector<char> w(65536), r(65536), zero(65536, 0);
    Fill(w, 1);
    Header h;
    QVERIFY(c.Send(Cmd::kWrite, 1, 0, 65536, w.data()));
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.status, 0u);
    QCOMPARE(h.id, 1ull);
    QCOMPARE(h.cmd, std::uint16_t(std::uint16_t(Cmd::kWrite) | kReplyBit));
    QVERIFY(c.Send(Cmd::kRead, 2, 0, 65536));
    QVERIFY(c.Recv(&h, r.data()));
    QCOMPARE(h.status, 0u);
    QCOMPARE(h.length, 65536u);
    QVERIFY(r == w);
    QVERIFY(c.Send(Cmd::kWrite, 3, 65536, 65536, w.data(), kFlagFua));
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.status, 0u);
    QVERIFY(c.Send(Cmd::kFlush, 4, 0, 0));
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.status, 0u);
    QCOMPARE(h.id, 4ull);
    QVERIFY(c.Send(Cmd::kTrim, 5, 0, 8192));
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.status, 0u);
    QVERIFY(c.Send(Cmd::kRead, 6, 0, 8192));
    QVERIFY(c.Recv(&h, r.data()));
    QVERIFY(std::memcmp(r.data(), zero.data(), 8192) == 0);
    QVERIFY(c.Send(Cmd::kWriteZeroes, 7, 65536, 4096));
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.status, 0u);
    QVERIFY(c.Send(Cmd::kWriteZeroes, 8, 65536 + 4096, 4096, nullptr, kFlagNoUnmap));
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.status, 0u);
    QVERIFY(c.Send(Cmd::kRead, 9, 65536, 16384));
    QVERIFY(c.Recv(&h, r.data()));
    QVERIFY(std::memcmp(r.data(), zero.data(), 8192) == 0);
    QVERIFY(std::memcmp(r.data() + 8192, w.data() + 8192, 8192) == 0);
    QVERIFY(c.Send(Cmd::kPing, 10, 0, 0));
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.cmd, std::uint16_t(std::uint16_t(Cmd::kPing) | kReplyBit));
    QCOMPARE(h.id, 10ull);
    // DISCONNECT: no reply, the server closes.
    QVERIFY(c.Send(Cmd::kDisconnect, 11, 0, 0));
    QVERIFY(c.ClosedWithin(3000));
  }

  void pipelinedOutOfOrder() {
    RawClient c;
    QVERIFY(Open(c));
    constexpr int kN = 96;
    constexpr std::uint32_t kLen = 8192;
    std::vector<std::vector<char>> data(kN, std::vector<char>(kLen));
    for (int i = 0; i < kN; ++i) Fill(data[i], 1000 + i);
    auto before = srv_->exporter->Stats();
    for (int i = 0; i < kN; ++i) QVERIFY(c.Send(Cmd::kWrite, 100 + i, 2u * 1024 * 1024 + i * kLen, kLen, data[i].data()));
    std::map<std::uint64_t, int> seen;
    std::vector<char> buf(kLen);
    bool out_of_order = false;
    std::uint64_t last = 0;
    for (int i = 0; i < kN; ++i) {
      Header h;
      QVERIFY(c.Recv(&h));
      QCOMPARE(h.status, 0u);
      if (h.id < last) out_of_order = true;
      last = h.id;
      seen[h.id]++;
    }
    QCOMPARE(int(seen.size()), kN);
    for (int i = 0; i < kN; ++i) QVERIFY(c.Send(Cmd::kRead, 1000 + i, 2u * 1024 * 1024 + i * kLen, kLen));
    for (int i = 0; i < kN; ++i) {
      Header h;
      QVERIFY(c.Recv(&h, buf.data()));
      QCOMPARE(h.status, 0u);
      QVERIFY(h.id >= 1000 && h.id < 1000 + kN);
      if (h.id < last) out_of_order = true;
      last = h.id;
      QVERIFY(buf == data[h.id - 1000]);
      seen[h.id]++;
    }
    QCOMPARE(int(seen.size()), 2 * kN);
    // The frame counters move right after sendmsg returns, possibly after the client has the bytes.
    QTRY_VERIFY_WITH_TIMEOUT(srv_->exporter->Stats().frames_sent - before.frames_sent >= std::uint64_t(2 * kN), 2000);
    auto after = srv_->exporter->Stats();
    const double fpc = double(after.frames_sent - before.frames_sent) /
                       double(std::max<std::uint64_t>(1, after.send_calls - before.send_calls));
    qInfo("replies out of order: %s, frames per send call in this test: %.2f",
          out_of_order ? "yes" : "no", fpc);
    QVERIFY(after.frames_sent - before.frames_sent >= std::uint64_t(2 * kN));
    QVERIFY(after.send_calls - before.send_calls <= after.frames_sent - before.frames_sent);
  }

  // Regression for the receive buffer: 128 WRITEs of odd sizes in one send() (headers and
  // payloads straddle every 64 KiB buffer boundary), their READs in a second one, then a header
  // and a payload dribbled in pieces.  Every byte must land where its header says.
  void burstInOneSendAndSplitFrames() {
    RawClient c;
    QVERIFY(Open(c));
    constexpr std::uint64_t kBase = 7u << 20;
    constexpr int kN = 128;
    std::string burst, reads, expect;
    std::vector<std::uint32_t> lens;
    for (int i = 0; i < kN; ++i) {
      const std::uint32_t len = 512u * (1 + (i * 7) % 23);
      std::vector<char> d(len);
      Fill(d, 5000 + i);
      Header h;
      h.cmd = static_cast<std::uint16_t>(Cmd::kWrite);
      h.id = 2000 + i;
      h.offset = kBase + expect.size();
      h.length = len;
      std::uint8_t hdr[kHeaderSize];
      EncodeHeader(h, hdr);
      burst.append(reinterpret_cast<char*>(hdr), kHeaderSize);
      burst.append(d.data(), len);
      h.cmd = static_cast<std::uint16_t>(Cmd::kRead);
      h.id = 3000 + i;
      EncodeHeader(h, hdr);
      reads.append(reinterpret_cast<char*>(hdr), kHeaderSize);
      expect.append(d.data(), len);
      lens.push_back(len);
    }
    QVERIFY(burst.size() > 4 * (64u << 10));  // several receive buffers' worth
    QVERIFY(c.SendAll(burst.data(), burst.size()));
    std::map<std::uint64_t, int> seen;
    for (int i = 0; i < kN; ++i) {
      Header h;
      QVERIFY(c.Recv(&h));
      QCOMPARE(h.status, 0u);
      seen[h.id]++;
    }
    QCOMPARE(int(seen.size()), kN);
    std::vector<char> got(expect.size());
    QVERIFY(ReadSync(*disk_, kBase, got.data(), got.size()).ok());
    QVERIFY(std::string(got.data(), got.size()) == expect);
    QVERIFY(c.SendAll(reads.data(), reads.size()));
    std::vector<char> buf(512u * 23);
    std::vector<std::uint64_t> off(kN);
    for (int i = 1; i < kN; ++i) off[i] = off[i - 1] + lens[i - 1];
    for (int i = 0; i < kN; ++i) {
      Header h;
      QVERIFY(c.Recv(&h, buf.data()));
      QCOMPARE(h.status, 0u);
      QVERIFY(h.id >= 3000 && h.id < 3000 + kN);
      const int k = int(h.id - 3000);
      QCOMPARE(h.length, lens[k]);
      QVERIFY(std::memcmp(buf.data(), expect.data() + off[k], lens[k]) == 0);
    }

    Header h;
    h.cmd = static_cast<std::uint16_t>(Cmd::kWrite);
    h.id = 77;
    h.offset = kBase;
    h.length = 4096;
    std::uint8_t hdr[kHeaderSize];
    EncodeHeader(h, hdr);
    const std::string w(4096, 'Q');
    for (auto [from, to] : {std::pair{0, 3}, {3, 29}, {29, int(kHeaderSize)}}) {
      QVERIFY(c.SendAll(hdr + from, std::size_t(to - from)));
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    QVERIFY(c.SendAll(w.data(), 100));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    QVERIFY(c.SendAll(w.data() + 100, w.size() - 100));
    Header r;
    QVERIFY(c.Recv(&r));
    QCOMPARE(r.status, 0u);
    QCOMPARE(r.id, 77ull);
    std::vector<char> back(4096);
    QVERIFY(ReadSync(*disk_, kBase, back.data(), back.size()).ok());
    QVERIFY(std::string(back.data(), back.size()) == w);
  }

  // Per-export counters (dstctl status --json): requests and transmitter frames per export,
  // including connections that have already closed.
  void perExportCounters() {
    auto find = [&](const std::string& name) {
      for (auto& e : srv_->exporter->ListExports())
        if (e.name == name) return e;
      return ExportStatus{};
    };
    // Earlier tests' connections may still be closing on the server side.
    QTRY_COMPARE_WITH_TIMEOUT(find("disk").connections, 0, 5000);
    QTRY_COMPARE_WITH_TIMEOUT(find("ro").connections, 0, 5000);
    const ExportStatus disk0 = find("disk");
    const ExportStatus ro0 = find("ro");
    constexpr int kN = 32;
    {
      RawClient c;
      QVERIFY(Open(c));
      std::vector<char> w(4096);
      Fill(w, 77);
      for (int i = 0; i < kN; ++i) QVERIFY(c.Send(Cmd::kWrite, 500 + i, 3u << 20, 4096, w.data()));
      for (int i = 0; i < kN; ++i) {
        Header h;
        QVERIFY(c.Recv(&h));
        QCOMPARE(h.status, 0u);
      }
      QTRY_VERIFY_WITH_TIMEOUT(find("disk").frames_sent - disk0.frames_sent >= std::uint64_t(kN), 2000);
      const ExportStatus live = find("disk");
      QCOMPARE(live.connections, 1);
      QCOMPARE(live.requests - disk0.requests, std::uint64_t(kN));
      QVERIFY(live.send_calls > disk0.send_calls);
      QVERIFY(live.send_calls - disk0.send_calls <= live.frames_sent - disk0.frames_sent);
      QVERIFY(live.frames_per_call > 0);
      QVERIFY(live.frames_per_call >= 1.0);
    }
    // Closed: the connection's totals stay with the export.
    QTRY_COMPARE_WITH_TIMEOUT(find("disk").connections, 0, 3000);
    const ExportStatus after = find("disk");
    QVERIFY(after.frames_sent - disk0.frames_sent >= std::uint64_t(kN) + 1);  // + HELLO reply
    QCOMPARE(after.requests - disk0.requests, std::uint64_t(kN));
    QVERIFY(after.frames_per_call > 0);
    // Nothing of it was counted on the other export.
    const ExportStatus ro1 = find("ro");
    QCOMPARE(ro1.requests, ro0.requests);
    QCOMPARE(ro1.frames_sent, ro0.frames_sent);
    // Per-export totals never exceed the exporter-wide ones.
    const auto total = srv_->exporter->Stats();
    QVERIFY(after.frames_sent + ro1.frames_sent <= total.frames_sent);
    QVERIFY(after.send_calls + ro1.send_calls <= total.send_calls);
  }

  // ---- malformed input: each on a fresh connection, then a healthy client must still work ----

  // docs/protocol.md §4.1: the feature is echoed only when offered; a WRITE with a wrong (or no)
  // digest is not applied and answered EBADMSG; READ replies carry the payload's digest.
  void payloadDigests() {
    RawClient old;
    QVERIFY(old.Connect(port_));
    HelloReply r;
    QCOMPARE(old.Hello("disk", 0, &r, 0), 0L);
    QCOMPARE(r.features, 0u);  // not offered: an old client sees no change
    RawClient c;
    QVERIFY(c.Connect(port_));
    QCOMPARE(c.Hello("disk", 0, &r, kFeatureDigestXxh3 | 0x80000000u), 0L);
    QCOMPARE(r.features, kFeatureDigestXxh3);  // unknown bits are answered as 0
    std::vector<char> w(8192), rd(8192), before(8192);
    Fill(w, 9);
    Header h;
    const auto before_stats = srv_->exporter->Stats().digest_errors;
    QVERIFY(c.Send(Cmd::kRead, 1, 1 << 20, 8192));
    QVERIFY(c.Recv(&h, before.data()));
    QVERIFY(h.flags & kFlagDigest);
    QCOMPARE(h.digest, PayloadDigest(before.data(), 8192));
    QVERIFY(c.Send(Cmd::kWrite, 2, 1 << 20, 8192, w.data(), kFlagDigest, PayloadDigest(w.data(), 8192) ^ 1));
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.status, std::uint32_t(WireStatus::kBadMsg));
    QVERIFY(c.Send(Cmd::kWrite, 3, 1 << 20, 8192, w.data()));  // no digest at all
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.status, std::uint32_t(WireStatus::kBadMsg));
    QVERIFY(c.Send(Cmd::kRead, 4, 1 << 20, 8192));
    QVERIFY(c.Recv(&h, rd.data()));
    QVERIFY2(rd == before, "a WRITE with a bad digest must not be applied");
    QCOMPARE(srv_->exporter->Stats().digest_errors, before_stats + 2);
    QVERIFY(c.Send(Cmd::kWrite, 5, 1 << 20, 8192, w.data(), kFlagDigest, PayloadDigest(w.data(), 8192)));
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.status, 0u);
    QVERIFY(c.Send(Cmd::kRead, 6, 1 << 20, 8192));
    QVERIFY(c.Recv(&h, rd.data()));
    QVERIFY(rd == w);
    QCOMPARE(h.digest, PayloadDigest(w.data(), 8192));
    // The old client's READ replies carry no digest.
    QVERIFY(old.Send(Cmd::kRead, 7, 1 << 20, 8192));
    QVERIFY(old.Recv(&h, rd.data()));
    QVERIFY(!(h.flags & kFlagDigest));
  }

  void badMagic() {
    RawClient c;
    QVERIFY(Open(c));
    std::uint8_t hdr[kHeaderSize] = {};
    std::memcpy(hdr, "XXXX", 4);
    QVERIFY(c.SendAll(hdr, sizeof hdr));
    Header h;
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.cmd, std::uint16_t(std::uint16_t(Cmd::kDisconnect) | kReplyBit));
    QCOMPARE(h.status, std::uint32_t(WireStatus::kProto));
    QVERIFY(c.ClosedWithin(3000));
    QVERIFY(Healthy());
  }

  void unknownCommand() {
    auto before = srv_->exporter->Stats().protocol_errors;
    RawClient c;
    QVERIFY(Open(c));
    std::uint8_t hdr[kHeaderSize];
    Header q;
    q.cmd = 9;
    q.id = 77;
    EncodeHeader(q, hdr);
    QVERIFY(c.SendAll(hdr, sizeof hdr));
    Header h;
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.status, std::uint32_t(WireStatus::kProto));
    QCOMPARE(h.id, 77ull);
    QVERIFY(c.ClosedWithin(3000));
    QVERIFY(srv_->exporter->Stats().protocol_errors > before);
    QVERIFY(Healthy());
  }

  void oversizedLength() {
    {  // above the protocol maximum: framing error, closed
      RawClient c;
      QVERIFY(Open(c));
      QVERIFY(c.Send(Cmd::kRead, 5, 0, kAbsoluteMaxPayload + 512));
      Header h;
      QVERIFY(c.Recv(&h));
      QCOMPARE(h.status, std::uint32_t(WireStatus::kProto));
      QVERIFY(c.ClosedWithin(3000));
    }
    {  // above the negotiated max payload: EMSGSIZE, payload drained, connection stays
      RawClient c;
      QVERIFY(Open(c));
      std::vector<char> big(2u << 20);
      Fill(big, 5);
      QVERIFY(c.Send(Cmd::kWrite, 6, 0, std::uint32_t(big.size()), big.data()));
      Header h;
      QVERIFY(c.Recv(&h));
      QCOMPARE(h.id, 6ull);
      QCOMPARE(h.status, std::uint32_t(WireStatus::kMsgSize));
      QVERIFY(c.Send(Cmd::kRead, 7, 0, 2u << 20));
      QVERIFY(c.Recv(&h));
      QCOMPARE(h.status, std::uint32_t(WireStatus::kMsgSize));
      QCOMPARE(h.length, 0u);
      QVERIFY(c.Send(Cmd::kPing, 8, 0, 0));
      QVERIFY(c.Recv(&h));
      QCOMPARE(h.id, 8ull);
      QCOMPARE(h.status, 0u);
    }
    QVERIFY(Healthy());
  }

  void outOfRange() {
    RawClient c;
    QVERIFY(Open(c));
    Header h;
    QVERIFY(c.Send(Cmd::kRead, 1, kDiskSize, 512));
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.status, std::uint32_t(WireStatus::kRange));
    std::vector<char> w(1024);
    QVERIFY(c.Send(Cmd::kWrite, 2, kDiskSize - 512, 1024, w.data()));
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.status, std::uint32_t(WireStatus::kRange));
    QVERIFY(c.Send(Cmd::kRead, 3, ~0ull - 511, 1024));  // offset + length overflows
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.status, std::uint32_t(WireStatus::kRange));
    QVERIFY(c.Send(Cmd::kTrim, 4, kDiskSize, 4096));
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.status, std::uint32_t(WireStatus::kRange));
    QVERIFY(c.Send(Cmd::kPing, 5, 0, 0));  // still in sync
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.id, 5ull);
    QVERIFY(Healthy());
  }

  void misaligned() {
    RawClient c;
    QVERIFY(Open(c));
    Header h;
    QVERIFY(c.Send(Cmd::kRead, 1, 100, 512));
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.status, std::uint32_t(WireStatus::kInval));
    std::vector<char> w(700);
    QVERIFY(c.Send(Cmd::kWrite, 2, 0, 700, w.data()));
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.status, std::uint32_t(WireStatus::kInval));
    QVERIFY(c.Send(Cmd::kRead, 3, 0, 0));
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.status, std::uint32_t(WireStatus::kInval));
    QVERIFY(c.Send(Cmd::kPing, 4, 0, 0));
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.id, 4ull);
    QVERIFY(Healthy());
  }

  void truncatedHeader() {
    auto before = srv_->exporter->Stats().protocol_errors;
    {
      RawClient c;
      QVERIFY(Open(c));
      std::uint8_t hdr[kHeaderSize];
      Header q;
      q.cmd = std::uint16_t(Cmd::kRead);
      q.length = 512;
      EncodeHeader(q, hdr);
      QVERIFY(c.SendAll(hdr, 20));
    }
    QTRY_VERIFY_WITH_TIMEOUT(srv_->exporter->Stats().protocol_errors > before, 3000);
    QVERIFY(Healthy());
  }

  void truncatedPayload() {
    std::vector<char> orig(4096), r(4096);
    {
      RawClient c;
      QVERIFY(Open(c));
      Header h;
      QVERIFY(c.Send(Cmd::kRead, 1, 3u << 20, 4096));
      QVERIFY(c.Recv(&h, orig.data()));
      std::vector<char> w(1000, 'x');
      QVERIFY(c.Send(Cmd::kWrite, 2, 3u << 20, 4096));  // header only...
      QVERIFY(c.SendAll(w.data(), w.size()));            // ...and a part of the payload
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    RawClient c;
    QVERIFY(Open(c));
    Header h;
    QVERIFY(c.Send(Cmd::kRead, 3, 3u << 20, 4096));
    QVERIFY(c.Recv(&h, r.data()));
    QVERIFY(r == orig);  // the partial write never landed
    QVERIFY(Healthy());
  }

  void writeReadOnly() {
    RawClient c;
    QVERIFY(Open(c, "ro"));
    std::vector<char> w(4096, 'w'), r(4096), expect(4096);
    Fill(expect, 99);
    Header h;
    QVERIFY(c.Send(Cmd::kWrite, 1, 0, 4096, w.data()));
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.status, std::uint32_t(WireStatus::kPerm));
    QVERIFY(c.Send(Cmd::kTrim, 2, 0, 4096));
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.status, std::uint32_t(WireStatus::kPerm));
    QVERIFY(c.Send(Cmd::kRead, 3, 0, 4096));  // the connection still works
    QVERIFY(c.Recv(&h, r.data()));
    QCOMPARE(h.status, 0u);
    QVERIFY(r == expect);
    QVERIFY(Healthy());
  }

  void requestBeforeHello() {
    RawClient c;
    QVERIFY(c.Connect(port_));
    QVERIFY(c.Send(Cmd::kRead, 42, 0, 512));
    Header h;
    QVERIFY(c.Recv(&h));
    QCOMPARE(h.status, std::uint32_t(WireStatus::kProto));
    QCOMPARE(h.id, 42ull);
    QVERIFY(c.ClosedWithin(3000));
    QVERIFY(Healthy());
  }

  void unknownExport() {
    RawClient c;
    QVERIFY(c.Connect(port_));
    QCOMPARE(c.Hello("nope"), long(WireStatus::kNoEnt));
    QVERIFY(c.ClosedWithin(3000));
    RawClient d;  // malformed HELLO (non-printable name) is a framing error
    QVERIFY(d.Connect(port_));
    std::uint8_t p[kHelloRequestFixed + 3] = {0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 'a', '\n', 'b'};
    QVERIFY(d.Send(Cmd::kHello, 9, 0, sizeof p, p));
    Header h;
    QVERIFY(d.Recv(&h));
    QCOMPARE(h.status, std::uint32_t(WireStatus::kProto));
    QVERIFY(d.ClosedWithin(3000));
    QVERIFY(Healthy());
  }

  // Default deny (docs/security.md): parsing and matching of access rules; "anonymous" is the
  // unauthenticated peer only, "*" any authenticated identity, a named rule beats "*".
  void accessRules() {
    auto r = ParseAccessRule("alice:ro");
    QVERIFY(r.ok() && r->identity == "alice" && r->read_only);
    r = ParseAccessRule("CN=x:y:rw");  // the mode is after the last ':'
    QVERIFY(r.ok() && r->identity == "CN=x:y" && !r->read_only);
    for (const char* bad : {"alice", "alice:rx", ":rw", "al\nice:rw", ""}) QVERIFY2(!ParseAccessRule(bad).ok(), bad);
    auto l = ParseAccessList({"alice:rw", "bob:ro", "alice:ro"});  // a later rule replaces
    QVERIFY(l.ok());
    QCOMPARE(l->size(), std::size_t(2));
    QCOMPARE(AccessFor(*l, "alice"), Access::kReadOnly);
    QCOMPARE(AccessFor(*l, "bob"), Access::kReadOnly);
    QCOMPARE(AccessFor(*l, "carol"), Access::kNone);
    QCOMPARE(AccessFor(*l, ""), Access::kNone);
    QCOMPARE(AccessFor({}, "alice"), Access::kNone);
    l = ParseAccessList({"*:ro", "alice:rw", "anonymous:rw"});
    QCOMPARE(AccessFor(*l, "alice"), Access::kReadWrite);
    QCOMPARE(AccessFor(*l, "carol"), Access::kReadOnly);
    QCOMPARE(AccessFor(*l, ""), Access::kReadWrite);
    l = ParseAccessList({"*:rw"});
    QCOMPARE(AccessFor(*l, ""), Access::kNone);  // "*" is not the anonymous peer
    l = ParseAccessList({"anonymous:rw"});
    QCOMPARE(AccessFor(*l, "anonymous"), Access::kNone);  // an identity named so is not one
    QCOMPARE(AccessFor(*l, ""), Access::kReadWrite);
    QCOMPARE(FormatAccessList(*l), std::vector<std::string>{"anonymous:rw"});
  }

  // HELLO against the access list by identity (fake TLS identities by source address): rw, ro
  // (EPERM on writes, read-only flags), denied (EACCES, then closed), anonymous denied, the
  // library default (no list: everyone), an empty list (nobody), and SetAccess for later HELLOs.
  void accessByIdentity() {
    Server s;
    ExporterOptions o;
    std::atomic<std::uint16_t> port{0};
    o.listener = dst::test::IdentityListenerFactory(
        s.io, {{"127.0.0.2", "alice"}, {"127.0.0.3", "bob"}, {"127.0.0.4", "carol"}}, &port);
    QVERIFY(s.Start(o, 2));
    QVERIFY(port != 0);
    QVERIFY(s.exporter->AddExport({"acl", disk_, false, AccessList{{"alice", false}, {"bob", true}}}).ok());
    QVERIFY(s.exporter->AddExport({"open", disk_, false, {}}).ok());
    QVERIFY(s.exporter->AddExport({"none", disk_, false, AccessList{}}).ok());
    std::vector<char> w(4096, 'a');
    Header h;
    {
      RawClient alice;
      HelloReply rep;
      QVERIFY(alice.Connect(port, "127.0.0.2"));
      QCOMPARE(alice.Hello("acl", 0, &rep), 0L);
      QVERIFY(!(rep.export_flags & kExportReadOnly));
      QVERIFY(alice.Send(Cmd::kWrite, 2, 0, 4096, w.data()) && alice.Recv(&h));
      QCOMPARE(h.status, 0u);
    }
    {
      RawClient bob;
      HelloReply rep;
      QVERIFY(bob.Connect(port, "127.0.0.3"));
      QCOMPARE(bob.Hello("acl", 0, &rep), 0L);
      QVERIFY(rep.export_flags & kExportReadOnly);
      QVERIFY(!(rep.export_flags & kExportCanTrim));
      QCOMPARE(rep.permissions, kPermRead);
      QVERIFY(bob.Send(Cmd::kWrite, 2, 0, 4096, w.data()) && bob.Recv(&h));
      QCOMPARE(h.status, std::uint32_t(WireStatus::kPerm));
      QVERIFY(bob.Send(Cmd::kTrim, 3, 0, 4096) && bob.Recv(&h));
      QCOMPARE(h.status, std::uint32_t(WireStatus::kPerm));
      std::vector<char> r(4096);
      QVERIFY(bob.Send(Cmd::kRead, 4, 0, 4096) && bob.Recv(&h, r.data()));
      QCOMPARE(h.status, 0u);
      QVERIFY(r == w);
    }
    for (const char* from : {"127.0.0.4", "127.0.0.1"}) {  // carol, then an anonymous peer
      RawClient c;
      QVERIFY(c.Connect(port, from));
      QCOMPARE(c.Hello("acl"), long(WireStatus::kAcces));
      QVERIFY(c.ClosedWithin(2000));
    }
    {
      RawClient anon, alice;
      QVERIFY(anon.Connect(port, "127.0.0.1") && anon.Hello("open") == 0);  // no list: everyone
      QVERIFY(alice.Connect(port, "127.0.0.2"));
      QCOMPARE(alice.Hello("none"), long(WireStatus::kAcces));  // empty list: nobody
    }
    QVERIFY(s.exporter->SetAccess("acl", AccessList{{"anonymous", true}}).ok());
    QVERIFY(s.exporter->SetAccess("nope", AccessList{}).IsNotFound());
    {
      RawClient anon, alice;
      HelloReply rep;
      QVERIFY(anon.Connect(port, "127.0.0.1"));
      QCOMPARE(anon.Hello("acl", 0, &rep), 0L);
      QVERIFY(rep.export_flags & kExportReadOnly);
      QVERIFY(alice.Connect(port, "127.0.0.2"));
      QCOMPARE(alice.Hello("acl"), long(WireStatus::kAcces));
    }
    // A read-only export stays read-only for a read-write identity.
    QVERIFY(s.exporter->AddExport({"rox", ro_, false, AccessList{{"alice", false}}}).ok());
    RawClient alice;
    HelloReply rep;
    QVERIFY(alice.Connect(port, "127.0.0.2"));
    QCOMPARE(alice.Hello("rox", 0, &rep), 0L);
    QVERIFY(rep.export_flags & kExportReadOnly);
  }

  // Changing an export's access list closes the open connections it gives less access: a
  // removed identity, and a writer made read-only; a connection that keeps its access stays.
  void accessChangeClosesRevokedConnections() {
    Server s;
    ExporterOptions o;
    std::atomic<std::uint16_t> port{0};
    o.listener = dst::test::IdentityListenerFactory(
        s.io, {{"127.0.0.2", "alice"}, {"127.0.0.3", "bob"}, {"127.0.0.4", "carol"}}, &port);
    QVERIFY(s.Start(o, 2));
    QVERIFY(s.exporter->AddExport(
        {"acl", disk_, false, AccessList{{"alice", false}, {"bob", false}, {"carol", true}}}).ok());
    RawClient alice, bob, carol;
    QVERIFY(alice.Connect(port, "127.0.0.2") && alice.Hello("acl") == 0);
    QVERIFY(bob.Connect(port, "127.0.0.3") && bob.Hello("acl") == 0);
    QVERIFY(carol.Connect(port, "127.0.0.4") && carol.Hello("acl") == 0);
    // alice keeps rw, bob drops to ro, carol (ro) is removed.
    QVERIFY(s.exporter->SetAccess("acl", AccessList{{"alice", false}, {"bob", true}}).ok());
    QVERIFY(bob.ClosedWithin(2000));
    QVERIFY(carol.ClosedWithin(2000));
    Header h;
    std::vector<char> w(4096, 'k');
    QVERIFY(alice.Send(Cmd::kWrite, 7, 0, 4096, w.data()) && alice.Recv(&h));
    QCOMPARE(h.status, 0u);
    // bob comes back read-only.
    RawClient bob2;
    HelloReply rep;
    QVERIFY(bob2.Connect(port, "127.0.0.3"));
    QCOMPARE(bob2.Hello("acl", 0, &rep), 0L);
    QVERIFY(rep.export_flags & kExportReadOnly);
    // Widening (bob ro -> rw) closes nothing.
    QVERIFY(s.exporter->SetAccess("acl", AccessList{{"alice", false}, {"bob", false}}).ok());
    QVERIFY(!bob2.ClosedWithin(300));
    QVERIFY(!alice.ClosedWithin(100));
  }

  // max_connections_per_identity: the third HELLO of alice gets EBUSY; anonymous peers are not
  // counted; a closed connection frees its place.
  void perIdentityCap() {
    Server s;
    ExporterOptions o;
    o.limits.max_connections_per_identity = 2;
    std::atomic<std::uint16_t> port{0};
    o.listener = dst::test::IdentityListenerFactory(s.io, {{"127.0.0.2", "alice"}}, &port);
    QVERIFY(s.Start(o, 2));
    QVERIFY(s.exporter->AddExport({"disk", disk_, false, AccessList{{"alice", false}, {"anonymous", false}}}).ok());
    auto a1 = std::make_unique<RawClient>();
    RawClient a2, a3, n1, n2, n3;
    QVERIFY(a1->Connect(port, "127.0.0.2") && a1->Hello("disk") == 0);
    QVERIFY(a2.Connect(port, "127.0.0.2") && a2.Hello("disk") == 0);
    QVERIFY(a3.Connect(port, "127.0.0.2"));
    QCOMPARE(a3.Hello("disk"), long(WireStatus::kBusy));
    for (RawClient* n : {&n1, &n2, &n3}) QVERIFY(n->Connect(port, "127.0.0.1") && n->Hello("disk") == 0);
    a1.reset();  // its place comes back once the server has seen the close
    bool ok = false;
    for (int i = 0; i < 100 && !ok; ++i) {
      RawClient a4;
      ok = a4.Connect(port, "127.0.0.2") && a4.Hello("disk") == 0;
      if (!ok) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    QVERIFY(ok);
  }

  // A session id fences only a connection to the same export by the same identity: bob reusing
  // alice's id, or alice reusing it on another export, leaves her connection alone; alice
  // reconnecting to the same export fences it.
  void sessionBoundToExportAndIdentity() {
    Server s;
    ExporterOptions o;
    std::atomic<std::uint16_t> port{0};
    o.listener = dst::test::IdentityListenerFactory(s.io, {{"127.0.0.2", "alice"}, {"127.0.0.3", "bob"}}, &port);
    QVERIFY(s.Start(o, 2));
    const AccessList both{{"alice", false}, {"bob", false}};
    QVERIFY(s.exporter->AddExport({"s1", disk_, false, both}).ok());
    QVERIFY(s.exporter->AddExport({"s2", disk_, false, both}).ok());
    constexpr std::uint64_t kSession = 0x5eed;
    RawClient a1, b, a2, a3;
    QVERIFY(a1.Connect(port, "127.0.0.2") && a1.Hello("s1", kSession) == 0);
    QVERIFY(b.Connect(port, "127.0.0.3") && b.Hello("s1", kSession) == 0);
    QVERIFY(a2.Connect(port, "127.0.0.2") && a2.Hello("s2", kSession) == 0);
    Header h;
    QVERIFY(!a1.ClosedWithin(300));
    QVERIFY(a1.Send(Cmd::kPing, 9, 0, 0) && a1.Recv(&h));
    QCOMPARE(h.status, 0u);
    QVERIFY(a3.Connect(port, "127.0.0.2") && a3.Hello("s1", kSession) == 0);
    QVERIFY(a1.ClosedWithin(2000));  // fenced by its own identity on its own export
    for (RawClient* c : {&b, &a2, &a3}) {
      QVERIFY(c->Send(Cmd::kPing, 10, 0, 0) && c->Recv(&h));
      QCOMPARE(h.status, 0u);
    }
  }

  void sessionFence() {
    constexpr std::uint64_t kSession = 0x5e55105e55ull;
    constexpr std::uint64_t kBase = 4u << 20;
    constexpr int kN = 64;
    std::vector<char> a(4096), b(4096), r(4096);
    Fill(a, 0xa);
    Fill(b, 0xb);
    RawClient old;
    QVERIFY(old.Connect(port_));
    QCOMPARE(old.Hello("disk", kSession), 0L);
    // The old connection pipelines writes and never reads its replies.
    for (int i = 0; i < kN; ++i) QVERIFY(old.Send(Cmd::kWrite, i, kBase + std::uint64_t(i % 8) * 4096, 4096, a.data()));
    RawClient now;
    QVERIFY(now.Connect(port_));
    QCOMPARE(now.Hello("disk", kSession), 0L);  // answered only after the old one is fenced
    QVERIFY(old.ClosedWithin(3000));
    Header h;
    for (int i = 0; i < 8; ++i) {
      QVERIFY(now.Send(Cmd::kWrite, 100 + i, kBase + std::uint64_t(i) * 4096, 4096, b.data()));
      QVERIFY(now.Recv(&h));
      QCOMPARE(h.status, 0u);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // a stale write would land now
    for (int i = 0; i < 8; ++i) {
      QVERIFY(now.Send(Cmd::kRead, 200 + i, kBase + std::uint64_t(i) * 4096, 4096));
      QVERIFY(now.Recv(&h, r.data()));
      QVERIFY(r == b);
    }
    // A second takeover of the same session also works.
    RawClient third;
    QVERIFY(third.Connect(port_));
    QCOMPARE(third.Hello("disk", kSession), 0L);
    QVERIFY(now.ClosedWithin(3000));
    QVERIFY(third.Send(Cmd::kPing, 1, 0, 0));
    QVERIFY(third.Recv(&h));
    QCOMPARE(h.status, 0u);
  }

  void removeExportBusy() {
    auto extra = MakeDisk("extra.img", false);
    QVERIFY(extra);
    QVERIFY(srv_->exporter->AddExport({"extra", extra, false, {}}).ok());
    {
      RawClient c;
      QVERIFY(Open(c, "extra"));
      QCOMPARE(srv_->exporter->RemoveExport("extra").code(), Status::Code::kBusy);
    }
    // (QTRY_* evaluates its expression once more at the end: poll by hand, it has a side effect.)
    bool removed = false;
    for (int i = 0; i < 300 && !removed; ++i) {
      removed = srv_->exporter->RemoveExport("extra").ok();
      if (!removed) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    QVERIFY(removed);
    QCOMPARE(srv_->exporter->RemoveExport("extra").code(), Status::Code::kNotFound);
  }

  void backpressureSmallPool() {
    Server s;
    ExporterOptions o;
    o.buffer_count = 2;
    o.max_inflight_per_connection = 4;
    o.max_payload = 65536;
    QVERIFY(s.Start(o, 2));
    QVERIFY(s.exporter->AddExport({"disk", disk_, false, {}}).ok());
    RawClient c1, c2;
    QVERIFY(c1.Connect(s.exporter->port()) && c1.Hello("disk") == 0);
    QVERIFY(c2.Connect(s.exporter->port()) && c2.Hello("disk") == 0);
    constexpr int kN = 40;
    std::vector<char> w(65536), r(65536);
    Fill(w, 77);
    std::thread t([&] {
      for (int i = 0; i < kN; ++i) c2.Send(Cmd::kWrite, i, 5u << 20, 65536, w.data());
    });
    for (int i = 0; i < kN; ++i) QVERIFY(c1.Send(Cmd::kRead, i, 0, 65536));
    int ok1 = 0, ok2 = 0;
    Header h;
    for (int i = 0; i < kN; ++i) ok1 += c1.Recv(&h, r.data()) && h.status == 0;
    for (int i = 0; i < kN; ++i) ok2 += c2.Recv(&h) && h.status == 0;
    t.join();
    QCOMPARE(ok1, kN);
    QCOMPARE(ok2, kN);
    QVERIFY(c2.Send(Cmd::kRead, 99, 5u << 20, 65536));
    QVERIFY(c2.Recv(&h, r.data()));
    QVERIFY(r == w);
  }

  void drainAnswersInflight() {
    auto slow = std::make_shared<SlowDevice>(disk_, std::chrono::milliseconds(300));
    Server s;
    ExporterOptions o;
    QVERIFY(s.Start(o, 2));
    QVERIFY(s.exporter->AddExport({"disk", slow, false, {}}).ok());
    RawClient c;
    QVERIFY(c.Connect(s.exporter->port()) && c.Hello("disk") == 0);
    constexpr int kN = 48;
    std::vector<char> w(16384);
    Fill(w, 3);
    for (int i = 0; i < kN; ++i) QVERIFY(c.Send(Cmd::kWrite, i, 6u << 20, 16384, w.data(), 0));
    // Wait until the server has read all of them: they are in flight in the slow device.
    QTRY_VERIFY_WITH_TIMEOUT(s.exporter->Stats().requests >= std::uint64_t(kN), 5000);
    std::atomic<bool> done{false};
    Status result = Status::IoError("not called");
    s.exporter->Drain([&](Status st) {
      result = st;
      done = true;
    });
    int answered = 0;
    Header h;
    for (int i = 0; i < kN; ++i) {
      if (!c.Recv(&h)) break;
      if (h.status == 0) ++answered;
    }
    QCOMPARE(answered, kN);  // every accepted request was answered before the close
    QVERIFY(c.ClosedWithin(5000));
    QTRY_VERIFY_WITH_TIMEOUT(done.load(), 10000);
    QVERIFY2(result.ok(), result.ToString().c_str());
    RawClient late;
    QVERIFY(!late.Connect(s.exporter->port()) || late.Hello("disk") != 0);
    std::vector<char> r(16384);
    QVERIFY(ReadSync(*disk_, 6u << 20, r.data(), 16384).ok());
    QVERIFY(r == w);
  }

  // Regression: Drain's flush completion used to drop the last reference to the exporter state
  // and its devices on the device's own worker thread (FileDevice's destructor would join the
  // thread running it).  Drain, destroy the Exporter and drop our device reference while the
  // flush is held, then let it complete: the device must die on an io thread.
  void drainReleasesStateOffDeviceThread() {
    GatedDevice::destroyed = 0;
    GatedDevice::destroyed_on_worker = 0;
    Server s;
    QVERIFY(s.Start(ExporterOptions{}, 2));
    auto dev = std::make_shared<GatedDevice>();
    GatedDevice* raw = dev.get();
    QVERIFY(s.exporter->AddExport({"gated", dev, false, {}}).ok());
    std::atomic<bool> done{false};
    std::atomic<bool> ok{false};
    s.exporter->Drain([&](Status st) {
      ok = st.ok();
      done = true;
    });
    QTRY_COMPARE_WITH_TIMEOUT(raw->queued(), 1, 5000);  // the drain's flush is in the device
    s.exporter.reset();
    dev.reset();  // the flush state now holds the last reference
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // shutdown handlers ran
    QCOMPARE(GatedDevice::destroyed.load(), 0);
    raw->Open();
    QTRY_VERIFY_WITH_TIMEOUT(done.load(), 5000);
    QVERIFY(ok.load());
    QTRY_COMPARE_WITH_TIMEOUT(GatedDevice::destroyed.load(), 1, 5000);
    QCOMPARE(GatedDevice::destroyed_on_worker.load(), 0);
  }

  void stalledClientsClosedIdleKept() {
    Server s;
    ExporterOptions o;
    o.stall_timeout = std::chrono::milliseconds(600);
    QVERIFY(s.Start(o, 1));
    QVERIFY(s.exporter->AddExport({"disk", disk_, false, {}}).ok());
    const std::uint16_t port = s.exporter->port();
    RawClient payload_stalled, silent, idle;
    QVERIFY(payload_stalled.Connect(port) && payload_stalled.Hello("disk") == 0);
    std::vector<char> half(2048, 'h');
    QVERIFY(payload_stalled.Send(Cmd::kWrite, 1, 0, 4096));
    QVERIFY(payload_stalled.SendAll(half.data(), half.size()));
    QVERIFY(silent.Connect(port));  // never says HELLO
    QVERIFY(idle.Connect(port) && idle.Hello("disk") == 0);
    QVERIFY(payload_stalled.ClosedWithin(5000));
    QVERIFY(silent.ClosedWithin(5000));
    QVERIFY(!idle.ClosedWithin(1500));  // quiet but not owing anything: stays
    Header h;
    QVERIFY(idle.Send(Cmd::kPing, 2, 0, 0));
    QVERIFY(idle.Recv(&h));
    QCOMPARE(h.id, 2ull);
  }

  // A client that queues 1 MiB READs and takes the replies at ~10 bytes/s is closed by bytes
  // drained within about drain_window (the stall check, which counts frames, is off here), while
  // another client's requests keep completing within 1 s.
  void slowReaderEvictedByBytes() {
    Server s;
    QVERIFY(s.Start(dst::test::DrainTestOptions<ExporterOptions>(256u << 10), 2));
    QVERIFY(s.exporter->AddExport({"disk", disk_, false}).ok());
    RawClient slow, good;
    QVERIFY(slow.Connect(s.exporter->port()) && slow.Hello("disk") == 0);
    QVERIFY(good.Connect(s.exporter->port()) && good.Hello("disk") == 0);
    for (int i = 0; i < 64; ++i) QVERIFY(slow.Send(Cmd::kRead, 100 + i, 0, kDefaultMaxPayload));
    long evicted_ms = -1, worst_ms;
    {
      dst::test::Trickle trickle(slow.fd());
      std::uint64_t id = 1000;
      Header h;
      char buf[4096];
      worst_ms = dst::test::WorstLatency(
          3000, [&] { return good.Send(Cmd::kRead, ++id, 4096, 4096) && good.Recv(&h, buf) && h.status == 0; },
          [&](long t) {
            if (evicted_ms < 0 && s.exporter->Stats().connections_timed_out > 0) evicted_ms = t;
          });
    }
    QVERIFY2(worst_ms >= 0 && worst_ms < 1000, qPrintable(QString("worst request %1 ms").arg(worst_ms)));
    QVERIFY2(evicted_ms >= 0 && evicted_ms < 2000, qPrintable(QString("evicted after %1 ms").arg(evicted_ms)));
    QTRY_COMPARE_WITH_TIMEOUT(s.exporter->Stats().connections_open, 1, 5000);
  }

  // HELLO arriving one byte every 100 ms: every byte is progress for the stall check, but the
  // handshake deadline closes the connection.  Over max_connections_per_address a connection is
  // closed before its HELLO while the others are served.
  void handshakeDeadlineAndAddressCap() {
    Server s;
    ExporterOptions o;
    o.limits.handshake_timeout = std::chrono::milliseconds(500);
    o.limits.max_connections_per_address = 2;
    QVERIFY(s.Start(o, 1));
    QVERIFY(s.exporter->AddExport({"disk", disk_, false, {}}).ok());
    const std::uint16_t port = s.exporter->port();
    RawClient good, slow, over;
    QVERIFY(good.Connect(port) && good.Hello("disk") == 0);
    QVERIFY(slow.Connect(port));
    QTRY_COMPARE_WITH_TIMEOUT(s.exporter->Stats().connections_open, 2, 5000);
    QVERIFY(over.Connect(port));
    QVERIFY(over.ClosedWithin(1000));
    QCOMPARE(s.exporter->Stats().connections_refused, 1ull);
    HelloRequest r;
    r.export_name = "disk";
    std::uint8_t p[kMaxHelloPayload];
    const std::size_t n = EncodeHelloRequest(r, p, sizeof p);
    Header h;
    h.cmd = static_cast<std::uint16_t>(Cmd::kHello);
    h.id = 1;
    h.length = std::uint32_t(n);
    std::string all(kHeaderSize, '\0');
    EncodeHeader(h, reinterpret_cast<std::uint8_t*>(all.data()));
    all.append(reinterpret_cast<const char*>(p), n);
    const auto t0 = std::chrono::steady_clock::now();
    std::size_t sent = 0;
    bool closed = false;
    while (sent < all.size() && !closed && slow.SendAll(&all[sent], 1)) {
      ++sent;
      closed = slow.ClosedWithin(100);
    }
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
    QVERIFY(closed);
    QVERIFY2(ms >= 400 && ms < 1600, qPrintable(QString("closed after %1 ms").arg(ms)));
    QCOMPARE(s.exporter->Stats().connections_timed_out, 1ull);
    Header rh;
    QVERIFY(good.Send(Cmd::kPing, 2, 0, 0) && good.Recv(&rh) && rh.status == 0);
  }

  // idle_timeout: a session without requests is closed; PING keepalives are activity.
  void idleClosedKeepalivesKeep() {
    Server s;
    ExporterOptions o;
    o.limits.idle_timeout = std::chrono::milliseconds(400);
    QVERIFY(s.Start(o, 1));
    QVERIFY(s.exporter->AddExport({"disk", disk_, false, {}}).ok());
    const std::uint16_t port = s.exporter->port();
    RawClient idle, pinger;
    QVERIFY(idle.Connect(port) && idle.Hello("disk") == 0);
    QVERIFY(pinger.Connect(port) && pinger.Hello("disk") == 0);
    bool ok = true;
    const auto t0 = std::chrono::steady_clock::now();
    bool idle_closed = false;
    long idle_ms = -1;
    for (int i = 0; i < 15 && ok; ++i) {
      Header h;
      ok = pinger.Send(Cmd::kPing, 10 + i, 0, 0) && pinger.Recv(&h) && h.status == 0;
      if (!idle_closed && idle.ClosedWithin(100)) {
        idle_closed = true;
        idle_ms = long(std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count());
      }
    }
    QVERIFY(ok);  // 1.5 s of PINGs 100 ms apart: never idle
    QVERIFY(idle_closed);
    QVERIFY2(idle_ms >= 300 && idle_ms < 1500, qPrintable(QString("idle closed after %1 ms").arg(idle_ms)));
    QCOMPARE(s.exporter->Stats().connections_timed_out, 1ull);
  }

  // Steady state: no heap allocation per I/O on the server (nor in Asio on its behalf).
  //
  // Measured on an exporter with one io thread.  With several io threads a connection's strand
  // migrates between threads, and Asio 1.74 re-posts a busy strand's invoker with its per-thread
  // recycling allocator (strand_executor_service::invoker::on_invoker_exit), which misses when
  // the memory was freed on another thread; that residue is printed for the shared 2-thread
  // server but not asserted (docs/protocol.md §11).
  void noAllocationPerIo() {
    const std::uint64_t one = MeasureAllocs(nullptr);
    const std::uint64_t two = MeasureAllocs(srv_.get());
    qInfo("allocations during 2000 measured READ/WRITE requests: %llu with 1 io thread, %llu with 2",
          (unsigned long long)one, (unsigned long long)two);
    QCOMPARE(one, 0ull);
  }

 private:
  std::uint64_t MeasureAllocs(Server* shared) {
    std::unique_ptr<Server> own;
    std::uint16_t port = port_;
    if (!shared) {
      own = std::make_unique<Server>();
      ExporterOptions o;
      o.buffer_count = 32;
      if (!own->Start(o, 1) || !own->exporter->AddExport({"disk", disk_, false, {}}).ok()) return ~0ull;
      port = own->exporter->port();
    }
    RawClient c;
    if (!c.Connect(port) || c.Hello("disk") != 0) return ~0ull;
    static char w[4096], r[4096];
    std::memset(w, 0x5a, sizeof w);
    Header h;
    bool ok = true;
    auto run = [&](int n, int depth) {
      for (int i = 0; i < n && ok; i += depth) {
        for (int k = 0; k < depth; ++k) {
          const std::uint64_t off = std::uint64_t((i + k) % 256) * 4096;
          ok = ok && ((i / depth) % 2 == 0 ? c.Send(Cmd::kWrite, i + k, off, 4096, w)
                                             : c.Send(Cmd::kRead, i + k, off, 4096));
        }
        for (int k = 0; k < depth; ++k) ok = ok && c.Recv(&h, r) && h.status == 0;
      }
    };
    run(400, 1);  // warm-up: Asio's per-thread caches, the device threads, the strands
    run(400, 8);
    if (!ok) return ~0ull;
    g_allocs = 0;
    g_count_allocs = true;
    run(1000, 1);
    run(1000, 8);
    g_count_allocs = false;
    return ok ? g_allocs.load() : ~0ull;
  }
};

DST_TEST_MAIN(ExporterTest)
#include "exporter_test.moc"
