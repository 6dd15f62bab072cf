// Smoke run of bench/compare.sh (label `bench`): compares this build with itself (both sides use
// the build under test, so CI does not build twice) with one short rep, and checks the table:
// every group has every row, every cell is a measured positive value, the medians are the medians
// of the runs shown, new/old matches them, and `met` and the exit status follow --min-ratio.
// A second run with an unreachable --min-ratio must report every row as not met and exit 1.
// The numbers themselves are not judged: a loaded CI machine is slow.
#include <QFile>
#include <QProcess>
#include <QSet>
#include <QTemporaryDir>

#include <algorithm>
#include <cmath>

#include "test_env.h"

namespace {

const QStringList kRows = {"seq-read-1M-qd8", "seq-write-1M-qd8", "rand-read-4K-qd32",
                           "rand-write-4K-qd32"};
const QStringList kGroups = {"nbd", "fuse"};

bool ParsePositive(const QString& s, double* v) {
  bool ok = false;
  *v = s.trimmed().toDouble(&ok);
  return ok && *v > 0 && std::isfinite(*v);
}

double Median(QList<double> v) {
  std::sort(v.begin(), v.end());
  const int n = int(v.size());
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

struct Run {
  int exit_code = -1;
  QString table;
};

}  // namespace

class CompareTest : public QObject {
  Q_OBJECT

 private slots:
  void initTestCase() {
    DST_REQUIRE(dst::test::IsRoot(), "the comparison mounts tmpfs and FUSE: needs root");
    DST_REQUIRE(dst::test::HaveFuse(), "/dev/fuse not usable");
    DST_REQUIRE(dst::test::HaveTool("fio") && dst::test::HaveTool("jq") && dst::test::HaveTool("git"),
                "fio, jq or git not installed");
  }

  void selfComparisonTableIsConsistent() {
    const Run r = RunCompare({"--reps", "2", "--runtime", "0.3", "--min-ratio", "0.01"});
    QCOMPARE(r.exit_code, 0);
    CheckTable(r.table, 2, 0.01);
    QVERIFY(r.table.contains("verdict: every row at or above 0.01x"));
  }

  void unmetRatioFailsTheRun() {
    const Run r = RunCompare({"--reps", "1", "--runtime", "0.3", "--min-ratio", "1000"});
    QCOMPARE(r.exit_code, 1);
    CheckTable(r.table, 1, 1000);
    QVERIFY(r.table.contains("verdict: 8 row(s) below 1000x"));
  }

  void unknownRevisionIsAClearError() {
    QProcess p;
    p.start("bash", {Script(), "no-such-rev-xyz", "HEAD", "--old-build", Build(), "--new-build", Build()});
    QVERIFY(p.waitForFinished(60000));
    QCOMPARE(p.exitCode(), 2);
    QVERIFY2(p.readAllStandardError().contains("unknown revision 'no-such-rev-xyz'"), "no clear error");
  }

 private:
  static QString Script() {
    return QString::fromLocal8Bit(qgetenv("DST_SOURCE_DIR")) + "/bench/compare.sh";
  }
  static QString Build() { return QString::fromStdString(dst::test::BuildDir()); }

  Run RunCompare(QStringList extra) {
    Run run;
    QTemporaryDir tmp;
    if (!tmp.isValid()) return run;
    const QString out = tmp.filePath("compare.md");
    QProcess p;
    p.setProcessChannelMode(QProcess::SeparateChannels);
    QStringList args = {Script(), "HEAD", "HEAD", "--old-build", Build(), "--new-build", Build(),
                        "--size", "64", "--out", out};
    args += extra;
    p.start("bash", args);
    if (!p.waitForStarted() || !p.waitForFinished(200000)) {
      p.kill();
      p.waitForFinished();
      qWarning("bench/compare.sh did not finish within 200 s");
      return run;
    }
    const QByteArray err = p.readAllStandardError();
    run.exit_code = p.exitStatus() == QProcess::NormalExit ? p.exitCode() : -1;
    if (run.exit_code != 0) qWarning().noquote() << "stderr:\n" << err;
    QFile f(out);
    if (f.open(QIODevice::ReadOnly)) run.table = QString::fromUtf8(f.readAll());
    qInfo().noquote() << "\n" << run.table;
    return run;
  }

  void CheckTable(const QString& text, int reps, double min_ratio) {
    QVERIFY2(text.contains("- machine: "), "no header");
    QSet<QString> seen;
    for (const QString& line : text.split('\n')) {
      if (!line.startsWith("| ") || line.startsWith("| group ")) continue;
      // "", group, row, unit, old, new, new/old, old runs, new runs, met, ""
      const QStringList c = line.split('|');
      QCOMPARE(c.size(), 11);
      const QString group = c[1].trimmed(), row = c[2].trimmed();
      QVERIFY2(kGroups.contains(group) && kRows.contains(row), qPrintable(line));
      QVERIFY2(!seen.contains(group + "/" + row), qPrintable("duplicate " + line));
      seen << group + "/" + row;
      QCOMPARE(c[3].trimmed(), row.startsWith("seq") ? QString("MB/s") : QString("IOPS"));
      double o, n, r;
      QVERIFY2(ParsePositive(c[4], &o) && ParsePositive(c[5], &n) && ParsePositive(c[6], &r),
               qPrintable(line));
      QVERIFY2(std::fabs(r - n / o) <= 0.006 + 0.001 * r, qPrintable(line));
      for (int side = 0; side < 2; ++side) {
        const QStringList runs = c[7 + side].trimmed().split(' ', Qt::SkipEmptyParts);
        QCOMPARE(runs.size(), reps);
        QList<double> v;
        for (const QString& s : runs) {
          double x;
          QVERIFY2(ParsePositive(s, &x), qPrintable(line));
          v << x;
        }
        QVERIFY2(std::fabs(Median(v) - (side ? n : o)) <= 0.051, qPrintable(line));
      }
      QCOMPARE(c[9].trimmed(), r >= min_ratio ? QString("yes") : QString("no"));
    }
    QCOMPARE(seen.size(), int(kRows.size() * kGroups.size()));
  }
};

DST_TEST_MAIN(CompareTest)
#include "compare_test.moc"
