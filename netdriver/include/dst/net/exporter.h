// Exporter: the DST protocol server.  Serves named exports (any BlockDevice: a file, a disk,
// later an array) to many clients at once over TCP, with the batched transmitter.
//
// Per connection:   ACCEPTED --HELLO ok--> SERVING --DISCONNECT / EOF / framing error--> DRAINING
//                       |                                                               |
//                       +--bad hello / unknown export (error reply)-----> CLOSED <------+
// A request is validated (codec CheckRequest) before any buffer is taken; a bad one gets an
// error reply and the connection stays up; a framing error gets a logged close.  Other
// connections never notice.
//
// Access (export_access.h): the HELLO is checked against the export's access list with the
// transport's identity; an authenticated peer is counted under its identity (per-identity cap).
//
// Session fence (docs/protocol.md §6.3): a HELLO carrying the session id of a live connection
// to the same export by the same identity stops reading on the old connection and waits for its in-flight requests to finish before
// the new one is answered, so a stale write can never land after a newer one.
//
// Accept loop, pools, backpressure, stall sweep, drain and counters are the server-connection
// core it shares with the NBD server (netdriver/src/server_core.h).
//
// Threading: the Exporter runs on the io_context given to it (one or more threads).  Public
// methods are thread-safe.  Device I/O completes on device threads and is handed back to the
// connection's io thread.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>

#include "dst/block_device.h"
#include "dst/net/export_access.h"
#include "dst/net/server_limits.h"
#include "dst/net/server_stats.h"
#include "dst/net/transmitter.h"
#include "dst/status.h"

namespace dst::net {

struct ExporterOptions {
  std::string listen_address = "127.0.0.1";
  std::uint16_t port = kDefaultPort;  // 0: pick a free port (see Exporter::port())
  bool batching = true;
  std::uint32_t max_payload = kDefaultMaxPayload;
  std::uint32_t max_inflight_per_connection = 128;
  std::size_t buffer_count = 256;  // shared pool of max_payload-sized buffers
  // A connection that makes no progress for this long while the server waits on it (a WRITE
  // payload or HELLO that stops arriving, replies the client does not read) is closed, so it
  // cannot pin pool buffers forever.  An announced WRITE payload must arrive whole within it.
  // Idle connections are not affected (limits.idle_timeout is for them).  0 disables.
  std::chrono::milliseconds stall_timeout{30000};
  // Handshake deadline, idle cap, connection caps (server_limits.h).
  ServerLimits limits;
  // Accept from this listener instead of binding listen_address:port (the fuzz targets feed
  // in-memory transports).  port() is then 0.
  ListenerFactory listener;
};

struct ExportSpec {
  std::string name;
  std::shared_ptr<BlockDevice> device;
  bool read_only = false;
  // Who may connect (export_access.h): a HELLO from an identity the list does not admit gets
  // EACCES, a read-only one gets the export read-only.  Unset: everyone, read-write (an
  // in-process server trusts its caller; dstd always sets a list and defaults to an empty one).
  std::optional<AccessList> allow;
};

struct ExportStatus {
  std::string name;
  std::string device;  // Describe()
  std::uint64_t size = 0;
  bool read_only = false;
  int connections = 0;
  // Per export, over its open and already closed connections (HELLO replies included).
  std::uint64_t requests = 0;     // requests received (after the handshake)
  std::uint64_t digest_errors = 0;  // WRITE payloads refused for a digest mismatch (§4.1)
  std::uint64_t frames_sent = 0;  // frames of the batched transmitter
  std::uint64_t send_calls = 0;   // sendmsg calls that wrote something
  double frames_per_call = 0;     // frames_sent / send_calls (0 before any send)
};

struct ExporterStats : ServerStats {
  std::uint64_t digest_errors = 0;  // WRITE payloads refused for a digest mismatch
};

class Exporter {
 public:
  Exporter(boost::asio::io_context& io, ExporterOptions opts);
  ~Exporter();

  Status Start();                 // binds and starts accepting
  std::uint16_t port() const;     // the bound port

  Status AddExport(ExportSpec spec);       // kExists if the name is taken
  Status RemoveExport(const std::string& name);  // kBusy while clients are connected
  // Replaces the access list of an export (nullopt: everyone).  Connections already past their
  // HELLO keep the access they had; kNotFound for an unknown name.
  Status SetAccess(const std::string& name, std::optional<AccessList> allow);
  std::vector<ExportStatus> ListExports() const;
  ExporterStats Stats() const;

  // Stops accepting, lets in-flight requests finish, closes all connections, flushes every
  // writable export whose device can flush, then calls done (on an io thread).  Used for SIGTERM.
  void Drain(std::function<void(Status)> done);

  class Impl;
 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace dst::net
