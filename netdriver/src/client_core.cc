// ClientCore: see client_core.h for the state diagrams and the ordering rule.
//
// Everything connection-related runs on one strand of the caller's io_context; Submit() only
// touches a mutex-protected pending list and wakes the strand through an eventfd (a write(2)
// instead of an asio::post, because a post from a thread outside the io_context allocates).
//
// Timing runs on one periodic tick (<= 250 ms, finer for short timeouts): keepalive probes and
// silence detection, io_timeout and reconnect backoff.
//
// Every slot reuse bumps the slot's generation, so a reply that arrives for an earlier use of a
// slot (a late or duplicated reply) does not match: the protocol drains its payload.
#include "client_core.h"

#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>

#include "dst/net/tcp_transport.h"

namespace dst::net {

namespace asio = boost::asio;
using Clock = ClientClock;
using std::chrono::milliseconds;

namespace {

constexpr std::size_t kPayloadChunk = 256u << 10;  // rx progress (keepalive) granularity
constexpr std::size_t kDrainBufSize = 64u << 10;
constexpr std::uint32_t kProbeBufSize = 64u << 10;
// Backstop: a request that was the first one sent on this many consecutive connections that
// died before answering any request is failed with EIO instead of being re-sent again.
constexpr int kPoisonLosses = 3;

bool IsWriteType(IoOp op) {
  return op == IoOp::kWrite || op == IoOp::kTrim || op == IoOp::kWriteZeroes;
}

bool Overlaps(std::uint64_t a_off, std::uint64_t a_len, std::uint64_t b_off, std::uint64_t b_len) {
  return a_off < b_off + b_len && b_off < a_off + a_len;
}

}  // namespace

Status CheckExportSize(std::uint64_t size, std::uint32_t block) {
  if (size == 0) return Status::ProtocolError("export size is 0");
  if (size > kMaxExportSize)
    return Status::ProtocolError("export size " + std::to_string(size) + " above the 2^63 - 64 KiB limit");
  if (block == 0 || size % block != 0)
    return Status::ProtocolError("export size " + std::to_string(size) + " not a multiple of the block size " +
                                 std::to_string(block));
  return Status::OK();
}

// --- HandshakeIo ---------------------------------------------------------------------------

void HandshakeIo::Op::await_suspend(std::coroutine_handle<> h) {
  IoCallback done = [this, h, keep = io->owner_.lock()](const boost::system::error_code& e, std::size_t) {
    ec = e;
    h.resume();
  };
  if (write) {
    io->t_->AsyncWrite(asio::const_buffer(buf, n), std::move(done));
  } else {
    io->t_->AsyncRead(asio::mutable_buffer(buf, n), std::move(done));
  }
}

bool HandshakeIo::UpgradeOp::await_suspend(std::coroutine_handle<> h) {
  HandshakeIo* hio = io;
  if (!*hio->slot_) {
    *st = Status::Unavailable("handshake abandoned");
    return false;
  }
  std::unique_ptr<Transport> t = std::move(*hio->slot_);
  hio->t_ = nullptr;
  (*upgrade)(std::move(t), [out = st, h, hio, keep = hio->owner_.lock()](Status s, std::unique_ptr<Transport> nt) {
    *out = std::move(s);
    if (out->ok() && nt) {
      *hio->slot_ = std::move(nt);
      hio->t_ = hio->slot_->get();
    } else if (out->ok()) {
      *out = Status::Unavailable("transport upgrade produced no transport");
    }
    h.resume();
  });
  return true;
}

Status HandshakeIo::Op::await_resume() const {
  if (!ec) return Status::OK();
  if (ec == asio::error::eof) return Status::Unavailable("server closed the connection during the handshake");
  if (ec == asio::error::operation_aborted) return Status::Unavailable("handshake abandoned");
  return Status::Unavailable(std::string(write ? "handshake send: " : "handshake recv: ") + ec.message());
}

// --- construction ----------------------------------------------------------------------------

ClientCore::ClientCore(asio::io_context& io, const ClientCoreOptions& opts,
                       std::unique_ptr<ClientProtocol> proto)
    : io_(io),
      opts_(opts),
      proto_(std::move(proto)),
      strand_(asio::make_strand(io)),
      tick_(std::clamp<milliseconds>(
          std::min({opts.keepalive_interval / 2, opts.keepalive_timeout / 4, opts.reconnect_min,
                    opts.io_timeout / 8, opts.connect_timeout / 4}),
          milliseconds(10), milliseconds(250))),
      backoff_(opts.reconnect_min),
      control_index_(std::clamp<std::uint32_t>(opts.queue_depth, 1, 65536)) {
  proto_->core_ = this;
  const std::uint32_t qd = control_index_;
  slots_.resize(qd + 1);
  free_.reserve(qd);
  order_.reserve(qd);
  blocked_.reserve(qd);
  for (std::uint32_t i = qd + 1; i-- > 0;) {
    ClientSlot& s = slots_[i];
    s.index = i;
    s.core = this;
    s.frame.owner = &s;
    s.frame.on_sent = &ClientCore::OnFrameSent;
    if (i < qd) free_.push_back(i);
  }
  goodbye_frame_.on_sent = &ClientCore::OnGoodbyeSent;
  probe_buf_.reset(new char[kProbeBufSize]);
  drain_buf_.reset(new char[kDrainBufSize]);
  kick_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
}

ClientCore::~ClientCore() {
  boost::system::error_code ec;
  if (kick_.is_open()) kick_.close(ec);
  if (kick_fd_ >= 0) ::close(kick_fd_);
}

void ClientCore::Log(const std::string& msg) const {
  std::fprintf(stderr, "[%s %s] %s\n", opts_.log_tag, Describe().c_str(), msg.c_str());
}

const char* ClientCore::StateName(State s) {
  switch (s) {
    case State::kConnecting: return "connecting";
    case State::kConnected: return "connected";
    case State::kReconnecting: return "reconnecting";
    case State::kFailing: return "failing";
    case State::kClosed: return "closed";
  }
  return "unknown";
}

void ClientCore::SetStateListener(ClientDevice::StateListener l) {
  std::lock_guard<std::mutex> g(listener_mu_);
  listener_ = std::move(l);
}

void ClientCore::SetState(State s) {
  const State from = state_;
  state_ = s;
  stat_state_.store(static_cast<int>(s), std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> l(mu_);
    accepting_ = !closed_ && (s == State::kConnected || s == State::kReconnecting);
  }
  if (from != s) {  // after the counters say so, so a listener that reads Stats() agrees
    std::lock_guard<std::mutex> g(listener_mu_);
    if (listener_) listener_(StateName(from), StateName(s));
  }
}

void ClientCore::CloseSockets() {
  if (transport_) transport_->Close();
  if (hs_transport_) hs_transport_->Close();
}

// --- connect -------------------------------------------------------------------------------

Status ClientCore::Start() {
  if (kick_fd_ < 0) return Status::FromErrno(errno, "eventfd");
  {
    boost::system::error_code ec;
    kick_.assign(::dup(kick_fd_), ec);
    if (ec) return Status::IoError("eventfd assign: " + ec.message());
  }
  auto self = shared_from_this();
  asio::dispatch(strand_, [self] {
    self->initial_deadline_ = Clock::now() + self->opts_.connect_timeout;
    self->ArmKick();
    self->ArmTick();
    self->StartAttempt();
  });
  std::unique_lock<std::mutex> l(first_mu_);
  // The io threads normally answer within connect_timeout; the margin covers a slow resolver.
  if (!first_cv_.wait_for(l, opts_.connect_timeout + milliseconds(2000), [&] { return first_done_; }))
    return Status::TimedOut("connecting to " + Describe() + " (is the io_context running?)");
  return first_status_;
}

void ClientCore::ReportFirst(Status st) {
  std::lock_guard<std::mutex> l(first_mu_);
  if (first_done_) return;
  first_done_ = true;
  first_status_ = std::move(st);
  first_cv_.notify_all();
}

void ClientCore::StartAttempt() {
  if (state_ == State::kClosed) return;
  // An abandoned handshake task still waits for its (closed) transport to answer; its frame and
  // arguments must outlive it.  The tick retries once it has ended.
  if (hs_task_.valid() && !hs_task_.done()) return;
  ++epoch_;
  attempt_active_ = true;
  CloseSockets();
  const std::uint64_t ep = epoch_;
  attempt_deadline_ = Clock::now() + opts_.connect_timeout;
  if (!connector_) {
    if (opts_.connector) {
      connector_ = opts_.connector(strand_);
    } else if (!opts_.unix_socket.empty()) {
      connector_ = TcpConnector::Unix(strand_, opts_.unix_socket);
    } else {
      connector_ = std::make_unique<TcpConnector>(strand_, opts_.host, opts_.port);
    }
  }
  connector_->Cancel();
  connector_->AsyncConnect(opts_.connect_timeout, [self = shared_from_this(), ep](Status st, std::unique_ptr<Transport> t) {
    self->OnConnected(ep, std::move(st), std::move(t));
  });
}

void ClientCore::OnConnected(std::uint64_t ep, Status st, std::unique_ptr<Transport> t) {
  if (ep != epoch_ || state_ == State::kClosed) {
    if (t) t->Close();
    return;
  }
  if (!st.ok()) {
    const bool hard = st.code() == Status::Code::kInvalidArgument;
    return AttemptFailed(std::move(st), hard);
  }
  hs_transport_ = std::move(t);
  hs_neg_ = Negotiated{};
  hs_hard_ = false;
  hs_epoch_ = ep;
  hs_io_ = HandshakeIo(&hs_transport_, weak_from_this());
  hs_task_ = proto_->Handshake(hs_io_, &hs_neg_, &hs_hard_);
  hs_task_.Start(&ClientCore::OnHandshakeDone, this);
}

// The handshake task returned (on the strand; the task's frame stays until the next attempt).
void ClientCore::OnHandshakeDone(void* ctx) {
  auto* self = static_cast<ClientCore*>(ctx);
  if (self->hs_epoch_ != self->epoch_ || self->state_ == State::kClosed) {
    if (self->hs_transport_) self->hs_transport_->Close();
    return;
  }
  self->attempt_active_ = false;
  Status st = self->hs_task_.value();
  if (!st.ok()) return self->AttemptFailed(std::move(st), self->hs_hard_);
  self->OnHandshake(self->hs_neg_);
}

// connect_timeout passed during dial or handshake.
void ClientCore::AbortAttempt(Status why) {
  if (connector_) connector_->Cancel();
  AttemptFailed(std::move(why), false);  // moves the epoch on and closes the transport
}

void ClientCore::AttemptFailed(Status st, bool hard) {
  ++epoch_;
  attempt_active_ = false;
  CloseSockets();
  const auto now = Clock::now();
  if (initial_) {
    if (hard || now + backoff_ >= initial_deadline_) {
      ReportFirst(st);
      DoClose();
      return;
    }
  } else if (last_error_.ToString() != st.ToString()) {
    Log("reconnect failed: " + st.ToString());
  }
  if (!initial_) health_.Detail("reconnecting: " + st.ToString());
  last_error_ = std::move(st);
  next_attempt_ = now + backoff_;
  backoff_ = std::min<milliseconds>(backoff_ * 2, opts_.reconnect_max);
}

// Defects D8: a reconnect must not write to something else than before.  Returns true (and
// fails the device) when the export changed; otherwise narrows *keep to what callers sized to.
bool ClientCore::IdentityChanged(const DeviceInfo& ni, DeviceInfo* keep) {
  const DeviceInfo old = Info();
  bool writes_waiting = busy_writes_ > 0 || [&] {
    for (IoRequest* q = wait_head_; q; q = q->link)
      if (IsWriteType(q->op)) return true;
    std::lock_guard<std::mutex> l(mu_);
    for (IoRequest* q = pending_head_; q; q = q->link)
      if (IsWriteType(q->op)) return true;
    return false;
  }();
  const char* why = nullptr;
  if (ni.size != old.size) why = "export size changed";
  else if (ni.read_only && !old.read_only && writes_waiting) why = "write permission lost";
  else if (ni.logical_block_size > old.logical_block_size) why = "block size grew";
  if (!why) {
    *keep = ni;
    keep->max_io_bytes = std::min(ni.max_io_bytes, old.max_io_bytes);
    keep->logical_block_size = old.logical_block_size;
    return false;
  }
  Log(std::string(why) + " across reconnect; failing the device");
  ++epoch_;
  CloseSockets();
  SetState(State::kFailing);
  FailAll(Status::IoError(why), false);
  next_attempt_ = Clock::now() + opts_.reconnect_max;
  return true;
}

void ClientCore::Attach(std::unique_ptr<Transport> t) {
  transport_ = std::move(t);
  tx_ = std::make_unique<Transmitter>(*transport_, opts_.batching, &tx_stats_);
  tx_->set_error_handler(&ClientCore::OnTxError, this);
}

void ClientCore::OnHandshake(const Negotiated& n) {
  DeviceInfo ni = n.info;
  if (!initial_ && IdentityChanged(n.info, &ni)) return;  // it closed the handshake transport
  Attach(std::move(hs_transport_));
  {
    std::lock_guard<std::mutex> l(mu_);
    info_ = ni;
  }
  proto_->OnConnection(n.features);
  const bool was_initial = initial_;
  if (!initial_) {
    reconnects_.fetch_add(1, std::memory_order_relaxed);
    Log("reconnected");
  }
  initial_ = false;
  last_error_ = Status::OK();
  last_rx_ = Clock::now();
  last_keepalive_ = last_rx_;
  answered_ = false;
  conn_progress_ = false;
  send_count_ = 0;
  // Nothing waits for this connection: the outage is over (an idle device must not turn
  // FAILING on its next loss because of an old outage).  Backoff resets only on a reply.
  if (busy_ == 0 && !wait_head_) in_outage_ = false;
  SetState(State::kConnected);
  rx_buf_.Clear();  // bytes of the previous connection, if any, mean nothing now
  rx_rest_ = false;
  StartRead();
  if (was_initial) {
    ReportFirst(Status::OK());
    return Admit();
  }
  if (!StartCheck()) Admit();
}

// Re-sends every unacknowledged request in its original order, then new ones.
void ClientCore::Admit() {
  if (state_ != State::kConnected) return;
  checking_ = false;
  health_.Up();
  order_.clear();
  for (std::uint32_t i = 0; i < control_index_; ++i)
    if (slots_[i].req) order_.push_back(i);
  std::sort(order_.begin(), order_.end(),
            [this](std::uint32_t a, std::uint32_t b) { return slots_[a].seq < slots_[b].seq; });
  for (std::uint32_t i : order_) SendSlot(slots_[i]);
  resent_.fetch_add(order_.size(), std::memory_order_relaxed);
  Pump();
  FlushTx();
}

// Puts a READ of [offset, offset + length) into `buf` (or the protocol's probe) in the control
// slot.  False if the slot's frame is still queued in the Transmitter.
bool ClientCore::UseControl(ControlUse use, std::uint64_t offset, std::uint32_t length, char* buf) {
  ClientSlot& c = slots_[control_index_];
  if (c.tx_queued || !tx_) return false;
  control_req_ = IoRequest{};
  control_req_.op = IoOp::kRead;
  control_req_.offset = offset;
  control_req_.length = length;
  control_req_.data = buf;
  c.req = &control_req_;
  c.early_done = false;
  if (!Outstanding()) last_rx_ = Clock::now();  // the silence clock starts now
  control_use_ = use;
  c.start = Clock::now();
  proto_->Encode(c, use);
  c.on_wire = true;
  c.tx_queued = true;
  tx_->Enqueue(&c.frame);
  return true;
}

bool ClientCore::StartCheck() {
  const ConnectCheck c = gate_.Begin();
  if (!c.verify) return false;
  checking_ = true;
  const DeviceInfo& info = info_;  // written on this strand only
  const std::uint32_t bs = std::max<std::uint32_t>(info.logical_block_size, 1);
  if (c.length == 0 || c.length > info.max_io_bytes || c.offset > info.size ||
      c.length > info.size - c.offset || c.offset % bs || c.length % bs) {
    FinishCheck(Status::InvalidArgument("connect check range outside the export or misaligned"));
    return true;
  }
  if (control_use_ == ControlUse::kKeepalive) ReleaseControl();  // its reply no longer matches
  if (check_cap_ < c.length) {
    check_buf_.reset(new char[c.length]);
    check_cap_ = c.length;
  }
  if (!UseControl(ControlUse::kCheck, c.offset, c.length, check_buf_.get())) {
    // Restarted before the Transmitter let go of the frame (rare): reconnect.
    ConnectionLost("connect check restarted while its frame was still queued", Clock::now(), false);
    return true;
  }
  check_start_ = Clock::now();
  FlushTx();
  return true;
}

// The check READ finished (read_status) with its bytes in check_buf_.
void ClientCore::FinishCheck(Status read_status) {
  const std::uint32_t len = control_req_.length;
  if (read_status.ok() && !proto_->CheckDataOk(check_buf_.get(), len)) {  // corrupted: again
    ClientCheckHooks<ClientCore>{this}.RestartCheck();
    return;
  }
  gate_.Finish(ClientCheckHooks<ClientCore>{this}, std::move(read_status), check_buf_.get(), len);
}

void ClientCore::Progress(bool answered) {
  if (answered) answered_ = true;
  in_outage_ = false;
  conn_progress_ = true;
  backoff_ = opts_.reconnect_min;
}

// Poison backstop (§8.4): when the server closed a connection without answering any request on
// it, blame the first frame it was sent.  Any answer breaks the chain: the server is making
// progress.  A silent peer (keepalive) proves nothing about a request: that is an outage,
// bounded by io_timeout, and must stay invisible while shorter.
ClientSlot* ClientCore::PoisonSuspect(bool closed_by_peer) {
  if (!opts_.poison_backstop) return nullptr;
  if (answered_) {
    suspect_losses_ = 0;
    return nullptr;
  }
  if (!closed_by_peer) return nullptr;
  ClientSlot* suspect = nullptr;
  for (std::uint32_t i = 0; i < control_index_; ++i) {
    ClientSlot& s = slots_[i];
    if (s.req && s.on_wire && (!suspect || s.sent_no < suspect->sent_no)) suspect = &s;
  }
  if (!suspect) return nullptr;
  if (suspect_losses_ > 0 && suspect->seq == suspect_seq_) {
    ++suspect_losses_;
  } else {
    suspect_seq_ = suspect->seq;
    suspect_losses_ = 1;
  }
  return suspect_losses_ < kPoisonLosses ? nullptr : suspect;
}

// `closed_by_peer`: the server (or the network) ended the connection, as opposed to our own
// keepalive / io_timeout verdict on a silent peer, which only io_timeout may turn into errors.
void ClientCore::ConnectionLost(const char* why, Clock::time_point outage_start, bool closed_by_peer) {
  if (state_ != State::kConnected) return;
  Log(std::string("connection lost: ") + why);
  ClientSlot* suspect = PoisonSuspect(closed_by_peer);
  ++epoch_;
  tx_.reset();  // drops queued frames: on_sent(false) clears tx_queued
  CloseSockets();
  for (auto& s : slots_) {
    s.on_wire = false;
    s.resend = false;  // re-sent with every held request on the next connection
  }
  ReleaseControl();
  resend_waiting_ = false;
  on_wire_ = 0;
  checking_ = false;  // the next connection runs the check again
  rx_rest_ = false;
  rx_owner_ = nullptr;
  // The outage lasts until the server answers something again: a reconnect that only gets as
  // far as the handshake does not restart the io_timeout clock.
  if (!in_outage_ || outage_start < outage_start_) outage_start_ = outage_start;
  in_outage_ = true;
  SetState(State::kReconnecting);
  health_.Down(outage_start_, std::string("reconnecting: connection lost: ") + why);
  if (conn_progress_) {
    next_attempt_ = Clock::now();  // first retry at once; backoff after that
    backoff_ = opts_.reconnect_min;
  } else {  // nothing useful came over this connection: do not hammer the peer
    next_attempt_ = Clock::now() + backoff_;
    backoff_ = std::min<milliseconds>(backoff_ * 2, opts_.reconnect_max);
  }
  if (suspect) {
    // Last: done() may re-enter Submit() or Close().
    suspect_losses_ = 0;
    Log("request killed " + std::to_string(kPoisonLosses) + " connections in a row: failing it with EIO");
    CompleteSlot(*suspect, Status::IoError("request repeatedly broke the connection"));
  }
}

// --- submit path ---------------------------------------------------------------------------

void ClientCore::Submit(IoRequest* req) {
  Status st;
  bool kick = false;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!accepting_) {
      st = Status::IoError();
    } else if (st = proto_->Validate(info_, *req); st.ok()) {
      req->link = nullptr;
      if (pending_tail_) pending_tail_->link = req; else pending_head_ = req;
      pending_tail_ = req;
      if (!kick_pending_) kick = kick_pending_ = true;
    }
  }
  requests_.fetch_add(1, std::memory_order_relaxed);
  if (!st.ok()) {
    req->done(req, std::move(st));
    return;
  }
  if (kick) {
    const std::uint64_t one = 1;
    ssize_t w = ::write(kick_fd_, &one, sizeof one);
    (void)w;  // EAGAIN only when the counter is saturated, i.e. already signalled
  }
}

void ClientCore::ArmKick() {
  auto self = shared_from_this();
  kick_.async_wait(asio::posix::descriptor_base::wait_read,
                   detail::Bind(&kick_arena_, strand_,
                                [self](const boost::system::error_code& ec) { self->OnKick(ec); }));
}

void ClientCore::OnKick(const boost::system::error_code& ec) {
  if (ec || state_ == State::kClosed) return;
  std::uint64_t v;
  ssize_t r = ::read(kick_fd_, &v, sizeof v);
  (void)r;
  TakePending();
  Pump();
  FlushTx();
  if (state_ != State::kClosed) ArmKick();
}

void ClientCore::TakePending() {
  IoRequest* head;
  IoRequest* tail;
  {
    std::lock_guard<std::mutex> l(mu_);
    head = pending_head_;
    tail = pending_tail_;
    pending_head_ = pending_tail_ = nullptr;
    kick_pending_ = false;
  }
  if (!head) return;
  if (wait_tail_) wait_tail_->link = head; else wait_head_ = head;
  wait_tail_ = tail;
}

// The ordering rule of client_core.h for the waiting request r.  The FIFO is the submission
// order and write-type requests behind a waiting flush wait too, so every write-type request in
// a slot is older than any flush still waiting.
bool ClientCore::MayDispatch(const IoRequest& r, bool* flush_waiting, bool* older_write_waiting) {
  if (r.op == IoOp::kFlush) {
    if (*older_write_waiting || busy_writes_) {
      *flush_waiting = true;
      return false;
    }
    return true;
  }
  if (!IsWriteType(r.op)) return true;
  bool go = !*flush_waiting;
  if (go && busy_writes_) {
    for (std::uint32_t i = 0; i < control_index_ && go; ++i) {
      const ClientSlot& s = slots_[i];
      if (s.req && IsWriteType(s.req->op) && Overlaps(s.req->offset, s.req->length, r.offset, r.length))
        go = false;
    }
  }
  for (std::size_t i = 0; go && i < blocked_.size(); ++i)
    if (Overlaps(blocked_[i].off, blocked_[i].len, r.offset, r.length)) go = false;
  if (!go) {
    *older_write_waiting = true;
    blocked_.push_back({r.offset, r.length});  // capacity queue_depth: Pump stops before overflow
  }
  return go;
}

// Moves waiting requests into free slots, honouring the ordering rule.
void ClientCore::Pump() {
  if (state_ != State::kConnected || checking_) return;
  if (resend_waiting_) {
    resend_waiting_ = false;
    for (std::uint32_t i = 0; i < control_index_; ++i) {
      ClientSlot& s = slots_[i];
      if (!s.resend || !s.req) continue;
      if (s.tx_queued) {
        resend_waiting_ = true;
      } else {
        s.resend = false;
        SendSlot(s);
      }
    }
  }
  blocked_.clear();
  bool older_write_waiting = false;
  bool flush_waiting = false;
  IoRequest* prev = nullptr;
  IoRequest* r = wait_head_;
  while (r && !free_.empty() && blocked_.size() < blocked_.capacity()) {
    IoRequest* next = r->link;
    if (MayDispatch(*r, &flush_waiting, &older_write_waiting)) {
      if (prev) prev->link = next; else wait_head_ = next;
      if (wait_tail_ == r) wait_tail_ = prev;
      r->link = nullptr;
      Dispatch(r);
    } else {
      prev = r;
    }
    r = next;
  }
}

void ClientCore::Dispatch(IoRequest* req) {
  const std::uint32_t i = free_.back();
  free_.pop_back();
  ClientSlot& s = slots_[i];
  s.req = req;
  s.seq = ++dispatch_seq_;
  s.start = Clock::now();
  s.early_done = false;
  ++busy_;
  if (IsWriteType(req->op)) ++busy_writes_;
  inflight_.store(busy_, std::memory_order_relaxed);
  SendSlot(s);
}

void ClientCore::SendSlot(ClientSlot& s) {
  if (s.tx_queued) return;  // cannot happen on a fresh Transmitter; defensive
  proto_->Encode(s, ControlUse::kNone);
  if (!Outstanding()) last_rx_ = Clock::now();  // the silence clock starts now
  s.sent_no = ++send_count_;
  s.on_wire = true;
  ++on_wire_;
  s.tx_queued = true;
  tx_->Enqueue(&s.frame);
}

// Keepalive: the protocol's probe (a PING, or a one-block READ at offset 0 into probe_buf_).
void ClientCore::SendKeepalive() {
  if (control_use_ != ControlUse::kNone) return;
  const DeviceInfo& info = info_;
  if (info.size < info.logical_block_size) return;  // nothing to read: silence is all we watch
  const std::uint32_t len = std::min<std::uint32_t>(info.logical_block_size, kProbeBufSize);
  if (!UseControl(ControlUse::kKeepalive, 0, len, probe_buf_.get())) return;
  last_keepalive_ = Clock::now();
  keepalives_.fetch_add(1, std::memory_order_relaxed);
}

void ClientCore::FlushTx() {
  if (state_ != State::kConnected || !tx_) return;
  if (!tx_->Flush()) ConnectionLost("send failed", Clock::now(), true);
}

void ClientCore::OnFrameSent(TxFrame* f, bool /*ok*/) {
  ClientSlot& s = *static_cast<ClientSlot*>(f->owner);
  s.tx_queued = false;
  if (s.early_done) {
    s.early_done = false;
    s.core->CompleteSlot(s, std::move(s.early_status));
  }
}

void ClientCore::OnTxError(void* ctx) {
  // Runs inside Transmitter::Flush; the Transmitter must not be destroyed here.
  auto* self = static_cast<ClientCore*>(ctx);
  auto sp = self->shared_from_this();
  const std::uint64_t ep = self->epoch_;
  asio::post(self->strand_, [sp, ep] {
    if (ep == sp->epoch_) sp->ConnectionLost("send failed", Clock::now(), true);
  });
}

// --- receive path --------------------------------------------------------------------------
//
// One recv() brings in as many replies as fit in rx_buf_; the protocol's Parse handles every
// whole one.  A payload that did not fully arrive with its header is read straight into the
// caller's buffer (ReadRest) or discarded (DrainRest), then the protocol's OnRest continues and
// parsing resumes.  Pump and FlushTx run once per parsed burst.
//
//   RECV --bytes--> PARSE --whole frame--> PARSE
//    ^                |  \--payload incomplete--> REST (read / drain) --done--> OnRest --> PARSE
//    +--need more-----+
//   Any error or bad frame: ConnectionLost (epoch_ bumps; stale completions are ignored).

void ClientCore::StartRead() {
  auto self = shared_from_this();
  const std::uint64_t ep = epoch_;
  transport_->AsyncReadSome(rx_buf_.Space(), [self, ep](const boost::system::error_code& ec, std::size_t n) {
    if (ep != self->epoch_ || self->state_ != State::kConnected) return;
    if (ec) return self->Lost(ec == asio::error::eof ? "closed by server" : "receive failed");
    self->last_rx_ = Clock::now();
    self->rx_buf_.Commit(n);
    self->ParseRx(false);
  });
}

void ClientCore::ParseRx(bool completed) {
  while (state_ == State::kConnected && !rx_rest_) {
    const RxStep step = proto_->Parse(rx_buf_);
    if (step == RxStep::kStop) return;
    if (step == RxStep::kNeedMore || step == RxStep::kAsync) break;
    if (step == RxStep::kCompleted) completed = true;
  }
  if (state_ == State::kConnected && !rx_rest_) StartRead();
  if (completed) {
    Pump();
    FlushTx();
  }
}

void ClientCore::ReadRest(ClientSlot* owner, char* dst, std::size_t total, std::size_t have) {
  rx_rest_ = true;
  rx_owner_ = owner;
  rest_dst_ = dst;
  rest_total_ = total;
  rest_done_ = have;
  ReadMore();
}

void ClientCore::ReadMore() {
  const std::size_t n = std::min(kPayloadChunk, rest_total_ - rest_done_);
  auto self = shared_from_this();
  const std::uint64_t ep = epoch_;
  transport_->AsyncRead(asio::buffer(rest_dst_ + rest_done_, n),
                        [self, ep](const boost::system::error_code& ec, std::size_t got) {
                          if (ep != self->epoch_ || self->state_ != State::kConnected) return;
                          if (ec) return self->Lost("receive failed");
                          self->last_rx_ = Clock::now();
                          self->rest_done_ += got;
                          if (self->rest_done_ < self->rest_total_) return self->ReadMore();
                          self->rx_rest_ = false;
                          self->rx_owner_ = nullptr;
                          const RxStep step = self->proto_->OnRest();
                          if (step != RxStep::kStop) self->ParseRx(step == RxStep::kCompleted);
                        });
}

void ClientCore::DrainRest(std::size_t n) {
  rx_rest_ = true;
  drain_left_ = n;
  const std::size_t chunk = std::min(drain_left_, kDrainBufSize);
  auto self = shared_from_this();
  const std::uint64_t ep = epoch_;
  transport_->AsyncRead(asio::buffer(drain_buf_.get(), chunk),
                        [self, ep](const boost::system::error_code& ec, std::size_t got) {
                          if (ep != self->epoch_ || self->state_ != State::kConnected) return;
                          if (ec) return self->Lost("receive failed");
                          self->last_rx_ = Clock::now();
                          self->drain_left_ -= got;
                          if (self->drain_left_) return self->DrainRest(self->drain_left_);
                          self->rx_rest_ = false;
                          self->ParseRx(false);
                        });
}

ClientSlot* ClientCore::Lookup(std::uint64_t id) {
  const std::uint32_t idx = static_cast<std::uint32_t>(id);
  const std::uint32_t gen = static_cast<std::uint32_t>(id >> 32);
  if (idx >= slots_.size()) return nullptr;
  ClientSlot& s = slots_[idx];
  if (!s.req || s.gen != gen || !s.on_wire) return nullptr;
  return &s;
}

void ClientCore::Finish(ClientSlot& s, Status st) {
  if (!IsControl(s)) return CompleteSlot(s, std::move(st));
  const ControlUse use = control_use_;
  ReleaseControl();
  if (use == ControlUse::kCheck) {
    Progress(false);
    FinishCheck(std::move(st));
  } else if (busy_ == 0 && !checking_) {
    Progress(false);  // alive, and nothing waits for an answer
  }
}

void ClientCore::Requeue(ClientSlot& s) {
  if (!s.on_wire || IsControl(s)) return;
  s.on_wire = false;
  --on_wire_;
}

void ClientCore::Reissue(ClientSlot& s) {
  if (s.on_wire) {
    s.on_wire = false;
    --on_wire_;
  }
  if (s.tx_queued) {  // the Transmitter still holds the frame: Pump sends it once released
    s.resend = true;
    resend_waiting_ = true;
    return;
  }
  SendSlot(s);
}

// The control slot is free again; a reply for its old use no longer matches.
void ClientCore::ReleaseControl() {
  ClientSlot& c = slots_[control_index_];
  control_use_ = ControlUse::kNone;
  c.on_wire = false;
  c.req = nullptr;
  if (++c.gen == 0) c.gen = 1;
}

void ClientCore::CompleteSlot(ClientSlot& s, Status st) {
  if (s.on_wire) {
    s.on_wire = false;
    --on_wire_;
  }
  if (s.tx_queued) {  // the Transmitter still reads the caller's buffer: finish in OnFrameSent
    s.early_done = true;
    s.early_status = std::move(st);
    return;
  }
  IoRequest* req = s.req;
  FreeSlot(s);
  req->done(req, std::move(st));  // last: done() may re-enter Submit() or Close()
}

void ClientCore::FreeSlot(ClientSlot& s) {
  if (IsWriteType(s.req->op)) --busy_writes_;
  --busy_;
  inflight_.store(busy_, std::memory_order_relaxed);
  s.req = nullptr;
  s.resend = false;
  if (++s.gen == 0) s.gen = 1;  // a late reply for this use no longer matches
  free_.push_back(s.index);
}

// Ends every request the core holds with `st`.  Callbacks run after the state is consistent.
void ClientCore::FailAll(const Status& st, bool count_timeouts) {
  IoRequest* head = nullptr;
  IoRequest* tail = nullptr;
  auto append = [&](IoRequest* r) {
    r->link = nullptr;
    if (tail) tail->link = r; else head = r;
    tail = r;
  };
  order_.clear();
  for (std::uint32_t i = 0; i < control_index_; ++i) {
    const ClientSlot& s = slots_[i];
    if (s.req && !s.tx_queued && &s != rx_owner_) order_.push_back(i);
  }
  std::sort(order_.begin(), order_.end(),
            [this](std::uint32_t a, std::uint32_t b) { return slots_[a].seq < slots_[b].seq; });
  for (std::uint32_t i : order_) {
    ClientSlot& s = slots_[i];
    if (s.on_wire) {
      s.on_wire = false;
      --on_wire_;
    }
    IoRequest* r = s.req;
    FreeSlot(s);
    append(r);
  }
  TakePending();
  for (IoRequest* r = wait_head_; r;) {
    IoRequest* next = r->link;
    append(r);
    r = next;
  }
  wait_head_ = wait_tail_ = nullptr;
  if (count_timeouts) {  // before the callbacks, so a caller that saw done() sees the count
    std::uint64_t n = 0;
    for (IoRequest* r = head; r; r = r->link) ++n;
    timeouts_.fetch_add(n, std::memory_order_relaxed);
  }
  for (IoRequest* r = head; r;) {
    IoRequest* next = r->link;
    r->done(r, st);
    r = next;
  }
}

// --- timers --------------------------------------------------------------------------------

void ClientCore::ArmTick() {
  tick_timer_.expires_after(tick_);
  auto self = shared_from_this();
  tick_timer_.async_wait([self](const boost::system::error_code& ec) { self->OnTick(ec); });
}

void ClientCore::TickConnected(Clock::time_point now) {
  if (Outstanding() && now - last_rx_ >= opts_.keepalive_timeout) {
    // TCP may stay open (SIGSTOPped or hung peer): silence is the failure signal.  The outage
    // began when the peer went quiet.
    ConnectionLost("keepalive timeout", last_rx_, false);
    return;
  }
  if (now - last_rx_ >= opts_.keepalive_interval && now - last_keepalive_ >= opts_.keepalive_interval) {
    SendKeepalive();
    FlushTx();
    if (state_ != State::kConnected) return;
  }
  // A request never waits forever, even on a connection that answers keepalives.  The whole
  // connection goes first, so nothing more is read into the callers' buffers (and a DST
  // server's session fence orders the old requests before anything sent later).
  bool stuck = checking_ && now - check_start_ >= opts_.io_timeout;
  for (std::uint32_t i = 0; i < control_index_ && !stuck; ++i) {
    ClientSlot& s = slots_[i];
    if (s.req && s.on_wire && now - s.start >= opts_.io_timeout) stuck = true;
    // A request the server handed back (DST ESHUTDOWN: Requeue, "re-send it on the next
    // connection") waits off the wire; if that server never closes, neither keepalive silence
    // nor the check above looks at it, so it ends alone at io_timeout, as it would offline
    // (issue 11 item 5: it used to wait forever).
    if (s.req && !s.on_wire && !s.tx_queued && !s.resend && !checking_ && now - s.start >= opts_.io_timeout) {
      timeouts_.fetch_add(1, std::memory_order_relaxed);
      CompleteSlot(s, Status::IoError("request exceeded io_timeout"));  // may re-enter
      if (state_ != State::kConnected) return;
    }
  }
  if (stuck) {
    ConnectionLost("request exceeded io_timeout", now, false);
    if (state_ == State::kClosed) return;  // a done() callback closed the device
    Log("request exceeded io_timeout: failing requests with EIO");
    SetState(State::kFailing);
    FailAll(Status::IoError(), true);
    return;
  }
  Pump();
  FlushTx();
}

// Returns false when a callback closed the device.
bool ClientCore::TickOffline(Clock::time_point now) {
  if (state_ == State::kReconnecting && now - outage_start_ >= opts_.io_timeout) {
    Log("outage longer than io_timeout: failing requests with EIO");
    SetState(State::kFailing);
    FailAll(Status::IoError(), true);
    if (state_ == State::kClosed) return false;
  }
  // A request older than io_timeout ends even while other requests keep ending the outage (a
  // peer that answers some requests and lies about others).
  for (std::uint32_t i = 0; i < control_index_ && state_ != State::kConnected; ++i) {
    ClientSlot& s = slots_[i];
    if (!s.req || s.tx_queued || now - s.start < opts_.io_timeout) continue;
    timeouts_.fetch_add(1, std::memory_order_relaxed);
    CompleteSlot(s, Status::IoError("request exceeded io_timeout"));  // may re-enter
    if (state_ == State::kClosed) return false;
  }
  if (attempt_active_ && now >= attempt_deadline_) {
    AbortAttempt(Status::TimedOut("connect to " + Describe() + " timed out (dial or handshake)"));
  }
  if (!attempt_active_ && now >= next_attempt_) StartAttempt();
  return true;
}

// Our own loop did not run for `stall` (this process was SIGSTOPped, the host suspended, or the
// machine swapped hard).  Every deadline that ran meanwhile measured our absence, not the
// peer's: a peer that answered while we were stopped would otherwise be declared silent and every
// leg of a mirror would fail at once on resume.  The clocks move forward by the stall, and the
// peer gets a keepalive probe and its full timeouts from now.
void ClientCore::ForgiveStall(Clock::duration stall) {
  Log("event loop stalled for " + std::to_string(std::chrono::duration_cast<milliseconds>(stall).count()) +
      " ms (process stopped or host suspended?): the peer's deadlines restart");
  last_rx_ += stall;
  last_keepalive_ += stall;
  check_start_ += stall;
  outage_start_ += stall;
  attempt_deadline_ += stall;
  initial_deadline_ += stall;
  for (std::uint32_t i = 0; i < control_index_; ++i)
    if (slots_[i].req) slots_[i].start += stall;
}

void ClientCore::OnTick(const boost::system::error_code& ec) {
  if (ec == asio::error::operation_aborted || state_ == State::kClosed) return;
  const auto now = Clock::now();
  // A tick more than a second late: the loop itself was not running (see ForgiveStall).
  const auto late = last_tick_ == Clock::time_point{} ? Clock::duration::zero() : now - last_tick_ - tick_;
  last_tick_ = now;
  if (late > std::chrono::seconds(1)) ForgiveStall(late);
  if (state_ == State::kConnected) {
    TickConnected(now);
  } else if (!TickOffline(now)) {
    return;
  }
  if (state_ != State::kClosed) ArmTick();
}

// --- close ---------------------------------------------------------------------------------

void ClientCore::Close() {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (closed_) return;
    closed_ = true;
    accepting_ = false;
  }
  if (strand_.running_in_this_thread() || io_.stopped()) {
    DoClose();
    return;
  }
  auto self = shared_from_this();
  asio::post(strand_, [self] {
    self->DoClose();
    std::lock_guard<std::mutex> l(self->first_mu_);
    self->close_done_ = true;
    self->first_cv_.notify_all();
  });
  std::unique_lock<std::mutex> l(first_mu_);
  first_cv_.wait_for(l, std::chrono::seconds(5), [&] { return close_done_; });
}

void ClientCore::DoClose() {
  if (state_ == State::kClosed) return;
  {
    std::lock_guard<std::mutex> l(mu_);
    closed_ = true;
  }
  if (state_ == State::kConnected && tx_ && proto_->EncodeGoodbye(&goodbye_frame_)) {
    tx_->Enqueue(&goodbye_frame_);  // polite goodbye; best effort, never waits
    tx_->Flush();
  }
  ++epoch_;
  SetState(State::kClosed);
  health_.Down(Clock::now(), "closed");
  checking_ = false;
  if (connector_) connector_->Cancel();
  boost::system::error_code ec;
  tx_.reset();
  CloseSockets();
  tick_timer_.cancel();
  kick_.cancel(ec);
  ReleaseControl();
  rx_owner_ = nullptr;
  FailAll(Status::IoError("device closed"), false);
}

ClientStats ClientCore::Counters(std::uint64_t* keepalives) const {
  ClientStats c;
  c.state = StateName(static_cast<State>(stat_state_.load(std::memory_order_relaxed)));
  c.reconnects = reconnects_.load(std::memory_order_relaxed);
  c.resent = resent_.load(std::memory_order_relaxed);
  c.timeouts = timeouts_.load(std::memory_order_relaxed);
  c.bad_replies = bad_replies_.load(std::memory_order_relaxed);
  c.check_failures = check_failures_.load(std::memory_order_relaxed);
  c.inflight = inflight_.load(std::memory_order_relaxed);
  c.requests = requests_.load(std::memory_order_relaxed);
  c.frames_sent = tx_stats_.frames.load(std::memory_order_relaxed);
  c.send_calls = tx_stats_.syscalls.load(std::memory_order_relaxed);
  c.frames_per_call = tx_stats_.FramesPerCall();
  if (keepalives) *keepalives = keepalives_.load(std::memory_order_relaxed);
  return c;
}

Result<std::shared_ptr<ClientCore>> ClientCore::Connect(asio::io_context& io, const ClientCoreOptions& opts,
                                                       std::unique_ptr<ClientProtocol> proto, const char* who) {
  if (io.get_executor().running_in_this_thread())
    return Status::InvalidArgument(std::string(who) + "::Connect called on an io_context thread");
  if (opts.queue_depth == 0) return Status::InvalidArgument("queue_depth must be > 0");
  auto core = std::make_shared<ClientCore>(io, opts, std::move(proto));
  Status st = core->Start();
  if (!st.ok()) {
    core->Close();
    return st;
  }
  return core;
}

// --- ClientDevice (client_device.h) -----------------------------------------------------------

ClientDevice::ClientDevice(std::shared_ptr<ClientCore> core) : core_(std::move(core)) {}
ClientDevice::~ClientDevice() { core_->Close(); }
DeviceInfo ClientDevice::Info() const { return core_->Info(); }
void ClientDevice::Submit(IoRequest* req) { core_->Submit(req); }
std::string ClientDevice::Describe() const { return core_->Describe(); }
bool ClientDevice::SetConnectCheck(const ConnectCheck& check) { return core_->SetConnectCheck(check); }
void ClientDevice::SetStateListener(StateListener listener) { core_->SetStateListener(std::move(listener)); }
const char* ClientDevice::State() const { return core_->StateNow(); }
DeviceHealth ClientDevice::Health() const { return core_->Health(); }
void ClientDevice::Close() { core_->Close(); }
ClientStats ClientDevice::CoreStats(std::uint64_t* keepalives) const { return core_->Counters(keepalives); }

}  // namespace dst::net
