// Safe apply (issue 9 item 6): every step of an apply plan is checked against the live state
// (minus what the plan removes first, plus what it creates) before the first step runs, so a
// plan that would fail on a missing file, an unknown leg, a leg in use, a name clash or an
// object still in use is refused whole and changes nothing.  What cannot be known in advance
// (a remote peer that is down) still fails at its step; apply then reports every step as done,
// failed or not run, and running it again converges.
#include <sys/stat.h>

#include <fmt/format.h>

#include "daemon.h"

namespace dst::daemon {

namespace {

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

}  // namespace

bool Daemon::PlanHas(const std::shared_ptr<PlanContext>& ctx, const std::string& kind,
                     const std::string& name) {
  const std::string key = kind + ":" + name;
  if (ctx->created.count(key)) return true;
  if (ctx->gone.count(key)) return false;
  std::lock_guard<std::mutex> l(mu_);
  if (kind == "array") return arrays_.count(name) > 0;
  auto it = volumes_.find(name);
  return it != volumes_.end() && !it->second->is_array;
}

std::function<Status()> Daemon::CheckAddExport(std::shared_ptr<PlanContext> ctx, ExportConfig e) {
  return [this, ctx, e] {
    if (!e.array.empty() && !PlanHas(ctx, "array", e.array))
      return Status::NotFound(fmt::format("no array \"{}\"", e.array));
    if (!e.volume.empty() && !PlanHas(ctx, "volume", e.volume))
      return Status::NotFound(fmt::format("no volume \"{}\"", e.volume));
    if (!e.path.empty() && e.size == 0 && !Exists(e.path))
      return Status::NotFound(fmt::format("{} does not exist (give a size to create it)", e.path));
    return CheckExportFree(e, ctx->gone);
  };
}

std::function<Status()> Daemon::CheckAddVolume(std::shared_ptr<PlanContext> ctx, VolumeConfig v) {
  return [this, ctx, v] {
    if (!v.path.empty() && !Exists(v.path))
      return Status::NotFound(fmt::format("{} does not exist", v.path));
    {
      std::lock_guard<std::mutex> l(mu_);
      if (arrays_.count(v.name) && !ctx->gone.count("array:" + v.name))
        return Status::Exists(fmt::format("\"{}\" is an array", v.name));
    }
    return CheckVolumeFree(v, ctx->gone);
  };
}

std::function<Status()> Daemon::CheckAddLegs(std::shared_ptr<PlanContext> ctx, std::string array,
                                             std::vector<std::string> legs, bool new_array) {
  return [this, ctx, array, legs, new_array]() -> Status {
    if (new_array) {
      std::lock_guard<std::mutex> l(mu_);
      auto it = volumes_.find(array);
      if (it != volumes_.end() && !it->second->is_array && !ctx->gone.count("volume:" + array))
        return Status::Exists(fmt::format("a volume \"{}\" already exists", array));
    }
    for (auto& spec : legs) {
      LegSpec ls;
      DST_RETURN_IF_ERROR(ParseLegSpec(spec, &ls));
      switch (ls.kind) {
        case LegSpec::Kind::kPath:
          if (!Exists(ls.ref))
            return Status::NotFound(fmt::format("leg \"{}\": {} does not exist", spec, ls.ref));
          break;
        case LegSpec::Kind::kVolume:
        case LegSpec::Kind::kArray: {
          const char* kind = ls.kind == LegSpec::Kind::kVolume ? "volume" : "array";
          if (!PlanHas(ctx, kind, ls.ref))
            return Status::NotFound(fmt::format("leg \"{}\": no {} \"{}\"", spec, kind, ls.ref));
          break;
        }
        default:
          break;  // remote legs: reachability shows at the step
      }
      DST_RETURN_IF_ERROR(CheckLegFree(spec, array, -1, ctx->gone));
    }
    return new_array ? CheckLegsDistinct(legs) : Status::OK();
  };
}

std::function<Status()> Daemon::CheckRemove(std::shared_ptr<PlanContext> ctx, std::string kind,
                                            std::string name) {
  return [this, ctx, kind, name]() -> Status {
    if (kind == "export") {
      if (exporter_)
        for (auto& s : exporter_->ListExports())
          if (s.name == name && s.connections > 0)
            return Status::Busy(fmt::format("export \"{}\" has {} connected client(s)", name,
                                            s.connections));
      return Status::OK();
    }
    // A volume or an array: not a leg or an export source that stays, and its file not open.
    for (auto& u : Uses(ctx->gone)) {
      if (u.ref != kind + ":" + name) continue;
      if (!u.array.empty())
        return Status::Busy(fmt::format("{} \"{}\" is {}", kind, name, u.owner));
      if (!u.export_name.empty())
        return Status::Busy(fmt::format("{} \"{}\" is {}", kind, name, u.owner));
    }
    std::shared_ptr<fuse::FuseMount> m;
    {
      std::lock_guard<std::mutex> l(mu_);
      m = mount_;
    }
    if (m)
      for (auto& f : m->ListVolumes())
        if (f.name == name && f.open_count > 0)
          return Status::Busy(fmt::format("{} \"{}\" is in use ({}/{}.img is open)", kind, name,
                                          m->mountpoint(), name));
    return Status::OK();
  };
}

}  // namespace dst::daemon
