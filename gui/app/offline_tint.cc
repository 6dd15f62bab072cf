#include "offline_tint.h"

#include <QColor>

#include "device_tree_model.h"

namespace dst::gui {

QVariant OfflineTint::data(const QModelIndex& index, int role) const {
  if (role == Qt::ForegroundRole && index.data(DeviceTreeModel::OfflineRole).toBool())
    return QColor(Qt::gray);
  return QIdentityProxyModel::data(index, role);
}

}  // namespace dst::gui
