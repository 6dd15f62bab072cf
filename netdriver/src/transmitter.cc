#include "dst/net/transmitter.h"

#include <sys/socket.h>

#include <boost/asio/bind_executor.hpp>
#include <boost/asio/post.hpp>

namespace dst::net {

Transmitter::Transmitter(boost::asio::ip::tcp::socket& socket, bool batching, TxStats* stats,
                         std::size_t max_batch_bytes)
    : socket_(socket),
      batching_(batching),
      ex_(socket.get_executor()),
      stats_(stats),
      max_batch_bytes_(max_batch_bytes),
      alive_(std::make_shared<bool>(true)) {
  boost::system::error_code ec;
  socket_.non_blocking(true, ec);
}

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
  const int fd = socket_.native_handle();
  while (head_) {
    // Gather.
    int n = 0;
    std::size_t bytes = 0;
    std::size_t skip = head_sent_;
    const int max_frames = batching_ ? kMaxIov / 2 : 1;
    int frames = 0;
    for (TxFrame* f = head_; f && frames < max_frames && bytes < max_batch_bytes_; f = f->next, ++frames) {
      if (skip < f->header_len) {
        iov_[n++] = {const_cast<std::uint8_t*>(f->header) + skip, f->header_len - skip};
        bytes += f->header_len - skip;
        skip = 0;
      } else {
        skip -= f->header_len;
      }
      if (f->payload_len > skip) {
        iov_[n++] = {const_cast<char*>(f->payload) + skip, f->payload_len - skip};
        bytes += f->payload_len - skip;
      }
      skip = 0;
    }
    struct msghdr msg = {};
    msg.msg_iov = iov_;
    msg.msg_iovlen = static_cast<std::size_t>(n);
    ssize_t w = ::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        stats_->eagain.fetch_add(1, std::memory_order_relaxed);
        WaitWritable();
        return true;
      }
      Fail();
      return false;
    }
    stats_->syscalls.fetch_add(1, std::memory_order_relaxed);
    stats_->bytes.fetch_add(static_cast<std::uint64_t>(w), std::memory_order_relaxed);
    // Retire fully written frames.
    std::size_t left = static_cast<std::size_t>(w) + head_sent_;
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
  socket_.async_wait(boost::asio::ip::tcp::socket::wait_write,
                     boost::asio::bind_executor(ex_, [this, alive = alive_](const boost::system::error_code& ec) {
                       if (!*alive) return;
                       waiting_ = false;
                       if (ec) {
                         if (!closed_) Fail();
                         return;
                       }
                       Flush();
                     }));
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
