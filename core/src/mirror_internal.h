// Private to the MirrorDevice sources (mirror_*.cc): the implementation class and the leg
// header helpers they share.  See mirror_device.h for the state diagrams and invariants.
//
// Files by concern: mirror_header.cc (leg header, generations, claims, connect checks),
// mirror_io.cc (read/write/flush path), mirror_intent.cc (writer thread: intent log, group
// commit, lazy clear, out-of-sync maps), mirror_resync.cc (resync and online verify),
// mirror_admin.cc (construction, assembly, leg administration, state, shutdown).
//
// Locking: one mutex (mu_) guards leg states, maps, wait lists and the in-flight list.  Nothing
// is submitted to a leg and no parent is completed while holding it (a completion may run
// inline and re-enter).  store_->Commit() and resync I/O run outside it.
#ifndef DST_CORE_SRC_MIRROR_INTERNAL_H_
#define DST_CORE_SRC_MIRROR_INTERNAL_H_

#include "dst/mirror_device.h"

#include "dst/token_bucket.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace dst {
namespace mirror_internal {

using Clock = std::chrono::steady_clock;

inline std::int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

struct LegHeader {
  std::string array_id;
  std::string generation;
  std::uint32_t slot = 0;
  std::uint32_t region_size = 0;
  std::uint64_t array_size = 0;
  std::vector<std::string> history;  // newest first
  std::string owner_id, owner_name;
  std::uint64_t lease_expiry_ms = 0;
  // Array epoch: bumped at every rotation and written on the legs up at that moment, so the
  // legs holding the highest epoch were in sync last (used by Import).  clean: written by a
  // clean close (released, flushed, intent map empty).
  std::uint64_t epoch = 0;
  std::uint32_t clean = 0;
};

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
std::uint64_t LegDataBytes(const DeviceInfo& i);

std::uint64_t WallMs();

Status WriteHeader(BlockDevice& dev, const LegHeader& h);

// NotFound when the bytes carry no dst header (blank or foreign device).
Result<LegHeader> ParseHeader(const char* p, std::size_t n);

Result<LegHeader> ReadHeader(BlockDevice& dev);

// What a slot expects to find on its leg's header.
struct Expect {
  std::string array_id;
  int slot = 0;
  std::string generation;
  std::vector<std::string> history;  // this slot's earlier generations, newest first
  std::string host_id;               // "" = no claims
};

std::string ClaimText(const LegHeader& h);

// Judges a header against the slot's expectation.  `running`: the leg is in service, so any
// other owner (live lease or not) means another host wrote to it; at attach only a live lease
// of another host refuses.  kNone: the leg is ours and at our generation.
LegReason Judge(Result<LegHeader>& h, const Expect& e, bool running, std::string* why);

}  // namespace mirror_internal

using mirror_internal::AlignedBuf;
using mirror_internal::Clock;
using mirror_internal::Expect;
using mirror_internal::LegHeader;

// ---------------------------------------------------------------------------------------------

class MirrorDevice::Impl {
 public:
  struct Ctx {
    Impl* self = nullptr;
    IoRequest* parent = nullptr;
    std::uint64_t r0 = 0, r1 = 0;  // covering regions [r0, r1)
    std::atomic<int> outstanding{0};
    // Successful children that count for the caller: only those on legs that were up to date
    // when the request was admitted (up_mask).  A resyncing leg holds no whole image, so a write
    // or flush that reached only resyncing legs is not durable anywhere a read could use.
    std::atomic<int> ok_count{0};
    std::uint32_t up_mask = 0;              // write/flush: slots up to date at admission
    std::atomic<std::uint32_t> ok_mask{0};    // slots whose child succeeded
    std::atomic<std::uint32_t> done_mask{0};  // slots whose child completed (set after ok_mask)
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
    // Identity (see "identity" below).  reason/history/owner under mu_.
    LegReason reason = LegReason::kNone;
    std::string reason_text;
    std::vector<std::string> history;
    std::string owner_id, owner_name;
    std::uint64_t lease_expiry_ms = 0;
    bool reinit = false;  // blank replacement: the identity thread gives it a new header
    std::string identity_event;  // last identity finding, kept after recovery (for detail)
    std::uint32_t identity_events = 0;
    struct CheckArg {
      Impl* self = nullptr;
      int slot = 0;
    } check_arg;
    BlockDevice* check_dev = nullptr;          // device the ConnectCheck is installed on
    std::atomic<std::uint32_t> connects{0};    // connections seen by the check
    std::atomic<bool> strict{false};           // false while attaching: count, accept
    std::atomic<int> check_reason{0};          // verify -> rejected hand-over
    std::string check_text;                    // under ident_mu_
    std::atomic<std::int64_t> lease_ns{INT64_MAX};  // our claim known valid until (steady ns)
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
  void FailLegLocked(int slot, LegReason why = LegReason::kIoError, std::string text = {});
  // True when `slot` is the only up-to-date leg.  Its failure leaves no source to rewrite
  // anything from, so it is not marked out of sync for I/O that failed on it (a failed read,
  // a resync source read, a write or flush the caller is not acknowledged): marks would make
  // it wait for a resync that has no source when it comes back, and the array would stay
  // failed.  Unmarked, it returns up to date: it holds every acknowledged write.
  bool LastUpLocked(int slot) const {
    if (legs_[slot].state != LegState::kUpToDate) return false;
    for (int s = 0; s < nslots_; ++s)
      if (s != slot && legs_[s].state == LegState::kUpToDate) return false;
    return true;
  }
  // A write or flush child failed on `slot`: may the request still be acknowledged through
  // another leg that was up to date at admission (it succeeded, or has not answered yet)?
  static bool OthersMayAck(const Ctx* c, int slot) {
    const std::uint32_t others = c->up_mask & ~(1u << slot);
    const std::uint32_t done = c->done_mask.load(std::memory_order_acquire);
    return (others & ~done) != 0 || (others & c->ok_mask.load(std::memory_order_acquire)) != 0;
  }
  // The child on `slot` finished: counts it (ok: toward the acknowledgement if its leg was up
  // to date at admission).  Call before the failure handling of the same child.
  static void NoteChild(Ctx* c, int slot, bool ok) {
    const std::uint32_t bit = 1u << slot;
    if (ok) {
      if (c->up_mask & bit) c->ok_count.fetch_add(1, std::memory_order_relaxed);
      c->ok_mask.fetch_or(bit, std::memory_order_release);
    }
    c->done_mask.fetch_or(bit, std::memory_order_release);
  }
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

  // ---- identity: headers, connect checks, claims, generations ----
  bool claims() const { return !opts_.host_id.empty(); }
  Expect ExpectOf(int slot);
  void PublishExpectLocked(int slot);  // mu_ held; copies the slot's identity for verify()
  LegHeader HeaderForLocked(int slot, bool claim) const;
  // Old generation into the history; `continues`: the data carries on (a rotation), else it
  // was discarded (re-initialisation).
  void NewGenerationLocked(int slot, bool continues = false);
  void InstallCheck(int slot, BlockDevice* dev);  // attaching mode until L.strict
  void RemoveCheck(int slot);
  static Status VerifyCb(void* arg, const char* data, std::uint32_t len);
  static void RejectedCb(void* arg, const Status& why);
  void SetReasonLocked(int slot, LegReason r, std::string text);
  // Every leg state change after assembly goes through here (the listener sees it).
  void SetLegStateLocked(int slot, LegState s);
  void NotifyLegLocked(int slot, LegState from, LegReason reason_from);
  MirrorDevice::LegListener leg_listener_;  // GUARDED_BY(mu_)
  void NoteOwner(int slot, const LegHeader& h);  // the claim as last seen/written
  // Attach-time judgement of `dev` for `slot` (reads the header).
  LegReason JudgeAttach(int slot, BlockDevice& dev, std::string* why);
  void IdentityLoop();
  void CheckAndRenew();
  void ReinitLegs();
  void WriteRotatedHeaders(std::uint32_t mask);
  void ReleaseClaims();
  void AdmitLeaseWaiters();

  std::mutex ident_mu_;     // exp_: read by verify() on device threads; never held across I/O
  Expect exp_[kMaxLegs];
  std::mutex hdr_mu_;       // serialises header writes; taken before mu_, never under it
  std::condition_variable ident_cv_;
  bool stopping_ident_ = false;
  bool ident_kick_ = false;
  std::thread ident_;
  // Our claim on slot s is known valid until legs_[s].lease_ns (claims only).
  void NoteLease(int slot, std::int64_t t0) {
    if (claims()) legs_[slot].lease_ns.store(t0 + static_cast<std::int64_t>(opts_.lease_ms) * 1000000);
  }
  CtxList lease_waiters_;
  bool rotate_pending_ = false;   // the up-to-date set shrank: new generations before acks
  std::uint32_t hdr_rewrite_ = 0; // slots whose rotated header is written after the commit
  std::uint64_t array_size_ = 0;
  std::uint64_t epoch_ = 0;       // highest header epoch seen; bumped by every rotation
  bool closed_clean_ = false;     // Shutdown flushed and cleared the intent map

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

}  // namespace dst

#endif  // DST_CORE_SRC_MIRROR_INTERNAL_H_
