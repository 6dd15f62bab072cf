// Unit tests for dst::net::RemoteDevice against an in-process fake DST server
// (tests/lib/fake_peers.h) that can misbehave on purpose: reorder or delay replies, go silent,
// close mid-frame, send replies with a stale generation or the wrong length; and against a real
// Exporter behind a byte-flipping proxy (tests/lib/fault_proxy.h).  Also counts heap
// allocations per I/O.
#include <arpa/inet.h>
#include <execinfo.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <QTemporaryDir>
#include <QtTest/QtTest>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <new>
#include <random>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include "dst/block_device.h"
#include "dst/file_device.h"
#include "dst/net/codec.h"
#include "dst/net/exporter.h"
#include "dst/net/remote_device.h"
#include "dst/net/tcp_transport.h"
#include "connect_check_probe.h"
#include "fake_peers.h"
#include "fault_proxy.h"
#include "io_thread.h"
#include "test_env.h"

// --- allocation counter ----------------------------------------------------------------------
// Counts every heap allocation made while g_count_allocs is set, except on threads that opt out
// (the fake server's threads: they are not the client).
static std::atomic<bool> g_count_allocs{false};
static std::atomic<std::uint64_t> g_allocs{0};
static thread_local bool t_no_count = false;

// DST_ALLOC_TRACE=1 prints a backtrace of the first few counted allocations (to find them).
static void* CountedAlloc(std::size_t n) {
  if (g_count_allocs.load(std::memory_order_relaxed) && !t_no_count && !dst::test::t_fake_peer_thread) {
    if (g_allocs.fetch_add(1, std::memory_order_relaxed) < 6 && getenv("DST_ALLOC_TRACE")) {
      t_no_count = true;
      void* bt[30];
      int k = backtrace(bt, 30);
      fprintf(stderr, "--- alloc %zu\n", n);
      backtrace_symbols_fd(bt, k, 2);
      t_no_count = false;
    }
  }
  void* p = std::malloc(n ? n : 1);
  if (!p) throw std::bad_alloc();
  return p;
}
void* operator new(std::size_t n) { return CountedAlloc(n); }
void* operator new[](std::size_t n) { return CountedAlloc(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  if (g_count_allocs.load(std::memory_order_relaxed) && !t_no_count && !dst::test::t_fake_peer_thread) g_allocs.fetch_add(1);
  return std::malloc(n ? n : 1);
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  if (g_count_allocs.load(std::memory_order_relaxed) && !t_no_count && !dst::test::t_fake_peer_thread) g_allocs.fetch_add(1);
  return std::malloc(n ? n : 1);
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

using namespace dst;
using namespace dst::net;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

std::int64_t MsSince(Clock::time_point t) {
  return std::chrono::duration_cast<milliseconds>(Clock::now() - t).count();
}

using FakeServer = test::FakeDstServer;
using Event = test::FakeDstEvent;

// ---- client-side helpers --------------------------------------------------------------------

using dst::test::IoThread;  // tests/lib/io_thread.h

// Counts completions of asynchronously submitted requests.
struct Batch {
  std::mutex mu;
  std::condition_variable cv;
  int done = 0;
  int errors = 0;
  int first_errno = 0;
  static void Done(IoRequest* r, Status st) {
    auto* b = static_cast<Batch*>(r->ctx);
    std::lock_guard<std::mutex> l(b->mu);
    if (!st.ok()) {
      if (!b->errors) b->first_errno = st.ToErrno();
      ++b->errors;
    }
    ++b->done;
    b->cv.notify_all();
  }
  // Resets q to `op` on [off, off + len) with buffer p, completing into this batch.
  void Prep(IoRequest& q, IoOp op, std::uint64_t off, std::uint32_t len, char* p) {
    q = IoRequest{};
    q.op = op;
    q.offset = off;
    q.length = len;
    q.data = p;
    q.done = &Done;
    q.ctx = this;
  }
  bool Wait(int n, milliseconds timeout = milliseconds(20000)) {
    std::unique_lock<std::mutex> l(mu);
    return cv.wait_for(l, timeout, [&] { return done >= n; });
  }
};

void Fill(char* p, std::size_t n, std::uint32_t seed) {
  std::uint32_t x = seed * 2654435761u + 1;
  for (std::size_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    p[i] = static_cast<char>(x);
  }
}

// Index of the first server event of kind k for command cmd at offset off, or -1.
int FindEvent(const std::vector<Event>& ev, Event::Kind k, std::uint16_t cmd, std::uint64_t off) {
  for (std::size_t i = 0; i < ev.size(); ++i)
    if (ev[i].kind == k && (ev[i].cmd & ~kReplyBit) == cmd && ev[i].offset == off) return int(i);
  return -1;
}

RemoteOptions Opts(std::uint16_t port) {
  RemoteOptions o;
  o.host = "127.0.0.1";
  o.port = port;
  o.export_name = "disk";
  o.queue_depth = 32;
  o.keepalive_interval = milliseconds(200);
  o.keepalive_timeout = milliseconds(600);
  o.io_timeout = milliseconds(10000);
  o.connect_timeout = milliseconds(2000);
  o.reconnect_min = milliseconds(20);
  o.reconnect_max = milliseconds(200);
  return o;
}

// A Transport that forwards to TCP and counts what went through each entry point, and the
// Connector that makes it: proves the client dials, negotiates and runs I/O only through the
// seam (so TLS can replace it).
struct SeamCounts {
  std::atomic<int> connects{0};
  std::atomic<std::uint64_t> hs_written{0}, hs_read{0}, frames_bytes{0}, read_some{0};
};

class CountingTransport final : public dst::net::Transport {
 public:
  CountingTransport(std::unique_ptr<dst::net::Transport> t, SeamCounts* c) : t_(std::move(t)), c_(c) {}
  const dst::net::Strand& strand() const override { return t_->strand(); }
  std::size_t SendFrames(const dst::net::TxFrame* head, std::size_t offset, const dst::net::SendLimits& lim,
                         boost::system::error_code& ec) override {
    const std::size_t n = t_->SendFrames(head, offset, lim, ec);
    c_->frames_bytes += n;
    return n;
  }
  void AsyncWaitWritable(dst::net::IoCallback done) override { t_->AsyncWaitWritable(std::move(done)); }
  void AsyncReadSome(boost::asio::mutable_buffer b, dst::net::IoCallback done) override {
    c_->read_some++;
    t_->AsyncReadSome(b, std::move(done));
  }
  void AsyncRead(boost::asio::mutable_buffer b, dst::net::IoCallback done) override {
    c_->hs_read += b.size();
    t_->AsyncRead(b, std::move(done));
  }
  void AsyncWrite(boost::asio::const_buffer b, dst::net::IoCallback done) override {
    c_->hs_written += b.size();
    t_->AsyncWrite(b, std::move(done));
  }
  void Shutdown(ShutdownHow how) override { t_->Shutdown(how); }
  void Close() override { t_->Close(); }
  bool is_open() const override { return t_->is_open(); }
  const std::string& peer() const override { return t_->peer(); }

 private:
  std::unique_ptr<dst::net::Transport> t_;
  SeamCounts* c_;
};

class CountingConnector final : public dst::net::Connector {
 public:
  CountingConnector(const dst::net::Strand& s, std::uint16_t port, SeamCounts* c)
      : tcp_(s, "127.0.0.1", port), c_(c) {}
  void AsyncConnect(std::chrono::milliseconds timeout, ConnectCallback done) override {
    c_->connects++;
    tcp_.AsyncConnect(timeout, [c = c_, done = std::move(done)](Status st, std::unique_ptr<dst::net::Transport> t) {
      if (t) t = std::make_unique<CountingTransport>(std::move(t), c);
      done(std::move(st), std::move(t));
    });
  }
  void Cancel() override { tcp_.Cancel(); }
  std::string target() const override { return tcp_.target(); }

 private:
  dst::net::TcpConnector tcp_;
  SeamCounts* c_;
};

}  // namespace

class RemoteDeviceTest : public QObject {
  Q_OBJECT
 private slots:
  void parseUri() {
    RemoteOptions o;
    QVERIFY(ParseDstUri("dst://127.0.0.1:7500/disk1", &o).ok());
    QCOMPARE(o.host, std::string("127.0.0.1"));
    QCOMPARE(o.port, std::uint16_t(7500));
    QCOMPARE(o.export_name, std::string("disk1"));
    QVERIFY(ParseDstUri("dst://localhost/vol", &o).ok());
    QCOMPARE(o.host, std::string("localhost"));
    QCOMPARE(o.port, std::uint16_t(7400));
    QCOMPARE(o.export_name, std::string("vol"));
    QVERIFY(ParseDstUri("dst://[::1]:7401/x", &o).ok());
    QCOMPARE(o.host, std::string("::1"));
    QCOMPARE(o.port, std::uint16_t(7401));
    QVERIFY(ParseDstUri("dst://[::1]/x", &o).ok());
    QCOMPARE(o.port, std::uint16_t(7400));
    const char* bad[] = {
        "",                        // empty
        "nbd://h/x",               // wrong scheme
        "dst://h",                 // no export
        "dst://h/",                // empty export
        "dst:///x",                // no host
        "dst://h:/x",              // empty port
        "dst://h:0/x",             // port 0
        "dst://h:65536/x",         // port too big
        "dst://h:12a/x",           // non-numeric port
        "dst://h:123456/x",        // too many digits
        "dst://h/with space",      // unprintable/space in name
        "dst://[::1/x",            // unbalanced bracket
        "dst://[::1]x/x",          // junk after bracket
    };
    for (const char* b : bad) {
      RemoteOptions keep;
      keep.host = "unchanged";
      Status st = ParseDstUri(b, &keep);
      QVERIFY2(!st.ok(), b);
      QCOMPARE(st.code(), Status::Code::kInvalidArgument);
      QCOMPARE(keep.host, std::string("unchanged"));
    }
    std::string long_name = "dst://h/" + std::string(256, 'a');
    QVERIFY(!ParseDstUri(long_name, &o).ok());
  }

  void connectsOnlyThroughTheTransportSeam() {
    FakeServer srv(8u << 20);
    IoThread io;
    SeamCounts c;
    RemoteOptions o = Opts(srv.port());
    o.connector = [&c, port = srv.port()](const dst::net::Strand& s) {
      return std::make_unique<CountingConnector>(s, port, &c);
    };
    auto r = RemoteDevice::Connect(io.io, o);
    QVERIFY2(r.ok(), r.status().ToString().c_str());
    auto dev = r.value();
    QCOMPARE(c.connects.load(), 1);
    QVERIFY2(c.hs_written.load() > kHeaderSize, "the HELLO must go out through Transport::AsyncWrite");
    QVERIFY2(c.hs_read.load() >= kHeaderSize + kHelloReplySize, "the HELLO reply must come in through Transport::AsyncRead");
    std::vector<char> w(64 << 10), rd(64 << 10);
    Fill(w.data(), w.size(), 3);
    QVERIFY(WriteSync(*dev, 0, w.data(), w.size()).ok());
    QVERIFY(ReadSync(*dev, 0, rd.data(), rd.size()).ok());
    QVERIFY(w == rd);
    QVERIFY2(c.frames_bytes.load() >= w.size(), "requests must go out through Transport::SendFrames");
    QVERIFY(c.read_some.load() > 0);
    dev->Close();
  }

  // A server that accepts (the kernel's backlog) but never answers the HELLO: the first connect
  // gives up at connect_timeout, without a thread stuck on the socket.
  void silentHandshakeTimesOut() {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    QCOMPARE(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    QCOMPARE(::listen(fd, 8), 0);
    socklen_t len = sizeof a;
    getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    IoThread io;
    RemoteOptions o = Opts(ntohs(a.sin_port));
    o.connect_timeout = milliseconds(600);
    auto t0 = Clock::now();
    auto r = RemoteDevice::Connect(io.io, o);
    const auto ms = MsSince(t0);
    ::close(fd);
    QVERIFY(!r.ok());
    QVERIFY2(ms >= 500 && ms < 2500, qPrintable(QString("gave up after %1 ms").arg(ms)));
  }

  void connectFailures() {
    IoThread io;
    RemoteOptions o = Opts(dst::net::kDefaultPort);
    // Nothing listens on this port: refused until connect_timeout, then a clear error.
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    socklen_t len = sizeof a;
    getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    o.port = ntohs(a.sin_port);  // bound but not listening: connection refused
    o.connect_timeout = milliseconds(500);
    auto t0 = Clock::now();
    auto r = RemoteDevice::Connect(io.io, o);
    ::close(fd);
    QVERIFY(!r.ok());
    QVERIFY2(MsSince(t0) < 3000, "connect failure must be bounded");
    o.queue_depth = 0;
    QVERIFY(!RemoteDevice::Connect(io.io, o).ok());
  }

  void basicIoAndInfo() {
    FakeServer srv(8u << 20);
    IoThread io;
    auto r = RemoteDevice::Connect(io.io, Opts(srv.port()));
    QVERIFY2(r.ok(), r.status().ToString().c_str());
    auto dev = r.value();
    DeviceInfo info = dev->Info();
    QCOMPARE(info.size, std::uint64_t(8u << 20));
    QCOMPARE(info.max_io_bytes, kDefaultMaxPayload);
    QVERIFY(!info.read_only);
    QCOMPARE(QString::fromStdString(dev->Describe()),
             QString("dst://127.0.0.1:%1/disk").arg(srv.port()));
    std::vector<char> w(128 << 10), rd(128 << 10);
    Fill(w.data(), w.size(), 7);
    QVERIFY(WriteSync(*dev, 4096, w.data(), w.size()).ok());
    QVERIFY(ReadSync(*dev, 4096, rd.data(), rd.size()).ok());
    QVERIFY(w == rd);
    QVERIFY(FlushSync(*dev).ok());
    // Write-zeroes and trim reach the server.
    IoRequest z;
    z.op = IoOp::kWriteZeroes;
    z.offset = 4096;
    z.length = 8192;
    QVERIFY(SubmitSync(*dev, z).ok());
    QVERIFY(ReadSync(*dev, 4096, rd.data(), 8192).ok());
    QVERIFY(std::all_of(rd.begin(), rd.begin() + 8192, [](char c) { return c == 0; }));
    // Invalid requests fail locally without touching the connection.
    QCOMPARE(ReadSync(*dev, 8u << 20, rd.data(), 4096).code(), Status::Code::kOutOfRange);
    QCOMPARE(ReadSync(*dev, 3, rd.data(), 4096).code(), Status::Code::kInvalidArgument);
    auto st = dev->Stats();
    QCOMPARE(QString::fromStdString(st.state), QString("connected"));
    QCOMPARE(st.reconnects, std::uint64_t(0));
    QVERIFY(st.frames_sent >= 5);
    dev->Close();
    QCOMPARE(ReadSync(*dev, 0, rd.data(), 4096).ToErrno(), EIO);
    QCOMPARE(QString::fromStdString(dev->Stats().state), QString("closed"));
  }

  void pipeliningOutOfOrder() {
    FakeServer srv(32u << 20);
    srv.reorder_batch = 8;
    IoThread io;
    auto r = RemoteDevice::Connect(io.io, Opts(srv.port()));
    QVERIFY(r.ok());
    auto dev = r.value();
    constexpr int kN = 256;
    constexpr std::uint32_t kLen = 64 << 10;
    std::vector<char> data(std::size_t(kN) * kLen);
    Fill(data.data(), data.size(), 99);
    std::vector<IoRequest> reqs(kN);
    Batch wb;
    for (int i = 0; i < kN; ++i) {
      IoRequest& q = reqs[i];
      wb.Prep(q, IoOp::kWrite, std::uint64_t(i) * kLen, kLen, data.data() + std::size_t(i) * kLen);
      dev->Submit(&q);
    }
    QVERIFY(wb.Wait(kN));
    QCOMPARE(wb.errors, 0);
    std::vector<char> back(data.size());
    Batch rb;
    for (int i = 0; i < kN; ++i) {
      IoRequest& q = reqs[i];
      rb.Prep(q, IoOp::kRead, std::uint64_t(i) * kLen, kLen, back.data() + std::size_t(i) * kLen);
      dev->Submit(&q);
    }
    QVERIFY(rb.Wait(kN));
    QCOMPARE(rb.errors, 0);
    QVERIFY(back == data);
    // Many requests were in flight at once and replies came back reversed.
    QVERIFY2(srv.max_outstanding >= 8, qPrintable(QString::number(srv.max_outstanding)));
    auto ev = srv.events();
    int inversions = 0;
    std::uint64_t last = 0;
    for (auto& e : ev)
      if (e.kind == Event::kReply && e.cmd == std::uint16_t(Cmd::kRead)) {
        if (e.offset < last) ++inversions;
        last = e.offset;
      }
    QVERIFY2(inversions > 10, "fake server should have reordered replies");
    auto st = dev->Stats();
    QCOMPARE(st.reconnects, std::uint64_t(0));
    QCOMPARE(st.inflight, std::uint32_t(0));
    qInfo("frames/send call: %.2f", st.frames_per_call);
  }

  void overlappingWritesKeepOrder() {
    FakeServer srv(8u << 20);
    srv.write_delay_ms = 80;
    IoThread io;
    auto r = RemoteDevice::Connect(io.io, Opts(srv.port()));
    QVERIFY(r.ok());
    auto dev = r.value();
    constexpr std::uint32_t k64 = 64 << 10;
    std::vector<char> a(k64), b(k64), c(k64), rd(k64);
    std::memset(a.data(), 'A', k64);
    std::memset(b.data(), 'B', k64);
    std::memset(c.data(), 'C', k64);
    IoRequest w1{}, w2{}, w3{}, rq{}, fl{}, w4{};
    Batch bt;
    auto prep = [&](IoRequest& q, IoOp op, std::uint64_t off, char* p) {
      q.op = op;
      q.offset = off;
      q.length = op == IoOp::kFlush ? 0 : k64;
      if (op == IoOp::kFlush) q.offset = 0;
      q.data = p;
      q.done = &Batch::Done;
      q.ctx = &bt;
    };
    prep(w1, IoOp::kWrite, 0, a.data());            // W1 [0,64K)
    prep(w2, IoOp::kWrite, 32 << 10, b.data());     // W2 [32K,96K) overlaps W1
    prep(w3, IoOp::kWrite, 1 << 20, c.data());      // W3 elsewhere: may pass
    prep(rq, IoOp::kRead, 2 << 20, rd.data());      // a read: may pass
    prep(fl, IoOp::kFlush, 0, nullptr);             // flush after W1..W3
    prep(w4, IoOp::kWrite, 64 << 10, c.data());     // W4 [64K,128K) overlaps W2 only
    const auto t0 = Clock::now();
    for (IoRequest* q : {&w1, &w2, &w3, &rq, &fl, &w4}) dev->Submit(q);
    QVERIFY(bt.Wait(6));
    QCOMPARE(bt.errors, 0);
    qInfo("ordered batch took %lld ms", static_cast<long long>(MsSince(t0)));
    auto ev = srv.events();
    auto find = [&](Event::Kind k, std::uint16_t cmd, std::uint64_t off) { return FindEvent(ev, k, cmd, off); };
    const std::uint16_t W = std::uint16_t(Cmd::kWrite);
    const int w1_reply = find(Event::kReply, W, 0);
    const int w2_arrive = find(Event::kArrive, W, 32 << 10);
    const int w2_reply = find(Event::kReply, W, 32 << 10);
    const int w3_arrive = find(Event::kArrive, W, 1 << 20);
    const int w3_reply = find(Event::kReply, W, 1 << 20);
    const int w4_arrive = find(Event::kArrive, W, 64 << 10);
    const int r_arrive = find(Event::kArrive, std::uint16_t(Cmd::kRead), 2 << 20);
    const int fl_arrive = find(Event::kArrive, std::uint16_t(Cmd::kFlush), 0);
    QVERIFY(w1_reply >= 0 && w2_arrive >= 0 && w3_arrive >= 0 && w4_arrive >= 0 && fl_arrive >= 0);
    QVERIFY2(w2_arrive > w1_reply, "overlapping W2 must not reach the server before W1 is acknowledged");
    QVERIFY2(w4_arrive > w2_reply, "W4 overlaps W2: it must wait for W2");
    QVERIFY2(w3_arrive < w1_reply, "a non-overlapping write should not wait");
    QVERIFY2(r_arrive < w1_reply, "reads pass writes");
    QVERIFY2(fl_arrive > w1_reply && fl_arrive > w2_reply && fl_arrive > w3_reply,
             "flush must be sent only after all earlier writes are acknowledged");
    // Final contents: A for [0,32K), B for [32K,64K), C for [64K,128K).
    std::vector<char> disk = srv.Disk();
    QVERIFY(std::all_of(disk.begin(), disk.begin() + (32 << 10), [](char x) { return x == 'A'; }));
    QVERIFY(std::all_of(disk.begin() + (32 << 10), disk.begin() + (64 << 10), [](char x) { return x == 'B'; }));
    QVERIFY(std::all_of(disk.begin() + (64 << 10), disk.begin() + (128 << 10), [](char x) { return x == 'C'; }));
  }

  // The one ordering rule of the client core (client_core.h): a flush is a barrier, so a newer
  // write-type request, even one that overlaps nothing, is not sent before the flush.  (The
  // weaker rule RemoteDevice had before let W2 pass the waiting flush.)  The caller's
  // IoRequest::scratch is never touched (a mirror keeps its leg index there).
  void flushIsABarrierForNewerWrites() {
    FakeServer srv(8u << 20);
    IoThread io;
    auto r = RemoteDevice::Connect(io.io, Opts(srv.port()));
    QVERIFY2(r.ok(), r.status().ToString().c_str());
    srv.write_delay_ms = 80;  // W1 stays in flight while the flush and the newer writes wait
    auto dev = r.value();
    std::vector<char> a(4096, 'A'), b(4096, 'B');
    Batch bt;
    IoRequest w1{}, fl{}, w2{}, tz{};
    bt.Prep(w1, IoOp::kWrite, 0, 4096, a.data());
    bt.Prep(fl, IoOp::kFlush, 0, 0, nullptr);
    bt.Prep(w2, IoOp::kWrite, 1 << 20, 4096, b.data());      // overlaps nothing
    bt.Prep(tz, IoOp::kWriteZeroes, 2 << 20, 4096, nullptr);  // write-type, overlaps nothing
    IoRequest* all[] = {&w1, &fl, &w2, &tz};
    for (std::size_t i = 0; i < 4; ++i) all[i]->scratch = 0xfeed0000u + i;
    for (IoRequest* q : all) dev->Submit(q);
    QVERIFY(bt.Wait(4));
    QCOMPARE(bt.errors, 0);
    const auto ev = srv.events();
    const int w1_reply = FindEvent(ev, Event::kReply, std::uint16_t(Cmd::kWrite), 0);
    const int fl_arrive = FindEvent(ev, Event::kArrive, std::uint16_t(Cmd::kFlush), 0);
    const int w2_arrive = FindEvent(ev, Event::kArrive, std::uint16_t(Cmd::kWrite), 1 << 20);
    const int tz_arrive = FindEvent(ev, Event::kArrive, std::uint16_t(Cmd::kWriteZeroes), 2 << 20);
    QVERIFY(w1_reply >= 0 && fl_arrive >= 0 && w2_arrive >= 0 && tz_arrive >= 0);
    QVERIFY2(fl_arrive > w1_reply, "the flush waits for the older write");
    QVERIFY2(w2_arrive > fl_arrive, "a newer write must not pass a waiting flush");
    QVERIFY2(tz_arrive > fl_arrive, "a newer WRITE_ZEROES must not pass a waiting flush");
    for (std::size_t i = 0; i < 4; ++i) QCOMPARE(all[i]->scratch, std::uint64_t(0xfeed0000u + i));
  }

  void reconnectResendsAfterMidFrameClose() {
    FakeServer srv(16u << 20);
    srv.close_after = 20;
    srv.close_mid_frame = true;
    srv.write_delay_ms = 5;  // keep requests in flight when the connection drops
    IoThread io;
    auto r = RemoteDevice::Connect(io.io, Opts(srv.port()));
    QVERIFY(r.ok());
    auto dev = r.value();
    constexpr int kN = 96;
    constexpr std::uint32_t kLen = 32 << 10;
    std::vector<char> data(std::size_t(kN) * kLen);
    Fill(data.data(), data.size(), 5);
    std::vector<IoRequest> reqs(kN);
    Batch wb;
    for (int i = 0; i < kN; ++i) {
      IoRequest& q = reqs[i];
      wb.Prep(q, IoOp::kWrite, std::uint64_t(i) * kLen, kLen, data.data() + std::size_t(i) * kLen);
      dev->Submit(&q);
    }
    QVERIFY(wb.Wait(kN));
    QCOMPARE(wb.errors, 0);
    std::vector<char> back(data.size());
    for (std::size_t off = 0; off < back.size(); off += 1 << 20)
      QVERIFY(ReadSync(*dev, off, back.data() + off, std::min<std::size_t>(1 << 20, back.size() - off)).ok());
    QVERIFY(back == data);
    auto st = dev->Stats();
    QVERIFY(st.reconnects >= 1);
    QVERIFY(st.resent >= 1);
    QCOMPARE(QString::fromStdString(st.state), QString("connected"));
    QVERIFY(srv.connections >= 2);
    qInfo("reconnects=%llu resent=%llu", (unsigned long long)st.reconnects, (unsigned long long)st.resent);
  }

  void keepaliveDetectsSilentServer() {
    FakeServer srv(8u << 20);
    std::vector<char> pattern(64 << 10);
    Fill(pattern.data(), pattern.size(), 3);
    srv.SetDisk(0, pattern.data(), pattern.size());
    IoThread io;
    RemoteOptions o = Opts(srv.port());
    o.keepalive_interval = milliseconds(200);
    o.keepalive_timeout = milliseconds(800);
    auto r = RemoteDevice::Connect(io.io, o);
    QVERIFY(r.ok());
    auto dev = r.value();
    srv.silent = true;  // TCP stays up, nothing is answered (a SIGSTOPped peer)
    std::vector<char> rd(64 << 10);
    IoRequest q{};
    q.op = IoOp::kRead;
    q.offset = 0;
    q.length = rd.size();
    q.data = rd.data();
    Batch b;
    q.done = &Batch::Done;
    q.ctx = &b;
    const auto t0 = Clock::now();
    dev->Submit(&q);
    // Detection shows up as the second connection.
    while (srv.connections < 2 && MsSince(t0) < 5000) std::this_thread::sleep_for(milliseconds(5));
    QVERIFY(srv.connections >= 2);
    auto acc = srv.accept_times();
    const auto detect_ms = std::chrono::duration_cast<milliseconds>(acc[1] - t0).count();
    qInfo("keepalive detection after %lld ms (keepalive_timeout 800 ms)", static_cast<long long>(detect_ms));
    QVERIFY2(detect_ms >= 700, "declared dead too early");
    QVERIFY2(detect_ms <= 800 + 600, "dead peer not detected within keepalive_timeout + slack");
    {
      std::lock_guard<std::mutex> l(b.mu);
      QCOMPARE(b.done, 0);  // the caller saw nothing
    }
    srv.silent = false;   // peer is back: the re-sent read completes, no error
    QVERIFY(b.Wait(1, milliseconds(5000)));
    QCOMPARE(b.errors, 0);
    QVERIFY(rd == pattern);
    QVERIFY(dev->Stats().reconnects >= 1);
  }

  // Our own loop stalls (the assembling process SIGSTOPped, or the laptop suspended) while a
  // request is in flight at a live server.  On resume the silence clock must not blame the peer:
  // the request completes on the same connection.  It used to be declared a keepalive timeout at
  // once, so every leg of a mirror failed together on resume (fault campaign, SIGSTOP assembler).
  void ownLoopStallIsNotPeerSilence() {
    FakeServer srv(8u << 20);
    srv.write_delay_ms = 4000;  // the reply comes after the stall; pings are answered meanwhile
    IoThread io;
    RemoteOptions o = Opts(srv.port());
    o.keepalive_interval = milliseconds(200);
    o.keepalive_timeout = milliseconds(800);
    auto r = RemoteDevice::Connect(io.io, o);
    QVERIFY(r.ok());
    auto dev = r.value();
    std::vector<char> wr(4096, 'w');
    IoRequest q{};
    q.op = IoOp::kWrite;
    q.offset = 0;
    q.length = wr.size();
    q.data = wr.data();
    Batch b;
    q.done = &Batch::Done;
    q.ctx = &b;
    dev->Submit(&q);
    std::this_thread::sleep_for(milliseconds(300));  // on the wire, a ping or so answered
    boost::asio::post(io.io, [] { std::this_thread::sleep_for(milliseconds(2500)); });  // the stall
    QVERIFY(b.Wait(1, milliseconds(10000)));
    QCOMPARE(b.errors, 0);
    QCOMPARE(dev->Stats().reconnects, std::uint64_t(0));
    QCOMPARE(srv.connections.load(), 1);
  }

  void ioTimeoutFailsWithEio() {
    FakeServer srv(8u << 20);
    IoThread io;
    RemoteOptions o = Opts(srv.port());
    o.keepalive_interval = milliseconds(100);
    o.keepalive_timeout = milliseconds(300);
    o.io_timeout = milliseconds(1500);
    auto r = RemoteDevice::Connect(io.io, o);
    QVERIFY(r.ok());
    auto dev = r.value();
    srv.silent = true;
    std::vector<char> rd(4 << 10 << 4);
    std::vector<IoRequest> reqs(8);
    Batch b;
    const auto t0 = Clock::now();
    for (int i = 0; i < 8; ++i) {
      IoRequest& q = reqs[i];
      q.op = i % 2 ? IoOp::kRead : IoOp::kWrite;
      q.offset = std::uint64_t(i) * 8192;
      q.length = 8192;
      q.data = rd.data() + i * 8192;
      q.done = &Batch::Done;
      q.ctx = &b;
      dev->Submit(&q);
    }
    QVERIFY2(b.Wait(8, milliseconds(10000)), "requests hung past io_timeout");
    const auto ms = MsSince(t0);
    qInfo("EIO after %lld ms (io_timeout 1500 ms)", static_cast<long long>(ms));
    QCOMPARE(b.errors, 8);
    QCOMPARE(b.first_errno, EIO);
    QVERIFY2(ms >= 1400, "failed before io_timeout");
    QVERIFY2(ms <= 1500 + 800, "EIO not within io_timeout + slack");
    QVERIFY(dev->Stats().timeouts >= 8);
    // Once the device is failing, new requests end at once.
    std::this_thread::sleep_for(milliseconds(50));
    if (dev->Stats().state == "failing") {
      auto t1 = Clock::now();
      QCOMPARE(ReadSync(*dev, 0, rd.data(), 4096).ToErrno(), EIO);
      QVERIFY(MsSince(t1) < 200);
    }
    // The peer comes back: the device recovers.
    srv.silent = false;
    Status st;
    const auto t2 = Clock::now();
    do {
      std::this_thread::sleep_for(milliseconds(50));
      st = ReadSync(*dev, 0, rd.data(), 4096);
    } while (!st.ok() && MsSince(t2) < 8000);
    QVERIFY2(st.ok(), st.ToString().c_str());
    QCOMPARE(QString::fromStdString(dev->Stats().state), QString("connected"));
  }

  void hungRequestOnLiveConnectionFails() {
    FakeServer srv(8u << 20);
    IoThread io;
    RemoteOptions o = Opts(srv.port());
    o.keepalive_interval = milliseconds(100);
    o.keepalive_timeout = milliseconds(400);
    o.io_timeout = milliseconds(1500);
    auto r = RemoteDevice::Connect(io.io, o);
    QVERIFY(r.ok());
    auto dev = r.value();
    srv.drop_io = true;  // pings are answered, so keepalive alone never fires
    std::vector<char> buf(8192);
    Batch b;
    IoRequest q{};
    q.op = IoOp::kWrite;
    q.length = 8192;
    q.data = buf.data();
    q.done = &Batch::Done;
    q.ctx = &b;
    const auto t0 = Clock::now();
    dev->Submit(&q);
    QVERIFY2(b.Wait(1, milliseconds(6000)), "request hung on a live connection");
    const auto ms = MsSince(t0);
    qInfo("hung request failed after %lld ms (io_timeout 1500 ms)", static_cast<long long>(ms));
    QCOMPARE(b.first_errno, EIO);
    QVERIFY(ms >= 1400 && ms <= 1500 + 800);
    srv.drop_io = false;
    Status st;
    const auto t1 = Clock::now();
    do {
      std::this_thread::sleep_for(milliseconds(50));
      st = ReadSync(*dev, 0, buf.data(), 4096);
    } while (!st.ok() && MsSince(t1) < 5000);
    QVERIFY2(st.ok(), st.ToString().c_str());
    QVERIFY2(srv.connections >= 2, "the connection of a hung request must be replaced (fence)");
  }

  void writePermissionLostFailsPendingWrites() {
    FakeServer srv(8u << 20);
    srv.write_delay_ms = 200;
    IoThread io;
    auto r = RemoteDevice::Connect(io.io, Opts(srv.port()));
    QVERIFY(r.ok());
    auto dev = r.value();
    srv.hello_read_only = true;  // next handshake: read-only
    srv.close_after = 1;
    std::vector<char> w(4096, 'x');
    QCOMPARE(WriteSync(*dev, 0, w.data(), w.size()).ToErrno(), EIO);
    QCOMPARE(QString::fromStdString(dev->Stats().state), QString("failing"));
  }

  void readOnlyAfterReconnectWithoutWrites() {
    FakeServer srv(8u << 20);
    IoThread io;
    auto r = RemoteDevice::Connect(io.io, Opts(srv.port()));
    QVERIFY(r.ok());
    auto dev = r.value();
    srv.hello_read_only = true;
    srv.close_after = 1;
    std::vector<char> b(4096);
    QVERIFY(ReadSync(*dev, 0, b.data(), 4096).ok());  // dropped, re-sent after the reconnect
    QVERIFY(dev->Info().read_only);
    QCOMPARE(WriteSync(*dev, 0, b.data(), 4096).code(), Status::Code::kReadOnly);
    QCOMPARE(QString::fromStdString(dev->Stats().state), QString("connected"));
  }

  void closeFailsPending() {
    FakeServer srv(8u << 20);
    IoThread io;
    auto r = RemoteDevice::Connect(io.io, Opts(srv.port()));
    QVERIFY(r.ok());
    auto dev = r.value();
    srv.silent = true;
    std::vector<char> rd(4096);
    IoRequest q{};
    q.op = IoOp::kRead;
    q.length = 4096;
    q.data = rd.data();
    Batch b;
    q.done = &Batch::Done;
    q.ctx = &b;
    dev->Submit(&q);
    std::this_thread::sleep_for(milliseconds(50));
    const auto t0 = Clock::now();
    dev->Close();
    QVERIFY(b.Wait(1, milliseconds(2000)));
    QCOMPARE(b.first_errno, EIO);
    QVERIFY(MsSince(t0) < 1000);
  }

  void staleGenerationReplyIsDrained() {
    FakeServer srv(8u << 20);
    std::vector<char> pattern(1 << 20);
    Fill(pattern.data(), pattern.size(), 11);
    srv.SetDisk(0, pattern.data(), pattern.size());
    srv.inject_stale = true;
    IoThread io;
    auto r = RemoteDevice::Connect(io.io, Opts(srv.port()));
    QVERIFY(r.ok());
    auto dev = r.value();
    std::vector<char> rd(256 << 10);
    for (int i = 0; i < 4; ++i) {
      std::fill(rd.begin(), rd.end(), 0);
      QVERIFY(ReadSync(*dev, std::uint64_t(i) * rd.size(), rd.data(), rd.size()).ok());
      QVERIFY(std::equal(rd.begin(), rd.end(), pattern.begin() + i * rd.size()));
    }
    QVERIFY(srv.stale_sent >= 4);
    // The stale replies (with payloads) did not desynchronise the stream.
    QCOMPARE(dev->Stats().reconnects, std::uint64_t(0));
    QCOMPARE(srv.connections.load(), 1);
  }

  // Regression for the client's receive buffer: 128 READ replies of odd sizes arrive back to
  // back (batches of 64, each preceded by a stale reply with a payload to discard), so headers
  // and payloads straddle every buffer boundary.  Every byte must reach its own request.
  void burstOfOddRepliesWithStaleOnes() {
    FakeServer srv(8u << 20);
    std::vector<char> pattern(2u << 20);
    Fill(pattern.data(), pattern.size(), 23);
    srv.SetDisk(0, pattern.data(), pattern.size());
    srv.inject_stale = true;
    srv.reorder_batch = 64;
    IoThread io;
    auto r = RemoteDevice::Connect(io.io, Opts(srv.port()));
    QVERIFY(r.ok());
    auto dev = r.value();
    constexpr int kN = 128;
    std::vector<IoRequest> reqs(kN);
    std::vector<char> back(pattern.size(), 0);
    Batch rb;
    std::uint64_t off = 0;
    for (int i = 0; i < kN; ++i) {
      rb.Prep(reqs[i], IoOp::kRead, off, 512u * (1 + (i * 7) % 23), back.data() + off);
      off += reqs[i].length;
    }
    for (auto& q : reqs) dev->Submit(&q);
    QVERIFY(rb.Wait(kN));
    QCOMPARE(rb.errors, 0);
    QVERIFY(std::equal(back.begin(), back.begin() + off, pattern.begin()));
    QVERIFY(srv.stale_sent >= kN);
    QCOMPARE(dev->Stats().reconnects, std::uint64_t(0));
    QCOMPARE(srv.connections.load(), 1);
  }

  void sizeChangeAcrossReconnectFailsDevice() {
    FakeServer srv(8u << 20);
    srv.write_delay_ms = 200;
    IoThread io;
    auto r = RemoteDevice::Connect(io.io, Opts(srv.port()));
    QVERIFY(r.ok());
    auto dev = r.value();
    srv.hello_size = 4u << 20;  // the export shrinks behind our back
    srv.close_after = 1;
    std::vector<char> w(4096, 'x');
    Status st = WriteSync(*dev, 0, w.data(), w.size());
    QCOMPARE(st.ToErrno(), EIO);
    QCOMPARE(dev->Info().size, std::uint64_t(8u << 20));
    QCOMPARE(QString::fromStdString(dev->Stats().state), QString("failing"));
  }

  // Regression: a 1 GiB discard (FuseMount's punch-hole / zero-range, mkfs.ext4's whole-device
  // discard) used to exceed the 32 MiB framing cap: the exporter closed the connection and the
  // client re-sent the request forever.  Runs against the real Exporter over a sparse file.
  void largeTrimAndWriteZeroesThroughExporter() {
    QTemporaryDir dir;
    QVERIFY(dir.isValid());
    FileDeviceOptions fo;
    fo.create = true;
    fo.size = std::uint64_t(3) << 30;  // sparse: punch-hole costs nothing
    auto fd = FileDevice::Open((dir.path() + "/big.img").toStdString(), fo);
    QVERIFY2(fd.ok(), fd.status().ToString().c_str());
    IoThread io;
    ExporterOptions eo;
    eo.port = 0;
    Exporter exp(io.io, eo);
    QVERIFY(exp.Start().ok());
    QVERIFY(exp.AddExport({"disk", fd.value(), false, {}}).ok());
    RemoteOptions o = Opts(exp.port());
    o.io_timeout = milliseconds(60000);  // a failure must come from the check below, not a timeout
    auto r = RemoteDevice::Connect(io.io, o);
    QVERIFY2(r.ok(), r.status().ToString().c_str());
    auto dev = r.value();
    constexpr std::uint64_t kGiB = std::uint64_t(1) << 30;
    std::vector<char> w(64 << 10), rd(64 << 10);
    Fill(w.data(), w.size(), 3);
    const std::uint64_t probes[] = {0, kGiB / 2, kGiB - w.size(), kGiB, 2 * kGiB - w.size(), 2 * kGiB};
    for (std::uint64_t p : probes) QVERIFY(WriteSync(*dev, p, w.data(), w.size()).ok());

    struct Case { IoOp op; std::uint64_t off; std::uint32_t len; std::uint32_t flags; };
    const Case cases[] = {
        {IoOp::kTrim, 0, std::uint32_t(kGiB), 0},
        {IoOp::kWriteZeroes, kGiB, std::uint32_t(kGiB), 0},
        {IoOp::kWriteZeroes, 0, std::uint32_t(kGiB), kIoFua},
    };
    for (const Case& c : cases) {
      IoRequest q;
      q.op = c.op;
      q.offset = c.off;
      q.length = c.len;
      q.flags = c.flags;
      const auto t0 = Clock::now();
      Batch b;
      q.done = &Batch::Done;
      q.ctx = &b;
      dev->Submit(&q);
      QVERIFY2(b.Wait(1, milliseconds(20000)), "1 GiB range request never completed");
      QCOMPARE(b.errors, 0);
      qInfo("%s of 1 GiB took %lld ms", c.op == IoOp::kTrim ? "TRIM" : "WRITE_ZEROES",
            static_cast<long long>(MsSince(t0)));
    }
    // Everything in [0, 2 GiB) reads as zeroes, the probe just past it kept its data.
    for (std::uint64_t p : probes) {
      QVERIFY(ReadSync(*dev, p, rd.data(), rd.size()).ok());
      if (p < 2 * kGiB)
        QVERIFY2(std::all_of(rd.begin(), rd.end(), [](char ch) { return ch == 0; }), qPrintable(QString::number(p)));
      else
        QVERIFY(rd == w);
    }
    // It all happened on the first connection: nothing was rejected or re-sent.
    auto st = dev->Stats();
    QCOMPARE(st.reconnects, std::uint64_t(0));
    QCOMPARE(st.resent, std::uint64_t(0));
    QCOMPARE(exp.Stats().protocol_errors, std::uint64_t(0));
    // Range checks still apply: past the end is ERANGE from the server, connection stays.
    IoRequest past;
    past.op = IoOp::kTrim;
    past.offset = 2 * kGiB + kGiB / 2;
    past.length = std::uint32_t(kGiB);
    QCOMPARE(SubmitSync(*dev, past).code(), Status::Code::kOutOfRange);  // local ValidateRequest
    dev->Close();
  }

  // A request the server rejects at the framing level (EPROTO frame naming its id, then close)
  // fails quickly with EIO and is not re-sent; the other requests complete normally.
  void protocolErrorFailsOnlyThatRequest() {
    FakeServer srv(8u << 20);
    constexpr std::uint64_t kPoison = 3u << 20;
    srv.eproto_offset = kPoison;
    srv.write_delay_ms = 50;  // keep good writes in flight when the poison one arrives
    IoThread io;
    RemoteOptions o = Opts(srv.port());
    o.io_timeout = milliseconds(30000);
    auto r = RemoteDevice::Connect(io.io, o);
    QVERIFY(r.ok());
    auto dev = r.value();
    constexpr int kN = 8;
    constexpr std::uint32_t kLen = 64 << 10;
    std::vector<char> data(std::size_t(kN) * kLen);
    Fill(data.data(), data.size(), 11);
    std::vector<char> poison(kLen, 'P');
    std::vector<IoRequest> reqs(kN);
    Batch good;
    Batch bad;
    IoRequest p;
    p.op = IoOp::kWrite;
    p.offset = kPoison;
    p.length = kLen;
    p.data = poison.data();
    p.done = &Batch::Done;
    p.ctx = &bad;
    const auto t0 = Clock::now();
    for (int i = 0; i < kN; ++i) {
      IoRequest& q = reqs[i];
      good.Prep(q, IoOp::kWrite, std::uint64_t(i) * kLen, kLen, data.data() + std::size_t(i) * kLen);
      if (i == kN / 2) {
        dev->Submit(&p);
        QVERIFY(bad.Wait(1, milliseconds(5000)));
      }
      dev->Submit(&q);
    }
    QVERIFY2(bad.done == 1, "poison request never completed");
    QCOMPARE(bad.errors, 1);
    QCOMPARE(bad.first_errno, EIO);
    QVERIFY2(good.Wait(kN, milliseconds(10000)), "other requests must still complete");
    QCOMPARE(good.errors, 0);
    QVERIFY2(MsSince(t0) < 8000, "must fail fast, not at io_timeout");
    // Sent exactly once: not re-sent on the reconnection.
    int arrivals = 0;
    for (auto& e : srv.events())
      if (e.kind == Event::kArrive && e.offset == kPoison) ++arrivals;
    QCOMPARE(arrivals, 1);
    std::vector<char> back(data.size());
    QVERIFY(ReadSync(*dev, 0, back.data(), back.size()).ok());
    QVERIFY(back == data);
    auto disk = srv.Disk();
    QVERIFY2(std::none_of(disk.begin() + kPoison, disk.begin() + kPoison + kLen, [](char c) { return c == 'P'; }),
             "the rejected write must not be applied");
    auto st = dev->Stats();
    QCOMPARE(QString::fromStdString(st.state), QString("connected"));
    QVERIFY(st.reconnects >= 1);
    // The device is still usable afterwards (overlapping write at the poison offset included).
    srv.eproto_offset = ~0ull;
    QVERIFY(WriteSync(*dev, kPoison, data.data(), kLen).ok());
  }

  // Backstop: a server that just drops the connection whenever it sees one request (no EPROTO,
  // no id).  The request fails with EIO after a few reconnects instead of looping until the
  // outage clock (io_timeout) that each successful reconnect would otherwise reset.
  void connectionKillerRequestFailsAfterRetries() {
    FakeServer srv(8u << 20);
    constexpr std::uint64_t kPoison = 5u << 20;
    srv.kill_offset = kPoison;
    IoThread io;
    RemoteOptions o = Opts(srv.port());
    o.io_timeout = milliseconds(30000);
    auto r = RemoteDevice::Connect(io.io, o);
    QVERIFY(r.ok());
    auto dev = r.value();
    std::vector<char> w(4096, 'K'), g(4096, 'g');
    IoRequest p;
    p.op = IoOp::kTrim;
    p.offset = kPoison;
    p.length = 4096;
    Batch bad;
    p.done = &Batch::Done;
    p.ctx = &bad;
    const auto t0 = Clock::now();
    dev->Submit(&p);
    // A request submitted after it, on a connection that will die, must survive.
    IoRequest q;
    q.op = IoOp::kWrite;
    q.offset = 4096;
    q.length = 4096;
    q.data = g.data();
    Batch good;
    q.done = &Batch::Done;
    q.ctx = &good;
    dev->Submit(&q);
    QVERIFY2(bad.Wait(1, milliseconds(10000)), "connection-killing request never failed");
    QCOMPARE(bad.first_errno, EIO);
    QVERIFY2(MsSince(t0) < 10000, "must not wait for io_timeout");
    QVERIFY(good.Wait(1, milliseconds(10000)));
    QCOMPARE(good.errors, 0);
    int arrivals = 0;
    for (auto& e : srv.events())
      if (e.kind == Event::kArrive && e.offset == kPoison) ++arrivals;
    QVERIFY2(arrivals >= 2 && arrivals <= 4, qPrintable(QString::number(arrivals)));
    // Other I/O is fine afterwards.
    QVERIFY(WriteSync(*dev, 8192, w.data(), w.size()).ok());
    std::vector<char> back(4096);
    QVERIFY(ReadSync(*dev, 4096, back.data(), back.size()).ok());
    QVERIFY(back == g);
  }

  // A short outage with requests in flight still costs nothing: one lost connection must not
  // be mistaken for a poison request.
  void singleConnectionLossIsNotPoison() {
    FakeServer srv(8u << 20);
    srv.close_after = 1;  // the first request kills the connection once, without a reply
    IoThread io;
    auto r = RemoteDevice::Connect(io.io, Opts(srv.port()));
    QVERIFY(r.ok());
    auto dev = r.value();
    std::vector<char> w(8192, 'w'), back(8192);
    QVERIFY(WriteSync(*dev, 0, w.data(), w.size()).ok());
    QVERIFY(ReadSync(*dev, 0, back.data(), back.size()).ok());
    QVERIFY(back == w);
    QVERIFY(dev->Stats().reconnects >= 1);
  }

  // --- connect check (block_device.h) ------------------------------------------------------

  // The exporter comes back serving other content: the check rejects the connection once, the
  // request held across the reconnect fails with EIO without reading the new content, and later
  // requests go through.
  void connectCheckRejectsSwappedContent() {
    FakeServer srv(8u << 20);
    std::string ident_a(4096, 'A'), ident_b(4096, 'B');
    std::vector<char> old_data(8192, 'o'), new_data(8192, 'n');
    srv.SetDisk(0, ident_a.data(), 4096);
    srv.SetDisk(1 << 20, old_data.data(), old_data.size());
    IoThread io;
    auto r = RemoteDevice::Connect(io.io, Opts(srv.port()));
    QVERIFY(r.ok());
    auto dev = r.value();
    test::ConnectCheckProbe probe;
    probe.SetExpect(ident_a);
    QVERIFY(dev->SetConnectCheck(probe.Make(0, 4096)));
    srv.drop_io = true;  // the read below stays in flight until the connection goes
    std::vector<char> buf(8192, 'x');
    Batch b;
    IoRequest q;
    b.Prep(q, IoOp::kRead, 1 << 20, 8192, buf.data());
    dev->Submit(&q);
    QTRY_VERIFY_WITH_TIMEOUT(!srv.events().empty(), 5000);
    srv.SetDisk(0, ident_b.data(), 4096);  // a replacement behind the same address
    srv.SetDisk(1 << 20, new_data.data(), new_data.size());
    srv.drop_io = false;
    srv.DropConnections();
    QVERIFY(b.Wait(1, milliseconds(8000)));
    QCOMPARE(b.errors, 1);
    QCOMPARE(b.first_errno, EIO);
    QVERIFY2(std::all_of(buf.begin(), buf.end(), [](char c) { return c == 'x'; }),
             "the rejected connection's data must never reach the held request");
    QTRY_COMPARE_WITH_TIMEOUT(probe.rejected.load(), 1, 2000);  // rejected() follows the EIOs
    QVERIFY(probe.Why().find("identity mismatch") != std::string::npos);
    QCOMPARE(dev->Stats().check_failures, std::uint64_t(1));
    // The rejected connection sent the check READ only, never the held request.
    for (const auto& e : srv.events())
      QVERIFY2(!(e.conn > 0 && e.kind == Event::kArrive && e.offset == (1u << 20)),
               "a held request was sent on a connection that failed its check");
    // Admitted afterwards: new requests go through (the owner stopped routing to it).
    QVERIFY(ReadSync(*dev, 1 << 20, buf.data(), 8192).ok());
    QVERIFY(buf == new_data);
    // Once per bad connection.
    srv.DropConnections();
    QTRY_COMPARE_WITH_TIMEOUT(probe.rejected.load(), 2, 8000);
    QTRY_VERIFY_WITH_TIMEOUT(dev->Health().reachable, 5000);
    QVERIFY(ReadSync(*dev, 1 << 20, buf.data(), 8192).ok());
    QCOMPARE(probe.late.load(), 0);
  }

  // Same content: the held request is re-sent on the checked connection and succeeds.
  void connectCheckAcceptsSameContent() {
    FakeServer srv(8u << 20);
    std::string ident(4096, 'I');
    std::vector<char> data(8192, 'd');
    srv.SetDisk(0, ident.data(), 4096);
    srv.SetDisk(1 << 20, data.data(), data.size());
    IoThread io;
    auto r = RemoteDevice::Connect(io.io, Opts(srv.port()));
    QVERIFY(r.ok());
    auto dev = r.value();
    test::ConnectCheckProbe probe;
    probe.SetExpect(ident);
    QVERIFY(dev->SetConnectCheck(probe.Make(0, 4096)));
    srv.drop_io = true;
    std::vector<char> buf(8192, 'x');
    Batch b;
    IoRequest q;
    b.Prep(q, IoOp::kRead, 1 << 20, 8192, buf.data());
    dev->Submit(&q);
    QTRY_VERIFY_WITH_TIMEOUT(!srv.events().empty(), 5000);
    srv.drop_io = false;
    srv.DropConnections();
    QVERIFY(b.Wait(1, milliseconds(8000)));
    QCOMPARE(b.errors, 0);
    QVERIFY(buf == data);
    QVERIFY(probe.verified.load() >= 1);
    QCOMPARE(probe.rejected.load(), 0);
    QVERIFY(dev->Stats().resent >= 1);
    // The check READ went out before the re-sent request on the new connection.
    int check_at = -1, resend_at = -1;
    auto ev = srv.events();
    for (int i = 0; i < int(ev.size()); ++i) {
      if (ev[i].conn == 0 || ev[i].kind != Event::kArrive) continue;
      if (ev[i].offset == 0 && check_at < 0) check_at = i;
      if (ev[i].offset == (1u << 20) && resend_at < 0) resend_at = i;
    }
    QVERIFY(check_at >= 0 && resend_at > check_at);
  }

  // Removing the check while reconnects happen: once SetConnectCheck returns, no callback runs.
  void connectCheckRemovalIsRaceFree() {
    FakeServer srv(8u << 20);
    std::string ident(4096, 'I');
    srv.SetDisk(0, ident.data(), 4096);
    IoThread io;
    auto o = Opts(srv.port());
    o.reconnect_min = milliseconds(1);
    o.reconnect_max = milliseconds(5);
    auto r = RemoteDevice::Connect(io.io, o);
    QVERIFY(r.ok());
    auto dev = r.value();
    std::atomic<bool> stop{false};
    std::thread dropper([&] {
      std::uint64_t seen = 0;
      for (int n = 0; !stop; ++n) {
        srv.DropConnections();
        // Wait for the reconnect (the fake server is slow to start a connection), then a
        // varying delay so removals land before, during and after the check.
        for (int i = 0; i < 2000 && !stop && dev->Stats().reconnects == seen; ++i)
          std::this_thread::sleep_for(milliseconds(1));
        seen = dev->Stats().reconnects;
        std::this_thread::sleep_for(milliseconds(n % 5));
      }
    });
    int late = 0, verified = 0;
    // At least 30 rounds; under a sanitizer a reconnect is slow enough that 30 short rounds
    // may see no check run, so keep going (bounded) until one has.
    const auto deadline = Clock::now() + std::chrono::seconds(30);
    for (int round = 0; round < 30 || (verified == 0 && Clock::now() < deadline); ++round) {
      test::ConnectCheckProbe probe;
      probe.SetExpect(round % 2 ? ident : std::string(4096, 'Z'));
      dev->SetConnectCheck(probe.Make(0, 4096));
      std::this_thread::sleep_for(milliseconds(20 + 7 * (round % 7)));
      probe.Remove(*dev);
      std::this_thread::sleep_for(milliseconds(3));
      late += probe.late.load();
      verified += probe.verified.load();
    }  // probe destroyed: a late callback would also touch freed memory (ASan would see it)
    stop = true;
    dropper.join();
    qInfo("checks run: %d, reconnects: %llu, server connections: %d", verified,
          (unsigned long long)dev->Stats().reconnects, srv.connections.load());
    QCOMPARE(late, 0);
    QVERIFY(verified > 0);
    std::vector<char> buf(4096);
    QTRY_VERIFY_WITH_TIMEOUT(ReadSync(*dev, 0, buf.data(), 4096).ok(), 5000);
  }

  // Health() without I/O: unreachable with a growing outage while the exporter is gone,
  // reachable again after the reconnect.
  void healthFollowsTheConnection() {
    FakeServer srv(8u << 20);
    IoThread io;
    auto r = RemoteDevice::Connect(io.io, Opts(srv.port()));
    QVERIFY(r.ok());
    auto dev = r.value();
    QVERIFY(dev->Health().reachable);
    QCOMPARE(dev->Health().outage_ms, std::uint64_t(0));
    srv.refuse = true;
    srv.DropConnections();
    QTRY_VERIFY_WITH_TIMEOUT(!dev->Health().reachable, 5000);
    const auto h1 = dev->Health();
    std::this_thread::sleep_for(milliseconds(300));
    const auto h2 = dev->Health();
    QVERIFY(!h2.reachable);
    QVERIFY2(h2.outage_ms >= h1.outage_ms + 250, qPrintable(QString("%1 -> %2").arg(h1.outage_ms).arg(h2.outage_ms)));
    QVERIFY2(!h2.detail.empty(), "detail names the last error");
    qInfo("unreachable: outage %llu ms, detail: %s", (unsigned long long)h2.outage_ms, h2.detail.c_str());
    srv.refuse = false;
    QTRY_VERIFY_WITH_TIMEOUT(dev->Health().reachable, 5000);
    QCOMPARE(dev->Health().outage_ms, std::uint64_t(0));
    dev->Close();
    QVERIFY(!dev->Health().reachable);
  }

  // A peer that answers READs with the wrong length: the read ends in EIO within io_timeout
  // (plus a margin), not after a storm of reconnects (issue 9, item 11).
  void wrongLengthReplyEndsInEioOnTime() {
    FakeServer srv(8u << 20);
    IoThread io;
    auto o = Opts(srv.port());
    o.io_timeout = milliseconds(2000);
    auto r = RemoteDevice::Connect(io.io, o);
    QVERIFY(r.ok());
    auto dev = r.value();
    srv.wrong_length = true;
    std::vector<char> buf(8192);
    const auto t0 = Clock::now();
    Status st = ReadSync(*dev, 0, buf.data(), 8192);
    const auto ms = MsSince(t0);
    const auto stats = dev->Stats();
    qInfo("wrong-length peer: %s after %lld ms, %llu reconnects, %llu bad replies", st.ToString().c_str(),
          (long long)ms, (unsigned long long)stats.reconnects, (unsigned long long)stats.bad_replies);
    QCOMPARE(st.ToErrno(), EIO);
    QVERIFY2(ms <= 3000, "EIO must come within io_timeout + 1 s");
    QVERIFY(stats.bad_replies >= 1);
    QVERIFY2(stats.reconnects <= 20, "backoff must grow: no reconnect storm");
    // A peer that keeps lying to every retry: several reads in a row stay bounded too.
    const auto t1 = Clock::now();
    for (int i = 0; i < 3; ++i) QCOMPARE(ReadSync(*dev, 8192 * i, buf.data(), 8192).ToErrno(), EIO);
    QVERIFY(MsSince(t1) <= 3 * 3000);
    QVERIFY2(dev->Stats().reconnects <= 60, "backoff must grow: no reconnect storm");
    // A fresh device whose writes are answered correctly meanwhile: they keep ending the outage
    // (and reset the poison backstop); the lied-to read must still end on time, by its age.
    auto r2 = RemoteDevice::Connect(io.io, o);
    QVERIFY(r2.ok());
    auto dev2 = r2.value();
    std::atomic<bool> stop{false};
    std::atomic<int> writes_ok{0};
    std::thread writer([&] {
      std::vector<char> w(4096, 'w');
      while (!stop)
        if (WriteSync(*dev2, 4u << 20, w.data(), w.size()).ok()) ++writes_ok;
    });
    const auto t2 = Clock::now();
    st = ReadSync(*dev2, 0, buf.data(), 8192);
    const auto ms2 = MsSince(t2);
    stop = true;
    writer.join();
    qInfo("with progress on other requests: %s after %lld ms (%d writes ok, %llu reconnects)",
          st.ToString().c_str(), (long long)ms2, writes_ok.load(),
          (unsigned long long)dev2->Stats().reconnects);
    QCOMPARE(st.ToErrno(), EIO);
    QVERIFY2(ms2 <= 3000, "EIO must come within io_timeout + 1 s");
    srv.wrong_length = false;  // an honest peer again: the device heals
    QTRY_VERIFY_WITH_TIMEOUT(ReadSync(*dev, 0, buf.data(), 8192).ok(), 8000);
  }

  // Wire checksums (docs/protocol.md §4.1): a proxy flips one byte in selected WRITE and READ
  // payloads between a RemoteDevice and a real Exporter.  With digests every corruption is
  // detected, counted and retried, and the data is exact; without, the corruption lands.
  void payloadDigestsCatchCorruption() {
    for (bool checksum : {true, false}) {
      QTemporaryDir dir;
      FileDeviceOptions fo;
      fo.create = true;
      fo.size = 8u << 20;
      auto fd = FileDevice::Open((dir.path() + "/d.img").toStdString(), fo);
      QVERIFY(fd.ok());
      IoThread io;
      ExporterOptions eo;
      eo.port = 0;
      Exporter exp(io.io, eo);
      QVERIFY(exp.Start().ok());
      QVERIFY(exp.AddExport({"disk", fd.value(), false, {}}).ok());
      test::FaultProxy proxy(exp.port());
      RemoteOptions o = Opts(proxy.port());
      o.checksum = checksum;
      auto r = RemoteDevice::Connect(io.io, o);
      QVERIFY2(r.ok(), r.status().ToString().c_str());
      auto dev = r.value();
      QCOMPARE(dev->Stats().checksum, checksum);
      constexpr int kBlocks = 16;
      constexpr std::uint32_t kLen = 64 << 10;
      std::vector<char> w(std::size_t(kBlocks) * kLen), rd(w.size());
      Fill(w.data(), w.size(), 11);
      proxy.corrupt_writes = 3;
      for (int i = 0; i < kBlocks; ++i)
        QVERIFY(WriteSync(*dev, std::uint64_t(i) * kLen, w.data() + std::size_t(i) * kLen, kLen).ok());
      proxy.corrupt_reads = 4;
      for (int i = kBlocks; i-- > 0;)  // the last blocks, so no flip undoes a write's flip
        QVERIFY(ReadSync(*dev, std::uint64_t(i) * kLen, rd.data() + std::size_t(i) * kLen, kLen).ok());
      QCOMPARE(proxy.writes_corrupted.load(), 3);
      QCOMPARE(proxy.reads_corrupted.load(), 4);
      const auto st = dev->Stats();
      const auto es = exp.Stats();
      const auto ex = exp.ListExports();
      qInfo("checksum %s: client digest_errors %llu, exporter digest_errors %llu", checksum ? "on" : "off",
            (unsigned long long)st.digest_errors, (unsigned long long)es.digest_errors);
      if (checksum) {
        QVERIFY2(rd == w, "with digests the data read back must be exact");
        QCOMPARE(es.digest_errors, std::uint64_t(3));         // writes refused at the exporter
        QCOMPARE(ex.at(0).digest_errors, std::uint64_t(3));
        QCOMPARE(st.digest_errors, std::uint64_t(3 + 4));     // 3 write re-sends + 4 read retries
        QCOMPARE(st.reconnects, std::uint64_t(0));
      } else {
        // Undetected: the corrupted writes are on disk and the corrupted reads returned.
        int bad = 0;
        for (int i = 0; i < kBlocks; ++i)
          bad += std::memcmp(rd.data() + std::size_t(i) * kLen, w.data() + std::size_t(i) * kLen, kLen) != 0;
        QVERIFY2(bad == 3 + 4, "without digests the corruption goes unseen");
        QCOMPARE(st.digest_errors, std::uint64_t(0));
      }
    }
  }

  void noAllocationPerIo() {
    FakeServer srv(8u << 20);
    IoThread io;
    auto r = RemoteDevice::Connect(io.io, Opts(srv.port()));
    QVERIFY(r.ok());
    auto dev = r.value();
    constexpr int kDepth = 16;
    constexpr std::uint32_t kLen = 16 << 10;
    std::vector<char> buf(std::size_t(kDepth) * kLen);
    Fill(buf.data(), buf.size(), 1);
    std::vector<IoRequest> reqs(kDepth);
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
        dev->Submit(&q);
      }
    };
    for (int n = 0; n < 50; ++n) {  // warm-up
      Batch b;
      round(b, n);
      QVERIFY(b.Wait(kDepth));
    }
    constexpr int kRounds = 200;
    g_allocs = 0;
    g_count_allocs = true;
    int errors = 0;
    for (int n = 0; n < kRounds; ++n) {
      Batch b;
      round(b, n);
      b.Wait(kDepth);
      errors += b.errors;
    }
    g_count_allocs = false;
    const std::uint64_t allocs = g_allocs.load();
    const int ios = kRounds * kDepth;
    qInfo("allocations during %d I/Os: %llu (%.4f per I/O)", ios, (unsigned long long)allocs,
          double(allocs) / ios);
    QCOMPARE(errors, 0);
    // Zero in steady state; a handful of one-off allocations (keepalive timer, Asio's per-thread
    // caches settling) are tolerated, anything that scales with the I/O count is not.
    QVERIFY2(allocs <= 8, qPrintable(QString("allocations: %1").arg(allocs)));
  }
};

DST_TEST_MAIN(RemoteDeviceTest)
#include "remote_device_test.moc"
