// Three real dstd processes behind one dst-gui window (offscreen, label gui; issue 12 item 8):
// hosts A and C export a disk each, host B assembles.  A QTest mouse drag of A's export onto the
// empty canvas, answered "mirror m of A's and C's exports on host B", stages one array.create
// on B with both dst:// URIs; nothing exists on B before Apply.  Apply runs it through the
// dialog; the progress model shows the initial resync running and then at 100 % ("done"); the
// device tree shows both legs up to date, with the canvas edges crossing hosts.  Then C's
// exporter is killed (SIGKILL): the tree shows C's leg failed within leg_timeout and the array
// degraded, without anything but the pushed events and status snapshots.
//
// On the way it grabs the review screenshots (gui/screenshots.sh sets DST_SCREENSHOT_DIR; else a
// temporary directory) and checks they are real images: the canvas with the mirror resyncing
// across the three hosts, a refused drop with its reason, the apply dialog, the main window.
#include <QtTest/QtTest>

#include <QElapsedTimer>
#include <QImage>
#include <QPixmap>
#include <QLabel>
#include <QListWidget>
#include <QPushButton>
#include <filesystem>

#include "canvas_drag.h"
#include "daemon_process.h"
#include "device_tree_model.h"
#include "drop_controller.h"
#include "main_window.h"
#include "pending_ops_model.h"
#include "pending_ops_pane.h"
#include "progress_model.h"
#include "test_env.h"
#include "topology_canvas.h"
#include "topology_graph.h"

using namespace dst::gui;
using namespace dst::test;
using nlohmann::json;

namespace {

constexpr int kLegTimeoutS = 10;  // dstd's default leg_timeout for an array made by array.create

QModelIndex Child(const QAbstractItemModel& m, const QModelIndex& parent, int role, const QString& prefix) {
  for (int r = 0; r < m.rowCount(parent); ++r) {
    const QModelIndex i = m.index(r, 0, parent);
    if ((role == Qt::DisplayRole ? i.data() : i.data(role)).toString().startsWith(prefix)) return i;
  }
  return {};
}

// Array `name`'s row on host `host` in the device tree (another kind of object may share the name).
QModelIndex ArrayRow(const DeviceTreeModel& m, const QString& host, const QString& name) {
  const QModelIndex h = Child(m, {}, DeviceTreeModel::KeyRole, host);
  for (int r = 0; h.isValid() && r < m.rowCount(h); ++r) {
    const QModelIndex i = m.index(r, 0, h);
    if (i.data().toString() == name && i.data(DeviceTreeModel::KindRole).toString() == "array") return i;
  }
  return {};
}

// The leg rows of array `name` on host `host`.
std::vector<QModelIndex> Legs(const DeviceTreeModel& m, const QString& host, const QString& name) {
  std::vector<QModelIndex> out;
  const QModelIndex a = ArrayRow(m, host, name);
  for (int r = 0; a.isValid() && r < m.rowCount(a); ++r) out.push_back(m.index(r, 0, a));
  return out;
}

QString State(const QModelIndex& i) { return i.siblingAtColumn(DeviceTreeModel::kState).data().toString(); }

}  // namespace

class ThreeHostsTest : public QObject {
  Q_OBJECT
 private slots:
  void mirrorAcrossHosts() {
    DST_REQUIRE(std::filesystem::exists(BinPath("dstd")) && std::filesystem::exists(BinPath("dstctl")),
                "dstd and dstctl not built");
    QTemporaryDir dir;
    QVERIFY(dir.isValid());
    // 256 MiB each, so the initial sync over two loopback hops lasts long enough to be seen.
    DaemonProcess a(dir.path() + "/a"), b(dir.path() + "/b"), c(dir.path() + "/c");
    a.config() = QString("[[export]]\nname = \"ea\"\npath = \"%1/ea.img\"\nsize = \"256M\"\n").arg(dir.path());
    c.config() = QString("[[export]]\nname = \"ec\"\npath = \"%1/ec.img\"\nsize = \"256M\"\n").arg(dir.path());
    QVERIFY2(a.Start(), a.Log().right(2000).constData());
    QVERIFY2(b.Start(), b.Log().right(2000).constData());
    QVERIFY2(c.Start(), c.Log().right(2000).constData());
    const QString ha = a.control_socket(), hb = b.control_socket(), hc = c.control_socket();
    QTemporaryDir shot_tmp;
    const QString shots = qEnvironmentVariableIsEmpty("DST_SCREENSHOT_DIR") ? shot_tmp.path()
                                                                            : qEnvironmentVariable("DST_SCREENSHOT_DIR");
    QStringList shot_files;
    auto shot = [&](QWidget* wdg, const QString& name) {
      const QString f = shots + "/" + name + ".png";
      if (wdg->grab().save(f)) shot_files << f;
      else qWarning("could not write %s", qPrintable(f));
    };

    MainWindow w({ha, hb, hc});
    QStringList hosts_offered, exports_offered;
    DropController::Ui ui;
    const QString ea = TopologyGraph::ObjectKey(ha, "export", "ea");
    const QString ec = TopologyGraph::ObjectKey(hc, "export", "ec");
    ui.askCreate = [&](const QStringList& levels, const QStringList& hosts, const QStringList& exports,
                       const DropChoices& defaults) -> std::optional<DropChoices> {
      hosts_offered = hosts;
      exports_offered = exports;
      if (!levels.contains("mirror")) return std::nullopt;
      DropChoices ch = defaults;
      ch.level = "mirror";
      ch.name = "m";
      ch.host = hb;  // assembled on B
      ch.sources = {ea, ec};
      return ch;
    };
    ui.askRemoveLeg = [](const QString&) { return std::optional<bool>(); };
    w.drops()->setUi(ui);
    w.resize(1800, 1400);
    w.show();
    QVERIFY(QTest::qWaitForWindowExposed(&w));
    TopologyCanvas* canvas = w.canvas();
    QTRY_VERIFY_WITH_TIMEOUT(canvas->itemOf(ea) && canvas->itemOf(ec), 10000);

    // Drop A's export on the bare canvas: one array.create staged on B, both legs by dst:// URI.
    PendingOpsPane* pane = w.pendingPane();
    PendingOpsModel* model_b = pane->model(hb);
    QVERIFY(model_b);
    const QPoint empty(canvas->viewport()->width() - 10, canvas->viewport()->height() - 10);
    Drag(canvas, ea, empty);
    QTRY_COMPARE_WITH_TIMEOUT(model_b->rowCount(), 1, 5000);
    QCOMPARE(hosts_offered, (QStringList{ha, hb, hc}));
    QVERIFY(exports_offered.contains(ea) && exports_offered.contains(ec));
    const std::string uri_a = "dst://127.0.0.1:" + std::to_string(a.port()) + "/ea";
    const std::string uri_c = "dst://127.0.0.1:" + std::to_string(c.port()) + "/ec";
    const json op = model_b->ops()[0];
    QCOMPARE(op["method"], json("array.create"));
    QCOMPARE(op["params"]["level"], json("mirror"));
    QCOMPARE(op["params"]["name"], json("m"));
    QCOMPARE(op["params"]["legs"], json::array({uri_a, uri_c}));
    QCOMPARE(pane->model(ha)->rowCount(), 0);
    QCOMPARE(pane->model(hc)->rowCount(), 0);
    QByteArray out;
    QCOMPARE(b.Ctl({"array", "list", "--json"}, &out), 0);
    QCOMPARE(json::parse(out.toStdString())["arrays"].size(), std::size_t(0));  // nothing before Apply

    // Watch the progress model from before Apply: every percent it shows for m.
    ProgressModel* progress = w.progressModel();
    double max_running = -1;
    bool saw_done = false;
    bool resync_shot = false;
    auto sample = [&] {
      if (max_running >= 0 && !resync_shot) {
        resync_shot = true;
        shot(canvas, "canvas-resyncing-mirror-3-hosts");
      }
      for (int r = 0; r < progress->rowCount(); ++r) {
        if (progress->index(r, ProgressModel::kArray).data().toString() != "m") continue;
        const double pct = progress->index(r, 0).data(ProgressModel::PercentRole).toDouble();
        if (progress->index(r, ProgressModel::kKind).data().toString() == "done")
          saw_done = saw_done || pct == 100.0;
        else
          max_running = std::max(max_running, pct);
      }
    };
    connect(progress, &QAbstractItemModel::rowsInserted, this, sample);
    connect(progress, &QAbstractItemModel::dataChanged, this, sample);

    // Apply on B through the dialog.
    QCOMPARE(pane->currentHost(), hb);
    QTest::mouseClick(pane->applyButton(), Qt::LeftButton);
    QTRY_VERIFY_WITH_TIMEOUT(pane->applyDialog() && pane->applyDialog()->planLoaded(), 5000);
    ApplyDialog* dlg = pane->applyDialog();
    QTest::mouseClick(dlg->runButton(), Qt::LeftButton);
    QTRY_VERIFY_WITH_TIMEOUT(dlg->finished(), 30000);
    QVERIFY2(dlg->summary()->text().startsWith("Applied"), qPrintable(dlg->summary()->text()));
    shot(dlg, "apply-dialog");
    dlg->close();

    // The initial sync: seen running, then at 100 % ("done"), and both legs up to date.
    QTRY_VERIFY_WITH_TIMEOUT(saw_done, 120000);
    QVERIFY2(max_running >= 0, "the resync was never seen running");
    qInfo("resync seen running up to %.1f %%, then done at 100 %%", max_running);
    auto leg_states = [&] {
      QStringList out;
      for (const QModelIndex& l : Legs(*w.deviceModel(), hb, "m")) out << l.data().toString() + "=" + State(l);
      if (out.isEmpty()) {  // say what the tree has instead
        const DeviceTreeModel& m = *w.deviceModel();
        for (int r = 0; r < m.rowCount(); ++r) {
          const QModelIndex h = m.index(r, 0);
          out << "host " + h.data(DeviceTreeModel::KeyRole).toString();
          for (int c = 0; c < m.rowCount(h); ++c)
            out << "  " + m.index(c, 0, h).data(DeviceTreeModel::KindRole).toString() + " " + m.index(c, 0, h).data().toString();
        }
      }
      return out.join(", ");
    };
    QTRY_VERIFY2_WITH_TIMEOUT(leg_states().count("=up to date") == 2, qPrintable(leg_states()), 30000);
    // The canvas: B's legs point at the exports on A and C, across hosts.
    const TopologyGraph* g = canvas->graph();
    int cross = 0;
    for (const auto& e : g->edges())
      if (e.cross_host && (e.to == ea || e.to == ec)) ++cross;
    QCOMPARE(cross, 2);
    // The exporters' rows follow their clients (export_clients events): B is connected to both.
    auto clients_of = [&](const QString& host, const QString& name) {
      const QModelIndex h = Child(*w.deviceModel(), {}, DeviceTreeModel::KeyRole, host);
      const QModelIndex e = Child(*w.deviceModel(), h, Qt::DisplayRole, name);
      return e.siblingAtColumn(DeviceTreeModel::kInfo).data().toString();
    };
    QTRY_VERIFY2_WITH_TIMEOUT(clients_of(ha, "ea").endsWith(", 1 client(s)"), qPrintable(clients_of(ha, "ea")), 5000);
    QTRY_VERIFY2_WITH_TIMEOUT(clients_of(hc, "ec").endsWith(", 1 client(s)"), qPrintable(clients_of(hc, "ec")), 5000);
    shot(&w, "main-window");
    // A refused drop: C's export onto m again (it is a leg of m already).
    QSignalSpy refused(w.drops(), &DropController::refused);
    const QString m = TopologyGraph::ObjectKey(hb, "array", "m");
    QTRY_VERIFY_WITH_TIMEOUT(canvas->itemOf(m), 5000);
    Drag(canvas, ec, canvas->mapFromScene(canvas->nodeRect(m).center()));
    QTRY_COMPARE_WITH_TIMEOUT(refused.count(), 1, 5000);
    QVERIFY2(canvas->refusalText().contains("already a leg of"), qPrintable(canvas->refusalText()));
    QCOMPARE(model_b->rowCount(), 0);
    shot(canvas, "refused-drop");
    // The screenshots are real images of a readable size.
    QVERIFY2(!resync_shot || shot_files.size() == 4, qPrintable(shot_files.join(' ')));
    for (const QString& f : shot_files) {
      const QImage img(f);
      QVERIFY2(!img.isNull() && img.width() >= 300 && img.height() >= 150, qPrintable(f));
    }

    // Kill C's exporter: its leg (slot 1) is failed within leg_timeout, the array degraded.
    QElapsedTimer t;
    t.start();
    c.Kill9();
    QTRY_VERIFY_WITH_TIMEOUT(State(Legs(*w.deviceModel(), hb, "m")[1]) == "failed", (kLegTimeoutS + 6) * 1000);
    const qint64 ms = t.elapsed();
    qInfo("leg on the killed exporter shown failed after %lld ms (leg_timeout %d s)", ms, kLegTimeoutS);
    QCOMPARE(State(Legs(*w.deviceModel(), hb, "m")[0]), QStringLiteral("up to date"));
    QTRY_COMPARE_WITH_TIMEOUT(State(ArrayRow(*w.deviceModel(), hb, "m")), QStringLiteral("degraded"), 5000);
    // C itself is offline in the tree (greyed), A and B are not.
    QTRY_VERIFY_WITH_TIMEOUT(Child(*w.deviceModel(), {}, DeviceTreeModel::KeyRole, hc).data(DeviceTreeModel::OfflineRole).toBool(),
                             10000);
    QVERIFY(!Child(*w.deviceModel(), {}, DeviceTreeModel::KeyRole, hb).data(DeviceTreeModel::OfflineRole).toBool());
    QCOMPARE(b.Terminate(), 0);
    QCOMPARE(a.Terminate(), 0);
  }
};

QTEST_MAIN(ThreeHostsTest)
#include "three_hosts_test.moc"
