#include "progress_model.h"

#include <algorithm>
#include <functional>

#include <QDeadlineTimer>
#include <QTimer>

#include "format.h"
#include "host_session.h"
#include "sorted_merge.h"

using nlohmann::json;

namespace dst::gui {

namespace {

double Num(const json& o, const char* k, double dflt) {
  auto it = o.find(k);
  return it != o.end() && it->is_number() ? it->get<double>() : dflt;
}

ProgressModel::Row MakeRow(const QString& host, const QString& array, const char* kind, int leg,
                           const json& p) {
  ProgressModel::Row r;
  r.host = host;
  r.array = array;
  r.kind = QString::fromLatin1(kind);
  r.leg = leg;
  r.key = host + QChar(0x1f) + array + QChar(0x1f) + r.kind + QChar(0x1f) +
          QStringLiteral("%1").arg(leg + 1, 5, 10, QChar('0'));
  r.done = qint64(Num(p, "bytes_done", 0));
  r.total = qint64(Num(p, "bytes_total", 0));
  r.percent = std::clamp(Num(p, "percent", 0), 0.0, 100.0);
  r.rate = std::max(0.0, Num(p, "rate", 0));
  r.eta = Num(p, "eta_seconds", -1);
  if (r.eta < 0 && r.rate > 0 && r.total >= r.done) r.eta = double(r.total - r.done) / r.rate;
  return r;
}

// The running passes of one host's snapshot, sorted by key.
std::vector<ProgressModel::Row> RowsOf(const QString& host, const json& status,
                                       const std::function<bool(const QString&)>& keep_finished) {
  std::vector<ProgressModel::Row> rows;
  auto arrays = status.find("arrays");
  if (arrays == status.end() || !arrays->is_array()) return rows;
  for (const json& a : *arrays) {
    if (!a.is_object()) continue;
    QString name = QString::fromStdString(a.value("name", ""));
    const std::size_t first = rows.size();
    auto progress = a.find("progress");
    if (progress != a.end() && progress->is_array())
      for (const json& p : *progress)
        if (p.is_object() && (p.value("state", "") == "running" || p.value("state", "") == "paused")) {
          rows.push_back(MakeRow(host, name, "resync", p.value("leg", -1), p));
          rows.back().paused = p.value("state", "") == "paused";  // array.pause_resync
        } else if (p.is_object() && p.value("state", "") == "done") {
          ProgressModel::Row r = MakeRow(host, name, "resync", p.value("leg", -1), p);
          if (!keep_finished(r.key)) continue;
          r.finished = true;
          r.percent = 100;
          r.done = r.total;
          r.rate = 0;
          r.eta = 0;
          rows.push_back(std::move(r));
        }
    auto v = a.find("verify");
    if (v != a.end() && v->is_object() && v->value("state", "") == "running")
      rows.push_back(MakeRow(host, name, "verify", -1, *v));
    auto rate = a.find("resync_rate");
    const qint64 limit = rate != a.end() && rate->is_object() ? qint64(Num(*rate, "max", -1)) : -1;
    for (std::size_t i = first; i < rows.size(); ++i) rows[i].limit = limit;
  }
  std::sort(rows.begin(), rows.end(), [](const auto& x, const auto& y) { return x.key < y.key; });
  rows.erase(std::unique(rows.begin(), rows.end(),
                         [](const auto& x, const auto& y) { return x.key == y.key; }),
             rows.end());
  return rows;
}

}  // namespace

ProgressModel::ProgressModel(QObject* parent) : QAbstractTableModel(parent) {}

void ProgressModel::mergeHost(const QString& host, std::vector<Row> want) {
  // This host's rows are one contiguous run of the sorted list.
  const QString prefix = host + QChar(0x1f);
  auto first = std::lower_bound(rows_.begin(), rows_.end(), prefix,
                                [](const Row& r, const QString& k) { return r.key < k; });
  const std::size_t base = std::size_t(first - rows_.begin());
  auto count = [&] {
    std::size_t n = 0;
    while (base + n < rows_.size() && rows_[base + n].key.startsWith(prefix)) ++n;
    return n;
  };
  SortedMerge(
      count, [&](std::size_t i) -> const QString& { return rows_[base + i].key; }, want.size(),
      [&](std::size_t j) -> const QString& { return want[j].key; },
      [&](std::size_t i) {
        beginRemoveRows({}, int(base + i), int(base + i));
        rows_.erase(rows_.begin() + std::ptrdiff_t(base + i));
        endRemoveRows();
      },
      [&](std::size_t i, std::size_t j) {
        beginInsertRows({}, int(base + i), int(base + i));
        want[j].history.push_back(want[j].rate);
        rows_.insert(rows_.begin() + std::ptrdiff_t(base + i), std::move(want[j]));
        endInsertRows();
      },
      [&](std::size_t i, std::size_t j) {
        Row& r = rows_[base + i];
        const Row& w = want[j];
        const bool same = r.done == w.done && r.total == w.total && r.percent == w.percent &&
                          r.rate == w.rate && r.eta == w.eta;
        if (w.finished && !r.finished) {
          r.finished_at_ms = QDeadlineTimer::current().deadline();
          QTimer::singleShot(linger_ms_ + 10, this, &ProgressModel::pruneFinished);
        }
        if (same && r.limit == w.limit && r.paused == w.paused && r.finished == w.finished)
          return;  // the same snapshot again (another object changed): no new sample
        if (!same) {  // a limit change alone is no new sample either
          r.done = w.done, r.total = w.total, r.percent = w.percent, r.rate = w.rate, r.eta = w.eta;
          r.history.push_back(w.rate);
          while (r.history.size() > std::size_t(kHistory)) r.history.pop_front();
        }
        r.limit = w.limit;
        r.paused = w.paused;
        r.finished = w.finished;  // a new pass on the leg replaces a finished row
        emit dataChanged(index(int(base + i), 0), index(int(base + i), kColumnCount - 1));
      });
}

void ProgressModel::setHost(const QString& host, const json& status) {
  mergeHost(host, RowsOf(host, status, [this](const QString& key) { return keepFinished(key); }));
}

bool ProgressModel::keepFinished(const QString& key) const {
  if (linger_ms_ <= 0) return false;
  auto it = std::lower_bound(rows_.begin(), rows_.end(), key, [](const Row& r, const QString& k) { return r.key < k; });
  if (it == rows_.end() || it->key != key) return false;
  return !it->finished || QDeadlineTimer::current().deadline() - it->finished_at_ms < linger_ms_;
}

void ProgressModel::pruneFinished() {
  const qint64 now = QDeadlineTimer::current().deadline();
  for (std::size_t i = rows_.size(); i-- > 0;) {
    if (!rows_[i].finished || now - rows_[i].finished_at_ms < linger_ms_) continue;
    beginRemoveRows({}, int(i), int(i));
    rows_.erase(rows_.begin() + std::ptrdiff_t(i));
    endRemoveRows();
  }
}

void ProgressModel::setHostOnline(const QString& host, bool online) {
  if (!online) mergeHost(host, {});
}

void ProgressModel::attach(HostSession* session) {
  const QString host = session->path();
  if (session->online()) setHost(host, session->snapshot());
  connect(session, &HostSession::snapshotChanged, this, [this, session] {
    if (session->online()) setHost(session->path(), session->snapshot());
  });
  connect(session, &HostSession::onlineChanged, this, [this, session](bool online) {
    if (online)
      setHost(session->path(), session->snapshot());
    else
      setHostOnline(session->path(), false);
  });
  connect(session, &QObject::destroyed, this, [this, host] { removeHost(host); });
}

int ProgressModel::rowCount(const QModelIndex& parent) const {
  return parent.isValid() ? 0 : int(rows_.size());
}

int ProgressModel::columnCount(const QModelIndex& parent) const {
  return parent.isValid() ? 0 : kColumnCount;
}

QVariant ProgressModel::data(const QModelIndex& index, int role) const {
  if (!index.isValid() || index.row() >= int(rows_.size())) return {};
  const Row& r = rows_[std::size_t(index.row())];
  switch (role) {
    case Qt::DisplayRole:
      switch (index.column()) {
        case kHost: return r.host;
        case kArray: return r.array;
        case kLeg: return r.leg < 0 ? QStringLiteral("all") : QString::number(r.leg);
        case kKind: return r.kind == QLatin1String("verify") ? QStringLiteral("verifying")
                           : r.finished                      ? QStringLiteral("done")
                           : r.paused                        ? QStringLiteral("paused")
                                                             : QStringLiteral("resyncing");
        case kPercent: return QStringLiteral("%1 %").arg(r.percent, 0, 'f', 1);
        case kRate: return HumanRate(r.rate);
        case kEta: return HumanDuration(r.eta);
        case kDone: return HumanSize(r.done);
        case kTotal: return HumanSize(r.total);
      }
      return {};
    case RateHistoryRole: {
      QVariantList l;
      for (double v : r.history) l.push_back(v);
      return l;
    }
    case PercentRole: return r.percent;
    case RateRole: return r.rate;
    case EtaSecondsRole: return r.eta;
    case BytesDoneRole: return r.done;
    case BytesTotalRole: return r.total;
    case RateLimitRole: return r.limit;
    default: return {};
  }
}

QVariant ProgressModel::headerData(int section, Qt::Orientation o, int role) const {
  if (o != Qt::Horizontal || role != Qt::DisplayRole) return {};
  static const char* const kNames[] = {"Host", "Array", "Leg",  "Kind", "Progress",
                                       "Rate", "ETA",   "Done", "Total"};
  if (section < 0 || section >= kColumnCount) return {};
  return QString::fromLatin1(kNames[section]);
}

}  // namespace dst::gui
