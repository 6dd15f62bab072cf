// Smoke run of bench/eth_tx_bench (label `bench`): `--seconds 0.3 --reps 1` on its own veth pair.
// Speeds are not judged (a busy CI machine is slow), but every mode must have sent frames, the
// batched modes in batches (many frames per send call) and sendto one frame per call, and a
// RATIO line per batched mode must be printed.  A run with an unreachable --min-ratio exits 1.
#include <QProcess>
#include <QRegularExpression>

#include "test_env.h"

namespace {

struct Out {
  int code = -1;
  QString text;
};

Out RunBench(const QStringList& args) {
  QProcess p;
  p.start(QString::fromStdString(dst::test::BinPath("eth_tx_bench")), args);
  Out o;
  if (!p.waitForStarted() || !p.waitForFinished(60000)) {
    p.kill();
    p.waitForFinished();
    return o;
  }
  o.code = p.exitCode();
  o.text = QString::fromUtf8(p.readAllStandardOutput()) + QString::fromUtf8(p.readAllStandardError());
  return o;
}

}  // namespace

class EthTxBenchTest : public QObject {
  Q_OBJECT

 private slots:
  void initTestCase() {
    DST_REQUIRE(dst::test::IsRoot(), "network namespaces and AF_PACKET sockets need root");
    DST_REQUIRE(dst::test::HaveTool("ip"), "iproute2 (ip) not installed");
  }

  void quickRunReportsEveryMode() {
    const Out o = RunBench({"--seconds", "0.3", "--reps", "1"});
    qInfo().noquote() << "\n" << o.text;
    QCOMPARE(o.code, 0);
    QMap<QString, double> per_call;
    auto it = QRegularExpression("RESULT mode=([a-z_]+) frames_per_s=([0-9]+) frames_per_call=([0-9.]+)")
                  .globalMatch(o.text);
    while (it.hasNext()) {
      const auto m = it.next();
      QVERIFY2(m.captured(2).toDouble() > 0, qPrintable(m.captured(1) + " sent nothing"));
      per_call[m.captured(1)] = m.captured(3).toDouble();
    }
    QCOMPARE(per_call.keys(), (QList<QString>{"sendmmsg", "sendto", "tx_ring"}));
    QCOMPARE(per_call["sendto"], 1.0);
    QVERIFY(per_call["sendmmsg"] > 10);
    QVERIFY(per_call["tx_ring"] > 10);
    QVERIFY(o.text.contains(QRegularExpression("RATIO sendmmsg/sendto=[0-9.]+ target=1.40")));
    QVERIFY(o.text.contains(QRegularExpression("RATIO tx_ring/sendto=[0-9.]+ target=1.40")));
  }

  void unreachableRatioFails() {
    const Out o = RunBench({"--seconds", "0.1", "--reps", "1", "--min-ratio", "1000"});
    QCOMPARE(o.code, 1);
    QVERIFY(o.text.contains("below --min-ratio"));
  }
};

DST_TEST_MAIN(EthTxBenchTest)
#include "eth_tx_bench_test.moc"
