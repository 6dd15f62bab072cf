#include "main_window.h"

#include <QCommandLineParser>
#include <QDockWidget>
#include <QHeaderView>
#include <QInputDialog>
#include <QMenu>
#include <QSettings>
#include <QMessageBox>
#include <QSplitter>
#include <QTabWidget>
#include <QTableView>
#include <QTreeView>

#include "device_tree_model.h"
#include "drop_controller.h"
#include "host_calls.h"
#include "host_session.h"
#include "log_model.h"
#include "offline_tint.h"
#include "pending_ops_pane.h"
#include "progress_model.h"
#include "progress_pane.h"
#include "row_actions.h"
#include "ssh_forward.h"
#include "topology_canvas.h"
#include "topology_graph.h"

namespace dst::gui {

QStringList HostsFromArgs(const QStringList& arguments, const QString& env_socket) {
  QCommandLineParser p;
  p.setApplicationDescription("dst management GUI");
  p.addHelpOption();
  p.addVersionOption();  // QCoreApplication::applicationVersion (main.cc)
  p.addOption({"host", "A dstd control socket, or user@host[:socket] reached with ssh (repeatable).",
               "host"});
  p.addOption({"ssh-command", "The ssh forward's command ({local}, {remote}, {target}); remembered.",
               "template"});
  p.process(arguments);
  if (p.isSet("ssh-command")) SshForward::SaveTemplate(p.value("ssh-command"));
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
      top_split_(new QSplitter(Qt::Horizontal)),
      main_split_(new QSplitter(Qt::Vertical)),
      progress_(new ProgressModel(this)),
      log_(new LogModel(this)),
      calls_(new HostCalls(log_, this)),
      progress_pane_(new ProgressPane(progress_, calls_)),
      log_view_(new QTableView),
      tabs_(new QTabWidget),
      runner_(nullptr),
      pending_(new PendingOpsPane(log_)),
      drops_(nullptr) {
  setWindowTitle(tr("dst"));
  progress_->setFinishedLinger(10000);  // a finished resync shows "done 100 %" for 10 s
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
  log_view_->setModel(log_);
  log_view_->horizontalHeader()->setStretchLastSection(true);
  log_view_->verticalHeader()->hide();
  // Newest last, kept in view.
  connect(log_, &QAbstractItemModel::rowsInserted, log_view_, [this] { log_view_->scrollToBottom(); });
  tabs_->addTab(progress_pane_, tr("Progress"));
  tabs_->addTab(log_view_, tr("Log"));
  main_split_->addWidget(top_split_);
  main_split_->addWidget(tabs_);
  main_split_->setStretchFactor(0, 3);
  main_split_->setStretchFactor(1, 1);
  setCentralWidget(main_split_);
  // A failed action: in the log already; a dialog says so too (not modal to the event loop).
  connect(calls_, &HostCalls::failed, this,
          [this](const QString& host, const QString& method, const QString& error) {
            auto* box = new QMessageBox(QMessageBox::Warning, tr("dst: %1 failed").arg(method),
                                        tr("%1 on %2 failed:\n%3").arg(method, host, error),
                                        QMessageBox::Ok, this);
            box->setAttribute(Qt::WA_DeleteOnClose);
            box->open();
          });
  // Hosts start expanded.
  connect(tint, &QAbstractItemModel::rowsInserted, tree_,
          [this](const QModelIndex& parent, int first, int last) {
            if (parent.isValid()) return;
            for (int r = first; r <= last; ++r) tree_->expand(tree_->model()->index(r, 0));
          });
  // Actions: their questions as dialogs.
  ActionRunner::Ui ui;
  ui.askMountPath = [this](const QString& suggested) -> std::optional<QString> {
    bool ok = false;
    QString path = QInputDialog::getText(this, tr("Mount FUSE file system"), tr("Mount point:"),
                                         QLineEdit::Normal, suggested, &ok);
    return ok ? std::optional<QString>(path) : std::nullopt;
  };
  ui.confirm = [this](const QString& title, const QString& question) {
    return QMessageBox::question(this, title, question) == QMessageBox::Yes;
  };
  ui.inform = [this](const QString& title, const QString& text) {
    QMessageBox box(QMessageBox::Information, title, title, QMessageBox::Ok, this);
    box.setDetailedText(text);
    box.setInformativeText(text.section('\n', 0, 3));
    box.exec();
  };
  runner_ = new ActionRunner(calls_, std::move(ui), this);
  tree_->setContextMenuPolicy(Qt::CustomContextMenu);
  connect(tree_, &QWidget::customContextMenuRequested, this, [this](const QPoint& pos) {
    showRowMenu(tree_->indexAt(pos), tree_->viewport()->mapToGlobal(pos));
  });
  connect(canvas_, &TopologyCanvas::contextMenuRequested, this,
          [this](const QString& key, const QPoint& global_pos) { showRowMenu(indexOfNode(key), global_pos); });
  auto* dock = new QDockWidget(tr("Pending operations"), this);
  dock->setObjectName(QStringLiteral("pending"));
  dock->setWidget(pending_);
  addDockWidget(Qt::RightDockWidgetArea, dock);
  drops_ = new DropController(canvas_, pending_, log_, DropController::DialogUi(this), this);
  // The tree's drops go the same way as the canvas's; a refusal shows on the canvas at the
  // target (the same object there), or at the canvas's corner for the empty area.
  tree_->setDragEnabled(true);
  tree_->setAcceptDrops(true);
  tree_->setDropIndicatorShown(true);
  tree_->setDragDropMode(QAbstractItemView::DragDrop);
  connect(model_, &DeviceTreeModel::dropRequested, drops_, [this](const QString& source, const QString& target) {
    const QPointF at = target.isEmpty() ? canvas_->mapToScene(canvas_->viewport()->rect().bottomRight() - QPoint(40, 40))
                                        : canvas_->nodeRect(target).center();
    drops_->drop(source, target, at);
  });
  for (const QString& h : hosts) {
    auto* s = new HostSession(h, HostSocket(h, this, log_), this);
    model_->attach(s);
    progress_->attach(s);
    calls_->addSession(s);
    pending_->addHost(s);
    s->start();
    sessions_ << s;
  }
  resize(1300, 700);
  restoreLayout();
}

void MainWindow::saveLayout() const {
  QSettings s(QStringLiteral("dst"), QStringLiteral("dst-gui"));
  s.setValue(QStringLiteral("window/geometry"), saveGeometry());
  s.setValue(QStringLiteral("window/top_splitter"), top_split_->saveState());
  s.setValue(QStringLiteral("window/main_splitter"), main_split_->saveState());
  s.setValue(QStringLiteral("window/tab"), tabs_->currentIndex());
}

void MainWindow::restoreLayout() {
  QSettings s(QStringLiteral("dst"), QStringLiteral("dst-gui"));
  // Each part on its own: a missing or damaged value leaves that part at its default.
  restoreGeometry(s.value(QStringLiteral("window/geometry")).toByteArray());
  top_split_->restoreState(s.value(QStringLiteral("window/top_splitter")).toByteArray());
  main_split_->restoreState(s.value(QStringLiteral("window/main_splitter")).toByteArray());
  tabs_->setCurrentIndex(s.value(QStringLiteral("window/tab"), 0).toInt());
}

void MainWindow::closeEvent(QCloseEvent* e) {
  saveLayout();
  QMainWindow::closeEvent(e);
}

void MainWindow::showRowMenu(const QModelIndex& index, const QPoint& global_pos) {
  const std::vector<RowAction> actions = ActionsFor(index);
  if (actions.empty()) return;
  QMenu menu(this);
  for (const RowAction& a : actions)
    connect(menu.addAction(a.label), &QAction::triggered, this, [this, a] { runner_->run(a); });
  menu.exec(global_pos);
}

QModelIndex MainWindow::indexOfNode(const QString& key) const {
  QString host, object;
  TopologyGraph::SplitKey(key, &host, &object);
  const QString kind = object.section(':', 0, 0), name = object.section(':', 1);
  auto child = [this](const QModelIndex& parent, auto match) -> QModelIndex {
    for (int r = 0; r < model_->rowCount(parent); ++r)
      if (match(model_->index(r, 0, parent))) return model_->index(r, 0, parent);
    return {};
  };
  QModelIndex h = child({}, [&](const QModelIndex& i) { return i.data(DeviceTreeModel::KeyRole).toString() == host; });
  if (!h.isValid() || object.isEmpty()) return h;
  // A leg "leg:ARRAY/SLOT" is a row of its array.
  const bool leg = kind == QLatin1String("leg");
  const QString top = leg ? name.section('/', 0, -2) : name;
  QModelIndex o = child(h, [&](const QModelIndex& i) {
    return i.data(DeviceTreeModel::KindRole).toString() == (leg ? QStringLiteral("array") : kind) &&
           i.data().toString() == top;
  });
  if (!leg || !o.isValid()) return o;
  const QString slot = name.section('/', -1);
  return child(o, [&](const QModelIndex& i) { return i.data().toString().section(':', 0, 0) == slot; });
}

}  // namespace dst::gui
