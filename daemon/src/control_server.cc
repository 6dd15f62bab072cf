#include "control_server.h"

#include <grp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <deque>
#include <future>
#include <vector>

#include <boost/asio/bind_executor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>
#include <spdlog/spdlog.h>

namespace dst::daemon {

namespace asio = boost::asio;
using local = asio::local::stream_protocol;

// Who is on the other end of a control connection (SO_PEERCRED at connect time).
struct Peer {
  uid_t uid = uid_t(-1);
  pid_t pid = 0;
  bool may_change = false;
};

// The peer's supplementary groups as of connect (SO_PEERGROUPS, Linux 4.13); false if unknown.
static bool PeerGroups(int fd, std::vector<gid_t>* out) {
  out->assign(64, 0);
  for (int tries = 0; tries < 3; ++tries) {
    socklen_t len = socklen_t(out->size() * sizeof(gid_t));
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, out->data(), &len) == 0) {
      out->resize(len / sizeof(gid_t));
      return true;
    }
    if (errno != ERANGE) return false;
    out->assign(len / sizeof(gid_t) + 1, 0);
  }
  return false;
}

static Peer PeerOf(int fd, gid_t group) {
  Peer p;
  ucred cred{};
  socklen_t len = sizeof cred;
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return p;  // denies changes
  p.uid = cred.uid;
  p.pid = cred.pid;
  if (cred.uid == 0 || cred.uid == ::geteuid() || cred.gid == group) {
    p.may_change = true;
    return p;
  }
  std::vector<gid_t> groups;
  if (PeerGroups(fd, &groups))
    p.may_change = std::find(groups.begin(), groups.end(), group) != groups.end();
  return p;
}

class ControlServer::Session : public std::enable_shared_from_this<Session> {
 public:
  Session(ControlServer* server, local::socket sock)
      : server_(server),
        strand_(asio::make_strand(sock.get_executor())),
        sock_(std::move(sock)),
        peer_(PeerOf(sock_.native_handle(), server->group_gid_)) {}

  void Start() {
    asio::post(strand_, [self = shared_from_this()] { self->Process(); });
  }

  // Any thread.  `answers` is true for a request's first reply (it is no longer in flight).
  // Returns false, dropping the line, once the connection is closed or the client is too far
  // behind (the bytes are counted here, before the post, so a fast producer cannot pile lines
  // into the io queue either).
  bool Send(std::string line, bool answers) {
    bool over = false;
    if (gone_.load(std::memory_order_acquire)) {
      line.clear();
    } else if (std::size_t n = line.size(); owed_.fetch_add(n) + n > kDropBytes) {
      owed_.fetch_sub(n);
      line.clear();
      over = true;
      gone_.store(true, std::memory_order_release);
    }
    bool accepted = !line.empty();
    asio::post(strand_, [self = shared_from_this(), line = std::move(line), answers,
                         over]() mutable {
      if (answers) --self->inflight_;
      if (over) self->Drop();
      if (!line.empty()) self->Enqueue(std::move(line));
      self->Process();
    });
    return accepted;
  }

  void Close() {
    asio::post(strand_, [self = shared_from_this()] { self->DoClose(); });
  }

 private:
  void Read() {
    if (closed_ || reading_) return;
    reading_ = true;
    sock_.async_read_some(asio::buffer(buf_),
                          asio::bind_executor(strand_, [self = shared_from_this()](
                                                           boost::system::error_code ec, std::size_t n) {
                            self->OnRead(ec, n);
                          }));
  }

  void OnRead(boost::system::error_code ec, std::size_t n) {
    reading_ = false;
    if (ec || closed_) {
      // EOF or error: finish pending writes is pointless once the peer is gone.
      DoClose();
      return;
    }
    splitter_.Append(buf_.data(), n);
    Process();
  }

  // Too much is owed to this client: stop taking requests until it reads its replies.
  bool Saturated() const {
    return owed_.load() > kPauseBytes || inflight_ >= kPauseRequests;
  }

  // Handles buffered lines while the client is not saturated, then reads more.
  void Process() {
    if (closed_ || close_after_write_) return;
    std::string line;
    while (!Saturated()) {
      auto r = splitter_.Pop(&line);
      if (r == control::LineSplitter::Next::kNeedMore) return Read();
      if (r == control::LineSplitter::Next::kTooLong) {
        spdlog::warn("control: request line longer than {} bytes; closing the connection",
                     control::kMaxLineBytes);
        Queue(control::EncodeError(nullptr, control::kTooLarge,
                                   fmt::format("request line longer than {} bytes",
                                               control::kMaxLineBytes)));
        close_after_write_ = true;
        return;
      }
      if (line.find_first_not_of(" \t") == std::string::npos) continue;  // blank line
      Dispatch(line);
    }
  }

  void Dispatch(const std::string& line) {
    control::Request req;
    control::ErrorInfo err;
    if (!control::ParseRequest(line, &req, &err)) {
      spdlog::debug("control: rejected request: {}", err.message);
      Queue(control::EncodeError(err.id, err.code, err.message));
      return;
    }
    if (!peer_.may_change && !control::IsReadOnlyMethod(req.method)) {
      std::string why = fmt::format(
          "permission denied: {} changes state and needs root or group {} (peer uid {})",
          req.method, server_->group_.empty() ? "root" : server_->group_, peer_.uid);
      spdlog::info("control: refused {} from uid {} pid {}", req.method, peer_.uid, peer_.pid);
      Queue(control::EncodeError(req.id, control::kPermissionDenied, why));
      return;
    }
    ++inflight_;
    std::weak_ptr<Session> weak = shared_from_this();
    auto first = std::make_shared<std::atomic<bool>>(true);
    server_->handler_(std::move(req), [weak, first](std::string reply) {
      auto s = weak.lock();
      if (!s) return false;
      return s->Send(std::move(reply), first->exchange(false));
    });
  }

  // On the strand: a line of our own (errors).
  void Queue(std::string line) {
    owed_.fetch_add(line.size());
    Enqueue(std::move(line));
  }

  // On the strand; `line` is already counted in owed_.
  void Enqueue(std::string line) {
    if (closed_ || dropped_) {
      owed_.fetch_sub(line.size());
      return;
    }
    out_.push_back(std::move(line));
    if (!writing_) Write();
  }

  // The client does not read what it asked for (an events subscriber far behind): keep the line
  // being written, replace the rest by one final error, and close after it.
  void Drop() {
    if (closed_ || dropped_) return;
    spdlog::warn("control: client uid {} pid {} left over {} MiB of replies unread; dropping it",
                 peer_.uid, peer_.pid, kDropBytes >> 20);
    std::size_t keep = writing_ ? 1 : 0;
    while (out_.size() > keep) {
      owed_.fetch_sub(out_.back().size());
      out_.pop_back();
    }
    Queue(control::EncodeError(
        nullptr, control::kTooSlow,
        fmt::format("over {} MiB of replies and events unread; closing the connection",
                    kDropBytes >> 20)));
    dropped_ = true;
    close_after_write_ = true;
    gone_.store(true, std::memory_order_release);  // event subscriptions end now
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
                        self->owed_.fetch_sub(self->out_.front().size());
                        self->out_.pop_front();
                        self->Write();
                        self->Process();
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
  const Peer peer_;
  std::array<char, 16384> buf_;
  control::LineSplitter splitter_;
  std::deque<std::string> out_;
  std::atomic<std::size_t> owed_{0};  // reply bytes accepted by Send/Queue and not yet written
  int inflight_ = 0;           // requests handed to the handler and not answered yet
  bool reading_ = false;
  bool writing_ = false;
  bool closed_ = false;
  bool close_after_write_ = false;
  bool dropped_ = false;

 public:
  std::atomic<bool> gone_{false};  // closed_ or dropped_, readable from any thread
};

ControlServer::ControlServer(asio::io_context& io, std::string path, Handler handler,
                             std::string group)
    : io_(io),
      path_(std::move(path)),
      handler_(std::move(handler)),
      group_(std::move(group)),
      acceptor_(io) {}

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
  group_gid_ = 0;
  if (!group_.empty()) {
    std::vector<char> buf(16384);
    group g{}, *found = nullptr;
    if (::getgrnam_r(group_.c_str(), &g, buf.data(), buf.size(), &found) == 0 && found) {
      group_gid_ = found->gr_gid;
    } else {
      spdlog::warn("control: group \"{}\" does not exist; only root may change state "
                   "(the dst package creates it: addgroup --system {})", group_, group_);
      group_.clear();
    }
  }
  boost::system::error_code ec;
  acceptor_.open(local(), ec);
  if (!ec) {
    // Owner and group only: the control socket changes storage state (ux.md §9).  The umask
    // covers the window between bind and chmod.
    mode_t old = ::umask(0117);
    acceptor_.bind(local::endpoint(path_), ec);
    ::umask(old);
  }
  if (!ec && ::chmod(path_.c_str(), 0660) != 0)
    ec = boost::system::error_code(errno, boost::system::system_category());
  // Not root (a developer's dstd): the socket stays the caller's; chown would fail.
  if (!ec && ::geteuid() == 0 && ::chown(path_.c_str(), 0, group_gid_) != 0)
    ec = boost::system::error_code(errno, boost::system::system_category());
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
