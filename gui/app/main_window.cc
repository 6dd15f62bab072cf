#include "main_window.h"

#include <QCommandLineParser>
#include <QHeaderView>
#include <QSplitter>
#include <QTreeView>

#include "device_tree_model.h"
#include "host_session.h"
#include "offline_tint.h"
#include "topology_canvas.h"
#include "topology_graph.h"

namespace dst::gui {

QStringList HostsFromArgs(const QStringList& arguments, const QString& env_socket) {
  QCommandLineParser p;
  p.setApplicationDescription("dst management GUI");
  p.addHelpOption();
  p.addOption({"host", "A dstd control socket to show (repeatable).", "socket"});
  p.process(arguments);
  QStringList hosts = p.values("host");
  if (hosts.isEmpty()) hosts << (env_socket.isEmpty() ? QStringLiteral("/run/dst/dstd.sock") : env_socket);
  return hosts;
}

MainWindow::MainWindow(const QStringList& hosts, QWidget* parent)
    : QMainWindow(parent),
      model_(new DeviceTreeModel(this)),
      tree_(new QTreeView),
      graph_(new TopologyGraph(this)),
      canvas_(nullptr),
      top_split_(new QSplitter(Qt::Horizontal)) {
  setWindowTitle(tr("dst"));
  auto* tint = new OfflineTint(this);
  tint->setSourceModel(model_);
  tree_->setModel(tint);
  tree_->setUniformRowHeights(true);
  tree_->header()->setSectionResizeMode(QHeaderView::ResizeToContents);
  graph_->setModel(model_);
  canvas_ = new TopologyCanvas(graph_);
  top_split_->addWidget(tree_);
  top_split_->addWidget(canvas_);
  top_split_->setStretchFactor(1, 1);
  setCentralWidget(top_split_);
  // Hosts start expanded.
  connect(tint, &QAbstractItemModel::rowsInserted, tree_,
          [this](const QModelIndex& parent, int first, int last) {
            if (parent.isValid()) return;
            for (int r = first; r <= last; ++r) tree_->expand(tree_->model()->index(r, 0));
          });
  for (const QString& h : hosts) {
    auto* s = new HostSession(h, this);
    model_->attach(s);
    s->start();
    sessions_ << s;
  }
  resize(1300, 700);
}

}  // namespace dst::gui
