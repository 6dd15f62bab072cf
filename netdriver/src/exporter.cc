// Exporter: the DST protocol on the shared server core (server_core.h: accept loop, pools,
// backpressure, stall sweep, drain, teardown, counters).  This file holds only the DST phases:
// the HELLO handshake with the session fence, request decode and checks, reply encode.  See
// exporter.h for the connection state diagram and docs/protocol.md for the wire rules enforced
// here.
//
// Per request header (on the connection's strand):
//
//   decode --ok--> [CheckRequest] --READ/WRITE--> pool buffer --READ--> SUBMIT
//     |               |   |                          \--WRITE--> payload --> [digest] --> SUBMIT
//     |               |   +--FLUSH/TRIM/WRITE_ZEROES--> SUBMIT
//     | framing       +--refused (a WRITE's payload discarded first), PING --> immediate reply
//     v  error
//   EPROTO reply, close
#include "dst/net/exporter.h"

#include <cstring>
#include <unordered_map>

#include <boost/asio/post.hpp>

#include "dst/net/codec.h"
#include "server_core.h"

namespace dst::net {

namespace asio = boost::asio;

struct ExportEntry : ServedExport {
  ExportSpec spec;
  ExportLimits limits;
  std::atomic<std::uint64_t> digest_errors{0};  // WRITE payloads refused for a bad digest
};

class Conn;

class Exporter::Impl : public ServerCore {
 public:
  Impl(asio::io_context& io, const ExporterOptions& opts) : ServerCore(io, detail::CoreOptionsOf(opts, "dst exporter", "export")), opts_(opts) {}

  std::shared_ptr<ServerConn> NewConn(std::unique_ptr<Transport> t) override;

  // Session fence (docs/protocol.md §6.3): the live connection of each session, keyed by the
  // session id, the export and the identity (SessionKey), so an id learned on one export or by
  // one identity cannot fence a connection to another export or of another identity.
  std::shared_ptr<Conn> ClaimSession(const std::string& key, const std::shared_ptr<Conn>& c);
  void ReleaseSession(const std::string& key, const Conn* c);

  const ExporterOptions opts_;
  std::atomic<std::uint64_t> digest_errors_{0};

 private:
  std::mutex session_mu_;
  std::unordered_map<std::string, std::weak_ptr<Conn>> sessions_;  // GUARDED_BY(session_mu_)
};

// A request slot.
struct ReqCtx : ServerReq {
  Header h;
  TxFrame tx;
};

class Conn : public ServerConn {
 public:
  Conn(std::shared_ptr<Exporter::Impl> impl, std::unique_ptr<Transport> t)
      : ServerConn(impl, std::move(t)),
        impl_(impl.get()),
        ctxs_(MakeSlots<ReqCtx>()) {}

  // Posted by a newer connection of the same session (§6.3).
  void Fence(std::shared_ptr<Conn> waiter);
  void FenceDone();

 private:
  std::shared_ptr<Conn> Self() { return std::static_pointer_cast<Conn>(shared_from_this()); }
  ExportEntry* entry() const { return static_cast<ExportEntry*>(served().get()); }

  // ServerConn hooks.
  bool FramesInHandshake() const override { return !awaiting_fence_; }
  std::size_t FrameSize() const override { return kHeaderSize; }
  void HandleFrame(const std::uint8_t* hdr) override;
  void StartData(ServerReq* r) override;
  void OnPayload(ServerReq* r) override;
  void OnDeviceDone(ServerReq* r, const Status& st) override;
  void PrepareReply(ServerReq* r) override;
  const char* HandshakeStall() const override { return awaiting_fence_ ? nullptr : "no HELLO"; }
  void OnFinished() override;

  void OnHelloPayload(const boost::system::error_code& ec, ServerReq*);
  void SendHelloReply();
  void SendHelloError(WireStatus ws);
  void ProtocolError(const char* what, const char* detail, bool id_known, std::uint64_t id);
  void SendControl(const Header& h, const void* payload, std::uint32_t len);
  void ReplyNow(ReqCtx* c, WireStatus ws);
  static void OnCtlSent(TxFrame* f, bool ok);

  Exporter::Impl* impl_;
  std::unique_ptr<ReqCtx[]> ctxs_;

  ExportLimits lim_;
  bool read_only_ = false;
  bool digest_ = false;  // payload digests negotiated (docs/protocol.md §4.1)
  std::string session_;  // SessionKey, or empty without a session id
  bool awaiting_fence_ = false;
  std::shared_ptr<Conn> fence_target_;  // the older connection we wait for
  std::shared_ptr<Conn> fence_waiter_;  // the newer connection waiting for us

  Header hello_hdr_;
  std::uint8_t hello_buf_[kMaxHelloPayload];
  std::uint8_t hello_reply_[kHelloReplySize];
  TxFrame ctl_tx_;  // HELLO reply or the EPROTO reply before a close
  bool ctl_busy_ = false;
};

std::shared_ptr<ServerConn> Exporter::Impl::NewConn(std::unique_ptr<Transport> t) {
  return std::make_shared<Conn>(std::static_pointer_cast<Impl>(shared_from_this()), std::move(t));
}

namespace {
// Identity and export name are at most 255 bytes; the id comes last, so the three cannot run
// into each other.
std::string SessionKey(std::uint64_t id, const std::string& export_name, const std::string& identity) {
  std::string k;
  k.reserve(export_name.size() + identity.size() + 4 + 8);
  k.append(std::to_string(export_name.size())).append(":").append(export_name);
  k.append(identity).append(1, '\0');
  k.append(reinterpret_cast<const char*>(&id), sizeof id);
  return k;
}
}  // namespace

std::shared_ptr<Conn> Exporter::Impl::ClaimSession(const std::string& key, const std::shared_ptr<Conn>& c) {
  std::lock_guard<std::mutex> l(session_mu_);
  auto& slot = sessions_[key];
  std::shared_ptr<Conn> old = slot.lock();
  slot = c;
  return old;
}

void Exporter::Impl::ReleaseSession(const std::string& key, const Conn* c) {
  std::lock_guard<std::mutex> l(session_mu_);
  auto it = sessions_.find(key);
  if (it == sessions_.end()) return;
  auto cur = it->second.lock();
  if (!cur || cur.get() == c) sessions_.erase(it);
}

// ----------------------------------------------------------------------------------------------
// Requests

namespace {
std::uint32_t IoFlags(const Header& h) {
  std::uint32_t f = 0;
  if (h.flags & kFlagFua) f |= kIoFua;
  if (h.flags & kFlagNoUnmap) f |= kIoNoUnmap;
  return f;
}
}  // namespace

void Conn::HandleFrame(const std::uint8_t* hdr) {
  Header h;
  Status st = DecodeHeader(hdr, &h);
  if (!st.ok()) {
    const bool magic_ok = GetU32(hdr) == kMagic;
    ProtocolError("framing error", st.message().c_str(), magic_ok, magic_ok ? GetU64(hdr + 16) : 0);
    return;
  }
  if (h.is_reply()) return ProtocolError("framing error", "reply frame sent to the server", true, h.id);

  if (phase_ == Phase::kHandshake) {
    if (h.command() != Cmd::kHello) return ProtocolError("framing error", "request before HELLO", true, h.id);
    hello_hdr_ = h;
    ReadBody(hello_buf_, h.length, nullptr, &Conn::OnHelloPayload);
    return;
  }
  if (h.command() == Cmd::kHello) return ProtocolError("framing error", "second HELLO", true, h.id);

  CountRequest();
  if (h.command() == Cmd::kDisconnect) {
    BeginClose(false);  // in-flight requests finish and are answered first
    return;
  }
  auto* c = static_cast<ReqCtx*>(TakeSlot());
  c->h = h;
  switch (h.command()) {
    case Cmd::kPing:
      return ReplyNow(c, WireStatus::kOk);
    case Cmd::kFlush:
      if (read_only_) return ReplyNow(c, WireStatus::kOk);  // nothing can be dirty
      return Submit(c, IoOp::kFlush, IoFlags(h), 0, 0);
    default:
      break;
  }
  WireStatus ws = CheckRequest(h, lim_);
  if (ws != WireStatus::kOk) {
    c->status = static_cast<std::uint32_t>(ws);
    // The payload follows regardless; discard it so the stream stays in sync (§8).
    if (h.command() == Cmd::kWrite) return DiscardPayload(c, h.length);
    return Reply(c);
  }
  switch (h.command()) {
    case Cmd::kRead:
    case Cmd::kWrite: return AcquireBuffer(c);
    case Cmd::kTrim: return Submit(c, IoOp::kTrim, IoFlags(h), h.offset, h.length);
    case Cmd::kWriteZeroes: return Submit(c, IoOp::kWriteZeroes, IoFlags(h), h.offset, h.length);
    default: return ReplyNow(c, WireStatus::kInval);
  }
}

void Conn::StartData(ServerReq* r) {
  auto* c = static_cast<ReqCtx*>(r);
  if (c->h.command() == Cmd::kRead) {
    Submit(c, IoOp::kRead, IoFlags(c->h), c->h.offset, c->h.length);
    return;
  }
  ReceivePayload(c, c->h.length);
}

// §4.1: with digests negotiated, a WRITE whose payload does not match its digest (or carries
// none) is not applied; EBADMSG tells the client to send it again.
void Conn::OnPayload(ServerReq* r) {
  auto* c = static_cast<ReqCtx*>(r);
  if (digest_ && (!(c->h.flags & kFlagDigest) || PayloadDigest(c->buf, c->h.length) != c->h.digest)) {
    impl_->digest_errors_.fetch_add(1, std::memory_order_relaxed);
    entry()->digest_errors.fetch_add(1, std::memory_order_relaxed);
    Log("WRITE payload digest mismatch", "not applied, client will re-send");
    return ReplyNow(c, WireStatus::kBadMsg);
  }
  Submit(c, IoOp::kWrite, IoFlags(c->h), c->h.offset, c->h.length);
}

void Conn::OnDeviceDone(ServerReq* r, const Status& st) { r->status = static_cast<std::uint32_t>(ToWireStatus(st)); }

void Conn::PrepareReply(ServerReq* r) {
  auto* c = static_cast<ReqCtx*>(r);
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
  EncodeHeader(h, c->tx.header);
  c->frames = &c->tx;
  c->frames_out = 1;
}

void Conn::ReplyNow(ReqCtx* c, WireStatus ws) {
  c->status = static_cast<std::uint32_t>(ws);
  Reply(c);
}

// ----------------------------------------------------------------------------------------------
// Handshake

void Conn::OnHelloPayload(const boost::system::error_code& ec, ServerReq*) {
  if (ec) {
    ProtocolViolation("truncated HELLO", ec.message().c_str());
    BeginClose(false);
    return;
  }
  if (phase_ == Phase::kClosing) return;
  HelloRequest req;
  Status st = DecodeHelloRequest(hello_buf_, hello_hdr_.length, &req);
  if (!st.ok()) return ProtocolError("bad HELLO", st.message().c_str(), true, hello_hdr_.id);
  digest_ = (req.features & kFeatureDigestXxh3) != 0;
  if (req.version != kProtocolVersion) {
    ProtocolViolation("unsupported protocol version in HELLO", nullptr);
    return SendHelloError(WireStatus::kProto);
  }
  if (!core_->accepting()) return SendHelloError(WireStatus::kShutdown);
  auto e = core_->FindExport(req.export_name);
  if (!e) {
    Log("HELLO for unknown export", req.export_name.c_str());
    return SendHelloError(WireStatus::kNoEnt);
  }
  const Access access = AccessTo(*e);
  if (access == Access::kNone) {
    LogDenied(req.export_name);
    return SendHelloError(WireStatus::kAcces);
  }
  if (!ClaimPeerIdentity().ok()) return SendHelloError(WireStatus::kBusy);
  if (!core_->Attach(this, e)) return SendHelloError(WireStatus::kShutdown);
  lim_ = entry()->limits;
  read_only_ = access == Access::kReadOnly;  // includes a read-only export
  lim_.read_only = read_only_;
  std::shared_ptr<Conn> old;
  if (req.session_id != 0) {
    session_ = SessionKey(req.session_id, e->name, peer_identity());
    old = impl_->ClaimSession(session_, Self());
  }
  if (old && old.get() != this) {
    // §6.3: the older connection stops reading and finishes its in-flight requests first.
    awaiting_fence_ = true;
    fence_target_ = old;
    asio::post(old->strand(), [old, self = Self()] { old->Fence(self); });
    return;
  }
  SendHelloReply();
}

void Conn::Fence(std::shared_ptr<Conn> waiter) {
  Scope s(this);
  if (finished()) {
    asio::post(waiter->strand(), [waiter] { waiter->FenceDone(); });
    return;
  }
  fence_waiter_ = std::move(waiter);
  BeginClose(true);  // stop reading; replies still pending are dropped with the socket
}

void Conn::FenceDone() {
  Scope s(this);
  awaiting_fence_ = false;
  fence_target_.reset();
  if (phase_ == Phase::kClosing) return;
  SendHelloReply();
}

void Conn::SendControl(const Header& h, const void* payload, std::uint32_t len) {
  EncodeHeader(h, ctl_tx_.header);
  ctl_tx_.payload = static_cast<const char*>(payload);
  ctl_tx_.payload_len = len;
  ctl_tx_.on_sent = &Conn::OnCtlSent;
  ctl_tx_.owner = this;
  ctl_busy_ = true;
  Send(&ctl_tx_);
}

void Conn::OnCtlSent(TxFrame* f, bool) {
  auto* conn = static_cast<Conn*>(f->owner);
  conn->ctl_busy_ = false;
  conn->FrameSent();
}

void Conn::SendHelloReply() {
  const DeviceInfo& info = entry()->info;
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
  phase_ = Phase::kServing;
  SendControl(h, hello_reply_, kHelloReplySize);
}

void Conn::SendHelloError(WireStatus ws) {
  Header h;
  h.cmd = static_cast<std::uint16_t>(Cmd::kHello) | kReplyBit;
  h.status = static_cast<std::uint32_t>(ws);
  h.id = hello_hdr_.id;
  SendControl(h, nullptr, 0);
  BeginClose(false);
}

void Conn::ProtocolError(const char* what, const char* detail, bool id_known, std::uint64_t id) {
  ProtocolViolation(what, detail);
  if (!ctl_busy_) {
    // §8.1: DISCONNECT|reply with EPROTO, then the server closes.
    Header h;
    h.cmd = static_cast<std::uint16_t>(Cmd::kDisconnect) | kReplyBit;
    h.status = static_cast<std::uint32_t>(WireStatus::kProto);
    h.id = id_known ? id : 0;
    SendControl(h, nullptr, 0);
  }
  BeginClose(false);
}

// Closed: hand the fence on and leave the session table.
void Conn::OnFinished() {
  if (!session_.empty()) impl_->ReleaseSession(session_, this);
  std::shared_ptr<Conn> waiter = std::move(fence_waiter_);
  if (waiter) {
    if (awaiting_fence_ && fence_target_) {
      // We were ourselves waiting for an older connection: the newest one waits for it now.
      auto older = fence_target_;
      asio::post(older->strand(), [older, waiter] { older->Fence(waiter); });
    } else {
      asio::post(waiter->strand(), [waiter] { waiter->FenceDone(); });
    }
  }
  fence_target_.reset();
}

// ----------------------------------------------------------------------------------------------
// Exporter

Exporter::Exporter(asio::io_context& io, ExporterOptions opts) : impl_(std::make_shared<Impl>(io, opts)) {}

Exporter::~Exporter() { impl_->Shutdown(); }

Status Exporter::Start() { return impl_->Start(); }

std::uint16_t Exporter::port() const { return impl_->port(); }

Status Exporter::AddExport(ExportSpec spec) {
  if (spec.name.empty() || spec.name.size() > kMaxExportNameLen)
    return Status::InvalidArgument("export name must be 1..255 characters");
  for (unsigned char ch : spec.name)
    if (ch < 0x21 || ch > 0x7e) return Status::InvalidArgument("export name must be printable ASCII");
  if (!spec.device) return Status::InvalidArgument("export " + spec.name + " has no device");
  auto e = std::make_shared<ExportEntry>();
  e->Init(spec.name, spec.device, spec.read_only, spec.allow);
  e->limits.size = e->info.size;
  e->limits.block_size = e->info.logical_block_size ? e->info.logical_block_size : 512;
  std::uint32_t maxp = impl_->opts_.max_payload;
  if (e->info.max_io_bytes && e->info.max_io_bytes < maxp) maxp = e->info.max_io_bytes;
  if (maxp > impl_->pool_buffer_size()) maxp = static_cast<std::uint32_t>(impl_->pool_buffer_size());
  e->limits.max_payload = maxp;
  e->limits.read_only = e->read_only;
  e->limits.can_trim = e->info.can_trim;
  e->limits.can_write_zeroes = e->info.can_write_zeroes;
  e->spec = std::move(spec);
  return impl_->AddExport(std::move(e));
}

Status Exporter::RemoveExport(const std::string& name) { return impl_->RemoveExport(name); }

Status Exporter::SetAccess(const std::string& name, std::optional<AccessList> allow) {
  return impl_->SetAccess(name, std::move(allow));
}

std::vector<ExportStatus> Exporter::ListExports() const {
  return impl_->ListExportsAs<ExportStatus, ExportEntry>(
      [](const ExportEntry& e, const ExportCounters& k, ExportStatus* s) {
        s->requests = k.requests;
        s->digest_errors = e.digest_errors.load(std::memory_order_relaxed);
        s->frames_sent = k.frames_sent;
        s->send_calls = k.send_calls;
        s->frames_per_call = k.frames_per_call;
      });
}

ExporterStats Exporter::Stats() const {
  ExporterStats s;
  impl_->FillStats(&s);
  s.digest_errors = impl_->digest_errors_.load();
  return s;
}

void Exporter::Drain(std::function<void(Status)> done) { impl_->Drain(std::move(done)); }

}  // namespace dst::net
