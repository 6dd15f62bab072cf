// Integration: RemoteDevice self-healing against a real dstd that is killed, restarted, or
// SIGSTOPped while a verified workload runs.
//
//  * kill -9 + restart (aimed at 3 s, bounded well inside io_timeout) on the same port: no
//    request fails, data identical.
//  * SIGSTOP shorter than io_timeout: no request fails, data identical.
//  * SIGSTOP longer than io_timeout (6 s, keepalive 2 s): requests fail with EIO within
//    io_timeout + slack, nothing hangs; after SIGCONT new I/O succeeds.
#include <QTemporaryDir>
#include <QtTest/QtTest>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <thread>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include "daemon_process.h"
#include "dst/net/remote_device.h"
#include "remote_workload.h"
#include "test_env.h"

using namespace dst;
using namespace dst::net;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
using std::chrono::seconds;

namespace {

struct IoThreads {
  boost::asio::io_context io;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> guard{io.get_executor()};
  std::thread t1{[this] { io.run(); }};
  std::thread t2{[this] { io.run(); }};
  ~IoThreads() {
    guard.reset();
    io.stop();
    t1.join();
    t2.join();
  }
};

constexpr std::uint64_t kExportSize = 256ull << 20;

long long MsBetween(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration_cast<milliseconds>(b - a).count();
}

// One dstd with one export, plus a connected RemoteDevice.
struct Rig {
  QTemporaryDir dir;
  std::unique_ptr<dst::test::DaemonProcess> d;
  IoThreads io;
  std::shared_ptr<RemoteDevice> dev;

  bool Start(const RemoteOptions& base, QByteArray* why) {
    if (!dir.isValid()) return false;
    d = std::make_unique<dst::test::DaemonProcess>(dir.path() + "/srv");
    d->config() = QString("[[export]]\nname = \"disk\"\npath = \"%1/disk.img\"\nsize = \"256M\"\n")
                      .arg(dir.path());
    if (!d->Start()) {
      *why = "dstd did not start: " + d->Log();
      return false;
    }
    RemoteOptions o = base;
    o.host = "127.0.0.1";
    o.port = d->port();
    o.export_name = "disk";
    auto r = RemoteDevice::Connect(io.io, o);
    if (!r.ok()) {
      *why = QByteArray::fromStdString(r.status().ToString());
      return false;
    }
    dev = r.value();
    return true;
  }
  ~Rig() {
    if (dev) dev->Close();
    if (d) d->Cont();
  }
};

RemoteOptions FaultOptions() {
  RemoteOptions o;
  o.queue_depth = 32;
  o.keepalive_interval = milliseconds(500);
  o.keepalive_timeout = milliseconds(2000);
  o.io_timeout = milliseconds(6000);
  o.connect_timeout = milliseconds(2000);
  o.reconnect_min = milliseconds(100);
  o.reconnect_max = milliseconds(500);
  return o;
}

bool WaitConnected(RemoteDevice& dev, milliseconds timeout) {
  const auto end = Clock::now() + timeout;
  while (Clock::now() < end) {
    if (dev.Stats().state == "connected") return true;
    std::this_thread::sleep_for(milliseconds(20));
  }
  return false;
}

}  // namespace

class RemoteFaultTest : public QObject {
  Q_OBJECT
 private slots:
  void init() {
    DST_REQUIRE(std::filesystem::exists(dst::test::BinPath("dstd")), "dstd binary not built");
  }

  void kill9AndRestart() {
    Rig rig;
    QByteArray why;
    RemoteOptions o = FaultOptions();
    o.io_timeout = milliseconds(30000);  // the restart must be invisible, not a timeout
    QVERIFY2(rig.Start(o, &why), why.constData());
    dst::test::Workload w(*rig.dev, kExportSize, 32, 7);
    std::atomic<bool> stop{false};
    bool drained = false;
    std::thread load([&] { drained = w.Run(~0ull, &stop, Clock::now() + seconds(100)); });
    std::this_thread::sleep_for(milliseconds(1500));
    const auto ops_before = w.totals().ops;
    rig.d->Kill9();
    const auto t_kill = Clock::now();
    std::this_thread::sleep_for(milliseconds(1000));
    const bool restarted = rig.d->Start();
    const auto t_up = Clock::now();
    qInfo("dstd restarted %lld ms after kill -9", MsBetween(t_kill, t_up));
    // The property under test: a restart well inside io_timeout is invisible.  Under CI load the
    // daemon's own start can take more than the 3 s the scenario aims for, so bound it by what
    // the property needs rather than failing on the harness's speed.
    QVERIFY2(MsBetween(t_kill, t_up) < 20000 || !restarted, "restart took longer than 20 s (io_timeout 30 s)");
    std::this_thread::sleep_for(milliseconds(2500));  // keep the workload running on the new dstd
    stop = true;
    load.join();
    QVERIFY2(restarted, rig.d->Log().constData());
    QVERIFY2(drained, "requests hung");
    auto t = w.totals();
    auto st = rig.dev->Stats();
    qInfo("ops %llu (before kill %llu), reconnects %llu, resent %llu, max latency %lld ms",
          (unsigned long long)t.ops, (unsigned long long)ops_before, (unsigned long long)st.reconnects,
          (unsigned long long)st.resent, (long long)t.max_latency.count());
    QCOMPARE(t.errors, std::uint64_t(0));
    QVERIFY2(t.mismatches == 0, t.first_mismatch.c_str());
    QVERIFY(st.reconnects >= 1);
    QVERIFY2(t.ops > ops_before + 10, "no progress after the restart");
    std::string first;
    const auto bad = w.VerifyAll(&first);
    QVERIFY2(bad == 0, (std::to_string(bad) + " bad blocks, first " + first).c_str());
  }

  void stopShorterThanIoTimeout() {
    Rig rig;
    QByteArray why;
    QVERIFY2(rig.Start(FaultOptions(), &why), why.constData());
    dst::test::Workload w(*rig.dev, kExportSize, 32, 8);
    std::atomic<bool> stop{false};
    bool drained = false;
    std::thread load([&] { drained = w.Run(~0ull, &stop, Clock::now() + seconds(100)); });
    std::this_thread::sleep_for(milliseconds(1000));
    rig.d->Stop();
    std::this_thread::sleep_for(milliseconds(3000));  // past keepalive_timeout, short of io_timeout
    rig.d->Cont();
    const auto ops_at_cont = w.totals().ops;
    std::this_thread::sleep_for(milliseconds(3000));
    stop = true;
    load.join();
    QVERIFY2(drained, "requests hung");
    auto t = w.totals();
    auto st = rig.dev->Stats();
    qInfo("ops %llu, reconnects %llu, resent %llu, max latency %lld ms", (unsigned long long)t.ops,
          (unsigned long long)st.reconnects, (unsigned long long)st.resent, (long long)t.max_latency.count());
    QCOMPARE(t.errors, std::uint64_t(0));
    QVERIFY2(t.mismatches == 0, t.first_mismatch.c_str());
    QVERIFY2(t.ops > ops_at_cont, "no progress after SIGCONT");
    QCOMPARE(QString::fromStdString(st.state), QString("connected"));
    std::string first;
    const auto bad = w.VerifyAll(&first);
    QVERIFY2(bad == 0, (std::to_string(bad) + " bad blocks, first " + first).c_str());
  }

  void stopPastIoTimeoutFailsWithEio() {
    Rig rig;
    QByteArray why;
    const RemoteOptions o = FaultOptions();
    QVERIFY2(rig.Start(o, &why), why.constData());
    dst::test::Workload w(*rig.dev, kExportSize, 32, 9);
    std::atomic<bool> stop{false};
    bool drained = false;
    std::thread load([&] { drained = w.Run(~0ull, &stop, Clock::now() + seconds(100)); });
    std::this_thread::sleep_for(milliseconds(1000));
    rig.d->Stop();
    const auto t_stop = Clock::now();
    // Keep submitting through the outage until the first failure (or well past the bound), then
    // stop, so that few regions end up unknown for the final verification.
    const auto slack = milliseconds(1500);
    const auto give_up = t_stop + o.io_timeout + slack + milliseconds(1000);
    while (w.totals().errors == 0 && Clock::now() < give_up) std::this_thread::sleep_for(milliseconds(10));
    stop = true;
    load.join();
    QVERIFY2(drained, "requests hung past io_timeout");
    auto t = w.totals();
    auto st = rig.dev->Stats();
    QVERIFY2(t.errors > 0, "the outage outlived io_timeout: requests must fail");
    QCOMPARE(t.first_errno, EIO);
    const auto first_eio = MsBetween(t_stop, t.first_error_at);
    qInfo("first EIO %lld ms after SIGSTOP (io_timeout %lld ms), %llu failed, state %s, timeouts %llu",
          first_eio, (long long)o.io_timeout.count(), (unsigned long long)t.errors, st.state.c_str(),
          (unsigned long long)st.timeouts);
    QVERIFY2(first_eio >= o.io_timeout.count() - 1000, "failed too early: the outage was shorter");
    QVERIFY2(first_eio <= (o.io_timeout + slack).count(), "EIO not within io_timeout + slack");
    // Every request submitted before the stop ended by io_timeout + slack (nothing hung).
    QVERIFY2(t.max_latency <= o.io_timeout + slack,
             qPrintable(QString("max latency %1 ms").arg(t.max_latency.count())));
    QVERIFY(st.state == "failing" || st.state == "reconnecting");
    // While failing, a new request ends at once.
    if (rig.dev->Stats().state == "failing") {
      std::vector<char> b(4096);
      const auto t1 = Clock::now();
      QCOMPARE(ReadSync(*rig.dev, 0, b.data(), 4096).ToErrno(), EIO);
      QVERIFY(MsBetween(t1, Clock::now()) < 500);
    }

    rig.d->Cont();
    const auto t_cont = Clock::now();
    QVERIFY2(WaitConnected(*rig.dev, seconds(15)), "no recovery after SIGCONT");
    qInfo("reconnected %lld ms after SIGCONT", MsBetween(t_cont, Clock::now()));
    // The export matches the reference wherever the outcome is known (failed writes are not).
    std::string first;
    const auto bad = w.VerifyAll(&first);
    qInfo("%llu of %llu blocks unknown after failed writes", (unsigned long long)w.unknown_blocks(),
          (unsigned long long)(kExportSize / 4096));
    QVERIFY2(bad == 0, (std::to_string(bad) + " bad blocks, first " + first).c_str());
    // New I/O succeeds and lands.
    std::vector<char> wbuf(256 << 10), rbuf(256 << 10);
    for (std::size_t i = 0; i < wbuf.size(); ++i) wbuf[i] = static_cast<char>(i * 7 + 3);
    Status s = WriteSync(*rig.dev, 1 << 20, wbuf.data(), wbuf.size());
    QVERIFY2(s.ok(), s.ToString().c_str());
    s = ReadSync(*rig.dev, 1 << 20, rbuf.data(), rbuf.size());
    QVERIFY2(s.ok(), s.ToString().c_str());
    QVERIFY(wbuf == rbuf);
  }
};

DST_TEST_MAIN(RemoteFaultTest)
#include "remote_fault_test.moc"
