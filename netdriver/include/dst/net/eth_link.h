// EthLink: batched raw-Ethernet I/O on one interface and dst's EtherType (AF_PACKET, SOCK_RAW).
//
// The foundation of the raw-Ethernet transport (docs/protocol.md §12): it moves whole frames,
// many per system call, and knows nothing of sessions, acknowledgements or retransmits.
//
// Transmit: the caller writes a frame straight into the next free slot (NextTxBuffer), commits
// it (CommitTx), and Flush() hands every committed frame to the kernel:
//   * kRing:     PACKET_TX_RING (TPACKET_V2): slots are the mmap'ed ring itself; one send()
//                transmits the whole batch (the kernel's xmit_more, from user space);
//   * kSendmmsg: frames staged in a preallocated batch, one sendmmsg() per batch;
//   * kSendto:   one sendto() per frame (the baseline the benchmark compares against).
// Receive (NextRx) returns one checked frame at a time out of a batch the kernel filled:
//   * kRing:     PACKET_RX_RING with TPACKET_V3 blocks: the kernel hands over a whole block of
//                frames when it is full or `rx_block_timeout_ms` passed (a latency floor);
//   * kRecvmmsg: one recvmmsg() of up to `rx_batch` frames into preallocated buffers.
// Frames that fail DecodeEthFrame are counted (rx_malformed) and skipped; frames for another
// station (not our MAC, not broadcast) are counted apart (rx_not_for_us).
//
//   NextTxBuffer --(write frame)--> CommitTx --...--> Flush --(EAGAIN / ring full)--> AsyncWaitWritable
//   NextRx --(false: nothing ready)--> AsyncWaitReadable --> NextRx ...
//
// Allocation: everything (ring mappings, staging buffers, mmsghdr arrays) is set up by Open();
// sending and receiving frames never allocates.  Waits use Asio's recycled handler memory.
//
// Threading: one strand (the one given to Open): every method there, every completion there.
// Stats are atomics and may be read from any thread.  A readiness wait only completes on a new
// readiness event, so drain (NextRx until false, Flush until would_block) before waiting, and
// run the io_context on one thread (as the exporter, docs/protocol.md §11): with several threads
// an event that arrives between the drain and the wait can be missed.
//
// Needs CAP_NET_RAW; without it Open() fails with EPERM and says so.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include <boost/asio/posix/stream_descriptor.hpp>

#include "dst/net/eth_format.h"
#include "dst/net/transmitter.h"
#include "dst/net/transport.h"
#include "dst/status.h"

namespace dst::net {

namespace detail {
class HandlerArena;
}

struct EthLinkOptions {
  enum class Tx { kAuto, kRing, kSendmmsg, kSendto };  // kAuto: ring, else sendmmsg
  enum class Rx { kAuto, kRing, kRecvmmsg, kNone };    // kAuto: ring, else recvmmsg; kNone: send only

  std::string ifname;                 // the interface, e.g. "eth0"
  Tx tx = Tx::kAuto;
  Rx rx = Rx::kAuto;
  std::uint32_t tx_ring_frames = 512;      // kRing: slots (rounded up to whole ring blocks)
  std::uint32_t tx_batch = 64;             // kSendmmsg / kSendto: staged frames
  std::uint32_t rx_block_size = 256u << 10;  // kRing: bytes per TPACKET_V3 block
  std::uint32_t rx_blocks = 16;
  std::uint32_t rx_block_timeout_ms = 1;   // kRing: a partly filled block is handed over after this
  std::uint32_t rx_batch = 64;             // kRecvmmsg: frames per call
};

struct EthLinkStats {
  TxStats tx;  // frames sent, send calls that took frames, bytes, would-block results
  std::atomic<std::uint64_t> tx_rejected{0};        // ring frames the kernel refused (bad format)
  std::atomic<std::uint64_t> tx_ring_occupancy{0};  // slots committed and not yet released
  std::atomic<std::uint64_t> tx_ring_peak{0};
  std::atomic<std::uint64_t> rx_frames{0};      // valid frames returned by NextRx
  std::atomic<std::uint64_t> rx_calls{0};       // recvmmsg calls / ring blocks that brought frames
  std::atomic<std::uint64_t> rx_bytes{0};
  std::atomic<std::uint64_t> rx_malformed{0};   // failed DecodeEthFrame or arrived truncated
  std::atomic<std::uint64_t> rx_not_for_us{0};  // another station's unicast
  std::atomic<std::uint64_t> rx_kernel_drops{0};  // PACKET_STATISTICS tp_drops (UpdateKernelDrops)
  double FramesPerRxCall() const {
    auto c = rx_calls.load();
    return c ? double(rx_frames.load() + rx_malformed.load() + rx_not_for_us.load()) / double(c) : 0.0;
  }
};

class EthLink {
 public:
  // Opens the sockets on opt.ifname (resolved in the calling thread's network namespace) with
  // completions on `strand`.  EPERM without CAP_NET_RAW; NotFound for an unknown interface;
  // NotSupported for a non-Ethernet one or a forced mode the kernel lacks.
  static Result<std::unique_ptr<EthLink>> Open(const Strand& strand, const EthLinkOptions& opt);
  ~EthLink();
  EthLink(const EthLink&) = delete;
  EthLink& operator=(const EthLink&) = delete;

  const std::uint8_t* mac() const { return mac_; }
  std::uint32_t mtu() const { return mtu_; }
  int ifindex() const { return ifindex_; }
  std::size_t max_frame() const { return EthMaxFrame(mtu_); }           // 1514 at MTU 1500
  std::size_t max_fragment() const { return EthMaxFragment(mtu_); }     // 1436 at MTU 1500
  EthLinkOptions::Tx tx_mode() const { return tx_mode_; }
  EthLinkOptions::Rx rx_mode() const { return rx_mode_; }
  static const char* TxModeName(EthLinkOptions::Tx m);
  static const char* RxModeName(EthLinkOptions::Rx m);

  // ---- transmit ----
  // Room for the next frame (max_frame() bytes), or nullptr while every slot holds a frame the
  // kernel has not released: Flush(), and on would_block AsyncWaitWritable().
  std::uint8_t* NextTxBuffer();
  // Queues the frame just written into NextTxBuffer()'s buffer.  REQUIRES: 14 <= len <= max_frame().
  void CommitTx(std::size_t len);
  // Copies a whole frame into the next slot and commits it; false when no slot is free.
  bool QueueFrame(const void* frame, std::size_t len);
  std::size_t tx_queued() const { return tx_pending_; }  // committed, not yet taken by the kernel
  // Hands the committed frames to the kernel (ring: one send(); sendmmsg: one call per batch;
  // sendto: one call per frame).  Returns how many it took.  ec = would_block when it took none
  // for lack of room; another ec: the link failed (ENETDOWN, ENXIO...).
  std::size_t Flush(boost::system::error_code& ec);
  // Completes when the socket may take more (ring: the next slot was released).
  void AsyncWaitWritable(IoCallback done);

  // ---- receive ----
  // The next frame that passed DecodeEthFrame and is addressed to us (or broadcast), or false
  // when none is ready now.  *payload and the header stay valid until the next NextRx call.
  bool NextRx(EthHeader* h, const std::uint8_t** payload);
  // Completes when frames may be ready.
  void AsyncWaitReadable(IoCallback done);
  // Adds the kernel's receive drops since the last call to stats().rx_kernel_drops; returns the total.
  std::uint64_t UpdateKernelDrops();

  // Ends pending waits (operation_aborted) and closes the sockets.  Idempotent.
  void Close();
  bool is_open() const { return tx_sd_.is_open(); }
  const EthLinkStats& stats() const { return stats_; }

  // Raw descriptors, for tests that inject frames beside the link.
  int tx_fd() { return tx_sd_.native_handle(); }
  int rx_fd() { return rx_sd_.native_handle(); }

 private:
  using Descriptor = boost::asio::posix::basic_stream_descriptor<Strand>;
  struct MmsgBatch;  // sendmmsg / recvmmsg arrays and buffers (eth_link.cc)

  EthLink(const Strand& strand, const EthLinkOptions& opt);
  Status OpenTx(const EthLinkOptions& opt);
  Status OpenRx(const EthLinkOptions& opt);
  Status SetupTxRing(int fd, const EthLinkOptions& opt);
  Status SetupRxRing(int fd, const EthLinkOptions& opt);
  std::uint8_t* TxSlot(std::uint32_t i) const;  // the tpacket2_hdr of ring slot i
  void ReclaimTxRing();
  std::size_t FlushRing(boost::system::error_code& ec);
  std::size_t FlushBatch(boost::system::error_code& ec);
  bool NextRxRaw(const std::uint8_t** frame, std::size_t* len, bool* outgoing);
  bool Accept(const std::uint8_t* frame, std::size_t len, EthHeader* h, const std::uint8_t** payload);
  void NoteOccupancy();

  Strand strand_;
  // Memory for the two waits: Asio's one-slot per-thread cache misses when the link shares an io
  // thread with its sessions' owners (dstd), and every receive batch waits again.
  std::shared_ptr<detail::HandlerArena> arena_;
  Descriptor tx_sd_;
  Descriptor rx_sd_;
  EthLinkOptions::Tx tx_mode_ = EthLinkOptions::Tx::kSendto;
  EthLinkOptions::Rx rx_mode_ = EthLinkOptions::Rx::kNone;
  std::string ifname_;
  int ifindex_ = 0;
  std::uint32_t mtu_ = 1500;
  std::uint8_t mac_[kMacLen] = {};
  EthLinkStats stats_;

  // PACKET_TX_RING (TPACKET_V2): slot i is frame i % tx_per_block_ of block i / tx_per_block_.
  std::uint8_t* tx_ring_ = nullptr;
  std::size_t tx_ring_len_ = 0;
  std::uint32_t tx_frame_size_ = 0;
  std::uint32_t tx_slots_ = 0;
  std::uint32_t tx_per_block_ = 1;  // slots never straddle the ring's blocks
  std::uint32_t tx_block_size_ = 0;
  std::uint32_t tx_head_ = 0;   // next slot to fill
  std::uint32_t tx_flush_ = 0;  // first committed slot not yet taken by the kernel
  std::uint32_t tx_tail_ = 0;   // oldest slot not yet released by the kernel
  std::uint32_t tx_used_ = 0;   // slots from tx_tail_ to tx_head_
  std::size_t tx_pending_ = 0;  // committed, not taken (ring and batch modes)
  bool tx_slot_open_ = false;   // NextTxBuffer returned a slot not yet committed

  // PACKET_RX_RING (TPACKET_V3): block i at rx_ring_ + i * rx_block_size_.
  std::uint8_t* rx_ring_ = nullptr;
  std::size_t rx_ring_len_ = 0;
  std::uint32_t rx_block_size_ = 0;
  std::uint32_t rx_block_count_ = 0;
  std::uint32_t rx_block_ = 0;           // block being read
  std::uint8_t* rx_pkt_ = nullptr;       // next packet in it (null: block not open)
  std::uint32_t rx_left_ = 0;            // packets left in it

  std::unique_ptr<MmsgBatch> batch_;     // kSendmmsg / kSendto / kRecvmmsg
};

}  // namespace dst::net
