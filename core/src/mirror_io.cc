// MirrorDevice: the I/O path (submit, write fan-out, read with retry, flush).
#include "mirror_internal.h"

namespace dst {

using namespace mirror_internal;

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
  c->up_mask = 0;
  c->ok_mask.store(0, std::memory_order_relaxed);
  c->done_mask.store(0, std::memory_order_relaxed);
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
    SetLegStateLocked(slot, LegState::kFailed);
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
      if (L.state == LegState::kUpToDate) c->up_mask |= 1u << s;
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
  NoteChild(c, slot, st.ok());
  if (st.ok()) {
    L.last_pos.store(child->offset + child->length, std::memory_order_relaxed);
  } else {
    std::lock_guard<std::mutex> l(self->mu_);
    // The leg missed this write, unless it is the last up-to-date leg and the write fails for
    // the caller too: then its content there (old or new) is a valid outcome.
    if (!self->LastUpLocked(slot) || OthersMayAck(c, slot)) self->MarkOosLocked(slot, c->r0, c->r1);
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
    // No leg that was up to date at admission took the write.  A leg that took it and is up
    // to date now (its resync ended meanwhile, while the failing legs were still up and so got
    // marked) holds it: acknowledge.  Otherwise it fails for the caller, and the resyncing legs
    // that took it now differ from the source there: the resync rewrites those regions, so
    // that a read does not depend on the leg it hits.
    if (c->ok_count.load() == 0) {
      const std::uint32_t took = c->ok_mask.load(std::memory_order_acquire);
      bool held = false;
      for (int s = 0; s < nslots_; ++s) held = held || ((took & (1u << s)) && legs_[s].state == LegState::kUpToDate);
      if (held) {
        c->ok_count.fetch_add(1);
      } else {
        for (int s = 0; s < nslots_; ++s)
          if ((took & (1u << s)) && legs_[s].state != LegState::kEmpty) MarkOosLocked(s, c->r0, c->r1);
      }
    }
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
    // A read error fails the leg; the region is rewritten by the resync when it comes back
    // (unless no other leg is up to date to rewrite it from: LastUpLocked).
    std::lock_guard<std::mutex> l(self->mu_);
    if (!self->LastUpLocked(slot)) self->MarkOosLocked(slot, c->r0, c->r1);
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
      if (L.state == LegState::kUpToDate) {
        any_up = true;
        c->up_mask |= 1u << s;
      }
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
  const bool ok = st.ok() || st.code() == Status::Code::kNotSupported;
  NoteChild(c, slot, ok);
  if (!ok) {
    // Acknowledged writes on this leg may not be durable: every region written since the last
    // successful lazy clear (the intent map) may differ.  The last up-to-date leg is the best
    // copy there is when the flush fails for the caller too: it stays unmarked (LastUpLocked).
    std::lock_guard<std::mutex> l(self->mu_);
    if (!self->LastUpLocked(slot) || OthersMayAck(c, slot)) {
      if (self->opts_.write_intent) {
        self->intent_.ForEachRun([&](std::uint64_t a, std::uint64_t b) { self->MarkOosLocked(slot, a, b); });
      } else {
        self->MarkOosLocked(slot, 0, self->regions_);
      }
    }
    self->FailLegLocked(slot);
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

}  // namespace dst
