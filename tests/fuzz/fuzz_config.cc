// Fuzz target: the TOML configuration (daemon/src/config.cc): ParseConfig on the input as a whole
// file, without touching the file system, and the value parsers it uses on the input as one
// value.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "dst/daemon/config.h"

namespace d = dst::daemon;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  auto cfg = d::ParseConfig(text, "fuzz.toml", {.check_files = false});
  if (cfg.ok()) (void)d::ValidateTopology(cfg.value());

  if (size <= 256) {
    (void)d::ParseSize(text);
    (void)d::ParseRate(text);
    (void)d::ParseDuration(text);
    std::string host, name;
    std::uint16_t port = 0;
    (void)d::ParseListen(text, &host, &port);
    (void)d::ParseVolumeUri(text, &host, &port, &name);
    d::VolumeConfig v;
    (void)d::ParseVolumeRemote(text, &v);
    d::LegSpec leg;
    (void)d::ParseLegSpec(text, &leg);
    (void)d::ValidName(text);
  }
  return 0;
}
