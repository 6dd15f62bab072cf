// TopologyGraph: the device tree as nodes and edges for the canvas (Qt Core only).  It follows
// a DeviceTreeModel through its row signals (no polling) and rebuilds a flat picture:
//
//   node per host, export, volume, array and each array's leg (stacked arrays and volumes are
//   their own top-level nodes, not repeated under the leg);
//   edge array -> leg ("member"), leg -> device it uses and volume -> export it imports
//   ("uses"): `array:NAME` and `volume:NAME` on the same host, and `dst://addr:port/EXPORT` on
//   the host whose listen address matches (then `cross_host` is true).
//
// Node keys are stable and say what a node is, for the drop hook and the later staged
// operations: "<host>#export:e1", "<host>#volume:v1", "<host>#array:m0", "<host>#leg:m0/1"; a
// host's key is its socket path.  Names never contain '#', so the last '#' splits a key.
#pragma once

#include <vector>

#include <QObject>
#include <QString>

class QAbstractItemModel;

namespace dst::gui {

// The states the canvas tells apart by colour.
enum class StateCategory {
  kNeutral,
  kUpToDate,
  kDegraded,
  kResyncing,
  kVerifying,
  kOutOfDate,
  kFailed,
  kSplitBrain,
  kOffline
};
// From the daemon's word (EngineStateRole) and the tree's state text ("verifying" is only in
// the text: the engine says "clean" while a verify runs).
StateCategory StateCategoryOf(const QString& engine_state, const QString& shown_state, bool offline);
QString StateCategoryName(StateCategory c);

struct TopologyNode {
  QString key, host, kind, name;  // kind: host, export, volume, array, leg
  QString array;                  // legs: their array's name
  int slot = -1;                  // legs
  QString state;                  // the tree's state text
  StateCategory category = StateCategory::kNeutral;
  qint64 size = -1, dirty = -1;
  QString spec, file, info;
  bool offline = false;
  bool operator==(const TopologyNode&) const = default;
};

struct TopologyEdge {
  QString from, to, kind;  // kind: "member" or "uses"
  bool cross_host = false;
  bool operator==(const TopologyEdge&) const = default;
};

class TopologyGraph : public QObject {
  Q_OBJECT
 public:
  explicit TopologyGraph(QObject* parent = nullptr);
  // Follows `model` (a DeviceTreeModel, or a proxy of one with the same roles).
  void setModel(QAbstractItemModel* model);

  // Nodes in tree order: each host, then its exports, volumes, arrays each followed by its legs.
  const std::vector<TopologyNode>& nodes() const { return nodes_; }
  const std::vector<TopologyEdge>& edges() const { return edges_; }
  const TopologyNode* node(const QString& key) const;

  static QString ObjectKey(const QString& host, const QString& kind, const QString& name);
  static QString LegKey(const QString& host, const QString& array, int slot);
  // "<host>#kind:name" -> host and "kind:name"; a host key -> itself and "".
  static void SplitKey(const QString& key, QString* host, QString* object);

 signals:
  // After every rebuild that changed a node or edge.
  void changed();

 private:
  void rebuild();

  QAbstractItemModel* model_ = nullptr;
  std::vector<TopologyNode> nodes_;
  std::vector<TopologyEdge> edges_;
};

}  // namespace dst::gui
