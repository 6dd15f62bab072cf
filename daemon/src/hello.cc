// `hello`: what this dstd speaks and offers (docs/control.md), so that a client can refuse a
// daemon too old for it instead of failing half-way through a command.
#include "daemon.h"

#ifndef DST_VERSION
#error "DST_VERSION must be defined by the build (daemon/CMakeLists.txt)"
#endif

namespace dst::daemon {

using nlohmann::json;
namespace ctl = dst::control;

const char* DaemonVersion() { return DST_VERSION; }

json Daemon::HelloJson() {
  json layers = json::array();
  for (const LayerInfo* l : Layers()) layers.push_back(l->name);  // the registry (dst/layer.h)
  json features = json::array({"events", "events_since", "fuse", "apply", "batch", "verify", "resolve",
                               "operations", "nbd_volumes"});
  if (nbd_) features.push_back("nbd");
  return json{{"protocol", ctl::kProtocolVersion},
              {"daemon", {{"name", "dstd"}, {"version", DaemonVersion()}}},
              {"methods", ctl::Methods()},
              {"layers", std::move(layers)},
              {"features", std::move(features)},
              {"events", {{"ring", EventLog::kDefaultCapacity}, {"last_seq", events_.last_seq()}}}};
}

}  // namespace dst::daemon
