// CountingDevice: a pass-through BlockDevice that counts what goes to the device below it --
// reads, writes, errors and bytes -- so dstd can show per-leg traffic (read balancing across
// mirror legs, a leg that errs).  Everything else (Info, Describe, SetConnectCheck, Health) is
// the inner device's.
//
// No heap allocation per I/O: the request handed down is a shadow taken from a pool allocated
// once (`shadows` of them); its completion counts, returns the shadow and completes the
// caller's request.  When every shadow is busy a request goes down as it is: counted at submit
// (ops, bytes) but its error and latency, if any, are not (`uncounted` says how many went that
// way).  Latency: submit to completion, per class (read, write, other), in a LatencyHistogram.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "dst/block_device.h"
#include "dst/latency_histogram.h"

namespace dst {

struct DeviceCounters {
  std::uint64_t reads = 0, writes = 0, other = 0;  // other: flush, trim, write-zeroes
  std::uint64_t bytes_read = 0, bytes_written = 0;
  std::uint64_t errors = 0;     // completions with an error
  std::uint64_t uncounted = 0;  // requests whose completion was not watched (pool exhausted)
  std::uint64_t inflight = 0;   // watched requests submitted and not yet completed
};

class CountingDevice : public BlockDevice {
 public:
  explicit CountingDevice(std::shared_ptr<BlockDevice> inner, std::size_t shadows = 512);
  ~CountingDevice() override;

  DeviceInfo Info() const override { return inner_->Info(); }
  void Submit(IoRequest* req) override;
  std::string Describe() const override { return inner_->Describe(); }
  bool SetConnectCheck(const ConnectCheck& check) override { return inner_->SetConnectCheck(check); }
  DeviceHealth Health() const override { return inner_->Health(); }

  DeviceCounters Counters() const;
  enum class OpClass { kRead, kWrite, kOther };
  const LatencyHistogram& Latency(OpClass c) const { return latency_[static_cast<int>(c)]; }
  const std::shared_ptr<BlockDevice>& inner() const { return inner_; }

 private:
  static void ShadowDone(IoRequest* shadow, Status st);

  std::shared_ptr<BlockDevice> inner_;
  std::vector<IoRequest> shadows_;
  std::vector<std::uint64_t> start_ns_;  // per shadow: when its request was submitted
  LatencyHistogram latency_[3];
  std::mutex free_mu_;
  IoRequest* free_ = nullptr;  // GUARDED_BY(free_mu_), linked through `link`
  std::atomic<std::uint64_t> reads_{0}, writes_{0}, other_{0}, bytes_read_{0}, bytes_written_{0},
      errors_{0}, uncounted_{0}, inflight_{0};
};

}  // namespace dst
