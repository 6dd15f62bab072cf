// A scriptable hostile server for the DST and NBD clients (issue 11 item 5).  It listens on
// 127.0.0.1 and runs a test-supplied script on a thread per accepted connection.  The script
// drives the connection with the helpers below: enough of each protocol (docs/protocol.md,
// docs/nbd.md) to bring a client into a phase, then raw bytes, wrong lengths, unknown handles,
// silence or a close, whatever the case needs.
//
//   HostileServer srv([](HostilePeer& p, int conn) {
//     if (!p.DstHello(Hello(1 << 20))) return;
//     net::Header h;
//     if (!p.DstReadRequest(&h)) return;
//     p.DstReply(h, 0, std::string(h.length - 1, 'x'));  // a READ reply one byte short
//   });
//
// Blocking I/O with a short poll, so every helper returns (false) once the peer closed or the
// server is being destroyed; the destructor joins every thread.  Loopback only.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "dst/net/codec.h"
#include "dst/net/nbd_format.h"

namespace dst::test {

class HostilePeer {
 public:
  HostilePeer(int fd, const std::atomic<bool>* stop) : fd_(fd), stop_(stop) {}

  // --- raw bytes ---
  bool Read(void* buf, std::size_t n);  // exactly n bytes; false on EOF, error or stop
  bool Write(std::string_view bytes);
  // Never answers again: waits (discarding what arrives) until the client closes or the
  // server stops.
  void Hold();
  // Waits until the client closes (EOF) for at most `ms`; true if it did.
  bool WaitClosed(int ms);
  std::uint64_t bytes_read() const { return read_; }

  // --- DST (docs/protocol.md) ---
  // Reads the HELLO request and answers it with `reply`.
  bool DstHello(const net::HelloReply& reply, net::HelloRequest* got = nullptr);
  // Reads one request header (and drops a WRITE's payload).
  bool DstReadRequest(net::Header* h);
  // Sends a reply frame to `req` carrying `status`, length = payload size for a READ (or
  // `length` when given: a header that lies about its payload), then `payload`.
  bool DstReply(const net::Header& req, std::uint32_t status, std::string_view payload = {},
                std::int64_t length = -1);
  bool DstFrame(const net::Header& h, std::string_view payload = {});

  // --- NBD (fixed newstyle) ---
  // Sends the greeting and reads the client flags.
  bool NbdGreet(std::uint16_t flags = net::nbd::kFlagFixedNewstyle | net::nbd::kFlagNoZeroes);
  bool NbdReadOption(std::uint32_t* opt, std::string* data);
  bool NbdOptReply(std::uint32_t opt, std::uint32_t type, std::string_view data = {});
  // The whole handshake of an honest server: greeting, STRUCTURED_REPLY (acknowledged when
  // `structured`), GO with INFO_EXPORT (size, flags) and ACK.
  bool NbdHandshake(std::uint64_t size, bool structured,
                    std::uint16_t tx_flags = net::nbd::kTxHasFlags | net::nbd::kTxSendFlush);
  // Reads one request (and drops a WRITE's payload).
  bool NbdReadRequest(net::nbd::Request* r);
  bool NbdSimple(std::uint64_t cookie, std::uint32_t error, std::string_view data = {});
  bool NbdChunk(std::uint64_t cookie, std::uint16_t flags, std::uint16_t type, std::string_view payload);
  // OFFSET_DATA chunk: offset, then data.
  bool NbdData(std::uint64_t cookie, std::uint16_t flags, std::uint64_t offset, std::string_view data);

 private:
  int fd_;
  const std::atomic<bool>* stop_;
  std::uint64_t read_ = 0;
};

class HostileServer {
 public:
  // Runs script(peer, n) for the n-th accepted connection (from 0); the connection closes when
  // the script returns.
  using Script = std::function<void(HostilePeer& peer, int conn)>;
  explicit HostileServer(Script script);
  ~HostileServer();
  HostileServer(const HostileServer&) = delete;
  HostileServer& operator=(const HostileServer&) = delete;

  std::uint16_t port() const { return port_; }
  int connections() const { return connections_.load(); }

 private:
  void AcceptLoop();

  Script script_;
  int listen_fd_ = -1;
  std::uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> connections_{0};
  std::thread accept_thread_;
  std::mutex mu_;
  std::vector<std::thread> conn_threads_;
};

// A DST HELLO reply for a read-write export of `size` bytes (block size 512).
net::HelloReply DstExport(std::uint64_t size);

// Deterministic bytes for offset `off` of an export: what an honest server would return.
std::string Pattern(std::uint64_t off, std::size_t len);

}  // namespace dst::test
