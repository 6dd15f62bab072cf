// Smoke run of the array benchmark (label `bench`): `bench/arrays_bench.sh --quick` against real
// daemons; checks that the table is complete and self-consistent.  Speeds are not judged (a busy
// CI machine is slow), but every cell must be a measured positive number, each ratio must match
// its cells, and the resync rows must show what the mirror promises: the partial resync of 1 %
// dirty regions moves exactly those regions, far fewer bytes than the full one, which moves the
// whole array.
#include <QFile>
#include <QProcess>
#include <QRegularExpression>
#include <QTemporaryDir>

#include <cmath>

#include "test_env.h"

namespace {

const QStringList kRows = {"seq-write-1M-qd32", "rand-write-4K-qd32", "rand-read-4K-qd32",
                           "intent-rand-write-4K-qd32", "resync-time", "resync-bytes",
                           "resync-vs-copy", "sqlite-commits"};

bool ParsePositive(const QString& s, double* v) {
  bool ok = false;
  *v = s.trimmed().toDouble(&ok);
  return ok && *v > 0 && std::isfinite(*v);
}

}  // namespace

class ArraysBenchTest : public QObject {
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
    const QString out = tmp.filePath("arrays.md");
    const QString script = QString::fromLocal8Bit(qgetenv("DST_SOURCE_DIR")) + "/bench/arrays_bench.sh";
    QVERIFY2(QFile::exists(script), qPrintable("missing " + script));
    QProcess p;
    p.start("bash", {script, "--quick", "--build-dir", QString::fromStdString(dst::test::BuildDir()), "--out", out});
    QVERIFY(p.waitForStarted());
    if (!p.waitForFinished(170000)) {
      p.kill();
      p.waitForFinished();
      QFAIL("bench/arrays_bench.sh --quick took longer than 170 s");
    }
    const QByteArray err = p.readAllStandardError();
    const QByteArray text_out = p.readAllStandardOutput();
    if (p.exitStatus() != QProcess::NormalExit || p.exitCode() != 0) {
      qWarning().noquote() << "stderr:\n" << err << "\nstdout:\n" << text_out;
      QFAIL("bench/arrays_bench.sh --quick failed");
    }
    qInfo().noquote() << "\n" << text_out;
    QFile f(out);
    QVERIFY2(f.open(QIODevice::ReadOnly), "no results file written");
    const QString text = QString::fromUtf8(f.readAll());
    QCOMPARE(QString::fromUtf8(text_out), text);

    QMap<QString, QPair<double, double>> cells;
    for (const QString& line : text.split('\n')) {
      if (!line.startsWith("| ") || line.startsWith("| row ")) continue;
      const QStringList c = line.split('|');
      // "", row, unit, baseline, baseline value, array value, ratio, ""
      QCOMPARE(c.size(), 8);
      const QString row = c[1].trimmed();
      QVERIFY2(kRows.contains(row), qPrintable("unexpected row " + row));
      QVERIFY2(!cells.contains(row), qPrintable("duplicate row " + row));
      double base = 0, val = 0, ratio = 0;
      QVERIFY2(ParsePositive(c[4], &base), qPrintable(line));
      QVERIFY2(ParsePositive(c[5], &val), qPrintable(line));
      QVERIFY2(ParsePositive(c[6], &ratio), qPrintable(line));
      QVERIFY2(std::abs(ratio - val / base) <= 0.01 + 0.01 * val / base, qPrintable("ratio mismatch: " + line));
      cells[row] = {base, val};
    }
    for (const QString& r : kRows) QVERIFY2(cells.contains(r), qPrintable("missing row " + r));

    // Resync accounting: full = whole array (64 MiB legs - 4 KiB header), partial = 1 % regions.
    const double full = cells["resync-bytes"].first, partial = cells["resync-bytes"].second;
    QCOMPARE(full, double((64 << 20) - 4096));
    const int regions = 64 * 16 - 1;
    QCOMPARE(partial, double((regions / 100) * 65536));
    QVERIFY(cells["resync-time"].second < cells["resync-time"].first);
  }
};

DST_TEST_MAIN(ArraysBenchTest)
#include "arrays_bench_test.moc"
