// Smoke run of the benchmark (label `bench`): runs `bench/run.sh --quick` against the real
// daemons and checks that the table it prints is complete and self-consistent.  The numbers
// themselves are not judged (a loaded CI machine is slow), but every cell must be a measured
// positive value, the ratios must match the cells, and the unbatched transmitters must really
// send at most one frame per send call.
#include <QDir>
#include <QFile>
#include <QProcess>
#include <QRegularExpression>
#include <QTemporaryDir>

#include <cmath>

#include "test_env.h"

namespace {

const QStringList kRows = {"seq-read-1M-qd1",   "seq-read-1M-qd32",  "seq-write-1M-qd1",
                           "seq-write-1M-qd32", "rand-read-4K-qd1",  "rand-read-4K-qd32",
                           "rand-write-4K-qd1", "rand-write-4K-qd32"};

bool ParsePositive(const QString& s, double* v) {
  bool ok = false;
  *v = s.trimmed().toDouble(&ok);
  return ok && *v > 0 && std::isfinite(*v);
}

}  // namespace

class BenchTest : public QObject {
  Q_OBJECT

 private slots:
  void initTestCase() {
    DST_REQUIRE(dst::test::IsRoot(), "the benchmark mounts tmpfs and FUSE: needs root");
    DST_REQUIRE(dst::test::HaveFuse(), "/dev/fuse not usable");
    DST_REQUIRE(dst::test::HaveTool("fio"), "fio not installed");
    DST_REQUIRE(dst::test::HaveTool("jq"), "jq not installed");
  }

  void quickRunProducesConsistentTable() {
    QTemporaryDir tmp;
    QVERIFY(tmp.isValid());
    const QString out = tmp.filePath("latest.md");
    const QString script = QString::fromLocal8Bit(qgetenv("DST_SOURCE_DIR")) + "/bench/run.sh";
    QVERIFY2(QFile::exists(script), qPrintable("missing " + script));

    QProcess p;
    p.setProcessChannelMode(QProcess::SeparateChannels);
    p.start("bash", {script, "--quick", "--build-dir", QString::fromStdString(dst::test::BuildDir()),
                     "--out", out});
    QVERIFY(p.waitForStarted());
    if (!p.waitForFinished(150000)) {
      p.kill();
      p.waitForFinished();
      QFAIL("bench/run.sh --quick took longer than 150 s");
    }
    const QByteArray err = p.readAllStandardError();
    const QByteArray stdout_text = p.readAllStandardOutput();
    if (p.exitStatus() != QProcess::NormalExit || p.exitCode() != 0) {
      qWarning().noquote() << "stderr:\n" << err << "\nstdout:\n" << stdout_text;
      QFAIL("bench/run.sh --quick failed");
    }
    qInfo().noquote() << "\n" << stdout_text;

    QFile f(out);
    QVERIFY2(f.open(QIODevice::ReadOnly), "no results file written");
    const QString text = QString::fromUtf8(f.readAll());
    QCOMPARE(QString::fromUtf8(stdout_text), text);  // stdout and the file carry the same table

    QStringList seen;
    for (const QString& line : text.split('\n')) {
      if (!line.startsWith("| ") || line.startsWith("| row ")) continue;
      const QStringList c = line.split('|');
      // "", row, unit, local, batched, unbatched, dst/local, b/u, fps batched, fps unbatched, ""
      QCOMPARE(c.size(), 11);
      const QString row = c[1].trimmed();
      QVERIFY2(kRows.contains(row), qPrintable("unexpected row " + row));
      QVERIFY2(!seen.contains(row), qPrintable("duplicate row " + row));
      seen << row;
      const QString unit = c[2].trimmed();
      QCOMPARE(unit, row.startsWith("seq") ? QString("MB/s") : QString("IOPS"));

      double local, batched, unbatched, r_local, r_batch;
      QVERIFY2(ParsePositive(c[3], &local), qPrintable(row + ": local " + c[3]));
      QVERIFY2(ParsePositive(c[4], &batched), qPrintable(row + ": batched " + c[4]));
      QVERIFY2(ParsePositive(c[5], &unbatched), qPrintable(row + ": unbatched " + c[5]));
      QVERIFY2(ParsePositive(c[6], &r_local), qPrintable(row + ": dst/local " + c[6]));
      QVERIFY2(ParsePositive(c[7], &r_batch), qPrintable(row + ": batched/unbatched " + c[7]));
      // Ratios are printed with two decimals from the printed cells.
      QVERIFY2(std::fabs(r_local - batched / local) <= 0.006 + 0.001 * r_local, qPrintable(line));
      QVERIFY2(std::fabs(r_batch - batched / unbatched) <= 0.006 + 0.001 * r_batch, qPrintable(line));

      // Frames per send call "B->A, A->B": every row moves frames both ways.
      for (int col : {8, 9}) {
        const QStringList fps = c[col].split(',');
        QCOMPARE(fps.size(), 2);
        for (const QString& v : fps) {
          double x;
          QVERIFY2(ParsePositive(v, &x), qPrintable(row + ": frames per send '" + c[col] + "'"));
          // One frame per call when unbatched; a large frame may need several calls (< 1).
          if (col == 9) QVERIFY2(x <= 1.0 + 1e-9, qPrintable(row + ": unbatched sent " + v + " frames per call"));
        }
      }
    }
    QCOMPARE(seen.size(), kRows.size());
  }
};

DST_TEST_MAIN(BenchTest)
#include "bench_test.moc"
