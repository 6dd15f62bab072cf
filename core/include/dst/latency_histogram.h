// LatencyHistogram: request latencies in fixed power-of-two buckets, for the Prometheus
// endpoint (issue 14 item 1: `_seconds` histograms with cumulative `le` buckets).
//
// Bucket i (0 <= i < kBuckets) counts latencies <= kFirstBoundNs << i: 16 us, 32 us, ... about
// 8.6 s; slower ones only reach the implicit +Inf bucket (count).  Observe() is two relaxed
// atomic adds and a bit scan: no lock, no allocation, callable from any I/O completion.
// Snapshot() is not atomic across buckets (a scrape may see an observation in `count` before
// its bucket); Prometheus tolerates that skew, and it is at most the requests in flight.
#pragma once

#include <atomic>
#include <bit>
#include <cstdint>

namespace dst {

class LatencyHistogram {
 public:
  static constexpr int kBuckets = 20;
  static constexpr std::uint64_t kFirstBoundNs = 16'000;  // 16 us

  // Upper bound of bucket i, in nanoseconds.
  static constexpr std::uint64_t BoundNs(int i) { return kFirstBoundNs << i; }

  // The first bucket whose bound is >= ns, or kBuckets (only +Inf).
  static constexpr int BucketOf(std::uint64_t ns) {
    if (ns <= kFirstBoundNs) return 0;
    // ceil(ns / kFirstBoundNs) rounded up to a power of two: its exponent is the bucket.
    const std::uint64_t q = (ns + kFirstBoundNs - 1) / kFirstBoundNs;
    const int b = static_cast<int>(std::bit_width(q - 1));
    return b < kBuckets ? b : kBuckets;
  }

  void Observe(std::uint64_t ns) {
    const int b = BucketOf(ns);
    if (b < kBuckets) buckets_[b].fetch_add(1, std::memory_order_relaxed);
    count_.fetch_add(1, std::memory_order_relaxed);
    sum_ns_.fetch_add(ns, std::memory_order_relaxed);
  }

  struct Snapshot {
    std::uint64_t buckets[kBuckets] = {};  // per bucket, not cumulative
    std::uint64_t count = 0;               // every observation (the +Inf bucket)
    std::uint64_t sum_ns = 0;
    // Cumulative count for bucket i (Prometheus `le` semantics).
    std::uint64_t Cumulative(int i) const {
      std::uint64_t c = 0;
      for (int j = 0; j <= i; ++j) c += buckets[j];
      return c;
    }
  };
  Snapshot Get() const {
    Snapshot s;
    s.count = count_.load(std::memory_order_relaxed);
    s.sum_ns = sum_ns_.load(std::memory_order_relaxed);
    for (int i = 0; i < kBuckets; ++i) s.buckets[i] = buckets_[i].load(std::memory_order_relaxed);
    return s;
  }

 private:
  std::atomic<std::uint64_t> buckets_[kBuckets] = {};
  std::atomic<std::uint64_t> count_{0};
  std::atomic<std::uint64_t> sum_ns_{0};
};

}  // namespace dst
