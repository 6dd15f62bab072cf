// MetricsText (daemon/src/metrics_text.h): the Prometheus text format, checked by hand and by
// a real parser (Debian's python3-prometheus-client), including label values a user chose
// (quotes, backslashes, newlines) and histograms.
#include <QFile>
#include <QJsonArray>
#include <QJsonDocument>
#include <QJsonObject>
#include <QProcess>
#include <QtTest/QtTest>

#include "metrics_text.h"
#include "test_env.h"

using dst::LatencyHistogram;
using dst::daemon::MetricsText;

namespace {

const char* kPython = "/usr/bin/python3";

// Parses `text` with prometheus_client; returns {family: {type, samples: [[name, labels, value]]}}.
QJsonObject Parse(const std::string& text, QString* err) {
  const char* script = R"(
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(sys.stdin.read()):
    out[f.name] = {"type": f.type, "documentation": f.documentation,
                   "samples": [[s.name, s.labels, s.value] for s in f.samples]}
print(json.dumps(out))
)";
  QProcess p;
  p.start(kPython, {"-c", script});
  p.write(text.data(), qint64(text.size()));
  p.closeWriteChannel();
  if (!p.waitForFinished(30000) || p.exitCode() != 0) {
    *err = QString::fromUtf8(p.readAllStandardError());
    return {};
  }
  return QJsonDocument::fromJson(p.readAllStandardOutput()).object();
}

}  // namespace

class MetricsTextTest : public QObject {
  Q_OBJECT

 private slots:
  void handWritten() {
    MetricsText m;
    QVERIFY(m.Counter("dst_x_total", "X things.", {{"export", "a"}}, 3));
    QVERIFY(m.Counter("dst_x_total", "X things.", {{"export", "b"}}, 4.5));
    QVERIFY(m.Gauge("dst_y_bytes", "Y.", {}, 1e18));
    // A family may not come back after another one started.
    QVERIFY(!m.Counter("dst_x_total", "X things.", {{"export", "c"}}, 1));
    const QString t = QString::fromStdString(m.text());
    QCOMPARE(t.count("# TYPE dst_x_total counter"), 1);
    QCOMPARE(t.count("# HELP dst_x_total X things."), 1);
    QVERIFY2(t.contains("dst_x_total{export=\"a\"} 3\n") && t.contains("dst_x_total{export=\"b\"} 4.5\n"), qPrintable(t));
    QVERIFY2(t.contains("dst_y_bytes 1e+18\n"), qPrintable(t));
    QVERIFY(!t.contains("export=\"c\""));
    QCOMPARE(MetricsText::Escape("a\"b\\c\nd"), std::string("a\\\"b\\\\c\\nd"));
  }

  // Whatever names users choose, a real parser reads back exactly the samples written.
  void realParserReadsItBack() {
    DST_REQUIRE(QFile::exists(kPython), "needs Debian's /usr/bin/python3");
    {
      QProcess p;
      p.start(kPython, {"-c", "import prometheus_client.parser"});
      DST_REQUIRE(p.waitForFinished(30000) && p.exitCode() == 0, "needs python3-prometheus-client");
    }
    const std::string evil = "m\"0\\\n# TYPE dst_forged counter\ndst_forged 1";
    LatencyHistogram h;
    h.Observe(10'000);        // 10 us
    h.Observe(700'000);       // 0.7 ms
    h.Observe(30'000'000'000ull);  // 30 s: only +Inf
    MetricsText m;
    QVERIFY(m.Gauge("dst_leg_out_of_sync_bytes", "Bytes a leg misses.", {{"array", evil}, {"leg", "0"}}, 65536));
    QVERIFY(m.Counter("dst_volume_requests_total", "Requests.", {{"volume", "v"}, {"op", "read"}}, 12));
    QVERIFY(m.Histogram("dst_volume_request_duration_seconds", "Latency.", {{"volume", "v"}, {"op", "read"}}, h.Get()));
    QString err;
    const QJsonObject f = Parse(m.text(), &err);
    QVERIFY2(!f.isEmpty(), qPrintable(err + "\n" + QString::fromStdString(m.text())));
    QVERIFY2(!f.contains("dst_forged"), qPrintable(QString::fromStdString(m.text())));
    QCOMPARE(f.keys(), (QStringList{"dst_leg_out_of_sync_bytes", "dst_volume_request_duration_seconds", "dst_volume_requests"}));

    const QJsonObject g = f["dst_leg_out_of_sync_bytes"].toObject();
    QCOMPARE(g["type"].toString(), QString("gauge"));
    const QJsonArray gs = g["samples"].toArray();
    QCOMPARE(gs.size(), 1);
    QCOMPARE(gs[0].toArray()[1].toObject()["array"].toString(), QString::fromStdString(evil));
    QCOMPARE(gs[0].toArray()[2].toDouble(), 65536.0);

    QCOMPARE(f["dst_volume_requests"].toObject()["type"].toString(), QString("counter"));

    const QJsonObject hist = f["dst_volume_request_duration_seconds"].toObject();
    QCOMPARE(hist["type"].toString(), QString("histogram"));
    QMap<QString, double> le;
    double sum = -1, count = -1;
    for (const auto& sv : hist["samples"].toArray()) {
      const QJsonArray s = sv.toArray();
      const QString name = s[0].toString();
      if (name.endsWith("_bucket")) le[s[1].toObject()["le"].toString()] = s[2].toDouble();
      if (name.endsWith("_sum")) sum = s[2].toDouble();
      if (name.endsWith("_count")) count = s[2].toDouble();
    }
    QCOMPARE(le.size(), LatencyHistogram::kBuckets + 1);
    QCOMPARE(le["1.6e-05"], 1.0);
    QCOMPARE(le["0.001024"], 2.0);
    QCOMPARE(le["+Inf"], 3.0);
    QCOMPARE(count, 3.0);
    QVERIFY(qAbs(sum - 30.00071) < 1e-6);
  }
};

DST_TEST_MAIN(MetricsTextTest)
#include "metrics_text_test.moc"
