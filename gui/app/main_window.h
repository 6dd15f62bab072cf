// MainWindow: dst-gui, the device tree of every host in a QTreeView next to the topology canvas.  One
// HostSession per host (started at once, reconnecting by itself); offline hosts greyed.
#pragma once

#include <QMainWindow>
#include <QStringList>

class QSplitter;
class QTabWidget;
class QTableView;
class QTreeView;

namespace dst::gui {

class DeviceTreeModel;
class DropController;
class PendingOpsPane;
class ActionRunner;
class HostCalls;
class HostSession;
class LogModel;
class ProgressModel;
class ProgressPane;
class TopologyCanvas;
class TopologyGraph;

// The hosts to show: every --host given, else $DST_SOCKET, else dstd's default socket.
QStringList HostsFromArgs(const QStringList& arguments, const QString& env_socket);

class MainWindow : public QMainWindow {
  Q_OBJECT
 public:
  explicit MainWindow(const QStringList& hosts, QWidget* parent = nullptr);

  QTreeView* tree() const { return tree_; }
  DeviceTreeModel* deviceModel() const { return model_; }
  TopologyCanvas* canvas() const { return canvas_; }
  // The tree and the canvas, side by side.
  QSplitter* topSplitter() const { return top_split_; }
  // The top (tree, canvas) over the tabs (progress, log).
  QSplitter* mainSplitter() const { return main_split_; }
  QTabWidget* tabs() const { return tabs_; }
  ProgressModel* progressModel() const { return progress_; }
  ProgressPane* progressPane() const { return progress_pane_; }
  LogModel* logModel() const { return log_; }
  QTableView* logView() const { return log_view_; }
  HostCalls* calls() const { return calls_; }
  // Staged drag and drop: the pending-operations dock and the drop handling.
  PendingOpsPane* pendingPane() const { return pending_; }
  DropController* drops() const { return drops_; }
  const QList<HostSession*>& sessions() const { return sessions_; }
  // The context menu of a tree row (a DeviceTreeModel index or the view's proxy index); the
  // canvas's nodes map to their tree rows.  Not shown when the row offers nothing.
  void showRowMenu(const QModelIndex& index, const QPoint& global_pos);
  QModelIndex indexOfNode(const QString& key) const;

  // Geometry and splitter state in QSettings("dst", "dst-gui") (~/.config/dst/dst-gui.conf):
  // restored on construction, saved on close.
  void saveLayout() const;
  void restoreLayout();

 protected:
  void closeEvent(QCloseEvent* e) override;

 private:
  DeviceTreeModel* model_;
  QTreeView* tree_;
  TopologyGraph* graph_;
  TopologyCanvas* canvas_;
  QSplitter* top_split_;
  QSplitter* main_split_;
  ProgressModel* progress_;
  LogModel* log_;
  HostCalls* calls_;
  ProgressPane* progress_pane_;
  QTableView* log_view_;
  QTabWidget* tabs_;
  ActionRunner* runner_;
  PendingOpsPane* pending_;
  DropController* drops_;
  QList<HostSession*> sessions_;
};

}  // namespace dst::gui
