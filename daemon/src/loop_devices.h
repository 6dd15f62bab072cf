// Loop devices over the FUSE image files: attach, detach and "which loop devices use this file".
//
// dstd runs as root and already shows each volume as <mount>/<name>.img; `loop.attach` turns
// that file into /dev/loopN the way `losetup --find --show FILE` does, so a remote GUI or
// dstctl user gets a block device without a shell on the host.  Who uses a file is read from
// sysfs (/sys/block/loopN/loop/backing_file), not remembered: a loop device set up by hand
// with losetup shows up too, and one detached by hand disappears.
//
// Every call here blocks (open of a FUSE file waits for dstd's own FUSE threads, ioctls wait
// for the block layer): call them from a worker thread, never from an event loop.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "dst/status.h"

namespace dst::daemon {

struct LoopDevice {
  std::string device;        // "/dev/loop3"
  std::string backing_file;  // as the kernel reports it
  bool read_only = false;
  std::string mounted_at;    // a mount point of the device, empty when not mounted
};

// Loop devices whose backing file is `file`.  `sysfs` and `mountinfo` are parameters so that
// unit tests can point them at a fake tree.
std::vector<LoopDevice> LoopDevicesFor(const std::string& file, const std::string& sysfs = "/sys/block",
                                       const std::string& mountinfo = "/proc/self/mountinfo");

// LoopDevicesFor(file) as status JSON: [{"device", "read_only", "mounted_at"}].
nlohmann::json LoopDevicesJson(const std::string& file);

// Sets up a free loop device over `file` (LOOP_CTL_GET_FREE + LOOP_CONFIGURE, falling back to
// LOOP_SET_FD + LOOP_SET_STATUS64 on kernels before 5.8).  Returns the device path.
Result<std::string> AttachLoop(const std::string& file, bool read_only);

// Detaches `dev` (LOOP_CLR_FD).  Refused (Busy) while the device is mounted: the kernel would
// only defer the detach, and the caller would report a detach that has not happened.
Status DetachLoop(const LoopDevice& dev);

}  // namespace dst::daemon
