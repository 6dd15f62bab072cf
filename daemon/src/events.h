// EventLog: dstd's pushed events (docs/control.md "events").  The engine emits each state change
// as it happens; every event gets the next sequence number ("seq", 1, 2, ... per dstd run) and
// a wall-clock "ts", is kept in a bounded ring of recent events and is handed to every live
// subscriber at once.
//
// Subscription (the `events` method, `dstctl events --since N`):
//
//   Subscribe(since = N, sink)
//     |-- N == last seq, or N+1 still in the ring --> replay seq N+1 .. last ----> LIVE
//     |                                               (under the log's lock, so no event falls
//     |                                                between the replay and the live stream)
//     +-- N+1 dropped from the ring, or N > last seq (another dstd run)
//            --> one "gap" line (since, first_seq, last_seq, missed, reason), not subscribed:
//                the caller sends a fresh snapshot as of last_seq, then Subscribe(last_seq).
//   LIVE --sink returns false (connection gone) / Stop()--> dropped
//
// Threading: every method is thread-safe.  Emit is quick and never blocks on I/O: sinks must
// only queue the line (the control server posts it to the connection's strand), so Emit may be
// called under other locks (MirrorDevice's leg listener calls it under the array's lock).  Never
// call into the engine from a sink.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace dst::daemon {

class EventLog {
 public:
  // Receives one line (with its trailing '\n'); returns false once its reader is gone.
  using Sink = std::function<bool(const std::string& line)>;
  static constexpr std::size_t kDefaultCapacity = 4096;

  explicit EventLog(std::size_t capacity = kDefaultCapacity);

  // Stamps `ev` with the next "seq" and "ts" (unless it has one), keeps it, delivers it.
  // Returns its seq (0 after Stop()).
  std::uint64_t Emit(nlohmann::json ev);

  struct Subscribed {
    bool ok = false;       // replayed and subscribed; false: a gap line was sent (or sink gone)
    bool gap = false;      // events after `since` are no longer kept
    std::uint64_t first_seq = 0, last_seq = 0;  // the ring at that moment (0, 0: empty)
  };
  // See the diagram above.
  Subscribed Subscribe(std::uint64_t since, Sink sink);

  std::uint64_t last_seq() const;
  std::uint64_t first_seq() const;  // oldest kept (last_seq + 1 when empty)
  std::size_t subscribers() const;
  // Drops every subscriber; later Emit calls do nothing.
  void Stop();

  // Current wall clock as a unix timestamp with sub-second precision (the "ts" member).
  static double Now();

 private:
  struct Entry {
    std::uint64_t seq;
    std::string line;
  };
  std::uint64_t FirstSeqLocked() const { return ring_.empty() ? seq_ + 1 : ring_.front().seq; }

  const std::size_t capacity_;
  mutable std::mutex mu_;
  std::uint64_t seq_ = 0;        // GUARDED_BY(mu_) last assigned
  std::deque<Entry> ring_;       // GUARDED_BY(mu_) seq ascending, at most capacity_
  std::vector<Sink> sinks_;      // GUARDED_BY(mu_)
  bool stopped_ = false;         // GUARDED_BY(mu_)
};

// Rate limit for progress events: at most `per_second` per key (a leg, a verify run).
class ProgressGate {
 public:
  explicit ProgressGate(double per_second = 4.0) : min_gap_(1.0 / per_second) {}
  // True (and the key's clock restarted) if the key may emit now; `now` in seconds.
  bool Allow(const std::string& key, double now);
  void Forget(const std::string& key);

 private:
  double min_gap_;
  std::mutex mu_;
  std::map<std::string, double> last_;  // GUARDED_BY(mu_)
};

}  // namespace dst::daemon
