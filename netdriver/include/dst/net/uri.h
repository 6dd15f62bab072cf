// One parser for the URIs that name a network block device:
//
//   dst://HOST[:PORT]/EXPORT             DST (docs/protocol.md), default port 7400; EXPORT is
//                                        1..255 printable ASCII characters without spaces
//   dsts://HOST[:PORT]/EXPORT            the same inside TLS 1.3 (net/tls.h)
//   nbd://HOST[:PORT][/EXPORT]           NBD over TCP, default port 10809; EXPORT may be empty
//                                        (the server's default export), %XX decoded
//   nbds://HOST[:PORT][/EXPORT]          NBD with STARTTLS (TLS 1.3, nbd_client_device.h)
//   nbd+unix:///[EXPORT]?socket=/PATH    NBD over a Unix socket (empty host; %XX decoded)
//   eth://IFACE/PEER-MAC/EXPORT          DST over raw Ethernet (docs/protocol.md §12) on local
//                                        interface IFACE to the station PEER-MAC (unicast,
//                                        aa:bb:cc:dd:ee:ff); scheme kDst with eth set, host = IFACE
//
// HOST may be an IPv6 address in brackets ([::1]).  Errors are InvalidArgument, worded
// 'bad URI "URI": REASON' (REASON: "empty host", "bad port", "missing export", "unknown scheme"...);
// nbds+unix:// is NotSupported.  Pure functions: no I/O, any thread.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "dst/status.h"

namespace dst::net {

enum class UriScheme { kDst, kNbd, kNbdUnix };

struct BlockUri {
  UriScheme scheme = UriScheme::kDst;
  std::string host;         // empty for nbd+unix
  std::uint16_t port = 0;   // the default when the URI has none; 0 for nbd+unix
  std::string export_name;  // decoded
  std::string socket;       // nbd+unix only
  bool tls = false;         // dsts://, nbds://
  bool eth = false;         // eth:// (host is the interface, port 0)
  std::string mac;          // eth:// only: the peer's MAC, lower case

  // Canonical form, with the port spelled out ("dst://h:7400/e"), so equal devices compare equal.
  std::string Canonical() const;
};

// Parses `uri` into *out (untouched on error).
Status ParseBlockUri(std::string_view uri, BlockUri* out);

// True when `s` starts with one of the schemes above (or a TLS variant): a URI, not a path.
bool HasBlockUriScheme(std::string_view s);

}  // namespace dst::net
