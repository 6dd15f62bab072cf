// DirtyMap: a bitset with one bit per fixed-size region of a device.
//
// Used for the mirror's write-intent map and for each leg's out-of-sync map.  Pure logic: no I/O,
// no locking, no store.  The map is split into chunks of kChunkBytes bytes of bits so a store can
// persist only the chunks a change touched (DirtyMapStore, group commit in MirrorDevice).
//
// Region i covers bytes [i * region_size, min((i + 1) * region_size, device_size)); the last region
// may be short.  Byte ranges map to the *covering* regions.
//
// Threading: none.  The owner serialises access (MirrorDevice holds its mutex).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "dst/status.h"

namespace dst {

class DirtyMap {
 public:
  static constexpr std::uint32_t kDefaultRegionSize = 64 * 1024;  // see docs/architecture.md
  static constexpr std::size_t kChunkBytes = 4096;                 // persistence unit
  static constexpr std::uint64_t kRegionsPerChunk = kChunkBytes * 8;

  DirtyMap() = default;
  // REQUIRES: region_size is a power of two >= 512.
  DirtyMap(std::uint64_t device_size, std::uint32_t region_size);

  // Resizes (bits beyond the old end start clear; bits beyond the new end are dropped).
  void Resize(std::uint64_t device_size);

  std::uint64_t device_size() const { return device_size_; }
  std::uint32_t region_size() const { return region_size_; }
  std::uint64_t regions() const { return regions_; }
  std::uint64_t chunks() const { return (regions_ + kRegionsPerChunk - 1) / kRegionsPerChunk; }

  // Covering regions of a byte range: [*first, *last_plus_one).  len 0 -> empty.
  void RegionsOf(std::uint64_t offset, std::uint64_t len, std::uint64_t* first,
                 std::uint64_t* end) const;
  // Bytes of region i (region_size, or less for the last one).
  std::uint64_t RegionBytes(std::uint64_t i) const;

  bool Test(std::uint64_t region) const {
    return (words_[region >> 6] >> (region & 63)) & 1u;
  }
  // Returns true when the bit changed.
  bool Set(std::uint64_t region);
  bool Clear(std::uint64_t region);

  // Byte-range forms (covering regions).  Return how many bits changed.
  std::uint64_t SetRange(std::uint64_t offset, std::uint64_t len);
  std::uint64_t ClearRange(std::uint64_t offset, std::uint64_t len);
  bool AnySet(std::uint64_t offset, std::uint64_t len) const;  // any covering region set
  bool AllSet(std::uint64_t offset, std::uint64_t len) const;  // every covering region set

  // Region-index forms over [first, end).
  std::uint64_t SetRegions(std::uint64_t first, std::uint64_t end);
  std::uint64_t ClearRegions(std::uint64_t first, std::uint64_t end);
  bool AllSetRegions(std::uint64_t first, std::uint64_t end) const;

  void SetAll();
  void ClearAll();
  std::uint64_t Count() const;          // set bits
  std::uint64_t DirtyBytes() const;     // bytes covered by set bits (last region clamped)
  bool Empty() const { return Count() == 0; }

  // First set bit at or after `from`; regions() when none.
  std::uint64_t NextSet(std::uint64_t from) const;
  // First clear bit at or after `from`; regions() when none.
  std::uint64_t NextClear(std::uint64_t from) const;

  // Calls fn(first_region, end_region) for every maximal run of set bits in [from, to).
  template <typename Fn>
  void ForEachRun(Fn&& fn, std::uint64_t from = 0, std::uint64_t to = UINT64_MAX) const {
    if (to > regions_) to = regions_;
    std::uint64_t i = NextSet(from);
    while (i < to) {
      std::uint64_t e = NextClear(i);
      if (e > to) e = to;
      fn(i, e);
      i = NextSet(e);
    }
  }

  // this |= other.  REQUIRES: same geometry.
  void Merge(const DirtyMap& other);
  // this &= ~other.  REQUIRES: same geometry.
  void Subtract(const DirtyMap& other);

  // Whole-map serialisation: little-endian header (magic, version, device size, region size)
  // followed by the bits.  Deserialize checks the header and length.
  std::string Serialize() const;
  static Result<DirtyMap> Deserialize(std::string_view bytes);

  // Chunk access for stores: chunk c holds regions [c * kRegionsPerChunk, ...), LSB first, and is
  // exactly kChunkBytes long (bits past the end are zero).
  std::string ChunkBytes(std::uint64_t chunk) const;
  void ChunkBytesInto(std::uint64_t chunk, std::string* out) const;
  // ORs (or replaces, if replace) chunk contents; bytes may be shorter than kChunkBytes.
  void LoadChunk(std::uint64_t chunk, std::string_view bytes, bool replace = false);
  static std::uint64_t ChunkOf(std::uint64_t region) { return region / kRegionsPerChunk; }

  bool operator==(const DirtyMap& o) const {
    return device_size_ == o.device_size_ && region_size_ == o.region_size_ && words_ == o.words_;
  }

 private:
  void MaskTail();
  std::uint64_t device_size_ = 0;
  std::uint32_t region_size_ = kDefaultRegionSize;
  std::uint64_t regions_ = 0;
  std::vector<std::uint64_t> words_;
};

}  // namespace dst
