// Smoke run of the side-by-side benchmark (label `bench`): runs `bench/nbd_bench.sh --quick`
// with every server (dstd, nbdkit, qemu-nbd, nbdfuse, the in-RAM FUSE ceiling) and checks that
// the table it prints is complete and self-consistent.  The numbers themselves are not judged (a
// loaded CI machine is slow), but every cell must be a measured positive value, every ratio must
// match its cells, every group must have its rows, and the allocation table must have a count
// for every dst process.
#include <QFile>
#include <QProcess>
#include <QSet>
#include <QTemporaryDir>

#include <cmath>

#include "test_env.h"

namespace {

const QStringList kQuickRows = {"seq-read-1M-qd8", "seq-write-1M-qd8", "rand-read-4K-qd32",
                                "rand-write-4K-qd32"};
// group -> anchors expected for each row
const QList<QPair<QString, QStringList>> kGroups = {
    {"nbd", {"nbdkit", "qemu-nbd"}},
    {"fuse-direct", {"nbdfuse+nbdkit"}},
    {"fuse-buffered", {"nbdfuse+nbdkit"}},
    {"fuse-local", {"ram-fuse-ceiling"}},
    {"e2e", {"loop+ext4-tmpfs"}},
    {"protocol", {"nbdfuse+dst-nbd"}},
};

bool ParsePositive(const QString& s, double* v) {
  bool ok = false;
  *v = s.trimmed().toDouble(&ok);
  return ok && *v > 0 && std::isfinite(*v);
}

}  // namespace

class NbdBenchTest : public QObject {
  Q_OBJECT

 private slots:
  void initTestCase() {
    DST_REQUIRE(dst::test::IsRoot(), "the benchmark mounts tmpfs, FUSE, loop and ext4: needs root");
    DST_REQUIRE(dst::test::HaveFuse(), "/dev/fuse not usable");
    DST_REQUIRE(dst::test::HaveTool("fio") && dst::test::HaveTool("jq"), "fio or jq not installed");
    DST_REQUIRE(dst::test::HaveTool("nbdkit") && dst::test::HaveTool("qemu-nbd") &&
                    dst::test::HaveTool("nbdfuse"),
                "nbdkit, qemu-nbd or nbdfuse not installed");
    DST_REQUIRE(dst::test::HaveTool("losetup") && dst::test::HaveTool("mkfs.ext4"),
                "losetup or mkfs.ext4 not installed");
  }

  void quickRunProducesConsistentTable() {
    QTemporaryDir tmp;
    QVERIFY(tmp.isValid());
    const QString out = tmp.filePath("nbd-latest.md");
    const QString script = QString::fromLocal8Bit(qgetenv("DST_SOURCE_DIR")) + "/bench/nbd_bench.sh";
    QVERIFY2(QFile::exists(script), qPrintable("missing " + script));

    QProcess p;
    p.setProcessChannelMode(QProcess::SeparateChannels);
    p.start("bash", {script, "--quick", "--build-dir", QString::fromStdString(dst::test::BuildDir()),
                     "--out", out});
    QVERIFY(p.waitForStarted());
    if (!p.waitForFinished(200000)) {
      p.kill();
      p.waitForFinished();
      QFAIL("bench/nbd_bench.sh --quick took longer than 200 s");
    }
    const QByteArray err = p.readAllStandardError();
    const QByteArray stdout_text = p.readAllStandardOutput();
    if (p.exitStatus() != QProcess::NormalExit || p.exitCode() != 0) {
      qWarning().noquote() << "stderr:\n" << err << "\nstdout:\n" << stdout_text;
      QFAIL("bench/nbd_bench.sh --quick failed");
    }
    qInfo().noquote() << "\n" << stdout_text;

    QFile f(out);
    QVERIFY2(f.open(QIODevice::ReadOnly), "no results file written");
    const QString text = QString::fromUtf8(f.readAll());
    QCOMPARE(QString::fromUtf8(stdout_text), text);  // stdout and the file carry the same table
    QVERIFY(text.contains("- machine: "));
    QVERIFY(text.contains("- dst NBD server: "));

    QSet<QString> seen;
    int alloc_rows = 0;
    for (const QString& line : text.split('\n')) {
      if (!line.startsWith("| ") || line.startsWith("| group ") || line.startsWith("| process ")) continue;
      const QStringList c = line.split('|');
      if (c.size() == 7) {  // "", process, workload, allocations, I/Os, allocations/I/O, ""
        bool ok = false;
        const qlonglong n = c[3].trimmed().toLongLong(&ok);
        QVERIFY2(ok && n >= 0, qPrintable(line));
        double ios, per;
        QVERIFY2(ParsePositive(c[4], &ios), qPrintable(line));
        QVERIFY2(c[5].trimmed().toDouble(&ok) >= 0 && ok, qPrintable(line));
        per = c[5].trimmed().toDouble();
        QVERIFY2(std::fabs(per - n / ios) <= 0.0001 + 0.001 * per, qPrintable(line));
        ++alloc_rows;
        continue;
      }
      // "", group, row, unit, dst, anchor, anchor value, dst/anchor, target, met, ""
      QCOMPARE(c.size(), 11);
      const QString group = c[1].trimmed(), row = c[2].trimmed(), anchor = c[5].trimmed();
      QVERIFY2(kQuickRows.contains(row), qPrintable("unexpected row " + row));
      const QString key = group + "/" + row + "/" + anchor;
      QVERIFY2(!seen.contains(key), qPrintable("duplicate " + key));
      seen << key;
      QCOMPARE(c[3].trimmed(), row.startsWith("seq") ? QString("MB/s") : QString("IOPS"));
      double dst, anc, r;
      QVERIFY2(ParsePositive(c[4], &dst), qPrintable(line));
      QVERIFY2(ParsePositive(c[6], &anc), qPrintable(line));
      QVERIFY2(ParsePositive(c[7], &r), qPrintable(line));
      QVERIFY2(std::fabs(r - dst / anc) <= 0.006 + 0.001 * r, qPrintable(line));
      const QString target = c[8].trimmed(), met = c[9].trimmed();
      if (target != "-") {
        double t;
        QVERIFY2(ParsePositive(target, &t), qPrintable(line));
        QCOMPARE(met, r >= t ? QString("yes") : QString("no"));
      } else {
        QCOMPARE(met, QString("-"));
      }
    }
    int expected = 0;
    for (const auto& g : kGroups) {
      for (const QString& row : kQuickRows) {
        for (const QString& a : g.second) {
          QVERIFY2(seen.contains(g.first + "/" + row + "/" + a), qPrintable("missing " + g.first + "/" + row + "/" + a));
          ++expected;
        }
      }
    }
    QCOMPARE(seen.size(), expected);
    // (NBD server, FUSE importer, FUSE exporter, FUSE local, in-RAM ceiling) x (randread, randwrite)
    QCOMPARE(alloc_rows, 10);
  }
};

DST_TEST_MAIN(NbdBenchTest)
#include "nbd_bench_test.moc"
