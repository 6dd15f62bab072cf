// Transport: the byte-moving seam under the DST and NBD protocols.
//
// A Transport is one established connection.  The protocols (exporter, NBD server, the two
// clients) and the batched Transmitter only talk to it through this interface, so TLS and raw
// Ethernet become new implementations instead of new copies of the servers and clients:
//
//   Connector --AsyncConnect--> Transport <--AsyncAccept-- Listener
//                                  |
//            receive: AsyncReadSome / AsyncRead (into caller buffers)
//            send:    SendFrames (a whole frame list, gathered into as few system calls as the
//                     link allows) / AsyncWaitWritable / AsyncWrite (handshake bytes)
//            end:     Shutdown (ends outstanding reads) / Close
//
// Implementations: TcpTransport, TcpListener, TcpConnector (tcp_transport.h), over TCP and
// AF_UNIX stream sockets; TlsTransport, TlsListener, TlsConnector (tls.h) on top of them.  Design notes for the next ones:
//   * SendFrames takes the frame list, not a file descriptor or iovecs: a TLS transport encrypts
//     the gathered bytes into records, a raw-Ethernet one sends one datagram per frame (and
//     reports only whole frames as taken).
//   * Receives complete with bytes in the caller's buffer; a datagram transport reassembles its
//     stream behind AsyncReadSome.
//
// Allocation: no operation allocates.  Completions are IoCallbacks (inline storage, no heap);
// implementations keep per-connection handler memory for their asynchronous operations.
//
// Threading: a Transport is used from its strand only (strand()); every completion runs there.
// Connect and accept results arrive on the connector's / listener's executor.
#pragma once

#include <sys/uio.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <new>
#include <string>
#include <type_traits>
#include <utility>

#include <boost/asio/buffer.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/strand.hpp>
#include <boost/system/error_code.hpp>

#include "dst/net/dst_format.h"
#include "dst/status.h"

namespace dst::net {

// The executor every connection runs on.  Typed (not any_io_executor) so completion handlers keep
// their associated allocator.
using Strand = boost::asio::strand<boost::asio::io_context::executor_type>;

// One outgoing frame: a header (up to 48 bytes) plus an optional payload pointer.  Frames form an
// intrusive list while queued.
struct TxFrame {
  std::uint8_t header[kHeaderSize];
  // Bytes of `header` to send.  DST frames use all 48; the NBD server sends its shorter
  // reply headers (16/20/28 bytes) through the same transmitter.
  std::uint8_t header_len = kHeaderSize;
  const char* payload = nullptr;
  std::uint32_t payload_len = 0;
  // Called exactly once when the frame has been fully written (ok) or dropped (!ok).  May be
  // null.  The frame may be reused or freed inside the callback.
  void (*on_sent)(TxFrame* f, bool ok) = nullptr;
  void* owner = nullptr;
  TxFrame* next = nullptr;  // owned by the Transmitter while queued
};

// A completion callback with inline storage: a move-only `void(error_code, size_t)` that never
// allocates.  The callable (typically a lambda holding a shared_ptr to its connection and one
// pointer) must fit kCapacity bytes; a larger one fails to compile.  Invoked at most once.
class IoCallback {
 public:
  static constexpr std::size_t kCapacity = 48;

  IoCallback() = default;
  template <typename F, typename = std::enable_if_t<!std::is_same_v<std::decay_t<F>, IoCallback>>>
  IoCallback(F&& f) {  // NOLINT: implicit, so call sites pass lambdas directly
    using Fn = std::decay_t<F>;
    static_assert(sizeof(Fn) <= kCapacity, "IoCallback: callable too large for the inline storage");
    static_assert(alignof(Fn) <= alignof(std::max_align_t), "IoCallback: over-aligned callable");
    static_assert(std::is_nothrow_move_constructible_v<Fn>, "IoCallback: callable must move without throwing");
    ::new (static_cast<void*>(buf_)) Fn(std::forward<F>(f));
    ops_ = &kOps<Fn>;
  }
  IoCallback(IoCallback&& o) noexcept { MoveFrom(o); }
  IoCallback& operator=(IoCallback&& o) noexcept {
    if (this != &o) {
      Reset();
      MoveFrom(o);
    }
    return *this;
  }
  IoCallback(const IoCallback&) = delete;
  IoCallback& operator=(const IoCallback&) = delete;
  ~IoCallback() { Reset(); }

  explicit operator bool() const { return ops_ != nullptr; }

  // Calls the callable and destroys it (so what it holds is released before this returns).
  void operator()(const boost::system::error_code& ec, std::size_t n) {
    const Ops* ops = ops_;
    ops_ = nullptr;
    ops->invoke(buf_, ec, n);
  }

  void Reset() {
    if (ops_) ops_->destroy(buf_);
    ops_ = nullptr;
  }

 private:
  struct Ops {
    void (*invoke)(void* p, const boost::system::error_code& ec, std::size_t n);  // and destroy
    void (*move)(void* from, void* to);                                          // and destroy from
    void (*destroy)(void* p);
  };
  template <typename Fn>
  static constexpr Ops kOps = {
      [](void* p, const boost::system::error_code& ec, std::size_t n) {
        Fn f(std::move(*static_cast<Fn*>(p)));
        static_cast<Fn*>(p)->~Fn();
        f(ec, n);
      },
      [](void* from, void* to) {
        ::new (to) Fn(std::move(*static_cast<Fn*>(from)));
        static_cast<Fn*>(from)->~Fn();
      },
      [](void* p) { static_cast<Fn*>(p)->~Fn(); },
  };
  void MoveFrom(IoCallback& o) noexcept {
    if (o.ops_) {
      o.ops_->move(o.buf_, buf_);
      ops_ = o.ops_;
      o.ops_ = nullptr;
    }
  }

  alignas(std::max_align_t) unsigned char buf_[kCapacity];
  const Ops* ops_ = nullptr;
};

// How much one SendFrames call may take.
struct SendLimits {
  int max_frames = 512;                   // frames gathered per system call
  std::size_t max_bytes = std::size_t(4) << 20;  // stop gathering after this many bytes
};

// The send half of a Transport: what the Transmitter needs.
class FrameSink {
 public:
  // Writes as much of the frame list as the link takes now, without blocking: the frames from
  // `head` on (following TxFrame::next), skipping the first `offset` bytes (the part of `head`
  // already sent), at most lim.max_frames frames and about lim.max_bytes bytes.  Returns the bytes
  // taken; a stream transport may stop inside a frame, a datagram transport only between frames.
  // When nothing can be taken now: returns 0 with ec = would_block (then AsyncWaitWritable).
  // Any other ec: the link failed.
  virtual std::size_t SendFrames(const TxFrame* head, std::size_t offset, const SendLimits& lim,
                                 boost::system::error_code& ec) = 0;
  // Completes (with n = 0) when SendFrames may take more, or with an error when the link failed
  // or was shut down.
  virtual void AsyncWaitWritable(IoCallback done) = 0;

 protected:
  ~FrameSink() = default;
};

class Transport : public FrameSink {
 public:
  enum class ShutdownHow { kRead, kBoth };

  virtual ~Transport() = default;

  // The strand every completion of this transport runs on; the owner's handlers use it too.
  virtual const Strand& strand() const = 0;

  // Receives at least one byte into `buf` (or fails; EOF is boost::asio::error::eof).
  virtual void AsyncReadSome(boost::asio::mutable_buffer buf, IoCallback done) = 0;
  // Receives exactly buf.size() bytes (or fails; n then says how many arrived).
  virtual void AsyncRead(boost::asio::mutable_buffer buf, IoCallback done) = 0;
  // Sends exactly buf.size() bytes outside the frame path (handshake messages).  Do not mix with
  // frames queued on a Transmitter.
  virtual void AsyncWrite(boost::asio::const_buffer buf, IoCallback done) = 0;

  // Ends outstanding operations without closing: kRead makes pending and later receives end
  // with EOF; kBoth also fails pending sends and writable-waits.
  virtual void Shutdown(ShutdownHow how) = 0;
  // Closes the link.  An orderly close: input the peer sent but nobody read is discarded first,
  // so the peer still reads our last bytes instead of a reset.  Idempotent.
  virtual void Close() = 0;
  virtual bool is_open() const = 0;

  // The peer for log lines, e.g. "127.0.0.1:40312" (fixed at connect or accept time).
  virtual const std::string& peer() const = 0;
  // Who the peer authenticated as (TLS: its PSK identity or certificate CN; tls.h).  Empty for
  // transports without authentication.
  virtual const std::string& identity() const {
    static const std::string kNone;
    return kNone;
  }
};

// Produces transports for incoming connections.
class Listener {
 public:
  // done(ec, transport): transport is non-null iff !ec; it runs on a fresh strand.
  using AcceptCallback = std::function<void(const boost::system::error_code&, std::unique_ptr<Transport>)>;

  virtual ~Listener() = default;
  // Accepts one connection.  After Close() the callback gets operation_aborted.
  virtual void AsyncAccept(AcceptCallback done) = 0;
  virtual void Close() = 0;
  // Where it listens, e.g. "127.0.0.1:10809", for log lines.
  virtual std::string local_name() const = 0;
};

// Makes a server's listener instead of a TCP one (in-memory transports for tests and fuzzing).
// Called once by the server's Start() with the strand its accept callbacks must run on.
using ListenerFactory = std::function<std::unique_ptr<Listener>(const Strand& ex)>;

// Produces a transport to one configured peer.
class Connector {
 public:
  // done(status, transport): transport is non-null iff status.ok().  kTimedOut when the timeout
  // passed, kUnavailable when the peer refused or is unreachable.
  using ConnectCallback = std::function<void(Status, std::unique_ptr<Transport>)>;

  virtual ~Connector() = default;
  // Connects once; done runs on the connector's strand.  A second call while one is running is
  // not allowed; Cancel() first.
  virtual void AsyncConnect(std::chrono::milliseconds timeout, ConnectCallback done) = 0;
  // Abandons a running attempt: its callback is dropped without being called.  Call on the
  // connector's strand.  The destructor cancels too.
  virtual void Cancel() = 0;
  // The peer this connector dials, e.g. "host:port" or a socket path, for log lines.
  virtual std::string target() const = 0;
};

// Gathers the frame list (as SendFrames describes) into at most `max_iov` iovecs, skipping
// `offset` bytes of `head`.  Returns the number of iovecs; *bytes gets their total.  For stream
// implementations of SendFrames (TCP, TLS).
int GatherFrames(const TxFrame* head, std::size_t offset, const SendLimits& lim, struct iovec* iov,
                 int max_iov, std::size_t* bytes);

}  // namespace dst::net
