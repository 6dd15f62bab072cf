// Daemon: dstd's object graph.  One io_context with two threads runs the Exporter, every
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
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <nlohmann/json.hpp>

#include "control_server.h"
#include "dst/block_device.h"
#include "dst/daemon/config.h"
#include "dst/fuse/fuse_mount.h"
#include "dst/net/exporter.h"
#include "dst/net/remote_device.h"

namespace dst::daemon {

struct DaemonOptions {
  std::string config_path;
  std::string state_dir = "/var/lib/dst";
  std::string control_path = "/run/dst/dstd.sock";
  bool verbose = false;
};

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

class Daemon {
 public:
  Daemon(Config cfg, DaemonOptions opts);
  ~Daemon();

  // Returns 0, or a sysexits code after logging one line saying why.
  int Start();
  void Shutdown();

 private:
  struct Volume {
    VolumeConfig cfg;
    std::string state = "connecting";
    std::string error;  // last connect error while connecting
    std::shared_ptr<BlockDevice> dev;
    std::shared_ptr<net::RemoteDevice> remote;
    bool in_mount = false;
    bool removing = false;
    bool removed = false;
    int attempts = 0;
  };
  using Reply = ControlServer::ReplyFn;
  using Finish = std::function<void(Result<nlohmann::json>)>;  // any thread, exactly once

  void Handle(control::Request req, Reply reply);
  nlohmann::json StatusJson();
  nlohmann::json ExportsJson();
  nlohmann::json VolumesJson();
  nlohmann::json VolumeJson(const std::string& name, const Volume& v);

  void ExportAdd(const nlohmann::json& p, Finish finish);
  void ExportRemove(const nlohmann::json& p, Finish finish);
  void VolumeImport(const nlohmann::json& p, Finish finish);
  void VolumeRemove(const nlohmann::json& p, Finish finish);
  void MountRpc(const nlohmann::json& p, Finish finish);
  void UnmountRpc(Finish finish);

  Status OpenExport(const ExportConfig& e);
  // Blocking (worker or main thread): opens/connects the device of `vol`.
  Status ConnectVolume(const std::shared_ptr<Volume>& vol);
  void ScheduleRetry(const std::shared_ptr<Volume>& vol);
  void AddToMount(const std::shared_ptr<Volume>& vol);
  Status DoMount(const std::string& dir);
  Status LockStateDir();

  Config cfg_;
  DaemonOptions opts_;
  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
  bool memory_locked_ = false;
  bool exporter_started_ = false;
  int lock_fd_ = -1;

  boost::asio::io_context io_;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work_;
  std::vector<std::thread> io_threads_;
  std::unique_ptr<net::Exporter> exporter_;
  std::unique_ptr<ControlServer> control_;
  WorkQueue workers_{2};
  std::atomic<bool> stopping_{false};

  std::mutex mu_;
  std::map<std::string, std::shared_ptr<Volume>> volumes_;  // GUARDED_BY(mu_)
  std::map<std::string, ExportConfig> exports_;              // GUARDED_BY(mu_) (pending + live)
  std::shared_ptr<fuse::FuseMount> mount_;                   // GUARDED_BY(mu_)
  bool mount_busy_ = false;                                  // GUARDED_BY(mu_)
};

}  // namespace dst::daemon
