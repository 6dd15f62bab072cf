// The block-device URI parser (uri.h).
#include "dst/net/uri.h"

#include <sys/un.h>

#include <array>

#include "dst/net/dst_format.h"
#include "dst/net/eth_format.h"
#include "dst/net/nbd_format.h"

namespace dst::net {

namespace {

constexpr std::string_view kDst = "dst://";
constexpr std::string_view kDsts = "dsts://";  // DST inside TLS 1.3 (tls.h)
constexpr std::string_view kEth = "eth://";    // DST over raw Ethernet (eth_transport.h)
constexpr std::string_view kNbd = "nbd://";
constexpr std::string_view kNbdUnix = "nbd+unix://";

bool StartsWith(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }

Status Bad(std::string_view uri, std::string_view why) {
  return Status::InvalidArgument("bad URI \"" + std::string(uri) + "\": " + std::string(why));
}

int HexVal(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

bool PercentDecode(std::string_view in, std::string* out) {
  out->clear();
  for (std::size_t i = 0; i < in.size(); ++i) {
    if (in[i] != '%') {
      out->push_back(in[i]);
      continue;
    }
    if (i + 2 >= in.size()) return false;
    const int h = HexVal(in[i + 1]), l = HexVal(in[i + 2]);
    if (h < 0 || l < 0) return false;
    out->push_back(static_cast<char>(h * 16 + l));
    i += 2;
  }
  return true;
}

// HOST[:PORT] or [V6]:PORT.
Status ParseAuthority(std::string_view uri, std::string_view authority, std::uint16_t default_port,
                      std::string* host_out, std::uint16_t* port_out) {
  std::string_view host, port_str;
  bool has_port = false;
  if (!authority.empty() && authority.front() == '[') {
    const std::size_t close = authority.find(']');
    if (close == std::string_view::npos) return Bad(uri, "unbalanced [");
    host = authority.substr(1, close - 1);
    std::string_view after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':') return Bad(uri, "junk after ]");
      port_str = after.substr(1);
      has_port = true;
    }
  } else {
    const std::size_t colon = authority.find(':');
    host = authority.substr(0, colon);
    if (colon != std::string_view::npos) {
      port_str = authority.substr(colon + 1);
      has_port = true;
    }
  }
  if (host.empty()) return Bad(uri, "empty host");
  if (host.find('@') != std::string_view::npos) return Bad(uri, "user names are not supported");
  for (char c : host)
    if (static_cast<unsigned char>(c) <= 0x20 || static_cast<unsigned char>(c) > 0x7e || c == '/' || c == '[' ||
        c == ']')
      return Bad(uri, "bad character in the host");
  std::uint32_t port = default_port;
  if (has_port) {
    if (port_str.empty() || port_str.size() > 5) return Bad(uri, "bad port (expected 1..65535)");
    port = 0;
    for (char c : port_str) {
      if (c < '0' || c > '9') return Bad(uri, "bad port (expected 1..65535)");
      port = port * 10 + static_cast<std::uint32_t>(c - '0');
    }
    if (port == 0 || port > 65535) return Bad(uri, "bad port (expected 1..65535)");
  }
  host_out->assign(host);
  *port_out = static_cast<std::uint16_t>(port);
  return Status::OK();
}

// A DST export name (§3): 1..255 printable ASCII characters without spaces.
Status CheckDstExportName(std::string_view uri, std::string_view name) {
  if (name.size() > kMaxExportNameLen) return Bad(uri, "export name too long");
  for (char c : name)
    if (static_cast<unsigned char>(c) < 0x21 || static_cast<unsigned char>(c) > 0x7e)
      return Bad(uri, "export name must be printable ASCII without spaces");
  return Status::OK();
}

Status ParseDst(std::string_view uri, BlockUri* u) {
  std::string_view rest = uri.substr(u->tls ? kDsts.size() : kDst.size());
  const std::size_t slash = rest.find('/');
  if (slash == std::string_view::npos) return Bad(uri, "missing export (dst://HOST[:PORT]/EXPORT)");
  DST_RETURN_IF_ERROR(ParseAuthority(uri, rest.substr(0, slash), kDefaultPort, &u->host, &u->port));
  std::string_view name = rest.substr(slash + 1);
  if (name.empty()) return Bad(uri, "missing export (dst://HOST[:PORT]/EXPORT)");
  DST_RETURN_IF_ERROR(CheckDstExportName(uri, name));
  u->export_name.assign(name);
  return Status::OK();
}

Status ParseEth(std::string_view uri, BlockUri* u) {
  std::string_view rest = uri.substr(kEth.size());
  const std::size_t s1 = rest.find('/');
  const std::size_t s2 = s1 == std::string_view::npos ? s1 : rest.find('/', s1 + 1);
  if (s2 == std::string_view::npos) return Bad(uri, "expected eth://IFACE/PEER-MAC/EXPORT");
  const std::string_view iface = rest.substr(0, s1), mac = rest.substr(s1 + 1, s2 - s1 - 1),
                         name = rest.substr(s2 + 1);
  if (iface.empty() || iface.size() > 15) return Bad(uri, "interface name must be 1..15 characters");
  for (char c : iface)
    if (static_cast<unsigned char>(c) < 0x21 || static_cast<unsigned char>(c) > 0x7e || c == ':')
      return Bad(uri, "bad interface name");
  std::array<std::uint8_t, 6> m{};
  if (Status st = ParseMac(mac, &m); !st.ok()) return Bad(uri, st.message());
  if (name.empty()) return Bad(uri, "missing export (eth://IFACE/PEER-MAC/EXPORT)");
  DST_RETURN_IF_ERROR(CheckDstExportName(uri, name));
  u->host.assign(iface);
  u->port = 0;
  u->eth = true;
  u->mac = FormatMac(m.data());
  u->export_name.assign(name);
  return Status::OK();
}

Status ParseNbd(std::string_view uri, BlockUri* u) {
  std::string_view rest = uri.substr(u->tls ? kNbd.size() + 1 : kNbd.size());  // nbds://
  if (rest.find('?') != std::string_view::npos) return Bad(uri, "query parameters are not supported in nbd://");
  const std::size_t slash = rest.find('/');
  DST_RETURN_IF_ERROR(ParseAuthority(uri, rest.substr(0, slash), nbd::kDefaultPort, &u->host, &u->port));
  std::string_view name = slash == std::string_view::npos ? std::string_view() : rest.substr(slash + 1);
  if (!PercentDecode(name, &u->export_name)) return Bad(uri, "bad %-escape");
  if (u->export_name.size() > nbd::kMaxStringLen) return Bad(uri, "export name too long");
  return Status::OK();
}

Status ParseNbdUnix(std::string_view uri, BlockUri* u) {
  std::string_view rest = uri.substr(kNbdUnix.size());
  if (rest.empty() || rest.front() != '/')
    return Bad(uri, "nbd+unix needs an empty host (nbd+unix:///EXPORT?socket=PATH)");
  rest.remove_prefix(1);
  const std::size_t q = rest.find('?');
  if (q == std::string_view::npos) return Bad(uri, "missing ?socket=PATH");
  if (!PercentDecode(rest.substr(0, q), &u->export_name)) return Bad(uri, "bad %-escape");
  std::string_view query = rest.substr(q + 1);
  while (!query.empty()) {
    const std::size_t amp = query.find('&');
    std::string_view kv = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view() : query.substr(amp + 1);
    if (kv.substr(0, 7) != "socket=") return Bad(uri, "unsupported parameter \"" + std::string(kv) + "\"");
    if (!PercentDecode(kv.substr(7), &u->socket)) return Bad(uri, "bad %-escape");
  }
  if (u->socket.empty()) return Bad(uri, "missing ?socket=PATH");
  if (u->export_name.size() > nbd::kMaxStringLen) return Bad(uri, "export name too long");
  if (u->socket.size() >= sizeof(sockaddr_un::sun_path)) return Bad(uri, "socket path too long");
  return Status::OK();
}

}  // namespace

bool HasBlockUriScheme(std::string_view s) {
  return StartsWith(s, kDst) || StartsWith(s, kDsts) || StartsWith(s, kEth) || StartsWith(s, kNbd) || StartsWith(s, kNbdUnix) || StartsWith(s, "nbds://") ||
         StartsWith(s, "nbds+unix://");
}

Status ParseBlockUri(std::string_view uri, BlockUri* out) {
  BlockUri u;
  Status st;
  if (StartsWith(uri, "nbds+unix://")) {
    return Status::NotSupported("NBD over TLS on a Unix socket is not supported: " + std::string(uri));
  } else if (StartsWith(uri, "nbds://")) {  // NBD with STARTTLS (nbd_client_device.h)
    u.scheme = UriScheme::kNbd;
    u.tls = true;
    st = ParseNbd(uri, &u);
  } else if (StartsWith(uri, kDst) || StartsWith(uri, kDsts)) {
    u.scheme = UriScheme::kDst;
    u.tls = StartsWith(uri, kDsts);
    st = ParseDst(uri, &u);
  } else if (StartsWith(uri, kEth)) {
    u.scheme = UriScheme::kDst;
    st = ParseEth(uri, &u);
  } else if (StartsWith(uri, kNbd)) {
    u.scheme = UriScheme::kNbd;
    st = ParseNbd(uri, &u);
  } else if (StartsWith(uri, kNbdUnix)) {
    u.scheme = UriScheme::kNbdUnix;
    st = ParseNbdUnix(uri, &u);
  } else {
    st = Bad(uri, "unknown scheme (expected dst://, dsts://, eth://, nbd:// or nbd+unix://)");
  }
  if (!st.ok()) return st;
  *out = std::move(u);
  return Status::OK();
}

std::string BlockUri::Canonical() const {
  if (scheme == UriScheme::kNbdUnix) return "nbd+unix:///" + export_name + "?socket=" + socket;
  if (eth) return "eth://" + host + "/" + mac + "/" + export_name;
  const std::string h = host.find(':') != std::string::npos ? "[" + host + "]" : host;
  return (scheme == UriScheme::kDst ? (tls ? "dsts://" : "dst://") : (tls ? "nbds://" : "nbd://")) + h + ":" + std::to_string(port) + "/" + export_name;
}

}  // namespace dst::net
