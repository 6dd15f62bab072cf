#include "topology_graph.h"

#include <QAbstractItemModel>
#include <QUrl>

#include "device_tree_model.h"

namespace dst::gui {

StateCategory StateCategoryOf(const QString& engine, const QString& shown, bool offline) {
  if (offline || engine == QLatin1String("offline")) return StateCategory::kOffline;
  if (engine == QLatin1String("split-brain") || shown == QLatin1String("split brain"))
    return StateCategory::kSplitBrain;
  if (shown == QLatin1String("verifying")) return StateCategory::kVerifying;
  if (engine == QLatin1String("resyncing")) return StateCategory::kResyncing;
  if (engine == QLatin1String("degraded") || engine == QLatin1String("reconnecting") ||
      engine == QLatin1String("connecting"))
    return StateCategory::kDegraded;
  if (engine == QLatin1String("failed") || engine == QLatin1String("missing"))
    return StateCategory::kFailed;
  if (engine == QLatin1String("out-of-date") || engine == QLatin1String("detached") ||
      engine == QLatin1String("outdated") || engine == QLatin1String("stale"))
    return StateCategory::kOutOfDate;
  static const char* const kGood[] = {"clean", "up-to-date", "connected", "ready",
                                      "read-write", "read-only", "online"};
  for (const char* g : kGood)
    if (engine == QLatin1String(g)) return StateCategory::kUpToDate;
  return StateCategory::kNeutral;
}

QString StateCategoryName(StateCategory c) {
  switch (c) {
    case StateCategory::kUpToDate: return QStringLiteral("up to date");
    case StateCategory::kDegraded: return QStringLiteral("degraded");
    case StateCategory::kResyncing: return QStringLiteral("resyncing");
    case StateCategory::kVerifying: return QStringLiteral("verifying");
    case StateCategory::kOutOfDate: return QStringLiteral("out of date");
    case StateCategory::kFailed: return QStringLiteral("failed");
    case StateCategory::kSplitBrain: return QStringLiteral("split brain");
    case StateCategory::kOffline: return QStringLiteral("offline");
    case StateCategory::kNeutral: break;
  }
  return {};
}

QString TopologyGraph::ObjectKey(const QString& host, const QString& kind, const QString& name) {
  return host + '#' + kind + ':' + name;
}

QString TopologyGraph::LegKey(const QString& host, const QString& array, int slot) {
  return ObjectKey(host, QStringLiteral("leg"), array + '/' + QString::number(slot));
}

void TopologyGraph::SplitKey(const QString& key, QString* host, QString* object) {
  int i = key.lastIndexOf('#');
  *host = i < 0 ? key : key.left(i);
  *object = i < 0 ? QString() : key.mid(i + 1);
}

TopologyGraph::TopologyGraph(QObject* parent) : QObject(parent) {}

void TopologyGraph::setModel(QAbstractItemModel* model) {
  if (model_) disconnect(model_, nullptr, this, nullptr);
  model_ = model;
  if (model_) {
    // Rebuilt synchronously on every row signal: the model is consistent at each one and the
    // graph of a few hosts is small; the canvas only moves the items that changed.
    connect(model_, &QAbstractItemModel::rowsInserted, this, &TopologyGraph::rebuild);
    connect(model_, &QAbstractItemModel::rowsRemoved, this, &TopologyGraph::rebuild);
    connect(model_, &QAbstractItemModel::rowsMoved, this, &TopologyGraph::rebuild);
    connect(model_, &QAbstractItemModel::dataChanged, this, &TopologyGraph::rebuild);
    connect(model_, &QAbstractItemModel::modelReset, this, &TopologyGraph::rebuild);
    connect(model_, &QObject::destroyed, this, [this] {
      model_ = nullptr;
      rebuild();
    });
  }
  rebuild();
}

const TopologyNode* TopologyGraph::node(const QString& key) const {
  for (const auto& n : nodes_)
    if (n.key == key) return &n;
  return nullptr;
}

namespace {

TopologyNode FromIndex(const QModelIndex& i, const QString& host) {
  TopologyNode n;
  n.host = host;
  n.kind = i.data(DeviceTreeModel::KindRole).toString();
  n.name = i.siblingAtColumn(DeviceTreeModel::kName).data().toString();
  n.state = i.siblingAtColumn(DeviceTreeModel::kState).data().toString();
  n.offline = i.data(DeviceTreeModel::OfflineRole).toBool();
  n.category = StateCategoryOf(i.data(DeviceTreeModel::EngineStateRole).toString(), n.state, n.offline);
  QVariant size = i.data(DeviceTreeModel::SizeBytesRole), dirty = i.data(DeviceTreeModel::DirtyBytesRole);
  n.size = size.isValid() ? size.toLongLong() : -1;
  n.dirty = dirty.isValid() ? dirty.toLongLong() : -1;
  n.spec = i.data(DeviceTreeModel::SpecRole).toString();
  n.file = i.data(DeviceTreeModel::FileRole).toString();
  n.info = i.siblingAtColumn(DeviceTreeModel::kInfo).data().toString();
  return n;
}

bool IsWildcard(const QString& a) {
  return a.isEmpty() || a == QLatin1String("0.0.0.0") || a == QLatin1String("::") ||
         a == QLatin1String("[::]");
}
bool IsLoopback(const QString& a) {
  return a == QLatin1String("localhost") || a.startsWith(QLatin1String("127.")) ||
         a == QLatin1String("::1");
}

// The host whose listen address a dst:// URI names: the same address and port, else a
// wildcard listener on that port, else loopback to loopback.
QString HostOfUri(const QUrl& url, const std::vector<std::pair<QString, QString>>& listens) {
  QString best;
  int best_score = 0;
  for (const auto& [host, listen] : listens) {
    int colon = listen.lastIndexOf(':');
    if (colon < 0) continue;
    QString addr = listen.left(colon);
    if (addr.startsWith('[') && addr.endsWith(']')) addr = addr.mid(1, addr.size() - 2);
    // dst:// without a port means 7400 (netdriver/include/dst/net/uri.h).
    if (listen.mid(colon + 1).toInt() != url.port(7400)) continue;
    int score = addr == url.host()                         ? 3
                : IsWildcard(addr)                         ? 2
                : IsLoopback(addr) && IsLoopback(url.host()) ? 1
                                                           : 0;
    if (score > best_score) best = host, best_score = score;
  }
  return best;
}

}  // namespace

void TopologyGraph::rebuild() {
  std::vector<TopologyNode> nodes;
  std::vector<TopologyEdge> edges;
  std::vector<std::pair<QString, QString>> listens;  // host, "addr:port"
  struct Use {
    QString from, host, spec;
  };
  std::vector<Use> uses;
  const QAbstractItemModel* m = model_;
  for (int h = 0; m && h < m->rowCount(); ++h) {
    QModelIndex hi = m->index(h, 0);
    const QString host = hi.data(DeviceTreeModel::KeyRole).toString();
    TopologyNode hn = FromIndex(hi, host);
    hn.key = host;
    listens.emplace_back(host, hn.spec);
    nodes.push_back(hn);
    for (int r = 0; r < m->rowCount(hi); ++r) {
      QModelIndex oi = m->index(r, 0, hi);
      TopologyNode on = FromIndex(oi, host);
      on.key = ObjectKey(host, on.kind, on.name);
      if (on.kind == QLatin1String("volume") && on.spec.contains(QLatin1String("://")))
        uses.push_back({on.key, host, on.spec});
      nodes.push_back(on);
      if (on.kind != QLatin1String("array")) continue;
      for (int l = 0; l < m->rowCount(oi); ++l) {
        QModelIndex li = m->index(l, 0, oi);
        TopologyNode ln = FromIndex(li, host);
        ln.array = on.name;
        ln.slot = ln.name.section(':', 0, 0).toInt();
        ln.key = LegKey(host, on.name, ln.slot);
        edges.push_back({on.key, ln.key, QStringLiteral("member"), false});
        uses.push_back({ln.key, host, ln.spec});
        nodes.push_back(ln);
      }
    }
  }
  auto exists = [&](const QString& key) {
    for (const auto& n : nodes)
      if (n.key == key) return true;
    return false;
  };
  for (const Use& u : uses) {
    QString to;
    if (u.spec.startsWith(QLatin1String("array:")))
      to = ObjectKey(u.host, QStringLiteral("array"), u.spec.mid(6));
    else if (u.spec.startsWith(QLatin1String("volume:")))
      to = ObjectKey(u.host, QStringLiteral("volume"), u.spec.mid(7));
    else if (u.spec.startsWith(QLatin1String("dst://")) || u.spec.startsWith(QLatin1String("dsts://"))) {
      QUrl url(u.spec);
      QString exporter = HostOfUri(url, listens);
      if (!exporter.isEmpty())
        to = ObjectKey(exporter, QStringLiteral("export"), url.path().section('/', 1, 1));
    }
    if (to.isEmpty() || !exists(to)) continue;  // a file leg, or an exporter not shown
    QString to_host, object;
    SplitKey(to, &to_host, &object);
    edges.push_back({u.from, to, QStringLiteral("uses"), to_host != u.host});
  }
  if (nodes == nodes_ && edges == edges_) return;
  nodes_ = std::move(nodes);
  edges_ = std::move(edges);
  emit changed();
}

}  // namespace dst::gui
