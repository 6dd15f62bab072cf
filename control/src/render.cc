#include "dst/control/render.h"

#include <algorithm>
#include <charconv>
#include <ctime>

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

// "/dev/loop3 (ro, mounted at /srv)" for each entry of a volume's or array's loop_devices.
std::string LoopText(const json& o) {
  auto it = o.find("loop_devices");
  if (it == o.end() || !it->is_array()) return {};
  std::string out;
  for (const auto& d : *it) {
    if (!d.is_object()) continue;
    std::string one = Str(d, "device");
    std::string notes;
    if (Bool(d, "read_only")) notes = "ro";
    if (d.contains("mounted_at") && d["mounted_at"].is_string())
      notes += (notes.empty() ? "" : ", ") + std::string("mounted at ") + Str(d, "mounted_at");
    if (!notes.empty()) one += " (" + notes + ")";
    out += (out.empty() ? "" : ", ") + one;
  }
  return out;
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

namespace {
// An export's access list, "a:rw,b:ro", or "nobody" (default deny).
std::string AllowText(const json& e) {
  std::string allow;
  auto it = e.find("allow");
  if (it != e.end() && it->is_array())
    for (auto& r : *it)
      if (r.is_string()) allow += (allow.empty() ? "" : ",") + r.get<std::string>();
  return allow.empty() ? "nobody" : allow;
}
}  // namespace

std::string RenderExportList(const json& exports) {
  std::vector<std::vector<std::string>> rows;
  for (auto& e : exports) {
    rows.push_back({Str(e, "name"), FormatSize(U64(e, "size")), Bool(e, "read_only") ? "ro" : "rw",
                    std::to_string(U64(e, "connections")), AllowText(e), Str(e, "device")});
  }
  if (rows.empty()) return "no exports\n";
  return RenderTable({"NAME", "SIZE", "MODE", "CONNS", "ALLOW", "DEVICE"}, rows);
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

std::string RenderDiscovery(const json& r) {
  std::vector<std::vector<std::string>> rows;
  for (auto& s : r.value("stations", json::array()))
    for (auto& e : s.value("exports", json::array()))
      rows.push_back({Str(s, "mac"), Str(e, "name"), FormatSize(U64(e, "size")), Bool(e, "read_only") ? "ro" : "rw",
                      Str(e, "uri")});
  std::string head = fmt::format("segment {} (us: {}, {})\n", Str(r, "interface"), Str(r, "mac"),
                                 Bool(r, "encrypted") ? "encrypted" : "UNENCRYPTED");
  if (rows.empty()) return head + "no exports answered\n";
  return head + RenderTable({"STATION", "EXPORT", "SIZE", "MODE", "URI"}, rows);
}

std::string RenderStatus(const json& st) {
  std::string out;
  const json d = st.value("daemon", json::object());
  const json listen = d.value("listen", json::object());
  out += fmt::format("dstd pid:{} listen:{}:{} uptime:{} batching:{} memlock:{}\n",
                     U64(d, "pid"), Str(listen, "address"), U64(listen, "port"),
                     FormatDuration(Dbl(d, "uptime_s")), Bool(d, "batching") ? "on" : "off",
                     Bool(d, "memory_locked") ? "yes" : "no");
  if (Bool(d, "insecure"))
    out += "  WARNING: insecure = true: a listener reachable from other hosts serves without TLS "
           "(anyone on the network can read and write its exports)\n";
  if (auto tls = d.find("tls"); tls != d.end() && tls->is_string() && *tls != "off")
    out += fmt::format("  tls:{}\n", tls->get<std::string>());
  if (auto nbd = st.find("nbd"); nbd != st.end() && nbd->is_object() && Bool(*nbd, "enabled"))
    out += fmt::format("  nbd:{} tls:{}\n", Str(*nbd, "listen"), nbd->value("tls", std::string("off")));
  auto mount = st.find("mount");
  out += fmt::format("  mount:{}\n", (mount == st.end() || mount->is_null())
                                         ? std::string("none")
                                         : mount->get<std::string>());
  if (Bool(d, "insecure_segment"))
    out += "  WARNING: insecure_segment = true: raw-Ethernet frames are neither encrypted nor authenticated "
           "(any station on the segment can read and write)\n";
  for (auto& e : st.value("eth", json::array())) {
    out += fmt::format("  eth {} {} mtu:{} {} tx:{} rx:{} sessions:{}{}\n", Str(e, "interface"), Str(e, "mac"),
                       U64(e, "mtu"), Bool(e, "encrypted") ? "aes-256-gcm" : "UNENCRYPTED", Str(e, "tx_mode"),
                       Str(e, "rx_mode"), U64(e, "sessions"), Bool(e, "listening") ? " listening" : "");
    out += fmt::format("    frames/send call:{:.1f} frames/receive call:{:.1f} ring:{} (peak {}) retransmits:{} "
                       "timeouts:{} dropped: malformed {} bad-tag {} replayed {}\n",
                       Dbl(e, "frames_per_send_call"), Dbl(e, "frames_per_receive_call"), U64(e, "tx_ring_occupancy"),
                       U64(e, "tx_ring_peak"), U64(e, "retransmits"), U64(e, "timeouts"), U64(e, "malformed"),
                       U64(e, "bad_tag"), U64(e, "replayed"));
  }
  if (auto ex = st.find("exporter"); ex != st.end() && ex->is_object()) {
    out += fmt::format("  exporter connections:{} requests:{} errors:{} frames/call:{}\n",
                       U64(*ex, "connections_open"), U64(*ex, "requests"),
                       U64(*ex, "errors_replied"), Fpc(*ex));
  }
  for (auto& e : st.value("exports", json::array())) {
    out += fmt::format("\nexport {} size:{} {}\n", Str(e, "name"), FormatSize(U64(e, "size")),
                       Bool(e, "read_only") ? "read-only" : "read-write");
    out += fmt::format("  device:{}\n", Str(e, "device"));
    if (e.contains("allow")) out += fmt::format("  allow:{}\n", AllowText(e));
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
    if (v.contains("file") && !v["file"].is_null()) {
      const std::string loops = LoopText(v);
      out += fmt::format("  file:{} open:{}{}\n", Str(v, "file"), U64(v, "open_count"),
                         loops.empty() ? "" : " loop:" + loops);
    }
    if (v.contains("error") && !v["error"].is_null())
      out += fmt::format("  error:{}\n", Str(v, "error"));
  }
  auto arrays = st.value("arrays", json::array());
  if (!arrays.empty()) {
    out += "\narrays:\n";
    for (auto& a : arrays) out += RenderMdstat(a);
  }
  return out;
}

}  // namespace dst::control

// ---------------------------------------------------------------------------------------------
// Arrays

namespace dst::control {

namespace {

double Clamp100(double p) {
  if (!(p >= 0)) return 0;  // also NaN
  return p > 100 ? 100 : p;
}

const json& Resync(const json& a) {
  static const json kNull;
  auto it = a.find("resync");
  return it == a.end() ? kNull : *it;
}

// Percent of a resync object: its "percent" if present, else done/total; clamped.
double ResyncPercent(const json& r) {
  if (auto it = r.find("percent"); it != r.end() && it->is_number())
    return Clamp100(it->get<double>());
  std::uint64_t total = U64(r, "bytes_total");
  if (total == 0) return 0;
  return Clamp100(100.0 * double(U64(r, "bytes_done")) / double(total));
}

bool FullResync(const json& a, const json& r) {
  std::uint64_t size = U64(a, "size");
  return size > 0 && U64(r, "bytes_total") >= size;
}

std::string LegMark(const std::string& state) {
  if (state == "failed" || state == "missing") return "(F)";
  if (state == "detached") return "(D)";
  return "";
}

std::string MdLegState(const std::string& state, bool present) {
  if (state == "up-to-date") return "active sync";
  if (state == "resyncing") return "spare rebuilding";
  if (state == "failed") return present ? "faulty" : "faulty (missing)";
  if (state == "detached") return "detached (snapshot)";
  if (state == "missing") return "removed";
  if (state == "ready") return "ready";
  return state;
}

// Online verify (defined at the end of this file).
std::vector<std::pair<std::string, std::string>> VerifyDetail(const json& a);
std::string VerifyMdstatLine(const json& a);
std::string VerifyEventLine(const std::string& head, const json& e);

// The array's layer as the daemon describes it from its registry (dst/layer.h): dstctl names
// no layer itself.
const json& Layer(const json& a) {
  static const json kNone = json::object();
  auto it = a.find("layer");
  return it != a.end() && it->is_object() ? *it : kNone;
}

// A layer key's canonical value for humans: sizes in bytes become "64 KiB".
std::string LayerValueText(const std::string& type, std::string v) {
  std::uint64_t n = 0;
  auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
  if (type == "size" && !v.empty() && ec == std::errc() && end == v.data() + v.size())
    return FormatSize(n);
  return v;
}

// "Chunk Size : 64 KiB": the layer's key values that have a detail label.
void LayerParamLines(const json& a, std::vector<std::pair<std::string, std::string>>* kv) {
  for (auto& p : Layer(a).value("params", json::array())) {
    std::string label = Str(p, "label", "");
    if (label.empty()) continue;
    kv->push_back({label, LayerValueText(Str(p, "type"), Str(p, "value"))});
  }
}

std::string SizePair(std::uint64_t bytes) {
  return fmt::format("{:.2f} GiB {:.2f} GB", double(bytes) / double(1ull << 30),
                     double(bytes) / 1e9);
}

}  // namespace

std::string ProgressBar(int permille) {
  permille = std::clamp(permille, 0, 1000);
  int x = permille / 50;
  int y = 20 - x;
  return "[" + std::string(std::size_t(x), '=') + ">" + std::string(std::size_t(y), '.') + "]";
}

std::string RenderMdstat(const json& a) {
  std::string out;
  std::string state = Str(a, "state", "failed");
  bool assembled = a.contains("assembled") ? Bool(a, "assembled") : state != "failed";
  out += fmt::format("{} : {} {}", Str(a, "name"), assembled ? "active" : "inactive",
                     Str(a, "level"));
  std::string bits;
  int n = 0, up = 0;
  for (auto& l : a.value("legs", json::array())) {
    std::string ls = Str(l, "state");
    std::string why = l.contains("reason_text") ? Str(l, "reason", "") : "";
    out += fmt::format(" {}[{}]{}{}", Str(l, "spec"), U64(l, "slot"), LegMark(ls),
                       why.empty() || why == "none" ? "" : "{" + why + "}");
    ++n;
    bool u = ls == "up-to-date";
    up += u;
    bits += u ? 'U' : '_';
  }
  out += "\n";
  out += fmt::format("      {} KiB [{}/{}] [{}]\n", U64(a, "size") / 1024, n, up, bits);
  const json& r = Resync(a);
  if (r.is_object()) {
    std::string rs = Str(r, "state");
    if (rs == "pending") {
      out += "      resync=DELAYED\n";
    } else {
      double pct = ResyncPercent(r);
      std::uint64_t total = U64(r, "bytes_total");
      std::uint64_t done = std::min(U64(r, "bytes_done"), total);
      double rate = Dbl(r, "rate");
      double eta = Dbl(r, "eta_seconds");
      if (eta < 0 && rate > 0) eta = double(total - done) / rate;
      std::string finish = eta >= 0 ? fmt::format("{:.1f}min", eta / 60.0) : "?min";
      out += fmt::format("      {}  {} = {:.1f}% ({}/{}) finish={} speed={}K/sec{}\n",
                         ProgressBar(int(pct * 10)), FullResync(a, r) ? "resync" : "recovery",
                         pct, done / 1024, total / 1024, finish,
                         std::uint64_t(std::max(0.0, rate) / 1024),
                         rs == "paused" ? " (paused)" : "");
    }
  } else {
    out += VerifyMdstatLine(a);
  }
  return out;
}

int DetailTestCode(const json& a) {
  if (!a.is_object() || !a.contains("state")) return 4;
  std::string s = Str(a, "state");
  if (s == "clean") return 0;
  if (s == "degraded" || s == "resyncing" || s == "split-brain") return 1;
  if (s == "failed") return 2;
  return 4;
}

std::string RenderDetail(const json& a) {
  std::vector<std::pair<std::string, std::string>> kv;
  std::string level = Str(a, "level");
  std::string state = Str(a, "state");
  const bool redundant = Bool(Layer(a), "redundant");
  const json& r = Resync(a);
  int n = 0, up = 0, failed = 0, rebuilding = 0;
  for (auto& l : a.value("legs", json::array())) {
    std::string ls = Str(l, "state");
    ++n;
    if (Bool(l, "unreachable")) ++failed;  // dead: I/O to it fails now
    else if (ls == "up-to-date") ++up;
    else if (ls == "resyncing") ++rebuilding;
    else if (ls == "failed" || ls == "missing") ++failed;
  }
  std::string st;
  bool assembled = a.contains("assembled") ? Bool(a, "assembled") : state != "failed";
  if (!assembled) st = "inactive, Not Started";
  else if (state == "clean") st = "clean";
  else if (state == "degraded") st = "clean, degraded";
  else if (state == "resyncing")
    st = std::string("clean, degraded, ") + (r.is_object() && FullResync(a, r) ? "resyncing" : "recovering");
  else if (state == "split-brain") st = "active, SPLIT BRAIN (dstctl array resolve)";
  else st = "FAILED";
  if (r.is_object() && Str(r, "state") == "pending") st += " (DELAYED)";
  if (auto v = a.find("verify"); v != a.end() && v->is_object() && Str(*v, "state") == "running")
    st += Bool(*v, "repair") ? ", repairing" : ", checking";  // as mdadm --detail
  std::uint64_t size = U64(a, "size");
  kv.push_back({"Version", "dst 1"});
  kv.push_back({"Raid Level", Str(Layer(a), "title", level.c_str())});
  kv.push_back({"Array Size", fmt::format("{} KiB ({})", size / 1024, SizePair(size))});
  kv.push_back({"Raid Devices", std::to_string(n)});
  kv.push_back({"Total Devices", std::to_string(n)});
  kv.push_back({"Persistence", fmt::format("SQLite {}", Str(a, "state_db"))});
  if (redundant)
    kv.push_back({"Intent Bitmap", Bool(a, "write_intent")
                                       ? fmt::format("Internal ({} regions)",
                                                     FormatSize(U64(a, "region_size")))
                                       : std::string("None")});
  kv.push_back({"State", st});
  kv.push_back({"Active Devices", std::to_string(up)});
  kv.push_back({"Working Devices", std::to_string(up + rebuilding)});
  kv.push_back({"Failed Devices", std::to_string(failed)});
  if (redundant) kv.push_back({"Consistency Policy", "bitmap"});
  LayerParamLines(a, &kv);
  if (r.is_object())
    kv.push_back({Str(r, "state") == "pending" ? "Rebuild Status" : "Rebuild Status",
                  fmt::format("{}% complete{}", int(ResyncPercent(r)),
                              Str(r, "state") == "paused" ? " (paused)" : "")});
  if (auto rr = a.find("resync_rate"); rr != a.end() && rr->is_object() && redundant) {
    auto rate = [](std::uint64_t v) {
      return v == 0 ? std::string("unlimited") : FormatSize(v) + "/s";
    };
    kv.push_back({"Resync Rate", fmt::format("min {} max {}", rate(U64(*rr, "min")),
                                             rate(U64(*rr, "max")))});
  }
  for (auto& line : VerifyDetail(a)) kv.push_back(line);
  kv.push_back({"Name", Str(a, "name")});
  kv.push_back({"UUID", Str(a, "id")});
  if (auto stt = a.find("stats"); stt != a.end() && stt->is_object() && stt->contains("commits"))
    kv.push_back({"Commits", fmt::format("{} ({:.1f}/s, {} intent waits)", U64(*stt, "commits"),
                                         Dbl(*stt, "commits_per_second"),
                                         U64(*stt, "intent_waits"))});
  if (a.contains("file") && a["file"].is_string()) kv.push_back({"File", Str(a, "file")});
  if (const std::string loops = LoopText(a); !loops.empty()) kv.push_back({"Loop Devices", loops});
  if (a.contains("error") && a["error"].is_string()) kv.push_back({"Error", Str(a, "error")});
  std::string out = Str(a, "name") + ":\n";
  for (auto& [k, v] : kv) out += fmt::format("{:>18} : {}\n", k, v);
  out += "\n";
  std::vector<std::vector<std::string>> rows;
  bool io = false;  // per-leg counters (dstd with truthful health): reads/writes show balancing
  for (auto& l : a.value("legs", json::array())) io |= l.contains("io") && l["io"].is_object();
  for (auto& l : a.value("legs", json::array())) {
    std::string gen = Str(l, "generation", "");
    std::string state = MdLegState(Str(l, "state"), !l.contains("present") || Bool(l, "present"));
    if (l.contains("reachable") && !Bool(l, "reachable"))
      state += fmt::format(" (unreachable {}s)", U64(l, "outage_ms") / 1000);
    std::vector<std::string> row{std::to_string(U64(l, "slot")), state,
                                 FormatSize(U64(l, "out_of_sync_bytes")),
                                 gen.empty() ? "-" : gen.substr(0, 8)};
    if (io) {
      json c = l.value("io", json::object());
      row.push_back(fmt::format("{} ({})", U64(c, "reads"), FormatSize(U64(c, "bytes_read"))));
      row.push_back(fmt::format("{} ({})", U64(c, "writes"), FormatSize(U64(c, "bytes_written"))));
      row.push_back(std::to_string(U64(c, "errors")));
    }
    row.push_back(Str(l, "spec"));
    rows.push_back(std::move(row));
  }
  std::vector<std::string> head{"Number", "State", "Out-of-sync", "Generation"};
  if (io) head.insert(head.end(), {"Reads", "Writes", "Errors"});
  head.push_back("Device");
  std::string table = RenderTable(head, rows);
  // Indent the table like mdadm's member table.
  std::size_t pos = 0;
  while (pos < table.size()) {
    std::size_t nl = table.find('\n', pos);
    out += "    " + table.substr(pos, nl - pos + 1);
    pos = nl + 1;
  }
  // Identity: why legs are out of service, and who holds their claims.
  for (auto& l : a.value("legs", json::array())) {
    if (l.contains("reason_text") && l["reason_text"].is_string())
      out += fmt::format("    leg {} {}: {}\n", U64(l, "slot"), Str(l, "reason"), Str(l, "reason_text"));
    else if (l.contains("identity_event") && l["identity_event"].is_string())
      out += fmt::format("    leg {} last identity event: {}\n", U64(l, "slot"), Str(l, "identity_event"));
    if (auto o = l.find("owner"); o != l.end() && o->is_object())
      out += fmt::format("    leg {} claimed by {} (id {})\n", U64(l, "slot"), Str(*o, "name"),
                         Str(*o, "id"));
  }
  return out;
}

std::string RenderLayers(const json& layers) {
  std::string out;
  for (auto& l : layers) {
    const json& legs = l.value("legs", json::object());
    out += fmt::format("{}: {}\n  {}\n", Str(l, "name"), Str(l, "title"), Str(l, "help"));
    out += fmt::format("  legs: {}..{}{}{}, live changes: {}\n  size: {}\n", U64(legs, "min"),
                       U64(legs, "max"), Bool(legs, "same_size") ? ", same size" : "",
                       Bool(legs, "read_only_legs") ? ", read-only legs allowed" : "",
                       Str(legs, "change"), Str(legs, "size"));
    for (auto& k : l.value("keys", json::array())) {
      std::string def = LayerValueText(Str(k, "type"), Str(k, "default", ""));
      out += fmt::format("  --set {}=VALUE  {} ({}{})\n", Str(k, "name"), Str(k, "help"),
                         Str(k, "type"), def.empty() ? "" : ", default " + def);
    }
  }
  return out;
}

std::string RenderArrayList(const json& arrays) {
  std::vector<std::vector<std::string>> rows;
  for (auto& a : arrays) {
    int n = 0, up = 0;
    for (auto& l : a.value("legs", json::array())) {
      ++n;
      up += Str(l, "state") == "up-to-date";
    }
    const json& r = Resync(a);
    rows.push_back({Str(a, "name"), Str(a, "level"), FormatSize(U64(a, "size")), Str(a, "state"),
                    fmt::format("{}/{}", up, n),
                    r.is_object() ? fmt::format("{:.1f}%", ResyncPercent(r)) : std::string("-")});
  }
  if (rows.empty()) return "no arrays\n";
  return RenderTable({"NAME", "LEVEL", "SIZE", "STATE", "LEGS", "RESYNC"}, rows);
}

std::string RenderEvent(const json& e) {
  std::string type = Str(e, "type");
  std::string head;
  double ts = Dbl(e, "ts");
  {
    std::time_t t = std::time_t(ts);
    std::tm tm{};
    gmtime_r(&t, &tm);
    char buf[32];
    std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
    head = buf;
  }
  std::string prev = e.contains("previous") && e["previous"].is_string()
                         ? fmt::format(" (was {})", Str(e, "previous")) : "";
  if (type == "leg_identity")
    return fmt::format("{} {} leg {} {}: {}\n", head, Str(e, "array"), U64(e, "slot"),
                       Str(e, "spec"), Str(e, "event"));
  if (type == "leg_reason")
    return fmt::format("{} {} leg {} {}: {}{}\n", head, Str(e, "array"), U64(e, "slot"),
                       Str(e, "spec"), Str(e, "reason"),
                       Str(e, "text").empty() ? "" : " (" + Str(e, "text") + ")");
  if (type == "leg_state")  // pushed leg states name the device, derived ones the spec
    return fmt::format("{} {} leg {} {}: {}{}\n", head, Str(e, "array"), U64(e, "slot"),
                       e.contains("spec") ? Str(e, "spec") : Str(e, "device", ""),
                       Str(e, "state"), prev);
  if (type == "gap") {
    if (Str(e, "reason", "") == "restarted")
      return fmt::format("{} gap: dstd has no event after {} (its last is {}: it restarted); "
                         "the current state follows\n", head, U64(e, "since"), U64(e, "last_seq"));
    return fmt::format("{} gap: events {}..{} are no longer kept (the oldest kept is {}); the "
                       "current state follows\n", head, U64(e, "since") + 1,
                       U64(e, "first_seq") - 1, U64(e, "first_seq"));
  }
  if (type == "array_state")
    return fmt::format("{} {} {}{}\n", head, Str(e, "array"), Str(e, "state"), prev);
  if (type == "resync_progress")
    return fmt::format("{} {} leg {} resync {:.1f}% ({}/{}) {}/s eta {}\n", head,
                       Str(e, "array"), U64(e, "leg"), Clamp100(Dbl(e, "percent")),
                       FormatSize(U64(e, "bytes_done")), FormatSize(U64(e, "bytes_total")),
                       FormatSize(U64(e, "rate")),
                       Dbl(e, "eta_seconds") >= 0 ? FormatDuration(Dbl(e, "eta_seconds")) : "?");
  if (type == "resync_done")
    return fmt::format("{} {} leg {} resync done ({} resynced)\n", head, Str(e, "array"),
                       U64(e, "leg"), FormatSize(U64(e, "bytes_resynced_total")));
  if (type == "resync_paused" || type == "resync_resumed")
    return fmt::format("{} {} resync {}\n", head, Str(e, "array"),
                       type == "resync_paused" ? "paused" : "resumed");
  if (type.rfind("verify_", 0) == 0) return VerifyEventLine(head, e);
  if (type == "volume_state")
    return fmt::format("{} volume {} {}{}\n", head, Str(e, "volume"), Str(e, "state"), prev);
  if (type == "leg_unreachable")
    return fmt::format("{} {} leg {} {}: unreachable for {} ms{}\n", head, Str(e, "array"),
                       U64(e, "slot"), Str(e, "spec"), U64(e, "outage_ms"),
                       Str(e, "detail", "").empty() ? "" : " (" + Str(e, "detail", "") + ")");
  return head + " " + e.dump() + "\n";
}

std::string RenderApply(const json& r) {
  std::string out;
  const json plan = r.value("plan", json::array());
  const json kept = r.value("kept", json::array());
  std::string kept_line;
  if (!kept.empty()) {
    std::vector<std::string> k;
    for (auto& x : kept) k.push_back(x.get<std::string>());
    kept_line = fmt::format("kept (not in the file; --prune removes): {}\n", fmt::join(k, ", "));
  }
  if (plan.empty()) return "nothing to do\n" + kept_line;
  bool dry = Bool(r, "dry_run");
  const json steps = r.value("steps", json::array());
  if (dry && steps.size() == plan.size()) {
    // The typed plan: each step with its kind (the same kinds --json and apply_step events
    // carry), so a reader sees what sort of change each line is.
    for (auto& s : steps) {
      out += "would: " + s.value("step", std::string());
      if (auto k = s.value("kind", std::string()); !k.empty()) out += "  [" + k + "]";
      out += "\n";
    }
  } else if (dry || steps.size() != plan.size()) {
    for (auto& s : plan) out += (dry ? "would: " : "") + s.get<std::string>() + "\n";
  } else {
    // Step by step: done / FAILED / not run.
    for (auto& s : steps) {
      std::string st = s.value("status", std::string("?"));
      out += fmt::format("{:<8} {}", st == "failed" ? "FAILED" : st, s.value("step", std::string()));
      if (s.contains("error") && s["error"].is_string())
        out += ": " + s["error"].get<std::string>();
      out += "\n";
    }
  }
  out += kept_line;
  std::size_t done = r.value("done", json::array()).size();
  if (Bool(r, "failed"))
    out += fmt::format("apply stopped: {} of {} operations done (run it again once the cause is "
                       "fixed)\n", done, plan.size());
  else if (!dry)
    out += fmt::format("applied {} operation{}\n", plan.size(), plan.size() == 1 ? "" : "s");
  return out;
}

}  // namespace dst::control

// ---------------------------------------------------------------------------------------------
// Online verify

namespace dst::control {

namespace {

std::string UtcTime(double ts) {
  std::time_t t = std::time_t(ts);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S UTC", &tm);
  return buf;
}

std::string Plural(std::uint64_t n, const char* what) {
  return fmt::format("{} {}{}", n, what, n == 1 ? "" : "s");
}

std::string LegList(const json& legs) {
  std::string out;
  for (auto& l : legs)
    if (l.is_number()) out += (out.empty() ? "" : " ") + std::to_string(l.get<int>());
  return out;
}

// "1 mismatching region (64 KiB)" / "legs identical".
std::string MismatchSummary(const json& v) {
  std::uint64_t n = U64(v, "mismatch_regions");
  if (n == 0) return "legs identical";
  return fmt::format("{} ({})", Plural(n, "mismatching region"), FormatSize(U64(v, "mismatch_bytes")));
}

std::vector<std::pair<std::string, std::string>> VerifyDetail(const json& a) {
  std::vector<std::pair<std::string, std::string>> kv;
  auto it = a.find("verify");
  if (it != a.end() && it->is_object()) {
    const json& v = *it;
    std::string st = Str(v, "state");
    if (st == "running") {
      kv.push_back({"Verify Status", RenderVerifyProgress(v)});
    } else {
      std::string when = Dbl(v, "finished") > 0 ? UtcTime(Dbl(v, "finished")) : "?";
      std::string what = st == "done" ? MismatchSummary(v) : st + ": " + Str(v, "error");
      if (st != "done" && U64(v, "mismatch_regions")) what += ", " + MismatchSummary(v) + " so far";
      if (Bool(v, "repair") && U64(v, "mismatch_regions")) what += ", repaired";
      kv.push_back({"Last Verify", fmt::format("{}, {}", when, what)});
    }
    std::string list;
    const json mism = v.value("mismatches", json::array());
    for (std::size_t i = 0; i < mism.size() && i < 8; ++i)
      list += fmt::format("{}{} (leg {})", i ? ", " : "", U64(mism[i], "offset"),
                          LegList(mism[i].value("legs", json::array())));
    if (U64(v, "mismatch_regions") > std::min<std::size_t>(mism.size(), 8))
      list += fmt::format(", ... ({} in all; --json lists the first {})", U64(v, "mismatch_regions"),
                          U64(v, "mismatches_max_listed"));
    if (!list.empty()) kv.push_back({"Mismatches", list});
  }
  auto sc = a.find("verify_schedule");
  if (sc != a.end() && sc->is_object() && U64(*sc, "interval") > 0)
    kv.push_back({"Verify Every", fmt::format("{}{}", FormatDuration(Dbl(*sc, "interval")),
                                              (*sc)["next"].is_number()
                                                  ? ", next " + UtcTime(Dbl(*sc, "next"))
                                                  : std::string())});
  return kv;
}

// md's "check"/"repair" progress line while a verify runs and no resync does.
std::string VerifyMdstatLine(const json& a) {
  auto it = a.find("verify");
  if (it == a.end() || !it->is_object() || Str(*it, "state") != "running") return "";
  const json& v = *it;
  double pct = Clamp100(Dbl(v, "percent"));
  double eta = Dbl(v, "eta_seconds");
  return fmt::format("      {}  {} = {:.1f}% ({}/{}) finish={} speed={}K/sec mismatches={}\n",
                     ProgressBar(int(pct * 10)), Bool(v, "repair") ? "repair" : "check", pct,
                     U64(v, "bytes_done") / 1024, U64(v, "bytes_total") / 1024,
                     eta >= 0 ? fmt::format("{:.1f}min", eta / 60.0) : "?min", U64(v, "rate") / 1024,
                     U64(v, "mismatch_regions"));
}

std::string VerifyEventLine(const std::string& head, const json& e) {
  std::string array = Str(e, "array");
  if (Str(e, "type") == "verify_progress") return fmt::format("{} {} {}\n", head, array, RenderVerifyProgress(e));
  std::string st = Str(e, "state");
  std::string line = fmt::format("{} {} verify {}: {}", head, array, st, MismatchSummary(e));
  if (e.contains("error") && e["error"].is_string()) line += " (" + Str(e, "error") + ")";
  if (Bool(e, "repair") && U64(e, "mismatch_regions")) line += ", marked for resync";
  return line + "\n";
}

}  // namespace

int VerifyExitCode(const json& v) {
  std::string st = Str(v, "state");
  if (st == "cancelled") return 75;
  if (st != "done") return 74;
  if (U64(v, "mismatch_regions") > 0 && !Bool(v, "repair")) return kExVerifyMismatch;
  return 0;
}

std::string RenderVerifyProgress(const json& v) {
  double eta = Dbl(v, "eta_seconds");
  return fmt::format("verify{} {:.1f}% ({}/{}) {}/s eta {}, {}{}", Bool(v, "repair") ? " --repair" : "",
                     Clamp100(Dbl(v, "percent")), FormatSize(U64(v, "bytes_done")),
                     FormatSize(U64(v, "bytes_total")), FormatSize(U64(v, "rate")),
                     eta >= 0 ? FormatDuration(eta) : "?", Plural(U64(v, "mismatch_regions"), "mismatch"),
                     Bool(v, "waiting_resync") ? " (waiting for the resync)" : "");
}

std::string RenderVerify(const json& v, const std::string& array) {
  if (!v.is_object()) return fmt::format("array {}: never verified\n", array);
  std::string st = Str(v, "state");
  double took = Dbl(v, "finished") > 0 ? Dbl(v, "finished") - Dbl(v, "started") : 0;
  std::string out = fmt::format("verify of {} {} in {}: {}; {} compared, legs {} (source leg {})\n",
                                array, st, took < 10 ? fmt::format("{:.1f}s", took) : FormatDuration(took),
                                MismatchSummary(v),
                                FormatSize(U64(v, "bytes_done")), LegList(v.value("legs_compared", json::array())),
                                Str(v, "source_leg"));
  if (v.contains("error") && v["error"].is_string()) out += "  reason: " + Str(v, "error") + "\n";
  const json mism = v.value("mismatches", json::array());
  for (auto& m : mism)
    out += fmt::format("  offset {} ({}): leg {} differs from leg {}\n", U64(m, "offset"),
                       FormatSize(U64(m, "offset")), LegList(m.value("legs", json::array())),
                       Str(v, "source_leg"));
  std::uint64_t n = U64(v, "mismatch_regions");
  if (n > mism.size()) out += fmt::format("  ... and {} more (only the first {} are listed)\n",
                                          n - mism.size(), mism.size());
  if (U64(v, "read_errors"))
    out += fmt::format("  {} failed (see dstctl detail)\n", Plural(U64(v, "read_errors"), "leg read"));
  if (n > 0 && Bool(v, "repair"))
    out += fmt::format("repaired: {} marked out of sync and resynced from leg {}\n",
                       Plural(U64(v, "repaired_regions"), "region"), Str(v, "source_leg"));
  else if (n > 0)
    out += fmt::format("not repaired: run dstctl array verify {} --repair\n", array);
  return out;
}

}  // namespace dst::control
