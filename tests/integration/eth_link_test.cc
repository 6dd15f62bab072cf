// EthLink on a veth pair between two network namespaces the test creates (issue 13, slice 1):
// every transmit mode (TX ring, sendmmsg, one send per frame) against both receive modes (RX
// ring, recvmmsg) carries N frames intact, the batched modes in far fewer send calls than
// frames; malformed frames injected beside the link are counted and skipped; without
// CAP_NET_RAW Open() says so.  Never touches an interface it did not create.
#include <linux/capability.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/strand.hpp>

#include "dst/net/codec.h"
#include "dst/net/eth_link.h"
#include "test_env.h"
#include "veth_netns.h"

using namespace dst;
using namespace dst::net;
using Tx = EthLinkOptions::Tx;
using Rx = EthLinkOptions::Rx;
using Clock = std::chrono::steady_clock;

Q_DECLARE_METATYPE(EthLinkOptions::Tx)
Q_DECLARE_METATYPE(EthLinkOptions::Rx)

namespace {

constexpr std::uint64_t kSession = 0x5eed;

std::uint8_t PayloadByte(std::uint32_t seq, std::size_t i) { return std::uint8_t(seq * 131 + i * 7 + (i >> 8)); }
// Sizes from 1 byte to a full 1436-byte fragment (every 7th frame is a full 1514-byte frame).
std::size_t PayloadLen(std::uint32_t seq, std::size_t max) { return seq % 7 == 0 ? max : 1 + (seq * 37) % max; }

EthHeader DataFrame(const EthLink& from, const std::uint8_t* to, std::uint32_t seq, std::size_t len) {
  EthHeader h;
  std::memcpy(h.dst, to, kMacLen);
  std::memcpy(h.src, from.mac(), kMacLen);
  h.session = kSession;
  h.packet = seq + 1;
  h.seq = seq;
  h.msg_len = std::uint32_t(len);
  h.frag_count = 1;
  return h;
}

// Two links on one veth pair: `a` in the first namespace sends, `b` in the second receives.
struct Pair {
  boost::asio::io_context io;
  Strand strand{boost::asio::make_strand(io.get_executor())};
  dst::test::VethNetns veth;
  std::unique_ptr<EthLink> a, b;

  Status Open(Tx tx, Rx rx, unsigned mtu = 1500) {
    std::string err;
    if (!veth.Create(&err, mtu)) return Status::Unavailable(err);
    EthLinkOptions oa;
    oa.ifname = veth.ifname(0);
    oa.tx = tx;
    oa.rx = Rx::kNone;
    EthLinkOptions ob;
    ob.ifname = veth.ifname(1);
    ob.tx = Tx::kSendto;
    ob.rx = rx;
    {
      dst::test::InNetns in(veth.ns(0));
      if (!in.ok()) return Status::Unavailable("setns " + veth.ns(0));
      auto r = EthLink::Open(strand, oa);
      if (!r.ok()) return r.status();
      a = std::move(r.value());
    }
    dst::test::InNetns in(veth.ns(1));
    if (!in.ok()) return Status::Unavailable("setns " + veth.ns(1));
    auto r = EthLink::Open(strand, ob);
    if (!r.ok()) return r.status();
    b = std::move(r.value());
    return Status::OK();
  }

  // Waits (through AsyncWaitReadable and the io_context) until b may have frames, or `ms` passed.
  void WaitReadable(int ms) {
    auto fired = std::make_shared<bool>(false);
    b->AsyncWaitReadable([fired](const boost::system::error_code&, std::size_t) { *fired = true; });
    io.restart();
    const auto end = Clock::now() + std::chrono::milliseconds(ms);
    while (!*fired && Clock::now() < end) io.run_one_for(std::chrono::milliseconds(5));
  }

  // Waits for b until every frame in `seen` arrived (false on a bad frame; got says how many).
  bool ReceiveAll(std::vector<bool>& seen, std::size_t* got) { return ReceiveUntil(seen, got, seen.size()); }
  // Waits for b until `want` frames arrived.  A raw link has no flow control (that is the
  // transport's window, later): a sender that runs ahead of a receiver the scheduler is not
  // running overflows its socket buffer or ring, so the tests send one window at a time.
  bool ReceiveUntil(std::vector<bool>& seen, std::size_t* got, std::size_t want);

  // Flushes everything a has queued (waiting for room when the kernel pushes back).
  bool FlushAll() {
    const auto end = Clock::now() + std::chrono::seconds(10);
    while (a->tx_queued() && Clock::now() < end) {
      boost::system::error_code ec;
      a->Flush(ec);
      if (ec == boost::asio::error::would_block) {
        pollfd p{a->tx_fd(), POLLOUT, 0};
        ::poll(&p, 1, 5);
      } else if (ec) {
        qWarning("flush: %s", ec.message().c_str());
        return false;
      }
    }
    return a->tx_queued() == 0;
  }
};

// Writes frame `seq` (the test pattern) straight into a's next slot and commits it.
bool QueueSeq(EthLink& a, const EthLink& b, std::uint32_t seq, std::vector<std::uint8_t>& scratch) {
  const std::size_t len = PayloadLen(seq, a.max_fragment());
  scratch.resize(a.max_fragment());
  for (std::size_t k = 0; k < len; ++k) scratch[k] = PayloadByte(seq, k);
  std::uint8_t* buf = a.NextTxBuffer();
  if (!buf) return false;
  const std::size_t n = EncodeEthFrame(DataFrame(a, b.mac(), seq, len), scratch.data(), len, buf, a.max_frame());
  if (n != kEthOverhead + len) return false;
  a.CommitTx(n);
  return true;
}

// Drains b, checking each frame against the pattern; returns false on a bad or repeated frame.
bool Drain(EthLink& b, std::vector<bool>& seen, std::size_t* got) {
  EthHeader h;
  const std::uint8_t* p;
  while (b.NextRx(&h, &p)) {
    if (h.session != kSession || h.seq >= seen.size() || seen[h.seq]) {
      qWarning("unexpected frame seq %u session %llu", h.seq, (unsigned long long)h.session);
      return false;
    }
    const std::size_t len = PayloadLen(h.seq, b.max_fragment());
    if (h.payload_len != len || h.msg_len != len || h.packet != h.seq + 1u) {
      qWarning("frame %u: payload_len %u, expected %zu", h.seq, h.payload_len, len);
      return false;
    }
    for (std::size_t i = 0; i < len; ++i)
      if (p[i] != PayloadByte(h.seq, i)) {
        qWarning("frame %u: byte %zu differs", h.seq, i);
        return false;
      }
    seen[h.seq] = true;
    ++*got;
  }
  return true;
}

bool Pair::ReceiveUntil(std::vector<bool>& seen, std::size_t* got, std::size_t want) {
  const auto end = Clock::now() + std::chrono::seconds(10);
  if (!Drain(*b, seen, got)) return false;
  while (*got < want && Clock::now() < end) {
    WaitReadable(20);
    if (!Drain(*b, seen, got)) return false;
  }
  return true;
}

void RequireNetns() {
  DST_REQUIRE(dst::test::IsRoot(), "network namespaces and AF_PACKET sockets need root");
  DST_REQUIRE(dst::test::HaveTool("ip"), "iproute2 (ip) not installed");
}

void Inject(const std::string& ifname, const std::vector<std::uint8_t>& frame) {
  QVERIFY(dst::test::InjectFrame(ifname, frame));
}

}  // namespace

class EthLinkTest : public QObject {
  Q_OBJECT

 private slots:
  void framesArriveIntact_data() {
    QTest::addColumn<Tx>("tx");
    QTest::addColumn<Rx>("rx");
    QTest::newRow("tx_ring/rx_ring") << Tx::kRing << Rx::kRing;
    QTest::newRow("tx_ring/recvmmsg") << Tx::kRing << Rx::kRecvmmsg;
    QTest::newRow("sendmmsg/rx_ring") << Tx::kSendmmsg << Rx::kRing;
    QTest::newRow("sendmmsg/recvmmsg") << Tx::kSendmmsg << Rx::kRecvmmsg;
    QTest::newRow("sendto/rx_ring") << Tx::kSendto << Rx::kRing;
    QTest::newRow("sendto/recvmmsg") << Tx::kSendto << Rx::kRecvmmsg;
  }
  void framesArriveIntact() {
    QFETCH(Tx, tx);
    QFETCH(Rx, rx);
    RequireNetns();
    Pair pr;
    const Status s = pr.Open(tx, rx);
    QVERIFY2(s.ok(), s.ToString().c_str());
    EthLink& a = *pr.a;
    EthLink& b = *pr.b;
    QCOMPARE(a.tx_mode(), tx);
    QCOMPARE(b.rx_mode(), rx);
    if (rx == Rx::kRecvmmsg) {  // room for a peer's whole TX ring flush, not rmem_default's ~90 frames
      int rcvbuf = 0;
      socklen_t len = sizeof rcvbuf;
      QVERIFY(::getsockopt(b.rx_fd(), SOL_SOCKET, SO_RCVBUF, &rcvbuf, &len) == 0);
      QVERIFY2(rcvbuf >= (2 << 20), qPrintable(QString::number(rcvbuf)));
    }
    QCOMPARE(a.mtu(), 1500u);
    QCOMPARE(a.max_frame(), std::size_t(1514));

    constexpr std::uint32_t kFrames = 3000, kBatch = 64;
    std::vector<bool> seen(kFrames);
    std::size_t got = 0;
    std::vector<std::uint8_t> scratch;
    std::uint32_t seq = 0;
    while (seq < kFrames) {
      // One batch: written straight into the link's slots, then one Flush.
      for (std::uint32_t i = 0; i < kBatch && seq < kFrames; ++i, ++seq) QVERIFY(QueueSeq(a, b, seq, scratch));
      QVERIFY(pr.FlushAll());
      QVERIFY(pr.ReceiveUntil(seen, &got, seq));
      QVERIFY2(got == seq, qPrintable(QString("%1 of %2 frames arrived, kernel drops %3")
                                          .arg(got).arg(seq).arg(b.UpdateKernelDrops())));
    }
    QVERIFY(pr.ReceiveAll(seen, &got));
    b.UpdateKernelDrops();
    const EthLinkStats& st = a.stats();
    const EthLinkStats& rs = b.stats();
    qInfo("%s -> %s: %llu frames in %llu send calls (%.1f per call), ring peak %llu; received %llu in %llu "
          "calls (%.1f per call), kernel drops %llu",
          EthLink::TxModeName(tx), EthLink::RxModeName(rx), (unsigned long long)st.tx.frames.load(),
          (unsigned long long)st.tx.syscalls.load(), st.tx.FramesPerCall(),
          (unsigned long long)st.tx_ring_peak.load(), (unsigned long long)rs.rx_frames.load(),
          (unsigned long long)rs.rx_calls.load(), rs.FramesPerRxCall(),
          (unsigned long long)rs.rx_kernel_drops.load());
    QCOMPARE(got, std::size_t(kFrames));
    QCOMPARE(rs.rx_frames.load(), std::uint64_t(kFrames));
    QCOMPARE(rs.rx_malformed.load(), std::uint64_t(0));
    QCOMPARE(st.tx.frames.load(), std::uint64_t(kFrames));
    QCOMPARE(st.tx_ring_occupancy.load() <= st.tx_ring_peak.load(), true);
    if (tx == Tx::kSendto) {
      QCOMPARE(st.tx.syscalls.load(), std::uint64_t(kFrames));
    } else {
      // About one call per batch; far fewer than frames.
      QVERIFY2(st.tx.syscalls.load() * 10 < kFrames, "batched transmit used too many send calls");
      QVERIFY(st.tx.FramesPerCall() > 10.0);
      QVERIFY(st.tx_ring_peak.load() >= kBatch);
    }
    QVERIFY(rs.FramesPerRxCall() > 1.0);
  }

  void malformedFramesCountedAndSkipped_data() {
    QTest::addColumn<Rx>("rx");
    QTest::newRow("rx_ring") << Rx::kRing;
    QTest::newRow("recvmmsg") << Rx::kRecvmmsg;
  }
  void malformedFramesCountedAndSkipped() {
    QFETCH(Rx, rx);
    RequireNetns();
    Pair pr;
    const Status s = pr.Open(Tx::kAuto, rx);
    QVERIFY2(s.ok(), s.ToString().c_str());
    EthLink& a = *pr.a;
    EthLink& b = *pr.b;

    std::vector<std::uint8_t> payload(100);
    for (std::size_t k = 0; k < payload.size(); ++k) payload[k] = PayloadByte(1, k);
    auto valid = [&] {
      std::vector<std::uint8_t> f(a.max_frame());
      f.resize(EncodeEthFrame(DataFrame(a, b.mac(), 1, 100), payload.data(), 100, f.data(), f.size()));
      return f;
    };
    constexpr std::size_t D = kEthHeaderSize;
    std::vector<std::vector<std::uint8_t>> bad;
    auto f = valid();
    f.resize(40);
    bad.push_back(f);  // truncated header
    f = valid();
    f.resize(f.size() - 1);
    bad.push_back(f);  // truncated payload
    f = valid();
    f.push_back(0);
    bad.push_back(f);  // trailing byte
    f = valid();
    f[D + 2] = 9;
    bad.push_back(f);  // bad version
    f = valid();
    f[D] = 0;
    bad.push_back(f);  // bad magic
    f = valid();
    PutU16(f.data() + D + 44, 2000);
    bad.push_back(f);  // oversized payload length
    f = valid();
    f[D + kEthTagOffset] = 1;
    bad.push_back(f);  // tag without the AEAD flag
    f = valid();
    PutU16(f.data() + D + 4, 0x8000);
    bad.push_back(f);  // unknown flag
    auto wrong_type = valid();
    PutU16(wrong_type.data() + 12, 0x88B6);  // never reaches the link's socket
    auto other_station = valid();
    other_station[0] = 0x02;
    other_station[5] ^= 0x55;  // a unicast MAC that is not b's

    {
      dst::test::InNetns in(pr.veth.ns(0));
      QVERIFY(in.ok());
      for (const auto& x : bad) Inject(pr.veth.ifname(0), x);
      Inject(pr.veth.ifname(0), wrong_type);
      Inject(pr.veth.ifname(0), other_station);
    }
    // Then good frames through the link itself: they still arrive, the peer is unaffected.
    constexpr std::uint32_t kGood = 10;
    for (std::uint32_t seq = 0; seq < kGood; ++seq) {
      const std::size_t len = PayloadLen(seq, a.max_fragment());
      std::vector<std::uint8_t> pl(len);
      for (std::size_t k = 0; k < len; ++k) pl[k] = PayloadByte(seq, k);
      std::uint8_t* buf = a.NextTxBuffer();
      QVERIFY(buf);
      a.CommitTx(EncodeEthFrame(DataFrame(a, b.mac(), seq, len), pl.data(), len, buf, a.max_frame()));
    }
    QVERIFY(pr.FlushAll());
    std::vector<bool> seen(kGood);
    std::size_t got = 0;
    const auto end = Clock::now() + std::chrono::seconds(10);  // the malformed ones may come last
    while ((got < kGood || b.stats().rx_malformed.load() < bad.size()) && Clock::now() < end) {
      QVERIFY(Drain(b, seen, &got));
      if (got < kGood) pr.WaitReadable(20);
    }
    QVERIFY(Drain(b, seen, &got));
    QCOMPARE(got, std::size_t(kGood));
    QCOMPARE(b.stats().rx_malformed.load(), std::uint64_t(bad.size()));
    QCOMPARE(b.stats().rx_not_for_us.load(), std::uint64_t(1));
    QCOMPARE(b.stats().rx_frames.load(), std::uint64_t(kGood));
  }

  // Every slot filled before one Flush: NextTxBuffer says when the ring (or the sendmmsg batch)
  // is full, and one call hands the kernel all of it.
  void fullRingInOneCall_data() {
    QTest::addColumn<Tx>("tx");
    QTest::newRow("tx_ring") << Tx::kRing;
    QTest::newRow("sendmmsg") << Tx::kSendmmsg;
  }
  void fullRingInOneCall() {
    QFETCH(Tx, tx);
    RequireNetns();
    Pair pr;
    const Status s = pr.Open(tx, Rx::kRing);
    QVERIFY2(s.ok(), s.ToString().c_str());
    EthLink& a = *pr.a;
    std::vector<std::uint8_t> scratch;
    std::uint32_t n = 0;
    while (QueueSeq(a, *pr.b, n, scratch)) ++n;
    // Defaults: 512 ring slots (rounded up to whole 64 KiB blocks of 1552-byte slots), batch 64.
    if (tx == Tx::kRing) {
      QVERIFY2(n >= 512 && n < 512 + 42, qPrintable(QString::number(n)));
      QCOMPARE(a.stats().tx_ring_occupancy.load(), std::uint64_t(n));
    } else {
      QCOMPARE(n, 64u);
    }
    QCOMPARE(a.tx_queued(), std::size_t(n));
    boost::system::error_code ec;
    QCOMPARE(a.Flush(ec), std::size_t(n));
    QVERIFY(!ec);
    QCOMPARE(a.stats().tx.syscalls.load(), std::uint64_t(1));
    QCOMPARE(a.tx_queued(), std::size_t(0));
    std::vector<bool> seen(n);
    std::size_t got = 0;
    QVERIFY(pr.ReceiveAll(seen, &got));
    QCOMPARE(got, std::size_t(n));
    // The kernel released the slots: the ring takes a full load again.
    std::uint32_t again = 0;
    const auto end = Clock::now() + std::chrono::seconds(5);
    while (again < n && Clock::now() < end) {
      if (QueueSeq(a, *pr.b, again, scratch)) ++again;
      else QTest::qWait(1);
    }
    QCOMPARE(again, n);
  }

  // Jumbo frames: on a 9000-byte link the link offers 8936-byte fragments and they arrive whole.
  void jumboFrames() {
    RequireNetns();
    Pair pr;
    const Status s = pr.Open(Tx::kRing, Rx::kRing, 9000);
    QVERIFY2(s.ok(), s.ToString().c_str());
    EthLink& a = *pr.a;
    QCOMPARE(a.mtu(), 9000u);
    QCOMPARE(a.max_frame(), std::size_t(9014));
    QCOMPARE(pr.b->max_fragment(), std::size_t(8936));
    constexpr std::uint32_t kFrames = 500;
    std::vector<bool> seen(kFrames);
    std::size_t got = 0;
    std::vector<std::uint8_t> scratch;
    for (std::uint32_t seq = 0; seq < kFrames;) {
      for (int i = 0; i < 32 && seq < kFrames; ++i, ++seq) QVERIFY(QueueSeq(a, *pr.b, seq, scratch));
      QVERIFY(pr.FlushAll());
      QVERIFY(pr.ReceiveUntil(seen, &got, seq));
    }
    QVERIFY(pr.ReceiveAll(seen, &got));
    QCOMPARE(got, std::size_t(kFrames));
    QVERIFY(pr.b->stats().rx_bytes.load() > std::uint64_t(kFrames / 7) * 9014);
  }

  // Without CAP_NET_RAW (dropped from this thread's effective set) Open names the capability.
  void withoutCapNetRawOpenSaysSo() {
    DST_REQUIRE(dst::test::IsRoot(), "needs root to drop CAP_NET_RAW and see the error");
    Status st;
    bool dropped = false;
    std::thread t([&] {
      __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
      __user_cap_data_struct data[2] = {};
      if (::syscall(SYS_capget, &hdr, data) != 0) return;
      data[CAP_NET_RAW / 32].effective &= ~(1u << (CAP_NET_RAW % 32));
      if (::syscall(SYS_capset, &hdr, data) != 0) return;
      dropped = true;
      boost::asio::io_context io;
      EthLinkOptions o;
      o.ifname = "lo";
      auto r = EthLink::Open(boost::asio::make_strand(io.get_executor()), o);
      st = r.ok() ? Status::OK() : r.status();
    });
    t.join();
    QVERIFY(dropped);
    QVERIFY(!st.ok());
    QVERIFY2(st.ToString().find("CAP_NET_RAW") != std::string::npos, st.ToString().c_str());
  }

  // Close ends a pending wait with operation_aborted; the closed link takes no frames.
  void closeEndsWaits() {
    RequireNetns();
    Pair pr;
    const Status s = pr.Open(Tx::kAuto, Rx::kAuto);
    QVERIFY2(s.ok(), s.ToString().c_str());
    QCOMPARE(pr.a->tx_mode(), Tx::kRing);
    QCOMPARE(pr.b->rx_mode(), Rx::kRing);
    auto result = std::make_shared<boost::system::error_code>(boost::asio::error::would_block);
    pr.b->AsyncWaitReadable([result](const boost::system::error_code& ec, std::size_t) { *result = ec; });
    pr.b->Close();
    pr.b->Close();  // idempotent
    pr.io.restart();
    pr.io.run_for(std::chrono::seconds(2));
    QCOMPARE(*result, boost::system::error_code(boost::asio::error::operation_aborted));
    pr.a->Close();
    QVERIFY(!pr.a->is_open());
    QVERIFY(pr.a->NextTxBuffer() == nullptr);
    boost::system::error_code ec;
    QCOMPARE(pr.a->Flush(ec), std::size_t(0));
    QVERIFY(ec);
    EthHeader h;
    const std::uint8_t* p;
    QVERIFY(!pr.b->NextRx(&h, &p));
  }

  void unknownInterfaceIsNotFound() {
    boost::asio::io_context io;
    EthLinkOptions o;
    o.ifname = "dst-no-such0";
    auto r = EthLink::Open(boost::asio::make_strand(io.get_executor()), o);
    QVERIFY(!r.ok());
    QVERIFY(r.status().IsNotFound());
  }
};

DST_TEST_MAIN(EthLinkTest)
#include "eth_link_test.moc"
