// Per-export access lists (docs/security.md "Default deny"): which authenticated peers may use an
// export, each read-write or read-only.
//
// A rule is "identity:rw" or "identity:ro".  The identity is what the transport authenticated
// (Transport::identity(): a TLS PSK identity or the certificate's subject CN), or one of:
//   anonymous  a peer that did not authenticate (plaintext on loopback, or insecure = true).
//              Only this rule admits such a peer; an authenticated identity never matches it.
//   *          any authenticated identity (never an anonymous peer).
// A rule naming the identity itself wins over "*".  No matching rule: no access.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "dst/status.h"

namespace dst::net {

inline constexpr std::string_view kAnonymousIdentity = "anonymous";
inline constexpr std::string_view kAnyIdentity = "*";

// Ordered: more access compares greater (ServerCore::SetAccess relies on it).
enum class Access { kNone, kReadOnly, kReadWrite };

struct AccessRule {
  std::string identity;
  bool read_only = false;
  bool operator==(const AccessRule&) const = default;
};
using AccessList = std::vector<AccessRule>;

// "name:rw" / "name:ro".  The name is 1..255 printable ASCII characters (it may contain ':'; the
// mode is after the last one).  InvalidArgument naming the bad rule otherwise.
Result<AccessRule> ParseAccessRule(std::string_view text);
// Parses every rule; a later rule for the same identity replaces the earlier one.
Result<AccessList> ParseAccessList(const std::vector<std::string>& rules);
std::string FormatAccessRule(const AccessRule& r);  // "name:rw"
std::vector<std::string> FormatAccessList(const AccessList& l);

// What `identity` may do ("" = an unauthenticated peer).
Access AccessFor(const AccessList& l, std::string_view identity);
// The name an identity has in log lines and errors: "anonymous" for "".
inline std::string_view IdentityName(std::string_view identity) {
  return identity.empty() ? kAnonymousIdentity : identity;
}

}  // namespace dst::net
