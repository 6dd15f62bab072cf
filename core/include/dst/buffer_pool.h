// BufferPool: a fixed set of equal, aligned I/O buffers allocated once at start-up.
//
// The data path takes buffers from here instead of the heap, so steady-state I/O does not
// allocate and a loop-on-FUSE setup does not need memory from the kernel to make progress
// (the buffers are mlock()ed when the process may).
//
// Threading: all methods are thread-safe.  Get() blocks and must not run on an event-loop thread;
// event loops use TryGet() and queue the work when it returns nullptr.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <vector>

namespace dst {

class BufferPool {
 public:
  // REQUIRES: buffer_size and alignment are powers of two or multiples of 4096.
  BufferPool(std::size_t buffer_size, std::size_t count, std::size_t alignment = 4096);
  ~BufferPool();
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  char* TryGet();                 // nullptr when empty
  char* Get();                    // waits until a buffer is free
  void Put(char* buf);            // REQUIRES: buf came from this pool
  bool Owns(const char* p) const;

  std::size_t buffer_size() const { return buffer_size_; }
  std::size_t count() const { return count_; }
  std::size_t available() const;
  bool locked() const { return locked_; }  // true when mlock() succeeded

 private:
  std::size_t buffer_size_;
  std::size_t count_;
  char* base_ = nullptr;
  std::size_t bytes_ = 0;
  bool locked_ = false;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<char*> free_;  // GUARDED_BY(mu_); capacity reserved up front
};

}  // namespace dst
