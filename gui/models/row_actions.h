// The actions a device-tree row offers in its context menu, and running them through HostCalls
// (control methods of docs/control.md):
//
//   any row of an online host   "Mount FUSE file system..." (mount {path}; the path is asked)
//                               or "Unmount FUSE file system" (unmount) when mounted
//   array                       "Start verify" (array.verify {name}) or "Cancel verify"
//                               (array.verify {name, cancel}); "Health check" (array.detail,
//                               judged like `dstctl detail --test`, the detail shown)
//   volume or array with a FUSE "Attach loop device" (loop.attach {name}) or "Detach loop device
//   file                        /dev/loopN" (loop.detach {name}) when one is attached
//   leg of a split-brain array  "Resolve split brain: keep leg N": array.resolve with dry_run
//                               first, its figure (bytes overwritten) shown for confirmation,
//                               then array.resolve {name, keep}
//
// An offline host's rows offer nothing.  Works on a DeviceTreeModel or a proxy with its roles.
#pragma once

#include <functional>
#include <optional>
#include <vector>

#include <QModelIndex>
#include <QObject>
#include <QString>
#include <nlohmann/json.hpp>

namespace dst::gui {

class HostCalls;

struct RowAction {
  enum Kind { kCall, kAskMountPath, kResolve, kHealth };
  Kind kind = kCall;
  QString label, host, method;
  nlohmann::json params = nlohmann::json::object();
};

std::vector<RowAction> ActionsFor(const QModelIndex& index);

// Runs RowActions; the questions and answers go through `Ui` (dialogs in the window, scripted
// in tests).  Results and failures are logged by HostCalls.
class ActionRunner : public QObject {
  Q_OBJECT
 public:
  struct Ui {
    std::function<std::optional<QString>(const QString& suggested)> askMountPath;
    std::function<bool(const QString& title, const QString& question)> confirm;
    std::function<void(const QString& title, const QString& text)> inform;
  };
  ActionRunner(HostCalls* calls, Ui ui, QObject* parent = nullptr);

  void run(const RowAction& action);

  static constexpr const char* kDefaultMount = "/run/dst/mnt";

 private:
  HostCalls* calls_;
  Ui ui_;
};

}  // namespace dst::gui
