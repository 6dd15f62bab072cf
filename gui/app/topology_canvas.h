// TopologyCanvas: the TopologyGraph drawn as a QGraphicsScene.  Each host is a box (a column),
// with its exports, volumes and arrays stacked inside and each array's legs indented under it;
// edges run array -> leg and leg/volume -> the device it uses, dashed and orange when they
// cross hosts.  A node's colour is its state (StateColor); its text says name, state, size,
// out-of-sync bytes and badges ("FUSE" when a file is mounted, "split brain", "offline").
//
// Items are kept by node key and updated in place when the graph changes (live, from the
// DeviceTreeModel's signals); the layout is recomputed, so nodes do not move by hand.
//
// Drag and drop is the hook for the staged operations: pressing on an export, volume, array or
// leg and releasing over an array, a host box's empty space or the bare canvas emits
// dropRequested(source key, target key, scene point): target is the array's key, the host's
// key (its socket path) or "" for the bare canvas.  Nothing is checked or staged here.
#pragma once

#include <map>

#include <QColor>
#include <QGraphicsView>

#include "topology_graph.h"

class QGraphicsLineItem;
class QGraphicsPathItem;
class QGraphicsRectItem;
class QGraphicsSimpleTextItem;
class QTimer;

namespace dst::gui {

class CanvasNodeItem;
class CanvasHostItem;

QColor StateColor(StateCategory c);
// A node's three label lines: "array m0"; "degraded · 64.0 MiB"; "128.0 KiB dirty · mirror"
// (out-of-sync bytes first when there are any, then the device, source, FUSE file or info).
QString NodeTitle(const TopologyNode& n);
QString NodeDetail(const TopologyNode& n);
QString NodeNote(const TopologyNode& n);

class TopologyCanvas : public QGraphicsView {
  Q_OBJECT
 public:
  static constexpr qreal kNodeWidth = 240, kNodeHeight = 54, kGap = 10, kLegIndent = 26;

  explicit TopologyCanvas(TopologyGraph* graph, QWidget* parent = nullptr);

  TopologyGraph* graph() const { return graph_; }
  // The item of a node (a host's box for a host key); null when not shown.
  QGraphicsItem* itemOf(const QString& key) const;
  // Scene rectangle of a node's item, for tests and the screenshot tool.
  QRectF nodeRect(const QString& key) const;
  int edgeCount() const { return int(edges_.size()); }
  // Keys of the edges shown, "from -> to" (cross-host ones end in " (cross)").
  QStringList edgeTexts() const;
  // Whether a drop at `scene_pos` has a target, and its key ("" for the bare canvas): false
  // over a node that takes no drops.
  bool dropTargetAt(const QPointF& scene_pos, QString* target) const;
  static bool IsDragSource(const TopologyNode& n);
  // A refused drop's reason, shown at the drop point for `ms` (a boxed text item); one at a
  // time.  refusalText() is what shows now ("" when none).
  void showDropRefusal(const QPointF& scene_pos, const QString& reason, int ms = 6000);
  QString refusalText() const;
  QPointF refusalPos() const;

 signals:
  void dropRequested(const QString& source_key, const QString& target_key, const QPointF& scene_pos);
  // Right click on a node (key) or on the bare canvas (""), at a global position.
  void contextMenuRequested(const QString& key, const QPoint& global_pos);
  void nodeActivated(const QString& key);  // double click

 protected:
  void mousePressEvent(QMouseEvent* e) override;
  void mouseMoveEvent(QMouseEvent* e) override;
  void mouseReleaseEvent(QMouseEvent* e) override;
  void mouseDoubleClickEvent(QMouseEvent* e) override;
  void contextMenuEvent(QContextMenuEvent* e) override;

 private:
  void sync();
  void layout();
  QString keyAt(const QPointF& scene_pos) const;
  void setHighlight(const QString& key);
  void endDrag();

  TopologyGraph* graph_;
  QGraphicsScene* scene_;
  std::map<QString, CanvasNodeItem*> nodes_;
  std::map<QString, CanvasHostItem*> hosts_;
  std::map<QString, QGraphicsPathItem*> edges_;  // "from\nto"
  // Drag state: the source pressed, where, and the rubber line once it moved far enough.
  QString drag_source_;
  QPoint press_pos_;
  QGraphicsLineItem* drag_line_ = nullptr;
  QString highlight_;
  QGraphicsSimpleTextItem* refusal_ = nullptr;
  QGraphicsRectItem* refusal_box_ = nullptr;
  QTimer* refusal_timer_ = nullptr;
};

}  // namespace dst::gui
