// `batch` (issue 12 item 5, docs/control.md) through `dstctl batch` against a real dstd:
//
//   * Sequenced: an add-leg on an array an earlier operation creates validates; a leg a second
//     operation also wants is refused leg_in_use with that operation's index; stacking planned
//     arrays in a cycle is refused cycle, a leg too small for a planned array does_not_fit,
//     failing every leg of a mirror last_good_leg; a refused batch changes nothing.
//   * DryRun: the plan comes back typed, per operation, and `status` is unchanged.
//   * Run: every step runs, each pushed as an apply_step event (source batch, op index).
//   * FailingStep: a step that fails (an unreachable remote) stops the run; later steps are
//     "not run", the error names the operation and step.
#include <QtTest/QtTest>

#include <filesystem>

#include "array_helpers.h"
#include "event_tap.h"
#include "test_env.h"

using namespace dst::test;
using nlohmann::json;

namespace {

json Op(const std::string& method, json params) {
  return json{{"method", method}, {"params", std::move(params)}};
}

json Mirror(const std::string& name, const std::vector<std::string>& legs) {
  return Op("array.create", {{"name", name}, {"level", "mirror"}, {"legs", legs}, {"assume_clean", true}});
}

// `dstctl batch FILE [--dry-run] --json`: the result (also when the exit code is not 0).
json Batch(DaemonProcess& d, const QString& dir, const json& ops, bool dry_run, int* rc,
           QByteArray* err = nullptr) {
  const QString file = dir + "/ops.json";
  QFile f(file);
  if (!f.open(QIODevice::WriteOnly | QIODevice::Truncate)) return json();
  f.write(QByteArray::fromStdString(ops.dump()));
  f.close();
  QStringList args{"batch", file, "--json"};
  if (dry_run) args << "--dry-run";
  QByteArray out, e;
  *rc = d.Ctl(args, &out, &e);
  if (err) *err = e;
  json j = json::parse(out.toStdString(), nullptr, false);
  if (j.is_discarded()) qWarning("dstctl batch: rc %d, stdout %s, stderr %s", *rc, out.constData(), e.constData());
  return j.is_discarded() ? json() : j;
}

std::string P(const QString& s) { return s.toStdString(); }

// n sparse 16 MiB images <dir>/l<i>.img (fewer when one cannot be made).
std::vector<std::string> Legs(const QString& dir, int n) {
  std::vector<std::string> l;
  for (int i = 0; i < n; ++i) {
    QString p = QString("%1/l%2.img").arg(dir).arg(i);
    if (!MakeSparse(p, 16 << 20)) break;
    l.push_back(P(p));
  }
  return l;
}

}  // namespace

class BatchTest : public QObject {
  Q_OBJECT

 private slots:
  void init() {
    DST_REQUIRE(std::filesystem::exists(BinPath("dstd")) && std::filesystem::exists(BinPath("dstctl")),
                "dstd and dstctl not built");
  }

  void Sequenced() {
    QTemporaryDir dir;
    DaemonProcess d(dir.path() + "/d");
    QVERIFY(d.Start());
    std::vector<std::string> l = Legs(dir.path(), 5);
    QCOMPARE(l.size(), std::size_t(5));
    int rc = 0;
    QByteArray err;
    // create m1 from l0,l1 then add l2 to m1: valid only because the first is planned.
    json ok = Batch(d, dir.path(), {Mirror("m1", {l[0], l[1]}), Op("array.add_leg", {{"name", "m1"}, {"leg", l[2]}})},
                    true, &rc, &err);
    QVERIFY2(rc == 0 && ok.value("valid", false), (err + QByteArray::fromStdString(ok.dump())).constData());
    QCOMPARE(ok["ops"].size(), std::size_t(2));
    QCOMPARE(ok["ops"][1]["steps"][0]["kind"], json("add_leg"));
    QCOMPARE(ok["refusals"].size(), std::size_t(0));

    // A second operation wanting l1 again: leg_in_use, op 1, held by the first's slot 1.
    json used = Batch(d, dir.path(), {Mirror("m1", {l[0], l[1]}), Mirror("m2", {l[1], l[3]})}, true, &rc, &err);
    QVERIFY2(rc == 75, err.constData());
    QCOMPARE(used["valid"], json(false));
    QCOMPARE(used["refusals"].size(), std::size_t(1));
    QCOMPARE(used["refusals"][0]["code"], json("leg_in_use"));
    QCOMPARE(used["refusals"][0]["op"], json(1));
    QCOMPARE(used["refusals"][0]["owner"], json("array:m1/slot:1"));
    QCOMPARE(used["ops"][0]["status"], json("not run"));
    QCOMPARE(used["ops"][1]["status"], json("refused"));
    QVERIFY2(err.contains("operation 1 (array.create) refused: leg_in_use"), err.constData());

    // A cycle through planned arrays: m1 <- m2 (m2 has m1 as a leg), then m1 takes m2.
    json cyc = Batch(d, dir.path(),
                     {Mirror("m1", {l[0], l[1]}), Mirror("m2", {"array:m1", l[3]}),
                      Op("array.add_leg", {{"name", "m1"}, {"leg", "array:m2"}})},
                     false, &rc, &err);
    QVERIFY(rc != 0);
    QCOMPARE(cyc["refusals"].size(), std::size_t(1));
    QCOMPARE(cyc["refusals"][0]["code"], json("cycle"));
    QCOMPARE(cyc["refusals"][0]["op"], json(2));
    // Not a dry run, but refused: nothing changed.
    QCOMPARE(CtlJson(d, {"array", "list", "--json"})["arrays"].size(), std::size_t(0));

    // A name two operations create: exists for the second.
    json twice = Batch(d, dir.path(), {Mirror("m1", {l[0], l[1]}), Mirror("m1", {l[3], l[4]})}, true, &rc);
    QCOMPARE(twice["refusals"].size(), std::size_t(1));
    QCOMPARE(twice["refusals"][0]["code"], json("exists"));
    QCOMPARE(twice["refusals"][0]["op"], json(1));

    // does_not_fit against the planned array's size: a 64 KiB leg for a 16 MiB mirror.
    const QString small = dir.path() + "/small.img";
    QVERIFY(MakeSparse(small, 64 << 10));
    json fit = Batch(d, dir.path(), {Mirror("m1", {l[0], l[1]}), Op("array.add_leg", {{"name", "m1"}, {"leg", P(small)}})},
                     true, &rc);
    QCOMPARE(fit["refusals"].size(), std::size_t(1));
    QCOMPARE(fit["refusals"][0]["code"], json("does_not_fit"));
    QCOMPARE(fit["refusals"][0]["op"], json(1));

    // A cycle through a stack an earlier operation plans onto existing arrays (the GUI's second
    // drop): x takes array:y (y's 20 MiB legs fit x), then y takes array:x -> cycle, op 1.
    for (const char* n : {"x0", "x1", "y0", "y1"})
      QVERIFY(MakeSparse(dir.path() + "/" + n + ".img", n[0] == 'y' ? 20 << 20 : 16 << 20));
    QVERIFY2(d.Ctl({"array", "create", "x", "--level", "mirror", "--assume-clean", dir.path() + "/x0.img",
                    dir.path() + "/x1.img"}, nullptr, &err) == 0, err.constData());
    QVERIFY2(d.Ctl({"array", "create", "y", "--level", "mirror", "--assume-clean", dir.path() + "/y0.img",
                    dir.path() + "/y1.img"}, nullptr, &err) == 0, err.constData());
    json stack = Batch(d, dir.path(),
                       {Op("array.add_leg", {{"name", "x"}, {"leg", "array:y"}}),
                        Op("array.add_leg", {{"name", "y"}, {"leg", "array:x"}})}, true, &rc);
    QVERIFY2(stack["refusals"].size() == 1, stack.dump().c_str());
    QCOMPARE(stack["refusals"][0]["code"], json("cycle"));
    QCOMPARE(stack["refusals"][0]["op"], json(1));
    QVERIFY(d.Ctl({"array", "remove", "x"}) == 0 && d.Ctl({"array", "remove", "y"}) == 0);

    // last_good_leg counts the legs earlier operations fail.
    QVERIFY2(d.Ctl({"array", "create", "live", "--level", "mirror", "--assume-clean",
                    QString::fromStdString(l[3]), QString::fromStdString(l[4])}, nullptr, &err) == 0,
             err.constData());
    json last = Batch(d, dir.path(),
                      {Op("array.fail_leg", {{"name", "live"}, {"slot", 0}}),
                       Op("array.fail_leg", {{"name", "live"}, {"slot", 1}})}, false, &rc);
    QCOMPARE(last["refusals"].size(), std::size_t(1));
    QCOMPARE(last["refusals"][0]["code"], json("last_good_leg"));
    QCOMPARE(last["refusals"][0]["op"], json(1));
    json live = ArrayDetail(d, "live");
    QCOMPARE(LegStateOf(live, 0), std::string("up_to_date"));
  }

  void DryRunAndRun() {
    QTemporaryDir dir;
    DaemonProcess d(dir.path() + "/d");
    QVERIFY(d.Start());
    std::vector<std::string> l = Legs(dir.path(), 3);
    QCOMPARE(l.size(), std::size_t(3));
    const json ops = {Mirror("m1", {l[0], l[1]}), Op("array.add_leg", {{"name", "m1"}, {"leg", l[2]}}),
                      Op("export.add", {{"name", "e1"}, {"array", "m1"}, {"allow", {"anonymous:rw"}}})};
    json before = CtlJson(d, {"status", "--json"});
    int rc = 0;
    QByteArray err;
    json plan = Batch(d, dir.path(), ops, true, &rc, &err);
    QVERIFY2(rc == 0 && plan["valid"] == true, (err + QByteArray::fromStdString(plan.dump())).constData());
    QCOMPARE(plan["dry_run"], json(true));
    QCOMPARE(plan["steps"].size(), std::size_t(3));
    for (auto& s : plan["steps"]) QCOMPARE(s["status"], json("not run"));
    json after = CtlJson(d, {"status", "--json"});
    QCOMPARE(after["arrays"], before["arrays"]);
    QCOMPARE(after["exports"], before["exports"]);
    QCOMPARE(after["arrays"].size(), std::size_t(0));

    EventTap tap;
    QVERIFY(tap.Start(d));
    QThread::msleep(1000);  // subscribed (the subscription's reply is not printed)
    json run = Batch(d, dir.path(), ops, false, &rc, &err);
    QVERIFY2(rc == 0 && run["failed"] == false, (err + QByteArray::fromStdString(run.dump())).constData());
    QCOMPARE(run["done"].size(), std::size_t(3));
    for (auto& o : run["ops"]) QCOMPARE(o["status"], json("done"));
    json m1 = ArrayDetail(d, "m1");
    QCOMPARE(m1["legs"].size(), std::size_t(3));
    QCOMPARE(CtlJson(d, {"export", "list", "--json"})["exports"].size(), std::size_t(1));
    QByteArray events;
    std::vector<json> steps;
    QVERIFY2(tap.Wait("apply_step", 3, 10000, &steps, &events), events.constData());
    const char* kinds[] = {"create_array", "add_leg", "add_export"};
    for (int i = 0; i < 3; ++i) {
      QCOMPARE(steps[i]["kind"], json(kinds[i]));
      QCOMPARE(steps[i]["status"], json("done"));
      QCOMPARE(steps[i]["source"], json("batch"));
      QCOMPARE(steps[i]["op"], json(i));
    }
  }

  void FailingStep() {
    QTemporaryDir dir;
    DaemonProcess d(dir.path() + "/d");
    QVERIFY(d.Start());
    const QString l0 = dir.path() + "/l0.img", l1 = dir.path() + "/l1.img";
    for (auto& p : {l0, l1}) QVERIFY(MakeSparse(p, 16 << 20));
    const quint16 port = FreePort();  // nobody listens: the import fails at its step
    const json ops = {Mirror("m1", {P(l0), P(l1)}),
                      Op("volume.import", {{"name", "rv"}, {"uri", fmt_uri(port)}}),
                      Op("export.add", {{"name", "e1"}, {"array", "m1"}, {"allow", {"anonymous:rw"}}})};
    int rc = 0;
    QByteArray err;
    json res = Batch(d, dir.path(), ops, false, &rc, &err);
    QVERIFY2(rc != 0 && res["failed"] == true, (err + QByteArray::fromStdString(res.dump())).constData());
    QCOMPARE(res["failed_op"], json(1));
    QCOMPARE(res["failed_step"]["status"], json("failed"));
    QCOMPARE(res["ops"][0]["status"], json("done"));
    QCOMPARE(res["ops"][1]["status"], json("failed"));
    QCOMPARE(res["ops"][2]["status"], json("not run"));
    QCOMPARE(res["steps"][2]["status"], json("not run"));
    QCOMPARE(res["done"].size(), std::size_t(1));
    QVERIFY2(res["error"].get<std::string>().find("operation 1 (volume.import)") != std::string::npos,
             res["error"].dump().c_str());
    QVERIFY2(err.contains("dstctl: batch: operation 1"), err.constData());
    // The first step's array exists, the export after the failure does not.
    QCOMPARE(CtlJson(d, {"array", "list", "--json"})["arrays"].size(), std::size_t(1));
    QCOMPARE(CtlJson(d, {"export", "list", "--json"})["exports"].size(), std::size_t(0));
  }

 private:
  static std::string fmt_uri(quint16 port) { return "dst://127.0.0.1:" + std::to_string(port) + "/x"; }
};

DST_TEST_MAIN(BatchTest)
#include "batch_test.moc"
