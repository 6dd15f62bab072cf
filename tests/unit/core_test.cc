// Unit tests for core/: Status, request validation, BufferPool, FileDevice.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <QTemporaryDir>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <thread>
#include <vector>

#include "dst/block_device.h"
#include "dst/buffer_pool.h"
#include "dst/counting_device.h"
#include "dst/file_device.h"
#include "dst/latency_histogram.h"
#include "dst/log_escape.h"
#include "dst/status.h"
#include "fake_device.h"
#include "test_env.h"

using namespace dst;

class CoreTest : public QObject {
  Q_OBJECT
 private slots:
  void statusBasics() {
    Status ok;
    QVERIFY(ok.ok());
    QCOMPARE(ok.ToErrno(), 0);
    Status e = Status::IoError("disk gone");
    QVERIFY(!e.ok());
    QVERIFY(e.IsIoError());
    QCOMPARE(e.ToErrno(), EIO);
    QCOMPARE(QString::fromStdString(e.ToString()), QString("I/O error: disk gone"));
    Status f = Status::FromErrno(ENOENT, "open x");
    QVERIFY(f.IsNotFound());
    QVERIFY(f.message().find("open x") != std::string::npos);
    QCOMPARE(e.WithContext("leg 1").message(), std::string("leg 1: disk gone"));
    Result<int> r(5);
    QVERIFY(r.ok());
    QCOMPARE(r.value(), 5);
    Result<int> bad(Status::NotFound());
    QVERIFY(!bad.ok());
    QVERIFY(bad.status().IsNotFound());
  }

  void validateRequest() {
    DeviceInfo info;
    info.size = 1 << 20;
    IoRequest r;
    r.op = IoOp::kRead;
    r.offset = 0;
    r.length = 4096;
    QVERIFY(ValidateRequest(info, r).ok());
    r.offset = 1;  // misaligned
    QCOMPARE(ValidateRequest(info, r).code(), Status::Code::kInvalidArgument);
    r.offset = (1 << 20) - 512;
    r.length = 1024;  // runs past the end
    QCOMPARE(ValidateRequest(info, r).code(), Status::Code::kOutOfRange);
    r.offset = UINT64_MAX - 511;  // overflow must not wrap
    r.length = 1024;
    QCOMPARE(ValidateRequest(info, r).code(), Status::Code::kOutOfRange);
    info.read_only = true;
    r.op = IoOp::kWrite;
    r.offset = 0;
    r.length = 512;
    QCOMPARE(ValidateRequest(info, r).code(), Status::Code::kReadOnly);
    r.op = IoOp::kFlush;
    QVERIFY(ValidateRequest(info, r).ok());
  }

  void bufferPool() {
    BufferPool pool(65536, 4);
    std::vector<char*> got;
    for (int i = 0; i < 4; ++i) {
      char* b = pool.TryGet();
      QVERIFY(b != nullptr);
      QCOMPARE(reinterpret_cast<uintptr_t>(b) % 4096, uintptr_t(0));
      QVERIFY(pool.Owns(b));
      got.push_back(b);
    }
    QVERIFY(pool.TryGet() == nullptr);
    std::thread t([&] {
      char* b = pool.Get();  // waits for the Put below
      pool.Put(b);
    });
    QTest::qWait(20);
    pool.Put(got.back());
    t.join();
    QCOMPARE(pool.available(), size_t(1));
  }

  void fileDeviceRoundTrip_data() {
    QTest::addColumn<bool>("direct");
    QTest::newRow("buffered") << false;
    QTest::newRow("o_direct") << true;
  }
  void fileDeviceRoundTrip() {
    QFETCH(bool, direct);
    QTemporaryDir dir;
    std::string path = dir.path().toStdString() + "/disk.img";
    FileDeviceOptions o;
    o.create = true;
    o.size = 8 << 20;
    o.direct_io = direct;
    auto dev = FileDevice::Open(path, o);
    if (!dev.ok() && direct) QSKIP("O_DIRECT not supported on the temp filesystem");
    QVERIFY2(dev.ok(), dev.status().ToString().c_str());
    QCOMPARE(dev.value()->Info().size, uint64_t(8 << 20));
    BufferPool pool(1 << 20, 2);
    char* w = pool.Get();
    char* r = pool.Get();
    for (int i = 0; i < (1 << 20); ++i) w[i] = char(i * 7 + 3);
    QVERIFY(WriteSync(*dev.value(), 4096, w, 1 << 20).ok());
    QVERIFY(FlushSync(*dev.value()).ok());
    QVERIFY(ReadSync(*dev.value(), 4096, r, 1 << 20).ok());
    QVERIFY(std::memcmp(w, r, 1 << 20) == 0);
    // Unaligned buffer goes through the buffered fd.
    QVERIFY(WriteSync(*dev.value(), 512, w + 1, 512).ok());
    QVERIFY(ReadSync(*dev.value(), 512, r + 3, 512).ok());
    QVERIFY(std::memcmp(w + 1, r + 3, 512) == 0);
    // Write zeroes and trim read back as zero.
    IoRequest z;
    z.op = IoOp::kWriteZeroes;
    z.offset = 4096;
    z.length = 65536;
    QVERIFY(SubmitSync(*dev.value(), z).ok());
    QVERIFY(ReadSync(*dev.value(), 4096, r, 65536).ok());
    for (int i = 0; i < 65536; ++i) QCOMPARE(r[i], char(0));
    IoRequest t;
    t.op = IoOp::kTrim;
    t.offset = 1 << 20;
    t.length = 65536;
    QVERIFY(SubmitSync(*dev.value(), t).ok());
    // Out of range is refused, not executed.
    QCOMPARE(ReadSync(*dev.value(), 8 << 20, r, 512).code(), Status::Code::kOutOfRange);
    pool.Put(w);
    pool.Put(r);
  }

  // On tmpfs the page cache is the storage: requests up to 64 KiB (FUA too) and flushes run
  // inline on the submitting thread; larger ones go to a worker so an event loop is not held
  // up copying them.  Either way the data round-trips.
  void fileDeviceTmpfsInline() {
    struct statfs sfs {};
    DST_REQUIRE(::statfs("/dev/shm", &sfs) == 0 && sfs.f_type == 0x01021994, "/dev/shm is not a tmpfs");
    QTemporaryDir dir("/dev/shm/dst-core-test-XXXXXX");
    QVERIFY(dir.isValid());
    FileDeviceOptions o;
    o.create = true;
    o.size = 4 << 20;
    auto dev = FileDevice::Open(dir.path().toStdString() + "/disk.img", o);
    QVERIFY2(dev.ok(), dev.status().ToString().c_str());
    struct Probe {
      std::atomic<bool> done{false};
      std::thread::id where;
      Status st;
    };
    auto submit = [&](IoOp op, std::uint64_t off, std::uint32_t len, char* p, std::uint32_t flags, Probe* pr) {
      IoRequest q;
      q.op = op;
      q.offset = off;
      q.length = len;
      q.data = p;
      q.flags = flags;
      q.ctx = pr;
      q.done = [](IoRequest* r, Status st) {
        auto* x = static_cast<Probe*>(r->ctx);
        x->where = std::this_thread::get_id();
        x->st = st;
        x->done.store(true);
      };
      dev.value()->Submit(&q);
      const bool inline_done = pr->done.load();
      while (!pr->done.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      return inline_done && pr->where == std::this_thread::get_id();
    };
    std::vector<char> w(1 << 20), r(1 << 20);
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = char(i * 13 + 5);
    Probe p1, p2, p3, p4, p5;
    QVERIFY(submit(IoOp::kWrite, 0, 4096, w.data(), 0, &p1));
    QVERIFY(submit(IoOp::kWrite, 65536, 65536, w.data() + 65536, kIoFua, &p2));
    QVERIFY(submit(IoOp::kFlush, 0, 0, nullptr, 0, &p3));
    QVERIFY(!submit(IoOp::kWrite, 1 << 20, 1 << 20, w.data(), 0, &p4));  // worker
    QVERIFY(submit(IoOp::kRead, 0, 4096, r.data(), 0, &p5));
    for (Probe* p : {&p1, &p2, &p3, &p4, &p5}) QVERIFY(p->st.ok());
    QVERIFY(std::memcmp(r.data(), w.data(), 4096) == 0);
    QVERIFY(ReadSync(*dev.value(), 1 << 20, r.data(), 1 << 20).ok());
    QVERIFY(r == w);
  }

  void fileDeviceReadOnly() {
    QTemporaryDir dir;
    std::string path = dir.path().toStdString() + "/ro.img";
    {
      FileDeviceOptions o;
      o.create = true;
      o.size = 1 << 20;
      QVERIFY(FileDevice::Open(path, o).ok());
    }
    FileDeviceOptions o;
    o.read_only = true;
    auto dev = FileDevice::Open(path, o);
    QVERIFY(dev.ok());
    char buf[512] = {};
    QCOMPARE(WriteSync(*dev.value(), 0, buf, 512).code(), Status::Code::kReadOnly);
    QVERIFY(ReadSync(*dev.value(), 0, buf, 512).ok());
    QVERIFY(!FileDevice::Open(dir.path().toStdString() + "/missing.img").ok());
  }

  // Issue 11: peer strings in log lines cannot break or forge lines, and are bounded.
  void escapeForLog() {
    QCOMPARE(dst::EscapeForLog("disk-1.img"), std::string("disk-1.img"));
    QCOMPARE(dst::EscapeForLog("a\nFAKE: x\r\t"), std::string("a\\x0aFAKE: x\\x0d\\x09"));
    QCOMPARE(dst::EscapeForLog(std::string("n\0\x7f\xc3\xa9\\", 6)),
             std::string("n\\x00\\x7f\\xc3\\xa9\\x5c"));
    std::string big(5000, 'a');
    std::string e = dst::EscapeForLog(big);
    QCOMPARE(e, std::string(dst::kMaxLogField, 'a') + "...(5000 bytes)");
  }

  // Issue 11: an image FileDevice creates, and a file EnsurePrivateFile creates, are 0600 even
  // under umask 0 or 0277; existing files keep their mode unless tightened.
  void createdFilesArePrivate() {
    QTemporaryDir dir;
    auto mode = [](const std::string& p) {
      struct stat st;
      return ::stat(p.c_str(), &st) == 0 ? int(st.st_mode & 07777) : -1;
    };
    for (mode_t mask : {mode_t(0), mode_t(0277)}) {
      mode_t old = ::umask(mask);
      std::string img = dir.path().toStdString() + "/img" + std::to_string(mask);
      FileDeviceOptions o;
      o.create = true;
      o.size = 1 << 20;
      bool ok = FileDevice::Open(img, o).ok();
      std::string db = dir.path().toStdString() + "/db" + std::to_string(mask);
      Status st = EnsurePrivateFile(db, false);
      ::umask(old);
      QVERIFY(ok && st.ok());
      QCOMPARE(mode(img), 0600);
      QCOMPARE(mode(db), 0600);
    }
    std::string theirs = dir.path().toStdString() + "/theirs";
    ::close(::open(theirs.c_str(), O_CREAT | O_WRONLY, 0600));
    ::chmod(theirs.c_str(), 0664);
    FileDeviceOptions o;
    o.create = true;
    o.size = 1 << 20;
    QVERIFY(FileDevice::Open(theirs, o).ok());
    QCOMPARE(mode(theirs), 0664);
    QVERIFY(EnsurePrivateFile(theirs, false).ok());
    QCOMPARE(mode(theirs), 0664);
    QVERIFY(EnsurePrivateFile(theirs, true).ok());
    QCOMPARE(mode(theirs), 0600);
  }

  // Regression (issue 9, 11a): create+size on an existing image truncated it (1 MiB of data
  // became 4 KiB).  A smaller size is refused naming both sizes; a larger one needs grow.
  void fileDeviceNeverShrinks() {
    QTemporaryDir dir;
    std::string path = dir.path().toStdString() + "/img";
    std::vector<char> w(1 << 20, 'x');
    {
      FileDeviceOptions o;
      o.create = true;
      o.size = 1 << 20;
      auto dev = FileDevice::Open(path, o);
      QVERIFY(dev.ok());
      QVERIFY(WriteSync(*dev.value(), 0, w.data(), w.size()).ok());
    }
    FileDeviceOptions small;
    small.create = true;
    small.size = 4096;
    small.grow = true;  // grow never allows shrinking
    auto r = FileDevice::Open(path, small);
    QVERIFY(!r.ok());
    QVERIFY2(r.status().message().find("1048576") != std::string::npos &&
                 r.status().message().find("4096") != std::string::npos &&
                 r.status().message().find("never shrunk") != std::string::npos,
             r.status().message().c_str());
    QCOMPARE(std::filesystem::file_size(path), std::uintmax_t(1) << 20);

    FileDeviceOptions big;
    big.create = true;
    big.size = 2 << 20;
    r = FileDevice::Open(path, big);
    QVERIFY(!r.ok());
    QVERIFY2(r.status().message().find("grow") != std::string::npos, r.status().message().c_str());
    QCOMPARE(std::filesystem::file_size(path), std::uintmax_t(1) << 20);

    big.grow = true;
    r = FileDevice::Open(path, big);
    QVERIFY(r.ok());
    QCOMPARE(r.value()->Info().size, std::uint64_t(2) << 20);
    std::vector<char> back(1 << 20);
    QVERIFY(ReadSync(*r.value(), 0, back.data(), back.size()).ok());
    QVERIFY(back == w);

    FileDeviceOptions same;  // the same size is fine without grow
    same.create = true;
    same.size = 2 << 20;
    QVERIFY(FileDevice::Open(path, same).ok());
  }

  // Per-leg counters (issue 9 item 4): ops, bytes and errors of what passes through.
  void countingDevice() {
    QTemporaryDir dir;
    FileDeviceOptions o;
    o.create = true;
    o.size = 1 << 20;
    auto file = FileDevice::Open(dir.path().toStdString() + "/c.img", o);
    QVERIFY(file.ok());
    CountingDevice dev(file.value(), 2);
    QCOMPARE(dev.Info().size, std::uint64_t(1) << 20);
    std::vector<char> b(8192, 'c');
    QVERIFY(WriteSync(dev, 0, b.data(), 8192).ok());
    QVERIFY(ReadSync(dev, 0, b.data(), 4096).ok());
    QVERIFY(ReadSync(dev, 4096, b.data(), 4096).ok());
    QVERIFY(!ReadSync(dev, 1 << 20, b.data(), 4096).ok());  // past the end: an error
    QVERIFY(FlushSync(dev).ok());
    DeviceCounters c = dev.Counters();
    QCOMPARE(c.writes, std::uint64_t(1));
    QCOMPARE(c.bytes_written, std::uint64_t(8192));
    QCOMPARE(c.reads, std::uint64_t(3));
    QCOMPARE(c.bytes_read, std::uint64_t(12288));
    QCOMPARE(c.errors, std::uint64_t(1));
    QCOMPARE(c.other, std::uint64_t(1));
    QCOMPARE(c.uncounted, std::uint64_t(0));
    // Latency per class: every watched completion is in exactly one histogram.
    using C = CountingDevice::OpClass;
    QCOMPARE(dev.Latency(C::kRead).Get().count, std::uint64_t(3));
    QCOMPARE(dev.Latency(C::kWrite).Get().count, std::uint64_t(1));
    QCOMPARE(dev.Latency(C::kOther).Get().count, std::uint64_t(1));
    QVERIFY(dev.Latency(C::kRead).Get().sum_ns > 0);
  }

  // In-flight (issue 14 item 1): watched requests between Submit and completion.
  void countingDeviceInflight() {
    test::FakeDeviceOptions fo;
    fo.async = true;
    auto fake = std::make_shared<test::FakeDevice>(fo);
    fake->Hold(true);
    CountingDevice dev(fake, 4);
    std::atomic<int> done{0};
    std::vector<char> b(4096 * 3);
    IoRequest r[3];
    for (int i = 0; i < 3; ++i) {
      r[i].op = i == 0 ? IoOp::kWrite : IoOp::kRead;
      r[i].offset = 4096u * i;
      r[i].length = 4096;
      r[i].data = b.data() + 4096 * i;
      r[i].ctx = &done;
      r[i].done = [](IoRequest* q, Status) { static_cast<std::atomic<int>*>(q->ctx)->fetch_add(1); };
      dev.Submit(&r[i]);
    }
    QCOMPARE(dev.Counters().inflight, std::uint64_t(3));
    fake->Hold(false);
    QTRY_COMPARE_WITH_TIMEOUT(done.load(), 3, 5000);
    QCOMPARE(dev.Counters().inflight, std::uint64_t(0));
  }

  // Bucket i holds latencies in (16 us << (i-1), 16 us << i]; past the last bound only +Inf.
  void latencyHistogramBuckets() {
    using H = LatencyHistogram;
    QCOMPARE(H::BucketOf(0), 0);
    QCOMPARE(H::BucketOf(16'000), 0);
    QCOMPARE(H::BucketOf(16'001), 1);
    QCOMPARE(H::BucketOf(32'000), 1);
    QCOMPARE(H::BucketOf(32'001), 2);
    QCOMPARE(H::BucketOf(1'000'000), 6);  // 1 ms: (512 us, 1.024 ms]
    QCOMPARE(H::BucketOf(H::BoundNs(H::kBuckets - 1)), H::kBuckets - 1);
    QCOMPARE(H::BucketOf(H::BoundNs(H::kBuckets - 1) + 1), H::kBuckets);
    QCOMPARE(H::BucketOf(~0ull / 2), H::kBuckets);
    for (int i = 0; i < H::kBuckets; ++i) {
      QCOMPARE(H::BucketOf(H::BoundNs(i)), i);
      if (i > 0) QCOMPARE(H::BucketOf(H::BoundNs(i - 1) + 1), i);
    }
    H h;
    h.Observe(10'000);
    h.Observe(20'000);
    h.Observe(20'000'000'000ull);  // 20 s: only +Inf
    const H::Snapshot s = h.Get();
    QCOMPARE(s.count, std::uint64_t(3));
    QCOMPARE(s.sum_ns, std::uint64_t(20'000'030'000ull));
    QCOMPARE(s.Cumulative(0), std::uint64_t(1));
    QCOMPARE(s.Cumulative(1), std::uint64_t(2));
    QCOMPARE(s.Cumulative(H::kBuckets - 1), std::uint64_t(2));
  }
};

DST_TEST_MAIN(CoreTest)
#include "core_test.moc"
