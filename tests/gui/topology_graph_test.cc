// TopologyGraph (gui/models) headless: three hosts' `status` snapshots fed to a DeviceTreeModel
// (under QAbstractItemModelTester) give the expected nodes and edges, dst:// legs and volumes
// crossing hosts matched by the exporter's listen address (exact, wildcard, default port);
// a failing leg, a verify, a split brain and an offline host change the nodes' state live; and a
// pseudo-random sequence of snapshots never leaves an edge without its nodes.
#include <QtTest/QtTest>

#include <set>

#include "device_tree_model.h"
#include "model_dump.h"
#include "snapshot_gen.h"
#include "test_env.h"
#include "topology_fixture.h"
#include "topology_graph.h"

using namespace dst::gui;
using dst::test::SnapshotGen;
using dst::test::Watched;
using namespace dst::test;
using nlohmann::json;

namespace {

QStringList EdgeTexts(const TopologyGraph& g) {
  QStringList out;
  for (const auto& e : g.edges())
    out << e.from + " -" + e.kind + "-> " + e.to + (e.cross_host ? " (cross)" : "");
  out.sort();
  return out;
}

QString K(const QString& host, const char* kind, const char* name) {
  return TopologyGraph::ObjectKey(host, kind, name);
}

}  // namespace

class TopologyGraphTest : public QObject {
  Q_OBJECT
 private slots:
  void keys() {
    QString host, object;
    TopologyGraph::SplitKey(TopologyGraph::LegKey("/run/x#y/d.sock", "m0", 2), &host, &object);
    QCOMPARE(host, QStringLiteral("/run/x#y/d.sock"));
    QCOMPARE(object, QStringLiteral("leg:m0/2"));
    TopologyGraph::SplitKey("/run/d.sock", &host, &object);
    QCOMPARE(host, QStringLiteral("/run/d.sock"));
    QVERIFY(object.isEmpty());
  }

  void threeHosts() {
    DeviceTreeModel tree;
    Watched w(&tree);
    TopologyGraph g;
    g.setModel(&tree);
    QSignalSpy changed(&g, &TopologyGraph::changed);
    tree.setHost(kA, StatusA());
    tree.setHost(kB, StatusB());
    tree.setHost(kC, StatusC());
    QVERIFY(changed.count() >= 3);

    QStringList keys;
    for (const auto& n : g.nodes()) keys << n.key;
    QStringList want = {kA, K(kA, "export", "e1"), K(kA, "export", "e2"), K(kA, "array", "m1"),
                        TopologyGraph::LegKey(kA, "m1", 0), TopologyGraph::LegKey(kA, "m1", 1),
                        K(kA, "array", "m2"), TopologyGraph::LegKey(kA, "m2", 0),
                        TopologyGraph::LegKey(kA, "m2", 1), kB, K(kB, "export", "e3"),
                        K(kB, "volume", "v1"), kC, K(kC, "export", "e4"), K(kC, "array", "m0")};
    for (int s = 0; s < 4; ++s) want << TopologyGraph::LegKey(kC, "m0", s);
    QCOMPARE(keys, want);

    QStringList edges = {
        // members
        K(kA, "array", "m1") + " -member-> " + TopologyGraph::LegKey(kA, "m1", 0),
        K(kA, "array", "m1") + " -member-> " + TopologyGraph::LegKey(kA, "m1", 1),
        K(kA, "array", "m2") + " -member-> " + TopologyGraph::LegKey(kA, "m2", 0),
        K(kA, "array", "m2") + " -member-> " + TopologyGraph::LegKey(kA, "m2", 1),
        // A's m1: C's e4 through C's wildcard listener; the stacked m2 on A itself
        TopologyGraph::LegKey(kA, "m1", 0) + " -uses-> " + K(kC, "export", "e4") + " (cross)",
        TopologyGraph::LegKey(kA, "m1", 1) + " -uses-> " + K(kA, "array", "m2"),
        // B's volume imports A's e2
        K(kB, "volume", "v1") + " -uses-> " + K(kA, "export", "e2") + " (cross)",
        // C's m0: A's e1, B's e3 (default port); the file leg and the unknown export: none
        TopologyGraph::LegKey(kC, "m0", 1) + " -uses-> " + K(kA, "export", "e1") + " (cross)",
        TopologyGraph::LegKey(kC, "m0", 2) + " -uses-> " + K(kB, "export", "e3") + " (cross)",
    };
    for (int s = 0; s < 4; ++s)
      edges << K(kC, "array", "m0") + " -member-> " + TopologyGraph::LegKey(kC, "m0", s);
    edges.sort();
    QCOMPARE(EdgeTexts(g), edges);

    const TopologyNode* m0 = g.node(K(kC, "array", "m0"));
    QVERIFY(m0);
    QCOMPARE(m0->category, StateCategory::kUpToDate);
    QCOMPARE(m0->size, qint64(16 << 20));
    QCOMPARE(g.node(TopologyGraph::LegKey(kC, "m0", 1))->slot, 1);
    QCOMPARE(g.node(TopologyGraph::LegKey(kC, "m0", 1))->array, QStringLiteral("m0"));
    QCOMPARE(g.node(K(kB, "volume", "v1"))->file, QStringLiteral("/mnt/v1.img"));
    QCOMPARE(g.node(kA)->spec, QStringLiteral("127.0.0.1:7401"));

    // Leg 1 of m0 fails: the leg and the array change state, the other legs collect dirty bytes.
    changed.clear();
    json c = StatusC("failed", "degraded");
    c["arrays"][0]["legs"][0]["out_of_sync_bytes"] = 131072;
    tree.setHost(kC, c);
    QVERIFY(changed.count() >= 1);
    const TopologyNode* leg1 = g.node(TopologyGraph::LegKey(kC, "m0", 1));
    QCOMPARE(leg1->category, StateCategory::kFailed);
    QCOMPARE(leg1->state, QStringLiteral("failed"));
    QCOMPARE(g.node(K(kC, "array", "m0"))->category, StateCategory::kDegraded);
    QCOMPARE(g.node(TopologyGraph::LegKey(kC, "m0", 0))->dirty, qint64(131072));
    QCOMPARE(g.node(K(kC, "array", "m0"))->dirty, qint64(131072));
    QCOMPARE(EdgeTexts(g), edges);  // the topology itself did not change

    // Resyncing, then a verify on a clean array, then split brain.
    c = StatusC("resyncing", "resyncing");
    tree.setHost(kC, c);
    QCOMPARE(g.node(TopologyGraph::LegKey(kC, "m0", 1))->category, StateCategory::kResyncing);
    c = StatusC();
    c["arrays"][0]["verify"] = {{"state", "running"}, {"bytes_done", 0}, {"bytes_total", 1}};
    tree.setHost(kC, c);
    QCOMPARE(g.node(K(kC, "array", "m0"))->category, StateCategory::kVerifying);
    tree.setHost(kC, StatusC("detached", "split-brain"));
    QCOMPARE(g.node(K(kC, "array", "m0"))->category, StateCategory::kSplitBrain);
    QCOMPARE(g.node(TopologyGraph::LegKey(kC, "m0", 1))->category, StateCategory::kOutOfDate);

    // B goes offline: every node of B is offline, its edges stay (last snapshot).
    tree.setHostOnline(kB, false);
    for (const auto& n : g.nodes()) {
      QCOMPARE(n.offline, n.host == kB);
      if (n.host == kB) QCOMPARE(n.category, StateCategory::kOffline);
    }
    QCOMPARE(EdgeTexts(g), edges);
    tree.setHostOnline(kB, true);
    QVERIFY(g.node(K(kB, "export", "e3"))->category != StateCategory::kOffline);

    // B drops e3: C's leg 2 loses its edge; B removed: v1's edge goes too.
    json b = StatusB();
    b["exports"] = json::array();
    tree.setHost(kB, b);
    QVERIFY(!g.node(K(kB, "export", "e3")));
    QVERIFY(!EdgeTexts(g).join('\n').contains(TopologyGraph::LegKey(kC, "m0", 2) + " -uses->"));
    tree.removeHost(kB);
    for (const auto& e : g.edges()) QVERIFY(!e.from.startsWith(kB) && !e.to.startsWith(kB));
    QCOMPARE(w.resets.count(), 0);
  }

  void exactAddressBeatsWildcard() {
    DeviceTreeModel tree;
    TopologyGraph g;
    g.setModel(&tree);
    json any = {{"daemon", Daemon("0.0.0.0", 7400)}, {"exports", {Export("e")}}};
    json exact = {{"daemon", Daemon("127.0.0.2", 7400)}, {"exports", {Export("e")}}};
    json user = {{"daemon", Daemon("127.0.0.3", 7400)},
                 {"arrays", {Array("m", "clean", {Leg(0, "dst://127.0.0.2:7400/e")})}}};
    tree.setHost("any", any);
    tree.setHost("exact", exact);
    tree.setHost("user", user);
    bool found = false;
    for (const auto& e : g.edges())
      if (e.kind == QLatin1String("uses")) {
        QCOMPARE(e.to, K("exact", "export", "e"));
        QVERIFY(e.cross_host);
        found = true;
      }
    QVERIFY(found);
  }

  // Random snapshots: the graph has one node per host, top-level row and leg of the tree, its
  // edges join nodes it has, and a graph built from scratch on the same tree is the same.
  void followsRandomSnapshots() {
    SnapshotGen gen(7, 3);
    DeviceTreeModel tree;
    Watched w(&tree);
    TopologyGraph g;
    g.setModel(&tree);
    for (int step = 0; step < 1500; ++step) {
      auto& h = gen.hosts()[std::size_t(gen.Step())];
      QString host = QString::fromStdString(h.path);
      if (!h.present) {
        tree.removeHost(host);
        continue;
      }
      tree.setHost(host, h.status);
      tree.setHostOnline(host, h.online);
      if (step % 50) continue;
      int want = 0;
      for (int r = 0; r < tree.rowCount(); ++r) {
        QModelIndex hi = tree.index(r, 0);
        want += 1 + tree.rowCount(hi);
        for (int o = 0; o < tree.rowCount(hi); ++o) {
          QModelIndex oi = tree.index(o, 0, hi);
          if (oi.data(DeviceTreeModel::KindRole) == QStringLiteral("array")) want += tree.rowCount(oi);
        }
      }
      QCOMPARE(int(g.nodes().size()), want);
      std::set<QString> keys;
      for (const auto& n : g.nodes()) QVERIFY(keys.insert(n.key).second);
      for (const auto& e : g.edges()) QVERIFY(keys.count(e.from) && keys.count(e.to));
      TopologyGraph fresh;
      fresh.setModel(&tree);
      QVERIFY(fresh.nodes() == g.nodes());
      QVERIFY(fresh.edges() == g.edges());
    }
    QCOMPARE(w.resets.count(), 0);
  }
};

QTEST_GUILESS_MAIN(TopologyGraphTest)
#include "topology_graph_test.moc"
