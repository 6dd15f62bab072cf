// DropMapper: a canvas drop (source node, target node) as the typed operation it stages
// (issue 12 item 5), headless so every case is unit-tested.  Targets are an array's key, a host
// key (its box) or "" (the bare canvas):
//
//   export (any host) -> array        array.add_leg on the array's host, leg = the export's
//                                     dst://LISTEN/EXPORT (the exporting host's daemon.listen);
//                                     refused here when its host's status shows it read-only
//                                     or smaller than a mirror's data (the engine's dry run
//                                     learns a remote leg's size and mode only at the step)
//   volume/array -> array (same host) array.add_leg, leg = "volume:NAME" / "array:NAME" (stack)
//   exports -> host box or canvas     array.create on the chosen host (level, name asked)
//   leg -> host box or canvas         array.detach_leg or array.remove_leg (asked)
//
// Anything else is refused here with a reason; what this lets through the engine still
// validates (PendingOpsModel::stage).
#pragma once

#include <QString>
#include <QStringList>
#include <nlohmann/json.hpp>

#include "topology_graph.h"

namespace dst::gui {

enum class DropKind { kRefused, kAddLeg, kStack, kCreateArray, kLegOut };

// What a drop means before asking anything.
DropKind ClassifyDrop(const TopologyGraph& g, const QString& source, const QString& target);

// The answers for the kinds that ask: create-array (level, name, host, more exports) and
// leg-out (detach or remove).
struct DropChoices {
  QString level, name, host;
  QStringList sources;  // every export of a create (the dropped one first); empty: just it
  bool remove_leg = false;
};

struct MappedDrop {
  QString host;  // whose dstd runs `op` (its socket path); empty when refused
  nlohmann::json op;
  QString refusal;
  bool ok() const { return refusal.isEmpty(); }
};

MappedDrop MapDrop(const TopologyGraph& g, const QString& source, const QString& target,
                   const DropChoices& choices = {});

// "dst://ADDR:PORT/EXPORT" for an export node, from its host's listen address; a wildcard
// listener is named by loopback (every host the GUI shows is reached on this machine).  Empty
// with *why set when the host has no listen address.
QString ExportUri(const TopologyGraph& g, const QString& export_key, QString* why);

// The host a create defaults to: the first source's.
QString DefaultCreateHost(const QString& source);

}  // namespace dst::gui
