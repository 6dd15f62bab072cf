// Exclusive legs (issue 9 item 3): a leg belongs to one array, and nothing else on this daemon
// writes under it.  The daemon refuses, naming the owner:
//   * a leg already used by an array (this one in another slot, or another array);
//   * an export or a volume over a file (or volume, array, remote export) that is a live leg;
//   * re-adding a leg that is still exported or imported as a volume (a detached snapshot leg
//     must be released first);
//   * a second read-write user of one file (two read-write exports, or an export and a local
//     volume).  Read-only exports of a file that is not a leg may coexist with one writer.
// Files compare by device and inode (the same file under two paths, a hard link or a symlink
// is the same file), falling back to the resolved path for files that do not exist yet.
// Remote legs and volumes compare by host:port/export.
#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <fmt/format.h>

#include "daemon.h"
#include "dst/net/uri.h"

namespace dst::daemon {

namespace {

struct FileKey {
  bool have_inode = false;
  dev_t dev = 0;
  ino_t ino = 0;
  std::string path;  // realpath when it resolves, else as given
};

FileKey KeyOf(const std::string& path) {
  FileKey k;
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) {
    k.have_inode = true;
    k.dev = S_ISBLK(st.st_mode) ? st.st_rdev : st.st_dev;
    k.ino = S_ISBLK(st.st_mode) ? 0 : st.st_ino;
  }
  char buf[PATH_MAX];
  k.path = ::realpath(path.c_str(), buf) ? std::string(buf) : path;
  return k;
}

bool SameFile(const FileKey& a, const FileKey& b) {
  if (a.have_inode && b.have_inode) return a.dev == b.dev && a.ino == b.ino;
  return a.path == b.path;
}

// The canonical URI of a dst:// or nbd:// spec, so "dst://h/e" and "dst://h:7400/e" match (and
// dsts://h/e too: the same export, inside TLS).
std::string RemoteKey(const std::string& spec) {
  net::BlockUri u;
  if (net::ParseBlockUri(spec, &u).ok()) {
    u.tls = false;
    return u.Canonical();
  }
  return spec;  // anything else: as written
}

// A refusal of a Check*Free below, with the use that causes it (for the refusal's owner).
template <typename Use>  // deduced: Daemon::Use is private
Status Held(Use* holder, const Use& u, Status s) {
  if (holder) *holder = u;
  return s;
}

}  // namespace

std::vector<Daemon::Use> Daemon::Uses(const std::set<std::string>& gone) {
  struct ArrSnap {
    std::string name;
    std::vector<std::string> specs;
    std::shared_ptr<MirrorDevice> mirror;
  };
  std::vector<Use> out;
  std::vector<ArrSnap> arrs;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [n, e] : exports_) {
      if (gone.count("export:" + n)) continue;
      Use u;
      u.export_name = n;
      u.rw = !e.read_only;
      if (!e.path.empty()) u.path = e.path;
      else if (!e.volume.empty()) u.ref = "volume:" + e.volume;
      else u.ref = "array:" + e.array;
      u.owner = fmt::format("exported {}as \"{}\"", e.read_only ? "read-only " : "", n);
      out.push_back(std::move(u));
    }
    for (auto& [n, v] : volumes_) {
      if (v->is_array || v->removed || gone.count("volume:" + n)) continue;
      Use u;
      u.volume_name = n;
      u.rw = true;
      if (!v->cfg.path.empty()) u.path = v->cfg.path;
      else u.remote = RemoteKey(v->cfg.remote);
      u.owner = fmt::format("imported as volume \"{}\"", n);
      out.push_back(std::move(u));
    }
    for (auto& [n, a] : arrays_) {
      if (a->removed || gone.count("array:" + n)) continue;
      ArrSnap s{n, {}, a->mirror};
      for (auto& leg : a->legs) s.specs.push_back(leg.spec);
      arrs.push_back(std::move(s));
    }
  }
  for (auto& s : arrs) {
    std::vector<LegStatus> states;
    if (s.mirror) states = s.mirror->Legs();
    for (std::size_t i = 0; i < s.specs.size(); ++i) {
      if (s.specs[i].empty()) continue;
      LegSpec ls;
      if (!ParseLegSpec(s.specs[i], &ls).ok()) continue;
      Use u;
      u.array = s.name;
      u.slot = int(i);
      u.rw = true;
      u.live = true;
      for (auto& st : states)
        if (st.slot == int(i) && st.state == LegState::kDetached) u.live = false;
      switch (ls.kind) {
        case LegSpec::Kind::kPath: u.path = ls.ref; break;
        case LegSpec::Kind::kDst:
        case LegSpec::Kind::kNbd: u.remote = RemoteKey(s.specs[i]); break;
        case LegSpec::Kind::kVolume: u.ref = "volume:" + ls.ref; break;
        case LegSpec::Kind::kArray: u.ref = "array:" + ls.ref; break;
      }
      u.owner = fmt::format("{} leg {} of array \"{}\"", u.live ? "a live" : "the detached",
                            i, s.name);
      out.push_back(std::move(u));
    }
  }
  return out;
}

// The uses of the same object as `u` (file by inode, remote by address, volume/array by name).
std::vector<Daemon::Use> Daemon::UsesOf(const Use& want, const std::set<std::string>& gone) {
  std::vector<Use> all = Uses(gone), same;
  FileKey wk;
  if (!want.path.empty()) wk = KeyOf(want.path);
  for (auto& u : all) {
    bool match = false;
    if (!want.path.empty() && !u.path.empty()) match = SameFile(wk, KeyOf(u.path));
    else if (!want.remote.empty()) match = u.remote == want.remote;
    else if (!want.ref.empty()) match = u.ref == want.ref;
    // Skip the object itself (an export or volume checking its own entry, a leg its own slot).
    if (!want.export_name.empty() && u.export_name == want.export_name) match = false;
    if (!want.volume_name.empty() && u.volume_name == want.volume_name) match = false;
    if (!want.array.empty() && u.array == want.array && u.slot == want.slot) match = false;
    if (match) same.push_back(u);
  }
  return same;
}

Status Daemon::CheckExportFree(const ExportConfig& e, const std::set<std::string>& gone,
                               Use* holder) {
  Use w;
  w.export_name = e.name;
  w.rw = !e.read_only;
  std::string what;
  if (!e.path.empty()) {
    w.path = e.path;
    what = e.path;
  } else if (!e.volume.empty()) {
    w.ref = "volume:" + e.volume;
    what = fmt::format("volume \"{}\"", e.volume);
  } else {
    w.ref = "array:" + e.array;
    what = fmt::format("array \"{}\"", e.array);
  }
  for (auto& u : UsesOf(w, gone)) {
    if (!u.array.empty() && u.live)
      return Held(holder, u, Status::Busy(fmt::format(
                                 "cannot export {}: it is {} (a leg belongs to its array)", what,
                                 u.owner)));
    if (w.rw && u.rw && u.array.empty())
      return Held(holder, u, Status::Busy(fmt::format(
                                 "cannot export {} read-write: it is already {}", what, u.owner)));
  }
  return Status::OK();
}

Status Daemon::CheckVolumeFree(const VolumeConfig& c, const std::set<std::string>& gone,
                               Use* holder) {
  Use w;
  w.volume_name = c.name;
  w.rw = true;
  if (!c.path.empty()) w.path = c.path;
  else w.remote = RemoteKey(c.remote);
  const std::string& what = c.path.empty() ? c.remote : c.path;
  for (auto& u : UsesOf(w, gone)) {
    if (!u.array.empty() && u.live)
      return Held(holder, u, Status::Busy(fmt::format(
                                 "cannot import {}: it is {} (a leg belongs to its array)", what,
                                 u.owner)));
    if (u.rw && u.array.empty())
      return Held(holder, u, Status::Busy(fmt::format(
                                 "cannot import {} read-write: it is already {}", what, u.owner)));
  }
  return Status::OK();
}

Status Daemon::CheckLegFree(const std::string& spec, const std::string& array, int slot,
                            const std::set<std::string>& gone, Use* holder) {
  LegSpec ls;
  DST_RETURN_IF_ERROR(ParseLegSpec(spec, &ls));
  Use w;
  w.array = array;
  w.slot = slot;
  switch (ls.kind) {
    case LegSpec::Kind::kPath: w.path = ls.ref; break;
    case LegSpec::Kind::kDst:
    case LegSpec::Kind::kNbd: w.remote = RemoteKey(spec); break;
    case LegSpec::Kind::kVolume: w.ref = "volume:" + ls.ref; break;
    case LegSpec::Kind::kArray: w.ref = "array:" + ls.ref; break;
  }
  for (auto& u : UsesOf(w, gone)) {
    // A remote leg may be imported as a plain volume by name (volume:NAME); that volume is the
    // leg then.  Everything else that shares the object is a second owner.
    if (!u.volume_name.empty() && ls.kind == LegSpec::Kind::kVolume) continue;
    if (!u.export_name.empty())
      return Held(holder, u, Status::Busy(fmt::format(
                                 "leg \"{}\" is still {} (export remove {} first)", spec, u.owner,
                                 u.export_name)));
    return Held(holder, u, Status::Busy(fmt::format("leg \"{}\" is already {}", spec, u.owner)));
  }
  return Status::OK();
}

Status Daemon::CheckLegsDistinct(const std::vector<std::string>& specs) {
  std::vector<std::pair<std::string, FileKey>> files;
  for (auto& spec : specs) {
    LegSpec ls;
    if (!ParseLegSpec(spec, &ls).ok() || ls.kind != LegSpec::Kind::kPath) continue;
    FileKey k = KeyOf(ls.ref);
    for (auto& [other, ok] : files)
      if (SameFile(k, ok))
        return Status::InvalidArgument(
            fmt::format("legs \"{}\" and \"{}\" are the same file", other, spec));
    files.emplace_back(spec, k);
  }
  return Status::OK();
}

}  // namespace dst::daemon
