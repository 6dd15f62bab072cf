// ControlClient: a blocking client of dstd's control socket (dstctl, tests).
//
// One request at a time: Call() writes a line and reads lines until the reply with the same id.
#pragma once

#include <string>

#include "dst/control/control_protocol.h"

namespace dst::control {

class ControlClient {
 public:
  ControlClient() = default;
  ~ControlClient();
  ControlClient(const ControlClient&) = delete;
  ControlClient& operator=(const ControlClient&) = delete;

  // Connects to the Unix socket.  On failure returns the errno value (ENOENT, ECONNREFUSED...).
  int Connect(const std::string& path);
  // Sends a request and waits up to timeout_ms for its reply.  false + *why on a transport or
  // framing failure (the daemon went away, sent garbage, or timed out).
  bool Call(const std::string& method, const nlohmann::json& params, Reply* reply,
            std::string* why, int timeout_ms = 120000);
  // Reads the next line the daemon sends (after an `events` subscription).  timeout_ms < 0
  // waits forever.  false + *why when the connection ends or breaks.
  bool ReadLine(std::string* line, std::string* why, int timeout_ms = -1);
  void Close();

 private:
  int fd_ = -1;
  std::uint64_t next_id_ = 1;
  LineSplitter splitter_;
};

}  // namespace dst::control
