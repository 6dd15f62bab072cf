// Pause and resume a mirror's resync (array.pause_resync / array.resume_resync, issue 12):
//
//   * a new mirror over two local images syncs leg 1 at 4 MiB/s; `dstctl array pause-resync`
//     stops it: the resynced bytes stop advancing over a second, detail --json shows the pass
//     "paused" and resync_paused, a resync_paused event is pushed;
//   * `dstctl array resume-resync` restarts it: the bytes advance, a resync_resumed event, and
//     (the limit lifted) the array becomes clean;
//   * refusals name the reason: no such array, a linear array, nothing to pause, not paused.
#include <QtTest/QtTest>

#include <filesystem>

#include "array_helpers.h"
#include "event_tap.h"
#include "test_env.h"

using namespace dst::test;
using nlohmann::json;

namespace {
constexpr std::uint64_t kMiB = 1 << 20;

// The state of the array's first progress entry that is not done ("" when none).
std::string PassState(const json& arr) {
  for (auto& p : arr.value("progress", json::array()))
    if (p.value("state", "") != "done" && p.value("state", "") != "idle") return p.value("state", "");
  return "";
}
}  // namespace

class ArrayPauseTest : public QObject {
  Q_OBJECT

 private slots:
  void init() { DST_REQUIRE(std::filesystem::exists(BinPath("dstd")), "dstd binary not built"); }

  void pauseStopsAndResumeFinishes() {
    QTemporaryDir dir;
    QVERIFY(dir.isValid());
    const QString a = dir.path() + "/a.img", b = dir.path() + "/b.img", c = dir.path() + "/c.img";
    QVERIFY(MakeSparse(a, 64 * kMiB) && MakeSparse(b, 64 * kMiB) && MakeSparse(c, 8 * kMiB));
    QDir().mkpath(dir.path() + "/st");
    DaemonProcess d(dir.path() + "/st");
    // 4 MiB/s: the initial sync of 64 MiB takes ~16 s unless the test lifts the limit.
    d.config() = ArrayToml("m0", "mirror", {a, b}, "64K", "4M", "4M") + ArrayToml("lin", "linear", {c});
    QVERIFY2(d.Start(), d.Log().right(3000).constData());
    EventTap tap;
    QVERIFY(tap.Start(d));
    json arr;
    QVERIFY2(WaitUntil([&] {
               arr = ArrayDetail(d, "m0");
               return BytesResyncedTotal(arr) > 0 && PassState(arr) == "running";
             }, 20000), arr.dump().c_str());

    QByteArray out, err;
    QCOMPARE(d.Ctl({"array", "pause-resync", "m0"}, &out, &err), 0);
    QVERIFY2(out.contains("resync paused"), out.constData());
    std::vector<json> evs;
    QVERIFY(tap.Wait("resync_paused", 1, 5000, &evs));
    QCOMPARE(evs[0].value("array", ""), std::string("m0"));
    QVERIFY2(evs[0]["legs"] == json::array({1}), evs[0].dump().c_str());
    // The window in flight (16 x 64K at 4 MiB/s) ends within ~0.3 s; then nothing moves.
    QTest::qWait(1200);
    json p1 = ArrayDetail(d, "m0");
    QTest::qWait(1200);
    json p2 = ArrayDetail(d, "m0");
    QCOMPARE(PassState(p2), std::string("paused"));
    QCOMPARE(p2["resync"].value("state", ""), std::string("paused"));
    QCOMPARE(p2.value("resync_paused", false), true);
    // A paused pass promises nothing: no rate, ETA unknown (they were the last pass's figures).
    QCOMPARE(p2["progress"][1].value("rate", -1ll), 0ll);
    QCOMPARE(p2["progress"][1].value("eta_seconds", 0.0), -1.0);
    QCOMPARE(BytesResyncedTotal(p2), BytesResyncedTotal(p1));
    QCOMPARE(p2["progress"][1].value("bytes_done", 0ull), p1["progress"][1].value("bytes_done", 0ull));
    QVERIFY(BytesResyncedTotal(p2) < std::int64_t(60 * kMiB));
    QCOMPARE(d.Ctl({"detail", "m0"}, &out, &err), 0);
    QVERIFY2(out.contains("(paused)"), out.constData());
    // Pausing twice is refused, naming why.
    QVERIFY(d.Ctl({"array", "pause-resync", "m0"}, &out, &err) != 0);
    QVERIFY2(err.contains("already paused"), err.constData());

    QCOMPARE(d.Ctl({"array", "resume-resync", "m0"}, &out, &err), 0);
    QVERIFY2(out.contains("resync resumed"), out.constData());
    QVERIFY(tap.Wait("resync_resumed", 1, 5000, &evs));
    QCOMPARE(evs[0].value("array", ""), std::string("m0"));
    json p3;
    QVERIFY2(WaitUntil([&] {
               p3 = ArrayDetail(d, "m0");
               return BytesResyncedTotal(p3) > BytesResyncedTotal(p2) && PassState(p3) == "running";
             }, 5000), p3.dump().c_str());
    QCOMPARE(p3.value("resync_paused", true), false);
    QCOMPARE(d.Ctl({"array", "resync-rate", "m0", "--min", "400M", "--max", "400M"}, &out, &err), 0);
    QVERIFY2(WaitArrayClean(d, "m0", 60000, &arr), arr.dump().c_str());

    // Refusals, each with its reason.
    QVERIFY(d.Ctl({"array", "pause-resync", "m0"}, &out, &err) != 0);
    QVERIFY2(err.contains("no resync to pause"), err.constData());
    QVERIFY(d.Ctl({"array", "resume-resync", "m0"}, &out, &err) != 0);
    QVERIFY2(err.contains("is not paused"), err.constData());
    QVERIFY(d.Ctl({"array", "pause-resync", "nosuch"}, &out, &err) != 0);
    QVERIFY2(err.contains("no array \"nosuch\""), err.constData());
    QVERIFY(d.Ctl({"array", "resume-resync", "lin"}, &out, &err) != 0);
    QVERIFY2(err.contains("is linear: only a mirror resyncs"), err.constData());
  }
};

QTEST_GUILESS_MAIN(ArrayPauseTest)
#include "array_pause_test.moc"
