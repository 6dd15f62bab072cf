// LogModel: the GUI's log pane, one row per message (time, level, host, text), newest last.
// Errors of actions (a failed control call) and notable events go here as well as to a dialog.
// At most `capacity` rows are kept: the oldest go first (beginRemoveRows, never a reset).
#pragma once

#include <deque>

#include <QAbstractTableModel>
#include <QDateTime>

namespace dst::gui {

class LogModel : public QAbstractTableModel {
  Q_OBJECT
 public:
  enum Level { kInfo, kWarning, kError };
  Q_ENUM(Level)
  enum Column { kTime, kLevel, kHost, kMessage, kColumnCount };
  enum Role { LevelRole = Qt::UserRole + 1 };

  explicit LogModel(QObject* parent = nullptr, int capacity = 1000);

  void append(Level level, const QString& host, const QString& message);
  void clear();
  int capacity() const { return capacity_; }

  int rowCount(const QModelIndex& parent = {}) const override;
  int columnCount(const QModelIndex& parent = {}) const override;
  QVariant data(const QModelIndex& index, int role = Qt::DisplayRole) const override;
  QVariant headerData(int section, Qt::Orientation o, int role = Qt::DisplayRole) const override;

 private:
  struct Entry {
    QDateTime time;
    Level level;
    QString host, message;
  };
  int capacity_;
  std::deque<Entry> rows_;
};

}  // namespace dst::gui
