// Unit tests for the server-connection core (netdriver/src/server_core.h) through a toy protocol
// defined here, so what is tested is the core alone: counters, the stall sweep, Drain waiting for
// in-flight requests and the flush-at-shutdown rule, pool backpressure, payload discard.
//
// Toy protocol (16-byte request header: u8 op, 3 pad, u32 len, u64 id; reply: u32 status, u64 id,
// then the data of a read):
//   'H' + name (len bytes): handshake, attaches the export; reply status 0 or ENOENT.
//   'W' + len bytes: write at 0.   'R': read len bytes at 0.   'F': flush.
//   'Y' + len bytes: refused write (payload discarded, EINVAL).
//   'I': claims the identity "id<id>" (ServerCore::ClaimIdentity): 0 or EBUSY.   other: EINVAL.
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include "fake_device.h"
#include "server_core.h"
#include "loopback.h"
#include "slow_reader.h"
#include "test_env.h"

using namespace dst;
using namespace dst::net;
namespace asio = boost::asio;

namespace {

constexpr std::size_t kReq = 16;
constexpr std::size_t kRep = 12;

void PutU32(std::uint8_t* p, std::uint32_t v) { std::memcpy(p, &v, 4); }
void PutU64(std::uint8_t* p, std::uint64_t v) { std::memcpy(p, &v, 8); }
std::uint32_t GetU32(const std::uint8_t* p) {
  std::uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
std::uint64_t GetU64(const std::uint8_t* p) {
  std::uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

struct ToyReq : ServerReq {
  char op = 0;
  std::uint32_t len = 0;
  std::uint64_t id = 0;
  TxFrame tx;
};

class ToyServer;

class ToyConn : public ServerConn {
 public:
  ToyConn(std::shared_ptr<ServerCore> core, std::unique_ptr<Transport> t)
      : ServerConn(std::move(core), std::move(t)), slots_(MakeSlots<ToyReq>()) {}

 private:
  bool FramesInHandshake() const override { return true; }
  std::size_t FrameSize() const override { return kReq; }
  const char* HandshakeStall() const override { return "no handshake"; }

  void HandleFrame(const std::uint8_t* h) override {
    const char op = static_cast<char>(h[0]);
    const std::uint32_t len = GetU32(h + 4);
    if (phase_ == Phase::kHandshake) {
      if (op != 'H' || len == 0 || len > sizeof name_) {
        ProtocolViolation("bad handshake", nullptr);
        return BeginClose(false);
      }
      hello_id_ = GetU64(h + 8);
      name_len_ = len;
      ReadBody(name_, len, nullptr, &ToyConn::OnName);
      return;
    }
    CountRequest();
    auto* r = static_cast<ToyReq*>(TakeSlot());
    r->op = op;
    r->len = len;
    r->id = GetU64(h + 8);
    switch (op) {
      case 'W':
      case 'R':
        return AcquireBuffer(r);
      case 'F':
        return Submit(r, IoOp::kFlush, 0, 0, 0);
      case 'Y':
        r->status = EINVAL;
        return DiscardPayload(r, len);
      case 'I':
        r->status = core_->ClaimIdentity(this, "id" + std::to_string(r->id)).ok() ? 0 : EBUSY;
        return Reply(r);
      default:
        r->status = EINVAL;
        return Reply(r);
    }
  }

  void OnName(const boost::system::error_code& ec, ServerReq*) {
    if (ec) return BeginClose(false);
    auto e = core_->FindExport(std::string(name_, name_len_));
    hello_.status = (e && core_->Attach(this, e)) ? 0 : ENOENT;
    hello_.id = hello_id_;
    hello_.frames = &hello_.tx;
    PrepareReply(&hello_);
    hello_.tx.on_sent = [](TxFrame* f, bool) { static_cast<ToyConn*>(f->owner)->FrameSent(); };
    hello_.tx.owner = this;
    if (hello_.status == 0) phase_ = Phase::kServing;
    Send(&hello_.tx);
    if (hello_.status != 0) BeginClose(false);
  }

  void StartData(ServerReq* req) override {
    auto* r = static_cast<ToyReq*>(req);
    if (r->op == 'R') return Submit(r, IoOp::kRead, 0, 0, r->len);
    ReceivePayload(r, r->len);
  }
  void OnPayload(ServerReq* req) override {
    auto* r = static_cast<ToyReq*>(req);
    Submit(r, IoOp::kWrite, 0, 0, r->len);
  }
  void OnDeviceDone(ServerReq* r, const Status& st) override { r->status = static_cast<std::uint32_t>(st.ToErrno()); }
  void PrepareReply(ServerReq* req) override {
    auto* r = static_cast<ToyReq*>(req);
    PutU32(r->tx.header, r->status);
    PutU64(r->tx.header + 4, r->id);
    r->tx.header_len = kRep;
    r->tx.payload = r->status == 0 && r->op == 'R' ? r->buf : nullptr;
    r->tx.payload_len = r->tx.payload ? r->len : 0;
    r->frames = &r->tx;
    r->frames_out = 1;
  }

  std::unique_ptr<ToyReq[]> slots_;
  char name_[64];
  std::uint32_t name_len_ = 0;
  std::uint64_t hello_id_ = 0;
  ToyReq hello_;
};

class ToyServer : public ServerCore {
 public:
  ToyServer(asio::io_context& io, detail::ServerCoreOptions o) : ServerCore(io, o) {}
  std::shared_ptr<ServerConn> NewConn(std::unique_ptr<Transport> t) override {
    return std::make_shared<ToyConn>(shared_from_this(), std::move(t));
  }
};

struct ToyExport : ServedExport {};

// A running toy server on 127.0.0.1 with one io thread.
struct Rig {
  asio::io_context io;
  asio::executor_work_guard<asio::io_context::executor_type> work{io.get_executor()};
  std::thread thread;
  std::shared_ptr<ToyServer> srv;

  bool Start(detail::ServerCoreOptions o) {
    o.listen_address = "127.0.0.1";
    o.port = 0;
    o.log_name = "toy";
    srv = std::make_shared<ToyServer>(io, o);
    if (!srv->Start().ok()) return false;
    thread = std::thread([this] { io.run(); });
    return true;
  }
  Status Add(const std::string& name, std::shared_ptr<BlockDevice> dev, bool read_only = false) {
    auto e = std::make_shared<ToyExport>();
    e->Init(name, std::move(dev), read_only);
    return srv->AddExport(std::move(e));
  }
  ~Rig() {
    if (srv) srv->Shutdown();
    srv.reset();
    work.reset();
    // Let Shutdown's posted handlers run (they close the listener and the connections, whose
    // pending handlers hold the server): stopping the loop first leaks the server (LeakSanitizer).
    for (int i = 0; i < 1000 && !io.stopped(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    io.stop();
    if (thread.joinable()) thread.join();
  }
};

struct Client {
  int fd = -1;
  ~Client() {
    if (fd >= 0) ::close(fd);
  }
  bool Connect(std::uint16_t port) {
    fd = test::DialLoopback(port);
    return fd >= 0;
  }
  // With a 4 KiB receive buffer: replies the client does not read wait in the server.
  bool ConnectSmallWindow(std::uint16_t port) {
    fd = test::DialLoopback(port, 4096);
    return fd >= 0;
  }
  bool ConnectFrom(const char* source, std::uint16_t port) {
    fd = test::DialLoopbackFrom(source, port);
    return fd >= 0;
  }
  // A write and a read of 4 KiB that come back intact: the connection is served.
  bool Io(std::uint64_t id) {
    std::vector<char> w(4096, char('a' + id % 26)), r(4096);
    return Send('W', id, 4096, w.data()) && Recv() == 0 && Send('R', id + 1, 4096) &&
           Recv(nullptr, r.data(), r.size()) == 0 && r == w;
  }
  bool SendRaw(const void* p, std::size_t n) { return ::send(fd, p, n, MSG_NOSIGNAL) == ssize_t(n); }
  bool Send(char op, std::uint64_t id, std::uint32_t len, const void* payload = nullptr, std::size_t send_len = ~0ul) {
    std::uint8_t h[kReq] = {};
    h[0] = static_cast<std::uint8_t>(op);
    PutU32(h + 4, len);
    PutU64(h + 8, id);
    if (!SendRaw(h, kReq)) return false;
    if (!payload) return true;
    return SendRaw(payload, send_len == ~0ul ? len : send_len);
  }
  // n READs of len bytes in one send: the server parses them as one burst.
  bool SendReads(int n, std::uint32_t len) {
    std::vector<std::uint8_t> b(kReq * std::size_t(n));
    for (int i = 0; i < n; ++i) {
      b[kReq * i] = 'R';
      PutU32(&b[kReq * i + 4], len);
      PutU64(&b[kReq * i + 8], 100 + i);
    }
    return SendRaw(b.data(), b.size());
  }
  bool RecvAll(void* p, std::size_t n) { return test::RecvFull(fd, p, n); }
  // Returns the reply status (or ~0u when the connection ended); *id gets its id.
  std::uint32_t Recv(std::uint64_t* id = nullptr, void* data = nullptr, std::size_t len = 0) {
    std::uint8_t r[kRep];
    if (!RecvAll(r, kRep)) return ~0u;
    if (id) *id = GetU64(r + 4);
    const std::uint32_t st = GetU32(r);
    if (st == 0 && data && !RecvAll(data, len)) return ~0u;
    return st;
  }
  bool Hello(const std::string& name) { return Send('H', 1, std::uint32_t(name.size()), name.data()) && Recv() == 0; }
  // True when the server closed the connection (EOF), waiting up to 20 s.
  bool SeesEof() {
    char b[256];
    for (;;) {
      const ssize_t r = ::recv(fd, b, sizeof b, 0);
      if (r == 0) return true;
      if (r < 0) return false;  // timeout or reset
    }
  }
  // Milliseconds until the server closes the connection (EOF or reset), or -1 after 10 s.
  long MsUntilClosed() {
    const auto t0 = std::chrono::steady_clock::now();
    char b[256];
    for (;;) {
      const ssize_t r = ::recv(fd, b, sizeof b, 0);
      if (r > 0) continue;
      if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return -1;
      return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
    }
  }
  // True when nothing arrives within `ms` (a negative check: it can pass wrongly, never fail wrongly).
  bool Quiet(int ms) {
    pollfd p{fd, POLLIN, 0};
    return ::poll(&p, 1, ms) == 0;
  }
};

template <typename F>
bool WaitFor(F pred, int seconds = 20) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return pred();
}

// The fairness tests' server: 16 buffers of 64 KiB (reserve 2), the stall check out of the way,
// a drain window of 0.5 s.
detail::ServerCoreOptions SmallPool(std::uint64_t min_drain_rate) {
  auto o = test::DrainTestOptions<detail::ServerCoreOptions>(min_drain_rate);
  o.buffer_size = 65536;
  return o;
}

ServerStats StatsOf(const ServerCore& s) {
  ServerStats st;
  s.FillStats(&st);
  return st;
}

}  // namespace

class ServerCoreTest : public QObject {
  Q_OBJECT
 private slots:
  void servesAndCounts() {
    Rig rig;
    QVERIFY(rig.Start({}));
    auto dev = std::make_shared<test::FakeDevice>();
    QVERIFY(rig.Add("a", dev).ok());
    QCOMPARE(rig.Add("a", dev).code(), Status::Code::kExists);

    Client c;
    QVERIFY(c.Connect(rig.srv->port()));
    QVERIFY(c.Hello("a"));
    std::vector<char> w(4096, 'q'), r(4096);
    QVERIFY(c.Send('W', 7, 4096, w.data()));
    std::uint64_t id = 0;
    QCOMPARE(c.Recv(&id), 0u);
    QCOMPARE(id, 7ull);
    QVERIFY(c.Send('R', 8, 4096));
    QCOMPARE(c.Recv(&id, r.data(), r.size()), 0u);
    QVERIFY(r == w);
    QVERIFY(c.Send('Z', 9, 0));  // unknown: an error reply, the connection stays
    QCOMPARE(c.Recv(&id), std::uint32_t(EINVAL));
    QVERIFY(c.Send('Y', 10, 20000, std::vector<char>(20000, 'x').data()));  // refused WRITE: payload discarded
    QCOMPARE(c.Recv(&id), std::uint32_t(EINVAL));
    QCOMPARE(id, 10ull);
    QVERIFY(c.Send('R', 11, 4096));  // the stream is still in sync
    QCOMPARE(c.Recv(&id, r.data(), r.size()), 0u);
    QCOMPARE(id, 11ull);

    ServerStats st = StatsOf(*rig.srv);
    QCOMPARE(st.connections_total, 1ull);
    QCOMPARE(st.connections_open, 1);
    QCOMPARE(st.requests, 5ull);
    QCOMPARE(st.errors_replied, 2ull);
    QCOMPARE(st.protocol_errors, 0ull);
    QVERIFY(WaitFor([&] { return StatsOf(*rig.srv).frames_sent == 6; }));  // 5 replies + the handshake's
    int seen = 0;
    rig.srv->VisitExports([&](const ServedExport& e, const ExportCounters& k) {
      ++seen;
      QCOMPARE(e.name, std::string("a"));
      QCOMPARE(k.connections, 1);
      QCOMPARE(k.requests, 5ull);
    });
    QCOMPARE(seen, 1);
    QCOMPARE(rig.srv->RemoveExport("a").code(), Status::Code::kBusy);

    // Closing keeps the totals (folded into the closed counters) and frees the export.
    ::close(c.fd);
    c.fd = -1;
    QVERIFY(WaitFor([&] { return StatsOf(*rig.srv).connections_open == 0; }));
    st = StatsOf(*rig.srv);
    QCOMPARE(st.frames_sent, 6ull);
    QVERIFY(st.send_calls >= 1 && st.send_calls <= 6);
    rig.srv->VisitExports([&](const ServedExport&, const ExportCounters& k) {
      QCOMPARE(k.connections, 0);
      QCOMPARE(k.frames_sent, 6ull);  // the handshake reply included
    });
    QVERIFY(rig.srv->RemoveExport("a").ok());
  }

  void unknownExportAndBadHandshakeClose() {
    Rig rig;
    QVERIFY(rig.Start({}));
    QVERIFY(rig.Add("a", std::make_shared<test::FakeDevice>()).ok());
    Client c;
    QVERIFY(c.Connect(rig.srv->port()));
    QVERIFY(c.Send('H', 1, 1, "b"));
    QCOMPARE(c.Recv(), std::uint32_t(ENOENT));
    QVERIFY(c.SeesEof());
    Client d;
    QVERIFY(d.Connect(rig.srv->port()));
    QVERIFY(d.Send('W', 1, 0));  // a request before the handshake
    QVERIFY(d.SeesEof());
    QVERIFY(WaitFor([&] { return StatsOf(*rig.srv).protocol_errors == 1; }));
  }

  // A connection the server waits on without progress is closed; an idle one is kept.
  void stallSweepClosesStalledKeepsIdle() {
    Rig rig;
    detail::ServerCoreOptions o;
    o.stall_timeout = std::chrono::milliseconds(300);
    QVERIFY(rig.Start(o));
    QVERIFY(rig.Add("a", std::make_shared<test::FakeDevice>()).ok());
    Client payload, silent, idle;
    QVERIFY(payload.Connect(rig.srv->port()) && payload.Hello("a"));
    QVERIFY(idle.Connect(rig.srv->port()) && idle.Hello("a"));
    QVERIFY(silent.Connect(rig.srv->port()));  // never sends its handshake
    std::vector<char> w(4096, 'w');
    QVERIFY(payload.Send('W', 1, 4096, w.data(), 100));  // the rest never comes
    QVERIFY(payload.SeesEof());
    QVERIFY(silent.SeesEof());
    // The idle one was swept just as often and still works.
    std::vector<char> r(512);
    QVERIFY(idle.Send('R', 2, 512));
    QCOMPARE(idle.Recv(nullptr, r.data(), r.size()), 0u);
    QVERIFY(WaitFor([&] { return StatsOf(*rig.srv).connections_open == 1; }));
  }

  // ---- resource caps (ServerLimits, docs/security.md "Bounded resources")

  // One byte every 100 ms keeps a handshake "progressing", but the deadline counts from the
  // accept: the connection is closed at it.  A client that finished its handshake is not touched.
  void handshakeDeadlineClosesATrickle() {
    Rig rig;
    detail::ServerCoreOptions o;
    o.limits.handshake_timeout = std::chrono::milliseconds(500);
    QVERIFY(rig.Start(o));
    QVERIFY(rig.Add("a", std::make_shared<test::FakeDevice>()).ok());
    Client good, slow;
    QVERIFY(good.Connect(rig.srv->port()) && good.Hello("a"));
    QVERIFY(slow.Connect(rig.srv->port()));
    const auto t0 = std::chrono::steady_clock::now();
    std::uint8_t h[kReq] = {'H'};
    PutU32(h + 4, 1);
    std::size_t sent = 0;
    // The whole header would take 1.6 s; the deadline is 0.5 s.
    while (sent < kReq && slow.SendRaw(h + sent, 1)) {
      ++sent;
      if (!slow.Quiet(100)) break;  // EOF arrived
    }
    QVERIFY(slow.SeesEof());
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
    QVERIFY2(ms >= 450 && ms < 1500, qPrintable(QString("closed after %1 ms").arg(ms)));
    QVERIFY(sent < kReq);
    QCOMPARE(StatsOf(*rig.srv).connections_timed_out, 1ull);
    QVERIFY(good.Io(10));  // 0.5 s after its accept, still served
  }

  // Over max_connections a new connection is closed at once, before any handshake, while a
  // legitimate client keeps doing I/O; when one leaves, a new one gets in.
  void connectionCapRefusesTheNextKeepsServing() {
    Rig rig;
    detail::ServerCoreOptions o;
    o.limits.max_connections = 4;
    o.limits.max_connections_per_address = 0;
    QVERIFY(rig.Start(o));
    QVERIFY(rig.Add("a", std::make_shared<test::FakeDevice>()).ok());
    Client legit, held[3];
    QVERIFY(legit.Connect(rig.srv->port()) && legit.Hello("a"));
    for (auto& c : held) QVERIFY(c.Connect(rig.srv->port()));  // three that never handshake
    QVERIFY(WaitFor([&] { return StatsOf(*rig.srv).connections_open == 4; }));
    for (int i = 0; i < 5; ++i) {
      Client over;
      QVERIFY(over.Connect(rig.srv->port()));  // the kernel accepts; the server closes it
      const long ms = over.MsUntilClosed();
      QVERIFY2(ms >= 0 && ms < 1000, qPrintable(QString("closed after %1 ms").arg(ms)));
      QVERIFY(legit.Io(100 + 2 * i));
    }
    ServerStats st = StatsOf(*rig.srv);
    QCOMPARE(st.connections_refused, 5ull);
    QCOMPARE(st.connections_open, 4);
    ::close(held[0].fd);
    held[0].fd = -1;
    QVERIFY(WaitFor([&] { return StatsOf(*rig.srv).connections_open == 3; }));
    Client next;
    QVERIFY(next.Connect(rig.srv->port()) && next.Hello("a"));
    QVERIFY(next.Io(200));
  }

  // At max_connections a connect flood is refused 128 at a time per 0.5 s: the rest wait in the
  // kernel's backlog instead of costing an accept and a close each, and a served client is not
  // slowed.  (Sequential refusals below the burst stay immediate: the tests above.)
  void connectFloodAtTheCapIsPaced() {
    Rig rig;
    detail::ServerCoreOptions o;
    o.limits.max_connections = 1;
    o.limits.max_connections_per_address = 0;
    o.limits.handshake_timeout = std::chrono::milliseconds(0);
    QVERIFY(rig.Start(o));
    QVERIFY(rig.Add("a", std::make_shared<test::FakeDevice>()).ok());
    Client legit;
    QVERIFY(legit.Connect(rig.srv->port()) && legit.Hello("a"));
    std::vector<Client> flood(400);
    for (auto& c : flood) QVERIFY(c.Connect(rig.srv->port()));  // the kernel completes them all
    QVERIFY(WaitFor([&] { return StatsOf(*rig.srv).connections_refused >= 128; }));
    QVERIFY(legit.Io(1));
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
    const std::uint64_t first = StatsOf(*rig.srv).connections_refused;
    QVERIFY2(first <= 129, qPrintable(QString("%1 refused in the first window").arg(first)));
    QVERIFY(WaitFor([&] { return StatsOf(*rig.srv).connections_refused == 400; }, 5));  // the next windows
  }

  // max_connections_per_address counts by address, not port: a third connection from 127.0.0.1
  // is refused while 127.0.0.2 still gets in.
  void perAddressCap() {
    Rig rig;
    detail::ServerCoreOptions o;
    o.limits.max_connections = 100;
    o.limits.max_connections_per_address = 2;
    QVERIFY(rig.Start(o));
    QVERIFY(rig.Add("a", std::make_shared<test::FakeDevice>()).ok());
    Client a1, a2, a3, b1, b2, b3;
    QVERIFY(a1.ConnectFrom("127.0.0.1", rig.srv->port()) && a1.Hello("a"));
    QVERIFY(a2.ConnectFrom("127.0.0.1", rig.srv->port()));
    QVERIFY(WaitFor([&] { return StatsOf(*rig.srv).connections_open == 2; }));
    QVERIFY(a3.ConnectFrom("127.0.0.1", rig.srv->port()));
    const long ms = a3.MsUntilClosed();
    QVERIFY2(ms >= 0 && ms < 1000, qPrintable(QString("closed after %1 ms").arg(ms)));
    QVERIFY(b1.ConnectFrom("127.0.0.2", rig.srv->port()) && b1.Hello("a") && b1.Io(1));
    QVERIFY(b2.ConnectFrom("127.0.0.2", rig.srv->port()) && b2.Hello("a"));
    QVERIFY(b3.ConnectFrom("127.0.0.2", rig.srv->port()));
    QVERIFY(b3.MsUntilClosed() >= 0);
    QVERIFY(a1.Io(3));
    QCOMPARE(StatsOf(*rig.srv).connections_refused, 2ull);
  }

  // A refusal flood is logged once per address and interval, not once per connection, and at
  // most 32 lines per interval over all addresses.
  void refusalsAreLoggedOncePerInterval() {
    Rig rig;
    detail::ServerCoreOptions o;
    o.limits.max_connections = 1;
    QVERIFY(rig.Start(o));
    Client held;
    QVERIFY(held.Connect(rig.srv->port()));
    QVERIFY(WaitFor([&] { return StatsOf(*rig.srv).connections_open == 1; }));
    char path[] = "/tmp/dst_limits_log_XXXXXX";
    const int log = ::mkstemp(path);
    QVERIFY(log >= 0);
    ::unlink(path);
    std::fflush(stderr);
    const int saved = ::dup(2);
    ::dup2(log, 2);
    for (int i = 0; i < 20; ++i) {
      Client over;
      if (over.Connect(rig.srv->port())) over.MsUntilClosed();
    }
    for (int i = 0; i < 40; ++i) {  // 40 more addresses, one refusal each
      Client over;
      const std::string from = "127.0.2." + std::to_string(i + 1);
      if (over.ConnectFrom(from.c_str(), rig.srv->port())) over.MsUntilClosed();
    }
    const bool counted = WaitFor([&] { return StatsOf(*rig.srv).connections_refused == 60; });
    std::fflush(stderr);
    ::dup2(saved, 2);
    ::close(saved);
    QVERIFY(counted);
    std::string text(1 << 16, '\0');
    const ssize_t n = ::pread(log, text.data(), text.size(), 0);
    ::close(log);
    QVERIFY(n > 0);
    text.resize(std::size_t(n));
    int lines = 0;
    for (std::size_t p = 0; (p = text.find("connection refused", p)) != std::string::npos; ++p) ++lines;
    QCOMPARE(lines, 32);
    QVERIFY(text.find("127.0.0.1: connection refused: too many connections (max_connections)") != std::string::npos);
  }

  // A serving connection without requests is closed after idle_timeout; one that keeps sending
  // requests (a keepalive) stays.
  void idleConnectionClosed() {
    Rig rig;
    detail::ServerCoreOptions o;
    o.limits.idle_timeout = std::chrono::milliseconds(400);
    QVERIFY(rig.Start(o));
    QVERIFY(rig.Add("a", std::make_shared<test::FakeDevice>()).ok());
    Client idle, busy;
    QVERIFY(idle.Connect(rig.srv->port()) && idle.Hello("a"));
    QVERIFY(busy.Connect(rig.srv->port()) && busy.Hello("a"));
    bool busy_ok = true;
    std::thread keepalive([&] {
      for (int i = 0; i < 15 && busy_ok; ++i) {
        busy_ok = busy.Send('F', 1000 + i, 0) && busy.Recv() == 0;
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    });
    const long ms = idle.MsUntilClosed();
    keepalive.join();
    QVERIFY2(ms >= 350 && ms < 1500, qPrintable(QString("closed after %1 ms").arg(ms)));
    QVERIFY(busy_ok);  // 1.5 s of requests 100 ms apart: never idle for 400 ms
    QVERIFY(busy.Io(5));
    QCOMPARE(StatsOf(*rig.srv).connections_timed_out, 1ull);
  }

  // An announced payload that trickles in (one byte every 50 ms) is not progress: the request
  // is closed after stall_timeout.
  void trickledPayloadTimesOut() {
    Rig rig;
    detail::ServerCoreOptions o;
    o.stall_timeout = std::chrono::milliseconds(400);
    QVERIFY(rig.Start(o));
    QVERIFY(rig.Add("a", std::make_shared<test::FakeDevice>()).ok());
    Client c;
    QVERIFY(c.Connect(rig.srv->port()) && c.Hello("a"));
    QVERIFY(c.Send('W', 1, 4096));
    const auto t0 = std::chrono::steady_clock::now();
    char byte = 'x';
    int sent = 0;
    while (sent < 4096 && c.SendRaw(&byte, 1)) {
      ++sent;
      if (!c.Quiet(50)) break;
    }
    QVERIFY(c.SeesEof());
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
    QVERIFY2(ms >= 300 && ms < 2000, qPrintable(QString("closed after %1 ms").arg(ms)));
    QVERIFY(sent < 100);
  }

  // The per-identity hook: an identity over its cap is refused in the protocol's words, another
  // identity is not, and a closed connection frees its identity.
  void identityCapHook() {
    Rig rig;
    detail::ServerCoreOptions o;
    o.limits.max_connections_per_identity = 1;
    QVERIFY(rig.Start(o));
    QVERIFY(rig.Add("a", std::make_shared<test::FakeDevice>()).ok());
    Client a, b, c;
    QVERIFY(a.Connect(rig.srv->port()) && a.Hello("a"));
    QVERIFY(b.Connect(rig.srv->port()) && b.Hello("a"));
    QVERIFY(a.Send('I', 7, 0) && a.Recv() == 0);
    QVERIFY(b.Send('I', 7, 0) && b.Recv() == std::uint32_t(EBUSY));
    QVERIFY(b.Send('I', 8, 0) && b.Recv() == 0);
    ::close(a.fd);
    a.fd = -1;
    QVERIFY(WaitFor([&] { return StatsOf(*rig.srv).connections_open == 1; }));
    QVERIFY(c.Connect(rig.srv->port()) && c.Hello("a"));
    QVERIFY(c.Send('I', 7, 0) && c.Recv() == 0);
  }

  // Drain lets the device finish what it holds and answers it, refuses new connections, then
  // flushes the writable exports whose device can flush (and only those), then reports.
  void drainWaitsForInFlightThenFlushes() {
    Rig rig;
    QVERIFY(rig.Start({}));
    test::FakeDeviceOptions fo;
    fo.async = true;
    auto rw = std::make_shared<test::FakeDevice>(fo);
    auto ro = std::make_shared<test::FakeDevice>(fo);
    fo.can_flush = false;
    auto noflush = std::make_shared<test::FakeDevice>(fo);
    QVERIFY(rig.Add("rw", rw).ok());
    QVERIFY(rig.Add("ro", ro, true).ok());
    QVERIFY(rig.Add("noflush", noflush).ok());

    Client c;
    QVERIFY(c.Connect(rig.srv->port()) && c.Hello("rw"));
    rw->Hold(true);
    std::vector<char> w(4096, 'd');
    QVERIFY(c.Send('W', 5, 4096, w.data()));
    QVERIFY(WaitFor([&] { return rw->in_flight() == 1; }));

    std::atomic<bool> done{false};
    Status result = Status::IoError("not called");
    rig.srv->Drain([&](Status st) {
      result = st;
      done = true;
    });
    QVERIFY(c.Quiet(200));
    QVERIFY(!done);
    QCOMPARE(rw->flushes(), 0ull);
    std::atomic<int> second{0};  // a second Drain is refused (Busy), not queued
    rig.srv->Drain([&](Status st) { second = st.code() == Status::Code::kBusy ? 1 : 2; });
    QVERIFY(WaitFor([&] { return second.load() != 0; }));
    QCOMPARE(second.load(), 1);

    rw->Hold(false);
    std::uint64_t id = 0;
    QCOMPARE(c.Recv(&id), 0u);  // the in-flight WRITE was answered
    QCOMPARE(id, 5ull);
    QVERIFY(c.SeesEof());
    QVERIFY(WaitFor([&] { return done.load(); }));
    QVERIFY(result.ok());
    QCOMPARE(rw->writes(), 1ull);
    QCOMPARE(rw->flushes(), 1ull);
    QCOMPARE(ro->flushes(), 0ull);
    QCOMPARE(noflush->flushes(), 0ull);
    QVERIFY(!rig.srv->accepting());
    Client late;  // the listener is closed: refused, or closed at once
    QVERIFY(!late.Connect(rig.srv->port()) || late.SeesEof());
  }

  // ---- fairness (docs/security.md "Bounded resources")

  // A reader that takes its replies at ~10 bytes/s while 64 KiB replies wait for it is closed
  // about drain_window after they start waiting, by bytes drained (frames would not tell: the
  // stall check is off here), and its buffers come back; a normal client meanwhile completes
  // every request within 1 s.  With min_drain_rate 0 the same reader stays.
  void slowReaderEvictedByBytes() {
    for (const bool check : {true, false}) {
      Rig rig;
      QVERIFY(rig.Start(SmallPool(check ? 256u << 10 : 0)));
      QVERIFY(rig.Add("a", std::make_shared<test::FakeDevice>()).ok());
      Client slow, good;
      QVERIFY(slow.ConnectSmallWindow(rig.srv->port()) && slow.Hello("a"));
      QVERIFY(good.Connect(rig.srv->port()) && good.Hello("a"));
      QVERIFY(slow.SendReads(120, 65536));
      QVERIFY(WaitFor([&] { return rig.srv->pool_available() <= 2; }));  // its share is pinned
      long evicted_ms = -1, worst_ms;
      {
        test::Trickle trickle(slow.fd);
        std::uint64_t id = 1000;
        worst_ms = test::WorstLatency(2500, [&] { return good.Io(id += 2); }, [&](long t) {
          if (evicted_ms < 0 && StatsOf(*rig.srv).connections_timed_out > 0) evicted_ms = t;
        });
      }
      QVERIFY2(worst_ms >= 0 && worst_ms < 1000, qPrintable(QString("worst request %1 ms").arg(worst_ms)));
      if (check) {
        QVERIFY2(evicted_ms >= 0 && evicted_ms < 1500, qPrintable(QString("evicted after %1 ms").arg(evicted_ms)));
        QVERIFY(WaitFor([&] { return StatsOf(*rig.srv).connections_open == 1; }));
        QVERIFY(WaitFor([&] { return rig.srv->pool_available() == 16; }));  // its buffers came back
      } else {
        QCOMPARE(StatsOf(*rig.srv).connections_timed_out, 0ull);
        QCOMPARE(StatsOf(*rig.srv).connections_open, 2);
      }
    }
  }

  // One connection that never reads its replies holds at most its share of the pool (here all
  // but the reserve: 14 of 16) and stops reading requests beyond it; another client still gets
  // buffers at once.
  void connectionShareIsBounded() {
    Rig rig;
    QVERIFY(rig.Start(SmallPool(0)));
    auto dev = std::make_shared<test::FakeDevice>();
    QVERIFY(rig.Add("a", dev).ok());
    Client hog, good;
    QVERIFY(hog.ConnectSmallWindow(rig.srv->port()) && hog.Hello("a"));
    QVERIFY(good.Connect(rig.srv->port()) && good.Hello("a"));
    QVERIFY(hog.SendReads(120, 65536));
    QVERIFY(WaitFor([&] { return rig.srv->pool_available() == 2; }));
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    QCOMPARE(rig.srv->pool_available(), std::size_t(2));  // no more: the rest wait unread
    QCOMPARE(rig.srv->active_connections(), std::size_t(1));
    for (int i = 0; i < 20; ++i) {
      const auto a = std::chrono::steady_clock::now();
      QVERIFY(good.Io(1000 + 2 * i));
      QVERIFY(std::chrono::steady_clock::now() - a < std::chrono::seconds(1));
    }
    QVERIFY(WaitFor([&] { return rig.srv->pool_available() == 2; }));  // the good one's came back
  }

  // More slow readers than the reserve has buffers: a new client waits for the next buffer that
  // comes back, and min_drain_rate bounds that wait (here to about drain_window).
  void slowReadersBeyondTheReserve() {
    Rig rig;
    QVERIFY(rig.Start(SmallPool(256u << 10)));
    QVERIFY(rig.Add("a", std::make_shared<test::FakeDevice>()).ok());
    Client hogs[3], good;
    for (auto& h : hogs) {
      QVERIFY(h.ConnectSmallWindow(rig.srv->port()) && h.Hello("a"));
      QVERIFY(h.SendReads(120, 65536));
      QVERIFY(WaitFor([&] { return rig.srv->active_connections() == std::size_t(&h - hogs + 1); }));
    }
    QCOMPARE(rig.srv->pool_available(), std::size_t(0));  // 14 + 1 + 1
    QVERIFY(good.Connect(rig.srv->port()) && good.Hello("a"));
    const auto a = std::chrono::steady_clock::now();
    QVERIFY(good.Io(1000));
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - a).count();
    QVERIFY2(ms < 2000, qPrintable(QString("first request took %1 ms").arg(ms)));
    QVERIFY(StatsOf(*rig.srv).connections_timed_out >= 1);
  }

  // The share formula: max(2, (pool - reserve) / active).  64 buffers: reserve 8.
  void shareShrinksWithActiveConnections() {
    Rig rig;
    detail::ServerCoreOptions o = SmallPool(0);
    o.buffer_count = 64;
    QVERIFY(rig.Start(o));
    ServerCore& c = *rig.srv;
    QVERIFY(c.MayTake(55));
    QVERIFY(!c.MayTake(56));
    for (int i = 0; i < 8; ++i) c.SetActive(true);
    QVERIFY(c.MayTake(6));
    QVERIFY(!c.MayTake(7));
    for (int i = 0; i < 92; ++i) c.SetActive(true);
    QVERIFY(c.MayTake(0));  // a first buffer, whatever the load
    QVERIFY(c.MayTake(1));  // the minimum share
    QVERIFY(!c.MayTake(2));
    for (int i = 0; i < 100; ++i) c.SetActive(false);
    QCOMPARE(c.active_connections(), std::size_t(0));
  }

  // With the pool empty a request parks (no reply, no heap fallback) and resumes when a buffer
  // comes back.
  void backpressureParksOnEmptyPool() {
    Rig rig;
    detail::ServerCoreOptions o;
    o.buffer_count = 1;
    o.buffer_size = 4096;
    QVERIFY(rig.Start(o));
    test::FakeDeviceOptions fo;
    fo.async = true;
    auto dev = std::make_shared<test::FakeDevice>(fo);
    QVERIFY(rig.Add("a", dev).ok());
    Client a, b;
    QVERIFY(a.Connect(rig.srv->port()) && a.Hello("a"));
    QVERIFY(b.Connect(rig.srv->port()) && b.Hello("a"));
    dev->Hold(true);
    std::vector<char> w(4096, 'p'), r(4096);
    QVERIFY(a.Send('W', 1, 4096, w.data()));
    QVERIFY(WaitFor([&] { return dev->in_flight() == 1; }));  // a holds the only buffer
    QVERIFY(b.Send('R', 2, 4096));
    QVERIFY(b.Quiet(200));
    QCOMPARE(dev->in_flight(), 1u);  // b's READ did not reach the device: it waits for the buffer
    dev->Hold(false);
    QCOMPARE(a.Recv(), 0u);
    std::uint64_t id = 0;
    QCOMPARE(b.Recv(&id, r.data(), r.size()), 0u);
    QCOMPARE(id, 2ull);
    QVERIFY(r == w);
  }
};

DST_TEST_MAIN(ServerCoreTest)
#include "server_core_test.moc"
