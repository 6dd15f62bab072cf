// docs/metrics.md against the code (issue 14 item 1): the Grafana dashboard there is valid JSON
// and asks only for families dstd exports, and the family tables name exactly the families
// StatusToMetrics renders for a status that has every kind of object.  A renamed family fails
// here instead of leaving users an empty panel.
#include <QFile>
#include <QRegularExpression>
#include <QSet>
#include <QtTest/QtTest>

#include <nlohmann/json.hpp>

#include "metrics.h"
#include "test_env.h"

using json = nlohmann::json;

namespace {

QString DocPath() { return qEnvironmentVariable("DST_SOURCE_DIR", DST_SOURCE_DIR_DEFAULT) + "/docs/metrics.md"; }

// A status with an export, a volume, a mirror with two legs (one resyncing) and a verify, each
// with the "metrics" member Daemon::MetricsJson adds.
json FullStatus() {
  json io = {{"reads", 3}, {"writes", 4}, {"other", 1}, {"bytes_read", 4096}, {"bytes_written", 8192},
             {"errors", 0}, {"inflight", 1}};
  json hist = {{"buckets", json::array({1, 2})}, {"count", 3}, {"sum_ns", 90000}};
  json metrics = {{"io", io}, {"latency", {{"read", hist}, {"write", hist}, {"other", hist}}}};
  json st;
  st["daemon"] = {{"version", "1.0"}, {"uptime_s", 5}};
  st["exporter"] = {{"connections_total", 1}};
  st["exports"] = json::array({{{"name", "e"}, {"size", 1}, {"metrics", metrics}}});
  st["volumes"] = json::array({{{"name", "v"}, {"size", 1}, {"metrics", metrics}}});
  json legs = json::array({{{"slot", 0}, {"device", "a"}, {"state", "up-to-date"}, {"metrics", metrics}},
                           {{"slot", 1}, {"device", "b"}, {"state", "resyncing"}, {"metrics", metrics},
                            {"link", {{"reconnects", 1}, {"timeouts", 0}, {"frames_sent", 9}, {"send_calls", 3}}}}});
  st["arrays"] = json::array({{{"name", "m"},
                               {"level", "mirror"},
                               {"state", "resyncing"},
                               {"legs", legs},
                               {"metrics", metrics},
                               {"progress", json::array({{{"leg", 1}, {"state", "running"}, {"percent", 50}}})},
                               {"verify", {{"state", "running"}, {"percent", 10}}}}});
  return st;
}

// family -> type, from the "# TYPE" lines.
QMap<QString, QString> Families(const std::string& text) {
  QMap<QString, QString> out;
  static const QRegularExpression re("^# TYPE (\\S+) (\\S+)$", QRegularExpression::MultilineOption);
  for (auto it = re.globalMatch(QString::fromStdString(text)); it.hasNext();) {
    const auto m = it.next();
    out[m.captured(1)] = m.captured(2);
  }
  return out;
}

// The sample names a family's series carry (a histogram's _bucket, _count, _sum).
QSet<QString> SampleNames(const QMap<QString, QString>& fam) {
  QSet<QString> s;
  for (auto it = fam.begin(); it != fam.end(); ++it) {
    if (it.value() == "histogram")
      for (const char* suffix : {"_bucket", "_count", "_sum"}) s.insert(it.key() + suffix);
    else
      s.insert(it.key());
  }
  return s;
}

}  // namespace

class MetricsDashboardTest : public QObject {
  Q_OBJECT

  QString doc_;
  QMap<QString, QString> families_;

 private slots:
  void initTestCase() {
    QFile f(DocPath());
    QVERIFY2(f.open(QIODevice::ReadOnly), qPrintable(DocPath()));
    doc_ = QString::fromUtf8(f.readAll());
    families_ = Families(dst::daemon::StatusToMetrics(FullStatus()));
    QVERIFY(families_.size() > 40);
  }

  void dashboardUsesExportedFamilies() {
    const qsizetype b = doc_.indexOf("```json\n");
    QVERIFY2(b >= 0, "no ```json block in docs/metrics.md");
    const qsizetype e = doc_.indexOf("\n```", b + 8);
    QVERIFY(e > b);
    const json d = json::parse(doc_.mid(b + 8, e - b - 8).toStdString(), nullptr, false);
    QVERIFY2(!d.is_discarded(), "the dashboard is not valid JSON");
    QVERIFY(d.contains("panels") && d["panels"].is_array() && !d["panels"].empty());
    const QSet<QString> samples = SampleNames(families_);
    QSet<int> ids;
    int exprs = 0;
    static const QRegularExpression name_re("\\bdst_[a-z0-9_]+");
    for (const json& p : d["panels"]) {
      QVERIFY2(p.contains("id") && !ids.contains(p["id"].get<int>()), p.dump().c_str());
      ids.insert(p["id"].get<int>());
      QVERIFY2(p.contains("targets") && !p["targets"].empty(), p.dump().c_str());
      for (const json& t : p["targets"]) {
        const QString expr = QString::fromStdString(t.value("expr", std::string()));
        QVERIFY2(!expr.isEmpty(), t.dump().c_str());
        for (auto it = name_re.globalMatch(expr); it.hasNext();) {
          const QString n = it.next().captured(0);
          QVERIFY2(samples.contains(n), qPrintable(QString("panel \"%1\" asks for %2, which dstd does not export")
                                                      .arg(QString::fromStdString(p.value("title", std::string())), n)));
          ++exprs;
        }
      }
    }
    QVERIFY(exprs >= 10);
  }

  // Every family in the tables is rendered and every rendered family is in the tables
  // (`dst_KIND_...` rows stand for export, volume, array and leg).
  void tablesMatchTheCode() {
    QSet<QString> documented;
    static const QRegularExpression row("^\\|([^|]*)\\|", QRegularExpression::MultilineOption);
    static const QRegularExpression name_re("`(dst_[A-Za-z0-9_]+)`");
    for (auto it = row.globalMatch(doc_); it.hasNext();) {
      const QString cell = it.next().captured(1);
      for (auto n = name_re.globalMatch(cell); n.hasNext();) {
        const QString name = n.next().captured(1);
        if (name.contains("KIND")) {
          for (const char* k : {"export", "volume", "array", "leg"}) documented.insert(QString(name).replace("KIND", k));
        } else {
          documented.insert(name);
        }
      }
    }
    QStringList undocumented, missing;
    for (const QString& f : families_.keys())
      if (!documented.contains(f)) undocumented << f;
    for (const QString& f : documented)
      if (!families_.contains(f)) missing << f;
    QVERIFY2(undocumented.isEmpty(), qPrintable("rendered but not in docs/metrics.md: " + undocumented.join(", ")));
    QVERIFY2(missing.isEmpty(), qPrintable("in docs/metrics.md but not rendered: " + missing.join(", ")));
  }
};

DST_TEST_MAIN(MetricsDashboardTest)
#include "metrics_dashboard_test.moc"
