// DropController: the canvas's dropRequested -> DropMapper -> the target host's
// PendingOpsModel::stage (the engine's dry-run check).  A drop the mapper or the engine refuses
// shows its reason at the drop point (TopologyCanvas::showDropRefusal) and in the log; nothing
// is staged.  The questions a drop asks (level, name and host of a new array; detach or remove
// a leg) go through Ui callbacks: dialogs in the window, scripted in tests.
#pragma once

#include <deque>
#include <functional>
#include <map>
#include <optional>

#include <QObject>
#include <QPointF>
#include <QStringList>

#include "drop_mapper.h"

class QWidget;

namespace dst::gui {

class LogModel;
class PendingOpsModel;
class PendingOpsPane;
class TopologyCanvas;

class DropController : public QObject {
  Q_OBJECT
 public:
  struct Ui {
    // A new array: the levels (hello's layer registry), the hosts, every export key; `defaults`
    // holds the dropped export and its host.  nullopt: cancelled.
    std::function<std::optional<DropChoices>(const QStringList& levels, const QStringList& hosts,
                                             const QStringList& exports, const DropChoices& defaults)>
        askCreate;
    // A leg dragged out: true remove, false detach, nullopt cancelled.
    std::function<std::optional<bool>(const QString& leg)> askRemoveLeg;
  };
  // Dialogs over `parent`.
  static Ui DialogUi(QWidget* parent);

  DropController(TopologyCanvas* canvas, PendingOpsPane* pane, LogModel* log, Ui ui, QObject* parent = nullptr);
  void setUi(Ui ui) { ui_ = std::move(ui); }

  void drop(const QString& source, const QString& target, const QPointF& at);

 signals:
  void refused(const QString& reason, const QPointF& at);

 private:
  void askCreate(const QString& source, const QString& target, const QPointF& at);
  void stage(const MappedDrop& d, const QPointF& at);
  void refuse(const QString& host, const QString& reason, const QPointF& at);

  TopologyCanvas* canvas_;
  PendingOpsPane* pane_;
  LogModel* log_;
  Ui ui_;
  // Drop points of the stages each model is validating, in order (it answers in order).
  std::map<PendingOpsModel*, std::deque<QPointF>> waiting_;
};

}  // namespace dst::gui
