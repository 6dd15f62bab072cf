// SqliteDirtyMapStore: see dirty_map_store.h.  Schema (all tables prefixed dst_ so the daemon's
// state database can hold them next to its own tables):
//   dst_arrays(id PK, name, kind, size, region_size, clean)
//   dst_legs(array_id, slot, generation, state, describe, history, reason; PK(array_id, slot))
//     (history and reason were added later: ALTER TABLE on open, empty for old rows)
//   dst_map_chunks(array_id, map, chunk, bits BLOB; PK(array_id, map, chunk))  map -1 = intent
//   dst_resync(array_id, slot, next_offset, bytes_done, bytes_total; PK(array_id, slot))
#include <sqlite3.h>

#include <mutex>

#include "dst/dirty_map_store.h"

namespace dst {

namespace {
bool AllZero(const std::string& s) {
  for (char c : s)
    if (c) return false;
  return true;
}
}  // namespace

class SqliteDirtyMapStore::Impl {
 public:
  ~Impl() {
    for (sqlite3_stmt* s : {put_chunk_, del_chunk_, put_cp_, put_leg_, set_clean_})
      if (s) sqlite3_finalize(s);
    if (db_) sqlite3_close(db_);
  }

  Status Err(const char* what) {
    return Status::IoError(std::string("sqlite ") + what + ": " + sqlite3_errmsg(db_));
  }

  Status Exec(const char* sql) {
    char* msg = nullptr;
    if (sqlite3_exec(db_, sql, nullptr, nullptr, &msg) != SQLITE_OK) {
      std::string m = msg ? msg : "?";
      sqlite3_free(msg);
      return Status::IoError(std::string("sqlite: ") + m + " in: " + sql);
    }
    return Status::OK();
  }

  Status Prepare(const char* sql, sqlite3_stmt** st) {
    if (sqlite3_prepare_v2(db_, sql, -1, st, nullptr) != SQLITE_OK) return Err("prepare");
    return Status::OK();
  }

  Status Open(const std::string& path) {
    if (sqlite3_open_v2(path.c_str(), &db_, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE |
                                                SQLITE_OPEN_FULLMUTEX,
                        nullptr) != SQLITE_OK) {
      Status s = Status::IoError("open " + path + ": " + (db_ ? sqlite3_errmsg(db_) : "?"));
      return s;
    }
    sqlite3_busy_timeout(db_, 5000);
    DST_RETURN_IF_ERROR(Exec("PRAGMA journal_mode=WAL"));
    DST_RETURN_IF_ERROR(Exec("PRAGMA synchronous=FULL"));
    DST_RETURN_IF_ERROR(Exec("PRAGMA foreign_keys=ON"));
    DST_RETURN_IF_ERROR(Exec(
        "CREATE TABLE IF NOT EXISTS dst_arrays(id TEXT PRIMARY KEY, name TEXT, kind TEXT,"
        " size INTEGER, region_size INTEGER, clean INTEGER);"
        "CREATE TABLE IF NOT EXISTS dst_legs(array_id TEXT, slot INTEGER, generation TEXT,"
        " state TEXT, describe TEXT, PRIMARY KEY(array_id, slot));"
        "CREATE TABLE IF NOT EXISTS dst_map_chunks(array_id TEXT, map INTEGER, chunk INTEGER,"
        " bits BLOB, PRIMARY KEY(array_id, map, chunk));"
        "CREATE TABLE IF NOT EXISTS dst_resync(array_id TEXT, slot INTEGER, next_offset INTEGER,"
        " bytes_done INTEGER, bytes_total INTEGER, PRIMARY KEY(array_id, slot));"));
    // Columns added after the first release: add them to an older database.
    for (const char* col : {"history", "reason"}) {
      std::string sql = std::string("ALTER TABLE dst_legs ADD COLUMN ") + col + " TEXT DEFAULT ''";
      if (!HasColumn("dst_legs", col)) DST_RETURN_IF_ERROR(Exec(sql.c_str()));
    }
    DST_RETURN_IF_ERROR(Prepare(
        "INSERT OR REPLACE INTO dst_map_chunks(array_id, map, chunk, bits) VALUES(?,?,?,?)",
        &put_chunk_));
    DST_RETURN_IF_ERROR(Prepare(
        "DELETE FROM dst_map_chunks WHERE array_id=? AND map=? AND chunk=?", &del_chunk_));
    DST_RETURN_IF_ERROR(Prepare(
        "INSERT OR REPLACE INTO dst_resync(array_id, slot, next_offset, bytes_done, bytes_total)"
        " VALUES(?,?,?,?,?)",
        &put_cp_));
    DST_RETURN_IF_ERROR(Prepare(
        "INSERT OR REPLACE INTO dst_legs(array_id, slot, generation, state, describe, history,"
        " reason) VALUES(?,?,?,?,?,?,?)",
        &put_leg_));
    DST_RETURN_IF_ERROR(Prepare("UPDATE dst_arrays SET clean=? WHERE id=?", &set_clean_));
    return Status::OK();
  }

  Status Step(sqlite3_stmt* st) {
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    if (rc != SQLITE_DONE && rc != SQLITE_ROW) return Err("step");
    return Status::OK();
  }

  Status PutLegLocked(const std::string& id, const LegRecord& leg) {
    sqlite3_bind_text(put_leg_, 1, id.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_int(put_leg_, 2, leg.slot);
    sqlite3_bind_text(put_leg_, 3, leg.generation.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(put_leg_, 4, LegStateName(leg.state), -1, SQLITE_STATIC);
    sqlite3_bind_text(put_leg_, 5, leg.describe.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(put_leg_, 6, leg.history.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(put_leg_, 7, leg.reason.c_str(), -1, SQLITE_TRANSIENT);
    return Step(put_leg_);
  }

  bool HasColumn(const char* table, const char* col) {
    sqlite3_stmt* st = nullptr;
    std::string sql = std::string("PRAGMA table_info(") + table + ")";
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &st, nullptr) != SQLITE_OK) return false;
    bool found = false;
    while (sqlite3_step(st) == SQLITE_ROW) {
      const unsigned char* n = sqlite3_column_text(st, 1);
      if (n && std::string(reinterpret_cast<const char*>(n)) == col) found = true;
    }
    sqlite3_finalize(st);
    return found;
  }

  // Runs fn inside BEGIN IMMEDIATE ... COMMIT; rolls back on error.
  template <typename Fn>
  Status Txn(Fn&& fn) {
    DST_RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE"));
    Status s = fn();
    if (!s.ok()) {
      (void)Exec("ROLLBACK");
      return s;
    }
    s = Exec("COMMIT");
    if (!s.ok()) (void)Exec("ROLLBACK");
    return s;
  }

  std::mutex mu_;  // serialises statement use (prepared statements are not shareable)
  sqlite3* db_ = nullptr;
  sqlite3_stmt* put_chunk_ = nullptr;
  sqlite3_stmt* del_chunk_ = nullptr;
  sqlite3_stmt* put_cp_ = nullptr;
  sqlite3_stmt* put_leg_ = nullptr;
  sqlite3_stmt* set_clean_ = nullptr;
  std::uint64_t commits_ = 0;
};

SqliteDirtyMapStore::SqliteDirtyMapStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SqliteDirtyMapStore::~SqliteDirtyMapStore() = default;

Result<std::unique_ptr<SqliteDirtyMapStore>> SqliteDirtyMapStore::Open(const std::string& path) {
  auto impl = std::make_unique<Impl>();
  Status s = impl->Open(path);
  if (!s.ok()) return s;
  return std::unique_ptr<SqliteDirtyMapStore>(new SqliteDirtyMapStore(std::move(impl)));
}

Status SqliteDirtyMapStore::PutArray(const ArrayRecord& rec) {
  std::lock_guard<std::mutex> l(impl_->mu_);
  return impl_->Txn([&]() -> Status {
    sqlite3_stmt* st = nullptr;
    DST_RETURN_IF_ERROR(impl_->Prepare(
        "INSERT OR REPLACE INTO dst_arrays(id, name, kind, size, region_size, clean)"
        " VALUES(?,?,?,?,?,?)",
        &st));
    sqlite3_bind_text(st, 1, rec.id.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 2, rec.name.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 3, rec.kind.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_int64(st, 4, static_cast<sqlite3_int64>(rec.size));
    sqlite3_bind_int64(st, 5, rec.region_size);
    sqlite3_bind_int(st, 6, rec.clean ? 1 : 0);
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) return impl_->Err("put array");
    st = nullptr;
    DST_RETURN_IF_ERROR(impl_->Prepare("DELETE FROM dst_legs WHERE array_id=?", &st));
    sqlite3_bind_text(st, 1, rec.id.c_str(), -1, SQLITE_TRANSIENT);
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) return impl_->Err("delete legs");
    for (const auto& leg : rec.legs) DST_RETURN_IF_ERROR(impl_->PutLegLocked(rec.id, leg));
    return Status::OK();
  });
}

Result<ArrayRecord> SqliteDirtyMapStore::GetArray(const std::string& id) {
  std::lock_guard<std::mutex> l(impl_->mu_);
  sqlite3_stmt* st = nullptr;
  Status s = impl_->Prepare(
      "SELECT name, kind, size, region_size, clean FROM dst_arrays WHERE id=?", &st);
  if (!s.ok()) return s;
  sqlite3_bind_text(st, 1, id.c_str(), -1, SQLITE_TRANSIENT);
  ArrayRecord rec;
  rec.id = id;
  int rc = sqlite3_step(st);
  if (rc != SQLITE_ROW) {
    sqlite3_finalize(st);
    if (rc == SQLITE_DONE) return Status::NotFound("array " + id);
    return impl_->Err("get array");
  }
  auto text = [](sqlite3_stmt* q, int c) {
    const unsigned char* t = sqlite3_column_text(q, c);
    return t ? std::string(reinterpret_cast<const char*>(t)) : std::string();
  };
  rec.name = text(st, 0);
  rec.kind = text(st, 1);
  rec.size = static_cast<std::uint64_t>(sqlite3_column_int64(st, 2));
  rec.region_size = static_cast<std::uint32_t>(sqlite3_column_int64(st, 3));
  rec.clean = sqlite3_column_int(st, 4) != 0;
  sqlite3_finalize(st);
  st = nullptr;
  s = impl_->Prepare(
      "SELECT slot, generation, state, describe, history, reason FROM dst_legs WHERE array_id=?"
      " ORDER BY slot", &st);
  if (!s.ok()) return s;
  sqlite3_bind_text(st, 1, id.c_str(), -1, SQLITE_TRANSIENT);
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    LegRecord leg;
    leg.slot = sqlite3_column_int(st, 0);
    leg.generation = text(st, 1);
    if (!ParseLegState(text(st, 2), &leg.state)) leg.state = LegState::kFailed;
    leg.describe = text(st, 3);
    leg.history = text(st, 4);
    leg.reason = text(st, 5);
    rec.legs.push_back(std::move(leg));
  }
  sqlite3_finalize(st);
  if (rc != SQLITE_DONE) return impl_->Err("get legs");
  return rec;
}

Result<std::vector<std::string>> SqliteDirtyMapStore::ListArrays() {
  std::lock_guard<std::mutex> l(impl_->mu_);
  sqlite3_stmt* st = nullptr;
  Status s = impl_->Prepare("SELECT id FROM dst_arrays ORDER BY id", &st);
  if (!s.ok()) return s;
  std::vector<std::string> v;
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW)
    v.emplace_back(reinterpret_cast<const char*>(sqlite3_column_text(st, 0)));
  sqlite3_finalize(st);
  if (rc != SQLITE_DONE) return impl_->Err("list arrays");
  return v;
}

Status SqliteDirtyMapStore::DeleteArray(const std::string& id) {
  std::lock_guard<std::mutex> l(impl_->mu_);
  return impl_->Txn([&]() -> Status {
    for (const char* sql : {"DELETE FROM dst_arrays WHERE id=?", "DELETE FROM dst_legs WHERE array_id=?",
                            "DELETE FROM dst_map_chunks WHERE array_id=?",
                            "DELETE FROM dst_resync WHERE array_id=?"}) {
      sqlite3_stmt* st = nullptr;
      DST_RETURN_IF_ERROR(impl_->Prepare(sql, &st));
      sqlite3_bind_text(st, 1, id.c_str(), -1, SQLITE_TRANSIENT);
      int rc = sqlite3_step(st);
      sqlite3_finalize(st);
      if (rc != SQLITE_DONE) return impl_->Err("delete array");
    }
    return Status::OK();
  });
}

Status SqliteDirtyMapStore::Commit(const CommitBatch& b) {
  std::lock_guard<std::mutex> l(impl_->mu_);
  Status s = impl_->Txn([&]() -> Status {
    for (const auto& c : b.chunks) {
      if (AllZero(c.bits)) {
        sqlite3_bind_text(impl_->del_chunk_, 1, b.array_id.c_str(), -1, SQLITE_TRANSIENT);
        sqlite3_bind_int(impl_->del_chunk_, 2, c.map);
        sqlite3_bind_int64(impl_->del_chunk_, 3, static_cast<sqlite3_int64>(c.index));
        DST_RETURN_IF_ERROR(impl_->Step(impl_->del_chunk_));
      } else {
        sqlite3_bind_text(impl_->put_chunk_, 1, b.array_id.c_str(), -1, SQLITE_TRANSIENT);
        sqlite3_bind_int(impl_->put_chunk_, 2, c.map);
        sqlite3_bind_int64(impl_->put_chunk_, 3, static_cast<sqlite3_int64>(c.index));
        sqlite3_bind_blob(impl_->put_chunk_, 4, c.bits.data(), static_cast<int>(c.bits.size()),
                          SQLITE_STATIC);
        DST_RETURN_IF_ERROR(impl_->Step(impl_->put_chunk_));
      }
    }
    for (const auto& cp : b.checkpoints) {
      sqlite3_stmt* st = impl_->put_cp_;
      sqlite3_bind_text(st, 1, b.array_id.c_str(), -1, SQLITE_TRANSIENT);
      sqlite3_bind_int(st, 2, cp.slot);
      sqlite3_bind_int64(st, 3, static_cast<sqlite3_int64>(cp.next_offset));
      sqlite3_bind_int64(st, 4, static_cast<sqlite3_int64>(cp.bytes_done));
      sqlite3_bind_int64(st, 5, static_cast<sqlite3_int64>(cp.bytes_total));
      DST_RETURN_IF_ERROR(impl_->Step(st));
    }
    for (const auto& leg : b.legs) DST_RETURN_IF_ERROR(impl_->PutLegLocked(b.array_id, leg));
    if (b.clean >= 0) {
      sqlite3_bind_int(impl_->set_clean_, 1, b.clean);
      sqlite3_bind_text(impl_->set_clean_, 2, b.array_id.c_str(), -1, SQLITE_TRANSIENT);
      DST_RETURN_IF_ERROR(impl_->Step(impl_->set_clean_));
    }
    return Status::OK();
  });
  if (s.ok()) ++impl_->commits_;
  return s;
}

Status SqliteDirtyMapStore::LoadMap(const std::string& id, std::int32_t map, DirtyMap* out) {
  std::lock_guard<std::mutex> l(impl_->mu_);
  sqlite3_stmt* st = nullptr;
  DST_RETURN_IF_ERROR(impl_->Prepare(
      "SELECT chunk, bits FROM dst_map_chunks WHERE array_id=? AND map=?", &st));
  sqlite3_bind_text(st, 1, id.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_int(st, 2, map);
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    auto chunk = static_cast<std::uint64_t>(sqlite3_column_int64(st, 0));
    const void* p = sqlite3_column_blob(st, 1);
    int n = sqlite3_column_bytes(st, 1);
    out->LoadChunk(chunk, std::string_view(static_cast<const char*>(p), static_cast<std::size_t>(n)));
  }
  sqlite3_finalize(st);
  if (rc != SQLITE_DONE) return impl_->Err("load map");
  return Status::OK();
}

Status SqliteDirtyMapStore::DeleteMap(const std::string& id, std::int32_t map) {
  std::lock_guard<std::mutex> l(impl_->mu_);
  sqlite3_stmt* st = nullptr;
  DST_RETURN_IF_ERROR(impl_->Prepare("DELETE FROM dst_map_chunks WHERE array_id=? AND map=?", &st));
  sqlite3_bind_text(st, 1, id.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_int(st, 2, map);
  int rc = sqlite3_step(st);
  sqlite3_finalize(st);
  return rc == SQLITE_DONE ? Status::OK() : impl_->Err("delete map");
}

Result<std::vector<ResyncCheckpoint>> SqliteDirtyMapStore::LoadCheckpoints(const std::string& id) {
  std::lock_guard<std::mutex> l(impl_->mu_);
  sqlite3_stmt* st = nullptr;
  Status s = impl_->Prepare(
      "SELECT slot, next_offset, bytes_done, bytes_total FROM dst_resync WHERE array_id=?"
      " ORDER BY slot",
      &st);
  if (!s.ok()) return s;
  sqlite3_bind_text(st, 1, id.c_str(), -1, SQLITE_TRANSIENT);
  std::vector<ResyncCheckpoint> v;
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    ResyncCheckpoint cp;
    cp.slot = sqlite3_column_int(st, 0);
    cp.next_offset = static_cast<std::uint64_t>(sqlite3_column_int64(st, 1));
    cp.bytes_done = static_cast<std::uint64_t>(sqlite3_column_int64(st, 2));
    cp.bytes_total = static_cast<std::uint64_t>(sqlite3_column_int64(st, 3));
    v.push_back(cp);
  }
  sqlite3_finalize(st);
  if (rc != SQLITE_DONE) return impl_->Err("load checkpoints");
  return v;
}

Status SqliteDirtyMapStore::DeleteCheckpoint(const std::string& id, std::int32_t slot) {
  std::lock_guard<std::mutex> l(impl_->mu_);
  sqlite3_stmt* st = nullptr;
  DST_RETURN_IF_ERROR(impl_->Prepare("DELETE FROM dst_resync WHERE array_id=? AND slot=?", &st));
  sqlite3_bind_text(st, 1, id.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_int(st, 2, slot);
  int rc = sqlite3_step(st);
  sqlite3_finalize(st);
  return rc == SQLITE_DONE ? Status::OK() : impl_->Err("delete checkpoint");
}

std::uint64_t SqliteDirtyMapStore::commits() const {
  std::lock_guard<std::mutex> l(impl_->mu_);
  return impl_->commits_;
}

}  // namespace dst
