#include "dst/file_device.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#ifndef STATX_DIOALIGN
#define STATX_DIOALIGN 0x00002000U
#endif

namespace dst {

class FileDevice::Impl {
 public:
  ~Impl() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    if (direct_fd_ >= 0) ::close(direct_fd_);
    if (fd_ >= 0) ::close(fd_);
  }

  Status Open(const std::string& path, const FileDeviceOptions& o) {
    path_ = path;
    int flags = (o.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
    fd_ = -1;
    if (o.create && !o.read_only) {
      // O_EXCL tells whether we made it: only a new image gets its mode set.
      fd_ = ::open(path.c_str(), flags | O_CREAT | O_EXCL, 0600);
      if (fd_ >= 0 && ::fchmod(fd_, 0600) != 0) return Status::FromErrno(errno, "chmod " + path);
      if (fd_ < 0 && errno != EEXIST) return Status::FromErrno(errno, "create " + path);
    }
    if (fd_ < 0) fd_ = ::open(path.c_str(), flags);
    if (fd_ < 0) return Status::FromErrno(errno, "open " + path);
    struct stat st;
    if (fstat(fd_, &st) != 0) return Status::FromErrno(errno, "stat " + path);
    is_blockdev_ = S_ISBLK(st.st_mode);
    if (!is_blockdev_ && !S_ISREG(st.st_mode))
      return Status::InvalidArgument(path + " is neither a regular file nor a block device");
    if (is_blockdev_) {
      uint64_t bytes = 0;
      if (ioctl(fd_, BLKGETSIZE64, &bytes) != 0) return Status::FromErrno(errno, "BLKGETSIZE64 " + path);
      info_.size = bytes;
      int ss = 512;
      if (ioctl(fd_, BLKSSZGET, &ss) == 0 && ss > 0) info_.logical_block_size = ss;
      dio_align_ = info_.logical_block_size;
    } else {
      const uint64_t have = static_cast<uint64_t>(st.st_size);
      if (o.size && have != o.size) {
        // An image is never shrunk: the bytes past the new end would be gone for good.  An
        // empty file is new; growing a file with data in it must be asked for.
        const std::string sizes = path + " is " + std::to_string(have) + " bytes; the size given (" +
                                  std::to_string(o.size) + " bytes) ";
        if (have != 0 && o.size < have)
          return Status::InvalidArgument(sizes + "is smaller: an image is never shrunk");
        if (have != 0 && !o.grow)
          return Status::InvalidArgument(sizes +
                                         "would grow it: ask for growing explicitly (dstctl export "
                                         "add --grow, grow = true in the config)");
        if (o.read_only) return Status::ReadOnly(sizes + "needs a resize, and it is opened read-only");
        if (ftruncate(fd_, static_cast<off_t>(o.size)) != 0)
          return Status::FromErrno(errno, "truncate " + path);
        st.st_size = static_cast<off_t>(o.size);
      }
      info_.size = static_cast<uint64_t>(st.st_size);
      info_.logical_block_size = 512;
      dio_align_ = 4096;
      struct statx sx;
      if (statx(fd_, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 && (sx.stx_mask & STATX_DIOALIGN) &&
          sx.stx_dio_offset_align > 0) {
        dio_align_ = std::max<uint32_t>(sx.stx_dio_offset_align, sx.stx_dio_mem_align);
      }
    }
    // Round the exported size down to whole blocks.
    info_.size -= info_.size % info_.logical_block_size;
    info_.read_only = o.read_only;
    info_.max_io_bytes = 32u << 20;
    if (o.direct_io) {
      direct_fd_ = ::open(path.c_str(), flags | O_DIRECT);
      if (direct_fd_ < 0) return Status::FromErrno(errno, "open O_DIRECT " + path);
    }
    inline_nowait_ = o.inline_nowait;
    // tmpfs and ramfs have no device behind them: a read or write is a copy to or from RAM
    // and cannot wait on I/O, but they do not implement RWF_NOWAIT either (EOPNOTSUPP).
    // Such files take the inline path with plain preadv2/pwritev2.
    struct statfs sfs;
    if (!is_blockdev_ && o.inline_nowait && fstatfs(fd_, &sfs) == 0 &&
        (sfs.f_type == kTmpfsMagic || sfs.f_type == kRamfsMagic))
      memory_backed_ = true;
    int n = o.io_threads > 0 ? o.io_threads : 1;
    awake_ = n;  // workers start awake and go to sleep on an empty queue
    workers_.reserve(n);
    for (int i = 0; i < n; ++i) workers_.emplace_back([this] { Run(); });
    return Status::OK();
  }

  void Submit(IoRequest* req) {
    Status st = ValidateRequest(info_, *req);
    if (!st.ok()) {
      req->done(req, std::move(st));
      return;
    }
    req->scratch = 0;
    if (inline_nowait_ && TryInline(req)) return;
    const bool slow = req->scratch != 0 || IsSlow(*req);
    req->scratch = slow;
    req->link = nullptr;
    bool wake;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (tail_) tail_->link = req; else head_ = req;
      tail_ = req;
      queued_bytes_ += req->length;
      // A worker that is awake (about to look at the queue, or running a fast request) takes
      // this one next without a wake-up; another sleeper is woken only when the backlog outgrows
      // what the awake workers clear quickly (kBacklogPerWorker bytes each, tens of microseconds
      // of page-cache copying), or for a request that may block (flush, FUA, direct I/O, a
      // page-cache miss): those must not wait behind each other.  Under load this saves a futex
      // wake and a context switch per request and keeps small I/O on warm workers instead of
      // all of them contending for this lock.
      wake = sleepers_ > wake_tokens_ &&
             (awake_ == 0 || slow || queued_bytes_ > static_cast<uint64_t>(awake_) * kBacklogPerWorker);
      if (wake) {  // counted now, so a burst does not wake the same sleeper twice
        ++awake_;
        ++wake_tokens_;
      }
    }
    if (wake) cv_.notify_one();
  }

  DeviceInfo info_;
  std::string path_;

 private:
  void Run() {
    for (;;) {
      IoRequest* req;
      {
        std::unique_lock<std::mutex> l(mu_);
        while (!head_ && !stopping_) {
          --awake_;
          ++sleepers_;
          cv_.wait(l);
          --sleepers_;
          // Submit counted a woken worker as awake already (one token per notify); a spurious
          // wake-up (or the stop broadcast) counts itself.
          if (wake_tokens_ > 0) --wake_tokens_; else ++awake_;
        }
        if (!head_) return;  // stopping and drained
        req = head_;
        head_ = req->link;
        if (!head_) tail_ = nullptr;
        queued_bytes_ -= req->length;
        if (req->scratch) --awake_;  // may block: do not count on this worker for the queue
      }
      Status st = Execute(*req);
      if (req->scratch) {
        std::lock_guard<std::mutex> l(mu_);
        ++awake_;
      }
      req->done(req, std::move(st));
    }
  }

  // Below this length an inline attempt is worth it (the thread hand-off dominates) and stays
  // short on the caller's thread.
  static constexpr uint64_t kInlineMax = 32u << 10;
  // On a memory-backed file every inline request is a plain memory copy: up to this length it
  // costs less than waking a worker and handing the completion back.  Larger copies go to a
  // worker so the event loop receives the next request meanwhile (NBD 1 MiB writes on one
  // connection: 2.0 GB/s all inline on the io thread, 3.3 GB/s with this split).
  static constexpr uint64_t kInlineMaxMemory = 64u << 10;
  static constexpr long kTmpfsMagic = 0x01021994;  // linux/magic.h TMPFS_MAGIC
  static constexpr long kRamfsMagic = 0x858458f6;  // linux/magic.h RAMFS_MAGIC
  static constexpr uint64_t kBacklogPerWorker = 256u << 10;

  // One RWF_NOWAIT attempt on the caller's thread.  True: the request completed (done called).
  // Only whole transfers count: a short or EAGAIN result leaves the request to a worker, which
  // redoes it from the start (same data, same offset: idempotent).
  bool TryInline(IoRequest* req) {
    if (memory_backed_) return TryInlineMemory(req);
    if (req->length == 0 || req->length > kInlineMax || Aligned(*req)) return false;
    ssize_t n;
    struct iovec iov = {req->data, static_cast<size_t>(req->length)};
    if (req->op == IoOp::kRead) {
      n = ::preadv2(fd_, &iov, 1, static_cast<off_t>(req->offset), RWF_NOWAIT);
    } else if (req->op == IoOp::kWrite && !(req->flags & kIoFua) && !info_.read_only) {
      n = ::pwritev2(fd_, &iov, 1, static_cast<off_t>(req->offset), RWF_NOWAIT);
    } else {
      return false;
    }
    if (n < 0 || static_cast<uint64_t>(n) != req->length) {
      // EOPNOTSUPP: this file does not do RWF_NOWAIT at all; stop trying.  Otherwise the page
      // cache missed: the worker will block on the device, mark the request slow.
      if (n < 0 && errno == EOPNOTSUPP) inline_nowait_ = false;
      else req->scratch = 1;
      return false;
    }
    req->done(req, Status::OK());
    return true;
  }

  // tmpfs/ramfs: reads and writes (FUA too: there is nothing to sync) run here in full; flush is
  // a no-op there but still goes through fdatasync on the caller's thread, which returns at once.
  // Trim and write-zeroes (fallocate) stay on the workers.
  bool TryInlineMemory(IoRequest* req) {
    switch (req->op) {
      case IoOp::kRead:
      case IoOp::kWrite:
        if (req->length > kInlineMaxMemory) return false;
        break;
      case IoOp::kFlush:
        break;
      default:
        return false;
    }
    Status st = Execute(*req);
    req->done(req, std::move(st));
    return true;
  }

  // Requests that may block for long (device I/O, fdatasync, fallocate).
  bool IsSlow(const IoRequest& r) const {
    if (r.op != IoOp::kRead && r.op != IoOp::kWrite) return true;
    return (r.flags & kIoFua) || Aligned(r);
  }

  bool Aligned(const IoRequest& r) const {
    return direct_fd_ >= 0 && r.offset % dio_align_ == 0 && r.length % dio_align_ == 0 &&
           reinterpret_cast<uintptr_t>(r.data) % dio_align_ == 0;
  }

  Status Execute(const IoRequest& r) {
    switch (r.op) {
      case IoOp::kRead: {
        int fd = Aligned(r) ? direct_fd_ : fd_;
        uint64_t done = 0;
        while (done < r.length) {
          ssize_t n = ::pread(fd, r.data + done, r.length - done, static_cast<off_t>(r.offset + done));
          if (n < 0) {
            if (errno == EINTR) continue;
            return Status::FromErrno(errno);
          }
          if (n == 0) {  // past EOF of a file that shrank: read as zeroes
            std::memset(r.data + done, 0, r.length - done);
            break;
          }
          done += static_cast<uint64_t>(n);
        }
        return Status::OK();
      }
      case IoOp::kWrite: {
        int fd = Aligned(r) ? direct_fd_ : fd_;
        int wflags = (r.flags & kIoFua) ? RWF_DSYNC : 0;
        uint64_t done = 0;
        while (done < r.length) {
          struct iovec iov = {r.data + done, r.length - done};
          ssize_t n = ::pwritev2(fd, &iov, 1, static_cast<off_t>(r.offset + done), wflags);
          if (n < 0) {
            if (errno == EINTR) continue;
            return Status::FromErrno(errno);
          }
          done += static_cast<uint64_t>(n);
        }
        return Status::OK();
      }
      case IoOp::kFlush:
        if (::fdatasync(fd_) != 0) return Status::FromErrno(errno);
        return Status::OK();
      case IoOp::kTrim:
        if (is_blockdev_) {
          uint64_t range[2] = {r.offset, r.length};
          if (ioctl(fd_, BLKDISCARD, range) == 0) return Status::OK();
          return Status::OK();  // discard is advisory
        }
        if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(r.offset),
                        static_cast<off_t>(r.length)) == 0)
          return Status::OK();
        return Status::OK();  // advisory: filesystems without hole punching ignore it
      case IoOp::kWriteZeroes:
        return WriteZeroes(r);
    }
    return Status::InvalidArgument();
  }

  Status WriteZeroes(const IoRequest& r) {
    if (is_blockdev_) {
      uint64_t range[2] = {r.offset, r.length};
      if (ioctl(fd_, BLKZEROOUT, range) == 0) return Status::OK();
    } else {
      int mode = (r.flags & kIoNoUnmap) ? FALLOC_FL_ZERO_RANGE
                                        : (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
      if (::fallocate(fd_, mode | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(r.offset),
                      static_cast<off_t>(r.length)) == 0)
        return Status::OK();
      if (::fallocate(fd_, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(r.offset),
                      static_cast<off_t>(r.length)) == 0)
        return Status::OK();
    }
    // Fallback: write zeroes from a static page (rare: filesystems without fallocate modes).
    static const char kZero[65536] = {};
    uint64_t done = 0;
    while (done < r.length) {
      size_t n = std::min<uint64_t>(sizeof(kZero), r.length - done);
      ssize_t w = ::pwrite(fd_, kZero, n, static_cast<off_t>(r.offset + done));
      if (w < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno(errno);
      }
      done += static_cast<uint64_t>(w);
    }
    return Status::OK();
  }

  int fd_ = -1;
  int direct_fd_ = -1;
  bool is_blockdev_ = false;
  bool memory_backed_ = false;  // tmpfs/ramfs: see TryInlineMemory
  // Written once by TryInline on EOPNOTSUPP from any submitting thread: a relaxed flag is enough.
  std::atomic<bool> inline_nowait_{false};
  uint32_t dio_align_ = 4096;
  std::mutex mu_;
  std::condition_variable cv_;
  IoRequest* head_ = nullptr;  // GUARDED_BY(mu_)
  IoRequest* tail_ = nullptr;  // GUARDED_BY(mu_)
  bool stopping_ = false;      // GUARDED_BY(mu_)
  int awake_ = 0;              // GUARDED_BY(mu_) workers not asleep in cv_ and not running a slow
                               // request (+ wakes in flight)
  int sleepers_ = 0;           // GUARDED_BY(mu_) workers waiting in cv_
  uint64_t queued_bytes_ = 0;  // GUARDED_BY(mu_) sum of their lengths
  int wake_tokens_ = 0;        // GUARDED_BY(mu_) notify_one calls not yet taken by a worker
  std::vector<std::thread> workers_;
};

Result<std::shared_ptr<FileDevice>> FileDevice::Open(const std::string& path,
                                                     const FileDeviceOptions& opts) {
  auto impl = std::make_unique<Impl>();
  Status st = impl->Open(path, opts);
  if (!st.ok()) return st;
  return std::shared_ptr<FileDevice>(new FileDevice(std::move(impl)));
}

FileDevice::FileDevice(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
FileDevice::~FileDevice() = default;
DeviceInfo FileDevice::Info() const { return impl_->info_; }
void FileDevice::Submit(IoRequest* req) { impl_->Submit(req); }
std::string FileDevice::Describe() const { return "file " + impl_->path_; }
const std::string& FileDevice::path() const { return impl_->path_; }

Status EnsurePrivateFile(const std::string& path, bool tighten) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  bool created = fd >= 0;
  if (fd < 0 && errno == EEXIST) fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, "open " + path);
  struct stat st;
  int rc = ::fstat(fd, &st);
  if (rc == 0 && (created || (tighten && S_ISREG(st.st_mode) && (st.st_mode & 077))))
    rc = ::fchmod(fd, created ? 0600 : (st.st_mode & 0700));
  int err = errno;
  ::close(fd);
  return rc == 0 ? Status::OK() : Status::FromErrno(err, "chmod " + path);
}

}  // namespace dst
