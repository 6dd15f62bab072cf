// Interop: real NBD clients that nobody here wrote (libnbd's nbdinfo, nbdcopy and nbdfuse,
// qemu-img, fio's nbd engine) against dst's NbdServer.
//
// The server runs in-process on 127.0.0.1 (port 0) over FileDevices on temp files; the clients are
// external processes, so the whole wire protocol is exercised by independent implementations.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <QCryptographicHash>
#include <QDir>
#include <QFile>
#include <QJsonArray>
#include <QJsonDocument>
#include <QJsonObject>
#include <QProcess>
#include <QRandomGenerator>
#include <QTemporaryDir>
#include <QThread>
#include <future>
#include <memory>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include "dst/file_device.h"
#include "dst/net/nbd_server.h"
#include "test_env.h"

using namespace dst;
using namespace dst::net;

namespace {

constexpr qint64 kDiskSize = 32ll << 20;
constexpr qint64 kSparseSize = 16ll << 20;

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

QByteArray Sha256(const QString& path) {
  QFile f(path);
  if (!f.open(QIODevice::ReadOnly)) return {};
  QCryptographicHash h(QCryptographicHash::Sha256);
  h.addData(&f);
  return h.result().toHex();
}

bool WriteRandomFile(const QString& path, qint64 size) {
  QFile f(path);
  if (!f.open(QIODevice::WriteOnly)) return false;
  QByteArray chunk(1 << 20, Qt::Uninitialized);
  for (qint64 done = 0; done < size; done += chunk.size()) {
    QRandomGenerator::global()->fillRange(reinterpret_cast<quint32*>(chunk.data()), chunk.size() / 4);
    if (f.write(chunk) != chunk.size()) return false;
  }
  return true;
}

bool MakeSparse(const QString& path, qint64 size, const std::vector<std::pair<qint64, qint64>>& data) {
  int fd = ::open(path.toLocal8Bit().constData(), O_RDWR | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return false;
  bool ok = ::ftruncate(fd, size) == 0;
  std::vector<char> buf;
  for (auto& [off, len] : data) {
    buf.assign(static_cast<std::size_t>(len), '\x5a');
    ok = ok && ::pwrite(fd, buf.data(), buf.size(), off) == len;
  }
  ok = ok && ::fsync(fd) == 0;
  ::close(fd);
  return ok;
}

}  // namespace

class NbdInteropTest : public QObject {
  Q_OBJECT

  QTemporaryDir dir_;
  boost::asio::io_context io_;
  std::unique_ptr<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work_;
  std::vector<std::thread> threads_;
  std::unique_ptr<NbdServer> srv_;
  QString disk_, sparse_;
  std::shared_ptr<FileDevice> disk_dev_;
  // Data ranges of the sparse image (offset, length); everything else is a hole.
  const std::vector<std::pair<qint64, qint64>> layout_ = {{4ll << 20, 1ll << 20}, {10ll << 20, 64ll << 10}};

  QString Uri(const char* name) const {
    return QString("nbd://127.0.0.1:%1/%2").arg(srv_->port()).arg(name);
  }

 private slots:
  void initTestCase() {
    QVERIFY(dir_.isValid());
    disk_ = dir_.filePath("disk.img");
    sparse_ = dir_.filePath("sparse.img");
    QVERIFY(MakeSparse(disk_, kDiskSize, {}));
    QVERIFY(MakeSparse(sparse_, kSparseSize, layout_));

    NbdServerOptions o;
    o.port = 0;
    o.buffer_count = 32;
    o.max_payload = 4u << 20;
    srv_ = std::make_unique<NbdServer>(io_, o);
    QVERIFY(srv_->Start().ok());

    auto d = FileDevice::Open(disk_.toStdString());
    QVERIFY(d.ok());
    disk_dev_ = d.value();
    NbdExportSpec disk;
    disk.name = "disk";
    disk.description = "dst interop disk";
    disk.device = disk_dev_;
    disk.allocation = FileAllocationMap::Open(disk_.toStdString()).value();
    disk.fast_zero = FileSupportsFastZero(disk_.toStdString());
    QVERIFY(srv_->AddExport(std::move(disk)).ok());

    FileDeviceOptions ro_opts;
    ro_opts.read_only = true;
    auto s = FileDevice::Open(sparse_.toStdString(), ro_opts);
    QVERIFY(s.ok());
    NbdExportSpec sp;
    sp.name = "sparse";
    sp.device = s.value();
    sp.read_only = true;
    sp.allocation = FileAllocationMap::Open(sparse_.toStdString()).value();
    QVERIFY(srv_->AddExport(std::move(sp)).ok());

    work_ = std::make_unique<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>>(
        io_.get_executor());
    for (int i = 0; i < 2; ++i) threads_.emplace_back([this] { io_.run(); });
  }

  void cleanupTestCase() {
    if (srv_) {
      std::promise<Status> drained;
      srv_->Drain([&](Status st) { drained.set_value(st); });
      auto f = drained.get_future();
      QVERIFY(f.wait_for(std::chrono::seconds(30)) == std::future_status::ready);
      QVERIFY(f.get().ok());
      srv_.reset();
    }
    work_.reset();
    io_.stop();
    for (auto& t : threads_) t.join();
  }

  void nbdinfoJson() {
    DST_REQUIRE(dst::test::HaveTool("nbdinfo"), "nbdinfo (libnbd-bin) not installed");
    ToolResult r = Run("nbdinfo", {"--json", Uri("disk")});
    QVERIFY2(r.rc == 0, r.err.constData());
    QJsonParseError pe;
    QJsonDocument doc = QJsonDocument::fromJson(r.out, &pe);
    QVERIFY2(pe.error == QJsonParseError::NoError, r.out.constData());
    QCOMPARE(doc["protocol"].toString(), QString("newstyle-fixed"));
    QCOMPARE(doc["structured"].toBool(), true);
    QJsonObject e = doc["exports"].toArray().at(0).toObject();
    QCOMPARE(e["export-name"].toString(), QString("disk"));
    QCOMPARE(e["description"].toString(), QString("dst interop disk"));
    QCOMPARE(e["export-size"].toInteger(), kDiskSize);
    QCOMPARE(e["block_size_minimum"].toInt(), 512);
    QCOMPARE(e["block_size_preferred"].toInt(), 4096);
    QCOMPARE(e["block_size_maximum"].toInt(), 4 << 20);
    QCOMPARE(e["is_read_only"].toBool(), false);
    for (const char* f : {"can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_df",
                          "can_multi_conn"})
      QVERIFY2(e[f].toBool(), f);
    QVERIFY(e["contexts"].toArray().contains(QJsonValue("base:allocation")));

    ToolResult ro = Run("nbdinfo", {"--json", Uri("sparse")});
    QVERIFY2(ro.rc == 0, ro.err.constData());
    QJsonObject s = QJsonDocument::fromJson(ro.out)["exports"].toArray().at(0).toObject();
    QCOMPARE(s["is_read_only"].toBool(), true);
    QCOMPARE(s["can_trim"].toBool(), false);
    QCOMPARE(s["can_zero"].toBool(), false);
    QCOMPARE(s["export-size"].toInteger(), kSparseSize);

    ToolResult list = Run("nbdinfo", {"--list", "--json", QString("nbd://127.0.0.1:%1").arg(srv_->port())});
    QVERIFY2(list.rc == 0, list.err.constData());
    QJsonArray ex = QJsonDocument::fromJson(list.out)["exports"].toArray();
    QStringList names;
    for (auto v : ex) names << v.toObject()["export-name"].toString();
    names.sort();
    QCOMPARE(names, QStringList({"disk", "sparse"}));

    ToolResult missing = Run("nbdinfo", {Uri("nosuch")});
    QVERIFY(missing.rc != 0);  // ERR_UNKNOWN reaches the user as an error
  }

  void nbdinfoMap() {
    DST_REQUIRE(dst::test::HaveTool("nbdinfo"), "nbdinfo (libnbd-bin) not installed");
    ToolResult r = Run("nbdinfo", {"--map", "--json", Uri("sparse")});
    QVERIFY2(r.rc == 0, r.err.constData());
    QJsonArray m = QJsonDocument::fromJson(r.out).array();
    QVERIFY2(!m.isEmpty(), r.out.constData());
    // Expected: hole | data 4M+1M | hole | data 10M+64K | hole, contiguous over the whole export.
    std::vector<std::pair<qint64, qint64>> data;
    qint64 pos = 0;
    for (auto v : m) {
      QJsonObject o = v.toObject();
      QCOMPARE(o["offset"].toInteger(), pos);
      const qint64 len = o["length"].toInteger();
      const int type = o["type"].toInt();
      if (type == 0) {
        if (!data.empty() && data.back().first + data.back().second == pos) data.back().second += len;
        else data.push_back({pos, len});
      } else {
        QCOMPARE(type, 3);  // hole,zero
      }
      pos += len;
    }
    QCOMPARE(pos, kSparseSize);
    QCOMPARE(data.size(), layout_.size());
    for (std::size_t i = 0; i < data.size(); ++i) {
      QCOMPARE(data[i].first, layout_[i].first);
      QCOMPARE(data[i].second, layout_[i].second);
    }
    // The human-readable form names the same extents.
    ToolResult h = Run("nbdinfo", {"--map", Uri("sparse")});
    QVERIFY(h.rc == 0);
    QVERIFY(h.out.contains("data"));
    QVERIFY(h.out.contains("hole,zero"));
  }

  void nbdcopyRoundTrip() {
    DST_REQUIRE(dst::test::HaveTool("nbdcopy"), "nbdcopy (libnbd-bin) not installed");
    const QString src = dir_.filePath("random.bin"), back = dir_.filePath("back.bin");
    QVERIFY(WriteRandomFile(src, kDiskSize));
    ToolResult up = Run("nbdcopy", {src, Uri("disk")});
    QVERIFY2(up.rc == 0, up.err.constData());
    ToolResult down = Run("nbdcopy", {Uri("disk"), back});
    QVERIFY2(down.rc == 0, down.err.constData());
    const QByteArray want = Sha256(src);
    QVERIFY(!want.isEmpty());
    QCOMPARE(Sha256(back), want);
    QCOMPARE(Sha256(disk_), want);  // what the server really stored
    // A sparse source: nbdcopy zeroes the holes (WRITE_ZEROES / FAST_ZERO) and copies the data.
    ToolResult sp = Run("nbdcopy", {sparse_, Uri("disk")});
    QVERIFY2(sp.rc == 0, sp.err.constData());
    QFile a(sparse_), b(disk_);
    QVERIFY(a.open(QIODevice::ReadOnly) && b.open(QIODevice::ReadOnly));
    QCOMPARE(b.read(kSparseSize), a.readAll());
  }

  void qemuImg() {
    DST_REQUIRE(dst::test::HaveTool("qemu-img"), "qemu-img (qemu-utils) not installed");
    ToolResult info = Run("qemu-img", {"info", "--output=json", Uri("sparse")});
    QVERIFY2(info.rc == 0, info.err.constData());
    QJsonDocument d = QJsonDocument::fromJson(info.out);
    QCOMPARE(d["virtual-size"].toInteger(), kSparseSize);
    QCOMPARE(d["format"].toString(), QString("raw"));

    const QString out = dir_.filePath("converted.raw");
    ToolResult conv = Run("qemu-img", {"convert", "-f", "raw", "-O", "raw", Uri("sparse"), out});
    QVERIFY2(conv.rc == 0, conv.err.constData());
    QCOMPARE(Sha256(out), Sha256(sparse_));
    ToolResult same = Run("qemu-img", {"compare", "-f", "raw", "-F", "raw", Uri("sparse"), sparse_});
    QVERIFY2(same.rc == 0, same.out.constData());
    // One changed byte must be found.
    {
      QFile f(out);
      QVERIFY(f.open(QIODevice::ReadWrite));
      f.seek((4ll << 20) + 12345);
      f.write("\x01", 1);
    }
    ToolResult diff = Run("qemu-img", {"compare", "-f", "raw", "-F", "raw", Uri("sparse"), out});
    QCOMPARE(diff.rc, 1);
    QVERIFY(diff.out.contains("Content mismatch at offset"));
    // Writing through qemu-img: convert the sparse image onto the writable export.
    ToolResult up = Run("qemu-img", {"convert", "-n", "-f", "raw", "-O", "raw", sparse_, Uri("disk")});
    QVERIFY2(up.rc == 0, up.err.constData());
    QFile a(sparse_), b(disk_);
    QVERIFY(a.open(QIODevice::ReadOnly) && b.open(QIODevice::ReadOnly));
    QCOMPARE(b.read(kSparseSize), a.readAll());
  }

  void fioVerify() {
    DST_REQUIRE(dst::test::HaveTool("fio"), "fio not installed");
    ToolResult eng = Run("fio", {"--enghelp=nbd"});
    DST_REQUIRE(eng.rc == 0 && eng.out.contains("uri"), "fio built without the nbd engine (libnbd)");
    ToolResult r = Run("fio", {"--name=nbdverify", "--ioengine=nbd", "--uri=" + Uri("disk"), "--rw=randrw",
                               "--bs=4k", "--size=16M", "--iodepth=16", "--verify=crc32c", "--do_verify=1",
                               "--runtime=20", "--output-format=json"},
                       120000);
    QVERIFY2(r.rc == 0, (r.err + r.out.left(2000)).constData());
    const int brace = r.out.indexOf('{');  // fio prints "connected to NBD server" first
    QJsonDocument d = QJsonDocument::fromJson(r.out.mid(brace));
    QJsonObject job = d["jobs"].toArray().at(0).toObject();
    QCOMPARE(job["error"].toInt(), 0);
    QVERIFY(job["write"].toObject()["io_bytes"].toInteger() > 0);
    QVERIFY(job["read"].toObject()["io_bytes"].toInteger() > 0);
    // A write-then-verify pass over a region: every block read back and checksummed.
    ToolResult w = Run("fio", {"--name=nbdwrite", "--ioengine=nbd", "--uri=" + Uri("disk"), "--rw=write",
                               "--bs=64k", "--size=8M", "--iodepth=8", "--verify=crc32c", "--do_verify=1",
                               "--output-format=json"},
                       120000);
    QVERIFY2(w.rc == 0, (w.err + w.out.left(2000)).constData());
    QJsonObject wj = QJsonDocument::fromJson(w.out.mid(w.out.indexOf('{')))["jobs"].toArray().at(0).toObject();
    QCOMPARE(wj["error"].toInt(), 0);
    QCOMPARE(wj["read"].toObject()["io_bytes"].toInteger(), 8ll << 20);  // the verify pass
  }

  void nbdfuseMount() {
    DST_REQUIRE(dst::test::HaveTool("nbdfuse"), "nbdfuse (libnbd-bin / nbdfuse) not installed");
    DST_REQUIRE(dst::test::HaveTool("fusermount3"), "fusermount3 (fuse3) not installed");
    DST_REQUIRE(dst::test::HaveFuse(), "/dev/fuse not usable");
    const QString mnt = dir_.filePath("mnt");
    QVERIFY(QDir().mkpath(mnt));
    QProcess fuse;
    fuse.start("nbdfuse", {mnt + "/disk.img", Uri("disk")});
    QVERIFY(fuse.waitForStarted(10000));
    const QString file = mnt + "/disk.img";
    bool up = false;
    for (int i = 0; i < 100 && !up; ++i) {
      QFileInfo fi(file);
      up = fi.exists() && fi.size() == kDiskSize;
      if (!up) QThread::msleep(100);
    }
    auto unmount = [&] {
      Run("fusermount3", {"-u", mnt}, 20000);
      if (!fuse.waitForFinished(20000)) {
        fuse.kill();
        fuse.waitForFinished(5000);
      }
    };
    if (!up) {
      unmount();
      QFAIL(("nbdfuse did not show the export: " + fuse.readAllStandardError()).constData());
    }
    // Write a pattern through the FUSE file, read it back through FUSE and from the server's file.
    QByteArray pattern(1 << 20, Qt::Uninitialized);
    QRandomGenerator::global()->fillRange(reinterpret_cast<quint32*>(pattern.data()), pattern.size() / 4);
    const qint64 off = 6ll << 20;
    bool wrote = false, read_ok = false;
    {
      int fd = ::open(file.toLocal8Bit().constData(), O_RDWR);
      if (fd >= 0) {
        wrote = ::pwrite(fd, pattern.constData(), pattern.size(), off) == pattern.size() && ::fsync(fd) == 0;
        QByteArray back(pattern.size(), '\0');
        read_ok = ::pread(fd, back.data(), back.size(), off) == back.size() && back == pattern;
        ::close(fd);
      }
    }
    unmount();
    QVERIFY(wrote);
    QVERIFY(read_ok);
    QFile f(disk_);
    QVERIFY(f.open(QIODevice::ReadOnly));
    QVERIFY(f.seek(off));
    QCOMPARE(f.read(pattern.size()), pattern);
    QCOMPARE(fuse.exitStatus(), QProcess::NormalExit);
  }

  void serverCountedNoProtocolErrors() {
    // Every client above spoke valid NBD: the server must not have seen a framing violation.
    NbdServerStats s = srv_->Stats();
    qInfo("requests %llu, errors replied %llu, protocol errors %llu, frames/sendmsg %.2f",
          (unsigned long long)s.requests, (unsigned long long)s.errors_replied,
          (unsigned long long)s.protocol_errors, s.frames_per_call);
    QCOMPARE(s.protocol_errors, 0ull);
  }
};

DST_TEST_MAIN(NbdInteropTest)
#include "nbd_interop_test.moc"
