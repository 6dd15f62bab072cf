// Unit tests for the mirror's leg identity: the connect check on every reconnect (blank,
// foreign, older and unchanged legs behind the same device), generation rotation, split brain
// detection and Resolve(), and claims (leases) between two assemblers.  Fakes only.
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
constexpr std::uint64_t kData = 4 * kMiB;

struct Rig {
  std::vector<std::shared_ptr<FakeDevice>> fakes;
  std::shared_ptr<MemoryDirtyMapStore> store = std::make_shared<MemoryDirtyMapStore>();
  std::shared_ptr<MirrorDevice> m;
  std::vector<std::shared_ptr<BlockDevice>> Legs() const {
    return std::vector<std::shared_ptr<BlockDevice>>(fakes.begin(), fakes.end());
  }
};

MirrorOptions Opts(const std::string& host = {}) {
  MirrorOptions o;
  o.assume_clean = true;
  o.quiet_ms = 600000;
  o.region_size = 64 * 1024;
  o.renew_ms = 100;
  o.lease_ms = 2000;
  if (!host.empty()) {
    o.host_id = "id-" + host;
    o.host_name = host;
  }
  return o;
}

Rig MakeRig(const MirrorOptions& o, const std::string& prefix = "leg") {
  Rig r;
  for (int i = 0; i < 2; ++i) {
    FakeDeviceOptions fo;
    fo.size = kData + MirrorDevice::kLegHeaderBytes;
    fo.name = prefix + std::to_string(i);
    fo.reconnects = true;
    r.fakes.push_back(std::make_shared<FakeDevice>(fo));
  }
  auto res = MirrorDevice::Create(r.Legs(), r.store, o);
  if (res.ok()) r.m = res.value();
  else qWarning("create: %s", res.status().ToString().c_str());
  return r;
}

Status WriteAll(BlockDevice& d, std::uint64_t off, const std::vector<char>& v) {
  for (std::size_t p = 0; p < v.size(); p += kMiB) {
    auto n = static_cast<std::uint32_t>(std::min<std::size_t>(kMiB, v.size() - p));
    DST_RETURN_IF_ERROR(WriteSync(d, off + p, v.data() + p, n));
  }
  return Status::OK();
}

std::vector<char> Pattern(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<char> v(n);
  for (auto& c : v) c = static_cast<char>(rng() | 1);  // never zero: a blank read shows
  return v;
}

bool WaitFor(const std::function<bool()>& pred, int ms = 10000) {
  for (int i = 0; i < ms; ++i) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return pred();
}

LegStatus Leg(MirrorDevice& m, int slot) {
  for (auto& l : m.Legs())
    if (l.slot == slot) return l;
  return {};
}

bool DataEquals(FakeDevice& d, const std::vector<char>& want) {
  std::vector<char> got(want.size());
  d.Peek(0, got.data(), got.size());
  return got == want;
}

std::shared_ptr<MemoryDirtyMapStore> CopyStore(DirtyMapStore& from, const std::string& id) {
  auto s = std::make_shared<MemoryDirtyMapStore>();
  auto rec = from.GetArray(id);
  if (rec.ok()) (void)s->PutArray(rec.value());
  return s;
}
}  // namespace

class MirrorIdentityTest : public QObject {
  Q_OBJECT
 private slots:
  void checkInstalledAndRemoved() {
    Rig r = MakeRig(Opts());
    QVERIFY(r.m);
    QVERIFY(r.fakes[0]->HasConnectCheck());
    QVERIFY(r.fakes[1]->HasConnectCheck());
    QVERIFY(r.m->Close().ok());
    QVERIFY(!r.fakes[0]->HasConnectCheck());
    QVERIFY(!r.fakes[1]->HasConnectCheck());
  }

  void sameContentReconnectStaysUp() {
    Rig r = MakeRig(Opts());
    QVERIFY(r.m);
    auto data = Pattern(kMiB, 1);
    QVERIFY(WriteSync(*r.m, 0, data.data(), kMiB).ok());
    QVERIFY(r.fakes[1]->Reconnect().ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // a few identity rounds
    for (auto& l : r.m->Legs()) {
      QCOMPARE(l.state, LegState::kUpToDate);
      QCOMPARE(l.reason, LegReason::kNone);
    }
  }

  void blankSwapFailsThenFullResync() {
    Rig r = MakeRig(Opts());
    QVERIFY(r.m);
    auto data = Pattern(kData, 2);
    QVERIFY(WriteAll(*r.m, 0, data).ok());
    std::string gen_before = Leg(*r.m, 1).generation;
    r.fakes[1]->SetContents({});  // the exporter came back with a blank file
    Status st = r.fakes[1]->Reconnect();
    QVERIFY(!st.ok());
    // Failed at once, before any read could reach it.
    LegStatus l1 = Leg(*r.m, 1);
    QVERIFY(l1.state != LegState::kUpToDate);
    // Reads never return the blank's zeros, while it is re-initialised and resynced.
    std::vector<char> back(64 * 1024);
    for (int i = 0; i < 200; ++i) {
      std::uint64_t off = (static_cast<std::uint64_t>(i) * 64 * 1024) % kData;
      QVERIFY(ReadSync(*r.m, off, back.data(), static_cast<std::uint32_t>(back.size())).ok());
      QVERIFY(std::memcmp(back.data(), data.data() + off, back.size()) == 0);
    }
    QVERIFY(WaitFor([&] { return Leg(*r.m, 1).state == LegState::kUpToDate; }));
    l1 = Leg(*r.m, 1);
    QCOMPARE(l1.reason, LegReason::kNone);
    QVERIFY(l1.generation != gen_before);
    QVERIFY(!l1.history.empty() && l1.history.front() == "!" + gen_before);  // data discarded
    QVERIFY(DataEquals(*r.fakes[1], data));
    QVERIFY(r.fakes[1]->Reconnect().ok());  // its new header is accepted
  }

  void blankFoundByPeriodicCheckWithoutReconnect() {
    // A device that cannot run checks is still re-checked at every renewal.
    Rig r = MakeRig(Opts());
    QVERIFY(r.m);
    auto data = Pattern(kData, 3);
    QVERIFY(WriteAll(*r.m, 0, data).ok());
    r.fakes[0]->SetContents({});
    QVERIFY(WaitFor([&] { return Leg(*r.m, 0).generation != "" && Leg(*r.m, 0).history.size() >= 1 &&
                                 Leg(*r.m, 0).state == LegState::kUpToDate; }));
    QVERIFY(DataEquals(*r.fakes[0], data));
  }

  void foreignSwapNeedsExplicitReAdd() {
    Rig r = MakeRig(Opts());
    Rig other = MakeRig(Opts(), "other");
    QVERIFY(r.m && other.m);
    auto data = Pattern(kData, 4);
    QVERIFY(WriteAll(*r.m, 0, data).ok());
    r.fakes[1]->SetContents(other.fakes[0]->Contents());  // another array's leg
    QVERIFY(!r.fakes[1]->Reconnect().ok());
    LegStatus l1 = Leg(*r.m, 1);
    QCOMPARE(l1.state, LegState::kFailed);
    QCOMPARE(l1.reason, LegReason::kForeign);
    QVERIFY(QString::fromStdString(l1.reason_text).contains(QString::fromStdString(other.m->id())));
    // Automatic repair refuses it; it stays failed.
    Status a = r.m->ReAddLegAuto(1, r.fakes[1]);
    QCOMPARE(a.code(), Status::Code::kBusy);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    QCOMPARE(Leg(*r.m, 1).state, LegState::kFailed);
    QCOMPARE(Leg(*r.m, 1).reason, LegReason::kForeign);
    // Explicit re-add: full resync with a new generation.
    QVERIFY(r.m->ReAddLeg(1, r.fakes[1]).ok());
    QVERIFY(WaitFor([&] { return Leg(*r.m, 1).state == LegState::kUpToDate; }));
    QVERIFY(DataEquals(*r.fakes[1], data));
  }

  void olderGenerationIsFailed() {
    Rig r = MakeRig(Opts());
    QVERIFY(r.m);
    auto old = r.fakes[1]->Contents();
    r.fakes[1]->SetContents({});
    (void)r.fakes[1]->Reconnect();
    QVERIFY(WaitFor([&] { return Leg(*r.m, 1).state == LegState::kUpToDate; }));
    r.fakes[1]->SetContents(old);  // the leg as it was before its replacement
    QVERIFY(!r.fakes[1]->Reconnect().ok());
    QCOMPARE(Leg(*r.m, 1).reason, LegReason::kOlderGeneration);
    QCOMPARE(r.m->ReAddLegAuto(1, r.fakes[1]).code(), Status::Code::kBusy);
  }

  void rotationKeepsPartialResync() {
    Rig r = MakeRig(Opts());
    QVERIFY(r.m);
    std::string g0 = Leg(*r.m, 0).generation, g1 = Leg(*r.m, 1).generation;
    QVERIFY(r.m->FailLeg(1).ok());
    auto data = Pattern(64 * 1024, 5);
    QVERIFY(WriteSync(*r.m, 0, data.data(), 64 * 1024).ok());
    // The up-to-date set shrank: leg 0 moved on, leg 1 keeps the generation it left at.
    LegStatus l0 = Leg(*r.m, 0);
    QVERIFY(l0.generation != g0);
    QVERIFY(!l0.history.empty() && l0.history.front() == g0);
    QCOMPARE(Leg(*r.m, 1).generation, g1);
    QCOMPARE(Leg(*r.m, 1).reason, LegReason::kOperator);
    QVERIFY(r.fakes[0]->Reconnect().ok());  // leg 0's header carries its new generation
    QCOMPARE(Leg(*r.m, 1).out_of_sync_bytes, std::uint64_t(64 * 1024));
    QVERIFY(r.m->ReAddLeg(1, r.fakes[1]).ok());  // partial: only the missed region
    QVERIFY(WaitFor([&] { return Leg(*r.m, 1).state == LegState::kUpToDate; }));
    QCOMPARE(Leg(*r.m, 1).generation, g1);
    std::vector<char> got(64 * 1024);
    r.fakes[1]->Peek(0, got.data(), got.size());
    QVERIFY(got == data);
  }

  void splitBrainDetectedAndResolved() {
    Rig r = MakeRig(Opts());
    QVERIFY(r.m);
    auto base = Pattern(kData, 6);
    QVERIFY(WriteAll(*r.m, 0, base).ok());
    auto store_b = CopyStore(*r.store, r.m->id());  // host B knows the array as it was
    QVERIFY(r.m->FailLeg(1).ok());                   // A loses leg 1 and goes on with leg 0
    auto a_data = Pattern(64 * 1024, 7);
    QVERIFY(WriteSync(*r.m, 0, a_data.data(), 64 * 1024).ok());
    {
      // B assembles leg 1 alone and writes to it.
      auto b = MirrorDevice::Assemble(r.m->id(), {nullptr, r.fakes[1]}, store_b, Opts());
      QVERIFY2(b.ok(), b.status().ToString().c_str());
      auto b_data = Pattern(128 * 1024, 8);
      QVERIFY(WriteSync(*b.value(), 0, b_data.data(), 128 * 1024).ok());
      QVERIFY(b.value()->Close().ok());
    }
    // Back on A: never resynced automatically, in either direction.
    QCOMPARE(r.m->ReAddLegAuto(1, r.fakes[1]).code(), Status::Code::kBusy);
    QCOMPARE(Leg(*r.m, 1).reason, LegReason::kDiverged);
    QVERIFY(r.m->SplitBrain());
    QCOMPARE(r.m->ReAddLeg(1, r.fakes[1]).code(), Status::Code::kBusy);  // explicit: use resolve
    std::vector<char> b_side = r.fakes[1]->Contents();
    // Dry run: reports, changes nothing.
    auto dry = r.m->Resolve(1, true);
    QVERIFY(dry.ok());
    QCOMPARE(dry->size(), std::size_t(2));
    for (auto& st : dry.value()) QCOMPARE(st.bytes_overwritten, st.keep ? 0 : r.m->Info().size);
    QVERIFY(r.m->SplitBrain());
    QVERIFY(r.fakes[1]->Contents() == b_side);
    // Keep B's side (slot 1): A's leg 0 is resynced from it.
    QVERIFY(r.m->Resolve(1, false).ok());
    QVERIFY(!r.m->SplitBrain());
    QVERIFY(WaitFor([&] { return Leg(*r.m, 0).state == LegState::kUpToDate; }));
    std::vector<char> d0(kData), d1(kData);
    r.fakes[0]->Peek(0, d0.data(), kData);
    r.fakes[1]->Peek(0, d1.data(), kData);
    QVERIFY(d0 == d1);
    QVERIFY(std::memcmp(d1.data(), b_side.data(), kData) == 0);
  }

  void importOfOneLegThenRejoinIsSplitBrain() {
    // A loses leg 1; another host imports leg 1 alone (a takeover: new generation) and writes.
    MirrorOptions ao = Opts("alpha");
    ao.lease_ms = 300;
    Rig r = MakeRig(ao);
    QVERIFY(r.m);
    QVERIFY(r.m->FailLeg(1).ok());
    MirrorOptions bo = Opts("beta");
    // Still claimed by alpha until its lease on leg 1 (no longer renewed) runs out.
    auto early = MirrorDevice::Import({r.fakes[1]}, std::make_shared<MemoryDirtyMapStore>(), bo);
    QCOMPARE(early.status().code(), Status::Code::kBusy);
    QVERIFY(QString::fromStdString(early.status().ToString()).contains("alpha"));
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    {
      auto store_b = std::make_shared<MemoryDirtyMapStore>();
      auto imp2 = MirrorDevice::Import({r.fakes[1]}, store_b, bo);
      QVERIFY2(imp2.ok(), imp2.status().ToString().c_str());
      bo.new_generations = true;
      auto b = MirrorDevice::Assemble(imp2->first, imp2->second, store_b, bo);
      QVERIFY2(b.ok(), b.status().ToString().c_str());
      auto d = Pattern(4096, 11);
      QVERIFY(WriteSync(*b.value(), 8192, d.data(), 4096).ok());
      QVERIFY(b.value()->Close().ok());
    }
    QCOMPARE(r.m->ReAddLegAuto(1, r.fakes[1]).code(), Status::Code::kBusy);
    QCOMPARE(Leg(*r.m, 1).reason, LegReason::kDiverged);
    QVERIFY(r.m->SplitBrain());
  }

  void secondAssemblerRefusedWithOwnerNamed() {
    Rig r = MakeRig(Opts("alpha"));
    QVERIFY(r.m);
    QCOMPARE(Leg(*r.m, 0).owner_name, std::string("alpha"));
    auto store_b = CopyStore(*r.store, r.m->id());
    auto b = MirrorDevice::Assemble(r.m->id(), r.Legs(), store_b, Opts("beta"));
    QVERIFY(!b.ok());
    QVERIFY2(QString::fromStdString(b.status().ToString()).contains("claimed by host alpha"),
             b.status().ToString().c_str());
    // Create over them is refused too, with the owner named.
    MirrorOptions fo = Opts("beta");
    fo.force_create = true;
    auto c = MirrorDevice::Create(r.Legs(), std::make_shared<MemoryDirtyMapStore>(), fo);
    QVERIFY(!c.ok());
    QVERIFY(QString::fromStdString(c.status().ToString()).contains("alpha"));
    // The first keeps running healthy.
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    for (auto& l : r.m->Legs()) QCOMPARE(l.state, LegState::kUpToDate);
    // A clean close releases the claims: a hand-over works.
    QVERIFY(r.m->Close().ok());
    auto b2 = MirrorDevice::Assemble(r.m->id(), r.Legs(), store_b, Opts("beta"));
    QVERIFY2(b2.ok(), b2.status().ToString().c_str());
    for (auto& l : b2.value()->Legs()) {
      QCOMPARE(l.state, LegState::kUpToDate);
      QCOMPARE(l.owner_name, std::string("beta"));
    }
  }

  void createRefusesAnotherArraysLegUnlessForced() {
    Rig r = MakeRig(Opts());
    QVERIFY(r.m);
    QVERIFY(r.m->Close().ok());
    auto c = MirrorDevice::Create(r.Legs(), std::make_shared<MemoryDirtyMapStore>(), Opts());
    QCOMPARE(c.status().code(), Status::Code::kExists);
    MirrorOptions fo = Opts();
    fo.force_create = true;
    auto c2 = MirrorDevice::Create(r.Legs(), std::make_shared<MemoryDirtyMapStore>(), fo);
    QVERIFY(c2.ok());
  }

  void takeoverByAnotherHostFailsLegOnRenewal() {
    Rig r = MakeRig(Opts("alpha"));
    QVERIFY(r.m);
    // Another host wrote its claim on leg 1 (as if our lease had expired while we were stopped).
    Rig thief = MakeRig(Opts("gamma"), "t");
    QVERIFY(thief.m);
    std::vector<char> hdr(MirrorDevice::kLegHeaderBytes);
    std::vector<char> mine(MirrorDevice::kLegHeaderBytes);
    r.fakes[1]->Peek(kData, mine.data(), mine.size());
    thief.fakes[1]->Peek(kData, hdr.data(), hdr.size());
    // Our header with gamma's owner fields (448..640).
    std::memcpy(mine.data() + 448, hdr.data() + 448, 192);
    std::memcpy(mine.data() + 32, hdr.data() + 32, 8);
    // (Re-poked until seen: a renewal in flight may rewrite our claim once.)
    QVERIFY(WaitFor([&] {
      if (Leg(*r.m, 1).reason == LegReason::kClaimed) return true;
      r.fakes[1]->Poke(kData, mine.data(), mine.size());
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      return false;
    }, 3000));
    QCOMPARE(Leg(*r.m, 1).state, LegState::kFailed);
    QVERIFY(QString::fromStdString(Leg(*r.m, 1).reason_text).contains("gamma"));
    std::uint64_t w = r.fakes[1]->writes();
    auto data = Pattern(4096, 9);
    QVERIFY(WriteSync(*r.m, 0, data.data(), 4096).ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    QCOMPARE(r.fakes[1]->writes(), w);  // nothing more written to it
    QCOMPARE(r.m->ReAddLegAuto(1, r.fakes[1]).code(), Status::Code::kBusy);
  }

  void expiredLeaseReconfirmedBeforeWriting() {
    // As after SIGSTOP of the assembler past its lease: the next write first re-reads the
    // headers; a leg another host claimed meanwhile gets nothing more.
    MirrorOptions o = Opts("alpha");
    o.lease_ms = 150;
    o.renew_ms = 60000;  // no periodic renewal during the test
    Rig r = MakeRig(o);
    Rig thief = MakeRig(Opts("gamma"), "t");
    QVERIFY(r.m && thief.m);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // our lease is over
    std::vector<char> mine(MirrorDevice::kLegHeaderBytes), hdr(MirrorDevice::kLegHeaderBytes);
    r.fakes[1]->Peek(kData, mine.data(), mine.size());
    thief.fakes[1]->Peek(kData, hdr.data(), hdr.size());
    std::memcpy(mine.data() + 448, hdr.data() + 448, 192);  // gamma's claim (owner fields)
    std::memcpy(mine.data() + 32, hdr.data() + 32, 8);      // and its live lease
    r.fakes[1]->Poke(kData, mine.data(), mine.size());
    const std::uint64_t reads0 = r.fakes[0]->reads(), writes1 = r.fakes[1]->writes();
    auto data = Pattern(4096, 10);
    QVERIFY(WriteSync(*r.m, 0, data.data(), 4096).ok());
    QVERIFY(r.fakes[0]->reads() > reads0);  // header re-read before the write went out
    QCOMPARE(r.fakes[1]->writes(), writes1);
    QCOMPARE(Leg(*r.m, 1).reason, LegReason::kClaimed);
    QCOMPARE(Leg(*r.m, 0).state, LegState::kUpToDate);
    std::vector<char> back(4096);
    r.fakes[0]->Peek(0, back.data(), back.size());
    QVERIFY(back == data);
  }
};

DST_TEST_MAIN(MirrorIdentityTest)
#include "mirror_identity_test.moc"
