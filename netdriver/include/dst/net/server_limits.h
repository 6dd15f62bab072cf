// ServerLimits: the resource caps every server (the DST exporter, the NBD server) applies to its
// connections, enforced by the one server-connection core.  What each limit defends:
// docs/security.md "Bounded resources".
//
// Threading: a value, read once by the server's constructor.
#pragma once

#include <chrono>
#include <cstdint>

namespace dst::net {

struct ServerLimits {
  // A connection that has not finished the protocol handshake this long after it was accepted is
  // closed, however slowly its bytes keep trickling in.  0: no deadline.
  std::chrono::milliseconds handshake_timeout{10000};
  // A serving connection that has sent no request for this long and has none in flight is
  // closed.  DST keepalives (PING) are requests.  0: never.
  std::chrono::milliseconds idle_timeout{600000};
  // Connections open at once, from all peers and from one peer address.  A new connection over
  // either cap is closed at once, before anything is allocated for it, and logged once per
  // address and interval.  0: no cap.
  std::uint32_t max_connections = 256;
  std::uint32_t max_connections_per_address = 32;
  // Connections of one authenticated identity; counted where a protocol learns the identity
  // (ServerCore::ClaimIdentity, for TLS).  0: no cap.
  std::uint32_t max_connections_per_identity = 32;
  // While a connection's replies wait on it (its socket buffer is full), it must read at least
  // min_drain_rate bytes per second, measured over each drain_window of waiting; a slower reader
  // is closed and its pool buffers freed.  A large reply read at 1 byte/s is not progress.
  // 0: no check.
  std::uint64_t min_drain_rate = 256u << 10;
  std::chrono::milliseconds drain_window{10000};

  // No deadlines and no caps (in-memory fuzz harnesses: no timers).
  static ServerLimits None() {
    ServerLimits l;
    l.handshake_timeout = l.idle_timeout = std::chrono::milliseconds(0);
    l.max_connections = l.max_connections_per_address = l.max_connections_per_identity = 0;
    l.min_drain_rate = 0;
    return l;
  }
};

}  // namespace dst::net
