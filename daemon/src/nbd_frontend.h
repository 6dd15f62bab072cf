// NbdFrontend: dstd's NBD face.  Every export the daemon serves over DST (a file, a volume or an
// array) is also served by one NbdServer on its own port (`[daemon] nbd_listen`, default
// 127.0.0.1:10809; docs/nbd.md).  The daemon calls AddExport/RemoveExport next to the matching
// Exporter calls; everything NBD-specific is decided here:
//
//   - file-backed exports get a FileAllocationMap (base:allocation shows holes) and FAST_ZERO
//     when the file system can punch holes;
//   - an export whose device is a MirrorDevice publishes each leg's out-of-sync map as the
//     metadata context `dst:dirty:<slot>` (flag bit 0 = dirty), for the slots in use when the
//     export is added.
//
// Lifecycle (main thread):  Start() -> AddExport()... -> Drain() at shutdown -> destroy while the
// io threads still run.  Thread-safe: the control workers add and remove exports concurrently.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <nlohmann/json.hpp>

#include "dst/block_device.h"
#include "dst/mirror_device.h"
#include "dst/net/nbd_server.h"
#include "dst/status.h"

namespace dst::daemon {

// `dst:dirty:<slot>`: the out-of-sync map of one mirror leg.  Extents are region-granular
// (the array's region_size) and clamped to the query; flags 1 = dirty (the leg misses data
// there), 0 = clean.  An array that is gone answers Unavailable (EIO to the client).
class DirtyMapContext : public net::MetaContextProvider {
 public:
  DirtyMapContext(std::weak_ptr<MirrorDevice> mirror, int slot);
  std::string name() const override { return name_; }
  Status Query(std::uint64_t offset, std::uint64_t length, net::ExtentSink& sink) override;

  static constexpr std::uint32_t kDirty = 1;

 private:
  std::weak_ptr<MirrorDevice> mirror_;
  int slot_;
  std::string name_;
};

// One `dst:dirty:<slot>` context per leg slot in use.
std::vector<std::shared_ptr<net::MetaContextProvider>> DirtyMapContexts(
    const std::shared_ptr<MirrorDevice>& mirror);

class NbdFrontend {
 public:
  NbdFrontend(boost::asio::io_context& io, net::NbdServerOptions opts);
  ~NbdFrontend();

  Status Start();
  std::uint16_t port() const;
  const std::string& address() const { return opts_.listen_address; }

  // `path` non-empty: a regular file (or block device) backs the export.  If `device` is a
  // MirrorDevice, or `mirror` is given, its dirty maps are published.
  Status AddExport(const std::string& name, std::shared_ptr<BlockDevice> device, bool read_only,
                   const net::AccessList& allow, const std::string& path = {},
                   std::shared_ptr<MirrorDevice> mirror = nullptr);
  // NotFound is not an error for the daemon (the export may never have reached NBD).
  Status RemoveExport(const std::string& name);
  // Undoes the last RemoveExport of `name` (the DST side refused to remove it), or forgets it
  // (the DST side removed it too: the device reference is dropped).
  Status Restore(const std::string& name);
  void Forget(const std::string& name);
  // Replaces the access list of a served export (NotFound when it is not on NBD).
  Status SetAccess(const std::string& name, const net::AccessList& allow);

  // Blocking (main thread): stop accepting, answer in-flight requests, flush, close.
  Status Drain(std::chrono::milliseconds timeout);

  // status --json "nbd" object.
  nlohmann::json StatusJson() const;
  // Per-export NBD info for export list: {connections, contexts} or null.
  nlohmann::json ExportJson(const std::string& name) const;

 private:
  net::NbdServerOptions opts_;
  std::unique_ptr<net::NbdServer> server_;
  mutable std::mutex mu_;
  std::map<std::string, net::NbdExportSpec> specs_;    // GUARDED_BY(mu_) live exports
  std::map<std::string, net::NbdExportSpec> removed_;  // GUARDED_BY(mu_) for Restore
};

}  // namespace dst::daemon
