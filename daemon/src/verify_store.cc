#include "verify_store.h"

#include <sqlite3.h>

#include <fmt/format.h>

namespace dst::daemon {

namespace {

Status Err(sqlite3* db) { return Status::IoError(fmt::format("sqlite: {}", sqlite3_errmsg(db))); }

// Prepares `sql`, binds the text arguments in order and steps it once (statements without rows).
Status Run(sqlite3* db, const char* sql, std::initializer_list<std::string> args) {
  sqlite3_stmt* s = nullptr;
  if (sqlite3_prepare_v2(db, sql, -1, &s, nullptr) != SQLITE_OK) return Err(db);
  int i = 0;
  for (auto& a : args) sqlite3_bind_text(s, ++i, a.c_str(), -1, SQLITE_TRANSIENT);
  int rc = sqlite3_step(s);
  sqlite3_finalize(s);
  return rc == SQLITE_DONE ? Status::OK() : Err(db);
}

}  // namespace

VerifyResultStore::~VerifyResultStore() {
  if (db_) sqlite3_close(db_);
}

Result<std::unique_ptr<VerifyResultStore>> VerifyResultStore::Open(const std::string& path) {
  std::unique_ptr<VerifyResultStore> v(new VerifyResultStore);
  if (sqlite3_open_v2(path.c_str(), &v->db_,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX,
                      nullptr) != SQLITE_OK)
    return Status::IoError(fmt::format("{}: {}", path, v->db_ ? sqlite3_errmsg(v->db_) : "out of memory"));
  sqlite3_busy_timeout(v->db_, 10000);
  // Same settings as the other tables of this file (the pragmas return rows: sqlite3_exec).
  for (const char* pragma : {"PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL"})
    if (sqlite3_exec(v->db_, pragma, nullptr, nullptr, nullptr) != SQLITE_OK) return Err(v->db_);
  DST_RETURN_IF_ERROR(Run(v->db_,
                          "CREATE TABLE IF NOT EXISTS dstd_verify(name TEXT PRIMARY KEY, "
                          "result TEXT NOT NULL)",
                          {}));
  return v;
}

Status VerifyResultStore::Put(const std::string& name, const nlohmann::json& result) {
  return Run(db_, "INSERT OR REPLACE INTO dstd_verify(name,result) VALUES(?,?)",
             {name, result.dump()});
}

Status VerifyResultStore::Delete(const std::string& name) {
  return Run(db_, "DELETE FROM dstd_verify WHERE name=?", {name});
}

Result<std::map<std::string, nlohmann::json>> VerifyResultStore::List() {
  sqlite3_stmt* s = nullptr;
  if (sqlite3_prepare_v2(db_, "SELECT name,result FROM dstd_verify", -1, &s, nullptr) != SQLITE_OK)
    return Err(db_);
  std::map<std::string, nlohmann::json> out;
  int rc;
  while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
    auto text = [&](int i) {
      auto* p = sqlite3_column_text(s, i);
      return p ? std::string(reinterpret_cast<const char*>(p)) : std::string();
    };
    auto j = nlohmann::json::parse(text(1), nullptr, false);
    if (j.is_object()) out[text(0)] = std::move(j);
  }
  sqlite3_finalize(s);
  if (rc != SQLITE_DONE) return Err(db_);
  return out;
}

}  // namespace dst::daemon
