// Fuzz target: the NBD server in TLS require mode (FORCEDTLS, docs/nbd.md §2.3).  The input is
// what one client sends from its first byte.  Before STARTTLS every option must be refused
// (ERR_TLS_REQD) or close the connection (EXPORT_NAME); a STARTTLS that is acknowledged hands
// the in-memory transport to the TLS upgrade, which refuses it (not TCP) and closes: the paths
// a client can reach without a key.
#include <stdlib.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "dst/net/nbd_server.h"
#include "dst/net/tls.h"
#include "server_harness.h"

using Harness = dst::fuzz::ServerHarness<dst::net::NbdServer>;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static auto* h = [] {
    char dir[] = "/tmp/fuzz_nbd_tls.XXXXXX";
    if (!::mkdtemp(dir)) __builtin_trap();
    const std::string psk = std::string(dir) + "/server.psk";
    if (!dst::net::GeneratePskFile(psk, "alice", false).ok()) __builtin_trap();
    dst::net::TlsConfig tc;
    tc.server = true;
    tc.psk_file = psk;
    auto ctx = dst::net::TlsContext::Create(tc);
    if (!ctx.ok()) __builtin_trap();
    dst::net::NbdServerOptions o;
    o.tls = ctx.value();
    o.tls_mode = dst::net::NbdTls::kRequire;
    return new Harness(o, [](dst::net::NbdServer& s) {
      if (!s.AddExport({.name = "disk0", .device = Harness::Device(1 << 20), .description = "first"}).ok())
        __builtin_trap();
    });
  }();
  h->Run(data, size);
  return 0;
}
