// Access lists: parse, format, match (export_access.h).
#include "dst/net/export_access.h"

namespace dst::net {

Result<AccessRule> ParseAccessRule(std::string_view text) {
  const std::size_t colon = text.rfind(':');
  auto bad = [&](const char* why) {
    return Status::InvalidArgument("bad access rule \"" + std::string(text) + "\": " + why);
  };
  if (colon == std::string_view::npos) return bad("want identity:rw or identity:ro");
  AccessRule r;
  r.identity = std::string(text.substr(0, colon));
  const std::string_view mode = text.substr(colon + 1);
  if (mode == "ro") r.read_only = true;
  else if (mode != "rw") return bad("the mode after ':' must be rw or ro");
  if (r.identity.empty() || r.identity.size() > 255) return bad("the identity must be 1..255 characters");
  for (unsigned char ch : r.identity)
    if (ch < 0x20 || ch > 0x7e) return bad("the identity must be printable ASCII");
  return r;
}

Result<AccessList> ParseAccessList(const std::vector<std::string>& rules) {
  AccessList out;
  for (const auto& s : rules) {
    auto r = ParseAccessRule(s);
    if (!r.ok()) return r.status();
    bool replaced = false;
    for (auto& o : out)
      if (o.identity == r->identity) {
        o = *r;
        replaced = true;
      }
    if (!replaced) out.push_back(std::move(r.value()));
  }
  return out;
}

std::string FormatAccessRule(const AccessRule& r) { return r.identity + (r.read_only ? ":ro" : ":rw"); }

std::vector<std::string> FormatAccessList(const AccessList& l) {
  std::vector<std::string> out;
  for (const auto& r : l) out.push_back(FormatAccessRule(r));
  return out;
}

Access AccessFor(const AccessList& l, std::string_view identity) {
  const AccessRule* any = nullptr;
  for (const auto& r : l) {
    if (identity.empty()) {
      if (r.identity == kAnonymousIdentity) return r.read_only ? Access::kReadOnly : Access::kReadWrite;
      continue;
    }
    if (r.identity == kAnonymousIdentity) continue;  // only for peers that did not authenticate
    if (r.identity == identity) return r.read_only ? Access::kReadOnly : Access::kReadWrite;
    if (r.identity == kAnyIdentity) any = &r;
  }
  if (any) return any->read_only ? Access::kReadOnly : Access::kReadWrite;
  return Access::kNone;
}

}  // namespace dst::net
