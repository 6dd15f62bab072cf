#include "mem_transport.h"

#include <sys/uio.h>

#include <algorithm>
#include <cstring>

#include <boost/asio/error.hpp>
#include <boost/asio/post.hpp>

namespace dst::fuzz {

namespace asio = boost::asio;

void MemTransport::Complete(net::IoCallback done, boost::system::error_code ec, std::size_t n) {
  asio::post(strand_, [done = std::move(done), ec, n]() mutable { done(ec, n); });
}

// Piece sizes cycle through a short fixed list: whole buffers, single bytes and odd splits.
std::size_t MemTransport::NextPiece() {
  static constexpr std::size_t kPieces[] = {SIZE_MAX, 1, 5, SIZE_MAX, 48, 3, SIZE_MAX, 4096};
  return kPieces[piece_++ % (sizeof kPieces / sizeof kPieces[0])];
}

void MemTransport::AsyncReadSome(asio::mutable_buffer buf, net::IoCallback done) {
  if (!open_) return Complete(std::move(done), asio::error::bad_descriptor, 0);
  if (read_shut_ || pos_ == input_.size()) return Complete(std::move(done), asio::error::eof, 0);
  if (buf.size() == 0) return Complete(std::move(done), {}, 0);
  const std::size_t n = std::min({buf.size(), input_.size() - pos_, NextPiece()});
  std::memcpy(buf.data(), input_.data() + pos_, n);
  pos_ += n;
  Complete(std::move(done), {}, n);
}

void MemTransport::AsyncRead(asio::mutable_buffer buf, net::IoCallback done) {
  if (!open_) return Complete(std::move(done), asio::error::bad_descriptor, 0);
  const std::size_t avail = read_shut_ ? 0 : input_.size() - pos_;
  const std::size_t n = std::min(buf.size(), avail);
  std::memcpy(buf.data(), input_.data() + pos_, n);
  pos_ += n;
  Complete(std::move(done), n == buf.size() ? boost::system::error_code() : asio::error::eof, n);
}

void MemTransport::AsyncWrite(asio::const_buffer buf, net::IoCallback done) {
  if (!open_) return Complete(std::move(done), asio::error::bad_descriptor, 0);
  if (write_shut_) return Complete(std::move(done), asio::error::broken_pipe, 0);
  written_ += buf.size();
  if (output_) output_->append(static_cast<const char*>(buf.data()), buf.size());
  Complete(std::move(done), {}, buf.size());
}

std::size_t MemTransport::SendFrames(const net::TxFrame* head, std::size_t offset, const net::SendLimits& lim,
                                     boost::system::error_code& ec) {
  if (!open_ || write_shut_) {
    ec = asio::error::broken_pipe;
    return 0;
  }
  struct iovec iov[64];
  std::size_t bytes = 0;
  const int n = net::GatherFrames(head, offset, lim, iov, 64, &bytes);
  if (output_) {
    for (int i = 0; i < n; ++i) output_->append(static_cast<const char*>(iov[i].iov_base), iov[i].iov_len);
  }
  ec = {};
  written_ += bytes;
  return bytes;
}

void MemTransport::AsyncWaitWritable(net::IoCallback done) {
  if (!open_ || write_shut_) return Complete(std::move(done), asio::error::broken_pipe, 0);
  Complete(std::move(done), {}, 0);
}

void MemTransport::Shutdown(ShutdownHow how) {
  read_shut_ = true;
  if (how == ShutdownHow::kBoth) write_shut_ = true;
}

void MemListener::AsyncAccept(AcceptCallback done) {
  if (closed_) {
    asio::post(strand_, [done = std::move(done)] { done(asio::error::operation_aborted, nullptr); });
    return;
  }
  waiting_ = std::move(done);
  Deliver();
}

void MemListener::Close() {
  closed_ = true;
  ready_.clear();
  if (!waiting_) return;
  asio::post(strand_, [done = std::move(waiting_)] { done(asio::error::operation_aborted, nullptr); });
  waiting_ = nullptr;
}

void MemListener::Push(std::string input, std::string* output) {
  // Each connection gets its own strand, as TcpListener's do.
  ready_.push_back(std::make_unique<MemTransport>(asio::make_strand(strand_.get_inner_executor().context()),
                                                  std::move(input), output));
  Deliver();
}

void MemListener::Deliver() {
  if (!waiting_ || ready_.empty()) return;
  auto done = std::move(waiting_);
  waiting_ = nullptr;
  // std::function needs a copyable lambda: the transport travels in a shared box.
  auto box = std::make_shared<std::unique_ptr<net::Transport>>(std::move(ready_.front()));
  ready_.pop_front();
  asio::post(strand_, [done = std::move(done), box] { done({}, std::move(*box)); });
}

}  // namespace dst::fuzz
