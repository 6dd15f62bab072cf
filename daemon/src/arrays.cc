// dstd arrays: linear and mirror arrays over leg devices, persisted topology, automatic leg
// repair, the array.* RPCs, `events` and `apply`.
//
// Leg lifecycle (per slot of an assembled mirror; the monitor thread ticks once a second):
//
//   MISSING (dev == nullptr) --OpenLeg ok--> ReAddLeg --> resyncing --> up-to-date
//      ^  (backoff 1..30 s)                                              |
//      |                                                    I/O error / io_timeout
//      +-- remote closed <-- FAILED (mirror stops using it) <-----------+
//                               | remote "connected" again, not failed by the operator
//                               +--> ReAddLeg (partial resync: only the out-of-sync regions)
//
// Everything that blocks (connects, Create with header writes, ReAddLeg, Close, SQLite) runs on
// a worker thread, the monitor thread or the main thread, never on an io thread.
#include <sys/stat.h>
#include <sqlite3.h>
#include <unistd.h>

#include <algorithm>
#include <concepts>
#include <filesystem>
#include <set>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "daemon.h"
#include "dst/file_device.h"
#include "dst/layer.h"
#include "layer_json.h"
#include "loop_devices.h"
#include "verify_store.h"

namespace dst::daemon {

using nlohmann::json;
namespace ctl = dst::control;

namespace {

std::string Msg(const Status& s) {
  return s.message().empty() ? std::string(Status::CodeName(s.code())) : s.message();
}

double NowTs() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

Status ParamString(const json& p, const char* key, bool required, std::string* out) {
  auto it = p.find(key);
  if (it == p.end() || it->is_null())
    return required ? Status::InvalidArgument(fmt::format("missing parameter \"{}\"", key))
                    : Status::OK();
  if (!it->is_string() || it->get<std::string>().empty())
    return Status::InvalidArgument(fmt::format("parameter \"{}\" must be a non-empty string", key));
  *out = it->get<std::string>();
  return Status::OK();
}

Status FlushDeadline(BlockDevice& dev, std::chrono::milliseconds timeout) {
  struct Op {
    IoRequest req;
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    Status st;
  };
  auto op = std::make_shared<Op>();
  op->req.op = IoOp::kFlush;
  op->req.ctx = new std::shared_ptr<Op>(op);
  op->req.done = [](IoRequest* r, Status st) {
    auto* holder = static_cast<std::shared_ptr<Op>*>(r->ctx);
    std::shared_ptr<Op> o = *holder;
    delete holder;
    std::lock_guard<std::mutex> l(o->mu);
    o->st = st;
    o->done = true;
    o->cv.notify_all();
  };
  dev.Submit(&op->req);
  std::unique_lock<std::mutex> l(op->mu);
  if (!op->cv.wait_for(l, timeout, [&] { return op->done; }))
    return Status::TimedOut("flush timed out");
  return op->st;
}

MirrorOptions MirrorOpts(const ArrayConfig& c, bool assume_clean, const std::string& host_id,
                         const std::string& host_name, bool force_create = false) {
  MirrorOptions o;
  o.name = c.name;
  o.host_id = host_id;
  o.host_name = host_name;
  o.force_create = force_create;
  const MirrorKeys k = MirrorKeysFrom(c.params);
  o.region_size = k.region_size;
  o.write_intent = k.write_intent;
  o.assume_clean = assume_clean;
  o.resync.rate.floor = k.resync_rate_min;
  o.resync.rate.ceiling = k.resync_rate_max;
  return o;
}

std::vector<std::string> LiveLegs(const ArrayConfig& c) {
  std::vector<std::string> out;
  for (auto& l : c.legs)
    if (!l.empty()) out.push_back(l);
  return out;
}


// After the FUSE file's attributes were invalidated: one stat() from here refreshes the kernel's
// i_size, so `losetup -c` on a loop device over the file sees the new size without anyone else
// having to stat it first.  (Never on a FUSE thread: this is a worker or the monitor.)
void StatFuseFile(const std::string& mountpoint, const std::string& name) {
  struct stat st;
  (void)::stat((mountpoint + "/" + name + ".img").c_str(), &st);
}

// Tells the FUSE mount that a volume's size changed, when FuseMount can (a requires-expression,
// so this builds before and after fusefs gains RefreshVolume: re-read Info().size and invalidate
// the inode's attributes, so an open/loop-mounted file grows too).  false: not supported.
template <typename M>
bool RefreshFuseSize(M& m, const std::string& name) {
  if constexpr (requires { { m.RefreshVolume(name) } -> std::same_as<Status>; }) {
    return m.RefreshVolume(name).ok();
  } else {
    (void)m;
    (void)name;
    return false;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Startup and shutdown

Status Daemon::StartArrays() {
  std::string db = opts_.state_dir + "/dstd.sqlite";
  auto st = SqliteDirtyMapStore::Open(db);
  if (!st.ok()) return st.status().WithContext(db);
  store_ = std::shared_ptr<DirtyMapStore>(std::move(st.value()));
  DST_RETURN_IF_ERROR(LoadHostIdentity(db));
  DST_RETURN_IF_ERROR(OpenTopology());
  OpenVerifyStore(db);
  auto recs = topo_->List();
  if (!recs.ok()) return recs.status().WithContext(db);

  // Known arrays (topology table) are re-assembled; config arrays not yet known are created.
  std::vector<std::shared_ptr<Array>> todo;
  std::set<std::string> known;
  for (auto& r : recs.value()) {
    auto a = std::make_shared<Array>();
    a->cfg = r.cfg;
    a->id = r.id;
    a->created = true;
    for (auto& c : cfg_.arrays) {
      if (c.name != r.cfg.name) continue;
      // The layer's live keys (a mirror's rates and write-intent) and the array-wide tuning
      // follow the file; structure follows the table (live changes made with dstctl win;
      // `dstctl apply` reconciles the file).
      const LayerInfo* layer = FindLayer(r.cfg.level);
      if (layer && r.cfg.level == c.level) CopyLiveParams(*layer, c.params, &a->cfg.params);
      a->cfg.leg_timeout_s = c.leg_timeout_s;
      a->cfg.verify_interval_s = c.verify_interval_s;
      a->cfg.checksum = c.checksum;
      if (LiveLegs(r.cfg) != c.legs || r.cfg.level != c.level || a->cfg.params != c.params)
        spdlog::warn("array \"{}\": the config file differs from the recorded topology ({} {}); "
                     "using the recorded one (dstctl apply reconciles)",
                     c.name, r.cfg.level, fmt::join(LiveLegs(r.cfg), " "));
    }
    known.insert(r.cfg.name);
    todo.push_back(a);
  }
  for (auto& c : cfg_.arrays) {
    if (known.count(c.name)) continue;
    auto a = std::make_shared<Array>();
    a->cfg = c;
    todo.push_back(a);
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& a : todo) {
      a->legs.resize(a->cfg.legs.size());
      for (std::size_t i = 0; i < a->cfg.legs.size(); ++i) a->legs[i].spec = a->cfg.legs[i];
      arrays_[a->cfg.name] = a;
    }
  }
  // Dependency order: an array whose legs include array:X waits until X was tried.
  std::set<std::string> done;
  for (std::size_t round = 0; round <= todo.size() && done.size() < todo.size(); ++round) {
    for (auto& a : todo) {
      if (done.count(a->cfg.name)) continue;
      bool ready = true;
      for (auto& spec : a->cfg.legs) {
        LegSpec ls;
        if (ParseLegSpec(spec, &ls).ok() && ls.kind == LegSpec::Kind::kArray &&
            !done.count(ls.ref) && arrays_.count(ls.ref))
          ready = false;
      }
      if (!ready && round < todo.size()) continue;
      done.insert(a->cfg.name);
      std::lock_guard<std::mutex> ol(a->op_mu);
      if (Status s = BringUp(a); !s.ok()) {
        spdlog::warn("array \"{}\": {}; retrying in the background", a->cfg.name, Msg(s));
      }
    }
  }
  monitor_thread_ = std::thread([this] { ArrayMonitorLoop(); });
  events_thread_ = std::thread([this] { EventsLoop(); });
  return Status::OK();
}

void Daemon::StopArrayThreads() {
  {
    std::lock_guard<std::mutex> l(ev_mu_);
    ev_stop_ = true;
  }
  events_.Stop();
  ev_cv_.notify_all();
  if (monitor_thread_.joinable()) monitor_thread_.join();
  if (events_thread_.joinable()) events_thread_.join();
}

void Daemon::CloseArrays() {
  // Outer arrays first: an array used as a leg of another closes after its user.
  std::vector<std::shared_ptr<Array>> all;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [n, a] : arrays_) all.push_back(a);
  }
  std::set<std::string> closed;
  for (std::size_t round = 0; round <= all.size(); ++round) {
    for (auto& a : all) {
      if (closed.count(a->cfg.name)) continue;
      bool used = false;
      for (auto& b : all) {
        if (b == a || closed.count(b->cfg.name)) continue;
        for (auto& spec : b->cfg.legs)
          if (spec == "array:" + a->cfg.name) used = true;
      }
      if (used && round < all.size()) continue;
      closed.insert(a->cfg.name);
      std::lock_guard<std::mutex> ol(a->op_mu);
      if (a->mirror) {
        Status s = a->mirror->Close();
        if (s.ok()) spdlog::info("array \"{}\": closed cleanly", a->cfg.name);
        else spdlog::warn("array \"{}\": close: {}", a->cfg.name, Msg(s));
      } else if (a->dev) {
        (void)FlushDeadline(*a->dev, std::chrono::seconds(20));
      }
      for (auto& leg : a->legs) {
        if (!leg.owned) continue;
        if (leg.remote) leg.remote->Close();
        if (leg.nbd) leg.nbd->Close();
      }
    }
  }
  std::lock_guard<std::mutex> l(mu_);
  arrays_.clear();
}

// The host id in our claims on leg headers: generated once, kept in the state DB, so that a
// restarted dstd (even after kill -9) recognises its own live leases at once.
Status Daemon::LoadHostIdentity(const std::string& db) {
  host_name_ = cfg_.host_name;
  if (host_name_.empty()) {
    char buf[256] = {};
    if (::gethostname(buf, sizeof buf - 1) == 0) host_name_ = buf;
    if (host_name_.empty()) host_name_ = "localhost";
  }
  sqlite3* h = nullptr;
  if (sqlite3_open(db.c_str(), &h) != SQLITE_OK) {
    sqlite3_close(h);
    return Status::IoError(fmt::format("{}: cannot open the state database", db));
  }
  sqlite3_busy_timeout(h, 5000);
  std::string id;
  auto exec = [&](const std::string& sql) {
    return sqlite3_exec(h, sql.c_str(), nullptr, nullptr, nullptr) == SQLITE_OK;
  };
  bool ok = exec("CREATE TABLE IF NOT EXISTS dst_host(key TEXT PRIMARY KEY, value TEXT)");
  sqlite3_stmt* q = nullptr;
  if (ok && sqlite3_prepare_v2(h, "SELECT value FROM dst_host WHERE key='host_id'", -1, &q, nullptr) == SQLITE_OK &&
      sqlite3_step(q) == SQLITE_ROW && sqlite3_column_text(q, 0))
    id = reinterpret_cast<const char*>(sqlite3_column_text(q, 0));
  sqlite3_finalize(q);
  if (ok && id.empty()) {
    id = NewUuid();
    ok = exec("INSERT OR REPLACE INTO dst_host(key, value) VALUES('host_id', '" + id + "')");
  }
  sqlite3_close(h);
  if (!ok || id.empty()) return Status::IoError(fmt::format("{}: cannot record the host id", db));
  host_id_ = id;
  spdlog::info("host \"{}\" (id {}): claims on mirror legs carry this identity", host_name_, host_id_);
  return Status::OK();
}

// ---------------------------------------------------------------------------------------------
// Devices

// Every leg device is wrapped in a CountingDevice (per-leg reads/writes/errors/bytes).
Result<Daemon::ArrayLeg> Daemon::OpenLeg(const std::string& spec, const ArrayConfig& cfg) {
  auto r = OpenLegDevice(spec, cfg);
  if (!r.ok()) return r;
  ArrayLeg leg = std::move(r.value());
  leg.counter = std::make_shared<CountingDevice>(leg.dev);
  leg.dev = leg.counter;
  return leg;
}

Result<Daemon::ArrayLeg> Daemon::OpenLegDevice(const std::string& spec, const ArrayConfig& cfg) {
  LegSpec ls;
  DST_RETURN_IF_ERROR(ParseLegSpec(spec, &ls));
  ArrayLeg leg;
  leg.spec = spec;
  switch (ls.kind) {
    case LegSpec::Kind::kDst: {
      net::RemoteOptions ro;
      VolumeConfig vc;
      DST_RETURN_IF_ERROR(ParseVolumeUri(spec, &ro.host, &ro.port, &ro.export_name));
      ro.batching = cfg_.batching;
      ro.io_timeout = std::chrono::seconds(cfg.leg_timeout_s);
      ro.keepalive_timeout = std::chrono::seconds(std::min<std::uint32_t>(cfg.leg_timeout_s, 5));
      ro.keepalive_interval = std::min<std::chrono::milliseconds>(
          std::chrono::milliseconds(1000), ro.keepalive_timeout / 3);
      ro.connect_timeout = std::chrono::seconds(3);
      ro.checksum = cfg.checksum == "xxh3";
      DST_RETURN_IF_ERROR(UseTls(spec, ro.host, ro.port, &ro));
      auto r = net::RemoteDevice::Connect(io_, ro);
      if (!r.ok()) return r.status().message().find(spec) == std::string::npos
                              ? r.status().WithContext(spec) : r.status();
      leg.remote = r.value();
      leg.dev = leg.remote;
      leg.owned = true;
      return leg;
    }
    case LegSpec::Kind::kNbd: {
      net::NbdClientOptions no;
      DST_RETURN_IF_ERROR(net::ParseNbdUri(spec, &no));
      DST_RETURN_IF_ERROR(UseNbdTls(spec, &no));
      no.batching = cfg_.batching;
      no.io_timeout = std::chrono::seconds(cfg.leg_timeout_s);
      no.keepalive_timeout = std::chrono::seconds(std::min<std::uint32_t>(cfg.leg_timeout_s, 5));
      no.connect_timeout = std::chrono::seconds(3);
      auto r = net::NbdClientDevice::Connect(io_, no);
      if (!r.ok()) return r.status().WithContext(spec);
      leg.nbd = r.value();
      leg.dev = leg.nbd;
      leg.owned = true;
      return leg;
    }
    case LegSpec::Kind::kPath: {
      auto r = FileDevice::Open(ls.ref, FileDeviceOptions{});
      if (!r.ok()) return r.status().WithContext(ls.ref);
      leg.dev = r.value();
      leg.owned = true;
      return leg;
    }
    case LegSpec::Kind::kVolume: {
      std::lock_guard<std::mutex> l(mu_);
      auto it = volumes_.find(ls.ref);
      if (it == volumes_.end() || it->second->is_array)
        return Status::NotFound(fmt::format("no volume \"{}\"", ls.ref));
      if (!it->second->dev)
        return Status::Unavailable(fmt::format("volume \"{}\" is not connected", ls.ref));
      leg.dev = it->second->dev;
      leg.remote = it->second->remote;
      return leg;
    }
    case LegSpec::Kind::kArray: {
      std::lock_guard<std::mutex> l(mu_);
      auto it = arrays_.find(ls.ref);
      if (it == arrays_.end()) return Status::NotFound(fmt::format("no array \"{}\"", ls.ref));
      if (ls.ref == cfg.name) return Status::InvalidArgument("an array cannot be its own leg");
      if (!it->second->dev)
        return Status::Unavailable(fmt::format("array \"{}\" is not assembled", ls.ref));
      leg.dev = it->second->dev;
      return leg;
    }
  }
  return Status::InvalidArgument("bad leg");
}

Status Daemon::BringUp(const std::shared_ptr<Array>& a) {
  if (a->dev || a->removed) return Status::OK();
  const LayerInfo* layer = FindLayer(a->cfg.level);
  if (!layer) {
    std::lock_guard<std::mutex> l(mu_);
    a->error = fmt::format("unknown level \"{}\" ({})", a->cfg.level, LayerNames());
    return Status::InvalidArgument(a->error);
  }
  // Redundant layers carry their own state (identity, maps): the mirror path below.
  const bool mirror = layer->redundant;
  std::shared_ptr<BlockDevice> built;  // a stateless layer's device (registry factory)
  std::vector<std::shared_ptr<BlockDevice>> devs(a->legs.size());
  std::size_t present = 0, wanted = 0;
  std::string first_error;
  for (std::size_t i = 0; i < a->legs.size(); ++i) {
    ArrayLeg& leg = a->legs[i];
    if (leg.spec.empty()) continue;
    ++wanted;
    if (!leg.dev) {
      auto r = OpenLeg(leg.spec, a->cfg);
      std::lock_guard<std::mutex> l(mu_);  // ArrayJson reads legs under mu_
      if (r.ok()) {
        bool manual = leg.manual;
        leg = std::move(r.value());
        leg.manual = manual;
      } else {
        leg.error = Msg(r.status());
        if (first_error.empty()) first_error = leg.error;
      }
    }
    if (leg.dev) {
      devs[i] = leg.dev;
      ++present;
    }
  }
  Status st;
  if (!a->created || !mirror) {
    if (present < wanted) {
      st = Status::Unavailable(fmt::format("{} of {} legs unreachable ({})", wanted - present,
                                           wanted, first_error));
    } else if (mirror) {
      if (a->id.empty()) a->id = NewUuid();  // a retry after a partial create keeps the same id
      auto r = MirrorDevice::Create(devs, store_,
                                    MirrorOpts(a->cfg, a->assume_clean, host_id_, host_name_,
                                               a->force_create),
                                    a->id);
      if (r.ok()) {
        std::lock_guard<std::mutex> l(mu_);
        a->mirror = r.value();
        a->id = a->mirror->id();
      }
      st = r.status();
    } else {
      std::vector<std::shared_ptr<BlockDevice>> ld;
      for (auto& d : devs)
        if (d) ld.push_back(d);
      auto r = layer->create(ld, a->cfg.params);
      if (r.ok()) {
        std::lock_guard<std::mutex> l(mu_);
        built = r.value();
        a->linear = std::dynamic_pointer_cast<LinearDevice>(built);  // grow appends to it
        if (a->id.empty()) a->id = NewUuid();
      }
      st = r.status();
    }
  } else {
    if (present == 0) {
      st = Status::Unavailable(fmt::format("no leg reachable ({})", first_error));
    } else {
      MirrorOptions mo = MirrorOpts(a->cfg, false, host_id_, host_name_);
      mo.new_generations = a->takeover;
      auto r = MirrorDevice::Assemble(a->id, devs, store_, mo);
      if (r.ok()) {
        std::lock_guard<std::mutex> l(mu_);
        a->mirror = r.value();
      }
      st = r.status();
    }
  }
  if (!st.ok()) {
    std::lock_guard<std::mutex> l(mu_);
    a->error = Msg(st);
    // A new array keeps nothing open while it waits for its legs.
    if (!a->created) {
      for (auto& leg : a->legs) {
        if (!leg.owned || !leg.dev) continue;
        if (leg.remote) leg.remote->Close();
        if (leg.nbd) leg.nbd->Close();
        leg.dev.reset();
        leg.remote.reset();
        leg.nbd.reset();
      }
    }
    return st;
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    a->dev = a->mirror ? std::shared_ptr<BlockDevice>(a->mirror) : built;
    a->error.clear();
  }
  bool was_created = a->created;
  a->created = true;
  if (Status ps = PersistArray(a); !ps.ok())
    spdlog::error("array \"{}\": cannot record topology: {}", a->cfg.name, Msg(ps));
  spdlog::info("array \"{}\": {} {} ({} bytes, {}/{} legs)", a->cfg.name,
               was_created ? "assembled" : "created", a->cfg.level, a->dev->Info().size, present,
               wanted);
  for (std::size_t i = 0; i < a->legs.size(); ++i)
    if (!a->legs[i].spec.empty() && !a->legs[i].dev)
      spdlog::warn("array \"{}\": leg {} ({}) is missing: {}; retrying in the background",
                   a->cfg.name, i, a->legs[i].spec, a->legs[i].error);
  RegisterArrayVolume(a);
  Emit(json{{"type", "array_state"}, {"array", a->cfg.name}, {"state", "assembled"}});
  WatchLegs(a);
  return Status::OK();
}

std::uint64_t Daemon::SampleResync(const std::shared_ptr<Array>& a) {
  std::shared_ptr<MirrorDevice> m;
  {
    std::lock_guard<std::mutex> l(mu_);
    m = a->mirror;
  }
  std::lock_guard<std::mutex> l(a->acc_mu);
  if (m) {
    for (auto& p : m->Progress()) {
      if (a->banking.count(p.leg)) continue;  // banked; the engine is restarting its pass
      std::uint64_t& last = a->resync_last[p.leg];
      if (p.bytes_resynced_total < last) a->resync_base[p.leg] += last;  // a new pass started
      last = p.bytes_resynced_total;
    }
  }
  std::uint64_t total = 0;
  for (auto& [leg, v] : a->resync_base) total += v;
  for (auto& [leg, v] : a->resync_last) total += v;
  return total;
}

std::uint64_t Daemon::BankResync(const std::shared_ptr<Array>& a, int slot) {
  SampleResync(a);
  std::lock_guard<std::mutex> l(a->acc_mu);
  std::uint64_t v = a->resync_last[slot];
  a->resync_base[slot] += v;
  a->resync_last[slot] = 0;
  a->banking.insert(slot);
  return v;
}

void Daemon::BankDone(const std::shared_ptr<Array>& a, int slot) {
  std::lock_guard<std::mutex> l(a->acc_mu);
  a->banking.erase(slot);
}

void Daemon::UnbankResync(const std::shared_ptr<Array>& a, int slot, std::uint64_t bytes) {
  std::lock_guard<std::mutex> l(a->acc_mu);
  a->resync_base[slot] -= bytes;
  a->resync_last[slot] = bytes;
  a->banking.erase(slot);
}

Status Daemon::PersistArray(const std::shared_ptr<Array>& a) {
  if (!topo_) return Status::OK();
  TopologyRecord r;
  r.cfg = a->cfg;
  for (std::size_t i = 0; i < a->legs.size() && i < r.cfg.legs.size(); ++i)
    r.cfg.legs[i] = a->legs[i].spec;
  r.id = a->id;
  std::lock_guard<std::mutex> l(topo_mu_);
  return topo_->Put(r);
}

void Daemon::RegisterArrayVolume(const std::shared_ptr<Array>& a) {
  auto vol = std::make_shared<Volume>();
  vol->cfg.name = a->cfg.name;
  vol->cfg.path = "array:" + a->cfg.name;
  vol->state = "ready";
  vol->counter = std::make_shared<CountingDevice>(a->dev);
  vol->dev = vol->counter;
  vol->is_array = true;
  {
    std::lock_guard<std::mutex> l(mu_);
    volumes_[a->cfg.name] = vol;
  }
  AddToMount(vol);
  TryPendingExports();
}

std::shared_ptr<Daemon::Array> Daemon::FindArray(const std::string& name) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = arrays_.find(name);
  return it == arrays_.end() ? nullptr : it->second;
}

void Daemon::TryPendingExports() {
  if (!exporter_) return;
  std::vector<ExportConfig> want;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [n, e] : exports_)
      if (e.path.empty()) want.push_back(e);
  }
  if (want.empty()) return;
  std::set<std::string> live;
  for (auto& s : exporter_->ListExports()) live.insert(s.name);
  for (auto& e : want) {
    if (live.count(e.name)) continue;
    std::shared_ptr<BlockDevice> dev;
    {
      std::lock_guard<std::mutex> l(mu_);
      auto it = volumes_.find(e.array.empty() ? e.volume : e.array);
      if (it != volumes_.end()) dev = it->second->dev;
    }
    if (!dev) continue;
    Status s = ServeExport(e, dev, {});  // DST and NBD
    if (s.ok())
      spdlog::info("export \"{}\": {} \"{}\" ({} bytes)", e.name,
                   e.array.empty() ? "volume" : "array", e.array.empty() ? e.volume : e.array,
                   dev->Info().size);
    else if (s.code() != Status::Code::kExists)
      spdlog::warn("export \"{}\": {}", e.name, Msg(s));
  }
}

// ---------------------------------------------------------------------------------------------
// Management (blocking; worker threads)

// The steps of the typed operations (operations.cc): their Validate checked the preconditions;
// what is re-checked here must be atomic with the change (a name taken meanwhile) or keeps the
// step safe on its own.

Status Daemon::CreateArray(ArrayConfig cfg, bool assume_clean, bool force) {
  // The layer's key defaults (a config-file array arrives with them; an operation's with the
  // values its Validate resolved): resolving again is idempotent.
  const LayerInfo* layer = FindLayer(cfg.level);
  if (!layer)
    return Status::InvalidArgument(fmt::format("unknown level \"{}\" ({})", cfg.level, LayerNames()));
  auto params = ResolveLayerParams(*layer, cfg.params);
  if (!params.ok()) return params.status();
  cfg.params = std::move(params.value());
  auto a = std::make_shared<Array>();
  a->cfg = cfg;
  a->assume_clean = assume_clean;
  a->force_create = force;
  a->legs.resize(cfg.legs.size());
  for (std::size_t i = 0; i < cfg.legs.size(); ++i) a->legs[i].spec = cfg.legs[i];
  {
    std::lock_guard<std::mutex> l(mu_);
    if (arrays_.count(cfg.name) || volumes_.count(cfg.name))
      return Status::Exists(fmt::format("a volume or array \"{}\" already exists", cfg.name));
    arrays_[cfg.name] = a;
  }
  std::lock_guard<std::mutex> ol(a->op_mu);
  Status st = BringUp(a);
  if (!st.ok()) {
    std::lock_guard<std::mutex> l(mu_);
    arrays_.erase(cfg.name);
    a->removed = true;
  }
  return st;
}

Status Daemon::RemoveArray(const std::string& name) {
  auto a = FindArray(name);
  if (!a) return Status::NotFound(fmt::format("no array \"{}\"", name));
  std::lock_guard<std::mutex> ol(a->op_mu);
  std::shared_ptr<fuse::FuseMount> m;
  std::shared_ptr<Volume> vol;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = volumes_.find(name);
    if (it != volumes_.end() && it->second->is_array) {
      vol = it->second;
      if (vol->in_mount) m = mount_;
    }
  }
  if (m) {
    Status st = m->RemoveVolume(name);
    if (!st.ok() && !st.IsNotFound()) {
      if (st.code() == Status::Code::kBusy)
        st = Status::Busy(fmt::format("array \"{}\" is in use ({}/{}.img is open)", name,
                                      m->mountpoint(), name));
      return st;
    }
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    if (vol) {
      vol->in_mount = false;
      vol->removed = true;
      volumes_.erase(name);
    }
    arrays_.erase(name);
    a->removed = true;
  }
  if (a->mirror) {
    (void)a->mirror->Close();
    if (store_ && !a->id.empty() && !a->releasing) (void)store_->DeleteArray(a->id);
  } else if (a->dev) {
    (void)FlushDeadline(*a->dev, std::chrono::seconds(20));
  }
  for (auto& leg : a->legs) {
    if (!leg.owned) continue;
    if (leg.remote) leg.remote->Close();
    if (leg.nbd) leg.nbd->Close();
  }
  {
    std::lock_guard<std::mutex> l(topo_mu_);
    if (topo_) (void)topo_->Delete(name);
  }
  {
    std::lock_guard<std::mutex> l(verify_mu_);
    verify_last_.erase(name);
  }
  if (verify_store_) (void)verify_store_->Delete(name);
  spdlog::info("array \"{}\" removed", name);
  Emit(json{{"type", "array_state"}, {"array", name}, {"state", "removed"}});
  return Status::OK();
}

Status Daemon::CheckLegChange(const ArrayConfig& cfg, bool grow) {
  const LayerInfo* layer = FindLayer(cfg.level);
  const LegChange change = layer ? layer->legs.change : LegChange::kFixed;
  if (change == LegChange::kFixed)
    return Status::InvalidArgument(
        fmt::format("array \"{}\" is a {}: its legs cannot change live", cfg.name, cfg.level));
  if (grow && change != LegChange::kAppend)
    return Status::InvalidArgument(fmt::format(
        "array \"{}\" is a {}: grow appends legs, which it does not (use add-leg)", cfg.name,
        cfg.level));
  return Status::OK();
}

Status Daemon::ArrayAddLeg(const std::string& name, const std::string& spec, bool grow_only) {
  auto a = FindArray(name);
  if (!a) return Status::NotFound(fmt::format("no array \"{}\"", name));
  std::lock_guard<std::mutex> ol(a->op_mu);
  if (!a->dev) return Status::Unavailable(fmt::format("array \"{}\" is not assembled: {}", name, a->error));
  // Again under op_mu (Validate checked it too): the layer's rule for live leg changes.
  DST_RETURN_IF_ERROR(CheckLegChange(a->cfg, grow_only));
  auto r = OpenLeg(spec, a->cfg);
  if (!r.ok()) return r.status();
  ArrayLeg leg = std::move(r.value());
  auto close_leg = [&] {
    if (!leg.owned) return;
    if (leg.remote) leg.remote->Close();
    if (leg.nbd) leg.nbd->Close();
  };
  if (a->linear) {
    if (Status s = a->linear->AppendLeg(leg.dev); !s.ok()) {
      close_leg();
      return s;
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      a->legs.push_back(leg);
      a->cfg.legs.push_back(spec);
    }
    // The FUSE file caches its size: re-add it so the new size shows (only while it is closed).
    std::shared_ptr<fuse::FuseMount> m;
    std::shared_ptr<Volume> vol;
    {
      std::lock_guard<std::mutex> l(mu_);
      auto it = volumes_.find(name);
      if (it != volumes_.end() && it->second->in_mount) {
        m = mount_;
        vol = it->second;
      }
    }
    if (m && vol && RefreshFuseSize(*m, name)) {
      StatFuseFile(m->mountpoint(), name);
      spdlog::info("array \"{}\": {}/{}.img grew to {} bytes (a loop device on it: losetup -c)",
                   name, m->mountpoint(), name, a->dev->Info().size);
    } else if (m && vol) {
      Status rs = m->RemoveVolume(name);
      if (rs.ok()) {
        {
          std::lock_guard<std::mutex> l(mu_);
          vol->in_mount = false;
        }
        AddToMount(vol);
      } else {
        spdlog::info("array \"{}\": {}/{}.img is open; its new size shows once it is closed", name, m->mountpoint(), name);
      }
    }
  } else {
    SampleResync(a);
    auto slot = a->mirror->AddLeg(leg.dev);
    if (!slot.ok()) {
      close_leg();
      return slot.status();
    }
    std::lock_guard<std::mutex> l(mu_);
    std::size_t s = std::size_t(slot.value());
    if (a->legs.size() <= s) a->legs.resize(s + 1);
    if (a->cfg.legs.size() <= s) a->cfg.legs.resize(s + 1);
    a->legs[s] = leg;
    a->cfg.legs[s] = spec;
  }
  DST_RETURN_IF_ERROR(PersistArray(a));
  spdlog::info("array \"{}\": leg {} added", name, spec);
  return Status::OK();
}

Status Daemon::ArrayLegOp(const std::string& name, const std::string& op, int slot,
                          const std::string& spec, bool force) {
  auto a = FindArray(name);
  if (!a) return Status::NotFound(fmt::format("no array \"{}\"", name));
  std::lock_guard<std::mutex> ol(a->op_mu);
  if (!a->mirror)
    return Status::InvalidArgument(
        a->dev ? fmt::format("array \"{}\" is {}: legs cannot be failed, removed or "
                             "detached (it has no redundancy)", name, a->cfg.level)
                  : fmt::format("array \"{}\" is not assembled: {}", name, a->error));
  if (slot < 0 || std::size_t(slot) >= a->legs.size())
    return Status::NotFound(fmt::format("array \"{}\" has no leg in slot {}", name, slot));
  ArrayLeg& leg = a->legs[std::size_t(slot)];
  // Again under op_mu: the monitor may have failed another leg since Validate.
  if (op != "readd") DST_RETURN_IF_ERROR(CheckRetire(a, slot, op, force, {}, nullptr));
  if (op == "fail") {
    DST_RETURN_IF_ERROR(a->mirror->FailLeg(slot));
    leg.manual = true;
  } else if (op == "detach") {
    DST_RETURN_IF_ERROR(a->mirror->DetachLeg(slot));
    leg.manual = true;
  } else if (op == "remove") {
    std::uint64_t banked = BankResync(a, slot);
    if (Status rs = a->mirror->RemoveLeg(slot); !rs.ok()) {
      UnbankResync(a, slot, banked);
      return rs;
    }
    BankDone(a, slot);
    ArrayLeg old;
    {
      std::lock_guard<std::mutex> l(mu_);
      old = leg;
      leg = ArrayLeg{};
      a->cfg.legs[std::size_t(slot)].clear();
    }
    if (old.owned) {
      if (old.remote) old.remote->Close();
      if (old.nbd) old.nbd->Close();
    }
    DST_RETURN_IF_ERROR(PersistArray(a));
  } else if (op == "readd") {
    std::string use = spec.empty() ? leg.spec : spec;
    if (use.empty()) return Status::InvalidArgument("slot is empty: give the leg to re-add");
    std::shared_ptr<BlockDevice> dev = use == leg.spec ? leg.dev : nullptr;
    ArrayLeg fresh;
    if (!dev) {
      auto r = OpenLeg(use, a->cfg);
      if (!r.ok()) return r.status();
      fresh = std::move(r.value());
      dev = fresh.dev;
    }
    std::uint64_t banked = BankResync(a, slot);
    // A remote leg whose connection is being re-checked (its exporter just came back) can fail
    // the header read with EIO while the old check rejects the connection; the operator's
    // re-add must not lose that race.  Unreachable for 2 s more is a real refusal.
    Status s = a->mirror->ReAddLeg(slot, dev);
    for (int i = 0; i < 4 && s.code() == Status::Code::kUnavailable; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      s = a->mirror->ReAddLeg(slot, dev);
    }
    if (s.ok()) BankDone(a, slot);
    if (!s.ok()) {
      UnbankResync(a, slot, banked);
      if (fresh.owned && fresh.remote) fresh.remote->Close();
      if (fresh.owned && fresh.nbd) fresh.nbd->Close();
      return s;
    }
    ArrayLeg old;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (fresh.dev) {
        old = leg;
        leg = fresh;
      }
      leg.manual = false;
      leg.backoff_s = 1;
      leg.spec = use;
      a->cfg.legs[std::size_t(slot)] = use;
    }
    if (old.owned && old.dev != leg.dev) {
      if (old.remote) old.remote->Close();
      if (old.nbd) old.nbd->Close();
    }
    DST_RETURN_IF_ERROR(PersistArray(a));
  } else {
    return Status::InvalidArgument("unknown leg operation");
  }
  spdlog::info("array \"{}\": {} leg {} done", name, op, slot);
  return Status::OK();
}

Status Daemon::ArraySetRate(const std::string& name, std::uint64_t min, std::uint64_t max) {
  auto a = FindArray(name);
  if (!a) return Status::NotFound(fmt::format("no array \"{}\"", name));
  std::lock_guard<std::mutex> ol(a->op_mu);
  {
    std::lock_guard<std::mutex> l(mu_);
    a->cfg.params["resync_rate_min"] = std::to_string(min);
    a->cfg.params["resync_rate_max"] = std::to_string(max);
  }
  if (a->mirror) a->mirror->SetResyncRate(ResyncRate{min, max});
  return PersistArray(a);
}

// array.pause_resync / array.resume_resync.  Runtime only (docs/control.md): the pause lives in
// the MirrorDevice, so a restart of dstd or a re-assembly of the array resumes the resync.
// check_only: the operation's Validate (same refusals, nothing changed).
Status Daemon::PauseResync(const std::string& name, bool pause, bool check_only) {
  auto a = FindArray(name);
  if (!a) return Status::NotFound(fmt::format("no array \"{}\"", name));
  std::shared_ptr<MirrorDevice> m;
  {
    std::lock_guard<std::mutex> l(mu_);
    m = a->mirror;
    if (!m && a->dev)
      return Status::InvalidArgument(fmt::format(
          "array \"{}\" is {}: only a mirror resyncs", name, a->cfg.level));
    if (!m)
      return Status::Unavailable(fmt::format("array \"{}\" is not assembled: {}", name, a->error));
  }
  const bool paused = m->resync_paused();
  if (!pause && !paused)
    return Status::InvalidArgument(fmt::format("the resync of array \"{}\" is not paused", name));
  if (pause && paused)
    return Status::InvalidArgument(fmt::format("the resync of array \"{}\" is already paused", name));
  json legs = json::array();
  for (auto& p : m->Progress())
    if (p.leg_state == LegState::kResyncing) legs.push_back(p.leg);
  if (pause && legs.empty())
    return Status::InvalidArgument(
        fmt::format("array \"{}\" has no resync to pause: no leg is resyncing", name));
  if (check_only) return Status::OK();
  m->PauseResync(pause);
  spdlog::info("array \"{}\": resync {}", name, pause ? "paused" : "resumed");
  Emit(json{{"type", pause ? "resync_paused" : "resync_resumed"}, {"array", name}, {"legs", legs}});
  return Status::OK();
}

// ---------------------------------------------------------------------------------------------
// Identity: split-brain resolution and clean hand-over (release) to another host.

Result<json> Daemon::ArrayResolve(const std::string& name, int keep, bool dry_run) {
  auto a = FindArray(name);
  if (!a) return Status::NotFound(fmt::format("no array \"{}\"", name));
  std::lock_guard<std::mutex> ol(a->op_mu);
  if (!a->mirror)
    return Status::InvalidArgument(fmt::format("array \"{}\" is not an assembled mirror", name));
  std::uint64_t banked[MirrorDevice::kMaxLegs] = {};
  if (!dry_run)
    for (int s = 0; s < MirrorDevice::kMaxLegs; ++s) banked[s] = BankResync(a, s);
  auto r = a->mirror->Resolve(keep, dry_run);
  if (r.ok() && !dry_run)
    for (int s = 0; s < MirrorDevice::kMaxLegs; ++s) BankDone(a, s);
  if (!r.ok()) {
    if (!dry_run)
      for (int s = 0; s < MirrorDevice::kMaxLegs; ++s) UnbankResync(a, s, banked[s]);
    return r.status();
  }
  json legs = json::array();
  std::uint64_t total = 0;
  for (auto& st : r.value()) {
    std::string spec = std::size_t(st.slot) < a->legs.size() ? a->legs[std::size_t(st.slot)].spec : "";
    legs.push_back(json{{"slot", st.slot}, {"spec", spec}, {"keep", st.keep},
                        {"bytes_overwritten", st.bytes_overwritten}});
    total += st.bytes_overwritten;
  }
  if (!dry_run) {
    spdlog::warn("array \"{}\": split brain resolved keeping leg {}; {} bytes on the other legs are "
                 "overwritten from it", name, keep, total);
    {
      std::lock_guard<std::mutex> l(mu_);
      for (auto& leg : a->legs) leg.manual = false;
    }
    Emit(json{{"type", "split_brain_resolved"}, {"array", name}, {"keep", keep},
              {"bytes_overwritten", total}});
  }
  return json{{"array", name}, {"keep", keep}, {"dry_run", dry_run}, {"legs", legs},
              {"bytes_overwritten", total}};
}

Status Daemon::ArrayRelease(const std::string& name) {
  auto a = FindArray(name);
  if (!a) return Status::NotFound(fmt::format("no array \"{}\"", name));
  {
    std::lock_guard<std::mutex> ol(a->op_mu);
    if (!a->mirror)
      return Status::InvalidArgument(fmt::format(
          "array \"{}\" is not an assembled mirror (only mirrors carry claims to release)", name));
  }
  // Refused for what refuses `array remove` (a leg or export of it; operations.cc).
  if (auto refusals = MakeOperation(*this, ctl::ArrayRemoveOp{name})->Validate(PlanContext{});
      !refusals.empty()) {
    RefusalError e = DescribeRefusals(refusals);
    return e.code == ctl::kBusy ? Status::Busy(e.message) : Status::InvalidArgument(e.message);
  }
  // RemoveArray stops it cleanly (flush, clean, claims released in Close); the store record and
  // the leg headers are kept, so `array import` on another host (or this one) takes it over.
  std::string id = a->id;
  {
    std::lock_guard<std::mutex> l(mu_);
    a->releasing = true;
  }
  Status st = RemoveArray(name);
  if (!st.ok()) {
    std::lock_guard<std::mutex> l(mu_);
    a->releasing = false;
    return st;
  }
  spdlog::info("array \"{}\" (id {}) released: its legs carry no claim; import it with "
               "`dstctl array import {} LEG...`", name, id, name);
  Emit(json{{"type", "array_state"}, {"array", name}, {"state", "released"}});
  return Status::OK();
}

Status Daemon::ArrayImport(const std::string& name, const std::vector<std::string>& specs) {
  if (!ValidName(name)) return Status::InvalidArgument(fmt::format("bad name \"{}\"", name));
  if (specs.empty()) return Status::InvalidArgument("give the legs to import");
  {
    std::lock_guard<std::mutex> l(mu_);
    if (arrays_.count(name) || volumes_.count(name))
      return Status::Exists(fmt::format("a volume or array \"{}\" already exists", name));
  }
  ArrayConfig cfg;
  cfg.name = name;
  cfg.level = "mirror";
  for (auto& c : cfg_.arrays)
    if (c.name == name) cfg = c;  // rates/timeouts from the file when it names the array
  std::vector<ArrayLeg> opened;
  auto close_all = [&] {
    for (auto& leg : opened) {
      if (!leg.owned) continue;
      if (leg.remote) leg.remote->Close();
      if (leg.nbd) leg.nbd->Close();
    }
  };
  std::vector<std::shared_ptr<BlockDevice>> devs;
  for (auto& spec : specs) {
    auto r = OpenLeg(spec, cfg);
    if (!r.ok()) {
      close_all();
      return r.status();
    }
    opened.push_back(std::move(r.value()));
    devs.push_back(opened.back().dev);
  }
  auto imp = MirrorDevice::Import(devs, store_, MirrorOpts(cfg, false, host_id_, host_name_));
  if (!imp.ok()) {
    close_all();
    return imp.status();
  }
  auto a = std::make_shared<Array>();
  a->cfg = cfg;
  a->id = imp->first;
  a->created = true;
  auto rec = store_->GetArray(a->id);
  if (rec.ok()) a->cfg.params["region_size"] = std::to_string(rec->region_size);
  const auto& by_slot = imp->second;
  a->cfg.legs.assign(by_slot.size(), "");
  a->legs.resize(by_slot.size());
  for (std::size_t s = 0; s < by_slot.size(); ++s)
    for (auto& leg : opened)
      if (by_slot[s] && leg.dev == by_slot[s]) {
        a->legs[s] = leg;
        a->cfg.legs[s] = leg.spec;
      }
  {
    std::lock_guard<std::mutex> l(mu_);
    if (arrays_.count(name)) {
      close_all();
      return Status::Exists(fmt::format("a volume or array \"{}\" already exists", name));
    }
    arrays_[name] = a;
  }
  std::lock_guard<std::mutex> ol(a->op_mu);
  a->takeover = true;  // new generations on every leg: the previous holder sees any change
  Status st = BringUp(a);
  a->takeover = false;
  if (!st.ok()) {
    {
      std::lock_guard<std::mutex> l(mu_);
      arrays_.erase(name);
      a->removed = true;
    }
    close_all();
    return st;
  }
  spdlog::info("array \"{}\" (id {}) imported from {}", name, a->id, fmt::join(specs, " "));
  return Status::OK();
}

// ---------------------------------------------------------------------------------------------
// Monitor: assemble waiting arrays, reconnect missing legs, re-add recovered ones.

void Daemon::ArrayMonitorLoop() {
  for (;;) {
    {
      std::unique_lock<std::mutex> l(ev_mu_);
      if (ev_cv_.wait_for(l, std::chrono::seconds(1), [this] { return ev_stop_; })) return;
    }
    std::vector<std::shared_ptr<Array>> all;
    {
      std::lock_guard<std::mutex> l(mu_);
      for (auto& [n, a] : arrays_) all.push_back(a);
    }
    auto now = std::chrono::steady_clock::now();
    for (auto& a : all) {
      std::unique_lock<std::mutex> ol(a->op_mu, std::try_to_lock);
      if (!ol.owns_lock() || a->removed || stopping_) continue;
      if (!a->dev) {
        bool due = false;
        for (auto& leg : a->legs) due |= !leg.spec.empty() && !leg.dev && now >= leg.next_try;
        if (!due) continue;
        for (auto& leg : a->legs) {
          if (leg.spec.empty() || leg.dev) continue;
          leg.next_try = now + std::chrono::seconds(leg.backoff_s);
          leg.backoff_s = std::min(leg.backoff_s * 2, 30);
        }
        if (BringUp(a).ok()) spdlog::info("array \"{}\" is up", a->cfg.name);
        continue;
      }
      ProbeLegs(a);
      if (!a->mirror) continue;
      std::vector<LegStatus> ls = a->mirror->Legs();
      for (auto& st : ls) {
        if (st.slot < 0 || std::size_t(st.slot) >= a->legs.size()) continue;
        ArrayLeg& leg = a->legs[std::size_t(st.slot)];
        if (leg.spec.empty() || leg.manual) continue;
        if (st.state == LegState::kUpToDate) leg.backoff_s = 1;
        if (st.state != LegState::kFailed || now < leg.next_try) continue;
        // Identity failures wait for the operator; a blank replacement is the mirror's own job.
        if (LegReasonNeedsOperator(st.reason) || st.reason == LegReason::kBlank) continue;
        // A closed remote never comes back: drop it and connect afresh.
        if (leg.dev && leg.owned && leg.remote && leg.remote->Stats().state == "closed") {
          std::lock_guard<std::mutex> l(mu_);
          leg.dev.reset();
          leg.remote.reset();
        }
        if (leg.dev && leg.owned && leg.nbd && leg.nbd->Stats().state == "closed") {
          std::lock_guard<std::mutex> l(mu_);
          leg.dev.reset();
          leg.nbd.reset();
        }
        if (leg.dev) {
          std::string link = leg.remote ? leg.remote->Stats().state
                             : leg.nbd  ? leg.nbd->Stats().state
                                        : "ready";
          // Local legs that failed had an I/O error: re-adding them in a loop would hide it.
          if (link != "connected" || !leg.dev->Health().reachable) continue;
          if (!leg.remote && !leg.nbd) continue;
        } else {
          auto r = OpenLeg(leg.spec, a->cfg);
          if (!r.ok()) {
            {
              std::lock_guard<std::mutex> l(mu_);
              leg.error = Msg(r.status());
            }
            leg.next_try = now + std::chrono::seconds(leg.backoff_s);
            leg.backoff_s = std::min(leg.backoff_s * 2, 30);
            continue;
          }
          std::lock_guard<std::mutex> l(mu_);
          leg = std::move(r.value());
        }
        std::uint64_t banked = BankResync(a, st.slot);
        Status s = a->mirror->ReAddLegAuto(st.slot, leg.dev);
        if (!s.ok()) UnbankResync(a, st.slot, banked);
        else BankDone(a, st.slot);
        leg.next_try = now + std::chrono::seconds(leg.backoff_s);
        leg.backoff_s = std::min(leg.backoff_s * 2, 30);
        if (s.ok()) {
          {
            std::lock_guard<std::mutex> l(mu_);
            leg.error.clear();
          }
          spdlog::info("array \"{}\": leg {} ({}) is back; re-added", a->cfg.name, st.slot,
                       leg.spec);
        } else {
          std::lock_guard<std::mutex> l(mu_);
          leg.error = Msg(s);
          spdlog::debug("array \"{}\": re-add of leg {} failed: {}", a->cfg.name, st.slot, Msg(s));
        }
      }
    }
    TryPendingExports();
    RefreshGrownFiles();
    VerifyTick();
  }
}

// Truthful health (issue 9 item 4): idle legs are probed without I/O.  A leg whose device says
// it is unreachable (BlockDevice::Health; for remote legs also a link that is not "connected")
// for leg_timeout is dead: I/O to it fails now.  A dead mirror leg is failed (FailLeg), so the
// mirror stops waiting on it and tracks what it misses; the monitor re-adds it once it is
// reachable again.  The last up-to-date leg is not failed (nothing could resync it): it is
// reported dead, and the array failed.  A linear array with a dead leg is failed.  detail,
// status, --json and the events all read these flags.
void Daemon::ProbeLegs(const std::shared_ptr<Array>& a) {
  const auto now = std::chrono::steady_clock::now();
  const std::uint64_t limit = std::uint64_t(a->cfg.leg_timeout_s) * 1000;
  std::vector<LegStatus> states;
  if (a->mirror) states = a->mirror->Legs();
  auto state_of = [&](std::size_t slot) {
    for (auto& st : states)
      if (st.slot == int(slot)) return st.state;
    return LegState::kEmpty;
  };
  for (std::size_t i = 0; i < a->legs.size(); ++i) {
    ArrayLeg& leg = a->legs[i];
    if (!leg.dev) continue;
    DeviceHealth h = leg.dev->Health();
    std::string link = leg.remote ? leg.remote->Stats().state : leg.nbd ? leg.nbd->Stats().state : "";
    if (h.reachable && !link.empty() && link != "connected") {
      h.reachable = false;
      if (h.detail.empty()) h.detail = link;
    }
    std::uint64_t outage = h.outage_ms;
    if (h.reachable) {
      leg.down_since = {};
    } else {
      if (leg.down_since == std::chrono::steady_clock::time_point{}) leg.down_since = now;
      auto ours = std::uint64_t(std::chrono::duration_cast<std::chrono::milliseconds>(
                                    now - leg.down_since).count());
      outage = std::max(outage, ours);
    }
    const bool dead = !h.reachable && outage >= limit;
    bool newly_dead;
    {
      std::lock_guard<std::mutex> l(mu_);
      newly_dead = dead && !leg.dead;
      leg.reachable = h.reachable;
      leg.outage_ms = h.reachable ? 0 : outage;
      leg.dead = dead;
      leg.health = h.detail;
    }
    if (newly_dead)
      Emit(json{{"type", "leg_unreachable"}, {"array", a->cfg.name}, {"slot", int(i)},
                {"spec", leg.spec}, {"outage_ms", outage}, {"detail", h.detail}});
    if (!dead || !a->mirror) {
      if (newly_dead)
        spdlog::error("array \"{}\": leg {} ({}) unreachable for {} ms (leg_timeout {} s){}",
                      a->cfg.name, i, leg.spec, outage, a->cfg.leg_timeout_s,
                      a->dev && !a->mirror ? ": the array is failed until it is back" : "");
      continue;
    }
    LegState ls = state_of(i);
    if (ls != LegState::kUpToDate && ls != LegState::kResyncing) continue;
    int others = 0;  // other up-to-date legs that are reachable
    for (std::size_t j = 0; j < a->legs.size(); ++j)
      if (j != i && state_of(j) == LegState::kUpToDate && a->legs[j].dev && !a->legs[j].dead &&
          a->legs[j].reachable)
        ++others;
    if (ls == LegState::kUpToDate && others == 0) {
      if (newly_dead)
        spdlog::error("array \"{}\": leg {} ({}) unreachable for {} ms, and it is the last "
                      "up-to-date leg: the array is failed until it is back", a->cfg.name, i,
                      leg.spec, outage);
      continue;
    }
    if (Status st = a->mirror->FailLeg(int(i), LegReason::kUnreachable,
                                       fmt::format("unreachable for {} ms", outage));
        st.ok())
      spdlog::error("array \"{}\": leg {} ({}) unreachable for {} ms (leg_timeout {} s): failed; "
                    "it is re-added when it is back", a->cfg.name, i, leg.spec, outage,
                    a->cfg.leg_timeout_s);
    else
      spdlog::warn("array \"{}\": failing unreachable leg {}: {}", a->cfg.name, i, Msg(st));
  }
}

// A grown linear's FUSE file: FuseMount::RefreshVolume shows the new size at once, also while
// the file is open (ArrayAddLeg does it too; this catches arrays grown below a stacked one).
void Daemon::RefreshGrownFiles() {
  std::shared_ptr<fuse::FuseMount> m;
  {
    std::lock_guard<std::mutex> l(mu_);
    m = mount_;
  }
  if (!m) return;
  for (const auto& f : m->ListVolumes()) {
    std::shared_ptr<Volume> vol;
    {
      std::lock_guard<std::mutex> l(mu_);
      auto it = volumes_.find(f.name);
      if (it == volumes_.end() || !it->second->is_array || !it->second->dev ||
          !it->second->in_mount || it->second->removing)
        continue;
      vol = it->second;
    }
    DeviceInfo info = vol->dev->Info();
    std::uint64_t lbs = std::max<std::uint32_t>(info.logical_block_size, 1);
    if (f.size == info.size / lbs * lbs) continue;
    if (RefreshFuseSize(*m, f.name)) {  // shown at once, also while open
      StatFuseFile(m->mountpoint(), f.name);
      spdlog::info("array \"{}\": {}/{}.img now shows {} bytes", f.name, m->mountpoint(), f.name,
                   info.size);
      continue;
    }
    if (f.open_count != 0) continue;
    if (!m->RemoveVolume(f.name).ok()) continue;  // opened meanwhile: next tick
    {
      std::lock_guard<std::mutex> l(mu_);
      vol->in_mount = false;
    }
    AddToMount(vol);
    spdlog::info("array \"{}\": {}/{}.img now shows {} bytes", f.name, m->mountpoint(), f.name,
                 info.size);
  }
}

// ---------------------------------------------------------------------------------------------
// JSON

json Daemon::ArrayJson(const std::shared_ptr<Array>& a) {
  ArrayConfig cfg;
  std::vector<std::string> specs, errors;
  std::vector<bool> present;
  std::shared_ptr<MirrorDevice> mirror;
  std::shared_ptr<LinearDevice> linear;
  std::shared_ptr<BlockDevice> dev;
  std::string error, id;
  std::vector<std::string> links;
  std::vector<json> health;  // per slot: reachable, outage, counters
  std::vector<bool> dead;
  {
    std::lock_guard<std::mutex> l(mu_);
    cfg = a->cfg;
    for (auto& leg : a->legs) {
      specs.push_back(leg.spec);
      present.push_back(leg.dev != nullptr);
      errors.push_back(leg.error);
      links.push_back(leg.remote ? "remote" : leg.nbd ? "nbd" : "");
      dead.push_back(leg.dev && leg.dead);
      json hj{{"reachable", !leg.dev || leg.reachable}, {"outage_ms", leg.outage_ms},
              {"unreachable", leg.dev && leg.dead}};
      if (!leg.health.empty()) hj["health"] = leg.health;
      if (leg.counter) {
        DeviceCounters c = leg.counter->Counters();
        hj["io"] = {{"reads", c.reads},           {"writes", c.writes},
                    {"bytes_read", c.bytes_read}, {"bytes_written", c.bytes_written},
                    {"errors", c.errors},         {"other", c.other}};
      }
      // The leg's connection: reconnects, requests failed by io_timeout, batching.
      auto link = [&hj](const net::ClientStats& cs) {
        hj["link"] = {{"state", cs.state},         {"reconnects", cs.reconnects},
                      {"timeouts", cs.timeouts},   {"resent", cs.resent},
                      {"frames_sent", cs.frames_sent}, {"send_calls", cs.send_calls}};
      };
      if (leg.remote) {  // DST payload digests on this leg's connection (docs/protocol.md §4.1)
        net::RemoteStats rs = leg.remote->Stats();
        hj["checksum"] = rs.checksum ? "xxh3" : "none";
        hj["digest_errors"] = rs.digest_errors;
        link(rs);
      } else if (leg.nbd) {
        link(leg.nbd->Stats());
      }
      health.push_back(std::move(hj));
    }
    mirror = a->mirror;
    linear = a->linear;
    dev = a->dev;
    error = a->error;
    id = a->id;
  }
  // region_size, write_intent and resync_rate: the mirror's keys, kept as top-level fields for
  // control-protocol compatibility (docs/control.md); "layer" carries every key.
  const MirrorKeys mk = MirrorKeysFrom(cfg.params);
  json j{{"name", cfg.name},
         {"level", cfg.level},
         {"id", id},
         {"size", dev ? dev->Info().size : 0},
         {"region_size", mk.region_size},
         {"write_intent", mk.write_intent},
         {"resync_rate", {{"min", mk.resync_rate_min}, {"max", mk.resync_rate_max}}},
         {"layer", LayerJson(cfg)},
         {"error", error.empty() ? json() : json(error)}};
  const LayerInfo* layer = FindLayer(cfg.level);
  const bool redundant = layer && layer->redundant;
  json legs = json::array();
  int up = 0, n = 0, resyncing = 0;
  bool split_brain = false;
  json resync = nullptr;
  json progress = json::array();
  json stats = json::object();
  if (mirror) {
    std::vector<LegStatus> ls = mirror->Legs();
    for (auto& s : ls) {
      if (s.state == LegState::kEmpty) continue;
      ++n;
      const bool is_dead = std::size_t(s.slot) < dead.size() && dead[std::size_t(s.slot)];
      if (s.state == LegState::kUpToDate && !is_dead) ++up;
      if (s.state == LegState::kResyncing) ++resyncing;
      std::size_t i = std::size_t(s.slot);
      json lj{{"slot", s.slot},
              {"spec", i < specs.size() ? specs[i] : s.describe},
              {"state", LegStateName(s.state)},
              {"generation", s.generation},
              {"out_of_sync_bytes", s.out_of_sync_bytes},
              {"pending", s.pending},
              {"present", i < present.size() && present[i]},
              {"device", s.describe}};
      if (i < errors.size() && !errors[i].empty() && s.state != LegState::kUpToDate)
        lj["error"] = errors[i];
      if (i < health.size()) lj.update(health[i]);
      if (is_dead && s.state == LegState::kUpToDate)
        lj["error"] = fmt::format("unreachable for {} ms (the last up-to-date leg: I/O fails "
                                  "until it is back)", health[i].value("outage_ms", std::uint64_t{0}));
      // Identity: why it is out of service, its generations, the claim on its header.
      lj["reason"] = LegReasonName(s.reason);
      if (s.reason != LegReason::kNone) lj["reason_text"] = s.reason_text;
      lj["history"] = s.history;
      if (!s.identity_event.empty()) {
        lj["identity_event"] = s.identity_event;
        lj["identity_events"] = s.identity_events;
      }
      lj["owner"] = s.owner_id.empty()
                        ? json()
                        : json{{"id", s.owner_id}, {"name", s.owner_name},
                               {"lease_expiry", double(s.lease_expiry_ms) / 1000.0}};
      if (s.reason == LegReason::kDiverged) split_brain = true;
      legs.push_back(std::move(lj));
    }
    for (auto& p : mirror->Progress()) {
      json pj{{"leg", p.leg},
              {"state", ResyncStateName(p.state)},
              {"leg_state", LegStateName(p.leg_state)},
              {"bytes_done", p.bytes_done},
              {"bytes_total", p.bytes_total},
              {"percent", p.Percent()},
              {"rate", p.rate_bytes_per_s},
              {"eta_seconds", p.eta_seconds},
              {"bytes_resynced_total", p.bytes_resynced_total}};
      bool active = p.state == ResyncState::kRunning || p.state == ResyncState::kPending ||
                    p.state == ResyncState::kPaused;
      if (active && (resync.is_null() || (resync["state"] != "running" && p.state == ResyncState::kRunning)))
        resync = pj;
      progress.push_back(std::move(pj));
    }
    MirrorStats ms = mirror->Stats();
    stats = {{"writes", ms.writes},
             {"reads", ms.reads},
             {"flushes", ms.flushes},
             {"read_retries", ms.read_retries},
             {"intent_waits", ms.intent_waits},
             {"commits", ms.commits},
             {"commit_failures", ms.commit_failures},
             {"commits_per_second", ms.commits_per_second},
             {"regions_committed", ms.regions_committed},
             {"regions_cleared", ms.regions_cleared},
             {"intent_regions", ms.intent_regions},
             {"pool_waits", ms.pool_waits},
             {"store_commits", store_ ? store_->commits() : 0}};
  } else {
    std::vector<LinearDevice::Extent> table;
    if (linear) table = linear->Table();
    for (std::size_t i = 0; i < specs.size(); ++i) {
      if (specs[i].empty()) continue;
      ++n;
      // A dead leg (unreachable for leg_timeout) fails the I/O that reaches it: the array too.
      bool ok = dev && present[i] && (!linear || i < table.size()) && !dead[i];
      json lj{{"slot", int(i)},
              {"spec", specs[i]},
              {"state", ok ? "up-to-date" : dead[i] ? "failed" : present[i] ? "ready" : "missing"},
              {"generation", ""},
              {"out_of_sync_bytes", 0},
              {"present", present[i]}};
      if (ok) ++up;
      if (linear && i < table.size()) {
        lj["start"] = table[i].start;
        lj["length"] = table[i].len;
      }
      if (!errors[i].empty() && !ok) lj["error"] = errors[i];
      lj.update(health[i]);
      if (dead[i])
        lj["error"] = fmt::format("unreachable for {} ms: I/O to its extent fails",
                                  health[i].value("outage_ms", std::uint64_t{0}));
      legs.push_back(std::move(lj));
    }
  }
  if (!mirror) {
    // Legs of a mirror that is not assembled yet: show what we know.
    if (redundant) {
      for (std::size_t i = 0; i < specs.size(); ++i) {
        if (specs[i].empty()) continue;
        ++n;
        json lj{{"slot", int(i)}, {"spec", specs[i]}, {"state", present[i] ? "ready" : "missing"},
                {"generation", ""}, {"out_of_sync_bytes", 0}, {"present", present[i]}};
        if (!errors[i].empty()) lj["error"] = errors[i];
        legs.push_back(std::move(lj));
      }
    }
  }
  std::string state;
  if (!dev || up == 0) state = "failed";
  else if (!redundant) state = up == n ? "clean" : "failed";
  else if (split_brain) state = "split-brain";  // never healthy until `array resolve`
  else if (resyncing > 0 && !resync.is_null()) state = "resyncing";
  else if (up < n) state = "degraded";
  else state = "clean";
  j["state"] = state;
  j["split_brain"] = split_brain;
  j["host"] = json{{"id", host_id_}, {"name", host_name_}};
  j["assembled"] = dev != nullptr;
  j["bytes_resynced_total"] = SampleResync(a);  // all passes since this dstd started
  j["legs"] = std::move(legs);
  j["raid_devices"] = n;
  j["active_devices"] = up;
  j["resync"] = std::move(resync);
  j["resync_paused"] = mirror && mirror->resync_paused();  // runtime only (array.pause_resync)
  j["progress"] = std::move(progress);
  j["stats"] = std::move(stats);
  json exported = json::array();
  std::shared_ptr<fuse::FuseMount> m;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [en, e] : exports_)
      if (e.array == cfg.name) exported.push_back(en);
    m = mount_;
  }
  j["exports"] = std::move(exported);
  j["file"] = nullptr;
  j["loop_devices"] = json::array();
  if (m && dev) {
    for (auto& f : m->ListVolumes())
      if (f.name == cfg.name) {
        j["file"] = m->mountpoint() + "/" + cfg.name + ".img";
        j["open_count"] = f.open_count;
        j["loop_devices"] = LoopDevicesJson(j["file"].get<std::string>());
      }
  }
  AddVerifyJson(cfg, mirror, &j);
  j["state_db"] = opts_.state_dir + "/dstd.sqlite";
  return j;
}

json Daemon::ArraysJson() {
  std::vector<std::shared_ptr<Array>> all;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [n, a] : arrays_) all.push_back(a);
  }
  json arr = json::array();
  for (auto& a : all) arr.push_back(ArrayJson(a));
  return arr;
}

// ---------------------------------------------------------------------------------------------
// RPCs

void Daemon::ArrayRpc(const std::string& m, const json& p, Finish finish) {
  std::string name;
  if (m == "array.list") return finish(json{{"arrays", ArraysJson()}});
  if (m == "array.layers") return finish(LayersJson());
  if (Status st = ParamString(p, "name", true, &name); !st.ok()) return finish(st);
  if (m == "array.detail") {
    auto a = FindArray(name);
    if (!a) return finish(Status::NotFound(fmt::format("no array \"{}\"", name)));
    return finish(ArrayJson(a));
  }
  auto reply_array = [this, name, finish](Status st) {
    if (!st.ok()) return finish(st);
    auto a = FindArray(name);
    finish(a ? ArrayJson(a) : json::object());
  };
  if (m == "array.resolve") {
    auto k = p.find("keep");
    if (k == p.end() || !k->is_number_integer() || k->get<std::int64_t>() < 0 ||
        k->get<std::int64_t>() >= MirrorDevice::kMaxLegs)
      return finish(Status::InvalidArgument("parameter \"keep\" must be the leg slot to keep"));
    int keep = int(k->get<std::int64_t>());
    bool dry = p.contains("dry_run") && p["dry_run"].is_boolean() && p["dry_run"].get<bool>();
    return workers_.Post([this, name, keep, dry, finish] { finish(ArrayResolve(name, keep, dry)); });
  }
  if (m == "array.import") {
    auto legs = p.find("legs");
    if (legs == p.end() || !legs->is_array() || legs->empty())
      return finish(Status::InvalidArgument("parameter \"legs\" must be an array of leg specs"));
    std::vector<std::string> specs;
    for (auto& l : *legs) {
      if (!l.is_string()) return finish(Status::InvalidArgument("legs must be strings"));
      specs.push_back(l.get<std::string>());
    }
    return workers_.Post([this, name, specs, reply_array] { reply_array(ArrayImport(name, specs)); });
  }
  if (m == "array.release") {
    return workers_.Post([this, name, finish] {
      Status st = ArrayRelease(name);
      if (!st.ok()) return finish(st);
      finish(json{{"released", name}});
    });
  }
  finish(Status::NotSupported(fmt::format("method \"{}\" is not implemented", m)));
}

// ---------------------------------------------------------------------------------------------
// Online verify (issue 9 item 9).  MirrorDevice compares the legs on its resync thread; here:
// the array.verify RPC (start / cancel; returns at once), the "verify" member of array JSON
// (live run, else the last result persisted in dstd_verify), periodic verifies
// (verify_interval; monitor thread) and the verify_progress / verify_done events (events
// thread, progress at most once a second).

namespace {

json VerifyProgressJson(const VerifyProgress& v) {
  json mism = json::array();
  for (auto& mm : v.mismatches) {
    json legs = json::array();
    for (int s = 0; s < MirrorDevice::kMaxLegs; ++s)
      if (mm.legs & (1u << s)) legs.push_back(s);
    mism.push_back(json{{"offset", mm.offset}, {"legs", std::move(legs)}});
  }
  json compared = json::array();
  for (int s = 0; s < MirrorDevice::kMaxLegs; ++s)
    if (v.legs_compared & (1u << s)) compared.push_back(s);
  return json{{"run", v.run},
              {"state", VerifyStateName(v.state)},
              {"repair", v.repair},
              {"waiting_resync", v.waiting_resync},
              {"source_leg", v.source_leg},
              {"legs_compared", std::move(compared)},
              {"region_size", v.region_size},
              {"bytes_done", v.bytes_done},
              {"bytes_total", v.bytes_total},
              {"percent", v.Percent()},
              {"rate", v.rate_bytes_per_s},
              {"eta_seconds", v.eta_seconds},
              {"mismatch_regions", v.mismatch_regions},
              {"mismatch_bytes", v.mismatch_bytes},
              {"repaired_regions", v.repaired_regions},
              {"read_errors", v.read_errors},
              {"mismatches", std::move(mism)},
              {"mismatches_max_listed", VerifyProgress::kMaxListed},
              {"started", double(v.started_unix_ms) / 1000.0},
              {"finished", v.finished_unix_ms ? json(double(v.finished_unix_ms) / 1000.0) : json()},
              {"error", v.error.empty() ? json() : json(v.error)}};
}

bool VerifyRunning(const json& v) { return v.is_object() && v.value("state", "") == "running"; }

}  // namespace

void Daemon::OpenVerifyStore(const std::string& db) {
  verify_epoch_ = NowTs();
  auto vs = VerifyResultStore::Open(db);
  if (!vs.ok()) {
    spdlog::warn("verify results are kept in memory only: {}", Msg(vs.status()));
    return;
  }
  verify_store_ = std::shared_ptr<VerifyResultStore>(std::move(vs.value()));
  auto all = verify_store_->List();
  std::lock_guard<std::mutex> l(verify_mu_);
  if (all.ok()) verify_last_ = std::move(all.value());
}

std::uint64_t Daemon::VerifyInterval(const ArrayConfig& cfg) const {
  const LayerInfo* layer = FindLayer(cfg.level);
  if (!layer || !layer->redundant) return 0;
  return cfg.verify_interval_s >= 0 ? std::uint64_t(cfg.verify_interval_s) : cfg_.verify_interval_s;
}

void Daemon::AddVerifyJson(const ArrayConfig& cfg, const std::shared_ptr<MirrorDevice>& m,
                           json* j) {
  json v;
  VerifyProgress p;
  if (m) p = m->VerifyStatus();
  std::lock_guard<std::mutex> l(verify_mu_);
  if (p.run > 0) {
    v = VerifyProgressJson(p);
    auto t = verify_trigger_.find(cfg.name);
    v["trigger"] = t == verify_trigger_.end() ? "operator" : t->second;
  } else if (auto it = verify_last_.find(cfg.name); it != verify_last_.end()) {
    v = it->second;  // from before this assembly (persisted)
  }
  std::uint64_t every = VerifyInterval(cfg);
  json sched{{"interval", every}, {"next", nullptr}};
  if (every) {
    // From the end of the last verify (or dstd's start); one that did not complete (cancelled,
    // interrupted by a shutdown, failed) is retried after an hour at most.
    bool has = v.is_object() && v["finished"].is_number();
    double last = has ? v["finished"].get<double>() : verify_epoch_;
    double wait = double(every);
    if (has && v.value("state", "") != "done") wait = std::min(wait, 3600.0);
    sched["next"] = VerifyRunning(v) ? json() : json(last + wait);
  }
  (*j)["verify"] = std::move(v);
  (*j)["verify_schedule"] = std::move(sched);
}

Result<json> Daemon::Verify(const std::string& name, bool repair, bool cancel) {
  auto a = FindArray(name);
  if (!a) return Status::NotFound(fmt::format("no array \"{}\"", name));
  std::shared_ptr<MirrorDevice> m;
  ArrayConfig cfg;
  bool assembled = false;
  std::string why;
  {
    std::lock_guard<std::mutex> l(mu_);
    m = a->mirror;
    cfg = a->cfg;
    assembled = a->dev != nullptr;
    why = a->error;
  }
  if (!m && assembled)
    return Status::InvalidArgument(fmt::format(
        "array \"{}\" is {}: verify compares the legs of a mirror", name, cfg.level));
  if (!m) return Status::Unavailable(fmt::format("array \"{}\" is not assembled: {}", name, why));
  Status st;
  if (cancel) {
    st = m->CancelVerify();
    if (st.IsNotFound()) st = Status::NotFound(fmt::format("no verify is running on array \"{}\"", name));
  } else {
    VerifyOptions vo;
    vo.repair = repair;
    vo.on_done = [this, name](const VerifyProgress& p) { VerifyFinished(name, "operator", p); };
    st = m->StartVerify(vo);
    if (st.ok()) {
      std::lock_guard<std::mutex> l(verify_mu_);
      verify_trigger_[name] = "operator";
    }
  }
  if (!st.ok()) return st.WithContext(fmt::format("array \"{}\"", name));
  spdlog::info("array \"{}\": verify {}{}", name, cancel ? "cancel requested" : "started",
               repair ? " (repair)" : "");
  json j{{"name", name}};
  AddVerifyJson(cfg, m, &j);
  return j;
}

// Monitor thread, once a second: start the verifies that are due.  A refused start (a resync
// runs, a leg is missing) is retried on the next tick, without log noise.
void Daemon::VerifyTick() {
  std::vector<std::shared_ptr<Array>> all;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [n, a] : arrays_) all.push_back(a);
  }
  for (auto& a : all) {
    std::shared_ptr<MirrorDevice> m;
    ArrayConfig cfg;
    {
      std::lock_guard<std::mutex> l(mu_);
      m = a->mirror;
      cfg = a->cfg;
    }
    if (!m || VerifyInterval(cfg) == 0 || stopping_) continue;
    json j;
    AddVerifyJson(cfg, m, &j);
    const json& next = j["verify_schedule"]["next"];
    if (!next.is_number() || NowTs() < next.get<double>()) continue;
    VerifyOptions vo;
    vo.on_done = [this, n = cfg.name](const VerifyProgress& p) { VerifyFinished(n, "schedule", p); };
    Status st = m->StartVerify(vo);
    if (!st.ok()) {
      spdlog::debug("array \"{}\": periodic verify not started: {}", cfg.name, Msg(st));
      continue;
    }
    {
      std::lock_guard<std::mutex> l(verify_mu_);
      verify_trigger_[cfg.name] = "schedule";
    }
    spdlog::info("array \"{}\": periodic verify started (every {}s)", cfg.name, VerifyInterval(cfg));
  }
}

// Events thread, every tick, per array JSON: verify_progress while a verify runs, at most 4 a
// second (verify_done comes from VerifyFinished).
void Daemon::VerifyEvents(const json& a) {
  const std::string name = a.value("name", "");
  auto it = a.find("verify");
  if (it == a.end() || !it->is_object() || !it->contains("run")) return;
  const json& v = *it;
  json& seen = verify_seen_[name];
  const bool same_run = !seen.is_null() && seen["run"] == v["run"];
  if (VerifyRunning(v)) {
    double now = NowTs();
    if (!same_run) progress_gate_.Forget("verify:" + name);  // a new run reports at once
    if (progress_gate_.Allow("verify:" + name, now)) {
      Emit(json{{"type", "verify_progress"}, {"array", name}, {"run", v["run"]},
                {"repair", v["repair"]}, {"bytes_done", v["bytes_done"]},
                {"bytes_total", v["bytes_total"]}, {"percent", v["percent"]}, {"rate", v["rate"]},
                {"eta_seconds", v["eta_seconds"]}, {"mismatch_regions", v["mismatch_regions"]},
                {"waiting_resync", v["waiting_resync"]}});
      seen = json{{"run", v["run"]}, {"state", "running"}, {"emitted", now}};
    }
    return;
  }
  seen = json{{"run", v["run"]}, {"state", v["state"]}};
}

// A verify ended (MirrorDevice's on_done: its resync thread, or the thread closing it): one
// verify_done event, the result persisted as the array's last verify, a log line.
void Daemon::VerifyFinished(const std::string& name, const std::string& trigger,
                            const VerifyProgress& p) {
  json v = VerifyProgressJson(p);
  v["trigger"] = trigger;
  json done{{"type", "verify_done"}, {"array", name}};
  for (const char* k : {"run", "state", "repair", "trigger", "mismatch_regions", "mismatch_bytes",
                        "repaired_regions", "read_errors", "bytes_done", "bytes_total",
                        "mismatches", "error", "started", "finished"})
    done[k] = v[k];
  Emit(done);
  v["persisted"] = true;
  {
    std::lock_guard<std::mutex> l(verify_mu_);
    verify_last_[name] = v;
  }
  if (verify_store_) {
    if (Status s = verify_store_->Put(name, v); !s.ok())
      spdlog::warn("array \"{}\": cannot record the verify result: {}", name, Msg(s));
  }
  if (p.mismatch_regions > 0)
    spdlog::warn("array \"{}\": verify {}: {} mismatching region{}{}", name,
                 VerifyStateName(p.state), p.mismatch_regions, p.mismatch_regions == 1 ? "" : "s",
                 p.repair ? " (marked out of sync; the resync repairs them)" : "");
  else
    spdlog::info("array \"{}\": verify {}: legs identical{}", name, VerifyStateName(p.state),
                 p.error.empty() ? "" : " so far (" + p.error + ")");
}

// ---------------------------------------------------------------------------------------------
// apply: reconcile live exports/volumes/arrays with a config file.

Status Daemon::PlanApply(const Config& want, bool prune, std::vector<std::string>* kept,
                         PlanContext* ctx, std::vector<std::unique_ptr<Operation>>* ops) {
  std::map<std::string, ExportConfig> live_exports;
  std::map<std::string, VolumeConfig> live_volumes;
  std::map<std::string, ArrayConfig> live_arrays;
  {
    std::lock_guard<std::mutex> l(mu_);
    live_exports = exports_;
    for (auto& [n, v] : volumes_)
      if (!v->is_array) live_volumes[n] = v->cfg;
    for (auto& [n, a] : arrays_) live_arrays[n] = a->cfg;
  }
  using Ops = std::vector<std::unique_ptr<Operation>>;
  Ops remove_exports, array_changes, remove_arrays, remove_volumes, add_volumes, add_arrays,
      add_exports;
  auto removal = [&](Ops& to, const std::string& kind, const std::string& n) {
    ctx->gone.insert(kind + ":" + n);
    if (kind == "export") to.push_back(MakeOperation(*this, ctl::ExportRemoveOp{n}));
    else if (kind == "volume") to.push_back(MakeOperation(*this, ctl::VolumeRemoveOp{n}));
    else to.push_back(MakeOperation(*this, ctl::ArrayRemoveOp{n}));
  };
  auto same_export = [](const ExportConfig& a, const ExportConfig& b) {
    return a.path == b.path && a.array == b.array && a.volume == b.volume &&
           a.read_only == b.read_only && a.direct_io == b.direct_io;
  };
  auto same_volume = [](const VolumeConfig& a, const VolumeConfig& b) {
    return a.remote == b.remote && a.path == b.path && a.queue_depth == b.queue_depth &&
           a.io_timeout_s == b.io_timeout_s && a.keepalive_timeout_s == b.keepalive_timeout_s;
  };
  std::set<std::string> want_exports, want_volumes, want_arrays;
  // Exports.
  for (auto& e : want.exports) {
    want_exports.insert(e.name);
    auto it = live_exports.find(e.name);
    if (it != live_exports.end() && same_export(it->second, e)) {
      if (it->second.allow != e.allow)  // only the access list differs: changed in place
        add_exports.push_back(MakeOperation(*this, ctl::ExportAllowOp{e.name, net::FormatAccessList(e.allow)}));
      continue;
    }
    if (it != live_exports.end()) removal(remove_exports, "export", e.name);
    add_exports.push_back(MakeAddExport(*this, e));
  }
  for (auto& [n, e] : live_exports)
    if (!want_exports.count(n)) {
      if (prune) removal(remove_exports, "export", n);
      else kept->push_back("export " + n);
    }
  // Volumes.
  for (auto& v : want.volumes) {
    want_volumes.insert(v.name);
    auto it = live_volumes.find(v.name);
    if (it != live_volumes.end() && same_volume(it->second, v)) continue;
    if (it != live_volumes.end()) removal(remove_volumes, "volume", v.name);
    ctx->created.insert("volume:" + v.name);
    add_volumes.push_back(MakeImportVolume(*this, v));
  }
  for (auto& [n, v] : live_volumes)
    if (!want_volumes.count(n)) {
      if (prune) removal(remove_volumes, "volume", n);
      else kept->push_back("volume " + n);
    }
  // Arrays: new ones in dependency order.
  std::vector<const ArrayConfig*> order;
  {
    std::set<std::string> placed;
    for (std::size_t round = 0; round <= want.arrays.size(); ++round)
      for (auto& a : want.arrays) {
        if (placed.count(a.name)) continue;
        bool ready = true;
        for (auto& l : a.legs)
          if (l.rfind("array:", 0) == 0 && !placed.count(l.substr(6))) ready = false;
        if (!ready && round < want.arrays.size()) continue;
        placed.insert(a.name);
        order.push_back(&a);
      }
  }
  for (const ArrayConfig* ap : order) {
    const ArrayConfig& a = *ap;
    want_arrays.insert(a.name);
    auto it = live_arrays.find(a.name);
    if (it == live_arrays.end()) {
      if (live_volumes.count(a.name) && want_volumes.count(a.name))
        return Status::InvalidArgument(fmt::format("\"{}\" is a volume; cannot create an array with that name", a.name));
      ctx->created.insert("array:" + a.name);
      add_arrays.push_back(MakeCreateArray(*this, a));
      continue;
    }
    const ArrayConfig& cur = it->second;
    if (cur.level != a.level)
      return Status::InvalidArgument(fmt::format(
          "array \"{}\": level {} -> {} cannot change live (remove and re-create it)", a.name,
          cur.level, a.level));
    const LayerInfo* layer = FindLayer(a.level);
    if (layer) {
      const LayerParams was = StructuralParams(*layer, cur.params);
      const LayerParams want = StructuralParams(*layer, a.params);
      for (const LayerKey& k : layer->keys)
        if (was.count(k.name) && want.count(k.name) && was.at(k.name) != want.at(k.name))
          return Status::InvalidArgument(fmt::format(
              "array \"{}\": {} cannot change live ({} -> {}; remove and re-create it)", a.name,
              k.name, was.at(k.name), want.at(k.name)));
    }
    std::vector<std::string> have = LiveLegs(cur);
    const LegChange change = layer ? layer->legs.change : LegChange::kFixed;
    if (change == LegChange::kFixed) {
      if (have != a.legs)
        return Status::InvalidArgument(fmt::format(
            "array \"{}\": the legs of a {} cannot change live (live: {}; file: {})", a.name,
            a.level, fmt::join(have, " "), fmt::join(a.legs, " ")));
    } else if (change == LegChange::kAppend) {
      bool prefix = have.size() <= a.legs.size() &&
                    std::equal(have.begin(), have.end(), a.legs.begin());
      if (!prefix)
        return Status::InvalidArgument(fmt::format(
            "array \"{}\": a linear can only grow by appending legs (live: {}; file: {})", a.name,
            fmt::join(have, " "), fmt::join(a.legs, " ")));
      for (std::size_t i = have.size(); i < a.legs.size(); ++i)
        array_changes.push_back(MakeOperation(*this, ctl::LegAddOp{a.name, a.legs[i], true}));
    } else {
      for (auto& l : a.legs)
        if (std::find(have.begin(), have.end(), l) == have.end())
          array_changes.push_back(MakeOperation(*this, ctl::LegAddOp{a.name, l, false}));
      for (std::size_t s = 0; s < cur.legs.size(); ++s)
        if (!cur.legs[s].empty() &&
            std::find(a.legs.begin(), a.legs.end(), cur.legs[s]) == a.legs.end()) {
          // remove-leg needs the leg out of service first: the retire fails it.
          array_changes.push_back(MakeRetireLeg(*this, a.name, int(s)));
          ctx->legs_gone[a.name].insert(int(s));
        }
    }
    const MirrorKeys cur_k = MirrorKeysFrom(cur.params), want_k = MirrorKeysFrom(a.params);
    if (layer && layer->redundant && (cur_k.resync_rate_min != want_k.resync_rate_min ||
                                      cur_k.resync_rate_max != want_k.resync_rate_max))
      array_changes.push_back(MakeOperation(
          *this, ctl::SetResyncRateOp{a.name, std::to_string(want_k.resync_rate_min),
                                      std::to_string(want_k.resync_rate_max)}));
  }
  // Live arrays not in the file: outer ones first.
  std::vector<std::string> gone;
  for (auto& [n, c] : live_arrays)
    if (!want_arrays.count(n)) {
      if (prune) gone.push_back(n);
      else kept->push_back("array " + n);
    }
  for (std::size_t round = 0; round <= gone.size(); ++round)
    for (auto& n : gone) {
      if (n.empty()) continue;
      bool used = false;
      for (auto& o : gone)
        if (!o.empty() && o != n)
          for (auto& l : live_arrays[o].legs)
            if (l == "array:" + n) used = true;
      if (used && round < gone.size()) continue;
      removal(remove_arrays, "array", n);
      n.clear();
    }
  for (auto* part : {&remove_exports, &array_changes, &remove_arrays, &remove_volumes,
                     &add_volumes, &add_arrays, &add_exports})
    for (auto& op : *part) ops->push_back(std::move(op));
  return Status::OK();
}

}  // namespace dst::daemon
