#include "dst/dirty_map.h"

#include <bit>
#include <cstring>

namespace dst {

namespace {
constexpr std::uint32_t kMapMagic = 0x44534D50;  // "DSMP"
constexpr std::uint32_t kMapVersion = 1;
constexpr std::size_t kWordsPerChunk = DirtyMap::kChunkBytes / 8;

void PutLe64(std::string* s, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
std::uint64_t GetLe64(const char* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}
}  // namespace

DirtyMap::DirtyMap(std::uint64_t device_size, std::uint32_t region_size)
    : region_size_(region_size) {
  Resize(device_size);
}

void DirtyMap::Resize(std::uint64_t device_size) {
  device_size_ = device_size;
  regions_ = region_size_ ? (device_size + region_size_ - 1) / region_size_ : 0;
  words_.resize(chunks() * kWordsPerChunk, 0);
  MaskTail();
}

void DirtyMap::MaskTail() {
  std::uint64_t used_words = (regions_ + 63) / 64;
  for (std::size_t w = used_words; w < words_.size(); ++w) words_[w] = 0;
  if (regions_ % 64 != 0 && used_words > 0)
    words_[used_words - 1] &= (std::uint64_t{1} << (regions_ % 64)) - 1;
}

void DirtyMap::RegionsOf(std::uint64_t offset, std::uint64_t len, std::uint64_t* first,
                         std::uint64_t* end) const {
  if (len == 0 || offset >= device_size_) {
    *first = *end = 0;
    return;
  }
  std::uint64_t last_byte = offset + len - 1;
  if (last_byte >= device_size_) last_byte = device_size_ - 1;
  *first = offset / region_size_;
  *end = last_byte / region_size_ + 1;
}

std::uint64_t DirtyMap::RegionBytes(std::uint64_t i) const {
  std::uint64_t start = i * region_size_;
  if (start >= device_size_) return 0;
  std::uint64_t left = device_size_ - start;
  return left < region_size_ ? left : region_size_;
}

bool DirtyMap::Set(std::uint64_t r) {
  std::uint64_t bit = std::uint64_t{1} << (r & 63);
  std::uint64_t& w = words_[r >> 6];
  bool changed = !(w & bit);
  w |= bit;
  return changed;
}

bool DirtyMap::Clear(std::uint64_t r) {
  std::uint64_t bit = std::uint64_t{1} << (r & 63);
  std::uint64_t& w = words_[r >> 6];
  bool changed = (w & bit) != 0;
  w &= ~bit;
  return changed;
}

std::uint64_t DirtyMap::SetRegions(std::uint64_t first, std::uint64_t end) {
  std::uint64_t n = 0;
  if (end > regions_) end = regions_;
  for (std::uint64_t r = first; r < end; ++r) n += Set(r);
  return n;
}

std::uint64_t DirtyMap::ClearRegions(std::uint64_t first, std::uint64_t end) {
  std::uint64_t n = 0;
  if (end > regions_) end = regions_;
  for (std::uint64_t r = first; r < end; ++r) n += Clear(r);
  return n;
}

bool DirtyMap::AllSetRegions(std::uint64_t first, std::uint64_t end) const {
  if (end > regions_) end = regions_;
  for (std::uint64_t r = first; r < end; ++r)
    if (!Test(r)) return false;
  return true;
}

std::uint64_t DirtyMap::SetRange(std::uint64_t offset, std::uint64_t len) {
  std::uint64_t f, e;
  RegionsOf(offset, len, &f, &e);
  return SetRegions(f, e);
}

std::uint64_t DirtyMap::ClearRange(std::uint64_t offset, std::uint64_t len) {
  std::uint64_t f, e;
  RegionsOf(offset, len, &f, &e);
  return ClearRegions(f, e);
}

bool DirtyMap::AnySet(std::uint64_t offset, std::uint64_t len) const {
  std::uint64_t f, e;
  RegionsOf(offset, len, &f, &e);
  return f < e && NextSet(f) < e;
}

bool DirtyMap::AllSet(std::uint64_t offset, std::uint64_t len) const {
  std::uint64_t f, e;
  RegionsOf(offset, len, &f, &e);
  return AllSetRegions(f, e);
}

void DirtyMap::SetAll() {
  for (auto& w : words_) w = ~std::uint64_t{0};
  MaskTail();
}

void DirtyMap::ClearAll() {
  for (auto& w : words_) w = 0;
}

std::uint64_t DirtyMap::Count() const {
  std::uint64_t n = 0;
  for (auto w : words_) n += static_cast<std::uint64_t>(std::popcount(w));
  return n;
}

std::uint64_t DirtyMap::DirtyBytes() const {
  std::uint64_t n = Count() * region_size_;
  if (regions_ > 0 && Test(regions_ - 1)) n -= region_size_ - RegionBytes(regions_ - 1);
  return n;
}

std::uint64_t DirtyMap::NextSet(std::uint64_t from) const {
  if (from >= regions_) return regions_;
  std::size_t wi = from >> 6;
  std::uint64_t w = words_[wi] & (~std::uint64_t{0} << (from & 63));
  while (true) {
    if (w) {
      std::uint64_t r = (wi << 6) + static_cast<std::uint64_t>(std::countr_zero(w));
      return r < regions_ ? r : regions_;
    }
    if (++wi >= words_.size()) return regions_;
    w = words_[wi];
  }
}

std::uint64_t DirtyMap::NextClear(std::uint64_t from) const {
  if (from >= regions_) return regions_;
  std::size_t wi = from >> 6;
  std::uint64_t w = ~words_[wi] & (~std::uint64_t{0} << (from & 63));
  while (true) {
    if (w) {
      std::uint64_t r = (wi << 6) + static_cast<std::uint64_t>(std::countr_zero(w));
      return r < regions_ ? r : regions_;
    }
    if (++wi >= words_.size()) return regions_;
    w = ~words_[wi];
  }
}

void DirtyMap::Merge(const DirtyMap& o) {
  std::size_t n = std::min(words_.size(), o.words_.size());
  for (std::size_t i = 0; i < n; ++i) words_[i] |= o.words_[i];
  MaskTail();
}

void DirtyMap::Subtract(const DirtyMap& o) {
  std::size_t n = std::min(words_.size(), o.words_.size());
  for (std::size_t i = 0; i < n; ++i) words_[i] &= ~o.words_[i];
}

std::string DirtyMap::Serialize() const {
  std::string s;
  std::uint64_t used_words = (regions_ + 63) / 64;
  s.reserve(24 + used_words * 8);
  PutLe64(&s, (std::uint64_t{kMapVersion} << 32) | kMapMagic);
  PutLe64(&s, device_size_);
  PutLe64(&s, region_size_);
  for (std::uint64_t i = 0; i < used_words; ++i) PutLe64(&s, words_[i]);
  return s;
}

Result<DirtyMap> DirtyMap::Deserialize(std::string_view b) {
  if (b.size() < 24) return Status::InvalidArgument("dirty map: short header");
  std::uint64_t mv = GetLe64(b.data());
  if ((mv & 0xffffffffu) != kMapMagic || (mv >> 32) != kMapVersion)
    return Status::InvalidArgument("dirty map: bad magic or version");
  std::uint64_t size = GetLe64(b.data() + 8);
  std::uint64_t rs = GetLe64(b.data() + 16);
  if (rs < 512 || rs > (1u << 30) || (rs & (rs - 1)) != 0)
    return Status::InvalidArgument("dirty map: bad region size");
  DirtyMap m(size, static_cast<std::uint32_t>(rs));
  std::uint64_t used_words = (m.regions_ + 63) / 64;
  if (b.size() != 24 + used_words * 8) return Status::InvalidArgument("dirty map: bad length");
  for (std::uint64_t i = 0; i < used_words; ++i) m.words_[i] = GetLe64(b.data() + 24 + 8 * i);
  m.MaskTail();
  return m;
}

void DirtyMap::ChunkBytesInto(std::uint64_t chunk, std::string* out) const {
  out->assign(kChunkBytes, '\0');
  if (chunk >= chunks()) return;
  const std::uint64_t* w = &words_[chunk * kWordsPerChunk];
  char* p = out->data();
  for (std::size_t i = 0; i < kWordsPerChunk; ++i)
    for (int b = 0; b < 8; ++b) p[i * 8 + b] = static_cast<char>((w[i] >> (8 * b)) & 0xff);
}

std::string DirtyMap::ChunkBytes(std::uint64_t chunk) const {
  std::string s;
  ChunkBytesInto(chunk, &s);
  return s;
}

void DirtyMap::LoadChunk(std::uint64_t chunk, std::string_view bytes, bool replace) {
  if (chunk >= chunks()) return;
  std::uint64_t* w = &words_[chunk * kWordsPerChunk];
  for (std::size_t i = 0; i < kWordsPerChunk; ++i) {
    std::uint64_t v = 0;
    for (int b = 7; b >= 0; --b) {
      std::size_t idx = i * 8 + static_cast<std::size_t>(b);
      v = (v << 8) | (idx < bytes.size() ? static_cast<unsigned char>(bytes[idx]) : 0u);
    }
    w[i] = replace ? v : (w[i] | v);
  }
  MaskTail();
}

}  // namespace dst
