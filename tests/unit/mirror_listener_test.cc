// MirrorDevice's leg listener (issue 10 item 5): every leg state transition and reason change
// is reported synchronously, in order, each starting where the previous one of that leg ended
// -- including the ones that last only as long as a resync of a few regions.
#include <QtTest/QtTest>

#include <mutex>

#include "dst/mirror_device.h"
#include "fake_device.h"

using namespace dst;
using dst::test::FakeDevice;
using dst::test::FakeDeviceOptions;

namespace {

constexpr std::uint64_t kData = 4 << 20;

std::shared_ptr<FakeDevice> Leg(int i) {
  FakeDeviceOptions fo;
  fo.size = kData + MirrorDevice::kLegHeaderBytes;
  fo.name = "leg" + std::to_string(i);
  return std::make_shared<FakeDevice>(fo);
}

struct Recorder {
  std::mutex mu;
  std::vector<LegTransition> seen;
  std::vector<std::string> devices;
  void Add(const LegTransition& t) {
    std::lock_guard<std::mutex> l(mu);
    seen.push_back(t);
    devices.emplace_back(t.device);
  }
  // State transitions of `slot`, as "from>to".
  QStringList States(int slot) {
    std::lock_guard<std::mutex> l(mu);
    QStringList out;
    for (auto& t : seen)
      if (t.slot == slot && t.from != t.to)
        out << QString("%1>%2").arg(LegStateName(t.from), LegStateName(t.to));
    return out;
  }
};

}  // namespace

class MirrorListenerTest : public QObject {
  Q_OBJECT
 private slots:
  void everyTransitionInOrder() {
    auto store = std::make_shared<MemoryDirtyMapStore>();
    MirrorOptions o;
    o.assume_clean = true;
    o.region_size = 64 * 1024;
    auto legs = std::vector<std::shared_ptr<BlockDevice>>{Leg(0), Leg(1)};
    auto r = MirrorDevice::Create(legs, store, o);
    QVERIFY(r.ok());
    auto m = r.value();
    Recorder rec;
    m->SetLegListener([&](const LegTransition& t) { rec.Add(t); });

    QVERIFY(m->FailLeg(1).ok());
    {
      std::lock_guard<std::mutex> l(rec.mu);
      QVERIFY(!rec.seen.empty());
      // The reason comes with (or before) the state change; both synchronously.
      bool reason = false;
      for (auto& t : rec.seen)
        reason |= t.slot == 1 && t.reason == LegReason::kOperator && t.reason_from == LegReason::kNone;
      QVERIFY(reason);
      QVERIFY2(rec.devices.back().find("leg1") != std::string::npos, rec.devices.back().c_str());
    }
    QCOMPARE(rec.States(1), QStringList{"up-to-date>failed"});
    QVERIFY(m->ReAddLeg(1, legs[1]).ok());
    QVERIFY(m->WaitResyncIdle(std::chrono::seconds(10)));
    QVERIFY(m->DetachLeg(1).ok());
    QVERIFY(m->RemoveLeg(1).ok());
    // A new leg: reserved (failed), full resync, up to date.
    auto added = m->AddLeg(Leg(2));
    QVERIFY(added.ok());
    QVERIFY(m->WaitResyncIdle(std::chrono::seconds(10)));
    const int s = added.value();
    QStringList one = rec.States(1);
    qInfo("slot 1: %s", qPrintable(one.join(", ")));
    // Re-added with nothing to catch up: straight back to up-to-date.
    QCOMPARE(one.mid(0, 2), (QStringList{"up-to-date>failed", "failed>up-to-date"}));
    QVERIFY(one.contains("up-to-date>detached"));
    QVERIFY(one.contains("detached>empty"));
    QStringList added_states = rec.States(s);
    qInfo("slot %d: %s", s, qPrintable(added_states.join(", ")));
    QVERIFY(added_states.endsWith("resyncing>up-to-date"));
    QVERIFY(added_states.contains("failed>resyncing"));
    // Chained: each transition of a slot starts where the previous one ended.
    std::lock_guard<std::mutex> l(rec.mu);
    std::map<int, LegState> last;
    for (auto& t : rec.seen) {
      if (t.from == t.to) continue;
      if (last.count(t.slot)) QCOMPARE(int(t.from), int(last[t.slot]));
      last[t.slot] = t.to;
    }
    m->SetLegListener(nullptr);
    QVERIFY(m->FailLeg(s).ok());  // no listener: nothing recorded, nothing crashes
    QCOMPARE(int(last[s]), int(LegState::kUpToDate));
    QVERIFY(m->Close().ok());
  }
};

QTEST_GUILESS_MAIN(MirrorListenerTest)
#include "mirror_listener_test.moc"
