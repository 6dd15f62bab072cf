// Persistent topology (issue 9 item 5): exports, volumes and the FUSE mount added with dstctl
// are recorded in <state-dir>/dstd.sqlite (TopologyStore's dstd_objects table) and come back
// at the next start, after the config file's own objects.
//
// Precedence (documented in dstd(8)):
//   * The config file is authoritative for the names it defines: at start its definition is
//     used; a recorded runtime object of the same name that differs is reported (a warning
//     naming both) and its record is dropped.
//   * Objects added at run time (dstctl export add, volume import, mount, or `dstctl apply`)
//     persist until removed with dstctl (export remove, volume remove, unmount).
//   * A recorded object that fails to come up at start is logged and kept (its name stays
//     reserved; removing it with dstctl forgets it); it does not stop dstd, unlike a config one.
//   * Arrays keep their own rule (their structure follows the database, see arrays.cc).
// A recorded export never carries a size: if its image vanished, the restart fails loudly
// instead of creating an empty file in its place.
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "daemon.h"
#include "dst/net/uri.h"

namespace dst::daemon {

using nlohmann::json;

namespace {

json ExportSpec(const ExportConfig& e) {
  json j{{"read_only", e.read_only}, {"direct_io", e.direct_io}, {"allow", net::FormatAccessList(e.allow)}};
  if (!e.path.empty()) j["path"] = e.path;
  if (!e.array.empty()) j["array"] = e.array;
  if (!e.volume.empty()) j["volume"] = e.volume;
  return j;
}

json VolumeSpec(const VolumeConfig& v) {
  return json{{"uri", v.remote.empty() ? v.path : v.remote},
              {"queue_depth", v.queue_depth},
              {"io_timeout", v.io_timeout_s},
              {"keepalive_timeout", v.keepalive_timeout_s}};
}

std::string Str(const json& j, const char* k) {
  auto it = j.find(k);
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
}

std::uint32_t U32(const json& j, const char* k, std::uint32_t def) {
  auto it = j.find(k);
  return it != j.end() && it->is_number_unsigned() ? it->get<std::uint32_t>() : def;
}

bool Bool(const json& j, const char* k) {
  auto it = j.find(k);
  return it != j.end() && it->is_boolean() && it->get<bool>();
}

}  // namespace

Status Daemon::OpenTopology() {
  if (topo_) return Status::OK();
  std::string db = opts_.state_dir + "/dstd.sqlite";
  auto tp = TopologyStore::Open(db);
  if (!tp.ok()) return tp.status().WithContext(db);
  topo_ = std::move(tp.value());
  return Status::OK();
}

Daemon::RuntimeObjects Daemon::LoadRuntimeObjects() {
  RuntimeObjects rt;
  if (!topo_) return rt;
  Result<std::vector<TopologyStore::Object>> objs = [&] {
    std::lock_guard<std::mutex> l(topo_mu_);
    return topo_->ListObjects();
  }();
  if (!objs.ok()) {
    spdlog::error("cannot read recorded exports/volumes: {}", objs.status().message());
    return rt;
  }
  for (auto& o : objs.value()) {
    json j = json::parse(o.spec, nullptr, false);
    if (!j.is_object()) continue;
    if (o.kind == "export") {
      ExportConfig e;
      e.name = o.name;
      e.path = Str(j, "path");
      e.array = Str(j, "array");
      e.volume = Str(j, "volume");
      e.read_only = Bool(j, "read_only");
      e.direct_io = Bool(j, "direct_io");
      if (auto it = j.find("allow"); it != j.end() && it->is_array()) {
        std::vector<std::string> rules;
        for (auto& r : *it)
          if (r.is_string()) rules.push_back(r.get<std::string>());
        auto l = net::ParseAccessList(rules);
        if (l.ok()) e.allow = std::move(l.value());
        else spdlog::error("export \"{}\": recorded access list: {}; it admits nobody", e.name, l.status().message());
      }
      bool in_config = false;
      for (auto& c : cfg_.exports) {
        if (c.name != e.name) continue;
        in_config = true;
        if (ExportSpec(c) != ExportSpec(e))
          spdlog::warn("export \"{}\": the config file defines it as {}; the recorded runtime "
                       "definition {} is dropped (the config file wins for names it defines)",
                       e.name, ExportSpec(c).dump(), o.spec);
      }
      if (in_config) ForgetObject("export", e.name);
      else rt.exports.push_back(std::move(e));
    } else if (o.kind == "volume") {
      VolumeConfig v;
      v.name = o.name;
      std::string uri = Str(j, "uri");
      if (net::HasBlockUriScheme(uri)) {
        if (!ParseVolumeRemote(uri, &v).ok()) continue;
      } else {
        v.path = uri;
      }
      v.queue_depth = U32(j, "queue_depth", v.queue_depth);
      v.io_timeout_s = U32(j, "io_timeout", v.io_timeout_s);
      v.keepalive_timeout_s = U32(j, "keepalive_timeout", v.keepalive_timeout_s);
      bool in_config = false;
      for (auto& c : cfg_.volumes) {
        if (c.name != v.name) continue;
        in_config = true;
        if (VolumeSpec(c) != VolumeSpec(v))
          spdlog::warn("volume \"{}\": the config file defines it as {}; the recorded runtime "
                       "definition {} is dropped (the config file wins for names it defines)",
                       v.name, VolumeSpec(c).dump(), o.spec);
      }
      for (auto& a : cfg_.arrays)
        if (a.name == v.name) in_config = true;
      if (in_config) ForgetObject("volume", v.name);
      else rt.volumes.push_back(std::move(v));
    } else if (o.kind == "mount") {
      std::string path = Str(j, "path");
      if (!cfg_.mountpoint.empty() && cfg_.mountpoint != path)
        spdlog::warn("the config file mounts at {}; the recorded runtime mount {} is dropped",
                     cfg_.mountpoint, path);
      if (!cfg_.mountpoint.empty()) ForgetObject("mount", "mount");
      else rt.mount = path;
    }
  }
  return rt;
}

void Daemon::RecordExport(const ExportConfig& e) {
  RecordObject("export", e.name, ExportSpec(e));
}

void Daemon::RecordVolume(const VolumeConfig& v) {
  RecordObject("volume", v.name, VolumeSpec(v));
}

void Daemon::RecordObject(const std::string& kind, const std::string& name, const json& spec) {
  if (!topo_) return;
  Status st;
  {
    std::lock_guard<std::mutex> l(topo_mu_);
    st = topo_->PutObject({kind, name, spec.dump()});
  }
  if (!st.ok())
    spdlog::error("{} \"{}\": cannot record it (it will not survive a restart): {}", kind, name,
                  st.message());
}

void Daemon::ForgetObject(const std::string& kind, const std::string& name) {
  if (!topo_) return;
  Status st;
  {
    std::lock_guard<std::mutex> l(topo_mu_);
    st = topo_->DeleteObject(kind, name);
  }
  if (!st.ok()) spdlog::error("{} \"{}\": cannot forget its record: {}", kind, name, st.message());
}

}  // namespace dst::daemon
