#include "dst/counting_device.h"

#include <chrono>

namespace dst {

namespace {
constexpr auto kRelaxed = std::memory_order_relaxed;
std::uint64_t NowNs() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::steady_clock::now().time_since_epoch())
                                        .count());
}
int ClassOf(IoOp op) { return op == IoOp::kRead ? 0 : op == IoOp::kWrite ? 1 : 2; }
}

CountingDevice::CountingDevice(std::shared_ptr<BlockDevice> inner, std::size_t shadows)
    : inner_(std::move(inner)), shadows_(shadows), start_ns_(shadows) {
  for (auto& s : shadows_) {
    s.link = free_;
    free_ = &s;
  }
}

// Every shadow is back once the inner device completed all it was given; the owner destroys
// this device only after its users are done with it (as with any BlockDevice).
CountingDevice::~CountingDevice() = default;

void CountingDevice::Submit(IoRequest* req) {
  switch (req->op) {
    case IoOp::kRead:
      reads_.fetch_add(1, kRelaxed);
      bytes_read_.fetch_add(req->length, kRelaxed);
      break;
    case IoOp::kWrite:
      writes_.fetch_add(1, kRelaxed);
      bytes_written_.fetch_add(req->length, kRelaxed);
      break;
    default:
      other_.fetch_add(1, kRelaxed);
      break;
  }
  IoRequest* s;
  {
    std::lock_guard<std::mutex> l(free_mu_);
    s = free_;
    if (s) free_ = s->link;
  }
  if (!s) {
    uncounted_.fetch_add(1, kRelaxed);
    inner_->Submit(req);
    return;
  }
  s->op = req->op;
  s->flags = req->flags;
  s->offset = req->offset;
  s->length = req->length;
  s->data = req->data;
  s->done = &CountingDevice::ShadowDone;
  s->ctx = req;
  s->link = nullptr;
  s->scratch = 0;
  // The shadow's link/scratch belong to the inner device now; the caller's request is ours
  // until it completes, so it carries the way back to this device.
  req->scratch = reinterpret_cast<std::uint64_t>(this);
  start_ns_[static_cast<std::size_t>(s - shadows_.data())] = NowNs();
  inflight_.fetch_add(1, kRelaxed);
  inner_->Submit(s);
}

void CountingDevice::ShadowDone(IoRequest* s, Status st) {
  IoRequest* req = static_cast<IoRequest*>(s->ctx);
  auto* self = reinterpret_cast<CountingDevice*>(req->scratch);
  if (!st.ok()) self->errors_.fetch_add(1, kRelaxed);
  const std::uint64_t start = self->start_ns_[static_cast<std::size_t>(s - self->shadows_.data())];
  self->latency_[ClassOf(s->op)].Observe(NowNs() - start);
  self->inflight_.fetch_sub(1, kRelaxed);
  {
    std::lock_guard<std::mutex> l(self->free_mu_);
    s->link = self->free_;
    self->free_ = s;
  }
  req->done(req, std::move(st));
}

DeviceCounters CountingDevice::Counters() const {
  DeviceCounters c;
  c.reads = reads_.load(kRelaxed);
  c.writes = writes_.load(kRelaxed);
  c.other = other_.load(kRelaxed);
  c.bytes_read = bytes_read_.load(kRelaxed);
  c.bytes_written = bytes_written_.load(kRelaxed);
  c.errors = errors_.load(kRelaxed);
  c.uncounted = uncounted_.load(kRelaxed);
  c.inflight = inflight_.load(kRelaxed);
  return c;
}

}  // namespace dst
