// Leg identity with real daemons (issue 9 items 1, 2, 7):
//
//   exporters E0, E1 (16 MiB images); assembler A (host_name "hostA") assembles
//   m0 = mirror(dst://E0/d0, dst://E1/d1); data is written through A's FUSE file.
//
//   (a) E1 restarts with a blank image of the same size: leg 1 is caught (reconnect check or
//       periodic header check), gets a full resync, detail names the finding, and the data read
//       back through the array is the original (never zeros); the legs end byte-identical.
//   (b) a second assembler B (host_name "hostB") configured with the same two exports is
//       refused with hostA named; A stays clean.
//   (c) release on A, then import on B from the legs: B serves A's data; A no longer has it.
//   (e) split brain: A fails leg 1 and writes on; B imports leg 1 alone (once A's claim on it ran
//       out) and releases it; A's re-add is refused as split brain, detail --test says 1;
//       resolve --dry-run names the bytes and changes nothing; resolve --keep 0 heals it.
//   (d) remove-leg of an up-to-date leg without --force is refused (exit 75, reason named);
//       with --force it works.
#include <QtTest/QtTest>

#include <atomic>
#include <thread>

#include <filesystem>

#include "array_helpers.h"
#include "test_env.h"

using namespace dst::test;
using nlohmann::json;

namespace {

constexpr int kLegMiB = 16;
constexpr std::uint32_t kChunk = 1 << 20;
constexpr int kDataMiB = 4;

QString AssemblerToml(MirrorRig& rig, const QString& host) {
  return QString("host_name = \"%1\"\n\n").arg(host) +
         ArrayToml("m0", "mirror", {rig.Uri(0), rig.Uri(1)}, "64K", "50M", "200M", 1,
                   "leg_timeout = 3\n");
}

// Two exporters and assembler hostA with m0 clean and its FUSE file present; "" or why not.
QString StartRig(MirrorRig& rig, json* a) {
  QString why;
  if (!rig.StartExporters(2, kLegMiB, &why)) return why;
  const QString toml = AssemblerToml(rig, "hostA");
  if (!rig.StartAssembler(&toml, &why)) return why;
  if (!WaitFileExists(rig.File("m0"), 10000)) return "no FUSE file: " + rig.as->Log().right(3000);
  if (!WaitArrayClean(*rig.as, "m0", 60000, a)) return "not clean: " + QString::fromStdString(a->dump());
  return {};
}

bool WriteData(const QString& file, std::uint64_t seed) {
  for (int i = 0; i < kDataMiB; ++i)
    if (!PwriteDirect(file, std::uint64_t(i) * kChunk, Pattern(seed, std::uint64_t(i) * kChunk, kChunk)))
      return false;
  return true;
}

// Number of 1 MiB chunks that differ from the pattern (a read error counts as a difference).
int CheckData(const QString& file, std::uint64_t seed) {
  int bad = 0;
  for (int i = 0; i < kDataMiB; ++i) {
    QByteArray back;
    if (!PreadDirect(file, std::uint64_t(i) * kChunk, kChunk, &back) ||
        back != Pattern(seed, std::uint64_t(i) * kChunk, kChunk))
      ++bad;
  }
  return bad;
}

// Reader threads hammering the data through the FUSE file, one 1 MiB chunk each, in parallel so
// the mirror balances them over both legs (least pending first).  Counts reads that returned
// something else than the pattern.
struct ParallelReaders {
  QString file;
  std::uint64_t seed;
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0}, errors{0}, reads{0};
  std::vector<std::thread> threads;
  void Start() {
    for (int i = 0; i < kDataMiB; ++i)
      threads.emplace_back([this, i] {
        const std::uint64_t off = std::uint64_t(i) * kChunk;
        const QByteArray want = Pattern(seed, off, kChunk);
        while (!stop) {
          QByteArray back;
          if (!PreadDirect(file, off, kChunk, &back)) ++errors;
          else if (back != want) ++bad;
          ++reads;
        }
      });
  }
  ~ParallelReaders() {
    stop = true;
    for (auto& t : threads) t.join();
  }
};

const json* LegJson(const json& a, int slot) {
  if (!a.is_object() || !a.contains("legs")) return nullptr;
  for (auto& l : a["legs"])
    if (l.value("slot", -1) == slot) return &l;
  return nullptr;
}

}  // namespace

class ArrayIdentityTest : public QObject {
  Q_OBJECT

 private slots:
  void init() {
    DST_REQUIRE(IsRoot(), "needs root (FUSE mount)");
    DST_REQUIRE(HaveFuse(), "needs /dev/fuse");
    DST_REQUIRE(std::filesystem::exists(BinPath("dstd")), "dstd binary not built");
  }

  void blankReplacementIsResyncedNotServed() {
    MirrorRig rig;
    json a;
    QString why = StartRig(rig, &a);
    QVERIFY2(why.isEmpty(), qPrintable(why));
    const std::uint64_t size = a.value("size", std::uint64_t(0));
    QVERIFY(WriteData(rig.File("m0"), 21));
    const std::string gen_before = LegJson(a, 1)->value("generation", std::string());

    // Reads run in parallel through all of it: none may ever return the blank's zeros.
    ParallelReaders readers;
    readers.file = rig.File("m0");
    readers.seed = 21;
    readers.Start();

    // The exporter of leg 1 comes back with a blank image of the same size.
    QVERIFY(rig.ex[1]->Terminate() == 0);
    QVERIFY(QFile::remove(rig.image[1]));
    QVERIFY(MakeSparse(rig.image[1], std::uint64_t(kLegMiB) << 20));
    QVERIFY2(rig.ex[1]->Start(), rig.ex[1]->Log().constData());

    QVERIFY2(WaitUntil([&] {
               a = ArrayDetail(*rig.as, "m0");
               const json* l = LegJson(a, 1);
               return l && l->value("identity_event", std::string()).find("blank") != std::string::npos;
             }, 30000),
             ("blank leg not detected: " + a.dump()).c_str());
    qInfo("leg 1: %s", LegJson(a, 1)->value("identity_event", std::string()).c_str());
    // The array reads the original data while (and after) leg 1 is rebuilt.
    QCOMPARE(CheckData(rig.File("m0"), 21), 0);
    QVERIFY2(WaitArrayClean(*rig.as, "m0", 60000, &a), a.dump().c_str());
    readers.stop = true;
    for (auto& t : readers.threads) t.join();
    readers.threads.clear();
    qInfo("parallel reads during the replacement: %d, wrong data: %d, errors: %d", readers.reads.load(),
          readers.bad.load(), readers.errors.load());
    QCOMPARE(readers.bad.load(), 0);
    QCOMPARE(readers.errors.load(), 0);
    QVERIFY(LegJson(a, 1)->value("generation", std::string()) != gen_before);
    QCOMPARE(CheckData(rig.File("m0"), 21), 0);
    const std::int64_t diff = FirstDiff(rig.image[0], rig.image[1], size);
    QVERIFY2(diff < 0, qPrintable(QString("legs differ at byte %1").arg(diff)));
    // detail (text) names it; the log too.
    QByteArray human;
    QCOMPARE(rig.as->Ctl({"detail", "m0"}, &human), 0);
    QVERIFY2(human.contains("blank"), human.constData());
    QVERIFY2(rig.as->Log().contains("blank"), rig.as->Log().right(3000).constData());
  }

  void secondAssemblerRefusedThenHandOver() {
    MirrorRig rig;
    json a;
    QString why = StartRig(rig, &a);
    QVERIFY2(why.isEmpty(), qPrintable(why));
    QVERIFY(WriteData(rig.File("m0"), 31));

    // (b) A second daemon with the same two exports is refused, hostA named.
    DaemonProcess b(rig.dir.path() + "/b");
    b.config() = AssemblerToml(rig, "hostB");
    QVERIFY2(b.Start(), b.Log().constData());
    json bj;
    QVERIFY2(WaitUntil([&] {
               bj = ArrayDetail(b, "m0");
               return bj.is_object() && bj.value("error", json()).is_string() &&
                      bj["error"].get<std::string>().find("claimed by host hostA") != std::string::npos;
             }, 20000),
             ("second assembler not refused with the owner named: " + bj.dump()).c_str());
    QVERIFY(!bj.value("assembled", true));
    QCOMPARE(b.Ctl({"detail", "m0", "--test"}), 2);
    // The first keeps running healthy across several lease renewals.
    std::this_thread::sleep_for(std::chrono::seconds(6));
    QVERIFY2(WaitArrayClean(*rig.as, "m0", 1000, &a), a.dump().c_str());
    QCOMPARE(rig.as->Ctl({"detail", "m0", "--test"}), 0);
    QCOMPARE(CheckData(rig.File("m0"), 31), 0);
    QVERIFY2(ArrayDetail(b, "m0").value("assembled", true) == false, "B assembled while A holds the legs");
    QVERIFY(b.Terminate() == 0);

    // (c) Clean hand-over: release on A, import on a new daemon C from the legs.
    QByteArray out, err;
    QCOMPARE(rig.as->Ctl({"array", "release", "m0"}, &out, &err), 0);
    QVERIFY(!ArrayDetail(*rig.as, "m0").is_object() || ArrayDetail(*rig.as, "m0").value("name", "") != "m0");
    DaemonProcess c(rig.dir.path() + "/c");
    c.config() = "host_name = \"hostC\"\n";
    QString cmnt = rig.dir.path() + "/cmnt";
    QDir().mkpath(cmnt);
    FuseGuard cguard{cmnt};
    c.extra_args() << "--mount" << cmnt;
    QVERIFY2(c.Start(), c.Log().constData());
    int rc = c.Ctl({"array", "import", "m0", rig.Uri(0), rig.Uri(1)}, &out, &err);
    QVERIFY2(rc == 0, err.constData());
    json cj;
    QVERIFY2(WaitArrayClean(c, "m0", 60000, &cj), cj.dump().c_str());
    QVERIFY2(WaitFileExists(cmnt + "/m0.img", 10000), c.Log().right(3000).constData());
    QCOMPARE(CheckData(cmnt + "/m0.img", 31), 0);
    for (auto& l : cj["legs"]) QCOMPARE(QString::fromStdString(l["owner"].value("name", "")), QString("hostC"));
    QVERIFY(c.Terminate() == 0);
  }

  void splitBrainDetectedAndResolved() {
    MirrorRig rig;
    json a;
    QString why = StartRig(rig, &a);
    QVERIFY2(why.isEmpty(), qPrintable(why));
    QVERIFY(WriteData(rig.File("m0"), 41));
    QByteArray out, err;
    QCOMPARE(rig.as->Ctl({"array", "fail-leg", "m0", "1"}, &out, &err), 0);
    QVERIFY(WriteData(rig.File("m0"), 42));  // A goes on without leg 1
    // B takes leg 1 alone once A's claim on it (no longer renewed) ran out.
    DaemonProcess b(rig.dir.path() + "/b");
    b.config() = "host_name = \"hostB\"\n";
    QVERIFY2(b.Start(), b.Log().constData());
    int rc = b.Ctl({"array", "import", "m1", rig.Uri(1)}, &out, &err);
    QCOMPARE(rc, 75);
    QVERIFY2(err.contains("claimed by host hostA"), err.constData());
    QVERIFY2(WaitUntil([&] { return b.Ctl({"array", "import", "m1", rig.Uri(1)}, &out, &err) == 0; },
                       25000, 1000),
             err.constData());
    QCOMPARE(b.Ctl({"array", "release", "m1"}, &out, &err), 0);
    QVERIFY(b.Terminate() == 0);
    // Back on A: never resynced automatically in either direction.
    rc = rig.as->Ctl({"array", "re-add-leg", "m0", "1"}, &out, &err);
    QCOMPARE(rc, 75);
    QVERIFY2(err.contains("split brain"), err.constData());
    a = ArrayDetail(*rig.as, "m0");
    QCOMPARE(QString::fromStdString(ArrayState(a)), QString("split-brain"));
    QCOMPARE(rig.as->Ctl({"detail", "m0", "--test"}), 1);
    QByteArray leg1_before = Sha256File(rig.image[1]);
    rc = rig.as->Ctl({"array", "resolve", "m0", "--keep", "0", "--dry-run"}, &out, &err);
    QVERIFY2(rc == 0, err.constData());
    QVERIFY2(out.contains("would overwrite") && out.contains("leg 1"), out.constData());
    QCOMPARE(QString::fromStdString(ArrayState(ArrayDetail(*rig.as, "m0"))), QString("split-brain"));
    QCOMPARE(Sha256File(rig.image[1]), leg1_before);
    rc = rig.as->Ctl({"array", "resolve", "m0", "--keep", "0"}, &out, &err);
    QVERIFY2(rc == 0, err.constData());
    QVERIFY2(WaitArrayClean(*rig.as, "m0", 60000, &a), a.dump().c_str());
    QCOMPARE(CheckData(rig.File("m0"), 42), 0);
    const std::int64_t diff = FirstDiff(rig.image[0], rig.image[1], a.value("size", std::uint64_t(0)));
    QVERIFY2(diff < 0, qPrintable(QString("legs differ at byte %1").arg(diff)));
  }

  void removeUpToDateLegNeedsForce() {
    MirrorRig rig;
    json a;
    QString why = StartRig(rig, &a);
    QVERIFY2(why.isEmpty(), qPrintable(why));
    QByteArray out, err;
    int rc = rig.as->Ctl({"array", "remove-leg", "m0", "1"}, &out, &err);
    QCOMPARE(rc, 75);
    QVERIFY2(err.contains("up to date") && err.contains("--force"), err.constData());
    QCOMPARE(int(ArrayDetail(*rig.as, "m0")["legs"].size()), 2);
    // The last up-to-date leg is not failed without --force either.
    QCOMPARE(rig.as->Ctl({"array", "fail-leg", "m0", "1"}, &out, &err), 0);
    rc = rig.as->Ctl({"array", "fail-leg", "m0", "0"}, &out, &err);
    QCOMPARE(rc, 75);
    QVERIFY2(err.contains("last up-to-date"), err.constData());
    // A failed leg goes without --force; an up-to-date one with it.
    QCOMPARE(rig.as->Ctl({"array", "remove-leg", "m0", "1"}, &out, &err), 0);
    QCOMPARE(int(ArrayDetail(*rig.as, "m0")["legs"].size()), 1);
    QCOMPARE(rig.as->Ctl({"array", "add-leg", "m0", rig.Uri(1)}, &out, &err), 0);
    QVERIFY2(WaitArrayClean(*rig.as, "m0", 60000, &a), a.dump().c_str());
    rc = rig.as->Ctl({"array", "remove-leg", "m0", "1", "--force"}, &out, &err);
    QVERIFY2(rc == 0, err.constData());
    QCOMPARE(int(ArrayDetail(*rig.as, "m0")["legs"].size()), 1);
  }
};

DST_TEST_MAIN(ArrayIdentityTest)
#include "array_identity_test.moc"
