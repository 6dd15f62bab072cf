// MetricsServer: the HTTP endpoint of `[daemon] metrics_listen` (issue 14 item 1), serving
// `GET /metrics` in the Prometheus text format.
//
// It runs its own io_context on its own thread, so rendering (which takes the engine's locks
// to read its counters) never runs on, or waits for, a data-path event loop.  Per connection:
//
//   ACCEPTED --request head within head_timeout--> ANSWERED (response written) --> CLOSED
//       |--head over max_head bytes--> 431, CLOSED
//       +--deadline / EOF / error--> CLOSED
//
// One request per connection (Connection: close), at most max_connections at once (more are
// closed at accept), GET and HEAD only.  Bad input gets a status line and a close, never a
// crash or a hang.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "dst/status.h"

namespace dst::daemon {

struct MetricsServerOptions {
  std::string host = "127.0.0.1";
  std::uint16_t port = 0;  // 0: any free port (tests)
  std::chrono::milliseconds head_timeout{5000};
  std::size_t max_head = 8192;
  int max_connections = 16;
};

class MetricsServer {
 public:
  // `render` returns the whole exposition text; it runs on the server's thread.
  using Render = std::function<std::string()>;

  static Result<std::unique_ptr<MetricsServer>> Start(const MetricsServerOptions& o, Render render);
  ~MetricsServer();  // stops the thread; open connections are closed

  std::uint16_t port() const;
  std::uint64_t scrapes() const;  // /metrics responses sent

  class Impl;

 private:
  explicit MetricsServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dst::daemon
