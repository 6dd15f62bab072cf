// OfflineTint: shows the rows of an offline host (DeviceTreeModel::OfflineRole) in grey.
// The models link only Qt Core, so the colour is added here, in the Widgets layer.
#pragma once

#include <QIdentityProxyModel>

namespace dst::gui {

class OfflineTint : public QIdentityProxyModel {
  Q_OBJECT
 public:
  using QIdentityProxyModel::QIdentityProxyModel;
  QVariant data(const QModelIndex& index, int role = Qt::DisplayRole) const override;
};

}  // namespace dst::gui
