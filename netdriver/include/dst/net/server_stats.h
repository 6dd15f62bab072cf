// ServerStats: the counters every server (the DST exporter, the NBD server) reports from
// Stats(); they come from the one server-connection core, so they mean the same in both.
//
// Threading: a value (a snapshot).
#pragma once

#include <cstdint>

namespace dst::net {

struct ServerStats {
  std::uint64_t connections_total = 0;  // accepted since the start
  int connections_open = 0;
  std::uint64_t requests = 0;         // requests received (after the handshake)
  std::uint64_t errors_replied = 0;   // requests answered with a non-OK status
  std::uint64_t protocol_errors = 0;  // connections closed for framing or handshake violations
  // Resource caps (ServerLimits): connections closed at accept for a connection cap, and
  // connections closed for the handshake deadline, the idle cap or a stall.
  std::uint64_t connections_refused = 0;
  std::uint64_t connections_timed_out = 0;
  std::uint64_t frames_sent = 0;      // frames of the batched transmitter, closed connections too
  std::uint64_t send_calls = 0;       // system calls that sent them
  double frames_per_call = 0;         // frames_sent / send_calls (0 before any send)
};

}  // namespace dst::net
