// ProgressModel (gui/models) headless: under QAbstractItemModelTester through pseudo-random
// snapshots (rows for exactly the running resync and verify passes of online hosts, checked
// against the last snapshots); percent clamped, ETA from the engine or remaining / rate, and a
// rate history ring of the last kHistory updates.
#include <QtTest/QtTest>

#include <QAbstractItemModelTester>
#include <set>
#include <tuple>

#include "format.h"
#include "model_dump.h"
#include "progress_model.h"
#include "snapshot_gen.h"
#include "test_env.h"

using dst::gui::ProgressModel;
using dst::test::SnapshotGen;
using nlohmann::json;

namespace {

using RowTuple = std::tuple<QString, QString, QString, int, qint64, qint64, double>;

std::set<RowTuple> Expected(SnapshotGen& gen) {
  std::set<RowTuple> rows;
  for (auto& h : gen.hosts()) {
    if (!h.online || !h.present) continue;
    QString host = QString::fromStdString(h.path);
    for (const json& a : h.status["arrays"]) {
      QString name = QString::fromStdString(a["name"]);
      for (const json& p : a["progress"])
        if (p["state"] == "running")
          rows.insert({host, name, "resync", p["leg"].get<int>(), p["bytes_done"].get<qint64>(),
                       p["bytes_total"].get<qint64>(), p["percent"].get<double>()});
      const json& v = a["verify"];
      if (v.is_object() && v["state"] == "running")
        rows.insert({host, name, "verify", -1, v["bytes_done"].get<qint64>(),
                     v["bytes_total"].get<qint64>(), v["percent"].get<double>()});
    }
  }
  return rows;
}

std::set<RowTuple> Actual(const ProgressModel& m) {
  std::set<RowTuple> rows;
  for (int r = 0; r < m.rowCount(); ++r) {
    auto d = [&](int col, int role = Qt::DisplayRole) { return m.index(r, col).data(role); };
    QString leg = d(ProgressModel::kLeg).toString();
    rows.insert({d(ProgressModel::kHost).toString(), d(ProgressModel::kArray).toString(),
                 d(ProgressModel::kKind).toString() == "verifying" ? "verify" : "resync",
                 leg == "all" ? -1 : leg.toInt(), d(0, ProgressModel::BytesDoneRole).toLongLong(),
                 d(0, ProgressModel::BytesTotalRole).toLongLong(), d(0, ProgressModel::PercentRole).toDouble()});
  }
  return rows;
}

json Progress(double percent, qint64 done, qint64 total, double rate, double eta) {
  return {{"arrays",
           {{{"name", "m0"},
             {"legs", json::array()},
             {"progress",
              {{{"leg", 1}, {"state", "running"}, {"percent", percent}, {"bytes_done", done},
                {"bytes_total", total}, {"rate", rate}, {"eta_seconds", eta}}}},
             {"verify", nullptr}}}}};
}

}  // namespace

class ProgressModelTest : public QObject {
  Q_OBJECT
 private slots:
  void randomSnapshotsUnderTester_data() {
    QTest::addColumn<unsigned>("seed");
    for (unsigned seed : {3u, 11u, 99u}) QTest::newRow(qPrintable(QString::number(seed))) << seed;
  }
  void randomSnapshotsUnderTester() {
    QFETCH(unsigned, seed);
    ProgressModel model;
    dst::test::Watched w(&model);
    SnapshotGen gen(seed, 3);
    std::size_t max_rows = 0;
    for (int step = 0; step < 800; ++step) {
      auto& h = gen.hosts()[std::size_t(gen.Step())];
      QString host = QString::fromStdString(h.path);
      if (h.online && h.present)
        model.setHost(host, h.status);
      else
        model.setHostOnline(host, false);
      max_rows = std::max(max_rows, std::size_t(model.rowCount()));
      if (QTest::currentTestFailed()) QFAIL(qPrintable(QString("tester failed at step %1").arg(step)));
    }
    QCOMPARE(w.resets.count(), 0);
    QVERIFY(w.inserted.count() > 10);
    QVERIFY(w.removed.count() > 5);
    QVERIFY(max_rows >= 3);
    QCOMPARE(Actual(model), Expected(gen));
    ProgressModel fresh;
    for (auto& h : gen.hosts())
      if (h.online && h.present) fresh.setHost(QString::fromStdString(h.path), h.status);
    const QList<int> roles = {ProgressModel::PercentRole, ProgressModel::RateRole, ProgressModel::EtaSecondsRole};
    QCOMPARE(dst::test::Dump(model, roles), dst::test::Dump(fresh, roles));
  }

  // The human texts both models show (gui/models/format.h).
  void humanTexts() {
    using namespace dst::gui;
    QCOMPARE(HumanSize(0), QStringLiteral("0 B"));
    QCOMPARE(HumanSize(1023), QStringLiteral("1023 B"));
    QCOMPARE(HumanSize(1024), QStringLiteral("1.0 KiB"));
    QCOMPARE(HumanSize(qint64(3) << 29), QStringLiteral("1.5 GiB"));
    QCOMPARE(HumanRate(-5), QStringLiteral("0 B/s"));
    QCOMPARE(HumanDuration(-1), QStringLiteral("unknown"));
    QCOMPARE(HumanDuration(59.4), QStringLiteral("59 s"));
    QCOMPARE(HumanDuration(59.6), QStringLiteral("1 min 00 s"));
    QCOMPARE(HumanDuration(3725), QStringLiteral("1 h 02 min"));
    QCOMPARE(HumanState("clean"), QStringLiteral("up to date"));
    QCOMPARE(HumanState("up-to-date"), QStringLiteral("up to date"));
    QCOMPARE(HumanState("split-brain"), QStringLiteral("split brain"));
    QCOMPARE(HumanState("degraded"), QStringLiteral("degraded"));
  }

  void etaPercentRateHistory() {
    ProgressModel model;
    QAbstractItemModelTester tester(&model, QAbstractItemModelTester::FailureReportingMode::QtTest);
    const qint64 total = qint64(1) << 30;
    // Engine ETA unknown (-1): remaining / rate.
    model.setHost("h", Progress(25.0, total / 4, total, 1 << 20, -1));
    QCOMPARE(model.rowCount(), 1);
    QModelIndex row = model.index(0, 0);
    QCOMPARE(row.data(ProgressModel::EtaSecondsRole).toDouble(), double(total - total / 4) / double(1 << 20));
    QCOMPARE(model.index(0, ProgressModel::kEta).data().toString(), QStringLiteral("12 min 48 s"));
    QCOMPARE(model.index(0, ProgressModel::kLeg).data().toString(), QStringLiteral("1"));
    QCOMPARE(model.index(0, ProgressModel::kPercent).data().toString(), QStringLiteral("25.0 %"));
    QCOMPARE(model.index(0, ProgressModel::kRate).data().toString(), QStringLiteral("1.0 MiB/s"));
    // The engine's ETA wins when it has one.
    model.setHost("h", Progress(30.0, total / 4 + 1, total, 2 << 20, 42.0));
    QCOMPARE(row.data(ProgressModel::EtaSecondsRole).toDouble(), 42.0);
    // A wild percentage is clamped (md printed 429496729.3 %).
    model.setHost("h", Progress(429496729.3, total / 2, total, 3 << 20, 10));
    QCOMPARE(row.data(ProgressModel::PercentRole).toDouble(), 100.0);
    model.setHost("h", Progress(-5, total / 2 + 1, total, 3 << 20, 10));
    QCOMPARE(row.data(ProgressModel::PercentRole).toDouble(), 0.0);
    // The same figures again add no sample.
    model.setHost("h", Progress(-5, total / 2 + 1, total, 3 << 20, 10));
    QVariantList h = row.data(ProgressModel::RateHistoryRole).toList();
    QCOMPARE(h.size(), 4);
    QCOMPARE(h[0].toDouble(), double(1 << 20));
    QCOMPARE(h[3].toDouble(), double(3 << 20));
    // The ring keeps the newest kHistory rates, oldest first.
    for (int i = 0; i < 200; ++i) model.setHost("h", Progress(50, total / 2 + i, total, 1000.0 + i, 5));
    h = row.data(ProgressModel::RateHistoryRole).toList();
    QCOMPARE(h.size(), ProgressModel::kHistory);
    for (int k = 0; k < ProgressModel::kHistory; ++k)
      QCOMPARE(h[k].toDouble(), 1000.0 + (200 - ProgressModel::kHistory) + k);
    // The pass ends: the row goes; a verify has one row for all legs.
    json done = Progress(100, total, total, 0, 0);
    done["arrays"][0]["progress"][0]["state"] = "done";
    done["arrays"][0]["verify"] = {{"state", "running"}, {"percent", 10.0}, {"bytes_done", 10},
                                   {"bytes_total", 100}, {"rate", 5}, {"eta_seconds", -1.0}};
    model.setHost("h", done);
    QCOMPARE(model.rowCount(), 1);
    QCOMPARE(model.index(0, ProgressModel::kKind).data().toString(), QStringLiteral("verifying"));
    QCOMPARE(model.index(0, ProgressModel::kLeg).data().toString(), QStringLiteral("all"));
    QCOMPARE(model.index(0, 0).data(ProgressModel::EtaSecondsRole).toDouble(), 18.0);
    model.setHostOnline("h", false);
    QCOMPARE(model.rowCount(), 0);
  }

  // setFinishedLinger: a pass seen running that ends "done" stays as a 100 % "done" row for the
  // linger, then goes; a "done" pass never seen running is not shown; a new pass replaces it.
  void finishedRowLingers() {
    ProgressModel model;
    QAbstractItemModelTester tester(&model, QAbstractItemModelTester::FailureReportingMode::QtTest);
    model.setFinishedLinger(300);
    const qint64 total = 64 << 20;
    json done = Progress(100, total, total, 0, 0);
    done["arrays"][0]["progress"][0]["state"] = "done";
    model.setHost("h", done);
    QCOMPARE(model.rowCount(), 0);  // never seen running
    model.setHost("h", Progress(40, total * 2 / 5, total, 1 << 20, 30));
    QCOMPARE(model.rowCount(), 1);
    json almost = Progress(99.2, total - 1000, total, 1 << 20, 1);
    model.setHost("h", almost);
    model.setHost("h", done);
    QCOMPARE(model.rowCount(), 1);
    const QModelIndex row = model.index(0, 0);
    QCOMPARE(row.data(ProgressModel::PercentRole).toDouble(), 100.0);
    QCOMPARE(row.data(ProgressModel::BytesDoneRole).toLongLong(), total);
    QCOMPARE(model.index(0, ProgressModel::kKind).data().toString(), QStringLiteral("done"));
    QCOMPARE(row.data(ProgressModel::EtaSecondsRole).toDouble(), 0.0);
    model.setHost("h", done);  // the same snapshot again: still there, no new sample
    QCOMPARE(model.rowCount(), 1);
    QTRY_COMPARE_WITH_TIMEOUT(model.rowCount(), 0, 2000);
    model.setHost("h", done);  // expired: not shown again
    QCOMPARE(model.rowCount(), 0);
    // A new pass on the leg while the finished row lingers takes its place.
    model.setHost("h", Progress(10, total / 10, total, 1 << 20, 30));
    model.setHost("h", done);
    QCOMPARE(model.index(0, ProgressModel::kKind).data().toString(), QStringLiteral("done"));
    model.setHost("h", Progress(5, total / 20, total, 1 << 20, 30));
    QCOMPARE(model.rowCount(), 1);
    QCOMPARE(model.index(0, ProgressModel::kKind).data().toString(), QStringLiteral("resyncing"));
    QCOMPARE(model.index(0, 0).data(ProgressModel::PercentRole).toDouble(), 5.0);
  }
};

QTEST_GUILESS_MAIN(ProgressModelTest)
#include "progress_model_test.moc"
