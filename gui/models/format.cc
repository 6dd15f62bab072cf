#include "format.h"

namespace dst::gui {

QString HumanSize(qint64 bytes) {
  static const char* const kUnits[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < 1024) return QStringLiteral("%1 B").arg(bytes);
  double v = double(bytes);
  int u = -1;
  while (v >= 1024.0 && u < 5) v /= 1024.0, ++u;
  return QStringLiteral("%1 %2").arg(v, 0, 'f', 1).arg(QLatin1String(kUnits[u]));
}

QString HumanRate(double bytes_per_second) {
  if (bytes_per_second < 0) bytes_per_second = 0;
  return HumanSize(qint64(bytes_per_second)) + QStringLiteral("/s");
}

QString HumanDuration(double seconds) {
  if (seconds < 0) return QStringLiteral("unknown");
  qint64 s = qint64(seconds + 0.5);
  if (s < 60) return QStringLiteral("%1 s").arg(s);
  if (s < 3600) return QStringLiteral("%1 min %2 s").arg(s / 60).arg(s % 60, 2, 10, QChar('0'));
  return QStringLiteral("%1 h %2 min").arg(s / 3600).arg((s % 3600) / 60, 2, 10, QChar('0'));
}

QString HumanState(const QString& s) {
  if (s == QLatin1String("clean") || s == QLatin1String("up-to-date"))
    return QStringLiteral("up to date");
  QString out = s;
  out.replace(QChar('-'), QChar(' '));
  return out;
}

}  // namespace dst::gui
