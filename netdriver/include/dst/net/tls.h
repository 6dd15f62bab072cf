// TLS 1.3 for the Transport seam (transport.h), with OpenSSL 3.
//
// The DST protocol runs inside TLS from the connection's first byte: no plaintext negotiation,
// nothing to downgrade.  NBD upgrades after its plain-text greeting (STARTTLS, AsyncTlsUpgrade).  TLS 1.3 only, no 0-RTT, no session tickets.
// Peers authenticate with either
//   * a pre-shared key: a key file of `identity:hexkey` lines, the format nbdkit and libnbd
//     (GnuTLS psktool) use.  A server accepts every identity in its file, a client offers one; or
//   * X.509: a certificate and key of our own and a CA that signed the peer's.  Both sides
//     verify; the client also checks the server's name (the dialled host or a pinned name).
// Key files (the PSK file, the X.509 key) that the group or others may read are refused.
//
// TlsTransport: one connection after its handshake, over a TcpTransport's socket.  SendFrames
// gathers the frame list into a per-connection scratch buffer and encrypts it with one
// SSL_write_ex (records of up to 16 KiB); receives decrypt into the caller's buffer.  Readiness
// comes from Asio waits on the socket, bound to the connection's strand and handler arena, so
// steady-state I/O allocates nothing.  identity() names the authenticated peer.
//
// TlsListener wraps a listener of TCP transports: each accepted connection runs the server
// handshake (with a deadline) before the server sees it; a failed handshake is logged and
// dropped.  Handshakes run concurrently, so one slow peer does not hold up the others.
// TlsConnector wraps a TCP connector: connect, then the client handshake, both within the
// connect timeout.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dst/net/tcp_transport.h"
#include "dst/net/transport.h"
#include "dst/status.h"

namespace dst::net {

struct TlsConfig {
  bool server = false;
  // PSK: a key file of `identity:hexkey` lines.  A client offers `psk_identity` (empty: the
  // file's first line).
  std::string psk_file;
  std::string psk_identity;
  // X.509 (when psk_file is empty): our certificate chain and key (PEM), the CA that signed the
  // peer's certificate.
  std::string cert_file;
  std::string key_file;
  std::string ca_file;
  // Client, X.509: the name the server's certificate must carry; empty: the dialled host.
  std::string server_name;
  std::chrono::milliseconds handshake_timeout{10000};
};

// One `identity:hexkey` line of a PSK file.
struct PskEntry {
  std::string identity;
  std::vector<std::uint8_t> key;
};

// Refuses (InvalidArgument naming the file and its mode) a file the group or others may access.
Status CheckPrivateFile(const std::string& path);
// Reads a PSK file (CheckPrivateFile first).  Blank lines and '#' comments are skipped; keys are
// 16..48 bytes of hex (TLS 1.3 PSKs longer than 48 bytes do not fit OpenSSL sessions).
Result<std::vector<PskEntry>> LoadPskFile(const std::string& path);
// Writes a new PSK file "identity:<64 hex digits>" (32 random bytes) with mode 0600.  Refuses
// an existing file unless `force`.
Status GeneratePskFile(const std::string& path, const std::string& identity, bool force);

// An SSL_CTX set up from a TlsConfig.  Shared by all connections of a listener or client.
class TlsContext {
 public:
  static Result<std::shared_ptr<TlsContext>> Create(const TlsConfig& cfg);
  ~TlsContext();
  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;

  const TlsConfig& config() const { return cfg_; }
  bool psk() const { return !cfg_.psk_file.empty(); }
  // The PSK for `identity` (server) or null.
  const PskEntry* FindPsk(const std::string& identity) const;
  const PskEntry* client_psk() const { return psks_.empty() ? nullptr : &psks_.front(); }
  void* native() const { return ctx_; }  // SSL_CTX*

 private:
  TlsContext() = default;
  TlsConfig cfg_;
  void* ctx_ = nullptr;
  std::vector<PskEntry> psks_;  // server: all; client: the one it offers
};

class TlsTransport final : public Transport {
 public:
  struct Conn;  // shared with pending operations (tls_transport.cc)

  explicit TlsTransport(std::shared_ptr<Conn> c);
  ~TlsTransport() override;

  const Strand& strand() const override;
  std::size_t SendFrames(const TxFrame* head, std::size_t offset, const SendLimits& lim,
                         boost::system::error_code& ec) override;
  void AsyncWaitWritable(IoCallback done) override;
  void AsyncReadSome(boost::asio::mutable_buffer buf, IoCallback done) override;
  void AsyncRead(boost::asio::mutable_buffer buf, IoCallback done) override;
  void AsyncWrite(boost::asio::const_buffer buf, IoCallback done) override;
  void Shutdown(ShutdownHow how) override;
  void Close() override;
  bool is_open() const override;
  const std::string& peer() const override;
  // The authenticated peer: its PSK identity or its certificate's subject CN.
  const std::string& identity() const override;

  // Handler-arena fallbacks to the heap (0 in steady state).
  std::uint64_t arena_fallbacks() const;

 private:
  std::shared_ptr<Conn> c_;
};

// Runs the TLS handshake on a connected TCP transport; done runs on the transport's strand.
// `host` is the dialled host (clients check it against the server certificate).
using HandshakeCallback = std::function<void(Status, std::unique_ptr<TlsTransport>)>;
void AsyncTlsHandshake(std::shared_ptr<TlsContext> ctx, std::unique_ptr<TcpTransport> tcp,
                       const std::string& host, std::chrono::milliseconds timeout,
                       HandshakeCallback done);

// The same on a connection that has spoken plain text first (NBD's STARTTLS): `plain` must be a
// TcpTransport (else InvalidArgument) with no operation outstanding and nothing it has read but
// not delivered.  Bytes the peer sent after its last plain-text message are fed to the
// handshake, so plain text pipelined behind STARTTLS fails it instead of being read as
// protected data.  The role (server or client) is the context's.
void AsyncTlsUpgrade(std::shared_ptr<TlsContext> ctx, std::unique_ptr<Transport> plain, const std::string& host,
                     std::chrono::milliseconds timeout, HandshakeCallback done);

class TlsListener final : public Listener {
 public:
  // `inner` yields TcpTransports (a TcpListener); it runs on `ex`, as do our callbacks.
  TlsListener(std::unique_ptr<Listener> inner, std::shared_ptr<TlsContext> ctx, Strand ex);
  ~TlsListener() override;

  void AsyncAccept(AcceptCallback done) override;
  void Close() override;
  std::string local_name() const override { return inner_name_; }

  struct State;

 private:
  std::shared_ptr<State> s_;
  std::string inner_name_;
};

// A ListenerFactory for a server: a TcpListener on address:port wrapped in a TlsListener.
// *port gets the bound port, *error a failure to listen (the factory then returns null).
ListenerFactory MakeTlsListenerFactory(boost::asio::io_context& io, std::shared_ptr<TlsContext> ctx,
                                       std::string address, std::uint16_t port,
                                       std::shared_ptr<std::uint16_t> bound_port,
                                       std::shared_ptr<Status> error);

class TlsConnector final : public Connector {
 public:
  TlsConnector(std::unique_ptr<TcpConnector> inner, std::shared_ptr<TlsContext> ctx, std::string host);
  ~TlsConnector() override;

  void AsyncConnect(std::chrono::milliseconds timeout, ConnectCallback done) override;
  void Cancel() override;
  std::string target() const override { return inner_->target(); }

 private:
  std::unique_ptr<TcpConnector> inner_;
  std::shared_ptr<TlsContext> ctx_;
  std::string host_;
  std::shared_ptr<bool> live_;  // cleared by Cancel(): a running handshake's result is dropped
};

}  // namespace dst::net
