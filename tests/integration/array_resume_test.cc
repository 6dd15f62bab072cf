// A full resync killed at ~50 % resumes from its checkpoint (issue 3 item 6):
//
//   exporters E0 (128 MiB image pre-filled with data), E1 (blank); assembler A: [[array]] m0 =
//   mirror(dst://E0/d0, dst://E1/d1) at 8 MiB/s: leg 1 gets a full resync from leg 0.
//   When status shows 40-60 %, the rate is throttled to 4 KiB/s (so the position is stable),
//   bytes_done is read, and A is killed with -9.  A restarts (fast rate): the resync resumes;
//   the bytes re-sent after the restart are >= the remainder and <= remainder + one window;
//   the legs are byte-identical at the end and the data reads back through the array.
#include <QtTest/QtTest>

#include <filesystem>

#include "array_helpers.h"
#include "test_env.h"

using namespace dst::test;
using nlohmann::json;

namespace {
constexpr int kLegMiB = 128;
}

class ArrayResumeTest : public QObject {
  Q_OBJECT

 private slots:
  void killedResyncResumesFromCheckpoint() {
    DST_REQUIRE(IsRoot(), "needs root (FUSE mount)");
    DST_REQUIRE(HaveFuse(), "needs /dev/fuse");
    DST_REQUIRE(std::filesystem::exists(BinPath("dstd")), "dstd binary not built");

    MirrorRig rig;
    QVERIFY(rig.dir.isValid());
    // Pre-fill leg 0's image: 1 MiB of data every 4 MiB, so the copy moves real bytes.
    const QString img0 = rig.dir.path() + "/e0/d0.img";
    QVERIFY(QDir().mkpath(rig.dir.path() + "/e0"));
    QVERIFY(MakeSparse(img0, std::uint64_t(kLegMiB) << 20));
    {
      QFile f(img0);
      QVERIFY(f.open(QIODevice::ReadWrite));
      for (std::uint64_t off = 0; off + (1 << 20) <= (std::uint64_t(kLegMiB - 4) << 20); off += 4 << 20) {
        QVERIFY(f.seek(off));
        QCOMPARE(f.write(Pattern(5, off, 1 << 20)), qint64(1 << 20));
      }
    }
    QString why;
    QVERIFY2(rig.StartExporters(2, kLegMiB, &why), qPrintable(why));
    QCOMPARE(rig.image[0], img0);
    const QStringList legs{rig.Uri(0), rig.Uri(1)};
    const QString slow = ArrayToml("m0", "mirror", legs, "64K", "8M", "8M", 1);
    QVERIFY2(rig.StartAssembler(&slow, &why), qPrintable(why));
    QVERIFY2(WaitFileExists(rig.File("m0"), 10000), rig.as->Log().right(3000).constData());

    json a;
    double pct = -1;
    bool out_of_range = false;
    QVERIFY2(WaitUntil([&] {
               a = ArrayDetail(*rig.as, "m0");
               pct = ResyncPercent(a);
               if (a.contains("resync") && a["resync"].is_object() && (pct < 0 || pct > 100)) out_of_range = true;
               return out_of_range || pct >= 40;
             }, 60000, 100),
             a.dump().c_str());
    QVERIFY2(!out_of_range, qPrintable(QString("percent out of 0..100: %1").arg(pct)));
    QVERIFY2(pct <= 60, qPrintable(QString("overshot: %1 %").arg(pct)));
    const std::uint64_t size = a.value("size", std::uint64_t(0));
    const std::uint64_t region = a.value("region_size", std::uint64_t(64 << 10));
    const std::uint64_t window = ResyncWindowBytes(a, region);
    QByteArray out, err;
    QVERIFY2(rig.as->Ctl({"array", "resync-rate", "m0", "--min", "4K", "--max", "4K"}, &out, &err) == 0,
             err.constData());
    // Wait for the position to settle (the window in flight finishes at most).
    std::int64_t done = -1, total = -1;
    QVERIFY2(WaitUntil([&] {
               json x = ArrayDetail(*rig.as, "m0");
               if (!x.contains("resync") || !x["resync"].is_object()) return false;
               std::int64_t d = JInt(x["resync"], "bytes_done");
               total = JInt(x["resync"], "bytes_total");
               bool stable = d == done;
               done = d;
               a = x;
               return stable;
             }, 20000, 1000),
             a.dump().c_str());
    QVERIFY(total > 0 && done > 0 && done < total);
    const std::uint64_t remainder = std::uint64_t(total - done);
    qInfo("killing the assembler at %.1f %%: done %lld of %lld, remainder %llu, window %llu",
          100.0 * double(done) / double(total), (long long)done, (long long)total, (unsigned long long)remainder,
          (unsigned long long)window);
    QCOMPARE(std::uint64_t(total), size);  // a full resync covers the whole array
    rig.as->Kill9();

    const QString fast = ArrayToml("m0", "mirror", legs, "64K", "200M", "400M", 1);
    QVERIFY2(rig.StartAssembler(&fast, &why), qPrintable(why));
    QVERIFY2(WaitFileExists(rig.File("m0"), 10000), rig.as->Log().right(3000).constData());
    QVERIFY2(WaitArrayClean(*rig.as, "m0", 120000, &a), a.dump().c_str());
    const std::int64_t resent = BytesResyncedTotal(a);
    qInfo("after restart: re-sent %lld bytes; remainder %llu, bound remainder + window = %llu", (long long)resent,
          (unsigned long long)remainder, (unsigned long long)(remainder + window));
    QVERIFY2(resent >= std::int64_t(remainder), "resumed resync skipped data that was not copied");
    QVERIFY2(resent <= std::int64_t(remainder + window), "resync did not resume from its checkpoint");

    const std::int64_t diff = FirstDiff(rig.image[0], rig.image[1], size);
    QVERIFY2(diff < 0, qPrintable(QString("legs differ at byte %1").arg(diff)));
    for (std::uint64_t off = 0; off + (1 << 20) <= (std::uint64_t(kLegMiB - 4) << 20); off += 16 << 20) {
      QByteArray back;
      QVERIFY(PreadDirect(rig.File("m0"), off, 1 << 20, &back));
      QVERIFY2(back == Pattern(5, off, 1 << 20), qPrintable(QString("data differs at %1").arg(off)));
    }
  }
};

DST_TEST_MAIN(ArrayResumeTest)
#include "array_resume_test.moc"
