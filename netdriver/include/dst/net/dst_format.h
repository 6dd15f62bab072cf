// DST protocol v1 wire constants.  The specification is docs/protocol.md; every constant here
// names the section that defines it.  All integers on the wire are big-endian.
#pragma once

#include <cstdint>

namespace dst::net {

// docs/protocol.md §2 "Frame header".
inline constexpr std::uint32_t kMagic = 0x44535431;  // "DST1"
inline constexpr std::size_t kHeaderSize = 48;
inline constexpr std::uint16_t kProtocolVersion = 1;

// §3 "Commands".  A reply carries the request's command with kReplyBit set.
enum class Cmd : std::uint16_t {
  kHello = 1,
  kRead = 2,
  kWrite = 3,
  kFlush = 4,
  kTrim = 5,
  kWriteZeroes = 6,
  kPing = 7,
  kDisconnect = 8,
};
inline constexpr std::uint16_t kReplyBit = 0x8000;
inline constexpr std::uint16_t kMaxCmd = 8;

// §4 "Request flags".
inline constexpr std::uint16_t kFlagFua = 0x0001;     // WRITE: durable before the reply
inline constexpr std::uint16_t kFlagNoUnmap = 0x0002; // WRITE_ZEROES: keep the blocks allocated
// §4.1 "Payload digest": WRITE request / successful READ reply whose header bytes 32..39 carry
// the XXH3-64 of the payload (only after kFeatureDigestXxh3 was negotiated).
inline constexpr std::uint16_t kFlagDigest = 0x0004;
inline constexpr std::uint16_t kFlagsKnown = kFlagFua | kFlagNoUnmap | kFlagDigest;
inline constexpr std::size_t kDigestOffset = 32;  // u64 in the header, big-endian

// §5 "Status codes" (values are Linux errno numbers, fixed by this spec, not by the host).
enum class WireStatus : std::uint32_t {
  kOk = 0,
  kPerm = 1,          // EPERM: write to a read-only export
  kNoEnt = 2,         // ENOENT: unknown export (HELLO)
  kIo = 5,            // EIO
  kAcces = 13,        // EACCES: the peer's identity may not use the export (HELLO)
  kNoMem = 12,        // ENOMEM: server out of buffers
  kBusy = 16,         // EBUSY
  kInval = 22,        // EINVAL: malformed or misaligned request
  kNoSpc = 28,        // ENOSPC
  kRofs = 30,         // EROFS
  kRange = 34,        // ERANGE: offset/length past the end of the export
  kBadMsg = 74,       // EBADMSG: WRITE payload digest mismatch; not applied, re-send (§4.1)
  kProto = 71,        // EPROTO: framing error; the server closes after sending it
  kMsgSize = 90,      // EMSGSIZE: length above the negotiated maximum payload
  kNotSup = 95,       // EOPNOTSUPP
  kShutdown = 108,    // ESHUTDOWN: server draining
  kTimedOut = 110,    // ETIMEDOUT
};

// §6 "Handshake".
inline constexpr std::uint16_t kMaxExportNameLen = 255;
inline constexpr std::uint32_t kMaxHelloPayload = 4096;
inline constexpr std::uint32_t kHelloRequestFixed = 2 + 2 + 4 + 8 + 2;   // + name
inline constexpr std::uint32_t kHelloReplySize = 2 + 2 + 4 + 8 + 4 + 4 + 4;
// Export flags in the HELLO reply.
inline constexpr std::uint16_t kExportReadOnly = 0x0001;
inline constexpr std::uint16_t kExportCanFlush = 0x0002;
inline constexpr std::uint16_t kExportCanFua = 0x0004;
inline constexpr std::uint16_t kExportCanTrim = 0x0008;
inline constexpr std::uint16_t kExportCanWriteZeroes = 0x0010;
// Permission bits (as the original DST CFG reply).
inline constexpr std::uint32_t kPermRead = 1;
inline constexpr std::uint32_t kPermWrite = 2;
// Feature bits (§6.1): the client offers, the server echoes those it accepts; unknown bits are
// ignored by the server and echoed as 0, so old peers keep working without them.
inline constexpr std::uint32_t kFeatureDigestXxh3 = 0x00000001;  // §4.1 payload digests
inline constexpr std::uint32_t kFeaturesKnown = kFeatureDigestXxh3;

// §7 "Limits".
inline constexpr std::uint32_t kDefaultMaxPayload = 1u << 20;   // 1 MiB
// Hard cap on any length field that is followed by payload bytes (HELLO, WRITE, READ and its
// reply).  TRIM and WRITE_ZEROES lengths are pure ranges and may use the whole u32 (just under
// 4 GiB); the export's size and block size still bound them (§8).
inline constexpr std::uint32_t kAbsoluteMaxPayload = 32u << 20;
inline constexpr std::uint16_t kDefaultPort = 7400;

}  // namespace dst::net
