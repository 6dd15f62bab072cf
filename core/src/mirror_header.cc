// MirrorDevice: the leg header (format, read, write, judgement) and leg identity:
// generations, claims, connect checks and the identity thread.
#include "mirror_internal.h"

namespace dst {

using namespace mirror_internal;

namespace mirror_internal {

// ---- Leg header (last 4 KiB-aligned block of every leg) ----
// Layout (little endian): 0 magic, 8 version, 12 slot, 16 region size, 24 array size,
// 32 lease expiry (unix ms, v2), 40 epoch (v2), 48 clean flag (v2), 64 array UUID, 128 generation, 192 history[4] (64 each, v2),
// 448 owner host id (v2), 512 owner host name (128, v2).  v1 headers (no history, no claim)
// are read as unclaimed; every write is v2.
constexpr char kHeaderMagic[8] = {'D', 'S', 'T', 'L', 'E', 'G', 'H', '1'};
constexpr std::uint32_t kHeaderVersion = 2;
constexpr int kHistory = 4;

static void Put32(char* p, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}
static void Put64(char* p, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}
static std::uint32_t Get32(const char* p) {
  std::uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}
static std::uint64_t Get64(const char* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

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

static std::string Field(const char* p, std::size_t n) { return std::string(p, strnlen(p, n)); }

static void PutField(char* p, std::size_t n, const std::string& v) {
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

// History entries of generations whose data was discarded (a blank or foreign leg started
// over) carry a '!' prefix: only a generation the data continued from may still be on the
// header after a rotation that did not reach it.
static std::string Bare(const std::string& g) { return !g.empty() && g[0] == '!' ? g.substr(1) : g; }

static bool Contains(const std::vector<std::string>& v, const std::string& x) {
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

}  // namespace mirror_internal

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
  const LegReason before = L.reason;
  L.reason = r;
  L.reason_text = std::move(text);
  if (before != r) NotifyLegLocked(slot, L.state, before);
}

void MirrorDevice::Impl::SetLegStateLocked(int slot, LegState s) {
  Leg& L = legs_[slot];
  const LegState before = L.state;
  L.state = s;
  if (before != s) NotifyLegLocked(slot, before, L.reason);
}

void MirrorDevice::Impl::NotifyLegLocked(int slot, LegState from, LegReason reason_from) {
  if (!leg_listener_) return;
  const Leg& L = legs_[slot];
  LegTransition t;
  t.slot = slot;
  t.from = from;
  t.to = L.state;
  t.reason_from = reason_from;
  t.reason = L.reason;
  t.reason_text = L.reason_text;
  t.device = L.describe;
  leg_listener_(t);
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

}  // namespace dst
