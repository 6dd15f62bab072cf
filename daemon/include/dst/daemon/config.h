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
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "dst/layer.h"
#include "dst/net/export_access.h"
#include "dst/status.h"

namespace dst::daemon {

struct ExportConfig {
  std::string name;
  std::string path;        // exactly one of path / array / volume
  std::string array;       // export an array of this daemon (arrays stack across hosts)
  std::string volume;      // export a volume of this daemon
  std::uint64_t size = 0;  // 0: use the existing file's size; never below it (no shrinking)
  bool grow = false;       // size may grow an existing image (else a larger size is refused)
  bool read_only = false;
  bool direct_io = false;
  // Who may connect, over DST and NBD (allow = ["alice:rw", "bob:ro"]; docs/security.md
  // "Default deny").  Empty: nobody.
  net::AccessList allow;
};

struct VolumeConfig {
  std::string name;
  std::string remote;       // dst:// or nbd:// URI (exactly one of remote / path)
  std::string host;         // parsed from remote
  std::uint16_t port = 0;   // parsed from remote
  std::string export_name;  // parsed from remote
  std::string path;         // local volume
  std::uint32_t queue_depth = 64;
  std::uint32_t io_timeout_s = 60;
  std::uint32_t keepalive_timeout_s = 5;
  // "xxh3": offer payload digests (docs/protocol.md §4.1); "" / "none": off (the default).
  std::string checksum;
  // The volume's file on the FUSE mount (docs/security.md): permission bits ("0640"), and its
  // owner ("user", "user:group", or numeric ids).  Default: 0600, the daemon's user and group
  // (root).  Other users can reach the file only with [daemon] fuse_allow_other = true.
  std::uint32_t mode = 0600;
  std::int64_t owner_uid = -1;  // -1: the daemon's
  std::int64_t owner_gid = -1;
};

// One leg of an array: "dst://host[:port]/export", "nbd://host[:port]/name",
// "nbd+unix:///name?socket=/path", "/abs/path",
// "volume:NAME" or "array:NAME".
struct LegSpec {
  enum class Kind { kDst, kNbd, kPath, kVolume, kArray };
  Kind kind = Kind::kPath;
  std::string text;  // the spec as written (canonical form used in the topology table)
  std::string ref;   // path, volume name or array name
};
Status ParseLegSpec(std::string_view spec, LegSpec* out);

struct ArrayConfig {
  std::string name;
  std::string level = "mirror";                 // a layer name (dst/layer.h): "mirror", "linear", ...
  std::vector<std::string> legs;                // leg specs by slot
  // Keys every layer has; a layer's own keys (the mirror's region_size, resync rates and
  // write_intent, raid0's chunk) live in `params`, described by the registry (dst/layer.h).
  std::uint32_t leg_timeout_s = 10;             // dst:// legs: outage after which a leg fails
  // Periodic online verify (dstd.8 "verify_interval"): seconds between verifies, 0 = none,
  // -1 = not set here ([daemon] verify_interval applies).
  std::int64_t verify_interval_s = -1;
  std::string checksum;                         // "xxh3": payload digests on its dst:// legs
  // The layer's own keys (dst/layer.h: LayerInfo::keys), canonical text, defaults filled in.
  // A mirror's as typed values: MirrorKeysFrom(params) (dst/mirror_device.h).
  std::map<std::string, std::string> params;
};

// [limits]: the servers' resource caps (net/server_limits.h, docs/security.md "Bounded
// resources").  Durations in seconds; 0 disables a timeout or a cap.
struct LimitsConfig {
  std::uint64_t handshake_timeout_s = 10;
  std::uint64_t idle_timeout_s = 600;     // DST (clients send keepalives)
  std::uint64_t nbd_idle_timeout_s = 0;   // NBD clients have no keepalive: off by default
  std::uint64_t stall_timeout_s = 30;     // waiting on a client: a withheld payload, unread replies
  std::uint32_t max_connections = 256;    // per server (DST, NBD)
  std::uint32_t max_connections_per_address = 32;
  std::uint32_t max_connections_per_identity = 32;
  std::uint32_t min_drain_rate = 256u << 10;  // bytes/s a client must read while replies wait on it
  std::uint64_t drain_window_s = 10;          // ... measured over this
  std::uint32_t nbd_max_option_length = 8192;
  std::uint32_t nbd_max_options = 128;
  std::uint32_t nbd_max_meta_queries = 32;
  std::uint32_t nbd_max_meta_query_length = 1024;
};

struct Config {
  std::string listen_host = "127.0.0.1";
  std::uint16_t listen_port = 7400;
  // NBD server ([daemon] nbd_listen, docs/nbd.md): every export is also served over NBD here.
  // nbd_listen = "" disables it.  nbd_listen_set: given explicitly (a bind failure is then
  // fatal; with the default port 10809 a busy port only disables NBD with a warning).
  bool nbd_enabled = true;
  bool nbd_listen_set = false;
  std::string nbd_host = "127.0.0.1";
  std::uint16_t nbd_port = 10809;
  // Prometheus endpoint ([daemon] metrics_listen = "HOST:PORT", docs/metrics.md): off unless
  // set.  It serves counters only (no data), but a non-loopback address still needs insecure
  // = true or it is refused like any listener others can reach without TLS.
  bool metrics_enabled = false;
  std::string metrics_host = "127.0.0.1";
  std::uint16_t metrics_port = 0;
  std::string mountpoint;  // empty: no FUSE mount at start
  // FUSE allow_other: users other than dstd's may reach the volume files (then only as each
  // file's mode and owner allow).  Off by default.
  bool fuse_allow_other = false;
  bool batching = true;
  // Event-loop threads.  Default 1: file I/O runs on device worker threads, and one loop keeps
  // Asio's per-thread handler memory warm (0 allocations per I/O; two loops on two cores halved
  // NBD throughput in bench/nbd_bench.sh).
  std::uint32_t io_threads = 1;
  // Default periodic verify of every mirror without its own verify_interval (0 = none).
  std::uint64_t verify_interval_s = 0;
  // Name this host shows in the claims (leases) it writes on mirror leg headers; "" = the
  // machine's hostname.  The host id beside it is generated once and kept in the state DB.
  std::string host_name;
  // Where paths given through the control socket (export add, local volumes, path legs) may
  // live: directories (everything below them) or single files / block devices.  Empty: the
  // daemon's state directory only.  Paths named in this file are allowed anyway.
  std::vector<std::string> export_roots;
  LimitsConfig limits;
  // TLS 1.3 (docs/security.md): the DST listener then speaks only TLS, and dsts:// volumes and
  // legs use it.  A PSK file (identity:hexkey lines; the client offers tls_identity, default the
  // first line) or X.509 (tls_cert, tls_key, tls_ca; tls_server_name pins the name dsts://
  // servers must carry, default the host of the URI).
  std::string tls_psk_file;
  std::string tls_identity;
  std::string tls_cert, tls_key, tls_ca, tls_server_name;
  // NBD STARTTLS ([daemon] nbd_tls, docs/nbd.md "TLS"): "require" (the default with TLS keys),
  // "allow" (plain-text clients too) or "off" (the default without keys).  "" = the default.
  std::string nbd_tls;
  // Serve DST without TLS, or NBD without nbd_tls = "require", on a non-loopback address
  // (refused otherwise).
  bool insecure = false;
  // Raw Ethernet (docs/protocol.md §12): the exporter also accepts DST sessions on these
  // interfaces, and eth:// volumes and legs dial out of them.  Frames are sealed with keys from
  // tls_psk_file; without one, insecure_segment = true must say that the segment is trusted.
  std::vector<std::string> eth_interfaces;
  bool insecure_segment = false;
  bool tls() const { return !tls_psk_file.empty() || !tls_cert.empty(); }
  std::string nbd_tls_mode() const { return !nbd_tls.empty() ? nbd_tls : tls() ? "require" : "off"; }
  std::vector<ExportConfig> exports;
  std::vector<VolumeConfig> volumes;
  std::vector<ArrayConfig> arrays;
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
// "dst://host[:port]/export" (default port 7400; net/uri.h, export a valid name).
Status ParseVolumeUri(std::string_view uri, std::string* host, std::uint16_t* port,
                      std::string* export_name);
// A volume's remote: dst:// as above, or nbd:// / nbd+unix:// (net/uri.h).  Sets v->remote and
// the parsed host, port and export_name.
Status ParseVolumeRemote(std::string_view uri, VolumeConfig* v);
// File permission bits in octal: "0600", "640", "0o640"; at most 0777.
Result<std::uint32_t> ParseFileMode(std::string_view s);
// A file owner: "user" (and that user's group), "user:group", numeric "uid[:gid]".  Names are
// looked up in the system's user database.
Status ParseOwner(std::string_view s, std::int64_t* uid, std::int64_t* gid);
// A rate: "0" (unlimited), "500K", "10M", "1G" (bytes/s, binary units), or plain bytes.
Result<std::uint64_t> ParseRate(std::string_view s);
// A duration: "7d", "12h", "30m", "90s", "2w" or plain seconds ("3600"); "0" = none.
Result<std::uint64_t> ParseDuration(std::string_view s);
// Checks the cross references of exports, volumes and arrays: leg and export references name
// existing volumes/arrays, no array stacks on itself, no leg is used twice, names are unique
// between volumes and arrays (arrays are volumes too).
Status ValidateTopology(const Config& cfg);

// A layer key's value from user text ("64K", "true", "12") as the canonical text the layer
// registry checks (sizes in bytes).
Result<std::string> ParseLayerValue(const LayerKey& key, std::string_view text);

// Paths a control client may name (docs/security.md "Local hardening").  `roots` and `named`
// are canonical (CanonicalPath).
struct PathPolicy {
  std::vector<std::string> roots;  // directories, or exact files / block devices
  std::vector<std::string> named;  // paths named in the config file (always allowed)
};
// realpath(3) of `path`; for a file that does not exist yet, realpath of its directory plus its
// name (which must not be "." or "..").  So ".." and symlinks cannot lead out of a root.
Result<std::string> CanonicalPath(const std::string& path);
// OK when `path` resolves to a root, below a directory root, or to a named path; otherwise
// InvalidArgument whose message names export_roots.
Status CheckPathAllowed(const PathPolicy& policy, const std::string& path);
// The policy for `cfg` with `state_dir` as the default root.  Roots that do not resolve are
// left out (and reported in *skipped).
PathPolicy MakePathPolicy(const Config& cfg, const std::string& state_dir,
                          std::vector<std::string>* skipped = nullptr);

// A listener other hosts can reach (listen, nbd_listen) needs TLS or insecure = true
// (docs/security.md).  *key names the offending key.
Status CheckListenSecurity(const Config& cfg, std::string* key = nullptr);
// True for 127.0.0.0/8, ::1 and "localhost": addresses only this host can reach.
bool IsLoopbackHost(std::string_view host);
// dst:// or dsts:// (TLS).
bool IsDstUri(std::string_view uri);

// Export and volume names: 1..64 chars of [A-Za-z0-9._-], not starting with '.'.
bool ValidName(std::string_view name);

}  // namespace dst::daemon
