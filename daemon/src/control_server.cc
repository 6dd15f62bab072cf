#include "control_server.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <deque>
#include <future>

#include <boost/asio/bind_executor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>
#include <spdlog/spdlog.h>

namespace dst::daemon {

namespace asio = boost::asio;
using local = asio::local::stream_protocol;

class ControlServer::Session : public std::enable_shared_from_this<Session> {
 public:
  Session(ControlServer* server, local::socket sock)
      : server_(server),
        strand_(asio::make_strand(sock.get_executor())),
        sock_(std::move(sock)) {}

  void Start() {
    asio::post(strand_, [self = shared_from_this()] { self->Read(); });
  }

  // Any thread.
  void Send(std::string line) {
    asio::post(strand_, [self = shared_from_this(), line = std::move(line)]() mutable {
      self->Queue(std::move(line));
    });
  }

  void Close() {
    asio::post(strand_, [self = shared_from_this()] { self->DoClose(); });
  }

 private:
  void Read() {
    if (closed_) return;
    sock_.async_read_some(asio::buffer(buf_),
                          asio::bind_executor(strand_, [self = shared_from_this()](
                                                           boost::system::error_code ec, std::size_t n) {
                            self->OnRead(ec, n);
                          }));
  }

  void OnRead(boost::system::error_code ec, std::size_t n) {
    if (ec || closed_) {
      // EOF or error: finish pending writes is pointless once the peer is gone.
      DoClose();
      return;
    }
    splitter_.Append(buf_.data(), n);
    std::string line;
    for (;;) {
      auto r = splitter_.Pop(&line);
      if (r == control::LineSplitter::Next::kNeedMore) break;
      if (r == control::LineSplitter::Next::kTooLong) {
        spdlog::warn("control: request line longer than {} bytes; closing the connection",
                     control::kMaxLineBytes);
        close_after_write_ = true;
        Queue(control::EncodeError(nullptr, control::kTooLarge,
                                   fmt::format("request line longer than {} bytes",
                                               control::kMaxLineBytes)));
        return;
      }
      if (line.find_first_not_of(" \t") == std::string::npos) continue;  // blank line
      control::Request req;
      control::ErrorInfo err;
      if (!control::ParseRequest(line, &req, &err)) {
        spdlog::debug("control: rejected request: {}", err.message);
        Queue(control::EncodeError(err.id, err.code, err.message));
        continue;
      }
      std::weak_ptr<Session> weak = shared_from_this();
      server_->handler_(std::move(req), [weak](std::string reply) {
        auto s = weak.lock();
        if (!s || s->gone_.load(std::memory_order_acquire)) return false;
        s->Send(std::move(reply));
        return true;
      });
    }
    Read();
  }

  void Queue(std::string line) {
    if (closed_) return;
    out_.push_back(std::move(line));
    if (!writing_) Write();
  }

  void Write() {
    if (out_.empty()) {
      writing_ = false;
      if (close_after_write_) DoClose();
      return;
    }
    writing_ = true;
    asio::async_write(sock_, asio::buffer(out_.front()),
                      asio::bind_executor(strand_, [self = shared_from_this()](
                                                       boost::system::error_code ec, std::size_t) {
                        if (ec || self->closed_) {
                          self->DoClose();
                          return;
                        }
                        self->out_.pop_front();
                        self->Write();
                      }));
  }

  void DoClose() {
    if (closed_) return;
    closed_ = true;
    gone_.store(true, std::memory_order_release);
    boost::system::error_code ignored;
    sock_.shutdown(local::socket::shutdown_both, ignored);
    sock_.close(ignored);
    // out_ stays: a write may still be in flight on its front buffer; its handler sees closed_.
    std::lock_guard<std::mutex> l(server_->mu_);
    server_->sessions_.erase(shared_from_this());
  }

  ControlServer* server_;
  asio::strand<asio::any_io_executor> strand_;
  local::socket sock_;
  std::array<char, 16384> buf_;
  control::LineSplitter splitter_;
  std::deque<std::string> out_;
  bool writing_ = false;
  bool closed_ = false;
  bool close_after_write_ = false;

 public:
  std::atomic<bool> gone_{false};  // closed_, readable from any thread
};

ControlServer::ControlServer(asio::io_context& io, std::string path, Handler handler)
    : io_(io), path_(std::move(path)), handler_(std::move(handler)), acceptor_(io) {}

ControlServer::~ControlServer() = default;

static bool SocketAnswers(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::memcpy(a.sun_path, path.data(), std::min(path.size(), sizeof a.sun_path - 1));
  bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  ::close(fd);
  return ok;
}

Status ControlServer::Start() {
  sockaddr_un probe{};
  if (path_.size() >= sizeof probe.sun_path)
    return Status::InvalidArgument(fmt::format("control socket path too long: {}", path_));
  struct stat st;
  if (::lstat(path_.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode))
      return Status::Exists(fmt::format("{} exists and is not a socket", path_));
    if (SocketAnswers(path_))
      return Status::Busy(fmt::format("another dstd is listening on {}", path_));
    ::unlink(path_.c_str());  // stale socket of a dead dstd
  }
  boost::system::error_code ec;
  acceptor_.open(local(), ec);
  if (!ec) {
    // Owner and group only: the control socket changes storage state (ux.md §9).
    mode_t old = ::umask(0117);
    acceptor_.bind(local::endpoint(path_), ec);
    ::umask(old);
  }
  if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return Status::FromErrno(ec.value(), fmt::format("control socket {}", path_));
  Accept();
  return Status::OK();
}

void ControlServer::Accept() {
  acceptor_.async_accept([this](boost::system::error_code ec, local::socket sock) {
    if (ec == asio::error::operation_aborted) return;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (stopped_) return;
      if (!ec) {
        auto s = std::make_shared<Session>(this, std::move(sock));
        sessions_.insert(s);
        s->Start();
      }
    }
    if (ec) {
      spdlog::warn("control: accept failed: {}", ec.message());
      // EMFILE and friends: do not spin; try again shortly.
      auto t = std::make_shared<asio::steady_timer>(io_, std::chrono::milliseconds(100));
      t->async_wait([this, t](boost::system::error_code e) {
        if (!e) Accept();
      });
      return;
    }
    Accept();
  });
}

void ControlServer::Stop() {
  std::set<std::shared_ptr<Session>> sessions;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (stopped_) return;
    stopped_ = true;
    sessions = sessions_;
  }
  std::promise<void> done;
  asio::post(io_, [this, &done] {
    boost::system::error_code ignored;
    acceptor_.close(ignored);
    done.set_value();
  });
  done.get_future().wait();
  for (auto& s : sessions) s->Close();
  ::unlink(path_.c_str());
}

}  // namespace dst::daemon
