// Sync: one BlockDevice request, submitted and waited for (test helper, header only).
#pragma once

#include <cstdint>
#include <future>

#include "dst/block_device.h"
#include "dst/status.h"

namespace dst::test {

inline Status Sync(BlockDevice& dev, IoOp op, std::uint64_t offset, char* data, std::uint32_t length) {
  std::promise<Status> p;
  IoRequest r;
  r.op = op;
  r.offset = offset;
  r.length = length;
  r.data = data;
  r.ctx = &p;
  r.done = [](IoRequest* q, Status s) { static_cast<std::promise<Status>*>(q->ctx)->set_value(s); };
  dev.Submit(&r);
  return p.get_future().get();
}

}  // namespace dst::test
