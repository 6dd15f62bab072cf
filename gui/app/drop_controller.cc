#include "drop_controller.h"

#include <QComboBox>
#include <QDialog>
#include <QDialogButtonBox>
#include <QFormLayout>
#include <QLineEdit>
#include <QListWidget>
#include <QMessageBox>
#include <QPushButton>

#include "host_session.h"
#include "log_model.h"
#include "pending_ops_model.h"
#include "pending_ops_pane.h"
#include "topology_canvas.h"

namespace dst::gui {

using nlohmann::json;

DropController::Ui DropController::DialogUi(QWidget* parent) {
  Ui ui;
  ui.askCreate = [parent](const QStringList& levels, const QStringList& hosts, const QStringList& exports,
                          const DropChoices& defaults) -> std::optional<DropChoices> {
    QDialog d(parent);
    d.setWindowTitle(QObject::tr("Create an array"));
    auto* level = new QComboBox;
    level->addItems(levels);
    level->setCurrentText(QStringLiteral("mirror"));
    auto* name = new QLineEdit(defaults.name);
    auto* host = new QComboBox;
    host->addItems(hosts);
    host->setCurrentText(defaults.host);
    auto* legs = new QListWidget;
    for (const QString& e : exports) {
      auto* it = new QListWidgetItem(e, legs);
      it->setCheckState(defaults.sources.contains(e) ? Qt::Checked : Qt::Unchecked);
    }
    auto* buttons = new QDialogButtonBox(QDialogButtonBox::Ok | QDialogButtonBox::Cancel);
    QObject::connect(buttons, &QDialogButtonBox::accepted, &d, &QDialog::accept);
    QObject::connect(buttons, &QDialogButtonBox::rejected, &d, &QDialog::reject);
    auto* form = new QFormLayout(&d);
    form->addRow(QObject::tr("Level:"), level);
    form->addRow(QObject::tr("Name:"), name);
    form->addRow(QObject::tr("On host:"), host);
    form->addRow(QObject::tr("Legs:"), legs);
    form->addRow(buttons);
    if (d.exec() != QDialog::Accepted) return std::nullopt;
    DropChoices c{level->currentText(), name->text().trimmed(), host->currentText(), {}, false};
    // The dropped export first, then the others checked, in list order.
    for (int r = 0; r < legs->count(); ++r)
      if (legs->item(r)->checkState() == Qt::Checked) c.sources << legs->item(r)->text();
    return c;
  };
  ui.askRemoveLeg = [parent](const QString& leg) -> std::optional<bool> {
    QMessageBox box(QMessageBox::Question, QObject::tr("Leg dragged out"),
                    QObject::tr("Detach %1 as a snapshot, or remove it from its array?").arg(leg),
                    QMessageBox::Cancel, parent);
    QPushButton* detach = box.addButton(QObject::tr("Detach"), QMessageBox::AcceptRole);
    QPushButton* remove = box.addButton(QObject::tr("Remove"), QMessageBox::DestructiveRole);
    box.exec();
    if (box.clickedButton() == detach) return false;
    if (box.clickedButton() == remove) return true;
    return std::nullopt;
  };
  return ui;
}

DropController::DropController(TopologyCanvas* canvas, PendingOpsPane* pane, LogModel* log, Ui ui,
                               QObject* parent)
    : QObject(parent), canvas_(canvas), pane_(pane), log_(log), ui_(std::move(ui)) {
  connect(canvas_, &TopologyCanvas::dropRequested, this, &DropController::drop);
}

void DropController::drop(const QString& source, const QString& target, const QPointF& at) {
  const TopologyGraph& g = *canvas_->graph();
  switch (ClassifyDrop(g, source, target)) {
    case DropKind::kCreateArray:
      return askCreate(source, target, at);
    case DropKind::kLegOut: {
      if (!ui_.askRemoveLeg) return;
      const TopologyNode* leg = g.node(source);
      std::optional<bool> remove =
          ui_.askRemoveLeg(QStringLiteral("leg %1 of %2").arg(leg->slot).arg(leg->array));
      if (!remove) return;
      DropChoices c;
      c.remove_leg = *remove;
      return stage(MapDrop(g, source, target, c), at);
    }
    default:
      return stage(MapDrop(g, source, target), at);
  }
}

void DropController::askCreate(const QString& source, const QString& target, const QPointF& at) {
  // The level list is the registry of the host the array would go on by default: ask its
  // `hello` first, then the questions.
  DropChoices defaults;
  defaults.host = target.isEmpty() ? DefaultCreateHost(source) : target;
  defaults.sources = {source};
  HostSession* s = pane_->session(defaults.host);
  if (!s || !ui_.askCreate) return refuse(defaults.host, tr("no session for host %1").arg(defaults.host), at);
  QPointer<DropController> self(this);
  s->call("hello", json::object(), [self, source, target, at, defaults](bool ok, const json& r, const QString& err) {
    if (!self) return;
    if (!ok) return self->refuse(defaults.host, tr("cannot read the layer list: %1").arg(err), at);
    QStringList levels, hosts, exports;
    for (const json& l : r.value("layers", json::array()))
      if (l.is_string()) levels << QString::fromStdString(l.get<std::string>());
    for (const TopologyNode& n : self->canvas_->graph()->nodes()) {
      if (n.kind == QLatin1String("host")) hosts << n.key;
      if (n.kind == QLatin1String("export")) exports << n.key;
    }
    std::optional<DropChoices> c = self->ui_.askCreate(levels, hosts, exports, defaults);
    if (!c) return;
    if (!levels.contains(c->level)) return self->refuse(c->host, tr("no layer %1 on this host").arg(c->level), at);
    self->stage(MapDrop(*self->canvas_->graph(), source, target, *c), at);
  });
}

void DropController::stage(const MappedDrop& d, const QPointF& at) {
  if (!d.ok()) return refuse(d.host, d.refusal, at);
  PendingOpsModel* m = pane_->model(d.host);
  if (!m) return refuse(d.host, tr("no session for host %1").arg(d.host), at);
  auto [it, added] = waiting_.try_emplace(m);
  if (added) {
    const QString host = d.host;
    connect(m, &PendingOpsModel::staged, this, [this, m, host](int row) {
      if (waiting_[m].empty()) return;
      waiting_[m].pop_front();
      if (log_) log_->append(LogModel::kInfo, host, tr("staged: %1").arg(m->index(row).data().toString()));
    });
    connect(m, &PendingOpsModel::stageRefused, this, [this, m, host](const QString& reason, const QString& code) {
      if (waiting_[m].empty()) return;
      const QPointF p = waiting_[m].front();
      waiting_[m].pop_front();
      refuse(host, code.isEmpty() ? reason : QStringLiteral("%1 (%2)").arg(reason, code), p);
    });
  }
  it->second.push_back(at);
  pane_->setCurrentHost(d.host);
  m->stage(d.op);
}

void DropController::refuse(const QString& host, const QString& reason, const QPointF& at) {
  canvas_->showDropRefusal(at, reason);
  if (log_) log_->append(LogModel::kWarning, host, tr("drop refused: %1").arg(reason));
  emit refused(reason, at);
}

}  // namespace dst::gui
