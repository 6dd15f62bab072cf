#include "dst/token_bucket.h"

namespace dst {

TokenBucket::TokenBucket(std::uint64_t rate, std::uint64_t burst) {
  SetRate(rate, burst);
  tokens_ = static_cast<double>(burst_);
  last_ = Clock::now();
}

void TokenBucket::SetRate(std::uint64_t rate, std::uint64_t burst) {
  std::lock_guard<std::mutex> l(mu_);
  RefillLocked(Clock::now());
  rate_ = rate;
  if (burst == 0) burst = rate / 10 > (64u << 10) ? rate / 10 : (64u << 10);
  burst_ = burst;
  if (tokens_ > static_cast<double>(burst_)) tokens_ = static_cast<double>(burst_);
}

std::uint64_t TokenBucket::rate() const {
  std::lock_guard<std::mutex> l(mu_);
  return rate_;
}

std::uint64_t TokenBucket::burst() const {
  std::lock_guard<std::mutex> l(mu_);
  return burst_;
}

void TokenBucket::RefillLocked(Clock::time_point now) {
  if (last_ == Clock::time_point{}) last_ = now;
  if (now > last_ && rate_ > 0) {
    double secs = std::chrono::duration<double>(now - last_).count();
    tokens_ += secs * static_cast<double>(rate_);
    if (tokens_ > static_cast<double>(burst_)) tokens_ = static_cast<double>(burst_);
  }
  if (now > last_) last_ = now;
}

std::chrono::nanoseconds TokenBucket::Take(std::uint64_t n) { return Take(n, Clock::now()); }

std::chrono::nanoseconds TokenBucket::Take(std::uint64_t n, Clock::time_point now) {
  std::lock_guard<std::mutex> l(mu_);
  if (rate_ == 0) return std::chrono::nanoseconds(0);
  RefillLocked(now);
  tokens_ -= static_cast<double>(n);
  if (tokens_ >= 0) return std::chrono::nanoseconds(0);
  double secs = -tokens_ / static_cast<double>(rate_);
  return std::chrono::nanoseconds(static_cast<std::int64_t>(secs * 1e9));
}

}  // namespace dst
