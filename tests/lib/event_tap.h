// EventTap: `dstctl events --json [--since N]` in the background for integration tests; Lines()
// parses what arrived so far (one JSON object per line; partial lines wait for the next call).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <QByteArray>
#include <QProcess>

#include <nlohmann/json.hpp>

#include "daemon_process.h"

namespace dst::test {

struct EventTap {
  QProcess p;
  QByteArray buf;
  // since < 0: a plain subscription (snapshot, then live).
  bool Start(DaemonProcess& d, qint64 since = -1);
  std::vector<nlohmann::json> Lines();
  // Polls Lines() until at least n events of `type` arrived (*out: those, in order); false on
  // timeout.  *raw (if given) gets all that was read, for messages.
  bool Wait(const std::string& type, std::size_t n, int timeout_ms, std::vector<nlohmann::json>* out,
            QByteArray* raw = nullptr);
  void Kill();
  ~EventTap() { Kill(); }
};

}  // namespace dst::test
