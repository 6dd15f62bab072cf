#include "metrics_text.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace dst::daemon {

std::string MetricsText::Escape(const std::string& v) {
  std::string o;
  o.reserve(v.size());
  for (char c : v) {
    if (c == '\\') o += "\\\\";
    else if (c == '"') o += "\\\"";
    else if (c == '\n') o += "\\n";
    else o += c;
  }
  return o;
}

bool MetricsText::Family(const std::string& name, const char* help, const char* type) {
  if (name == current_) return true;
  if (std::find(closed_.begin(), closed_.end(), name) != closed_.end()) return false;  // not contiguous
  if (!current_.empty()) closed_.push_back(current_);
  current_ = name;
  out_ += "# HELP " + name + " ";
  for (const char* p = help; *p; ++p) out_ += *p == '\n' ? std::string("\\n") : *p == '\\' ? std::string("\\\\") : std::string(1, *p);
  out_ += "\n# TYPE " + name + " " + type + "\n";
  return true;
}

void MetricsText::Line(const std::string& name, const Labels& labels, const std::string* le, double value) {
  out_ += name;
  if (!labels.empty() || le) {
    out_ += '{';
    bool first = true;
    for (const auto& [k, v] : labels) {
      if (!first) out_ += ',';
      first = false;
      out_ += k + "=\"" + Escape(v) + "\"";
    }
    if (le) out_ += std::string(first ? "" : ",") + "le=\"" + *le + "\"";
    out_ += '}';
  }
  char buf[64];
  if (std::isnan(value)) std::snprintf(buf, sizeof buf, " NaN\n");
  else if (std::isinf(value)) std::snprintf(buf, sizeof buf, value > 0 ? " +Inf\n" : " -Inf\n");
  else if (value == std::floor(value) && std::fabs(value) < 1e15) std::snprintf(buf, sizeof buf, " %.0f\n", value);
  else std::snprintf(buf, sizeof buf, " %.9g\n", value);
  out_ += buf;
}

bool MetricsText::Sample(const std::string& name, const char* help, const char* type, const Labels& labels,
                         double value) {
  if (!Family(name, help, type)) return false;
  Line(name, labels, nullptr, value);
  return true;
}

bool MetricsText::Histogram(const std::string& name, const char* help, const Labels& labels,
                            const LatencyHistogram::Snapshot& h) {
  if (!Family(name, help, "histogram")) return false;
  std::uint64_t cumulative = 0;
  for (int i = 0; i < LatencyHistogram::kBuckets; ++i) {
    cumulative += h.buckets[i];
    char le[32];
    std::snprintf(le, sizeof le, "%g", static_cast<double>(LatencyHistogram::BoundNs(i)) / 1e9);
    const std::string les = le;
    Line(name + "_bucket", labels, &les, static_cast<double>(cumulative));
  }
  // +Inf is every observation; a scrape racing completions may see count ahead of the buckets.
  const std::string inf = "+Inf";
  Line(name + "_bucket", labels, &inf, static_cast<double>(std::max(h.count, cumulative)));
  Line(name + "_sum", labels, nullptr, static_cast<double>(h.sum_ns) / 1e9);
  Line(name + "_count", labels, nullptr, static_cast<double>(std::max(h.count, cumulative)));
  return true;
}

}  // namespace dst::daemon
