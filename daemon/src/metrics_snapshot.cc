// Daemon::MetricsJson: the `status` snapshot plus what only the metrics endpoint shows (per
// export, volume, array and leg: I/O counts, in-flight requests, latency histograms).  The
// extra members come from the CountingDevices every consumer already goes through, read after
// the status snapshot: a scrape may see a request in a counter that the status did not count
// yet, never the other way round, and never a state that disagrees with `status`.
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "daemon.h"

namespace dst::daemon {

using nlohmann::json;

namespace {

json HistogramJson(const LatencyHistogram& h) {
  const LatencyHistogram::Snapshot s = h.Get();
  json b = json::array();
  for (int i = 0; i < LatencyHistogram::kBuckets; ++i) b.push_back(s.buckets[i]);
  return json{{"buckets", std::move(b)}, {"count", s.count}, {"sum_ns", s.sum_ns}};
}

json DeviceMetrics(const CountingDevice& d) {
  using C = CountingDevice::OpClass;
  const DeviceCounters c = d.Counters();
  return json{{"io",
               {{"reads", c.reads},
                {"writes", c.writes},
                {"other", c.other},
                {"bytes_read", c.bytes_read},
                {"bytes_written", c.bytes_written},
                {"errors", c.errors},
                {"inflight", c.inflight}}},
              {"latency",
               {{"read", HistogramJson(d.Latency(C::kRead))},
                {"write", HistogramJson(d.Latency(C::kWrite))},
                {"other", HistogramJson(d.Latency(C::kOther))}}}};
}

using Counters = std::map<std::string, std::shared_ptr<CountingDevice>>;

// Adds "metrics" to each object of `list` whose "name" has a counter.
void Decorate(json& list, const Counters& by_name) {
  if (!list.is_array()) return;
  for (json& o : list) {
    if (!o.is_object() || !o.contains("name") || !o["name"].is_string()) continue;
    auto it = by_name.find(o["name"].get<std::string>());
    if (it != by_name.end() && it->second) o["metrics"] = DeviceMetrics(*it->second);
  }
}

}  // namespace

json Daemon::MetricsJson() {
  json st = StatusJson();
  Counters exports, volumes;
  std::map<std::string, std::vector<std::shared_ptr<CountingDevice>>> legs;  // by array, slot
  {
    std::lock_guard<std::mutex> l(mu_);
    exports = export_io_;
    for (const auto& [name, v] : volumes_)
      if (v->counter) volumes[name] = v->counter;  // arrays too: each is also a volume
    for (const auto& [name, a] : arrays_) {
      auto& v = legs[name];
      for (const auto& leg : a->legs) v.push_back(leg.counter);
    }
  }
  Decorate(st["exports"], exports);
  Decorate(st["volumes"], volumes);
  Decorate(st["arrays"], volumes);
  if (!st["arrays"].is_array()) return st;
  for (json& a : st["arrays"]) {
    if (!a.is_object() || !a.contains("legs") || !a["legs"].is_array()) continue;
    auto it = legs.find(a.value("name", std::string()));
    if (it == legs.end()) continue;
    for (json& leg : a["legs"]) {
      if (!leg.is_object() || !leg.contains("slot") || !leg["slot"].is_number_integer()) continue;
      const auto slot = leg["slot"].get<std::int64_t>();
      if (slot >= 0 && static_cast<std::size_t>(slot) < it->second.size() && it->second[slot])
        leg["metrics"] = DeviceMetrics(*it->second[slot]);
    }
  }
  return st;
}

}  // namespace dst::daemon
