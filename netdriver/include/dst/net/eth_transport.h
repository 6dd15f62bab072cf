// The raw-Ethernet Transport (docs/protocol.md §12.7): DST sessions over one interface's
// EthLink, with fragmentation, cumulative acknowledgements, retransmits, an AoE-like congestion
// window and the AEAD of eth_aead.h.
//
//   EthEndpoint (one per interface and process; the EthLink's receive side and the timers run on
//                its strand, on the io_context it is given or on an io thread of its own)
//     |-- MakeConnector(peer MAC) --> EthTransport (initiator: picks a random session id)
//     |-- MakeListener()          --> EthTransport per new session a peer opens (responder)
//
// Each EthTransport is a reliable byte stream, as the Transport seam expects: SendFrames copies
// whole DST frames into the session's send window as MTU-sized fragments (one sequence number
// each) and hands as many as the congestion window allows to the link, all of one call in one
// batch (one sendmmsg / one ring send()); the receiver keeps out-of-order fragments, drops
// duplicates and delivers bytes strictly in sequence order, so a re-sent write can never land
// after a newer one.  Session state machine (per direction of data):
//
//   fragment queued --(cwnd room)--> in flight --ack covers it--> freed (cwnd grows: +1 per
//        ^                              |                            fragment below ssthresh,
//        |                              |                            +1/cwnd above)
//        +-- rto expired: go back to the oldest unacked (cwnd halves, rto doubles up to rto_max)
//        +-- 3 duplicate acks: the oldest unacked fragment is re-sent at once (cwnd halves)
//   no ack progress for dead_time while data is outstanding --> FAILED (every operation ends
//        with timed_out, so the client core fails its I/O with EIO or reconnects)
//
// Security: with PSK entries every frame is sealed (AES-256-GCM, keys per session and direction,
// §12.6); a responder finds the initiator's identity by opening its first frame with each
// entry's keys.  Without keys the endpoint refuses to open unless `insecure_segment` is set.
//
// Threading: a transport's methods are called on the strand it was made for (the connector's
// strand, or a fresh strand for accepted sessions) and its completions are posted there.  The
// session state behind it is shared with the endpoint's strand under a per-session mutex.  An
// endpoint given the io_context its sessions' owners run on (dstd's) hands completions over
// without waking another thread: 1.3-1.4x the 4 KiB QD32 IOPS of an endpoint thread of its own.
//
// Endpoint life (Close or the last reference):
//   open --Close--> sessions failed (shut_down), listener ended --on the strand--> link closed,
//        timers cancelled.  With an own thread, Close waits for that step and joins the thread;
//        with a given io_context it runs it inline when called on the strand, else posts it and
//        waits for it (at most 5 s: the io_context may be stopping) unless called on one of that
//        io_context's threads.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dst/net/eth_link.h"
#include "dst/net/transport.h"
#include "dst/status.h"

namespace dst::net {

// Injected on the receive path, before a frame is looked at (tests: loss, reordering,
// duplication without netem).  Probabilities per frame.
struct EthFaultOptions {
  double drop = 0;
  double duplicate = 0;
  double reorder = 0;  // the frame is held back and delivered after the next one
  std::uint64_t seed = 1;
};

struct EthEndpointOptions {
  EthLinkOptions link;                 // link.ifname is required; rx kAuto means recvmmsg here
  // Keys: every (identity, key) a responder accepts; an initiator uses the entry named
  // `identity` (empty: the first).  Empty list: unencrypted, only with insecure_segment.
  std::vector<std::pair<std::string, std::vector<std::uint8_t>>> psks;
  std::string identity;
  bool insecure_segment = false;
  std::uint32_t window = 1024;         // fragments per session and direction (send and receive)
  std::chrono::milliseconds rto_initial{20};
  std::chrono::milliseconds rto_min{5};
  std::chrono::milliseconds rto_max{1000};
  std::chrono::milliseconds dead_time{10000};
  // The DST frames of one SendFrames call form one message, so small frames share fragments
  // (§12.7).  false: one message per DST frame (the first sender; benchmarks compare the two).
  bool coalesce = true;
  // Run on this io_context (which must outlive the endpoint) instead of an io thread of the
  // endpoint's own.  Null: own thread.
  boost::asio::io_context* io = nullptr;
  EthFaultOptions fault;
};

struct EthEndpointStats {
  std::string ifname;
  std::string mac;
  std::uint32_t mtu = 0;
  std::string tx_mode, rx_mode;
  bool encrypted = false;
  bool insecure_segment = false;
  std::uint64_t sessions = 0;          // open now
  std::uint64_t sessions_opened = 0;   // ever
  std::uint64_t frames_sent = 0, send_calls = 0;
  double frames_per_send_call = 0;
  std::uint64_t tx_ring_occupancy = 0, tx_ring_peak = 0;
  std::uint64_t frames_received = 0, receive_calls = 0;
  double frames_per_receive_call = 0;
  std::uint64_t retransmits = 0;       // fragments sent again (timeouts and fast retransmits)
  std::uint64_t timeouts = 0;          // retransmit timer expiries
  std::uint64_t duplicates = 0;        // fragments received twice (dropped)
  std::uint64_t out_of_order = 0;      // fragments received ahead of a gap (kept)
  std::uint64_t malformed = 0;         // failed §12.4, or wrong encryption mode for the endpoint
  std::uint64_t bad_tag = 0, replayed = 0;
  std::uint64_t unknown_session = 0;   // frames for no session of ours (dropped)
  std::uint64_t dead_sessions = 0;     // sessions failed after dead_time
  std::uint64_t fault_dropped = 0, fault_duplicated = 0, fault_reordered = 0;
};

class EthEndpoint;
struct EthSession;

// One answer to Discover(): a station on the segment and what it exports to us.
struct EthDiscovered {
  std::string mac;      // the station's MAC (for eth://IFACE/MAC/EXPORT)
  std::string listing;  // its DiscoveryResponder's text: "NAME SIZE ro|rw" lines
};

class EthTransport final : public Transport {
 public:
  EthTransport(std::shared_ptr<EthSession> s, Strand strand);
  ~EthTransport() override;

  const Strand& strand() const override { return strand_; }
  std::size_t SendFrames(const TxFrame* head, std::size_t offset, const SendLimits& lim,
                         boost::system::error_code& ec) override;
  void AsyncWaitWritable(IoCallback done) override;
  void AsyncReadSome(boost::asio::mutable_buffer buf, IoCallback done) override;
  void AsyncRead(boost::asio::mutable_buffer buf, IoCallback done) override;
  void AsyncWrite(boost::asio::const_buffer buf, IoCallback done) override;
  void Shutdown(ShutdownHow how) override;
  void Close() override;
  bool is_open() const override;
  const std::string& peer() const override { return peer_; }
  const std::string& identity() const override;

  // Counters of this session (tests).
  std::uint64_t retransmits() const;
  std::uint32_t cwnd() const;

 private:
  void StartRead(boost::asio::mutable_buffer buf, IoCallback done, bool exact);

  std::shared_ptr<EthSession> s_;
  Strand strand_;
  std::string peer_;
};

class EthEndpoint : public std::enable_shared_from_this<EthEndpoint> {
 public:
  // Opens the link on opt.link.ifname (in the calling thread's network namespace) and starts
  // receiving (on opt.io, or on an io thread of its own).  EPERM naming CAP_NET_RAW without it; InvalidArgument without
  // keys and without insecure_segment, or with a key shorter than 16 bytes.
  static Result<std::shared_ptr<EthEndpoint>> Open(EthEndpointOptions opt);
  ~EthEndpoint();

  // A connector to `peer_mac` whose transports run on `strand`.
  std::unique_ptr<Connector> MakeConnector(const Strand& strand, const std::array<std::uint8_t, 6>& peer_mac);
  // Accepts sessions peers open to us (one listener per endpoint; a second one replaces it).
  // Accepted transports run on fresh strands of `ex`'s io_context.
  std::unique_ptr<Listener> MakeListener(const Strand& ex);
  // Fails every session, ends the listener, closes the link (see "Endpoint life").  Idempotent.
  void Close();

  // Discovery (docs/protocol.md §12.8).  The responder is told of a peer's DISCOVER and the
  // identity that sealed it ("" on an insecure segment), on the endpoint's strand, so it must not
  // block (dstd's io thread may be the one running it); it calls `answer` once with the listing,
  // from any thread, now or later.  Unset: DISCOVER frames are ignored.
  using DiscoveryAnswer = std::function<void(const std::string& listing)>;
  using DiscoveryResponder = std::function<void(const std::string& identity, DiscoveryAnswer answer)>;
  void SetDiscoveryResponder(DiscoveryResponder r);
  // Broadcasts one DISCOVER and collects the replies that arrive within `wait`.  Blocking:
  // refused (NotSupported) on a thread of the endpoint's io_context, whose replies it would
  // hold up.  With keys, only stations holding our PSK can read the query or answer.
  Result<std::vector<EthDiscovered>> Discover(std::chrono::milliseconds wait);

  EthEndpointStats Stats() const;
  const std::string& ifname() const { return opt_.link.ifname; }
  const std::uint8_t* mac() const;
  const EthEndpointOptions& options() const { return opt_; }

  class Impl;
  explicit EthEndpoint(EthEndpointOptions opt);

 private:
  EthEndpointOptions opt_;
  std::shared_ptr<Impl> impl_;
};

// Accepts from several listeners at once (TCP and Ethernet on one server).
std::unique_ptr<Listener> MakeMultiListener(std::vector<std::unique_ptr<Listener>> inner, const Strand& ex);

}  // namespace dst::net
