// Truthful health (issue 9 item 4) with real daemons: legs are dst:// exports of other dstd
// processes; the assembler has no FUSE mount and nobody does I/O while the faults happen.
//
//   * A linear array whose (idle) leg's exporter is killed is reported failed within about
//     leg_timeout: state, the leg's "unreachable", detail --test exit 2, status --json.
//   * A mirror whose (idle) leg's exporter is killed fails that leg (degraded, --test 1); when
//     the exporter is back the leg is re-added and the mirror is clean again; the linear too.
//   * Per-leg I/O counters: reading the mirror through its NBD export shows reads on its legs.
#include <QtTest/QtTest>

#include <filesystem>

#include "array_helpers.h"
#include "test_env.h"

using namespace dst::test;
using nlohmann::json;

namespace {

constexpr int kLegTimeout = 2;

int DetailTest(DaemonProcess& d, const QString& name) {
  return d.Ctl({"detail", name, "--test"});
}

json LegOf(const json& a, int slot) {
  for (auto& l : a.value("legs", json::array()))
    if (l.value("slot", -1) == slot) return l;
  return json();
}

}  // namespace

class ArrayHealthTest : public QObject {
  Q_OBJECT

 private slots:
  void init() {
    DST_REQUIRE(std::filesystem::exists(BinPath("dstd")), "dstd binary not built");
  }

  void IdleLegsAreProbed() {
    QTemporaryDir dir;
    std::vector<std::unique_ptr<DaemonProcess>> ex;
    for (int i = 0; i < 3; ++i) {
      auto d = std::make_unique<DaemonProcess>(dir.path() + QString("/e%1").arg(i));
      d->config() = ExportToml(QString("d%1").arg(i), dir.path() + QString("/d%1.img").arg(i), "16M");
      QVERIFY2(d->Start(), d->Log().constData());
      ex.push_back(std::move(d));
    }
    const QString extra = QString("leg_timeout = %1\n").arg(kLegTimeout);
    DaemonProcess as(dir.path() + "/as");
    as.config() = ArrayToml("m", "mirror", {DstUri(*ex[0], "d0"), DstUri(*ex[1], "d1")}, "64K", "",
                            "", -1, extra) +
                  ArrayToml("lin", "linear", {DstUri(*ex[2], "d2")}, "64K", "", "", -1, extra) +
                  "[[export]]\nname = \"mx\"\narray = \"m\"\n";
    QVERIFY2(as.Start(), as.Log().constData());
    json a;
    QVERIFY2(WaitArrayClean(as, "m", 60000, &a), a.dump().c_str());
    QVERIFY(WaitUntil([&] { return ArrayState(ArrayDetail(as, "lin")) == "clean"; }, 10000));
    QCOMPARE(DetailTest(as, "lin"), 0);
    // A plain volume from exporter 2 too (a runtime export there: it must survive its restart).
    QByteArray out, err;
    QCOMPARE(ex[2]->Ctl({"export", "add", "v", dir.path() + "/v.img", "--size", "1M"}, &out, &err), 0);
    QCOMPARE(as.Ctl({"volume", "import", "rv", DstUri(*ex[2], "v"), "--timeout", "2"}, &out, &err), 0);
    auto volume_reachable = [&] {
      json v = CtlJson(as, {"volume", "list", "--json"});
      for (auto& x : v.value("volumes", json::array()))
        if (x["name"] == "rv") return x.value("reachable", false);
      return false;
    };
    QVERIFY(volume_reachable());

    // Read the whole mirror through NBD: the per-leg counters show where reads went.
    if (HaveTool("nbdcopy")) {
      Cmd c = Run("nbdcopy", {QString("nbd://127.0.0.1:%1/mx").arg(as.nbd_port()), "null:"});
      QVERIFY2(c.rc == 0, qPrintable(Show(c)));
      a = ArrayDetail(as, "m");
      std::uint64_t r0 = LegOf(a, 0)["io"].value("reads", std::uint64_t{0});
      std::uint64_t r1 = LegOf(a, 1)["io"].value("reads", std::uint64_t{0});
      qInfo("mirror reads: leg 0 %llu, leg 1 %llu", (unsigned long long)r0, (unsigned long long)r1);
      QVERIFY(r0 + r1 > 0);
      QCOMPARE(as.Ctl({"detail", "m"}, &out), 0);
      QVERIFY2(out.contains("Reads") && out.contains("Errors"), out.constData());
    }

    // The linear's only leg dies while idle: failed within about leg_timeout.
    ex[2]->Kill9();
    QVERIFY2(WaitUntil([&] { return DetailTest(as, "lin") == 2; }, (kLegTimeout + 8) * 1000, 200),
             ArrayDetail(as, "lin").dump().c_str());
    a = ArrayDetail(as, "lin");
    QCOMPARE(ArrayState(a), std::string("failed"));
    QCOMPARE(LegOf(a, 0)["unreachable"], json(true));
    json st = CtlJson(as, {"status", "--json"});
    for (auto& x : st["arrays"])
      if (x["name"] == "lin") QCOMPARE(x["state"], json("failed"));
    QVERIFY(WaitUntil([&] { return !volume_reachable(); }, 10000, 200));  // the volume says so too

    // A mirror leg dies while idle: failed (degraded), no I/O needed.
    ex[1]->Kill9();
    QVERIFY2(WaitUntil([&] { return LegStateOf(ArrayDetail(as, "m"), 1) == "failed"; },
                       (kLegTimeout + 8) * 1000, 200),
             ArrayDetail(as, "m").dump().c_str());
    QCOMPARE(DetailTest(as, "m"), 1);

    // Both exporters come back: the leg is re-added, the linear answers again.
    QVERIFY(ex[1]->Start());
    QVERIFY(ex[2]->Start());
    QVERIFY2(WaitArrayClean(as, "m", 60000, &a), a.dump().c_str());
    QVERIFY2(WaitUntil([&] { return DetailTest(as, "lin") == 0; }, 30000, 200),
             ArrayDetail(as, "lin").dump().c_str());
    QVERIFY(WaitUntil(volume_reachable, 30000, 200));  // its export was restored on restart
    QCOMPARE(as.Terminate(), 0);
  }
};

DST_TEST_MAIN(ArrayHealthTest)
#include "array_health_test.moc"
