#include "topology.h"

#include "dst/layer.h"
#include "dst/mirror_device.h"

#include <sqlite3.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

namespace dst::daemon {

namespace {

struct Stmt {
  sqlite3_stmt* s = nullptr;
  ~Stmt() { sqlite3_finalize(s); }
};

}  // namespace

TopologyStore::~TopologyStore() {
  if (db_) sqlite3_close(db_);
}

Status TopologyStore::Exec(const char* sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
    std::string m = err ? err : sqlite3_errmsg(db_);
    sqlite3_free(err);
    return Status::IoError(fmt::format("sqlite: {}", m));
  }
  return Status::OK();
}

bool TopologyStore::HasColumn(const char* table, const char* column) {
  Stmt st;
  std::string sql = fmt::format("SELECT 1 FROM pragma_table_info('{}') WHERE name=?", table);
  if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &st.s, nullptr) != SQLITE_OK) return false;
  sqlite3_bind_text(st.s, 1, column, -1, SQLITE_TRANSIENT);
  return sqlite3_step(st.s) == SQLITE_ROW;
}

Result<std::unique_ptr<TopologyStore>> TopologyStore::Open(const std::string& path) {
  std::unique_ptr<TopologyStore> t(new TopologyStore);
  if (sqlite3_open_v2(path.c_str(), &t->db_,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX,
                      nullptr) != SQLITE_OK) {
    std::string m = t->db_ ? sqlite3_errmsg(t->db_) : "out of memory";
    return Status::IoError(fmt::format("{}: {}", path, m));
  }
  sqlite3_busy_timeout(t->db_, 10000);
  DST_RETURN_IF_ERROR(t->Exec("PRAGMA journal_mode=WAL"));
  DST_RETURN_IF_ERROR(t->Exec("PRAGMA synchronous=FULL"));
  DST_RETURN_IF_ERROR(t->Exec(
      "CREATE TABLE IF NOT EXISTS dstd_arrays(name TEXT PRIMARY KEY, id TEXT NOT NULL, "
      "level TEXT NOT NULL, region_size INTEGER, legs TEXT NOT NULL, rate_min INTEGER, "
      "rate_max INTEGER, write_intent INTEGER, leg_timeout INTEGER)"));
  // Layer keys (dst/layer.h) as a JSON object; added after the first release of the table.
  if (!t->HasColumn("dstd_arrays", "params"))
    DST_RETURN_IF_ERROR(t->Exec("ALTER TABLE dstd_arrays ADD COLUMN params TEXT"));
  DST_RETURN_IF_ERROR(t->Exec(
      "CREATE TABLE IF NOT EXISTS dstd_objects(kind TEXT NOT NULL, name TEXT NOT NULL, "
      "spec TEXT NOT NULL, PRIMARY KEY(kind, name))"));
  return t;
}

Status TopologyStore::Put(const TopologyRecord& rec) {
  Stmt st;
  const char* sql =
      "INSERT OR REPLACE INTO dstd_arrays(name,id,level,region_size,legs,rate_min,rate_max,"
      "write_intent,leg_timeout,params) VALUES(?,?,?,?,?,?,?,?,?,?)";
  if (sqlite3_prepare_v2(db_, sql, -1, &st.s, nullptr) != SQLITE_OK)
    return Status::IoError(fmt::format("sqlite: {}", sqlite3_errmsg(db_)));
  std::string legs = nlohmann::json(rec.cfg.legs).dump();
  sqlite3_bind_text(st.s, 1, rec.cfg.name.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_text(st.s, 2, rec.id.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_text(st.s, 3, rec.cfg.level.c_str(), -1, SQLITE_TRANSIENT);
  // The mirror's keys also go to their own columns, so an older dstd reading this table (and
  // a human with sqlite3) still finds them; `params` is what this version reads.
  const MirrorKeys mk = MirrorKeysFrom(rec.cfg.params);
  sqlite3_bind_int64(st.s, 4, mk.region_size);
  sqlite3_bind_text(st.s, 5, legs.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_int64(st.s, 6, sqlite3_int64(mk.resync_rate_min));
  sqlite3_bind_int64(st.s, 7, sqlite3_int64(mk.resync_rate_max));
  sqlite3_bind_int(st.s, 8, mk.write_intent ? 1 : 0);
  sqlite3_bind_int64(st.s, 9, rec.cfg.leg_timeout_s);
  std::string params = nlohmann::json(rec.cfg.params).dump();
  sqlite3_bind_text(st.s, 10, params.c_str(), -1, SQLITE_TRANSIENT);
  if (sqlite3_step(st.s) != SQLITE_DONE)
    return Status::IoError(fmt::format("sqlite: {}", sqlite3_errmsg(db_)));
  return Status::OK();
}

Status TopologyStore::Delete(const std::string& name) {
  Stmt st;
  if (sqlite3_prepare_v2(db_, "DELETE FROM dstd_arrays WHERE name=?", -1, &st.s, nullptr) !=
      SQLITE_OK)
    return Status::IoError(fmt::format("sqlite: {}", sqlite3_errmsg(db_)));
  sqlite3_bind_text(st.s, 1, name.c_str(), -1, SQLITE_TRANSIENT);
  if (sqlite3_step(st.s) != SQLITE_DONE)
    return Status::IoError(fmt::format("sqlite: {}", sqlite3_errmsg(db_)));
  return Status::OK();
}

Result<std::vector<TopologyRecord>> TopologyStore::List() {
  Stmt st;
  const char* sql =
      "SELECT name,id,level,region_size,legs,rate_min,rate_max,write_intent,leg_timeout,params "
      "FROM dstd_arrays ORDER BY rowid";
  if (sqlite3_prepare_v2(db_, sql, -1, &st.s, nullptr) != SQLITE_OK)
    return Status::IoError(fmt::format("sqlite: {}", sqlite3_errmsg(db_)));
  std::vector<TopologyRecord> out;
  for (;;) {
    int rc = sqlite3_step(st.s);
    if (rc == SQLITE_DONE) break;
    if (rc != SQLITE_ROW) return Status::IoError(fmt::format("sqlite: {}", sqlite3_errmsg(db_)));
    auto text = [&](int i) {
      auto* p = sqlite3_column_text(st.s, i);
      return p ? std::string(reinterpret_cast<const char*>(p)) : std::string();
    };
    TopologyRecord r;
    r.cfg.name = text(0);
    r.id = text(1);
    r.cfg.level = text(2);
    auto legs = nlohmann::json::parse(text(4), nullptr, false);
    if (legs.is_array())
      for (auto& l : legs)
        if (l.is_string()) r.cfg.legs.push_back(l.get<std::string>());
    r.cfg.leg_timeout_s = std::uint32_t(sqlite3_column_int64(st.s, 8));
    if (r.cfg.leg_timeout_s == 0) r.cfg.leg_timeout_s = 10;
    auto params = nlohmann::json::parse(text(9), nullptr, false);
    if (params.is_object())
      for (auto& [k, v] : params.items())
        if (v.is_string()) r.cfg.params[k] = v.get<std::string>();
    // Rows written before the mirror's keys moved into the registry keep them only in the
    // columns: the columns fill what `params` lacks.
    if (const LayerInfo* layer = FindLayer(r.cfg.level); layer && layer->redundant) {
      const std::pair<const char*, std::int64_t> columns[] = {
          {"region_size", sqlite3_column_int64(st.s, 3)},
          {"resync_rate_min", sqlite3_column_int64(st.s, 5)},
          {"resync_rate_max", sqlite3_column_int64(st.s, 6)}};
      for (auto [key, v] : columns)
        if (!r.cfg.params.count(key) && FindLayerKey(*layer, key) && v >= 0)
          r.cfg.params[key] = std::to_string(v);
      if (!r.cfg.params.count("write_intent") && FindLayerKey(*layer, "write_intent"))
        r.cfg.params["write_intent"] = sqlite3_column_int(st.s, 7) != 0 ? "true" : "false";
    }
    out.push_back(std::move(r));
  }
  return out;
}

Status TopologyStore::PutObject(const Object& o) {
  Stmt st;
  if (sqlite3_prepare_v2(db_, "INSERT OR REPLACE INTO dstd_objects(kind,name,spec) VALUES(?,?,?)",
                         -1, &st.s, nullptr) != SQLITE_OK)
    return Status::IoError(fmt::format("sqlite: {}", sqlite3_errmsg(db_)));
  sqlite3_bind_text(st.s, 1, o.kind.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_text(st.s, 2, o.name.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_text(st.s, 3, o.spec.c_str(), -1, SQLITE_TRANSIENT);
  if (sqlite3_step(st.s) != SQLITE_DONE)
    return Status::IoError(fmt::format("sqlite: {}", sqlite3_errmsg(db_)));
  return Status::OK();
}

Status TopologyStore::DeleteObject(const std::string& kind, const std::string& name) {
  Stmt st;
  if (sqlite3_prepare_v2(db_, "DELETE FROM dstd_objects WHERE kind=? AND name=?", -1, &st.s,
                         nullptr) != SQLITE_OK)
    return Status::IoError(fmt::format("sqlite: {}", sqlite3_errmsg(db_)));
  sqlite3_bind_text(st.s, 1, kind.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_text(st.s, 2, name.c_str(), -1, SQLITE_TRANSIENT);
  if (sqlite3_step(st.s) != SQLITE_DONE)
    return Status::IoError(fmt::format("sqlite: {}", sqlite3_errmsg(db_)));
  return Status::OK();
}

Result<std::vector<TopologyStore::Object>> TopologyStore::ListObjects() {
  Stmt st;
  if (sqlite3_prepare_v2(db_, "SELECT kind,name,spec FROM dstd_objects ORDER BY rowid", -1, &st.s,
                         nullptr) != SQLITE_OK)
    return Status::IoError(fmt::format("sqlite: {}", sqlite3_errmsg(db_)));
  std::vector<Object> out;
  for (;;) {
    int rc = sqlite3_step(st.s);
    if (rc == SQLITE_DONE) break;
    if (rc != SQLITE_ROW) return Status::IoError(fmt::format("sqlite: {}", sqlite3_errmsg(db_)));
    Object o;
    for (int i = 0; i < 3; ++i) {
      auto* p = sqlite3_column_text(st.s, i);
      std::string v = p ? reinterpret_cast<const char*>(p) : "";
      (i == 0 ? o.kind : i == 1 ? o.name : o.spec) = std::move(v);
    }
    out.push_back(std::move(o));
  }
  return out;
}

}  // namespace dst::daemon
