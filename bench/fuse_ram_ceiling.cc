// fuse_ram_ceiling: the FUSE ceiling of bench/nbd_bench.sh.  A minimal libfuse3 (low-level API)
// filesystem with one file, "file.img", whose bytes live in RAM.  read and write are one memcpy
// each, so fio on this file measures the kernel's FUSE round trip and libfuse's loop and nothing
// else: the upper bound for any FUSE block file, dst's included.
//
//   fuse_ram_ceiling MOUNTPOINT SIZE_MIB [THREADS]
//
// Negotiates the same connection options as dst's FuseMount (fusefs/src/fuse_mount.cc) so the
// comparison is like for like: async direct I/O and reads, no writeback cache, no splice,
// max_read/max_write 1 MiB, a multi-threaded session loop with THREADS (default 16) workers.
// Runs in the foreground until unmounted (fusermount3 -u) or SIGTERM.
#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

#include <sys/mman.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>

namespace {

constexpr fuse_ino_t kFileIno = 2;
constexpr const char* kFileName = "file.img";
constexpr unsigned kMaxIo = 1u << 20;

char* g_data = nullptr;
std::uint64_t g_size = 0;

void FillAttr(fuse_ino_t ino, struct stat* st) {
  std::memset(st, 0, sizeof(*st));
  st->st_ino = ino;
  if (ino == FUSE_ROOT_ID) {
    st->st_mode = S_IFDIR | 0755;
    st->st_nlink = 2;
  } else {
    st->st_mode = S_IFREG | 0644;
    st->st_nlink = 1;
    st->st_size = static_cast<off_t>(g_size);
    st->st_blocks = static_cast<blkcnt_t>(g_size / 512);
  }
  st->st_blksize = 4096;
}

void OnInit(void*, struct fuse_conn_info* conn) {
  conn->max_write = std::min<unsigned>(conn->max_write, kMaxIo);
  conn->max_read = kMaxIo;
  conn->max_readahead = std::min<unsigned>(conn->max_readahead, kMaxIo);
  if (conn->capable & FUSE_CAP_ASYNC_DIO) conn->want |= FUSE_CAP_ASYNC_DIO;
  if (conn->capable & FUSE_CAP_ASYNC_READ) conn->want |= FUSE_CAP_ASYNC_READ;
  conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
  conn->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);
  conn->max_background = 128;
  conn->congestion_threshold = 96;
}

void OnLookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  if (parent != FUSE_ROOT_ID || std::strcmp(name, kFileName) != 0) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  struct fuse_entry_param e;
  std::memset(&e, 0, sizeof(e));
  e.ino = kFileIno;
  e.attr_timeout = 3600;
  e.entry_timeout = 3600;
  FillAttr(kFileIno, &e.attr);
  fuse_reply_entry(req, &e);
}

void OnGetattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info*) {
  if (ino != FUSE_ROOT_ID && ino != kFileIno) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  struct stat st;
  FillAttr(ino, &st);
  fuse_reply_attr(req, &st, 3600);
}

void OnOpen(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info* fi) {
  if (ino != kFileIno) {
    fuse_reply_err(req, EISDIR);
    return;
  }
  fi->keep_cache = 0;
  fi->direct_io = 0;
  fuse_reply_open(req, fi);
}

void OnRead(fuse_req_t req, fuse_ino_t, size_t size, off_t off, struct fuse_file_info*) {
  std::uint64_t o = static_cast<std::uint64_t>(off);
  if (o >= g_size) {
    fuse_reply_buf(req, nullptr, 0);
    return;
  }
  size_t n = static_cast<size_t>(std::min<std::uint64_t>(size, g_size - o));
  fuse_reply_buf(req, g_data + o, n);  // writev straight from the RAM file: one copy
}

void OnWrite(fuse_req_t req, fuse_ino_t, const char* buf, size_t size, off_t off,
             struct fuse_file_info*) {
  std::uint64_t o = static_cast<std::uint64_t>(off);
  if (o >= g_size || size > g_size - o) {
    fuse_reply_err(req, ENOSPC);
    return;
  }
  std::memcpy(g_data + o, buf, size);
  fuse_reply_write(req, size);
}

void OnFlushish(fuse_req_t req, fuse_ino_t, struct fuse_file_info*) { fuse_reply_err(req, 0); }
void OnFsync(fuse_req_t req, fuse_ino_t, int, struct fuse_file_info*) { fuse_reply_err(req, 0); }

void OnReaddir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info*) {
  if (ino != FUSE_ROOT_ID) {
    fuse_reply_err(req, ENOTDIR);
    return;
  }
  char buf[512];
  size_t used = 0;
  const char* names[] = {".", "..", kFileName};
  const fuse_ino_t inos[] = {FUSE_ROOT_ID, FUSE_ROOT_ID, kFileIno};
  for (int i = static_cast<int>(off); i < 3; ++i) {
    struct stat st;
    std::memset(&st, 0, sizeof(st));
    st.st_ino = inos[i];
    st.st_mode = i == 2 ? S_IFREG : S_IFDIR;
    size_t n = fuse_add_direntry(req, buf + used, std::min(sizeof(buf), size) - used, names[i], &st, i + 1);
    if (n > std::min(sizeof(buf), size) - used) break;
    used += n;
  }
  fuse_reply_buf(req, buf, used);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: fuse_ram_ceiling MOUNTPOINT SIZE_MIB [THREADS]\n");
    return 64;
  }
  const char* mnt = argv[1];
  g_size = std::strtoull(argv[2], nullptr, 10) << 20;
  int threads = argc > 3 ? std::atoi(argv[3]) : 16;
  if (g_size == 0 || threads < 1) {
    std::fprintf(stderr, "fuse_ram_ceiling: bad size or thread count\n");
    return 64;
  }
  void* p = mmap(nullptr, g_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (p == MAP_FAILED) {
    std::perror("fuse_ram_ceiling: mmap");
    return 71;
  }
  g_data = static_cast<char*>(p);
  // Random-looking content, so nothing downstream can shortcut zero pages.
  std::uint64_t x = 0x9e3779b97f4a7c15ull;
  for (std::uint64_t i = 0; i < g_size / 8; ++i) {
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    reinterpret_cast<std::uint64_t*>(g_data)[i] = x;
  }

  static const struct fuse_lowlevel_ops ops = [] {
    struct fuse_lowlevel_ops o;
    std::memset(&o, 0, sizeof(o));
    o.init = OnInit;
    o.lookup = OnLookup;
    o.getattr = OnGetattr;
    o.open = OnOpen;
    o.read = OnRead;
    o.write = OnWrite;
    o.flush = OnFlushish;
    o.release = OnFlushish;
    o.fsync = OnFsync;
    o.readdir = OnReaddir;
    return o;
  }();

  std::string opt = "fsname=ramceiling,subtype=ramceiling,default_permissions,max_read=" + std::to_string(kMaxIo);
  std::string a0 = "fuse_ram_ceiling", a1 = "-o";
  char* av[] = {a0.data(), a1.data(), opt.data()};
  struct fuse_args args = FUSE_ARGS_INIT(3, av);
  struct fuse_session* se = fuse_session_new(&args, &ops, sizeof(ops), nullptr);
  if (!se) return 70;
  if (fuse_set_signal_handlers(se) != 0 || fuse_session_mount(se, mnt) != 0) {
    fuse_session_destroy(se);
    return 70;
  }
  std::printf("mounted %s\n", mnt);
  std::fflush(stdout);
  struct fuse_loop_config* cfg = fuse_loop_cfg_create();
  fuse_loop_cfg_set_max_threads(cfg, threads);
  fuse_loop_cfg_set_idle_threads(cfg, threads);
  fuse_loop_cfg_set_clone_fd(cfg, 0);
  int rc = fuse_session_loop_mt(se, cfg);
  fuse_loop_cfg_destroy(cfg);
  fuse_session_unmount(se);
  fuse_remove_signal_handlers(se);
  fuse_session_destroy(se);
  return rc == 0 ? 0 : 1;
}
