// Issue 11 item 5: the DST and NBD clients against a hostile server (tests/lib/hostile_server.h).
// Each case brings a client into one phase (handshake or data) and then misbehaves: wrong
// lengths, unknown or duplicated handles, absurd export sizes, endless or oversized option
// replies, silence, a close in the middle of a payload, garbage.
//
// What must hold in every case: the client does not crash; a read ends either with exactly the
// bytes an honest server holds (Pattern) or with an error, never with other bytes; it ends in
// bounded time (connect_timeout for a handshake, io_timeout for a request); nothing the server
// says makes the client allocate a size the server chose (option replies, chunk and payload
// lengths are capped before anything is read; ASan in the sanitize build checks the rest).
#include <QFile>
#include <QtTest/QtTest>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include "dst/block_device.h"
#include "dst/net/nbd_client_device.h"
#include "dst/net/remote_device.h"
#include "hostile_server.h"

using namespace dst;
using namespace dst::net;
namespace nb = dst::net::nbd;
using test::HostilePeer;
using test::HostileServer;
using test::Pattern;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

constexpr std::uint64_t kSize = 1u << 20;
constexpr std::uint32_t kLen = 4096;
constexpr int kIoTimeoutMs = 1000;
constexpr int kConnectTimeoutMs = 1000;
// Slack on top of a timeout: the client's tick, a reconnect backoff, a loaded test machine.
constexpr int kSlackMs = 1500;

std::int64_t MsSince(Clock::time_point t) {
  return std::chrono::duration_cast<milliseconds>(Clock::now() - t).count();
}

// The client's io_context on its own thread.
class Loop {
 public:
  Loop() : thread_([this] { io_.run(); }) {}
  ~Loop() {
    guard_.reset();
    io_.stop();
    thread_.join();
  }
  boost::asio::io_context& io() { return io_; }

 private:
  boost::asio::io_context io_;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> guard_{io_.get_executor()};
  std::thread thread_;
};

template <class Opts>
void Tight(Opts* o, std::uint16_t port) {
  o->host = "127.0.0.1";
  o->port = port;
  o->queue_depth = 8;
  o->keepalive_interval = milliseconds(200);
  o->keepalive_timeout = milliseconds(600);
  o->io_timeout = milliseconds(kIoTimeoutMs);
  o->connect_timeout = milliseconds(kConnectTimeoutMs);
  o->reconnect_min = milliseconds(20);
  o->reconnect_max = milliseconds(200);
}

RemoteOptions DstOpts(std::uint16_t port) {
  RemoteOptions o;
  Tight(&o, port);
  o.export_name = "disk";
  return o;
}

NbdClientOptions NbdOpts(std::uint16_t port) {
  NbdClientOptions o;
  Tight(&o, port);
  o.export_name = "disk";
  return o;
}

// One request, waited for.  Heap-allocated and given up (leaked) if it never completes, so a
// late completion cannot write into a dead stack frame; the test has failed by then anyway.
struct Pending {
  IoRequest q;
  std::string buf;
  std::mutex mu;
  std::condition_variable cv;
  int completions = 0;
  Status st;
  static void Done(IoRequest* r, Status st) {
    auto* p = static_cast<Pending*>(r->ctx);
    std::lock_guard<std::mutex> l(p->mu);
    ++p->completions;
    p->st = std::move(st);
    p->cv.notify_all();
  }
};

struct IoResult {
  bool completed = false;
  Status st;
  std::string data;
  std::int64_t ms = 0;
};

IoResult Io(BlockDevice& dev, IoOp op, std::uint64_t off, std::uint32_t len, int wait_ms) {
  auto* p = new Pending;
  p->buf.assign(len, '\x5a');
  p->q.op = op;
  p->q.offset = off;
  p->q.length = len;
  p->q.data = p->buf.data();
  p->q.done = &Pending::Done;
  p->q.ctx = p;
  const auto t0 = Clock::now();
  dev.Submit(&p->q);
  IoResult r;
  std::unique_lock<std::mutex> l(p->mu);
  r.completed = p->cv.wait_for(l, milliseconds(wait_ms), [&] { return p->completions > 0; });
  r.ms = MsSince(t0);
  if (!r.completed) return r;  // p is leaked on purpose (see Pending)
  r.st = p->st;
  r.data = p->buf;
  const int n = p->completions;
  l.unlock();
  delete p;
  if (n != 1) r.completed = false;  // completed twice: as bad as never
  return r;
}

IoResult Read(BlockDevice& dev, std::uint64_t off, int wait_ms = kIoTimeoutMs + kSlackMs + 2000) {
  return Io(dev, IoOp::kRead, off, kLen, wait_ms);
}

// An honest DST data phase, except for READs, which `read` answers.
template <class OnRead>
void ServeDst(HostilePeer& p, const HelloReply& hello, OnRead read) {
  if (!p.DstHello(hello)) return;
  Header h;
  while (p.DstReadRequest(&h)) {
    bool ok = true;
    if (h.command() == Cmd::kRead) {
      ok = read(p, h);
    } else if (h.command() == Cmd::kDisconnect) {
      return;
    } else {
      ok = p.DstReply(h, 0);
    }
    if (!ok) return;
  }
}

bool DstHonestRead(HostilePeer& p, const Header& h) { return p.DstReply(h, 0, Pattern(h.offset, h.length)); }

// An honest NBD data phase (structured or simple replies), except for READs.
template <class OnRead>
void ServeNbd(HostilePeer& p, bool structured, OnRead read, std::uint64_t size = kSize) {
  if (!p.NbdHandshake(size, structured)) return;
  nb::Request r;
  while (p.NbdReadRequest(&r)) {
    bool ok = true;
    if (r.type == nb::kCmdRead) {
      ok = read(p, r);
    } else if (r.type == nb::kCmdDisc) {
      return;
    } else {
      ok = structured ? p.NbdChunk(r.cookie, nb::kReplyFlagDone, nb::kChunkNone, {}) : p.NbdSimple(r.cookie, 0);
    }
    if (!ok) return;
  }
}

bool NbdHonestRead(HostilePeer& p, const nb::Request& r, bool structured) {
  if (!structured) return p.NbdSimple(r.cookie, 0, Pattern(r.offset, r.length));
  return p.NbdData(r.cookie, nb::kReplyFlagDone, r.offset, Pattern(r.offset, r.length));
}

std::string Bytes(std::size_t n, char c) { return std::string(n, c); }

// The process's peak resident set (VmHWM) in MiB: a client that allocated and filled a size a
// server announced (4 GiB lengths below) would raise it by that much.
long PeakRssMib() {
  QFile f("/proc/self/status");
  if (!f.open(QIODevice::ReadOnly)) return 0;
  for (const QByteArray& line : f.readAll().split('\n'))
    if (line.startsWith("VmHWM:")) return line.mid(6).trimmed().split(' ').value(0).toLong() / 1024;
  return 0;
}
constexpr long kMaxRssGrowthMib = 128;

// The read ended with EIO in bounded time and handed nothing wrong to the caller.
#define EXPECT_EIO(r)                                                                          \
  do {                                                                                         \
    QVERIFY2((r).completed, "the read never completed (or completed twice)");                 \
    QVERIFY2(!(r).st.ok(), "a lying server's read completed as OK");                          \
    QCOMPARE((r).st.ToErrno(), EIO);                                                           \
    QVERIFY2((r).ms <= kIoTimeoutMs + kSlackMs, qPrintable(QString("took %1 ms").arg((r).ms))); \
  } while (0)

enum DstLie {
  kShortPayload, kLongPayload, kHugeLength, kGarbage, kWrongCommand, kCloseMidPayload, kSilent, kFlood, kShutdownNoClose
};
enum NbdLie {
  kUnknownCookie, kChunkOutside, kChunkBeforeStart, kHugeChunk, kHugeErrorChunk, kUnnegotiated,
  kBadMagic, kMissingBytes, kOverlap, kHugeHole, kNbdCloseMidPayload, kNbdSilent, kDataForFlush, kNbdFlood
};

}  // namespace

class HostileServerTest : public QObject {
  Q_OBJECT
 private slots:
  void initTestCase() { QVERIFY2(PeakRssMib() > 0, "no VmHWM in /proc/self/status: the memory bounds are unchecked"); }

  // --- DST handshake ---------------------------------------------------------------------------

  void dstHandshake_data() {
    QTest::addColumn<int>("kind");
    QTest::addColumn<int>("code");
    QTest::addColumn<int>("max_ms");
    // fast: refused at once, not by running into connect_timeout.
    const int fast = kConnectTimeoutMs - 100, slow = kConnectTimeoutMs + kSlackMs;
    const int proto = int(Status::Code::kProtocolError);
    QTest::newRow("garbage reply") << 0 << proto << fast;
    QTest::newRow("hello length 4 GiB") << 1 << proto << fast;
    QTest::newRow("size 2^63") << 2 << proto << fast;
    QTest::newRow("size 2^64-512") << 3 << proto << fast;
    QTest::newRow("size not whole blocks") << 4 << proto << fast;
    QTest::newRow("size 0") << 5 << proto << fast;
    QTest::newRow("silent") << 6 << int(Status::Code::kTimedOut) << slow;
    QTest::newRow("close after hello") << 7 << int(Status::Code::kUnavailable) << slow;
    QTest::newRow("half a hello reply, then silence") << 8 << int(Status::Code::kTimedOut) << slow;
  }
  void dstHandshake() {
    QFETCH(int, kind);
    QFETCH(int, code);
    QFETCH(int, max_ms);
    const long rss0 = PeakRssMib();
    HostileServer srv([kind](HostilePeer& p, int) {
      HelloReply r = test::DstExport(kSize);
      switch (kind) {
        case 0: {
          std::uint8_t hb[kHeaderSize];
          if (p.Read(hb, sizeof hb)) p.Write(Bytes(4096, '\xee'));
          break;
        }
        case 1: {
          std::uint8_t hb[kHeaderSize + 64];
          if (!p.Read(hb, kHeaderSize)) return;
          Header h;
          h.cmd = static_cast<std::uint16_t>(Cmd::kHello) | kReplyBit;
          h.length = 0xffffffffu;
          p.DstFrame(h);
          break;
        }
        case 2: r.size = std::uint64_t(1) << 63; p.DstHello(r); break;
        case 3: r.size = ~std::uint64_t(511); p.DstHello(r); break;
        case 4: r.size = kSize + 100; p.DstHello(r); break;
        case 5: r.size = 0; p.DstHello(r); break;
        case 6: break;
        case 7: {
          std::uint8_t hb[kHeaderSize];
          p.Read(hb, sizeof hb);
          return;  // closes
        }
        case 8: {
          std::uint8_t hb[kHeaderSize];
          if (!p.Read(hb, sizeof hb)) return;
          Header h;
          h.cmd = static_cast<std::uint16_t>(Cmd::kHello) | kReplyBit;
          h.length = kHelloReplySize;
          p.DstFrame(h, Bytes(5, '\0'));
          break;
        }
      }
      p.Hold();
    });
    Loop loop;
    const auto t0 = Clock::now();
    auto dev = RemoteDevice::Connect(loop.io(), DstOpts(srv.port()));
    const auto ms = MsSince(t0);
    QVERIFY2(!dev.ok(), "connected to a hostile server");
    QCOMPARE(int(dev.status().code()), code);
    QVERIFY2(ms <= max_ms, qPrintable(QString("took %1 ms: %2").arg(ms).arg(dev.status().ToString().c_str())));
    if (kind >= 2 && kind <= 5) QVERIFY(dev.status().ToString().find("export size") != std::string::npos);
    QVERIFY(PeakRssMib() - rss0 < kMaxRssGrowthMib);
  }

  // The largest sizes that are valid work: no offset arithmetic wraps near the end.
  void dstLargeSizeWorks() {
    const std::uint64_t size = std::uint64_t(1) << 62;
    HostileServer srv([&](HostilePeer& p, int) { ServeDst(p, test::DstExport(size), DstHonestRead); });
    Loop loop;
    auto dev = RemoteDevice::Connect(loop.io(), DstOpts(srv.port()));
    QVERIFY2(dev.ok(), dev.status().ToString().c_str());
    QCOMPARE(dev.value()->Info().size, size);
    IoResult r = Read(*dev.value(), size - kLen);
    QVERIFY(r.completed && r.st.ok());
    QVERIFY(r.data == Pattern(size - kLen, kLen));
    r = Read(*dev.value(), size);  // past the end: refused locally
    QVERIFY(r.completed);
    QCOMPARE(int(r.st.code()), int(Status::Code::kOutOfRange));
  }

  // --- DST data phase --------------------------------------------------------------------------

  void dstLyingReplies_data() {
    QTest::addColumn<int>("lie");
    QTest::newRow("READ reply 512 bytes short") << int(kShortPayload);
    QTest::newRow("READ reply twice as long") << int(kLongPayload);
    QTest::newRow("READ reply length 4 GiB") << int(kHugeLength);
    QTest::newRow("garbage frame") << int(kGarbage);
    QTest::newRow("WRITE reply for the READ's id") << int(kWrongCommand);
    QTest::newRow("close in the middle of every payload") << int(kCloseMidPayload);
    QTest::newRow("never answers a READ") << int(kSilent);
    // Chatter is not progress: the READ still ends at io_timeout.
    QTest::newRow("endless stale replies instead of an answer") << int(kFlood);
    // ESHUTDOWN says "re-send on the next connection"; a server that never closes must not
    // keep the request waiting forever (it did: a requeued request was not on the wire, so
    // neither keepalive nor io_timeout looked at it).
    QTest::newRow("ESHUTDOWN, then the connection stays open") << int(kShutdownNoClose);
  }
  void dstLyingReplies() {
    QFETCH(int, lie);
    const long rss0 = PeakRssMib();
    HostileServer srv([lie](HostilePeer& p, int) {
      ServeDst(p, test::DstExport(kSize), [lie](HostilePeer& p, const Header& h) {
        switch (lie) {
          case kShortPayload: return p.DstReply(h, 0, Bytes(h.length - 512, '\xee'));
          case kLongPayload: return p.DstReply(h, 0, Bytes(2 * h.length, '\xee'));
          case kHugeLength: return p.DstReply(h, 0, Bytes(h.length, '\xee'), 0xfffffff0u);
          case kGarbage: return p.Write(Bytes(kHeaderSize, '\xee'));
          case kWrongCommand: {
            Header w = h;
            w.cmd = static_cast<std::uint16_t>(Cmd::kWrite);
            return p.DstReply(w, 0);
          }
          case kCloseMidPayload: {
            p.DstReply(h, 0, Pattern(h.offset, h.length / 2), h.length);
            return false;
          }
          case kShutdownNoClose: return p.DstReply(h, static_cast<std::uint32_t>(WireStatus::kShutdown));
          case kFlood: {
            Header stale = h;
            stale.cmd = static_cast<std::uint16_t>(Cmd::kPing);
            stale.id = 0xdeadbeef00000001ull;
            while (p.DstReply(stale, 0)) {
            }
            return false;
          }
          default: return true;  // kSilent: nothing (PINGs are still answered)
        }
      });
    });
    Loop loop;
    auto dev = RemoteDevice::Connect(loop.io(), DstOpts(srv.port()));
    QVERIFY2(dev.ok(), dev.status().ToString().c_str());
    IoResult r = Read(*dev.value(), 8192);
    EXPECT_EIO(r);
    if (lie == kShortPayload || lie == kLongPayload) QVERIFY(dev.value()->Stats().bad_replies > 0);
    QVERIFY(PeakRssMib() - rss0 < kMaxRssGrowthMib);
  }

  // Replies for ids never sent, a PING reply nobody asked for and a second reply to a finished
  // READ are dropped (their payloads drained); the real replies still land, on one connection.
  void dstUnknownAndDuplicateReplies() {
    HostileServer srv([](HostilePeer& p, int) {
      ServeDst(p, test::DstExport(kSize), [](HostilePeer& p, const Header& h) {
        Header stranger = h;
        stranger.id = 0xdeadbeef00000042ull;
        Header ping;
        ping.cmd = static_cast<std::uint16_t>(Cmd::kPing);
        ping.id = h.id ^ 0x7700000000ull;
        return p.DstReply(stranger, 0, Bytes(1u << 20, '\xee')) && p.DstReply(ping, 0) &&
               DstHonestRead(p, h) && p.DstReply(h, 0, Bytes(h.length, '\xee'));
      });
    });
    Loop loop;
    auto dev = RemoteDevice::Connect(loop.io(), DstOpts(srv.port()));
    QVERIFY2(dev.ok(), dev.status().ToString().c_str());
    for (std::uint64_t off : {0u, 4096u, 65536u}) {
      IoResult r = Read(*dev.value(), off);
      QVERIFY(r.completed);
      QVERIFY2(r.st.ok(), r.st.ToString().c_str());
      QVERIFY(r.data == Pattern(off, kLen));
    }
    QCOMPARE(srv.connections(), 1);
    QCOMPARE(dev.value()->Stats().bad_replies, std::uint64_t(0));
  }

  // A close in the middle of a payload, once: the READ is re-sent and ends with the right bytes.
  void dstCloseMidPayloadOnceRecovers() {
    HostileServer srv([](HostilePeer& p, int conn) {
      ServeDst(p, test::DstExport(kSize), [conn](HostilePeer& p, const Header& h) {
        if (conn > 0) return DstHonestRead(p, h);
        p.DstReply(h, 0, Bytes(h.length / 2, '\xee'), h.length);
        return false;
      });
    });
    Loop loop;
    auto dev = RemoteDevice::Connect(loop.io(), DstOpts(srv.port()));
    QVERIFY2(dev.ok(), dev.status().ToString().c_str());
    IoResult r = Read(*dev.value(), 12288);
    QVERIFY(r.completed);
    QVERIFY2(r.st.ok(), r.st.ToString().c_str());
    QVERIFY(r.data == Pattern(12288, kLen));
    QVERIFY(srv.connections() >= 2);
  }

  // --- NBD handshake ---------------------------------------------------------------------------

  void nbdHandshake_data() {
    QTest::addColumn<int>("kind");
    QTest::addColumn<int>("code");
    QTest::addColumn<int>("max_ms");
    const int fast = kConnectTimeoutMs - 100, slow = kConnectTimeoutMs + kSlackMs;
    const int proto = int(Status::Code::kProtocolError);
    QTest::newRow("garbage greeting") << 0 << proto << fast;
    QTest::newRow("oldstyle server") << 1 << proto << fast;
    QTest::newRow("endless NBD_REP_SERVER") << 2 << proto << fast;
    QTest::newRow("endless NBD_REP_INFO") << 3 << proto << fast;
    QTest::newRow("option reply length 4 GiB") << 4 << proto << fast;
    QTest::newRow("reply for another option") << 5 << proto << fast;
    QTest::newRow("GO acknowledged without INFO_EXPORT") << 6 << proto << fast;
    QTest::newRow("size 2^63") << 7 << proto << fast;
    QTest::newRow("size 2^64-1") << 8 << proto << fast;
    QTest::newRow("size 0") << 9 << proto << fast;
    QTest::newRow("size not a multiple of the minimum block") << 10 << proto << fast;
    QTest::newRow("size 0 after EXPORT_NAME") << 11 << proto << fast;
    QTest::newRow("silent before the greeting") << 12 << int(Status::Code::kTimedOut) << slow;
    QTest::newRow("silent after GO") << 13 << int(Status::Code::kTimedOut) << slow;
  }
  void nbdHandshake() {
    QFETCH(int, kind);
    QFETCH(int, code);
    QFETCH(int, max_ms);
    const long rss0 = PeakRssMib();
    HostileServer srv([kind](HostilePeer& p, int) {
      // Answers STRUCTURED_REPLY with ERR_UNSUP, then GO with `go`.
      auto to_go = [&p]() {
        std::uint32_t opt = 0;
        std::string data;
        while (p.NbdReadOption(&opt, &data)) {
          if (opt == nb::kOptGo) return true;
          if (!p.NbdOptReply(opt, nb::kRepErrUnsup)) return false;
        }
        return false;
      };
      auto go_export = [&p](std::uint64_t size, bool block_info) {
        if (block_info && !p.NbdOptReply(nb::kOptGo, nb::kRepInfo, nb::InfoBlockSizePayload(4096, 4096, 1u << 20)))
          return;
        if (p.NbdOptReply(nb::kOptGo, nb::kRepInfo, nb::InfoExportPayload(size, nb::kTxHasFlags)))
          p.NbdOptReply(nb::kOptGo, nb::kRepAck);
      };
      switch (kind) {
        case 0: p.Write(Bytes(nb::kGreetingSize, '\xee')); break;
        case 1: {
          std::string g(16, '\0');
          nb::Put64(reinterpret_cast<std::uint8_t*>(g.data()), nb::kNbdMagic);
          nb::Put64(reinterpret_cast<std::uint8_t*>(g.data()) + 8, 0x00420281861253ull);
          p.Write(g + Bytes(136, '\0'));
          break;
        }
        case 2: {
          std::uint32_t opt = 0;
          std::string data;
          if (!p.NbdGreet() || !p.NbdReadOption(&opt, &data)) return;
          while (p.NbdOptReply(opt, nb::kRepServer, nb::ServerPayload("x", "y"))) {
          }
          return;
        }
        case 3:
          if (!p.NbdGreet() || !to_go()) return;
          while (p.NbdOptReply(nb::kOptGo, nb::kRepInfo, nb::InfoStringPayload(nb::kInfoName, "disk"))) {
          }
          return;
        case 4: {
          if (!p.NbdGreet() || !to_go()) return;
          std::uint8_t h[nb::kOptionReplyHeaderSize];
          nb::EncodeOptionReplyHeader(nb::kOptGo, nb::kRepInfo, 0xfffffff0u, h);
          p.Write(std::string(reinterpret_cast<char*>(h), sizeof h) + Bytes(4096, '\xee'));
          break;
        }
        case 5:
          if (p.NbdGreet() && to_go()) p.NbdOptReply(nb::kOptList, nb::kRepAck);
          break;
        case 6:
          if (p.NbdGreet() && to_go()) p.NbdOptReply(nb::kOptGo, nb::kRepAck);
          break;
        case 7: if (p.NbdGreet() && to_go()) go_export(std::uint64_t(1) << 63, false); break;
        case 8: if (p.NbdGreet() && to_go()) go_export(~std::uint64_t(0), false); break;
        case 9: if (p.NbdGreet() && to_go()) go_export(0, false); break;
        case 10: if (p.NbdGreet() && to_go()) go_export(kSize + 512, true); break;
        case 11: {  // not fixed newstyle: EXPORT_NAME, then size 0
          if (!p.NbdGreet(nb::kFlagNoZeroes)) return;
          std::uint32_t opt = 0;
          std::string data;
          if (!p.NbdReadOption(&opt, &data)) return;
          p.Write(Bytes(10, '\0'));
          break;
        }
        case 12: break;
        case 13: if (!p.NbdGreet() || !to_go()) return; break;
      }
      p.Hold();
    });
    Loop loop;
    const auto t0 = Clock::now();
    auto dev = NbdClientDevice::Connect(loop.io(), NbdOpts(srv.port()));
    const auto ms = MsSince(t0);
    QVERIFY2(!dev.ok(), "connected to a hostile server");
    QVERIFY2(int(dev.status().code()) == code, dev.status().ToString().c_str());
    QVERIFY2(ms <= max_ms, qPrintable(QString("took %1 ms: %2").arg(ms).arg(dev.status().ToString().c_str())));
    // Before the cap the client read endless replies until connect_timeout (kTimedOut).
    if (kind == 2 || kind == 3) QVERIFY(dev.status().ToString().find("too many") != std::string::npos);
    QVERIFY(PeakRssMib() - rss0 < kMaxRssGrowthMib);
  }

  // Without INFO_BLOCK_SIZE any size is allowed by the spec: the tail below 512 bytes is cut off.
  void nbdOddSizeIsRoundedDown() {
    const std::uint64_t size = kSize + 100;
    HostileServer srv([&](HostilePeer& p, int) {
      ServeNbd(p, true, [](HostilePeer& p, const nb::Request& r) { return NbdHonestRead(p, r, true); }, size);
    });
    Loop loop;
    auto dev = NbdClientDevice::Connect(loop.io(), NbdOpts(srv.port()));
    QVERIFY2(dev.ok(), dev.status().ToString().c_str());
    QCOMPARE(dev.value()->Info().size, kSize);
    IoResult r = Read(*dev.value(), kSize - kLen);
    QVERIFY(r.completed && r.st.ok());
    QVERIFY(r.data == Pattern(kSize - kLen, kLen));
  }

  // --- NBD data phase --------------------------------------------------------------------------

  void nbdLyingReplies_data() {
    QTest::addColumn<int>("lie");
    QTest::newRow("simple reply, unknown cookie") << int(kUnknownCookie);
    QTest::newRow("chunk past the end of the read") << int(kChunkOutside);
    QTest::newRow("chunk before the start of the read") << int(kChunkBeforeStart);
    QTest::newRow("chunk length 4 GiB") << int(kHugeChunk);
    QTest::newRow("error chunk of 1 MiB") << int(kHugeErrorChunk);
    QTest::newRow("structured reply never negotiated") << int(kUnnegotiated);
    QTest::newRow("bad reply magic") << int(kBadMagic);
    QTest::newRow("DONE with half the bytes") << int(kMissingBytes);
    QTest::newRow("overlapping chunks") << int(kOverlap);
    QTest::newRow("hole of 4 GiB") << int(kHugeHole);
    QTest::newRow("close in the middle of every payload") << int(kNbdCloseMidPayload);
    QTest::newRow("never answers a READ") << int(kNbdSilent);
    QTest::newRow("data chunk for a FLUSH") << int(kDataForFlush);
    QTest::newRow("endless stale chunks instead of an answer") << int(kNbdFlood);
  }
  void nbdLyingReplies() {
    QFETCH(int, lie);
    const long rss0 = PeakRssMib();
    const bool structured = lie != kUnnegotiated;
    HostileServer srv([lie, structured](HostilePeer& p, int) {
      auto read = [lie](HostilePeer& p, const nb::Request& r) {
        const std::uint64_t c = r.cookie;
        const std::string junk = Bytes(r.length, '\xee');
        switch (lie) {
          case kUnknownCookie: return p.NbdSimple(c ^ 0x5500000000ull, 0, junk);
          case kChunkOutside: return p.NbdData(c, nb::kReplyFlagDone, r.offset + 512, junk);
          case kChunkBeforeStart: return p.NbdData(c, nb::kReplyFlagDone, r.offset - 512, junk);
          case kHugeChunk: {
            std::uint8_t h[nb::kChunkHeaderSize];
            nb::EncodeChunkHeader(nb::kReplyFlagDone, nb::kChunkOffsetData, c, 0xffffffffu, h);
            return p.Write(std::string(reinterpret_cast<char*>(h), sizeof h) + junk);
          }
          case kHugeErrorChunk: return p.NbdChunk(c, nb::kReplyFlagDone, nb::kChunkError, Bytes(1u << 20, '\0'));
          case kUnnegotiated: return p.NbdData(c, nb::kReplyFlagDone, r.offset, junk);
          case kBadMagic: return p.Write(Bytes(nb::kSimpleReplySize, '\xee'));
          case kMissingBytes: return p.NbdData(c, nb::kReplyFlagDone, r.offset, junk.substr(0, r.length / 2));
          case kOverlap:
            return p.NbdData(c, 0, r.offset, junk) &&
                   p.NbdData(c, nb::kReplyFlagDone, r.offset + 512, junk.substr(512));
          case kHugeHole: {
            std::string hole(12, '\0');
            nb::Put64(reinterpret_cast<std::uint8_t*>(hole.data()), r.offset);
            nb::Put32(reinterpret_cast<std::uint8_t*>(hole.data()) + 8, 0xfffffe00u);
            return p.NbdChunk(c, nb::kReplyFlagDone, nb::kChunkOffsetHole, hole);
          }
          case kNbdCloseMidPayload: {
            std::uint8_t h[nb::kChunkHeaderSize];
            nb::EncodeChunkHeader(nb::kReplyFlagDone, nb::kChunkOffsetData, c, 8 + r.length, h);
            std::string half(8, '\0');
            nb::Put64(reinterpret_cast<std::uint8_t*>(half.data()), r.offset);
            p.Write(std::string(reinterpret_cast<char*>(h), sizeof h) + half + Pattern(r.offset, r.length / 2));
            return false;
          }
          case kDataForFlush:  // the READ is fine; the FLUSH below is answered with data
            return NbdHonestRead(p, r, true);
          case kNbdFlood:
            while (p.NbdChunk(0xdeadbeef00000001ull, nb::kReplyFlagDone, nb::kChunkNone, {})) {
            }
            return false;
          default: return true;  // kNbdSilent
        }
      };
      if (lie != kDataForFlush) return ServeNbd(p, structured, read);
      if (!p.NbdHandshake(kSize, true)) return;
      nb::Request r;
      while (p.NbdReadRequest(&r)) {
        const bool ok = r.type == nb::kCmdRead ? read(p, r)
                                               : p.NbdData(r.cookie, nb::kReplyFlagDone, 0, Bytes(kLen, '\xee'));
        if (!ok) return;
      }
    });
    Loop loop;
    auto dev = NbdClientDevice::Connect(loop.io(), NbdOpts(srv.port()));
    QVERIFY2(dev.ok(), dev.status().ToString().c_str());
    if (lie == kDataForFlush) {
      IoResult f = Io(*dev.value(), IoOp::kFlush, 0, 0, kIoTimeoutMs + kSlackMs + 2000);
      EXPECT_EIO(f);
      return;
    }
    IoResult r = Read(*dev.value(), 8192);
    EXPECT_EIO(r);
    if (lie == kChunkOutside || lie == kMissingBytes || lie == kOverlap || lie == kHugeHole)
      QVERIFY(dev.value()->Stats().bad_replies > 0);
    QVERIFY(PeakRssMib() - rss0 < kMaxRssGrowthMib);
  }

  // Chunks for cookies never sent (one of them 1 MiB long), a BLOCK_STATUS chunk nobody asked
  // for and a second DONE chunk for a finished READ are drained; the reads get the right bytes
  // on one connection.
  void nbdUnknownAndDuplicateChunks() {
    HostileServer srv([](HostilePeer& p, int) {
      ServeNbd(p, true, [](HostilePeer& p, const nb::Request& r) {
        const std::uint64_t stranger = 0xdeadbeef00000042ull;
        return p.NbdData(stranger, 0, 0, Bytes(1u << 20, '\xee')) &&
               p.NbdChunk(stranger, nb::kReplyFlagDone, nb::kChunkBlockStatus, Bytes(12, '\0')) &&
               p.NbdData(r.cookie, 0, r.offset + r.length / 2, Pattern(r.offset + r.length / 2, r.length / 2)) &&
               p.NbdData(r.cookie, nb::kReplyFlagDone, r.offset, Pattern(r.offset, r.length / 2)) &&
               p.NbdData(r.cookie, nb::kReplyFlagDone, r.offset, Bytes(r.length, '\xee'));
      });
    });
    Loop loop;
    auto dev = NbdClientDevice::Connect(loop.io(), NbdOpts(srv.port()));
    QVERIFY2(dev.ok(), dev.status().ToString().c_str());
    for (std::uint64_t off : {0u, 4096u, 65536u}) {
      IoResult r = Read(*dev.value(), off);
      QVERIFY(r.completed);
      QVERIFY2(r.st.ok(), r.st.ToString().c_str());
      QVERIFY(r.data == Pattern(off, kLen));
    }
    QCOMPARE(srv.connections(), 1);
    QCOMPARE(dev.value()->Stats().bad_replies, std::uint64_t(0));
  }

  // Simple replies cannot be drained (their length is not on the wire): a second reply to a
  // finished READ replaces the connection, and the data handed out stays right.
  void nbdDuplicateSimpleReply() {
    HostileServer srv([](HostilePeer& p, int) {
      ServeNbd(p, false, [](HostilePeer& p, const nb::Request& r) {
        return NbdHonestRead(p, r, false) && p.NbdSimple(r.cookie, 0, Bytes(r.length, '\xee'));
      });
    });
    Loop loop;
    auto dev = NbdClientDevice::Connect(loop.io(), NbdOpts(srv.port()));
    QVERIFY2(dev.ok(), dev.status().ToString().c_str());
    for (std::uint64_t off : {0u, 4096u}) {
      IoResult r = Read(*dev.value(), off);
      QVERIFY(r.completed);
      QVERIFY2(r.st.ok(), r.st.ToString().c_str());
      QVERIFY(r.data == Pattern(off, kLen));
    }
  }

  void nbdCloseMidPayloadOnceRecovers() {
    HostileServer srv([](HostilePeer& p, int conn) {
      ServeNbd(p, false, [conn](HostilePeer& p, const nb::Request& r) {
        if (conn > 0) return NbdHonestRead(p, r, false);
        std::uint8_t h[nb::kSimpleReplySize];
        nb::EncodeSimpleReply(0, r.cookie, h);
        p.Write(std::string(reinterpret_cast<char*>(h), sizeof h) + Bytes(r.length / 2, '\xee'));
        return false;
      });
    });
    Loop loop;
    auto dev = NbdClientDevice::Connect(loop.io(), NbdOpts(srv.port()));
    QVERIFY2(dev.ok(), dev.status().ToString().c_str());
    IoResult r = Read(*dev.value(), 12288);
    QVERIFY(r.completed);
    QVERIFY2(r.st.ok(), r.st.ToString().c_str());
    QVERIFY(r.data == Pattern(12288, kLen));
    QVERIFY(srv.connections() >= 2);
  }
};

QTEST_GUILESS_MAIN(HostileServerTest)
#include "hostile_server_test.moc"
