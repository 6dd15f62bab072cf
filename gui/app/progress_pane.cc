#include "progress_pane.h"

#include <algorithm>
#include <cmath>

#include <QApplication>
#include <QHBoxLayout>
#include <QHeaderView>
#include <QLabel>
#include <QPainter>
#include <QPushButton>
#include <QSpinBox>
#include <QTableView>
#include <QVBoxLayout>

#include "host_calls.h"
#include "progress_model.h"

namespace dst::gui {

QPolygonF ProgressDelegate::SparklinePoints(const QVariantList& history, const QRectF& r) {
  std::vector<double> v;
  for (const QVariant& x : history) {
    bool ok = false;
    double d = x.toDouble(&ok);
    if (ok && std::isfinite(d)) v.push_back(std::max(0.0, d));
  }
  QPolygonF out;
  if (v.size() < 2 || r.width() <= 0 || r.height() <= 0) return out;
  const double top = *std::max_element(v.begin(), v.end());
  for (std::size_t i = 0; i < v.size(); ++i) {
    double x = r.left() + r.width() * double(i) / double(v.size() - 1);
    double y = r.bottom() - (top > 0 ? r.height() * v[i] / top : 0);
    out << QPointF(x, y);
  }
  return out;
}

void ProgressDelegate::paint(QPainter* p, const QStyleOptionViewItem& option, const QModelIndex& index) const {
  const int col = index.column();
  if (col != ProgressModel::kPercent && col != ProgressModel::kRate)
    return QStyledItemDelegate::paint(p, option, index);
  QStyleOptionViewItem opt = option;
  initStyleOption(&opt, index);
  const QWidget* w = option.widget;
  QStyle* style = w ? w->style() : QApplication::style();
  if (col == ProgressModel::kPercent) {
    double pct = index.data(ProgressModel::PercentRole).toDouble();
    if (!std::isfinite(pct)) pct = 0;
    QStyleOptionProgressBar bar;
    bar.rect = option.rect.adjusted(2, 2, -2, -2);
    bar.minimum = 0;
    bar.maximum = 1000;
    bar.progress = int(std::clamp(pct, 0.0, 100.0) * 10);
    bar.text = index.data().toString();
    bar.textVisible = true;
    bar.state = option.state | QStyle::State_Horizontal;
    bar.palette = option.palette;
    style->drawControl(QStyle::CE_ProgressBar, &bar, p, w);
    return;
  }
  // Rate: the background and selection as usual, the sparkline, then the text over it.
  QString text = opt.text;
  opt.text.clear();
  style->drawControl(QStyle::CE_ItemViewItem, &opt, p, w);
  QRectF r = QRectF(option.rect).adjusted(3, 3, -3, -3);
  QPolygonF line = SparklinePoints(index.data(ProgressModel::RateHistoryRole).toList(), r);
  p->save();
  p->setRenderHint(QPainter::Antialiasing);
  if (!line.isEmpty()) {
    QPolygonF area = line;
    area << QPointF(line.last().x(), r.bottom()) << QPointF(line.first().x(), r.bottom());
    QColor c = option.palette.color(QPalette::Highlight);
    c.setAlpha(60);
    p->setPen(Qt::NoPen);
    p->setBrush(c);
    p->drawPolygon(area);
    p->setPen(QPen(option.palette.color(QPalette::Highlight), 1.2));
    p->drawPolyline(line);
  }
  p->setPen(option.palette.color(option.state & QStyle::State_Selected ? QPalette::HighlightedText
                                                                       : QPalette::Text));
  p->drawText(r, Qt::AlignRight | Qt::AlignVCenter, text);
  p->restore();
}

QSize ProgressDelegate::sizeHint(const QStyleOptionViewItem& option, const QModelIndex& index) const {
  QSize s = QStyledItemDelegate::sizeHint(option, index);
  if (index.column() == ProgressModel::kPercent || index.column() == ProgressModel::kRate)
    s.setWidth(std::max(s.width(), 140));
  return s;
}

ProgressPane::ProgressPane(ProgressModel* model, HostCalls* calls, QWidget* parent)
    : QWidget(parent),
      model_(model),
      calls_(calls),
      view_(new QTableView),
      rate_(new QSpinBox),
      set_rate_(new QPushButton(tr("Set"))),
      cancel_verify_(new QPushButton(tr("Cancel verify"))),
      pause_(new QPushButton(tr("Pause"))),
      resume_(new QPushButton(tr("Resume"))) {
  view_->setModel(model_);
  view_->setItemDelegate(new ProgressDelegate(view_));
  view_->setSelectionBehavior(QAbstractItemView::SelectRows);
  view_->setSelectionMode(QAbstractItemView::SingleSelection);
  view_->verticalHeader()->hide();
  view_->horizontalHeader()->setStretchLastSection(true);
  view_->setColumnWidth(ProgressModel::kPercent, 160);
  view_->setColumnWidth(ProgressModel::kRate, 160);
  rate_->setRange(0, 1 << 20);
  rate_->setSuffix(tr(" MiB/s"));
  rate_->setSpecialValueText(tr("unlimited"));
  rate_->setToolTip(tr("The selected array's resync rate limit (array.set_resync_rate max)"));
  auto* controls = new QHBoxLayout;
  controls->addWidget(new QLabel(tr("Rate limit:")));
  controls->addWidget(rate_);
  controls->addWidget(set_rate_);
  controls->addSpacing(20);
  controls->addWidget(cancel_verify_);
  controls->addWidget(pause_);
  controls->addWidget(resume_);
  pause_->setToolTip(tr("Pause the selected array's resync (array.pause_resync; until resumed or dstd restarts)"));
  resume_->setToolTip(tr("Resume the selected array's paused resync (array.resume_resync)"));
  controls->addStretch(1);
  auto* layout = new QVBoxLayout(this);
  layout->setContentsMargins(0, 0, 0, 0);
  layout->addLayout(controls);
  layout->addWidget(view_);
  connect(set_rate_, &QPushButton::clicked, this, &ProgressPane::setRateLimit);
  connect(cancel_verify_, &QPushButton::clicked, this, &ProgressPane::cancelVerify);
  connect(pause_, &QPushButton::clicked, this, [this] { pauseResync(true); });
  connect(resume_, &QPushButton::clicked, this, [this] { pauseResync(false); });
  connect(model_, &QAbstractItemModel::dataChanged, this, &ProgressPane::updateButtons);
  connect(view_->selectionModel(), &QItemSelectionModel::selectionChanged, this,
          &ProgressPane::updateButtons);
  connect(model_, &QAbstractItemModel::rowsRemoved, this, &ProgressPane::updateButtons);
  updateButtons();
}

bool ProgressPane::selected(QString* host, QString* array, QString* kind) const {
  const QModelIndexList rows = view_->selectionModel()->selectedRows();
  if (rows.isEmpty()) return false;
  const QModelIndex i = rows.first();
  *host = i.siblingAtColumn(ProgressModel::kHost).data().toString();
  *array = i.siblingAtColumn(ProgressModel::kArray).data().toString();
  *kind = i.siblingAtColumn(ProgressModel::kKind).data().toString();
  return true;
}

void ProgressPane::updateButtons() {
  QString host, array, kind;
  const bool any = selected(&host, &array, &kind);
  // Start from the array's current limit (MiB/s, rounded up so a small limit is not shown as
  // unlimited).
  if (any) {
    const qint64 limit =
        view_->selectionModel()->selectedRows().first().data(ProgressModel::RateLimitRole).toLongLong();
    if (limit >= 0) rate_->setValue(int(std::min<qint64>((limit + (1 << 20) - 1) >> 20, rate_->maximum())));
  }
  set_rate_->setEnabled(any);
  cancel_verify_->setEnabled(any && kind == QLatin1String("verifying"));
  pause_->setEnabled(any && kind == QLatin1String("resyncing"));
  resume_->setEnabled(any && kind == QLatin1String("paused"));
}

void ProgressPane::setRateLimit() {
  QString host, array, kind;
  if (!selected(&host, &array, &kind)) return;
  const std::int64_t max = std::int64_t(rate_->value()) << 20;  // 0: unlimited
  calls_->call(host, QStringLiteral("array.set_resync_rate"), {{"name", array.toStdString()}, {"max", max}});
}

void ProgressPane::cancelVerify() {
  QString host, array, kind;
  if (!selected(&host, &array, &kind) || kind != QLatin1String("verifying")) return;
  calls_->call(host, QStringLiteral("array.verify"), {{"name", array.toStdString()}, {"cancel", true}});
}

void ProgressPane::pauseResync(bool pause) {
  QString host, array, kind;
  if (!selected(&host, &array, &kind) || kind != QLatin1String(pause ? "resyncing" : "paused")) return;
  calls_->call(host, pause ? QStringLiteral("array.pause_resync") : QStringLiteral("array.resume_resync"),
               {{"name", array.toStdString()}});
}

}  // namespace dst::gui
