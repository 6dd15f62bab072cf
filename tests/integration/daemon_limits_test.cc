// dstd's [limits] reach both servers (issue 11 item 3): a connection over
// max_connections_per_address is closed at once, a handshake that does not finish within
// handshake_timeout is closed, and `dstctl status --json` counts each (connections_refused,
// connections_timed_out).  The caps themselves are tested in tests/unit/server_core_test.cc;
// this checks the config wiring.
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <QTemporaryDir>
#include <QtTest/QtTest>

#include <nlohmann/json.hpp>

#include "daemon_process.h"
#include "loopback.h"
#include "test_env.h"

using nlohmann::json;

namespace {

json Status(dst::test::DaemonProcess& d) {
  QByteArray out;
  if (d.Ctl({"status", "--json"}, &out) != 0) return json();
  return json::parse(out.toStdString(), nullptr, false);
}

// Milliseconds until the server closes fd (EOF or reset; data is skipped), -1 after `limit_ms`.
long MsUntilClosed(int fd, int limit_ms) {
  QElapsedTimer t;
  t.start();
  char b[512];
  while (t.elapsed() < limit_ms) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 50) <= 0) continue;
    const ssize_t r = ::recv(fd, b, sizeof b, MSG_DONTWAIT);
    if (r == 0 || (r < 0 && errno != EAGAIN)) return long(t.elapsed());
  }
  return -1;
}

std::uint64_t Counter(const json& st, const char* server, const char* key) {
  const json& s = st.value(server, json::object());
  return s.contains(key) && s[key].is_number() ? s[key].get<std::uint64_t>() : ~0ull;
}

}  // namespace

class DaemonLimitsTest : public QObject {
  Q_OBJECT

 private slots:
  void limitsFromConfig() {
    QTemporaryDir dir;
    QVERIFY(dir.isValid());
    dst::test::DaemonProcess d(dir.path() + "/a");
    d.config() = QString("[limits]\nhandshake_timeout = 1\nmax_connections_per_address = 2\n\n"
                         "[[export]]\nname = \"disk\"\npath = \"%1/disk.img\"\nsize = \"16M\"\n")
                     .arg(dir.path());
    QVERIFY(d.Start());
    for (auto [port, server] : {std::pair<quint16, const char*>{d.nbd_port(), "nbd"}, {d.port(), "exporter"}}) {
      const int a = dst::test::DialLoopback(port), b = dst::test::DialLoopback(port);
      QVERIFY(a >= 0 && b >= 0);
      QTRY_COMPARE_WITH_TIMEOUT(Counter(Status(d), server, server == std::string("nbd") ? "connections" : "connections_open"),
                                2ull, 5000);
      const int c = dst::test::DialLoopback(port);  // the third from 127.0.0.1
      QVERIFY(c >= 0);
      const long refused = MsUntilClosed(c, 3000);
      QVERIFY2(refused >= 0 && refused < 1000, qPrintable(QString("%1: refused after %2 ms").arg(server).arg(refused)));
      // The two held ones never finish a handshake: closed at the 1 s deadline.
      const long deadline = MsUntilClosed(a, 5000);
      QVERIFY2(deadline >= 0, qPrintable(QString("%1: held connection not closed").arg(server)));
      QVERIFY(MsUntilClosed(b, 3000) >= 0);
      const json st = Status(d);
      QCOMPARE(Counter(st, server, "connections_refused"), 1ull);
      QCOMPARE(Counter(st, server, "connections_timed_out"), 2ull);
      ::close(a);
      ::close(b);
      ::close(c);
    }
    QCOMPARE(d.Terminate(), 0);
  }
};

DST_TEST_MAIN(DaemonLimitsTest)
#include "daemon_limits_test.moc"
