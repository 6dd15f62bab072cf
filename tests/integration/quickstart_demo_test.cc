// The README's first command end to end: `packaging/quickstart.sh demo` (without apt, on the
// build tree under test) must finish with "demo OK".  It generates a PSK with `dstctl key
// generate`, starts two exporters and an assembler that speak DST only inside TLS 1.3, builds a
// mirror over dsts:// legs, loop-mounts ext4 on its FUSE file, writes and reads back 16 MiB and
// waits for the initial sync.  The script tears everything down itself (trap), also on failure.
#include <QProcess>

#include "test_env.h"

class QuickstartDemoTest : public QObject {
  Q_OBJECT

 private slots:
  void demoRunsOverTls() {
    DST_REQUIRE(dst::test::IsRoot() && dst::test::HaveFuse() && QFile::exists("/dev/loop-control") &&
                    dst::test::HaveTool("losetup") && dst::test::HaveTool("mkfs.ext4"),
                "needs root, /dev/fuse, loop devices, util-linux and e2fsprogs");
    const QString script =
        QString::fromLocal8Bit(qgetenv("DST_SOURCE_DIR")) + "/packaging/quickstart.sh";
    QProcess p;
    p.setProcessChannelMode(QProcess::MergedChannels);
    p.start("bash", {script, "demo", "--no-deps", "--build-dir",
                     QString::fromStdString(dst::test::BuildDir())});
    QVERIFY(p.waitForStarted());
    if (!p.waitForFinished(360000)) {
      p.terminate();  // the script's trap unmounts, detaches and stops its daemons
      if (!p.waitForFinished(60000)) p.kill();
      p.waitForFinished();
      QFAIL("quickstart.sh demo took longer than 360 s");
    }
    const QString out = QString::fromUtf8(p.readAll());
    qInfo().noquote() << "\n" << out.right(6000);
    QCOMPARE(p.exitCode(), 0);
    QVERIFY(out.contains("==> demo OK"));
    QVERIFY2(out.contains("wrote ") && out.contains("mode 0600"), "no PSK generated");
    QVERIFY2(out.contains("demo : active mirror dsts://127.0.0.1:"), "the mirror's legs are not dsts://");
    QVERIFY(out.contains("read back OK"));
  }
};

DST_TEST_MAIN(QuickstartDemoTest)
#include "quickstart_demo_test.moc"
