// FileDevice: a BlockDevice over a regular file or a block device.
//
// I/O runs on a small pool of worker threads doing pread/pwrite (never on an event loop).
// With direct_io the file is opened O_DIRECT; requests whose buffer or offset are not aligned
// to the device's direct-I/O alignment go through a second, buffered descriptor, which Linux
// keeps coherent with direct I/O.
//
// Fast path: a small read, or a small non-FUA write, on the buffered descriptor is first tried
// inline in Submit() with preadv2/pwritev2(RWF_NOWAIT), which by definition never blocks (it only
// succeeds when the page cache can serve it at once; anything else returns EAGAIN and the request
// goes to a worker as before).  A page-cache hit then costs no thread hand-off, and Submit() may
// complete the request inline (callers already handle inline completion: validation errors do it).
// On tmpfs/ramfs (detected with fstatfs) the page cache is the storage, so every read/write up
// to 64 KiB (FUA too) and every flush runs inline: it cannot block on a disk, and the worker
// hand-off would cost more than the copy.
// Disable both with FileDeviceOptions::inline_nowait = false.
//
// Durability: a write completes when the kernel has it (page cache); kIoFua writes use
// RWF_DSYNC; a flush is fdatasync().  Trim punches a hole (BLKDISCARD on block devices);
// write-zeroes uses FALLOC_FL_ZERO_RANGE (BLKZEROOUT), falling back to writing zeroes.
#pragma once

#include <memory>
#include <string>

#include "dst/block_device.h"

namespace dst {

struct FileDeviceOptions {
  bool read_only = false;
  bool direct_io = false;
  bool create = false;          // create the file if missing (needs size); mode 0600 whatever
                                // the umask (an image holds someone's disk)
  // 0: use the file's size.  Else a new (or empty) file is extended to it; an existing image
  // of another size is refused (never shrunk: the error names both sizes) unless grow is set
  // and size is larger.
  std::uint64_t size = 0;
  bool grow = false;            // allow extending an existing non-empty image to `size`
  int io_threads = 4;
  bool inline_nowait = true;    // see "Fast path" above
};

// Creates `path` if missing, mode 0600 whatever the umask; an existing file keeps its mode
// unless `tighten` (then group and other bits are cleared).  For files dstd owns (its state
// database: SQLite gives the -wal and -shm files the database's mode).
Status EnsurePrivateFile(const std::string& path, bool tighten);

class FileDevice : public BlockDevice {
 public:
  static Result<std::shared_ptr<FileDevice>> Open(const std::string& path,
                                                  const FileDeviceOptions& opts = {});
  ~FileDevice() override;

  DeviceInfo Info() const override;
  void Submit(IoRequest* req) override;
  std::string Describe() const override;
  const std::string& path() const;

  class Impl;
 private:
  explicit FileDevice(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dst
