// ServerCore and ServerConn: the one server-connection core behind the DST exporter
// (exporter.cc) and the NBD server (nbd_server.cc).  Private to netdriver/src.
//
// The core owns everything that is not protocol: the listener and accept loop, the export table,
// the shared buffer pool with its waiter list (backpressure), the stall sweep, Drain and
// Shutdown, the flush of the exports at the end of a drain, the connection table and the
// counters.  A protocol derives its server from ServerCore (NewConn) and its connection from
// ServerConn, and implements only its per-phase logic through the hooks below: handshake, request
// decode (HandleFrame), data start, reply encode (PrepareReply).  In the spirit of nbdkit's
// server/connections.c against protocol-handshake*.c and protocol.c.
//
// A server connection (the protocol's handshake fits in the HANDSHAKE box):
//
//   ACCEPTED --Start--> HANDSHAKE --protocol enters kServing--> SERVING
//                          |                                       |
//                          |     protocol error / EOF / DISC / Drain / stall / send error
//                          v                                       v
//                       CLOSING: stop reading (SHUT_RD), wait for the device's requests, send
//                                the replies still queued (at most kCloseGrace; forced closes
//                                drop them) --> FINISHED: transport closed, leaves the table
//
// Serving, per request slot (preallocated, max_inflight_per_connection per connection):
//
//   free --HandleFrame: TakeSlot--> [AcquireBuffer: over the connection's fair share of the pool
//   or its replies wait on it (MayGrow): park and stop reading until one of its own buffers
//   comes back; pool
//   empty: park on the waiter list, the next returned buffer resumes it] --> StartData --> ReceivePayload
//   (WRITE data: what the receive buffer holds, then straight from the transport) --> Submit
//   --> device thread: OnDeviceDone, PushDone --> strand: one drain per burst, PrepareReply,
//   every reply of the burst in one SendFrames --> sent: ReleaseSlot --> free
//   A request refused before its data: Reply at once (a refused WRITE's payload is discarded
//   first, DiscardPayload, so the stream stays in sync).
//
// Resource caps (ServerLimits, docs/security.md "Bounded resources"): the accept callback closes
// a connection over the total or per-address cap before NewConn allocates anything for it (at
// the total cap, past a burst of refusals, it rests for the rest of a half second); the
// periodic sweep closes a connection past its handshake deadline, one the server waits on without
// progress (stall_timeout), one that reads its queued replies slower than min_drain_rate, and an
// idle one (no request for idle_timeout).
//
// Buffer shares: the pool is shared by all connections of all exports.  A connection holding
// (or waiting for) buffers is "active"; each may hold at most max(2, (pool - reserve) / active)
// buffers (1 in a pool under 16), and takes another only while more than the reserve (an
// eighth of the pool) is free and none of its replies waits on its socket.  Its first buffer it
// may take from the reserve, so a new client finds one at once while the slow readers are fewer
// than the reserve; past that it waits in FIFO order for the next buffer that comes back, which
// min_drain_rate bounds.  Refusals and closes
// are logged once per address and interval, not once per connection.
//
// Threading: a ServerConn runs on its transport's strand.  Every top-level handler holds a Scope;
// leaving the outermost one runs Pump(), which resumes a parked request, restarts reading and
// finishes a closing connection, so no handler has to remember to.  Device completions arrive on
// device threads (OnDeviceDone, PushDone).  ServerCore's public methods are thread-safe.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include "dst/block_device.h"
#include "dst/buffer_pool.h"
#include "dst/net/export_access.h"
#include "dst/net/server_limits.h"
#include "dst/net/server_stats.h"
#include "dst/net/tcp_transport.h"
#include "dst/net/transmitter.h"
#include "dst/status.h"
#include "rx_buffer.h"
#include "server_alloc.h"

namespace dst::net::detail {

class ServerConn;

struct ServerCoreOptions {
  const char* log_name = "dst server";  // prefix of log lines, e.g. "dst nbd"
  const char* export_kind = "export";   // in error messages, e.g. "NBD export"
  std::string listen_address = "127.0.0.1";
  std::uint16_t port = 0;
  bool batching = true;
  std::uint32_t max_inflight_per_connection = 128;
  std::size_t buffer_size = 1u << 20;  // multiple of 4096
  std::size_t buffer_count = 64;
  std::chrono::milliseconds stall_timeout{30000};  // 0: no stall check
  ServerLimits limits;  // the sweep runs while any of its timeouts or stall_timeout is set
  ListenerFactory listener;  // null: TCP on listen_address:port
};

// The core's part of a protocol's options struct (fields of the same names).
template <typename O>
ServerCoreOptions CoreOptionsOf(const O& o, const char* log_name, const char* export_kind) {
  return ServerCoreOptions{.log_name = log_name,
                           .export_kind = export_kind,
                           .listen_address = o.listen_address,
                           .port = o.port,
                           .batching = o.batching,
                           .max_inflight_per_connection = o.max_inflight_per_connection,
                           .buffer_size = o.max_payload,
                           .buffer_count = o.buffer_count,
                           .stall_timeout = o.stall_timeout,
                           .limits = o.limits,
                           .listener = o.listener};
}

// What every export has, whatever its protocol; the protocol's entry derives from it.
struct ServedExport {
  virtual ~ServedExport() = default;

  std::string name;
  std::shared_ptr<BlockDevice> device;
  DeviceInfo info;
  bool read_only = false;  // the spec's flag or the device's
  // Who may use it (export_access.h); null: everyone, read-write (the library default).
  // Replaced whole by SetAccess; a connection keeps what its handshake found.
  std::atomic<std::shared_ptr<const AccessList>> allow;
  std::uint64_t order = 0;  // in adding order (NBD's default export is the first)
  std::atomic<std::uint64_t> requests{0};  // every request received on a connection to it
  int connections = 0;                     // GUARDED_BY(ServerCore::mu_)
  // Transmit counters of its connections that have left the table; live ones are summed on
  // demand, so the total never drops when a connection closes.
  std::uint64_t closed_frames = 0;      // GUARDED_BY(ServerCore::mu_)
  std::uint64_t closed_send_calls = 0;  // GUARDED_BY(ServerCore::mu_)

  // Sets name, device, info, read_only (the spec's flag or the device's) and allow.
  void Init(const std::string& export_name, std::shared_ptr<BlockDevice> dev, bool spec_read_only,
            const std::optional<AccessList>& access = std::nullopt) {
    if (access) allow.store(std::make_shared<const AccessList>(*access));
    name = export_name;
    device = std::move(dev);
    info = device->Info();
    read_only = spec_read_only || info.read_only;
  }
  // What `identity` ("" = unauthenticated) may do here; a read-only export caps it at kReadOnly.
  Access AccessOf(std::string_view identity) const {
    const std::shared_ptr<const AccessList> l = allow.load();
    const Access a = l ? AccessFor(*l, identity) : Access::kReadWrite;
    return a == Access::kReadWrite && read_only ? Access::kReadOnly : a;
  }
};

// Per export, for ListExports.
struct ExportCounters {
  int connections = 0;
  std::uint64_t requests = 0;
  std::uint64_t frames_sent = 0;
  std::uint64_t send_calls = 0;
  double frames_per_call = 0;
};

// A request slot.  The protocol's slot derives from it and points `frames` at its reply frames.
struct ServerReq {
  ServerConn* conn = nullptr;
  IoRequest io;
  char* buf = nullptr;       // pool buffer (READ/WRITE data, metadata replies)
  std::uint32_t status = 0;  // the protocol's reply status (wire status, errno); 0 = OK
  TxFrame* frames = nullptr;  // reply frames, set and filled by PrepareReply
  int frames_out = 0;         // of them still queued on the Transmitter
  ServerReq* next = nullptr;  // free list or completion list
};

class ServerCore : public std::enable_shared_from_this<ServerCore> {
 public:
  ServerCore(boost::asio::io_context& io, ServerCoreOptions opts);
  virtual ~ServerCore();
  ServerCore(const ServerCore&) = delete;
  ServerCore& operator=(const ServerCore&) = delete;

  Status Start();  // listens and starts accepting and the stall sweep
  std::uint16_t port() const { return port_; }
  // Stops accepting, lets in-flight requests finish, closes every connection, flushes every
  // writable export that can flush, then calls done on an io thread.
  void Drain(std::function<void(Status)> done);
  // Stops accepting and force-closes every connection (the server object is going away).
  void Shutdown();

  // Exports.  Add sets e->order; kExists if the name is taken.  Remove: kBusy while connected.
  Status AddExport(std::shared_ptr<ServedExport> e);
  Status RemoveExport(const std::string& name);
  std::shared_ptr<ServedExport> FindExport(const std::string& name) const;
  std::shared_ptr<ServedExport> FirstExport() const;  // the earliest added (or null)
  // Replaces the access list of export `name` (nullopt: everyone); later handshakes see it, and
  // open connections to it that the new list gives less access (none, or read-only where they
  // could write) are closed: a revoked identity keeps nothing (the client may reconnect).
  Status SetAccess(const std::string& name, std::optional<AccessList> allow);
  // Calls f(entry, counters) for every export, in name order, under the table lock.
  template <typename F>
  void VisitExports(F&& f) const;
  // A protocol's export status list: the common fields (name, device, size, read_only,
  // connections) filled here, the rest by extra(const Entry&, const ExportCounters&, S*).
  template <typename S, typename Entry, typename F>
  std::vector<S> ListExportsAs(F&& extra) const;

  // Server-wide counters.
  void FillStats(ServerStats* s) const;

  // False once Drain() or Shutdown() began: new connections and handshakes are refused.
  bool accepting() const;
  const ServerCoreOptions& options() const { return opts_; }
  std::size_t pool_count() const { return pool_.count(); }
  std::size_t pool_buffer_size() const { return pool_.buffer_size(); }
  std::size_t pool_available() const { return pool_.available(); }

  // For connections.
  bool Attach(ServerConn* c, const std::shared_ptr<ServedExport>& e);  // false while draining
  char* TryGetOrWait(ServerConn* c);  // nullptr: c is on the waiter list
  void PutBuffer(char* b);
  // Whether a connection holding `held` buffers may take another now, as far as the pool goes
  // (see "Buffer shares").
  bool MayTake(std::size_t held) const;
  // A connection starts (true) or stops holding or waiting for buffers.
  void SetActive(bool on) { on ? active_.fetch_add(1, std::memory_order_relaxed) : active_.fetch_sub(1, std::memory_order_relaxed); }
  std::size_t active_connections() const { return active_.load(std::memory_order_relaxed); }
  void CancelWait(ServerConn* c);
  void ConnFinished(ServerConn* c);  // on c's strand, once it is closed
  void RemoveConn(ServerConn* c);
  void Log(const std::string& who, const char* what, const char* detail) const;
  // Log() at most once per interval for each (what, address); the next line says how many were
  // held back.  For events an attacker can repeat at will (refusals, timeouts).
  void LogLimited(const std::string& address, const char* what, const char* detail);
  // The hook for a protocol that authenticates its peer (TLS): counts c under `identity` until
  // it leaves the table.  kBusy when the identity already has max_connections_per_identity
  // connections (the protocol then refuses in its own words, e.g. NBD_REP_ERR_POLICY).  At most
  // once per connection.
  Status ClaimIdentity(ServerConn* c, const std::string& identity);

  std::atomic<std::uint64_t> requests_{0};
  std::atomic<std::uint64_t> errors_replied_{0};
  std::atomic<std::uint64_t> protocol_errors_{0};
  std::atomic<std::uint64_t> refused_{0};
  std::atomic<std::uint64_t> timed_out_{0};

 protected:
  // A connection object for a new transport (not started yet).
  virtual std::shared_ptr<ServerConn> NewConn(std::unique_ptr<Transport> t) = 0;

  boost::asio::io_context& io_;

 private:
  void DoAccept();
  void StopListening();
  void ArmSweep();
  // Why a new connection from `address` is over a cap (null: admitted).  REQUIRES: mu_ held.
  const char* OverCap(const std::string& address) const;
  void MaybeDrainDone();
  void FlushAllAndFinish();
  template <typename F>
  void ForEachConn(F&& f);  // posts f(conn) to every connection's strand

  const ServerCoreOptions opts_;
  Strand ctl_;  // serializes the listener and the timers below
  std::unique_ptr<Listener> listener_;
  bool listening_ = false;  // on ctl_
  bool accept_paused_ = false;  // on ctl_: resting at max_connections
  std::chrono::steady_clock::time_point refusal_window_;  // on ctl_
  int refusals_ = 0;                                      // on ctl_, in that window
  boost::asio::steady_timer accept_timer_;
  boost::asio::steady_timer drain_timer_;
  // On the io_context, its handler bound to ctl_ and sweep_arena_: a sweep every second must not
  // allocate (through a type-erased strand executor it would).
  boost::asio::steady_timer sweep_timer_;
  HandlerArena sweep_arena_;
  std::uint16_t port_ = 0;
  BufferPool pool_;

  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<ServedExport>> exports_;  // GUARDED_BY(mu_)
  std::map<ServerConn*, std::shared_ptr<ServerConn>> conns_;     // GUARDED_BY(mu_)
  std::uint64_t next_order_ = 0;                                  // GUARDED_BY(mu_)
  bool draining_ = false;                                         // GUARDED_BY(mu_)
  bool stopped_ = false;                                          // GUARDED_BY(mu_)
  bool flush_started_ = false;                                    // GUARDED_BY(mu_)
  std::function<void(Status)> drain_done_;                        // GUARDED_BY(mu_)
  // Transmit totals of closed connections.
  std::uint64_t closed_frames_ = 0;      // GUARDED_BY(mu_)
  std::uint64_t closed_send_calls_ = 0;  // GUARDED_BY(mu_)
  // Open connections per peer address and per claimed identity (zero entries are erased).
  std::unordered_map<std::string, std::uint32_t> per_address_;   // GUARDED_BY(mu_)
  std::unordered_map<std::string, std::uint32_t> per_identity_;  // GUARDED_BY(mu_)

  struct LogWindow {
    std::chrono::steady_clock::time_point last;
    std::uint64_t held_back = 0;
  };
  std::mutex log_mu_;
  std::unordered_map<std::string, LogWindow> log_windows_;  // GUARDED_BY(log_mu_)
  std::chrono::steady_clock::time_point budget_start_;       // GUARDED_BY(log_mu_)
  int budget_used_ = 0;                                      // GUARDED_BY(log_mu_)
  std::vector<std::shared_ptr<ServerConn>> sweep_list_;  // on ctl_; keeps its capacity

  std::mutex pool_mu_;
  ServerConn* wait_head_ = nullptr;  // GUARDED_BY(pool_mu_)
  ServerConn* wait_tail_ = nullptr;  // GUARDED_BY(pool_mu_)
  std::atomic<int> waiters_{0};
  std::size_t reserve_ = 0;    // buffers only a connection's first may come from
  std::size_t min_share_ = 1;  // the share however many connections are active
  std::atomic<std::size_t> active_{0};

  std::atomic<std::uint64_t> connections_total_{0};
};

class ServerConn : public std::enable_shared_from_this<ServerConn> {
  friend class ServerCore;  // ClaimIdentity sets identity_

 public:
  enum class Phase { kHandshake, kServing, kClosing };

  ServerConn(std::shared_ptr<ServerCore> core, std::unique_ptr<Transport> transport);
  virtual ~ServerConn();
  ServerConn(const ServerConn&) = delete;
  ServerConn& operator=(const ServerConn&) = delete;

  void Start();                 // runs OnStart on the strand
  void StartDrain(bool force);  // on the strand
  // Periodic limits check (on the strand), with the sweep's clock: closes the connection past its
  // handshake deadline, when the server has waited on the client for stall_timeout without
  // progress (a silent client cannot pin buffers or slots forever), when it reads its queued
  // replies slower than min_drain_rate over a drain_window, or when it has been idle (no
  // request, nothing in flight) for idle_timeout.
  void Sweep(std::chrono::steady_clock::time_point now);
  // Any thread: runs Sweep(now) on the strand, with the connection's handler memory (the sweep
  // allocates nothing, so a server with no traffic stays allocation-free).
  void PostSweep(std::chrono::steady_clock::time_point now);
  void OnPoolResume();  // on the strand: a buffer came back
  // Any thread: a request is done (device, metadata worker); its reply leaves with the burst.
  void PushDone(ServerReq* r);

  const Strand& strand() const { return strand_; }
  const std::string& peer() const { return peer_; }
  // The peer's address without the port: the key of the per-address cap.
  const std::string& address() const { return address_; }
  const std::string& identity() const { return identity_; }  // ClaimIdentity's, or empty
  // Who the transport authenticated (Transport::identity(); "" = nobody).  For NBD it is set
  // after STARTTLS.
  const std::string& peer_identity() const { return transport_->identity(); }
  // The peer's access to e (peer_identity() against e's access list).
  Access AccessTo(const ServedExport& e) const { return e.AccessOf(peer_identity()); }
  const TxStats& tx_stats() const { return tx_stats_; }  // atomics: readable from any thread
  const std::shared_ptr<ServedExport>& served() const { return served_; }
  void set_served(std::shared_ptr<ServedExport> e) {  // by ServerCore::Attach
    granted_ = e->AccessOf(peer_identity());
    served_ = std::move(e);
  }

  // Intrusive pool-waiter link (ServerCore::pool_mu_).
  ServerConn* wait_next_ = nullptr;
  bool waiting_pool_ = false;

 protected:
  // Every top-level handler holds one (see the file comment).
  struct Scope {
    explicit Scope(ServerConn* c) : c_(c) { ++c_->depth_; }
    ~Scope() {
      if (--c_->depth_ == 0) c_->Pump();
    }
    ServerConn* c_;
  };

  // ---- Protocol hooks.
  virtual void OnStart() {}
  // True when the request loop also parses frames during the handshake (DST's HELLO is a frame).
  virtual bool FramesInHandshake() const = 0;
  virtual std::size_t FrameSize() const = 0;  // bytes of a request header
  virtual void HandleFrame(const std::uint8_t* hdr) = 0;  // one whole request header
  virtual void StartData(ServerReq* r) = 0;  // r holds its pool buffer now
  virtual void OnPayload(ServerReq* r) = 0;  // ReceivePayload completed
  // Device thread (or inline in Submit): set r->status from st.
  virtual void OnDeviceDone(ServerReq* r, const Status& st) = 0;
  // Encodes the reply: r->frames[0 .. r->frames_out) (headers and payload pointers).
  virtual void PrepareReply(ServerReq* r) = 0;
  // In the handshake phase: non-null (the reason for the log) when the server waits on the client.
  virtual const char* HandshakeStall() const = 0;
  virtual void OnFinished() {}  // closed; on the strand, before it leaves the table

  // ---- Services for the protocol.
  template <typename D>
  using Next = void (D::*)(const boost::system::error_code& ec, ServerReq* r);

  // The connection's request slots (max_inflight_per_connection of them), on the free list.
  // The protocol keeps the array; it must outlive every use of its slots (it does: a connection
  // is destroyed only after Finish, when the device and the Transmitter hold none).
  template <typename Req>
  std::unique_ptr<Req[]> MakeSlots() {
    const std::uint32_t n = core_->options().max_inflight_per_connection;
    // Not "slots": Qt defines that as a macro, and the tests see Qt's headers first (DST_PCH).
    std::unique_ptr<Req[]> reqs(new Req[n]);
    for (std::uint32_t i = 0; i < n; ++i) AddSlot(&reqs[i]);
    return reqs;
  }
  void AddSlot(ServerReq* r);
  // A free slot.  REQUIRES: phase kServing and a free slot (HandleFrame is only called then).
  ServerReq* TakeSlot();
  void ReleaseSlot(ServerReq* r);  // returns its buffer and the slot
  // Gets r a pool buffer and calls StartData(r), now or when a buffer comes back.
  void AcquireBuffer(ServerReq* r);
  // Reads `len` bytes of request data into r->buf, then OnPayload(r); a truncated payload closes.
  void ReceivePayload(ServerReq* r, std::uint32_t len);
  // Reads and drops `len` bytes of a refused WRITE, then replies with r->status.
  void DiscardPayload(ServerReq* r, std::uint32_t len);
  void Submit(ServerReq* r, IoOp op, std::uint32_t flags, std::uint64_t offset, std::uint32_t length);
  void Reply(ServerReq* r);  // PrepareReply and send now
  void CountRequest();
  void ProtocolViolation(const char* what, const char* detail);  // counts and logs
  void Log(const char* what, const char* detail) const { core_->Log(peer(), what, detail); }
  void BeginClose(bool force);
  // Counts an authenticated peer under its identity (max_connections_per_identity) once; OK for
  // an unauthenticated one.  kBusy over the cap (logged, rate-limited); the protocol refuses.
  Status ClaimPeerIdentity();
  // Logs (rate-limited) that the peer's identity may not use export `name`; returns the message.
  std::string LogDenied(const std::string& name);
  // A frame outside the slots (e.g. a handshake reply) was sent: progress, and Pump if idle.
  void FrameSent();
  void Send(TxFrame* f);  // enqueues and flushes one frame
  bool finished() const { return finished_; }

  // Fills p[0..n) from the receive buffer and then the transport; next runs in a Scope.
  template <typename D>
  void ReadBody(void* p, std::size_t n, ServerReq* r, Next<D> next);
  // Reads and drops n bytes; next runs in a Scope (ec set when the stream ended).
  template <typename D>
  void Discard(std::size_t n, ServerReq* r, Next<D> next);
  // Writes p[0..n) outside the frame path (handshake messages); next runs in a Scope.
  template <typename D>
  void WriteAll(const void* p, std::size_t n, Next<D> next);

  // Swaps the transport mid-stream (NBD STARTTLS): `upgrade` gets it and calls `done` on the
  // strand with its successor, or an error (then the old one is closed and gone).  Then next
  // runs in a Scope, ec set on failure (logged here).  A close that begins meanwhile waits for
  // the upgrade, which must have a deadline of its own (HandshakeLeft()).  REQUIRES: handshake
  // phase, no read or write outstanding, no buffered input, nothing queued to send.
  using UpgradeDone = std::function<void(Status, std::unique_ptr<Transport>)>;
  using TransportUpgrade = std::function<void(std::unique_ptr<Transport>, UpgradeDone)>;
  template <typename D>
  void UpgradeTransport(TransportUpgrade upgrade, Next<D> next);
  // What is left of the handshake deadline (`fallback` without one), at least 1 ms.
  std::chrono::milliseconds HandshakeLeft(std::chrono::milliseconds fallback) const;
  const Transport& transport() const { return *transport_; }  // not during an upgrade

  std::shared_ptr<ServerCore> core_ref_;
  ServerCore* core_;
  Phase phase_ = Phase::kHandshake;
  std::uint32_t dev_inflight_ = 0;  // requests owned by a device or worker thread

 private:
  template <typename F>
  auto H(F f) {
    return Bind(&arena_, strand_, std::move(f));
  }
  void Pump();
  void MaybeRead();
  bool CanRead() const;
  void OnRx(const boost::system::error_code& ec, std::size_t n);
  bool MayGrow() const;  // may take one more pool buffer now (see "Buffer shares")
  // share_checked: the caller (Pump) just saw MayGrow true.
  void ResumeAfterBuffer(bool share_checked = false);
  void SyncActive();  // tells the core whether this connection holds or waits for buffers
  void AfterPayload(const boost::system::error_code& ec, ServerReq* r);
  void AfterDiscard(const boost::system::error_code& ec, ServerReq* r);
  void Emit(ServerReq* r);
  void DrainDone();
  void StartUpgrade(TransportUpgrade upgrade, std::function<void(ServerConn*, const boost::system::error_code&)> next);
  void MaybeFinish();
  void Finish();
  template <typename D>
  void DiscardStep(ServerReq* r, Next<D> next);

  static void OnIoDone(IoRequest* req, Status st);
  static void OnReqSent(TxFrame* f, bool ok);
  static void OnTxError(void* ctx);

  std::unique_ptr<Transport> transport_;  // null only while UpgradeTransport runs
  const std::string peer_;
  const std::string address_;
  std::string identity_;  // set by ServerCore::ClaimIdentity under its mu_
  Strand strand_;
  HandlerArena arena_;  // posts of completed bursts (the transport has its own for I/O)
  TxStats tx_stats_;    // outlives tx_, which counts into it
  Transmitter tx_;
  boost::asio::steady_timer close_timer_;
  std::shared_ptr<ServedExport> served_;
  Access granted_ = Access::kNone;  // what Attach found; SetAccess closes the connection on less
  ServerReq* free_ = nullptr;
  ServerReq* pending_ = nullptr;  // waiting for a pool buffer
  std::uint8_t hdr_[kHeaderSize];

  int depth_ = 0;
  bool reading_ = false;      // a receive is outstanding
  bool writing_ = false;      // a WriteAll is outstanding
  bool upgrading_ = false;    // UpgradeTransport holds the transport
  bool read_shut_ = false;    // Shutdown issued to end them
  bool parked_pool_ = false;  // on the pool's waiter list (strand-local view)
  bool in_payload_ = false;   // reading request data the server waits for
  bool parsing_ = false;      // MaybeRead's loop is running (no re-entry)
  bool force_ = false;        // closing without waiting for unsent replies
  bool finished_ = false;
  bool close_timer_armed_ = false;
  std::uint64_t progress_ = 0;  // bumps on every completed read or write and every sent frame
  std::uint64_t seen_progress_ = 0;
  std::uint64_t requests_ = 0;  // CountRequest; activity for the idle cap
  std::uint64_t seen_requests_ = 0;
  const std::chrono::steady_clock::time_point accepted_at_;
  std::chrono::steady_clock::time_point progress_at_;  // the sweep first saw progress_ as is
  std::chrono::steady_clock::time_point active_at_;    // the sweep first saw requests_ as is
  std::size_t discard_left_ = 0;
  // Pool buffers this connection holds; at most its share (ServerCore::MayTake), so slow readers
  // (READ replies stuck in their sockets) cannot starve the others.
  std::size_t bufs_held_ = 0;
  bool counted_active_ = false;  // in ServerCore::active_
  // min_drain_rate: the current window of queued replies, opened by the sweep that first saw them.
  bool drain_window_open_ = false;
  std::uint64_t drain_bytes_at_ = 0;  // tx_stats_.bytes at its start
  std::chrono::steady_clock::time_point drain_from_;

  std::mutex done_mu_;
  ServerReq* done_head_ = nullptr;  // GUARDED_BY(done_mu_)
  ServerReq* done_tail_ = nullptr;  // GUARDED_BY(done_mu_)
  bool drain_posted_ = false;       // GUARDED_BY(done_mu_)

 protected:
  // Requests (and the start of their payloads) as a receive brought them in: a burst of
  // pipelined requests costs one system call, not one per header.
  RxBuffer rx_;
  char scratch_[16384];  // discarded bytes
};

// ------------------------------------------------------------------------------------------------
// Templates

template <typename F>
void ServerCore::VisitExports(F&& f) const {
  std::lock_guard<std::mutex> l(mu_);
  for (const auto& [name, e] : exports_) {
    ExportCounters c;
    c.connections = e->connections;
    c.requests = e->requests.load(std::memory_order_relaxed);
    c.frames_sent = e->closed_frames;
    c.send_calls = e->closed_send_calls;
    for (const auto& [p, conn] : conns_) {
      if (conn->served() != e) continue;
      c.frames_sent += conn->tx_stats().frames.load(std::memory_order_relaxed);
      c.send_calls += conn->tx_stats().syscalls.load(std::memory_order_relaxed);
    }
    c.frames_per_call = c.send_calls ? double(c.frames_sent) / double(c.send_calls) : 0.0;
    f(*e, c);
  }
}

template <typename S, typename Entry, typename F>
std::vector<S> ServerCore::ListExportsAs(F&& extra) const {
  std::vector<S> out;
  VisitExports([&](const ServedExport& e, const ExportCounters& k) {
    S s;
    s.name = e.name;
    s.device = e.device->Describe();
    s.size = e.info.size;
    s.read_only = e.read_only;
    s.connections = k.connections;
    extra(static_cast<const Entry&>(e), k, &s);
    out.push_back(std::move(s));
  });
  return out;
}

template <typename D>
void ServerConn::ReadBody(void* p, std::size_t n, ServerReq* r, Next<D> next) {
  const std::size_t have = rx_.TakeInto(p, n);
  if (have == n) {
    (static_cast<D*>(this)->*next)({}, r);
    return;
  }
  reading_ = true;
  in_payload_ = true;
  transport_->AsyncRead(boost::asio::buffer(static_cast<char*>(p) + have, n - have),
                        [self = shared_from_this(), r, next](const boost::system::error_code& ec, std::size_t) {
                          Scope s(self.get());
                          self->reading_ = false;
                          self->in_payload_ = false;
                          ++self->progress_;
                          (static_cast<D*>(self.get())->*next)(ec, r);
                        });
}

template <typename D>
void ServerConn::UpgradeTransport(TransportUpgrade upgrade, Next<D> next) {
  StartUpgrade(std::move(upgrade), [next](ServerConn* c, const boost::system::error_code& ec) {
    (static_cast<D*>(c)->*next)(ec, nullptr);
  });
}

template <typename D>
void ServerConn::Discard(std::size_t n, ServerReq* r, Next<D> next) {
  discard_left_ = n;
  DiscardStep<D>(r, next);
}

template <typename D>
void ServerConn::DiscardStep(ServerReq* r, Next<D> next) {
  discard_left_ -= rx_.Skip(discard_left_);
  if (discard_left_ == 0) {
    (static_cast<D*>(this)->*next)({}, r);
    return;
  }
  const std::size_t chunk = discard_left_ < sizeof scratch_ ? discard_left_ : sizeof scratch_;
  reading_ = true;
  in_payload_ = true;
  transport_->AsyncRead(boost::asio::buffer(scratch_, chunk),
                        [self = shared_from_this(), r, next](const boost::system::error_code& ec, std::size_t got) {
                          Scope s(self.get());
                          self->reading_ = false;
                          self->in_payload_ = false;
                          ++self->progress_;
                          if (ec) {
                            (static_cast<D*>(self.get())->*next)(ec, r);
                            return;
                          }
                          self->discard_left_ -= got;
                          self->template DiscardStep<D>(r, next);
                        });
}

template <typename D>
void ServerConn::WriteAll(const void* p, std::size_t n, Next<D> next) {
  writing_ = true;
  transport_->AsyncWrite(boost::asio::buffer(p, n),
                         [self = shared_from_this(), next](const boost::system::error_code& ec, std::size_t) {
                           Scope s(self.get());
                           self->writing_ = false;
                           ++self->progress_;
                           (static_cast<D*>(self.get())->*next)(ec, nullptr);
                         });
}

}  // namespace dst::net::detail

namespace dst::net {
// The protocol files (exporter.cc, nbd_server.cc) name the core's types unqualified.
using detail::ExportCounters;
using detail::ServedExport;
using detail::ServerConn;
using detail::ServerCore;
using detail::ServerReq;
}  // namespace dst::net
