// NbdServer: the NBD protocol on the shared server core (server_core.h: accept loop, pools,
// backpressure, stall sweep, drain, teardown, counters).  This file holds only the NBD phases:
// the fixed-newstyle handshake (options), request decode and checks, metadata queries, and the
// simple and structured reply encodings.  See nbd_server.h for the connection state diagram and
// docs/nbd.md for what is implemented.
//
// Per request (on the connection's strand):
//
//   decode --ok--> [CheckRequest] --WRITE--> pool buffer --> payload --> SUBMIT
//     |               |  |  \--READ----------> pool buffer --> SUBMIT
//     | bad magic     |  |   \--BLOCK_STATUS--> pool buffer --> METADATA WORKER
//     v               |  +--FLUSH/TRIM/WRITE_ZEROES --> SUBMIT
//   close             +--refused (a WRITE's payload discarded first), CACHE, FAST_ZERO refused --> immediate reply
//
// Replies are 1..16 frames per request: structured READ replies are split at holes,
// BLOCK_STATUS sends one chunk per context.
#include "dst/net/nbd_server.h"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <thread>

#include "dst/net/tls.h"
#include "server_core.h"

namespace dst::net {

namespace asio = boost::asio;
using namespace nbd;

namespace {

constexpr int kMaxChunks = 16;          // reply frames per request
constexpr int kMaxProviders = 8;        // extra metadata contexts per export
constexpr int kMaxContexts = 1 + kMaxProviders;
constexpr std::uint32_t kBaseAllocationId = 1;  // providers: 2 + index

}  // namespace

struct NbdExportEntry : ServedExport {
  NbdExportSpec spec;
  std::uint32_t min_block = 1;
  std::uint32_t pref_block = 4096;
  std::uint32_t max_payload = 1u << 20;
};

class NbdConn;

// A preallocated request slot; `status` is the NBD errno of the reply.
struct NbdReqCtx : ServerReq {
  enum SegKind : std::uint8_t { kData, kHole, kStatus };
  struct Seg {
    std::uint32_t off;  // into the request range (data/hole) or into buf (status chunk)
    std::uint32_t len;
    SegKind kind;
  };
  Request rq;
  int nseg = 0;
  Seg seg[kMaxChunks];
  TxFrame tx[kMaxChunks];
};

class NbdServer::Impl : public ServerCore {
 public:
  Impl(asio::io_context& io, NbdServerOptions opts) : ServerCore(io, detail::CoreOptionsOf(Sanitize(opts), "dst nbd", "NBD export")), opts_(Sanitize(opts)) {
    meta_thread_ = std::thread([this] { MetaLoop(); });
  }
  ~Impl() override {
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
    if (o.preferred_block < 512 || (o.preferred_block & (o.preferred_block - 1))) o.preferred_block = 4096;
    o.max_option_length = std::clamp<std::uint32_t>(o.max_option_length, 512, kMaxOptionData);
    o.max_options = std::clamp<std::uint32_t>(o.max_options, 1, kMaxOptionsPerHandshake);
    o.max_meta_queries = std::clamp<std::uint32_t>(o.max_meta_queries, 1, kMaxMetaQueries);
    o.max_meta_query_length = std::clamp<std::uint32_t>(o.max_meta_query_length, 1, kMaxStringLen);
    return o;
  }
  std::shared_ptr<ServerConn> NewConn(std::unique_ptr<Transport> t) override;
  std::shared_ptr<NbdExportEntry> Find(const std::string& name) const {  // "" = default export
    return std::static_pointer_cast<NbdExportEntry>(name.empty() ? FirstExport() : FindExport(name));
  }

  // Metadata worker: BLOCK_STATUS queries may block (lseek), so they never run on io threads.
  void QueueMeta(NbdReqCtx* c);
  void MetaLoop();

  bool tls_required() const { return opts_.tls && opts_.tls_mode == NbdTls::kRequire; }

  const NbdServerOptions opts_;
  std::atomic<std::uint64_t> tls_handshakes_{0};

 private:
  std::mutex meta_mu_;
  std::condition_variable meta_cv_;
  NbdReqCtx* meta_head_ = nullptr;  // GUARDED_BY(meta_mu_)
  NbdReqCtx* meta_tail_ = nullptr;  // GUARDED_BY(meta_mu_)
  bool meta_stop_ = false;          // GUARDED_BY(meta_mu_)
  std::thread meta_thread_;
};

class NbdConn : public ServerConn {
 public:
  NbdConn(std::shared_ptr<NbdServer::Impl> impl, std::unique_ptr<Transport> t)
      : ServerConn(impl, std::move(t)),
        impl_(impl.get()),
        ctxs_(MakeSlots<NbdReqCtx>()) {
    opt_data_.reserve(impl_->opts_.max_option_length);
    out_.reserve(512);
  }

  void RunBlockStatus(NbdReqCtx* c);  // metadata worker thread

 private:
  enum class Next { kOption, kServe, kClose, kStartTls };
  NbdExportEntry* entry() const { return static_cast<NbdExportEntry*>(served().get()); }

  // Handshake (its own reads and writes; the request loop starts with kServing).
  void OnStart() override { SendGreeting(); }
  bool FramesInHandshake() const override { return false; }
  const char* HandshakeStall() const override { return "handshake not completed"; }
  void SendGreeting();
  void AfterGreeting(const boost::system::error_code& ec, ServerReq*);
  void OnClientFlags(const boost::system::error_code& ec, ServerReq*);
  void ReadOption();
  void OnOptionHeader(const boost::system::error_code& ec, ServerReq*);
  void OnOptionData(const boost::system::error_code& ec, ServerReq*);
  void OnOptionDrained(const boost::system::error_code& ec, ServerReq*);
  void HandleOption();
  bool RefuseBeforeTls();
  void OptStartTls();
  void StartTls();
  void AfterStartTls(const boost::system::error_code& ec, ServerReq*);
  void OptExportName();
  void OptInfoGo(bool go);
  void OptList();
  void OptMeta(bool set);
  void Reply(std::uint32_t type, std::string_view data = {}) { AppendOptionReply(&out_, opt_.option, type, data); }
  using ServerConn::Reply;
  void WriteOut(Next next);
  void AfterWriteOut(const boost::system::error_code& ec, ServerReq*);
  bool Attach(const std::shared_ptr<NbdExportEntry>& e);
  std::uint16_t TxFlags(const NbdExportEntry& e) const;
  void HandshakeViolation(const char* what, const char* detail);

  // Transmission, in the order of a request's life.
  std::size_t FrameSize() const override { return kRequestSize; }
  void HandleFrame(const std::uint8_t* hdr) override;
  void ReplyNow(NbdReqCtx* c, std::uint32_t error);
  void StartData(ServerReq* r) override;
  void Submit(NbdReqCtx* c, IoOp op);
  void OnPayload(ServerReq* r) override;
  void OnDeviceDone(ServerReq* r, const Status& st) override;
  static void MapReadHoles(NbdReqCtx* c);
  void PrepareReply(ServerReq* r) override;

  NbdServer::Impl* impl_;
  std::unique_ptr<NbdReqCtx[]> ctxs_;

  // Handshake state.
  std::uint8_t small_[kGreetingSize];
  std::uint8_t opt_hdr_[kOptionHeaderSize];
  OptionHeader opt_;
  std::vector<std::uint8_t> opt_data_;  // capacity max_option_length, reserved up front
  std::string out_;                     // option replies being written
  Next next_ = Next::kOption;           // after out_ is written
  int options_seen_ = 0;
  bool fixed_newstyle_ = false;
  bool no_zeroes_ = false;
  bool structured_ = false;  // fixed before transmission starts; read by device threads after
  bool tls_ = false;         // STARTTLS done: the transport is a TlsTransport
  std::string policy_;       // non-empty: every option but ABORT is refused with this (identity cap)
  std::string meta_export_;
  std::uint32_t sel_[kMaxContexts];
  int nsel_ = 0;

  // Transmission state (fixed once serving).
  RequestLimits lim_;
  bool read_only_ = false;
};

std::shared_ptr<ServerConn> NbdServer::Impl::NewConn(std::unique_ptr<Transport> t) {
  return std::make_shared<NbdConn>(std::static_pointer_cast<Impl>(shared_from_this()), std::move(t));
}

// ------------------------------------------------------------------------------------------------
// Handshake

void NbdConn::SendGreeting() {
  EncodeGreeting(kFlagFixedNewstyle | kFlagNoZeroes, small_);
  out_.assign(reinterpret_cast<const char*>(small_), kGreetingSize);
  WriteAll(out_.data(), out_.size(), &NbdConn::AfterGreeting);
}

void NbdConn::AfterGreeting(const boost::system::error_code& ec, ServerReq*) {
  if (ec || phase_ == Phase::kClosing) return BeginClose(true);
  ReadBody(small_, 4, nullptr, &NbdConn::OnClientFlags);
}

void NbdConn::HandshakeViolation(const char* what, const char* detail) {
  ProtocolViolation(what, detail);
  BeginClose(true);
}

void NbdConn::OnClientFlags(const boost::system::error_code& ec, ServerReq*) {
  if (ec || phase_ == Phase::kClosing) return BeginClose(true);
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
  if (phase_ == Phase::kClosing) return;
  ReadBody(opt_hdr_, kOptionHeaderSize, nullptr, &NbdConn::OnOptionHeader);
}

void NbdConn::OnOptionHeader(const boost::system::error_code& ec, ServerReq*) {
  if (ec || phase_ == Phase::kClosing) return BeginClose(true);  // a client may simply hang up
  Status st = DecodeOptionHeader(opt_hdr_, &opt_);
  if (!st.ok()) return HandshakeViolation("handshake", st.message().c_str());
  if (++options_seen_ > static_cast<int>(impl_->opts_.max_options))
    return HandshakeViolation("handshake", "too many options (max_options)");
  if (!fixed_newstyle_ && opt_.option != kOptExportName) {
    // Without fixed newstyle the client cannot parse option replies: the spec says close.
    return HandshakeViolation("handshake", "option other than EXPORT_NAME from a non-fixed-newstyle client");
  }
  if (opt_.length > impl_->opts_.max_option_length) {
    if (opt_.length > kMaxOptionDrain || opt_.option == kOptExportName)
      return HandshakeViolation("handshake", "option data too long");
    return Discard(opt_.length, nullptr, &NbdConn::OnOptionDrained);
  }
  opt_data_.resize(opt_.length);  // within the reserved capacity: no allocation
  if (opt_.length == 0) return HandleOption();
  ReadBody(opt_data_.data(), opt_.length, nullptr, &NbdConn::OnOptionData);
}

void NbdConn::OnOptionDrained(const boost::system::error_code& ec, ServerReq*) {
  if (ec || phase_ == Phase::kClosing) return BeginClose(true);
  out_.clear();
  Reply(kRepErrTooBig, "option data longer than " + std::to_string(impl_->opts_.max_option_length) +
                           " bytes (max_option_length)");
  WriteOut(Next::kOption);
}

void NbdConn::OnOptionData(const boost::system::error_code& ec, ServerReq*) {
  if (ec || phase_ == Phase::kClosing) return BeginClose(true);
  HandleOption();
}

// Before STARTTLS in require mode, and after a refused identity: true when the option was
// answered (or the connection closed) here.
bool NbdConn::RefuseBeforeTls() {
  const std::uint32_t o = opt_.option;
  if (o == kOptAbort) return false;
  if (!policy_.empty()) {
    if (o == kOptExportName) {
      BeginClose(true);
      return true;
    }
    Reply(kRepErrPolicy, policy_);
    WriteOut(Next::kOption);
    return true;
  }
  if (tls_ || !impl_->tls_required() || o == kOptStartTls) return false;
  if (o == kOptExportName) {
    // EXPORT_NAME cannot carry an error: the spec says close (FORCEDTLS).
    core_->LogLimited(address(), "EXPORT_NAME before STARTTLS, closed", "TLS is required");
    BeginClose(true);
    return true;
  }
  Reply(kRepErrTlsReqd, "TLS is required: send NBD_OPT_STARTTLS first (nbds:// URI)");
  WriteOut(Next::kOption);
  return true;
}

void NbdConn::HandleOption() {
  out_.clear();
  const bool empty = opt_.length == 0;
  if (RefuseBeforeTls()) return;
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
      return OptStartTls();
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

std::uint16_t NbdConn::TxFlags(const NbdExportEntry& e) const {
  std::uint16_t f = kTxHasFlags | kTxSendCache | kTxCanMultiConn;
  // CAN_MULTI_CONN: every connection of an export submits to the same BlockDevice object, so a
  // FLUSH on one makes writes acknowledged on any connection durable.
  if (e.info.can_flush) f |= kTxSendFlush;
  if (e.info.can_fua) f |= kTxSendFua;
  if (AccessTo(e) != Access::kReadWrite) {  // a read-only export or a read-only identity
    f |= kTxReadOnly;
  } else {
    if (e.info.can_trim) f |= kTxSendTrim;
    if (e.info.can_write_zeroes) f |= kTxSendWriteZeroes | kTxSendFastZero;
  }
  if (structured_) f |= kTxSendDf;
  return f;
}

// Enters transmission on `e` (GO, EXPORT_NAME).  False when the server is draining or the
// identity is over max_connections_per_identity.
bool NbdConn::Attach(const std::shared_ptr<NbdExportEntry>& e) {
  if (!ClaimPeerIdentity().ok() || !core_->Attach(this, e)) return false;
  read_only_ = AccessTo(*e) != Access::kReadWrite;
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
  auto e = impl_->Find(name);
  if (!e) {
    // EXPORT_NAME cannot report an error: the spec says close.
    Log("EXPORT_NAME for unknown export", name.c_str());
    return BeginClose(true);
  }
  if (AccessTo(*e) == Access::kNone) {
    LogDenied(name);
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
  auto e = impl_->Find(req.name);
  if (!e) {
    Reply(kRepErrUnknown, "no export named '" + req.name + "'");
    return WriteOut(Next::kOption);
  }
  if (AccessTo(*e) == Access::kNone) {
    Reply(kRepErrPolicy, LogDenied(req.name));
    return WriteOut(Next::kOption);
  }
  if (!core_->accepting()) {
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
      if (!core_->accepting()) Reply(kRepErrShutdown, "server is shutting down");
      else Reply(kRepErrPolicy, "too many connections of identity " + peer_identity() + " (max_connections_per_identity)");
      return WriteOut(Next::kOption);
    }
  }
  Reply(kRepAck);
  WriteOut(go ? Next::kServe : Next::kOption);
}

void NbdConn::OptList() {
  impl_->VisitExports([this](const ServedExport& se, const ExportCounters&) {
    const auto& e = static_cast<const NbdExportEntry&>(se);
    if (AccessTo(e) == Access::kNone) return;  // only what this identity may use
    Reply(kRepServer, ServerPayload(e.spec.name, e.spec.description));
  });
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
  if (req.queries.size() > impl_->opts_.max_meta_queries)
    return Reply(kRepErrTooBig, "more than " + std::to_string(impl_->opts_.max_meta_queries) +
                                    " metadata context queries (max_meta_queries)");
  for (const auto& q : req.queries)
    if (q.size() > impl_->opts_.max_meta_query_length)
      return Reply(kRepErrTooBig, "metadata context query longer than " +
                                      std::to_string(impl_->opts_.max_meta_query_length) + " bytes (max_meta_query_length)");
  if (set && !structured_) return Reply(kRepErrInvalid, "SET_META_CONTEXT needs structured replies first");
  auto e = impl_->Find(req.name);
  if (!e) return Reply(kRepErrUnknown, "no export named '" + req.name + "'");
  if (AccessTo(*e) == Access::kNone) return Reply(kRepErrPolicy, LogDenied(req.name));
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

void NbdConn::OptStartTls() {
  if (!impl_->opts_.tls || impl_->opts_.tls_mode == NbdTls::kOff) {
    Reply(kRepErrUnsup, "TLS is not configured on this server");
  } else if (tls_) {
    Reply(kRepErrInvalid, "TLS is already negotiated");
  } else if (opt_.length != 0) {
    Reply(kRepErrInvalid, "STARTTLS takes no data");
  } else {
    Reply(kRepAck);
    return WriteOut(Next::kStartTls);
  }
  WriteOut(Next::kOption);
}

// After the ACK of STARTTLS.  Whatever was negotiated in the clear is forgotten (the spec; a
// man in the middle could have injected it), then the TLS handshake runs on the same socket.
void NbdConn::StartTls() {
  structured_ = false;
  nsel_ = 0;
  meta_export_.clear();
  auto ctx = impl_->opts_.tls;
  const auto timeout = HandshakeLeft(ctx->config().handshake_timeout);
  UpgradeTransport(
      [ctx, timeout](std::unique_ptr<Transport> plain, UpgradeDone done) {
        AsyncTlsUpgrade(ctx, std::move(plain), std::string(), timeout, std::move(done));
      },
      &NbdConn::AfterStartTls);
}

void NbdConn::AfterStartTls(const boost::system::error_code& ec, ServerReq*) {
  if (ec || phase_ == Phase::kClosing) return BeginClose(true);
  tls_ = true;
  impl_->tls_handshakes_.fetch_add(1, std::memory_order_relaxed);
  const std::string& who = transport().identity();
  Status st = who.empty() ? Status::OK() : core_->ClaimIdentity(this, who);
  if (!st.ok()) {
    core_->LogLimited(address(), "identity refused", st.message().c_str());
    policy_ = st.message();
  }
  ReadOption();
}

void NbdConn::WriteOut(Next next) {
  next_ = next;
  WriteAll(out_.data(), out_.size(), &NbdConn::AfterWriteOut);
}

void NbdConn::AfterWriteOut(const boost::system::error_code& ec, ServerReq*) {
  if (ec || phase_ == Phase::kClosing) return BeginClose(true);
  switch (next_) {
    case Next::kOption: return ReadOption();
    case Next::kClose: return BeginClose(false);
    case Next::kStartTls: return StartTls();
    case Next::kServe:
      out_.clear();
      out_.shrink_to_fit();
      phase_ = Phase::kServing;  // Pump starts reading requests
      return;
  }
}

// ------------------------------------------------------------------------------------------------
// Transmission: requests

void NbdConn::HandleFrame(const std::uint8_t* hdr) {
  Request r;
  Status st = DecodeRequest(hdr, &r);
  if (!st.ok()) {
    // Without the request magic nothing after this point can be trusted: close (spec).
    ProtocolViolation("framing error", st.message().c_str());
    return BeginClose(false);
  }
  CountRequest();
  if (r.type == kCmdDisc) return BeginClose(false);  // in-flight requests finish first; no reply

  auto* c = static_cast<NbdReqCtx*>(TakeSlot());
  c->rq = r;
  c->nseg = 0;
  const std::uint32_t err = CheckRequest(r, lim_);
  if (err) {
    if (r.type == kCmdWrite) {
      if (r.length > kMaxPayloadHard) {
        // Not worth draining: answer and close, as the spec allows.
        ProtocolViolation("WRITE payload above 32 MiB", nullptr);
        ReplyNow(c, err);
        return BeginClose(false);
      }
      c->status = err;
      return DiscardPayload(c, r.length);  // keep the stream in sync
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
      if ((r.flags & kCmdFlagFastZero) && (!entry()->spec.fast_zero || (r.flags & kCmdFlagNoHole)))
        return ReplyNow(c, kEnotsup);
      return Submit(c, IoOp::kWriteZeroes);
    default:
      return AcquireBuffer(c);  // READ, WRITE, BLOCK_STATUS need a buffer
  }
}

void NbdConn::StartData(ServerReq* r) {
  auto* c = static_cast<NbdReqCtx*>(r);
  switch (c->rq.type) {
    case kCmdRead:
      return Submit(c, IoOp::kRead);
    case kCmdBlockStatus:
      ++dev_inflight_;
      impl_->QueueMeta(c);
      return;
    default:
      return ReceivePayload(c, c->rq.length);  // WRITE
  }
}

void NbdConn::OnPayload(ServerReq* r) { Submit(static_cast<NbdReqCtx*>(r), IoOp::kWrite); }

void NbdConn::Submit(NbdReqCtx* c, IoOp op) {
  std::uint32_t flags = 0;
  if ((c->rq.flags & kCmdFlagFua) && op != IoOp::kRead && op != IoOp::kFlush) flags |= kIoFua;
  if (op == IoOp::kWriteZeroes && (c->rq.flags & kCmdFlagNoHole)) flags |= kIoNoUnmap;
  if (op == IoOp::kFlush) return ServerConn::Submit(c, op, flags, 0, 0);
  ServerConn::Submit(c, op, flags, c->rq.offset, c->rq.length);
}

// Device thread (or inline in Submit).
void NbdConn::OnDeviceDone(ServerReq* r, const Status& st) {
  auto* c = static_cast<NbdReqCtx*>(r);
  c->status = ErrnoFromStatus(st);
  // The spec keeps ENOTSUP for FAST_ZERO; any other unsupported operation is EINVAL.
  if (c->status == kEnotsup && !(c->rq.type == kCmdWriteZeroes && (c->rq.flags & kCmdFlagFastZero)))
    c->status = kEinval;
  if (c->status == 0 && c->rq.type == kCmdRead && structured_ && !(c->rq.flags & kCmdFlagDf) &&
      impl_->opts_.sparse_read_min && c->rq.length >= impl_->opts_.sparse_read_min) {
    MapReadHoles(c);
  }
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
  const std::size_t share = entry()->max_payload / static_cast<std::size_t>(nsel_);
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
      if (entry()->spec.allocation) st = entry()->spec.allocation->Query(c->rq.offset, c->rq.length, sink);
      else sink.Add(c->rq.length, 0);  // unknown: all allocated data
    } else {
      st = entry()->spec.contexts[id - 2]->Query(c->rq.offset, c->rq.length, sink);
    }
    if (sink.count() == 0) {  // at least one extent per context is mandatory
      c->status = st.ok() ? kEio : ErrnoFromStatus(st);
      c->nseg = 0;
      return;
    }
    const std::uint32_t len = 4 + 8 * sink.count();
    c->seg[c->nseg++] = {static_cast<std::uint32_t>(off), len, NbdReqCtx::kStatus};
    off += len;
  }
  c->status = 0;
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
    meta_head_ = static_cast<NbdReqCtx*>(c->next);
    if (!meta_head_) meta_tail_ = nullptr;
    l.unlock();
    static_cast<NbdConn*>(c->conn)->RunBlockStatus(c);
    c->conn->PushDone(c);
    l.lock();
  }
}

void NbdConn::ReplyNow(NbdReqCtx* c, std::uint32_t error) {
  c->status = error;
  c->nseg = 0;
  Reply(c);
}

void NbdConn::PrepareReply(ServerReq* req) {
  auto* c = static_cast<NbdReqCtx*>(req);
  c->frames = c->tx;
  const Request& r = c->rq;
  auto frame = [c](int i) -> TxFrame& {
    TxFrame& f = c->tx[i];
    f.payload = nullptr;
    f.payload_len = 0;
    return f;
  };
  const bool payload_reply = r.type == kCmdRead || r.type == kCmdBlockStatus;
  if (!structured_ || !payload_reply) {
    // Simple reply (allowed for every command without payload even when structured).
    TxFrame& f = frame(0);
    EncodeSimpleReply(c->status, r.cookie, f.header);
    f.header_len = kSimpleReplySize;
    if (c->status == 0 && r.type == kCmdRead) {
      f.payload = c->buf;  // the pool buffer the device filled: no copy
      f.payload_len = r.length;
    }
    c->frames_out = 1;
    return;
  }
  if (c->status) {
    TxFrame& f = frame(0);
    EncodeChunkHeader(kReplyFlagDone, kChunkError, r.cookie, 6, f.header);
    Put32(f.header + kChunkHeaderSize, c->status);
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

// ------------------------------------------------------------------------------------------------
// NbdServer

NbdServer::NbdServer(asio::io_context& io, NbdServerOptions opts)
    : impl_(std::make_shared<Impl>(io, std::move(opts))) {}

NbdServer::~NbdServer() { impl_->Shutdown(); }

Status NbdServer::Start() {
  Status st = impl_->Start();
  return st.ok() ? st : st.WithContext("NBD");
}

std::uint16_t NbdServer::port() const { return impl_->port(); }

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
  e->Init(spec.name, spec.device, spec.read_only, spec.allow);
  std::uint32_t min = e->info.logical_block_size ? e->info.logical_block_size : 1;
  if (min > 65536 || (min & (min - 1))) return Status::InvalidArgument("device block size not a power of two <= 64 KiB");
  e->min_block = min;
  e->pref_block = std::max(impl_->opts_.preferred_block, min);
  std::uint32_t maxp = impl_->opts_.max_payload;
  if (e->info.max_io_bytes && e->info.max_io_bytes < maxp) maxp = e->info.max_io_bytes;
  maxp -= maxp % e->pref_block;
  if (maxp < e->pref_block) return Status::InvalidArgument("max payload below the preferred block size");
  e->max_payload = maxp;
  e->spec = std::move(spec);
  return impl_->AddExport(std::move(e));
}

Status NbdServer::RemoveExport(const std::string& name) { return impl_->RemoveExport(name); }

Status NbdServer::SetAccess(const std::string& name, std::optional<AccessList> allow) {
  return impl_->SetAccess(name, std::move(allow));
}

std::vector<NbdExportStatus> NbdServer::ListExports() const {
  return impl_->ListExportsAs<NbdExportStatus, NbdExportEntry>(
      [](const NbdExportEntry& e, const ExportCounters&, NbdExportStatus* s) {
        s->description = e.spec.description;
      });
}

NbdServerStats NbdServer::Stats() const {
  NbdServerStats s;
  impl_->FillStats(&s);
  s.tls_handshakes = impl_->tls_handshakes_.load(std::memory_order_relaxed);
  return s;
}

void NbdServer::Drain(std::function<void(Status)> done) { impl_->Drain(std::move(done)); }

}  // namespace dst::net
