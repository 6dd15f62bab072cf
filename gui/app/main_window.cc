#include "main_window.h"

#include <QCommandLineParser>
#include <QHeaderView>
#include <QTreeView>

#include "device_tree_model.h"
#include "host_session.h"
#include "offline_tint.h"

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
    : QMainWindow(parent), model_(new DeviceTreeModel(this)), tree_(new QTreeView(this)) {
  setWindowTitle(tr("dst"));
  auto* tint = new OfflineTint(this);
  tint->setSourceModel(model_);
  tree_->setModel(tint);
  tree_->setUniformRowHeights(true);
  tree_->header()->setSectionResizeMode(QHeaderView::ResizeToContents);
  setCentralWidget(tree_);
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
  resize(900, 500);
}

}  // namespace dst::gui
