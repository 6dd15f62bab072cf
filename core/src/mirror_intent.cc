// MirrorDevice: the writer thread (write-intent log, group commit, lazy clear) and the
// out-of-sync map queries.
#include "mirror_internal.h"

namespace dst {

using namespace mirror_internal;

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
