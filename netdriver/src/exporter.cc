// Exporter implementation.  See exporter.h for the connection state diagram and
// docs/protocol.md for the wire rules enforced here.
//
// Per-connection read side (all on the connection's strand):
//
//   IDLE --free ctx--> READ_HEADER --decode ok--> [check] --WRITE--> (pool buffer?) --> READ_PAYLOAD
//     ^                    |                         |  \--READ---> (pool buffer?) --> SUBMIT
//     |                    | framing error           |   \--rejected WRITE--> DRAIN_PAYLOAD --> reply
//     |                    v                         v
//     |                 CLOSING (EPROTO reply)    SUBMIT / immediate reply
//     +----------------------------------------------+
//   "pool buffer?" with an empty pool parks the connection on the pool's waiter list; the next
//   returned buffer resumes it (backpressure instead of malloc).  No free request context also
//   parks the read side until a reply has been sent.
//
// Completion side: device threads push finished contexts on a mutex-protected intrusive list
// and post one drain per burst; the drain enqueues every reply and flushes once, so a burst of
// completions leaves in one sendmsg().
#include "dst/net/exporter.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <unordered_map>

#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/ip/tcp.hpp>

#include "dst/buffer_pool.h"
#include "dst/net/codec.h"
#include "rx_buffer.h"
#include "server_alloc.h"

namespace dst::net {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using detail::Bind;
using detail::HandlerArena;
using detail::Strand;

namespace {

void LogLine(const std::string& peer, const char* what, const char* detail) {
  std::fprintf(stderr, "dst exporter: %s: %s%s%s\n", peer.c_str(), what, detail && *detail ? ": " : "",
               detail ? detail : "");
}

constexpr std::chrono::seconds kCloseGrace{5};   // unsent replies of a closing connection
constexpr std::chrono::seconds kDrainGrace{20};  // Drain(): then connections are forced shut

}  // namespace

struct ExportEntry {
  ExportSpec spec;
  DeviceInfo info;
  ExportLimits limits;
  int connections = 0;  // GUARDED_BY(Impl::mu_)
  std::atomic<std::uint64_t> requests{0};  // every request received on a connection to it
  std::atomic<std::uint64_t> digest_errors{0};  // WRITE payloads refused for a bad digest
  // Transmit counters of its connections that have left the table; live ones are summed on
  // demand (ListExports), so the total never drops when a connection closes.
  std::uint64_t closed_frames = 0;      // GUARDED_BY(Impl::mu_)
  std::uint64_t closed_send_calls = 0;  // GUARDED_BY(Impl::mu_)
};

class Conn;

class Exporter::Impl : public std::enable_shared_from_this<Exporter::Impl> {
 public:
  Impl(asio::io_context& io, ExporterOptions opts)
      : io_(io),
        opts_(std::move(opts)),
        ctl_(asio::make_strand(io)),
        acceptor_(ctl_),
        accept_timer_(ctl_),
        drain_timer_(ctl_),
        sweep_timer_(ctl_),
        pool_(opts_.max_payload < 4096 ? 4096 : opts_.max_payload,
              opts_.buffer_count ? opts_.buffer_count : 1) {}

  Status Start();
  void DoAccept();
  void ArmSweep();
  void Shutdown();
  void Drain(std::function<void(Status)> done);
  void MaybeDrainDone();
  void FlushAllAndFinish();

  // Pool with a waiter list for backpressure.
  char* TryGetOrWait(Conn* c);
  void PutBuffer(char* b);
  void CancelWait(Conn* c);

  void ConnFinished(Conn* c);  // called on c's strand once it is closed
  void RemoveConn(Conn* c);

  asio::io_context& io_;
  ExporterOptions opts_;
  Strand ctl_;  // serializes the acceptor and the timers below
  tcp::acceptor acceptor_;
  asio::steady_timer accept_timer_;
  asio::steady_timer drain_timer_;
  asio::steady_timer sweep_timer_;
  std::uint16_t port_ = 0;
  BufferPool pool_;

  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<ExportEntry>> exports_;   // GUARDED_BY(mu_)
  std::map<Conn*, std::shared_ptr<Conn>> conns_;                  // GUARDED_BY(mu_)
  std::unordered_map<std::uint64_t, std::weak_ptr<Conn>> sessions_;  // GUARDED_BY(mu_)
  bool draining_ = false;                                         // GUARDED_BY(mu_)
  bool stopped_ = false;                                          // GUARDED_BY(mu_)
  std::function<void(Status)> drain_done_;                        // GUARDED_BY(mu_)
  bool flush_started_ = false;                                    // GUARDED_BY(mu_)

  std::mutex pool_mu_;
  Conn* wait_head_ = nullptr;  // GUARDED_BY(pool_mu_)
  Conn* wait_tail_ = nullptr;  // GUARDED_BY(pool_mu_)
  std::atomic<int> waiters_{0};

  std::atomic<std::uint64_t> connections_total_{0};
  std::atomic<std::uint64_t> requests_{0};
  std::atomic<std::uint64_t> errors_replied_{0};
  std::atomic<std::uint64_t> protocol_errors_{0};
  std::atomic<std::uint64_t> digest_errors_{0};
  // Exporter-wide transmit totals of closed connections (each connection counts into its own
  // TxStats, so the counters can also be split per export).
  std::uint64_t closed_frames_ = 0;      // GUARDED_BY(mu_)
  std::uint64_t closed_send_calls_ = 0;  // GUARDED_BY(mu_)
};

// A request slot: preallocated per connection, max_inflight_per_connection of them.
struct ReqCtx {
  Conn* conn = nullptr;
  Header h;
  IoRequest io;
  TxFrame tx;
  char* buf = nullptr;  // pool buffer for READ/WRITE
  std::uint32_t status = 0;
  ReqCtx* next = nullptr;  // free list or completion list
};

class Conn : public std::enable_shared_from_this<Conn> {
 public:
  enum class State { kHello, kServing, kClosing };

  Conn(std::shared_ptr<Exporter::Impl> impl, Strand strand, tcp::socket sock, std::string peer)
      : impl_ref_(std::move(impl)),
        impl_(impl_ref_.get()),
        strand_(std::move(strand)),
        sock_(std::move(sock)),
        nctx_(impl_->opts_.max_inflight_per_connection ? impl_->opts_.max_inflight_per_connection : 1),
        ctxs_(new ReqCtx[nctx_]),
        tx_(sock_, impl_->opts_.batching, &tx_stats_),
        close_timer_(strand_),
        peer_(std::move(peer)) {
    for (std::uint32_t i = 0; i < nctx_; ++i) {
      ctxs_[i].conn = this;
      ctxs_[i].next = free_;
      free_ = &ctxs_[i];
    }
    tx_.set_error_handler(&Conn::OnTxError, this);
    buf_cap_ = std::max<std::size_t>(1, impl_->pool_.count() / 4);
    tx_.set_executor(strand_);  // the socket uses the plain io executor; our handlers the strand
  }

  ~Conn() { impl_->CancelWait(this); }

  void Start() {
    asio::post(strand_, [self = shared_from_this()] {
      Scope s(self.get());
    });
  }

  // Posted by a newer connection of the same session (§6.3).
  void Fence(std::shared_ptr<Conn> waiter);
  void FenceDone();
  void StartDrain(bool force) {
    Scope s(this);
    BeginClose(force);
  }
  void ResumeAfterBuffer();
  // Periodic stall check (Impl's sweep timer): `limit` sweeps without progress while the server
  // waits on the client close the connection.
  void Sweep(int limit) {
    Scope s(this);
    if (finished_) return;
    const bool waiting_on_client = in_payload_ || !tx_.idle() || (st_ == State::kHello && !awaiting_fence_);
    if (!waiting_on_client || progress_ != seen_progress_) {
      strikes_ = 0;
      seen_progress_ = progress_;
      return;
    }
    if (++strikes_ < limit) return;
    LogLine(peer_, "stalled client closed", in_payload_ ? "payload stopped arriving"
                                            : st_ == State::kHello ? "no HELLO" : "replies not read");
    BeginClose(true);
  }
  void OnPoolResume() {
    Scope s(this);
    parked_pool_ = false;
    ResumeAfterBuffer();
  }

  const std::string& peer() const { return peer_; }
  const TxStats& tx_stats() const { return tx_stats_; }  // atomics: readable from any thread
  const Strand& strand_ref() const { return strand_; }
  std::shared_ptr<ExportEntry> export_entry() const { return exp_; }
  std::uint64_t session() const { return session_; }
  bool counted_on_export() const { return counted_on_export_; }

  // Intrusive pool-waiter link (Impl::pool_mu_).
  Conn* wait_next_ = nullptr;
  bool waiting_pool_ = false;

 private:
  // Every top-level handler holds a Scope; leaving the outermost one runs Pump(), which restarts
  // reading and checks for the end of a closing connection.
  struct Scope {
    explicit Scope(Conn* c) : c_(c) { ++c_->depth_; }
    ~Scope() {
      if (--c_->depth_ == 0) c_->Pump();
    }
    Conn* c_;
  };

  template <typename F>
  auto H(F f) {
    return Bind(&arena_, strand_, std::move(f));
  }

  void Pump();
  void MaybeRead();
  bool CanRead() const;
  void OnRx(const boost::system::error_code& ec, std::size_t n);
  void HandleHeader();
  void OnHelloPayload(const boost::system::error_code& ec, std::size_t n);
  void SendHelloReply();
  void SendHelloError(WireStatus ws);
  void ProtocolError(const char* what, const char* detail, bool id_known, std::uint64_t id);
  void StartData(ReqCtx* c);
  void SubmitWrite(ReqCtx* c);
  void OnPayload(ReqCtx* c, const boost::system::error_code& ec, std::size_t n);
  void DrainPayload(ReqCtx* c);
  void Submit(ReqCtx* c, IoOp op);
  void ReplyNow(ReqCtx* c, WireStatus ws);
  void PrepareReply(ReqCtx* c);
  void PushDone(ReqCtx* c);
  void DrainDone();
  void ReleaseCtx(ReqCtx* c);
  void BeginClose(bool force);
  void MaybeFinish();
  void Finish();

  static void OnIoDone(IoRequest* req, Status st);
  static void OnCtxSent(TxFrame* f, bool ok);
  static void OnCtlSent(TxFrame* f, bool ok);
  static void OnTxError(void* ctx);

  std::shared_ptr<Exporter::Impl> impl_ref_;
  Exporter::Impl* impl_;
  Strand strand_;
  tcp::socket sock_;
  HandlerArena arena_;
  std::uint32_t nctx_;
  std::unique_ptr<ReqCtx[]> ctxs_;  // outlives tx_ (frames point into it)
  TxStats tx_stats_;                // outlives tx_, which counts into it
  Transmitter tx_;
  asio::steady_timer close_timer_;
  std::string peer_;
  ReqCtx* free_ = nullptr;

  std::uint8_t hdr_[kHeaderSize];
  State st_ = State::kHello;
  int depth_ = 0;
  bool reading_ = false;        // an async read (header, payload, drain) is outstanding
  bool read_shut_ = false;      // SHUT_RD issued to end an outstanding read
  ReqCtx* pending_ = nullptr;   // waiting for a pool buffer
  bool parked_pool_ = false;    // on the pool's waiter list (strand-local view)
  bool in_payload_ = false;     // reading a payload (WRITE data, drained data, HELLO)
  bool parsing_ = false;        // MaybeRead's loop is running (no re-entry)
  std::uint64_t progress_ = 0;  // bumps on every completed read or sent frame
  std::uint64_t seen_progress_ = 0;
  int strikes_ = 0;
  bool force_ = false;          // closing without waiting for unsent replies
  bool finished_ = false;
  bool close_timer_armed_ = false;
  bool awaiting_fence_ = false;
  std::shared_ptr<Conn> fence_target_;  // the older connection we wait for
  std::shared_ptr<Conn> fence_waiter_;  // the newer connection waiting for us
  std::uint32_t dev_inflight_ = 0;      // requests owned by the device
  std::uint32_t drain_left_ = 0;        // payload bytes of a rejected WRITE still to discard
  // A connection may hold at most a quarter of the shared pool, so one slow reader (READ replies
  // stuck in its socket) cannot starve the others.
  std::size_t bufs_held_ = 0;
  std::size_t buf_cap_ = 1;

  std::mutex done_mu_;
  ReqCtx* done_head_ = nullptr;  // GUARDED_BY(done_mu_)
  ReqCtx* done_tail_ = nullptr;  // GUARDED_BY(done_mu_)
  bool drain_posted_ = false;    // GUARDED_BY(done_mu_)

  std::shared_ptr<ExportEntry> exp_;
  ExportLimits lim_;
  bool read_only_ = false;
  bool digest_ = false;  // payload digests negotiated (docs/protocol.md §4.1)
  std::uint64_t session_ = 0;
  bool counted_on_export_ = false;

  Header hello_hdr_;
  std::uint8_t hello_buf_[kMaxHelloPayload];
  std::uint8_t hello_reply_[kHelloReplySize];
  TxFrame ctl_tx_;  // HELLO reply or the EPROTO reply before a close
  bool ctl_busy_ = false;
  char scratch_[16384];
  // Frames (and the start of payloads) as recv() brought them in: a burst of pipelined requests
  // costs one system call, not one per header and one per payload.
  RxBuffer rx_;
};

// ----------------------------------------------------------------------------------------------
// Conn: read side

void Conn::Pump() {
  if (finished_) return;
  if (pending_ && !parked_pool_ && bufs_held_ < buf_cap_ && st_ != State::kClosing) {
    ResumeAfterBuffer();  // nested Scope: Pump runs again at its end
    return;
  }
  MaybeRead();
  MaybeFinish();
}

// Parses every whole frame already buffered, then reads more.  Runs from Pump (depth 0), so the
// handlers it calls never re-enter it; it stops where a frame has to wait (no free context, no
// buffer, a payload still on the wire, a fence) and Pump calls it again after that.
void Conn::MaybeRead() {
  if (parsing_) return;
  parsing_ = true;
  while (CanRead() && rx_.size() >= kHeaderSize) {
    rx_.Take(hdr_, kHeaderSize);
    HandleHeader();
  }
  parsing_ = false;
  if (!CanRead()) return;
  reading_ = true;
  sock_.async_read_some(rx_.Space(),
                        H([self = shared_from_this()](const boost::system::error_code& ec, std::size_t n) {
                          self->OnRx(ec, n);
                        }));
}

bool Conn::CanRead() const {
  if (reading_ || pending_ || awaiting_fence_ || st_ == State::kClosing) return false;
  return st_ != State::kServing || free_;  // every context busy: backpressure
}

void Conn::OnRx(const boost::system::error_code& ec, std::size_t n) {
  Scope s(this);
  reading_ = false;
  ++progress_;
  if (ec) {
    if (rx_.size() > 0 && st_ != State::kClosing) {
      impl_->protocol_errors_.fetch_add(1, std::memory_order_relaxed);
      LogLine(peer_, "truncated frame header", ec.message().c_str());
    }
    BeginClose(false);
    return;
  }
  rx_.Commit(n);  // parsed by Pump -> MaybeRead when this handler returns
}

void Conn::HandleHeader() {
  if (st_ == State::kClosing) return;  // fenced or draining: nothing new is started

  Header h;
  Status st = DecodeHeader(hdr_, &h);
  if (!st.ok()) {
    const bool magic_ok = GetU32(hdr_) == kMagic;
    ProtocolError("framing error", st.message().c_str(), magic_ok, magic_ok ? GetU64(hdr_ + 16) : 0);
    return;
  }
  if (h.is_reply()) return ProtocolError("framing error", "reply frame sent to the server", true, h.id);

  if (st_ == State::kHello) {
    if (h.command() != Cmd::kHello)
      return ProtocolError("framing error", "request before HELLO", true, h.id);
    hello_hdr_ = h;
    const std::size_t have = rx_.TakeInto(hello_buf_, h.length);
    if (have == h.length) return OnHelloPayload({}, have);
    reading_ = true;
    in_payload_ = true;
    asio::async_read(sock_, asio::buffer(hello_buf_ + have, h.length - have),
                     H([self = shared_from_this()](const boost::system::error_code& e, std::size_t m) {
                       self->OnHelloPayload(e, m);
                     }));
    return;
  }
  if (h.command() == Cmd::kHello) return ProtocolError("framing error", "second HELLO", true, h.id);

  impl_->requests_.fetch_add(1, std::memory_order_relaxed);
  if (exp_) exp_->requests.fetch_add(1, std::memory_order_relaxed);
  if (h.command() == Cmd::kDisconnect) {
    BeginClose(false);  // in-flight requests finish and are answered first
    return;
  }
  ReqCtx* c = free_;  // MaybeRead only reads a header when a context is free
  free_ = c->next;
  c->next = nullptr;
  c->h = h;
  c->buf = nullptr;
  switch (h.command()) {
    case Cmd::kPing:
      ReplyNow(c, WireStatus::kOk);
      return;
    case Cmd::kFlush:
      if (read_only_) return ReplyNow(c, WireStatus::kOk);  // nothing can be dirty
      Submit(c, IoOp::kFlush);
      return;
    default:
      break;
  }
  WireStatus ws = CheckRequest(h, lim_);
  if (ws != WireStatus::kOk) {
    if (h.command() == Cmd::kWrite) {
      // The payload follows regardless; discard it so the stream stays in sync (§8).
      c->status = static_cast<std::uint32_t>(ws);
      drain_left_ = h.length;
      DrainPayload(c);
      return;
    }
    ReplyNow(c, ws);
    return;
  }
  switch (h.command()) {
    case Cmd::kRead:
    case Cmd::kWrite:
      if (bufs_held_ >= buf_cap_) {
        pending_ = c;  // over this connection's share: resumed by Pump when one comes back
        return;
      }
      c->buf = impl_->TryGetOrWait(this);
      if (!c->buf) {
        pending_ = c;  // resumed by OnPoolResume
        parked_pool_ = true;
        return;
      }
      ++bufs_held_;
      StartData(c);
      return;
    case Cmd::kTrim: Submit(c, IoOp::kTrim); return;
    case Cmd::kWriteZeroes: Submit(c, IoOp::kWriteZeroes); return;
    default: ReplyNow(c, WireStatus::kInval); return;
  }
}

void Conn::ResumeAfterBuffer() {
  Scope s(this);
  if (finished_ || !pending_) return;
  ReqCtx* c = pending_;
  if (st_ == State::kClosing) {
    impl_->CancelWait(this);
    parked_pool_ = false;
    pending_ = nullptr;
    ReleaseCtx(c);
    return;
  }
  if (bufs_held_ >= buf_cap_) return;  // Pump retries when one of ours comes back
  char* b = impl_->TryGetOrWait(this);
  if (!b) {
    parked_pool_ = true;  // still parked
    return;
  }
  pending_ = nullptr;
  c->buf = b;
  ++bufs_held_;
  StartData(c);
}

void Conn::StartData(ReqCtx* c) {
  if (c->h.command() == Cmd::kRead) {
    Submit(c, IoOp::kRead);
    return;
  }
  // WRITE: what came in with the header is copied out of rx_; the rest goes from the socket
  // straight into the pool buffer.
  const std::size_t have = rx_.TakeInto(c->buf, c->h.length);
  if (have == c->h.length) {
    SubmitWrite(c);
    return;
  }
  reading_ = true;
  in_payload_ = true;
  asio::async_read(sock_, asio::buffer(c->buf + have, c->h.length - have),
                   H([self = shared_from_this(), c](const boost::system::error_code& ec, std::size_t n) {
                     self->OnPayload(c, ec, n);
                   }));
}

void Conn::OnPayload(ReqCtx* c, const boost::system::error_code& ec, std::size_t n) {
  Scope s(this);
  reading_ = false;
  in_payload_ = false;
  ++progress_;
  if (ec) {
    if (st_ != State::kClosing) {
      impl_->protocol_errors_.fetch_add(1, std::memory_order_relaxed);
      LogLine(peer_, "truncated WRITE payload", ec.message().c_str());
    }
    (void)n;
    ReleaseCtx(c);  // never acknowledged, never written
    BeginClose(false);
    return;
  }
  SubmitWrite(c);
}

// §4.1: with digests negotiated, a WRITE whose payload does not match its digest (or carries
// none) is not applied; EBADMSG tells the client to send it again.
void Conn::SubmitWrite(ReqCtx* c) {
  if (digest_ && (!(c->h.flags & kFlagDigest) || PayloadDigest(c->buf, c->h.length) != c->h.digest)) {
    impl_->digest_errors_.fetch_add(1, std::memory_order_relaxed);
    if (exp_) exp_->digest_errors.fetch_add(1, std::memory_order_relaxed);
    LogLine(peer_, "WRITE payload digest mismatch", "not applied, client will re-send");
    ReplyNow(c, WireStatus::kBadMsg);
    return;
  }
  Submit(c, IoOp::kWrite);
}

void Conn::DrainPayload(ReqCtx* c) {
  drain_left_ -= static_cast<std::uint32_t>(rx_.Skip(drain_left_));
  if (drain_left_ == 0) {
    ReplyNow(c, static_cast<WireStatus>(c->status));
    return;
  }
  const std::size_t chunk = drain_left_ < sizeof(scratch_) ? drain_left_ : sizeof(scratch_);
  reading_ = true;
  in_payload_ = true;
  asio::async_read(sock_, asio::buffer(scratch_, chunk),
                   H([self = shared_from_this(), c](const boost::system::error_code& ec, std::size_t n) {
                     Scope s(self.get());
                     self->reading_ = false;
                     self->in_payload_ = false;
                     ++self->progress_;
                     if (ec) {
                       self->ReleaseCtx(c);
                       self->BeginClose(false);
                       return;
                     }
                     self->drain_left_ -= static_cast<std::uint32_t>(n);
                     self->DrainPayload(c);
                   }));
}

// ----------------------------------------------------------------------------------------------
// Conn: handshake

void Conn::OnHelloPayload(const boost::system::error_code& ec, std::size_t) {
  Scope s(this);
  reading_ = false;
  in_payload_ = false;
  ++progress_;
  if (ec) {
    impl_->protocol_errors_.fetch_add(1, std::memory_order_relaxed);
    LogLine(peer_, "truncated HELLO", ec.message().c_str());
    BeginClose(false);
    return;
  }
  if (st_ == State::kClosing) return;
  HelloRequest req;
  Status st = DecodeHelloRequest(hello_buf_, hello_hdr_.length, &req);
  if (!st.ok()) return ProtocolError("bad HELLO", st.message().c_str(), true, hello_hdr_.id);
  digest_ = (req.features & kFeatureDigestXxh3) != 0;
  if (req.version != kProtocolVersion) {
    impl_->protocol_errors_.fetch_add(1, std::memory_order_relaxed);
    LogLine(peer_, "unsupported protocol version in HELLO", nullptr);
    return SendHelloError(WireStatus::kProto);
  }
  std::shared_ptr<Conn> old;
  bool draining = false;
  {
    std::lock_guard<std::mutex> l(impl_->mu_);
    if (impl_->draining_ || impl_->stopped_) {
      draining = true;
    } else if (auto it = impl_->exports_.find(req.export_name); it != impl_->exports_.end()) {
      exp_ = it->second;
      exp_->connections++;
      counted_on_export_ = true;
      if (req.session_id != 0) {
        auto& slot = impl_->sessions_[req.session_id];
        old = slot.lock();
        slot = weak_from_this();
        session_ = req.session_id;
      }
    }
  }
  if (!exp_) {
    if (draining) return SendHelloError(WireStatus::kShutdown);
    LogLine(peer_, "HELLO for unknown export", req.export_name.c_str());
    return SendHelloError(WireStatus::kNoEnt);
  }
  lim_ = exp_->limits;
  read_only_ = exp_->spec.read_only || exp_->info.read_only;
  if (old && old.get() != this) {
    // §6.3: the older connection stops reading and finishes its in-flight requests first.
    awaiting_fence_ = true;
    fence_target_ = old;
    asio::post(old->strand_, [old, self = shared_from_this()] { old->Fence(self); });
    return;
  }
  SendHelloReply();
}

void Conn::Fence(std::shared_ptr<Conn> waiter) {
  Scope s(this);
  if (finished_) {
    asio::post(waiter->strand_, [waiter] { waiter->FenceDone(); });
    return;
  }
  fence_waiter_ = std::move(waiter);
  BeginClose(true);  // stop reading; replies still pending are dropped with the socket
}

void Conn::FenceDone() {
  Scope s(this);
  awaiting_fence_ = false;
  fence_target_.reset();
  if (finished_ || st_ == State::kClosing) return;
  SendHelloReply();
}

void Conn::SendHelloReply() {
  const DeviceInfo& info = exp_->info;
  HelloReply r;
  r.export_flags = info.can_flush ? kExportCanFlush : 0;
  if (read_only_) r.export_flags |= kExportReadOnly;
  if (info.can_fua) r.export_flags |= kExportCanFua;
  if (info.can_trim && !read_only_) r.export_flags |= kExportCanTrim;
  if (info.can_write_zeroes && !read_only_) r.export_flags |= kExportCanWriteZeroes;
  r.features = digest_ ? kFeatureDigestXxh3 : 0;
  r.size = lim_.size;
  r.block_size = lim_.block_size;
  r.max_payload = lim_.max_payload;
  r.permissions = read_only_ ? kPermRead : (kPermRead | kPermWrite);
  EncodeHelloReply(r, hello_reply_, sizeof hello_reply_);
  Header h;
  h.cmd = static_cast<std::uint16_t>(Cmd::kHello) | kReplyBit;
  h.length = kHelloReplySize;
  h.id = hello_hdr_.id;
  EncodeHeader(h, ctl_tx_.header);
  ctl_tx_.payload = reinterpret_cast<const char*>(hello_reply_);
  ctl_tx_.payload_len = kHelloReplySize;
  ctl_tx_.on_sent = &Conn::OnCtlSent;
  ctl_tx_.owner = this;
  ctl_busy_ = true;
  st_ = State::kServing;
  tx_.Enqueue(&ctl_tx_);
  tx_.Flush();
}

void Conn::SendHelloError(WireStatus ws) {
  Header h;
  h.cmd = static_cast<std::uint16_t>(Cmd::kHello) | kReplyBit;
  h.status = static_cast<std::uint32_t>(ws);
  h.id = hello_hdr_.id;
  EncodeHeader(h, ctl_tx_.header);
  ctl_tx_.payload = nullptr;
  ctl_tx_.payload_len = 0;
  ctl_tx_.on_sent = &Conn::OnCtlSent;
  ctl_tx_.owner = this;
  ctl_busy_ = true;
  tx_.Enqueue(&ctl_tx_);
  tx_.Flush();
  BeginClose(false);
}

void Conn::ProtocolError(const char* what, const char* detail, bool id_known, std::uint64_t id) {
  impl_->protocol_errors_.fetch_add(1, std::memory_order_relaxed);
  LogLine(peer_, what, detail);
  if (!ctl_busy_) {
    // §8.1: DISCONNECT|reply with EPROTO, then the server closes.
    Header h;
    h.cmd = static_cast<std::uint16_t>(Cmd::kDisconnect) | kReplyBit;
    h.status = static_cast<std::uint32_t>(WireStatus::kProto);
    h.id = id_known ? id : 0;
    EncodeHeader(h, ctl_tx_.header);
    ctl_tx_.payload = nullptr;
    ctl_tx_.payload_len = 0;
    ctl_tx_.on_sent = &Conn::OnCtlSent;
    ctl_tx_.owner = this;
    ctl_busy_ = true;
    tx_.Enqueue(&ctl_tx_);
    tx_.Flush();
  }
  BeginClose(false);
}

// ----------------------------------------------------------------------------------------------
// Conn: device submission and replies

void Conn::Submit(ReqCtx* c, IoOp op) {
  IoRequest& io = c->io;
  io = IoRequest{};
  io.op = op;
  io.flags = 0;
  if (c->h.flags & kFlagFua) io.flags |= kIoFua;
  if (c->h.flags & kFlagNoUnmap) io.flags |= kIoNoUnmap;
  io.offset = op == IoOp::kFlush ? 0 : c->h.offset;
  io.length = op == IoOp::kFlush ? 0 : c->h.length;
  io.data = c->buf;
  io.done = &Conn::OnIoDone;
  io.ctx = c;
  ++dev_inflight_;
  exp_->spec.device->Submit(&io);  // may complete inline; the reply still goes via DrainDone
}

void Conn::OnIoDone(IoRequest* req, Status st) {
  auto* c = static_cast<ReqCtx*>(req->ctx);
  c->status = static_cast<std::uint32_t>(ToWireStatus(st));
  c->conn->PushDone(c);
}

void Conn::PushDone(ReqCtx* c) {
  bool post = false;
  {
    std::lock_guard<std::mutex> l(done_mu_);
    c->next = nullptr;
    if (done_tail_) done_tail_->next = c; else done_head_ = c;
    done_tail_ = c;
    if (!drain_posted_) post = drain_posted_ = true;
  }
  if (post) {
    // One post per burst; the arena keeps it off the heap even from a device thread.
    asio::post(strand_, H([self = shared_from_this()] { self->DrainDone(); }));
  }
}

void Conn::DrainDone() {
  Scope s(this);
  ReqCtx* list;
  {
    std::lock_guard<std::mutex> l(done_mu_);
    list = done_head_;
    done_head_ = done_tail_ = nullptr;
    drain_posted_ = false;
  }
  while (list) {
    ReqCtx* c = list;
    list = c->next;
    c->next = nullptr;
    --dev_inflight_;
    PrepareReply(c);
    tx_.Enqueue(&c->tx);
  }
  tx_.Flush();  // many frames, one sendmsg
}

void Conn::PrepareReply(ReqCtx* c) {
  Header h;
  h.cmd = c->h.cmd | kReplyBit;
  h.status = c->status;
  h.id = c->h.id;
  h.offset = c->h.offset;
  c->tx.payload = nullptr;
  c->tx.payload_len = 0;
  if (c->status == 0 && c->h.command() == Cmd::kRead) {
    h.length = c->h.length;
    c->tx.payload = c->buf;  // the pool buffer the device filled: no copy
    c->tx.payload_len = c->h.length;
    if (digest_) {
      h.flags |= kFlagDigest;
      h.digest = PayloadDigest(c->buf, c->h.length);
    }
  }
  if (c->status != 0) impl_->errors_replied_.fetch_add(1, std::memory_order_relaxed);
  EncodeHeader(h, c->tx.header);
  c->tx.on_sent = &Conn::OnCtxSent;
  c->tx.owner = c;
}

void Conn::ReplyNow(ReqCtx* c, WireStatus ws) {
  c->status = static_cast<std::uint32_t>(ws);
  PrepareReply(c);
  tx_.Enqueue(&c->tx);
  tx_.Flush();
}

void Conn::ReleaseCtx(ReqCtx* c) {
  if (c->buf) {
    char* b = c->buf;
    c->buf = nullptr;
    --bufs_held_;
    impl_->PutBuffer(b);
  }
  c->next = free_;
  free_ = c;
}

void Conn::OnCtxSent(TxFrame* f, bool) {
  auto* c = static_cast<ReqCtx*>(f->owner);
  Conn* conn = c->conn;
  ++conn->progress_;
  conn->ReleaseCtx(c);
  if (conn->depth_ == 0) {
    // Called from the Transmitter's own writable handler: we are still on the strand.
    Scope s(conn);
  }
}

void Conn::OnCtlSent(TxFrame* f, bool) {
  auto* conn = static_cast<Conn*>(f->owner);
  ++conn->progress_;
  conn->ctl_busy_ = false;
  if (conn->depth_ == 0) {
    Scope s(conn);
  }
}

void Conn::OnTxError(void* ctx) {
  // The Transmitter aborts its queue right after this; we only mark the connection dead.
  auto* conn = static_cast<Conn*>(ctx);
  conn->force_ = true;
  conn->st_ = State::kClosing;
}

// ----------------------------------------------------------------------------------------------
// Conn: closing

void Conn::BeginClose(bool force) {
  if (force) force_ = true;
  st_ = State::kClosing;
}

void Conn::MaybeFinish() {
  if (finished_ || st_ != State::kClosing) return;
  if (pending_) {
    impl_->CancelWait(this);
    parked_pool_ = false;
    ReqCtx* c = pending_;
    pending_ = nullptr;
    ReleaseCtx(c);
  }
  if (reading_) {
    // End the outstanding read (header, payload or drain) with EOF: nothing new is started.
    if (!read_shut_) {
      read_shut_ = true;
      ::shutdown(sock_.native_handle(), SHUT_RD);
    }
    return;
  }
  if (dev_inflight_ > 0) return;  // the device still owns contexts and buffers
  if (!force_ && !tx_.idle()) {
    if (!close_timer_armed_) {
      close_timer_armed_ = true;
      close_timer_.expires_after(kCloseGrace);
      close_timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
        if (ec) return;
        Scope s(self.get());
        self->force_ = true;
      });
    }
    return;
  }
  Finish();
}

void Conn::Finish() {
  finished_ = true;
  tx_.Abort();  // unsent replies (forced close) are dropped; their contexts come back
  boost::system::error_code ec;
  close_timer_.cancel();
  if (sock_.is_open()) {
    // Swallow unread input first so close() sends FIN rather than RST and the client can
    // still read our last reply (e.g. the EPROTO frame).
    const int fd = sock_.native_handle();
    for (int i = 0; i < 16; ++i) {
      ssize_t r = ::recv(fd, scratch_, sizeof scratch_, MSG_DONTWAIT);
      if (r <= 0) break;
    }
    sock_.shutdown(tcp::socket::shutdown_both, ec);
    sock_.close(ec);
  }
  impl_->ConnFinished(this);
  std::shared_ptr<Conn> waiter = std::move(fence_waiter_);
  if (waiter) {
    if (awaiting_fence_ && fence_target_) {
      // We were ourselves waiting for an older connection: the newest one waits for it now.
      auto older = fence_target_;
      asio::post(older->strand_, [older, waiter] { older->Fence(waiter); });
    } else {
      asio::post(waiter->strand_, [waiter] { waiter->FenceDone(); });
    }
  }
  fence_target_.reset();
  // Leave the connection table later, outside any Transmitter frame.
  asio::post(strand_, [self = shared_from_this()] { self->impl_->RemoveConn(self.get()); });
}

// ----------------------------------------------------------------------------------------------
// Impl

Status Exporter::Impl::Start() {
  boost::system::error_code ec;
  auto addr = asio::ip::make_address(opts_.listen_address, ec);
  if (ec) return Status::InvalidArgument("bad listen address " + opts_.listen_address);
  tcp::endpoint ep(addr, opts_.port);
  acceptor_.open(ep.protocol(), ec);
  if (!ec) acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) acceptor_.bind(ep, ec);
  if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return Status::FromErrno(ec.value(), "listen on " + opts_.listen_address + ":" +
                                             std::to_string(opts_.port));
  }
  port_ = acceptor_.local_endpoint(ec).port();
  DoAccept();
  if (opts_.stall_timeout.count() > 0) asio::post(ctl_, [self = shared_from_this()] { self->ArmSweep(); });
  return Status::OK();
}

// Every stall_timeout/3 each connection checks whether it made progress (Conn::Sweep).
void Exporter::Impl::ArmSweep() {
  constexpr int kStrikes = 3;
  auto period = opts_.stall_timeout / kStrikes;
  if (period < std::chrono::milliseconds(50)) period = std::chrono::milliseconds(50);
  sweep_timer_.expires_after(period);
  sweep_timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (ec) return;
    std::vector<std::shared_ptr<Conn>> conns;
    {
      std::lock_guard<std::mutex> l(self->mu_);
      if (self->stopped_ || self->flush_started_) return;
      for (auto& [p, c] : self->conns_) conns.push_back(c);
    }
    for (auto& c : conns) asio::post(c->strand_ref(), [c] { c->Sweep(kStrikes); });
    self->ArmSweep();
  });
}

void Exporter::Impl::DoAccept() {
  // The socket keeps the plain io_context executor (it fits any_io_executor's small buffer, so
  // Asio's per-operation work tracking does not allocate); every handler is bound to the
  // connection's strand instead.
  auto strand = asio::make_strand(io_);
  auto sock = std::make_shared<tcp::socket>(io_);
  acceptor_.async_accept(*sock, [self = shared_from_this(), sock, strand](const boost::system::error_code& ec) {
    if (ec == asio::error::operation_aborted || !self->acceptor_.is_open()) return;
    if (ec) {
      // EMFILE and friends: back off instead of spinning.
      LogLine("listener", "accept failed", ec.message().c_str());
      self->accept_timer_.expires_after(std::chrono::milliseconds(100));
      self->accept_timer_.async_wait([self](const boost::system::error_code& e) {
        if (!e) self->DoAccept();
      });
      return;
    }
    boost::system::error_code e2;
    sock->set_option(tcp::no_delay(true), e2);
    auto rep = sock->remote_endpoint(e2);
    std::string peer = e2 ? std::string("?") : rep.address().to_string() + ":" + std::to_string(rep.port());
    auto conn = std::make_shared<Conn>(self, strand, std::move(*sock), std::move(peer));
    bool accept = true;
    {
      std::lock_guard<std::mutex> l(self->mu_);
      if (self->draining_ || self->stopped_) accept = false;
      else self->conns_.emplace(conn.get(), conn);
    }
    if (!accept) return;  // conn destroyed: socket closed
    self->connections_total_.fetch_add(1, std::memory_order_relaxed);
    conn->Start();
    self->DoAccept();
  });
}

char* Exporter::Impl::TryGetOrWait(Conn* c) {
  char* b = pool_.TryGet();
  if (b) return b;
  std::lock_guard<std::mutex> l(pool_mu_);
  b = pool_.TryGet();  // a buffer may have come back meanwhile
  if (b) return b;
  if (!c->waiting_pool_) {
    c->waiting_pool_ = true;
    c->wait_next_ = nullptr;
    if (wait_tail_) wait_tail_->wait_next_ = c; else wait_head_ = c;
    wait_tail_ = c;
    waiters_.fetch_add(1);
  }
  return nullptr;
}

void Exporter::Impl::PutBuffer(char* b) {
  pool_.Put(b);
  if (waiters_.load() == 0) return;
  std::shared_ptr<Conn> wake;
  {
    std::lock_guard<std::mutex> l(pool_mu_);
    while (wait_head_ && !wake) {
      Conn* c = wait_head_;
      wait_head_ = c->wait_next_;
      if (!wait_head_) wait_tail_ = nullptr;
      c->waiting_pool_ = false;
      c->wait_next_ = nullptr;
      waiters_.fetch_sub(1);
      wake = c->weak_from_this().lock();  // null while it is being destroyed
    }
  }
  if (wake) {
    // Resume on its own strand (it re-parks if another connection was faster).
    asio::post(wake->strand_ref(), [wake] { wake->OnPoolResume(); });
  }
}

void Exporter::Impl::CancelWait(Conn* c) {
  std::lock_guard<std::mutex> l(pool_mu_);
  if (!c->waiting_pool_) return;
  Conn* prev = nullptr;
  for (Conn* p = wait_head_; p; prev = p, p = p->wait_next_) {
    if (p != c) continue;
    if (prev) prev->wait_next_ = p->wait_next_; else wait_head_ = p->wait_next_;
    if (wait_tail_ == p) wait_tail_ = prev;
    break;
  }
  c->waiting_pool_ = false;
  c->wait_next_ = nullptr;
  waiters_.fetch_sub(1);
}

void Exporter::Impl::ConnFinished(Conn* c) {
  std::lock_guard<std::mutex> l(mu_);
  if (c->counted_on_export()) c->export_entry()->connections--;
  if (c->session()) {
    auto it = sessions_.find(c->session());
    if (it != sessions_.end()) {
      auto cur = it->second.lock();
      if (!cur || cur.get() == c) sessions_.erase(it);
    }
  }
}

void Exporter::Impl::RemoveConn(Conn* c) {
  std::shared_ptr<Conn> hold;  // destroyed after the lock is released
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = conns_.find(c);
    if (it == conns_.end()) return;
    hold = std::move(it->second);
    conns_.erase(it);
    // Fold its counters into the closed totals in the same critical section that takes it out
    // of the live sum, so Stats()/ListExports() never count it twice or lose it.
    const std::uint64_t frames = c->tx_stats().frames.load(std::memory_order_relaxed);
    const std::uint64_t calls = c->tx_stats().syscalls.load(std::memory_order_relaxed);
    closed_frames_ += frames;
    closed_send_calls_ += calls;
    if (auto e = c->export_entry()) {
      e->closed_frames += frames;
      e->closed_send_calls += calls;
    }
  }
  MaybeDrainDone();
}

void Exporter::Impl::Drain(std::function<void(Status)> done) {
  std::vector<std::shared_ptr<Conn>> conns;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (drain_done_ || flush_started_) {
      // A second Drain: answer once the first is done would need a list; keep it simple.
      asio::post(io_, [done = std::move(done)] { done(Status::Busy("already draining")); });
      return;
    }
    draining_ = true;
    drain_done_ = std::move(done);
    for (auto& [p, c] : conns_) conns.push_back(c);
  }
  asio::post(ctl_, [self = shared_from_this()] {
    boost::system::error_code ec;
    self->acceptor_.close(ec);
    self->accept_timer_.cancel();
    self->drain_timer_.expires_after(kDrainGrace);
    self->drain_timer_.async_wait([self](const boost::system::error_code& e) {
      if (e) return;
      std::vector<std::shared_ptr<Conn>> rest;
      {
        std::lock_guard<std::mutex> l(self->mu_);
        if (self->flush_started_) return;
        for (auto& [p, c] : self->conns_) rest.push_back(c);
      }
      for (auto& c : rest) asio::post(c->strand_ref(), [c] { c->StartDrain(true); });
    });
  });
  for (auto& c : conns) asio::post(c->strand_ref(), [c] { c->StartDrain(false); });
  MaybeDrainDone();
}

void Exporter::Impl::MaybeDrainDone() {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!draining_ || !drain_done_ || flush_started_ || !conns_.empty()) return;
    flush_started_ = true;
  }
  asio::post(ctl_, [self = shared_from_this()] {
    self->drain_timer_.cancel();
    self->sweep_timer_.cancel();
  });
  FlushAllAndFinish();
}

// Flushes every export with asynchronous device flushes (never blocks an io thread), then
// reports on an io thread.
void Exporter::Impl::FlushAllAndFinish() {
  struct FlushState {
    std::shared_ptr<Impl> impl;
    std::mutex mu;
    int left = 0;
    Status first_error;
    std::vector<std::shared_ptr<BlockDevice>> devices;
    std::vector<IoRequest> reqs;
  };
  auto fs = std::make_shared<FlushState>();
  fs->impl = shared_from_this();
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [name, e] : exports_)
      if (!e->spec.read_only && !e->info.read_only) fs->devices.push_back(e->spec.device);
  }
  // Hands the result to the Drain() caller on an io thread.  The state (which owns the Impl and
  // the devices) moves into the posted handler, so its last reference never dies on a device
  // thread: if the Exporter is already gone and this held a FileDevice's last reference, its
  // destructor would join the very worker thread running it.
  static constexpr auto finish = [](std::shared_ptr<FlushState> st) {
    std::function<void(Status)> done;
    {
      std::lock_guard<std::mutex> l(st->impl->mu_);
      done = std::move(st->impl->drain_done_);
      st->impl->drain_done_ = nullptr;
    }
    asio::io_context& io = st->impl->io_;
    asio::post(io, [done = std::move(done), st = std::move(st)]() mutable {
      Status result = st->first_error;
      st.reset();
      if (done) done(result);
    });
  };
  if (fs->devices.empty()) {
    finish(std::move(fs));
    return;
  }
  fs->reqs.resize(fs->devices.size());
  fs->left = static_cast<int>(fs->devices.size());
  // The requests keep the state alive through a raw self-reference released by the last one.
  auto* keep = new std::shared_ptr<FlushState>(fs);
  for (std::size_t i = 0; i < fs->devices.size(); ++i) {
    IoRequest& r = fs->reqs[i];
    r.op = IoOp::kFlush;
    r.ctx = keep;
    r.done = [](IoRequest* req, Status st) {
      auto* k = static_cast<std::shared_ptr<FlushState>*>(req->ctx);
      bool last;
      {
        std::lock_guard<std::mutex> l((*k)->mu);
        if (!st.ok() && (*k)->first_error.ok()) (*k)->first_error = st.WithContext("flush");
        last = --(*k)->left == 0;
      }
      if (!last) return;
      std::shared_ptr<FlushState> s = std::move(*k);
      delete k;
      finish(std::move(s));
    };
  }
  // From here on `keep` (and then the posted report) owns the state: this thread (an io thread
  // or the Drain() caller) keeps only plain copies, so a completion may free everything.
  std::vector<std::shared_ptr<BlockDevice>> devices = fs->devices;
  std::vector<IoRequest>* reqs = &fs->reqs;
  fs.reset();
  for (std::size_t i = 0; i < devices.size(); ++i) devices[i]->Submit(&(*reqs)[i]);
}

void Exporter::Impl::Shutdown() {
  std::vector<std::shared_ptr<Conn>> conns;
  {
    std::lock_guard<std::mutex> l(mu_);
    stopped_ = true;
    for (auto& [p, c] : conns_) conns.push_back(c);
  }
  asio::post(ctl_, [self = shared_from_this()] {
    boost::system::error_code ec;
    self->acceptor_.close(ec);
    self->accept_timer_.cancel();
    self->drain_timer_.cancel();
    self->sweep_timer_.cancel();
  });
  for (auto& c : conns) asio::post(c->strand_ref(), [c] { c->StartDrain(true); });
}

// ----------------------------------------------------------------------------------------------
// Exporter

Exporter::Exporter(asio::io_context& io, ExporterOptions opts)
    : impl_(std::make_shared<Impl>(io, std::move(opts))) {}

Exporter::~Exporter() { impl_->Shutdown(); }

Status Exporter::Start() { return impl_->Start(); }

std::uint16_t Exporter::port() const { return impl_->port_; }

Status Exporter::AddExport(ExportSpec spec) {
  if (spec.name.empty() || spec.name.size() > kMaxExportNameLen)
    return Status::InvalidArgument("export name must be 1..255 characters");
  for (unsigned char ch : spec.name)
    if (ch < 0x21 || ch > 0x7e) return Status::InvalidArgument("export name must be printable ASCII");
  if (!spec.device) return Status::InvalidArgument("export " + spec.name + " has no device");
  auto e = std::make_shared<ExportEntry>();
  e->info = spec.device->Info();
  e->limits.size = e->info.size;
  e->limits.block_size = e->info.logical_block_size ? e->info.logical_block_size : 512;
  std::uint32_t maxp = impl_->opts_.max_payload;
  if (e->info.max_io_bytes && e->info.max_io_bytes < maxp) maxp = e->info.max_io_bytes;
  if (maxp > impl_->pool_.buffer_size()) maxp = static_cast<std::uint32_t>(impl_->pool_.buffer_size());
  e->limits.max_payload = maxp;
  e->limits.read_only = spec.read_only || e->info.read_only;
  e->limits.can_trim = e->info.can_trim;
  e->limits.can_write_zeroes = e->info.can_write_zeroes;
  e->spec = std::move(spec);
  std::lock_guard<std::mutex> l(impl_->mu_);
  if (impl_->exports_.count(e->spec.name)) return Status::Exists("export " + e->spec.name + " exists");
  impl_->exports_.emplace(e->spec.name, e);
  return Status::OK();
}

Status Exporter::RemoveExport(const std::string& name) {
  std::lock_guard<std::mutex> l(impl_->mu_);
  auto it = impl_->exports_.find(name);
  if (it == impl_->exports_.end()) return Status::NotFound("no export " + name);
  if (it->second->connections > 0)
    return Status::Busy("export " + name + " has " + std::to_string(it->second->connections) +
                        " connection(s)");
  impl_->exports_.erase(it);
  return Status::OK();
}

std::vector<ExportStatus> Exporter::ListExports() const {
  std::vector<ExportStatus> out;
  std::lock_guard<std::mutex> l(impl_->mu_);
  for (auto& [name, e] : impl_->exports_) {
    ExportStatus s;
    s.name = name;
    s.device = e->spec.device->Describe();
    s.size = e->info.size;
    s.read_only = e->limits.read_only;
    s.connections = e->connections;
    s.requests = e->requests.load(std::memory_order_relaxed);
    s.digest_errors = e->digest_errors.load(std::memory_order_relaxed);
    s.frames_sent = e->closed_frames;
    s.send_calls = e->closed_send_calls;
    for (const auto& [c, conn] : impl_->conns_) {
      if (conn->export_entry() != e) continue;
      s.frames_sent += c->tx_stats().frames.load(std::memory_order_relaxed);
      s.send_calls += c->tx_stats().syscalls.load(std::memory_order_relaxed);
    }
    s.frames_per_call = s.send_calls ? double(s.frames_sent) / double(s.send_calls) : 0.0;
    out.push_back(std::move(s));
  }
  return out;
}

ExporterStats Exporter::Stats() const {
  ExporterStats s;
  s.connections_total = impl_->connections_total_.load();
  {
    std::lock_guard<std::mutex> l(impl_->mu_);
    s.connections_open = static_cast<int>(impl_->conns_.size());
    s.frames_sent = impl_->closed_frames_;
    s.send_calls = impl_->closed_send_calls_;
    for (const auto& [c, conn] : impl_->conns_) {
      s.frames_sent += c->tx_stats().frames.load(std::memory_order_relaxed);
      s.send_calls += c->tx_stats().syscalls.load(std::memory_order_relaxed);
    }
  }
  s.requests = impl_->requests_.load();
  s.errors_replied = impl_->errors_replied_.load();
  s.protocol_errors = impl_->protocol_errors_.load();
  s.digest_errors = impl_->digest_errors_.load();
  s.frames_per_call = s.send_calls ? double(s.frames_sent) / double(s.send_calls) : 0.0;
  return s;
}

void Exporter::Drain(std::function<void(Status)> done) { impl_->Drain(std::move(done)); }

}  // namespace dst::net
