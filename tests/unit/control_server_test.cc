// ControlServer's limits (daemon/src/control_server.h): a deeply nested request is refused and
// the connection keeps working; a client that pipelines requests without reading replies is
// stopped being read (memory stays bounded) and gets every reply once it reads; an events-like
// stream to a client that never reads is cut at kDropBytes with a final too_slow error.
#include <QtTest/QtTest>

#include <unistd.h>

#include <atomic>
#include <thread>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include "control_server.h"
#include "raw_control.h"
#include "test_env.h"

namespace ctl = dst::control;
using dst::daemon::ControlServer;
using nlohmann::json;
using namespace dst::test;

namespace {

// A ControlServer on its own io thread whose handler answers every request with a `pad`-byte
// result; `events` streams lines until the reply function says the client is gone.
struct Rig {
  boost::asio::io_context io;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work;
  std::thread thread;
  QTemporaryDir dir;
  std::string path;
  std::unique_ptr<ControlServer> server;
  std::size_t pad = 4096;
  std::atomic<std::uint64_t> events_sent{0};
  std::atomic<bool> events_refused{false};

  bool Start() {
    path = dir.path().toStdString() + "/c.sock";
    server = std::make_unique<ControlServer>(io, path, [this](ctl::Request req,
                                                              ControlServer::ReplyFn reply) {
      reply(ctl::EncodeResult(req.id, json{{"pad", std::string(pad, 'x')}}));
      if (req.method != "events") return;
      std::string line = json{{"type", "x"}, {"pad", std::string(64 << 10, 'e')}}.dump() + "\n";
      for (int i = 0; i < 2000; ++i) {  // 128 MiB if nothing stopped it
        if (!reply(line)) {
          events_refused = true;
          return;
        }
        ++events_sent;
      }
    }, "");
    if (!server->Start().ok()) return false;
    work.emplace(io.get_executor());
    thread = std::thread([this] { io.run(); });
    return true;
  }
  ~Rig() {
    if (server) server->Stop();
    work.reset();
    io.stop();
    if (thread.joinable()) thread.join();
  }
};

}  // namespace

class ControlServerTest : public QObject {
  Q_OBJECT

 private slots:
  void deepRequestIsRefusedAndTheConnectionLives() {
    Rig rig;
    QVERIFY(rig.Start());
    int fd = ConnectUnix(rig.path);
    QVERIFY(fd >= 0);
    QVERIFY(SendAll(fd, DeepRequest("status", 400000)));
    QVERIFY(SendAll(fd, ctl::EncodeRequest(2, "status")));
    auto lines = ReadLines(fd, 2);
    QCOMPARE(lines.size(), std::size_t(2));
    ctl::Reply r;
    std::string why;
    QVERIFY(ctl::ParseReply(lines[0], &r, &why));
    QCOMPARE(r.error_code, std::string(ctl::kInvalidRequest));
    QVERIFY(ctl::ParseReply(lines[1], &r, &why));
    QVERIFY(r.ok);
    QCOMPARE(r.id, json(2));
    ::close(fd);
  }

  // 300,000 pipelined requests whose 4 KiB replies are not read: without back-pressure the
  // server would queue ~1.2 GB.  The client writes until the socket stays full for a second.
  void pipelinedUnreadRepliesStayBounded() {
    Rig rig;
    QVERIFY(rig.Start());
    int fd = ConnectUnix(rig.path);
    QVERIFY(fd >= 0);
    long rss0 = RssKiB(::getpid());
    const int kRequests = 300000;
    bool partial = false;
    int sent = FloodUnread(fd, "status", kRequests, 1000, &partial);
    QThread::msleep(300);
    long grown_kib = RssKiB(::getpid()) - rss0;
    qInfo("sent %d of %d requests before the server stopped reading; RSS grew %ld KiB", sent,
          kRequests, grown_kib);
    QVERIFY2(sent < kRequests, "the server read everything without its replies being read");
    QVERIFY(grown_kib < 64 * 1024);
    // A second client is still served.
    int other = ConnectUnix(rig.path);
    QVERIFY(SendAll(other, ctl::EncodeRequest("o", "hello")));
    QCOMPARE(ReadLines(other, 1).size(), std::size_t(1));
    ::close(other);
    // Reading resumes the paused connection: every complete request gets its reply.
    auto lines = ReadLines(fd, std::size_t(sent), 10000);
    QCOMPARE(int(lines.size()), sent);
    ::close(fd);
  }

  void slowEventsSubscriberIsDropped() {
    Rig rig;
    rig.pad = 10;
    QVERIFY(rig.Start());
    int fd = ConnectUnix(rig.path);
    QVERIFY(fd >= 0);
    long rss0 = RssKiB(::getpid());
    QVERIFY(SendAll(fd, ctl::EncodeRequest(1, "events")));
    QVERIFY(WaitUntilRefused(rig));
    long grown_kib = RssKiB(::getpid()) - rss0;
    std::uint64_t sent_mib = (rig.events_sent.load() * (64 << 10)) >> 20;
    qInfo("events accepted before the drop: %llu (%llu MiB); RSS grew %ld KiB",
          (unsigned long long)rig.events_sent.load(), (unsigned long long)sent_mib, grown_kib);
    QVERIFY(sent_mib <= (ControlServer::kDropBytes >> 20) + 2);
    // What was queued arrives, then one too_slow error, then EOF.
    auto lines = ReadLines(fd, 100000, 3000);
    QVERIFY(!lines.empty());
    ctl::Reply r;
    std::string why;
    QVERIFY2(ctl::ParseReply(lines.back(), &r, &why), lines.back().substr(0, 200).c_str());
    QCOMPARE(r.error_code, std::string(ctl::kTooSlow));
    char c;
    QCOMPARE(::read(fd, &c, 1), ssize_t(0));
    ::close(fd);
  }

 private:
  static bool WaitUntilRefused(Rig& rig) {
    QElapsedTimer t;
    t.start();
    while (t.elapsed() < 10000) {
      if (rig.events_refused) return true;
      QThread::msleep(10);
    }
    return false;
  }
};

DST_TEST_MAIN(ControlServerTest)
#include "control_server_test.moc"
