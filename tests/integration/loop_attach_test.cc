// loop.attach / loop.detach (issue 12 item 6): dstd sets up a loop device over a volume's FUSE
// file, status shows it (also one set up by hand with losetup), the volume cannot be removed
// under it, a mounted loop device is not detached, and detach really detaches.
#include <QFile>
#include <QProcess>
#include <QTemporaryDir>
#include <QtTest/QtTest>

#include <nlohmann/json.hpp>

#include "daemon_process.h"
#include "test_env.h"

using dst::test::DaemonProcess;
using nlohmann::json;

namespace {

QByteArray Run(const QString& prog, const QStringList& args, int* rc = nullptr) {
  QProcess p;
  p.start(prog, args);
  p.waitForFinished(60000);
  if (rc) *rc = p.exitStatus() == QProcess::NormalExit ? p.exitCode() : -1;
  return p.readAllStandardOutput() + p.readAllStandardError();
}

// Cleanup that runs even when a check fails half way: unmount the ext4 mount, detach every loop
// device over files under `dir`, then lazily unmount the FUSE mount (declare before the daemon).
struct Cleanup {
  QString dir, ext4_mnt, fuse_mnt;
  ~Cleanup() {
    if (!ext4_mnt.isEmpty()) Run("umount", {ext4_mnt});
    for (const QByteArray& line : Run("losetup", {"-n", "-O", "NAME,BACK-FILE", "-l"}).split('\n')) {
      const QList<QByteArray> f = line.simplified().split(' ');
      if (f.size() >= 2 && f[1].startsWith(dir.toUtf8())) Run("losetup", {"-d", QString::fromUtf8(f[0])});
    }
    QFile mi("/proc/self/mountinfo");
    if (!fuse_mnt.isEmpty() && mi.open(QIODevice::ReadOnly) && mi.readAll().contains(" " + fuse_mnt.toUtf8() + " "))
      Run("umount", {"-l", fuse_mnt});
  }
};

json CtlJson(DaemonProcess& d, const QStringList& args, int* rc = nullptr, QByteArray* err = nullptr) {
  QByteArray out, e;
  const int r = d.Ctl(args + QStringList{"--json"}, &out, &e);
  if (rc) *rc = r;
  if (err) *err = e;
  return r == 0 ? json::parse(out.toStdString(), nullptr, false) : json();
}

json VolumeOf(DaemonProcess& d, const std::string& name) {
  json st = CtlJson(d, {"status"});
  for (const auto& v : st.value("volumes", json::array()))
    if (v.value("name", "") == name) return v;
  return json();
}

QByteArray SysFile(const QString& dev, const QString& leaf) {
  QFile f("/sys/block/" + dev.section('/', -1) + "/" + leaf);
  return f.open(QIODevice::ReadOnly) ? f.readAll().trimmed() : QByteArray();
}

}  // namespace

class LoopAttachTest : public QObject {
  Q_OBJECT

 private slots:
  void attachStatusRemoveDetach() {
    DST_REQUIRE(dst::test::IsRoot() && dst::test::HaveFuse(), "needs root and /dev/fuse");
    DST_REQUIRE(QFile::exists("/dev/loop-control"), "needs loop devices");
    DST_REQUIRE(dst::test::HaveTool("losetup") && dst::test::HaveTool("mkfs.ext4"), "needs losetup and mkfs.ext4");
    QTemporaryDir dir;
    Cleanup cleanup{dir.path(), {}, dir.path() + "/mnt"};
    const QString mnt = dir.path() + "/mnt";
    const QString img = dir.path() + "/disk.img";
    {
      QFile f(img);
      QVERIFY(f.open(QIODevice::WriteOnly) && f.resize(64 << 20));
    }
    DaemonProcess d(dir.path() + "/d");
    d.config() = QString("[[volume]]\nname = \"vol\"\npath = \"%1\"\n").arg(img);
    d.extra_args() << "--mount" << mnt;
    QVERIFY2(d.Start(), d.Log().constData());
    const QString file = mnt + "/vol.img";
    QTRY_VERIFY_WITH_TIMEOUT(QFile::exists(file), 10000);
    QCOMPARE(VolumeOf(d, "vol")["loop_devices"], json::array());
    // The event stream, from here on (checked at the end).
    QProcess events;
    events.start(QString::fromStdString(dst::test::BinPath("dstctl")),
                 {"--socket", d.control_socket(), "events", "--json"});
    QVERIFY(events.waitForStarted(5000));
    QTest::qWait(300);

    // Attach: the device is printed, backed by the file, the size of the volume.
    QByteArray out, err;
    QCOMPARE(d.Ctl({"loop", "attach", "vol"}, &out, &err), 0);
    const QString dev = QString::fromUtf8(out.trimmed());
    QVERIFY2(dev.startsWith("/dev/loop"), out.constData());
    QCOMPARE(SysFile(dev, "loop/backing_file"), file.toUtf8());
    QCOMPARE(SysFile(dev, "size").toULongLong() * 512, 64ull << 20);
    json v = VolumeOf(d, "vol");
    QVERIFY2(v["loop_devices"].size() == 1, v.dump().c_str());
    QCOMPARE(v["loop_devices"][0]["device"], json(dev.toStdString()));
    QCOMPARE(v["loop_devices"][0]["read_only"], json(false));
    QVERIFY(v["loop_devices"][0]["mounted_at"].is_null());
    QCOMPARE(d.Ctl({"status"}, &out, &err), 0);
    QVERIFY2(out.contains("loop:" + dev.toUtf8()), out.constData());

    // Data written through the loop device is the volume's data.
    int rc = 0;
    Run("dd", {"if=/dev/urandom", "of=" + dev, "bs=64K", "count=16", "seek=3", "oflag=direct"}, &rc);
    QCOMPARE(rc, 0);
    const QByteArray via_loop = Run("dd", {"if=" + dev, "bs=64K", "count=16", "skip=3", "iflag=direct", "status=none"});
    QFile backing(img);
    QVERIFY(backing.open(QIODevice::ReadOnly));
    backing.seek(3 * 65536);
    QCOMPARE(backing.read(16 * 65536), via_loop);

    // One file, one loop device; the volume and the mount are held.
    CtlJson(d, {"loop", "attach", "vol"}, &rc, &err);
    QCOMPARE(rc, 65);  // exists -> EX_DATAERR
    QVERIFY2(err.contains("already attached to " + dev.toUtf8()), err.constData());
    QCOMPARE(d.Ctl({"volume", "remove", "vol"}, &out, &err), 75);
    QVERIFY2(err.contains("in use"), err.constData());

    // Mounted: detach is refused and names the mount point; after umount it detaches.
    const QString ext4 = dir.path() + "/ext4";
    QVERIFY(QDir().mkpath(ext4));
    Run("mkfs.ext4", {"-q", "-F", dev}, &rc);
    QCOMPARE(rc, 0);
    Run("mount", {dev, ext4}, &rc);
    QCOMPARE(rc, 0);
    cleanup.ext4_mnt = ext4;
    v = VolumeOf(d, "vol");
    QCOMPARE(v["loop_devices"][0]["mounted_at"], json(ext4.toStdString()));
    QCOMPARE(d.Ctl({"loop", "detach", "vol"}, &out, &err), 75);
    QVERIFY2(err.contains("mounted at " + ext4.toUtf8()), err.constData());
    QCOMPARE(SysFile(dev, "loop/backing_file"), file.toUtf8());  // still attached
    Run("umount", {ext4}, &rc);
    QCOMPARE(rc, 0);
    cleanup.ext4_mnt.clear();
    QCOMPARE(d.Ctl({"loop", "detach", "vol"}, &out, &err), 0);
    QVERIFY2(out.contains(dev.toUtf8() + " detached"), out.constData());
    QVERIFY(SysFile(dev, "loop/backing_file").isEmpty());
    QCOMPARE(VolumeOf(d, "vol")["loop_devices"], json::array());
    QCOMPARE(d.Ctl({"loop", "detach", "vol"}, &out, &err), 65);  // not_found
    QVERIFY2(err.contains("no loop device uses " + file.toUtf8()), err.constData());

    // Read-only, and one set up by hand: status reads sysfs, so both show.
    QCOMPARE(d.Ctl({"loop", "attach", "vol", "--read-only"}, &out, &err), 0);
    const QString ro = QString::fromUtf8(out.trimmed());
    QCOMPARE(SysFile(ro, "ro"), QByteArray("1"));
    QCOMPARE(VolumeOf(d, "vol")["loop_devices"][0]["read_only"], json(true));
    QCOMPARE(d.Ctl({"loop", "detach", "vol"}, &out, &err), 0);
    const QString by_hand = QString::fromUtf8(Run("losetup", {"--find", "--show", file}).trimmed());
    QVERIFY2(by_hand.startsWith("/dev/loop"), qPrintable(by_hand));
    QCOMPARE(VolumeOf(d, "vol")["loop_devices"][0]["device"], json(by_hand.toStdString()));
    QTest::qWait(600);  // the events thread sees it by itself (sysfs, every 250 ms)
    Run("losetup", {"-d", by_hand}, &rc);
    QCOMPARE(rc, 0);
    QTRY_COMPARE_WITH_TIMEOUT(VolumeOf(d, "vol")["loop_devices"], json::array(), 5000);
    QTest::qWait(600);

    // Events: every attach and detach, by dstd or by hand, with the devices.
    events.kill();
    events.waitForFinished(5000);
    std::vector<json> loop_events;
    for (const QByteArray& line : events.readAllStandardOutput().split('\n')) {
      json e = json::parse(line.toStdString(), nullptr, false);
      if (e.is_object() && e.value("type", "") == "loop") loop_events.push_back(e);
    }
    auto seen = [&](const char* state, const QString& device) {
      for (const json& e : loop_events)
        if (e.value("state", "") == state && e.value("volume", "") == "vol" &&
            (device.isEmpty() ? e["devices"].empty() : e["devices"] == json::array({device.toStdString()})))
          return true;
      return false;
    };
    QString all;
    for (const json& e : loop_events) all += QString::fromStdString(e.dump()) + "\n";
    QVERIFY2(seen("attached", dev) && seen("attached", ro) && seen("attached", by_hand), qPrintable(all));
    QVERIFY2(seen("detached", QString()), qPrintable(all));
    QVERIFY2(loop_events.size() == 6, qPrintable(all));  // 3 attaches, 3 detaches, no duplicates

    // Errors name what is wrong.
    QCOMPARE(d.Ctl({"loop", "attach", "nope"}, &out, &err), 65);
    QVERIFY2(err.contains("no volume or array \"nope\""), err.constData());
    QCOMPARE(d.Ctl({"volume", "remove", "vol"}, &out, &err), 0);
    QCOMPARE(d.Ctl({"unmount"}, &out, &err), 0);
    QCOMPARE(d.Ctl({"loop", "attach", "vol"}, &out, &err), 65);
    QVERIFY2(err.contains("nothing is mounted"), err.constData());
    QCOMPARE(d.Terminate(), 0);
  }

  // An array's file is also its own volume's: its loop events come once, as the array's.
  void arrayFileEventsOnce() {
    DST_REQUIRE(dst::test::IsRoot() && dst::test::HaveFuse(), "needs root and /dev/fuse");
    DST_REQUIRE(QFile::exists("/dev/loop-control"), "needs loop devices");
    QTemporaryDir dir;
    Cleanup cleanup{dir.path(), {}, dir.path() + "/mnt"};
    for (const char* n : {"p0", "p1"}) {
      QFile f(dir.path() + "/" + n + ".img");
      QVERIFY(f.open(QIODevice::WriteOnly) && f.resize(16 << 20));
    }
    DaemonProcess d(dir.path() + "/d");
    d.config() = QString("[[array]]\nname = \"a\"\nlevel = \"mirror\"\nlegs = [\"%1/p0.img\", \"%1/p1.img\"]\n")
                     .arg(dir.path());
    d.extra_args() << "--mount" << dir.path() + "/mnt";
    QVERIFY2(d.Start(), d.Log().constData());
    QTRY_VERIFY_WITH_TIMEOUT(QFile::exists(dir.path() + "/mnt/a.img"), 10000);
    QProcess events;
    events.start(QString::fromStdString(dst::test::BinPath("dstctl")),
                 {"--socket", d.control_socket(), "events", "--json"});
    QVERIFY(events.waitForStarted(5000));
    QTest::qWait(300);
    QByteArray out, err;
    QVERIFY2(d.Ctl({"loop", "attach", "a"}, &out, &err) == 0, err.constData());
    QTest::qWait(600);
    QVERIFY2(d.Ctl({"loop", "detach", "a"}, &out, &err) == 0, err.constData());
    QTest::qWait(600);
    events.kill();
    events.waitForFinished(5000);
    QStringList loop_events;
    for (const QByteArray& line : events.readAllStandardOutput().split('\n')) {
      json e = json::parse(line.toStdString(), nullptr, false);
      if (e.is_object() && e.value("type", "") == "loop") loop_events << QString::fromStdString(e.dump());
    }
    QVERIFY2(loop_events.size() == 2 && loop_events[0].contains("\"array\":\"a\"") &&
                 loop_events[0].contains("attached") && loop_events[1].contains("detached"),
             qPrintable(loop_events.join('\n')));
    QCOMPARE(d.Terminate(), 0);
  }
};

DST_TEST_MAIN(LoopAttachTest)
#include "loop_attach_test.moc"
