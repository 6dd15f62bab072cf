// MetricsText: writes the Prometheus text exposition format (version 0.0.4) for dstd's
// `[daemon] metrics_listen` endpoint (issue 14 item 1).
//
// Families are written as they come: the first sample of a name emits its `# HELP` and
// `# TYPE` lines; every later sample of the same name must follow without another family in
// between (the format requires a family's samples to be contiguous; Add* checks it and returns
// false otherwise).  Label values are escaped (backslash, double quote, newline), so names a
// peer or user chose cannot forge lines.  Histograms get cumulative `_bucket{le=...}` samples,
// `_sum` (seconds) and `_count`.
//
// Naming follows node_exporter: a `dst_` prefix, base units in the name (`_bytes`,
// `_seconds`), `_total` on counters.  docs/metrics.md lists every family.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "dst/latency_histogram.h"

namespace dst::daemon {

using Labels = std::vector<std::pair<std::string, std::string>>;

class MetricsText {
 public:
  bool Counter(const std::string& name, const char* help, const Labels& labels, double value) {
    return Sample(name, help, "counter", labels, value);
  }
  bool Gauge(const std::string& name, const char* help, const Labels& labels, double value) {
    return Sample(name, help, "gauge", labels, value);
  }
  bool Histogram(const std::string& name, const char* help, const Labels& labels,
                 const LatencyHistogram::Snapshot& h);

  const std::string& text() const { return out_; }

  // Label value escaping of the format (exposed for tests).
  static std::string Escape(const std::string& v);

 private:
  bool Family(const std::string& name, const char* help, const char* type);
  bool Sample(const std::string& name, const char* help, const char* type, const Labels& labels, double value);
  void Line(const std::string& name, const Labels& labels, const std::string* le, double value);

  std::string out_;
  std::string current_;              // the family being written
  std::vector<std::string> closed_;  // families already written (each may appear once)
};

}  // namespace dst::daemon
