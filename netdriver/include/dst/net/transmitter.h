// Transmitter: the batched send path of one connection.
//
// Frames (a 48-byte header plus an optional payload pointer) are queued on an intrusive list
// and handed to the kernel in batches: one sendmsg() gathers up to IOV_MAX iovecs or a byte
// budget, i.e. many frames per system call -- the kernel's transmit batching (xmit_more) moved
// to user space.  Payloads are referenced, never copied.  A one-frame-per-call mode exists for
// comparison (benchmarks, `batching = false` in the config).
//
// State of the send side:
//
//      Enqueue()            Kick()/end of turn
//   IDLE ---------> QUEUED -------------------> SENDING --(queue empty)--> IDLE
//                                                 |   ^
//                                      EAGAIN     v   | writable
//                                             WAIT_WRITABLE
//   any state --Abort()--> CLOSED  (every queued frame gets on_sent(frame, false))
//
// Threading: every method runs on the connection's io_context thread (single-threaded use).
// The socket must be in non-blocking mode; the Transmitter sets it.
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <cstdint>
#include <memory>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/ip/tcp.hpp>

#include "dst/net/dst_format.h"

namespace dst::net {

struct TxFrame {
  std::uint8_t header[kHeaderSize];
  // Bytes of `header` to send.  DST frames use all 48; the NBD server sends its shorter
  // reply headers (16/20/28 bytes) through the same transmitter.
  std::uint8_t header_len = kHeaderSize;
  const char* payload = nullptr;
  std::uint32_t payload_len = 0;
  // Called exactly once when the frame has been fully written (ok) or dropped (!ok).  May be
  // null.  The frame may be reused or freed inside the callback.
  void (*on_sent)(TxFrame* f, bool ok) = nullptr;
  void* owner = nullptr;
  TxFrame* next = nullptr;  // owned by the Transmitter while queued
};

struct TxStats {
  std::atomic<std::uint64_t> frames{0};
  std::atomic<std::uint64_t> syscalls{0};  // sendmsg calls that wrote something
  std::atomic<std::uint64_t> bytes{0};
  std::atomic<std::uint64_t> eagain{0};
  double FramesPerCall() const {
    auto s = syscalls.load();
    return s ? double(frames.load()) / double(s) : 0.0;
  }
};

class Transmitter {
 public:
  // `on_error` runs (on the io thread) when the socket fails; the owner then calls Abort().
  Transmitter(boost::asio::ip::tcp::socket& socket, bool batching, TxStats* stats,
              std::size_t max_batch_bytes = 4u << 20);
  ~Transmitter();
  Transmitter(const Transmitter&) = delete;
  Transmitter& operator=(const Transmitter&) = delete;

  // Appends a frame.  Nothing is sent until Flush() (directly, or via Kick()).
  void Enqueue(TxFrame* f);
  // Sends as much as the socket takes now; arms a writable-wait for the rest.  Returns false if
  // the socket failed (all frames dropped).
  bool Flush();
  // Schedules one Flush() at the end of the current event-loop turn, so frames enqueued by the
  // same burst of completions go out in one call.  `guard` keeps the owner alive until then.
  void Kick(std::shared_ptr<void> guard);
  // Drops every queued frame (on_sent(f, false)) and refuses further sends.
  void Abort();

  bool idle() const { return head_ == nullptr; }
  bool batching() const { return batching_; }
  void set_error_handler(void (*fn)(void* ctx), void* ctx) { on_error_ = fn; on_error_ctx_ = ctx; }
  // Runs the Transmitter's own handlers (writable wait, Kick) on `ex` instead of the socket's
  // executor, e.g. the connection's strand when the socket itself uses the plain io_context
  // executor (cheaper per operation: a strand does not fit any_io_executor's small buffer).
  void set_executor(boost::asio::any_io_executor ex) { ex_ = std::move(ex); }

 private:
  void WaitWritable();
  void Fail();

  boost::asio::ip::tcp::socket& socket_;
  bool batching_;
  boost::asio::any_io_executor ex_;  // where our handlers run; default: the socket's executor
  TxStats* stats_;
  std::size_t max_batch_bytes_;
  TxFrame* head_ = nullptr;
  TxFrame* tail_ = nullptr;
  std::size_t head_sent_ = 0;  // bytes of head_ already written (header + payload)
  bool waiting_ = false;
  bool kicked_ = false;
  bool closed_ = false;
  void (*on_error_)(void*) = nullptr;
  void* on_error_ctx_ = nullptr;
  std::shared_ptr<bool> alive_;
  static constexpr int kMaxIov = 1024;  // IOV_MAX on Linux
  struct iovec iov_[kMaxIov];
};

}  // namespace dst::net
