#include "dst/control/control_client.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

namespace dst::control {

ControlClient::~ControlClient() { Close(); }

void ControlClient::Close() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

int ControlClient::Connect(const std::string& path) {
  Close();
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (path.size() >= sizeof a.sun_path) return ENAMETOOLONG;
  std::memcpy(a.sun_path, path.data(), path.size());
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return errno;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    int err = errno;
    ::close(fd);
    return err;
  }
  fd_ = fd;
  return 0;
}

bool ControlClient::Call(const std::string& method, const nlohmann::json& params, Reply* reply,
                         std::string* why, int timeout_ms) {
  if (fd_ < 0) {
    *why = "not connected";
    return false;
  }
  std::uint64_t id = next_id_++;
  std::string line = EncodeRequest(id, method, params);
  std::size_t off = 0;
  while (off < line.size()) {
    ssize_t n = ::send(fd_, line.data() + off, line.size() - off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      *why = std::string("cannot send to dstd: ") + std::strerror(errno);
      return false;
    }
    off += std::size_t(n);
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  char buf[65536];
  for (;;) {
    std::string l;
    switch (splitter_.Pop(&l)) {
      case LineSplitter::Next::kLine:
        if (!ParseReply(l, reply, why)) return false;
        if (reply->id == nlohmann::json(id)) return true;
        continue;  // a reply to something else (not expected with one request at a time)
      case LineSplitter::Next::kTooLong:
        *why = "reply line too long";
        return false;
      case LineSplitter::Next::kNeedMore:
        break;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                    deadline - std::chrono::steady_clock::now()).count();
    if (left <= 0) {
      *why = "timed out waiting for dstd";
      return false;
    }
    pollfd p{fd_, POLLIN, 0};
    int r = ::poll(&p, 1, int(left));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      *why = std::string("poll: ") + std::strerror(errno);
      return false;
    }
    if (r == 0) continue;
    ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      *why = std::string("cannot read from dstd: ") + std::strerror(errno);
      return false;
    }
    if (n == 0) {
      *why = "dstd closed the connection";
      return false;
    }
    splitter_.Append(buf, std::size_t(n));
  }
}

}  // namespace dst::control

namespace dst::control {

bool ControlClient::ReadLine(std::string* line, std::string* why, int timeout_ms) {
  if (fd_ < 0) {
    *why = "not connected";
    return false;
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  char buf[65536];
  for (;;) {
    switch (splitter_.Pop(line)) {
      case LineSplitter::Next::kLine:
        return true;
      case LineSplitter::Next::kTooLong:
        *why = "line too long";
        return false;
      case LineSplitter::Next::kNeedMore:
        break;
    }
    int wait = -1;
    if (timeout_ms >= 0) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                      deadline - std::chrono::steady_clock::now()).count();
      if (left <= 0) {
        *why = "timed out waiting for dstd";
        return false;
      }
      wait = int(left);
    }
    pollfd p{fd_, POLLIN, 0};
    int r = ::poll(&p, 1, wait);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      *why = std::string("poll: ") + std::strerror(errno);
      return false;
    }
    if (r == 0) continue;
    ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      *why = std::string("cannot read from dstd: ") + std::strerror(errno);
      return false;
    }
    if (n == 0) {
      *why = "dstd closed the connection";
      return false;
    }
    splitter_.Append(buf, std::size_t(n));
  }
}

}  // namespace dst::control
