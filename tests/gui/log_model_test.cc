// LogModel (gui/models) under QAbstractItemModelTester: rows appended newest last with time,
// level, host and message; past the capacity the oldest rows go (rowsRemoved, never a reset);
// clear() empties it.
#include <QtTest/QtTest>

#include "log_model.h"
#include "model_dump.h"
#include "test_env.h"

using dst::gui::LogModel;
using dst::test::Watched;

class LogModelTest : public QObject {
  Q_OBJECT
 private slots:
  void appendsAndCaps() {
    LogModel log(nullptr, 5);
    Watched w(&log);
    QCOMPARE(log.columnCount(), int(LogModel::kColumnCount));
    QCOMPARE(log.headerData(LogModel::kMessage, Qt::Horizontal).toString(), QStringLiteral("Message"));
    log.append(LogModel::kInfo, "/a.sock", "first");
    log.append(LogModel::kError, "/b.sock", "second");
    QCOMPARE(log.rowCount(), 2);
    QCOMPARE(log.index(1, LogModel::kHost).data().toString(), QStringLiteral("/b.sock"));
    QCOMPARE(log.index(1, LogModel::kMessage).data().toString(), QStringLiteral("second"));
    QCOMPARE(log.index(1, LogModel::kLevel).data().toString(), QStringLiteral("error"));
    QCOMPARE(log.index(0, LogModel::kLevel).data().toString(), QStringLiteral("info"));
    QCOMPARE(log.index(1, 0).data(LogModel::LevelRole).toInt(), int(LogModel::kError));
    QVERIFY(QTime::fromString(log.index(0, LogModel::kTime).data().toString(), "HH:mm:ss").isValid());
    QVERIFY(!log.index(0, 0, log.index(0, 0)).isValid());  // a flat table

    for (int i = 0; i < 20; ++i) log.append(LogModel::kWarning, "/a.sock", QStringLiteral("m%1").arg(i));
    QCOMPARE(log.rowCount(), 5);  // the newest five
    for (int r = 0; r < 5; ++r)
      QCOMPARE(log.index(r, LogModel::kMessage).data().toString(), QStringLiteral("m%1").arg(15 + r));
    QCOMPARE(w.inserted.count(), 22);
    QCOMPARE(w.removed.count(), 17);
    log.clear();
    QCOMPARE(log.rowCount(), 0);
    log.clear();  // empty: no signal
    QCOMPARE(w.removed.count(), 18);
    QCOMPARE(w.resets.count(), 0);
  }
};

QTEST_GUILESS_MAIN(LogModelTest)
#include "log_model_test.moc"
