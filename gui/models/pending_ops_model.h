// PendingOpsModel: the GUI's staged operations ("staged drag and drop", issue 12 item 5), one
// row per typed operation {"method", "params"} as dstd's `batch` takes them (docs/control.md).
//
// stage(op) first asks dstd to validate the staged list plus `op` (batch, dry_run) and adds
// the row only when every operation passes; a refusal is reported (stageRefused: its reason,
// code and operation index) and nothing is added.  Stages are validated one after another in
// the order asked; a list changed meanwhile (undo) is validated again.
//
// Undo/redo cover stage, remove and clear (QUndoStack lives in Qt Gui; this library is Qt
// Core only, so a small stack of list snapshots does it).  apply() sends the list as one batch;
// the `apply_step` events of that batch (source "batch") update each row's status as it runs
// (stepFinished), and the final report comes with applied().  Operations that ran are dropped
// from the list; a failed one stays with its error, the ones after it stay "pending".
#pragma once

#include <deque>
#include <vector>

#include <QAbstractListModel>
#include <QPointer>
#include <nlohmann/json.hpp>

namespace dst::gui {

class HostSession;

class PendingOpsModel : public QAbstractListModel {
  Q_OBJECT
 public:
  enum Role {
    MethodRole = Qt::UserRole + 1,  // "array.create", ...
    OpJsonRole,                     // QString: the {"method", "params"} object
    StatusRole,                     // "pending", "running", "done", "failed"
    ErrorRole,                      // the failed step's error, or ""
  };

  explicit PendingOpsModel(HostSession* session, QObject* parent = nullptr);

  void stage(const nlohmann::json& op);
  void remove(int row);
  void clear();
  bool canUndo() const { return !undo_.empty() && !applying_; }
  bool canRedo() const { return !redo_.empty() && !applying_; }
  void undo();
  void redo();

  void apply();
  bool applying() const { return applying_; }
  bool validating() const { return !queue_.empty(); }
  nlohmann::json ops() const;  // the staged list as batch's `ops`
  const nlohmann::json& lastReport() const { return report_; }

  int rowCount(const QModelIndex& parent = {}) const override;
  QVariant data(const QModelIndex& index, int role = Qt::DisplayRole) const override;
  QHash<int, QByteArray> roleNames() const override;

 signals:
  void staged(int row);
  void stageRefused(const QString& reason, const QString& code, int op_index);
  void undoRedoChanged();
  void stepFinished(int op_index, const QString& step, const QString& status);
  // ok: every step done.  error: the failed step's (or the refusal's, or the link's) reason.
  void applied(bool ok, const QString& error, const nlohmann::json& report);

 private:
  struct Row {
    nlohmann::json op;
    QString status = "pending", error;
  };
  void validateNext();
  void setRows(std::vector<Row> rows);  // a reset: undo/redo replace the whole list
  void pushUndo();
  // Undo (from undo_ to redo_) or redo: the current list goes onto `to`.
  void travel(std::vector<std::vector<Row>>* from, std::vector<std::vector<Row>>* to);
  void onEvent(const nlohmann::json& e);
  void finishApply(bool ok, const nlohmann::json& result, const QString& error);

  QPointer<HostSession> session_;
  std::vector<Row> rows_;
  std::vector<std::vector<Row>> undo_, redo_;
  std::deque<nlohmann::json> queue_;  // stages waiting for (or in) validation, front in flight
  bool in_flight_ = false;
  quint64 list_gen_ = 0;  // bumped on every change of rows_: a stale validation is redone
  bool applying_ = false;
  nlohmann::json report_ = nlohmann::json::object();
};

}  // namespace dst::gui
