// Smoke run of bench/eth_io_bench (label `bench`): `--seconds 0.3 --reps 1` on its own veth pair.
// Speeds are not judged (a busy CI machine is slow), but every transport must have completed
// I/O in every workload and the RATIO lines must be printed.
#include <QProcess>
#include <QRegularExpression>

#include "test_env.h"

class EthIoBenchTest : public QObject {
  Q_OBJECT

 private slots:
  void initTestCase() {
    DST_REQUIRE(dst::test::IsRoot(), "network namespaces and AF_PACKET sockets need root");
    DST_REQUIRE(dst::test::HaveTool("ip"), "iproute2 (ip) not installed");
  }

  void quickRunReportsEveryTransport() {
    QProcess p;
    p.start(QString::fromStdString(dst::test::BinPath("eth_io_bench")), {"--seconds", "0.3", "--reps", "1", "--size-mib", "64"});
    QVERIFY(p.waitForStarted());
    if (!p.waitForFinished(150000)) {
      p.kill();
      p.waitForFinished();
      QFAIL("eth_io_bench did not finish");
    }
    const QString text = QString::fromUtf8(p.readAllStandardOutput()) + QString::fromUtf8(p.readAllStandardError());
    qInfo().noquote() << "\n" << text;
    QCOMPARE(p.exitCode(), 0);
    QStringList seen;
    auto it = QRegularExpression("RESULT transport=([a-z_]+) rand4k_qd32_iops=([0-9]+) seq1m_write_mib_s=([0-9.]+) "
                                 "seq1m_read_mib_s=([0-9.]+)")
                  .globalMatch(text);
    while (it.hasNext()) {
      const auto m = it.next();
      seen << m.captured(1);
      for (int i = 2; i <= 4; ++i) QVERIFY2(m.captured(i).toDouble() > 0, qPrintable(m.captured(0)));
    }
    QCOMPARE(seen, (QStringList{"tcp", "eth", "eth_sealed", "eth_first"}));
    QVERIFY(text.contains(QRegularExpression("RATIO eth/tcp rand4k_qd32_iops=[0-9.]+ target=1.00")));
    QVERIFY(text.contains(QRegularExpression("RATIO eth/tcp seq1m_write=[0-9.]+ seq1m_read=[0-9.]+")));
    QVERIFY(text.contains(QRegularExpression("RATIO eth_sealed/eth rand4k_qd32_iops=[0-9.]+")));
    QVERIFY(text.contains(QRegularExpression("RATIO eth/eth_first rand4k_qd32_iops=[0-9.]+ seq1m_write=[0-9.]+")));
  }
};

DST_TEST_MAIN(EthIoBenchTest)
#include "eth_io_bench_test.moc"
