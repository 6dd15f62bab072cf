// Fuzz target: the NBD client (NbdClientDevice: nbd_client_device.cc on client_core.cc).  The
// input is one option byte (bit 0: ask for structured replies, bit 1: use OPT_GO rather than
// EXPORT_NAME), then everything the server sends on the client's one connection from its first
// byte: the greeting, option replies, then replies to the requests below (cookies 1 << 32 |
// 0..6, in this order; client_harness.h).
#include <cstddef>
#include <cstdint>
#include <string>

#include "client_harness.h"
#include "dst/net/nbd_client_device.h"
#include "dst/net/nbd_format.h"

namespace {

using dst::IoOp;
using dst::fuzz::ClientOp;

std::size_t FrameBytes(const ClientOp& op) {
  return dst::net::nbd::kRequestSize + (op.op == IoOp::kWrite ? op.length : 0);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static auto* rig = new dst::fuzz::ClientRig;
  if (size == 0) return 0;
  dst::net::NbdClientOptions o;
  o.export_name = "disk0";
  o.try_structured_replies = data[0] & 1;
  o.try_opt_go = data[0] & 2;
  rig->Prepare(&o, std::string(reinterpret_cast<const char*>(data) + 1, size - 1));
  auto dev = dst::net::NbdClientDevice::Connect(rig->io(), o);
  if (dev.ok()) rig->Run(*dev.value(), dst::fuzz::kClientOps, &FrameBytes);
  return 0;
}
