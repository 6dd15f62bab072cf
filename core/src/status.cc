#include "dst/status.h"

#include <cstring>

namespace dst {

Status::Status(Code c, int err, std::string_view m) : code_(c), err_(err) {
  if (!m.empty()) msg_ = std::make_shared<const std::string>(m);
}

Status Status::FromErrno(int err, std::string_view context) {
  std::string m;
  if (!context.empty()) {
    m.append(context);
    m.append(": ");
  }
  m.append(std::strerror(err));
  Code c;
  switch (err) {
    case 0: return Status();
    case EINVAL: c = Code::kInvalidArgument; break;
    case ENOENT: case ENODEV: case ENXIO: c = Code::kNotFound; break;
    case EEXIST: c = Code::kExists; break;
    case EROFS: case EPERM: case EACCES: c = Code::kReadOnly; break;
    case EOPNOTSUPP: c = Code::kNotSupported; break;
    case EPROTO: case EBADMSG: c = Code::kProtocolError; break;
    case ETIMEDOUT: c = Code::kTimedOut; break;
    case ENOTCONN: case ECONNREFUSED: case ECONNRESET: case EPIPE: case EHOSTUNREACH: case ENETUNREACH:
      c = Code::kUnavailable; break;
    case EBUSY: c = Code::kBusy; break;
    case ENOSPC: case ENOMEM: c = Code::kNoSpace; break;
    case ERANGE: case EFBIG: c = Code::kOutOfRange; break;
    default: c = Code::kIoError; break;
  }
  return Status(c, err, m);
}

const std::string& Status::message() const {
  static const std::string kEmpty;
  return msg_ ? *msg_ : kEmpty;
}

const char* Status::CodeName(Code c) {
  switch (c) {
    case Code::kOk: return "OK";
    case Code::kInvalidArgument: return "invalid argument";
    case Code::kNotFound: return "not found";
    case Code::kExists: return "already exists";
    case Code::kIoError: return "I/O error";
    case Code::kOutOfRange: return "out of range";
    case Code::kReadOnly: return "read-only";
    case Code::kNotSupported: return "not supported";
    case Code::kProtocolError: return "protocol error";
    case Code::kTimedOut: return "timed out";
    case Code::kUnavailable: return "unavailable";
    case Code::kBusy: return "busy";
    case Code::kNoSpace: return "no space";
  }
  return "unknown";
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string s = CodeName(code_);
  if (msg_) {
    s += ": ";
    s += *msg_;
  }
  return s;
}

Status Status::WithContext(std::string_view context) const {
  if (ok()) return *this;
  std::string m(context);
  if (msg_) {
    m += ": ";
    m += *msg_;
  }
  return Status(code_, err_, m);
}

}  // namespace dst
