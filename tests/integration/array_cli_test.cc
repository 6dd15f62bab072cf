// Array management through dstctl against real daemons (issue 3 items 5 and 6):
//
//   * detail --test exit codes: 0 healthy, 1 degraded, 2 unusable (every leg failed), 4 error
//     (unknown array);
//   * apply: --dry-run prints the plan and changes nothing; apply executes it; a second apply
//     says "nothing to do" and exits 0;
//   * events --json emits leg_state and resync_progress (and resync_done) lines during a
//     resync; status percentages (JSON and the mdstat-like text) stay within 0..100;
//   * detach-leg as a point-in-time snapshot: ext4 frozen, leg 1 detached, more files written;
//     another daemon exports the detached leg's image read-only and imports it as a volume,
//     which is loop-mounted read-only showing exactly the files of detach time; the array keeps
//     running and re-adds the leg later with a partial resync; legs identical at the end.
#include <QtTest/QtTest>

#include <filesystem>
#include <map>

#include "array_helpers.h"
#include "test_env.h"

using namespace dst::test;
using nlohmann::json;

namespace {
constexpr int kLegMiB = 64;
constexpr int kIoTimeout = 3;
constexpr std::uint64_t kRegion = 64 << 10;

bool WriteFiles(const QString& dir, const QString& prefix, int n, int seed, std::map<QString, QByteArray>* files) {
  for (int i = 0; i < n; ++i) {
    QString rel = QString("%1%2.bin").arg(prefix).arg(i);
    QByteArray d = Pattern(seed * 1000 + i, 0, 4096 * (1 + (i * 13) % 64));
    QFile f(dir + "/" + rel);
    if (!f.open(QIODevice::WriteOnly) || f.write(d) != d.size()) return false;
    (*files)[rel] = d;
  }
  return Run("sync", {}).rc == 0;
}
}  // namespace

class ArrayCliTest : public QObject {
  Q_OBJECT

 private slots:
  void init() {
    DST_REQUIRE(IsRoot(), "needs root (FUSE mount)");
    DST_REQUIRE(HaveFuse(), "needs /dev/fuse");
    DST_REQUIRE(std::filesystem::exists(BinPath("dstd")), "dstd binary not built");
  }

  void detailTestExitCodes() {
    MirrorRig rig;
    QString why;
    QVERIFY2(rig.StartExporters(2, kLegMiB, &why), qPrintable(why));
    const QString toml = ArrayToml("m0", "mirror", {rig.Uri(0), rig.Uri(1)}, "64K", "", "", -1,
                                   QString("leg_timeout = %1\n").arg(kIoTimeout));
    QVERIFY2(rig.StartAssembler(&toml, &why), qPrintable(why));
    json a;
    QVERIFY2(WaitArrayClean(*rig.as, "m0", 60000, &a), a.dump().c_str());
    QByteArray out, err;
    QCOMPARE(rig.as->Ctl({"detail", "m0", "--test"}, &out, &err), 0);
    QCOMPARE(rig.as->Ctl({"detail", "m0"}, &out, &err), 0);
    QVERIFY2(out.contains("m0") && out.contains("mirror"), out.constData());
    QCOMPARE(rig.as->Ctl({"detail", "nosuch", "--test"}, &out, &err), 4);
    QVERIFY(!err.isEmpty());

    QVERIFY2(rig.as->Ctl({"array", "fail-leg", "m0", "1"}, &out, &err) == 0, err.constData());
    QCOMPARE(rig.as->Ctl({"detail", "m0", "--test"}, &out, &err), 1);
    QCOMPARE(rig.as->Ctl({"status"}, &out, &err), 0);
    QVERIFY2(out.contains("[U_]"), out.constData());

    // The last leg dies: a read fails with EIO within io_timeout + slack, the array is unusable.
    rig.ex[0]->Kill9();
    QByteArray back;
    int e = 0;
    QVERIFY(!PreadDirect(rig.File("m0"), 0, 4096, &back, &e));
    QCOMPARE(e, EIO);
    QVERIFY2(WaitUntil([&] { return rig.as->Ctl({"detail", "m0", "--test"}) == 2; }, 15000),
             ArrayDetail(*rig.as, "m0").dump().c_str());
  }

  void applyDryRunAndIdempotence() {
    MirrorRig rig;
    QString why;
    QVERIFY2(rig.StartExporters(2, kLegMiB, &why), qPrintable(why));
    const QString empty;
    QVERIFY2(rig.StartAssembler(&empty, &why), qPrintable(why));
    QString local;
    local = rig.dir.path() + "/local.img";
    QVERIFY(MakeSparse(local, 32 << 20));
    const QString file = rig.dir.path() + "/apply.toml";
    auto write_file = [&](const QString& text) {
      QFile f(file);
      return f.open(QIODevice::WriteOnly | QIODevice::Truncate) && f.write(text.toUtf8()) == text.toUtf8().size();
    };
    const QString desired = ArrayToml("m0", "mirror", {rig.Uri(0), rig.Uri(1)}) + ArrayToml("lin", "linear", {local});
    QVERIFY(write_file(desired));
    auto names = [&]() {
      QStringList n;
      json j = CtlJson(*rig.as, {"array", "list", "--json"});
      json arr = j.is_array() ? j : (j.is_object() ? j.value("arrays", json::array()) : json::array());
      for (auto& x : arr) n << QString::fromStdString(x.value("name", ""));
      n.sort();
      return n;
    };
    QCOMPARE(names(), QStringList());

    QByteArray out, err;
    QCOMPARE(rig.as->Ctl({"apply", file, "--dry-run"}, &out, &err), 0);
    qInfo().noquote() << "dry-run plan:\n" << out;
    QVERIFY2(out.contains("m0") && out.contains("lin"), out.constData());
    QCOMPARE(names(), QStringList());  // nothing changed

    QVERIFY2(rig.as->Ctl({"apply", file}, &out, &err) == 0, err.constData());
    QCOMPARE(names(), (QStringList{"lin", "m0"}));
    QVERIFY(WaitFileExists(rig.File("m0"), 10000));
    json a;
    QVERIFY2(WaitArrayClean(*rig.as, "m0", 60000, &a), a.dump().c_str());

    QCOMPARE(rig.as->Ctl({"apply", file}, &out, &err), 0);
    QVERIFY2(out.toLower().contains("nothing to do"), out.constData());
    QCOMPARE(rig.as->Ctl({"apply", file, "--dry-run"}, &out, &err), 0);
    QVERIFY2(out.toLower().contains("nothing to do"), out.constData());

    // A changed file: the dry run shows the new array, and still changes nothing.
    QString local2 = rig.dir.path() + "/local2.img";
    QVERIFY(MakeSparse(local2, 16 << 20));
    QVERIFY(write_file(desired + ArrayToml("lin2", "linear", {local2})));
    QCOMPARE(rig.as->Ctl({"apply", file, "--dry-run"}, &out, &err), 0);
    QVERIFY2(out.contains("lin2") && !out.contains("m0"), out.constData());
    QCOMPARE(names(), (QStringList{"lin", "m0"}));
    QVERIFY2(rig.as->Ctl({"apply", file}, &out, &err) == 0, err.constData());
    QCOMPARE(names(), (QStringList{"lin", "lin2", "m0"}));
  }

  void eventsAndPercentagesDuringResync() {
    MirrorRig rig;
    QString why;
    QVERIFY2(rig.StartExporters(2, kLegMiB, &why), qPrintable(why));
    const QString toml = ArrayToml("m0", "mirror", {rig.Uri(0), rig.Uri(1)}, "64K", "200M", "400M");
    QVERIFY2(rig.StartAssembler(&toml, &why), qPrintable(why));
    json a;
    QVERIFY2(WaitArrayClean(*rig.as, "m0", 60000, &a), a.dump().c_str());

    QProcess ev;
    ev.start(QString::fromStdString(BinPath("dstctl")),
             {"--socket", rig.as->control_socket(), "events", "--json"});
    QVERIFY(ev.waitForStarted());
    struct Killer {
      QProcess& p;
      ~Killer() {
        if (p.state() != QProcess::NotRunning) {
          p.kill();
          p.waitForFinished(5000);
        }
      }
    } killer{ev};

    QByteArray out, err;
    QVERIFY2(rig.as->Ctl({"array", "detach-leg", "m0", "1"}, &out, &err) == 0, err.constData());
    // 8 MiB of writes -> 128 regions out of sync on leg 1.
    for (std::uint64_t off = 0; off < (8u << 20); off += 1 << 20)
      QVERIFY(PwriteDirect(rig.File("m0"), off * 4, Pattern(3, off, 1 << 20)));
    QVERIFY2(rig.as->Ctl({"array", "resync-rate", "m0", "--min", "2M", "--max", "2M"}, &out, &err) == 0,
             err.constData());
    QVERIFY2(rig.as->Ctl({"array", "re-add-leg", "m0", "1"}, &out, &err) == 0, err.constData());

    QRegularExpression pct_re("(\\d+(?:\\.\\d+)?)%");
    int samples = 0;
    QElapsedTimer t;
    t.start();
    while (t.elapsed() < 3000) {
      json x = ArrayDetail(*rig.as, "m0");
      if (x.contains("resync") && x["resync"].is_object()) {
        double p = ResyncPercent(x);
        QVERIFY2(p >= 0 && p <= 100, x.dump().c_str());
        ++samples;
      }
      QByteArray human;
      QCOMPARE(rig.as->Ctl({"status"}, &human), 0);
      auto it = pct_re.globalMatch(QString::fromUtf8(human));
      while (it.hasNext()) {
        double p = it.next().captured(1).toDouble();
        QVERIFY2(p >= 0 && p <= 100, human.constData());
      }
      QTest::qWait(200);
    }
    QVERIFY2(samples > 0, "no resync object seen in detail --json while resyncing");
    QByteArray human;
    rig.as->Ctl({"status"}, &human);
    qInfo().noquote() << "status while resyncing:\n" << human;
    QVERIFY2(rig.as->Ctl({"array", "resync-rate", "m0", "--min", "200M", "--max", "400M"}, &out, &err) == 0,
             err.constData());
    QVERIFY2(WaitArrayClean(*rig.as, "m0", 60000, &a), a.dump().c_str());
    QTest::qWait(1500);
    ev.waitForReadyRead(100);
    const QByteArray lines = ev.readAllStandardOutput();
    QStringList types;
    int bad = 0;
    for (const QByteArray& line : lines.split('\n')) {
      if (line.trimmed().isEmpty()) continue;
      json j = json::parse(line.toStdString(), nullptr, false);
      if (!j.is_object() || !j.contains("type") || !j.contains("ts")) {
        ++bad;
        continue;
      }
      types << QString::fromStdString(j["type"].get<std::string>());
      if (j["type"] == "resync_progress" && j.contains("percent")) {
        double p = j["percent"].get<double>();
        QVERIFY2(p >= 0 && p <= 100, line.constData());
      }
    }
    qInfo("events: %lld lines, types %s", (long long)types.size(), qPrintable(QStringList(types).join(',')));
    QCOMPARE(bad, 0);
    QVERIFY2(types.contains("leg_state"), lines.left(2000).constData());
    QVERIFY2(types.contains("resync_progress"), lines.left(2000).constData());
    QVERIFY2(types.contains("resync_done"), lines.left(2000).constData());
    QCOMPARE(FirstDiff(rig.image[0], rig.image[1], a.value("size", std::uint64_t(0))), std::int64_t(-1));
  }

  void detachLegAsSnapshot() {
    DST_REQUIRE(HaveTool("losetup") && HaveTool("mkfs.ext4") && HaveTool("fsfreeze"), "needs util-linux, e2fsprogs");
    DST_REQUIRE(QFile::exists("/dev/loop-control"), "needs /dev/loop-control");
    MirrorRig rig;
    QString why;
    QVERIFY2(rig.StartExporters(2, kLegMiB, &why), qPrintable(why));
    const QString toml = ArrayToml("m0", "mirror", {rig.Uri(0), rig.Uri(1)});
    QVERIFY2(rig.StartAssembler(&toml, &why), qPrintable(why));
    QVERIFY2(WaitFileExists(rig.File("m0"), 10000), rig.as->Log().right(3000).constData());
    json a;
    QVERIFY2(WaitArrayClean(*rig.as, "m0", 60000, &a), a.dump().c_str());
    const std::uint64_t size = a.value("size", std::uint64_t(0));
    const QString fs = rig.dir.path() + "/fs", snap_fs = rig.dir.path() + "/snapfs";
    QVERIFY(QDir().mkpath(fs) && QDir().mkpath(snap_fs));

    StackGuard g;
    QVERIFY2(g.Attach(rig.File("m0"), false, &why), qPrintable(why));
    Cmd c = Run("mkfs.ext4", {"-q", "-F", g.loop});
    QVERIFY2(c.rc == 0, qPrintable(Show(c)));
    QVERIFY2(g.Mount(fs, {}, &why), qPrintable(why));
    std::map<QString, QByteArray> before, after;
    QVERIFY(WriteFiles(fs, "before", 40, 1, &before));
    c = Run("fsfreeze", {"-f", fs});
    QVERIFY2(c.rc == 0, qPrintable(Show(c)));
    QByteArray out, err;
    const int rc = rig.as->Ctl({"array", "detach-leg", "m0", "1"}, &out, &err);
    Run("fsfreeze", {"-u", fs});
    QVERIFY2(rc == 0, err.constData());
    const std::int64_t base = BytesResyncedTotal(ArrayDetail(*rig.as, "m0"));
    QVERIFY(WriteFiles(fs, "after", 40, 2, &after));  // the array keeps running

    // Another daemon exports the detached leg's image read-only and imports it as a volume.
    std::int64_t resynced = -1;
    {
      FuseGuard snap_fuse{rig.dir.path() + "/snapmnt"};
      QDir().mkpath(snap_fuse.path);
      DaemonProcess d(rig.dir.path() + "/snapd");
      d.config() = QString("[[export]]\nname = \"snap\"\npath = \"%1\"\nread_only = true\n\n").arg(rig.image[1]) +
                   VolumeToml("snap", QString("dst://127.0.0.1:%1/snap").arg(d.port()), 10, 5);
      d.extra_args() << "--mount" << snap_fuse.path;
      QVERIFY2(d.Start(), d.Log().constData());
      const QString snap_file = snap_fuse.path + "/snap.img";
      QVERIFY2(WaitFileExists(snap_file, 10000), d.Log().right(2000).constData());
      json vl = CtlJson(d, {"volume", "list", "--json"});
      json arr = vl.is_array() ? vl : (vl.is_object() ? vl.value("volumes", json::array()) : json::array());
      QVERIFY2(!arr.empty() && arr[0].value("read_only", false), vl.dump().c_str());
      StackGuard sg;
      QVERIFY2(sg.Attach(snap_file, true, &why), qPrintable(why));
      QVERIFY2(sg.Mount(snap_fs, {"ro", "noload"}, &why), qPrintable(why));
      for (auto& [rel, d0] : before) {
        QFile f(snap_fs + "/" + rel);
        QVERIFY2(f.open(QIODevice::ReadOnly) && f.readAll() == d0, qPrintable("snapshot lacks " + rel));
      }
      for (auto& [rel, d1] : after) QVERIFY2(!QFile::exists(snap_fs + "/" + rel), qPrintable("snapshot has " + rel));
      QVERIFY2(sg.Umount(&why), qPrintable(why));
      QVERIFY2(sg.Detach(&why), qPrintable(why));
      QCOMPARE(d.Terminate(), 0);
    }

    QVERIFY2(rig.as->Ctl({"array", "re-add-leg", "m0", "1"}, &out, &err) == 0, err.constData());
    QVERIFY2(WaitArrayClean(*rig.as, "m0", 60000, &a), a.dump().c_str());
    resynced = BytesResyncedTotal(a) - base;
    qInfo("snapshot leg re-added: %lld bytes resynced of %llu", (long long)resynced, (unsigned long long)size);
    QVERIFY2(resynced > 0 && std::uint64_t(resynced) < size / 2, "re-add after the snapshot was not partial");
    QVERIFY(resynced % std::int64_t(kRegion) == 0);
    QVERIFY2(g.Umount(&why), qPrintable(why));
    Run("blockdev", {"--flushbufs", g.loop});
    c = Run("e2fsck", {"-fn", g.loop});
    QVERIFY2(c.rc == 0, qPrintable(Show(c)));
    QVERIFY2(g.Detach(&why), qPrintable(why));
    QVERIFY2(WaitArrayClean(*rig.as, "m0", 30000, &a), a.dump().c_str());
    QCOMPARE(FirstDiff(rig.image[0], rig.image[1], size), std::int64_t(-1));
  }
};

DST_TEST_MAIN(ArrayCliTest)
#include "array_cli_test.moc"
