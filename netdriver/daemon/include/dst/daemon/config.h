// dstd configuration: the TOML file (toml++) parsed into plain structs and validated fully.
//
// Every problem is reported as one line naming the file, the line, the key and what is wrong:
//
//   /etc/dst/dstd.toml:7: export "disk1": size: bad size "1X" (bytes, or a number with K, M, G or T)
//
// Unknown keys and tables are errors (a typo must not silently change behaviour).  dstd exits
// with EX_CONFIG (78) on any of them.  The same size/URI parsers serve the control RPCs.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "dst/status.h"

namespace dst::daemon {

struct ExportConfig {
  std::string name;
  std::string path;
  std::uint64_t size = 0;  // 0: use the existing file's size
  bool read_only = false;
  bool direct_io = false;
};

struct VolumeConfig {
  std::string name;
  std::string remote;       // "dst://host:port/export" (exactly one of remote / path)
  std::string host;         // parsed from remote
  std::uint16_t port = 0;   // parsed from remote
  std::string export_name;  // parsed from remote
  std::string path;         // local volume
  std::uint32_t queue_depth = 64;
  std::uint32_t io_timeout_s = 60;
  std::uint32_t keepalive_timeout_s = 5;
};

struct Config {
  std::string listen_host = "127.0.0.1";
  std::uint16_t listen_port = 7400;
  std::string mountpoint;  // empty: no FUSE mount at start
  bool batching = true;
  std::vector<ExportConfig> exports;
  std::vector<VolumeConfig> volumes;
};

struct ParseOptions {
  // Check the file system: an export path that does not exist needs a size.
  bool check_files = true;
};

// Parses TOML text; `source` names the file in error messages.
Result<Config> ParseConfig(std::string_view text, const std::string& source,
                           const ParseOptions& opts = {});
// Reads and parses a file ("cannot read" is an error too).
Result<Config> LoadConfigFile(const std::string& path, const ParseOptions& opts = {});

// "4096", "512K", "512M", "1G", "2T", also "1GiB"/"1GB" (binary units).  Must be a positive
// multiple of 512 bytes.
Result<std::uint64_t> ParseSize(std::string_view s);
// "HOST:PORT" or "[V6]:PORT"; port 0 = any free port.
Status ParseListen(std::string_view s, std::string* host, std::uint16_t* port);
// "dst://host[:port]/export" (default port 7400).
Status ParseVolumeUri(std::string_view uri, std::string* host, std::uint16_t* port,
                      std::string* export_name);
// Export and volume names: 1..64 chars of [A-Za-z0-9._-], not starting with '.'.
bool ValidName(std::string_view name);

}  // namespace dst::daemon
