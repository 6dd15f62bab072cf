#include "drop_mapper.h"

namespace dst::gui {

namespace {

bool Is(const TopologyNode* n, const char* kind) { return n && n->kind == QLatin1String(kind); }

// The target is the bare canvas or a host's box.
bool IsEmptySpace(const TopologyGraph& g, const QString& target) {
  return target.isEmpty() || Is(g.node(target), "host");
}

nlohmann::json Op(const char* method, nlohmann::json params) {
  return {{"method", method}, {"params", std::move(params)}};
}

MappedDrop Refuse(const QString& why) { return {{}, nullptr, why}; }

// The array's level: the first word of its info column ("mirror, mounted at ...").
QString LevelOf(const TopologyNode* array) { return array->info.section(',', 0, 0).trimmed(); }

// What the engine's dry run cannot see of a dst:// leg (it learns size and mode only when the
// step connects): the exporting host's status says both, so a drop that cannot work is refused
// here, with the engine's reason codes.  Borderline sizes go on to the engine (a leg also holds
// the array's metadata, which only the engine counts).
QString CheckExportLeg(const TopologyNode* e, const TopologyNode* array) {
  if (LevelOf(array) != QLatin1String("mirror")) return {};
  if (e->state.contains(QLatin1String("read-only")))
    return QStringLiteral("export %1 is read-only: a mirror writes every leg (read_only_leg)").arg(e->name);
  if (e->size >= 0 && array->size > 0 && e->size < array->size)
    return QStringLiteral("export %1 (%2 bytes) is smaller than mirror %3 (%4 bytes of data) (does_not_fit)")
        .arg(e->name).arg(e->size).arg(array->name).arg(array->size);
  return {};
}

}  // namespace

QString DefaultCreateHost(const QString& source) {
  QString host, object;
  TopologyGraph::SplitKey(source, &host, &object);
  return host;
}

QString ExportUri(const TopologyGraph& g, const QString& export_key, QString* why) {
  const TopologyNode* e = g.node(export_key);
  const TopologyNode* h = e ? g.node(e->host) : nullptr;
  QString listen = h ? h->spec : QString();
  const int colon = listen.lastIndexOf(':');
  if (!e || colon < 0) {
    *why = QStringLiteral("host %1 has no listen address to import %2 from")
               .arg(e ? e->host : export_key, e ? e->name : QString());
    return {};
  }
  QString addr = listen.left(colon);
  if (addr.isEmpty() || addr == QLatin1String("0.0.0.0")) addr = QStringLiteral("127.0.0.1");
  if (addr == QLatin1String("::") || addr == QLatin1String("[::]")) addr = QStringLiteral("[::1]");
  if (addr.contains(':') && !addr.startsWith('[')) addr = '[' + addr + ']';
  return QStringLiteral("dst://%1:%2/%3").arg(addr, listen.mid(colon + 1), e->name);
}

DropKind ClassifyDrop(const TopologyGraph& g, const QString& source, const QString& target) {
  const TopologyNode* s = g.node(source);
  const TopologyNode* t = target.isEmpty() ? nullptr : g.node(target);
  if (!s || source == target || (!target.isEmpty() && !t)) return DropKind::kRefused;
  if (Is(t, "array")) {
    if (Is(s, "export")) return DropKind::kAddLeg;
    if ((Is(s, "volume") || Is(s, "array")) && s->host == t->host) return DropKind::kStack;
    return DropKind::kRefused;
  }
  if (!IsEmptySpace(g, target)) return DropKind::kRefused;
  if (Is(s, "export")) return DropKind::kCreateArray;
  if (Is(s, "leg")) return DropKind::kLegOut;
  return DropKind::kRefused;
}

MappedDrop MapDrop(const TopologyGraph& g, const QString& source, const QString& target,
                   const DropChoices& c) {
  const TopologyNode* s = g.node(source);
  const TopologyNode* t = target.isEmpty() ? nullptr : g.node(target);
  QString why;
  switch (ClassifyDrop(g, source, target)) {
    case DropKind::kAddLeg: {
      if (const QString bad = CheckExportLeg(s, t); !bad.isEmpty()) return Refuse(bad);
      const QString uri = ExportUri(g, source, &why);
      if (uri.isEmpty()) return Refuse(why);
      return {t->host, Op("array.add_leg", {{"name", t->name.toStdString()}, {"leg", uri.toStdString()}}), {}};
    }
    case DropKind::kStack:
      return {t->host, Op("array.add_leg", {{"name", t->name.toStdString()},
                                            {"leg", (s->kind + ':' + s->name).toStdString()}}), {}};
    case DropKind::kCreateArray: {
      if (c.level.isEmpty() || c.name.isEmpty()) return Refuse(QStringLiteral("an array needs a level and a name"));
      const QString host = c.host.isEmpty() ? s->host : c.host;
      if (!g.node(host)) return Refuse(QStringLiteral("no host %1").arg(host));
      nlohmann::json legs = nlohmann::json::array();
      for (const QString& key : c.sources.isEmpty() ? QStringList{source} : c.sources) {
        if (!Is(g.node(key), "export")) return Refuse(QStringLiteral("%1 is not an export").arg(key));
        const QString uri = ExportUri(g, key, &why);
        if (uri.isEmpty()) return Refuse(why);
        legs.push_back(uri.toStdString());
      }
      return {host, Op("array.create", {{"name", c.name.toStdString()}, {"level", c.level.toStdString()},
                                        {"legs", legs}}), {}};
    }
    case DropKind::kLegOut:
      return {s->host, Op(c.remove_leg ? "array.remove_leg" : "array.detach_leg",
                          {{"name", s->array.toStdString()}, {"slot", s->slot}}), {}};
    case DropKind::kRefused:
      break;
  }
  if (!s) return Refuse(QStringLiteral("%1 is gone").arg(source));
  if (Is(t, "array") && (Is(s, "volume") || Is(s, "array")))
    return Refuse(QStringLiteral("%1 %2 is on another host: export it to stack it").arg(s->kind, s->name));
  if (Is(t, "array") && Is(s, "leg"))
    return Refuse(QStringLiteral("a leg moves by detaching it first (drag it to the empty canvas)"));
  return Refuse(QStringLiteral("dropping %1 %2 there does nothing").arg(s->kind, s->name));
}

}  // namespace dst::gui
