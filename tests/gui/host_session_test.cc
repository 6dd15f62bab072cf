// HostSession against a real dstd (label gui): the device tree follows `dstctl export add`
// through pushed events (the test only waits on signals and the event loop), a killed dstd
// turns the host offline with its rows kept, and a restarted one brings it back online by
// itself, still following changes; call() answers through the session and says "offline"
// while there is no connection.
#include <QtTest/QtTest>

#include <QAbstractItemModelTester>
#include <filesystem>

#include "daemon_process.h"
#include "device_tree_model.h"
#include "host_session.h"
#include "progress_model.h"
#include "test_env.h"

using dst::gui::DeviceTreeModel;
using dst::gui::HostSession;
using dst::gui::ProgressModel;
using namespace dst::test;
using nlohmann::json;

namespace {

constexpr int kLegMiB = 12;  // 3 s or more at the 4M/s resync ceiling

QModelIndex Export(const DeviceTreeModel& m, const QString& name) {
  if (m.rowCount() != 1) return {};
  QModelIndex host = m.index(0, 0);
  for (int r = 0; r < m.rowCount(host); ++r) {
    QModelIndex i = m.index(r, 0, host);
    if (i.data(DeviceTreeModel::KindRole).toString() == "export" && i.data().toString() == name) return i;
  }
  return {};
}

QString HostState(const DeviceTreeModel& m) {
  return m.rowCount() == 1 ? m.index(0, DeviceTreeModel::kState).data().toString() : QString();
}

}  // namespace

class HostSessionTest : public QObject {
  Q_OBJECT
 private slots:
  void followsDaemonAcrossKillAndRestart() {
    DST_REQUIRE(std::filesystem::exists(BinPath("dstd")) && std::filesystem::exists(BinPath("dstctl")),
                "dstd and dstctl not built");
    QTemporaryDir dir;
    QVERIFY(dir.isValid());
    DaemonProcess d(dir.path() + "/a");
    QVERIFY2(d.Start(), d.Log().right(2000).constData());

    HostSession session(d.control_socket());
    session.setBackoff(50, 400);
    DeviceTreeModel tree;
    QAbstractItemModelTester tester(&tree, QAbstractItemModelTester::FailureReportingMode::QtTest);
    tree.attach(&session);
    QCOMPARE(tree.rowCount(), 1);
    QCOMPARE(HostState(tree), QStringLiteral("offline"));  // nothing known yet
    QSignalSpy online(&session, &HostSession::onlineChanged);
    QSignalSpy events(&session, &HostSession::eventReceived);
    session.start();
    QTRY_VERIFY_WITH_TIMEOUT(session.state() == HostSession::State::kOnline, 5000);
    QCOMPARE(HostState(tree), QStringLiteral("online"));
    QCOMPARE(online.count(), 1);

    // A change made outside the GUI shows up, pushed.
    QByteArray out, err;
    QCOMPARE(d.Ctl({"export", "add", "gx", dir.path() + "/gx.img", "--size", "1M"}, &out, &err), 0);
    QTRY_VERIFY_WITH_TIMEOUT(Export(tree, "gx").isValid(), 5000);
    QCOMPARE(Export(tree, "gx").data(DeviceTreeModel::SizeBytesRole).toLongLong(), qint64(1) << 20);
    bool saw_added = false;
    for (const auto& args : events)
      saw_added |= args[0].value<json>().value("type", "") == "export_added";
    QVERIFY(saw_added);
    QVERIFY(session.lastSeq() > 0);

    // A mirror whose second leg resyncs slowly: its pass shows in the ProgressModel (percent,
    // rate history) from pushed progress events, then goes; the tree shows the leg up to date.
    ProgressModel progress;
    QAbstractItemModelTester ptester(&progress, QAbstractItemModelTester::FailureReportingMode::QtTest);
    progress.attach(&session);
    for (const char* leg : {"/l0.img", "/l1.img"}) {
      QFile f(dir.path() + leg);
      QVERIFY(f.open(QIODevice::WriteOnly) && f.resize(qint64(kLegMiB) << 20));
    }
    QVERIFY2(d.Ctl({"array", "create", "m0", "--level", "mirror", "--resync-rate-min", "2M",
                    "--resync-rate-max", "4M", dir.path() + "/l0.img", dir.path() + "/l1.img"},
                   &out, &err) == 0,
             err.constData());
    QTRY_VERIFY_WITH_TIMEOUT(progress.rowCount() == 1 &&
                                 progress.index(0, 0).data(ProgressModel::PercentRole).toDouble() > 0,
                             10000);
    QCOMPARE(progress.index(0, ProgressModel::kArray).data().toString(), QStringLiteral("m0"));
    QCOMPARE(progress.index(0, ProgressModel::kLeg).data().toString(), QStringLiteral("1"));
    QTRY_VERIFY_WITH_TIMEOUT(progress.rowCount() == 1 &&
                                 progress.index(0, 0).data(ProgressModel::RateHistoryRole).toList().size() >= 3,
                             10000);
    QTRY_COMPARE_WITH_TIMEOUT(progress.rowCount(), 0, 30000);
    QModelIndex host = tree.index(0, 0);
    QModelIndex m0;
    for (int r = 0; r < tree.rowCount(host); ++r)
      if (tree.index(r, 0, host).data().toString() == "m0") m0 = tree.index(r, 0, host);
    QVERIFY(m0.isValid());
    QCOMPARE(tree.rowCount(m0), 2);
    QTRY_COMPARE_WITH_TIMEOUT(tree.index(1, DeviceTreeModel::kState, m0).data().toString(),
                              QStringLiteral("up to date"), 5000);
    QCOMPARE(tree.index(1, 0, m0).data(DeviceTreeModel::DirtyBytesRole).toLongLong(), qint64(0));

    // call() goes through the session's connection.
    json listed;
    bool answered = false;
    session.call("export.list", json::object(), [&](bool ok, const json& result, const QString& error) {
      QVERIFY2(ok, qPrintable(error));
      listed = result;
      answered = true;
    });
    QTRY_VERIFY_WITH_TIMEOUT(answered, 5000);
    QCOMPARE(listed["exports"].size(), std::size_t(1));
    QCOMPARE(listed["exports"][0]["name"], json("gx"));

    // kill -9: offline, rows kept and marked.
    d.Kill9();
    QTRY_VERIFY_WITH_TIMEOUT(!session.online(), 5000);
    QCOMPARE(HostState(tree), QStringLiteral("offline"));
    QVERIFY(Export(tree, "gx").isValid());
    QVERIFY(Export(tree, "gx").data(DeviceTreeModel::OfflineRole).toBool());
    QString offline_error;
    answered = false;
    session.call("status", json::object(), [&](bool ok, const json&, const QString& error) {
      QVERIFY(!ok);
      offline_error = error;
      answered = true;
    });
    QTRY_VERIFY_WITH_TIMEOUT(answered, 5000);
    QCOMPARE(offline_error, QStringLiteral("offline"));
    QTest::qWait(300);  // a few reconnect attempts fail while dstd is down
    QVERIFY(!session.online());

    // Restarted: back online by itself, and following changes again (new dstd run: its event
    // numbers start again; the session resubscribes and gets a gap, not silence).
    QVERIFY2(d.Start(), d.Log().right(2000).constData());
    QTRY_VERIFY_WITH_TIMEOUT(session.state() == HostSession::State::kOnline, 10000);
    QCOMPARE(HostState(tree), QStringLiteral("online"));
    QVERIFY(session.reconnects() >= 1);
    QCOMPARE(d.Ctl({"export", "add", "gy", dir.path() + "/gy.img", "--size", "2M"}, &out, &err), 0);
    QTRY_VERIFY_WITH_TIMEOUT(Export(tree, "gy").isValid(), 5000);
    QVERIFY(!Export(tree, "gy").data(DeviceTreeModel::OfflineRole).toBool());
  }
};

DST_TEST_MAIN(HostSessionTest)
#include "host_session_test.moc"
