// A network client (RemoteDevice or NbdClientDevice) whose one connection reads the fuzz input
// as everything the server sends, for the client fuzz targets (issue 11 item 6).
//
// Per input: a new device connects through ClientOptions::connector, which hands out one
// in-memory transport (mem_transport.h) replaying the input (the handshake replies, then the
// replies to a fixed set of requests) and refuses every later connect.  The handshake reads
// straight from the input; the data phase's first receive is held back until every request the
// device accepted is on the wire, so the replies meet known request ids (generation 1, slots 0,
// 1, 2... in submission order) whatever the thread timing.  The run ends when every request has
// completed or the connection is gone (the input ran out or the client dropped it); Close()
// then fails what is left.
//
// Checked besides ASan/UBSan: every request completes exactly once, and a run ends within 10 s
// (else it traps: a hang).
//
// Threading: the client runs on one io_context thread for the whole process (Connect() must not
// be called on it); LLVMFuzzerTestOneInput's thread submits and waits.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>

#include "dst/block_device.h"
#include "dst/net/client_device.h"

namespace dst::fuzz {

// One request of the fixed set a target submits after connecting.
struct ClientOp {
  IoOp op;
  std::uint64_t offset;
  std::uint32_t length;
  std::uint32_t flags = 0;
};

// The requests both client targets submit.  Every one goes out at once: no two writes overlap
// and the flush comes first (a flush behind a write would wait for the write's reply).  Ids on
// the wire: 1 << 32 | 0..6, in this order.
extern const std::vector<ClientOp> kClientOps;

// `frame_bytes(op)`: what one request puts on the wire (header and payload) in the protocol.
using FrameBytesFn = std::size_t (*)(const ClientOp& op);

// One per process: the io_context thread, and the connection of the current run.
class ClientRig {
 public:
  ClientRig();
  ~ClientRig();
  // Sets the connector and the timeouts of `o` for one run over `input`.
  void Prepare(net::ClientOptions* o, std::string input);
  // Submits the ops, releases the replies, waits for the end of the run, closes the device.
  void Run(net::ClientDevice& dev, const std::vector<ClientOp>& ops, FrameBytesFn frame_bytes);
  boost::asio::io_context& io();

  struct Impl;

 private:
  Impl* impl_;
};

}  // namespace dst::fuzz
