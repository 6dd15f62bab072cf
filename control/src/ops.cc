// JSON of the typed operations (dst/control/ops.h).  The param messages are the protocol's
// invalid_params texts (docs/man/dstctl.8 "CONTROL PROTOCOL").
#include "dst/control/ops.h"

#include <array>
#include <utility>

#include <fmt/format.h>

#include "dst/control/control_protocol.h"

namespace dst::control {

using nlohmann::json;

namespace {

// Param readers: false with *why on a missing required member or a wrong type.
bool Str(const json& p, const char* key, bool required, std::string* out, std::string* why) {
  auto it = p.find(key);
  if (it == p.end() || it->is_null()) {
    if (required) *why = fmt::format("missing parameter \"{}\"", key);
    return !required;
  }
  if (!it->is_string() || it->get<std::string>().empty()) {
    *why = fmt::format("parameter \"{}\" must be a non-empty string", key);
    return false;
  }
  *out = it->get<std::string>();
  return true;
}

bool Bool(const json& p, const char* key, bool* out, std::string* why) {
  auto it = p.find(key);
  if (it == p.end() || it->is_null()) return true;
  if (!it->is_boolean()) {
    *why = fmt::format("parameter \"{}\" must be true or false", key);
    return false;
  }
  *out = it->get<bool>();
  return true;
}

bool UInt(const json& p, const char* key, std::int64_t lo, std::int64_t hi,
          std::optional<std::uint32_t>* out, std::string* why) {
  auto it = p.find(key);
  if (it == p.end() || it->is_null()) return true;
  if (!it->is_number_integer() || it->get<std::int64_t>() < lo || it->get<std::int64_t>() > hi) {
    *why = fmt::format("parameter \"{}\" must be an integer in {}..{}", key, lo, hi);
    return false;
  }
  *out = std::uint32_t(it->get<std::int64_t>());
  return true;
}

// A size or rate: "10M" or a byte count, kept as text.
bool Amount(const json& p, const char* key, std::string* out, std::string* why,
            const std::string& bad) {
  auto it = p.find(key);
  if (it == p.end() || it->is_null()) return true;
  if (it->is_string()) *out = it->get<std::string>();
  else if (it->is_number_unsigned()) *out = std::to_string(it->get<std::uint64_t>());
  else if (it->is_number_integer() && it->get<std::int64_t>() >= 0)
    *out = std::to_string(it->get<std::int64_t>());
  else {
    *why = bad;
    return false;
  }
  return true;
}

bool Legs(const json& p, std::vector<std::string>* out, std::string* why) {
  auto legs = p.find("legs");
  if (legs == p.end() || !legs->is_array()) {
    *why = "parameter \"legs\" must be an array of leg specs";
    return false;
  }
  for (auto& l : *legs) {
    if (!l.is_string()) {
      *why = "legs must be strings";
      return false;
    }
    out->push_back(l.get<std::string>());
  }
  return true;
}

// "allow": a list of "identity:rw" / "identity:ro" strings (checked by dstd); missing: empty.
bool Allow(const json& p, std::vector<std::string>* out, std::string* why) {
  auto it = p.find("allow");
  if (it == p.end() || it->is_null()) return true;
  bool ok = it->is_array();
  for (std::size_t i = 0; ok && i < it->size(); ++i) ok = (*it)[i].is_string();
  if (!ok) {
    *why = "parameter \"allow\" must be an array of \"identity:rw\" / \"identity:ro\" strings";
    return false;
  }
  for (auto& r : *it) out->push_back(r.get<std::string>());
  return true;
}

bool Slot(const json& p, int* slot, std::string* why) {
  auto it = p.find("slot");
  if (it == p.end() || !it->is_number_integer() || it->get<std::int64_t>() < 0 ||
      it->get<std::int64_t>() >= 256) {
    *why = "parameter \"slot\" must be a leg slot number (0, 1, ...)";
    return false;
  }
  *slot = int(it->get<std::int64_t>());
  return true;
}

std::string RateMsg(const char* key) {
  return fmt::format("parameter \"{}\" must be a rate like \"10M\"", key);
}

constexpr std::array<std::pair<LegAction, const char*>, 4> kLegMethods{{
    {LegAction::kFail, "array.fail_leg"},
    {LegAction::kRemove, "array.remove_leg"},
    {LegAction::kReAdd, "array.readd_leg"},
    {LegAction::kDetach, "array.detach_leg"},
}};

template <class... F>
struct Overload : F... {
  using F::operator()...;
};
template <class... F>
Overload(F...) -> Overload<F...>;

}  // namespace

std::string MethodOf(const OpRequest& op) {
  return std::visit(
      Overload{
          [](const ArrayCreateOp&) -> std::string { return "array.create"; },
          [](const ArrayRemoveOp&) -> std::string { return "array.remove"; },
          [](const LegAddOp& o) -> std::string { return o.grow ? "array.grow" : "array.add_leg"; },
          [](const LegChangeOp& o) -> std::string {
            for (auto& [a, m] : kLegMethods)
              if (a == o.action) return m;
            return "array.fail_leg";
          },
          [](const ExportAddOp&) -> std::string { return "export.add"; },
          [](const ExportAllowOp&) -> std::string { return "export.allow"; },
          [](const ExportRemoveOp&) -> std::string { return "export.remove"; },
          [](const VolumeImportOp&) -> std::string { return "volume.import"; },
          [](const VolumeRemoveOp&) -> std::string { return "volume.remove"; },
          [](const MountOp&) -> std::string { return "mount"; },
          [](const SetResyncRateOp&) -> std::string { return "array.set_resync_rate"; },
          [](const VerifyOp&) -> std::string { return "array.verify"; },
          [](const PauseResyncOp& o) -> std::string {
            return o.pause ? "array.pause_resync" : "array.resume_resync";
          },
      },
      op);
}

json ToParams(const OpRequest& op) {
  auto put = [](json& p, const char* k, const std::string& v) {
    if (!v.empty()) p[k] = v;
  };
  return std::visit(
      Overload{
          [&](const ArrayCreateOp& o) {
            json p{{"name", o.name}, {"level", o.level}, {"legs", o.legs},
                   {"assume_clean", o.assume_clean}};
            put(p, "region_size", o.region_size);
            put(p, "resync_rate_min", o.resync_rate_min);
            put(p, "resync_rate_max", o.resync_rate_max);
            if (o.write_intent) p["write_intent"] = *o.write_intent;
            if (o.force) p["force"] = true;
            if (!o.params.empty()) p["params"] = o.params;
            return p;
          },
          [](const ArrayRemoveOp& o) { return json{{"name", o.name}}; },
          [](const LegAddOp& o) { return json{{"name", o.array}, {"leg", o.leg}}; },
          [&](const LegChangeOp& o) {
            json p{{"name", o.array}, {"slot", o.slot}};
            put(p, "leg", o.leg);
            if (o.force) p["force"] = true;
            return p;
          },
          [&](const ExportAddOp& o) {
            json p{{"name", o.name}, {"read_only", o.read_only}, {"direct_io", o.direct_io}};
            put(p, "path", o.path);
            put(p, "array", o.array);
            put(p, "volume", o.volume);
            put(p, "size", o.size);
            if (o.grow) p["grow"] = true;
            p["allow"] = o.allow;
            return p;
          },
          [](const ExportAllowOp& o) { return json{{"name", o.name}, {"allow", o.allow}}; },
          [](const ExportRemoveOp& o) { return json{{"name", o.name}}; },
          [](const VolumeImportOp& o) {
            json p{{"name", o.name}, {"uri", o.uri}};
            if (o.queue_depth) p["queue_depth"] = *o.queue_depth;
            if (o.io_timeout) p["io_timeout"] = *o.io_timeout;
            if (o.keepalive_timeout) p["keepalive_timeout"] = *o.keepalive_timeout;
            return p;
          },
          [](const VolumeRemoveOp& o) { return json{{"name", o.name}}; },
          [](const MountOp& o) { return json{{"path", o.path}}; },
          [&](const SetResyncRateOp& o) {
            json p{{"name", o.array}};
            put(p, "min", o.min);
            put(p, "max", o.max);
            return p;
          },
          [](const VerifyOp& o) {
            json p{{"name", o.array}};
            if (o.repair) p["repair"] = true;
            if (o.cancel) p["cancel"] = true;
            return p;
          },
          [](const PauseResyncOp& o) { return json{{"name", o.array}}; },
      },
      op);
}

bool IsOperationMethod(std::string_view m) {
  for (auto& [a, name] : kLegMethods)
    if (m == name) return true;
  return m == "array.create" || m == "array.remove" || m == "array.add_leg" ||
         m == "array.grow" || m == "export.add" || m == "export.allow" || m == "export.remove" ||
         m == "volume.import" || m == "volume.remove" || m == "mount" ||
         m == "array.set_resync_rate" || m == "array.verify" || m == "array.pause_resync" ||
         m == "array.resume_resync";
}

bool FromParams(std::string_view m, const json& p, OpRequest* op, std::string* why) {
  if (m == "array.create") {
    ArrayCreateOp o;
    bool wi = false;
    if (!Str(p, "name", true, &o.name, why) || !Str(p, "level", true, &o.level, why) ||
        !Legs(p, &o.legs, why) ||
        !Amount(p, "region_size", &o.region_size, why, "bad region_size") ||
        !Amount(p, "resync_rate_min", &o.resync_rate_min, why, RateMsg("resync_rate_min")) ||
        !Amount(p, "resync_rate_max", &o.resync_rate_max, why, RateMsg("resync_rate_max")) ||
        !Bool(p, "assume_clean", &o.assume_clean, why) || !Bool(p, "force", &o.force, why) ||
        !Bool(p, "write_intent", &wi, why))
      return false;
    if (p.contains("write_intent") && p["write_intent"].is_boolean()) o.write_intent = wi;
    if (auto it = p.find("params"); it != p.end() && !it->is_null()) {
      if (!it->is_object()) {
        *why = "parameter \"params\" must be an object of layer keys";
        return false;
      }
      for (auto& [k, v] : it->items()) o.params[k] = v.is_string() ? v.get<std::string>() : v.dump();
    }
    *op = std::move(o);
    return true;
  }
  if (m == "array.remove") {
    ArrayRemoveOp o;
    if (!Str(p, "name", true, &o.name, why)) return false;
    *op = std::move(o);
    return true;
  }
  if (m == "array.add_leg" || m == "array.grow") {
    LegAddOp o;
    o.grow = m == "array.grow";
    if (!Str(p, "name", true, &o.array, why) || !Str(p, "leg", true, &o.leg, why)) return false;
    *op = std::move(o);
    return true;
  }
  for (auto& [action, name] : kLegMethods) {
    if (m != name) continue;
    LegChangeOp o;
    o.action = action;
    if (!Str(p, "name", true, &o.array, why) || !Slot(p, &o.slot, why) ||
        !Str(p, "leg", false, &o.leg, why) || !Bool(p, "force", &o.force, why))
      return false;
    *op = std::move(o);
    return true;
  }
  if (m == "export.add") {
    ExportAddOp o;
    if (!Str(p, "name", true, &o.name, why) || !Str(p, "array", false, &o.array, why) ||
        !Str(p, "volume", false, &o.volume, why) ||
        !Str(p, "path", o.array.empty() && o.volume.empty(), &o.path, why))
      return false;
    if (int(!o.path.empty()) + int(!o.array.empty()) + int(!o.volume.empty()) != 1) {
      *why = "give exactly one of path, array, volume";
      return false;
    }
    if (!o.path.empty() && o.path[0] != '/') {
      *why = fmt::format("path \"{}\" must be absolute", o.path);
      return false;
    }
    if (!Bool(p, "read_only", &o.read_only, why) || !Bool(p, "direct_io", &o.direct_io, why) ||
        !Bool(p, "grow", &o.grow, why) || !Allow(p, &o.allow, why) ||
        !Amount(p, "size", &o.size, why, "parameter \"size\" must be a string or an integer"))
      return false;
    if (o.grow && o.size.empty()) {
      *why = "grow needs a size to grow the image to";
      return false;
    }
    *op = std::move(o);
    return true;
  }
  if (m == "export.allow") {
    ExportAllowOp o;
    if (!Str(p, "name", true, &o.name, why)) return false;
    if (!p.contains("allow")) {
      *why = "missing parameter \"allow\" (an empty list admits nobody)";
      return false;
    }
    if (!Allow(p, &o.allow, why)) return false;
    *op = std::move(o);
    return true;
  }
  if (m == "export.remove" || m == "volume.remove") {
    std::string name;
    if (!Str(p, "name", true, &name, why)) return false;
    if (m == "export.remove") *op = ExportRemoveOp{name};
    else *op = VolumeRemoveOp{name};
    return true;
  }
  if (m == "volume.import") {
    VolumeImportOp o;
    if (!Str(p, "name", true, &o.name, why) || !Str(p, "uri", true, &o.uri, why) ||
        !UInt(p, "queue_depth", 1, 1024, &o.queue_depth, why) ||
        !UInt(p, "io_timeout", 1, 86400, &o.io_timeout, why) ||
        !UInt(p, "keepalive_timeout", 1, 3600, &o.keepalive_timeout, why))
      return false;
    *op = std::move(o);
    return true;
  }
  if (m == "mount") {
    MountOp o;
    if (!Str(p, "path", true, &o.path, why)) return false;
    if (o.path[0] != '/') {
      *why = fmt::format("mount point \"{}\" must be absolute", o.path);
      return false;
    }
    *op = std::move(o);
    return true;
  }
  if (m == "array.set_resync_rate") {
    SetResyncRateOp o;
    if (!Str(p, "name", true, &o.array, why) ||
        !Amount(p, "min", &o.min, why, RateMsg("min")) ||
        !Amount(p, "max", &o.max, why, RateMsg("max")))
      return false;
    if (o.min.empty() && o.max.empty()) {
      *why = "give min and/or max";
      return false;
    }
    *op = std::move(o);
    return true;
  }
  if (m == "array.verify") {
    VerifyOp o;
    if (!Str(p, "name", true, &o.array, why) || !Bool(p, "repair", &o.repair, why) ||
        !Bool(p, "cancel", &o.cancel, why))
      return false;
    if (o.repair && o.cancel) {
      *why = "give repair or cancel, not both";
      return false;
    }
    *op = std::move(o);
    return true;
  }
  if (m == "array.pause_resync" || m == "array.resume_resync") {
    PauseResyncOp o;
    o.pause = m == "array.pause_resync";
    if (!Str(p, "name", true, &o.array, why)) return false;
    *op = std::move(o);
    return true;
  }
  *why = fmt::format("method \"{}\" is not an operation", m);
  return false;
}

// --- Refusals -------------------------------------------------------------------------------

namespace {

struct RefusalRow {
  RefusalCode code;
  const char* name;
  const char* error_code;
};
constexpr RefusalRow kRefusals[] = {
    {RefusalCode::kInvalid, "invalid", kInvalidParams},
    {RefusalCode::kUnknownName, "unknown_name", kNotFound},
    {RefusalCode::kExists, "exists", kExists},
    {RefusalCode::kBusy, "busy", kBusy},
    {RefusalCode::kLegInUse, "leg_in_use", kBusy},
    {RefusalCode::kCycle, "cycle", kInvalidParams},
    {RefusalCode::kDoesNotFit, "does_not_fit", kInvalidParams},
    {RefusalCode::kReadOnlyLeg, "read_only_leg", kReadOnly},
    {RefusalCode::kLastGoodLeg, "last_good_leg", kBusy},
    {RefusalCode::kNotAssembled, "not_assembled", kUnavailable},
    {RefusalCode::kOutsideRoots, "outside_export_roots", kPermissionDenied},
};

constexpr std::pair<StepKind, const char*> kStepKinds[] = {
    {StepKind::kCreateArray, "create_array"},   {StepKind::kRemoveArray, "remove_array"},
    {StepKind::kAddLeg, "add_leg"},             {StepKind::kGrow, "grow"},
    {StepKind::kFailLeg, "fail_leg"},           {StepKind::kRemoveLeg, "remove_leg"},
    {StepKind::kReAddLeg, "readd_leg"},         {StepKind::kDetachLeg, "detach_leg"},
    {StepKind::kAddExport, "add_export"},       {StepKind::kRemoveExport, "remove_export"},
    {StepKind::kImportVolume, "import_volume"}, {StepKind::kRemoveVolume, "remove_volume"},
    {StepKind::kMount, "mount"},                {StepKind::kSetResyncRate, "set_resync_rate"},
    {StepKind::kVerify, "verify"},              {StepKind::kAllowExport, "allow_export"},
    {StepKind::kPauseResync, "pause_resync"},   {StepKind::kResumeResync, "resume_resync"},
};

constexpr std::pair<StepStatus, const char*> kStepStatuses[] = {
    {StepStatus::kNotRun, "not run"}, {StepStatus::kDone, "done"}, {StepStatus::kFailed, "failed"}};

}  // namespace

const char* RefusalCodeName(RefusalCode c) {
  for (auto& r : kRefusals)
    if (r.code == c) return r.name;
  return "invalid";
}

bool ParseRefusalCode(std::string_view s, RefusalCode* c) {
  for (auto& r : kRefusals)
    if (s == r.name) {
      *c = r.code;
      return true;
    }
  return false;
}

const char* ErrorCodeForRefusal(RefusalCode c) {
  for (auto& r : kRefusals)
    if (r.code == c) return r.error_code;
  return kInvalidParams;
}

json ToJson(const Refusal& r) {
  return json{{"code", RefusalCodeName(r.code)}, {"object", r.object},
              {"owner", r.owner.empty() ? json() : json(r.owner)}, {"message", r.message}};
}

bool FromJson(const json& j, Refusal* r) {
  if (!j.is_object() || !j.contains("code") || !j["code"].is_string() ||
      !ParseRefusalCode(j["code"].get<std::string>(), &r->code))
    return false;
  r->object = j.value("object", std::string());
  r->owner = j.contains("owner") && j["owner"].is_string() ? j["owner"].get<std::string>() : "";
  r->message = j.value("message", std::string());
  return true;
}

const char* StepKindName(StepKind k) {
  for (auto& [kind, name] : kStepKinds)
    if (kind == k) return name;
  return "?";
}

bool ParseStepKind(std::string_view s, StepKind* k) {
  for (auto& [kind, name] : kStepKinds)
    if (s == name) {
      *k = kind;
      return true;
    }
  return false;
}

const char* StepStatusName(StepStatus s) {
  for (auto& [st, name] : kStepStatuses)
    if (st == s) return name;
  return "?";
}

json ToJson(const StepReport& r) {
  json j{{"kind", StepKindName(r.step.kind)}, {"object", r.step.object},
         {"step", r.step.description}, {"status", StepStatusName(r.status)}};
  if (r.status == StepStatus::kFailed) {
    j["error"] = r.error;
    j["error_code"] = r.error_code;
  }
  return j;
}

bool FromJson(const json& j, StepReport* r) {
  if (!j.is_object() || !j.contains("kind") || !j["kind"].is_string() ||
      !ParseStepKind(j["kind"].get<std::string>(), &r->step.kind))
    return false;
  r->step.object = j.value("object", std::string());
  r->step.description = j.value("step", std::string());
  const std::string st = j.value("status", std::string());
  bool known = false;
  for (auto& [s, name] : kStepStatuses)
    if (st == name) {
      r->status = s;
      known = true;
    }
  r->error = j.value("error", std::string());
  r->error_code = j.value("error_code", std::string());
  return known;
}

}  // namespace dst::control
