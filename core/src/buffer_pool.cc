#include "dst/buffer_pool.h"

#include <sys/mman.h>

#include <cstdlib>
#include <new>

namespace dst {

BufferPool::BufferPool(std::size_t buffer_size, std::size_t count, std::size_t alignment)
    : buffer_size_(buffer_size), count_(count) {
  bytes_ = buffer_size * count;
  if (bytes_ == 0) return;
  void* p = nullptr;
  if (posix_memalign(&p, alignment, bytes_) != 0) throw std::bad_alloc();
  base_ = static_cast<char*>(p);
  // Fault in and pin the pages now: the data path must not fault memory in under writeback
  // pressure (loop-on-FUSE deadlock).  mlock populates them in the kernel; when it is refused
  // (RLIMIT_MEMLOCK; not fatal) they are touched one by one instead.
  locked_ = (mlock(base_, bytes_) == 0);
  if (!locked_)
    for (std::size_t i = 0; i < bytes_; i += 4096) base_[i] = 0;
  free_.reserve(count);
  for (std::size_t i = count; i-- > 0;) free_.push_back(base_ + i * buffer_size);
}

BufferPool::~BufferPool() {
  if (base_) {
    if (locked_) munlock(base_, bytes_);
    std::free(base_);
  }
}

char* BufferPool::TryGet() {
  std::lock_guard<std::mutex> l(mu_);
  if (free_.empty()) return nullptr;
  char* b = free_.back();
  free_.pop_back();
  return b;
}

char* BufferPool::Get() {
  std::unique_lock<std::mutex> l(mu_);
  cv_.wait(l, [&] { return !free_.empty(); });
  char* b = free_.back();
  free_.pop_back();
  return b;
}

void BufferPool::Put(char* buf) {
  {
    std::lock_guard<std::mutex> l(mu_);
    free_.push_back(buf);  // never reallocates: capacity == count
  }
  cv_.notify_one();
}

bool BufferPool::Owns(const char* p) const { return p >= base_ && p < base_ + bytes_; }

std::size_t BufferPool::available() const {
  std::lock_guard<std::mutex> l(mu_);
  return free_.size();
}

}  // namespace dst
