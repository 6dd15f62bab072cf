// NBD through dstd (issue 4 items 1 and 4): a real dstd serves its exports over NBD on its own
// port, and real NBD clients nobody here wrote use it — nbdinfo (--json, --map), nbdcopy,
// qemu-img compare, qemu-io — while a DST client writes to the same export.  The dirty-map
// contexts `dst:dirty:<slot>` are checked twice: in-process (NbdServer + MirrorDevice over files,
// the provider dstd uses) and through dstd with a mirror array, a failed leg and a re-add.
#include <unistd.h>

#include <QCryptographicHash>
#include <QDir>
#include <QFile>
#include <QJsonArray>
#include <QJsonDocument>
#include <QJsonObject>
#include <QProcess>
#include <QTemporaryDir>
#include <QTest>
#include <atomic>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include "nbd_frontend.h"
#include "daemon_process.h"
#include "dst/dirty_map_store.h"
#include "dst/file_device.h"
#include "dst/mirror_device.h"
#include "dst/net/nbd_server.h"
#include "dst/net/remote_device.h"
#include "test_env.h"

using namespace dst;
using dst::test::DaemonProcess;

namespace {

struct ToolResult {
  int rc = -1;
  QByteArray out;
  QByteArray err;
};

ToolResult Run(const QString& prog, const QStringList& args, int timeout_ms = 60000) {
  ToolResult r;
  QProcess p;
  p.start(prog, args);
  if (!p.waitForStarted(10000)) {
    r.err = "failed to start " + prog.toUtf8();
    return r;
  }
  if (!p.waitForFinished(timeout_ms)) {
    p.kill();
    p.waitForFinished(5000);
    r.err = "timed out: " + prog.toUtf8() + " " + args.join(' ').toUtf8();
    return r;
  }
  r.out = p.readAllStandardOutput();
  r.err = p.readAllStandardError();
  r.rc = p.exitStatus() == QProcess::NormalExit ? p.exitCode() : -1;
  return r;
}

QByteArray Sha256(const QString& path, qint64 limit = -1) {
  QFile f(path);
  if (!f.open(QIODevice::ReadOnly)) return {};
  QCryptographicHash h(QCryptographicHash::Sha256);
  if (limit < 0) {
    h.addData(&f);
  } else {
    h.addData(f.read(limit));
  }
  return h.result().toHex();
}

bool WriteRandomFile(const QString& path, qint64 size, quint32 seed) {
  QFile f(path);
  if (!f.open(QIODevice::WriteOnly | QIODevice::Truncate)) return false;
  QByteArray buf(1 << 20, 0);
  quint32 x = seed * 2654435761u + 1;
  for (qint64 done = 0; done < size; done += buf.size()) {
    for (int i = 0; i < buf.size(); ++i) {
      x ^= x << 13; x ^= x >> 17; x ^= x << 5;
      buf[i] = char(x);
    }
    if (f.write(buf.constData(), std::min<qint64>(buf.size(), size - done)) < 0) return false;
  }
  return true;
}

struct Extent {
  quint64 offset, length;
  int type;
  bool operator==(const Extent& o) const {
    return offset == o.offset && length == o.length && type == o.type;
  }
};

// `nbdinfo --map[=CONTEXT]` lines: offset length type description.
std::vector<Extent> ParseMap(const QByteArray& out) {
  std::vector<Extent> v;
  for (const QByteArray& line : out.split('\n')) {
    QList<QByteArray> f = line.simplified().split(' ');
    if (f.size() < 3) continue;
    v.push_back({f[0].toULongLong(), f[1].toULongLong(), f[2].toInt()});
  }
  return v;
}

QString Dump(const std::vector<Extent>& v) {
  QString s;
  for (auto& e : v) s += QString("[%1 +%2 t%3] ").arg(e.offset).arg(e.length).arg(e.type);
  return s;
}

// Merges adjacent extents of equal type (nbdinfo prints what the server sends).
std::vector<Extent> Merge(std::vector<Extent> v) {
  std::vector<Extent> out;
  for (auto& e : v) {
    if (!out.empty() && out.back().type == e.type && out.back().offset + out.back().length == e.offset)
      out.back().length += e.length;
    else
      out.push_back(e);
  }
  return out;
}

constexpr quint64 kK = 1024, kM = 1024 * 1024;

// An io_context with two threads, stopped and joined on scope exit (a failed QVERIFY returns
// early).
struct IoThreads {
  boost::asio::io_context io;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> guard{io.get_executor()};
  std::vector<std::thread> threads;
  IoThreads() {
    for (int i = 0; i < 2; ++i) threads.emplace_back([this] { io.run(); });
  }
  ~IoThreads() {
    guard.reset();
    io.stop();
    for (auto& t : threads) t.join();
  }
};

// Reads [off, off + len) in max_io_bytes pieces; true when every byte is `c`.
bool AllBytes(BlockDevice& dev, quint64 off, quint64 len, char c) {
  std::vector<char> buf(256 * kK);
  for (quint64 o = off; o < off + len; o += buf.size()) {
    if (!ReadSync(dev, o, buf.data(), buf.size()).ok()) return false;
    for (char b : buf)
      if (b != c) return false;
  }
  return true;
}

}  // namespace

class NbdDaemonTest : public QObject {
  Q_OBJECT

  QTemporaryDir dir_;

  QString P(const QString& name) const { return dir_.path() + "/" + name; }
  static QString Uri(quint16 port, const QString& name) {
    return QString("nbd://127.0.0.1:%1/%2").arg(port).arg(name);
  }

  // The expected dirty map of an 8 MiB - 4 KiB mirror after writes at 1 MiB (4 KiB) and
  // 5 MiB + 100 KiB (8 KiB), region 64 KiB: the covering regions.
  static std::vector<Extent> ExpectedDirty(quint64 size) {
    return {{0, 1 * kM, 0},
            {1 * kM, 64 * kK, 1},
            {1 * kM + 64 * kK, 4 * kM, 0},
            {5 * kM + 64 * kK, 64 * kK, 1},
            {5 * kM + 128 * kK, size - (5 * kM + 128 * kK), 0}};
  }

 private slots:
  void initTestCase() {
    QVERIFY(dir_.isValid());
    DST_REQUIRE(dst::test::HaveTool("nbdinfo") && dst::test::HaveTool("nbdcopy"),
                "libnbd-bin (nbdinfo, nbdcopy) not installed");
    DST_REQUIRE(dst::test::HaveTool("qemu-img") && dst::test::HaveTool("qemu-io"),
                "qemu-utils not installed");
  }

  // The provider dstd publishes, on an in-process NbdServer: fail leg 1, write two ranges,
  // nbdinfo --map=dst:dirty:1 lists exactly their covering regions; leg 0 stays clean; after a
  // re-add and resync the map is empty.
  void dirtyContextInProcess() {
    for (const char* n : {"ip0.img", "ip1.img"}) {
      QFile f(P(n));
      QVERIFY(f.open(QIODevice::WriteOnly | QIODevice::Truncate));
      QVERIFY(f.resize(8 * kM));
    }
    std::vector<std::shared_ptr<BlockDevice>> legs;
    for (const char* n : {"ip0.img", "ip1.img"}) {
      auto d = FileDevice::Open(P(n).toStdString(), FileDeviceOptions{});
      QVERIFY2(d.ok(), d.status().ToString().c_str());
      legs.push_back(d.value());
    }
    auto store = std::make_shared<MemoryDirtyMapStore>();
    MirrorOptions mo;
    mo.name = "ip";
    mo.region_size = 64 * kK;
    mo.assume_clean = true;
    auto mr = MirrorDevice::Create(legs, store, mo);
    QVERIFY2(mr.ok(), mr.status().ToString().c_str());
    std::shared_ptr<MirrorDevice> m = mr.value();
    const quint64 size = m->Info().size;
    QCOMPARE(size, 8 * kM - 4 * kK);

    IoThreads iot;
    net::NbdServerOptions so;
    so.port = 0;
    auto srv = std::make_unique<net::NbdServer>(iot.io, so);
    QVERIFY(srv->Start().ok());
    net::NbdExportSpec spec;
    spec.name = "ip";
    spec.device = m;
    spec.contexts = daemon::DirtyMapContexts(m);
    QCOMPARE(spec.contexts.size(), std::size_t(2));
    QVERIFY(srv->AddExport(std::move(spec)).ok());
    const QString uri = Uri(srv->port(), "ip");

    ToolResult r = Run("nbdinfo", {"--json", uri});
    QVERIFY2(r.rc == 0, r.err.constData());
    QJsonArray ctx = QJsonDocument::fromJson(r.out).object()["exports"].toArray()[0]
                         .toObject()["contexts"].toArray();
    QStringList names;
    for (auto c : ctx) names << c.toString();
    QVERIFY2(names.contains("base:allocation") && names.contains("dst:dirty:0") &&
                 names.contains("dst:dirty:1"), qPrintable(names.join(",")));

    r = Run("nbdinfo", {"--map=dst:dirty:1", uri});
    QVERIFY2(r.rc == 0, r.err.constData());
    QCOMPARE(Merge(ParseMap(r.out)), (std::vector<Extent>{{0, size, 0}}));

    QVERIFY(m->FailLeg(1).ok());
    std::vector<char> buf(8 * kK, 'x');
    QVERIFY(WriteSync(*m, 1 * kM, buf.data(), 4 * kK).ok());
    QVERIFY(WriteSync(*m, 5 * kM + 100 * kK, buf.data(), 8 * kK).ok());

    r = Run("nbdinfo", {"--map=dst:dirty:1", uri});
    QVERIFY2(r.rc == 0, r.err.constData());
    qInfo("nbdinfo --map=dst:dirty:1 (in-process, leg 1 failed):\n%s", r.out.constData());
    std::vector<Extent> got = Merge(ParseMap(r.out));
    QVERIFY2(got == ExpectedDirty(size), qPrintable(Dump(got)));
    r = Run("nbdinfo", {"--map=dst:dirty:0", uri});
    QCOMPARE(Merge(ParseMap(r.out)), (std::vector<Extent>{{0, size, 0}}));

    QVERIFY(m->ReAddLeg(1, legs[1]).ok());
    QVERIFY(m->WaitResyncIdle(std::chrono::seconds(30)));
    r = Run("nbdinfo", {"--map=dst:dirty:1", uri});
    QCOMPARE(Merge(ParseMap(r.out)), (std::vector<Extent>{{0, size, 0}}));

    auto drained = std::make_shared<std::atomic<bool>>(false);
    srv->Drain([drained](Status) { *drained = true; });
    QTRY_VERIFY_WITH_TIMEOUT(drained->load(), 10000);
    srv.reset();
    QVERIFY(m->Close().ok());
  }

  // dstd with a sparse file export: NBD on its own port, nbdinfo --json and --map (holes),
  // status --json "nbd".
  void daemonInfoAndMap() {
    QString img = P("sparse.img");
    {
      QFile f(img);
      QVERIFY(f.open(QIODevice::WriteOnly | QIODevice::Truncate));
      QVERIFY(f.resize(16 * kM));
      QVERIFY(f.seek(2 * kM));
      QVERIFY(f.write(QByteArray(1 * kM, 'd')) == qint64(kM));
    }
    DaemonProcess d(P("d1"));
    d.config() = QString("[[export]]\nname = \"disk\"\npath = \"%1\"\n").arg(img);
    QVERIFY2(d.Start(), d.Log().constData());
    const QString uri = Uri(d.nbd_port(), "disk");

    ToolResult r = Run("nbdinfo", {"--json", uri});
    QVERIFY2(r.rc == 0, r.err.constData());
    QJsonObject info = QJsonDocument::fromJson(r.out).object();
    QJsonObject e = info["exports"].toArray()[0].toObject();
    QCOMPARE(e["export-name"].toString(), QString("disk"));
    QCOMPARE(qint64(e["export-size"].toDouble()), qint64(16 * kM));
    QVERIFY(e["can_flush"].toBool());
    QVERIFY(!e["is_read_only"].toBool());
    // Issue 11: neither INFO nor LIST reveals the host path of the image.
    QCOMPARE(e["description"].toString(), QString("dst export disk"));
    QVERIFY2(!r.out.contains(img.toUtf8()), r.out.constData());
    ToolResult list = Run("nbdinfo", {"--list", "--json", Uri(d.nbd_port(), "")});
    QVERIFY2(list.rc == 0, list.err.constData());
    QVERIFY2(list.out.contains("dst export disk") && !list.out.contains(img.toUtf8()),
             list.out.constData());

    r = Run("nbdinfo", {"--map", uri});
    QVERIFY2(r.rc == 0, r.err.constData());
    qInfo("nbdinfo --map (dstd, sparse export):\n%s", r.out.constData());
    std::vector<Extent> got = Merge(ParseMap(r.out));
    std::vector<Extent> want{{0, 2 * kM, 3}, {2 * kM, 1 * kM, 0}, {3 * kM, 13 * kM, 3}};
    QVERIFY2(got == want, qPrintable(Dump(got)));

    QByteArray out;
    QCOMPARE(d.Ctl({"status", "--json"}, &out), 0);
    QJsonObject nbd = QJsonDocument::fromJson(out).object()["nbd"].toObject();
    QCOMPARE(nbd["port"].toInt(), int(d.nbd_port()));
    QVERIFY(nbd["enabled"].toBool());
    QVERIFY(nbd.contains("frames_per_call") && nbd.contains("connections"));
    QVERIFY(nbd["requests"].toDouble() > 0);
    QCOMPARE(d.Terminate(), 0);
  }

  // nbdcopy both ways with checksums, qemu-img compare, and a DST client and an NBD client
  // (qemu-io) writing disjoint ranges of the same export at the same time.
  void daemonCopyCompareConcurrent() {
    const qint64 kSize = 8 * kM;
    QString img = P("rt.img"), src = P("src.bin"), back = P("back.bin");
    QVERIFY(WriteRandomFile(src, kSize, 7));
    DaemonProcess d(P("d2"));
    d.config() = QString("[[export]]\nname = \"rt\"\npath = \"%1\"\nsize = \"8M\"\n").arg(img);
    QVERIFY2(d.Start(), d.Log().constData());
    const QString uri = Uri(d.nbd_port(), "rt");

    ToolResult r = Run("nbdcopy", {src, uri});
    QVERIFY2(r.rc == 0, r.err.constData());
    r = Run("nbdcopy", {uri, back});
    QVERIFY2(r.rc == 0, r.err.constData());
    QCOMPARE(Sha256(back), Sha256(src));
    QCOMPARE(Sha256(img), Sha256(src));  // the daemon's file itself
    r = Run("qemu-img", {"compare", "-f", "raw", "-F", "raw", src, uri});
    QVERIFY2(r.rc == 0, (r.out + r.err).constData());

    // DST writes 0x5a over [0, 4M) while qemu-io writes 0xab over [4M, 8M) through NBD.
    IoThreads iot;
    net::RemoteOptions ro;
    ro.port = d.port();
    ro.export_name = "rt";
    auto rd = net::RemoteDevice::Connect(iot.io, ro);
    QVERIFY2(rd.ok(), rd.status().ToString().c_str());
    std::shared_ptr<net::RemoteDevice> dst_dev = rd.value();
    std::atomic<bool> dst_ok{true};
    std::thread dst_writer([&] {
      std::vector<char> w(256 * kK, 0x5a);
      for (int pass = 0; pass < 3; ++pass)
        for (quint64 off = 0; off < 4 * kM; off += w.size())
          if (!WriteSync(*dst_dev, off, w.data(), w.size()).ok()) dst_ok = false;
      if (!FlushSync(*dst_dev).ok()) dst_ok = false;
    });
    QStringList cmds;
    for (int pass = 0; pass < 3; ++pass)
      for (quint64 off = 4 * kM; off < 8 * kM; off += 256 * kK)
        cmds << "-c" << QString("write -P 0xab %1 %2").arg(off).arg(256 * kK);
    cmds << "-c" << "flush";
    r = Run("qemu-io", QStringList{"-f", "raw"} + cmds + QStringList{uri});
    dst_writer.join();
    QVERIFY2(r.rc == 0 && !r.out.contains("failed"), (r.out + r.err).constData());
    QVERIFY(dst_ok.load());

    // Each side verifies the other's range, and its own.
    r = Run("qemu-io", {"-f", "raw", "-c", QString("read -P 0x5a 0 %1").arg(4 * kM), "-c",
                        QString("read -P 0xab %1 %1").arg(4 * kM), uri});
    QVERIFY2(r.rc == 0 && !r.out.contains("Pattern verification failed") &&
                 !r.out.contains("failed"), (r.out + r.err).constData());
    QVERIFY(AllBytes(*dst_dev, 4 * kM, 4 * kM, char(0xab)));
    QVERIFY(AllBytes(*dst_dev, 0, 4 * kM, char(0x5a)));
    dst_dev->Close();
    dst_dev.reset();

    QCOMPARE(d.Terminate(), 0);
  }

  // nbd_listen = "" disables NBD; the DST side still works.
  void daemonNbdDisabled() {
    QString img = P("off.img");
    DaemonProcess d(P("d3"));
    d.extra_args() << "--nbd-listen" << "";
    d.config() = QString("[[export]]\nname = \"off\"\npath = \"%1\"\nsize = \"1M\"\n").arg(img);
    QVERIFY2(d.Start(), d.Log().constData());
    QByteArray out;
    QCOMPARE(d.Ctl({"status", "--json"}, &out), 0);
    QVERIFY(!QJsonDocument::fromJson(out).object()["nbd"].toObject()["enabled"].toBool());
    ToolResult r = Run("nbdinfo", {Uri(d.nbd_port(), "off")});
    QVERIFY(r.rc != 0);
    QCOMPARE(d.Terminate(), 0);
  }

  // --nbd-listen HOST:0 picks a free port, reported by status --json; a bad nbd_listen in the
  // file is a config error (exit 78) naming the key.
  void daemonNbdAnyPortAndBadConfig() {
    DaemonProcess d(P("d5"));
    d.extra_args() << "--nbd-listen" << "127.0.0.1:0";
    d.config() = QString("[[export]]\nname = \"any\"\npath = \"%1\"\nsize = \"1M\"\n").arg(P("any.img"));
    QVERIFY2(d.Start(), d.Log().constData());
    QByteArray out;
    QCOMPARE(d.Ctl({"status", "--json"}, &out), 0);
    QJsonObject nbd = QJsonDocument::fromJson(out).object()["nbd"].toObject();
    const int port = nbd["port"].toInt();
    QVERIFY(port > 0);
    QCOMPARE(nbd["listen"].toString(), QString("127.0.0.1:%1").arg(port));
    ToolResult r = Run("nbdinfo", {"--size", Uri(quint16(port), "any")});
    QVERIFY2(r.rc == 0, r.err.constData());
    QCOMPARE(r.out.trimmed(), QByteArray("1048576"));
    QCOMPARE(d.Terminate(), 0);

    QFile cfg(P("bad.toml"));
    QVERIFY(cfg.open(QIODevice::WriteOnly));
    cfg.write("[daemon]\nlisten = \"127.0.0.1:0\"\nnbd_listen = \"no-port\"\n");
    cfg.close();
    QDir().mkpath(P("d6"));
    r = Run(QString::fromStdString(dst::test::BinPath("dstd")),
            {"--config", P("bad.toml"), "--state-dir", P("d6"), "--control", P("d6/s.sock")});
    QCOMPARE(r.rc, 78);
    QVERIFY2(r.err.contains("nbd_listen"), r.err.constData());
  }

  // Through dstd: a mirror of two local files exported; fail leg 1 with dstctl; write through
  // NBD; nbdinfo --map=dst:dirty:1 lists exactly the covering regions; re-add; after the resync
  // the map is empty.
  void daemonDirtyMap() {
    for (const char* n : {"m0.img", "m1.img"}) {
      QFile f(P(n));
      QVERIFY(f.open(QIODevice::WriteOnly | QIODevice::Truncate));
      QVERIFY(f.resize(8 * kM));
    }
    DaemonProcess d(P("d4"));
    d.config() = QString("[[array]]\nname = \"m0\"\nlevel = \"mirror\"\nlegs = [\"%1\", \"%2\"]\n"
                         "region_size = \"64K\"\n\n[[export]]\nname = \"m0\"\narray = \"m0\"\n")
                     .arg(P("m0.img"), P("m1.img"));
    QVERIFY2(d.Start(), d.Log().constData());
    const QString uri = Uri(d.nbd_port(), "m0");
    auto state = [&] {
      QByteArray out;
      if (d.Ctl({"detail", "m0", "--json"}, &out) != 0) return QString("error");
      return QJsonDocument::fromJson(out).object()["state"].toString();
    };
    QTRY_COMPARE_WITH_TIMEOUT(state(), QString("clean"), 60000);  // initial sync of leg 1
    ToolResult r;
    QTRY_VERIFY_WITH_TIMEOUT((r = Run("nbdinfo", {"--json", uri})).rc == 0, 10000);
    const quint64 size = quint64(
        QJsonDocument::fromJson(r.out).object()["exports"].toArray()[0].toObject()["export-size"]
            .toDouble());
    QCOMPARE(size, 8 * kM - 4 * kK);

    QByteArray out, err;
    QCOMPARE(d.Ctl({"array", "fail-leg", "m0", "1"}, &out, &err), 0);
    r = Run("qemu-io", {"-f", "raw", "-c", QString("write -P 0x11 %1 4k").arg(1 * kM), "-c",
                        QString("write -P 0x22 %1 8k").arg(5 * kM + 100 * kK), uri});
    QVERIFY2(r.rc == 0 && !r.out.contains("failed"), (r.out + r.err).constData());
    r = Run("nbdinfo", {"--map=dst:dirty:1", uri});
    QVERIFY2(r.rc == 0, r.err.constData());
    qInfo("nbdinfo --map=dst:dirty:1 (dstd, leg 1 failed):\n%s", r.out.constData());
    std::vector<Extent> got = Merge(ParseMap(r.out));
    QVERIFY2(got == ExpectedDirty(size), qPrintable(Dump(got)));
    r = Run("nbdinfo", {"--map=dst:dirty:0", uri});
    QCOMPARE(Merge(ParseMap(r.out)), (std::vector<Extent>{{0, size, 0}}));

    QCOMPARE(d.Ctl({"array", "re-add-leg", "m0", "1"}, &out, &err), 0);
    QTRY_COMPARE_WITH_TIMEOUT(state(), QString("clean"), 60000);
    r = Run("nbdinfo", {"--map=dst:dirty:1", uri});
    QVERIFY2(r.rc == 0, r.err.constData());
    QCOMPARE(Merge(ParseMap(r.out)), (std::vector<Extent>{{0, size, 0}}));
    // The resynced leg holds the data written while it was failed.
    QFile leg1(P("m1.img"));
    QVERIFY(leg1.open(QIODevice::ReadOnly));
    QVERIFY(leg1.seek(1 * kM));
    QCOMPARE(leg1.read(4 * kK), QByteArray(4 * kK, 0x11));
    QCOMPARE(d.Terminate(), 0);
  }
};

DST_TEST_MAIN(NbdDaemonTest)
#include "nbd_daemon_test.moc"
