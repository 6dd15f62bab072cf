// ControlServer: dstd's Unix-socket JSON-lines server (protocol: dst/control/control_protocol.h).
//
// Per connection:  READING --line--> parse --ok--> handler(req, reply) ... reply(line) -> WRITING
//                     |                 +--bad--> error reply (connection stays up)
//                     +--line > kMaxLineBytes--> too_large reply, then CLOSED
// The handler runs on an io thread and must not block; it may call `reply` later, from any
// thread (slow methods answer from a worker thread).  Replies are serialised on the
// connection's strand.  A client that disconnects early just loses its replies.
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

  ControlServer(boost::asio::io_context& io, std::string path, Handler handler);
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
  boost::asio::local::stream_protocol::acceptor acceptor_;
  std::mutex mu_;
  std::set<std::shared_ptr<Session>> sessions_;  // GUARDED_BY(mu_)
  bool stopped_ = false;                         // GUARDED_BY(mu_)
};

}  // namespace dst::daemon
