// MirrorDevice implementation.  See mirror_device.h for the state diagrams and invariants.
//
// Locking: one mutex (mu_) guards leg states, maps, wait lists and the in-flight list.  Nothing
// is submitted to a leg and no parent is completed while holding it (a completion may run
// inline and re-enter).  store_->Commit() and resync I/O run outside it.
#include "dst/mirror_device.h"

#include "dst/token_bucket.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

namespace dst {

const char* ResyncStateName(ResyncState s) {
  switch (s) {
    case ResyncState::kIdle: return "idle";
    case ResyncState::kPending: return "pending";
    case ResyncState::kRunning: return "running";
    case ResyncState::kPaused: return "paused";
    case ResyncState::kDone: return "done";
    case ResyncState::kFailed: return "failed";
  }
  return "unknown";
}

const char* VerifyStateName(VerifyState s) {
  switch (s) {
    case VerifyState::kNone: return "none";
    case VerifyState::kRunning: return "running";
    case VerifyState::kDone: return "done";
    case VerifyState::kCancelled: return "cancelled";
    case VerifyState::kFailed: return "failed";
  }
  return "unknown";
}

namespace {

using Clock = std::chrono::steady_clock;

std::int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

// ---- Leg header (last 4 KiB-aligned block of every leg) ----
constexpr char kHeaderMagic[8] = {'D', 'S', 'T', 'L', 'E', 'G', 'H', '1'};
constexpr std::uint32_t kHeaderVersion = 1;

struct LegHeader {
  std::string array_id;
  std::string generation;
  std::uint32_t slot = 0;
  std::uint32_t region_size = 0;
  std::uint64_t array_size = 0;
};

void Put32(char* p, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}
void Put64(char* p, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}
std::uint32_t Get32(const char* p) {
  std::uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}
std::uint64_t Get64(const char* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

struct AlignedBuf {
  explicit AlignedBuf(std::size_t n) : p(static_cast<char*>(std::aligned_alloc(4096, n))), size(n) {
    std::memset(p, 0, n);
  }
  ~AlignedBuf() { std::free(p); }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
  char* p;
  std::size_t size;
};

// Data area of a leg: size rounded down to 4 KiB, minus the header block.
std::uint64_t LegDataBytes(const DeviceInfo& i) {
  std::uint64_t r = i.size / MirrorDevice::kLegHeaderBytes * MirrorDevice::kLegHeaderBytes;
  return r >= 2 * MirrorDevice::kLegHeaderBytes ? r - MirrorDevice::kLegHeaderBytes : 0;
}

Status WriteHeader(BlockDevice& dev, const LegHeader& h) {
  DeviceInfo info = dev.Info();
  std::uint64_t data = LegDataBytes(info);
  if (data == 0) return Status::InvalidArgument("leg too small for a header: " + dev.Describe());
  if (info.logical_block_size > MirrorDevice::kLegHeaderBytes)
    return Status::InvalidArgument("leg block size above 4 KiB: " + dev.Describe());
  AlignedBuf b(MirrorDevice::kLegHeaderBytes);
  std::memcpy(b.p, kHeaderMagic, 8);
  Put32(b.p + 8, kHeaderVersion);
  Put32(b.p + 12, h.slot);
  Put32(b.p + 16, h.region_size);
  Put64(b.p + 24, h.array_size);
  std::snprintf(b.p + 64, 64, "%s", h.array_id.c_str());
  std::snprintf(b.p + 128, 64, "%s", h.generation.c_str());
  Status s = WriteSync(dev, data, b.p, MirrorDevice::kLegHeaderBytes, kIoFua);
  if (!s.ok()) return s.WithContext("write leg header on " + dev.Describe());
  if (!info.can_fua && info.can_flush) return FlushSync(dev);
  return Status::OK();
}

// NotFound when the leg carries no dst header (blank or foreign device).
Result<LegHeader> ReadHeader(BlockDevice& dev) {
  DeviceInfo info = dev.Info();
  std::uint64_t data = LegDataBytes(info);
  if (data == 0) return Status::InvalidArgument("leg too small: " + dev.Describe());
  AlignedBuf b(MirrorDevice::kLegHeaderBytes);
  Status s = ReadSync(dev, data, b.p, MirrorDevice::kLegHeaderBytes);
  if (!s.ok()) return s.WithContext("read leg header on " + dev.Describe());
  if (std::memcmp(b.p, kHeaderMagic, 8) != 0 || Get32(b.p + 8) != kHeaderVersion)
    return Status::NotFound("no dst leg header on " + dev.Describe());
  LegHeader h;
  h.slot = Get32(b.p + 12);
  h.region_size = Get32(b.p + 16);
  h.array_size = Get64(b.p + 24);
  b.p[64 + 63] = 0;
  b.p[128 + 63] = 0;
  h.array_id = b.p + 64;
  h.generation = b.p + 128;
  return h;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

class MirrorDevice::Impl {
 public:
  struct Ctx {
    Impl* self = nullptr;
    IoRequest* parent = nullptr;
    std::uint64_t r0 = 0, r1 = 0;  // covering regions [r0, r1)
    std::atomic<int> outstanding{0};
    std::atomic<int> ok_count{0};
    int nchild = 0;
    std::uint32_t tried = 0;  // read: legs already tried
    bool in_flight = false;
    Ctx* next = nullptr;  // free list / wait lists
    Ctx* iprev = nullptr;  // in-flight list
    Ctx* inext = nullptr;
    IoRequest child[kMaxLegs];
    // Leg slot of each child.  Not kept in child[i].scratch: that field belongs to the leg
    // device while it holds the request (block_device.h), and RemoteDevice uses it.
    int slot_of[kMaxLegs] = {};
    int SlotOf(const IoRequest* ch) const { return slot_of[ch - child]; }
  };

  struct Leg {
    std::shared_ptr<BlockDevice> dev;
    LegState state = LegState::kEmpty;
    std::string generation;
    std::string describe;
    DirtyMap oos;
    std::vector<std::uint8_t> chunk_dirty;
    bool record_dirty = false;
    std::atomic<std::uint32_t> pending{0};
    std::atomic<std::uint64_t> last_pos{0};
    ResyncProgress prog;
    bool checkpoint_dirty = false;
    std::uint64_t pass_start_ns = 0;
    // Commit that carries this leg's latest "not up" state; a write that missed the leg is
    // acknowledged only once last_ok_seq_ >= down_seq (else a crash could pick it as source).
    std::uint64_t down_seq = 0;
  };

  // A simple intrusive FIFO of contexts.
  struct CtxList {
    Ctx* head = nullptr;
    Ctx* tail = nullptr;
    void Push(Ctx* c) {
      c->next = nullptr;
      if (tail)
        tail->next = c;
      else
        head = c;
      tail = c;
    }
    Ctx* Pop() {
      Ctx* c = head;
      if (c) {
        head = c->next;
        if (!head) tail = nullptr;
      }
      return c;
    }
    bool empty() const { return head == nullptr; }
  };

  ~Impl() {
    Shutdown(false);
    // A lazy-clear flush may still be in flight after a simulated crash: wait for it.
    for (;;) {
      {
        std::lock_guard<std::mutex> l(mu_);
        if (clear_outstanding_ == 0) break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }

  // ---- construction ----
  Status Init(const ArrayRecord& rec, std::vector<std::shared_ptr<BlockDevice>> devs,
              std::shared_ptr<DirtyMapStore> store, const MirrorOptions& opts);

  // ---- I/O ----
  void Submit(IoRequest* req);
  void Start(IoRequest* req, Ctx* c);
  void StartWrite(Ctx* c);
  enum class Admit { kGo, kQueued, kFail };
  Admit AdmitWriteLocked(Ctx* c);
  void IssueChildren(Ctx* c);
  static void WriteChildDone(IoRequest* child, Status st);
  void FinishWrite(Ctx* c);
  void StartRead(Ctx* c);
  static void ReadChildDone(IoRequest* child, Status st);
  void StartFlush(Ctx* c);
  static void FlushChildDone(IoRequest* child, Status st);
  void Complete(Ctx* c, Status st);
  void ReleaseCtx(Ctx* c);
  void FailLegLocked(int slot);
  void MarkLegDownLocked(int slot) {
    legs_[slot].record_dirty = true;
    legs_[slot].down_seq = commits_started_ + 1;
    RequestCommitLocked();
  }
  bool MustWaitDownLocked() const {
    for (int s = 0; s < nslots_; ++s) {
      const Leg& L = legs_[s];
      if (L.state != LegState::kUpToDate && L.state != LegState::kResyncing && L.down_seq > last_ok_seq_)
        return true;
    }
    return false;
  }
  Status FinalStatusLocked(Ctx* c) const;
  void MarkOosLocked(int slot, std::uint64_t r0, std::uint64_t r1);
  void MarkIntentChunkLocked(std::uint64_t r) {
    std::uint64_t ch = DirtyMap::ChunkOf(r);
    if (!intent_chunk_dirty_[ch]) {
      intent_chunk_dirty_[ch] = 1;
      dirty_ = true;
    }
  }
  void AdmitList(Ctx* list);

  // ---- writer thread ----
  void WriterLoop();
  bool CommitOnce();  // returns false when nothing to do
  void LazyClearStartLocked(std::unique_lock<std::mutex>& l, bool force);
  static void ClearFlushDone(IoRequest* r, Status st);
  void LazyClearFinishLocked();
  void RequestCommitLocked() {
    dirty_ = true;
    writer_cv_.notify_one();
  }
  void WaitCommittedLocked(std::unique_lock<std::mutex>& l, std::uint64_t seq) {
    commit_cv_.wait(l, [&] { return commits_done_ >= seq || stopping_writer_; });
  }

  // ---- resync thread ----
  void ResyncLoop();
  bool ResyncLeg(int slot);  // true when the leg finished
  bool WindowBusyLocked() const;
  // The leg a resync copies from (and a verify compares against): the first up-to-date leg.
  int SourceLegLocked() const {
    for (int s = 0; s < nslots_; ++s)
      if (legs_[s].state == LegState::kUpToDate && legs_[s].dev) return s;
    return -1;
  }
  // Ends the window lock; returns the writes that waited for it (AdmitList them outside mu_).
  Ctx* UnlockWindowLocked() {
    window_active_ = false;
    Ctx* release = nullptr;
    Ctx** tail = &release;
    while (Ctx* c = window_waiters_.Pop()) {
      *tail = c;
      c->next = nullptr;
      tail = &c->next;
    }
    return release;
  }
  std::uint64_t CurrentRate();

  void Shutdown(bool orderly);
  Status StartLegResyncLocked(int slot, bool full);

  // ---- online verify (resync thread) ----
  bool VerifyPendingLocked() const { return verify_.state == VerifyState::kRunning; }
  bool ResyncRunnableLocked() const;
  void VerifyRun();  // windows until done, cancelled, failed or a resync must run first
  Status StartVerifyLocked(const VerifyOptions& o);
  void EndVerifyLocked(VerifyState st, std::string why);
  void VerifyRecordLocked(std::uint64_t w0, const std::uint32_t* diff, std::uint64_t nreg);
  void NotifyVerifyDone();  // runs the ended verify's on_done (not under mu_)

  // Immutable after Init.
  std::string id_;
  std::string name_;
  std::shared_ptr<DirtyMapStore> store_;
  MirrorOptions opts_;
  DeviceInfo info_;
  std::uint32_t region_size_ = 0;
  std::uint64_t regions_ = 0;
  std::uint64_t window_bytes_ = 0;
  std::unique_ptr<Ctx[]> ctx_;

  mutable std::mutex mu_;
  Leg legs_[kMaxLegs];
  int nslots_ = 0;  // slots in use: [0, nslots_)
  Ctx* free_ = nullptr;
  IoRequest* pool_wait_head_ = nullptr;
  IoRequest* pool_wait_tail_ = nullptr;
  Ctx* inflight_head_ = nullptr;  // admitted writes

  // Write intent.
  DirtyMap intent_;          // wanted (durable or pending)
  DirtyMap intent_durable_;  // as committed
  DirtyMap touched_;         // regions written in the current epoch
  std::vector<std::uint8_t> intent_chunk_dirty_;
  DirtyMap excl_, cand_;     // lazy clear scratch (writer thread)
  CtxList intent_waiters_;
  CtxList down_waiters_;     // finished, waiting for a failed leg's state to be durable
  std::uint64_t last_ok_seq_ = 0;
  Ctx* done_list_ = nullptr;  // released down_waiters_, completed by the writer outside mu_
  bool dirty_ = false;
  bool clean_dirty_ = false;  // clean flag must be written (0) in the next commit
  int clean_value_ = -1;
  std::uint64_t commits_started_ = 0;
  std::uint64_t commits_done_ = 0;
  bool force_clear_ = false;
  std::uint64_t clear_requests_ = 0, clears_done_ = 0;
  int clear_phase_ = 0;          // 0 idle, 1 flushes in flight
  bool clear_ready_ = false;     // flushes answered: run phase 2
  bool clear_forced_ = false;
  int clear_outstanding_ = 0;
  bool clear_fail_[kMaxLegs] = {};
  IoRequest clear_flush_[kMaxLegs];
  int clear_flush_slot_[kMaxLegs] = {};  // leg of each clear_flush_ request
  std::condition_variable writer_cv_;
  std::condition_variable commit_cv_;
  bool stopping_writer_ = false;
  std::thread writer_;

  // Resync.
  bool window_active_ = false;
  std::uint64_t window_r0_ = 0, window_r1_ = 0;
  CtxList window_waiters_;
  std::condition_variable resync_cv_;
  bool stopping_resync_ = false;
  bool paused_ = false;
  ResyncRate rate_;
  TokenBucket bucket_;
  std::thread resync_;
  std::atomic<std::int64_t> last_app_io_ns_{0};

  // Verify (GUARDED_BY(mu_)); runs on the resync thread.
  VerifyProgress verify_;
  VerifyOptions verify_opts_;
  bool verify_cancel_ = false;
  std::function<void(const VerifyProgress&)> verify_done_cb_;  // ended; on_done to call
  VerifyProgress verify_done_;                                  // ... with this
  std::uint64_t verify_pos_ = 0;       // next region to compare
  std::uint64_t verify_start_ns_ = 0;

  // Stats.
  std::atomic<std::uint64_t> st_writes_{0}, st_reads_{0}, st_flushes_{0}, st_read_retries_{0};
  std::uint64_t st_commits_ = 0;  // non-empty successful store commits
  std::uint64_t st_intent_waits_ = 0, st_commit_failures_ = 0, st_regions_committed_ = 0,
                st_regions_cleared_ = 0, st_pool_waits_ = 0;
  std::uint64_t cps_window_start_commits_ = 0;
  std::int64_t cps_window_start_ns_ = 0;
  double cps_ = 0;
  bool closed_ = false;
  std::atomic<bool> crashed_{false};  // TEST_Crash: nothing completes successfully any more
};

// ---- Init ----

Status MirrorDevice::Impl::Init(const ArrayRecord& rec, std::vector<std::shared_ptr<BlockDevice>> devs,
                                std::shared_ptr<DirtyMapStore> store, const MirrorOptions& opts) {
  id_ = rec.id;
  name_ = rec.name;
  store_ = std::move(store);
  opts_ = opts;
  region_size_ = rec.region_size;
  if (region_size_ < 4096 || (region_size_ & (region_size_ - 1)) != 0)
    return Status::InvalidArgument("mirror: region size must be a power of two >= 4096");
  info_ = DeviceInfo();
  info_.size = rec.size;
  info_.logical_block_size = 512;
  info_.max_io_bytes = UINT32_MAX;
  intent_ = DirtyMap(rec.size, region_size_);
  intent_durable_ = DirtyMap(rec.size, region_size_);
  touched_ = DirtyMap(rec.size, region_size_);
  excl_ = DirtyMap(rec.size, region_size_);
  regions_ = intent_.regions();
  intent_chunk_dirty_.assign(intent_.chunks(), 0);
  window_bytes_ = std::uint64_t{region_size_} * std::max<std::uint32_t>(1, opts.resync.window_regions);
  rate_ = opts.resync.rate;

  // Load the intent map.
  DST_RETURN_IF_ERROR(store_->LoadMap(id_, kIntentMap, &intent_));
  intent_durable_ = intent_;
  // Without an intent map an unclean shutdown leaves every region suspect (full resync).
  if (!rec.clean && !opts.write_intent) intent_.SetAll();
  const bool unclean = !rec.clean && !intent_.Empty();

  int source = -1;
  bool caps_init = false;
  for (const auto& lr : rec.legs) {
    if (lr.slot < 0 || lr.slot >= kMaxLegs) return Status::InvalidArgument("mirror: bad leg slot");
    Leg& L = legs_[lr.slot];
    nslots_ = std::max(nslots_, lr.slot + 1);
    L.generation = lr.generation;
    L.describe = lr.describe;
    L.state = lr.state;
    L.oos = DirtyMap(rec.size, region_size_);
    L.chunk_dirty.assign(L.oos.chunks(), 1);  // rewrite all chunks once at assembly
    L.record_dirty = true;
    L.prog.leg = lr.slot;
    if (lr.state == LegState::kEmpty) continue;
    DST_RETURN_IF_ERROR(store_->LoadMap(id_, lr.slot, &L.oos));
    std::shared_ptr<BlockDevice> dev =
        static_cast<std::size_t>(lr.slot) < devs.size() ? devs[static_cast<std::size_t>(lr.slot)] : nullptr;
    if (L.state == LegState::kDetached) dev = nullptr;  // a snapshot rejoins only via ReAddLeg
    if (!dev) {
      if (L.state != LegState::kDetached) L.state = LegState::kFailed;
      continue;
    }
    DeviceInfo di = dev->Info();
    if (LegDataBytes(di) < rec.size) {
      L.state = LegState::kFailed;  // too small: cannot be a leg of this array
      continue;
    }
    auto h = ReadHeader(*dev);
    if (!h.ok() && !h.status().IsNotFound()) {
      L.state = LegState::kFailed;  // unreadable now: not a reason for a full resync
      continue;
    }
    bool same = h.ok() && h->array_id == id_ && h->generation == lr.generation;
    L.dev = dev;
    L.describe = dev->Describe();
    if (!same) {
      // Foreign, blank or replaced: new identity, full resync.
      L.generation = NewUuid();
      LegHeader nh{id_, L.generation, static_cast<std::uint32_t>(lr.slot), region_size_, rec.size};
      Status ws = WriteHeader(*dev, nh);
      if (!ws.ok()) {
        L.state = LegState::kFailed;
        L.dev.reset();
        continue;
      }
      L.oos.SetAll();
      L.state = LegState::kResyncing;
    } else if (L.state == LegState::kUpToDate && L.oos.Empty()) {
      // fine
    } else {
      L.state = L.oos.Empty() ? LegState::kUpToDate : LegState::kResyncing;
    }
    if (L.state == LegState::kUpToDate && source < 0) source = lr.slot;
    if (!caps_init) {
      info_.can_fua = di.can_fua;
      info_.can_trim = di.can_trim;
      info_.can_write_zeroes = di.can_write_zeroes;
      info_.read_only = di.read_only;
      caps_init = true;
    } else {
      info_.can_fua = info_.can_fua && di.can_fua;
      info_.can_trim = info_.can_trim && di.can_trim;
      info_.can_write_zeroes = info_.can_write_zeroes && di.can_write_zeroes;
      info_.read_only = info_.read_only || di.read_only;
    }
    info_.logical_block_size = std::max(info_.logical_block_size, di.logical_block_size);
    info_.max_io_bytes = std::min(info_.max_io_bytes, di.max_io_bytes);
  }
  if (info_.max_io_bytes == UINT32_MAX) info_.max_io_bytes = 1u << 20;
  info_.size = info_.size / info_.logical_block_size * info_.logical_block_size;
  if (source < 0 && opts.force_assemble) {
    // mdadm --force: accept the first present leg that still carries our identity as the
    // reference.  Writes it missed are lost; the operator asked for it.
    for (int s = 0; s < nslots_ && source < 0; ++s) {
      Leg& L = legs_[s];
      if (L.dev && (L.state == LegState::kResyncing || L.state == LegState::kFailed) &&
          !L.oos.AllSetRegions(0, regions_)) {
        L.state = LegState::kUpToDate;
        L.oos.ClearAll();
        source = s;
      }
    }
  }
  if (source < 0) return Status::Unavailable("mirror " + id_ + ": no up-to-date leg present");
  if (unclean) {
    // The assembling host crashed: regions in the intent map may differ between legs.  Leg
    // `source` is the reference; every other leg gets those regions as out-of-sync bits.
    for (int s = 0; s < nslots_; ++s) {
      Leg& L = legs_[s];
      if (s == source || L.state == LegState::kEmpty) continue;
      L.oos.Merge(intent_);
      if (L.state == LegState::kUpToDate && !L.oos.Empty()) L.state = LegState::kResyncing;
    }
  }
  for (int s = 0; s < nslots_; ++s) {
    Leg& L = legs_[s];
    L.prog.leg = s;
    L.prog.leg_state = L.state;
    if (L.state == LegState::kResyncing) {
      L.prog.state = ResyncState::kPending;
      L.prog.bytes_total = L.oos.DirtyBytes();
    }
  }
  bucket_.SetRate(rate_.ceiling);

  std::size_t n = opts.max_inflight ? opts.max_inflight : 1;
  ctx_.reset(new Ctx[n]);
  for (std::size_t i = 0; i < n; ++i) {
    ctx_[i].self = this;
    ctx_[i].next = free_;
    free_ = &ctx_[i];
  }

  // Persist the assembled state (leg generations/states, merged maps, clean=0) before any I/O.
  dirty_ = true;
  clean_value_ = 0;
  for (std::size_t c = 0; c < intent_chunk_dirty_.size(); ++c) intent_chunk_dirty_[c] = 1;
  if (!CommitOnce()) return Status::IoError("mirror: initial commit failed");
  cps_window_start_ns_ = NowNs();
  writer_ = std::thread([this] { WriterLoop(); });
  resync_ = std::thread([this] { ResyncLoop(); });
  return Status::OK();
}

// ---- Submit ----

void MirrorDevice::Impl::Submit(IoRequest* req) {
  Status st = ValidateRequest(info_, *req);
  if (!st.ok()) {
    req->done(req, st);
    return;
  }
  last_app_io_ns_.store(NowNs(), std::memory_order_relaxed);
  Ctx* c;
  {
    std::lock_guard<std::mutex> l(mu_);
    c = free_;
    if (c) {
      free_ = c->next;
    } else {
      ++st_pool_waits_;
      req->link = nullptr;
      if (pool_wait_tail_)
        pool_wait_tail_->link = req;
      else
        pool_wait_head_ = req;
      pool_wait_tail_ = req;
      return;
    }
  }
  Start(req, c);
}

void MirrorDevice::Impl::Start(IoRequest* req, Ctx* c) {
  c->parent = req;
  c->outstanding.store(0, std::memory_order_relaxed);
  c->ok_count.store(0, std::memory_order_relaxed);
  c->nchild = 0;
  c->tried = 0;
  c->in_flight = false;
  if (req->op == IoOp::kFlush) {
    c->r0 = c->r1 = 0;
    st_flushes_.fetch_add(1, std::memory_order_relaxed);
    StartFlush(c);
    return;
  }
  intent_.RegionsOf(req->offset, req->length, &c->r0, &c->r1);
  if (req->op == IoOp::kRead) {
    st_reads_.fetch_add(1, std::memory_order_relaxed);
    StartRead(c);
  } else {
    st_writes_.fetch_add(1, std::memory_order_relaxed);
    StartWrite(c);
  }
}

void MirrorDevice::Impl::Complete(Ctx* c, Status st) {
  IoRequest* p = c->parent;
  ReleaseCtx(c);
  p->done(p, std::move(st));
}

void MirrorDevice::Impl::ReleaseCtx(Ctx* c) {
  IoRequest* waiting = nullptr;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (pool_wait_head_) {
      waiting = pool_wait_head_;
      pool_wait_head_ = waiting->link;
      if (!pool_wait_head_) pool_wait_tail_ = nullptr;
    } else {
      c->next = free_;
      free_ = c;
    }
  }
  if (waiting) Start(waiting, c);
}

// ---- writes ----

void MirrorDevice::Impl::MarkOosLocked(int slot, std::uint64_t r0, std::uint64_t r1) {
  Leg& L = legs_[slot];
  for (std::uint64_t r = r0; r < r1; ++r) {
    if (L.oos.Set(r)) {
      L.chunk_dirty[DirtyMap::ChunkOf(r)] = 1;
      dirty_ = true;
    }
  }
}

void MirrorDevice::Impl::FailLegLocked(int slot) {
  Leg& L = legs_[slot];
  if (L.state == LegState::kUpToDate || L.state == LegState::kResyncing) {
    L.state = LegState::kFailed;
    L.prog.leg_state = L.state;
    if (L.prog.state == ResyncState::kRunning || L.prog.state == ResyncState::kPending)
      L.prog.state = ResyncState::kFailed;
    MarkLegDownLocked(slot);
    resync_cv_.notify_all();
  }
}

MirrorDevice::Impl::Admit MirrorDevice::Impl::AdmitWriteLocked(Ctx* c) {
  if (window_active_ && c->r0 < window_r1_ && window_r0_ < c->r1) {
    window_waiters_.Push(c);
    return Admit::kQueued;
  }
  if (opts_.write_intent && !intent_durable_.AllSetRegions(c->r0, c->r1)) {
    for (std::uint64_t r = c->r0; r < c->r1; ++r) {
      if (intent_.Set(r)) {
        MarkIntentChunkLocked(r);
        ++st_regions_committed_;
      }
    }
    if (!dirty_) dirty_ = true;  // bits may be pending in a commit in flight; ask for another
    ++st_intent_waits_;
    intent_waiters_.Push(c);
    writer_cv_.notify_one();
    return Admit::kQueued;
  }
  int n = 0;
  bool any_up = false;
  for (int s = 0; s < nslots_; ++s) any_up = any_up || legs_[s].state == LegState::kUpToDate;
  if (!any_up) return Admit::kFail;  // a resyncing leg alone holds no consistent image
  for (int s = 0; s < nslots_; ++s) {
    Leg& L = legs_[s];
    if (L.state == LegState::kUpToDate || L.state == LegState::kResyncing) {
      IoRequest& ch = c->child[n++];
      IoRequest* p = c->parent;
      ch.op = p->op;
      ch.flags = p->flags;
      ch.offset = p->offset;
      ch.length = p->length;
      ch.data = p->data;
      ch.done = &Impl::WriteChildDone;
      ch.ctx = c;
      ch.link = nullptr;
      c->slot_of[n - 1] = s;
      L.pending.fetch_add(1, std::memory_order_relaxed);
    } else if (L.state == LegState::kFailed || L.state == LegState::kDetached) {
      MarkOosLocked(s, c->r0, c->r1);
    }
  }
  if (n == 0) return Admit::kFail;
  if (opts_.write_intent) touched_.SetRegions(c->r0, c->r1);
  c->in_flight = true;
  c->iprev = nullptr;
  c->inext = inflight_head_;
  if (inflight_head_) inflight_head_->iprev = c;
  inflight_head_ = c;
  c->nchild = n;
  c->outstanding.store(n, std::memory_order_release);
  return Admit::kGo;
}

void MirrorDevice::Impl::IssueChildren(Ctx* c) {
  // Copy what we need first: the last child may complete inline and recycle c.
  int n = c->nchild;
  IoRequest* kids[kMaxLegs];
  std::shared_ptr<BlockDevice>* devs[kMaxLegs];
  for (int i = 0; i < n; ++i) {
    kids[i] = &c->child[i];
    devs[i] = &legs_[c->slot_of[i]].dev;
  }
  // Legs are never released while they have pending I/O (RemoveLeg drains), so the device
  // pointers stay valid across the submissions.
  BlockDevice* raw[kMaxLegs];
  for (int i = 0; i < n; ++i) raw[i] = devs[i]->get();
  for (int i = 0; i < n; ++i) raw[i]->Submit(kids[i]);
}

void MirrorDevice::Impl::StartWrite(Ctx* c) {
  Admit a;
  {
    std::lock_guard<std::mutex> l(mu_);
    a = AdmitWriteLocked(c);
  }
  if (a == Admit::kGo)
    IssueChildren(c);
  else if (a == Admit::kFail)
    Complete(c, Status::IoError());
}

void MirrorDevice::Impl::AdmitList(Ctx* list) {
  while (list) {
    Ctx* c = list;
    list = c->next;
    StartWrite(c);
  }
}

void MirrorDevice::Impl::WriteChildDone(IoRequest* child, Status st) {
  Ctx* c = static_cast<Ctx*>(child->ctx);
  Impl* self = c->self;
  int slot = c->SlotOf(child);
  Leg& L = self->legs_[slot];
  if (st.ok()) {
    c->ok_count.fetch_add(1, std::memory_order_relaxed);
    L.last_pos.store(child->offset + child->length, std::memory_order_relaxed);
  } else {
    std::lock_guard<std::mutex> l(self->mu_);
    self->MarkOosLocked(slot, c->r0, c->r1);
    self->FailLegLocked(slot);
  }
  L.pending.fetch_sub(1, std::memory_order_acq_rel);
  if (c->outstanding.fetch_sub(1, std::memory_order_acq_rel) == 1) self->FinishWrite(c);
}

void MirrorDevice::Impl::FinishWrite(Ctx* c) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (c->in_flight) {
      if (c->iprev)
        c->iprev->inext = c->inext;
      else
        inflight_head_ = c->inext;
      if (c->inext) c->inext->iprev = c->iprev;
      c->in_flight = false;
    }
    if (window_active_) resync_cv_.notify_all();
    if (crashed_) c->ok_count.store(0);
    if (!crashed_ && MustWaitDownLocked()) {
      down_waiters_.Push(c);
      writer_cv_.notify_one();
      return;
    }
  }
  Complete(c, c->ok_count.load() > 0 ? Status::OK() : Status::IoError());
}

Status MirrorDevice::Impl::FinalStatusLocked(Ctx* c) const {
  if (c->parent->op == IoOp::kFlush) {
    bool up = false;
    for (int s = 0; s < nslots_; ++s) up = up || legs_[s].state == LegState::kUpToDate;
    return up && c->ok_count.load() > 0 ? Status::OK() : Status::IoError();
  }
  return c->ok_count.load() > 0 ? Status::OK() : Status::IoError();
}

// ---- reads ----

void MirrorDevice::Impl::StartRead(Ctx* c) {
  IoRequest* p = c->parent;
  int best = -1;
  {
    std::lock_guard<std::mutex> l(mu_);
    std::uint32_t best_pending = UINT32_MAX;
    std::uint64_t best_dist = UINT64_MAX;
    for (int s = 0; s < nslots_; ++s) {
      Leg& L = legs_[s];
      if (L.state != LegState::kUpToDate || (c->tried & (1u << s))) continue;
      std::uint32_t pend = L.pending.load(std::memory_order_relaxed);
      std::uint64_t pos = L.last_pos.load(std::memory_order_relaxed);
      std::uint64_t dist = pos > p->offset ? pos - p->offset : p->offset - pos;
      if (pend < best_pending || (pend == best_pending && dist < best_dist)) {
        best = s;
        best_pending = pend;
        best_dist = dist;
      }
    }
    if (best >= 0) legs_[best].pending.fetch_add(1, std::memory_order_relaxed);
  }
  if (best < 0) {
    Complete(c, Status::IoError());
    return;
  }
  c->tried |= 1u << best;
  IoRequest& ch = c->child[0];
  ch.op = IoOp::kRead;
  ch.flags = 0;
  ch.offset = p->offset;
  ch.length = p->length;
  ch.data = p->data;
  ch.done = &Impl::ReadChildDone;
  ch.ctx = c;
  ch.link = nullptr;
  c->slot_of[0] = best;
  legs_[best].dev->Submit(&ch);
}

void MirrorDevice::Impl::ReadChildDone(IoRequest* child, Status st) {
  Ctx* c = static_cast<Ctx*>(child->ctx);
  Impl* self = c->self;
  int slot = c->SlotOf(child);
  Leg& L = self->legs_[slot];
  L.last_pos.store(child->offset + child->length, std::memory_order_relaxed);
  L.pending.fetch_sub(1, std::memory_order_acq_rel);
  if (st.ok()) {
    self->Complete(c, Status::OK());
    return;
  }
  {
    // A read error fails the leg; the region is rewritten by the resync when it comes back.
    std::lock_guard<std::mutex> l(self->mu_);
    self->MarkOosLocked(slot, c->r0, c->r1);
    self->FailLegLocked(slot);
  }
  self->st_read_retries_.fetch_add(1, std::memory_order_relaxed);
  self->StartRead(c);
}

// ---- flush ----

void MirrorDevice::Impl::StartFlush(Ctx* c) {
  int n = 0;
  bool any_up = false;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (int s = 0; s < nslots_; ++s) {
      Leg& L = legs_[s];
      if (L.state != LegState::kUpToDate && L.state != LegState::kResyncing) continue;
      if (L.state == LegState::kUpToDate) any_up = true;
      IoRequest& ch = c->child[n++];
      ch = IoRequest();
      ch.op = IoOp::kFlush;
      ch.done = &Impl::FlushChildDone;
      ch.ctx = c;
      c->slot_of[n - 1] = s;
      L.pending.fetch_add(1, std::memory_order_relaxed);
    }
    c->nchild = n;
    c->outstanding.store(n, std::memory_order_release);
  }
  if (n == 0 || !any_up) {
    if (n == 0) {
      Complete(c, Status::IoError());
      return;
    }
  }
  IssueChildren(c);
}

void MirrorDevice::Impl::FlushChildDone(IoRequest* child, Status st) {
  Ctx* c = static_cast<Ctx*>(child->ctx);
  Impl* self = c->self;
  int slot = c->SlotOf(child);
  Leg& L = self->legs_[slot];
  if (st.ok()) {
    c->ok_count.fetch_add(1, std::memory_order_relaxed);
  } else if (st.code() != Status::Code::kNotSupported) {
    // Acknowledged writes on this leg may not be durable: every region written since the last
    // successful lazy clear (the intent map) may differ.
    std::lock_guard<std::mutex> l(self->mu_);
    if (self->opts_.write_intent) {
      self->intent_.ForEachRun([&](std::uint64_t a, std::uint64_t b) { self->MarkOosLocked(slot, a, b); });
    } else {
      self->MarkOosLocked(slot, 0, self->regions_);
    }
    self->FailLegLocked(slot);
  } else {
    c->ok_count.fetch_add(1, std::memory_order_relaxed);
  }
  L.pending.fetch_sub(1, std::memory_order_acq_rel);
  if (c->outstanding.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    Status fst;
    {
      std::lock_guard<std::mutex> l(self->mu_);
      if (self->crashed_) c->ok_count.store(0);
      if (!self->crashed_ && self->MustWaitDownLocked()) {
        self->down_waiters_.Push(c);
        self->writer_cv_.notify_one();
        return;
      }
      fst = self->FinalStatusLocked(c);
    }
    self->Complete(c, std::move(fst));
  }
}

// ---- writer thread: group commit and lazy clear ----

bool MirrorDevice::Impl::CommitOnce() {
  CommitBatch b;
  b.array_id = id_;
  std::uint64_t seq;
  std::vector<std::uint64_t> intent_chunks;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!dirty_ || crashed_) return false;
    dirty_ = false;
    for (std::size_t ch = 0; ch < intent_chunk_dirty_.size(); ++ch) {
      if (!intent_chunk_dirty_[ch]) continue;
      intent_chunk_dirty_[ch] = 0;
      MapChunk mc;
      mc.map = kIntentMap;
      mc.index = ch;
      intent_.ChunkBytesInto(ch, &mc.bits);
      b.chunks.push_back(std::move(mc));
      intent_chunks.push_back(ch);
    }
    for (int s = 0; s < nslots_; ++s) {
      Leg& L = legs_[s];
      for (std::size_t ch = 0; ch < L.chunk_dirty.size(); ++ch) {
        if (!L.chunk_dirty[ch]) continue;
        L.chunk_dirty[ch] = 0;
        MapChunk mc;
        mc.map = s;
        mc.index = ch;
        L.oos.ChunkBytesInto(ch, &mc.bits);
        b.chunks.push_back(std::move(mc));
      }
      if (L.record_dirty) {
        L.record_dirty = false;
        b.legs.push_back(LegRecord{s, L.generation, L.state, L.describe});
      }
      if (L.checkpoint_dirty) {
        L.checkpoint_dirty = false;
        b.checkpoints.push_back(ResyncCheckpoint{s, L.prog.next_offset, L.prog.bytes_done, L.prog.bytes_total});
      }
    }
    if (clean_value_ >= 0) {
      b.clean = clean_value_;
      clean_value_ = -1;
    }
    seq = ++commits_started_;
  }
  Status st = b.empty() ? Status::OK() : store_->Commit(b);
  Ctx* released = nullptr;
  Ctx* failed = nullptr;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (st.ok()) {
      for (std::size_t i = 0; i < b.chunks.size(); ++i) {
        if (b.chunks[i].map != kIntentMap) continue;
        intent_durable_.LoadChunk(b.chunks[i].index, b.chunks[i].bits, /*replace=*/true);
      }
      commits_done_ = seq;
      last_ok_seq_ = seq;
      if (!b.empty()) ++st_commits_;
      if (!MustWaitDownLocked()) {
        while (Ctx* c = down_waiters_.Pop()) {
          c->next = done_list_;
          done_list_ = c;
        }
      }
      // Release every waiter whose regions are now all durable (FIFO order kept).
      CtxList keep;
      Ctx** tail = &released;
      while (Ctx* c = intent_waiters_.Pop()) {
        if (intent_durable_.AllSetRegions(c->r0, c->r1)) {
          *tail = c;
          c->next = nullptr;
          tail = &c->next;
        } else {
          // Still missing bits (e.g. set after this snapshot): make sure they are wanted.
          for (std::uint64_t r = c->r0; r < c->r1; ++r) {
            if (!intent_durable_.Test(r)) {
              intent_.Set(r);
              MarkIntentChunkLocked(r);  // the chunk goes into the next commit
            }
          }
          keep.Push(c);
        }
      }
      intent_waiters_ = keep;
    } else {
      ++st_commit_failures_;
      // Put everything back so the next commit retries it.
      for (const auto& mc : b.chunks) {
        if (mc.map == kIntentMap)
          intent_chunk_dirty_[mc.index] = 1;
        else
          legs_[mc.map].chunk_dirty[mc.index] = 1;
      }
      for (const auto& lr : b.legs) {
        legs_[lr.slot].record_dirty = true;
        if (legs_[lr.slot].down_seq == seq) legs_[lr.slot].down_seq = seq + 1;
      }
      for (const auto& cp : b.checkpoints) legs_[cp.slot].checkpoint_dirty = true;
      if (b.clean >= 0 && clean_value_ < 0) clean_value_ = b.clean;
      dirty_ = true;
      // Writes waiting for intent bits were not issued anywhere: fail them cleanly.
      Ctx** tail = &failed;
      while (Ctx* c = intent_waiters_.Pop()) {
        *tail = c;
        c->next = nullptr;
        tail = &c->next;
      }
      // Finished writes whose missed leg is not durably marked: their data reached some legs,
      // but we cannot promise it survives a crash -- report EIO rather than a false success.
      while (Ctx* c = down_waiters_.Pop()) {
        *tail = c;
        c->next = nullptr;
        tail = &c->next;
      }
      commits_done_ = seq;  // the attempt is over; waiters of checkpoints re-check state
    }
    commit_cv_.notify_all();
  }
  while (failed) {
    Ctx* c = failed;
    failed = c->next;
    Complete(c, Status::IoError());
  }
  Ctx* finished;
  {
    std::lock_guard<std::mutex> l(mu_);
    finished = done_list_;
    done_list_ = nullptr;
  }
  while (finished) {
    Ctx* c = finished;
    finished = c->next;
    Status fst;
    {
      std::lock_guard<std::mutex> l(mu_);
      fst = FinalStatusLocked(c);
    }
    Complete(c, std::move(fst));
  }
  AdmitList(released);
  if (!st.ok()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  return st.ok();
}

// Lazy clear, phase 1 (writer thread, under mu_): a region may be cleared when every write to
// it completed before the flushes submitted here.  excl_ = regions of writes in flight now, plus
// (normal mode) regions touched in the current epoch, i.e. not quiet for a full period.  The
// flushes run asynchronously so a slow leg never stalls the group commit.
void MirrorDevice::Impl::LazyClearStartLocked(std::unique_lock<std::mutex>& l, bool force) {
  clear_forced_ = force;
  if (!opts_.write_intent || intent_durable_.Empty()) {
    touched_.ClearAll();
    clear_ready_ = true;  // nothing to clear: finish immediately
    clear_phase_ = 1;
    return;
  }
  excl_.ClearAll();
  for (Ctx* c = inflight_head_; c; c = c->inext) excl_.SetRegions(c->r0, c->r1);
  if (force)
    touched_.ClearAll();
  else
    excl_.Merge(touched_);
  int n = 0;
  for (int s = 0; s < nslots_; ++s) {
    Leg& L = legs_[s];
    clear_fail_[s] = false;
    if ((L.state == LegState::kUpToDate || L.state == LegState::kResyncing) && L.dev &&
        L.dev->Info().can_flush) {
      IoRequest& r = clear_flush_[n++];
      r = IoRequest();
      r.op = IoOp::kFlush;
      r.done = &Impl::ClearFlushDone;
      r.ctx = this;
      clear_flush_slot_[n - 1] = s;
      L.pending.fetch_add(1, std::memory_order_relaxed);
    }
  }
  clear_phase_ = 1;
  if (n == 0) {
    clear_ready_ = true;
    return;
  }
  clear_outstanding_ = n;
  l.unlock();
  for (int i = 0; i < n; ++i) legs_[clear_flush_slot_[i]].dev->Submit(&clear_flush_[i]);
  l.lock();
}

void MirrorDevice::Impl::ClearFlushDone(IoRequest* r, Status st) {
  Impl* self = static_cast<Impl*>(r->ctx);
  int s = self->clear_flush_slot_[r - self->clear_flush_];
  std::lock_guard<std::mutex> l(self->mu_);
  self->legs_[s].pending.fetch_sub(1, std::memory_order_acq_rel);
  if (!st.ok() && st.code() != Status::Code::kNotSupported) self->clear_fail_[s] = true;
  if (--self->clear_outstanding_ == 0) {
    self->clear_ready_ = true;
    self->writer_cv_.notify_one();
  }
}

// Phase 2 (writer thread, under mu_), after every flush answered.
void MirrorDevice::Impl::LazyClearFinishLocked() {
  clear_ready_ = false;
  clear_phase_ = 0;
  if (clear_forced_) {
    ++clears_done_;
    dirty_ = true;  // a commit follows, so TEST_LazyClearNow can wait for it
  }
  if (!opts_.write_intent || intent_durable_.Empty()) return;
  for (int s = 0; s < nslots_; ++s) {
    if (!clear_fail_[s]) continue;
    clear_fail_[s] = false;
    // Acknowledged writes on this leg may not be durable: it misses the whole intent map.
    intent_.ForEachRun([&](std::uint64_t a, std::uint64_t b) { MarkOosLocked(s, a, b); });
    FailLegLocked(s);
  }
  // Writes admitted during the flush are in touched_; writes still in flight are excluded too,
  // and so are writes waiting for intent bits (some of their regions may already be durable).
  excl_.Merge(touched_);
  for (Ctx* c = inflight_head_; c; c = c->inext) excl_.SetRegions(c->r0, c->r1);
  for (Ctx* c = intent_waiters_.head; c; c = c->next) excl_.SetRegions(c->r0, c->r1);
  for (Ctx* c = window_waiters_.head; c; c = c->next) excl_.SetRegions(c->r0, c->r1);
  touched_.ClearAll();  // next epoch
  // Start from the durable map: bits wanted but not yet committed are not candidates.
  cand_ = intent_durable_;
  cand_.Subtract(excl_);
  std::uint64_t cleared = 0;
  cand_.ForEachRun([&](std::uint64_t a, std::uint64_t b) {
    for (std::uint64_t r = a; r < b; ++r) {
      intent_.Clear(r);
      intent_durable_.Clear(r);
      MarkIntentChunkLocked(r);
      ++cleared;
    }
  });
  st_regions_cleared_ += cleared;
}

void MirrorDevice::Impl::WriterLoop() {
  auto next_clear = Clock::now() + std::chrono::milliseconds(opts_.quiet_ms);
  auto last_commit = Clock::now();
  std::unique_lock<std::mutex> l(mu_);
  while (true) {
    auto commit_at = last_commit + std::chrono::microseconds(opts_.min_commit_interval_us);
    auto wake = clear_phase_ == 0 ? next_clear : Clock::now() + std::chrono::seconds(1);
    if (dirty_) wake = std::min(wake, commit_at);
    writer_cv_.wait_until(l, wake, [&] {
      auto now = Clock::now();
      return stopping_writer_ || clear_ready_ || (dirty_ && now >= commit_at) ||
             (clear_phase_ == 0 && (force_clear_ || now >= next_clear));
    });
    if (stopping_writer_) break;
    if (clear_ready_) {
      LazyClearFinishLocked();
      next_clear = Clock::now() + std::chrono::milliseconds(opts_.quiet_ms);
    }
    if (clear_phase_ == 0 && (force_clear_ || Clock::now() >= next_clear)) {
      bool forced = force_clear_;
      force_clear_ = false;
      LazyClearStartLocked(l, forced);
      if (clear_ready_) {
        LazyClearFinishLocked();
        next_clear = Clock::now() + std::chrono::milliseconds(opts_.quiet_ms);
      }
    }
    if (dirty_ && Clock::now() >= commit_at) {
      l.unlock();
      CommitOnce();
      last_commit = Clock::now();
      l.lock();
      std::int64_t now = NowNs();
      if (now - cps_window_start_ns_ >= 1000000000) {
        cps_ = static_cast<double>(st_commits_ - cps_window_start_commits_) * 1e9 /
               static_cast<double>(now - cps_window_start_ns_);
        cps_window_start_ns_ = now;
        cps_window_start_commits_ = st_commits_;
      }
    }
  }
}

// ---- resync ----

bool MirrorDevice::Impl::WindowBusyLocked() const {
  for (Ctx* c = inflight_head_; c; c = c->inext)
    if (c->r0 < window_r1_ && window_r0_ < c->r1) return true;
  return false;
}

std::uint64_t MirrorDevice::Impl::CurrentRate() {
  std::int64_t idle_ns = NowNs() - last_app_io_ns_.load(std::memory_order_relaxed);
  std::lock_guard<std::mutex> l(mu_);
  return idle_ns < 100'000'000 ? rate_.floor : rate_.ceiling;
}

void MirrorDevice::Impl::ResyncLoop() {
  while (true) {
    int slot = -1;
    {
      std::unique_lock<std::mutex> l(mu_);
      resync_cv_.wait(l, [&] {
        if (stopping_resync_) return true;
        if (VerifyPendingLocked()) return true;
        if (paused_ || !opts_.resync.autostart) return false;
        for (int s = 0; s < nslots_; ++s)
          if (legs_[s].state == LegState::kResyncing) return true;
        return false;
      });
      if (stopping_resync_) {
        if (VerifyPendingLocked()) EndVerifyLocked(VerifyState::kCancelled, "the array was closed");
        return;
      }
      if (ResyncRunnableLocked())
        for (int s = 0; s < nslots_ && slot < 0; ++s)
          if (legs_[s].state == LegState::kResyncing) slot = s;
    }
    if (slot < 0) {  // no resync to run: a verify is pending (resync first, then verify)
      VerifyRun();
      NotifyVerifyDone();
      continue;
    }
    if (!ResyncLeg(slot)) {
      // No source, paused or failed: wait for a state change.
      std::unique_lock<std::mutex> l(mu_);
      resync_cv_.wait_for(l, std::chrono::milliseconds(100));
    }
  }
}

bool MirrorDevice::Impl::ResyncLeg(int slot) {
  const std::uint32_t max_io = std::min<std::uint32_t>(info_.max_io_bytes, 1u << 20);
  AlignedBuf buf(max_io);
  Leg& T = legs_[slot];
  std::uint64_t prev_seq = 0;
  std::uint64_t pos = 0;  // region index
  const std::uint64_t wr = std::max<std::uint32_t>(1, opts_.resync.window_regions);
  {
    std::lock_guard<std::mutex> l(mu_);
    T.prog.state = ResyncState::kRunning;
    T.prog.bytes_done = 0;
    T.prog.bytes_total = T.oos.DirtyBytes();
    T.prog.next_offset = 0;
    T.pass_start_ns = static_cast<std::uint64_t>(NowNs());
  }
  std::uint64_t runs[64][2];
  while (true) {
    int src = -1;
    std::shared_ptr<BlockDevice> sdev, tdev;
    int nruns = 0;
    std::uint64_t w0 = 0, w1 = 0;
    {
      std::unique_lock<std::mutex> l(mu_);
      if (stopping_resync_ || paused_ || T.state != LegState::kResyncing) {
        if (T.prog.state == ResyncState::kRunning) T.prog.state = paused_ ? ResyncState::kPaused : ResyncState::kPending;
        if (T.state != LegState::kResyncing) T.prog.state = ResyncState::kFailed;
        return false;
      }
      src = SourceLegLocked();
      if (src < 0) {
        T.prog.state = ResyncState::kPending;
        return false;
      }
      std::uint64_t first = T.oos.NextSet(pos);
      if (first >= regions_ && pos > 0) first = T.oos.NextSet(0);  // bits set behind us
      if (first >= regions_) {
        // Done: wait for the last window's commit, then the leg is up to date.
        l.unlock();
        {
          std::unique_lock<std::mutex> l2(mu_);
          dirty_ = true;
          std::uint64_t seq = commits_started_ + 1;
          writer_cv_.notify_one();
          WaitCommittedLocked(l2, seq);
          if (T.state == LegState::kResyncing && T.oos.Empty()) {
            T.state = LegState::kUpToDate;
            T.prog.leg_state = T.state;
            T.prog.state = ResyncState::kDone;
            T.prog.next_offset = info_.size;
            T.record_dirty = true;
            T.checkpoint_dirty = true;
            RequestCommitLocked();
            return true;
          }
        }
        std::lock_guard<std::mutex> l3(mu_);
        continue;
      }
      w0 = first / wr * wr;
      w1 = std::min(regions_, w0 + wr);
      window_active_ = true;
      window_r0_ = w0;
      window_r1_ = w1;
      // Wait for in-flight writes overlapping the window to drain; new ones queue.
      resync_cv_.wait(l, [&] { return !WindowBusyLocked() || stopping_resync_; });
      T.oos.ForEachRun(
          [&](std::uint64_t a, std::uint64_t b) {
            if (nruns < 64) {
              runs[nruns][0] = a;
              runs[nruns][1] = b;
              ++nruns;
            }
          },
          w0, w1);
      sdev = legs_[src].dev;
      tdev = T.dev;
      legs_[src].pending.fetch_add(1);
      T.pending.fetch_add(1);
    }
    // Copy the dirty runs of the window.
    Status err;
    bool src_failed = false;
    std::uint64_t copied = 0;
    for (int i = 0; i < nruns && err.ok(); ++i) {
      std::uint64_t off = runs[i][0] * region_size_;
      std::uint64_t end = std::min(runs[i][1] * region_size_, info_.size);
      while (off < end && err.ok()) {
        std::uint32_t n = static_cast<std::uint32_t>(std::min<std::uint64_t>(end - off, max_io));
        if (crashed_) {
          err = Status::IoError("crashed");
          break;
        }
        std::uint64_t rate = CurrentRate();
        if (bucket_.rate() != rate) bucket_.SetRate(rate);
        auto delay = bucket_.Take(n);
        if (delay.count() > 0) {
          std::unique_lock<std::mutex> l(mu_);
          resync_cv_.wait_for(l, delay, [&] { return stopping_resync_; });
        }
        Status rs = ReadSync(*sdev, off, buf.p, n);
        if (!rs.ok()) {
          err = rs;
          src_failed = true;
          break;
        }
        if (crashed_) {
          err = Status::IoError("crashed");
          break;
        }
        Status ws = WriteSync(*tdev, off, buf.p, n);
        if (!ws.ok()) {
          err = ws;
          break;
        }
        off += n;
        copied += n;
      }
    }
    if (err.ok() && tdev->Info().can_flush) err = FlushSync(*tdev);
    Ctx* release = nullptr;
    std::uint64_t my_seq = 0;
    {
      std::lock_guard<std::mutex> l(mu_);
      legs_[src].pending.fetch_sub(1);
      T.pending.fetch_sub(1);
      if (!err.ok()) {
        if (src_failed) {
          MarkOosLocked(src, w0, w1);
          FailLegLocked(src);
        } else {
          FailLegLocked(slot);
        }
      } else {
        for (int i = 0; i < nruns; ++i)
          for (std::uint64_t r = runs[i][0]; r < runs[i][1]; ++r)
            if (T.oos.Clear(r)) T.chunk_dirty[DirtyMap::ChunkOf(r)] = 1;
        T.prog.bytes_done += copied;
        T.prog.bytes_resynced_total += copied;
        if (T.prog.bytes_done > T.prog.bytes_total) T.prog.bytes_total = T.prog.bytes_done;
        T.prog.next_offset = w1 * region_size_;
        double secs = static_cast<double>(static_cast<std::uint64_t>(NowNs()) - T.pass_start_ns) / 1e9;
        if (secs > 0) {
          T.prog.rate_bytes_per_s = static_cast<std::uint64_t>(static_cast<double>(T.prog.bytes_done) / secs);
          std::uint64_t left = T.oos.DirtyBytes();
          T.prog.eta_seconds = T.prog.rate_bytes_per_s ? static_cast<double>(left) / static_cast<double>(T.prog.rate_bytes_per_s) : -1;
        }
        T.checkpoint_dirty = true;
        dirty_ = true;
        my_seq = commits_started_ + 1;
        writer_cv_.notify_one();
        // A region skipped because nruns overflowed stays set and is found again.
        pos = nruns == 64 ? runs[63][1] : w1;
      }
      release = UnlockWindowLocked();
    }
    AdmitList(release);
    if (!err.ok()) return false;
    // Pipeline depth one: window i's checkpoint must be durable before window i+1 finishes, so
    // a killed resync re-sends at most the remainder plus one window.
    if (prev_seq) {
      std::unique_lock<std::mutex> l(mu_);
      WaitCommittedLocked(l, prev_seq);
    }
    prev_seq = my_seq;
  }
}

// ---- online verify ----
//
// Runs on the resync thread (ResyncLoop calls VerifyRun when no resync can run), so it shares
// the resync window lock and token bucket and never overlaps a resync pass.  See resync.h for
// the state diagram.

namespace {
std::int64_t UnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}
}  // namespace

bool MirrorDevice::Impl::ResyncRunnableLocked() const {
  if (paused_ || !opts_.resync.autostart) return false;
  for (int s = 0; s < nslots_; ++s)
    if (legs_[s].state == LegState::kResyncing) return true;
  return false;
}

Status MirrorDevice::Impl::StartVerifyLocked(const VerifyOptions& o) {
  if (closed_) return Status::Unavailable("mirror " + name_ + " is closed");
  if (VerifyPendingLocked())
    return Status::Busy("a verify is already running (" +
                        std::to_string(static_cast<int>(verify_.Percent())) + "% done)");
  int up = 0;
  for (int s = 0; s < nslots_; ++s) {
    const Leg& L = legs_[s];
    if (L.state == LegState::kResyncing)
      return Status::Busy("leg " + std::to_string(s) + " is resyncing (" +
                          std::to_string(static_cast<int>(L.prog.Percent())) +
                          "% done); verify once the resync has finished");
    up += L.state == LegState::kUpToDate;
  }
  if (up < 2)
    return Status::Unavailable("verify needs two up-to-date legs to compare; this mirror has " +
                               std::to_string(up));
  std::uint64_t run = verify_.run + 1;
  verify_ = VerifyProgress();
  verify_.run = run;
  verify_.state = VerifyState::kRunning;
  verify_.repair = o.repair;
  verify_.region_size = region_size_;
  verify_.bytes_total = info_.size;
  verify_.started_unix_ms = UnixMs();
  verify_opts_ = o;
  verify_cancel_ = false;
  verify_pos_ = 0;
  verify_start_ns_ = static_cast<std::uint64_t>(NowNs());
  resync_cv_.notify_all();
  return Status::OK();
}

void MirrorDevice::Impl::EndVerifyLocked(VerifyState st, std::string why) {
  verify_.state = st;
  verify_.error = std::move(why);
  verify_.waiting_resync = false;
  verify_.eta_seconds = st == VerifyState::kDone ? 0 : -1;
  verify_.finished_unix_ms = UnixMs();
  verify_cancel_ = false;
  // Kept apart from verify_opts_: a new verify may start before NotifyVerifyDone runs.
  verify_done_cb_ = std::move(verify_opts_.on_done);
  verify_opts_.on_done = nullptr;
  verify_done_ = verify_;
  resync_cv_.notify_all();  // WaitVerifyIdle
}

void MirrorDevice::Impl::NotifyVerifyDone() {
  std::function<void(const VerifyProgress&)> cb;
  VerifyProgress p;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!verify_done_cb_) return;
    cb = std::move(verify_done_cb_);
    verify_done_cb_ = nullptr;
    p = std::move(verify_done_);
  }
  if (cb) cb(p);
}

// Records the differing regions of one window (diff[i]: legs differing from the source in
// region w0 + i) and, for a repair, marks them out of sync on those legs.
void MirrorDevice::Impl::VerifyRecordLocked(std::uint64_t w0, const std::uint32_t* diff,
                                            std::uint64_t nreg) {
  std::uint32_t marked = 0;
  for (std::uint64_t i = 0; i < nreg; ++i) {
    if (!diff[i]) continue;
    const std::uint64_t r = w0 + i;
    ++verify_.mismatch_regions;
    verify_.mismatch_bytes += intent_.RegionBytes(r);
    if (verify_.mismatches.size() < VerifyProgress::kMaxListed)
      verify_.mismatches.push_back(VerifyMismatch{r * region_size_, diff[i]});
    if (!verify_opts_.repair) continue;
    for (int s = 0; s < nslots_; ++s) {
      // Only a leg still up to date: a leg failed meanwhile already tracks what it misses.
      if (!(diff[i] & (1u << s)) || legs_[s].state != LegState::kUpToDate) continue;
      MarkOosLocked(s, r, r + 1);
      marked |= 1u << s;
    }
    ++verify_.repaired_regions;
  }
  // The differing legs stop serving reads and get the normal resync from the source leg.
  for (int s = 0; s < nslots_; ++s)
    if (marked & (1u << s)) (void)StartLegResyncLocked(s, /*full=*/false);
}

void MirrorDevice::Impl::VerifyRun() {
  const std::uint32_t max_io = std::min<std::uint32_t>(info_.max_io_bytes, 1u << 20);
  const std::uint64_t wr = std::max<std::uint32_t>(1, opts_.resync.window_regions);
  AlignedBuf src_buf(max_io), cmp_buf(max_io);
  std::vector<std::uint32_t> diff(wr);
  for (;;) {
    std::uint64_t w0, w1;
    bool lock_window;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!VerifyPendingLocked()) return;
      if (stopping_resync_) return EndVerifyLocked(VerifyState::kCancelled, "the array was closed");
      if (verify_cancel_) return EndVerifyLocked(VerifyState::kCancelled, "cancelled by the operator");
      if (verify_pos_ >= regions_) return EndVerifyLocked(VerifyState::kDone, "");
      if (ResyncRunnableLocked()) {  // resync first (e.g. regions a repair marked); then resume
        verify_.waiting_resync = true;
        return;
      }
      verify_.waiting_resync = false;
      w0 = verify_pos_;
      w1 = std::min(regions_, w0 + wr);
      lock_window = !verify_opts_.test_skip_window_lock;
    }
    const std::uint64_t off0 = w0 * region_size_;
    const std::uint64_t off1 = std::min(w1 * region_size_, info_.size);
    // Rate limit before locking: writes to the window never wait for tokens.
    std::uint64_t rate = CurrentRate();
    if (bucket_.rate() != rate) bucket_.SetRate(rate);
    auto delay = bucket_.Take(off1 - off0);
    if (delay.count() > 0) {
      std::unique_lock<std::mutex> l(mu_);
      resync_cv_.wait_for(l, delay, [&] { return stopping_resync_ || verify_cancel_; });
      if (stopping_resync_ || verify_cancel_) continue;
    }
    int slots[kMaxLegs];
    std::shared_ptr<BlockDevice> devs[kMaxLegs];
    int n = 0;
    {
      std::unique_lock<std::mutex> l(mu_);
      if (lock_window) {
        // As ResyncLeg: new writes to the window queue, in-flight ones drain.
        window_active_ = true;
        window_r0_ = w0;
        window_r1_ = w1;
        resync_cv_.wait(l, [&] { return !WindowBusyLocked() || stopping_resync_; });
      }
      // Source first (the resync's source), then every other up-to-date leg.
      const int src = SourceLegLocked();
      for (int k = -1; k < nslots_ && src >= 0; ++k) {
        const int s = k < 0 ? src : k;
        if ((k >= 0 && s == src) || legs_[s].state != LegState::kUpToDate || !legs_[s].dev) continue;
        slots[n] = s;
        devs[n] = legs_[s].dev;
        legs_[s].pending.fetch_add(1);
        ++n;
      }
    }
    std::fill(diff.begin(), diff.end(), 0u);
    std::uint32_t read_failed = 0;
    if (n >= 2) {
      for (std::uint64_t off = off0; off < off1 && !(read_failed & 1u); off += max_io) {
        const std::uint32_t len = static_cast<std::uint32_t>(std::min<std::uint64_t>(off1 - off, max_io));
        if (!ReadSync(*devs[0], off, src_buf.p, len).ok()) {
          read_failed |= 1u;
          break;
        }
        for (int i = 1; i < n; ++i) {
          if (read_failed & (1u << i)) continue;
          if (!ReadSync(*devs[i], off, cmp_buf.p, len).ok()) {
            read_failed |= 1u << i;
            continue;
          }
          if (std::memcmp(src_buf.p, cmp_buf.p, len) == 0) continue;
          // Which regions of this piece differ.
          for (std::uint64_t a = off; a < off + len;) {
            const std::uint64_t r = a / region_size_;
            const std::uint64_t b = std::min<std::uint64_t>((r + 1) * region_size_, off + len);
            if (std::memcmp(src_buf.p + (a - off), cmp_buf.p + (a - off), b - a) != 0)
              diff[r - w0] |= 1u << slots[i];
            a = b;
          }
        }
      }
    }
    Ctx* release = nullptr;
    {
      std::lock_guard<std::mutex> l(mu_);
      for (int i = 0; i < n; ++i) legs_[slots[i]].pending.fetch_sub(1);
      for (int i = 0; i < n; ++i) {
        if (!(read_failed & (1u << i))) continue;
        // As a failed application read: the leg is failed; its window is resynced on re-add.
        ++verify_.read_errors;
        MarkOosLocked(slots[i], w0, w1);
        FailLegLocked(slots[i]);
      }
      if (n < 2) {
        EndVerifyLocked(VerifyState::kFailed,
                        "fewer than two up-to-date legs left to compare (" + std::to_string(n) + ")");
      } else if (!(read_failed & 1u)) {
        // A failed source read leaves the window for another pass with the next source.
        for (int i = 1; i < n; ++i)
          if (read_failed & (1u << i))
            for (auto& d : diff) d &= ~(1u << slots[i]);
        verify_.source_leg = slots[0];
        for (int i = 0; i < n; ++i)
          if (!(read_failed & (1u << i))) verify_.legs_compared |= 1u << slots[i];
        VerifyRecordLocked(w0, diff.data(), w1 - w0);
        verify_pos_ = w1;
        verify_.bytes_done = off1;
      }
      const double secs = static_cast<double>(static_cast<std::uint64_t>(NowNs()) - verify_start_ns_) / 1e9;
      if (secs > 0) {
        verify_.rate_bytes_per_s = static_cast<std::uint64_t>(static_cast<double>(verify_.bytes_done) / secs);
        verify_.eta_seconds =
            verify_.rate_bytes_per_s
                ? static_cast<double>(verify_.bytes_total - verify_.bytes_done) / static_cast<double>(verify_.rate_bytes_per_s)
                : -1;
      }
      if (lock_window) release = UnlockWindowLocked();
    }
    AdmitList(release);
  }
}

Status MirrorDevice::StartVerify(const VerifyOptions& opts) {
  std::lock_guard<std::mutex> l(impl_->mu_);
  return impl_->StartVerifyLocked(opts);
}

Status MirrorDevice::CancelVerify() {
  std::lock_guard<std::mutex> l(impl_->mu_);
  if (!impl_->VerifyPendingLocked()) return Status::NotFound("no verify is running");
  impl_->verify_cancel_ = true;
  impl_->resync_cv_.notify_all();
  return Status::OK();
}

VerifyProgress MirrorDevice::VerifyStatus() const {
  std::lock_guard<std::mutex> l(impl_->mu_);
  return impl_->verify_;
}

bool MirrorDevice::WaitVerifyIdle(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> l(impl_->mu_);
  return impl_->resync_cv_.wait_for(l, timeout, [&] { return !impl_->VerifyPendingLocked(); });
}

// ---- management helpers ----

Status MirrorDevice::Impl::StartLegResyncLocked(int slot, bool full) {
  Leg& L = legs_[slot];
  if (full) {
    L.oos.SetAll();
    std::fill(L.chunk_dirty.begin(), L.chunk_dirty.end(), 1);
  }
  L.state = L.oos.Empty() ? LegState::kUpToDate : LegState::kResyncing;
  L.prog = ResyncProgress();
  L.prog.leg = slot;
  L.prog.leg_state = L.state;
  L.prog.state = L.state == LegState::kResyncing ? ResyncState::kPending : ResyncState::kDone;
  L.prog.bytes_total = L.oos.DirtyBytes();
  L.record_dirty = true;
  RequestCommitLocked();
  resync_cv_.notify_all();
  return Status::OK();
}

void MirrorDevice::Impl::Shutdown(bool orderly) {
  if (crashed_) orderly = false;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (closed_) return;
    closed_ = true;
    stopping_resync_ = true;
    resync_cv_.notify_all();
  }
  if (resync_.joinable()) resync_.join();
  NotifyVerifyDone();  // a verify the stop ended
  if (orderly) {
    // Wait for in-flight writes and waiting writes to finish.
    for (int i = 0; i < 6000; ++i) {
      {
        std::lock_guard<std::mutex> l(mu_);
        if (!inflight_head_ && intent_waiters_.empty() && window_waiters_.empty() &&
            down_waiters_.empty() && clear_outstanding_ == 0)
          break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    std::vector<std::shared_ptr<BlockDevice>> up;
    {
      std::lock_guard<std::mutex> l(mu_);
      for (int s = 0; s < nslots_; ++s)
        if ((legs_[s].state == LegState::kUpToDate || legs_[s].state == LegState::kResyncing) && legs_[s].dev)
          up.push_back(legs_[s].dev);
    }
    bool flushed = true;
    for (auto& d : up)
      if (d->Info().can_flush && !FlushSync(*d).ok()) flushed = false;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (flushed) {
        intent_.ForEachRun([&](std::uint64_t a, std::uint64_t b) {
          for (std::uint64_t r = a; r < b; ++r) MarkIntentChunkLocked(r);
        });
        intent_.ClearAll();
        clean_value_ = 1;
      }
      for (int s = 0; s < nslots_; ++s) legs_[s].record_dirty = true;
      dirty_ = true;
    }
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    stopping_writer_ = true;
    writer_cv_.notify_all();
    commit_cv_.notify_all();
  }
  if (writer_.joinable()) writer_.join();
  if (orderly) {
    // The writer has stopped: the final commit runs here.
    std::lock_guard<std::mutex> l(mu_);
  }
  if (orderly) {
    stopping_writer_ = false;  // let CommitOnce's waiters logic run normally
    CommitOnce();
  }
}

// ---------------------------------------------------------------------------------------------
// Public wrappers.

MirrorDevice::MirrorDevice(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
MirrorDevice::~MirrorDevice() {
  if (impl_) impl_->Shutdown(true);
}

std::uint64_t MirrorDevice::UsableSize(const std::vector<DeviceInfo>& legs) {
  if (legs.empty()) return 0;
  std::uint64_t size = UINT64_MAX;
  std::uint32_t bs = 512;
  for (const auto& i : legs) {
    size = std::min(size, LegDataBytes(i));
    bs = std::max(bs, i.logical_block_size);
  }
  return size / bs * bs;
}

Result<std::shared_ptr<MirrorDevice>> MirrorDevice::Create(std::vector<std::shared_ptr<BlockDevice>> legs,
                                                           std::shared_ptr<DirtyMapStore> store,
                                                           const MirrorOptions& opts,
                                                           std::string array_id) {
  if (legs.size() < 2 || legs.size() > static_cast<std::size_t>(kMaxLegs))
    return Status::InvalidArgument("mirror: needs 2.." + std::to_string(kMaxLegs) + " legs");
  if (!store) return Status::InvalidArgument("mirror: no store");
  std::vector<DeviceInfo> infos;
  for (auto& l : legs) {
    if (!l) return Status::InvalidArgument("mirror: null leg");
    infos.push_back(l->Info());
    if (infos.back().logical_block_size > kLegHeaderBytes)
      return Status::InvalidArgument("mirror: leg block size above 4 KiB");
  }
  std::uint64_t size = UsableSize(infos);
  if (size == 0) return Status::InvalidArgument("mirror: a leg is too small");
  ArrayRecord rec;
  rec.id = array_id.empty() ? NewUuid() : array_id;
  rec.name = opts.name;
  rec.kind = "mirror";
  rec.size = size;
  rec.region_size = opts.region_size;
  rec.clean = true;
  for (std::size_t i = 0; i < legs.size(); ++i) {
    LegRecord lr;
    lr.slot = static_cast<int>(i);
    lr.generation = NewUuid();
    lr.state = (i == 0 || opts.assume_clean) ? LegState::kUpToDate : LegState::kResyncing;
    lr.describe = legs[i]->Describe();
    LegHeader h{rec.id, lr.generation, static_cast<std::uint32_t>(i), opts.region_size, size};
    DST_RETURN_IF_ERROR(WriteHeader(*legs[i], h));
    rec.legs.push_back(lr);
  }
  DST_RETURN_IF_ERROR(store->PutArray(rec));
  if (!opts.assume_clean) {
    // Initial sync: every leg but the first is entirely out of sync.
    DirtyMap all(size, opts.region_size);
    all.SetAll();
    CommitBatch b;
    b.array_id = rec.id;
    for (std::size_t i = 1; i < legs.size(); ++i)
      for (std::uint64_t c = 0; c < all.chunks(); ++c)
        b.chunks.push_back(MapChunk{static_cast<std::int32_t>(i), c, all.ChunkBytes(c)});
    DST_RETURN_IF_ERROR(store->Commit(b));
  }
  return Assemble(rec.id, std::move(legs), std::move(store), opts);
}

Result<std::shared_ptr<MirrorDevice>> MirrorDevice::Assemble(const std::string& array_id,
                                                             std::vector<std::shared_ptr<BlockDevice>> legs,
                                                             std::shared_ptr<DirtyMapStore> store,
                                                             const MirrorOptions& opts) {
  if (!store) return Status::InvalidArgument("mirror: no store");
  auto rec = store->GetArray(array_id);
  if (!rec.ok()) return rec.status();
  if (rec->kind != "mirror") return Status::InvalidArgument("array " + array_id + " is not a mirror");
  auto impl = std::make_unique<Impl>();
  Status s = impl->Init(rec.value(), std::move(legs), std::move(store), opts);
  if (!s.ok()) {
    impl->Shutdown(false);
    return s;
  }
  return std::shared_ptr<MirrorDevice>(new MirrorDevice(std::move(impl)));
}

Status MirrorDevice::Close() {
  impl_->Shutdown(true);
  return Status::OK();
}

void MirrorDevice::TEST_Crash() {
  // Stop everything without joining (a thread may sit in leg I/O that only the test can end);
  // ~Impl joins.  No commit starts after this point.
  {
    std::lock_guard<std::mutex> l(impl_->mu_);
    impl_->crashed_ = true;
    impl_->stopping_resync_ = true;
    impl_->stopping_writer_ = true;
    impl_->resync_cv_.notify_all();
    impl_->writer_cv_.notify_all();
    impl_->commit_cv_.notify_all();
  }
  // The process "died": requests that were never issued to a leg are never acknowledged.  Fail
  // them so the test's submitters are released (in-flight leg I/O still completes normally).
  Impl::Ctx* list = nullptr;
  std::vector<IoRequest*> pool_waiters;
  {
    std::lock_guard<std::mutex> l(impl_->mu_);
    Impl::Ctx** tail = &list;
    for (Impl::CtxList* q : {&impl_->intent_waiters_, &impl_->window_waiters_, &impl_->down_waiters_}) {
      while (Impl::Ctx* c = q->Pop()) {
        *tail = c;
        c->next = nullptr;
        tail = &c->next;
      }
    }
    for (IoRequest* r = impl_->pool_wait_head_; r; r = r->link) pool_waiters.push_back(r);
    impl_->pool_wait_head_ = impl_->pool_wait_tail_ = nullptr;
  }
  while (list) {
    Impl::Ctx* c = list;
    list = c->next;
    impl_->Complete(c, Status::IoError("crashed"));
  }
  for (IoRequest* r : pool_waiters) r->done(r, Status::IoError("crashed"));
}

DeviceInfo MirrorDevice::Info() const { return impl_->info_; }
void MirrorDevice::Submit(IoRequest* req) { impl_->Submit(req); }
const std::string& MirrorDevice::id() const { return impl_->id_; }

std::string MirrorDevice::Describe() const {
  std::lock_guard<std::mutex> l(impl_->mu_);
  std::string s = "mirror";
  if (!impl_->name_.empty()) s += " " + impl_->name_;
  s += "(";
  bool first = true;
  for (int i = 0; i < impl_->nslots_; ++i) {
    const auto& L = impl_->legs_[i];
    if (L.state == LegState::kEmpty) continue;
    if (!first) s += ", ";
    first = false;
    s += L.describe + " [" + LegStateName(L.state) + "]";
  }
  return s + ")";
}

Status MirrorDevice::FailLeg(int slot) {
  std::lock_guard<std::mutex> l(impl_->mu_);
  if (slot < 0 || slot >= impl_->nslots_ || impl_->legs_[slot].state == LegState::kEmpty)
    return Status::NotFound("no leg in slot " + std::to_string(slot));
  impl_->FailLegLocked(slot);
  return Status::OK();
}

Status MirrorDevice::DetachLeg(int slot) {
  std::shared_ptr<BlockDevice> dev;
  {
    std::lock_guard<std::mutex> l(impl_->mu_);
    if (slot < 0 || slot >= impl_->nslots_ || impl_->legs_[slot].state == LegState::kEmpty)
      return Status::NotFound("no leg in slot " + std::to_string(slot));
    auto& L = impl_->legs_[slot];
    if (L.state != LegState::kUpToDate) return Status::Busy("only an up-to-date leg can be detached");
    int up = 0;
    for (int s = 0; s < impl_->nslots_; ++s) up += impl_->legs_[s].state == LegState::kUpToDate;
    if (up < 2) return Status::Busy("cannot detach the last up-to-date leg");
    L.state = LegState::kDetached;
    L.prog.leg_state = L.state;
    impl_->MarkLegDownLocked(slot);
    dev = L.dev;
  }
  // Writes issued before the detach may still land; wait for them, then flush: the leg is a
  // crash-consistent point-in-time image from here on.
  while (impl_->legs_[slot].pending.load() != 0) std::this_thread::sleep_for(std::chrono::microseconds(200));
  if (dev && dev->Info().can_flush) return FlushSync(*dev);
  return Status::OK();
}

Result<int> MirrorDevice::AddLeg(std::shared_ptr<BlockDevice> dev) {
  if (!dev) return Status::InvalidArgument("null leg");
  if (LegDataBytes(dev->Info()) < impl_->info_.size)
    return Status::InvalidArgument("leg " + dev->Describe() + " is smaller than the mirror");
  int slot = -1;
  {
    std::lock_guard<std::mutex> l(impl_->mu_);
    for (int s = 0; s < kMaxLegs && slot < 0; ++s)
      if (s >= impl_->nslots_ || impl_->legs_[s].state == LegState::kEmpty) slot = s;
    if (slot < 0) return Status::NoSpace("mirror: all leg slots used");
    // Reserve the slot as failed while the header is written.
    auto& L = impl_->legs_[slot];
    L.oos = DirtyMap(impl_->info_.size, impl_->region_size_);
    L.chunk_dirty.assign(L.oos.chunks(), 0);
    L.state = LegState::kFailed;
    L.generation = NewUuid();
    L.describe = dev->Describe();
    impl_->nslots_ = std::max(impl_->nslots_, slot + 1);
  }
  LegHeader h{impl_->id_, impl_->legs_[slot].generation, static_cast<std::uint32_t>(slot),
              impl_->region_size_, impl_->info_.size};
  Status s = WriteHeader(*dev, h);
  std::lock_guard<std::mutex> l(impl_->mu_);
  auto& L = impl_->legs_[slot];
  if (!s.ok()) {
    L.state = LegState::kEmpty;
    return s;
  }
  L.dev = std::move(dev);
  (void)impl_->StartLegResyncLocked(slot, /*full=*/true);
  return slot;
}

Status MirrorDevice::ReAddLeg(int slot, std::shared_ptr<BlockDevice> dev) {
  if (!dev) return Status::InvalidArgument("null leg");
  std::string gen;
  {
    std::lock_guard<std::mutex> l(impl_->mu_);
    if (slot < 0 || slot >= impl_->nslots_ || impl_->legs_[slot].state == LegState::kEmpty)
      return Status::NotFound("no leg in slot " + std::to_string(slot));
    auto& L = impl_->legs_[slot];
    if (L.state != LegState::kFailed && L.state != LegState::kDetached)
      return Status::Busy("leg " + std::to_string(slot) + " is " + LegStateName(L.state));
    if (L.pending.load() != 0) return Status::Busy("leg still has I/O in flight");
    gen = L.generation;
  }
  if (LegDataBytes(dev->Info()) < impl_->info_.size)
    return Status::InvalidArgument("leg " + dev->Describe() + " is smaller than the mirror");
  auto h = ReadHeader(*dev);
  if (!h.ok() && !h.status().IsNotFound()) return h.status();
  bool same = h.ok() && h->array_id == impl_->id_ && h->generation == gen;
  std::string new_gen;
  if (!same) {
    new_gen = NewUuid();
    LegHeader nh{impl_->id_, new_gen, static_cast<std::uint32_t>(slot), impl_->region_size_, impl_->info_.size};
    DST_RETURN_IF_ERROR(WriteHeader(*dev, nh));
  }
  std::lock_guard<std::mutex> l(impl_->mu_);
  auto& L = impl_->legs_[slot];
  if (!same) L.generation = new_gen;
  L.dev = std::move(dev);
  L.describe = L.dev->Describe();
  return impl_->StartLegResyncLocked(slot, /*full=*/!same);
}

Status MirrorDevice::RemoveLeg(int slot) {
  std::shared_ptr<BlockDevice> dev;
  {
    std::lock_guard<std::mutex> l(impl_->mu_);
    if (slot < 0 || slot >= impl_->nslots_ || impl_->legs_[slot].state == LegState::kEmpty)
      return Status::NotFound("no leg in slot " + std::to_string(slot));
    auto& L = impl_->legs_[slot];
    if (L.state == LegState::kUpToDate) {
      int up = 0;
      for (int s = 0; s < impl_->nslots_; ++s) up += impl_->legs_[s].state == LegState::kUpToDate;
      if (up < 2) return Status::Busy("cannot remove the last up-to-date leg");
    }
    L.state = LegState::kEmpty;
    L.prog = ResyncProgress();
    L.prog.leg = slot;
    L.prog.leg_state = L.state;
    impl_->MarkLegDownLocked(slot);
    L.oos.ClearAll();
    std::fill(L.chunk_dirty.begin(), L.chunk_dirty.end(), 1);
    impl_->RequestCommitLocked();
  }
  while (impl_->legs_[slot].pending.load() != 0) std::this_thread::sleep_for(std::chrono::microseconds(200));
  std::lock_guard<std::mutex> l(impl_->mu_);
  impl_->legs_[slot].dev.reset();
  return Status::OK();
}

std::vector<LegStatus> MirrorDevice::Legs() const {
  std::lock_guard<std::mutex> l(impl_->mu_);
  std::vector<LegStatus> v;
  for (int s = 0; s < impl_->nslots_; ++s) {
    const auto& L = impl_->legs_[s];
    if (L.state == LegState::kEmpty) continue;
    LegStatus ls;
    ls.slot = s;
    ls.state = L.state;
    ls.generation = L.generation;
    ls.describe = L.describe;
    ls.out_of_sync_bytes = L.oos.DirtyBytes();
    ls.pending = L.pending.load();
    v.push_back(std::move(ls));
  }
  return v;
}

Status MirrorDevice::VisitOutOfSync(int slot, std::uint64_t offset, std::uint64_t length,
                                    OosRunSink sink, void* arg) const {
  std::lock_guard<std::mutex> l(impl_->mu_);
  if (slot < 0 || slot >= impl_->nslots_)
    return Status::InvalidArgument("leg slot " + std::to_string(slot) + " does not exist");
  const auto& L = impl_->legs_[slot];
  if (L.state == LegState::kEmpty)
    return Status::NotFound("leg slot " + std::to_string(slot) + " is empty");
  const std::uint64_t size = impl_->info_.size;
  if (offset > size) return Status::InvalidArgument("offset past the end of the array");
  const std::uint64_t end = offset + std::min(length, size - offset);
  const std::uint64_t rs = impl_->region_size_;
  const DirtyMap& m = L.oos;
  std::uint64_t pos = offset;
  while (pos < end) {
    const std::uint64_t r = pos / rs;
    const bool dirty = r < m.regions() && m.Test(r);
    std::uint64_t next_r = dirty ? m.NextClear(r) : m.NextSet(r);
    std::uint64_t run_end = next_r >= m.regions() ? end : std::min(end, next_r * rs);
    if (run_end <= pos) run_end = end;  // defensive: never loop without progress
    if (!sink(arg, run_end - pos, dirty)) break;
    pos = run_end;
  }
  return Status::OK();
}

std::vector<ResyncProgress> MirrorDevice::Progress() const {
  std::lock_guard<std::mutex> l(impl_->mu_);
  std::vector<ResyncProgress> v;
  for (int s = 0; s < impl_->nslots_; ++s) {
    const auto& L = impl_->legs_[s];
    if (L.state == LegState::kEmpty) continue;
    ResyncProgress p = L.prog;
    p.leg = s;
    p.leg_state = L.state;
    v.push_back(p);
  }
  return v;
}

void MirrorDevice::SetResyncRate(const ResyncRate& rate) {
  std::lock_guard<std::mutex> l(impl_->mu_);
  impl_->rate_ = rate;
  impl_->resync_cv_.notify_all();
}

ResyncRate MirrorDevice::resync_rate() const {
  std::lock_guard<std::mutex> l(impl_->mu_);
  return impl_->rate_;
}

void MirrorDevice::PauseResync(bool paused) {
  std::lock_guard<std::mutex> l(impl_->mu_);
  impl_->paused_ = paused;
  impl_->resync_cv_.notify_all();
}

bool MirrorDevice::WaitResyncIdle(std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    {
      std::lock_guard<std::mutex> l(impl_->mu_);
      bool busy = false;
      for (int s = 0; s < impl_->nslots_; ++s)
        if (impl_->legs_[s].state == LegState::kResyncing) busy = true;
      if (!busy) return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return false;
}

MirrorStats MirrorDevice::Stats() const {
  std::lock_guard<std::mutex> l(impl_->mu_);
  MirrorStats s;
  s.writes = impl_->st_writes_.load();
  s.reads = impl_->st_reads_.load();
  s.flushes = impl_->st_flushes_.load();
  s.read_retries = impl_->st_read_retries_.load();
  s.intent_waits = impl_->st_intent_waits_;
  s.commits = impl_->st_commits_;
  s.commit_failures = impl_->st_commit_failures_;
  s.regions_committed = impl_->st_regions_committed_;
  s.regions_cleared = impl_->st_regions_cleared_;
  s.intent_regions = impl_->intent_.Count();
  s.commits_per_second = impl_->cps_;
  std::int64_t idle_ns = NowNs() - impl_->cps_window_start_ns_;
  if (idle_ns > 2000000000)  // no commit for a while: average over the quiet time instead
    s.commits_per_second = static_cast<double>(impl_->st_commits_ - impl_->cps_window_start_commits_) *
                           1e9 / static_cast<double>(idle_ns);
  s.pool_waits = impl_->st_pool_waits_;
  return s;
}

std::uint64_t MirrorDevice::TEST_IntentCount() const {
  std::lock_guard<std::mutex> l(impl_->mu_);
  return impl_->intent_.Count();
}

void MirrorDevice::TEST_LazyClearNow() {
  std::unique_lock<std::mutex> l(impl_->mu_);
  std::uint64_t want = impl_->clears_done_ + 1;
  impl_->force_clear_ = true;
  impl_->writer_cv_.notify_one();
  impl_->commit_cv_.wait(l, [&] { return impl_->clears_done_ >= want && !impl_->dirty_; });
}

void MirrorDevice::TEST_WaitCommitted() {
  std::unique_lock<std::mutex> l(impl_->mu_);
  if (!impl_->dirty_) {
    // A commit may be in flight; wait for it.
    std::uint64_t seq = impl_->commits_started_;
    impl_->WaitCommittedLocked(l, seq);
    return;
  }
  std::uint64_t seq = impl_->commits_started_ + 1;
  impl_->writer_cv_.notify_one();
  impl_->WaitCommittedLocked(l, seq);
}

}  // namespace dst

namespace dst {
std::string MirrorDevice::TEST_DebugState() const {
  std::lock_guard<std::mutex> l(impl_->mu_);
  auto count = [](const Impl::CtxList& q) {
    int n = 0;
    for (auto* c = q.head; c; c = c->next) ++n;
    return n;
  };
  int inflight = 0;
  for (auto* c = impl_->inflight_head_; c; c = c->inext) ++inflight;
  std::string s = "intent_waiters=" + std::to_string(count(impl_->intent_waiters_)) +
                  " window_waiters=" + std::to_string(count(impl_->window_waiters_)) +
                  " down_waiters=" + std::to_string(count(impl_->down_waiters_)) +
                  " inflight=" + std::to_string(inflight) + " dirty=" + std::to_string(impl_->dirty_) +
                  " started=" + std::to_string(impl_->commits_started_) +
                  " done=" + std::to_string(impl_->commits_done_) +
                  " last_ok=" + std::to_string(impl_->last_ok_seq_) +
                  " clear_phase=" + std::to_string(impl_->clear_phase_) +
                  " window_active=" + std::to_string(impl_->window_active_);
  for (int i = 0; i < impl_->nslots_; ++i)
    s += " leg" + std::to_string(i) + "=" + LegStateName(impl_->legs_[i].state) + "/down_seq=" +
         std::to_string(impl_->legs_[i].down_seq) + "/pending=" + std::to_string(impl_->legs_[i].pending.load());
  return s;
}
}  // namespace dst
