// Helpers for the fairness tests (server_core_test, exporter_test, nbd_server_test): a reader
// far below any min_drain_rate, and a well-behaved client's worst request latency meanwhile.
#pragma once

#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>

namespace dst::test {

// The fairness tests' server options (ServerCoreOptions, ExporterOptions, NbdServerOptions): a
// pool of 16 buffers, the stall check out of the way, min_drain_rate over a 0.5 s window.
template <typename O>
O DrainTestOptions(std::uint64_t min_drain_rate) {
  O o;
  o.buffer_count = 16;
  o.stall_timeout = std::chrono::milliseconds(60000);
  o.limits.min_drain_rate = min_drain_rate;
  o.limits.drain_window = std::chrono::milliseconds(500);
  return o;
}

// Reads one byte every 100 ms from fd until destroyed or the server closes it.
class Trickle {
 public:
  explicit Trickle(int fd)
      : thread_([this, fd] {
          char b;
          while (!stop_ && ::recv(fd, &b, 1, MSG_DONTWAIT) != 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }) {}
  ~Trickle() {
    stop_ = true;
    thread_.join();
  }

 private:
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// Calls io() (one request, true when it succeeded) again and again for `ms` milliseconds and
// returns the longest call in ms, or -1 when one failed.  Before each call, `when(elapsed_ms)`:
// a test records there when something happened (e.g. the eviction of a slow reader).
template <typename Io, typename When>
long WorstLatency(int ms, Io io, When when) {
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  long worst = 0;
  for (auto now = t0; now - t0 < std::chrono::milliseconds(ms); now = Clock::now()) {
    when(std::chrono::duration_cast<std::chrono::milliseconds>(now - t0).count());
    if (!io()) return -1;
    worst = std::max<long>(worst, std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - now).count());
  }
  return worst;
}

}  // namespace dst::test
