// The raw-Ethernet Transport: sessions, fragmentation, acknowledgements, retransmits, AEAD.
// The design and the state diagram are in eth_transport.h; the wire rules in
// docs/protocol.md §12.7.
#include "dst/net/eth_transport.h"

#include <sys/random.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <fmt/format.h>

#include "dst/net/eth_aead.h"
#include "server_alloc.h"

namespace dst::net {

namespace asio = boost::asio;
using Clock = std::chrono::steady_clock;

namespace {

inline bool SeqLt(std::uint32_t a, std::uint32_t b) { return static_cast<std::int32_t>(a - b) < 0; }

std::uint64_t MacKey(const std::uint8_t* m) {
  std::uint64_t k = 0;
  for (std::size_t i = 0; i < kMacLen; ++i) k = (k << 8) | m[i];
  return k;
}

std::uint64_t RandomSession() {
  std::uint64_t v = 0;
  while (v == 0) {
    if (::getrandom(&v, sizeof v, 0) != sizeof v) v = std::uint64_t(Clock::now().time_since_epoch().count()) | 1;
  }
  return v;
}

// splitmix64: the fault hook's generator (reproducible from the seed).
std::uint64_t NextRand(std::uint64_t* s) {
  std::uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
bool Chance(std::uint64_t* s, double p) { return p > 0 && double(NextRand(s) >> 11) * 0x1.0p-53 < p; }

}  // namespace

// ---------------------------------------------------------------------------------------------
// One session: both directions' windows, guarded by mu.  Shared by the EthTransport handle
// (owner strand) and the endpoint's io thread (receive, timers).
struct EthSession : std::enable_shared_from_this<EthSession> {
  struct TxSlot {
    EthHeader h;  // DATA header without ack/window/packet (filled at each transmission)
    Clock::time_point sent{};
    bool ever_sent = false;
    bool resent = false;
  };

  std::mutex mu;
  EthEndpoint::Impl* ep = nullptr;            // outlives sessions (Close fails them first)
  std::shared_ptr<EthEndpoint::Impl> ep_ref;  // keeps it so
  std::uint8_t peer[kMacLen] = {};
  std::uint64_t id = 0;
  std::string peer_name;  // "eth://if/mac" for log lines
  std::string identity;   // the PSK identity of the initiator (empty: unencrypted)
  std::unique_ptr<EthSealer> sealer;
  std::unique_ptr<EthOpener> opener;
  std::uint64_t packet = 0;  // unencrypted packet numbering
  std::uint32_t W = 0, frag = 0;

  // Send window: fragments [snd_una, snd_end) are held; [snd_una, snd_nxt) were transmitted.
  std::vector<std::uint8_t> tx_data;
  std::vector<TxSlot> tx;
  // snd_max: one past the highest fragment ever transmitted (snd_nxt goes back after a timeout,
  // and acks for what was sent before it must still count).
  std::uint32_t snd_una = 0, snd_nxt = 0, snd_max = 0, snd_end = 0;
  double cwnd = 16, ssthresh = 0;
  std::uint32_t peer_window = 0;
  int dupacks = 0;
  Clock::duration srtt{}, rttvar{}, rto{};
  bool have_rtt = false;
  Clock::time_point last_heard{};
  std::uint32_t want_slots = 0;
  IoCallback wr_wait;
  std::uint64_t retransmits = 0;

  // Receive window: seq [rcv_read, rcv_nxt) arrived in order and are unread; slots past
  // rcv_nxt may hold fragments that came early.
  std::vector<std::uint8_t> rx_data;
  std::vector<std::uint16_t> rx_len;
  std::vector<std::uint8_t> rx_have;
  std::uint32_t rcv_nxt = 0, rcv_read = 0, rx_off = 0;
  std::uint32_t last_adv = 0;
  // An acknowledgement is owed: sent after the receive batch (one per session per batch) unless a
  // data frame carried it.  Delaying it further (a delayed ACK waiting for the reply to carry
  // it) measured no IOPS gain and cost 5x the throughput under 1% loss (eth_transport_test).
  bool need_ack = false;

  // The pending read.
  bool rd_pending = false, rd_exact = false;
  std::uint8_t* rd_ptr = nullptr;
  std::size_t rd_size = 0, rd_done = 0;
  IoCallback rd_cb;

  std::optional<Strand> owner;  // set once a transport handle exists
  // Completions posted to the owner come from the endpoint's thread; Asio's per-thread handler
  // cache would free them on the owner's thread and allocate anew each time, so they take
  // slots here (server_alloc.h; the heap only if all are busy).
  detail::HandlerArena arena;
  bool failed = false, read_shut = false, send_shut = false, closed = false;
  bool in_batch = false;
  boost::system::error_code fail_ec;

  std::uint32_t Free() const { return W - (snd_end - snd_una); }
  std::uint32_t RecvWindow() const { return W - (rcv_nxt - rcv_read); }
  void Post(IoCallback cb, boost::system::error_code ec, std::size_t n) {
    if (!cb) return;
    if (!owner) return;
    asio::post(*owner, detail::Bind(&arena, *owner,
                                    [self = shared_from_this(), cb = std::move(cb), ec, n]() mutable { cb(ec, n); }));
  }
};

// ---------------------------------------------------------------------------------------------
class EthEndpoint::Impl : public std::enable_shared_from_this<EthEndpoint::Impl> {
 public:
  struct ListenerState {
    std::mutex mu;
    Strand ex;
    Listener::AcceptCallback cb;
    std::deque<std::shared_ptr<EthSession>> backlog;
    bool open = true;
    explicit ListenerState(Strand e) : ex(std::move(e)) {}
  };

  explicit Impl(EthEndpointOptions o)
      : opt(std::move(o)),
        io(opt.io ? *opt.io : own_io),
        strand(asio::make_strand(io)),
        tick(strand),
        work(asio::make_work_guard(own_io)) {
    rng = opt.fault.seed;
  }

  EthEndpointOptions opt;
  asio::io_context own_io;  // idle when opt.io is given
  asio::io_context& io;     // what the strand runs on
  Strand strand;
  // Typed on the strand: a steady_timer (any_io_executor) would copy the strand to the heap on
  // every wait, a thousand times a second.
  asio::basic_waitable_timer<std::chrono::steady_clock, asio::wait_traits<std::chrono::steady_clock>, Strand> tick;
  detail::HandlerArena tick_arena;  // the tick's wait (the handler holds the endpoint, so the arena lives on)
  asio::executor_work_guard<asio::io_context::executor_type> work;
  std::thread thread;
  std::unique_ptr<EthLink> link;
  std::string if_mac;
  std::mutex tx_mu;  // the link's transmit side: from every session's thread
  bool tx_waiting = false;
  std::atomic<bool> closed{false};
  std::atomic<bool> shut{false};

  mutable std::mutex map_mu;
  std::map<std::pair<std::uint64_t, std::uint64_t>, std::shared_ptr<EthSession>> sessions;
  std::vector<std::shared_ptr<EthSession>> scan;   // tick's copy (capacity kept)
  std::vector<std::shared_ptr<EthSession>> touched;  // sessions that got frames in this batch
  std::shared_ptr<EthSession> cached;             // the last session looked up
  std::shared_ptr<ListenerState> listener;
  std::atomic<bool> tick_long{false};  // written on the strand; read by senders to skip a post
  Clock::time_point last_busy{};      // strand only

  std::uint64_t rng = 1;

  // Discovery: the responder (under map_mu) and the one query in flight (under disc_mu).
  EthEndpoint::DiscoveryResponder responder;
  std::mutex disc_mu;
  std::condition_variable disc_cv;
  std::uint64_t disc_id = 0;
  std::vector<EthDiscovered> disc_found;
  std::vector<std::uint8_t> stash, dup;  // fault hook: held-back and duplicated frames
  std::vector<std::uint8_t> trial_buf;   // a new session's first frame, opened with each key
  std::size_t stash_len = 0;

  std::atomic<std::uint64_t> sessions_opened{0}, retransmits{0}, timeouts{0}, duplicates{0}, out_of_order{0},
      malformed{0}, bad_tag{0}, replayed{0}, unknown_session{0}, dead_sessions{0}, f_drop{0}, f_dup{0},
      f_reorder{0};

  bool encrypted() const { return !opt.psks.empty(); }

  std::shared_ptr<EthSession> NewSession(const std::uint8_t* peer, std::uint64_t id) {
    auto s = std::make_shared<EthSession>();
    s->ep = this;
    s->ep_ref = shared_from_this();
    std::memcpy(s->peer, peer, kMacLen);
    s->id = id;
    s->peer_name = fmt::format("eth://{}/{}", opt.link.ifname, FormatMac(peer));
    s->W = opt.window;
    s->frag = std::uint32_t(link->max_fragment());
    s->tx_data.resize(std::size_t(s->W) * s->frag);
    s->tx.resize(s->W);
    s->rx_data.resize(std::size_t(s->W) * s->frag);
    s->rx_len.resize(s->W);
    s->rx_have.resize(s->W);
    s->ssthresh = s->W;
    s->peer_window = s->W;
    s->last_adv = s->W;
    s->rto = opt.rto_initial;
    s->last_heard = Clock::now();
    ++sessions_opened;
    return s;
  }

  void Register(const std::shared_ptr<EthSession>& s) {
    std::lock_guard<std::mutex> l(map_mu);
    sessions[{MacKey(s->peer), s->id}] = s;
  }
  void Unregister(EthSession* s) {
    std::lock_guard<std::mutex> l(map_mu);
    auto it = sessions.find({MacKey(s->peer), s->id});
    if (it != sessions.end() && it->second.get() == s) sessions.erase(it);
    if (cached.get() == s) cached.reset();
  }

  // ---- transmit (callers hold the session's mu) ----

  // Room in the link for one frame, flushing once when the queue is full.
  std::uint8_t* TxBuffer() {
    std::uint8_t* b = link->NextTxBuffer();
    if (!b) {
      boost::system::error_code ec;
      link->Flush(ec);
      b = link->NextTxBuffer();
    }
    return b;
  }

  bool Seal(EthSession& s, std::uint8_t* buf, std::size_t len) {
    if (!s.sealer) return true;
    if (s.sealer->Seal(buf, len)) return true;
    Fail(s, asio::error::make_error_code(asio::error::connection_aborted));  // counter used up
    return false;
  }

  // Sends fragment `seq` (first time or again).  REQUIRES: tx_mu held.
  bool TransmitLocked(EthSession& s, std::uint32_t seq, Clock::time_point now) {
    std::uint8_t* buf = TxBuffer();
    if (!buf) return false;
    EthSession::TxSlot& slot = s.tx[seq % s.W];
    EthHeader h = slot.h;
    h.flags = kEthFlagAck;
    h.ack = s.rcv_nxt;
    s.last_adv = s.RecvWindow();
    h.window = std::uint16_t(std::min<std::uint32_t>(s.last_adv, 0xffff));
    h.packet = s.sealer ? 0 : ++s.packet;
    EncodeEthHeaders(h, buf);
    std::memcpy(buf + kEthOverhead, s.tx_data.data() + std::size_t(seq % s.W) * s.frag, h.payload_len);
    const std::size_t len = kEthOverhead + h.payload_len;
    if (!Seal(s, buf, len)) return false;
    link->CommitTx(len);
    if (slot.ever_sent) {
      slot.resent = true;
      ++s.retransmits;
      ++retransmits;
    }
    slot.ever_sent = true;
    slot.sent = now;
    s.need_ack = false;  // the ack rode along
    return true;
  }

  // REQUIRES: tx_mu held.
  void SendAckLocked(EthSession& s) {
    std::uint8_t* buf = TxBuffer();
    if (!buf) return;  // the next data frame or batch carries it
    EthHeader h;
    std::memcpy(h.dst, s.peer, kMacLen);
    std::memcpy(h.src, link->mac(), kMacLen);
    h.type = EthType::kAck;
    h.flags = kEthFlagAck;
    h.session = s.id;
    h.ack = s.rcv_nxt;
    s.last_adv = s.RecvWindow();
    h.window = std::uint16_t(std::min<std::uint32_t>(s.last_adv, 0xffff));
    h.packet = s.sealer ? 0 : ++s.packet;
    h.payload_len = 0;
    EncodeEthHeaders(h, buf);
    if (!Seal(s, buf, kEthOverhead)) return;
    link->CommitTx(kEthOverhead);
    s.need_ack = false;
  }

  // Transmits what the windows allow, then a pure ACK if one is still owed.  REQUIRES: tx_mu held.
  void PumpLocked(EthSession& s, Clock::time_point now) {
    if (s.failed) return;
    while (s.snd_nxt != s.snd_end) {
      const std::uint32_t inflight = s.snd_nxt - s.snd_una;
      const std::uint32_t limit = std::max<std::uint32_t>(
          1, std::min<std::uint32_t>(std::uint32_t(s.cwnd), s.peer_window));
      if (inflight >= limit) break;
      if (!TransmitLocked(s, s.snd_nxt, now)) {
        WaitLinkWritable();
        break;
      }
      ++s.snd_nxt;
      if (SeqLt(s.snd_max, s.snd_nxt)) s.snd_max = s.snd_nxt;
    }
    if (s.need_ack) SendAckLocked(s);
  }

  void FlushLocked() {
    boost::system::error_code ec;
    while (link->tx_queued() > 0) {
      if (link->Flush(ec) == 0) break;
    }
    if (link->tx_queued() > 0) WaitLinkWritable();
  }

  // REQUIRES: tx_mu held.
  void WaitLinkWritable() {
    if (tx_waiting || closed) return;
    tx_waiting = true;
    auto self = shared_from_this();
    asio::post(strand, [self] {
      std::lock_guard<std::mutex> l(self->tx_mu);
      if (self->closed) return;
      self->link->AsyncWaitWritable([self](const boost::system::error_code& ec, std::size_t) {
        {
          std::lock_guard<std::mutex> l(self->tx_mu);
          self->tx_waiting = false;
          if (ec || self->closed) return;
        }
        self->PumpAll();
      });
    });
  }

  void PumpAll() {
    {
      std::lock_guard<std::mutex> l(map_mu);
      scan.clear();
      for (auto& [k, s] : sessions) scan.push_back(s);
    }
    const auto now = Clock::now();
    for (auto& s : scan) {
      std::lock_guard<std::mutex> l(s->mu);
      std::lock_guard<std::mutex> t(tx_mu);
      PumpLocked(*s, now);
    }
    {
      std::lock_guard<std::mutex> t(tx_mu);
      FlushLocked();
    }
    scan.clear();
  }

  // ---- session events (callers hold the session's mu) ----

  void Fail(EthSession& s, boost::system::error_code ec) {
    if (s.failed) return;
    s.failed = true;
    s.fail_ec = ec;
    if (s.rd_pending) {
      s.rd_pending = false;
      s.Post(std::move(s.rd_cb), ec, s.rd_done);
    }
    s.Post(std::move(s.wr_wait), ec, 0);
  }

  void TryCompleteRead(EthSession& s) {
    std::uint32_t freed = 0;
    if (s.rd_pending) {
      while (s.rd_done < s.rd_size && s.rcv_read != s.rcv_nxt) {
        const std::uint32_t idx = s.rcv_read % s.W;
        const std::size_t n = std::min<std::size_t>(s.rx_len[idx] - s.rx_off, s.rd_size - s.rd_done);
        std::memcpy(s.rd_ptr + s.rd_done, s.rx_data.data() + std::size_t(idx) * s.frag + s.rx_off, n);
        s.rd_done += n;
        s.rx_off += std::uint32_t(n);
        if (s.rx_off == s.rx_len[idx]) {
          s.rx_have[idx] = 0;
          s.rx_off = 0;
          ++s.rcv_read;
          ++freed;
        }
      }
      boost::system::error_code ec;
      bool done = s.rd_exact ? s.rd_done == s.rd_size : s.rd_done > 0;
      if (!done && s.failed) {
        ec = s.fail_ec;
        done = true;
      } else if (!done && (s.read_shut || s.closed)) {
        ec = asio::error::eof;
        done = true;
      }
      if (done) {
        s.rd_pending = false;
        s.Post(std::move(s.rd_cb), ec, s.rd_done);
      }
    }
    // Tell a sender we stopped when our window ran low that it opened again.
    if (freed && s.last_adv < s.W / 2 && s.RecvWindow() >= s.W / 2 && !s.failed) {
      std::lock_guard<std::mutex> t(tx_mu);
      SendAckLocked(s);
      FlushLocked();
    }
  }

  void NoteWritable(EthSession& s) {
    if (s.wr_wait && (s.Free() >= std::max<std::uint32_t>(1, s.want_slots))) s.Post(std::move(s.wr_wait), {}, 0);
  }

  void OnAck(EthSession& s, const EthHeader& h, Clock::time_point now) {
    const std::uint32_t adv = h.ack - s.snd_una;
    if (adv > s.snd_max - s.snd_una) return;  // acks what we never sent: stale (reordered) or bogus
    s.peer_window = h.window;
    if (adv == 0) {
      if (h.type == EthType::kAck && s.snd_max != s.snd_una && ++s.dupacks == 3) {
        // Fast retransmit: the receiver holds later fragments and waits for this one.
        s.ssthresh = std::max(2.0, s.cwnd / 2);
        s.cwnd = s.ssthresh;
        std::lock_guard<std::mutex> t(tx_mu);
        TransmitLocked(s, s.snd_una, now);
      }
      return;
    }
    const EthSession::TxSlot& last = s.tx[(h.ack - 1) % s.W];
    if (!last.resent) {
      const Clock::duration sample = now - last.sent;
      if (!s.have_rtt) {
        s.srtt = sample;
        s.rttvar = sample / 2;
        s.have_rtt = true;
      } else {
        const Clock::duration err = sample > s.srtt ? sample - s.srtt : s.srtt - sample;
        s.rttvar = (3 * s.rttvar + err) / 4;
        s.srtt = (7 * s.srtt + sample) / 8;
      }
    }
    for (std::uint32_t q = s.snd_una; q != h.ack; ++q) {
      EthSession::TxSlot& t = s.tx[q % s.W];
      t.ever_sent = t.resent = false;
    }
    s.snd_una = h.ack;
    if (SeqLt(s.snd_nxt, s.snd_una)) s.snd_nxt = s.snd_una;
    if (s.cwnd < s.ssthresh) s.cwnd += adv;
    else s.cwnd += double(adv) / s.cwnd;
    s.cwnd = std::min<double>(s.cwnd, s.W);
    s.dupacks = 0;
    if (s.have_rtt)
      s.rto = std::clamp<Clock::duration>(s.srtt + 4 * s.rttvar, opt.rto_min, opt.rto_max);
    NoteWritable(s);
  }

  void OnData(EthSession& s, const EthHeader& h, const std::uint8_t* p) {
    s.need_ack = true;
    if (SeqLt(h.seq, s.rcv_nxt)) {
      ++duplicates;
      return;
    }
    if (h.seq - s.rcv_read >= s.W) return;  // past our window: the sender will retry
    const std::uint32_t idx = h.seq % s.W;
    if (s.rx_have[idx]) {
      ++duplicates;
      return;
    }
    std::memcpy(s.rx_data.data() + std::size_t(idx) * s.frag, p, h.payload_len);
    s.rx_len[idx] = h.payload_len;
    s.rx_have[idx] = 1;
    if (h.seq != s.rcv_nxt) {
      // A gap: acknowledge at once, so the sender sees duplicate acks and re-sends the gap.
      ++out_of_order;
      std::lock_guard<std::mutex> t(tx_mu);
      SendAckLocked(s);
      return;
    }
    while (s.rcv_nxt - s.rcv_read < s.W && s.rx_have[s.rcv_nxt % s.W]) ++s.rcv_nxt;
  }

  // ---- receive (endpoint strand) ----

  // A responder session for a peer's first frame, with the identity whose keys open it.
  std::shared_ptr<EthSession> Accept(const EthHeader& h, std::uint8_t* frame, std::size_t len) {
    std::shared_ptr<ListenerState> ls;
    {
      std::lock_guard<std::mutex> l(map_mu);
      ls = listener;
    }
    if (!ls) {
      ++unknown_session;
      return nullptr;
    }
    // Find the key first: garbage never costs a session's buffers.
    std::string ident;
    std::optional<EthSessionKeys> keys;
    if (encrypted()) {
      if (!(h.flags & kEthFlagAead)) {
        ++malformed;
        return nullptr;
      }
      const std::string me = FormatMac(link->mac());
      for (const auto& [id, key] : opt.psks) {
        auto k = DeriveEthKeys(key, id, me, h.session);
        if (!k.ok()) continue;
        EthOpener trial(k.value().initiator_to_responder);
        trial_buf.assign(frame, frame + len);
        if (!trial.Open(trial_buf.data(), len)) continue;
        ident = id;
        keys = k.value();
        break;
      }
      if (!keys) {
        ++bad_tag;
        return nullptr;
      }
    } else if (h.flags & kEthFlagAead) {
      ++malformed;
      return nullptr;
    }
    auto s = NewSession(h.src, h.session);
    if (keys) {
      s->identity = ident;
      s->opener = std::make_unique<EthOpener>(keys->initiator_to_responder);
      s->sealer = std::make_unique<EthSealer>(keys->responder_to_initiator);
    }
    // Lock order: listener, then map (Shutdown and EthListener::Close never nest them).
    std::unique_lock<std::mutex> l(ls->mu);
    if (!ls->open || ls->backlog.size() >= 64) {
      ++unknown_session;
      return nullptr;
    }
    Register(s);
    if (ls->cb) {
      auto cb = std::move(ls->cb);
      ls->cb = nullptr;
      HandOver(*ls, s, std::move(cb));
    } else {
      ls->backlog.push_back(s);
    }
    return s;
  }

  // Gives an accepted session a transport on a fresh strand of the listener's io_context and
  // posts it to the accept callback.  REQUIRES: ls.mu held.
  static void HandOver(ListenerState& ls, const std::shared_ptr<EthSession>& s, Listener::AcceptCallback cb) {
    Strand st(ls.ex.get_inner_executor());
    {
      std::lock_guard<std::mutex> sl(s->mu);
      s->owner = st;
    }
    auto t = std::make_shared<std::unique_ptr<Transport>>(std::make_unique<EthTransport>(s, st));
    asio::post(ls.ex, [cb = std::move(cb), t] { cb({}, std::move(*t)); });
  }

  // The PSK entry this endpoint dials with.
  const std::pair<std::string, std::vector<std::uint8_t>>& OwnPsk() const {
    const auto* entry = &opt.psks.front();
    for (const auto& e : opt.psks)
      if (e.first == opt.identity) entry = &e;
    return *entry;
  }

  // Sends one discovery frame (DISCOVER or a reply), sealed with `key` when given.
  void SendDiscovery(EthType type, const std::uint8_t* to, std::uint64_t id, const std::string& text,
                     const EthKey* key) {
    std::lock_guard<std::mutex> t(tx_mu);
    if (closed) return;
    std::uint8_t* buf = TxBuffer();
    if (!buf) return;
    EthHeader h;
    std::memcpy(h.dst, to, kMacLen);
    std::memcpy(h.src, link->mac(), kMacLen);
    h.type = type;
    h.session = id;
    h.packet = key ? 0 : 1;
    const std::size_t n = std::min<std::size_t>(text.size(), link->max_fragment());
    const std::size_t len = EncodeEthFrame(h, text.data(), n, buf, link->max_frame());
    if (key) {
      EthSealer sealer(*key);
      if (!sealer.Seal(buf, len)) return;
    }
    link->CommitTx(len);
    FlushLocked();
  }

  // A DISCOVER from a peer: answer with the responder's listing for the identity that sealed it.
  void OnDiscover(const EthHeader& h, std::uint8_t* frame, std::size_t len) {
    EthEndpoint::DiscoveryResponder r;
    {
      std::lock_guard<std::mutex> l(map_mu);
      r = responder;
    }
    if (!r) return;
    // The responder answers when it has the listing, from any thread: the reply is sent then.
    auto answer = [this, &h](std::optional<EthKey> key) -> EthEndpoint::DiscoveryAnswer {
      std::array<std::uint8_t, kMacLen> to{};
      std::memcpy(to.data(), h.src, kMacLen);
      return [w = weak_from_this(), to, id = h.session, key](const std::string& listing) {
        if (auto self = w.lock())
          self->SendDiscovery(EthType::kDiscoverReply, to.data(), id, listing, key ? &*key : nullptr);
      };
    };
    static const std::uint8_t kBroadcast[kMacLen] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    if (!encrypted()) {
      if (h.flags & kEthFlagAead) return void(++malformed);
      r("", answer(std::nullopt));
      return;
    }
    if (!(h.flags & kEthFlagAead)) return void(++malformed);
    for (const auto& [id, key] : opt.psks) {
      auto q = DeriveEthKeys(key, id, FormatMac(kBroadcast), h.session);
      if (!q.ok()) continue;
      EthOpener opener(q.value().initiator_to_responder);
      trial_buf.assign(frame, frame + len);
      if (!opener.Open(trial_buf.data(), len)) continue;
      // The reply is bound to our own MAC: the asker derives the key from the address it came from.
      auto a = DeriveEthKeys(key, id, FormatMac(link->mac()), h.session);
      if (!a.ok()) return;
      r(id, answer(a.value().responder_to_initiator));
      return;
    }
    ++bad_tag;
  }

  void OnDiscoverReply(const EthHeader& h, std::uint8_t* frame, std::size_t len, const std::uint8_t* payload) {
    std::lock_guard<std::mutex> l(disc_mu);
    if (disc_id == 0 || h.session != disc_id) return void(++unknown_session);
    if (encrypted()) {
      if (!(h.flags & kEthFlagAead)) return void(++malformed);
      const auto& own = OwnPsk();
      auto k = DeriveEthKeys(own.second, own.first, FormatMac(h.src), h.session);
      if (!k.ok()) return;
      EthOpener opener(k.value().responder_to_initiator);
      if (!opener.Open(frame, len)) return void(++bad_tag);
    } else if (h.flags & kEthFlagAead) {
      return void(++malformed);
    }
    const std::string mac = FormatMac(h.src);
    for (const auto& f : disc_found)
      if (f.mac == mac) return;  // a duplicate
    disc_found.push_back({mac, std::string(reinterpret_cast<const char*>(payload), h.payload_len)});
    disc_cv.notify_all();
  }

  void Handle(const EthHeader& h, const std::uint8_t* payload, Clock::time_point now) {
    std::uint8_t* frame = const_cast<std::uint8_t*>(payload) - kEthOverhead;
    const std::size_t len = kEthOverhead + h.payload_len;
    if (h.type == EthType::kDiscover) return OnDiscover(h, frame, len);
    if (h.type == EthType::kDiscoverReply) return OnDiscoverReply(h, frame, len, payload);
    std::shared_ptr<EthSession> s;
    const std::pair<std::uint64_t, std::uint64_t> key{MacKey(h.src), h.session};
    if (cached && cached->id == h.session && MacKey(cached->peer) == key.first) {
      s = cached;
    } else {
      std::lock_guard<std::mutex> l(map_mu);
      auto it = sessions.find(key);
      if (it != sessions.end()) s = it->second;
    }
    if (!s) {
      if (h.type != EthType::kData || h.seq != 0) {
        ++unknown_session;
        return;
      }
      s = Accept(h, frame, len);
      if (!s) return;
    }
    cached = s;
    std::lock_guard<std::mutex> l(s->mu);
    if (s->failed) return;
    if (s->opener) {
      if (!(h.flags & kEthFlagAead)) {
        ++malformed;
        return;
      }
      const EthAeadCounters before = s->opener->counters();
      if (!s->opener->Open(frame, len)) {
        const EthAeadCounters& c = s->opener->counters();
        bad_tag += c.bad_tag - before.bad_tag;
        replayed += c.replayed - before.replayed;
        malformed += c.malformed - before.malformed;
        return;
      }
    } else if (h.flags & kEthFlagAead) {
      ++malformed;
      return;
    }
    s->last_heard = now;
    if (h.flags & kEthFlagAck) OnAck(*s, h, now);
    if (h.type == EthType::kData) OnData(*s, h, payload);
    if (!s->in_batch) {
      s->in_batch = true;
      touched.push_back(s);
    }
  }

  // Handles a frame the fault hook held in one of its own buffers (decoded again from there).
  void HandleHeld(std::vector<std::uint8_t>& buf, std::size_t len, Clock::time_point now) {
    EthHeader h;
    const std::uint8_t* p = nullptr;
    if (DecodeEthFrame(buf.data(), len, link->max_fragment(), &h, &p) == EthDecodeError::kOk) Handle(h, p, now);
  }

  void Fault(const EthHeader& h, const std::uint8_t* payload, Clock::time_point now) {
    const std::uint8_t* frame = payload - kEthOverhead;
    const std::size_t len = kEthOverhead + h.payload_len;
    const EthFaultOptions& f = opt.fault;
    if (Chance(&rng, f.drop)) {
      ++f_drop;
      return;
    }
    if (stash_len == 0 && Chance(&rng, f.reorder)) {
      ++f_reorder;
      std::memcpy(stash.data(), frame, len);
      stash_len = len;
      return;
    }
    const bool twice = Chance(&rng, f.duplicate);
    if (twice) {
      ++f_dup;
      dup.assign(frame, frame + len);
    }
    Handle(h, payload, now);
    if (twice) HandleHeld(dup, len, now);
    FlushStash(now);
  }
  void FlushStash(Clock::time_point now) {
    if (stash_len == 0) return;
    const std::size_t n = stash_len;
    stash_len = 0;
    HandleHeld(stash, n, now);
  }

  void OnReadable() {
    if (closed) return;
    const auto now = Clock::now();
    const bool faults = opt.fault.drop > 0 || opt.fault.duplicate > 0 || opt.fault.reorder > 0;
    EthHeader h;
    const std::uint8_t* payload = nullptr;
    while (link->NextRx(&h, &payload)) {
      if (faults) Fault(h, payload, now);
      else Handle(h, payload, now);
    }
    FlushStash(now);
    bool pending = false;
    for (auto& s : touched) {
      std::lock_guard<std::mutex> l(s->mu);
      s->in_batch = false;
      TryCompleteRead(*s);
      NoteWritable(*s);
      std::lock_guard<std::mutex> t(tx_mu);
      PumpLocked(*s, now);
      pending = pending || s->need_ack || s->snd_una != s->snd_end;
    }
    touched.clear();
    if (pending) TickSoon();
    {
      std::lock_guard<std::mutex> t(tx_mu);
      FlushLocked();
    }
    link->AsyncWaitReadable([self = shared_from_this()](const boost::system::error_code& ec, std::size_t) {
      if (!ec) self->OnReadable();
    });
  }

  // Retransmit timers, dead peers, sessions closed and drained.
  void OnTick() {
    if (closed) return;
    const auto now = Clock::now();
    {
      std::lock_guard<std::mutex> l(map_mu);
      scan.clear();
      for (auto& [k, s] : sessions) scan.push_back(s);
    }
    bool busy = false;
    for (auto& sp : scan) {
      EthSession& s = *sp;
      std::unique_lock<std::mutex> l(s.mu);
      const bool outstanding = s.snd_una != s.snd_end;
      if (!s.failed && outstanding && now - s.last_heard > opt.dead_time) {
        ++dead_sessions;
        Fail(s, asio::error::make_error_code(asio::error::timed_out));
      }
      if (s.closed && (!outstanding || s.failed)) {
        l.unlock();
        Unregister(&s);
        continue;
      }
      if (s.failed) continue;
      if (!outstanding) {
        if (s.need_ack) {
          busy = true;
          std::lock_guard<std::mutex> t(tx_mu);
          SendAckLocked(s);
        }
        continue;
      }
      busy = true;
      if (s.snd_max != s.snd_una && now - s.tx[s.snd_una % s.W].sent > s.rto) {
        // Timeout: go back to the oldest unacknowledged fragment.
        ++timeouts;
        s.snd_nxt = s.snd_una;
        s.ssthresh = std::max(2.0, s.cwnd / 2);
        s.cwnd = std::max(1.0, s.cwnd / 2);
        s.rto = std::min<Clock::duration>(s.rto * 2, opt.rto_max);
        s.dupacks = 0;
      }
      std::lock_guard<std::mutex> t(tx_mu);
      PumpLocked(s, now);
    }
    scan.clear();
    {
      std::lock_guard<std::mutex> t(tx_mu);
      FlushLocked();
    }
    // Stay on the short tick for a second after the last busy one: request/reply traffic
    // empties the windows between batches, and every switch back would cost the sender a post.
    if (busy) last_busy = now;
    ArmTick(busy || now - last_busy < std::chrono::seconds(1));
  }

  // The tick runs every ShortTick() while a session has data outstanding or an ack pending,
  // else every 20 ms; TickSoon() (strand) cuts a long wait short when that changes.
  std::chrono::milliseconds ShortTick() const {
    return std::max<std::chrono::milliseconds>(std::chrono::milliseconds(1), opt.rto_min / 2);
  }
  void ArmTick(bool busy) {
    tick_long = !busy;
    tick.expires_after(busy ? ShortTick() : std::chrono::milliseconds(20));
    tick.async_wait(detail::Bind(&tick_arena, strand, [self = shared_from_this()](const boost::system::error_code& ec) {
      if (!ec) self->OnTick();
    }));
  }
  void TickSoon() {
    if (tick_long && !closed) ArmTick(true);  // expires_after cancels the long wait
  }

  void Start() {
    stash.resize(link->max_frame());
    dup.reserve(link->max_frame());
    touched.reserve(256);
    scan.reserve(64);
    asio::post(strand, [self = shared_from_this()] {
      self->OnTick();
      self->OnReadable();
    });
    if (!opt.io) thread = std::thread([this] { own_io.run(); });
  }

  // The last step of Shutdown, on the strand: nothing of the link is touched after it.
  void CloseOnStrand() {
    {
      std::lock_guard<std::mutex> t(tx_mu);
      closed = true;
    }
    cached.reset();
    touched.clear();
    tick.cancel();
    link->Close();
    work.reset();
  }

  void Shutdown() {
    if (shut.exchange(true)) return;
    std::vector<std::shared_ptr<EthSession>> all;
    std::shared_ptr<ListenerState> ls;
    {
      std::lock_guard<std::mutex> l(map_mu);
      for (auto& [k, s] : sessions) all.push_back(s);
      sessions.clear();
      ls = std::move(listener);
      listener.reset();
    }
    if (ls) {
      std::lock_guard<std::mutex> ll(ls->mu);
      ls->open = false;
      if (ls->cb) asio::post(ls->ex, [cb = std::move(ls->cb)] { cb(asio::error::operation_aborted, nullptr); });
      ls->cb = nullptr;
      ls->backlog.clear();
    }
    for (auto& s : all) {
      std::lock_guard<std::mutex> l(s->mu);
      Fail(*s, asio::error::make_error_code(asio::error::shut_down));
    }
    all.clear();
    if (opt.io) {
      // A given io_context: inline on the strand; else posted, and waited for unless this is one
      // of the io_context's own threads (which would then never run it).
      if (strand.running_in_this_thread()) return CloseOnStrand();
      auto done = std::make_shared<std::promise<void>>();
      std::future<void> f = done->get_future();
      asio::post(strand, [self = shared_from_this(), done] {
        self->CloseOnStrand();
        done->set_value();
      });
      // Bounded: if the io_context is stopped meanwhile the step never runs (the link then
      // closes when the endpoint goes), and Close must not hang on it.
      if (!io.get_executor().running_in_this_thread() && !io.stopped())
        f.wait_for(std::chrono::seconds(5));
      return;
    }
    if (thread.joinable()) {
      asio::post(strand, [this] { CloseOnStrand(); });
      if (thread.get_id() == std::this_thread::get_id()) thread.detach();
      else thread.join();
    }
    // Sessions still referenced by transports keep ep_ref; drop the back references so the
    // endpoint can go once they do.
  }
};

// ---------------------------------------------------------------------------------------------
EthTransport::EthTransport(std::shared_ptr<EthSession> s, Strand strand)
    : s_(std::move(s)), strand_(std::move(strand)), peer_(s_->peer_name) {}

EthTransport::~EthTransport() {
  if (s_) Close();
}

std::size_t EthTransport::SendFrames(const TxFrame* head, std::size_t offset, const SendLimits& lim,
                                     boost::system::error_code& ec) {
  EthSession& s = *s_;
  std::lock_guard<std::mutex> l(s.mu);
  ec = {};
  if (s.failed) {
    ec = s.fail_ec;
    return 0;
  }
  if (s.send_shut || s.closed) {
    ec = asio::error::shut_down;
    return 0;
  }
  auto* ep = s.ep;
  const auto now = Clock::now();
  std::size_t taken = 0;
  int frames = 0;
  // Whole DST frames handed over in one call are coalesced into one message (§12.7): small frames
  // (read requests, write replies) share fragments instead of taking one each, which halves the
  // frames on the wire at 4 KiB QD32.  The receiver only ever sees a byte stream, so where the
  // message boundaries fall is the sender's choice.
  const TxFrame* f = head;
  std::size_t skip = offset;  // a datagram transport takes whole frames only: the Transmitter never has an offset
  while (f && frames < lim.max_frames && taken < lim.max_bytes) {
    // Gather frames while the message still fits the free window and the §12.3 message limit.
    const std::uint32_t room = s.Free();
    std::size_t total = 0;
    const TxFrame* last = f;
    int group = 0;
    const bool coalesce = ep->opt.coalesce;
    for (const TxFrame* g = f; g && frames + group < lim.max_frames && taken + total < lim.max_bytes &&
                               (coalesce || group == 0);
         g = g->next) {
      const std::size_t len = std::size_t(g->header_len) + g->payload_len - (g == f ? skip : 0);
      const std::size_t sum = total + len;
      if (sum > kEthMaxMessage || EthFragmentCount(std::uint32_t(sum), s.frag) > room) {
        if (group == 0) {
          if (len > kEthMaxMessage || EthFragmentCount(std::uint32_t(len), s.frag) > s.W) {
            ec = asio::error::message_size;
          } else {
            s.want_slots = EthFragmentCount(std::uint32_t(len), s.frag);
          }
        }
        break;
      }
      total = sum;
      last = g;
      ++group;
    }
    if (group == 0) break;
    if (total == 0) {  // only empty frames
      f = last->next;
      frames += group;
      skip = 0;
      continue;
    }
    const std::uint32_t nfrag = EthFragmentCount(std::uint32_t(total), s.frag);
    if (s.snd_una == s.snd_end) {
      s.last_heard = now;  // the dead-peer clock starts with outstanding data
      // and the retransmit timer with it: make sure the tick runs often
      if (ep->tick_long.load(std::memory_order_relaxed))
        asio::post(ep->strand, [ep = s.ep_ref] { ep->TickSoon(); });
    }
    // Cursor over the group's bytes: frame `cf`, byte `cat` of its header + payload.
    const TxFrame* cf = f;
    std::size_t cat = skip;
    std::size_t pos = 0;
    for (std::uint32_t i = 0; i < nfrag; ++i) {
      const std::uint32_t seq = s.snd_end++;
      EthSession::TxSlot& slot = s.tx[seq % s.W];
      std::uint8_t* dst = s.tx_data.data() + std::size_t(seq % s.W) * s.frag;
      const std::size_t n = std::min<std::size_t>(s.frag, total - pos);
      for (std::size_t k = 0; k < n;) {
        const std::size_t flen = std::size_t(cf->header_len) + cf->payload_len;
        if (cat == flen) {  // this frame is done (or empty): on to the next one of the group
          cf = cf->next;
          cat = 0;
          continue;
        }
        std::size_t c;
        if (cat < cf->header_len) {
          c = std::min<std::size_t>(n - k, cf->header_len - cat);
          std::memcpy(dst + k, cf->header + cat, c);
        } else {
          c = std::min<std::size_t>(n - k, flen - cat);
          std::memcpy(dst + k, cf->payload + (cat - cf->header_len), c);
        }
        k += c;
        cat += c;
      }
      EthHeader& h = slot.h;
      h = EthHeader{};
      std::memcpy(h.dst, s.peer, kMacLen);
      std::memcpy(h.src, ep->link->mac(), kMacLen);
      h.type = EthType::kData;
      h.session = s.id;
      h.seq = seq;
      h.msg_len = std::uint32_t(total);
      h.frag_offset = std::uint32_t(pos);
      h.frag_index = std::uint16_t(i);
      h.frag_count = std::uint16_t(nfrag);
      h.payload_len = std::uint16_t(n);
      slot.ever_sent = slot.resent = false;
      pos += n;
    }
    taken += total;
    frames += group;
    f = last->next;
    skip = 0;
    if (ec) break;
  }
  if (taken == 0 && !ec) {
    ec = asio::error::would_block;
    return 0;
  }
  s.want_slots = 0;
  std::lock_guard<std::mutex> t(ep->tx_mu);
  ep->PumpLocked(s, now);
  ep->FlushLocked();
  return taken;
}

void EthTransport::AsyncWaitWritable(IoCallback done) {
  EthSession& s = *s_;
  std::lock_guard<std::mutex> l(s.mu);
  if (s.failed || s.send_shut || s.closed) {
    s.Post(std::move(done), s.failed ? s.fail_ec : asio::error::make_error_code(asio::error::shut_down), 0);
    return;
  }
  if (s.Free() >= std::max<std::uint32_t>(1, s.want_slots)) {
    s.Post(std::move(done), {}, 0);
    return;
  }
  s.wr_wait = std::move(done);
}

// One read at a time (the Transport contract); it completes from whatever has arrived in order.
void EthTransport::StartRead(boost::asio::mutable_buffer buf, IoCallback done, bool exact) {
  EthSession& s = *s_;
  std::lock_guard<std::mutex> l(s.mu);
  if (buf.size() == 0) {
    s.Post(std::move(done), {}, 0);
    return;
  }
  s.rd_pending = true;
  s.rd_exact = exact;
  s.rd_ptr = static_cast<std::uint8_t*>(buf.data());
  s.rd_size = buf.size();
  s.rd_done = 0;
  s.rd_cb = std::move(done);
  s.ep->TryCompleteRead(s);
}

void EthTransport::AsyncReadSome(boost::asio::mutable_buffer buf, IoCallback done) {
  StartRead(buf, std::move(done), false);
}

void EthTransport::AsyncRead(boost::asio::mutable_buffer buf, IoCallback done) {
  StartRead(buf, std::move(done), true);
}

void EthTransport::AsyncWrite(boost::asio::const_buffer buf, IoCallback done) {
  TxFrame f;
  f.header_len = 0;
  f.payload = static_cast<const char*>(buf.data());
  f.payload_len = std::uint32_t(buf.size());
  boost::system::error_code ec;
  std::size_t n = buf.size() ? SendFrames(&f, 0, SendLimits{}, ec) : 0;
  if (!ec && n < buf.size()) ec = asio::error::no_buffer_space;
  std::lock_guard<std::mutex> l(s_->mu);
  s_->Post(std::move(done), ec, n);
}

void EthTransport::Shutdown(ShutdownHow how) {
  EthSession& s = *s_;
  std::lock_guard<std::mutex> l(s.mu);
  s.read_shut = true;
  if (how == ShutdownHow::kBoth) {
    s.send_shut = true;
    s.Post(std::move(s.wr_wait), asio::error::make_error_code(asio::error::shut_down), 0);
  }
  s.ep->TryCompleteRead(s);
}

void EthTransport::Close() {
  EthSession& s = *s_;
  std::lock_guard<std::mutex> l(s.mu);
  if (s.closed) return;
  s.closed = true;
  if (s.rd_pending) {
    s.rd_pending = false;
    s.Post(std::move(s.rd_cb), asio::error::operation_aborted, s.rd_done);
  }
  s.Post(std::move(s.wr_wait), asio::error::operation_aborted, 0);
  // The endpoint's tick unregisters the session once what we sent is acknowledged (so the peer
  // still reads our last bytes) or the peer is dead.
}

bool EthTransport::is_open() const {
  std::lock_guard<std::mutex> l(s_->mu);
  return !s_->closed;
}

const std::string& EthTransport::identity() const { return s_->identity; }

std::uint64_t EthTransport::retransmits() const {
  std::lock_guard<std::mutex> l(s_->mu);
  return s_->retransmits;
}
std::uint32_t EthTransport::cwnd() const {
  std::lock_guard<std::mutex> l(s_->mu);
  return std::uint32_t(s_->cwnd);
}

// ---------------------------------------------------------------------------------------------
namespace {

class EthConnector final : public Connector {
 public:
  EthConnector(Strand strand, std::shared_ptr<EthEndpoint::Impl> ep, std::array<std::uint8_t, 6> mac)
      : strand_(std::move(strand)), ep_(std::move(ep)), mac_(mac) {}
  ~EthConnector() override { Cancel(); }

  void AsyncConnect(std::chrono::milliseconds, ConnectCallback done) override;
  void Cancel() override {
    if (token_) *token_ = true;
    token_.reset();
  }
  std::string target() const override { return fmt::format("eth://{}/{}", ep_->opt.link.ifname, FormatMac(mac_.data())); }

 private:
  Strand strand_;
  std::shared_ptr<EthEndpoint::Impl> ep_;
  std::array<std::uint8_t, 6> mac_;
  std::shared_ptr<bool> token_;
};

class EthListener final : public Listener {
 public:
  EthListener(std::shared_ptr<EthEndpoint::Impl> ep, std::shared_ptr<EthEndpoint::Impl::ListenerState> st)
      : ep_(std::move(ep)), st_(std::move(st)) {}
  ~EthListener() override { Close(); }
  void AsyncAccept(AcceptCallback done) override {
    std::lock_guard<std::mutex> l(st_->mu);
    if (!st_->open) {
      asio::post(st_->ex, [done = std::move(done)] { done(asio::error::operation_aborted, nullptr); });
      return;
    }
    if (!st_->backlog.empty()) {
      auto s = st_->backlog.front();
      st_->backlog.pop_front();
      EthEndpoint::Impl::HandOver(*st_, s, std::move(done));
      return;
    }
    st_->cb = std::move(done);
  }
  void Close() override {
    {
      std::lock_guard<std::mutex> l(st_->mu);
      if (!st_->open) return;
      st_->open = false;
      if (st_->cb) asio::post(st_->ex, [cb = std::move(st_->cb)] { cb(asio::error::operation_aborted, nullptr); });
      st_->cb = nullptr;
      // Sessions nobody accepted: closed, so the tick drops them (they would linger otherwise).
      for (auto& s : st_->backlog) {
        std::lock_guard<std::mutex> sl(s->mu);
        s->closed = true;
      }
      st_->backlog.clear();
    }
    std::lock_guard<std::mutex> l(ep_->map_mu);
    if (ep_->listener == st_) ep_->listener.reset();
  }
  std::string local_name() const override {
    return fmt::format("eth://{}/{}", ep_->opt.link.ifname, ep_->if_mac);
  }

 private:
  std::shared_ptr<EthEndpoint::Impl> ep_;
  std::shared_ptr<EthEndpoint::Impl::ListenerState> st_;
};

void EthConnector::AsyncConnect(std::chrono::milliseconds, ConnectCallback done) {
  Cancel();
  token_ = std::make_shared<bool>(false);
  auto token = token_;
  if (ep_->closed) {
    asio::post(strand_, [done = std::move(done), token, t = target()] {
      if (!*token) done(Status::Unavailable(t + ": the Ethernet endpoint is closed"), nullptr);
    });
    return;
  }
  auto s = ep_->NewSession(mac_.data(), RandomSession());
  if (ep_->encrypted()) {
    const auto* entry = &ep_->OwnPsk();
    auto keys = DeriveEthKeys(entry->second, entry->first, FormatMac(mac_.data()), s->id);
    if (!keys.ok()) {
      Status st = keys.status();
      asio::post(strand_, [done = std::move(done), token, st] {
        if (!*token) done(st, nullptr);
      });
      return;
    }
    s->identity = entry->first;
    s->sealer = std::make_unique<EthSealer>(keys.value().initiator_to_responder);
    s->opener = std::make_unique<EthOpener>(keys.value().responder_to_initiator);
  }
  s->owner = strand_;
  ep_->Register(s);
  auto t = std::make_shared<std::unique_ptr<Transport>>(std::make_unique<EthTransport>(s, strand_));
  asio::post(strand_, [done = std::move(done), token, t] {
    if (!*token) done(Status::OK(), std::move(*t));
  });
}

// Several listeners behind one: an accept is kept pending on each; results queue up.
class MultiListener final : public Listener, public std::enable_shared_from_this<MultiListener> {
 public:
  struct State {
    std::mutex mu;
    std::vector<std::unique_ptr<Listener>> inner;
    std::deque<std::pair<boost::system::error_code, std::unique_ptr<Transport>>> ready;
    AcceptCallback cb;
    bool closed = false;
    Strand ex;
    explicit State(Strand e) : ex(std::move(e)) {}
  };
  MultiListener(std::vector<std::unique_ptr<Listener>> inner, const Strand& ex) : st_(std::make_shared<State>(ex)) {
    st_->inner = std::move(inner);
    for (std::size_t i = 0; i < st_->inner.size(); ++i) Arm(st_, i);
  }
  ~MultiListener() override { Close(); }

  static void Arm(const std::shared_ptr<State>& st, std::size_t i) {
    std::weak_ptr<State> w = st;
    st->inner[i]->AsyncAccept([w, i](const boost::system::error_code& ec, std::unique_ptr<Transport> t) {
      auto st = w.lock();
      if (!st) return;
      AcceptCallback cb;
      {
        std::lock_guard<std::mutex> l(st->mu);
        if (st->closed) return;
        if (ec == asio::error::operation_aborted) return;  // that listener closed
        if (st->cb) {
          cb = std::move(st->cb);
          st->cb = nullptr;
        } else {
          st->ready.emplace_back(ec, std::move(t));
        }
      }
      if (cb) cb(ec, std::move(t));
      Arm(st, i);
    });
  }

  void AsyncAccept(AcceptCallback done) override {
    std::lock_guard<std::mutex> l(st_->mu);
    if (st_->closed) {
      asio::post(st_->ex, [done = std::move(done)] { done(asio::error::operation_aborted, nullptr); });
      return;
    }
    if (!st_->ready.empty()) {
      auto r = std::make_shared<std::pair<boost::system::error_code, std::unique_ptr<Transport>>>(
          std::move(st_->ready.front()));
      st_->ready.pop_front();
      asio::post(st_->ex, [done = std::move(done), r] { done(r->first, std::move(r->second)); });
      return;
    }
    st_->cb = std::move(done);
  }
  void Close() override {
    std::vector<std::unique_ptr<Listener>> inner;
    {
      std::lock_guard<std::mutex> l(st_->mu);
      if (st_->closed) return;
      st_->closed = true;
      if (st_->cb) asio::post(st_->ex, [cb = std::move(st_->cb)] { cb(asio::error::operation_aborted, nullptr); });
      st_->cb = nullptr;
      st_->ready.clear();
    }
    for (auto& i : st_->inner) i->Close();
  }
  std::string local_name() const override {
    std::string n;
    for (const auto& i : st_->inner) n += (n.empty() ? "" : ", ") + i->local_name();
    return n;
  }

 private:
  std::shared_ptr<State> st_;
};

}  // namespace

std::unique_ptr<Listener> MakeMultiListener(std::vector<std::unique_ptr<Listener>> inner, const Strand& ex) {
  return std::make_unique<MultiListener>(std::move(inner), ex);
}

// ---------------------------------------------------------------------------------------------
EthEndpoint::EthEndpoint(EthEndpointOptions opt) : opt_(std::move(opt)) {}

EthEndpoint::~EthEndpoint() { Close(); }

Result<std::shared_ptr<EthEndpoint>> EthEndpoint::Open(EthEndpointOptions opt) {
  if (opt.psks.empty() && !opt.insecure_segment)
    return Status::InvalidArgument(fmt::format(
        "eth {}: no keys for the segment; set a PSK file (tls_psk_file) or insecure_segment = true", opt.link.ifname));
  for (const auto& [id, key] : opt.psks)
    if (key.size() < 16) return Status::InvalidArgument(fmt::format("eth: the key of \"{}\" is shorter than 16 bytes", id));
  if (opt.window < 16 || opt.window > 32768) return Status::InvalidArgument("eth: window must be 16..32768 fragments");
  // Receive: recvmmsg unless the ring is asked for.  A TPACKET_V3 block is handed over when full
  // or after its 1 ms retire timer, a latency floor every request/reply exchange pays twice
  // (eth_io_bench: about half the 4 KiB QD32 IOPS of recvmmsg).
  if (opt.link.rx == EthLinkOptions::Rx::kAuto) opt.link.rx = EthLinkOptions::Rx::kRecvmmsg;
  auto ep = std::make_shared<EthEndpoint>(opt);
  ep->impl_ = std::make_shared<Impl>(opt);
  auto link = EthLink::Open(ep->impl_->strand, opt.link);
  if (!link.ok()) return link.status();
  ep->impl_->link = std::move(link).value();
  ep->impl_->if_mac = FormatMac(ep->impl_->link->mac());
  // One frame's fragments must fit the window: the largest DST message at this MTU.
  ep->impl_->Start();
  return ep;
}

void EthEndpoint::Close() {
  if (impl_) impl_->Shutdown();
}

const std::uint8_t* EthEndpoint::mac() const { return impl_->link->mac(); }

std::unique_ptr<Connector> EthEndpoint::MakeConnector(const Strand& strand, const std::array<std::uint8_t, 6>& peer_mac) {
  return std::make_unique<EthConnector>(strand, impl_, peer_mac);
}

std::unique_ptr<Listener> EthEndpoint::MakeListener(const Strand& ex) {
  auto st = std::make_shared<Impl::ListenerState>(ex);
  {
    std::lock_guard<std::mutex> l(impl_->map_mu);
    impl_->listener = st;
  }
  return std::make_unique<EthListener>(impl_, st);
}

void EthEndpoint::SetDiscoveryResponder(DiscoveryResponder r) {
  std::lock_guard<std::mutex> l(impl_->map_mu);
  impl_->responder = std::move(r);
}

Result<std::vector<EthDiscovered>> EthEndpoint::Discover(std::chrono::milliseconds wait) {
  Impl& i = *impl_;
  if (i.closed) return Status::Unavailable(fmt::format("eth {}: the endpoint is closed", opt_.link.ifname));
  if (opt_.io && opt_.io->get_executor().running_in_this_thread())
    return Status::NotSupported(fmt::format(
        "eth {}: discovery blocks, and this thread runs the endpoint that would receive the answers",
        opt_.link.ifname));
  const std::uint64_t id = RandomSession();
  {
    std::lock_guard<std::mutex> l(i.disc_mu);
    if (i.disc_id != 0) return Status::Busy(fmt::format("eth {}: a discovery is already running", opt_.link.ifname));
    i.disc_id = id;
    i.disc_found.clear();
  }
  static const std::uint8_t kBroadcast[kMacLen] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
  if (i.encrypted()) {
    const auto& own = i.OwnPsk();
    auto k = DeriveEthKeys(own.second, own.first, FormatMac(kBroadcast), id);
    if (!k.ok()) {
      std::lock_guard<std::mutex> l(i.disc_mu);
      i.disc_id = 0;
      return k.status();
    }
    i.SendDiscovery(EthType::kDiscover, kBroadcast, id, std::string(), &k.value().initiator_to_responder);
  } else {
    i.SendDiscovery(EthType::kDiscover, kBroadcast, id, std::string(), nullptr);
  }
  std::unique_lock<std::mutex> l(i.disc_mu);
  i.disc_cv.wait_for(l, wait, [] { return false; });
  std::vector<EthDiscovered> found = std::move(i.disc_found);
  i.disc_found.clear();
  i.disc_id = 0;
  std::sort(found.begin(), found.end(), [](const EthDiscovered& a, const EthDiscovered& b) { return a.mac < b.mac; });
  return found;
}

EthEndpointStats EthEndpoint::Stats() const {
  EthEndpointStats s;
  const Impl& i = *impl_;
  s.ifname = opt_.link.ifname;
  s.mac = i.if_mac;
  s.mtu = i.link->mtu();
  s.tx_mode = EthLink::TxModeName(i.link->tx_mode());
  s.rx_mode = EthLink::RxModeName(i.link->rx_mode());
  s.encrypted = !opt_.psks.empty();
  s.insecure_segment = opt_.psks.empty();
  {
    std::lock_guard<std::mutex> l(i.map_mu);
    s.sessions = i.sessions.size();
  }
  const EthLinkStats& ls = i.link->stats();
  s.frames_sent = ls.tx.frames.load();
  s.send_calls = ls.tx.syscalls.load();
  s.frames_per_send_call = s.send_calls ? double(s.frames_sent) / double(s.send_calls) : 0;
  s.tx_ring_occupancy = ls.tx_ring_occupancy.load();
  s.tx_ring_peak = ls.tx_ring_peak.load();
  s.frames_received = ls.rx_frames.load();
  s.receive_calls = ls.rx_calls.load();
  s.frames_per_receive_call = ls.FramesPerRxCall();
  s.sessions_opened = i.sessions_opened.load();
  s.retransmits = i.retransmits.load();
  s.timeouts = i.timeouts.load();
  s.duplicates = i.duplicates.load();
  s.out_of_order = i.out_of_order.load();
  s.malformed = i.malformed.load() + ls.rx_malformed.load();
  s.bad_tag = i.bad_tag.load();
  s.replayed = i.replayed.load();
  s.unknown_session = i.unknown_session.load();
  s.dead_sessions = i.dead_sessions.load();
  s.fault_dropped = i.f_drop.load();
  s.fault_duplicated = i.f_dup.load();
  s.fault_reordered = i.f_reorder.load();
  return s;
}

}  // namespace dst::net
