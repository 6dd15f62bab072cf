#include "pending_ops_pane.h"

#include <QComboBox>
#include <QDialogButtonBox>
#include <QHBoxLayout>
#include <QLabel>
#include <QListView>
#include <QListWidget>
#include <QPushButton>
#include <QShortcut>
#include <QVBoxLayout>

#include "host_session.h"
#include "log_model.h"
#include "pending_ops_model.h"

namespace dst::gui {

using nlohmann::json;

ApplyDialog::ApplyDialog(PendingOpsModel* model, HostSession* session, LogModel* log, QWidget* parent)
    : QDialog(parent), model_(model), host_(session->path()), log_(log), steps_(new QListWidget),
      summary_(new QLabel(tr("Asking %1 for the plan…").arg(session->path()))),
      run_(new QPushButton(tr("Run"))) {
  setWindowTitle(tr("Apply staged operations"));
  summary_->setWordWrap(true);
  run_->setEnabled(false);
  auto* buttons = new QDialogButtonBox(QDialogButtonBox::Close);
  buttons->addButton(run_, QDialogButtonBox::ActionRole);
  connect(buttons, &QDialogButtonBox::rejected, this, &QDialog::reject);
  connect(run_, &QPushButton::clicked, this, &ApplyDialog::run);
  auto* box = new QVBoxLayout(this);
  box->addWidget(new QLabel(tr("The engine's plan for %1:").arg(host_)));
  box->addWidget(steps_);
  box->addWidget(summary_);
  box->addWidget(buttons);
  resize(640, 400);
  connect(model_, &PendingOpsModel::stepFinished, this, &ApplyDialog::onStep);
  connect(model_, &PendingOpsModel::applied, this, &ApplyDialog::onApplied);
  QPointer<ApplyDialog> self(this);
  session->call("batch", json{{"ops", model_->ops()}, {"dry_run", true}},
                [self](bool ok, const json& result, const QString& error) {
                  if (self) self->showPlan(ok, result, error);
                });
}

void ApplyDialog::showPlan(bool ok, const json& result, const QString& error) {
  if (!ok || !result.value("valid", false)) {
    QString why = error;
    for (const json& r : result.value("refusals", json::array()))
      why += QStringLiteral("\noperation %1: %2").arg(r.value("op", -1)).arg(QString::fromStdString(r.value("message", "")));
    summary_->setText(tr("The engine refuses the list now:%1").arg(why));
    return;
  }
  for (const json& s : result.value("steps", json::array())) {
    auto* item = new QListWidgetItem(QString::fromStdString(s.value("step", "")));
    item->setData(Qt::UserRole, s.value("op", -1));
    steps_->addItem(item);
  }
  plan_loaded_ = true;
  summary_->setText(tr("%n step(s); nothing has changed yet.", nullptr, steps_->count()));
  run_->setEnabled(steps_->count() > 0 && !model_->applying());
}

void ApplyDialog::run() {
  if (!plan_loaded_ || model_->applying() || finished_) return;
  run_->setEnabled(false);
  next_row_ = 0;
  if (steps_->count()) steps_->item(0)->setText("… " + steps_->item(0)->text());
  summary_->setText(tr("Running…"));
  model_->apply();
}

void ApplyDialog::onStep(int op, const QString& step, const QString& status) {
  // Steps finish in plan order; a row is matched by its op and text.
  for (int r = next_row_; r < steps_->count(); ++r) {
    QListWidgetItem* it = steps_->item(r);
    QString text = it->text();
    if (text.startsWith(QStringLiteral("… "))) text = text.mid(2);
    if (it->data(Qt::UserRole).toInt() != op || text != step) continue;
    const bool done = status == QLatin1String("done");
    it->setText((done ? "✓ " : "✗ ") + text);
    it->setForeground(done ? QColor(0x20, 0x80, 0x20) : QColor(0xb0, 0x20, 0x20));
    next_row_ = r + 1;
    if (done && next_row_ < steps_->count())
      steps_->item(next_row_)->setText("… " + steps_->item(next_row_)->text());
    return;
  }
}

void ApplyDialog::onApplied(bool ok, const QString& error, const json& report) {
  finished_ = true;
  const int done = static_cast<int>(report.value("done", json::array()).size());
  QString text;
  if (ok) {
    text = tr("Applied: %n step(s) done.", nullptr, done);
  } else {
    for (int r = next_row_; r < steps_->count(); ++r)
      if (steps_->item(r)->text().startsWith(QStringLiteral("… ")))
        steps_->item(r)->setText(steps_->item(r)->text().mid(2));
    text = tr("Stopped at the first error: %1\n%n step(s) done; nothing after it ran.", nullptr, done).arg(error);
  }
  summary_->setText(text);
  if (log_) log_->append(ok ? LogModel::kInfo : LogModel::kError, host_, text);
}

PendingOpsPane::PendingOpsPane(LogModel* log, QWidget* parent)
    : QWidget(parent), log_(log), hosts_(new QComboBox), view_(new QListView),
      undo_(new QPushButton(tr("Undo"))), redo_(new QPushButton(tr("Redo"))),
      remove_(new QPushButton(tr("Remove"))), clear_(new QPushButton(tr("Clear"))),
      apply_(new QPushButton(tr("Apply…"))) {
  auto* box = new QVBoxLayout(this);
  box->addWidget(hosts_);
  box->addWidget(view_);
  auto* row = new QHBoxLayout;
  for (QPushButton* b : {undo_, redo_, remove_, clear_, apply_}) row->addWidget(b);
  box->addLayout(row);
  undo_->setToolTip(tr("Undo (Ctrl+Z)"));
  redo_->setToolTip(tr("Redo (Ctrl+Shift+Z)"));
  connect(undo_, &QPushButton::clicked, this, &PendingOpsPane::undo);
  connect(redo_, &QPushButton::clicked, this, &PendingOpsPane::redo);
  connect(remove_, &QPushButton::clicked, this, [this] {
    if (PendingOpsModel* m = model(currentHost()); m && view_->currentIndex().isValid())
      m->remove(view_->currentIndex().row());
  });
  connect(clear_, &QPushButton::clicked, this, [this] {
    if (PendingOpsModel* m = model(currentHost())) m->clear();
  });
  connect(apply_, &QPushButton::clicked, this, &PendingOpsPane::openApplyDialog);
  for (auto [keys, slot] : {std::pair{QKeySequence(Qt::CTRL | Qt::Key_Z), &PendingOpsPane::undo},
                            std::pair{QKeySequence(Qt::CTRL | Qt::SHIFT | Qt::Key_Z), &PendingOpsPane::redo}}) {
    auto* s = new QShortcut(keys, this);
    s->setContext(Qt::WindowShortcut);
    connect(s, &QShortcut::activated, this, slot);
  }
  connect(hosts_, &QComboBox::currentIndexChanged, this, [this] {
    view_->setModel(model(currentHost()));
    if (view_->selectionModel())
      connect(view_->selectionModel(), &QItemSelectionModel::currentChanged, this, &PendingOpsPane::updateButtons);
    updateButtons();
  });
  updateButtons();
}

void PendingOpsPane::addHost(HostSession* session) {
  auto* m = new PendingOpsModel(session, this);
  models_[session->path()] = {session, m};
  for (auto sig : {&QAbstractItemModel::rowsInserted, &QAbstractItemModel::rowsRemoved})
    connect(m, sig, this, &PendingOpsPane::updateButtons);
  connect(m, &QAbstractItemModel::modelReset, this, &PendingOpsPane::updateButtons);
  connect(m, &PendingOpsModel::undoRedoChanged, this, &PendingOpsPane::updateButtons);
  connect(m, &PendingOpsModel::applied, this, &PendingOpsPane::updateButtons);
  hosts_->addItem(session->path());
}

PendingOpsModel* PendingOpsPane::model(const QString& host) const {
  auto it = models_.find(host);
  return it == models_.end() ? nullptr : it->second.model;
}

HostSession* PendingOpsPane::session(const QString& host) const {
  auto it = models_.find(host);
  return it == models_.end() ? nullptr : it->second.session;
}

QString PendingOpsPane::currentHost() const { return hosts_->currentText(); }

void PendingOpsPane::setCurrentHost(const QString& host) { hosts_->setCurrentIndex(hosts_->findText(host)); }

void PendingOpsPane::undo() {
  if (PendingOpsModel* m = model(currentHost())) m->undo();
}

void PendingOpsPane::redo() {
  if (PendingOpsModel* m = model(currentHost())) m->redo();
}

void PendingOpsPane::openApplyDialog() {
  PendingOpsModel* m = model(currentHost());
  if (!m || m->rowCount() == 0 || m->applying() || dialog_) return;
  dialog_ = new ApplyDialog(m, session(currentHost()), log_, this);
  dialog_->setAttribute(Qt::WA_DeleteOnClose);
  dialog_->open();
}

void PendingOpsPane::updateButtons() {
  PendingOpsModel* m = model(currentHost());
  const bool idle = m && !m->applying();
  undo_->setEnabled(m && m->canUndo());
  redo_->setEnabled(m && m->canRedo());
  remove_->setEnabled(idle && view_->currentIndex().isValid());
  clear_->setEnabled(idle && m->rowCount() > 0);
  apply_->setEnabled(idle && m->rowCount() > 0);
}

}  // namespace dst::gui
