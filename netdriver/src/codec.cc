#include "dst/net/codec.h"

#include <cerrno>
#include <cstring>

#include <xxhash.h>

namespace dst::net {

void EncodeHeader(const Header& h, std::uint8_t out[kHeaderSize]) {
  PutU32(out + 0, kMagic);
  PutU16(out + 4, h.cmd);
  PutU16(out + 6, h.flags);
  PutU32(out + 8, h.status);
  PutU32(out + 12, h.length);
  PutU64(out + 16, h.id);
  PutU64(out + 24, h.offset);
  std::memset(out + 32, 0, 16);  // reserved
  if (h.flags & kFlagDigest) PutU64(out + kDigestOffset, h.digest);
}

std::uint64_t PayloadDigest(const void* data, std::size_t len) { return XXH3_64bits(data, len); }

Status DecodeHeader(const std::uint8_t in[kHeaderSize], Header* h) {
  if (GetU32(in) != kMagic) return Status::ProtocolError("bad magic");
  h->flags = GetU16(in + 6);
  const int reserved_from = (h->flags & kFlagDigest) ? 40 : 32;
  for (int i = reserved_from; i < 48; ++i)
    if (in[i] != 0) return Status::ProtocolError("reserved bytes not zero");
  h->digest = (h->flags & kFlagDigest) ? GetU64(in + kDigestOffset) : 0;
  h->cmd = GetU16(in + 4);
  h->status = GetU32(in + 8);
  h->length = GetU32(in + 12);
  h->id = GetU64(in + 16);
  h->offset = GetU64(in + 24);
  const std::uint16_t c = h->cmd & ~kReplyBit;
  if (c == 0 || c > kMaxCmd) return Status::ProtocolError("unknown command");
  if (h->flags & ~kFlagsKnown) return Status::ProtocolError("unknown flags");
  if (!h->is_reply() && h->status != 0) return Status::ProtocolError("status set in a request");
  const Cmd cmd = h->command();
  // The 32 MiB cap bounds bytes that follow a header (§7).  TRIM and WRITE_ZEROES never carry a
  // payload in either direction: their length is only a range, so any u32 is well-formed and
  // CheckRequest judges it against the export.  READ keeps the cap because its reply carries
  // `length` bytes.
  if (h->length > kAbsoluteMaxPayload && !IsRangeOnly(cmd))
    return Status::ProtocolError("length above protocol maximum");
  if (cmd == Cmd::kHello && h->length > kMaxHelloPayload)
    return Status::ProtocolError("oversized hello");
  if ((h->flags & kFlagFua) && cmd != Cmd::kWrite && cmd != Cmd::kWriteZeroes && cmd != Cmd::kTrim)
    return Status::ProtocolError("FUA on a command without data");
  if ((h->flags & kFlagNoUnmap) && cmd != Cmd::kWriteZeroes)
    return Status::ProtocolError("NO_UNMAP on a command other than WRITE_ZEROES");
  if ((h->flags & kFlagDigest) && !(cmd == Cmd::kWrite && !h->is_reply()) &&
      !(cmd == Cmd::kRead && h->is_reply() && h->status == 0))
    return Status::ProtocolError("DIGEST on a frame without payload");
  if ((cmd == Cmd::kFlush || cmd == Cmd::kPing || cmd == Cmd::kDisconnect) &&
      (h->length != 0 || h->offset != 0))
    return Status::ProtocolError("length/offset set on a command without range");
  return Status::OK();
}

bool IsRangeOnly(Cmd cmd) { return cmd == Cmd::kTrim || cmd == Cmd::kWriteZeroes; }

bool HasPayload(const Header& h) {
  switch (h.command()) {
    case Cmd::kHello: return true;
    case Cmd::kWrite: return !h.is_reply();
    case Cmd::kRead: return h.is_reply() && h.status == 0;
    default: return false;
  }
}

WireStatus CheckRequest(const Header& h, const ExportLimits& lim) {
  const Cmd cmd = h.command();
  switch (cmd) {
    case Cmd::kRead:
    case Cmd::kWrite:
      if (h.length > lim.max_payload) return WireStatus::kMsgSize;
      break;
    case Cmd::kTrim:
      if (!lim.can_trim) return WireStatus::kNotSup;
      break;
    case Cmd::kWriteZeroes:
      if (!lim.can_write_zeroes) return WireStatus::kNotSup;
      break;
    default:
      return WireStatus::kOk;  // FLUSH, PING, DISC, HELLO: nothing range-related to check
  }
  if (cmd != Cmd::kRead && lim.read_only) return WireStatus::kPerm;
  if (h.length == 0) return WireStatus::kInval;
  const std::uint64_t bs = lim.block_size ? lim.block_size : 1;
  if (h.offset % bs != 0 || h.length % bs != 0) return WireStatus::kInval;
  if (h.offset > lim.size || h.length > lim.size - h.offset) return WireStatus::kRange;
  return WireStatus::kOk;
}

std::size_t EncodeHelloRequest(const HelloRequest& r, std::uint8_t* out, std::size_t cap) {
  const std::size_t need = kHelloRequestFixed + r.export_name.size();
  if (cap < need || r.export_name.size() > kMaxExportNameLen) return 0;
  PutU16(out, r.version);
  PutU16(out + 2, 0);
  PutU32(out + 4, r.features);
  PutU64(out + 8, r.session_id);
  PutU16(out + 16, static_cast<std::uint16_t>(r.export_name.size()));
  std::memcpy(out + 18, r.export_name.data(), r.export_name.size());
  return need;
}

Status DecodeHelloRequest(const std::uint8_t* in, std::size_t len, HelloRequest* r) {
  if (len < kHelloRequestFixed) return Status::ProtocolError("short hello");
  r->version = GetU16(in);
  if (GetU16(in + 2) != 0) return Status::ProtocolError("hello reserved field not zero");
  r->features = GetU32(in + 4);
  r->session_id = GetU64(in + 8);
  const std::uint16_t n = GetU16(in + 16);
  if (n == 0 || n > kMaxExportNameLen) return Status::ProtocolError("bad export name length");
  if (len != kHelloRequestFixed + n) return Status::ProtocolError("hello length mismatch");
  for (std::uint16_t i = 0; i < n; ++i) {
    const unsigned char ch = in[18 + i];
    if (ch < 0x21 || ch > 0x7e) return Status::ProtocolError("export name not printable ASCII");
  }
  r->export_name.assign(reinterpret_cast<const char*>(in + 18), n);
  return Status::OK();
}

std::size_t EncodeHelloReply(const HelloReply& r, std::uint8_t* out, std::size_t cap) {
  if (cap < kHelloReplySize) return 0;
  PutU16(out, r.version);
  PutU16(out + 2, r.export_flags);
  PutU32(out + 4, r.features);
  PutU64(out + 8, r.size);
  PutU32(out + 16, r.block_size);
  PutU32(out + 20, r.max_payload);
  PutU32(out + 24, r.permissions);
  return kHelloReplySize;
}

Status DecodeHelloReply(const std::uint8_t* in, std::size_t len, HelloReply* r) {
  if (len < kHelloReplySize) return Status::ProtocolError("short hello reply");
  r->version = GetU16(in);
  r->export_flags = GetU16(in + 2);
  r->features = GetU32(in + 4);
  r->size = GetU64(in + 8);
  r->block_size = GetU32(in + 16);
  r->max_payload = GetU32(in + 20);
  r->permissions = GetU32(in + 24);
  if (r->version != kProtocolVersion) return Status::ProtocolError("unsupported protocol version");
  // docs/protocol.md §6.2: a power of two, 512..65536 (smaller would let a server make every
  // request a run of tiny units the client must align to).
  if (r->block_size < 512 || (r->block_size & (r->block_size - 1)) || r->block_size > 65536)
    return Status::ProtocolError("bad block size");
  if (r->max_payload < r->block_size || r->max_payload > kAbsoluteMaxPayload)
    return Status::ProtocolError("bad max payload");
  return Status::OK();
}

WireStatus ToWireStatus(const Status& s) {
  using C = Status::Code;
  switch (s.code()) {
    case C::kOk: return WireStatus::kOk;
    case C::kInvalidArgument: return WireStatus::kInval;
    case C::kNotFound: return WireStatus::kNoEnt;
    case C::kOutOfRange: return WireStatus::kRange;
    case C::kReadOnly: return WireStatus::kPerm;
    case C::kNotSupported: return WireStatus::kNotSup;
    case C::kProtocolError: return WireStatus::kProto;
    case C::kTimedOut: return WireStatus::kTimedOut;
    case C::kBusy: return WireStatus::kBusy;
    case C::kNoSpace: return s.ToErrno() == ENOMEM ? WireStatus::kNoMem : WireStatus::kNoSpc;
    case C::kUnavailable: return WireStatus::kShutdown;
    default: return WireStatus::kIo;
  }
}

Status FromWireStatus(std::uint32_t wire, std::string_view context) {
  switch (static_cast<WireStatus>(wire)) {
    case WireStatus::kOk: return Status::OK();
    case WireStatus::kPerm:
    case WireStatus::kRofs: return Status::ReadOnly(context);
    case WireStatus::kNoEnt: return Status::NotFound(context);
    case WireStatus::kAcces: return Status::FromErrno(EACCES, context);
    case WireStatus::kInval:
    case WireStatus::kMsgSize: return Status::InvalidArgument(context);
    case WireStatus::kRange: return Status::OutOfRange(context);
    case WireStatus::kNoSpc:
    case WireStatus::kNoMem: return Status::NoSpace(context);
    case WireStatus::kBusy: return Status::Busy(context);
    case WireStatus::kProto: return Status::ProtocolError(context);
    case WireStatus::kNotSup: return Status::NotSupported(context);
    case WireStatus::kShutdown: return Status::Unavailable(context);
    case WireStatus::kTimedOut: return Status::TimedOut(context);
    default: return Status::IoError(context);
  }
}

const char* CmdName(std::uint16_t cmd) {
  switch (static_cast<Cmd>(cmd & ~kReplyBit)) {
    case Cmd::kHello: return "HELLO";
    case Cmd::kRead: return "READ";
    case Cmd::kWrite: return "WRITE";
    case Cmd::kFlush: return "FLUSH";
    case Cmd::kTrim: return "TRIM";
    case Cmd::kWriteZeroes: return "WRITE_ZEROES";
    case Cmd::kPing: return "PING";
    case Cmd::kDisconnect: return "DISCONNECT";
  }
  return "UNKNOWN";
}

}  // namespace dst::net
