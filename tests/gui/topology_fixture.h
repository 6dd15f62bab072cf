// Status snapshots of three hosts for the topology tests (docs/control.md `status` shape):
// cross-host dst:// legs and a volume, a stacked array, a wildcard listener and the default port.
#pragma once

#include <string>

#include <QString>
#include <nlohmann/json.hpp>

namespace dst::test {

using nlohmann::json;

inline const QString kA = "/run/a/dstd.sock", kB = "/run/b/dstd.sock", kC = "/run/c/dstd.sock";

inline json Daemon(const char* address, int port) {
  return {{"version", "0.1.0"}, {"pid", 1}, {"listen", {{"address", address}, {"port", port}}}};
}

inline json Export(const char* name) {
  return {{"name", name}, {"size", 16 << 20}, {"device", "file /srv/x.img"}, {"connections", 1},
          {"path", std::string("/srv/") + name + ".img"}};
}

inline json Leg(int slot, const std::string& spec, const char* state = "up-to-date", qint64 dirty = 0) {
  return {{"slot", slot}, {"spec", spec}, {"state", state}, {"out_of_sync_bytes", dirty},
          {"length", 16 << 20}, {"device", "file " + spec}, {"reason", "none"}};
}

inline json Array(const char* name, const char* state, json legs) {
  return {{"name", name}, {"id", std::string("id-") + name}, {"level", "mirror"},
          {"size", 16 << 20}, {"state", state}, {"assembled", true}, {"legs", std::move(legs)},
          {"progress", json::array()}, {"verify", nullptr}, {"file", nullptr}};
}

// A: exports e1, e2 on 127.0.0.1:7401; array m1 with a leg on C's e4 (C listens on the
// wildcard) and a stacked leg array:m2 (a local mirror).
inline json StatusA() {
  return {{"daemon", Daemon("127.0.0.1", 7401)},
          {"exports", {Export("e1"), Export("e2")}},
          {"volumes", json::array()},
          {"arrays",
           {Array("m1", "clean", {Leg(0, "dst://127.0.0.1:7403/e4"), Leg(1, "array:m2")}),
            Array("m2", "clean", {Leg(0, "/srv/a0.img"), Leg(1, "/srv/a1.img")})}}};
}

// B: export e3 on the default port 7400; volume v1 imports A's e2.
inline json StatusB() {
  return {{"daemon", Daemon("127.0.0.1", 7400)},
          {"exports", {Export("e3")}},
          {"volumes",
           {{{"name", "v1"}, {"size", 16 << 20}, {"state", "connected"}, {"file", "/mnt/v1.img"},
             {"source", "dst://127.0.0.1:7401/e2"}}}},
          {"arrays", json::array()}};
}

// C: export e4 on 0.0.0.0:7403; array m0 over a local file, A's e1 and B's e3 (no port: 7400),
// and a leg on an export nobody shows (no edge).
inline json StatusC(const char* leg1_state = "up-to-date", const char* m0_state = "clean") {
  return {{"daemon", Daemon("0.0.0.0", 7403)},
          {"exports", {Export("e4")}},
          {"volumes", json::array()},
          {"arrays",
           {Array("m0", m0_state,
                  {Leg(0, "/srv/c0.img", "up-to-date", 0),
                   Leg(1, "dst://127.0.0.1:7401/e1", leg1_state),
                   Leg(2, "dst://127.0.0.1/e3", "up-to-date", 0),
                   Leg(3, "dst://127.0.0.1:7999/gone")})}}};
}

}  // namespace dst::test
