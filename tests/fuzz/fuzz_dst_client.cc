// Fuzz target: the DST client (RemoteDevice: remote_device.cc on client_core.cc).  The input is
// one option byte (bit 0: the client offers payload digests), then everything the server sends
// on the client's one connection from its first byte: the HELLO reply, then replies to the
// requests below (ids 1 << 32 | 0..6, in this order; client_harness.h).
#include <cstddef>
#include <cstdint>
#include <string>

#include "client_harness.h"
#include "dst/net/dst_format.h"
#include "dst/net/remote_device.h"

namespace {

using dst::IoOp;
using dst::fuzz::ClientOp;

std::size_t FrameBytes(const ClientOp& op) {
  return dst::net::kHeaderSize + (op.op == IoOp::kWrite ? op.length : 0);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static auto* rig = new dst::fuzz::ClientRig;
  if (size == 0) return 0;
  dst::net::RemoteOptions o;
  o.export_name = "disk0";
  o.checksum = data[0] & 1;
  rig->Prepare(&o, std::string(reinterpret_cast<const char*>(data) + 1, size - 1));
  auto dev = dst::net::RemoteDevice::Connect(rig->io(), o);
  if (dev.ok()) rig->Run(*dev.value(), dst::fuzz::kClientOps, &FrameBytes);
  return 0;
}
