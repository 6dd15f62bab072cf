// DST over raw Ethernet: frame encode/decode (docs/protocol.md §12).
#include "dst/net/eth_format.h"

#include <fmt/format.h>

#include <cstring>
#include <string>

#include "dst/net/codec.h"

namespace dst::net {

namespace {

// Offsets inside the DST-Eth header (§12.2).
constexpr std::size_t kOffMagic = 0, kOffVersion = 2, kOffType = 3, kOffFlags = 4, kOffWindow = 6,
                      kOffSession = 8, kOffPacket = 16, kOffSeq = 24, kOffAck = 28, kOffMsgLen = 32,
                      kOffFragOffset = 36, kOffFragIndex = 40, kOffFragCount = 42, kOffPayloadLen = 44,
                      kOffReserved = 46;
static_assert(kOffReserved + 2 == kEthTagOffset && kEthTagOffset + kEthTagSize == kEthDstHeaderSize);

bool AllZero(const std::uint8_t* p, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i)
    if (p[i]) return false;
  return true;
}

// §12.4: the fragment fields of a DATA frame describe one slice of one message.
EthDecodeError CheckFragment(const EthHeader& h) {
  if (h.payload_len == 0) return EthDecodeError::kEmptyData;
  if (h.msg_len == 0 || h.msg_len > kEthMaxMessage) return EthDecodeError::kBadMessageLength;
  if (h.frag_count == 0 || h.frag_index >= h.frag_count || h.frag_count > h.msg_len)
    return EthDecodeError::kBadFragmentIndex;
  const std::uint64_t end = std::uint64_t(h.frag_offset) + h.payload_len;
  if (end > h.msg_len) return EthDecodeError::kFragmentPastEnd;
  if ((h.frag_index == 0) != (h.frag_offset == 0))
    return EthDecodeError::kBadFirstFragment;
  if ((h.frag_index + 1 == h.frag_count) != (end == h.msg_len))
    return EthDecodeError::kBadLastFragment;
  return EthDecodeError::kOk;
}

}  // namespace

const char* EthDecodeErrorName(EthDecodeError e) {
  switch (e) {
    case EthDecodeError::kOk: return "ok";
    case EthDecodeError::kTruncated: return "truncated frame";
    case EthDecodeError::kTrailingBytes: return "bytes after the payload";
    case EthDecodeError::kWrongEtherType: return "wrong EtherType";
    case EthDecodeError::kMulticastSource: return "multicast source address";
    case EthDecodeError::kBadMagic: return "bad magic";
    case EthDecodeError::kBadVersion: return "unsupported version";
    case EthDecodeError::kUnknownType: return "unknown frame type";
    case EthDecodeError::kUnknownFlags: return "unknown flags";
    case EthDecodeError::kReservedSet: return "reserved bytes not zero";
    case EthDecodeError::kTagWithoutAead: return "tag set without AEAD flag";
    case EthDecodeError::kOversized: return "oversized fragment";
    case EthDecodeError::kNoSession: return "session 0";
    case EthDecodeError::kEmptyData: return "DATA without payload";
    case EthDecodeError::kBadMessageLength: return "bad message length";
    case EthDecodeError::kBadFragmentIndex: return "bad fragment index/count";
    case EthDecodeError::kFragmentPastEnd: return "fragment past the message end";
    case EthDecodeError::kBadFirstFragment: return "first fragment not at offset 0";
    case EthDecodeError::kBadLastFragment: return "last fragment does not end the message";
    case EthDecodeError::kBadAck: return "bad ACK frame";
    case EthDecodeError::kBadDiscover: return "bad DISCOVER frame";
  }
  return "unknown";
}

Status EthDecodeStatus(EthDecodeError e) {
  if (e == EthDecodeError::kOk) return Status::OK();
  return Status::ProtocolError(std::string("eth frame: ") + EthDecodeErrorName(e));
}

void EncodeEthHeaders(const EthHeader& h, std::uint8_t* out) {
  std::memcpy(out, h.dst, kMacLen);
  std::memcpy(out + kMacLen, h.src, kMacLen);
  PutU16(out + 12, kEtherType);
  std::uint8_t* d = out + kEthHeaderSize;
  PutU16(d + kOffMagic, kEthMagic);
  d[kOffVersion] = kEthVersion;
  d[kOffType] = static_cast<std::uint8_t>(h.type);
  PutU16(d + kOffFlags, h.flags);
  PutU16(d + kOffWindow, h.window);
  PutU64(d + kOffSession, h.session);
  PutU64(d + kOffPacket, h.packet);
  PutU32(d + kOffSeq, h.seq);
  PutU32(d + kOffAck, h.ack);
  PutU32(d + kOffMsgLen, h.msg_len);
  PutU32(d + kOffFragOffset, h.frag_offset);
  PutU16(d + kOffFragIndex, h.frag_index);
  PutU16(d + kOffFragCount, h.frag_count);
  PutU16(d + kOffPayloadLen, h.payload_len);
  PutU16(d + kOffReserved, 0);
  if (h.flags & kEthFlagAead)
    std::memcpy(d + kEthTagOffset, h.tag, kEthTagSize);
  else
    std::memset(d + kEthTagOffset, 0, kEthTagSize);
}

std::size_t EncodeEthFrame(const EthHeader& h, const void* payload, std::size_t payload_len,
                           std::uint8_t* out, std::size_t cap) {
  if (payload_len > 0xffff || cap < kEthOverhead || payload_len > cap - kEthOverhead) return 0;
  EncodeEthHeaders(h, out);
  PutU16(out + kEthHeaderSize + kOffPayloadLen, static_cast<std::uint16_t>(payload_len));
  if (payload_len) std::memcpy(out + kEthOverhead, payload, payload_len);
  return kEthOverhead + payload_len;
}

EthDecodeError DecodeEthFrame(const std::uint8_t* in, std::size_t len, std::size_t max_payload, EthHeader* h,
                      const std::uint8_t** payload) {
  if (len < kEthOverhead) return EthDecodeError::kTruncated;
  if (GetU16(in + 12) != kEtherType) return EthDecodeError::kWrongEtherType;
  if (in[kMacLen] & 0x01) return EthDecodeError::kMulticastSource;
  const std::uint8_t* d = in + kEthHeaderSize;
  if (GetU16(d + kOffMagic) != kEthMagic) return EthDecodeError::kBadMagic;
  if (d[kOffVersion] != kEthVersion) return EthDecodeError::kBadVersion;
  const std::uint8_t type = d[kOffType];
  if (type < static_cast<std::uint8_t>(EthType::kData) || type > static_cast<std::uint8_t>(EthType::kDiscoverReply))
    return EthDecodeError::kUnknownType;
  h->type = static_cast<EthType>(type);
  h->flags = GetU16(d + kOffFlags);
  if (h->flags & ~kEthFlagsKnown) return EthDecodeError::kUnknownFlags;
  if (GetU16(d + kOffReserved) != 0) return EthDecodeError::kReservedSet;
  const bool aead = (h->flags & kEthFlagAead) != 0;
  if (!aead && !AllZero(d + kEthTagOffset, kEthTagSize))
    return EthDecodeError::kTagWithoutAead;
  h->payload_len = GetU16(d + kOffPayloadLen);
  if (h->payload_len > max_payload) return EthDecodeError::kOversized;
  if (len != kEthOverhead + h->payload_len)
    return len < kEthOverhead + h->payload_len ? EthDecodeError::kTruncated : EthDecodeError::kTrailingBytes;
  std::memcpy(h->dst, in, kMacLen);
  std::memcpy(h->src, in + kMacLen, kMacLen);
  h->window = GetU16(d + kOffWindow);
  h->session = GetU64(d + kOffSession);
  h->packet = GetU64(d + kOffPacket);
  h->seq = GetU32(d + kOffSeq);
  h->ack = GetU32(d + kOffAck);
  h->msg_len = GetU32(d + kOffMsgLen);
  h->frag_offset = GetU32(d + kOffFragOffset);
  h->frag_index = GetU16(d + kOffFragIndex);
  h->frag_count = GetU16(d + kOffFragCount);
  if (aead)
    std::memcpy(h->tag, d + kEthTagOffset, kEthTagSize);
  else
    std::memset(h->tag, 0, kEthTagSize);
  if (h->session == 0) return EthDecodeError::kNoSession;
  if (h->type == EthType::kData) {
    if (const EthDecodeError e = CheckFragment(*h); e != EthDecodeError::kOk) return e;
  } else if (h->type == EthType::kDiscover || h->type == EthType::kDiscoverReply) {
    if ((h->flags & kEthFlagAck) || h->seq || h->ack || h->msg_len || h->frag_offset || h->frag_index ||
        h->frag_count)
      return EthDecodeError::kBadDiscover;
  } else {
    if (!(h->flags & kEthFlagAck)) return EthDecodeError::kBadAck;
    if (h->payload_len || h->msg_len || h->frag_offset || h->frag_index || h->frag_count)
      return EthDecodeError::kBadAck;
  }
  *payload = in + kEthOverhead;
  return EthDecodeError::kOk;
}

std::string FormatMac(const std::uint8_t* m) {
  return fmt::format("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5]);
}

Status ParseMac(std::string_view s, std::array<std::uint8_t, 6>* out) {
  std::array<std::uint8_t, 6> m{};
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  bool ok = s.size() == 17;
  for (std::size_t i = 0; ok && i < 6; ++i) {
    int hi = hex(s[i * 3]), lo = hex(s[i * 3 + 1]);
    if (hi < 0 || lo < 0 || (i < 5 && s[i * 3 + 2] != ':' && s[i * 3 + 2] != '-')) ok = false;
    else m[i] = std::uint8_t(hi * 16 + lo);
  }
  if (!ok) return Status::InvalidArgument(fmt::format("bad MAC address \"{}\" (want aa:bb:cc:dd:ee:ff)", s));
  if (m[0] & 1) return Status::InvalidArgument(fmt::format("MAC address {} is multicast; a peer is one station", s));
  *out = m;
  return Status::OK();
}

}  // namespace dst::net
