// Smoke run of the flood and fairness benchmark (label `bench`): `bench/flood_bench.sh --quick`
// against a real dstd, all three attacks (held, slowdrain, trickle).  Speeds are not judged (a
// busy CI machine is slow), but under each attack the legitimate client must keep its connection
// and do I/O with no request stalled for 5 s (conn_flood's receive timeout: the slow readers used
// to freeze it for good), the held flood must have been refused or closed by dstd's caps (300
// connections from one /24 against max_connections = 256), and dstd's fd count must stay within
// its cap plus its own descriptors.
#include <QProcess>
#include <QRegularExpression>

#include "test_env.h"

class FloodBenchTest : public QObject {
  Q_OBJECT

 private slots:
  void quickRunKeepsTheLegitimateClient() {
    const QString script = QString::fromLocal8Bit(qgetenv("DST_SOURCE_DIR")) + "/bench/flood_bench.sh";
    QProcess p;
    p.start("bash", {script, "--quick", "--build-dir", QString::fromStdString(dst::test::BuildDir())});
    QVERIFY(p.waitForStarted());
    if (!p.waitForFinished(100000)) {
      p.kill();
      p.waitForFinished();
      QFAIL("bench/flood_bench.sh --quick took longer than 100 s");
    }
    const QString out = QString::fromUtf8(p.readAllStandardOutput());
    const QString err = QString::fromUtf8(p.readAllStandardError());
    qInfo().noquote() << "\n" << out << err;
    QCOMPARE(p.exitCode(), 0);
    QStringList attacks;
    auto it = QRegularExpression(
                  "RESULT ratio=([0-9.]+) alone_iops=([0-9]+) loaded_iops=([0-9]+) max_stall_ms=([0-9.]+) "
                  "rss_mib=([0-9.]+) fds=([0-9]+) ok=([01]) attack=([a-z]+)")
                  .globalMatch(out);
    while (it.hasNext()) {
      const auto m = it.next();
      attacks << m.captured(8);
      QVERIFY2(m.captured(7) == "1", qPrintable("legitimate client lost under " + m.captured(8)));
      QVERIFY(m.captured(2).toDouble() > 0);
      QVERIFY(m.captured(3).toDouble() > 0);
      // max_connections = 256 (DST and NBD servers) plus dstd's own descriptors.
      QVERIFY2(m.captured(6).toInt() < 256 + 100, qPrintable("dstd fds " + m.captured(6)));
    }
    QCOMPARE(attacks, QStringList({"held", "slowdrain", "trickle"}));
    const auto f = QRegularExpression("flood: ([0-9]+) connections opened, ([0-9]+) closed by dstd").match(out);
    QVERIFY(f.hasMatch());
    QVERIFY2(f.captured(2).toULongLong() >= 300 - 256, "dstd closed none of the flood");
  }
};

DST_TEST_MAIN(FloodBenchTest)
#include "flood_bench_test.moc"
