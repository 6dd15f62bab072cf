// The layer registry (dst/layer.h) as JSON for the control socket: the `array.layers` method
// and the "layer" object of every array.  dstctl and the GUI take help texts, key lists and detail
// labels from here, so dst_control links no engine library and names no layer.
#pragma once

#include <nlohmann/json.hpp>

#include "dst/daemon/config.h"

namespace dst::daemon {

// Every registered layer: name, title, help, keys (type, default, help, label), leg rules.
nlohmann::json LayersJson();
// One array's layer: name, title, redundant, and its key values with their labels and types.
nlohmann::json LayerJson(const ArrayConfig& cfg);

}  // namespace dst::daemon
