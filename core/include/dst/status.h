// Status and Result<T>: the one error vocabulary of dst.
//
// A Status is OK or carries a category code, an errno value and an optional message.  OK and
// message-less errors never allocate, so they are safe on the I/O path; a message is built only
// off the hot path (config, control plane, connection setup).
//
// Threading: a Status is a value; copies may be used from different threads freely.
#pragma once

#include <cerrno>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace dst {

class [[nodiscard]] Status {
 public:
  enum class Code : unsigned char {
    kOk = 0,
    kInvalidArgument,  // bad request or config (EINVAL)
    kNotFound,         // unknown export/volume/file (ENOENT)
    kExists,           // name already used (EEXIST)
    kIoError,          // device or transport failure (EIO)
    kOutOfRange,       // offset/length past the end (ERANGE on the wire, EINVAL to FUSE)
    kReadOnly,         // write to a read-only device (EROFS/EPERM)
    kNotSupported,     // operation not offered by this device (EOPNOTSUPP)
    kProtocolError,    // malformed frame (EPROTO)
    kTimedOut,         // deadline passed (ETIMEDOUT)
    kUnavailable,      // peer not reachable right now (ENOTCONN)
    kBusy,             // in use (EBUSY)
    kNoSpace,          // out of resources (ENOSPC / ENOMEM)
  };

  Status() = default;  // OK
  static Status OK() { return Status(); }

  static Status InvalidArgument(std::string_view m = {}) { return Status(Code::kInvalidArgument, EINVAL, m); }
  static Status NotFound(std::string_view m = {}) { return Status(Code::kNotFound, ENOENT, m); }
  static Status Exists(std::string_view m = {}) { return Status(Code::kExists, EEXIST, m); }
  static Status IoError(std::string_view m = {}) { return Status(Code::kIoError, EIO, m); }
  static Status OutOfRange(std::string_view m = {}) { return Status(Code::kOutOfRange, EINVAL, m); }
  static Status ReadOnly(std::string_view m = {}) { return Status(Code::kReadOnly, EROFS, m); }
  static Status NotSupported(std::string_view m = {}) { return Status(Code::kNotSupported, EOPNOTSUPP, m); }
  static Status ProtocolError(std::string_view m = {}) { return Status(Code::kProtocolError, EPROTO, m); }
  static Status TimedOut(std::string_view m = {}) { return Status(Code::kTimedOut, ETIMEDOUT, m); }
  static Status Unavailable(std::string_view m = {}) { return Status(Code::kUnavailable, ENOTCONN, m); }
  static Status Busy(std::string_view m = {}) { return Status(Code::kBusy, EBUSY, m); }
  static Status NoSpace(std::string_view m = {}) { return Status(Code::kNoSpace, ENOSPC, m); }
  // Maps an errno value onto the closest category; `context` (e.g. "pwrite /dev/sdb") prefixes strerror.
  static Status FromErrno(int err, std::string_view context = {});

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  // Positive errno value for the FUSE/wire boundary; 0 when OK.
  int ToErrno() const { return err_; }
  const std::string& message() const;
  std::string ToString() const;
  static const char* CodeName(Code c);

  bool IsNotFound() const { return code_ == Code::kNotFound; }
  bool IsIoError() const { return code_ == Code::kIoError; }
  bool IsTimedOut() const { return code_ == Code::kTimedOut; }

  // Returns a copy with "context: " prepended to the message (allocates; not for the I/O path).
  Status WithContext(std::string_view context) const;

 private:
  Status(Code c, int err, std::string_view m);
  Code code_ = Code::kOk;
  int err_ = 0;
  std::shared_ptr<const std::string> msg_;  // null when no message
};

// Either a value or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T v) : value_(std::move(v)) {}              // NOLINT: implicit by design
  Result(Status s) : status_(std::move(s)) {         // NOLINT
    if (status_.ok()) status_ = Status::InvalidArgument("Result built from OK status without value");
  }
  bool ok() const { return value_.has_value(); }
  const Status& status() const { return status_; }
  T& value() & { return *value_; }
  const T& value() const& { return *value_; }
  T&& value() && { return std::move(*value_); }
  T* operator->() { return &*value_; }
  T& operator*() { return *value_; }

 private:
  std::optional<T> value_;
  Status status_;
};

#define DST_RETURN_IF_ERROR(expr)          \
  do {                                     \
    ::dst::Status _dst_st = (expr);        \
    if (!_dst_st.ok()) return _dst_st;     \
  } while (0)

}  // namespace dst
