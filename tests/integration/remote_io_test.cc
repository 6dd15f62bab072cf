// Integration: a RemoteDevice driving a real dstd exporter with a verified random workload.
// 1 GiB of random-offset reads and writes (4 KiB..1 MiB, 32 in flight) against a 256 MiB
// sparse export, every read checked against the test's reference image, then the whole export
// read back and compared.
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

namespace {

// An io_context run by two threads, like a daemon would (exercises the device's strand).
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

}  // namespace

class RemoteIoTest : public QObject {
  Q_OBJECT
 private slots:
  void randomWorkloadVerified() {
    DST_REQUIRE(std::filesystem::exists(dst::test::BinPath("dstd")), "dstd binary not built");
    QTemporaryDir dir;
    QVERIFY(dir.isValid());
    dst::test::DaemonProcess d(dir.path() + "/srv");
    d.config() = QString("[[export]]\nname = \"disk\"\npath = \"%1/disk.img\"\nsize = \"256M\"\n")
                     .arg(dir.path());
    QVERIFY2(d.Start(), d.Log().constData());

    IoThreads io;
    RemoteOptions o;
    o.host = "127.0.0.1";
    o.port = d.port();
    o.export_name = "disk";
    o.queue_depth = 32;
    auto r = RemoteDevice::Connect(io.io, o);
    QVERIFY2(r.ok(), r.status().ToString().c_str());
    auto dev = r.value();
    QCOMPARE(dev->Info().size, kExportSize);
    QVERIFY(!dev->Info().read_only);

    dst::test::Workload w(*dev, kExportSize, 32, 42);
    const auto t0 = Clock::now();
    QVERIFY2(w.Run(1ull << 30, nullptr, t0 + std::chrono::seconds(110)), "requests hung");
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    auto t = w.totals();
    qInfo("%llu ops (%llu reads, %llu writes), %.1f MiB in %.1f s = %.0f MiB/s, max latency %lld ms",
          (unsigned long long)t.ops, (unsigned long long)t.reads, (unsigned long long)t.writes,
          t.bytes / 1048576.0, secs, t.bytes / 1048576.0 / secs, (long long)t.max_latency.count());
    QCOMPARE(t.errors, std::uint64_t(0));
    QVERIFY2(t.mismatches == 0, t.first_mismatch.c_str());
    QVERIFY2(t.bytes >= (1ull << 30), "workload did not finish within the time budget");

    std::string first;
    const auto bad = w.VerifyAll(&first);
    QVERIFY2(bad == 0, (std::to_string(bad) + " bad blocks, first " + first).c_str());

    auto st = dev->Stats();
    qInfo("client: state=%s reconnects=%llu frames/send call=%.2f", st.state.c_str(),
          (unsigned long long)st.reconnects, st.frames_per_call);
    QCOMPARE(QString::fromStdString(st.state), QString("connected"));
    QCOMPARE(st.reconnects, std::uint64_t(0));
    dev->Close();
    QCOMPARE(d.Terminate(), 0);
  }

  // An idle device keeps its connection: dstd answers the PING keepalives.
  void idleKeepalive() {
    DST_REQUIRE(std::filesystem::exists(dst::test::BinPath("dstd")), "dstd binary not built");
    QTemporaryDir dir;
    QVERIFY(dir.isValid());
    dst::test::DaemonProcess d(dir.path() + "/srv");
    d.config() = QString("[[export]]\nname = \"disk\"\npath = \"%1/disk.img\"\nsize = \"16M\"\n")
                     .arg(dir.path());
    QVERIFY2(d.Start(), d.Log().constData());
    IoThreads io;
    RemoteOptions o;
    o.port = d.port();
    o.export_name = "disk";
    o.keepalive_interval = std::chrono::milliseconds(100);
    o.keepalive_timeout = std::chrono::milliseconds(400);
    auto r = RemoteDevice::Connect(io.io, o);
    QVERIFY2(r.ok(), r.status().ToString().c_str());
    auto dev = r.value();
    std::this_thread::sleep_for(std::chrono::milliseconds(2000));
    auto st = dev->Stats();
    QCOMPARE(QString::fromStdString(st.state), QString("connected"));
    QCOMPARE(st.reconnects, std::uint64_t(0));
    QVERIFY2(st.frames_sent >= 5, "no keepalive pings were sent");
    std::vector<char> b(4096);
    QVERIFY(ReadSync(*dev, 0, b.data(), b.size()).ok());
  }
};

DST_TEST_MAIN(RemoteIoTest)
#include "remote_io_test.moc"
