// EthLink: batched AF_PACKET I/O (eth_link.h, docs/protocol.md §12).
#include "dst/net/eth_link.h"
#include "server_alloc.h"

#include <arpa/inet.h>
#include <linux/if_arp.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

namespace dst::net {

namespace {

// TPACKET_V2 transmit: the frame starts this far into its slot (the kernel's tp_hdrlen minus the
// sockaddr_ll it only uses on receive).
constexpr std::size_t kTxDataOffset = TPACKET_ALIGN(sizeof(tpacket2_hdr));
constexpr std::uint32_t kTxBlockSize = 1u << 16;

Status SocketError(int err, const std::string& what, const std::string& ifname) {
  if (err == EPERM || err == EACCES)
    return Status::FromErrno(err, "eth " + ifname + ": " + what +
                                      " needs CAP_NET_RAW (run dstd as root or grant cap_net_raw)");
  return Status::FromErrno(err, "eth " + ifname + ": " + what);
}

std::uint32_t LoadStatus(const volatile std::uint32_t* p) {
  return __atomic_load_n(const_cast<const std::uint32_t*>(p), __ATOMIC_ACQUIRE);
}
void StoreStatus(volatile std::uint32_t* p, std::uint32_t v) {
  __atomic_store_n(const_cast<std::uint32_t*>(p), v, __ATOMIC_RELEASE);
}

void Bump(std::atomic<std::uint64_t>& c, std::uint64_t n = 1) { c.fetch_add(n, std::memory_order_relaxed); }

}  // namespace

// Staged frames for kSendmmsg / kSendto, and receive buffers for kRecvmmsg.  Frames
// [tx_first, tx_count) are committed and not yet taken; a partial send rotates the buffer
// pointers down instead of copying frames.
struct EthLink::MmsgBatch {
  std::vector<std::uint8_t> tx_mem;
  std::vector<iovec> tx_iov;
  std::vector<mmsghdr> tx_msgs;
  std::uint32_t tx_first = 0;
  std::uint32_t tx_count = 0;

  std::vector<std::uint8_t> rx_mem;
  std::vector<iovec> rx_iov;
  std::vector<mmsghdr> rx_msgs;
  std::vector<sockaddr_ll> rx_addr;
  std::uint32_t rx_next = 0;
  std::uint32_t rx_have = 0;

  void InitTx(std::uint32_t n, std::size_t frame) {
    tx_mem.assign(std::size_t(n) * frame, 0);
    tx_iov.resize(n);
    tx_msgs.assign(n, mmsghdr{});
    for (std::uint32_t i = 0; i < n; ++i) {
      tx_iov[i] = iovec{tx_mem.data() + std::size_t(i) * frame, 0};
      tx_msgs[i].msg_hdr.msg_iov = &tx_iov[i];
      tx_msgs[i].msg_hdr.msg_iovlen = 1;
    }
  }
  void InitRx(std::uint32_t n, std::size_t frame) {
    rx_mem.assign(std::size_t(n) * frame, 0);
    rx_iov.resize(n);
    rx_addr.assign(n, sockaddr_ll{});
    rx_msgs.assign(n, mmsghdr{});
    for (std::uint32_t i = 0; i < n; ++i) {
      rx_iov[i] = iovec{rx_mem.data() + std::size_t(i) * frame, frame};
      rx_msgs[i].msg_hdr.msg_iov = &rx_iov[i];
      rx_msgs[i].msg_hdr.msg_iovlen = 1;
      rx_msgs[i].msg_hdr.msg_name = &rx_addr[i];
      rx_msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_ll);
    }
  }
  // Frames [0, tx_first) were taken: move the rest to the front (pointer swaps only).
  void Compact() {
    const std::uint32_t left = tx_count - tx_first;
    for (std::uint32_t i = 0; i < left; ++i) std::swap(tx_iov[i], tx_iov[tx_first + i]);
    tx_first = 0;
    tx_count = left;
  }
};

const char* EthLink::TxModeName(EthLinkOptions::Tx m) {
  switch (m) {
    case EthLinkOptions::Tx::kAuto: return "auto";
    case EthLinkOptions::Tx::kRing: return "tx_ring";
    case EthLinkOptions::Tx::kSendmmsg: return "sendmmsg";
    case EthLinkOptions::Tx::kSendto: return "sendto";
  }
  return "?";
}

const char* EthLink::RxModeName(EthLinkOptions::Rx m) {
  switch (m) {
    case EthLinkOptions::Rx::kAuto: return "auto";
    case EthLinkOptions::Rx::kRing: return "rx_ring";
    case EthLinkOptions::Rx::kRecvmmsg: return "recvmmsg";
    case EthLinkOptions::Rx::kNone: return "none";
  }
  return "?";
}

EthLink::EthLink(const Strand& strand, const EthLinkOptions& opt)
    : strand_(strand),
      arena_(std::make_shared<detail::HandlerArena>()),
      tx_sd_(strand),
      rx_sd_(strand),
      ifname_(opt.ifname) {}

EthLink::~EthLink() { Close(); }

Result<std::unique_ptr<EthLink>> EthLink::Open(const Strand& strand, const EthLinkOptions& opt) {
  std::unique_ptr<EthLink> link(new EthLink(strand, opt));
  if (opt.ifname.empty() || opt.ifname.size() >= IFNAMSIZ)
    return Status::InvalidArgument("eth: bad interface name '" + opt.ifname + "'");
  link->ifindex_ = int(if_nametoindex(opt.ifname.c_str()));
  if (link->ifindex_ == 0) return Status::NotFound("eth: no interface '" + opt.ifname + "'");
  link->batch_ = std::make_unique<MmsgBatch>();
  DST_RETURN_IF_ERROR(link->OpenTx(opt));
  DST_RETURN_IF_ERROR(link->OpenRx(opt));
  return link;
}

Status EthLink::OpenTx(const EthLinkOptions& opt) {
  // Bound with protocol 0: this socket sends only and never queues received frames.
  const int fd = ::socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return SocketError(errno, "AF_PACKET socket", ifname_);
  tx_sd_.assign(fd);

  ifreq ifr{};
  std::memcpy(ifr.ifr_name, ifname_.c_str(), ifname_.size());
  if (::ioctl(fd, SIOCGIFHWADDR, &ifr) < 0) return SocketError(errno, "SIOCGIFHWADDR", ifname_);
  if (ifr.ifr_hwaddr.sa_family != ARPHRD_ETHER)
    return Status::NotSupported("eth " + ifname_ + ": not an Ethernet interface");
  std::memcpy(mac_, ifr.ifr_hwaddr.sa_data, kMacLen);
  if (::ioctl(fd, SIOCGIFMTU, &ifr) < 0) return SocketError(errno, "SIOCGIFMTU", ifname_);
  if (ifr.ifr_mtu < int(kEthMinMtu))
    return Status::NotSupported("eth " + ifname_ + ": MTU " + std::to_string(ifr.ifr_mtu) + " below 576");
  mtu_ = std::min<std::uint32_t>(std::uint32_t(ifr.ifr_mtu), kEthMaxMtu);

  sockaddr_ll sll{};
  sll.sll_family = AF_PACKET;
  sll.sll_protocol = 0;
  sll.sll_ifindex = ifindex_;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&sll), sizeof sll) < 0) return SocketError(errno, "bind", ifname_);

  using Tx = EthLinkOptions::Tx;
  if (opt.tx == Tx::kRing || opt.tx == Tx::kAuto) {
    Status s = SetupTxRing(fd, opt);
    if (s.ok()) {
      tx_mode_ = Tx::kRing;
      return s;
    }
    if (opt.tx == Tx::kRing) return s;
  }
  tx_mode_ = opt.tx == Tx::kSendto ? Tx::kSendto : Tx::kSendmmsg;
  batch_->InitTx(std::max<std::uint32_t>(opt.tx_batch, 1), max_frame());
  return Status::OK();
}

Status EthLink::SetupTxRing(int fd, const EthLinkOptions& opt) {
  int v = TPACKET_V2;
  if (::setsockopt(fd, SOL_PACKET, PACKET_VERSION, &v, sizeof v) < 0)
    return SocketError(errno, "PACKET_VERSION V2", ifname_);
  // A frame the kernel finds malformed is skipped instead of stopping the ring.
  int loss = 1;
  if (::setsockopt(fd, SOL_PACKET, PACKET_LOSS, &loss, sizeof loss) < 0)
    return SocketError(errno, "PACKET_LOSS", ifname_);
  tx_frame_size_ = TPACKET_ALIGN(std::uint32_t(kTxDataOffset + max_frame()));
  const std::uint32_t block = std::max(kTxBlockSize, (tx_frame_size_ + 4095u) & ~4095u);
  const std::uint32_t per_block = block / tx_frame_size_;
  const std::uint32_t blocks = std::max<std::uint32_t>((opt.tx_ring_frames + per_block - 1) / per_block, 1);
  tpacket_req req{};
  req.tp_block_size = block;
  req.tp_block_nr = blocks;
  req.tp_frame_size = tx_frame_size_;
  req.tp_frame_nr = blocks * per_block;
  if (::setsockopt(fd, SOL_PACKET, PACKET_TX_RING, &req, sizeof req) < 0)
    return SocketError(errno, "PACKET_TX_RING", ifname_);
  const std::size_t len = std::size_t(block) * blocks;
  void* p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    // Free the unmapped ring, or the sendmmsg fallback's sends would go to it.
    tpacket_req none{};
    ::setsockopt(fd, SOL_PACKET, PACKET_TX_RING, &none, sizeof none);
    return SocketError(err, "mmap PACKET_TX_RING", ifname_);
  }
  tx_ring_ = static_cast<std::uint8_t*>(p);
  tx_ring_len_ = len;
  // Slots never straddle blocks: per_block frames, then the block's tail is unused.  Index them
  // as the kernel does (frame i lives in block i / per_block).
  tx_slots_ = req.tp_frame_nr;
  tx_per_block_ = per_block;
  tx_block_size_ = block;
  return Status::OK();
}

Status EthLink::OpenRx(const EthLinkOptions& opt) {
  using Rx = EthLinkOptions::Rx;
  if (opt.rx == Rx::kNone) {
    rx_mode_ = Rx::kNone;
    return Status::OK();
  }
  // Protocol 0 until bind: nothing is queued from other interfaces in between.
  const int fd = ::socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return SocketError(errno, "AF_PACKET socket", ifname_);
  rx_sd_.assign(fd);
  if (opt.rx == Rx::kRing || opt.rx == Rx::kAuto) {
    Status s = SetupRxRing(fd, opt);
    if (s.ok()) {
      rx_mode_ = Rx::kRing;
    } else if (opt.rx == Rx::kRing) {
      return s;
    }
  }
  if (rx_mode_ != Rx::kRing) {
    rx_mode_ = Rx::kRecvmmsg;
    // One byte more than the largest legal frame, so an oversized one shows up as such.
    batch_->InitRx(std::max<std::uint32_t>(opt.rx_batch, 1), max_frame() + 1);
    // The default receive buffer (rmem_default, ~208 KiB) holds fewer than 100 full frames:
    // less than one TX ring flush of the peer.  Ask for what the ring would have had; FORCE
    // passes rmem_max with CAP_NET_ADMIN, else the kernel caps the plain request at rmem_max.
    const int want = static_cast<int>(std::min<std::uint64_t>(std::uint64_t(opt.rx_block_size) * opt.rx_blocks, 1u << 30));
    if (::setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &want, sizeof want) < 0)
      (void)::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &want, sizeof want);
  }
  sockaddr_ll sll{};
  sll.sll_family = AF_PACKET;
  sll.sll_protocol = htons(kEtherType);
  sll.sll_ifindex = ifindex_;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&sll), sizeof sll) < 0) return SocketError(errno, "bind", ifname_);
  return Status::OK();
}

Status EthLink::SetupRxRing(int fd, const EthLinkOptions& opt) {
  int v = TPACKET_V3;
  if (::setsockopt(fd, SOL_PACKET, PACKET_VERSION, &v, sizeof v) < 0)
    return SocketError(errno, "PACKET_VERSION V3", ifname_);
  const std::uint32_t block = std::max<std::uint32_t>((opt.rx_block_size + 4095u) & ~4095u, 1u << 16);
  const std::uint32_t frame = TPACKET_ALIGN(std::uint32_t(TPACKET3_HDRLEN + max_frame()));
  tpacket_req3 req{};
  req.tp_block_size = block;
  req.tp_block_nr = std::max<std::uint32_t>(opt.rx_blocks, 2);
  req.tp_frame_size = frame;
  req.tp_frame_nr = (block / frame) * req.tp_block_nr;
  req.tp_retire_blk_tov = std::max<std::uint32_t>(opt.rx_block_timeout_ms, 1);
  if (::setsockopt(fd, SOL_PACKET, PACKET_RX_RING, &req, sizeof req) < 0)
    return SocketError(errno, "PACKET_RX_RING", ifname_);
  const std::size_t len = std::size_t(block) * req.tp_block_nr;
  void* p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    // Free the unmapped ring, or received frames would land there instead of recvmmsg's queue.
    tpacket_req3 none{};
    ::setsockopt(fd, SOL_PACKET, PACKET_RX_RING, &none, sizeof none);
    return SocketError(err, "mmap PACKET_RX_RING", ifname_);
  }
  rx_ring_ = static_cast<std::uint8_t*>(p);
  rx_ring_len_ = len;
  rx_block_size_ = block;
  rx_block_count_ = req.tp_block_nr;
  return Status::OK();
}

// ---- transmit ----

std::uint8_t* EthLink::TxSlot(std::uint32_t i) const {
  return tx_ring_ + std::size_t(i / tx_per_block_) * tx_block_size_ + std::size_t(i % tx_per_block_) * tx_frame_size_;
}

void EthLink::ReclaimTxRing() {
  // The kernel releases a slot (TP_STATUS_AVAILABLE) once the device is done with its frame;
  // take them back in ring order, up to the first one still queued or in flight.
  while (tx_used_ > tx_pending_) {
    auto* h = reinterpret_cast<tpacket2_hdr*>(TxSlot(tx_tail_));
    const std::uint32_t st = LoadStatus(&h->tp_status);
    if (st & TP_STATUS_WRONG_FORMAT) {
      Bump(stats_.tx_rejected);
    } else if (st != TP_STATUS_AVAILABLE) {
      break;
    }
    StoreStatus(&h->tp_status, TP_STATUS_AVAILABLE);
    tx_tail_ = (tx_tail_ + 1) % tx_slots_;
    --tx_used_;
  }
  NoteOccupancy();
}

void EthLink::NoteOccupancy() {
  const std::uint64_t used = tx_mode_ == EthLinkOptions::Tx::kRing ? tx_used_ : tx_pending_;
  stats_.tx_ring_occupancy.store(used, std::memory_order_relaxed);
  if (used > stats_.tx_ring_peak.load(std::memory_order_relaxed))
    stats_.tx_ring_peak.store(used, std::memory_order_relaxed);
}

std::uint8_t* EthLink::NextTxBuffer() {
  if (!is_open()) return nullptr;
  tx_slot_open_ = false;
  if (tx_mode_ == EthLinkOptions::Tx::kRing) {
    if (tx_used_ == tx_slots_) ReclaimTxRing();
    if (tx_used_ == tx_slots_) return nullptr;
    tx_slot_open_ = true;
    return TxSlot(tx_head_) + kTxDataOffset;
  }
  MmsgBatch& b = *batch_;
  if (b.tx_count == b.tx_msgs.size() && b.tx_first > 0) b.Compact();
  if (b.tx_count == b.tx_msgs.size()) return nullptr;
  tx_slot_open_ = true;
  return static_cast<std::uint8_t*>(b.tx_iov[b.tx_count].iov_base);
}

void EthLink::CommitTx(std::size_t len) {
  if (!tx_slot_open_ || len < kEthHeaderSize || len > max_frame()) return;
  tx_slot_open_ = false;
  if (tx_mode_ == EthLinkOptions::Tx::kRing) {
    auto* h = reinterpret_cast<tpacket2_hdr*>(TxSlot(tx_head_));
    h->tp_len = std::uint32_t(len);
    h->tp_snaplen = std::uint32_t(len);
    StoreStatus(&h->tp_status, TP_STATUS_SEND_REQUEST);
    tx_head_ = (tx_head_ + 1) % tx_slots_;
    ++tx_used_;
  } else {
    MmsgBatch& b = *batch_;
    b.tx_iov[b.tx_count].iov_len = len;
    ++b.tx_count;
  }
  ++tx_pending_;
  NoteOccupancy();
}

bool EthLink::QueueFrame(const void* frame, std::size_t len) {
  if (len < kEthHeaderSize || len > max_frame()) return false;
  std::uint8_t* p = NextTxBuffer();
  if (!p) return false;
  std::memcpy(p, frame, len);
  CommitTx(len);
  return true;
}

std::size_t EthLink::Flush(boost::system::error_code& ec) {
  ec.clear();
  if (!is_open()) {
    ec = boost::asio::error::bad_descriptor;
    return 0;
  }
  if (tx_pending_ == 0) return 0;
  return tx_mode_ == EthLinkOptions::Tx::kRing ? FlushRing(ec) : FlushBatch(ec);
}

std::size_t EthLink::FlushRing(boost::system::error_code& ec) {
  // One send() hands the kernel every slot marked SEND_REQUEST, in ring order.
  const ssize_t r = ::send(tx_sd_.native_handle(), nullptr, 0, MSG_DONTWAIT);
  const int err = r < 0 ? errno : 0;
  // Which frames did it take?  Those no longer marked SEND_REQUEST.
  std::size_t taken = 0, bytes = 0;
  while (taken < tx_pending_) {
    auto* h = reinterpret_cast<tpacket2_hdr*>(TxSlot(tx_flush_));
    if (LoadStatus(&h->tp_status) == TP_STATUS_SEND_REQUEST) break;
    bytes += h->tp_len;
    tx_flush_ = (tx_flush_ + 1) % tx_slots_;
    ++taken;
  }
  tx_pending_ -= taken;
  if (taken) {
    Bump(stats_.tx.frames, taken);
    Bump(stats_.tx.syscalls);
    Bump(stats_.tx.bytes, bytes);
  }
  ReclaimTxRing();
  if (err && err != EAGAIN && err != EWOULDBLOCK && err != ENOBUFS && err != EINTR) {
    ec.assign(err, boost::system::system_category());
  } else if (!taken) {
    Bump(stats_.tx.eagain);
    ec = boost::asio::error::would_block;
  }
  return taken;
}

std::size_t EthLink::FlushBatch(boost::system::error_code& ec) {
  MmsgBatch& b = *batch_;
  const int fd = tx_sd_.native_handle();
  std::size_t taken = 0, bytes = 0, calls = 0;
  int err = 0;
  while (b.tx_first < b.tx_count) {
    int n;
    if (tx_mode_ == EthLinkOptions::Tx::kSendmmsg) {
      n = ::sendmmsg(fd, &b.tx_msgs[b.tx_first], b.tx_count - b.tx_first, MSG_DONTWAIT);
    } else {
      const iovec& v = b.tx_iov[b.tx_first];
      n = ::send(fd, v.iov_base, v.iov_len, MSG_DONTWAIT) < 0 ? -1 : 1;
    }
    if (n <= 0) {
      err = n < 0 ? errno : EAGAIN;
      if (err == EINTR) continue;
      break;
    }
    ++calls;
    for (int i = 0; i < n; ++i) bytes += b.tx_iov[b.tx_first + i].iov_len;
    b.tx_first += std::uint32_t(n);
    taken += std::size_t(n);
  }
  if (b.tx_first == b.tx_count) b.tx_first = b.tx_count = 0;
  tx_pending_ -= taken;
  Bump(stats_.tx.frames, taken);
  Bump(stats_.tx.syscalls, calls);
  Bump(stats_.tx.bytes, bytes);
  NoteOccupancy();
  if (err && err != EAGAIN && err != EWOULDBLOCK && err != ENOBUFS) {
    ec.assign(err, boost::system::system_category());
  } else if (!taken && err) {
    Bump(stats_.tx.eagain);
    ec = boost::asio::error::would_block;
  }
  return taken;
}

void EthLink::AsyncWaitWritable(IoCallback done) {
  tx_sd_.async_wait(Descriptor::wait_write, detail::ArenaHandler(arena_, strand_, std::move(done)));
}

// ---- receive ----

bool EthLink::NextRxRaw(const std::uint8_t** frame, std::size_t* len, bool* outgoing) {
  if (rx_mode_ == EthLinkOptions::Rx::kRing) {
    for (;;) {
      auto* bd = reinterpret_cast<tpacket_block_desc*>(rx_ring_ + std::size_t(rx_block_) * rx_block_size_);
      if (!rx_pkt_) {
        if (!(LoadStatus(&bd->hdr.bh1.block_status) & TP_STATUS_USER)) return false;
        rx_left_ = bd->hdr.bh1.num_pkts;
        rx_pkt_ = reinterpret_cast<std::uint8_t*>(bd) + bd->hdr.bh1.offset_to_first_pkt;
        if (rx_left_) Bump(stats_.rx_calls);
      }
      if (rx_left_ == 0) {
        // Block consumed: give it back and move on.
        StoreStatus(&bd->hdr.bh1.block_status, TP_STATUS_KERNEL);
        rx_pkt_ = nullptr;
        rx_block_ = (rx_block_ + 1) % rx_block_count_;
        continue;
      }
      auto* ph = reinterpret_cast<tpacket3_hdr*>(rx_pkt_);
      auto* sll = reinterpret_cast<const sockaddr_ll*>(rx_pkt_ + TPACKET_ALIGN(sizeof(tpacket3_hdr)));
      *frame = rx_pkt_ + ph->tp_mac;
      // A frame cut to the ring's frame size (snaplen < len) is reported with its full length so
      // that it is refused as oversized or truncated, never read past the snapshot.
      *len = ph->tp_snaplen < ph->tp_len ? 0 : ph->tp_snaplen;
      *outgoing = sll->sll_pkttype == PACKET_OUTGOING;
      rx_pkt_ += ph->tp_next_offset;
      --rx_left_;
      return true;
    }
  }
  MmsgBatch& b = *batch_;
  if (b.rx_next == b.rx_have) {
    for (auto& m : b.rx_msgs) m.msg_hdr.msg_namelen = sizeof(sockaddr_ll);
    int n;
    do {
      n = ::recvmmsg(rx_sd_.native_handle(), b.rx_msgs.data(), unsigned(b.rx_msgs.size()), MSG_DONTWAIT, nullptr);
    } while (n < 0 && errno == EINTR);
    if (n <= 0) return false;
    Bump(stats_.rx_calls);
    b.rx_next = 0;
    b.rx_have = std::uint32_t(n);
  }
  const mmsghdr& m = b.rx_msgs[b.rx_next];
  *frame = static_cast<const std::uint8_t*>(b.rx_iov[b.rx_next].iov_base);
  *len = (m.msg_hdr.msg_flags & MSG_TRUNC) ? 0 : m.msg_len;
  *outgoing = b.rx_addr[b.rx_next].sll_pkttype == PACKET_OUTGOING;
  ++b.rx_next;
  return true;
}

bool EthLink::Accept(const std::uint8_t* frame, std::size_t len, EthHeader* h, const std::uint8_t** payload) {
  if (DecodeEthFrame(frame, len, max_fragment(), h, payload) != EthDecodeError::kOk) {
    Bump(stats_.rx_malformed);
    return false;
  }
  static constexpr std::uint8_t kBroadcast[kMacLen] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
  if (std::memcmp(h->dst, mac_, kMacLen) != 0 && std::memcmp(h->dst, kBroadcast, kMacLen) != 0) {
    Bump(stats_.rx_not_for_us);
    return false;
  }
  Bump(stats_.rx_frames);
  Bump(stats_.rx_bytes, len);
  return true;
}

bool EthLink::NextRx(EthHeader* h, const std::uint8_t** payload) {
  if (rx_mode_ == EthLinkOptions::Rx::kNone || !rx_sd_.is_open()) return false;
  const std::uint8_t* frame;
  std::size_t len;
  bool outgoing;
  while (NextRxRaw(&frame, &len, &outgoing)) {
    if (outgoing) continue;  // our own transmissions, seen by a tap
    if (Accept(frame, len, h, payload)) return true;
  }
  return false;
}

void EthLink::AsyncWaitReadable(IoCallback done) {
  rx_sd_.async_wait(Descriptor::wait_read, detail::ArenaHandler(arena_, strand_, std::move(done)));
}

std::uint64_t EthLink::UpdateKernelDrops() {
  if (rx_sd_.is_open()) {
    // Reading the statistics resets them, so each call adds what happened since the last one.
    tpacket_stats_v3 st{};
    socklen_t len = sizeof st;
    if (::getsockopt(rx_sd_.native_handle(), SOL_PACKET, PACKET_STATISTICS, &st, &len) == 0)
      Bump(stats_.rx_kernel_drops, st.tp_drops);
  }
  return stats_.rx_kernel_drops.load();
}

void EthLink::Close() {
  boost::system::error_code ignored;
  if (tx_sd_.is_open()) tx_sd_.close(ignored);
  if (rx_sd_.is_open()) rx_sd_.close(ignored);
  if (tx_ring_) ::munmap(tx_ring_, tx_ring_len_);
  if (rx_ring_) ::munmap(rx_ring_, rx_ring_len_);
  tx_ring_ = rx_ring_ = nullptr;
  rx_pkt_ = nullptr;
}

}  // namespace dst::net
