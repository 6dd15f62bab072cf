// RemoteDevice: the self-healing DST client.  See the header for the connection state diagram.
//
// Everything connection-related runs on one strand of the caller's io_context; Submit() only
// touches a mutex-protected pending list and wakes the strand through an eventfd (a write(2)
// instead of an asio::post, because a post from a thread outside the io_context allocates).
//
// Request life cycle:
//
//   Submit --> PENDING (MPSC list, mutex) --kick--> WAITING (io-owned FIFO, ordering rules)
//        --free slot--> IN FLIGHT (slot: TxFrame + IoRequest*, id = gen<<32 | slot)
//        --reply--> done()
//   connection lost: in-flight slots stay, are re-sent in submission order after the handshake.
//   outage > io_timeout, a request older than io_timeout (the connection is dropped first, so
//   the server's session fence orders it), Close(), size change or lost write permission with
//   writes pending: every request (pending, waiting, in flight) ends with EIO.
//
// Poison requests (docs/protocol.md §8.4): a request the server cannot even parse must not be
// re-sent forever, since each reconnect succeeds and so the outage clock never runs out.
//
//   IN FLIGHT --error reply (not ESHUTDOWN)--> done(mapped status)          never re-sent
//   IN FLIGHT --EPROTO frame naming its id--> connection lost, done(EIO)    never re-sent
//   IN FLIGHT --connection lost before the server answered any request on it, and this request
//              was the first one sent on it--> suspect; 3rd time in a row --> done(EIO)
//
// Connect check (block_device.h): after a reconnect's handshake, a READ of the check range
// with the reserved id slot kCheckSlot goes out alone; Pump() sends nothing while checking_.
// The verdict either re-sends the held requests (OK) or fails them with EIO and calls
// rejected(); either way the connection is then admitted (Admit).  verify()/rejected() run with
// the gate's mutex held, which SetConnectCheck() also takes (connect_gate.h).
//
// Progress: only a correct reply (right id, command and length) ends an outage and resets the
// reconnect backoff (Progress); a PING answer counts only while no request waits.  A connection
// lost without progress retries after a growing backoff.
//
// Timing runs on one periodic tick (<= 250 ms, finer for short timeouts): keepalive pings and
// silence detection, io_timeout, handshake timeout and reconnect backoff.
//
// Every slot reuse bumps the slot's generation, so a reply that arrives for an earlier use of a
// slot (a late or duplicated reply) does not match and its payload is drained (defect D3).
#include "dst/net/remote_device.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <random>
#include <vector>

#include <boost/asio/bind_executor.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>

#include "connect_gate.h"
#include "dst/net/codec.h"
#include "dst/net/transmitter.h"
#include "rx_buffer.h"

namespace dst::net {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

constexpr std::uint32_t kPingSlot = 0xffffffffu;
constexpr std::uint32_t kCheckSlot = 0xfffffffeu;  // the connect check's READ
constexpr std::size_t kPayloadChunk = 256u << 10;  // rx progress (keepalive) granularity
constexpr std::size_t kDrainBufSize = 64u << 10;
// Backstop: a request that was the first one sent on this many consecutive connections that
// died before answering any request is failed with EIO instead of being re-sent again.
constexpr int kPoisonLosses = 3;

bool IsWriteType(IoOp op) {
  return op == IoOp::kWrite || op == IoOp::kTrim || op == IoOp::kWriteZeroes;
}

bool Overlaps(std::uint64_t a_off, std::uint64_t a_len, std::uint64_t b_off, std::uint64_t b_len) {
  return a_off < b_off + b_len && b_off < a_off + a_len;
}

Cmd ToCmd(IoOp op) {
  switch (op) {
    case IoOp::kRead: return Cmd::kRead;
    case IoOp::kWrite: return Cmd::kWrite;
    case IoOp::kFlush: return Cmd::kFlush;
    case IoOp::kTrim: return Cmd::kTrim;
    case IoOp::kWriteZeroes: return Cmd::kWriteZeroes;
  }
  return Cmd::kRead;
}

void Log(const std::string& what, const std::string& msg) {
  std::fprintf(stderr, "[remote %s] %s\n", what.c_str(), msg.c_str());
}

}  // namespace

// --- URI --------------------------------------------------------------------------------

Status ParseDstUri(const std::string& uri, RemoteOptions* opts) {
  static constexpr std::string_view kScheme = "dst://";
  if (uri.compare(0, kScheme.size(), kScheme) != 0)
    return Status::InvalidArgument("remote URI must start with dst://: " + uri);
  std::string_view rest(uri);
  rest.remove_prefix(kScheme.size());
  const std::size_t slash = rest.find('/');
  if (slash == std::string_view::npos)
    return Status::InvalidArgument("remote URI lacks /export: " + uri);
  std::string_view authority = rest.substr(0, slash);
  std::string_view name = rest.substr(slash + 1);
  std::string_view host;
  std::string_view port_str;
  if (!authority.empty() && authority.front() == '[') {  // [v6addr]:port
    const std::size_t close = authority.find(']');
    if (close == std::string_view::npos) return Status::InvalidArgument("unbalanced [ in URI: " + uri);
    host = authority.substr(1, close - 1);
    std::string_view after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':') return Status::InvalidArgument("junk after ] in URI: " + uri);
      port_str = after.substr(1);
      if (port_str.empty()) return Status::InvalidArgument("empty port in URI: " + uri);
    }
  } else {
    const std::size_t colon = authority.find(':');
    host = authority.substr(0, colon);
    if (colon != std::string_view::npos) {
      port_str = authority.substr(colon + 1);
      if (port_str.empty()) return Status::InvalidArgument("empty port in URI: " + uri);
    }
  }
  if (host.empty()) return Status::InvalidArgument("remote URI lacks a host: " + uri);
  for (char c : host)
    if (static_cast<unsigned char>(c) <= 0x20 || c == '/' || c == '@' || c == '[' || c == ']' ||
        static_cast<unsigned char>(c) > 0x7e)
      return Status::InvalidArgument("bad character in URI host: " + uri);
  std::uint32_t port = kDefaultPort;
  if (!port_str.empty()) {
    if (port_str.size() > 5) return Status::InvalidArgument("bad port in URI: " + uri);
    port = 0;
    for (char c : port_str) {
      if (c < '0' || c > '9') return Status::InvalidArgument("bad port in URI: " + uri);
      port = port * 10 + static_cast<std::uint32_t>(c - '0');
    }
    if (port == 0 || port > 65535) return Status::InvalidArgument("port out of range in URI: " + uri);
  }
  if (name.empty()) return Status::InvalidArgument("remote URI lacks an export name: " + uri);
  if (name.size() > kMaxExportNameLen) return Status::InvalidArgument("export name too long: " + uri);
  for (char c : name)
    if (static_cast<unsigned char>(c) < 0x21 || static_cast<unsigned char>(c) > 0x7e)
      return Status::InvalidArgument("export name must be printable ASCII without spaces: " + uri);
  opts->host.assign(host);
  opts->port = static_cast<std::uint16_t>(port);
  opts->export_name.assign(name);
  return Status::OK();
}

// --- Impl -------------------------------------------------------------------------------

class RemoteDevice::Impl : public std::enable_shared_from_this<Impl> {
 public:
  enum class State : int { kConnecting, kConnected, kReconnecting, kFailing, kClosed };

  Impl(asio::io_context& io, const RemoteOptions& opts);
  ~Impl();

  Status Start();  // blocking first connect (off the io threads)
  DeviceInfo Info() const {
    std::lock_guard<std::mutex> l(mu_);
    return info_;
  }
  void Submit(IoRequest* req);
  std::string Describe() const {
    return "dst://" + opts_.host + ":" + std::to_string(opts_.port) + "/" + opts_.export_name;
  }
  RemoteStats Stats() const;
  void Close();
  bool SetConnectCheck(const ConnectCheck& c) {
    gate_.Set(c);
    return true;
  }
  DeviceHealth Health() const {
    const auto st = static_cast<State>(stat_state_.load(std::memory_order_relaxed));
    return health_.Get(st == State::kConnected, st == State::kClosed);
  }

 private:
  template <class> friend struct ClientCheckHooks;
  struct Slot {
    TxFrame frame;  // header re-encoded on every send (defect D2)
    Impl* impl = nullptr;
    IoRequest* req = nullptr;  // null: free
    std::uint32_t index = 0;
    std::uint32_t gen = 1;     // never 0, so no request id is 0 (the "unknown id" of §8.1)
    std::uint64_t seq = 0;     // submission order
    std::uint64_t sent_no = 0; // send order on the current connection (poison suspect)
    Clock::time_point start;   // when it entered the slot (per-request deadline)
    bool on_wire = false;      // sent on the current connection, reply outstanding
    bool tx_queued = false;    // frame still referenced by the Transmitter
    bool early_done = false;   // reply came while the frame was still queued
    bool resend = false;       // digest error: send again once the frame is released
    Status early_status;
  };

  // Connection management (strand only).
  void StartAttempt();
  void OnResolved(std::uint64_t epoch, const boost::system::error_code& ec,
                  const tcp::resolver::results_type& results);
  void OnConnected(std::uint64_t epoch, const boost::system::error_code& ec);
  void OnHelloSent(std::uint64_t epoch, const boost::system::error_code& ec);
  void OnHelloHeader(std::uint64_t epoch, const boost::system::error_code& ec);
  void OnHelloPayload(std::uint64_t epoch, const boost::system::error_code& ec);
  void AttemptFailed(Status st, bool hard);
  void OnHandshake(const HelloReply& r);
  bool StartCheck();              // true: a check runs (or ran) and will admit the connection
  void FinishCheck(Status read_status);
  void Admit();                   // re-send held requests, start new ones
  void Progress();
  // `closed_by_peer`: the server (or the network) ended the connection, as opposed to our own
  // keepalive / io_timeout verdict on a silent peer, which only io_timeout may turn into errors.
  void ConnectionLost(const char* why, Clock::time_point outage_start, bool closed_by_peer = true);
  void SetState(State s);
  void CloseSockets() {
    boost::system::error_code ec;
    tx_socket_.close(ec);
    socket_.close(ec);
  }
  void ReportFirst(Status st);

  // Data path (strand only).
  void ArmKick();
  void OnKick(const boost::system::error_code& ec);
  void TakePending();
  void Pump();
  void Dispatch(IoRequest* req);
  void SendSlot(Slot& s);
  void SendPing();
  void FlushTx();
  enum class RxStep { kNext, kCompleted, kAsync, kStop };
  void StartRead();
  void ParseRx(bool completed);
  RxStep OnHeader();
  void OnServerDisconnect();
  void ReadPayload(std::uint32_t slot, std::size_t done);
  void Drain();
  void CompleteSlot(Slot& s, Status st);
  void FreeSlot(Slot& s);
  void FailAll(const Status& st, bool count_timeouts);
  void ReadDone(Slot& s);
  bool DigestOk(const char* data, std::size_t len);
  void Reissue(Slot& s);
  void ArmTick();
  void OnTick(const boost::system::error_code& ec);
  void DoClose();
  bool Outstanding() const { return on_wire_ > 0 || ping_outstanding_ || check_outstanding_; }
  static void OnFrameSent(TxFrame* f, bool ok);
  static void OnPingSent(TxFrame* f, bool ok);
  static void OnCheckSent(TxFrame* f, bool ok);
  static void OnTxError(void* ctx);

  // The I/O objects carry the concrete strand type: with the type-erased any_io_executor, Asio
  // 1.18 heap-allocates a copy of the strand on every completion.
  using Strand = asio::strand<asio::io_context::executor_type>;
  asio::io_context& io_;
  const RemoteOptions opts_;
  Strand strand_;
  asio::ip::basic_resolver<tcp, Strand> resolver_;
  asio::basic_stream_socket<tcp, Strand> socket_;  // connect, handshake, receive
  // The Transmitter wants a tcp::socket; it gets a dup() of socket_'s descriptor, also on the
  // strand.  It only waits on it (any_io_executor path) when the send buffer is full.
  tcp::socket tx_socket_;
  asio::basic_waitable_timer<Clock, asio::wait_traits<Clock>, Strand> tick_timer_;
  asio::posix::basic_stream_descriptor<Strand> kick_;
  const milliseconds tick_;
  const std::uint64_t session_id_;

  // Shared with submitters.
  mutable std::mutex mu_;
  DeviceInfo info_;                  // GUARDED_BY(mu_)
  IoRequest* pending_head_ = nullptr;  // GUARDED_BY(mu_)
  IoRequest* pending_tail_ = nullptr;  // GUARDED_BY(mu_)
  bool kick_pending_ = false;        // GUARDED_BY(mu_)
  bool accepting_ = false;           // GUARDED_BY(mu_): false while failing/closed
  bool closed_ = false;              // GUARDED_BY(mu_)
  std::uint64_t next_seq_ = 1;       // GUARDED_BY(mu_)
  int kick_fd_ = -1;

  // First-connect handshake result (Start waits on it).
  std::mutex first_mu_;
  std::condition_variable first_cv_;
  bool first_done_ = false;
  Status first_status_;
  bool close_done_ = false;

  // Strand-only state.
  State state_ = State::kConnecting;
  bool initial_ = true;
  Clock::time_point initial_deadline_;
  std::uint64_t epoch_ = 0;  // bumps whenever a connection/attempt is abandoned
  bool attempt_active_ = false;
  Clock::time_point attempt_deadline_;
  Clock::time_point next_attempt_;
  milliseconds backoff_;
  Clock::time_point outage_start_;
  bool in_outage_ = false;
  Status last_error_;
  std::unique_ptr<Transmitter> tx_;
  std::vector<Slot> slots_;
  std::vector<std::uint32_t> free_;   // stack of free slot indices
  std::vector<std::uint32_t> order_;  // scratch for re-sending in submission order
  struct Range { std::uint64_t off, len; };
  std::vector<Range> blocked_;        // scratch for Pump, capacity queue_depth
  IoRequest* wait_head_ = nullptr;
  IoRequest* wait_tail_ = nullptr;
  std::uint32_t busy_ = 0;        // slots holding a request
  std::uint32_t busy_writes_ = 0; // ... of write type
  std::uint32_t on_wire_ = 0;     // requests with a reply outstanding on this connection
  std::uint64_t send_count_ = 0;  // frames sent on this connection (Slot::sent_no)
  bool answered_ = false;         // the server answered a request on this connection
  std::uint64_t suspect_seq_ = 0; // poison backstop: request blamed for the last losses
  int suspect_losses_ = 0;        // ... and how many consecutive ones
  Clock::time_point last_rx_;     // last byte received (or start of the current wait)
  bool ping_outstanding_ = false;
  bool ping_queued_ = false;
  std::uint32_t ping_gen_ = 0;
  Clock::time_point last_ping_;
  TxFrame ping_frame_;
  RxBuffer rx_buf_;  // see "receive path"
  std::uint8_t rx_hdr_[kHeaderSize];
  Header rx_;
  std::uint32_t reader_slot_ = kPingSlot;  // slot whose payload is being read
  std::size_t drain_left_ = 0;
  std::unique_ptr<char[]> drain_buf_;
  std::uint8_t hello_buf_[kHeaderSize + kMaxHelloPayload];
  Header hello_hdr_;
  bool conn_progress_ = false;    // a correct reply arrived on this connection
  bool digest_ = false;           // payload digests negotiated on this connection (§4.1)
  bool rx_has_digest_ = false;    // the READ reply being received carried one
  std::uint64_t rx_digest_ = 0;
  bool resend_waiting_ = false;   // some slot has `resend` set

  // Connect check (connect_gate.h); the rest is strand-only.
  ConnectGate gate_;
  bool checking_ = false;
  bool check_outstanding_ = false;
  bool check_queued_ = false;  // check_frame_ still referenced by the Transmitter
  Clock::time_point check_start_;
  std::uint32_t check_gen_ = 0;
  std::uint32_t check_len_ = 0;
  std::uint32_t check_cap_ = 0;
  std::unique_ptr<char[]> check_buf_;  // grows once per larger check, never per I/O
  TxFrame check_frame_;

  HealthClock health_;

  // Stats.
  TxStats tx_stats_;
  std::atomic<int> stat_state_{0};
  std::atomic<std::uint64_t> reconnects_{0}, resent_{0}, timeouts_{0}, requests_{0};
  std::atomic<std::uint64_t> bad_replies_{0}, check_failures_{0}, digest_errors_{0};
  std::atomic<bool> stat_digest_{false};
  std::atomic<std::uint32_t> inflight_{0};
};

static std::uint64_t RandomSessionId() {
  std::random_device rd;
  std::uint64_t v = 0;
  while (v == 0) v = (std::uint64_t(rd()) << 32) ^ rd();
  return v;
}

RemoteDevice::Impl::Impl(asio::io_context& io, const RemoteOptions& opts)
    : io_(io),
      opts_(opts),
      strand_(asio::make_strand(io)),
      resolver_(strand_),
      socket_(strand_),
      tx_socket_(strand_),
      tick_timer_(strand_),
      kick_(strand_),
      tick_(std::clamp<milliseconds>(
          std::min({opts.keepalive_interval / 2, opts.keepalive_timeout / 4, opts.reconnect_min,
                    opts.io_timeout / 8, opts.connect_timeout / 4}),
          milliseconds(10), milliseconds(250))),
      session_id_(RandomSessionId()),
      backoff_(opts.reconnect_min) {
  const std::uint32_t qd = std::clamp<std::uint32_t>(opts_.queue_depth, 1, 65536);
  slots_.resize(qd);
  free_.reserve(qd);
  order_.reserve(qd);
  blocked_.reserve(qd);
  for (std::uint32_t i = qd; i-- > 0;) {
    slots_[i].index = i;
    slots_[i].impl = this;
    slots_[i].frame.owner = &slots_[i];
    slots_[i].frame.on_sent = &Impl::OnFrameSent;
    free_.push_back(i);
  }
  ping_frame_.owner = this;
  ping_frame_.on_sent = &Impl::OnPingSent;
  check_frame_.owner = this;
  check_frame_.on_sent = &Impl::OnCheckSent;
  drain_buf_.reset(new char[kDrainBufSize]);
  kick_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
}

RemoteDevice::Impl::~Impl() {
  boost::system::error_code ec;
  if (kick_.is_open()) kick_.close(ec);
  if (kick_fd_ >= 0) ::close(kick_fd_);
}

void RemoteDevice::Impl::SetState(State s) {
  state_ = s;
  stat_state_.store(static_cast<int>(s), std::memory_order_relaxed);
  std::lock_guard<std::mutex> l(mu_);
  accepting_ = !closed_ && (s == State::kConnected || s == State::kReconnecting);
}

// --- first connect ------------------------------------------------------------------------

Status RemoteDevice::Impl::Start() {
  if (kick_fd_ < 0) return Status::FromErrno(errno, "eventfd");
  if (opts_.export_name.empty() || opts_.export_name.size() > kMaxExportNameLen)
    return Status::InvalidArgument("bad export name");
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

void RemoteDevice::Impl::ReportFirst(Status st) {
  std::lock_guard<std::mutex> l(first_mu_);
  if (first_done_) return;
  first_done_ = true;
  first_status_ = std::move(st);
  first_cv_.notify_all();
}

void RemoteDevice::Impl::StartAttempt() {
  if (state_ == State::kClosed) return;
  ++epoch_;
  attempt_active_ = true;
  attempt_deadline_ = Clock::now() + opts_.connect_timeout;
  CloseSockets();
  auto self = shared_from_this();
  const std::uint64_t ep = epoch_;
  resolver_.async_resolve(opts_.host, std::to_string(opts_.port),
                          [self, ep](const boost::system::error_code& e,
                                     const tcp::resolver::results_type& results) {
                            self->OnResolved(ep, e, results);
                          });
}

void RemoteDevice::Impl::OnResolved(std::uint64_t ep, const boost::system::error_code& ec,
                                    const tcp::resolver::results_type& results) {
  if (ep != epoch_ || state_ == State::kClosed) return;
  if (ec) return AttemptFailed(Status::Unavailable("resolve " + opts_.host + ": " + ec.message()), false);
  auto self = shared_from_this();
  asio::async_connect(socket_, results,
                      [self, ep](const boost::system::error_code& e, const tcp::endpoint&) {
                        self->OnConnected(ep, e);
                      });
}

void RemoteDevice::Impl::OnConnected(std::uint64_t ep, const boost::system::error_code& ec) {
  if (ep != epoch_ || state_ == State::kClosed) return;
  if (ec) return AttemptFailed(Status::Unavailable("connect " + Describe() + ": " + ec.message()), false);
  boost::system::error_code ignored;
  socket_.set_option(tcp::no_delay(true), ignored);
  const int dup_fd = ::dup(socket_.native_handle());
  if (dup_fd < 0) return AttemptFailed(Status::FromErrno(errno, "dup"), false);
  tx_socket_.assign(socket_.local_endpoint(ignored).protocol(), dup_fd, ignored);
  if (ignored) {
    ::close(dup_fd);
    return AttemptFailed(Status::IoError("socket assign: " + ignored.message()), false);
  }
  HelloRequest hr;
  hr.session_id = session_id_;
  hr.features = opts_.checksum ? kFeatureDigestXxh3 : 0;
  hr.export_name = opts_.export_name;
  const std::size_t n = EncodeHelloRequest(hr, hello_buf_ + kHeaderSize, kMaxHelloPayload);
  Header h;
  h.cmd = static_cast<std::uint16_t>(Cmd::kHello);
  h.length = static_cast<std::uint32_t>(n);
  EncodeHeader(h, hello_buf_);
  auto self = shared_from_this();
  asio::async_write(socket_, asio::buffer(hello_buf_, kHeaderSize + n),
                    [self, ep](const boost::system::error_code& e, std::size_t) {
                      self->OnHelloSent(ep, e);
                    });
}

void RemoteDevice::Impl::OnHelloSent(std::uint64_t ep, const boost::system::error_code& ec) {
  if (ep != epoch_ || state_ == State::kClosed) return;
  if (ec) return AttemptFailed(Status::Unavailable("sending HELLO: " + ec.message()), false);
  auto self = shared_from_this();
  asio::async_read(socket_, asio::buffer(hello_buf_, kHeaderSize),
                   [self, ep](const boost::system::error_code& e, std::size_t) {
                     self->OnHelloHeader(ep, e);
                   });
}

void RemoteDevice::Impl::OnHelloHeader(std::uint64_t ep, const boost::system::error_code& ec) {
  if (ep != epoch_ || state_ == State::kClosed) return;
  if (ec) return AttemptFailed(Status::Unavailable("reading HELLO reply: " + ec.message()), false);
  Status st = DecodeHeader(hello_buf_, &hello_hdr_);
  if (!st.ok()) return AttemptFailed(st.WithContext("HELLO reply"), true);
  if (!hello_hdr_.is_reply() || hello_hdr_.command() != Cmd::kHello)
    return AttemptFailed(Status::ProtocolError("expected a HELLO reply"), true);
  if (hello_hdr_.status != 0)
    return AttemptFailed(
        FromWireStatus(hello_hdr_.status, "export " + opts_.export_name + " refused by server"), true);
  if (hello_hdr_.length < kHelloReplySize || hello_hdr_.length > kMaxHelloPayload)
    return AttemptFailed(Status::ProtocolError("bad HELLO reply length"), true);
  auto self = shared_from_this();
  asio::async_read(socket_, asio::buffer(hello_buf_, hello_hdr_.length),
                   [self, ep](const boost::system::error_code& e, std::size_t) {
                     self->OnHelloPayload(ep, e);
                   });
}

void RemoteDevice::Impl::OnHelloPayload(std::uint64_t ep, const boost::system::error_code& ec) {
  if (ep != epoch_ || state_ == State::kClosed) return;
  if (ec) return AttemptFailed(Status::Unavailable("reading HELLO reply: " + ec.message()), false);
  HelloReply r;
  Status st = DecodeHelloReply(hello_buf_, hello_hdr_.length, &r);
  if (!st.ok()) return AttemptFailed(st.WithContext("HELLO reply"), true);
  OnHandshake(r);
}

void RemoteDevice::Impl::AttemptFailed(Status st, bool hard) {
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
    Log(Describe(), "reconnect failed: " + st.ToString());
  }
  if (!initial_) health_.Detail("reconnecting: " + st.ToString());
  last_error_ = std::move(st);
  next_attempt_ = now + backoff_;
  backoff_ = std::min<milliseconds>(backoff_ * 2, opts_.reconnect_max);
}

void RemoteDevice::Impl::OnHandshake(const HelloReply& r) {
  attempt_active_ = false;
  DeviceInfo ni;
  ni.size = r.size;
  ni.logical_block_size = r.block_size;
  ni.max_io_bytes = r.max_payload;
  ni.read_only = (r.export_flags & kExportReadOnly) || !(r.permissions & kPermWrite);
  ni.can_flush = r.export_flags & kExportCanFlush;
  ni.can_fua = r.export_flags & kExportCanFua;
  ni.can_trim = r.export_flags & kExportCanTrim;
  ni.can_write_zeroes = r.export_flags & kExportCanWriteZeroes;

  if (!initial_) {
    DeviceInfo old = Info();
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
    if (why) {
      Log(Describe(), std::string(why) + " across reconnect; failing the device");
      ++epoch_;
      CloseSockets();
      SetState(State::kFailing);
      FailAll(Status::IoError(why), false);
      next_attempt_ = Clock::now() + opts_.reconnect_max;
      return;
    }
    ni.max_io_bytes = std::min(ni.max_io_bytes, old.max_io_bytes);  // callers sized to the old one
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    info_ = ni;
  }
  tx_ = std::make_unique<Transmitter>(tx_socket_, opts_.batching, &tx_stats_);
  tx_->set_error_handler(&Impl::OnTxError, this);
  const bool was_initial = initial_;
  if (!initial_) {
    reconnects_.fetch_add(1, std::memory_order_relaxed);
    Log(Describe(), "reconnected");
  }
  initial_ = false;
  digest_ = opts_.checksum && (r.features & kFeatureDigestXxh3);
  stat_digest_.store(digest_, std::memory_order_relaxed);
  last_error_ = Status::OK();
  last_rx_ = Clock::now();
  last_ping_ = last_rx_;
  answered_ = false;
  conn_progress_ = false;
  send_count_ = 0;
  // Nothing waits for this connection: the outage is over (an idle device must not turn
  // FAILING on its next loss because of an old outage).  Backoff resets only on a reply.
  if (busy_ == 0 && !wait_head_) in_outage_ = false;
  SetState(State::kConnected);
  rx_buf_.Clear();  // bytes of the previous connection, if any, mean nothing now
  drain_left_ = 0;
  StartRead();
  if (was_initial) {
    ReportFirst(Status::OK());
    return Admit();
  }
  if (!StartCheck()) Admit();
}

// Re-sends every unacknowledged request in its original submission order, then new ones.
void RemoteDevice::Impl::Admit() {
  if (state_ != State::kConnected) return;
  checking_ = false;
  health_.Up();
  order_.clear();
  for (auto& s : slots_)
    if (s.req) order_.push_back(s.index);
  std::sort(order_.begin(), order_.end(),
            [this](std::uint32_t a, std::uint32_t b) { return slots_[a].seq < slots_[b].seq; });
  for (std::uint32_t i : order_) SendSlot(slots_[i]);
  resent_.fetch_add(order_.size(), std::memory_order_relaxed);
  Pump();
  FlushTx();
}

bool RemoteDevice::Impl::StartCheck() {
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
  if (check_queued_) {  // restarted before the Transmitter let go of the frame (rare): reconnect
    ConnectionLost("connect check restarted while its frame was still queued", Clock::now(), false);
    return true;
  }
  if (check_cap_ < c.length) {
    check_buf_.reset(new char[c.length]);
    check_cap_ = c.length;
  }
  check_len_ = c.length;
  Header h;
  h.cmd = static_cast<std::uint16_t>(Cmd::kRead);
  h.offset = c.offset;
  h.length = c.length;
  h.id = std::uint64_t(++check_gen_) << 32 | kCheckSlot;
  EncodeHeader(h, check_frame_.header);
  check_frame_.payload = nullptr;
  check_frame_.payload_len = 0;
  if (!Outstanding()) last_rx_ = Clock::now();
  check_start_ = Clock::now();
  check_outstanding_ = true;
  check_queued_ = true;
  tx_->Enqueue(&check_frame_);
  FlushTx();
  return true;
}

// The check READ finished (read_status) with check_len_ bytes in check_buf_.
void RemoteDevice::Impl::FinishCheck(Status read_status) {
  check_outstanding_ = false;
  if (read_status.ok() && !DigestOk(check_buf_.get(), check_len_)) {  // corrupted: read again
    ClientCheckHooks<Impl>{this, &Log}.RestartCheck();
    return;
  }
  gate_.Finish(ClientCheckHooks<Impl>{this, &Log}, std::move(read_status), check_buf_.get(),
               check_len_);
}

void RemoteDevice::Impl::Progress() {
  in_outage_ = false;
  conn_progress_ = true;
  backoff_ = opts_.reconnect_min;
}

void RemoteDevice::Impl::ConnectionLost(const char* why, Clock::time_point outage_start,
                                        bool closed_by_peer) {
  if (state_ != State::kConnected) return;
  Log(Describe(), std::string("connection lost: ") + why);
  // Poison backstop (§8.4): when the server closed a connection without answering any request
  // on it, blame the first frame it was sent.  Any answer breaks the chain: the server is making
  // progress.  A silent peer (keepalive) proves nothing about a request: that is an outage,
  // bounded by io_timeout, and must stay invisible while shorter.
  Slot* suspect = nullptr;
  if (answered_) {
    suspect_losses_ = 0;
  } else if (closed_by_peer) {
    for (auto& s : slots_)
      if (s.req && s.on_wire && (!suspect || s.sent_no < suspect->sent_no)) suspect = &s;
    if (suspect) {
      if (suspect_losses_ > 0 && suspect->seq == suspect_seq_) {
        ++suspect_losses_;
      } else {
        suspect_seq_ = suspect->seq;
        suspect_losses_ = 1;
      }
      if (suspect_losses_ < kPoisonLosses) suspect = nullptr;
    }
  }
  ++epoch_;
  tx_.reset();  // drops queued frames: on_sent(false) clears tx_queued
  CloseSockets();
  for (auto& s : slots_) {
    s.on_wire = false;
    s.resend = false;  // re-sent with every held request on the next connection
  }
  resend_waiting_ = false;
  on_wire_ = 0;
  ping_outstanding_ = false;
  check_outstanding_ = false;
  checking_ = false;  // the next connection runs the check again
  reader_slot_ = kPingSlot;
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
    Log(Describe(), std::string(CmdName(static_cast<std::uint16_t>(ToCmd(suspect->req->op)))) +
                        " request killed " + std::to_string(kPoisonLosses) +
                        " connections in a row: failing it with EIO");
    CompleteSlot(*suspect, Status::IoError("request repeatedly broke the connection"));
  }
}

// --- submit path ---------------------------------------------------------------------------

void RemoteDevice::Impl::Submit(IoRequest* req) {
  Status st;
  bool kick = false;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!accepting_) {
      st = Status::IoError();
    } else if (st = ValidateRequest(info_, *req); st.ok()) {
      req->scratch = next_seq_++;
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

void RemoteDevice::Impl::ArmKick() {
  auto self = shared_from_this();
  kick_.async_wait(asio::posix::descriptor_base::wait_read,
                   [self](const boost::system::error_code& ec) { self->OnKick(ec); });
}

void RemoteDevice::Impl::OnKick(const boost::system::error_code& ec) {
  if (ec || state_ == State::kClosed) return;
  std::uint64_t v;
  ssize_t r = ::read(kick_fd_, &v, sizeof v);
  (void)r;
  TakePending();
  Pump();
  FlushTx();
  if (state_ != State::kClosed) ArmKick();
}

void RemoteDevice::Impl::TakePending() {
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

// Moves waiting requests into free slots, honouring the ordering rules:
//  * a write-type request waits while an older overlapping write-type request is in flight or
//    still waiting (so overlapping writes reach the server in submission order);
//  * a flush waits until every older write-type request is acknowledged;
//  * reads pass everything.
void RemoteDevice::Impl::Pump() {
  if (state_ != State::kConnected || checking_) return;
  if (resend_waiting_) {
    resend_waiting_ = false;
    for (auto& s : slots_) {
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
  IoRequest* prev = nullptr;
  IoRequest* r = wait_head_;
  while (r && !free_.empty()) {
    IoRequest* next = r->link;
    bool go = true;
    if (IsWriteType(r->op)) {
      if (busy_writes_) {
        for (const auto& s : slots_)
          if (s.req && IsWriteType(s.req->op) && Overlaps(s.req->offset, s.req->length, r->offset, r->length)) {
            go = false;
            break;
          }
      }
      if (go)
        for (const auto& b : blocked_)
          if (Overlaps(b.off, b.len, r->offset, r->length)) { go = false; break; }
      if (!go) {
        older_write_waiting = true;
        if (blocked_.size() == blocked_.capacity()) break;  // scratch full: stop, stay conservative
        blocked_.push_back({r->offset, r->length});
      }
    } else if (r->op == IoOp::kFlush) {
      if (older_write_waiting) {
        go = false;
      } else if (busy_writes_) {
        for (const auto& s : slots_)
          if (s.req && IsWriteType(s.req->op) && s.seq < r->scratch) { go = false; break; }
      }
    }
    if (go) {
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

void RemoteDevice::Impl::Dispatch(IoRequest* req) {
  const std::uint32_t i = free_.back();
  free_.pop_back();
  Slot& s = slots_[i];
  s.req = req;
  s.seq = req->scratch;
  s.start = Clock::now();
  s.early_done = false;
  ++busy_;
  if (IsWriteType(req->op)) ++busy_writes_;
  inflight_.store(busy_, std::memory_order_relaxed);
  SendSlot(s);
}

void RemoteDevice::Impl::SendSlot(Slot& s) {
  if (s.tx_queued) return;  // cannot happen on a fresh Transmitter; defensive
  IoRequest* req = s.req;
  Header h;
  h.cmd = static_cast<std::uint16_t>(ToCmd(req->op));
  if ((req->flags & kIoFua) && req->op != IoOp::kRead && req->op != IoOp::kFlush) h.flags |= kFlagFua;
  if ((req->flags & kIoNoUnmap) && req->op == IoOp::kWriteZeroes) h.flags |= kFlagNoUnmap;
  if (req->op != IoOp::kFlush) {
    h.length = req->length;
    h.offset = req->offset;
  }
  h.id = std::uint64_t(s.gen) << 32 | s.index;
  if (req->op == IoOp::kWrite && digest_) {  // §4.1: computed on every send
    h.flags |= kFlagDigest;
    h.digest = PayloadDigest(req->data, req->length);
  }
  EncodeHeader(h, s.frame.header);
  if (req->op == IoOp::kWrite) {
    s.frame.payload = req->data;
    s.frame.payload_len = req->length;
  } else {
    s.frame.payload = nullptr;
    s.frame.payload_len = 0;
  }
  if (!Outstanding()) last_rx_ = Clock::now();  // the silence clock starts now
  s.sent_no = ++send_count_;
  s.on_wire = true;
  ++on_wire_;
  s.tx_queued = true;
  tx_->Enqueue(&s.frame);
}

void RemoteDevice::Impl::SendPing() {
  if (ping_queued_ || ping_outstanding_ || !tx_) return;
  Header h;
  h.cmd = static_cast<std::uint16_t>(Cmd::kPing);
  h.id = std::uint64_t(++ping_gen_) << 32 | kPingSlot;
  EncodeHeader(h, ping_frame_.header);
  if (!Outstanding()) last_rx_ = Clock::now();
  ping_outstanding_ = true;
  ping_queued_ = true;
  last_ping_ = Clock::now();
  tx_->Enqueue(&ping_frame_);
}

void RemoteDevice::Impl::FlushTx() {
  if (state_ != State::kConnected || !tx_) return;
  if (!tx_->Flush()) ConnectionLost("send failed", Clock::now());
}

void RemoteDevice::Impl::OnFrameSent(TxFrame* f, bool /*ok*/) {
  Slot& s = *static_cast<Slot*>(f->owner);
  s.tx_queued = false;
  if (s.early_done) {
    s.early_done = false;
    s.impl->CompleteSlot(s, std::move(s.early_status));
  }
}

void RemoteDevice::Impl::OnPingSent(TxFrame* f, bool) {
  static_cast<Impl*>(f->owner)->ping_queued_ = false;
}

void RemoteDevice::Impl::OnCheckSent(TxFrame* f, bool) {
  static_cast<Impl*>(f->owner)->check_queued_ = false;
}

void RemoteDevice::Impl::OnTxError(void* ctx) {
  // Runs inside Transmitter::Flush; the Transmitter must not be destroyed here.
  auto* self = static_cast<Impl*>(ctx);
  auto sp = self->shared_from_this();
  const std::uint64_t ep = self->epoch_;
  asio::post(self->strand_, [sp, ep] {
    if (ep == sp->epoch_) sp->ConnectionLost("send failed", Clock::now());
  });
}

// --- receive path --------------------------------------------------------------------------
//
// One recv() brings in as many replies as fit in rx_buf_ (a burst of 4 KiB READ replies costs
// one system call, not two per reply); ParseRx handles every whole one.  A payload that did not
// fully arrive with its header is read straight into the caller's buffer (or discarded, for a
// late reply), then parsing resumes.  Pump and FlushTx run once per parsed burst.
//
//   RECV --bytes--> PARSE --whole header (+ payload buffered)--> PARSE
//    ^                |  \--payload incomplete--> PAYLOAD / DRAIN --done--> PARSE
//    +--< 1 header ---+
//   Any error or bad frame: ConnectionLost (epoch_ bumps; stale completions are ignored).

void RemoteDevice::Impl::StartRead() {
  auto self = shared_from_this();
  const std::uint64_t ep = epoch_;
  socket_.async_read_some(rx_buf_.Space(), [self, ep](const boost::system::error_code& ec, std::size_t n) {
    if (ep != self->epoch_ || self->state_ != State::kConnected) return;
    if (ec) {
      return self->ConnectionLost(ec == asio::error::eof ? "closed by server" : "receive failed",
                                  Clock::now());
    }
    self->last_rx_ = Clock::now();
    self->rx_buf_.Commit(n);
    self->ParseRx(false);
  });
}

void RemoteDevice::Impl::ParseRx(bool completed) {
  while (state_ == State::kConnected && rx_buf_.size() >= kHeaderSize) {
    rx_buf_.Take(rx_hdr_, kHeaderSize);
    const RxStep step = OnHeader();
    if (step == RxStep::kStop) return;
    if (step == RxStep::kAsync) break;  // a payload read is in flight; it resumes parsing
    if (step == RxStep::kCompleted) completed = true;
  }
  if (state_ == State::kConnected && reader_slot_ == kPingSlot && drain_left_ == 0) StartRead();
  if (completed) {
    Pump();
    FlushTx();
  }
}

RemoteDevice::Impl::RxStep RemoteDevice::Impl::OnHeader() {
  if (!DecodeHeader(rx_hdr_, &rx_).ok() || !rx_.is_reply()) {
    ConnectionLost("malformed frame from server", Clock::now());
    return RxStep::kStop;
  }
  const Cmd cmd = rx_.command();
  if (cmd == Cmd::kDisconnect) {
    OnServerDisconnect();
    return RxStep::kStop;
  }
  // Only a correct answer ends an outage (Progress); an EPROTO frame before a close (above) or
  // a reply of the wrong length does not, or a peer that answers wrongly would reconnect
  // forever without io_timeout.
  if (cmd == Cmd::kPing) {
    if (rx_.id == (std::uint64_t(ping_gen_) << 32 | kPingSlot)) {
      ping_outstanding_ = false;
      if (busy_ == 0 && !checking_) Progress();  // alive, and nothing waits for an answer
    }
    return RxStep::kNext;
  }
  if (cmd == Cmd::kHello) {
    ConnectionLost("unexpected HELLO reply", Clock::now());
    return RxStep::kStop;
  }
  const std::uint32_t idx = static_cast<std::uint32_t>(rx_.id);
  const std::uint32_t gen = static_cast<std::uint32_t>(rx_.id >> 32);
  if (idx == kCheckSlot && check_outstanding_ && gen == check_gen_ && cmd == Cmd::kRead) {
    if (!HasPayload(rx_)) {  // the server refused the check READ
      Progress();
      FinishCheck(FromWireStatus(rx_.status, "connect check READ"));
      return RxStep::kCompleted;
    }
    if (rx_.length != check_len_) {
      bad_replies_.fetch_add(1, std::memory_order_relaxed);
      ConnectionLost("READ reply length mismatch", Clock::now());
      return RxStep::kStop;
    }
    Progress();
    rx_has_digest_ = rx_.flags & kFlagDigest;
    rx_digest_ = rx_.digest;
    const std::size_t have = rx_buf_.TakeInto(check_buf_.get(), rx_.length);
    if (have < rx_.length) {
      reader_slot_ = kCheckSlot;
      ReadPayload(kCheckSlot, have);
      return RxStep::kAsync;
    }
    FinishCheck(Status::OK());
    return RxStep::kCompleted;
  }
  Slot* s = idx < slots_.size() ? &slots_[idx] : nullptr;
  if (!s || !s->req || s->gen != gen || !s->on_wire || ToCmd(s->req->op) != cmd) {
    // Late or duplicated reply (a slot's earlier generation, or an unknown id): drop it, but
    // drain its payload so the stream stays in sync.
    if (!HasPayload(rx_) || rx_.length == 0) return RxStep::kNext;
    drain_left_ = rx_.length - rx_buf_.Skip(rx_.length);
    if (drain_left_ == 0) return RxStep::kNext;
    Drain();
    return RxStep::kAsync;
  }
  if (HasPayload(rx_)) {  // successful READ: payload goes into the caller's buffer
    if (rx_.length != s->req->length) {
      // Not progress: the outage clock and the backoff keep running (see the top of the file).
      bad_replies_.fetch_add(1, std::memory_order_relaxed);
      ConnectionLost("READ reply length mismatch", Clock::now());
      return RxStep::kStop;
    }
    answered_ = true;  // a PING answer shows liveness, this shows the server can take requests
    Progress();
    rx_has_digest_ = rx_.flags & kFlagDigest;
    rx_digest_ = rx_.digest;
    const std::size_t have = rx_buf_.TakeInto(s->req->data, rx_.length);
    if (have < rx_.length) {  // the rest comes from the socket straight into the buffer
      reader_slot_ = idx;
      ReadPayload(idx, have);
      return RxStep::kAsync;
    }
    ReadDone(*s);
    return RxStep::kCompleted;
  }
  answered_ = true;
  Progress();
  if (digest_ && rx_.status == static_cast<std::uint32_t>(WireStatus::kBadMsg) && cmd == Cmd::kWrite) {
    digest_errors_.fetch_add(1, std::memory_order_relaxed);
    Log(Describe(), "exporter saw a corrupted WRITE payload: re-sending it");
    Reissue(*s);
    return RxStep::kCompleted;
  }
  if (rx_.status == static_cast<std::uint32_t>(WireStatus::kShutdown)) {
    // The server is draining and will close: keep the request, re-send it on the next connection.
    s->on_wire = false;
    --on_wire_;
    return RxStep::kNext;
  }
  CompleteSlot(*s, FromWireStatus(rx_.status));
  return RxStep::kCompleted;
}

// DISCONNECT|reply: the server found a framing error and closes (§8.1).  When it names one of
// our requests, that request can never succeed: fail it rather than re-send it on every new
// connection (§8.4).  The others are re-sent as after any connection loss.
void RemoteDevice::Impl::OnServerDisconnect() {
  const std::uint32_t idx = static_cast<std::uint32_t>(rx_.id);
  const std::uint32_t gen = static_cast<std::uint32_t>(rx_.id >> 32);
  const bool ours = rx_.id != 0 && idx < slots_.size() && slots_[idx].req && slots_[idx].gen == gen &&
                    slots_[idx].on_wire;
  const Status why = FromWireStatus(rx_.status, "server closed the connection");
  if (!ours) return ConnectionLost("server reported a protocol error", Clock::now());
  Slot& s = slots_[idx];
  const char* name = CmdName(static_cast<std::uint16_t>(ToCmd(s.req->op)));
  Log(Describe(), std::string("server rejected a ") + name + " request (" + why.ToString() +
                      "): failing it with EIO, not re-sending it");
  answered_ = true;  // the loss is explained: do not blame the first request sent (backstop)
  ConnectionLost("server reported a protocol error", Clock::now());
  if (state_ == State::kClosed || !s.req || s.gen != gen) return;  // already ended by the backstop
  CompleteSlot(s, Status::IoError(std::string("server rejected the ") + name + " request"));
}

void RemoteDevice::Impl::ReadPayload(std::uint32_t idx, std::size_t done) {
  const bool check = idx == kCheckSlot;
  char* dst = check ? check_buf_.get() : slots_[idx].req->data;
  const std::size_t total = check ? check_len_ : slots_[idx].req->length;
  const std::size_t n = std::min<std::size_t>(kPayloadChunk, total - done);
  auto self = shared_from_this();
  const std::uint64_t ep = epoch_;
  asio::async_read(socket_, asio::buffer(dst + done, n),
                   [self, ep, idx, done, total](const boost::system::error_code& ec, std::size_t got) {
                     if (ep != self->epoch_ || self->state_ != State::kConnected) return;
                     if (ec) return self->ConnectionLost("receive failed", Clock::now());
                     self->last_rx_ = Clock::now();
                     if (done + got < total) return self->ReadPayload(idx, done + got);
                     self->reader_slot_ = kPingSlot;
                     if (idx == kCheckSlot) {
                       self->FinishCheck(Status::OK());
                     } else {
                       self->ReadDone(self->slots_[idx]);
                     }
                     self->ParseRx(true);
                   });
}

void RemoteDevice::Impl::Drain() {
  const std::size_t n = std::min(drain_left_, kDrainBufSize);
  auto self = shared_from_this();
  const std::uint64_t ep = epoch_;
  asio::async_read(socket_, asio::buffer(drain_buf_.get(), n),
                   [self, ep](const boost::system::error_code& ec, std::size_t got) {
                     if (ep != self->epoch_ || self->state_ != State::kConnected) return;
                     if (ec) return self->ConnectionLost("receive failed", Clock::now());
                     self->last_rx_ = Clock::now();
                     self->drain_left_ -= got;
                     if (self->drain_left_) return self->Drain();
                     self->ParseRx(false);
                   });
}

// §4.1: a READ payload is handed to the caller only when its digest matches; otherwise the
// READ is sent again (the caller's buffer is simply overwritten by the next reply).
bool RemoteDevice::Impl::DigestOk(const char* data, std::size_t len) {
  if (!digest_ || (rx_has_digest_ && PayloadDigest(data, len) == rx_digest_)) return true;
  digest_errors_.fetch_add(1, std::memory_order_relaxed);
  Log(Describe(), "corrupted READ payload (digest mismatch): reading again");
  return false;
}

void RemoteDevice::Impl::ReadDone(Slot& s) {
  if (!DigestOk(s.req->data, s.req->length)) return Reissue(s);
  CompleteSlot(s, Status::OK());
}

void RemoteDevice::Impl::Reissue(Slot& s) {
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

void RemoteDevice::Impl::CompleteSlot(Slot& s, Status st) {
  if (s.tx_queued) {  // the Transmitter still reads the caller's buffer: finish in OnFrameSent
    s.early_done = true;
    s.early_status = std::move(st);
    if (s.on_wire) {
      s.on_wire = false;
      --on_wire_;
    }
    return;
  }
  if (s.on_wire) {
    s.on_wire = false;
    --on_wire_;
  }
  IoRequest* req = s.req;
  FreeSlot(s);
  req->done(req, std::move(st));  // last: done() may re-enter Submit() or Close()
}

void RemoteDevice::Impl::FreeSlot(Slot& s) {
  if (IsWriteType(s.req->op)) --busy_writes_;
  --busy_;
  inflight_.store(busy_, std::memory_order_relaxed);
  s.req = nullptr;
  s.resend = false;
  if (++s.gen == 0) s.gen = 1;  // a late reply for this use no longer matches
  free_.push_back(s.index);
}

// Ends every request the device holds with `st`.  Callbacks run after the state is consistent.
void RemoteDevice::Impl::FailAll(const Status& st, bool count_timeouts) {
  IoRequest* head = nullptr;
  IoRequest* tail = nullptr;
  auto append = [&](IoRequest* r) {
    r->link = nullptr;
    if (tail) tail->link = r; else head = r;
    tail = r;
  };
  order_.clear();
  for (auto& s : slots_)
    if (s.req && !s.tx_queued && static_cast<std::uint32_t>(s.index) != reader_slot_) order_.push_back(s.index);
  std::sort(order_.begin(), order_.end(),
            [this](std::uint32_t a, std::uint32_t b) { return slots_[a].seq < slots_[b].seq; });
  for (std::uint32_t i : order_) {
    Slot& s = slots_[i];
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

void RemoteDevice::Impl::ArmTick() {
  tick_timer_.expires_after(tick_);
  auto self = shared_from_this();
  tick_timer_.async_wait([self](const boost::system::error_code& ec) { self->OnTick(ec); });
}

void RemoteDevice::Impl::OnTick(const boost::system::error_code& ec) {
  if (ec == asio::error::operation_aborted || state_ == State::kClosed) return;
  const auto now = Clock::now();
  switch (state_) {
    case State::kConnected: {
      if (Outstanding() && now - last_rx_ >= opts_.keepalive_timeout) {
        // TCP may stay open (SIGSTOPped or hung peer): silence is the failure signal.  The
        // outage began when the peer went quiet.
        ConnectionLost("keepalive timeout", last_rx_, false);
        break;
      }
      if (now - last_rx_ >= opts_.keepalive_interval && now - last_ping_ >= opts_.keepalive_interval)
        SendPing();
      // A request never waits forever, even on a connection that answers pings.  Failing it
      // alone could let the server execute it after a newer overlapping write, so the whole
      // connection goes: the server's session fence then orders the old requests before
      // anything sent on the next connection.
      bool stuck = checking_ && now - check_start_ >= opts_.io_timeout;
      for (auto& s : slots_)
        if (s.req && s.on_wire && now - s.start >= opts_.io_timeout) {
          stuck = true;
          break;
        }
      if (stuck) {
        ConnectionLost("request exceeded io_timeout", now, false);
        if (state_ == State::kClosed) return;  // a done() callback closed the device
        Log(Describe(), "request exceeded io_timeout: failing requests with EIO");
        SetState(State::kFailing);
        FailAll(Status::IoError(), true);
        break;
      }
      Pump();
      FlushTx();
      break;
    }
    case State::kConnecting:
    case State::kReconnecting:
    case State::kFailing: {
      if (state_ == State::kReconnecting && now - outage_start_ >= opts_.io_timeout) {
        Log(Describe(), "outage longer than io_timeout: failing requests with EIO");
        SetState(State::kFailing);
        FailAll(Status::IoError(), true);
        if (state_ == State::kClosed) return;
      }
      // A request older than io_timeout ends even while other requests keep ending the outage
      // (a peer that answers some requests and lies about others).  Its connection is gone, so
      // the server's session fence (docs/protocol.md §6.3) orders it before anything sent later.
      for (std::size_t i = 0; i < slots_.size() && state_ != State::kConnected; ++i) {
        Slot& s = slots_[i];
        if (!s.req || s.tx_queued || now - s.start < opts_.io_timeout) continue;
        timeouts_.fetch_add(1, std::memory_order_relaxed);
        CompleteSlot(s, Status::IoError("request exceeded io_timeout"));  // may re-enter
        if (state_ == State::kClosed) return;
      }
      if (attempt_active_ && now >= attempt_deadline_) {
        AttemptFailed(Status::TimedOut("handshake with " + Describe() + " timed out"), false);
        if (state_ == State::kClosed) return;
      }
      if (!attempt_active_ && now >= next_attempt_) StartAttempt();
      break;
    }
    case State::kClosed:
      return;
  }
  if (state_ != State::kClosed) ArmTick();
}

// --- close ---------------------------------------------------------------------------------

void RemoteDevice::Impl::Close() {
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

void RemoteDevice::Impl::DoClose() {
  if (state_ == State::kClosed) return;
  {
    std::lock_guard<std::mutex> l(mu_);
    closed_ = true;
  }
  ++epoch_;
  SetState(State::kClosed);
  health_.Down(Clock::now(), "closed");
  checking_ = false;
  check_outstanding_ = false;
  boost::system::error_code ec;
  resolver_.cancel();
  tx_.reset();
  CloseSockets();
  tick_timer_.cancel();
  kick_.cancel(ec);
  reader_slot_ = kPingSlot;
  FailAll(Status::IoError("device closed"), false);
}

RemoteStats RemoteDevice::Impl::Stats() const {
  RemoteStats st;
  switch (static_cast<State>(stat_state_.load(std::memory_order_relaxed))) {
    case State::kConnecting: st.state = "connecting"; break;
    case State::kConnected: st.state = "connected"; break;
    case State::kReconnecting: st.state = "reconnecting"; break;
    case State::kFailing: st.state = "failing"; break;
    case State::kClosed: st.state = "closed"; break;
  }
  st.reconnects = reconnects_.load(std::memory_order_relaxed);
  st.resent = resent_.load(std::memory_order_relaxed);
  st.timeouts = timeouts_.load(std::memory_order_relaxed);
  st.bad_replies = bad_replies_.load(std::memory_order_relaxed);
  st.check_failures = check_failures_.load(std::memory_order_relaxed);
  st.digest_errors = digest_errors_.load(std::memory_order_relaxed);
  st.checksum = stat_digest_.load(std::memory_order_relaxed);
  st.inflight = inflight_.load(std::memory_order_relaxed);
  st.requests = requests_.load(std::memory_order_relaxed);
  st.frames_sent = tx_stats_.frames.load(std::memory_order_relaxed);
  st.send_calls = tx_stats_.syscalls.load(std::memory_order_relaxed);
  st.frames_per_call = tx_stats_.FramesPerCall();
  return st;
}

// --- public wrapper --------------------------------------------------------------------------

Result<std::shared_ptr<RemoteDevice>> RemoteDevice::Connect(asio::io_context& io, const RemoteOptions& opts) {
  if (io.get_executor().running_in_this_thread())
    return Status::InvalidArgument("RemoteDevice::Connect called on an io_context thread");
  if (opts.queue_depth == 0) return Status::InvalidArgument("queue_depth must be > 0");
  auto impl = std::make_shared<Impl>(io, opts);
  Status st = impl->Start();
  if (!st.ok()) {
    impl->Close();
    return st;
  }
  return std::shared_ptr<RemoteDevice>(new RemoteDevice(std::move(impl)));
}

RemoteDevice::RemoteDevice(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
RemoteDevice::~RemoteDevice() { impl_->Close(); }
DeviceInfo RemoteDevice::Info() const { return impl_->Info(); }
void RemoteDevice::Submit(IoRequest* req) { impl_->Submit(req); }
std::string RemoteDevice::Describe() const { return impl_->Describe(); }
RemoteStats RemoteDevice::Stats() const { return impl_->Stats(); }
void RemoteDevice::Close() { impl_->Close(); }
bool RemoteDevice::SetConnectCheck(const ConnectCheck& check) { return impl_->SetConnectCheck(check); }
DeviceHealth RemoteDevice::Health() const { return impl_->Health(); }

}  // namespace dst::net
