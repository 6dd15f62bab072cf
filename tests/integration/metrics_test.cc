// The Prometheus endpoint of a real dstd (issue 14 item 1): `[daemon] metrics_listen`, scraped
// over HTTP and read by Debian's python3-prometheus-client parser.  The values must be the ones
// `status --json` reports (one snapshot feeds both), and they must follow what happens.
#include <QFile>
#include <QJsonArray>
#include <QJsonDocument>
#include <QJsonObject>
#include <QProcess>
#include <QTemporaryDir>
#include <QtTest/QtTest>

#include <filesystem>
#include <limits>

#include "array_helpers.h"
#include "daemon_process.h"
#include "loopback.h"
#include "test_env.h"

using namespace dst::test;

namespace {

const char* kPython = "/usr/bin/python3";

std::string Scrape(quint16 port) {
  const int fd = DialLoopback(port);
  if (fd < 0) return {};
  const std::string req = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
  (void)!::send(fd, req.data(), req.size(), MSG_NOSIGNAL);
  std::string out;
  char buf[65536];
  for (ssize_t n; (n = ::recv(fd, buf, sizeof buf, 0)) > 0;) out.append(buf, std::size_t(n));
  ::close(fd);
  const auto body = out.find("\r\n\r\n");
  return out.rfind("HTTP/1.1 200", 0) == 0 && body != std::string::npos ? out.substr(body + 4) : std::string();
}

// sample name + sorted labels -> value, from the real parser.
QMap<QString, double> Parse(const std::string& text, QString* err) {
  const char* script = R"(
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(sys.stdin.read()):
    for s in f.samples:
        key = s.name + "{" + ",".join(k + "=" + v for k, v in sorted(s.labels.items())) + "}"
        out[key] = s.value
print(json.dumps(out))
)";
  QProcess p;
  p.start(kPython, {"-c", script});
  p.write(text.data(), qint64(text.size()));
  p.closeWriteChannel();
  QMap<QString, double> m;
  if (!p.waitForFinished(30000) || p.exitCode() != 0) {
    *err = QString::fromUtf8(p.readAllStandardError());
    return m;
  }
  const QJsonObject o = QJsonDocument::fromJson(p.readAllStandardOutput()).object();
  for (auto it = o.begin(); it != o.end(); ++it) m[it.key()] = it.value().toDouble();
  return m;
}


// Sum of the samples named `name` whose labels include every "k=v" of `want`.
double SumOf(const QMap<QString, double>& m, const QString& name, const QStringList& want) {
  double sum = 0;
  for (auto it = m.begin(); it != m.end(); ++it) {
    if (!it.key().startsWith(name + "{")) continue;
    const QStringList labels = it.key().mid(name.size() + 1).chopped(1).split(',', Qt::SkipEmptyParts);
    bool all = true;
    for (const QString& w : want) all = all && labels.contains(w);
    if (all) sum += it.value();
  }
  return sum;
}

// The histogram `family` (labels `want`) is well formed: cumulative buckets that never fall,
// a +Inf bucket equal to _count, and a positive _sum when anything was counted.  "" when so.
QString HistogramProblem(const QMap<QString, double>& m, const QString& family, const QStringList& want) {
  QMap<double, double> buckets;  // le -> cumulative count
  for (auto it = m.begin(); it != m.end(); ++it) {
    const QString name = family + "_bucket";
    if (!it.key().startsWith(name + "{")) continue;
    const QStringList labels = it.key().mid(name.size() + 1).chopped(1).split(',', Qt::SkipEmptyParts);
    bool all = true;
    QString le;
    for (const QString& w : want) all = all && labels.contains(w);
    for (const QString& l : labels)
      if (l.startsWith("le=")) le = l.mid(3);
    if (!all || le.isEmpty()) continue;
    buckets[le == "+Inf" ? std::numeric_limits<double>::infinity() : le.toDouble()] = it.value();
  }
  if (buckets.size() < 2) return family + ": no buckets";
  double prev = 0;
  for (double v : buckets) {
    if (v < prev) return family + ": a bucket falls";
    prev = v;
  }
  const double count = SumOf(m, family + "_count", want);
  if (buckets.last() != count) return QString("%1: +Inf bucket %2 != _count %3").arg(family).arg(buckets.last()).arg(count);
  if (count > 0 && !(SumOf(m, family + "_sum", want) > 0)) return family + ": _sum not positive";
  return {};
}

}  // namespace

class MetricsTest : public QObject {
  Q_OBJECT

 private slots:
  void init() {
    DST_REQUIRE(IsRoot(), "needs root (dstd's FUSE mount)");
    DST_REQUIRE(std::filesystem::exists(BinPath("dstd")), "dstd binary not built");
    DST_REQUIRE(QFile::exists(kPython), "needs Debian's /usr/bin/python3");
    QProcess p;
    p.start(kPython, {"-c", "import prometheus_client.parser"});
    DST_REQUIRE(p.waitForFinished(30000) && p.exitCode() == 0, "needs python3-prometheus-client");
  }

  void scrapeFollowsTheDaemon() {
    QTemporaryDir dir;
    const quint16 mport = FreePort();
    for (const char* f : {"e", "l0", "l1"}) QVERIFY(MakeSparse(dir.path() + "/" + f + ".img", 16u << 20));
    DaemonProcess d(dir.path() + "/d");
    d.config() = QString("metrics_listen = \"127.0.0.1:%1\"\n").arg(mport) +
                 ExportToml("disk", dir.path() + "/e.img", "") +
                 ArrayToml("m0", "mirror", {dir.path() + "/l0.img", dir.path() + "/l1.img"});
    QVERIFY2(d.Start(), d.Log().right(2000).constData());
    nlohmann::json a;
    QVERIFY2(WaitArrayClean(d, "m0", 30000, &a), a.dump().c_str());

    QString err;
    QMap<QString, double> m = Parse(Scrape(mport), &err);
    QVERIFY2(!m.isEmpty(), qPrintable(err));
    QCOMPARE(m.value("dst_up{}"), 1.0);
    QCOMPARE(m.value("dst_export_size_bytes{export=disk}"), double(16u << 20));
    QCOMPARE(m.value("dst_array_state{array=m0,state=clean}"), 1.0);
    QCOMPARE(m.value("dst_array_active_devices{array=m0,level=mirror}"), 2.0);
    auto leg_state = [&](int leg) {
      for (const QString& k : m.keys())
        if (k.startsWith("dst_leg_state{array=m0,") && k.contains(QString(",leg=%1,").arg(leg)) && m[k] == 1.0)
          return k.mid(k.indexOf("state=") + 6).chopped(1);
      return QString("<none>");
    };
    QCOMPARE(leg_state(0), QString("up_to_date"));
    QCOMPARE(leg_state(1), QString("up_to_date"));

    // A failed leg shows at the next scrape, with its state and the bytes it then misses.
    QByteArray out, cerr;
    QVERIFY2(d.Ctl({"array", "fail-leg", "m0", "1"}, &out, &cerr) == 0, cerr.constData());
    m = Parse(Scrape(mport), &err);
    QCOMPARE(m.value("dst_array_state{array=m0,state=degraded}"), 1.0);
    QCOMPARE(m.value("dst_array_active_devices{array=m0,level=mirror}"), 1.0);
    QCOMPARE(leg_state(1), QString("failed"));
    QCOMPARE(leg_state(0), QString("up_to_date"));
  }

  // Traffic: every exported device, volume, array and leg counts its requests, bytes and
  // latency where the I/O passes (a CountingDevice each), so a write through the FUSE file
  // shows on the array, on both legs, and on the exporting daemon's export.
  void ioCountersAndLatency() {
    MirrorRig rig;
    QString why;
    QVERIFY2(rig.StartExporters(3, 16, &why), qPrintable(why));
    const quint16 eport = FreePort();
    QCOMPARE(rig.ex[0]->Terminate(), 0);
    rig.ex[0]->config().prepend(QString("metrics_listen = \"127.0.0.1:%1\"\n").arg(eport));
    QVERIFY2(rig.ex[0]->Start(), rig.ex[0]->Log().right(2000).constData());
    const quint16 aport = FreePort();
    const QString toml = QString("metrics_listen = \"127.0.0.1:%1\"\n").arg(aport) +
                         ArrayToml("m0", "mirror", {rig.Uri(0), rig.Uri(1)}, "64K", "200M", "400M") +
                         VolumeToml("v2", rig.Uri(2), 5, 5);
    QVERIFY2(rig.StartAssembler(&toml, &why), qPrintable(why));
    nlohmann::json a;
    QVERIFY2(WaitArrayClean(*rig.as, "m0", 60000, &a), a.dump().c_str());
    QVERIFY(WaitFileExists(rig.File("m0"), 10000));
    QVERIFY(WaitFileExists(rig.File("v2"), 10000));

    QString err;
    const QMap<QString, double> a0 = Parse(Scrape(aport), &err);
    QVERIFY2(!a0.isEmpty(), qPrintable(err));
    const QMap<QString, double> e0 = Parse(Scrape(eport), &err);
    QVERIFY2(!e0.isEmpty(), qPrintable(err));

    constexpr int kIos = 32;
    constexpr std::uint32_t kLen = 64 * 1024;
    for (int i = 0; i < kIos; ++i) QVERIFY(PwriteDirect(rig.File("m0"), std::uint64_t(i) * kLen, Pattern(7, std::uint64_t(i) * kLen, kLen)));
    for (int i = 0; i < kIos; ++i) {
      QByteArray back;
      QVERIFY(PreadDirect(rig.File("m0"), std::uint64_t(i) * kLen, kLen, &back));
      QCOMPARE(back, Pattern(7, std::uint64_t(i) * kLen, kLen));
    }
    for (int i = 0; i < kIos; ++i) QVERIFY(PwriteDirect(rig.File("v2"), std::uint64_t(i) * kLen, Pattern(9, std::uint64_t(i) * kLen, kLen)));

    const QMap<QString, double> a1 = Parse(Scrape(aport), &err);
    QVERIFY2(!a1.isEmpty(), qPrintable(err));
    const QMap<QString, double> e1 = Parse(Scrape(eport), &err);
    QVERIFY2(!e1.isEmpty(), qPrintable(err));
    auto delta = [](const QMap<QString, double>& after, const QMap<QString, double>& before, const QString& n,
                    const QStringList& want) { return SumOf(after, n, want) - SumOf(before, n, want); };

    const QStringList arr{"array=m0"};
    QVERIFY2(delta(a1, a0, "dst_array_writes_total", arr) >= kIos, "array writes not counted");
    QVERIFY2(delta(a1, a0, "dst_array_written_bytes_total", arr) >= double(kIos) * kLen, "array bytes not counted");
    QVERIFY2(delta(a1, a0, "dst_array_reads_total", arr) >= kIos, "array reads not counted");
    QVERIFY2(delta(a1, a0, "dst_array_read_bytes_total", arr) >= double(kIos) * kLen, "array read bytes not counted");
    QCOMPARE(SumOf(a1, "dst_array_errors_total", arr), 0.0);
    QCOMPARE(SumOf(a1, "dst_array_inflight_requests", arr), 0.0);
    QCOMPARE(delta(a1, a0, "dst_volume_writes_total", {"volume=v2"}), double(kIos));
    QCOMPARE(delta(a1, a0, "dst_volume_written_bytes_total", {"volume=v2"}), double(kIos) * kLen);
    QCOMPARE(SumOf(a1, "dst_volume_inflight_requests", {"volume=v2"}), 0.0);
    // A mirror writes every leg and spreads reads over them.
    for (const char* leg : {"leg=0", "leg=1"}) {
      QVERIFY2(delta(a1, a0, "dst_leg_writes_total", {"array=m0", leg}) >= kIos, leg);
      QVERIFY2(delta(a1, a0, "dst_leg_written_bytes_total", {"array=m0", leg}) >= double(kIos) * kLen, leg);
      QCOMPARE(SumOf(a1, "dst_leg_inflight_requests", {"array=m0", leg}), 0.0);
    }
    QVERIFY2(delta(a1, a0, "dst_leg_reads_total", arr) >= kIos, "leg reads not counted");
    // The exporting daemon served leg 0's share.
    QVERIFY2(delta(e1, e0, "dst_export_writes_total", {"export=d0"}) >= kIos, "export writes not counted");
    QVERIFY2(delta(e1, e0, "dst_export_written_bytes_total", {"export=d0"}) >= double(kIos) * kLen, "export bytes");
    QCOMPARE(SumOf(e1, "dst_export_inflight_requests", {"export=d0"}), 0.0);

    // Latency histograms: well formed, and at rest they counted every completed request.
    for (const char* op : {"op=read", "op=write"}) {
      QString p = HistogramProblem(a1, "dst_array_request_duration_seconds", {"array=m0", op});
      QVERIFY2(p.isEmpty(), qPrintable(p));
      for (const char* leg : {"leg=0", "leg=1"}) {
        p = HistogramProblem(a1, "dst_leg_request_duration_seconds", {"array=m0", leg, op});
        QVERIFY2(p.isEmpty(), qPrintable(p));
      }
      p = HistogramProblem(e1, "dst_export_request_duration_seconds", {"export=d0", op});
      QVERIFY2(p.isEmpty(), qPrintable(p));
    }
    const QString p = HistogramProblem(a1, "dst_volume_request_duration_seconds", {"volume=v2", "op=write"});
    QVERIFY2(p.isEmpty(), qPrintable(p));
    QCOMPARE(SumOf(a1, "dst_array_request_duration_seconds_count", {"array=m0", "op=write"}),
             SumOf(a1, "dst_array_writes_total", arr));
    QCOMPARE(SumOf(a1, "dst_array_request_duration_seconds_count", {"array=m0", "op=read"}),
             SumOf(a1, "dst_array_reads_total", arr));
    QCOMPARE(SumOf(e1, "dst_export_request_duration_seconds_count", {"export=d0", "op=write"}),
             SumOf(e1, "dst_export_writes_total", {"export=d0"}));
    QVERIFY(delta(a1, a0, "dst_array_request_duration_seconds_count", {"array=m0", "op=write"}) >= kIos);

    // Remote legs: their connection's batching and reconnects, and whether they are up now.
    for (const char* leg : {"leg=0", "leg=1"}) {
      QCOMPARE(SumOf(a1, "dst_leg_up", {"array=m0", leg}), 1.0);
      QCOMPARE(SumOf(a1, "dst_leg_reconnects_total", {"array=m0", leg}), 0.0);
      QVERIFY2(delta(a1, a0, "dst_leg_frames_sent_total", {"array=m0", leg}) >= kIos, leg);
      QVERIFY2(delta(a1, a0, "dst_leg_send_calls_total", {"array=m0", leg}) >= 1, leg);
    }
    // A leg whose exporter is gone is down at a scrape soon after, and counts its reconnect
    // when the exporter is back.
    rig.ex[1]->Kill9();
    QMap<QString, double> m;
    QVERIFY2(WaitUntil([&] {
               m = Parse(Scrape(aport), &err);
               return m.contains("dst_up{}") && SumOf(m, "dst_leg_up", {"array=m0", "leg=1"}) == 0.0;
             }, 30000, 200),
             "leg 1 still up after its exporter was killed");
    QCOMPARE(SumOf(m, "dst_leg_up", {"array=m0", "leg=0"}), 1.0);
    QVERIFY2(rig.ex[1]->Start(), rig.ex[1]->Log().right(2000).constData());
    QVERIFY2(WaitUntil([&] {
               m = Parse(Scrape(aport), &err);
               return SumOf(m, "dst_leg_up", {"array=m0", "leg=1"}) == 1.0 &&
                      SumOf(m, "dst_leg_reconnects_total", {"array=m0", "leg=1"}) >= 1.0;
             }, 60000, 200),
             "leg 1 not back up with a reconnect counted");
  }

  void nonLoopbackNeedsInsecure() {
    QTemporaryDir dir;
    DaemonProcess d(dir.path() + "/d");
    d.config() = "metrics_listen = \"0.0.0.0:0\"\n";
    QVERIFY(!d.Start(3000));
    QVERIFY2(d.Log().contains("metrics_listen"), d.Log().right(2000).constData());
  }
};

DST_TEST_MAIN(MetricsTest)
#include "metrics_test.moc"
