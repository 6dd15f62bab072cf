// Full stack, end to end (issue item 10(e)): two dstd processes on 127.0.0.1.
//
//   A: exports a 512 MiB sparse image "disk"
//   B: imports dst://127.0.0.1:<A>/disk as volume "vol", FUSE-mounted: <mnt>/vol.img
//   losetup --direct-io=on <mnt>/vol.img -> mkfs.ext4 -> mount -> files + sha256 -> umount
//   -> e2fsck -fn (loop device, and A's image file directly) -> mount again -> same checksums.
//
// Cleanup is RAII and runs even when a check fails: umount -l, losetup -d, then the daemons
// are terminated by their DaemonProcess destructors.
#include <QCryptographicHash>
#include <QDir>
#include <QFile>
#include <QProcess>
#include <QRandomGenerator>
#include <QTemporaryDir>
#include <map>

#include <nlohmann/json.hpp>

#include "daemon_process.h"
#include "test_env.h"

using dst::test::DaemonProcess;

namespace {

struct Cmd {
  int rc = -1;
  QByteArray out, err;
};

Cmd Run(const QString& prog, const QStringList& args, int timeout_ms = 120000) {
  Cmd c;
  QProcess p;
  p.start(prog, args);
  if (!p.waitForFinished(timeout_ms)) {
    p.kill();
    p.waitForFinished(5000);
    c.err = "timed out";
    return c;
  }
  c.out = p.readAllStandardOutput();
  c.err = p.readAllStandardError();
  c.rc = p.exitStatus() == QProcess::NormalExit ? p.exitCode() : -1;
  return c;
}

QString Show(const Cmd& c) {
  return QString("rc=%1 out=%2 err=%3").arg(c.rc).arg(QString::fromUtf8(c.out), QString::fromUtf8(c.err));
}

// Undoes loop and mount state in reverse order, whatever happened.
struct StackGuard {
  QString loop;      // /dev/loopN once attached
  QString fs_mount;  // ext4 mountpoint while mounted
  ~StackGuard() {
    if (!fs_mount.isEmpty()) Run("umount", {"-l", fs_mount}, 30000);
    if (!loop.isEmpty()) Run("losetup", {"-d", loop}, 30000);
  }
};

bool IsMounted(const QString& path) {
  QFile f("/proc/self/mountinfo");
  if (!f.open(QIODevice::ReadOnly)) return false;
  const QByteArray needle = " " + path.toUtf8() + " ";
  return f.readAll().contains(needle);
}

// Declared before the daemons, so it runs after they are gone: a dstd killed with SIGKILL leaves
// a dead FUSE mount ("Transport endpoint is not connected") that only a lazy unmount removes.
struct FuseGuard {
  QString path;
  ~FuseGuard() {
    if (!path.isEmpty() && IsMounted(path)) Run("umount", {"-l", path}, 30000);
  }
};

QByteArray Sha256File(const QString& path) {
  QFile f(path);
  if (!f.open(QIODevice::ReadOnly)) return {};
  QCryptographicHash h(QCryptographicHash::Sha256);
  if (!h.addData(&f)) return {};
  return h.result().toHex();
}

}  // namespace

class E2eTest : public QObject {
  Q_OBJECT

 private slots:
  void Ext4OverLoopOverFuseOverDst() {
    DST_REQUIRE(dst::test::IsRoot(), "needs root (loop devices, mount)");
    DST_REQUIRE(dst::test::HaveFuse(), "needs /dev/fuse");
    DST_REQUIRE(dst::test::HaveTool("losetup"), "needs losetup");
    DST_REQUIRE(dst::test::HaveTool("mkfs.ext4"), "needs mkfs.ext4");
    DST_REQUIRE(dst::test::HaveTool("e2fsck"), "needs e2fsck");
    DST_REQUIRE(dst::test::HaveTool("mount") && dst::test::HaveTool("umount"), "needs mount");
    DST_REQUIRE(dst::test::HaveTool("blockdev"), "needs blockdev");
    DST_REQUIRE(QFile::exists("/dev/loop-control"), "needs /dev/loop-control");

    QTemporaryDir dir;
    QVERIFY(dir.isValid());
    const QString image = dir.path() + "/a/disk.img";
    const QString fuse_mnt = dir.path() + "/fuse";
    const QString fs_mnt = dir.path() + "/fs";
    QVERIFY(QDir().mkpath(fs_mnt));

    // Destruction order: StackGuard (umount, losetup -d), b and a (SIGTERM, SIGKILL after 5 s),
    // FuseGuard (lazy unmount of a FUSE mount a killed dstd left behind).
    FuseGuard fuse_guard{fuse_mnt};
    DaemonProcess a(dir.path() + "/a");
    a.config() = QString("[[export]]\nname = \"disk\"\npath = \"%1\"\nsize = \"512M\"\n").arg(image);
    QVERIFY2(a.Start(), a.Log().constData());
    QCOMPARE(QFile(image).size(), qint64(512) << 20);

    DaemonProcess b(dir.path() + "/b");
    b.config() = QString("[[volume]]\nname = \"vol\"\nremote = \"dst://127.0.0.1:%1/disk\"\n"
                         "queue_depth = 64\nio_timeout = 60\nkeepalive_timeout = 5\n")
                     .arg(a.port());
    b.extra_args() << "--mount" << fuse_mnt;
    QVERIFY2(b.Start(), b.Log().constData());
    StackGuard guard;

    const QString file = fuse_mnt + "/vol.img";
    QTRY_VERIFY_WITH_TIMEOUT(QFile::exists(file), 10000);
    QCOMPARE(QFile(file).size(), qint64(512) << 20);

    Cmd c = Run("losetup", {"--direct-io=on", "--find", "--show", file});
    QVERIFY2(c.rc == 0, qPrintable(Show(c)));
    guard.loop = QString::fromUtf8(c.out).trimmed();
    QVERIFY2(guard.loop.startsWith("/dev/loop"), qPrintable(guard.loop));

    // Default mkfs.ext4 discards the whole device first: one 512 MiB BLKDISCARD that reaches
    // the exporter as a single 512 MiB TRIM (docs/protocol.md §7: TRIM/WRITE_ZEROES lengths are
    // ranges, not bound by the 32 MiB payload cap).  This used to hang forever.
    c = Run("mkfs.ext4", {"-q", "-F", "-L", "dste2e", guard.loop}, 90000);
    QVERIFY2(c.rc == 0, qPrintable(Show(c)));
    c = Run("mount", {"-t", "ext4", guard.loop, fs_mnt});
    QVERIFY2(c.rc == 0, qPrintable(Show(c)));
    guard.fs_mount = fs_mnt;

    // A few MiB of random data plus many small files in subdirectories.
    std::map<QString, QByteArray> sums;
    auto* rng = QRandomGenerator::global();
    auto write_file = [&](const QString& rel, qsizetype size) {
      QByteArray data(size, Qt::Uninitialized);
      rng->fillRange(reinterpret_cast<quint32*>(data.data()), size / 4);
      QString path = fs_mnt + "/" + rel;
      QDir().mkpath(QFileInfo(path).path());
      QFile f(path);
      if (!f.open(QIODevice::WriteOnly) || f.write(data) != size) return false;
      sums[rel] = QCryptographicHash::hash(data, QCryptographicHash::Sha256).toHex();
      return true;
    };
    QVERIFY(write_file("big/random1.bin", 8 << 20));
    QVERIFY(write_file("big/random2.bin", 3 << 20));
    for (int i = 0; i < 300; ++i)
      QVERIFY(write_file(QString("small/d%1/f%2.dat").arg(i % 10).arg(i), 512 + 4 * rng->bounded(4096)));
    QCOMPARE(Run("sync", {}).rc, 0);
    for (auto& [rel, sum] : sums) QCOMPARE(Sha256File(fs_mnt + "/" + rel), sum);

    c = Run("umount", {fs_mnt});
    QVERIFY2(c.rc == 0, qPrintable(Show(c)));
    guard.fs_mount.clear();

    // Check the file system through the whole stack, then on A's image itself (the bytes really
    // crossed the network).
    Run("blockdev", {"--flushbufs", guard.loop});
    c = Run("e2fsck", {"-fn", guard.loop});
    QVERIFY2(c.rc == 0, qPrintable(Show(c)));
    c = Run("e2fsck", {"-fn", image});
    QVERIFY2(c.rc == 0, qPrintable(Show(c)));

    // Mount again with no cached pages and compare every checksum.
    Run("blockdev", {"--flushbufs", guard.loop});
    c = Run("mount", {"-t", "ext4", "-o", "ro", guard.loop, fs_mnt});
    QVERIFY2(c.rc == 0, qPrintable(Show(c)));
    guard.fs_mount = fs_mnt;
    for (auto& [rel, sum] : sums)
      QVERIFY2(Sha256File(fs_mnt + "/" + rel) == sum, qPrintable(rel));

    // Both daemons saw the traffic; the volume never reconnected.
    QByteArray out;
    QCOMPARE(b.Ctl({"status", "--json"}, &out), 0);
    auto st = nlohmann::json::parse(out.toStdString(), nullptr, false);
    QVERIFY(st.is_object());
    QCOMPARE(st["volumes"][0]["state"], nlohmann::json("connected"));
    QCOMPARE(st["volumes"][0]["reconnects"], nlohmann::json(0));
    QVERIFY(st["volumes"][0]["frames_per_call"].get<double>() > 0);
    qInfo("volume: %s requests, %.2f frames per send call",
          st["volumes"][0]["requests"].dump().c_str(),
          st["volumes"][0]["frames_per_call"].get<double>());

    c = Run("umount", {fs_mnt});
    QVERIFY2(c.rc == 0, qPrintable(Show(c)));
    guard.fs_mount.clear();
    c = Run("losetup", {"-d", guard.loop});
    QVERIFY2(c.rc == 0, qPrintable(Show(c)));
    guard.loop.clear();
    QCOMPARE(b.Terminate(), 0);
    QCOMPARE(a.Terminate(), 0);
    QCOMPARE(Run("e2fsck", {"-fn", image}).rc, 0);  // still clean after both shut down
  }
};

DST_TEST_MAIN(E2eTest)
#include "e2e_test.moc"
