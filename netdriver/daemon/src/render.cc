#include "dst/daemon/render.h"

#include <algorithm>

#include <fmt/format.h>

namespace dst::control {

using nlohmann::json;

namespace {

std::string Str(const json& o, const char* key, const char* def = "-") {
  auto it = o.find(key);
  if (it == o.end() || it->is_null()) return def;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_boolean()) return it->get<bool>() ? "yes" : "no";
  return it->dump();
}

std::uint64_t U64(const json& o, const char* key) {
  auto it = o.find(key);
  if (it == o.end() || !it->is_number()) return 0;
  if (it->is_number_unsigned()) return it->get<std::uint64_t>();
  if (it->is_number_integer()) return std::uint64_t(std::max<std::int64_t>(0, it->get<std::int64_t>()));
  return std::uint64_t(std::max(0.0, it->get<double>()));
}

double Dbl(const json& o, const char* key) {
  auto it = o.find(key);
  if (it == o.end() || !it->is_number()) return 0;
  return it->get<double>();
}

bool Bool(const json& o, const char* key) {
  auto it = o.find(key);
  return it != o.end() && it->is_boolean() && it->get<bool>();
}

std::string Fpc(const json& o) { return fmt::format("{:.2f}", Dbl(o, "frames_per_call")); }

std::string VolumeSource(const json& v) {
  std::string uri = Str(v, "uri", "");
  return uri.empty() ? Str(v, "path") : uri;
}

}  // namespace

std::string FormatSize(std::uint64_t bytes) {
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  double v = double(bytes);
  while (v >= 1024 && u < 6) {
    v /= 1024;
    ++u;
  }
  if (u == 0) return fmt::format("{} B", bytes);
  if (v == double(std::uint64_t(v))) return fmt::format("{} {}", std::uint64_t(v), kUnits[u]);
  return fmt::format("{:.1f} {}", v, kUnits[u]);
}

std::string FormatDuration(double seconds) {
  auto s = std::uint64_t(std::max(0.0, seconds));
  if (s < 60) return fmt::format("{}s", s);
  if (s < 3600) return fmt::format("{}m{:02}s", s / 60, s % 60);
  if (s < 86400) return fmt::format("{}h{:02}m", s / 3600, (s % 3600) / 60);
  return fmt::format("{}d{:02}h", s / 86400, (s % 86400) / 3600);
}

std::string RenderTable(const std::vector<std::string>& header,
                        const std::vector<std::vector<std::string>>& rows) {
  std::vector<std::size_t> w(header.size());
  for (std::size_t i = 0; i < header.size(); ++i) w[i] = header[i].size();
  for (auto& r : rows)
    for (std::size_t i = 0; i < r.size() && i < w.size(); ++i) w[i] = std::max(w[i], r[i].size());
  std::string out;
  auto line = [&](const std::vector<std::string>& cells) {
    std::string l;
    for (std::size_t i = 0; i < cells.size(); ++i) {
      l += cells[i];
      if (i + 1 < cells.size()) l += std::string(w[i] - cells[i].size() + 2, ' ');
    }
    while (!l.empty() && l.back() == ' ') l.pop_back();
    out += l + "\n";
  };
  line(header);
  for (auto& r : rows) line(r);
  return out;
}

std::string RenderExportList(const json& exports) {
  std::vector<std::vector<std::string>> rows;
  for (auto& e : exports) {
    rows.push_back({Str(e, "name"), FormatSize(U64(e, "size")), Bool(e, "read_only") ? "ro" : "rw",
                    std::to_string(U64(e, "connections")), Str(e, "device")});
  }
  if (rows.empty()) return "no exports\n";
  return RenderTable({"NAME", "SIZE", "MODE", "CONNS", "DEVICE"}, rows);
}

std::string RenderVolumeList(const json& volumes) {
  std::vector<std::vector<std::string>> rows;
  for (auto& v : volumes) {
    rows.push_back({Str(v, "name"), FormatSize(U64(v, "size")), Str(v, "state"),
                    std::to_string(U64(v, "reconnects")), std::to_string(U64(v, "inflight")),
                    VolumeSource(v)});
  }
  if (rows.empty()) return "no volumes\n";
  return RenderTable({"NAME", "SIZE", "STATE", "RECONNECTS", "INFLIGHT", "SOURCE"}, rows);
}

std::string RenderStatus(const json& st) {
  std::string out;
  const json d = st.value("daemon", json::object());
  const json listen = d.value("listen", json::object());
  out += fmt::format("dstd pid:{} listen:{}:{} uptime:{} batching:{} memlock:{}\n",
                     U64(d, "pid"), Str(listen, "address"), U64(listen, "port"),
                     FormatDuration(Dbl(d, "uptime_s")), Bool(d, "batching") ? "on" : "off",
                     Bool(d, "memory_locked") ? "yes" : "no");
  auto mount = st.find("mount");
  out += fmt::format("  mount:{}\n", (mount == st.end() || mount->is_null())
                                         ? std::string("none")
                                         : mount->get<std::string>());
  if (auto ex = st.find("exporter"); ex != st.end() && ex->is_object()) {
    out += fmt::format("  exporter connections:{} requests:{} errors:{} frames/call:{}\n",
                       U64(*ex, "connections_open"), U64(*ex, "requests"),
                       U64(*ex, "errors_replied"), Fpc(*ex));
  }
  for (auto& e : st.value("exports", json::array())) {
    out += fmt::format("\nexport {} size:{} {}\n", Str(e, "name"), FormatSize(U64(e, "size")),
                       Bool(e, "read_only") ? "read-only" : "read-write");
    out += fmt::format("  device:{}\n", Str(e, "device"));
    std::string line = fmt::format("  connections:{}", U64(e, "connections"));
    if (e.contains("requests"))
      line += fmt::format(" requests:{} frames/call:{}", U64(e, "requests"), Fpc(e));
    out += line + "\n";
  }
  for (auto& v : st.value("volumes", json::array())) {
    out += fmt::format("\nvolume {} state:{} size:{}\n", Str(v, "name"), Str(v, "state"),
                       FormatSize(U64(v, "size")));
    out += fmt::format("  {}:{}\n", v.contains("uri") && !v["uri"].is_null() ? "remote" : "path",
                       VolumeSource(v));
    if (v.contains("uri") && !v["uri"].is_null()) {
      out += fmt::format("    connection:{} reconnects:{} resent:{} timeouts:{} inflight:{} "
                         "requests:{} frames/call:{}\n",
                         Str(v, "state"), U64(v, "reconnects"), U64(v, "resent"),
                         U64(v, "timeouts"), U64(v, "inflight"), U64(v, "requests"), Fpc(v));
    }
    if (v.contains("file") && !v["file"].is_null())
      out += fmt::format("  file:{} open:{}\n", Str(v, "file"), U64(v, "open_count"));
    if (v.contains("error") && !v["error"].is_null())
      out += fmt::format("  error:{}\n", Str(v, "error"));
  }
  return out;
}

}  // namespace dst::control
