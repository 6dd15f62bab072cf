// Unit tests for MirrorDevice with fake legs and an in-memory store: fan-out, degraded mode,
// read selection, EIO when every leg is gone, write-intent ordering, group commit, lazy clear,
// a crash property test and the allocation count per I/O.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <random>
#include <thread>

#include "dst/counting_device.h"
#include "dst/linear_device.h"
#include "dst/mirror_device.h"
#include "fake_device.h"
#include "test_env.h"

// ---- allocation counter (operator new hook) ----
static std::atomic<bool> g_count_allocs{false};
static std::atomic<std::uint64_t> g_allocs{0};
void* operator new(std::size_t n) {
  if (g_count_allocs.load(std::memory_order_relaxed)) g_allocs.fetch_add(1, std::memory_order_relaxed);
  void* p = std::malloc(n ? n : 1);
  if (!p) throw std::bad_alloc();
  return p;
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

using namespace dst;
using dst::test::FakeDevice;
using dst::test::FakeDeviceOptions;

namespace {
constexpr std::uint64_t kMiB = 1 << 20;
constexpr std::uint32_t kRegion = 64 * 1024;

struct Rig {
  std::vector<std::shared_ptr<FakeDevice>> fakes;
  std::shared_ptr<MemoryDirtyMapStore> store = std::make_shared<MemoryDirtyMapStore>();
  std::shared_ptr<MirrorDevice> m;

  std::vector<std::shared_ptr<BlockDevice>> Legs() const {
    return std::vector<std::shared_ptr<BlockDevice>>(fakes.begin(), fakes.end());
  }
};

Rig MakeRig(int n, std::uint64_t data_size, bool async, MirrorOptions o = {}, bool create = true) {
  Rig r;
  for (int i = 0; i < n; ++i) {
    FakeDeviceOptions fo;
    fo.size = data_size + MirrorDevice::kLegHeaderBytes + static_cast<std::uint64_t>(i) * 4096;  // sizes differ
    fo.async = async;
    fo.name = "leg" + std::to_string(i);
    r.fakes.push_back(std::make_shared<FakeDevice>(fo));
  }
  if (o.region_size == DirtyMap::kDefaultRegionSize) o.region_size = kRegion;
  if (create) {
    auto res = MirrorDevice::Create(r.Legs(), r.store, o);
    if (res.ok()) r.m = res.value();
  }
  return r;
}

MirrorOptions Clean() {
  MirrorOptions o;
  o.assume_clean = true;
  o.quiet_ms = 600000;
  return o;
}

std::vector<char> Pattern(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<char> v(n);
  for (auto& c : v) c = static_cast<char>(rng());
  return v;
}

struct AsyncWrite {
  IoRequest req;
  std::vector<char> buf;
  std::atomic<int> state{0};  // 0 pending, 1 ok, 2 error
  static void Done(IoRequest* r, Status s) {
    auto* w = static_cast<AsyncWrite*>(r->ctx);
    w->state.store(s.ok() ? 1 : 2);
  }
};

// Concurrent overlapping writes may land in any order (as on any block device): such blocks
// become unknown (-1), as do blocks of writes that were not acknowledged.
void ApplyModel(const std::vector<std::unique_ptr<AsyncWrite>>& ws, const std::vector<int>& tags,
                std::vector<int>& model, const std::vector<int>* states) {
  std::vector<int> hits(model.size(), 0);
  for (auto& w : ws)
    for (std::uint64_t b = w->req.offset / 512; b < (w->req.offset + w->req.length) / 512; ++b) ++hits[b];
  for (std::size_t i = 0; i < ws.size(); ++i) {
    auto& q = ws[i]->req;
    int st = states ? (*states)[i] : ws[i]->state.load();
    for (std::uint64_t b = q.offset / 512; b < (q.offset + q.length) / 512; ++b)
      model[b] = (st == 1 && hits[b] == 1) ? tags[i] : -1;
  }
}

bool WaitFor(const std::function<bool()>& pred, int ms = 5000) {
  for (int i = 0; i < ms; ++i) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return pred();
}
}  // namespace

class MirrorTest : public QObject {
  Q_OBJECT
 private slots:
  void sizeIsSmallestLeg() {
    Rig r = MakeRig(3, 4 * kMiB, false, Clean());
    QVERIFY(r.m);
    QCOMPARE(r.m->Info().size, 4 * kMiB);  // leg0 is the smallest; headers excluded
    QCOMPARE(r.m->Legs().size(), std::size_t(3));
    for (auto& l : r.m->Legs()) QCOMPARE(l.state, LegState::kUpToDate);
    // One leg is not a mirror.
    auto one = MirrorDevice::Create({r.fakes[0]}, r.store, Clean());
    QVERIFY(!one.ok());
  }

  void writesFanOutToEveryLeg() {
    Rig r = MakeRig(3, 4 * kMiB, true, Clean());
    auto data = Pattern(128 * 1024, 1);
    QVERIFY(WriteSync(*r.m, 3 * kRegion - 4096, data.data(), static_cast<std::uint32_t>(data.size())).ok());
    for (auto& f : r.fakes) {
      std::vector<char> got(data.size());
      f->Peek(3 * kRegion - 4096, got.data(), got.size());
      QVERIFY(got == data);
    }
    std::vector<char> back(data.size());
    QVERIFY(ReadSync(*r.m, 3 * kRegion - 4096, back.data(), static_cast<std::uint32_t>(back.size())).ok());
    QVERIFY(back == data);
    QVERIFY(FlushSync(*r.m).ok());
    for (auto& f : r.fakes) QVERIFY(f->flushes() >= 1);
  }

  void legFailureDegradesNotFails() {
    Rig r = MakeRig(2, 4 * kMiB, true, Clean());
    r.fakes[1]->SetFailWrites(true);
    auto data = Pattern(8192, 2);
    QVERIFY(WriteSync(*r.m, 5 * kRegion, data.data(), 8192).ok());  // leg 0 has it
    auto legs = r.m->Legs();
    QCOMPARE(legs[0].state, LegState::kUpToDate);
    QCOMPARE(legs[1].state, LegState::kFailed);
    QCOMPARE(legs[1].out_of_sync_bytes, std::uint64_t(kRegion));
    // The failed leg receives no more I/O; its misses are tracked.
    std::uint64_t before = r.fakes[1]->writes();
    QVERIFY(WriteSync(*r.m, 9 * kRegion, data.data(), 8192).ok());
    QCOMPARE(r.fakes[1]->writes(), before);
    QCOMPARE(r.m->Legs()[1].out_of_sync_bytes, std::uint64_t(2 * kRegion));
    std::vector<char> back(8192);
    QVERIFY(ReadSync(*r.m, 9 * kRegion, back.data(), 8192).ok());
    QVERIFY(back == data);
    QVERIFY(FlushSync(*r.m).ok());
  }

  void readsNeverFromStaleLeg() {
    Rig r = MakeRig(2, 4 * kMiB, false, Clean());
    QVERIFY(r.m->FailLeg(1).ok());
    auto data = Pattern(4096, 3);
    QVERIFY(WriteSync(*r.m, 0, data.data(), 4096).ok());
    r.fakes[1]->ResetCounters();
    for (int i = 0; i < 100; ++i) {
      std::vector<char> back(4096);
      QVERIFY(ReadSync(*r.m, 0, back.data(), 4096).ok());
      QVERIFY(back == data);
    }
    QCOMPARE(r.fakes[1]->reads(), std::uint64_t(0));
    // Re-added but still resyncing (paused): still no reads from it.
    r.m->PauseResync(true);
    QVERIFY(r.m->ReAddLeg(1, r.fakes[1]).ok());
    QCOMPARE(r.m->Legs()[1].state, LegState::kResyncing);
    r.fakes[1]->ResetCounters();  // ReAddLeg read the leg header
    for (int i = 0; i < 100; ++i) {
      std::vector<char> back(4096);
      QVERIFY(ReadSync(*r.m, 0, back.data(), 4096).ok());
      QVERIFY(back == data);
    }
    QCOMPARE(r.fakes[1]->reads(), std::uint64_t(0));
    r.m->PauseResync(false);
    QVERIFY(r.m->WaitResyncIdle(std::chrono::seconds(10)));
    QVERIFY(r.fakes[0]->Contents() == r.fakes[1]->Contents() ||
            std::memcmp(r.fakes[0]->Contents().data(), r.fakes[1]->Contents().data(), 4 * kMiB) == 0);
  }

  void readBalancingSpreadsReads() {
    Rig r = MakeRig(2, 4 * kMiB, true, Clean());
    for (auto& f : r.fakes) f->SetDelayMicros(300);
    const int n = 64;
    std::vector<std::unique_ptr<AsyncWrite>> ios;
    std::mt19937_64 rng(5);
    for (auto& f : r.fakes) f->ResetCounters();
    for (int i = 0; i < n; ++i) {
      auto w = std::make_unique<AsyncWrite>();
      w->buf.resize(4096);
      w->req.op = IoOp::kRead;
      w->req.offset = (rng() % (4 * kMiB / 4096)) * 4096;
      w->req.length = 4096;
      w->req.data = w->buf.data();
      w->req.ctx = w.get();
      w->req.done = &AsyncWrite::Done;
      ios.push_back(std::move(w));
    }
    for (auto& w : ios) r.m->Submit(&w->req);
    QVERIFY(WaitFor([&] {
      for (auto& w : ios)
        if (w->state.load() == 0) return false;
      return true;
    }));
    for (auto& w : ios) QCOMPARE(w->state.load(), 1);
    std::uint64_t a = r.fakes[0]->reads(), b = r.fakes[1]->reads();
    QCOMPARE(a + b, std::uint64_t(n));
    QVERIFY2(a >= n / 4 && b >= n / 4, qPrintable(QString("unbalanced %1/%2").arg(a).arg(b)));
    // Sequential reads at queue depth 1 stay on one leg (nearest last position).
    for (auto& f : r.fakes) f->ResetCounters();
    for (int i = 0; i < 32; ++i) {
      std::vector<char> buf(4096);
      QVERIFY(ReadSync(*r.m, static_cast<std::uint64_t>(i) * 4096, buf.data(), 4096).ok());
    }
    QVERIFY(r.fakes[0]->reads() == 32 || r.fakes[1]->reads() == 32);
  }

  void readErrorRetriesOtherLeg() {
    Rig r = MakeRig(2, 4 * kMiB, false, Clean());
    auto data = Pattern(4096, 4);
    QVERIFY(WriteSync(*r.m, kRegion, data.data(), 4096).ok());
    r.fakes[0]->SetFailReads(true);
    r.fakes[1]->SetFailReads(false);
    for (int i = 0; i < 4; ++i) {
      std::vector<char> back(4096);
      QVERIFY(ReadSync(*r.m, kRegion, back.data(), 4096).ok());
      QVERIFY(back == data);
    }
    QCOMPARE(r.m->Legs()[0].state, LegState::kFailed);
    QVERIFY(r.m->Stats().read_retries >= 1);
    QVERIFY(r.m->Legs()[0].out_of_sync_bytes >= kRegion);  // rewritten when it comes back
  }

  void allLegsDeadGivesEio() {
    Rig r = MakeRig(2, 4 * kMiB, true, Clean());
    auto data = Pattern(4096, 6);
    QVERIFY(WriteSync(*r.m, 0, data.data(), 4096).ok());
    for (auto& f : r.fakes) f->SetFailAll(true);
    auto other = Pattern(4096, 7);
    Status s = WriteSync(*r.m, 0, other.data(), 4096);
    QCOMPARE(s.ToErrno(), EIO);
    std::vector<char> back(4096);
    QCOMPARE(ReadSync(*r.m, 0, back.data(), 4096).ToErrno(), EIO);
    QCOMPARE(FlushSync(*r.m).ToErrno(), EIO);
    QCOMPARE(WriteSync(*r.m, kRegion, other.data(), 4096).ToErrno(), EIO);
    // Nothing was falsely acknowledged: the leg data still holds the first write.
    for (auto& f : r.fakes) {
      std::vector<char> got(4096);
      f->Peek(0, got.data(), 4096);
      QVERIFY(got == data);
    }
  }

  void writeIntentIsDurableBeforeAnyLegSeesTheWrite() {
    MirrorOptions o = Clean();
    Rig r = MakeRig(2, 4 * kMiB, true, o);
    r.store->SetCommitDelayMicros(20000);  // slow commits widen the race window
    std::atomic<int> violations{0}, checked{0};
    const std::string id = r.m->id();
    const std::uint64_t size = r.m->Info().size;
    for (auto& f : r.fakes) {
      f->SetOnSubmit([&, id, size](const IoRequest& q) {
        if (q.op != IoOp::kWrite || q.offset >= size) return;
        for (std::uint64_t reg = q.offset / kRegion; reg <= (q.offset + q.length - 1) / kRegion; ++reg) {
          ++checked;
          if (!r.store->DurableBit(id, kIntentMap, reg)) ++violations;
        }
      });
    }
    std::vector<std::thread> ts;
    for (int t = 0; t < 4; ++t) {
      ts.emplace_back([&, t] {
        std::mt19937_64 rng(static_cast<std::uint64_t>(t));
        auto d = Pattern(8192, static_cast<std::uint64_t>(t));
        for (int i = 0; i < 20; ++i) {
          std::uint64_t off = (rng() % (size / 4096 - 2)) * 4096;
          if (!WriteSync(*r.m, off, d.data(), 8192).ok()) ++violations;
        }
      });
    }
    for (auto& t : ts) t.join();
    for (auto& f : r.fakes) f->SetOnSubmit(nullptr);
    QVERIFY(checked.load() > 100);
    QCOMPARE(violations.load(), 0);
  }

  void groupCommitBatchesManyWrites() {
    Rig r = MakeRig(2, 16 * kMiB, true, Clean());
    r.store->SetCommitDelayMicros(10000);  // 10 ms per commit
    std::uint64_t c0 = r.store->commits();
    const int n = 128;
    std::vector<std::unique_ptr<AsyncWrite>> ws;
    auto d = Pattern(4096, 9);
    for (int i = 0; i < n; ++i) {
      auto w = std::make_unique<AsyncWrite>();
      w->buf = d;
      w->req.op = IoOp::kWrite;
      w->req.offset = static_cast<std::uint64_t>(i) * kRegion;  // 128 distinct clean regions
      w->req.length = 4096;
      w->req.data = w->buf.data();
      w->req.ctx = w.get();
      w->req.done = &AsyncWrite::Done;
      ws.push_back(std::move(w));
    }
    for (auto& w : ws) r.m->Submit(&w->req);
    QVERIFY(WaitFor([&] {
      for (auto& w : ws)
        if (w->state.load() == 0) return false;
      return true;
    }));
    for (auto& w : ws) QCOMPARE(w->state.load(), 1);
    std::uint64_t commits = r.store->commits() - c0;
    QVERIFY2(commits <= 4, qPrintable(QString("commits %1 for %2 writes").arg(commits).arg(n)));
    QCOMPARE(r.m->TEST_IntentCount(), std::uint64_t(n));
    QCOMPARE(r.m->Stats().intent_waits, std::uint64_t(n));
    // Rewrites of marked regions need no commit at all.
    std::uint64_t c1 = r.store->commits();
    for (int i = 0; i < 20; ++i) QVERIFY(WriteSync(*r.m, static_cast<std::uint64_t>(i) * kRegion, d.data(), 4096).ok());
    QCOMPARE(r.store->commits(), c1);
  }

  void lazyClearAfterQuietPeriod() {
    MirrorOptions o = Clean();
    o.quiet_ms = 150;
    Rig r = MakeRig(2, 4 * kMiB, true, o);
    auto d = Pattern(4096, 10);
    for (int i : {1, 7, 30}) QVERIFY(WriteSync(*r.m, static_cast<std::uint64_t>(i) * kRegion, d.data(), 4096).ok());
    QCOMPARE(r.m->TEST_IntentCount(), std::uint64_t(3));
    QVERIFY(r.store->DurableBit(r.m->id(), kIntentMap, 7));
    std::uint64_t f0 = r.fakes[0]->flushes();
    // Keep region 1 hot: it must stay marked while the others clear.
    bool cleared = WaitFor([&] {
      (void)WriteSync(*r.m, kRegion, d.data(), 4096);
      return !r.store->DurableBit(r.m->id(), kIntentMap, 7) && !r.store->DurableBit(r.m->id(), kIntentMap, 30);
    }, 3000);
    QVERIFY(cleared);
    QVERIFY(r.store->DurableBit(r.m->id(), kIntentMap, 1));
    QVERIFY(r.fakes[0]->flushes() > f0);  // cleared only after a flush of the legs
    // Once quiet, region 1 clears too.
    QVERIFY(WaitFor([&] { return !r.store->DurableBit(r.m->id(), kIntentMap, 1); }, 3000));
    QCOMPARE(r.m->TEST_IntentCount(), std::uint64_t(0));
    QVERIFY(r.m->Stats().regions_cleared >= 3);
  }

  void orderlyCloseLeavesCleanArray() {
    Rig r = MakeRig(2, 4 * kMiB, false, Clean());
    auto d = Pattern(4096, 11);
    QVERIFY(WriteSync(*r.m, 0, d.data(), 4096).ok());
    QVERIFY(r.m->Close().ok());
    auto rec = r.store->GetArray(r.m->id());
    QVERIFY(rec.ok());
    QVERIFY(rec->clean);
    QVERIFY(!r.store->DurableBit(r.m->id(), kIntentMap, 0));
    // Re-assembly: nothing to resync.
    auto m2 = MirrorDevice::Assemble(r.m->id(), r.Legs(), r.store, Clean());
    QVERIFY(m2.ok());
    for (auto& l : m2.value()->Legs()) QCOMPARE(l.state, LegState::kUpToDate);
  }

  // Random writes, leg failures and crashes of the assembling host.  At every crash the
  // persisted maps must cover every region where two legs differ; after re-assembly and resync
  // the legs are identical and every acknowledged write is there.
  void propertyCrashCoverage_data() {
    QTest::addColumn<int>("seed");
    int n = qEnvironmentVariableIsSet("DST_PROPERTY_SEEDS") ? qEnvironmentVariableIntValue("DST_PROPERTY_SEEDS") : 12;
    for (int i = 0; i < n; ++i) QTest::newRow(qPrintable(QString("seed%1").arg(i))) << (1234 + i);
  }

  void propertyCrashCoverage() {
    QFETCH(int, seed);
    const std::uint64_t size = 1 * kMiB;
    const std::uint32_t region = 4096;
    MirrorOptions o;
    o.assume_clean = true;
    o.region_size = region;
    o.quiet_ms = 30;  // clears happen during the run
    Rig r = MakeRig(3, size, true, o);
    QVERIFY(r.m);
    const std::string id = r.m->id();
    std::vector<int> model(size / 512, 0);  // value tag per block; -1 unknown
    std::mt19937_64 rng(static_cast<std::uint64_t>(seed));
    int tag = 1;
    int crashes = 0, failures = 0;
    for (int iter = 0; iter < 40; ++iter) {
      // Slow commits now and then widen the windows between a leg failing and its state being
      // durable, and between an intent bit being wanted and being durable.
      r.store->SetCommitDelayMicros(rng() % 2 ? static_cast<std::uint32_t>(rng() % 3000) : 0);
      int held = -1;
      if (rng() % 3 == 0) {
        held = static_cast<int>(rng() % 3);
        r.fakes[static_cast<std::size_t>(held)]->Hold(true);
      }
      if (rng() % 3 == 0) {
        int fl = static_cast<int>(rng() % 3);
        int others_up = 0;
        for (auto& l : r.m->Legs()) others_up += l.slot != fl && l.state == LegState::kUpToDate;
        if (fl != held && others_up >= 1) {  // never kill the last up-to-date leg here
          r.fakes[static_cast<std::size_t>(fl)]->SetFailWrites(true);
          ++failures;
        }
      }
      std::vector<std::unique_ptr<AsyncWrite>> ws;
      std::vector<int> tags;
      int n = 1 + static_cast<int>(rng() % 12);
      for (int i = 0; i < n; ++i) {
        auto w = std::make_unique<AsyncWrite>();
        std::uint32_t blocks = 1 + static_cast<std::uint32_t>(rng() % 16);
        std::uint64_t off = (rng() % (size / 512 - blocks)) * 512;
        w->buf.assign(blocks * 512, static_cast<char>(tag));
        w->req.op = IoOp::kWrite;
        w->req.offset = off;
        w->req.length = blocks * 512;
        w->req.data = w->buf.data();
        w->req.ctx = w.get();
        w->req.done = &AsyncWrite::Done;
        tags.push_back(tag);
        tag = tag % 120 + 1;
        ws.push_back(std::move(w));
      }
      for (auto& w : ws) r.m->Submit(&w->req);
      bool crash = rng() % 3 == 0;
      if (held >= 0 && !crash) r.fakes[static_cast<std::size_t>(held)]->Hold(false);
      if (!crash) {
        bool all = WaitFor([&] {
          for (auto& w : ws)
            if (w->state.load() == 0) return false;
          return true;
        });
        if (!all) QFAIL(qPrintable(QString::fromStdString("writes stuck: " + r.m->TEST_DebugState())));
        ApplyModel(ws, tags, model, nullptr);
        for (auto& f : r.fakes) f->SetFailWrites(false);
        // Bring failed legs back now and then.
        for (auto& l : r.m->Legs())
          if (l.state == LegState::kFailed && rng() % 2) (void)r.m->ReAddLeg(l.slot, r.fakes[static_cast<std::size_t>(l.slot)]);
        continue;
      }
      // ---- crash ----
      ++crashes;
      std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 3));
      // Acknowledged before the crash: those writes are in the model.
      std::vector<int> state_at_crash;
      for (auto& w : ws) state_at_crash.push_back(w->state.load());
      r.m->TEST_Crash();
      // In-flight writes on the held leg never reach it.
      if (held >= 0) {
        r.fakes[static_cast<std::size_t>(held)]->DropHeld();
        r.fakes[static_cast<std::size_t>(held)]->Hold(false);
      }
      for (auto& f : r.fakes) f->WaitIdle();
      QVERIFY(WaitFor([&] {
        for (auto& w : ws)
          if (w->state.load() == 0) return false;
        return true;
      }));
      ApplyModel(ws, tags, model, &state_at_crash);  // unacked: either old or new
      r.m.reset();
      for (auto& f : r.fakes) f->SetFailWrites(false);
      // Invariant on the persisted maps.
      DirtyMap intent(size, region);
      QVERIFY(r.store->LoadMap(id, kIntentMap, &intent).ok());
      std::vector<DirtyMap> oos;
      for (int s = 0; s < 3; ++s) {
        oos.emplace_back(size, region);
        QVERIFY(r.store->LoadMap(id, s, &oos.back()).ok());
      }
      auto rec = r.store->GetArray(id).value();
      std::vector<std::vector<char>> c;
      for (auto& f : r.fakes) c.push_back(f->Contents());
      for (int a = 0; a < 3; ++a) {
        for (int b = a + 1; b < 3; ++b) {
          for (std::uint64_t reg = 0; reg < size / region; ++reg) {
            if (std::memcmp(c[static_cast<std::size_t>(a)].data() + reg * region,
                            c[static_cast<std::size_t>(b)].data() + reg * region, region) == 0)
              continue;
            bool covered = intent.Test(reg) || oos[static_cast<std::size_t>(a)].Test(reg) ||
                           oos[static_cast<std::size_t>(b)].Test(reg);
            if (!covered) QFAIL(qPrintable(QString("iter %1: legs %2/%3 differ in region %4, not covered")
                                              .arg(iter).arg(a).arg(b).arg(reg)));
          }
        }
      }
      // Re-assemble and heal.
      auto m2 = MirrorDevice::Assemble(id, r.Legs(), r.store, o);
      QVERIFY2(m2.ok(), m2.ok() ? "" : m2.status().ToString().c_str());
      r.m = m2.value();
      QVERIFY(r.m->WaitResyncIdle(std::chrono::seconds(20)));
      for (auto& l : r.m->Legs()) QCOMPARE(l.state, LegState::kUpToDate);
      auto c0 = r.fakes[0]->Contents();
      for (int s = 1; s < 3; ++s) {
        auto cs = r.fakes[static_cast<std::size_t>(s)]->Contents();
        QVERIFY(std::memcmp(c0.data(), cs.data(), size) == 0);
      }
      // Acknowledged data survived.
      std::vector<char> back(size);
      QVERIFY(ReadSync(*r.m, 0, back.data(), static_cast<std::uint32_t>(std::min<std::uint64_t>(size, r.m->Info().max_io_bytes))).ok());
      for (std::uint64_t b = 0; b < size / 512; ++b) {
        if (model[b] <= 0) continue;
        if (back[b * 512] != static_cast<char>(model[b]))
          QFAIL(qPrintable(QString("iter %1: block %2 lost an acknowledged write").arg(iter).arg(b)));
      }
    }
    QVERIFY(crashes >= 3);
    QVERIFY(failures >= 1);
  }

  void poolDryQueues() {
    MirrorOptions o = Clean();
    o.max_inflight = 2;
    Rig r = MakeRig(2, 4 * kMiB, true, o);
    auto d = Pattern(4096, 12);
    for (int i = 0; i < 8; ++i) QVERIFY(WriteSync(*r.m, static_cast<std::uint64_t>(i) * kRegion, d.data(), 4096).ok());
    for (auto& f : r.fakes) f->Hold(true);
    std::vector<std::unique_ptr<AsyncWrite>> ws;
    for (int i = 0; i < 32; ++i) {
      auto w = std::make_unique<AsyncWrite>();
      w->buf = d;
      w->req.op = i % 2 ? IoOp::kRead : IoOp::kWrite;
      w->req.offset = static_cast<std::uint64_t>(i % 8) * kRegion;
      w->req.length = 4096;
      w->req.data = w->buf.data();
      w->req.ctx = w.get();
      w->req.done = &AsyncWrite::Done;
      ws.push_back(std::move(w));
    }
    for (auto& w : ws) r.m->Submit(&w->req);
    QVERIFY(r.m->Stats().pool_waits >= 30);
    for (auto& f : r.fakes) f->Hold(false);
    QVERIFY(WaitFor([&] {
      for (auto& w : ws)
        if (w->state.load() == 0) return false;
      return true;
    }));
    for (auto& w : ws) QCOMPARE(w->state.load(), 1);
  }

  // Arrays stack over arrays: mirror(linear(a1, b1), linear(a2)) and linear(mirror, mirror).
  void stackedGeometries() {
    auto f = [](std::uint64_t size) {
      FakeDeviceOptions fo;
      fo.size = size;
      fo.async = true;
      return std::make_shared<FakeDevice>(fo);
    };
    auto a1 = f(3 * kMiB + 100), b1 = f(2 * kMiB), a2 = f(6 * kMiB);  // a1 rounds down to 3 MiB
    auto l1 = LinearDevice::Create({a1, b1}).value();
    auto l2 = LinearDevice::Create({a2}).value();
    auto store = std::make_shared<MemoryDirtyMapStore>();
    MirrorOptions o = Clean();
    o.region_size = kRegion;
    auto m = MirrorDevice::Create({l1, l2}, store, o).value();
    QCOMPARE(m->Info().size, 5 * kMiB - MirrorDevice::kLegHeaderBytes);  // smallest leg minus header
    auto d = Pattern(256 * 1024, 21);
    const std::uint64_t off = 3 * kMiB - 128 * 1024;  // crosses a1 -> b1 inside leg 1
    QVERIFY(WriteSync(*m, off, d.data(), static_cast<std::uint32_t>(d.size())).ok());
    std::vector<char> got(128 * 1024);
    a1->Peek(off, got.data(), got.size());
    QVERIFY(std::memcmp(got.data(), d.data(), got.size()) == 0);
    b1->Peek(0, got.data(), got.size());
    QVERIFY(std::memcmp(got.data(), d.data() + 128 * 1024, got.size()) == 0);
    a2->Peek(off + 128 * 1024, got.data(), got.size());
    QVERIFY(std::memcmp(got.data(), d.data() + 128 * 1024, got.size()) == 0);
    // linear(mirror, mirror)
    Rig r1 = MakeRig(2, 1 * kMiB, true, Clean()), r2 = MakeRig(2, 2 * kMiB, true, Clean());
    auto top = LinearDevice::Create({r1.m, r2.m}).value();
    QCOMPARE(top->Info().size, 3 * kMiB);
    QVERIFY(WriteSync(*top, kMiB - 64 * 1024, d.data(), static_cast<std::uint32_t>(d.size())).ok());
    std::vector<char> back(d.size());
    QVERIFY(ReadSync(*top, kMiB - 64 * 1024, back.data(), static_cast<std::uint32_t>(back.size())).ok());
    QVERIFY(back == d);
    r2.fakes[1]->Peek(0, got.data(), 64 * 1024);  // second mirror, second leg, offset 0
    QVERIFY(std::memcmp(got.data(), d.data() + 64 * 1024, 64 * 1024) == 0);
    QVERIFY(FlushSync(*top).ok());
  }

  // Writes, reads and flushes through `top` (the mirror, or a device stacked on it) after a
  // warm-up; returns the heap allocations counted during the measured part.
  static std::uint64_t AllocationsPerIo(BlockDevice& top, MirrorDevice& m, int* bad) {
    auto d = Pattern(65536, 13);
    std::vector<char> back(65536);
    // Warm-up: mark the regions, let the pools and the writer settle.
    for (int i = 0; i < 16; ++i)
      if (!WriteSync(top, static_cast<std::uint64_t>(i) * kRegion, d.data(), 65536).ok()) ++*bad;
    m.TEST_WaitCommitted();
    IoRequest w, rd, fl;
    g_allocs = 0;
    g_count_allocs = true;
    const int n = 2000;
    for (int i = 0; i < n; ++i) {
      std::uint64_t off = static_cast<std::uint64_t>(i % 16) * kRegion;
      w = IoRequest();
      w.op = IoOp::kWrite;
      w.offset = off;
      w.length = 65536;
      w.data = d.data();
      if (!SubmitSync(top, w).ok()) ++*bad;
      rd = IoRequest();
      rd.op = IoOp::kRead;
      rd.offset = off;
      rd.length = 65536;
      rd.data = back.data();
      if (!SubmitSync(top, rd).ok()) ++*bad;
      if (i % 100 == 0) {
        fl = IoRequest();
        fl.op = IoOp::kFlush;
        if (!SubmitSync(top, fl).ok()) ++*bad;
      }
    }
    g_count_allocs = false;
    const std::uint64_t allocs = g_allocs.load();
    qInfo("allocations during %d writes + %d reads + %d flushes: %llu", n, n, n / 100,
          static_cast<unsigned long long>(allocs));
    return allocs;
  }

  void noAllocationPerIoInSteadyState() {
    Rig r = MakeRig(2, 4 * kMiB, false, Clean());
    int bad = 0;
    const std::uint64_t allocs = AllocationsPerIo(*r.m, *r.m, &bad);
    QCOMPARE(bad, 0);
    QCOMPARE(allocs, std::uint64_t(0));
  }

  // The daemon counts every volume and array (metrics): a CountingDevice above the mirror
  // (latency histograms, in-flight gauge) must keep the path allocation-free.
  void noAllocationPerIoThroughCounters() {
    Rig r = MakeRig(2, 4 * kMiB, false, Clean());
    auto counted = std::make_shared<CountingDevice>(r.m, 64);
    int bad = 0;
    const std::uint64_t allocs = AllocationsPerIo(*counted, *r.m, &bad);
    QCOMPARE(bad, 0);
    QCOMPARE(allocs, std::uint64_t(0));
    const DeviceCounters c = counted->Counters();
    QVERIFY(c.writes >= 2000 && c.reads == 2000 && c.uncounted == 0 && c.inflight == 0);
    QCOMPARE(counted->Latency(CountingDevice::OpClass::kWrite).Get().count, c.writes);
  }
};

DST_TEST_MAIN(MirrorTest)
#include "mirror_test.moc"
