// MirrorDevice: an N-way mirror (RAID1, 2 <= N <= kMaxLegs) over any BlockDevices, with a
// persistent write-intent map, per-leg out-of-sync maps, leg identities and background resync.
//
// Geometry: every leg carries a 4 KiB identity header in its last 4 KiB-aligned block (magic,
// array UUID, slot, leg generation UUID, region size, array size).  The mirror's size is the
// smallest leg's data area (leg size rounded down to 4 KiB, minus the header), rounded down to
// the array block size (largest leg block size).  Data sits at the same offsets on every leg,
// so a detached leg is a plain image of the array (snapshot) that can be exported on its own.
//
// Write path (also trim and write-zeroes):
//
//   Submit --pool dry--> [wait for a context]
//     |
//     v
//   window of a running resync overlaps? --yes--> [wait for the window copy]
//     | no
//     v
//   intent bits of the covering regions durable? --no--> set bits, [wait for group commit]
//     | yes                                                  (one writer thread, one commit
//     v                                                       in flight, many regions each)
//   FAN_OUT to every up-to-date and resyncing leg; failed/detached legs get out-of-sync bits
//     |  each leg done (error -> leg Failed, its out-of-sync bits set)
//     v
//   complete: OK if at least one leg succeeded, else EIO
//
// Reads go to one up-to-date leg (least pending, tie -> nearest last position); an error fails
// that leg and retries on another; no up-to-date leg -> EIO.  Flush goes to every up leg; a leg
// whose flush fails is failed and gets the whole intent map as out-of-sync bits.
//
// Crash safety (invariant): persisted intent map U persisted out-of-sync map of leg L covers every
// region whose content on L may differ from an up-to-date leg.  Intent bits are cleared lazily by
// the writer thread: only regions untouched for a full quiet period, with no older write still
// in flight, after a flush of every up leg; the clear is committed in the same or a later
// transaction than any out-of-sync bit set for those regions.
//
// Assembly: a leg whose header matches the stored generation gets a partial resync of its
// out-of-sync bits (none if it has none); a blank leg gets a new generation and a full resync;
// a foreign leg, one of an older generation, one that diverged (split brain) or one claimed by
// another host with a live lease stays failed with that reason until an explicit ReAddLeg
// (or Resolve).  The same check runs on every reconnect of a leg (ConnectCheck) and at every
// lease renewal.  After an unclean shutdown the intent map is OR-ed into the out-of-sync maps
// of every leg except the first up-to-date one, which becomes the resync source.
//
// Threading: Submit/Info are thread-safe and never block on I/O or on SQLite (writes wait for
// the group commit asynchronously).  Management methods (AddLeg, FailLeg, ...) are thread-safe
// and may block briefly (header I/O, draining a leg); never call them from a device completion.
// Three internal threads: the map writer (group commit + lazy clear), the resync thread (which
// also runs online verify, so a verify and a resync never overlap) and the identity thread
// (lease renewal, periodic header checks, re-initialising blank replacements).
// No heap allocation per I/O: parent contexts (with inline child requests) come from a pool.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string_view>
#include <string>
#include <vector>

#include "dst/block_device.h"
#include "dst/dirty_map_store.h"
#include "dst/layer.h"
#include "dst/resync.h"

namespace dst {

// Why a leg is out of service (LegStatus::reason).  The identity reasons (blank and below) come
// from the leg's header, checked at attach, on every reconnect (ConnectCheck) and at every lease
// renewal; see "Generations and claims" in docs/architecture.md.
enum class LegReason : std::uint8_t {
  kNone = 0,
  kIoError,          // an I/O error (re-added automatically when the device answers again)
  kUnreachable,      // the header could not be read (connection down)
  kOperator,         // fail-leg / detach-leg
  kBlank,            // no header: a replacement; full resync at once (no operator needed)
  kForeign,          // another array's (or another slot's) header: explicit re-add
  kOlderGeneration,  // our array, but a generation this slot left behind: explicit re-add
  kDiverged,         // written by another assembler after it left us: split brain (resolve)
  kClaimed,          // another host holds (or took) the lease on it: explicit re-add
};
const char* LegReasonName(LegReason r);
// Identity reasons that only an operator may clear (never re-added automatically).
bool LegReasonNeedsOperator(LegReason r);

struct MirrorOptions {
  std::string name;                      // for Describe() and the store record
  std::uint32_t region_size = DirtyMap::kDefaultRegionSize;  // bitmap granularity, power of 2
  std::size_t max_inflight = 256;        // pooled parent contexts
  std::uint32_t quiet_ms = 5000;         // lazy clear: region untouched this long
  std::uint32_t min_commit_interval_us = 0;  // extra bound on the commit rate (one in flight always)
  bool write_intent = true;              // false: no intent map (crash of assembler -> full resync)
  bool assume_clean = false;             // Create(): legs hold identical data, skip initial sync
  bool force_assemble = false;           // Assemble(): no up-to-date leg -> take the first present
                                         // leg of ours that is not blank (mdadm --force)
  ResyncOptions resync;
  // Claims: the assembling host's lease in every leg header.  host_id empty: no claims (tests,
  // tools); the headers are still re-checked every renew_ms.
  std::string host_id;
  std::string host_name;
  std::uint32_t lease_ms = 15000;
  std::uint32_t renew_ms = 5000;         // lease renewal and periodic header re-check
  bool force_create = false;             // Create(): overwrite another array's leg headers
  bool new_generations = false;          // Assemble(): every leg up starts a new generation
                                         // (a takeover: see Import())
};

struct LegStatus {
  int slot = -1;
  LegState state = LegState::kEmpty;
  std::string generation;
  std::string describe;
  std::uint64_t out_of_sync_bytes = 0;
  std::uint32_t pending = 0;
  LegReason reason = LegReason::kNone;   // why it is not up (kNone when up)
  std::string reason_text;               // for humans, names the header's owner/array
  std::vector<std::string> history;      // earlier generations of this slot, newest first
  std::string owner_id, owner_name;      // claim as last seen on the header ("" unclaimed)
  std::uint64_t lease_expiry_ms = 0;     // unix ms
  std::string identity_event;            // last identity finding ("" none), kept after recovery
  std::uint32_t identity_events = 0;     // how many identity findings so far
};

// A leg's state or reason changed (MirrorDevice::SetLegListener).
struct LegTransition {
  int slot = -1;
  LegState from = LegState::kEmpty, to = LegState::kEmpty;  // equal: only the reason changed
  LegReason reason_from = LegReason::kNone, reason = LegReason::kNone;
  std::string_view reason_text;  // valid during the call only
  std::string_view device;       // the leg device's Describe(); valid during the call only
};

// One side of a split brain as Resolve() would treat it.
struct ResolveStep {
  int slot = -1;
  bool keep = false;
  std::uint64_t bytes_overwritten = 0;   // full resync from the kept leg
};

struct MirrorStats {
  std::uint64_t writes = 0, reads = 0, flushes = 0;
  std::uint64_t read_retries = 0;
  std::uint64_t intent_waits = 0;       // writes that waited for a commit
  std::uint64_t commits = 0;            // group commits done by this array
  std::uint64_t commit_failures = 0;
  std::uint64_t regions_committed = 0;  // intent regions newly marked by writes (then committed)
  std::uint64_t regions_cleared = 0;    // intent regions lazily cleared
  std::uint64_t intent_regions = 0;     // currently set
  double commits_per_second = 0;        // over the last second (or since the last commit)
  std::uint64_t pool_waits = 0;         // parents queued for a context
};

class MirrorDevice : public BlockDevice {
 public:
  static constexpr int kMaxLegs = 8;
  static constexpr std::uint32_t kLegHeaderBytes = 4096;

  // A new array over `legs` (slot = index).  Writes leg headers and the store records.  Unless
  // opts.assume_clean, legs 1..N-1 get a full resync from leg 0.  array_id empty -> new UUID.
  static Result<std::shared_ptr<MirrorDevice>> Create(std::vector<std::shared_ptr<BlockDevice>> legs,
                                                      std::shared_ptr<DirtyMapStore> store,
                                                      const MirrorOptions& opts,
                                                      std::string array_id = {});
  // An existing array from the store; legs[slot] may be nullptr for a missing leg.
  static Result<std::shared_ptr<MirrorDevice>> Assemble(const std::string& array_id,
                                                        std::vector<std::shared_ptr<BlockDevice>> legs,
                                                        std::shared_ptr<DirtyMapStore> store,
                                                        const MirrorOptions& opts);
  // Takes over an existing array from its legs' headers (released by another host, or that
  // host died): every leg must carry the same array UUID; a leg another host holds a live
  // claim on is refused (holder named).  Legs at the newest epoch whose headers say clean are
  // up to date; otherwise the first leg at the newest epoch is the source and every other leg
  // gets a full resync.  Writes the store record (name = opts.name) and returns the array id;
  // then Assemble() it with the legs placed by slot (the second member) and new_generations,
  // so that the previous holder sees any later change as a divergence (split brain).
  static Result<std::pair<std::string, std::vector<std::shared_ptr<BlockDevice>>>> Import(
      std::vector<std::shared_ptr<BlockDevice>> legs, std::shared_ptr<DirtyMapStore> store,
      const MirrorOptions& opts);
  // Usable size of a mirror over devices of these sizes (headers included), for planning.
  static std::uint64_t UsableSize(const std::vector<DeviceInfo>& legs);

  ~MirrorDevice() override;  // Close() if not closed
  // Orderly shutdown: stop resync, wait for in-flight I/O, flush legs, clear the intent map,
  // mark the array clean, release the claims on the leg headers.  REQUIRES: no new Submit().
  Status Close();
  // Simulates a crash of the assembling host for tests: stops threads without flushing,
  // clearing or committing anything further.  The device must not be used afterwards.
  void TEST_Crash();

  DeviceInfo Info() const override;
  void Submit(IoRequest* req) override;
  std::string Describe() const override;

  const std::string& id() const;

  // Management.
  Status FailLeg(int slot);  // by the operator
  // Fails a leg for a reason found outside the I/O path (e.g. the daemon's probe of an idle leg:
  // kUnreachable); the reason decides whether it may be re-added automatically.
  Status FailLeg(int slot, LegReason reason, std::string why);
  Status DetachLeg(int slot);  // snapshot: waits for the leg's in-flight I/O, flushes it
  Result<int> AddLeg(std::shared_ptr<BlockDevice> dev);              // full resync
  // Partial resync if the header matches the slot's generation; otherwise (blank, foreign,
  // older, diverged) a new generation and a full resync.  A leg another host holds a live
  // lease on is refused (Busy, the holder named).
  Status ReAddLeg(int slot, std::shared_ptr<BlockDevice> dev);
  // The same for automatic repair (the daemon's monitor): refuses (Busy) a leg whose reason or
  // header needs the operator (foreign, older generation, split brain, claimed), and a blank
  // one (the mirror re-initialises those itself).
  Status ReAddLegAuto(int slot, std::shared_ptr<BlockDevice> dev);
  Status RemoveLeg(int slot);
  // Ends a split brain: keeps `keep`'s data (it becomes the source, with a new generation) and
  // resyncs every other present leg fully from it.  dry_run: only reports.
  Result<std::vector<ResolveStep>> Resolve(int keep, bool dry_run);
  // True while a leg is failed because it diverged (split brain).
  bool SplitBrain() const;
  std::vector<LegStatus> Legs() const;
  // Called synchronously on every leg state transition and reason change, by the thread that
  // makes it and under the array's lock (so no transition is missed, however short): it must be
  // quick, must not block and must not call into this device.  Transitions made while the
  // array is being assembled (before this is set) are not reported: read Legs() after setting.
  // nullptr removes it.
  using LegListener = std::function<void(const LegTransition&)>;
  void SetLegListener(LegListener fn);
  // The out-of-sync map of leg `slot` over [offset, offset + length) (clamped to the array size)
  // as consecutive runs: sink(arg, run_bytes, dirty) in order, starting at `offset`; dirty runs
  // are the covering regions of whatever that leg misses.  The sink runs under the array's lock:
  // it must be quick, must not block nor call into this device; it returns false to stop early.
  // Nothing is allocated.  NotFound for an empty slot, InvalidArgument for a bad slot/range.
  // (Published over NBD as the metadata context `dst:dirty:<slot>`.)
  using OosRunSink = bool (*)(void* arg, std::uint64_t run_bytes, bool dirty);
  Status VisitOutOfSync(int slot, std::uint64_t offset, std::uint64_t length, OosRunSink sink,
                        void* arg) const;

  // Resync control and progress (one entry per leg slot in use).
  std::vector<ResyncProgress> Progress() const;
  void SetResyncRate(const ResyncRate& rate);  // live
  ResyncRate resync_rate() const;
  // Paused: no pass starts or continues (a running one stops after its window; resuming starts
  // a new pass over what is still out of sync).  Runtime only: not in the metadata.
  void PauseResync(bool paused);
  bool resync_paused() const;
  // Waits until no leg is resyncing (or timeout).  Returns true when idle.
  bool WaitResyncIdle(std::chrono::milliseconds timeout);

  // Online verify (resync.h: VerifyProgress and its state diagram).  StartVerify returns at
  // once; the comparison runs on the resync thread.  Busy while a verify runs or a leg is
  // resyncing (the reason names the leg), Unavailable with fewer than two up-to-date legs.
  Status StartVerify(const VerifyOptions& opts);
  Status CancelVerify();  // NotFound when no verify runs
  VerifyProgress VerifyStatus() const;  // the running verify, else the last one
  // Waits until no verify runs (or timeout).  Returns true when idle.
  bool WaitVerifyIdle(std::chrono::milliseconds timeout);

  MirrorStats Stats() const;
  std::uint64_t TEST_IntentCount() const;
  // Runs one lazy-clear pass now (as if the quiet period had elapsed) and waits for its commit.
  void TEST_LazyClearNow();
  // Waits until every pending map change is committed.
  void TEST_WaitCommitted();
  std::string TEST_DebugState() const;

  class Impl;
 private:
  explicit MirrorDevice(std::unique_ptr<Impl> impl);
  Status ReAddLegImpl(int slot, std::shared_ptr<BlockDevice> dev, bool automatic);
  std::unique_ptr<Impl> impl_;
};

// The mirror's registry keys (MirrorLayer() in the layer list) as typed values.  A key that
// `params` lacks takes its registered default, so resolved and empty params both work.
struct MirrorKeys {
  std::uint32_t region_size = 0;
  std::uint64_t resync_rate_min = 0;  // bytes/s while application I/O is active
  std::uint64_t resync_rate_max = 0;  // bytes/s when idle, 0 = unlimited
  bool write_intent = true;
};
MirrorKeys MirrorKeysFrom(const LayerParams& params);

}  // namespace dst
