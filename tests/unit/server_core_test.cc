// Unit tests for the server-connection core (netdriver/src/server_core.h) through a toy protocol
// defined here, so what is tested is the core alone: counters, the stall sweep, Drain waiting for
// in-flight requests and the flush-at-shutdown rule, pool backpressure, payload discard.
//
// Toy protocol (16-byte request header: u8 op, 3 pad, u32 len, u64 id; reply: u32 status, u64 id,
// then the data of a read):
//   'H' + name (len bytes): handshake, attaches the export; reply status 0 or ENOENT.
//   'W' + len bytes: write at 0.   'R': read len bytes at 0.   'F': flush.
//   'Y' + len bytes: refused write (payload discarded, EINVAL).   other: EINVAL.
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
