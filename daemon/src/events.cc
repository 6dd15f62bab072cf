#include "events.h"

#include <algorithm>
#include <chrono>

namespace dst::daemon {

using nlohmann::json;

EventLog::EventLog(std::size_t capacity) : capacity_(std::max<std::size_t>(capacity, 1)) {}

double EventLog::Now() {
  using namespace std::chrono;
  return double(duration_cast<microseconds>(system_clock::now().time_since_epoch()).count()) / 1e6;
}

std::uint64_t EventLog::Emit(json ev) {
  if (!ev.contains("ts")) ev["ts"] = Now();
  std::lock_guard<std::mutex> l(mu_);
  if (stopped_) return 0;
  const std::uint64_t seq = ++seq_;
  ev["seq"] = seq;
  std::string line = ev.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
  sinks_.erase(std::remove_if(sinks_.begin(), sinks_.end(), [&](Sink& s) { return !s(line); }),
               sinks_.end());
  if (ring_.size() == capacity_) ring_.pop_front();
  ring_.push_back(Entry{seq, std::move(line)});
  return seq;
}

EventLog::Subscribed EventLog::Subscribe(std::uint64_t since, Sink sink) {
  std::lock_guard<std::mutex> l(mu_);
  Subscribed r;
  r.first_seq = FirstSeqLocked();
  r.last_seq = seq_;
  if (stopped_) return r;
  if (since > seq_ || since + 1 < r.first_seq) {
    // Never a silent gap: say what is missing; the caller sends a fresh snapshot.
    r.gap = true;
    json gap{{"type", "gap"},
             {"ts", Now()},
             {"since", since},
             {"first_seq", r.first_seq},
             {"last_seq", seq_},
             {"missed", since > seq_ ? json() : json(r.first_seq - since - 1)},
             {"reason", since > seq_ ? "restarted" : "evicted"}};
    sink(gap.dump() + "\n");
    return r;
  }
  // Entries with seq > since: the ring is contiguous, so index = seq - first.
  for (std::size_t i = std::size_t(since + 1 - r.first_seq); i < ring_.size(); ++i)
    if (!sink(ring_[i].line)) return r;
  sinks_.push_back(std::move(sink));
  r.ok = true;
  return r;
}

std::uint64_t EventLog::last_seq() const {
  std::lock_guard<std::mutex> l(mu_);
  return seq_;
}

std::uint64_t EventLog::first_seq() const {
  std::lock_guard<std::mutex> l(mu_);
  return FirstSeqLocked();
}

std::size_t EventLog::subscribers() const {
  std::lock_guard<std::mutex> l(mu_);
  return sinks_.size();
}

void EventLog::Stop() {
  std::vector<Sink> drop;
  {
    std::lock_guard<std::mutex> l(mu_);
    stopped_ = true;
    drop.swap(sinks_);
  }
}  // sinks destroyed outside the lock

bool ProgressGate::Allow(const std::string& key, double now) {
  std::lock_guard<std::mutex> l(mu_);
  auto [it, fresh] = last_.emplace(key, now);
  if (fresh) return true;
  if (now - it->second < min_gap_) return false;
  it->second = now;
  return true;
}

void ProgressGate::Forget(const std::string& key) {
  std::lock_guard<std::mutex> l(mu_);
  last_.erase(key);
}

}  // namespace dst::daemon
