// Fuzz target: the DST exporter (exporter.cc on server_core.cc).  The input is what one client
// sends from its first byte: HELLO, then requests and payloads.
#include <cstddef>
#include <cstdint>

#include "dst/net/exporter.h"
#include "server_harness.h"

using Harness = dst::fuzz::ServerHarness<dst::net::Exporter>;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static auto* h = new Harness(dst::net::ExporterOptions{}, [](dst::net::Exporter& s) {
    if (!s.AddExport({.name = "disk0", .device = Harness::Device(1 << 20)}).ok()) __builtin_trap();
    if (!s.AddExport({.name = "ro", .device = Harness::Device(64 << 10, true), .read_only = true}).ok())
      __builtin_trap();
  });
  h->Run(data, size);
  return 0;
}
