// HostSession's protocol steps against a scripted dstd (a QLocalServer on a socket in a temp
// dir, driven from the test's event loop): connect -> status -> events; a change event takes a
// fresh status, a progress event patches the snapshot without one; after a lost connection it
// reconnects and subscribes with since = the last seq it saw; a gap takes a fresh status; an
// unanswered status counts as a lost connection.
#include <QtTest/QtTest>

#include <QTemporaryDir>

#include "host_session.h"
#include "scripted_daemon.h"
#include "test_env.h"

using dst::gui::HostSession;
using dst::test::ScriptedDaemon;
using nlohmann::json;

namespace {

json Mirror(double percent) {
  return {{"name", "m0"},
          {"state", "resyncing"},
          {"legs", json::array()},
          {"progress", {{{"leg", 1}, {"state", "running"}, {"percent", percent}, {"bytes_done", 0},
                         {"bytes_total", 100}, {"rate", 0}, {"eta_seconds", -1.0}}}}};
}

}  // namespace

class HostSessionProtocolTest : public QObject {
  Q_OBJECT
 private slots:
  void statusEventsResumeAndGap() {
    QTemporaryDir dir;
    ScriptedDaemon d(dir.path() + "/dstd.sock");
    QVERIFY(d.ok);
    d.snapshot["arrays"].push_back(Mirror(0));
    HostSession s(dir.path() + "/dstd.sock");
    s.setBackoff(20, 100);
    QSignalSpy online(&s, &HostSession::onlineChanged);
    QSignalSpy snapshots(&s, &HostSession::snapshotChanged);
    s.start();
    QTRY_VERIFY_WITH_TIMEOUT(s.state() == HostSession::State::kOnline, 5000);
    QCOMPARE(online.count(), 1);
    // status first, then events without since, then status again (what changed in between).
    QTRY_COMPARE(d.Requests("status").size(), std::size_t(2));
    QCOMPARE(d.requests[0]["method"], json("status"));
    QCOMPARE(d.requests[1]["method"], json("events"));
    QVERIFY(!d.requests[1].contains("params") || !d.requests[1]["params"].contains("since"));

    // A change: a fresh status, and the snapshot says what the daemon says.
    d.snapshot["exports"].push_back({{"name", "e1"}, {"size", 1}});
    d.Send({{"type", "export_added"}, {"seq", 7}, {"ts", 1.0}, {"export", "e1"}});
    QTRY_COMPARE(d.Requests("status").size(), std::size_t(3));
    QTRY_COMPARE(s.snapshot()["exports"].size(), std::size_t(1));
    QCOMPARE(s.lastSeq(), std::uint64_t(7));

    // Progress: patched into the snapshot, no status call.
    int before = snapshots.count();
    d.Send({{"type", "resync_progress"}, {"seq", 8}, {"ts", 2.0}, {"array", "m0"}, {"leg", 1},
            {"state", "running"}, {"bytes_done", 50}, {"bytes_total", 100}, {"percent", 50.0},
            {"rate", 10}, {"eta_seconds", 5.0}});
    QTRY_VERIFY(snapshots.count() > before);
    QCOMPARE(s.snapshot()["arrays"][0]["progress"][0]["percent"], json(50.0));
    QCOMPARE(s.snapshot()["arrays"][0]["progress"][0]["bytes_done"], json(50));
    QCOMPARE(d.Requests("status").size(), std::size_t(3));

    // Connection lost: offline, then back by itself, resuming after seq 8.
    d.Drop();
    QTRY_COMPARE_WITH_TIMEOUT(online.count(), 3, 5000);  // false, then true again
    QCOMPARE(online[1][0].toBool(), false);
    QCOMPARE(online[2][0].toBool(), true);
    QTRY_VERIFY_WITH_TIMEOUT(s.state() == HostSession::State::kOnline, 5000);
    QCOMPARE(d.connections, 2);
    auto subs = d.Requests("events");
    QCOMPARE(subs.size(), std::size_t(2));
    QCOMPARE(subs[1]["params"]["since"], json(8));
    std::size_t statuses = d.Requests("status").size();
    QCOMPARE(statuses, std::size_t(4));  // one per connection before subscribing

    // A gap (dstd restarted or the ring moved on): a fresh status.
    d.Send({{"type", "gap"}, {"ts", 3.0}, {"since", 8}, {"first_seq", 1}, {"last_seq", 2},
            {"missed", nullptr}, {"reason", "restarted"}});
    QTRY_COMPARE(d.Requests("status").size(), statuses + 1);
  }

  // A dstd that accepts but never answers `status` (stopped, hung) is given up and retried.
  void unansweredStatusIsALostConnection() {
    QTemporaryDir dir;
    ScriptedDaemon d(dir.path() + "/dstd.sock");
    QVERIFY(d.ok);
    d.mute_status = true;
    HostSession s(dir.path() + "/dstd.sock");
    s.setBackoff(20, 40);
    s.setReplyTimeout(100);
    QSignalSpy online(&s, &HostSession::onlineChanged);
    s.start();
    QTRY_VERIFY_WITH_TIMEOUT(d.connections >= 3, 5000);
    QCOMPARE(online.count(), 0);
    d.mute_status = false;  // it answers again: the next attempt gets through
    QTRY_VERIFY_WITH_TIMEOUT(s.state() == HostSession::State::kOnline, 5000);
  }
};

DST_TEST_MAIN(HostSessionProtocolTest)
#include "host_session_protocol_test.moc"
