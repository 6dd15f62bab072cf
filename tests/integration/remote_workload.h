// A verified random workload for the RemoteDevice integration tests.
//
// Keeps `depth` asynchronous requests in flight against a BlockDevice: random offsets, sizes
// 4 KiB..1 MiB (log-uniform), 60 % writes.  In-flight requests never overlap each other, so
// every completed read can be compared exactly with the reference image the workload keeps.
// A write that fails leaves its blocks "unknown" (it may or may not have landed); they are
// skipped by verification until written again.
//
// Completions only queue the slot; the submitting thread does the copying and comparing, so
// the device's io threads stay fast.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "dst/block_device.h"

namespace dst::test {

class Workload {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr std::uint32_t kBlock = 4096;
  static constexpr std::uint32_t kMaxIo = 1u << 20;

  Workload(BlockDevice& dev, std::uint64_t size, std::uint32_t depth, std::uint64_t seed)
      : dev_(dev), size_(size), depth_(depth), rng_(seed), ref_(size, 0), known_(size / kBlock, 1),
        slots_(depth) {
    for (auto& s : slots_) {
      s.buf.resize(kMaxIo);
      s.req.ctx = this;
    }
  }

  struct Totals {
    std::uint64_t ops = 0, bytes = 0, reads = 0, writes = 0;
    std::uint64_t errors = 0, mismatches = 0;
    int first_errno = 0;
    std::string first_mismatch;
    // Latest completion time of a failed request, and the largest request latency seen.
    Clock::time_point last_error_at{};
    Clock::time_point first_error_at{};
    std::chrono::milliseconds max_latency{0};
  };

  // Runs until `total_bytes` were submitted, `stop` is set, or `deadline` passes; then waits for
  // every outstanding request (bounded by drain_timeout).  Returns false if requests were still
  // outstanding after that (a hang).
  bool Run(std::uint64_t total_bytes, const std::atomic<bool>* stop, Clock::time_point deadline,
           std::chrono::milliseconds drain_timeout = std::chrono::milliseconds(30000)) {
    std::uint64_t submitted = 0;
    std::vector<int> ready;
    ready.reserve(depth_);
    std::unique_lock<std::mutex> l(mu_);
    while (submitted < total_bytes && !(stop && stop->load()) && Clock::now() < deadline) {
      // Process completions.
      while (!done_.empty()) {
        ready.push_back(done_.back());
        done_.pop_back();
      }
      if (!ready.empty()) {
        l.unlock();
        for (int i : ready) Finish(slots_[i]);
        l.lock();
        for (int i : ready) slots_[i].busy = false, --inflight_;
        ready.clear();
      }
      if (inflight_ >= depth_) {
        cv_.wait_for(l, std::chrono::milliseconds(50));
        continue;
      }
      Slot* s = nullptr;
      for (auto& x : slots_)
        if (!x.busy) { s = &x; break; }
      if (!Pick(*s)) continue;
      s->busy = true;
      ++inflight_;
      submitted += s->req.length;
      l.unlock();
      if (s->req.op == IoOp::kWrite) FillRandom(s->buf.data(), s->req.length);
      s->submitted = Clock::now();
      dev_.Submit(&s->req);
      l.lock();
    }
    // Drain.
    const auto drain_deadline = Clock::now() + drain_timeout;
    while (inflight_ > 0) {
      while (!done_.empty()) {
        ready.push_back(done_.back());
        done_.pop_back();
      }
      if (!ready.empty()) {
        l.unlock();
        for (int i : ready) Finish(slots_[i]);
        l.lock();
        for (int i : ready) slots_[i].busy = false, --inflight_;
        ready.clear();
        continue;
      }
      if (Clock::now() >= drain_deadline) return false;
      cv_.wait_for(l, std::chrono::milliseconds(50));
    }
    return true;
  }

  // Reads the whole device back and compares it with the reference (known blocks only).
  // Returns the number of mismatching 4 KiB blocks, or -1 on a read error.
  std::int64_t VerifyAll(std::string* first = nullptr) {
    std::vector<char> buf(kMaxIo);
    std::int64_t bad = 0;
    for (std::uint64_t off = 0; off < size_; off += kMaxIo) {
      const std::uint32_t n = static_cast<std::uint32_t>(std::min<std::uint64_t>(kMaxIo, size_ - off));
      if (!ReadSync(dev_, off, buf.data(), n).ok()) return -1;
      for (std::uint32_t b = 0; b < n; b += kBlock) {
        const std::uint64_t blk = (off + b) / kBlock;
        if (!known_[blk]) continue;
        if (std::memcmp(buf.data() + b, ref_.data() + off + b, kBlock) != 0) {
          if (!bad && first) *first = "block at offset " + std::to_string(off + b);
          ++bad;
        }
      }
    }
    return bad;
  }

  Totals totals() {
    std::lock_guard<std::mutex> l(totals_mu_);
    return totals_;
  }
  std::uint64_t unknown_blocks() const {
    return static_cast<std::uint64_t>(std::count(known_.begin(), known_.end(), 0));
  }

 private:
  struct Slot {
    IoRequest req;
    std::vector<char> buf;
    bool busy = false;
    Clock::time_point submitted;
    Status status;
    Clock::time_point completed;
  };

  static void OnDone(IoRequest* r, Status st) {
    auto* w = static_cast<Workload*>(r->ctx);
    std::lock_guard<std::mutex> l(w->mu_);
    Slot* s = nullptr;
    for (auto& x : w->slots_)
      if (&x.req == r) { s = &x; break; }
    s->status = std::move(st);
    s->completed = Clock::now();
    w->done_.push_back(static_cast<int>(s - w->slots_.data()));
    w->cv_.notify_all();
  }

  // Chooses op, size and an offset not overlapping any in-flight request.  REQUIRES: mu_ held.
  bool Pick(Slot& s) {
    std::uniform_real_distribution<double> lg(std::log2(4096.0), std::log2(double(kMaxIo)) + 0.999);
    std::uint32_t len = 1u << static_cast<int>(lg(rng_));
    len = std::max<std::uint32_t>(kBlock, std::min<std::uint32_t>(kMaxIo, len + (rng_() % 2 ? len / 2 : 0)));
    len = len / kBlock * kBlock;
    for (int tries = 0; tries < 16; ++tries) {
      const std::uint64_t off = (rng_() % ((size_ - len) / kBlock + 1)) * kBlock;
      bool clash = false;
      for (auto& x : slots_)
        if (x.busy && off < x.req.offset + x.req.length && x.req.offset < off + len) { clash = true; break; }
      if (clash) continue;
      s.req = IoRequest{};
      s.req.op = (rng_() % 10) < 6 ? IoOp::kWrite : IoOp::kRead;
      s.req.offset = off;
      s.req.length = len;
      s.req.data = s.buf.data();
      s.req.done = &Workload::OnDone;
      s.req.ctx = this;
      return true;
    }
    return false;
  }

  void FillRandom(char* p, std::uint32_t n) {
    std::uint64_t x = fill_state_ += 0x9E3779B97F4A7C15ull;
    for (std::uint32_t i = 0; i + 8 <= n; i += 8) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      std::memcpy(p + i, &x, 8);
    }
  }

  // Called without mu_: the slot's region has no other request in flight.
  void Finish(Slot& s) {
    const IoRequest& r = s.req;
    const auto lat = std::chrono::duration_cast<std::chrono::milliseconds>(s.completed - s.submitted);
    std::lock_guard<std::mutex> l(totals_mu_);
    Totals& t = totals_;
    ++t.ops;
    t.bytes += r.length;
    t.max_latency = std::max(t.max_latency, lat);
    if (!s.status.ok()) {
      if (!t.errors) {
        t.first_errno = s.status.ToErrno();
        t.first_error_at = s.completed;
      }
      ++t.errors;
      t.last_error_at = std::max(t.last_error_at, s.completed);
      if (r.op == IoOp::kWrite)
        for (std::uint64_t b = r.offset / kBlock; b < (r.offset + r.length) / kBlock; ++b) known_[b] = 0;
      return;
    }
    if (r.op == IoOp::kWrite) {
      ++t.writes;
      std::memcpy(ref_.data() + r.offset, s.buf.data(), r.length);
      for (std::uint64_t b = r.offset / kBlock; b < (r.offset + r.length) / kBlock; ++b) known_[b] = 1;
    } else {
      ++t.reads;
      for (std::uint32_t b = 0; b < r.length; b += kBlock) {
        if (!known_[(r.offset + b) / kBlock]) continue;
        if (std::memcmp(s.buf.data() + b, ref_.data() + r.offset + b, kBlock) != 0) {
          if (!t.mismatches) t.first_mismatch = "read at offset " + std::to_string(r.offset + b);
          ++t.mismatches;
          break;
        }
      }
    }
  }

  BlockDevice& dev_;
  std::uint64_t size_;
  std::uint32_t depth_;
  std::mt19937_64 rng_;
  std::uint64_t fill_state_ = 0x1234;
  std::vector<char> ref_;
  std::vector<std::uint8_t> known_;  // per 4 KiB block
  std::vector<Slot> slots_;
  std::mutex mu_;  // slots' busy flags, done_, inflight_
  std::condition_variable cv_;
  std::vector<int> done_;
  std::uint32_t inflight_ = 0;
  std::mutex totals_mu_;
  Totals totals_;
};

}  // namespace dst::test
