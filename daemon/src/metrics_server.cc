#include "metrics_server.h"

#include <atomic>
#include <thread>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/streambuf.hpp>
#include <boost/asio/write.hpp>

namespace dst::daemon {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

class MetricsServer::Impl {
 public:
  Impl(MetricsServerOptions o, Render r) : opts_(std::move(o)), render_(std::move(r)), acceptor_(io_) {}

  Status Listen() {
    boost::system::error_code ec;
    auto addr = asio::ip::make_address(opts_.host, ec);
    if (ec) return Status::InvalidArgument("metrics_listen: bad address " + opts_.host);
    tcp::endpoint ep(addr, opts_.port);
    acceptor_.open(ep.protocol(), ec);
    if (!ec) acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
    if (!ec) acceptor_.bind(ep, ec);
    if (!ec) acceptor_.listen(64, ec);
    if (ec) return Status::FromErrno(ec.value(), "metrics_listen on " + opts_.host + ":" + std::to_string(opts_.port));
    port_ = acceptor_.local_endpoint(ec).port();
    Accept();
    thread_ = std::thread([this] { io_.run(); });
    return Status::OK();
  }

  void Stop() {
    io_.stop();
    if (thread_.joinable()) thread_.join();
  }

  std::uint16_t port() const { return port_; }
  std::uint64_t scrapes() const { return scrapes_.load(); }

 private:
  struct Conn {
    // The head buffer is capped: read_until fails with not_found instead of growing.
    Conn(asio::io_context& io, std::size_t max_head) : sock(io), timer(io), head(max_head) {}
    tcp::socket sock;
    asio::steady_timer timer;
    asio::streambuf head;
    std::string reply;
  };

  void Accept() {
    auto c = std::make_shared<Conn>(io_, opts_.max_head);
    acceptor_.async_accept(c->sock, [this, c](const boost::system::error_code& ec) {
      if (ec == asio::error::operation_aborted) return;
      if (!ec) {
        if (open_ >= opts_.max_connections) {
          boost::system::error_code ignore;
          c->sock.close(ignore);  // over the cap: a scraper retries next interval
        } else {
          Serve(c);
        }
      }
      Accept();
    });
  }

  void Serve(const std::shared_ptr<Conn>& c) {
    ++open_;
    c->timer.expires_after(opts_.head_timeout);
    c->timer.async_wait([c](const boost::system::error_code& ec) {
      if (ec) return;
      boost::system::error_code ignore;
      c->sock.close(ignore);  // slow or silent client
    });
    asio::async_read_until(c->sock, c->head, "\r\n\r\n", [this, c](const boost::system::error_code& ec, std::size_t) {
      if (ec == asio::error::not_found) {
        return Respond(c, "431 Request Header Fields Too Large", "text/plain", "request head too large\n", true);
      }
      if (ec) return Done(c);
      std::string head(asio::buffers_begin(c->head.data()), asio::buffers_end(c->head.data()));
      const auto eol = head.find("\r\n");
      const std::string line = head.substr(0, eol);
      const auto sp1 = line.find(' ');
      const auto sp2 = sp1 == std::string::npos ? std::string::npos : line.find(' ', sp1 + 1);
      if (sp2 == std::string::npos || line.compare(sp2 + 1, 5, "HTTP/") != 0)
        return Respond(c, "400 Bad Request", "text/plain", "malformed request line\n", true);
      const std::string method = line.substr(0, sp1), target = line.substr(sp1 + 1, sp2 - sp1 - 1);
      const bool head_only = method == "HEAD";
      if (method != "GET" && !head_only)
        return Respond(c, "405 Method Not Allowed", "text/plain", "only GET and HEAD\n", head_only);
      const std::string path = target.substr(0, target.find('?'));
      if (path == "/metrics") {
        std::string body = render_();
        ++scrapes_;
        return Respond(c, "200 OK", "text/plain; version=0.0.4; charset=utf-8", std::move(body), head_only);
      }
      if (path == "/")
        return Respond(c, "200 OK", "text/plain; charset=utf-8", "dstd metrics: /metrics (Prometheus text format)\n",
                       head_only);
      Respond(c, "404 Not Found", "text/plain", "not found; try /metrics\n", head_only);
    });
  }

  void Respond(const std::shared_ptr<Conn>& c, const char* status, const char* type, std::string body, bool head_only) {
    c->reply = std::string("HTTP/1.1 ") + status + "\r\nContent-Type: " + type +
               "\r\nContent-Length: " + std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n";
    if (!head_only) c->reply += body;
    asio::async_write(c->sock, asio::buffer(c->reply), [this, c](const boost::system::error_code&, std::size_t) {
      boost::system::error_code ignore;
      c->sock.shutdown(tcp::socket::shutdown_both, ignore);
      Done(c);
    });
  }

  void Done(const std::shared_ptr<Conn>& c) {
    boost::system::error_code ignore;
    c->timer.cancel();
    c->sock.close(ignore);
    --open_;
  }

  MetricsServerOptions opts_;
  Render render_;
  asio::io_context io_;
  tcp::acceptor acceptor_;
  std::thread thread_;
  std::uint16_t port_ = 0;
  int open_ = 0;  // io thread only
  std::atomic<std::uint64_t> scrapes_{0};
};

Result<std::unique_ptr<MetricsServer>> MetricsServer::Start(const MetricsServerOptions& o, Render render) {
  auto impl = std::make_unique<Impl>(o, std::move(render));
  if (Status st = impl->Listen(); !st.ok()) return st;
  return std::unique_ptr<MetricsServer>(new MetricsServer(std::move(impl)));
}

MetricsServer::MetricsServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
MetricsServer::~MetricsServer() { impl_->Stop(); }
std::uint16_t MetricsServer::port() const { return impl_->port(); }
std::uint64_t MetricsServer::scrapes() const { return impl_->scrapes(); }

}  // namespace dst::daemon
