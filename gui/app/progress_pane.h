// ProgressPane: the running resync passes and verifies (ProgressModel) in a table: a bar for
// the percentage, the rate with a small graph of its recent history (ProgressDelegate paints
// RateHistoryRole), ETA and bytes.  Controls act on the selected row through HostCalls:
//   * "Limit" + "Set": array.set_resync_rate {name, max} (MiB/s; 0 = unlimited), live; selecting
//     a row shows its array's current limit;
//   * "Cancel verify": array.verify {name, cancel: true} on a verify row;
//   * "Pause" / "Resume": array.pause_resync / array.resume_resync {name} on a resync row
//     (running / paused).
#pragma once

#include <QStyledItemDelegate>
#include <QWidget>

class QPushButton;
class QSpinBox;
class QTableView;

namespace dst::gui {

class HostCalls;
class ProgressModel;

// Paints ProgressModel's percent column as a bar and its rate column as text over a sparkline;
// other columns as usual.  Any data (missing, negative, NaN, huge) paints without harm.
class ProgressDelegate : public QStyledItemDelegate {
  Q_OBJECT
 public:
  using QStyledItemDelegate::QStyledItemDelegate;
  void paint(QPainter* p, const QStyleOptionViewItem& option, const QModelIndex& index) const override;
  QSize sizeHint(const QStyleOptionViewItem& option, const QModelIndex& index) const override;

  // The sparkline's points in `r` for `history` (bytes/s, oldest first), scaled to its maximum;
  // empty for fewer than two finite samples.
  static QPolygonF SparklinePoints(const QVariantList& history, const QRectF& r);
};

class ProgressPane : public QWidget {
  Q_OBJECT
 public:
  ProgressPane(ProgressModel* model, HostCalls* calls, QWidget* parent = nullptr);

  QTableView* view() const { return view_; }
  QSpinBox* rateLimit() const { return rate_; }
  QPushButton* setRateButton() const { return set_rate_; }
  QPushButton* cancelVerifyButton() const { return cancel_verify_; }
  QPushButton* pauseButton() const { return pause_; }
  QPushButton* resumeButton() const { return resume_; }

  // The actions on the selected row (the buttons call these).
  void setRateLimit();
  void cancelVerify();
  void pauseResync(bool pause);

 private:
  void updateButtons();
  bool selected(QString* host, QString* array, QString* kind) const;

  ProgressModel* model_;
  HostCalls* calls_;
  QTableView* view_;
  QSpinBox* rate_;
  QPushButton* set_rate_;
  QPushButton* cancel_verify_;
  QPushButton* pause_;
  QPushButton* resume_;
};

}  // namespace dst::gui
