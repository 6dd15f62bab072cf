// dstd + dstctl as real processes (tests/lib/daemon_process.h): the control protocol and CLI,
// config errors, robustness against garbage on the control socket, and SIGTERM draining.
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <QElapsedTimer>
#include <QFile>
#include <QProcess>
#include <QTemporaryDir>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <nlohmann/json.hpp>

#include "daemon_process.h"
#include "dst/net/remote_device.h"
#include "test_env.h"

using dst::test::DaemonProcess;
using nlohmann::json;

namespace {

// One line, "dstctl: ..." (the CLI's error contract).
bool OneErrorLine(const QByteArray& err) {
  return err.startsWith("dstctl: ") && err.count('\n') == 1 && err.endsWith('\n');
}

json CtlJson(DaemonProcess& d, const QStringList& args) {
  QByteArray out, err;
  int rc = d.Ctl(args + QStringList{"--json"}, &out, &err);
  if (rc != 0) {
    qWarning("dstctl %s failed (%d): %s", qPrintable(args.join(' ')), rc, err.constData());
    return json();
  }
  return json::parse(out.toStdString(), nullptr, false);
}

// Raw control-socket client for the garbage tests.
class RawControl {
 public:
  explicit RawControl(const QString& path) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    QByteArray p = path.toLocal8Bit();
    std::memcpy(a.sun_path, p.constData(), p.size());
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
      ::close(fd_);
      fd_ = -1;
    }
  }
  ~RawControl() {
    if (fd_ >= 0) ::close(fd_);
  }
  bool ok() const { return fd_ >= 0; }
  bool Send(const std::string& s) {
    std::size_t off = 0;
    while (off < s.size()) {
      ssize_t n = ::send(fd_, s.data() + off, s.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return false;
      off += std::size_t(n);
    }
    return true;
  }
  // Next line, or "" + *eof on EOF/timeout.
  std::string ReadLine(bool* eof = nullptr, int timeout_ms = 5000) {
    if (eof) *eof = false;
    for (;;) {
      auto nl = buf_.find('\n');
      if (nl != std::string::npos) {
        std::string l = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        return l;
      }
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, timeout_ms) <= 0) return {};
      char b[4096];
      ssize_t n = ::recv(fd_, b, sizeof b, 0);
      if (n <= 0) {
        if (eof) *eof = true;
        return {};
      }
      buf_.append(b, std::size_t(n));
    }
  }

 private:
  int fd_ = -1;
  std::string buf_;
};

// Lazily unmounts a FUSE mount a killed dstd left behind (declare before the DaemonProcess).
struct FuseGuard {
  QString path;
  ~FuseGuard() {
    QFile f("/proc/self/mountinfo");
    if (path.isEmpty() || !f.open(QIODevice::ReadOnly)) return;
    if (!f.readAll().contains(" " + path.toUtf8() + " ")) return;
    QProcess p;
    p.start("umount", {"-l", path});
    p.waitForFinished(30000);
  }
};

QString ExportConfig(const QString& name, const QString& path, const QString& size) {
  return QString("[[export]]\nname = \"%1\"\npath = \"%2\"\nsize = \"%3\"\n").arg(name, path, size);
}

}  // namespace

class DaemonTest : public QObject {
  Q_OBJECT

 private slots:
  void initTestCase() {
    QVERIFY2(QFile::exists(QString::fromStdString(dst::test::BinPath("dstd"))), "dstd not built");
    QVERIFY2(QFile::exists(QString::fromStdString(dst::test::BinPath("dstctl"))), "dstctl not built");
  }

  void ExportAddListRemove() {
    QTemporaryDir dir;
    DaemonProcess d(dir.path() + "/d");
    QVERIFY(d.Start());
    QString img = dir.path() + "/e1.img";
    QByteArray out, err;
    QCOMPARE(d.Ctl({"export", "add", "e1", img, "--size", "16M"}, &out, &err), 0);
    QVERIFY2(out.contains("export e1 added"), out.constData());
    QVERIFY(QFile::exists(img));
    QCOMPARE(QFile(img).size(), qint64(16) << 20);

    QVERIFY2(d.Ctl({"export", "list"}, &out, &err) == 0, (err + d.Log()).constData());
    QVERIFY2(out.startsWith("NAME"), out.constData());
    QVERIFY2(out.contains("e1") && out.contains("16 MiB") && out.contains("rw"), out.constData());

    json list = CtlJson(d, {"export", "list"});
    QVERIFY(list.is_object());
    QCOMPARE(list["exports"].size(), std::size_t(1));
    QCOMPARE(list["exports"][0]["name"], json("e1"));
    QCOMPARE(list["exports"][0]["size"], json(16u << 20));
    QCOMPARE(list["exports"][0]["read_only"], json(false));

    // A second, read-only export of an existing file.
    QCOMPARE(d.Ctl({"export", "add", "e2", img, "--read-only"}, &out, &err), 0);
    list = CtlJson(d, {"export", "list"});
    QCOMPARE(list["exports"].size(), std::size_t(2));

    // Duplicate name, missing file without size, bad size, bad name: data errors (65).
    QCOMPARE(d.Ctl({"export", "add", "e1", img}, &out, &err), 65);
    QVERIFY2(OneErrorLine(err) && err.contains("already exists"), err.constData());
    QCOMPARE(d.Ctl({"export", "add", "e3", dir.path() + "/missing.img"}, &out, &err), 65);
    QVERIFY2(OneErrorLine(err) && err.contains("does not exist"), err.constData());
    QCOMPARE(d.Ctl({"export", "add", "e3", dir.path() + "/x.img", "--size", "1X"}, &out, &err), 65);
    QVERIFY2(OneErrorLine(err) && err.contains("bad size"), err.constData());
    QCOMPARE(d.Ctl({"export", "add", "a/b", img}, &out, &err), 65);
    QVERIFY2(OneErrorLine(err) && err.contains("bad name"), err.constData());

    QCOMPARE(d.Ctl({"export", "remove", "e1"}, &out, &err), 0);
    QCOMPARE(d.Ctl({"export", "remove", "e2"}, &out, &err), 0);
    QCOMPARE(d.Ctl({"export", "list"}, &out, &err), 0);
    QCOMPARE(out, QByteArray("no exports\n"));
    QCOMPARE(d.Ctl({"export", "remove", "e1"}, &out, &err), 65);
    QVERIFY2(OneErrorLine(err) && err.contains("no export \"e1\""), err.constData());

    // Usage errors are 64; --help works for every verb.
    QCOMPARE(d.Ctl({"export", "add", "onlyname"}, &out, &err), 64);
    QVERIFY2(OneErrorLine(err), err.constData());
    QCOMPARE(d.Ctl({"frobnicate"}, &out, &err), 64);
    for (QStringList verb : {QStringList{"export", "add"}, QStringList{"export", "list"},
                             QStringList{"export", "remove"}, QStringList{"volume", "import"},
                             QStringList{"volume", "list"}, QStringList{"volume", "remove"},
                             QStringList{"mount"}, QStringList{"unmount"}, QStringList{"status"}}) {
      QCOMPARE(d.Ctl(verb + QStringList{"--help"}, &out, &err), 0);
      QVERIFY2(out.contains("Usage"), qPrintable(verb.join(' ')));
    }
    QCOMPARE(d.Terminate(), 0);
  }

  void VolumeImportFromSecondDaemon() {
    QTemporaryDir dir;
    DaemonProcess a(dir.path() + "/a");
    a.config() = ExportConfig("disk", dir.path() + "/a/disk.img", "32M");
    QVERIFY(a.Start());
    DaemonProcess b(dir.path() + "/b");
    QVERIFY(b.Start());
    QString uri = QString("dst://127.0.0.1:%1/disk").arg(a.port());
    QByteArray out, err;
    QCOMPARE(b.Ctl({"volume", "import", "vol", uri, "--queue-depth", "16", "--timeout", "10"}, &out, &err), 0);
    QVERIFY2(out.contains("volume vol imported"), out.constData());

    QCOMPARE(b.Ctl({"volume", "list"}, &out, &err), 0);
    QVERIFY2(out.contains("vol") && out.contains("32 MiB") && out.contains(uri.toUtf8()), out.constData());
    json vols = CtlJson(b, {"volume", "list"});
    QCOMPARE(vols["volumes"].size(), std::size_t(1));
    QCOMPARE(vols["volumes"][0]["state"], json("connected"));
    QCOMPARE(vols["volumes"][0]["size"], json(32u << 20));
    QCOMPARE(vols["volumes"][0]["queue_depth"], json(16));

    // A sees the connection.
    json st = CtlJson(a, {"status"});
    QCOMPARE(st["version"], json(1));
    QCOMPARE(st["exports"][0]["connections"], json(1));

    // Errors: unknown remote export, unreachable port, duplicate name, bad URI.
    QVERIFY(b.Ctl({"volume", "import", "v2", QString("dst://127.0.0.1:%1/nope").arg(a.port())}, &out, &err) != 0);
    QVERIFY2(OneErrorLine(err), err.constData());
    QVERIFY(b.Ctl({"volume", "import", "v3", QString("dst://127.0.0.1:%1/disk").arg(dst::test::FreePort())}, &out, &err) != 0);
    QVERIFY2(OneErrorLine(err), err.constData());
    QCOMPARE(b.Ctl({"volume", "import", "vol", uri}, &out, &err), 65);
    QVERIFY2(OneErrorLine(err) && err.contains("already exists"), err.constData());
    QCOMPARE(b.Ctl({"volume", "import", "v4", "http://x/y"}, &out, &err), 65);
    QVERIFY2(OneErrorLine(err), err.constData());
    vols = CtlJson(b, {"volume", "list"});
    QCOMPARE(vols["volumes"].size(), std::size_t(1));  // failed imports left nothing behind

    // Status (human) shows the tree.
    QCOMPARE(b.Ctl({"status"}, &out, &err), 0);
    QVERIFY2(out.contains("volume vol state:connected") && out.contains("connection:connected"),
             out.constData());

    QCOMPARE(b.Ctl({"volume", "remove", "vol"}, &out, &err), 0);
    QCOMPARE(b.Ctl({"volume", "list"}, &out, &err), 0);
    QCOMPARE(out, QByteArray("no volumes\n"));
    QCOMPARE(b.Terminate(), 0);
    QCOMPARE(a.Terminate(), 0);
  }

  // Regression (UX): with the exporter gone, SIGTERM of the importing daemon waits for the
  // volume's flush deadline (min(io_timeout, 20) + 2 s) before giving up.  It must say so in
  // the log rather than look hung, and it must end within that bound.
  void ShutdownWithPeerGoneSaysWhyAndIsBounded() {
    QTemporaryDir dir;
    DaemonProcess a(dir.path() + "/a");
    a.config() = ExportConfig("disk", dir.path() + "/a/disk.img", "8M");
    QVERIFY(a.Start());
    DaemonProcess b(dir.path() + "/b");
    b.config() = QString("[[volume]]\nname = \"vol\"\nremote = \"dst://127.0.0.1:%1/disk\"\n"
                         "io_timeout = 2\n").arg(a.port());
    QVERIFY(b.Start());
    QTRY_COMPARE_WITH_TIMEOUT(CtlJson(b, {"volume", "list"})["volumes"][0]["state"], json("connected"), 10000);
    a.Kill9();
    QElapsedTimer t;
    t.start();
    QCOMPARE(b.Terminate(), 0);
    const qint64 ms = t.elapsed();
    QVERIFY2(ms < 4000 + 5000, qPrintable(QString("shutdown took %1 ms").arg(ms)));
    const QByteArray log = b.Log();
    QVERIFY2(log.contains("volume \"vol\": dst://127.0.0.1:" + QByteArray::number(a.port()) +
                          "/disk is not connected; waiting up to 4 s for it to take the last writes"),
             log.constData());
  }

  void UnknownVolumeRemove() {
    QTemporaryDir dir;
    DaemonProcess d(dir.path() + "/d");
    QVERIFY(d.Start());
    QByteArray out, err;
    int rc = d.Ctl({"volume", "remove", "nope"}, &out, &err);
    QCOMPARE(rc, 65);
    QVERIFY2(OneErrorLine(err), err.constData());
    QVERIFY2(err.contains("no volume \"nope\""), err.constData());
    QVERIFY(out.isEmpty());
    QCOMPARE(d.Ctl({"unmount"}, &out, &err), 65);  // nothing mounted
    QVERIFY2(OneErrorLine(err), err.constData());
    QCOMPARE(d.Terminate(), 0);
  }

  void DaemonNotRunning() {
    QTemporaryDir dir;
    QProcess p;
    p.start(QString::fromStdString(dst::test::BinPath("dstctl")),
            {"--socket", dir.path() + "/none.sock", "status"});
    QVERIFY(p.waitForFinished(10000));
    QCOMPARE(p.exitCode(), 69);
    QByteArray err = p.readAllStandardError();
    QVERIFY2(OneErrorLine(err) && err.contains("is dstd running?"), err.constData());
    // DST_SOCKET is the default.
    QProcessEnvironment env = QProcessEnvironment::systemEnvironment();
    env.insert("DST_SOCKET", dir.path() + "/env.sock");
    p.setProcessEnvironment(env);
    p.start(QString::fromStdString(dst::test::BinPath("dstctl")), {"volume", "list"});
    QVERIFY(p.waitForFinished(10000));
    QCOMPARE(p.exitCode(), 69);
    QVERIFY(p.readAllStandardError().contains("env.sock"));
  }

  void BadConfigExits78_data() {
    QTest::addColumn<QString>("config");
    QTest::addColumn<QString>("expected");
    QTest::newRow("bad size") << "[[export]]\nname = \"d\"\npath = \"/tmp/x.img\"\nsize = \"1X\"\n"
                              << "export \"d\": size: bad size \"1X\"";
    QTest::newRow("unknown key") << "[daemon]\nlisten = \"127.0.0.1:0\"\nlisten_port = 5\n"
                                 << "[daemon]: listen_port: unknown key";
    QTest::newRow("bad uri") << "[[volume]]\nname = \"v\"\nremote = \"dst:/x\"\n"
                             << "volume \"v\": remote: bad URI";
    QTest::newRow("missing path") << "[[export]]\nname = \"d\"\npath = \"/nonexistent/dir/x.img\"\n"
                                  << "does not exist and no size is given";
  }

  void BadConfigExits78() {
    QFETCH(QString, config);
    QFETCH(QString, expected);
    QTemporaryDir dir;
    QString cfg = dir.path() + "/dstd.toml";
    QFile f(cfg);
    QVERIFY(f.open(QIODevice::WriteOnly));
    f.write(config.toUtf8());
    f.close();
    QProcess p;
    p.start(QString::fromStdString(dst::test::BinPath("dstd")),
            {"--config", cfg, "--state-dir", dir.path() + "/st", "--control", dir.path() + "/s.sock"});
    QVERIFY(p.waitForFinished(10000));
    QCOMPARE(p.exitStatus(), QProcess::NormalExit);
    QCOMPARE(p.exitCode(), 78);
    QByteArray err = p.readAllStandardError();
    QVERIFY2(err.count('\n') == 1, err.constData());
    QVERIFY2(err.contains(cfg.toUtf8()), err.constData());  // names the file
    QVERIFY2(err.contains(expected.toUtf8()), err.constData());
  }

  void StateDirLocked() {
    QTemporaryDir dir;
    DaemonProcess d(dir.path() + "/d");
    QVERIFY(d.Start());
    QProcess p;
    p.start(QString::fromStdString(dst::test::BinPath("dstd")),
            {"--state-dir", d.state_dir(), "--control", dir.path() + "/other.sock", "--listen",
             "127.0.0.1:0"});
    QVERIFY(p.waitForFinished(10000));
    QCOMPARE(p.exitCode(), 75);
    QByteArray err = p.readAllStandardError();
    QVERIFY2(err.contains("in use by another dstd") &&
                 err.contains(QByteArray::number(int(d.pid()))), err.constData());
    // The same control socket is refused too (a live daemon answers on it).
    p.start(QString::fromStdString(dst::test::BinPath("dstd")),
            {"--state-dir", dir.path() + "/d2", "--control", d.control_socket(), "--listen",
             "127.0.0.1:0"});
    QVERIFY(p.waitForFinished(10000));
    QCOMPARE(p.exitCode(), 75);
    QVERIFY(d.Running());
    QCOMPARE(d.Ctl({"status"}), 0);
    QCOMPARE(d.Terminate(), 0);
  }

  void ControlGarbage() {
    QTemporaryDir dir;
    DaemonProcess d(dir.path() + "/d");
    QVERIFY(d.Start());
    {
      RawControl c(d.control_socket());
      QVERIFY(c.ok());
      auto expect_error = [&](const std::string& send, const char* code, const json& id) {
        QVERIFY(c.Send(send));
        std::string line = c.ReadLine();
        json j = json::parse(line, nullptr, false);
        QVERIFY2(j.is_object() && j.contains("error"), line.c_str());
        QCOMPARE(j["error"]["code"], json(code));
        QCOMPARE(j["id"], id);
      };
      expect_error("this is not json\n", "parse_error", json());
      expect_error(std::string("\x00\xff\xfe{]\x01\n", 7), "parse_error", json());
      expect_error("[]\n", "invalid_request", json());
      expect_error("{\"method\":\"status\"}\n", "invalid_request", json());
      expect_error("{\"id\":5,\"method\":\"rm -rf\"}\n", "unknown_method", json(5));
      expect_error("{\"id\":6,\"method\":\"volume.remove\",\"params\":{\"name\":7}}\n", "invalid_params", json(6));
      expect_error("{\"id\":7,\"method\":\"export.add\",\"params\":{}}\n", "invalid_params", json(7));
      expect_error("{\"id\":8,\"method\":\"volume.import\",\"params\":{\"name\":\"v\",\"uri\":\"dst://h/\"}}\n",
                   "invalid_params", json(8));
      // Still serving on the same connection, blank lines ignored, CRLF accepted.
      QVERIFY(c.Send("\n\r\n{\"id\":\"s\",\"method\":\"status\"}\r\n"));
      json j = json::parse(c.ReadLine(), nullptr, false);
      QCOMPARE(j["id"], json("s"));
      QCOMPARE(j["result"]["version"], json(1));
      // Oversized line: too_large, then the server closes the connection.
      std::string big(2u << 20, 'x');
      c.Send(big);  // may fail part-way once the server closes
      bool eof = false;
      std::string line = c.ReadLine(&eof);
      json e = json::parse(line, nullptr, false);
      QVERIFY2(e.is_object() && e["error"]["code"] == "too_large", line.c_str());
      c.ReadLine(&eof);
      QVERIFY(eof);
    }
    // Connections that vanish mid-request or never say anything.
    for (int i = 0; i < 50; ++i) {
      RawControl c(d.control_socket());
      QVERIFY(c.ok());
      if (i % 2) c.Send("{\"id\":1,\"method\":\"sta");
      if (i % 3 == 0) c.Send("{\"id\":1,\"method\":\"status\"}\n");  // closed before the reply
    }
    QVERIFY(d.Running());
    QByteArray out;
    QCOMPARE(d.Ctl({"status"}, &out), 0);
    QVERIFY(out.startsWith("dstd pid:"));
    QCOMPARE(d.Terminate(), 0);
  }

  // SIGTERM while a client has writes in flight: every request gets an answer, dstd exits 0 and
  // every acknowledged write is in the image.
  void SigtermDrainsInflightIo() {
    QTemporaryDir dir;
    DaemonProcess a(dir.path() + "/a");
    QString img = dir.path() + "/a/disk.img";
    a.config() = ExportConfig("disk", img, "64M");
    QVERIFY(a.Start());

    boost::asio::io_context io;
    auto guard = boost::asio::make_work_guard(io);
    std::thread io_thread([&] { io.run(); });
    struct Stop {
      boost::asio::io_context& io;
      decltype(guard)& g;
      std::thread& t;
      ~Stop() {
        g.reset();
        io.stop();
        if (t.joinable()) t.join();
      }
    } stop{io, guard, io_thread};

    dst::net::RemoteOptions ro;
    ro.port = a.port();
    ro.export_name = "disk";
    ro.queue_depth = 64;
    ro.io_timeout = std::chrono::milliseconds(3000);
    ro.keepalive_timeout = std::chrono::milliseconds(1000);
    ro.keepalive_interval = std::chrono::milliseconds(300);
    auto dev = dst::net::RemoteDevice::Connect(io, ro);
    QVERIFY2(dev.ok(), dev.status().ToString().c_str());

    constexpr int kReqs = 512;
    constexpr std::uint32_t kLen = 64 * 1024;
    struct Op {
      dst::IoRequest req;
      std::vector<char> buf;
      dst::Status st;
      bool done = false;
    };
    std::vector<Op> ops(kReqs);
    std::mutex mu;
    std::condition_variable cv;
    int completed = 0;
    struct Ctx {
      std::mutex* mu;
      std::condition_variable* cv;
      int* completed;
      Op* op;
    };
    std::vector<Ctx> ctxs(kReqs);
    for (int i = 0; i < kReqs; ++i) {
      Op& op = ops[i];
      op.buf.assign(kLen, char('A' + i % 26));
      std::memcpy(op.buf.data(), &i, sizeof i);
      ctxs[i] = Ctx{&mu, &cv, &completed, &op};
      op.req.op = dst::IoOp::kWrite;
      op.req.offset = std::uint64_t(i) * kLen;
      op.req.length = kLen;
      op.req.data = op.buf.data();
      op.req.ctx = &ctxs[i];
      op.req.done = [](dst::IoRequest* r, dst::Status st) {
        auto* c = static_cast<Ctx*>(r->ctx);
        std::lock_guard<std::mutex> l(*c->mu);
        c->op->st = st;
        c->op->done = true;
        ++*c->completed;
        c->cv->notify_all();
      };
    }
    // Start the stream, wait until it is flowing, then SIGTERM with requests in flight.
    for (int i = 0; i < 64; ++i) dev.value()->Submit(&ops[i].req);
    {
      std::unique_lock<std::mutex> l(mu);
      QVERIFY(cv.wait_for(l, std::chrono::seconds(10), [&] { return completed >= 1; }));
    }
    for (int i = 64; i < kReqs; ++i) dev.value()->Submit(&ops[i].req);
    int rc = a.Terminate();
    QCOMPARE(rc, 0);
    {
      std::unique_lock<std::mutex> l(mu);
      QVERIFY2(cv.wait_for(l, std::chrono::seconds(30), [&] { return completed == kReqs; }),
               qPrintable(QString("%1 of %2 requests completed").arg(completed).arg(kReqs)));
    }
    dev.value()->Close();
    QVERIFY2(a.Log().contains("exporter drained"), a.Log().constData());

    int acked = 0;
    QFile f(img);
    QVERIFY(f.open(QIODevice::ReadOnly));
    for (int i = 0; i < kReqs; ++i) {
      if (!ops[i].st.ok()) continue;
      ++acked;
      f.seek(qint64(i) * kLen);
      QByteArray got = f.read(kLen);
      QVERIFY2(got == QByteArray(ops[i].buf.data(), kLen),
               qPrintable(QString("acknowledged write %1 is not in the image").arg(i)));
    }
    QVERIFY(acked >= 1);
    qInfo("%d of %d writes acknowledged before shutdown", acked, kReqs);
  }

  // I/O through B's FUSE file: both daemons count frames per send call.
  void FuseIoAndFramesPerCall() {
    DST_REQUIRE(dst::test::IsRoot(), "needs root for FUSE allow_other");
    DST_REQUIRE(dst::test::HaveFuse(), "needs /dev/fuse");
    QTemporaryDir dir;
    QString mnt = dir.path() + "/mnt";
    FuseGuard fuse_guard{mnt};
    DaemonProcess a(dir.path() + "/a");
    a.config() = ExportConfig("disk", dir.path() + "/a/disk.img", "32M");
    QVERIFY(a.Start());
    DaemonProcess b(dir.path() + "/b");
    QVERIFY(b.Start());
    QByteArray out, err;
    QCOMPARE(b.Ctl({"mount", mnt}, &out, &err), 0);
    QCOMPARE(b.Ctl({"volume", "import", "vol", QString("dst://127.0.0.1:%1/disk").arg(a.port())}, &out, &err), 0);
    QString file = mnt + "/vol.img";
    QVERIFY2(QFile::exists(file), qPrintable(file));

    // Concurrent direct writes, then reads, so replies can batch.
    QProcess dd;
    dd.start("dd", {"if=/dev/urandom", "of=" + file, "bs=1M", "count=16", "oflag=direct", "conv=notrunc"});
    QVERIFY(dd.waitForFinished(60000));
    QCOMPARE(dd.exitCode(), 0);
    QProcess rd;
    rd.start("dd", {"if=" + file, "of=/dev/null", "bs=1M", "iflag=direct"});
    QVERIFY(rd.waitForFinished(60000));
    QCOMPARE(rd.exitCode(), 0);

    json sb = CtlJson(b, {"status"});
    QCOMPARE(sb["mount"], json(mnt.toStdString()));
    json v = sb["volumes"][0];
    QCOMPARE(v["file"], json(file.toStdString()));
    QVERIFY2(v["requests"].get<std::uint64_t>() > 0, sb.dump().c_str());
    QVERIFY2(v["frames_per_call"].get<double>() > 0, sb.dump().c_str());
    json sa = CtlJson(a, {"status"});
    QVERIFY2(sa["exporter"]["requests"].get<std::uint64_t>() > 0, sa.dump().c_str());
    QVERIFY2(sa["exporter"]["frames_per_call"].get<double>() > 0, sa.dump().c_str());
    // Per export too (ExportStatus counters, aggregated over the export's connections).
    const json& ex = sa["exports"][0];
    QVERIFY2(ex.contains("frames_per_call") && ex.contains("requests") && ex.contains("frames_sent") &&
                 ex.contains("send_calls"), sa.dump().c_str());
    QVERIFY2(ex["requests"].get<std::uint64_t>() > 0, sa.dump().c_str());
    QVERIFY2(ex["frames_sent"].get<std::uint64_t>() >= ex["send_calls"].get<std::uint64_t>(), sa.dump().c_str());
    QVERIFY2(ex["send_calls"].get<std::uint64_t>() > 0, sa.dump().c_str());
    QVERIFY2(ex["frames_per_call"].get<double>() > 0, sa.dump().c_str());
    QCOMPARE(b.Ctl({"status"}, &out, &err), 0);
    QVERIFY2(out.contains("frames/call:") && out.contains("file:" + file.toUtf8()), out.constData());

    // The file is open -> remove and unmount are refused (busy, 75); closed -> fine.
    {
      QFile held(file);
      QVERIFY(held.open(QIODevice::ReadOnly));
      QCOMPARE(b.Ctl({"volume", "remove", "vol"}, &out, &err), 75);
      QVERIFY2(OneErrorLine(err) && err.contains("in use"), err.constData());
      QCOMPARE(b.Ctl({"unmount"}, &out, &err), 75);
      QVERIFY2(OneErrorLine(err), err.constData());
    }
    QCOMPARE(b.Ctl({"volume", "remove", "vol"}, &out, &err), 0);
    QVERIFY(!QFile::exists(file));
    QCOMPARE(b.Ctl({"unmount"}, &out, &err), 0);
    QCOMPARE(b.Terminate(), 0);
    QCOMPARE(a.Terminate(), 0);
  }

  // mkfs.ext4 discards the whole device first: a loop device turns that into one punch-hole over
  // the FUSE file.  Ranges above the protocol's 32 MiB length limit must still work end to end.
  void LargeDiscardThroughFuse() {
    DST_REQUIRE(dst::test::IsRoot(), "needs root for FUSE allow_other");
    DST_REQUIRE(dst::test::HaveFuse(), "needs /dev/fuse");
    DST_REQUIRE(dst::test::HaveTool("fallocate"), "needs fallocate");
    QTemporaryDir dir;
    QString mnt = dir.path() + "/mnt";
    FuseGuard fuse_guard{mnt};
    DaemonProcess a(dir.path() + "/a");
    a.config() = ExportConfig("disk", dir.path() + "/a/disk.img", "128M");
    QVERIFY(a.Start());
    DaemonProcess b(dir.path() + "/b");
    b.config() = QString("[[volume]]\nname = \"vol\"\nremote = \"dst://127.0.0.1:%1/disk\"\n"
                         "io_timeout = 5\n").arg(a.port());
    b.extra_args() << "--mount" << mnt;
    QVERIFY(b.Start());
    QString file = mnt + "/vol.img";
    QTRY_VERIFY_WITH_TIMEOUT(QFile::exists(file), 10000);
    for (const char* mode : {"--punch-hole", "--zero-range"}) {
      QProcess p;
      p.start("fallocate", {mode, "--keep-size", "--offset", "0", "--length", "96MiB", file});
      bool finished = p.waitForFinished(30000);
      if (!finished) {
        // Unblock it: stopping B fails the stuck request once its flush deadline passes.
        b.Terminate();
        p.waitForFinished(30000);
      }
      QVERIFY2(finished, qPrintable(QString("fallocate %1 of 96 MiB hung").arg(mode)));
      QVERIFY2(p.exitCode() == 0, p.readAllStandardError().constData());
    }
    json sb = CtlJson(b, {"volume", "list"});
    QCOMPARE(sb["volumes"][0]["reconnects"], json(0));
    QCOMPARE(b.Terminate(), 0);
    QCOMPARE(a.Terminate(), 0);
  }
};

DST_TEST_MAIN(DaemonTest)
#include "daemon_test.moc"
