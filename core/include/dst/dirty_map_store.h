// DirtyMapStore: where array metadata, leg identities, dirty maps and resync checkpoints persist.
//
// The map logic (DirtyMap, MirrorDevice's group commit) never touches SQLite; it hands a
// CommitBatch to a store.  Implementations: MemoryDirtyMapStore (tests; optional injected commit
// delay and failures) and SqliteDirtyMapStore (production; WAL, synchronous=FULL).
//
// Maps are persisted as chunks of DirtyMap::kChunkBytes bytes of bits, keyed by
// (array id, map id, chunk index).  Map id kIntentMap is the array's write-intent map; map id
// k >= 0 is the out-of-sync map of leg slot k.
//
// Durability contract: when Commit() returns OK, everything in the batch survives a crash of this
// process and of the host.  Commit() is atomic: all of the batch or none of it.
//
// Threading: every method is thread-safe.  Commit() blocks (fsync); call it from a writer thread,
// never from an event loop or a device completion.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "dst/dirty_map.h"
#include "dst/status.h"

namespace dst {

inline constexpr std::int32_t kIntentMap = -1;

enum class LegState : std::uint8_t {
  kUpToDate = 0,  // holds every acknowledged write; serves reads
  kResyncing,     // receives writes, not reads; out-of-sync regions being copied to it
  kFailed,        // I/O error or unreachable; no I/O; misses are tracked in its out-of-sync map
  kDetached,      // detached by the operator (snapshot); misses are tracked
  kEmpty,         // slot unused (removed leg)
};
const char* LegStateName(LegState s);
bool ParseLegState(const std::string& s, LegState* out);

struct LegRecord {
  std::int32_t slot = 0;
  std::string generation;  // random UUID written on the leg header and here
  LegState state = LegState::kUpToDate;
  std::string describe;    // human description of the device last used in this slot
  // Identity (mirror_device.h "Generations"): earlier generations of this slot, newest first,
  // comma-separated; and why the leg is out of service ("" when it is not), e.g. "blank".
  std::string history;
  std::string reason;
};

struct ArrayRecord {
  std::string id;          // array UUID
  std::string name;
  std::string kind;        // "mirror" (linear arrays keep no maps)
  std::uint64_t size = 0;  // usable bytes
  std::uint32_t region_size = DirtyMap::kDefaultRegionSize;
  bool clean = false;      // set on orderly close: the intent map is empty and legs flushed
  std::vector<LegRecord> legs;
};

struct MapChunk {
  std::int32_t map = kIntentMap;
  std::uint64_t index = 0;
  std::string bits;  // kChunkBytes bytes; all-zero chunks may be deleted by the store
};

struct ResyncCheckpoint {
  std::int32_t slot = 0;
  std::uint64_t next_offset = 0;  // first byte not yet known copied in this pass
  std::uint64_t bytes_done = 0;
  std::uint64_t bytes_total = 0;
};

// One atomic, durable transaction.
struct CommitBatch {
  std::string array_id;
  std::vector<MapChunk> chunks;
  std::vector<ResyncCheckpoint> checkpoints;
  std::vector<LegRecord> legs;   // upserted leg records
  int clean = -1;                // -1 keep, 0/1 set ArrayRecord::clean
  bool empty() const { return chunks.empty() && checkpoints.empty() && legs.empty() && clean < 0; }
};

class DirtyMapStore {
 public:
  virtual ~DirtyMapStore() = default;
  // Inserts or replaces the array row and its leg rows (legs not listed are deleted).
  virtual Status PutArray(const ArrayRecord& rec) = 0;
  virtual Result<ArrayRecord> GetArray(const std::string& id) = 0;
  virtual Result<std::vector<std::string>> ListArrays() = 0;
  // Deletes the array with its legs, maps and checkpoints.
  virtual Status DeleteArray(const std::string& id) = 0;
  virtual Status Commit(const CommitBatch& batch) = 0;
  // ORs the stored chunks of map `map` into *out (which the caller sized).
  virtual Status LoadMap(const std::string& id, std::int32_t map, DirtyMap* out) = 0;
  // Drops every chunk of one map (e.g. a removed leg slot).
  virtual Status DeleteMap(const std::string& id, std::int32_t map) = 0;
  virtual Result<std::vector<ResyncCheckpoint>> LoadCheckpoints(const std::string& id) = 0;
  virtual Status DeleteCheckpoint(const std::string& id, std::int32_t slot) = 0;
  // Number of successful Commit() calls since open (for commits/s reporting).
  virtual std::uint64_t commits() const = 0;
};

// In-memory store for tests: same semantics minus durability across process exit.  A test may
// keep the object alive across a simulated crash (drop the MirrorDevice, re-assemble).
class MemoryDirtyMapStore : public DirtyMapStore {
 public:
  MemoryDirtyMapStore();
  ~MemoryDirtyMapStore() override;
  Status PutArray(const ArrayRecord& rec) override;
  Result<ArrayRecord> GetArray(const std::string& id) override;
  Result<std::vector<std::string>> ListArrays() override;
  Status DeleteArray(const std::string& id) override;
  Status Commit(const CommitBatch& batch) override;
  Status LoadMap(const std::string& id, std::int32_t map, DirtyMap* out) override;
  Status DeleteMap(const std::string& id, std::int32_t map) override;
  Result<std::vector<ResyncCheckpoint>> LoadCheckpoints(const std::string& id) override;
  Status DeleteCheckpoint(const std::string& id, std::int32_t slot) override;
  std::uint64_t commits() const override;

  // Test hooks.
  void SetCommitDelayMicros(std::uint32_t us);   // sleep inside Commit() before applying
  void FailNextCommits(int n);                   // the next n Commit() calls return IoError
  // Test oracle: is region `region` of map `map` set in the *durable* state?
  bool DurableBit(const std::string& id, std::int32_t map, std::uint64_t region);
  std::uint64_t chunks_written() const;

 private:
  struct ArrayData;
  mutable std::mutex mu_;
  std::vector<std::unique_ptr<ArrayData>> arrays_;
  ArrayData* Find(const std::string& id);
  std::uint64_t commits_ = 0;
  std::uint64_t chunks_written_ = 0;
  std::uint32_t delay_us_ = 0;
  int fail_next_ = 0;
};

// SQLite store.  One database file (the daemon's state DB may be the same file: tables are
// prefixed dst_).  WAL journal with synchronous=FULL: a write waits for its intent bit, so a
// commit must be durable when it returns (NORMAL in WAL mode may roll back the last commits on
// power loss, which would break the write-intent guarantee).
class SqliteDirtyMapStore : public DirtyMapStore {
 public:
  static Result<std::unique_ptr<SqliteDirtyMapStore>> Open(const std::string& path);
  ~SqliteDirtyMapStore() override;

  Status PutArray(const ArrayRecord& rec) override;
  Result<ArrayRecord> GetArray(const std::string& id) override;
  Result<std::vector<std::string>> ListArrays() override;
  Status DeleteArray(const std::string& id) override;
  Status Commit(const CommitBatch& batch) override;
  Status LoadMap(const std::string& id, std::int32_t map, DirtyMap* out) override;
  Status DeleteMap(const std::string& id, std::int32_t map) override;
  Result<std::vector<ResyncCheckpoint>> LoadCheckpoints(const std::string& id) override;
  Status DeleteCheckpoint(const std::string& id, std::int32_t slot) override;
  std::uint64_t commits() const override;

  class Impl;
 private:
  explicit SqliteDirtyMapStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Random RFC 4122 version-4 UUID string (leg generations, array ids).
std::string NewUuid();

}  // namespace dst
