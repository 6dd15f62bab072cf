// Fuzz target: the NBD server (nbd_server.cc on server_core.cc).  The input is what one client
// sends from its first byte: client flags, options (handshake phase), then requests and payloads
// (transmission phase).
#include <cstddef>
#include <cstdint>

#include "dst/net/nbd_server.h"
#include "server_harness.h"

using Harness = dst::fuzz::ServerHarness<dst::net::NbdServer>;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static auto* h = [] {
    dst::net::NbdServerOptions o;
    o.sparse_read_min = 8192;  // structured READs look for holes in the seeds' 16 KiB reads
    return new Harness(o, [](dst::net::NbdServer& s) {
      if (!s.AddExport({.name = "disk0", .device = Harness::Device(1 << 20), .description = "first"}).ok())
        __builtin_trap();
      if (!s.AddExport({.name = "ro", .device = Harness::Device(64 << 10, true), .read_only = true}).ok())
        __builtin_trap();
    });
  }();
  h->Run(data, size);
  return 0;
}
