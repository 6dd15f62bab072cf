// Typed operations of the control protocol: one request struct per change, the refusal reasons
// an engine gives instead of running it, and the steps of its plan.  dstctl, the tests and the
// GUI build these; dstd's engine (daemon/src/operations.h) validates, plans and applies them.
// The wire form is the `params` object of the method each struct belongs to (ToParams /
// FromParams below; docs/architecture.md "Operations").
//
// Plain data: no engine types, no Status (this library links only nlohmann-json and fmt).
// Every function here is thread-safe (no shared state).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

namespace dst::control {

// --- Requests -------------------------------------------------------------------------------
// Sizes and rates are kept as the operator wrote them ("64K", "10M" or a byte count); the engine
// parses them.  Empty = the default.

struct ArrayCreateOp {  // array.create
  std::string name, level;
  std::vector<std::string> legs;
  std::string region_size, resync_rate_min, resync_rate_max;
  std::map<std::string, std::string> params;  // the layer's own keys (dst/layer.h), as given
  bool assume_clean = false;
  std::optional<bool> write_intent;
  bool force = false;  // over legs carrying another array's header
};
struct ArrayRemoveOp {  // array.remove
  std::string name;
};
struct LegAddOp {  // array.add_leg, array.grow (grow: append to a linear)
  std::string array, leg;
  bool grow = false;
};
enum class LegAction { kFail, kRemove, kReAdd, kDetach };
struct LegChangeOp {  // array.fail_leg / remove_leg / readd_leg / detach_leg
  std::string array;
  LegAction action = LegAction::kFail;
  int slot = -1;
  std::string leg;     // readd: another leg spec for the slot ("" = the slot's own)
  bool force = false;  // also the last up-to-date leg / an up-to-date leg for remove
};
struct ExportAddOp {  // export.add: exactly one of path, array, volume
  std::string name, path, array, volume, size;
  bool read_only = false, direct_io = false, grow = false;
  std::vector<std::string> allow;  // "identity:rw" / "identity:ro"; empty: nobody may connect
};
struct ExportAllowOp {  // export.allow: replaces the access list of an export
  std::string name;
  std::vector<std::string> allow;
};
struct ExportRemoveOp {  // export.remove
  std::string name;
};
struct VolumeImportOp {  // volume.import
  std::string name, uri;
  std::optional<std::uint32_t> queue_depth, io_timeout, keepalive_timeout;
};
struct VolumeRemoveOp {  // volume.remove
  std::string name;
};
struct MountOp {  // mount
  std::string path;
};
struct SetResyncRateOp {  // array.set_resync_rate (at least one of min, max)
  std::string array, min, max;
};
struct VerifyOp {  // array.verify
  std::string array;
  bool repair = false, cancel = false;
};
struct PauseResyncOp {  // array.pause_resync (pause) / array.resume_resync (!pause)
  std::string array;
  bool pause = true;
};

using OpRequest = std::variant<ArrayCreateOp, ArrayRemoveOp, LegAddOp, LegChangeOp, ExportAddOp,
                               ExportAllowOp, ExportRemoveOp, VolumeImportOp, VolumeRemoveOp, MountOp,
                               SetResyncRateOp, VerifyOp, PauseResyncOp>;

// The control method of a request, and its params.
std::string MethodOf(const OpRequest& op);
nlohmann::json ToParams(const OpRequest& op);
// True when `method` is one of the operations above.
bool IsOperationMethod(std::string_view method);
// Parses the params of an operation method.  False with *why (an invalid_params message) when a
// member is missing or has the wrong type; values are checked by the engine's Validate.
bool FromParams(std::string_view method, const nlohmann::json& params, OpRequest* op,
                std::string* why);

// --- Refusals -------------------------------------------------------------------------------
// Why an engine refuses an operation before changing anything.
enum class RefusalCode {
  kInvalid,        // a value is wrong (bad name, unknown level, wrong leg count, ...)
  kUnknownName,    // no such array / volume / export / leg slot
  kExists,         // the name is taken
  kBusy,           // the object is in use (open file, connected clients, running operation)
  kLegInUse,       // a leg is already used by another owner (export, volume, array)
  kCycle,          // arrays would be stacked in a cycle
  kDoesNotFit,     // a leg is smaller than the array needs
  kReadOnlyLeg,    // a read-only device cannot be a mirror leg
  kLastGoodLeg,    // would fail, detach or remove the last up-to-date leg
  kNotAssembled,   // the array is not running (its legs are missing)
  kOutsideRoots,   // a path outside [daemon] export_roots (docs/security.md)
};
const char* RefusalCodeName(RefusalCode c);  // "does_not_fit", ...
bool ParseRefusalCode(std::string_view s, RefusalCode* c);
// The control error code ("busy", "not_found", ...) a refusal is reported under.
const char* ErrorCodeForRefusal(RefusalCode c);

struct Refusal {
  RefusalCode code = RefusalCode::kInvalid;
  std::string object;  // what was refused: "array:m", "leg:/x.img", "export:e1", "array:m/slot:1"
  std::string owner;   // who holds it, when someone does: "export:e1", "array:m/slot:0", ...
  std::string message; // one human sentence
};
nlohmann::json ToJson(const Refusal& r);
bool FromJson(const nlohmann::json& j, Refusal* r);

// --- Plans ----------------------------------------------------------------------------------
enum class StepKind {
  kCreateArray, kRemoveArray, kAddLeg, kGrow, kFailLeg, kRemoveLeg, kReAddLeg, kDetachLeg,
  kAddExport, kRemoveExport, kImportVolume, kRemoveVolume, kMount, kSetResyncRate, kVerify,
  kAllowExport, kPauseResync, kResumeResync,
};
const char* StepKindName(StepKind k);  // "create_array", ...
bool ParseStepKind(std::string_view s, StepKind* k);

struct PlanStep {
  StepKind kind = StepKind::kCreateArray;
  std::string object;       // "array:m", "export:e1", ...
  std::string description;  // what it does, as a dstctl command line ("array add-leg m /x")
};

enum class StepStatus { kNotRun, kDone, kFailed };
const char* StepStatusName(StepStatus s);  // "not run", "done", "failed"

struct StepReport {
  PlanStep step;
  StepStatus status = StepStatus::kNotRun;
  std::string error, error_code;  // kFailed
};
// {"kind","object","step" (the description),"status"[,"error","error_code"]}
nlohmann::json ToJson(const StepReport& r);
bool FromJson(const nlohmann::json& j, StepReport* r);

}  // namespace dst::control
