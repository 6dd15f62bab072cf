// LinearDevice: concatenates child devices of any sizes, in order (md/dm "linear", SPDK concat).
//
// Table: leg i covers array bytes [start_i, start_i + len_i); len_i is the child's size rounded
// down to the array block size (the largest child logical block size), so geometry is exact and
// a child of odd size loses at most one block.  A request crossing a boundary is split into
// child requests; flush goes to every child that can flush.
//
//   Submit --validate--> ISSUE_WAVE (up to kSlots child requests from a pooled context)
//                             |  each child done
//                             v
//                        last child of wave? --more pieces--> ISSUE_WAVE
//                             | no more / error
//                             v
//                        complete parent (first child error wins), context back to the pool
//
// Contexts come from a pool sized at creation; when it is dry the parent waits in an intrusive
// FIFO (IoRequest::link) and starts when a context frees: no heap allocation per I/O.
//
// Growing: AppendLeg() adds a child at the end while I/O runs; the size grows atomically.  The
// child's block size must not exceed the array's.  Capabilities are the AND (MIN) of children
// and may shrink when a less capable child is appended.
//
// Threading: Submit/Info/AppendLeg are thread-safe; completions run on the children's threads.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "dst/block_device.h"

namespace dst {

struct LinearOptions {
  std::size_t max_inflight = 256;  // pooled parent contexts
};

class LinearDevice : public BlockDevice {
 public:
  static constexpr std::size_t kMaxLegs = 256;
  static constexpr int kSlots = 8;  // child requests in flight per parent

  struct Extent {
    std::uint64_t start = 0;
    std::uint64_t len = 0;
  };

  static Result<std::shared_ptr<LinearDevice>> Create(
      std::vector<std::shared_ptr<BlockDevice>> legs, const LinearOptions& opts = {});
  ~LinearDevice() override;

  DeviceInfo Info() const override;
  void Submit(IoRequest* req) override;
  std::string Describe() const override;

  Status AppendLeg(std::shared_ptr<BlockDevice> leg);
  std::vector<Extent> Table() const;
  std::size_t leg_count() const { return n_.load(std::memory_order_acquire); }
  std::shared_ptr<BlockDevice> leg(std::size_t i) const;

  struct Ctx;
 private:
  LinearDevice() = default;
  void Start(IoRequest* req, Ctx* c);
  void IssueWave(Ctx* c);
  static void ChildDone(IoRequest* child, Status st);
  void Finish(Ctx* c);
  std::size_t FindLeg(std::uint64_t offset, std::size_t n) const;

  mutable std::mutex mu_;  // guards info_, free list, wait queue, appends
  DeviceInfo info_;
  std::vector<std::shared_ptr<BlockDevice>> legs_;  // capacity kMaxLegs, never reallocates
  Extent ext_[kMaxLegs];
  std::atomic<std::size_t> n_{0};
  std::unique_ptr<Ctx[]> ctx_;
  Ctx* free_ = nullptr;
  IoRequest* wait_head_ = nullptr;
  IoRequest* wait_tail_ = nullptr;
};

}  // namespace dst
