#include "dst/control/control_protocol.h"

#include <algorithm>

namespace dst::control {

using nlohmann::json;

const std::vector<std::string>& Methods() {
  static const std::vector<std::string> kMethods = {
      "status",        "export.add",    "export.list", "export.remove", "volume.import",
      "volume.list",   "volume.remove", "mount",       "unmount",
      // issue 3: arrays
      "array.create", "array.list", "array.remove", "array.add_leg", "array.grow",
      "array.fail_leg", "array.remove_leg", "array.readd_leg", "array.detach_leg",
      "array.set_resync_rate", "array.detail", "array.verify", "apply", "events",
      // issue 9: leg identity (split brain, hand-over)
      "array.resolve", "array.release", "array.import",
      // issue 10: the layer registry (names, keys, leg rules, help)
      "array.layers",
      // issue 10: capabilities
      "hello",
      // issue 11: per-export access lists
      "export.allow",
      // issue 12: staged operations (the GUI's pending list), validated and run as one plan
      "batch",
      // issue 12: pause / resume a mirror's resync (runtime only)
      "array.pause_resync", "array.resume_resync",
      // issue 12: loop devices over the FUSE files (the GUI's attach / detach actions)
      "loop.attach", "loop.detach",
      // issue 13: who exports what on a raw-Ethernet segment
      "eth.discover",
  };
  return kMethods;
}

bool IsKnownMethod(std::string_view method) {
  const auto& m = Methods();
  return std::find(m.begin(), m.end(), method) != m.end();
}

bool IsReadOnlyMethod(std::string_view method) {
  static const char* const kReadOnly[] = {"status",       "hello",       "export.list",
                                          "volume.list",  "array.list",  "array.detail",
                                          "array.layers", "events"};
  for (const char* m : kReadOnly)
    if (method == m) return true;
  return false;
}

bool JsonDepthWithin(std::string_view text, int max_depth) {
  int depth = 0;
  bool in_string = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    if (in_string) {
      if (c == '\\')
        ++i;  // the escaped character cannot end the string
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth) return false;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return true;
}

bool ParseRequest(std::string_view line, Request* req, ErrorInfo* error) {
  error->id = nullptr;
  if (!JsonDepthWithin(line)) {
    error->code = kInvalidRequest;
    error->message = "request nested deeper than " + std::to_string(kMaxJsonDepth) + " levels";
    return false;
  }
  json j = json::parse(line.begin(), line.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    error->code = kParseError;
    error->message = "request is not valid JSON";
    return false;
  }
  if (!j.is_object()) {
    error->code = kInvalidRequest;
    error->message = "request must be a JSON object";
    return false;
  }
  auto id = j.find("id");
  if (id != j.end() && (id->is_number_integer() || id->is_string())) error->id = *id;
  if (id == j.end() || !(id->is_number_integer() || id->is_string())) {
    error->code = kInvalidRequest;
    error->message = id == j.end() ? "missing \"id\"" : "\"id\" must be an integer or a string";
    return false;
  }
  auto method = j.find("method");
  if (method == j.end() || !method->is_string()) {
    error->code = kInvalidRequest;
    error->message = method == j.end() ? "missing \"method\"" : "\"method\" must be a string";
    return false;
  }
  auto params = j.find("params");
  if (params != j.end() && !params->is_object() && !params->is_null()) {
    error->code = kInvalidRequest;
    error->message = "\"params\" must be an object";
    return false;
  }
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() != "id" && it.key() != "method" && it.key() != "params") {
      error->code = kInvalidRequest;
      error->message = "unknown member \"" + it.key() + "\"";
      return false;
    }
  }
  std::string m = method->get<std::string>();
  if (!IsKnownMethod(m)) {
    error->code = kUnknownMethod;
    error->message = "unknown method \"" + m + "\"";
    return false;
  }
  req->id = *id;
  req->method = std::move(m);
  req->params = (params == j.end() || params->is_null()) ? json::object() : *params;
  return true;
}

static std::string Line(const json& j) {
  // Replace invalid UTF-8 instead of throwing: a path with odd bytes must not kill the server.
  std::string s = j.dump(-1, ' ', false, json::error_handler_t::replace);
  s.push_back('\n');
  return s;
}

std::string EncodeRequest(const json& id, std::string_view method, const json& params) {
  return Line(json{{"id", id}, {"method", method}, {"params", params}});
}

std::string EncodeResult(const json& id, const json& result) {
  return Line(json{{"id", id}, {"result", result}});
}

std::string EncodeError(const json& id, std::string_view code, std::string_view message) {
  return Line(json{{"id", id}, {"error", {{"code", code}, {"message", message}}}});
}

std::string EncodeError(const json& id, std::string_view code, std::string_view message,
                        const json& reasons) {
  return Line(json{{"id", id},
                   {"error", {{"code", code}, {"message", message}, {"reasons", reasons}}}});
}

bool ParseReply(std::string_view line, Reply* reply, std::string* why) {
  if (!JsonDepthWithin(line)) {
    *why = "reply nested deeper than " + std::to_string(kMaxJsonDepth) + " levels";
    return false;
  }
  json j = json::parse(line.begin(), line.end(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    *why = "reply is not a JSON object";
    return false;
  }
  reply->id = j.contains("id") ? j["id"] : json();
  auto r = j.find("result");
  auto e = j.find("error");
  if ((r == j.end()) == (e == j.end())) {
    *why = "reply must have exactly one of \"result\" and \"error\"";
    return false;
  }
  if (r != j.end()) {
    reply->ok = true;
    reply->result = *r;
    return true;
  }
  if (!e->is_object() || !e->contains("code") || !(*e)["code"].is_string()) {
    *why = "malformed error object";
    return false;
  }
  reply->ok = false;
  reply->error_code = (*e)["code"].get<std::string>();
  auto m = e->find("message");
  reply->error_message = (m != e->end() && m->is_string()) ? m->get<std::string>() : reply->error_code;
  auto rs = e->find("reasons");
  reply->error_reasons = (rs != e->end() && rs->is_array()) ? *rs : json::array();
  return true;
}

bool Hello::Has(std::string_view feature) const {
  return std::find(features.begin(), features.end(), feature) != features.end();
}

static bool StringList(const json& j, const char* key, std::vector<std::string>* out) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_array()) return false;
  out->clear();
  for (const json& e : *it) {
    if (!e.is_string()) return false;
    out->push_back(e.get<std::string>());
  }
  return true;
}

bool ParseHello(const json& r, Hello* out, std::string* why) {
  auto d = r.is_object() ? r.find("daemon") : r.end();
  if (!r.is_object() || !r.contains("protocol") || !r["protocol"].is_number_integer() ||
      d == r.end() || !d->is_object() || !d->contains("version") || !(*d)["version"].is_string() ||
      !StringList(r, "methods", &out->methods) || !StringList(r, "layers", &out->layers) ||
      !StringList(r, "features", &out->features)) {
    *why = "malformed hello result";
    return false;
  }
  out->protocol = r["protocol"].get<int>();
  out->daemon_version = (*d)["version"].get<std::string>();
  return true;
}

std::string CheckHello(const Reply& reply, std::string_view feature, Hello* out) {
  Hello h;
  std::string why;
  if (!reply.ok && reply.error_code == kUnknownMethod)
    return "dstd is too old for this dstctl (it does not answer \"hello\"); upgrade dstd";
  if (!reply.ok) return reply.error_message;
  if (!ParseHello(reply.result, &h, &why)) return "dstd answered hello oddly: " + why;
  if (h.protocol < kMinDaemonProtocol)
    return "dstd " + h.daemon_version + " speaks control protocol " + std::to_string(h.protocol) +
           ", this dstctl needs " + std::to_string(kMinDaemonProtocol) + " or newer; upgrade dstd";
  if (!feature.empty() && !h.Has(feature))
    return "dstd " + h.daemon_version + " does not support " + std::string(feature) +
           "; upgrade dstd";
  if (out) *out = std::move(h);
  return {};
}

LineSplitter::Next LineSplitter::Pop(std::string* line) {
  if (pos_ > buf_.size()) return Next::kTooLong;  // poisoned
  std::size_t nl = buf_.find('\n', pos_);
  if (nl == std::string::npos) {
    if (buf_.size() - pos_ > max_line_) {
      pos_ = buf_.size() + 1;
      return Next::kTooLong;
    }
    // Compact so the buffer does not grow with consumed lines.
    if (pos_ > 0) {
      buf_.erase(0, pos_);
      pos_ = 0;
    }
    return Next::kNeedMore;
  }
  if (nl - pos_ > max_line_) {
    pos_ = buf_.size() + 1;
    return Next::kTooLong;
  }
  std::size_t end = nl;
  if (end > pos_ && buf_[end - 1] == '\r') --end;
  line->assign(buf_, pos_, end - pos_);
  pos_ = nl + 1;
  return Next::kLine;
}

int ExitCodeForError(std::string_view code) {
  if (code == kNotFound || code == kExists || code == kInvalidParams || code == kReadOnly)
    return kExDataErr;
  if (code == kBusy || code == kTimedOut || code == kShuttingDown) return kExTempFail;
  if (code == kUnavailable) return kExUnavailable;
  if (code == kIoError) return kExIoErr;
  if (code == kPermissionDenied) return kExNoPerm;
  if (code == kNotSupported) return kExDataErr;
  if (code == kParseError || code == kInvalidRequest || code == kUnknownMethod || code == kTooLarge ||
      code == kTooSlow)
    return kExProtocol;
  return kExSoftware;
}

}  // namespace dst::control
