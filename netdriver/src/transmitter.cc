#include "dst/net/transmitter.h"

#include <boost/asio/bind_executor.hpp>
#include <boost/asio/post.hpp>

#include "fd_send.h"

namespace dst::net {

Transmitter::Transmitter(Transport& transport, bool batching, TxStats* stats, std::size_t max_batch_bytes)
    : sink_(&transport),
      batching_(batching),
      ex_(transport.strand()),
      stats_(stats),
      max_batch_bytes_(max_batch_bytes),
      alive_(std::make_shared<bool>(true)) {}

Transmitter::~Transmitter() {
  *alive_ = false;
  Abort();
}

void Transmitter::Enqueue(TxFrame* f) {
  f->next = nullptr;
  if (closed_) {
    if (f->on_sent) f->on_sent(f, false);
    return;
  }
  if (tail_) tail_->next = f; else head_ = f;
  tail_ = f;
}

void Transmitter::Kick(std::shared_ptr<void> guard) {
  if (kicked_ || closed_) return;
  kicked_ = true;
  boost::asio::post(ex_, [this, g = std::move(guard), alive = alive_] {
    if (!*alive) return;
    kicked_ = false;
    Flush();
  });
}

bool Transmitter::Flush() {
  if (closed_) return false;
  if (waiting_) return true;  // the writable-wait handler will continue
  SendLimits lim;
  lim.max_frames = batching_ ? 512 : 1;
  lim.max_bytes = max_batch_bytes_;
  while (head_) {
    boost::system::error_code ec;
    const std::size_t w = sink_->SendFrames(head_, head_sent_, lim, ec);
    if (ec == boost::asio::error::would_block || (!ec && w == 0)) {
      stats_->eagain.fetch_add(1, std::memory_order_relaxed);
      WaitWritable();
      return true;
    }
    if (ec) {
      Fail();
      return false;
    }
    stats_->syscalls.fetch_add(1, std::memory_order_relaxed);
    stats_->bytes.fetch_add(static_cast<std::uint64_t>(w), std::memory_order_relaxed);
    // Retire fully written frames.
    std::size_t left = w + head_sent_;
    head_sent_ = 0;
    std::uint64_t done = 0;
    while (head_) {
      const std::size_t flen = head_->header_len + head_->payload_len;
      if (left < flen) {
        head_sent_ = left;
        break;
      }
      left -= flen;
      TxFrame* f = head_;
      head_ = f->next;
      if (!head_) tail_ = nullptr;
      ++done;
      if (f->on_sent) f->on_sent(f, true);
    }
    stats_->frames.fetch_add(done, std::memory_order_relaxed);
  }
  return true;
}

void Transmitter::WaitWritable() {
  waiting_ = true;
  sink_->AsyncWaitWritable([this, alive = alive_](const boost::system::error_code& ec, std::size_t) {
    if (!*alive) return;
    waiting_ = false;
    if (ec) {
      if (!closed_) Fail();
      return;
    }
    Flush();
  });
}

void Transmitter::Fail() {
  if (on_error_) on_error_(on_error_ctx_);
  Abort();
}

void Transmitter::Abort() {
  closed_ = true;
  head_sent_ = 0;
  while (head_) {
    TxFrame* f = head_;
    head_ = f->next;
    if (f->on_sent) f->on_sent(f, false);
  }
  tail_ = nullptr;
}

}  // namespace dst::net
