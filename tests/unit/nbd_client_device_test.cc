// Unit tests for dst::net::NbdClientDevice.
//
// Two peers:
//  * nbdkit (memory and file plugins), a real external NBD server started per test with
//    QProcess on a Unix socket in a temp dir or on 127.0.0.1:<free port>;
//  * FakeNbd (tests/lib/fake_peers.h), an in-process server that can misbehave on purpose:
//    refuse structured replies or OPT_GO, split READ replies into reversed data/hole chunks,
//    send error chunks, go silent, close in the middle of a reply, change the export size, lie
//    in structured replies (a half twice, overlapping chunks, missing bytes).
// Also counts heap allocations per I/O.
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <QProcess>
#include <QTemporaryDir>
#include <QtTest/QtTest>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include "daemon_process.h"
#include "dst/block_device.h"
#include "dst/net/nbd_client_device.h"
#include "dst/net/nbd_format.h"
#include "connect_check_probe.h"
#include "fake_peers.h"
#include "io_thread.h"
#include "test_env.h"

// --- allocation counter (threads of the fake server opt out) ---------------------------------
static std::atomic<bool> g_count_allocs{false};
static std::atomic<std::uint64_t> g_allocs{0};
static thread_local bool t_no_count = false;
static void* CountedAlloc(std::size_t n) {
  if (g_count_allocs.load(std::memory_order_relaxed) && !t_no_count && !dst::test::t_fake_peer_thread) g_allocs.fetch_add(1, std::memory_order_relaxed);
  void* p = std::malloc(n ? n : 1);
  if (!p) throw std::bad_alloc();
  return p;
}
void* operator new(std::size_t n) { return CountedAlloc(n); }
void* operator new[](std::size_t n) { return CountedAlloc(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

using namespace dst;
using namespace dst::net;
namespace nb = dst::net::nbd;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

std::int64_t MsSince(Clock::time_point t) {
  return std::chrono::duration_cast<milliseconds>(Clock::now() - t).count();
}

void Fill(char* p, std::size_t n, std::uint32_t seed) {
  std::uint32_t x = seed * 2654435761u + 1;
  for (std::size_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    p[i] = static_cast<char>(x);
  }
}

bool AllZero(const char* p, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i)
    if (p[i]) return false;
  return true;
}

using dst::test::IoThread;  // tests/lib/io_thread.h

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
  bool Wait(int n, milliseconds timeout = milliseconds(20000)) {
    std::unique_lock<std::mutex> l(mu);
    return cv.wait_for(l, timeout, [&] { return done >= n; });
  }
  void Prep(IoRequest& q, IoOp op, std::uint64_t off, std::uint32_t len, char* p) {
    q = IoRequest{};
    q.op = op;
    q.offset = off;
    q.length = len;
    q.data = p;
    q.done = &Done;
    q.ctx = this;
  }
};

Status Op(BlockDevice& dev, IoOp op, std::uint64_t off, std::uint32_t len, std::uint32_t flags = 0) {
  IoRequest r;
  r.op = op;
  r.offset = off;
  r.length = len;
  r.flags = flags;
  return SubmitSync(dev, r);
}

// An nbdkit process (foreground, dies with us).  Unix socket if `sock` is set, else TCP port.
// Ready when its pid file appears (nbdkit writes it after it listens).
class Nbdkit {
 public:
  ~Nbdkit() { Kill9(); }
  bool Start(const QString& sock, quint16 port, const QStringList& plugin) {
    const QString pidfile = dir_.path() + "/nbdkit.pid";
    QFile::remove(pidfile);
    QStringList args{"-f", "--exit-with-parent", "-P", pidfile};
    if (!sock.isEmpty()) {
      QFile::remove(sock);
      args << "-U" << sock;
    } else {
      args << "-i" << "127.0.0.1" << "-p" << QString::number(port);
    }
    args << plugin;
    proc_.setProcessChannelMode(QProcess::ForwardedErrorChannel);
    // The server dies with the test even if the test is killed (qemu-nbd has no
    // --exit-with-parent).
    proc_.setChildProcessModifier([] { ::prctl(PR_SET_PDEATHSIG, SIGKILL); });
    proc_.start("nbdkit", args);
    if (!proc_.waitForStarted(5000)) return false;
    const auto end = Clock::now() + milliseconds(5000);
    while (Clock::now() < end) {
      if (QFileInfo(pidfile).size() > 0) return true;
      if (proc_.state() == QProcess::NotRunning) return false;
      std::this_thread::sleep_for(milliseconds(10));
    }
    return false;
  }
  void Kill9() {
    if (proc_.state() == QProcess::NotRunning) return;
    ::kill(static_cast<pid_t>(proc_.processId()), SIGKILL);
    proc_.waitForFinished(5000);
  }

 private:
  QTemporaryDir dir_;
  QProcess proc_;
};

// ---- fake NBD server --------------------------------------------------------------------------

using FakeNbd = test::FakeNbdServer;

NbdClientOptions FakeOpts(const FakeNbd& f) {
  NbdClientOptions o;
  o.unix_socket = f.path();
  o.export_name = f.name;
  o.connect_timeout = milliseconds(2000);
  o.keepalive_interval = milliseconds(100);
  o.keepalive_timeout = milliseconds(500);
  o.reconnect_min = milliseconds(20);
  o.reconnect_max = milliseconds(200);
  o.io_timeout = milliseconds(10000);
  return o;
}

// Write / read back / trim / zero / flush / FUA on any device.
void RoundTrip(BlockDevice& dev, std::uint32_t seed) {
  std::vector<char> w(256 << 10), r(256 << 10);
  Fill(w.data(), w.size(), seed);
  QVERIFY(WriteSync(dev, 1 << 20, w.data(), w.size()).ok());
  QVERIFY(ReadSync(dev, 1 << 20, r.data(), r.size()).ok());
  QVERIFY(w == r);
  QVERIFY(WriteSync(dev, 4096, w.data(), 8192, kIoFua).ok());
  QVERIFY(ReadSync(dev, 4096, r.data(), 8192).ok());
  QVERIFY(std::memcmp(w.data(), r.data(), 8192) == 0);
  QVERIFY(FlushSync(dev).ok());
  QVERIFY(Op(dev, IoOp::kWriteZeroes, (1 << 20) + 4096, 8192).ok());
  QVERIFY(Op(dev, IoOp::kWriteZeroes, (1 << 20) + 16384, 4096, kIoNoUnmap).ok());
  QVERIFY(ReadSync(dev, 1 << 20, r.data(), r.size()).ok());
  QVERIFY(std::memcmp(r.data(), w.data(), 4096) == 0);
  QVERIFY(AllZero(r.data() + 4096, 8192));
  QVERIFY(std::memcmp(r.data() + 12288, w.data() + 12288, 4096) == 0);
  QVERIFY(AllZero(r.data() + 16384, 4096));
  QVERIFY(Op(dev, IoOp::kTrim, (1 << 20) + 65536, 65536).ok());
  // Out of range and misaligned requests are refused locally.
  const auto info = dev.Info();
  QCOMPARE(Op(dev, IoOp::kRead, info.size, 4096).ToErrno(), EINVAL);
  QCOMPARE(Op(dev, IoOp::kRead, 100, 512).ToErrno(), EINVAL);
}

}  // namespace

class NbdClientDeviceTest : public QObject {
  Q_OBJECT

 private slots:
  void parseUri() {
    NbdClientOptions o;
    QVERIFY(ParseNbdUri("nbd://127.0.0.1/disk1", &o).ok());
    QCOMPARE(QString::fromStdString(o.host), QString("127.0.0.1"));
    QCOMPARE(o.port, std::uint16_t(10809));
    QCOMPARE(QString::fromStdString(o.export_name), QString("disk1"));
    QVERIFY(o.unix_socket.empty());
    QVERIFY(ParseNbdUri("nbd://localhost:10900", &o).ok());
    QCOMPARE(o.port, std::uint16_t(10900));
    QVERIFY(o.export_name.empty());
    QVERIFY(ParseNbdUri("nbd://127.0.0.1:1234/", &o).ok());
    QVERIFY(o.export_name.empty());
    QVERIFY(ParseNbdUri("nbd://[::1]:1234/a%20b", &o).ok());
    QCOMPARE(QString::fromStdString(o.host), QString("::1"));
    QCOMPARE(QString::fromStdString(o.export_name), QString("a b"));
    QVERIFY(ParseNbdUri("nbd+unix:///vol?socket=/tmp/x.sock", &o).ok());
    QCOMPARE(QString::fromStdString(o.unix_socket), QString("/tmp/x.sock"));
    QCOMPARE(QString::fromStdString(o.export_name), QString("vol"));
    QVERIFY(ParseNbdUri("nbd+unix:///?socket=/tmp/y.sock", &o).ok());
    QVERIFY(o.export_name.empty());
    QVERIFY(ParseNbdUri("nbd://127.0.0.1/x", &o).ok());
    QVERIFY(o.unix_socket.empty());  // a TCP URI clears an earlier socket
    for (const char* bad : {"dst://h/x", "nbd://", "nbd:///x", "nbd://h:0/x", "nbd://h:65536/x", "nbd://h:/x",
                            "nbd://h:12a/x", "nbd://h/x?tls=on", "nbd+unix:///x", "nbd+unix://host/x?socket=/s",
                            "nbd+unix:///x?sock=/s", "nbd://h/%zz", "nbd://[::1/x", "nbd://u@h/x"})
      QVERIFY2(!ParseNbdUri(bad, &o).ok(), bad);
    QVERIFY(ParseNbdUri("nbds://h/x", &o).ok() && o.tls);
    QCOMPARE(ParseNbdUri("nbds+unix:///x?socket=/s", &o).code(), Status::Code::kNotSupported);
  }

  void nbdkitMemoryUnix() {
    DST_REQUIRE(dst::test::HaveTool("nbdkit"), "nbdkit not installed");
    QTemporaryDir dir;
    Nbdkit kit;
    const QString sock = dir.path() + "/m.sock";
    QVERIFY(kit.Start(sock, 0, {"memory", "64M"}));
    IoThread io;
    NbdClientOptions o;
    QVERIFY(ParseNbdUri("nbd+unix:///?socket=" + sock.toStdString(), &o).ok());
    auto r = NbdClientDevice::Connect(io.io, o);
    QVERIFY2(r.ok(), r.status().ToString().c_str());
    auto dev = r.value();
    const DeviceInfo info = dev->Info();
    QCOMPARE(info.size, std::uint64_t(64u << 20));
    QVERIFY(info.logical_block_size >= 512);
    QVERIFY(info.max_io_bytes >= (1u << 20) && info.max_io_bytes <= (32u << 20));
    QVERIFY(!info.read_only);
    QVERIFY(info.can_flush && info.can_trim && info.can_write_zeroes);
    QVERIFY(dev->Stats().structured_replies);
    RoundTrip(*dev, 1);
    QCOMPARE(QString::fromStdString(dev->Stats().state), QString("connected"));
  }

  void nbdkitMemoryTcpSimpleReplies() {
    DST_REQUIRE(dst::test::HaveTool("nbdkit"), "nbdkit not installed");
    const quint16 port = dst::test::FreePort();
    Nbdkit kit;
    QVERIFY(kit.Start({}, port, {"memory", "32M"}));
    IoThread io;
    NbdClientOptions o;
    QVERIFY(ParseNbdUri("nbd://127.0.0.1:" + std::to_string(port) + "/", &o).ok());
    o.try_structured_replies = false;
    auto r = NbdClientDevice::Connect(io.io, o);
    QVERIFY2(r.ok(), r.status().ToString().c_str());
    QVERIFY(!r.value()->Stats().structured_replies);
    QCOMPARE(r.value()->Info().size, std::uint64_t(32u << 20));
    RoundTrip(*r.value(), 2);
  }

  void nbdkitReadOnly() {
    DST_REQUIRE(dst::test::HaveTool("nbdkit"), "nbdkit not installed");
    QTemporaryDir dir;
    Nbdkit kit;
    const QString sock = dir.path() + "/ro.sock";
    QVERIFY(kit.Start(sock, 0, {"-r", "memory", "4M"}));
    IoThread io;
    NbdClientOptions o;
    o.unix_socket = sock.toStdString();
    auto r = NbdClientDevice::Connect(io.io, o);
    QVERIFY2(r.ok(), r.status().ToString().c_str());
    QVERIFY(r.value()->Info().read_only);
    std::vector<char> buf(4096, 'w');
    QCOMPARE(WriteSync(*r.value(), 0, buf.data(), buf.size()).code(), Status::Code::kReadOnly);
    QVERIFY(ReadSync(*r.value(), 0, buf.data(), buf.size()).ok());
    QVERIFY(AllZero(buf.data(), buf.size()));
  }

  // The file plugin keeps the data across a restart: kill -9, restart on the same socket, the
  // writes submitted during the outage complete and everything reads back.
  void reconnectAfterNbdkitRestart() {
    DST_REQUIRE(dst::test::HaveTool("nbdkit"), "nbdkit not installed");
    QTemporaryDir dir;
    const QString img = dir.path() + "/disk.img";
    {
      QFile f(img);
      QVERIFY(f.open(QIODevice::WriteOnly));
      QVERIFY(f.resize(16 << 20));
    }
    const QString sock = dir.path() + "/f.sock";
    auto kit = std::make_unique<Nbdkit>();
    QVERIFY(kit->Start(sock, 0, {"file", "file=" + img}));
    IoThread io;
    NbdClientOptions o;
    o.unix_socket = sock.toStdString();
    o.keepalive_interval = milliseconds(100);
    o.keepalive_timeout = milliseconds(1000);
    o.reconnect_min = milliseconds(20);
    o.reconnect_max = milliseconds(200);
    auto r = NbdClientDevice::Connect(io.io, o);
    QVERIFY2(r.ok(), r.status().ToString().c_str());
    auto dev = r.value();
    std::vector<char> a(1 << 20), b(1 << 20), back(1 << 20);
    Fill(a.data(), a.size(), 7);
    Fill(b.data(), b.size(), 8);
    QVERIFY(WriteSync(*dev, 0, a.data(), a.size()).ok());
    kit->Kill9();
    // Submitted while the server is down.
    Batch batch;
    std::vector<IoRequest> reqs(8);
    for (int i = 0; i < 8; ++i) {
      IoRequest& q = reqs[i];
      q.op = IoOp::kWrite;
      q.offset = (2u << 20) + std::uint64_t(i) * (128u << 10);
      q.length = 128u << 10;
      q.data = b.data() + std::size_t(i) * (128u << 10);
      q.done = &Batch::Done;
      q.ctx = &batch;
      dev->Submit(&q);
    }
    std::this_thread::sleep_for(milliseconds(500));
    QCOMPARE(batch.done, 0);
    kit = std::make_unique<Nbdkit>();
    QVERIFY(kit->Start(sock, 0, {"file", "file=" + img}));
    QVERIFY(batch.Wait(8, milliseconds(10000)));
    QCOMPARE(batch.errors, 0);
    QVERIFY(dev->Stats().reconnects >= 1);
    QVERIFY(ReadSync(*dev, 0, back.data(), back.size()).ok());
    QVERIFY(back == a);
    QVERIFY(ReadSync(*dev, 2u << 20, back.data(), back.size()).ok());
    QVERIFY(back == b);
  }

  void fakeSimpleAndStructured() {
    for (bool structured : {false, true}) {
      FakeNbd f;
      f.offer_structured = structured;
      IoThread io;
      auto r = NbdClientDevice::Connect(io.io, FakeOpts(f));
      QVERIFY2(r.ok(), r.status().ToString().c_str());
      QCOMPARE(r.value()->Stats().structured_replies, structured);
      QCOMPARE(r.value()->Info().logical_block_size, 512u);  // min block 1 -> 512
      QCOMPARE(r.value()->Info().max_io_bytes, 1u << 20);
      RoundTrip(*r.value(), 3);
      r.value()->Close();
      QTRY_COMPARE_WITH_TIMEOUT(f.discs.load(), 1, 2000);  // Close sends NBD_CMD_DISC
    }
  }

  void fakeOldServerExportName() {
    for (bool fixed : {true, false}) {
      FakeNbd f;
      f.support_go = false;  // ERR_UNSUP to GO -> EXPORT_NAME
      f.fixed = fixed;       // non-fixed newstyle: EXPORT_NAME directly
      f.no_zeroes = false;   // the 124 zero bytes come too
      IoThread io;
      auto r = NbdClientDevice::Connect(io.io, FakeOpts(f));
      QVERIFY2(r.ok(), r.status().ToString().c_str());
      QCOMPARE(r.value()->Info().size, std::uint64_t(8u << 20));
      QCOMPARE(r.value()->Info().max_io_bytes, 32u << 20);  // no block size info: 32 MiB
      RoundTrip(*r.value(), 4);
    }
  }

  void unknownExportFailsFast() {
    for (bool go : {true, false}) {
      FakeNbd f;
      f.support_go = go;
      IoThread io;
      auto o = FakeOpts(f);
      o.export_name = "nope";
      const auto t0 = Clock::now();
      auto r = NbdClientDevice::Connect(io.io, o);
      QVERIFY(!r.ok());
      QCOMPARE(r.status().code(), Status::Code::kNotFound);
      QVERIFY(MsSince(t0) < 1500);
    }
    IoThread io;
    NbdClientOptions o;
    o.unix_socket = "/nonexistent/dir/x.sock";
    o.connect_timeout = milliseconds(300);
    auto r = NbdClientDevice::Connect(io.io, o);
    QVERIFY(!r.ok());
  }

  void holeAndReversedChunks() {
    FakeNbd f;
    f.hole_chunks = true;
    IoThread io;
    auto r = NbdClientDevice::Connect(io.io, FakeOpts(f));
    QVERIFY(r.ok());
    auto dev = r.value();
    std::vector<char> w(64 << 10), back(128 << 10);
    Fill(w.data(), w.size(), 9);
    QVERIFY(WriteSync(*dev, 64 << 10, w.data(), w.size()).ok());
    // [0, 64K) is zero (hole chunk), [64K, 128K) is data; chunks arrive second half first.
    std::memset(back.data(), 'G', back.size());
    QVERIFY(ReadSync(*dev, 0, back.data(), back.size()).ok());
    QVERIFY(AllZero(back.data(), 64 << 10));
    QVERIFY(std::memcmp(back.data() + (64 << 10), w.data(), w.size()) == 0);
    // Data both halves.
    QVERIFY(ReadSync(*dev, 64 << 10, back.data(), 64 << 10).ok());
    QVERIFY(std::memcmp(back.data(), w.data(), w.size()) == 0);
    QCOMPARE(dev->Stats().reconnects, std::uint64_t(0));
  }

  void errorReplies() {
    for (bool structured : {false, true}) {
      FakeNbd f;
      f.offer_structured = structured;
      f.error_offset = 1 << 20;
      IoThread io;
      auto r = NbdClientDevice::Connect(io.io, FakeOpts(f));
      QVERIFY(r.ok());
      std::vector<char> back(8192);
      QCOMPARE(ReadSync(*r.value(), (1 << 20) - 4096, back.data(), back.size()).ToErrno(), EIO);
      QVERIFY(ReadSync(*r.value(), 0, back.data(), back.size()).ok());  // the connection stays
      QCOMPARE(r.value()->Stats().reconnects, std::uint64_t(0));
      QCOMPARE(QString::fromStdString(r.value()->Stats().state), QString("connected"));
    }
  }

  // The first connection swallows requests: the keepalive notices the silence, the client
  // reconnects and the request completes on the second connection.
  void silentServerReconnects() {
    FakeNbd f;
    f.silent_conn = 1;
    IoThread io;
    auto r = NbdClientDevice::Connect(io.io, FakeOpts(f));
    QVERIFY(r.ok());
    std::vector<char> w(4096), back(4096);
    Fill(w.data(), w.size(), 11);
    const auto t0 = Clock::now();
    QVERIFY(WriteSync(*r.value(), 8192, w.data(), w.size()).ok());
    const auto ms = MsSince(t0);
    QVERIFY2(ms >= 400 && ms < 3000, qPrintable(QString::number(ms)));
    QCOMPARE(f.connections.load(), 2);
    QCOMPARE(r.value()->Stats().reconnects, std::uint64_t(1));
    QVERIFY(r.value()->Stats().resent >= 1);
    QVERIFY(ReadSync(*r.value(), 8192, back.data(), back.size()).ok());
    QVERIFY(w == back);
  }

  // Idle connections are probed (one-block READs) and stay up.
  void keepaliveProbesWhenIdle() {
    FakeNbd f;
    IoThread io;
    auto r = NbdClientDevice::Connect(io.io, FakeOpts(f));
    QVERIFY(r.ok());
    std::this_thread::sleep_for(milliseconds(800));
    QVERIFY(r.value()->Stats().probes >= 3);
    QCOMPARE(r.value()->Stats().reconnects, std::uint64_t(0));
    QCOMPARE(f.connections.load(), 1);
  }

  // A server that never answers: EIO after io_timeout, not before, never a hang.
  void ioTimeoutGivesEio() {
    FakeNbd f;
    f.silent_conn = -1;
    IoThread io;
    auto o = FakeOpts(f);
    o.io_timeout = milliseconds(1500);
    o.keepalive_timeout = milliseconds(300);
    auto r = NbdClientDevice::Connect(io.io, o);
    QVERIFY(r.ok());
    std::vector<char> back(4096);
    const auto t0 = Clock::now();
    QCOMPARE(ReadSync(*r.value(), 0, back.data(), back.size()).ToErrno(), EIO);
    const auto ms = MsSince(t0);
    QVERIFY2(ms >= 1400 && ms < 3000, qPrintable(QString::number(ms)));
    QVERIFY(r.value()->Stats().timeouts >= 1);
    // While failing, new requests end at once; when the server answers again, the device heals.
    f.silent_conn = 0;
    QTRY_COMPARE_WITH_TIMEOUT(QString::fromStdString(r.value()->Stats().state), QString("connected"), 5000);
    QVERIFY(ReadSync(*r.value(), 0, back.data(), back.size()).ok());
  }

  void closeMidReply() {
    for (bool structured : {false, true}) {
      FakeNbd f;
      f.offer_structured = structured;
      IoThread io;
      auto r = NbdClientDevice::Connect(io.io, FakeOpts(f));
      QVERIFY(r.ok());
      std::vector<char> w(256 << 10), back(256 << 10);
      Fill(w.data(), w.size(), 12);
      QVERIFY(WriteSync(*r.value(), 0, w.data(), w.size()).ok());
      f.close_mid_read = 1;
      QVERIFY(ReadSync(*r.value(), 0, back.data(), back.size()).ok());
      QVERIFY(w == back);
      QCOMPARE(r.value()->Stats().reconnects, std::uint64_t(1));
    }
  }

  void sizeChangeFailsPending() {
    FakeNbd f;
    IoThread io;
    auto r = NbdClientDevice::Connect(io.io, FakeOpts(f));
    QVERIFY(r.ok());
    f.size = 4u << 20;
    f.silent_conn = 1;  // the write waits on the old connection ...
    std::vector<char> w(4096, 'x');
    std::thread dropper([&] {
      t_no_count = true;
      std::this_thread::sleep_for(milliseconds(100));
      f.DropConnections();  // ... which then dies; the new one reports another size
    });
    QCOMPARE(WriteSync(*r.value(), 0, w.data(), w.size()).ToErrno(), EIO);
    dropper.join();
    QCOMPARE(r.value()->Info().size, std::uint64_t(8u << 20));
    QCOMPARE(QString::fromStdString(r.value()->Stats().state), QString("failing"));
  }

  // Overlapping writes are not pipelined (the second waits for the first reply); disjoint ones
  // are (proves the probe can see pipelining).
  void overlappingWritesOrdered() {
    for (bool overlap : {true, false}) {
      FakeNbd f;
      f.write_delay_ms = 150;
      IoThread io;
      auto o = FakeOpts(f);
      o.keepalive_interval = milliseconds(5000);
      o.keepalive_timeout = milliseconds(5000);
      auto r = NbdClientDevice::Connect(io.io, o);
      QVERIFY(r.ok());
      std::vector<char> a(8192, 'a'), b(8192, 'b');
      Batch batch;
      IoRequest q[2];
      for (int i = 0; i < 2; ++i) {
        q[i].op = IoOp::kWrite;
        q[i].offset = overlap ? std::uint64_t(i) * 4096 : std::uint64_t(i) * 65536;
        q[i].length = 8192;
        q[i].data = i ? b.data() : a.data();
        q[i].done = &Batch::Done;
        q[i].ctx = &batch;
      }
      r.value()->Submit(&q[0]);
      r.value()->Submit(&q[1]);
      QVERIFY(batch.Wait(2));
      QCOMPARE(batch.errors, 0);
      if (overlap) {
        QCOMPARE(f.pipelined_after_write.load(), 0);
        const auto disk = f.Disk();
        QVERIFY(std::memcmp(disk.data(), a.data(), 4096) == 0);
        QVERIFY(std::memcmp(disk.data() + 4096, b.data(), 8192) == 0);
      } else {
        QVERIFY(f.pipelined_after_write.load() >= 1);
      }
    }
  }

  // A flush is not sent before the older write is acknowledged; a caller's IoRequest::scratch
  // survives (the mirror keeps its leg index there).
  void flushWaitsForOlderWritesAndScratchSurvives() {
    FakeNbd f;
    f.write_delay_ms = 150;
    IoThread io;
    auto o = FakeOpts(f);
    o.keepalive_interval = milliseconds(5000);
    o.keepalive_timeout = milliseconds(5000);
    auto r = NbdClientDevice::Connect(io.io, o);
    QVERIFY(r.ok());
    std::vector<char> a(8192, 'a');
    Batch batch;
    IoRequest q[3];
    q[0].op = IoOp::kWrite;
    q[0].length = 8192;
    q[0].data = a.data();
    q[1].op = IoOp::kFlush;
    q[2].op = IoOp::kWrite;  // behind the waiting flush: waits too
    q[2].offset = 1 << 20;
    q[2].length = 8192;
    q[2].data = a.data();
    for (int i = 0; i < 3; ++i) {
      q[i].done = &Batch::Done;
      q[i].ctx = &batch;
      q[i].scratch = 0xfeed0000u + i;
      r.value()->Submit(&q[i]);
    }
    QVERIFY(batch.Wait(3));
    QCOMPARE(batch.errors, 0);
    QCOMPARE(f.pipelined_after_write.load(), 0);
    for (int i = 0; i < 3; ++i) QCOMPARE(q[i].scratch, std::uint64_t(0xfeed0000u + i));
  }

  // Issue 9 item 11: a structured reply must fill each byte exactly once.  Summing chunk
  // lengths accepted "first half twice, second half never" and returned unfilled memory.
  void structuredReadMustFillEveryByteOnce() {
    FakeNbd f;
    std::vector<char> data(8192);
    Fill(data.data(), data.size(), 7);
    f.SetDisk(65536, data.data(), data.size());
    IoThread io;
    auto r = NbdClientDevice::Connect(io.io, FakeOpts(f));
    QVERIFY(r.ok());
    auto dev = r.value();
    QVERIFY(dev->Stats().structured_replies);
    for (int lie : {1, 2, 3}) {
      f.lie = lie;
      std::vector<char> buf(8192, 'u');
      Status st = ReadSync(*dev, 65536, buf.data(), 8192);
      qInfo("lie %d: %s", lie, st.ToString().c_str());
      QCOMPARE(st.ToErrno(), EIO);
    }
    QCOMPARE(dev->Stats().bad_replies, std::uint64_t(3));
    f.lie = 0;  // an honest server again: reads work on the replacement connection
    std::vector<char> buf(8192);
    QTRY_VERIFY_WITH_TIMEOUT(ReadSync(*dev, 65536, buf.data(), 8192).ok(), 5000);
    QVERIFY(buf == data);
    // Legitimate fragmentation (reversed halves, holes) still passes.
    f.hole_chunks = true;
    QVERIFY(ReadSync(*dev, 65536, buf.data(), 8192).ok());
    QVERIFY(buf == data);
    // A chunk for an unknown handle is drained, never written into anyone's buffer.
    f.unknown_cookie_chunk = true;
    std::fill(buf.begin(), buf.end(), 0);
    QVERIFY(ReadSync(*dev, 65536, buf.data(), 8192).ok());
    QVERIFY(buf == data);
    QCOMPARE(dev->Stats().bad_replies, std::uint64_t(3));
  }

  // Connect check: the same content passes (held read re-sent), swapped content is rejected
  // once per bad connection, the held read fails with EIO and never sees the new content.
  void connectCheckOnReconnect() {
    FakeNbd f;
    std::string ident_a(4096, 'A'), ident_b(4096, 'B');
    std::vector<char> old_data(8192, 'o'), new_data(8192, 'n');
    f.SetDisk(0, ident_a.data(), 4096);
    f.SetDisk(1 << 20, old_data.data(), old_data.size());
    IoThread io;
    auto r = NbdClientDevice::Connect(io.io, FakeOpts(f));
    QVERIFY(r.ok());
    auto dev = r.value();
    test::ConnectCheckProbe probe;
    probe.SetExpect(ident_a);
    QVERIFY(dev->SetConnectCheck(probe.Make(0, 4096)));
    auto held_read = [&](std::vector<char>& buf, Batch& b, IoRequest& q) {
      f.silent_conn = f.connections.load();  // the current connection stops answering
      b.Prep(q, IoOp::kRead, 1 << 20, 8192, buf.data());
      dev->Submit(&q);
      std::this_thread::sleep_for(milliseconds(50));
    };
    {  // same content: accepted, the held read is re-sent and succeeds
      std::vector<char> buf(8192, 'x');
      Batch b;
      IoRequest q;
      held_read(buf, b, q);
      f.DropConnections();
      QVERIFY(b.Wait(1, milliseconds(8000)));
      QCOMPARE(b.errors, 0);
      QVERIFY(buf == old_data);
      QVERIFY(probe.verified.load() >= 1);
      QCOMPARE(probe.rejected.load(), 0);
    }
    {  // swapped content: rejected, the held read fails
      std::vector<char> buf(8192, 'x');
      Batch b;
      IoRequest q;
      held_read(buf, b, q);
      f.SetDisk(0, ident_b.data(), 4096);
      f.SetDisk(1 << 20, new_data.data(), new_data.size());
      f.DropConnections();
      QVERIFY(b.Wait(1, milliseconds(8000)));
      QCOMPARE(b.errors, 1);
      QCOMPARE(b.first_errno, EIO);
      QVERIFY(std::all_of(buf.begin(), buf.end(), [](char c) { return c == 'x'; }));
      QTRY_COMPARE_WITH_TIMEOUT(probe.rejected.load(), 1, 2000);  // rejected() follows the EIOs
      QCOMPARE(dev->Stats().check_failures, std::uint64_t(1));
      QVERIFY(ReadSync(*dev, 1 << 20, buf.data(), 8192).ok());  // admitted afterwards
      QVERIFY(buf == new_data);
    }
    f.DropConnections();  // once per bad connection
    QTRY_COMPARE_WITH_TIMEOUT(probe.rejected.load(), 2, 8000);
    // Removed while reconnects happen: nothing runs any more.
    probe.Remove(*dev);
    for (int i = 0; i < 5; ++i) {
      f.DropConnections();
      std::this_thread::sleep_for(milliseconds(60));
    }
    QCOMPARE(probe.late.load(), 0);
    std::vector<char> buf(8192);
    QTRY_VERIFY_WITH_TIMEOUT(ReadSync(*dev, 1 << 20, buf.data(), 8192).ok(), 5000);
  }

  void connectCheckRemovalIsRaceFree() {
    FakeNbd f;
    std::string ident(4096, 'I');
    f.SetDisk(0, ident.data(), 4096);
    IoThread io;
    auto o = FakeOpts(f);
    o.reconnect_min = milliseconds(1);
    o.reconnect_max = milliseconds(5);
    auto r = NbdClientDevice::Connect(io.io, o);
    QVERIFY(r.ok());
    auto dev = r.value();
    std::atomic<bool> stop{false};
    std::thread dropper([&] {
      for (int n = 0; !stop; ++n) {
        f.DropConnections();
        std::this_thread::sleep_for(milliseconds(3 + n % 9));
      }
    });
    int late = 0, verified = 0;
    for (int round = 0; round < 40; ++round) {
      test::ConnectCheckProbe probe;
      probe.SetExpect(round % 2 ? ident : std::string(4096, 'Z'));
      dev->SetConnectCheck(probe.Make(0, 4096));
      std::this_thread::sleep_for(milliseconds(10 + 3 * (round % 7)));
      probe.Remove(*dev);
      std::this_thread::sleep_for(milliseconds(2));
      late += probe.late.load();
      verified += probe.verified.load();
    }
    stop = true;
    dropper.join();
    qInfo("checks run: %d, reconnects: %llu", verified, (unsigned long long)dev->Stats().reconnects);
    QCOMPARE(late, 0);
    QVERIFY(verified > 0);
  }

  void healthFollowsTheConnection() {
    FakeNbd f;
    IoThread io;
    auto r = NbdClientDevice::Connect(io.io, FakeOpts(f));
    QVERIFY(r.ok());
    auto dev = r.value();
    QVERIFY(dev->Health().reachable);
    f.refuse = true;
    f.DropConnections();
    QTRY_VERIFY_WITH_TIMEOUT(!dev->Health().reachable, 5000);
    const auto h1 = dev->Health();
    std::this_thread::sleep_for(milliseconds(300));
    const auto h2 = dev->Health();
    QVERIFY(!h2.reachable);
    QVERIFY(h2.outage_ms >= h1.outage_ms + 250);
    QVERIFY(!h2.detail.empty());
    qInfo("unreachable: outage %llu ms, detail: %s", (unsigned long long)h2.outage_ms, h2.detail.c_str());
    f.refuse = false;
    QTRY_VERIFY_WITH_TIMEOUT(dev->Health().reachable, 5000);
    QCOMPARE(dev->Health().outage_ms, std::uint64_t(0));
  }

  void noAllocationPerIo() {
    DST_REQUIRE(dst::test::HaveTool("nbdkit"), "nbdkit not installed");
    for (bool structured : {true, false}) {
      QTemporaryDir dir;
      Nbdkit kit;
      const QString sock = dir.path() + "/a.sock";
      QVERIFY(kit.Start(sock, 0, {"memory", "16M"}));
      IoThread io;
      NbdClientOptions o;
      o.unix_socket = sock.toStdString();
      o.try_structured_replies = structured;
      auto r = NbdClientDevice::Connect(io.io, o);
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
          const int k = (n + i) % 4;
          q.op = k == 0 ? IoOp::kRead : k == 1 ? IoOp::kWriteZeroes : IoOp::kWrite;
          if (i == 0 && n % 10 == 0) q.op = IoOp::kFlush;
          q.offset = q.op == IoOp::kFlush ? 0 : std::uint64_t(i) * kLen;
          q.length = q.op == IoOp::kFlush ? 0 : kLen;
          q.data = buf.data() + std::size_t(i) * kLen;
          q.done = &Batch::Done;
          q.ctx = &b;
          dev->Submit(&q);
        }
      };
      for (int n = 0; n < 50; ++n) {
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
      qInfo("%s replies: allocations during %d I/Os: %llu (%.4f per I/O)", structured ? "structured" : "simple",
            ios, (unsigned long long)allocs, double(allocs) / ios);
      QCOMPARE(errors, 0);
      QVERIFY2(allocs <= 8, qPrintable(QString("allocations: %1").arg(allocs)));
    }
  }
};

DST_TEST_MAIN(NbdClientDeviceTest)
#include "nbd_client_device_test.moc"
