// The layer registry (dst/layer.h): the list of layers and the checks every front end shares.
#include "dst/layer.h"

#include <charconv>

namespace dst {

// The registered layers, in the order `dstctl array layers` lists them.  Each X(Fn) names a
// `const LayerInfo& Fn()` defined in the layer's device file: one line registers a layer.
#define DST_LAYERS(X) \
  X(LinearLayer)      \
  X(MirrorLayer)      \
  X(Raid0Layer)       \
  /* one line per layer, above this one */

#define DST_DECLARE_LAYER(fn) const LayerInfo& fn();
DST_LAYERS(DST_DECLARE_LAYER)
#undef DST_DECLARE_LAYER

const std::vector<const LayerInfo*>& Layers() {
#define DST_LIST_LAYER(fn) &fn(),
  static const std::vector<const LayerInfo*> layers = {DST_LAYERS(DST_LIST_LAYER)};
#undef DST_LIST_LAYER
  return layers;
}

const LayerInfo* FindLayer(std::string_view name) {
  for (const LayerInfo* l : Layers())
    if (l->name == name) return l;
  return nullptr;
}

std::string LayerNames() {
  std::string s;
  for (const LayerInfo* l : Layers()) s += (s.empty() ? "" : ", ") + l->name;
  return s;
}

const LayerKey* FindLayerKey(const LayerInfo& layer, std::string_view key) {
  for (const LayerKey& k : layer.keys)
    if (k.name == key) return &k;
  return nullptr;
}

const char* LayerKeyTypeName(LayerKey::Type t) {
  switch (t) {
    case LayerKey::Type::kSize: return "size";
    case LayerKey::Type::kUInt: return "integer";
    case LayerKey::Type::kBool: return "bool";
    case LayerKey::Type::kString: return "string";
    case LayerKey::Type::kRate: return "rate";
  }
  return "?";
}

const char* LegChangeName(LegChange c) {
  switch (c) {
    case LegChange::kFixed: return "fixed";
    case LegChange::kAppend: return "append";
    case LegChange::kReplace: return "replace";
  }
  return "?";
}

std::uint64_t LayerParamU64(const LayerParams& params, const std::string& key) {
  auto it = params.find(key);
  if (it == params.end()) return 0;
  std::uint64_t v = 0;
  const std::string& s = it->second;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  return ec == std::errc() && p == s.data() + s.size() ? v : 0;
}

LayerParams StructuralParams(const LayerInfo& layer, LayerParams params) {
  for (const LayerKey& k : layer.keys)
    if (k.live) params.erase(k.name);
  return params;
}

void CopyLiveParams(const LayerInfo& layer, const LayerParams& from, LayerParams* to) {
  for (const LayerKey& k : layer.keys)
    if (auto it = from.find(k.name); k.live && it != from.end()) (*to)[k.name] = it->second;
}

Result<LayerParams> ResolveLayerParams(const LayerInfo& layer, const LayerParams& given) {
  LayerParams out;
  for (const auto& [k, v] : given) {
    const LayerKey* key = FindLayerKey(layer, k);
    if (!key)
      return Status::InvalidArgument("a " + layer.name + " array has no key \"" + k + "\"");
    bool canonical = true;
    if (key->type == LayerKey::Type::kBool) canonical = v == "true" || v == "false";
    if (key->type == LayerKey::Type::kSize || key->type == LayerKey::Type::kUInt ||
        key->type == LayerKey::Type::kRate) {
      std::uint64_t n = 0;
      auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
      canonical = !v.empty() && ec == std::errc() && p == v.data() + v.size();
    }
    if (!canonical)
      return Status::InvalidArgument(k + ": bad " + LayerKeyTypeName(key->type) + " \"" + v + "\"");
    out[k] = v;
  }
  for (const LayerKey& k : layer.keys)
    if (!out.count(k.name) && !k.default_value.empty()) out[k.name] = k.default_value;
  if (layer.check) DST_RETURN_IF_ERROR(layer.check(out));
  return out;
}

Status CheckLegCount(const LayerInfo& layer, std::size_t legs) {
  const LegRules& r = layer.legs;
  auto plural = [](int n) { return std::to_string(n) + (n == 1 ? " leg" : " legs"); };
  if (legs < std::size_t(r.min_legs))
    return Status::InvalidArgument("a " + layer.name + " needs at least " + plural(r.min_legs) +
                                   ", got " + std::to_string(legs));
  if (legs > std::size_t(r.max_legs))
    return Status::InvalidArgument("a " + layer.name + " has at most " + plural(r.max_legs) +
                                   ", got " + std::to_string(legs));
  return Status::OK();
}

}  // namespace dst
