// Staged drag and drop in dst-gui's window (offscreen) against a real dstd (label gui): QTest
// mouse drags on the canvas stage typed operations through the engine's dry run (an export onto
// a mirror -> array.add_leg with the export's dst:// URI; an export onto the empty canvas ->
// array.create with a level from hello's layers; an array onto another -> a stacked leg);
// invalid drops (the same leg twice, stacked arrays that do not fit, a leg onto an array) are refused with the reason shown at the drop point and logged,
// and nothing is staged; the dock's Undo/Redo buttons and Ctrl+Z / Ctrl+Shift+Z; nothing changes
// on the host before Apply; Apply through the dialog shows the plan, runs it step by step and
// the new leg and array appear in the window.  A leg dragged out stages a detach; a failing
// step stops the run with its error in the dialog and the log.
#include <QtTest/QtTest>

#include <QLabel>
#include <QListView>
#include <QListWidget>
#include <QPushButton>
#include <QAbstractProxyModel>
#include <QMimeData>
#include <QTreeView>
#include <memory>
#include <filesystem>

#include "canvas_drag.h"
#include "daemon_process.h"
#include "device_tree_model.h"
#include "drop_controller.h"
#include "log_model.h"
#include "main_window.h"
#include "pending_ops_model.h"
#include "pending_ops_pane.h"
#include "test_env.h"
#include "topology_canvas.h"
#include "topology_graph.h"

using namespace dst::gui;
using namespace dst::test;
using nlohmann::json;

namespace {

bool MakeImage(const QString& path, qint64 size) {
  QFile f(path);
  return f.open(QIODevice::WriteOnly) && f.resize(size);
}

int LegCount(DaemonProcess& d, const std::string& array) {
  QByteArray out;
  if (d.Ctl({"array", "list", "--json"}, &out) != 0) return -1;
  json j = json::parse(out.toStdString(), nullptr, false);
  if (!j.is_object()) return -1;
  for (const json& a : j.value("arrays", json::array()))
    if (a.value("name", "") == array) return static_cast<int>(a.value("legs", json::array()).size());
  return 0;
}

// l0.img and l1.img (16 MiB) in `dir`, `d` started, optionally export e1, mirror m0 over l0 and l1.
bool StartWithMirror(const QString& dir, DaemonProcess& d, bool export_e1) {
  for (const char* n : {"l0", "l1"})
    if (!MakeImage(dir + "/" + n + ".img", qint64(16) << 20)) return false;
  if (!d.Start()) {
    qWarning("%s", d.Log().right(2000).constData());
    return false;
  }
  QByteArray out, err;
  if (export_e1 && d.Ctl({"export", "add", "e1", dir + "/e1.img", "--size", "16M"}, &out, &err) != 0) {
    qWarning("%s", err.constData());
    return false;
  }
  if (d.Ctl({"array", "create", "m0", "--level", "mirror", "--assume-clean", dir + "/l0.img", dir + "/l1.img"}, &out,
            &err) != 0) {
    qWarning("%s", err.constData());
    return false;
  }
  return true;
}

bool LogHas(LogModel* log, const QString& text) {
  for (int r = 0; r < log->rowCount(); ++r)
    for (int c = 0; c < log->columnCount(); ++c)
      if (log->index(r, c).data().toString().contains(text)) return true;
  return false;
}

}  // namespace

class StagedDropTest : public QObject {
  Q_OBJECT
 private slots:
  void dropStageUndoApply() {
    DST_REQUIRE(std::filesystem::exists(BinPath("dstd")) && std::filesystem::exists(BinPath("dstctl")),
                "dstd and dstctl not built");
    QTemporaryDir dir;
    QVERIFY(dir.isValid());
    for (const char* n : {"l0", "l1", "l2", "l3", "l4", "l5"})
      QVERIFY(MakeImage(dir.path() + "/" + n + ".img", qint64(n[1] >= '4' ? 20 : 16) << 20));
    DaemonProcess d(dir.path() + "/a");
    QVERIFY2(d.Start(), d.Log().right(2000).constData());
    QByteArray out, err;
    QVERIFY2(d.Ctl({"export", "add", "e1", dir.path() + "/e1.img", "--size", "16M"}, &out, &err) == 0, err.constData());
    QVERIFY2(d.Ctl({"export", "add", "tiny", dir.path() + "/tiny.img", "--size", "1M"}, &out, &err) == 0, err.constData());
    QVERIFY2(d.Ctl({"array", "create", "m0", "--level", "mirror", "--assume-clean", dir.path() + "/l0.img",
                    dir.path() + "/l1.img"}, &out, &err) == 0, err.constData());
    QVERIFY2(d.Ctl({"array", "create", "s1", "--level", "mirror", "--assume-clean", dir.path() + "/l2.img",
                    dir.path() + "/l3.img"}, &out, &err) == 0, err.constData());
    QVERIFY2(d.Ctl({"array", "create", "b1", "--level", "mirror", "--assume-clean", dir.path() + "/l4.img",
                    dir.path() + "/l5.img"}, &out, &err) == 0, err.constData());

    const QString host = d.control_socket();
    MainWindow w({host});
    // The questions a drop asks, scripted: the levels offered are recorded.
    QStringList levels_offered;
    DropController::Ui ui;
    ui.askCreate = [&](const QStringList& levels, const QStringList& hosts, const QStringList&,
                       const DropChoices& defaults) -> std::optional<DropChoices> {
      levels_offered = levels;
      if (hosts != QStringList{host} || defaults.host != host) return std::nullopt;
      DropChoices c = defaults;
      c.level = "linear";
      c.name = "lin";
      return c;
    };
    ui.askRemoveLeg = [](const QString&) { return std::optional<bool>(); };
    w.drops()->setUi(ui);
    w.resize(1600, 1600);
    w.show();
    QVERIFY(QTest::qWaitForWindowExposed(&w));
    TopologyCanvas* canvas = w.canvas();
    const QString e1 = TopologyGraph::ObjectKey(host, "export", "e1");
    const QString tiny = TopologyGraph::ObjectKey(host, "export", "tiny");
    const QString m0 = TopologyGraph::ObjectKey(host, "array", "m0");
    QTRY_VERIFY_WITH_TIMEOUT(canvas->itemOf(e1) && canvas->itemOf(tiny) && canvas->itemOf(m0) &&
                                 canvas->itemOf(TopologyGraph::ObjectKey(host, "array", "b1")), 10000);
    PendingOpsPane* pane = w.pendingPane();
    PendingOpsModel* model = pane->model(host);
    QVERIFY(model);
    QSignalSpy refused(w.drops(), &DropController::refused);

    // An export onto the mirror: the add-leg is staged, as its dst:// URI.
    Drag(canvas, e1, Center(canvas, m0));
    QTRY_COMPARE_WITH_TIMEOUT(model->rowCount(), 1, 5000);
    const std::string uri = "dst://127.0.0.1:" + std::to_string(d.port()) + "/e1";
    QCOMPARE(model->ops()[0], (json{{"method", "array.add_leg"}, {"params", {{"name", "m0"}, {"leg", uri}}}}));
    QCOMPARE(refused.count(), 0);
    QCOMPARE(pane->currentHost(), host);
    QCOMPARE(pane->view()->model(), model);

    // The same leg again: the engine refuses; the reason shows at the drop point; nothing staged.
    const QPoint at = Center(canvas, m0) + QPoint(5, 3);
    Drag(canvas, e1, at);
    QTRY_COMPARE_WITH_TIMEOUT(refused.count(), 1, 5000);
    QCOMPARE(model->rowCount(), 1);
    const QString reason = refused[0][0].toString();
    QVERIFY2(reason.contains("leg_in_use") || reason.contains("in use"), qPrintable(reason));
    QCOMPARE(canvas->refusalText(), "Refused: " + reason);
    QCOMPARE(canvas->refusalPos(), canvas->mapToScene(at) + QPointF(8, 8));
    QVERIFY(LogHas(w.logModel(), "drop refused: " + reason));

    // Stacking: s1 (over 16 MiB files, less data than m0 needs) does not fit; b1 (20 MiB legs)
    // is staged, and m0 onto b1 then closes a cycle through the staged stack: refused as one
    // (the engine counts the batch's planned legs).  Refusals show their reason; nothing is staged.
    const QString s1 = TopologyGraph::ObjectKey(host, "array", "s1");
    const QString b1 = TopologyGraph::ObjectKey(host, "array", "b1");
    Drag(canvas, s1, Center(canvas, m0));
    QTRY_COMPARE_WITH_TIMEOUT(refused.count(), 2, 5000);
    QVERIFY2(canvas->refusalText().contains("does_not_fit"), qPrintable(canvas->refusalText()));
    QCOMPARE(model->rowCount(), 1);
    Drag(canvas, b1, Center(canvas, m0));
    QTRY_VERIFY_WITH_TIMEOUT(model->rowCount() == 2 || refused.count() == 3, 5000);
    QVERIFY2(model->rowCount() == 2, qPrintable(canvas->refusalText()));
    QCOMPARE(model->ops()[1], (json{{"method", "array.add_leg"}, {"params", {{"name", "m0"}, {"leg", "array:b1"}}}}));
    Drag(canvas, m0, Center(canvas, b1));
    QTRY_COMPARE_WITH_TIMEOUT(refused.count(), 3, 5000);
    QVERIFY2(canvas->refusalText().contains("cycle"), qPrintable(canvas->refusalText()));
    QCOMPARE(model->rowCount(), 2);

    // A leg onto an array: refused by the mapper, with its reason.
    Drag(canvas, TopologyGraph::LegKey(host, "m0", 0), Center(canvas, m0));
    QCOMPARE(refused.count(), 4);
    QVERIFY(canvas->refusalText().contains("detaching"));
    QVERIFY(LogHas(w.logModel(), "detaching"));
    QCOMPARE(model->rowCount(), 2);

    // Undo and redo: the buttons, then the shortcuts.
    QVERIFY(pane->undoButton()->isEnabled());
    QVERIFY(!pane->redoButton()->isEnabled());
    QTest::mouseClick(pane->undoButton(), Qt::LeftButton);
    QTest::mouseClick(pane->undoButton(), Qt::LeftButton);
    QCOMPARE(model->rowCount(), 0);
    QVERIFY(!pane->undoButton()->isEnabled());
    QVERIFY(pane->redoButton()->isEnabled());
    QVERIFY(!pane->applyButton()->isEnabled());
    QTest::mouseClick(pane->redoButton(), Qt::LeftButton);
    QCOMPARE(model->rowCount(), 1);
    w.activateWindow();
    QVERIFY(QTest::qWaitForWindowActive(&w));
    QTest::keyClick(&w, Qt::Key_Z, Qt::ControlModifier);
    QCOMPARE(model->rowCount(), 0);
    QTest::keyClick(&w, Qt::Key_Z, Qt::ControlModifier | Qt::ShiftModifier);
    QTest::keyClick(&w, Qt::Key_Z, Qt::ControlModifier | Qt::ShiftModifier);
    QCOMPARE(model->rowCount(), 2);
    QCOMPARE(model->ops()[1]["params"]["leg"], json("array:b1"));
    // Remove drops the selected row; undo brings it back.
    pane->view()->setCurrentIndex(model->index(1));
    QTest::mouseClick(pane->removeButton(), Qt::LeftButton);
    QCOMPARE(model->rowCount(), 1);
    QTest::mouseClick(pane->undoButton(), Qt::LeftButton);
    QCOMPARE(model->rowCount(), 2);

    // An export onto the empty canvas: a new array, its level from hello's layer registry.
    const QPoint empty(canvas->viewport()->width() - 10, canvas->viewport()->height() - 10);
    QString target;
    QVERIFY(canvas->dropTargetAt(canvas->mapToScene(empty), &target));
    Drag(canvas, tiny, empty);
    QTRY_COMPARE_WITH_TIMEOUT(model->rowCount(), 3, 5000);
    QVERIFY(levels_offered.contains("mirror") && levels_offered.contains("linear") && levels_offered.contains("raid0"));
    QCOMPARE(model->ops()[2]["method"], json("array.create"));
    QCOMPARE(model->ops()[2]["params"]["level"], json("linear"));
    QCOMPARE(model->ops()[2]["params"]["legs"],
             json::array({"dst://127.0.0.1:" + std::to_string(d.port()) + "/tiny"}));

    // Nothing on the host has changed.
    QCOMPARE(LegCount(d, "m0"), 2);
    QCOMPARE(LegCount(d, "lin"), 0);

    // Apply: the dialog shows the plan, runs it step by step, reports.
    QTest::mouseClick(pane->applyButton(), Qt::LeftButton);
    QTRY_VERIFY_WITH_TIMEOUT(pane->applyDialog() && pane->applyDialog()->planLoaded(), 5000);
    ApplyDialog* dlg = pane->applyDialog();
    QVERIFY(dlg->steps()->count() >= 3);
    QVERIFY2(dlg->steps()->item(0)->text().contains(QString::fromStdString(uri)),
             qPrintable(dlg->steps()->item(0)->text()));
    QCOMPARE(LegCount(d, "m0"), 2);
    QTest::mouseClick(dlg->runButton(), Qt::LeftButton);
    QTRY_VERIFY_WITH_TIMEOUT(dlg->finished(), 30000);
    QVERIFY2(dlg->summary()->text().startsWith("Applied"), qPrintable(dlg->summary()->text()));
    for (int r = 0; r < dlg->steps()->count(); ++r)
      QVERIFY2(dlg->steps()->item(r)->text().startsWith("✓ "), qPrintable(dlg->steps()->item(r)->text()));
    QCOMPARE(model->rowCount(), 0);
    QCOMPARE(LegCount(d, "m0"), 4);
    QCOMPARE(LegCount(d, "lin"), 1);
    // The window follows: the new leg and array are on the canvas.
    QTRY_VERIFY_WITH_TIMEOUT(canvas->itemOf(TopologyGraph::LegKey(host, "m0", 2)) &&
                                 canvas->itemOf(TopologyGraph::ObjectKey(host, "array", "lin")),
                             10000);
  }

  // A leg dragged out asks detach or remove and stages that; Apply stops at the first failed
  // step with its error, the steps after it not run.
  void legOutAndFailedApply() {
    DST_REQUIRE(std::filesystem::exists(BinPath("dstd")) && std::filesystem::exists(BinPath("dstctl")),
                "dstd and dstctl not built");
    QTemporaryDir dir;
    QVERIFY(dir.isValid());
    DaemonProcess d(dir.path() + "/a");
    QVERIFY(StartWithMirror(dir.path(), d, false));
    QByteArray out, err;
    const QString host = d.control_socket();
    MainWindow w({host});
    QStringList asked;
    DropController::Ui ui;
    ui.askRemoveLeg = [&](const QString& leg) {
      asked << leg;
      return std::optional<bool>(false);  // detach
    };
    w.drops()->setUi(ui);
    w.resize(1600, 1200);
    w.show();
    QVERIFY(QTest::qWaitForWindowExposed(&w));
    TopologyCanvas* canvas = w.canvas();
    const QString leg1 = TopologyGraph::LegKey(host, "m0", 1);
    QTRY_VERIFY_WITH_TIMEOUT(canvas->itemOf(leg1), 10000);
    PendingOpsModel* model = w.pendingPane()->model(host);
    Drag(canvas, leg1, QPoint(canvas->viewport()->width() - 10, canvas->viewport()->height() - 10));
    QTRY_COMPARE_WITH_TIMEOUT(model->rowCount(), 1, 5000);
    QCOMPARE(asked, QStringList{"leg 1 of m0"});
    QCOMPARE(model->ops()[0], (json{{"method", "array.detach_leg"}, {"params", {{"name", "m0"}, {"slot", 1}}}}));

    // Then an import of a remote nobody serves (staged directly: no drop makes one) and an
    // export after it: the run stops at the import.
    const std::string uri = "dst://127.0.0.1:" + std::to_string(FreePort()) + "/x";
    model->stage(json{{"method", "volume.import"}, {"params", {{"name", "rv"}, {"uri", uri}}}});
    model->stage(json{{"method", "export.add"},
                      {"params", {{"name", "e2"}, {"path", (dir.path() + "/e2.img").toStdString()},
                                  {"size", "1M"}, {"allow", {"anonymous:rw"}}}}});
    QTRY_COMPARE_WITH_TIMEOUT(model->rowCount(), 3, 5000);
    QTest::mouseClick(w.pendingPane()->applyButton(), Qt::LeftButton);
    QTRY_VERIFY_WITH_TIMEOUT(w.pendingPane()->applyDialog() && w.pendingPane()->applyDialog()->planLoaded(), 5000);
    ApplyDialog* dlg = w.pendingPane()->applyDialog();
    QCOMPARE(dlg->steps()->count(), 3);
    QTest::mouseClick(dlg->runButton(), Qt::LeftButton);
    QTRY_VERIFY_WITH_TIMEOUT(dlg->finished(), 30000);
    const QString summary = dlg->summary()->text();
    QVERIFY2(summary.startsWith("Stopped at the first error") && summary.contains("volume.import") &&
                 summary.contains("1 step(s) done"),
             qPrintable(summary));
    QVERIFY2(dlg->steps()->item(0)->text().startsWith("✓ "), qPrintable(dlg->steps()->item(0)->text()));
    QVERIFY2(dlg->steps()->item(1)->text().startsWith("✗ "), qPrintable(dlg->steps()->item(1)->text()));
    QVERIFY(!dlg->steps()->item(2)->text().startsWith("✓ ") && !dlg->steps()->item(2)->text().startsWith("… "));
    QVERIFY(LogHas(w.logModel(), "Stopped at the first error"));
    QCOMPARE(model->rowCount(), 2);  // the failed import and the export after it stay
    QCOMPARE(d.Ctl({"export", "list", "--json"}, &out), 0);
    QVERIFY2(!out.contains("\"e2\""), out.constData());
  }

  // The tree view's path (mimeData / dropMimeData through the window's proxy, what a QTreeView
  // drag does): an export onto the mirror stages the add-leg; the same export again and a mirror
  // onto itself are refused by the engine with their reasons, shown on the canvas and logged.
  void treeMimeDrops() {
    DST_REQUIRE(std::filesystem::exists(BinPath("dstd")) && std::filesystem::exists(BinPath("dstctl")),
                "dstd and dstctl not built");
    QTemporaryDir dir;
    QVERIFY(dir.isValid());
    DaemonProcess d(dir.path() + "/a");
    QVERIFY(StartWithMirror(dir.path(), d, true));
    const QString host = d.control_socket();
    MainWindow w({host});
    DropController::Ui ui;
    ui.askRemoveLeg = [](const QString&) { return std::optional<bool>(false); };  // detach
    w.drops()->setUi(ui);
    w.resize(1600, 1200);
    w.show();
    QVERIFY(QTest::qWaitForWindowExposed(&w));
    const QString e1 = TopologyGraph::ObjectKey(host, "export", "e1");
    const QString m0 = TopologyGraph::ObjectKey(host, "array", "m0");
    QTRY_VERIFY_WITH_TIMEOUT(w.indexOfNode(e1).isValid() && w.indexOfNode(m0).isValid() &&
                                 w.canvas()->itemOf(m0), 10000);
    // Through the view's model (the OfflineTint proxy), as QTreeView's drag and drop does.
    QAbstractItemModel* view_model = w.findChild<QTreeView*>()->model();
    QVERIFY(view_model != static_cast<QAbstractItemModel*>(w.deviceModel()));
    auto proxy_index = [&](const QString& key) {
      const QModelIndex src = w.indexOfNode(key);
      return static_cast<QAbstractProxyModel*>(view_model)->mapFromSource(src);
    };
    PendingOpsModel* model = w.pendingPane()->model(host);
    QSignalSpy refused(w.drops(), &DropController::refused);
    std::unique_ptr<QMimeData> md(view_model->mimeData({proxy_index(e1)}));
    QVERIFY(md && view_model->canDropMimeData(md.get(), Qt::CopyAction, -1, -1, proxy_index(m0)));
    view_model->dropMimeData(md.get(), Qt::CopyAction, -1, -1, proxy_index(m0));
    QTRY_COMPARE_WITH_TIMEOUT(model->rowCount(), 1, 5000);
    const std::string uri = "dst://127.0.0.1:" + std::to_string(d.port()) + "/e1";
    QCOMPARE(model->ops()[0], (json{{"method", "array.add_leg"}, {"params", {{"name", "m0"}, {"leg", uri}}}}));
    // Again: the engine's dry run says the leg is in use; nothing more is staged.
    view_model->dropMimeData(md.get(), Qt::CopyAction, -1, -1, proxy_index(m0));
    QTRY_COMPARE_WITH_TIMEOUT(refused.count(), 1, 5000);
    QVERIFY2(refused[0][0].toString().contains("in use") || refused[0][0].toString().contains("leg_in_use"),
             qPrintable(refused[0][0].toString()));
    QCOMPARE(w.canvas()->refusalText(), "Refused: " + refused[0][0].toString());
    QCOMPARE(w.canvas()->refusalPos(), w.canvas()->nodeRect(m0).center() + QPointF(8, 8));
    // m0 onto itself: a cycle, refused (by the mapper or the engine) with a reason naming it.
    std::unique_ptr<QMimeData> self(view_model->mimeData({proxy_index(m0)}));
    view_model->dropMimeData(self.get(), Qt::CopyAction, -1, -1, proxy_index(m0));
    QTRY_COMPARE_WITH_TIMEOUT(refused.count(), 2, 5000);
    QVERIFY2(refused[1][0].toString().contains("m0"), qPrintable(refused[1][0].toString()));
    QVERIFY(LogHas(w.logModel(), "drop refused: " + refused[1][0].toString()));
    QCOMPARE(model->rowCount(), 1);
    // An export row is no drop target.
    QVERIFY(!view_model->canDropMimeData(md.get(), Qt::CopyAction, -1, -1, proxy_index(e1)));

    // The last good leg: with leg 1 failed, dragging leg 0 out (to the empty area) is refused
    // by the engine as last_good_leg.
    QByteArray out, err;
    QVERIFY2(d.Ctl({"array", "fail-leg", "m0", "1"}, &out, &err) == 0, err.constData());
    const QString leg0 = TopologyGraph::LegKey(host, "m0", 0);
    QTRY_VERIFY_WITH_TIMEOUT(w.indexOfNode(TopologyGraph::LegKey(host, "m0", 1)).isValid() &&
                                 w.indexOfNode(TopologyGraph::LegKey(host, "m0", 1))
                                         .siblingAtColumn(DeviceTreeModel::kState).data().toString() == "failed",
                             5000);
    std::unique_ptr<QMimeData> legmd(view_model->mimeData({proxy_index(leg0)}));
    QVERIFY(legmd && view_model->canDropMimeData(legmd.get(), Qt::MoveAction, 0, 0, QModelIndex()));
    view_model->dropMimeData(legmd.get(), Qt::MoveAction, view_model->rowCount(), 0, QModelIndex());
    QTRY_COMPARE_WITH_TIMEOUT(refused.count(), 3, 5000);
    QVERIFY2(refused[2][0].toString().contains("last_good_leg"), qPrintable(refused[2][0].toString()));
    QCOMPARE(model->rowCount(), 1);
  }
};

QTEST_MAIN(StagedDropTest)
#include "staged_drop_test.moc"
