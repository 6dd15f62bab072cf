// Unit tests for core/: Status, request validation, BufferPool, FileDevice.
#include <fcntl.h>
#include <unistd.h>

#include <QTemporaryDir>
#include <cstring>
#include <thread>
#include <vector>

#include "dst/block_device.h"
#include "dst/buffer_pool.h"
#include "dst/file_device.h"
#include "dst/status.h"
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
};

DST_TEST_MAIN(CoreTest)
#include "core_test.moc"
