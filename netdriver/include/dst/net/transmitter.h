// Transmitter: the batched send path of one connection.
//
// Frames (TxFrame, transport.h: a header of up to 48 bytes plus an optional payload pointer) are
// queued on an intrusive list and handed to the Transport in batches: one SendFrames() call gets
// the whole list, which TCP gathers into one sendmsg() of up to IOV_MAX iovecs or a byte budget,
// i.e. many frames per system call -- the kernel's transmit batching (xmit_more) moved to user
// space.  Payloads are referenced, never copied.  A one-frame-per-call mode exists for
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
// Threading: every method runs on the connection's strand (single-threaded use).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/ip/tcp.hpp>

#include "dst/net/transport.h"

namespace dst::net {

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
  // Sends through `transport`; its handlers (writable wait, Kick) run on the transport's strand.
  Transmitter(Transport& transport, bool batching, TxStats* stats, std::size_t max_batch_bytes = 4u << 20);
  ~Transmitter();
  Transmitter(const Transmitter&) = delete;
  Transmitter& operator=(const Transmitter&) = delete;

  // Appends a frame.  Nothing is sent until Flush() (directly, or via Kick()).
  void Enqueue(TxFrame* f);
  // Sends as much as the transport takes now; arms a writable-wait for the rest.  Returns false
  // if the transport failed (all frames dropped).
  bool Flush();
  // Schedules one Flush() at the end of the current event-loop turn, so frames enqueued by the
  // same burst of completions go out in one call.  `guard` keeps the owner alive until then.
  void Kick(std::shared_ptr<void> guard);
  // Drops every queued frame (on_sent(f, false)) and refuses further sends.
  void Abort();

  bool idle() const { return head_ == nullptr; }
  // Sends through `sink` from now on (a connection upgraded to TLS mid-stream, NBD STARTTLS).
  // REQUIRES: idle, no writable-wait armed, the new sink on the same strand.
  void Rebind(FrameSink& sink) { sink_ = &sink; }
  bool batching() const { return batching_; }
  // `fn` runs (on the strand) when the transport fails; the Transmitter then aborts its queue.
  void set_error_handler(void (*fn)(void* ctx), void* ctx) { on_error_ = fn; on_error_ctx_ = ctx; }

 private:
  void WaitWritable();
  void Fail();

  FrameSink* sink_;
  bool batching_;
  boost::asio::any_io_executor ex_;  // where our handlers run: the transport's strand
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
};

}  // namespace dst::net
