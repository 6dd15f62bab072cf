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
#include <ctime>
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

const char* LegReasonName(LegReason r) {
  switch (r) {
    case LegReason::kNone: return "none";
    case LegReason::kIoError: return "io-error";
    case LegReason::kUnreachable: return "unreachable";
    case LegReason::kOperator: return "operator";
    case LegReason::kBlank: return "blank";
    case LegReason::kForeign: return "foreign";
    case LegReason::kOlderGeneration: return "older-generation";
    case LegReason::kDiverged: return "split-brain";
    case LegReason::kClaimed: return "claimed";
  }
  return "unknown";
}

bool LegReasonNeedsOperator(LegReason r) {
  return r == LegReason::kForeign || r == LegReason::kOlderGeneration || r == LegReason::kDiverged ||
         r == LegReason::kClaimed;
}

namespace {

using Clock = std::chrono::steady_clock;

std::int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

// ---- Leg header (last 4 KiB-aligned block of every leg) ----
// Layout (little endian): 0 magic, 8 version, 12 slot, 16 region size, 24 array size,
// 32 lease expiry (unix ms, v2), 40 epoch (v2), 48 clean flag (v2), 64 array UUID, 128 generation, 192 history[4] (64 each, v2),
// 448 owner host id (v2), 512 owner host name (128, v2).  v1 headers (no history, no claim)
// are read as unclaimed; every write is v2.
constexpr char kHeaderMagic[8] = {'D', 'S', 'T', 'L', 'E', 'G', 'H', '1'};
constexpr std::uint32_t kHeaderVersion = 2;
constexpr int kHistory = 4;

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

std::uint64_t WallMs() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

std::string Field(const char* p, std::size_t n) { return std::string(p, strnlen(p, n)); }

void PutField(char* p, std::size_t n, const std::string& v) {
  std::memcpy(p, v.data(), std::min(v.size(), n - 1));
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
  Put64(b.p + 32, h.lease_expiry_ms);
  Put64(b.p + 40, h.epoch);
  Put32(b.p + 48, h.clean);
  PutField(b.p + 64, 64, h.array_id);
  PutField(b.p + 128, 64, h.generation);
  for (int i = 0; i < kHistory && i < static_cast<int>(h.history.size()); ++i)
    PutField(b.p + 192 + 64 * i, 64, h.history[static_cast<std::size_t>(i)]);
  PutField(b.p + 448, 64, h.owner_id);
  PutField(b.p + 512, 128, h.owner_name);
  Status s = WriteSync(dev, data, b.p, MirrorDevice::kLegHeaderBytes, kIoFua);
  if (!s.ok()) return s.WithContext("write leg header on " + dev.Describe());
  if (!info.can_fua && info.can_flush) return FlushSync(dev);
  return Status::OK();
}

// NotFound when the bytes carry no dst header (blank or foreign device).
Result<LegHeader> ParseHeader(const char* p, std::size_t n) {
  if (n < MirrorDevice::kLegHeaderBytes || std::memcmp(p, kHeaderMagic, 8) != 0)
    return Status::NotFound("no dst leg header");
  std::uint32_t ver = Get32(p + 8);
  if (ver != 1 && ver != 2) return Status::NotFound("unknown dst leg header version");
  LegHeader h;
  h.slot = Get32(p + 12);
  h.region_size = Get32(p + 16);
  h.array_size = Get64(p + 24);
  h.array_id = Field(p + 64, 64);
  h.generation = Field(p + 128, 64);
  if (ver >= 2) {
    h.lease_expiry_ms = Get64(p + 32);
    h.epoch = Get64(p + 40);
    h.clean = Get32(p + 48);
    for (int i = 0; i < kHistory; ++i) {
      std::string g = Field(p + 192 + 64 * i, 64);
      if (!g.empty()) h.history.push_back(std::move(g));
    }
    h.owner_id = Field(p + 448, 64);
    h.owner_name = Field(p + 512, 128);
  }
  return h;
}

Result<LegHeader> ReadHeader(BlockDevice& dev) {
  DeviceInfo info = dev.Info();
  std::uint64_t data = LegDataBytes(info);
  if (data == 0) return Status::InvalidArgument("leg too small: " + dev.Describe());
  AlignedBuf b(MirrorDevice::kLegHeaderBytes);
  Status s = ReadSync(dev, data, b.p, MirrorDevice::kLegHeaderBytes);
  if (!s.ok()) return s.WithContext("read leg header on " + dev.Describe());
  auto h = ParseHeader(b.p, b.size);
  if (!h.ok() && h.status().IsNotFound()) return Status::NotFound("no dst leg header on " + dev.Describe());
  return h;
}

// What a slot expects to find on its leg's header.
struct Expect {
  std::string array_id;
  int slot = 0;
  std::string generation;
  std::vector<std::string> history;  // this slot's earlier generations, newest first
  std::string host_id;               // "" = no claims
};

// History entries of generations whose data was discarded (a blank or foreign leg started
// over) carry a '!' prefix: only a generation the data continued from may still be on the
// header after a rotation that did not reach it.
std::string Bare(const std::string& g) { return !g.empty() && g[0] == '!' ? g.substr(1) : g; }

bool Contains(const std::vector<std::string>& v, const std::string& x) {
  if (x.empty()) return false;
  for (const auto& g : v)
    if (Bare(g) == x) return true;
  return false;
}

std::string ClaimText(const LegHeader& h) {
  std::time_t t = static_cast<std::time_t>(h.lease_expiry_ms / 1000);
  char when[64] = "?";
  struct tm tmv;
  if (gmtime_r(&t, &tmv)) std::strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S UTC", &tmv);
  return "claimed by host " + (h.owner_name.empty() ? std::string("?") : h.owner_name) + " (id " +
         h.owner_id + ") until " + when + "; it is in use by array " + h.array_id;
}

// Judges a header against the slot's expectation.  `running`: the leg is in service, so any
// other owner (live lease or not) means another host wrote to it; at attach only a live lease
// of another host refuses.  kNone: the leg is ours and at our generation.
LegReason Judge(Result<LegHeader>& h, const Expect& e, bool running, std::string* why) {
  if (!h.ok()) {
    if (h.status().IsNotFound()) {
      *why = "blank: no dst leg header (a replacement)";
      return LegReason::kBlank;
    }
    *why = "header unreadable: " + h.status().ToString();
    return LegReason::kUnreachable;
  }
  if (h->array_id != e.array_id) {
    *why = "foreign: the header belongs to array " + h->array_id;
    return LegReason::kForeign;
  }
  if (static_cast<int>(h->slot) != e.slot) {
    *why = "foreign: the header is for slot " + std::to_string(h->slot) + " of this array";
    return LegReason::kForeign;
  }
  if (!e.host_id.empty() && !h->owner_id.empty() && h->owner_id != e.host_id &&
      (running || h->lease_expiry_ms > WallMs())) {
    *why = ClaimText(*h);
    return LegReason::kClaimed;
  }
  if (h->generation == e.generation) return LegReason::kNone;
  // A rotation whose header write did not land yet (crash or reconnect in between).
  if (!e.history.empty() && h->generation == e.history.front()) return LegReason::kNone;
  // (a '!' entry never equals a generation, so a discarded leg coming back is not accepted)
  if (Contains(h->history, e.generation)) {
    *why = "split brain: generation " + h->generation + " was written by another assembler after " +
           e.generation + " (ours)";
    return LegReason::kDiverged;
  }
  *why = std::string("older generation ") + h->generation + " (this slot is at " + e.generation +
         (Contains(e.history, h->generation) ? ")" : "; unknown to this array)");
  return LegReason::kOlderGeneration;
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

// ---- Init ----

Status MirrorDevice::Impl::Init(const ArrayRecord& rec, std::vector<std::shared_ptr<BlockDevice>> devs,
                                std::shared_ptr<DirtyMapStore> store, const MirrorOptions& opts) {
  id_ = rec.id;
  name_ = rec.name;
  array_size_ = rec.size;
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
  // Checks stay in attaching mode (count connections, accept) until every leg is judged.
  std::uint32_t attach_connects[kMaxLegs] = {};
  for (const auto& lr : rec.legs) {
    if (lr.slot < 0 || lr.slot >= kMaxLegs) return Status::InvalidArgument("mirror: bad leg slot");
    Leg& L = legs_[lr.slot];
    nslots_ = std::max(nslots_, lr.slot + 1);
    L.generation = lr.generation;
    L.describe = lr.describe;
    L.state = lr.state;
    L.history.clear();
    for (std::size_t p = 0, q; p < lr.history.size(); p = q + 1) {
      q = lr.history.find(',', p);
      if (q == std::string::npos) q = lr.history.size();
      if (q > p) L.history.push_back(lr.history.substr(p, q - p));
    }
    L.reason = LegReason::kNone;
    for (int k = 0; k <= static_cast<int>(LegReason::kClaimed); ++k)
      if (lr.reason == LegReasonName(static_cast<LegReason>(k))) L.reason = static_cast<LegReason>(k);
    L.check_arg = Leg::CheckArg{this, lr.slot};
    PublishExpectLocked(lr.slot);
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
      SetReasonLocked(lr.slot, LegReason::kForeign, "foreign: smaller than the array");
      continue;
    }
    // The check goes on before the header is read, so a reconnect in between is not missed.
    InstallCheck(lr.slot, dev.get());
    const std::uint32_t connects0 = L.connects.load();
    std::string why;
    LegReason r = JudgeAttach(lr.slot, *dev, &why);
    if (r == LegReason::kUnreachable) {
      RemoveCheck(lr.slot);
      L.state = LegState::kFailed;  // unreadable now: not a reason for a full resync
      SetReasonLocked(lr.slot, r, why);
      continue;
    }
    L.dev = dev;
    L.describe = dev->Describe();
    // Our claim (and, for a blank leg, its new identity) goes on the header first.
    if (r == LegReason::kBlank) NewGenerationLocked(lr.slot);
    if (r == LegReason::kBlank || (r == LegReason::kNone && claims())) {
      LegHeader nh = HeaderForLocked(lr.slot, true);
      Status ws = WriteHeader(*dev, nh);
      if (!ws.ok()) {
        RemoveCheck(lr.slot);
        L.state = LegState::kFailed;
        SetReasonLocked(lr.slot, LegReason::kUnreachable, ws.ToString());
        L.dev.reset();
        continue;
      }
      NoteOwner(lr.slot, nh);
    }
    if (r == LegReason::kBlank) {
      // A replacement: full resync.
      L.oos.SetAll();
      L.state = LegState::kResyncing;
      SetReasonLocked(lr.slot, LegReason::kNone, {});
    } else if (r != LegReason::kNone) {
      // Foreign, older, diverged or claimed: never used until the operator re-adds it.
      if (L.state == LegState::kUpToDate || L.state == LegState::kResyncing) L.state = LegState::kFailed;
      SetReasonLocked(lr.slot, r, why);
    } else {
      if (!(L.state == LegState::kUpToDate && L.oos.Empty()))
        L.state = L.oos.Empty() ? LegState::kUpToDate : LegState::kResyncing;
      if (L.state != LegState::kFailed) SetReasonLocked(lr.slot, LegReason::kNone, {});
    }
    attach_connects[lr.slot] = connects0;
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
  if (source < 0) {
    std::string why;
    for (int s = 0; s < nslots_; ++s)
      if (legs_[s].state != LegState::kEmpty && legs_[s].reason != LegReason::kNone)
        why += "; leg " + std::to_string(s) + ": " + legs_[s].reason_text;
    return Status::Unavailable("mirror " + id_ + ": no up-to-date leg present" + why);
  }
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

  for (int s = 0; s < nslots_; ++s) {
    if (!legs_[s].check_dev) continue;
    legs_[s].strict.store(true);
    if (legs_[s].connects.load() != attach_connects[s]) ident_kick_ = true;  // re-check at once
  }
  // Fewer legs up than recorded: the remaining ones move to new generations before any write.
  for (const auto& lr : rec.legs)
    if (lr.state == LegState::kUpToDate && legs_[lr.slot].state != LegState::kUpToDate) rotate_pending_ = true;
  if (opts.new_generations) rotate_pending_ = true;
  for (int s = 0; s < nslots_; ++s) NoteLease(s, NowNs());
  // Persist the assembled state (leg generations/states, merged maps, clean=0) before any I/O.
  dirty_ = true;
  clean_value_ = 0;
  for (std::size_t c = 0; c < intent_chunk_dirty_.size(); ++c) intent_chunk_dirty_[c] = 1;
  if (!CommitOnce()) return Status::IoError("mirror: initial commit failed");
  cps_window_start_ns_ = NowNs();
  writer_ = std::thread([this] { WriterLoop(); });
  resync_ = std::thread([this] { ResyncLoop(); });
  ident_ = std::thread([this] { IdentityLoop(); });
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

void MirrorDevice::Impl::FailLegLocked(int slot, LegReason why, std::string text) {
  Leg& L = legs_[slot];
  if (L.state != LegState::kEmpty) SetReasonLocked(slot, why, std::move(text));
  if (L.state == LegState::kUpToDate || L.state == LegState::kResyncing) {
    if (L.state == LegState::kUpToDate) rotate_pending_ = true;
    L.state = LegState::kFailed;
    L.prog.leg_state = L.state;
    if (L.prog.state == ResyncState::kRunning || L.prog.state == ResyncState::kPending)
      L.prog.state = ResyncState::kFailed;
    MarkLegDownLocked(slot);
    resync_cv_.notify_all();
  }
}

MirrorDevice::Impl::Admit MirrorDevice::Impl::AdmitWriteLocked(Ctx* c) {
  if (claims()) {
    // Our claims may have run out (renewal hangs, or this process was stopped).  Every leg in
    // service expired: it is us -- nothing is written until the identity thread re-read the
    // headers and renewed the claims.  Only some: those legs do not answer; carry on without.
    const std::int64_t now = NowNs();
    int live = 0, expired = 0;
    for (int s = 0; s < nslots_; ++s) {
      const Leg& L = legs_[s];
      if (L.state != LegState::kUpToDate && L.state != LegState::kResyncing) continue;
      (L.lease_ns.load(std::memory_order_relaxed) < now ? expired : live)++;
    }
    if (expired > 0 && live == 0) {
      lease_waiters_.Push(c);
      ident_kick_ = true;
      ident_cv_.notify_one();
      return Admit::kQueued;
    }
    for (int s = 0; expired > 0 && s < nslots_; ++s) {
      const Leg& L = legs_[s];
      if ((L.state == LegState::kUpToDate || L.state == LegState::kResyncing) &&
          L.lease_ns.load(std::memory_order_relaxed) < now)
        FailLegLocked(s, LegReason::kUnreachable, "claim not renewed in time (header I/O hangs)");
    }
  }
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
  std::uint32_t rewrite = 0;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!dirty_ || crashed_) return false;
    dirty_ = false;
    if (rotate_pending_) {
      // The up-to-date set shrank: the legs still up move to new generations (persisted here,
      // on their headers right after), so the departed leg's generation marks where it left.
      rotate_pending_ = false;
      ++epoch_;
      for (int s = 0; s < nslots_; ++s)
        if (legs_[s].state == LegState::kUpToDate && legs_[s].dev) {
          NewGenerationLocked(s, /*continues=*/true);
          hdr_rewrite_ |= 1u << s;
        }
    }
    rewrite = hdr_rewrite_;
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
        LegRecord lr{s, L.generation, L.state, L.describe, {}, {}};
        for (const auto& g : L.history) lr.history += (lr.history.empty() ? "" : ",") + g;
        if (L.state != LegState::kUpToDate && L.state != LegState::kResyncing)
          lr.reason = LegReasonName(L.reason);
        b.legs.push_back(std::move(lr));
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
  // Rotated generations reach the headers before any write waiting for this commit completes.
  if (st.ok() && rewrite) WriteRotatedHeaders(rewrite);
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

// ---- identity: headers, connect checks, claims, generations ----
//
// Every attached leg carries a ConnectCheck over its header block: a reconnecting device runs
// it before any request goes out on a new connection.  verify() judges the header against
// exp_[slot] (copied under ident_mu_, never waits for I/O); a mismatch fails the leg inside
// rejected() before the connection is admitted.  The identity thread re-reads every header at
// each lease renewal too (devices that cannot run checks, and claims taken by another host),
// and gives blank replacements a new generation and a full resync.

Expect MirrorDevice::Impl::ExpectOf(int slot) {
  std::lock_guard<std::mutex> l(ident_mu_);
  return exp_[slot];
}

void MirrorDevice::Impl::PublishExpectLocked(int slot) {
  std::lock_guard<std::mutex> l(ident_mu_);
  Expect& e = exp_[slot];
  e.array_id = id_;
  e.slot = slot;
  e.generation = legs_[slot].generation;
  e.history = legs_[slot].history;
  e.host_id = opts_.host_id;
}

LegHeader MirrorDevice::Impl::HeaderForLocked(int slot, bool claim) const {
  const Leg& L = legs_[slot];
  LegHeader h;
  h.array_id = id_;
  h.generation = L.generation;
  h.slot = static_cast<std::uint32_t>(slot);
  h.region_size = region_size_;
  h.array_size = array_size_;
  h.history = L.history;
  h.epoch = epoch_;
  h.clean = !claim && closed_clean_ ? 1 : 0;
  if (claim && claims()) {
    h.owner_id = opts_.host_id;
    h.owner_name = opts_.host_name;
    h.lease_expiry_ms = WallMs() + opts_.lease_ms;
  }
  return h;
}

void MirrorDevice::Impl::NewGenerationLocked(int slot, bool continues) {
  Leg& L = legs_[slot];
  if (!L.generation.empty()) L.history.insert(L.history.begin(), (continues ? "" : "!") + L.generation);
  if (L.history.size() > static_cast<std::size_t>(kHistory)) L.history.resize(kHistory);
  L.generation = NewUuid();
  L.record_dirty = true;
  dirty_ = true;
  PublishExpectLocked(slot);  // before the header is written: a reconnect in between is judged right
}

void MirrorDevice::Impl::SetReasonLocked(int slot, LegReason r, std::string text) {
  Leg& L = legs_[slot];
  // An identity reason is not hidden by the I/O errors it causes (queued requests fail first).
  if ((r == LegReason::kIoError || r == LegReason::kUnreachable) && L.reason >= LegReason::kBlank &&
      L.state != LegState::kUpToDate && L.state != LegState::kResyncing)
    return;
  if (text.empty() && r != LegReason::kNone) text = LegReasonName(r);
  if (L.reason != r || L.reason_text != text) L.record_dirty = true;
  if (r >= LegReason::kBlank && (L.reason != r || L.reason_text != text)) {
    std::time_t t = static_cast<std::time_t>(WallMs() / 1000);
    char when[32] = "?";
    struct tm tmv;
    if (gmtime_r(&t, &tmv)) std::strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S UTC", &tmv);
    L.identity_event = std::string(when) + ": " + text +
                       (r == LegReason::kBlank ? " -> new generation, full resync" : " -> failed");
    ++L.identity_events;
  }
  L.reason = r;
  L.reason_text = std::move(text);
}

void MirrorDevice::Impl::InstallCheck(int slot, BlockDevice* dev) {
  Leg& L = legs_[slot];
  if (L.check_dev == dev) return;
  if (L.check_dev) RemoveCheck(slot);
  L.strict.store(false);
  L.check_arg = Leg::CheckArg{this, slot};
  ConnectCheck c;
  c.offset = LegDataBytes(dev->Info());
  c.length = kLegHeaderBytes;
  c.verify = &Impl::VerifyCb;
  c.rejected = &Impl::RejectedCb;
  c.arg = &L.check_arg;
  if (dev->SetConnectCheck(c)) L.check_dev = dev;
}

void MirrorDevice::Impl::RemoveCheck(int slot) {
  Leg& L = legs_[slot];
  if (!L.check_dev) return;
  (void)L.check_dev->SetConnectCheck(ConnectCheck{});
  L.check_dev = nullptr;
  L.strict.store(false);
}

Status MirrorDevice::Impl::VerifyCb(void* arg, const char* data, std::uint32_t len) {
  auto* a = static_cast<Leg::CheckArg*>(arg);
  Impl* self = a->self;
  Leg& L = self->legs_[a->slot];
  L.connects.fetch_add(1);
  if (!L.strict.load()) return Status::OK();  // attaching: the attacher reads the header itself
  auto h = ParseHeader(data, len);
  std::lock_guard<std::mutex> l(self->ident_mu_);
  std::string why;
  LegReason r = Judge(h, self->exp_[a->slot], /*running=*/true, &why);
  if (r == LegReason::kNone) return Status::OK();
  L.check_reason.store(static_cast<int>(r));
  L.check_text = why;
  return Status::IoError(why);
}

void MirrorDevice::Impl::RejectedCb(void* arg, const Status& why) {
  auto* a = static_cast<Leg::CheckArg*>(arg);
  Impl* self = a->self;
  Leg& L = self->legs_[a->slot];
  auto r = static_cast<LegReason>(L.check_reason.exchange(0));
  std::string text;
  {
    std::lock_guard<std::mutex> l(self->ident_mu_);
    text = r == LegReason::kNone ? "header unreadable on reconnect: " + why.ToString() : L.check_text;
  }
  if (r == LegReason::kNone) r = LegReason::kUnreachable;
  std::lock_guard<std::mutex> l(self->mu_);
  if (L.state == LegState::kEmpty || L.state == LegState::kDetached) return;
  // Not read from any more.  Another identity: nothing on it can be trusted (full resync once
  // re-added); a blank one is re-initialised at once.
  if (r >= LegReason::kBlank) self->MarkOosLocked(a->slot, 0, self->regions_);
  self->FailLegLocked(a->slot, r, text);
  if (r == LegReason::kBlank) {
    L.reinit = true;
    self->ident_kick_ = true;
    self->ident_cv_.notify_one();
  }
}

void MirrorDevice::Impl::NoteOwner(int slot, const LegHeader& h) {
  std::lock_guard<std::mutex> l(ident_mu_);
  legs_[slot].owner_id = h.owner_id;
  legs_[slot].owner_name = h.owner_name;
  legs_[slot].lease_expiry_ms = h.lease_expiry_ms;
}

LegReason MirrorDevice::Impl::JudgeAttach(int slot, BlockDevice& dev, std::string* why) {
  auto h = ReadHeader(dev);
  LegReason r = Judge(h, ExpectOf(slot), /*running=*/false, why);
  if (h.ok()) NoteOwner(slot, h.value());
  if (h.ok() && r == LegReason::kNone) {
    std::lock_guard<std::mutex> l(mu_);
    epoch_ = std::max(epoch_, h->epoch);
  }
  return r;
}

void MirrorDevice::Impl::WriteRotatedHeaders(std::uint32_t mask) {
  std::lock_guard<std::mutex> hl(hdr_mu_);
  for (int s = 0; s < nslots_; ++s) {
    if (!(mask & (1u << s))) continue;
    std::shared_ptr<BlockDevice> dev;
    LegHeader h;
    {
      std::lock_guard<std::mutex> l(mu_);
      hdr_rewrite_ &= ~(1u << s);
      if (legs_[s].state != LegState::kUpToDate && legs_[s].state != LegState::kResyncing) continue;
      dev = legs_[s].dev;
      h = HeaderForLocked(s, true);
    }
    if (!dev) continue;
    Status ws = WriteHeader(*dev, h);
    if (!ws.ok()) {
      std::lock_guard<std::mutex> l(mu_);
      MarkOosLocked(s, 0, regions_);  // its header lags: only a full resync makes it trustworthy
      FailLegLocked(s, LegReason::kIoError, ws.ToString());
    }
  }
}

// One identity round: re-read every header in service, judge it, renew our claim.
void MirrorDevice::Impl::CheckAndRenew() {
  std::lock_guard<std::mutex> hl(hdr_mu_);
  for (int s = 0; s < kMaxLegs; ++s) {
    std::shared_ptr<BlockDevice> dev;
    LegHeader mine;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (s >= nslots_ || stopping_ident_) break;
      Leg& L = legs_[s];
      if (!L.dev || (L.state != LegState::kUpToDate && L.state != LegState::kResyncing)) continue;
      dev = L.dev;
      mine = HeaderForLocked(s, true);
    }
    std::string why;
    const std::int64_t t_leg = NowNs();
    auto h = ReadHeader(*dev);
    LegReason r = Judge(h, ExpectOf(s), /*running=*/true, &why);
    Status ws;
    if (r == LegReason::kNone && claims()) ws = WriteHeader(*dev, mine);
    std::lock_guard<std::mutex> l(mu_);
    Leg& L = legs_[s];
    if (L.dev != dev || (L.state != LegState::kUpToDate && L.state != LegState::kResyncing)) continue;
    if (h.ok()) NoteOwner(s, h.value());
    if (r == LegReason::kNone && ws.ok()) {
      if (claims()) NoteOwner(s, mine);
      NoteLease(s, t_leg);
      continue;
    }
    if (r == LegReason::kNone) {
      r = LegReason::kIoError;
      why = ws.ToString();
    }
    if (r >= LegReason::kBlank) MarkOosLocked(s, 0, regions_);
    FailLegLocked(s, r, why);
    if (r == LegReason::kBlank) L.reinit = true;
  }
}

// Blank replacements found by a check: new generation and header, then a full resync.  Runs on
// the identity thread only (never in a device callback); the daemon's re-add skips blank legs.
void MirrorDevice::Impl::ReinitLegs() {
  std::lock_guard<std::mutex> hl(hdr_mu_);
  for (int s = 0; s < kMaxLegs; ++s) {
    std::shared_ptr<BlockDevice> dev;
    LegHeader h;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (s >= nslots_) break;
      Leg& L = legs_[s];
      if (!L.reinit) continue;
      if (!L.dev || L.state != LegState::kFailed || L.reason != LegReason::kBlank ||
          L.pending.load() != 0) {
        L.reinit = L.dev && L.state == LegState::kFailed && L.reason == LegReason::kBlank;
        continue;  // busy: next round
      }
      NewGenerationLocked(s);
      dev = L.dev;
      h = HeaderForLocked(s, true);
    }
    const std::int64_t t_claim = NowNs();
    Status ws = WriteHeader(*dev, h);
    std::lock_guard<std::mutex> l(mu_);
    Leg& L = legs_[s];
    if (!ws.ok() || L.dev != dev || !L.reinit) continue;  // retried next round
    NoteLease(s, t_claim);
    NoteOwner(s, h);
    L.reinit = false;
    SetReasonLocked(s, LegReason::kNone, {});
    (void)StartLegResyncLocked(s, /*full=*/true);
  }
}

void MirrorDevice::Impl::AdmitLeaseWaiters() {
  Ctx* list = nullptr;
  {
    std::lock_guard<std::mutex> l(mu_);
    Ctx** tail = &list;
    while (Ctx* c = lease_waiters_.Pop()) {
      *tail = c;
      c->next = nullptr;
      tail = &c->next;
    }
  }
  AdmitList(list);
}

void MirrorDevice::Impl::IdentityLoop() {
  const auto period = std::chrono::milliseconds(std::max<std::uint32_t>(opts_.renew_ms, 10));
  auto next = Clock::now() + period;
  for (;;) {
    bool reinit = false, kicked = false;
    {
      std::unique_lock<std::mutex> l(mu_);
      ident_cv_.wait_until(l, next, [&] { return stopping_ident_ || ident_kick_; });
      if (stopping_ident_) return;
      kicked = ident_kick_;
      ident_kick_ = false;
      for (int s = 0; s < nslots_; ++s) reinit = reinit || legs_[s].reinit;
    }
    if (reinit) ReinitLegs();
    if (kicked || Clock::now() >= next) {
      CheckAndRenew();
      next = Clock::now() + period;
    }
    AdmitLeaseWaiters();
  }
}

// Clean shutdown: the headers keep our identity but no claim, so another host may take over.
void MirrorDevice::Impl::ReleaseClaims() {
  if (!claims()) return;
  std::lock_guard<std::mutex> hl(hdr_mu_);
  for (int s = 0; s < nslots_; ++s) {
    std::shared_ptr<BlockDevice> dev;
    LegHeader h;
    {
      std::lock_guard<std::mutex> l(mu_);
      Leg& L = legs_[s];
      if (!L.dev || (L.state != LegState::kUpToDate && L.state != LegState::kResyncing)) continue;
      dev = L.dev;
      h = HeaderForLocked(s, false);
    }
    if (WriteHeader(*dev, h).ok()) NoteOwner(s, h);
  }
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
  {
    std::lock_guard<std::mutex> l(mu_);
    stopping_ident_ = true;
    ident_cv_.notify_all();
  }
  if (ident_.joinable()) ident_.join();
  if (orderly) AdmitLeaseWaiters();  // a clean close still writes them (under our claim)
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
      closed_clean_ = flushed;
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
    ReleaseClaims();
  }
  // No connect check may run into a closed mirror.
  for (int s = 0; s < kMaxLegs; ++s) RemoveCheck(s);
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
  // A leg held by another host, or (unless forced) carrying another array's header, is refused.
  for (auto& l : legs) {
    auto h = ReadHeader(*l);
    if (!h.ok() && !h.status().IsNotFound()) return h.status();
    if (!h.ok()) continue;
    if (!opts.host_id.empty() && !h->owner_id.empty() && h->owner_id != opts.host_id &&
        h->lease_expiry_ms > WallMs())
      return Status::Busy("leg " + l->Describe() + " is " + ClaimText(*h));
    if (h->array_id != rec.id && !opts.force_create)
      return Status::Exists("leg " + l->Describe() + " carries the header of array " + h->array_id +
                            " (slot " + std::to_string(h->slot) +
                            "); it may still belong to it (force to overwrite)");
  }
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
    LegHeader h;
    h.array_id = rec.id;
    h.generation = lr.generation;
    h.slot = static_cast<std::uint32_t>(i);
    h.region_size = opts.region_size;
    h.array_size = size;
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

Result<std::pair<std::string, std::vector<std::shared_ptr<BlockDevice>>>> MirrorDevice::Import(
    std::vector<std::shared_ptr<BlockDevice>> legs, std::shared_ptr<DirtyMapStore> store,
    const MirrorOptions& opts) {
  if (legs.empty() || legs.size() > static_cast<std::size_t>(kMaxLegs))
    return Status::InvalidArgument("mirror import: needs 1.." + std::to_string(kMaxLegs) + " legs");
  if (!store) return Status::InvalidArgument("mirror: no store");
  std::vector<LegHeader> hs;
  for (auto& l : legs) {
    if (!l) return Status::InvalidArgument("mirror: null leg");
    auto h = ReadHeader(*l);
    if (!h.ok())
      return h.status().IsNotFound()
                 ? Status::InvalidArgument("leg " + l->Describe() + " carries no dst leg header")
                 : h.status();
    if (!opts.host_id.empty() && !h->owner_id.empty() && h->owner_id != opts.host_id &&
        h->lease_expiry_ms > WallMs())
      return Status::Busy("leg " + l->Describe() + " is " + ClaimText(h.value()));
    if (!hs.empty() && h->array_id != hs.front().array_id)
      return Status::InvalidArgument("legs belong to different arrays: " + hs.front().array_id +
                                     " and " + h->array_id + " (" + l->Describe() + ")");
    hs.push_back(h.value());
  }
  std::vector<std::shared_ptr<BlockDevice>> by_slot(kMaxLegs);
  std::uint64_t max_epoch = 0;
  for (std::size_t i = 0; i < hs.size(); ++i) {
    if (hs[i].slot >= static_cast<std::uint32_t>(kMaxLegs) || by_slot[hs[i].slot])
      return Status::InvalidArgument("leg " + legs[i]->Describe() + ": slot " +
                                     std::to_string(hs[i].slot) + " is given twice or invalid");
    by_slot[hs[i].slot] = legs[i];
    max_epoch = std::max(max_epoch, hs[i].epoch);
    if (LegDataBytes(legs[i]->Info()) < hs[i].array_size)
      return Status::InvalidArgument("leg " + legs[i]->Describe() + " is smaller than the array");
  }
  bool all_clean = true;
  int source = -1;
  for (std::size_t i = 0; i < hs.size(); ++i)
    if (hs[i].epoch == max_epoch) {
      all_clean = all_clean && hs[i].clean;
      if (source < 0 || static_cast<int>(hs[i].slot) < source) source = static_cast<int>(hs[i].slot);
    }
  ArrayRecord rec;
  rec.id = hs.front().array_id;
  rec.name = opts.name;
  rec.kind = "mirror";
  rec.size = hs.front().array_size;
  rec.region_size = hs.front().region_size;
  rec.clean = true;  // whatever the intent map would have held is covered by full resyncs below
  CommitBatch b;
  b.array_id = rec.id;
  DirtyMap all(rec.size, rec.region_size);
  all.SetAll();
  int nslots = 0;
  for (auto& h : hs) nslots = std::max(nslots, static_cast<int>(h.slot) + 1);
  for (int s = 0; s < nslots; ++s) {
    LegRecord lr;
    lr.slot = s;
    lr.state = LegState::kEmpty;
    for (std::size_t i = 0; i < hs.size(); ++i) {
      if (static_cast<int>(hs[i].slot) != s) continue;
      lr.generation = hs[i].generation;
      for (const auto& g : hs[i].history) lr.history += (lr.history.empty() ? "" : ",") + g;
      lr.describe = legs[i]->Describe();
      bool in_sync = s == source || (hs[i].epoch == max_epoch && all_clean);
      lr.state = in_sync ? LegState::kUpToDate : LegState::kResyncing;
      if (!in_sync)
        for (std::uint64_t c = 0; c < all.chunks(); ++c)
          b.chunks.push_back(MapChunk{s, c, all.ChunkBytes(c)});
    }
    rec.legs.push_back(lr);
  }
  (void)store->DeleteArray(rec.id);  // an older record of it here (released earlier) is stale
  DST_RETURN_IF_ERROR(store->PutArray(rec));
  if (!b.chunks.empty()) DST_RETURN_IF_ERROR(store->Commit(b));
  by_slot.resize(static_cast<std::size_t>(nslots));
  return std::make_pair(rec.id, std::move(by_slot));
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
    impl_->stopping_ident_ = true;
    impl_->ident_cv_.notify_all();
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
    for (Impl::CtxList* q : {&impl_->intent_waiters_, &impl_->window_waiters_, &impl_->down_waiters_,
                             &impl_->lease_waiters_}) {
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

Status MirrorDevice::FailLeg(int slot) { return FailLeg(slot, LegReason::kOperator, "failed by the operator"); }

Status MirrorDevice::FailLeg(int slot, LegReason reason, std::string why) {
  std::lock_guard<std::mutex> l(impl_->mu_);
  if (slot < 0 || slot >= impl_->nslots_ || impl_->legs_[slot].state == LegState::kEmpty)
    return Status::NotFound("no leg in slot " + std::to_string(slot));
  impl_->FailLegLocked(slot, reason, std::move(why));
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
    impl_->SetReasonLocked(slot, LegReason::kOperator, "detached by the operator");
    impl_->rotate_pending_ = true;
    impl_->MarkLegDownLocked(slot);
    dev = L.dev;
  }
  impl_->RemoveCheck(slot);
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
    L.generation.clear();
    L.history.clear();
    L.describe = dev->Describe();
    impl_->nslots_ = std::max(impl_->nslots_, slot + 1);
    impl_->NewGenerationLocked(slot);
  }
  std::lock_guard<std::mutex> hl(impl_->hdr_mu_);
  impl_->InstallCheck(slot, dev.get());
  // A leg another host holds is refused, with the holder named.
  auto old = ReadHeader(*dev);
  Status s;
  if (old.ok() && impl_->claims() && !old->owner_id.empty() && old->owner_id != impl_->opts_.host_id &&
      old->lease_expiry_ms > WallMs())
    s = Status::Busy("leg " + dev->Describe() + " is " + ClaimText(*old));
  LegHeader h;
  {
    std::lock_guard<std::mutex> l(impl_->mu_);
    h = impl_->HeaderForLocked(slot, true);
  }
  const std::int64_t t_claim = NowNs();
  if (s.ok()) s = WriteHeader(*dev, h);
  if (s.ok()) impl_->NoteOwner(slot, h);
  if (s.ok()) impl_->NoteLease(slot, t_claim);
  if (!s.ok()) impl_->RemoveCheck(slot);
  std::lock_guard<std::mutex> l(impl_->mu_);
  auto& L = impl_->legs_[slot];
  if (!s.ok()) {
    L.state = LegState::kEmpty;
    return s;
  }
  L.dev = std::move(dev);
  L.strict.store(true);
  impl_->SetReasonLocked(slot, LegReason::kNone, {});
  (void)impl_->StartLegResyncLocked(slot, /*full=*/true);
  return slot;
}

Status MirrorDevice::ReAddLeg(int slot, std::shared_ptr<BlockDevice> dev) {
  return ReAddLegImpl(slot, std::move(dev), /*automatic=*/false);
}

Status MirrorDevice::ReAddLegAuto(int slot, std::shared_ptr<BlockDevice> dev) {
  return ReAddLegImpl(slot, std::move(dev), /*automatic=*/true);
}

Status MirrorDevice::ReAddLegImpl(int slot, std::shared_ptr<BlockDevice> dev, bool automatic) {
  if (!dev) return Status::InvalidArgument("null leg");
  {
    std::lock_guard<std::mutex> l(impl_->mu_);
    if (slot < 0 || slot >= impl_->nslots_ || impl_->legs_[slot].state == LegState::kEmpty)
      return Status::NotFound("no leg in slot " + std::to_string(slot));
    auto& L = impl_->legs_[slot];
    if (L.state != LegState::kFailed && L.state != LegState::kDetached)
      return Status::Busy("leg " + std::to_string(slot) + " is " + LegStateName(L.state));
    if (L.pending.load() != 0) return Status::Busy("leg still has I/O in flight");
    if (automatic && (LegReasonNeedsOperator(L.reason) || L.reason == LegReason::kBlank))
      return Status::Busy("leg " + std::to_string(slot) + " needs the operator: " + L.reason_text);
  }
  if (LegDataBytes(dev->Info()) < impl_->info_.size)
    return Status::InvalidArgument("leg " + dev->Describe() + " is smaller than the mirror");
  std::lock_guard<std::mutex> hl(impl_->hdr_mu_);
  impl_->InstallCheck(slot, dev.get());
  std::string why;
  LegReason r = impl_->JudgeAttach(slot, *dev, &why);
  if (r == LegReason::kUnreachable || r == LegReason::kClaimed || r == LegReason::kDiverged ||
      (automatic && LegReasonNeedsOperator(r))) {
    if (r == LegReason::kUnreachable || r == LegReason::kClaimed) impl_->RemoveCheck(slot);
    std::lock_guard<std::mutex> l(impl_->mu_);
    auto& L = impl_->legs_[slot];
    if (r != LegReason::kUnreachable) impl_->SetReasonLocked(slot, r, why);
    if (r == LegReason::kClaimed) return Status::Busy("leg " + dev->Describe() + " is " + why);
    if (r == LegReason::kUnreachable) return Status::Unavailable(why);
    // Kept attached (failed, no I/O) so that `resolve` can use it; its check stays installed.
    L.dev = std::move(dev);
    L.describe = L.dev->Describe();
    L.strict.store(true);
    return Status::Busy("leg " + L.describe + ": " + why +
                        (r == LegReason::kDiverged ? " (end it with: array resolve)" : ""));
  }
  const bool same = r == LegReason::kNone;
  LegHeader h;
  {
    std::lock_guard<std::mutex> l(impl_->mu_);
    if (!same) impl_->SetReasonLocked(slot, r, why);  // recorded as an identity event
    if (!same) impl_->NewGenerationLocked(slot);  // blank, foreign, older: start over
    h = impl_->HeaderForLocked(slot, true);
  }
  if (!same || impl_->claims()) {
    impl_->NoteLease(slot, NowNs());
    Status ws = WriteHeader(*dev, h);
    if (!ws.ok()) {
      impl_->RemoveCheck(slot);
      return ws;
    }
    impl_->NoteOwner(slot, h);
  }
  std::lock_guard<std::mutex> l(impl_->mu_);
  auto& L = impl_->legs_[slot];
  L.dev = std::move(dev);
  L.describe = L.dev->Describe();
  L.reinit = false;
  L.strict.store(true);
  impl_->SetReasonLocked(slot, LegReason::kNone, {});
  return impl_->StartLegResyncLocked(slot, /*full=*/!same);
}

Result<std::vector<ResolveStep>> MirrorDevice::Resolve(int keep, bool dry_run) {
  std::vector<ResolveStep> steps;
  {
    std::lock_guard<std::mutex> l(impl_->mu_);
    if (keep < 0 || keep >= impl_->nslots_ || impl_->legs_[keep].state == LegState::kEmpty)
      return Status::NotFound("no leg in slot " + std::to_string(keep));
    bool split = false;
    for (int s = 0; s < impl_->nslots_; ++s) split = split || (impl_->legs_[s].state != LegState::kEmpty &&
                                                               impl_->legs_[s].reason == LegReason::kDiverged);
    if (!split) return Status::InvalidArgument("array " + impl_->name_ + " has no split brain");
    if (!impl_->legs_[keep].dev) return Status::Unavailable("leg " + std::to_string(keep) + " is not present");
    for (int s = 0; s < impl_->nslots_; ++s) {
      if (impl_->legs_[s].state == LegState::kEmpty) continue;
      steps.push_back(ResolveStep{s, s == keep, s == keep ? 0 : impl_->info_.size});
    }
  }
  if (dry_run) return steps;
  std::lock_guard<std::mutex> hl(impl_->hdr_mu_);
  std::vector<std::pair<std::shared_ptr<BlockDevice>, LegHeader>> writes;
  {
    std::lock_guard<std::mutex> l(impl_->mu_);
    for (int s = 0; s < impl_->nslots_; ++s) {
      auto& L = impl_->legs_[s];
      if (L.state == LegState::kEmpty || !L.dev || L.state == LegState::kDetached) continue;
      impl_->NewGenerationLocked(s, s == keep);  // every side starts anew after the decision
      writes.emplace_back(L.dev, impl_->HeaderForLocked(s, true));
    }
  }
  const std::int64_t t_claim = NowNs();
  for (auto& [dev, h] : writes) DST_RETURN_IF_ERROR(WriteHeader(*dev, h));
  for (int s = 0; s < impl_->nslots_; ++s) impl_->NoteLease(s, t_claim);
  std::lock_guard<std::mutex> l(impl_->mu_);
  for (int s = 0; s < impl_->nslots_; ++s) {
    auto& L = impl_->legs_[s];
    if (L.state == LegState::kEmpty) continue;
    L.reinit = false;
    if (s == keep) {
      L.oos.ClearAll();
      std::fill(L.chunk_dirty.begin(), L.chunk_dirty.end(), 1);
      L.strict.store(true);
      impl_->SetReasonLocked(s, LegReason::kNone, {});
      (void)impl_->StartLegResyncLocked(s, /*full=*/false);  // up to date: the source
    } else if (L.dev && L.state != LegState::kDetached) {
      L.strict.store(true);
      impl_->SetReasonLocked(s, LegReason::kNone, {});
      (void)impl_->StartLegResyncLocked(s, /*full=*/true);
    } else {
      impl_->MarkOosLocked(s, 0, impl_->regions_);
    }
  }
  return steps;
}

bool MirrorDevice::SplitBrain() const {
  std::lock_guard<std::mutex> l(impl_->mu_);
  for (int s = 0; s < impl_->nslots_; ++s)
    if (impl_->legs_[s].state != LegState::kEmpty && impl_->legs_[s].reason == LegReason::kDiverged)
      return true;
  return false;
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
    if (L.state == LegState::kUpToDate) impl_->rotate_pending_ = true;
    L.state = LegState::kEmpty;
    L.reason = LegReason::kNone;
    L.reason_text.clear();
    L.reinit = false;
    L.prog = ResyncProgress();
    L.prog.leg = slot;
    L.prog.leg_state = L.state;
    impl_->MarkLegDownLocked(slot);
    L.oos.ClearAll();
    std::fill(L.chunk_dirty.begin(), L.chunk_dirty.end(), 1);
    impl_->RequestCommitLocked();
  }
  while (impl_->legs_[slot].pending.load() != 0) std::this_thread::sleep_for(std::chrono::microseconds(200));
  impl_->RemoveCheck(slot);
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
    if (L.state != LegState::kUpToDate && L.state != LegState::kResyncing) {
      ls.reason = L.reason;
      ls.reason_text = L.reason_text;
    }
    ls.history = L.history;
    ls.identity_event = L.identity_event;
    ls.identity_events = L.identity_events;
    {
      std::lock_guard<std::mutex> il(impl_->ident_mu_);
      ls.owner_id = L.owner_id;
      ls.owner_name = L.owner_name;
      ls.lease_expiry_ms = L.lease_expiry_ms;
    }
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
