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

}  // namespace dst
