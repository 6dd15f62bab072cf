#include "dst/linear_device.h"

#include <algorithm>

#include "dst/layer.h"

namespace dst {

struct LinearDevice::Ctx {
  LinearDevice* self = nullptr;
  IoRequest* parent = nullptr;
  std::uint64_t next = 0;  // next array offset (rw) or next leg index (flush)
  std::uint64_t end = 0;
  std::size_t nlegs = 0;   // table size snapshot
  std::atomic<int> outstanding{0};
  std::atomic<int> err{0};  // first child errno
  Ctx* next_free = nullptr;
  IoRequest child[kSlots];
};

Result<std::shared_ptr<LinearDevice>> LinearDevice::Create(
    std::vector<std::shared_ptr<BlockDevice>> legs, const LinearOptions& opts) {
  if (legs.empty()) return Status::InvalidArgument("linear: no legs");
  if (legs.size() > kMaxLegs) return Status::InvalidArgument("linear: too many legs");
  std::shared_ptr<LinearDevice> d(new LinearDevice());
  d->legs_.reserve(kMaxLegs);
  std::uint32_t bs = 512;
  for (auto& l : legs) {
    if (!l) return Status::InvalidArgument("linear: null leg");
    bs = std::max(bs, l->Info().logical_block_size);
  }
  d->info_ = DeviceInfo();
  d->info_.size = 0;
  d->info_.logical_block_size = bs;
  d->info_.max_io_bytes = UINT32_MAX;
  for (auto& l : legs) DST_RETURN_IF_ERROR(d->AppendLeg(l));
  std::size_t n = opts.max_inflight ? opts.max_inflight : 1;
  d->ctx_.reset(new Ctx[n]);
  for (std::size_t i = 0; i < n; ++i) {
    d->ctx_[i].self = d.get();
    d->ctx_[i].next_free = d->free_;
    d->free_ = &d->ctx_[i];
  }
  return d;
}

LinearDevice::~LinearDevice() = default;

Status LinearDevice::AppendLeg(std::shared_ptr<BlockDevice> leg) {
  if (!leg) return Status::InvalidArgument("linear: null leg");
  DeviceInfo li = leg->Info();
  std::lock_guard<std::mutex> l(mu_);
  std::size_t n = n_.load(std::memory_order_relaxed);
  if (n >= kMaxLegs) return Status::NoSpace("linear: too many legs");
  const std::uint32_t bs = info_.logical_block_size;
  if (li.logical_block_size > bs || bs % li.logical_block_size != 0)
    return Status::InvalidArgument("linear: leg block size " + std::to_string(li.logical_block_size) +
                                   " does not divide array block size " + std::to_string(bs));
  std::uint64_t len = li.size / bs * bs;
  if (len == 0) return Status::InvalidArgument("linear: leg smaller than one block");
  if (li.max_io_bytes < bs) return Status::InvalidArgument("linear: leg max I/O below block size");
  ext_[n].start = info_.size;
  ext_[n].len = len;
  legs_.push_back(std::move(leg));
  info_.max_io_bytes = std::min(info_.max_io_bytes, li.max_io_bytes / bs * bs);
  info_.read_only = info_.read_only || li.read_only;
  info_.can_flush = n == 0 ? li.can_flush : (info_.can_flush && li.can_flush);
  info_.can_fua = n == 0 ? li.can_fua : (info_.can_fua && li.can_fua);
  info_.can_trim = n == 0 ? li.can_trim : (info_.can_trim && li.can_trim);
  info_.can_write_zeroes = n == 0 ? li.can_write_zeroes : (info_.can_write_zeroes && li.can_write_zeroes);
  info_.size += len;
  n_.store(n + 1, std::memory_order_release);
  return Status::OK();
}

DeviceInfo LinearDevice::Info() const {
  std::lock_guard<std::mutex> l(mu_);
  return info_;
}

std::string LinearDevice::Describe() const {
  std::string s = "linear(";
  std::size_t n = leg_count();
  for (std::size_t i = 0; i < n; ++i) {
    if (i) s += ", ";
    s += legs_[i]->Describe();
  }
  return s + ")";
}

std::vector<LinearDevice::Extent> LinearDevice::Table() const {
  std::size_t n = leg_count();
  return std::vector<Extent>(ext_, ext_ + n);
}

std::shared_ptr<BlockDevice> LinearDevice::leg(std::size_t i) const {
  std::lock_guard<std::mutex> l(mu_);
  return i < legs_.size() ? legs_[i] : nullptr;
}

std::size_t LinearDevice::FindLeg(std::uint64_t off, std::size_t n) const {
  // Last extent with start <= off.
  std::size_t lo = 0, hi = n;
  while (hi - lo > 1) {
    std::size_t mid = (lo + hi) / 2;
    if (ext_[mid].start <= off)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

void LinearDevice::Submit(IoRequest* req) {
  Ctx* c = nullptr;
  Status st;
  {
    std::lock_guard<std::mutex> l(mu_);
    st = ValidateRequest(info_, *req);
    if (st.ok()) {
      if (free_) {
        c = free_;
        free_ = c->next_free;
      } else {
        req->link = nullptr;
        if (wait_tail_)
          wait_tail_->link = req;
        else
          wait_head_ = req;
        wait_tail_ = req;
        return;
      }
    }
  }
  if (!st.ok()) {
    req->done(req, st);
    return;
  }
  Start(req, c);
}

void LinearDevice::Start(IoRequest* req, Ctx* c) {
  c->parent = req;
  c->err.store(0, std::memory_order_relaxed);
  c->nlegs = n_.load(std::memory_order_acquire);
  if (req->op == IoOp::kFlush) {
    c->next = 0;
    c->end = c->nlegs;
  } else {
    c->next = req->offset;
    c->end = req->offset + req->length;
  }
  IssueWave(c);
}

void LinearDevice::IssueWave(Ctx* c) {
  IoRequest* p = c->parent;
  int k = 0;
  if (p->op == IoOp::kFlush) {
    while (c->next < c->end && k < kSlots) {
      std::size_t i = static_cast<std::size_t>(c->next++);
      if (!legs_[i]->Info().can_flush) continue;
      IoRequest& ch = c->child[k++];
      ch = IoRequest();
      ch.op = IoOp::kFlush;
      ch.scratch = i;
    }
  } else {
    while (c->next < c->end && k < kSlots) {
      std::size_t i = FindLeg(c->next, c->nlegs);
      std::uint64_t in_leg = c->next - ext_[i].start;
      std::uint64_t n = std::min<std::uint64_t>(c->end - c->next, ext_[i].len - in_leg);
      IoRequest& ch = c->child[k++];
      ch = IoRequest();
      ch.op = p->op;
      ch.flags = p->flags;
      ch.offset = in_leg;
      ch.length = static_cast<std::uint32_t>(n);
      if (p->data) ch.data = p->data + (c->next - p->offset);
      ch.scratch = i;
      c->next += n;
    }
  }
  if (k == 0) {
    Finish(c);
    return;
  }
  c->outstanding.store(k, std::memory_order_release);
  for (int j = 0; j < k; ++j) {
    IoRequest& ch = c->child[j];
    ch.done = &LinearDevice::ChildDone;
    ch.ctx = c;
    legs_[static_cast<std::size_t>(ch.scratch)]->Submit(&ch);
  }
}

void LinearDevice::ChildDone(IoRequest* child, Status st) {
  Ctx* c = static_cast<Ctx*>(child->ctx);
  if (!st.ok()) {
    int e = st.ToErrno() ? st.ToErrno() : EIO;
    int zero = 0;
    c->err.compare_exchange_strong(zero, e);
  }
  if (c->outstanding.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  if (c->err.load() == 0 && c->next < c->end)
    c->self->IssueWave(c);
  else
    c->self->Finish(c);
}

void LinearDevice::Finish(Ctx* c) {
  IoRequest* p = c->parent;
  int e = c->err.load();
  Status st = e == 0 ? Status::OK() : (e == EIO ? Status::IoError() : Status::FromErrno(e));
  IoRequest* waiting = nullptr;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (wait_head_) {
      waiting = wait_head_;
      wait_head_ = waiting->link;
      if (!wait_head_) wait_tail_ = nullptr;
    } else {
      c->next_free = free_;
      free_ = c;
    }
  }
  p->done(p, st);
  if (waiting) Start(waiting, c);  // the context passes straight to the oldest waiter
}

// ---- registry entry (dst/layer.h) ----

namespace {

std::uint64_t LinearSize(const std::vector<DeviceInfo>& legs, const LayerParams&) {
  std::uint32_t bs = 512;
  for (const DeviceInfo& i : legs) bs = std::max(bs, i.logical_block_size);
  std::uint64_t size = 0;
  for (const DeviceInfo& i : legs) size += i.size / bs * bs;
  return size;
}

Result<std::shared_ptr<BlockDevice>> CreateLinear(std::vector<std::shared_ptr<BlockDevice>> legs,
                                                  const LayerParams&) {
  auto r = LinearDevice::Create(std::move(legs));
  if (!r.ok()) return r.status();
  return std::shared_ptr<BlockDevice>(r.value());
}

}  // namespace

const LayerInfo& LinearLayer() {
  static const LayerInfo layer{
      .name = "linear",
      .title = "linear",
      .help = "Concatenates the legs in order (md linear). Grows live by appending legs "
              "(array grow). No redundancy: while a leg is unreachable, I/O to its extent fails.",
      .keys = {},  // none of its own
      .legs = {.min_legs = 1,
               .max_legs = int(LinearDevice::kMaxLegs),
               .read_only_legs = true,  // the array is read-only then
               .change = LegChange::kAppend,
               .size_rule = "sum of the legs, each rounded down to the largest leg block size"},
      .usable_size = &LinearSize,
      .create = &CreateLinear,
  };
  return layer;
}

}  // namespace dst
