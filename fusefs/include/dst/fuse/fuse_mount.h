// FuseMount: shows each volume (a BlockDevice) as a regular file <mountpoint>/<name>.img.
//
// libfuse3 low-level API, multithreaded session.  read/write/fsync/fallocate map onto
// BlockDevice requests (punch hole -> trim, zero range -> write-zeroes, fsync -> flush, O_DIRECT
// and O_SYNC/O_DSYNC honoured).  Buffers come from a preallocated BufferPool; a FUSE worker
// submits and returns, and the completion replies to the kernel from whatever thread finishes.
// No block logic lives here: errors are translated once, in the reply.
//
// Threading: AddVolume/RemoveVolume/ListVolumes are thread-safe and may be called while mounted.
//
// One kernel read/write (details in fusefs/src/fuse_mount.cc):
//
//   FUSE worker: take IoCtx (+ its pool buffer) --> [write: copy payload] --> Submit --> return
//   device completion: more chunks? --yes--> Submit next chunk
//                      |no  (write on a FUA-less device opened O_SYNC: --> FLUSH -->)
//                      v
//                      fuse_reply_buf / fuse_reply_write / fuse_reply_err(Status::ToErrno())
//                      --> IoCtx back to the free list
//   Partial-block writes and fallocate: the worker does read-modify-write synchronously under a
//   per-volume lock, then replies.
//
// Unmount(): umount (retried for a grace period while files close), then forced (connection
// aborted, open files get ENOTCONN) if still busy; joins the session threads, waits for every
// in-flight device request, then closes /dev/fuse.  Idempotent; the destructor calls it.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "dst/block_device.h"
#include "dst/status.h"

namespace dst::fuse {

struct FuseOptions {
  std::string mountpoint;
  // Users other than the daemon's may reach the files at all (then only as each file's mode and
  // owner allow: the mount checks permissions in the kernel).  Needs root or user_allow_other in
  // /etc/fuse.conf.  Loop devices work without it when dstd (root) sets them up.
  bool allow_other = false;
  unsigned max_threads = 8;      // FUSE worker threads
  std::uint32_t max_io = 1u << 20;  // max_read/max_write, capped by the kernel
  std::size_t buffer_count = 64;    // preallocated max_io buffers
};

// Who may open a volume's file (with allow_other; without it only the daemon's user).
struct FileAccess {
  std::uint32_t mode = 0600;  // permission bits; a read-only volume drops the write bits
  std::int64_t uid = -1;      // -1: the daemon's user
  std::int64_t gid = -1;      // -1: the daemon's group
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

  Status AddVolume(const std::string& name, std::shared_ptr<BlockDevice> dev, FileAccess access = {});
  Status RemoveVolume(const std::string& name);  // kBusy while the file is open
  // True once `name`'s file is not open (or the volume is not shown).  close() returns before
  // the kernel's FUSE_RELEASE arrives, so a file whose every handle was just closed (FLUSH
  // seen) is waited for, up to 2 s; one with a handle still open answers false at once.
  // `release_expected`: the caller itself just let go of a handle without a close() (a loop
  // device detached): wait the grace for it whatever the handles' FLUSH state.
  // Blocks: not from an event loop.
  bool WaitUnused(const std::string& name, bool release_expected = false);
  // The volume's device grew: show the new size now (also while the file is open; the kernel's
  // cached attributes are invalidated).  A loop device on the file then takes the new size with
  // `losetup -c`.  NotFound if the volume is not shown.
  Status RefreshVolume(const std::string& name);
  std::vector<VolumeEntry> ListVolumes() const;
  const std::string& mountpoint() const;
  void Unmount();
  // max_write the kernel accepted at FUSE_INIT (0 before the kernel's INIT arrived).
  std::uint32_t negotiated_max_write() const;

  class Impl;
 private:
  explicit FuseMount(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// mlockall(MCL_CURRENT|MCL_FUTURE) for the daemon: a loop device on a FUSE file must not need
// page-ins of the server to make progress under memory pressure.  Returns the errno on refusal
// (RLIMIT_MEMLOCK, no CAP_IPC_LOCK); the caller decides whether that is fatal.
Status LockMemory();

// prctl(PR_SET_IO_FLUSHER) for the calling thread and the threads it creates afterwards: their
// memory allocations do not recurse into I/O reclaim (which could wait on our own loop device).
// Needs CAP_SYS_RESOURCE.  FuseMount sets it on its session threads itself; the daemon should
// call it early in main() so FileDevice / network threads inherit it.
Status MarkIoFlusher();

}  // namespace dst::fuse
