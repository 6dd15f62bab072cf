// LoopDevicesFor (daemon/src/loop_devices.h) against a fake /sys/block and mountinfo: which loop
// devices use a file, read-only flag, mount point (octal escapes decoded), numeric order.
#include <QTemporaryDir>
#include <QtTest/QtTest>

#include <filesystem>
#include <fstream>

#include "loop_devices.h"
#include "test_env.h"

namespace fs = std::filesystem;

namespace {

void Write(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream(p) << text;
}

// A configured loop device: backing_file, ro, dev.
void FakeLoop(const fs::path& sys, const std::string& name, const std::string& backing, bool ro,
              const std::string& majmin) {
  Write(sys / name / "loop" / "backing_file", backing + "\n");
  Write(sys / name / "ro", ro ? "1\n" : "0\n");
  Write(sys / name / "dev", majmin + "\n");
}

}  // namespace

class LoopDevicesTest : public QObject {
  Q_OBJECT

 private slots:
  void findsDevicesOfAFile() {
    QTemporaryDir dir;
    const fs::path sys = dir.path().toStdString() + "/block";
    FakeLoop(sys, "loop10", "/mnt/dst/a.img", false, "7:10");
    FakeLoop(sys, "loop3", "/mnt/dst/a.img", true, "7:3");
    FakeLoop(sys, "loop2", "/mnt/dst/a.img (deleted)", false, "7:2");  // the file is gone
    FakeLoop(sys, "loop4", "/mnt/dst/b.img", false, "7:4");
    Write(sys / "loop5" / "dev", "7:5\n");  // not configured: no loop/backing_file
    Write(sys / "sda" / "dev", "8:0\n");
    const std::string mountinfo = dir.path().toStdString() + "/mountinfo";
    Write(mountinfo,
          "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
          "90 22 7:3 / /srv/with\\040space ro,relatime shared:50 - ext4 /dev/loop3 ro\n"
          "91 22 7:4 / /other rw shared:51 - ext4 /dev/loop4 rw\n");

    auto devs = dst::daemon::LoopDevicesFor("/mnt/dst/a.img", sys.string(), mountinfo);
    QCOMPARE(devs.size(), std::size_t(2));
    QCOMPARE(devs[0].device, std::string("/dev/loop3"));  // numeric order, not loop10 first
    QVERIFY(devs[0].read_only);
    QCOMPARE(devs[0].mounted_at, std::string("/srv/with space"));
    QCOMPARE(devs[1].device, std::string("/dev/loop10"));
    QVERIFY(!devs[1].read_only);
    QVERIFY(devs[1].mounted_at.empty());

    QCOMPARE(dst::daemon::LoopDevicesFor("/mnt/dst/b.img", sys.string(), mountinfo).at(0).mounted_at,
             std::string("/other"));
    QVERIFY(dst::daemon::LoopDevicesFor("/mnt/dst/c.img", sys.string(), mountinfo).empty());
    // A missing sysfs (a container without it) is "no loop devices", not an error or a crash.
    QVERIFY(dst::daemon::LoopDevicesFor("/mnt/dst/a.img", "/nonexistent/block", mountinfo).empty());
  }
};

DST_TEST_MAIN(LoopDevicesTest)
#include "loop_devices_test.moc"
