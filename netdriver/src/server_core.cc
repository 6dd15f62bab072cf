// ServerCore and ServerConn: see server_core.h for the connection state diagram.
#include "server_core.h"

#include <algorithm>
#include <cstdio>
#include <vector>

#include <boost/asio/post.hpp>

#include "dst/log_escape.h"

namespace dst::net::detail {

namespace asio = boost::asio;

namespace {

constexpr std::chrono::seconds kCloseGrace{5};   // unsent replies of a closing connection
constexpr std::chrono::seconds kDrainGrace{20};  // Drain(): then connections are forced shut
// At max_connections, after kRefusalBurst refusals in a kFullPause window, the accept loop rests
// until the window ends (or a connection leaves): a connect flood then waits in the kernel's
// backlog instead of costing an accept and a close each.
constexpr std::chrono::milliseconds kFullPause{500};
constexpr int kRefusalBurst = 128;
constexpr std::chrono::seconds kLogInterval{10};  // LogLimited: one line per key and interval
constexpr std::size_t kMaxLogWindows = 4096;      // LogLimited keys remembered
constexpr int kMaxLinesPerInterval = 32;          // LogLimited lines per interval, all keys
using Clock = std::chrono::steady_clock;

// "192.0.2.7:40312" -> "192.0.2.7", "::1:40312" -> "::1"; anything else as is.
std::string AddressOf(const std::string& peer) {
  const auto colon = peer.rfind(':');
  if (colon == std::string::npos || colon + 1 == peer.size()) return peer;
  for (std::size_t i = colon + 1; i < peer.size(); ++i)
    if (peer[i] < '0' || peer[i] > '9') return peer;
  return peer.substr(0, colon);
}

// Drops `key` from a count map when it reaches zero (the map stays as small as the open set).
void Decrement(std::unordered_map<std::string, std::uint32_t>* m, const std::string& key) {
  auto it = m->find(key);
  if (it == m->end()) return;
  if (--it->second == 0) m->erase(it);
}

ServerCoreOptions Sanitize(ServerCoreOptions o) {
  if (o.max_inflight_per_connection == 0) o.max_inflight_per_connection = 1;
  if (o.buffer_count == 0) o.buffer_count = 1;
  if (o.buffer_size < 4096) o.buffer_size = 4096;
  return o;
}

}  // namespace

// ================================================================================================
// ServerConn

ServerConn::ServerConn(std::shared_ptr<ServerCore> core, std::unique_ptr<Transport> transport)
    : core_ref_(std::move(core)),
      core_(core_ref_.get()),
      transport_(std::move(transport)),
      peer_(transport_->peer()),
      address_(AddressOf(peer_)),
      strand_(transport_->strand()),
      tx_(*transport_, core_->options().batching, &tx_stats_),
      close_timer_(strand_),
      accepted_at_(Clock::now()),
      progress_at_(accepted_at_),
      active_at_(accepted_at_) {
  tx_.set_error_handler(&ServerConn::OnTxError, this);
}

ServerConn::~ServerConn() {
  core_->CancelWait(this);
  if (counted_active_) core_->SetActive(false);
}

bool ServerConn::MayGrow() const {
  // A connection whose replies already wait on it gains nothing from more buffers: they would
  // only queue behind the others.  Its first buffer it always may take.
  return bufs_held_ == 0 || (tx_.idle() && core_->MayTake(bufs_held_));
}

void ServerConn::SyncActive() {
  const bool active = bufs_held_ > 0 || pending_ != nullptr;
  if (active == counted_active_) return;
  counted_active_ = active;
  core_->SetActive(active);
}

void ServerConn::Start() {
  asio::post(strand_, [self = shared_from_this()] {
    Scope s(self.get());
    self->OnStart();
  });
}

void ServerConn::StartDrain(bool force) {
  Scope s(this);
  BeginClose(force);
}

void ServerConn::Sweep(Clock::time_point now) {
  Scope s(this);
  if (finished_ || phase_ == Phase::kClosing) return;
  const ServerCoreOptions& o = core_->options();
  // Null while the server waits on itself (DST's session fence): no deadline runs then.
  const char* handshake = phase_ == Phase::kHandshake ? HandshakeStall() : nullptr;
  const bool waiting_on_client = in_payload_ || !tx_.idle() || handshake;
  if (!waiting_on_client || progress_ != seen_progress_) {
    seen_progress_ = progress_;
    progress_at_ = now;
  }
  if (requests_ != seen_requests_) {
    seen_requests_ = requests_;
    active_at_ = now;
  }
  // Bytes drained, not frames, while replies wait on the client.  A window closes only while
  // they keep waiting; a reader that empties its queue starts a new one.
  bool slow_reader = false;
  if (o.limits.min_drain_rate > 0 && o.limits.drain_window.count() > 0 && !tx_.idle()) {
    const std::uint64_t sent = tx_stats_.bytes.load(std::memory_order_relaxed);
    if (!drain_window_open_) {
      drain_window_open_ = true;
      drain_from_ = now;
      drain_bytes_at_ = sent;
    } else if (now - drain_from_ >= o.limits.drain_window) {
      const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now - drain_from_).count();
      slow_reader = sent - drain_bytes_at_ < o.limits.min_drain_rate * std::uint64_t(ms) / 1000;
      drain_from_ = now;
      drain_bytes_at_ = sent;
    }
  } else {
    drain_window_open_ = false;
  }
  const char* why = nullptr;
  const char* detail = nullptr;
  if (handshake && o.limits.handshake_timeout.count() > 0 && now - accepted_at_ >= o.limits.handshake_timeout) {
    why = "handshake deadline passed, closed";
    detail = handshake;
  } else if (waiting_on_client && o.stall_timeout.count() > 0 && now - progress_at_ >= o.stall_timeout) {
    why = "stalled client closed";
    detail = handshake ? handshake : in_payload_ ? "payload stopped arriving" : "replies not read";
  } else if (slow_reader) {
    why = "slow reader closed";
    detail = "replies read slower than min_drain_rate";
  } else if (phase_ == Phase::kServing && !waiting_on_client && dev_inflight_ == 0 && !pending_ &&
             o.limits.idle_timeout.count() > 0 && now - active_at_ >= o.limits.idle_timeout) {
    why = "idle connection closed";
    detail = "no request within idle_timeout";
  }
  if (!why) return;
  core_->timed_out_.fetch_add(1, std::memory_order_relaxed);
  core_->LogLimited(address_, why, detail);
  BeginClose(true);
}

void ServerConn::PostSweep(Clock::time_point now) {
  asio::post(strand_, H([self = shared_from_this(), now] { self->Sweep(now); }));
}

void ServerConn::OnPoolResume() {
  Scope s(this);
  parked_pool_ = false;
  ResumeAfterBuffer();
}

void ServerConn::AddSlot(ServerReq* r) {
  r->conn = this;
  r->next = free_;
  free_ = r;
}

ServerReq* ServerConn::TakeSlot() {
  ServerReq* r = free_;  // MaybeRead only parses a request when a slot is free
  free_ = r->next;
  r->next = nullptr;
  r->buf = nullptr;
  r->status = 0;
  return r;
}

void ServerConn::ReleaseSlot(ServerReq* r) {
  if (r->buf) {
    char* b = r->buf;
    r->buf = nullptr;
    --bufs_held_;
    core_->PutBuffer(b);
  }
  r->next = free_;
  free_ = r;
}

void ServerConn::CountRequest() {
  ++requests_;
  core_->requests_.fetch_add(1, std::memory_order_relaxed);
  if (served_) served_->requests.fetch_add(1, std::memory_order_relaxed);
}

void ServerConn::ProtocolViolation(const char* what, const char* detail) {
  core_->protocol_errors_.fetch_add(1, std::memory_order_relaxed);
  Log(what, detail);
}

// ------------------------------------------------------------------------------------------------
// Read side

void ServerConn::Pump() {
  SyncActive();
  if (finished_) return;
  if (pending_ && !parked_pool_ && phase_ != Phase::kClosing && MayGrow()) {
    ResumeAfterBuffer(true);  // nested Scope: Pump runs again at its end
    return;
  }
  MaybeRead();
  MaybeFinish();
  SyncActive();
}

// Parses every whole request already buffered, then receives more.  Runs from Pump (depth 0),
// so the handlers it calls never re-enter it; it stops where a request has to wait (no free slot,
// no buffer, a payload still on the wire, a handshake step) and Pump calls it again after that.
void ServerConn::MaybeRead() {
  if (parsing_) return;
  parsing_ = true;
  const std::size_t n = FrameSize();
  while (CanRead() && rx_.size() >= n) {
    rx_.Take(hdr_, n);
    HandleFrame(hdr_);
  }
  parsing_ = false;
  if (!CanRead()) return;
  reading_ = true;
  transport_->AsyncReadSome(rx_.Space(), [self = shared_from_this()](const boost::system::error_code& ec, std::size_t got) {
    self->OnRx(ec, got);
  });
}

bool ServerConn::CanRead() const {
  if (reading_ || writing_ || upgrading_ || pending_ || phase_ == Phase::kClosing) return false;
  if (phase_ == Phase::kHandshake) return FramesInHandshake();
  return free_ != nullptr;  // every slot busy: backpressure
}

void ServerConn::OnRx(const boost::system::error_code& ec, std::size_t n) {
  Scope s(this);
  reading_ = false;
  ++progress_;
  if (ec) {
    if (rx_.size() > 0 && phase_ != Phase::kClosing) ProtocolViolation("truncated request header", ec.message().c_str());
    BeginClose(false);
    return;
  }
  rx_.Commit(n);  // parsed by Pump -> MaybeRead when this handler returns
}

void ServerConn::AcquireBuffer(ServerReq* r) {
  if (!MayGrow()) {
    pending_ = r;  // over this connection's share: resumed by Pump when one of ours comes back
    return;
  }
  r->buf = core_->TryGetOrWait(this);
  if (!r->buf) {
    pending_ = r;  // resumed by OnPoolResume
    parked_pool_ = true;
    return;
  }
  ++bufs_held_;
  StartData(r);
}

void ServerConn::ResumeAfterBuffer(bool share_checked) {
  Scope s(this);
  if (finished_ || !pending_) return;
  ServerReq* r = pending_;
  if (phase_ == Phase::kClosing) {
    core_->CancelWait(this);
    parked_pool_ = false;
    pending_ = nullptr;
    ReleaseSlot(r);
    return;
  }
  // Over the share: Pump retries when one of ours comes back.  Not rechecked when Pump just
  // checked: another thread may flip it, and Pump -> here -> Pump must change state each time.
  if (!share_checked && !MayGrow()) return;
  char* b = core_->TryGetOrWait(this);
  if (!b) {
    parked_pool_ = true;  // still parked
    return;
  }
  pending_ = nullptr;
  r->buf = b;
  ++bufs_held_;
  StartData(r);
}

void ServerConn::ReceivePayload(ServerReq* r, std::uint32_t len) {
  ReadBody(r->buf, len, r, &ServerConn::AfterPayload);
}

void ServerConn::AfterPayload(const boost::system::error_code& ec, ServerReq* r) {
  if (ec) {
    if (phase_ != Phase::kClosing) ProtocolViolation("truncated WRITE payload", ec.message().c_str());
    ReleaseSlot(r);  // never acknowledged, never written
    BeginClose(false);
    return;
  }
  OnPayload(r);
}

void ServerConn::DiscardPayload(ServerReq* r, std::uint32_t len) { Discard(len, r, &ServerConn::AfterDiscard); }

void ServerConn::AfterDiscard(const boost::system::error_code& ec, ServerReq* r) {
  if (ec) {
    ReleaseSlot(r);
    BeginClose(false);
    return;
  }
  Reply(r);
}

// ------------------------------------------------------------------------------------------------
// Device submission and replies

void ServerConn::Submit(ServerReq* r, IoOp op, std::uint32_t flags, std::uint64_t offset, std::uint32_t length) {
  IoRequest& io = r->io;
  io = IoRequest{};
  io.op = op;
  io.flags = flags;
  io.offset = offset;
  io.length = length;
  io.data = r->buf;
  io.done = &ServerConn::OnIoDone;
  io.ctx = r;
  ++dev_inflight_;
  served_->device->Submit(&io);  // may complete inline; the reply still goes via DrainDone
}

void ServerConn::OnIoDone(IoRequest* req, Status st) {
  auto* r = static_cast<ServerReq*>(req->ctx);
  r->conn->OnDeviceDone(r, st);
  r->conn->PushDone(r);
}

void ServerConn::PushDone(ServerReq* r) {
  bool post = false;
  {
    std::lock_guard<std::mutex> l(done_mu_);
    r->next = nullptr;
    if (done_tail_) done_tail_->next = r; else done_head_ = r;
    done_tail_ = r;
    if (!drain_posted_) post = drain_posted_ = true;
  }
  // One post per burst; the arena keeps it off the heap even from a device thread.
  if (post) asio::post(strand_, H([self = shared_from_this()] { self->DrainDone(); }));
}

void ServerConn::DrainDone() {
  Scope s(this);
  ServerReq* list;
  {
    std::lock_guard<std::mutex> l(done_mu_);
    list = done_head_;
    done_head_ = done_tail_ = nullptr;
    drain_posted_ = false;
  }
  while (list) {
    ServerReq* r = list;
    list = r->next;
    r->next = nullptr;
    --dev_inflight_;
    Emit(r);
  }
  tx_.Flush();  // many frames, one system call
}

void ServerConn::Emit(ServerReq* r) {
  PrepareReply(r);
  if (r->status != 0) core_->errors_replied_.fetch_add(1, std::memory_order_relaxed);
  const int n = r->frames_out;
  for (int i = 0; i < n; ++i) {
    r->frames[i].on_sent = &ServerConn::OnReqSent;
    r->frames[i].owner = r;
    tx_.Enqueue(&r->frames[i]);
  }
}

void ServerConn::Reply(ServerReq* r) {
  Emit(r);
  tx_.Flush();
}

void ServerConn::Send(TxFrame* f) {
  tx_.Enqueue(f);
  tx_.Flush();
}

void ServerConn::OnReqSent(TxFrame* f, bool) {
  auto* r = static_cast<ServerReq*>(f->owner);
  ServerConn* c = r->conn;
  ++c->progress_;
  if (--r->frames_out > 0) return;
  c->ReleaseSlot(r);
  if (c->depth_ == 0) {
    Scope s(c);  // from the Transmitter's writable handler: still on the strand
  }
}

void ServerConn::FrameSent() {
  ++progress_;
  if (depth_ == 0) {
    Scope s(this);
  }
}

void ServerConn::OnTxError(void* ctx) {
  // The Transmitter aborts its queue right after this; we only mark the connection dead.
  auto* c = static_cast<ServerConn*>(ctx);
  c->force_ = true;
  c->phase_ = Phase::kClosing;
}

// ------------------------------------------------------------------------------------------------
// Transport upgrade (STARTTLS)

void ServerConn::StartUpgrade(TransportUpgrade upgrade,
                              std::function<void(ServerConn*, const boost::system::error_code&)> next) {
  upgrading_ = true;
  upgrade(std::move(transport_), [self = shared_from_this(), next = std::move(next)](Status st, std::unique_ptr<Transport> t) {
    Scope s(self.get());
    self->upgrading_ = false;
    ++self->progress_;
    boost::system::error_code ec;
    if (st.ok() && t) {
      self->transport_ = std::move(t);
      self->tx_.Rebind(*self->transport_);
    } else {
      self->core_->LogLimited(self->address_, "connection upgrade failed", st.message().c_str());
      ec = asio::error::connection_aborted;
    }
    next(self.get(), ec);
  });
}

std::chrono::milliseconds ServerConn::HandshakeLeft(std::chrono::milliseconds fallback) const {
  using std::chrono::milliseconds;
  const milliseconds limit = core_->options().limits.handshake_timeout;
  if (limit.count() <= 0) return fallback;
  const auto left = std::chrono::duration_cast<milliseconds>(accepted_at_ + limit - Clock::now());
  return std::max(std::min(left, fallback), milliseconds(1));
}

// ------------------------------------------------------------------------------------------------
// Closing

Status ServerConn::ClaimPeerIdentity() {
  const std::string& id = peer_identity();
  if (id.empty() || !identity_.empty()) return Status::OK();
  Status st = core_->ClaimIdentity(this, id);
  if (!st.ok()) core_->LogLimited(address(), "connection refused", st.message().c_str());
  return st;
}

std::string ServerConn::LogDenied(const std::string& name) {
  std::string why = "identity " + std::string(IdentityName(peer_identity())) + " may not use " +
                    core_->options().export_kind + " " + name + " (not in its access list)";
  core_->LogLimited(address(), "access denied", why.c_str());
  return why;
}

void ServerConn::BeginClose(bool force) {
  if (force) force_ = true;
  phase_ = Phase::kClosing;
}

void ServerConn::MaybeFinish() {
  if (finished_ || phase_ != Phase::kClosing) return;
  if (pending_) {
    core_->CancelWait(this);
    parked_pool_ = false;
    ServerReq* r = pending_;
    pending_ = nullptr;
    ReleaseSlot(r);
  }
  if (upgrading_) return;  // the upgrade's own deadline ends it; its completion pumps again
  if (reading_ || writing_) {
    // End the outstanding receive (or a handshake write the client does not read): nothing new
    // is started.
    if (!read_shut_) {
      read_shut_ = true;
      transport_->Shutdown(writing_ ? Transport::ShutdownHow::kBoth : Transport::ShutdownHow::kRead);
    }
    return;
  }
  if (dev_inflight_ > 0) return;  // the device still owns slots and buffers
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

void ServerConn::Finish() {
  finished_ = true;
  tx_.Abort();  // unsent replies (forced close) are dropped; their slots come back
  SyncActive();
  close_timer_.cancel();
  if (transport_) transport_->Close();
  core_->ConnFinished(this);
  OnFinished();
  // Leave the connection table later, outside any Transmitter frame.
  asio::post(strand_, [self = shared_from_this()] { self->core_->RemoveConn(self.get()); });
}

// ================================================================================================
// ServerCore

ServerCore::ServerCore(asio::io_context& io, ServerCoreOptions opts)
    : io_(io),
      opts_(Sanitize(std::move(opts))),
      ctl_(asio::make_strand(io)),
      accept_timer_(ctl_),
      drain_timer_(ctl_),
      sweep_timer_(io),
      pool_(opts_.buffer_size, opts_.buffer_count) {
  reserve_ = pool_.count() / 8;
  min_share_ = pool_.count() >= 16 ? 2 : 1;
}

bool ServerCore::MayTake(std::size_t held) const {
  if (held == 0) return true;
  const std::size_t active = std::max<std::size_t>(1, active_.load(std::memory_order_relaxed));
  const std::size_t share = std::max(min_share_, (pool_.count() - reserve_) / active);
  return held < share && pool_.available() > reserve_;
}

ServerCore::~ServerCore() = default;

void ServerCore::Log(const std::string& who, const char* what, const char* detail) const {
  // `detail` is often the peer's own words (an export name, a framing error about its bytes).
  std::string d = detail ? EscapeForLog(detail) : std::string();
  std::fprintf(stderr, "%s: %s: %s%s%s\n", opts_.log_name, who.c_str(), what, d.empty() ? "" : ": ",
               d.c_str());
}

void ServerCore::LogLimited(const std::string& address, const char* what, const char* detail) {
  const auto now = Clock::now();
  std::uint64_t held_back = 0;
  {
    std::lock_guard<std::mutex> l(log_mu_);
    if (log_windows_.size() >= kMaxLogWindows) {
      // Forget the quiet keys; if all are busy (a flood from many addresses), forget all.
      std::erase_if(log_windows_, [&](const auto& kv) { return now - kv.second.last >= kLogInterval; });
      if (log_windows_.size() >= kMaxLogWindows) log_windows_.clear();
    }
    auto [it, fresh] = log_windows_.try_emplace(std::string(what) + '|' + address);
    LogWindow& w = it->second;
    if (!fresh && now - w.last < kLogInterval) {
      ++w.held_back;
      return;
    }
    // And a budget over all keys, for a flood from many addresses.
    if (now - budget_start_ >= kLogInterval) {
      budget_start_ = now;
      budget_used_ = 0;
    }
    if (++budget_used_ > kMaxLinesPerInterval) {
      ++w.held_back;
      return;
    }
    held_back = w.held_back;
    w.last = now;
    w.held_back = 0;
  }
  std::string d = detail ? detail : "";
  if (held_back) d += (d.empty() ? "" : "; ") + std::to_string(held_back) + " more like it since the last report";
  Log(address, what, d.c_str());
}

Status ServerCore::SetAccess(const std::string& name, std::optional<AccessList> allow) {
  auto e = FindExport(name);
  if (!e) return Status::NotFound(std::string(opts_.export_kind) + " " + name + " does not exist");
  e->allow.store(allow ? std::make_shared<const AccessList>(std::move(*allow)) : nullptr);
  ForEachConn([e](ServerConn* c) {
    if (c->served() != e || c->granted_ == Access::kNone) return;
    if (c->AccessTo(*e) >= c->granted_) return;  // kNone < kReadOnly < kReadWrite
    c->Log("access revoked, closing", (std::string(IdentityName(c->peer_identity())) + " on " + e->name).c_str());
    c->BeginClose(true);
  });
  return Status::OK();
}

Status ServerCore::ClaimIdentity(ServerConn* c, const std::string& identity) {
  std::lock_guard<std::mutex> l(mu_);
  if (!c->identity_.empty()) return Status::InvalidArgument("identity already claimed");
  auto& n = per_identity_[identity];
  const std::uint32_t cap = opts_.limits.max_connections_per_identity;
  if (cap && n >= cap) {
    if (n == 0) per_identity_.erase(identity);
    refused_.fetch_add(1, std::memory_order_relaxed);
    return Status::Busy("identity " + identity + " has " + std::to_string(n) +
                        " connections (max_connections_per_identity)");
  }
  ++n;
  c->identity_ = identity;
  return Status::OK();
}

Status ServerCore::Start() {
  if (opts_.listener) {
    listener_ = opts_.listener(ctl_);
    if (!listener_) return Status::InvalidArgument("listener factory returned none");
  } else {
    auto l = TcpListener::Open(io_, ctl_, opts_.listen_address, opts_.port);
    if (!l.ok()) return l.status();
    port_ = l.value()->port();
    listener_ = std::move(l).value();
  }
  asio::post(ctl_, [self = shared_from_this()] {
    self->listening_ = true;
    self->DoAccept();
    const ServerLimits& lim = self->opts_.limits;
    if (self->opts_.stall_timeout.count() > 0 || lim.handshake_timeout.count() > 0 || lim.idle_timeout.count() > 0 ||
        (lim.min_drain_rate > 0 && lim.drain_window.count() > 0))
      self->ArmSweep();
  });
  return Status::OK();
}

// Each connection checks its deadlines (ServerConn::Sweep) every quarter of the shortest one,
// at least every second and at most every 20 ms; a deadline is kept to within that period.
void ServerCore::ArmSweep() {
  std::chrono::milliseconds shortest{1000 * 4};
  const auto drain = opts_.limits.min_drain_rate > 0 ? opts_.limits.drain_window : std::chrono::milliseconds(0);
  for (auto t : {opts_.stall_timeout, opts_.limits.handshake_timeout, opts_.limits.idle_timeout, drain})
    if (t.count() > 0) shortest = std::min(shortest, t);
  const auto period = std::max(shortest / 4, std::chrono::milliseconds(20));
  sweep_timer_.expires_after(period);
  sweep_timer_.async_wait(Bind(&sweep_arena_, ctl_, [self = shared_from_this()](const boost::system::error_code& ec) {
    if (ec) return;
    {
      std::lock_guard<std::mutex> l(self->mu_);
      if (self->stopped_ || self->flush_started_) return;
    }
    const auto now = Clock::now();
    {
      std::lock_guard<std::mutex> l(self->mu_);
      for (auto& [p, c] : self->conns_) self->sweep_list_.push_back(c);
    }
    for (auto& c : self->sweep_list_) c->PostSweep(now);
    self->sweep_list_.clear();
    self->ArmSweep();
  }));
}

template <typename F>
void ServerCore::ForEachConn(F&& f) {
  std::vector<std::shared_ptr<ServerConn>> conns;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [p, c] : conns_) conns.push_back(c);
  }
  for (auto& c : conns) asio::post(c->strand(), [c, f] { f(c.get()); });
}

// Runs on ctl_.
void ServerCore::DoAccept() {
  if (!listening_) return;
  listener_->AsyncAccept([self = shared_from_this()](const boost::system::error_code& ec, std::unique_ptr<Transport> t) {
    if (ec == asio::error::operation_aborted || !self->listening_) return;
    if (ec) {
      // EMFILE and friends: back off instead of spinning.
      self->Log("listener", "accept failed", ec.message().c_str());
      self->accept_timer_.expires_after(std::chrono::milliseconds(100));
      self->accept_timer_.async_wait([self](const boost::system::error_code& e) {
        if (!e) self->DoAccept();
      });
      return;
    }
    // Caps first, so a refused connection costs nothing but its socket.  Accepts run one at a
    // time on ctl_, so the counts cannot grow between this check and the insert below.
    const std::string address = AddressOf(t->peer());
    const char* over = nullptr;
    {
      std::lock_guard<std::mutex> l(self->mu_);
      over = self->OverCap(address);
    }
    if (over) {
      self->refused_.fetch_add(1, std::memory_order_relaxed);
      self->LogLimited(address, "connection refused", over);
      t->Close();
      bool full;
      {
        std::lock_guard<std::mutex> l(self->mu_);
        full = self->opts_.limits.max_connections && self->conns_.size() >= self->opts_.limits.max_connections;
      }
      const auto now = Clock::now();
      if (now - self->refusal_window_ >= kFullPause) {
        self->refusal_window_ = now;
        self->refusals_ = 0;
      }
      if (!full || ++self->refusals_ <= kRefusalBurst) {
        self->DoAccept();
        return;
      }
      self->accept_paused_ = true;  // resumed by the timer or RemoveConn
      self->accept_timer_.expires_at(self->refusal_window_ + kFullPause);
      self->accept_timer_.async_wait([self](const boost::system::error_code&) {
        self->accept_paused_ = false;
        self->DoAccept();  // nothing when the listener closed meanwhile
      });
      return;
    }
    auto conn = self->NewConn(std::move(t));
    bool accept = true;
    {
      std::lock_guard<std::mutex> l(self->mu_);
      if (self->draining_ || self->stopped_) {
        accept = false;
      } else {
        self->conns_.emplace(conn.get(), conn);
        ++self->per_address_[conn->address()];
      }
      // The sweep's list (also on ctl_) grows here, where allocating is fine.
      if (self->sweep_list_.capacity() < self->conns_.size()) self->sweep_list_.reserve(2 * self->conns_.size());
    }
    if (!accept) return;  // conn destroyed: transport closed
    self->connections_total_.fetch_add(1, std::memory_order_relaxed);
    if (!conn->peer_identity().empty())  // escaped by Log
      self->Log(conn->peer(), "accepted", ("identity " + conn->peer_identity()).c_str());
    conn->Start();
    self->DoAccept();
  });
}

const char* ServerCore::OverCap(const std::string& address) const {
  const ServerLimits& lim = opts_.limits;
  if (lim.max_connections && conns_.size() >= lim.max_connections) return "too many connections (max_connections)";
  if (lim.max_connections_per_address) {
    auto it = per_address_.find(address);
    if (it != per_address_.end() && it->second >= lim.max_connections_per_address)
      return "too many connections from this address (max_connections_per_address)";
  }
  return nullptr;
}

// Runs on ctl_.
void ServerCore::StopListening() {
  listening_ = false;
  if (listener_) listener_->Close();
  accept_timer_.cancel();
}

void ServerCore::FillStats(ServerStats* s) const {
  s->connections_total = connections_total_.load();
  {
    std::lock_guard<std::mutex> l(mu_);
    s->connections_open = static_cast<int>(conns_.size());
    s->frames_sent = closed_frames_;
    s->send_calls = closed_send_calls_;
    for (const auto& [p, conn] : conns_) {
      s->frames_sent += conn->tx_stats().frames.load(std::memory_order_relaxed);
      s->send_calls += conn->tx_stats().syscalls.load(std::memory_order_relaxed);
    }
  }
  s->requests = requests_.load();
  s->errors_replied = errors_replied_.load();
  s->protocol_errors = protocol_errors_.load();
  s->connections_refused = refused_.load();
  s->connections_timed_out = timed_out_.load();
  s->frames_per_call = s->send_calls ? double(s->frames_sent) / double(s->send_calls) : 0.0;
}

bool ServerCore::accepting() const {
  std::lock_guard<std::mutex> l(mu_);
  return !draining_ && !stopped_;
}

bool ServerCore::Attach(ServerConn* c, const std::shared_ptr<ServedExport>& e) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (draining_ || stopped_) return false;
    e->connections++;
  }
  c->set_served(e);
  return true;
}

Status ServerCore::AddExport(std::shared_ptr<ServedExport> e) {
  std::lock_guard<std::mutex> l(mu_);
  if (exports_.count(e->name)) return Status::Exists(std::string(opts_.export_kind) + " " + e->name + " exists");
  e->order = next_order_++;
  exports_.emplace(e->name, std::move(e));
  return Status::OK();
}

Status ServerCore::RemoveExport(const std::string& name) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = exports_.find(name);
  if (it == exports_.end()) return Status::NotFound(std::string("no ") + opts_.export_kind + " " + name);
  if (it->second->connections > 0)
    return Status::Busy(std::string(opts_.export_kind) + " " + name + " has " +
                        std::to_string(it->second->connections) + " connection(s)");
  exports_.erase(it);
  return Status::OK();
}

std::shared_ptr<ServedExport> ServerCore::FindExport(const std::string& name) const {
  std::lock_guard<std::mutex> l(mu_);
  auto it = exports_.find(name);
  return it == exports_.end() ? nullptr : it->second;
}

std::shared_ptr<ServedExport> ServerCore::FirstExport() const {
  std::lock_guard<std::mutex> l(mu_);
  std::shared_ptr<ServedExport> best;
  for (auto& [n, e] : exports_)
    if (!best || e->order < best->order) best = e;
  return best;
}

char* ServerCore::TryGetOrWait(ServerConn* c) {
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

void ServerCore::PutBuffer(char* b) {
  pool_.Put(b);
  if (waiters_.load() == 0) return;
  std::shared_ptr<ServerConn> wake;
  {
    std::lock_guard<std::mutex> l(pool_mu_);
    while (wait_head_ && !wake) {
      ServerConn* c = wait_head_;
      wait_head_ = c->wait_next_;
      if (!wait_head_) wait_tail_ = nullptr;
      c->waiting_pool_ = false;
      c->wait_next_ = nullptr;
      waiters_.fetch_sub(1);
      wake = c->weak_from_this().lock();  // null while it is being destroyed
    }
  }
  // Resume on its own strand (it re-parks if another connection was faster).
  if (wake) asio::post(wake->strand(), [wake] { wake->OnPoolResume(); });
}

void ServerCore::CancelWait(ServerConn* c) {
  std::lock_guard<std::mutex> l(pool_mu_);
  if (!c->waiting_pool_) return;
  ServerConn* prev = nullptr;
  for (ServerConn* p = wait_head_; p; prev = p, p = p->wait_next_) {
    if (p != c) continue;
    if (prev) prev->wait_next_ = p->wait_next_; else wait_head_ = p->wait_next_;
    if (wait_tail_ == p) wait_tail_ = prev;
    break;
  }
  c->waiting_pool_ = false;
  c->wait_next_ = nullptr;
  waiters_.fetch_sub(1);
}

void ServerCore::ConnFinished(ServerConn* c) {
  std::lock_guard<std::mutex> l(mu_);
  if (c->served()) c->served()->connections--;
}

void ServerCore::RemoveConn(ServerConn* c) {
  std::shared_ptr<ServerConn> hold;  // destroyed after the lock is released
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = conns_.find(c);
    if (it == conns_.end()) return;
    hold = std::move(it->second);
    conns_.erase(it);
    Decrement(&per_address_, c->address());
    if (!c->identity_.empty()) Decrement(&per_identity_, c->identity_);
    if (opts_.limits.max_connections && conns_.size() + 1 == opts_.limits.max_connections)
      asio::post(ctl_, [self = shared_from_this()] {  // a slot is free: stop resting
        if (self->accept_paused_) self->accept_timer_.cancel();
      });
    // Fold its counters into the closed totals in the same critical section that takes it out
    // of the live sum, so the statistics never count it twice or lose it.
    const std::uint64_t frames = c->tx_stats().frames.load(std::memory_order_relaxed);
    const std::uint64_t calls = c->tx_stats().syscalls.load(std::memory_order_relaxed);
    closed_frames_ += frames;
    closed_send_calls_ += calls;
    if (const auto& e = c->served()) {
      e->closed_frames += frames;
      e->closed_send_calls += calls;
    }
  }
  MaybeDrainDone();
}

void ServerCore::Drain(std::function<void(Status)> done) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (drain_done_ || flush_started_) {
      // A second Drain: answering once the first is done would need a list; keep it simple.
      asio::post(io_, [done = std::move(done)] { done(Status::Busy("already draining")); });
      return;
    }
    draining_ = true;
    drain_done_ = std::move(done);
  }
  asio::post(ctl_, [self = shared_from_this()] {
    self->StopListening();
    self->drain_timer_.expires_after(kDrainGrace);
    self->drain_timer_.async_wait([self](const boost::system::error_code& e) {
      if (e) return;
      {
        std::lock_guard<std::mutex> l(self->mu_);
        if (self->flush_started_) return;
      }
      self->ForEachConn([](ServerConn* c) { c->StartDrain(true); });
    });
  });
  ForEachConn([](ServerConn* c) { c->StartDrain(false); });
  MaybeDrainDone();
}

void ServerCore::MaybeDrainDone() {
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

// Flushes every writable export whose device can flush (a read-only export cannot be dirty; a
// device without flush has nothing to flush and would only refuse), with asynchronous device
// flushes (never blocks an io thread), then reports on an io thread.
void ServerCore::FlushAllAndFinish() {
  struct FlushState {
    std::shared_ptr<ServerCore> core;
    std::mutex mu;
    int left = 0;
    Status first_error;
    std::vector<std::shared_ptr<BlockDevice>> devices;
    std::vector<IoRequest> reqs;
  };
  auto fs = std::make_shared<FlushState>();
  fs->core = shared_from_this();
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [name, e] : exports_)
      if (!e->read_only && e->info.can_flush) fs->devices.push_back(e->device);
  }
  // Hands the result to the Drain() caller on an io thread.  The state (which owns the core and
  // the devices) moves into the posted handler, so its last reference never dies on a device
  // thread: if the server is already gone and this held a FileDevice's last reference, its
  // destructor would join the very worker thread running it.
  static constexpr auto finish = [](std::shared_ptr<FlushState> st) {
    std::function<void(Status)> done;
    {
      std::lock_guard<std::mutex> l(st->core->mu_);
      done = std::move(st->core->drain_done_);
      st->core->drain_done_ = nullptr;
    }
    asio::io_context& io = st->core->io_;
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
  // From here on `keep` (and then the posted report) owns the state: this thread (an io thread
  // or the Drain() caller) keeps only plain copies, so a completion may free everything.
  std::vector<std::shared_ptr<BlockDevice>> devices = fs->devices;
  std::vector<IoRequest>* reqs = &fs->reqs;
  fs.reset();
  for (std::size_t i = 0; i < devices.size(); ++i) devices[i]->Submit(&(*reqs)[i]);
}

void ServerCore::Shutdown() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stopped_ = true;
  }
  asio::post(ctl_, [self = shared_from_this()] {
    self->StopListening();
    self->drain_timer_.cancel();
    self->sweep_timer_.cancel();
  });
  ForEachConn([](ServerConn* c) { c->StartDrain(true); });
}

}  // namespace dst::net::detail
