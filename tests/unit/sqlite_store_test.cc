// Unit tests for SqliteDirtyMapStore: round trip through a reopened database, atomic batches,
// and a mirror crash/re-assembly over the SQLite store.
#include <QTemporaryDir>
#include <sqlite3.h>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>

#include "dst/dirty_map_store.h"
#include "dst/mirror_device.h"
#include "fake_device.h"
#include "test_env.h"

using namespace dst;
using dst::test::FakeDevice;
using dst::test::FakeDeviceOptions;

class SqliteStoreTest : public QObject {
  Q_OBJECT
 private slots:
  void roundTrip() {
    QTemporaryDir dir;
    QVERIFY(dir.isValid());
    const std::string path = dir.filePath("state.db").toStdString();
    ArrayRecord rec;
    rec.id = NewUuid();
    rec.name = "m0";
    rec.kind = "mirror";
    rec.size = std::uint64_t(3) << 30;
    rec.region_size = 65536;
    rec.legs = {{0, NewUuid(), LegState::kUpToDate, "file /a", "", ""},
                {1, NewUuid(), LegState::kFailed, "dst://h/b", "", "foreign"}};
    DirtyMap intent(rec.size, rec.region_size), oos(rec.size, rec.region_size);
    intent.SetRange(12345 * 4096, 3 * 65536);
    oos.SetRange(std::uint64_t(2) << 30, 1 << 20);
    oos.SetRegions(oos.regions() - 1, oos.regions());
    {
      auto st = SqliteDirtyMapStore::Open(path);
      QVERIFY2(st.ok(), st.ok() ? "" : st.status().ToString().c_str());
      auto& s = *st.value();
      QVERIFY(s.PutArray(rec).ok());
      CommitBatch b;
      b.array_id = rec.id;
      for (std::uint64_t c = 0; c < intent.chunks(); ++c)
        if (intent.AnySet(c * DirtyMap::kRegionsPerChunk * 65536, DirtyMap::kRegionsPerChunk * 65536))
          b.chunks.push_back({kIntentMap, c, intent.ChunkBytes(c)});
      for (std::uint64_t c = 0; c < oos.chunks(); ++c) b.chunks.push_back({1, c, oos.ChunkBytes(c)});
      b.checkpoints.push_back({1, 777 * 65536, 5, 10});
      b.legs.push_back({1, rec.legs[1].generation, LegState::kResyncing, "dst://h/b", "g2,!g1", "blank"});
      b.clean = 0;
      QVERIFY(s.Commit(b).ok());
      QCOMPARE(s.commits(), std::uint64_t(1));
      QVERIFY(std::filesystem::exists(path + "-wal"));  // WAL mode
    }
    {
      auto s = std::move(SqliteDirtyMapStore::Open(path).value());
      auto got = s->GetArray(rec.id);
      QVERIFY(got.ok());
      QCOMPARE(got->name, rec.name);
      QCOMPARE(got->size, rec.size);
      QCOMPARE(got->region_size, rec.region_size);
      QVERIFY(!got->clean);
      QCOMPARE(got->legs.size(), std::size_t(2));
      QCOMPARE(got->legs[1].state, LegState::kResyncing);
      QCOMPARE(got->legs[1].generation, rec.legs[1].generation);
      QCOMPARE(got->legs[1].history, std::string("g2,!g1"));  // identity columns round-trip
      QCOMPARE(got->legs[1].reason, std::string("blank"));
      QCOMPARE(got->legs[0].reason, std::string(""));
      DirtyMap i2(rec.size, rec.region_size), o2(rec.size, rec.region_size), other(rec.size, rec.region_size);
      QVERIFY(s->LoadMap(rec.id, kIntentMap, &i2).ok());
      QVERIFY(s->LoadMap(rec.id, 1, &o2).ok());
      QVERIFY(s->LoadMap(rec.id, 0, &other).ok());
      QVERIFY(i2 == intent);
      QVERIFY(o2 == oos);
      QVERIFY(other.Empty());
      auto cps = s->LoadCheckpoints(rec.id);
      QVERIFY(cps.ok());
      QCOMPARE(cps->size(), std::size_t(1));
      QCOMPARE(cps.value()[0].next_offset, std::uint64_t(777 * 65536));
      // Clearing: an all-zero chunk removes the row.
      CommitBatch b;
      b.array_id = rec.id;
      for (std::uint64_t c = 0; c < oos.chunks(); ++c) b.chunks.push_back({1, c, std::string(DirtyMap::kChunkBytes, '\0')});
      QVERIFY(s->Commit(b).ok());
      DirtyMap o3(rec.size, rec.region_size);
      QVERIFY(s->LoadMap(rec.id, 1, &o3).ok());
      QVERIFY(o3.Empty());
      auto ids = s->ListArrays();
      QVERIFY(ids.ok());
      QCOMPARE(ids->size(), std::size_t(1));
      QVERIFY(s->DeleteArray(rec.id).ok());
      QVERIFY(s->GetArray(rec.id).status().IsNotFound());
      DirtyMap i4(rec.size, rec.region_size);
      QVERIFY(s->LoadMap(rec.id, kIntentMap, &i4).ok());
      QVERIFY(i4.Empty());
    }
  }

  // A database written before dst_legs had history/reason: opened, upgraded, old rows kept.
  void olderSchemaIsUpgraded() {
    QTemporaryDir dir;
    const std::string path = dir.path().toStdString() + "/old.sqlite";
    sqlite3* db = nullptr;
    QCOMPARE(sqlite3_open(path.c_str(), &db), SQLITE_OK);
    QCOMPARE(sqlite3_exec(db,
                          "CREATE TABLE dst_arrays(id TEXT PRIMARY KEY, name TEXT, kind TEXT,"
                          " size INTEGER, region_size INTEGER, clean INTEGER);"
                          "CREATE TABLE dst_legs(array_id TEXT, slot INTEGER, generation TEXT,"
                          " state TEXT, describe TEXT, PRIMARY KEY(array_id, slot));"
                          "INSERT INTO dst_arrays VALUES('a1', 'm0', 'mirror', 1048576, 65536, 1);"
                          "INSERT INTO dst_legs VALUES('a1', 0, 'g0', 'up-to-date', 'file /a');",
                          nullptr, nullptr, nullptr),
             SQLITE_OK);
    sqlite3_close(db);
    auto st = SqliteDirtyMapStore::Open(path);
    QVERIFY2(st.ok(), st.ok() ? "" : st.status().ToString().c_str());
    auto got = st.value()->GetArray("a1");
    QVERIFY(got.ok());
    QCOMPARE(got->legs.size(), std::size_t(1));
    QCOMPARE(got->legs[0].generation, std::string("g0"));
    QCOMPARE(got->legs[0].history, std::string(""));
    CommitBatch b;
    b.array_id = "a1";
    b.legs.push_back({0, "g1", LegState::kFailed, "file /a", "g0", "foreign"});
    QVERIFY(st.value()->Commit(b).ok());
    QCOMPARE(st.value()->GetArray("a1")->legs[0].reason, std::string("foreign"));
  }

  void badPathIsAnError() {
    auto st = SqliteDirtyMapStore::Open("/nonexistent-dir-xyz/state.db");
    QVERIFY(!st.ok());
  }

  // A mirror over the SQLite store: crash, reopen the database, re-assemble, heal.
  void mirrorCrashAndReassemble() {
    QTemporaryDir dir;
    const std::string path = dir.filePath("state.db").toStdString();
    const std::uint64_t size = 4 << 20;
    std::vector<std::shared_ptr<FakeDevice>> fakes;
    for (int i = 0; i < 2; ++i) {
      FakeDeviceOptions fo;
      fo.size = size + MirrorDevice::kLegHeaderBytes;
      fo.async = true;
      fakes.push_back(std::make_shared<FakeDevice>(fo));
    }
    std::vector<std::shared_ptr<BlockDevice>> legs(fakes.begin(), fakes.end());
    MirrorOptions o;
    o.region_size = 65536;
    o.assume_clean = true;
    o.quiet_ms = 600000;
    std::string id;
    std::vector<std::uint64_t> written;
    {
      std::shared_ptr<DirtyMapStore> store(SqliteDirtyMapStore::Open(path).value().release());
      auto m = MirrorDevice::Create(legs, store, o).value();
      id = m->id();
      // Concurrent random writes: group commit keeps commits well below writes.
      std::vector<std::thread> ts;
      std::atomic<int> errors{0};
      for (int t = 0; t < 4; ++t) {
        ts.emplace_back([&, t] {
          std::mt19937_64 rng(static_cast<std::uint64_t>(t));
          std::vector<char> d(4096, static_cast<char>('a' + t));
          for (int i = 0; i < 50; ++i) {
            std::uint64_t off = (rng() % (size / 4096)) * 4096;
            if (!WriteSync(*m, off, d.data(), 4096).ok()) ++errors;
          }
        });
      }
      for (auto& t : ts) t.join();
      QCOMPARE(errors.load(), 0);
      auto st = m->Stats();
      qInfo("200 writes, %llu SQLite commits, %llu intent regions", static_cast<unsigned long long>(st.commits),
            static_cast<unsigned long long>(st.intent_regions));
      QVERIFY(st.commits < 200);
      // Make leg 1 miss a write, then crash.
      fakes[1]->SetFailWrites(true);
      std::vector<char> d(4096, 'Z');
      QVERIFY(WriteSync(*m, 65536 * 7, d.data(), 4096).ok());
      QCOMPARE(m->Legs()[1].state, LegState::kFailed);
      m->TEST_Crash();
      for (auto& f : fakes) f->WaitIdle();
      fakes[1]->SetFailWrites(false);
    }
    {
      std::shared_ptr<DirtyMapStore> store(SqliteDirtyMapStore::Open(path).value().release());
      auto rec = store->GetArray(id);
      QVERIFY(rec.ok());
      QVERIFY(!rec->clean);
      QCOMPARE(rec->legs[1].state, LegState::kFailed);  // durable before the write was acked
      auto m = MirrorDevice::Assemble(id, legs, store, o);
      QVERIFY(m.ok());
      QVERIFY(m.value()->WaitResyncIdle(std::chrono::seconds(10)));
      auto a = fakes[0]->Contents(), b = fakes[1]->Contents();
      QVERIFY(std::memcmp(a.data(), b.data(), size) == 0);
      QCOMPARE(a[65536 * 7], 'Z');
      QVERIFY(m.value()->Close().ok());
      QVERIFY(store->GetArray(id)->clean);
    }
  }
};

DST_TEST_MAIN(SqliteStoreTest)
#include "sqlite_store_test.moc"
