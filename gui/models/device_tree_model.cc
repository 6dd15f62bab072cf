#include "device_tree_model.h"

#include <algorithm>
#include <set>

#include <QMimeData>
#include <QStringList>

#include "format.h"
#include "host_session.h"
#include "sorted_merge.h"
#include "topology_graph.h"

using nlohmann::json;

namespace dst::gui {

struct DeviceTreeModel::Node {
  QString kind;
  QString key;  // unique among siblings; siblings are kept sorted by it
  QVariant col[kColumnCount];
  qint64 size = -1;
  qint64 dirty = -1;
  QString engine_state;
  QString spec, file;    // SpecRole, FileRole
  QStringList loops;     // LoopDevicesRole
  bool offline = false;  // hosts only
  Node* parent = nullptr;
  std::vector<std::unique_ptr<Node>> children;

  int row() const {
    const auto& sib = parent->children;
    for (std::size_t i = 0; i < sib.size(); ++i)
      if (sib[i].get() == this) return int(i);
    return -1;
  }
  bool sameValues(const Node& o) const {
    for (int c = 0; c < kColumnCount; ++c)
      if (col[c] != o.col[c]) return false;
    return size == o.size && dirty == o.dirty && engine_state == o.engine_state &&
           spec == o.spec && file == o.file && loops == o.loops;
  }
  void copyValues(const Node& o) {
    for (int c = 0; c < kColumnCount; ++c) col[c] = o.col[c];
    size = o.size;
    dirty = o.dirty;
    engine_state = o.engine_state;
    spec = o.spec;
    file = o.file;
    loops = o.loops;
  }
};

namespace {

using NodePtr = std::unique_ptr<DeviceTreeModel::Node>;
using Node = DeviceTreeModel::Node;
constexpr int kMaxStackDepth = 8;  // stacked arrays deeper than this are not expanded

// A volume's or array's loop devices (status `loop_devices`), and their text for the info column.
QStringList Loops(const json& o) {
  QStringList out;
  auto it = o.find("loop_devices");
  if (it == o.end() || !it->is_array()) return out;
  for (const auto& d : *it)
    if (d.is_object() && d.contains("device") && d["device"].is_string())
      out << QString::fromStdString(d["device"].get<std::string>());
  return out;
}

QString LoopInfo(const QStringList& loops) {
  return loops.isEmpty() ? QString() : ", loop " + loops.join(", ");
}

QString Str(const json& o, const char* k) {
  auto it = o.find(k);
  if (it == o.end() || !it->is_string()) return {};
  return QString::fromStdString(it->get<std::string>());
}
qint64 Int(const json& o, const char* k, qint64 dflt = -1) {
  auto it = o.find(k);
  return it != o.end() && it->is_number() ? it->get<qint64>() : dflt;
}
const json& Arr(const json& o, const char* k) {
  static const json kEmpty = json::array();
  auto it = o.find(k);
  return it != o.end() && it->is_array() ? *it : kEmpty;
}

void SetSize(Node* n, qint64 size) {
  n->size = size;
  n->col[DeviceTreeModel::kSize] = size >= 0 ? QVariant(HumanSize(size)) : QVariant();
}

void SortChildren(Node* n) {
  std::sort(n->children.begin(), n->children.end(),
            [](const NodePtr& a, const NodePtr& b) { return a->key < b->key; });
  for (auto& c : n->children) c->parent = n;
}

// A row for a named object; `order` sorts exports before volumes before arrays.
NodePtr Named(const char* kind, char order, const json& o, const QString& key_suffix = {}) {
  auto n = std::make_unique<Node>();
  n->kind = QString::fromLatin1(kind);
  n->key = QChar(order) + n->kind + ":" + Str(o, "name") + key_suffix;
  n->col[DeviceTreeModel::kName] = Str(o, "name");
  SetSize(n.get(), Int(o, "size"));
  return n;
}

NodePtr BuildExport(const json& e) {
  NodePtr n = Named("export", '0', e);
  n->engine_state = e.value("read_only", false) ? "read-only" : "read-write";
  n->col[DeviceTreeModel::kState] =
      e.value("read_only", false) ? QStringLiteral("exported read-only") : QStringLiteral("exported");
  n->col[DeviceTreeModel::kInfo] =
      QStringLiteral("%1, %2 client(s)").arg(Str(e, "device")).arg(Int(e, "connections", 0));
  n->spec = Str(e, "path");
  return n;
}

NodePtr BuildVolume(const json& v) {
  NodePtr n = Named("volume", '1', v);
  n->engine_state = Str(v, "state");
  n->col[DeviceTreeModel::kState] = HumanState(n->engine_state);
  QString file = Str(v, "file");
  QString src = Str(v, "source");
  n->spec = src;
  n->file = file;
  n->loops = Loops(v);
  n->col[DeviceTreeModel::kInfo] =
      (file.isEmpty() ? QStringLiteral("not mounted") : "mounted at " + file) + LoopInfo(n->loops) +
      (src.isEmpty() ? QString() : ", from " + src);
  return n;
}

const json* FindByName(const json& status, const char* list, const QString& name) {
  for (const json& o : Arr(status, list))
    if (Str(o, "name") == name) return &o;
  return nullptr;
}

NodePtr BuildArray(const json& status, const json& a, std::set<QString>* stack);

NodePtr BuildLeg(const json& status, const json& leg, std::set<QString>* stack) {
  auto n = std::make_unique<Node>();
  n->kind = "leg";
  qint64 slot = Int(leg, "slot", 0);
  n->key = QStringLiteral("slot:%1").arg(slot, 5, 10, QChar('0'));
  QString spec = Str(leg, "spec");
  n->spec = spec;
  n->col[DeviceTreeModel::kName] = QStringLiteral("%1: %2").arg(slot).arg(spec);
  SetSize(n.get(), Int(leg, "length"));
  n->engine_state = Str(leg, "state");
  n->col[DeviceTreeModel::kState] = HumanState(n->engine_state);
  n->dirty = Int(leg, "out_of_sync_bytes", 0);
  n->col[DeviceTreeModel::kDirty] = HumanSize(n->dirty);
  QString info = Str(leg, "device");
  QString reason = Str(leg, "reason");
  if (!reason.isEmpty() && reason != QLatin1String("none"))
    info += (info.isEmpty() ? "" : ", ") + QStringLiteral("reason: ") + reason;
  n->col[DeviceTreeModel::kInfo] = info;
  // A stacked leg shows the array or volume it is.
  if (spec.startsWith(QLatin1String("array:"))) {
    const json* child = FindByName(status, "arrays", spec.mid(6));
    if (child) {
      NodePtr c = BuildArray(status, *child, stack);
      if (c) n->children.push_back(std::move(c));
    }
  } else if (spec.startsWith(QLatin1String("volume:"))) {
    const json* child = FindByName(status, "volumes", spec.mid(7));
    if (child) n->children.push_back(BuildVolume(*child));
  }
  SortChildren(n.get());
  return n;
}

NodePtr BuildArray(const json& status, const json& a, std::set<QString>* stack) {
  QString name = Str(a, "name");
  if (stack->count(name) || stack->size() >= kMaxStackDepth) return nullptr;  // a cycle
  stack->insert(name);
  NodePtr n = Named("array", '2', a, "/" + Str(a, "id"));
  n->engine_state = Str(a, "state");
  QString state = HumanState(n->engine_state);
  auto v = a.find("verify");
  bool verifying = v != a.end() && v->is_object() && Str(*v, "state") == QLatin1String("running");
  if (verifying && n->engine_state == QLatin1String("clean")) state = QStringLiteral("verifying");
  if (!a.value("assembled", true)) state = QStringLiteral("not assembled");
  n->col[DeviceTreeModel::kState] = state;
  qint64 dirty = 0;
  for (const json& leg : Arr(a, "legs")) {
    dirty += Int(leg, "out_of_sync_bytes", 0);
    n->children.push_back(BuildLeg(status, leg, stack));
  }
  n->dirty = dirty;
  n->col[DeviceTreeModel::kDirty] = HumanSize(dirty);
  QString file = Str(a, "file");
  n->file = file;
  n->loops = Loops(a);
  n->col[DeviceTreeModel::kInfo] =
      Str(a, "level") + (file.isEmpty() ? QString() : ", mounted at " + file) + LoopInfo(n->loops);
  SortChildren(n.get());
  stack->erase(name);
  return n;
}

std::vector<NodePtr> BuildHostChildren(const json& status) {
  Node tmp;
  for (const json& e : Arr(status, "exports")) tmp.children.push_back(BuildExport(e));
  for (const json& v : Arr(status, "volumes")) tmp.children.push_back(BuildVolume(v));
  for (const json& a : Arr(status, "arrays")) {
    std::set<QString> stack;
    NodePtr n = BuildArray(status, a, &stack);
    if (n) tmp.children.push_back(std::move(n));
  }
  SortChildren(&tmp);
  // Names are unique per kind in one dstd, but a damaged snapshot must not break the model.
  tmp.children.erase(std::unique(tmp.children.begin(), tmp.children.end(),
                                 [](const NodePtr& a, const NodePtr& b) { return a->key == b->key; }),
                     tmp.children.end());
  return std::move(tmp.children);
}

void SetHostValues(Node* h, const json& status) {
  h->col[DeviceTreeModel::kState] = h->offline ? QStringLiteral("offline") : QStringLiteral("online");
  h->engine_state = h->offline ? "offline" : "online";
  h->file = Str(status, "mount");
  auto d = status.find("daemon");
  if (d != status.end() && d->is_object()) {
    QString info = "dstd " + Str(*d, "version") + QStringLiteral(", pid %1").arg(Int(*d, "pid", 0));
    QString mount = Str(status, "mount");
    if (!mount.isEmpty()) info += ", mount " + mount;
    h->col[DeviceTreeModel::kInfo] = info;
    // The address other hosts' dst:// URIs name (docs/control.md `status`: daemon.listen).
    auto l = d->find("listen");
    if (l != d->end() && l->is_object())
      h->spec = Str(*l, "address") + QStringLiteral(":%1").arg(Int(*l, "port", 0));
    else if (l != d->end() && l->is_string())
      h->spec = QString::fromStdString(l->get<std::string>());
  }
}

}  // namespace

DeviceTreeModel::DeviceTreeModel(QObject* parent)
    : QAbstractItemModel(parent), root_(std::make_unique<Node>()) {}
DeviceTreeModel::~DeviceTreeModel() = default;

QString DeviceTreeModel::graphKey(const QModelIndex& index) const {
  if (!index.isValid()) return {};
  const Node* n = nodeOf(index);
  const Node* h = n;
  while (h->parent != root_.get()) h = h->parent;
  if (n == h) return n->key;  // a host: its socket path
  if (n->kind == QLatin1String("leg"))
    return TopologyGraph::LegKey(h->key, n->parent->col[kName].toString(), n->key.mid(5).toInt());
  return TopologyGraph::ObjectKey(h->key, n->kind, n->col[kName].toString());
}

Qt::ItemFlags DeviceTreeModel::flags(const QModelIndex& index) const {
  if (!index.isValid()) return Qt::ItemIsDropEnabled;  // the empty area: a new array
  Qt::ItemFlags f = QAbstractItemModel::flags(index);
  if (index.data(OfflineRole).toBool()) return f;  // nothing to or from an offline host
  const QString kind = nodeOf(index)->kind;
  if (kind != QLatin1String("host")) f |= Qt::ItemIsDragEnabled;
  if (kind == QLatin1String("host") || kind == QLatin1String("array")) f |= Qt::ItemIsDropEnabled;
  return f;
}

QStringList DeviceTreeModel::mimeTypes() const { return {QString::fromLatin1(kMimeType)}; }

QMimeData* DeviceTreeModel::mimeData(const QModelIndexList& indexes) const {
  QStringList keys;
  for (const QModelIndex& i : indexes) {
    const QString k = graphKey(i.siblingAtColumn(0));
    if (!k.isEmpty() && !keys.contains(k)) keys << k;  // a row's columns come one by one
  }
  if (keys.isEmpty()) return nullptr;
  auto* md = new QMimeData;
  md->setData(QString::fromLatin1(kMimeType), keys.join('\n').toUtf8());
  return md;
}

bool DeviceTreeModel::canDropMimeData(const QMimeData* data, Qt::DropAction, int, int,
                                      const QModelIndex& parent) const {
  if (!data || !data->hasFormat(QString::fromLatin1(kMimeType))) return false;
  return (flags(parent) & Qt::ItemIsDropEnabled) != 0;
}

bool DeviceTreeModel::dropMimeData(const QMimeData* data, Qt::DropAction action, int row, int column,
                                   const QModelIndex& parent) {
  if (!canDropMimeData(data, action, row, column, parent)) return false;
  const QStringList keys = QString::fromUtf8(data->data(QString::fromLatin1(kMimeType))).split('\n', Qt::SkipEmptyParts);
  if (keys.isEmpty()) return false;
  // Between two rows of a host or array (row >= 0) is a drop on that host or array too.
  emit dropRequested(keys.first(), graphKey(parent.siblingAtColumn(0)));
  return false;  // nothing moved: the drop is staged, and the rows follow the daemon
}

DeviceTreeModel::Node* DeviceTreeModel::nodeOf(const QModelIndex& index) const {
  return index.isValid() ? static_cast<Node*>(index.internalPointer()) : root_.get();
}

QModelIndex DeviceTreeModel::indexOf(Node* n, int column) const {
  if (n == root_.get()) return {};
  return createIndex(n->row(), column, n);
}

void DeviceTreeModel::mergeChildren(Node* parent, std::vector<std::unique_ptr<Node>> want) {
  auto& cur = parent->children;
  SortedMerge(
      [&] { return cur.size(); }, [&](std::size_t i) -> const QString& { return cur[i]->key; },
      want.size(), [&](std::size_t j) -> const QString& { return want[j]->key; },
      [&](std::size_t i) {
        beginRemoveRows(indexOf(parent), int(i), int(i));
        cur.erase(cur.begin() + std::ptrdiff_t(i));
        endRemoveRows();
      },
      [&](std::size_t i, std::size_t j) {
        beginInsertRows(indexOf(parent), int(i), int(i));
        want[j]->parent = parent;
        cur.insert(cur.begin() + std::ptrdiff_t(i), std::move(want[j]));
        endInsertRows();
      },
      [&](std::size_t i, std::size_t j) {
        Node* n = cur[i].get();
        if (!n->sameValues(*want[j])) {
          n->copyValues(*want[j]);
          emit dataChanged(indexOf(n, 0), indexOf(n, kColumnCount - 1));
        }
        mergeChildren(n, std::move(want[j]->children));
      });
}

void DeviceTreeModel::setHost(const QString& host, const json& status) {
  auto& hosts = root_->children;
  auto it = std::lower_bound(hosts.begin(), hosts.end(), host,
                             [](const NodePtr& n, const QString& k) { return n->key < k; });
  Node* h;
  if (it == hosts.end() || (*it)->key != host) {
    int row = int(it - hosts.begin());
    auto n = std::make_unique<Node>();
    n->kind = "host";
    n->key = host;
    n->col[kName] = host;
    n->parent = root_.get();
    SetHostValues(n.get(), status);
    h = n.get();
    beginInsertRows({}, row, row);
    hosts.insert(hosts.begin() + row, std::move(n));
    endInsertRows();
  } else {
    h = it->get();
    QVariant before = h->col[kInfo];
    QString before_spec = h->spec, before_file = h->file;
    SetHostValues(h, status);
    if (before != h->col[kInfo] || before_spec != h->spec || before_file != h->file)
      emit dataChanged(indexOf(h, 0), indexOf(h, kColumnCount - 1));
  }
  mergeChildren(h, BuildHostChildren(status));
}

void DeviceTreeModel::emitSubtreeChanged(Node* parent) {
  if (parent->children.empty()) return;
  emit dataChanged(indexOf(parent->children.front().get(), 0),
                   indexOf(parent->children.back().get(), kColumnCount - 1));
  for (auto& c : parent->children) emitSubtreeChanged(c.get());
}

void DeviceTreeModel::setHostOnline(const QString& host, bool online) {
  for (auto& h : root_->children) {
    if (h->key != host) continue;
    if (h->offline == !online) return;
    h->offline = !online;
    h->col[kState] = online ? QStringLiteral("online") : QStringLiteral("offline");
    h->engine_state = online ? "online" : "offline";
    emit dataChanged(indexOf(h.get(), 0), indexOf(h.get(), kColumnCount - 1));
    emitSubtreeChanged(h.get());
    return;
  }
}

void DeviceTreeModel::removeHost(const QString& host) {
  auto& hosts = root_->children;
  for (std::size_t i = 0; i < hosts.size(); ++i) {
    if (hosts[i]->key != host) continue;
    beginRemoveRows({}, int(i), int(i));
    hosts.erase(hosts.begin() + std::ptrdiff_t(i));
    endRemoveRows();
    return;
  }
}

void DeviceTreeModel::attach(HostSession* session) {
  const QString host = session->path();
  setHost(host, session->snapshot());
  setHostOnline(host, session->online());
  connect(session, &HostSession::snapshotChanged, this,
          [this, session] { setHost(session->path(), session->snapshot()); });
  connect(session, &HostSession::onlineChanged, this,
          [this, host](bool online) { setHostOnline(host, online); });
  connect(session, &QObject::destroyed, this, [this, host] { removeHost(host); });
}

QModelIndex DeviceTreeModel::index(int row, int column, const QModelIndex& parent) const {
  if (column < 0 || column >= kColumnCount || row < 0) return {};
  if (parent.isValid() && parent.column() != 0) return {};
  Node* p = nodeOf(parent);
  if (row >= int(p->children.size())) return {};
  return createIndex(row, column, p->children[std::size_t(row)].get());
}

QModelIndex DeviceTreeModel::parent(const QModelIndex& child) const {
  if (!child.isValid()) return {};
  Node* p = nodeOf(child)->parent;
  return indexOf(p);
}

int DeviceTreeModel::rowCount(const QModelIndex& parent) const {
  if (parent.isValid() && parent.column() != 0) return 0;
  return int(nodeOf(parent)->children.size());
}

int DeviceTreeModel::columnCount(const QModelIndex&) const { return kColumnCount; }

QVariant DeviceTreeModel::data(const QModelIndex& index, int role) const {
  if (!index.isValid()) return {};
  const Node* n = nodeOf(index);
  switch (role) {
    case Qt::DisplayRole:
      return n->col[index.column()];
    case KindRole:
      return n->kind;
    case KeyRole:
      return n->key;
    case SizeBytesRole:
      return n->size >= 0 ? QVariant(n->size) : QVariant();
    case DirtyBytesRole:
      return n->dirty >= 0 ? QVariant(n->dirty) : QVariant();
    case EngineStateRole:
      return n->engine_state;
    case SpecRole:
      return n->spec;
    case FileRole:
      return n->file;
    case LoopDevicesRole:
      return n->loops;
    case OfflineRole: {
      const Node* h = n;
      while (h->parent != root_.get()) h = h->parent;
      return h->offline;
    }
    default:
      return {};
  }
}

QVariant DeviceTreeModel::headerData(int section, Qt::Orientation o, int role) const {
  if (o != Qt::Horizontal || role != Qt::DisplayRole) return {};
  static const char* const kNames[] = {"Name", "Size", "State", "Out of sync", "Info"};
  if (section < 0 || section >= kColumnCount) return {};
  return QString::fromLatin1(kNames[section]);
}

}  // namespace dst::gui
