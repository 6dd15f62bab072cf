// Integration: a real dstd keeps serving a well-behaved client with correct data while other
// clients throw garbage at its DST port (random bytes, truncated frames, huge lengths, bad
// commands, half-open and idle connections, connect storms).  127.0.0.1 only.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <QFile>
#include <QTemporaryDir>
#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "daemon_process.h"
#include "dst/net/codec.h"
#include "test_env.h"

using namespace dst;
using namespace dst::net;
using namespace dst::test;

namespace {

constexpr std::uint32_t kBlock = 65536;
constexpr int kSlots = 64;  // the good client's working set: 64 x 64 KiB = 4 MiB

int ConnectLoopback(std::uint16_t port, int timeout_s = 10) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return -1;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  timeval tv{timeout_s, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  return fd;
}

bool SendAll(int fd, const void* p, std::size_t n) {
  auto* c = static_cast<const char*>(p);
  while (n) {
    ssize_t w = ::send(fd, c, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    c += w;
    n -= std::size_t(w);
  }
  return true;
}

bool RecvAll(int fd, void* p, std::size_t n) {
  auto* c = static_cast<char*>(p);
  while (n) {
    ssize_t r = ::recv(fd, c, n, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    c += r;
    n -= std::size_t(r);
  }
  return true;
}

bool SendHeader(int fd, std::uint16_t cmd, std::uint64_t id, std::uint64_t off, std::uint32_t len,
                std::uint16_t flags = 0) {
  Header h;
  h.cmd = cmd;
  h.flags = flags;
  h.id = id;
  h.offset = off;
  h.length = len;
  std::uint8_t b[kHeaderSize];
  EncodeHeader(h, b);
  return SendAll(fd, b, sizeof b);
}

// HELLO; returns the reply status or -1.
long Hello(int fd, const std::string& name, std::uint64_t session = 0) {
  HelloRequest r;
  r.export_name = name;
  r.session_id = session;
  std::uint8_t p[512];
  std::size_t n = EncodeHelloRequest(r, p, sizeof p);
  if (!SendHeader(fd, std::uint16_t(Cmd::kHello), 1, 0, std::uint32_t(n)) || !SendAll(fd, p, n)) return -1;
  std::uint8_t hb[kHeaderSize];
  Header h;
  if (!RecvAll(fd, hb, sizeof hb) || !DecodeHeader(hb, &h).ok()) return -1;
  std::uint8_t rp[4096];
  if (h.length > sizeof rp || (h.length && !RecvAll(fd, rp, h.length))) return -1;
  return long(h.status);
}

void Pattern(char* p, std::uint32_t n, std::uint32_t seed) {
  std::uint32_t x = seed * 2654435761u + 1;
  for (std::uint32_t i = 0; i < n; i += 4) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    std::memcpy(p + i, &x, 4);
  }
}

struct Failures {
  std::mutex mu;
  std::vector<std::string> msgs;
  void Add(std::string m) {
    std::lock_guard<std::mutex> l(mu);
    if (msgs.size() < 20) msgs.push_back(std::move(m));
  }
  bool empty() {
    std::lock_guard<std::mutex> l(mu);
    return msgs.empty();
  }
};

}  // namespace

class GarbageTest : public QObject {
  Q_OBJECT
 private slots:
  void goodClientSurvivesGarbage() {
    const std::string dstd = BinPath("dstd");
    DST_REQUIRE(QFile::exists(QString::fromStdString(dstd)), "dstd is not built");
    QTemporaryDir dir;
    QVERIFY(dir.isValid());
    DaemonProcess d(dir.path() + "/state");
    d.config() = QString("[[export]]\nname = \"disk\"\npath = \"%1/disk.img\"\nsize = \"16M\"\n").arg(dir.path());
    QVERIFY2(d.Start(), d.Log().constData());
    const std::uint16_t port = d.port();

    std::atomic<bool> stop{false};
    Failures fail;
    std::atomic<std::uint64_t> good_ops{0}, garbage_conns{0};
    // Expected content of each slot (generation numbers; 0 = never written).
    std::vector<std::uint32_t> gen(kSlots, 0);

    // ---- the well-behaved client: verified writes and reads, pipelined 4 deep ----
    std::thread good([&] {
      int fd = ConnectLoopback(port);
      if (fd < 0 || Hello(fd, "disk") != 0) {
        fail.Add("good client: connect/HELLO failed");
        stop = true;
        return;
      }
      std::vector<char> wbuf(4 * std::size_t(kBlock)), rbuf(kBlock);
      std::uint32_t next_gen = 1;
      std::uint64_t id = 100;
      std::mt19937 rng(1);
      // `bad` (our own failure) ends the loop at once; `stop` (time is up) only between rounds,
      // so no reply is left unread before the final pass.
      bool bad = false;
      while (!stop && !bad) {
        // Pipeline 4 writes to distinct slots, then 4 verified reads.
        int slot_ids[4];
        std::uint32_t gens[4];
        for (int k = 0; k < 4; ++k) {
          slot_ids[k] = int((rng() % (kSlots / 4)) * 4 + k);
          gens[k] = next_gen++;
          Pattern(&wbuf[std::size_t(k) * kBlock], kBlock, gens[k] * 131 + slot_ids[k]);
          if (!SendHeader(fd, std::uint16_t(Cmd::kWrite), id + k, std::uint64_t(slot_ids[k]) * kBlock, kBlock) ||
              !SendAll(fd, &wbuf[std::size_t(k) * kBlock], kBlock)) {
            fail.Add("good client: send failed");
            bad = true;
            break;
          }
        }
        if (bad) break;
        for (int k = 0; k < 4; ++k) {
          std::uint8_t hb[kHeaderSize];
          Header h;
          if (!RecvAll(fd, hb, sizeof hb) || !DecodeHeader(hb, &h).ok() || h.status != 0 || h.id < id ||
              h.id >= id + 4) {
            fail.Add("good client: bad WRITE reply");
            bad = true;
            break;
          }
        }
        if (bad) break;
        for (int k = 0; k < 4; ++k) gen[slot_ids[k]] = gens[k];
        id += 4;
        for (int k = 0; k < 4 && !bad; ++k) {
          const int s = int(rng() % kSlots);
          std::uint8_t hb[kHeaderSize];
          Header h;
          if (!SendHeader(fd, std::uint16_t(Cmd::kRead), id, std::uint64_t(s) * kBlock, kBlock) ||
              !RecvAll(fd, hb, sizeof hb) || !DecodeHeader(hb, &h).ok() || h.status != 0 || h.id != id ||
              h.length != kBlock || !RecvAll(fd, rbuf.data(), kBlock)) {
            fail.Add("good client: bad READ reply");
            bad = true;
            break;
          }
          ++id;
          if (gen[s]) {
            Pattern(wbuf.data(), kBlock, gen[s] * 131 + s);
            if (std::memcmp(wbuf.data(), rbuf.data(), kBlock) != 0) {
              fail.Add("good client: data mismatch in slot " + std::to_string(s));
              bad = true;
            }
          }
          good_ops += 2;
        }
      }
      if (bad) stop = true;
      // Final pass: every slot holds its last generation.
      for (int s = 0; s < kSlots && fail.empty(); ++s) {
        std::uint8_t hb[kHeaderSize];
        Header h;
        if (!SendHeader(fd, std::uint16_t(Cmd::kRead), ++id, std::uint64_t(s) * kBlock, kBlock) ||
            !RecvAll(fd, hb, sizeof hb) || !DecodeHeader(hb, &h).ok() || h.status != 0 ||
            !RecvAll(fd, rbuf.data(), kBlock)) {
          fail.Add("good client: final read failed");
          break;
        }
        if (gen[s]) {
          Pattern(wbuf.data(), kBlock, gen[s] * 131 + s);
          if (std::memcmp(wbuf.data(), rbuf.data(), kBlock) != 0) fail.Add("final data mismatch");
        }
      }
      ::close(fd);
    });

    // ---- garbage producers ----
    auto random_bytes = [&](unsigned seed) {
      std::mt19937 rng(seed);
      std::vector<char> junk(8192);
      while (!stop) {
        int fd = ConnectLoopback(port, 1);
        if (fd < 0) continue;
        ++garbage_conns;
        if (rng() % 2 && Hello(fd, "disk") != 0) {
          ::close(fd);
          continue;
        }
        for (auto& c : junk) c = char(rng());
        if (rng() % 3 == 0) std::memcpy(junk.data(), "DST1", 4);  // plausible magic, junk after it
        SendAll(fd, junk.data(), 1 + rng() % junk.size());
        if (rng() % 2) {  // sometimes wait for the server's verdict
          pollfd p{fd, POLLIN, 0};
          ::poll(&p, 1, 50);
        }
        ::close(fd);
      }
    };
    auto nasty_frames = [&](unsigned seed) {
      std::mt19937 rng(seed);
      std::vector<char> part(kBlock);
      while (!stop) {
        int fd = ConnectLoopback(port, 1);
        if (fd < 0) continue;
        ++garbage_conns;
        const bool hello = rng() % 4 != 0;
        if (hello && Hello(fd, "disk", rng() % 2 ? 0 : 0x900d0000 + rng() % 4) != 0) {
          ::close(fd);
          continue;
        }
        switch (rng() % 8) {
          case 0:  // truncated header
            SendHeader(fd, std::uint16_t(Cmd::kRead), 1, 0, 4096);
            ::shutdown(fd, SHUT_WR);
            break;
          case 1: {  // header then 20 bytes of the next one
            std::uint8_t b[kHeaderSize];
            Header h;
            h.cmd = std::uint16_t(Cmd::kRead);
            h.length = 512;
            EncodeHeader(h, b);
            SendAll(fd, b, 20);
            break;
          }
          case 2:  // length above the protocol cap
            SendHeader(fd, std::uint16_t(Cmd::kWrite), 2, 0, 0xffffffffu);
            break;
          case 3:  // WRITE above max payload with a truncated payload
            SendHeader(fd, std::uint16_t(Cmd::kWrite), 3, 0, 16u << 20);
            SendAll(fd, part.data(), part.size());
            break;
          case 4:  // a WRITE far past the end (the payload is drained), then one cut short
            SendHeader(fd, std::uint16_t(Cmd::kWrite), 4, 1ull << 40, kBlock);
            SendAll(fd, part.data(), kBlock);
            SendHeader(fd, std::uint16_t(Cmd::kWrite), 5, 0, kBlock);
            SendAll(fd, part.data(), 1000);  // never completed: must not land on slot 0
            break;
          case 5:  // unknown commands, reply bit, status set
            SendHeader(fd, std::uint16_t(rng() % 2 ? 9 : 0x8003), 6, 0, 0);
            break;
          case 6: {  // a burst of READs it never reads the answers of
            for (int i = 0; i < 64; ++i) SendHeader(fd, std::uint16_t(Cmd::kRead), 7 + i, 0, kBlock);
            break;
          }
          default:  // misaligned and overflowing ranges
            SendHeader(fd, std::uint16_t(Cmd::kRead), 8, 100, 512);
            SendHeader(fd, std::uint16_t(Cmd::kRead), 9, ~0ull - 511, 1024);
            SendHeader(fd, std::uint16_t(Cmd::kTrim), 10, 1ull << 50, 4096);
            break;
        }
        if (rng() % 2) std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 20));
        ::close(fd);
      }
    };
    auto half_open = [&] {
      std::vector<int> held;
      std::mt19937 rng(7);
      while (!stop) {
        int fd = ConnectLoopback(port, 1);
        if (fd >= 0) {
          ++garbage_conns;
          if (rng() % 3 == 0) {
            Hello(fd, "disk");
            SendHeader(fd, std::uint16_t(Cmd::kWrite), 1, 0, kBlock);  // payload never comes
          } else if (rng() % 3 == 1) {
            ::send(fd, "DST1\0\2", 6, MSG_NOSIGNAL);  // half a header, then silence
          }
          held.push_back(fd);
        }
        if (held.size() > 40) {
          ::close(held.front());
          held.erase(held.begin());
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      for (int fd : held) ::close(fd);
    };

    std::vector<std::thread> bad;
    bad.emplace_back(random_bytes, 11);
    bad.emplace_back(random_bytes, 12);
    bad.emplace_back(nasty_frames, 21);
    bad.emplace_back(nasty_frames, 22);
    bad.emplace_back(half_open);

    std::this_thread::sleep_for(std::chrono::seconds(8));
    stop = true;
    for (auto& t : bad) t.join();
    good.join();

    {
      std::lock_guard<std::mutex> l(fail.mu);
      for (auto& m : fail.msgs) qWarning("%s", m.c_str());
    }
    qInfo("good client: %llu verified ops; %llu garbage connections",
          (unsigned long long)good_ops.load(), (unsigned long long)garbage_conns.load());
    QVERIFY(fail.empty());
    QVERIFY(good_ops.load() > 100);
    QVERIFY(garbage_conns.load() > 50);
    QVERIFY2(d.Running(), d.Log().constData());

    // A fresh client still gets served after the storm.
    int fd = ConnectLoopback(port);
    QVERIFY(fd >= 0);
    QCOMPARE(Hello(fd, "disk"), 0L);
    QVERIFY(SendHeader(fd, std::uint16_t(Cmd::kPing), 1, 0, 0));
    std::uint8_t hb[kHeaderSize];
    Header h;
    QVERIFY(RecvAll(fd, hb, sizeof hb) && DecodeHeader(hb, &h).ok() && h.status == 0);
    ::close(fd);
    QCOMPARE(d.Terminate(), 0);
  }
};

DST_TEST_MAIN(GarbageTest)
#include "garbage_test.moc"
