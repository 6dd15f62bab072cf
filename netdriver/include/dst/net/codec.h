// Encoding and validating DST v1 frames (docs/protocol.md).  Pure functions over caller-owned
// bytes: no allocation, no I/O, safe from any thread.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "dst/net/dst_format.h"
#include "dst/status.h"

namespace dst::net {

struct Header {
  std::uint16_t cmd = 0;     // Cmd value, possibly | kReplyBit
  std::uint16_t flags = 0;
  std::uint32_t status = 0;  // WireStatus
  std::uint32_t length = 0;
  std::uint64_t id = 0;
  std::uint64_t offset = 0;
  std::uint64_t digest = 0;  // with kFlagDigest: XXH3-64 of the payload (§4.1)

  bool is_reply() const { return (cmd & kReplyBit) != 0; }
  Cmd command() const { return static_cast<Cmd>(cmd & ~kReplyBit); }
};

void EncodeHeader(const Header& h, std::uint8_t out[kHeaderSize]);

// Checks magic, reserved bytes, command and flags; does not know the export.  A failure means
// the byte stream cannot be trusted any more: the caller closes the connection.  `length` above
// kAbsoluteMaxPayload is a framing error except for range-only commands (IsRangeOnly).
Status DecodeHeader(const std::uint8_t in[kHeaderSize], Header* out);

// TRIM and WRITE_ZEROES: `length` is a byte range that never travels as a payload, so it may
// use the full u32 range (§7).
bool IsRangeOnly(Cmd cmd);

// Whether a payload of `length` bytes follows this header on the wire (§2).
bool HasPayload(const Header& h);

// Server-side checks of a decoded request against the export (§8).  Returns kOk or the status
// to put in the reply; never asks to close (framing errors come from DecodeHeader).
struct ExportLimits {
  std::uint64_t size = 0;
  std::uint32_t block_size = 512;
  std::uint32_t max_payload = kDefaultMaxPayload;
  bool read_only = false;
  bool can_trim = true;
  bool can_write_zeroes = true;
};
WireStatus CheckRequest(const Header& h, const ExportLimits& lim);

struct HelloRequest {
  std::uint16_t version = kProtocolVersion;
  std::uint32_t features = 0;
  std::uint64_t session_id = 0;  // random per client device; fences reconnects (§6.3)
  std::string export_name;
};
struct HelloReply {
  std::uint16_t version = kProtocolVersion;
  std::uint16_t export_flags = 0;
  std::uint32_t features = 0;
  std::uint64_t size = 0;
  std::uint32_t block_size = 512;
  std::uint32_t max_payload = kDefaultMaxPayload;
  std::uint32_t permissions = 0;
};

// Returns the number of bytes written; `cap` must be >= kHelloRequestFixed + name length.
std::size_t EncodeHelloRequest(const HelloRequest& r, std::uint8_t* out, std::size_t cap);
Status DecodeHelloRequest(const std::uint8_t* in, std::size_t len, HelloRequest* out);
std::size_t EncodeHelloReply(const HelloReply& r, std::uint8_t* out, std::size_t cap);
Status DecodeHelloReply(const std::uint8_t* in, std::size_t len, HelloReply* out);

// XXH3-64 of a payload (§4.1), from Debian's libxxhash.
std::uint64_t PayloadDigest(const void* data, std::size_t len);

// Conversions at the protocol edge.
WireStatus ToWireStatus(const Status& s);
Status FromWireStatus(std::uint32_t wire, std::string_view context = {});
const char* CmdName(std::uint16_t cmd);

// Big-endian helpers (LevelDB coding.h style).
inline void PutU16(std::uint8_t* p, std::uint16_t v) { p[0] = v >> 8; p[1] = v & 0xff; }
inline void PutU32(std::uint8_t* p, std::uint32_t v) {
  for (int i = 3; i >= 0; --i, v >>= 8) p[i] = v & 0xff;
}
inline void PutU64(std::uint8_t* p, std::uint64_t v) {
  for (int i = 7; i >= 0; --i, v >>= 8) p[i] = v & 0xff;
}
inline std::uint16_t GetU16(const std::uint8_t* p) { return std::uint16_t(p[0] << 8 | p[1]); }
inline std::uint32_t GetU32(const std::uint8_t* p) {
  return std::uint32_t(p[0]) << 24 | std::uint32_t(p[1]) << 16 | std::uint32_t(p[2]) << 8 | p[3];
}
inline std::uint64_t GetU64(const std::uint8_t* p) {
  return std::uint64_t(GetU32(p)) << 32 | GetU32(p + 4);
}

}  // namespace dst::net
