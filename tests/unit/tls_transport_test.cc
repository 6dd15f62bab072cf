// Unit tests for TLS 1.3 on the Transport seam (tls.h) over loopback: PSK handshakes (identity
// reported; wrong key, unknown identity, a TLS 1.2 client and a plaintext DST HELLO refused),
// key-file modes, X.509 with a CA made here with the OpenSSL API (a certificate of another CA
// refused), a 64 MiB frame stream through SendFrames' partial writes, key generation, and no
// allocation per I/O (operator new and OpenSSL's own allocator counted).
#include <sys/socket.h>
#include <sys/stat.h>
#include <execinfo.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <QTemporaryDir>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <thread>
#include <vector>

#include <boost/asio/io_context.hpp>

#include "dst/net/codec.h"
#include "dst/net/tcp_transport.h"
#include "dst/net/tls.h"
#include "loopback.h"
#include "test_env.h"
#include "tx_frames.h"

namespace asio = boost::asio;
using namespace dst;
using namespace dst::net;

// ---- allocation counting: operator new and OpenSSL's CRYPTO_malloc family ----
namespace {
std::atomic<std::uint64_t> g_allocs{0};         // operator new
std::atomic<std::uint64_t> g_crypto_allocs{0};  // OpenSSL's CRYPTO_malloc family
// DST_ALLOC_TRACE=1 prints a backtrace of the first few counted allocations (to find them).
std::atomic<bool> g_trace{false};
std::atomic<int> g_traced{0};
void Count(std::atomic<std::uint64_t>& counter) {
  counter.fetch_add(1, std::memory_order_relaxed);
  if (g_trace.load(std::memory_order_relaxed) && std::getenv("DST_ALLOC_TRACE") && g_traced++ < 6) {
    void* frames[24];
    backtrace_symbols_fd(frames, backtrace(frames, 24), 2);
  }
}
void* CountedMalloc(std::size_t n, const char*, int) {
  Count(g_crypto_allocs);
  return std::malloc(n);
}
void* CountedRealloc(void* p, std::size_t n, const char*, int) {
  Count(g_crypto_allocs);
  return std::realloc(p, n);
}
void CountedFree(void* p, const char*, int) { std::free(p); }
// Before any OpenSSL allocation (static initialisation of this executable).
const bool g_crypto_counted = CRYPTO_set_mem_functions(CountedMalloc, CountedRealloc, CountedFree) == 1;
}  // namespace

void* operator new(std::size_t n) {
  Count(g_allocs);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

namespace {

constexpr char kAliceKey[] = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
constexpr char kBobKey[] = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

std::string WriteFile(const QTemporaryDir& dir, const char* name, const std::string& text, mode_t mode = 0600) {
  const std::string path = dir.path().toStdString() + "/" + name;
  std::ofstream(path) << text;
  ::chmod(path.c_str(), mode);
  return path;
}

std::shared_ptr<TlsContext> MakeCtx(const TlsConfig& cfg) {
  auto r = TlsContext::Create(cfg);
  if (!r.ok()) qWarning("TlsContext: %s", r.status().ToString().c_str());
  return r.ok() ? r.value() : nullptr;
}

TlsConfig Psk(bool server, const std::string& file, const std::string& identity = {}) {
  TlsConfig c;
  c.server = server;
  c.psk_file = file;
  c.psk_identity = identity;
  c.handshake_timeout = std::chrono::seconds(5);
  return c;
}

// A TLS listener on 127.0.0.1 and the loop that runs everything; clients connect through
// TlsConnector (Connect) or raw sockets.
struct Fixture {
  asio::io_context io;
  Strand ex = asio::make_strand(io);
  std::unique_ptr<Listener> listener;
  std::uint16_t port = 0;
  std::vector<std::unique_ptr<Transport>> accepted;

  bool Listen(std::shared_ptr<TlsContext> ctx) {
    auto l = TcpListener::Open(io, ex, "127.0.0.1", 0);
    if (!l.ok() || !ctx) return false;
    port = l.value()->port();
    listener = std::make_unique<TlsListener>(std::move(l).value(), std::move(ctx), ex);
    Accept();
    return true;
  }
  void Accept() {
    listener->AsyncAccept([this](const boost::system::error_code& ec, std::unique_ptr<Transport> t) {
      if (ec) return;
      accepted.push_back(std::move(t));
      Accept();
    });
  }
  // A PSK listener whose file holds bob's key; returns that file (a client may use it too).
  std::string ListenPsk(const QTemporaryDir& dir, std::chrono::milliseconds handshake = std::chrono::seconds(5)) {
    const auto file = WriteFile(dir, "server.psk", std::string("bob:") + kBobKey + "\n");
    TlsConfig cfg = Psk(true, file);
    cfg.handshake_timeout = handshake;
    return Listen(MakeCtx(cfg)) ? file : std::string();
  }
  // A PSK listener and one client connected to it as bob (*client; accepted[0] is its server end).
  bool PskPair(const QTemporaryDir& dir, std::unique_ptr<Transport>* client) {
    const auto file = ListenPsk(dir);
    return !file.empty() && Connect(MakeCtx(Psk(false, file)), client).ok() &&
           RunUntil([&] { return accepted.size() == 1; });
  }
  // Runs the loop a while; true if the server handed out no connection meanwhile.
  bool NothingAccepted(std::chrono::milliseconds wait) {
    RunUntil([] { return false; }, wait);
    return accepted.empty();
  }
  template <typename F>
  bool RunUntil(F pred, std::chrono::milliseconds limit = std::chrono::seconds(20)) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (!pred() && std::chrono::steady_clock::now() < end) {
      io.restart();
      io.run_for(std::chrono::milliseconds(5));
    }
    return pred();
  }
  // Connects with `ctx`; returns the status and the transport.
  Status Connect(std::shared_ptr<TlsContext> ctx, std::unique_ptr<Transport>* out) {
    Strand s = asio::make_strand(io);
    TlsConnector conn(std::make_unique<TcpConnector>(s, "127.0.0.1", port), std::move(ctx), "127.0.0.1");
    bool done = false;
    Status st;
    conn.AsyncConnect(std::chrono::seconds(5), [&](Status s2, std::unique_ptr<Transport> t) {
      st = std::move(s2);
      *out = std::move(t);
      done = true;
    });
    if (!RunUntil([&] { return done; })) return Status::TimedOut("test: connect never finished");
    return st;
  }
};

// ---- X.509 made here: a CA and certificates it signs ----
using KeyPtr = std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)>;
using CertPtr = std::unique_ptr<X509, decltype(&X509_free)>;

KeyPtr NewKey() { return KeyPtr(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"), EVP_PKEY_free); }

// A certificate for `cn` with `key`, signed by (issuer, issuer_key); self-signed when issuer is
// null (a CA).
CertPtr NewCert(const char* cn, EVP_PKEY* key, X509* issuer, EVP_PKEY* issuer_key, long serial) {
  CertPtr c(X509_new(), X509_free);
  X509_set_version(c.get(), 2);
  ASN1_INTEGER_set(X509_get_serialNumber(c.get()), serial);
  X509_gmtime_adj(X509_getm_notBefore(c.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(c.get()), 3600 * 24);
  X509_set_pubkey(c.get(), key);
  X509_NAME* name = X509_get_subject_name(c.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(cn), -1, -1, 0);
  X509_set_issuer_name(c.get(), issuer ? X509_get_subject_name(issuer) : name);
  X509V3_CTX v3;
  X509V3_set_ctx_nodb(&v3);
  X509V3_set_ctx(&v3, issuer ? issuer : c.get(), c.get(), nullptr, nullptr, 0);
  const char* bc = issuer ? "critical,CA:FALSE" : "critical,CA:TRUE";
  if (X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &v3, NID_basic_constraints, bc)) {
    X509_add_ext(c.get(), ext, -1);
    X509_EXTENSION_free(ext);
  }
  X509_sign(c.get(), issuer_key ? issuer_key : key, EVP_sha256());
  return c;
}

std::string Pem(X509* c) {
  BIO* b = BIO_new(BIO_s_mem());
  PEM_write_bio_X509(b, c);
  char* p = nullptr;
  long n = BIO_get_mem_data(b, &p);
  std::string s(p, std::size_t(n));
  BIO_free(b);
  return s;
}
std::string Pem(EVP_PKEY* k) {
  BIO* b = BIO_new(BIO_s_mem());
  PEM_write_bio_PrivateKey(b, k, nullptr, nullptr, 0, nullptr, nullptr);
  char* p = nullptr;
  long n = BIO_get_mem_data(b, &p);
  std::string s(p, std::size_t(n));
  BIO_free(b);
  return s;
}

// Writes cert + key files for `cn` signed by the CA; returns a TlsConfig using them.
TlsConfig X509Config(const QTemporaryDir& dir, const char* cn, X509* ca, EVP_PKEY* ca_key, const std::string& ca_file,
                     bool server, long serial) {
  KeyPtr k = NewKey();
  CertPtr c = NewCert(cn, k.get(), ca, ca_key, serial);
  TlsConfig t;
  t.server = server;
  t.cert_file = WriteFile(dir, (std::string(cn) + ".crt").c_str(), Pem(c.get()), 0644);
  t.key_file = WriteFile(dir, (std::string(cn) + ".key").c_str(), Pem(k.get()));
  t.ca_file = ca_file;
  t.handshake_timeout = std::chrono::seconds(5);
  return t;
}

// Sends `ch`'s frames through t->SendFrames (waiting for writability when it would block) while
// the loop runs; counts the calls that stopped inside a frame.
struct Sender {
  Transport* t;
  Frames* ch;
  std::size_t frame = 0, offset = 0;
  std::uint64_t partial = 0, calls = 0;
  bool failed = false, waiting = false;
  void Pump() {
    while (frame < ch->f.size() && !waiting && !failed) {
      boost::system::error_code ec;
      std::size_t n = t->SendFrames(&ch->f[frame], offset, SendLimits{}, ec);
      ++calls;
      if (ec == asio::error::would_block) {
        waiting = true;
        t->AsyncWaitWritable([this](const boost::system::error_code& e, std::size_t) {
          waiting = false;
          if (e) failed = true;
          else Pump();
        });
        return;
      }
      if (ec) {
        failed = true;
        return;
      }
      offset += n;
      while (frame < ch->f.size() && offset >= ch->FrameBytes()) {
        offset -= ch->FrameBytes();
        ++frame;
      }
      if (offset) ++partial;
    }
  }
  bool done() const { return frame == ch->f.size(); }
};

// Reads into `buf` with AsyncReadSome until `want` bytes arrived.
struct Reader {
  Transport* t;
  std::vector<char>* buf;
  std::size_t got = 0;
  bool failed = false;
  void Pump() {
    t->AsyncReadSome(asio::buffer(buf->data() + got, buf->size() - got), [this](const boost::system::error_code& ec, std::size_t n) {
      got += n;
      if (ec) failed = true;
      else if (got < buf->size()) Pump();
    });
  }
};

}  // namespace

class TlsTransportTest : public QObject {
  Q_OBJECT

  // A client whose key file line is `client_line` is refused by a server that knows bob.
  void ExpectPskRefused(const std::string& client_line) {
    QTemporaryDir dir;
    Fixture fx;
    QVERIFY(!fx.ListenPsk(dir).empty());
    const auto client = WriteFile(dir, "client.psk", client_line + "\n");
    std::unique_ptr<Transport> t;
    Status st = fx.Connect(MakeCtx(Psk(false, client)), &t);
    QVERIFY(!st.ok());
    QVERIFY(!t);
    QVERIFY2(st.message().find("TLS handshake") != std::string::npos, st.ToString().c_str());
    QVERIFY(fx.NothingAccepted(std::chrono::milliseconds(200)));
  }

 private slots:
  void initTestCase() { QVERIFY(g_crypto_counted); }

  // PSK: the server takes any identity of its file and names it; data flows both ways.
  void pskHandshakeReportsIdentity() {
    QTemporaryDir dir;
    const auto server = WriteFile(dir, "server.psk", std::string("alice:") + kAliceKey + "\n# c\nbob:" + kBobKey + "\n");
    const auto client = WriteFile(dir, "bob.psk", std::string("bob:") + kBobKey + "\n");
    Fixture fx;
    QVERIFY(fx.Listen(MakeCtx(Psk(true, server))));
    std::unique_ptr<Transport> t;
    Status st = fx.Connect(MakeCtx(Psk(false, client)), &t);
    QVERIFY2(st.ok(), st.ToString().c_str());
    QVERIFY(fx.RunUntil([&] { return fx.accepted.size() == 1; }));
    QCOMPARE(fx.accepted[0]->identity(), std::string("bob"));
    QCOMPARE(t->identity(), std::string("bob"));
    QVERIFY(!fx.accepted[0]->peer().empty());

    // Client -> server with AsyncWrite / AsyncRead, then server -> client.
    const std::string msg = "hello over tls";
    bool wrote = false, read = false;
    std::vector<char> in(msg.size());
    t->AsyncWrite(asio::buffer(msg), [&](const boost::system::error_code& ec, std::size_t n) {
      wrote = !ec && n == msg.size();
    });
    fx.accepted[0]->AsyncRead(asio::buffer(in), [&](const boost::system::error_code& ec, std::size_t n) {
      read = !ec && n == msg.size();
    });
    QVERIFY(fx.RunUntil([&] { return wrote && read; }));
    QCOMPARE(std::string(in.begin(), in.end()), msg);

    // An orderly close: the other side's read ends with EOF.
    boost::system::error_code end;
    bool ended = false;
    char c;
    fx.accepted[0]->AsyncReadSome(asio::buffer(&c, 1), [&](const boost::system::error_code& ec, std::size_t) {
      end = ec;
      ended = true;
    });
    t->Close();
    QVERIFY(fx.RunUntil([&] { return ended; }));
    QCOMPARE(end, boost::system::error_code(asio::error::eof));
  }

  // A known identity with the wrong key, and an unknown identity: refused on both sides.
  void pskWrongKeyFails() { ExpectPskRefused(std::string("bob:") + kAliceKey); }
  void pskUnknownIdentityFails() { ExpectPskRefused(std::string("carol:") + kBobKey); }

  // A client that speaks at most TLS 1.2 gets a protocol_version alert, not a connection.
  void tls12ClientRefused() {
    QTemporaryDir dir;
    Fixture fx;
    QVERIFY(!fx.ListenPsk(dir).empty());
    std::atomic<int> rc{-2};
    std::thread client([&] {
      const int fd = test::DialLoopback(fx.port);
      SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
      SSL_CTX_set_max_proto_version(ctx, TLS1_2_VERSION);
      SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, nullptr);
      SSL* ssl = SSL_new(ctx);
      SSL_set_fd(ssl, fd);
      rc = SSL_connect(ssl);
      SSL_free(ssl);
      SSL_CTX_free(ctx);
      ::close(fd);
    });
    QVERIFY(fx.RunUntil([&] { return rc.load() != -2; }));
    client.join();
    QVERIFY(rc.load() != 1);
    QVERIFY(fx.NothingAccepted(std::chrono::milliseconds(100)));
  }

  // Plain DST to a TLS port: the HELLO is not a ClientHello; the server closes, nothing accepted.
  void plaintextHelloRefused() {
    QTemporaryDir dir;
    Fixture fx;
    const auto server = fx.ListenPsk(dir);
    QVERIFY(!server.empty());
    std::atomic<int> closed{0};
    std::thread client([&] {
      const int fd = test::DialLoopback(fx.port);
      Header h;
      h.cmd = std::uint16_t(Cmd::kHello);
      h.length = kHelloRequestFixed + 4;
      std::uint8_t buf[kHeaderSize + kHelloRequestFixed + 4] = {};
      EncodeHeader(h, buf);
      (void)!::send(fd, buf, sizeof buf, MSG_NOSIGNAL);
      char r[256];
      ssize_t n;
      while ((n = ::recv(fd, r, sizeof r, 0)) > 0) {
      }
      closed = n == 0 || errno == ECONNRESET ? 1 : -1;  // not the receive timeout
      ::close(fd);
    });
    QVERIFY(fx.RunUntil([&] { return closed.load() != 0; }));
    client.join();
    QCOMPARE(closed.load(), 1);
    QVERIFY(fx.accepted.empty());
  }

  // Key files readable by others are refused, naming the file and its mode.
  void keyFileModeRefused() {
    QTemporaryDir dir;
    const auto f = WriteFile(dir, "open.psk", std::string("bob:") + kBobKey + "\n", 0644);
    auto r = TlsContext::Create(Psk(true, f));
    QVERIFY(!r.ok());
    QVERIFY2(r.status().message().find(f) != std::string::npos, r.status().ToString().c_str());
    QVERIFY2(r.status().message().find("0644") != std::string::npos, r.status().ToString().c_str());
    ::chmod(f.c_str(), 0600);
    QVERIFY(TlsContext::Create(Psk(true, f)).ok());
    // A malformed line is named too.
    const auto bad = WriteFile(dir, "bad.psk", "bob:xyz\n");
    auto b = TlsContext::Create(Psk(true, bad));
    QVERIFY(!b.ok());
    QVERIFY2(b.status().message().find("bad.psk:1") != std::string::npos, b.status().ToString().c_str());
  }

  // dstctl key generate's writer: identity:64 hex digits, 0600, no overwrite without force.
  void generatePskFile() {
    QTemporaryDir dir;
    const std::string f = dir.path().toStdString() + "/gen.psk";
    ::umask(022);
    QVERIFY(GeneratePskFile(f, "host-a", false).ok());
    struct stat st;
    QCOMPARE(::stat(f.c_str(), &st), 0);
    QCOMPARE(int(st.st_mode & 0777), 0600);
    auto r = LoadPskFile(f);
    QVERIFY(r.ok());
    QCOMPARE(r.value().size(), std::size_t(1));
    QCOMPARE(r.value()[0].identity, std::string("host-a"));
    QCOMPARE(r.value()[0].key.size(), std::size_t(32));
    Status again = GeneratePskFile(f, "host-a", false);
    QVERIFY(!again.ok());
    QCOMPARE(again.code(), Status::Code::kExists);
    QVERIFY(GeneratePskFile(f, "host-b", true).ok());
    auto r2 = LoadPskFile(f);
    QVERIFY(r2.ok() && r2.value()[0].identity == "host-b" && r2.value()[0].key != r.value()[0].key);
    // The access-list words are not identities: neither written nor loaded.
    for (const char* word : {"anonymous", "*"}) {
      QVERIFY(!GeneratePskFile(dir.path().toStdString() + "/w.psk", word, false).ok());
      const std::string w = dir.path().toStdString() + "/w2.psk";
      {
        std::ofstream o(w);
        o << word << ":" << std::string(64, 'a') << "\n";
      }
      ::chmod(w.c_str(), 0600);
      auto bad = LoadPskFile(w);
      QVERIFY(!bad.ok());
      QVERIFY2(bad.status().message().find("access-list words") != std::string::npos, bad.status().ToString().c_str());
    }
  }

  // Sends `ch` from `t` to accepted[0]; returns MiB/s (0: failed), *partial the calls that
  // stopped inside a frame.
  static double Stream(Fixture& fx, Transport* t, Frames& ch, std::uint64_t* partial) {
    std::vector<char> got(ch.WireBytes());
    Sender s{t, &ch};
    Reader r{fx.accepted[0].get(), &got};
    const auto t0 = std::chrono::steady_clock::now();
    r.Pump();
    s.Pump();
    if (!fx.RunUntil([&] { return (s.done() && r.got == got.size()) || s.failed || r.failed; }, std::chrono::seconds(60)))
      return 0;
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s.failed || r.failed || got != ch.Expected()) return 0;
    *partial = s.partial;
    return double(got.size()) / secs / 1048576.0;
  }

  // 64 MiB of frames through SendFrames, frames larger than the 64 KiB scratch buffer: every call
  // stops inside a frame (and some would block); the bytes arrive intact and in order.
  void largeStreamWithPartialWrites() {
    QTemporaryDir dir;
    Fixture fx;
    std::unique_ptr<Transport> t;
    QVERIFY(fx.PskPair(dir, &t));
    Frames ch(1024, 65536 - 7);  // ~64 MiB; frame sizes not aligned to records
    ch.Chain();
    std::uint64_t partial = 0;
    const double tls = Stream(fx, t.get(), ch, &partial);
    QVERIFY(tls > 0);
    QVERIFY(partial > 0);
    // Both ends share one loop thread here, so this is no transport comparison (that is
    // tls_daemon_test::throughputTlsVsPlain); it shows the stream is not pathologically slow.
    qInfo("64 MiB in 64 KiB frames through TLS 1.3 (PSK, AES-128-GCM), both ends on one loop thread: %.0f MiB/s", tls);
  }

  // Close() ends a receive in flight with operation_aborted exactly once, and hands its callback
  // to the loop: when the loop is destroyed before running it, what the callback holds is freed.
  // The owner here holds the transport and the callback holds the owner, as a client's does; the
  // callback used to stay in the connection, a cycle that leaked the whole client (LSan, a TLS
  // volume's dstd at exit).
  void closeEndsPendingReceive() {
    struct Owner {
      std::unique_ptr<Transport> t;
      char buf[16];
      int calls = 0;
      boost::system::error_code ec;
    };
    for (const bool run_loop : {true, false}) {
      std::weak_ptr<Owner> weak;
      int calls = -1;
      {
        QTemporaryDir dir;
        Fixture fx;
        std::unique_ptr<Transport> t;
        QVERIFY(fx.PskPair(dir, &t));
        auto owner = std::make_shared<Owner>();
        owner->t = std::move(t);
        weak = owner;
        Owner* o = owner.get();
        o->t->AsyncReadSome(asio::buffer(o->buf), [owner, &calls](const boost::system::error_code& ec, std::size_t) {
          owner->ec = ec;
          calls = ++owner->calls;
        });
        owner.reset();  // only the pending receive keeps the owner now
        fx.RunUntil([] { return false; }, std::chrono::milliseconds(50));
        QVERIFY(!weak.expired());
        QCOMPARE(calls, -1);  // nothing to read yet
        o->t->Close();
        if (run_loop) {
          QVERIFY(fx.RunUntil([&] { return calls >= 0; }));
          fx.RunUntil([] { return false; }, std::chrono::milliseconds(50));
          QCOMPARE(calls, 1);
        }
      }  // the fixture's io_context goes, with anything still posted
      QVERIFY2(weak.expired(), run_loop ? "owner leaked after its callback ran" : "owner leaked: the callback outlived the loop");
      if (!run_loop) QCOMPARE(calls, -1);
    }
  }

  // Steady state: many small frame round trips allocate nothing of ours (operator new: the
  // transport's buffers and handler memory are per connection).  OpenSSL 3.0's record layer
  // mallocs its WPACKET bookkeeping (40 bytes) for each record it writes or decrypts; that is
  // counted and bounded so a change in it shows up.
  void noAllocationPerIo() {
    QTemporaryDir dir;
    Fixture fx;
    std::unique_ptr<Transport> t;
    QVERIFY(fx.PskPair(dir, &t));
    Transport* srv = fx.accepted[0].get();
    Frames ch(1, 4096);
    std::vector<char> buf(ch.WireBytes());
    auto round = [&] {
      Sender s{t.get(), &ch};
      Reader r{srv, &buf};
      r.Pump();
      s.Pump();
      return fx.RunUntil([&] { return s.done() && r.got == buf.size(); });
    };
    for (int i = 0; i < 50; ++i) QVERIFY(round());  // warm up (Asio's per-thread caches)
    const std::uint64_t before = g_allocs.load(), crypto_before = g_crypto_allocs.load();
    const int ios = 2000;
    g_trace = true;
    for (int i = 0; i < ios; ++i)
      if (!round()) QFAIL("round trip failed");
    g_trace = false;
    const std::uint64_t allocs = g_allocs.load() - before;
    const std::uint64_t crypto = g_crypto_allocs.load() - crypto_before;
    qInfo("during %d TLS sends+receives of one record: %llu operator new, %llu OpenSSL mallocs (%.2f per I/O)",
          ios, (unsigned long long)allocs, (unsigned long long)crypto, double(crypto) / ios);
    QVERIFY2(allocs <= 8, qPrintable(QString("allocations: %1").arg(allocs)));
    QVERIFY2(crypto <= std::uint64_t(ios) * 6, qPrintable(QString("OpenSSL allocations: %1").arg(crypto)));
    QCOMPARE(dynamic_cast<TlsTransport*>(t.get())->arena_fallbacks(), 0ull);
  }

  // X.509: both sides verify against the CA, the client checks the pinned server name, each
  // side reports the other's CN.  A server certificate from another CA is refused.
  void x509MutualAuth() {
    QTemporaryDir dir;
    KeyPtr ca_key = NewKey();
    CertPtr ca = NewCert("lab-ca", ca_key.get(), nullptr, nullptr, 1);
    const auto ca_file = WriteFile(dir, "ca.crt", Pem(ca.get()), 0644);
    TlsConfig server = X509Config(dir, "dst-server", ca.get(), ca_key.get(), ca_file, true, 2);
    TlsConfig client = X509Config(dir, "client-a", ca.get(), ca_key.get(), ca_file, false, 3);
    client.server_name = "dst-server";
    {
      Fixture fx;
      QVERIFY(fx.Listen(MakeCtx(server)));
      std::unique_ptr<Transport> t;
      Status st = fx.Connect(MakeCtx(client), &t);
      QVERIFY2(st.ok(), st.ToString().c_str());
      QVERIFY(fx.RunUntil([&] { return fx.accepted.size() == 1; }));
      QCOMPARE(fx.accepted[0]->identity(), std::string("client-a"));
      QCOMPARE(t->identity(), std::string("dst-server"));
    }
    {  // the wrong pinned name
      Fixture fx;
      QVERIFY(fx.Listen(MakeCtx(server)));
      TlsConfig other = client;
      other.server_name = "someone-else";
      std::unique_ptr<Transport> t;
      Status st = fx.Connect(MakeCtx(other), &t);
      QVERIFY(!st.ok());
      QVERIFY2(st.message().find("certificate") != std::string::npos || st.message().find("hostname") != std::string::npos,
               st.ToString().c_str());
    }
    {  // a server certificate signed by another CA
      KeyPtr ca2_key = NewKey();
      CertPtr ca2 = NewCert("other-ca", ca2_key.get(), nullptr, nullptr, 10);
      const auto ca2_file = WriteFile(dir, "ca2.crt", Pem(ca2.get()), 0644);
      QTemporaryDir dir2;
      TlsConfig rogue = X509Config(dir2, "dst-server", ca2.get(), ca2_key.get(), ca2_file, true, 11);
      Fixture fx;
      QVERIFY(fx.Listen(MakeCtx(rogue)));
      std::unique_ptr<Transport> t;
      Status st = fx.Connect(MakeCtx(client), &t);
      QVERIFY(!st.ok());
      QVERIFY2(st.message().find("certificate") != std::string::npos, st.ToString().c_str());
      QVERIFY(fx.NothingAccepted(std::chrono::milliseconds(100)));
    }
    {  // a client certificate of another CA is refused by the server
      KeyPtr ca3_key = NewKey();
      CertPtr ca3 = NewCert("other-ca", ca3_key.get(), nullptr, nullptr, 20);
      QTemporaryDir dir3;
      const auto ca3_file = WriteFile(dir3, "ca3.crt", Pem(ca3.get()), 0644);
      TlsConfig intruder = X509Config(dir3, "client-x", ca3.get(), ca3_key.get(), ca_file, false, 21);
      intruder.server_name = "dst-server";
      Fixture fx;
      QVERIFY(fx.Listen(MakeCtx(server)));
      std::unique_ptr<Transport> t;
      (void)fx.Connect(MakeCtx(intruder), &t);
      QVERIFY(fx.NothingAccepted(std::chrono::milliseconds(300)));
    }
  }

  // A peer that opens TCP and says nothing is dropped at the handshake deadline.
  void handshakeDeadline() {
    QTemporaryDir dir;
    Fixture fx;
    QVERIFY(!fx.ListenPsk(dir, std::chrono::milliseconds(300)).empty());
    std::atomic<int> closed{0};
    std::thread client([&] {
      const int fd = test::DialLoopback(fx.port);
      char r[16];
      closed = ::recv(fd, r, sizeof r, 0) == 0 ? 1 : -1;
      ::close(fd);
    });
    QVERIFY(fx.RunUntil([&] { return closed.load() != 0; }, std::chrono::seconds(8)));
    client.join();
    QCOMPARE(closed.load(), 1);
  }
};

DST_TEST_MAIN(TlsTransportTest)
#include "tls_transport_test.moc"
