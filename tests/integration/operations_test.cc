// Typed operations (issue 10 item 4), through dstctl against a real dstd:
//
//   * Refusals: each refusal reason (unknown_name, exists, leg_in_use, cycle, does_not_fit,
//     read_only_leg, last_good_leg, busy, invalid) comes back as data: `--json` prints the error
//     object with `reasons[]`, each with its code, object and owner; nothing changed.  Several
//     reasons are all listed (also on stderr).
//   * ApplySteps: `apply --dry-run --json` returns typed steps (kind, object, status "not run")
//     and changes nothing; each step applied is pushed as an apply_step event; a step that fails
//     stops the apply (later steps "not run", typed error code); the refusal of a whole plan
//     carries the typed reasons, also for taking the last up-to-date leg of a mirror.
#include <QtTest/QtTest>

#include <unistd.h>

#include <filesystem>

#include "array_helpers.h"
#include "event_tap.h"
#include "test_env.h"

using namespace dst::test;
using nlohmann::json;

namespace {

// `dstctl ARGS --json` that must fail: its exit code and the error object it printed.
json Refused(DaemonProcess& d, const QStringList& args, int* rc, QByteArray* err = nullptr) {
  QByteArray out, e;
  *rc = d.Ctl(args + QStringList{"--json"}, &out, &e);
  if (err) *err = e;
  json j = json::parse(out.toStdString(), nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("error")) {
    qWarning("dstctl %s: rc %d, stdout %s, stderr %s", qPrintable(args.join(' ')), *rc,
             out.constData(), e.constData());
    return json();
  }
  return j["error"];
}

// The first reason with `code`, or null.
json Reason(const json& error, const std::string& code) {
  if (!error.is_object() || !error.contains("reasons")) return json();
  for (auto& r : error["reasons"])
    if (r.value("code", "") == code) return r;
  return json();
}

bool WriteFile(const QString& path, const QString& text) {
  QFile f(path);
  return f.open(QIODevice::WriteOnly | QIODevice::Truncate) &&
         f.write(text.toUtf8()) == text.toUtf8().size();
}

QStringList ExportNames(DaemonProcess& d) {
  QStringList n;
  json list = CtlJson(d, {"export", "list", "--json"});
  for (auto& e : list["exports"]) n << QString::fromStdString(e["name"].get<std::string>());
  n.sort();
  return n;
}

}  // namespace

class OperationsTest : public QObject {
  Q_OBJECT

 private slots:
  void init() { DST_REQUIRE(std::filesystem::exists(BinPath("dstd")), "dstd binary not built"); }

  void Refusals() {
    QTemporaryDir dir;
    DaemonProcess d(dir.path() + "/d");
    QVERIFY(d.Start());
    const QString l0 = dir.path() + "/l0.img", l1 = dir.path() + "/l1.img",
                  l2 = dir.path() + "/l2.img", ro = dir.path() + "/ro.img",
                  small = dir.path() + "/small.img";
    for (auto& p : {l0, l1, l2, ro}) QVERIFY(MakeSparse(p, 16 << 20));
    QVERIFY(MakeSparse(small, 64 << 10));
    QByteArray out, err;
    int rc = 0;
    QCOMPARE(d.Ctl({"array", "create", "m", "--level", "mirror", l0, l1}, &out, &err), 0);

    // unknown_name: the object named, no owner; exit 65 as before.
    json e = Refused(d, {"array", "add-leg", "nosuch", l2}, &rc);
    QCOMPARE(rc, 65);
    QCOMPARE(e.value("code", ""), std::string("not_found"));
    json r = Reason(e, "unknown_name");
    QVERIFY2(r.is_object() && r["object"] == "array:nosuch" && r["owner"].is_null(), e.dump().c_str());

    // exists
    e = Refused(d, {"array", "create", "m", "--level", "mirror", l2, ro}, &rc);
    QCOMPARE(rc, 65);
    QVERIFY2(Reason(e, "exists")["object"] == "array:m", e.dump().c_str());

    // leg_in_use: the owner is the array slot holding the leg (or the export).
    e = Refused(d, {"array", "create", "m2", "--level", "mirror", l0, l2}, &rc);
    QCOMPARE(rc, 75);
    r = Reason(e, "leg_in_use");
    QVERIFY2(r["owner"] == "array:m/slot:0" && r["object"] == "leg:" + l0.toStdString(),
             e.dump().c_str());
    e = Refused(d, {"export", "add", "x", l1, "--read-only"}, &rc);
    QVERIFY2(Reason(e, "leg_in_use")["owner"] == "array:m/slot:1", e.dump().c_str());
    QCOMPARE(d.Ctl({"export", "add", "e2", l2}, &out, &err), 0);
    e = Refused(d, {"array", "add-leg", "m", l2}, &rc);
    QVERIFY2(Reason(e, "leg_in_use")["owner"] == "export:e2", e.dump().c_str());
    QCOMPARE(d.Ctl({"export", "remove", "e2"}, &out, &err), 0);

    // does_not_fit: a leg smaller than the mirror.
    e = Refused(d, {"array", "add-leg", "m", small}, &rc);
    QCOMPARE(rc, 65);
    QVERIFY2(Reason(e, "does_not_fit")["object"] == "leg:" + small.toStdString(), e.dump().c_str());

    // cycle: an array as its own leg, and m under an array that m would then be under.
    e = Refused(d, {"array", "create", "z", "--level", "linear", "array:z"}, &rc);
    QVERIFY2(Reason(e, "cycle").is_object(), e.dump().c_str());
    QCOMPARE(d.Ctl({"array", "create", "lin", "--level", "linear", "array:m"}, &out, &err), 0);
    e = Refused(d, {"array", "add-leg", "m", "array:lin"}, &rc);
    QVERIFY2(Reason(e, "cycle")["object"] == "leg:array:lin", e.dump().c_str());

    // busy: m is a leg of lin.
    e = Refused(d, {"array", "remove", "m"}, &rc);
    QCOMPARE(rc, 75);
    QVERIFY2(Reason(e, "busy")["owner"] == "array:lin/slot:0", e.dump().c_str());
    QCOMPARE(d.Ctl({"array", "remove", "lin"}, &out, &err), 0);

    // read_only_leg: a volume of a read-only export as a mirror leg.
    QCOMPARE(d.Ctl({"export", "add", "rox", ro, "--read-only"}, &out, &err), 0);
    QCOMPARE(d.Ctl({"volume", "import", "rov", DstUri(d, "rox")}, &out, &err), 0);
    e = Refused(d, {"array", "create", "m3", "--level", "mirror", "volume:rov", l2}, &rc);
    QVERIFY2(Reason(e, "read_only_leg")["object"] == "leg:volume:rov", e.dump().c_str());

    // invalid: a bad value, before anything else is looked at.
    e = Refused(d, {"array", "create", "m3", "--level", "mirror", l2, ro, "--region-size", "3K"}, &rc);
    QCOMPARE(rc, 65);
    QVERIFY2(Reason(e, "invalid").is_object(), e.dump().c_str());

    // last_good_leg: failing the only up-to-date leg; the owner is the array.
    QVERIFY(WaitArrayClean(d, "m", 60000));
    QCOMPARE(d.Ctl({"array", "fail-leg", "m", "1"}, &out, &err), 0);
    e = Refused(d, {"array", "fail-leg", "m", "0"}, &rc, &err);
    QCOMPARE(rc, 75);
    r = Reason(e, "last_good_leg");
    QVERIFY2(r["owner"] == "array:m" && r["object"] == "array:m/slot:0", e.dump().c_str());
    QVERIFY2(err.contains("last up-to-date"), err.constData());
    QCOMPARE(LegStateOf(ArrayDetail(d, "m"), 0), std::string("up_to_date"));

    // Several reasons at once: all of them, in the JSON and on stderr.
    e = Refused(d, {"array", "create", "m4", "--level", "mirror", dir.path() + "/none.img", l0},
                &rc, &err);
    QVERIFY2(Reason(e, "unknown_name").is_object() && Reason(e, "leg_in_use").is_object(),
             e.dump().c_str());
    QVERIFY2(err.count('\n') == 3 && err.contains("leg_in_use") && err.contains("array:m/slot:0"),
             err.constData());
    // Nothing of the refused requests exists.
    json list = CtlJson(d, {"array", "list", "--json"});
    QCOMPARE(list["arrays"].size(), std::size_t(1));
    QCOMPARE(d.Terminate(), 0);
  }

  void ApplySteps() {
    QTemporaryDir dir;
    DaemonProcess d(dir.path() + "/d");
    QVERIFY(d.Start());
    const QString e1 = dir.path() + "/e1.img", l0 = dir.path() + "/l0.img",
                  l1 = dir.path() + "/l1.img", file = dir.path() + "/apply.toml";
    for (auto& p : {l0, l1}) QVERIFY(MakeSparse(p, 16 << 20));
    QByteArray out, err;

    // --dry-run --json: typed steps, nothing changed.
    QVERIFY(WriteFile(file, ExportToml("e1", e1, "1M") + ArrayToml("m", "mirror", {l0, l1})));
    QString why;
    json plan = CtlJson(d, {"apply", file, "--dry-run", "--json"}, &why);
    QVERIFY2(plan["steps"].size() == 2, qPrintable(why + QString::fromStdString(plan.dump())));
    QCOMPARE(plan["steps"][0]["kind"], json("create_array"));
    QCOMPARE(plan["steps"][0]["object"], json("array:m"));
    QCOMPARE(plan["steps"][1]["kind"], json("add_export"));
    QCOMPARE(plan["steps"][1]["object"], json("export:e1"));
    for (auto& s : plan["steps"]) QCOMPARE(s["status"], json("not run"));
    QCOMPARE(ExportNames(d), QStringList());
    QVERIFY(!QFile::exists(e1));

    // Applied: every step done, each reported as it finished (apply_step events).
    EventTap tap;
    QVERIFY(tap.Start(d));
    QThread::msleep(1000);  // subscribed (the subscription's reply is not printed)
    json done = CtlJson(d, {"apply", file, "--json"}, &why);
    QVERIFY2(done["steps"].size() == 2 && done["steps"][0]["status"] == "done" &&
                 done["steps"][1]["status"] == "done" && done["failed"] == false,
             qPrintable(why + QString::fromStdString(done.dump())));
    QCOMPARE(ExportNames(d), QStringList{"e1"});
    QByteArray events;
    std::vector<json> steps;
    QVERIFY2(tap.Wait("apply_step", 2, 10000, &steps, &events), events.constData());
    QCOMPARE(steps[0]["kind"], json("create_array"));
    QCOMPARE(steps[0]["status"], json("done"));
    QCOMPARE(steps[1]["kind"], json("add_export"));
    QCOMPARE(steps[1]["object"], json("export:e1"));

    // A whole plan refused: typed reasons with their owners; nothing changed.  (A hard link: the
    // config file itself refuses one path named twice.)
    const QString hard = dir.path() + "/hard.img";
    QVERIFY(::link(l0.toUtf8().constData(), hard.toUtf8().constData()) == 0);
    QVERIFY(WriteFile(file, ExportToml("e1", e1, "1M") + ArrayToml("m", "mirror", {l0, l1}) +
                                ArrayToml("m2", "linear", {hard}) +
                                ExportToml("e2", dir.path() + "/e2.img", "1M")));
    int rc = 0;
    QByteArray jout, jerr;
    rc = d.Ctl({"apply", file, "--json"}, &jout, &jerr);
    QVERIFY2(rc == 75, jerr.constData());
    json e = json::parse(jout.toStdString(), nullptr, false);
    QVERIFY2(e.is_object() && e.contains("error"), jout.constData());
    json r = Reason(e["error"], "leg_in_use");
    QVERIFY2(r["owner"] == "array:m/slot:0", e.dump().c_str());
    QVERIFY2(jerr.contains("nothing changed"), jerr.constData());
    QCOMPARE(ExportNames(d), QStringList{"e1"});

    // Removing both legs of m in one plan would leave it no up-to-date leg: refused whole.
    QVERIFY(WaitArrayClean(d, "m", 60000));
    const QString l2 = dir.path() + "/l2.img", l3 = dir.path() + "/l3.img";
    for (auto& p : {l2, l3}) QVERIFY(MakeSparse(p, 16 << 20));
    QVERIFY(WriteFile(file, ExportToml("e1", e1, "1M") + ArrayToml("m", "mirror", {l2, l3})));
    jout.clear();
    rc = d.Ctl({"apply", file, "--json"}, &jout, &jerr);
    QVERIFY(rc != 0);
    e = json::parse(jout.toStdString(), nullptr, false);
    QVERIFY2(e.is_object() && Reason(e["error"], "last_good_leg").is_object(), jout.constData());
    json m = ArrayDetail(d, "m");
    QCOMPARE(LegStateOf(m, 0), std::string("up_to_date"));
    QCOMPARE(LegStateOf(m, 1), std::string("up_to_date"));

    // A failing step stops the apply: the rest is "not run", the error code typed.
    const quint16 port = FreePort();
    QVERIFY(WriteFile(file, ExportToml("e1", e1, "1M") + ArrayToml("m", "mirror", {l0, l1}) +
                                VolumeToml("rv", QString("dst://127.0.0.1:%1/x").arg(port), 2, 2) +
                                ExportToml("e6", dir.path() + "/e6.img", "1M")));
    jout.clear();
    rc = d.Ctl({"apply", file, "--json"}, &jout, &jerr);
    QVERIFY(rc != 0);
    json res = json::parse(jout.toStdString(), nullptr, false);
    QVERIFY2(res.is_object() && res["failed"] == true && res["steps"].size() == 2, jout.constData());
    QCOMPARE(res["steps"][0]["kind"], json("import_volume"));
    QCOMPARE(res["steps"][0]["status"], json("failed"));
    QVERIFY(res["steps"][0]["error_code"].is_string() && res["steps"][0]["error"].is_string());
    QCOMPARE(res["steps"][1]["kind"], json("add_export"));
    QCOMPARE(res["steps"][1]["status"], json("not run"));
    QCOMPARE(res["done"].size(), std::size_t(0));
    QCOMPARE(ExportNames(d), QStringList{"e1"});
    QVERIFY(!QFile::exists(dir.path() + "/e6.img"));
    QCOMPARE(d.Terminate(), 0);
  }
};

DST_TEST_MAIN(OperationsTest)
#include "operations_test.moc"
