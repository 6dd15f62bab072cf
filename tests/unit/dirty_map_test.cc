// Unit tests for DirtyMap (pure bitset logic) and TokenBucket.
#include <random>
#include <set>

#include "dst/dirty_map.h"
#include "dst/token_bucket.h"
#include "test_env.h"

using namespace dst;

class DirtyMapTest : public QObject {
  Q_OBJECT
 private slots:
  void geometry() {
    DirtyMap m(10 * 65536 + 512, 65536);  // short last region
    QCOMPARE(m.regions(), std::uint64_t(11));
    QCOMPARE(m.RegionBytes(10), std::uint64_t(512));
    QCOMPARE(m.RegionBytes(0), std::uint64_t(65536));
    std::uint64_t f, e;
    m.RegionsOf(65535, 2, &f, &e);  // straddles regions 0 and 1
    QCOMPARE(f, std::uint64_t(0));
    QCOMPARE(e, std::uint64_t(2));
    m.RegionsOf(65536, 65536, &f, &e);
    QCOMPARE(f, std::uint64_t(1));
    QCOMPARE(e, std::uint64_t(2));
    m.RegionsOf(0, 0, &f, &e);
    QCOMPARE(f, e);
  }

  void setClearTest() {
    DirtyMap m(1 << 30, 65536);
    QVERIFY(m.Empty());
    QCOMPARE(m.SetRange(4096, 4096), std::uint64_t(1));
    QCOMPARE(m.SetRange(0, 65536), std::uint64_t(0));  // already set
    QVERIFY(m.Test(0));
    QVERIFY(m.AnySet(60000, 100));
    QVERIFY(!m.AnySet(65536, 65536));
    QCOMPARE(m.SetRange(65536 * 10 - 512, 1024), std::uint64_t(2));  // regions 9 and 10
    QCOMPARE(m.Count(), std::uint64_t(3));
    QVERIFY(m.AllSet(65536 * 9, 65536 * 2));
    QVERIFY(!m.AllSet(0, 65536 * 2));
    QCOMPARE(m.ClearRange(65536 * 9, 1), std::uint64_t(1));
    QCOMPARE(m.Count(), std::uint64_t(2));
    QCOMPARE(m.DirtyBytes(), std::uint64_t(2 * 65536));
    m.SetAll();
    QCOMPARE(m.Count(), m.regions());
    m.ClearAll();
    QVERIFY(m.Empty());
  }

  void dirtyBytesClampsLastRegion() {
    DirtyMap m(3 * 4096 + 1024, 4096);
    m.SetAll();
    QCOMPARE(m.DirtyBytes(), std::uint64_t(3 * 4096 + 1024));
  }

  void runsMatchModel() {
    std::mt19937_64 rng(42);
    DirtyMap m(1000 * 4096, 4096);
    std::set<std::uint64_t> model;
    for (int i = 0; i < 3000; ++i) {
      std::uint64_t r = rng() % 1000;
      std::uint64_t n = 1 + rng() % 20;
      if (rng() % 3) {
        m.SetRegions(r, r + n);
        for (std::uint64_t k = r; k < std::min<std::uint64_t>(r + n, 1000); ++k) model.insert(k);
      } else {
        m.ClearRegions(r, r + n);
        for (std::uint64_t k = r; k < r + n; ++k) model.erase(k);
      }
    }
    QCOMPARE(m.Count(), std::uint64_t(model.size()));
    std::set<std::uint64_t> seen;
    std::uint64_t prev_end = 0;
    bool first = true;
    m.ForEachRun([&](std::uint64_t a, std::uint64_t b) {
      QVERIFY(a < b);
      if (!first) QVERIFY(a > prev_end);  // maximal runs: a gap between them
      first = false;
      prev_end = b;
      for (std::uint64_t k = a; k < b; ++k) seen.insert(k);
    });
    QVERIFY(seen == model);
    // Bounded iteration.
    std::uint64_t n = 0;
    m.ForEachRun([&](std::uint64_t a, std::uint64_t b) { n += b - a; }, 100, 200);
    std::uint64_t expect = 0;
    for (auto k : model) expect += (k >= 100 && k < 200);
    QCOMPARE(n, expect);
  }

  void serializeRoundTrip() {
    DirtyMap m(123456789, 65536);
    m.SetRange(0, 1);
    m.SetRange(100000000, 3000000);
    m.SetRegions(m.regions() - 1, m.regions());
    std::string b = m.Serialize();
    auto r = DirtyMap::Deserialize(b);
    QVERIFY(r.ok());
    QVERIFY(r.value() == m);
    // Corruptions are rejected, not trusted.
    QVERIFY(!DirtyMap::Deserialize(b.substr(0, 10)).ok());
    QVERIFY(!DirtyMap::Deserialize(b.substr(0, b.size() - 1)).ok());
    std::string bad = b;
    bad[0] ^= 1;
    QVERIFY(!DirtyMap::Deserialize(bad).ok());
    std::string bad_rs = b;
    bad_rs[16] = 3;  // region size 3 + ...
    QVERIFY(!DirtyMap::Deserialize(bad_rs).ok());
  }

  void chunkRoundTrip() {
    DirtyMap m(std::uint64_t(100) << 30, 65536);  // 1.6M regions -> 50 chunks
    QCOMPARE(m.chunks(), std::uint64_t(50));
    m.SetRegions(5, 9);
    m.SetRegions(DirtyMap::kRegionsPerChunk * 3 - 2, DirtyMap::kRegionsPerChunk * 3 + 2);
    DirtyMap n(std::uint64_t(100) << 30, 65536);
    for (std::uint64_t c = 0; c < m.chunks(); ++c) {
      std::string s = m.ChunkBytes(c);
      QCOMPARE(s.size(), DirtyMap::kChunkBytes);
      n.LoadChunk(c, s);
    }
    QVERIFY(n == m);
    // Replace semantics.
    n.LoadChunk(0, std::string(DirtyMap::kChunkBytes, '\0'), true);
    QCOMPARE(n.Count(), std::uint64_t(4));
  }

  void mergeSubtract() {
    DirtyMap a(64 * 4096, 4096), b(64 * 4096, 4096);
    a.SetRegions(0, 10);
    b.SetRegions(5, 20);
    DirtyMap u = a;
    u.Merge(b);
    QCOMPARE(u.Count(), std::uint64_t(20));
    u.Subtract(a);
    QCOMPARE(u.Count(), std::uint64_t(10));
    QCOMPARE(u.NextSet(0), std::uint64_t(10));
    QCOMPARE(u.NextClear(10), std::uint64_t(20));
    QCOMPARE(u.NextSet(20), u.regions());
  }

  void tokenBucket() {
    using namespace std::chrono;
    TokenBucket tb(1 << 20, 1 << 20);  // 1 MiB/s, 1 MiB burst
    auto t0 = TokenBucket::Clock::now();
    QCOMPARE(tb.Take(1 << 20, t0).count(), 0);           // burst
    auto d = tb.Take(512 << 10, t0);                      // 0.5 MiB in debt -> ~0.5 s
    QVERIFY(d > milliseconds(450) && d < milliseconds(550));
    tb.SetRate(4 << 20, 1 << 20);                         // live change: 4x faster refill
    auto d2 = tb.Take(512 << 10, t0);
    QVERIFY(d2 > milliseconds(200) && d2 < milliseconds(300));  // 1 MiB debt at 4 MiB/s
    tb.SetRate(0);
    QCOMPARE(tb.Take(1 << 30).count(), 0);  // unlimited
  }
};

DST_TEST_MAIN(DirtyMapTest)
#include "dirty_map_test.moc"
