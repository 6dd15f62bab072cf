// ConnectCheckProbe: a ConnectCheck (core/include/dst/block_device.h) for device tests.  It
// accepts a connection when the check range starts with `expect`, counts verify()/rejected()
// calls, and counts any callback that runs after the owner removed it ("late"), which the
// seam forbids.
#pragma once

#include <atomic>
#include <cstring>
#include <mutex>
#include <string>

#include "dst/block_device.h"

namespace dst::test {

struct ConnectCheckProbe {
  std::mutex mu;
  std::string expect;
  std::atomic<int> verified{0};
  std::atomic<int> rejected{0};
  std::atomic<int> late{0};      // callbacks after Remove() returned
  std::atomic<bool> removed{false};
  std::string last_why;

  ConnectCheck Make(std::uint64_t offset, std::uint32_t length) {
    ConnectCheck c;
    c.offset = offset;
    c.length = length;
    c.verify = &Verify;
    c.rejected = &Rejected;
    c.arg = this;
    removed = false;
    return c;
  }
  void SetExpect(const std::string& e) {
    std::lock_guard<std::mutex> l(mu);
    expect = e;
  }
  // Removes the check from `dev`; from here on any callback is a violation.
  void Remove(BlockDevice& dev) {
    dev.SetConnectCheck(ConnectCheck{});
    removed = true;
  }
  std::string Why() {
    std::lock_guard<std::mutex> l(mu);
    return last_why;
  }

  static Status Verify(void* arg, const char* data, std::uint32_t len) {
    auto* p = static_cast<ConnectCheckProbe*>(arg);
    if (p->removed) p->late.fetch_add(1);
    p->verified.fetch_add(1);
    std::lock_guard<std::mutex> l(p->mu);
    if (len < p->expect.size() || std::memcmp(data, p->expect.data(), p->expect.size()) != 0)
      return Status::IoError("identity mismatch");
    return Status::OK();
  }
  static void Rejected(void* arg, const Status& why) {
    auto* p = static_cast<ConnectCheckProbe*>(arg);
    if (p->removed) p->late.fetch_add(1);
    p->rejected.fetch_add(1);
    std::lock_guard<std::mutex> l(p->mu);
    p->last_why = why.ToString();
  }
};

}  // namespace dst::test
