// DeviceTreeModel: every host's exports, volumes and arrays as a tree; an array's rows are its
// legs, and a leg that is another array or volume of the same host (`array:NAME`,
// `volume:NAME`) has that object, with its own legs, as its child.
//
//   host (socket path)
//   +- export e1             size, "exported", device and clients
//   +- volume v1             size, connection state, FUSE file when mounted, loop devices
//   +- array m0              size, state (up to date / degraded / resyncing / verifying / ...)
//      +- leg 0              spec, state, out-of-sync bytes
//      +- leg 1  array:lin   (the stacked array "lin" and its legs below it)
//
// setHost() diffs a `status` result against the rows it shows, by stable keys (export and
// volume name, array name and id, leg slot), with beginInsertRows/beginRemoveRows and
// dataChanged: views keep their selection and expansion.  Never a model reset.  A host that
// goes offline keeps its rows (its last snapshot) with state "offline" and OfflineRole true on
// every row below it, for the view to grey them.
#pragma once

#include <memory>
#include <vector>

#include <QAbstractItemModel>
#include <nlohmann/json.hpp>

namespace dst::gui {

class HostSession;

class DeviceTreeModel : public QAbstractItemModel {
  Q_OBJECT
 public:
  enum Column { kName, kSize, kState, kDirty, kInfo, kColumnCount };
  enum Role {
    KindRole = Qt::UserRole + 1,  // "host", "export", "volume", "array", "leg"
    KeyRole,                      // stable key among siblings, their sort order ("0export:e1",
                                  // "2array:m0/<id>", "slot:00001")
    SizeBytesRole,                // qint64
    DirtyBytesRole,               // qint64: a leg's out-of-sync bytes, an array's total
    EngineStateRole,              // the daemon's word ("clean", "split-brain", ...)
    OfflineRole,                  // bool: the row's host is offline
    SpecRole,                     // what the row is built on: a leg's spec, a volume's source
                                  // URI, an export's path, a host's listen address "addr:port"
    FileRole,                     // a volume's or array's FUSE file when mounted, a host's FUSE
                                  // mount point, else empty
    LoopDevicesRole,              // QStringList: the loop devices over a volume's or array's
                                  // FUSE file ("/dev/loop3"), status `loop_devices`
  };

  explicit DeviceTreeModel(QObject* parent = nullptr);
  ~DeviceTreeModel() override;

  // Shows `status` (docs/control.md) as host `host`'s rows; adds the host if new.
  void setHost(const QString& host, const nlohmann::json& status);
  void setHostOnline(const QString& host, bool online);
  void removeHost(const QString& host);
  // Follows a session: its snapshots and online state (the host's name is its socket path).
  void attach(HostSession* session);

  QModelIndex index(int row, int column, const QModelIndex& parent = {}) const override;
  QModelIndex parent(const QModelIndex& child) const override;
  int rowCount(const QModelIndex& parent = {}) const override;
  int columnCount(const QModelIndex& parent = {}) const override;
  QVariant data(const QModelIndex& index, int role = Qt::DisplayRole) const override;
  QVariant headerData(int section, Qt::Orientation o, int role = Qt::DisplayRole) const override;

  // Drag and drop in the tree view, the same drops as the canvas's (DropMapper): exports,
  // volumes, arrays and legs can be dragged; arrays, hosts and the empty area below the rows
  // accept.  A drop changes nothing here: dropMimeData emits dropRequested with TopologyGraph
  // keys (target "" for the empty area) and the window stages it (DropController).
  static constexpr const char* kMimeType = "application/x-dst-node-keys";
  Qt::ItemFlags flags(const QModelIndex& index) const override;
  QStringList mimeTypes() const override;
  QMimeData* mimeData(const QModelIndexList& indexes) const override;
  bool canDropMimeData(const QMimeData* data, Qt::DropAction action, int row, int column,
                       const QModelIndex& parent) const override;
  bool dropMimeData(const QMimeData* data, Qt::DropAction action, int row, int column,
                    const QModelIndex& parent) override;
  Qt::DropActions supportedDragActions() const override { return Qt::CopyAction | Qt::MoveAction; }
  Qt::DropActions supportedDropActions() const override { return Qt::CopyAction | Qt::MoveAction; }
  // The row's TopologyGraph key (ObjectKey / LegKey; a host's socket path); empty for none.
  QString graphKey(const QModelIndex& index) const;

  struct Node;

 signals:
  void dropRequested(const QString& source_key, const QString& target_key);


 private:
  Node* nodeOf(const QModelIndex& index) const;
  QModelIndex indexOf(Node* n, int column = 0) const;
  void mergeChildren(Node* parent, std::vector<std::unique_ptr<Node>> want);
  void emitSubtreeChanged(Node* parent);

  std::unique_ptr<Node> root_;
};

}  // namespace dst::gui
