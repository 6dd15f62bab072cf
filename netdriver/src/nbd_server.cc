// NbdServer implementation.  See nbd_server.h for the connection state diagram and docs/nbd.md
// for what is implemented.  The transmission side follows the DST exporter (exporter.cc):
//
//   IDLE --free ctx--> READ_REQUEST --ok--> [CheckRequest] --WRITE--> (pool buffer?) --> READ_PAYLOAD --> SUBMIT
//     ^                     |                  |  \--READ----------> (pool buffer?) --> SUBMIT
//     |                     | bad magic        |   \--BLOCK_STATUS--> (pool buffer?) --> METADATA WORKER
//     |                     v                  |    \--rejected WRITE --> DRAIN_PAYLOAD --> error reply
//     |                  CLOSING               v
//     +------------------------------- immediate reply (errors, CACHE, FAST_ZERO refused)
//
// Completions (device threads, the metadata worker) go on a mutex-protected intrusive list; one
// posted drain per burst turns them into reply frames (1..16 per request: structured READ replies
// are split at holes, BLOCK_STATUS sends one chunk per context) and flushes them in one sendmsg.
#include "dst/net/nbd_server.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>

#include "dst/buffer_pool.h"
#include "dst/net/transmitter.h"
#include "rx_buffer.h"
#include "server_alloc.h"

namespace dst::net {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using detail::Bind;
using detail::HandlerArena;
using detail::Strand;
using namespace nbd;

namespace {

void LogLine(const std::string& peer, const char* what, const char* detail) {
  std::fprintf(stderr, "dst nbd: %s: %s%s%s\n", peer.c_str(), what, detail && *detail ? ": " : "",
               detail ? detail : "");
}

constexpr int kMaxChunks = 16;          // reply frames per request
constexpr int kMaxProviders = 8;        // extra metadata contexts per export
constexpr int kMaxContexts = 1 + kMaxProviders;
constexpr std::uint32_t kBaseAllocationId = 1;  // providers: 2 + index
constexpr std::chrono::seconds kCloseGrace{5};
constexpr std::chrono::seconds kDrainGrace{20};

}  // namespace

struct NbdExportEntry {
  NbdExportSpec spec;
  DeviceInfo info;
  std::uint64_t order = 0;
  std::uint32_t min_block = 1;
  std::uint32_t pref_block = 4096;
  std::uint32_t max_payload = 1u << 20;
  bool read_only = false;
  int connections = 0;  // GUARDED_BY(Impl::mu_)
};

class NbdConn;

// A preallocated request slot.
struct NbdReqCtx {
  enum SegKind : std::uint8_t { kData, kHole, kStatus };
  struct Seg {
    std::uint32_t off;  // into the request range (data/hole) or into buf (status chunk)
    std::uint32_t len;
    SegKind kind;
  };
  NbdConn* conn = nullptr;
  Request rq;
  IoRequest io;
  char* buf = nullptr;
  std::uint32_t error = 0;
  int nseg = 0;
  int frames_out = 0;
  Seg seg[kMaxChunks];
  TxFrame tx[kMaxChunks];
  NbdReqCtx* next = nullptr;
};

class NbdServer::Impl : public std::enable_shared_from_this<NbdServer::Impl> {
 public:
  Impl(asio::io_context& io, NbdServerOptions opts)
      : io_(io),
        opts_(Sanitize(std::move(opts))),
        ctl_(asio::make_strand(io)),
        acceptor_(ctl_),
        accept_timer_(ctl_),
        drain_timer_(ctl_),
        sweep_timer_(ctl_),
        pool_(opts_.max_payload, opts_.buffer_count) {
    meta_thread_ = std::thread([this] { MetaLoop(); });
  }
  ~Impl() {
    {
      std::lock_guard<std::mutex> l(meta_mu_);
      meta_stop_ = true;
    }
    meta_cv_.notify_all();
    if (meta_thread_.get_id() == std::this_thread::get_id()) meta_thread_.detach();
    else meta_thread_.join();
  }

  static NbdServerOptions Sanitize(NbdServerOptions o) {
    if (o.max_payload > kMaxPayloadHard) o.max_payload = kMaxPayloadHard;
    if (o.max_payload < 4096) o.max_payload = 4096;
    o.max_payload &= ~4095u;  // the pool wants multiples of 4096
    if (o.buffer_count == 0) o.buffer_count = 1;
    if (o.max_inflight_per_connection == 0) o.max_inflight_per_connection = 1;
    if (o.preferred_block < 512 || (o.preferred_block & (o.preferred_block - 1))) o.preferred_block = 4096;
    return o;
  }

  Status Start();
  void DoAccept();
  void ArmSweep();
  void Shutdown();
  void Drain(std::function<void(Status)> done);
  void MaybeDrainDone();
  void FlushAllAndFinish();
  std::shared_ptr<NbdExportEntry> FindExport(const std::string& name);  // "" = default

  char* TryGetOrWait(NbdConn* c);
  void PutBuffer(char* b);
  void CancelWait(NbdConn* c);
  void ConnFinished(NbdConn* c);
  void RemoveConn(NbdConn* c);

  // Metadata worker: BLOCK_STATUS queries may block (lseek), so they never run on io threads.
  void QueueMeta(NbdReqCtx* c);
  void MetaLoop();

  asio::io_context& io_;
  NbdServerOptions opts_;
  Strand ctl_;
  tcp::acceptor acceptor_;
  asio::steady_timer accept_timer_;
  asio::steady_timer drain_timer_;
  asio::steady_timer sweep_timer_;
  std::uint16_t port_ = 0;
  BufferPool pool_;

  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<NbdExportEntry>> exports_;  // GUARDED_BY(mu_)
  std::map<NbdConn*, std::shared_ptr<NbdConn>> conns_;             // GUARDED_BY(mu_)
  std::uint64_t next_order_ = 0;                                    // GUARDED_BY(mu_)
  bool draining_ = false;                                           // GUARDED_BY(mu_)
  bool stopped_ = false;                                            // GUARDED_BY(mu_)
  bool flush_started_ = false;                                      // GUARDED_BY(mu_)
  std::function<void(Status)> drain_done_;                          // GUARDED_BY(mu_)

  std::mutex pool_mu_;
  NbdConn* wait_head_ = nullptr;  // GUARDED_BY(pool_mu_)
  NbdConn* wait_tail_ = nullptr;  // GUARDED_BY(pool_mu_)
  std::atomic<int> waiters_{0};

  std::mutex meta_mu_;
  std::condition_variable meta_cv_;
  NbdReqCtx* meta_head_ = nullptr;  // GUARDED_BY(meta_mu_)
  NbdReqCtx* meta_tail_ = nullptr;  // GUARDED_BY(meta_mu_)
  bool meta_stop_ = false;          // GUARDED_BY(meta_mu_)
  std::thread meta_thread_;

  std::atomic<std::uint64_t> connections_total_{0};
  std::atomic<std::uint64_t> requests_{0};
  std::atomic<std::uint64_t> errors_replied_{0};
  std::atomic<std::uint64_t> protocol_errors_{0};
  TxStats tx_stats_;
};

class NbdConn : public std::enable_shared_from_this<NbdConn> {
 public:
  enum class State { kHandshake, kServing, kClosing };

  NbdConn(std::shared_ptr<NbdServer::Impl> impl, Strand strand, tcp::socket sock, std::string peer)
      : impl_ref_(std::move(impl)),
        impl_(impl_ref_.get()),
        strand_(std::move(strand)),
        sock_(std::move(sock)),
        nctx_(impl_->opts_.max_inflight_per_connection),
        ctxs_(new NbdReqCtx[nctx_]),
        tx_(sock_, impl_->opts_.batching, &impl_->tx_stats_),
        close_timer_(strand_),
        peer_(std::move(peer)) {
    for (std::uint32_t i = 0; i < nctx_; ++i) {
      ctxs_[i].conn = this;
      ctxs_[i].next = free_;
      free_ = &ctxs_[i];
    }
    tx_.set_error_handler(&NbdConn::OnTxError, this);
    tx_.set_executor(strand_);
    buf_cap_ = std::max<std::size_t>(1, impl_->pool_.count() / 4);
    opt_data_.reserve(kMaxOptionData);
    out_.reserve(512);
  }
  ~NbdConn() { impl_->CancelWait(this); }

  void Start() {
    asio::post(strand_, [self = shared_from_this()] {
      Scope s(self.get());
      self->SendGreeting();
    });
  }
  void StartDrain(bool force) {
    Scope s(this);
    BeginClose(force);
  }
  void OnPoolResume() {
    Scope s(this);
    parked_pool_ = false;
    ResumeAfterBuffer();
  }
  void PushDone(NbdReqCtx* c);
  void RunBlockStatus(NbdReqCtx* c);  // metadata worker thread
  // Periodic stall check: `limit` sweeps without progress while the server waits on the client
  // (handshake, a WRITE payload, replies it does not read) close the connection, so a silent
  // client cannot hold a connection slot or pool buffers forever.  Idle serving is fine.
  void Sweep(int limit) {
    Scope s(this);
    if (finished_) return;
    const bool waiting_on_client = in_payload_ || !tx_.idle() || st_ == State::kHandshake;
    if (!waiting_on_client || progress_ != seen_progress_) {
      strikes_ = 0;
      seen_progress_ = progress_;
      return;
    }
    if (++strikes_ < limit) return;
    LogLine(peer_, "stalled client closed",
            st_ == State::kHandshake ? "handshake not completed" : in_payload_ ? "payload stopped arriving"
                                                                                : "replies not read");
    BeginClose(true);
  }

  const Strand& strand_ref() const { return strand_; }
  std::shared_ptr<NbdExportEntry> export_entry() const { return exp_; }

  NbdConn* wait_next_ = nullptr;  // Impl::pool_mu_
  bool waiting_pool_ = false;

 private:
  struct Scope {
    explicit Scope(NbdConn* c) : c_(c) { ++c_->depth_; }
    ~Scope() {
      if (--c_->depth_ == 0) c_->Pump();
    }
    NbdConn* c_;
  };
  template <typename F>
  auto H(F f) {
    return Bind(&arena_, strand_, std::move(f));
  }
  enum class Next { kOption, kServe, kClose };

  // Handshake.
  void SendGreeting();
  void OnClientFlags(const boost::system::error_code& ec);
  void ReadOption();
  void OnOptionHeader(const boost::system::error_code& ec);
  void OnOptionData(const boost::system::error_code& ec);
  void DrainOption();
  void HandleOption();
  void OptExportName();
  void OptInfoGo(bool go);
  void OptList();
  void OptMeta(bool set);
  void Reply(std::uint32_t type, std::string_view data = {}) { AppendOptionReply(&out_, opt_.option, type, data); }
  void WriteOut(Next next);
  bool Attach(const std::shared_ptr<NbdExportEntry>& e);
  std::uint16_t TxFlags(const NbdExportEntry& e) const;
  void HandshakeViolation(const char* what, const char* detail);

  // Transmission.
  void Pump();
  void MaybeRead();
  bool CanRead() const;
  void OnRx(const boost::system::error_code& ec, std::size_t n);
  void HandleRequest();
  void ResumeAfterBuffer();
  void StartData(NbdReqCtx* c);
  void OnPayload(NbdReqCtx* c, const boost::system::error_code& ec);
  void DrainPayload(NbdReqCtx* c);
  void Submit(NbdReqCtx* c, IoOp op);
  void ReplyNow(NbdReqCtx* c, std::uint32_t error);
  void PrepareReply(NbdReqCtx* c);
  void DrainDone();
  void ReleaseCtx(NbdReqCtx* c);
  void BeginClose(bool force);
  void MaybeFinish();
  void Finish();

  static void OnIoDone(IoRequest* req, Status st);
  static void MapReadHoles(NbdReqCtx* c);
  static void OnCtxSent(TxFrame* f, bool ok);
  static void OnTxError(void* ctx);

  std::shared_ptr<NbdServer::Impl> impl_ref_;
  NbdServer::Impl* impl_;
  Strand strand_;
  tcp::socket sock_;
  HandlerArena arena_;
  std::uint32_t nctx_;
  std::unique_ptr<NbdReqCtx[]> ctxs_;  // outlives tx_ (frames point into it)
  Transmitter tx_;
  asio::steady_timer close_timer_;
  std::string peer_;
  NbdReqCtx* free_ = nullptr;

  State st_ = State::kHandshake;
  int depth_ = 0;
  bool reading_ = false;
  bool writing_ = false;  // handshake async_write outstanding
  bool read_shut_ = false;
  bool force_ = false;
  bool finished_ = false;
  bool close_timer_armed_ = false;
  bool in_payload_ = false;     // reading WRITE data (or draining it)
  bool parsing_ = false;        // MaybeRead's loop is running (no re-entry)
  std::uint64_t progress_ = 0;  // bumps on every completed read or sent frame
  std::uint64_t seen_progress_ = 0;
  int strikes_ = 0;
  NbdReqCtx* pending_ = nullptr;
  bool parked_pool_ = false;
  std::uint32_t dev_inflight_ = 0;
  std::uint32_t drain_left_ = 0;
  std::size_t bufs_held_ = 0;
  std::size_t buf_cap_ = 1;

  std::mutex done_mu_;
  NbdReqCtx* done_head_ = nullptr;  // GUARDED_BY(done_mu_)
  NbdReqCtx* done_tail_ = nullptr;  // GUARDED_BY(done_mu_)
  bool drain_posted_ = false;       // GUARDED_BY(done_mu_)

  // Handshake state.
  std::uint8_t small_[kGreetingSize];
  std::uint8_t opt_hdr_[kOptionHeaderSize];
  OptionHeader opt_;
  std::vector<std::uint8_t> opt_data_;  // capacity kMaxOptionData, reserved up front
  std::string out_;                     // option replies being written
  int options_seen_ = 0;
  bool fixed_newstyle_ = false;
  bool no_zeroes_ = false;
  bool structured_ = false;  // fixed before transmission starts; read by device threads after
  std::string meta_export_;
  std::uint32_t sel_[kMaxContexts];
  int nsel_ = 0;

  // Transmission state (fixed once serving).
  std::shared_ptr<NbdExportEntry> exp_;
  RequestLimits lim_;
  bool read_only_ = false;
  std::uint8_t req_[kRequestSize];
  // Requests (and the start of WRITE payloads) as recv() brought them in: a burst of pipelined
  // requests costs one system call, not one per header.
  RxBuffer rx_;
  char scratch_[16384];
};

// ------------------------------------------------------------------------------------------------
// Handshake

void NbdConn::SendGreeting() {
  EncodeGreeting(kFlagFixedNewstyle | kFlagNoZeroes, small_);
  out_.assign(reinterpret_cast<const char*>(small_), kGreetingSize);
  writing_ = true;
  asio::async_write(sock_, asio::buffer(out_),
                    H([self = shared_from_this()](const boost::system::error_code& ec, std::size_t) {
                      Scope s(self.get());
                      self->writing_ = false;
                      ++self->progress_;
                      if (ec || self->st_ == State::kClosing) return self->BeginClose(true);
                      self->reading_ = true;
                      asio::async_read(self->sock_, asio::buffer(self->small_, 4),
                                       self->H([self](const boost::system::error_code& e, std::size_t) {
                                         self->OnClientFlags(e);
                                       }));
                    }));
}

void NbdConn::HandshakeViolation(const char* what, const char* detail) {
  impl_->protocol_errors_.fetch_add(1, std::memory_order_relaxed);
  LogLine(peer_, what, detail);
  BeginClose(true);
}

void NbdConn::OnClientFlags(const boost::system::error_code& ec) {
  Scope s(this);
  reading_ = false;
  ++progress_;
  if (ec || st_ == State::kClosing) return BeginClose(true);
  const std::uint32_t flags = Get32(small_);
  if (flags & ~kClientFlagsKnown) {
    // The spec: the server MUST drop the connection on unknown client flags.
    return HandshakeViolation("handshake refused", "unknown client flags");
  }
  fixed_newstyle_ = flags & kClientFlagFixedNewstyle;
  no_zeroes_ = flags & kClientFlagNoZeroes;
  ReadOption();
}

void NbdConn::ReadOption() {
  if (st_ == State::kClosing) return;
  reading_ = true;
  asio::async_read(sock_, asio::buffer(opt_hdr_, kOptionHeaderSize),
                   H([self = shared_from_this()](const boost::system::error_code& ec, std::size_t) {
                     self->OnOptionHeader(ec);
                   }));
}

void NbdConn::OnOptionHeader(const boost::system::error_code& ec) {
  Scope s(this);
  reading_ = false;
  ++progress_;
  if (ec || st_ == State::kClosing) return BeginClose(true);  // a client may simply hang up
  Status st = DecodeOptionHeader(opt_hdr_, &opt_);
  if (!st.ok()) return HandshakeViolation("handshake", st.message().c_str());
  if (++options_seen_ > kMaxOptionsPerHandshake) return HandshakeViolation("handshake", "too many options");
  if (!fixed_newstyle_ && opt_.option != kOptExportName) {
    // Without fixed newstyle the client cannot parse option replies: the spec says close.
    return HandshakeViolation("handshake", "option other than EXPORT_NAME from a non-fixed-newstyle client");
  }
  if (opt_.length > kMaxOptionData) {
    if (opt_.length > kMaxOptionDrain || opt_.option == kOptExportName)
      return HandshakeViolation("handshake", "option data too long");
    drain_left_ = opt_.length;
    DrainOption();
    return;
  }
  opt_data_.resize(opt_.length);  // within the reserved capacity: no allocation
  if (opt_.length == 0) return HandleOption();
  reading_ = true;
  asio::async_read(sock_, asio::buffer(opt_data_.data(), opt_.length),
                   H([self = shared_from_this()](const boost::system::error_code& e, std::size_t) {
                     self->OnOptionData(e);
                   }));
}

void NbdConn::DrainOption() {
  if (drain_left_ == 0) {
    out_.clear();
    Reply(kRepErrTooBig, "option data longer than 16 KiB");
    return WriteOut(Next::kOption);
  }
  const std::size_t chunk = std::min<std::size_t>(drain_left_, sizeof scratch_);
  reading_ = true;
  asio::async_read(sock_, asio::buffer(scratch_, chunk),
                   H([self = shared_from_this()](const boost::system::error_code& ec, std::size_t n) {
                     Scope s(self.get());
                     self->reading_ = false;
                     ++self->progress_;
                     if (ec || self->st_ == State::kClosing) return self->BeginClose(true);
                     self->drain_left_ -= static_cast<std::uint32_t>(n);
                     self->DrainOption();
                   }));
}

void NbdConn::OnOptionData(const boost::system::error_code& ec) {
  Scope s(this);
  reading_ = false;
  ++progress_;
  if (ec || st_ == State::kClosing) return BeginClose(true);
  HandleOption();
}

void NbdConn::HandleOption() {
  out_.clear();
  const bool empty = opt_.length == 0;
  switch (opt_.option) {
    case kOptExportName:
      return OptExportName();
    case kOptAbort:
      Reply(kRepAck);  // soft disconnect: ACK, then close
      return WriteOut(Next::kClose);
    case kOptList:
      if (!empty) Reply(kRepErrInvalid, "LIST takes no data");
      else OptList();
      return WriteOut(Next::kOption);
    case kOptStartTls:
      Reply(kRepErrUnsup, "TLS is not supported by this server");
      return WriteOut(Next::kOption);
    case kOptInfo:
    case kOptGo:
      return OptInfoGo(opt_.option == kOptGo);
    case kOptStructuredReply:
      if (!empty) Reply(kRepErrInvalid, "STRUCTURED_REPLY takes no data");
      else if (structured_) Reply(kRepErrInvalid, "structured replies already negotiated");
      else {
        structured_ = true;
        Reply(kRepAck);
      }
      return WriteOut(Next::kOption);
    case kOptListMetaContext:
    case kOptSetMetaContext:
      OptMeta(opt_.option == kOptSetMetaContext);
      return WriteOut(Next::kOption);
    default:
      Reply(kRepErrUnsup, std::string("option ") + std::to_string(opt_.option) + " (" + OptionName(opt_.option) +
                              ") not supported");
      return WriteOut(Next::kOption);
  }
}

std::shared_ptr<NbdExportEntry> NbdServer::Impl::FindExport(const std::string& name) {
  std::lock_guard<std::mutex> l(mu_);
  if (name.empty()) {
    std::shared_ptr<NbdExportEntry> best;
    for (auto& [n, e] : exports_)
      if (!best || e->order < best->order) best = e;
    return best;
  }
  auto it = exports_.find(name);
  return it == exports_.end() ? nullptr : it->second;
}

std::uint16_t NbdConn::TxFlags(const NbdExportEntry& e) const {
  std::uint16_t f = kTxHasFlags | kTxSendCache | kTxCanMultiConn;
  // CAN_MULTI_CONN: every connection of an export submits to the same BlockDevice object, so a
  // FLUSH on one makes writes acknowledged on any connection durable.
  if (e.info.can_flush) f |= kTxSendFlush;
  if (e.info.can_fua) f |= kTxSendFua;
  if (e.read_only) {
    f |= kTxReadOnly;
  } else {
    if (e.info.can_trim) f |= kTxSendTrim;
    if (e.info.can_write_zeroes) f |= kTxSendWriteZeroes | kTxSendFastZero;
  }
  if (structured_) f |= kTxSendDf;
  return f;
}

// Enters transmission on `e` (GO, EXPORT_NAME).  False when the server is draining.
bool NbdConn::Attach(const std::shared_ptr<NbdExportEntry>& e) {
  {
    std::lock_guard<std::mutex> l(impl_->mu_);
    if (impl_->draining_ || impl_->stopped_) return false;
    e->connections++;
  }
  exp_ = e;
  read_only_ = e->read_only;
  lim_.size = e->info.size;
  lim_.min_block = e->min_block;
  lim_.max_payload = e->max_payload;
  lim_.tx_flags = TxFlags(*e);
  lim_.structured = structured_;
  if (meta_export_ != e->spec.name) nsel_ = 0;  // contexts were chosen for another export
  lim_.have_contexts = nsel_ > 0;
  return true;
}

void NbdConn::OptExportName() {
  std::string name(reinterpret_cast<const char*>(opt_data_.data()), opt_data_.size());
  auto e = impl_->FindExport(name);
  if (!e) {
    // EXPORT_NAME cannot report an error: the spec says close.
    LogLine(peer_, "EXPORT_NAME for unknown export", name.c_str());
    return BeginClose(true);
  }
  meta_export_.clear();
  nsel_ = 0;  // EXPORT_NAME clients cannot use contexts (no ACK'd GO)
  if (!Attach(e)) return BeginClose(true);
  std::uint8_t b[10];
  Put64(b, e->info.size);
  Put16(b + 8, lim_.tx_flags);
  out_.assign(reinterpret_cast<const char*>(b), sizeof b);
  if (!no_zeroes_) out_.append(kExportNameReplyZeroes, '\0');
  WriteOut(Next::kServe);
}

void NbdConn::OptInfoGo(bool go) {
  InfoRequest req;
  Status st = ParseInfoRequest(opt_data_.data(), opt_data_.size(), &req);
  if (!st.ok()) {
    Reply(kRepErrInvalid, st.message());
    return WriteOut(Next::kOption);
  }
  auto e = impl_->FindExport(req.name);
  if (!e) {
    Reply(kRepErrUnknown, "no export named '" + req.name + "'");
    return WriteOut(Next::kOption);
  }
  bool draining;
  {
    std::lock_guard<std::mutex> l(impl_->mu_);
    draining = impl_->draining_ || impl_->stopped_;
  }
  if (draining) {
    Reply(kRepErrShutdown, "server is shutting down");
    return WriteOut(Next::kOption);
  }
  Reply(kRepInfo, InfoExportPayload(e->info.size, TxFlags(*e)));
  bool name_sent = false, desc_sent = false;
  for (std::uint16_t t : req.infos) {
    if (t == kInfoName && !name_sent) {
      Reply(kRepInfo, InfoStringPayload(kInfoName, e->spec.name));
      name_sent = true;
    } else if (t == kInfoDescription && !desc_sent && !e->spec.description.empty()) {
      Reply(kRepInfo, InfoStringPayload(kInfoDescription, e->spec.description));
      desc_sent = true;
    }
  }
  // Always sent: our max payload may be below the 32 MiB a client would otherwise assume.
  Reply(kRepInfo, InfoBlockSizePayload(e->min_block, e->pref_block, e->max_payload));
  if (go) {
    if (!Attach(e)) {  // also drops contexts chosen for another export
      out_.clear();
      Reply(kRepErrShutdown, "server is shutting down");
      return WriteOut(Next::kOption);
    }
  }
  Reply(kRepAck);
  WriteOut(go ? Next::kServe : Next::kOption);
}

void NbdConn::OptList() {
  std::vector<std::shared_ptr<NbdExportEntry>> list;
  {
    std::lock_guard<std::mutex> l(impl_->mu_);
    for (auto& [n, e] : impl_->exports_) list.push_back(e);
  }
  for (auto& e : list) Reply(kRepServer, ServerPayload(e->spec.name, e->spec.description));
  Reply(kRepAck);
}

namespace {
bool MetaMatch(const std::string& query, const std::string& name) {
  if (query == name) return true;
  // "ns:" selects every context of the namespace.
  return !query.empty() && query.back() == ':' && name.compare(0, query.size(), query) == 0;
}
}  // namespace

void NbdConn::OptMeta(bool set) {
  MetaRequest req;
  Status st = ParseMetaRequest(opt_data_.data(), opt_data_.size(), &req);
  if (set) nsel_ = 0;  // a failed SET leaves nothing selected
  if (!st.ok()) return Reply(kRepErrInvalid, st.message());
  if (set && !structured_) return Reply(kRepErrInvalid, "SET_META_CONTEXT needs structured replies first");
  auto e = impl_->FindExport(req.name);
  if (!e) return Reply(kRepErrUnknown, "no export named '" + req.name + "'");
  // The contexts this export offers, with their ids.
  std::vector<std::pair<std::uint32_t, std::string>> all;
  all.emplace_back(kBaseAllocationId, kBaseAllocation);
  for (std::size_t i = 0; i < e->spec.contexts.size(); ++i)
    all.emplace_back(static_cast<std::uint32_t>(2 + i), e->spec.contexts[i]->name());
  for (auto& [id, name] : all) {
    bool hit = !set && req.queries.empty();
    for (auto& q : req.queries) hit = hit || MetaMatch(q, name);
    if (!hit) continue;
    if (set) {
      bool dup = false;
      for (int k = 0; k < nsel_; ++k) dup = dup || sel_[k] == id;
      if (dup || nsel_ >= kMaxContexts) continue;
      sel_[nsel_++] = id;
    }
    // LIST replies carry id 0 (the spec reserves the field there); SET replies the real id.
    Reply(kRepMetaContext, MetaContextPayload(set ? id : 0, name));
  }
  if (set) meta_export_ = e->spec.name;
  Reply(kRepAck);
}

void NbdConn::WriteOut(Next next) {
  writing_ = true;
  asio::async_write(sock_, asio::buffer(out_),
                    H([self = shared_from_this(), next](const boost::system::error_code& ec, std::size_t) {
                      Scope s(self.get());
                      self->writing_ = false;
                      ++self->progress_;
                      if (ec || self->st_ == State::kClosing) return self->BeginClose(true);
                      switch (next) {
                        case Next::kOption: self->ReadOption(); return;
                        case Next::kClose: self->BeginClose(false); return;
                        case Next::kServe:
                          self->out_.clear();
                          self->out_.shrink_to_fit();
                          self->st_ = State::kServing;  // Pump starts reading requests
                          return;
                      }
                    }));
}

// ------------------------------------------------------------------------------------------------
// Transmission: read side

void NbdConn::Pump() {
  if (finished_) return;
  if (pending_ && !parked_pool_ && bufs_held_ < buf_cap_ && st_ != State::kClosing) {
    ResumeAfterBuffer();
    return;
  }
  MaybeRead();
  MaybeFinish();
}

// Parses every whole request already buffered, then reads more.  Runs from Pump (depth 0), so
// the handlers it calls never re-enter it; it stops where a request has to wait (no free
// context, no buffer, a WRITE payload still on the wire) and Pump calls it again after that.
void NbdConn::MaybeRead() {
  if (parsing_) return;
  parsing_ = true;
  while (CanRead() && rx_.size() >= kRequestSize) {
    rx_.Take(req_, kRequestSize);
    HandleRequest();
  }
  parsing_ = false;
  if (!CanRead()) return;
  reading_ = true;
  sock_.async_read_some(rx_.Space(),
                        H([self = shared_from_this()](const boost::system::error_code& ec, std::size_t n) {
                          self->OnRx(ec, n);
                        }));
}

bool NbdConn::CanRead() const {
  return st_ == State::kServing && !reading_ && !pending_ && free_;  // no free context: backpressure
}

void NbdConn::OnRx(const boost::system::error_code& ec, std::size_t n) {
  Scope s(this);
  reading_ = false;
  ++progress_;
  if (ec) {
    if (rx_.size() > 0 && st_ != State::kClosing) {
      impl_->protocol_errors_.fetch_add(1, std::memory_order_relaxed);
      LogLine(peer_, "truncated request", ec.message().c_str());
    }
    return BeginClose(false);
  }
  rx_.Commit(n);  // parsed by Pump -> MaybeRead when this handler returns
}

void NbdConn::HandleRequest() {
  if (st_ == State::kClosing) return;
  Request r;
  Status st = DecodeRequest(req_, &r);
  if (!st.ok()) {
    // Without the request magic nothing after this point can be trusted: close (spec).
    impl_->protocol_errors_.fetch_add(1, std::memory_order_relaxed);
    LogLine(peer_, "framing error", st.message().c_str());
    return BeginClose(false);
  }
  impl_->requests_.fetch_add(1, std::memory_order_relaxed);
  if (r.type == kCmdDisc) return BeginClose(false);  // in-flight requests finish first; no reply

  NbdReqCtx* c = free_;  // MaybeRead only reads when a context is free
  free_ = c->next;
  c->next = nullptr;
  c->rq = r;
  c->buf = nullptr;
  c->nseg = 0;
  c->error = 0;
  const std::uint32_t err = CheckRequest(r, lim_);
  if (err) {
    if (r.type == kCmdWrite) {
      if (r.length > kMaxPayloadHard) {
        // Not worth draining: answer and close, as the spec allows.
        impl_->protocol_errors_.fetch_add(1, std::memory_order_relaxed);
        LogLine(peer_, "WRITE payload above 32 MiB", nullptr);
        ReplyNow(c, err);
        return BeginClose(false);
      }
      c->error = err;
      drain_left_ = r.length;  // keep the stream in sync
      return DrainPayload(c);
    }
    return ReplyNow(c, err);
  }
  switch (r.type) {
    case kCmdFlush:
      if (read_only_) return ReplyNow(c, 0);  // nothing can be dirty
      return Submit(c, IoOp::kFlush);
    case kCmdCache:
      return ReplyNow(c, 0);  // a hint; the device has no cache we could warm
    case kCmdTrim:
      return Submit(c, IoOp::kTrim);
    case kCmdWriteZeroes:
      // FAST_ZERO: succeed only where zeroing is a deallocation (see docs/nbd.md §3).
      if ((r.flags & kCmdFlagFastZero) && (!exp_->spec.fast_zero || (r.flags & kCmdFlagNoHole)))
        return ReplyNow(c, kEnotsup);
      return Submit(c, IoOp::kWriteZeroes);
    default:
      break;  // READ, WRITE, BLOCK_STATUS need a buffer
  }
  if (bufs_held_ >= buf_cap_) {
    pending_ = c;
    return;
  }
  c->buf = impl_->TryGetOrWait(this);
  if (!c->buf) {
    pending_ = c;
    parked_pool_ = true;
    return;
  }
  ++bufs_held_;
  StartData(c);
}

void NbdConn::ResumeAfterBuffer() {
  Scope s(this);
  if (finished_ || !pending_) return;
  NbdReqCtx* c = pending_;
  if (st_ == State::kClosing) {
    impl_->CancelWait(this);
    parked_pool_ = false;
    pending_ = nullptr;
    ReleaseCtx(c);
    return;
  }
  if (bufs_held_ >= buf_cap_) return;
  char* b = impl_->TryGetOrWait(this);
  if (!b) {
    parked_pool_ = true;
    return;
  }
  pending_ = nullptr;
  c->buf = b;
  ++bufs_held_;
  StartData(c);
}

void NbdConn::StartData(NbdReqCtx* c) {
  switch (c->rq.type) {
    case kCmdRead:
      return Submit(c, IoOp::kRead);
    case kCmdBlockStatus:
      ++dev_inflight_;
      impl_->QueueMeta(c);
      return;
    default:
      break;
  }
  // WRITE: what came in with the header is copied out of rx_; the rest goes from the socket
  // straight into the pool buffer, no copy.
  const std::size_t have = rx_.TakeInto(c->buf, c->rq.length);
  if (have == c->rq.length) return Submit(c, IoOp::kWrite);
  reading_ = true;
  in_payload_ = true;
  asio::async_read(sock_, asio::buffer(c->buf + have, c->rq.length - have),
                   H([self = shared_from_this(), c](const boost::system::error_code& ec, std::size_t) {
                     self->OnPayload(c, ec);
                   }));
}

void NbdConn::OnPayload(NbdReqCtx* c, const boost::system::error_code& ec) {
  Scope s(this);
  reading_ = false;
  in_payload_ = false;
  ++progress_;
  if (ec) {
    if (st_ != State::kClosing) {
      impl_->protocol_errors_.fetch_add(1, std::memory_order_relaxed);
      LogLine(peer_, "truncated WRITE payload", ec.message().c_str());
    }
    ReleaseCtx(c);  // never acknowledged, never written
    return BeginClose(false);
  }
  Submit(c, IoOp::kWrite);
}

void NbdConn::DrainPayload(NbdReqCtx* c) {
  drain_left_ -= static_cast<std::uint32_t>(rx_.Skip(drain_left_));
  if (drain_left_ == 0) return ReplyNow(c, c->error);
  const std::size_t chunk = std::min<std::size_t>(drain_left_, sizeof scratch_);
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
                       return self->BeginClose(false);
                     }
                     self->drain_left_ -= static_cast<std::uint32_t>(n);
                     self->DrainPayload(c);
                   }));
}

// ------------------------------------------------------------------------------------------------
// Transmission: device, metadata, replies

void NbdConn::Submit(NbdReqCtx* c, IoOp op) {
  IoRequest& io = c->io;
  io = IoRequest{};
  io.op = op;
  if ((c->rq.flags & kCmdFlagFua) && op != IoOp::kRead && op != IoOp::kFlush) io.flags |= kIoFua;
  if (op == IoOp::kWriteZeroes && (c->rq.flags & kCmdFlagNoHole)) io.flags |= kIoNoUnmap;
  io.offset = op == IoOp::kFlush ? 0 : c->rq.offset;
  io.length = op == IoOp::kFlush ? 0 : c->rq.length;
  io.data = c->buf;
  io.done = &NbdConn::OnIoDone;
  io.ctx = c;
  ++dev_inflight_;
  exp_->spec.device->Submit(&io);
}

// Device thread (or inline in Submit).
void NbdConn::OnIoDone(IoRequest* req, Status st) {
  auto* c = static_cast<NbdReqCtx*>(req->ctx);
  NbdConn* conn = c->conn;
  c->error = ErrnoFromStatus(st);
  // The spec keeps ENOTSUP for FAST_ZERO; any other unsupported operation is EINVAL.
  if (c->error == kEnotsup && !(c->rq.type == kCmdWriteZeroes && (c->rq.flags & kCmdFlagFastZero)))
    c->error = kEinval;
  if (c->error == 0 && c->rq.type == kCmdRead && conn->structured_ && !(c->rq.flags & kCmdFlagDf) &&
      conn->impl_->opts_.sparse_read_min && c->rq.length >= conn->impl_->opts_.sparse_read_min) {
    MapReadHoles(c);
  }
  conn->PushDone(c);
}

namespace {
// Splits a READ range into data and zero segments for OFFSET_DATA / OFFSET_HOLE chunks.  At most
// kMaxChunks segments: when full, the rest is sent as data (the buffer holds it anyway).
class ReadSegSink final : public ExtentSink {
 public:
  explicit ReadSegSink(NbdReqCtx* c) : c_(c) {}
  bool Add(std::uint64_t length, std::uint32_t flags) override {
    const std::uint32_t total = c_->rq.length;
    if (length == 0 || pos_ >= total) return pos_ < total;
    const std::uint32_t n = static_cast<std::uint32_t>(std::min<std::uint64_t>(length, total - pos_));
    const auto kind = (flags & kStateZero) ? NbdReqCtx::kHole : NbdReqCtx::kData;
    if (c_->nseg > 0 && c_->seg[c_->nseg - 1].kind == kind) {
      c_->seg[c_->nseg - 1].len += n;
    } else {
      if (c_->nseg == kMaxChunks - 1) return false;  // leave room for the data remainder
      c_->seg[c_->nseg++] = {pos_, n, kind};
    }
    pos_ += n;
    return pos_ < total;
  }
  std::uint32_t pos() const { return pos_; }

 private:
  NbdReqCtx* c_;
  std::uint32_t pos_ = 0;
};
}  // namespace

namespace {
// True when n bytes at p are all zero.  Real data almost never starts with 16 zero bytes, so
// a data block costs two loads; a zero block one memcmp of itself shifted by one byte.
bool AllZero(const char* p, std::size_t n) {
  if (n >= 16) {
    std::uint64_t a, b;
    std::memcpy(&a, p, 8);
    std::memcpy(&b, p + 8, 8);
    if (a | b) return false;
  }
  return n == 0 || (p[0] == 0 && std::memcmp(p, p + 1, n - 1) == 0);
}
}  // namespace

// OFFSET_HOLE chunks for the zero blocks of a READ: the buffer the device just filled is
// scanned in kZeroBlock pieces on the device's offset grid.  A hole chunk only promises "reads
// as zeroes", which a zero block does whatever its allocation, so this works for every device
// (files, arrays, remote volumes) and costs no system call.  (It used to ask the export's
// AllocationMap with lseek(SEEK_DATA/SEEK_HOLE): on tmpfs SEEK_HOLE walks the page cache up to
// the next hole, often the end of the file, under the file's position lock, which made 1 MiB
// reads five times slower than nbdkit's.)
void NbdConn::MapReadHoles(NbdReqCtx* c) {
  constexpr std::uint32_t kZeroBlock = 4096;
  c->nseg = 0;
  ReadSegSink sink(c);
  const std::uint32_t total = c->rq.length;
  std::uint32_t pos = 0;
  // The first piece runs to the next block boundary of the device, so holes line up with it.
  std::uint32_t step = kZeroBlock - static_cast<std::uint32_t>(c->rq.offset % kZeroBlock);
  while (pos < total) {
    const std::uint32_t n = std::min(step, total - pos);
    const bool zero = AllZero(c->buf + pos, n);
    pos += n;
    step = kZeroBlock;
    if (!sink.Add(n, zero ? (kStateHole | kStateZero) : 0)) break;
  }
  const std::uint32_t done = sink.pos();
  if (done < total) {  // out of chunk slots: the rest goes as data
    if (c->nseg > 0 && c->seg[c->nseg - 1].kind == NbdReqCtx::kData) c->seg[c->nseg - 1].len += total - done;
    else c->seg[c->nseg++] = {done, total - done, NbdReqCtx::kData};
  }
  if (c->nseg == 1 && c->seg[0].kind == NbdReqCtx::kData) c->nseg = 0;  // plain data reply
}

namespace {
// Encodes {u32 length, u32 flags} extents into a BLOCK_STATUS chunk payload.
class StatusSink final : public ExtentSink {
 public:
  StatusSink(std::uint8_t* out, std::uint32_t max_extents, std::uint64_t total)
      : out_(out), max_(max_extents), total_(total) {}
  bool Add(std::uint64_t length, std::uint32_t flags) override {
    if (length == 0 || pos_ >= total_) return pos_ < total_;
    const std::uint64_t n = std::min<std::uint64_t>(length, total_ - pos_);
    if (n_ > 0 && last_flags_ == flags) {
      Put32(out_ + 8 * (n_ - 1), static_cast<std::uint32_t>(Get32(out_ + 8 * (n_ - 1)) + n));
    } else {
      if (n_ == max_) return false;
      Put32(out_ + 8 * n_, static_cast<std::uint32_t>(n));
      Put32(out_ + 8 * n_ + 4, flags);
      ++n_;
      last_flags_ = flags;
    }
    pos_ += n;
    return pos_ < total_ && !(max_ == 1);
  }
  std::uint32_t count() const { return n_; }

 private:
  std::uint8_t* out_;
  std::uint32_t max_;
  std::uint64_t total_;
  std::uint64_t pos_ = 0;
  std::uint32_t n_ = 0;
  std::uint32_t last_flags_ = 0;
};
}  // namespace

// Metadata worker thread: fills c->buf with one BLOCK_STATUS chunk payload per selected context.
void NbdConn::RunBlockStatus(NbdReqCtx* c) {
  // The whole reply stays within the advertised maximum payload (the spec bounds server-sized
  // replies by it), split evenly between the contexts.
  const std::size_t share = exp_->max_payload / static_cast<std::size_t>(nsel_);
  std::uint32_t max_ext = static_cast<std::uint32_t>(std::min<std::size_t>((share - 4) / 8, 1u << 20));
  if (c->rq.flags & kCmdFlagReqOne) max_ext = 1;
  auto* base = reinterpret_cast<std::uint8_t*>(c->buf);
  std::size_t off = 0;
  c->nseg = 0;
  for (int i = 0; i < nsel_; ++i) {
    const std::uint32_t id = sel_[i];
    Put32(base + off, id);
    StatusSink sink(base + off + 4, max_ext, c->rq.length);
    Status st;
    if (id == kBaseAllocationId) {
      if (exp_->spec.allocation) st = exp_->spec.allocation->Query(c->rq.offset, c->rq.length, sink);
      else sink.Add(c->rq.length, 0);  // unknown: all allocated data
    } else {
      st = exp_->spec.contexts[id - 2]->Query(c->rq.offset, c->rq.length, sink);
    }
    if (sink.count() == 0) {  // at least one extent per context is mandatory
      c->error = st.ok() ? kEio : ErrnoFromStatus(st);
      c->nseg = 0;
      return;
    }
    const std::uint32_t len = 4 + 8 * sink.count();
    c->seg[c->nseg++] = {static_cast<std::uint32_t>(off), len, NbdReqCtx::kStatus};
    off += len;
  }
  c->error = 0;
}

void NbdServer::Impl::QueueMeta(NbdReqCtx* c) {
  {
    std::lock_guard<std::mutex> l(meta_mu_);
    c->next = nullptr;
    if (meta_tail_) meta_tail_->next = c; else meta_head_ = c;
    meta_tail_ = c;
  }
  meta_cv_.notify_one();
}

void NbdServer::Impl::MetaLoop() {
  std::unique_lock<std::mutex> l(meta_mu_);
  for (;;) {
    meta_cv_.wait(l, [this] { return meta_stop_ || meta_head_; });
    if (!meta_head_) return;  // stopping and nothing queued
    NbdReqCtx* c = meta_head_;
    meta_head_ = c->next;
    if (!meta_head_) meta_tail_ = nullptr;
    l.unlock();
    c->conn->RunBlockStatus(c);
    c->conn->PushDone(c);
    l.lock();
  }
}

void NbdConn::PushDone(NbdReqCtx* c) {
  bool post = false;
  {
    std::lock_guard<std::mutex> l(done_mu_);
    c->next = nullptr;
    if (done_tail_) done_tail_->next = c; else done_head_ = c;
    done_tail_ = c;
    if (!drain_posted_) post = drain_posted_ = true;
  }
  if (post) asio::post(strand_, H([self = shared_from_this()] { self->DrainDone(); }));
}

void NbdConn::DrainDone() {
  Scope s(this);
  NbdReqCtx* list;
  {
    std::lock_guard<std::mutex> l(done_mu_);
    list = done_head_;
    done_head_ = done_tail_ = nullptr;
    drain_posted_ = false;
  }
  while (list) {
    NbdReqCtx* c = list;
    list = c->next;
    c->next = nullptr;
    --dev_inflight_;
    PrepareReply(c);
    for (int i = 0, n = c->frames_out; i < n; ++i) tx_.Enqueue(&c->tx[i]);
  }
  tx_.Flush();  // a burst of replies, one sendmsg
}

void NbdConn::PrepareReply(NbdReqCtx* c) {
  const Request& r = c->rq;
  if (c->error) impl_->errors_replied_.fetch_add(1, std::memory_order_relaxed);
  auto frame = [c](int i) -> TxFrame& {
    TxFrame& f = c->tx[i];
    f.payload = nullptr;
    f.payload_len = 0;
    f.on_sent = &NbdConn::OnCtxSent;
    f.owner = c;
    return f;
  };
  const bool payload_reply = r.type == kCmdRead || r.type == kCmdBlockStatus;
  if (!structured_ || !payload_reply) {
    // Simple reply (allowed for every command without payload even when structured).
    TxFrame& f = frame(0);
    EncodeSimpleReply(c->error, r.cookie, f.header);
    f.header_len = kSimpleReplySize;
    if (c->error == 0 && r.type == kCmdRead) {
      f.payload = c->buf;  // the pool buffer the device filled: no copy
      f.payload_len = r.length;
    }
    c->frames_out = 1;
    return;
  }
  if (c->error) {
    TxFrame& f = frame(0);
    EncodeChunkHeader(kReplyFlagDone, kChunkError, r.cookie, 6, f.header);
    Put32(f.header + kChunkHeaderSize, c->error);
    Put16(f.header + kChunkHeaderSize + 4, 0);  // no message
    f.header_len = kChunkHeaderSize + 6;
    c->frames_out = 1;
    return;
  }
  if (r.type == kCmdRead && c->nseg == 0) c->seg[c->nseg++] = {0, r.length, NbdReqCtx::kData};
  for (int i = 0; i < c->nseg; ++i) {
    const NbdReqCtx::Seg& s = c->seg[i];
    const std::uint16_t flags = i == c->nseg - 1 ? kReplyFlagDone : 0;
    TxFrame& f = frame(i);
    switch (s.kind) {
      case NbdReqCtx::kData:
        EncodeChunkHeader(flags, kChunkOffsetData, r.cookie, 8 + s.len, f.header);
        Put64(f.header + kChunkHeaderSize, r.offset + s.off);
        f.header_len = kChunkHeaderSize + 8;
        f.payload = c->buf + s.off;
        f.payload_len = s.len;
        break;
      case NbdReqCtx::kHole:
        EncodeChunkHeader(flags, kChunkOffsetHole, r.cookie, 12, f.header);
        Put64(f.header + kChunkHeaderSize, r.offset + s.off);
        Put32(f.header + kChunkHeaderSize + 8, s.len);
        f.header_len = kChunkHeaderSize + 12;
        break;
      case NbdReqCtx::kStatus:
        EncodeChunkHeader(flags, kChunkBlockStatus, r.cookie, s.len, f.header);
        f.header_len = kChunkHeaderSize;
        f.payload = c->buf + s.off;
        f.payload_len = s.len;
        break;
    }
  }
  c->frames_out = c->nseg;
}

void NbdConn::ReplyNow(NbdReqCtx* c, std::uint32_t error) {
  c->error = error;
  c->nseg = 0;
  PrepareReply(c);
  for (int i = 0, n = c->frames_out; i < n; ++i) tx_.Enqueue(&c->tx[i]);
  tx_.Flush();
}

void NbdConn::ReleaseCtx(NbdReqCtx* c) {
  if (c->buf) {
    char* b = c->buf;
    c->buf = nullptr;
    --bufs_held_;
    impl_->PutBuffer(b);
  }
  c->next = free_;
  free_ = c;
}

void NbdConn::OnCtxSent(TxFrame* f, bool) {
  auto* c = static_cast<NbdReqCtx*>(f->owner);
  NbdConn* conn = c->conn;
  ++conn->progress_;
  if (--c->frames_out > 0) return;
  conn->ReleaseCtx(c);
  if (conn->depth_ == 0) {
    Scope s(conn);  // from the Transmitter's writable handler: still on the strand
  }
}

void NbdConn::OnTxError(void* ctx) {
  auto* conn = static_cast<NbdConn*>(ctx);
  conn->force_ = true;
  conn->st_ = State::kClosing;
}

// ------------------------------------------------------------------------------------------------
// Closing

void NbdConn::BeginClose(bool force) {
  if (force) force_ = true;
  st_ = State::kClosing;
}

void NbdConn::MaybeFinish() {
  if (finished_ || st_ != State::kClosing) return;
  if (pending_) {
    impl_->CancelWait(this);
    parked_pool_ = false;
    NbdReqCtx* c = pending_;
    pending_ = nullptr;
    ReleaseCtx(c);
  }
  if (reading_ || writing_) {
    // End the outstanding read (or a handshake write the client does not read) with an error.
    if (!read_shut_) {
      read_shut_ = true;
      ::shutdown(sock_.native_handle(), writing_ ? SHUT_RDWR : SHUT_RD);
    }
    return;
  }
  if (dev_inflight_ > 0) return;
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

void NbdConn::Finish() {
  finished_ = true;
  tx_.Abort();
  boost::system::error_code ec;
  close_timer_.cancel();
  if (sock_.is_open()) {
    const int fd = sock_.native_handle();
    for (int i = 0; i < 16; ++i) {  // swallow unread input so close() sends FIN, not RST
      ssize_t r = ::recv(fd, scratch_, sizeof scratch_, MSG_DONTWAIT);
      if (r <= 0) break;
    }
    sock_.shutdown(tcp::socket::shutdown_both, ec);
    sock_.close(ec);
  }
  impl_->ConnFinished(this);
  asio::post(strand_, [self = shared_from_this()] { self->impl_->RemoveConn(self.get()); });
}

// ------------------------------------------------------------------------------------------------
// Impl

Status NbdServer::Impl::Start() {
  boost::system::error_code ec;
  auto addr = asio::ip::make_address(opts_.listen_address, ec);
  if (ec) return Status::InvalidArgument("bad listen address " + opts_.listen_address);
  tcp::endpoint ep(addr, opts_.port);
  acceptor_.open(ep.protocol(), ec);
  if (!ec) acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) acceptor_.bind(ep, ec);
  if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return Status::FromErrno(ec.value(), "NBD listen on " + opts_.listen_address + ":" + std::to_string(opts_.port));
  }
  port_ = acceptor_.local_endpoint(ec).port();
  DoAccept();
  if (opts_.stall_timeout.count() > 0) asio::post(ctl_, [self = shared_from_this()] { self->ArmSweep(); });
  return Status::OK();
}

// Every stall_timeout/3 each connection checks whether it made progress (NbdConn::Sweep).
void NbdServer::Impl::ArmSweep() {
  constexpr int kStrikes = 3;
  auto period = opts_.stall_timeout / kStrikes;
  if (period < std::chrono::milliseconds(50)) period = std::chrono::milliseconds(50);
  sweep_timer_.expires_after(period);
  sweep_timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (ec) return;
    std::vector<std::shared_ptr<NbdConn>> conns;
    {
      std::lock_guard<std::mutex> l(self->mu_);
      if (self->stopped_ || self->flush_started_) return;
      for (auto& [p, c] : self->conns_) conns.push_back(c);
    }
    for (auto& c : conns) asio::post(c->strand_ref(), [c] { c->Sweep(kStrikes); });
    self->ArmSweep();
  });
}

void NbdServer::Impl::DoAccept() {
  auto strand = asio::make_strand(io_);
  auto sock = std::make_shared<tcp::socket>(io_);
  acceptor_.async_accept(*sock, [self = shared_from_this(), sock, strand](const boost::system::error_code& ec) {
    if (ec == asio::error::operation_aborted || !self->acceptor_.is_open()) return;
    if (ec) {
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
    auto conn = std::make_shared<NbdConn>(self, strand, std::move(*sock), std::move(peer));
    bool accept = true;
    {
      std::lock_guard<std::mutex> l(self->mu_);
      if (self->draining_ || self->stopped_) accept = false;
      else self->conns_.emplace(conn.get(), conn);
    }
    if (!accept) return;
    self->connections_total_.fetch_add(1, std::memory_order_relaxed);
    conn->Start();
    self->DoAccept();
  });
}

char* NbdServer::Impl::TryGetOrWait(NbdConn* c) {
  char* b = pool_.TryGet();
  if (b) return b;
  std::lock_guard<std::mutex> l(pool_mu_);
  b = pool_.TryGet();
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

void NbdServer::Impl::PutBuffer(char* b) {
  pool_.Put(b);
  if (waiters_.load() == 0) return;
  std::shared_ptr<NbdConn> wake;
  {
    std::lock_guard<std::mutex> l(pool_mu_);
    while (wait_head_ && !wake) {
      NbdConn* c = wait_head_;
      wait_head_ = c->wait_next_;
      if (!wait_head_) wait_tail_ = nullptr;
      c->waiting_pool_ = false;
      c->wait_next_ = nullptr;
      waiters_.fetch_sub(1);
      wake = c->weak_from_this().lock();
    }
  }
  if (wake) asio::post(wake->strand_ref(), [wake] { wake->OnPoolResume(); });
}

void NbdServer::Impl::CancelWait(NbdConn* c) {
  std::lock_guard<std::mutex> l(pool_mu_);
  if (!c->waiting_pool_) return;
  NbdConn* prev = nullptr;
  for (NbdConn* p = wait_head_; p; prev = p, p = p->wait_next_) {
    if (p != c) continue;
    if (prev) prev->wait_next_ = p->wait_next_; else wait_head_ = p->wait_next_;
    if (wait_tail_ == p) wait_tail_ = prev;
    break;
  }
  c->waiting_pool_ = false;
  c->wait_next_ = nullptr;
  waiters_.fetch_sub(1);
}

void NbdServer::Impl::ConnFinished(NbdConn* c) {
  std::lock_guard<std::mutex> l(mu_);
  if (auto e = c->export_entry()) e->connections--;
}

void NbdServer::Impl::RemoveConn(NbdConn* c) {
  std::shared_ptr<NbdConn> hold;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = conns_.find(c);
    if (it == conns_.end()) return;
    hold = std::move(it->second);
    conns_.erase(it);
  }
  MaybeDrainDone();
}

void NbdServer::Impl::Drain(std::function<void(Status)> done) {
  std::vector<std::shared_ptr<NbdConn>> conns;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (drain_done_ || flush_started_) {
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
      std::vector<std::shared_ptr<NbdConn>> rest;
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

void NbdServer::Impl::MaybeDrainDone() {
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

void NbdServer::Impl::FlushAllAndFinish() {
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
      if (!e->read_only && e->info.can_flush) fs->devices.push_back(e->spec.device);
  }
  // Reports on an io thread.  The state (which owns the Impl and the devices) is moved into the
  // posted handler so that its last reference never dies on a device thread: destroying a
  // FileDevice there would join the very thread running the destructor.
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
  if (fs->devices.empty()) return finish(std::move(fs));
  fs->reqs.resize(fs->devices.size());
  fs->left = static_cast<int>(fs->devices.size());
  auto* keep = new std::shared_ptr<FlushState>(fs);  // released by the last completion
  for (auto& r : fs->reqs) {
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
  std::vector<std::shared_ptr<BlockDevice>> devices = fs->devices;
  std::vector<IoRequest>* reqs = &fs->reqs;
  fs.reset();  // from here on `keep` (and then the posted report) owns the state
  for (std::size_t i = 0; i < devices.size(); ++i) devices[i]->Submit(&(*reqs)[i]);
}

void NbdServer::Impl::Shutdown() {
  std::vector<std::shared_ptr<NbdConn>> conns;
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

// ------------------------------------------------------------------------------------------------
// NbdServer

NbdServer::NbdServer(asio::io_context& io, NbdServerOptions opts)
    : impl_(std::make_shared<Impl>(io, std::move(opts))) {}

NbdServer::~NbdServer() { impl_->Shutdown(); }

Status NbdServer::Start() { return impl_->Start(); }

std::uint16_t NbdServer::port() const { return impl_->port_; }

Status NbdServer::AddExport(NbdExportSpec spec) {
  if (spec.name.empty() || spec.name.size() > kMaxStringLen)
    return Status::InvalidArgument("NBD export name must be 1..4096 bytes");
  if (!spec.device) return Status::InvalidArgument("export " + spec.name + " has no device");
  if (spec.contexts.size() > kMaxProviders)
    return Status::InvalidArgument("export " + spec.name + ": at most 8 metadata contexts");
  for (auto& p : spec.contexts) {
    if (!p) return Status::InvalidArgument("export " + spec.name + ": null metadata context");
    const std::string n = p->name();
    if (n.find(':') == std::string::npos || n.size() > kMaxStringLen || n.compare(0, 5, "base:") == 0)
      return Status::InvalidArgument("bad metadata context name '" + n + "'");
  }
  auto e = std::make_shared<NbdExportEntry>();
  e->info = spec.device->Info();
  std::uint32_t min = e->info.logical_block_size ? e->info.logical_block_size : 1;
  if (min > 65536 || (min & (min - 1))) return Status::InvalidArgument("device block size not a power of two <= 64 KiB");
  e->min_block = min;
  e->pref_block = std::max(impl_->opts_.preferred_block, min);
  std::uint32_t maxp = impl_->opts_.max_payload;
  if (e->info.max_io_bytes && e->info.max_io_bytes < maxp) maxp = e->info.max_io_bytes;
  maxp -= maxp % e->pref_block;
  if (maxp < e->pref_block) return Status::InvalidArgument("max payload below the preferred block size");
  e->max_payload = maxp;
  e->read_only = spec.read_only || e->info.read_only;
  e->spec = std::move(spec);
  std::lock_guard<std::mutex> l(impl_->mu_);
  if (impl_->exports_.count(e->spec.name)) return Status::Exists("NBD export " + e->spec.name + " exists");
  e->order = impl_->next_order_++;
  impl_->exports_.emplace(e->spec.name, e);
  return Status::OK();
}

Status NbdServer::RemoveExport(const std::string& name) {
  std::lock_guard<std::mutex> l(impl_->mu_);
  auto it = impl_->exports_.find(name);
  if (it == impl_->exports_.end()) return Status::NotFound("no NBD export " + name);
  if (it->second->connections > 0)
    return Status::Busy("NBD export " + name + " has " + std::to_string(it->second->connections) + " connection(s)");
  impl_->exports_.erase(it);
  return Status::OK();
}

std::vector<NbdExportStatus> NbdServer::ListExports() const {
  std::vector<NbdExportStatus> out;
  std::lock_guard<std::mutex> l(impl_->mu_);
  for (auto& [name, e] : impl_->exports_) {
    NbdExportStatus s;
    s.name = name;
    s.device = e->spec.device->Describe();
    s.description = e->spec.description;
    s.size = e->info.size;
    s.read_only = e->read_only;
    s.connections = e->connections;
    out.push_back(std::move(s));
  }
  return out;
}

NbdServerStats NbdServer::Stats() const {
  NbdServerStats s;
  s.connections_total = impl_->connections_total_.load();
  {
    std::lock_guard<std::mutex> l(impl_->mu_);
    s.connections_open = static_cast<int>(impl_->conns_.size());
  }
  s.requests = impl_->requests_.load();
  s.errors_replied = impl_->errors_replied_.load();
  s.protocol_errors = impl_->protocol_errors_.load();
  s.frames_sent = impl_->tx_stats_.frames.load();
  s.send_calls = impl_->tx_stats_.syscalls.load();
  s.frames_per_call = impl_->tx_stats_.FramesPerCall();
  return s;
}

void NbdServer::Drain(std::function<void(Status)> done) { impl_->Drain(std::move(done)); }

}  // namespace dst::net
