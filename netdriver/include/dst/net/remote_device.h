// RemoteDevice: a BlockDevice backed by an export on another dstd, over the DST protocol.
// The reconnecting machinery is the client core shared with NbdClientDevice (client_device.h);
// remote_device.cc holds only the DST handshake, request encoding and reply decoding.
//
// Pipelines up to queue_depth requests on one TCP connection; replies complete out of order.
// It heals itself:
//
//   CONNECTING --hello ok--> CONNECTED --keepalive timeout / socket error--> RECONNECTING
//       ^                                                                       |
//       +------------------------- backoff (min..max) -------------------------+
//   RECONNECTING --outage longer than io_timeout--> FAILING (requests end with EIO;
//                                                   reconnects go on, success -> CONNECTED)
//   handshake ok, connect check installed (not on the first connect) --> CHECKING: one READ
//       of the check range on the new connection, nothing else is sent; verify() OK -> queued
//       requests go out; error -> they end with EIO, rejected(), then new requests go out.
//
// * Dead or stopped peers are detected by PING keepalives (keepalive_timeout, default 5 s).
// * In-flight requests are kept until acknowledged and re-sent, in their original order, on
//   the new connection.  An outage shorter than io_timeout (default 60 s) is invisible to the
//   caller; after it, every waiting request fails with EIO and new ones fail at once.
// * Ordering (the core's one rule): a write never starts while an older overlapping write is
//   in flight or waiting, a flush is a barrier (it waits for the older writes, newer ones wait
//   for it), and the server fences a reconnecting session (docs/protocol.md §6.3), so an old
//   re-sent write can never land after a newer one (the original DST's defect D4).
// * IoRequest::scratch is never touched (callers keep their own data there).
// * The handshake runs again on every reconnect; a size change or a lost write permission
//   fails the device instead of writing to the wrong thing (defect D8).
// * Only a correct answer is progress: a reply whose length does not match its request breaks
//   the connection, does not end the outage (io_timeout keeps running) and does not reset the
//   reconnect backoff, so a lying peer costs EIO after io_timeout, not a reconnect storm.
//
// Threading: every method from any thread; the connection lives on the given io_context.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include <boost/asio/io_context.hpp>

#include "dst/block_device.h"
#include "dst/net/client_device.h"
#include "dst/status.h"

namespace dst::net {

struct RemoteOptions : ClientOptions {
  std::uint16_t port = 7400;
  std::string export_name;
  // Offer XXH3-64 payload digests (docs/protocol.md §4.1); used when the exporter accepts.
  bool checksum = false;
  // What Describe() and log lines call the peer; empty: dst://host:port/export.  Set when a
  // connector dials something else (eth://IFACE/MAC/EXPORT).
  std::string uri;
};

// Parses "dst://host[:port]/export" into opts (host, port, export_name).
Status ParseDstUri(const std::string& uri, RemoteOptions* opts);

struct RemoteStats : ClientStats {
  std::uint64_t digest_errors = 0;   // corrupted payloads detected and re-sent (§4.1)
  bool checksum = false;             // digests in use on the current connection
};

class RemoteDevice : public ClientDevice {
 public:
  // Connects and runs the handshake (blocking, bounded by connect_timeout).  Must not be
  // called on one of the io_context's threads.
  static Result<std::shared_ptr<RemoteDevice>> Connect(boost::asio::io_context& io,
                                                       const RemoteOptions& opts);
  RemoteStats Stats() const;

  class Protocol;

  // Use Connect().
  RemoteDevice(std::shared_ptr<ClientCore> core, const Protocol* proto)
      : ClientDevice(std::move(core)), proto_(proto) {}

 private:
  const Protocol* proto_;  // owned by the core
};

}  // namespace dst::net
