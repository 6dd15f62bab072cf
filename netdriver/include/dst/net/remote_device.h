// RemoteDevice: a BlockDevice backed by an export on another dstd, over the DST protocol.
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
// * Ordering: a write never starts while an older overlapping write is in flight, and the
//   server fences a reconnecting session (docs/protocol.md §6.3), so an old re-sent write can
//   never land after a newer one (the original DST's defect D4).
// * The handshake runs again on every reconnect; a size change or a lost write permission
//   fails the device instead of writing to the wrong thing (defect D8).
// * Only a correct answer is progress: a reply whose length does not match its request breaks
//   the connection, does not end the outage (io_timeout keeps running) and does not reset the
//   reconnect backoff, so a lying peer costs EIO after io_timeout, not a reconnect storm.
//
// Threading: Submit() from any thread; the connection lives on the given io_context.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include <boost/asio/io_context.hpp>

#include "dst/block_device.h"
#include "dst/status.h"

namespace dst::net {

struct RemoteOptions {
  std::string host = "127.0.0.1";
  std::uint16_t port = 7400;
  std::string export_name;
  std::uint32_t queue_depth = 64;
  bool batching = true;
  std::chrono::milliseconds keepalive_interval{1000};
  std::chrono::milliseconds keepalive_timeout{5000};
  std::chrono::milliseconds io_timeout{60000};
  std::chrono::milliseconds connect_timeout{5000};
  std::chrono::milliseconds reconnect_min{100};
  std::chrono::milliseconds reconnect_max{2000};
  // Offer XXH3-64 payload digests (docs/protocol.md §4.1); used when the exporter accepts.
  bool checksum = false;
};

// Parses "dst://host[:port]/export" into opts (host, port, export_name).
Status ParseDstUri(const std::string& uri, RemoteOptions* opts);

struct RemoteStats {
  std::string state;  // "connected", "reconnecting", "failing", "closed" ("connecting" only inside Connect())
  std::uint64_t reconnects = 0;
  std::uint64_t resent = 0;       // requests re-sent after a reconnect
  std::uint64_t timeouts = 0;     // requests failed with EIO after io_timeout
  std::uint64_t bad_replies = 0;  // replies that broke the protocol (e.g. wrong length)
  std::uint64_t check_failures = 0;  // connections whose connect check failed
  std::uint64_t digest_errors = 0;   // corrupted payloads detected and re-sent (§4.1)
  bool checksum = false;             // digests in use on the current connection
  std::uint32_t inflight = 0;
  std::uint64_t requests = 0;
  std::uint64_t frames_sent = 0;
  std::uint64_t send_calls = 0;
  double frames_per_call = 0;
};

class RemoteDevice : public BlockDevice {
 public:
  // Connects and runs the handshake (blocking, bounded by connect_timeout).  Must not be
  // called on one of the io_context's threads.
  static Result<std::shared_ptr<RemoteDevice>> Connect(boost::asio::io_context& io,
                                                       const RemoteOptions& opts);
  ~RemoteDevice() override;

  DeviceInfo Info() const override;
  void Submit(IoRequest* req) override;
  std::string Describe() const override;  // "dst://host:port/export"
  RemoteStats Stats() const;
  // See block_device.h.  The callbacks run on the connection strand with an internal mutex
  // held; SetConnectCheck() takes that mutex, so when it returns no old callback is running and
  // none runs again.  Hence: never call it while holding a lock that verify()/rejected() take
  // (calling it from inside a callback, on the strand, is fine).
  bool SetConnectCheck(const ConnectCheck& check) override;
  DeviceHealth Health() const override;
  // Fails every pending request with EIO and stops reconnecting.
  void Close();

  class Impl;
 private:
  explicit RemoteDevice(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace dst::net
