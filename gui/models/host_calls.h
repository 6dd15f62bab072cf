// HostCalls: the one way the GUI's actions change a host.  It sends a control request through
// the host's HostSession, writes what happened to the log pane (LogModel) and reports a failure
// (dstd's error, a lost link, an unknown host) with failed(), which the window shows in a
// dialog.  `ok` runs only on success, on the Qt thread.
#pragma once

#include <functional>

#include <QHash>
#include <QObject>
#include <QPointer>
#include <QString>
#include <nlohmann/json.hpp>

namespace dst::gui {

class HostSession;
class LogModel;

class HostCalls : public QObject {
  Q_OBJECT
 public:
  using Ok = std::function<void(const nlohmann::json& result)>;

  explicit HostCalls(LogModel* log, QObject* parent = nullptr);

  void addSession(HostSession* session);  // keyed by its socket path, the host's name
  void call(const QString& host, const QString& method, const nlohmann::json& params, Ok ok = {});
  LogModel* log() const { return log_; }

 signals:
  void failed(const QString& host, const QString& method, const QString& error);

 private:
  LogModel* log_;
  QHash<QString, QPointer<HostSession>> sessions_;
};

// "array.verify m0 cancel=true" for the log: the method, the name param, then key=value.
QString DescribeCall(const QString& method, const nlohmann::json& params);

}  // namespace dst::gui
