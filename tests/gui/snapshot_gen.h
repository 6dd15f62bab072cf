// SnapshotGen: a deterministic pseudo-random world of hosts whose `status` results (in the
// shape of docs/control.md) change one step at a time: exports, volumes, arrays and legs added
// and removed, leg and array states, out-of-sync bytes, resync and verify passes starting,
// advancing and ending, stacked legs (`array:NAME`, `volume:NAME`, cycles included) and hosts
// going offline or being removed from the GUI and added again.  The model tests feed every step to a model and check the end result.
#pragma once

#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace dst::test {

class SnapshotGen {
 public:
  struct Host {
    std::string path;
    bool online = true;
    bool present = true;  // false: taken out of the GUI's host list (removeHost)
    nlohmann::json status;
  };

  SnapshotGen(unsigned seed, int hosts) : rng_(seed) {
    for (int i = 0; i < hosts; ++i) {
      Host h;
      h.path = "/run/host" + std::to_string(i) + "/dstd.sock";
      h.status = {{"version", 1},
                  {"daemon", {{"version", "0.1.0"}, {"pid", 100 + i}}},
                  {"exports", nlohmann::json::array()},
                  {"volumes", nlohmann::json::array()},
                  {"arrays", nlohmann::json::array()},
                  {"mount", nullptr}};
      hosts_.push_back(h);
    }
  }

  std::vector<Host>& hosts() { return hosts_; }

  // Changes one thing on one host; returns its index.
  int Step() {
    int hi = Pick(int(hosts_.size()));
    Host& h = hosts_[std::size_t(hi)];
    nlohmann::json& s = h.status;
    auto& ex = s["exports"];
    auto& vol = s["volumes"];
    auto& arr = s["arrays"];
    switch (Pick(16)) {
      case 0:
      case 1:
        if (ex.size() < 6) ex.push_back(Export());
        break;
      case 2:
        Erase(ex);
        break;
      case 3:
        if (vol.size() < 4) vol.push_back(Volume());
        break;
      case 4:
        Erase(vol);
        break;
      case 5:
      case 6:
        if (arr.size() < 5) arr.push_back(Array(s));
        break;
      case 7:
        Erase(arr);
        break;
      case 8:
        if (auto* a = Any(arr); a && (*a)["legs"].size() < 4) (*a)["legs"].push_back(Leg(s, *a));
        break;
      case 9:
        if (auto* a = Any(arr)) Erase((*a)["legs"]);
        break;
      case 10:
        if (auto* a = Any(arr))
          if (auto* l = Any((*a)["legs"])) {
            static const char* const kStates[] = {"up-to-date", "failed", "detached", "resyncing"};
            (*l)["state"] = kStates[Pick(4)];
            (*l)["out_of_sync_bytes"] = Pick(4) * 65536;
            (*l)["reason"] = Pick(2) ? "none" : "io_error";
          }
        break;
      case 11:
      case 12:
        if (auto* a = Any(arr)) Resync(*a);
        break;
      case 13:
        if (auto* a = Any(arr)) Verify(*a);
        break;
      case 14:
        if (auto* a = Any(arr)) {
          static const char* const kStates[] = {"clean", "degraded", "resyncing", "split-brain",
                                                "failed"};
          (*a)["state"] = kStates[Pick(5)];
        }
        break;
      case 15:
        if (int r = Pick(6); r < 2) {
          h.online = !h.online;
        } else if (r == 2) {
          h.present = !h.present;
        } else if (auto* v = Any(vol)) {
          (*v)["file"] = (*v)["file"].is_null() ? nlohmann::json("/mnt/" + (*v)["name"].get<std::string>() + ".img")
                                                : nlohmann::json(nullptr);
          (*v)["state"] = Pick(2) ? "connected" : "reconnecting";
        } else if (auto* e = Any(ex)) {
          (*e)["connections"] = Pick(3);
        }
        break;
    }
    return hi;
  }

 private:
  int Pick(int n) { return std::uniform_int_distribution<int>(0, n - 1)(rng_); }
  std::string Name(const char* prefix) { return prefix + std::to_string(next_++); }
  nlohmann::json* Any(nlohmann::json& list) {
    if (list.empty()) return nullptr;
    return &list[std::size_t(Pick(int(list.size())))];
  }
  void Erase(nlohmann::json& list) {
    if (!list.empty()) list.erase(std::size_t(Pick(int(list.size()))));
  }

  nlohmann::json Export() {
    std::string n = Name("e");
    return {{"name", n}, {"size", (1 + Pick(64)) << 20}, {"read_only", Pick(4) == 0},
            {"device", "file /srv/" + n + ".img"}, {"connections", 0}, {"path", "/srv/" + n + ".img"}};
  }
  nlohmann::json Volume() {
    return {{"name", Name("v")}, {"size", (1 + Pick(64)) << 20}, {"state", "connected"},
            {"file", nullptr}, {"source", "dst://127.0.0.1/x"}};
  }
  nlohmann::json Leg(const nlohmann::json& status, const nlohmann::json& array) {
    int slot = 0;
    for (const auto& l : array["legs"]) slot = std::max(slot, l["slot"].get<int>() + 1);
    std::string spec = "/srv/" + Name("l") + ".img";
    // Now and then a stacked leg: another array or a volume of this host (maybe a cycle).
    if (Pick(4) == 0 && !status["arrays"].empty())
      spec = "array:" + status["arrays"][std::size_t(Pick(int(status["arrays"].size())))]["name"].get<std::string>();
    else if (Pick(6) == 0 && !status["volumes"].empty())
      spec = "volume:" + status["volumes"][0]["name"].get<std::string>();
    return {{"slot", slot}, {"spec", spec}, {"state", "up-to-date"}, {"out_of_sync_bytes", 0},
            {"device", "file " + spec}, {"reason", "none"}};
  }
  nlohmann::json Array(const nlohmann::json& status) {
    std::string n = Name("m");
    nlohmann::json a = {{"name", n},         {"id", "id-" + n},
                        {"level", Pick(3) ? "mirror" : "linear"},
                        {"size", (8 + Pick(64)) << 20}, {"state", "clean"},
                        {"assembled", true},  {"legs", nlohmann::json::array()},
                        {"progress", nlohmann::json::array()}, {"verify", nullptr},
                        {"file", Pick(2) ? nlohmann::json("/mnt/" + n + ".img") : nlohmann::json(nullptr)}};
    for (int i = 1 + Pick(3); i > 0; --i) a["legs"].push_back(Leg(status, a));
    return a;
  }
  // Starts, advances or ends a resync pass of one leg.
  void Resync(nlohmann::json& a) {
    auto* l = Any(a["legs"]);
    if (!l) return;
    int leg = (*l)["slot"];
    auto& progress = a["progress"];
    for (std::size_t i = 0; i < progress.size(); ++i) {
      auto& p = progress[i];
      if (p["leg"] != leg) continue;
      if (Pick(4) == 0) {  // done
        progress.erase(i);
        (*l)["state"] = "up-to-date";
        return;
      }
      std::int64_t total = p["bytes_total"], done = p["bytes_done"];
      done = std::min(total, done + std::int64_t(Pick(8)) * 1048576);
      p["bytes_done"] = done;
      p["rate"] = Pick(5) * 1048576;
      p["percent"] = 100.0 * double(done) / double(total);
      p["eta_seconds"] = Pick(3) == 0 ? -1.0 : double(Pick(100));
      return;
    }
    (*l)["state"] = "resyncing";
    progress.push_back({{"leg", leg}, {"state", "running"}, {"leg_state", "resyncing"},
                        {"bytes_done", 0}, {"bytes_total", std::int64_t(16) << 20},
                        {"percent", 0.0}, {"rate", 0}, {"eta_seconds", -1.0}});
  }
  void Verify(nlohmann::json& a) {
    auto& v = a["verify"];
    if (!v.is_object() || v["state"] != "running") {
      v = {{"state", "running"}, {"bytes_done", 0}, {"bytes_total", a["size"]}, {"percent", 0.0},
           {"rate", 0}, {"eta_seconds", -1.0}, {"run", 1}};
    } else if (Pick(3) == 0) {
      v["state"] = "done";
    } else {
      std::int64_t done = v["bytes_done"].get<std::int64_t>() + 1048576;
      v["bytes_done"] = std::min(done, v["bytes_total"].get<std::int64_t>());
      v["percent"] = 100.0 * v["bytes_done"].get<double>() / v["bytes_total"].get<double>();
      v["rate"] = (1 + Pick(4)) * 1048576;
    }
  }

  std::mt19937 rng_;
  std::vector<Host> hosts_;
  int next_ = 0;
};

}  // namespace dst::test
