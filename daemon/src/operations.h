// Typed operations (issue 10 item 4), in the spirit of kpmcore's Operation/Job split: every
// change dstd makes to its exports, volumes, arrays and mount is an Operation built from a
// request struct (dst/control/ops.h).  One code path per change: the single-object RPCs
// (array.create, export.add, ...) and `apply` (dry run or not) all go
//
//   request --MakeOperation--> Operation --Validate--> refusals (data) --> error reply, nothing changed
//                                   |                     (none)
//                                   +--Plan--> typed steps --Apply--> per-step report
//                                                (dry run stops here)   (done / failed / not run;
//                                                                       stops at the first error)
//
// Rules (as kpmcore's Operation header):
//  * Validate and Plan change nothing; only the steps' run() does.
//  * Validate reads the live state minus what an apply plan removes before this operation and
//    plus what it creates (PlanContext), so a whole plan is checked before its first step.
//  * What cannot be known in advance (a remote peer that is down, a leg that turns out too small
//    once connected) fails at its step.
//  * Everything here blocks (stat, SQLite, connects): call it on a worker thread, never on an io
//    thread.
#pragma once

#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "dst/control/ops.h"
#include "dst/daemon/config.h"
#include "dst/status.h"

namespace dst::daemon {

class Daemon;

// What an apply plan changes before the operation being validated: objects it removes first and
// objects it creates ("export:N", "volume:N", "array:N"), and leg slots it takes out of arrays.
struct PlanContext {
  std::set<std::string> gone, created;
  std::map<std::string, std::set<int>> legs_gone;  // array name -> slots
  // A batch (docs/control.md `batch`) also records, for the operations after each one: the
  // arrays it creates (their config as planned so far, so a later add-leg can be checked), and
  // the leg specs, paths and "array:N" / "volume:N" sources it gives an owner (-> that owner).
  std::map<std::string, ArrayConfig> arrays;
  std::map<std::string, std::string> taken;
};

struct Step {
  control::PlanStep info;
  std::function<Status()> run;  // blocking
};

class Operation {
 public:
  virtual ~Operation() = default;
  // Refusal reasons; empty: the operation may run.
  virtual std::vector<control::Refusal> Validate(const PlanContext& ctx) = 0;
  // The steps that carry it out, in order.
  virtual std::vector<Step> Plan() = 0;
  // The single-object RPC's result once every step is done (the object's JSON).
  virtual nlohmann::json Result() { return nlohmann::json::object(); }
  // "array:N", "export:N" or "volume:N" when it creates that object, else "".
  virtual std::string Creates() const { return {}; }
  // Records in *ctx what it will have changed, for the operations after it in a batch.
  virtual void Planned(PlanContext* ctx) const { (void)ctx; }
};

// REQUIRES: `d` outlives the operation.
std::unique_ptr<Operation> MakeOperation(Daemon& d, control::OpRequest req);
// The apply planner's operations from the config file's objects (every key the file sets, not
// only those the control requests carry), and its remove-leg, which takes an in-service leg out
// of service (fail) first.
std::unique_ptr<Operation> MakeCreateArray(Daemon& d, ArrayConfig cfg);
std::unique_ptr<Operation> MakeAddExport(Daemon& d, ExportConfig e);
std::unique_ptr<Operation> MakeImportVolume(Daemon& d, VolumeConfig c);
std::unique_ptr<Operation> MakeRetireLeg(Daemon& d, std::string array, int slot);

// "64K", "10M", "1G" or bytes: sizes and rates in step descriptions.
std::string AmountText(std::uint64_t bytes);

// Runs the steps in order and stops at the first that fails; every step is reported (the ones
// after the failure as not run).  `progress` sees each step's report as it finishes.
struct ApplyOutcome {
  std::vector<control::StepReport> steps;
  std::size_t done = 0;
  Status error;  // the failed step's
};
ApplyOutcome Apply(std::vector<Step>& steps,
                   const std::function<void(const control::StepReport&)>& progress = {});

// The top-level error of a refused operation: the first refusal's code and message (so a
// single-object RPC answers as it always did), all reasons in "reasons".
struct RefusalError {
  std::string code, message;
  nlohmann::json reasons = nlohmann::json::array();
};
RefusalError DescribeRefusals(const std::vector<control::Refusal>& refusals);

}  // namespace dst::daemon
