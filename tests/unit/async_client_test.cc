// The asynchronous control client (dst/control/async_client.h) against a fake dstd on a Unix
// socket in a temp dir: replies matched by id when they come back out of order, events on the
// same connection in order with last_seq, calls still answered while subscribed, pending calls
// failed when the server goes away, connect errors, and dstd's error replies.
#include <QtTest/QtTest>

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <future>
#include <thread>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include "dst/control/async_client.h"
#include "dst/control/control_protocol.h"

namespace ctl = dst::control;
using nlohmann::json;

namespace {

// A blocking one-connection server driven by the test: accept, read request lines, write lines.
class FakeServer {
 public:
  explicit FakeServer(const std::string& path) : path_(path) {
    lfd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::memcpy(a.sun_path, path.data(), path.size());
    ok_ = ::bind(lfd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 && ::listen(lfd_, 4) == 0;
  }
  ~FakeServer() {
    CloseConn();
    if (lfd_ >= 0) ::close(lfd_);
  }
  bool ok() const { return ok_; }
  bool Accept() {
    fd_ = ::accept4(lfd_, nullptr, nullptr, SOCK_CLOEXEC);
    return fd_ >= 0;
  }
  // Next request line as JSON (null on EOF).
  json ReadRequest() {
    std::string line;
    for (;;) {
      if (splitter_.Pop(&line) == ctl::LineSplitter::Next::kLine) return json::parse(line);
      char buf[4096];
      ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
      if (n <= 0) return json();
      splitter_.Append(buf, std::size_t(n));
    }
  }
  void Send(const std::string& line) {
    std::size_t off = 0;
    while (off < line.size()) {
      ssize_t n = ::send(fd_, line.data() + off, line.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return;
      off += std::size_t(n);
    }
  }
  void SendJson(const json& j) { Send(j.dump() + "\n"); }
  void CloseConn() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  std::string path_;
  int lfd_ = -1, fd_ = -1;
  bool ok_ = false;
  ctl::LineSplitter splitter_;
};

// An io_context on its own thread, as the GUI would run it.
struct IoThread {
  boost::asio::io_context io;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work{io.get_executor()};
  std::thread t{[this] { io.run(); }};
  ~IoThread() {
    work.reset();
    io.stop();
    t.join();
  }
};

template <typename T>
bool Ready(std::future<T>& f, int ms = 5000) {
  return f.wait_for(std::chrono::milliseconds(ms)) == std::future_status::ready;
}

// An io thread, a fake server at `path` and a client connected to it (ok() when all worked).
struct Session {
  IoThread io;
  FakeServer srv;
  std::shared_ptr<ctl::AsyncControlClient> c;
  bool connected = false;
  explicit Session(const std::string& path) : srv(path) {
    if (!srv.ok()) return;
    c = ctl::AsyncControlClient::Create(io.io.get_executor());
    std::promise<std::error_code> conn;
    c->Connect(path, [&](std::error_code ec) { conn.set_value(ec); });
    if (!srv.Accept()) return;
    auto f = conn.get_future();
    connected = Ready(f) && !f.get();
  }
  bool ok() const { return connected; }
};

}  // namespace

class AsyncClientTest : public QObject {
  Q_OBJECT
 private:
  QTemporaryDir dir_;
  std::string Sock(const char* name) { return (dir_.path() + "/" + name).toStdString(); }

 private slots:
  void repliesMatchedByIdOutOfOrder() {
    Session se(Sock("a.sock"));
    QVERIFY(se.ok());
    auto& srv = se.srv;
    auto& c = se.c;
    std::promise<ctl::AsyncControlClient::CallResult> p1, p2;
    std::uint64_t id1 = c->Call("status", json::object(), [&](auto r) { p1.set_value(r); });
    std::uint64_t id2 = c->Call("volume.list", json{{"x", 1}}, [&](auto r) { p2.set_value(r); });
    QVERIFY(id1 != id2);
    json r1 = srv.ReadRequest(), r2 = srv.ReadRequest();
    QCOMPARE(r1["method"], json("status"));
    QCOMPARE(r1["id"], json(id1));
    QCOMPARE(r2["method"], json("volume.list"));
    QCOMPARE(r2["params"]["x"], json(1));
    // Second first.
    srv.Send(ctl::EncodeResult(r2["id"], json{{"volumes", json::array()}}));
    srv.Send(ctl::EncodeError(r1["id"], ctl::kBusy, "try later"));
    auto f1 = p1.get_future(), f2 = p2.get_future();
    QVERIFY(Ready(f2) && Ready(f1));
    auto a2 = f2.get(), a1 = f1.get();
    QVERIFY(a2.delivered && a2.reply.ok);
    QVERIFY(a2.reply.result["volumes"].is_array());
    QVERIFY(a1.delivered && !a1.reply.ok);
    QCOMPARE(a1.reply.error_code, std::string("busy"));
    QCOMPARE(a1.reply.error_message, std::string("try later"));
  }

  void eventsInOrderAndCallsWhileSubscribed() {
    Session se(Sock("b.sock"));
    QVERIFY(se.ok());
    auto& srv = se.srv;
    auto& c = se.c;
    std::mutex mu;
    std::vector<json> events;
    std::promise<void> got3;
    std::promise<ctl::AsyncControlClient::CallResult> sub;
    c->Subscribe(
        41,
        [&](const json& e) {
          std::lock_guard<std::mutex> l(mu);
          events.push_back(e);
          if (events.size() == 3) got3.set_value();
        },
        [&](auto r) { sub.set_value(r); });
    json req = srv.ReadRequest();
    QCOMPARE(req["method"], json("events"));
    QCOMPARE(req["params"]["since"], json(41));
    srv.Send(ctl::EncodeResult(req["id"], json{{"subscribed", true}, {"last_seq", 43}}));
    srv.SendJson(json{{"type", "leg_state"}, {"seq", 42}, {"ts", 1.0}, {"state", "failed"}});
    // A call on the subscribed connection, answered between two events.
    std::promise<ctl::AsyncControlClient::CallResult> st;
    c->Call("status", json::object(), [&](auto r) { st.set_value(r); });
    json sreq = srv.ReadRequest();
    srv.SendJson(json{{"type", "leg_state"}, {"seq", 43}, {"ts", 1.1}, {"state", "resyncing"}});
    srv.Send(ctl::EncodeResult(sreq["id"], json{{"version", 1}}));
    // An event may carry an "error" member (a failed apply_step): still an event, no reply.
    srv.SendJson(json{{"type", "apply_step"}, {"seq", 44}, {"ts", 1.2}, {"status", "failed"},
                      {"error", "connection refused"}});
    auto fs = sub.get_future(), fst = st.get_future();
    auto f3 = got3.get_future();
    QVERIFY(Ready(fs) && Ready(fst) && Ready(f3));
    QVERIFY(fs.get().reply.result["subscribed"].get<bool>());
    QCOMPARE(fst.get().reply.result["version"], json(1));
    std::lock_guard<std::mutex> l(mu);
    QCOMPARE(events.size(), std::size_t{3});
    QCOMPARE(events[0]["seq"], json(42));
    QCOMPARE(events[1]["state"], json("resyncing"));
    QCOMPARE(events[2]["type"], json("apply_step"));
    QCOMPARE(c->last_seq(), std::uint64_t{44});
  }

  void pendingCallsFailWhenTheServerGoesAway() {
    Session se(Sock("c.sock"));
    QVERIFY(se.ok());
    auto& srv = se.srv;
    auto& c = se.c;
    std::promise<std::string> closed;
    c->OnClose([&](const std::string& why) { closed.set_value(why); });
    std::promise<ctl::AsyncControlClient::CallResult> p;
    c->Call("array.verify", json{{"name", "m0"}}, [&](auto r) { p.set_value(r); });
    QCOMPARE(srv.ReadRequest()["method"], json("array.verify"));
    srv.CloseConn();
    auto f = p.get_future();
    QVERIFY(Ready(f));
    auto r = f.get();
    QVERIFY(!r.delivered);
    QVERIFY2(r.error.find("closed") != std::string::npos, r.error.c_str());
    auto fc = closed.get_future();
    QVERIFY(Ready(fc));
    QVERIFY(!fc.get().empty());
    // After close: a call fails at once, it is not queued forever.
    std::promise<ctl::AsyncControlClient::CallResult> late;
    c->Call("status", json::object(), [&](auto r2) { late.set_value(r2); });
    auto fl = late.get_future();
    QVERIFY(Ready(fl));
    QVERIFY(!fl.get().delivered);
  }

  void garbageClosesTheConnection() {
    Session se(Sock("d.sock"));
    QVERIFY(se.ok());
    auto& srv = se.srv;
    auto& c = se.c;
    std::promise<ctl::AsyncControlClient::CallResult> p;
    c->Call("status", json::object(), [&](auto r) { p.set_value(r); });
    srv.ReadRequest();
    srv.Send("{\"id\":999,\"result\":{}}\n");  // an id this client never used
    auto f = p.get_future();
    QVERIFY(Ready(f));
    auto r = f.get();
    QVERIFY(!r.delivered);
    QVERIFY2(r.error.find("unknown request id") != std::string::npos, r.error.c_str());
  }

  void connectErrors() {
    IoThread io;
    auto c = ctl::AsyncControlClient::Create(io.io.get_executor());
    std::promise<std::error_code> conn;
    c->Connect(Sock("missing.sock"), [&](std::error_code ec) { conn.set_value(ec); });
    auto f = conn.get_future();
    QVERIFY(Ready(f));
    QCOMPARE(f.get().value(), ENOENT);
    // Never connected: calls fail instead of hanging.
    auto c2 = ctl::AsyncControlClient::Create(io.io.get_executor());
    std::promise<ctl::AsyncControlClient::CallResult> p;
    c2->Call("status", json::object(), [&](auto r) { p.set_value(r); });
    auto fp = p.get_future();
    QVERIFY(Ready(fp));
    QCOMPARE(fp.get().error, std::string("not connected"));
  }
};

QTEST_GUILESS_MAIN(AsyncClientTest)
#include "async_client_test.moc"
