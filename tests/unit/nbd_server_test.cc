// Unit tests for NbdServer: an in-process server on 127.0.0.1 (port 0) over FileDevices on temp
// files, driven by a raw-socket NBD client so every byte of the handshake and of transmission is
// under test control.  Covers every option path, every command, malformed input, isolation of a
// healthy client, Drain(), and heap allocations per I/O in steady state.
#include <arpa/inet.h>
#include <execinfo.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <QTemporaryDir>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <future>
#include <map>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <openssl/ssl.h>

#include "dst/file_device.h"
#include "dst/net/nbd_server.h"
#include "dst/net/tls.h"
#include "fake_identity.h"
#include "slow_reader.h"
#include "test_env.h"

// ---- allocation counter (same technique as exporter_test) ------------------------------------
namespace {
std::atomic<bool> g_count_allocs{false};
std::atomic<std::uint64_t> g_allocs{0};
bool g_trace = std::getenv("DST_ALLOC_TRACE") != nullptr;

void* CountedAlloc(std::size_t n, std::size_t align) {
  if (g_count_allocs.load(std::memory_order_relaxed)) {
    g_allocs.fetch_add(1, std::memory_order_relaxed);
    if (g_trace) {
      void* frames[24];
      int k = backtrace(frames, 24);
      backtrace_symbols_fd(frames, k, 2);
      (void)!write(2, "----\n", 5);
    }
  }
  if (n == 0) n = 1;
  void* p = align > alignof(std::max_align_t) ? std::aligned_alloc(align, (n + align - 1) / align * align)
                                                : std::malloc(n);
  if (!p) throw std::bad_alloc();
  return p;
}
}  // namespace

void* operator new(std::size_t n) { return CountedAlloc(n, 0); }
void* operator new[](std::size_t n) { return CountedAlloc(n, 0); }
void* operator new(std::size_t n, std::align_val_t a) { return CountedAlloc(n, std::size_t(a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return CountedAlloc(n, std::size_t(a)); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

using namespace dst;
using namespace dst::net;
using namespace dst::net::nbd;

namespace {

constexpr std::uint64_t kDiskSize = 8u << 20;
constexpr std::uint32_t kMaxPayload = 1u << 20;

// A blocking raw-socket NBD client.  No allocation in Send/Recv on preallocated buffers.  After
// StartTls() every byte goes through a blocking OpenSSL client session.
class Raw {
 public:
  ~Raw() { Close(); }
  // Sends STARTTLS; on its ACK runs the TLS handshake with `ctx` (a client TlsContext).  False
  // when the server refused or the handshake failed.
  bool StartTls(const std::shared_ptr<TlsContext>& ctx, bool pipeline_go = false) {
    std::string msg;
    std::uint8_t h[kOptionHeaderSize];
    Put64(h, kOptMagic);
    Put32(h + 8, kOptStartTls);
    Put32(h + 12, 0);
    msg.assign(reinterpret_cast<char*>(h), sizeof h);
    if (pipeline_go) {  // plain text behind STARTTLS (what a man in the middle would inject)
      Put32(h + 8, kOptGo);
      const std::string d = InfoData("disk", {});
      Put32(h + 12, static_cast<std::uint32_t>(d.size()));
      msg.append(reinterpret_cast<char*>(h), sizeof h);
      msg += d;
    }
    if (!SendAll(msg.data(), msg.size())) return false;
    auto r = RecvUntilFinal();
    if (r.size() != 1 || r[0].type != kRepAck) return false;
    ssl_ = SSL_new(static_cast<SSL_CTX*>(ctx->native()));
    tls_ctx_ = ctx;
    SSL_set_fd(ssl_, fd_);
    return SSL_connect(ssl_) == 1;
  }
  bool tls() const { return ssl_ != nullptr; }
  // The local address to bind before connecting (127.0.0.x: a fake identity, fake_identity.h).
  void set_from(const char* from) { from_ = from; }
  bool Connect(std::uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    if (from_) {
      sockaddr_in src{};
      src.sin_family = AF_INET;
      ::inet_pton(AF_INET, from_, &src.sin_addr);
      if (::bind(fd_, reinterpret_cast<sockaddr*>(&src), sizeof src) != 0) return false;
    }
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return false;
    int one = 1;
    ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return true;
  }
  void Close() {
    if (ssl_) SSL_free(ssl_);
    ssl_ = nullptr;
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  bool SendAll(const void* p, std::size_t n) {
    auto* c = static_cast<const char*>(p);
    while (n) {
      ssize_t w = ssl_ ? SSL_write(ssl_, c, static_cast<int>(n)) : ::send(fd_, c, n, MSG_NOSIGNAL);
      if (w <= 0) return false;
      c += w;
      n -= static_cast<std::size_t>(w);
    }
    return true;
  }
  bool RecvAll(void* p, std::size_t n, int timeout_ms = 5000) {
    auto* c = static_cast<char*>(p);
    while (n) {
      pollfd pf{fd_, POLLIN, 0};
      if (!(ssl_ && SSL_has_pending(ssl_)) && ::poll(&pf, 1, timeout_ms) <= 0) return false;
      ssize_t r = ssl_ ? SSL_read(ssl_, c, static_cast<int>(n)) : ::recv(fd_, c, n, 0);
      if (r <= 0) return false;
      c += r;
      n -= static_cast<std::size_t>(r);
    }
    return true;
  }
  // True when the server closes the connection within `ms` (unread data is skipped).
  bool ClosedWithin(int ms) {
    char buf[4096];
    auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
    while (std::chrono::steady_clock::now() < end) {
      pollfd pf{fd_, POLLIN, 0};
      if (!(ssl_ && SSL_has_pending(ssl_)) && ::poll(&pf, 1, 50) <= 0) continue;
      ssize_t r = ssl_ ? SSL_read(ssl_, buf, sizeof buf) : ::recv(fd_, buf, sizeof buf, 0);
      if (r <= 0) return true;
    }
    return false;
  }

  // ---- handshake ----
  bool Greeting(std::uint32_t client_flags = kClientFlagFixedNewstyle | kClientFlagNoZeroes) {
    std::uint8_t g[kGreetingSize];
    if (!RecvAll(g, sizeof g)) return false;
    if (Get64(g) != kNbdMagic || Get64(g + 8) != kOptMagic) return false;
    hflags_ = Get16(g + 16);
    std::uint8_t f[4];
    Put32(f, client_flags);
    return SendAll(f, 4);
  }
  bool SendOption(std::uint32_t opt, const std::string& data) { return SendOptionRaw(opt, data, data.size()); }
  bool SendOptionRaw(std::uint32_t opt, const std::string& data, std::uint32_t claimed_len) {
    std::uint8_t h[kOptionHeaderSize];
    Put64(h, kOptMagic);
    Put32(h + 8, opt);
    Put32(h + 12, claimed_len);
    return SendAll(h, sizeof h) && SendAll(data.data(), data.size());
  }
  struct OptReply {
    std::uint32_t option = 0, type = 0;
    std::string data;
  };
  bool RecvOptReply(OptReply* r) {
    std::uint8_t h[kOptionReplyHeaderSize];
    if (!RecvAll(h, sizeof h) || Get64(h) != kOptReplyMagic) return false;
    r->option = Get32(h + 8);
    r->type = Get32(h + 12);
    r->data.resize(Get32(h + 16));
    return RecvAll(r->data.data(), r->data.size());
  }
  // Reads replies until a final one (ACK or an error); returns them all.
  std::vector<OptReply> RecvUntilFinal() {
    std::vector<OptReply> out;
    for (int i = 0; i < 64; ++i) {
      OptReply r;
      if (!RecvOptReply(&r)) break;
      out.push_back(r);
      if (r.type == kRepAck || (r.type & kRepErrBit)) break;
    }
    return out;
  }
  static std::string InfoData(const std::string& name, std::vector<std::uint16_t> infos) {
    std::string d(4 + name.size() + 2 + 2 * infos.size(), '\0');
    auto* p = reinterpret_cast<std::uint8_t*>(d.data());
    Put32(p, static_cast<std::uint32_t>(name.size()));
    std::memcpy(p + 4, name.data(), name.size());
    Put16(p + 4 + name.size(), static_cast<std::uint16_t>(infos.size()));
    for (std::size_t i = 0; i < infos.size(); ++i) Put16(p + 6 + name.size() + 2 * i, infos[i]);
    return d;
  }
  static std::string MetaData(const std::string& name, const std::vector<std::string>& qs) {
    std::string d;
    auto put32 = [&](std::uint32_t v) {
      std::uint8_t b[4];
      Put32(b, v);
      d.append(reinterpret_cast<char*>(b), 4);
    };
    put32(static_cast<std::uint32_t>(name.size()));
    d += name;
    put32(static_cast<std::uint32_t>(qs.size()));
    for (auto& q : qs) {
      put32(static_cast<std::uint32_t>(q.size()));
      d += q;
    }
    return d;
  }
  // Full negotiation: optional structured replies and meta contexts, then GO.
  bool Open(std::uint16_t port, const std::string& name, bool structured = false,
            const std::vector<std::string>& contexts = {}, const std::shared_ptr<TlsContext>& tls = nullptr) {
    if (!Connect(port) || !Greeting()) return false;
    if (tls && !StartTls(tls)) return false;
    if (structured) {
      if (!SendOption(kOptStructuredReply, "")) return false;
      auto r = RecvUntilFinal();
      if (r.empty() || r.back().type != kRepAck) return false;
      structured_ = true;
    }
    if (!contexts.empty()) {
      if (!SendOption(kOptSetMetaContext, MetaData(name, contexts))) return false;
      auto r = RecvUntilFinal();
      if (r.empty() || r.back().type != kRepAck) return false;
      for (auto& x : r)
        if (x.type == kRepMetaContext)
          ctx_ids_[x.data.substr(4)] = Get32(reinterpret_cast<const std::uint8_t*>(x.data.data()));
    }
    if (!SendOption(kOptGo, InfoData(name, {kInfoBlockSize}))) return false;
    auto r = RecvUntilFinal();
    if (r.empty() || r.back().type != kRepAck) return false;
    for (auto& x : r) {
      auto* p = reinterpret_cast<const std::uint8_t*>(x.data.data());
      if (x.type == kRepInfo && Get16(p) == kInfoExport) {
        size_ = Get64(p + 2);
        tx_flags_ = Get16(p + 10);
      }
    }
    return true;
  }

  // ---- transmission ----
  bool Send(std::uint16_t type, std::uint64_t cookie, std::uint64_t off, std::uint32_t len,
            const void* data = nullptr, std::uint16_t flags = 0) {
    Request r;
    r.type = type;
    r.flags = flags;
    r.cookie = cookie;
    r.offset = off;
    r.length = len;
    std::uint8_t b[kRequestSize];
    EncodeRequest(r, b);
    if (!SendAll(b, sizeof b)) return false;
    return !data || SendAll(data, len);
  }
  // Simple reply; `data` (len bytes) is read when error == 0 and data != nullptr.
  bool RecvSimple(std::uint32_t* error, std::uint64_t* cookie, void* data = nullptr, std::uint32_t len = 0) {
    std::uint8_t h[kSimpleReplySize];
    if (!RecvAll(h, sizeof h) || Get32(h) != kSimpleReplyMagic) return false;
    *error = Get32(h + 4);
    *cookie = Get64(h + 8);
    if (*error == 0 && data) return RecvAll(data, len);
    return true;
  }
  struct Chunk {
    std::uint16_t flags = 0, type = 0;
    std::uint64_t cookie = 0;
    std::string payload;
  };
  bool RecvChunk(Chunk* c) {
    std::uint8_t h[kChunkHeaderSize];
    if (!RecvAll(h, sizeof h) || Get32(h) != kStructuredReplyMagic) return false;
    c->flags = Get16(h + 4);
    c->type = Get16(h + 6);
    c->cookie = Get64(h + 8);
    c->payload.resize(Get32(h + 16));
    return RecvAll(c->payload.data(), c->payload.size());
  }
  std::vector<Chunk> RecvChunks() {
    std::vector<Chunk> out;
    for (int i = 0; i < 64; ++i) {
      Chunk c;
      if (!RecvChunk(&c)) return {};
      out.push_back(c);
      if (c.flags & kReplyFlagDone) break;
    }
    return out;
  }

  int fd() const { return fd_; }

  int fd_ = -1;
  SSL* ssl_ = nullptr;
  std::shared_ptr<TlsContext> tls_ctx_;  // outlives ssl_
  std::uint16_t hflags_ = 0;
  bool structured_ = false;
  std::uint64_t size_ = 0;
  std::uint16_t tx_flags_ = 0;
  const char* from_ = nullptr;
  std::map<std::string, std::uint32_t> ctx_ids_;
};

// A test metadata context: "dst:test" marks every second MiB with flag 1.
class StripesContext : public MetaContextProvider {
 public:
  std::string name() const override { return "dst:test"; }
  Status Query(std::uint64_t offset, std::uint64_t length, ExtentSink& sink) override {
    std::uint64_t pos = offset;
    const std::uint64_t end = offset + length;
    while (pos < end) {
      const std::uint64_t mib = pos >> 20;
      const std::uint64_t next = std::min<std::uint64_t>((mib + 1) << 20, end);
      if (!sink.Add(next - pos, mib % 2)) break;
      pos = next;
    }
    return Status::OK();
  }
};

struct Server {
  boost::asio::io_context io;
  std::unique_ptr<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work;
  std::vector<std::thread> threads;
  std::unique_ptr<NbdServer> srv;
  bool Start(NbdServerOptions o, int nthreads) {
    o.port = 0;
    srv = std::make_unique<NbdServer>(io, o);
    if (!srv->Start().ok()) return false;
    work = std::make_unique<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>>(
        io.get_executor());
    for (int i = 0; i < nthreads; ++i) threads.emplace_back([this] { io.run(); });
    return true;
  }
  ~Server() {
    srv.reset();
    // Let the closing connections finish before the loop stops.
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    work.reset();
    io.stop();
    for (auto& t : threads) t.join();
  }
};

// Heap allocations during run(n, 1) and run(n, 8), after run(warm, 1) and run(warm, 8).
template <typename Run>
std::uint64_t AllocsDuring(Run& run, int warm, int n) {
  run(warm, 1);
  run(warm, 8);
  g_allocs = 0;
  g_count_allocs = true;
  run(n, 1);
  run(n, 8);
  g_count_allocs = false;
  return g_allocs.load();
}

bool WriteFileAt(const std::string& path, std::uint64_t off, const std::string& data) {
  int fd = ::open(path.c_str(), O_RDWR);
  if (fd < 0) return false;
  bool ok = ::pwrite(fd, data.data(), data.size(), static_cast<off_t>(off)) == ssize_t(data.size());
  ::fsync(fd);
  ::close(fd);
  return ok;
}

std::string ReadFileAt(const std::string& path, std::uint64_t off, std::size_t n) {
  std::string s(n, '\0');
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return {};
  ssize_t r = ::pread(fd, s.data(), n, static_cast<off_t>(off));
  ::close(fd);
  if (r != ssize_t(n)) return {};
  return s;
}

}  // namespace

class NbdServerTest : public QObject {
  Q_OBJECT

  QTemporaryDir dir_;
  std::string disk_path_, sparse_path_, ro_path_;
  std::shared_ptr<FileDevice> disk_, sparse_, ro_;
  std::unique_ptr<Server> srv_;
  std::uint16_t port_ = 0;
  // STARTTLS: the server's PSK file (identity alice), and client contexts with the right key,
  // alice with another key, and an identity the server does not know.
  std::shared_ptr<TlsContext> tls_server_, tls_alice_, tls_wrong_key_, tls_unknown_;

  static std::shared_ptr<TlsContext> Tls(bool server, const std::string& psk_file) {
    TlsConfig c;
    c.server = server;
    c.psk_file = psk_file;
    auto r = TlsContext::Create(c);
    return r.ok() ? r.value() : nullptr;
  }
  // A server with STARTTLS in `mode` serving "disk".
  std::unique_ptr<Server> TlsServer(NbdTls mode, NbdServerOptions o = {}) {
    auto s = std::make_unique<Server>();
    o.max_payload = kMaxPayload;
    o.buffer_count = 16;
    o.tls = tls_server_;
    o.tls_mode = mode;
    if (!s->Start(o, 1)) return nullptr;
    NbdExportSpec d;
    d.name = "disk";
    d.device = disk_;
    if (!s->srv->AddExport(d).ok()) return nullptr;
    return s;
  }

  static std::shared_ptr<FileDevice> MakeFile(const std::string& path, bool ro = false) {
    FileDeviceOptions o;
    o.create = true;
    o.size = kDiskSize;
    o.read_only = false;
    auto d = FileDevice::Open(path, o);
    if (!d.ok() || !ro) return d.ok() ? d.value() : nullptr;
    FileDeviceOptions r;
    r.read_only = true;
    auto x = FileDevice::Open(path, r);
    return x.ok() ? x.value() : nullptr;
  }

 private slots:
  void initTestCase() {
    QVERIFY(dir_.isValid());
    disk_path_ = dir_.filePath("disk.img").toStdString();
    sparse_path_ = dir_.filePath("sparse.img").toStdString();
    ro_path_ = dir_.filePath("ro.img").toStdString();
    disk_ = MakeFile(disk_path_);
    sparse_ = MakeFile(sparse_path_);
    ro_ = MakeFile(ro_path_, true);
    QVERIFY(disk_ && sparse_ && ro_);
    // sparse.img: data only in [1 MiB, 1 MiB + 128 KiB) and [3 MiB, 3 MiB + 4 KiB).
    QVERIFY(WriteFileAt(sparse_path_, 1u << 20, std::string(128u << 10, 'D')));
    QVERIFY(WriteFileAt(sparse_path_, 3u << 20, std::string(4096, 'E')));

    srv_ = std::make_unique<Server>();
    NbdServerOptions o;
    o.max_payload = kMaxPayload;
    o.buffer_count = 16;
    QVERIFY(srv_->Start(o, 2));
    port_ = srv_->srv->port();
    NbdExportSpec d;
    d.name = "disk";
    d.description = "the test disk";
    d.device = disk_;
    d.allocation = FileAllocationMap::Open(disk_path_).value();
    d.fast_zero = FileSupportsFastZero(disk_path_);
    QVERIFY(srv_->srv->AddExport(d).ok());
    NbdExportSpec s;
    s.name = "sparse";
    s.device = sparse_;
    s.allocation = FileAllocationMap::Open(sparse_path_).value();
    s.contexts.push_back(std::make_shared<StripesContext>());
    QVERIFY(srv_->srv->AddExport(s).ok());
    NbdExportSpec r;
    r.name = "ro";
    r.device = ro_;
    r.read_only = true;
    QVERIFY(srv_->srv->AddExport(r).ok());
    QCOMPARE(srv_->srv->AddExport(r).code(), Status::Code::kExists);
    NbdExportSpec bad;
    bad.name = "";
    bad.device = ro_;
    QVERIFY(!srv_->srv->AddExport(bad).ok());

    // As dstd does (daemon/src/main.cc): OpenSSL writes to sockets with write(), so a close_notify
    // to a client that has gone raises SIGPIPE.
    ::signal(SIGPIPE, SIG_IGN);
    const std::string psk = dir_.filePath("server.psk").toStdString();
    const std::string wrong = dir_.filePath("wrong.psk").toStdString();
    const std::string unknown = dir_.filePath("unknown.psk").toStdString();
    QVERIFY(GeneratePskFile(psk, "alice", false).ok());
    QVERIFY(GeneratePskFile(wrong, "alice", false).ok());
    QVERIFY(GeneratePskFile(unknown, "mallory", false).ok());
    tls_server_ = Tls(true, psk);
    tls_alice_ = Tls(false, psk);
    tls_wrong_key_ = Tls(false, wrong);
    tls_unknown_ = Tls(false, unknown);
    QVERIFY(tls_server_ && tls_alice_ && tls_wrong_key_ && tls_unknown_);
  }

  void cleanupTestCase() { srv_.reset(); }

  // ---- handshake ----
  void greetingAndBadClientFlags() {
    Raw c;
    QVERIFY(c.Connect(port_));
    QVERIFY(c.Greeting(0x80));  // unknown client flag: the server must drop us
    QCOMPARE(c.hflags_, std::uint16_t(kFlagFixedNewstyle | kFlagNoZeroes));
    QVERIFY(c.ClosedWithin(3000));
  }

  void badOptionMagic() {
    Raw c;
    QVERIFY(c.Connect(port_) && c.Greeting());
    std::uint8_t h[kOptionHeaderSize] = {};
    std::memcpy(h, "IHAVEOPZ", 8);
    QVERIFY(c.SendAll(h, sizeof h));
    QVERIFY(c.ClosedWithin(3000));
  }

  void listExports() {
    Raw c;
    QVERIFY(c.Connect(port_) && c.Greeting());
    QVERIFY(c.SendOption(kOptList, ""));
    auto r = c.RecvUntilFinal();
    QCOMPARE(int(r.size()), 4);
    std::map<std::string, std::string> seen;
    for (int i = 0; i < 3; ++i) {
      QCOMPARE(r[i].type, kRepServer);
      QCOMPARE(r[i].option, kOptList);
      const std::uint32_t n = Get32(reinterpret_cast<const std::uint8_t*>(r[i].data.data()));
      seen[r[i].data.substr(4, n)] = r[i].data.substr(4 + n);
    }
    QCOMPARE(r[3].type, kRepAck);
    QCOMPARE(seen.size(), std::size_t(3));
    QCOMPARE(seen["disk"], std::string("the test disk"));
    // LIST with data is invalid, and the session goes on.
    QVERIFY(c.SendOption(kOptList, "x"));
    r = c.RecvUntilFinal();
    QCOMPARE(r.back().type, kRepErrInvalid);
    QVERIFY(c.SendOption(kOptAbort, ""));
    r = c.RecvUntilFinal();
    QCOMPARE(r.back().type, kRepAck);
    QVERIFY(c.ClosedWithin(3000));
  }

  void infoThenGo() {
    Raw c;
    QVERIFY(c.Connect(port_) && c.Greeting());
    QVERIFY(c.SendOption(kOptInfo, Raw::InfoData("disk", {kInfoName, kInfoDescription, kInfoBlockSize, 77})));
    auto r = c.RecvUntilFinal();
    std::map<std::uint16_t, std::string> infos;
    for (auto& x : r)
      if (x.type == kRepInfo) infos[Get16(reinterpret_cast<const std::uint8_t*>(x.data.data()))] = x.data.substr(2);
    QCOMPARE(r.back().type, kRepAck);
    QCOMPARE(infos.size(), std::size_t(4));
    auto* e = reinterpret_cast<const std::uint8_t*>(infos[kInfoExport].data());
    QCOMPARE(Get64(e), kDiskSize);
    const std::uint16_t f = Get16(e + 8);
    QVERIFY(f & kTxHasFlags);
    QVERIFY(f & kTxSendFlush && f & kTxSendFua && f & kTxSendTrim && f & kTxSendWriteZeroes);
    QVERIFY(f & kTxSendFastZero && f & kTxSendCache && f & kTxCanMultiConn);
    QVERIFY(!(f & kTxReadOnly));
    QVERIFY(!(f & kTxSendDf));  // no structured replies negotiated
    QCOMPARE(infos[kInfoName], std::string("disk"));
    QCOMPARE(infos[kInfoDescription], std::string("the test disk"));
    auto* b = reinterpret_cast<const std::uint8_t*>(infos[kInfoBlockSize].data());
    QCOMPARE(Get32(b), 512u);
    QCOMPARE(Get32(b + 4), 4096u);
    QCOMPARE(Get32(b + 8), kMaxPayload);
    // Unknown export: ERR_UNKNOWN, keep negotiating.
    QVERIFY(c.SendOption(kOptGo, Raw::InfoData("nosuch", {})));
    r = c.RecvUntilFinal();
    QCOMPARE(r.size(), std::size_t(1));
    QCOMPARE(r.back().type, kRepErrUnknown);
    // Malformed INFO data: ERR_INVALID.
    QVERIFY(c.SendOption(kOptInfo, std::string("\0\0\0\x09" "ab", 6)));
    r = c.RecvUntilFinal();
    QCOMPARE(r.back().type, kRepErrInvalid);
    // Read-only export flags.
    QVERIFY(c.SendOption(kOptInfo, Raw::InfoData("ro", {})));
    r = c.RecvUntilFinal();
    auto* ro = reinterpret_cast<const std::uint8_t*>(r.front().data.data());
    const std::uint16_t rf = Get16(ro + 10);
    QVERIFY(rf & kTxReadOnly);
    QVERIFY(!(rf & kTxSendTrim) && !(rf & kTxSendWriteZeroes));
    // GO on the default export ("" = the first export added).
    QVERIFY(c.SendOption(kOptGo, Raw::InfoData("", {kInfoName})));
    r = c.RecvUntilFinal();
    QCOMPARE(r.back().type, kRepAck);
    bool named = false;
    for (auto& x : r)
      if (x.type == kRepInfo && Get16(reinterpret_cast<const std::uint8_t*>(x.data.data())) == kInfoName)
        named = x.data.substr(2) == "disk";
    QVERIFY(named);
    std::uint32_t err;
    std::uint64_t cookie;
    QVERIFY(c.Send(kCmdFlush, 5, 0, 0));
    QVERIFY(c.RecvSimple(&err, &cookie));
    QCOMPARE(err, 0u);
    QCOMPARE(cookie, 5ull);
  }

  void unknownOptionsAndStartTls() {
    Raw c;
    QVERIFY(c.Connect(port_) && c.Greeting());
    for (std::uint32_t opt : {42u, kOptStartTls, kOptPeekExport, kOptExtendedHeaders, 0xdeadbeefu}) {
      QVERIFY(c.SendOption(opt, opt == 42 ? std::string("payload") : std::string()));
      auto r = c.RecvUntilFinal();
      QCOMPARE(r.size(), std::size_t(1));
      QCOMPARE(r[0].type, kRepErrUnsup);
      QCOMPARE(r[0].option, opt);
    }
    // Still negotiating normally.
    QVERIFY(c.SendOption(kOptGo, Raw::InfoData("disk", {})));
    QCOMPARE(c.RecvUntilFinal().back().type, kRepAck);
  }

  // ---- STARTTLS ----
  // Require mode (FORCEDTLS): nothing but STARTTLS and ABORT is answered before TLS; LIST
  // reveals no export; EXPORT_NAME closes.
  void tlsRequiredRefusesPlainText() {
    auto s = TlsServer(NbdTls::kRequire);
    QVERIFY(s);
    Raw c;
    QVERIFY(c.Connect(s->srv->port()) && c.Greeting());
    const std::vector<std::pair<std::uint32_t, std::string>> opts = {
        {kOptList, ""},
        {kOptInfo, Raw::InfoData("disk", {kInfoName})},
        {kOptGo, Raw::InfoData("disk", {})},
        {kOptStructuredReply, ""},
        {kOptListMetaContext, Raw::MetaData("disk", {})},
        {42, "payload"}};
    for (const auto& [opt, data] : opts) {
      QVERIFY(c.SendOption(opt, data));
      auto r = c.RecvUntilFinal();
      QCOMPARE(r.size(), std::size_t(1));  // no SERVER / INFO / META_CONTEXT before the error
      QCOMPARE(r[0].option, opt);
      QCOMPARE(r[0].type, kRepErrTlsReqd);
    }
    QVERIFY(c.SendOption(kOptStartTls, "x"));  // STARTTLS carries no data
    QCOMPARE(c.RecvUntilFinal().back().type, kRepErrInvalid);
    QVERIFY(c.SendOption(kOptAbort, ""));
    QCOMPARE(c.RecvUntilFinal().back().type, kRepAck);
    QVERIFY(c.ClosedWithin(2000));

    Raw d;  // EXPORT_NAME cannot carry an error: closed
    QVERIFY(d.Connect(s->srv->port()) && d.Greeting());
    QVERIFY(d.SendOption(kOptExportName, "disk"));
    QVERIFY(d.ClosedWithin(2000));
    QCOMPARE(s->srv->Stats().tls_handshakes, 0ull);
  }

  // After STARTTLS the rest of the handshake and transmission run inside TLS; a second STARTTLS
  // is refused; the data lands in the export.
  void tlsStartTlsThenServe() {
    auto s = TlsServer(NbdTls::kRequire);
    QVERIFY(s);
    Raw c;
    QVERIFY(c.Connect(s->srv->port()) && c.Greeting());
    QVERIFY(c.StartTls(tls_alice_));
    QVERIFY(c.SendOption(kOptStartTls, ""));
    auto again = c.RecvUntilFinal();
    QCOMPARE(again.size(), std::size_t(1));
    QCOMPARE(again[0].type, kRepErrInvalid);
    QVERIFY(c.SendOption(kOptList, ""));
    auto list = c.RecvUntilFinal();
    QCOMPARE(list.size(), std::size_t(2));
    QCOMPARE(list[0].type, kRepServer);
    QVERIFY(c.SendOption(kOptStructuredReply, ""));
    QCOMPARE(c.RecvUntilFinal().back().type, kRepAck);
    QVERIFY(c.SendOption(kOptGo, Raw::InfoData("disk", {})));
    QCOMPARE(c.RecvUntilFinal().back().type, kRepAck);

    std::string data(256u << 10, '\0');
    for (std::size_t i = 0; i < data.size(); ++i) data[i] = char(i * 7 + 3);
    std::uint32_t err = 1;
    std::uint64_t cookie = 0;
    QVERIFY(c.Send(kCmdWrite, 11, 5u << 20, std::uint32_t(data.size()), data.data(), kCmdFlagFua));
    QVERIFY(c.RecvSimple(&err, &cookie));
    QCOMPARE(err, 0u);
    QCOMPARE(cookie, 11ull);
    QVERIFY(c.Send(kCmdRead, 12, 5u << 20, std::uint32_t(data.size()), nullptr, kCmdFlagDf));
    Raw::Chunk ch;
    QVERIFY(c.RecvChunk(&ch));
    QCOMPARE(ch.type, kChunkOffsetData);
    QVERIFY(ch.payload.substr(8) == data);
    QVERIFY(ReadFileAt(disk_path_, 5u << 20, data.size()) == data);
    QCOMPARE(s->srv->Stats().tls_handshakes, 1ull);
    QVERIFY(WriteFileAt(disk_path_, 5u << 20, std::string(data.size(), '\0')));  // other tests expect zeroes
  }

  // A wrong key or an unknown identity fails the handshake and is closed; a plain-text client
  // that pipelines options behind STARTTLS (injection) fails too; a good client still works.
  void tlsBadKeysAndInjection() {
    auto s = TlsServer(NbdTls::kRequire);
    QVERIFY(s);
    for (const auto& ctx : {tls_wrong_key_, tls_unknown_}) {
      Raw c;
      QVERIFY(c.Connect(s->srv->port()) && c.Greeting());
      QVERIFY(!c.StartTls(ctx));
    }
    Raw inj;
    QVERIFY(inj.Connect(s->srv->port()) && inj.Greeting());
    QVERIFY(!inj.StartTls(tls_alice_, true));
    Raw ok;
    QVERIFY(ok.Open(s->srv->port(), "disk", false, {}, tls_alice_));
    QCOMPARE(s->srv->Stats().tls_handshakes, 1ull);
  }

  // Allow mode serves plain text too; STARTTLS forgets what was negotiated in the clear.
  void tlsAllowForgetsPlainState() {
    auto s = TlsServer(NbdTls::kAllow);
    QVERIFY(s);
    Raw plain;
    QVERIFY(plain.Open(s->srv->port(), "disk"));
    Raw c;
    QVERIFY(c.Connect(s->srv->port()) && c.Greeting());
    QVERIFY(c.SendOption(kOptStructuredReply, ""));
    QCOMPARE(c.RecvUntilFinal().back().type, kRepAck);
    QVERIFY(c.StartTls(tls_alice_));
    // Structured replies were negotiated before TLS: gone, so SET_META_CONTEXT is refused and
    // STRUCTURED_REPLY is accepted again.
    QVERIFY(c.SendOption(kOptSetMetaContext, Raw::MetaData("disk", {"base:allocation"})));
    QCOMPARE(c.RecvUntilFinal().back().type, kRepErrInvalid);
    QVERIFY(c.SendOption(kOptStructuredReply, ""));
    QCOMPARE(c.RecvUntilFinal().back().type, kRepAck);
    // Off: STARTTLS unsupported even with a context.
    auto off = TlsServer(NbdTls::kOff);
    QVERIFY(off);
    Raw o;
    QVERIFY(o.Connect(off->srv->port()) && o.Greeting());
    QVERIFY(o.SendOption(kOptStartTls, ""));
    QCOMPARE(o.RecvUntilFinal().back().type, kRepErrUnsup);
  }

  // The handshake deadline covers the TLS handshake: a client that stops after STARTTLS's ACK
  // is closed.
  void tlsHandshakeDeadline() {
    NbdServerOptions o;
    o.limits.handshake_timeout = std::chrono::milliseconds(400);
    auto s = TlsServer(NbdTls::kRequire, o);
    QVERIFY(s);
    Raw c;
    QVERIFY(c.Connect(s->srv->port()) && c.Greeting());
    QVERIFY(c.SendOption(kOptStartTls, ""));
    QCOMPARE(c.RecvUntilFinal().back().type, kRepAck);
    const auto t0 = std::chrono::steady_clock::now();
    QVERIFY(c.ClosedWithin(5000));
    QVERIFY(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(3));
  }

  // The authenticated identity is counted (max_connections_per_identity): over the cap, options
  // get NBD_REP_ERR_POLICY.
  void tlsIdentityCap() {
    NbdServerOptions o;
    o.limits.max_connections_per_identity = 1;
    auto s = TlsServer(NbdTls::kRequire, o);
    QVERIFY(s);
    Raw first;
    QVERIFY(first.Open(s->srv->port(), "disk", false, {}, tls_alice_));
    Raw second;
    QVERIFY(second.Connect(s->srv->port()) && second.Greeting() && second.StartTls(tls_alice_));
    QVERIFY(second.SendOption(kOptGo, Raw::InfoData("disk", {})));
    auto r = second.RecvUntilFinal();
    QCOMPARE(r.size(), std::size_t(1));
    QCOMPARE(r[0].type, kRepErrPolicy);
    QVERIFY(QString::fromStdString(r[0].data).contains("alice"));
    first.Close();
    second.Close();
    Raw third;  // the first one's claim is released when it leaves
    QTRY_VERIFY_WITH_TIMEOUT((third.Close(), third.Open(s->srv->port(), "disk", false, {}, tls_alice_)), 5000);
  }

  void oversizedOptions() {
    Raw c;
    QVERIFY(c.Connect(port_) && c.Greeting());
    // 100 KB of option data: drained, refused, the session continues.
    std::string big(100000, 'x');
    QVERIFY(c.SendOption(kOptGo, big));
    auto r = c.RecvUntilFinal();
    QCOMPARE(r.back().type, kRepErrTooBig);
    QVERIFY(c.SendOption(kOptGo, Raw::InfoData("disk", {})));
    QCOMPARE(c.RecvUntilFinal().back().type, kRepAck);
    // A 2 GiB claim: closed at once, nothing allocated for it.
    Raw d;
    QVERIFY(d.Connect(port_) && d.Greeting());
    QVERIFY(d.SendOptionRaw(kOptInfo, "abc", 0x7fffffffu));
    QVERIFY(d.ClosedWithin(3000));
  }

  void exportNameFallback() {
    {
      Raw c;  // NO_ZEROES: 10 bytes
      QVERIFY(c.Connect(port_) && c.Greeting());
      QVERIFY(c.SendOption(kOptExportName, "disk"));
      std::uint8_t b[10];
      QVERIFY(c.RecvAll(b, sizeof b));
      QCOMPARE(Get64(b), kDiskSize);
      QVERIFY(Get16(b + 8) & kTxHasFlags);
      QVERIFY(!(Get16(b + 8) & kTxSendDf));
      std::uint32_t err;
      std::uint64_t cookie;
      char buf[4096];
      QVERIFY(c.Send(kCmdRead, 9, 0, 4096));
      QVERIFY(c.RecvSimple(&err, &cookie, buf, 4096));  // the next bytes are the reply: no padding
      QCOMPARE(err, 0u);
      QCOMPARE(cookie, 9ull);
    }
    {
      Raw c;  // old client: fixed newstyle without NO_ZEROES gets 124 zero bytes; "" is the default
      QVERIFY(c.Connect(port_) && c.Greeting(kClientFlagFixedNewstyle));
      QVERIFY(c.SendOption(kOptExportName, ""));
      std::uint8_t b[10 + 124];
      QVERIFY(c.RecvAll(b, sizeof b));
      QCOMPARE(Get64(b), kDiskSize);
      for (int i = 10; i < 134; ++i) QCOMPARE(int(b[i]), 0);
      QVERIFY(c.Send(kCmdFlush, 1, 0, 0));
      std::uint32_t err;
      std::uint64_t cookie;
      QVERIFY(c.RecvSimple(&err, &cookie));
      QCOMPARE(err, 0u);
    }
    {
      Raw c;  // unknown name: EXPORT_NAME cannot report errors, the server closes
      QVERIFY(c.Connect(port_) && c.Greeting());
      QVERIFY(c.SendOption(kOptExportName, "nosuch"));
      QVERIFY(c.ClosedWithin(3000));
    }
    {
      Raw c;  // non-fixed newstyle client sending another option: closed (it could not parse replies)
      QVERIFY(c.Connect(port_) && c.Greeting(0));
      QVERIFY(c.SendOption(kOptList, ""));
      QVERIFY(c.ClosedWithin(3000));
    }
  }

  void structuredAndMetaContexts() {
    Raw c;
    QVERIFY(c.Connect(port_) && c.Greeting());
    // SET_META_CONTEXT before STRUCTURED_REPLY: invalid.
    QVERIFY(c.SendOption(kOptSetMetaContext, Raw::MetaData("sparse", {"base:allocation"})));
    QCOMPARE(c.RecvUntilFinal().back().type, kRepErrInvalid);
    // LIST without queries: every context of the export.
    QVERIFY(c.SendOption(kOptListMetaContext, Raw::MetaData("sparse", {})));
    auto r = c.RecvUntilFinal();
    QCOMPARE(r.back().type, kRepAck);
    std::vector<std::string> names;
    for (auto& x : r)
      if (x.type == kRepMetaContext) names.push_back(x.data.substr(4));
    QCOMPARE(names, (std::vector<std::string>{"base:allocation", "dst:test"}));
    // LIST by namespace and by a name that does not exist.
    QVERIFY(c.SendOption(kOptListMetaContext, Raw::MetaData("sparse", {"dst:", "qemu:dirty-bitmap:x"})));
    r = c.RecvUntilFinal();
    QCOMPARE(r.size(), std::size_t(2));
    QCOMPARE(r[0].data.substr(4), std::string("dst:test"));
    QCOMPARE(Get32(reinterpret_cast<const std::uint8_t*>(r[0].data.data())), 0u);  // LIST: id reserved, 0
    QVERIFY(c.SendOption(kOptListMetaContext, Raw::MetaData("nosuch", {})));
    QCOMPARE(c.RecvUntilFinal().back().type, kRepErrUnknown);
    QVERIFY(c.SendOption(kOptListMetaContext, std::string("\0\0", 2)));
    QCOMPARE(c.RecvUntilFinal().back().type, kRepErrInvalid);
    // STRUCTURED_REPLY: ACK once, then invalid.
    QVERIFY(c.SendOption(kOptStructuredReply, ""));
    QCOMPARE(c.RecvUntilFinal().back().type, kRepAck);
    QVERIFY(c.SendOption(kOptStructuredReply, ""));
    QCOMPARE(c.RecvUntilFinal().back().type, kRepErrInvalid);
    QVERIFY(c.SendOption(kOptSetMetaContext, Raw::MetaData("sparse", {"base:allocation", "dst:test", "x-y:z"})));
    r = c.RecvUntilFinal();
    QCOMPARE(r.back().type, kRepAck);
    QCOMPARE(r.size(), std::size_t(3));
    // INFO now advertises DF.
    QVERIFY(c.SendOption(kOptInfo, Raw::InfoData("sparse", {})));
    r = c.RecvUntilFinal();
    QVERIFY(Get16(reinterpret_cast<const std::uint8_t*>(r.front().data.data()) + 10) & kTxSendDf);
  }

  // ---- transmission ----
  void simpleCommands() {
    Raw c;
    QVERIFY(c.Open(port_, "disk"));
    QCOMPARE(c.size_, kDiskSize);
    std::string w(65536, '\0');
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = char(i * 7 + 3);
    std::uint32_t err;
    std::uint64_t cookie;
    QVERIFY(c.Send(kCmdWrite, 1, 1u << 20, 65536, w.data()));
    QVERIFY(c.RecvSimple(&err, &cookie));
    QCOMPARE(err, 0u);
    QCOMPARE(cookie, 1ull);
    QVERIFY(c.Send(kCmdWrite, 2, 2u << 20, 65536, w.data(), kCmdFlagFua));
    QVERIFY(c.RecvSimple(&err, &cookie));
    QCOMPARE(err, 0u);
    std::string r(65536, '\0');
    QVERIFY(c.Send(kCmdRead, 3, 1u << 20, 65536));
    QVERIFY(c.RecvSimple(&err, &cookie, r.data(), 65536));
    QCOMPARE(err, 0u);
    QVERIFY(r == w);
    QVERIFY(c.Send(kCmdFlush, 4, 0, 0));
    QVERIFY(c.RecvSimple(&err, &cookie));
    QCOMPARE(err, 0u);
    QCOMPARE(ReadFileAt(disk_path_, 2u << 20, 65536), w);
    // TRIM, WRITE_ZEROES (with and without NO_HOLE), CACHE.
    QVERIFY(c.Send(kCmdTrim, 5, 1u << 20, 4096));
    QVERIFY(c.RecvSimple(&err, &cookie));
    QCOMPARE(err, 0u);
    QVERIFY(c.Send(kCmdWriteZeroes, 6, (1u << 20) + 4096, 8192, nullptr, kCmdFlagNoHole | kCmdFlagFua));
    QVERIFY(c.RecvSimple(&err, &cookie));
    QCOMPARE(err, 0u);
    QVERIFY(c.Send(kCmdWriteZeroes, 7, (1u << 20) + 12288, 4096));
    QVERIFY(c.RecvSimple(&err, &cookie));
    QCOMPARE(err, 0u);
    QVERIFY(c.Send(kCmdCache, 8, 0, 1u << 20));
    QVERIFY(c.RecvSimple(&err, &cookie));
    QCOMPARE(err, 0u);
    QVERIFY(c.Send(kCmdRead, 9, 1u << 20, 65536));
    QVERIFY(c.RecvSimple(&err, &cookie, r.data(), 65536));
    QVERIFY(r.substr(0, 16384) == std::string(16384, '\0'));  // trimmed + zeroed
    QVERIFY(r.substr(16384) == w.substr(16384));
    // Pipelined: many requests in flight, replies matched by cookie.
    for (int i = 0; i < 32; ++i) QVERIFY(c.Send(kCmdWrite, 100 + i, std::uint64_t(i) * 4096, 4096, w.data()));
    std::map<std::uint64_t, int> got;
    for (int i = 0; i < 32; ++i) {
      QVERIFY(c.RecvSimple(&err, &cookie));
      QCOMPARE(err, 0u);
      got[cookie]++;
    }
    QCOMPARE(got.size(), std::size_t(32));
  }

  // Regression for the receive buffer: one send() carrying 128 WRITEs of odd sizes (headers and
  // payloads straddle every 64 KiB buffer boundary), then a header and payload dribbled in
  // pieces.  Every byte must land where its header says.
  void pipelinedBurstAndSplitHeaders() {
    Raw c;
    QVERIFY(c.Open(port_, "disk"));
    const std::uint64_t base = 6u << 20;
    std::string burst, expect;
    for (int i = 0; i < 128; ++i) {
      const std::uint32_t len = 512u * (1 + (i * 7) % 23);
      std::string data(len, '\0');
      for (std::uint32_t k = 0; k < len; ++k) data[k] = char(i * 31 + k * 13 + 1);
      Request r;
      r.type = kCmdWrite;
      r.cookie = 1000 + i;
      r.offset = base + expect.size();
      r.length = len;
      std::uint8_t h[kRequestSize];
      EncodeRequest(r, h);
      burst.append(reinterpret_cast<char*>(h), sizeof h);
      burst += data;
      expect += data;
    }
    QVERIFY(burst.size() > 4 * (64u << 10));  // several receive buffers' worth
    QVERIFY(c.SendAll(burst.data(), burst.size()));
    std::map<std::uint64_t, int> got;
    std::uint32_t err;
    std::uint64_t cookie;
    for (int i = 0; i < 128; ++i) {
      QVERIFY(c.RecvSimple(&err, &cookie));
      QCOMPARE(err, 0u);
      got[cookie]++;
    }
    QCOMPARE(got.size(), std::size_t(128));
    QVERIFY(ReadFileAt(disk_path_, base, expect.size()) == expect);

    Request r;
    r.type = kCmdWrite;
    r.cookie = 77;
    r.offset = base;
    r.length = 4096;
    std::uint8_t h[kRequestSize];
    EncodeRequest(r, h);
    const std::string w(4096, 'Q');
    for (auto [from, to] : {std::pair{0, 3}, {3, 17}, {17, int(kRequestSize)}}) {
      QVERIFY(c.SendAll(h + from, std::size_t(to - from)));
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    QVERIFY(c.SendAll(w.data(), 100));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    QVERIFY(c.SendAll(w.data() + 100, w.size() - 100));
    QVERIFY(c.RecvSimple(&err, &cookie));
    QCOMPARE(err, 0u);
    QCOMPARE(cookie, 77ull);
    QCOMPARE(ReadFileAt(disk_path_, base, 4096), w);
  }

  void fastZero() {
    Raw c;
    QVERIFY(c.Open(port_, "sparse"));  // fast_zero not set on this export: ENOTSUP, nothing done
    std::uint32_t err;
    std::uint64_t cookie;
    QVERIFY(c.Send(kCmdWriteZeroes, 1, 1u << 20, 4096, nullptr, kCmdFlagFastZero));
    QVERIFY(c.RecvSimple(&err, &cookie));
    QCOMPARE(err, kEnotsup);
    QCOMPARE(ReadFileAt(sparse_path_, 1u << 20, 4096), std::string(4096, 'D'));
    if (FileSupportsFastZero(disk_path_)) {
      Raw d;
      QVERIFY(d.Open(port_, "disk"));
      QVERIFY(d.Send(kCmdWriteZeroes, 2, 0, 65536, nullptr, kCmdFlagFastZero));
      QVERIFY(d.RecvSimple(&err, &cookie));
      QCOMPARE(err, 0u);
      QVERIFY(d.Send(kCmdWriteZeroes, 3, 0, 65536, nullptr, kCmdFlagFastZero | kCmdFlagNoHole));
      QVERIFY(d.RecvSimple(&err, &cookie));
      QCOMPARE(err, kEnotsup);  // allocating zeroes may mean writing them: not fast
    }
  }

  void structuredReadWithHoles() {
    Raw c;
    QVERIFY(c.Open(port_, "sparse", true));
    QVERIFY(c.tx_flags_ & kTxSendDf);
    // [1 MiB - 64 KiB, 1 MiB + 192 KiB): hole 64K | data 128K | hole 64K.
    const std::uint64_t off = (1u << 20) - (64u << 10);
    QVERIFY(c.Send(kCmdRead, 11, off, 256u << 10));
    auto chunks = c.RecvChunks();
    QCOMPARE(chunks.size(), std::size_t(3));
    QCOMPARE(chunks[0].type, kChunkOffsetHole);
    auto* p0 = reinterpret_cast<const std::uint8_t*>(chunks[0].payload.data());
    QCOMPARE(Get64(p0), off);
    QCOMPARE(Get32(p0 + 8), 64u << 10);
    QCOMPARE(chunks[1].type, kChunkOffsetData);
    QCOMPARE(Get64(reinterpret_cast<const std::uint8_t*>(chunks[1].payload.data())), std::uint64_t(1u << 20));
    QVERIFY(chunks[1].payload.substr(8) == std::string(128u << 10, 'D'));
    QCOMPARE(chunks[2].type, kChunkOffsetHole);
    QVERIFY(!(chunks[0].flags & kReplyFlagDone) && !(chunks[1].flags & kReplyFlagDone));
    QVERIFY(chunks[2].flags & kReplyFlagDone);
    for (auto& ch : chunks) QCOMPARE(ch.cookie, 11ull);
    // DF: one data chunk with everything.
    QVERIFY(c.Send(kCmdRead, 12, off, 256u << 10, nullptr, kCmdFlagDf));
    chunks = c.RecvChunks();
    QCOMPARE(chunks.size(), std::size_t(1));
    QCOMPARE(chunks[0].type, kChunkOffsetData);
    QCOMPARE(chunks[0].payload.size(), std::size_t(8 + (256u << 10)));
    QVERIFY(chunks[0].payload.substr(8 + (64u << 10), 128u << 10) == std::string(128u << 10, 'D'));
    // Small reads: one data chunk (no mapping below sparse_read_min).
    QVERIFY(c.Send(kCmdRead, 13, 0, 4096));
    chunks = c.RecvChunks();
    QCOMPARE(chunks.size(), std::size_t(1));
    QCOMPARE(chunks[0].type, kChunkOffsetData);
    // A DF read above max payload: EOVERFLOW, as an ERROR chunk.
    QVERIFY(c.Send(kCmdRead, 16, 0, 2u << 20, nullptr, kCmdFlagDf));
    chunks = c.RecvChunks();
    QCOMPARE(chunks.size(), std::size_t(1));
    QCOMPARE(chunks[0].type, kChunkError);
    QCOMPARE(Get32(reinterpret_cast<const std::uint8_t*>(chunks[0].payload.data())), kEoverflow);
    // An error on a READ is a structured ERROR chunk; other commands keep simple replies.
    QVERIFY(c.Send(kCmdRead, 14, kDiskSize, 4096));
    chunks = c.RecvChunks();
    QCOMPARE(chunks.size(), std::size_t(1));
    QCOMPARE(chunks[0].type, kChunkError);
    QCOMPARE(Get32(reinterpret_cast<const std::uint8_t*>(chunks[0].payload.data())), kEinval);
    std::uint32_t err;
    std::uint64_t cookie;
    QVERIFY(c.Send(kCmdFlush, 15, 0, 0));
    QVERIFY(c.RecvSimple(&err, &cookie));
    QCOMPARE(cookie, 15ull);
  }

  // Regression: hole chunks come from the zero blocks of the data read, not from lseek on the
  // backing file (SEEK_HOLE on tmpfs walked the page cache to EOF per read).  The "ro" export
  // has no AllocationMap at all and still gets holes, on the device's 4 KiB grid.
  void structuredReadZeroBlocksAreHoles() {
    const std::uint64_t base = 2u << 20;
    QVERIFY(WriteFileAt(ro_path_, base + 4096, std::string(4096, 'Z')));
    QVERIFY(WriteFileAt(ro_path_, base + 65536 + 10, std::string(100, 'Q')));
    Raw c;
    QVERIFY(c.Open(port_, "ro", true));
    const std::uint64_t off = base - 2048;  // unaligned start: the first piece is 2 KiB
    const std::uint32_t len = 128u << 10;
    QVERIFY(c.Send(kCmdRead, 21, off, len));
    auto chunks = c.RecvChunks();
    struct Want { std::uint16_t type; std::uint64_t off; std::uint32_t len; };
    const Want want[] = {{kChunkOffsetHole, off, 6144},
                         {kChunkOffsetData, base + 4096, 4096},
                         {kChunkOffsetHole, base + 8192, 57344},
                         {kChunkOffsetData, base + 65536, 4096},
                         {kChunkOffsetHole, base + 69632, 59392}};
    QCOMPARE(chunks.size(), std::size_t(5));
    for (std::size_t i = 0; i < 5; ++i) {
      QCOMPARE(chunks[i].type, want[i].type);
      auto* p = reinterpret_cast<const std::uint8_t*>(chunks[i].payload.data());
      QCOMPARE(Get64(p), want[i].off);
      if (want[i].type == kChunkOffsetHole) QCOMPARE(Get32(p + 8), want[i].len);
      else QVERIFY(chunks[i].payload.substr(8) == ReadFileAt(ro_path_, want[i].off, want[i].len));
      QCOMPARE(bool(chunks[i].flags & kReplyFlagDone), i == 4);
    }
    // 64 alternating data/zero blocks need more than 16 chunks: the reply stops splitting and
    // sends the rest as one data chunk; reassembled, it is the file.
    const std::uint64_t alt = 5u << 20;
    for (int b = 0; b < 64; b += 2) QVERIFY(WriteFileAt(ro_path_, alt + b * 4096ull, std::string(4096, char('a' + b % 26))));
    QVERIFY(c.Send(kCmdRead, 22, alt, 256u << 10));
    chunks = c.RecvChunks();
    QCOMPARE(chunks.size(), std::size_t(15));  // 14 split off, then data merged with the rest
    std::string img(256u << 10, '\0');
    for (auto& ch : chunks) {
      auto* p = reinterpret_cast<const std::uint8_t*>(ch.payload.data());
      const std::uint64_t at = Get64(p) - alt;
      if (ch.type == kChunkOffsetData) img.replace(at, ch.payload.size() - 8, ch.payload.substr(8));
      else QCOMPARE(ch.type, kChunkOffsetHole);
    }
    QCOMPARE(chunks.back().type, kChunkOffsetData);
    QVERIFY(img == ReadFileAt(ro_path_, alt, 256u << 10));
  }

  void blockStatus() {
    Raw c;
    QVERIFY(c.Open(port_, "sparse", true, {"base:allocation", "dst:test"}));
    const std::uint32_t alloc_id = c.ctx_ids_["base:allocation"], test_id = c.ctx_ids_["dst:test"];
    QVERIFY(alloc_id && test_id && alloc_id != test_id);
    QVERIFY(c.Send(kCmdBlockStatus, 21, 0, 4u << 20));
    auto chunks = c.RecvChunks();
    QCOMPARE(chunks.size(), std::size_t(2));
    std::map<std::uint32_t, std::vector<std::pair<std::uint32_t, std::uint32_t>>> ext;
    for (auto& ch : chunks) {
      QCOMPARE(ch.type, kChunkBlockStatus);
      auto* p = reinterpret_cast<const std::uint8_t*>(ch.payload.data());
      QCOMPARE((ch.payload.size() - 4) % 8, std::size_t(0));
      for (std::size_t i = 4; i < ch.payload.size(); i += 8) ext[Get32(p)].push_back({Get32(p + i), Get32(p + i + 4)});
    }
    QVERIFY(chunks.back().flags & kReplyFlagDone);
    using V = std::vector<std::pair<std::uint32_t, std::uint32_t>>;
    const std::uint32_t hz = kStateHole | kStateZero;
    QCOMPARE(ext[alloc_id], (V{{1u << 20, hz}, {128u << 10, 0}, {(2u << 20) - (128u << 10), hz}, {4096, 0},
                               {(1u << 20) - 4096, hz}}));
    QCOMPARE(ext[test_id], (V{{1u << 20, 0}, {1u << 20, 1}, {1u << 20, 0}, {1u << 20, 1}}));
    // REQ_ONE: exactly one extent per context.
    QVERIFY(c.Send(kCmdBlockStatus, 22, 1u << 20, 2u << 20, nullptr, kCmdFlagReqOne));
    chunks = c.RecvChunks();
    QCOMPARE(chunks.size(), std::size_t(2));
    for (auto& ch : chunks) QCOMPARE(ch.payload.size(), std::size_t(12));
    // Out of range: structured error.
    QVERIFY(c.Send(kCmdBlockStatus, 23, kDiskSize, 512));
    chunks = c.RecvChunks();
    QCOMPARE(chunks.size(), std::size_t(1));
    QCOMPARE(chunks[0].type, kChunkError);
    // Without an allocation map: all data.
    Raw d;
    QVERIFY(d.Open(port_, "ro", true, {"base:"}));
    QVERIFY(d.Send(kCmdBlockStatus, 24, 0, kDiskSize));
    chunks = d.RecvChunks();
    QCOMPARE(chunks.size(), std::size_t(1));
    QCOMPARE(chunks[0].payload.size(), std::size_t(12));
    auto* p = reinterpret_cast<const std::uint8_t*>(chunks[0].payload.data());
    QCOMPARE(Get32(p + 4), std::uint32_t(kDiskSize));
    QCOMPARE(Get32(p + 8), 0u);
  }

  void malformedRequests() {
    // A healthy client keeps working while another misbehaves in every way below.
    Raw healthy;
    QVERIFY(healthy.Open(port_, "disk"));
    std::string w(4096, 'h');
    auto healthy_ok = [&](std::uint64_t cookie) {
      std::uint32_t err = 1;
      std::uint64_t ck = 0;
      return healthy.Send(kCmdWrite, cookie, 7u << 20, 4096, w.data()) && healthy.RecvSimple(&err, &ck) &&
             err == 0 && ck == cookie;
    };
    QVERIFY(healthy_ok(1));

    Raw c;
    QVERIFY(c.Open(port_, "disk"));
    std::uint32_t err;
    std::uint64_t cookie;
    auto expect = [&](std::uint64_t ck, std::uint32_t want) {
      return c.RecvSimple(&err, &cookie) && cookie == ck && err == want;
    };
    std::string payload(8192, 'p');
    QVERIFY(c.Send(99, 1, 0, 0));  // unknown command
    QVERIFY(expect(1, kEinval));
    QVERIFY(c.Send(kCmdRead, 2, 0, 4096, nullptr, 0x100));  // unknown flag
    QVERIFY(expect(2, kEinval));
    QVERIFY(c.Send(kCmdRead, 3, 100, 4096));  // misaligned
    QVERIFY(expect(3, kEinval));
    QVERIFY(c.Send(kCmdRead, 4, kDiskSize - 512, 4096));  // past the end
    QVERIFY(expect(4, kEinval));
    QVERIFY(c.Send(kCmdWrite, 5, kDiskSize, 8192, payload.data()));  // write past the end: drained
    QVERIFY(expect(5, kEnospc));
    QVERIFY(c.Send(kCmdRead, 6, 0, 2u << 20));  // above max payload (EOVERFLOW is only for DF)
    QVERIFY(expect(6, kEinval));
    QVERIFY(c.Send(kCmdWrite, 7, 0, 8192, payload.data(), kCmdFlagDf));  // DF on a WRITE: drained
    QVERIFY(expect(7, kEinval));
    QVERIFY(c.Send(kCmdBlockStatus, 8, 0, 4096));  // no contexts negotiated
    QVERIFY(expect(8, kEinval));
    QVERIFY(c.Send(kCmdRead, 9, 0, 0));  // empty
    QVERIFY(expect(9, kEinval));
    QVERIFY(c.Send(kCmdRead, 10, ~0ull - 4095, 4096));  // offset overflow
    QVERIFY(expect(10, kEinval));
    std::string big(2u << 20, 'b');
    QVERIFY(c.Send(kCmdWrite, 11, 0, std::uint32_t(big.size()), big.data()));  // above max payload: drained
    QVERIFY(expect(11, kEinval));
    // The stream is still in sync: a normal request works.
    QVERIFY(c.Send(kCmdWrite, 12, 0, 4096, w.data()));
    QVERIFY(expect(12, 0));
    QCOMPARE(ReadFileAt(disk_path_, kDiskSize - 8192, 8192), std::string(8192, '\0'));  // nothing landed
    QVERIFY(healthy_ok(2));
    // A WRITE above 32 MiB: answered, then closed (not worth draining).
    QVERIFY(c.Send(kCmdWrite, 13, 0, 64u << 20));
    QVERIFY(expect(13, kEinval));
    QVERIFY(c.ClosedWithin(3000));
    QVERIFY(healthy_ok(3));

    // Bad request magic: closed.
    Raw m;
    QVERIFY(m.Open(port_, "disk"));
    std::uint8_t junk[kRequestSize];
    std::memset(junk, 0xab, sizeof junk);
    QVERIFY(m.SendAll(junk, sizeof junk));
    QVERIFY(m.ClosedWithin(3000));
    // Truncated request, then hang-up.
    Raw t;
    QVERIFY(t.Open(port_, "disk"));
    QVERIFY(t.SendAll(junk, 10));
    t.Close();
    // Truncated WRITE payload, then hang-up: nothing written, nothing acknowledged.
    Raw p;
    QVERIFY(p.Open(port_, "disk"));
    QVERIFY(p.Send(kCmdWrite, 1, 5u << 20, 65536));
    QVERIFY(p.SendAll(payload.data(), 1000));
    p.Close();
    // Garbage instead of a handshake.
    Raw g;
    QVERIFY(g.Connect(port_));
    std::string garbage(5000, '\xff');
    g.SendAll(garbage.data(), garbage.size());
    QVERIFY(g.ClosedWithin(3000));
    QVERIFY(healthy_ok(4));
    QCOMPARE(ReadFileAt(disk_path_, 5u << 20, 1000), std::string(1000, '\0'));
    QVERIFY(srv_->srv->Stats().protocol_errors >= 3);
  }

  void readOnlyExport() {
    Raw c;
    QVERIFY(c.Open(port_, "ro"));
    QVERIFY(c.tx_flags_ & kTxReadOnly);
    std::uint32_t err;
    std::uint64_t cookie;
    std::string payload(65536, 'w');
    QVERIFY(c.Send(kCmdWrite, 1, 0, 65536, payload.data()));  // EPERM, payload drained
    QVERIFY(c.RecvSimple(&err, &cookie));
    QCOMPARE(err, kEperm);
    QVERIFY(c.Send(kCmdTrim, 2, 0, 4096));
    QVERIFY(c.RecvSimple(&err, &cookie));
    QCOMPARE(err, kEperm);
    QVERIFY(c.Send(kCmdWriteZeroes, 3, 0, 4096));
    QVERIFY(c.RecvSimple(&err, &cookie));
    QCOMPARE(err, kEperm);
    QVERIFY(c.Send(kCmdFlush, 4, 0, 0));
    QVERIFY(c.RecvSimple(&err, &cookie));
    QCOMPARE(err, 0u);
    char buf[4096];
    QVERIFY(c.Send(kCmdRead, 5, 0, 4096));
    QVERIFY(c.RecvSimple(&err, &cookie, buf, 4096));
    QCOMPARE(err, 0u);
    QCOMPARE(ReadFileAt(ro_path_, 0, 65536), std::string(65536, '\0'));
  }

  void discDrainsInFlight() {
    Raw c;
    QVERIFY(c.Open(port_, "disk"));
    std::string w(1u << 20, 'q');
    for (int i = 0; i < 4; ++i) QVERIFY(c.Send(kCmdWrite, 1 + i, std::uint64_t(i) << 20, 1u << 20, w.data()));
    QVERIFY(c.Send(kCmdDisc, 99, 0, 0));
    std::uint32_t err;
    std::uint64_t cookie;
    for (int i = 0; i < 4; ++i) {  // every write before DISC is answered
      QVERIFY(c.RecvSimple(&err, &cookie));
      QCOMPARE(err, 0u);
    }
    QVERIFY(c.ClosedWithin(3000));  // and DISC itself gets no reply
    QCOMPARE(ReadFileAt(disk_path_, 3u << 20, 1u << 20), w);
  }

  void removeExportAndList() {
    auto list = srv_->srv->ListExports();
    QCOMPARE(list.size(), std::size_t(3));
    Raw c;
    QVERIFY(c.Open(port_, "ro"));
    bool busy = false;
    for (int i = 0; i < 50 && !busy; ++i) {
      busy = srv_->srv->RemoveExport("ro").code() == Status::Code::kBusy;
      if (!busy) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    QVERIFY(busy);
    QCOMPARE(srv_->srv->RemoveExport("nosuch").code(), Status::Code::kNotFound);
    c.Close();
    bool removed = false;
    for (int i = 0; i < 100 && !removed; ++i) {
      removed = srv_->srv->RemoveExport("ro").ok();
      if (!removed) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    QVERIFY(removed);
    QCOMPARE(srv_->srv->ListExports().size(), std::size_t(2));
    NbdExportSpec r;
    r.name = "ro";
    r.device = ro_;
    r.read_only = true;
    QVERIFY(srv_->srv->AddExport(r).ok());
  }

  // Default deny over NBD (fake TLS identities by source address): LIST shows only what the
  // identity may use, INFO/GO of another export get NBD_REP_ERR_POLICY, EXPORT_NAME closes, a
  // read-only identity gets NBD_FLAG_READ_ONLY and an error on writes, and
  // max_connections_per_identity refuses the next GO with POLICY.
  void accessByIdentity() {
    Server s;
    NbdServerOptions o;
    o.limits.max_connections_per_identity = 2;
    std::atomic<std::uint16_t> port{0};
    o.listener = dst::test::IdentityListenerFactory(s.io, {{"127.0.0.2", "alice"}, {"127.0.0.3", "bob"}}, &port);
    QVERIFY(s.Start(o, 2));
    NbdExportSpec a;
    a.name = "a";
    a.device = disk_;
    a.allow = AccessList{{"alice", false}, {"bob", true}};
    QVERIFY(s.srv->AddExport(a).ok());
    a.name = "b";
    a.allow = AccessList{{"bob", false}};
    QVERIFY(s.srv->AddExport(a).ok());
    auto list = [&](const char* from) {
      Raw c;
      c.set_from(from);
      std::vector<std::string> names;
      if (!c.Connect(port) || !c.Greeting() || !c.SendOption(kOptList, "")) return names;
      for (auto& r : c.RecvUntilFinal())
        if (r.type == kRepServer)
          names.push_back(r.data.substr(4, Get32(reinterpret_cast<const std::uint8_t*>(r.data.data()))));
      return names;
    };
    QCOMPARE(list("127.0.0.2"), std::vector<std::string>{"a"});
    QCOMPARE(list("127.0.0.3"), (std::vector<std::string>{"a", "b"}));
    QCOMPARE(list("127.0.0.1"), std::vector<std::string>{});  // anonymous: nothing
    {
      Raw c;
      c.set_from("127.0.0.2");
      QVERIFY(c.Connect(port) && c.Greeting());
      for (std::uint32_t opt : {kOptInfo, kOptGo}) {
        QVERIFY(c.SendOption(opt, Raw::InfoData("b", {})));
        auto r = c.RecvUntilFinal();
        QVERIFY(!r.empty());
        QCOMPARE(r.back().type, kRepErrPolicy);
        QVERIFY(r.back().data.find("alice") != std::string::npos);
      }
      QVERIFY(c.SendOption(kOptExportName, "b"));
      QVERIFY(c.ClosedWithin(3000));
    }
    Raw bob;  // read-only on "a"
    bob.set_from("127.0.0.3");
    QVERIFY(bob.Open(port, "a"));
    QVERIFY(bob.tx_flags_ & kTxReadOnly);
    std::vector<char> buf(4096, 'x');
    std::uint32_t err = 0;
    std::uint64_t cookie = 0;
    QVERIFY(bob.Send(kCmdWrite, 1, 0, 4096, buf.data()) && bob.RecvSimple(&err, &cookie));
    QVERIFY(err != 0);
    Raw alice, alice2, alice3;
    alice.set_from("127.0.0.2");
    QVERIFY(alice.Open(port, "a"));
    QVERIFY(!(alice.tx_flags_ & kTxReadOnly));
    QVERIFY(alice.Send(kCmdWrite, 2, 0, 4096, buf.data()) && alice.RecvSimple(&err, &cookie));
    QCOMPARE(err, 0u);
    alice2.set_from("127.0.0.2");
    alice3.set_from("127.0.0.2");
    QVERIFY(alice2.Open(port, "a"));
    QVERIFY(alice3.Connect(port) && alice3.Greeting() && alice3.SendOption(kOptGo, Raw::InfoData("a", {})));
    auto r = alice3.RecvUntilFinal();
    QVERIFY(!r.empty());
    QCOMPARE(r.back().type, kRepErrPolicy);
  }

  void drainClosesAndFlushes() {
    Server s;
    NbdServerOptions o;
    o.buffer_count = 4;
    QVERIFY(s.Start(o, 1));
    NbdExportSpec d;
    d.name = "disk";
    d.device = disk_;
    QVERIFY(s.srv->AddExport(d).ok());
    Raw c;
    QVERIFY(c.Open(s.srv->port(), "disk"));
    Raw h;  // still in the handshake
    QVERIFY(h.Connect(s.srv->port()) && h.Greeting());
    std::promise<Status> p;
    s.srv->Drain([&](Status st) { p.set_value(st); });
    auto f = p.get_future();
    QVERIFY(f.wait_for(std::chrono::seconds(10)) == std::future_status::ready);
    QVERIFY(f.get().ok());
    QVERIFY(c.ClosedWithin(2000));
    QVERIFY(h.ClosedWithin(2000));
    Raw late;
    QVERIFY(!late.Connect(s.srv->port()) || late.ClosedWithin(2000));
  }

  void stalledClientsClosed() {
    Server s;
    NbdServerOptions o;
    o.buffer_count = 4;
    o.stall_timeout = std::chrono::milliseconds(600);
    QVERIFY(s.Start(o, 1));
    NbdExportSpec d;
    d.name = "disk";
    d.device = disk_;
    QVERIFY(s.srv->AddExport(d).ok());
    Raw silent;  // connects, never finishes the handshake
    QVERIFY(silent.Connect(s.srv->port()));
    Raw payload;  // WRITE header, then the payload stops arriving
    QVERIFY(payload.Open(s.srv->port(), "disk"));
    std::string part(1000, 'x');
    QVERIFY(payload.Send(kCmdWrite, 1, 0, 65536));
    QVERIFY(payload.SendAll(part.data(), part.size()));
    Raw idle;  // serving and quiet: owes nothing, stays
    QVERIFY(idle.Open(s.srv->port(), "disk"));
    QVERIFY(silent.ClosedWithin(5000));
    QVERIFY(payload.ClosedWithin(5000));
    QVERIFY(!idle.ClosedWithin(1500));
    std::uint32_t err;
    std::uint64_t cookie;
    QVERIFY(idle.Send(kCmdFlush, 2, 0, 0));
    QVERIFY(idle.RecvSimple(&err, &cookie));
    QCOMPARE(err, 0u);
  }

  // A client that queues 1 MiB READs and takes the replies at ~10 bytes/s is closed by bytes
  // drained within about drain_window (the stall check, which counts frames, is off here) and its
  // buffers come back, while another client's requests keep completing within 1 s.
  void slowReaderEvictedByBytes() {
    Server s;
    QVERIFY(s.Start(dst::test::DrainTestOptions<NbdServerOptions>(256u << 10), 2));
    NbdExportSpec d;
    d.name = "disk";
    d.device = disk_;
    QVERIFY(s.srv->AddExport(d).ok());
    Raw slow, good;
    QVERIFY(slow.Open(s.srv->port(), "disk") && good.Open(s.srv->port(), "disk"));
    for (int i = 0; i < 64; ++i) QVERIFY(slow.Send(kCmdRead, 100 + i, 0, kMaxPayload));
    long evicted_ms = -1, worst_ms;
    {
      dst::test::Trickle trickle(slow.fd());
      std::uint64_t cookie = 1000, got;
      std::uint32_t err = 0;
      char buf[4096];
      worst_ms = dst::test::WorstLatency(
          3000, [&] { return good.Send(kCmdRead, ++cookie, 4096, 4096) && good.RecvSimple(&err, &got, buf, 4096) && err == 0; },
          [&](long t) {
            if (evicted_ms < 0 && s.srv->Stats().connections_timed_out > 0) evicted_ms = t;
          });
    }
    QVERIFY2(worst_ms >= 0 && worst_ms < 1000, qPrintable(QString("worst request %1 ms").arg(worst_ms)));
    QVERIFY2(evicted_ms >= 0 && evicted_ms < 2000, qPrintable(QString("evicted after %1 ms").arg(evicted_ms)));
    QTRY_COMPARE_WITH_TIMEOUT(s.srv->Stats().connections_open, 1, 5000);
  }

  // ---- resource caps (ServerLimits and the handshake caps, docs/security.md)

  // The NBD handshake is read in whole messages, so a trickle never completes one; the deadline
  // closes it whatever the stall check says.
  void handshakeDeadline() {
    Server s;
    NbdServerOptions o;
    o.limits.handshake_timeout = std::chrono::milliseconds(500);
    o.stall_timeout = std::chrono::milliseconds(60000);
    QVERIFY(s.Start(o, 1));
    NbdExportSpec d;
    d.name = "disk";
    d.device = disk_;
    QVERIFY(s.srv->AddExport(d).ok());
    Raw slow;
    QVERIFY(slow.Connect(s.srv->port()) && slow.Greeting());
    const auto t0 = std::chrono::steady_clock::now();
    // GO for "disk", one byte every 100 ms (2.6 s in all).
    std::string go = Raw::InfoData("disk", {});
    std::uint8_t h[kOptionHeaderSize];
    Put64(h, kOptMagic);
    Put32(h + 8, kOptGo);
    Put32(h + 12, std::uint32_t(go.size()));
    std::string all(reinterpret_cast<char*>(h), sizeof h);
    all += go;
    std::size_t sent = 0;
    bool closed = false;
    while (sent < all.size() && !closed && slow.SendAll(&all[sent], 1)) {
      ++sent;
      closed = slow.ClosedWithin(100);
    }
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
    QVERIFY(closed);
    QVERIFY2(ms >= 400 && ms < 1600, qPrintable(QString("closed after %1 ms").arg(ms)));
    QCOMPARE(s.srv->Stats().connections_timed_out, 1ull);
    Raw good;  // a prompt client is not affected
    QVERIFY(good.Open(s.srv->port(), "disk"));
  }

  // Over max_connections a new connection is closed before its greeting while a legitimate
  // client keeps its I/O going.
  void connectionCapRefusesKeepsServing() {
    Server s;
    NbdServerOptions o;
    o.limits.max_connections = 3;
    QVERIFY(s.Start(o, 1));
    NbdExportSpec d;
    d.name = "disk";
    d.device = disk_;
    QVERIFY(s.srv->AddExport(d).ok());
    Raw legit, h1, h2;
    QVERIFY(legit.Open(s.srv->port(), "disk"));
    QVERIFY(h1.Connect(s.srv->port()) && h2.Connect(s.srv->port()));
    QTRY_COMPARE_WITH_TIMEOUT(s.srv->Stats().connections_open, 3, 5000);
    std::uint32_t err;
    std::uint64_t cookie;
    char buf[4096];
    std::memset(buf, 'L', sizeof buf);
    for (int i = 0; i < 5; ++i) {
      Raw over;
      QVERIFY(over.Connect(s.srv->port()));
      std::uint8_t g[kGreetingSize];
      QVERIFY(!over.RecvAll(g, sizeof g, 2000));  // no greeting: closed at once
      QVERIFY(legit.Send(kCmdWrite, i, 4096 * i, 4096, buf) && legit.RecvSimple(&err, &cookie) && err == 0);
      QVERIFY(legit.Send(kCmdRead, 10 + i, 4096 * i, 4096) && legit.RecvSimple(&err, &cookie, buf, 4096) && err == 0);
    }
    QCOMPARE(s.srv->Stats().connections_refused, 5ull);
  }

  // Option caps: data over max_option_length is drained and refused with ERR_TOO_BIG (the
  // session goes on); too many or too long metadata queries get ERR_TOO_BIG; the
  // max_options+1st option closes.
  void optionCaps() {
    Server s;
    NbdServerOptions o;
    o.max_option_length = 1024;
    o.max_options = 6;
    o.max_meta_queries = 2;
    o.max_meta_query_length = 64;
    QVERIFY(s.Start(o, 1));
    NbdExportSpec d;
    d.name = "disk";
    d.device = disk_;
    QVERIFY(s.srv->AddExport(d).ok());
    Raw c;
    QVERIFY(c.Connect(s.srv->port()) && c.Greeting());
    QVERIFY(c.SendOption(kOptInfo, Raw::InfoData(std::string(1100, 'n'), {})));  // 1 (over 1024)
    auto r = c.RecvUntilFinal();
    QCOMPARE(r.back().type, kRepErrTooBig);
    QVERIFY(c.SendOption(kOptStructuredReply, ""));  // 2
    QCOMPARE(c.RecvUntilFinal().back().type, kRepAck);
    QVERIFY(c.SendOption(kOptListMetaContext, Raw::MetaData("disk", {"base:", "dst:", "x:"})));  // 3
    QCOMPARE(c.RecvUntilFinal().back().type, kRepErrTooBig);
    QVERIFY(c.SendOption(kOptListMetaContext, Raw::MetaData("disk", {"base:" + std::string(64, 'q')})));  // 4
    QCOMPARE(c.RecvUntilFinal().back().type, kRepErrTooBig);
    QVERIFY(c.SendOption(kOptListMetaContext, Raw::MetaData("disk", {"base:"})));  // 5: within the caps
    r = c.RecvUntilFinal();
    QCOMPARE(r.back().type, kRepAck);
    QCOMPARE(r.front().type, kRepMetaContext);
    QVERIFY(c.SendOption(kOptInfo, Raw::InfoData("disk", {})));  // 6
    QCOMPARE(c.RecvUntilFinal().back().type, kRepAck);
    QVERIFY(c.SendOption(kOptInfo, Raw::InfoData("disk", {})));  // 7: one too many
    QVERIFY(c.ClosedWithin(3000));
    // The server keeps serving.
    Raw good;
    QVERIFY(good.Open(s.srv->port(), "disk"));
    std::uint32_t err;
    std::uint64_t cookie;
    QVERIFY(good.Send(kCmdFlush, 1, 0, 0) && good.RecvSimple(&err, &cookie) && err == 0);
  }

  // Steady state: no heap allocation per I/O (simple and structured replies), one io thread.
  void noAllocationPerIo() {
    Server s;
    NbdServerOptions o;
    o.buffer_count = 32;
    o.max_payload = kMaxPayload;
    QVERIFY(s.Start(o, 1));
    NbdExportSpec d;
    d.name = "disk";
    d.device = disk_;
    d.allocation = FileAllocationMap::Open(disk_path_).value();
    QVERIFY(s.srv->AddExport(d).ok());
    NbdExportSpec sp;
    sp.name = "sparse";
    sp.device = sparse_;
    sp.allocation = FileAllocationMap::Open(sparse_path_).value();
    QVERIFY(s.srv->AddExport(sp).ok());
    Raw simple, structured;
    QVERIFY(simple.Open(s.srv->port(), "disk"));
    QVERIFY(structured.Open(s.srv->port(), "sparse", true, {"base:allocation"}));
    static char w[4096], r[256u << 10];
    static std::uint8_t hdr[64];
    std::memset(w, 0x5a, sizeof w);
    bool ok = true;
    auto run = [&](int n, int depth) {
      std::uint32_t err;
      std::uint64_t cookie;
      for (int i = 0; i < n && ok; i += depth) {
        for (int k = 0; k < depth; ++k) {
          const std::uint64_t off = std::uint64_t((i + k) % 256) * 4096;
          ok = ok && ((i / depth) % 2 == 0 ? simple.Send(kCmdWrite, i + k, off, 4096, w)
                                             : simple.Send(kCmdRead, i + k, off, 4096));
        }
        const bool reads = (i / depth) % 2 != 0;
        for (int k = 0; k < depth; ++k)
          ok = ok && simple.RecvSimple(&err, &cookie, reads ? r : nullptr, 4096) && err == 0;
        // Structured: a 256 KiB read split at holes (hole/data/hole) and a BLOCK_STATUS.
        ok = ok && structured.Send(kCmdRead, i, (1u << 20) - (64u << 10), 256u << 10);
        for (int chunks = 0; ok && chunks < 3; ++chunks) {
          ok = structured.RecvAll(hdr, kChunkHeaderSize) && structured.RecvAll(r, Get32(hdr + 16));
        }
        ok = ok && (Get16(hdr + 4) & kReplyFlagDone);
        ok = ok && structured.Send(kCmdBlockStatus, i, 0, 4u << 20) && structured.RecvAll(hdr, kChunkHeaderSize) &&
             structured.RecvAll(r, Get32(hdr + 16)) && (Get16(hdr + 4) & kReplyFlagDone);
      }
    };
    const std::uint64_t allocs = AllocsDuring(run, 400, 1000);
    QVERIFY(ok);
    qInfo("allocations during 2000 simple READ/WRITE, 1125 structured READ and 1125 BLOCK_STATUS requests: %llu",
          (unsigned long long)allocs);
    QCOMPARE(allocs, 0ull);
  }

  // The same steady state inside TLS after STARTTLS: encrypting and decrypting allocate nothing
  // (server and this test's OpenSSL client alike).
  void tlsNoAllocationPerIo() {
    auto s = TlsServer(NbdTls::kRequire);
    QVERIFY(s);
    Raw c;
    QVERIFY(c.Open(s->srv->port(), "disk", false, {}, tls_alice_));
    static char w[64u << 10], r[64u << 10];
    std::memset(w, 0x3c, sizeof w);
    bool ok = true;
    auto run = [&](int n, int depth) {
      std::uint32_t err;
      std::uint64_t cookie;
      for (int i = 0; i < n && ok; i += depth) {
        const bool reads = (i / depth) % 2 != 0;
        for (int k = 0; k < depth; ++k) {
          const std::uint64_t off = std::uint64_t((i + k) % 64) * sizeof w;
          ok = ok && (reads ? c.Send(kCmdRead, i + k, off, sizeof r) : c.Send(kCmdWrite, i + k, off, sizeof w, w));
        }
        for (int k = 0; k < depth; ++k)
          ok = ok && c.RecvSimple(&err, &cookie, reads ? r : nullptr, sizeof r) && err == 0;
      }
    };
    const std::uint64_t allocs = AllocsDuring(run, 200, 1000);
    QVERIFY(ok);
    qInfo("allocations during 2000 64 KiB READ/WRITE requests inside TLS: %llu", (unsigned long long)allocs);
    QCOMPARE(allocs, 0ull);
  }
};

DST_TEST_MAIN(NbdServerTest)
#include "nbd_server_test.moc"
