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
