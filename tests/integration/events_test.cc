// Pushed events through dstctl (issue 10 item 5): a leg failed and re-added in quick succession
// shows every transition in order (each event's "previous" is the state before), with
// increasing sequence numbers; a subscriber that reconnects with --since N gets exactly the
// events it missed; --since older than the ring (here: from another dstd run) is said as a gap,
// never silently; resync progress comes at most 4 a second per leg with done/total/rate/eta.
#include <QtTest/QtTest>

#include <map>

#include "array_helpers.h"
#include "event_tap.h"
#include "fault_proxy.h"
#include "test_env.h"

using namespace dst::test;
using nlohmann::json;

namespace {

constexpr int kLegMiB = 48;

bool Initial(const json& e) { return e.value("initial", false); }
std::uint64_t Seq(const json& e) { return e.value("seq", std::uint64_t{0}); }

// The live (not snapshot) events, checked to be in strictly increasing seq order.
bool Live(const std::vector<json>& lines, std::vector<json>* out, QString* why) {
  out->clear();
  std::uint64_t last = 0;
  for (const json& e : lines) {
    if (Initial(e) || e.value("type", "") == "gap") continue;
    if (!e.contains("seq") || Seq(e) <= last) {
      *why = QString::fromStdString("seq not increasing at " + e.dump());
      return false;
    }
    last = Seq(e);
    out->push_back(e);
  }
  return true;
}

std::vector<json> LegStates(const std::vector<json>& live, int slot) {
  std::vector<json> v;
  for (const json& e : live)
    if (e.value("type", "") == "leg_state" && e.value("array", "") == "m0" &&
        e.value("slot", -1) == slot)
      v.push_back(e);
  return v;
}

}  // namespace

class EventsTest : public QObject {
  Q_OBJECT
 private slots:
  void transitionsResumeGapAndProgress() {
    MirrorRig rig;
    QString why;
    QVERIFY2(rig.StartCleanMirror(3, kLegMiB, &why), qPrintable(why));
    json a;

    EventTap all, cut;
    QVERIFY(all.Start(*rig.as));
    QVERIFY(cut.Start(*rig.as));
    // Both have their snapshot (the state as of a seq) before anything changes.
    QVERIFY(WaitUntil([&] {
      auto x = all.Lines(), y = cut.Lines();
      return !x.empty() && Initial(x[0]) && !y.empty() && Initial(y[0]);
    }, 10000));

    // Fail leg 1, write while it is out (so it has regions to catch up), re-add it at once.
    QByteArray out, err;
    QVERIFY2(rig.as->Ctl({"array", "fail-leg", "m0", "1"}, &out, &err) == 0, err.constData());
    QVERIFY(PwriteDirect(rig.File("m0"), 0, Pattern(7, 0, 1 << 20)));
    // The cut subscriber goes away after seeing the failure.
    std::uint64_t cut_at = 0;
    QVERIFY(WaitUntil([&] {
      for (const json& e : cut.Lines())
        if (e.value("type", "") == "leg_state" && e.value("state", "") == "failed") {
          cut_at = Seq(e);
          return true;
        }
      return false;
    }, 10000));
    cut.Kill();
    QVERIFY2(rig.as->Ctl({"array", "re-add-leg", "m0", "1"}, &out, &err) == 0, err.constData());
    QVERIFY2(WaitArrayClean(*rig.as, "m0", 60000, &a), a.dump().c_str());

    // Every transition of leg 1, in order, each starting where the previous one ended.
    std::vector<json> live;
    QVERIFY(WaitUntil([&] {
      QString w;
      if (!Live(all.Lines(), &live, &w)) return false;
      auto v = LegStates(live, 1);
      return !v.empty() && v.back().value("state", "") == "up-to-date";
    }, 10000));
    QVERIFY2(Live(all.Lines(), &live, &why), qPrintable(why));
    std::vector<json> legs = LegStates(live, 1);
    QStringList seen;
    for (const json& e : legs) seen << QString::fromStdString(e.value("state", ""));
    qInfo("leg 1: %s", qPrintable(seen.join(" -> ")));
    QVERIFY2(legs.size() >= 3, qPrintable(seen.join(",")));
    QCOMPARE(legs.front().value("previous", ""), std::string("up-to-date"));
    QCOMPARE(legs.front().value("state", ""), std::string("failed"));
    for (std::size_t i = 1; i < legs.size(); ++i)
      QVERIFY2(legs[i].value("previous", "") == legs[i - 1].value("state", ""),
               legs[i].dump().c_str());
    QVERIFY2(seen.contains("resyncing"), qPrintable(seen.join(",")));  // lasted milliseconds
    QCOMPARE(legs.back().value("state", ""), std::string("up-to-date"));
    bool operator_reason = false, started = false, done = false;
    for (const json& e : live) {
      operator_reason |= e.value("type", "") == "leg_reason" && e.value("reason", "") == "operator";
      started |= e.value("type", "") == "resync_started" && e.value("leg", -1) == 1;
      done |= e.value("type", "") == "resync_done" && e.value("leg", -1) == 1;
    }
    QVERIFY(operator_reason);
    QVERIFY(started);
    QVERIFY(WaitUntil([&] {
      Live(all.Lines(), &live, &why);
      for (const json& e : live)
        if (e.value("type", "") == "resync_done" && e.value("leg", -1) == 1) return true;
      return false;
    }, 5000));

    // Reconnect after cut_at: exactly what the uninterrupted subscriber saw after it.
    QTest::qWait(600);  // quiet: derived states settled
    Live(all.Lines(), &live, &why);
    const std::uint64_t last = Seq(live.back());
    EventTap resumed;
    QVERIFY(resumed.Start(*rig.as, qint64(cut_at)));
    std::vector<json> got;
    QVERIFY(WaitUntil([&] {
      got = resumed.Lines();
      return !got.empty() && Seq(got.back()) >= last;
    }, 10000));
    std::vector<json> want;
    for (const json& e : live)
      if (Seq(e) > cut_at && Seq(e) <= last) want.push_back(e);
    std::vector<json> got_upto;
    for (const json& e : got) {
      QVERIFY2(!Initial(e) && e.value("type", "") != "gap", e.dump().c_str());
      if (Seq(e) <= last) got_upto.push_back(e);
    }
    QCOMPARE(got_upto.size(), want.size());
    for (std::size_t i = 0; i < want.size(); ++i) QCOMPARE(got_upto[i].dump(), want[i].dump());
    resumed.Kill();

    // A resume point this dstd never issued: an explicit gap (stdout and stderr), then the
    // current state as a snapshot.
    EventTap gap;
    QVERIFY(gap.Start(*rig.as, 1000000000));
    QVERIFY(WaitUntil([&] {
      auto x = gap.Lines();
      return x.size() >= 2 && Initial(x.back());
    }, 10000));
    std::vector<json> gl = gap.Lines();
    QCOMPARE(gl[0].value("type", ""), std::string("gap"));
    QCOMPARE(gl[0].value("reason", ""), std::string("restarted"));
    QVERIFY(Initial(gl[1]));
    gap.Kill();
    QVERIFY2(gap.p.readAllStandardError().contains("gap"), "no gap message on stderr");

    // Progress of a full resync (a new leg) at 8 MiB/s: at most 4 events a second for the leg.
    QVERIFY2(rig.as->Ctl({"array", "resync-rate", "m0", "--min", "8M", "--max", "8M"}, &out, &err) == 0,
             err.constData());
    QVERIFY2(rig.as->Ctl({"array", "add-leg", "m0", rig.Uri(2)}, &out, &err) == 0, err.constData());
    QVERIFY2(WaitArrayClean(*rig.as, "m0", 60000, &a), a.dump().c_str());
    QVERIFY2(Live(all.Lines(), &live, &why), qPrintable(why));
    std::vector<json> prog;
    for (const json& e : live)
      if (e.value("type", "") == "resync_progress" && e.value("leg", -1) == 2 &&
          e.value("state", "") == "running")
        prog.push_back(e);
    qInfo("%zu progress events for leg 2", prog.size());
    QVERIFY2(prog.size() >= 3, qPrintable(QString::number(prog.size())));
    std::uint64_t total = prog[0].value("bytes_total", std::uint64_t{0});
    QVERIFY(total > 0);
    std::uint64_t prev_done = 0;
    for (std::size_t i = 0; i < prog.size(); ++i) {
      const json& e = prog[i];
      for (const char* k : {"bytes_done", "bytes_total", "rate", "eta_seconds", "percent"})
        QVERIFY2(e.contains(k) && e[k].is_number(), e.dump().c_str());
      QCOMPARE(e.value("bytes_total", std::uint64_t{0}), total);
      QVERIFY2(e.value("bytes_done", std::uint64_t{0}) >= prev_done, e.dump().c_str());
      prev_done = e.value("bytes_done", std::uint64_t{0});
      if (i > 0) {
        double gap_s = e.value("ts", 0.0) - prog[i - 1].value("ts", 0.0);
        QVERIFY2(gap_s >= 0.2, qPrintable(QString("%1 s between progress events").arg(gap_s)));
      }
    }
    double span = prog.back().value("ts", 0.0) - prog.front().value("ts", 0.0);
    QVERIFY2(double(prog.size()) <= 4 * span + 1.5,
             qPrintable(QString("%1 events in %2 s").arg(prog.size()).arg(span)));
  }
  // A network volume's state is pushed by its client as it changes (not polled): an exporter
  // killed and restarted shows connected -> reconnecting -> connected, each event continuing
  // where the previous one ended and none repeated (the poller must not emit them a second time).
  void volumeStatesArePushedOnce() {
    MirrorRig rig;
    QString why;
    QVERIFY2(rig.StartEmpty(1, 16, &why), qPrintable(why));
    EventTap all;
    QVERIFY(all.Start(*rig.as));
    QTest::qWait(1000);  // subscribed (nothing to snapshot yet)
    QByteArray out, err;
    QVERIFY2(rig.as->Ctl({"volume", "import", "v0", rig.Uri(0), "--timeout", "30"}, &out, &err) == 0,
             err.constData());
    auto states = [&] {
      std::vector<json> live, v;
      QString w;
      Live(all.Lines(), &live, &w);
      for (const json& e : live)
        if (e.value("type", "") == "volume_state" && e.value("volume", "") == "v0") v.push_back(e);
      return v;
    };
    auto last_is = [&](const char* st) {
      auto v = states();
      return !v.empty() && v.back().value("state", "") == st;
    };
    QVERIFY(WaitUntil([&] { return last_is("connected"); }, 10000));
    rig.ex[0]->Kill9();
    QVERIFY(WaitUntil([&] { return last_is("reconnecting"); }, 10000));
    QVERIFY(rig.ex[0]->Start());
    QVERIFY(WaitUntil([&] { return last_is("connected"); }, 15000));
    QTest::qWait(600);  // a poller that also emitted would have done so by now
    std::vector<json> v = states();
    QStringList seen;
    for (const json& e : v) seen << QString::fromStdString(e.value("state", ""));
    qInfo("v0: %s", qPrintable(seen.join(" -> ")));
    QVERIFY2(v.size() >= 3, qPrintable(seen.join(",")));
    for (std::size_t i = 1; i < v.size(); ++i) {
      QVERIFY2(v[i].value("state", "") != v[i - 1].value("state", ""), qPrintable(seen.join(",")));
      QVERIFY2(v[i].value("previous", "") == v[i - 1].value("state", ""), v[i].dump().c_str());
    }
    QVERIFY2(seen.contains("reconnecting"), qPrintable(seen.join(",")));
  }

  // Outages far shorter than the 250 ms poll tick (after a connection that answered, the client
  // retries at once): a poller would see few of them, the pushed states show every one.
  void shortVolumeOutagesAreAllSeen() {
    MirrorRig rig;
    QString why;
    QVERIFY2(rig.StartEmpty(1, 16, &why), qPrintable(why));
    FaultProxy proxy(rig.ex[0]->port());
    EventTap all;
    QVERIFY(all.Start(*rig.as));
    QTest::qWait(1000);
    QByteArray out, err;
    const QString uri = QString("dst://127.0.0.1:%1/d0").arg(proxy.port());
    QVERIFY2(rig.as->Ctl({"volume", "import", "v0", uri, "--timeout", "30"}, &out, &err) == 0,
             err.constData());
    auto count = [&](const char* st, std::string* last) {
      std::vector<json> live;
      QString w;
      Live(all.Lines(), &live, &w);
      int n = 0;
      for (const json& e : live)
        if (e.value("type", "") == "volume_state" && e.value("volume", "") == "v0") {
          *last = e.value("state", "");
          n += *last == st;
        }
      return n;
    };
    std::string last;
    QVERIFY(WaitUntil([&] { return count("connected", &last) == 1 && last == "connected"; }, 10000));
    QVERIFY(WaitFileExists(rig.File("v0"), 10000));
    constexpr int kDrops = 5;
    for (int i = 1; i <= kDrops; ++i) {
      // A read answered on this connection: the client then retries at once after the drop
      // (no backoff), so the outage lasts milliseconds.
      QByteArray back;
      int e = 0;
      QVERIFY2(PreadDirect(rig.File("v0"), 0, 4096, &back, &e), qPrintable(QString("errno %1").arg(e)));
      proxy.DropConnections();
      QVERIFY2(WaitUntil([&] { return count("connected", &last) == i + 1 && last == "connected"; },
                         10000),
               qPrintable(QString("drop %1: last state %2").arg(i).arg(last.c_str())));
    }
    QCOMPARE(count("reconnecting", &last), kDrops);
    // How long each outage lasted, by the events' own timestamps (shorter than a poll tick).
    std::vector<json> live;
    QString w;
    Live(all.Lines(), &live, &w);
    QStringList ms;
    double down = -1;
    for (const json& e : live) {
      if (e.value("type", "") != "volume_state" || e.value("volume", "") != "v0") continue;
      if (e.value("state", "") == "reconnecting") down = e.value("ts", 0.0);
      else if (e.value("state", "") == "connected" && down >= 0)
        ms << QString::number(int((e.value("ts", 0.0) - down) * 1000)), down = -1;
    }
    qInfo("outages (ms): %s", qPrintable(ms.join(" ")));
  }
};

QTEST_GUILESS_MAIN(EventsTest)
#include "events_test.moc"
