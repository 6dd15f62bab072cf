// NbdClientDevice: a BlockDevice backed by an NBD export (nbdkit, qemu-nbd, nbd-server, a dst
// NBD server...), so any NBD export can be a leaf of a dst array.
//
// The same reconnecting client core as RemoteDevice (client_device.h): a fixed slot table
// (cookie = generation << 32 | slot), Submit() wakes the connection strand through an eventfd,
// a batched Transmitter, keepalive probes, reconnect with backoff, re-send of unacknowledged
// requests in submission order, io_timeout -> EIO, one write-ordering rule (overlapping writes
// in submission order, a flush is a barrier).  nbd_client_device.cc holds only the NBD
// handshake, request encoding and reply decoding.
//
//   CONNECTING --handshake ok--> CONNECTED --probe silence / socket error / ESHUTDOWN--> RECONNECTING
//       ^                                                                                  |
//       +------------------------------ backoff (min..max) -------------------------------+
//   RECONNECTING --outage longer than io_timeout--> FAILING (requests end with EIO;
//                                                   reconnects go on, success -> CONNECTED)
//   any --Close()--> CLOSED (NBD_CMD_DISC sent if connected; pending requests end with EIO)
//
// Handshake (one attempt; a coroutine task on the client's strand, reading and writing through
// the connection's Transport, bounded by connect_timeout; nothing blocks an event-loop thread):
//
//   greeting (NBDMAGIC IHAVEOPT flags) -> client flags (FIXED_NEWSTYLE [+NO_ZEROES])
//     [nbds://: -> OPT_STARTTLS --ACK--> TLS handshake; anything else fails the attempt]
//     -> OPT_STRUCTURED_REPLY --ACK--> structured replies | --ERR_*--> simple replies
//     -> OPT_GO(name, [INFO_BLOCK_SIZE]) --INFO*, ACK--> transmission
//                                         --ERR_UNSUP--> OPT_EXPORT_NAME -> size+flags -> transmission
//   (a server without FIXED_NEWSTYLE goes straight to OPT_EXPORT_NAME)
//
// Structured READ replies must fill every byte of the read exactly once (OFFSET_DATA and
// OFFSET_HOLE chunks inside the request, no overlaps); otherwise the read fails with EIO and
// the connection is replaced (docs/nbd.md, "Checking structured replies").
//
// Keepalive: NBD has no ping.  When the connection has been silent for keepalive_interval the
// client sends a one-block NBD_CMD_READ at offset 0 into an internal buffer (every server
// implements READ, it is side-effect free, needs no capability flag and costs one block); if
// nothing at all arrives for keepalive_timeout while anything is outstanding, the peer counts
// as dead and the connection is replaced.
//
// Ordering guarantee without a session fence: NBD servers cannot fence an old connection, so
// after a reconnect a write that was still queued inside a *live but hung* server on the old
// connection could in principle execute after a newer overlapping write sent on the new
// connection.  When the old server process died (crash, kill -9, restart) or the old TCP
// connection was reset this cannot happen, and the client itself never has two overlapping
// writes in flight.  See docs/nbd.md, "NBD client leaf".
//
// IoRequest fields: the device uses `link` while it holds a request but never touches `scratch`
// (callers such as MirrorDevice keep their own data there).  FUA is sent only when the server
// advertises SEND_FUA (DeviceInfo::can_fua tells the caller); a flush on a server without
// SEND_FLUSH fails with EOPNOTSUPP.
//
// Threading: Submit() from any thread; the connection lives on the given io_context.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include <boost/asio/io_context.hpp>

#include "dst/block_device.h"
#include "dst/net/client_device.h"
#include "dst/status.h"

namespace dst::net {

class TlsContext;  // tls.h

struct NbdClientOptions : ClientOptions {
  std::uint16_t port = 10809;
  std::string unix_socket;  // non-empty: connect to this Unix socket instead of host:port
  std::string export_name;  // may be empty (the server's default export)
  bool try_structured_replies = true;  // false: never ask (tests; old-client behaviour)
  bool try_opt_go = true;              // false: use OPT_EXPORT_NAME directly (tests)
  // nbds://: STARTTLS right after the greeting, with this client context (PSK or X.509; the
  // server name checked is `host`); a server that refuses it is not used.  Required when tls.
  bool tls = false;
  std::shared_ptr<TlsContext> tls_context;
};

struct NbdClientStats : ClientStats {
  bool structured_replies = false;
  std::uint64_t probes = 0;  // keepalive reads sent
};

// Parses "nbd://host[:port][/name]" (default port 10809, name may be empty, %XX decoded),
// "nbds://..." (the same with tls = true; the caller supplies tls_context) and
// "nbd+unix:///name?socket=/path" into opts.  nbds+unix:// is refused.
Status ParseNbdUri(const std::string& uri, NbdClientOptions* opts);

class NbdClientDevice : public ClientDevice {
 public:
  class Protocol;  // nbd_client_device.cc

  // Connects and negotiates (blocking, bounded by connect_timeout).  Must not be called on one
  // of the io_context's threads.  Close() sends NBD_CMD_DISC first when connected.
  static Result<std::shared_ptr<NbdClientDevice>> Connect(boost::asio::io_context& io,
                                                          const NbdClientOptions& opts);
  NbdClientStats Stats() const;

  // Use Connect().
  NbdClientDevice(std::shared_ptr<ClientCore> core, const Protocol* proto)
      : ClientDevice(std::move(core)), proto_(proto) {}

 private:
  const Protocol* proto_;  // owned by the core
};

}  // namespace dst::net
