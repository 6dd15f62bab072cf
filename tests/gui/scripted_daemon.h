// ScriptedDaemon: a stand-in dstd for the GUI tests, a QLocalServer on a socket path driven
// from the test's event loop.  It speaks the control protocol's line framing (docs/control.md)
// and records what the GUI sent.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <QLocalServer>
#include <QLocalSocket>
#include <QObject>
#include <nlohmann/json.hpp>

namespace dst::test {

using nlohmann::json;

// Answers status with `snapshot`, events with a subscription, a method in `replies` with that
// reply (a {"result": ...} or {"error": {...}} object), anything else with {}; keeps every
// request it got.
class ScriptedDaemon : public QObject {
 public:
  explicit ScriptedDaemon(const QString& path) {
    QObject::connect(&server_, &QLocalServer::newConnection, this, [this] {
      while (QLocalSocket* s = server_.nextPendingConnection()) {
        conn_ = s;
        ++connections;
        QObject::connect(s, &QLocalSocket::readyRead, this, [this, s] { Read(s); });
      }
    });
    ok = server_.listen(path);
  }
  void Send(const json& line) {
    conn_->write(QByteArray::fromStdString(line.dump() + "\n"));
    conn_->flush();
  }
  void Drop() {
    conn_->disconnectFromServer();
    conn_ = nullptr;
  }
  // The requests of method `m` so far.
  std::vector<json> Requests(const std::string& m) const {
    std::vector<json> v;
    for (const json& r : requests)
      if (r["method"] == m) v.push_back(r);
    return v;
  }

  bool ok = false;
  bool mute_status = false;
  int connections = 0;
  json snapshot = {{"exports", json::array()}, {"volumes", json::array()}, {"arrays", json::array()}};
  std::vector<json> requests;
  std::map<std::string, json> replies;

 private:
  void Read(QLocalSocket* s) {
    while (s->canReadLine()) {
      json req = json::parse(s->readLine().toStdString());
      requests.push_back(req);
      json result = json::object();
      if (req["method"] == "status" && mute_status) continue;  // a hung dstd
      if (req["method"] == "status") result = snapshot;
      if (req["method"] == "events")
        result = {{"subscribed", true}, {"first_seq", 1}, {"last_seq", 8}, {"capacity", 4096}};
      json reply = {{"result", result}};
      if (auto it = replies.find(req["method"].get<std::string>()); it != replies.end()) reply = it->second;
      reply["id"] = req["id"];
      s->write(QByteArray::fromStdString(reply.dump() + "\n"));
    }
  }
  QLocalServer server_;
  QLocalSocket* conn_ = nullptr;
};

}  // namespace dst::test
