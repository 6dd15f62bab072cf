#include "pending_ops_model.h"

#include "host_session.h"

namespace dst::gui {

using nlohmann::json;

PendingOpsModel::PendingOpsModel(HostSession* session, QObject* parent)
    : QAbstractListModel(parent), session_(session) {
  if (session) connect(session, &HostSession::eventReceived, this, &PendingOpsModel::onEvent);
}

json PendingOpsModel::ops() const {
  json out = json::array();
  for (const Row& r : rows_) out.push_back(r.op);
  return out;
}

void PendingOpsModel::stage(const json& op) {
  queue_.push_back(op);
  validateNext();
}

void PendingOpsModel::validateNext() {
  if (in_flight_ || queue_.empty()) return;
  if (!session_) {
    queue_.clear();
    emit stageRefused("no host session", "offline", -1);
    return;
  }
  in_flight_ = true;
  json list = ops();
  list.push_back(queue_.front());
  const quint64 gen = list_gen_;
  const int index = static_cast<int>(rows_.size());
  QPointer<PendingOpsModel> self(this);
  session_->call("batch", json{{"ops", list}, {"dry_run", true}},
                 [self, gen, index](bool ok, const json& result, const QString& error) {
                   if (!self) return;
                   PendingOpsModel& m = *self;
                   m.in_flight_ = false;
                   if (gen != m.list_gen_) {  // the list changed meanwhile: validate again
                     m.validateNext();
                     return;
                   }
                   json op = m.queue_.front();
                   m.queue_.pop_front();
                   if (!ok) {
                     emit m.stageRefused(error, "error", -1);
                   } else if (!result.value("valid", false)) {
                     json r = result.value("refusals", json::array());
                     json first = r.empty() ? json::object() : r[0];
                     emit m.stageRefused(QString::fromStdString(first.value("message", "refused")),
                                         QString::fromStdString(first.value("code", "invalid")),
                                         first.value("op", index));
                   } else {
                     m.pushUndo();
                     m.beginInsertRows({}, index, index);
                     Row row;
                     row.op = std::move(op);
                     m.rows_.push_back(std::move(row));
                     ++m.list_gen_;
                     m.endInsertRows();
                     emit m.staged(index);
                   }
                   m.validateNext();
                 });
}

void PendingOpsModel::pushUndo() {
  undo_.push_back(rows_);
  redo_.clear();
  emit undoRedoChanged();
}

void PendingOpsModel::setRows(std::vector<Row> rows) {
  beginResetModel();
  rows_ = std::move(rows);
  ++list_gen_;
  endResetModel();
}

void PendingOpsModel::remove(int row) {
  if (applying_ || row < 0 || row >= static_cast<int>(rows_.size())) return;
  pushUndo();
  beginRemoveRows({}, row, row);
  rows_.erase(rows_.begin() + row);
  ++list_gen_;
  endRemoveRows();
}

void PendingOpsModel::clear() {
  if (applying_ || rows_.empty()) return;
  pushUndo();
  setRows({});
}

void PendingOpsModel::undo() {
  if (canUndo()) travel(&undo_, &redo_);
}

void PendingOpsModel::redo() {
  if (canRedo()) travel(&redo_, &undo_);
}

void PendingOpsModel::travel(std::vector<std::vector<Row>>* from, std::vector<std::vector<Row>>* to) {
  to->push_back(rows_);
  std::vector<Row> rows = std::move(from->back());
  from->pop_back();
  setRows(std::move(rows));
  emit undoRedoChanged();
}

void PendingOpsModel::apply() {
  if (applying_ || rows_.empty() || !session_) return;
  applying_ = true;
  emit undoRedoChanged();
  for (Row& r : rows_) {
    r.status = "running";
    r.error.clear();
  }
  emit dataChanged(index(0), index(static_cast<int>(rows_.size()) - 1));
  QPointer<PendingOpsModel> self(this);
  session_->call("batch", json{{"ops", ops()}, {"dry_run", false}},
                 [self](bool ok, const json& result, const QString& error) {
                   if (self) self->finishApply(ok, result, error);
                 });
}

void PendingOpsModel::onEvent(const json& e) {
  if (!applying_ || e.value("type", "") != "apply_step" || e.value("source", "") != "batch") return;
  const int op = e.value("op", -1);
  if (op < 0 || op >= static_cast<int>(rows_.size())) return;
  const QString status = QString::fromStdString(e.value("status", ""));
  Row& r = rows_[op];
  r.status = status;
  if (e.contains("error") && e["error"].is_string()) r.error = QString::fromStdString(e["error"]);
  emit dataChanged(index(op), index(op));
  emit stepFinished(op, QString::fromStdString(e.value("step", "")), status);
}

void PendingOpsModel::finishApply(bool ok, const json& result, const QString& error) {
  applying_ = false;
  report_ = ok ? result : json{{"error", error.toStdString()}};
  QString why = error;
  std::vector<Row> keep;
  if (ok && result.value("valid", false)) {
    // The ops that ran go; the failed one keeps its error, the rest are pending again.
    const json& res_ops = result["ops"];
    for (std::size_t i = 0; i < rows_.size() && i < res_ops.size(); ++i) {
      const std::string st = res_ops[i].value("status", "");
      if (st == "done") continue;
      Row r = rows_[i];
      r.status = st == "failed" ? "failed" : "pending";
      if (st == "failed") r.error = QString::fromStdString(result.value("error", ""));
      keep.push_back(std::move(r));
    }
    if (result.value("failed", false)) why = QString::fromStdString(result.value("error", "a step failed"));
  } else {
    // Refused (the host changed since staging) or not delivered: nothing ran.
    if (ok) {
      json r = result.value("refusals", json::array());
      why = r.empty() ? QString("refused")
                      : QString("operation %1 refused: %2")
                            .arg(r[0].value("op", -1))
                            .arg(QString::fromStdString(r[0].value("message", "")));
    }
    keep = rows_;
    for (Row& r : keep) r.status = "pending";
  }
  const bool all_done = ok && result.value("valid", false) && !result.value("failed", false);
  // What ran cannot be undone by editing the list: the history starts again.
  if (keep.size() != rows_.size()) {
    undo_.clear();
    redo_.clear();
  }
  setRows(std::move(keep));
  emit undoRedoChanged();
  emit applied(all_done, all_done ? QString() : why, report_);
}

int PendingOpsModel::rowCount(const QModelIndex& parent) const {
  return parent.isValid() ? 0 : static_cast<int>(rows_.size());
}

QVariant PendingOpsModel::data(const QModelIndex& index, int role) const {
  if (!checkIndex(index, CheckIndexOption::IndexIsValid | CheckIndexOption::ParentIsInvalid))
    return {};
  const Row& r = rows_[index.row()];
  const QString method = QString::fromStdString(r.op.value("method", ""));
  switch (role) {
    case Qt::DisplayRole: {
      const json p = r.op.value("params", json::object());
      QString name = QString::fromStdString(p.value("name", ""));
      QString leg = QString::fromStdString(p.value("leg", ""));
      QString text = name.isEmpty() ? method : method + " " + name;
      return leg.isEmpty() ? text : text + " " + leg;
    }
    case Qt::ToolTipRole:
      return r.error.isEmpty() ? QVariant() : QVariant(r.error);
    case MethodRole:
      return method;
    case OpJsonRole:
      return QString::fromStdString(r.op.dump());
    case StatusRole:
      return r.status;
    case ErrorRole:
      return r.error;
    default:
      return {};
  }
}

QHash<int, QByteArray> PendingOpsModel::roleNames() const {
  QHash<int, QByteArray> names = QAbstractListModel::roleNames();
  names[MethodRole] = "method";
  names[OpJsonRole] = "op";
  names[StatusRole] = "status";
  names[ErrorRole] = "error";
  return names;
}

}  // namespace dst::gui
