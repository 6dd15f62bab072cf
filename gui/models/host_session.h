// HostSession: the GUI's link to one dstd (a control-socket path).  It runs an
// AsyncControlClient on its own Boost.Asio io thread; every reply and event is handed to the
// Qt thread with a queued invocation, so the UI thread never blocks and nothing polls.
//
//   OFFLINE --start()--> CONNECTING --connected--> SNAPSHOT --status ok--> SUBSCRIBING
//      ^                     |                        |                      | events ok
//      |                     +--- error / close ------+----------------------+--> ONLINE
//      |                                                                          |
//      +-- backoff (min..max, doubling; reset once ONLINE) <-- connection lost ---+
//
//   ONLINE: a change event refreshes the snapshot with `status` (coalesced: one call in
//   flight, one more queued at most); resync/verify progress events patch the snapshot in
//   place (they come 4 a second per leg); a `gap` event takes a fresh `status`.
//   Reconnecting subscribes with `since` = the newest seq seen, so nothing is missed silently.
//   A `status` left unanswered for the reply timeout (10 s) also counts as a lost connection.
//
// online() is true from SNAPSHOT's reply on: the snapshot is current from then on.  Signals
// fire on the Qt thread that owns the session.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

#include <QObject>
#include <QString>
#include <nlohmann/json.hpp>

namespace dst::gui {

class HostSession : public QObject {
  Q_OBJECT
 public:
  enum class State { kOffline, kConnecting, kSnapshot, kSubscribing, kOnline };
  Q_ENUM(State)
  // ok: the reply was a result; else `error` says why (dstd's code and message, or the link).
  using CallDone = std::function<void(bool ok, const nlohmann::json& result, const QString& error)>;

  explicit HostSession(QString socket_path, QObject* parent = nullptr);
  // A host known as `name` (its key in the models, e.g. `user@host`) reached through another
  // socket (an SshForward's local end).
  HostSession(QString name, QString socket_path, QObject* parent = nullptr);
  ~HostSession() override;

  // Starts connecting (and reconnecting after every loss until destroyed).
  void start();
  // Reconnect delays: the first after a loss, doubling up to the second (milliseconds).
  void setBackoff(int min_ms, int max_ms);
  // A `status` unanswered this long counts as a lost connection (a hung or stopped dstd).
  void setReplyTimeout(int ms) { reply_timeout_ms_ = ms; }

  // The host's name in the models: the --host spec.
  QString path() const { return path_; }
  // Where it connects (the same unless forwarded).
  QString socketPath() const { return socket_; }
  bool online() const { return state_ == State::kOnline || state_ == State::kSubscribing; }
  State state() const { return state_; }
  // The latest `status` result (docs/control.md), patched by progress events; {} before one.
  const nlohmann::json& snapshot() const { return snapshot_; }
  std::uint64_t lastSeq() const { return last_seq_; }
  int reconnects() const { return reconnects_; }

  // Sends `method` with `params`; `done` runs on the Qt thread (at once-queued "offline" error
  // when not connected).
  void call(const QString& method, const nlohmann::json& params, CallDone done);

 signals:
  void snapshotChanged();
  void onlineChanged(bool online);
  void eventReceived(const nlohmann::json& event);
  void stateChanged(dst::gui::HostSession::State state);

 private:
  struct Io;
  void connectNow();
  void connectionLost(quint64 gen, const QString& why);
  void requestSnapshot(quint64 gen);
  void subscribe(quint64 gen);
  void handleEvent(quint64 gen, const nlohmann::json& e);
  void setState(State s);
  bool patchProgress(const nlohmann::json& e);

  QString path_, socket_;
  std::unique_ptr<Io> io_;
  State state_ = State::kOffline;
  nlohmann::json snapshot_ = nlohmann::json::object();
  std::uint64_t last_seq_ = 0;
  bool have_seq_ = false;
  quint64 gen_ = 0;  // connection generation: replies of an older connection are ignored
  bool refresh_in_flight_ = false;
  bool refresh_again_ = false;
  bool started_ = false;
  int backoff_min_ms_ = 200, backoff_max_ms_ = 5000, backoff_ms_ = 200;
  int reconnects_ = 0;
  int reply_timeout_ms_ = 10000;
  quint64 status_req_ = 0;  // which status call the reply timer belongs to
};

}  // namespace dst::gui
