// TCP (and AF_UNIX stream) implementation of the Transport seam (transport.h).
//
// TcpTransport: one connected stream socket.  SendFrames gathers the frame list into one
// sendmsg() of up to IOV_MAX iovecs (many frames per system call); receives are Asio reads on the
// socket.  Every asynchronous operation is bound to the transport's strand and to a small
// per-connection handler arena, so steady-state I/O allocates nothing.
//
// TcpListener: a bound, listening socket; each accepted connection gets its own strand.
// TcpConnector: resolve + connect with a timeout (host:port, or a unix socket path).
//
// Threading: as transport.h.  A TcpTransport is used on its strand; TcpListener on the executor
// it was opened with; TcpConnector on its strand.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/ip/tcp.hpp>

#include "dst/net/transport.h"

namespace dst::net {

namespace detail {
class HandlerArena;
}

class TcpTransport final : public Transport {
 public:
  using Socket = boost::asio::generic::stream_protocol::socket;

  // Takes over a connected stream socket; completions run on `strand`.
  TcpTransport(Socket socket, Strand strand, std::string peer);
  // Takes over a connected TCP socket: sets TCP_NODELAY and names the peer "addr:port".
  static std::unique_ptr<TcpTransport> FromTcp(boost::asio::ip::tcp::socket socket, Strand strand);
  ~TcpTransport() override;

  const Strand& strand() const override { return strand_; }
  std::size_t SendFrames(const TxFrame* head, std::size_t offset, const SendLimits& lim,
                         boost::system::error_code& ec) override;
  void AsyncWaitWritable(IoCallback done) override;
  void AsyncReadSome(boost::asio::mutable_buffer buf, IoCallback done) override;
  void AsyncRead(boost::asio::mutable_buffer buf, IoCallback done) override;
  void AsyncWrite(boost::asio::const_buffer buf, IoCallback done) override;
  void Shutdown(ShutdownHow how) override;
  void Close() override;
  bool is_open() const override { return socket_.is_open(); }
  const std::string& peer() const override { return peer_; }

  // For socket options in tests and tuning (SO_SNDBUF, ...).
  int native_handle() { return socket_.native_handle(); }
  // The socket itself, for readiness waits of a transport layered on top (TLS).
  Socket& socket() { return socket_; }
  // Handler-arena fallbacks to the heap (0 in steady state; the allocation tests check it).
  std::uint64_t arena_fallbacks() const;

 private:
  static constexpr int kMaxIov = 1024;  // IOV_MAX on Linux

  Socket socket_;
  Strand strand_;
  std::string peer_;
  std::shared_ptr<detail::HandlerArena> arena_;  // shared with pending operations
  struct iovec iov_[kMaxIov];
};

class TcpListener final : public Listener {
 public:
  // Binds address:port (port 0: any free port) and listens.  The acceptor runs on `ex` (accept
  // callbacks run there); accepted connections get fresh strands of `io`.
  static Result<std::unique_ptr<TcpListener>> Open(boost::asio::io_context& io, Strand ex,
                                                   const std::string& address, std::uint16_t port);
  ~TcpListener() override;

  void AsyncAccept(AcceptCallback done) override;
  void Close() override;
  std::string local_name() const override;
  std::uint16_t port() const { return port_; }

 private:
  TcpListener(boost::asio::io_context& io, Strand ex);

  boost::asio::io_context& io_;
  boost::asio::basic_socket_acceptor<boost::asio::ip::tcp, Strand> acceptor_;
  std::string address_;
  std::uint16_t port_ = 0;
};

class TcpConnector final : public Connector {
 public:
  // Dials host:port (TCP, TCP_NODELAY); the transport runs on `strand`.
  TcpConnector(Strand strand, std::string host, std::uint16_t port);
  // Dials a unix stream socket at `path`.
  static std::unique_ptr<TcpConnector> Unix(Strand strand, std::string path);
  ~TcpConnector() override;

  void AsyncConnect(std::chrono::milliseconds timeout, ConnectCallback done) override;
  void Cancel() override;
  std::string target() const override;

  struct Attempt;

 private:
  Strand strand_;
  std::string host_;
  std::uint16_t port_ = 0;
  std::string unix_path_;  // non-empty: AF_UNIX
  std::shared_ptr<Attempt> attempt_;
};

}  // namespace dst::net
