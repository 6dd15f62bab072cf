// RxBuffer: a per-connection receive buffer that lets a server (or a client) parse every
// request (or reply) a single recv() brought in, instead of one async read (one system call and
// one completion hand-off through the event loop) per 28- or 48-byte header.
//
// A connection reads with async_read_some into Space(), Commit()s what arrived, then takes
// whole headers (Take) and the start of any payload (TakeInto) from the front.  A payload that
// did not fully arrive is read straight into its own buffer afterwards, so a large WRITE is
// copied at most once for the part that came in with its header (bounded by capacity()).
//
// Not thread-safe: owned by one connection, used on its strand.  No allocation after
// construction.
#pragma once

#include <cstddef>
#include <cstring>
#include <memory>

#include <boost/asio/buffer.hpp>

namespace dst::net {

class RxBuffer {
 public:
  // Holds a burst of small frames (over a thousand 48-byte headers, or a dozen 4 KiB payloads).
  static constexpr std::size_t kDefaultCapacity = 64u << 10;

  explicit RxBuffer(std::size_t capacity = kDefaultCapacity) : buf_(new char[capacity]), cap_(capacity) {}

  std::size_t size() const { return end_ - begin_; }
  std::size_t capacity() const { return cap_; }
  const char* data() const { return buf_.get() + begin_; }

  // Copies n (<= size()) bytes to dst and drops them.
  void Take(void* dst, std::size_t n) {
    std::memcpy(dst, buf_.get() + begin_, n);
    Consume(n);
  }
  // Copies up to n buffered bytes to dst, drops them, returns how many.
  std::size_t TakeInto(void* dst, std::size_t n) {
    if (n > size()) n = size();
    Take(dst, n);
    return n;
  }
  // Drops up to n buffered bytes (a payload being discarded), returns how many.
  std::size_t Skip(std::size_t n) {
    if (n > size()) n = size();
    Consume(n);
    return n;
  }
  void Consume(std::size_t n) {
    begin_ += n;
    if (begin_ == end_) begin_ = end_ = 0;
  }

  // Free space at the end, after moving a partial frame (a few bytes) to the front.
  boost::asio::mutable_buffer Space() {
    if (begin_ > 0) {
      std::memmove(buf_.get(), buf_.get() + begin_, end_ - begin_);
      end_ -= begin_;
      begin_ = 0;
    }
    return boost::asio::buffer(buf_.get() + end_, cap_ - end_);
  }
  void Commit(std::size_t n) { end_ += n; }
  void Clear() { begin_ = end_ = 0; }

 private:
  std::unique_ptr<char[]> buf_;
  std::size_t cap_;
  std::size_t begin_ = 0;
  std::size_t end_ = 0;
};

}  // namespace dst::net
