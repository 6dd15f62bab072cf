// conn_flood: a legitimate NBD client's IOPS alone and under an attack (issue 11 item 3).
// Driven by bench/flood_bench.sh against a running dstd:
//
//   conn_flood --port NBD_PORT --export NAME --pid DSTD_PID [--attack held|trickle|slowdrain]
//              [--conns 2000] [--seconds 5] [--reconnect-ms 1000] [--drain-kbps 200]
//
// The legitimate client connects first from 127.0.0.1 and reads 4 KiB blocks at random offsets,
// one at a time.  The attack is `--conns` connections from 127.0.0.2, 127.0.0.3, ... (30 per
// address); one the server closes is opened again after `--reconnect-ms` (0: at once, which
// makes it a connect flood as well):
//   held       each sends one byte and holds;
//   trickle    each sends a byte of its handshake every 8 s;
//   slowdrain  each finishes the handshake, keeps 32 READs of 4 MiB queued and reads the replies
//              at --drain-kbps KB/s (one thread per connection).
// Printed: IOPS and the longest request of each phase, their ratio, and dstd's RSS and open fds
// (sampled every 100 ms, maximum) before and during.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "loopback.h"

namespace {

using Clock = std::chrono::steady_clock;

[[noreturn]] void Die(const char* what) {
  std::fprintf(stderr, "conn_flood: %s: %s\n", what, std::strerror(errno));
  std::exit(1);
}

std::uint64_t Be64(const unsigned char* p) {
  std::uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = v << 8 | p[i];
  return v;
}
void PutBe(unsigned char* p, std::uint64_t v, int n) {
  for (int i = n - 1; i >= 0; --i, v >>= 8) p[i] = static_cast<unsigned char>(v);
}

using dst::test::RecvFull;  // tests/lib/loopback.h
bool SendAll(int fd, const void* p, std::size_t n) {
  return ::send(fd, p, n, MSG_NOSIGNAL) == static_cast<ssize_t>(n);
}

sockaddr_in Addr(const char* ip, std::uint16_t port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  ::inet_pton(AF_INET, ip, &a.sin_addr);
  return a;
}

// The legitimate client: fixed newstyle, EXPORT_NAME, then simple 4 KiB READs.
struct Legit {
  int fd = -1;
  std::uint64_t size = 0;
  std::uint64_t cookie = 0;
  std::mt19937_64 rng{42};
  char buf[4096];

  ~Legit() {
    if (fd >= 0) ::close(fd);
  }
  // From `source`, with a receive buffer of `rcvbuf` bytes (0: the default).
  bool Open(std::uint16_t port, const std::string& name, const char* source = "127.0.0.1", int rcvbuf = 0) {
    fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in s = Addr(source, 0), a = Addr("127.0.0.1", port);
    if (rcvbuf) ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&s), sizeof s) != 0 ||
        ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0)
      return false;
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    timeval tv{5, 0};  // a request stalled this long fails the phase (ok=0) instead of hanging it
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    unsigned char g[18];
    if (!RecvFull(fd, g, sizeof g)) return false;
    unsigned char flags[4] = {0, 0, 0, 3};  // FIXED_NEWSTYLE | NO_ZEROES
    if (!SendAll(fd, flags, 4)) return false;
    std::vector<unsigned char> opt(16 + name.size());
    PutBe(opt.data(), 0x49484156454F5054ull, 8);  // IHAVEOPT
    PutBe(opt.data() + 8, 1, 4);                  // NBD_OPT_EXPORT_NAME
    PutBe(opt.data() + 12, name.size(), 4);
    std::memcpy(opt.data() + 16, name.data(), name.size());
    if (!SendAll(fd, opt.data(), opt.size())) return false;
    unsigned char r[10];
    if (!RecvFull(fd, r, sizeof r)) return false;
    size = Be64(r);
    return size >= 4096;
  }
  // Sends one READ of `len` bytes at a random aligned offset.
  bool SendRead(std::uint32_t len) {
    unsigned char q[28] = {};
    PutBe(q, 0x25609513, 4);
    PutBe(q + 8, ++cookie, 8);
    PutBe(q + 16, (rng() % (size / len)) * len, 8);
    PutBe(q + 24, len, 4);
    return SendAll(fd, q, sizeof q);
  }
  // One READ; false when the connection failed.
  bool Read() {
    unsigned char h[16];
    return SendRead(4096) && RecvFull(fd, h, sizeof h) && h[7] == 0 && h[6] == 0 && RecvFull(fd, buf, sizeof buf);
  }
};

struct Phase {
  double iops = 0;
  double max_ms = 0;
  bool ok = true;
};

Phase Measure(Legit& c, double seconds) {
  Phase p;
  std::uint64_t n = 0;
  const auto t0 = Clock::now();
  const auto end = t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  while (Clock::now() < end) {
    const auto s = Clock::now();
    const bool ok = c.Read();
    p.max_ms = std::max(p.max_ms, std::chrono::duration<double, std::milli>(Clock::now() - s).count());
    if (!ok) {
      p.ok = false;  // a failed request's time counts too: a stall ends in the 5 s timeout
      break;
    }
    ++n;
  }
  p.iops = double(n) / std::chrono::duration<double>(Clock::now() - t0).count();
  return p;
}

// dstd's resident memory (KiB) and open descriptors.
void Sample(int pid, long* rss_kib, int* fds) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/status", pid);
  if (FILE* f = std::fopen(path, "r")) {
    char line[256];
    while (std::fgets(line, sizeof line, f))
      if (std::strncmp(line, "VmRSS:", 6) == 0) *rss_kib = std::max(*rss_kib, std::atol(line + 6));
    std::fclose(f);
  }
  std::snprintf(path, sizeof path, "/proc/%d/fd", pid);
  int n = 0;
  if (DIR* d = ::opendir(path)) {
    while (::readdir(d)) ++n;
    ::closedir(d);
  }
  *fds = std::max(*fds, n - 2);
}

// The source address of attack connection i: 30 per address from 127.0.0.2.
std::string SourceOf(int i) {
  char src[32];
  std::snprintf(src, sizeof src, "127.0.%d.%d", 1 + i / 30 / 250, 2 + (i / 30) % 250);
  return src;
}

// Slow readers: each connection keeps kQueued READs of kReadBytes outstanding and reads the
// replies at `kbps` KB/s; reconnects (after reconnect_ms) when the server closes it.
class SlowDrain {
 public:
  static constexpr std::uint32_t kReadBytes = 4u << 20;
  static constexpr int kQueued = 32;
  SlowDrain(std::uint16_t port, std::string name, int n, int reconnect_ms, int kbps)
      : port_(port), name_(std::move(name)), n_(n), reconnect_(reconnect_ms), kbps_(kbps) {}
  void Start() {
    for (int i = 0; i < n_; ++i) threads_.emplace_back([this, i] { Run(i); });
  }
  void Stop() {
    stop_ = true;
    for (auto& t : threads_) t.join();
  }
  std::uint64_t opened() const { return opened_; }
  std::uint64_t closed_by_server() const { return closed_; }
  std::uint64_t bytes() const { return bytes_; }

 private:
  void Run(int i) {
    const std::string src = SourceOf(i);
    const std::size_t chunk = std::size_t(kbps_) * 1000 / 10;  // every 100 ms
    std::vector<char> buf(chunk);
    while (!stop_) {
      Legit c;
      if (!c.Open(port_, name_, src.c_str(), 64 << 10)) {
        std::this_thread::sleep_for(reconnect_);
        continue;
      }
      ++opened_;
      timeval tv{0, 200000};
      ::setsockopt(c.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      const std::uint64_t reply = 16 + kReadBytes;
      std::uint64_t got = 0, sent = 0;
      bool alive = true;
      auto next = Clock::now();
      while (!stop_ && alive) {
        for (; alive && sent < got / reply + kQueued; ++sent) alive = c.SendRead(kReadBytes);
        next += std::chrono::milliseconds(100);
        std::size_t want = chunk;
        while (alive && want > 0 && !stop_) {
          const ssize_t r = ::recv(c.fd, buf.data(), want, 0);
          if (r > 0) got += std::size_t(r), want -= std::size_t(r), bytes_ += std::size_t(r);
          else if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) alive = false;
          else break;
        }
        std::this_thread::sleep_until(next);
      }
      if (!alive && !stop_) {
        ++closed_;
        std::this_thread::sleep_for(reconnect_);
      }
    }
  }

  std::uint16_t port_;
  std::string name_;
  int n_;
  std::chrono::milliseconds reconnect_;
  int kbps_;
  std::vector<std::thread> threads_;
  std::atomic<bool> stop_{false};
  std::atomic<std::uint64_t> opened_{0}, closed_{0}, bytes_{0};
};

// Keeps `n` connections open, each after sending one byte (every `trickle_ms` again when set);
// reopens those the server closes.
class Flood {
 public:
  Flood(std::uint16_t port, int n, int reconnect_ms, int trickle_ms = 0)
      : port_(port), n_(n), reconnect_(reconnect_ms), trickle_(trickle_ms), fds_(static_cast<std::size_t>(n), -1) {}
  void Start() { thread_ = std::thread([this] { Run(); }); }
  void Stop() {
    stop_ = true;
    thread_.join();
  }
  std::uint64_t opened() const { return opened_; }
  std::uint64_t closed_by_server() const { return closed_; }

 private:
  void Open(int i) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) return;
    sockaddr_in s = Addr(SourceOf(i).c_str(), 0), a = Addr("127.0.0.1", port_);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&s), sizeof s) != 0 ||
        (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 && errno != EINPROGRESS)) {
      ::close(fd);
      return;
    }
    epoll_event ev{};
    ev.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP;
    ev.data.u64 = static_cast<std::uint64_t>(i);
    ::epoll_ctl(ep_, EPOLL_CTL_ADD, fd, &ev);
    fds_[static_cast<std::size_t>(i)] = fd;
    ++opened_;
  }
  void Run() {
    ep_ = ::epoll_create1(0);
    for (int i = 0; i < n_; ++i) Open(i);
    std::vector<epoll_event> evs(512);
    std::vector<char> sent(static_cast<std::size_t>(n_), 0);
    std::vector<std::pair<Clock::time_point, int>> later;  // closed slots to reopen, in order
    std::size_t next = 0;
    auto trickle_at = Clock::now() + trickle_;
    while (!stop_) {
      const auto now = Clock::now();
      while (next < later.size() && later[next].first <= now) Open(later[next++].second);
      if (next == later.size()) later.clear(), next = 0;
      if (trickle_.count() > 0 && now >= trickle_at) {  // the next byte of every handshake
        trickle_at = now + trickle_;
        for (int fd : fds_)
          if (fd >= 0) (void)!::send(fd, "x", 1, MSG_NOSIGNAL | MSG_DONTWAIT);
      }
      const int k = ::epoll_wait(ep_, evs.data(), int(evs.size()), 10);
      for (int j = 0; j < k; ++j) {
        const int i = static_cast<int>(evs[j].data.u64);
        const int fd = fds_[static_cast<std::size_t>(i)];
        if (fd < 0) continue;
        char b[4096];
        bool gone = evs[j].events & (EPOLLHUP | EPOLLERR | EPOLLRDHUP);
        if (!gone && (evs[j].events & EPOLLIN)) gone = ::recv(fd, b, sizeof b, 0) == 0;  // greeting is drained
        if (gone) {
          ::close(fd);
          fds_[static_cast<std::size_t>(i)] = -1;
          sent[static_cast<std::size_t>(i)] = 0;
          ++closed_;
          if (reconnect_.count() == 0) Open(i);
          else later.emplace_back(Clock::now() + reconnect_, i);
          continue;
        }
        if ((evs[j].events & EPOLLOUT) && !sent[static_cast<std::size_t>(i)]) {
          (void)!::send(fd, "x", 1, MSG_NOSIGNAL);
          sent[static_cast<std::size_t>(i)] = 1;
          epoll_event ev{};
          ev.events = EPOLLIN | EPOLLRDHUP;
          ev.data.u64 = static_cast<std::uint64_t>(i);
          ::epoll_ctl(ep_, EPOLL_CTL_MOD, fd, &ev);
        }
      }
    }
    for (int fd : fds_)
      if (fd >= 0) ::close(fd);
    ::close(ep_);
  }

  std::uint16_t port_;
  int n_;
  std::chrono::milliseconds reconnect_;
  std::chrono::milliseconds trickle_;
  std::vector<int> fds_;
  int ep_ = -1;
  std::atomic<bool> stop_{false};
  std::atomic<std::uint64_t> opened_{0}, closed_{0};
  std::thread thread_;
};

}  // namespace

int main(int argc, char** argv) {
  std::uint16_t port = 0;
  std::string name = "disk";
  int pid = 0, conns = 2000, reconnect_ms = 1000, drain_kbps = 200;
  double seconds = 5;
  std::string attack = "held";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--port") port = static_cast<std::uint16_t>(std::atoi(argv[i + 1]));
    else if (k == "--export") name = argv[i + 1];
    else if (k == "--pid") pid = std::atoi(argv[i + 1]);
    else if (k == "--conns") conns = std::atoi(argv[i + 1]);
    else if (k == "--seconds") seconds = std::atof(argv[i + 1]);
    else if (k == "--reconnect-ms") reconnect_ms = std::atoi(argv[i + 1]);
    else if (k == "--attack") attack = argv[i + 1];
    else if (k == "--drain-kbps") drain_kbps = std::atoi(argv[i + 1]);
  }
  if (attack != "held" && attack != "trickle" && attack != "slowdrain") {
    std::fprintf(stderr, "conn_flood: --attack is held, trickle or slowdrain\n");
    return 2;
  }
  if (!port || !pid) {
    std::fprintf(stderr, "usage: conn_flood --port NBD_PORT --pid DSTD_PID [--export NAME] [--conns N] [--seconds S]\n");
    return 2;
  }
  rlimit rl;
  if (::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &rl);
  }
  if (::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rlim_t(conns) + 64) {
    std::fprintf(stderr, "conn_flood: ulimit -n %llu is below --conns %d + 64\n", (unsigned long long)rl.rlim_cur, conns);
    return 2;
  }
  Legit c;
  if (!c.Open(port, name)) Die("legitimate client cannot connect");
  long rss0 = 0, rss1 = 0;
  int fds0 = 0, fds1 = 0;
  Sample(pid, &rss0, &fds0);
  Measure(c, 0.5);  // warm-up
  const Phase alone = Measure(c, seconds);
  Sample(pid, &rss0, &fds0);

  Flood flood(port, conns, reconnect_ms, attack == "trickle" ? 8000 : 0);
  SlowDrain slow(port, name, conns, reconnect_ms, drain_kbps);
  if (attack == "slowdrain") slow.Start(); else flood.Start();
  std::atomic<bool> sampling{true};
  std::thread sampler([&] {
    while (sampling) {
      Sample(pid, &rss1, &fds1);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
  std::this_thread::sleep_for(std::chrono::seconds(attack == "slowdrain" ? 2 : 1));  // the attack is up
  const Phase loaded = Measure(c, seconds);
  sampling = false;
  sampler.join();
  const bool slowdrain = attack == "slowdrain";
  slowdrain ? slow.Stop() : flood.Stop();

  std::printf("legit client alone:        %.0f IOPS, longest request %.1f ms\n", alone.iops, alone.max_ms);
  std::printf("under %d %s connections: %.0f IOPS, longest request %.1f ms%s\n", conns, attack.c_str(), loaded.iops,
              loaded.max_ms, loaded.ok ? "" : " (connection LOST)");
  std::printf("flood: %llu connections opened, %llu closed by dstd (reopened after %d ms)\n",
              (unsigned long long)(slowdrain ? slow.opened() : flood.opened()),
              (unsigned long long)(slowdrain ? slow.closed_by_server() : flood.closed_by_server()), reconnect_ms);
  if (slowdrain)
    std::printf("slow readers drained %.1f MB in all (%.0f KB/s each)\n", double(slow.bytes()) / 1e6,
                double(slow.bytes()) / 1e3 / conns / (seconds + 2));
  std::printf("dstd: RSS %.1f MiB alone, %.1f MiB max under flood; fds %d alone, %d max under flood\n",
              double(rss0) / 1024, double(rss1) / 1024, fds0, fds1);
  const double ratio = alone.iops > 0 ? loaded.iops / alone.iops : 0;
  std::printf("RESULT ratio=%.3f alone_iops=%.0f loaded_iops=%.0f max_stall_ms=%.1f rss_mib=%.1f fds=%d ok=%d attack=%s\n",
              ratio, alone.iops, loaded.iops, loaded.max_ms, double(rss1) / 1024, fds1, loaded.ok ? 1 : 0,
              attack.c_str());
  return loaded.ok ? 0 : 1;
}
