// Handler memory for the exporter's hot path (private to netdriver/src).
//
// Asio allocates an operation object for every async read and every post.  On an io thread its
// per-thread recycling cache usually absorbs that, but a post from a FileDevice worker thread
// (which has no Asio thread context) and ops that migrate between io threads fall back to
// operator new.  Each connection therefore owns a small arena of fixed slots and binds it to its
// handlers (associated allocator, as in Asio's "allocation" example), plus its strand as the
// associated executor so completions are dispatched through the typed strand, which honours the
// allocator (any_io_executor would drop it).
//
// Slots are claimed with a CAS (allocation may happen on a device thread, release on an io
// thread).  If every slot is busy the arena falls back to the heap, so correctness never
// depends on the slot count; the exporter allocation test checks that it does not happen.
#pragma once

#include <atomic>
#include <cstddef>
#include <memory>
#include <new>
#include <utility>

#include <boost/asio/io_context.hpp>
#include <boost/asio/strand.hpp>

#include "dst/net/transport.h"

namespace dst::net::detail {

class HandlerArena {
 public:
  static constexpr std::size_t kSlots = 8;
  static constexpr std::size_t kSlotSize = 512;

  HandlerArena() {
    for (auto& u : used_) u.store(false, std::memory_order_relaxed);
  }
  HandlerArena(const HandlerArena&) = delete;
  HandlerArena& operator=(const HandlerArena&) = delete;

  void* Allocate(std::size_t n) {
    if (n <= kSlotSize) {
      for (std::size_t i = 0; i < kSlots; ++i) {
        bool expected = false;
        if (!used_[i].load(std::memory_order_relaxed) &&
            used_[i].compare_exchange_strong(expected, true, std::memory_order_acquire))
          return slots_[i].bytes;
      }
    }
    fallbacks_.fetch_add(1, std::memory_order_relaxed);
    return ::operator new(n);
  }

  void Deallocate(void* p) {
    auto* c = static_cast<char*>(p);
    auto* base = reinterpret_cast<char*>(slots_);
    if (c >= base && c < base + sizeof(slots_)) {
      used_[static_cast<std::size_t>(c - base) / sizeof(Slot)].store(false, std::memory_order_release);
      return;
    }
    ::operator delete(p);
  }

  std::uint64_t fallbacks() const { return fallbacks_.load(std::memory_order_relaxed); }

 private:
  struct alignas(std::max_align_t) Slot {
    char bytes[kSlotSize];
  };
  Slot slots_[kSlots];
  std::atomic<bool> used_[kSlots];
  std::atomic<std::uint64_t> fallbacks_{0};
};

template <typename T>
class ArenaAllocator {
 public:
  using value_type = T;
  explicit ArenaAllocator(HandlerArena* a) noexcept : arena_(a) {}
  template <typename U>
  ArenaAllocator(const ArenaAllocator<U>& o) noexcept : arena_(o.arena()) {}  // NOLINT

  T* allocate(std::size_t n) { return static_cast<T*>(arena_->Allocate(sizeof(T) * n)); }
  void deallocate(T* p, std::size_t) noexcept { arena_->Deallocate(p); }
  HandlerArena* arena() const noexcept { return arena_; }

  template <typename U>
  bool operator==(const ArenaAllocator<U>& o) const noexcept { return arena_ == o.arena(); }
  template <typename U>
  bool operator!=(const ArenaAllocator<U>& o) const noexcept { return arena_ != o.arena(); }

 private:
  HandlerArena* arena_;
};

using Strand = boost::asio::strand<boost::asio::io_context::executor_type>;

// A completion handler bound to a connection's arena and strand.
template <typename F>
class BoundHandler {
 public:
  using allocator_type = ArenaAllocator<void>;
  using executor_type = Strand;

  BoundHandler(HandlerArena* arena, const Strand& strand, F f)
      : arena_(arena), strand_(strand), f_(std::move(f)) {}

  allocator_type get_allocator() const noexcept { return allocator_type(arena_); }
  executor_type get_executor() const noexcept { return strand_; }

  template <typename... Args>
  void operator()(Args&&... args) {
    f_(std::forward<Args>(args)...);
  }

 private:
  HandlerArena* arena_;
  Strand strand_;
  F f_;
};

template <typename F>
BoundHandler<F> Bind(HandlerArena* arena, const Strand& strand, F f) {
  return BoundHandler<F>(arena, strand, std::move(f));
}

// Wraps an IoCallback as an Asio handler bound to `arena` and `strand`.  The handler keeps the
// arena alive: a cancelled operation may complete (and free its memory into the arena) after its
// owner is gone, e.g. a Transmitter's writable-wait, which holds no owner.
inline auto ArenaHandler(const std::shared_ptr<HandlerArena>& arena, const Strand& strand, IoCallback done) {
  return Bind(arena.get(), strand,
              // n defaults for waits, whose completions carry no byte count.
              [keep = arena, cb = std::move(done)](const boost::system::error_code& ec, std::size_t n = 0) mutable {
                cb(ec, n);
              });
}

}  // namespace dst::net::detail
