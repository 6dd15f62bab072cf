// TopologyCanvas (gui/app) offscreen over the three-host fixture: an item per node, hosts as
// separate columns holding their nodes, every edge drawn (cross-host ones dashed), node colours
// and labels following live state changes (a leg failing, a host going offline), a drag from an
// export onto an array emitting dropRequested, and the main window showing the canvas.
#include <QtTest/QtTest>

#include <QGraphicsScene>
#include <QGraphicsView>
#include <QImage>
#include <QPainter>
#include <QSplitter>
#include <QTabWidget>

#include "device_tree_model.h"
#include "main_window.h"
#include "test_env.h"
#include "topology_canvas.h"
#include "topology_fixture.h"
#include "topology_graph.h"

using namespace dst::gui;
using namespace dst::test;

namespace {

// The scene drawn 1:1 into an image; the colour of scene point `p`.
QColor PixelAt(QGraphicsScene* scene, QPointF p) {
  QRectF r = scene->sceneRect();
  QImage img(r.size().toSize(), QImage::Format_ARGB32);
  img.fill(Qt::white);
  QPainter painter(&img);
  scene->render(&painter, QRectF(QPointF(0, 0), r.size()), r);
  painter.end();
  return img.pixelColor((p - r.topLeft()).toPoint());
}

// The state stripe at a node's left edge.
QPointF Stripe(const TopologyCanvas& c, const QString& key) {
  QRectF r = c.nodeRect(key);
  return {r.left() + 4, r.center().y()};
}

// A canvas over a tree fed the fixture's hosts.
struct Scene {
  explicit Scene(const QList<QString>& hosts) {
    g.setModel(&tree);
    canvas.resize(1200, 900);
    for (const QString& h : hosts) tree.setHost(h, h == kA ? StatusA() : h == kB ? StatusB() : StatusC());
  }
  DeviceTreeModel tree;
  TopologyGraph g;
  TopologyCanvas canvas{&g};
};

}  // namespace

class TopologyCanvasTest : public QObject {
  Q_OBJECT
 private slots:
  void drawsTheGraphLive() {
    Scene s({kA, kB, kC});
    auto& [tree, g, canvas] = s;

    for (const auto& n : g.nodes()) QVERIFY2(canvas.itemOf(n.key), qPrintable(n.key));
    QCOMPARE(canvas.edgeCount(), int(g.edges().size()));
    QCOMPARE(canvas.edgeTexts().filter(" (cross)").size(), 4);
    // Hosts are disjoint columns and hold their own nodes; legs sit right of their array.
    for (const QString& h : {kA, kB, kC})
      for (const QString& o : {kA, kB, kC})
        if (h < o) QVERIFY(!canvas.nodeRect(h).intersects(canvas.nodeRect(o)));
    for (const auto& n : g.nodes()) {
      QVERIFY(canvas.nodeRect(n.host).contains(canvas.nodeRect(n.key)));
      if (n.kind == QLatin1String("leg"))
        QVERIFY(canvas.nodeRect(n.key).left() >
                canvas.nodeRect(TopologyGraph::ObjectKey(n.host, "array", n.array)).left());
    }

    const QString leg1 = TopologyGraph::LegKey(kC, "m0", 1);
    const QString m0 = TopologyGraph::ObjectKey(kC, "array", "m0");
    QCOMPARE(PixelAt(canvas.scene(), Stripe(canvas, leg1)), StateColor(StateCategory::kUpToDate));
    QVERIFY(NodeDetail(*g.node(m0)).startsWith(QStringLiteral("up to date · 16.0 MiB")));

    // Leg 1 fails: its stripe turns red, the array's orange, and the labels say so.
    json c = StatusC("failed", "degraded");
    c["arrays"][0]["legs"][0]["out_of_sync_bytes"] = 131072;
    tree.setHost(kC, c);
    QCOMPARE(PixelAt(canvas.scene(), Stripe(canvas, leg1)), StateColor(StateCategory::kFailed));
    QCOMPARE(PixelAt(canvas.scene(), Stripe(canvas, m0)), StateColor(StateCategory::kDegraded));
    QCOMPARE(NodeDetail(*g.node(TopologyGraph::LegKey(kC, "m0", 0))), QStringLiteral("up to date · 16.0 MiB"));
    QCOMPARE(NodeNote(*g.node(TopologyGraph::LegKey(kC, "m0", 0))),
             QStringLiteral("128.0 KiB dirty · file /srv/c0.img"));
    QCOMPARE(NodeNote(*g.node(m0)), QStringLiteral("128.0 KiB dirty · mirror"));
    QCOMPARE(NodeNote(*g.node(leg1)), QStringLiteral("file dst://127.0.0.1:7401/e1"));
    QVERIFY(NodeDetail(*g.node(leg1)).startsWith(QStringLiteral("failed")));
    QCOMPARE(NodeTitle(*g.node(m0)), QStringLiteral("array m0"));

    // B offline: its nodes grey, their label says offline.
    const QString e3 = TopologyGraph::ObjectKey(kB, "export", "e3");
    tree.setHostOnline(kB, false);
    QCOMPARE(PixelAt(canvas.scene(), Stripe(canvas, e3)), StateColor(StateCategory::kOffline));
    QVERIFY(NodeDetail(*g.node(e3)).startsWith(QStringLiteral("offline")));

    // Removing C's array drops its items and edges.
    c["arrays"] = json::array();
    tree.setHost(kC, c);
    QVERIFY(!canvas.itemOf(m0));
    QVERIFY(!canvas.itemOf(leg1));
    QCOMPARE(canvas.edgeCount(), int(g.edges().size()));
  }

  void dragExportOntoArray() {
    Scene s({kA, kC});
    TopologyCanvas& canvas = s.canvas;
    canvas.show();
    QVERIFY(QTest::qWaitForWindowExposed(&canvas));
    QSignalSpy drops(&canvas, &TopologyCanvas::dropRequested);
    const QString e4 = TopologyGraph::ObjectKey(kC, "export", "e4");
    const QString m1 = TopologyGraph::ObjectKey(kA, "array", "m1");
    QPoint from = canvas.mapFromScene(canvas.nodeRect(e4).center());
    QPoint to = canvas.mapFromScene(canvas.nodeRect(m1).center());
    QTest::mousePress(canvas.viewport(), Qt::LeftButton, {}, from);
    QTest::mouseMove(canvas.viewport(), (from + to) / 2);
    QTest::mouseMove(canvas.viewport(), to);
    QTest::mouseRelease(canvas.viewport(), Qt::LeftButton, {}, to);
    QCOMPARE(drops.count(), 1);
    QCOMPARE(drops[0][0].toString(), e4);
    QCOMPARE(drops[0][1].toString(), m1);
    // An export takes no drops: an array released on one drops nothing.
    QTest::mousePress(canvas.viewport(), Qt::LeftButton, {}, to);
    QTest::mouseMove(canvas.viewport(), (from + to) / 2);
    QTest::mouseMove(canvas.viewport(), from);
    QTest::mouseRelease(canvas.viewport(), Qt::LeftButton, {}, from);
    QCOMPARE(drops.count(), 1);
    // A refusal shows at the drop point, then goes.
    canvas.showDropRefusal(QPointF(50, 60), "does not fit", 50);
    QCOMPARE(canvas.refusalText(), QStringLiteral("Refused: does not fit"));
    QCOMPARE(canvas.refusalPos(), QPointF(58, 68));
    QTRY_VERIFY(canvas.refusalText().isEmpty());
  }

  void windowShowsCanvasNextToTree() {
    QTemporaryDir dir;
    MainWindow w({dir.path() + "/a.sock"});  // nobody listens: one offline host
    w.show();
    QVERIFY(QTest::qWaitForWindowExposed(&w));
    QCOMPARE(w.topSplitter()->indexOf(w.canvas()), 1);
    QVERIFY(w.canvas()->isVisible());
    QVERIFY(w.canvas()->itemOf(dir.path() + "/a.sock"));
    w.deviceModel()->setHost("/other.sock", StatusA());
    QVERIFY(w.canvas()->itemOf(TopologyGraph::ObjectKey("/other.sock", "export", "e1")));
    // A canvas node's context menu is its tree row's: every node maps back to its row.
    for (const auto& n : w.canvas()->graph()->nodes()) {
      QModelIndex i = w.indexOfNode(n.key);
      QVERIFY2(i.isValid(), qPrintable(n.key));
      QCOMPARE(i.data(DeviceTreeModel::KindRole).toString(), n.kind);
      QCOMPARE(i.siblingAtColumn(DeviceTreeModel::kName).data().toString(), n.name);
    }
    QVERIFY(!w.indexOfNode(TopologyGraph::ObjectKey("/other.sock", "export", "nope")).isValid());
    QCOMPARE(w.tabs()->count(), 2);
    QCOMPARE(w.mainSplitter()->indexOf(w.topSplitter()), 0);
  }
};

QTEST_MAIN(TopologyCanvasTest)
#include "topology_canvas_test.moc"
