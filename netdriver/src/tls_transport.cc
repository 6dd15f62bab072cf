#include "dst/net/tls.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>

#include <boost/asio/bind_executor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <fmt/format.h>

#include "dst/log_escape.h"
#include "dst/net/export_access.h"
#include "server_alloc.h"

namespace dst::net {

namespace asio = boost::asio;
using Socket = TcpTransport::Socket;

namespace {

// The one TLS 1.3 suite a PSK session is bound to (the key is used with its hash, SHA-256).
constexpr unsigned char kAes128GcmSha256[] = {0x13, 0x01};
constexpr std::size_t kScratchBytes = 64 * 1024;  // plaintext gathered per SSL_write_ex
constexpr std::size_t kMaxHandshakes = 64;        // concurrent server handshakes per listener

// The newest OpenSSL error as text ("tlsv1 alert decrypt error"), and an empty queue.
std::string SslErrorText() {
  unsigned long e = ERR_peek_last_error();
  std::string s;
  if (e) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    const char* reason = ERR_reason_error_string(e);
    s = reason ? reason : buf;
  }
  ERR_clear_error();
  return s.empty() ? "connection closed" : s;
}

int HexDigit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

SSL_SESSION* MakePskSession(SSL* ssl, const std::vector<std::uint8_t>& key) {
  const SSL_CIPHER* cipher = SSL_CIPHER_find(ssl, kAes128GcmSha256);
  if (!cipher) return nullptr;
  SSL_SESSION* s = SSL_SESSION_new();
  if (!s) return nullptr;
  if (!SSL_SESSION_set1_master_key(s, key.data(), key.size()) || !SSL_SESSION_set_cipher(s, cipher) ||
      !SSL_SESSION_set_protocol_version(s, TLS1_3_VERSION)) {
    SSL_SESSION_free(s);
    return nullptr;
  }
  return s;
}

TlsContext* ContextOf(SSL* ssl) { return static_cast<TlsContext*>(SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl))); }

}  // namespace

// ------------------------------------------------------------------------------------------------
// Key files

Status CheckPrivateFile(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return Status::FromErrno(errno, path);
  if (st.st_mode & (S_IRWXG | S_IRWXO))
    return Status::InvalidArgument(fmt::format(
        "{} has mode {:04o}: a key file must not be accessible to the group or others (chmod 600 {})",
        path, st.st_mode & 07777, path));
  return Status::OK();
}

Result<std::vector<PskEntry>> LoadPskFile(const std::string& path) {
  DST_RETURN_IF_ERROR(CheckPrivateFile(path));
  std::ifstream in(path);
  if (!in) return Status::FromErrno(errno ? errno : EIO, path);
  std::vector<PskEntry> out;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
    if (line.empty() || line[0] == '#') continue;
    const auto colon = line.rfind(':');
    auto bad = [&](const char* why) {
      return Status::InvalidArgument(fmt::format("{}:{}: {} (expected identity:hexkey)", path, n, why));
    };
    if (colon == std::string::npos || colon == 0) return bad("no identity");
    PskEntry e;
    e.identity = line.substr(0, colon);
    if (e.identity == kAnonymousIdentity || e.identity == kAnyIdentity)
      return bad("\"anonymous\" and \"*\" are access-list words, not identities");
    const std::string hex = line.substr(colon + 1);
    if (hex.size() % 2 || hex.size() < 32 || hex.size() > 2 * SSL_MAX_MASTER_KEY_LENGTH)
      return bad("the key must be 16 to 48 bytes of hex");
    for (std::size_t i = 0; i < hex.size(); i += 2) {
      const int hi = HexDigit(hex[i]), lo = HexDigit(hex[i + 1]);
      if (hi < 0 || lo < 0) return bad("the key is not hex");
      e.key.push_back(std::uint8_t(hi * 16 + lo));
    }
    out.push_back(std::move(e));
  }
  if (out.empty()) return Status::InvalidArgument(path + ": no keys (expected identity:hexkey lines)");
  return out;
}

Status GeneratePskFile(const std::string& path, const std::string& identity, bool force) {
  if (identity.empty() || identity.find_first_of(":\n\r") != std::string::npos)
    return Status::InvalidArgument(fmt::format("bad identity \"{}\" (no ':' or line breaks)", identity));
  // They name unauthenticated peers and every identity in access lists (export_access.h).
  if (identity == kAnonymousIdentity || identity == kAnyIdentity)
    return Status::InvalidArgument(fmt::format("bad identity \"{}\" (a word of access lists)", identity));
  unsigned char key[32];
  if (RAND_bytes(key, sizeof key) != 1) return Status::IoError("RAND_bytes failed: " + SslErrorText());
  std::string text = identity + ":";
  for (unsigned char b : key) text += fmt::format("{:02x}", b);
  text += "\n";
  OPENSSL_cleanse(key, sizeof key);
  const int flags = O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW | (force ? O_TRUNC : O_EXCL);
  const int fd = ::open(path.c_str(), flags, 0600);
  if (fd < 0) {
    if (errno == EEXIST) return Status::Exists(path + " exists (--force overwrites it)");
    return Status::FromErrno(errno, path);
  }
  Status st;
  if (::fchmod(fd, 0600) != 0) st = Status::FromErrno(errno, path);  // --force: an old mode
  std::size_t done = 0;
  while (st.ok() && done < text.size()) {
    const ssize_t w = ::write(fd, text.data() + done, text.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) st = Status::FromErrno(errno, path);
    else done += std::size_t(w);
  }
  if (st.ok() && ::fsync(fd) != 0) st = Status::FromErrno(errno, path);
  OPENSSL_cleanse(text.data(), text.size());
  ::close(fd);
  return st;
}

// ------------------------------------------------------------------------------------------------
// TlsContext

namespace {

// Server: the client named `identity`; its key becomes the session's (TLS 1.3 external PSK).
int FindPskSession(SSL* ssl, const unsigned char* id, std::size_t idlen, SSL_SESSION** sess) {
  *sess = nullptr;
  const std::string identity(reinterpret_cast<const char*>(id), idlen);
  const PskEntry* e = ContextOf(ssl)->FindPsk(identity);
  if (!e) return 1;  // unknown: no PSK, and without a certificate the handshake fails
  *sess = MakePskSession(ssl, e->key);
  if (!*sess) return 0;
  if (auto* who = static_cast<std::string*>(SSL_get_app_data(ssl))) *who = identity;
  return 1;
}

// Client: offers its one identity.  `md` is set on a retry after HelloRetryRequest: then only a
// session with that hash fits.
int UsePskSession(SSL* ssl, const EVP_MD* md, const unsigned char** id, std::size_t* idlen, SSL_SESSION** sess) {
  *sess = nullptr;
  const PskEntry* e = ContextOf(ssl)->client_psk();
  const SSL_CIPHER* cipher = SSL_CIPHER_find(ssl, kAes128GcmSha256);
  if (!e || !cipher) return 0;
  if (md && md != SSL_CIPHER_get_handshake_digest(cipher)) return 1;
  *sess = MakePskSession(ssl, e->key);
  if (!*sess) return 0;
  *id = reinterpret_cast<const unsigned char*>(e->identity.data());
  *idlen = e->identity.size();
  if (auto* who = static_cast<std::string*>(SSL_get_app_data(ssl))) *who = e->identity;
  return 1;
}

}  // namespace

TlsContext::~TlsContext() {
  SSL_CTX_free(static_cast<SSL_CTX*>(ctx_));
  for (auto& p : psks_) OPENSSL_cleanse(p.key.data(), p.key.size());
}

const PskEntry* TlsContext::FindPsk(const std::string& identity) const {
  for (const auto& p : psks_)
    if (p.identity == identity) return &p;
  return nullptr;
}

Result<std::shared_ptr<TlsContext>> TlsContext::Create(const TlsConfig& cfg) {
  std::shared_ptr<TlsContext> tc(new TlsContext());
  tc->cfg_ = cfg;
  if (cfg.psk_file.empty() && (cfg.cert_file.empty() || cfg.key_file.empty() || cfg.ca_file.empty()))
    return Status::InvalidArgument("TLS needs a PSK file, or a certificate, its key and a CA");
  if (!cfg.psk_file.empty()) {
    auto r = LoadPskFile(cfg.psk_file);
    if (!r.ok()) return r.status();
    tc->psks_ = std::move(r).value();
    if (!cfg.server) {
      if (!cfg.psk_identity.empty()) {
        const PskEntry* e = tc->FindPsk(cfg.psk_identity);
        if (!e)
          return Status::InvalidArgument(
              fmt::format("{}: no key for identity \"{}\"", cfg.psk_file, cfg.psk_identity));
        PskEntry keep = *e;
        tc->psks_.assign(1, std::move(keep));
      }
      tc->psks_.resize(1);
    }
  } else {
    DST_RETURN_IF_ERROR(CheckPrivateFile(cfg.key_file));
  }

  SSL_CTX* ctx = SSL_CTX_new(cfg.server ? TLS_server_method() : TLS_client_method());
  if (!ctx) return Status::IoError("SSL_CTX_new: " + SslErrorText());
  tc->ctx_ = ctx;
  SSL_CTX_set_app_data(ctx, tc.get());
  // TLS 1.3 only; no 0-RTT (replayable), no tickets (a resumed session would skip the PSK or
  // certificate check this file describes), no renegotiation.
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET | SSL_OP_NO_RENEGOTIATION | SSL_OP_IGNORE_UNEXPECTED_EOF);
  SSL_CTX_set_num_tickets(ctx, 0);
  SSL_CTX_set_max_early_data(ctx, 0);
  SSL_CTX_set_recv_max_early_data(ctx, 0);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  // Whole records per recv(): fewer system calls.  Safe with the readiness logic below, which
  // always drains SSL_read_ex until it wants the socket.
  SSL_CTX_set_read_ahead(ctx, 1);
  SSL_CTX_set_default_read_buffer_len(ctx, 64 * 1024);

  if (tc->psk()) {
    // The PSK is bound to SHA-256: offer only the suites that use it.
    if (!SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256"))
      return Status::IoError("ciphersuites: " + SslErrorText());
    if (cfg.server) {
      SSL_CTX_set_psk_find_session_callback(ctx, FindPskSession);
    } else {
      SSL_CTX_set_psk_use_session_callback(ctx, UsePskSession);
      // No CA: a server that answers with a certificate instead of the PSK is refused.
      SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
    }
    return tc;
  }
  if (SSL_CTX_use_certificate_chain_file(ctx, cfg.cert_file.c_str()) != 1)
    return Status::InvalidArgument(cfg.cert_file + ": " + SslErrorText());
  if (SSL_CTX_use_PrivateKey_file(ctx, cfg.key_file.c_str(), SSL_FILETYPE_PEM) != 1)
    return Status::InvalidArgument(cfg.key_file + ": " + SslErrorText());
  if (SSL_CTX_check_private_key(ctx) != 1)
    return Status::InvalidArgument(cfg.key_file + ": does not match " + cfg.cert_file);
  if (SSL_CTX_load_verify_locations(ctx, cfg.ca_file.c_str(), nullptr) != 1)
    return Status::InvalidArgument(cfg.ca_file + ": " + SslErrorText());
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  return tc;
}

// ------------------------------------------------------------------------------------------------
// TlsTransport
//
// Every operation first asks OpenSSL (which may hold decrypted or read-ahead bytes) and waits on
// the socket only when OpenSSL says it wants it (SSL_ERROR_WANT_READ / _WRITE).  Completions are
// posted to the strand, never run inside the initiating call.

struct TlsTransport::Conn : std::enable_shared_from_this<Conn> {
  Conn(std::shared_ptr<TlsContext> c, std::unique_ptr<TcpTransport> t)
      : ctx(std::move(c)), tcp(std::move(t)), strand(tcp->strand()) {}
  ~Conn() {
    if (ssl) SSL_free(ssl);
  }

  std::shared_ptr<TlsContext> ctx;
  std::unique_ptr<TcpTransport> tcp;
  Strand strand;
  SSL* ssl = nullptr;
  std::string identity;
  detail::HandlerArena arena;
  bool read_shut = false;
  bool closed = false;

  // The one receive in flight.
  char* rd_buf = nullptr;
  std::size_t rd_len = 0, rd_got = 0;
  bool rd_exact = false;
  IoCallback rd_cb;
  // The one AsyncWrite in flight.
  const char* wr_buf = nullptr;
  std::size_t wr_len = 0, wr_done = 0;
  IoCallback wr_cb;
  // What the last SendFrames' SSL_write_ex waited for (AsyncWaitWritable waits on it).
  int send_want = SSL_ERROR_WANT_WRITE;

  std::unique_ptr<char[]> scratch;
  static constexpr int kMaxIov = 1024;
  struct iovec iov[kMaxIov];

  Socket& sock() { return tcp->socket(); }

  template <typename F>
  void Wait(int want, F&& f) {
    sock().async_wait(want == SSL_ERROR_WANT_READ ? Socket::wait_read : Socket::wait_write,
                      detail::Bind(&arena, strand, std::forward<F>(f)));
  }

  // A failed SSL call as an error code (the text goes to nobody: the protocols log the code).
  static boost::system::error_code ErrorOf(int err) {
    ERR_clear_error();
    if (err == SSL_ERROR_ZERO_RETURN) return asio::error::eof;
    if (err == SSL_ERROR_SYSCALL && errno == 0) return asio::error::eof;
    return asio::error::connection_reset;
  }

  // `direct`: we run in a completion handler already, so the callback may run now (one strand
  // hop per receive instead of two); otherwise it is posted.
  void FinishRead(const boost::system::error_code& ec, bool direct) {
    if (direct) {
      IoCallback cb = std::move(rd_cb);
      if (cb) cb(ec, rd_got);
      return;
    }
    asio::post(strand, detail::Bind(&arena, strand, [self = shared_from_this(), ec] {
                 IoCallback cb = std::move(self->rd_cb);
                 if (cb) cb(ec, self->rd_got);
               }));
  }

  void DoRead(bool direct) {
    auto FinishRead = [this, direct](const boost::system::error_code& ec) { this->FinishRead(ec, direct); };
    if (read_shut || closed) return FinishRead(asio::error::eof);
    for (;;) {
      std::size_t n = 0;
      ERR_clear_error();
      const int r = SSL_read_ex(ssl, rd_buf + rd_got, rd_len - rd_got, &n);
      if (r == 1) {
        rd_got += n;
        if (rd_got == rd_len) return FinishRead({});
        continue;
      }
      const int err = SSL_get_error(ssl, r);
      if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
        if (rd_got > 0 && !rd_exact) return FinishRead({});
        return Wait(err, [self = shared_from_this()](const boost::system::error_code& ec) {
          if (ec) return self->FinishRead(ec, true);
          self->DoRead(true);
        });
      }
      if (rd_got > 0 && !rd_exact && err == SSL_ERROR_ZERO_RETURN) return FinishRead({});
      return FinishRead(ErrorOf(err));
    }
  }

  void StartRead(asio::mutable_buffer buf, bool exact, IoCallback done) {
    rd_buf = static_cast<char*>(buf.data());
    rd_len = buf.size();
    rd_got = 0;
    rd_exact = exact;
    rd_cb = std::move(done);
    if (rd_len == 0) return FinishRead({}, false);
    DoRead(false);
  }

  void FinishWrite(const boost::system::error_code& ec, bool direct) {
    if (direct) {
      IoCallback cb = std::move(wr_cb);
      if (cb) cb(ec, wr_done);
      return;
    }
    asio::post(strand, detail::Bind(&arena, strand, [self = shared_from_this(), ec] {
                 IoCallback cb = std::move(self->wr_cb);
                 if (cb) cb(ec, self->wr_done);
               }));
  }

  void DoWrite(bool direct) {
    auto FinishWrite = [this, direct](const boost::system::error_code& ec) { this->FinishWrite(ec, direct); };
    if (closed) return FinishWrite(asio::error::operation_aborted);
    while (wr_done < wr_len) {
      std::size_t n = 0;
      ERR_clear_error();
      const int r = SSL_write_ex(ssl, wr_buf + wr_done, wr_len - wr_done, &n);
      if (r == 1) {
        wr_done += n;
        continue;
      }
      const int err = SSL_get_error(ssl, r);
      if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE)
        return Wait(err, [self = shared_from_this()](const boost::system::error_code& ec) {
          if (ec) return self->FinishWrite(ec, true);
          self->DoWrite(true);
        });
      return FinishWrite(err == SSL_ERROR_ZERO_RETURN ? asio::error::broken_pipe : ErrorOf(err));
    }
    FinishWrite({});
  }
};

TlsTransport::TlsTransport(std::shared_ptr<Conn> c) : c_(std::move(c)) {}

TlsTransport::~TlsTransport() { Close(); }

const Strand& TlsTransport::strand() const { return c_->strand; }
bool TlsTransport::is_open() const { return !c_->closed && c_->tcp->is_open(); }
const std::string& TlsTransport::peer() const { return c_->tcp->peer(); }
const std::string& TlsTransport::identity() const { return c_->identity; }
std::uint64_t TlsTransport::arena_fallbacks() const { return c_->arena.fallbacks() + c_->tcp->arena_fallbacks(); }

std::size_t TlsTransport::SendFrames(const TxFrame* head, std::size_t offset, const SendLimits& lim,
                                     boost::system::error_code& ec) {
  ec.clear();
  Conn& c = *c_;
  if (c.closed) {
    ec = asio::error::broken_pipe;
    return 0;
  }
  // Gather up to kScratchBytes of plaintext.  After a would-block the caller offers the same
  // frames from the same offset again, so the bytes OpenSSL may hold from the refused call are
  // the start of the new buffer, as SSL_write requires.
  SendLimits l = lim;
  if (l.max_bytes > kScratchBytes) l.max_bytes = kScratchBytes;
  std::size_t bytes = 0;
  const int n = GatherFrames(head, offset, l, c.iov, Conn::kMaxIov, &bytes);
  if (n == 0 || bytes == 0) return 0;
  std::size_t len = 0;
  for (int i = 0; i < n && len < kScratchBytes; ++i) {
    const std::size_t take = std::min(c.iov[i].iov_len, kScratchBytes - len);
    std::memcpy(c.scratch.get() + len, c.iov[i].iov_base, take);
    len += take;
  }
  // With partial writes each SSL_write_ex sends at most one record: loop until the socket is
  // full.  A record OpenSSL has built but not sent yet holds the next bytes of this buffer,
  // which is where the caller's next SendFrames starts.
  std::size_t taken = 0;
  while (taken < len) {
    std::size_t written = 0;
    ERR_clear_error();
    const int r = SSL_write_ex(c.ssl, c.scratch.get() + taken, len - taken, &written);
    if (r == 1) {
      taken += written;
      continue;
    }
    const int err = SSL_get_error(c.ssl, r);
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
      c.send_want = err;
      if (taken == 0) ec = asio::error::would_block;
      return taken;
    }
    if (taken == 0) ec = err == SSL_ERROR_ZERO_RETURN ? asio::error::broken_pipe : Conn::ErrorOf(err);
    return taken;
  }
  return taken;
}

void TlsTransport::AsyncWaitWritable(IoCallback done) {
  c_->Wait(c_->send_want, [keep = c_, cb = std::move(done)](const boost::system::error_code& ec) mutable {
    cb(ec, 0);
  });
}

void TlsTransport::AsyncReadSome(asio::mutable_buffer buf, IoCallback done) { c_->StartRead(buf, false, std::move(done)); }

void TlsTransport::AsyncRead(asio::mutable_buffer buf, IoCallback done) { c_->StartRead(buf, true, std::move(done)); }

void TlsTransport::AsyncWrite(asio::const_buffer buf, IoCallback done) {
  c_->wr_buf = static_cast<const char*>(buf.data());
  c_->wr_len = buf.size();
  c_->wr_done = 0;
  c_->wr_cb = std::move(done);
  c_->DoWrite(false);
}

void TlsTransport::Shutdown(ShutdownHow how) {
  // A pending read wakes up (the socket turns readable at shutdown) and sees read_shut.
  c_->read_shut = true;
  c_->tcp->Shutdown(how);
}

void TlsTransport::Close() {
  Conn& c = *c_;
  if (c.closed) return;
  c.closed = true;
  // The receive and write in flight end like a socket's: operation_aborted, posted.  Their
  // callbacks move into the posted handler instead of staying in the Conn: a callback usually
  // owns (through its owner) this transport, so if the loop stops before the handler runs,
  // destroying the handler must free them, or owner -> transport -> Conn -> callback -> owner
  // is a cycle nothing frees (a client dstd leaked its whole TLS volume at exit that way).  The
  // cancelled socket wait still runs, finds no callback and does nothing.
  if (c.rd_cb || c.wr_cb) {
    asio::post(c.strand, [rd = std::move(c.rd_cb), got = c.rd_got, wr = std::move(c.wr_cb), done = c.wr_done]() mutable {
      if (rd) rd(asio::error::operation_aborted, got);
      if (wr) wr(asio::error::operation_aborted, done);
    });
    c.rd_cb.Reset();
    c.wr_cb.Reset();
  }
  // close_notify if the socket takes it now; the peer treats a bare EOF the same anyway.
  if (c.tcp->is_open() && SSL_is_init_finished(c.ssl)) {
    ERR_clear_error();
    SSL_shutdown(c.ssl);
    ERR_clear_error();
  }
  c.tcp->Close();
}

// ------------------------------------------------------------------------------------------------
// Handshake

namespace {

struct Handshake : std::enable_shared_from_this<Handshake> {
  std::shared_ptr<TlsTransport::Conn> c;
  HandshakeCallback done;
  asio::steady_timer timer;
  std::string peer;

  Handshake(std::shared_ptr<TlsTransport::Conn> conn, HandshakeCallback d)
      : c(std::move(conn)), done(std::move(d)), timer(c->strand), peer(c->tcp->peer()) {}

  void Finish(Status st) {
    if (!done) return;
    HandshakeCallback cb = std::move(done);
    done = nullptr;
    timer.cancel();
    if (!st.ok()) {
      c->closed = true;
      c->tcp->Close();
      return cb(std::move(st), nullptr);
    }
    cb(Status::OK(), std::make_unique<TlsTransport>(c));
  }

  void Step() {
    if (!done) return;
    ERR_clear_error();
    const int r = SSL_do_handshake(c->ssl);
    if (r == 1) {
      if (c->identity.empty()) {  // X.509: the peer certificate's CN
        if (X509* cert = SSL_get0_peer_certificate(c->ssl)) {
          char cn[256] = {};
          if (X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, cn, sizeof cn) > 0)
            c->identity = cn;
        }
      }
      return Finish(Status::OK());
    }
    const int err = SSL_get_error(c->ssl, r);
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
      c->sock().async_wait(err == SSL_ERROR_WANT_READ ? Socket::wait_read : Socket::wait_write,
                           asio::bind_executor(c->strand, [self = shared_from_this()](const boost::system::error_code& ec) {
                             if (ec) return self->Finish(Status::Unavailable("TLS handshake with " + self->peer + ": " + ec.message()));
                             self->Step();
                           }));
      return;
    }
    std::string why = SslErrorText();
    const long verify = SSL_get_verify_result(c->ssl);
    if (verify != X509_V_OK) why += std::string(" (") + X509_verify_cert_error_string(verify) + ")";
    Finish(Status::Unavailable("TLS handshake with " + peer + " failed: " + why));
  }
};

}  // namespace

void AsyncTlsHandshake(std::shared_ptr<TlsContext> ctx, std::unique_ptr<TcpTransport> tcp, const std::string& host,
                       std::chrono::milliseconds timeout, HandshakeCallback done) {
  auto c = std::make_shared<TlsTransport::Conn>(ctx, std::move(tcp));
  c->scratch.reset(new char[kScratchBytes]);
  const std::string peer = c->tcp->peer();
  SSL* ssl = SSL_new(static_cast<SSL_CTX*>(ctx->native()));
  auto fail = [&](const std::string& what) {
    c->tcp->Close();
    asio::post(c->strand, [done = std::move(done), st = Status::IoError(what + ": " + SslErrorText())] { done(st, nullptr); });
  };
  if (!ssl) return fail("SSL_new");
  c->ssl = ssl;
  // OpenSSL does the socket's reads and writes itself: they must never block the loop.
  boost::system::error_code nb;
  c->tcp->socket().non_blocking(true, nb);
  if (nb) return fail("non-blocking socket: " + nb.message());
  SSL_set_app_data(ssl, &c->identity);
  if (!SSL_set_fd(ssl, c->tcp->native_handle())) return fail("SSL_set_fd");
  const TlsConfig& cfg = ctx->config();
  if (cfg.server) {
    SSL_set_accept_state(ssl);
  } else {
    SSL_set_connect_state(ssl);
    if (!ctx->psk()) {
      const std::string name = cfg.server_name.empty() ? host : cfg.server_name;
      unsigned char ip[16];
      const bool is_ip = inet_pton(AF_INET, name.c_str(), ip) == 1 || inet_pton(AF_INET6, name.c_str(), ip) == 1;
      X509_VERIFY_PARAM* param = SSL_get0_param(ssl);
      X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
      const int ok = is_ip ? X509_VERIFY_PARAM_set1_ip_asc(param, name.c_str())
                           : X509_VERIFY_PARAM_set1_host(param, name.c_str(), name.size());
      if (!ok) return fail("server name " + name);
      if (!is_ip) SSL_set_tlsext_host_name(ssl, name.c_str());
    }
  }
  auto hs = std::make_shared<Handshake>(c, std::move(done));
  hs->timer.expires_after(timeout);
  hs->timer.async_wait([hs](const boost::system::error_code& ec) {
    if (!ec) hs->Finish(Status::TimedOut("TLS handshake with " + hs->peer + ": timed out"));
  });
  asio::post(c->strand, [hs] { hs->Step(); });
}

void AsyncTlsUpgrade(std::shared_ptr<TlsContext> ctx, std::unique_ptr<Transport> plain, const std::string& host,
                     std::chrono::milliseconds timeout, HandshakeCallback done) {
  auto* tcp = dynamic_cast<TcpTransport*>(plain.get());
  if (!tcp) {
    const Strand strand = plain->strand();
    plain->Close();
    asio::post(strand, [done = std::move(done)] {
      done(Status::InvalidArgument("TLS needs a TCP connection underneath"), nullptr);
    });
    return;
  }
  plain.release();
  AsyncTlsHandshake(std::move(ctx), std::unique_ptr<TcpTransport>(tcp), host, timeout, std::move(done));
}

// ------------------------------------------------------------------------------------------------
// TlsListener

struct TlsListener::State : std::enable_shared_from_this<State> {
  State(std::unique_ptr<Listener> l, std::shared_ptr<TlsContext> c, Strand e)
      : inner(std::move(l)), ctx(std::move(c)), ex(std::move(e)) {}

  std::unique_ptr<Listener> inner;
  std::shared_ptr<TlsContext> ctx;
  Strand ex;
  bool accepting = false;
  bool closed = false;
  std::size_t handshaking = 0;
  AcceptCallback waiting;
  std::deque<std::unique_ptr<Transport>> ready;

  void Deliver() {
    if (!waiting || ready.empty()) return;
    AcceptCallback cb = std::move(waiting);
    waiting = nullptr;
    auto t = std::move(ready.front());
    ready.pop_front();
    cb({}, std::move(t));
  }

  // Keeps one inner accept running while open and under the handshake cap.
  void Pump() {
    if (accepting || closed || handshaking >= kMaxHandshakes) return;
    accepting = true;
    inner->AsyncAccept([self = shared_from_this()](const boost::system::error_code& ec, std::unique_ptr<Transport> t) {
      self->accepting = false;
      if (self->closed) return;
      if (ec) {  // EMFILE and friends: the server backs off and asks again
        if (self->waiting) {
          AcceptCallback cb = std::move(self->waiting);
          self->waiting = nullptr;
          cb(ec, nullptr);
        }
        return;
      }
      std::unique_ptr<TcpTransport> tcp(dynamic_cast<TcpTransport*>(t.get()));
      if (!tcp) return self->Pump();  // not TCP: nothing to layer TLS on
      t.release();
      ++self->handshaking;
      AsyncTlsHandshake(self->ctx, std::move(tcp), std::string(), self->ctx->config().handshake_timeout,
                        [self](Status st, std::unique_ptr<TlsTransport> tls) {
                          asio::post(self->ex, [self, st = std::move(st), tls = std::move(tls)]() mutable {
                            --self->handshaking;
                            if (!st.ok()) {
                              std::fprintf(stderr, "dst: tls: %s\n", EscapeForLog(st.message()).c_str());
                            } else if (!self->closed) {
                              self->ready.push_back(std::move(tls));
                              self->Deliver();
                            }
                            self->Pump();
                          });
                        });
      self->Pump();
    });
  }
};

TlsListener::TlsListener(std::unique_ptr<Listener> inner, std::shared_ptr<TlsContext> ctx, Strand ex)
    : inner_name_(inner->local_name()) {
  s_ = std::make_shared<State>(std::move(inner), std::move(ctx), std::move(ex));
}

TlsListener::~TlsListener() { Close(); }

void TlsListener::AsyncAccept(AcceptCallback done) {
  if (s_->closed) {
    asio::post(s_->ex, [done = std::move(done)] { done(asio::error::operation_aborted, nullptr); });
    return;
  }
  s_->waiting = std::move(done);
  s_->Deliver();
  s_->Pump();
}

void TlsListener::Close() {
  if (s_->closed) return;
  s_->closed = true;
  s_->inner->Close();
  s_->ready.clear();
  if (s_->waiting) {
    AcceptCallback cb = std::move(s_->waiting);
    s_->waiting = nullptr;
    asio::post(s_->ex, [cb = std::move(cb)] { cb(asio::error::operation_aborted, nullptr); });
  }
}

ListenerFactory MakeTlsListenerFactory(asio::io_context& io, std::shared_ptr<TlsContext> ctx, std::string address,
                                       std::uint16_t port, std::shared_ptr<std::uint16_t> bound_port,
                                       std::shared_ptr<Status> error) {
  return [&io, ctx, address, port, bound_port, error](const Strand& ex) -> std::unique_ptr<Listener> {
    auto l = TcpListener::Open(io, ex, address, port);
    if (!l.ok()) {
      if (error) *error = l.status();
      return nullptr;
    }
    if (bound_port) *bound_port = l.value()->port();
    return std::make_unique<TlsListener>(std::move(l).value(), ctx, ex);
  };
}

// ------------------------------------------------------------------------------------------------
// TlsConnector

TlsConnector::TlsConnector(std::unique_ptr<TcpConnector> inner, std::shared_ptr<TlsContext> ctx, std::string host)
    : inner_(std::move(inner)), ctx_(std::move(ctx)), host_(std::move(host)) {}

TlsConnector::~TlsConnector() { Cancel(); }

void TlsConnector::AsyncConnect(std::chrono::milliseconds timeout, ConnectCallback done) {
  live_ = std::make_shared<bool>(true);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  inner_->AsyncConnect(timeout, [ctx = ctx_, host = host_, live = live_, deadline, done = std::move(done)](
                                    Status st, std::unique_ptr<Transport> t) mutable {
    if (!*live) return;
    if (!st.ok()) return done(std::move(st), nullptr);
    std::unique_ptr<TcpTransport> tcp(dynamic_cast<TcpTransport*>(t.release()));
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left < std::chrono::milliseconds(1)) left = std::chrono::milliseconds(1);
    AsyncTlsHandshake(ctx, std::move(tcp), host, left,
                      [live, done = std::move(done)](Status s, std::unique_ptr<TlsTransport> tls) {
                        if (!*live) return;
                        done(std::move(s), std::move(tls));
                      });
  });
}

void TlsConnector::Cancel() {
  if (live_) *live_ = false;
  inner_->Cancel();
}

}  // namespace dst::net
