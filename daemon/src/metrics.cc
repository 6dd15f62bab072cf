#include "metrics.h"

#include <functional>

#include "metrics_text.h"

namespace dst::daemon {

namespace {

using nlohmann::json;

double Num(const json& o, const char* key) {
  if (!o.is_object() || !o.contains(key)) return 0;
  const json& v = o[key];
  if (v.is_number()) return v.get<double>();
  if (v.is_boolean()) return v.get<bool>() ? 1 : 0;
  return 0;
}

std::string Str(const json& o, const char* key) {
  return o.is_object() && o.contains(key) && o[key].is_string() ? o[key].get<std::string>() : std::string();
}

// State words as label values: the engine's "up-to-date" becomes "up_to_date", one spelling
// for dashboards whatever object reports it.
std::string State(const json& o, const char* key) {
  std::string s = Str(o, key);
  for (char& c : s)
    if (c == '-' || c == ' ') c = '_';
  return s;
}

const json& List(const json& st, const char* key) {
  static const json empty = json::array();
  return st.contains(key) && st[key].is_array() ? st[key] : empty;
}

// One family over every object of a list: `labels(o)` names the series, `value(o)` its value.
void Each(MetricsText& m, bool counter, const std::string& name, const char* help, const json& list,
          const std::function<Labels(const json&)>& labels, const std::function<double(const json&)>& value) {
  for (const json& o : list) {
    if (counter) m.Counter(name, help, labels(o), value(o));
    else m.Gauge(name, help, labels(o), value(o));
  }
}

// An object whose traffic a CountingDevice sees: its labels and its "metrics" member
// (Daemon::MetricsJson; absent in a plain status snapshot).
struct Counted {
  Labels labels;
  const json* metrics;
};

double Io(const Counted& c, const char* key) { return c.metrics->contains("io") ? Num((*c.metrics)["io"], key) : 0; }

LatencyHistogram::Snapshot HistogramOf(const json& h) {
  LatencyHistogram::Snapshot s;
  if (!h.is_object()) return s;
  s.count = static_cast<std::uint64_t>(Num(h, "count"));
  s.sum_ns = static_cast<std::uint64_t>(Num(h, "sum_ns"));
  if (h.contains("buckets") && h["buckets"].is_array())
    for (int i = 0; i < LatencyHistogram::kBuckets && i < static_cast<int>(h["buckets"].size()); ++i)
      if (h["buckets"][i].is_number()) s.buckets[i] = h["buckets"][i].get<std::uint64_t>();
  return s;
}

// The same families for exports, volumes, arrays and legs: dst_<kind>_reads_total, ...,
// dst_<kind>_request_duration_seconds{op="read"|"write"|"other"}.
void IoFamilies(MetricsText& m, const std::string& kind, const std::vector<Counted>& objs) {
  const std::string p = "dst_" + kind + "_";
  struct Count {
    const char* suffix;
    const char* key;
    const char* help;
  };
  static const Count kCounts[] = {
      {"reads_total", "reads", "Reads completed or in flight."},
      {"writes_total", "writes", "Writes completed or in flight."},
      {"other_requests_total", "other", "Flushes, trims and write-zeroes."},
      {"read_bytes_total", "bytes_read", "Bytes of those reads."},
      {"written_bytes_total", "bytes_written", "Bytes of those writes."},
      {"errors_total", "errors", "Requests that completed with an error."},
  };
  for (const Count& c : kCounts)
    for (const Counted& o : objs) m.Counter(p + c.suffix, c.help, o.labels, Io(o, c.key));
  for (const Counted& o : objs)
    m.Gauge(p + "inflight_requests", "Requests submitted and not yet completed.", o.labels, Io(o, "inflight"));
  static const char* kOps[] = {"read", "write", "other"};
  for (const Counted& o : objs) {
    const json& lat = o.metrics->contains("latency") ? (*o.metrics)["latency"] : json();
    for (const char* op : kOps) {
      Labels l = o.labels;
      l.emplace_back("op", op);
      m.Histogram(p + "request_duration_seconds", "Time from submission to completion.", l,
                  HistogramOf(lat.is_object() && lat.contains(op) ? lat[op] : json()));
    }
  }
}

// The objects of `list` that carry a "metrics" member.
std::vector<Counted> CountedOf(const json& list, const std::function<Labels(const json&)>& labels) {
  std::vector<Counted> out;
  for (const json& o : list)
    if (o.is_object() && o.contains("metrics") && o["metrics"].is_object()) out.push_back({labels(o), &o["metrics"]});
  return out;
}

}  // namespace

std::string StatusToMetrics(const json& st) {
  MetricsText m;
  const json& d = st.contains("daemon") ? st["daemon"] : json::object();
  m.Gauge("dst_up", "1 while dstd answers.", {}, 1);
  m.Gauge("dst_build_info", "dstd's version, as a label.", {{"version", Str(d, "version")}}, 1);
  m.Gauge("dst_uptime_seconds", "Seconds since dstd started.", {}, Num(d, "uptime_s"));

  if (st.contains("exporter") && st["exporter"].is_object()) {
    const json& e = st["exporter"];
    m.Counter("dst_exporter_connections_total", "Connections accepted by the DST exporter.", {}, Num(e, "connections_total"));
    m.Gauge("dst_exporter_connections", "Open DST exporter connections.", {}, Num(e, "connections_open"));
    m.Counter("dst_exporter_connections_refused_total", "Connections closed at accept by a connection cap.", {},
              Num(e, "connections_refused"));
    m.Counter("dst_exporter_connections_timed_out_total", "Connections closed by the handshake, idle or stall limits.", {},
              Num(e, "connections_timed_out"));
    m.Counter("dst_exporter_protocol_errors_total", "Connections closed for protocol violations.", {}, Num(e, "protocol_errors"));
    m.Counter("dst_exporter_errors_total", "Requests answered with an error.", {}, Num(e, "errors_replied"));
  }

  const json& ex = List(st, "exports");
  auto exl = [](const json& o) { return Labels{{"export", Str(o, "name")}}; };
  Each(m, false, "dst_export_size_bytes", "Size of the export.", ex, exl, [](const json& o) { return Num(o, "size"); });
  Each(m, false, "dst_export_connections", "Clients connected to the export.", ex, exl,
       [](const json& o) { return Num(o, "connections"); });
  Each(m, true, "dst_export_requests_total", "Requests served by the export.", ex, exl, [](const json& o) { return Num(o, "requests"); });
  Each(m, true, "dst_export_frames_sent_total", "Reply frames the batched transmitter sent.", ex, exl,
       [](const json& o) { return Num(o, "frames_sent"); });
  Each(m, true, "dst_export_send_calls_total", "System calls that sent them (frames per call = the ratio).", ex, exl,
       [](const json& o) { return Num(o, "send_calls"); });
  Each(m, true, "dst_export_digest_errors_total", "Payloads whose digest did not match.", ex, exl,
       [](const json& o) { return Num(o, "digest_errors"); });
  IoFamilies(m, "export", CountedOf(ex, exl));

  const json& vo = List(st, "volumes");
  auto vl = [](const json& o) { return Labels{{"volume", Str(o, "name")}}; };
  Each(m, false, "dst_volume_size_bytes", "Size of the volume.", vo, vl, [](const json& o) { return Num(o, "size"); });
  Each(m, false, "dst_volume_up", "1 while the volume's peer is reachable.", vo, vl, [](const json& o) { return Num(o, "reachable"); });
  Each(m, true, "dst_volume_requests_total", "Requests sent to the volume's peer.", vo, vl, [](const json& o) { return Num(o, "requests"); });
  Each(m, true, "dst_volume_reconnects_total", "Reconnections to the peer.", vo, vl, [](const json& o) { return Num(o, "reconnects"); });
  Each(m, true, "dst_volume_timeouts_total", "Requests failed by io_timeout.", vo, vl, [](const json& o) { return Num(o, "timeouts"); });
  Each(m, true, "dst_volume_resent_total", "Requests re-sent after a reconnect.", vo, vl, [](const json& o) { return Num(o, "resent"); });
  Each(m, true, "dst_volume_bad_replies_total", "Replies that broke the protocol.", vo, vl, [](const json& o) { return Num(o, "bad_replies"); });
  Each(m, true, "dst_volume_digest_errors_total", "Payloads whose digest did not match.", vo, vl,
       [](const json& o) { return Num(o, "digest_errors"); });
  Each(m, true, "dst_volume_frames_sent_total", "Request frames the batched transmitter sent.", vo, vl,
       [](const json& o) { return Num(o, "frames_sent"); });
  Each(m, true, "dst_volume_send_calls_total", "System calls that sent them.", vo, vl, [](const json& o) { return Num(o, "send_calls"); });
  Each(m, false, "dst_volume_outage_seconds", "Length of the current outage (0: connected).", vo, vl,
       [](const json& o) { return Num(o, "outage_ms") / 1000.0; });
  IoFamilies(m, "volume", CountedOf(vo, vl));

  const json& ar = List(st, "arrays");
  auto al = [](const json& o) { return Labels{{"array", Str(o, "name")}, {"level", Str(o, "level")}}; };
  Each(m, false, "dst_array_size_bytes", "Size of the array.", ar, al, [](const json& o) { return Num(o, "size"); });
  Each(m, false, "dst_array_devices", "Legs the array is built from.", ar, al, [](const json& o) { return Num(o, "raid_devices"); });
  Each(m, false, "dst_array_active_devices", "Legs in service (up to date).", ar, al, [](const json& o) { return Num(o, "active_devices"); });
  for (const json& a : ar)
    m.Gauge("dst_array_state", "1 for the array's current state (clean, degraded, resyncing, failed, ...).",
            {{"array", Str(a, "name")}, {"state", State(a, "state")}}, 1);
  Each(m, true, "dst_array_resynced_bytes_total", "Bytes copied by resyncs of the array.", ar, al,
       [](const json& o) { return Num(o, "bytes_resynced_total"); });
  IoFamilies(m, "array", CountedOf(ar, al));

  // Legs: one series per (array, slot).
  struct Leg {
    const json* array;
    const json* leg;
  };
  std::vector<Leg> legs;
  for (const json& a : ar)
    if (a.contains("legs") && a["legs"].is_array())
      for (const json& l : a["legs"]) legs.push_back({&a, &l});
  auto ll = [](const Leg& x) {
    return Labels{{"array", Str(*x.array, "name")}, {"leg", std::to_string(static_cast<long long>(Num(*x.leg, "slot")))},
                  {"device", Str(*x.leg, "device")}};
  };
  auto each_leg = [&](bool counter, const char* name, const char* help, const std::function<double(const json&)>& v) {
    for (const Leg& x : legs) {
      if (counter) m.Counter(name, help, ll(x), v(*x.leg));
      else m.Gauge(name, help, ll(x), v(*x.leg));
    }
  };
  for (const Leg& x : legs) {
    Labels l = ll(x);
    l.emplace_back("state", State(*x.leg, "state"));
    m.Gauge("dst_leg_state", "1 for the leg's current state (up_to_date, resyncing, failed, ...).", l, 1);
  }
  each_leg(false, "dst_leg_out_of_sync_bytes", "Bytes the leg misses (its dirty map).",
           [](const json& l) { return Num(l, "out_of_sync_bytes"); });
  std::vector<Counted> counted_legs;
  for (const Leg& x : legs)
    if (x.leg->contains("metrics") && (*x.leg)["metrics"].is_object()) counted_legs.push_back({ll(x), &(*x.leg)["metrics"]});
  IoFamilies(m, "leg", counted_legs);
  each_leg(true, "dst_leg_digest_errors_total", "Payload digest mismatches on the leg's connection.",
           [](const json& l) { return Num(l, "digest_errors"); });
  // Remote legs (dst://, dsts://, nbd://): their connection, like a volume's.
  std::vector<Leg> linked;
  for (const Leg& x : legs)
    if (x.leg->contains("link") && (*x.leg)["link"].is_object()) linked.push_back(x);
  auto each_link = [&](const char* name, const char* help, const char* key) {
    for (const Leg& x : linked) m.Counter(name, help, ll(x), Num((*x.leg)["link"], key));
  };
  for (const Leg& x : legs)
    m.Gauge("dst_leg_up", "1 while the leg's device answers (a remote leg's peer is reachable).", ll(x),
            x.leg->value("present", false) && x.leg->value("reachable", false) && !x.leg->value("unreachable", false) ? 1 : 0);
  each_link("dst_leg_reconnects_total", "Reconnections of the leg's connection.", "reconnects");
  each_link("dst_leg_timeouts_total", "Requests to the leg failed by io_timeout.", "timeouts");
  each_link("dst_leg_frames_sent_total", "Request frames the batched transmitter sent to the leg.", "frames_sent");
  each_link("dst_leg_send_calls_total", "System calls that sent them.", "send_calls");

  // Resync and verify progress, per running pass.
  for (const json& a : ar) {
    if (!a.contains("progress") || !a["progress"].is_array()) continue;
    for (const json& p : a["progress"]) {
      if (Str(p, "state") != "running" && Str(p, "state") != "pending") continue;
      const Labels l{{"array", Str(a, "name")}, {"leg", std::to_string(static_cast<long long>(Num(p, "leg")))}};
      m.Gauge("dst_resync_progress_ratio", "Done fraction of the leg's resync pass (0..1).", l, Num(p, "percent") / 100.0);
    }
  }
  for (const json& a : ar) {
    if (!a.contains("progress") || !a["progress"].is_array()) continue;
    for (const json& p : a["progress"]) {
      if (Str(p, "state") != "running" && Str(p, "state") != "pending") continue;
      const Labels l{{"array", Str(a, "name")}, {"leg", std::to_string(static_cast<long long>(Num(p, "leg")))}};
      m.Gauge("dst_resync_rate_bytes_per_second", "Current resync rate of the leg.", l, Num(p, "rate"));
    }
  }
  for (const json& a : ar) {
    const json& v = a.contains("verify") ? a["verify"] : json();
    if (!v.is_object()) continue;
    m.Gauge("dst_verify_progress_ratio", "Done fraction of the array's online verify (0..1).",
            {{"array", Str(a, "name")}, {"state", State(v, "state")}}, Num(v, "percent") / 100.0);
  }
  for (const json& a : ar) {
    const json& v = a.contains("verify") ? a["verify"] : json();
    if (!v.is_object()) continue;
    m.Gauge("dst_verify_rate_bytes_per_second", "Current rate of the array's online verify.",
            {{"array", Str(a, "name")}}, Num(v, "rate"));
  }
  for (const json& a : ar) {
    const json& v = a.contains("verify") ? a["verify"] : json();
    if (!v.is_object()) continue;
    m.Gauge("dst_verify_mismatched_bytes", "Bytes the array's last or running verify found to differ between legs.",
            {{"array", Str(a, "name")}}, Num(v, "mismatch_bytes"));
  }
  return m.text();
}

}  // namespace dst::daemon
