// dst-gui's first slice offscreen: --host parsing and its defaults, offline rows greyed by the
// OfflineTint proxy, and the window showing one (offline, greyed) row per host it cannot reach.
#include <QtTest/QtTest>

#include <QColor>
#include <QTreeView>

#include "device_tree_model.h"
#include "host_session.h"
#include "main_window.h"
#include "offline_tint.h"
#include "test_env.h"

using namespace dst::gui;
using nlohmann::json;

class MainWindowTest : public QObject {
  Q_OBJECT
 private slots:
  void hostsFromArgs() {
    QCOMPARE(HostsFromArgs({"dst-gui"}, ""), QStringList{"/run/dst/dstd.sock"});
    QCOMPARE(HostsFromArgs({"dst-gui"}, "/tmp/x.sock"), QStringList{"/tmp/x.sock"});
    QCOMPARE(HostsFromArgs({"dst-gui", "--host", "/a", "--host=/b"}, "/tmp/x.sock"),
             (QStringList{"/a", "/b"}));
  }

  void offlineRowsAreGrey() {
    DeviceTreeModel model;
    OfflineTint tint;
    tint.setSourceModel(&model);
    model.setHost("h", {{"exports", {{{"name", "e1"}, {"size", 4096}}}}});
    QModelIndex e1 = tint.index(0, 0, tint.index(0, 0));
    QCOMPARE(e1.data().toString(), QStringLiteral("e1"));
    QVERIFY(!e1.data(Qt::ForegroundRole).isValid());
    model.setHostOnline("h", false);
    QCOMPARE(e1.data(Qt::ForegroundRole).value<QColor>(), QColor(Qt::gray));
    QCOMPARE(tint.index(0, 0).data(Qt::ForegroundRole).value<QColor>(), QColor(Qt::gray));
    model.setHostOnline("h", true);
    QVERIFY(!e1.data(Qt::ForegroundRole).isValid());
  }

  void windowShowsEveryHost() {
    QTemporaryDir dir;
    const QStringList hosts = {dir.path() + "/a.sock", dir.path() + "/b.sock"};  // nobody listens
    MainWindow w(hosts);
    w.show();
    QVERIFY(QTest::qWaitForWindowExposed(&w));
    QAbstractItemModel* m = w.tree()->model();
    QCOMPARE(m->rowCount(), 2);
    for (int r = 0; r < 2; ++r) {
      QCOMPARE(m->index(r, DeviceTreeModel::kName).data().toString(), hosts[r]);
      QCOMPARE(m->index(r, DeviceTreeModel::kState).data().toString(), QStringLiteral("offline"));
      QCOMPARE(m->index(r, 0).data(Qt::ForegroundRole).value<QColor>(), QColor(Qt::gray));
    }
    QTRY_VERIFY(w.sessions()[0]->reconnects() >= 1);  // it keeps trying by itself
  }
};

QTEST_MAIN(MainWindowTest)
#include "main_window_test.moc"
