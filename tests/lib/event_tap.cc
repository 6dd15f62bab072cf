#include "event_tap.h"

#include <QElapsedTimer>

#include "test_env.h"

namespace dst::test {

bool EventTap::Start(DaemonProcess& d, qint64 since) {
  QStringList args{"--socket", d.control_socket(), "events", "--json"};
  if (since >= 0) args << "--since" << QString::number(since);
  p.start(QString::fromStdString(BinPath("dstctl")), args);
  return p.waitForStarted(5000);
}

std::vector<nlohmann::json> EventTap::Lines() {
  p.waitForReadyRead(50);
  buf += p.readAllStandardOutput();
  std::vector<nlohmann::json> out;
  for (const QByteArray& l : buf.split('\n')) {
    nlohmann::json j = nlohmann::json::parse(l.toStdString(), nullptr, false);
    if (j.is_object()) out.push_back(std::move(j));
  }
  return out;
}

bool EventTap::Wait(const std::string& type, std::size_t n, int timeout_ms,
                    std::vector<nlohmann::json>* out, QByteArray* raw) {
  QElapsedTimer t;
  t.start();
  for (;;) {
    out->clear();
    for (auto& j : Lines())
      if (j.value("type", "") == type) out->push_back(std::move(j));
    if (raw) *raw = buf;
    if (out->size() >= n) return true;
    if (t.elapsed() >= timeout_ms) return false;
  }
}

void EventTap::Kill() {
  if (p.state() != QProcess::NotRunning) {
    p.kill();
    p.waitForFinished(3000);
  }
}

}  // namespace dst::test
