// The dstd control protocol: JSON lines over a Unix stream socket.
//
//   request  {"id":1,"method":"status","params":{}}\n
//   reply    {"id":1,"result":{...}}\n
//            {"id":1,"error":{"code":"not_found","message":"no volume \"x\""}}\n
//
// * `id` is an integer or a string chosen by the client and echoed; replies on one connection
//   may come back out of order (slow methods run on a worker thread), so match on id.
// * `params` is optional and must be an object when present.
// * A line longer than kMaxLineBytes gets a `too_large` error (id null) and the connection is
//   closed: the server never buffers unbounded input.
// * A line that is not JSON gets `parse_error` (id null); a JSON value that is not a valid request
//   (also one nested deeper than kMaxJsonDepth) gets `invalid_request`; an unknown method
//   `unknown_method`.  The connection stays up.
// * Methods that change state need root or the control group; others get `permission_denied`
//   (IsReadOnlyMethod lists the ones anyone who can connect may call).
//
// Every method, its params, result shape and error codes: docs/control.md (checked against a
// live dstd by tests/integration/control_contract_test.cc).
//
// This library links only nlohmann-json (dstctl and the GUI use it; no engine code).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace dst::control {

inline constexpr std::size_t kMaxLineBytes = 1u << 20;  // 1 MiB per request or reply line
// Arrays and objects nested deeper than this are refused before they are built: JSON values are
// copied and printed recursively, so depth is stack (a 400,000-deep request crashed dstd).
inline constexpr int kMaxJsonDepth = 64;
inline constexpr int kProtocolVersion = 1;             // "version" in status, "protocol" in hello
// The oldest daemon protocol this client library speaks.  A daemon without `hello` is older than
// every capability below and is refused by CheckHello's callers (dstctl).
inline constexpr int kMinDaemonProtocol = 1;

// Error codes (the "code" member of an error object).
inline constexpr const char* kParseError = "parse_error";
inline constexpr const char* kInvalidRequest = "invalid_request";
inline constexpr const char* kUnknownMethod = "unknown_method";
inline constexpr const char* kInvalidParams = "invalid_params";
inline constexpr const char* kTooLarge = "too_large";
inline constexpr const char* kNotFound = "not_found";
inline constexpr const char* kExists = "exists";
inline constexpr const char* kBusy = "busy";
inline constexpr const char* kUnavailable = "unavailable";
inline constexpr const char* kIoError = "io_error";
inline constexpr const char* kTimedOut = "timed_out";
inline constexpr const char* kReadOnly = "read_only";
inline constexpr const char* kNotSupported = "not_supported";
inline constexpr const char* kShuttingDown = "shutting_down";
inline constexpr const char* kInternal = "internal";
// A changing method from a peer that is neither root nor in the control group (docs/security.md).
inline constexpr const char* kPermissionDenied = "permission_denied";
// The client left too many reply bytes unread (events subscriber too slow); the connection closes.
inline constexpr const char* kTooSlow = "too_slow";

// Every method dstd answers.
const std::vector<std::string>& Methods();
bool IsKnownMethod(std::string_view method);
// Methods that only read state (status, hello, lists, details, events): allowed to any peer that
// can connect to the socket.  Every other method changes something.
bool IsReadOnlyMethod(std::string_view method);

// Whether JSON text nests arrays/objects at most `max_depth` deep (a byte scan that skips
// strings; it does not validate).  Run before parsing untrusted text.
bool JsonDepthWithin(std::string_view text, int max_depth = kMaxJsonDepth);

struct Request {
  nlohmann::json id;  // integer or string
  std::string method;
  nlohmann::json params = nlohmann::json::object();
};

struct ErrorInfo {
  nlohmann::json id;  // null when the request's id is unknown
  std::string code;
  std::string message;
};

// Parses one request line (no trailing newline).  Fails with parse_error, invalid_request or
// unknown_method in *error.
bool ParseRequest(std::string_view line, Request* req, ErrorInfo* error);

// Encoders return one line including the trailing '\n'.
std::string EncodeRequest(const nlohmann::json& id, std::string_view method,
                          const nlohmann::json& params = nlohmann::json::object());
std::string EncodeResult(const nlohmann::json& id, const nlohmann::json& result);
std::string EncodeError(const nlohmann::json& id, std::string_view code, std::string_view message);
// An error with the refusal reasons of an operation (dst/control/ops.h Refusal, as JSON):
// {"code":..,"message":..,"reasons":[{"code","object","owner","message"},...]}.
std::string EncodeError(const nlohmann::json& id, std::string_view code, std::string_view message,
                        const nlohmann::json& reasons);

struct Reply {
  nlohmann::json id;
  bool ok = false;
  nlohmann::json result;
  std::string error_code;
  std::string error_message;
  nlohmann::json error_reasons = nlohmann::json::array();  // refusals (ops.h), when refused
};
// Parses a reply line; false (with *why) if it is not a well-formed reply.
bool ParseReply(std::string_view line, Reply* reply, std::string* why);

// The result of `hello` (docs/control.md): what the daemon speaks and offers.
struct Hello {
  int protocol = 0;
  std::string daemon_version;
  std::vector<std::string> methods;   // every method it answers
  std::vector<std::string> layers;    // array levels ("linear", "mirror", ...)
  std::vector<std::string> features;  // "events_since", "nbd", "fuse", ...
  bool Has(std::string_view feature) const;
};
// false + *why if `result` is not a hello result.
bool ParseHello(const nlohmann::json& result, Hello* out, std::string* why);
// Checks a daemon's answer to `hello` before talking to it.  "" when it is new enough and offers
// `feature` (empty: none needed); otherwise a sentence for the user.  `reply` may be the
// unknown_method error of a daemon that predates hello.
std::string CheckHello(const Reply& reply, std::string_view feature, Hello* out = nullptr);

// Splits a byte stream into lines with a hard length limit.
class LineSplitter {
 public:
  enum class Next { kLine, kNeedMore, kTooLong };
  explicit LineSplitter(std::size_t max_line = kMaxLineBytes) : max_line_(max_line) {}
  void Append(const char* data, std::size_t n) { buf_.append(data, n); }
  // kLine: *line holds the next line (without "\n" or "\r\n").  kTooLong: a line exceeds the
  // limit; the splitter is then unusable (close the connection).
  Next Pop(std::string* line);
  std::size_t buffered() const { return buf_.size() - pos_; }

 private:
  std::size_t max_line_;
  std::string buf_;
  std::size_t pos_ = 0;
};

// sysexits code dstctl uses for an error code from dstd (see dstctl(8) EXIT STATUS).
int ExitCodeForError(std::string_view code);

// sysexits values used by dstd and dstctl.
inline constexpr int kExUsage = 64;
inline constexpr int kExDataErr = 65;
inline constexpr int kExNoInput = 66;
inline constexpr int kExUnavailable = 69;
inline constexpr int kExSoftware = 70;
inline constexpr int kExIoErr = 74;
inline constexpr int kExTempFail = 75;
inline constexpr int kExProtocol = 76;
inline constexpr int kExNoPerm = 77;
inline constexpr int kExConfig = 78;

}  // namespace dst::control
