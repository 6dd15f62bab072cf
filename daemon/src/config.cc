#include "dst/daemon/config.h"

#include <grp.h>
#include <pwd.h>
#include <arpa/inet.h>

#include <sys/stat.h>

#include <cerrno>
#include <climits>
#include <cstdlib>

#include <algorithm>
#include <charconv>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>

#include <fmt/format.h>
#include <toml++/toml.h>

#include "dst/layer.h"
#include "dst/net/uri.h"

namespace dst::daemon {

namespace {

constexpr std::uint64_t kMaxSize = std::uint64_t{1} << 60;  // 1 EiB: anything above is a typo

// Builds "<file>:<line>: <where>: <key>: <problem>".
class ErrorSink {
 public:
  explicit ErrorSink(const std::string& source) : source_(source) {}
  Status Error(const toml::source_region& where, std::string_view ctx, std::string_view key,
               std::string_view problem) const {
    std::string m = source_;
    if (where.begin.line > 0) m += fmt::format(":{}", where.begin.line);
    m += ": ";
    if (!ctx.empty()) m += fmt::format("{}: ", ctx);
    if (!key.empty()) m += fmt::format("{}: ", key);
    m += problem;
    return Status::InvalidArgument(m);
  }

 private:
  const std::string& source_;
};

const char* TypeName(const toml::node& n) {
  switch (n.type()) {
    case toml::node_type::string: return "a string";
    case toml::node_type::integer: return "an integer";
    case toml::node_type::floating_point: return "a float";
    case toml::node_type::boolean: return "a boolean";
    case toml::node_type::table: return "a table";
    case toml::node_type::array: return "an array";
    default: return "a date/time";
  }
}

// Typed field readers: each fails with "<key>: expected X, got Y".
struct Fields {
  const ErrorSink& sink;
  std::string ctx;

  Status String(const toml::node& n, std::string_view key, std::string* out) const {
    if (!n.is_string())
      return sink.Error(n.source(), ctx, key, fmt::format("expected a string, got {}", TypeName(n)));
    *out = *n.value<std::string>();
    if (out->empty()) return sink.Error(n.source(), ctx, key, "must not be empty");
    return Status::OK();
  }
  Status Bool(const toml::node& n, std::string_view key, bool* out) const {
    if (!n.is_boolean())
      return sink.Error(n.source(), ctx, key,
                        fmt::format("expected true or false, got {}", TypeName(n)));
    *out = *n.value<bool>();
    return Status::OK();
  }
  Status UInt(const toml::node& n, std::string_view key, std::uint64_t lo, std::uint64_t hi,
              std::uint32_t* out) const {
    if (!n.is_integer())
      return sink.Error(n.source(), ctx, key,
                        fmt::format("expected an integer, got {}", TypeName(n)));
    std::int64_t v = *n.value<std::int64_t>();
    if (v < std::int64_t(lo) || std::uint64_t(v) > hi)
      return sink.Error(n.source(), ctx, key,
                        fmt::format("{} is out of range ({}..{})", v, lo, hi));
    *out = std::uint32_t(v);
    return Status::OK();
  }
  // Seconds as an integer, or a duration string like "7d" (ParseDuration).
  Status Duration(const toml::node& n, std::string_view key, std::uint64_t* out) const {
    if (n.is_integer() && *n.value<std::int64_t>() >= 0) {
      *out = std::uint64_t(*n.value<std::int64_t>());
      return Status::OK();
    }
    if (!n.is_string())
      return sink.Error(n.source(), ctx, key,
                        fmt::format("expected a duration like \"7d\" or seconds, got {}", TypeName(n)));
    auto r = ParseDuration(*n.value<std::string>());
    if (!r.ok()) return sink.Error(n.source(), ctx, key, r.status().message());
    *out = r.value();
    return Status::OK();
  }
  // DST payload digests (docs/protocol.md §4.1): "xxh3" or "none".
  Status Checksum(const toml::node& n, std::string_view key, std::string* out) const {
    DST_RETURN_IF_ERROR(String(n, key, out));
    if (*out != "xxh3" && *out != "none")
      return sink.Error(n.source(), ctx, key, "expected \"xxh3\" or \"none\"");
    return Status::OK();
  }
  // A layer's own key (dst/layer.h) as canonical text: TOML integers and booleans as such,
  // strings through ParseLayerValue ("64K").
  Status LayerValue(const toml::node& n, const LayerKey& key, std::string* out) const {
    if (key.type == LayerKey::Type::kSize) {
      std::uint64_t v = 0;
      DST_RETURN_IF_ERROR(Size(n, key.name, &v));
      *out = std::to_string(v);
      return Status::OK();
    }
    if (key.type == LayerKey::Type::kBool) {
      bool b = false;
      DST_RETURN_IF_ERROR(Bool(n, key.name, &b));
      *out = b ? "true" : "false";
      return Status::OK();
    }
    if ((key.type == LayerKey::Type::kUInt || key.type == LayerKey::Type::kRate) &&
        n.is_integer() && *n.value<std::int64_t>() >= 0) {
      *out = std::to_string(*n.value<std::int64_t>());
      return Status::OK();
    }
    if (!n.is_string())
      return sink.Error(n.source(), ctx, key.name,
                        fmt::format("expected {}, got {}", LayerKeyTypeName(key.type), TypeName(n)));
    auto r = ParseLayerValue(key, *n.value<std::string>());
    if (!r.ok()) return sink.Error(n.source(), ctx, key.name, r.status().message());
    *out = std::move(r.value());
    return Status::OK();
  }
  Status Size(const toml::node& n, std::string_view key, std::uint64_t* out) const {
    if (n.is_integer()) {
      std::int64_t v = *n.value<std::int64_t>();
      if (v <= 0 || v % 512 != 0)
        return sink.Error(n.source(), ctx, key,
                          fmt::format("bad size {} (must be a positive multiple of 512 bytes)", v));
      *out = std::uint64_t(v);
      return Status::OK();
    }
    if (!n.is_string())
      return sink.Error(n.source(), ctx, key,
                        fmt::format("expected a size like \"1G\", got {}", TypeName(n)));
    auto r = ParseSize(*n.value<std::string>());
    if (!r.ok()) return sink.Error(n.source(), ctx, key, r.status().message());
    *out = r.value();
    return Status::OK();
  }
};

// ", chunk" for the allowed-keys hint of an array of this layer.
std::string LayerKeyList(const LayerInfo& layer) {
  std::string s;
  for (const LayerKey& k : layer.keys) s += ", " + k.name;
  return s;
}

Status UnknownKey(const ErrorSink& sink, const toml::key& k, std::string_view ctx,
                  std::string_view allowed) {
  return sink.Error(k.source(), ctx, k.str(),
                    fmt::format("unknown key (allowed: {})", allowed));
}

bool PathExists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

// One TLS method, complete; and no clear-text listener on an address others can reach unless
// `insecure` says so (NBD counts as clear text unless nbd_tls is "require").
Status CheckDaemonTls(const toml::table& t, const ErrorSink& sink, const Config& cfg) {
  const std::string_view ctx = "[daemon]";
  const bool x509 = !cfg.tls_cert.empty() || !cfg.tls_key.empty() || !cfg.tls_ca.empty();
  auto at = [&](const char* key) { return t.get(key) ? t.get(key)->source() : t.source(); };
  if (x509 && !cfg.tls_psk_file.empty())
    return sink.Error(at("tls_cert"), ctx, "tls_cert", "use either tls_psk_file or tls_cert/tls_key/tls_ca, not both");
  if (x509 && (cfg.tls_cert.empty() || cfg.tls_key.empty() || cfg.tls_ca.empty()))
    return sink.Error(at("tls_cert"), ctx, "tls_cert", "X.509 needs all of tls_cert, tls_key and tls_ca");
  if (cfg.nbd_tls_mode() != "off" && !cfg.tls())
    return sink.Error(at("nbd_tls"), ctx, "nbd_tls",
                      fmt::format("nbd_tls = \"{}\" needs TLS keys: set tls_psk_file (dstctl key generate) "
                                  "or tls_cert/tls_key/tls_ca",
                                  cfg.nbd_tls));
  std::string key;
  if (Status st = CheckListenSecurity(cfg, &key); !st.ok())
    return sink.Error(at(key.c_str()), ctx, key, st.message());
  return Status::OK();
}

}  // namespace

Status CheckListenSecurity(const Config& cfg, std::string* key) {
  if (!cfg.insecure && !cfg.tls() && !IsLoopbackHost(cfg.listen_host)) {
    if (key) *key = "listen";
    return Status::InvalidArgument(
        fmt::format("{} is reachable from other hosts and TLS is not configured: set tls_psk_file "
                    "(dstctl key generate) or tls_cert/tls_key/tls_ca, or insecure = true to serve "
                    "DST in the clear",
                    cfg.listen_host));
  }
  if (!cfg.insecure && cfg.nbd_enabled && !IsLoopbackHost(cfg.nbd_host) && cfg.nbd_tls_mode() != "require") {
    if (key) *key = "nbd_listen";
    return Status::InvalidArgument(fmt::format(
        "{} is reachable from other hosts and NBD would serve clients without TLS (nbd_tls = \"{}\"): "
        "set tls_psk_file or tls_cert/tls_key/tls_ca with nbd_tls = \"require\" (the default with "
        "keys), listen on 127.0.0.1, or set insecure = true to serve NBD in the clear",
        cfg.nbd_host, cfg.nbd_tls_mode()));
  }
  // The metrics endpoint is plain HTTP: it names exports, arrays and peers, so others may
  // read it only when the operator says so.
  if (!cfg.insecure && cfg.metrics_enabled && !IsLoopbackHost(cfg.metrics_host)) {
    if (key) *key = "metrics_listen";
    return Status::InvalidArgument(fmt::format(
        "{} is reachable from other hosts and the metrics endpoint is plain HTTP (it names exports, "
        "arrays and peers): listen on 127.0.0.1 and scrape through a tunnel, or set insecure = true",
        cfg.metrics_host));
  }
  return Status::OK();
}

namespace {

Status ParseDaemon(const toml::table& t, const ErrorSink& sink, Config* cfg) {
  Fields f{sink, "[daemon]"};
  for (auto&& [k, v] : t) {
    std::string_view key = k.str();
    if (key == "listen") {
      std::string s;
      DST_RETURN_IF_ERROR(f.String(v, key, &s));
      Status st = ParseListen(s, &cfg->listen_host, &cfg->listen_port);
      if (!st.ok()) return sink.Error(v.source(), f.ctx, key, st.message());
    } else if (key == "mountpoint") {
      DST_RETURN_IF_ERROR(f.String(v, key, &cfg->mountpoint));
      if (cfg->mountpoint[0] != '/')
        return sink.Error(v.source(), f.ctx, key,
                          fmt::format("\"{}\" must be an absolute path", cfg->mountpoint));
    } else if (key == "batching") {
      DST_RETURN_IF_ERROR(f.Bool(v, key, &cfg->batching));
    } else if (key == "fuse_allow_other") {
      DST_RETURN_IF_ERROR(f.Bool(v, key, &cfg->fuse_allow_other));
    } else if (key == "io_threads") {
      DST_RETURN_IF_ERROR(f.UInt(v, key, 1, 64, &cfg->io_threads));
    } else if (key == "host_name") {
      DST_RETURN_IF_ERROR(f.String(v, key, &cfg->host_name));
    } else if (key == "nbd_listen") {
      // "" disables the NBD server; otherwise HOST:PORT like listen (port 0 = any free port).
      cfg->nbd_listen_set = true;
      if (v.is_string() && v.value<std::string>()->empty()) {
        cfg->nbd_enabled = false;
      } else {
        std::string s;
        DST_RETURN_IF_ERROR(f.String(v, key, &s));
        Status st = ParseListen(s, &cfg->nbd_host, &cfg->nbd_port);
        if (!st.ok()) return sink.Error(v.source(), f.ctx, key, st.message());
        cfg->nbd_enabled = true;
      }
    } else if (key == "metrics_listen") {
      std::string s;
      DST_RETURN_IF_ERROR(f.String(v, key, &s));
      if (s.empty()) {
        cfg->metrics_enabled = false;
      } else {
        Status st = ParseListen(s, &cfg->metrics_host, &cfg->metrics_port);
        if (!st.ok()) return sink.Error(v.source(), f.ctx, key, st.message());
        cfg->metrics_enabled = true;
      }
    } else if (key == "verify_interval") {
      DST_RETURN_IF_ERROR(f.Duration(v, key, &cfg->verify_interval_s));
    } else if (key == "export_roots") {
      if (!v.is_array())
        return sink.Error(v.source(), f.ctx, key,
                          fmt::format("expected an array of absolute paths, got {}", TypeName(v)));
      for (auto&& e : *v.as_array()) {
        std::string root;
        DST_RETURN_IF_ERROR(f.String(e, key, &root));
        if (root[0] != '/')
          return sink.Error(e.source(), f.ctx, key,
                            fmt::format("\"{}\" must be an absolute path", root));
        cfg->export_roots.push_back(root);
      }
    } else if (key == "tls_psk_file" || key == "tls_cert" || key == "tls_key" || key == "tls_ca") {
      std::string* out = key == "tls_psk_file" ? &cfg->tls_psk_file
                         : key == "tls_cert"   ? &cfg->tls_cert
                         : key == "tls_key"    ? &cfg->tls_key
                                               : &cfg->tls_ca;
      DST_RETURN_IF_ERROR(f.String(v, key, out));
      if (out->empty() || (*out)[0] != '/')
        return sink.Error(v.source(), f.ctx, key, fmt::format("\"{}\" must be an absolute path", *out));
    } else if (key == "tls_identity") {
      DST_RETURN_IF_ERROR(f.String(v, key, &cfg->tls_identity));
    } else if (key == "tls_server_name") {
      DST_RETURN_IF_ERROR(f.String(v, key, &cfg->tls_server_name));
    } else if (key == "nbd_tls") {
      DST_RETURN_IF_ERROR(f.String(v, key, &cfg->nbd_tls));
      if (cfg->nbd_tls != "require" && cfg->nbd_tls != "allow" && cfg->nbd_tls != "off")
        return sink.Error(v.source(), f.ctx, key,
                          fmt::format("\"{}\": expected \"require\", \"allow\" or \"off\"", cfg->nbd_tls));
    } else if (key == "insecure") {
      DST_RETURN_IF_ERROR(f.Bool(v, key, &cfg->insecure));
    } else if (key == "insecure_segment") {
      DST_RETURN_IF_ERROR(f.Bool(v, key, &cfg->insecure_segment));
    } else if (key == "eth_interfaces") {
      if (!v.is_array())
        return sink.Error(v.source(), f.ctx, key,
                          fmt::format("expected an array of interface names, got {}", TypeName(v)));
      for (auto&& e : *v.as_array()) {
        std::string ifname;
        DST_RETURN_IF_ERROR(f.String(e, key, &ifname));
        if (ifname.empty() || ifname.size() > 15 || ifname.find_first_of("/: ") != std::string::npos)
          return sink.Error(e.source(), f.ctx, key, fmt::format("\"{}\" is not an interface name", ifname));
        cfg->eth_interfaces.push_back(ifname);
      }
      // (keys are read in file order, so look the other two up directly)
      if (!t.get("tls_psk_file") && !t["insecure_segment"].value_or(false))
        return sink.Error(v.source(), f.ctx, key,
                          "raw Ethernet needs keys: set tls_psk_file (dstctl key generate), or insecure_segment = "
                          "true to run DST on the segment unencrypted");
    } else {
      return UnknownKey(sink, k, f.ctx,
                        "listen, nbd_listen, metrics_listen, mountpoint, fuse_allow_other, batching, io_threads, "
                        "verify_interval, host_name, export_roots, tls_psk_file, tls_identity, "
                        "tls_cert, tls_key, tls_ca, tls_server_name, nbd_tls, insecure, eth_interfaces, "
                        "insecure_segment");
    }
  }
  return CheckDaemonTls(t, sink, *cfg);
}

Status ParseExport(const toml::table& t, std::size_t index, const ErrorSink& sink,
                   const ParseOptions& opts, ExportConfig* e) {
  Fields f{sink, fmt::format("[[export]] #{}", index + 1)};
  // Name first, so later messages can say which export.
  if (auto* n = t.get("name")) {
    DST_RETURN_IF_ERROR(f.String(*n, "name", &e->name));
    if (!ValidName(e->name))
      return sink.Error(n->source(), f.ctx, "name",
                        fmt::format("bad name \"{}\" (1-64 of A-Z a-z 0-9 . _ -)", e->name));
    f.ctx = fmt::format("export \"{}\"", e->name);
  } else {
    return sink.Error(t.source(), f.ctx, "name", "missing");
  }
  bool have_path = false;
  for (auto&& [k, v] : t) {
    std::string_view key = k.str();
    if (key == "name") {
      continue;
    } else if (key == "path") {
      DST_RETURN_IF_ERROR(f.String(v, key, &e->path));
      have_path = true;
    } else if (key == "array" || key == "volume") {
      std::string* dst = key == "array" ? &e->array : &e->volume;
      DST_RETURN_IF_ERROR(f.String(v, key, dst));
      if (!ValidName(*dst))
        return sink.Error(v.source(), f.ctx, key, fmt::format("bad name \"{}\"", *dst));
    } else if (key == "size") {
      DST_RETURN_IF_ERROR(f.Size(v, key, &e->size));
    } else if (key == "read_only") {
      DST_RETURN_IF_ERROR(f.Bool(v, key, &e->read_only));
    } else if (key == "direct_io") {
      DST_RETURN_IF_ERROR(f.Bool(v, key, &e->direct_io));
    } else if (key == "grow") {
      DST_RETURN_IF_ERROR(f.Bool(v, key, &e->grow));
    } else if (key == "allow") {
      const toml::array* arr = v.as_array();
      std::vector<std::string> rules;
      for (std::size_t i = 0; arr && i < arr->size(); ++i)
        if (auto r = (*arr)[i].value<std::string>()) rules.push_back(*r);
      if (!arr || rules.size() != arr->size())
        return sink.Error(v.source(), f.ctx, key,
                          "expected a list of \"identity:rw\" / \"identity:ro\" strings");
      auto l = net::ParseAccessList(rules);
      if (!l.ok()) return sink.Error(v.source(), f.ctx, key, l.status().message());
      e->allow = std::move(l.value());
    } else {
      return UnknownKey(sink, k, f.ctx,
                        "name, path, array, volume, size, grow, read_only, direct_io, allow");
    }
  }
  int sources = int(have_path) + int(!e->array.empty()) + int(!e->volume.empty());
  if (sources == 0)
    return sink.Error(t.source(), f.ctx, "path", "missing (give one of path, array, volume)");
  if (sources > 1)
    return sink.Error(t.source(), f.ctx, "path/array/volume", "give only one of them");
  if (!have_path) {
    // Name the key that is there: `grow = true` alone has no size node (fuzz_config found it).
    for (const char* key : {"size", "grow"})
      if (const toml::node* n = t[key].node(); n && (e->size != 0 || e->grow))
        return sink.Error(n->source(), f.ctx, key,
                          "only valid with path (an array or volume has its own size)");
    return Status::OK();
  }
  if (opts.check_files && e->size == 0 && !PathExists(e->path))
    return sink.Error(t["path"].node()->source(), f.ctx, "path",
                      fmt::format("\"{}\" does not exist and no size is given to create it",
                                  e->path));
  if (e->grow && e->size == 0)
    return sink.Error(t["grow"].node()->source(), f.ctx, "grow", "needs a size to grow to");
  // An image is never shrunk; growing one with data in it is explicit (grow = true).
  struct stat st;
  if (opts.check_files && e->size != 0 && ::stat(e->path.c_str(), &st) == 0 &&
      S_ISREG(st.st_mode) && st.st_size != 0 && std::uint64_t(st.st_size) != e->size) {
    const bool smaller = e->size < std::uint64_t(st.st_size);
    if (smaller || !e->grow)
      return sink.Error(t["size"].node()->source(), f.ctx, "size",
                        fmt::format("{} is {} bytes and size is {} bytes: {}", e->path,
                                    st.st_size, e->size,
                                    smaller ? "an image is never shrunk"
                                            : "set grow = true to grow it"));
  }
  return Status::OK();
}

Status ParseVolume(const toml::table& t, std::size_t index, const ErrorSink& sink,
                   const ParseOptions& opts, VolumeConfig* vol) {
  Fields f{sink, fmt::format("[[volume]] #{}", index + 1)};
  if (auto* n = t.get("name")) {
    DST_RETURN_IF_ERROR(f.String(*n, "name", &vol->name));
    if (!ValidName(vol->name))
      return sink.Error(n->source(), f.ctx, "name",
                        fmt::format("bad name \"{}\" (1-64 of A-Z a-z 0-9 . _ -)", vol->name));
    f.ctx = fmt::format("volume \"{}\"", vol->name);
  } else {
    return sink.Error(t.source(), f.ctx, "name", "missing");
  }
  for (auto&& [k, v] : t) {
    std::string_view key = k.str();
    if (key == "name") {
      continue;
    } else if (key == "remote") {
      DST_RETURN_IF_ERROR(f.String(v, key, &vol->remote));
      Status st = ParseVolumeRemote(vol->remote, vol);
      if (!st.ok()) return sink.Error(v.source(), f.ctx, key, st.message());
    } else if (key == "path") {
      DST_RETURN_IF_ERROR(f.String(v, key, &vol->path));
    } else if (key == "queue_depth") {
      DST_RETURN_IF_ERROR(f.UInt(v, key, 1, 1024, &vol->queue_depth));
    } else if (key == "io_timeout") {
      DST_RETURN_IF_ERROR(f.UInt(v, key, 1, 86400, &vol->io_timeout_s));
    } else if (key == "keepalive_timeout") {
      DST_RETURN_IF_ERROR(f.UInt(v, key, 1, 3600, &vol->keepalive_timeout_s));
    } else if (key == "checksum") {
      DST_RETURN_IF_ERROR(f.Checksum(v, key, &vol->checksum));
    } else if (key == "mode") {
      std::string m;
      DST_RETURN_IF_ERROR(f.String(v, key, &m));
      auto r = ParseFileMode(m);
      if (!r.ok()) return sink.Error(v.source(), f.ctx, key, r.status().message());
      vol->mode = r.value();
    } else if (key == "owner") {
      std::string o;
      DST_RETURN_IF_ERROR(f.String(v, key, &o));
      if (Status st = ParseOwner(o, &vol->owner_uid, &vol->owner_gid); !st.ok())
        return sink.Error(v.source(), f.ctx, key, st.message());
    } else {
      return UnknownKey(sink, k, f.ctx,
                        "name, remote, path, queue_depth, io_timeout, keepalive_timeout, checksum, "
                        "mode, owner");
    }
  }
  if (vol->remote.empty() == vol->path.empty())
    return sink.Error(t.source(), f.ctx, "remote/path",
                      vol->remote.empty() ? "one of remote or path is required"
                                          : "give either remote or path, not both");
  if (opts.check_files && !vol->path.empty() && !PathExists(vol->path))
    return sink.Error(t["path"].node()->source(), f.ctx, "path",
                      fmt::format("\"{}\" does not exist", vol->path));
  return Status::OK();
}

Status ParseLimits(const toml::table& t, const ErrorSink& sink, LimitsConfig* l) {
  Fields f{sink, "[limits]"};
  const std::pair<std::string_view, std::uint64_t*> durations[] = {
      {"handshake_timeout", &l->handshake_timeout_s},
      {"idle_timeout", &l->idle_timeout_s},
      {"nbd_idle_timeout", &l->nbd_idle_timeout_s},
      {"stall_timeout", &l->stall_timeout_s},
      {"drain_window", &l->drain_window_s},
  };
  // Counts and byte sizes with their ranges (the servers clamp the NBD ones to the spec's).
  struct Count {
    std::string_view key;
    std::uint32_t* out;
    std::uint64_t lo, hi;
  };
  const Count counts[] = {
      {"max_connections", &l->max_connections, 0, 1000000},
      {"max_connections_per_address", &l->max_connections_per_address, 0, 1000000},
      {"max_connections_per_identity", &l->max_connections_per_identity, 0, 1000000},
      {"min_drain_rate", &l->min_drain_rate, 0, 1u << 30},
      {"nbd_max_option_length", &l->nbd_max_option_length, 512, 16384},
      {"nbd_max_options", &l->nbd_max_options, 1, 4096},
      {"nbd_max_meta_queries", &l->nbd_max_meta_queries, 1, 128},
      {"nbd_max_meta_query_length", &l->nbd_max_meta_query_length, 1, 4096},
  };
  for (auto&& [k, v] : t) {
    std::string_view key = k.str();
    bool known = false;
    for (auto& [name, out] : durations)
      if (key == name) {
        DST_RETURN_IF_ERROR(f.Duration(v, key, out));
        known = true;
      }
    for (auto& c : counts)
      if (key == c.key) {
        DST_RETURN_IF_ERROR(f.UInt(v, key, c.lo, c.hi, c.out));
        known = true;
      }
    if (!known) {
      std::string allowed;
      for (auto& [name, out] : durations) allowed += std::string(allowed.empty() ? "" : ", ") + std::string(name);
      for (auto& c : counts) allowed += ", " + std::string(c.key);
      return UnknownKey(sink, k, f.ctx, allowed);
    }
  }
  return Status::OK();
}

Status ParseArrayTable(const toml::table& t, std::size_t index, const ErrorSink& sink,
                       ArrayConfig* a) {
  Fields f{sink, fmt::format("[[array]] #{}", index + 1)};
  if (auto* n = t.get("name")) {
    DST_RETURN_IF_ERROR(f.String(*n, "name", &a->name));
    if (!ValidName(a->name))
      return sink.Error(n->source(), f.ctx, "name",
                        fmt::format("bad name \"{}\" (1-64 of A-Z a-z 0-9 . _ -)", a->name));
    f.ctx = fmt::format("array \"{}\"", a->name);
  } else {
    return sink.Error(t.source(), f.ctx, "name", "missing");
  }
  bool have_legs = false;
  std::vector<const toml::key*> layer_keys;
  for (auto&& [k, v] : t) {
    std::string_view key = k.str();
    if (key == "name") {
      continue;
    } else if (key == "level") {
      DST_RETURN_IF_ERROR(f.String(v, key, &a->level));
      if (!FindLayer(a->level))
        return sink.Error(v.source(), f.ctx, key,
                          fmt::format("unknown level \"{}\" ({})", a->level, LayerNames()));
    } else if (key == "legs") {
      const toml::array* arr = v.as_array();
      if (!arr)
        return sink.Error(v.source(), f.ctx, key,
                          fmt::format("expected an array of strings, got {}", TypeName(v)));
      have_legs = true;
      for (auto& el : *arr) {
        std::string spec;
        DST_RETURN_IF_ERROR(f.String(el, key, &spec));
        LegSpec ls;
        if (Status st = ParseLegSpec(spec, &ls); !st.ok())
          return sink.Error(el.source(), f.ctx, key, st.message());
        for (auto& other : a->legs)
          if (other == ls.text)
            return sink.Error(el.source(), f.ctx, key,
                              fmt::format("leg \"{}\" is listed twice", spec));
        a->legs.push_back(ls.text);
      }
    } else if (key == "leg_timeout") {
      DST_RETURN_IF_ERROR(f.UInt(v, key, 1, 86400, &a->leg_timeout_s));
    } else if (key == "verify_interval") {
      std::uint64_t secs = 0;
      DST_RETURN_IF_ERROR(f.Duration(v, key, &secs));
      a->verify_interval_s = std::int64_t(secs);
    } else if (key == "checksum") {
      DST_RETURN_IF_ERROR(f.Checksum(v, key, &a->checksum));
    } else {
      layer_keys.push_back(&k);  // the layer's own keys: judged once the level is known
    }
  }
  const LayerInfo* layer = FindLayer(a->level);
  if (!layer) return sink.Error(t.source(), f.ctx, "level", "missing");
  LayerParams given;
  for (const toml::key* k : layer_keys) {
    const LayerKey* lk = FindLayerKey(*layer, k->str());
    if (!lk)
      return UnknownKey(sink, *k, f.ctx,
                        fmt::format("name, level, legs, leg_timeout, verify_interval, "
                                    "checksum{}",
                                    LayerKeyList(*layer)));
    const toml::node& v = *t.get(k->str());
    DST_RETURN_IF_ERROR(f.LayerValue(v, *lk, &given[lk->name]));
  }
  auto params = ResolveLayerParams(*layer, given);
  if (!params.ok()) {
    // The layer names the key first ("chunk: ..."): point at its line.
    const std::string& m = params.status().message();
    for (const toml::key* k : layer_keys)
      if (m.rfind(std::string(k->str()) + ":", 0) == 0)
        return sink.Error(t.get(k->str())->source(), f.ctx, "", m);
    return sink.Error(t.source(), f.ctx, "", m);
  }
  a->params = std::move(params.value());
  if (!have_legs) return sink.Error(t.source(), f.ctx, "legs", "missing");
  if (Status st = CheckLegCount(*layer, a->legs.size()); !st.ok())
    return sink.Error(t["legs"].node()->source(), f.ctx, "legs", st.message());
  return Status::OK();
}

// Iterates an array of tables ([[export]] / [[volume]] / [[array]]).
template <typename T, typename Fn>
Status ParseArray(const toml::node& n, std::string_view key, const ErrorSink& sink,
                  std::vector<T>* out, Fn&& parse_one) {
  const toml::array* arr = n.as_array();
  if (!arr || !arr->is_array_of_tables())
    return sink.Error(n.source(), "", key,
                      fmt::format("must be written as [[{}]] tables", key));
  std::set<std::string> names;
  for (std::size_t i = 0; i < arr->size(); ++i) {
    T item;
    DST_RETURN_IF_ERROR(parse_one(*(*arr)[i].as_table(), i, &item));
    if (!names.insert(item.name).second)
      return sink.Error((*arr)[i].source(), fmt::format("{} \"{}\"", key, item.name), "name",
                        "duplicate name");
    out->push_back(std::move(item));
  }
  return Status::OK();
}

}  // namespace


bool ValidName(std::string_view name) {
  if (name.empty() || name.size() > 64 || name[0] == '.') return false;
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

Result<std::uint64_t> ParseSize(std::string_view s) {
  auto bad = [&](std::string_view why) {
    return Status::InvalidArgument(fmt::format("bad size \"{}\" ({})", s, why));
  };
  if (s.empty()) return bad("empty");
  std::uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p == s.data())
    return bad("bytes, or a number with K, M, G or T");
  std::string_view unit(p, s.data() + s.size() - p);
  unsigned shift = 0;
  if (!unit.empty()) {
    switch (unit[0]) {
      case 'k': case 'K': shift = 10; break;
      case 'm': case 'M': shift = 20; break;
      case 'g': case 'G': shift = 30; break;
      case 't': case 'T': shift = 40; break;
      default: return bad("bytes, or a number with K, M, G or T");
    }
    std::string_view rest = unit.substr(1);
    if (!(rest.empty() || rest == "B" || rest == "iB"))
      return bad("bytes, or a number with K, M, G or T");
  }
  if (v == 0) return bad("must be positive");
  if (v > (kMaxSize >> shift)) return bad("too large");
  v <<= shift;
  if (v % 512 != 0) return bad("must be a multiple of 512 bytes");
  return v;
}

Status ParseListen(std::string_view s, std::string* host, std::uint16_t* port) {
  auto bad = [&](std::string_view why) {
    return Status::InvalidArgument(fmt::format("bad address \"{}\" ({})", s, why));
  };
  std::size_t colon = s.rfind(':');
  if (colon == std::string_view::npos) return bad("expected HOST:PORT");
  std::string_view h = s.substr(0, colon);
  std::string_view p = s.substr(colon + 1);
  if (h.size() >= 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  else if (h.find(':') != std::string_view::npos) return bad("write IPv6 addresses as [ADDR]:PORT");
  if (h.empty()) return bad("empty host");
  unsigned v = 0;
  auto [e, ec] = std::from_chars(p.data(), p.data() + p.size(), v);
  if (p.empty() || ec != std::errc() || e != p.data() + p.size() || v > 65535)
    return bad("port must be 0..65535");
  *host = std::string(h);
  *port = std::uint16_t(v);
  return Status::OK();
}

Status ParseVolumeUri(std::string_view uri, std::string* host, std::uint16_t* port,
                      std::string* export_name) {
  net::BlockUri u;
  DST_RETURN_IF_ERROR(net::ParseBlockUri(uri, &u));
  if (u.scheme != net::UriScheme::kDst)
    return Status::InvalidArgument(fmt::format("bad URI \"{}\": expected dst[s]://HOST[:PORT]/EXPORT", uri));
  if (!ValidName(u.export_name))
    return Status::InvalidArgument(fmt::format("bad URI \"{}\": bad export name", uri));
  *host = u.host;
  *port = u.port;
  *export_name = u.export_name;
  return Status::OK();
}

bool IsLoopbackHost(std::string_view host) {
  if (host == "localhost" || host == "::1" || host == "[::1]") return true;
  unsigned char a[4];
  const std::string h(host);
  if (::inet_pton(AF_INET, h.c_str(), a) == 1) return a[0] == 127;
  return false;
}

bool IsDstUri(std::string_view uri) {
  return uri.rfind("dst://", 0) == 0 || uri.rfind("dsts://", 0) == 0 || uri.rfind("eth://", 0) == 0;
}

Status ParseVolumeRemote(std::string_view uri, VolumeConfig* v) {
  if (IsDstUri(uri)) {
    DST_RETURN_IF_ERROR(ParseVolumeUri(uri, &v->host, &v->port, &v->export_name));
  } else {
    net::BlockUri u;
    DST_RETURN_IF_ERROR(net::ParseBlockUri(uri, &u));
    v->host = u.host;
    v->port = u.port;
    v->export_name = u.export_name;
  }
  v->remote = std::string(uri);
  return Status::OK();
}

Result<Config> ParseConfig(std::string_view text, const std::string& source,
                           const ParseOptions& opts) {
  ErrorSink sink(source);
  toml::table root;
  try {
    root = toml::parse(text, source);
  } catch (const toml::parse_error& e) {
    return sink.Error(e.source(), "", "", fmt::format("TOML syntax: {}", e.description()));
  }
  Config cfg;
  for (auto&& [k, v] : root) {
    std::string_view key = k.str();
    if (key == "daemon") {
      if (!v.is_table()) return sink.Error(v.source(), "", key, "must be a [daemon] table");
      DST_RETURN_IF_ERROR(ParseDaemon(*v.as_table(), sink, &cfg));
    } else if (key == "limits") {
      if (!v.is_table()) return sink.Error(v.source(), "", key, "must be a [limits] table");
      DST_RETURN_IF_ERROR(ParseLimits(*v.as_table(), sink, &cfg.limits));
    } else if (key == "export") {
      DST_RETURN_IF_ERROR(ParseArray(v, key, sink, &cfg.exports,
                                     [&](const toml::table& t, std::size_t i, ExportConfig* e) {
                                       return ParseExport(t, i, sink, opts, e);
                                     }));
    } else if (key == "volume") {
      DST_RETURN_IF_ERROR(ParseArray(v, key, sink, &cfg.volumes,
                                     [&](const toml::table& t, std::size_t i, VolumeConfig* vol) {
                                       return ParseVolume(t, i, sink, opts, vol);
                                     }));
    } else if (key == "array") {
      DST_RETURN_IF_ERROR(ParseArray(v, key, sink, &cfg.arrays,
                                     [&](const toml::table& t, std::size_t i, ArrayConfig* a) {
                                       return ParseArrayTable(t, i, sink, a);
                                     }));
    } else {
      return sink.Error(
          k.source(), "", key,
          "unknown top-level key (allowed: [daemon], [limits], [[export]], [[volume]], [[array]])");
    }
  }
  if (Status st = ValidateTopology(cfg); !st.ok())
    return Status::InvalidArgument(fmt::format("{}: {}", source, st.message()));
  return cfg;
}

Result<std::uint32_t> ParseFileMode(std::string_view s) {
  std::string_view d = s;
  if (d.size() > 2 && d[0] == '0' && (d[1] == 'o' || d[1] == 'O')) d.remove_prefix(2);
  std::uint32_t m = 0;
  auto [end, ec] = std::from_chars(d.data(), d.data() + d.size(), m, 8);
  if (d.empty() || ec != std::errc() || end != d.data() + d.size())
    return Status::InvalidArgument(fmt::format("bad mode \"{}\" (octal, e.g. \"0640\")", s));
  if (m > 0777) return Status::InvalidArgument(fmt::format("mode \"{}\" is above 0777", s));
  return m;
}

namespace {
bool AllDigits(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}
}  // namespace

Status ParseOwner(std::string_view s, std::int64_t* uid, std::int64_t* gid) {
  const auto colon = s.find(':');
  const std::string user(s.substr(0, colon));
  const std::string group(colon == std::string_view::npos ? std::string_view() : s.substr(colon + 1));
  if (user.empty() || (colon != std::string_view::npos && group.empty()))
    return Status::InvalidArgument(fmt::format("bad owner \"{}\" (user, user:group or uid:gid)", s));
  char buf[16384];
  std::int64_t primary_gid = -1;
  if (AllDigits(user)) {
    *uid = std::stoll(user);
    if (*uid > 0xfffffffeLL) return Status::InvalidArgument(fmt::format("uid {} out of range", user));
  } else {
    struct passwd pw, *res = nullptr;
    if (::getpwnam_r(user.c_str(), &pw, buf, sizeof buf, &res) != 0 || !res)
      return Status::InvalidArgument(fmt::format("no such user \"{}\"", user));
    *uid = pw.pw_uid;
    primary_gid = pw.pw_gid;
  }
  if (group.empty()) {
    *gid = primary_gid >= 0 ? primary_gid : *uid;  // a numeric uid alone: the same number
    return Status::OK();
  }
  if (AllDigits(group)) {
    *gid = std::stoll(group);
    if (*gid > 0xfffffffeLL) return Status::InvalidArgument(fmt::format("gid {} out of range", group));
    return Status::OK();
  }
  struct group gr, *gres = nullptr;
  if (::getgrnam_r(group.c_str(), &gr, buf, sizeof buf, &gres) != 0 || !gres)
    return Status::InvalidArgument(fmt::format("no such group \"{}\"", group));
  *gid = gr.gr_gid;
  return Status::OK();
}

Result<std::string> CanonicalPath(const std::string& path) {
  if (path.empty() || path[0] != '/')
    return Status::InvalidArgument(fmt::format("\"{}\" is not an absolute path", path));
  char buf[PATH_MAX];
  if (::realpath(path.c_str(), buf)) return std::string(buf);
  if (errno != ENOENT) return Status::FromErrno(errno, path);
  // Not there yet (an image dstd will create): its directory must exist.
  auto slash = path.find_last_of('/');
  std::string dir = slash == 0 ? "/" : path.substr(0, slash), name = path.substr(slash + 1);
  if (name.empty() || name == "." || name == "..")
    return Status::InvalidArgument(fmt::format("\"{}\" does not name a file", path));
  if (!::realpath(dir.c_str(), buf)) return Status::FromErrno(errno, dir);
  std::string d(buf);
  return d == "/" ? "/" + name : d + "/" + name;
}

Status CheckPathAllowed(const PathPolicy& policy, const std::string& path) {
  auto c = CanonicalPath(path);
  if (!c.ok()) return c.status();
  const std::string& p = c.value();
  for (const auto& r : policy.roots)
    if (p == r || r == "/" || (p.size() > r.size() && p.compare(0, r.size(), r) == 0 &&
                               p[r.size()] == '/'))
      return Status::OK();
  for (const auto& n : policy.named)
    if (p == n) return Status::OK();
  std::string roots;
  for (const auto& r : policy.roots) roots += (roots.empty() ? "" : ", ") + r;
  std::string shown = p == path ? path : fmt::format("{} ({})", path, p);
  return Status::InvalidArgument(fmt::format(
      "{} is outside export_roots ({}); add it or its directory to [daemon] export_roots",
      shown, roots.empty() ? "none" : roots));
}

PathPolicy MakePathPolicy(const Config& cfg, const std::string& state_dir,
                          std::vector<std::string>* skipped) {
  PathPolicy pp;
  std::vector<std::string> roots = cfg.export_roots;
  if (roots.empty()) roots.push_back(state_dir);
  for (const auto& r : roots) {
    char buf[PATH_MAX];
    if (::realpath(r.c_str(), buf))
      pp.roots.push_back(buf);
    else if (skipped)
      skipped->push_back(r);
  }
  auto name = [&](const std::string& path) {
    if (path.empty()) return;
    auto c = CanonicalPath(path);
    if (c.ok()) pp.named.push_back(c.value());
  };
  for (const auto& e : cfg.exports) name(e.path);
  for (const auto& v : cfg.volumes) name(v.path);
  for (const auto& a : cfg.arrays)
    for (const auto& leg : a.legs) {
      LegSpec ls;
      if (ParseLegSpec(leg, &ls).ok() && ls.kind == LegSpec::Kind::kPath) name(ls.ref);
    }
  return pp;
}

Result<std::uint64_t> ParseRate(std::string_view s) {
  auto bad = [&] {
    return Status::InvalidArgument(
        fmt::format("bad rate \"{}\" (bytes/s, or a number with K, M or G; 0 = unlimited)", s));
  };
  std::uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || p == s.data()) return bad();
  std::string_view unit(p, s.data() + s.size() - p);
  unsigned shift = 0;
  if (!unit.empty()) {
    switch (unit[0]) {
      case 'k': case 'K': shift = 10; break;
      case 'm': case 'M': shift = 20; break;
      case 'g': case 'G': shift = 30; break;
      default: return bad();
    }
    std::string_view rest = unit.substr(1);
    if (!(rest.empty() || rest == "B" || rest == "iB" || rest == "/s" || rest == "B/s" ||
          rest == "iB/s"))
      return bad();
  }
  if (v > (kMaxSize >> shift)) return bad();
  return v << shift;
}

Result<std::uint64_t> ParseDuration(std::string_view s) {
  auto bad = [&] {
    return Status::InvalidArgument(fmt::format(
        "bad duration \"{}\" (seconds, or a number with s, m, h, d or w; 0 = none)", s));
  };
  std::uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || p == s.data()) return bad();
  std::string_view unit(p, s.data() + s.size() - p);
  std::uint64_t mul = 1;
  if (unit == "m") mul = 60;
  else if (unit == "h") mul = 3600;
  else if (unit == "d") mul = 86400;
  else if (unit == "w") mul = 7 * 86400;
  else if (!unit.empty() && unit != "s") return bad();
  if (v > (std::uint64_t{1} << 40) / mul) return bad();  // > 34 000 years: a typo
  return v * mul;
}

Status ParseLegSpec(std::string_view spec, LegSpec* out) {
  auto bad = [&](std::string_view why) {
    return Status::InvalidArgument(fmt::format("bad leg \"{}\" ({})", spec, why));
  };
  LegSpec ls;
  ls.text = std::string(spec);
  if (IsDstUri(spec)) {
    ls.kind = LegSpec::Kind::kDst;
    std::string h, e;
    std::uint16_t port = 0;
    if (Status st = ParseVolumeUri(spec, &h, &port, &e); !st.ok()) return bad(st.message());
    ls.ref = ls.text;
  } else if (spec.rfind("nbd://", 0) == 0 || spec.rfind("nbds://", 0) == 0 || spec.rfind("nbd+unix://", 0) == 0) {
    ls.kind = LegSpec::Kind::kNbd;
    net::BlockUri u;
    if (Status st = net::ParseBlockUri(spec, &u); !st.ok()) return bad(st.message());
    ls.ref = ls.text;
  } else if (spec.rfind("volume:", 0) == 0 || spec.rfind("array:", 0) == 0) {
    bool vol = spec[0] == 'v';
    ls.kind = vol ? LegSpec::Kind::kVolume : LegSpec::Kind::kArray;
    ls.ref = std::string(spec.substr(vol ? 7 : 6));
    if (!ValidName(ls.ref)) return bad("bad name");
  } else if (!spec.empty() && spec[0] == '/') {
    ls.kind = LegSpec::Kind::kPath;
    ls.ref = ls.text;
  } else {
    return bad("expected dst://HOST[:PORT]/EXPORT, nbd://HOST[:PORT]/NAME, /ABS/PATH, "
               "volume:NAME or array:NAME");
  }
  *out = std::move(ls);
  return Status::OK();
}

Status ValidateTopology(const Config& cfg) {
  std::map<std::string, const ArrayConfig*> arrays;
  std::set<std::string> volumes;
  for (auto& v : cfg.volumes) volumes.insert(v.name);
  for (auto& a : cfg.arrays) {
    if (volumes.count(a.name))
      return Status::InvalidArgument(fmt::format(
          "array \"{}\": name is also a [[volume]] (arrays are volumes: names must differ)",
          a.name));
    arrays[a.name] = &a;
  }
  std::map<std::string, std::string> used;  // leg spec -> array using it
  for (auto& a : cfg.arrays) {
    for (auto& spec : a.legs) {
      LegSpec ls;
      DST_RETURN_IF_ERROR(ParseLegSpec(spec, &ls));
      if (ls.kind == LegSpec::Kind::kVolume && !volumes.count(ls.ref))
        return Status::InvalidArgument(fmt::format(
            "array \"{}\": leg \"{}\": no [[volume]] named \"{}\"", a.name, spec, ls.ref));
      if (ls.kind == LegSpec::Kind::kArray && !arrays.count(ls.ref))
        return Status::InvalidArgument(fmt::format(
            "array \"{}\": leg \"{}\": no [[array]] named \"{}\"", a.name, spec, ls.ref));
      auto [it, fresh] = used.emplace(spec, a.name);
      if (!fresh)
        return Status::InvalidArgument(fmt::format(
            "leg \"{}\" is used by both array \"{}\" and array \"{}\"", spec, it->second,
            a.name));
    }
  }
  // Cycles: depth-first over array:NAME references.
  std::map<std::string, int> color;  // 0 new, 1 on stack, 2 done
  std::function<Status(const std::string&, std::string)> visit =
      [&](const std::string& n, std::string path) -> Status {
    if (color[n] == 1)
      return Status::InvalidArgument(
          fmt::format("arrays stack in a cycle: {} -> {}", path, n));
    if (color[n] == 2) return Status::OK();
    color[n] = 1;
    for (auto& spec : arrays[n]->legs) {
      LegSpec ls;
      DST_RETURN_IF_ERROR(ParseLegSpec(spec, &ls));
      if (ls.kind == LegSpec::Kind::kArray)
        DST_RETURN_IF_ERROR(visit(ls.ref, path.empty() ? n : path + " -> " + n));
    }
    color[n] = 2;
    return Status::OK();
  };
  for (auto& a : cfg.arrays) DST_RETURN_IF_ERROR(visit(a.name, ""));
  for (auto& e : cfg.exports) {
    if (!e.array.empty() && !arrays.count(e.array))
      return Status::InvalidArgument(fmt::format(
          "export \"{}\": array: no [[array]] named \"{}\"", e.name, e.array));
    if (!e.volume.empty() && !volumes.count(e.volume))
      return Status::InvalidArgument(fmt::format(
          "export \"{}\": volume: no [[volume]] named \"{}\"", e.name, e.volume));
  }
  return Status::OK();
}

Result<Config> LoadConfigFile(const std::string& path, const ParseOptions& opts) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::FromErrno(errno, fmt::format("{}: cannot read", path));
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return Status::FromErrno(errno, fmt::format("{}: cannot read", path));
  return ParseConfig(ss.str(), path, opts);
}

Result<std::string> ParseLayerValue(const LayerKey& key, std::string_view text) {
  switch (key.type) {
    case LayerKey::Type::kSize: {
      auto r = ParseSize(text);
      if (!r.ok()) return r.status();
      return std::to_string(r.value());
    }
    case LayerKey::Type::kUInt: {
      std::uint64_t v = 0;
      auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
      if (text.empty() || ec != std::errc() || p != text.data() + text.size())
        return Status::InvalidArgument(fmt::format("bad integer \"{}\"", text));
      return std::to_string(v);
    }
    case LayerKey::Type::kRate: {
      auto r = ParseRate(text);
      if (!r.ok()) return r.status();
      return std::to_string(r.value());
    }
    case LayerKey::Type::kBool:
      if (text == "true" || text == "yes" || text == "1") return std::string("true");
      if (text == "false" || text == "no" || text == "0") return std::string("false");
      return Status::InvalidArgument(fmt::format("expected true or false, got \"{}\"", text));
    case LayerKey::Type::kString:
      if (text.empty()) return Status::InvalidArgument("must not be empty");
      return std::string(text);
  }
  return Status::InvalidArgument("bad layer key type");
}

}  // namespace dst::daemon
