// NBD wire constants and the pure encoders/decoders the dst NBD server uses.
//
// Values come from the NBD protocol (NetworkBlockDevice/nbd doc/proto.md); section numbers in
// the comments refer to the summary in docs/nbd.md ("NBD §x"), which also says which parts
// dst implements.  All integers are big-endian on the wire.
//
// Everything here is a pure function over caller-owned bytes: no I/O, safe from any thread.  The
// request/reply codecs used per I/O do not allocate; the option-payload parsers (handshake only)
// may.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "dst/status.h"

namespace dst::net::nbd {

// ---- magic numbers (docs/nbd.md §1) ----------------------------------------------------------
inline constexpr std::uint64_t kNbdMagic = 0x4e42444d41474943ull;          // "NBDMAGIC"
inline constexpr std::uint64_t kOptMagic = 0x49484156454F5054ull;          // "IHAVEOPT"
inline constexpr std::uint64_t kOptReplyMagic = 0x0003e889045565a9ull;
inline constexpr std::uint32_t kRequestMagic = 0x25609513;
inline constexpr std::uint32_t kSimpleReplyMagic = 0x67446698;
inline constexpr std::uint32_t kStructuredReplyMagic = 0x668e33ef;
inline constexpr std::uint32_t kExtendedRequestMagic = 0x21e41c71;  // not negotiated by dst

inline constexpr std::uint16_t kDefaultPort = 10809;  // IANA

// ---- handshake (docs/nbd.md §2) --------------------------------------------------------------
inline constexpr std::uint16_t kFlagFixedNewstyle = 1u << 0;  // server handshake flags
inline constexpr std::uint16_t kFlagNoZeroes = 1u << 1;
inline constexpr std::uint32_t kClientFlagFixedNewstyle = 1u << 0;  // client flags
inline constexpr std::uint32_t kClientFlagNoZeroes = 1u << 1;
inline constexpr std::uint32_t kClientFlagsKnown = kClientFlagFixedNewstyle | kClientFlagNoZeroes;

inline constexpr std::size_t kGreetingSize = 8 + 8 + 2;
inline constexpr std::size_t kOptionHeaderSize = 8 + 4 + 4;
inline constexpr std::size_t kOptionReplyHeaderSize = 8 + 4 + 4 + 4;
inline constexpr std::size_t kExportNameReplyZeroes = 124;

// Options (§2.1).
inline constexpr std::uint32_t kOptExportName = 1;
inline constexpr std::uint32_t kOptAbort = 2;
inline constexpr std::uint32_t kOptList = 3;
inline constexpr std::uint32_t kOptPeekExport = 4;  // withdrawn
inline constexpr std::uint32_t kOptStartTls = 5;
inline constexpr std::uint32_t kOptInfo = 6;
inline constexpr std::uint32_t kOptGo = 7;
inline constexpr std::uint32_t kOptStructuredReply = 8;
inline constexpr std::uint32_t kOptListMetaContext = 9;
inline constexpr std::uint32_t kOptSetMetaContext = 10;
inline constexpr std::uint32_t kOptExtendedHeaders = 11;  // experimental; answered ERR_UNSUP

// Option reply types (§2.2).
inline constexpr std::uint32_t kRepAck = 1;
inline constexpr std::uint32_t kRepServer = 2;
inline constexpr std::uint32_t kRepInfo = 3;
inline constexpr std::uint32_t kRepMetaContext = 4;
inline constexpr std::uint32_t kRepErrBit = 1u << 31;
inline constexpr std::uint32_t kRepErrUnsup = kRepErrBit + 1;
inline constexpr std::uint32_t kRepErrPolicy = kRepErrBit + 2;
inline constexpr std::uint32_t kRepErrInvalid = kRepErrBit + 3;
inline constexpr std::uint32_t kRepErrPlatform = kRepErrBit + 4;
inline constexpr std::uint32_t kRepErrTlsReqd = kRepErrBit + 5;
inline constexpr std::uint32_t kRepErrUnknown = kRepErrBit + 6;
inline constexpr std::uint32_t kRepErrShutdown = kRepErrBit + 7;
inline constexpr std::uint32_t kRepErrBlockSizeReqd = kRepErrBit + 8;
inline constexpr std::uint32_t kRepErrTooBig = kRepErrBit + 9;

// Info types (§2.3).
inline constexpr std::uint16_t kInfoExport = 0;
inline constexpr std::uint16_t kInfoName = 1;
inline constexpr std::uint16_t kInfoDescription = 2;
inline constexpr std::uint16_t kInfoBlockSize = 3;

// Limits dst applies to the handshake (docs/nbd.md §4): strings are at most 4096 bytes by the
// spec; option data above kMaxOptionData is drained (up to kMaxOptionDrain) and refused with
// ERR_TOO_BIG, anything longer closes the connection.  Nothing is allocated for it.
inline constexpr std::uint32_t kMaxStringLen = 4096;
inline constexpr std::uint32_t kMaxOptionData = 16384;
inline constexpr std::uint32_t kMaxOptionDrain = 1u << 20;
inline constexpr int kMaxOptionsPerHandshake = 4096;
inline constexpr std::uint32_t kMaxMetaQueries = 128;

// ---- transmission (docs/nbd.md §3) -----------------------------------------------------------
inline constexpr std::size_t kRequestSize = 28;
inline constexpr std::size_t kSimpleReplySize = 16;
inline constexpr std::size_t kChunkHeaderSize = 20;

// Transmission flags (§3.1).
inline constexpr std::uint16_t kTxHasFlags = 1u << 0;
inline constexpr std::uint16_t kTxReadOnly = 1u << 1;
inline constexpr std::uint16_t kTxSendFlush = 1u << 2;
inline constexpr std::uint16_t kTxSendFua = 1u << 3;
inline constexpr std::uint16_t kTxRotational = 1u << 4;
inline constexpr std::uint16_t kTxSendTrim = 1u << 5;
inline constexpr std::uint16_t kTxSendWriteZeroes = 1u << 6;
inline constexpr std::uint16_t kTxSendDf = 1u << 7;
inline constexpr std::uint16_t kTxCanMultiConn = 1u << 8;
inline constexpr std::uint16_t kTxSendResize = 1u << 9;
inline constexpr std::uint16_t kTxSendCache = 1u << 10;
inline constexpr std::uint16_t kTxSendFastZero = 1u << 11;

// Commands (§3.2).
inline constexpr std::uint16_t kCmdRead = 0;
inline constexpr std::uint16_t kCmdWrite = 1;
inline constexpr std::uint16_t kCmdDisc = 2;
inline constexpr std::uint16_t kCmdFlush = 3;
inline constexpr std::uint16_t kCmdTrim = 4;
inline constexpr std::uint16_t kCmdCache = 5;
inline constexpr std::uint16_t kCmdWriteZeroes = 6;
inline constexpr std::uint16_t kCmdBlockStatus = 7;

// Command flags (§3.2).
inline constexpr std::uint16_t kCmdFlagFua = 1u << 0;
inline constexpr std::uint16_t kCmdFlagNoHole = 1u << 1;
inline constexpr std::uint16_t kCmdFlagDf = 1u << 2;
inline constexpr std::uint16_t kCmdFlagReqOne = 1u << 3;
inline constexpr std::uint16_t kCmdFlagFastZero = 1u << 4;
inline constexpr std::uint16_t kCmdFlagsKnown =
    kCmdFlagFua | kCmdFlagNoHole | kCmdFlagDf | kCmdFlagReqOne | kCmdFlagFastZero;

// Structured replies (§3.3).
inline constexpr std::uint16_t kReplyFlagDone = 1u << 0;
inline constexpr std::uint16_t kChunkNone = 0;
inline constexpr std::uint16_t kChunkOffsetData = 1;
inline constexpr std::uint16_t kChunkOffsetHole = 2;
inline constexpr std::uint16_t kChunkBlockStatus = 5;
inline constexpr std::uint16_t kChunkError = (1u << 15) + 1;
inline constexpr std::uint16_t kChunkErrorOffset = (1u << 15) + 2;

// Errors (§3.4): Linux errno values by definition of the protocol.
inline constexpr std::uint32_t kEperm = 1;
inline constexpr std::uint32_t kEio = 5;
inline constexpr std::uint32_t kEnomem = 12;
inline constexpr std::uint32_t kEinval = 22;
inline constexpr std::uint32_t kEnospc = 28;
inline constexpr std::uint32_t kEoverflow = 75;
inline constexpr std::uint32_t kEnotsup = 95;
inline constexpr std::uint32_t kEshutdown = 108;

// Metadata contexts (§3.5).
inline constexpr const char* kBaseAllocation = "base:allocation";
inline constexpr std::uint32_t kStateHole = 1u << 0;
inline constexpr std::uint32_t kStateZero = 1u << 1;

// Hard cap on any request length with a payload: the spec says payloads up to 32 MiB should not
// be treated as abuse, so a rejected WRITE up to this size is drained; a longer one closes.
inline constexpr std::uint32_t kMaxPayloadHard = 32u << 20;

// ---- byte order ------------------------------------------------------------------------------
inline void Put16(std::uint8_t* p, std::uint16_t v) {
  p[0] = std::uint8_t(v >> 8);
  p[1] = std::uint8_t(v);
}
inline void Put32(std::uint8_t* p, std::uint32_t v) {
  for (int i = 3; i >= 0; --i, v >>= 8) p[i] = std::uint8_t(v);
}
inline void Put64(std::uint8_t* p, std::uint64_t v) {
  for (int i = 7; i >= 0; --i, v >>= 8) p[i] = std::uint8_t(v);
}
inline std::uint16_t Get16(const std::uint8_t* p) { return std::uint16_t((p[0] << 8) | p[1]); }
inline std::uint32_t Get32(const std::uint8_t* p) {
  return (std::uint32_t(p[0]) << 24) | (std::uint32_t(p[1]) << 16) | (std::uint32_t(p[2]) << 8) | p[3];
}
inline std::uint64_t Get64(const std::uint8_t* p) { return (std::uint64_t(Get32(p)) << 32) | Get32(p + 4); }

// ---- codec -----------------------------------------------------------------------------------
const char* OptionName(std::uint32_t opt);
const char* CommandName(std::uint16_t cmd);

void EncodeGreeting(std::uint16_t handshake_flags, std::uint8_t out[kGreetingSize]);

struct OptionHeader {
  std::uint32_t option = 0;
  std::uint32_t length = 0;
};
// Fails (protocol error: close) when the magic is not IHAVEOPT.
Status DecodeOptionHeader(const std::uint8_t in[kOptionHeaderSize], OptionHeader* out);
void EncodeOptionReplyHeader(std::uint32_t option, std::uint32_t type, std::uint32_t length,
                             std::uint8_t out[kOptionReplyHeaderSize]);
// Appends a whole option reply (header + data) to `out` (handshake only: allocates).
void AppendOptionReply(std::string* out, std::uint32_t option, std::uint32_t type, std::string_view data);

// NBD_OPT_INFO / NBD_OPT_GO data: u32 name_len, name, u16 n, u16 info[n].
struct InfoRequest {
  std::string name;
  std::vector<std::uint16_t> infos;
};
Status ParseInfoRequest(const std::uint8_t* data, std::size_t len, InfoRequest* out);

// NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT data: u32 name_len, name, u32 n, {u32 len, query}*.
struct MetaRequest {
  std::string name;
  std::vector<std::string> queries;
};
Status ParseMetaRequest(const std::uint8_t* data, std::size_t len, MetaRequest* out);

// Payload builders of option replies (handshake only).
std::string InfoExportPayload(std::uint64_t size, std::uint16_t tx_flags);       // NBD_INFO_EXPORT
std::string InfoStringPayload(std::uint16_t type, std::string_view s);           // NAME / DESCRIPTION
std::string InfoBlockSizePayload(std::uint32_t min, std::uint32_t pref, std::uint32_t max);
std::string ServerPayload(std::string_view name, std::string_view description);  // NBD_REP_SERVER
std::string MetaContextPayload(std::uint32_t id, std::string_view name);         // NBD_REP_META_CONTEXT

// Transmission requests.
struct Request {
  std::uint16_t flags = 0;
  std::uint16_t type = 0;
  std::uint64_t cookie = 0;
  std::uint64_t offset = 0;
  std::uint32_t length = 0;
};
// Fails (protocol error: close) only on a bad magic; every other field is judged by CheckRequest.
Status DecodeRequest(const std::uint8_t in[kRequestSize], Request* out);
void EncodeRequest(const Request& r, std::uint8_t out[kRequestSize]);  // for clients and tests
// Whether a WRITE-style payload of `length` bytes follows the request on the wire.
inline bool RequestHasPayload(const Request& r) { return r.type == kCmdWrite; }

// What the server knows about the export and the connection when judging a request.
struct RequestLimits {
  std::uint64_t size = 0;
  std::uint32_t min_block = 1;
  std::uint32_t max_payload = 1u << 20;
  std::uint16_t tx_flags = kTxHasFlags;  // as advertised to this client
  bool structured = false;
  bool have_contexts = false;  // a SET_META_CONTEXT selected at least one context
};
// Returns 0 or the NBD errno to reply with (docs/nbd.md §5 lists the mapping).  Unknown commands
// and flags give EINVAL, a write to a read-only export EPERM, a READ/WRITE above max payload
// EINVAL (EOVERFLOW for a DF read), a write past the end ENOSPC, other out-of-range EINVAL.
std::uint32_t CheckRequest(const Request& r, const RequestLimits& lim);

void EncodeSimpleReply(std::uint32_t error, std::uint64_t cookie, std::uint8_t out[kSimpleReplySize]);
void EncodeChunkHeader(std::uint16_t flags, std::uint16_t type, std::uint64_t cookie, std::uint32_t length,
                       std::uint8_t out[kChunkHeaderSize]);

// dst Status -> NBD errno (one translation boundary, docs/nbd.md §5).
std::uint32_t ErrnoFromStatus(const Status& s);

}  // namespace dst::net::nbd
