// The Debian packages (issue 14 item 3): `cpack -G DEB` from this build tree, then lintian
// must report no error, and the packages must carry what Debian policy and users expect:
// copyright and changelog in each doc directory, gzipped man pages, the example config under
// /usr/share/doc, the shell completions, and the Type=notify unit with a watchdog.  Then they
// are installed into a clean Debian root made by mmdebstrap (it downloads from the host's apt
// sources, as `quickstart.sh` does) and run there.
#include <QDir>
#include <QRegularExpression>
#include <QStandardPaths>
#include <QTemporaryDir>
#include <QtTest/QtTest>

#include "run_tool.h"
#include "test_env.h"

using namespace dst::test;

namespace {

QString CpackBuildDir() { return qEnvironmentVariable("DST_BUILD_DIR"); }

}  // namespace

class PackageTest : public QObject {
  Q_OBJECT

 private slots:
  void initTestCase() {
    for (const char* tool : {"cpack", "dpkg-deb", "lintian"})
      DST_REQUIRE(!QStandardPaths::findExecutable(tool).isEmpty(), "needs cpack, dpkg-deb and lintian");
    DST_REQUIRE(QFile::exists(CpackBuildDir() + "/CPackConfig.cmake"), "no CPackConfig.cmake in DST_BUILD_DIR");
    QVERIFY(out_.isValid());
    const ToolResult r = RunTool("cpack", {"-G", "DEB", "--config", CpackBuildDir() + "/CPackConfig.cmake", "-B", out_.path()},
                                 240000);
    QVERIFY2(r.rc == 0, (r.out + r.err).right(3000).constData());
    for (const QString& f : QDir(out_.path()).entryList({"*.deb"})) debs_ << out_.path() + "/" + f;
    gui_ = QFile::exists(CpackBuildDir() + "/bin/dst-gui");
    QCOMPARE(debs_.size(), gui_ ? 3 : 2);
  }

  // lintian: no E: tag (warnings are printed for the record).
  void lintianClean() {
    const ToolResult r = RunTool("lintian", QStringList{"--tag-display-limit", "0"} + debs_, 180000);
    const QString text = QString::fromUtf8(r.out + r.err);
    qInfo("lintian:\n%s", qPrintable(text));
    const QRegularExpression error("^E: ", QRegularExpression::MultilineOption);
    QVERIFY2(!text.contains(error), qPrintable(text));
    QVERIFY2(r.rc == 0, qPrintable(text));
  }

  void contents() {
    QString all;
    for (const QString& d : debs_) {
      const ToolResult r = RunTool("dpkg-deb", {"-c", d});
      QCOMPARE(r.rc, 0);
      all += QString::fromUtf8(r.out);
    }
    for (const char* f : {"./usr/sbin/dstd", "./usr/bin/dstctl", "./usr/share/man/man8/dstd.8.gz",
                          "./usr/share/man/man8/dstctl.8.gz", "./usr/share/doc/dst-daemon/copyright",
                          "./usr/share/doc/dst-cli/copyright", "./usr/share/doc/dst-daemon/changelog.Debian.gz",
                          "./usr/share/doc/dst-cli/changelog.Debian.gz", "./usr/share/doc/dst-daemon/examples/dstd.toml",
                          "./usr/share/dst/dstd.toml.example", "./usr/share/bash-completion/completions/dstctl",
                          "./usr/share/zsh/vendor-completions/_dstctl", "./usr/lib/systemd/system/dstd.service"})
      QVERIFY2(all.contains(QString(f) + "\n"), qPrintable(QString("%1 missing from the packages:\n%2").arg(f, all)));

    QTemporaryDir x;
    const QString daemon = debs_.filter("dst-daemon").value(0);
    QVERIFY(!daemon.isEmpty());
    QCOMPARE(RunTool("dpkg-deb", {"-x", daemon, x.path()}).rc, 0);
    QFile unit(x.path() + "/usr/lib/systemd/system/dstd.service");
    QVERIFY(unit.open(QIODevice::ReadOnly));
    const QByteArray u = unit.readAll();
    QVERIFY(u.contains("\nType=notify\n") && u.contains("\nWatchdogSec=") && u.contains("\nNotifyAccess=main\n"));
    const ToolResult dep = RunTool("dpkg-deb", {"-f", daemon, "Depends"});
    QVERIFY2(dep.out.contains("libsystemd0") && dep.out.contains("fuse3") && dep.out.contains("adduser"), dep.out.constData());
    // The binary in the package is the one this tree built, and it runs.
    const ToolResult v = RunTool(x.path() + "/usr/sbin/dstd", {"--version"});
    QVERIFY2(v.rc == 0 && !v.out.trimmed().isEmpty(), (v.out + v.err).constData());
  }

  // dst-gui: the binary, desktop entry, icon, man page and docs; Qt from dpkg-shlibdeps; the
  // packaged binary runs (offscreen).
  void guiPackage() {
    DST_REQUIRE(gui_, "the GUI is not built (DST_BUILD_GUI=OFF)");
    const QString gui = debs_.filter("dst-gui").value(0);
    QVERIFY(!gui.isEmpty());
    const ToolResult c = RunTool("dpkg-deb", {"-c", gui});
    QCOMPARE(c.rc, 0);
    for (const char* f : {"./usr/bin/dst-gui", "./usr/share/applications/dst-gui.desktop",
                          "./usr/share/icons/hicolor/scalable/apps/dst-gui.svg", "./usr/share/man/man1/dst-gui.1.gz",
                          "./usr/share/doc/dst-gui/copyright", "./usr/share/doc/dst-gui/changelog.Debian.gz"})
      QVERIFY2(c.out.contains(QByteArray(f) + "\n"), qPrintable(QString("%1 missing from dst-gui:\n%2").arg(QString::fromLatin1(f), QString::fromUtf8(c.out))));
    const ToolResult dep = RunTool("dpkg-deb", {"-f", gui, "Depends"});
    QVERIFY2(dep.out.contains("libqt6widgets6") && dep.out.contains("libqt6core6"), dep.out.constData());
    QVERIFY2(RunTool("dpkg-deb", {"-f", gui, "Recommends"}).out.contains("dst-daemon"), "no Recommends: dst-daemon");
    QTemporaryDir x;
    QCOMPARE(RunTool("dpkg-deb", {"-x", gui, x.path()}).rc, 0);
    const ToolResult v = RunTool(x.path() + "/usr/bin/dst-gui", {"--version"});
    QVERIFY2(v.rc == 0 && v.out.contains("dst-gui 0.1.0"), (v.out + v.err).constData());
  }

  // Installed into a clean Debian 12 root (mmdebstrap, essential variant, from the host's apt
  // sources): the dependencies resolve, the maintainer scripts run there (group dst, the
  // default config), the binaries start, and a purge removes the config.
  void installIntoCleanRoot() {
    DST_REQUIRE(!QStandardPaths::findExecutable("mmdebstrap").isEmpty(), "needs mmdebstrap");
    QTemporaryDir root;
    const QString dir = root.path() + "/rootfs";
    QStringList args{"--quiet", "--variant=essential", "--hook-dir=/usr/share/mmdebstrap/hooks/file-mirror-automount"};
    // dst-gui is checked above: its Qt and X libraries would add a large download here.
    for (const QString& d : debs_)
      if (!d.contains("dst-gui")) args << "--include=" + d;
    args << "bookworm" << dir;
    ToolResult r = RunTool("mmdebstrap", args, 300000);
    QVERIFY2(r.rc == 0, (r.out + r.err).right(3000).constData());
    r = RunTool("chroot", {dir, "/usr/sbin/dstd", "--version"});
    QVERIFY2(r.rc == 0 && r.out.trimmed() == "0.1.0", (r.out + r.err).constData());
    r = RunTool("chroot", {dir, "/usr/bin/dstctl", "--help"});
    QVERIFY2(r.rc == 0 && r.out.contains("dstctl"), (r.out + r.err).constData());
    r = RunTool("chroot", {dir, "getent", "group", "dst"});
    QVERIFY2(r.rc == 0, "postinst did not create the group dst");
    QVERIFY(QFile::exists(dir + "/etc/dst/dstd.toml"));
    r = RunTool("chroot", {dir, "dpkg", "--purge", "dst-daemon"}, 120000);
    QVERIFY2(r.rc == 0, (r.out + r.err).constData());
    QVERIFY(!QFile::exists(dir + "/etc/dst/dstd.toml"));
    QVERIFY(!QFile::exists(dir + "/usr/sbin/dstd"));
  }

 private:
  QTemporaryDir out_;
  QStringList debs_;
  bool gui_ = false;
};

DST_TEST_MAIN(PackageTest)
#include "package_test.moc"
