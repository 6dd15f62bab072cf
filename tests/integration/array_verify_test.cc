// Online verify against a real dstd (issue 9 item 9):
//
//   * a mirror over two local image files; data written through the array's FUSE file (when
//     FUSE is available) on top of a pre-filled leg; one leg's image corrupted directly (pwrite
//     on the backing file) at a known offset;
//   * `dstctl array verify` reports exactly 1 mismatch at that region and exits 1; detail (text
//     and --json) shows it; `--repair` fixes it (exit 0), the legs' data areas are
//     byte-identical afterwards and a second verify finds nothing;
//   * the event stream (`dstctl events --json`) carried verify_progress and verify_done lines;
//   * a periodic verify ([daemon] verify_interval) runs by itself, its result survives a dstd
//     restart (dstd_verify table); verify of a linear array is refused with the reason.
#include <fcntl.h>
#include <unistd.h>

#include <QtTest/QtTest>

#include <filesystem>

#include "array_helpers.h"
#include "event_tap.h"
#include "test_env.h"

using namespace dst::test;
using nlohmann::json;

namespace {
constexpr std::uint64_t kMiB = 1 << 20;
constexpr std::uint64_t kLegBytes = 64 * kMiB;
constexpr std::uint64_t kRegion = 64 << 10;

bool FillPattern(const QString& path, std::uint64_t seed, std::uint64_t len) {
  QFile f(path);
  if (!f.open(QIODevice::ReadWrite)) return false;
  for (std::uint64_t off = 0; off < len; off += kMiB)
    if (f.write(Pattern(seed, off, std::uint32_t(kMiB))) != qint64(kMiB)) return false;
  return true;
}

bool PwriteFile(const QString& path, std::uint64_t off, const QByteArray& d) {
  int fd = ::open(path.toLocal8Bit().constData(), O_WRONLY);
  if (fd < 0) return false;
  bool ok = ::pwrite(fd, d.constData(), std::size_t(d.size()), off_t(off)) == d.size() && ::fsync(fd) == 0;
  ::close(fd);
  return ok;
}

}  // namespace

class ArrayVerifyTest : public QObject {
  Q_OBJECT

 private slots:
  void init() {
    DST_REQUIRE(std::filesystem::exists(BinPath("dstd")), "dstd binary not built");
  }

  void verifyReportsAndRepairsCorruption() {
    QTemporaryDir dir;
    QVERIFY(dir.isValid());
    const QString a = dir.path() + "/a.img", b = dir.path() + "/b.img", mnt = dir.path() + "/mnt";
    QVERIFY(MakeSparse(a, kLegBytes) && MakeSparse(b, kLegBytes));
    QVERIFY(FillPattern(a, 5, 32 * kMiB));  // leg 0's data; the initial sync copies it to leg 1
    const bool fuse = IsRoot() && HaveFuse();
    FuseGuard fuse_guard;
    fuse_guard.path = mnt;
    DaemonProcess d(dir.path() + "/st");
    QDir().mkpath(dir.path() + "/st");
    if (fuse) {
      QDir().mkpath(mnt);
      d.extra_args() << "--mount" << mnt;
    }
    // 32 MiB/s: a verify of 64 MiB takes about 2 s, long enough for progress events.
    d.config() = ArrayToml("m0", "mirror", {a, b}, "64K", "32M", "32M");
    QVERIFY2(d.Start(), d.Log().right(3000).constData());
    json arr;
    QVERIFY2(WaitArrayClean(d, "m0", 60000, &arr), arr.dump().c_str());
    const std::uint64_t size = arr.value("size", std::uint64_t{0});
    QVERIFY(size > 60 * kMiB);
    if (fuse) {
      // Write through the array (FUSE file): both legs get it.
      QVERIFY(WaitFileExists(mnt + "/m0.img", 10000));
      QVERIFY(PwriteDirect(mnt + "/m0.img", 40 * kMiB, Pattern(9, 40 * kMiB, 4 * kMiB)));
    } else {
      qInfo("no FUSE here: the data checked is the pre-filled leg 0 copied by the initial sync");
    }
    EventTap tap;
    QVERIFY(tap.Start(d));

    QByteArray out, err;
    QCOMPARE(d.Ctl({"array", "verify", "m0"}, &out, &err), 0);
    QVERIFY2(out.contains("legs identical"), out.constData());

    // Corrupt leg 1's image directly, inside region 16 (1 MiB) and region 650 (past 40 MiB).
    const std::uint64_t bad1 = 16 * kRegion + 12345, bad2 = 650 * kRegion + 4096;
    QVERIFY(PwriteFile(b, bad1, QByteArray(8, 'X')));
    QVERIFY(PwriteFile(b, bad2, QByteArray(512, '\0') + QByteArray(16, 'Y')));
    QVERIFY(FirstDiff(a, b, size) >= 0);

    int rc = d.Ctl({"array", "verify", "m0", "--json"}, &out, &err);
    QVERIFY2(rc == 1, qPrintable(QString("rc %1: %2 %3").arg(rc).arg(out.constData(), err.constData())));
    json v = json::parse(out.toStdString(), nullptr, false);
    QVERIFY2(v.is_object(), out.constData());
    QCOMPARE(v.value("state", ""), std::string("done"));
    QCOMPARE(v.value("mismatch_regions", 0), 2);
    QCOMPARE(v["mismatches"].size(), std::size_t{2});
    QCOMPARE(v["mismatches"][0]["offset"].get<std::uint64_t>(), 16 * kRegion);
    QVERIFY(v["mismatches"][0]["legs"] == json::array({1}));
    QCOMPARE(v["mismatches"][1]["offset"].get<std::uint64_t>(), 650 * kRegion);
    QCOMPARE(v.value("bytes_done", std::uint64_t{0}), size);

    // detail shows it, in JSON and text; the array itself is still clean (nothing marked).
    json det = ArrayDetail(d, "m0");
    QCOMPARE(det["verify"].value("mismatch_regions", 0), 2);
    QCOMPARE(det.value("state", ""), std::string("clean"));
    QCOMPARE(d.Ctl({"detail", "m0"}, &out, &err), 0);
    QVERIFY2(out.contains(QByteArray("Mismatches : ") + QByteArray::number(16 * kRegion) + " (leg 1)"),
             out.constData());
    QVERIFY2(out.contains("2 mismatching regions (128 KiB)"), out.constData());
    // Text output of the same verify names the offset; exit code 1 again.
    QCOMPARE(d.Ctl({"array", "verify", "m0"}, &out, &err), 1);
    QVERIFY2(out.contains(QByteArray("offset ") + QByteArray::number(16 * kRegion)), out.constData());

    // --repair: marked, resynced from leg 0, exit 0; legs identical; a new verify is clean.
    rc = d.Ctl({"array", "verify", "m0", "--repair"}, &out, &err);
    QVERIFY2(rc == 0, qPrintable(QString("rc %1: %2 %3").arg(rc).arg(out.constData(), err.constData())));
    QVERIFY2(out.contains("repaired: 2 regions"), out.constData());
    QVERIFY2(WaitArrayClean(d, "m0", 30000, &arr), arr.dump().c_str());
    QCOMPARE(FirstDiff(a, b, size), std::int64_t{-1});
    QCOMPARE(d.Ctl({"array", "verify", "m0"}, &out, &err), 0);
    QVERIFY2(out.contains("legs identical"), out.constData());
    if (fuse) {
      QByteArray back;
      QVERIFY(PreadDirect(mnt + "/m0.img", 40 * kMiB, 4 * kMiB, &back));
      QVERIFY(back == Pattern(9, 40 * kMiB, 4 * kMiB));
    }

    // The event stream: progress while running, and one verify_done per run with its count.
    std::vector<json> evs;
    QVERIFY(WaitUntil([&] {
      evs = tap.Lines();
      int done = 0;
      for (auto& e : evs) done += e.value("type", "") == "verify_done";
      return done >= 5;
    }, 10000));
    int progress = 0;
    std::vector<int> counts;
    for (auto& e : evs) {
      if (e.value("type", "") == "verify_progress") {
        ++progress;
        QVERIFY(e.value("percent", -1.0) >= 0 && e.value("percent", 101.0) <= 100);
        QVERIFY(e.contains("rate") && e.contains("eta_seconds") && e.contains("bytes_total"));
      }
      if (e.value("type", "") == "verify_done") counts.push_back(e.value("mismatch_regions", -1));
    }
    QVERIFY2(progress >= 3, qPrintable(QString("%1 progress events").arg(progress)));
    QString got;
    for (int n : counts) got += QString::number(n) + " ";
    QVERIFY2(counts == std::vector<int>({0, 2, 2, 2, 0}), qPrintable("mismatch counts: " + got));

    // Busy: a second verify while one runs is refused with the reason (exit 75).
    QCOMPARE(d.Ctl({"array", "verify", "m0", "--no-wait"}, &out, &err), 0);
    QCOMPARE(d.Ctl({"array", "verify", "m0", "--no-wait"}, &out, &err), 75);
    QVERIFY2(err.contains("already running"), err.constData());
    // Meanwhile status has md's "check" line and detail says "checking".
    QCOMPARE(d.Ctl({"status"}, &out, &err), 0);
    QVERIFY2(out.contains("check = "), out.constData());
    QCOMPARE(d.Ctl({"detail", "m0"}, &out, &err), 0);
    QVERIFY2(out.contains("clean, checking") && out.contains("Verify Status : verify"), out.constData());
    QCOMPARE(d.Ctl({"array", "verify", "m0", "--cancel"}, &out, &err), 0);
    QVERIFY(WaitUntil([&] { return ArrayDetail(d, "m0")["verify"].value("state", "") == "cancelled"; }, 10000));
    QCOMPARE(d.Terminate(), 0);
  }

  void periodicVerifyPersistsAcrossRestart() {
    QTemporaryDir dir;
    QVERIFY(dir.isValid());
    const QString a = dir.path() + "/a.img", b = dir.path() + "/b.img", c = dir.path() + "/c.img";
    QVERIFY(MakeSparse(a, 16 * kMiB) && MakeSparse(b, 16 * kMiB) && MakeSparse(c, 16 * kMiB));
    DaemonProcess d(dir.path() + "/st");
    QDir().mkpath(dir.path() + "/st");
    // Key lines right after the generated [daemon] table belong to it.
    d.config() = "verify_interval = 2\n\n" + ArrayToml("m1", "mirror", {a, b}) +
                 ArrayToml("lin", "linear", {c});
    QVERIFY2(d.Start(), d.Log().right(3000).constData());
    json arr;
    QVERIFY2(WaitArrayClean(d, "m1", 60000, &arr), arr.dump().c_str());
    QCOMPARE(arr["verify_schedule"].value("interval", 0), 2);
    QVERIFY(WaitUntil([&] {
      arr = ArrayDetail(d, "m1");
      return arr["verify"].is_object() && arr["verify"].value("trigger", "") == "schedule" &&
             arr["verify"].value("state", "") == "done";
    }, 20000));
    const double finished = arr["verify"]["finished"].get<double>();
    QVERIFY(arr["verify_schedule"]["next"].is_number());
    QByteArray out, err;
    QVERIFY(d.Ctl({"array", "verify", "lin"}, &out, &err) != 0);
    QVERIFY2(err.contains("linear"), err.constData());

    // Restart with the periodic verify off: the last result is still shown (from SQLite).
    QCOMPARE(d.Terminate(), 0);
    d.config() = ArrayToml("m1", "mirror", {a, b}) + ArrayToml("lin", "linear", {c});
    QVERIFY2(d.Start(), d.Log().right(3000).constData());
    QVERIFY2(WaitArrayClean(d, "m1", 60000, &arr), arr.dump().c_str());
    QVERIFY2(arr["verify"].is_object(), arr.dump().c_str());
    QVERIFY(arr["verify"].value("persisted", false));
    QVERIFY(arr["verify"]["finished"].get<double>() >= finished);
    QCOMPARE(arr["verify"].value("mismatch_regions", -1), 0);
    QCOMPARE(arr["verify_schedule"].value("interval", -1), 0);
    QCOMPARE(d.Ctl({"detail", "m1"}, &out, &err), 0);
    // (A verify the shutdown interrupted is recorded as cancelled: both are fine here.)
    QVERIFY2(out.contains("Last Verify : "), out.constData());
    QCOMPARE(d.Terminate(), 0);
  }
};

DST_TEST_MAIN(ArrayVerifyTest)
#include "array_verify_test.moc"
