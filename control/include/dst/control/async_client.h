// AsyncControlClient: a non-blocking client of dstd's control socket on a Boost.Asio executor
// (the GUI runs one on its own io thread and posts what it receives to its UI thread; control/
// never links Qt).  Protocol: dst/control/control_protocol.h, docs/control.md.
//
//   IDLE --Connect--> CONNECTING --ok--> OPEN --Close() / EOF / error / bad line--> CLOSED
//                         +--error--> CLOSED (the connect handler gets the error)
//
// In OPEN, Call() queues one request line (several may be in flight); each reply is matched by
// its id (dstd may answer out of order) and completes its handler exactly once.  A line with no
// "result"/"error" but a "type" is an event: after Subscribe() they go to the event handler in
// the order dstd sent them, and last_seq() remembers the newest "seq" so that a later
// Subscribe(last_seq()) on a new connection resumes without a gap (or gets a "gap" event).
// Calls keep working on a subscribed connection.  On CLOSED every pending reply handler
// completes with delivered = false, then the close handler runs once.
//
// Threading: every method may be called from any thread.  Handlers run on the client's strand,
// one at a time, never inside the call that registered them.  Keep the client in a shared_ptr
// (Create); it stays alive while an operation is pending.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <system_error>

#include <boost/asio/any_io_executor.hpp>
#include <nlohmann/json.hpp>

#include "dst/control/control_protocol.h"

namespace dst::control {

class AsyncControlClient {
 public:
  struct CallResult {
    bool delivered = false;  // false: the connection failed before the reply (see error)
    Reply reply;             // when delivered: the result or dstd's error
    std::string error;
  };
  using ConnectHandler = std::function<void(std::error_code ec)>;
  using ReplyHandler = std::function<void(CallResult r)>;
  using EventHandler = std::function<void(const nlohmann::json& event)>;
  using CloseHandler = std::function<void(const std::string& why)>;

  static std::shared_ptr<AsyncControlClient> Create(boost::asio::any_io_executor ex);
  ~AsyncControlClient();
  AsyncControlClient(const AsyncControlClient&) = delete;
  AsyncControlClient& operator=(const AsyncControlClient&) = delete;

  // Connects to the Unix socket at `path`.
  void Connect(std::string path, ConnectHandler done);
  // Sends `method` with `params`; `done` gets the reply with the same id.  Returns that id.
  std::uint64_t Call(std::string method, nlohmann::json params, ReplyHandler done);
  // `events` (since: resume after that seq).  `on_event` gets every event line from now on;
  // `done` gets the subscription's result (first_seq, last_seq, ...).
  void Subscribe(std::optional<std::uint64_t> since, EventHandler on_event, ReplyHandler done);
  // Runs once when the connection ends (not after a failed Connect).
  void OnClose(CloseHandler fn);
  // Closes the connection; pending calls complete with delivered = false.
  void Close();

  // The newest event "seq" received (0: none yet).  Thread-safe.
  std::uint64_t last_seq() const;

  class Impl;

 private:
  explicit AsyncControlClient(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace dst::control
