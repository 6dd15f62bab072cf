// MetricsServer (daemon/src/metrics_server.h): the HTTP side of the metrics endpoint against
// raw sockets: the scrape, the other paths and methods, and bad or hostile clients (a head too
// large, a client that says nothing, more connections than the cap).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <QElapsedTimer>
#include <QtTest/QtTest>

#include <string>

#include "loopback.h"
#include "metrics_server.h"
#include "test_env.h"

using dst::daemon::MetricsServer;
using dst::daemon::MetricsServerOptions;

namespace {

int Dial(std::uint16_t port) { return dst::test::DialLoopback(port); }

// Everything the server sends until it closes (or 5 s pass).
std::string ReadAll(int fd) {
  std::string out;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    out.append(buf, std::size_t(n));
  }
  return out;
}

std::string Request(std::uint16_t port, const std::string& req) {
  const int fd = Dial(port);
  if (fd < 0) return "<connect failed>";
  (void)!::send(fd, req.data(), req.size(), MSG_NOSIGNAL);
  std::string r = ReadAll(fd);
  ::close(fd);
  return r;
}

}  // namespace

class MetricsServerTest : public QObject {
  Q_OBJECT

 private slots:
  void scrapeAndOtherRequests() {
    MetricsServerOptions o;
    int renders = 0;
    auto s = MetricsServer::Start(o, [&] {
      ++renders;
      return std::string("# HELP dst_up Up.\n# TYPE dst_up gauge\ndst_up 1\n");
    });
    QVERIFY2(s.ok(), s.status().ToString().c_str());
    const std::uint16_t port = s.value()->port();
    std::string r = Request(port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    QVERIFY2(r.rfind("HTTP/1.1 200 OK\r\n", 0) == 0, r.c_str());
    QVERIFY(r.find("Content-Type: text/plain; version=0.0.4") != std::string::npos);
    QVERIFY(r.find("\r\n\r\n# HELP dst_up Up.\n# TYPE dst_up gauge\ndst_up 1\n") != std::string::npos);
    const std::string body = "# HELP dst_up Up.\n# TYPE dst_up gauge\ndst_up 1\n";
    QVERIFY(r.find("Content-Length: " + std::to_string(body.size()) + "\r\n") != std::string::npos);
    QCOMPARE(s.value()->scrapes(), std::uint64_t(1));
    r = Request(port, "HEAD /metrics HTTP/1.1\r\n\r\n");
    QVERIFY2(r.rfind("HTTP/1.1 200 OK\r\n", 0) == 0 && r.find("dst_up 1") == std::string::npos, r.c_str());
    QVERIFY(Request(port, "GET /metrics?x=1 HTTP/1.0\r\n\r\n").find("dst_up 1") != std::string::npos);
    QVERIFY(Request(port, "GET / HTTP/1.1\r\n\r\n").find("/metrics") != std::string::npos);
    QVERIFY(Request(port, "GET /secret HTTP/1.1\r\n\r\n").rfind("HTTP/1.1 404", 0) == 0);
    QVERIFY(Request(port, "POST /metrics HTTP/1.1\r\n\r\n").rfind("HTTP/1.1 405", 0) == 0);
    QVERIFY(Request(port, "garbage\r\n\r\n").rfind("HTTP/1.1 400", 0) == 0);
    QCOMPARE(renders, 3);  // GET, HEAD, GET?x=1
  }

  void hostileClients() {
    MetricsServerOptions o;
    o.head_timeout = std::chrono::milliseconds(300);
    o.max_head = 1024;
    o.max_connections = 2;
    auto s = MetricsServer::Start(o, [] { return std::string("dst_up 1\n"); });
    QVERIFY(s.ok());
    const std::uint16_t port = s.value()->port();
    // A head over the cap: 431, closed.
    QVERIFY(Request(port, "GET /metrics HTTP/1.1\r\nX: " + std::string(4096, 'a') + "\r\n\r\n").rfind("HTTP/1.1 431", 0) == 0);
    // Silent clients are closed at the head deadline; while two are held, a third is closed at once.
    const int a = Dial(port), b = Dial(port);
    QVERIFY(a >= 0 && b >= 0);
    QTest::qWait(50);
    QElapsedTimer t;
    t.start();
    QCOMPARE(Request(port, "GET /metrics HTTP/1.1\r\n\r\n"), std::string());
    QVERIFY(t.elapsed() < 250);
    t.restart();
    QCOMPARE(ReadAll(a), std::string());  // closed by the deadline
    QVERIFY2(t.elapsed() < 2000, qPrintable(QString::number(t.elapsed())));
    ReadAll(b);
    ::close(a);
    ::close(b);
    QTest::qWait(50);
    QVERIFY(Request(port, "GET /metrics HTTP/1.1\r\n\r\n").find("dst_up 1") != std::string::npos);
  }

  void listenErrors() {
    MetricsServerOptions o;
    o.host = "not-an-address";
    QVERIFY(!MetricsServer::Start(o, [] { return std::string(); }).ok());
    MetricsServerOptions first;
    auto s = MetricsServer::Start(first, [] { return std::string(); });
    QVERIFY(s.ok());
    MetricsServerOptions same;
    same.port = s.value()->port();
    // reuse_address does not allow two listeners on one port.
    QVERIFY(!MetricsServer::Start(same, [] { return std::string(); }).ok());
  }
};

DST_TEST_MAIN(MetricsServerTest)
#include "metrics_server_test.moc"
