// Leg faults under a verified workload (issue 3 item 6) with real daemons:
//
//   exporters E0, E1 (64 MiB images); assembler A assembles [[array]] m0 =
//   mirror(dst://E0/d0, dst://E1/d1) with leg_timeout = 3 s; the workload runs on <mnt>/m0.img
//   (O_DIRECT pwrite/pread, every write verified
//   later).
//
//   * kill -9 of E1 during the workload: the array turns degraded ([U_]), the workload sees no
//     error; E1 restarts on the same port: leg 1 comes back and is resynced automatically; the
//     legs are byte-identical and every block reads back as last written.
//   * every leg dead: I/O fails with EIO within io_timeout + slack (no hang), detail --test
//     says unusable.
#include <fcntl.h>
#include <unistd.h>

#include <QtTest/QtTest>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <map>
#include <random>
#include <thread>

#include "array_helpers.h"
#include "test_env.h"

using namespace dst::test;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

constexpr int kLegMiB = 64;
constexpr std::uint32_t kBlock = 64 << 10;
constexpr std::uint64_t kSpan = 32ull << 20;  // workload range
constexpr int kIoTimeout = 3;

// Synchronous O_DIRECT workload: random 64 KiB writes (each block's content is a function of
// (block, generation)), every third op a read of a written block compared with its generation.
struct Workload {
  QString file;
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> ops{0}, errors{0}, mismatches{0};
  std::atomic<int> first_errno{0};
  std::map<std::uint64_t, std::uint64_t> gen;  // block -> generation (0 = never written)
  std::thread t;

  void Start() {
    t = std::thread([this] { Loop(); });
  }
  void Join() {
    stop = true;
    if (t.joinable()) t.join();
  }
  void Loop() {
    int fd = ::open(file.toLocal8Bit().constData(), O_RDWR | O_DIRECT | O_CLOEXEC);
    if (fd < 0) {
      first_errno = errno;
      ++errors;
      return;
    }
    void* buf = nullptr;
    if (posix_memalign(&buf, 4096, kBlock) != 0) return;
    std::mt19937_64 rng(42);
    std::uint64_t g = 0;
    while (!stop) {
      const std::uint64_t b = rng() % (kSpan / kBlock);
      const bool read = ops % 3 == 2 && !gen.empty();
      if (read) {
        auto it = gen.lower_bound(b);
        if (it == gen.end()) it = gen.begin();
        ssize_t n = ::pread(fd, buf, kBlock, it->first * kBlock);
        if (n != ssize_t(kBlock)) {
          if (!first_errno) first_errno = n < 0 ? errno : EIO;
          ++errors;
        } else if (QByteArray(static_cast<char*>(buf), kBlock) != Pattern(it->second, it->first * kBlock, kBlock)) {
          ++mismatches;
        }
      } else {
        QByteArray d = Pattern(++g, b * kBlock, kBlock);
        memcpy(buf, d.constData(), kBlock);
        ssize_t n = ::pwrite(fd, buf, kBlock, b * kBlock);
        if (n != ssize_t(kBlock)) {
          if (!first_errno) first_errno = n < 0 ? errno : EIO;
          ++errors;
        } else {
          gen[b] = g;
        }
      }
      ++ops;
    }
    free(buf);
    ::close(fd);
  }
  // Reads every written block back; returns the number that differ.
  int VerifyAll() {
    int bad = 0;
    for (auto& [b, g] : gen) {
      QByteArray back;
      if (!PreadDirect(file, b * kBlock, kBlock, &back) || back != Pattern(g, b * kBlock, kBlock)) ++bad;
    }
    return bad;
  }
};

QString AssemblerToml(MirrorRig& rig) {
  return ArrayToml("m0", "mirror", {rig.Uri(0), rig.Uri(1)}, "64K", "50M", "200M", 1,
                   QString("leg_timeout = %1\n").arg(kIoTimeout));
}

}  // namespace

class ArrayFaultTest : public QObject {
  Q_OBJECT

 private slots:
  void init() {
    DST_REQUIRE(IsRoot(), "needs root (FUSE mount)");
    DST_REQUIRE(HaveFuse(), "needs /dev/fuse");
    DST_REQUIRE(std::filesystem::exists(BinPath("dstd")), "dstd binary not built");
  }

  void kill9LegExporterDuringWorkload() {
    MirrorRig rig;
    QString why;
    QVERIFY2(rig.StartExporters(2, kLegMiB, &why), qPrintable(why));
    const QString toml = AssemblerToml(rig);
    QVERIFY2(rig.StartAssembler(&toml, &why), qPrintable(why));
    QVERIFY2(WaitFileExists(rig.File("m0"), 10000), rig.as->Log().right(3000).constData());
    json a;
    QVERIFY2(WaitArrayClean(*rig.as, "m0", 60000, &a), a.dump().c_str());
    const std::uint64_t size = a.value("size", std::uint64_t(0));
    QVERIFY(size >= kSpan);

    Workload w;
    w.file = rig.File("m0");
    w.Start();
    struct Joiner {
      Workload& w;
      ~Joiner() { w.Join(); }
    } joiner{w};
    QVERIFY(WaitUntil([&] { return w.ops > 50; }, 20000));

    rig.ex[1]->Kill9();
    const auto t_kill = Clock::now();
    QVERIFY2(WaitUntil([&] { a = ArrayDetail(*rig.as, "m0"); return ArrayState(a) == "degraded"; },
                       (kIoTimeout + 10) * 1000),
             a.dump().c_str());
    qInfo("degraded %lld ms after kill -9 of leg 1's exporter",
          (long long)std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t_kill).count());
    QCOMPARE(QString::fromStdString(LegStateOf(a, 1)), QString("failed"));
    QByteArray human;
    QCOMPARE(rig.as->Ctl({"status"}, &human), 0);
    QVERIFY2(human.contains("[U_]"), human.constData());
    const std::uint64_t ops_degraded = w.ops;
    QVERIFY(WaitUntil([&] { return w.ops > ops_degraded + 50; }, 20000));  // keeps running degraded
    QVERIFY2(LegOutOfSync(ArrayDetail(*rig.as, "m0"), 1) > 0, "no out-of-sync bits for the failed leg");

    QVERIFY2(rig.ex[1]->Start(), rig.ex[1]->Log().constData());
    // Back automatically: leg 1 re-added and resynced while the workload keeps writing.
    QVERIFY2(WaitUntil([&] {
               a = ArrayDetail(*rig.as, "m0");
               return LegStateOf(a, 1) == "up_to_date" && !ResyncActive(a);
             }, 60000),
             ("leg 1 not resynced automatically after its exporter came back: " + a.dump()).c_str());
    const std::uint64_t ops_back = w.ops;
    QVERIFY(WaitUntil([&] { return w.ops > ops_back + 30; }, 20000));
    w.Join();
    qInfo("workload: %llu ops, %llu errors, %llu mismatches, resynced %lld bytes",
          (unsigned long long)w.ops.load(), (unsigned long long)w.errors.load(),
          (unsigned long long)w.mismatches.load(), (long long)BytesResyncedTotal(ArrayDetail(*rig.as, "m0")));
    QVERIFY2(w.errors == 0, qPrintable(QString("I/O errors, first: %1").arg(strerror(w.first_errno))));
    QCOMPARE(w.mismatches.load(), std::uint64_t(0));
    QVERIFY2(WaitArrayClean(*rig.as, "m0", 60000, &a), a.dump().c_str());
    QCOMPARE(w.VerifyAll(), 0);
    const std::int64_t diff = FirstDiff(rig.image[0], rig.image[1], size);
    QVERIFY2(diff < 0, qPrintable(QString("legs differ at byte %1").arg(diff)));
  }

  void everyLegDeadGivesEio() {
    MirrorRig rig;
    QString why;
    QVERIFY2(rig.StartExporters(2, kLegMiB, &why), qPrintable(why));
    const QString toml = AssemblerToml(rig);
    QVERIFY2(rig.StartAssembler(&toml, &why), qPrintable(why));
    QVERIFY2(WaitFileExists(rig.File("m0"), 10000), rig.as->Log().right(3000).constData());
    json a;
    QVERIFY2(WaitArrayClean(*rig.as, "m0", 60000, &a), a.dump().c_str());
    const QByteArray data = Pattern(7, 0, 65536);
    QVERIFY(PwriteDirect(rig.File("m0"), 0, data));

    rig.ex[0]->Kill9();
    rig.ex[1]->Kill9();
    // The write must fail within io_timeout + slack; run it on a thread so a hang is reported
    // instead of blocking the test forever.
    struct Result {
      std::atomic<bool> done{false};
      bool ok = false;
      int err = 0;
    };
    auto res = std::make_shared<Result>();
    const QString file = rig.File("m0");
    const auto t0 = Clock::now();
    std::thread([res, file] {
      res->ok = PwriteDirect(file, 1 << 20, Pattern(8, 1 << 20, 65536), &res->err);
      res->done = true;
    }).detach();
    const int bound_ms = (kIoTimeout + 1 + 8) * 1000;  // io_timeout + keepalive + slack
    QVERIFY2(WaitUntil([&] { return res->done.load(); }, bound_ms), "write hung with every leg dead");
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0).count();
    qInfo("write with every leg dead failed after %lld ms: %s", (long long)ms, strerror(res->err));
    QVERIFY2(!res->ok, "write acknowledged with every leg dead");
    QCOMPARE(res->err, EIO);
    QByteArray back;
    int err = 0;
    const auto t1 = Clock::now();
    QVERIFY(!PreadDirect(file, 0, 65536, &back, &err));
    QCOMPARE(err, EIO);
    QVERIFY(Clock::now() - t1 < std::chrono::milliseconds(bound_ms));
    QVERIFY2(WaitUntil([&] { return ArrayState(ArrayDetail(*rig.as, "m0")) == "failed"; }, 10000),
             ArrayDetail(*rig.as, "m0").dump().c_str());
    QCOMPARE(rig.as->Ctl({"detail", "m0", "--test"}), 2);
  }
};

DST_TEST_MAIN(ArrayFaultTest)
#include "array_fault_test.moc"
