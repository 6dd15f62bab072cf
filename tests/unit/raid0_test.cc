// Unit tests for the raid0 layer, built through the layer registry as the daemon builds it:
// key checks, geometry, striping across chunk boundaries and legs (checked against the legs'
// bytes), waves of pieces, errors from one leg, flush to every leg, out-of-range requests and
// a dry context pool.
#include <cstring>
#include <random>
#include <thread>

#include "dst/daemon/config.h"
#include "dst/layer.h"
#include "fake_device.h"
#include "test_env.h"

using namespace dst;
using dst::test::FakeDevice;
using dst::test::FakeDeviceOptions;

namespace {

std::shared_ptr<FakeDevice> Fake(std::uint64_t size, bool async = false, std::uint32_t bs = 512) {
  FakeDeviceOptions o;
  o.size = size;
  o.async = async;
  o.block_size = bs;
  o.max_io_bytes = 4u << 20;
  return std::make_shared<FakeDevice>(o);
}

const LayerInfo& Raid0() {
  const LayerInfo* l = FindLayer("raid0");
  if (!l) qFatal("raid0 is not registered");
  return *l;
}

Result<std::shared_ptr<BlockDevice>> Make(const std::vector<std::shared_ptr<FakeDevice>>& fakes,
                                          std::string chunk = {}) {
  LayerParams given;
  if (!chunk.empty()) given["chunk"] = chunk;
  auto params = ResolveLayerParams(Raid0(), given);
  if (!params.ok()) return params.status();
  std::vector<std::shared_ptr<BlockDevice>> legs(fakes.begin(), fakes.end());
  return Raid0().create(legs, params.value());
}

// Where array byte `off` lives: (leg, leg offset).
std::pair<std::size_t, std::uint64_t> Place(std::uint64_t off, std::uint64_t chunk, std::size_t n) {
  std::uint64_t k = off / chunk;
  return {std::size_t(k % n), k / n * chunk + off % chunk};
}

}  // namespace

class Raid0Test : public QObject {
  Q_OBJECT
 private slots:
  void registeredWithRules() {
    const LayerInfo& l = Raid0();
    QCOMPARE(l.legs.min_legs, 2);
    QVERIFY(l.legs.same_size);
    QVERIFY(!l.legs.read_only_legs);
    QVERIFY(l.legs.change == LegChange::kFixed);
    QVERIFY(!l.redundant);
    QVERIFY(CheckLegCount(l, 1).ToString().find("a raid0 needs at least 2 legs") != std::string::npos);
    QVERIFY(CheckLegCount(l, 2).ok());
    const LayerKey* chunk = FindLayerKey(l, "chunk");
    QVERIFY(chunk);
    QCOMPARE(chunk->default_value, std::string("65536"));
    auto p = ResolveLayerParams(l, {});
    QVERIFY(p.ok());
    QCOMPARE(p.value().at("chunk"), std::string("65536"));
    // chunk: a power of two, a multiple of 4K.
    for (const char* bad : {"2048", "12288", "0", "536870912", "64K"})
      QVERIFY2(!ResolveLayerParams(l, {{"chunk", bad}}).ok(), bad);
    QVERIFY(ResolveLayerParams(l, {{"chunk", "4096"}}).ok());
    QVERIFY(!ResolveLayerParams(l, {{"stripe", "4096"}}).ok());  // not a raid0 key
  }

  void configFile() {
    // The daemon's parser takes the key from the registry: "128K" -> canonical bytes.
    dst::daemon::ParseOptions po;
    po.check_files = false;
    auto c = dst::daemon::ParseConfig(
        "[[array]]\nname = \"r\"\nlevel = \"raid0\"\nlegs = [\"/a\", \"/b\"]\nchunk = \"128K\"\n",
        "test.toml", po);
    QVERIFY2(c.ok(), c.status().ToString().c_str());
    QCOMPARE(c.value().arrays[0].params.at("chunk"), std::string("131072"));
    auto d = dst::daemon::ParseConfig(
        "[[array]]\nname = \"r\"\nlevel = \"raid0\"\nlegs = [\"/a\", \"/b\"]\n", "test.toml", po);
    QVERIFY(d.ok());
    QCOMPARE(d.value().arrays[0].params.at("chunk"), std::string("65536"));  // the default, stored
    auto bad = dst::daemon::ParseConfig(
        "[[array]]\nname = \"r\"\nlevel = \"raid0\"\nlegs = [\"/a\", \"/b\"]\nchunk = \"12K\"\n",
        "test.toml", po);
    QVERIFY(!bad.ok());
    QVERIFY2(bad.status().message().find("test.toml:5: array \"r\": chunk: must be a power of two") !=
                 std::string::npos,
             bad.status().ToString().c_str());
    auto one = dst::daemon::ParseConfig(
        "[[array]]\nname = \"r\"\nlevel = \"raid0\"\nlegs = [\"/a\"]\n", "test.toml", po);
    QVERIFY(!one.ok());
    QVERIFY2(one.status().message().find("legs: a raid0 needs at least 2 legs, got 1") != std::string::npos,
             one.status().ToString().c_str());
    // A mirror has no chunk.
    QVERIFY(!dst::daemon::ParseConfig(
                 "[[array]]\nname = \"m\"\nlegs = [\"/a\", \"/b\"]\nchunk = \"64K\"\n", "test.toml", po)
                 .ok());
  }

  void geometry() {
    // size = smallest leg rounded down to the chunk, times the legs.
    auto a = Fake(1 << 20), b = Fake((1 << 20) + 3 * 4096 + 512), c = Fake(3 * 65536 + 4096);
    auto r = Make({a, b, c}, "65536");
    QVERIFY(r.ok());
    QCOMPARE(r.value()->Info().size, std::uint64_t(3 * 3 * 65536));
    std::vector<DeviceInfo> infos{a->Info(), b->Info(), c->Info()};
    QCOMPARE(Raid0().usable_size(infos, {{"chunk", "65536"}}), std::uint64_t(3 * 3 * 65536));
    // Refused: one leg, a leg below one chunk, a read-only leg, a chunk below the block size.
    QVERIFY(!Make({a}).ok());
    QVERIFY(!Make({a, Fake(4096)}, "65536").ok());
    QVERIFY(!Make({a, Fake(1 << 20, false, 8192)}, "4096").ok());
  }

  void stripesAcrossChunksAndLegs() {
    for (bool async : {false, true}) {
      const std::uint64_t chunk = 8192;
      std::vector<std::shared_ptr<FakeDevice>> fakes{Fake(64 * 1024, async), Fake(64 * 1024, async),
                                                     Fake(64 * 1024 + 4096, async)};
      auto dev = Make(fakes, std::to_string(chunk)).value();
      const std::uint64_t size = dev->Info().size;
      QCOMPARE(size, std::uint64_t(3 * 64 * 1024));
      std::vector<char> model(size, 0);
      std::mt19937_64 rng(11);
      // At, across and over chunk boundaries; spanning every leg and more than one stripe.
      std::vector<std::pair<std::uint64_t, std::uint32_t>> ios = {
          {chunk - 512, 1024}, {0, std::uint32_t(chunk)}, {chunk, std::uint32_t(3 * chunk)},
          {2 * chunk - 512, std::uint32_t(2 * chunk + 1024)}, {0, std::uint32_t(size)},
          {size - 512, 512}};
      for (int k = 0; k < 300; ++k) {
        std::uint64_t off = (rng() % (size / 512)) * 512;
        std::uint64_t max = std::min<std::uint64_t>(size - off, 9 * chunk);
        ios.push_back({off, std::uint32_t(512 * (1 + rng() % (max / 512)))});
      }
      for (auto [off, len] : ios) {
        std::vector<char> buf(len);
        for (auto& ch : buf) ch = static_cast<char>(rng());
        QVERIFY(WriteSync(*dev, off, buf.data(), len).ok());
        std::memcpy(model.data() + off, buf.data(), len);
        std::vector<char> back(len);
        QVERIFY(ReadSync(*dev, off, back.data(), len).ok());
        QVERIFY(back == buf);
      }
      // Every array byte sits where the striping formula says.
      std::vector<std::vector<char>> legs;
      for (auto& f : fakes) legs.push_back(f->Contents());
      for (std::uint64_t off = 0; off < size; off += 512) {
        auto [leg, at] = Place(off, chunk, fakes.size());
        QVERIFY2(std::memcmp(legs[leg].data() + at, model.data() + off, 512) == 0,
                 qPrintable(QString("array offset %1").arg(off)));
      }
      // The bytes past the last whole chunk of the larger leg are never written.
      for (std::size_t i = 64 * 1024; i < legs[2].size(); ++i) QCOMPARE(int(legs[2][i]), 0);
    }
  }

  void largeRequestUsesWaves() {
    // 64 pieces of 4K over 2 legs: more than one wave of child requests.
    std::vector<std::shared_ptr<FakeDevice>> fakes{Fake(1 << 20, true), Fake(1 << 20)};
    auto dev = Make(fakes, "4096").value();
    std::vector<char> buf(64 * 4096);
    for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<char>(i / 4096);
    QVERIFY(WriteSync(*dev, 0, buf.data(), std::uint32_t(buf.size())).ok());
    for (int piece = 0; piece < 64; ++piece) {
      char ch = 0;
      fakes[std::size_t(piece % 2)]->Peek(std::uint64_t(piece / 2) * 4096, &ch, 1);
      QCOMPARE(int(ch), piece);
    }
    QCOMPARE(fakes[0]->writes(), std::uint64_t(32));
    QCOMPARE(fakes[1]->writes(), std::uint64_t(32));
  }

  void errorOnOneLegFailsTheRequest() {
    std::vector<std::shared_ptr<FakeDevice>> fakes{Fake(1 << 20), Fake(1 << 20)};
    auto dev = Make(fakes, "4096").value();
    std::vector<char> buf(2 * 4096, 'x');
    fakes[1]->SetFailWrites(true);
    QVERIFY(WriteSync(*dev, 0, buf.data(), 8192).IsIoError());    // chunk 1 is on leg 1
    QVERIFY(WriteSync(*dev, 0, buf.data(), 4096).ok());           // chunk 0: leg 0 only
    QVERIFY(WriteSync(*dev, 8192, buf.data(), 4096).ok());        // chunk 2: leg 0 again
    QVERIFY(WriteSync(*dev, 4096, buf.data(), 4096).IsIoError());
    fakes[1]->SetFailWrites(false);
    fakes[0]->SetFailReads(true);
    QVERIFY(ReadSync(*dev, 4096, buf.data(), 4096).ok());
    QVERIFY(ReadSync(*dev, 0, buf.data(), 8192).IsIoError());
  }

  void flushReachesEveryLeg() {
    std::vector<std::shared_ptr<FakeDevice>> fakes{Fake(1 << 20, true), Fake(1 << 20), Fake(1 << 20)};
    auto dev = Make(fakes).value();
    QVERIFY(FlushSync(*dev).ok());
    for (auto& f : fakes) QCOMPARE(f->flushes(), std::uint64_t(1));
    // A failing leg fails the flush, and the others are flushed all the same.
    std::atomic<int> flushes_to_failing{0};
    fakes[2]->SetOnSubmit([&](const IoRequest& r) {
      if (r.op == IoOp::kFlush) ++flushes_to_failing;
    });
    fakes[2]->SetFailFlush(true);
    QVERIFY(!FlushSync(*dev).ok());
    QCOMPARE(flushes_to_failing.load(), 1);
    QCOMPARE(fakes[0]->flushes(), std::uint64_t(2));
    QCOMPARE(fakes[1]->flushes(), std::uint64_t(2));
    fakes[2]->SetOnSubmit(nullptr);
  }

  void outOfRangeAndMisaligned() {
    std::vector<std::shared_ptr<FakeDevice>> fakes{Fake(1 << 20), Fake(1 << 20)};
    auto dev = Make(fakes).value();
    const std::uint64_t size = dev->Info().size;
    std::vector<char> x(8192);
    QVERIFY(!ReadSync(*dev, size - 512, x.data(), 1024).ok());
    QVERIFY(!WriteSync(*dev, size, x.data(), 512).ok());
    QVERIFY(!ReadSync(*dev, 100, x.data(), 512).ok());
    QCOMPARE(fakes[0]->reads() + fakes[1]->reads() + fakes[0]->writes() + fakes[1]->writes(),
             std::uint64_t(0));
  }

  void poolDryQueuesParents() {
    std::vector<std::shared_ptr<FakeDevice>> fakes{Fake(64 << 20, true), Fake(64 << 20, true)};
    auto dev = Make(fakes, "4096").value();
    fakes[0]->Hold(true);
    fakes[1]->Hold(true);
    const int n = 600;  // more parents than the pool has contexts
    std::vector<IoRequest> reqs(n);
    std::vector<char> buf(4096, 'p');
    std::atomic<int> done{0};
    for (int i = 0; i < n; ++i) {
      auto& r = reqs[std::size_t(i)];
      r.op = IoOp::kWrite;
      r.offset = std::uint64_t(i) * 4096;
      r.length = 4096;
      r.data = buf.data();
      r.ctx = &done;
      r.done = [](IoRequest* q, Status s) {
        if (s.ok()) static_cast<std::atomic<int>*>(q->ctx)->fetch_add(1);
      };
      dev->Submit(&r);
    }
    QCOMPARE(done.load(), 0);
    fakes[0]->Hold(false);
    fakes[1]->Hold(false);
    for (int i = 0; i < 5000 && done.load() < n; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    QCOMPARE(done.load(), n);
    QCOMPARE(fakes[0]->writes() + fakes[1]->writes(), std::uint64_t(n));
  }
};

DST_TEST_MAIN(Raid0Test)
#include "raid0_test.moc"
