// Raw control-socket helpers for tests that misbehave on purpose (pipelining without reading,
// oversized or deeply nested requests), where ControlClient would be too polite.
#pragma once

#include <poll.h>
#include <sys/socket.h>
#include <fcntl.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "dst/control/control_protocol.h"

namespace dst::test {

// VmRSS of a process in KiB (-1 if unknown).
inline long RssKiB(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  return -1;
}

// A connected blocking socket, or -1 (*err = errno).
inline int ConnectUnix(const std::string& path, int* err = nullptr) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::snprintf(a.sun_path, sizeof a.sun_path, "%s", path.c_str());
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    if (err) *err = errno;
    ::close(fd);
    return -1;
  }
  return fd;
}

inline bool SendAll(int fd, const std::string& s) {
  for (std::size_t off = 0; off < s.size();) {
    ssize_t n = ::send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
    if (n <= 0) return false;
    off += std::size_t(n);
  }
  return true;
}

// Reads lines until `want` lines, EOF or `timeout_ms` of silence.
inline std::vector<std::string> ReadLines(int fd, std::size_t want, int timeout_ms = 5000) {
  std::vector<std::string> lines;
  control::LineSplitter sp(64u << 20);
  char buf[65536];
  while (lines.size() < want) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) <= 0) break;
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) break;
    sp.Append(buf, std::size_t(n));
    std::string line;
    while (sp.Pop(&line) == control::LineSplitter::Next::kLine) lines.push_back(line);
  }
  return lines;
}

// A request nested `depth` arrays deep inside its params.
inline std::string DeepRequest(const std::string& method, int depth) {
  return "{\"id\":1,\"method\":\"" + method + "\",\"params\":{\"x\":" + std::string(depth, '[') +
         std::string(depth, ']') + "}}\n";
}

// Writes up to `n` pipelined `method` requests without reading, non-blocking, until the peer
// stops taking bytes for `stuck_ms`.  Returns how many requests went out whole; *partial is set
// when the last one went out only in part.
inline int FloodUnread(int fd, const std::string& method, int n, int stuck_ms, bool* partial) {
  int flags = ::fcntl(fd, F_GETFL);
  ::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
  std::string pending;
  int sent = 0, idle_ms = 0;
  while (sent < n || !pending.empty()) {
    if (pending.empty()) pending = control::EncodeRequest(sent++, method);
    ssize_t w = ::send(fd, pending.data(), pending.size(), MSG_NOSIGNAL);
    if (w > 0) {
      pending.erase(0, std::size_t(w));
      idle_ms = 0;
    } else if (idle_ms >= stuck_ms) {
      break;
    } else {
      ::usleep(1000);
      ++idle_ms;
    }
  }
  ::fcntl(fd, F_SETFL, flags);
  *partial = !pending.empty();
  return *partial ? sent - 1 : sent;
}

}  // namespace dst::test
