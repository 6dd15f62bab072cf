// Loop-on-FUSE end to end: an in-process FuseMount over a 256 MiB FileDevice, the FUSE file
// attached with `losetup --direct-io=on`, ext4 made, filled, checked with e2fsck and re-read.
//
// The FUSE session threads live in this process; every external command runs in a child
// (QProcess) while the test thread blocks in waitForFinished(), so the session threads keep
// serving the loop device's I/O meanwhile.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <QCryptographicHash>
#include <QFile>
#include <QProcess>
#include <QTemporaryDir>
#include <map>
#include <random>
#include <string>

#include "dst/file_device.h"
#include "dst/fuse/fuse_mount.h"
#include "test_env.h"

using namespace dst;

namespace {

struct CmdResult {
  int exit_code = -1;
  bool finished = false;
  QString out;
};

CmdResult Run(const QString& prog, const QStringList& args, int timeout_ms = 60000) {
  CmdResult r;
  QProcess p;
  p.setProcessChannelMode(QProcess::MergedChannels);
  p.start(prog, args);
  if (!p.waitForStarted(10000)) {
    r.out = "failed to start " + prog;
    return r;
  }
  r.finished = p.waitForFinished(timeout_ms);
  if (!r.finished) {
    p.kill();
    p.waitForFinished(5000);
  }
  r.out = QString::fromLocal8Bit(p.readAll());
  r.exit_code = (r.finished && p.exitStatus() == QProcess::NormalExit) ? p.exitCode() : -1;
  return r;
}

// Tears everything down in the right order even when a check fails half-way.
struct Cleanup {
  std::unique_ptr<fuse::FuseMount>* fm = nullptr;
  QString loopdev;
  QString fs_mnt;
  bool fs_mounted = false;
  ~Cleanup() {
    if (fs_mounted) {
      if (Run("umount", {fs_mnt}, 60000).exit_code != 0) Run("umount", {"-l", fs_mnt}, 30000);
    }
    if (!loopdev.isEmpty()) Run("losetup", {"-d", loopdev}, 30000);
    if (fm && *fm) (*fm)->Unmount();
  }
};

QByteArray Sha256(const QByteArray& data) {
  return QCryptographicHash::hash(data, QCryptographicHash::Sha256).toHex();
}

}  // namespace

class FuseLoopExt4Test : public QObject {
  Q_OBJECT
 private slots:
  void ext4OnLoopOnFuse() {
    DST_REQUIRE(test::IsRoot() && test::HaveFuse(), "needs root and /dev/fuse");
    DST_REQUIRE(test::HaveTool("losetup") && test::HaveTool("mkfs.ext4") && test::HaveTool("e2fsck") &&
                    test::HaveTool("mount"),
                "needs losetup, mkfs.ext4, e2fsck, mount");
    DST_REQUIRE(QFile::exists("/dev/loop-control"), "needs loop devices");

    QTemporaryDir dir("/tmp/dst-fuse-loop-XXXXXX");
    QVERIFY(dir.isValid());
    const std::string base = dir.path().toStdString();
    const std::string mnt = base + "/fuse";
    const QString fs_mnt = dir.path() + "/ext4";
    QCOMPARE(::mkdir(mnt.c_str(), 0755), 0);
    QCOMPARE(::mkdir(fs_mnt.toLocal8Bit().constData(), 0755), 0);

    std::unique_ptr<fuse::FuseMount> fm;
    Cleanup cleanup;
    cleanup.fm = &fm;
    cleanup.fs_mnt = fs_mnt;

    FileDeviceOptions fo;
    fo.create = true;
    fo.size = 256ull << 20;
    auto dev = FileDevice::Open(base + "/backing.raw", fo);
    QVERIFY2(dev.ok(), dev.status().ToString().c_str());
    fuse::FuseOptions o;
    o.mountpoint = mnt;
    auto m = fuse::FuseMount::Mount(o);
    QVERIFY2(m.ok(), m.status().ToString().c_str());
    fm = std::move(m.value());
    QVERIFY(fm->AddVolume("vol", dev.value()).ok());
    const QString img = QString::fromStdString(mnt + "/vol.img");

    CmdResult r = Run("losetup", {"--direct-io=on", "--find", "--show", img}, 30000);
    QVERIFY2(r.exit_code == 0, qPrintable(r.out));
    cleanup.loopdev = r.out.trimmed();
    QVERIFY(cleanup.loopdev.startsWith("/dev/loop"));
    const QString loopname = cleanup.loopdev.mid(5);
    QFile dio("/sys/block/" + loopname + "/loop/dio");
    QVERIFY(dio.open(QIODevice::ReadOnly));
    const QByteArray dio_value = dio.readAll().trimmed();
    qInfo("%s on %s: dio=%s", qPrintable(cleanup.loopdev), qPrintable(img), dio_value.constData());
    QCOMPARE(dio_value, QByteArray("1"));
    QCOMPARE(fm->RemoveVolume("vol").code(), Status::Code::kBusy);  // the loop device holds it

    r = Run("mkfs.ext4", {"-q", "-F", cleanup.loopdev}, 120000);
    QVERIFY2(r.exit_code == 0, qPrintable(r.out));
    r = Run("mount", {"-t", "ext4", cleanup.loopdev, fs_mnt}, 30000);
    QVERIFY2(r.exit_code == 0, qPrintable(r.out));
    cleanup.fs_mounted = true;

    // A few MiB of random data plus many small files.
    std::map<QString, QByteArray> sums;
    std::mt19937_64 rng(20261126);
    auto random_bytes = [&](int n) {
      QByteArray b(n, Qt::Uninitialized);
      for (int i = 0; i < n; ++i) b[i] = static_cast<char>(rng());
      return b;
    };
    auto write_file = [&](const QString& name, const QByteArray& data) {
      QFile f(fs_mnt + "/" + name);
      if (!f.open(QIODevice::WriteOnly)) return false;
      if (f.write(data) != data.size()) return false;
      f.close();
      sums[name] = Sha256(data);
      return true;
    };
    QVERIFY(write_file("big.bin", random_bytes(6 << 20)));
    QVERIFY(write_file("odd.bin", random_bytes((1 << 20) + 12345)));
    QCOMPARE(::mkdir((fs_mnt + "/small").toLocal8Bit().constData(), 0755), 0);
    for (int i = 0; i < 300; ++i) {
      const int len = 1 + static_cast<int>(rng() % 9000);
      QVERIFY(write_file(QString("small/f%1").arg(i), random_bytes(len)));
    }
    r = Run("sync", {"-f", fs_mnt + "/big.bin"}, 60000);
    QVERIFY2(r.exit_code == 0, qPrintable(r.out));
    r = Run("umount", {fs_mnt}, 60000);
    QVERIFY2(r.exit_code == 0, qPrintable(r.out));
    cleanup.fs_mounted = false;

    r = Run("e2fsck", {"-fn", cleanup.loopdev}, 120000);
    QVERIFY2(r.exit_code == 0, qPrintable(r.out));

    r = Run("mount", {"-t", "ext4", cleanup.loopdev, fs_mnt}, 30000);
    QVERIFY2(r.exit_code == 0, qPrintable(r.out));
    cleanup.fs_mounted = true;
    for (const auto& [name, sum] : sums) {
      QFile f(fs_mnt + "/" + name);
      QVERIFY2(f.open(QIODevice::ReadOnly), qPrintable(name));
      QCOMPARE(Sha256(f.readAll()), sum);
    }
    r = Run("umount", {fs_mnt}, 60000);
    QVERIFY2(r.exit_code == 0, qPrintable(r.out));
    cleanup.fs_mounted = false;
    r = Run("losetup", {"-d", cleanup.loopdev}, 30000);
    QVERIFY2(r.exit_code == 0, qPrintable(r.out));
    cleanup.loopdev.clear();

    // The loop device released the file: the volume is removable again (losetup -d is async
    // in the kernel, so allow a moment).
    Status st;
    for (int i = 0; i < 100; ++i) {
      st = fm->RemoveVolume("vol");
      if (st.code() != Status::Code::kBusy) break;
      QThread::msleep(50);
    }
    QVERIFY2(st.ok(), st.ToString().c_str());

    // ext4 really went through the FUSE file into the backing file: superblock magic 0xEF53.
    QFile raw(QString::fromStdString(base + "/backing.raw"));
    QVERIFY(raw.open(QIODevice::ReadOnly));
    QVERIFY(raw.seek(1024 + 56));
    const QByteArray magic = raw.read(2);
    QCOMPARE(magic, QByteArray("\x53\xef", 2));
  }
};

DST_TEST_MAIN(FuseLoopExt4Test)
#include "fuse_loop_ext4_test.moc"
