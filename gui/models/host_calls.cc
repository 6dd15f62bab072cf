#include "host_calls.h"

#include "host_session.h"
#include "log_model.h"

namespace dst::gui {

HostCalls::HostCalls(LogModel* log, QObject* parent) : QObject(parent), log_(log) {}

void HostCalls::addSession(HostSession* session) { sessions_.insert(session->path(), session); }

QString DescribeCall(const QString& method, const nlohmann::json& params) {
  QString out = method;
  if (!params.is_object()) return out;
  auto text = [](const nlohmann::json& v) {
    return v.is_string() ? QString::fromStdString(v.get<std::string>()) : QString::fromStdString(v.dump());
  };
  if (auto n = params.find("name"); n != params.end()) out += ' ' + text(*n);  // the object first
  for (auto it = params.begin(); it != params.end(); ++it)
    if (it.key() != "name") out += ' ' + QString::fromStdString(it.key()) + '=' + text(it.value());
  return out;
}

void HostCalls::call(const QString& host, const QString& method, const nlohmann::json& params, Ok ok) {
  const QString what = DescribeCall(method, params);
  HostSession* s = sessions_.value(host);
  if (!s) {
    const QString error = tr("no such host");
    log_->append(LogModel::kError, host, what + ": " + error);
    emit failed(host, method, error);
    return;
  }
  s->call(method, params,
          [self = QPointer<HostCalls>(this), host, method, what, ok = std::move(ok)](
              bool good, const nlohmann::json& result, const QString& error) {
            if (!self) return;  // the window closed meanwhile
            LogModel* log = self->log_;
            if (!good) {
              log->append(LogModel::kError, host, what + ": " + error);
              emit self->failed(host, method, error);
              return;
            }
            log->append(LogModel::kInfo, host, what + ": ok");
            if (ok) ok(result);
          });
}

}  // namespace dst::gui
