// Unit tests for the Transport seam's TCP implementation (tcp_transport.h) over loopback:
// SendFrames gathering a whole frame list into one system call, its limits and offsets, the
// Transmitter on a Transport, exact and partial receives, shutdown, an orderly close, writable
// waits, listener and connector (TCP and AF_UNIX), and IoCallback.
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <QTemporaryDir>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>

#include "dst/net/tcp_transport.h"
#include "dst/net/transmitter.h"
#include "loopback.h"
#include "test_env.h"
#include "tx_frames.h"

namespace asio = boost::asio;
using namespace dst;
using namespace dst::net;

namespace {

// A TcpTransport (server side) and a raw client descriptor.
struct Pair {
  asio::io_context io;
  int client = -1;
  Strand strand = asio::make_strand(io);
  std::unique_ptr<TcpTransport> t;

  bool Open(int sndbuf = 4 << 20, int rcvbuf = 4 << 20) {
    asio::ip::tcp::socket s(io);
    client = test::LoopbackPair(io, &s, rcvbuf);
    if (client < 0) return false;
    s.set_option(asio::socket_base::send_buffer_size(sndbuf));
    t = TcpTransport::FromTcp(std::move(s), strand);
    return true;
  }
  ~Pair() {
    t.reset();
    if (client >= 0) ::close(client);
  }
  template <typename F>
  bool RunUntil(F pred) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (!pred() && std::chrono::steady_clock::now() < end) {
      io.restart();
      io.run_for(std::chrono::milliseconds(5));
    }
    return pred();
  }
  bool ReadAll(char* p, std::size_t n) { return test::RecvFull(client, p, n); }
};

// A frame list ready for SendFrames on a fresh pair.
struct Sending {
  Pair p;
  Frames ch;
  boost::system::error_code ec;
  bool open;
  Sending(int n, std::uint32_t len, int sndbuf = 4 << 20, int rcvbuf = 4 << 20)
      : ch(n, len), open(p.Open(sndbuf, rcvbuf)) {
    ch.Chain();
  }
  std::size_t Send(std::size_t first, std::size_t offset, const SendLimits& lim = {}) {
    return p.t->SendFrames(&ch.f[first], offset, lim, ec);
  }
};

}  // namespace

class TcpTransportTest : public QObject {
  Q_OBJECT
 private slots:
  // One SendFrames call takes a whole list of 300 frames (600 iovecs): one system call.
  void sendFramesGathersManyFramesInOneCall() {
    Sending s(300, 64);
    QVERIFY(s.open);
    QCOMPARE(s.Send(0, 0), s.ch.WireBytes());
    QVERIFY(!s.ec);
    std::vector<char> got(s.ch.WireBytes());
    QVERIFY(s.p.ReadAll(got.data(), got.size()));
    QVERIFY(got == s.ch.Expected());
  }

  // max_frames bounds a call; `offset` resumes inside the first frame.
  void sendFramesLimitsAndOffset() {
    Sending s(4, 100);
    QVERIFY(s.open);
    SendLimits one;
    one.max_frames = 1;
    const std::size_t frame = s.ch.FrameBytes();
    QCOMPARE(s.Send(0, 0, one), frame);
    QVERIFY(!s.ec);
    // Frame 1 from byte 60 (inside its payload), then frames 2 and 3 whole.
    const std::size_t rest = frame - 60 + 2 * frame;
    QCOMPARE(s.Send(1, 60), rest);
    const std::vector<char> wire = s.ch.Expected();
    std::vector<char> got(frame + rest);
    QVERIFY(s.p.ReadAll(got.data(), got.size()));
    std::vector<char> want(wire.begin(), wire.begin() + frame);
    want.insert(want.end(), wire.begin() + frame + 60, wire.end());
    QVERIFY(got == want);
  }

  // The Transmitter sends through a Transport with many frames per system call.
  void transmitterBatchesThroughTransport() {
    Pair p;
    QVERIFY(p.Open());
    TxStats st;
    Transmitter tx(*p.t, true, &st);
    Frames ch(300, 64);
    std::vector<char> got(ch.WireBytes());
    std::atomic<bool> ok{false};
    std::thread reader([&] { ok = p.ReadAll(got.data(), got.size()); });
    for (auto& f : ch.f) tx.Enqueue(&f);
    QVERIFY(tx.Flush());
    QVERIFY(p.RunUntil([&] { return ch.sent_order.size() == ch.f.size(); }));
    reader.join();
    QVERIFY(ok);
    QVERIFY(got == ch.Expected());
    QCOMPARE(st.frames.load(), 300ull);
    QVERIFY(st.syscalls.load() <= 3);  // 600 iovecs: one or two IOV_MAX batches
    QVERIFY(st.FramesPerCall() >= 100.0);
  }

  // A full send buffer: the Transmitter waits for writability through the transport (in the
  // transport's handler arena) and resumes inside a frame.
  void transmitterWaitsWritableThroughTransport() {
    Pair p;
    QVERIFY(p.Open(4096));
    TxStats st;
    Transmitter tx(*p.t, true, &st);
    Frames ch(64, 65536 + 512);
    for (auto& f : ch.f) tx.Enqueue(&f);
    QVERIFY(tx.Flush());  // nobody reads yet: the socket fills up
    QVERIFY(st.eagain.load() > 0);
    QVERIFY(!tx.idle());
    std::vector<char> got(ch.WireBytes());
    std::atomic<bool> ok{false};
    std::thread reader([&] { ok = p.ReadAll(got.data(), got.size()); });
    QVERIFY(p.RunUntil([&] { return ch.sent_order.size() == ch.f.size(); }));
    reader.join();
    QVERIFY(ok);
    QVERIFY(got == ch.Expected());
    for (int i = 0; i < 64; ++i) {
      QCOMPARE(ch.sent_order[i], i);
      QVERIFY(ch.sent_ok[i]);
    }
    QCOMPARE(st.bytes.load(), std::uint64_t(ch.WireBytes()));
    QCOMPARE(p.t->arena_fallbacks(), 0ull);
  }

  void readExactAndSome() {
    Pair p;
    QVERIFY(p.Open());
    std::vector<char> data(10000);
    for (std::size_t i = 0; i < data.size(); ++i) data[i] = char(i * 7);
    for (std::size_t off = 0; off < data.size(); off += 999)
      QVERIFY(::send(p.client, data.data() + off, std::min<std::size_t>(999, data.size() - off), 0) > 0);
    std::vector<char> got(data.size());
    std::size_t n = 0;
    bool done = false;
    p.t->AsyncRead(asio::buffer(got.data(), 9000), [&](const boost::system::error_code& ec, std::size_t m) {
      QVERIFY(!ec);
      n = m;
      done = true;
    });
    QVERIFY(p.RunUntil([&] { return done; }));
    QCOMPARE(n, std::size_t(9000));
    done = false;
    p.t->AsyncReadSome(asio::buffer(got.data() + 9000, 64 << 10), [&](const boost::system::error_code& ec, std::size_t m) {
      QVERIFY(!ec);
      n = m;
      done = true;
    });
    QVERIFY(p.RunUntil([&] { return done; }));
    QVERIFY(n >= 1 && n <= 1000);
    QVERIFY(std::memcmp(got.data(), data.data(), 9000 + n) == 0);
  }

  // Shutdown(kRead) ends a pending receive (EOF) without closing: a write still goes out.
  void shutdownEndsPendingRead() {
    Pair p;
    QVERIFY(p.Open());
    char buf[100];
    boost::system::error_code got;
    bool done = false;
    p.t->AsyncRead(asio::buffer(buf), [&](const boost::system::error_code& ec, std::size_t) {
      got = ec;
      done = true;
    });
    p.io.restart();
    p.io.poll();
    QVERIFY(!done);
    p.t->Shutdown(Transport::ShutdownHow::kRead);
    QVERIFY(p.RunUntil([&] { return done; }));
    QCOMPARE(got, boost::system::error_code(asio::error::eof));
    QVERIFY(p.t->is_open());
    bool wrote = false;
    p.t->AsyncWrite(asio::buffer("ok", 2), [&](const boost::system::error_code& ec, std::size_t n) {
      wrote = !ec && n == 2;
    });
    QVERIFY(p.RunUntil([&] { return wrote; }));
    char r[2];
    QVERIFY(p.ReadAll(r, 2) && std::memcmp(r, "ok", 2) == 0);
  }

  // Close() after unread input still lets the peer read our last bytes and then EOF, not a reset.
  void closeIsOrderlyDespiteUnreadInput() {
    Pair p;
    QVERIFY(p.Open());
    std::vector<char> junk(3000, 'j');
    QVERIFY(::send(p.client, junk.data(), junk.size(), 0) == ssize_t(junk.size()));
    bool wrote = false;
    p.t->AsyncWrite(asio::buffer("bye", 3), [&](const boost::system::error_code& ec, std::size_t) { wrote = !ec; });
    QVERIFY(p.RunUntil([&] { return wrote; }));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // let the junk arrive (not a measurement)
    p.t->Close();
    QVERIFY(!p.t->is_open());
    p.t->Close();  // idempotent
    char r[8];
    QVERIFY(p.ReadAll(r, 3) && std::memcmp(r, "bye", 3) == 0);
    QCOMPARE(::recv(p.client, r, sizeof r, 0), ssize_t(0));
  }

  // With the send buffer full SendFrames reports would_block; AsyncWaitWritable completes once
  // the peer reads.
  void waitWritable() {
    Sending s(1, 1 << 20, 4096, 4096);  // both buffers small: the socket fills up
    QVERIFY(s.open);
    std::size_t off = 0;
    while (!s.ec && off < s.ch.WireBytes()) off += s.Send(0, off);
    QCOMPARE(s.ec, boost::system::error_code(asio::error::would_block));
    QVERIFY(off < s.ch.WireBytes());
    bool writable = false;
    s.p.t->AsyncWaitWritable([&](const boost::system::error_code& e, std::size_t) { writable = !e; });
    std::vector<char> got(s.ch.WireBytes());
    std::thread reader([&] { s.p.ReadAll(got.data(), off); });
    QVERIFY(s.p.RunUntil([&] { return writable; }));
    reader.join();
  }

  void listenerAndConnector() {
    asio::io_context io;
    Strand ctl = asio::make_strand(io);
    auto l = TcpListener::Open(io, ctl, "127.0.0.1", 0);
    QVERIFY(l.ok());
    std::unique_ptr<TcpListener> listener = std::move(l).value();
    QVERIFY(listener->port() != 0);
    QCOMPARE(QString::fromStdString(listener->local_name()), QString("127.0.0.1:%1").arg(listener->port()));
    std::unique_ptr<Transport> server, client;
    listener->AsyncAccept([&](const boost::system::error_code& ec, std::unique_ptr<Transport> t) {
      QVERIFY(!ec);
      server = std::move(t);
    });
    Strand cs = asio::make_strand(io);
    TcpConnector conn(cs, "127.0.0.1", listener->port());
    QCOMPARE(QString::fromStdString(conn.target()), QString("127.0.0.1:%1").arg(listener->port()));
    Status st = Status::IoError("not called");
    conn.AsyncConnect(std::chrono::seconds(5), [&](Status s, std::unique_ptr<Transport> t) {
      st = s;
      client = std::move(t);
    });
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while ((!server || !client) && std::chrono::steady_clock::now() < end) {
      io.restart();
      io.run_for(std::chrono::milliseconds(5));
    }
    QVERIFY(st.ok());
    QVERIFY(server && client);
    QVERIFY(QString::fromStdString(server->peer()).startsWith("127.0.0.1:"));
    bool sent = false, got = false;
    char buf[5] = {};
    server->AsyncRead(asio::buffer(buf, 5), [&](const boost::system::error_code& ec, std::size_t) { got = !ec; });
    client->AsyncWrite(asio::buffer("hello", 5), [&](const boost::system::error_code& ec, std::size_t) { sent = !ec; });
    while ((!sent || !got) && std::chrono::steady_clock::now() < end) {
      io.restart();
      io.run_for(std::chrono::milliseconds(5));
    }
    QVERIFY(sent && got);
    QCOMPARE(std::memcmp(buf, "hello", 5), 0);

    // Nothing listens there any more: refused, reported as kUnavailable.
    const std::uint16_t port = listener->port();
    listener->Close();
    server.reset();
    TcpConnector refused(cs, "127.0.0.1", port);
    bool called = false;
    refused.AsyncConnect(std::chrono::seconds(5), [&](Status s, std::unique_ptr<Transport> t) {
      called = true;
      st = s;
      QVERIFY(!t);
    });
    while (!called && std::chrono::steady_clock::now() < end) {
      io.restart();
      io.run_for(std::chrono::milliseconds(5));
    }
    QVERIFY(called);
    QCOMPARE(st.code(), Status::Code::kUnavailable);

    // Cancel drops the callback.
    TcpConnector cancelled(cs, "127.0.0.1", port);
    bool cancelled_called = false;
    cancelled.AsyncConnect(std::chrono::seconds(5), [&](Status, std::unique_ptr<Transport>) { cancelled_called = true; });
    asio::post(cs, [&] { cancelled.Cancel(); });
    io.restart();
    io.run_for(std::chrono::milliseconds(100));
    QVERIFY(!cancelled_called);
  }

  void unixConnector() {
    QTemporaryDir dir;
    QVERIFY(dir.isValid());
    const std::string path = dir.filePath("s.sock").toStdString();
    int lfd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
    QVERIFY(::bind(lfd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    QVERIFY(::listen(lfd, 4) == 0);
    asio::io_context io;
    auto c = TcpConnector::Unix(asio::make_strand(io), path);
    QCOMPARE(c->target(), path);
    std::unique_ptr<Transport> t;
    Status st = Status::IoError("not called");
    c->AsyncConnect(std::chrono::seconds(5), [&](Status s, std::unique_ptr<Transport> tr) {
      st = s;
      t = std::move(tr);
    });
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (!t && st.code() == Status::Code::kIoError && std::chrono::steady_clock::now() < end) {
      io.restart();
      io.run_for(std::chrono::milliseconds(5));
    }
    QVERIFY(st.ok());
    const int sfd = ::accept(lfd, nullptr, nullptr);
    QVERIFY(sfd >= 0);
    Frames ch(3, 10);
    ch.Chain();
    boost::system::error_code ec;
    QCOMPARE(t->SendFrames(&ch.f[0], 0, SendLimits{}, ec), ch.WireBytes());
    std::vector<char> got(ch.WireBytes());
    std::size_t n = 0;
    while (n < got.size()) {
      const ssize_t r = ::recv(sfd, got.data() + n, got.size() - n, 0);
      QVERIFY(r > 0);
      n += std::size_t(r);
    }
    QVERIFY(got == ch.Expected());
    ::close(sfd);
    ::close(lfd);
  }

  // IoCallback: move-only, runs once, and releases what it holds when it runs or is dropped.
  void ioCallbackRunsOnceAndReleases() {
    auto token = std::make_shared<int>(7);
    int calls = 0;
    std::size_t seen = 0;
    IoCallback cb([token, &calls, &seen](const boost::system::error_code&, std::size_t n) {
      ++calls;
      seen = n;
    });
    QCOMPARE(token.use_count(), 2L);
    IoCallback moved(std::move(cb));
    QVERIFY(!cb);
    QVERIFY(moved);
    QCOMPARE(token.use_count(), 2L);
    moved({}, 42);
    QCOMPARE(calls, 1);
    QCOMPARE(seen, std::size_t(42));
    QVERIFY(!moved);
    QCOMPARE(token.use_count(), 1L);  // released by the call
    {
      IoCallback dropped([token](const boost::system::error_code&, std::size_t) {});
      QCOMPARE(token.use_count(), 2L);
    }
    QCOMPARE(token.use_count(), 1L);
  }
};

DST_TEST_MAIN(TcpTransportTest)
#include "tcp_transport_test.moc"
