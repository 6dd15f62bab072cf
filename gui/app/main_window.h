// MainWindow: the first slice of dst-gui, the device tree of every host in a QTreeView.  One
// HostSession per host (started at once, reconnecting by itself); offline hosts greyed.
#pragma once

#include <QMainWindow>
#include <QStringList>

class QTreeView;

namespace dst::gui {

class DeviceTreeModel;
class HostSession;

// The hosts to show: every --host given, else $DST_SOCKET, else dstd's default socket.
QStringList HostsFromArgs(const QStringList& arguments, const QString& env_socket);

class MainWindow : public QMainWindow {
  Q_OBJECT
 public:
  explicit MainWindow(const QStringList& hosts, QWidget* parent = nullptr);

  QTreeView* tree() const { return tree_; }
  const QList<HostSession*>& sessions() const { return sessions_; }

 private:
  DeviceTreeModel* model_;
  QTreeView* tree_;
  QList<HostSession*> sessions_;
};

}  // namespace dst::gui
