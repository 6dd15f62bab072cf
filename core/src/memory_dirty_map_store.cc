#include <chrono>
#include <cstdio>
#include <map>
#include <random>
#include <thread>

#include "dst/dirty_map_store.h"

namespace dst {

const char* LegStateName(LegState s) {
  switch (s) {
    case LegState::kUpToDate: return "up-to-date";
    case LegState::kResyncing: return "resyncing";
    case LegState::kFailed: return "failed";
    case LegState::kDetached: return "detached";
    case LegState::kEmpty: return "empty";
  }
  return "unknown";
}

bool ParseLegState(const std::string& s, LegState* out) {
  for (auto st : {LegState::kUpToDate, LegState::kResyncing, LegState::kFailed, LegState::kDetached,
                  LegState::kEmpty}) {
    if (s == LegStateName(st)) {
      *out = st;
      return true;
    }
  }
  return false;
}

std::string NewUuid() {
  static std::mutex mu;
  static std::mt19937_64 rng(std::random_device{}() ^
                             static_cast<std::uint64_t>(
                                 std::chrono::steady_clock::now().time_since_epoch().count()));
  std::uint64_t a, b;
  {
    std::lock_guard<std::mutex> l(mu);
    a = rng();
    b = rng();
  }
  a = (a & ~0xF000ull) | 0x4000ull;                         // version 4
  b = (b & ~(0xC000ull << 48)) | (0x8000ull << 48);         // variant 10
  char buf[40];
  std::snprintf(buf, sizeof buf, "%08x-%04x-%04x-%04x-%012llx", static_cast<unsigned>(a >> 32),
                static_cast<unsigned>((a >> 16) & 0xffff), static_cast<unsigned>(a & 0xffff),
                static_cast<unsigned>(b >> 48),
                static_cast<unsigned long long>(b & 0xffffffffffffull));
  return buf;
}

struct MemoryDirtyMapStore::ArrayData {
  ArrayRecord rec;
  std::map<std::pair<std::int32_t, std::uint64_t>, std::string> chunks;
  std::map<std::int32_t, ResyncCheckpoint> checkpoints;
};

MemoryDirtyMapStore::MemoryDirtyMapStore() = default;
MemoryDirtyMapStore::~MemoryDirtyMapStore() = default;

MemoryDirtyMapStore::ArrayData* MemoryDirtyMapStore::Find(const std::string& id) {
  for (auto& a : arrays_)
    if (a->rec.id == id) return a.get();
  return nullptr;
}

Status MemoryDirtyMapStore::PutArray(const ArrayRecord& rec) {
  std::lock_guard<std::mutex> l(mu_);
  ArrayData* a = Find(rec.id);
  if (!a) {
    arrays_.push_back(std::make_unique<ArrayData>());
    a = arrays_.back().get();
  }
  a->rec = rec;
  return Status::OK();
}

Result<ArrayRecord> MemoryDirtyMapStore::GetArray(const std::string& id) {
  std::lock_guard<std::mutex> l(mu_);
  ArrayData* a = Find(id);
  if (!a) return Status::NotFound("array " + id);
  return a->rec;
}

Result<std::vector<std::string>> MemoryDirtyMapStore::ListArrays() {
  std::lock_guard<std::mutex> l(mu_);
  std::vector<std::string> v;
  for (auto& a : arrays_) v.push_back(a->rec.id);
  return v;
}

Status MemoryDirtyMapStore::DeleteArray(const std::string& id) {
  std::lock_guard<std::mutex> l(mu_);
  for (auto it = arrays_.begin(); it != arrays_.end(); ++it) {
    if ((*it)->rec.id == id) {
      arrays_.erase(it);
      return Status::OK();
    }
  }
  return Status::NotFound("array " + id);
}

Status MemoryDirtyMapStore::Commit(const CommitBatch& b) {
  std::uint32_t delay;
  {
    std::lock_guard<std::mutex> l(mu_);
    delay = delay_us_;
    if (fail_next_ > 0) {
      --fail_next_;
      return Status::IoError("injected commit failure");
    }
  }
  if (delay) std::this_thread::sleep_for(std::chrono::microseconds(delay));
  std::lock_guard<std::mutex> l(mu_);
  ArrayData* a = Find(b.array_id);
  if (!a) return Status::NotFound("array " + b.array_id);
  for (const auto& c : b.chunks) {
    a->chunks[{c.map, c.index}] = c.bits;
    ++chunks_written_;
  }
  for (const auto& cp : b.checkpoints) a->checkpoints[cp.slot] = cp;
  for (const auto& leg : b.legs) {
    bool found = false;
    for (auto& l2 : a->rec.legs) {
      if (l2.slot == leg.slot) {
        l2 = leg;
        found = true;
      }
    }
    if (!found) a->rec.legs.push_back(leg);
  }
  if (b.clean >= 0) a->rec.clean = b.clean != 0;
  ++commits_;
  return Status::OK();
}

Status MemoryDirtyMapStore::LoadMap(const std::string& id, std::int32_t map, DirtyMap* out) {
  std::lock_guard<std::mutex> l(mu_);
  ArrayData* a = Find(id);
  if (!a) return Status::NotFound("array " + id);
  for (const auto& [k, bits] : a->chunks)
    if (k.first == map) out->LoadChunk(k.second, bits);
  return Status::OK();
}

Status MemoryDirtyMapStore::DeleteMap(const std::string& id, std::int32_t map) {
  std::lock_guard<std::mutex> l(mu_);
  ArrayData* a = Find(id);
  if (!a) return Status::NotFound("array " + id);
  for (auto it = a->chunks.begin(); it != a->chunks.end();) {
    if (it->first.first == map)
      it = a->chunks.erase(it);
    else
      ++it;
  }
  return Status::OK();
}

Result<std::vector<ResyncCheckpoint>> MemoryDirtyMapStore::LoadCheckpoints(const std::string& id) {
  std::lock_guard<std::mutex> l(mu_);
  ArrayData* a = Find(id);
  if (!a) return Status::NotFound("array " + id);
  std::vector<ResyncCheckpoint> v;
  for (auto& [slot, cp] : a->checkpoints) v.push_back(cp);
  return v;
}

Status MemoryDirtyMapStore::DeleteCheckpoint(const std::string& id, std::int32_t slot) {
  std::lock_guard<std::mutex> l(mu_);
  ArrayData* a = Find(id);
  if (!a) return Status::NotFound("array " + id);
  a->checkpoints.erase(slot);
  return Status::OK();
}

std::uint64_t MemoryDirtyMapStore::commits() const {
  std::lock_guard<std::mutex> l(mu_);
  return commits_;
}

std::uint64_t MemoryDirtyMapStore::chunks_written() const {
  std::lock_guard<std::mutex> l(mu_);
  return chunks_written_;
}

void MemoryDirtyMapStore::SetCommitDelayMicros(std::uint32_t us) {
  std::lock_guard<std::mutex> l(mu_);
  delay_us_ = us;
}

void MemoryDirtyMapStore::FailNextCommits(int n) {
  std::lock_guard<std::mutex> l(mu_);
  fail_next_ = n;
}

bool MemoryDirtyMapStore::DurableBit(const std::string& id, std::int32_t map, std::uint64_t region) {
  std::lock_guard<std::mutex> l(mu_);
  ArrayData* a = Find(id);
  if (!a) return false;
  auto it = a->chunks.find({map, DirtyMap::ChunkOf(region)});
  if (it == a->chunks.end()) return false;
  std::uint64_t bit = region % DirtyMap::kRegionsPerChunk;
  std::size_t byte = static_cast<std::size_t>(bit / 8);
  if (byte >= it->second.size()) return false;
  return (static_cast<unsigned char>(it->second[byte]) >> (bit % 8)) & 1u;
}

}  // namespace dst
