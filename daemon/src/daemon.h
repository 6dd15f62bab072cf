// Daemon: dstd's object graph.  One io_context ([daemon] io_threads, default 1) runs the Exporter, every
// RemoteDevice and the control server; a small worker pool runs what blocks (connects, file
// opens, FUSE mount/unmount, flushes) so no control request ever stalls an io thread.
//
// Lifecycle (main thread):
//   Start(): state-dir lock -> io threads -> exporter bind -> config exports -> config volumes
//            (one connect attempt each; failures retry in the background) -> FUSE mount ->
//            control socket.
//   Shutdown() after SIGTERM/SIGINT: control server stops -> workers finish -> Exporter::Drain
//            (in-flight requests answered, exports flushed) -> volumes flushed -> FUSE
//            unmounted -> remote devices closed -> io threads joined.
//
// Volume states: connecting (first connect pending or retrying) -> connected / reconnecting /
// failing (RemoteDevice) ; local volumes are "ready".  `removing` while volume.remove runs.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <nlohmann/json.hpp>

#include "control_server.h"
#include "events.h"
#include "dst/block_device.h"
#include "dst/counting_device.h"
#include "dst/daemon/config.h"
#include "dst/fuse/fuse_mount.h"
#include "dst/net/eth_transport.h"
#include "dst/net/exporter.h"
#include "dst/linear_device.h"
#include "dst/mirror_device.h"
#include "dst/net/nbd_client_device.h"
#include "dst/net/remote_device.h"
#include "metrics_server.h"
#include "nbd_frontend.h"
#include "operations.h"
#include "topology.h"

namespace dst::net {
class TlsContext;  // net/tls.h
}

namespace dst::daemon {

class VerifyResultStore;  // verify_store.h

struct DaemonOptions {
  std::string config_path;
  std::string state_dir = "/var/lib/dst";
  std::string control_path = "/run/dst/dstd.sock";
  bool verbose = false;
};

// dstd's version (the project version), for hello and status.
const char* DaemonVersion();

// The control protocol's error code ("busy", "not_found", ...) for a Status.
const char* ControlErrorCode(const Status& s);

// A fixed set of threads for blocking control-plane work.
class WorkQueue {
 public:
  explicit WorkQueue(int threads);
  ~WorkQueue();
  void Post(std::function<void()> fn);
  void Stop();  // runs what is queued, then joins

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> q_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

// The servers' caps from [limits] (the NBD server's idle cap is its own key).
net::ServerLimits ServerLimitsOf(const LimitsConfig& l, bool nbd);

class Daemon {
 public:
  Daemon(Config cfg, DaemonOptions opts);
  ~Daemon();

  // Returns 0, or a sysexits code after logging one line saying why.
  int Start();
  void Shutdown();
  // True when the io_context ran a posted no-op within `timeout`: the event loop is not hung
  // (the systemd watchdog pings only then, main.cc).
  bool LoopAlive(std::chrono::milliseconds timeout);

 private:
  struct Volume {
    VolumeConfig cfg;
    std::string state = "connecting";
    std::string error;  // last connect error while connecting
    std::shared_ptr<BlockDevice> dev;
    std::shared_ptr<net::RemoteDevice> remote;
    std::shared_ptr<net::NbdClientDevice> nbd;  // an nbd:// volume
    bool in_mount = false;
    bool removing = false;
    bool removed = false;
    int attempts = 0;
    bool is_array = false;  // the device of an array (arrays.cc owns it)
    // dev == counter once open: every consumer (FUSE file, exports, array legs) goes through
    // it, so the volume's traffic and latency (the metrics endpoint) count them all.
    std::shared_ptr<CountingDevice> counter;
  };

  // Arrays (arrays.cc).  An array is also a Volume (same name, is_array) so it gets a FUSE file
  // and can be exported; its legs are devices opened from leg specs.
  struct ArrayLeg {
    std::string spec;                          // "" = empty slot
    std::shared_ptr<BlockDevice> dev;          // nullptr: missing (not reachable yet)
    std::shared_ptr<net::RemoteDevice> remote; // dst:// legs (owned) or a volume leg's remote
    std::shared_ptr<net::NbdClientDevice> nbd; // nbd:// legs (owned)
    bool owned = false;                        // we opened it (close it with the array)
    bool manual = false;                       // operator failed/detached: no automatic re-add
    std::string error;
    std::chrono::steady_clock::time_point next_try{};
    int backoff_s = 1;
    // Truthful health (ProbeLegs, once a second; GUARDED_BY(mu_) for readers).
    std::shared_ptr<CountingDevice> counter;  // dev == counter: per-leg traffic
    bool reachable = true;
    std::uint64_t outage_ms = 0;
    bool dead = false;  // unreachable for leg_timeout: I/O to it fails
    std::string health;  // the device's own words ("reconnecting: connection refused")
    std::chrono::steady_clock::time_point down_since{};
  };
  struct Array {
    ArrayConfig cfg;  // legs by slot ("" = empty slot)
    std::string id;
    bool created = false;  // recorded in the topology table (Assemble, not Create)
    bool assume_clean = false;
    bool force_create = false;  // create over legs carrying another array's header
    bool releasing = false;     // array release: keep the store record for a later import
    bool takeover = false;      // array import: assemble with new generations
    std::vector<ArrayLeg> legs;  // GUARDED_BY(mu_) for the vector shape; op_mu for changes
    std::shared_ptr<MirrorDevice> mirror;
    std::shared_ptr<LinearDevice> linear;
    std::shared_ptr<BlockDevice> dev;
    std::string error;  // why it is not assembled
    bool removing = false;
    bool removed = false;
    std::mutex op_mu;  // serialises management operations (blocking) on this array
    // Resync accounting across passes: the engine restarts a leg's bytes_resynced_total with
    // every pass it starts (re-add, add); these keep the array's running total since start.
    std::mutex acc_mu;
    std::map<int, std::uint64_t> resync_base, resync_last;  // GUARDED_BY(acc_mu)
    // Slots between BankResync and the end of the engine call: the old pass's counter may
    // still show until the engine restarts it, so samples skip them.
    std::set<int> banking;  // GUARDED_BY(acc_mu)
  };
  using Reply = ControlServer::ReplyFn;
  using Finish = std::function<void(Result<nlohmann::json>)>;  // any thread, exactly once

  void Handle(control::Request req, Reply reply);
  nlohmann::json StatusJson();
  // StatusJson() plus, per export, volume, array and leg, a "metrics" member (I/O counts,
  // in-flight, latency histograms) for the metrics endpoint only; not part of the control
  // protocol.
  nlohmann::json MetricsJson();
  nlohmann::json HelloJson();  // hello.cc
  nlohmann::json ExportsJson();
  nlohmann::json VolumesJson();
  nlohmann::json VolumeJson(const std::string& name, const Volume& v);

  void UnmountRpc(Finish finish);
  void LoopRpc(const std::string& m, const nlohmann::json& p, Finish finish);  // loop.attach / detach
  void DiscoverRpc(const nlohmann::json& p, Finish finish);  // eth.discover
  std::string DiscoveryListing(const std::string& identity);  // what a DISCOVER from `identity` sees

  // Typed operations (operations.h, operations.cc).  Every change the control protocol makes is
  // an Operation (Validate, Plan, Apply); the single-object RPCs and `apply` both go through
  // OperationImpl<Request>, whose steps call the engine methods below (blocking; worker threads).
  template <typename Req>
  friend class OperationImpl;
  void OperationRpc(const control::Request& req, Reply reply);
  Status AddExport(const ExportConfig& e);  // reserves the name, opens, records
  Status RemoveExport(const std::string& name);
  // Replaces an export's access list over DST and NBD and records it.
  Status SetExportAccess(const std::string& name, const net::AccessList& allow);
  Status ImportVolume(const VolumeConfig& c);
  Status RemoveVolume(const std::string& name);
  Status Mount(const std::string& dir);
  Result<nlohmann::json> Verify(const std::string& name, bool repair, bool cancel);
  nlohmann::json ExportJsonOf(const std::string& name);  // {} when gone
  nlohmann::json VolumeJsonOf(const std::string& name);
  // Whether a volume or array NAME exists once the plan in `ctx` ran up to here.
  bool PlanHas(const PlanContext& ctx, const std::string& kind, const std::string& name);
  // The operations (in order) that make the live objects match `want`; objects absent from it
  // are removed only with `prune` (else listed in *kept).  Fills *ctx for their validation.
  Status PlanApply(const Config& want, bool prune, std::vector<std::string>* kept,
                   PlanContext* ctx, std::vector<std::unique_ptr<Operation>>* ops);
  // Whether leg `slot` of `a` may be failed, detached or removed (`op`): not the last up-to-date
  // leg (counting `also_gone` slots as gone), and an up-to-date leg is removed only with `force`.
  // *code (when given) says which refusal.  Also re-checked by the step under a->op_mu.
  Status CheckRetire(const std::shared_ptr<Array>& a, int slot, const std::string& op, bool force,
                     const std::set<int>& also_gone, control::RefusalCode* code);
  // Whether array `cfg` may take a leg live under its layer's rule (grow: appended).
  static Status CheckLegChange(const ArrayConfig& cfg, bool grow);

  // arrays.cc
  void ArrayRpc(const std::string& method, const nlohmann::json& p, Finish finish);
  // events.cc: `events` (since: replay from the ring, or a gap line and a fresh snapshot).
  void EventsRpc(const nlohmann::json& p, Reply reply, const nlohmann::json& id);
  std::vector<std::string> SnapshotLines(std::uint64_t seq);  // current state, as of `seq`
  // Pushes leg_state / leg_reason events from the mirror's leg listener as they happen, then
  // the legs' states at assembly.  After a->mirror is set.
  void WatchLegs(const std::shared_ptr<Array>& a);
  void WatchVolume(const std::string& name, net::ClientDevice& dev);
  void ApplyRpc(const control::Request& req, Reply reply);  // operations.cc
  // `batch`: typed operations validated in sequence (each against the plan of those before it),
  // then run as one plan (operations.cc).
  void BatchRpc(const control::Request& req, Reply reply);
  // Runs `steps` as apply and batch do: each finished step logged and pushed as an `apply_step`
  // event, with `extra(i)`'s members added for step i when given.
  // `reply` that first clears apply_busy_ (apply and batch reply once, on every path).
  Reply ReleasingBusy(Reply reply);
  ApplyOutcome RunPlan(std::vector<Step>& steps,
                       const std::function<nlohmann::json(std::size_t)>& extra = {});
  Status StartArrays();              // main thread, after volumes
  void StopArrayThreads();
  void CloseArrays();                // Shutdown: after the exporter drained and FUSE is gone
  nlohmann::json ArraysJson();
  nlohmann::json ArrayJson(const std::shared_ptr<Array>& a);
  Result<ArrayLeg> OpenLeg(const std::string& spec, const ArrayConfig& cfg);  // counted
  Result<ArrayLeg> OpenLegDevice(const std::string& spec, const ArrayConfig& cfg);
  void ProbeLegs(const std::shared_ptr<Array>& a);  // REQUIRES a->op_mu; monitor thread
  Status BringUp(const std::shared_ptr<Array>& a);   // REQUIRES a->op_mu held; blocking
  Status CreateArray(ArrayConfig cfg, bool assume_clean, bool force = false);
  Status RemoveArray(const std::string& name);
  Status ArrayAddLeg(const std::string& name, const std::string& spec, bool grow_only);
  Status ArrayLegOp(const std::string& name, const std::string& op, int slot,
                    const std::string& spec, bool force = false);
  // Split brain: keep `keep`'s data, resync the others from it (dry_run: report only).
  Result<nlohmann::json> ArrayResolve(const std::string& name, int keep, bool dry_run);
  // Stops the array here (flush, clean, claims released) and forgets its topology, so that
  // another host can import it from its legs.
  Status ArrayRelease(const std::string& name);
  // Takes over a released (or orphaned) mirror from its legs' headers (MirrorDevice::Import).
  Status ArrayImport(const std::string& name, const std::vector<std::string>& specs);
  Status LoadHostIdentity(const std::string& db);  // host_id_ (stable, in the state DB), host_name_
  std::string host_id_, host_name_;
  Status ArraySetRate(const std::string& name, std::uint64_t min, std::uint64_t max);
  Status PauseResync(const std::string& name, bool pause, bool check_only);
  Status PersistArray(const std::shared_ptr<Array>& a);
  std::uint64_t SampleResync(const std::shared_ptr<Array>& a);  // running bytes resynced
  // Before an engine call that restarts leg `slot`'s pass counter (ReAddLeg, RemoveLeg): moves
  // the pass's bytes into the running total.  Returns them, for UnbankResync if the call fails.
  std::uint64_t BankResync(const std::shared_ptr<Array>& a, int slot);
  void UnbankResync(const std::shared_ptr<Array>& a, int slot, std::uint64_t bytes);
  void BankDone(const std::shared_ptr<Array>& a, int slot);  // the engine call succeeded
  void RegisterArrayVolume(const std::shared_ptr<Array>& a);
  std::shared_ptr<Array> FindArray(const std::string& name);
  void ArrayMonitorLoop();
  void RefreshGrownFiles();
  void EventsLoop();
  void Emit(nlohmann::json ev);  // events_.Emit, and wakes the events thread
  void PokeEvents();             // wakes the events thread to re-derive now
  void TryPendingExports();

  // Exclusive legs (exclusive.cc): who uses a file, remote export, volume or array here.
  struct Use {
    std::string path;    // a local file or block device
    std::string remote;  // "dst host:port/export" or an nbd:// spec
    std::string ref;     // "volume:NAME" / "array:NAME"
    std::string export_name, volume_name, array;  // the user (one of them)
    int slot = -1;       // array leg slot
    bool rw = true;
    bool live = false;   // an array leg that is not detached
    std::string owner;   // "exported as \"e1\"", "a live leg 0 of array \"m\"", ...
  };
  // `gone`: "export:N", "volume:N", "array:N" to disregard (an apply plan removes them first).
  // *holder (when given) is set to the use that makes a check fail.
  std::vector<Use> Uses(const std::set<std::string>& gone = {});
  std::vector<Use> UsesOf(const Use& want, const std::set<std::string>& gone = {});
  // Whether a control client may name local `path` ([daemon] export_roots; config.h).
  Status CheckPathAllowed(const std::string& path) const {
    return daemon::CheckPathAllowed(path_policy_, path);
  }
  Status CheckExportFree(const ExportConfig& e, const std::set<std::string>& gone = {},
                         Use* holder = nullptr);
  Status CheckVolumeFree(const VolumeConfig& c, const std::set<std::string>& gone = {},
                         Use* holder = nullptr);
  // `slot` >= 0: skip that slot of `array` (a re-add of the same leg).
  Status CheckLegFree(const std::string& spec, const std::string& array, int slot,
                      const std::set<std::string>& gone = {}, Use* holder = nullptr);
  Status CheckLegsDistinct(const std::vector<std::string>& specs);

  // Persistent topology (persist.cc): runtime-added exports, volumes and mount.
  struct RuntimeObjects {
    std::vector<ExportConfig> exports;
    std::vector<VolumeConfig> volumes;
    std::string mount;
  };
  Status OpenTopology();
  RuntimeObjects LoadRuntimeObjects();  // config names win (conflicts are logged, records dropped)
  void RecordExport(const ExportConfig& e);
  void RecordVolume(const VolumeConfig& v);
  void RecordObject(const std::string& kind, const std::string& name, const nlohmann::json& spec);
  void ForgetObject(const std::string& kind, const std::string& name);

  // Online verify (arrays.cc, "Online verify"): the array.verify RPC, the "verify" member of
  // array JSON, periodic verifies (monitor thread) and verify events (events thread).
  void OpenVerifyStore(const std::string& db);
  void AddVerifyJson(const ArrayConfig& cfg, const std::shared_ptr<MirrorDevice>& m,
                     nlohmann::json* array);
  std::uint64_t VerifyInterval(const ArrayConfig& cfg) const;
  void VerifyTick();
  void VerifyEvents(const nlohmann::json& array);
  void VerifyFinished(const std::string& name, const std::string& trigger,
                      const VerifyProgress& p);

  Status OpenExport(const ExportConfig& e);
  // Blocking (worker or main thread): opens/connects the device of `vol`.
  Status ConnectVolume(const std::shared_ptr<Volume>& vol);
  // TLS from [daemon] (null without it): the exporter's and the dsts:// clients' contexts.
  Status LoadTls();
  // For a dsts:// `uri`: a TLS connector to host:port in *co; dst://: nothing.  Refused when the
  // config has no TLS keys.
  // Plugs the connector a volume or leg URI needs: TLS for dsts://, the Ethernet endpoint for eth://.
  Status UseTls(const std::string& uri, const std::string& host, std::uint16_t port, net::RemoteOptions* co);
  // For an nbds:// client: the TLS client context (STARTTLS); refused without keys.
  Status UseNbdTls(const std::string& uri, net::NbdClientOptions* no);
  void ScheduleRetry(const std::shared_ptr<Volume>& vol);
  void AddToMount(const std::shared_ptr<Volume>& vol);
  Status PrepareMountpoint(const std::string& dir);  // stale mount cleanup, busy refusal
  Status DoMount(const std::string& dir);
  Status LockStateDir();

  // NBD (daemon_nbd.cc, nbd_frontend.h): every export is also served over NBD.  Call NbdExportAdded after a
  // successful Exporter::AddExport (path: file-backed export; array: the array it exports);
  // export removal: NbdExportRemove first (Busy while NBD clients are connected), then the DST
  // side, then NbdExportRemoveDone(name, removed).
  int StartNbd();  // 0 or a sysexits code
  void StopNbd();
  // `dev` is the export's own device (a mirror is found through it), `served` what clients use.
  void NbdExportAdded(const ExportConfig& e, const std::shared_ptr<BlockDevice>& dev,
                      const std::shared_ptr<BlockDevice>& served, const std::string& path);
  // Serves e on dev over DST and NBD with its access list (path: a file-backed export); warns
  // when the list is empty (nobody can connect).
  Status ServeExport(const ExportConfig& e, const std::shared_ptr<BlockDevice>& dev, const std::string& path);
  Status NbdExportRemove(const std::string& name);
  void NbdExportRemoveDone(const std::string& name, bool removed);
  nlohmann::json NbdJson();

  Config cfg_;
  DaemonOptions opts_;
  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
  bool memory_locked_ = false;
  bool exporter_started_ = false;
  std::uint16_t listen_port_ = 0;  // the exporter's bound port (TLS or not)
  int lock_fd_ = -1;

  boost::asio::io_context io_;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work_;
  std::vector<std::thread> io_threads_;
  std::shared_ptr<net::TlsContext> tls_server_, tls_client_;
  // Raw-Ethernet endpoints (eth_transport.h), one per interface: opened at start for
  // [daemon] eth_interfaces (the exporter listens there) and on first use by eth:// imports.
  Result<std::shared_ptr<net::EthEndpoint>> EthEndpointFor(const std::string& ifname);
  void CloseEthEndpoints();
  nlohmann::json EthStatusJson();
  std::mutex eth_mu_;
  std::map<std::string, std::shared_ptr<net::EthEndpoint>> eth_;
  std::unique_ptr<net::Exporter> exporter_;
  std::unique_ptr<NbdFrontend> nbd_;  // null: NBD disabled or not started
  std::unique_ptr<MetricsServer> metrics_;  // null: [daemon] metrics_listen not set
  std::unique_ptr<ControlServer> control_;
  PathPolicy path_policy_;  // set by Start before the control socket opens
  WorkQueue workers_{3};
  std::atomic<bool> stopping_{false};
  // Before the objects that emit into it (mirror leg listeners run until the mirror is gone).
  EventLog events_;

  std::mutex mu_;
  std::map<std::string, std::shared_ptr<Volume>> volumes_;  // GUARDED_BY(mu_)
  std::map<std::string, ExportConfig> exports_;              // GUARDED_BY(mu_) (pending + live)
  std::shared_ptr<fuse::FuseMount> mount_;                   // GUARDED_BY(mu_)
  bool mount_busy_ = false;                                  // GUARDED_BY(mu_)

  // Arrays (arrays.cc).
  std::map<std::string, std::shared_ptr<Array>> arrays_;     // GUARDED_BY(mu_)
  // What each export's clients (DST and NBD) go through: per-export traffic and latency.
  std::map<std::string, std::shared_ptr<CountingDevice>> export_io_;  // GUARDED_BY(mu_)
  std::shared_ptr<DirtyMapStore> store_;
  std::unique_ptr<TopologyStore> topo_;
  std::mutex topo_mu_;
  std::atomic<bool> apply_busy_{false};
  std::mutex ev_mu_;
  std::condition_variable ev_cv_;
  bool ev_stop_ = false;                                     // GUARDED_BY(ev_mu_)
  bool ev_poke_ = false;  // GUARDED_BY(ev_mu_) a change was pushed: re-derive states now
  std::atomic<std::thread::id> events_tid_{};  // the events thread (it needs no wake-up)
  ProgressGate progress_gate_{4.0};  // resync/verify progress: at most 4 a second per leg
  std::thread monitor_thread_;
  std::thread events_thread_;

  // Online verify.
  std::shared_ptr<VerifyResultStore> verify_store_;
  double verify_epoch_ = 0;                                  // wall clock when arrays started
  std::mutex verify_mu_;
  std::map<std::string, nlohmann::json> verify_last_;        // GUARDED_BY(verify_mu_) persisted
  std::map<std::string, std::string> verify_trigger_;        // GUARDED_BY(verify_mu_)
  std::map<std::string, nlohmann::json> verify_seen_;        // events thread only
};

}  // namespace dst::daemon
