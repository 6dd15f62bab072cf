// TopologyStore: dstd's own table in <state-dir>/dstd.sqlite (next to SqliteDirtyMapStore's dst_*
// tables, on a separate connection): which arrays this daemon assembles, by name.
//
//   dstd_arrays(name PRIMARY KEY, id, level, region_size, legs (JSON array of specs by slot,
//               "" = empty slot), rate_min, rate_max, write_intent, leg_timeout,
//               params (JSON object of the layer's own keys, dst/layer.h))
//
//   dstd_objects(kind, name, spec JSON, PRIMARY KEY(kind, name)): exports, volumes and the FUSE
//               mount added at run time with dstctl (kind "export", "volume", "mount"), so
//               they survive a restart like arrays do.  Config-file objects are not recorded.
//
// Written on every topology change (create, add/remove/re-add leg, grow, rate change, remove;
// export/volume add and remove, mount, unmount); read once at startup.  Blocking (fsync): call from a worker thread or the main thread only.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "dst/daemon/config.h"
#include "dst/status.h"

struct sqlite3;

namespace dst::daemon {

struct TopologyRecord {
  ArrayConfig cfg;  // legs by slot; an empty string marks an empty slot
  std::string id;   // MirrorDevice array id (linear: a UUID of its own)
};

class TopologyStore {
 public:
  static Result<std::unique_ptr<TopologyStore>> Open(const std::string& path);
  ~TopologyStore();
  Status Put(const TopologyRecord& rec);
  Status Delete(const std::string& name);
  Result<std::vector<TopologyRecord>> List();

  // Runtime-added exports, volumes and the mount (spec: a JSON object).
  struct Object {
    std::string kind, name, spec;
  };
  Status PutObject(const Object& o);
  Status DeleteObject(const std::string& kind, const std::string& name);
  Result<std::vector<Object>> ListObjects();

 private:
  TopologyStore() = default;
  Status Exec(const char* sql);
  bool HasColumn(const char* table, const char* column);
  sqlite3* db_ = nullptr;
};

}  // namespace dst::daemon
