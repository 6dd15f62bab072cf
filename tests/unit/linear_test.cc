// Unit tests for LinearDevice: exact geometry, splitting at boundaries, flush, errors, growth,
// context pool exhaustion.
#include <cstring>
#include <random>
#include <thread>

#include "dst/linear_device.h"
#include "fake_device.h"
#include "test_env.h"

using namespace dst;
using dst::test::FakeDevice;
using dst::test::FakeDeviceOptions;

namespace {
std::shared_ptr<FakeDevice> Fake(std::uint64_t size, bool async = false, std::uint32_t bs = 512,
                                 const char* name = "fake") {
  FakeDeviceOptions o;
  o.size = size;
  o.async = async;
  o.block_size = bs;
  o.name = name;
  return std::make_shared<FakeDevice>(o);
}
}  // namespace

class LinearTest : public QObject {
  Q_OBJECT
 private slots:
  void geometryRoundsToBlockSize() {
    // 1-byte aligned sizes: each leg is rounded down to the array block size (4096 here).
    auto a = Fake(10000);            // -> 8192
    auto b = Fake(4096 * 3 + 1, false, 4096);  // -> 12288
    auto c = Fake(5000);             // -> 4096
    auto r = LinearDevice::Create({a, b, c});
    QVERIFY(r.ok());
    auto lin = r.value();
    DeviceInfo i = lin->Info();
    QCOMPARE(i.logical_block_size, 4096u);
    QCOMPARE(i.size, std::uint64_t(8192 + 12288 + 4096));
    auto t = lin->Table();
    QCOMPARE(t.size(), std::size_t(3));
    QCOMPARE(t[1].start, std::uint64_t(8192));
    QCOMPARE(t[2].start, std::uint64_t(8192 + 12288));
    QCOMPARE(t[2].len, std::uint64_t(4096));
    // A leg smaller than a block is refused.
    QVERIFY(!LinearDevice::Create({Fake(100)}).ok());
    QVERIFY(!LinearDevice::Create({}).ok());
  }

  void capabilitiesAreAnded() {
    FakeDeviceOptions o;
    o.size = 1 << 20;
    o.can_trim = false;
    o.max_io_bytes = 128 << 10;
    auto a = std::make_shared<FakeDevice>(o);
    auto b = Fake(1 << 20);
    auto lin = LinearDevice::Create({a, b}).value();
    QVERIFY(!lin->Info().can_trim);
    QVERIFY(lin->Info().can_write_zeroes);
    QCOMPARE(lin->Info().max_io_bytes, 128u << 10);
  }

  void splitsAtBoundaries() {
    for (bool async : {false, true}) {
      auto a = Fake(3 * 4096, async), b = Fake(2 * 4096, async), c = Fake(5 * 4096, async);
      auto lin = LinearDevice::Create({a, b, c}).value();
      const std::uint64_t size = lin->Info().size;
      QCOMPARE(size, std::uint64_t(10 * 4096));
      std::vector<char> model(size, 0);
      std::mt19937_64 rng(7);
      // Writes at and across every boundary, checked against a flat model.
      std::vector<std::pair<std::uint64_t, std::uint32_t>> ios = {
          {3 * 4096 - 512, 1024}, {5 * 4096 - 512, 512 * 3}, {0, 10 * 4096}, {3 * 4096, 2 * 4096},
          {2 * 4096, 4 * 4096}, {size - 512, 512}, {0, 512}};
      for (int k = 0; k < 200; ++k) {
        std::uint64_t off = (rng() % (size / 512)) * 512;
        std::uint32_t len = static_cast<std::uint32_t>(512 * (1 + rng() % ((size - off) / 512)));
        ios.push_back({off, len});
      }
      for (auto [off, len] : ios) {
        std::vector<char> buf(len);
        for (auto& ch : buf) ch = static_cast<char>(rng());
        QVERIFY(WriteSync(*lin, off, buf.data(), len).ok());
        std::memcpy(model.data() + off, buf.data(), len);
        std::vector<char> back(len);
        QVERIFY(ReadSync(*lin, off, back.data(), len).ok());
        QVERIFY(back == buf);
      }
      // The bytes landed at the exact child offsets.
      std::vector<char> flat;
      for (auto& d : {a, b, c}) {
        auto v = d->Contents();
        flat.insert(flat.end(), v.begin(), v.end());
      }
      QVERIFY(flat == model);
      // Out of range / misaligned requests are refused without touching children.
      std::vector<char> x(1024);
      QVERIFY(!ReadSync(*lin, size - 512, x.data(), 1024).ok());
      QVERIFY(!ReadSync(*lin, 100, x.data(), 512).ok());
    }
  }

  void manyTinyLegsUseWaves() {
    // A request spanning more legs than a context has child slots.
    std::vector<std::shared_ptr<BlockDevice>> legs;
    std::vector<std::shared_ptr<FakeDevice>> fakes;
    for (int i = 0; i < 40; ++i) {
      auto f = Fake(512 + static_cast<std::uint64_t>(i % 3), i % 2 == 0);
      fakes.push_back(f);
      legs.push_back(f);
    }
    auto lin = LinearDevice::Create(legs).value();
    QCOMPARE(lin->Info().size, std::uint64_t(40 * 512));
    std::vector<char> buf(40 * 512);
    for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<char>(i / 512);
    QVERIFY(WriteSync(*lin, 0, buf.data(), static_cast<std::uint32_t>(buf.size())).ok());
    for (int i = 0; i < 40; ++i) {
      char ch;
      fakes[static_cast<std::size_t>(i)]->Peek(0, &ch, 1);
      QCOMPARE(int(ch), i);
    }
    QVERIFY(FlushSync(*lin).ok());
    for (auto& f : fakes) QCOMPARE(f->flushes(), std::uint64_t(1));
  }

  void childErrorFailsRequest() {
    auto a = Fake(4096), b = Fake(4096);
    auto lin = LinearDevice::Create({a, b}).value();
    b->SetFailWrites(true);
    std::vector<char> buf(8192, 'x');
    Status s = WriteSync(*lin, 0, buf.data(), 8192);
    QVERIFY(s.IsIoError());
    QVERIFY(WriteSync(*lin, 0, buf.data(), 4096).ok());  // only leg a: fine
    b->SetFailFlush(true);
    QVERIFY(!FlushSync(*lin).ok());
  }

  void appendLegWhileLive() {
    auto a = Fake(8192, true);
    auto lin = LinearDevice::Create({a}).value();
    std::atomic<bool> stop{false};
    std::atomic<int> errors{0};
    std::thread io([&] {
      std::vector<char> buf(4096, 'q');
      while (!stop) {
        if (!WriteSync(*lin, 4096, buf.data(), 4096).ok()) ++errors;
      }
    });
    auto b = Fake(3 * 4096 + 100, true);
    QVERIFY(lin->AppendLeg(b).ok());
    QCOMPARE(lin->Info().size, std::uint64_t(8192 + 3 * 4096));
    std::vector<char> buf(8192, 'z');
    QVERIFY(WriteSync(*lin, 4096, buf.data(), 8192).ok());  // crosses into the new leg
    stop = true;
    io.join();
    QCOMPARE(errors.load(), 0);
    char ch;
    b->Peek(0, &ch, 1);
    QCOMPARE(ch, 'z');
    // A leg with a larger block size than the array is refused.
    QVERIFY(!lin->AppendLeg(Fake(1 << 20, false, 4096)).ok());
  }

  void poolDryQueuesParents() {
    auto a = Fake(1 << 20, true), b = Fake(1 << 20, true);
    LinearOptions o;
    o.max_inflight = 2;
    auto lin = LinearDevice::Create({a, b}, o).value();
    a->Hold(true);
    b->Hold(true);
    const int n = 32;
    std::vector<IoRequest> reqs(n);
    std::vector<std::vector<char>> bufs(n, std::vector<char>(4096));
    std::atomic<int> done{0};
    for (int i = 0; i < n; ++i) {
      auto& r = reqs[static_cast<std::size_t>(i)];
      r.op = IoOp::kWrite;
      r.offset = static_cast<std::uint64_t>(i) * 65536;
      r.length = 4096;
      std::fill(bufs[static_cast<std::size_t>(i)].begin(), bufs[static_cast<std::size_t>(i)].end(), char('a' + i % 26));
      r.data = bufs[static_cast<std::size_t>(i)].data();
      r.ctx = &done;
      r.done = [](IoRequest* q, Status s) {
        if (s.ok()) static_cast<std::atomic<int>*>(q->ctx)->fetch_add(1);
      };
      lin->Submit(&r);
    }
    QCOMPARE(done.load(), 0);
    a->Hold(false);
    b->Hold(false);
    for (int i = 0; i < 2000 && done.load() < n; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    QCOMPARE(done.load(), n);
  }
};

DST_TEST_MAIN(LinearTest)
#include "linear_test.moc"
