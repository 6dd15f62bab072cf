// raid0: striping over N legs with a fixed chunk (md raid0 with equal legs, SPDK raid0.c).
//
// Geometry: array chunk k lives on leg k % N at leg offset (k / N) * chunk, so the array byte o
// is on leg (o / chunk) % N at ((o / chunk) / N) * chunk + o % chunk.  Every leg gives the same
// number of whole chunks (the smallest leg, rounded down to the chunk): size = that * N.
//
// No redundancy: a leg error fails the request (first error wins); flush goes to every leg.
// The device exists only through the layer registry (dst/layer.h): Raid0Layer() at the end.
//
//   Submit --validate--> pool context? --no--> wait in FIFO (IoRequest::link) until one frees
//                             | yes
//                             v
//                        ISSUE_WAVE: up to kSlots chunk pieces (or one flush per leg)
//                             |  each child done
//                             v
//                        last child of the wave? --more pieces, no error--> ISSUE_WAVE
//                             | done or error
//                             v
//                        complete parent; the context goes to the oldest waiter or the pool
//
// Threading: Submit/Info are thread-safe; completions run on the legs' threads.  Nothing is
// allocated per I/O: contexts (with their child requests) are pooled at creation.
#include <algorithm>
#include <atomic>
#include <mutex>
#include <vector>

#include "dst/block_device.h"
#include "dst/layer.h"

namespace dst {

namespace {

constexpr int kMaxRaid0Legs = 32;
constexpr std::uint64_t kMinChunk = 4096;
constexpr std::uint64_t kMaxChunk = std::uint64_t{256} << 20;  // a piece must fit a request length
constexpr std::size_t kContexts = 256;

class Raid0Device : public BlockDevice {
 public:
  static constexpr int kSlots = 16;  // chunk pieces in flight per parent

  static Result<std::shared_ptr<BlockDevice>> Create(std::vector<std::shared_ptr<BlockDevice>> legs,
                                                     std::uint64_t chunk);

  DeviceInfo Info() const override { return info_; }
  void Submit(IoRequest* req) override;
  std::string Describe() const override;

 private:
  struct Ctx {
    Raid0Device* self = nullptr;
    IoRequest* parent = nullptr;
    std::uint64_t pos = 0;  // next array offset (read/write/trim/zeroes) or next leg (flush)
    std::uint64_t end = 0;
    std::atomic<int> outstanding{0};
    std::atomic<int> err{0};  // first child errno
    Ctx* next_free = nullptr;
    IoRequest child[kSlots];
    int leg_of[kSlots] = {};  // not child.scratch: that belongs to the leg while it holds it
  };

  Raid0Device() = default;
  void Start(IoRequest* req, Ctx* c);
  void IssueWave(Ctx* c);
  static void ChildDone(IoRequest* child, Status st);
  void Finish(Ctx* c);

  // Immutable after Create.
  std::vector<std::shared_ptr<BlockDevice>> legs_;
  std::uint64_t chunk_ = 0;
  std::uint64_t leg_bytes_ = 0;  // usable bytes per leg (whole chunks)
  DeviceInfo info_;
  std::unique_ptr<Ctx[]> ctx_;

  std::mutex mu_;  // guards the pool and the waiters
  Ctx* free_ = nullptr;
  IoRequest* waiters_first_ = nullptr;
  IoRequest* waiters_last_ = nullptr;
};

Result<std::shared_ptr<BlockDevice>> Raid0Device::Create(
    std::vector<std::shared_ptr<BlockDevice>> legs, std::uint64_t chunk) {
  if (legs.size() < 2 || legs.size() > std::size_t(kMaxRaid0Legs))
    return Status::InvalidArgument("raid0: needs 2.." + std::to_string(kMaxRaid0Legs) + " legs");
  std::shared_ptr<Raid0Device> d(new Raid0Device());
  std::uint64_t smallest = UINT64_MAX;
  DeviceInfo& a = d->info_;
  a.logical_block_size = 512;
  a.max_io_bytes = UINT32_MAX;
  for (const auto& leg : legs) {
    if (!leg) return Status::InvalidArgument("raid0: missing leg");
    DeviceInfo li = leg->Info();
    if (li.read_only) return Status::ReadOnly("raid0: leg " + leg->Describe() + " is read-only");
    smallest = std::min(smallest, li.size);
    a.logical_block_size = std::max(a.logical_block_size, li.logical_block_size);
    a.max_io_bytes = std::min(a.max_io_bytes, li.max_io_bytes);
    a.can_flush = a.can_flush && li.can_flush;
    a.can_fua = a.can_fua && li.can_fua;
    a.can_trim = a.can_trim && li.can_trim;
    a.can_write_zeroes = a.can_write_zeroes && li.can_write_zeroes;
  }
  if (chunk % a.logical_block_size != 0)
    return Status::InvalidArgument("raid0: chunk " + std::to_string(chunk) +
                                   " is not a multiple of the leg block size " +
                                   std::to_string(a.logical_block_size));
  a.max_io_bytes = a.max_io_bytes / a.logical_block_size * a.logical_block_size;
  if (a.max_io_bytes == 0)
    return Status::InvalidArgument("raid0: leg max I/O below its block size");
  d->legs_ = std::move(legs);
  d->chunk_ = chunk;
  d->leg_bytes_ = smallest / chunk * chunk;
  if (d->leg_bytes_ == 0) return Status::InvalidArgument("raid0: a leg is smaller than one chunk");
  a.size = d->leg_bytes_ * d->legs_.size();
  d->ctx_.reset(new Ctx[kContexts]);
  for (std::size_t i = 0; i < kContexts; ++i) {
    d->ctx_[i].self = d.get();
    d->ctx_[i].next_free = d->free_;
    d->free_ = &d->ctx_[i];
  }
  return std::shared_ptr<BlockDevice>(std::move(d));
}

std::string Raid0Device::Describe() const {
  std::string s = "raid0(chunk " + std::to_string(chunk_);
  for (const auto& leg : legs_) s += ", " + leg->Describe();
  return s + ")";
}

void Raid0Device::Submit(IoRequest* req) {
  if (Status st = ValidateRequest(info_, *req); !st.ok()) {
    req->done(req, st);
    return;
  }
  Ctx* c;
  {
    std::lock_guard<std::mutex> l(mu_);
    c = free_;
    if (c) {
      free_ = c->next_free;
    } else {  // pool dry: wait for a context (no allocation)
      req->link = nullptr;
      (waiters_last_ ? waiters_last_->link : waiters_first_) = req;
      waiters_last_ = req;
    }
  }
  if (c) Start(req, c);
}

void Raid0Device::Start(IoRequest* req, Ctx* c) {
  c->parent = req;
  c->err.store(0, std::memory_order_relaxed);
  const bool flush = req->op == IoOp::kFlush;
  c->pos = flush ? 0 : req->offset;
  c->end = flush ? legs_.size() : req->offset + req->length;
  IssueWave(c);
}

void Raid0Device::IssueWave(Ctx* c) {
  IoRequest* p = c->parent;
  int k = 0;
  for (; c->pos < c->end && k < kSlots; ++k) {
    IoRequest& ch = c->child[k];
    ch = IoRequest();
    ch.op = p->op;
    ch.flags = p->flags;
    if (p->op == IoOp::kFlush) {
      c->leg_of[k] = int(c->pos++);
      continue;
    }
    const std::uint64_t stripe_chunk = c->pos / chunk_;
    const std::uint64_t in_chunk = c->pos % chunk_;
    const std::uint64_t piece = std::min(chunk_ - in_chunk, c->end - c->pos);
    c->leg_of[k] = int(stripe_chunk % legs_.size());
    ch.offset = stripe_chunk / legs_.size() * chunk_ + in_chunk;
    ch.length = std::uint32_t(piece);
    if (p->data) ch.data = p->data + (c->pos - p->offset);
    c->pos += piece;
  }
  if (k == 0) {  // a zero-length request
    Finish(c);
    return;
  }
  c->outstanding.store(k, std::memory_order_release);
  for (int j = 0; j < k; ++j) {
    c->child[j].done = &Raid0Device::ChildDone;
    c->child[j].ctx = c;
    legs_[std::size_t(c->leg_of[j])]->Submit(&c->child[j]);
  }
}

void Raid0Device::ChildDone(IoRequest* child, Status st) {
  Ctx* c = static_cast<Ctx*>(child->ctx);
  if (!st.ok()) {
    int expected = 0;
    c->err.compare_exchange_strong(expected, st.ToErrno() ? st.ToErrno() : EIO);
  }
  if (c->outstanding.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  if (c->err.load() != 0 || c->pos >= c->end)
    c->self->Finish(c);
  else
    c->self->IssueWave(c);
}

void Raid0Device::Finish(Ctx* c) {
  IoRequest* p = c->parent;
  const int e = c->err.load();
  IoRequest* next = nullptr;
  {
    std::lock_guard<std::mutex> l(mu_);
    next = waiters_first_;
    if (next) {
      waiters_first_ = next->link;
      if (!waiters_first_) waiters_last_ = nullptr;
    } else {
      c->next_free = free_;
      free_ = c;
    }
  }
  p->done(p, e == 0 ? Status::OK() : e == EIO ? Status::IoError() : Status::FromErrno(e));
  if (next) Start(next, c);  // the context passes straight to the oldest waiter
}

// ---- registry entry (dst/layer.h) ----

Status CheckRaid0(const LayerParams& params) {
  const std::uint64_t chunk = LayerParamU64(params, "chunk");
  if (chunk < kMinChunk || chunk > kMaxChunk || (chunk & (chunk - 1)) != 0)
    return Status::InvalidArgument("chunk: must be a power of two, a multiple of 4K, at most "
                                   "256M; got " + params.at("chunk"));
  return Status::OK();
}

std::uint64_t Raid0Size(const std::vector<DeviceInfo>& legs, const LayerParams& params) {
  const std::uint64_t chunk = LayerParamU64(params, "chunk");
  if (legs.empty() || chunk == 0) return 0;
  std::uint64_t smallest = UINT64_MAX;
  for (const DeviceInfo& i : legs) smallest = std::min(smallest, i.size);
  return smallest / chunk * chunk * legs.size();
}

Result<std::shared_ptr<BlockDevice>> CreateRaid0(std::vector<std::shared_ptr<BlockDevice>> legs,
                                                 const LayerParams& params) {
  return Raid0Device::Create(std::move(legs), LayerParamU64(params, "chunk"));
}

}  // namespace

const LayerInfo& Raid0Layer() {
  static const LayerInfo layer{
      .name = "raid0",
      .title = "raid0 (striped)",
      .help = "Stripes the array over its legs in chunks (md raid0). No redundancy: an error on "
              "any leg fails the I/O that reaches it. Legs cannot change live.",
      .keys = {{.name = "chunk",
                .type = LayerKey::Type::kSize,
                .default_value = "65536",
                .help = "stripe unit: a power of two, a multiple of 4K, at most 256M",
                .label = "Chunk Size"}},
      .legs = {.min_legs = 2,
               .max_legs = kMaxRaid0Legs,
               .same_size = true,
               .change = LegChange::kFixed,
               .size_rule = "the smallest leg rounded down to the chunk, times the legs"},
      .check = &CheckRaid0,
      .usable_size = &Raid0Size,
      .create = &CreateRaid0,
  };
  return layer;
}

}  // namespace dst
