// NBD encoders/decoders (see nbd_format.h and docs/nbd.md).
#include <cstring>

#include "dst/net/nbd_format.h"

namespace dst::net::nbd {

const char* OptionName(std::uint32_t opt) {
  switch (opt) {
    case kOptExportName: return "EXPORT_NAME";
    case kOptAbort: return "ABORT";
    case kOptList: return "LIST";
    case kOptPeekExport: return "PEEK_EXPORT";
    case kOptStartTls: return "STARTTLS";
    case kOptInfo: return "INFO";
    case kOptGo: return "GO";
    case kOptStructuredReply: return "STRUCTURED_REPLY";
    case kOptListMetaContext: return "LIST_META_CONTEXT";
    case kOptSetMetaContext: return "SET_META_CONTEXT";
    case kOptExtendedHeaders: return "EXTENDED_HEADERS";
    default: return "unknown";
  }
}

const char* CommandName(std::uint16_t cmd) {
  switch (cmd) {
    case kCmdRead: return "READ";
    case kCmdWrite: return "WRITE";
    case kCmdDisc: return "DISC";
    case kCmdFlush: return "FLUSH";
    case kCmdTrim: return "TRIM";
    case kCmdCache: return "CACHE";
    case kCmdWriteZeroes: return "WRITE_ZEROES";
    case kCmdBlockStatus: return "BLOCK_STATUS";
    default: return "unknown";
  }
}

void EncodeGreeting(std::uint16_t handshake_flags, std::uint8_t out[kGreetingSize]) {
  Put64(out, kNbdMagic);
  Put64(out + 8, kOptMagic);
  Put16(out + 16, handshake_flags);
}

Status DecodeOptionHeader(const std::uint8_t in[kOptionHeaderSize], OptionHeader* out) {
  if (Get64(in) != kOptMagic) return Status::ProtocolError("option without IHAVEOPT magic");
  out->option = Get32(in + 8);
  out->length = Get32(in + 12);
  return Status::OK();
}

void EncodeOptionReplyHeader(std::uint32_t option, std::uint32_t type, std::uint32_t length,
                             std::uint8_t out[kOptionReplyHeaderSize]) {
  Put64(out, kOptReplyMagic);
  Put32(out + 8, option);
  Put32(out + 12, type);
  Put32(out + 16, length);
}

void AppendOptionReply(std::string* out, std::uint32_t option, std::uint32_t type, std::string_view data) {
  std::uint8_t h[kOptionReplyHeaderSize];
  EncodeOptionReplyHeader(option, type, static_cast<std::uint32_t>(data.size()), h);
  out->append(reinterpret_cast<const char*>(h), sizeof h);
  out->append(data.data(), data.size());
}

namespace {

// Reads a u32-length-prefixed string; checks the bounds and the 4096-byte string limit.
Status ReadString(const std::uint8_t* data, std::size_t len, std::size_t* pos, std::string* out,
                  const char* what) {
  if (len - *pos < 4) return Status::InvalidArgument(std::string(what) + " length truncated");
  const std::uint32_t n = Get32(data + *pos);
  *pos += 4;
  if (n > kMaxStringLen) return Status::InvalidArgument(std::string(what) + " longer than 4096 bytes");
  if (len - *pos < n) return Status::InvalidArgument(std::string(what) + " truncated");
  out->assign(reinterpret_cast<const char*>(data + *pos), n);
  *pos += n;
  return Status::OK();
}

}  // namespace

Status ParseInfoRequest(const std::uint8_t* data, std::size_t len, InfoRequest* out) {
  std::size_t pos = 0;
  DST_RETURN_IF_ERROR(ReadString(data, len, &pos, &out->name, "export name"));
  if (len - pos < 2) return Status::InvalidArgument("information request count missing");
  const std::uint16_t n = Get16(data + pos);
  pos += 2;
  if (len - pos != std::size_t(n) * 2) return Status::InvalidArgument("information request list length mismatch");
  out->infos.clear();
  for (std::uint16_t i = 0; i < n; ++i) out->infos.push_back(Get16(data + pos + 2 * i));
  return Status::OK();
}

Status ParseMetaRequest(const std::uint8_t* data, std::size_t len, MetaRequest* out) {
  std::size_t pos = 0;
  DST_RETURN_IF_ERROR(ReadString(data, len, &pos, &out->name, "export name"));
  if (len - pos < 4) return Status::InvalidArgument("query count missing");
  const std::uint32_t n = Get32(data + pos);
  pos += 4;
  if (n > kMaxMetaQueries) return Status::InvalidArgument("too many metadata context queries");
  out->queries.clear();
  for (std::uint32_t i = 0; i < n; ++i) {
    std::string q;
    DST_RETURN_IF_ERROR(ReadString(data, len, &pos, &q, "query"));
    out->queries.push_back(std::move(q));
  }
  if (pos != len) return Status::InvalidArgument("trailing bytes after the queries");
  return Status::OK();
}

std::string InfoExportPayload(std::uint64_t size, std::uint16_t tx_flags) {
  std::uint8_t b[12];
  Put16(b, kInfoExport);
  Put64(b + 2, size);
  Put16(b + 10, tx_flags);
  return std::string(reinterpret_cast<const char*>(b), sizeof b);
}

std::string InfoStringPayload(std::uint16_t type, std::string_view s) {
  std::uint8_t b[2];
  Put16(b, type);
  std::string out(reinterpret_cast<const char*>(b), 2);
  out.append(s.data(), s.size());
  return out;
}

std::string InfoBlockSizePayload(std::uint32_t min, std::uint32_t pref, std::uint32_t max) {
  std::uint8_t b[14];
  Put16(b, kInfoBlockSize);
  Put32(b + 2, min);
  Put32(b + 6, pref);
  Put32(b + 10, max);
  return std::string(reinterpret_cast<const char*>(b), sizeof b);
}

std::string ServerPayload(std::string_view name, std::string_view description) {
  std::uint8_t b[4];
  Put32(b, static_cast<std::uint32_t>(name.size()));
  std::string out(reinterpret_cast<const char*>(b), 4);
  out.append(name.data(), name.size());
  out.append(description.data(), description.size());
  return out;
}

std::string MetaContextPayload(std::uint32_t id, std::string_view name) {
  std::uint8_t b[4];
  Put32(b, id);
  std::string out(reinterpret_cast<const char*>(b), 4);
  out.append(name.data(), name.size());
  return out;
}

Status DecodeRequest(const std::uint8_t in[kRequestSize], Request* out) {
  const std::uint32_t magic = Get32(in);
  if (magic != kRequestMagic) {
    return Status::ProtocolError(magic == kExtendedRequestMagic ? "extended request without negotiation"
                                                                : "bad request magic");
  }
  out->flags = Get16(in + 4);
  out->type = Get16(in + 6);
  out->cookie = Get64(in + 8);
  out->offset = Get64(in + 16);
  out->length = Get32(in + 24);
  return Status::OK();
}

void EncodeRequest(const Request& r, std::uint8_t out[kRequestSize]) {
  Put32(out, kRequestMagic);
  Put16(out + 4, r.flags);
  Put16(out + 6, r.type);
  Put64(out + 8, r.cookie);
  Put64(out + 16, r.offset);
  Put32(out + 24, r.length);
}

std::uint32_t CheckRequest(const Request& r, const RequestLimits& lim) {
  const bool ro = (lim.tx_flags & kTxReadOnly) != 0;
  // Flags: unknown bits, or bits that do not belong to this command.
  if (r.flags & ~kCmdFlagsKnown) return kEinval;
  if ((r.flags & kCmdFlagFua) && !(lim.tx_flags & kTxSendFua)) return kEinval;
  if ((r.flags & (kCmdFlagNoHole | kCmdFlagFastZero)) && r.type != kCmdWriteZeroes) return kEinval;
  if ((r.flags & kCmdFlagFastZero) && !(lim.tx_flags & kTxSendFastZero)) return kEinval;
  if ((r.flags & kCmdFlagDf) && (r.type != kCmdRead || !lim.structured)) return kEinval;
  if ((r.flags & kCmdFlagReqOne) && r.type != kCmdBlockStatus) return kEinval;

  bool needs_range = true;
  bool aligned = false;
  bool writes = false;
  switch (r.type) {
    case kCmdRead:
      aligned = true;
      break;
    case kCmdWrite:
      aligned = writes = true;
      break;
    case kCmdFlush:
      if (!(lim.tx_flags & kTxSendFlush)) return kEinval;
      needs_range = false;
      break;
    case kCmdTrim:
      if (ro) return kEperm;
      if (!(lim.tx_flags & kTxSendTrim)) return kEinval;
      aligned = true;
      break;
    case kCmdCache:
      break;
    case kCmdWriteZeroes:
      if (ro) return kEperm;
      if (!(lim.tx_flags & kTxSendWriteZeroes)) return kEinval;
      aligned = writes = true;
      break;
    case kCmdBlockStatus:
      if (!lim.structured || !lim.have_contexts) return kEinval;
      break;
    default:
      return kEinval;  // unknown (incl. DISC, which the caller handles before checking)
  }
  if (r.type == kCmdWrite && ro) return kEperm;
  if (!needs_range) return 0;
  if (r.length == 0) return kEinval;
  if (aligned && lim.min_block > 1 && (r.offset % lim.min_block || r.length % lim.min_block)) return kEinval;
  // Above the advertised maximum: the spec reserves EOVERFLOW for a DF read too large to send
  // unfragmented and asks for it only then.
  if ((r.type == kCmdRead || r.type == kCmdWrite) && r.length > lim.max_payload)
    return (r.type == kCmdRead && (r.flags & kCmdFlagDf)) ? kEoverflow : kEinval;
  if (r.offset > lim.size || r.length > lim.size - r.offset) return writes ? kEnospc : kEinval;
  return 0;
}

void EncodeSimpleReply(std::uint32_t error, std::uint64_t cookie, std::uint8_t out[kSimpleReplySize]) {
  Put32(out, kSimpleReplyMagic);
  Put32(out + 4, error);
  Put64(out + 8, cookie);
}

void EncodeChunkHeader(std::uint16_t flags, std::uint16_t type, std::uint64_t cookie, std::uint32_t length,
                       std::uint8_t out[kChunkHeaderSize]) {
  Put32(out, kStructuredReplyMagic);
  Put16(out + 4, flags);
  Put16(out + 6, type);
  Put64(out + 8, cookie);
  Put32(out + 16, length);
}

std::uint32_t ErrnoFromStatus(const Status& s) {
  using C = Status::Code;
  switch (s.code()) {
    case C::kOk: return 0;
    case C::kInvalidArgument:
    case C::kOutOfRange: return kEinval;
    case C::kReadOnly: return kEperm;
    case C::kNotSupported: return kEnotsup;
    case C::kNoSpace: return s.ToErrno() == ENOMEM ? kEnomem : kEnospc;
    default: return kEio;  // I/O, timeouts, unreachable legs: the client sees EIO
  }
}

}  // namespace dst::net::nbd
