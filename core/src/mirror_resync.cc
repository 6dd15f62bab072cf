// MirrorDevice: resync (window by window, rate limited) and online verify.
#include "mirror_internal.h"

namespace dst {

using namespace mirror_internal;

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
          // Only while a source is still up: if the last one failed during the pass, a write
          // it failed may have reached this leg alone (FinishWrite marks it here); the leg
          // waits for the source to return instead of becoming a second truth.
          if (T.state == LegState::kResyncing && T.oos.Empty() && SourceLegLocked() >= 0) {
            SetLegStateLocked(slot, LegState::kUpToDate);
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
          // A read error on the source: its window is rewritten when it comes back, from
          // another up-to-date leg.  The last one has no such leg: marking it would leave the
          // array with no leg to resync from (both "resyncing", the array failed for good).
          if (!LastUpLocked(src)) MarkOosLocked(src, w0, w1);
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
        // As a failed application read: the leg is failed; its window is resynced on re-add
        // (the last up-to-date leg stays unmarked: nothing to resync it from).
        ++verify_.read_errors;
        if (!LastUpLocked(slots[i])) MarkOosLocked(slots[i], w0, w1);
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
  SetLegStateLocked(slot, L.oos.Empty() ? LegState::kUpToDate : LegState::kResyncing);
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

std::vector<ResyncProgress> MirrorDevice::Progress() const {
  std::lock_guard<std::mutex> l(impl_->mu_);
  std::vector<ResyncProgress> v;
  for (int s = 0; s < impl_->nslots_; ++s) {
    const auto& L = impl_->legs_[s];
    if (L.state == LegState::kEmpty) continue;
    ResyncProgress p = L.prog;
    p.leg = s;
    p.leg_state = L.state;
    // A pass waiting out a pause reads as paused, also before the thread noticed it.
    if (impl_->paused_ && L.state == LegState::kResyncing &&
        (p.state == ResyncState::kRunning || p.state == ResyncState::kPending))
      p.state = ResyncState::kPaused;
    // Only a running pass moves: a paused or waiting one has no rate and no ETA (the last
    // pass's figures would promise progress nothing is making).
    if (p.state != ResyncState::kRunning) {
      p.rate_bytes_per_s = 0;
      p.eta_seconds = p.state == ResyncState::kDone ? 0 : -1;
    }
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

bool MirrorDevice::resync_paused() const {
  std::lock_guard<std::mutex> l(impl_->mu_);
  return impl_->paused_;
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

}  // namespace dst
