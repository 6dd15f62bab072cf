// VerifyResultStore: the last online-verify result of each array, in dstd's state database
// (<state-dir>/dstd.sqlite, own connection), so `detail` shows it and the periodic verify keeps
// its schedule across restarts.
//
//   dstd_verify(name PRIMARY KEY, result (the JSON object `detail` shows as "verify"))
//
// Written when a verify ends (events thread), read once at startup.  Blocking (fsync): never
// call it from an io thread.
#pragma once

#include <map>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "dst/status.h"

struct sqlite3;

namespace dst::daemon {

class VerifyResultStore {
 public:
  static Result<std::unique_ptr<VerifyResultStore>> Open(const std::string& path);
  ~VerifyResultStore();
  Status Put(const std::string& name, const nlohmann::json& result);
  Status Delete(const std::string& name);
  Result<std::map<std::string, nlohmann::json>> List();

 private:
  VerifyResultStore() = default;
  sqlite3* db_ = nullptr;
};

}  // namespace dst::daemon
