// DropMapper (gui/models) over the three-host fixture: each drop kind maps to its typed
// operation on the right host (a cross-host export becomes a dst:// leg built from the
// exporter's listen address, a wildcard listener named by loopback), and the drops that mean
// nothing are refused with a reason.
#include <QtTest/QtTest>

#include "device_tree_model.h"
#include "drop_mapper.h"
#include "test_env.h"
#include "topology_fixture.h"
#include "topology_graph.h"

using namespace dst::gui;
using namespace dst::test;

class DropMapperTest : public QObject {
  Q_OBJECT
 private slots:
  void mapsEachDrop() {
    DeviceTreeModel tree;
    TopologyGraph g;
    g.setModel(&tree);
    tree.setHost(kA, StatusA());
    tree.setHost(kB, StatusB());
    tree.setHost(kC, StatusC());
    const QString e1 = TopologyGraph::ObjectKey(kA, "export", "e1");
    const QString e3 = TopologyGraph::ObjectKey(kB, "export", "e3");
    const QString e4 = TopologyGraph::ObjectKey(kC, "export", "e4");
    const QString m0 = TopologyGraph::ObjectKey(kC, "array", "m0");
    const QString m1 = TopologyGraph::ObjectKey(kA, "array", "m1");
    const QString m2 = TopologyGraph::ObjectKey(kA, "array", "m2");
    const QString v1 = TopologyGraph::ObjectKey(kB, "volume", "v1");

    // An export of another host onto a mirror: add_leg on the array's host, dst:// of the exporter.
    QCOMPARE(ClassifyDrop(g, e1, m0), DropKind::kAddLeg);
    MappedDrop d = MapDrop(g, e1, m0);
    QVERIFY(d.ok());
    QCOMPARE(d.host, kC);
    QCOMPARE(d.op, (json{{"method", "array.add_leg"},
                         {"params", {{"name", "m0"}, {"leg", "dst://127.0.0.1:7401/e1"}}}}));
    // What the exporter's status says and the engine's dry run cannot see yet: a read-only or
    // too small export onto a mirror is refused with the engine's reason code.
    {
      json a = StatusA();
      a["exports"][1]["read_only"] = true;  // e2
      a["exports"].push_back(Export("small"));
      a["exports"][2]["size"] = 8 << 20;
      a["exports"].push_back(Export("big"));
      a["exports"][3]["size"] = 32 << 20;
      tree.setHost(kA, a);
      d = MapDrop(g, TopologyGraph::ObjectKey(kA, "export", "e2"), m0);
      QVERIFY(!d.ok());
      QVERIFY2(d.refusal.contains("read-only") && d.refusal.contains("read_only_leg"), qPrintable(d.refusal));
      d = MapDrop(g, TopologyGraph::ObjectKey(kA, "export", "small"), m0);
      QVERIFY2(!d.ok() && d.refusal.contains("does_not_fit") && d.refusal.contains("8388608"), qPrintable(d.refusal));
      QVERIFY(MapDrop(g, TopologyGraph::ObjectKey(kA, "export", "big"), m0).ok());
      QVERIFY(MapDrop(g, e1, m0).ok());  // the same size: the engine decides at the step
      tree.setHost(kA, StatusA());
    }
    // C listens on 0.0.0.0: named by loopback.  Same host too: the export's own URI.
    QCOMPARE(MapDrop(g, e4, m1).op["params"]["leg"], json("dst://127.0.0.1:7403/e4"));
    QCOMPARE(MapDrop(g, e4, m0).host, kC);

    // Stacking an array or volume onto an array of its host; another host's is refused.
    QCOMPARE(ClassifyDrop(g, m2, m1), DropKind::kStack);
    d = MapDrop(g, m2, m1);
    QCOMPARE(d.host, kA);
    QCOMPARE(d.op, (json{{"method", "array.add_leg"}, {"params", {{"name", "m1"}, {"leg", "array:m2"}}}}));
    d = MapDrop(g, v1, m1);
    QVERIFY(!d.ok());
    QVERIFY2(d.refusal.contains("another host"), qPrintable(d.refusal));

    // Exports on the canvas: a create, on the chosen host (default: the first export's).
    QCOMPARE(ClassifyDrop(g, e3, ""), DropKind::kCreateArray);
    QCOMPARE(ClassifyDrop(g, e3, kA), DropKind::kCreateArray);
    QCOMPARE(DefaultCreateHost(e3), kB);
    QVERIFY(!MapDrop(g, e3, "").ok());  // no level or name chosen
    DropChoices c;
    c.level = "raid0";
    c.name = "r0";
    c.sources = {e3, e1};
    d = MapDrop(g, e3, "", c);
    QVERIFY2(d.ok(), qPrintable(d.refusal));
    QCOMPARE(d.host, kB);
    QCOMPARE(d.op, (json{{"method", "array.create"},
                         {"params", {{"name", "r0"}, {"level", "raid0"},
                                     {"legs", {"dst://127.0.0.1:7400/e3", "dst://127.0.0.1:7401/e1"}}}}}));
    c.host = kC;
    QCOMPARE(MapDrop(g, e3, "", c).host, kC);
    c.sources = {e3, m0};
    QVERIFY(MapDrop(g, e3, "", c).refusal.contains("not an export"));

    // A leg out: detach or remove, on its array's host.
    const QString leg1 = TopologyGraph::LegKey(kC, "m0", 1);
    QCOMPARE(ClassifyDrop(g, leg1, ""), DropKind::kLegOut);
    QCOMPARE(MapDrop(g, leg1, "").op, (json{{"method", "array.detach_leg"}, {"params", {{"name", "m0"}, {"slot", 1}}}}));
    DropChoices rm;
    rm.remove_leg = true;
    d = MapDrop(g, leg1, kC, rm);
    QCOMPARE(d.host, kC);
    QCOMPARE(d.op, (json{{"method", "array.remove_leg"}, {"params", {{"name", "m0"}, {"slot", 1}}}}));

    // Nothing to do: refused with a reason.
    for (auto [s, t] : {std::pair{leg1, m1}, std::pair{v1, QString()}, std::pair{m1, m1},
                        std::pair{e1, e3}, std::pair{QString("/nope#export:x"), m0}}) {
      QCOMPARE(ClassifyDrop(g, s, t), DropKind::kRefused);
      d = MapDrop(g, s, t);
      QVERIFY(!d.ok());
      QVERIFY(d.host.isEmpty());
    }
    QVERIFY(MapDrop(g, leg1, m1).refusal.contains("detaching"));
  }
};

DST_TEST_MAIN(DropMapperTest)
#include "drop_mapper_test.moc"
