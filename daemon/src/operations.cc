// Typed operations (operations.h): one OperationImpl<Request> per change.  Validate is where the
// safety checks live (they were apply_check.cc's step checks and the preconditions at the top of
// each RPC); the steps call the engine methods of daemon.cc and arrays.cc.
//
// Safe apply (issue 9 item 6) is kept: every operation of an apply plan is validated against the
// live state (minus what the plan removes first, plus what it creates) before the first step
// runs, so a plan that would fail on a missing file, an unknown leg, a leg in use, a name clash or
// an object still in use is refused whole and changes nothing.  What cannot be known in advance
// (a remote peer that is down) still fails at its step; apply then reports every step as done,
// failed or not run, and running it again converges.
#include "operations.h"

#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "daemon.h"
#include "dst/layer.h"
#include "dst/mirror_device.h"
#include "dst/net/uri.h"

namespace dst::daemon {

using nlohmann::json;
namespace ctl = dst::control;
using ctl::RefusalCode;

namespace {

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

std::string Msg(const Status& s) {
  return s.message().empty() ? std::string(Status::CodeName(s.code())) : s.message();
}

ctl::Refusal Refuse(RefusalCode code, std::string object, std::string owner, std::string message) {
  return ctl::Refusal{code, std::move(object), std::move(owner), std::move(message)};
}

// " --allow a:rw --allow b:ro" for step descriptions (dstctl's words).
std::string AllowArgs(const net::AccessList& l) {
  std::string out;
  for (const auto& r : net::FormatAccessList(l)) out += " --allow " + r;
  return out;
}

// The refusal for a failed check whose Status code says enough.
ctl::Refusal Refuse(const std::string& object, const Status& s, std::string owner = {}) {
  RefusalCode code = RefusalCode::kInvalid;
  switch (s.code()) {
    case Status::Code::kNotFound: code = RefusalCode::kUnknownName; break;
    case Status::Code::kExists: code = RefusalCode::kExists; break;
    case Status::Code::kBusy: code = RefusalCode::kBusy; break;
    case Status::Code::kUnavailable: code = RefusalCode::kNotAssembled; break;
    case Status::Code::kReadOnly: code = RefusalCode::kReadOnlyLeg; break;
    default: break;
  }
  return Refuse(code, object, std::move(owner), Msg(s));
}

// The size a path leg would give (a file's length, a block device's capacity).
std::optional<DeviceInfo> PathLegInfo(const std::string& path) {
  DeviceInfo info;
  info.logical_block_size = 512;
  info.read_only = ::access(path.c_str(), W_OK) != 0;
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  if (S_ISREG(st.st_mode)) {
    info.size = std::uint64_t(st.st_size);
    return info;
  }
  return std::nullopt;  // block devices: FileDevice finds out at the step
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Helpers shared by the operations (a specialisation, so that it is a friend of Daemon too).

template <typename Req>
class OperationImpl;

template <>
class OperationImpl<void> : public Operation {
 protected:
  explicit OperationImpl(Daemon& d) : d_(d) {}

  using Use = Daemon::Use;
  using Array = Daemon::Array;

  static std::string OwnerOf(const Use& u) {
    if (!u.export_name.empty()) return "export:" + u.export_name;
    if (!u.volume_name.empty()) return "volume:" + u.volume_name;
    if (!u.array.empty()) return fmt::format("array:{}/slot:{}", u.array, u.slot);
    return u.ref;
  }

  void CheckName(const std::string& kind, const std::string& name,
                 std::vector<ctl::Refusal>* out) {
    if (!ValidName(name))
      out->push_back(Refuse(
          RefusalCode::kInvalid, kind + ":" + name, {},
          fmt::format("bad name \"{}\" (1-64 of A-Z a-z 0-9 . _ -, not starting with .)", name)));
  }

  // A live array (not one an apply plan creates), or a refusal.
  std::shared_ptr<Array> LiveArray(const std::string& name, std::vector<ctl::Refusal>* out) {
    auto a = d_.FindArray(name);
    if (!a)
      out->push_back(Refuse(RefusalCode::kUnknownName, "array:" + name, {},
                            fmt::format("no array \"{}\"", name)));
    return a;
  }

  // Legs `specs` for array `array` (new: being created) of `layer` (its leg rules: read-only legs
  // or not; each leg alone must give `layer` at least `need` bytes, 0: any non-empty array).
  // Leg refusals name the leg's owner.
  void CheckLegs(const PlanContext& ctx, const std::string& array,
                 const std::vector<std::string>& specs, bool new_array, const LayerInfo* layer,
                 const LayerParams& params, std::uint64_t need, std::vector<ctl::Refusal>* out) {
    std::set<std::string> seen;
    for (auto& spec : specs) {
      const std::string obj = "leg:" + spec;
      LegSpec ls;
      if (Status s = ParseLegSpec(spec, &ls); !s.ok()) {
        out->push_back(Refuse(obj, s));
        continue;
      }
      if (!seen.insert(spec).second) {
        out->push_back(Refuse(RefusalCode::kInvalid, obj, {},
                              fmt::format("leg \"{}\" is listed twice", spec)));
        continue;
      }
      std::optional<DeviceInfo> info;
      switch (ls.kind) {
        case LegSpec::Kind::kPath:
          if (Status s = d_.CheckPathAllowed(ls.ref); !s.ok()) {
            out->push_back(Refuse(RefusalCode::kOutsideRoots, obj, {}, Msg(s)));
            continue;
          }
          if (!Exists(ls.ref)) {
            out->push_back(Refuse(RefusalCode::kUnknownName, obj, {},
                                  fmt::format("leg \"{}\": {} does not exist", spec, ls.ref)));
            continue;
          }
          info = PathLegInfo(ls.ref);
          break;
        case LegSpec::Kind::kVolume:
        case LegSpec::Kind::kArray: {
          const bool is_array = ls.kind == LegSpec::Kind::kArray;
          if (is_array && ls.ref == array) {
            out->push_back(Refuse(RefusalCode::kCycle, obj, {}, "an array cannot be its own leg"));
            continue;
          }
          const char* kind = is_array ? "array" : "volume";
          if (!d_.PlanHas(ctx, kind, ls.ref)) {
            out->push_back(Refuse(RefusalCode::kUnknownName, obj, {},
                                  fmt::format("leg \"{}\": no {} \"{}\"", spec, kind, ls.ref)));
            continue;
          }
          if (is_array && Below(ctx, ls.ref, array)) {
            out->push_back(Refuse(RefusalCode::kCycle, obj, "array:" + ls.ref,
                                  "that would stack arrays in a cycle"));
            continue;
          }
          info = LiveDeviceInfo(ls.ref, is_array);
          break;
        }
        default:
          break;  // remote legs: reachability and size show at the step
      }
      Use holder;
      if (Status s = d_.CheckLegFree(spec, array, -1, ctx.gone, &holder); !s.ok()) {
        out->push_back(Refuse(RefusalCode::kLegInUse, obj, OwnerOf(holder), Msg(s)));
        continue;
      }
      if (auto t = ctx.taken.find(spec); t != ctx.taken.end()) {
        out->push_back(Refuse(RefusalCode::kLegInUse, obj, t->second,
                              fmt::format("leg \"{}\" is already {} (planned)", spec, t->second)));
        continue;
      }
      if (!layer || !info) continue;
      if (info->read_only && !layer->legs.read_only_legs)
        out->push_back(Refuse(RefusalCode::kReadOnlyLeg, obj, {},
                              fmt::format("leg \"{}\" is read-only: a {} writes every leg", spec,
                                          layer->name)));
      else if (std::uint64_t usable = layer->usable_size ? layer->usable_size({*info}, params) : info->size;
               usable == 0 || usable < need)
        out->push_back(Refuse(
            RefusalCode::kDoesNotFit, obj, {},
            need ? fmt::format("leg \"{}\" is smaller than the {} ({} bytes of data, {} needed)",
                               spec, layer->name, usable, need)
                 : fmt::format("leg \"{}\" is too small for a {} leg", spec, layer->name)));
    }
    if (new_array)
      if (Status s = d_.CheckLegsDistinct(specs); !s.ok())
        out->push_back(Refuse("array:" + array, s));
  }

  // True when array `name` is (transitively) a leg of array `of`... i.e. stacking `of` below
  // `name` would close a cycle.
  // Arrays a plan creates (ctx.arrays) count with their planned legs.
  bool Below(const PlanContext& ctx, const std::string& name, const std::string& of) {
    std::vector<std::string> legs;
    if (auto p = ctx.arrays.find(name); p != ctx.arrays.end()) {
      legs = p->second.legs;
    } else if (auto b = d_.FindArray(name)) {
      std::lock_guard<std::mutex> l(d_.mu_);
      legs = b->cfg.legs;
    } else {
      return false;
    }
    // Legs an earlier operation of the same batch adds (array.add_leg takes the spec for
    // "array:NAME/slot:N"): a staged stack counts, or a second drop could close a cycle.
    const std::string planned_owner = "array:" + name + "/slot:";
    for (const auto& [key, owner] : ctx.taken)
      if (owner.rfind(planned_owner, 0) == 0 && key.rfind("array:", 0) == 0) legs.push_back(key);
    for (auto& l : legs) {
      if (l == "array:" + of) return true;
      if (l.rfind("array:", 0) == 0 && Below(ctx, l.substr(6), of)) return true;
    }
    return false;
  }

  // The data size a planned array `cfg` will have, from what its legs give now; 0 when a leg's
  // size shows only at the step (a remote leg, a block device, another planned array).
  std::uint64_t PlannedSize(const ArrayConfig& cfg) {
    const LayerInfo* layer = FindLayer(cfg.level);
    std::vector<DeviceInfo> infos;
    for (auto& spec : cfg.legs) {
      LegSpec ls;
      if (!ParseLegSpec(spec, &ls).ok()) return 0;
      std::optional<DeviceInfo> info;
      if (ls.kind == LegSpec::Kind::kPath) info = PathLegInfo(ls.ref);
      else if (ls.kind == LegSpec::Kind::kVolume || ls.kind == LegSpec::Kind::kArray)
        info = LiveDeviceInfo(ls.ref, ls.kind == LegSpec::Kind::kArray);
      if (!info) return 0;
      infos.push_back(*info);
    }
    if (!layer || infos.empty()) return 0;
    return layer->usable_size ? layer->usable_size(infos, cfg.params) : 0;
  }

  // Records that `owner` takes `key` (a leg spec, path or "array:N" / "volume:N").
  static void Take(PlanContext* ctx, const std::string& key, const std::string& owner) {
    if (!key.empty()) ctx->taken[key] = owner;
  }
  // Forgets every planned use by `owner` or its slots ("array:m" also drops "array:m/slot:1").
  static void Release(PlanContext* ctx, const std::string& owner) {
    std::erase_if(ctx->taken, [&](const auto& kv) {
      return kv.second == owner || kv.second.rfind(owner + "/", 0) == 0;
    });
  }
  static void Remove(PlanContext* ctx, const std::string& obj) {
    ctx->created.erase(obj);
    ctx->gone.insert(obj);
    Release(ctx, obj);
  }
  // The refusal for a source an earlier operation of the plan already uses.
  static ctl::Refusal PlannedUse(const std::string& obj, const std::string& owner) {
    return Refuse(owner.rfind("array:", 0) == 0 ? RefusalCode::kLegInUse : RefusalCode::kBusy, obj,
                  owner, fmt::format("{} would already be used by {} (planned)", obj, owner));
  }

  std::optional<DeviceInfo> LiveDeviceInfo(const std::string& name, bool is_array) {
    std::shared_ptr<BlockDevice> dev;
    {
      std::lock_guard<std::mutex> l(d_.mu_);
      auto it = d_.volumes_.find(name);
      if (it == d_.volumes_.end() || it->second->is_array != is_array) return std::nullopt;
      dev = it->second->dev;
    }
    if (!dev) return std::nullopt;
    return dev->Info();
  }

  // A volume or array that is to go: not a leg or an export source that stays, its file not open.
  void CheckUnused(const std::string& kind, const std::string& name, const PlanContext& ctx,
                   std::vector<ctl::Refusal>* out) {
    const std::string obj = kind + ":" + name;
    for (auto& u : d_.Uses(ctx.gone)) {
      if (u.ref != obj || (u.array.empty() && u.export_name.empty())) continue;
      out->push_back(Refuse(RefusalCode::kBusy, obj, OwnerOf(u),
                            fmt::format("{} \"{}\" is {}", kind, name, u.owner)));
      return;
    }
    std::shared_ptr<fuse::FuseMount> m;
    {
      std::lock_guard<std::mutex> l(d_.mu_);
      m = d_.mount_;
    }
    if (m)
      for (auto& f : m->ListVolumes())
        if (f.name == name && f.open_count > 0 && !m->WaitUnused(name))  // a close just now: its release
          out->push_back(Refuse(RefusalCode::kBusy, obj, "file:" + m->mountpoint() + "/" + name + ".img",
                                fmt::format("{} \"{}\" is in use ({}/{}.img is open)", kind, name,
                                            m->mountpoint(), name)));
  }

  json ArrayResult(const std::string& name) {
    auto a = d_.FindArray(name);
    return a ? d_.ArrayJson(a) : json::object();
  }

  Step MakeStep(ctl::StepKind kind, std::string object, std::string text,
                std::function<Status()> run) {
    return Step{ctl::PlanStep{kind, std::move(object), std::move(text)}, std::move(run)};
  }

  Daemon& d_;
  std::vector<ctl::Refusal> bad_;  // values the request carried that do not parse
};

using OpBase = OperationImpl<void>;

// An operation that keeps its request as it came.
template <typename Req>
class OpOf : public OpBase {
 public:  // inherited by `using OpOf::OpOf`, with this access
  OpOf(Daemon& d, Req r) : OpBase(d), r_(std::move(r)) {}

 protected:
  Req r_;
};

// ---------------------------------------------------------------------------------------------
// Arrays

template <>
class OperationImpl<ctl::ArrayCreateOp> : public OpBase {
 public:
  OperationImpl(Daemon& d, ArrayConfig cfg) : OpBase(d), cfg_(std::move(cfg)) {}
  OperationImpl(Daemon& d, const ctl::ArrayCreateOp& r) : OpBase(d) {
    cfg_.name = r.name;
    cfg_.level = r.level;
    cfg_.legs = r.legs;
    assume_clean_ = r.assume_clean;
    force_ = r.force;
    // The layer's own keys, from user text ("64K") to canonical values; an unknown level is
    // refused by Validate, which names the registered ones.  The request's region_size,
    // resync_rate_* and write_intent fields (dstctl --region-size ...) are the mirror's keys
    // under their older names: they go through the registry like any --set.
    std::map<std::string, std::string> given = r.params;
    for (auto [key, text] : {std::pair{"region_size", r.region_size},
                             std::pair{"resync_rate_min", r.resync_rate_min},
                             std::pair{"resync_rate_max", r.resync_rate_max}})
      if (!text.empty()) given[key] = text;
    if (r.write_intent) given["write_intent"] = *r.write_intent ? "true" : "false";
    if (const LayerInfo* layer = FindLayer(r.level))
      for (const auto& [k, text] : given) {
        const LayerKey* key = FindLayerKey(*layer, k);
        auto v = key ? ParseLayerValue(*key, text)
                     : dst::Result<std::string>(Status::InvalidArgument(
                           fmt::format("a {} array has no key \"{}\"", r.level, k)));
        if (v.ok()) cfg_.params[k] = std::move(v.value());
        else bad_.push_back(Refuse("array:" + r.name, v.status()));
      }
  }

  std::vector<ctl::Refusal> Validate(const PlanContext& ctx) override {
    std::vector<ctl::Refusal> out = bad_;
    const std::string obj = "array:" + cfg_.name;
    CheckName("array", cfg_.name, &out);
    if (!out.empty()) return out;
    // The layer's rules come from the registry (dst/layer.h).
    const LayerInfo* layer = FindLayer(cfg_.level);
    if (!layer) {
      out.push_back(Refuse(RefusalCode::kInvalid, obj, {},
                           fmt::format("unknown level \"{}\" ({})", cfg_.level, LayerNames())));
    } else if (Status s = CheckLegCount(*layer, cfg_.legs.size()); !s.ok()) {
      out.push_back(Refuse(obj, s));
    } else if (auto params = ResolveLayerParams(*layer, cfg_.params); !params.ok()) {
      out.push_back(Refuse(obj, params.status()));
    } else {
      cfg_.params = std::move(params.value());
    }
    if (!out.empty()) return out;
    PlanContext others = ctx;  // what exists apart from this array (which the plan creates)
    others.created.erase(obj);
    if (d_.PlanHas(others, "array", cfg_.name) || d_.PlanHas(others, "volume", cfg_.name))
      out.push_back(Refuse(RefusalCode::kExists, obj, {},
                           fmt::format("a volume or array \"{}\" already exists", cfg_.name)));
    CheckLegs(ctx, cfg_.name, cfg_.legs, true, layer, cfg_.params, 0, &out);
    return out;
  }

  std::vector<Step> Plan() override {
    std::string text = fmt::format("array create {} --level {} {}", cfg_.name, cfg_.level,
                                   fmt::join(cfg_.legs, " "));
    for (const auto& [k, v] : cfg_.params) text += fmt::format(" --set {}={}", k, v);
    return {MakeStep(ctl::StepKind::kCreateArray, "array:" + cfg_.name, text,
                     [this] { return d_.CreateArray(cfg_, assume_clean_, force_); })};
  }

  json Result() override { return ArrayResult(cfg_.name); }

  std::string Creates() const override { return "array:" + cfg_.name; }
  void Planned(PlanContext* ctx) const override {
    const std::string obj = "array:" + cfg_.name;
    ctx->gone.erase(obj);
    ctx->created.insert(obj);
    ctx->arrays[cfg_.name] = cfg_;
    for (std::size_t i = 0; i < cfg_.legs.size(); ++i)
      Take(ctx, cfg_.legs[i], fmt::format("{}/slot:{}", obj, i));
  }

 private:
  ArrayConfig cfg_;
  bool assume_clean_ = false, force_ = false;
};

template <>
class OperationImpl<ctl::ArrayRemoveOp> : public OpOf<ctl::ArrayRemoveOp> {
 public:
  using OpOf::OpOf;

  std::vector<ctl::Refusal> Validate(const PlanContext& ctx) override {
    std::vector<ctl::Refusal> out;
    if (!LiveArray(r_.name, &out)) return out;
    CheckUnused("array", r_.name, ctx, &out);
    return out;
  }

  std::vector<Step> Plan() override {
    return {MakeStep(ctl::StepKind::kRemoveArray, "array:" + r_.name, "array remove " + r_.name,
                     [this] { return d_.RemoveArray(r_.name); })};
  }

  void Planned(PlanContext* ctx) const override {
    Remove(ctx, "array:" + r_.name);
    ctx->arrays.erase(r_.name);
  }

};

template <>
class OperationImpl<ctl::LegAddOp> : public OpOf<ctl::LegAddOp> {
 public:
  using OpOf::OpOf;

  std::vector<ctl::Refusal> Validate(const PlanContext& ctx) override {
    std::vector<ctl::Refusal> out;
    if (auto p = ctx.arrays.find(r_.array); p != ctx.arrays.end()) return ValidatePlanned(ctx, p->second);
    auto a = LiveArray(r_.array, &out);
    if (!a) return out;
    const std::string obj = "array:" + r_.array;
    std::shared_ptr<MirrorDevice> mirror;
    ArrayConfig cfg;
    {
      std::lock_guard<std::mutex> l(d_.mu_);
      cfg = a->cfg;
      if (!a->dev)
        out.push_back(Refuse(RefusalCode::kNotAssembled, obj, {},
                             fmt::format("array \"{}\" is not assembled: {}", r_.array, a->error)));
      else if (Status s = Daemon::CheckLegChange(a->cfg, r_.grow); !s.ok())
        out.push_back(Refuse(obj, s));
      for (auto& l : a->legs)
        if (l.spec == r_.leg)
          out.push_back(Refuse(RefusalCode::kExists, "leg:" + r_.leg, obj,
                               fmt::format("\"{}\" is already a leg of \"{}\"", r_.leg, r_.array)));
      mirror = a->mirror;
    }
    if (!out.empty()) return out;
    CheckLegs(ctx, r_.array, {r_.leg}, false, FindLayer(cfg.level), cfg.params,
              mirror ? mirror->Info().size : 0, &out);
    return out;
  }

  std::vector<Step> Plan() override {
    return {MakeStep(r_.grow ? ctl::StepKind::kGrow : ctl::StepKind::kAddLeg, "array:" + r_.array,
                     fmt::format("array {} {} {}", r_.grow ? "grow" : "add-leg", r_.array, r_.leg),
                     [this] { return d_.ArrayAddLeg(r_.array, r_.leg, r_.grow); })};
  }

  json Result() override { return ArrayResult(r_.array); }

  void Planned(PlanContext* ctx) const override {
    std::size_t slot = 0;
    if (auto p = ctx->arrays.find(r_.array); p != ctx->arrays.end()) {
      p->second.legs.push_back(r_.leg);
      slot = p->second.legs.size() - 1;
    } else if (auto a = d_.FindArray(r_.array)) {
      std::lock_guard<std::mutex> l(d_.mu_);
      slot = a->legs.size();  // a free slot may be reused; only the owner's name is shown
    }
    Take(ctx, r_.leg, fmt::format("array:{}/slot:{}", r_.array, slot));
  }

 private:
  // An array that an earlier operation of the batch creates: checked against its planned config.
  std::vector<ctl::Refusal> ValidatePlanned(const PlanContext& ctx, const ArrayConfig& cfg) {
    std::vector<ctl::Refusal> out;
    const std::string obj = "array:" + r_.array;
    if (Status s = Daemon::CheckLegChange(cfg, r_.grow); !s.ok()) out.push_back(Refuse(obj, s));
    if (std::find(cfg.legs.begin(), cfg.legs.end(), r_.leg) != cfg.legs.end())
      out.push_back(Refuse(RefusalCode::kExists, "leg:" + r_.leg, obj,
                           fmt::format("\"{}\" is already a leg of \"{}\"", r_.leg, r_.array)));
    if (!out.empty()) return out;
    CheckLegs(ctx, r_.array, {r_.leg}, false, FindLayer(cfg.level), cfg.params,
              r_.grow ? 0 : PlannedSize(cfg), &out);
    return out;
  }
};

Status Daemon::CheckRetire(const std::shared_ptr<Array>& a, int slot, const std::string& op,
                           bool force, const std::set<int>& also_gone, ctl::RefusalCode* code) {
  std::shared_ptr<MirrorDevice> m;
  {
    std::lock_guard<std::mutex> l(mu_);
    m = a->mirror;
  }
  if (!m) return Status::OK();
  // Safe leg verbs (dstctl.8): the last up-to-date leg is never failed, detached or removed
  // without --force, and an up-to-date leg is removed only with --force (or after fail-leg).
  int others = 0;
  bool this_up = false;
  for (auto& ls : m->Legs()) {
    if (ls.state != LegState::kUpToDate) continue;
    if (ls.slot == slot) this_up = true;
    else if (!also_gone.count(ls.slot)) ++others;
  }
  const std::string& name = a->cfg.name;
  if (this_up && others == 0 && !force) {
    if (code) *code = RefusalCode::kLastGoodLeg;
    return Status::Busy(fmt::format(
        "leg {} is the last up-to-date leg of array \"{}\"; refusing to {} it (--force to "
        "insist: the array would have no copy of its data)", slot, name, op));
  }
  if (this_up && op == "remove" && !force) {
    if (code) *code = RefusalCode::kBusy;
    return Status::Busy(fmt::format(
        "leg {} of array \"{}\" is up to date; remove-leg is for failed or detached legs "
        "(run fail-leg first, or give --force)", slot, name));
  }
  return Status::OK();
}

template <>
class OperationImpl<ctl::LegChangeOp> : public OpOf<ctl::LegChangeOp> {
 public:
  // `retire` (apply's remove-leg): a leg still in service is failed first.
  OperationImpl(Daemon& d, ctl::LegChangeOp r, bool retire = false)
      : OpOf(d, std::move(r)), retire_(retire) {}

  std::vector<ctl::Refusal> Validate(const PlanContext& ctx) override {
    std::vector<ctl::Refusal> out;
    auto a = LiveArray(r_.array, &out);
    if (!a) return out;
    const std::string obj = fmt::format("array:{}/slot:{}", r_.array, r_.slot);
    std::string spec;
    {
      std::lock_guard<std::mutex> l(d_.mu_);
      if (!a->mirror) {
        out.push_back(
            a->dev
                ? Refuse(RefusalCode::kInvalid, "array:" + r_.array, {},
                         fmt::format("array \"{}\" is {}: legs cannot be failed, removed or "
                                     "detached (it has no redundancy)", r_.array, a->cfg.level))
                : Refuse(RefusalCode::kNotAssembled, "array:" + r_.array, {},
                         fmt::format("array \"{}\" is not assembled: {}", r_.array, a->error)));
        return out;
      }
      if (std::size_t(r_.slot) < a->legs.size()) spec = a->legs[std::size_t(r_.slot)].spec;
      if (std::size_t(r_.slot) >= a->legs.size() ||
          (spec.empty() && r_.action != ctl::LegAction::kReAdd)) {
        out.push_back(Refuse(RefusalCode::kUnknownName, obj, {},
                             fmt::format("array \"{}\" has no leg in slot {}", r_.array, r_.slot)));
        return out;
      }
    }
    if (r_.action == ctl::LegAction::kReAdd) {
      // Exclusive legs: a leg still exported or imported is not re-added.
      std::string use = r_.leg.empty() ? spec : r_.leg;
      Use holder;
      if (use.empty())
        out.push_back(Refuse(RefusalCode::kInvalid, obj, {}, "slot is empty: give the leg to re-add"));
      else if (Status s = d_.CheckLegFree(use, r_.array, r_.slot, ctx.gone, &holder); !s.ok())
        out.push_back(Refuse(RefusalCode::kLegInUse, "leg:" + use, OwnerOf(holder), Msg(s)));
      return out;
    }
    std::set<int> gone;
    if (auto it = ctx.legs_gone.find(r_.array); it != ctx.legs_gone.end()) gone = it->second;
    // A retire fails the leg first, so only the last-good-leg rule applies to it.
    RefusalCode code = RefusalCode::kBusy;
    if (Status s = d_.CheckRetire(a, r_.slot, retire_ ? "fail" : Verb(), r_.force, gone, &code);
        !s.ok())
      out.push_back(Refuse(code, obj, "array:" + r_.array, Msg(s)));
    return out;
  }

  std::vector<Step> Plan() override {
    const std::string obj = "array:" + r_.array;
    std::vector<Step> steps;
    std::string spec;
    std::shared_ptr<MirrorDevice> mirror;
    if (auto a = d_.FindArray(r_.array)) {
      std::lock_guard<std::mutex> l(d_.mu_);
      if (std::size_t(r_.slot) < a->legs.size()) spec = a->legs[std::size_t(r_.slot)].spec;
      mirror = a->mirror;
    }
    bool in_service = false;
    if (mirror)
      for (auto& ls : mirror->Legs())
        if (ls.slot == r_.slot)
          in_service = ls.state == LegState::kUpToDate || ls.state == LegState::kResyncing;
    if (retire_ && in_service)
      steps.push_back(MakeStep(ctl::StepKind::kFailLeg, obj,
                               fmt::format("array fail-leg {} {}", r_.array, r_.slot),
                               [this] { return d_.ArrayLegOp(r_.array, "fail", r_.slot, "", r_.force); }));
    static constexpr std::pair<ctl::LegAction, ctl::StepKind> kKinds[] = {
        {ctl::LegAction::kFail, ctl::StepKind::kFailLeg},
        {ctl::LegAction::kRemove, ctl::StepKind::kRemoveLeg},
        {ctl::LegAction::kReAdd, ctl::StepKind::kReAddLeg},
        {ctl::LegAction::kDetach, ctl::StepKind::kDetachLeg}};
    ctl::StepKind kind = ctl::StepKind::kFailLeg;
    for (auto& [a, k] : kKinds)
      if (a == r_.action) kind = k;
    std::string text = fmt::format("array {}-leg {} {}", r_.action == ctl::LegAction::kReAdd
                                                             ? "re-add" : Verb(),
                                   r_.array, r_.slot);
    if (!r_.leg.empty()) text += " " + r_.leg;
    else if (!spec.empty()) text += "  # " + spec;
    steps.push_back(MakeStep(kind, obj, text, [this] {
      return d_.ArrayLegOp(r_.array, Verb(), r_.slot, r_.leg, r_.force);
    }));
    return steps;
  }

  json Result() override { return ArrayResult(r_.array); }

  void Planned(PlanContext* ctx) const override {
    if (r_.action == ctl::LegAction::kReAdd) ctx->legs_gone[r_.array].erase(r_.slot);
    else ctx->legs_gone[r_.array].insert(r_.slot);
    const std::string slot = fmt::format("array:{}/slot:{}", r_.array, r_.slot);
    if (r_.action == ctl::LegAction::kRemove || r_.action == ctl::LegAction::kDetach)
      Release(ctx, slot);  // a detached leg is a snapshot then: free to be used again
    else if (r_.action == ctl::LegAction::kReAdd && !r_.leg.empty())
      Take(ctx, r_.leg, slot);
  }

 private:
  std::string Verb() const {
    switch (r_.action) {
      case ctl::LegAction::kFail: return "fail";
      case ctl::LegAction::kRemove: return "remove";
      case ctl::LegAction::kReAdd: return "readd";
      case ctl::LegAction::kDetach: return "detach";
    }
    return "fail";
  }

  bool retire_;
};

template <>
class OperationImpl<ctl::SetResyncRateOp> : public OpOf<ctl::SetResyncRateOp> {
 public:
  OperationImpl(Daemon& d, ctl::SetResyncRateOp r) : OpOf(d, std::move(r)) {
    for (auto [text, to] : {std::pair{&r_.min, &min_}, std::pair{&r_.max, &max_}}) {
      if (text->empty()) continue;
      auto v = ParseRate(*text);
      if (v.ok()) *to = v.value();
      else bad_.push_back(Refuse("array:" + r_.array, v.status()));
    }
  }

  std::vector<ctl::Refusal> Validate(const PlanContext&) override {
    std::vector<ctl::Refusal> out = bad_;
    auto a = LiveArray(r_.array, &out);
    if (!out.empty()) return out;
    {
      std::lock_guard<std::mutex> l(d_.mu_);
      const MirrorKeys k = MirrorKeysFrom(a->cfg.params);
      if (!min_) min_ = k.resync_rate_min;  // unchanged
      if (!max_) max_ = k.resync_rate_max;
    }
    if (*max_ != 0 && *min_ > *max_)
      out.push_back(Refuse(RefusalCode::kInvalid, "array:" + r_.array, {},
                           "--min must not exceed --max"));
    return out;
  }

  std::vector<Step> Plan() override {
    return {MakeStep(ctl::StepKind::kSetResyncRate, "array:" + r_.array,
                     fmt::format("array resync-rate {} --min {} --max {}", r_.array,
                                 AmountText(min_.value_or(0)), AmountText(max_.value_or(0))),
                     [this] { return d_.ArraySetRate(r_.array, min_.value_or(0), max_.value_or(0)); })};
  }

  json Result() override { return ArrayResult(r_.array); }

 private:
  std::optional<std::uint64_t> min_, max_;  // set by Validate when the request left one out
};

template <>
class OperationImpl<ctl::VerifyOp> : public OpOf<ctl::VerifyOp> {
 public:
  using OpOf::OpOf;

  std::vector<ctl::Refusal> Validate(const PlanContext&) override {
    std::vector<ctl::Refusal> out;
    auto a = LiveArray(r_.array, &out);
    if (!a) return out;
    std::lock_guard<std::mutex> l(d_.mu_);
    if (!a->mirror && a->dev)
      out.push_back(Refuse(RefusalCode::kInvalid, "array:" + r_.array, {},
                           fmt::format("array \"{}\" is {}: verify compares the legs of a "
                                       "mirror", r_.array, a->cfg.level)));
    else if (!a->mirror)
      out.push_back(Refuse(RefusalCode::kNotAssembled, "array:" + r_.array, {},
                           fmt::format("array \"{}\" is not assembled: {}", r_.array, a->error)));
    return out;
  }

  std::vector<Step> Plan() override {
    return {MakeStep(ctl::StepKind::kVerify, "array:" + r_.array,
                     fmt::format("array verify {}{}", r_.array,
                                 r_.cancel ? " --cancel" : r_.repair ? " --repair" : ""),
                     [this]() -> Status {
                       auto r = d_.Verify(r_.array, r_.repair, r_.cancel);
                       if (!r.ok()) return r.status();
                       result_ = std::move(r.value());
                       return Status::OK();
                     })};
  }

  json Result() override { return result_; }

 private:
  json result_ = json::object();
};

template <>
class OperationImpl<ctl::PauseResyncOp> : public OpOf<ctl::PauseResyncOp> {
 public:
  using OpOf::OpOf;

  std::vector<ctl::Refusal> Validate(const PlanContext&) override {
    Status s = d_.PauseResync(r_.array, r_.pause, true);
    if (s.ok()) return {};
    return {Refuse("array:" + r_.array, s)};
  }

  std::vector<Step> Plan() override {
    return {MakeStep(r_.pause ? ctl::StepKind::kPauseResync : ctl::StepKind::kResumeResync,
                     "array:" + r_.array,
                     fmt::format("array {}-resync {}", r_.pause ? "pause" : "resume", r_.array),
                     [this] { return d_.PauseResync(r_.array, r_.pause, false); })};
  }

  json Result() override { return ArrayResult(r_.array); }
};

// ---------------------------------------------------------------------------------------------
// Exports, volumes, mount

template <>
class OperationImpl<ctl::ExportAddOp> : public OpBase {
 public:
  OperationImpl(Daemon& d, ExportConfig e) : OpBase(d), e_(std::move(e)) {}
  OperationImpl(Daemon& d, const ctl::ExportAddOp& r) : OpBase(d) {
    e_.name = r.name;
    e_.path = r.path;
    e_.array = r.array;
    e_.volume = r.volume;
    e_.read_only = r.read_only;
    e_.direct_io = r.direct_io;
    e_.grow = r.grow;
    if (auto l = net::ParseAccessList(r.allow); l.ok()) e_.allow = std::move(l.value());
    else bad_.push_back(Refuse("export:" + r.name, l.status()));
    if (!r.size.empty()) {
      auto sz = ParseSize(r.size);
      if (sz.ok()) e_.size = sz.value();
      else bad_.push_back(Refuse("export:" + r.name, sz.status()));
    }
  }

  std::vector<ctl::Refusal> Validate(const PlanContext& ctx) override {
    std::vector<ctl::Refusal> out;
    const std::string obj = "export:" + e_.name;
    CheckName("export", e_.name, &out);
    out.insert(out.end(), bad_.begin(), bad_.end());
    if (!out.empty()) return out;
    if (!e_.array.empty() && !d_.PlanHas(ctx, "array", e_.array))
      out.push_back(Refuse(RefusalCode::kUnknownName, "array:" + e_.array, {},
                           fmt::format("no array \"{}\"", e_.array)));
    if (!e_.volume.empty() && !d_.PlanHas(ctx, "volume", e_.volume))
      out.push_back(Refuse(RefusalCode::kUnknownName, "volume:" + e_.volume, {},
                           fmt::format("no volume \"{}\"", e_.volume)));
    if (!e_.path.empty())
      if (Status s = d_.CheckPathAllowed(e_.path); !s.ok())
        return {Refuse(RefusalCode::kOutsideRoots, "file:" + e_.path, {}, Msg(s))};
    if (!e_.path.empty() && e_.size == 0 && !Exists(e_.path))
      out.push_back(Refuse(RefusalCode::kUnknownName, "file:" + e_.path, {},
                           fmt::format("{} does not exist (give a size to create it)", e_.path)));
    {
      std::lock_guard<std::mutex> l(d_.mu_);
      if (d_.exports_.count(e_.name) && !ctx.gone.count(obj))
        out.push_back(Refuse(RefusalCode::kExists, obj, {},
                             fmt::format("export \"{}\" already exists", e_.name)));
    }
    if (!out.empty()) return out;
    Use holder;
    if (Status s = d_.CheckExportFree(e_, ctx.gone, &holder); !s.ok())
      out.push_back(Refuse(holder.array.empty() ? RefusalCode::kBusy : RefusalCode::kLegInUse,
                           obj, OwnerOf(holder), Msg(s)));
    else if (auto t = ctx.taken.find(Source()); t != ctx.taken.end())
      out.push_back(PlannedUse(obj, t->second));
    return out;
  }

  std::string Creates() const override { return "export:" + e_.name; }
  void Planned(PlanContext* ctx) const override {
    ctx->gone.erase(Creates());
    ctx->created.insert(Creates());
    Take(ctx, Source(), Creates());
  }

  std::vector<Step> Plan() override {
    std::string src = !e_.path.empty()    ? e_.path
                      : !e_.array.empty() ? "--array " + e_.array
                                          : "--volume " + e_.volume;
    return {MakeStep(ctl::StepKind::kAddExport, "export:" + e_.name,
                     fmt::format("export add {} {}{}{}{}", e_.name, src,
                                 e_.read_only ? " --read-only" : "",
                                 e_.direct_io ? " --direct-io" : "", AllowArgs(e_.allow)),
                     [this] { return d_.AddExport(e_); })};
  }

  json Result() override { return d_.ExportJsonOf(e_.name); }

 private:
  std::string Source() const {
    return !e_.path.empty() ? e_.path : !e_.array.empty() ? "array:" + e_.array : "volume:" + e_.volume;
  }

  ExportConfig e_;
};

// export.allow: replaces the access list of a live export (later handshakes see it; connected
// clients keep theirs).  An export of the config file is changed there, not here: the file wins
// at the next start.
template <>
class OperationImpl<ctl::ExportAllowOp> : public OpOf<ctl::ExportAllowOp> {
 public:
  using OpOf::OpOf;

  std::vector<ctl::Refusal> Validate(const PlanContext& ctx) override {
    const std::string obj = "export:" + r_.name;
    auto l = net::ParseAccessList(r_.allow);
    if (!l.ok()) return {Refuse(obj, l.status())};
    allow_ = std::move(l.value());
    {
      std::lock_guard<std::mutex> lk(d_.mu_);
      if (!d_.exports_.count(r_.name) && !ctx.created.count(obj))
        return {Refuse(RefusalCode::kUnknownName, obj, {}, fmt::format("no export \"{}\"", r_.name))};
    }
    for (const auto& c : d_.cfg_.exports)
      if (c.name == r_.name)
        return {Refuse(RefusalCode::kInvalid, obj, "config",
                       fmt::format("export \"{}\" is defined in the config file; change its allow there",
                                   r_.name))};
    return {};
  }

  std::vector<Step> Plan() override {
    return {MakeStep(ctl::StepKind::kAllowExport, "export:" + r_.name,
                     fmt::format("export allow {}{}", r_.name, AllowArgs(allow_)),
                     [this] { return d_.SetExportAccess(r_.name, allow_); })};
  }

  json Result() override { return d_.ExportJsonOf(r_.name); }

 private:
  net::AccessList allow_;
};

template <>
class OperationImpl<ctl::ExportRemoveOp> : public OpOf<ctl::ExportRemoveOp> {
 public:
  using OpOf::OpOf;

  std::vector<ctl::Refusal> Validate(const PlanContext&) override {
    std::vector<ctl::Refusal> out;
    const std::string obj = "export:" + r_.name;
    {
      std::lock_guard<std::mutex> l(d_.mu_);
      if (!d_.exports_.count(r_.name))
        out.push_back(Refuse(RefusalCode::kUnknownName, obj, {},
                             fmt::format("no export \"{}\"", r_.name)));
    }
    if (out.empty() && d_.exporter_)
      for (auto& s : d_.exporter_->ListExports())
        if (s.name == r_.name && s.connections > 0)
          out.push_back(Refuse(RefusalCode::kBusy, obj, "clients",
                               fmt::format("export \"{}\" has {} connected client(s)", r_.name,
                                           s.connections)));
    return out;
  }

  std::vector<Step> Plan() override {
    return {MakeStep(ctl::StepKind::kRemoveExport, "export:" + r_.name, "export remove " + r_.name,
                     [this] { return d_.RemoveExport(r_.name); })};
  }

  void Planned(PlanContext* ctx) const override { Remove(ctx, "export:" + r_.name); }

};

template <>
class OperationImpl<ctl::VolumeImportOp> : public OpBase {
 public:
  OperationImpl(Daemon& d, VolumeConfig c) : OpBase(d), c_(std::move(c)) {}
  OperationImpl(Daemon& d, const ctl::VolumeImportOp& r) : OpBase(d) {
    c_.name = r.name;
    std::string uri = r.uri;
    if (net::HasBlockUriScheme(uri)) {  // dst://, dsts://, nbd://, nbd+unix:// (net/uri.h)
      if (Status s = ParseVolumeRemote(uri, &c_); !s.ok())
        bad_.push_back(Refuse("volume:" + r.name, s));
    } else {
      if (uri.rfind("file://", 0) == 0) uri = uri.substr(7);
      if (uri.empty() || uri[0] != '/')
        bad_.push_back(Refuse(
            RefusalCode::kInvalid, "volume:" + r.name, {},
            fmt::format("bad URI \"{}\" (expected dst[s]://HOST[:PORT]/EXPORT, "
                        "nbd://HOST[:PORT]/EXPORT or an absolute path)",
                        uri)));
      c_.path = uri;
    }
    if (r.queue_depth) c_.queue_depth = *r.queue_depth;
    if (r.io_timeout) c_.io_timeout_s = *r.io_timeout;
    if (r.keepalive_timeout) c_.keepalive_timeout_s = *r.keepalive_timeout;
  }

  std::vector<ctl::Refusal> Validate(const PlanContext& ctx) override {
    std::vector<ctl::Refusal> out;
    const std::string obj = "volume:" + c_.name;
    CheckName("volume", c_.name, &out);
    out.insert(out.end(), bad_.begin(), bad_.end());
    if (!out.empty()) return out;
    if (!c_.path.empty())
      if (Status s = d_.CheckPathAllowed(c_.path); !s.ok())
        return {Refuse(RefusalCode::kOutsideRoots, "file:" + c_.path, {}, Msg(s))};
    if (!c_.path.empty() && !Exists(c_.path))
      out.push_back(Refuse(RefusalCode::kUnknownName, "file:" + c_.path, {},
                           fmt::format("{} does not exist", c_.path)));
    {
      std::lock_guard<std::mutex> l(d_.mu_);
      if (d_.arrays_.count(c_.name) && !ctx.gone.count("array:" + c_.name))
        out.push_back(Refuse(RefusalCode::kExists, obj, "array:" + c_.name,
                             fmt::format("\"{}\" is an array", c_.name)));
      else if (d_.volumes_.count(c_.name) && !ctx.gone.count(obj))
        out.push_back(Refuse(RefusalCode::kExists, obj, {},
                             fmt::format("volume \"{}\" already exists", c_.name)));
    }
    if (!out.empty()) return out;
    Use holder;
    if (Status s = d_.CheckVolumeFree(c_, ctx.gone, &holder); !s.ok())
      out.push_back(Refuse(holder.array.empty() ? RefusalCode::kBusy : RefusalCode::kLegInUse,
                           obj, OwnerOf(holder), Msg(s)));
    else if (auto t = ctx.taken.find(Source()); t != ctx.taken.end())
      out.push_back(PlannedUse(obj, t->second));
    return out;
  }

  std::string Creates() const override { return "volume:" + c_.name; }
  void Planned(PlanContext* ctx) const override {
    ctx->gone.erase(Creates());
    ctx->created.insert(Creates());
    Take(ctx, Source(), Creates());
  }

  std::vector<Step> Plan() override {
    return {MakeStep(ctl::StepKind::kImportVolume, "volume:" + c_.name,
                     fmt::format("volume import {} {}", c_.name,
                                 c_.remote.empty() ? c_.path : c_.remote),
                     [this] { return d_.ImportVolume(c_); })};
  }

  json Result() override { return d_.VolumeJsonOf(c_.name); }

 private:
  std::string Source() const { return c_.remote.empty() ? c_.path : c_.remote; }

  VolumeConfig c_;
};

template <>
class OperationImpl<ctl::VolumeRemoveOp> : public OpOf<ctl::VolumeRemoveOp> {
 public:
  using OpOf::OpOf;

  std::vector<ctl::Refusal> Validate(const PlanContext& ctx) override {
    std::vector<ctl::Refusal> out;
    const std::string obj = "volume:" + r_.name;
    {
      std::lock_guard<std::mutex> l(d_.mu_);
      auto it = d_.volumes_.find(r_.name);
      if (it == d_.volumes_.end())
        out.push_back(Refuse(RefusalCode::kUnknownName, obj, {},
                             fmt::format("no volume \"{}\"", r_.name)));
      else if (it->second->is_array)
        out.push_back(Refuse(RefusalCode::kBusy, obj, "array:" + r_.name,
                             fmt::format("\"{}\" is an array (use: dstctl array remove {})",
                                         r_.name, r_.name)));
      else if (it->second->removing)
        out.push_back(Refuse(RefusalCode::kBusy, obj, {},
                             fmt::format("volume \"{}\" is being removed", r_.name)));
    }
    if (out.empty()) CheckUnused("volume", r_.name, ctx, &out);
    return out;
  }

  std::vector<Step> Plan() override {
    return {MakeStep(ctl::StepKind::kRemoveVolume, "volume:" + r_.name, "volume remove " + r_.name,
                     [this] { return d_.RemoveVolume(r_.name); })};
  }

  void Planned(PlanContext* ctx) const override { Remove(ctx, "volume:" + r_.name); }

};

template <>
class OperationImpl<ctl::MountOp> : public OpOf<ctl::MountOp> {
 public:
  using OpOf::OpOf;

  std::vector<ctl::Refusal> Validate(const PlanContext&) override {
    std::vector<ctl::Refusal> out;
    std::lock_guard<std::mutex> l(d_.mu_);
    if (d_.mount_)
      out.push_back(Refuse(RefusalCode::kExists, "mount:" + r_.path, "mount:" + d_.mount_->mountpoint(),
                           fmt::format("already mounted at {}", d_.mount_->mountpoint())));
    else if (d_.mount_busy_)
      out.push_back(Refuse(RefusalCode::kBusy, "mount:" + r_.path, {},
                           "a mount or unmount is in progress"));
    return out;
  }

  std::vector<Step> Plan() override {
    return {MakeStep(ctl::StepKind::kMount, "mount:" + r_.path, "mount " + r_.path,
                     [this] { return d_.Mount(r_.path); })};
  }

  json Result() override { return json{{"mount", r_.path}}; }

};

// ---------------------------------------------------------------------------------------------

std::unique_ptr<Operation> MakeOperation(Daemon& d, ctl::OpRequest req) {
  return std::visit(
      [&d](auto& r) -> std::unique_ptr<Operation> {
        using T = std::decay_t<decltype(r)>;
        return std::make_unique<OperationImpl<T>>(d, std::move(r));
      },
      req);
}

std::unique_ptr<Operation> MakeCreateArray(Daemon& d, ArrayConfig cfg) {
  return std::make_unique<OperationImpl<ctl::ArrayCreateOp>>(d, std::move(cfg));
}

std::unique_ptr<Operation> MakeAddExport(Daemon& d, ExportConfig e) {
  return std::make_unique<OperationImpl<ctl::ExportAddOp>>(d, std::move(e));
}

std::unique_ptr<Operation> MakeImportVolume(Daemon& d, VolumeConfig c) {
  return std::make_unique<OperationImpl<ctl::VolumeImportOp>>(d, std::move(c));
}

std::unique_ptr<Operation> MakeRetireLeg(Daemon& d, std::string array, int slot) {
  ctl::LegChangeOp r;
  r.array = std::move(array);
  r.action = ctl::LegAction::kRemove;
  r.slot = slot;
  return std::make_unique<OperationImpl<ctl::LegChangeOp>>(d, std::move(r), true);
}

ApplyOutcome Apply(std::vector<Step>& steps,
                   const std::function<void(const ctl::StepReport&)>& progress) {
  ApplyOutcome out;
  for (auto& s : steps) out.steps.push_back(ctl::StepReport{s.info, ctl::StepStatus::kNotRun, {}, {}});
  for (std::size_t i = 0; i < steps.size(); ++i) {
    Status st = steps[i].run();
    ctl::StepReport& r = out.steps[i];
    if (!st.ok()) {
      r.status = ctl::StepStatus::kFailed;
      r.error = Msg(st);
      r.error_code = ControlErrorCode(st);
      out.error = st;
      if (progress) progress(r);
      break;  // the rest stay "not run"
    }
    r.status = ctl::StepStatus::kDone;
    ++out.done;
    if (progress) progress(r);
  }
  return out;
}

std::string AmountText(std::uint64_t r) {
  if (r == 0) return "0";
  if (r % (1u << 30) == 0) return fmt::format("{}G", r >> 30);
  if (r % (1u << 20) == 0) return fmt::format("{}M", r >> 20);
  if (r % (1u << 10) == 0) return fmt::format("{}K", r >> 10);
  return std::to_string(r);
}

RefusalError DescribeRefusals(const std::vector<ctl::Refusal>& refusals) {
  RefusalError e;
  if (refusals.empty()) return e;
  e.code = ctl::ErrorCodeForRefusal(refusals.front().code);
  e.message = refusals.front().message;
  for (auto& r : refusals) e.reasons.push_back(ctl::ToJson(r));
  return e;
}

// ---------------------------------------------------------------------------------------------
// The single-object RPCs and apply.

bool Daemon::PlanHas(const PlanContext& ctx, const std::string& kind, const std::string& name) {
  const std::string key = kind + ":" + name;
  if (ctx.created.count(key)) return true;
  if (ctx.gone.count(key)) return false;
  std::lock_guard<std::mutex> l(mu_);
  if (kind == "array") return arrays_.count(name) > 0;
  auto it = volumes_.find(name);
  return it != volumes_.end() && !it->second->is_array;
}

void Daemon::OperationRpc(const ctl::Request& req, Reply reply) {
  ctl::OpRequest op;
  std::string why;
  if (!ctl::FromParams(req.method, req.params, &op, &why)) {
    spdlog::info("control: {} failed: {}", req.method, why);
    reply(ctl::EncodeError(req.id, ctl::kInvalidParams, why));
    return;
  }
  // Validate, Plan and Apply block (stat, SQLite, connects): a worker thread.
  workers_.Post([this, op = std::move(op), id = req.id, method = req.method, reply] {
    auto o = MakeOperation(*this, op);
    if (auto refusals = o->Validate(PlanContext{}); !refusals.empty()) {
      RefusalError e = DescribeRefusals(refusals);
      spdlog::info("control: {} refused: {}", method, e.message);
      reply(ctl::EncodeError(id, e.code, e.message, e.reasons));
      return;
    }
    auto steps = o->Plan();
    ApplyOutcome done = Apply(steps);
    if (!done.error.ok()) {
      spdlog::info("control: {} failed: {}", method, Msg(done.error));
      reply(ctl::EncodeError(id, ControlErrorCode(done.error), Msg(done.error)));
      return;
    }
    reply(ctl::EncodeResult(id, o->Result()));
  });
}

void Daemon::ApplyRpc(const ctl::Request& req, Reply reply) {
  const json& p = req.params;
  // Replaced once this apply owns apply_busy_ (ReleasingBusy).
  auto send = std::make_shared<Reply>(std::move(reply));
  auto fail = [id = req.id, send](const char* code, const std::string& message,
                                  const json& reasons = json()) {
    spdlog::info("control: apply failed: {}", message);
    (*send)(reasons.is_array() ? ctl::EncodeError(id, code, message, reasons)
                             : ctl::EncodeError(id, code, message));
  };
  auto str = [&](const char* k) {
    return p.contains(k) && p[k].is_string() ? p[k].get<std::string>() : std::string();
  };
  auto flag = [&](const char* k) { return p.contains(k) && p[k].is_boolean() && p[k].get<bool>(); };
  std::string text = str("config"), source = str("source");
  if (text.empty()) return fail(ctl::kInvalidParams, "parameter \"config\" must be a non-empty string");
  if (source.empty()) source = "apply";
  bool dry_run = flag("dry_run"), prune = flag("prune");
  if (apply_busy_.exchange(true)) return fail(ctl::kBusy, "another apply is running");
  *send = ReleasingBusy(std::move(*send));
  workers_.Post([this, text, source, dry_run, prune, fail, send, id = req.id] {
    auto cfg = ParseConfig(text, source);
    if (!cfg.ok()) return fail(ControlErrorCode(cfg.status()), Msg(cfg.status()));
    std::vector<std::string> kept;
    PlanContext ctx;
    std::vector<std::unique_ptr<Operation>> ops;
    if (Status s = PlanApply(cfg.value(), prune, &kept, &ctx, &ops); !s.ok())
      return fail(ControlErrorCode(s), Msg(s));
    // The whole plan is validated before the first step: a plan that would fail changes nothing.
    std::vector<ctl::Refusal> refusals;
    std::vector<std::string> problems;
    std::vector<Step> steps;
    for (auto& op : ops) {
      auto refused = op->Validate(ctx);
      auto op_steps = op->Plan();
      const std::string what = op_steps.empty() ? std::string() : op_steps.back().info.description;
      for (auto& r : refused) problems.push_back(fmt::format("\"{}\": {}", what, r.message));
      refusals.insert(refusals.end(), refused.begin(), refused.end());
      for (auto& s : op_steps) steps.push_back(std::move(s));
    }
    if (!refusals.empty()) {
      RefusalError e = DescribeRefusals(refusals);
      return fail(e.code.c_str(),
                  fmt::format("apply refused, nothing changed: {}", fmt::join(problems, "; ")),
                  e.reasons);
    }
    json plan_text = json::array(), reports = json::array();
    for (auto& s : steps) {
      plan_text.push_back(s.info.description);
      reports.push_back(ctl::ToJson(ctl::StepReport{s.info, ctl::StepStatus::kNotRun, {}, {}}));
    }
    json res{{"plan", plan_text}, {"dry_run", dry_run}, {"prune", prune}, {"kept", kept},
             {"done", json::array()}, {"steps", reports}, {"failed", false}};
    if (dry_run) {
      (*send)(ctl::EncodeResult(id, res));
      return;
    }
    ApplyOutcome out = RunPlan(steps);
    res["steps"] = json::array();
    for (auto& r : out.steps) {
      res["steps"].push_back(ctl::ToJson(r));
      if (r.status == ctl::StepStatus::kDone) res["done"].push_back(r.step.description);
    }
    if (!out.error.ok()) {
      // Reported step by step (done / failed / not run); running apply again converges, as the
      // plan is recomputed from what is live then.
      const auto& failed = out.steps[out.done];
      res["failed"] = true;
      res["error"] = fmt::format("\"{}\" failed: {} ({} of {} steps done)",
                                 failed.step.description, failed.error, out.done, steps.size());
      res["error_code"] = failed.error_code;
      spdlog::warn("apply: {}", res["error"].get<std::string>());
    }
    (*send)(ctl::EncodeResult(id, res));
  });
}

// Frees apply_busy_ before the reply goes out: a client may send the next apply right after it.
Daemon::Reply Daemon::ReleasingBusy(Reply reply) {
  return [this, reply = std::move(reply)](std::string line) {
    apply_busy_ = false;
    return reply(std::move(line));
  };
}

ApplyOutcome Daemon::RunPlan(std::vector<Step>& steps,
                             const std::function<json(std::size_t)>& extra) {
  // Per-step progress: the log, and an `apply_step` event for watchers (the GUI's log pane and
  // apply dialog).
  std::size_t i = 0;
  return Apply(steps, [&](const ctl::StepReport& r) {
    spdlog::info("apply: {}: {}{}", r.step.description, ctl::StepStatusName(r.status),
                 r.error.empty() ? "" : ": " + r.error);
    json ev = ctl::ToJson(r);
    ev["type"] = "apply_step";
    if (extra) ev.update(extra(i));
    ++i;
    Emit(std::move(ev));
  });
}

// `batch` (docs/control.md): the typed operations of `ops` in order, each validated against the
// live state as the ones before it will have left it (PlanContext, as apply), every one checked
// before the first step runs.  The refusals are reported per operation, as data; with dry_run, or
// when one is refused, nothing runs.
void Daemon::BatchRpc(const ctl::Request& req, Reply reply) {
  static constexpr std::size_t kMaxOps = 256;
  const json& p = req.params;
  auto fail = [id = req.id, reply](const std::string& message) {
    spdlog::info("control: batch failed: {}", message);
    reply(ctl::EncodeError(id, ctl::kInvalidParams, message));
  };
  if (!p.contains("ops") || !p["ops"].is_array())
    return fail("parameter \"ops\" must be a list of {\"method\", \"params\"} objects");
  if (p["ops"].size() > kMaxOps) return fail(fmt::format("at most {} operations in a batch", kMaxOps));
  if (p.contains("dry_run") && !p["dry_run"].is_boolean())
    return fail("parameter \"dry_run\" must be a boolean");
  const bool dry_run = p.value("dry_run", false);
  std::vector<std::pair<std::string, ctl::OpRequest>> reqs;
  for (std::size_t i = 0; i < p["ops"].size(); ++i) {
    const json& o = p["ops"][i];
    const json method = o.is_object() ? o.value("method", json()) : json();
    if (!method.is_string() || !ctl::IsOperationMethod(method.get<std::string>()))
      return fail(fmt::format("ops[{}]: \"method\" must name a changing operation "
                              "(array.create, array.add_leg, export.add, ...)", i));
    const json params = o.value("params", json::object());
    ctl::OpRequest op;
    std::string why;
    if (!params.is_object() || !ctl::FromParams(method.get<std::string>(), params, &op, &why))
      return fail(fmt::format("ops[{}] ({}): {}", i, method.get<std::string>(),
                              params.is_object() ? why : "\"params\" must be an object"));
    reqs.emplace_back(method.get<std::string>(), std::move(op));
  }
  if (apply_busy_.exchange(true)) {
    reply(ctl::EncodeError(req.id, ctl::kBusy, "another apply or batch is running"));
    return;
  }
  reply = ReleasingBusy(std::move(reply));
  workers_.Post([this, reqs = std::move(reqs), dry_run, reply, id = req.id]() mutable {
    PlanContext ctx;
    std::vector<std::unique_ptr<Operation>> ops;
    std::vector<Step> steps;
    std::vector<std::size_t> step_op;  // step -> its operation's index
    json res_ops = json::array(), refusals = json::array();  // refusals: each with its "op"
    bool valid = true;
    for (std::size_t i = 0; i < reqs.size(); ++i) {
      auto op = MakeOperation(*this, std::move(reqs[i].second));
      std::vector<ctl::Refusal> refused;
      // Names clash within the batch too (arrays and volumes share theirs).
      if (std::string made = op->Creates(); !made.empty()) {
        std::string name = made.substr(made.find(':') + 1), kind = made.substr(0, made.find(':'));
        bool clash = ctx.created.count(made) ||
                     (kind != "export" && ctx.created.count((kind == "array" ? "volume:" : "array:") + name));
        if (clash)
          refused.push_back(ctl::Refusal{RefusalCode::kExists, made, {},
                                         fmt::format("\"{}\" is created by an earlier operation of "
                                                     "this batch", name)});
      }
      if (refused.empty()) refused = op->Validate(ctx);
      json o{{"method", reqs[i].first}, {"reasons", json::array()}, {"steps", json::array()}};
      if (!refused.empty()) {
        valid = false;
        for (auto& r : refused) {
          o["reasons"].push_back(ctl::ToJson(r));
          refusals.push_back(ctl::ToJson(r));
          refusals.back()["op"] = i;
        }
        o["status"] = "refused";
      } else {
        op->Planned(&ctx);
        for (auto& s : op->Plan()) {
          step_op.push_back(i);
          steps.push_back(std::move(s));
        }
        o["status"] = "not run";
      }
      res_ops.push_back(std::move(o));
      ops.push_back(std::move(op));
    }
    auto report = [&](const std::vector<ctl::StepReport>& reports) {
      json all = json::array(), plan = json::array(), done = json::array();
      for (auto& o : res_ops) o["steps"] = json::array();
      for (std::size_t k = 0; k < reports.size(); ++k) {
        json r = ctl::ToJson(reports[k]);
        res_ops[step_op[k]]["steps"].push_back(r);
        r["op"] = step_op[k];
        all.push_back(std::move(r));
        plan.push_back(reports[k].step.description);
        if (reports[k].status == ctl::StepStatus::kDone) done.push_back(reports[k].step.description);
      }
      // An operation is done when all its steps are, failed when one failed (or one ran and a
      // later one did not), else not run.
      for (auto& o : res_ops) {
        if (o["status"] == "refused") continue;
        std::size_t n_done = 0, n_failed = 0;
        for (auto& st : o["steps"]) {
          n_done += st["status"] == "done";
          n_failed += st["status"] == "failed";
        }
        o["status"] = n_done == o["steps"].size() && n_done ? "done"
                      : n_failed || n_done               ? "failed"
                                                          : "not run";
      }
      return json{{"dry_run", dry_run}, {"valid", valid}, {"refusals", refusals}, {"ops", res_ops},
                  {"plan", plan}, {"steps", all}, {"done", done}, {"failed", false}};
    };
    std::vector<ctl::StepReport> planned;
    for (auto& s : steps) planned.push_back(ctl::StepReport{s.info, ctl::StepStatus::kNotRun, {}, {}});
    if (dry_run || !valid) {
      if (!valid) spdlog::info("control: batch refused, nothing changed");
      reply(ctl::EncodeResult(id, report(planned)));
      return;
    }
    ApplyOutcome out = RunPlan(steps, [&](std::size_t k) {
      return json{{"source", "batch"}, {"op", step_op[k]}};
    });
    json res = report(out.steps);
    if (!out.error.ok()) {
      const auto& failed = out.steps[out.done];
      res["failed"] = true;
      res["error"] = fmt::format("operation {} ({}): \"{}\" failed: {} ({} of {} steps done)",
                                 step_op[out.done], reqs[step_op[out.done]].first,
                                 failed.step.description, failed.error, out.done, steps.size());
      res["error_code"] = failed.error_code;
      res["failed_op"] = step_op[out.done];
      res["failed_step"] = res["steps"][out.done];
      spdlog::warn("batch: {}", res["error"].get<std::string>());
    }
    reply(ctl::EncodeResult(id, res));
  });
}

}  // namespace dst::daemon
