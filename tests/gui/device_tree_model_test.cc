// DeviceTreeModel (gui/models) headless: under QAbstractItemModelTester through a long
// pseudo-random sequence of `status` snapshots on three hosts; the end result is checked
// against the last snapshots (read independently here) and against a model fed only those; it
// never resets, keeps untouched rows (persistent indexes), greys offline hosts and shows
// stacked arrays under their leg.
#include <QtTest/QtTest>

#include <QMimeData>
#include <memory>

#include <QAbstractItemModelTester>
#include <set>

#include "device_tree_model.h"
#include "topology_graph.h"
#include "model_dump.h"
#include "snapshot_gen.h"
#include "test_env.h"

using dst::gui::DeviceTreeModel;
using dst::gui::TopologyGraph;
using dst::test::SnapshotGen;
using nlohmann::json;

namespace {

const QList<int> kRoles = {DeviceTreeModel::KindRole,       DeviceTreeModel::KeyRole,
                           DeviceTreeModel::SizeBytesRole,  DeviceTreeModel::DirtyBytesRole,
                           DeviceTreeModel::EngineStateRole, DeviceTreeModel::OfflineRole};

QString Q(const json& j) { return QString::fromStdString(j.get<std::string>()); }

QModelIndex Child(const QAbstractItemModel& m, const QModelIndex& parent, const QString& kind,
                  const QString& name) {
  for (int r = 0; r < m.rowCount(parent); ++r) {
    QModelIndex i = m.index(r, 0, parent);
    if (i.data(DeviceTreeModel::KindRole).toString() == kind && i.data().toString() == name)
      return i;
  }
  return {};
}

const json* Find(const json& list, const QString& name) {
  for (const json& o : list)
    if (Q(o["name"]) == name) return &o;
  return nullptr;
}

void CheckArray(const QAbstractItemModel& m, const QModelIndex& ai, const json& status,
                const json& a, std::set<QString> stack, bool offline);

void CheckVolume(const QModelIndex& vi, const json& v, bool offline) {
  QCOMPARE(vi.data(DeviceTreeModel::SizeBytesRole).toLongLong(), v["size"].get<qint64>());
  QCOMPARE(vi.data(DeviceTreeModel::EngineStateRole).toString(), Q(v["state"]));
  QCOMPARE(vi.data(DeviceTreeModel::OfflineRole).toBool(), offline);
  QString info = vi.siblingAtColumn(DeviceTreeModel::kInfo).data().toString();
  QCOMPARE(info.contains(QLatin1String("mounted at /mnt/")), !v["file"].is_null());
}

void CheckArray(const QAbstractItemModel& m, const QModelIndex& ai, const json& status,
                const json& a, std::set<QString> stack, bool offline) {
  QString name = Q(a["name"]);
  stack.insert(name);
  QCOMPARE(ai.data(DeviceTreeModel::EngineStateRole).toString(), Q(a["state"]));
  QCOMPARE(ai.data(DeviceTreeModel::SizeBytesRole).toLongLong(), a["size"].get<qint64>());
  QCOMPARE(ai.data(DeviceTreeModel::OfflineRole).toBool(), offline);
  bool verifying = a["verify"].is_object() && a["verify"]["state"] == "running";
  QString state = ai.siblingAtColumn(DeviceTreeModel::kState).data().toString();
  if (verifying && a["state"] == "clean") QCOMPARE(state, QStringLiteral("verifying"));
  if (a["state"] == "split-brain") QCOMPARE(state, QStringLiteral("split brain"));
  if (a["state"] == "clean" && !verifying) QCOMPARE(state, QStringLiteral("up to date"));
  std::vector<json> legs(a["legs"].begin(), a["legs"].end());
  std::sort(legs.begin(), legs.end(), [](const json& x, const json& y) { return x["slot"] < y["slot"]; });
  QCOMPARE(m.rowCount(ai), int(legs.size()));
  for (int r = 0; r < int(legs.size()); ++r) {
    const json& l = legs[std::size_t(r)];
    QModelIndex li = m.index(r, 0, ai);
    QString spec = Q(l["spec"]);
    QCOMPARE(li.data().toString(), QStringLiteral("%1: %2").arg(l["slot"].get<int>()).arg(spec));
    QCOMPARE(li.data(DeviceTreeModel::DirtyBytesRole).toLongLong(), l["out_of_sync_bytes"].get<qint64>());
    QCOMPARE(li.data(DeviceTreeModel::EngineStateRole).toString(), Q(l["state"]));
    QCOMPARE(li.data(DeviceTreeModel::OfflineRole).toBool(), offline);
    const json* under = nullptr;
    if (spec.startsWith("array:") && !stack.count(spec.mid(6))) under = Find(status["arrays"], spec.mid(6));
    if (spec.startsWith("volume:")) under = Find(status["volumes"], spec.mid(7));
    QCOMPARE(m.rowCount(li), under ? 1 : 0);
    if (!under) continue;
    QModelIndex ci = m.index(0, 0, li);
    QCOMPARE(ci.data().toString(), Q((*under)["name"]));
    if (spec.startsWith("array:"))
      CheckArray(m, ci, status, *under, stack, offline);
    else
      CheckVolume(ci, *under, offline);
    if (QTest::currentTestFailed()) return;
  }
}

// The model shows exactly what the hosts' last snapshots say.
void CheckAgainstSnapshots(const DeviceTreeModel& m, SnapshotGen& gen) {
  int present = 0;
  for (auto& h : gen.hosts()) present += h.present;
  QCOMPARE(m.rowCount(), present);
  for (auto& h : gen.hosts()) {
    if (!h.present) continue;
    QModelIndex hi = Child(m, {}, "host", QString::fromStdString(h.path));
    QVERIFY2(hi.isValid(), h.path.c_str());
    QCOMPARE(hi.siblingAtColumn(DeviceTreeModel::kState).data().toString(),
             h.online ? QStringLiteral("online") : QStringLiteral("offline"));
    const json& s = h.status;
    QCOMPARE(m.rowCount(hi), int(s["exports"].size() + s["volumes"].size() + s["arrays"].size()));
    for (const json& e : s["exports"]) {
      QModelIndex ei = Child(m, hi, "export", Q(e["name"]));
      QVERIFY(ei.isValid());
      QCOMPARE(ei.data(DeviceTreeModel::SizeBytesRole).toLongLong(), e["size"].get<qint64>());
      QCOMPARE(ei.siblingAtColumn(DeviceTreeModel::kInfo).data().toString(),
               QStringLiteral("%1, %2 client(s)").arg(Q(e["device"])).arg(e["connections"].get<int>()));
      QCOMPARE(ei.data(DeviceTreeModel::OfflineRole).toBool(), !h.online);
    }
    for (const json& v : s["volumes"]) {
      QModelIndex vi = Child(m, hi, "volume", Q(v["name"]));
      QVERIFY(vi.isValid());
      CheckVolume(vi, v, !h.online);
      if (QTest::currentTestFailed()) return;
    }
    for (const json& a : s["arrays"]) {
      QModelIndex ai = Child(m, hi, "array", Q(a["name"]));
      QVERIFY(ai.isValid());
      CheckArray(m, ai, s, a, {}, !h.online);
      if (QTest::currentTestFailed()) return;
    }
  }
}

void Feed(DeviceTreeModel& m, const SnapshotGen::Host& h) {
  const QString path = QString::fromStdString(h.path);
  if (!h.present) {
    m.removeHost(path);
    return;
  }
  m.setHost(path, h.status);
  m.setHostOnline(path, h.online);
}

json OneArray(const char* leg0_state, qint64 dirty) {
  return {{"exports", json::array()},
          {"volumes", json::array()},
          {"arrays",
           {{{"name", "m0"}, {"id", "id0"}, {"level", "mirror"}, {"size", 1 << 20}, {"state", "clean"},
             {"legs",
              {{{"slot", 0}, {"spec", "/a.img"}, {"state", leg0_state}, {"out_of_sync_bytes", dirty}},
               {{"slot", 1}, {"spec", "/b.img"}, {"state", "up-to-date"}, {"out_of_sync_bytes", 0}}}}}}}};
}

}  // namespace

class DeviceTreeModelTest : public QObject {
  Q_OBJECT
 private slots:
  void randomSnapshotsUnderTester_data() {
    QTest::addColumn<unsigned>("seed");
    for (unsigned seed : {1u, 7u, 42u, 2026u}) QTest::newRow(qPrintable(QString::number(seed))) << seed;
  }
  void randomSnapshotsUnderTester() {
    QFETCH(unsigned, seed);
    DeviceTreeModel model;
    dst::test::Watched w(&model);
    SnapshotGen gen(seed, 3);
    for (auto& h : gen.hosts()) model.setHost(QString::fromStdString(h.path), h.status);
    for (int step = 0; step < 600; ++step) {
      auto& h = gen.hosts()[std::size_t(gen.Step())];
      Feed(model, h);
      if (QTest::currentTestFailed()) QFAIL(qPrintable(QString("tester failed at step %1").arg(step)));
    }
    QCOMPARE(w.resets.count(), 0);
    QVERIFY(w.inserted.count() > 50);
    QVERIFY(w.removed.count() > 10);
    QVERIFY(w.changed.count() > 50);
    int host_removals = 0;  // the sequence did take hosts away (and back)
    for (const auto& args : w.removed) host_removals += !args[0].value<QModelIndex>().isValid();
    QVERIFY(host_removals > 0);
    CheckAgainstSnapshots(model, gen);
    if (QTest::currentTestFailed()) return;

    DeviceTreeModel fresh;
    for (auto& h : gen.hosts())
      if (h.present) Feed(fresh, h);
    QCOMPARE(dst::test::Dump(model, kRoles), dst::test::Dump(fresh, kRoles));
  }

  // An update touches only what changed: other rows keep their indexes, no rows move.
  void keptRowsAndDataChanged() {
    DeviceTreeModel model;
    QAbstractItemModelTester tester(&model, QAbstractItemModelTester::FailureReportingMode::QtTest);
    model.setHost("h", OneArray("up-to-date", 0));
    QModelIndex array = model.index(0, 0, model.index(0, 0));
    QPersistentModelIndex leg0 = model.index(0, 0, array);
    QPersistentModelIndex leg1 = model.index(1, 0, array);
    QSignalSpy changed(&model, &QAbstractItemModel::dataChanged);
    QSignalSpy inserted(&model, &QAbstractItemModel::rowsInserted);
    QSignalSpy removed(&model, &QAbstractItemModel::rowsRemoved);
    model.setHost("h", OneArray("resyncing", 3 << 16));
    QVERIFY(leg0.isValid() && leg1.isValid());
    QCOMPARE(inserted.count(), 0);
    QCOMPARE(removed.count(), 0);
    // leg 0 and the array (its out-of-sync total); leg 1 and the host are untouched.
    QCOMPARE(changed.count(), 2);
    std::set<std::pair<int, const void*>> rows;
    for (const auto& args : changed) {
      QModelIndex tl = args[0].value<QModelIndex>(), br = args[1].value<QModelIndex>();
      QCOMPARE(tl.row(), br.row());
      rows.insert({tl.row(), tl.internalPointer()});
    }
    QVERIFY(rows.count({leg0.row(), QModelIndex(leg0).internalPointer()}));
    QVERIFY(rows.count({array.row(), array.internalPointer()}));
    QCOMPARE(array.siblingAtColumn(DeviceTreeModel::kDirty).data().toString(), QStringLiteral("192.0 KiB"));
    QCOMPARE(leg0.data(DeviceTreeModel::DirtyBytesRole).toLongLong(), qint64(3 << 16));
    QCOMPARE(QModelIndex(leg0).siblingAtColumn(DeviceTreeModel::kState).data().toString(), QStringLiteral("resyncing"));
    QCOMPARE(QModelIndex(leg0).siblingAtColumn(DeviceTreeModel::kDirty).data().toString(), QStringLiteral("192.0 KiB"));
    changed.clear();
    model.setHost("h", OneArray("resyncing", 3 << 16));  // the same snapshot: no signal at all
    QCOMPARE(changed.count(), 0);
  }

  void offlineHostStaysGreyed() {
    DeviceTreeModel model;
    QAbstractItemModelTester tester(&model, QAbstractItemModelTester::FailureReportingMode::QtTest);
    model.setHost("h", OneArray("up-to-date", 0));
    QModelIndex host = model.index(0, 0);
    QModelIndex leg = model.index(1, 0, model.index(0, 0, host));
    QVERIFY(!leg.data(DeviceTreeModel::OfflineRole).toBool());
    QSignalSpy changed(&model, &QAbstractItemModel::dataChanged);
    model.setHostOnline("h", false);
    QCOMPARE(model.rowCount(host), 1);
    QCOMPARE(host.siblingAtColumn(DeviceTreeModel::kState).data().toString(), QStringLiteral("offline"));
    QVERIFY(leg.data(DeviceTreeModel::OfflineRole).toBool());
    bool leg_signalled = false;  // the view must repaint the rows below the host too
    for (const auto& args : changed) {
      QModelIndex tl = args[0].value<QModelIndex>(), br = args[1].value<QModelIndex>();
      if (tl.parent() == leg.parent() && tl.row() <= leg.row() && br.row() >= leg.row()) leg_signalled = true;
    }
    QVERIFY(leg_signalled);
    model.setHostOnline("h", true);
    QCOMPARE(host.siblingAtColumn(DeviceTreeModel::kState).data().toString(), QStringLiteral("online"));
    QVERIFY(!leg.data(DeviceTreeModel::OfflineRole).toBool());
  }

  // A leg that is another array shows it (and its legs) below; a cycle ends.
  // The tree view's drag and drop: mimeData carries the rows' TopologyGraph keys; dropMimeData
  // on an array, a host or the empty area emits dropRequested and changes nothing; other rows,
  // offline hosts and foreign data are refused.
  void mimeDragAndDrop() {
    DeviceTreeModel model;
    QAbstractItemModelTester tester(&model, QAbstractItemModelTester::FailureReportingMode::QtTest);
    json s = OneArray("up-to-date", 0);
    s["exports"] = {{{"name", "e1"}, {"size", 1 << 20}, {"path", "/e1.img"}}};
    model.setHost("/a.sock", s);
    model.setHost("/b.sock", OneArray("up-to-date", 0));
    const QModelIndex a = model.index(0, 0), b = model.index(1, 0);
    const QModelIndex e1 = Child(model, a, "export", "e1"), m0b = Child(model, b, "array", "m0");
    const QModelIndex leg1 = model.index(1, 0, Child(model, a, "array", "m0"));
    QVERIFY(e1.isValid() && m0b.isValid() && leg1.isValid());
    QCOMPARE(model.graphKey(e1), TopologyGraph::ObjectKey("/a.sock", "export", "e1"));
    QCOMPARE(model.graphKey(leg1), TopologyGraph::LegKey("/a.sock", "m0", 1));
    QCOMPARE(model.graphKey(b), QStringLiteral("/b.sock"));
    QVERIFY(model.flags(e1) & Qt::ItemIsDragEnabled);
    QVERIFY(!(model.flags(e1) & Qt::ItemIsDropEnabled));
    QVERIFY(model.flags(m0b) & Qt::ItemIsDropEnabled);
    QVERIFY(!(model.flags(a) & Qt::ItemIsDragEnabled));
    QVERIFY(model.flags({}) & Qt::ItemIsDropEnabled);
    QCOMPARE(model.mimeTypes(), QStringList{DeviceTreeModel::kMimeType});

    QSignalSpy spy(&model, &DeviceTreeModel::dropRequested);
    // Every column of the row is dragged (what a view passes): one key.
    std::unique_ptr<QMimeData> md(model.mimeData({e1, e1.siblingAtColumn(DeviceTreeModel::kSize)}));
    QVERIFY(md);
    QCOMPARE(md->data(DeviceTreeModel::kMimeType), TopologyGraph::ObjectKey("/a.sock", "export", "e1").toUtf8());
    QVERIFY(model.canDropMimeData(md.get(), Qt::CopyAction, -1, -1, m0b));
    QVERIFY(!model.dropMimeData(md.get(), Qt::CopyAction, -1, -1, m0b));  // nothing moves here
    QCOMPARE(spy.count(), 1);
    QCOMPARE(spy[0][0].toString(), TopologyGraph::ObjectKey("/a.sock", "export", "e1"));
    QCOMPARE(spy[0][1].toString(), TopologyGraph::ObjectKey("/b.sock", "array", "m0"));
    model.dropMimeData(md.get(), Qt::CopyAction, 0, 0, m0b);  // between the array's legs
    QCOMPARE(spy.count(), 2);
    QCOMPARE(spy[1][1].toString(), TopologyGraph::ObjectKey("/b.sock", "array", "m0"));
    model.dropMimeData(md.get(), Qt::CopyAction, 2, 0, {});  // below the rows: a new array
    QCOMPARE(spy.count(), 3);
    QCOMPARE(spy[2][1].toString(), QString());
    std::unique_ptr<QMimeData> legmd(model.mimeData({leg1}));
    model.dropMimeData(legmd.get(), Qt::MoveAction, -1, -1, b);  // a leg onto a host box
    QCOMPARE(spy.count(), 4);
    QCOMPARE(spy[3][0].toString(), TopologyGraph::LegKey("/a.sock", "m0", 1));
    QCOMPARE(spy[3][1].toString(), QStringLiteral("/b.sock"));
    // Refused: onto an export row, foreign data, an offline host.
    QVERIFY(!model.canDropMimeData(md.get(), Qt::CopyAction, -1, -1, e1));
    QVERIFY(!model.dropMimeData(md.get(), Qt::CopyAction, -1, -1, e1));
    QMimeData text;
    text.setText("e1");
    QVERIFY(!model.canDropMimeData(&text, Qt::CopyAction, -1, -1, m0b));
    model.setHostOnline("/b.sock", false);
    QVERIFY(!model.canDropMimeData(md.get(), Qt::CopyAction, -1, -1, m0b));
    QVERIFY(!(model.flags(m0b) & Qt::ItemIsDragEnabled));
    QCOMPARE(spy.count(), 4);
  }

  void stackedArraysAndCycles() {
    DeviceTreeModel model;
    QAbstractItemModelTester tester(&model, QAbstractItemModelTester::FailureReportingMode::QtTest);
    json s = {{"arrays",
               {{{"name", "top"}, {"id", "1"}, {"state", "degraded"}, {"size", 100},
                 {"legs", {{{"slot", 0}, {"spec", "array:low"}, {"state", "failed"}, {"out_of_sync_bytes", 0}}}}},
                {{"name", "low"}, {"id", "2"}, {"state", "clean"}, {"size", 100},
                 {"legs", {{{"slot", 0}, {"spec", "array:top"}, {"state", "up-to-date"}, {"out_of_sync_bytes", 0}},
                           {{"slot", 1}, {"spec", "volume:v"}, {"state", "up-to-date"}, {"out_of_sync_bytes", 0}}}}}}},
              {"volumes", {{{"name", "v"}, {"size", 100}, {"state", "connected"}, {"file", nullptr}}}}};
    model.setHost("h", s);
    QModelIndex host = model.index(0, 0);
    QModelIndex top = Child(model, host, "array", "top");
    QVERIFY(top.isValid());
    QModelIndex low = model.index(0, 0, model.index(0, 0, top));
    QCOMPARE(low.data().toString(), QStringLiteral("low"));
    QCOMPARE(model.rowCount(low), 2);
    QCOMPARE(model.rowCount(model.index(0, 0, low)), 0);  // array:top again: the cycle stops
    QModelIndex vol = model.index(0, 0, model.index(1, 0, low));
    QCOMPARE(vol.data(DeviceTreeModel::KindRole).toString(), QStringLiteral("volume"));
    QCOMPARE(top.siblingAtColumn(DeviceTreeModel::kState).data().toString(), QStringLiteral("degraded"));
  }
};

QTEST_GUILESS_MAIN(DeviceTreeModelTest)
#include "device_tree_model_test.moc"
