// dstd under systemd's Type=notify protocol (issue 14 item 3), without systemd: the test owns
// the NOTIFY_SOCKET datagram socket and sets WATCHDOG_USEC, as the service manager would.
// dstd must say READY=1 only once its control socket answers, ping WATCHDOG=1 about every half
// period while its event loop runs, stop pinging while it is stopped (SIGSTOP: a hung daemon),
// and say STOPPING=1 on SIGTERM.
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <QElapsedTimer>
#include <QTemporaryDir>
#include <QtTest/QtTest>

#include <filesystem>

#include "daemon_process.h"
#include "test_env.h"

using namespace dst::test;

namespace {

// A bound AF_UNIX datagram socket; Next() returns the next message (empty on timeout).
class NotifySocket {
 public:
  explicit NotifySocket(const QString& path) : path_(path.toStdString()) {
    fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof a.sun_path, "%s", path_.c_str());
    ok_ = fd_ >= 0 && ::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  }
  ~NotifySocket() {
    if (fd_ >= 0) ::close(fd_);
    ::unlink(path_.c_str());
  }
  bool ok() const { return ok_; }
  QByteArray Next(int timeout_ms) {
    timeval tv{timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char buf[4096];
    const ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
    return n > 0 ? QByteArray(buf, int(n)) : QByteArray();
  }

 private:
  std::string path_;
  int fd_ = -1;
  bool ok_ = false;
};

}  // namespace

class NotifyTest : public QObject {
  Q_OBJECT

 private slots:
  void init() {
    DST_REQUIRE(IsRoot(), "needs root (dstd's FUSE mount)");
    DST_REQUIRE(std::filesystem::exists(BinPath("dstd")), "dstd binary not built");
  }

  void readyWatchdogStopping() {
    QTemporaryDir dir;
    NotifySocket ns(dir.path() + "/notify.sock");
    QVERIFY(ns.ok());
    DaemonProcess d(dir.path() + "/d");
    // The child inherits these (DaemonProcess execs dstd with this environment).
    qputenv("NOTIFY_SOCKET", (dir.path() + "/notify.sock").toUtf8());
    qputenv("WATCHDOG_USEC", "600000");
    struct Unset {
      ~Unset() {
        qunsetenv("NOTIFY_SOCKET");
        qunsetenv("WATCHDOG_USEC");
      }
    } unset;
    QVERIFY2(d.Start(), d.Log().right(2000).constData());  // returns once the control socket answers

    QByteArray m = ns.Next(5000);
    QVERIFY2(m.contains("READY=1"), m.constData());
    QVERIFY2(m.contains(QByteArray("MAINPID=") + QByteArray::number(d.pid())), m.constData());
    // 600 ms watchdog: a ping every ~300 ms.
    QElapsedTimer t;
    t.start();
    int pings = 0;
    while (t.elapsed() < 2000) {
      const QByteArray p = ns.Next(1000);
      QVERIFY2(p == "WATCHDOG=1", p.constData());
      ++pings;
    }
    QVERIFY2(pings >= 4 && pings <= 10, qPrintable(QString("%1 pings in 2 s").arg(pings)));
    // A stopped daemon sends nothing: the service manager would restart it.
    d.Stop();
    while (!ns.Next(100).isEmpty()) {
    }  // what was sent before the stop
    QCOMPARE(ns.Next(1500), QByteArray());
    d.Cont();
    QVERIFY(!ns.Next(3000).isEmpty());
    QCOMPARE(d.Terminate(), 0);
    bool stopping = false;
    for (QByteArray x = ns.Next(3000); !x.isEmpty() && !stopping; x = ns.Next(3000)) stopping = x.contains("STOPPING=1");
    QVERIFY(stopping);
    QVERIFY(d.Log().contains("systemd watchdog: 600 ms"));
  }
};

DST_TEST_MAIN(NotifyTest)
#include "notify_test.moc"
