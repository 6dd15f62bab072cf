// FuseMount: volumes as <name>.img files over the libfuse3 low-level API.
//
// Request life cycle (one IoCtx per kernel request, taken from a fixed free list; every IoCtx
// owns one preallocated pool buffer of max_io + 2 * kMaxBlock bytes):
//
//   FUSE worker                          device completion (any thread)
//   -----------                          ------------------------------
//   read/write/fsync/flush
//     |  GetCtx()  (waits only for another request to finish: back-pressure, never memory)
//     |  [write] copy the kernel's bytes into ctx->buf
//     v
//   SUBMITTED --Submit(chunk)--> device --done--> OnChunkDone
//     ^                                              | error -> reply_err(ToErrno)  ---+
//     +---------- next chunk (request > device max_io) <-+ more                        |
//                                                    | last chunk                      |
//                                                    v                                 |
//                             [write + FUA emulation] FLUSH --done--+                  |
//                                                    v              v                  |
//                                            reply_buf / reply_write / reply_err(0)    |
//                                                    v <-------------------------------+
//                                            PutCtx(); volume.inflight--
//
// Unaligned writes and partial-block fallocate take the rare synchronous path instead: under the
// volume's rmw_mu the FUSE worker reads the head/tail blocks into ctx->buf, merges, writes the
// whole aligned span and only then replies (RMW must not interleave with another RMW of the
// same block).  Unaligned reads stay asynchronous: the aligned span is read into ctx->buf and
// the reply points into the middle of it.
//
// Unmount: umount2(mnt, 0), retried for a grace period while files are being closed.  Once the
// superblock goes away the kernel aborts the connection and the session threads see ENODEV.  If
// a file stays open (a loop device), umount2(MNT_FORCE) aborts the connection (FUSE's
// umount_begin) and MNT_DETACH drops the mount; unprivileged, fusermount3 -uz and fusectl's
// connections/N/abort do the same.  Only after the session loop ended and every IoCtx came back
// do we close /dev/fuse (fuse_session_unmount) and destroy the session.

#define FUSE_USE_VERSION 314

#include "dst/fuse/fuse_mount.h"

#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <linux/falloc.h>
#include <linux/prctl.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <unordered_set>
#include <mutex>
#include <thread>

#include "dst/buffer_pool.h"

extern char** environ;

namespace dst::fuse {

namespace {

constexpr fuse_ino_t kRootIno = FUSE_ROOT_ID;
constexpr std::uint32_t kMaxBlock = 4096;  // largest logical block size we can RMW in the slack
constexpr double kAttrTimeout = 1.0;
constexpr std::chrono::milliseconds kUnmountGrace{2000};
// FUSE_RELEASE is queued as a background request after close() returns; on a loaded 2-core CI
// machine it once took longer than 500 ms to arrive, and `volume remove` right after closing the
// file was refused as busy.  The same grace as an unmount: a refusal costs at most 2 s.
constexpr std::chrono::milliseconds kReleaseGrace{2000};
constexpr std::string_view kSuffix = ".img";

struct Volume {
  std::string name;
  std::shared_ptr<BlockDevice> dev;
  DeviceInfo info;  // info.size is the size at AddVolume; `size` is the current one
  std::atomic<std::uint64_t> size{0};  // RefreshVolume grows it (a grown array)
  fuse_ino_t ino = 0;
  std::uint32_t chunk = 0;  // largest request we send: min(pool max_io, device max_io), block multiple
  struct timespec created {};
  mode_t mode = 0600;  // permission bits of its file (FileAccess)
  uid_t uid = 0;
  gid_t gid = 0;
  int open_count = 0;                 // GUARDED_BY(Impl::mu_)
  std::atomic<int> inflight{0};       // IoCtx currently working for this volume
  std::atomic<bool> dirty{false};     // a write completed since the last flush
  std::mutex rmw_mu;                  // serializes read-modify-write of partial blocks
};

struct OpenFile {
  Volume* vol;
  bool writable;
  bool fua;              // opened O_SYNC / O_DSYNC
  bool closing = false;  // FLUSH seen: a close() ran on it, FUSE_RELEASE may be on its way
};

struct DirSnapshot {
  struct Entry {
    std::string name;
    fuse_ino_t ino;
    mode_t mode;
  };
  std::vector<Entry> entries;
};

struct IoCtx {
  IoRequest req;
  FuseMount::Impl* impl = nullptr;
  fuse_req_t freq = nullptr;
  Volume* vol = nullptr;
  char* buf = nullptr;      // pool buffer, owned for the ctx's whole life
  IoOp op = IoOp::kRead;
  std::uint32_t flags = 0;
  std::uint64_t dev_off = 0;   // aligned start of the span
  std::uint32_t span = 0;      // aligned length of the span
  std::uint32_t pos = 0;       // bytes of the span done
  std::uint32_t reply_off = 0; // read: where the caller's bytes start in buf
  std::uint32_t reply_len = 0; // read: bytes to return; write: count to report
  bool flush_after = false;    // FUA emulation on devices without FUA
  // Synchronous path (RMW, fallocate).
  std::mutex mu;
  std::condition_variable cv;
  bool sync_done = false;
  Status sync_status;
  IoCtx* next_free = nullptr;
};

std::uint64_t RoundDown(std::uint64_t v, std::uint64_t a) { return v - v % a; }
std::uint64_t RoundUp(std::uint64_t v, std::uint64_t a) { return RoundDown(v + a - 1, a); }

int ErrnoOf(const Status& st) {
  int e = st.ToErrno();
  return e > 0 ? e : EIO;
}

}  // namespace

class FuseMount::Impl {
 public:
  ~Impl() {
    Unmount();
    // A forced (lazy) unmount with files still open: the kernel never sends their release.
    for (OpenFile* of : open_files_) delete of;
  }

  Status Start(const FuseOptions& opts);
  void Unmount();

  Status AddVolume(const std::string& name, std::shared_ptr<BlockDevice> dev, const FileAccess& access);
  Status RemoveVolume(const std::string& name);
  bool WaitUnused(const std::string& name, bool release_expected);
  // REQUIRES: mu_
  bool WaitReleasedLocked(std::unique_lock<std::mutex>& l, const Volume* v, bool release_expected = false);
  Status RefreshVolume(const std::string& name);
  std::vector<VolumeEntry> ListVolumes() const;

  std::string mountpoint_;
  std::atomic<std::uint32_t> negotiated_max_write_{0};

  // ---- FUSE callbacks (static trampolines below forward here) ----
  void OnInit(struct fuse_conn_info* conn);
  void OnLookup(fuse_req_t req, fuse_ino_t parent, const char* name);
  void OnGetattr(fuse_req_t req, fuse_ino_t ino);
  void OnSetattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set);
  void OnOpen(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info* fi);
  void OnRelease(fuse_req_t req, struct fuse_file_info* fi);
  void OnRead(fuse_req_t req, size_t size, off_t off, struct fuse_file_info* fi);
  void OnWrite(fuse_req_t req, const char* data, size_t size, off_t off, struct fuse_file_info* fi);
  void OnFlush(fuse_req_t req, struct fuse_file_info* fi, bool always);
  void OnFallocate(fuse_req_t req, int mode, off_t off, off_t len, struct fuse_file_info* fi);
  void OnOpendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info* fi);
  void OnReaddir(fuse_req_t req, size_t size, off_t off, struct fuse_file_info* fi);
  void OnStatfs(fuse_req_t req);

  static void OnChunkDone(IoRequest* r, Status st);
  static void OnSyncDone(IoRequest* r, Status st);

 private:
  std::shared_ptr<Volume> FindByIno(fuse_ino_t ino) const;
  void FillAttr(const Volume& v, struct stat* st) const;
  void FillRootAttr(struct stat* st) const;

  IoCtx* GetCtx(fuse_req_t freq, Volume* vol);
  void PutCtx(IoCtx* c);
  void StartAsync(IoCtx* c);
  void SubmitChunk(IoCtx* c);
  void Finish(IoCtx* c, const Status& st);
  Status RunSync(IoCtx* c, IoOp op, std::uint32_t flags, std::uint64_t off, std::uint64_t len,
                 char* data);
  Status Rmw(IoCtx* c, std::uint64_t off, std::uint32_t len, const char* src, std::uint32_t flags);
  Status ZeroRange(IoCtx* c, std::uint64_t off, std::uint64_t len, std::uint32_t wz_flags);
  bool DetachMount(bool force);
  bool WaitLoopDone(std::chrono::milliseconds d);
  void AbortConnection();

  FuseOptions opts_;
  std::uint32_t max_io_ = 0;
  struct fuse_session* se_ = nullptr;
  std::thread loop_thread_;
  std::mutex loop_mu_;
  std::condition_variable loop_cv_;
  bool loop_done_ = false;  // GUARDED_BY(loop_mu_)
  bool mounted_ = false;    // the kernel mount exists (until DetachMount)
  std::atomic<bool> stopped_{false};  // Unmount ran (or is running)
  std::mutex unmount_mu_;
  unsigned conn_id_ = 0;    // /sys/fs/fuse/connections/<conn_id_>
  bool have_conn_id_ = false;
  struct timespec mounted_at_ {};

  std::unique_ptr<BufferPool> pool_;
  std::unique_ptr<IoCtx[]> ctxs_;
  std::size_t ctx_count_ = 0;
  std::mutex ctx_mu_;
  std::condition_variable ctx_cv_;
  IoCtx* free_ctx_ = nullptr;     // GUARDED_BY(ctx_mu_)
  std::size_t free_count_ = 0;    // GUARDED_BY(ctx_mu_)

  mutable std::mutex mu_;
  std::condition_variable released_cv_;  // a volume's open_count dropped to 0
  std::map<std::string, std::shared_ptr<Volume>> by_name_;  // GUARDED_BY(mu_)
  std::map<fuse_ino_t, std::shared_ptr<Volume>> by_ino_;    // GUARDED_BY(mu_)
  std::unordered_set<OpenFile*> open_files_;                 // GUARDED_BY(mu_); owned
  fuse_ino_t next_ino_ = 2;                                 // GUARDED_BY(mu_)
};

namespace {

FuseMount::Impl* ImplOf(fuse_req_t req) { return static_cast<FuseMount::Impl*>(fuse_req_userdata(req)); }

void LlInit(void* userdata, struct fuse_conn_info* conn) {
  static_cast<FuseMount::Impl*>(userdata)->OnInit(conn);
}
void LlLookup(fuse_req_t req, fuse_ino_t parent, const char* name) { ImplOf(req)->OnLookup(req, parent, name); }
void LlGetattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info*) { ImplOf(req)->OnGetattr(req, ino); }
void LlSetattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set, struct fuse_file_info*) {
  ImplOf(req)->OnSetattr(req, ino, attr, to_set);
}
void LlOpen(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info* fi) { ImplOf(req)->OnOpen(req, ino, fi); }
void LlRelease(fuse_req_t req, fuse_ino_t, struct fuse_file_info* fi) { ImplOf(req)->OnRelease(req, fi); }
void LlRead(fuse_req_t req, fuse_ino_t, size_t size, off_t off, struct fuse_file_info* fi) {
  ImplOf(req)->OnRead(req, size, off, fi);
}
void LlWrite(fuse_req_t req, fuse_ino_t, const char* buf, size_t size, off_t off, struct fuse_file_info* fi) {
  ImplOf(req)->OnWrite(req, buf, size, off, fi);
}
void LlFlush(fuse_req_t req, fuse_ino_t, struct fuse_file_info* fi) { ImplOf(req)->OnFlush(req, fi, false); }
void LlFsync(fuse_req_t req, fuse_ino_t, int, struct fuse_file_info* fi) { ImplOf(req)->OnFlush(req, fi, true); }
void LlFallocate(fuse_req_t req, fuse_ino_t, int mode, off_t off, off_t len, struct fuse_file_info* fi) {
  ImplOf(req)->OnFallocate(req, mode, off, len, fi);
}
void LlOpendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info* fi) { ImplOf(req)->OnOpendir(req, ino, fi); }
void LlReaddir(fuse_req_t req, fuse_ino_t, size_t size, off_t off, struct fuse_file_info* fi) {
  ImplOf(req)->OnReaddir(req, size, off, fi);
}
void LlReleasedir(fuse_req_t req, fuse_ino_t, struct fuse_file_info* fi) {
  delete reinterpret_cast<DirSnapshot*>(fi->fh);
  fuse_reply_err(req, 0);
}
void LlStatfs(fuse_req_t req, fuse_ino_t) { ImplOf(req)->OnStatfs(req); }
void LlUnlink(fuse_req_t req, fuse_ino_t, const char*) { fuse_reply_err(req, EPERM); }
void LlCreate(fuse_req_t req, fuse_ino_t, const char*, mode_t, struct fuse_file_info*) {
  fuse_reply_err(req, EPERM);
}
void LlMknod(fuse_req_t req, fuse_ino_t, const char*, mode_t, dev_t) { fuse_reply_err(req, EPERM); }
void LlMkdir(fuse_req_t req, fuse_ino_t, const char*, mode_t) { fuse_reply_err(req, EPERM); }
void LlRename(fuse_req_t req, fuse_ino_t, const char*, fuse_ino_t, const char*, unsigned) {
  fuse_reply_err(req, EPERM);
}

struct fuse_lowlevel_ops MakeOps() {
  struct fuse_lowlevel_ops ops;
  std::memset(&ops, 0, sizeof(ops));
  ops.init = LlInit;
  ops.lookup = LlLookup;
  ops.getattr = LlGetattr;
  ops.setattr = LlSetattr;
  ops.open = LlOpen;
  ops.release = LlRelease;
  ops.read = LlRead;
  ops.write = LlWrite;
  ops.flush = LlFlush;
  ops.fsync = LlFsync;
  ops.fallocate = LlFallocate;
  ops.opendir = LlOpendir;
  ops.readdir = LlReaddir;
  ops.releasedir = LlReleasedir;
  ops.statfs = LlStatfs;
  ops.unlink = LlUnlink;
  ops.create = LlCreate;
  ops.mknod = LlMknod;
  ops.mkdir = LlMkdir;
  ops.rename = LlRename;
  return ops;
}

const struct fuse_lowlevel_ops kOps = MakeOps();

bool UserAllowOther() {
  if (geteuid() == 0) return true;
  FILE* f = std::fopen("/etc/fuse.conf", "r");
  if (!f) return false;
  char line[256];
  bool found = false;
  while (std::fgets(line, sizeof(line), f)) {
    if (std::strncmp(line, "user_allow_other", 16) == 0) found = true;
  }
  std::fclose(f);
  return found;
}

bool ValidName(const std::string& name) {
  if (name.empty() || name.size() > 200 || name == "." || name == "..") return false;
  for (char c : name) {
    if (c == '/' || c == '\0') return false;
  }
  return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Setup and teardown

Status FuseMount::Impl::Start(const FuseOptions& opts) {
  opts_ = opts;
  mountpoint_ = opts.mountpoint;
  if (mountpoint_.empty()) return Status::InvalidArgument("fuse: empty mountpoint");
  struct stat st;
  if (::stat(mountpoint_.c_str(), &st) != 0 && errno == ENOTCONN && geteuid() == 0) {
    // A dead FUSE server (crashed daemon) left its mount behind: clear it and take its place.
    fuse_log(FUSE_LOG_WARNING, "dst fuse: clearing stale mount on %s\n", mountpoint_.c_str());
    ::umount2(mountpoint_.c_str(), MNT_DETACH);
  }
  if (::stat(mountpoint_.c_str(), &st) != 0) return Status::FromErrno(errno, "fuse: mountpoint " + mountpoint_);
  if (!S_ISDIR(st.st_mode)) return Status::InvalidArgument("fuse: mountpoint " + mountpoint_ + " is not a directory");
  if (opts.max_threads == 0) return Status::InvalidArgument("fuse: max_threads must be > 0");
  if (opts.buffer_count == 0) return Status::InvalidArgument("fuse: buffer_count must be > 0");

  // The kernel's request size limit is 256 pages by default (fs.fuse.max_pages_limit) and libfuse
  // 3.14 cannot receive more than that either.
  max_io_ = static_cast<std::uint32_t>(RoundUp(std::max<std::uint32_t>(opts.max_io, 4096), 4096));
  max_io_ = std::min<std::uint32_t>(max_io_, 1u << 20);

  pool_ = std::make_unique<BufferPool>(max_io_ + 2 * kMaxBlock, opts.buffer_count);
  ctx_count_ = opts.buffer_count;
  ctxs_ = std::make_unique<IoCtx[]>(ctx_count_);
  for (std::size_t i = 0; i < ctx_count_; ++i) {
    IoCtx* c = &ctxs_[i];
    c->impl = this;
    c->buf = pool_->TryGet();
    c->next_free = free_ctx_;
    free_ctx_ = c;
  }
  free_count_ = ctx_count_;
  clock_gettime(CLOCK_REALTIME, &mounted_at_);

  std::string o = "fsname=dst,subtype=dst,default_permissions,max_read=" + std::to_string(max_io_);
  if (opts.allow_other && UserAllowOther()) o += ",allow_other";
  std::vector<std::string> argv_s = {"dst", "-o", o};
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  struct fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());
  se_ = fuse_session_new(&args, &kOps, sizeof(kOps), this);
  fuse_opt_free_args(&args);
  if (!se_) return Status::IoError("fuse: fuse_session_new failed (bad options?)");
  if (fuse_session_mount(se_, mountpoint_.c_str()) != 0) {
    fuse_session_destroy(se_);
    se_ = nullptr;
    return Status::IoError("fuse: mounting " + mountpoint_ + " failed");
  }
  mounted_ = true;

  loop_thread_ = std::thread([this] {
    // The session threads (created from this one) inherit the I/O-flusher state, if allowed.
    (void)MarkIoFlusher();
    struct fuse_loop_config* cfg = fuse_loop_cfg_create();
    fuse_loop_cfg_set_max_threads(cfg, opts_.max_threads);
    // Idle workers are kept: creating threads allocates, and the I/O path must not.
    fuse_loop_cfg_set_idle_threads(cfg, opts_.max_threads);
    fuse_loop_cfg_set_clone_fd(cfg, 0);
    fuse_session_loop_mt(se_, cfg);
    fuse_loop_cfg_destroy(cfg);
    std::lock_guard<std::mutex> l(loop_mu_);
    loop_done_ = true;
    loop_cv_.notify_all();
  });

  // The connection id names /sys/fs/fuse/connections/<id> (needed to abort a busy connection).
  // stat() is answered by the session threads, after INIT.
  struct stat mst;
  if (::stat(mountpoint_.c_str(), &mst) == 0) {
    conn_id_ = (major(mst.st_dev) << 20) | minor(mst.st_dev);
    have_conn_id_ = true;
  }
  return Status::OK();
}

bool FuseMount::Impl::DetachMount(bool force) {
  if (!mounted_) return true;
  if (geteuid() == 0) {
    // MNT_FORCE makes the kernel abort the FUSE connection (umount_begin) even while files are
    // open; then MNT_DETACH removes the busy mount from the namespace.
    if (::umount2(mountpoint_.c_str(), force ? MNT_FORCE : 0) == 0 || errno == EINVAL || errno == ENOENT) {
      mounted_ = false;
      return true;
    }
    if (!force) return false;
    ::umount2(mountpoint_.c_str(), MNT_DETACH);
    mounted_ = false;
    return true;
  }
  // Unprivileged: fusermount3 (what libfuse does, but without closing /dev/fuse under the
  // session threads); the connection is cut through fusectl if the mount stays busy.
  mounted_ = false;
  pid_t pid;
  const char* argv[] = {"fusermount3", "-u", "-q", "-z", "--", mountpoint_.c_str(), nullptr};
  if (posix_spawnp(&pid, "fusermount3", nullptr, nullptr, const_cast<char* const*>(argv), environ) == 0) {
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
  }
  return true;
}

void FuseMount::Impl::AbortConnection() {
  if (!have_conn_id_) return;
  std::string path = "/sys/fs/fuse/connections/" + std::to_string(conn_id_) + "/abort";
  int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) {
    fuse_log(FUSE_LOG_WARNING, "dst fuse: cannot open %s: %s\n", path.c_str(), strerror(errno));
    return;
  }
  if (::write(fd, "1", 1) != 1)
    fuse_log(FUSE_LOG_WARNING, "dst fuse: abort %s failed: %s\n", path.c_str(), strerror(errno));
  ::close(fd);
}

bool FuseMount::Impl::WaitLoopDone(std::chrono::milliseconds d) {
  std::unique_lock<std::mutex> l(loop_mu_);
  return loop_cv_.wait_for(l, d, [&] { return loop_done_; });
}

void FuseMount::Impl::Unmount() {
  std::lock_guard<std::mutex> ul(unmount_mu_);
  if (stopped_) return;
  stopped_ = true;
  if (se_) {
    // Polite first: a plain unmount succeeds once no file is open.  Files may be closing right
    // now, so retry for a grace period before forcing.
    const auto deadline = std::chrono::steady_clock::now() + kUnmountGrace;
    bool detached = DetachMount(false);
    while (!detached && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      detached = DetachMount(false);
    }
    if (!detached) {
      // Still busy (e.g. a loop device holds a file): cut the connection.  Users of the open
      // files get ENOTCONN from now on.
      fuse_log(FUSE_LOG_WARNING, "dst fuse: %s busy; forcing the unmount\n", mountpoint_.c_str());
      DetachMount(true);
    }
    if (loop_thread_.joinable() && !WaitLoopDone(kUnmountGrace)) {
      fuse_log(FUSE_LOG_WARNING, "dst fuse: %s: session still running; aborting the connection\n",
               mountpoint_.c_str());
      fuse_session_exit(se_);
      AbortConnection();
    }
    if (loop_thread_.joinable()) loop_thread_.join();
  }
  // Device completions may still be replying; /dev/fuse must stay open until they are done.
  {
    std::unique_lock<std::mutex> l(ctx_mu_);
    ctx_cv_.wait(l, [&] { return free_count_ == ctx_count_; });
  }
  if (se_) {
    fuse_session_unmount(se_);  // closes /dev/fuse; the mount is already gone
    fuse_session_destroy(se_);
    se_ = nullptr;
  }
  std::lock_guard<std::mutex> l(mu_);
  by_ino_.clear();
  by_name_.clear();
}

// ---------------------------------------------------------------------------------------------
// Volumes

Status FuseMount::Impl::AddVolume(const std::string& name, std::shared_ptr<BlockDevice> dev,
                                  const FileAccess& access) {
  if (!ValidName(name)) return Status::InvalidArgument("fuse: bad volume name '" + name + "'");
  if (!dev) return Status::InvalidArgument("fuse: null device for volume " + name);
  if (access.mode > 0777) return Status::InvalidArgument("fuse: volume " + name + ": mode above 0777");
  auto v = std::make_shared<Volume>();
  v->name = name;
  v->dev = std::move(dev);
  v->info = v->dev->Info();
  v->mode = static_cast<mode_t>(access.mode) & (v->info.read_only ? 0555 : 0777);
  v->uid = access.uid >= 0 ? static_cast<uid_t>(access.uid) : getuid();
  v->gid = access.gid >= 0 ? static_cast<gid_t>(access.gid) : getgid();
  const std::uint32_t lbs = v->info.logical_block_size;
  if (lbs == 0 || (lbs & (lbs - 1)) != 0 || lbs > kMaxBlock)
    return Status::InvalidArgument("fuse: volume " + name + ": unsupported logical block size " +
                                   std::to_string(lbs));
  if (v->info.max_io_bytes < lbs)
    return Status::InvalidArgument("fuse: volume " + name + ": max_io_bytes below block size");
  v->chunk = static_cast<std::uint32_t>(RoundDown(std::min(v->info.max_io_bytes, max_io_), lbs));
  v->info.size = RoundDown(v->info.size, lbs);
  v->size.store(v->info.size, std::memory_order_relaxed);
  clock_gettime(CLOCK_REALTIME, &v->created);
  {
    std::lock_guard<std::mutex> l(mu_);
    if (stopped_) return Status::Unavailable("fuse: not mounted");
    if (by_name_.count(name)) return Status::Exists("fuse: volume " + name + " already shown");
    v->ino = next_ino_++;
    by_name_[name] = v;
    by_ino_[v->ino] = v;
  }
  return Status::OK();
}

// Waits (up to kReleaseGrace) for the FUSE_RELEASEs of handles already closed; false at once
// while a handle has not been closed at all (no FLUSH yet: a process or loop device holds it).
bool FuseMount::Impl::WaitReleasedLocked(std::unique_lock<std::mutex>& l, const Volume* v,
                                         bool release_expected) {
  auto settled = [&] {
    if (v->open_count == 0) return true;
    if (release_expected) return false;
    for (const OpenFile* of : open_files_)
      if (of->vol == v && !of->closing) return true;  // really open: no point waiting
    return false;
  };
  released_cv_.wait_for(l, kReleaseGrace, settled);
  return v->open_count == 0;
}

bool FuseMount::Impl::WaitUnused(const std::string& name, bool release_expected) {
  std::unique_lock<std::mutex> l(mu_);
  auto it = by_name_.find(name);
  if (it == by_name_.end()) return true;
  const std::shared_ptr<Volume> v = it->second;
  return WaitReleasedLocked(l, v.get(), release_expected);
}

Status FuseMount::Impl::RemoveVolume(const std::string& name) {
  std::shared_ptr<Volume> v;
  {
    std::unique_lock<std::mutex> l(mu_);
    auto it = by_name_.find(name);
    if (it == by_name_.end()) return Status::NotFound("fuse: no volume " + name);
    v = it->second;
    // close() does not wait for FUSE_RELEASE, so a file closed just now may still count as
    // open for a moment: give the kernel a short grace before calling the volume busy.
    if (!WaitReleasedLocked(l, v.get()))
      return Status::Busy("fuse: volume " + name + " is open");
    if (by_name_.find(name) == by_name_.end() || by_name_[name] != v)
      return Status::NotFound("fuse: no volume " + name);
    by_ino_.erase(v->ino);
    by_name_.erase(name);
  }
  // Not open any more, so only completions that already replied can be running; they touch the
  // volume for a moment after the reply.
  while (v->inflight.load(std::memory_order_acquire) != 0)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  std::lock_guard<std::mutex> ul(unmount_mu_);  // keeps se_ alive
  if (se_ && !stopped_) {
    std::string file = name + std::string(kSuffix);
    // Drop the kernel's cached dentry now instead of after entry_timeout.  Outside mu_: the
    // kernel may wait for a lookup that needs mu_.
    fuse_lowlevel_notify_inval_entry(se_, kRootIno, file.c_str(), file.size());
  }
  return Status::OK();
}

// A volume that grew (an array with a leg appended): the file shows the new size at once, also
// while open.  The kernel caches the attributes (i_size) for kAttrTimeout; invalidating the
// inode's attributes makes the next stat() fetch them again.  Data already cached stays valid:
// a grown device keeps its old bytes where they were.
Status FuseMount::Impl::RefreshVolume(const std::string& name) {
  std::shared_ptr<Volume> v;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = by_name_.find(name);
    if (it == by_name_.end()) return Status::NotFound("fuse: no volume " + name);
    v = it->second;
  }
  const std::uint64_t now = RoundDown(v->dev->Info().size, v->info.logical_block_size);
  if (now < v->size.load(std::memory_order_relaxed))
    return Status::InvalidArgument("fuse: volume " + name + " shrank; not shown");
  if (now == v->size.exchange(now)) return Status::OK();
  std::lock_guard<std::mutex> ul(unmount_mu_);  // keeps se_ alive
  if (se_ && !stopped_) {
    int rc = fuse_lowlevel_notify_inval_inode(se_, v->ino, -1, 0);  // attributes only
    if (rc != 0 && rc != -ENOENT)  // ENOENT: the kernel has not looked it up yet
      return Status::FromErrno(-rc, "fuse: invalidating " + name);
  }
  return Status::OK();
}

std::vector<VolumeEntry> FuseMount::Impl::ListVolumes() const {
  std::lock_guard<std::mutex> l(mu_);
  std::vector<VolumeEntry> out;
  for (const auto& [name, v] : by_name_) {
    out.push_back(VolumeEntry{name, v->size.load(std::memory_order_relaxed), v->info.read_only,
                              v->open_count});
  }
  return out;
}

std::shared_ptr<Volume> FuseMount::Impl::FindByIno(fuse_ino_t ino) const {
  std::lock_guard<std::mutex> l(mu_);
  auto it = by_ino_.find(ino);
  return it == by_ino_.end() ? nullptr : it->second;
}

void FuseMount::Impl::FillAttr(const Volume& v, struct stat* st) const {
  std::memset(st, 0, sizeof(*st));
  st->st_ino = v.ino;
  st->st_mode = S_IFREG | v.mode;
  st->st_nlink = 1;
  st->st_uid = v.uid;
  st->st_gid = v.gid;
  const std::uint64_t size = v.size.load(std::memory_order_relaxed);
  st->st_size = static_cast<off_t>(size);
  st->st_blksize = std::max<std::uint32_t>(v.info.logical_block_size, 4096);
  st->st_blocks = static_cast<blkcnt_t>(size / 512);
  st->st_atim = st->st_mtim = st->st_ctim = v.created;
}

void FuseMount::Impl::FillRootAttr(struct stat* st) const {
  std::memset(st, 0, sizeof(*st));
  st->st_ino = kRootIno;
  st->st_mode = S_IFDIR | 0755;
  st->st_nlink = 2;
  st->st_uid = getuid();
  st->st_gid = getgid();
  st->st_blksize = 4096;
  st->st_atim = st->st_mtim = st->st_ctim = mounted_at_;
}

// ---------------------------------------------------------------------------------------------
// Metadata callbacks

void FuseMount::Impl::OnInit(struct fuse_conn_info* conn) {
  // libfuse has already capped max_write at its receive buffer; never raise it above that.
  conn->max_write = std::min<unsigned>(conn->max_write, max_io_);
  conn->max_read = max_io_;  // must equal the max_read mount option
  conn->max_readahead = std::min<unsigned>(conn->max_readahead, max_io_);
  if (conn->capable & FUSE_CAP_ASYNC_DIO) conn->want |= FUSE_CAP_ASYNC_DIO;
  if (conn->capable & FUSE_CAP_ASYNC_READ) conn->want |= FUSE_CAP_ASYNC_READ;
  conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;  // a write reply must mean the device has the data
  // Splice does not help: every write is copied once into a pool buffer anyway.
  conn->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);
  // Background requests (readahead, async direct I/O from the loop driver) up to the context
  // count, so the loop device can keep a queue in flight.
  unsigned bg = static_cast<unsigned>(std::min<std::size_t>(ctx_count_, 0xffff));
  conn->max_background = std::max(bg, 1u);
  conn->congestion_threshold = std::max(conn->max_background * 3 / 4, 1u);
  negotiated_max_write_.store(conn->max_write);
}

void FuseMount::Impl::OnLookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  if (parent != kRootIno) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  std::string_view n(name);
  if (n.size() <= kSuffix.size() || n.substr(n.size() - kSuffix.size()) != kSuffix) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  std::shared_ptr<Volume> v;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = by_name_.find(std::string(n.substr(0, n.size() - kSuffix.size())));
    if (it != by_name_.end()) v = it->second;
  }
  if (!v) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  struct fuse_entry_param e;
  std::memset(&e, 0, sizeof(e));
  e.ino = v->ino;
  e.generation = 1;
  FillAttr(*v, &e.attr);
  e.attr_timeout = kAttrTimeout;
  e.entry_timeout = kAttrTimeout;
  fuse_reply_entry(req, &e);
}

void FuseMount::Impl::OnGetattr(fuse_req_t req, fuse_ino_t ino) {
  struct stat st;
  if (ino == kRootIno) {
    FillRootAttr(&st);
  } else {
    auto v = FindByIno(ino);
    if (!v) {
      fuse_reply_err(req, ENOENT);
      return;
    }
    FillAttr(*v, &st);
  }
  fuse_reply_attr(req, &st, kAttrTimeout);
}

void FuseMount::Impl::OnSetattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set) {
  struct stat st;
  if (ino == kRootIno) {
    FillRootAttr(&st);
  } else {
    auto v = FindByIno(ino);
    if (!v) {
      fuse_reply_err(req, ENOENT);
      return;
    }
    FillAttr(*v, &st);
    // A volume has a fixed size: truncate/extend is refused, "truncate to the same size" is fine.
    if ((to_set & FUSE_SET_ATTR_SIZE) && attr->st_size != st.st_size) {
      fuse_reply_err(req, EPERM);
      return;
    }
  }
  // Ownership and permissions are fixed; setting them to what they are is a harmless no-op.
  if (((to_set & FUSE_SET_ATTR_MODE) && (attr->st_mode & 07777) != (st.st_mode & 07777)) ||
      ((to_set & FUSE_SET_ATTR_UID) && attr->st_uid != st.st_uid) ||
      ((to_set & FUSE_SET_ATTR_GID) && attr->st_gid != st.st_gid)) {
    fuse_reply_err(req, EPERM);
    return;
  }
  // Time updates are accepted and ignored (touch, cp -p): they carry no block data.
  fuse_reply_attr(req, &st, kAttrTimeout);
}

void FuseMount::Impl::OnOpen(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info* fi) {
  if (ino == kRootIno) {
    fuse_reply_err(req, EISDIR);
    return;
  }
  const bool writable = (fi->flags & O_ACCMODE) != O_RDONLY;
  Volume* vol = nullptr;
  OpenFile* of = nullptr;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = by_ino_.find(ino);
    if (it == by_ino_.end()) {
      fuse_reply_err(req, ENOENT);
      return;
    }
    if (writable && it->second->info.read_only) {
      fuse_reply_err(req, EROFS);
      return;
    }
    vol = it->second.get();
    ++vol->open_count;
    of = new OpenFile{vol, writable, (fi->flags & O_DSYNC) != 0};
    open_files_.insert(of);
  }
  fi->fh = reinterpret_cast<std::uint64_t>(of);
  fi->keep_cache = 0;
  fi->direct_io = 0;  // O_DIRECT users get the kernel's direct path anyway; see OnInit
  if (fuse_reply_open(req, fi) != 0) {
    // The opener went away (interrupted): the kernel will not send release for this handle.
    std::lock_guard<std::mutex> l(mu_);
    --vol->open_count;
    open_files_.erase(of);
    delete of;
  }
}

void FuseMount::Impl::OnRelease(fuse_req_t req, struct fuse_file_info* fi) {
  auto* of = reinterpret_cast<OpenFile*>(fi->fh);
  {
    std::lock_guard<std::mutex> l(mu_);
    if (--of->vol->open_count == 0) released_cv_.notify_all();
    open_files_.erase(of);
  }
  delete of;
  fuse_reply_err(req, 0);
}

void FuseMount::Impl::OnOpendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info* fi) {
  if (ino != kRootIno) {
    fuse_reply_err(req, ENOTDIR);
    return;
  }
  auto snap = std::make_unique<DirSnapshot>();
  snap->entries.push_back({".", kRootIno, S_IFDIR});
  snap->entries.push_back({"..", kRootIno, S_IFDIR});
  {
    std::lock_guard<std::mutex> l(mu_);
    for (const auto& [ino2, v] : by_ino_) snap->entries.push_back({v->name + std::string(kSuffix), ino2, S_IFREG});
  }
  fi->fh = reinterpret_cast<std::uint64_t>(snap.get());
  if (fuse_reply_open(req, fi) == 0) snap.release();
}

void FuseMount::Impl::OnReaddir(fuse_req_t req, size_t size, off_t off, struct fuse_file_info* fi) {
  auto* snap = reinterpret_cast<DirSnapshot*>(fi->fh);
  std::vector<char> buf(size);
  size_t used = 0;
  for (size_t i = static_cast<size_t>(off); i < snap->entries.size(); ++i) {
    const auto& e = snap->entries[i];
    struct stat st;
    std::memset(&st, 0, sizeof(st));
    st.st_ino = e.ino;
    st.st_mode = e.mode;
    size_t need = fuse_add_direntry(req, buf.data() + used, size - used, e.name.c_str(), &st,
                                    static_cast<off_t>(i + 1));
    if (need > size - used) break;
    used += need;
  }
  fuse_reply_buf(req, buf.data(), used);
}

void FuseMount::Impl::OnStatfs(fuse_req_t req) {
  struct statvfs s;
  std::memset(&s, 0, sizeof(s));
  std::uint64_t bytes = 0;
  std::size_t n = 0;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (const auto& [name, v] : by_name_) bytes += v->size.load(std::memory_order_relaxed);
    n = by_name_.size();
  }
  s.f_bsize = 4096;
  s.f_frsize = 4096;
  s.f_blocks = bytes / 4096;
  s.f_files = n + 1;
  s.f_namemax = 255;
  fuse_reply_statfs(req, &s);
}

// ---------------------------------------------------------------------------------------------
// Data path

IoCtx* FuseMount::Impl::GetCtx(fuse_req_t freq, Volume* vol) {
  IoCtx* c;
  {
    std::unique_lock<std::mutex> l(ctx_mu_);
    // Back-pressure: every context is busy with device I/O that will complete on its own.
    ctx_cv_.wait(l, [&] { return free_ctx_ != nullptr; });
    c = free_ctx_;
    free_ctx_ = c->next_free;
    --free_count_;
  }
  vol->inflight.fetch_add(1, std::memory_order_relaxed);
  c->freq = freq;
  c->vol = vol;
  c->flags = 0;
  c->pos = 0;
  c->reply_off = 0;
  c->reply_len = 0;
  c->flush_after = false;
  return c;
}

void FuseMount::Impl::PutCtx(IoCtx* c) {
  Volume* vol = c->vol;
  c->vol = nullptr;
  c->freq = nullptr;
  // Last touch of the volume: RemoveVolume may free it as soon as inflight reads 0.
  vol->inflight.fetch_sub(1, std::memory_order_release);
  std::lock_guard<std::mutex> l(ctx_mu_);
  c->next_free = free_ctx_;
  free_ctx_ = c;
  ++free_count_;
  ctx_cv_.notify_all();  // under the lock: Unmount may destroy us once the count is full
}

void FuseMount::Impl::StartAsync(IoCtx* c) {
  c->pos = 0;
  SubmitChunk(c);
}

void FuseMount::Impl::SubmitChunk(IoCtx* c) {
  IoRequest& r = c->req;
  r.op = c->op;
  r.flags = c->flags;
  r.offset = c->dev_off + c->pos;
  r.length = c->op == IoOp::kFlush ? 0 : std::min(c->vol->chunk, c->span - c->pos);
  r.data = c->op == IoOp::kFlush ? nullptr : c->buf + c->pos;
  r.done = &Impl::OnChunkDone;
  r.ctx = c;
  r.link = nullptr;
  r.scratch = 0;
  c->vol->dev->Submit(&r);
}

void FuseMount::Impl::OnChunkDone(IoRequest* r, Status st) {
  auto* c = static_cast<IoCtx*>(r->ctx);
  Impl* self = c->impl;
  if (!st.ok()) {
    self->Finish(c, st);
    return;
  }
  if (r->op != IoOp::kFlush) {
    c->pos += r->length;
    if (c->pos < c->span) {
      self->SubmitChunk(c);
      return;
    }
  }
  if (c->op == IoOp::kWrite && c->flush_after) {
    c->flush_after = false;
    c->op = IoOp::kFlush;
    self->SubmitChunk(c);
    return;
  }
  self->Finish(c, st);
}

void FuseMount::Impl::Finish(IoCtx* c, const Status& st) {
  if (!st.ok()) {
    if (c->op == IoOp::kFlush) c->vol->dirty.store(true);  // still not durable
    fuse_reply_err(c->freq, ErrnoOf(st));
  } else if (c->op == IoOp::kRead) {
    fuse_reply_buf(c->freq, c->buf + c->reply_off, c->reply_len);
  } else if (c->reply_len > 0) {  // a write (possibly with its FUA flush)
    c->vol->dirty.store(true);
    fuse_reply_write(c->freq, c->reply_len);
  } else {
    fuse_reply_err(c->freq, 0);
  }
  PutCtx(c);
}

void FuseMount::Impl::OnSyncDone(IoRequest* r, Status st) {
  auto* c = static_cast<IoCtx*>(r->ctx);
  std::lock_guard<std::mutex> l(c->mu);
  c->sync_status = std::move(st);
  c->sync_done = true;
  c->cv.notify_one();
}

Status FuseMount::Impl::RunSync(IoCtx* c, IoOp op, std::uint32_t flags, std::uint64_t off,
                                std::uint64_t len, char* data) {
  // Write-zeroes carries no payload, so its pieces may be large; reads/writes go by chunk.
  const std::uint64_t piece = (op == IoOp::kWriteZeroes || op == IoOp::kTrim)
                                  ? RoundDown(1u << 30, c->vol->info.logical_block_size)
                                  : c->vol->chunk;
  std::uint64_t done = 0;
  do {
    IoRequest& r = c->req;
    r.op = op;
    r.flags = flags;
    r.offset = off + done;
    r.length = static_cast<std::uint32_t>(std::min<std::uint64_t>(piece, len - done));
    r.data = data ? data + done : nullptr;
    r.done = &Impl::OnSyncDone;
    r.ctx = c;
    r.link = nullptr;
    r.scratch = 0;
    {
      std::lock_guard<std::mutex> l(c->mu);
      c->sync_done = false;
    }
    c->vol->dev->Submit(&r);
    std::unique_lock<std::mutex> l(c->mu);
    c->cv.wait(l, [&] { return c->sync_done; });
    if (!c->sync_status.ok()) return c->sync_status;
    done += r.length;
  } while (done < len);
  return Status::OK();
}

// Writes [off, off+len) (src, or zeroes when src is null) by merging with the surrounding blocks.
// REQUIRES: c->vol->rmw_mu held; the aligned span fits into the ctx buffer.
Status FuseMount::Impl::Rmw(IoCtx* c, std::uint64_t off, std::uint32_t len, const char* src,
                            std::uint32_t flags) {
  const std::uint64_t lbs = c->vol->info.logical_block_size;
  const std::uint64_t a_start = RoundDown(off, lbs);
  const std::uint64_t a_end = RoundUp(off + len, lbs);
  const bool head = off != a_start;
  if (head) DST_RETURN_IF_ERROR(RunSync(c, IoOp::kRead, 0, a_start, lbs, c->buf));
  if ((off + len) != a_end && (a_end - lbs != a_start || !head))
    DST_RETURN_IF_ERROR(RunSync(c, IoOp::kRead, 0, a_end - lbs, lbs, c->buf + (a_end - lbs - a_start)));
  if (src)
    std::memcpy(c->buf + (off - a_start), src, len);
  else
    std::memset(c->buf + (off - a_start), 0, len);
  DST_RETURN_IF_ERROR(RunSync(c, IoOp::kWrite, flags, a_start, a_end - a_start, c->buf));
  return Status::OK();
}

void FuseMount::Impl::OnRead(fuse_req_t req, size_t size, off_t off, struct fuse_file_info* fi) {
  Volume* v = reinterpret_cast<OpenFile*>(fi->fh)->vol;
  const std::uint64_t vsize = v->size.load(std::memory_order_relaxed);
  if (off < 0) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  const std::uint64_t uoff = static_cast<std::uint64_t>(off);
  if (uoff >= vsize || size == 0) {
    fuse_reply_buf(req, nullptr, 0);  // EOF
    return;
  }
  const std::uint64_t len = std::min<std::uint64_t>({size, vsize - uoff, max_io_});
  const std::uint64_t lbs = v->info.logical_block_size;
  IoCtx* c = GetCtx(req, v);
  c->op = IoOp::kRead;
  c->dev_off = RoundDown(uoff, lbs);
  c->span = static_cast<std::uint32_t>(RoundUp(uoff + len, lbs) - c->dev_off);
  c->reply_off = static_cast<std::uint32_t>(uoff - c->dev_off);
  c->reply_len = static_cast<std::uint32_t>(len);
  StartAsync(c);
}

void FuseMount::Impl::OnWrite(fuse_req_t req, const char* data, size_t size, off_t off,
                              struct fuse_file_info* fi) {
  auto* of = reinterpret_cast<OpenFile*>(fi->fh);
  Volume* v = of->vol;
  if (v->info.read_only) {
    fuse_reply_err(req, EROFS);
    return;
  }
  if (!of->writable) {
    fuse_reply_err(req, EBADF);
    return;
  }
  const std::uint64_t vsize = v->size.load(std::memory_order_relaxed);
  if (off < 0) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  const std::uint64_t uoff = static_cast<std::uint64_t>(off);
  if (size == 0) {
    fuse_reply_write(req, 0);
    return;
  }
  if (uoff >= vsize) {
    fuse_reply_err(req, ENOSPC);  // a volume does not grow
    return;
  }
  // Past-the-end tails are cut: the caller sees a short write, then ENOSPC.
  const std::uint32_t len = static_cast<std::uint32_t>(std::min<std::uint64_t>({size, vsize - uoff, max_io_}));
  const std::uint64_t lbs = v->info.logical_block_size;
  std::uint32_t flags = 0;
  bool flush_after = false;
  if (of->fua) {
    if (v->info.can_fua)
      flags |= kIoFua;
    else if (v->info.can_flush)
      flush_after = true;
  }
  IoCtx* c = GetCtx(req, v);
  if (uoff % lbs == 0 && len % lbs == 0) {
    std::memcpy(c->buf, data, len);  // the kernel's buffer dies when we return
    c->op = IoOp::kWrite;
    c->flags = flags;
    c->dev_off = uoff;
    c->span = len;
    c->reply_len = len;
    c->flush_after = flush_after;
    StartAsync(c);
    return;
  }
  // Rare: partial blocks.  Synchronous read-modify-write under the volume's RMW lock.
  Status st;
  {
    std::lock_guard<std::mutex> l(v->rmw_mu);
    st = Rmw(c, uoff, len, data, flags);
  }
  if (st.ok() && flush_after) st = RunSync(c, IoOp::kFlush, 0, 0, 0, nullptr);
  if (st.ok()) {
    v->dirty.store(true);
    fuse_reply_write(req, len);
  } else {
    fuse_reply_err(req, ErrnoOf(st));
  }
  PutCtx(c);
}

void FuseMount::Impl::OnFlush(fuse_req_t req, struct fuse_file_info* fi, bool always) {
  OpenFile* of = reinterpret_cast<OpenFile*>(fi->fh);
  Volume* v = of->vol;
  if (!always) {  // FLUSH comes from close() (fsync asks with always): release may follow
    std::lock_guard<std::mutex> l(mu_);
    of->closing = true;
  }
  // close() flushes only after writes; fsync always asks the device.
  bool was_dirty = v->dirty.exchange(false);
  if (!v->info.can_flush || (!always && !was_dirty)) {
    fuse_reply_err(req, 0);
    return;
  }
  IoCtx* c = GetCtx(req, v);
  c->op = IoOp::kFlush;
  c->dev_off = 0;
  c->span = 0;
  StartAsync(c);
}

Status FuseMount::Impl::ZeroRange(IoCtx* c, std::uint64_t off, std::uint64_t len,
                                  std::uint32_t wz_flags) {
  Volume* v = c->vol;
  const std::uint64_t lbs = v->info.logical_block_size;
  const std::uint64_t end = off + len;
  const std::uint64_t inner_start = RoundUp(off, lbs);
  const std::uint64_t inner_end = RoundDown(end, lbs);
  std::lock_guard<std::mutex> l(v->rmw_mu);
  if (off % lbs != 0) {
    DST_RETURN_IF_ERROR(Rmw(c, off, static_cast<std::uint32_t>(std::min(end, inner_start) - off), nullptr, 0));
  }
  if (end % lbs != 0 && inner_end >= inner_start) {
    DST_RETURN_IF_ERROR(Rmw(c, inner_end, static_cast<std::uint32_t>(end - inner_end), nullptr, 0));
  }
  if (inner_start < inner_end) {
    if (v->info.can_write_zeroes) {
      DST_RETURN_IF_ERROR(RunSync(c, IoOp::kWriteZeroes, wz_flags, inner_start, inner_end - inner_start, nullptr));
    } else {
      // No device support: write zeroes from the (zeroed) context buffer.
      std::memset(c->buf, 0, v->chunk);
      for (std::uint64_t p = inner_start; p < inner_end; p += v->chunk) {
        DST_RETURN_IF_ERROR(RunSync(c, IoOp::kWrite, 0, p, std::min<std::uint64_t>(v->chunk, inner_end - p), c->buf));
      }
    }
  }
  return Status::OK();
}

void FuseMount::Impl::OnFallocate(fuse_req_t req, int mode, off_t off, off_t len,
                                  struct fuse_file_info* fi) {
  Volume* v = reinterpret_cast<OpenFile*>(fi->fh)->vol;
  if (off < 0 || len <= 0) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  const std::uint64_t vsize = v->size.load(std::memory_order_relaxed);
  std::uint64_t start = static_cast<std::uint64_t>(off);
  std::uint64_t end = start + static_cast<std::uint64_t>(len);
  const bool keep_size = mode & FALLOC_FL_KEEP_SIZE;
  if (mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) {
    fuse_reply_err(req, EOPNOTSUPP);
    return;
  }
  if ((mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) == 0) {
    // Plain preallocation: the blocks exist already, unless it would grow the volume.
    fuse_reply_err(req, (keep_size || end <= vsize) ? 0 : EOPNOTSUPP);
    return;
  }
  if ((mode & FALLOC_FL_PUNCH_HOLE) && (mode & FALLOC_FL_ZERO_RANGE)) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  if (v->info.read_only) {
    fuse_reply_err(req, EROFS);
    return;
  }
  if (end > vsize) {
    if (!keep_size) {
      fuse_reply_err(req, EOPNOTSUPP);  // would grow the volume
      return;
    }
    end = vsize;
  }
  if (start >= end) {
    fuse_reply_err(req, 0);
    return;
  }
  // Punch hole must read back as zeroes (the loop driver also sends write-zeroes-with-unmap as a
  // punch hole), which TRIM does not promise: it becomes write-zeroes that may unmap.  Zero range
  // keeps the allocation.
  const std::uint32_t wz_flags = (mode & FALLOC_FL_ZERO_RANGE) ? kIoNoUnmap : 0;
  IoCtx* c = GetCtx(req, v);
  Status st = ZeroRange(c, start, end - start, wz_flags);
  if (st.ok()) v->dirty.store(true);
  fuse_reply_err(req, st.ok() ? 0 : ErrnoOf(st));
  PutCtx(c);
}

// ---------------------------------------------------------------------------------------------
// Public wrappers

Result<std::unique_ptr<FuseMount>> FuseMount::Mount(const FuseOptions& opts) {
  auto impl = std::make_unique<Impl>();
  Status st = impl->Start(opts);
  if (!st.ok()) {
    impl->Unmount();
    return st;
  }
  return std::unique_ptr<FuseMount>(new FuseMount(std::move(impl)));
}

FuseMount::FuseMount(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
FuseMount::~FuseMount() = default;
Status FuseMount::AddVolume(const std::string& name, std::shared_ptr<BlockDevice> dev, FileAccess access) {
  return impl_->AddVolume(name, std::move(dev), access);
}
Status FuseMount::RemoveVolume(const std::string& name) { return impl_->RemoveVolume(name); }
bool FuseMount::WaitUnused(const std::string& name, bool release_expected) {
  return impl_->WaitUnused(name, release_expected);
}
Status FuseMount::RefreshVolume(const std::string& name) { return impl_->RefreshVolume(name); }
std::vector<VolumeEntry> FuseMount::ListVolumes() const { return impl_->ListVolumes(); }
const std::string& FuseMount::mountpoint() const { return impl_->mountpoint_; }
void FuseMount::Unmount() { impl_->Unmount(); }
std::uint32_t FuseMount::negotiated_max_write() const { return impl_->negotiated_max_write_.load(); }

Status MarkIoFlusher() {
  if (prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0) return Status::FromErrno(errno, "prctl(PR_SET_IO_FLUSHER)");
  return Status::OK();
}

Status LockMemory() {
  if (mlockall(MCL_CURRENT | MCL_FUTURE) != 0) return Status::FromErrno(errno, "mlockall");
  return Status::OK();
}

}  // namespace dst::fuse
