// dstd's event ring (daemon/src/events.h, issue 10 item 5): sequence numbers, resume with
// `since` without a gap or a duplicate, the explicit gap line when `since` is older than the
// ring (or from another dstd run), dropped subscribers, and the progress rate gate.
#include <QtTest/QtTest>

#include <atomic>
#include <mutex>
#include <thread>

#include "events.h"

using dst::daemon::EventLog;
using dst::daemon::ProgressGate;
using nlohmann::json;

namespace {

// Collects the lines a subscriber receives.
struct Collector {
  std::mutex mu;
  std::vector<json> lines;
  bool alive = true;
  EventLog::Sink Sink() {
    return [this](const std::string& line) {
      std::lock_guard<std::mutex> l(mu);
      if (!alive) return false;
      lines.push_back(json::parse(line));
      return true;
    };
  }
  std::vector<std::uint64_t> Seqs() {
    std::lock_guard<std::mutex> l(mu);
    std::vector<std::uint64_t> s;
    for (auto& j : lines) s.push_back(j.value("seq", std::uint64_t{0}));
    return s;
  }
};

std::vector<std::uint64_t> Range(std::uint64_t a, std::uint64_t b) {
  std::vector<std::uint64_t> v;
  for (std::uint64_t i = a; i <= b; ++i) v.push_back(i);
  return v;
}

json Ev(int n) { return json{{"type", "test"}, {"n", n}}; }

}  // namespace

class EventLogTest : public QObject {
  Q_OBJECT
 private slots:
  void sequenceNumbersAndStamps() {
    EventLog log(8);
    QCOMPARE(log.last_seq(), std::uint64_t{0});
    QCOMPARE(log.first_seq(), std::uint64_t{1});
    QCOMPARE(log.Emit(Ev(1)), std::uint64_t{1});
    QCOMPARE(log.Emit(Ev(2)), std::uint64_t{2});
    QCOMPARE(log.Emit(json{{"type", "x"}, {"ts", 5.0}}), std::uint64_t{3});
    Collector c;
    QVERIFY(log.Subscribe(0, c.Sink()).ok);
    QCOMPARE(c.Seqs(), Range(1, 3));
    QCOMPARE(c.lines[0]["n"], json(1));
    QVERIFY(c.lines[0]["ts"].get<double>() > 1.6e9);  // stamped with the wall clock
    QCOMPARE(c.lines[2]["ts"], json(5.0));              // a given ts is kept
  }

  void resumeReplaysExactlyTheMissedEventsThenLive() {
    EventLog log(16);
    for (int i = 1; i <= 10; ++i) log.Emit(Ev(i));
    Collector c;
    EventLog::Subscribed r = log.Subscribe(7, c.Sink());
    QVERIFY(r.ok && !r.gap);
    QCOMPARE(r.first_seq, std::uint64_t{1});
    QCOMPARE(r.last_seq, std::uint64_t{10});
    log.Emit(Ev(11));
    log.Emit(Ev(12));
    QCOMPARE(c.Seqs(), Range(8, 12));
    // Up to date: nothing replayed, live only.
    Collector d;
    QVERIFY(log.Subscribe(12, d.Sink()).ok);
    QVERIFY(d.Seqs().empty());
    log.Emit(Ev(13));
    QCOMPARE(d.Seqs(), Range(13, 13));
    QCOMPARE(c.Seqs(), Range(8, 13));
  }

  void sinceOlderThanTheRingIsAGapNotASilentHole() {
    EventLog log(4);
    for (int i = 1; i <= 10; ++i) log.Emit(Ev(i));
    QCOMPARE(log.first_seq(), std::uint64_t{7});
    // Oldest still resumable: since = first_seq - 1.
    Collector ok;
    QVERIFY(log.Subscribe(6, ok.Sink()).ok);
    QCOMPARE(ok.Seqs(), Range(7, 10));
    // One too old: event 6 is gone.
    Collector c;
    EventLog::Subscribed r = log.Subscribe(5, c.Sink());
    QVERIFY(!r.ok);
    QVERIFY(r.gap);
    QCOMPARE(c.lines.size(), std::size_t{1});
    const json& g = c.lines[0];
    QCOMPARE(g["type"], json("gap"));
    QCOMPARE(g["reason"], json("evicted"));
    QCOMPARE(g["since"], json(5));
    QCOMPARE(g["first_seq"], json(7));
    QCOMPARE(g["last_seq"], json(10));
    QCOMPARE(g["missed"], json(1));
    QVERIFY(!g.contains("seq"));  // not an event of the ring
    // Not subscribed: the caller sends a snapshot and subscribes again from last_seq.
    log.Emit(Ev(11));
    QCOMPARE(c.lines.size(), std::size_t{1});
    QCOMPARE(ok.Seqs(), Range(7, 11));
  }

  void sinceAheadOfTheLogIsAnotherRun() {
    EventLog log(4);
    log.Emit(Ev(1));
    Collector c;
    EventLog::Subscribed r = log.Subscribe(500, c.Sink());
    QVERIFY(r.gap && !r.ok);
    QCOMPARE(c.lines.size(), std::size_t{1});
    QCOMPARE(c.lines[0]["reason"], json("restarted"));
    QVERIFY(c.lines[0]["missed"].is_null());
  }

  void goneSubscribersAreDropped() {
    EventLog log(4);
    Collector a, b;
    QVERIFY(log.Subscribe(0, a.Sink()).ok);
    QVERIFY(log.Subscribe(0, b.Sink()).ok);
    QCOMPARE(log.subscribers(), std::size_t{2});
    {
      std::lock_guard<std::mutex> l(a.mu);
      a.alive = false;
    }
    log.Emit(Ev(1));
    QCOMPARE(log.subscribers(), std::size_t{1});
    QCOMPARE(b.Seqs(), Range(1, 1));
    log.Stop();
    QCOMPARE(log.subscribers(), std::size_t{0});
    QCOMPARE(log.Emit(Ev(2)), std::uint64_t{0});
  }

  // Subscribing while another thread emits: every seq after `since` exactly once, in order.
  void resumeRacesWithEmitters() {
    EventLog log(1 << 20);
    std::atomic<bool> stop{false};
    std::thread emitter([&] {
      for (int i = 0; !stop; ++i) log.Emit(Ev(i));
    });
    while (log.last_seq() < 1000) std::this_thread::yield();
    std::vector<std::unique_ptr<Collector>> cs;
    std::vector<std::uint64_t> since;
    for (int i = 0; i < 20; ++i) {
      cs.push_back(std::make_unique<Collector>());
      since.push_back(log.last_seq() / 2 + std::uint64_t(i));
      QVERIFY(log.Subscribe(since.back(), cs.back()->Sink()).ok);
    }
    while (log.last_seq() < 20000) std::this_thread::yield();
    stop = true;
    emitter.join();
    const std::uint64_t last = log.last_seq();
    for (std::size_t i = 0; i < cs.size(); ++i) QCOMPARE(cs[i]->Seqs(), Range(since[i] + 1, last));
  }

  void progressAtMostFourASecondPerKey() {
    ProgressGate g(4.0);
    QVERIFY(g.Allow("m0/1", 100.0));
    QVERIFY(!g.Allow("m0/1", 100.1));
    QVERIFY(g.Allow("m0/2", 100.1));  // another leg has its own budget
    QVERIFY(!g.Allow("m0/1", 100.24));
    QVERIFY(g.Allow("m0/1", 100.25));
    int allowed = 0;
    for (int i = 0; i < 1000; ++i) allowed += g.Allow("m0/3", 200.0 + i * 0.001);  // one second
    QCOMPARE(allowed, 4);
    g.Forget("m0/1");
    QVERIFY(g.Allow("m0/1", 100.26));  // a new pass reports at once
  }
};

QTEST_GUILESS_MAIN(EventLogTest)
#include "event_log_test.moc"
