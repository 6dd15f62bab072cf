#include "complete.h"

#include <algorithm>
#include <cstdio>
#include <set>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "dst/control/control_client.h"

namespace dst::cli {

namespace {

using nlohmann::json;
namespace ctl = dst::control;

// What a position takes, when dstd knows the candidates.
enum class Kind { kNone, kExport, kVolume, kArray, kLayer, kSlot, kFile };

// One request with a short deadline; null on any failure (completion stays silent).
json Ask(const std::string& socket, const std::string& method, const json& params) {
  ctl::ControlClient c;
  if (c.Connect(socket) != 0) return nullptr;
  ctl::Reply r;
  std::string why;
  if (!c.Call(method, params, &r, &why, 1000) || !r.ok) return nullptr;
  return r.result;
}

// The `key` field of every object in result[list].
std::vector<std::string> Names(const json& result, const char* list, const char* key) {
  std::vector<std::string> out;
  if (!result.is_object() || !result.contains(list) || !result[list].is_array()) return out;
  for (const auto& o : result[list]) {
    if (!o.is_object() || !o.contains(key)) continue;
    out.push_back(o[key].is_string() ? o[key].get<std::string>() : o[key].dump());
  }
  return out;
}

std::vector<std::string> Lookup(Kind k, const std::string& socket, const std::string& array) {
  switch (k) {
    case Kind::kExport: return Names(Ask(socket, "export.list", json::object()), "exports", "name");
    case Kind::kVolume: {
      // volume.list shows each array's volume too; those go with `array remove`.
      auto v = Names(Ask(socket, "volume.list", json::object()), "volumes", "name");
      const auto a = Names(Ask(socket, "array.list", json::object()), "arrays", "name");
      v.erase(std::remove_if(v.begin(), v.end(), [&](const std::string& n) { return std::find(a.begin(), a.end(), n) != a.end(); }),
              v.end());
      return v;
    }
    case Kind::kArray: return Names(Ask(socket, "array.list", json::object()), "arrays", "name");
    // A <name>.img on the FUSE mount: every volume, an array's own volume included.
    case Kind::kFile: return Names(Ask(socket, "volume.list", json::object()), "volumes", "name");
    case Kind::kLayer: return Names(Ask(socket, "array.layers", json::object()), "layers", "name");
    case Kind::kSlot:
      if (array.empty()) return {};
      return Names(Ask(socket, "array.detail", json{{"name", array}}), "legs", "slot");
    case Kind::kNone: break;
  }
  return {};
}

// The kind of a positional argument, by the command path and the positional's name.
Kind PositionalKind(const std::vector<std::string>& path, const std::string& pos) {
  const std::string top = path.empty() ? "" : path[0];
  const std::string sub = path.size() > 1 ? path[1] : "";
  if (pos == "NAME") {
    if (top == "export" && (sub == "remove" || sub == "allow")) return Kind::kExport;
    if (top == "volume" && sub == "remove") return Kind::kVolume;
    if (top == "detail") return Kind::kArray;
    if (top == "loop") return Kind::kFile;
    if (top == "array" && sub != "create" && sub != "import") return Kind::kArray;
  }
  if (pos == "SLOT") return Kind::kSlot;
  return Kind::kNone;
}

Kind OptionKind(const std::string& name) {
  if (name == "--array") return Kind::kArray;
  if (name == "--volume") return Kind::kVolume;
  if (name == "--level") return Kind::kLayer;
  if (name == "--keep") return Kind::kSlot;
  return Kind::kNone;
}

// An option of `app` or of a parent (dstctl's global options fall through) by "--long" or "-s".
const CLI::Option* FindOption(const CLI::App* app, const std::string& word) {
  for (; app; app = app->get_parent()) {
    for (const CLI::Option* o : app->get_options()) {
      if (o->get_positional()) continue;
      for (const auto& l : o->get_lnames())
        if (word == "--" + l) return o;
      for (const auto& s : o->get_snames())
        if (word == "-" + s) return o;
    }
  }
  return nullptr;
}

const CLI::App* FindSub(const CLI::App* app, const std::string& word) {
  for (const CLI::App* s : app->get_subcommands([](const CLI::App*) { return true; }))
    if (s->get_name() == word) return s;
  return nullptr;
}

bool TakesValue(const CLI::Option* o) { return o->get_type_size_max() != 0 && o->get_items_expected_max() != 0; }

}  // namespace

int Complete(const CLI::App& app, const std::vector<std::string>& words, std::string socket) {
  if (words.empty()) return 0;
  const CLI::App* cur = &app;
  std::vector<std::string> path, positionals;
  const CLI::Option* pending = nullptr;  // an option whose value comes next
  auto is_socket = [](const CLI::Option* o) { return o && o->check_lname("socket"); };
  for (std::size_t i = 0; i + 1 < words.size(); ++i) {
    const std::string& w = words[i];
    if (pending) {
      if (is_socket(pending)) socket = w;
      pending = nullptr;
      continue;
    }
    if (w.size() > 1 && w[0] == '-') {
      const auto eq = w.find('=');
      const CLI::Option* o = FindOption(cur, w.substr(0, eq));
      if (o && eq == std::string::npos && TakesValue(o)) pending = o;
      if (is_socket(o) && eq != std::string::npos) socket = w.substr(eq + 1);
      continue;
    }
    if (const CLI::App* sub = FindSub(cur, w)) {
      cur = sub;
      path.push_back(w);
      positionals.clear();
      continue;
    }
    positionals.push_back(w);
  }

  const std::string& last = words.back();
  std::set<std::string> out;
  auto add = [&](const std::string& c) {
    if (c.compare(0, last.size(), last) == 0) out.insert(c);
  };
  if (pending) {
    for (const auto& c : Lookup(OptionKind("--" + pending->get_lnames().front()), socket,
                                positionals.empty() ? "" : positionals[0]))
      add(c);
  } else if (!last.empty() && last[0] == '-') {
    for (const CLI::App* a = cur; a; a = a->get_parent())
      for (const CLI::Option* o : a->get_options()) {
        if (o->get_positional()) continue;
        for (const auto& l : o->get_lnames()) add("--" + l);
        for (const auto& s : o->get_snames()) add("-" + s);
      }
  } else {
    if (positionals.empty())
      for (const CLI::App* s : cur->get_subcommands([](const CLI::App*) { return true; }))
        if (!s->get_group().empty()) add(s->get_name());
    // The positional this word fills: the next one in definition order (a list takes the rest).
    std::size_t index = 0;
    for (const CLI::Option* o : cur->get_options([](const CLI::Option* o) { return o->get_positional(); })) {
      const bool list = o->get_items_expected_max() > 1;
      if (index == positionals.size() || list) {
        for (const auto& c : Lookup(PositionalKind(path, o->get_name()), socket,
                                    positionals.empty() ? "" : positionals[0]))
          add(c);
        break;
      }
      ++index;
    }
  }
  for (const auto& c : out) std::printf("%s\n", c.c_str());
  return 0;
}

}  // namespace dst::cli
