#include "log_model.h"

namespace dst::gui {

LogModel::LogModel(QObject* parent, int capacity)
    : QAbstractTableModel(parent), capacity_(capacity < 1 ? 1 : capacity) {}

void LogModel::append(Level level, const QString& host, const QString& message) {
  if (int(rows_.size()) >= capacity_) {
    int drop = int(rows_.size()) - capacity_ + 1;
    beginRemoveRows({}, 0, drop - 1);
    rows_.erase(rows_.begin(), rows_.begin() + drop);
    endRemoveRows();
  }
  int row = int(rows_.size());
  beginInsertRows({}, row, row);
  rows_.push_back({QDateTime::currentDateTime(), level, host, message});
  endInsertRows();
}

void LogModel::clear() {
  if (rows_.empty()) return;
  beginRemoveRows({}, 0, int(rows_.size()) - 1);
  rows_.clear();
  endRemoveRows();
}

int LogModel::rowCount(const QModelIndex& parent) const {
  return parent.isValid() ? 0 : int(rows_.size());
}

int LogModel::columnCount(const QModelIndex& parent) const {
  return parent.isValid() ? 0 : kColumnCount;
}

QVariant LogModel::data(const QModelIndex& index, int role) const {
  if (!checkIndex(index, CheckIndexOption::IndexIsValid | CheckIndexOption::ParentIsInvalid)) return {};
  const Entry& e = rows_[std::size_t(index.row())];
  if (role == LevelRole) return int(e.level);
  if (role != Qt::DisplayRole && role != Qt::ToolTipRole) return {};
  switch (index.column()) {
    case kTime: return e.time.toString(QStringLiteral("HH:mm:ss"));
    case kLevel: return e.level == kError ? tr("error") : e.level == kWarning ? tr("warning") : tr("info");
    case kHost: return e.host;
    case kMessage: return e.message;
  }
  return {};
}

QVariant LogModel::headerData(int section, Qt::Orientation o, int role) const {
  if (o != Qt::Horizontal || role != Qt::DisplayRole) return {};
  static const char* const kNames[] = {"Time", "Level", "Host", "Message"};
  if (section < 0 || section >= kColumnCount) return {};
  return QString::fromLatin1(kNames[section]);
}

}  // namespace dst::gui
