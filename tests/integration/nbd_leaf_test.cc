// Integration tests for dst::net::NbdClientDevice as a leaf over NBD servers nobody here wrote:
// nbdkit (file and memory plugins) and qemu-nbd.  Each leg runs a verified random workload
// (remote_workload.h); file-backed legs are also compared with their backing file.  nbdkit is
// killed with SIGKILL in the middle of a workload and restarted on the same socket: the caller
// sees no error.  Finally a MirrorDevice runs over an nbdkit-file leg and a qemu-nbd leg and
// both backing files end up byte-identical.
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <QFile>
#include <QProcess>
#include <QTemporaryDir>
#include <QtTest/QtTest>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <mutex>
#include <chrono>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include "daemon_process.h"
#include "dst/block_device.h"
#include "dst/dirty_map_store.h"
#include "dst/mirror_device.h"
#include "dst/net/nbd_client_device.h"
#include "remote_workload.h"
#include "io_thread.h"
#include "test_env.h"

using namespace dst;
using namespace dst::net;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

constexpr std::uint64_t kImageSize = 32u << 20;

using dst::test::IoThread;  // tests/lib/io_thread.h

bool MakeImage(const QString& path, std::uint64_t size) {
  QFile f(path);
  return f.open(QIODevice::WriteOnly | QIODevice::Truncate) && f.resize(static_cast<qint64>(size));
}

QByteArray ReadFileRange(const QString& path, qint64 off, qint64 len) {
  QFile f(path);
  if (!f.open(QIODevice::ReadOnly) || !f.seek(off)) return {};
  return f.read(len);
}

// A server process (nbdkit or qemu-nbd), ready when its pid file appears.
class Server {
 public:
  ~Server() { Kill9(); }
  bool Start(const QString& program, QStringList args, const QString& pidfile_opt) {
    pidfile_ = dir_.path() + "/server.pid";
    QFile::remove(pidfile_);
    args.prepend(pidfile_);
    args.prepend(pidfile_opt);
    proc_.setProcessChannelMode(QProcess::ForwardedErrorChannel);
    // The server dies with the test even if the test is killed (qemu-nbd has no
    // --exit-with-parent).
    proc_.setChildProcessModifier([] { ::prctl(PR_SET_PDEATHSIG, SIGKILL); });
    proc_.start(program, args);
    if (!proc_.waitForStarted(5000)) return false;
    const auto end = Clock::now() + milliseconds(10000);
    while (Clock::now() < end) {
      if (QFileInfo(pidfile_).size() > 0) return true;
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
  QString pidfile_;
  QProcess proc_;
};

std::unique_ptr<Server> StartNbdkit(const QString& sock, quint16 port, const QStringList& plugin) {
  auto s = std::make_unique<Server>();
  QStringList args{"-f", "--exit-with-parent"};
  if (!sock.isEmpty()) {
    QFile::remove(sock);
    args << "-U" << sock;
  } else {
    args << "-i" << "127.0.0.1" << "-p" << QString::number(port);
  }
  args << plugin;
  if (!s->Start("nbdkit", args, "-P")) return nullptr;
  return s;
}

std::unique_ptr<Server> StartQemuNbd(const QString& sock, const QString& image) {
  auto s = std::make_unique<Server>();
  QFile::remove(sock);
  // -t: keep serving after a client leaves (reconnects); -e 4: allow a new connection before
  // the server noticed the old one is gone.
  if (!s->Start("qemu-nbd", {"-f", "raw", "-t", "-e", "4", "-k", sock, image}, "--pid-file")) return nullptr;
  return s;
}

// Pass-through device that checks the BlockDevice contract of the device below: every
// submitted request completes exactly once, and nothing completes that was not submitted.
class CheckedDevice : public BlockDevice {
 public:
  explicit CheckedDevice(std::shared_ptr<BlockDevice> dev) : dev_(std::move(dev)) {}
  DeviceInfo Info() const override { return dev_->Info(); }
  std::string Describe() const override { return dev_->Describe(); }
  void Submit(IoRequest* req) override {
    auto* w = new Wrap{IoRequest(*req), req, this};
    w->inner.done = &CheckedDevice::Done;
    w->inner.ctx = w;
    w->inner.link = nullptr;
    w->inner.scratch = 0;
    {
      std::lock_guard<std::mutex> l(mu_);
      live_.push_back(w);
    }
    dev_->Submit(&w->inner);
  }
  int violations() const { return violations_.load(); }

 private:
  struct Wrap {
    IoRequest inner;
    IoRequest* outer;
    CheckedDevice* self;
  };
  static void Done(IoRequest* r, Status st) {
    auto* w = static_cast<Wrap*>(r->ctx);
    CheckedDevice* self = w->self;
    {
      std::lock_guard<std::mutex> l(self->mu_);
      auto it = std::find(self->live_.begin(), self->live_.end(), w);
      if (it == self->live_.end()) {
        ++self->violations_;
        std::fprintf(stderr, "CheckedDevice: completion of an unknown or finished request\n");
        return;
      }
      self->live_.erase(it);
    }
    IoRequest* outer = w->outer;
    delete w;
    outer->done(outer, std::move(st));
  }
  std::shared_ptr<BlockDevice> dev_;
  std::mutex mu_;
  std::vector<Wrap*> live_;
  std::atomic<int> violations_{0};
};

NbdClientOptions UnixOpts(const QString& sock) {
  NbdClientOptions o;
  o.unix_socket = sock.toStdString();
  o.keepalive_interval = milliseconds(200);
  o.keepalive_timeout = milliseconds(2000);
  o.reconnect_min = milliseconds(20);
  o.reconnect_max = milliseconds(300);
  o.io_timeout = milliseconds(30000);
  return o;
}

// Runs a verified workload on `dev` over [0, size) and checks the read-back.
void RunVerified(BlockDevice& dev, std::uint64_t size, std::uint64_t bytes, std::uint64_t seed) {
  dst::test::Workload w(dev, size, 16, seed);
  QVERIFY(w.Run(bytes, nullptr, Clock::now() + std::chrono::seconds(60)));
  const auto t = w.totals();
  qInfo("%s: %llu ops, %llu MiB, %llu errors, %llu mismatches", dev.Describe().c_str(), (unsigned long long)t.ops,
        (unsigned long long)(t.bytes >> 20), (unsigned long long)t.errors, (unsigned long long)t.mismatches);
  QCOMPARE(t.errors, std::uint64_t(0));
  QCOMPARE(t.mismatches, std::uint64_t(0));
  QVERIFY(t.writes > 0 && t.reads > 0);
  std::string first;
  QCOMPARE(w.VerifyAll(&first), std::int64_t(0));
}

// The whole device equals the backing file (after a flush).
void CompareWithFile(BlockDevice& dev, const QString& image, std::uint64_t size) {
  QVERIFY(FlushSync(dev).ok());
  std::vector<char> buf(1 << 20);
  for (std::uint64_t off = 0; off < size; off += buf.size()) {
    const auto n = static_cast<std::uint32_t>(std::min<std::uint64_t>(buf.size(), size - off));
    QVERIFY(ReadSync(dev, off, buf.data(), n).ok());
    const QByteArray f = ReadFileRange(image, static_cast<qint64>(off), n);
    QCOMPARE(f.size(), qsizetype(n));
    QVERIFY2(std::memcmp(f.constData(), buf.data(), n) == 0, qPrintable(QString("offset %1").arg(off)));
  }
}

}  // namespace

class NbdLeafTest : public QObject {
  Q_OBJECT

 private slots:
  void initTestCase() {
    DST_REQUIRE(dst::test::HaveTool("nbdkit"), "nbdkit not installed");
    DST_REQUIRE(dst::test::HaveTool("qemu-nbd"), "qemu-nbd not installed");
  }

  void nbdkitFileLeg() {
    QTemporaryDir dir;
    const QString img = dir.path() + "/f.img", sock = dir.path() + "/f.sock";
    QVERIFY(MakeImage(img, kImageSize));
    auto srv = StartNbdkit(sock, 0, {"file", "file=" + img});
    QVERIFY(srv);
    IoThread io;
    auto r = NbdClientDevice::Connect(io.io, UnixOpts(sock));
    QVERIFY2(r.ok(), r.status().ToString().c_str());
    QCOMPARE(r.value()->Info().size, kImageSize);
    RunVerified(*r.value(), kImageSize, 96u << 20, 1);
    CompareWithFile(*r.value(), img, kImageSize);
  }

  void nbdkitMemoryLegTcp() {
    const quint16 port = dst::test::FreePort();
    auto srv = StartNbdkit({}, port, {"memory", QString::number(kImageSize)});
    QVERIFY(srv);
    IoThread io;
    NbdClientOptions o;
    QVERIFY(ParseNbdUri("nbd://127.0.0.1:" + std::to_string(port) + "/", &o).ok());
    auto r = NbdClientDevice::Connect(io.io, o);
    QVERIFY2(r.ok(), r.status().ToString().c_str());
    QVERIFY(r.value()->Stats().structured_replies);
    RunVerified(*r.value(), kImageSize, 96u << 20, 2);
  }

  void qemuNbdLeg() {
    QTemporaryDir dir;
    const QString img = dir.path() + "/q.img", sock = dir.path() + "/q.sock";
    QVERIFY(MakeImage(img, kImageSize));
    auto srv = StartQemuNbd(sock, img);
    QVERIFY(srv);
    IoThread io;
    NbdClientOptions o;
    QVERIFY(ParseNbdUri("nbd+unix:///?socket=" + sock.toStdString(), &o).ok());
    auto r = NbdClientDevice::Connect(io.io, o);
    QVERIFY2(r.ok(), r.status().ToString().c_str());
    QCOMPARE(r.value()->Info().size, kImageSize);
    QVERIFY(r.value()->Stats().structured_replies);
    RunVerified(*r.value(), kImageSize, 96u << 20, 3);
    CompareWithFile(*r.value(), img, kImageSize);
  }

  // kill -9 of nbdkit (file plugin) during the workload, restart on the same socket: the caller
  // sees no error and every block verifies.
  void nbdkitKill9MidWorkload() {
    QTemporaryDir dir;
    const QString img = dir.path() + "/k.img", sock = dir.path() + "/k.sock";
    QVERIFY(MakeImage(img, kImageSize));
    auto srv = StartNbdkit(sock, 0, {"file", "file=" + img});
    QVERIFY(srv);
    IoThread io;
    auto r = NbdClientDevice::Connect(io.io, UnixOpts(sock));
    QVERIFY2(r.ok(), r.status().ToString().c_str());
    auto dev = r.value();
    CheckedDevice checked(dev);  // exactly-once completion across the reconnects
    dst::test::Workload w(checked, kImageSize, 16, 4);
    std::atomic<bool> stop{false};
    bool drained = false;
    std::thread runner([&] { drained = w.Run(~0ull, &stop, Clock::now() + std::chrono::seconds(60)); });
    for (int round = 0; round < 2; ++round) {
      std::this_thread::sleep_for(milliseconds(1000));
      const auto before = w.totals().ops;
      srv->Kill9();
      std::this_thread::sleep_for(milliseconds(700));
      srv = StartNbdkit(sock, 0, {"file", "file=" + img});
      QVERIFY(srv);
      QTRY_VERIFY_WITH_TIMEOUT(w.totals().ops > before + 50, 10000);
    }
    std::this_thread::sleep_for(milliseconds(500));
    stop = true;
    runner.join();
    QVERIFY(drained);
    const auto t = w.totals();
    qInfo("kill -9 x2: %llu ops, %llu errors, %llu reconnects, %llu re-sent", (unsigned long long)t.ops,
          (unsigned long long)t.errors, (unsigned long long)dev->Stats().reconnects,
          (unsigned long long)dev->Stats().resent);
    QCOMPARE(t.errors, std::uint64_t(0));
    QCOMPARE(t.mismatches, std::uint64_t(0));
    QVERIFY(dev->Stats().reconnects >= 2);
    QCOMPARE(checked.violations(), 0);
    std::string first;
    QCOMPARE(w.VerifyAll(&first), std::int64_t(0));
    CompareWithFile(*dev, img, kImageSize);
  }

  // A mirror whose legs are an nbdkit-file export and a qemu-nbd export.
  void mirrorOverNbdkitAndQemuNbd() {
    QTemporaryDir dir;
    const QString img_a = dir.path() + "/a.img", sock_a = dir.path() + "/a.sock";
    const QString img_b = dir.path() + "/b.img", sock_b = dir.path() + "/b.sock";
    QVERIFY(MakeImage(img_a, kImageSize));
    QVERIFY(MakeImage(img_b, kImageSize));
    auto srv_a = StartNbdkit(sock_a, 0, {"file", "file=" + img_a});
    auto srv_b = StartQemuNbd(sock_b, img_b);
    QVERIFY(srv_a && srv_b);
    IoThread io;
    auto ra = NbdClientDevice::Connect(io.io, UnixOpts(sock_a));
    auto rb = NbdClientDevice::Connect(io.io, UnixOpts(sock_b));
    QVERIFY2(ra.ok(), ra.status().ToString().c_str());
    QVERIFY2(rb.ok(), rb.status().ToString().c_str());
    auto store = std::make_shared<MemoryDirtyMapStore>();
    MirrorOptions mo;
    mo.name = "nbdmirror";
    mo.assume_clean = true;  // both images are blank (all zero)
    auto rm = MirrorDevice::Create({ra.value(), rb.value()}, store, mo);
    QVERIFY2(rm.ok(), rm.status().ToString().c_str());
    auto mirror = rm.value();
    const std::uint64_t size = mirror->Info().size / (1u << 20) * (1u << 20);
    QVERIFY(size >= (16u << 20));
    RunVerified(*mirror, size, 64u << 20, 5);
    QVERIFY(mirror->Close().ok());
    mirror.reset();
    QVERIFY(FlushSync(*ra.value()).ok());
    QVERIFY(FlushSync(*rb.value()).ok());
    // The data area (everything below the legs' identity headers) is byte-identical.
    const QByteArray a = ReadFileRange(img_a, 0, static_cast<qint64>(size));
    const QByteArray b = ReadFileRange(img_b, 0, static_cast<qint64>(size));
    QCOMPARE(a.size(), qsizetype(size));
    QVERIFY(a == b);
    int nonzero = 0;
    for (qsizetype i = 0; i < a.size(); i += 4096) nonzero += a.at(i) != 0;
    QVERIFY(nonzero > 100);  // the workload really wrote through both legs
  }

  // Issue 9 item 1 over NBD: an nbdkit leg restarted behind the same socket with a blank image
  // of the same size is caught by the identity check on its reconnection, before any read is
  // served from it; it is re-initialised and fully resynced.  Reads through the mirror never
  // return the blank's zeros.
  void blankNbdkitLegRestartedIsResyncedNeverRead() {
    QTemporaryDir dir;
    const QString img_a = dir.path() + "/a.img", sock_a = dir.path() + "/a.sock";
    const QString img_b = dir.path() + "/b.img", sock_b = dir.path() + "/b.sock";
    QVERIFY(MakeImage(img_a, kImageSize));
    QVERIFY(MakeImage(img_b, kImageSize));
    auto srv_a = StartNbdkit(sock_a, 0, {"file", "file=" + img_a});
    auto srv_b = StartNbdkit(sock_b, 0, {"file", "file=" + img_b});
    QVERIFY(srv_a && srv_b);
    IoThread io;
    auto ra = NbdClientDevice::Connect(io.io, UnixOpts(sock_a));
    auto rb = NbdClientDevice::Connect(io.io, UnixOpts(sock_b));
    QVERIFY2(ra.ok(), ra.status().ToString().c_str());
    QVERIFY2(rb.ok(), rb.status().ToString().c_str());
    auto store = std::make_shared<MemoryDirtyMapStore>();
    MirrorOptions mo;
    mo.name = "nbdblank";
    mo.assume_clean = true;
    auto rm = MirrorDevice::Create({ra.value(), rb.value()}, store, mo);
    QVERIFY2(rm.ok(), rm.status().ToString().c_str());
    auto mirror = rm.value();
    constexpr std::uint32_t kChunk = 1u << 20;
    const std::uint64_t span = 8u << 20;
    std::vector<char> buf(kChunk), back(kChunk);
    auto fill = [&](std::uint64_t off) {
      for (std::uint32_t i = 0; i < kChunk; i += 8) {
        std::uint64_t v = (off + i) * 0x9E3779B97F4A7C15ull | 1;  // never zero
        std::memcpy(buf.data() + i, &v, 8);
      }
    };
    for (std::uint64_t off = 0; off < span; off += kChunk) {
      fill(off);
      QVERIFY(WriteSync(*mirror, off, buf.data(), kChunk).ok());
    }
    QVERIFY(FlushSync(*mirror).ok());

    // Replace leg 1's server: same socket, same size, blank image.
    srv_b->Kill9();
    QVERIFY(QFile::remove(img_b));
    QVERIFY(MakeImage(img_b, kImageSize));
    srv_b = StartNbdkit(sock_b, 0, {"file", "file=" + img_b});
    QVERIFY(srv_b);

    // Read everything back, again and again, until the replacement is resynced.  The chunks
    // are read concurrently so the mirror balances them over both legs (least pending first).
    bool seen_blank = false;
    int passes = 0;
    const auto end = Clock::now() + milliseconds(60000);
    const std::size_t nchunks = span / kChunk;
    std::vector<std::vector<char>> want(nchunks), got(nchunks, std::vector<char>(kChunk));
    for (std::size_t c = 0; c < nchunks; ++c) {
      fill(c * kChunk);
      want[c] = buf;
    }
    for (;;) {
      std::vector<std::thread> readers;
      std::atomic<int> bad{-1}, failed{0};
      for (std::size_t c = 0; c < nchunks; ++c)
        readers.emplace_back([&, c] {
          if (!ReadSync(*mirror, c * kChunk, got[c].data(), kChunk).ok()) ++failed;
          else if (got[c] != want[c]) bad = int(c);
        });
      for (auto& t : readers) t.join();
      QCOMPARE(failed.load(), 0);
      QVERIFY2(bad < 0, qPrintable(QString("read of chunk %1 served the blank leg").arg(bad.load())));
      ++passes;
      auto legs = mirror->Legs();
      seen_blank = seen_blank || legs[1].identity_event.find("blank") != std::string::npos ||
                   legs[1].reason == LegReason::kBlank;
      if (seen_blank && legs[0].state == LegState::kUpToDate && legs[1].state == LegState::kUpToDate) break;
      QVERIFY2(Clock::now() < end, mirror->TEST_DebugState().c_str());
      std::this_thread::sleep_for(milliseconds(50));
    }
    qInfo("blank nbdkit leg detected and resynced; %d verified read passes meanwhile", passes);
    QVERIFY(mirror->Close().ok());
    mirror.reset();
    const QByteArray a = ReadFileRange(img_a, 0, static_cast<qint64>(span));
    const QByteArray b = ReadFileRange(img_b, 0, static_cast<qint64>(span));
    QVERIFY(a.size() == qsizetype(span) && a == b);
  }
};

DST_TEST_MAIN(NbdLeafTest)
#include "nbd_leaf_test.moc"
