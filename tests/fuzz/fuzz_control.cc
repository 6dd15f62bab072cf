// Fuzz target: the control protocol (control_protocol.cc, ops.cc).  The input is a byte stream
// on the control socket, split into lines as dstd splits it.  Each line goes through what dstd
// does with a request (ParseRequest, then an operation's typed params) and what dstctl does with
// a reply (ParseReply, hello, refusal reasons, step reports).  A typed operation must survive
// ToParams -> FromParams unchanged: that is checked, not only "does not crash".
#include <cstddef>
#include <cstdint>
#include <string>

#include "dst/control/control_protocol.h"
#include "dst/control/ops.h"

namespace ctl = dst::control;

namespace {

void AsRequest(const std::string& line) {
  ctl::Request req;
  ctl::ErrorInfo err;
  if (!ctl::ParseRequest(line, &req, &err)) {
    (void)ctl::EncodeError(err.id, err.code, err.message);
    return;
  }
  (void)ctl::EncodeRequest(req.id, req.method, req.params);
  if (!ctl::IsOperationMethod(req.method)) return;
  ctl::OpRequest op;
  std::string why;
  if (!ctl::FromParams(req.method, req.params, &op, &why)) {
    (void)ctl::EncodeError(req.id, ctl::kInvalidParams, why);
    return;
  }
  // Round trip: what the typed op encodes must parse back to the same encoding.
  const nlohmann::json params = ctl::ToParams(op);
  ctl::OpRequest again;
  if (ctl::MethodOf(op) != req.method || !ctl::FromParams(req.method, params, &again, &why) ||
      ctl::ToParams(again) != params) {
    __builtin_trap();
  }
}

void AsReply(const std::string& line) {
  ctl::Reply reply;
  std::string why;
  if (!ctl::ParseReply(line, &reply, &why)) return;
  ctl::Hello hello;
  (void)ctl::CheckHello(reply, "nbd", &hello);
  if (reply.ok) {
    ctl::StepReport step;
    if (ctl::FromJson(reply.result, &step)) (void)ctl::ToJson(step);
  }
  if (reply.error_reasons.is_array()) {
    for (const auto& r : reply.error_reasons) {
      ctl::Refusal refusal;
      if (ctl::FromJson(r, &refusal)) (void)ctl::ToJson(refusal);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  ctl::LineSplitter split(64u << 10);
  split.Append(reinterpret_cast<const char*>(data), size);
  std::string line;
  while (split.Pop(&line) == ctl::LineSplitter::Next::kLine) {
    AsRequest(line);
    AsReply(line);
  }
  return 0;
}
