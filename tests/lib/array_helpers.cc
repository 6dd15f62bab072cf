#include "array_helpers.h"

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>

#include <QCryptographicHash>
#include <QDir>
#include <QElapsedTimer>
#include <QFile>
#include <QProcess>
#include <QThread>

namespace dst::test {

using nlohmann::json;

Cmd Run(const QString& prog, const QStringList& args, int timeout_ms) {
  Cmd c;
  QProcess p;
  p.start(prog, args);
  if (!p.waitForFinished(timeout_ms)) {
    p.kill();
    p.waitForFinished(5000);
    c.err = "timed out: " + prog.toUtf8();
    return c;
  }
  c.out = p.readAllStandardOutput();
  c.err = p.readAllStandardError();
  c.rc = p.exitStatus() == QProcess::NormalExit ? p.exitCode() : -1;
  return c;
}

QString Show(const Cmd& c) {
  return QString("rc=%1 out=%2 err=%3").arg(c.rc).arg(QString::fromUtf8(c.out), QString::fromUtf8(c.err));
}

bool IsMounted(const QString& path) {
  QFile f("/proc/self/mountinfo");
  if (!f.open(QIODevice::ReadOnly)) return false;
  const QByteArray needle = " " + path.toUtf8() + " ";
  return f.readAll().contains(needle);
}

StackGuard::~StackGuard() {
  if (!fs_mount.isEmpty()) Run("umount", {"-l", fs_mount}, 30000);
  if (!loop.isEmpty()) Run("losetup", {"-d", loop}, 30000);
}

bool StackGuard::Attach(const QString& file, bool read_only, QString* why) {
  QStringList a{"--direct-io=on", "--find", "--show"};
  if (read_only) a << "--read-only";
  a << file;
  Cmd c = Run("losetup", a);
  if (c.rc != 0) {
    *why = "losetup: " + Show(c);
    return false;
  }
  loop = QString::fromUtf8(c.out).trimmed();
  if (!loop.startsWith("/dev/loop")) {
    *why = "losetup printed " + loop;
    loop.clear();
    return false;
  }
  return true;
}

bool StackGuard::Mount(const QString& dir, const QStringList& opts, QString* why) {
  QStringList a{"-t", "ext4"};
  if (!opts.isEmpty()) a << "-o" << opts.join(',');
  a << loop << dir;
  Cmd c = Run("mount", a);
  if (c.rc != 0) {
    *why = "mount: " + Show(c);
    return false;
  }
  fs_mount = dir;
  return true;
}

bool StackGuard::Umount(QString* why) {
  if (fs_mount.isEmpty()) return true;
  Cmd c = Run("umount", {fs_mount});
  if (c.rc != 0) {
    *why = "umount: " + Show(c);
    return false;
  }
  fs_mount.clear();
  return true;
}

bool StackGuard::Detach(QString* why) {
  if (loop.isEmpty()) return true;
  Cmd c = Run("losetup", {"-d", loop});
  if (c.rc != 0) {
    *why = "losetup -d: " + Show(c);
    return false;
  }
  loop.clear();
  return true;
}

FuseGuard::~FuseGuard() { Clean(); }
void FuseGuard::Clean() {
  if (!path.isEmpty() && IsMounted(path)) Run("umount", {"-l", path}, 30000);
}

QString DstUri(const DaemonProcess& d, const QString& export_name) {
  return QString("dst://127.0.0.1:%1/%2").arg(d.port()).arg(export_name);
}

QString ExportToml(const QString& name, const QString& path, const QString& size) {
  QString s = QString("[[export]]\nname = \"%1\"\npath = \"%2\"\n").arg(name, path);
  if (!size.isEmpty()) s += QString("size = \"%1\"\n").arg(size);
  return s + "\n";
}

QString VolumeToml(const QString& name, const QString& uri, int io_timeout, int keepalive_timeout) {
  return QString("[[volume]]\nname = \"%1\"\nremote = \"%2\"\nqueue_depth = 64\nio_timeout = %3\n"
                 "keepalive_timeout = %4\n\n")
      .arg(name, uri)
      .arg(io_timeout)
      .arg(keepalive_timeout);
}

QString ArrayToml(const QString& name, const QString& level, const QStringList& legs,
                  const QString& region_size, const QString& rate_min, const QString& rate_max,
                  int write_intent, const QString& extra) {
  QStringList q;
  for (const auto& l : legs) q << "\"" + l + "\"";
  QString s = QString("[[array]]\nname = \"%1\"\nlevel = \"%2\"\nlegs = [%3]\n")
                  .arg(name, level, q.join(", "));
  if (level == "mirror" && !region_size.isEmpty()) s += QString("region_size = \"%1\"\n").arg(region_size);
  // The mirror's keys: other layers refuse them (dst/layer.h registry).
  if (level == "mirror" && !rate_min.isEmpty()) s += QString("resync_rate_min = \"%1\"\n").arg(rate_min);
  if (level == "mirror" && !rate_max.isEmpty()) s += QString("resync_rate_max = \"%1\"\n").arg(rate_max);
  if (level == "mirror" && write_intent >= 0)
    s += QString("write_intent = %1\n").arg(write_intent ? "true" : "false");
  return s + extra + "\n";
}

json CtlJson(DaemonProcess& d, const QStringList& args, QString* why) {
  QByteArray out, err;
  int rc = d.Ctl(args, &out, &err);
  if (rc != 0) {
    if (why) *why = QString("dstctl %1: rc=%2 %3").arg(args.join(' ')).arg(rc).arg(QString::fromUtf8(err));
    return nullptr;
  }
  json j = json::parse(out.toStdString(), nullptr, false);
  if (j.is_discarded()) {
    if (why) *why = "dstctl " + args.join(' ') + ": not JSON: " + QString::fromUtf8(out.left(400));
    return nullptr;
  }
  return j;
}

json ArrayDetail(DaemonProcess& d, const QString& name, QString* why) {
  json j = CtlJson(d, {"detail", name, "--json"}, why);
  if (j.is_object()) {
    if (j.contains("array") && j["array"].is_object()) return j["array"];
    return j;
  }
  json st = CtlJson(d, {"status", "--json"}, why);
  if (!st.is_object() || !st.contains("arrays")) return nullptr;
  for (auto& a : st["arrays"])
    if (a.value("name", "") == name.toStdString()) return a;
  if (why) *why = "array " + name + " not in status --json";
  return nullptr;
}

std::int64_t JInt(const json& j, const char* key) {
  if (!j.is_object() || !j.contains(key)) return -1;
  const json& v = j[key];
  if (v.is_number_integer() || v.is_number_unsigned()) return v.get<std::int64_t>();
  if (v.is_number_float()) return static_cast<std::int64_t>(v.get<double>());
  return -1;
}

std::int64_t BytesResyncedTotal(const json& arr) {
  if (!arr.is_object()) return -1;
  std::int64_t top = JInt(arr, "bytes_resynced_total");
  if (top >= 0) return top;
  for (const char* list : {"progress", "legs"}) {
    std::int64_t sum = -1;
    if (arr.contains(list) && arr[list].is_array()) {
      for (auto& l : arr[list]) {
        std::int64_t v = JInt(l, "bytes_resynced_total");
        if (v >= 0) sum = (sum < 0 ? 0 : sum) + v;
      }
    }
    if (sum >= 0) return sum;
  }
  if (arr.contains("resync") && arr["resync"].is_object()) {
    std::int64_t v = JInt(arr["resync"], "bytes_resynced_total");
    if (v >= 0) return v;
  }
  if (arr.contains("stats") && arr["stats"].is_object()) return JInt(arr["stats"], "bytes_resynced_total");
  return -1;
}

std::string ArrayState(const json& arr) {
  return arr.is_object() && arr.contains("state") && arr["state"].is_string() ? arr["state"].get<std::string>()
                                                                              : std::string();
}

static const json* Leg(const json& arr, int slot) {
  if (!arr.is_object() || !arr.contains("legs") || !arr["legs"].is_array()) return nullptr;
  for (auto& l : arr["legs"])
    if (JInt(l, "slot") == slot) return &l;
  return nullptr;
}

std::string NormState(std::string s) {
  for (auto& c : s)
    if (c == '-') c = '_';
  return s;
}

std::string LegStateOf(const json& arr, int slot) {
  const json* l = Leg(arr, slot);
  return l && l->contains("state") && (*l)["state"].is_string() ? NormState((*l)["state"].get<std::string>()) : "";
}

std::int64_t LegOutOfSync(const json& arr, int slot) {
  const json* l = Leg(arr, slot);
  return l ? JInt(*l, "out_of_sync_bytes") : -1;
}

bool ResyncActive(const json& arr) {
  if (!arr.is_object()) return false;
  if (arr.contains("resync") && arr["resync"].is_object()) {
    std::string s = arr["resync"].value("state", "");
    if (s == "running" || s == "pending" || s == "paused") return true;
  }
  if (ArrayState(arr) == "resyncing") return true;
  if (arr.contains("legs") && arr["legs"].is_array())
    for (auto& l : arr["legs"])
      if (NormState(l.value("state", "")) == "resyncing") return true;
  return false;
}

double ResyncPercent(const json& arr) {
  if (!arr.is_object() || !arr.contains("resync") || !arr["resync"].is_object()) return -1;
  const json& r = arr["resync"];
  if (r.contains("percent") && r["percent"].is_number()) return r["percent"].get<double>();
  return -1;
}

std::uint64_t ResyncWindowBytes(const json& arr, std::uint64_t region_size) {
  for (const char* k : {"window_bytes", "resync_window"}) {
    std::int64_t v = JInt(arr, k);
    if (v > 0) return std::uint64_t(v);
    if (arr.is_object() && arr.contains("resync") && arr["resync"].is_object()) {
      v = JInt(arr["resync"], k);
      if (v > 0) return std::uint64_t(v);
    }
  }
  return 16 * region_size;
}

bool WaitUntil(const std::function<bool()>& pred, int timeout_ms, int poll_ms) {
  QElapsedTimer t;
  t.start();
  for (;;) {
    if (pred()) return true;
    if (t.elapsed() >= timeout_ms) return false;
    QThread::msleep(poll_ms);
  }
}

bool WaitArrayClean(DaemonProcess& d, const QString& name, int timeout_ms, json* last) {
  return WaitUntil(
      [&] {
        json a = ArrayDetail(d, name);
        if (last) *last = a;
        if (!a.is_object() || ArrayState(a) != "clean" || ResyncActive(a)) return false;
        if (a.contains("legs") && a.value("level", "") == "mirror")
          for (auto& l : a["legs"])
            if (NormState(l.value("state", "")) != "up_to_date") return false;
        return true;
      },
      timeout_ms, 100);
}

bool WaitFileExists(const QString& path, int timeout_ms) {
  return WaitUntil([&] { return QFile::exists(path); }, timeout_ms, 20);
}

namespace {
struct AlignedBuf {
  void* p = nullptr;
  explicit AlignedBuf(std::size_t n) {
    if (posix_memalign(&p, 4096, n ? n : 4096) != 0) p = nullptr;
  }
  ~AlignedBuf() { free(p); }
};
}  // namespace

bool PwriteDirect(const QString& path, std::uint64_t off, const QByteArray& data, int* err) {
  int fd = ::open(path.toLocal8Bit().constData(), O_WRONLY | O_DIRECT | O_CLOEXEC);
  if (fd < 0) {
    if (err) *err = errno;
    return false;
  }
  AlignedBuf b(data.size());
  std::memcpy(b.p, data.constData(), data.size());
  ssize_t n = ::pwrite(fd, b.p, data.size(), off);
  int e = errno;
  bool ok = n == data.size();
  if (ok && ::fsync(fd) != 0) {
    e = errno;
    ok = false;
  }
  ::close(fd);
  if (!ok && err) *err = e ? e : EIO;
  return ok;
}

bool PreadDirect(const QString& path, std::uint64_t off, std::uint32_t len, QByteArray* out, int* err) {
  int fd = ::open(path.toLocal8Bit().constData(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  if (fd < 0) {
    if (err) *err = errno;
    return false;
  }
  AlignedBuf b(len);
  ssize_t n = ::pread(fd, b.p, len, off);
  int e = errno;
  ::close(fd);
  if (n != ssize_t(len)) {
    if (err) *err = n < 0 ? e : EIO;
    return false;
  }
  *out = QByteArray(static_cast<const char*>(b.p), len);
  return true;
}

QByteArray Pattern(std::uint64_t seed, std::uint64_t off, std::uint32_t len) {
  QByteArray d(len, Qt::Uninitialized);
  auto* w = reinterpret_cast<std::uint64_t*>(d.data());
  for (std::uint32_t i = 0; i < len / 8; ++i) {
    std::uint64_t x = seed * 0x9E3779B97F4A7C15ull ^ (off + 8ull * i);
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    w[i] = x;
  }
  return d;
}

std::int64_t FirstDiffRange(const QString& a, std::uint64_t a_off, const QString& b,
                            std::uint64_t b_off, std::uint64_t len) {
  QFile fa(a), fb(b);
  if (!fa.open(QIODevice::ReadOnly) || !fb.open(QIODevice::ReadOnly)) return 0;
  if (!fa.seek(a_off) || !fb.seek(b_off)) return 0;
  constexpr qint64 kChunk = 1 << 20;
  std::uint64_t pos = 0;
  while (pos < len) {
    qint64 n = qint64(std::min<std::uint64_t>(kChunk, len - pos));
    QByteArray x = fa.read(n), y = fb.read(n);
    if (x.size() != n || y.size() != n) return std::int64_t(pos);
    if (x != y) {
      for (qint64 i = 0; i < n; ++i)
        if (x[i] != y[i]) return std::int64_t(pos + i);
    }
    pos += n;
  }
  return -1;
}

std::int64_t FirstDiff(const QString& a, const QString& b, std::uint64_t len) {
  return FirstDiffRange(a, 0, b, 0, len);
}

bool MakeSparse(const QString& path, std::uint64_t size) {
  QFile f(path);
  if (!f.open(QIODevice::WriteOnly | QIODevice::Truncate)) return false;
  return f.resize(qint64(size));
}

QByteArray Sha256File(const QString& path) {
  QFile f(path);
  if (!f.open(QIODevice::ReadOnly)) return {};
  QCryptographicHash h(QCryptographicHash::Sha256);
  if (!h.addData(&f)) return {};
  return h.result().toHex();
}

bool MirrorRig::StartExporters(int n, int size_mib, QString* why) {
  if (!dir.isValid()) {
    *why = "no temp dir";
    return false;
  }
  mnt = dir.path() + "/mnt";
  fuse_guard.path = mnt;
  QDir().mkpath(mnt);
  for (int i = 0; i < n; ++i) {
    QString sd = dir.path() + QString("/e%1").arg(i);
    auto d = std::make_unique<DaemonProcess>(sd);
    QString img = sd + QString("/d%1.img").arg(i);
    d->config() = ExportToml(QString("d%1").arg(i), img, QString("%1M").arg(size_mib));
    if (!d->Start()) {
      *why = QString("exporter %1 did not start: ").arg(i) + QString::fromUtf8(d->Log());
      return false;
    }
    ex.push_back(std::move(d));
    image.push_back(img);
  }
  return true;
}

bool MirrorRig::StartAssembler(const QString* toml, QString* why) {
  if (!as) {
    as = std::make_unique<DaemonProcess>(dir.path() + "/as");
    as->extra_args() << "--mount" << mnt;
  }
  if (toml) as->config() = *toml;
  fuse_guard.Clean();
  if (!as->Start()) {
    *why = "assembler did not start: " + QString::fromUtf8(as->Log().right(4000));
    return false;
  }
  return true;
}

bool MirrorRig::StartEmpty(int exporters, int size_mib, QString* why) {
  if (!StartExporters(exporters, size_mib, why)) return false;
  const QString empty;
  return StartAssembler(&empty, why);
}

bool MirrorRig::StartCleanMirror(int exporters, int size_mib, QString* why) {
  if (!StartExporters(exporters, size_mib, why)) return false;
  const QString toml = ArrayToml("m0", "mirror", {Uri(0), Uri(1)}, "64K", "200M", "400M");
  if (!StartAssembler(&toml, why)) return false;
  nlohmann::json a;
  if (!WaitArrayClean(*as, "m0", 60000, &a)) {
    *why = QString::fromStdString("m0 not clean: " + a.dump());
    return false;
  }
  return true;
}

}  // namespace dst::test
