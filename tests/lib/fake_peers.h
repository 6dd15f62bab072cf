// Fake DST and NBD servers for client tests and later fuzz/security work.  Both run on their own
// threads (blocking sockets, loopback or a Unix socket only) and can misbehave on purpose, so
// the clients' handling of lying or broken peers can be tested:
//
//   FakeDstServer (DST v1, docs/protocol.md): reorder / delay / drop replies, go silent, close
//     mid-frame, stale-generation (unknown id) replies, EPROTO, READ replies of the wrong length,
//     refuse connections, drop every connection (an exporter restart), swap content (SetDisk).
//   FakeNbdServer (NBD fixed newstyle, docs/nbd.md): simple or structured replies, hole chunks,
//     error chunks, close mid-reply, silent connections, and lying structured READ replies
//     (a half sent twice, overlapping chunks, missing bytes), refuse connections, SetDisk.
//
// Threads of these servers set t_fake_peer_thread, so a test's allocation counter can ignore
// them (they are not the code under test).
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <QTemporaryDir>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "dst/net/codec.h"
#include "dst/net/nbd_format.h"

namespace dst::test {

inline thread_local bool t_fake_peer_thread = false;

inline bool FakeReadFull(int fd, void* buf, std::size_t n) {
  auto* p = static_cast<char*>(buf);
  while (n) {
    ssize_t r = ::read(fd, p, n);
    if (r <= 0) {
      if (r < 0 && errno == EINTR) continue;
      return false;
    }
    p += r;
    n -= static_cast<std::size_t>(r);
  }
  return true;
}

inline bool FakeWriteFull(int fd, const void* buf, std::size_t n) {
  auto* p = static_cast<const char*>(buf);
  while (n) {
    ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w <= 0) {
      if (w < 0 && errno == EINTR) continue;
      return false;
    }
    p += w;
    n -= static_cast<std::size_t>(w);
  }
  return true;
}

inline bool FakeAllZero(const char* p, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i)
    if (p[i]) return false;
  return true;
}

namespace fake_detail {
using namespace dst::net;
namespace nb = dst::net::nbd;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

struct FakeDstEvent {
  enum Kind { kArrive, kReply } kind;
  std::uint16_t cmd;
  std::uint64_t offset;
  std::uint32_t length;
  std::uint64_t id;
  int conn;
};

class FakeDstServer {
 public:
  explicit FakeDstServer(std::uint64_t size = 16u << 20) : disk_(size, 0) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof a);
    socklen_t len = sizeof a;
    getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    ::listen(listen_fd_, 16);
    accept_thread_ = std::thread([this] { AcceptLoop(); });
  }

  ~FakeDstServer() {
    stop_ = true;
    accept_thread_.join();
    ::close(listen_fd_);
    std::vector<std::shared_ptr<Conn>> conns;
    {
      std::lock_guard<std::mutex> l(mu_);
      conns = conns_;
    }
    for (auto& c : conns) Shutdown(*c);
    for (auto& c : conns) {
      if (c->reader.joinable()) c->reader.join();
      if (c->replier.joinable()) c->replier.join();
      ::close(c->fd);
    }
  }

  std::uint16_t port() const { return port_; }

  // Behaviour knobs (may be changed at any time).
  std::atomic<bool> silent{false};        // never reply to anything but HELLO
  std::atomic<bool> drop_io{false};       // answer PINGs, never I/O (a hung disk behind a live server)
  std::atomic<int> reorder_batch{0};      // >0: hold replies, send each batch reversed
  std::atomic<int> write_delay_ms{0};     // delay WRITE replies (reads pass them)
  std::atomic<int> close_after{0};        // close a connection after this many requests (once)
  std::atomic<bool> close_mid_frame{false};
  std::atomic<bool> inject_stale{false};  // send a stale-generation READ reply before each READ reply
  std::atomic<std::uint64_t> hello_size{0};  // 0: disk size
  std::atomic<bool> hello_read_only{false};
  // Poison requests: a request at this offset gets the exporter's framing-error answer (an
  // EPROTO DISCONNECT|reply carrying its id, then close) or a close without any reply.
  std::atomic<std::uint64_t> eproto_offset{~0ull};
  std::atomic<std::uint64_t> kill_offset{~0ull};
  // A lying peer: every successful READ reply is 512 bytes short (header and payload agree,
  // so the stream stays in sync; only the length does not match the request).
  std::atomic<bool> wrong_length{false};
  std::atomic<bool> refuse{false};  // close every new connection at once (a dead exporter)

  std::atomic<int> connections{0};
  std::atomic<int> stale_sent{0};
  std::atomic<int> max_outstanding{0};

  std::vector<FakeDstEvent> events() {
    std::lock_guard<std::mutex> l(mu_);
    return events_;
  }
  std::vector<Clock::time_point> accept_times() {
    std::lock_guard<std::mutex> l(mu_);
    return accept_times_;
  }
  void ClearEvents() {
    std::lock_guard<std::mutex> l(mu_);
    events_.clear();
  }
  std::vector<char> Disk() {
    std::lock_guard<std::mutex> l(disk_mu_);
    return disk_;
  }
  void SetDisk(std::uint64_t off, const char* p, std::size_t n) {
    std::lock_guard<std::mutex> l(disk_mu_);
    std::memcpy(disk_.data() + off, p, n);
  }
  void Record(FakeDstEvent e) {
    std::lock_guard<std::mutex> l(mu_);
    events_.push_back(e);
  }
  // Drops every open connection (the exporter restarted).
  void DropConnections() {
    std::vector<std::shared_ptr<Conn>> conns;
    {
      std::lock_guard<std::mutex> l(mu_);
      conns = conns_;
    }
    for (auto& c : conns) Shutdown(*c);
  }

 private:
  struct Job {
    Header h;
    Clock::time_point due;
    Clock::time_point arrive;
  };
  struct Conn {
    int fd = -1;
    int index = 0;
    std::thread reader, replier;
    std::mutex mu;
    std::condition_variable cv;
    std::deque<Job> jobs;
    bool stop = false;
    std::mutex send_mu;
    std::atomic<int> outstanding{0};
  };

  void Shutdown(Conn& c) {
    {
      std::lock_guard<std::mutex> l(c.mu);
      c.stop = true;
      c.cv.notify_all();
    }
    ::shutdown(c.fd, SHUT_RDWR);
  }

  void AcceptLoop() {
    t_fake_peer_thread = true;
    while (!stop_) {
      pollfd p{listen_fd_, POLLIN, 0};
      if (::poll(&p, 1, 20) <= 0) continue;
      int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      if (refuse) {
        ::close(fd);
        continue;
      }
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      auto c = std::make_shared<Conn>();
      c->fd = fd;
      {
        std::lock_guard<std::mutex> l(mu_);
        c->index = static_cast<int>(conns_.size());
        conns_.push_back(c);
        accept_times_.push_back(Clock::now());
      }
      connections.fetch_add(1);
      Conn* cp = c.get();
      c->reader = std::thread([this, cp] { ReaderLoop(*cp); });
      c->replier = std::thread([this, cp] { ReplierLoop(*cp); });
    }
  }

  void ReaderLoop(Conn& c) {
    t_fake_peer_thread = true;
    std::vector<char> payload(kAbsoluteMaxPayload);
    std::uint8_t hb[kHeaderSize];
    int requests = 0;
    while (true) {
      if (!FakeReadFull(c.fd, hb, kHeaderSize)) break;
      Header h;
      if (!DecodeHeader(hb, &h).ok()) break;
      if (HasPayload(h) && !FakeReadFull(c.fd, payload.data(), h.length)) break;
      if (h.command() == Cmd::kHello) {
        HelloRequest hr;
        if (!DecodeHelloRequest(reinterpret_cast<std::uint8_t*>(payload.data()), h.length, &hr).ok()) break;
        HelloReply r;
        r.export_flags = kExportCanFlush | kExportCanFua | kExportCanTrim | kExportCanWriteZeroes;
        if (hello_read_only) r.export_flags |= kExportReadOnly;
        r.size = hello_size ? hello_size.load() : disk_.size();
        r.permissions = hello_read_only ? kPermRead : (kPermRead | kPermWrite);
        std::uint8_t out[kHeaderSize + kHelloReplySize];
        Header rh;
        rh.cmd = h.cmd | kReplyBit;
        rh.length = kHelloReplySize;
        rh.id = h.id;
        EncodeHeader(rh, out);
        EncodeHelloReply(r, out + kHeaderSize, kHelloReplySize);
        std::lock_guard<std::mutex> l(c.send_mu);
        if (!FakeWriteFull(c.fd, out, sizeof out)) break;
        continue;
      }
      if (h.command() != Cmd::kPing) {
        ++requests;
        Record({FakeDstEvent::kArrive, h.cmd, h.offset, h.length, h.id, c.index});
        const int o = c.outstanding.fetch_add(1) + 1;
        int m = max_outstanding.load();
        while (o > m && !max_outstanding.compare_exchange_weak(m, o)) {}
        if (h.offset == eproto_offset.load()) {
          Header rh;
          rh.cmd = std::uint16_t(Cmd::kDisconnect) | kReplyBit;
          rh.status = std::uint32_t(WireStatus::kProto);
          rh.id = h.id;
          std::uint8_t out[kHeaderSize];
          EncodeHeader(rh, out);
          std::lock_guard<std::mutex> l(c.send_mu);
          FakeWriteFull(c.fd, out, sizeof out);
          break;
        }
        if (h.offset == kill_offset.load()) break;
      }
      if (h.command() == Cmd::kWrite) SetDisk(h.offset, payload.data(), h.length);
      if (h.command() == Cmd::kWriteZeroes || h.command() == Cmd::kTrim) {
        std::vector<char> z(h.length, 0);
        SetDisk(h.offset, z.data(), h.length);
      }
      int ca = close_after.load();
      if (ca > 0 && requests >= ca && close_after.compare_exchange_strong(ca, 0)) {
        if (close_mid_frame) {
          Header rh;
          rh.cmd = h.cmd | kReplyBit;
          rh.id = h.id;
          std::uint8_t out[kHeaderSize];
          EncodeHeader(rh, out);
          std::lock_guard<std::mutex> l(c.send_mu);
          FakeWriteFull(c.fd, out, 20);  // a torn header
        }
        break;
      }
      Job j;
      j.h = h;
      j.arrive = Clock::now();
      j.due = j.arrive;
      if (h.command() == Cmd::kWrite && write_delay_ms > 0) j.due += milliseconds(write_delay_ms.load());
      std::lock_guard<std::mutex> l(c.mu);
      c.jobs.push_back(j);
      c.cv.notify_all();
    }
    Shutdown(c);
  }

  void SendReply(Conn& c, const Job& j, std::vector<char>& buf) {
    if (silent) return;
    const Header& h = j.h;
    if (drop_io && h.command() != Cmd::kPing) return;
    Header rh;
    rh.cmd = h.cmd | kReplyBit;
    rh.id = h.id;
    rh.length = h.length;
    rh.offset = h.offset;
    std::size_t n = kHeaderSize;
    if (h.command() == Cmd::kRead) {
      if (inject_stale) {
        Header sh = rh;
        sh.id = (((h.id >> 32) + 1000) << 32) | (h.id & 0xffffffffu);  // a generation never used
        EncodeHeader(sh, reinterpret_cast<std::uint8_t*>(buf.data()));
        std::memset(buf.data() + kHeaderSize, 0xEE, h.length);
        std::lock_guard<std::mutex> l(c.send_mu);
        FakeWriteFull(c.fd, buf.data(), kHeaderSize + h.length);
        stale_sent.fetch_add(1);
      }
      std::lock_guard<std::mutex> l(disk_mu_);
      std::memcpy(buf.data() + kHeaderSize, disk_.data() + h.offset, h.length);
      n += h.length;
      if (wrong_length && h.length > 512) {
        rh.length = h.length - 512;
        n -= 512;
      }
    } else if (h.command() == Cmd::kFlush || h.command() == Cmd::kPing) {
      rh.length = 0;
      rh.offset = 0;
    }
    EncodeHeader(rh, reinterpret_cast<std::uint8_t*>(buf.data()));
    if (h.command() != Cmd::kPing) {
      c.outstanding.fetch_sub(1);
      Record({FakeDstEvent::kReply, h.cmd, h.offset, h.length, h.id, c.index});
    }
    std::lock_guard<std::mutex> l(c.send_mu);
    FakeWriteFull(c.fd, buf.data(), n);
  }

  void ReplierLoop(Conn& c) {
    t_fake_peer_thread = true;
    std::vector<char> buf(kHeaderSize + kAbsoluteMaxPayload);
    std::unique_lock<std::mutex> l(c.mu);
    while (!c.stop) {
      if (c.jobs.empty()) {
        c.cv.wait(l);
        continue;
      }
      const auto now = Clock::now();
      const int rb = reorder_batch.load();
      if (rb > 0) {
        if (static_cast<int>(c.jobs.size()) < rb && now - c.jobs.front().arrive < milliseconds(20)) {
          c.cv.wait_for(l, milliseconds(2));
          continue;
        }
        std::vector<Job> batch(c.jobs.begin(), c.jobs.end());
        c.jobs.clear();
        l.unlock();
        std::reverse(batch.begin(), batch.end());
        for (auto& j : batch) SendReply(c, j, buf);
        l.lock();
        continue;
      }
      auto it = std::find_if(c.jobs.begin(), c.jobs.end(), [&](const Job& j) { return j.due <= now; });
      if (it == c.jobs.end()) {
        auto next = std::min_element(c.jobs.begin(), c.jobs.end(),
                                     [](const Job& a, const Job& b) { return a.due < b.due; });
        c.cv.wait_until(l, next->due);
        continue;
      }
      Job j = *it;
      c.jobs.erase(it);
      l.unlock();
      SendReply(c, j, buf);
      l.lock();
    }
  }

  int listen_fd_ = -1;
  std::uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread accept_thread_;
  std::mutex mu_;
  std::vector<std::shared_ptr<Conn>> conns_;
  std::vector<FakeDstEvent> events_;
  std::vector<Clock::time_point> accept_times_;
  std::mutex disk_mu_;
  std::vector<char> disk_;
};

class FakeNbdServer {
 public:
  std::atomic<bool> fixed{true}, no_zeroes{true}, offer_structured{true}, support_go{true};
  std::atomic<bool> hole_chunks{false};    // READ: reversed halves, all-zero halves as holes
  std::atomic<std::int64_t> error_offset{-1};  // a READ covering it fails with EIO
  std::atomic<int> silent_conn{0};         // this connection number (1-based) never replies; -1: all
  std::atomic<int> close_mid_read{0};      // >0: the next READ gets half its reply, then a close
  std::atomic<int> write_delay_ms{0};
  std::atomic<int> pipelined_after_write{0};  // a request was already waiting when a write ended
  std::atomic<std::uint64_t> size;
  std::atomic<int> connections{0};
  std::atomic<int> discs{0};
  std::atomic<std::uint32_t> min_block{1};
  // A lying server (structured READ replies): 1 = the first half twice, the second half never
  // (the chunk lengths still add up); 2 = two overlapping chunks covering everything;
  // 3 = only the first half, then DONE.
  std::atomic<int> lie{0};
  // Structured replies: a READ's reply is preceded by an OFFSET_DATA chunk for a cookie the
  // client never used (an unknown handle; the client must drain it).
  std::atomic<bool> unknown_cookie_chunk{false};
  std::atomic<bool> refuse{false};  // close new connections at once (a dead server)
  std::string name = "fake";

  explicit FakeNbdServer(std::uint64_t sz = 8u << 20) : size(sz), disk_(sz, 0) {
    path_ = dir_.path() + "/fake.sock";
    listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path_.toLocal8Bit().constData(), sizeof a.sun_path - 1);
    ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof a);
    ::listen(listen_fd_, 16);
    accept_thread_ = std::thread([this] { AcceptLoop(); });
  }
  ~FakeNbdServer() {
    stop_ = true;
    ::shutdown(listen_fd_, SHUT_RDWR);
    accept_thread_.join();
    ::close(listen_fd_);
    DropConnections();
    for (auto& t : threads_) t.join();
  }
  std::string path() const { return path_.toStdString(); }
  void DropConnections() {
    std::lock_guard<std::mutex> l(mu_);
    for (int fd : fds_) ::shutdown(fd, SHUT_RDWR);
  }
  std::vector<char> Disk() {
    std::lock_guard<std::mutex> l(mu_);
    return disk_;
  }
  void SetDisk(std::uint64_t off, const char* p, std::size_t n) {
    std::lock_guard<std::mutex> l(mu_);
    std::memcpy(disk_.data() + off, p, n);
  }

 private:
  void AcceptLoop() {
    t_fake_peer_thread = true;
    for (;;) {
      int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) {
        if (stop_) return;
        if (errno == EINTR) continue;
        return;
      }
      if (refuse) {
        ::close(fd);
        continue;
      }
      std::lock_guard<std::mutex> l(mu_);
      fds_.push_back(fd);
      const int n = ++connections;
      threads_.emplace_back([this, fd, n] {
        t_fake_peer_thread = true;
        Serve(fd, n);
        std::lock_guard<std::mutex> g(mu_);
        fds_.erase(std::find(fds_.begin(), fds_.end(), fd));
        ::close(fd);
      });
    }
  }

  bool OptReply(int fd, std::uint32_t opt, std::uint32_t type, const std::string& data) {
    std::uint8_t h[20];
    nb::Put64(h, nb::kOptReplyMagic);
    nb::Put32(h + 8, opt);
    nb::Put32(h + 12, type);
    nb::Put32(h + 16, static_cast<std::uint32_t>(data.size()));
    return FakeWriteFull(fd, h, 20) && FakeWriteFull(fd, data.data(), data.size());
  }

  std::uint16_t TxFlags() const {
    return nb::kTxHasFlags | nb::kTxSendFlush | nb::kTxSendFua | nb::kTxSendTrim | nb::kTxSendWriteZeroes;
  }

  void Serve(int fd, int conn) {
    std::uint8_t g[18];
    nb::Put64(g, nb::kNbdMagic);
    nb::Put64(g + 8, nb::kOptMagic);
    nb::Put16(g + 16, static_cast<std::uint16_t>((fixed ? nb::kFlagFixedNewstyle : 0) | (no_zeroes ? nb::kFlagNoZeroes : 0)));
    if (!FakeWriteFull(fd, g, 18)) return;
    std::uint8_t cf[4];
    if (!FakeReadFull(fd, cf, 4)) return;
    const bool client_no_zeroes = nb::Get32(cf) & nb::kClientFlagNoZeroes;
    bool structured = false;
    for (;;) {
      std::uint8_t h[16];
      if (!FakeReadFull(fd, h, 16) || nb::Get64(h) != nb::kOptMagic) return;
      const std::uint32_t opt = nb::Get32(h + 8), len = nb::Get32(h + 12);
      std::string data(len, '\0');
      if (!FakeReadFull(fd, data.data(), len)) return;
      if (opt == nb::kOptExportName) {
        if (data != name) return;  // the only way to refuse
        std::uint8_t r[10 + 124] = {};
        nb::Put64(r, size.load());
        nb::Put16(r + 8, TxFlags());
        if (!FakeWriteFull(fd, r, client_no_zeroes ? 10 : sizeof r)) return;
        break;
      }
      if (opt == nb::kOptStructuredReply && offer_structured && fixed) {
        structured = true;
        if (!OptReply(fd, opt, nb::kRepAck, {})) return;
        continue;
      }
      if (opt == nb::kOptGo && support_go && fixed) {
        const auto* d = reinterpret_cast<const std::uint8_t*>(data.data());
        const std::uint32_t nl = nb::Get32(d);
        if (data.substr(4, nl) != name) {
          if (!OptReply(fd, opt, nb::kRepErrUnknown, "no such export")) return;
          continue;
        }
        std::string ex(12, '\0');
        auto* e = reinterpret_cast<std::uint8_t*>(ex.data());
        nb::Put16(e, nb::kInfoExport);
        nb::Put64(e + 2, size.load());
        nb::Put16(e + 10, TxFlags());
        std::string bs(14, '\0');
        auto* b = reinterpret_cast<std::uint8_t*>(bs.data());
        nb::Put16(b, nb::kInfoBlockSize);
        nb::Put32(b + 2, min_block.load());
        nb::Put32(b + 6, 4096);
        nb::Put32(b + 10, 1u << 20);
        if (!OptReply(fd, opt, nb::kRepInfo, ex) || !OptReply(fd, opt, nb::kRepInfo, bs) ||
            !OptReply(fd, opt, nb::kRepAck, {}))
          return;
        break;
      }
      if (!OptReply(fd, opt, nb::kRepErrUnsup, {})) return;
    }
    Transmit(fd, conn, structured);
  }

  bool Simple(int fd, std::uint32_t err, std::uint64_t cookie, const char* data = nullptr, std::size_t n = 0) {
    std::uint8_t r[16];
    nb::Put32(r, nb::kSimpleReplyMagic);
    nb::Put32(r + 4, err);
    nb::Put64(r + 8, cookie);
    return FakeWriteFull(fd, r, 16) && (n == 0 || FakeWriteFull(fd, data, n));
  }
  bool Chunk(int fd, std::uint16_t flags, std::uint16_t type, std::uint64_t cookie, const std::string& payload) {
    std::uint8_t r[20];
    nb::Put32(r, nb::kStructuredReplyMagic);
    nb::Put16(r + 4, flags);
    nb::Put16(r + 6, type);
    nb::Put64(r + 8, cookie);
    nb::Put32(r + 16, static_cast<std::uint32_t>(payload.size()));
    return FakeWriteFull(fd, r, 20) && FakeWriteFull(fd, payload.data(), payload.size());
  }
  std::string OffsetPrefix(std::uint64_t off) {
    std::string s(8, '\0');
    nb::Put64(reinterpret_cast<std::uint8_t*>(s.data()), off);
    return s;
  }

  void Transmit(int fd, int conn, bool structured) {
    std::vector<char> buf;
    for (;;) {
      std::uint8_t q[28];
      if (!FakeReadFull(fd, q, 28) || nb::Get32(q) != nb::kRequestMagic) return;
      const std::uint16_t type = nb::Get16(q + 6);
      const std::uint64_t cookie = nb::Get64(q + 8), off = nb::Get64(q + 16);
      const std::uint32_t len = nb::Get32(q + 24);
      if (type == nb::kCmdWrite) {
        buf.resize(len);
        if (!FakeReadFull(fd, buf.data(), len)) return;
      }
      if (type == nb::kCmdDisc) {
        ++discs;
        return;
      }
      const int sc = silent_conn.load();
      if (sc == -1 || sc == conn) continue;
      if (off + len > disk_.size()) {
        if (!Simple(fd, nb::kEinval, cookie)) return;
        continue;
      }
      bool ok = true;
      switch (type) {
        case nb::kCmdWrite: {
          if (write_delay_ms) {
            std::this_thread::sleep_for(milliseconds(write_delay_ms.load()));
            char c;
            if (::recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) == 1) ++pipelined_after_write;
          }
          {
            std::lock_guard<std::mutex> l(mu_);
            std::memcpy(disk_.data() + off, buf.data(), len);
          }
          ok = structured ? Chunk(fd, nb::kReplyFlagDone, nb::kChunkNone, cookie, {}) : Simple(fd, 0, cookie);
          break;
        }
        case nb::kCmdTrim:
        case nb::kCmdWriteZeroes: {
          {
            std::lock_guard<std::mutex> l(mu_);
            std::memset(disk_.data() + off, 0, len);
          }
          ok = Simple(fd, 0, cookie);
          break;
        }
        case nb::kCmdFlush:
          ok = Simple(fd, 0, cookie);
          break;
        case nb::kCmdRead: {
          buf.resize(len);
          {
            std::lock_guard<std::mutex> l(mu_);
            std::memcpy(buf.data(), disk_.data() + off, len);
          }
          const std::int64_t eo = error_offset.load();
          if (eo >= 0 && std::uint64_t(eo) >= off && std::uint64_t(eo) < off + len) {
            if (structured) {
              std::string p(6, '\0');
              nb::Put32(reinterpret_cast<std::uint8_t*>(p.data()), nb::kEio);
              nb::Put16(reinterpret_cast<std::uint8_t*>(p.data()) + 4, 4);
              p += "bad!";
              ok = Chunk(fd, nb::kReplyFlagDone, nb::kChunkError, cookie, p);
            } else {
              ok = Simple(fd, nb::kEio, cookie);
            }
            break;
          }
          if (close_mid_read > 0) {
            --close_mid_read;
            if (structured) {
              std::uint8_t r[20];
              nb::Put32(r, nb::kStructuredReplyMagic);
              nb::Put16(r + 4, nb::kReplyFlagDone);
              nb::Put16(r + 6, nb::kChunkOffsetData);
              nb::Put64(r + 8, cookie);
              nb::Put32(r + 16, len + 8);
              FakeWriteFull(fd, r, 20);
              std::string p = OffsetPrefix(off);
              FakeWriteFull(fd, p.data(), 8);
            } else {
              Simple(fd, 0, cookie);
            }
            FakeWriteFull(fd, buf.data(), len / 2);
            return;
          }
          if (structured && unknown_cookie_chunk)
            ok = Chunk(fd, nb::kReplyFlagDone, nb::kChunkOffsetData, cookie ^ (std::uint64_t(0x5a5a) << 40),
                       OffsetPrefix(off) + std::string(len, '\xEE'));
          if (!ok) {
          } else if (!structured) {
            ok = Simple(fd, 0, cookie, buf.data(), len);
          } else if (lie == 3 && len >= 4) {
            ok = Chunk(fd, nb::kReplyFlagDone, nb::kChunkOffsetData, cookie,
                       OffsetPrefix(off) + std::string(buf.data(), len / 2));
          } else if (lie && len >= 4) {
            const std::uint32_t a = lie == 1 ? len / 2 : len * 3 / 4;  // first chunk [0, a)
            const std::uint32_t b = lie == 1 ? 0 : len / 4;               // second chunk [b, ...)
            ok = Chunk(fd, 0, nb::kChunkOffsetData, cookie, OffsetPrefix(off) + std::string(buf.data(), a)) &&
                 Chunk(fd, nb::kReplyFlagDone, nb::kChunkOffsetData, cookie,
                       OffsetPrefix(off + b) + std::string(buf.data() + b, lie == 1 ? len - a : len - b));
          } else if (hole_chunks && len >= 2) {
            const std::uint32_t h = len / 2;
            for (int part = 1; part >= 0 && ok; --part) {  // second half first
              const std::uint32_t po = part ? h : 0, pl = part ? len - h : h;
              if (FakeAllZero(buf.data() + po, pl)) {
                std::string p(12, '\0');
                nb::Put64(reinterpret_cast<std::uint8_t*>(p.data()), off + po);
                nb::Put32(reinterpret_cast<std::uint8_t*>(p.data()) + 8, pl);
                ok = Chunk(fd, 0, nb::kChunkOffsetHole, cookie, p);
              } else {
                ok = Chunk(fd, 0, nb::kChunkOffsetData, cookie, OffsetPrefix(off + po) + std::string(buf.data() + po, pl));
              }
            }
            if (ok) ok = Chunk(fd, nb::kReplyFlagDone, nb::kChunkNone, cookie, {});
          } else {
            ok = Chunk(fd, nb::kReplyFlagDone, nb::kChunkOffsetData, cookie,
                       OffsetPrefix(off) + std::string(buf.data(), len));
          }
          break;
        }
        default:
          ok = Simple(fd, nb::kEinval, cookie);
      }
      if (!ok) return;
    }
  }

  QTemporaryDir dir_;
  QString path_;
  int listen_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::thread accept_thread_;
  std::mutex mu_;
  std::vector<int> fds_;
  std::vector<std::thread> threads_;
  std::vector<char> disk_;
};

}  // namespace fake_detail

using fake_detail::FakeDstEvent;
using fake_detail::FakeDstServer;
using fake_detail::FakeNbdServer;

}  // namespace dst::test
