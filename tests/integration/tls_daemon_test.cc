// Integration: DST inside TLS 1.3 between real daemons (issue 11 item 1).
//
// * `dstctl key generate` writes the lab's PSK file.  dstd A exports a file with it; dstd B
//   imports the export as a volume over dsts:// and re-exports the volume; a client in this
//   process (TLS connector, the same key file) runs a verified random workload through B and A.
//   The bytes land in A's image file.  A plain dst:// client to A gets no data.
// * A daemon with the right identity but the wrong key: its volume stays down with an error
//   naming the TLS handshake; A logs the failed handshake and serves nothing to it.
// * listen = "0.0.0.0:..." without TLS is refused (exit 78, the message names insecure); with
//   insecure = true dstd starts and `status` warns (`--json`: daemon.insecure).
// * Default deny (issue 11): two PSK identities against per-export access lists (rw, ro, denied,
//   the per-identity cap, dstctl export allow and its persistence); plaintext peers are
//   "anonymous" and must be listed; with X.509 the identity is the certificate's CN.
#include <sys/stat.h>

#include <QFile>
#include <QProcess>
#include <QTemporaryDir>
#include <QtTest/QtTest>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>

#include <nlohmann/json.hpp>

#include "daemon_process.h"
#include "io_thread.h"
#include "run_tool.h"
#include "sync_io.h"
#include "dst/net/remote_device.h"
#include "dst/net/tcp_transport.h"
#include "dst/net/tls.h"
#include "remote_workload.h"
#include "test_env.h"

using namespace dst;
using namespace dst::net;
using dst::test::DaemonProcess;
using json = nlohmann::json;

namespace {

using dst::test::IoThread;
using dst::test::ToolResult;

ToolResult Run(const QString& prog, const QStringList& args) { return dst::test::RunTool(prog, args); }

QString Dstctl() { return QString::fromStdString(dst::test::BinPath("dstctl")); }
QString Dstd() { return QString::fromStdString(dst::test::BinPath("dstd")); }

json CtlJson(DaemonProcess& d, const QStringList& args) {
  QByteArray out;
  if (d.Ctl(args + QStringList{"--json"}, &out) != 0) return json();
  return json::parse(out.toStdString(), nullptr, false);
}

// RemoteOptions for export `name` on 127.0.0.1:port over TLS with `psk_file` as `identity`
// (no TLS when ctx is null).
RemoteOptions Options(std::uint16_t port, const std::string& name, std::shared_ptr<TlsContext> ctx) {
  RemoteOptions o;
  o.host = "127.0.0.1";
  o.port = port;
  o.export_name = name;
  o.queue_depth = 16;
  o.connect_timeout = std::chrono::seconds(3);
  if (ctx)
    o.connector = [ctx, port](const Strand& s) -> std::unique_ptr<Connector> {
      return std::make_unique<TlsConnector>(std::make_unique<TcpConnector>(s, "127.0.0.1", port), ctx, "127.0.0.1");
    };
  return o;
}

constexpr std::uint64_t kSize = 16ull << 20;

using dst::test::Sync;  // one request, waited for

// True when a HELLO of `identity` (its TLS context; null: plaintext, "anonymous") for export
// `name` of d is refused with EACCES and d logs the identity and the export.
bool Denied(DaemonProcess& d, IoThread& io, const std::string& name, std::shared_ptr<TlsContext> ctx,
            const std::string& identity) {
  auto r = RemoteDevice::Connect(io.io, Options(d.port(), name, std::move(ctx)));
  if (r.ok() || r.status().ToErrno() != EACCES) return false;
  const QByteArray line = QByteArray::fromStdString("access denied: identity " + identity + " may not use export " + name);
  for (int i = 0; i < 50 && !d.Log().contains(line); ++i) QTest::qWait(100);
  return d.Log().contains(line);
}

}  // namespace

class TlsDaemonTest : public QObject {
  Q_OBJECT
 private slots:
  void initTestCase() {
    DST_REQUIRE(std::filesystem::exists(dst::test::BinPath("dstd")) &&
                    std::filesystem::exists(dst::test::BinPath("dstctl")),
                "dstd and dstctl binaries not built");
  }

  void volumeOverDsts() {
    QTemporaryDir dir;
    const QString key = dir.path() + "/lab.psk";
    ToolResult g = Run(Dstctl(), {"key", "generate", "--identity", "hostb", key});
    QVERIFY2(g.rc == 0, g.err.constData());
    struct stat st_key;
    QCOMPARE(::stat(key.toLocal8Bit().constData(), &st_key), 0);
    QCOMPARE(int(st_key.st_mode & 0777), 0600);
    QCOMPARE(Run(Dstctl(), {"key", "generate", key}).rc, 64);  // no overwrite

    DaemonProcess a(dir.path() + "/a");
    a.config() = QString("tls_psk_file = \"%1\"\n[[export]]\nname = \"disk\"\npath = \"%2/a/disk.img\"\n"
                         "size = \"16M\"\n").arg(key, dir.path());
    QVERIFY2(a.Start(), a.Log().constData());
    DaemonProcess b(dir.path() + "/b");
    b.config() = QString("tls_psk_file = \"%1\"\ntls_identity = \"hostb\"\n"
                         "[[volume]]\nname = \"vol\"\nremote = \"dsts://127.0.0.1:%2/disk\"\n"
                         "[[export]]\nname = \"out\"\nvolume = \"vol\"\n").arg(key).arg(a.port());
    QVERIFY2(b.Start(), b.Log().constData());
    QTRY_COMPARE_WITH_TIMEOUT(CtlJson(b, {"volume", "list"})["volumes"][0]["state"], json("connected"), 10000);
    json st = CtlJson(a, {"status"});
    QCOMPARE(st["daemon"]["tls"], json("psk"));
    QCOMPARE(st["daemon"]["insecure"], json(false));

    TlsConfig tc;
    tc.psk_file = key.toStdString();
    tc.psk_identity = "hostb";
    auto ctx = TlsContext::Create(tc);
    QVERIFY2(ctx.ok(), ctx.status().ToString().c_str());
    IoThread io;
    auto r = RemoteDevice::Connect(io.io, Options(b.port(), "out", ctx.value()));
    QVERIFY2(r.ok(), r.status().ToString().c_str());
    auto dev = r.value();
    QCOMPARE(dev->Info().size, kSize);
    dst::test::Workload w(*dev, kSize, 16, 7);
    QVERIFY2(w.Run(64ull << 20, nullptr, std::chrono::steady_clock::now() + std::chrono::seconds(60)),
             "requests hung");
    auto t = w.totals();
    QCOMPARE(t.errors, std::uint64_t(0));
    QVERIFY2(t.mismatches == 0, t.first_mismatch.c_str());
    QVERIFY(t.writes > 0);
    dev->Close();

    // A's image holds what went through B: write a marker, read the file.
    {
      auto r2 = RemoteDevice::Connect(io.io, Options(b.port(), "out", ctx.value()));
      QVERIFY(r2.ok());
      std::vector<char> buf(4096, 'T');
      QVERIFY(Sync(*r2.value(), IoOp::kWrite, 1 << 20, buf.data(), 4096).ok());
      QVERIFY(Sync(*r2.value(), IoOp::kFlush, 0, nullptr, 0).ok());
      r2.value()->Close();
      std::ifstream img((dir.path() + "/a/disk.img").toStdString(), std::ios::binary);
      img.seekg(1 << 20);
      std::vector<char> got(4096);
      img.read(got.data(), 4096);
      QVERIFY(got == buf);
    }

    // Plain DST to A's TLS port: no connection.
    auto plain = RemoteDevice::Connect(io.io, Options(a.port(), "disk", nullptr));
    QVERIFY(!plain.ok());
    QCOMPARE(b.Terminate(), 0);
    QCOMPARE(a.Terminate(), 0);
  }

  // The figure for docs: the same verified random workload (4 KiB..1 MiB, 16 in flight) against a
  // plain exporter and a TLS one on this host.  Reported, not a limit (the machine is shared).
  void throughputTlsVsPlain() {
    QTemporaryDir dir;
    const QString key = dir.path() + "/lab.psk";
    QCOMPARE(Run(Dstctl(), {"key", "generate", "--identity", "bench", key}).rc, 0);
    const QString exp = "[[export]]\nname = \"disk\"\npath = \"%1/disk.img\"\nsize = \"64M\"\n";
    DaemonProcess plain(dir.path() + "/p");
    plain.config() = exp.arg(dir.path() + "/p");
    QVERIFY2(plain.Start(), plain.Log().constData());
    DaemonProcess tls(dir.path() + "/t");
    tls.config() = QString("tls_psk_file = \"%1\"\n").arg(key) + exp.arg(dir.path() + "/t");
    QVERIFY2(tls.Start(), tls.Log().constData());
    TlsConfig tc;
    tc.psk_file = key.toStdString();
    auto ctx = TlsContext::Create(tc);
    QVERIFY(ctx.ok());
    IoThread io;
    double mibs[2] = {0, 0};
    for (int i = 0; i < 2; ++i) {
      auto r = RemoteDevice::Connect(io.io, i ? Options(tls.port(), "disk", ctx.value()) : Options(plain.port(), "disk", nullptr));
      QVERIFY2(r.ok(), r.status().ToString().c_str());
      dst::test::Workload w(*r.value(), 64ull << 20, 16, 11);
      const auto t0 = std::chrono::steady_clock::now();
      QVERIFY(w.Run(256ull << 20, nullptr, t0 + std::chrono::seconds(90)));
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      QCOMPARE(w.totals().errors, std::uint64_t(0));
      QVERIFY2(w.totals().mismatches == 0, w.totals().first_mismatch.c_str());
      mibs[i] = double(w.totals().bytes) / 1048576.0 / secs;
      r.value()->Close();
    }
    qInfo("random 4 KiB..1 MiB reads and writes, 16 in flight, 256 MiB through dstd: plain %.0f MiB/s, "
          "TLS 1.3 PSK %.0f MiB/s (%.2fx)",
          mibs[0], mibs[1], mibs[1] / mibs[0]);
  }

  void wrongKeyGetsNothing() {
    QTemporaryDir dir;
    const QString key = dir.path() + "/lab.psk", bad = dir.path() + "/bad.psk";
    QCOMPARE(Run(Dstctl(), {"key", "generate", "--identity", "hostc", key}).rc, 0);
    QCOMPARE(Run(Dstctl(), {"key", "generate", "--identity", "hostc", bad}).rc, 0);  // same name, other key
    DaemonProcess a(dir.path() + "/a");
    a.config() = QString("tls_psk_file = \"%1\"\n[[export]]\nname = \"disk\"\npath = \"%2/a/disk.img\"\n"
                         "size = \"8M\"\n").arg(key, dir.path());
    QVERIFY2(a.Start(), a.Log().constData());
    DaemonProcess c(dir.path() + "/c");
    c.config() = QString("tls_psk_file = \"%1\"\n[[volume]]\nname = \"vol\"\nremote = \"dsts://127.0.0.1:%2/disk\"\n")
                     .arg(bad).arg(a.port());
    QVERIFY2(c.Start(), c.Log().constData());
    QTRY_VERIFY_WITH_TIMEOUT(CtlJson(c, {"volume", "list"})["volumes"][0]["error"].is_string(), 10000);
    json v = CtlJson(c, {"volume", "list"})["volumes"][0];
    QVERIFY2(v["state"] != json("connected"), v.dump().c_str());
    QVERIFY2(v["error"].get<std::string>().find("TLS handshake") != std::string::npos, v.dump().c_str());
    QTRY_VERIFY_WITH_TIMEOUT(a.Log().contains("TLS handshake with 127.0.0.1:"), 5000);
    QCOMPARE(CtlJson(a, {"status"})["exporter"]["requests"], json(0));

    // dsts:// without keys is refused with a reason.
    DaemonProcess n(dir.path() + "/n");
    QVERIFY(n.Start());
    QByteArray out, err;
    QVERIFY(n.Ctl({"volume", "import", "v2", QString("dsts://127.0.0.1:%1/disk").arg(a.port())}, &out, &err) != 0);
    QVERIFY2(err.contains("dsts:// needs TLS keys"), err.constData());

    // A key file others may read: dstd refuses to start and names it.
    ::chmod(bad.toLocal8Bit().constData(), 0644);
    QCOMPARE(c.Terminate(), 0);
    QVERIFY(!c.Start(3000));
    QVERIFY2(c.Log().contains("mode 0644"), c.Log().constData());
  }

  void nonLoopbackNeedsTlsOrInsecure() {
    QTemporaryDir dir;
    auto cfg = [&](const QString& name, const QString& extra) {
      QFile f(dir.path() + "/" + name);
      f.open(QIODevice::WriteOnly);
      f.write(("[daemon]\nlisten = \"0.0.0.0:0\"\nnbd_listen = \"127.0.0.1:0\"\n" + extra).toUtf8());
      return f.fileName();
    };
    QDir().mkpath(dir.path() + "/s1");
    ToolResult r = Run(Dstd(), {"--config", cfg("open.toml", ""), "--state-dir", dir.path() + "/s1", "--control",
                                dir.path() + "/s1/s.sock"});
    QCOMPARE(r.rc, 78);
    QVERIFY2(r.err.contains("listen") && r.err.contains("insecure = true") && r.err.contains("tls_psk_file"),
             r.err.constData());
    // The same through --listen over a loopback config.
    QFile lo(dir.path() + "/lo.toml");
    QVERIFY(lo.open(QIODevice::WriteOnly));
    lo.write("[daemon]\nlisten = \"127.0.0.1:0\"\nnbd_listen = \"\"\n");
    lo.close();
    r = Run(Dstd(), {"--config", lo.fileName(), "--listen", "0.0.0.0:0", "--state-dir", dir.path() + "/s1",
                     "--control", dir.path() + "/s1/s.sock"});
    QCOMPARE(r.rc, 78);
    QVERIFY2(r.err.contains("insecure = true"), r.err.constData());

    // insecure = true: it starts, and status says what that means.
    QDir().mkpath(dir.path() + "/s2");
    const QString sock = dir.path() + "/s2/s.sock";
    QProcess d;
    d.start(Dstd(), {"--config", cfg("insecure.toml", "insecure = true\n"), "--state-dir", dir.path() + "/s2",
                     "--control", sock});
    QVERIFY(d.waitForStarted(5000));
    QTRY_VERIFY_WITH_TIMEOUT(QFile::exists(sock), 10000);
    ToolResult s;
    QTRY_VERIFY_WITH_TIMEOUT((s = Run(Dstctl(), {"--socket", sock, "status"})).rc == 0, 5000);
    QVERIFY2(s.out.contains("WARNING: insecure = true"), s.out.constData());
    ToolResult j = Run(Dstctl(), {"--socket", sock, "status", "--json"});
    QCOMPARE(json::parse(j.out.toStdString())["daemon"]["insecure"], json(true));
    d.terminate();
    QVERIFY(d.waitForFinished(30000));
    QVERIFY2(d.readAllStandardError().contains("neither encrypted nor authenticated"), "no warning in the log");
  }

  // Default deny with two PSK identities (issue 11 items 2-4, docs/security.md "Default deny"):
  // one key file with two lines on the server; hostc may read and write "rw", backup only read
  // it; nobody may use "none" (no allow list: dstd warns); the per-identity cap refuses the
  // third connection of hostc; dstctl export add without --allow warns, export allow edits a
  // runtime export's list, which survives a restart; a config file export is edited in the file.
  void accessByPskIdentity() {
    QTemporaryDir dir;
    const QString kc = dir.path() + "/c.psk", kb = dir.path() + "/b.psk", both = dir.path() + "/both.psk";
    QCOMPARE(Run(Dstctl(), {"key", "generate", "--identity", "hostc", kc}).rc, 0);
    QCOMPARE(Run(Dstctl(), {"key", "generate", "--identity", "backup", kb}).rc, 0);
    {
      QFile c(kc), b(kb), out(both);
      QVERIFY(c.open(QIODevice::ReadOnly) && b.open(QIODevice::ReadOnly) && out.open(QIODevice::WriteOnly));
      out.write(c.readAll() + b.readAll());
      QVERIFY(out.setPermissions(QFileDevice::ReadOwner | QFileDevice::WriteOwner));
    }
    DaemonProcess a(dir.path() + "/a");
    a.default_allow().clear();  // the daemon's own default: nobody
    a.config() = QString("tls_psk_file = \"%1\"\n[limits]\nmax_connections_per_identity = 2\n"
                         "[[export]]\nname = \"rw\"\npath = \"%2/rw.img\"\nsize = \"16M\"\n"
                         "allow = [\"hostc:rw\", \"backup:ro\"]\n"
                         "[[export]]\nname = \"none\"\npath = \"%2/none.img\"\nsize = \"16M\"\n")
                     .arg(both, dir.path());
    QVERIFY2(a.Start(), a.Log().constData());
    QVERIFY(a.Log().contains("export \"none\" has no allow list: nobody can connect"));
    auto ctx_of = [&](const QString& file, const char* id) {
      TlsConfig tc;
      tc.psk_file = file.toStdString();
      tc.psk_identity = id;
      return TlsContext::Create(tc).value();
    };
    auto hostc = ctx_of(kc, "hostc"), backup = ctx_of(kb, "backup");
    IoThread io;
    std::vector<char> w(4096, 'W'), r(4096);

    auto c1 = RemoteDevice::Connect(io.io, Options(a.port(), "rw", hostc));
    QVERIFY2(c1.ok(), c1.status().ToString().c_str());
    QVERIFY(!c1.value()->Info().read_only);
    QVERIFY(Sync(*c1.value(), IoOp::kWrite, 0, w.data(), 4096).ok());
    QVERIFY(a.Log().contains("accepted: identity hostc"));

    auto b1 = RemoteDevice::Connect(io.io, Options(a.port(), "rw", backup));
    QVERIFY2(b1.ok(), b1.status().ToString().c_str());
    QVERIFY(b1.value()->Info().read_only);
    QVERIFY(Sync(*b1.value(), IoOp::kRead, 0, r.data(), 4096).ok());
    QVERIFY(r == w);
    QCOMPARE(Sync(*b1.value(), IoOp::kWrite, 0, w.data(), 4096).code(), Status::Code::kReadOnly);

    auto denied = RemoteDevice::Connect(io.io, Options(a.port(), "none", hostc));
    QVERIFY2(denied.status().message().find("allow list") != std::string::npos, denied.status().ToString().c_str());
    QVERIFY(Denied(a, io, "none", hostc, "hostc"));

    // max_connections_per_identity = 2: c1 is one, c2 the second, the third is refused.
    auto c2 = RemoteDevice::Connect(io.io, Options(a.port(), "rw", hostc));
    QVERIFY2(c2.ok(), c2.status().ToString().c_str());
    auto c3 = RemoteDevice::Connect(io.io, Options(a.port(), "rw", hostc));
    QVERIFY(!c3.ok());
    QCOMPARE(c3.status().code(), Status::Code::kBusy);
    auto b2 = RemoteDevice::Connect(io.io, Options(a.port(), "rw", backup));  // another identity
    QVERIFY2(b2.ok(), b2.status().ToString().c_str());
    c2.value()->Close();
    QTRY_VERIFY_WITH_TIMEOUT(RemoteDevice::Connect(io.io, Options(a.port(), "rw", hostc)).ok(), 10000);

    json list = CtlJson(a, {"export", "list"});
    for (auto& e : list["exports"]) {
      if (e["name"] == "rw") QCOMPARE(e["allow"], json::array({"hostc:rw", "backup:ro"}));
      else QCOMPARE(e["allow"], json::array());
    }
    QByteArray out, err;
    QCOMPARE(a.Ctl({"export", "list"}, &out), 0);
    QVERIFY2(out.contains("ALLOW") && out.contains("hostc:rw,backup:ro") && out.contains("nobody"), out.constData());

    // Runtime exports: default deny with a warning, then export allow.
    QCOMPARE(a.Ctl({"export", "add", "e2", dir.path() + "/e2.img", "--size", "1M"}, &out, &err), 0);
    QVERIFY2(err.contains("allows nobody"), err.constData());
    QCOMPARE(RemoteDevice::Connect(io.io, Options(a.port(), "e2", hostc)).status().ToErrno(), EACCES);
    QCOMPARE(a.Ctl({"export", "allow", "e2", "--allow", "hostc:ro"}, &out, &err), 0);
    auto e2 = RemoteDevice::Connect(io.io, Options(a.port(), "e2", hostc));
    QVERIFY2(e2.ok(), e2.status().ToString().c_str());
    QVERIFY(e2.value()->Info().read_only);
    e2.value()->Close();
    QVERIFY(a.Ctl({"export", "allow", "e2", "--allow", "bad"}, &out, &err) != 0);
    QVERIFY(a.Ctl({"export", "allow", "rw", "--allow", "hostc:ro"}, &out, &err) != 0);
    QVERIFY2(err.contains("config file"), err.constData());

    for (auto* d : {&c1, &b1, &b2}) d->value()->Close();
    QCOMPARE(a.Terminate(), 0);
    QVERIFY2(a.Start(), a.Log().constData());
    list = CtlJson(a, {"export", "list"});
    bool seen = false;
    for (auto& e : list["exports"])
      if (e["name"] == "e2") {
        seen = true;
        QCOMPARE(e["allow"], json::array({"hostc:ro"}));
      }
    QVERIFY(seen);
    auto e2b = RemoteDevice::Connect(io.io, Options(a.port(), "e2", hostc));
    QVERIFY2(e2b.ok(), e2b.status().ToString().c_str());
    QVERIFY(e2b.value()->Info().read_only);
    QCOMPARE(RemoteDevice::Connect(io.io, Options(a.port(), "e2", backup)).status().ToErrno(), EACCES);
    e2b.value()->Close();
    QCOMPARE(a.Terminate(), 0);
  }

  // Plaintext peers are "anonymous": "*" (any authenticated identity) does not admit them, an
  // "anonymous:ro" rule admits them read-only.
  void anonymousMustBeListed() {
    QTemporaryDir dir;
    DaemonProcess p(dir.path() + "/p");
    p.default_allow().clear();
    p.config() = QString("[[export]]\nname = \"star\"\npath = \"%1/s.img\"\nsize = \"1M\"\nallow = [\"*:rw\"]\n"
                         "[[export]]\nname = \"anon\"\npath = \"%1/a.img\"\nsize = \"1M\"\nallow = [\"anonymous:ro\"]\n")
                     .arg(dir.path());
    QVERIFY2(p.Start(), p.Log().constData());
    IoThread io;
    QVERIFY(Denied(p, io, "star", nullptr, "anonymous"));
    auto anon = RemoteDevice::Connect(io.io, Options(p.port(), "anon", nullptr));
    QVERIFY2(anon.ok(), anon.status().ToString().c_str());
    QVERIFY(anon.value()->Info().read_only);
    anon.value()->Close();

    // `dstctl apply`: a runtime export whose file entry differs only in allow is changed in
    // place (export allow), not removed and re-added.
    const QString desired = dir.path() + "/desired.toml";
    auto apply = [&](const char* rule, QByteArray* out) {
      QFile f(desired);
      if (!f.open(QIODevice::WriteOnly | QIODevice::Truncate)) return -1;
      f.write(QString("[[export]]\nname = \"ap\"\npath = \"%1/ap.img\"\nsize = \"1M\"\nallow = [\"%2\"]\n")
                  .arg(dir.path(), rule).toUtf8());
      f.close();
      return p.Ctl({"apply", desired}, out);
    };
    QByteArray out;
    QCOMPARE(apply("anonymous:ro", &out), 0);
    auto ap = RemoteDevice::Connect(io.io, Options(p.port(), "ap", nullptr));
    QVERIFY2(ap.ok() && ap.value()->Info().read_only, ap.status().ToString().c_str());
    ap.value()->Close();
    QCOMPARE(apply("anonymous:rw", &out), 0);
    QVERIFY2(out.contains("export allow ap --allow anonymous:rw") && !out.contains("export remove"), out.constData());
    ap = RemoteDevice::Connect(io.io, Options(p.port(), "ap", nullptr));
    QVERIFY2(ap.ok() && !ap.value()->Info().read_only, ap.status().ToString().c_str());
    ap.value()->Close();
    QCOMPARE(p.Terminate(), 0);
  }

  // Default deny with X.509 (certificates made with the openssl CLI at test time): the identity
  // is the client certificate's subject CN, and the access list names CNs.
  void accessByCertificateCn() {
    DST_REQUIRE(std::filesystem::exists("/usr/bin/openssl"), "openssl CLI not installed");
    QTemporaryDir dir;
    const QString d = dir.path();
    auto openssl = [&](const QStringList& args) {
      ToolResult t = Run("/usr/bin/openssl", args);
      if (t.rc != 0) qWarning("openssl %s: %s", qPrintable(args.join(' ')), t.err.constData());
      return t.rc == 0;
    };
    const QStringList ec{"-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"};
    QVERIFY(openssl(QStringList{"req", "-x509"} + ec + QStringList{"-keyout", d + "/ca.key", "-out", d + "/ca.pem",
                                                          "-subj", "/CN=lab-ca", "-days", "2"}));
    {
      QFile ext(d + "/server.ext");
      QVERIFY(ext.open(QIODevice::WriteOnly));
      ext.write("subjectAltName=DNS:server\n");
    }
    for (QString n : {"server", "hostc", "reader"}) {
      QVERIFY(openssl(QStringList{"req"} + ec + QStringList{"-keyout", d + "/" + n + ".key", "-out", d + "/" + n + ".csr",
                                                            "-subj", "/CN=" + n}));
      QStringList sign{"x509", "-req", "-in", d + "/" + n + ".csr", "-CA", d + "/ca.pem", "-CAkey", d + "/ca.key",
                       "-CAcreateserial", "-out", d + "/" + n + ".pem", "-days", "2"};
      if (n == "server") sign << "-extfile" << d + "/server.ext";
      QVERIFY(openssl(sign));
      QVERIFY(QFile::setPermissions(d + "/" + n + ".key", QFileDevice::ReadOwner | QFileDevice::WriteOwner));
    }
    DaemonProcess a(d + "/a");
    a.default_allow().clear();
    a.config() = QString("tls_cert = \"%1/server.pem\"\ntls_key = \"%1/server.key\"\ntls_ca = \"%1/ca.pem\"\n"
                         "[[export]]\nname = \"x\"\npath = \"%1/x.img\"\nsize = \"1M\"\nallow = [\"hostc:rw\", \"reader:ro\"]\n"
                         "[[export]]\nname = \"y\"\npath = \"%1/y.img\"\nsize = \"1M\"\nallow = [\"reader:rw\"]\n")
                     .arg(d);
    QVERIFY2(a.Start(), a.Log().constData());
    auto ctx_of = [&](const QString& n) {
      TlsConfig tc;
      tc.cert_file = (d + "/" + n + ".pem").toStdString();
      tc.key_file = (d + "/" + n + ".key").toStdString();
      tc.ca_file = (d + "/ca.pem").toStdString();
      tc.server_name = "server";
      auto c = TlsContext::Create(tc);
      if (!c.ok()) qWarning("%s", c.status().ToString().c_str());
      return c.ok() ? c.value() : nullptr;
    };
    auto hostc = ctx_of("hostc"), reader = ctx_of("reader");
    QVERIFY(hostc && reader);
    IoThread io;
    auto x = RemoteDevice::Connect(io.io, Options(a.port(), "x", hostc));
    QVERIFY2(x.ok(), (x.status().ToString() + "\n" + a.Log().toStdString()).c_str());
    QVERIFY(!x.value()->Info().read_only);
    QVERIFY(a.Log().contains("accepted: identity hostc"));
    QVERIFY(Denied(a, io, "y", hostc, "hostc"));
    auto rx = RemoteDevice::Connect(io.io, Options(a.port(), "x", reader));
    QVERIFY2(rx.ok(), rx.status().ToString().c_str());
    QVERIFY(rx.value()->Info().read_only);
    auto ry = RemoteDevice::Connect(io.io, Options(a.port(), "y", reader));
    QVERIFY2(ry.ok(), ry.status().ToString().c_str());
    QVERIFY(!ry.value()->Info().read_only);
    for (auto* r : {&x, &rx, &ry}) r->value()->Close();
    QCOMPARE(a.Terminate(), 0);
  }
};

DST_TEST_MAIN(TlsDaemonTest)
#include "tls_daemon_test.moc"
