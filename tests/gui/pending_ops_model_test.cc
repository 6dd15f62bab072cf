// PendingOpsModel (gui/models) against a real dstd, under QAbstractItemModelTester (label gui):
// stage() validates through `batch` dry runs (an add-leg on an array staged before it passes; a
// leg staged twice is refused leg_in_use for the new operation and not added); undo/redo; the
// staging changes nothing on the host; apply() follows the run's apply_step events row by row,
// empties the list and reports success; a failing step keeps the failed row with its error and
// the rows after it pending.
#include <QtTest/QtTest>

#include <QAbstractItemModelTester>
#include <filesystem>

#include "daemon_process.h"
#include "host_session.h"
#include "pending_ops_model.h"
#include "test_env.h"

using dst::gui::HostSession;
using dst::gui::PendingOpsModel;
using namespace dst::test;
using nlohmann::json;

namespace {

json Op(const std::string& method, json params) {
  return json{{"method", method}, {"params", std::move(params)}};
}

json Mirror(const std::string& name, const QString& a, const QString& b) {
  return Op("array.create", {{"name", name}, {"level", "mirror"},
                             {"legs", {a.toStdString(), b.toStdString()}}, {"assume_clean", true}});
}

bool MakeImage(const QString& path) {
  QFile f(path);
  return f.open(QIODevice::WriteOnly) && f.resize(qint64(16) << 20);
}

QStringList Methods(const PendingOpsModel& m) {
  QStringList out;
  for (int r = 0; r < m.rowCount(); ++r) out << m.index(r).data(PendingOpsModel::MethodRole).toString();
  return out;
}

// `dstctl array list --json`: the number of arrays on the host (-1 on failure).
int ArrayCount(DaemonProcess& d) {
  QByteArray out;
  if (d.Ctl({"array", "list", "--json"}, &out) != 0) return -1;
  json j = json::parse(out.toStdString(), nullptr, false);
  return j.is_object() ? static_cast<int>(j.value("arrays", json::array()).size()) : -1;
}

}  // namespace

class PendingOpsModelTest : public QObject {
  Q_OBJECT
 private slots:
  void stageUndoRedoApply() {
    DST_REQUIRE(std::filesystem::exists(BinPath("dstd")) && std::filesystem::exists(BinPath("dstctl")),
                "dstd and dstctl not built");
    QTemporaryDir dir;
    QVERIFY(dir.isValid());
    QStringList l;
    for (int i = 0; i < 4; ++i) {
      l << QString("%1/l%2.img").arg(dir.path()).arg(i);
      QVERIFY(MakeImage(l.back()));
    }
    DaemonProcess d(dir.path() + "/a");
    QVERIFY2(d.Start(), d.Log().right(2000).constData());
    HostSession session(d.control_socket());
    session.setBackoff(50, 400);
    session.start();
    QTRY_VERIFY_WITH_TIMEOUT(session.state() == HostSession::State::kOnline, 5000);

    PendingOpsModel model(&session);
    QAbstractItemModelTester tester(&model, QAbstractItemModelTester::FailureReportingMode::QtTest);
    QSignalSpy staged(&model, &PendingOpsModel::staged);
    QSignalSpy refused(&model, &PendingOpsModel::stageRefused);

    // Sequenced: the add-leg validates only because the create before it is staged.
    model.stage(Mirror("m1", l[0], l[1]));
    model.stage(Op("array.add_leg", {{"name", "m1"}, {"leg", l[2].toStdString()}}));
    QTRY_COMPARE_WITH_TIMEOUT(staged.count(), 2, 5000);
    QCOMPARE(refused.count(), 0);
    QCOMPARE(Methods(model), (QStringList{"array.create", "array.add_leg"}));
    QCOMPARE(model.index(0).data().toString(), QStringLiteral("array.create m1"));
    QCOMPARE(model.index(0).data(PendingOpsModel::StatusRole).toString(), QStringLiteral("pending"));

    // l1 again: refused for the new operation (index 2), with the reason; not added.
    model.stage(Mirror("m2", l[1], l[3]));
    QTRY_COMPARE_WITH_TIMEOUT(refused.count(), 1, 5000);
    QCOMPARE(refused[0][1].toString(), QStringLiteral("leg_in_use"));
    QCOMPARE(refused[0][2].toInt(), 2);
    QVERIFY2(refused[0][0].toString().contains("array:m1/slot:1"), qPrintable(refused[0][0].toString()));
    QCOMPARE(model.rowCount(), 2);
    QCOMPARE(staged.count(), 2);

    // Undo / redo.
    QVERIFY(model.canUndo());
    QVERIFY(!model.canRedo());
    model.undo();
    QCOMPARE(Methods(model), QStringList{"array.create"});
    QVERIFY(model.canRedo());
    model.undo();
    QCOMPARE(model.rowCount(), 0);
    QVERIFY(!model.canUndo());
    model.redo();
    model.redo();
    QCOMPARE(Methods(model), (QStringList{"array.create", "array.add_leg"}));
    QVERIFY(!model.canRedo());
    model.remove(1);
    QCOMPARE(model.rowCount(), 1);
    model.undo();
    QCOMPARE(model.rowCount(), 2);

    // An export of m1: valid after the staged create.
    model.stage(Op("export.add", {{"name", "e1"}, {"array", "m1"}, {"allow", {"anonymous:rw"}}}));
    QTRY_COMPARE_WITH_TIMEOUT(staged.count(), 3, 5000);
    QCOMPARE(model.rowCount(), 3);
    QCOMPARE(ArrayCount(d), 0);  // staging validated only

    // Apply: per-step progress from apply_step events, then the report; the list empties.
    QSignalSpy steps(&model, &PendingOpsModel::stepFinished);
    QSignalSpy applied(&model, &PendingOpsModel::applied);
    model.apply();
    QVERIFY(model.applying());
    QVERIFY(!model.canUndo());
    QTRY_COMPARE_WITH_TIMEOUT(applied.count(), 1, 15000);
    QVERIFY2(applied[0][0].toBool(), qPrintable(applied[0][1].toString()));
    QTRY_COMPARE_WITH_TIMEOUT(steps.count(), 3, 5000);
    for (int i = 0; i < 3; ++i) {
      QCOMPARE(steps[i][0].toInt(), i);
      QCOMPARE(steps[i][2].toString(), QStringLiteral("done"));
    }
    QCOMPARE(steps[1][1].toString(), QString("array add-leg m1 %1").arg(l[2]));
    QCOMPARE(model.rowCount(), 0);
    QCOMPARE(model.lastReport()["done"].size(), std::size_t(3));
    QCOMPARE(ArrayCount(d), 1);
    QByteArray out;
    QCOMPARE(d.Ctl({"export", "list", "--json"}, &out), 0);
    QVERIFY2(out.contains("\"e1\""), out.constData());

    // A failing step (a remote nobody serves): the run stops there; that row keeps its error,
    // the one after it is pending again.
    const std::string uri = "dst://127.0.0.1:" + std::to_string(FreePort()) + "/x";
    model.stage(Op("volume.import", {{"name", "rv"}, {"uri", uri}}));
    model.stage(Op("export.add", {{"name", "e2"}, {"path", (dir.path() + "/e2.img").toStdString()},
                                  {"size", "1M"}, {"allow", {"anonymous:rw"}}}));
    QTRY_COMPARE_WITH_TIMEOUT(staged.count(), 5, 5000);
    model.apply();
    QTRY_COMPARE_WITH_TIMEOUT(applied.count(), 2, 30000);
    QVERIFY(!applied[1][0].toBool());
    QVERIFY2(applied[1][1].toString().contains("operation 0 (volume.import)"),
             qPrintable(applied[1][1].toString()));
    QCOMPARE(Methods(model), (QStringList{"volume.import", "export.add"}));
    QCOMPARE(model.index(0).data(PendingOpsModel::StatusRole).toString(), QStringLiteral("failed"));
    QVERIFY(!model.index(0).data(PendingOpsModel::ErrorRole).toString().isEmpty());
    QCOMPARE(model.index(1).data(PendingOpsModel::StatusRole).toString(), QStringLiteral("pending"));
    QCOMPARE(d.Ctl({"export", "list", "--json"}, &out), 0);
    QVERIFY2(!out.contains("\"e2\""), out.constData());
  }
};

DST_TEST_MAIN(PendingOpsModelTest)
#include "pending_ops_model_test.moc"
