// Resync types: options, live rate limits and progress of a mirror's background resync.
//
// The resync itself runs inside MirrorDevice (it must coordinate with the write path), one
// thread per array, one target leg at a time:
//
//   <idle> --leg needs sync--> PICK_WINDOW --> LOCK_WINDOW (block new writes to the window,
//      ^                          |             wait for in-flight writes to it to drain)
//      |                          |                   |
//      |                     (no dirty bits)          v
//      |                          |             COPY dirty runs of the window, source -> target
//      |                          v             (token bucket; max_io_bytes pieces)
//   <done: leg up-to-date> <-- last window      FLUSH target, clear the window's bits in memory,
//                                               UNLOCK window (queued writes go to all legs),
//                                               queue the checkpoint in the group commit and
//                                               wait for the previous window's checkpoint
//
// Correctness against concurrent writes: a write overlapping the locked window waits until the
// window is copied; writes elsewhere go to the target too (it is "resyncing": receives writes,
// serves no reads), so copied windows stay in sync.  A killed resync resumes from the persisted
// out-of-sync map, which lags by at most one window (bytes re-sent <= remainder + one window).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "dst/dirty_map_store.h"

namespace dst {

struct ResyncRate {
  // md style: run at `ceiling` while the array is idle and at `floor` while application I/O is
  // active (any in the last 100 ms).  0 = unlimited.  Bytes/s.
  std::uint64_t floor = 10ull << 20;     // 10 MiB/s (DRBD's 250 KiB/s is too low in practice)
  std::uint64_t ceiling = 200ull << 20;  // 200 MiB/s
};

struct ResyncOptions {
  std::uint32_t window_regions = 16;  // window = window_regions * region_size (1 MiB default)
  ResyncRate rate;
  bool autostart = true;              // start resyncing as soon as a leg needs it
};

enum class ResyncState : std::uint8_t { kIdle = 0, kPending, kRunning, kPaused, kDone, kFailed };
const char* ResyncStateName(ResyncState s);

struct ResyncProgress {
  int leg = -1;
  LegState leg_state = LegState::kUpToDate;
  ResyncState state = ResyncState::kIdle;
  std::uint64_t bytes_done = 0;    // this pass
  std::uint64_t bytes_total = 0;   // this pass (dirty bytes when the pass started, plus new ones)
  std::uint64_t next_offset = 0;   // current window position
  std::uint64_t rate_bytes_per_s = 0;  // measured over the last seconds
  double eta_seconds = -1;         // -1 unknown
  std::uint64_t bytes_resynced_total = 0;  // all passes since assembly (exact accounting)
  // Clamped 0..100; 100 only when done.
  double Percent() const {
    if (bytes_total == 0) return state == ResyncState::kRunning ? 0.0 : 100.0;
    double p = 100.0 * static_cast<double>(bytes_done) / static_cast<double>(bytes_total);
    if (p < 0) p = 0;
    if (p > 100) p = 100;
    if (p >= 100 && state == ResyncState::kRunning) p = 99.9;
    return p;
  }
};

// ---- Online verify ----
//
// A verify compares the up-to-date legs of a mirror region by region.  It runs on the resync
// thread (so it never overlaps a resync pass) and shares the resync token bucket and ResyncRate
// (floor while application I/O is active, ceiling when idle, live changes apply at once); the
// rate counts array bytes compared, so every compared leg is read at that rate.
//
//   StartVerify --(a leg resyncing / verify running: Busy;  < 2 up-to-date legs: Unavailable)
//       |
//       v
//   RUNNING, per window (the resync window: window_regions regions):
//     take tokens (rate limit; nothing locked) --> LOCK_WINDOW (as resync: new writes to the
//     window wait, in-flight ones drain) --> READ the window from the source (first up-to-date
//     leg, the resync source) and from every other up-to-date leg, compare region by region
//     --> record mismatching regions; with repair: set their out-of-sync bits on the legs that
//     differ (leg -> resyncing) --> UNLOCK --> next window
//       |  a leg needs resync: yield; the resync runs on the same thread, then verify resumes
//       |  (waiting_resync = true meanwhile).  A leg read error fails that leg as a read would.
//       v
//   DONE (mismatch count, first kMaxListed offsets) | CANCELLED | FAILED (error says why)
//
// No false mismatches from writes in flight: a window is compared only while no write to it is
// in flight and none can start (LINBIT/drbd#68).
enum class VerifyState : std::uint8_t { kNone = 0, kRunning, kDone, kCancelled, kFailed };
const char* VerifyStateName(VerifyState s);

struct VerifyProgress;

struct VerifyOptions {
  bool repair = false;  // mark mismatching regions out of sync on the differing legs
  // Called once when this verify ends (done, cancelled or failed), with its final progress, on
  // the mirror's resync thread or the thread closing the mirror, outside the mirror's lock.
  std::function<void(const VerifyProgress&)> on_done;
  // Tests only: compare without locking the window (shows that the lock is what prevents
  // false mismatches under concurrent writes).  Never set it in production code.
  bool test_skip_window_lock = false;
};

struct VerifyMismatch {
  std::uint64_t offset = 0;  // byte offset of the region in the array
  std::uint32_t legs = 0;    // bit k set: leg slot k differs from the source leg
};

struct VerifyProgress {
  static constexpr std::size_t kMaxListed = 64;
  std::uint64_t run = 0;        // 1, 2, ... per verify started since assembly; 0 = never ran
  VerifyState state = VerifyState::kNone;
  bool repair = false;
  bool waiting_resync = false;  // paused while a resync (e.g. of repaired regions) runs
  int source_leg = -1;
  std::uint32_t legs_compared = 0;  // bit k: leg slot k took part
  std::uint32_t region_size = 0;
  std::uint64_t bytes_done = 0, bytes_total = 0;
  std::uint64_t rate_bytes_per_s = 0;
  double eta_seconds = -1;
  std::uint64_t mismatch_regions = 0;  // total (every region with any differing leg)
  std::uint64_t mismatch_bytes = 0;
  std::uint64_t repaired_regions = 0;  // marked out of sync for the resync (repair)
  std::uint64_t read_errors = 0;       // leg reads that failed (those legs were failed)
  std::vector<VerifyMismatch> mismatches;  // the first kMaxListed, in offset order
  std::int64_t started_unix_ms = 0, finished_unix_ms = 0;  // wall clock; finished 0 = running
  std::string error;  // why it failed or was cancelled
  double Percent() const {
    if (bytes_total == 0) return state == VerifyState::kRunning ? 0.0 : 100.0;
    double p = 100.0 * static_cast<double>(bytes_done) / static_cast<double>(bytes_total);
    if (p > 100) p = 100;
    if (p >= 100 && state == VerifyState::kRunning) p = 99.9;
    return p;
  }
};

}  // namespace dst
