// ClientCore: the reconnecting-client machinery shared by RemoteDevice (DST, remote_device.cc)
// and NbdClientDevice (NBD, nbd_client_device.cc).  Internal header.  Each protocol file keeps
// only its protocol (handshake, request encoding, reply decoding) behind ClientProtocol.
//
// Connection states:
//
//   CONNECTING --handshake ok--> CONNECTED --silence (keepalive) / socket error / bad frame--> RECONNECTING
//       ^                            |                                                           |
//       |                            +--identity changed (size, lost write permission,           |
//       |                               larger block) across a reconnect --> FAILING             |
//       +----------------------------- backoff (min..max) ---------------------------------------+
//   RECONNECTING --outage longer than io_timeout--> FAILING (requests end with EIO; reconnects go
//                                                   on, success -> CONNECTED)
//   CONNECTED, a request on the wire longer than io_timeout --> the connection is dropped, FAILING
//   handshake ok on a reconnect with a connect check installed --> CHECKING (inside CONNECTED):
//       one READ of the check range goes out alone in the control slot; verdict OK -> held
//       requests are re-sent; rejected -> they end with EIO, rejected(); then ADMITTED.
//   any --Close()--> CLOSED (the protocol's goodbye if connected; every request ends with EIO)
//
// Request life cycle:
//
//   Submit --> PENDING (MPSC list, mutex) --eventfd kick--> WAITING (strand FIFO, ordering rule)
//        --free slot--> IN FLIGHT (slot: TxFrame + IoRequest*, id = gen << 32 | slot) --reply--> done()
//   connection lost: in-flight slots stay and are re-sent in dispatch order after the handshake
//   (and the connect check).
//
// Ordering rule (one rule for both protocols, the stronger of the two the clients had):
//   * a write-type request (WRITE, TRIM, WRITE_ZEROES) waits while an older overlapping
//     write-type request is in flight or waiting, so overlapping writes reach the server in
//     submission order;
//   * a flush is a barrier: it waits until every older write-type request is acknowledged, and
//     no newer write-type request is sent before the flush (writes behind a waiting flush wait);
//   * reads pass everything.
//   Requests reach a slot in submission order, so dispatch order is the re-send order.
//   IoRequest::scratch is never touched (callers such as MirrorDevice keep data there).
//
// Connecting (all on the strand, nothing blocks):
//
//   StartAttempt --Connector::AsyncConnect--> TRANSPORT --proto Handshake task (HandshakeIo)-->
//       OnHandshakeDone --ok--> OnHandshake (identity check, Attach) --> CONNECTED
//   any failure --> AttemptFailed (backoff; a first connect gives up at connect_timeout or on a
//   hard refusal).  connect_timeout bounds dial + handshake: the tick abandons a late attempt
//   (AbortAttempt: the epoch moves on, the connector is cancelled, the handshake transport is
//   closed so its task ends).  The Connector comes from ClientCoreOptions::connector (TCP or
//   AF_UNIX by default; TLS plugs in there).
//
// Progress: only a correct reply ends an outage and resets the reconnect backoff (Progress); a
// keepalive answer counts only while no request waits.  A connection lost without progress
// retries after a growing backoff, so a lying peer costs EIO after io_timeout, not a storm.
//
// Poison backstop (optional, DST docs/protocol.md §8.4): a request that was the first one sent
// on kPoisonLosses consecutive connections the server closed before answering anything ends
// with EIO instead of being re-sent forever.
//
// Threading: Submit(), Info(), Stats counters and Health() from any thread; everything else on
// the connection strand.  Connection I/O goes only through the Transport seam (transport.h): a
// Connector dials, the handshake task talks through HandshakeIo, Attach() keeps the transport,
// and receives (StartRead, ReadRest, DrainRest) and the Transmitter's sends use it.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <coroutine>
#include <functional>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>

#include "co_task.h"
#include "connect_gate.h"
#include "dst/block_device.h"
#include "dst/net/client_device.h"
#include "dst/net/transmitter.h"
#include "dst/net/transport.h"
#include "dst/status.h"
#include "rx_buffer.h"
#include "server_alloc.h"

namespace dst::net {

using ClientClock = std::chrono::steady_clock;

struct ClientCoreOptions : ClientOptions {
  std::uint16_t port = 0;
  std::string unix_socket;  // non-empty: connect here instead of host:port
  bool poison_backstop = false;
  const char* log_tag = "client";

  ClientCoreOptions(const ClientOptions& o, std::uint16_t p, const char* tag)
      : ClientOptions(o), port(p), log_tag(tag) {}
};

// Handshake bytes over a Transport, for the protocols' Task-based handshakes (co_task.h).  Read
// and Write move exactly n bytes and yield a Status; an attempt the core abandons (timeout,
// Close) closes the transport, so a pending Read or Write ends with an error.  Completions run on
// the transport's strand and keep the owner (`keep`) alive until they resume the task.
class HandshakeIo {
 public:
  HandshakeIo() = default;
  // `slot` owns the transport (the core's); Upgrade swaps what it holds.
  HandshakeIo(std::unique_ptr<Transport>* slot, std::weak_ptr<void> owner)
      : t_(slot->get()), slot_(slot), owner_(std::move(owner)) {}

  struct [[nodiscard]] Op {
    HandshakeIo* io;
    void* buf;
    std::size_t n;
    bool write;
    boost::system::error_code ec{};
    bool await_ready() const noexcept { return n == 0; }
    void await_suspend(std::coroutine_handle<> h);
    Status await_resume() const;
  };
  Op Read(void* buf, std::size_t n) { return Op{this, buf, n, false}; }
  Op Write(const void* buf, std::size_t n) { return Op{this, const_cast<void*>(buf), n, true}; }

  // Mid-stream transport swap (NBD STARTTLS): `upgrade` gets the transport and calls back on the
  // strand with its successor or an error (the old one is then gone).  The upgrade needs its own
  // deadline: an abandoned attempt cannot close a transport the upgrade holds.
  using UpgradeDone = std::function<void(Status, std::unique_ptr<Transport>)>;
  using Upgrader = std::function<void(std::unique_ptr<Transport>, UpgradeDone)>;
  // `upgrade` and `st` live in the caller's frame: g++ 12 mishandles awaiters and operands with
  // non-trivial destructors in a co_await expression (a double free).
  struct UpgradeOp {
    HandshakeIo* io;
    const Upgrader* upgrade;
    Status* st;
    bool await_ready() const noexcept { return false; }
    bool await_suspend(std::coroutine_handle<> h);  // false: resume at once (no transport)
    void await_resume() const noexcept {}
  };
  UpgradeOp Upgrade(const Upgrader* upgrade, Status* st) { return UpgradeOp{this, upgrade, st}; }

 private:
  Transport* t_ = nullptr;
  std::unique_ptr<Transport>* slot_ = nullptr;
  std::weak_ptr<void> owner_;  // a pending completion holds it (weak here: no cycle)
};

// What a handshake found.  `features` is the protocol's own (e.g. digests, structured replies).
struct Negotiated {
  DeviceInfo info;
  std::uint64_t features = 0;
};

class ClientCore;

struct ClientSlot {
  TxFrame frame;             // header re-encoded on every send
  ClientCore* core = nullptr;
  IoRequest* req = nullptr;  // null: free
  std::uint32_t index = 0;
  std::uint32_t gen = 1;     // never 0, so no request id is 0
  std::uint64_t seq = 0;     // dispatch order (= submission order where ordering matters)
  std::uint64_t sent_no = 0; // send order on the current connection (poison suspect)
  ClientClock::time_point start;  // when it entered the slot (per-request deadline)
  bool on_wire = false;      // sent on the current connection, reply outstanding
  bool tx_queued = false;    // frame still referenced by the Transmitter
  bool early_done = false;   // reply came while the frame was still queued
  bool resend = false;       // send again once the frame is released
  Status early_status;
  std::uint64_t id() const { return std::uint64_t(gen) << 32 | index; }
};

// What the control slot (the one beyond queue_depth) carries.
enum class ControlUse { kNone, kKeepalive, kCheck };

// Result of parsing from the receive buffer.
enum class RxStep {
  kNeedMore,   // a whole frame is not buffered yet: read more
  kNext,       // one frame handled, nothing completed
  kCompleted,  // one frame handled and a request ended (Pump after the burst)
  kAsync,      // ReadRest (then OnRest()) or DrainRest started
  kStop,       // the connection was lost
};

// Export sizes a client accepts from a peer's handshake (issue 11 item 5, a hostile server):
// above 0, a multiple of `block` (the peer's block size), and at most kMaxExportSize, so every
// offset fits off_t (FUSE, pread) and offset + length never wraps.  ProtocolError otherwise.
inline constexpr std::uint64_t kMaxExportSize = (std::uint64_t(1) << 63) - (std::uint64_t(1) << 16);
Status CheckExportSize(std::uint64_t size, std::uint32_t block);

// The protocol half, called by the core on its strand.
class ClientProtocol {
 public:
  virtual ~ClientProtocol() = default;
  virtual std::string Describe() const = 0;
  // Submit-time check (under the core's submit mutex; no allocation on success).
  virtual Status Validate(const DeviceInfo& info, const IoRequest& req) const {
    return ValidateRequest(info, req);
  }
  // Strand: negotiate on a new connection.  *hard: do not retry a first connect.  The arguments
  // outlive the task (the core owns them for the attempt).
  virtual Task<Status> Handshake(HandshakeIo& io, Negotiated* n, bool* hard) = 0;
  // Strand: a new connection is up (parser state reset, features of its handshake).
  virtual void OnConnection(std::uint64_t features) = 0;
  // Encodes slot s (its req; for a keepalive the protocol's own probe) into s.frame.
  virtual void Encode(ClientSlot& s, ControlUse use) = 0;
  // Parses one frame from the front of rx.
  virtual RxStep Parse(RxBuffer& rx) = 0;
  // A ReadRest finished (the payload is in its buffer).
  virtual RxStep OnRest() = 0;
  // Close(): encode a goodbye into `f` (return false: none).
  virtual bool EncodeGoodbye(TxFrame* /*f*/) { return false; }
  // Check READ finished with its data in buffer; false: corrupted, read it again.
  virtual bool CheckDataOk(const char* /*data*/, std::uint32_t /*len*/) { return true; }

 protected:
  ClientCore* core_ = nullptr;  // set by the core that owns this protocol

 private:
  friend class ClientCore;
};

class ClientCore : public std::enable_shared_from_this<ClientCore> {
 public:
  enum class State : int { kConnecting, kConnected, kReconnecting, kFailing, kClosed };

  ClientCore(boost::asio::io_context& io, const ClientCoreOptions& opts,
             std::unique_ptr<ClientProtocol> proto);
  ~ClientCore();

  // Creates a core and runs the first connect (blocking, bounded by connect_timeout; not on one
  // of the io_context's threads).  `who` names the client in errors.
  static Result<std::shared_ptr<ClientCore>> Connect(boost::asio::io_context& io, const ClientCoreOptions& opts,
                                                     std::unique_ptr<ClientProtocol> proto, const char* who);

  // --- any thread ---
  Status Start();  // blocking first connect (off the io threads)
  DeviceInfo Info() const {
    std::lock_guard<std::mutex> l(mu_);
    return info_;
  }
  void Submit(IoRequest* req);
  std::string Describe() const { return proto_->Describe(); }
  // The common counters; keepalive probes sent go to *keepalives.
  ClientStats Counters(std::uint64_t* keepalives = nullptr) const;
  void Close();
  void SetStateListener(ClientDevice::StateListener l);
  static const char* StateName(State s);
  const char* StateNow() const { return StateName(static_cast<State>(stat_state_.load(std::memory_order_relaxed))); }
  bool SetConnectCheck(const ConnectCheck& c) {
    gate_.Set(c);
    return true;
  }
  DeviceHealth Health() const {
    const auto st = static_cast<State>(stat_state_.load(std::memory_order_relaxed));
    return health_.Get(st == State::kConnected, st == State::kClosed);
  }
  void Log(const std::string& msg) const;

  // --- strand: used by the protocol's parser ---
  // The slot a reply id names, if it is on the wire now (request or control slot).
  ClientSlot* Lookup(std::uint64_t id);
  bool IsControl(const ClientSlot& s) const { return s.index == control_index_; }
  ControlUse control_use() const { return control_use_; }
  // A reply ended slot s with st (a request, the keepalive or the connect check).
  void Finish(ClientSlot& s, Status st);
  // A correct reply arrived: the outage is over, backoff resets.  `answered`: to a request.
  void Progress(bool answered);
  // The server will not run s now (shutting down): re-send it on the next connection.
  void Requeue(ClientSlot& s);
  // Send s again on this connection (e.g. a corrupted payload).
  void Reissue(ClientSlot& s);
  void Lost(const char* why, bool closed_by_peer = true) {
    ConnectionLost(why, ClientClock::now(), closed_by_peer);
  }
  // The loss that follows is explained by the server (no poison suspect on this connection).
  void MarkAnswered() { answered_ = true; }
  bool connected() const { return state_ == State::kConnected; }
  bool closed() const { return state_ == State::kClosed; }
  void CountBadReply() { bad_replies_.fetch_add(1, std::memory_order_relaxed); }
  const DeviceInfo& strand_info() const { return info_; }  // written on the strand only
  // Reads the rest of a payload (`have` of `total` already taken from the buffer) straight into
  // dst, on behalf of slot `owner` (null: none), then calls OnRest() and resumes parsing.
  void ReadRest(ClientSlot* owner, char* dst, std::size_t total, std::size_t have);
  // Discards n bytes from the socket (after what the buffer held), then resumes parsing.
  void DrainRest(std::size_t n);

 private:
  template <class> friend struct ClientCheckHooks;

  // Connection management.
  void StartAttempt();
  void OnConnected(std::uint64_t ep, Status st, std::unique_ptr<Transport> t);
  static void OnHandshakeDone(void* ctx);
  void AbortAttempt(Status why);
  void AttemptFailed(Status st, bool hard);
  void OnHandshake(const Negotiated& n);
  bool IdentityChanged(const DeviceInfo& ni, DeviceInfo* keep);
  void Attach(std::unique_ptr<Transport> t);  // t becomes this connection's transport
  void ConnectionLost(const char* why, ClientClock::time_point outage_start, bool closed_by_peer);
  ClientSlot* PoisonSuspect(bool closed_by_peer);
  bool StartCheck();
  void FinishCheck(Status read_status);
  void Admit();
  void SetState(State s);
  void CloseSockets();
  void ReportFirst(Status st);

  // Data path.
  void ArmKick();
  void OnKick(const boost::system::error_code& ec);
  void TakePending();
  void Pump();
  bool MayDispatch(const IoRequest& r, bool* flush_waiting, bool* older_write_waiting);
  void Dispatch(IoRequest* req);
  void SendSlot(ClientSlot& s);
  bool UseControl(ControlUse use, std::uint64_t offset, std::uint32_t length, char* buf);
  void SendKeepalive();
  void FlushTx();
  void StartRead();
  void ReadMore();  // the next chunk of a ReadRest
  void ParseRx(bool completed);
  void CompleteSlot(ClientSlot& s, Status st);
  void FreeSlot(ClientSlot& s);
  void ReleaseControl();
  void FailAll(const Status& st, bool count_timeouts);
  void ArmTick();
  void OnTick(const boost::system::error_code& ec);
  void TickConnected(ClientClock::time_point now);
  bool TickOffline(ClientClock::time_point now);
  void ForgiveStall(ClientClock::duration stall);
  void DoClose();
  bool Outstanding() const { return on_wire_ > 0 || control_use_ != ControlUse::kNone; }
  static void OnFrameSent(TxFrame* f, bool ok);
  static void OnGoodbyeSent(TxFrame*, bool) {}
  static void OnTxError(void* ctx);

  boost::asio::io_context& io_;
  const ClientCoreOptions opts_;
  const std::unique_ptr<ClientProtocol> proto_;
  Strand strand_;
  std::unique_ptr<Transport> transport_;  // the current connection (closed between connections)
  boost::asio::basic_waitable_timer<ClientClock, boost::asio::wait_traits<ClientClock>, Strand> tick_timer_{strand_};
  boost::asio::posix::basic_stream_descriptor<Strand> kick_{strand_};
  // Memory for the kick wait: Asio's one-slot per-thread cache misses when a second handler is
  // live on the io thread (the eth transport's completions are), and every I/O kicks.
  detail::HandlerArena kick_arena_;
  const std::chrono::milliseconds tick_;

  // Shared with submitters.
  mutable std::mutex mu_;
  DeviceInfo info_;                    // GUARDED_BY(mu_) (the strand also reads it unlocked)
  IoRequest* pending_head_ = nullptr;  // GUARDED_BY(mu_)
  IoRequest* pending_tail_ = nullptr;  // GUARDED_BY(mu_)
  bool kick_pending_ = false;          // GUARDED_BY(mu_)
  bool accepting_ = false;             // GUARDED_BY(mu_): false while failing/closed
  bool closed_ = false;                // GUARDED_BY(mu_)
  int kick_fd_ = -1;

  // First-connect result (Start waits on it) and Close's hand-off.
  std::mutex first_mu_;
  std::condition_variable first_cv_;
  bool first_done_ = false;
  Status first_status_;
  bool close_done_ = false;

  // Connect attempt (strand).  The handshake task and its arguments live here until the next
  // attempt replaces them, so a late completion of an abandoned attempt finds them intact.
  std::unique_ptr<Connector> connector_;
  std::unique_ptr<Transport> hs_transport_;  // the connection being negotiated
  HandshakeIo hs_io_;
  Negotiated hs_neg_;
  bool hs_hard_ = false;
  std::uint64_t hs_epoch_ = 0;
  ClientClock::time_point attempt_deadline_;
  Task<Status> hs_task_;

  // Strand-only state.
  State state_ = State::kConnecting;
  bool initial_ = true;
  ClientClock::time_point initial_deadline_;
  std::uint64_t epoch_ = 0;  // bumps whenever a connection/attempt is abandoned
  bool attempt_active_ = false;
  ClientClock::time_point next_attempt_;
  std::chrono::milliseconds backoff_;
  ClientClock::time_point outage_start_;
  bool in_outage_ = false;
  Status last_error_;
  std::unique_ptr<Transmitter> tx_;
  std::vector<ClientSlot> slots_;  // queue_depth request slots + the control slot (last)
  const std::uint32_t control_index_;
  std::vector<std::uint32_t> free_;   // stack of free request slot indices
  std::vector<std::uint32_t> order_;  // scratch: slots in dispatch order
  struct Range { std::uint64_t off, len; };
  std::vector<Range> blocked_;        // scratch for Pump, capacity queue_depth
  IoRequest* wait_head_ = nullptr;
  IoRequest* wait_tail_ = nullptr;
  std::uint64_t dispatch_seq_ = 0;
  std::uint32_t busy_ = 0;        // request slots holding a request
  std::uint32_t busy_writes_ = 0; // ... of write type
  std::uint32_t on_wire_ = 0;     // requests with a reply outstanding on this connection
  bool resend_waiting_ = false;   // some slot has `resend` set
  std::uint64_t send_count_ = 0;  // frames sent on this connection (sent_no)
  bool answered_ = false;         // the server answered a request on this connection
  bool conn_progress_ = false;    // a correct reply arrived on this connection
  std::uint64_t suspect_seq_ = 0; // poison backstop: request blamed for the last losses
  int suspect_losses_ = 0;
  ClientClock::time_point last_rx_;  // last byte received (or start of the current wait)
  ClientClock::time_point last_keepalive_;
  ClientClock::time_point last_tick_{};  // when the tick last ran (stall detection, OnTick)
  ControlUse control_use_ = ControlUse::kNone;
  IoRequest control_req_;
  std::unique_ptr<char[]> probe_buf_;
  TxFrame goodbye_frame_;

  // Receive state.
  RxBuffer rx_buf_;
  bool rx_rest_ = false;             // ReadRest / DrainRest in progress
  ClientSlot* rx_owner_ = nullptr;   // slot whose buffer ReadRest fills
  char* rest_dst_ = nullptr;         // ReadRest: destination, bytes wanted, bytes done
  std::size_t rest_total_ = 0;
  std::size_t rest_done_ = 0;
  std::size_t drain_left_ = 0;
  std::unique_ptr<char[]> drain_buf_;

  // Connect check (connect_gate.h).
  ConnectGate gate_;
  bool checking_ = false;
  ClientClock::time_point check_start_;
  std::uint32_t check_cap_ = 0;
  std::unique_ptr<char[]> check_buf_;  // grows once per larger check, never per I/O

  HealthClock health_;
  std::mutex listener_mu_;
  ClientDevice::StateListener listener_;  // GUARDED_BY(listener_mu_)

  // Stats.
  TxStats tx_stats_;
  std::atomic<int> stat_state_{0};
  std::atomic<std::uint64_t> reconnects_{0}, resent_{0}, timeouts_{0}, requests_{0};
  std::atomic<std::uint64_t> bad_replies_{0}, check_failures_{0}, keepalives_{0};
  std::atomic<std::uint32_t> inflight_{0};
};

// Connects a Device (RemoteDevice, NbdClientDevice) speaking protocol Proto (built from opts).
template <class Device, class Proto, class Options>
Result<std::shared_ptr<Device>> ConnectClient(boost::asio::io_context& io, const Options& opts,
                                              const ClientCoreOptions& co, const char* who) {
  auto proto = std::make_unique<Proto>(opts);
  const Proto* p = proto.get();
  auto core = ClientCore::Connect(io, co, std::move(proto), who);
  if (!core.ok()) return core.status();
  return std::make_shared<Device>(core.value(), p);
}

}  // namespace dst::net
