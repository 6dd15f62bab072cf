// Layer registry: one descriptor per array layer (linear, mirror, raid0, ...), in one list.
//
// A layer says here what everything outside its device needs to know about it: its name, its
// own configuration keys (type, default, help), its leg rules (how many, same size or not,
// read-only legs or not, how legs may change live, how the array size derives from them), its
// CLI help text and a factory that builds the device from its legs and key values.  The daemon's
// config parser, array creation, planner and JSON, and (through the daemon's `array.layers`
// method and the arrays' "layer" objects) dstctl's help and the status/detail rendering, all
// read this list; none of them names a layer.  A new layer is one device file defining
// `const LayerInfo& <Name>Layer()` plus one line in the list in layer.cc (see
// docs/architecture.md, "Layer registry").
//
// Key values travel as canonical text (LayerParams): sizes and integers in decimal bytes/units,
// booleans "true"/"false", strings as given.  Turning user text ("64K") into canonical text is
// the front end's job (the daemon has the size parser); the registry checks canonical values.
//
// Threading: the registry is immutable after first use; every function here is thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "dst/block_device.h"
#include "dst/status.h"

namespace dst {

// One layer-specific configuration key ([[array]] KEY = VALUE, dstctl array create --set).
struct LayerKey {
  // kRate: bytes per second, 0 allowed (e.g. "unlimited"); kSize: a positive byte count.
  enum class Type { kSize, kUInt, kBool, kString, kRate };
  std::string name;
  Type type = Type::kString;
  std::string default_value;  // canonical text; "" = no default (the key is optional)
  std::string help;
  std::string label;  // how `array detail` names it ("Chunk Size"); "" = not shown there
  // May change on a live array (a tuning knob such as a resync rate): the config file's value
  // then wins over the recorded topology instead of counting as a structural difference.
  bool live = false;
};
const char* LayerKeyTypeName(LayerKey::Type t);

// Key name -> canonical value.
using LayerParams = std::map<std::string, std::string>;

// How the legs of a live array may change.
enum class LegChange {
  kFixed,    // never (the geometry depends on every leg)
  kAppend,   // legs may be appended (grow)
  kReplace,  // legs may be added, failed, removed and re-added (redundant layers)
};
const char* LegChangeName(LegChange c);

struct LegRules {
  int min_legs = 1;
  int max_legs = 1;
  bool same_size = false;       // the smallest leg sets every leg's usable size
  bool read_only_legs = false;  // a read-only leg is allowed
  LegChange change = LegChange::kFixed;
  std::string size_rule;        // for humans: "sum of the legs", ...
};

struct LayerInfo {
  std::string name;   // [[array]] level = NAME
  std::string title;  // `array detail` "Raid Level"
  std::string help;   // one paragraph for `dstctl array layers`
  std::vector<LayerKey> keys;
  LegRules legs;
  // Redundant layers keep per-leg state (identity headers, out-of-sync maps, resync); the
  // engine builds them with that state (MirrorDevice::Create/Assemble) and `create` is null.
  bool redundant = false;
  // Checks the values of this layer's keys beyond their types (every key present: defaults are
  // filled in first).  nullptr: the types are enough.
  Status (*check)(const LayerParams& params) = nullptr;
  // The array size these legs give with these values (0: they give no usable array).
  std::uint64_t (*usable_size)(const std::vector<DeviceInfo>& legs, const LayerParams& params) =
      nullptr;
  // Builds the device over every leg in slot order (stateless layers).
  Result<std::shared_ptr<BlockDevice>> (*create)(std::vector<std::shared_ptr<BlockDevice>> legs,
                                                 const LayerParams& params) = nullptr;
};

// All registered layers, in registration order.
const std::vector<const LayerInfo*>& Layers();
// nullptr when no layer has that name.
const LayerInfo* FindLayer(std::string_view name);
// "linear, mirror, ..." for messages.
std::string LayerNames();
// A layer's key by name, or nullptr.
const LayerKey* FindLayerKey(const LayerInfo& layer, std::string_view key);

// `given` with the defaults filled in, after refusing keys the layer does not have and running
// the layer's check.
Result<LayerParams> ResolveLayerParams(const LayerInfo& layer, const LayerParams& given);
// Refuses a leg count outside the layer's rules ("a mirror needs 2..8 legs, got 1").
Status CheckLegCount(const LayerInfo& layer, std::size_t legs);
// `params` without the layer's live keys (LayerKey::live): what must match for two configs of
// an array to describe the same structure.
LayerParams StructuralParams(const LayerInfo& layer, LayerParams params);
// Copies the layer's live keys that `from` has into `*to`.
void CopyLiveParams(const LayerInfo& layer, const LayerParams& from, LayerParams* to);
// A canonical unsigned value of `params` (0 when absent or not a number).
std::uint64_t LayerParamU64(const LayerParams& params, const std::string& key);

}  // namespace dst
