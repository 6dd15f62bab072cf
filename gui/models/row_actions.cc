#include "row_actions.h"

#include <dst/control/render.h>

#include "device_tree_model.h"
#include "format.h"
#include "host_calls.h"
#include "log_model.h"

namespace dst::gui {

namespace {

QModelIndex HostOf(QModelIndex i) {
  while (i.parent().isValid()) i = i.parent();
  return i;
}

QString NameOf(const QModelIndex& i) { return i.siblingAtColumn(DeviceTreeModel::kName).data().toString(); }

RowAction Call(const QString& label, const QString& host, const QString& method, nlohmann::json params,
               RowAction::Kind kind = RowAction::kCall) {
  RowAction a;
  a.kind = kind;
  a.label = label;
  a.host = host;
  a.method = method;
  a.params = std::move(params);
  return a;
}

}  // namespace

std::vector<RowAction> ActionsFor(const QModelIndex& index) {
  std::vector<RowAction> out;
  if (!index.isValid() || index.data(DeviceTreeModel::OfflineRole).toBool()) return out;
  const QModelIndex h = HostOf(index);
  const QString host = h.data(DeviceTreeModel::KeyRole).toString();
  const QString kind = index.data(DeviceTreeModel::KindRole).toString();
  const std::string name = NameOf(index).toStdString();
  if (kind == QLatin1String("array")) {
    const bool verifying =
        index.siblingAtColumn(DeviceTreeModel::kState).data().toString() == QLatin1String("verifying");
    out.push_back(verifying ? Call(QObject::tr("Cancel verify"), host, "array.verify", {{"name", name}, {"cancel", true}})
                            : Call(QObject::tr("Start verify"), host, "array.verify", {{"name", name}}));
    out.push_back(Call(QObject::tr("Health check"), host, "array.detail", {{"name", name}}, RowAction::kHealth));
  }
  if (kind == QLatin1String("leg")) {
    const QModelIndex array = index.parent();
    if (array.data(DeviceTreeModel::EngineStateRole).toString() == QLatin1String("split-brain")) {
      // The leg's name is "SLOT: SPEC".
      const int slot = NameOf(index).section(':', 0, 0).toInt();
      out.push_back(Call(QObject::tr("Resolve split brain: keep leg %1").arg(slot), host, "array.resolve",
                         {{"name", NameOf(array).toStdString()}, {"keep", slot}}, RowAction::kResolve));
    }
  }
  if ((kind == QLatin1String("volume") || kind == QLatin1String("array")) &&
      !index.data(DeviceTreeModel::FileRole).toString().isEmpty()) {
    // Only a shown file can back a loop device; one device per file (dstd refuses a second).
    const QStringList loops = index.data(DeviceTreeModel::LoopDevicesRole).toStringList();
    if (loops.isEmpty())
      out.push_back(Call(QObject::tr("Attach loop device"), host, "loop.attach", {{"name", name}}));
    else
      out.push_back(Call(QObject::tr("Detach loop device %1").arg(loops.join(", ")), host, "loop.detach",
                         {{"name", name}}));
  }
  if (h.data(DeviceTreeModel::FileRole).toString().isEmpty())
    out.push_back(Call(QObject::tr("Mount FUSE file system..."), host, "mount", nlohmann::json::object(),
                       RowAction::kAskMountPath));
  else
    out.push_back(Call(QObject::tr("Unmount FUSE file system"), host, "unmount", nlohmann::json::object()));
  return out;
}

ActionRunner::ActionRunner(HostCalls* calls, Ui ui, QObject* parent)
    : QObject(parent), calls_(calls), ui_(std::move(ui)) {}

void ActionRunner::run(const RowAction& a) {
  switch (a.kind) {
    case RowAction::kCall:
      calls_->call(a.host, a.method, a.params);
      return;
    case RowAction::kAskMountPath: {
      std::optional<QString> path = ui_.askMountPath(QString::fromLatin1(kDefaultMount));
      if (!path || path->isEmpty()) return;
      nlohmann::json p = a.params;
      p["path"] = path->toStdString();
      calls_->call(a.host, a.method, p);
      return;
    }
    case RowAction::kHealth: {
      const QString array = QString::fromStdString(a.params.value("name", ""));
      calls_->call(a.host, a.method, a.params, [this, a, array](const nlohmann::json& result) {
        static const char* const kWords[] = {"healthy", "degraded", "unusable", "", "no usable information"};
        const int code = control::DetailTestCode(result);
        const QString word = QString::fromLatin1(kWords[code >= 0 && code <= 4 ? code : 4]);
        calls_->log()->append(code == 0 ? LogModel::kInfo : code == 1 ? LogModel::kWarning : LogModel::kError,
                              a.host, tr("health check of %1: %2").arg(array, word));
        ui_.inform(tr("Health of %1: %2").arg(array, word), QString::fromStdString(control::RenderDetail(result)));
      });
      return;
    }
    case RowAction::kResolve: {
      nlohmann::json dry = a.params;
      dry["dry_run"] = true;
      calls_->call(a.host, a.method, dry, [this, a](const nlohmann::json& result) {
        // The figure first: what keeping this leg overwrites on the others.
        QString text = tr("Keeping leg %1 of %2 overwrites %3 on the other legs:")
                           .arg(a.params.value("keep", -1))
                           .arg(QString::fromStdString(a.params.value("name", "")))
                           .arg(HumanSize(result.value("bytes_overwritten", qint64(0))));
        for (const auto& l : result.value("legs", nlohmann::json::array()))
          if (!l.value("keep", false))
            text += tr("\nleg %1 (%2): %3")
                        .arg(l.value("slot", -1))
                        .arg(QString::fromStdString(l.value("spec", "")))
                        .arg(HumanSize(l.value("bytes_overwritten", qint64(0))));
        if (!ui_.confirm(tr("Resolve split brain"), text + tr("\n\nResolve now?"))) {
          calls_->log()->append(LogModel::kInfo, a.host, tr("split brain resolution cancelled"));
          return;
        }
        calls_->call(a.host, a.method, a.params);
      });
      return;
    }
  }
}

}  // namespace dst::gui
