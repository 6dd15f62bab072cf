// dstd events: what the engine pushes into its EventLog (events.h) and the `events` method.
//
// Sources, each emitted as it happens:
//   * leg_state, leg_reason, resync_started: MirrorDevice's leg listener, synchronously on the
//     thread that changed the leg (WatchLegs), so a state that lasts a millisecond is seen;
//   * array_state (assembled / removed / released), export_added / export_removed,
//     volume_removed, mount, verify_done, split_brain_resolved, leg_unreachable: where the
//     engine makes the change (arrays.cc, daemon.cc);
//   * volume_state of network volumes: the client's state listener (WatchVolume), as it changes;
//   * derived states (array_state clean / degraded / resyncing / failed, volume_state of local
//     volumes and of network ones before their client exists or while removing, the leg
//     states of linear and not yet assembled arrays), resync_progress, resync_done,
//     verify_progress, leg_identity, loop (devices over a FUSE file, from sysfs), export_clients:
//     the events thread re-derives them from the engine's JSON
//     at once after any pushed event and every 250 ms otherwise.  Progress goes through a
//     ProgressGate: at most 4 events a second per leg (per verify run).
#include <set>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "daemon.h"

namespace dst::daemon {

using nlohmann::json;
namespace ctl = dst::control;

namespace {
constexpr auto kEventsTick = std::chrono::milliseconds(250);
// A snapshot taken while events flood in may be overtaken by the ring; give up after this many.
constexpr int kSnapshotTries = 3;

// States a network volume's client pushes (WatchVolume); "removing" and the states before a
// client exists still come from the poller.
bool IsPushedVolumeState(const json& v) {
  static const std::set<std::string> kClient = {"connecting", "connected", "reconnecting",
                                                "failing", "closed"};
  return v["uri"].is_string() && kClient.count(v["state"].get<std::string>()) != 0;
}
}  // namespace

void Daemon::Emit(json ev) {
  events_.Emit(std::move(ev));
  PokeEvents();
}

void Daemon::PokeEvents() {
  // The events thread itself is awake: waking it again would only re-derive twice.
  if (std::this_thread::get_id() == events_tid_.load(std::memory_order_relaxed)) return;
  {
    std::lock_guard<std::mutex> l(ev_mu_);
    ev_poke_ = true;
  }
  ev_cv_.notify_all();
}

void Daemon::WatchLegs(const std::shared_ptr<Array>& a) {
  std::shared_ptr<MirrorDevice> m;
  {
    std::lock_guard<std::mutex> l(mu_);
    m = a->mirror;
  }
  if (!m) return;
  const std::string name = a->cfg.name;
  // Runs under the mirror's lock: only builds JSON and emits (EventLog never blocks).
  m->SetLegListener([this, name](const LegTransition& t) {
    const std::string device(t.device);
    if (t.from != t.to) {
      Emit(json{{"type", "leg_state"}, {"array", name}, {"slot", t.slot}, {"device", device},
                {"state", LegStateName(t.to)}, {"previous", LegStateName(t.from)},
                {"reason", LegReasonName(t.reason)}});
      if (t.to == LegState::kResyncing)
        Emit(json{{"type", "resync_started"}, {"array", name}, {"leg", t.slot}});
    }
    if (t.reason != t.reason_from)
      Emit(json{{"type", "leg_reason"}, {"array", name}, {"slot", t.slot}, {"device", device},
                {"reason", LegReasonName(t.reason)}, {"text", std::string(t.reason_text)},
                {"previous", LegReasonName(t.reason_from)}});
  });
  // The legs as assembled (transitions during assembly happen before the listener is set).
  for (const LegStatus& s : m->Legs()) {
    if (s.state == LegState::kEmpty) continue;
    Emit(json{{"type", "leg_state"}, {"array", name}, {"slot", s.slot}, {"device", s.describe},
              {"state", LegStateName(s.state)}, {"previous", nullptr},
              {"reason", LegReasonName(s.reason)}, {"assembled", true}});
  }
}

// A network volume's state is its client's connection state: pushed by the client as it
// changes (the poller leaves these volumes alone), so a reconnect that lasts 1 ms is seen.
void Daemon::WatchVolume(const std::string& name, net::ClientDevice& dev) {
  dev.SetStateListener([this, name](const char* from, const char* to) {
    Emit(json{{"type", "volume_state"}, {"volume", name}, {"state", to}, {"previous", from}});
  });
  Emit(json{{"type", "volume_state"}, {"volume", name}, {"state", dev.State()}, {"previous", nullptr}});
}

std::vector<std::string> Daemon::SnapshotLines(std::uint64_t seq) {
  std::vector<std::string> lines;
  auto add = [&](json ev) {
    ev["ts"] = EventLog::Now();
    ev["seq"] = seq;
    ev["initial"] = true;
    lines.push_back(ev.dump(-1, ' ', false, json::error_handler_t::replace) + "\n");
  };
  for (auto& a : ArraysJson()) {
    add(json{{"type", "array_state"}, {"array", a["name"]}, {"state", a["state"]}});
    for (auto& l : a["legs"])
      add(json{{"type", "leg_state"}, {"array", a["name"]}, {"slot", l["slot"]},
               {"spec", l["spec"]}, {"state", l["state"]}});
  }
  for (auto& v : VolumesJson())
    add(json{{"type", "volume_state"}, {"volume", v["name"]}, {"state", v["state"]}});
  return lines;
}

// `events`: the result first, then (same connection, in order) either the replay after
// `since` or a snapshot of the current state, then every event as it is emitted.
void Daemon::EventsRpc(const json& p, Reply reply, const json& id) {
  std::optional<std::uint64_t> since;
  if (auto it = p.find("since"); it != p.end() && !it->is_null()) {
    if (!it->is_number_unsigned()) {
      reply(ctl::EncodeError(id, ctl::kInvalidParams,
                             "parameter \"since\" must be a sequence number (0, 1, ...)"));
      return;
    }
    since = it->get<std::uint64_t>();
  }
  reply(ctl::EncodeResult(id, json{{"subscribed", true},
                                   {"first_seq", events_.first_seq()},
                                   {"last_seq", events_.last_seq()},
                                   {"capacity", EventLog::kDefaultCapacity}}));
  EventLog::Sink sink = [reply](const std::string& line) { return reply(line); };
  if (since) {
    EventLog::Subscribed r = events_.Subscribe(*since, sink);
    if (!r.gap) return;  // replayed and live, or the client is gone
    spdlog::info("events: a client resumed after seq {}, but the ring starts at {} (last {}); "
                 "it gets a fresh snapshot", *since, r.first_seq, r.last_seq);
  }
  for (int i = 0; i < kSnapshotTries; ++i) {
    std::uint64_t at = events_.last_seq();
    for (const std::string& line : SnapshotLines(at))
      if (!reply(line)) return;
    if (!events_.Subscribe(at, sink).gap) return;
  }
  spdlog::warn("events: the ring overtook {} snapshots in a row; closing the subscription",
               kSnapshotTries);
  reply(json{{"type", "error"}, {"ts", EventLog::Now()},
             {"message", "events arrive faster than a snapshot can be taken"}}.dump() + "\n");
}

void Daemon::EventsLoop() {
  std::map<std::string, std::string> arr_state, leg_state, leg_reason, vol_state;
  std::map<std::string, json> loops;               // "volume:NAME" / "array:NAME" -> devices
  std::map<std::string, std::uint64_t> export_conns;
  std::map<std::string, std::uint64_t> leg_idev;
  std::map<std::string, json> last_resync;
  bool first = true;
  events_tid_.store(std::this_thread::get_id(), std::memory_order_relaxed);
  for (;;) {
    {
      std::unique_lock<std::mutex> l(ev_mu_);
      if (ev_cv_.wait_for(l, kEventsTick, [this] { return ev_stop_ || ev_poke_; }) && ev_stop_)
        return;
      ev_poke_ = false;
    }
    json arrays = ArraysJson();
    json vols = VolumesJson();
    std::set<std::string> seen_arrays;
    const double now = EventLog::Now();
    for (auto& a : arrays) {
      std::string name = a["name"];
      seen_arrays.insert(name);
      std::string st = a["state"];
      auto& prev = arr_state[name];
      if (!first && prev != st)
        Emit(json{{"type", "array_state"}, {"array", name}, {"state", st},
                  {"previous", prev.empty() ? json() : json(prev)}});
      prev = st;
      const bool pushed = a.value("level", "") == "mirror" && a.value("assembled", false);
      for (auto& l : a["legs"]) {
        std::string key = name + "/" + std::to_string(l["slot"].get<int>());
        std::string ls = l["state"];
        auto& lp = leg_state[key];
        if (!first && !pushed && lp != ls) {
          json ev{{"type", "leg_state"}, {"array", name}, {"slot", l["slot"]}, {"spec", l["spec"]},
                  {"state", ls}, {"previous", lp.empty() ? json() : json(lp)},
                  {"out_of_sync_bytes", l["out_of_sync_bytes"]}};
          Emit(std::move(ev));
        }
        lp = ls;
        // Identity reason changes (blank, foreign, split-brain, claimed...): the event comes
        // from the leg listener; the log line from here (not under the mirror's lock).
        std::string reason = l.value("reason", std::string("none"));
        auto& rp = leg_reason[key];
        if (!first && rp != reason && !(rp.empty() && reason == "none")) {
          std::string text = l.value("reason_text", std::string());
          if (reason != "none")
            spdlog::warn("array \"{}\": leg {} ({}) out of service: {}", name,
                         l["slot"].get<int>(), l.value("spec", std::string()), text);
          else
            spdlog::info("array \"{}\": leg {} ({}) identity ok again", name, l["slot"].get<int>(),
                         l.value("spec", std::string()));
        }
        rp = reason;
        // Findings that healed between two ticks (a blank leg re-initialised at once) too.
        std::uint64_t nev = l.value("identity_events", std::uint64_t{0});
        auto& ep = leg_idev[key];
        if (!first && nev > ep) {
          std::string text = l.value("identity_event", std::string());
          Emit(json{{"type", "leg_identity"}, {"array", name}, {"slot", l["slot"]},
                    {"spec", l["spec"]}, {"event", text}, {"count", nev}});
          spdlog::warn("array \"{}\": leg {} ({}): {}", name, l["slot"].get<int>(),
                       l.value("spec", std::string()), text);
        }
        ep = nev;
      }
      VerifyEvents(a);
      for (auto& p : a["progress"]) {
        std::string key = name + "/" + std::to_string(p["leg"].get<int>());
        std::string pst = p["state"];
        // Progress of every active pass, at most 4 a second per leg.
        if ((pst == "running" || pst == "pending" || pst == "paused") &&
            progress_gate_.Allow("resync:" + key, now))
          Emit(json{{"type", "resync_progress"}, {"array", name}, {"leg", p["leg"]},
                    {"state", pst}, {"bytes_done", p["bytes_done"]},
                    {"bytes_total", p["bytes_total"]}, {"percent", p["percent"]},
                    {"rate", p["rate"]}, {"eta_seconds", p["eta_seconds"]}});
        // A pass ended (possibly between two ticks): report its final accounting once.
        json& lp = last_resync[key];
        std::uint64_t total = p["bytes_resynced_total"];
        bool ended = (pst == "done" || pst == "failed") &&
                     (lp.is_null() || lp["state"] != pst || lp["bytes_resynced_total"] != total);
        if (ended && !first) {
          Emit(json{{"type", "resync_done"}, {"array", name}, {"leg", p["leg"]},
                    {"state", pst}, {"leg_state", p["leg_state"]},
                    {"bytes_resynced_total", total}});
          progress_gate_.Forget("resync:" + key);
        }
        lp = json{{"state", pst}, {"bytes_resynced_total", total}};
      }
    }
    for (auto it = arr_state.begin(); it != arr_state.end();) {
      if (seen_arrays.count(it->first)) { ++it; continue; }
      it = arr_state.erase(it);
    }
    for (auto& v : vols) {
      std::string name = v["name"];
      std::string st = v["state"];
      auto& prev = vol_state[name];
      if (!first && prev != st && !IsPushedVolumeState(v))
        Emit(json{{"type", "volume_state"}, {"volume", name}, {"state", st},
                  {"previous", prev.empty() ? json() : json(prev)}});
      prev = st;
    }
    // Loop devices over the FUSE files (sysfs, so also ones made or removed by hand with
    // losetup) and clients per export: the GUI's tree shows both, so a change is an event.
    auto loop_event = [&](const std::string& kind, const json& o) {
      json devs = json::array();
      for (const auto& d : o.value("loop_devices", json::array())) devs.push_back(d.value("device", ""));
      json& prev = loops[kind + ":" + o.value("name", "")];
      if (!first && !prev.is_null() && prev != devs)
        Emit(json{{"type", "loop"},
                  {"state", devs.empty() ? "detached" : prev.empty() ? "attached" : "changed"},
                  {kind, o["name"]}, {"devices", devs}});
      prev = devs;
    };
    // An array's own volume shows the array's file: report it once, as the array.
    for (auto& v : vols)
      if (!seen_arrays.count(v.value("name", ""))) loop_event("volume", v);
    for (auto& a : arrays) loop_event("array", a);
    for (auto& e : ExportsJson()) {
      const std::uint64_t n = e.value("connections", std::uint64_t{0});
      auto [it, added] = export_conns.try_emplace(e.value("name", ""), n);
      if (!added && it->second != n)
        Emit(json{{"type", "export_clients"}, {"export", e["name"]}, {"connections", n},
                  {"previous", it->second}});
      it->second = n;
    }
    first = false;
  }
}

}  // namespace dst::daemon
