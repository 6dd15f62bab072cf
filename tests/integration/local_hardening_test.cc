// Local hardening of dstd (issue 11, docs/security.md "Local hardening"), against a real dstd:
// * the control socket is 0660 root:dst (root's group without a dst group); a peer that cannot
//   write it cannot connect; one that can (the mode loosened by hand) but is neither root nor in
//   the group may read (status) and is refused changes with permission_denied, which dstctl
//   prints and exits 77 for; a member of the group may change state.  Peers are real processes
//   that drop to nobody (setgroups/setgid/setuid) in a forked child.
// * `export add` (and local volumes, path legs) accept paths only under [daemon] export_roots
//   (default: the state directory) or named in the config file; /etc/shadow, a ".." path and a
//   symlink out of the root are refused with a reason naming export_roots (dstctl exit 77);
// * files dstd creates (images, dstd.sqlite and its -wal/-shm) are 0600 even under umask 0;
// * an NBD export name with a newline cannot forge a dstd log line (it is logged escaped);
// * a request nested 400,000 deep gets an error and dstd keeps answering;
// * 300,000 pipelined requests whose replies are never read leave dstd's RSS bounded.
#include <QtTest/QtTest>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <grp.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <functional>

#include <nlohmann/json.hpp>

#include "daemon_process.h"
#include "dst/control/control_protocol.h"
#include "raw_control.h"
#include "test_env.h"

using namespace dst::test;
namespace ctl = dst::control;
using nlohmann::json;

namespace {

constexpr uid_t kNobody = 65534;
constexpr gid_t kNogroup = 65534;

// The group dstd gives the socket: "dst", or root's group when there is none.
gid_t ControlGid() {
  group* g = ::getgrnam("dst");
  return g ? g->gr_gid : 0;
}

// One request on a fresh connection; the reply's error code ("" = success, "connect: <errno>"
// when the socket refused us).
std::string Ask(const std::string& path, const std::string& method, const json& params = {}) {
  int err = 0;
  int fd = ConnectUnix(path, &err);
  if (fd < 0) return "connect: " + std::string(std::strerror(err));
  SendAll(fd, ctl::EncodeRequest(1, method, params.is_null() ? json::object() : params));
  auto lines = ReadLines(fd, 1, 30000);
  ::close(fd);
  ctl::Reply r;
  std::string why;
  if (lines.empty() || !ctl::ParseReply(lines[0], &r, &why)) return "no reply";
  return r.ok ? "" : r.error_code + ": " + r.error_message;
}

struct ChildResult {
  int rc = -1;
  std::string out;
};

// Runs `fn` in a forked child as uid/gid nobody with supplementary `groups`; what it returns
// (or writes to stdout/stderr when it execs) comes back in .out.
ChildResult AsNobody(const std::vector<gid_t>& groups, const std::function<std::string()>& fn) {
  int p[2];
  if (::pipe(p) != 0) return {};
  pid_t pid = ::fork();
  if (pid == 0) {
    ::close(p[0]);
    ::dup2(p[1], 1);
    ::dup2(p[1], 2);
    if (::setgroups(groups.size(), groups.data()) != 0 || ::setgid(kNogroup) != 0 ||
        ::setuid(kNobody) != 0 || ::getuid() != kNobody)
      _exit(121);
    std::string s = fn();
    if (::write(1, s.data(), s.size()) < 0) _exit(122);
    _exit(0);
  }
  ::close(p[1]);
  ChildResult r;
  char buf[4096];
  for (ssize_t n; (n = ::read(p[0], buf, sizeof buf)) > 0;) r.out.append(buf, std::size_t(n));
  ::close(p[0]);
  int st = 0;
  ::waitpid(pid, &st, 0);
  r.rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return r;
}

// Execs dstctl (the child is already nobody); returns only if exec failed.
std::string ExecDstctl(const std::string& socket, const std::vector<std::string>& args) {
  std::string bin = BinPath("dstctl");
  std::vector<std::string> all{bin, "--socket", socket};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : all) argv.push_back(a.data());
  argv.push_back(nullptr);
  ::execv(bin.c_str(), argv.data());
  _exit(127);
}

}  // namespace

class LocalHardeningTest : public QObject {
  Q_OBJECT

 private slots:
  void controlSocketPeersAndPermissions() {
    DST_REQUIRE(IsRoot(), "needs root (drops to nobody in forked children)");
    QTemporaryDir dir;
    // nobody must be able to reach the socket through the test's private temp directory.
    QVERIFY(::chmod(dir.path().toLocal8Bit().constData(), 0711) == 0);
    DaemonProcess d(dir.path() + "/a");
    QVERIFY(::chmod(d.state_dir().toLocal8Bit().constData(), 0711) == 0);
    QVERIFY(d.Start());
    const std::string sock = d.control_socket().toStdString();

    struct stat st;
    QVERIFY(::stat(sock.c_str(), &st) == 0);
    QCOMPARE(int(st.st_mode & 07777), 0660);
    QCOMPARE(int(st.st_uid), 0);
    QCOMPARE(int(st.st_gid), int(ControlGid()));

    // Not in the group: the socket's mode keeps nobody out altogether.
    auto r = AsNobody({}, [&] { return Ask(sock, "status"); });
    QCOMPARE(r.rc, 0);
    QCOMPARE(r.out, std::string("connect: Permission denied"));

    // Loosened by hand: nobody connects, may read, may not change.  The peer check, not the
    // file mode, is what refuses.
    QVERIFY(::chmod(sock.c_str(), 0666) == 0);
    r = AsNobody({}, [&] { return Ask(sock, "status"); });
    QCOMPARE(r.out, std::string(""));
    r = AsNobody({}, [&] { return Ask(sock, "array.list"); });
    QCOMPARE(r.out, std::string(""));
    const std::string img = (d.state_dir() + "/e1.img").toStdString();
    r = AsNobody({}, [&] {
      return Ask(sock, "export.add", json{{"name", "e1"}, {"path", img}, {"size", "1M"}});
    });
    QVERIFY2(r.out.rfind("permission_denied: permission denied: export.add changes state and "
                         "needs root or group ", 0) == 0, r.out.c_str());
    QVERIFY2(r.out.find("(peer uid 65534)") != std::string::npos, r.out.c_str());
    QVERIFY(::access(img.c_str(), F_OK) != 0);
    // dstctl says why and exits 77 (EX_NOPERM, docs/control.md).
    r = AsNobody({}, [&] { return ExecDstctl(sock, {"export", "add", "e1", img, "--size", "1M"}); });
    QCOMPARE(r.rc, 77);
    QVERIFY2(r.out.find("permission denied") != std::string::npos, r.out.c_str());
    r = AsNobody({}, [&] { return ExecDstctl(sock, {"status"}); });
    QCOMPARE(r.rc, 0);
    QVERIFY(d.Log().contains("control: refused export.add from uid 65534"));

    // A member of the control group (a supplementary group, as after `adduser alice dst`) may
    // change state; so may root.
    QVERIFY(::chmod(sock.c_str(), 0660) == 0);
    r = AsNobody({ControlGid()}, [&] {
      return Ask(sock, "export.add", json{{"name", "e1"}, {"path", img}, {"size", "1M"}});
    });
    QVERIFY2(r.out.empty(), r.out.c_str());
    QCOMPARE(Ask(sock, "export.remove", json{{"name", "e1"}}), std::string(""));
  }

  void exportRoots() {
    QTemporaryDir dir;
    DaemonProcess d(dir.path() + "/a");
    d.export_roots().clear();  // dstd's default: the state directory
    const QString named = dir.path() + "/named.img";
    QFile f(named);
    QVERIFY(f.open(QIODevice::WriteOnly));
    QVERIFY(f.resize(1 << 20));
    f.close();
    d.config() = "[[export]]\nname = \"cfg\"\npath = \"" + named + "\"\n";
    QVERIFY(d.Start());
    QVERIFY(QFile::link("/etc/shadow", d.state_dir() + "/shadow"));

    QByteArray out, err;
    QCOMPARE(d.Ctl({"export", "add", "s", "/etc/shadow", "--read-only"}, &out, &err), 77);
    QVERIFY2(err.contains("/etc/shadow is outside export_roots (" +
                          QFileInfo(d.state_dir()).canonicalFilePath().toUtf8() + ")"),
             err.constData());
    QCOMPARE(d.Ctl({"export", "add", "s", d.state_dir() + "/shadow", "--read-only"}, &out, &err),
             77);
    QVERIFY2(err.contains("(/etc/shadow) is outside export_roots"), err.constData());
    QCOMPARE(d.Ctl({"export", "add", "s", d.state_dir() + "/../up.img", "--size", "1M"}, &out,
                   &err), 77);
    QVERIFY(!QFile::exists(dir.path() + "/up.img"));
    // Local volumes and path legs follow the same rule.
    QCOMPARE(d.Ctl({"volume", "import", "v", "/etc/shadow"}, &out, &err), 77);
    QCOMPARE(d.Ctl({"array", "create", "m", "--level", "linear", "/etc/shadow"}, &out, &err), 77);
    QVERIFY2(err.contains("outside export_roots"), err.constData());

    // Inside the state directory, or named in the config file: fine.
    QCOMPARE(d.Ctl({"export", "add", "in", d.state_dir() + "/in.img", "--size", "1M"}, &out, &err),
             0);
    QCOMPARE(d.Ctl({"export", "remove", "cfg"}, &out, &err), 0);
    QCOMPARE(d.Ctl({"export", "add", "cfg2", named}, &out, &err), 0);
    QVERIFY2(d.Terminate() == 0, d.Log().constData());

    // Another root from the config.
    QVERIFY(QDir().mkpath(dir.path() + "/r"));
    d.export_roots() = {dir.path() + "/r"};
    QVERIFY(d.Start());
    QCOMPARE(d.Ctl({"export", "add", "r1", dir.path() + "/r/x.img", "--size", "1M"}, &out, &err),
             0);
    QCOMPARE(d.Ctl({"export", "add", "r2", d.state_dir() + "/y.img", "--size", "1M"}, &out, &err),
             77);
  }

  void createdFilesArePrivate() {
    QTemporaryDir dir;
    DaemonProcess d(dir.path() + "/a");
    mode_t old = ::umask(0);  // dstd inherits it
    bool started = d.Start();
    ::umask(old);
    QVERIFY(started);
    QByteArray out, err;
    const QString img = dir.path() + "/new.img";
    QCOMPARE(d.Ctl({"export", "add", "e1", img, "--size", "1M"}, &out, &err), 0);
    // A mirror writes its dirty maps into dstd.sqlite (WAL mode: -wal and -shm appear).
    for (const char* leg : {"/l0.img", "/l1.img"}) {
      QFile l(dir.path() + leg);
      QVERIFY(l.open(QIODevice::WriteOnly));
      QVERIFY(l.resize(16 << 20));
    }
    QVERIFY2(d.Ctl({"array", "create", "m0", "--level", "mirror", dir.path() + "/l0.img",
                    dir.path() + "/l1.img", "--assume-clean"}, &out, &err) == 0,
             err.constData());
    auto mode = [](const QString& p) {
      struct stat st;
      return ::stat(p.toLocal8Bit().constData(), &st) == 0 ? int(st.st_mode & 07777) : -1;
    };
    QCOMPARE(mode(img), 0600);
    QCOMPARE(mode(d.state_dir() + "/dstd.sqlite"), 0600);
    for (const char* j : {"-wal", "-shm"})
      if (QFile::exists(d.state_dir() + "/dstd.sqlite" + j))
        QCOMPARE(mode(d.state_dir() + "/dstd.sqlite" + j), 0600);
    QVERIFY(QFile::exists(d.state_dir() + "/dstd.sqlite-wal"));
    // An existing file dstd is pointed at keeps its mode (it is the operator's).
    const QString mine = dir.path() + "/mine.img";
    QFile f(mine);
    QVERIFY(f.open(QIODevice::WriteOnly));
    QVERIFY(f.resize(1 << 20));
    f.close();
    QVERIFY(::chmod(mine.toLocal8Bit().constData(), 0640) == 0);
    QCOMPARE(d.Ctl({"export", "add", "e2", mine}, &out, &err), 0);
    QCOMPARE(mode(mine), 0640);

    // A database left 0644 by an older dstd is tightened at start.
    QVERIFY(d.Terminate() == 0);
    QVERIFY(::chmod((d.state_dir() + "/dstd.sqlite").toLocal8Bit().constData(), 0644) == 0);
    QVERIFY(d.Start());
    QCOMPARE(mode(d.state_dir() + "/dstd.sqlite"), 0600);
  }

  void peerStringsAreEscapedInLogs() {
    QTemporaryDir dir;
    DaemonProcess d(dir.path() + "/a");
    QVERIFY(d.Start());
    // NBD fixed newstyle by hand: NBD_OPT_EXPORT_NAME of an unknown name, which dstd logs.
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(d.nbd_port());
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    QVERIFY(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    char greeting[18];
    QCOMPARE(::recv(fd, greeting, sizeof greeting, MSG_WAITALL), ssize_t(18));
    const std::string name = "x\n[2099-01-01 00:00:00.000] [dstd] [error] FORGED";
    std::string msg("\0\0\0\1IHAVEOPT\0\0\0\1", 16);
    std::uint32_t len = htonl(std::uint32_t(name.size()));
    msg.append(reinterpret_cast<const char*>(&len), 4);
    msg += name;
    QVERIFY(SendAll(fd, msg));
    char c;
    QCOMPARE(::recv(fd, &c, 1, 0), ssize_t(0));  // closed: EXPORT_NAME cannot report errors
    ::close(fd);
    QTRY_VERIFY_WITH_TIMEOUT(d.Log().contains("EXPORT_NAME for unknown export"), 5000);
    QByteArray log = d.Log();
    QVERIFY2(log.contains("unknown export: x\\x0a[2099-01-01 00:00:00.000] [dstd] [error] FORGED"),
             log.constData());
    for (const QByteArray& line : log.split('\n'))
      QVERIFY2(!line.startsWith("[2099"), line.constData());
  }

  void deepRequestAndUnreadFlood() {
    QTemporaryDir dir;
    DaemonProcess d(dir.path() + "/a");
    QVERIFY(d.Start());
    const std::string sock = d.control_socket().toStdString();

    // 400,000 levels (800 KB, under the 1 MiB line limit) used to overflow dstd's stack.
    int fd = ConnectUnix(sock);
    QVERIFY(fd >= 0);
    QVERIFY(SendAll(fd, DeepRequest("export.list", 400000)));
    QVERIFY(SendAll(fd, ctl::EncodeRequest(2, "status")));
    auto lines = ReadLines(fd, 2, 10000);
    ::close(fd);
    QCOMPARE(lines.size(), std::size_t(2));
    QVERIFY2(lines[0].find("nested deeper than 64 levels") != std::string::npos, lines[0].c_str());
    QVERIFY(d.Running());
    QCOMPARE(Ask(sock, "status"), std::string(""));

    // 300,000 pipelined requests, replies never read: dstd stops reading the connection.
    long rss0 = RssKiB(d.pid());
    fd = ConnectUnix(sock);
    QVERIFY(fd >= 0);
    const int kRequests = 300000;
    bool partial = false;
    int sent = FloodUnread(fd, "status", kRequests, 2000, &partial);
    QThread::msleep(500);
    long grown = RssKiB(d.pid()) - rss0;
    qInfo("dstd took %d of %d unread requests; VmRSS %ld -> %ld KiB (+%ld)", sent, kRequests,
          rss0, rss0 + grown, grown);
    QVERIFY(sent < kRequests);
    QVERIFY2(grown < 64 * 1024, qPrintable(QString("RSS grew %1 KiB").arg(grown)));
    QCOMPARE(Ask(sock, "status"), std::string(""));  // others are still served
    // Reading again resumes it: every complete request is answered.
    QCOMPARE(int(ReadLines(fd, std::size_t(sent), 20000).size()), sent);
    ::close(fd);
  }
};

DST_TEST_MAIN(LocalHardeningTest)
#include "local_hardening_test.moc"
