// Unit tests for the raw-Ethernet frame codec (docs/protocol.md §12): round trips of DATA and
// ACK frames, and every way DecodeEthFrame must refuse a frame.
#include <cstring>
#include <functional>
#include <vector>

#include "dst/net/codec.h"
#include "dst/net/eth_format.h"
#include "test_env.h"

using namespace dst;
using namespace dst::net;

namespace {

constexpr std::size_t kFrag = EthMaxFragment(1500);  // 1436
constexpr std::size_t kD = kEthHeaderSize;           // start of the DST-Eth header

EthHeader DataHeader(std::uint32_t msg_len, std::uint32_t offset, std::uint16_t index,
                     std::uint16_t count) {
  EthHeader h;
  const std::uint8_t dst[kMacLen] = {0x02, 0, 0, 0, 0, 0x02};
  const std::uint8_t src[kMacLen] = {0x02, 0, 0, 0, 0, 0x01};
  std::memcpy(h.dst, dst, kMacLen);
  std::memcpy(h.src, src, kMacLen);
  h.type = EthType::kData;
  h.window = 32;
  h.session = 0x1122334455667788ull;
  h.packet = 7;
  h.seq = 0xfffffff0u;
  h.msg_len = msg_len;
  h.frag_offset = offset;
  h.frag_index = index;
  h.frag_count = count;
  return h;
}

std::vector<std::uint8_t> Payload(std::size_t n, std::uint8_t seed) {
  std::vector<std::uint8_t> p(n);
  for (std::size_t i = 0; i < n; ++i) p[i] = std::uint8_t(seed + i * 31);
  return p;
}

// A valid single-fragment DATA frame of `n` payload bytes.
std::vector<std::uint8_t> ValidFrame(std::size_t n = 100) {
  std::vector<std::uint8_t> f(kEthOverhead + n);
  auto p = Payload(n, 3);
  const std::size_t len = EncodeEthFrame(DataHeader(n, 0, 0, 1), p.data(), n, f.data(), f.size());
  f.resize(len);
  return f;
}

EthDecodeError Decode(const std::vector<std::uint8_t>& f, std::size_t max_payload = kFrag) {
  EthHeader h;
  const std::uint8_t* payload = nullptr;
  return DecodeEthFrame(f.data(), f.size(), max_payload, &h, &payload);
}

// Encodes a valid frame, applies `mutate`, decodes.
EthDecodeError Mutated(const std::function<void(std::vector<std::uint8_t>&)>& mutate) {
  auto f = ValidFrame();
  mutate(f);
  return Decode(f);
}

}  // namespace

class EthFormatTest : public QObject {
  Q_OBJECT
 private slots:
  void layoutConstants() {
    QCOMPARE(kEtherType, std::uint16_t(0x88B5));
    QCOMPARE(kEthOverhead, std::size_t(78));
    QCOMPARE(EthMaxFrame(1500), std::size_t(1514));
    QCOMPARE(EthMaxFragment(1500), 1436u);
    QCOMPARE(EthMaxFragment(9000), 8936u);
    QCOMPARE(EthFragmentCount(kEthMaxMessage, 1436), (kEthMaxMessage + 1435) / 1436);
  }

  void dataRoundTrip() {
    // A 3-fragment message: every fragment decodes to the fields it was encoded with.
    const std::uint32_t msg = 2 * kFrag + 17;
    auto whole = Payload(msg, 9);
    for (std::uint16_t i = 0; i < 3; ++i) {
      const std::uint32_t off = i * kFrag;
      const std::size_t n = i < 2 ? kFrag : 17;
      EthHeader h = DataHeader(msg, off, i, 3);
      h.flags = kEthFlagAck;
      h.ack = 41 + i;
      h.seq = 100 + i;
      std::vector<std::uint8_t> f(EthMaxFrame(1500));
      const std::size_t len = EncodeEthFrame(h, whole.data() + off, n, f.data(), f.size());
      QCOMPARE(len, kEthOverhead + n);
      QCOMPARE(GetU16(f.data() + 12), kEtherType);
      EthHeader d;
      const std::uint8_t* p = nullptr;
      QCOMPARE(DecodeEthFrame(f.data(), len, kFrag, &d, &p), EthDecodeError::kOk);
      QVERIFY(std::memcmp(d.dst, h.dst, kMacLen) == 0);
      QVERIFY(std::memcmp(d.src, h.src, kMacLen) == 0);
      QCOMPARE(d.type, EthType::kData);
      QCOMPARE(d.flags, kEthFlagAck);
      QCOMPARE(d.window, h.window);
      QCOMPARE(d.session, h.session);
      QCOMPARE(d.packet, h.packet);
      QCOMPARE(d.seq, h.seq);
      QCOMPARE(d.ack, h.ack);
      QCOMPARE(d.msg_len, msg);
      QCOMPARE(d.frag_offset, off);
      QCOMPARE(d.frag_index, i);
      QCOMPARE(d.frag_count, std::uint16_t(3));
      QCOMPARE(std::size_t(d.payload_len), n);
      QCOMPARE(p, f.data() + kEthOverhead);
      QVERIFY(std::memcmp(p, whole.data() + off, n) == 0);
    }
  }

  void jumboAndAeadRoundTrip() {
    const std::size_t n = EthMaxFragment(9000);
    auto pl = Payload(n, 1);
    EthHeader h = DataHeader(n, 0, 0, 1);
    h.flags = kEthFlagAead;
    for (std::size_t i = 0; i < kEthTagSize; ++i) h.tag[i] = std::uint8_t(0xa0 + i);
    std::vector<std::uint8_t> f(EthMaxFrame(9000));
    const std::size_t len = EncodeEthFrame(h, pl.data(), n, f.data(), f.size());
    QCOMPARE(len, f.size());
    EthHeader d;
    const std::uint8_t* p = nullptr;
    QCOMPARE(DecodeEthFrame(f.data(), len, n, &d, &p), EthDecodeError::kOk);
    QVERIFY(std::memcmp(d.tag, h.tag, kEthTagSize) == 0);
    // The same frame on a 1500-byte link is oversized.
    QCOMPARE(DecodeEthFrame(f.data(), len, kFrag, &d, &p), EthDecodeError::kOversized);
    // Without the AEAD flag the encoder writes a zero tag.
    h.flags = 0;
    EncodeEthFrame(h, pl.data(), n, f.data(), f.size());
    QVERIFY(std::all_of(f.begin() + kD + kEthTagOffset, f.begin() + kD + kEthTagOffset + kEthTagSize,
                        [](std::uint8_t b) { return b == 0; }));
  }

  void ackRoundTrip() {
    EthHeader h = DataHeader(0, 0, 0, 0);
    h.type = EthType::kAck;
    h.flags = kEthFlagAck;
    h.ack = 12345;
    std::uint8_t f[kEthOverhead];
    QCOMPARE(EncodeEthFrame(h, nullptr, 0, f, sizeof f), kEthOverhead);
    EthHeader d;
    const std::uint8_t* p = nullptr;
    QCOMPARE(DecodeEthFrame(f, sizeof f, kFrag, &d, &p), EthDecodeError::kOk);
    QCOMPARE(d.type, EthType::kAck);
    QCOMPARE(d.ack, 12345u);
    QCOMPARE(d.payload_len, std::uint16_t(0));
  }

  void encodeRefusesWhatDoesNotFit() {
    std::vector<std::uint8_t> f(kEthOverhead + 10);
    auto p = Payload(11, 0);
    QCOMPARE(EncodeEthFrame(DataHeader(11, 0, 0, 1), p.data(), 11, f.data(), f.size()), std::size_t(0));
    QCOMPARE(EncodeEthFrame(DataHeader(11, 0, 0, 1), p.data(), 11, f.data(), kEthOverhead - 1), std::size_t(0));
    std::vector<std::uint8_t> big(0x10000 + kEthOverhead);
    QCOMPARE(EncodeEthFrame(DataHeader(1, 0, 0, 1), big.data(), 0x10000, big.data(), big.size()),
             std::size_t(0));
  }

  void everyTruncationRejected() {
    const auto f = ValidFrame(100);
    QCOMPARE(Decode(f), EthDecodeError::kOk);
    for (std::size_t len = 0; len < f.size(); ++len) {
      std::vector<std::uint8_t> t(f.begin(), f.begin() + len);
      QCOMPARE(Decode(t), EthDecodeError::kTruncated);
    }
    auto longer = f;
    longer.push_back(0);
    QCOMPARE(Decode(longer), EthDecodeError::kTrailingBytes);
  }

  void malformedHeaders() {
    using E = EthDecodeError;
    using F = std::vector<std::uint8_t>;
    QCOMPARE(Mutated([](F& f) { PutU16(f.data() + 12, 0x0800); }), E::kWrongEtherType);
    QCOMPARE(Mutated([](F& f) { PutU16(f.data() + 12, 0x88B6); }), E::kWrongEtherType);
    QCOMPARE(Mutated([](F& f) { f[kMacLen] |= 0x01; }), E::kMulticastSource);
    QCOMPARE(Mutated([](F& f) { f[kD] ^= 0xff; }), E::kBadMagic);
    QCOMPARE(Mutated([](F& f) { f[kD + 2] = 0; }), E::kBadVersion);
    QCOMPARE(Mutated([](F& f) { f[kD + 2] = 2; }), E::kBadVersion);
    QCOMPARE(Mutated([](F& f) { f[kD + 3] = 0; }), E::kUnknownType);
    QCOMPARE(Mutated([](F& f) { f[kD + 3] = 5; }), E::kUnknownType);
    QCOMPARE(Mutated([](F& f) { PutU16(f.data() + kD + 4, 0x0004); }), E::kUnknownFlags);
    QCOMPARE(Mutated([](F& f) { f[kD + 47] = 1; }), E::kReservedSet);
    QCOMPARE(Mutated([](F& f) { f[kD + kEthTagOffset + 5] = 1; }), E::kTagWithoutAead);
    QCOMPARE(Mutated([](F& f) { PutU64(f.data() + kD + 8, 0); }), E::kNoSession);
  }

  void malformedLengths() {
    using E = EthDecodeError;
    // Payload length above the link's fragment size: oversized even when the bytes are there.
    auto big = ValidFrame(kFrag);
    QCOMPARE(Decode(big), E::kOk);
    QCOMPARE(Decode(big, kFrag - 1), E::kOversized);
    // The length field disagrees with the frame.
    QCOMPARE(Mutated([](std::vector<std::uint8_t>& f) { PutU16(f.data() + kD + 44, 101); }), E::kTruncated);
    QCOMPARE(Mutated([](std::vector<std::uint8_t>& f) { PutU16(f.data() + kD + 44, 99); }), E::kTrailingBytes);
    QCOMPARE(Mutated([](std::vector<std::uint8_t>& f) { PutU16(f.data() + kD + 44, 0xffff); }), E::kOversized);
  }

  void malformedFragments() {
    using E = EthDecodeError;
    auto enc = [](EthHeader h, std::size_t n) {
      std::vector<std::uint8_t> f(kEthOverhead + n);
      auto p = Payload(n, 0);
      f.resize(EncodeEthFrame(h, p.data(), n, f.data(), f.size()));
      return Decode(f);
    };
    QCOMPARE(enc(DataHeader(100, 0, 0, 1), 0), E::kEmptyData);
    QCOMPARE(enc(DataHeader(0, 0, 0, 1), 10), E::kBadMessageLength);
    QCOMPARE(enc(DataHeader(kEthMaxMessage + 1, 0, 0, 1), 10), E::kBadMessageLength);
    QCOMPARE(enc(DataHeader(100, 0, 0, 0), 10), E::kBadFragmentIndex);
    QCOMPARE(enc(DataHeader(100, 0, 2, 2), 10), E::kBadFragmentIndex);
    QCOMPARE(enc(DataHeader(5, 0, 0, 6), 5), E::kBadFragmentIndex);  // more fragments than bytes
    QCOMPARE(enc(DataHeader(100, 95, 1, 2), 10), E::kFragmentPastEnd);
    QCOMPARE(enc(DataHeader(100, 10, 0, 2), 10), E::kBadFirstFragment);
    QCOMPARE(enc(DataHeader(100, 0, 1, 2), 10), E::kBadFirstFragment);
    QCOMPARE(enc(DataHeader(100, 0, 0, 2), 100), E::kBadLastFragment);  // ends the message too early
    QCOMPARE(enc(DataHeader(100, 50, 1, 2), 10), E::kBadLastFragment);  // last, but short of the end
    QCOMPARE(enc(DataHeader(100, 90, 1, 2), 10), E::kOk);
  }

  void malformedAcks() {
    using E = EthDecodeError;
    EthHeader h = DataHeader(0, 0, 0, 0);
    h.type = EthType::kAck;
    std::uint8_t f[kEthOverhead + 4];
    EncodeEthFrame(h, nullptr, 0, f, sizeof f);
    EthHeader d;
    const std::uint8_t* p = nullptr;
    QCOMPARE(DecodeEthFrame(f, kEthOverhead, kFrag, &d, &p), E::kBadAck);  // no ack flag
    h.flags = kEthFlagAck;
    const std::uint8_t x[4] = {1, 2, 3, 4};
    QCOMPARE(EncodeEthFrame(h, x, 4, f, sizeof f), sizeof f);
    QCOMPARE(DecodeEthFrame(f, sizeof f, kFrag, &d, &p), E::kBadAck);  // payload on an ACK
    h.frag_count = 1;
    EncodeEthFrame(h, nullptr, 0, f, sizeof f);
    QCOMPARE(DecodeEthFrame(f, kEthOverhead, kFrag, &d, &p), E::kBadAck);
  }

  // §12.8: DISCOVER and DISCOVER_REPLY carry a listing (or nothing) and no stream fields.
  void discoverFrames() {
    using E = EthDecodeError;
    EthHeader h = DataHeader(0, 0, 0, 0);
    h.type = EthType::kDiscover;
    h.msg_len = h.frag_count = 0;
    h.seq = 0;
    std::uint8_t f[kEthOverhead + 8];
    EthHeader d;
    const std::uint8_t* p = nullptr;
    QCOMPARE(EncodeEthFrame(h, nullptr, 0, f, sizeof f), kEthOverhead);
    QCOMPARE(DecodeEthFrame(f, kEthOverhead, kFrag, &d, &p), E::kOk);
    QVERIFY(d.type == EthType::kDiscover);
    h.type = EthType::kDiscoverReply;
    const std::uint8_t x[8] = {'d', ' ', '1', '6', ' ', 'r', 'w', '\n'};
    QCOMPARE(EncodeEthFrame(h, x, 8, f, sizeof f), sizeof f);
    QCOMPARE(DecodeEthFrame(f, sizeof f, kFrag, &d, &p), E::kOk);
    QCOMPARE(d.payload_len, std::uint16_t(8));
    h.flags = kEthFlagAck;
    EncodeEthFrame(h, nullptr, 0, f, sizeof f);
    QCOMPARE(DecodeEthFrame(f, kEthOverhead, kFrag, &d, &p), E::kBadDiscover);
    h.flags = 0;
    h.seq = 3;
    EncodeEthFrame(h, nullptr, 0, f, sizeof f);
    QCOMPARE(DecodeEthFrame(f, kEthOverhead, kFrag, &d, &p), E::kBadDiscover);
  }

  void statusNamesTheReason() {
    QVERIFY(EthDecodeStatus(EthDecodeError::kOk).ok());
    const Status s = EthDecodeStatus(EthDecodeError::kWrongEtherType);
    QCOMPARE(s.code(), Status::Code::kProtocolError);
    QVERIFY(s.ToString().find("wrong EtherType") != std::string::npos);
    for (int e = 1; e <= int(EthDecodeError::kBadDiscover); ++e)
      QVERIFY(std::strcmp(EthDecodeErrorName(EthDecodeError(e)), "unknown") != 0);
  }
};

DST_TEST_MAIN(EthFormatTest)
#include "eth_format_test.moc"
