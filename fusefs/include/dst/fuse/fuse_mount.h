// FuseMount: shows each volume (a BlockDevice) as a regular file <mountpoint>/<name>.img.
//
// libfuse3 low-level API, multithreaded session.  read/write/fsync/fallocate map onto
// BlockDevice requests (punch hole -> trim, zero range -> write-zeroes, fsync -> flush, O_DIRECT
// and O_SYNC/O_DSYNC honoured).  Buffers come from a preallocated BufferPool; a FUSE worker
// submits and returns, and the completion replies to the kernel from whatever thread finishes.
// No block logic lives here: errors are translated once, in the reply.
//
// Threading: AddVolume/RemoveVolume/ListVolumes are thread-safe and may be called while mounted.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "dst/block_device.h"
#include "dst/status.h"

namespace dst::fuse {

struct FuseOptions {
  std::string mountpoint;
  bool allow_other = true;       // loop devices and other users may open the files
  unsigned max_threads = 8;      // FUSE worker threads
  std::uint32_t max_io = 1u << 20;  // max_read/max_write, capped by the kernel
  std::size_t buffer_count = 64;    // preallocated max_io buffers
};

struct VolumeEntry {
  std::string name;
  std::uint64_t size = 0;
  bool read_only = false;
  int open_count = 0;
};

class FuseMount {
 public:
  // Mounts and starts the session threads.  The mountpoint directory must exist.
  static Result<std::unique_ptr<FuseMount>> Mount(const FuseOptions& opts);
  ~FuseMount();  // unmounts

  Status AddVolume(const std::string& name, std::shared_ptr<BlockDevice> dev);
  Status RemoveVolume(const std::string& name);  // kBusy while the file is open
  std::vector<VolumeEntry> ListVolumes() const;
  const std::string& mountpoint() const;
  void Unmount();

  class Impl;
 private:
  explicit FuseMount(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dst::fuse
