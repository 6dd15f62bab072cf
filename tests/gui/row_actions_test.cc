// Tree-row actions (gui/models/row_actions.h) headless: which rows offer which actions (mount
// or unmount by the host's mount, verify or cancel, health check, split-brain resolution on
// the legs of a split-brain array only, nothing for an offline host), and ActionRunner sending
// the right control calls to a scripted dstd through HostSession and HostCalls: the mount path
// asked, the health verdict shown with the detail, resolve's dry-run figure shown before the
// real call (and no real call when declined), errors logged.  Models under
// QAbstractItemModelTester.
#include <QtTest/QtTest>

#include <QTemporaryDir>

#include "device_tree_model.h"
#include "host_calls.h"
#include "host_session.h"
#include "log_model.h"
#include "model_dump.h"
#include "row_actions.h"
#include "scripted_daemon.h"
#include "test_env.h"

using namespace dst::gui;
using dst::test::ScriptedDaemon;
using dst::test::Watched;
using nlohmann::json;

namespace {

json Legs(const char* state) {
  return {{{"slot", 0}, {"spec", "/srv/l0.img"}, {"state", state}, {"out_of_sync_bytes", 0}},
          {{"slot", 1}, {"spec", "dst://127.0.0.1:7400/e1"}, {"state", state}, {"out_of_sync_bytes", 0}}};
}

json Snapshot(bool mounted) {
  json verify = {{"state", "running"}, {"bytes_done", 1}, {"bytes_total", 2}};
  return {{"mount", mounted ? json("/mnt/dst") : json(nullptr)},
          {"exports", json::array()},
          {"volumes", {{{"name", "v1"}, {"size", 4096}, {"state", "connected"}, {"file", nullptr}}}},
          {"arrays",
           {{{"name", "m0"}, {"id", "1"}, {"state", "clean"}, {"size", 4096}, {"legs", Legs("up-to-date")}},
            {{"name", "mv"}, {"id", "2"}, {"state", "clean"}, {"size", 4096}, {"legs", Legs("up-to-date")},
             {"verify", verify}},
            {{"name", "sb"}, {"id", "3"}, {"state", "split-brain"}, {"size", 4096}, {"legs", Legs("up-to-date")}}}}};
}

QModelIndex Find(const QAbstractItemModel& m, const QModelIndex& parent, const QString& name) {
  for (int r = 0; r < m.rowCount(parent); ++r)
    if (m.index(r, 0, parent).data().toString() == name) return m.index(r, 0, parent);
  return {};
}

// "label -> method params" per action.
QStringList Texts(const std::vector<RowAction>& actions) {
  QStringList out;
  for (const auto& a : actions)
    out << a.label + " -> " + a.method + ' ' + QString::fromStdString(a.params.dump());
  return out;
}

struct Rig {
  Rig() : daemon(dir.path() + "/dstd.sock"), session(dir.path() + "/dstd.sock"), calls(&log) {
    daemon.snapshot = Snapshot(false);
    session.setBackoff(20, 100);
    tree.attach(&session);
    calls.addSession(&session);
    session.start();
  }
  QString host() const { return session.path(); }
  QModelIndex row(const QString& name) const { return Find(tree, tree.index(0, 0), name); }
  QTemporaryDir dir;
  ScriptedDaemon daemon;
  HostSession session;
  DeviceTreeModel tree;
  Watched tree_watch{&tree};
  LogModel log;
  Watched log_watch{&log};
  HostCalls calls;
};

}  // namespace

class RowActionsTest : public QObject {
  Q_OBJECT
 private slots:
  void actionsPerRow() {
    DeviceTreeModel tree;
    Watched w(&tree);
    tree.setHost("/h.sock", Snapshot(false));
    const QModelIndex host = tree.index(0, 0);
    const QString mount = "Mount FUSE file system... -> mount {}";
    QCOMPARE(Texts(ActionsFor(host)), QStringList{mount});
    QCOMPARE(Texts(ActionsFor(Find(tree, host, "v1"))), QStringList{mount});
    QCOMPARE(Texts(ActionsFor(Find(tree, host, "m0"))),
             (QStringList{"Start verify -> array.verify {\"name\":\"m0\"}",
                          "Health check -> array.detail {\"name\":\"m0\"}", mount}));
    QCOMPARE(Texts(ActionsFor(Find(tree, host, "mv"))),
             (QStringList{"Cancel verify -> array.verify {\"cancel\":true,\"name\":\"mv\"}",
                          "Health check -> array.detail {\"name\":\"mv\"}", mount}));
    // Legs: resolution only under the split-brain array, keeping that slot.
    QModelIndex m0 = Find(tree, host, "m0"), sb = Find(tree, host, "sb");
    QCOMPARE(Texts(ActionsFor(tree.index(1, 0, m0))), QStringList{mount});
    QCOMPARE(Texts(ActionsFor(tree.index(1, 0, sb))),
             (QStringList{"Resolve split brain: keep leg 1 -> array.resolve {\"keep\":1,\"name\":\"sb\"}", mount}));
    QCOMPARE(ActionsFor(tree.index(0, 0, sb))[0].kind, RowAction::kResolve);
    QCOMPARE(ActionsFor(tree.index(0, 0, sb))[0].host, QStringLiteral("/h.sock"));
    // Mounted: unmount instead; offline: nothing.
    tree.setHost("/h.sock", Snapshot(true));
    QCOMPARE(Texts(ActionsFor(Find(tree, host, "v1"))), QStringList{"Unmount FUSE file system -> unmount {}"});
    tree.setHostOnline("/h.sock", false);
    QVERIFY(ActionsFor(host).empty());
    QVERIFY(ActionsFor(Find(tree, host, "m0")).empty());
    QVERIFY(ActionsFor(QModelIndex()).empty());
  }

  // A shown volume or array file offers a loop device; an attached one offers detaching it, and
  // the info column names it (status `loop_devices`, docs/control.md loop.attach).
  void loopActions() {
    DeviceTreeModel tree;
    Watched w(&tree);
    json st = Snapshot(true);
    st["volumes"][0]["file"] = "/mnt/dst/v1.img";
    st["volumes"][0]["loop_devices"] = json::array();
    st["arrays"][0]["file"] = "/mnt/dst/m0.img";
    st["arrays"][0]["loop_devices"] = {{{"device", "/dev/loop7"}, {"read_only", false}, {"mounted_at", "/srv"}}};
    tree.setHost("/h.sock", st);
    const QModelIndex host = tree.index(0, 0);
    const QString unmount = "Unmount FUSE file system -> unmount {}";
    QCOMPARE(Texts(ActionsFor(Find(tree, host, "v1"))),
             (QStringList{"Attach loop device -> loop.attach {\"name\":\"v1\"}", unmount}));
    QCOMPARE(Texts(ActionsFor(Find(tree, host, "m0"))),
             (QStringList{"Start verify -> array.verify {\"name\":\"m0\"}",
                          "Health check -> array.detail {\"name\":\"m0\"}",
                          "Detach loop device /dev/loop7 -> loop.detach {\"name\":\"m0\"}", unmount}));
    const QModelIndex m0 = Find(tree, host, "m0");
    QCOMPARE(m0.data(DeviceTreeModel::LoopDevicesRole).toStringList(), QStringList{"/dev/loop7"});
    QVERIFY2(m0.siblingAtColumn(DeviceTreeModel::kInfo).data().toString().contains("loop /dev/loop7"),
             qPrintable(m0.siblingAtColumn(DeviceTreeModel::kInfo).data().toString()));
    // Detached outside the GUI (dstctl loop detach): the row follows the next snapshot.
    st["arrays"][0]["loop_devices"] = json::array();
    tree.setHost("/h.sock", st);
    QVERIFY(Find(tree, host, "m0").data(DeviceTreeModel::LoopDevicesRole).toStringList().isEmpty());
    QCOMPARE(Texts(ActionsFor(Find(tree, host, "m0")))[2],
             QStringLiteral("Attach loop device -> loop.attach {\"name\":\"m0\"}"));
    // Legs never offer it (they have no file of their own).
    QCOMPARE(Texts(ActionsFor(tree.index(0, 0, Find(tree, host, "m0")))), QStringList{unmount});
  }

  void runnerCallsTheDaemon() {
    Rig rig;
    QTRY_VERIFY(rig.row("sb").isValid());
    QStringList asked, confirmed, informed;
    bool answer = false;
    ActionRunner runner(&rig.calls,
                        {[&](const QString& suggested) -> std::optional<QString> {
                           asked << suggested;
                           return QStringLiteral("/mnt/x");
                         },
                         [&](const QString&, const QString& q) {
                           confirmed << q;
                           return answer;
                         },
                         [&](const QString& title, const QString& text) { informed << title << text; }});
    auto run = [&](const QString& row, const QString& label) {
      for (const auto& a : ActionsFor(rig.row(row)))
        if (a.label == label) return runner.run(a);
      QFAIL(qPrintable("no action " + label + " on " + row));
    };

    run("m0", "Mount FUSE file system...");
    QTRY_COMPARE(rig.daemon.Requests("mount").size(), std::size_t(1));
    QCOMPARE(asked, QStringList{ActionRunner::kDefaultMount});
    QCOMPARE(rig.daemon.Requests("mount")[0]["params"], json({{"path", "/mnt/x"}}));

    run("m0", "Start verify");
    QTRY_COMPARE(rig.daemon.Requests("array.verify").size(), std::size_t(1));
    QCOMPARE(rig.daemon.Requests("array.verify")[0]["params"], json({{"name", "m0"}}));

    // Health: array.detail, judged and shown.
    json detail = {{"name", "m0"}, {"state", "degraded"}, {"level", "mirror"}, {"legs", Legs("up-to-date")}};
    rig.daemon.replies["array.detail"] = {{"result", detail}};
    run("m0", "Health check");
    QTRY_COMPARE(informed.size(), 2);
    QCOMPARE(rig.daemon.Requests("array.detail")[0]["params"], json({{"name", "m0"}}));
    QCOMPARE(informed[0], QStringLiteral("Health of m0: degraded"));
    QVERIFY(informed[1].contains("degraded"));
    QCOMPARE(rig.log.index(rig.log.rowCount() - 1, 0).data(LogModel::LevelRole).toInt(), int(LogModel::kWarning));

  }

  void resolveShowsTheDryRunFirst() {
    Rig rig;
    QTRY_VERIFY(rig.row("sb").isValid());
    QStringList confirmed;
    bool answer = false;
    ActionRunner runner(&rig.calls,
                        {[](const QString&) { return std::optional<QString>(); },
                         [&](const QString&, const QString& q) {
                           confirmed << q;
                           return answer;
                         },
                         [](const QString&, const QString&) {}});
    rig.daemon.replies["array.resolve"] = {
        {"result",
         {{"bytes_overwritten", 3 << 20},
          {"legs", {{{"slot", 0}, {"spec", "/srv/l0.img"}, {"keep", false}, {"bytes_overwritten", 3 << 20}},
                    {{"slot", 1}, {"spec", "dst://127.0.0.1:7400/e1"}, {"keep", true}, {"bytes_overwritten", 0}}}}}}};
    const RowAction keep1 = ActionsFor(rig.tree.index(1, 0, rig.row("sb")))[0];
    QCOMPARE(keep1.kind, RowAction::kResolve);

    runner.run(keep1);  // declined
    QTRY_COMPARE(confirmed.size(), 1);
    QVERIFY2(confirmed[0].contains("overwrites 3.0 MiB"), qPrintable(confirmed[0]));
    QVERIFY(confirmed[0].contains("leg 0 (/srv/l0.img): 3.0 MiB"));
    QTest::qWait(100);
    QCOMPARE(rig.daemon.Requests("array.resolve").size(), std::size_t(1));
    QCOMPARE(rig.daemon.Requests("array.resolve")[0]["params"], json({{"name", "sb"}, {"keep", 1}, {"dry_run", true}}));

    answer = true;  // accepted: the dry run again, then the real call
    runner.run(keep1);
    QTRY_COMPARE(rig.daemon.Requests("array.resolve").size(), std::size_t(3));
    QCOMPARE(rig.daemon.Requests("array.resolve")[1]["params"]["dry_run"], json(true));
    QCOMPARE(rig.daemon.Requests("array.resolve")[2]["params"], json({{"name", "sb"}, {"keep", 1}}));

    // The dry run refused: no question, an error in the log and failed().
    rig.daemon.replies["array.resolve"] = {{"error", {{"code", "invalid_params"}, {"message", "array sb has no split brain"}}}};
    QSignalSpy failed(&rig.calls, &HostCalls::failed);
    runner.run(keep1);
    QTRY_COMPARE(failed.count(), 1);
    QCOMPARE(confirmed.size(), 2);
    QCOMPARE(rig.daemon.Requests("array.resolve").size(), std::size_t(4));
    const int last = rig.log.rowCount() - 1;
    QCOMPARE(rig.log.index(last, 0).data(LogModel::LevelRole).toInt(), int(LogModel::kError));
    QVERIFY(rig.log.index(last, LogModel::kMessage).data().toString().contains("no split brain"));
  }
};

QTEST_GUILESS_MAIN(RowActionsTest)
#include "row_actions_test.moc"
