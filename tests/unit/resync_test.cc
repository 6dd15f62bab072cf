// Unit tests for mirror resync: exact accounting (DRBD io-errors style), identity decisions,
// correctness against concurrent writes, resume from checkpoint after a kill, live rate limits.
#include <atomic>
#include <cstring>
#include <random>
#include <thread>

#include "dst/mirror_device.h"
#include "fake_device.h"
#include "test_env.h"

using namespace dst;
using dst::test::FakeDevice;
using dst::test::FakeDeviceOptions;

namespace {
constexpr std::uint64_t kMiB = 1 << 20;
constexpr std::uint32_t kRegion = 64 * 1024;

std::shared_ptr<FakeDevice> Leg(std::uint64_t data, bool async, const std::string& name) {
  FakeDeviceOptions fo;
  fo.size = data + MirrorDevice::kLegHeaderBytes;
  fo.async = async;
  fo.name = name;
  return std::make_shared<FakeDevice>(fo);
}

MirrorOptions Opts(bool assume_clean = true) {
  MirrorOptions o;
  o.region_size = kRegion;
  o.assume_clean = assume_clean;
  o.quiet_ms = 600000;
  o.resync.window_regions = 1;
  o.resync.rate.floor = 0;  // unlimited unless a test says otherwise
  o.resync.rate.ceiling = 0;
  return o;
}

bool SameData(FakeDevice& a, FakeDevice& b, std::uint64_t size) {
  auto x = a.Contents(), y = b.Contents();
  return std::memcmp(x.data(), y.data(), size) == 0;
}

ResyncProgress ProgressOf(MirrorDevice& m, int slot) {
  for (auto& p : m.Progress())
    if (p.leg == slot) return p;
  return {};
}

std::vector<std::shared_ptr<BlockDevice>> AsDevs(std::initializer_list<std::shared_ptr<FakeDevice>> l) {
  return std::vector<std::shared_ptr<BlockDevice>>(l.begin(), l.end());
}
}  // namespace

class ResyncTest : public QObject {
  Q_OBJECT
 private slots:
  // Detach a leg, write 12 KiB at known offsets, re-add: bytes resynced == covering regions.
  void exactAccounting12KiB() {
    auto a = Leg(4 * kMiB, true, "a"), b = Leg(4 * kMiB, true, "b");
    auto store = std::make_shared<MemoryDirtyMapStore>();
    auto m = MirrorDevice::Create(AsDevs({a, b}), store, Opts()).value();
    QVERIFY(m->DetachLeg(1).ok());
    std::vector<char> d(4096, 'x');
    QVERIFY(WriteSync(*m, 0, d.data(), 4096).ok());                        // region 0
    QVERIFY(WriteSync(*m, 5 * kRegion + 8192, d.data(), 4096).ok());       // region 5
    QVERIFY(WriteSync(*m, 10 * kRegion - 2048, d.data(), 4096).ok());      // regions 9 and 10
    const std::uint64_t expect = 4 * kRegion;
    QCOMPARE(m->Legs()[1].out_of_sync_bytes, expect);
    b->ResetCounters();
    QVERIFY(m->ReAddLeg(1, b).ok());
    QVERIFY(m->WaitResyncIdle(std::chrono::seconds(10)));
    auto p = ProgressOf(*m, 1);
    QCOMPARE(p.bytes_resynced_total, expect);
    QCOMPARE(p.bytes_done, expect);
    QCOMPARE(p.state, ResyncState::kDone);
    QCOMPARE(p.Percent(), 100.0);
    QCOMPARE(b->bytes_written(), expect);  // exactly those bytes went over the "wire"
    QVERIFY(SameData(*a, *b, m->Info().size));
    QCOMPARE(m->Legs()[1].state, LegState::kUpToDate);
  }

  // The only up-to-date leg fails a resync source read (a timeout after the assembling host was
  // suspended, say).  It must come back up to date: it holds every acknowledged write, and no
  // other leg could rewrite a marked window.  It used to get the window marked out of sync, so
  // both legs ended "resyncing" with no source and the array stayed failed (fault campaign,
  // SIGSTOP assembler during a resync).
  void lastLegReturnsAfterSourceReadError() {
    auto a = Leg(4 * kMiB, true, "a"), b = Leg(4 * kMiB, true, "b");
    auto store = std::make_shared<MemoryDirtyMapStore>();
    auto m = MirrorDevice::Create(AsDevs({a, b}), store, Opts()).value();
    QVERIFY(m->FailLeg(1).ok());
    std::vector<char> d(4096, 'x');
    for (int r = 0; r < 8; ++r) QVERIFY(WriteSync(*m, std::uint64_t(r) * kRegion, d.data(), 4096).ok());
    a->SetFailReads(true);
    QVERIFY(m->ReAddLeg(1, b).ok());  // resyncing from a, whose reads fail
    for (int i = 0; i < 1000 && m->Legs()[0].state != LegState::kFailed; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    QCOMPARE(m->Legs()[0].state, LegState::kFailed);
    QCOMPARE(m->Legs()[0].out_of_sync_bytes, std::uint64_t(0));
    QCOMPARE(m->Legs()[1].state, LegState::kResyncing);
    a->SetFailReads(false);
    QVERIFY(m->ReAddLeg(0, a).ok());
    QCOMPARE(m->Legs()[0].state, LegState::kUpToDate);
    QVERIFY(m->WaitResyncIdle(std::chrono::seconds(10)));
    QCOMPARE(m->Legs()[1].state, LegState::kUpToDate);
    QVERIFY(SameData(*a, *b, m->Info().size));
    std::vector<char> back(4096);
    QVERIFY(ReadSync(*m, 7 * kRegion, back.data(), 4096).ok());
    QCOMPARE(back, d);
  }

  // A read error on the only up-to-date leg fails it, unmarked: re-added, it is up to date.
  void lastLegReturnsAfterReadError() {
    auto a = Leg(4 * kMiB, false, "a"), b = Leg(4 * kMiB, false, "b");
    auto store = std::make_shared<MemoryDirtyMapStore>();
    auto m = MirrorDevice::Create(AsDevs({a, b}), store, Opts()).value();
    QVERIFY(m->FailLeg(1).ok());
    std::vector<char> d(4096, 'y');
    QVERIFY(WriteSync(*m, 3 * kRegion, d.data(), 4096).ok());
    a->SetFailReads(true);
    std::vector<char> back(4096);
    QVERIFY(!ReadSync(*m, 3 * kRegion, back.data(), 4096).ok());
    QCOMPARE(m->Legs()[0].state, LegState::kFailed);
    QCOMPARE(m->Legs()[0].out_of_sync_bytes, std::uint64_t(0));
    a->SetFailReads(false);
    QVERIFY(m->ReAddLeg(0, a).ok());
    QCOMPARE(m->Legs()[0].state, LegState::kUpToDate);
    QVERIFY(ReadSync(*m, 3 * kRegion, back.data(), 4096).ok());
    QCOMPARE(back, d);
    // And the other leg catches up from it.
    QVERIFY(m->ReAddLeg(1, b).ok());
    QVERIFY(m->WaitResyncIdle(std::chrono::seconds(10)));
    QVERIFY(SameData(*a, *b, m->Info().size));
  }

  // A write that reached only a resyncing leg (the up-to-date leg failed it) is not
  // acknowledged: that leg holds no whole image, so an acknowledged write there could be read
  // back by nobody.  The up-to-date leg stays unmarked (the write failed for the caller) and
  // returns up to date.
  void writeOnResyncingLegOnlyFails() {
    auto a = Leg(4 * kMiB, false, "a"), b = Leg(4 * kMiB, false, "b");
    auto store = std::make_shared<MemoryDirtyMapStore>();
    auto m = MirrorDevice::Create(AsDevs({a, b}), store, Opts()).value();
    QVERIFY(m->FailLeg(1).ok());
    std::vector<char> x(4096, 'x'), y(4096, 'y');
    QVERIFY(WriteSync(*m, 3 * kRegion, x.data(), 4096).ok());
    m->PauseResync(true);
    QVERIFY(m->ReAddLeg(1, b).ok());
    QCOMPARE(m->Legs()[1].state, LegState::kResyncing);
    QVERIFY(m->resync_paused());
    QCOMPARE(m->Progress()[1].state, ResyncState::kPaused);  // held, not "pending"
    a->SetFailWrites(true);
    QVERIFY2(!WriteSync(*m, 5 * kRegion, y.data(), 4096).ok(), "acknowledged a write only a resyncing leg took");
    QCOMPARE(m->Legs()[0].state, LegState::kFailed);
    QCOMPARE(m->Legs()[0].out_of_sync_bytes, std::uint64_t(0));
    a->SetFailWrites(false);
    QVERIFY(m->ReAddLeg(0, a).ok());
    QCOMPARE(m->Legs()[0].state, LegState::kUpToDate);
    m->PauseResync(false);
    QVERIFY(m->WaitResyncIdle(std::chrono::seconds(10)));
    QCOMPARE(m->Legs()[1].state, LegState::kUpToDate);
    QVERIFY(SameData(*a, *b, m->Info().size));
    std::vector<char> back(4096);
    QVERIFY(ReadSync(*m, 3 * kRegion, back.data(), 4096).ok());
    QCOMPARE(back, x);
  }

  void reAddWithoutWritesIsZero() {
    auto a = Leg(4 * kMiB, false, "a"), b = Leg(4 * kMiB, false, "b");
    auto store = std::make_shared<MemoryDirtyMapStore>();
    auto m = MirrorDevice::Create(AsDevs({a, b}), store, Opts()).value();
    QVERIFY(m->DetachLeg(1).ok());
    b->ResetCounters();
    QVERIFY(m->ReAddLeg(1, b).ok());
    QVERIFY(m->WaitResyncIdle(std::chrono::seconds(5)));
    QCOMPARE(ProgressOf(*m, 1).bytes_resynced_total, std::uint64_t(0));
    QCOMPARE(b->bytes_written(), std::uint64_t(0));
    QCOMPARE(m->Legs()[1].state, LegState::kUpToDate);
  }

  void replacedLegGetsFullResync() {
    auto a = Leg(4 * kMiB, true, "a"), b = Leg(4 * kMiB, true, "b");
    a->FillRandom(1);
    auto store = std::make_shared<MemoryDirtyMapStore>();
    auto m = MirrorDevice::Create(AsDevs({a, b}), store, Opts(false)).value();  // initial sync
    QVERIFY(m->WaitResyncIdle(std::chrono::seconds(10)));
    QCOMPARE(ProgressOf(*m, 1).bytes_resynced_total, m->Info().size);
    QVERIFY(SameData(*a, *b, m->Info().size));
    QVERIFY(m->FailLeg(1).ok());
    auto c = Leg(4 * kMiB, true, "c");  // blank replacement
    QVERIFY(m->ReAddLeg(1, c).ok());
    QVERIFY(m->WaitResyncIdle(std::chrono::seconds(10)));
    QCOMPARE(ProgressOf(*m, 1).bytes_resynced_total, m->Info().size);
    QVERIFY(SameData(*a, *c, m->Info().size));
    // A brand-new leg in a new slot: full too.
    auto d = Leg(4 * kMiB + 8192, true, "d");
    auto slot = m->AddLeg(d);
    QVERIFY(slot.ok());
    QCOMPARE(slot.value(), 2);
    QVERIFY(m->WaitResyncIdle(std::chrono::seconds(10)));
    QCOMPARE(ProgressOf(*m, 2).bytes_resynced_total, m->Info().size);
    QVERIFY(SameData(*a, *d, m->Info().size));
    // A leg that is too small is refused.
    QVERIFY(!m->AddLeg(Leg(1 * kMiB, false, "small")).ok());
  }

  void assemblyUsesLegIdentity() {
    auto a = Leg(2 * kMiB, false, "a"), b = Leg(2 * kMiB, false, "b");
    auto store = std::make_shared<MemoryDirtyMapStore>();
    std::string id;
    {
      auto m = MirrorDevice::Create(AsDevs({a, b}), store, Opts()).value();
      id = m->id();
      std::vector<char> d(8192, 'y');
      QVERIFY(WriteSync(*m, 0, d.data(), 8192).ok());
      QVERIFY(m->Close().ok());
    }
    {
      // Same legs, clean shutdown: nothing to do.
      auto m = MirrorDevice::Assemble(id, AsDevs({a, b}), store, Opts()).value();
      QVERIFY(m->WaitResyncIdle(std::chrono::seconds(5)));
      QCOMPARE(ProgressOf(*m, 1).bytes_resynced_total, std::uint64_t(0));
      // Leg b missing: degraded, writes tracked.
      QVERIFY(m->Close().ok());
    }
    {
      auto m = MirrorDevice::Assemble(id, {a, nullptr}, store, Opts()).value();
      QCOMPARE(m->Legs()[1].state, LegState::kFailed);
      std::vector<char> d(4096, 'z');
      QVERIFY(WriteSync(*m, kRegion * 3, d.data(), 4096).ok());
      QVERIFY(m->Close().ok());
    }
    {
      // b comes back: partial resync of exactly the missed region.
      auto m = MirrorDevice::Assemble(id, AsDevs({a, b}), store, Opts()).value();
      QVERIFY(m->WaitResyncIdle(std::chrono::seconds(5)));
      QCOMPARE(ProgressOf(*m, 1).bytes_resynced_total, std::uint64_t(kRegion));
      QVERIFY(SameData(*a, *b, m->Info().size));
      QVERIFY(m->Close().ok());
    }
    {
      // A foreign device in slot 1: full resync.
      auto f = Leg(2 * kMiB, false, "foreign");
      auto m = MirrorDevice::Assemble(id, AsDevs({a, f}), store, Opts()).value();
      QVERIFY(m->WaitResyncIdle(std::chrono::seconds(5)));
      QCOMPARE(ProgressOf(*m, 1).bytes_resynced_total, m->Info().size);
      QVERIFY(SameData(*a, *f, m->Info().size));
    }
  }

  // Detach = point-in-time snapshot: the leg keeps the image of the detach moment, the array
  // tracks what it misses, it stays detached across re-assembly, and re-adding is partial.
  void detachedLegIsASnapshot() {
    auto a = Leg(2 * kMiB, true, "a"), b = Leg(2 * kMiB, true, "b");
    auto store = std::make_shared<MemoryDirtyMapStore>();
    MirrorOptions o = Opts();
    auto m = MirrorDevice::Create(AsDevs({a, b}), store, o).value();
    const std::string id = m->id();
    std::vector<char> before(4096, 'B'), after(4096, 'C');
    QVERIFY(WriteSync(*m, 0, before.data(), 4096).ok());
    QVERIFY(m->WaitResyncIdle(std::chrono::seconds(5)));
    QVERIFY(m->DetachLeg(1).ok());
    QVERIFY(!m->DetachLeg(0).ok());  // never the last up-to-date leg
    QVERIFY(WriteSync(*m, 0, after.data(), 4096).ok());
    char c;
    b->Peek(0, &c, 1);
    QCOMPARE(c, 'B');  // the snapshot did not move
    a->Peek(0, &c, 1);
    QCOMPARE(c, 'C');
    QCOMPARE(m->Legs()[1].out_of_sync_bytes, std::uint64_t(kRegion));
    QVERIFY(m->Close().ok());
    m.reset();
    auto m2 = MirrorDevice::Assemble(id, AsDevs({a, b}), store, o).value();
    QCOMPARE(m2->Legs()[1].state, LegState::kDetached);
    b->ResetCounters();
    QVERIFY(m2->ReAddLeg(1, b).ok());
    QVERIFY(m2->WaitResyncIdle(std::chrono::seconds(5)));
    QCOMPARE(b->bytes_written(), std::uint64_t(kRegion));
    QVERIFY(SameData(*a, *b, m2->Info().size));
  }

  // Crash of the assembler: with the intent map only the written regions are resynced; without
  // it (write_intent = false) everything is.
  void crashResyncsIntentRegionsOnly() {
    for (bool intent : {true, false}) {
      auto a = Leg(2 * kMiB, true, "a"), b = Leg(2 * kMiB, true, "b");
      auto store = std::make_shared<MemoryDirtyMapStore>();
      MirrorOptions o = Opts();
      o.write_intent = intent;
      auto m = MirrorDevice::Create(AsDevs({a, b}), store, o).value();
      const std::string id = m->id();
      std::vector<char> d(4096, 'w');
      QVERIFY(WriteSync(*m, 3 * kRegion, d.data(), 4096).ok());
      QVERIFY(WriteSync(*m, 20 * kRegion + 4096, d.data(), 4096).ok());
      m->TEST_Crash();
      a->WaitIdle();
      b->WaitIdle();
      m.reset();
      auto m2 = MirrorDevice::Assemble(id, AsDevs({a, b}), store, o).value();
      QVERIFY(m2->WaitResyncIdle(std::chrono::seconds(10)));
      QCOMPARE(ProgressOf(*m2, 1).bytes_resynced_total, intent ? std::uint64_t(2 * kRegion) : m2->Info().size);
      QVERIFY(SameData(*a, *b, m2->Info().size));
    }
  }

  // Full resync while four writers hammer the array: the legs end byte-identical and hold the
  // last write of every block.
  void resyncAgainstConcurrentWrites() {
    const std::uint64_t size = 4 * kMiB;
    auto a = Leg(size, true, "a"), b = Leg(size, true, "b");
    a->FillRandom(7);
    a->SetDelayMicros(50);  // widen the window between the copy's read and its write
    b->SetDelayMicros(50);
    auto store = std::make_shared<MemoryDirtyMapStore>();
    MirrorOptions o = Opts(false);
    o.resync.rate.floor = 8 * kMiB;  // ~0.5 s: writes overlap the copy
    o.resync.rate.ceiling = 8 * kMiB;
    auto m = MirrorDevice::Create(AsDevs({a, b}), store, o).value();
    std::atomic<bool> stop{false};
    std::atomic<int> errors{0};
    std::vector<std::thread> ts;
    for (int t = 0; t < 4; ++t) {
      ts.emplace_back([&, t] {
        std::mt19937_64 rng(static_cast<std::uint64_t>(t) + 100);
        std::vector<char> d(4096);
        while (!stop) {
          for (auto& c : d) c = static_cast<char>(rng());
          // Each thread owns a quarter of the blocks so the final content is well defined.
          std::uint64_t blk = (rng() % (size / 4096 / 4)) * 4 + static_cast<std::uint64_t>(t);
          if (!WriteSync(*m, blk * 4096, d.data(), 4096).ok()) ++errors;
        }
      });
    }
    QVERIFY(m->WaitResyncIdle(std::chrono::seconds(30)));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    stop = true;
    for (auto& t : ts) t.join();
    QCOMPARE(errors.load(), 0);
    QVERIFY(m->Stats().writes > 100);
    QVERIFY(SameData(*a, *b, size));
    QCOMPARE(m->Legs()[1].state, LegState::kUpToDate);
  }

  // Deterministic race: while the resync writes a window to the target, an application write
  // to that same window is submitted (from the target's submit hook, so it would reach the
  // target *before* the stale copy).  It must wait for the window; the legs end identical.
  void writeToWindowBeingCopiedWaits() {
    const std::uint64_t size = 2 * kMiB;
    auto a = Leg(size, true, "a"), b = Leg(size, true, "b");
    a->FillRandom(3);
    auto store = std::make_shared<MemoryDirtyMapStore>();
    MirrorOptions o = Opts(false);
    o.resync.rate.floor = 4 * kMiB;  // the first windows are copied after the hook is set
    o.resync.rate.ceiling = 4 * kMiB;
    std::atomic<MirrorDevice*> mp{nullptr};
    struct AppWrite {
      IoRequest req;
      std::vector<char> buf = std::vector<char>(4096);
      std::atomic<int> st{0};
    };
    std::vector<std::unique_ptr<AppWrite>> apps;
    for (int i = 0; i < 4; ++i) apps.push_back(std::make_unique<AppWrite>());
    std::atomic<int> fired{0};
    b->SetOnSubmit([&](const IoRequest& q) {
      MirrorDevice* m = mp.load();
      if (!m || q.op != IoOp::kWrite || q.length != kRegion || q.offset >= size) return;
      int i = fired.fetch_add(1);
      if (i >= 4) return;
      AppWrite* w = apps[static_cast<std::size_t>(i)].get();
      std::memset(w->buf.data(), 'A' + i, 4096);
      w->req.op = IoOp::kWrite;
      w->req.offset = q.offset + 8192;
      w->req.length = 4096;
      w->req.data = w->buf.data();
      w->req.ctx = w;
      w->req.done = [](IoRequest* r, Status st) { static_cast<AppWrite*>(r->ctx)->st = st.ok() ? 1 : 2; };
      m->Submit(&w->req);
    });
    auto m = MirrorDevice::Create(AsDevs({a, b}), store, o).value();
    mp = m.get();
    QVERIFY(m->WaitResyncIdle(std::chrono::seconds(10)));
    QVERIFY(QTest::qWaitFor([&] {
      for (auto& w : apps)
        if (w->st.load() == 0) return false;
      return true;
    }, 5000));
    b->SetOnSubmit(nullptr);
    QVERIFY(fired.load() >= 4);
    for (auto& w : apps) QCOMPARE(w->st.load(), 1);
    QVERIFY(SameData(*a, *b, size));
    for (auto& w : apps) {
      char c;
      b->Peek(w->req.offset, &c, 1);
      QCOMPARE(c, w->buf[0]);
    }
  }

  // Kill the resync at ~50 %, re-assemble: bytes re-sent <= remainder + one window.
  void resumeFromCheckpointAfterKill() {
    const std::uint64_t size = 8 * kMiB;
    auto a = Leg(size, true, "a"), b = Leg(size, true, "b");
    a->FillRandom(9);
    auto store = std::make_shared<MemoryDirtyMapStore>();
    MirrorOptions o = Opts(false);
    o.resync.window_regions = 4;  // 256 KiB windows
    o.resync.rate.floor = 8 * kMiB;
    o.resync.rate.ceiling = 8 * kMiB;
    auto m = MirrorDevice::Create(AsDevs({a, b}), store, o).value();
    const std::string id = m->id();
    const std::uint64_t window = 4 * kRegion;
    QVERIFY(QTest::qWaitFor([&] { return ProgressOf(*m, 1).bytes_done >= size / 2; }, 10000));
    std::uint64_t done_at_kill = ProgressOf(*m, 1).bytes_done;
    m->TEST_Crash();
    a->WaitIdle();
    b->WaitIdle();
    m.reset();
    QVERIFY(done_at_kill < size);
    b->ResetCounters();
    o.resync.rate.floor = 0;
    o.resync.rate.ceiling = 0;
    auto m2 = MirrorDevice::Assemble(id, AsDevs({a, b}), store, o);
    QVERIFY(m2.ok());
    QVERIFY(m2.value()->WaitResyncIdle(std::chrono::seconds(10)));
    std::uint64_t resent = b->bytes_written();
    std::uint64_t remainder = size - done_at_kill;
    qInfo("done at kill %llu, re-sent %llu, remainder %llu, window %llu",
          static_cast<unsigned long long>(done_at_kill), static_cast<unsigned long long>(resent),
          static_cast<unsigned long long>(remainder), static_cast<unsigned long long>(window));
    QVERIFY(resent <= remainder + window);
    QVERIFY(resent >= remainder);  // and it did not skip anything
    QVERIFY(SameData(*a, *b, size));
    QCOMPARE(m2.value()->Legs()[1].state, LegState::kUpToDate);
  }

  void rateLimitChangesLive() {
    const std::uint64_t size = 8 * kMiB;
    auto a = Leg(size, true, "a"), b = Leg(size, true, "b");
    auto store = std::make_shared<MemoryDirtyMapStore>();
    MirrorOptions o = Opts(false);
    o.resync.rate.floor = 2 * kMiB;
    o.resync.rate.ceiling = 2 * kMiB;
    auto t0 = std::chrono::steady_clock::now();
    auto m = MirrorDevice::Create(AsDevs({a, b}), store, o).value();
    std::this_thread::sleep_for(std::chrono::milliseconds(1000));
    auto p = ProgressOf(*m, 1);
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    // About 2 MiB/s plus the burst; far below the unthrottled speed.
    QVERIFY2(p.bytes_done <= static_cast<std::uint64_t>(2.0 * kMiB * secs) + 512 * 1024,
             qPrintable(QString("done %1 in %2 s").arg(p.bytes_done).arg(secs)));
    QVERIFY(p.bytes_done >= kMiB);
    QVERIFY(p.Percent() > 0 && p.Percent() < 100);
    QVERIFY(p.rate_bytes_per_s > 0);
    QVERIFY(p.eta_seconds > 0);
    QCOMPARE(p.state, ResyncState::kRunning);
    // Raise the ceiling without restarting: the rest goes fast.
    m->SetResyncRate(ResyncRate{0, 0});
    auto t1 = std::chrono::steady_clock::now();
    QVERIFY(m->WaitResyncIdle(std::chrono::seconds(5)));
    QVERIFY(std::chrono::steady_clock::now() - t1 < std::chrono::seconds(2));
    auto q = ProgressOf(*m, 1);
    QCOMPARE(q.bytes_resynced_total, size);  // one pass, no restart
    QCOMPARE(q.Percent(), 100.0);
    QVERIFY(SameData(*a, *b, size));
    // Lowering works live too.
    m->SetResyncRate(ResyncRate{kMiB, 4 * kMiB});
    QCOMPARE(m->resync_rate().ceiling, 4 * kMiB);
  }

  void progressPercentIsClamped() {
    ResyncProgress p;
    p.state = ResyncState::kRunning;
    p.bytes_total = 100;
    p.bytes_done = 250;
    QVERIFY(p.Percent() <= 100.0);
    QVERIFY(p.Percent() < 100.0);  // never 100 while running
    p.state = ResyncState::kDone;
    QCOMPARE(p.Percent(), 100.0);
    p.bytes_total = 0;
    p.state = ResyncState::kRunning;
    QCOMPARE(p.Percent(), 0.0);
  }
};

DST_TEST_MAIN(ResyncTest)
#include "resync_test.moc"
