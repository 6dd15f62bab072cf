// Stacked geometries (issue 3 item 6), each with mkfs.ext4, e2fsck -fn and data verification
// through FUSE + loop on real daemons:
//
//   (a) linear(mirror(f1, f2), mirror(f3, f4))                      one daemon, local files
//   (b) mirror(linear(g1 24M, g2 24M), linear(g3 16M, g4 40M))      one daemon, odd geometry
//   (c) A exports linear(a1, a2) (export array = "lin"), B exports a plain file, C assembles
//       mirror(dst://A/lin, dst://B/disk): a tree across three hosts
//   (d) grow a mounted linear by appending a device: the size shows in `volume list`, the loop
//       device and ext4 grow online (losetup -c, resize2fs), data stays intact.
// Mirror legs are compared byte for byte on the data range afterwards.
#include <QtTest/QtTest>

#include <filesystem>
#include <map>

#include "array_helpers.h"
#include "test_env.h"

using namespace dst::test;
using nlohmann::json;

namespace {

constexpr std::uint64_t kMiB = 1 << 20;

// mkfs + mount + files + umount + e2fsck -fn + mount ro + verify.  `files` accumulates
// name -> content across calls (pass the same map to re-verify after growing).
bool Ext4Cycle(const QString& file, const QString& fs_mnt, bool mkfs, int nfiles, int seed,
               std::map<QString, QByteArray>* files, QString* why, StackGuard* keep_mounted = nullptr) {
  StackGuard local;
  StackGuard& g = keep_mounted ? *keep_mounted : local;
  if (g.loop.isEmpty() && !g.Attach(file, false, why)) return false;
  if (mkfs) {
    Cmd c = Run("mkfs.ext4", {"-q", "-F", g.loop}, 120000);
    if (c.rc != 0) return *why = "mkfs: " + Show(c), false;
  }
  if (g.fs_mount.isEmpty() && !g.Mount(fs_mnt, {}, why)) return false;
  for (int i = 0; i < nfiles; ++i) {
    const QString rel = QString("s%1/f%2.bin").arg(seed).arg(i);
    QByteArray d = Pattern(seed * 1000 + i, 0, 4096 * (1 + (i * 37) % 200));
    QDir().mkpath(fs_mnt + QString("/s%1").arg(seed));
    QFile f(fs_mnt + "/" + rel);
    if (!f.open(QIODevice::WriteOnly) || f.write(d) != d.size()) return *why = "write " + rel, false;
    (*files)[rel] = d;
  }
  Run("sync", {});
  if (keep_mounted) return true;
  if (!g.Umount(why)) return false;
  Run("blockdev", {"--flushbufs", g.loop});
  Cmd c = Run("e2fsck", {"-fn", g.loop});
  if (c.rc != 0) return *why = "e2fsck: " + Show(c), false;
  if (!g.Mount(fs_mnt, {"ro"}, why)) return false;
  for (auto& [rel, d] : *files) {
    QFile f(fs_mnt + "/" + rel);
    if (!f.open(QIODevice::ReadOnly) || f.readAll() != d) return *why = "content differs: " + rel, false;
  }
  if (!g.Umount(why)) return false;
  return g.Detach(why);
}

bool Sparse(const QString& dir, const QString& name, int mib, QString* path) {
  *path = dir + "/" + name;
  return MakeSparse(*path, std::uint64_t(mib) * kMiB);
}

}  // namespace

class ArrayStackTest : public QObject {
  Q_OBJECT

 private slots:
  void init() {
    DST_REQUIRE(IsRoot(), "needs root (loop devices, mount)");
    DST_REQUIRE(HaveFuse(), "needs /dev/fuse");
    DST_REQUIRE(HaveTool("losetup") && HaveTool("mkfs.ext4") && HaveTool("e2fsck") && HaveTool("resize2fs"),
                "needs util-linux, e2fsprogs");
    DST_REQUIRE(QFile::exists("/dev/loop-control"), "needs /dev/loop-control");
    DST_REQUIRE(std::filesystem::exists(BinPath("dstd")), "dstd binary not built");
  }

  void linearOfMirrors() {
    MirrorRig rig;
    QString f[4], why;
    for (int i = 0; i < 4; ++i) QVERIFY(Sparse(rig.dir.path(), QString("f%1.img").arg(i), 40, &f[i]));
    QVERIFY(rig.StartExporters(0, 0, &why));
    const QString toml = ArrayToml("m1", "mirror", {f[0], f[1]}) + ArrayToml("m2", "mirror", {f[2], f[3]}) +
                         ArrayToml("lin", "linear", {"array:m1", "array:m2"});
    QVERIFY2(rig.StartAssembler(&toml, &why), qPrintable(why));
    QVERIFY2(WaitFileExists(rig.File("lin"), 10000), rig.as->Log().right(3000).constData());
    json a;
    QVERIFY2(WaitArrayClean(*rig.as, "m1", 60000, &a), a.dump().c_str());
    QVERIFY2(WaitArrayClean(*rig.as, "m2", 60000, &a), a.dump().c_str());
    const std::uint64_t msize = 40 * kMiB - 4096;
    a = ArrayDetail(*rig.as, "lin");
    QCOMPARE(a.value("size", std::uint64_t(0)), 2 * msize);
    QCOMPARE(std::uint64_t(QFileInfo(rig.File("lin")).size()), 2 * msize);
    const QString fs = rig.dir.path() + "/fs";
    QVERIFY(QDir().mkpath(fs));
    std::map<QString, QByteArray> files;
    QVERIFY2(Ext4Cycle(rig.File("lin"), fs, true, 60, 1, &files, &why), qPrintable(why));
    QVERIFY2(WaitArrayClean(*rig.as, "m1", 30000, &a), a.dump().c_str());
    QVERIFY2(WaitArrayClean(*rig.as, "m2", 30000, &a), a.dump().c_str());
    QCOMPARE(FirstDiff(f[0], f[1], msize), std::int64_t(-1));
    QCOMPARE(FirstDiff(f[2], f[3], msize), std::int64_t(-1));
    QCOMPARE(rig.as->Terminate(), 0);
  }

  void mirrorOfLinears() {
    MirrorRig rig;
    QString g[4], why;
    const int mib[4] = {24, 24, 16, 40};
    for (int i = 0; i < 4; ++i) QVERIFY(Sparse(rig.dir.path(), QString("g%1.img").arg(i), mib[i], &g[i]));
    QVERIFY(rig.StartExporters(0, 0, &why));
    const QString toml = ArrayToml("l1", "linear", {g[0], g[1]}) + ArrayToml("l2", "linear", {g[2], g[3]}) +
                         ArrayToml("m", "mirror", {"array:l1", "array:l2"});
    QVERIFY2(rig.StartAssembler(&toml, &why), qPrintable(why));
    QVERIFY2(WaitFileExists(rig.File("m"), 10000), rig.as->Log().right(3000).constData());
    json a;
    QVERIFY2(WaitArrayClean(*rig.as, "m", 60000, &a), a.dump().c_str());
    const std::uint64_t size = 48 * kMiB - 4096;  // smallest leg (48 MiB) minus the header
    QCOMPARE(a.value("size", std::uint64_t(0)), size);
    const QString fs = rig.dir.path() + "/fs";
    QVERIFY(QDir().mkpath(fs));
    std::map<QString, QByteArray> files;
    QVERIFY2(Ext4Cycle(rig.File("m"), fs, true, 60, 2, &files, &why), qPrintable(why));
    QVERIFY2(WaitArrayClean(*rig.as, "m", 30000, &a), a.dump().c_str());
    // l1 = g0|g1 (24+24), l2 = g2|g3 (16+40): compare piecewise on [0, size).
    QCOMPARE(FirstDiffRange(g[0], 0, g[2], 0, 16 * kMiB), std::int64_t(-1));
    QCOMPARE(FirstDiffRange(g[0], 16 * kMiB, g[3], 0, 8 * kMiB), std::int64_t(-1));
    QCOMPARE(FirstDiffRange(g[1], 0, g[3], 8 * kMiB, 24 * kMiB - 4096), std::int64_t(-1));
    QCOMPARE(rig.as->Terminate(), 0);
  }

  void mirrorOfRemoteTreesAcrossHosts() {
    MirrorRig rig;
    QString why, a1, a2;
    QVERIFY(rig.StartExporters(0, 0, &why));  // sets up the FUSE mountpoint only
    QVERIFY(Sparse(rig.dir.path(), "a1.img", 24, &a1));
    QVERIFY(Sparse(rig.dir.path(), "a2.img", 24, &a2));
    DaemonProcess host_a(rig.dir.path() + "/hostA");
    host_a.config() = ArrayToml("lin", "linear", {a1, a2}) + "[[export]]\nname = \"lin\"\narray = \"lin\"\n\n";
    QVERIFY2(host_a.Start(), host_a.Log().constData());
    DaemonProcess host_b(rig.dir.path() + "/hostB");
    const QString disk = rig.dir.path() + "/hostB/disk.img";
    host_b.config() = ExportToml("disk", disk, "48M");
    QVERIFY2(host_b.Start(), host_b.Log().constData());
    const QString toml = ArrayToml("m", "mirror", {DstUri(host_a, "lin"), DstUri(host_b, "disk")});
    QVERIFY2(rig.StartAssembler(&toml, &why), qPrintable(why));
    QVERIFY2(WaitFileExists(rig.File("m"), 10000), rig.as->Log().right(3000).constData());
    json a;
    QVERIFY2(WaitArrayClean(*rig.as, "m", 60000, &a), a.dump().c_str());
    const std::uint64_t size = 48 * kMiB - 4096;
    QCOMPARE(a.value("size", std::uint64_t(0)), size);
    const QString fs = rig.dir.path() + "/fs";
    QVERIFY(QDir().mkpath(fs));
    std::map<QString, QByteArray> files;
    QVERIFY2(Ext4Cycle(rig.File("m"), fs, true, 60, 3, &files, &why), qPrintable(why));
    QVERIFY2(WaitArrayClean(*rig.as, "m", 30000, &a), a.dump().c_str());
    QCOMPARE(rig.as->Terminate(), 0);  // flushes both remote legs
    QCOMPARE(FirstDiffRange(a1, 0, disk, 0, 24 * kMiB), std::int64_t(-1));
    QCOMPARE(FirstDiffRange(a2, 0, disk, 24 * kMiB, 24 * kMiB - 4096), std::int64_t(-1));
    // B's plain image holds the whole file system on its own.
    Cmd c = Run("e2fsck", {"-fn", disk});
    QVERIFY2(c.rc == 0, qPrintable(Show(c)));
  }

  void growMountedLinear() {
    MirrorRig rig;
    QString why, h1, h2;
    QVERIFY(Sparse(rig.dir.path(), "h1.img", 32, &h1));
    QVERIFY(Sparse(rig.dir.path(), "h2.img", 32, &h2));
    QVERIFY(rig.StartExporters(0, 0, &why));
    const QString toml = ArrayToml("lin", "linear", {h1});
    QVERIFY2(rig.StartAssembler(&toml, &why), qPrintable(why));
    QVERIFY2(WaitFileExists(rig.File("lin"), 10000), rig.as->Log().right(3000).constData());
    const QString fs = rig.dir.path() + "/fs";
    QVERIFY(QDir().mkpath(fs));
    std::map<QString, QByteArray> files;
    StackGuard g;
    QVERIFY2(Ext4Cycle(rig.File("lin"), fs, true, 30, 4, &files, &why, &g), qPrintable(why));

    QByteArray out, err;
    QVERIFY2(rig.as->Ctl({"array", "grow", "lin", h2}, &out, &err) == 0, err.constData());
    auto volume_size = [&]() -> std::int64_t {
      json v = CtlJson(*rig.as, {"volume", "list", "--json"});
      json arr = v.is_array() ? v : (v.is_object() ? v.value("volumes", json::array()) : json::array());
      for (auto& x : arr)
        if (x.value("name", "") == "lin") return JInt(x, "size");
      return -1;
    };
    QVERIFY2(WaitUntil([&] { return volume_size() == std::int64_t(64 * kMiB); }, 10000),
             qPrintable(QString("volume list size %1").arg(volume_size())));
    // The mounted file system keeps working across the grow.
    QVERIFY2(Ext4Cycle(rig.File("lin"), fs, false, 10, 5, &files, &why, &g), qPrintable(why));
    QVERIFY2(g.Umount(&why), qPrintable(why));
    QVERIFY2(g.Detach(&why), qPrintable(why));
    // The FUSE file caches its size while open; once closed, the new size must show (the daemon
    // re-adds the file to the mount, or the operator remounts the FUSE file system).
    if (!WaitUntil([&] { return QFileInfo(rig.File("lin")).size() == qint64(64 * kMiB); }, 3000)) {
      qInfo("FUSE file still %lld bytes after close: remounting the FUSE file system",
            (long long)QFileInfo(rig.File("lin")).size());
      QVERIFY2(rig.as->Ctl({"unmount"}, &out, &err) == 0, err.constData());
      QVERIFY2(rig.as->Ctl({"mount", rig.mnt}, &out, &err) == 0, err.constData());
    }
    QVERIFY2(WaitUntil([&] { return QFileInfo(rig.File("lin")).size() == qint64(64 * kMiB); }, 10000),
             qPrintable(QString("FUSE file is %1 bytes").arg(QFileInfo(rig.File("lin")).size())));
    QVERIFY2(g.Attach(rig.File("lin"), false, &why), qPrintable(why));
    Cmd c = Run("blockdev", {"--getsize64", g.loop});
    QCOMPARE(QString::fromUtf8(c.out).trimmed().toLongLong(), qint64(64 * kMiB));
    c = Run("e2fsck", {"-fy", g.loop});  // clean (rc 0); resize2fs wants a fresh check
    QVERIFY2(c.rc == 0, qPrintable(Show(c)));
    c = Run("resize2fs", {g.loop});
    QVERIFY2(c.rc == 0, qPrintable(Show(c)));
    // Files on the grown part, then the full check.
    QVERIFY2(Ext4Cycle(rig.File("lin"), fs, false, 60, 6, &files, &why, &g), qPrintable(why));
    QVERIFY2(g.Umount(&why), qPrintable(why));
    QVERIFY2(g.Detach(&why), qPrintable(why));
    QVERIFY2(Ext4Cycle(rig.File("lin"), fs, false, 0, 7, &files, &why), qPrintable(why));
    QCOMPARE(rig.as->Terminate(), 0);
  }
};

DST_TEST_MAIN(ArrayStackTest)
#include "array_stack_test.moc"
