// FaultProxy: a TCP proxy on 127.0.0.1 in front of a DST exporter that understands just enough
// of the framing (docs/protocol.md §2: 48-byte header, payload after HELLO, WRITE requests and
// successful READ replies) to flip one byte in selected payloads, in either direction.  Used
// to prove that payload digests (§4.1) catch corruption and that without them it goes unseen.
// Header-only, no dst library dependency; one thread per direction per connection.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace dst::test {

class FaultProxy {
 public:
  // Payloads still to corrupt (each flips one byte in the middle of the next such payload).
  std::atomic<int> corrupt_writes{0};  // client -> exporter WRITE payloads
  std::atomic<int> corrupt_reads{0};   // exporter -> client READ reply payloads
  std::atomic<int> writes_corrupted{0};
  std::atomic<int> reads_corrupted{0};

  explicit FaultProxy(std::uint16_t target_port) : target_(target_port) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a = Loopback(0);
    ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof a);
    socklen_t len = sizeof a;
    ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    ::listen(listen_fd_, 16);
    accept_ = std::thread([this] { AcceptLoop(); });
  }
  ~FaultProxy() {
    stop_ = true;
    accept_.join();
    ::close(listen_fd_);
    std::lock_guard<std::mutex> l(mu_);
    for (int fd : fds_) ::shutdown(fd, SHUT_RDWR);
    for (auto& t : threads_) t.join();
    for (int fd : fds_) ::close(fd);
  }
  std::uint16_t port() const { return port_; }
  // Cuts every connection made so far (both sides see EOF); new ones are proxied as before.
  void DropConnections() {
    std::lock_guard<std::mutex> l(mu_);
    for (int fd : fds_) ::shutdown(fd, SHUT_RDWR);  // closed only in the destructor: no reuse
  }

 private:
  static sockaddr_in Loopback(std::uint16_t port) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port);
    return a;
  }
  static bool ReadFull(int fd, std::uint8_t* p, std::size_t n) {
    while (n) {
      ssize_t r = ::read(fd, p, n);
      if (r <= 0) return false;
      p += r;
      n -= static_cast<std::size_t>(r);
    }
    return true;
  }
  static bool WriteFull(int fd, const std::uint8_t* p, std::size_t n) {
    while (n) {
      ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
      if (w <= 0) return false;
      p += w;
      n -= static_cast<std::size_t>(w);
    }
    return true;
  }
  static std::uint32_t U32(const std::uint8_t* p) {
    return std::uint32_t(p[0]) << 24 | std::uint32_t(p[1]) << 16 | std::uint32_t(p[2]) << 8 | p[3];
  }

  void AcceptLoop() {
    while (!stop_) {
      pollfd p{listen_fd_, POLLIN, 0};
      if (::poll(&p, 1, 20) <= 0) continue;
      int cfd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (cfd < 0) continue;
      int sfd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_in a = Loopback(target_);
      if (::connect(sfd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
        ::close(cfd);
        ::close(sfd);
        continue;
      }
      int one = 1;
      ::setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      ::setsockopt(sfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      std::lock_guard<std::mutex> l(mu_);
      fds_.push_back(cfd);
      fds_.push_back(sfd);
      threads_.emplace_back([this, cfd, sfd] { Pipe(cfd, sfd, true); });
      threads_.emplace_back([this, cfd, sfd] { Pipe(sfd, cfd, false); });
    }
  }

  // Copies frames from `in` to `out`, corrupting payloads as asked.
  void Pipe(int in, int out, bool to_server) {
    std::vector<std::uint8_t> payload;
    std::uint8_t h[48];
    while (ReadFull(in, h, 48)) {
      const std::uint16_t cmd = std::uint16_t(h[4] << 8 | h[5]);
      const bool reply = cmd & 0x8000;
      const std::uint16_t c = cmd & 0x7fff;
      const std::uint32_t status = U32(h + 8), len = U32(h + 12);
      const bool write_payload = c == 3 && !reply;
      const bool read_payload = c == 2 && reply && status == 0;
      const bool has_payload = c == 1 || write_payload || read_payload;
      if (!WriteFull(out, h, 48)) break;
      if (!has_payload || len == 0) continue;
      payload.resize(len);
      if (!ReadFull(in, payload.data(), len)) break;
      std::atomic<int>& want = to_server ? corrupt_writes : corrupt_reads;
      if ((to_server ? write_payload : read_payload) && want.load() > 0 && want.fetch_sub(1) > 0) {
        payload[len / 2] ^= 0x5a;
        (to_server ? writes_corrupted : reads_corrupted).fetch_add(1);
      }
      if (!WriteFull(out, payload.data(), len)) break;
    }
    ::shutdown(in, SHUT_RDWR);
    ::shutdown(out, SHUT_RDWR);
  }

  std::uint16_t target_;
  int listen_fd_ = -1;
  std::uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread accept_;
  std::mutex mu_;
  std::vector<int> fds_;
  std::vector<std::thread> threads_;
};

}  // namespace dst::test
