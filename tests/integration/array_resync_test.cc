// Exact resync accounting (issue 3 item 6, DRBD's io-errors test) against real daemons:
//
//   exporters E0, E1 (64 MiB sparse images d0, d1); assembler A: `array create m0 --level mirror
//   dst://E0/d0 dst://E1/d1 --region-size 64K`, FUSE file <mnt>/m0.img.
//
//   * detach leg 1, write 12 KiB at known offsets (4 KiB in region 0, 8 KiB straddling regions
//     4|5) with O_DIRECT through the FUSE file, re-add: bytes resynced == 3 regions exactly;
//   * the same with fail-leg instead of detach-leg, and with a SIGSTOPped leg exporter;
//   * detach + re-add with no writes: 0 bytes;
//   * replaced leg (fresh empty image on E1): a full resync, exactly the array size;
//   after each: the exporters' images are byte-identical on the data range (the 4 KiB leg
//   header at the end differs by slot) and the data reads back through the array.
#include <QtTest/QtTest>

#include <filesystem>

#include "array_helpers.h"
#include "test_env.h"

using namespace dst::test;
using nlohmann::json;

namespace {
constexpr std::uint64_t kRegion = 64 << 10;
constexpr int kLegMiB = 64;
}  // namespace

class ArrayResyncTest : public QObject {
  Q_OBJECT

  std::unique_ptr<MirrorRig> rig_;
  std::uint64_t size_ = 0;
  std::uint64_t seed_ = 1;

  std::int64_t Resynced() { return BytesResyncedTotal(ArrayDetail(*rig_->as, "m0")); }

  // Writes 12 KiB: 4 KiB at 64K*r0 + 12K (region r0), 8 KiB at 64K*r1 - 4K (regions r1-1, r1).
  bool Write12K(std::uint64_t r0, std::uint64_t r1, QString* why) {
    const QString f = rig_->File("m0");
    const std::uint64_t offs[2] = {r0 * kRegion + 12288, r1 * kRegion - 4096};
    const std::uint32_t lens[2] = {4096, 8192};
    for (int i = 0; i < 2; ++i) {
      QByteArray d = Pattern(++seed_, offs[i], lens[i]);
      int err = 0;
      if (!PwriteDirect(f, offs[i], d, &err)) {
        *why = QString("pwrite at %1: %2").arg(offs[i]).arg(strerror(err));
        return false;
      }
      QByteArray back;
      if (!PreadDirect(f, offs[i], lens[i], &back, &err) || back != d) {
        *why = QString("read back at %1 differs (%2)").arg(offs[i]).arg(strerror(err));
        return false;
      }
    }
    return true;
  }

  void CheckIdentical(const QString& img0, const QString& img1) {
    const std::int64_t diff = FirstDiff(img0, img1, size_);
    QVERIFY2(diff < 0, qPrintable(QString("legs differ at byte %1").arg(diff)));
  }

  // Leg 1 out (how), 12 KiB written, leg back: exactly 3 regions resynced.
  void PartialCycle(const QString& how) {
    const std::int64_t base = Resynced();
    QVERIFY2(base >= 0, "bytes_resynced_total not exposed by detail/status --json");
    QByteArray out, err;
    if (how == "stop") {
      rig_->ex[1]->Stop();
    } else {
      QVERIFY2(rig_->as->Ctl({"array", how, "m0", "1"}, &out, &err) == 0, err.constData());
      json a;
      QVERIFY2(WaitUntil([&] { a = ArrayDetail(*rig_->as, "m0"); return ArrayState(a) == "degraded"; }, 10000),
               a.dump().c_str());
      QCOMPARE(QString::fromStdString(LegStateOf(a, 1)), how == "detach-leg" ? QString("detached") : QString("failed"));
    }
    QString why;
    QVERIFY2(Write12K(2, 9, &why), qPrintable(why));  // regions 2, 8, 9
    json a;
    if (how == "stop") {
      // The write above waited for leg 1 to time out (keepalive/io timeout) and failed it.
      QVERIFY2(WaitUntil([&] { a = ArrayDetail(*rig_->as, "m0"); return LegStateOf(a, 1) == "failed"; }, 30000),
               a.dump().c_str());
      rig_->ex[1]->Cont();
    }
    a = ArrayDetail(*rig_->as, "m0");
    QCOMPARE(LegOutOfSync(a, 1), std::int64_t(3 * kRegion));
    if (how != "stop" || LegStateOf(a, 1) == "failed") {
      // A SIGSTOPped exporter's leg may come back by itself (auto re-add); else re-add it.
      if (how != "stop" || !WaitUntil([&] { return LegStateOf(ArrayDetail(*rig_->as, "m0"), 1) != "failed"; }, 5000))
        QVERIFY2(rig_->as->Ctl({"array", "re-add-leg", "m0", "1"}, &out, &err) == 0, err.constData());
    }
    QVERIFY2(WaitArrayClean(*rig_->as, "m0", 60000, &a), a.dump().c_str());
    const std::int64_t delta = Resynced() - base;
    qInfo("%s: bytes resynced %lld, expected %llu (3 x 64 KiB regions)", qPrintable(how), (long long)delta,
          (unsigned long long)(3 * kRegion));
    QCOMPARE(delta, std::int64_t(3 * kRegion));
    CheckIdentical(rig_->image[0], rig_->image[1]);
  }

 private slots:
  void initTestCase() {
    DST_REQUIRE(IsRoot(), "needs root (FUSE mount)");
    DST_REQUIRE(HaveFuse(), "needs /dev/fuse");
    DST_REQUIRE(std::filesystem::exists(BinPath("dstd")), "dstd binary not built");
    rig_ = std::make_unique<MirrorRig>();
    QString why;
    QVERIFY2(rig_->StartExporters(2, kLegMiB, &why), qPrintable(why));
    const QString empty;
    QVERIFY2(rig_->StartAssembler(&empty, &why), qPrintable(why));
    QByteArray out, err;
    int rc = rig_->as->Ctl({"array", "create", "m0", "--level", "mirror", rig_->Uri(0), rig_->Uri(1),
                            "--region-size", "64K"},
                           &out, &err);
    QVERIFY2(rc == 0, qPrintable(QString("array create: rc=%1 %2 %3").arg(rc).arg(QString(out), QString(err))));
    QVERIFY2(WaitFileExists(rig_->File("m0"), 10000), "m0.img did not appear on the FUSE mount");
    json a;
    QVERIFY2(WaitArrayClean(*rig_->as, "m0", 60000, &a), a.dump().c_str());
    size_ = a.value("size", std::uint64_t(0));
    QCOMPARE(size_, std::uint64_t(kLegMiB) * 1048576 - 4096);  // smallest leg minus its header
    QCOMPARE(std::uint64_t(QFileInfo(rig_->File("m0")).size()), size_);
    qInfo("initial sync: %lld bytes", (long long)Resynced());
  }

  void cleanupTestCase() { rig_.reset(); }

  void detachWriteReAdd() { PartialCycle("detach-leg"); }
  void failWriteReAdd() { PartialCycle("fail-leg"); }

  void reAddWithoutWritesResyncsNothing() {
    const std::int64_t base = Resynced();
    QByteArray out, err;
    QVERIFY2(rig_->as->Ctl({"array", "detach-leg", "m0", "1"}, &out, &err) == 0, err.constData());
    json a;
    QVERIFY2(WaitUntil([&] { a = ArrayDetail(*rig_->as, "m0"); return LegStateOf(a, 1) == "detached"; }, 10000),
             a.dump().c_str());
    QCOMPARE(LegOutOfSync(a, 1), std::int64_t(0));
    QVERIFY2(rig_->as->Ctl({"array", "re-add-leg", "m0", "1"}, &out, &err) == 0, err.constData());
    QVERIFY2(WaitArrayClean(*rig_->as, "m0", 30000, &a), a.dump().c_str());
    QCOMPARE(Resynced() - base, std::int64_t(0));
    CheckIdentical(rig_->image[0], rig_->image[1]);
  }

  void stoppedExporterWriteReAdd() {
    // A leg whose exporter is SIGSTOPped: the write must not fail; the leg is failed after the
    // leg's timeouts (dst:// legs use the daemon's defaults, so allow generous time).
    PartialCycle("stop");
  }

  void replacedLegGetsFullResync() {
    const std::int64_t base = Resynced();
    QByteArray out, err;
    QVERIFY2(rig_->as->Ctl({"array", "fail-leg", "m0", "1"}, &out, &err) == 0, err.constData());
    // A fresh empty image on the same exporter, under a new export name.
    const QString fresh = rig_->ex[1]->state_dir() + "/fresh.img";
    QVERIFY2(rig_->ex[1]->Ctl({"export", "add", "fresh", fresh, "--size", QString("%1M").arg(kLegMiB)}, &out, &err) == 0,
             err.constData());
    QVERIFY2(rig_->as->Ctl({"array", "re-add-leg", "m0", "1", DstUri(*rig_->ex[1], "fresh")}, &out, &err) == 0,
             err.constData());
    json a;
    QVERIFY2(WaitArrayClean(*rig_->as, "m0", 90000, &a), a.dump().c_str());
    const std::int64_t delta = Resynced() - base;
    qInfo("replaced leg: bytes resynced %lld, array size %llu", (long long)delta, (unsigned long long)size_);
    QCOMPARE(delta, std::int64_t(size_));
    CheckIdentical(rig_->image[0], fresh);
    // The replacement's data reads back through the array too (reads may be served by either leg).
    QByteArray back;
    QVERIFY(PreadDirect(rig_->File("m0"), 2 * kRegion + 12288, 4096, &back));
    QCOMPARE(back, Pattern(seed_ - 1, 2 * kRegion + 12288, 4096));
  }
};

DST_TEST_MAIN(ArrayResyncTest)
#include "array_resync_test.moc"
