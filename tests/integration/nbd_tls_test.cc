// Integration: NBD over TLS 1.3 (NBD_OPT_STARTTLS) between a real dstd and real clients nobody
// here wrote (issue 11 item 1).
//
// dstd has a PSK file from `dstctl key generate` (identity alice), so its NBD server requires TLS
// (nbd_tls defaults to "require").  Against it:
// * libnbd's nbdinfo and nbdcopy with nbds://alice@127.0.0.1:PORT/disk?tls-psk-file=F: size,
//   write then read back, the bytes land in the export's image file;
// * qemu-img with --object tls-creds-psk (dir/keys.psk) and --image-opts driver=nbd,tls-creds=:
//   convert onto the export and compare;
// * fio's nbd engine (uri=nbds://...) with crc32c verify;
// * dst's own NBD client (NbdClientDevice, nbds://) in this process and as a dstd volume;
// * refused: plain nbd:// (TLS required), the right identity with a wrong key, an unknown
//   identity, and a second STARTTLS (a raw client with OpenSSL);
// * nbd_listen on 0.0.0.0 starts without insecure when TLS is required, and exits 78 when NBD
//   would serve clear text (no keys, or nbd_tls = "allow") unless insecure = true.
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
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
#include <QtTest/QtTest>

#include <filesystem>
#include <future>
#include <memory>

#include <nlohmann/json.hpp>
#include <openssl/ssl.h>

#include "daemon_process.h"
#include "dst/net/nbd_client_device.h"
#include "dst/net/nbd_format.h"
#include "dst/net/tls.h"
#include "io_thread.h"
#include "loopback.h"
#include "run_tool.h"
#include "sync_io.h"
#include "test_env.h"

using namespace dst;
using namespace dst::net;
using dst::test::DaemonProcess;
using dst::test::ToolResult;
using json = nlohmann::json;

namespace {

constexpr qint64 kSize = 32ll << 20;

ToolResult Run(const QString& prog, const QStringList& args, int timeout_ms = 120000) {
  return dst::test::RunTool(prog, args, timeout_ms);
}
// RunTool with extra environment variables ("NAME=value").
ToolResult RunEnv(const QStringList& env, const QString& prog, const QStringList& args) {
  ToolResult r;
  QProcess p;
  QProcessEnvironment e = QProcessEnvironment::systemEnvironment();
  for (const QString& kv : env) e.insert(kv.section('=', 0, 0), kv.section('=', 1));
  p.setProcessEnvironment(e);
  p.start(prog, args);
  if (!p.waitForStarted(10000) || !p.waitForFinished(120000)) {
    p.kill();
    p.waitForFinished(5000);
    return r;
  }
  r.out = p.readAllStandardOutput();
  r.err = p.readAllStandardError();
  r.rc = p.exitStatus() == QProcess::NormalExit ? p.exitCode() : -1;
  return r;
}

QString Dstctl() { return QString::fromStdString(dst::test::BinPath("dstctl")); }
QString Dstd() { return QString::fromStdString(dst::test::BinPath("dstd")); }

QByteArray Sha256(const QString& path, qint64 length) {
  QFile f(path);
  if (!f.open(QIODevice::ReadOnly)) return {};
  return QCryptographicHash::hash(f.read(length), QCryptographicHash::Sha256).toHex();
}

bool WriteRandomFile(const QString& path, qint64 size) {
  QFile f(path);
  if (!f.open(QIODevice::WriteOnly | QIODevice::Truncate)) return false;
  QByteArray chunk(1 << 20, Qt::Uninitialized);
  for (qint64 done = 0; done < size; done += chunk.size()) {
    QRandomGenerator::global()->fillRange(reinterpret_cast<quint32*>(chunk.data()), chunk.size() / 4);
    if (f.write(chunk) != chunk.size()) return false;
  }
  return true;
}

using dst::test::Sync;

std::shared_ptr<TlsContext> ClientTls(const QString& psk_file) {
  TlsConfig c;
  c.psk_file = psk_file.toStdString();
  auto r = TlsContext::Create(c);
  return r.ok() ? r.value() : nullptr;
}

// A blocking NBD handshake client on a raw socket, with OpenSSL after STARTTLS: for what no
// real client does on purpose (a second STARTTLS).
class RawNbd {
 public:
  ~RawNbd() {
    if (ssl_) SSL_free(ssl_);
    if (fd_ >= 0) ::close(fd_);
  }
  bool Connect(quint16 port) {
    if ((fd_ = dst::test::DialLoopback(port)) < 0) return false;
    std::uint8_t g[nbd::kGreetingSize], f[4];
    if (!Recv(g, sizeof g) || nbd::Get64(g + 8) != nbd::kOptMagic) return false;
    nbd::Put32(f, nbd::kClientFlagFixedNewstyle | nbd::kClientFlagNoZeroes);
    return Send(f, 4);
  }
  // Sends an option without data; returns the type of its (single) reply, 0 on failure.
  std::uint32_t Option(std::uint32_t opt) {
    std::uint8_t h[nbd::kOptionHeaderSize];
    nbd::Put64(h, nbd::kOptMagic);
    nbd::Put32(h + 8, opt);
    nbd::Put32(h + 12, 0);
    if (!Send(h, sizeof h)) return 0;
    std::uint8_t r[nbd::kOptionReplyHeaderSize];
    if (!Recv(r, sizeof r) || nbd::Get64(r) != nbd::kOptReplyMagic) return 0;
    std::string data(nbd::Get32(r + 16), '\0');
    if (!Recv(data.data(), data.size())) return 0;
    return nbd::Get32(r + 12);
  }
  bool Handshake(const std::shared_ptr<TlsContext>& ctx) {
    ctx_ = ctx;
    ssl_ = SSL_new(static_cast<SSL_CTX*>(ctx->native()));
    SSL_set_fd(ssl_, fd_);
    return SSL_connect(ssl_) == 1;
  }

 private:
  bool Send(const void* p, std::size_t n) {
    auto* c = static_cast<const char*>(p);
    while (n) {
      const ssize_t w = ssl_ ? SSL_write(ssl_, c, int(n)) : ::send(fd_, c, n, MSG_NOSIGNAL);
      if (w <= 0) return false;
      c += w;
      n -= std::size_t(w);
    }
    return true;
  }
  bool Recv(void* p, std::size_t n) {
    auto* c = static_cast<char*>(p);
    while (n) {
      pollfd pf{fd_, POLLIN, 0};
      if (!(ssl_ && SSL_has_pending(ssl_)) && ::poll(&pf, 1, 5000) <= 0) return false;
      const ssize_t r = ssl_ ? SSL_read(ssl_, c, int(n)) : ::recv(fd_, c, n, 0);
      if (r <= 0) return false;
      c += r;
      n -= std::size_t(r);
    }
    return true;
  }

  int fd_ = -1;
  std::shared_ptr<TlsContext> ctx_;
  SSL* ssl_ = nullptr;
};

}  // namespace

class NbdTlsTest : public QObject {
  Q_OBJECT

  QTemporaryDir dir_;
  QString key_, wrong_key_, unknown_key_, qemu_dir_, image_;
  std::unique_ptr<DaemonProcess> d_;

  QString P(const QString& n) const { return dir_.filePath(n); }
  // libnbd's URI: the user is the PSK identity, the key file a query parameter.
  QString Uri(const QString& key, const QString& user = "alice") const {
    return QString("nbds://%1@127.0.0.1:%2/disk?tls-psk-file=%3").arg(user).arg(d_->nbd_port()).arg(key);
  }
  QString PlainUri() const { return QString("nbd://127.0.0.1:%1/disk").arg(d_->nbd_port()); }
  QStringList QemuObject() const {
    return {"--object", "tls-creds-psk,id=tls0,endpoint=client,dir=" + qemu_dir_ + ",username=alice"};
  }
  QString QemuNbd() const {
    return QString("driver=nbd,host=127.0.0.1,port=%1,export=disk,tls-creds=tls0").arg(d_->nbd_port());
  }
  json Status() {
    QByteArray out;
    if (d_->Ctl({"status", "--json"}, &out) != 0) return json();
    return json::parse(out.toStdString(), nullptr, false);
  }

 private slots:
  void initTestCase() {
    QVERIFY(dir_.isValid());
    ::signal(SIGPIPE, SIG_IGN);  // the raw OpenSSL client below writes with write()
    DST_REQUIRE(std::filesystem::exists(dst::test::BinPath("dstd")) &&
                    std::filesystem::exists(dst::test::BinPath("dstctl")),
                "dstd and dstctl binaries not built");
    key_ = P("lab.psk");
    wrong_key_ = P("wrong.psk");
    unknown_key_ = P("unknown.psk");
    for (auto [file, id] : {std::pair{key_, "alice"}, {wrong_key_, "alice"}, {unknown_key_, "mallory"}}) {
      ToolResult g = Run(Dstctl(), {"key", "generate", "--identity", id, file});
      QVERIFY2(g.rc == 0, g.err.constData());
    }
    // QEMU reads <dir>/keys.psk (the same identity:hexkey format).
    qemu_dir_ = P("qemu");
    QVERIFY(QDir().mkpath(qemu_dir_));
    QVERIFY(QFile::copy(key_, qemu_dir_ + "/keys.psk"));
    QVERIFY(QFile::setPermissions(qemu_dir_ + "/keys.psk", QFile::ReadOwner | QFile::WriteOwner));

    image_ = P("d/disk.img");
    d_ = std::make_unique<DaemonProcess>(P("d"));
    d_->config() = QString("tls_psk_file = \"%1\"\n[[export]]\nname = \"disk\"\npath = \"%2\"\nsize = \"32M\"\n")
                       .arg(key_, image_);
    QVERIFY2(d_->Start(), d_->Log().constData());
  }

  void cleanupTestCase() {
    if (d_) QCOMPARE(d_->Terminate(), 0);
  }

  void statusSaysRequired() {
    json st = Status();
    QCOMPARE(st["nbd"]["tls"], json("require"));
    QCOMPARE(st["daemon"]["insecure"], json(false));
    QByteArray out;
    QCOMPARE(d_->Ctl({"status"}, &out), 0);
    QVERIFY2(out.contains(QString("nbd:127.0.0.1:%1 tls:require").arg(d_->nbd_port()).toUtf8()), out.constData());
  }

  void nbdinfoOverTls() {
    DST_REQUIRE(dst::test::HaveTool("nbdinfo"), "nbdinfo (libnbd-bin) not installed");
    ToolResult r = Run("nbdinfo", {"--json", Uri(key_)});
    QVERIFY2(r.rc == 0, r.err.constData());
    QJsonDocument doc = QJsonDocument::fromJson(r.out);
    QJsonObject e = doc["exports"].toArray().at(0).toObject();
    QCOMPARE(e["export-size"].toInteger(), kSize);
    QVERIFY2(doc["TLS"].toBool(), r.out.constData());
    // The export list, inside TLS.
    ToolResult l = Run("nbdinfo", {"--list", Uri(key_)});
    QVERIFY2(l.rc == 0 && l.out.contains("disk"), (l.err + l.out).constData());
  }

  void nbdcopyWriteReadBack() {
    DST_REQUIRE(dst::test::HaveTool("nbdcopy"), "nbdcopy (libnbd-bin) not installed");
    const QString src = P("src.raw"), back = P("back.raw");
    QVERIFY(WriteRandomFile(src, kSize));
    ToolResult w = Run("nbdcopy", {src, Uri(key_)});
    QVERIFY2(w.rc == 0, w.err.constData());
    ToolResult r = Run("nbdcopy", {Uri(key_), back});
    QVERIFY2(r.rc == 0, r.err.constData());
    QCOMPARE(Sha256(back, kSize), Sha256(src, kSize));
    QCOMPARE(Sha256(image_, kSize), Sha256(src, kSize));  // in the export's file
  }

  void qemuImgOverTls() {
    DST_REQUIRE(dst::test::HaveTool("qemu-img"), "qemu-img (qemu-utils) not installed");
    const QString src = P("qemu-src.raw");
    QVERIFY(WriteRandomFile(src, kSize));
    ToolResult info = Run("qemu-img", QStringList{"info"} + QemuObject() + QStringList{"--output=json", "--image-opts", QemuNbd()});
    QVERIFY2(info.rc == 0, info.err.constData());
    QCOMPARE(QJsonDocument::fromJson(info.out)["virtual-size"].toInteger(), kSize);
    ToolResult conv = Run("qemu-img", QStringList{"convert"} + QemuObject() + QStringList{"-n", "-f", "raw", src,
                                                                 "--target-image-opts", QemuNbd()});
    QVERIFY2(conv.rc == 0, conv.err.constData());
    ToolResult cmp = Run("qemu-img", QStringList{"compare"} + QemuObject() + QStringList{"--image-opts", QemuNbd(),
                                                                "driver=file,filename=" + src});
    QVERIFY2(cmp.rc == 0, (cmp.err + cmp.out).constData());
    QCOMPARE(Sha256(image_, kSize), Sha256(src, kSize));
    // One changed byte in the local file is found through TLS.
    {
      QFile f(src);
      QVERIFY(f.open(QIODevice::ReadWrite));
      f.seek((7ll << 20) + 4321);
      f.write("\x01", 1);
    }
    ToolResult diff = Run("qemu-img", QStringList{"compare"} + QemuObject() + QStringList{"--image-opts", QemuNbd(),
                                                                 "driver=file,filename=" + src});
    QCOMPARE(diff.rc, 1);
    QVERIFY2(diff.out.contains("Content mismatch"), diff.out.constData());
  }

  // fio's nbd engine calls nbd_connect_uri without nbd_set_uri_allow_local_file, so libnbd 1.14
  // refuses ?tls-psk-file= in its URI ("local file access (tls-psk-file) is not allowed"), and
  // libnbd has no default key location.  So fio talks to nbdkit's nbd plugin on a Unix socket
  // and the plugin (libnbd again) carries it to dstd over TLS with the PSK: every fio request
  // and its verify read cross the TLS connection.
  void fioVerifyOverTls() {
    DST_REQUIRE(dst::test::HaveTool("fio"), "fio not installed");
    DST_REQUIRE(dst::test::HaveTool("nbdkit"), "nbdkit not installed");
    ToolResult eng = Run("fio", {"--enghelp=nbd"});
    DST_REQUIRE(eng.rc == 0 && eng.out.contains("uri"), "fio built without the nbd engine (libnbd)");
    const int before = Status()["nbd"]["tls_handshakes"].get<int>();
    ToolResult r = Run("nbdkit", {"-U", "-", "nbd", "hostname=127.0.0.1", QString("port=%1").arg(d_->nbd_port()),
                                  "export=disk", "tls=require", "tls-psk=" + key_, "tls-username=alice", "--run",
                                  "fio --name=tlsverify --ioengine=nbd --uri=\"$uri\" --rw=randwrite --bs=16k "
                                  "--size=16M --iodepth=8 --verify=crc32c --do_verify=1 --output-format=json"});
    QVERIFY2(r.rc == 0, (r.err + r.out.left(2000)).constData());
    QJsonObject job = QJsonDocument::fromJson(r.out.mid(r.out.indexOf('{')))["jobs"].toArray().at(0).toObject();
    QCOMPARE(job["error"].toInt(), 0);
    QCOMPARE(job["write"].toObject()["io_bytes"].toInteger(), 16ll << 20);
    QCOMPARE(job["read"].toObject()["io_bytes"].toInteger(), 16ll << 20);  // the verify pass
    QVERIFY(Status()["nbd"]["tls_handshakes"].get<int>() > before);
  }

  // Plain text is refused with a TLS-required error; a wrong key and an unknown identity fail
  // the handshake; nothing is served to them.
  void refusals() {
    DST_REQUIRE(dst::test::HaveTool("nbdinfo"), "nbdinfo (libnbd-bin) not installed");
    // libnbd reports NBD_REP_ERR_TLS_REQD as "Operation not supported"; its debug log shows the
    // server's message.
    ToolResult plain = RunEnv({"LIBNBD_DEBUG=1"}, "nbdinfo", {PlainUri()});
    QVERIFY(plain.rc != 0);
    QVERIFY2(plain.err.contains("server error message: TLS is required"), plain.err.right(3000).constData());
    ToolResult list = Run("nbdinfo", {"--list", PlainUri()});
    QVERIFY(list.rc != 0);
    QVERIFY2(!list.out.contains("disk"), list.out.constData());
    if (dst::test::HaveTool("qemu-img")) {
      ToolResult q = Run("qemu-img", {"info", PlainUri()});
      QVERIFY(q.rc != 0);
      QVERIFY2(q.err.contains("TLS negotiation required") && q.err.contains("TLS is required"), q.err.constData());
    }
    ToolResult wrong = Run("nbdinfo", {Uri(wrong_key_)});
    QVERIFY(wrong.rc != 0);
    ToolResult unknown = Run("nbdinfo", {Uri(unknown_key_, "mallory")});
    QVERIFY(unknown.rc != 0);
    QTRY_VERIFY_WITH_TIMEOUT(d_->Log().contains("connection upgrade failed"), 5000);
  }

  // dst's own NBD client (NbdClientDevice) speaks STARTTLS for nbds://: in this process, and as
  // a dstd volume with the daemon's key file.
  void dstClientOverNbds() {
    NbdClientOptions o;
    QVERIFY(ParseNbdUri(QString("nbds://127.0.0.1:%1/disk").arg(d_->nbd_port()).toStdString(), &o).ok());
    QVERIFY(o.tls);
    o.connect_timeout = std::chrono::seconds(3);
    dst::test::IoThread io;
    QCOMPARE(NbdClientDevice::Connect(io.io, o).status().code(), Status::Code::kInvalidArgument);  // no keys
    o.tls_context = ClientTls(key_);
    auto dev = NbdClientDevice::Connect(io.io, o);
    QVERIFY2(dev.ok(), dev.status().ToString().c_str());
    std::vector<char> w(256u << 10), r(w.size());
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = char(i * 13 + 1);
    QVERIFY(Sync(*dev.value(), IoOp::kWrite, 3u << 20, w.data(), std::uint32_t(w.size())).ok());
    QVERIFY(Sync(*dev.value(), IoOp::kRead, 3u << 20, r.data(), std::uint32_t(r.size())).ok());
    QVERIFY(w == r);
    QFile img(image_);
    QVERIFY(img.open(QIODevice::ReadOnly) && img.seek(3u << 20));
    QVERIFY(img.read(qint64(w.size())) == QByteArray(w.data(), qsizetype(w.size())));
    dev.value()->Close();
    o.tls_context = ClientTls(wrong_key_);
    auto bad = NbdClientDevice::Connect(io.io, o);
    QVERIFY(!bad.ok());
    QVERIFY2(bad.status().message().find("TLS handshake") != std::string::npos, bad.status().ToString().c_str());

    DaemonProcess v(P("v"));
    v.config() = QString("tls_psk_file = \"%1\"\n[[volume]]\nname = \"vol\"\nremote = \"nbds://127.0.0.1:%2/disk\"\n")
                     .arg(key_).arg(d_->nbd_port());
    QVERIFY2(v.Start(), v.Log().constData());
    auto vol = [&] {
      QByteArray out;
      v.Ctl({"volume", "list", "--json"}, &out);
      return json::parse(out.toStdString(), nullptr, false)["volumes"][0];
    };
    QTRY_COMPARE_WITH_TIMEOUT(vol()["state"], json("connected"), 10000);
    QCOMPARE(v.Terminate(), 0);
    DaemonProcess n(P("n"));  // no keys: refused with the reason
    QVERIFY(n.Start());
    QByteArray out, err;
    QVERIFY(n.Ctl({"volume", "import", "v2", QString("nbds://127.0.0.1:%1/disk").arg(d_->nbd_port())}, &out, &err) != 0);
    QVERIFY2(err.contains("nbds:// needs TLS keys"), err.constData());
  }

  void startTlsTwice() {
    auto ctx = ClientTls(key_);
    QVERIFY(ctx);
    RawNbd n;
    QVERIFY(n.Connect(d_->nbd_port()));
    QCOMPARE(n.Option(nbd::kOptList), nbd::kRepErrTlsReqd);
    QCOMPARE(n.Option(nbd::kOptStartTls), nbd::kRepAck);
    QVERIFY(n.Handshake(ctx));
    QCOMPARE(n.Option(nbd::kOptStartTls), nbd::kRepErrInvalid);
    QCOMPARE(n.Option(nbd::kOptStructuredReply), nbd::kRepAck);  // still negotiating, inside TLS
    QCOMPARE(n.Option(nbd::kOptAbort), nbd::kRepAck);
    QVERIFY(Status()["nbd"]["tls_handshakes"].get<int>() >= 1);
  }

  // nbd_listen on a non-loopback address: fine when NBD requires TLS; exit 78 when it would
  // serve clear text, unless insecure = true.
  void nonLoopbackNbdListen() {
    QTemporaryDir dir;
    auto start = [&](const QString& name, const QString& extra, int* rc, QByteArray* err) {
      QDir().mkpath(dir.path() + "/" + name);
      QFile f(dir.path() + "/" + name + "/dstd.toml");
      f.open(QIODevice::WriteOnly);
      f.write(("[daemon]\nlisten = \"127.0.0.1:0\"\nnbd_listen = \"0.0.0.0:0\"\n" + extra).toUtf8());
      f.close();
      const QString sock = dir.path() + "/" + name + "/s.sock";
      QProcess p;
      p.start(Dstd(), {"--config", f.fileName(), "--state-dir", dir.path() + "/" + name, "--control", sock});
      if (!p.waitForStarted(5000)) return false;
      bool up = false;
      for (int i = 0; i < 100 && !up && p.state() == QProcess::Running; ++i) {
        up = Run(Dstctl(), {"--socket", sock, "status"}, 5000).rc == 0;
        if (!up) QThread::msleep(100);
      }
      if (up) {
        p.terminate();
        p.waitForFinished(30000);
      } else {
        p.waitForFinished(10000);
        *rc = p.exitCode();
      }
      *err = p.readAllStandardError();
      return up;
    };
    int rc = 0;
    QByteArray err;
    QVERIFY2(start("psk", QString("tls_psk_file = \"%1\"\n").arg(key_), &rc, &err), err.constData());
    QVERIFY(!start("plain", "", &rc, &err));
    QCOMPARE(rc, 78);
    QVERIFY2(err.contains("nbd_listen") && err.contains("insecure = true"), err.constData());
    QVERIFY(!start("allow", QString("tls_psk_file = \"%1\"\nnbd_tls = \"allow\"\n").arg(key_), &rc, &err));
    QCOMPARE(rc, 78);
    QVERIFY2(err.contains("nbd_tls = \"allow\""), err.constData());
    QVERIFY(!start("nokeys", "nbd_tls = \"require\"\n", &rc, &err));
    QCOMPARE(rc, 78);
    QVERIFY2(err.contains("needs TLS keys"), err.constData());
    QVERIFY2(start("insecure", "insecure = true\n", &rc, &err), err.constData());
    QVERIFY2(err.contains("serves clients without TLS"), err.constData());
  }
};

DST_TEST_MAIN(NbdTlsTest)
#include "nbd_tls_test.moc"
