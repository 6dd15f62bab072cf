// In-memory Transport and Listener for the server fuzz targets: a transport replays a fixed byte
// string as what the client sends and swallows whatever the server writes.  Completions are
// posted to the transport's strand (never invoked inline), as a socket's would be.
//
// Reads hand out the input in pieces of varying size (a fixed sequence), so the servers'
// reassembly of headers and payloads split over several receives is exercised too.
//
// Threading: one io_context thread (the fuzz targets run the io_context on the calling thread).
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>

#include "dst/net/transport.h"

namespace dst::fuzz {

class MemTransport final : public net::Transport {
 public:
  // `output`, when not null, receives every byte the server sends (it must outlive the transport).
  MemTransport(const net::Strand& strand, std::string input, std::string* output = nullptr)
      : strand_(strand), input_(std::move(input)), output_(output) {}

  const net::Strand& strand() const override { return strand_; }
  void AsyncReadSome(boost::asio::mutable_buffer buf, net::IoCallback done) override;
  void AsyncRead(boost::asio::mutable_buffer buf, net::IoCallback done) override;
  void AsyncWrite(boost::asio::const_buffer buf, net::IoCallback done) override;
  std::size_t SendFrames(const net::TxFrame* head, std::size_t offset, const net::SendLimits& lim,
                         boost::system::error_code& ec) override;
  void AsyncWaitWritable(net::IoCallback done) override;
  void Shutdown(ShutdownHow how) override;
  void Close() override { open_ = false; }
  bool is_open() const override { return open_; }
  const std::string& peer() const override { return peer_; }

  std::size_t bytes_written() const { return written_; }

 private:
  void Complete(net::IoCallback done, boost::system::error_code ec, std::size_t n);
  std::size_t NextPiece();

  net::Strand strand_;
  std::string input_;
  std::string* output_;
  std::size_t pos_ = 0;
  std::size_t piece_ = 0;
  std::size_t written_ = 0;
  bool open_ = true;
  bool read_shut_ = false;
  bool write_shut_ = false;
  const std::string peer_ = "fuzz-peer";
};

// Hands out the transports pushed into it, one per AsyncAccept.
class MemListener final : public net::Listener {
 public:
  explicit MemListener(const net::Strand& strand) : strand_(strand) {}
  void AsyncAccept(AcceptCallback done) override;
  void Close() override;
  std::string local_name() const override { return "memory"; }

  // A new connection whose client sends `input`; what the server sends goes to *output if set.
  void Push(std::string input, std::string* output = nullptr);

 private:
  void Deliver();

  net::Strand strand_;
  AcceptCallback waiting_;
  std::deque<std::unique_ptr<net::Transport>> ready_;
  bool closed_ = false;
};

}  // namespace dst::fuzz
