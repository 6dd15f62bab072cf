// The progress pane offscreen: ProgressDelegate paints every cell of random progress data
// (a ProgressModel through a pseudo-random snapshot sequence, and hostile values: NaN,
// negative, huge, wrong types) without harm, and its sparkline follows RateHistoryRole; the
// rate-limit and cancel-verify controls send array.set_resync_rate / array.verify with the
// selected row's array to a scripted dstd through HostSession, logging the outcome, a refusal
// reaching failed() and the log as an error.
#include <QtTest/QtTest>

#include <cmath>
#include <limits>
#include <random>

#include <QImage>
#include <QPainter>
#include <QPushButton>
#include <QSpinBox>
#include <QStandardItemModel>
#include <QTableView>
#include <QTemporaryDir>

#include "host_calls.h"
#include "host_session.h"
#include "log_model.h"
#include "model_dump.h"
#include "progress_model.h"
#include "progress_pane.h"
#include "scripted_daemon.h"
#include "snapshot_gen.h"
#include "test_env.h"

using namespace dst::gui;
using dst::test::ScriptedDaemon;
using dst::test::SnapshotGen;
using dst::test::Watched;
using nlohmann::json;

namespace {

// Paints every cell of `m` with the delegate into an image; returns the image.
QImage PaintAll(const QAbstractItemModel& m, QTableView* view) {
  ProgressDelegate d;
  QImage img(1600, 30 * std::max(1, m.rowCount()), QImage::Format_ARGB32);
  img.fill(Qt::white);
  QPainter p(&img);
  for (int r = 0; r < m.rowCount(); ++r)
    for (int c = 0; c < m.columnCount(); ++c) {
      QStyleOptionViewItem opt;
      opt.initFrom(view);
      opt.widget = view;
      opt.rect = QRect(c * 160, r * 30, 160, 30);
      if (r % 2) opt.state |= QStyle::State_Selected;
      d.paint(&p, opt, m.index(r, c));
      (void)d.sizeHint(opt, m.index(r, c));
    }
  return img;
}

// How many pixels of `img` inside `r` have the colour `c` (alpha ignored), roughly.
int CountNear(const QImage& img, const QRect& r, QColor c) {
  int n = 0;
  for (int y = r.top(); y <= r.bottom(); ++y)
    for (int x = r.left(); x <= r.right(); ++x) {
      QColor p = img.pixelColor(x, y);
      if (std::abs(p.red() - c.red()) < 40 && std::abs(p.green() - c.green()) < 40 &&
          std::abs(p.blue() - c.blue()) < 40)
        ++n;
    }
  return n;
}

json Snapshot() {
  json resync = {{"leg", 1}, {"state", "running"}, {"percent", 30.0}, {"bytes_done", 30},
                 {"bytes_total", 100}, {"rate", 1048576}, {"eta_seconds", 5.0}};
  json verify = {{"state", "running"}, {"percent", 10.0}, {"bytes_done", 10}, {"bytes_total", 100},
                 {"rate", 2097152}, {"eta_seconds", 20.0}, {"run", 1}};
  return {{"exports", json::array()},
          {"volumes", json::array()},
          {"arrays",
           {{{"name", "m0"}, {"state", "resyncing"}, {"legs", json::array()}, {"progress", {resync}},
             {"verify", nullptr}, {"resync_rate", {{"min", 0}, {"max", 100 << 20}}}},
            {{"name", "m1"}, {"state", "clean"}, {"legs", json::array()}, {"progress", json::array()},
             {"verify", verify}}}}};
}

// A scripted dstd serving `snapshot`, a session to it, the models and the pane under test.
struct PaneRig {
  PaneRig(const QString& sock, json snapshot)
      : d(sock), session(sock), calls(&log), pane(&model, &calls) {
    d.snapshot = std::move(snapshot);
    session.setBackoff(20, 100);
    calls.addSession(&session);
    model.attach(&session);
  }
  void Start() {
    pane.show();
    session.start();
  }
  ScriptedDaemon d;
  HostSession session;
  ProgressModel model;
  LogModel log;
  HostCalls calls;
  ProgressPane pane;
};

void SelectArray(ProgressPane& pane, const QString& array) {
  QAbstractItemModel* m = pane.view()->model();
  for (int r = 0; r < m->rowCount(); ++r)
    if (m->index(r, ProgressModel::kArray).data().toString() == array) pane.view()->selectRow(r);
}

}  // namespace

class ProgressPaneTest : public QObject {
  Q_OBJECT
 private slots:
  void sparklinePoints() {
    QRectF r(0, 0, 100, 20);
    QPolygonF pts = ProgressDelegate::SparklinePoints({0.0, 5.0, 10.0}, r);
    QCOMPARE(pts.size(), 3);
    QCOMPARE(pts[0], QPointF(0, 20));   // lowest at the bottom
    QCOMPARE(pts[1], QPointF(50, 10));
    QCOMPARE(pts[2], QPointF(100, 0));  // the maximum at the top
    const double nan = std::numeric_limits<double>::quiet_NaN();
    QCOMPARE(ProgressDelegate::SparklinePoints({nan, 4.0, QString("x"), 2.0}, r).size(), 2);
    QVERIFY(ProgressDelegate::SparklinePoints({1.0}, r).isEmpty());
    QVERIFY(ProgressDelegate::SparklinePoints({}, r).isEmpty());
    for (const QPointF& p : ProgressDelegate::SparklinePoints({0.0, 0.0, -3.0}, r))
      QCOMPARE(p.y(), 20.0);  // all idle: a flat line at the bottom
  }

  void paintsRandomData() {
    QTableView view;  // for the style and palette
    ProgressModel model;
    Watched w(&model);
    SnapshotGen gen(11, 3);
    for (int step = 0; step < 600; ++step) {
      auto& h = gen.hosts()[std::size_t(gen.Step())];
      model.setHost(QString::fromStdString(h.path), h.status);
      if (step % 20 == 0) PaintAll(model, &view);
    }

    // Hostile values straight into the roles.
    std::mt19937 rng(5);
    const double odd[] = {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                          -std::numeric_limits<double>::infinity(), -50, 0, 1e300, 250, 42.5};
    QStandardItemModel m(40, ProgressModel::kColumnCount);
    for (int r = 0; r < 40; ++r)
      for (int c = 0; c < ProgressModel::kColumnCount; ++c) {
        QStandardItem* it = new QStandardItem(QStringLiteral("x%1").arg(r));
        it->setData(odd[rng() % 8], ProgressModel::PercentRole);
        QVariantList hist;
        int n = int(rng() % 300);
        for (int i = 0; i < n; ++i) hist << (rng() % 7 == 0 ? QVariant(QStringLiteral("bad")) : QVariant(odd[rng() % 8]));
        if (r % 5 == 0) it->setData(QStringLiteral("not a list"), ProgressModel::RateHistoryRole);
        else it->setData(hist, ProgressModel::RateHistoryRole);
        m.setItem(r, c, it);
      }
    PaintAll(m, &view);

    // The sparkline is drawn in the highlight colour when there is a history, not without.
    QStandardItemModel one(2, ProgressModel::kColumnCount);
    one.setData(one.index(0, ProgressModel::kRate), QVariantList{0.0, 10.0, 0.0, 10.0, 5.0},
                ProgressModel::RateHistoryRole);
    QImage img = PaintAll(one, &view);
    const QColor hl = view.palette().color(QPalette::Highlight);
    QRect cell0(ProgressModel::kRate * 160, 0, 160, 30);
    QVERIFY(CountNear(img, cell0, hl) > 20);
    QStandardItemModel none(1, ProgressModel::kColumnCount);
    QCOMPARE(CountNear(PaintAll(none, &view), cell0.adjusted(4, 4, -4, -4), hl), 0);
    // The bar: a 100 % row fills with the highlight colour, a 0 % row does not.
    QStandardItemModel bars(1, ProgressModel::kColumnCount);
    QRect bar(ProgressModel::kPercent * 160, 0, 160, 30);
    bars.setData(bars.index(0, ProgressModel::kPercent), 0.0, ProgressModel::PercentRole);
    int empty = CountNear(PaintAll(bars, &view), bar, hl);
    bars.setData(bars.index(0, ProgressModel::kPercent), 100.0, ProgressModel::PercentRole);
    QVERIFY(CountNear(PaintAll(bars, &view), bar, hl) > empty + 500);
  }

  void controlsCallTheDaemon() {
    QTemporaryDir dir;
    const QString sock = dir.path() + "/dstd.sock";
    PaneRig rig(sock, Snapshot());
    auto& [d, session, model, log, calls, pane] = rig;
    QVERIFY(d.ok);
    Watched pw(&model);
    Watched lw(&log);
    rig.Start();
    QTRY_COMPARE(model.rowCount(), 2);

    QVERIFY(!pane.setRateButton()->isEnabled());  // nothing selected
    SelectArray(pane, "m0");
    QVERIFY(pane.setRateButton()->isEnabled());
    QCOMPARE(pane.rateLimit()->value(), 100);  // the array's current limit
    QCOMPARE(model.index(0, 0).data(ProgressModel::RateLimitRole).toLongLong(), qint64(100) << 20);
    QVERIFY(!pane.cancelVerifyButton()->isEnabled());  // a resync row
    pane.rateLimit()->setValue(50);
    QTest::mouseClick(pane.setRateButton(), Qt::LeftButton);
    QTRY_COMPARE(d.Requests("array.set_resync_rate").size(), std::size_t(1));
    QCOMPARE(d.Requests("array.set_resync_rate")[0]["params"],
             json({{"name", "m0"}, {"max", std::int64_t(50) << 20}}));
    QTRY_COMPARE(log.rowCount(), 1);
    QCOMPARE(log.index(0, LogModel::kLevel).data(LogModel::LevelRole).toInt(), int(LogModel::kInfo));
    QVERIFY(log.index(0, LogModel::kMessage).data().toString().startsWith("array.set_resync_rate m0"));
    QCOMPARE(log.index(0, LogModel::kHost).data().toString(), sock);

    // Unlimited is max 0.
    pane.rateLimit()->setValue(0);
    QCOMPARE(pane.rateLimit()->text(), QStringLiteral("unlimited"));
    pane.setRateLimit();
    QTRY_COMPARE(d.Requests("array.set_resync_rate").size(), std::size_t(2));
    QCOMPARE(d.Requests("array.set_resync_rate")[1]["params"]["max"], json(0));

    SelectArray(pane, "m1");
    QCOMPARE(pane.rateLimit()->value(), 0);  // m1 says nothing: the spin box keeps its value
    QCOMPARE(model.index(1, 0).data(ProgressModel::RateLimitRole).toLongLong(), qint64(-1));
    QVERIFY(pane.cancelVerifyButton()->isEnabled());
    QTest::mouseClick(pane.cancelVerifyButton(), Qt::LeftButton);
    QTRY_COMPARE(d.Requests("array.verify").size(), std::size_t(1));
    QCOMPARE(d.Requests("array.verify")[0]["params"], json({{"name", "m1"}, {"cancel", true}}));

    // A refusal: failed() and an error row with dstd's message.
    d.replies["array.set_resync_rate"] = {{"error", {{"code", "not_found"}, {"message", "no array \"m1\""}}}};
    QSignalSpy failed(&calls, &HostCalls::failed);
    pane.setRateLimit();
    QTRY_COMPARE(failed.count(), 1);
    QCOMPARE(failed[0][1].toString(), QStringLiteral("array.set_resync_rate"));
    QVERIFY(failed[0][2].toString().contains("no array"));
    const int last = log.rowCount() - 1;
    QCOMPARE(log.index(last, 0).data(LogModel::LevelRole).toInt(), int(LogModel::kError));
    QVERIFY(log.index(last, LogModel::kMessage).data().toString().contains("no array"));

    // A host nobody knows: an error at once, nothing sent.
    std::size_t sent = d.requests.size();
    calls.call("/nowhere.sock", "array.verify", {{"name", "m0"}});
    QCOMPARE(failed.count(), 2);
    QCOMPARE(d.requests.size(), sent);
    QCOMPARE(pw.resets.count(), 0);
  }

  // Pause on a running resync row, Resume on a paused one: the exact calls dstd receives.
  void pauseAndResumeCallTheDaemon() {
    QTemporaryDir dir;
    const QString sock = dir.path() + "/dstd.sock";
    json snap = Snapshot();
    json held = snap["arrays"][0];
    held["name"] = "m2";
    held["progress"][0]["state"] = "paused";
    held["resync_paused"] = true;
    snap["arrays"].push_back(held);
    PaneRig rig(sock, snap);
    auto& [d, session, model, log, calls, pane] = rig;
    QVERIFY(d.ok);
    rig.Start();
    QTRY_COMPARE(model.rowCount(), 3);  // m0 resync, m1 verify, m2 paused resync
    QVERIFY(!pane.pauseButton()->isEnabled() && !pane.resumeButton()->isEnabled());

    SelectArray(pane, "m0");
    QVERIFY(pane.pauseButton()->isEnabled());
    QVERIFY(!pane.resumeButton()->isEnabled());
    QTest::mouseClick(pane.pauseButton(), Qt::LeftButton);
    QTRY_COMPARE(d.Requests("array.pause_resync").size(), std::size_t(1));
    QCOMPARE(d.Requests("array.pause_resync")[0]["params"], json({{"name", "m0"}}));
    pane.pauseResync(false);  // not paused: nothing sent
    SelectArray(pane, "m1");  // a verify row: neither
    QVERIFY(!pane.pauseButton()->isEnabled() && !pane.resumeButton()->isEnabled());

    SelectArray(pane, "m2");
    QCOMPARE(pane.view()->selectionModel()->selectedRows().first().siblingAtColumn(ProgressModel::kKind)
                 .data().toString(), QStringLiteral("paused"));
    QVERIFY(!pane.pauseButton()->isEnabled());
    QVERIFY(pane.resumeButton()->isEnabled());
    QTest::mouseClick(pane.resumeButton(), Qt::LeftButton);
    QTRY_COMPARE(d.Requests("array.resume_resync").size(), std::size_t(1));
    QCOMPARE(d.Requests("array.resume_resync")[0]["params"], json({{"name", "m2"}}));
    QCOMPARE(d.Requests("array.pause_resync").size(), std::size_t(1));
    QTRY_COMPARE(log.rowCount(), 2);
    QVERIFY(log.index(1, LogModel::kMessage).data().toString().startsWith("array.resume_resync m2"));
  }
};

QTEST_MAIN(ProgressPaneTest)
#include "progress_pane_test.moc"
