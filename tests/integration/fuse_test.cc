// Integration tests for fusefs: an in-process FuseMount over FileDevice volumes in a temp dir.
// Needs root and /dev/fuse (DST_REQUIRE skips otherwise, fails under CI=true).
#include <dirent.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <QTemporaryDir>
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "dst/block_device.h"
#include "dst/file_device.h"
#include "dst/fuse/fuse_mount.h"
#include "test_env.h"

// ---- allocation counter (operator new of this whole process) ----
static std::atomic<unsigned long> g_allocs{0};
void* operator new(std::size_t n) {
  g_allocs.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) {
  g_allocs.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, std::align_val_t a) {
  g_allocs.fetch_add(1, std::memory_order_relaxed);
  void* p = nullptr;
  if (posix_memalign(&p, std::max<std::size_t>(static_cast<std::size_t>(a), sizeof(void*)), n ? n : 1) != 0)
    throw std::bad_alloc();
  return p;
}
void* operator new[](std::size_t n, std::align_val_t a) { return operator new(n, a); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  g_allocs.fetch_add(1, std::memory_order_relaxed);
  return std::malloc(n ? n : 1);
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  g_allocs.fetch_add(1, std::memory_order_relaxed);
  return std::malloc(n ? n : 1);
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

using namespace dst;

namespace {

// Forwards to a FileDevice but advertises its own geometry and capabilities, validates every
// request against them (so a misaligned or oversized submission fails the test) and counts ops.
class ShapedDevice : public BlockDevice {
 public:
  ShapedDevice(std::shared_ptr<BlockDevice> inner, DeviceInfo info) : inner_(std::move(inner)), info_(info) {}
  DeviceInfo Info() const override { return info_; }
  void Submit(IoRequest* req) override {
    Status st = ValidateRequest(info_, *req);
    if (!st.ok()) {
      bad.fetch_add(1);
      req->done(req, st);
      return;
    }
    if ((req->flags & kIoFua) && !info_.can_fua) {
      bad.fetch_add(1);
      req->done(req, Status::NotSupported());
      return;
    }
    switch (req->op) {
      case IoOp::kFlush: flushes.fetch_add(1); break;
      case IoOp::kWrite:
        writes.fetch_add(1);
        if (req->flags & kIoFua) fua_writes.fetch_add(1);
        break;
      case IoOp::kWriteZeroes: zeroes.fetch_add(1); break;
      case IoOp::kTrim: trims.fetch_add(1); break;
      case IoOp::kRead: reads.fetch_add(1); break;
    }
    inner_->Submit(req);
  }
  std::string Describe() const override { return "shaped " + inner_->Describe(); }

  std::atomic<int> bad{0}, flushes{0}, writes{0}, fua_writes{0}, zeroes{0}, trims{0}, reads{0};

 private:
  std::shared_ptr<BlockDevice> inner_;
  DeviceInfo info_;
};

struct Env {
  QTemporaryDir dir{"/tmp/dst-fuse-test-XXXXXX"};
  std::string mnt;
  std::unique_ptr<fuse::FuseMount> fm;

  bool Start(unsigned buffer_count = 16) {
    if (!dir.isValid()) return false;
    mnt = dir.path().toStdString() + "/mnt";
    if (::mkdir(mnt.c_str(), 0755) != 0) return false;
    fuse::FuseOptions o;
    o.mountpoint = mnt;
    o.buffer_count = buffer_count;
    auto r = fuse::FuseMount::Mount(o);
    if (!r.ok()) {
      qWarning("mount failed: %s", r.status().ToString().c_str());
      return false;
    }
    fm = std::move(r.value());
    return true;
  }
  std::string Backing(const std::string& name) const { return dir.path().toStdString() + "/" + name + ".raw"; }
  std::shared_ptr<FileDevice> MakeFile(const std::string& name, std::uint64_t size, bool ro = false) {
    FileDeviceOptions fo;
    fo.create = true;
    fo.size = size;
    auto d = FileDevice::Open(Backing(name), fo);
    if (!d.ok()) return nullptr;
    if (!ro) return d.value();
    FileDeviceOptions ro_o;
    ro_o.read_only = true;
    auto r = FileDevice::Open(Backing(name), ro_o);
    return r.ok() ? r.value() : nullptr;
  }
  std::string File(const std::string& name) const { return mnt + "/" + name + ".img"; }
  ~Env() {
    if (fm) fm->Unmount();
  }
};

std::vector<char> Pattern(std::size_t n, unsigned seed) {
  std::vector<char> v(n);
  std::mt19937 rng(seed);
  for (auto& c : v) c = static_cast<char>(rng());
  return v;
}

bool ReadBacking(const std::string& path, std::uint64_t off, std::size_t len, std::vector<char>* out) {
  out->assign(len, 0);
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return false;
  ssize_t n = ::pread(fd, out->data(), len, static_cast<off_t>(off));
  ::close(fd);
  return n == static_cast<ssize_t>(len);
}

std::set<std::string> ListDir(const std::string& dir) {
  std::set<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return names;
  while (struct dirent* e = ::readdir(d)) names.insert(e->d_name);
  ::closedir(d);
  return names;
}

struct AlignedBuf {
  explicit AlignedBuf(std::size_t n) : size(n) {
    if (posix_memalign(reinterpret_cast<void**>(&p), 4096, n) != 0) p = nullptr;
  }
  ~AlignedBuf() { std::free(p); }
  char* p = nullptr;
  std::size_t size;
};

}  // namespace

class FuseTest : public QObject {
  Q_OBJECT
 private slots:
  void init() { DST_REQUIRE(test::IsRoot() && test::HaveFuse(), "needs root and /dev/fuse"); }

  void listingSizeAndTwoVolumes() {
    Env env;
    QVERIFY(env.Start());
    auto a = env.MakeFile("a", 8 << 20);
    auto b = env.MakeFile("b", 4 << 20);
    QVERIFY(a && b);
    QVERIFY(env.fm->AddVolume("a", a).ok());
    QVERIFY(env.fm->AddVolume("b", b).ok());
    QCOMPARE(env.fm->AddVolume("a", b).code(), Status::Code::kExists);
    QCOMPARE(env.fm->AddVolume("x/y", b).code(), Status::Code::kInvalidArgument);
    auto names = ListDir(env.mnt);
    QVERIFY(names.count("a.img"));
    QVERIFY(names.count("b.img"));
    QCOMPARE(names.size(), std::size_t(4));  // . .. a.img b.img
    struct stat sa, sb, sa2;
    QCOMPARE(::stat(env.File("a").c_str(), &sa), 0);
    QCOMPARE(::stat(env.File("b").c_str(), &sb), 0);
    QCOMPARE(sa.st_size, off_t(8 << 20));
    QCOMPARE(sb.st_size, off_t(4 << 20));
    QVERIFY(S_ISREG(sa.st_mode));
    QVERIFY(sa.st_ino != sb.st_ino);
    QCOMPARE(::stat(env.File("a").c_str(), &sa2), 0);
    QCOMPARE(sa2.st_ino, sa.st_ino);
    QCOMPARE(::access((env.mnt + "/nope.img").c_str(), F_OK), -1);
    QCOMPARE(errno, ENOENT);

    // Both volumes carry independent data at the same offset.
    auto pa = Pattern(65536, 1), pb = Pattern(65536, 2);
    int fa = ::open(env.File("a").c_str(), O_RDWR);
    int fb = ::open(env.File("b").c_str(), O_RDWR);
    QVERIFY(fa >= 0 && fb >= 0);
    QCOMPARE(::pwrite(fa, pa.data(), pa.size(), 1 << 20), ssize_t(pa.size()));
    QCOMPARE(::pwrite(fb, pb.data(), pb.size(), 1 << 20), ssize_t(pb.size()));
    std::vector<char> back(65536);
    QCOMPARE(::pread(fa, back.data(), back.size(), 1 << 20), ssize_t(back.size()));
    QVERIFY(back == pa);
    QCOMPARE(::pread(fb, back.data(), back.size(), 1 << 20), ssize_t(back.size()));
    QVERIFY(back == pb);
    ::close(fa);
    ::close(fb);
    std::vector<char> raw;
    QVERIFY(ReadBacking(env.Backing("a"), 1 << 20, 65536, &raw));
    QVERIFY(raw == pa);
    QVERIFY(ReadBacking(env.Backing("b"), 1 << 20, 65536, &raw));
    QVERIFY(raw == pb);
    auto list = env.fm->ListVolumes();
    QCOMPARE(list.size(), std::size_t(2));
    // 1 MiB needs max_pages >= 256 (kernel >= 4.20; fs.fuse.max_pages_limit where it exists).
    const std::uint32_t mw = env.fm->negotiated_max_write();
    qInfo("negotiated max_write: %u", mw);
    QVERIFY(mw >= (128u << 10) && mw <= (1u << 20));
    QFile limit("/proc/sys/fs/fuse/max_pages_limit");
    if (limit.open(QIODevice::ReadOnly) && limit.readAll().trimmed().toUInt() >= 256) QCOMPARE(mw, 1u << 20);

    struct statvfs vfs;
    QCOMPARE(::statvfs(env.mnt.c_str(), &vfs), 0);
    QCOMPARE(std::uint64_t(vfs.f_blocks) * vfs.f_frsize, std::uint64_t(12) << 20);
  }

  // Aligned and unaligned buffered round trips on a 4 KiB-block device with a small max I/O, so
  // the RMW and chunking paths run; the shaped device rejects anything misaligned.
  void roundTripsAlignedAndUnaligned() {
    Env env;
    QVERIFY(env.Start());
    auto f = env.MakeFile("v", 16 << 20);
    QVERIFY(f);
    DeviceInfo info = f->Info();
    info.logical_block_size = 4096;
    info.max_io_bytes = 64 << 10;
    auto dev = std::make_shared<ShapedDevice>(f, info);
    QVERIFY(env.fm->AddVolume("v", dev).ok());
    std::vector<char> model(16 << 20, 0);
    int fd = ::open(env.File("v").c_str(), O_RDWR);
    QVERIFY(fd >= 0);
    struct Case { std::uint64_t off; std::size_t len; };
    const Case cases[] = {{0, 4096}, {1 << 20, 1 << 20}, {100, 1000}, {4095, 2}, {511, 300000},
                          {8192 + 7, 4096}, {(16 << 20) - 5000, 5000}, {3 << 20, 3 << 20}};
    unsigned seed = 10;
    for (const auto& c : cases) {
      auto p = Pattern(c.len, seed++);
      QCOMPARE(::pwrite(fd, p.data(), p.size(), static_cast<off_t>(c.off)), ssize_t(c.len));
      std::memcpy(model.data() + c.off, p.data(), c.len);
      std::vector<char> back(c.len);
      QCOMPARE(::pread(fd, back.data(), back.size(), static_cast<off_t>(c.off)), ssize_t(c.len));
      QVERIFY2(back == p, qPrintable(QString("offset %1 len %2").arg(c.off).arg(c.len)));
    }
    // Unaligned reads straddling earlier writes.
    std::vector<char> back(777777);
    QCOMPARE(::pread(fd, back.data(), back.size(), 333), ssize_t(back.size()));
    QVERIFY(std::equal(back.begin(), back.end(), model.begin() + 333));
    ::close(fd);
    QCOMPARE(dev->bad.load(), 0);
    std::vector<char> raw;
    QVERIFY(ReadBacking(env.Backing("v"), 0, model.size(), &raw));
    QVERIFY(raw == model);
  }

  void directIo() {
    Env env;
    QVERIFY(env.Start());
    auto f = env.MakeFile("d", 8 << 20);
    QVERIFY(f && env.fm->AddVolume("d", f).ok());
    int fd = ::open(env.File("d").c_str(), O_RDWR | O_DIRECT);
    QVERIFY(fd >= 0);
    AlignedBuf w(1 << 20), r(1 << 20);
    auto p = Pattern(1 << 20, 77);
    std::memcpy(w.p, p.data(), p.size());
    QCOMPARE(::pwrite(fd, w.p, 1 << 20, 2 << 20), ssize_t(1 << 20));
    QCOMPARE(::pread(fd, r.p, 1 << 20, 2 << 20), ssize_t(1 << 20));
    QVERIFY(std::memcmp(r.p, p.data(), 1 << 20) == 0);
    QCOMPARE(::pwrite(fd, w.p, 4096, 4096), ssize_t(4096));
    QCOMPARE(::pread(fd, r.p, 4096, 4096), ssize_t(4096));
    QVERIFY(std::memcmp(r.p, p.data(), 4096) == 0);
    // FUSE does not enforce O_DIRECT alignment: odd offsets reach the server, which must RMW.
    ssize_t n = ::pwrite(fd, w.p + 8, 1000, 100);
    if (n >= 0) {
      QCOMPARE(n, ssize_t(1000));
      QCOMPARE(::pread(fd, r.p, 1000, 100), ssize_t(1000));
      QVERIFY(std::memcmp(r.p, p.data() + 8, 1000) == 0);
      QCOMPARE(::pread(fd, r.p, 4096, 0), ssize_t(4096));
      QVERIFY(std::all_of(r.p, r.p + 100, [](char c) { return c == 0; }));
    } else {
      qInfo("unaligned O_DIRECT refused by the kernel: %s", strerror(errno));
    }
    QCOMPARE(::fsync(fd), 0);
    ::close(fd);
    std::vector<char> raw;
    QVERIFY(ReadBacking(env.Backing("d"), 2 << 20, 1 << 20, &raw));
    QVERIFY(std::memcmp(raw.data(), p.data(), 1 << 20) == 0);
  }

  void fsyncFlushAndFua() {
    Env env;
    QVERIFY(env.Start());
    auto f = env.MakeFile("s", 4 << 20);
    QVERIFY(f);
    auto dev = std::make_shared<ShapedDevice>(f, f->Info());
    QVERIFY(env.fm->AddVolume("s", dev).ok());
    auto p = Pattern(8192, 5);
    int fd = ::open(env.File("s").c_str(), O_RDWR);
    QVERIFY(fd >= 0);
    QCOMPARE(::pwrite(fd, p.data(), 8192, 0), ssize_t(8192));
    int before = dev->flushes.load();
    QCOMPARE(::fsync(fd), 0);
    QCOMPARE(dev->flushes.load(), before + 1);
    QCOMPARE(::fdatasync(fd), 0);
    QCOMPARE(dev->flushes.load(), before + 2);
    QCOMPARE(::pwrite(fd, p.data(), 4096, 8192), ssize_t(4096));
    before = dev->flushes.load();
    ::close(fd);  // close after a write -> FLUSH
    QCOMPARE(dev->flushes.load(), before + 1);
    fd = ::open(env.File("s").c_str(), O_RDONLY);
    QVERIFY(fd >= 0);
    std::vector<char> back(4096);
    QCOMPARE(::pread(fd, back.data(), 4096, 0), ssize_t(4096));
    before = dev->flushes.load();
    ::close(fd);  // no writes -> no FLUSH
    QCOMPARE(dev->flushes.load(), before);

    // O_DSYNC -> FUA writes.
    fd = ::open(env.File("s").c_str(), O_RDWR | O_DSYNC);
    QVERIFY(fd >= 0);
    int fua = dev->fua_writes.load();
    QCOMPARE(::pwrite(fd, p.data(), 4096, 65536), ssize_t(4096));
    QVERIFY(dev->fua_writes.load() > fua);
    ::close(fd);
    QCOMPARE(dev->bad.load(), 0);

    // A device without FUA: O_SYNC writes are followed by a FLUSH instead.
    auto f2 = env.MakeFile("s2", 4 << 20);
    DeviceInfo info = f2->Info();
    info.can_fua = false;
    auto dev2 = std::make_shared<ShapedDevice>(f2, info);
    QVERIFY(env.fm->AddVolume("s2", dev2).ok());
    fd = ::open(env.File("s2").c_str(), O_RDWR | O_SYNC);
    QVERIFY(fd >= 0);
    before = dev2->flushes.load();
    QCOMPARE(::pwrite(fd, p.data(), 4096, 0), ssize_t(4096));
    QVERIFY(dev2->flushes.load() > before);
    QCOMPARE(::pwrite(fd, p.data(), 100, 5), ssize_t(100));  // RMW path too
    ::close(fd);
    QCOMPARE(dev2->bad.load(), 0);
    QCOMPARE(dev2->fua_writes.load(), 0);
  }

  void fallocatePunchAndZero() {
    Env env;
    QVERIFY(env.Start());
    auto f = env.MakeFile("z", 4 << 20);
    QVERIFY(f);
    auto dev = std::make_shared<ShapedDevice>(f, f->Info());
    QVERIFY(env.fm->AddVolume("z", dev).ok());
    int fd = ::open(env.File("z").c_str(), O_RDWR);
    QVERIFY(fd >= 0);
    std::vector<char> ab(1 << 20, static_cast<char>(0xab));
    QCOMPARE(::pwrite(fd, ab.data(), ab.size(), 0), ssize_t(ab.size()));
    std::vector<char> model = ab;
    // Unaligned punch hole: partial blocks are zeroed by RMW, the middle by write-zeroes.
    QCOMPARE(::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 1000, 10000), 0);
    std::fill(model.begin() + 1000, model.begin() + 11000, 0);
    QCOMPARE(::fallocate(fd, FALLOC_FL_ZERO_RANGE, 65536, 65536), 0);
    std::fill(model.begin() + 65536, model.begin() + 131072, 0);
    QCOMPARE(::fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 200000, 10), 0);
    std::fill(model.begin() + 200000, model.begin() + 200010, 0);
    std::vector<char> back(ab.size());
    QCOMPARE(::pread(fd, back.data(), back.size(), 0), ssize_t(back.size()));
    QVERIFY(back == model);
    QVERIFY(dev->zeroes.load() >= 2);
    // Plain preallocation inside the volume is a no-op; growing it is refused.
    QCOMPARE(::fallocate(fd, 0, 0, 4096), 0);
    QCOMPARE(::fallocate(fd, 0, (4 << 20) - 4096, 8192), -1);
    QCOMPARE(errno, EOPNOTSUPP);
    QCOMPARE(::fallocate(fd, FALLOC_FL_ZERO_RANGE, (4 << 20) - 4096, 8192), -1);
    QCOMPARE(errno, EOPNOTSUPP);
    // Keep-size past the end is clamped.
    QCOMPARE(::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (4 << 20) - 4096, 1 << 20), 0);
    QCOMPARE(::fsync(fd), 0);
    ::close(fd);
    QCOMPARE(dev->bad.load(), 0);
    std::vector<char> raw;
    QVERIFY(ReadBacking(env.Backing("z"), 0, model.size(), &raw));
    QVERIFY(raw == model);
  }

  void eofClamping() {
    Env env;
    QVERIFY(env.Start());
    const off_t size = 1 << 20;
    auto f = env.MakeFile("e", size);
    QVERIFY(f && env.fm->AddVolume("e", f).ok());
    int fd = ::open(env.File("e").c_str(), O_RDWR);
    QVERIFY(fd >= 0);
    std::vector<char> buf(8192, 'x');
    QCOMPARE(::pread(fd, buf.data(), 4096, size - 100), ssize_t(100));
    QCOMPARE(::pread(fd, buf.data(), 4096, size), ssize_t(0));
    QCOMPARE(::pread(fd, buf.data(), 4096, size + 12345), ssize_t(0));
    errno = 0;
    QCOMPARE(::pwrite(fd, buf.data(), 4096, size), ssize_t(-1));
    QVERIFY(errno == ENOSPC || errno == EFBIG);
    std::fill(buf.begin(), buf.end(), 'x');
    ssize_t n = ::pwrite(fd, buf.data(), 8192, size - 4096);
    QCOMPARE(n, ssize_t(4096));  // short write up to the end
    QCOMPARE(::ftruncate(fd, 0), -1);
    QCOMPARE(errno, EPERM);
    QCOMPARE(::ftruncate(fd, size), 0);  // same size: accepted
    ::close(fd);
    // O_DIRECT at EOF too.
    fd = ::open(env.File("e").c_str(), O_RDONLY | O_DIRECT);
    QVERIFY(fd >= 0);
    AlignedBuf ab(8192);
    QCOMPARE(::pread(fd, ab.p, 8192, size - 4096), ssize_t(4096));
    QVERIFY(std::all_of(ab.p, ab.p + 4096, [](char c) { return c == 'x'; }));
    ::close(fd);
  }

  void addRemoveWhileMounted() {
    Env env;
    QVERIFY(env.Start());
    auto f = env.MakeFile("c", 1 << 20);
    QVERIFY(f && env.fm->AddVolume("c", f).ok());
    QVERIFY(ListDir(env.mnt).count("c.img"));
    int fd = ::open(env.File("c").c_str(), O_RDWR);
    QVERIFY(fd >= 0);
    // Really open (no close yet): refused at once, without the grace a just-closed file gets.
    QElapsedTimer busy_timer;
    busy_timer.start();
    QCOMPARE(env.fm->RemoveVolume("c").code(), Status::Code::kBusy);
    QVERIFY(!env.fm->WaitUnused("c"));
    QVERIFY2(busy_timer.elapsed() < 1000, qPrintable(QString::number(busy_timer.elapsed())));
    QCOMPARE(env.fm->ListVolumes().at(0).open_count, 1);
    QCOMPARE(::pwrite(fd, "hello", 5, 0), ssize_t(5));
    ::close(fd);
    QVERIFY(env.fm->RemoveVolume("c").ok());
    QCOMPARE(env.fm->RemoveVolume("c").code(), Status::Code::kNotFound);
    QVERIFY(!ListDir(env.mnt).count("c.img"));
    struct stat st;
    QCOMPARE(::stat(env.File("c").c_str(), &st), -1);
    QCOMPARE(errno, ENOENT);
    // Same name again, new device.
    auto g = env.MakeFile("c2", 2 << 20);
    QVERIFY(g && env.fm->AddVolume("c", g).ok());
    QCOMPARE(::stat(env.File("c").c_str(), &st), 0);
    QCOMPARE(st.st_size, off_t(2 << 20));
    QVERIFY(env.fm->RemoveVolume("c").ok());
    // Regression (CI, stop 21): remove right after close() must wait for the asynchronous
    // FUSE_RELEASE instead of calling the volume busy.  Each round closes and removes at once.
    for (int round = 0; round < 20; ++round) {
      auto h = env.MakeFile("h" + std::to_string(round), 1 << 20);
      QVERIFY(h && env.fm->AddVolume("h", h).ok());
      int hfd = ::open(env.File("h").c_str(), O_RDONLY);
      QVERIFY(hfd >= 0);
      char b[512];
      QCOMPARE(::pread(hfd, b, sizeof b, 0), ssize_t(sizeof b));
      ::close(hfd);
      QVERIFY2(env.fm->WaitUnused("h"), qPrintable(QString("round %1").arg(round)));  // the daemon's check
      const Status rs = env.fm->RemoveVolume("h");
      QVERIFY2(rs.ok(), qPrintable(QString("round %1: %2").arg(round).arg(QString::fromStdString(rs.ToString()))));
    }
  }

  void readOnlyVolume() {
    Env env;
    QVERIFY(env.Start());
    auto r = env.MakeFile("ro", 1 << 20, /*ro=*/true);
    QVERIFY(r && r->Info().read_only);
    QVERIFY(env.fm->AddVolume("ro", r).ok());
    struct stat st;
    QCOMPARE(::stat(env.File("ro").c_str(), &st), 0);
    QCOMPARE(st.st_mode & 0777, mode_t(0400));  // the default 0600 without the write bits
    int fd = ::open(env.File("ro").c_str(), O_RDWR);
    QCOMPARE(fd, -1);
    QVERIFY(errno == EROFS || errno == EPERM);
    fd = ::open(env.File("ro").c_str(), O_RDONLY);
    QVERIFY(fd >= 0);
    char b[512];
    QCOMPARE(::pread(fd, b, sizeof(b), 0), ssize_t(sizeof(b)));
    QCOMPARE(::pwrite(fd, b, sizeof(b), 0), ssize_t(-1));
    ::close(fd);
    // The namespace is fixed.
    QCOMPARE(::unlink(env.File("ro").c_str()), -1);
    QVERIFY(errno == EPERM || errno == EROFS);
    QCOMPARE(::open((env.mnt + "/new.img").c_str(), O_CREAT | O_RDWR, 0644), -1);
    QVERIFY(errno == EPERM || errno == EROFS);
  }

  void lockMemory() {
    Status st = fuse::LockMemory();
    QVERIFY2(st.ok(), st.ToString().c_str());
    munlockall();
  }

  // 2000 4 KiB O_DIRECT preads/pwrites from another thread after warm-up: no operator new
  // anywhere in this process (test thread, FUSE session threads, FileDevice workers).
  void steadyStateNoAllocation() {
    Env env;
    QVERIFY(env.Start());
    auto f = env.MakeFile("n", 8 << 20);
    QVERIFY(f && env.fm->AddVolume("n", f).ok());
    int fd = ::open(env.File("n").c_str(), O_RDWR | O_DIRECT);
    QVERIFY(fd >= 0);
    AlignedBuf buf(4096);
    std::memset(buf.p, 0x5a, 4096);
    std::atomic<int> phase{0};  // 0 warm-up, 1 wait, 2 measured run, 3 done
    std::atomic<int> errors{0};
    std::thread io([&] {
      auto run = [&](int n) {
        for (int i = 0; i < n; ++i) {
          off_t off = static_cast<off_t>((i * 7919) % 2048) * 4096;
          ssize_t r = (i & 1) ? ::pread(fd, buf.p, 4096, off) : ::pwrite(fd, buf.p, 4096, off);
          if (r != 4096) errors.fetch_add(1);
        }
      };
      run(500);
      phase.store(1);
      while (phase.load() != 2) std::this_thread::yield();
      run(2000);
      phase.store(3);
    });
    while (phase.load() != 1) std::this_thread::yield();
    const unsigned long before = g_allocs.load();
    phase.store(2);
    while (phase.load() != 3) std::this_thread::yield();
    const unsigned long after = g_allocs.load();
    io.join();
    ::close(fd);
    QCOMPARE(errors.load(), 0);
    QCOMPARE(after - before, 0ul);
  }

  void unmountTwiceAndBusyUnmount() {
    Env env;
    QVERIFY(env.Start());
    auto f = env.MakeFile("u", 1 << 20);
    QVERIFY(f && env.fm->AddVolume("u", f).ok());
    int fd = ::open(env.File("u").c_str(), O_RDWR);
    QVERIFY(fd >= 0);
    // Unmount while a file is open: detach, grace period, abort; must not hang.
    env.fm->Unmount();
    env.fm->Unmount();
    char b[16];
    QCOMPARE(::pread(fd, b, sizeof(b), 0), ssize_t(-1));
    ::close(fd);
    QVERIFY(!env.fm->AddVolume("u2", f).ok());
  }
};

DST_TEST_MAIN(FuseTest)
#include "fuse_test.moc"
