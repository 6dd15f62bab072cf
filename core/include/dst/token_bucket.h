// TokenBucket: a byte-rate limiter whose rate can change while it is in use.
//
// Tokens accrue at rate() bytes/s up to burst() bytes.  Take(n) never blocks: it takes n tokens
// (the balance may go negative, so one large request is not starved) and returns how long the
// caller should wait before its next Take.  Rate 0 means unlimited.
//
// Threading: all methods are thread-safe.  The clock is injectable for tests.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>

namespace dst {

class TokenBucket {
 public:
  using Clock = std::chrono::steady_clock;
  explicit TokenBucket(std::uint64_t rate_bytes_per_s = 0, std::uint64_t burst_bytes = 0);

  // Changes the rate (and burst; 0 -> rate/10, at least 64 KiB) live.
  void SetRate(std::uint64_t rate_bytes_per_s, std::uint64_t burst_bytes = 0);
  std::uint64_t rate() const;
  std::uint64_t burst() const;

  // Takes n tokens; returns the delay until the balance is non-negative again (0 if it is).
  std::chrono::nanoseconds Take(std::uint64_t n);
  std::chrono::nanoseconds Take(std::uint64_t n, Clock::time_point now);

 private:
  void RefillLocked(Clock::time_point now);
  mutable std::mutex mu_;
  std::uint64_t rate_ = 0;
  std::uint64_t burst_ = 0;
  double tokens_ = 0;
  Clock::time_point last_{};
};

}  // namespace dst
