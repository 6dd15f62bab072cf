// MirrorDevice: construction, creation, import and assembly, leg administration (fail, detach,
// add, re-add, resolve, remove), state and statistics, shutdown.
#include "mirror_internal.h"

#include "dst/layer.h"

namespace dst {

using namespace mirror_internal;

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
    impl_->SetLegStateLocked(slot, LegState::kDetached);
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
    impl_->SetLegStateLocked(slot, LegState::kFailed);
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
    impl_->SetLegStateLocked(slot, LegState::kEmpty);
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
    impl_->SetLegStateLocked(slot, LegState::kEmpty);
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

void MirrorDevice::SetLegListener(LegListener fn) {
  std::lock_guard<std::mutex> l(impl_->mu_);
  impl_->leg_listener_ = std::move(fn);
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

// ---- registry entry (dst/layer.h) ----

namespace {
std::uint64_t MirrorSize(const std::vector<DeviceInfo>& legs, const LayerParams&) {
  return MirrorDevice::UsableSize(legs);
}

Status CheckMirror(const LayerParams& params) {
  const std::uint64_t rs = LayerParamU64(params, "region_size");
  if (rs < 4096 || rs > (std::uint64_t{1} << 30) || (rs & (rs - 1)) != 0)
    return Status::InvalidArgument("region_size: must be a power of two between 4K and 1G");
  const std::uint64_t lo = LayerParamU64(params, "resync_rate_min");
  const std::uint64_t hi = LayerParamU64(params, "resync_rate_max");
  if (hi != 0 && lo > hi)
    return Status::InvalidArgument("resync_rate_min: must not exceed resync_rate_max");
  return Status::OK();
}
}  // namespace

const LayerInfo& MirrorLayer();

MirrorKeys MirrorKeysFrom(const LayerParams& params) {
  const LayerInfo& layer = MirrorLayer();
  auto value = [&](const char* key) -> std::string {
    if (auto it = params.find(key); it != params.end()) return it->second;
    const LayerKey* k = FindLayerKey(layer, key);
    return k ? k->default_value : std::string();
  };
  auto u64 = [&](const char* key) { return LayerParamU64({{key, value(key)}}, key); };
  MirrorKeys m;
  m.region_size = std::uint32_t(u64("region_size"));
  m.resync_rate_min = u64("resync_rate_min");
  m.resync_rate_max = u64("resync_rate_max");
  m.write_intent = value("write_intent") != "false";
  return m;
}

// Built by the engine with its state (Create/Assemble with a map store and the host identity),
// so no factory here; the engine reads its keys through MirrorKeysFrom().
const LayerInfo& MirrorLayer() {
  static const LayerInfo layer{
      .name = "mirror",
      .title = "mirror (raid1)",
      .help = "N-way mirror (raid1) with a write-intent map, partial resync, online verify and "
              "leg identity headers. Legs can be failed, removed, re-added and detached live.",
      .keys = {{.name = "region_size",
                .type = LayerKey::Type::kSize,
                .default_value = std::to_string(DirtyMap::kDefaultRegionSize),
                .help = "dirty-map granularity: a missed write resyncs this much (power of two, "
                        "4K..1G; fixed at creation)"},
               {.name = "resync_rate_min",
                .type = LayerKey::Type::kRate,
                .default_value = std::to_string(ResyncRate{}.floor),
                .help = "resync rate while applications do I/O (bytes/s, e.g. 10M)",
                .live = true},
               {.name = "resync_rate_max",
                .type = LayerKey::Type::kRate,
                .default_value = std::to_string(ResyncRate{}.ceiling),
                .help = "resync rate when idle (bytes/s, 0 = unlimited)",
                .live = true},
               {.name = "write_intent",
                .type = LayerKey::Type::kBool,
                .default_value = "true",
                .help = "log regions before writing them, so a crash resyncs only those "
                        "(false: a crash means a full resync)",
                .live = true}},
      .legs = {.min_legs = 2,
               .max_legs = MirrorDevice::kMaxLegs,
               .same_size = true,
               .change = LegChange::kReplace,
               .size_rule = "the smallest leg less its 4 KiB identity header"},
      .redundant = true,
      .check = &CheckMirror,
      .usable_size = &MirrorSize,
  };
  return layer;
}

}  // namespace dst
