#include "dst/block_device.h"

#include <condition_variable>
#include <mutex>

namespace dst {

const char* IoOpName(IoOp op) {
  switch (op) {
    case IoOp::kRead: return "read";
    case IoOp::kWrite: return "write";
    case IoOp::kFlush: return "flush";
    case IoOp::kTrim: return "trim";
    case IoOp::kWriteZeroes: return "write-zeroes";
  }
  return "unknown";
}

Status ValidateRequest(const DeviceInfo& info, const IoRequest& req) {
  switch (req.op) {
    case IoOp::kFlush:
      return Status::OK();
    case IoOp::kRead:
      break;
    case IoOp::kWrite:
    case IoOp::kTrim:
    case IoOp::kWriteZeroes:
      if (info.read_only) return Status::ReadOnly();
      if (req.op == IoOp::kTrim && !info.can_trim) return Status::NotSupported();
      if (req.op == IoOp::kWriteZeroes && !info.can_write_zeroes) return Status::NotSupported();
      break;
    default:
      return Status::InvalidArgument();
  }
  if (req.length == 0) return Status::InvalidArgument();
  const std::uint64_t bs = info.logical_block_size ? info.logical_block_size : 1;
  if (req.offset % bs != 0 || req.length % bs != 0) return Status::InvalidArgument();
  if ((req.op == IoOp::kRead || req.op == IoOp::kWrite) && req.length > info.max_io_bytes)
    return Status::InvalidArgument();
  if (req.offset > info.size || req.length > info.size - req.offset) return Status::OutOfRange();
  return Status::OK();
}

namespace {
struct SyncWaiter {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  Status status;
};
void SyncDone(IoRequest* req, Status st) {
  auto* w = static_cast<SyncWaiter*>(req->ctx);
  std::lock_guard<std::mutex> l(w->mu);
  w->status = std::move(st);
  w->done = true;
  w->cv.notify_one();
}
}  // namespace

Status SubmitSync(BlockDevice& dev, IoRequest& req) {
  SyncWaiter w;
  req.done = SyncDone;
  req.ctx = &w;
  dev.Submit(&req);
  std::unique_lock<std::mutex> l(w.mu);
  w.cv.wait(l, [&] { return w.done; });
  return w.status;
}

Status ReadSync(BlockDevice& dev, std::uint64_t offset, void* buf, std::uint32_t len) {
  IoRequest r;
  r.op = IoOp::kRead;
  r.offset = offset;
  r.length = len;
  r.data = static_cast<char*>(buf);
  return SubmitSync(dev, r);
}

Status WriteSync(BlockDevice& dev, std::uint64_t offset, const void* buf, std::uint32_t len,
                 std::uint32_t flags) {
  IoRequest r;
  r.op = IoOp::kWrite;
  r.flags = flags;
  r.offset = offset;
  r.length = len;
  r.data = const_cast<char*>(static_cast<const char*>(buf));
  return SubmitSync(dev, r);
}

Status FlushSync(BlockDevice& dev) {
  IoRequest r;
  r.op = IoOp::kFlush;
  return SubmitSync(dev, r);
}

}  // namespace dst
