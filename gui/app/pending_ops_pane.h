// PendingOpsPane: the staged operations of every host (one PendingOpsModel per host, a host
// chooser over a QListView) with Undo, Redo, Remove, Clear and Apply (Ctrl+Z, Ctrl+Shift+Z in
// the window).  Apply opens an ApplyDialog: the engine's plan (batch dry_run), then the run with
// a row per step that follows the model's stepFinished, stopping at the first error, and the
// report.  Nothing reaches a host before Apply.
#pragma once

#include <map>

#include <QDialog>
#include <QPointer>
#include <QWidget>
#include <nlohmann/json.hpp>

class QComboBox;
class QLabel;
class QListView;
class QListWidget;
class QPushButton;

namespace dst::gui {

class HostSession;
class LogModel;
class PendingOpsModel;

class ApplyDialog : public QDialog {
  Q_OBJECT
 public:
  ApplyDialog(PendingOpsModel* model, HostSession* session, LogModel* log, QWidget* parent = nullptr);

  // One row per plan step: "step text", then "✓ ", "✗ " or "… " in front as it runs.
  QListWidget* steps() const { return steps_; }
  QLabel* summary() const { return summary_; }
  QPushButton* runButton() const { return run_; }
  bool planLoaded() const { return plan_loaded_; }
  bool finished() const { return finished_; }

  void run();

 private:
  void showPlan(bool ok, const nlohmann::json& result, const QString& error);
  void onStep(int op, const QString& step, const QString& status);
  void onApplied(bool ok, const QString& error, const nlohmann::json& report);

  PendingOpsModel* model_;
  QString host_;
  LogModel* log_;
  QListWidget* steps_;
  QLabel* summary_;
  QPushButton* run_;
  bool plan_loaded_ = false, finished_ = false;
  int next_row_ = 0;
};

class PendingOpsPane : public QWidget {
  Q_OBJECT
 public:
  explicit PendingOpsPane(LogModel* log, QWidget* parent = nullptr);

  void addHost(HostSession* session);
  PendingOpsModel* model(const QString& host) const;
  HostSession* session(const QString& host) const;
  QString currentHost() const;
  void setCurrentHost(const QString& host);

  QListView* view() const { return view_; }
  QPushButton* undoButton() const { return undo_; }
  QPushButton* redoButton() const { return redo_; }
  QPushButton* removeButton() const { return remove_; }
  QPushButton* clearButton() const { return clear_; }
  QPushButton* applyButton() const { return apply_; }
  ApplyDialog* applyDialog() const { return dialog_; }  // the open one, else null

  void undo();
  void redo();
  void openApplyDialog();

 private:
  void updateButtons();

  LogModel* log_;
  QComboBox* hosts_;
  QListView* view_;
  QPushButton *undo_, *redo_, *remove_, *clear_, *apply_;
  struct Host {
    HostSession* session;
    PendingOpsModel* model;
  };
  std::map<QString, Host> models_;
  QPointer<ApplyDialog> dialog_;
};

}  // namespace dst::gui
