// NbdServer: serves dst exports (any BlockDevice) over the NBD protocol, so nbdinfo, nbdcopy,
// qemu-img, fio's nbd engine, nbdfuse and the kernel's nbd-client can use them.  What is
// implemented and the error mapping: docs/nbd.md.
//
// Per connection:
//
//   GREETING --client flags ok--> OPTIONS --GO ack / EXPORT_NAME reply--> TRANSMISSION
//      |                           |  ^  (INFO, LIST, STRUCTURED_REPLY, *_META_CONTEXT, unknown:
//      |                           |  |   one reply or a reply list each, then the next option)
//      |                           +--+
//      |       bad flags / bad magic / ABORT / unknown EXPORT_NAME / EOF          |
//      +---------------------------> CLOSED <---- DRAINING <--DISC / EOF / bad request magic
//
// STARTTLS (options.tls): its ACK, then the TLS handshake on the same socket (AsyncTlsUpgrade),
// then OPTIONS again inside TLS with the plain-text state forgotten.  kRequire refuses every other
// option before it (EXPORT_NAME closes).
//
// Transmission runs on the server-connection core it shares with the DST exporter
// (netdriver/src/server_core.h): preallocated request contexts per connection,
// payloads read from the socket straight into pool buffers and replied from them (zero copy),
// device completions gathered on a list and sent by one posted drain through the batched
// Transmitter, no heap allocation per I/O in steady state.  A request that fails validation gets
// the spec's errno (its WRITE payload is drained); a framing error closes only that connection.
//
// Metadata contexts: `base:allocation` (from the export's AllocationMap, or "all data" without
// one) and any number of MetaContextProviders an export carries (e.g. `dst:dirty:<leg>`).
//
// Threading: public methods are thread-safe.  The server runs on the given io_context (one or
// more threads); device I/O completes on device threads and is handed back to the connection's
// strand.  Allocation and metadata queries (which may block in lseek) run on device threads or
// on the server's metadata worker thread, never on an io thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>

#include "dst/block_device.h"
#include "dst/net/export_access.h"
#include "dst/net/nbd_format.h"
#include "dst/net/server_limits.h"
#include "dst/net/server_stats.h"
#include "dst/net/transport.h"
#include "dst/status.h"

namespace dst::net {

class TlsContext;  // tls.h

// NBD_OPT_STARTTLS (docs/nbd.md "TLS").  kRequire is the spec's FORCEDTLS: before STARTTLS every
// option but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD and EXPORT_NAME closes, so nothing,
// not even the export list, is served in the clear.  kAllow also serves plain-text clients.
enum class NbdTls { kOff, kAllow, kRequire };

// Receives the extents of a metadata query in order, starting at the queried offset.  Return
// false to stop early (the receiver is full).  Lengths must be > 0.
class ExtentSink {
 public:
  virtual bool Add(std::uint64_t length, std::uint32_t flags) = 0;

 protected:
  ~ExtentSink() = default;
};

// Allocation status of a backing store in base:allocation terms (nbd::kStateHole/kStateZero).
// Query may block (it runs on a device thread or the server's metadata worker); it must be
// thread-safe and must not allocate in steady state.
class AllocationMap {
 public:
  virtual ~AllocationMap() = default;
  virtual Status Query(std::uint64_t offset, std::uint64_t length, ExtentSink& sink) = 0;
};

// base:allocation of a regular file via lseek(SEEK_DATA/SEEK_HOLE) on its own descriptor.
// Holes are reported as HOLE|ZERO.  For block devices or filesystems without SEEK_DATA the
// whole range is data.
class FileAllocationMap : public AllocationMap {
 public:
  static Result<std::shared_ptr<FileAllocationMap>> Open(const std::string& path);
  ~FileAllocationMap() override;
  Status Query(std::uint64_t offset, std::uint64_t length, ExtentSink& sink) override;

 private:
  explicit FileAllocationMap(int fd) : fd_(fd) {}
  int fd_;
};

// True when zeroing a range of `path` can be done without writing data (fallocate hole punching
// works there), i.e. NBD_CMD_FLAG_FAST_ZERO requests may be honoured for a FileDevice on it.
bool FileSupportsFastZero(const std::string& path);

// An extra metadata context (issue 4 item 4 publishes `dst:dirty:<leg>` maps this way).
class MetaContextProvider {
 public:
  virtual ~MetaContextProvider() = default;
  // Full context name "namespace:leaf", e.g. "dst:dirty:leg0".  Constant for the provider's life.
  virtual std::string name() const = 0;
  // Same contract as AllocationMap::Query; the flag bits are the context's own.
  virtual Status Query(std::uint64_t offset, std::uint64_t length, ExtentSink& sink) = 0;
};

struct NbdServerOptions {
  std::string listen_address = "127.0.0.1";
  std::uint16_t port = nbd::kDefaultPort;  // 0: any free port (see NbdServer::port())
  bool batching = true;                    // batched Transmitter (false: one frame per sendmsg)
  // Largest READ/WRITE payload, advertised in NBD_INFO_BLOCK_SIZE.  Capped at 32 MiB.  Clients
  // that never ask for block sizes (EXPORT_NAME) and send more get EOVERFLOW/EINVAL.
  std::uint32_t max_payload = 4u << 20;
  std::uint32_t preferred_block = 4096;
  std::uint32_t max_inflight_per_connection = 128;
  std::size_t buffer_count = 64;  // shared pool of max_payload-sized buffers
  // Structured READ replies only look for holes in reads at least this long (smaller reads are
  // cheaper to send than to map).  Holes are all-zero 4 KiB blocks found by scanning the data
  // just read (cheaper than SEEK_HOLE, and works for every backend).  0 disables.
  std::uint32_t sparse_read_min = 64u << 10;
  // A connection that makes no progress for this long while the server waits on it (handshake
  // not finished, a WRITE payload that stops arriving, replies the client does not read) is
  // closed.  An announced WRITE payload must arrive whole within it.  Idle connections in
  // transmission are not affected (limits.idle_timeout is for them).  0 disables.
  std::chrono::milliseconds stall_timeout{30000};
  // Handshake deadline, idle cap, connection caps (server_limits.h).  No idle cap by default:
  // NBD has no keepalive, and the kernel's nbd-client and qemu keep a quiet connection for the
  // life of a mount (dst's own NBD client probes every second; it would not need this).
  ServerLimits limits{.idle_timeout = std::chrono::milliseconds(0)};
  // Handshake caps (docs/nbd.md §4).  Option data longer than max_option_length (at most 16 KiB)
  // is drained, up to 1 MiB, and refused with NBD_REP_ERR_TOO_BIG; longer still closes, as does
  // an EXPORT_NAME over it.  The max_options+1st option of a handshake closes.  A LIST or
  // SET_META_CONTEXT with more than max_meta_queries queries (at most 128) or a query longer
  // than max_meta_query_length bytes (at most 4096) is refused with NBD_REP_ERR_TOO_BIG.
  std::uint32_t max_option_length = 8192;
  std::uint32_t max_options = 128;
  std::uint32_t max_meta_queries = 32;
  std::uint32_t max_meta_query_length = 1024;
  // Accept from this listener instead of binding listen_address:port (the fuzz targets feed
  // in-memory transports).  port() is then 0.
  ListenerFactory listener;
  // STARTTLS: a server TlsContext (PSK or X.509) and the mode; without a context, kOff.  The
  // TLS handshake must finish within what is left of limits.handshake_timeout (and the
  // context's handshake_timeout).  Afterwards the connection's Transport::identity() is the
  // authenticated peer, counted against limits.max_connections_per_identity (over it, options
  // get NBD_REP_ERR_POLICY).
  std::shared_ptr<TlsContext> tls;
  NbdTls tls_mode = NbdTls::kRequire;
};

struct NbdExportSpec {
  std::string name;  // may be anything the spec allows (<= 4096 bytes, non-empty)
  std::shared_ptr<BlockDevice> device;
  bool read_only = false;
  // Who may use it (export_access.h; the identity is the transport's, set after STARTTLS):
  // others get NBD_REP_ERR_POLICY and do not see it in LIST; a read-only identity gets
  // NBD_FLAG_READ_ONLY.  Unset: everyone, read-write (dstd always sets a list).
  std::optional<AccessList> allow;
  std::string description;
  // Optional: base:allocation source (e.g. FileAllocationMap on the device's file).
  std::shared_ptr<AllocationMap> allocation;
  // Honour FAST_ZERO (zeroing is a metadata operation on this device).  Otherwise FAST_ZERO
  // requests fail at once with ENOTSUP, which the spec allows, and clients write zeroes instead.
  bool fast_zero = false;
  std::vector<std::shared_ptr<MetaContextProvider>> contexts;  // at most 8
};

struct NbdExportStatus {
  std::string name;
  std::string device;
  std::string description;
  std::uint64_t size = 0;
  bool read_only = false;
  int connections = 0;
};

struct NbdServerStats : ServerStats {
  std::uint64_t tls_handshakes = 0;  // STARTTLS upgrades that completed
};

class NbdServer {
 public:
  NbdServer(boost::asio::io_context& io, NbdServerOptions opts);
  ~NbdServer();
  NbdServer(const NbdServer&) = delete;
  NbdServer& operator=(const NbdServer&) = delete;

  Status Start();
  std::uint16_t port() const;

  // The first export added is the default export (NBD name "").
  Status AddExport(NbdExportSpec spec);           // kExists if the name is taken
  Status RemoveExport(const std::string& name);   // kBusy while clients use it
  // Replaces the access list of an export (nullopt: everyone); later handshakes see it.
  Status SetAccess(const std::string& name, std::optional<AccessList> allow);
  std::vector<NbdExportStatus> ListExports() const;
  NbdServerStats Stats() const;

  // Stops accepting, lets in-flight requests finish, closes every connection, flushes every
  // writable export whose device can flush, then calls done on an io thread.
  void Drain(std::function<void(Status)> done);

  class Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace dst::net
