// BlockDevice: the asynchronous block interface every dst layer implements and consumes.
//
// Consumers (fusefs, the exporter, arrays above a device) fill an IoRequest and call Submit().
// Implementers (FileDevice, RemoteDevice, later Linear/Mirror/NBD) complete it exactly once by
// calling req->done(req, status) -- possibly inside Submit(), possibly on another thread.
//
// Ownership: the IoRequest and its data buffer belong to the caller and must stay valid and
// untouched until done() runs.  While a device owns a request it may use `link` and `scratch`
// (intrusive queueing without allocation); nobody else may.
//
// Threading: Submit() and Info() may be called from any thread concurrently.  Submit() never
// blocks on I/O; it may take a short internal lock.
#pragma once

#include <cstdint>
#include <string>

#include "dst/status.h"

namespace dst {

enum class IoOp : std::uint8_t {
  kRead = 0,
  kWrite = 1,
  kFlush = 2,        // make every acknowledged write durable
  kTrim = 3,         // discard; contents afterwards unspecified (zero for files)
  kWriteZeroes = 4,  // contents afterwards read as zero
};
const char* IoOpName(IoOp op);

// Request flags.
inline constexpr std::uint32_t kIoFua = 1u << 0;      // write: durable before completion
inline constexpr std::uint32_t kIoNoUnmap = 1u << 1;  // write-zeroes: keep allocation

struct IoRequest;
using IoDoneFn = void (*)(IoRequest* req, Status status);

struct IoRequest {
  IoOp op = IoOp::kRead;
  std::uint32_t flags = 0;
  std::uint64_t offset = 0;  // bytes
  std::uint32_t length = 0;  // bytes; 0 for flush
  char* data = nullptr;      // read: destination, write: source (length bytes)
  IoDoneFn done = nullptr;
  void* ctx = nullptr;  // the submitter's cookie

  // Owned by the device the request is submitted to, until done() runs.
  IoRequest* link = nullptr;
  std::uint64_t scratch = 0;
};

// Capabilities are queried, never inferred by casting (nbdkit can_*, SPDK io_type_supported).
struct DeviceInfo {
  std::uint64_t size = 0;                   // bytes
  std::uint32_t logical_block_size = 512;   // offsets/lengths must be multiples of this
  std::uint32_t max_io_bytes = 1u << 20;    // largest single read/write
  bool read_only = false;
  bool can_flush = true;
  bool can_fua = true;
  bool can_trim = true;
  bool can_write_zeroes = true;
};

// Identity check on every (re)connection.  A device whose backing can change under the same
// address (a network leaf that reconnects: the peer may now serve a blank or another file) runs
// the installed check on every new connection, after its handshake and before any request is
// sent or re-sent on that connection: it reads [offset, offset + length) through the new
// connection and passes the bytes to verify().
//   * OK: the connection is admitted and queued requests go out.
//   * An error (or a failed read): every request that was waiting for that connection fails
//     with EIO, rejected(arg, why) is called, and the connection is admitted afterwards for new
//     requests (the owner, e.g. a mirror, has stopped routing I/O to it inside rejected()).
// verify() and rejected() run on the device's event-loop thread: quick, non-blocking, and no
// synchronous I/O on the device.  After SetConnectCheck() returns (also with verify ==
// nullptr, which removes the check) the previous callbacks are not running and never run again.
struct ConnectCheck {
  std::uint64_t offset = 0;
  std::uint32_t length = 0;
  Status (*verify)(void* arg, const char* data, std::uint32_t len) = nullptr;
  void (*rejected)(void* arg, const Status& why) = nullptr;
  void* arg = nullptr;
};

// Reachability of the backing as the device sees it now, without doing I/O (keepalive state).
struct DeviceHealth {
  bool reachable = true;         // false while disconnected / reconnecting / failing
  std::uint64_t outage_ms = 0;   // how long it has been unreachable (0 when reachable)
  std::string detail;            // e.g. "reconnecting: connection refused"
};

class BlockDevice {
 public:
  virtual ~BlockDevice() = default;
  virtual DeviceInfo Info() const = 0;
  // Starts `req`; completes it exactly once via req->done.  See the header comment.
  virtual void Submit(IoRequest* req) = 0;
  // One line for humans, e.g. "file /srv/a.img" or "dst://host:7400/disk1".
  virtual std::string Describe() const = 0;
  // Installs (or, with verify == nullptr, removes) the check above.  false: this device never
  // reconnects (local files), so there is nothing to check after the owner's first look.
  virtual bool SetConnectCheck(const ConnectCheck& check) {
    (void)check;
    return false;
  }
  // Local devices are always reachable.
  virtual DeviceHealth Health() const { return {}; }
};

// Validates op, alignment, range and permission against `info`.  OK means the device may act.
Status ValidateRequest(const DeviceInfo& info, const IoRequest& req);

// Submits and waits (condition variable).  For tools and tests only: never call it on an
// event-loop thread or from a device completion.
Status SubmitSync(BlockDevice& dev, IoRequest& req);
Status ReadSync(BlockDevice& dev, std::uint64_t offset, void* buf, std::uint32_t len);
Status WriteSync(BlockDevice& dev, std::uint64_t offset, const void* buf, std::uint32_t len,
                 std::uint32_t flags = 0);
Status FlushSync(BlockDevice& dev);

}  // namespace dst
