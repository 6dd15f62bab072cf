// Helpers for the array integration tests (issue 3): external commands, mount/loop guards,
// `dstctl ... --json` parsing, polling waits with deadlines, O_DIRECT I/O on FUSE files and
// byte comparison of leg images.
//
// Every wait polls with a deadline; nothing sleeps and hopes.  Guards undo mounts and loop
// devices in their destructors, so a failing QVERIFY still cleans up.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <QByteArray>
#include <QString>
#include <QStringList>
#include <QTemporaryDir>

#include <nlohmann/json.hpp>

#include "daemon_process.h"

namespace dst::test {

struct Cmd {
  int rc = -1;
  QByteArray out, err;
};

Cmd Run(const QString& prog, const QStringList& args, int timeout_ms = 120000);
QString Show(const Cmd& c);
bool IsMounted(const QString& path);

// Undoes loop and mount state in reverse order, whatever happened.
struct StackGuard {
  QString loop;      // /dev/loopN once attached
  QString fs_mount;  // ext4 mountpoint while mounted
  ~StackGuard();
  bool Attach(const QString& file, bool read_only, QString* why);  // losetup --direct-io=on
  bool Mount(const QString& dir, const QStringList& opts, QString* why);
  bool Umount(QString* why);
  bool Detach(QString* why);
};

// Declare before the DaemonProcess objects so it runs after them: lazily unmounts a FUSE mount
// that a killed dstd left behind.
struct FuseGuard {
  QString path;
  ~FuseGuard();
  void Clean();  // umount -l now if still mounted
};

// "dst://127.0.0.1:<port>/<export>"
QString DstUri(const DaemonProcess& d, const QString& export_name);
// TOML for one [[export]] of a (sparse) image file.
QString ExportToml(const QString& name, const QString& path, const QString& size);
// TOML for a [[volume]] importing `uri` with short fault timeouts (seconds).
QString VolumeToml(const QString& name, const QString& uri, int io_timeout, int keepalive_timeout);
// TOML for an [[array]]; legs are specs as in the contract.
QString ArrayToml(const QString& name, const QString& level, const QStringList& legs,
                  const QString& region_size = "64K", const QString& rate_min = "",
                  const QString& rate_max = "", int write_intent = -1, const QString& extra = "");
// "up-to-date" -> "up_to_date" (the daemon prints the engine's hyphenated names).
std::string NormState(std::string s);

// `dstctl args...` whose stdout is one JSON document.  Returns null on failure (why filled).
nlohmann::json CtlJson(DaemonProcess& d, const QStringList& args, QString* why = nullptr);
// detail NAME --json (falls back to the array's entry in status --json).  Null on failure.
nlohmann::json ArrayDetail(DaemonProcess& d, const QString& name, QString* why = nullptr);

// Accessors tolerant of small shape differences; -1 when the field is absent.
std::int64_t JInt(const nlohmann::json& j, const char* key);
// Total bytes resynced since assembly (sum over legs or the resync object), -1 if not exposed.
std::int64_t BytesResyncedTotal(const nlohmann::json& arr);
std::string ArrayState(const nlohmann::json& arr);
std::string LegStateOf(const nlohmann::json& arr, int slot);
std::int64_t LegOutOfSync(const nlohmann::json& arr, int slot);
bool ResyncActive(const nlohmann::json& arr);
double ResyncPercent(const nlohmann::json& arr);  // -1 when idle
// Window of the resync (detail's resync.window_bytes / window_bytes), default 16 regions.
std::uint64_t ResyncWindowBytes(const nlohmann::json& arr, std::uint64_t region_size);

// Polls pred every poll_ms until it returns true or timeout_ms passes.
bool WaitUntil(const std::function<bool()>& pred, int timeout_ms, int poll_ms = 50);
// Clean = state "clean", no resync running, every leg up_to_date (mirror).  *last gets the
// last detail seen (for diagnostics).
bool WaitArrayClean(DaemonProcess& d, const QString& name, int timeout_ms,
                    nlohmann::json* last = nullptr);
bool WaitFileExists(const QString& path, int timeout_ms);

// O_DIRECT pwrite/pread through a (FUSE) file; offsets and lengths 4 KiB aligned.
bool PwriteDirect(const QString& path, std::uint64_t off, const QByteArray& data, int* err = nullptr);
bool PreadDirect(const QString& path, std::uint64_t off, std::uint32_t len, QByteArray* out,
                 int* err = nullptr);
// Deterministic pseudo-random block content for (seed, offset).
QByteArray Pattern(std::uint64_t seed, std::uint64_t off, std::uint32_t len);

// First offset in [0, len) where files a and b differ (a short file reads as missing), or -1.
std::int64_t FirstDiff(const QString& a, const QString& b, std::uint64_t len);
// Same for byte ranges of two files: a[a_off..] vs b[b_off..].
std::int64_t FirstDiffRange(const QString& a, std::uint64_t a_off, const QString& b,
                            std::uint64_t b_off, std::uint64_t len);
bool MakeSparse(const QString& path, std::uint64_t size);

QByteArray Sha256File(const QString& path);

// The common rig: N exporter daemons (leg i exports "d<i>" from <tmp>/e<i>/d<i>.img) and one
// assembling daemon with a FUSE mount at <tmp>/mnt.  Members are destroyed in reverse order:
// assembler, exporters, then the FUSE guard (lazy unmount of a mount a killed dstd left).
struct MirrorRig {
  // DST_TEST_KEEP=1 keeps the directory (daemon logs, state databases, images) for a post-mortem.
  MirrorRig() {
    if (qEnvironmentVariableIsSet("DST_TEST_KEEP")) {
      dir.setAutoRemove(false);
      qInfo("DST_TEST_KEEP: keeping %s", qPrintable(dir.path()));
    }
  }
  QTemporaryDir dir;
  FuseGuard fuse_guard;
  std::vector<std::unique_ptr<DaemonProcess>> ex;
  std::vector<QString> image;
  std::unique_ptr<DaemonProcess> as;
  QString mnt;

  // Starts n exporters with sparse images of size_mib MiB.
  bool StartExporters(int n, int size_mib, QString* why);
  QString Uri(int i) const { return DstUri(*ex[i], QString("d%1").arg(i)); }
  // Starts (or restarts, keeping config) the assembler; `toml` replaces its extra config when
  // non-null.
  bool StartAssembler(const QString* toml, QString* why);
  QString File(const QString& name) const { return mnt + "/" + name + ".img"; }
  // StartExporters, then the assembler with no arrays or volumes of its own.
  bool StartEmpty(int exporters, int size_mib, QString* why);
  // StartExporters, then the assembler with mirror "m0" over legs 0 and 1 (64K regions, resync
  // 200M..400M/s), waiting until it is clean.
  bool StartCleanMirror(int exporters, int size_mib, QString* why);
};

}  // namespace dst::test
