#include "dst/net/tcp_transport.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <cerrno>

#include <boost/asio/bind_executor.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>

#include "fd_send.h"
#include "server_alloc.h"

namespace dst::net {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

int GatherFrames(const TxFrame* head, std::size_t offset, const SendLimits& lim, struct iovec* iov,
                 int max_iov, std::size_t* bytes) {
  int n = 0;
  std::size_t total = 0;
  std::size_t skip = offset;
  int frames = 0;
  for (const TxFrame* f = head; f && frames < lim.max_frames && total < lim.max_bytes && n + 2 <= max_iov;
       f = f->next, ++frames) {
    if (skip < f->header_len) {
      iov[n++] = {const_cast<std::uint8_t*>(f->header) + skip, f->header_len - skip};
      total += f->header_len - skip;
      skip = 0;
    } else {
      skip -= f->header_len;
    }
    if (f->payload_len > skip) {
      iov[n++] = {const_cast<char*>(f->payload) + skip, f->payload_len - skip};
      total += f->payload_len - skip;
    }
    skip = 0;
  }
  *bytes = total;
  return n;
}

std::size_t detail::SendFramesOnFd(int fd, const TxFrame* head, std::size_t offset, const SendLimits& lim,
                                   struct iovec* iov, int max_iov, boost::system::error_code& ec) {
  ec.clear();
  std::size_t bytes = 0;
  const int n = GatherFrames(head, offset, lim, iov, max_iov, &bytes);
  if (n == 0) return 0;
  struct msghdr msg = {};
  msg.msg_iov = iov;
  msg.msg_iovlen = static_cast<std::size_t>(n);
  for (;;) {
    const ssize_t w = ::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w >= 0) return static_cast<std::size_t>(w);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) ec = asio::error::would_block;
    else ec.assign(errno, boost::system::system_category());
    return 0;
  }
}

// ------------------------------------------------------------------------------------------------
// TcpTransport

TcpTransport::TcpTransport(Socket socket, Strand strand, std::string peer)
    : socket_(std::move(socket)),
      strand_(std::move(strand)),
      peer_(std::move(peer)),
      arena_(std::make_shared<detail::HandlerArena>()) {}

TcpTransport::~TcpTransport() = default;

std::unique_ptr<TcpTransport> TcpTransport::FromTcp(tcp::socket socket, Strand strand) {
  boost::system::error_code ec;
  socket.set_option(tcp::no_delay(true), ec);
  auto rep = socket.remote_endpoint(ec);
  std::string peer = ec ? std::string("?") : rep.address().to_string() + ":" + std::to_string(rep.port());
  return std::make_unique<TcpTransport>(Socket(std::move(socket)), std::move(strand), std::move(peer));
}

std::uint64_t TcpTransport::arena_fallbacks() const { return arena_->fallbacks(); }

std::size_t TcpTransport::SendFrames(const TxFrame* head, std::size_t offset, const SendLimits& lim,
                                     boost::system::error_code& ec) {
  return detail::SendFramesOnFd(socket_.native_handle(), head, offset, lim, iov_, kMaxIov, ec);
}

void TcpTransport::AsyncWaitWritable(IoCallback done) {
  socket_.async_wait(Socket::wait_write, detail::Bind(arena_.get(), strand_,
                                                      [keep = arena_, cb = std::move(done)](const boost::system::error_code& ec) mutable {
                                                        cb(ec, 0);
                                                      }));
}

void TcpTransport::AsyncReadSome(asio::mutable_buffer buf, IoCallback done) {
  socket_.async_read_some(buf, detail::ArenaHandler(arena_, strand_, std::move(done)));
}

void TcpTransport::AsyncRead(asio::mutable_buffer buf, IoCallback done) {
  asio::async_read(socket_, buf, detail::ArenaHandler(arena_, strand_, std::move(done)));
}

void TcpTransport::AsyncWrite(asio::const_buffer buf, IoCallback done) {
  asio::async_write(socket_, buf, detail::ArenaHandler(arena_, strand_, std::move(done)));
}

void TcpTransport::Shutdown(ShutdownHow how) {
  if (!socket_.is_open()) return;
  // ::shutdown rather than socket_.shutdown: the latter would also cancel nothing and report
  // ENOTCONN noise; the raw call just makes pending reads see EOF.
  ::shutdown(socket_.native_handle(), how == ShutdownHow::kRead ? SHUT_RD : SHUT_RDWR);
}

void TcpTransport::Close() {
  if (!socket_.is_open()) return;
  // Swallow unread input first so close() sends FIN rather than RST and the peer can still read
  // our last bytes (e.g. an error reply).
  char scratch[16384];
  const int fd = socket_.native_handle();
  for (int i = 0; i < 16; ++i) {
    const ssize_t r = ::recv(fd, scratch, sizeof scratch, MSG_DONTWAIT);
    if (r <= 0) break;
  }
  boost::system::error_code ec;
  socket_.shutdown(Socket::shutdown_both, ec);
  socket_.close(ec);
}

// ------------------------------------------------------------------------------------------------
// TcpListener

TcpListener::TcpListener(asio::io_context& io, Strand ex) : io_(io), acceptor_(std::move(ex)) {}

TcpListener::~TcpListener() = default;

Result<std::unique_ptr<TcpListener>> TcpListener::Open(asio::io_context& io, Strand ex, const std::string& address,
                                                       std::uint16_t port) {
  boost::system::error_code ec;
  auto addr = asio::ip::make_address(address, ec);
  if (ec) return Status::InvalidArgument("bad listen address " + address);
  std::unique_ptr<TcpListener> l(new TcpListener(io, std::move(ex)));
  tcp::endpoint ep(addr, port);
  l->acceptor_.open(ep.protocol(), ec);
  if (!ec) l->acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) l->acceptor_.bind(ep, ec);
  if (!ec) l->acceptor_.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return Status::FromErrno(ec.value(), "listen on " + address + ":" + std::to_string(port));
  l->address_ = address;
  l->port_ = l->acceptor_.local_endpoint(ec).port();
  return l;
}

void TcpListener::AsyncAccept(AcceptCallback done) {
  // The socket keeps the plain io_context executor (it fits any_io_executor's small buffer, so
  // Asio's per-operation work tracking does not allocate); the transport binds every handler to
  // the connection's strand instead.
  auto strand = asio::make_strand(io_);
  auto sock = std::make_shared<tcp::socket>(io_);
  acceptor_.async_accept(*sock, [sock, strand, done = std::move(done)](const boost::system::error_code& ec) {
    if (ec) return done(ec, nullptr);
    done(ec, TcpTransport::FromTcp(std::move(*sock), strand));
  });
}

void TcpListener::Close() {
  boost::system::error_code ec;
  acceptor_.close(ec);
}

std::string TcpListener::local_name() const { return address_ + ":" + std::to_string(port_); }

// ------------------------------------------------------------------------------------------------
// TcpConnector
//
//   AsyncConnect --> RESOLVE --results--> CONNECT (endpoint i) --ok--> DONE(transport)
//                       |                    | fail: next endpoint, none left --> DONE(kUnavailable)
//                       +----- timer fires anywhere before DONE --> DONE(kTimedOut)
//   Cancel() anywhere before DONE --> abandoned (the callback is dropped, never called)

struct TcpConnector::Attempt : std::enable_shared_from_this<Attempt> {
  explicit Attempt(const Strand& s) : strand(s), resolver(s), socket(s.get_inner_executor().context()), timer(s) {}

  Strand strand;

  asio::ip::basic_resolver<tcp, Strand> resolver;
  TcpTransport::Socket socket;
  asio::basic_waitable_timer<std::chrono::steady_clock, asio::wait_traits<std::chrono::steady_clock>, Strand> timer;
  std::vector<asio::generic::stream_protocol::endpoint> endpoints;
  std::size_t next = 0;
  bool is_tcp = true;
  ConnectCallback done;
  Status last_error = Status::Unavailable("no address");
  std::string target;

  void Finish(Status st) {
    if (!done) return;
    ConnectCallback cb = std::move(done);
    done = nullptr;
    timer.cancel();
    resolver.cancel();
    std::unique_ptr<Transport> t;
    if (st.ok()) {
      if (is_tcp) {
        boost::system::error_code ec;
        socket.set_option(tcp::no_delay(true), ec);
      }
      t = std::make_unique<TcpTransport>(std::move(socket), strand, target);
    } else {
      boost::system::error_code ec;
      socket.close(ec);
    }
    cb(std::move(st), std::move(t));
  }

  void TryNext() {
    if (!done) return;
    if (next >= endpoints.size()) return Finish(last_error);
    const auto& ep = endpoints[next++];
    boost::system::error_code ec;
    socket.close(ec);
    socket.open(ep.protocol(), ec);
    if (ec) {
      last_error = Status::Unavailable("connect " + target + ": " + ec.message());
      return TryNext();
    }
    socket.async_connect(ep, asio::bind_executor(strand, [self = shared_from_this()](const boost::system::error_code& e) {
                           if (!self->done) return;
                           if (!e) return self->Finish(Status::OK());
                           self->last_error = Status::Unavailable("connect " + self->target + ": " + e.message());
                           self->TryNext();
                         }));
  }
};

TcpConnector::TcpConnector(Strand strand, std::string host, std::uint16_t port)
    : strand_(std::move(strand)), host_(std::move(host)), port_(port) {}

std::unique_ptr<TcpConnector> TcpConnector::Unix(Strand strand, std::string path) {
  auto c = std::make_unique<TcpConnector>(std::move(strand), std::string(), 0);
  c->unix_path_ = std::move(path);
  return c;
}

TcpConnector::~TcpConnector() { Cancel(); }

std::string TcpConnector::target() const {
  return unix_path_.empty() ? host_ + ":" + std::to_string(port_) : unix_path_;
}

void TcpConnector::AsyncConnect(std::chrono::milliseconds timeout, ConnectCallback done) {
  auto a = std::make_shared<Attempt>(strand_);
  a->done = std::move(done);
  a->target = target();
  a->is_tcp = unix_path_.empty();
  attempt_ = a;
  a->timer.expires_after(timeout);
  a->timer.async_wait([a](const boost::system::error_code& ec) {
    if (ec || !a->done) return;
    a->Finish(Status::TimedOut("connect " + a->target + ": timed out"));
  });
  if (!a->is_tcp) {
    a->endpoints.emplace_back(asio::local::stream_protocol::endpoint(unix_path_));
    asio::post(strand_, [a] { a->TryNext(); });
    return;
  }
  a->resolver.async_resolve(host_, std::to_string(port_),
                            [a](const boost::system::error_code& ec, const tcp::resolver::results_type& results) {
                              if (!a->done) return;
                              if (ec) return a->Finish(Status::Unavailable("resolve " + a->target + ": " + ec.message()));
                              for (const auto& r : results) a->endpoints.emplace_back(r.endpoint());
                              a->TryNext();
                            });
}

void TcpConnector::Cancel() {
  auto a = std::move(attempt_);
  if (!a) return;
  // Runs on the strand (the connector's contract), like every handler of the attempt.
  a->done = nullptr;
  a->timer.cancel();
  a->resolver.cancel();
  boost::system::error_code ec;
  a->socket.close(ec);
}

}  // namespace dst::net
