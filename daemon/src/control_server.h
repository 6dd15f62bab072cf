// ControlServer: dstd's Unix-socket JSON-lines server (protocol: dst/control/control_protocol.h).
//
// Per connection:  READING --line--> parse --ok--> handler(req, reply) ... reply(line) -> WRITING
//                     |                 +--bad--> error reply (connection stays up)
//                     +--line > kMaxLineBytes--> too_large reply, then CLOSED
// The handler runs on an io thread and must not block; it may call `reply` later, from any
// thread (slow methods answer from a worker thread).  Replies are serialised on the
// connection's strand.  A client that disconnects early just loses its replies.
//
// Local hardening (docs/security.md):
// * The socket is mode 0660, owner root, group `group` (root's group when it does not exist).
// * Each connection's peer credentials (SO_PEERCRED, SO_PEERGROUPS) decide what it may call:
//   read-only methods (control::IsReadOnlyMethod) for anyone who can connect; the others only
//   for uid 0, dstd's own uid, or members of the group.  Others get `permission_denied`.
// * Requests nested deeper than control::kMaxJsonDepth are refused before parsing.
// * Back-pressure: while a connection has more than kPauseBytes of unsent replies or
//   kPauseRequests unanswered requests, its input is not read.  Past kDropBytes of unsent
//   lines (an events subscriber that does not keep up) the queue is dropped, a `too_slow` error
//   is queued as the last line and the connection closes after it.
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>

#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>

#include "dst/control/control_protocol.h"
#include "dst/status.h"

namespace dst::daemon {

class ControlServer {
 public:
  // Returns false once the connection is closed (event subscribers use it to unsubscribe).
  // May be called more than once per request: `events` streams lines after its reply.
  using ReplyFn = std::function<bool(std::string line)>;
  using Handler = std::function<void(control::Request req, ReplyFn reply)>;

  static constexpr std::size_t kPauseBytes = 1u << 20;
  static constexpr int kPauseRequests = 64;
  static constexpr std::size_t kDropBytes = 16u << 20;

  // `group`: the group whose members may change state ("" = root's group only).
  ControlServer(boost::asio::io_context& io, std::string path, Handler handler,
                std::string group = "dst");
  ~ControlServer();

  // Binds (replacing a stale socket file; refusing if another process answers on it) and
  // starts accepting.  Called before the io threads run or from any thread.
  Status Start();
  // Closes the listener and every connection, removes the socket file.  Thread-safe, idempotent;
  // returns once the io thread has done it (must not be called on an io thread).
  void Stop();

  class Session;

 private:
  void Accept();

  boost::asio::io_context& io_;
  std::string path_;
  Handler handler_;
  std::string group_;
  unsigned group_gid_ = 0;  // resolved by Start
  boost::asio::local::stream_protocol::acceptor acceptor_;
  std::mutex mu_;
  std::set<std::shared_ptr<Session>> sessions_;  // GUARDED_BY(mu_)
  bool stopped_ = false;                         // GUARDED_BY(mu_)
};

}  // namespace dst::daemon
