#include "layer_json.h"

#include "dst/layer.h"

namespace dst::daemon {

using nlohmann::json;

json LayersJson() {
  json out = json::array();
  for (const LayerInfo* l : Layers()) {
    json keys = json::array();
    for (const LayerKey& k : l->keys)
      keys.push_back({{"name", k.name},
                      {"type", LayerKeyTypeName(k.type)},
                      {"default", k.default_value},
                      {"help", k.help},
                      {"label", k.label}});
    out.push_back({{"name", l->name},
                   {"title", l->title},
                   {"help", l->help},
                   {"redundant", l->redundant},
                   {"keys", std::move(keys)},
                   {"legs",
                    {{"min", l->legs.min_legs},
                     {"max", l->legs.max_legs},
                     {"same_size", l->legs.same_size},
                     {"read_only_legs", l->legs.read_only_legs},
                     {"change", LegChangeName(l->legs.change)},
                     {"size", l->legs.size_rule}}}});
  }
  return json{{"layers", std::move(out)}};
}

json LayerJson(const ArrayConfig& cfg) {
  const LayerInfo* l = FindLayer(cfg.level);
  json params = json::array();
  if (l)
    for (const LayerKey& k : l->keys) {
      auto it = cfg.params.find(k.name);
      if (it == cfg.params.end()) continue;
      params.push_back({{"name", k.name},
                        {"type", LayerKeyTypeName(k.type)},
                        {"label", k.label},
                        {"value", it->second}});
    }
  return json{{"name", cfg.level},
              {"title", l ? l->title : cfg.level},
              {"redundant", l && l->redundant},
              {"params", std::move(params)}};
}

}  // namespace dst::daemon
