#include "topology_canvas.h"

#include <cmath>
#include <set>

#include <QApplication>
#include <QContextMenuEvent>
#include <QGraphicsItem>
#include <QGraphicsLineItem>
#include <QGraphicsPathItem>
#include <QGraphicsScene>
#include <QMouseEvent>
#include <QPainter>
#include <QTimer>

#include "format.h"

namespace dst::gui {

namespace {

constexpr int kKeyData = 0;  // QGraphicsItem::data slot holding the node key
constexpr qreal kHostPad = 12, kHostTitle = 30, kHostGap = 70, kSectionGap = 8;

}  // namespace

QString NodeTitle(const TopologyNode& n) {
  if (n.kind == QLatin1String("leg")) return QStringLiteral("leg %1").arg(n.name);
  return n.kind + ' ' + n.name;
}

QString NodeDetail(const TopologyNode& n) {
  // An offline host's rows keep their last snapshot: say so rather than show stale states.
  QString line = n.offline ? StateCategoryName(StateCategory::kOffline) : n.state;
  if (n.size >= 0) line += QStringLiteral(" · ") + HumanSize(n.size);
  return line;
}

QString NodeNote(const TopologyNode& n) {
  // A leg's title already names its spec: its device instead; a volume its source.
  QString note = n.kind == QLatin1String("leg")      ? n.info
                 : n.kind == QLatin1String("volume") ? n.spec
                 : n.file.isEmpty()                  ? n.info
                                                     : n.file;
  if (n.dirty > 0) note = HumanSize(n.dirty) + QStringLiteral(" dirty") + (note.isEmpty() ? QString() : " · " + note);
  return note;
}

QColor StateColor(StateCategory c) {
  switch (c) {
    case StateCategory::kUpToDate: return QColor(0x43, 0xa0, 0x47);
    case StateCategory::kDegraded: return QColor(0xfb, 0x8c, 0x00);
    case StateCategory::kResyncing: return QColor(0x1e, 0x88, 0xe5);
    case StateCategory::kVerifying: return QColor(0x8e, 0x24, 0xaa);
    case StateCategory::kOutOfDate: return QColor(0xfd, 0xd8, 0x35);
    case StateCategory::kFailed: return QColor(0xe5, 0x39, 0x35);
    case StateCategory::kSplitBrain: return QColor(0xad, 0x14, 0x57);
    case StateCategory::kOffline: return QColor(0x9e, 0x9e, 0x9e);
    case StateCategory::kNeutral: break;
  }
  return QColor(0x90, 0xa4, 0xae);
}

// One export, volume, array or leg.
class CanvasNodeItem : public QGraphicsItem {
 public:
  explicit CanvasNodeItem(const TopologyNode& n) : node_(n) {
    setData(kKeyData, n.key);
    setZValue(1);
    setAcceptHoverEvents(true);
  }
  void set(const TopologyNode& n) {
    if (n == node_) return;
    node_ = n;
    setToolTip(QString());
    update();
  }
  void setHighlight(bool on) {
    if (on == highlight_) return;
    highlight_ = on;
    update();
  }
  const TopologyNode& node() const { return node_; }
  QRectF boundingRect() const override {
    return {0, 0, TopologyCanvas::kNodeWidth, TopologyCanvas::kNodeHeight};
  }
  QStringList badges() const {
    QStringList b;
    if (!node_.file.isEmpty()) b << QStringLiteral("FUSE");
    if (node_.category == StateCategory::kSplitBrain) b << QStringLiteral("split brain");
    if (node_.offline) b << QStringLiteral("offline");
    return b;
  }
  void paint(QPainter* p, const QStyleOptionGraphicsItem*, QWidget*) override {
    const QColor c = StateColor(node_.category);
    QRectF r = boundingRect().adjusted(1, 1, -1, -1);
    p->setRenderHint(QPainter::Antialiasing);
    p->setPen(QPen(highlight_ ? QColor(Qt::black) : c.darker(130), highlight_ ? 3 : 1.2));
    p->setBrush(node_.offline ? QColor(0xee, 0xee, 0xee) : c.lighter(175));
    p->drawRoundedRect(r, 6, 6);
    p->setPen(Qt::NoPen);
    p->setBrush(c);
    p->drawRoundedRect(QRectF(r.left(), r.top(), 7, r.height()), 3, 3);
    p->setPen(node_.offline ? QColor(Qt::gray) : QColor(Qt::black));
    QFont f = p->font();
    f.setBold(true);
    p->setFont(f);
    QRectF text = r.adjusted(12, 4, -6, -4);
    QFontMetricsF fm(f);
    // Badges at the top right, the title elided to what is left.
    qreal right = text.right();
    QFont bf = f;
    bf.setBold(false);
    bf.setPointSizeF(f.pointSizeF() * 0.8);
    QFontMetricsF bfm(bf);
    p->setFont(bf);
    for (const QString& b : badges()) {
      qreal w = bfm.horizontalAdvance(b) + 8;
      QRectF br(right - w, text.top(), w, bfm.height() + 2);
      p->setBrush(QColor(0x37, 0x47, 0x4f));
      p->setPen(Qt::NoPen);
      p->drawRoundedRect(br, 4, 4);
      p->setPen(Qt::white);
      p->drawText(br, Qt::AlignCenter, b);
      right = br.left() - 4;
    }
    p->setFont(f);
    p->setPen(node_.offline ? QColor(Qt::gray) : QColor(Qt::black));
    p->drawText(QRectF(text.left(), text.top(), right - text.left(), fm.height()), Qt::AlignLeft,
                fm.elidedText(NodeTitle(node_), Qt::ElideRight, right - text.left()));
    QFont sf = f;
    sf.setBold(false);
    p->setFont(sf);
    QFontMetricsF sfm(sf);
    p->drawText(QRectF(text.left(), text.top() + fm.height() + 2, text.width(), sfm.height()),
                Qt::AlignLeft, sfm.elidedText(NodeDetail(node_), Qt::ElideRight, text.width()));
    const QString third = NodeNote(node_);
    p->setPen(QColor(0x55, 0x55, 0x55));
    p->drawText(QRectF(text.left(), text.top() + fm.height() + sfm.height() + 3, text.width(), sfm.height()),
                Qt::AlignLeft, sfm.elidedText(third, node_.dirty > 0 ? Qt::ElideRight : Qt::ElideMiddle, text.width()));
  }

 protected:
  void hoverEnterEvent(QGraphicsSceneHoverEvent*) override {
    setToolTip(NodeTitle(node_) + '\n' + NodeDetail(node_) + '\n' + NodeNote(node_));
  }

 private:
  TopologyNode node_;
  bool highlight_ = false;
};

// A host: a titled box around its nodes.
class CanvasHostItem : public QGraphicsRectItem {
 public:
  explicit CanvasHostItem(const TopologyNode& n) : node_(n) {
    setData(kKeyData, n.key);
    setZValue(-1);
  }
  void set(const TopologyNode& n) {
    if (n == node_) return;
    node_ = n;
    update();
  }
  void setHighlight(bool on) {
    if (on == highlight_) return;
    highlight_ = on;
    update();
  }
  void paint(QPainter* p, const QStyleOptionGraphicsItem*, QWidget*) override {
    QRectF r = rect();
    p->setRenderHint(QPainter::Antialiasing);
    p->setPen(QPen(highlight_ ? QColor(Qt::black) : QColor(0x78, 0x90, 0x9c), highlight_ ? 3 : 1.5,
                   node_.offline ? Qt::DashLine : Qt::SolidLine));
    p->setBrush(node_.offline ? QColor(0xf3, 0xf3, 0xf3) : QColor(0xfa, 0xfb, 0xfc));
    p->drawRoundedRect(r, 8, 8);
    QFont f = p->font();
    f.setBold(true);
    p->setFont(f);
    p->setPen(node_.offline ? QColor(Qt::gray) : QColor(0x26, 0x32, 0x38));
    QString title = node_.name + (node_.offline ? QStringLiteral("  (offline)") : QString());
    QFontMetricsF fm(f);
    p->drawText(QRectF(r.left() + 10, r.top() + 6, r.width() - 20, fm.height()), Qt::AlignLeft,
                fm.elidedText(title, Qt::ElideMiddle, r.width() - 20));
  }

 private:
  TopologyNode node_;
  bool highlight_ = false;
};

TopologyCanvas::TopologyCanvas(TopologyGraph* graph, QWidget* parent)
    : QGraphicsView(parent), graph_(graph), scene_(new QGraphicsScene(this)) {
  setScene(scene_);
  setRenderHint(QPainter::Antialiasing);
  setDragMode(QGraphicsView::NoDrag);
  setAlignment(Qt::AlignLeft | Qt::AlignTop);
  viewport()->setMouseTracking(true);
  connect(graph_, &TopologyGraph::changed, this, &TopologyCanvas::sync);
  sync();
}

QGraphicsItem* TopologyCanvas::itemOf(const QString& key) const {
  if (auto it = nodes_.find(key); it != nodes_.end()) return it->second;
  if (auto it = hosts_.find(key); it != hosts_.end()) return it->second;
  return nullptr;
}

QRectF TopologyCanvas::nodeRect(const QString& key) const {
  QGraphicsItem* i = itemOf(key);
  return i ? i->sceneBoundingRect() : QRectF();
}

QStringList TopologyCanvas::edgeTexts() const {
  QStringList out;
  for (const auto& e : graph_->edges())
    if (edges_.count(e.from + '\n' + e.to))
      out << e.from + QStringLiteral(" -> ") + e.to + (e.cross_host ? QStringLiteral(" (cross)") : QString());
  return out;
}

bool TopologyCanvas::IsDragSource(const TopologyNode& n) {
  return n.kind == QLatin1String("export") || n.kind == QLatin1String("volume") ||
         n.kind == QLatin1String("array") || n.kind == QLatin1String("leg");
}

void TopologyCanvas::sync() {
  std::set<QString> keep_nodes, keep_hosts, keep_edges;
  for (const TopologyNode& n : graph_->nodes()) {
    if (n.kind == QLatin1String("host")) {
      keep_hosts.insert(n.key);
      auto [it, added] = hosts_.try_emplace(n.key, nullptr);
      if (added) {
        it->second = new CanvasHostItem(n);
        scene_->addItem(it->second);
      } else {
        it->second->set(n);
      }
      continue;
    }
    keep_nodes.insert(n.key);
    auto [it, added] = nodes_.try_emplace(n.key, nullptr);
    if (added) {
      it->second = new CanvasNodeItem(n);
      scene_->addItem(it->second);
    } else {
      it->second->set(n);
    }
  }
  for (const TopologyEdge& e : graph_->edges()) {
    QString k = e.from + '\n' + e.to;
    keep_edges.insert(k);
    auto [it, added] = edges_.try_emplace(k, nullptr);
    if (added) {
      it->second = new QGraphicsPathItem;
      it->second->setZValue(0);
      scene_->addItem(it->second);
    }
    QPen pen(e.cross_host ? QColor(0xef, 0x6c, 0x00) : QColor(0x54, 0x6e, 0x7a), e.cross_host ? 2.2 : 1.4,
             e.cross_host ? Qt::DashLine : Qt::SolidLine);
    it->second->setPen(pen);
  }
  auto prune = [this](auto& map, const std::set<QString>& keep) {
    for (auto it = map.begin(); it != map.end();) {
      if (keep.count(it->first)) {
        ++it;
        continue;
      }
      scene_->removeItem(it->second);
      delete it->second;
      it = map.erase(it);
    }
  };
  prune(nodes_, keep_nodes);
  prune(hosts_, keep_hosts);
  prune(edges_, keep_edges);
  if (!highlight_.isEmpty() && !itemOf(highlight_)) highlight_.clear();
  layout();
}

void TopologyCanvas::layout() {
  // Hosts are columns, left to right in the graph's order; inside a host the nodes stack in
  // tree order, legs indented under their array, a little space between kinds.
  qreal x = 0;
  const qreal column_w = kNodeWidth + kLegIndent + 2 * kHostPad;
  for (const TopologyNode& h : graph_->nodes()) {
    if (h.kind != QLatin1String("host")) continue;
    qreal y = kHostTitle;
    QString last_kind;
    for (const TopologyNode& n : graph_->nodes()) {
      if (n.host != h.key || n.kind == QLatin1String("host")) continue;
      bool leg = n.kind == QLatin1String("leg");
      if (!leg && !last_kind.isEmpty() && n.kind != last_kind) y += kSectionGap;
      if (!leg) last_kind = n.kind;
      nodes_[n.key]->setPos(x + kHostPad + (leg ? kLegIndent : 0), y);
      y += kNodeHeight + kGap;
    }
    hosts_[h.key]->setRect(x, 0, column_w, std::max(y, kHostTitle + kNodeHeight) + kHostPad - kGap);
    x += column_w + kHostGap;
  }
  for (const TopologyEdge& e : graph_->edges()) {
    auto* path_item = edges_[e.from + '\n' + e.to];
    QRectF a = nodeRect(e.from), b = nodeRect(e.to);
    QPainterPath path;
    if (e.kind == QLatin1String("member")) {  // an elbow from the array's left edge down to the leg
      QPointF p1(a.left() + kLegIndent / 2, a.bottom());
      path.moveTo(p1);
      path.lineTo(p1.x(), b.center().y());
      path.lineTo(b.left(), b.center().y());
    } else if (qAbs(a.center().x() - b.center().x()) < kNodeWidth) {  // same column: out right
      QPointF p1(a.right(), a.center().y()), p2(b.right(), b.center().y());
      path.moveTo(p1);
      path.cubicTo(p1 + QPointF(50, 0), p2 + QPointF(50, 0), p2);
    } else {
      bool rightward = b.center().x() > a.center().x();
      QPointF p1(rightward ? a.right() : a.left(), a.center().y());
      QPointF p2(rightward ? b.left() : b.right(), b.center().y());
      qreal dx = rightward ? 60 : -60;
      path.moveTo(p1);
      path.cubicTo(p1 + QPointF(dx, 0), p2 - QPointF(dx, 0), p2);
    }
    // An arrow head at the device end.
    QPointF end = path.currentPosition();
    qreal angle = path.angleAtPercent(1) * M_PI / 180;
    QPointF back(-std::cos(angle) * 8, std::sin(angle) * 8);
    QPointF side(std::sin(angle) * 4, std::cos(angle) * 4);
    path.moveTo(end + back + side);
    path.lineTo(end);
    path.lineTo(end + back - side);
    path_item->setPath(path);
  }
  scene_->setSceneRect(scene_->itemsBoundingRect().adjusted(-20, -20, 80, 40));
}

QString TopologyCanvas::keyAt(const QPointF& scene_pos) const {
  for (QGraphicsItem* i : scene_->items(scene_pos)) {
    QString k = i->data(kKeyData).toString();
    if (!k.isEmpty()) return k;
  }
  return {};
}

bool TopologyCanvas::dropTargetAt(const QPointF& scene_pos, QString* target) const {
  QString k = keyAt(scene_pos);
  target->clear();
  if (k.isEmpty() || hosts_.count(k)) {
    *target = k;
    return true;
  }
  const TopologyNode* n = graph_->node(k);
  if (!n || n->kind != QLatin1String("array")) return false;
  *target = k;
  return true;
}

void TopologyCanvas::setHighlight(const QString& key) {
  if (key == highlight_) return;
  for (const QString& k : {highlight_, key}) {
    if (auto it = nodes_.find(k); it != nodes_.end()) it->second->setHighlight(k == key);
    if (auto it = hosts_.find(k); it != hosts_.end()) it->second->setHighlight(k == key);
  }
  highlight_ = key;
}

void TopologyCanvas::mousePressEvent(QMouseEvent* e) {
  if (e->button() == Qt::LeftButton) {
    const TopologyNode* n = graph_->node(keyAt(mapToScene(e->position().toPoint())));
    if (n && IsDragSource(*n)) {
      drag_source_ = n->key;
      press_pos_ = e->position().toPoint();
      e->accept();
      return;
    }
  }
  QGraphicsView::mousePressEvent(e);
}

void TopologyCanvas::mouseMoveEvent(QMouseEvent* e) {
  if (drag_source_.isEmpty()) return QGraphicsView::mouseMoveEvent(e);
  const QPoint pos = e->position().toPoint();
  if (!drag_line_ && (pos - press_pos_).manhattanLength() < QApplication::startDragDistance()) return;
  if (!drag_line_) {
    drag_line_ = scene_->addLine(QLineF(), QPen(Qt::black, 2, Qt::DashLine));
    drag_line_->setZValue(10);
    viewport()->setCursor(Qt::DragLinkCursor);
  }
  QPointF to = mapToScene(pos);
  drag_line_->setLine(QLineF(nodeRect(drag_source_).center(), to));
  QString target;
  setHighlight(dropTargetAt(to, &target) && target != drag_source_ ? target : QString());
}

void TopologyCanvas::mouseReleaseEvent(QMouseEvent* e) {
  if (drag_source_.isEmpty()) return QGraphicsView::mouseReleaseEvent(e);
  const QString source = drag_source_;
  const bool moved = drag_line_ != nullptr;
  endDrag();
  QPointF at = mapToScene(e->position().toPoint());
  QString target;
  // The source may have gone while dragging (a live update); a drop onto itself is no drop.
  if (moved && graph_->node(source) && dropTargetAt(at, &target) && target != source)
    emit dropRequested(source, target, at);
}

void TopologyCanvas::showDropRefusal(const QPointF& scene_pos, const QString& reason, int ms) {
  if (!refusal_timer_) {
    refusal_box_ = scene_->addRect(QRectF(), QPen(QColor(0xb0, 0x20, 0x20)), QColor(0xff, 0xf0, 0xf0));
    refusal_ = new QGraphicsSimpleTextItem(refusal_box_);
    refusal_box_->setZValue(20);
    refusal_timer_ = new QTimer(this);
    refusal_timer_->setSingleShot(true);
    connect(refusal_timer_, &QTimer::timeout, this, [this] { refusal_box_->hide(); });
  }
  refusal_->setText(tr("Refused: %1").arg(reason));
  refusal_->setPos(6, 4);
  refusal_box_->setRect(QRectF(QPointF(0, 0), refusal_->boundingRect().size() + QSizeF(12, 8)));
  refusal_box_->setPos(scene_pos + QPointF(8, 8));
  refusal_box_->show();
  refusal_box_->setToolTip(reason);
  refusal_timer_->start(ms);
}

QString TopologyCanvas::refusalText() const {
  return refusal_box_ && refusal_box_->isVisible() ? refusal_->text() : QString();
}

QPointF TopologyCanvas::refusalPos() const { return refusal_box_ ? refusal_box_->pos() : QPointF(); }

void TopologyCanvas::endDrag() {
  drag_source_.clear();
  if (drag_line_) {
    scene_->removeItem(drag_line_);
    delete drag_line_;
    drag_line_ = nullptr;
    viewport()->unsetCursor();
  }
  setHighlight(QString());
}

void TopologyCanvas::mouseDoubleClickEvent(QMouseEvent* e) {
  QString k = keyAt(mapToScene(e->position().toPoint()));
  if (!k.isEmpty()) emit nodeActivated(k);
  QGraphicsView::mouseDoubleClickEvent(e);
}

void TopologyCanvas::contextMenuEvent(QContextMenuEvent* e) {
  emit contextMenuRequested(keyAt(mapToScene(e->pos())), e->globalPos());
  e->accept();
}

}  // namespace dst::gui
