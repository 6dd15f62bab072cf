// AEAD for DST-Eth frames (eth_aead.h, docs/protocol.md §12.6): HKDF keys are the same on both
// hosts and differ per direction, session, identity and PSK; a sealed frame decodes (flag AEAD,
// tag set) and opens to the original payload; any changed bit of headers or payload, a wrong
// key or a replay is refused and counted; the packet counter gives every frame a new nonce and
// never wraps; the replay window takes reordering within its span; no allocation per frame.
#include <QtTest/QtTest>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <set>
#include <vector>

#include <openssl/crypto.h>

#include "dst/net/eth_aead.h"
#include "dst/net/eth_format.h"
#include "test_env.h"

using namespace dst::net;

// ---- allocation counting: operator new and OpenSSL's allocator ----
namespace {
std::atomic<std::uint64_t> g_allocs{0};
void* CountedMalloc(std::size_t n, const char*, int) {
  g_allocs.fetch_add(1, std::memory_order_relaxed);
  return std::malloc(n);
}
void* CountedRealloc(void* p, std::size_t n, const char*, int) {
  g_allocs.fetch_add(1, std::memory_order_relaxed);
  return std::realloc(p, n);
}
void CountedFree(void* p, const char*, int) { std::free(p); }
const bool g_crypto_counted = CRYPTO_set_mem_functions(CountedMalloc, CountedRealloc, CountedFree) == 1;
}  // namespace

void* operator new(std::size_t n) {
  g_allocs.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace {

const std::vector<std::uint8_t> kPsk(32, 0x5a);

EthHeader Data(std::uint64_t session, std::uint32_t seq, std::uint32_t len) {
  EthHeader h;
  const std::uint8_t dst[6] = {0x02, 0, 0, 0, 0, 1}, src[6] = {0x02, 0, 0, 0, 0, 2};
  std::memcpy(h.dst, dst, 6);
  std::memcpy(h.src, src, 6);
  h.type = EthType::kData;
  h.session = session;
  h.seq = seq;
  h.msg_len = len;
  h.frag_count = 1;
  return h;
}

std::vector<std::uint8_t> Frame(std::uint32_t seq, const std::vector<std::uint8_t>& payload) {
  std::vector<std::uint8_t> f(kEthOverhead + payload.size());
  const std::size_t n = EncodeEthFrame(Data(7, seq, std::uint32_t(payload.size())), payload.data(), payload.size(),
                                       f.data(), f.size());
  f.resize(n);
  return f;
}

std::vector<std::uint8_t> Payload(std::size_t n, std::uint8_t seed) {
  std::vector<std::uint8_t> p(n);
  for (std::size_t i = 0; i < n; ++i) p[i] = std::uint8_t(seed + i * 31);
  return p;
}

}  // namespace

class EthAeadTest : public QObject {
  Q_OBJECT
 private slots:
  void keys() {
    auto k = DeriveEthKeys(kPsk, "alice", "bob", 7);
    QVERIFY(k.ok());
    auto again = DeriveEthKeys(kPsk, "alice", "bob", 7);
    QVERIFY(again.ok());
    QCOMPARE(k.value().initiator_to_responder, again.value().initiator_to_responder);  // both hosts agree
    QVERIFY(k.value().initiator_to_responder != k.value().responder_to_initiator);
    QVERIFY(DeriveEthKeys(kPsk, "alice", "bob", 8).value().initiator_to_responder != k.value().initiator_to_responder);
    QVERIFY(DeriveEthKeys(kPsk, "bob", "alice", 7).value().initiator_to_responder != k.value().initiator_to_responder);
    // The separator keeps ("ab", "c") and ("a", "bc") apart.
    QVERIFY(DeriveEthKeys(kPsk, "ab", "c", 7).value().initiator_to_responder !=
            DeriveEthKeys(kPsk, "a", "bc", 7).value().initiator_to_responder);
    std::vector<std::uint8_t> other = kPsk;
    other[0] ^= 1;
    QVERIFY(DeriveEthKeys(other, "alice", "bob", 7).value().initiator_to_responder != k.value().initiator_to_responder);
    QVERIFY(!DeriveEthKeys(std::vector<std::uint8_t>(15, 1), "a", "b", 7).ok());  // PSK too short
    QVERIFY(!DeriveEthKeys(kPsk, "a", "b", 0).ok());                              // no session
  }

  void sealOpenRoundTrip() {
    const EthSessionKeys k = DeriveEthKeys(kPsk, "alice", "bob", 7).value();
    EthSealer seal(k.initiator_to_responder);
    EthOpener open(k.initiator_to_responder);
    for (std::size_t n : {std::size_t(1), std::size_t(48), std::size_t(1436), std::size_t(8000)}) {
      const auto payload = Payload(n, std::uint8_t(n));
      auto f = Frame(1, payload);
      QVERIFY(seal.Seal(f.data(), f.size()));
      QVERIFY(std::vector<std::uint8_t>(f.begin() + kEthOverhead, f.end()) != payload || n < 4);  // encrypted
      EthHeader h;
      const std::uint8_t* p = nullptr;
      QCOMPARE(int(DecodeEthFrame(f.data(), f.size(), 9000, &h, &p)), int(EthDecodeError::kOk));
      QVERIFY(h.flags & kEthFlagAead);
      QCOMPARE(h.packet, seal.next_packet() - 1);
      QVERIFY(open.Open(f.data(), f.size()));
      QCOMPARE(std::vector<std::uint8_t>(f.begin() + kEthOverhead, f.end()), payload);
    }
    QCOMPARE(seal.counters().sealed, std::uint64_t(4));
    QCOMPARE(open.counters().opened, std::uint64_t(4));
    // Sealing a sealed frame, or a frame whose length disagrees with payload_len, is refused.
    auto f = Frame(2, Payload(100, 3));
    QVERIFY(seal.Seal(f.data(), f.size()));
    QVERIFY(!seal.Seal(f.data(), f.size()));
    auto g = Frame(3, Payload(100, 3));
    QVERIFY(!seal.Seal(g.data(), g.size() - 1));
    QCOMPARE(seal.counters().malformed, std::uint64_t(2));
  }

  // Every bit of the 78 header bytes and the payload is covered: flipping any one is refused,
  // and the replay window does not move for a refused frame.
  void tamperedFramesAreRefused() {
    const EthSessionKeys k = DeriveEthKeys(kPsk, "alice", "bob", 7).value();
    EthSealer seal(k.initiator_to_responder);
    auto sealed = Frame(1, Payload(200, 9));
    QVERIFY(seal.Seal(sealed.data(), sealed.size()));
    std::uint64_t refused = 0;
    for (std::size_t i = 0; i < sealed.size(); ++i) {
      if (i == kEthHeaderSize + 44 || i == kEthHeaderSize + 45) continue;  // payload_len: a shape change
      for (int bit : {0, 7}) {
        auto f = sealed;
        f[i] ^= std::uint8_t(1 << bit);
        EthOpener open(k.initiator_to_responder);
        QVERIFY2(!open.Open(f.data(), f.size()), qPrintable(QString("byte %1 bit %2").arg(i).arg(bit)));
        refused += open.counters().bad_tag + open.counters().replayed + open.counters().malformed;
      }
    }
    QCOMPARE(refused, std::uint64_t(2 * (sealed.size() - 2)));
    // The wrong key, and the other direction's key.
    EthOpener wrong(DeriveEthKeys(kPsk, "alice", "mallory", 7).value().initiator_to_responder);
    auto f = sealed;
    QVERIFY(!wrong.Open(f.data(), f.size()));
    QCOMPARE(wrong.counters().bad_tag, std::uint64_t(1));
    EthOpener reverse(k.responder_to_initiator);
    f = sealed;
    QVERIFY(!reverse.Open(f.data(), f.size()));
    // An unsealed frame is not accepted as one.
    EthOpener open(k.initiator_to_responder);
    auto plain = Frame(1, Payload(200, 9));
    QVERIFY(!open.Open(plain.data(), plain.size()));
    QCOMPARE(open.counters().malformed, std::uint64_t(1));
    f = sealed;
    QVERIFY(open.Open(f.data(), f.size()));  // the real one still opens after all that
  }

  void replayWindow() {
    const EthSessionKeys k = DeriveEthKeys(kPsk, "alice", "bob", 7).value();
    EthSealer seal(k.initiator_to_responder);
    EthOpener open(k.initiator_to_responder);
    std::vector<std::vector<std::uint8_t>> frames;
    for (int i = 0; i < 300; ++i) {
      frames.push_back(Frame(std::uint32_t(i), Payload(64, std::uint8_t(i))));
      QVERIFY(seal.Seal(frames.back().data(), frames.back().size()));
    }
    // Reordered: 200..299 first, then 100..199 (within the span) all open; each once only.
    for (int i = 200; i < 300; ++i) {
      auto f = frames[std::size_t(i)];
      QVERIFY(open.Open(f.data(), f.size()));
    }
    for (int i = 100; i < 200; ++i) {
      auto f = frames[std::size_t(i)];
      QVERIFY2(open.Open(f.data(), f.size()), qPrintable(QString::number(i)));
      auto dup = frames[std::size_t(i)];
      QVERIFY(!open.Open(dup.data(), dup.size()));
    }
    QCOMPARE(open.counters().replayed, std::uint64_t(100));
    // Far behind: a window of EthReplayWindow::kSpan.
    EthReplayWindow w;
    QVERIFY(!w.Fresh(0));
    w.Accept(5000);
    QVERIFY(w.Fresh(5000 - EthReplayWindow::kSpan + 64));
    QVERIFY(!w.Fresh(5000 - EthReplayWindow::kSpan));
    QVERIFY(!w.Fresh(5000));
    QVERIFY(w.Fresh(4999));
    w.Accept(4999);
    QVERIFY(!w.Fresh(4999));
    // A jump past the whole window clears it: old bits do not stick to new numbers.
    const std::uint64_t jump = 5000 + 10 * EthReplayWindow::kSpan;
    w.Accept(jump);
    QVERIFY(w.Fresh(jump - 1));
    for (std::uint64_t p = jump + 1; p < jump + EthReplayWindow::kSpan; p += 7) {
      QVERIFY(w.Fresh(p));
      w.Accept(p);
      QVERIFY(!w.Fresh(p));
      if (p - 1 != jump) QVERIFY(w.Fresh(p - 1));
    }
  }

  // The nonce (the packet number) is new on every frame, re-sends included, and never wraps.
  void packetNumbersNeverRepeat() {
    const EthSessionKeys k = DeriveEthKeys(kPsk, "alice", "bob", 7).value();
    EthSealer seal(k.initiator_to_responder);
    std::set<std::uint64_t> seen;
    for (int i = 0; i < 1000; ++i) {
      auto f = Frame(1, Payload(32, 1));  // the same fragment sent again and again
      QVERIFY(seal.Seal(f.data(), f.size()));
      EthHeader h;
      const std::uint8_t* p = nullptr;
      QCOMPARE(int(DecodeEthFrame(f.data(), f.size(), 9000, &h, &p)), int(EthDecodeError::kOk));
      QVERIFY(seen.insert(h.packet).second);
    }
    seal.SetNextPacketForTest(UINT64_MAX);
    auto last = Frame(1, Payload(32, 1));
    QVERIFY(seal.Seal(last.data(), last.size()));
    auto after = Frame(1, Payload(32, 1));
    const auto before = after;
    QVERIFY(!seal.Seal(after.data(), after.size()));  // used up: re-key, never wrap to 1
    QCOMPARE(after, before);
  }

  void noAllocationPerFrame() {
    QVERIFY(g_crypto_counted);
    const EthSessionKeys k = DeriveEthKeys(kPsk, "alice", "bob", 7).value();
    EthSealer seal(k.initiator_to_responder);
    EthOpener open(k.initiator_to_responder);
    auto f = Frame(1, Payload(1436, 5));
    const auto plain = f;
    QVERIFY(seal.Seal(f.data(), f.size()) && open.Open(f.data(), f.size()));  // warm up
    const std::uint64_t before = g_allocs.load();
    for (int i = 0; i < 2000; ++i) {
      std::memcpy(f.data(), plain.data(), f.size());
      if (!seal.Seal(f.data(), f.size()) || !open.Open(f.data(), f.size())) QFAIL("seal/open failed");
    }
    const std::uint64_t allocs = g_allocs.load() - before;
    QVERIFY2(allocs == 0, qPrintable(QString("%1 allocations in 2000 seal+open").arg(allocs)));
  }
};

DST_TEST_MAIN(EthAeadTest)
#include "eth_aead_test.moc"
