// ProgressModel: one row per running resync pass (per leg) and per running verify (per array)
// on every host, from the same `status` snapshots as the device tree (`progress` and `verify`
// members of each array, patched by progress events in HostSession).
//
// Rows are keyed by host, array, kind and leg and diffed like DeviceTreeModel (inserted when a
// pass starts, removed when it ends or its host goes offline, dataChanged in between).  Each row
// keeps the rate of its last kHistory updates in a ring (RateHistoryRole, oldest first) for
// the small graph next to the bar.  With setFinishedLinger(ms) > 0 (dst-gui: 10 s), a resync pass
// the model showed running that ends "done" stays for that long as a finished row at 100 %
// (kKind "done"), so the user sees it complete instead of the bar vanishing; 0 (the default)
// removes it at once.  Percent is clamped to 0..100 (a bad figure never shows as
// 429496729 %); ETA is the engine's when it gives one, else remaining bytes / rate.
#pragma once

#include <deque>
#include <vector>

#include <QAbstractTableModel>
#include <nlohmann/json.hpp>

namespace dst::gui {

class HostSession;

class ProgressModel : public QAbstractTableModel {
  Q_OBJECT
 public:
  static constexpr int kHistory = 120;
  enum Column { kHost, kArray, kLeg, kKind, kPercent, kRate, kEta, kDone, kTotal, kColumnCount };
  enum Role {
    RateHistoryRole = Qt::UserRole + 1,  // QVariantList of double (bytes/s), oldest first
    PercentRole,                         // double 0..100
    RateRole,                            // double bytes/s
    EtaSecondsRole,                      // double, -1 unknown
    BytesDoneRole,                       // qint64
    BytesTotalRole,                      // qint64
    RateLimitRole,                       // qint64: the array's resync_rate.max (0 unlimited), -1 unknown
  };

  explicit ProgressModel(QObject* parent = nullptr);

  void setHost(const QString& host, const nlohmann::json& status);
  void setHostOnline(const QString& host, bool online);  // offline: its rows go
  void removeHost(const QString& host) { setHostOnline(host, false); }
  void attach(HostSession* session);
  void setFinishedLinger(int ms) { linger_ms_ = ms; }

  int rowCount(const QModelIndex& parent = {}) const override;
  int columnCount(const QModelIndex& parent = {}) const override;
  QVariant data(const QModelIndex& index, int role = Qt::DisplayRole) const override;
  QVariant headerData(int section, Qt::Orientation o, int role = Qt::DisplayRole) const override;

  struct Row {
    QString key;  // host \x1f array \x1f kind \x1f leg: unique, rows sorted by it
    QString host, array, kind;  // kind: "resync" or "verify"
    int leg = -1;               // -1: a verify compares every leg
    double percent = 0, rate = 0, eta = -1;
    qint64 done = 0, total = 0;
    qint64 limit = -1;  // RateLimitRole
    bool paused = false;  // a resync pass held by array.pause_resync (kKind "paused")
    bool finished = false;      // ended "done", shown at 100 % until the linger passes
    qint64 finished_at_ms = 0;  // steady clock
    std::deque<double> history;
  };

 private:
  void mergeHost(const QString& host, std::vector<Row> want);
  bool keepFinished(const QString& key) const;  // a row shown running, or finished in the linger
  void pruneFinished();

  int linger_ms_ = 0;

  std::vector<Row> rows_;
};

}  // namespace dst::gui
