// The Prometheus families of dstd (issue 14 item 1), rendered from the `status` object the
// control protocol returns (docs/control.md), so the endpoint and `dstctl status --json` can
// never disagree: both are the same snapshot.  docs/metrics.md lists the families.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace dst::daemon {

std::string StatusToMetrics(const nlohmann::json& status);

}  // namespace dst::daemon
