// kill -9 of the ASSEMBLING dstd during writes to ext4 on the loop-mounted mirror (issue 3
// item 6):
//
//   exporters E0, E1 (256 MiB sparse images); assembler A: [[array]] m0 = mirror(dst://E0/d0,
//   dst://E1/d1), region 64K, write_intent; FUSE <mnt>/m0.img -> losetup --direct-io=on ->
//   mkfs.ext4 (no discard, no lazy init: nothing writes behind our back) -> mount -> files
//   written and fsynced in a loop -> kill -9 A mid-loop -> umount -l, losetup -d (they fail
//   I/O) -> restart A (slow resync so the pass can be observed):
//
//   * only the write-intent regions are resynced: 0 < bytes < 10 % of the array, and exactly
//     the bytes of the pass the restarted daemon started with (its out-of-sync total);
//   * the legs are byte-identical afterwards;
//   * mount again (journal replay), every file fsynced before the kill is intact, umount,
//     e2fsck -fn is clean, legs still identical.
#include <fcntl.h>
#include <unistd.h>

#include <QtTest/QtTest>

#include <atomic>
#include <filesystem>
#include <thread>

#include "array_helpers.h"
#include "test_env.h"

using namespace dst::test;
using nlohmann::json;

namespace {

constexpr int kLegMiB = 256;
constexpr std::uint32_t kFileBytes = 48 << 10;

// Writes f<i>.bin (content Pattern(i)), fsyncs it and the directory; counts the durable ones.
struct FileWriter {
  QString dir;
  std::atomic<bool> stop{false};
  std::atomic<int> durable{0};
  std::atomic<int> failed_at{-1};
  std::thread t;
  void Start() {
    t = std::thread([this] {
      int dfd = ::open(dir.toLocal8Bit().constData(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      for (int i = 0; !stop && dfd >= 0; ++i) {
        QByteArray d = Pattern(1000 + i, 0, kFileBytes);
        QByteArray p = (dir + QString("/f%1.bin").arg(i)).toLocal8Bit();
        int fd = ::open(p.constData(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        bool ok = fd >= 0 && ::write(fd, d.constData(), d.size()) == d.size() && ::fsync(fd) == 0;
        if (fd >= 0) ::close(fd);
        ok = ok && ::fsync(dfd) == 0;
        if (!ok) {
          failed_at = i;
          break;
        }
        durable = i + 1;
      }
      if (dfd >= 0) ::close(dfd);
    });
  }
  void Join() {
    stop = true;
    if (t.joinable()) t.join();
  }
  ~FileWriter() { Join(); }
};

std::int64_t OutOfSyncSum(const json& a) {
  std::int64_t s = 0;
  if (a.is_object() && a.contains("legs"))
    for (auto& l : a["legs"]) s += std::max<std::int64_t>(0, JInt(l, "out_of_sync_bytes"));
  return s;
}

}  // namespace

class ArrayCrashTest : public QObject {
  Q_OBJECT

 private slots:
  void kill9AssemblerDuringExt4Writes() {
    DST_REQUIRE(IsRoot(), "needs root (loop devices, mount)");
    DST_REQUIRE(HaveFuse(), "needs /dev/fuse");
    DST_REQUIRE(HaveTool("losetup") && HaveTool("mkfs.ext4") && HaveTool("e2fsck"), "needs util-linux, e2fsprogs");
    DST_REQUIRE(QFile::exists("/dev/loop-control"), "needs /dev/loop-control");
    DST_REQUIRE(std::filesystem::exists(BinPath("dstd")), "dstd binary not built");

    MirrorRig rig;
    QString why;
    QVERIFY2(rig.StartExporters(2, kLegMiB, &why), qPrintable(why));
    const QString fs_mnt = rig.dir.path() + "/fs";
    QVERIFY(QDir().mkpath(fs_mnt));
    const QStringList legs{rig.Uri(0), rig.Uri(1)};
    const QString fast = ArrayToml("m0", "mirror", legs, "64K", "200M", "400M", 1);
    QVERIFY2(rig.StartAssembler(&fast, &why), qPrintable(why));
    const QString file = rig.File("m0");
    QVERIFY2(WaitFileExists(file, 10000), rig.as->Log().right(3000).constData());
    json a;
    QVERIFY2(WaitArrayClean(*rig.as, "m0", 90000, &a), a.dump().c_str());
    const std::uint64_t size = a.value("size", std::uint64_t(0));
    const std::uint64_t region = a.value("region_size", std::uint64_t(64 << 10));
    QVERIFY(size > 0);
    const std::int64_t initial = BytesResyncedTotal(a);
    qInfo("array %llu bytes, initial sync %lld bytes", (unsigned long long)size, (long long)initial);

    int durable = 0;
    {
      StackGuard g;
      QVERIFY2(g.Attach(file, false, &why), qPrintable(why));
      Cmd c = Run("mkfs.ext4", {"-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", g.loop});
      QVERIFY2(c.rc == 0, qPrintable(Show(c)));
      QVERIFY2(g.Mount(fs_mnt, {}, &why), qPrintable(why));
      Run("sync", {});
      // Let the lazy clear empty the intent map of mkfs's regions (quiet period 5 s), so that the
      // crash leaves only the regions of the write loop.
      WaitUntil([&] {
        json s = ArrayDetail(*rig.as, "m0");
        return s.contains("stats") && JInt(s["stats"], "intent_regions") >= 0 &&
               JInt(s["stats"], "intent_regions") * region < size / 50;
      }, 20000, 250);
      FileWriter w;
      w.dir = fs_mnt;
      w.Start();
      QVERIFY2(WaitUntil([&] { return w.durable >= 60; }, 60000), "file writer made no progress");
      json before = ArrayDetail(*rig.as, "m0");
      qInfo("kill -9 of the assembler after %d durable files, intent regions %lld", w.durable.load(),
            before.contains("stats") ? (long long)JInt(before["stats"], "intent_regions") : -1LL);
      rig.as->Kill9();
      w.Join();
      durable = w.durable;
      qInfo("writer stopped: %d durable, first failure at file %d", durable, w.failed_at.load());
      Run("umount", {"-l", fs_mnt}, 30000);
      g.fs_mount.clear();
      Run("losetup", {"-d", g.loop}, 30000);
      g.loop.clear();
    }

    // Restart with a slow resync so that the pass is observable, then speed it up.
    const QString slow = ArrayToml("m0", "mirror", legs, "64K", "1M", "1M", 1);
    QVERIFY2(rig.StartAssembler(&slow, &why), qPrintable(why));
    QVERIFY2(WaitFileExists(file, 10000), rig.as->Log().right(3000).constData());
    std::int64_t pass_total = -1, oos_first = -1, intent_first = -1;
    bool saw_running = false;
    WaitUntil([&] {
      a = ArrayDetail(*rig.as, "m0");
      if (!a.is_object()) return false;
      if (oos_first < 0) {
        oos_first = OutOfSyncSum(a);
        if (a.contains("stats")) intent_first = JInt(a["stats"], "intent_regions");
      }
      if (a.contains("resync") && a["resync"].is_object() && ResyncActive(a)) {
        saw_running = true;
        pass_total = std::max(pass_total, JInt(a["resync"], "bytes_total"));
        return true;
      }
      return !ResyncActive(a) && ArrayState(a) == "clean";
    }, 20000, 50);
    QByteArray out, err;
    QVERIFY2(rig.as->Ctl({"array", "resync-rate", "m0", "--min", "200M", "--max", "400M"}, &out, &err) == 0,
             err.constData());
    QVERIFY2(WaitArrayClean(*rig.as, "m0", 120000, &a), a.dump().c_str());
    const std::int64_t resynced = BytesResyncedTotal(a);
    qInfo("after restart: resynced %lld bytes (%.2f %% of the array), pass total %lld, out-of-sync at "
          "assembly %lld, intent regions at assembly %lld (x%llu = %lld)",
          (long long)resynced, 100.0 * double(resynced) / double(size), (long long)pass_total, (long long)oos_first,
          (long long)intent_first, (unsigned long long)region, (long long)(intent_first * std::int64_t(region)));
    QVERIFY2(resynced > 0, "nothing resynced after a crash during writes");
    QVERIFY2(std::uint64_t(resynced) < size / 10, "more than 10 % resynced: not only the write-intent regions");
    QVERIFY2(resynced % std::int64_t(region) == 0 || std::uint64_t(resynced) > size - region,
             "resynced bytes are not whole regions");
    if (saw_running)
      QCOMPARE(resynced, pass_total);
    else
      QCOMPARE(resynced, oos_first);
    // The restarted daemon reports the intent regions it found: exactly what was resynced.
    if (intent_first > 0) QCOMPARE(resynced, intent_first * std::int64_t(region));
    std::int64_t diff = FirstDiff(rig.image[0], rig.image[1], size);
    QVERIFY2(diff < 0, qPrintable(QString("legs differ at byte %1 after resync").arg(diff)));

    {
      StackGuard g;
      QVERIFY2(g.Attach(file, false, &why), qPrintable(why));
      QVERIFY2(g.Mount(fs_mnt, {}, &why), qPrintable(why));  // replays the journal
      for (int i = 0; i < durable; ++i) {
        QFile f(fs_mnt + QString("/f%1.bin").arg(i));
        QVERIFY2(f.open(QIODevice::ReadOnly), qPrintable(QString("fsynced file f%1 missing").arg(i)));
        QVERIFY2(f.readAll() == Pattern(1000 + i, 0, kFileBytes), qPrintable(QString("fsynced file f%1 differs").arg(i)));
      }
      QVERIFY2(g.Umount(&why), qPrintable(why));
      Run("blockdev", {"--flushbufs", g.loop});
      Cmd c = Run("e2fsck", {"-fn", g.loop});
      QVERIFY2(c.rc == 0, qPrintable(Show(c)));
      QVERIFY2(g.Detach(&why), qPrintable(why));
    }
    QVERIFY2(WaitArrayClean(*rig.as, "m0", 30000, &a), a.dump().c_str());
    diff = FirstDiff(rig.image[0], rig.image[1], size);
    QVERIFY2(diff < 0, qPrintable(QString("legs differ at byte %1 at the end").arg(diff)));
    QCOMPARE(rig.as->Terminate(), 0);
  }
};

DST_TEST_MAIN(ArrayCrashTest)
#include "array_crash_test.moc"
