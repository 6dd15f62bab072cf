// DST over raw Ethernet: wire constants and the frame codec.  The specification is
// docs/protocol.md §12 ("Raw Ethernet framing"); every constant names its subsection.  All
// integers on the wire are big-endian.
//
// An Ethernet frame of this protocol is
//
//   dst MAC[6] | src MAC[6] | EtherType 0x88B5 | DST-Eth header (64) | fragment payload
//
// and carries one fragment of a DST message (a 48-byte DST header plus its payload, §2), or a
// pure acknowledgement.  EncodeEthFrame and DecodeEthFrame are pure functions over caller-owned
// bytes: no allocation, no I/O, safe from any thread.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "dst/net/dst_format.h"
#include "dst/status.h"

namespace dst::net {

// §12.1 Ethernet header.  0x88B5 is "IEEE Std 802 Local Experimental EtherType 1": free for
// private protocols on one segment, never assigned to anyone, so other users may exist; the
// header's magic tells our frames from theirs.
inline constexpr std::uint16_t kEtherType = 0x88B5;
inline constexpr std::size_t kMacLen = 6;
inline constexpr std::size_t kEthHeaderSize = 14;  // dst, src, EtherType (no VLAN tag)

// §12.2 DST-Eth header (64 bytes after the Ethernet header).
inline constexpr std::uint16_t kEthMagic = 0x4445;  // "DE"
inline constexpr std::uint8_t kEthVersion = 1;
inline constexpr std::size_t kEthDstHeaderSize = 64;
inline constexpr std::size_t kEthOverhead = kEthHeaderSize + kEthDstHeaderSize;  // 78
inline constexpr std::size_t kEthTagOffset = 48;  // within the DST-Eth header
inline constexpr std::size_t kEthTagSize = 16;    // AES-GCM / ChaCha20-Poly1305 tag

// §12.2 type.
enum class EthType : std::uint8_t {
  kData = 1,  // one fragment of a DST message
  kAck = 2,   // acknowledgement only, no payload
  kDiscover = 3,       // §12.8: who exports what on this segment (usually to the broadcast MAC)
  kDiscoverReply = 4,  // §12.8: one station's export listing, unicast to the asker
};

// §12.2 flags.
inline constexpr std::uint16_t kEthFlagAck = 0x0001;   // the ack field is valid
inline constexpr std::uint16_t kEthFlagAead = 0x0002;  // payload encrypted, tag valid (later)
inline constexpr std::uint16_t kEthFlagsKnown = kEthFlagAck | kEthFlagAead;

// §12.3 Limits.  The link MTU is the Ethernet payload size (1500, or up to 9000 with jumbo
// frames); a fragment carries at most MTU - 64 bytes.
inline constexpr std::uint32_t kEthMinMtu = 576;
inline constexpr std::uint32_t kEthMaxMtu = 9216;
inline constexpr std::uint32_t kEthMaxMessage = kHeaderSize + kAbsoluteMaxPayload;
inline constexpr std::uint32_t EthMaxFragment(std::uint32_t mtu) { return mtu - kEthDstHeaderSize; }
// The largest frame on a link of `mtu` (1514 at 1500), as an AF_PACKET socket sends it.
inline constexpr std::size_t EthMaxFrame(std::uint32_t mtu) { return kEthHeaderSize + mtu; }
// Fragments needed for a message of `len` bytes at fragment size `frag`.
inline constexpr std::uint32_t EthFragmentCount(std::uint32_t len, std::uint32_t frag) {
  return (len + frag - 1) / frag;
}

// The decoded header fields of one frame.
struct EthHeader {
  std::uint8_t dst[kMacLen] = {};
  std::uint8_t src[kMacLen] = {};
  EthType type = EthType::kData;
  std::uint16_t flags = 0;
  std::uint16_t window = 0;       // receive window the sender advertises, in frames
  std::uint64_t session = 0;      // non-zero, chosen by the initiator
  std::uint64_t packet = 0;       // per sender and session, +1 on every frame sent (AEAD nonce)
  std::uint32_t seq = 0;          // DATA: sequence number of this fragment
  std::uint32_t ack = 0;          // with kEthFlagAck: next seq the sender expects
  std::uint32_t msg_len = 0;      // DATA: bytes of the whole DST message
  std::uint32_t frag_offset = 0;  // DATA: where this fragment's payload starts in the message
  std::uint16_t frag_index = 0;   // DATA: 0..frag_count-1
  std::uint16_t frag_count = 0;   // DATA: fragments of the message
  std::uint16_t payload_len = 0;  // bytes after the 64-byte header
  std::uint8_t tag[kEthTagSize] = {};  // with kEthFlagAead only; zero otherwise
};

// Writes the Ethernet and DST-Eth headers (78 bytes) for `h`, then copies `payload_len` bytes
// of `payload` after them.  Returns the frame length, or 0 when it does not fit `cap` (no bytes
// are promised then).  h.payload_len is ignored: payload_len is the truth.
std::size_t EncodeEthFrame(const EthHeader& h, const void* payload, std::size_t payload_len,
                           std::uint8_t* out, std::size_t cap);
// Writes only the 78 header bytes (the payload is placed by the caller at out + kEthOverhead).
// REQUIRES: out has room for kEthOverhead bytes.
void EncodeEthHeaders(const EthHeader& h, std::uint8_t* out);

// Why DecodeEthFrame refused a frame (an enum, so a flood of garbage never allocates).
enum class EthDecodeError : std::uint8_t {
  kOk = 0,
  kTruncated,         // shorter than 78 bytes, or than 78 + payload_len
  kTrailingBytes,     // longer than 78 + payload_len
  kWrongEtherType,
  kMulticastSource,
  kBadMagic,
  kBadVersion,
  kUnknownType,
  kUnknownFlags,
  kReservedSet,
  kTagWithoutAead,
  kOversized,         // payload_len above the link's fragment size
  kNoSession,         // session 0
  kEmptyData,
  kBadMessageLength,  // msg_len 0 or above kEthMaxMessage
  kBadFragmentIndex,
  kFragmentPastEnd,
  kBadFirstFragment,
  kBadLastFragment,
  kBadAck,            // ACK without the ack flag, or with payload/fragment fields
  kBadDiscover,       // DISCOVER / DISCOVER_REPLY with the ack flag, seq/ack or fragment fields
};
const char* EthDecodeErrorName(EthDecodeError e);
// The verdict as a Status: OK, or ProtocolError naming the reason.  DecodeEthFrame itself returns
// the enum so that dropping garbage on the receive path never builds a message string.
Status EthDecodeStatus(EthDecodeError e);

// Checks and decodes one received frame of `len` bytes (from the destination MAC on).
// `max_payload` is the receiving link's fragment limit (EthMaxFragment(mtu)).  On success
// *payload points into `in`.  Anything else is malformed (the caller drops and counts the frame):
// see EthDecodeError and docs/protocol.md §12.4.
EthDecodeError DecodeEthFrame(const std::uint8_t* in, std::size_t len, std::size_t max_payload,
                              EthHeader* out, const std::uint8_t** payload);

// Parses "aa:bb:cc:dd:ee:ff" (or with '-'); a multicast address is refused (a peer is one
// station).  FormatMac writes the lower-case colon form.
Status ParseMac(std::string_view s, std::array<std::uint8_t, 6>* out);
std::string FormatMac(const std::uint8_t* mac);

}  // namespace dst::net
