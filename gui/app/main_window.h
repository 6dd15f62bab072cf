// MainWindow: dst-gui, the device tree of every host in a QTreeView next to the topology canvas.  One
// HostSession per host (started at once, reconnecting by itself); offline hosts greyed.
#pragma once

#include <QMainWindow>
#include <QStringList>

class QSplitter;
class QTreeView;

namespace dst::gui {

class DeviceTreeModel;
class HostSession;
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
  const QList<HostSession*>& sessions() const { return sessions_; }

 private:
  DeviceTreeModel* model_;
  QTreeView* tree_;
  TopologyGraph* graph_;
  TopologyCanvas* canvas_;
  QSplitter* top_split_;
  QList<HostSession*> sessions_;
};

}  // namespace dst::gui
