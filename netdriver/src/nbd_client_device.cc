// NbdClientDevice: the self-healing NBD client.  See the header for the state diagram.
//
// Structure follows RemoteDevice (remote_device.cc): Submit() appends to a mutex-protected
// pending list and wakes the connection strand through an eventfd; the strand owns the slot
// table, the waiting FIFO (ordering rules), the receive state machine and the timers.
//
// Request life cycle:
//
//   Submit --> PENDING --kick--> WAITING --free slot--> IN FLIGHT (cookie = gen<<32 | slot)
//     simple reply: header [+ READ data straight into the caller's buffer] --> done()
//     structured reply: chunks (OFFSET_DATA into the buffer, OFFSET_HOLE -> memset 0, ERROR ->
//     remembered) until the chunk with NBD_REPLY_FLAG_DONE --> done()
//   connection lost: in-flight slots stay and are re-sent in submission order after the next
//   handshake; outage > io_timeout, a request older than io_timeout, Close() or an export size
//   change: every request ends with EIO.
//
// Structured READ replies are checked, not summed: each slot keeps the byte ranges its
// OFFSET_DATA / OFFSET_HOLE chunks filled (a small fixed array, merged as they touch; no
// allocation).  A chunk outside the request or overlapping an earlier one, or a DONE with any
// byte not covered exactly once, fails the read with EIO and drops the connection: the server
// is lying, and the read is not re-sent (FailLying).
//
// Connect check (block_device.h, connect_gate.h): after a reconnect's handshake the check READ
// goes out alone in the keepalive probe slot; Pump() sends nothing while checking_.  The
// verdict re-sends the held requests (OK) or fails them with EIO and calls rejected(); then the
// connection is admitted (Admit).
//
// The handshake runs on a connector thread (poll()-bounded, cancellable through an eventfd):
// it is a dozen small messages once per (re)connect, and doing it off the strand keeps the event
// loop free of any wait.  The resulting descriptor is handed to the strand.
#include "dst/net/nbd_client_device.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include <boost/asio/dispatch.hpp>
#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>

#include "connect_gate.h"
#include "dst/net/nbd_format.h"
#include "dst/net/transmitter.h"

namespace dst::net {

namespace asio = boost::asio;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
using namespace nbd;  // wire constants and byte order helpers (nbd_format.h)

namespace {

constexpr std::size_t kPayloadChunk = 256u << 10;  // rx progress (keepalive) granularity
constexpr std::size_t kDrainBufSize = 64u << 10;
constexpr std::uint32_t kMaxIoBytes = 32u << 20;
constexpr std::uint32_t kMaxHandshakeData = 64u << 10;

bool IsWriteType(IoOp op) {
  return op == IoOp::kWrite || op == IoOp::kTrim || op == IoOp::kWriteZeroes;
}

bool Overlaps(std::uint64_t a_off, std::uint64_t a_len, std::uint64_t b_off, std::uint64_t b_len) {
  return a_off < b_off + b_len && b_off < a_off + a_len;
}

std::uint16_t ToNbdCmd(IoOp op) {
  switch (op) {
    case IoOp::kRead: return kCmdRead;
    case IoOp::kWrite: return kCmdWrite;
    case IoOp::kFlush: return kCmdFlush;
    case IoOp::kTrim: return kCmdTrim;
    case IoOp::kWriteZeroes: return kCmdWriteZeroes;
  }
  return kCmdRead;
}

// NBD errno -> Status, without allocating (unknown values count as EINVAL, NBD §3.4).
Status FromNbdError(std::uint32_t err) {
  switch (err) {
    case 0: return Status::OK();
    case kEperm: return Status::ReadOnly();
    case kEio: return Status::IoError();
    case kEnomem:
    case kEnospc: return Status::NoSpace();
    case kEnotsup: return Status::NotSupported();
    case kEshutdown: return Status::Unavailable();
    default: return Status::InvalidArgument();
  }
}

struct NbdReq {
  std::uint16_t flags = 0;
  std::uint16_t type = 0;
  std::uint64_t cookie = 0;
  std::uint64_t offset = 0;
  std::uint32_t length = 0;
};

// NBD §3 request header (28 bytes).  Private so the client does not depend on the server's codec.
void EncodeReq(const NbdReq& r, std::uint8_t* out) {
  Put32(out, kRequestMagic);
  Put16(out + 4, r.flags);
  Put16(out + 6, r.type);
  Put64(out + 8, r.cookie);
  Put64(out + 16, r.offset);
  Put32(out + 24, r.length);
}

void Log(const std::string& what, const std::string& msg) {
  std::fprintf(stderr, "[nbd %s] %s\n", what.c_str(), msg.c_str());
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

// ---- blocking-style handshake on a non-blocking fd, bounded by a deadline --------------------

struct Negotiated {
  std::uint64_t size = 0;
  std::uint16_t tx_flags = 0;
  std::uint32_t min_block = 1;
  std::uint32_t max_payload = kMaxIoBytes;
  bool structured = false;
};

class HsIo {
 public:
  HsIo(int fd, int cancel_fd, Clock::time_point deadline) : fd_(fd), cancel_fd_(cancel_fd), deadline_(deadline) {}

  Status Wait(short events) {
    for (;;) {
      const auto left = std::chrono::duration_cast<milliseconds>(deadline_ - Clock::now()).count();
      if (left <= 0) return Status::TimedOut("NBD handshake timed out");
      pollfd p[2] = {{fd_, events, 0}, {cancel_fd_, POLLIN, 0}};
      const int r = ::poll(p, 2, static_cast<int>(left));
      if (r < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno(errno, "poll");
      }
      if (p[1].revents) return Status::Unavailable("cancelled");
      if (p[0].revents) return Status::OK();
    }
  }

  Status Read(void* buf, std::size_t n) {
    auto* p = static_cast<char*>(buf);
    while (n) {
      const ssize_t r = ::recv(fd_, p, n, 0);
      if (r > 0) {
        p += r;
        n -= static_cast<std::size_t>(r);
        continue;
      }
      if (r == 0) return Status::Unavailable("server closed the connection during the handshake");
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) return Status::FromErrno(errno, "NBD handshake recv");
      DST_RETURN_IF_ERROR(Wait(POLLIN));
    }
    return Status::OK();
  }

  Status Write(const void* buf, std::size_t n) {
    auto* p = static_cast<const char*>(buf);
    while (n) {
      const ssize_t w = ::send(fd_, p, n, MSG_NOSIGNAL);
      if (w > 0) {
        p += w;
        n -= static_cast<std::size_t>(w);
        continue;
      }
      if (w < 0 && errno == EINTR) continue;
      if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return Status::FromErrno(errno, "NBD handshake send");
      DST_RETURN_IF_ERROR(Wait(POLLOUT));
    }
    return Status::OK();
  }

  Status SendOption(std::uint32_t opt, const std::string& data) {
    std::string b(kOptionHeaderSize, '\0');
    auto* p = reinterpret_cast<std::uint8_t*>(b.data());
    Put64(p, kOptMagic);
    Put32(p + 8, opt);
    Put32(p + 12, static_cast<std::uint32_t>(data.size()));
    b += data;
    return Write(b.data(), b.size());
  }

  // Reads one option reply; `data` gets its payload.
  Status ReadReply(std::uint32_t opt, std::uint32_t* type, std::string* data) {
    std::uint8_t h[kOptionReplyHeaderSize];
    DST_RETURN_IF_ERROR(Read(h, sizeof h));
    if (Get64(h) != kOptReplyMagic) return Status::ProtocolError("bad option reply magic");
    if (Get32(h + 8) != opt) return Status::ProtocolError("option reply for another option");
    *type = Get32(h + 12);
    const std::uint32_t len = Get32(h + 16);
    if (len > kMaxHandshakeData) return Status::ProtocolError("option reply too long");
    data->assign(len, '\0');
    return Read(data->data(), len);
  }

 private:
  int fd_;
  int cancel_fd_;
  Clock::time_point deadline_;
};

std::string OptErrorText(std::uint32_t type, const std::string& msg) {
  std::string s;
  switch (type) {
    case kRepErrUnsup: s = "ERR_UNSUP"; break;
    case kRepErrPolicy: s = "ERR_POLICY"; break;
    case kRepErrInvalid: s = "ERR_INVALID"; break;
    case kRepErrPlatform: s = "ERR_PLATFORM"; break;
    case kRepErrTlsReqd: s = "ERR_TLS_REQD"; break;
    case kRepErrUnknown: s = "ERR_UNKNOWN"; break;
    case kRepErrShutdown: s = "ERR_SHUTDOWN"; break;
    case kRepErrBlockSizeReqd: s = "ERR_BLOCK_SIZE_REQD"; break;
    case kRepErrTooBig: s = "ERR_TOO_BIG"; break;
    default: s = "error " + std::to_string(type & ~kRepErrBit); break;
  }
  if (!msg.empty()) s += " (" + msg + ")";
  return s;
}

Status ExportNameFallback(HsIo& io, const NbdClientOptions& o, bool no_zeroes, Negotiated* n) {
  DST_RETURN_IF_ERROR(io.SendOption(kOptExportName, o.export_name));
  std::uint8_t b[8 + 2 + kExportNameReplyZeroes];
  Status st = io.Read(b, no_zeroes ? 10 : sizeof b);
  if (!st.ok())  // the server may only refuse an unknown name by closing the connection
    return Status::NotFound("server closed the connection after EXPORT_NAME \"" + o.export_name +
                            "\" (unknown export?)");
  n->size = Get64(b);
  n->tx_flags = Get16(b + 8);
  return Status::OK();
}

Status Handshake(int fd, int cancel_fd, const NbdClientOptions& o, Clock::time_point deadline, Negotiated* n) {
  HsIo io(fd, cancel_fd, deadline);
  std::uint8_t g[kGreetingSize];
  DST_RETURN_IF_ERROR(io.Read(g, sizeof g));
  if (Get64(g) != kNbdMagic) return Status::ProtocolError("not an NBD server (bad greeting magic)");
  if (Get64(g + 8) != kOptMagic) return Status::ProtocolError("old-style NBD server not supported");
  const std::uint16_t hflags = Get16(g + 16);
  const bool fixed = hflags & kFlagFixedNewstyle;
  const bool no_zeroes = hflags & kFlagNoZeroes;
  std::uint8_t cf[4];
  Put32(cf, (fixed ? kClientFlagFixedNewstyle : 0u) | (no_zeroes ? kClientFlagNoZeroes : 0u));
  DST_RETURN_IF_ERROR(io.Write(cf, 4));
  if (!fixed) return ExportNameFallback(io, o, no_zeroes, n);

  std::uint32_t type = 0;
  std::string data;
  if (o.try_structured_replies) {
    DST_RETURN_IF_ERROR(io.SendOption(kOptStructuredReply, {}));
    for (;;) {
      DST_RETURN_IF_ERROR(io.ReadReply(kOptStructuredReply, &type, &data));
      if (type == kRepAck) { n->structured = true; break; }
      if (type & kRepErrBit) break;  // fall back to simple replies
    }
  }
  if (!o.try_opt_go) return ExportNameFallback(io, o, no_zeroes, n);

  std::string go(4, '\0');
  Put32(reinterpret_cast<std::uint8_t*>(go.data()), static_cast<std::uint32_t>(o.export_name.size()));
  go += o.export_name;
  std::uint8_t tail[4];
  Put16(tail, 1);
  Put16(tail + 2, kInfoBlockSize);
  go.append(reinterpret_cast<char*>(tail), 4);
  DST_RETURN_IF_ERROR(io.SendOption(kOptGo, go));
  bool have_export = false;
  for (;;) {
    DST_RETURN_IF_ERROR(io.ReadReply(kOptGo, &type, &data));
    const auto* d = reinterpret_cast<const std::uint8_t*>(data.data());
    if (type == kRepInfo) {
      if (data.size() < 2) return Status::ProtocolError("short NBD_REP_INFO");
      const std::uint16_t info = Get16(d);
      if (info == kInfoExport) {
        if (data.size() != 12) return Status::ProtocolError("bad NBD_INFO_EXPORT length");
        n->size = Get64(d + 2);
        n->tx_flags = Get16(d + 10);
        have_export = true;
      } else if (info == kInfoBlockSize) {
        if (data.size() != 14) return Status::ProtocolError("bad NBD_INFO_BLOCK_SIZE length");
        n->min_block = Get32(d + 2);
        n->max_payload = Get32(d + 10);
        if (n->min_block == 0 || (n->min_block & (n->min_block - 1)) || n->min_block > (64u << 10))
          return Status::ProtocolError("bad NBD minimum block size");
      }
      continue;  // NAME, DESCRIPTION, unknown: ignored
    }
    if (type == kRepAck) {
      if (!have_export) return Status::ProtocolError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT");
      return Status::OK();
    }
    if (type == kRepErrUnsup) return ExportNameFallback(io, o, no_zeroes, n);  // pre-GO server
    if (type & kRepErrBit) {
      const std::string text = "export \"" + o.export_name + "\" refused: " + OptErrorText(type, data);
      if (type == kRepErrUnknown) return Status::NotFound(text);
      if (type == kRepErrShutdown) return Status::Unavailable(text);
      return Status::InvalidArgument(text);
    }
    // Other reply types are not valid for GO; tolerate and ignore (forward compatibility).
  }
}

// Opens the transport; returns the fd (non-blocking, CLOEXEC) or an error.
Status OpenSocket(const NbdClientOptions& o, int cancel_fd, Clock::time_point deadline, int* out_fd) {
  auto try_connect = [&](int family, const sockaddr* sa, socklen_t len) -> Status {
    const int fd = ::socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return Status::FromErrno(errno, "socket");
    Status st;
    if (::connect(fd, sa, len) < 0) {
      if (errno == EINPROGRESS || errno == EAGAIN) {
        HsIo io(fd, cancel_fd, deadline);
        st = io.Wait(POLLOUT);
        if (st.ok()) {
          int err = 0;
          socklen_t el = sizeof err;
          ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
          if (err) st = Status::FromErrno(err, "connect");
        }
      } else {
        st = Status::FromErrno(errno, "connect");
      }
    }
    if (!st.ok()) {
      ::close(fd);
      return st;
    }
    if (family != AF_UNIX) {
      int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    *out_fd = fd;
    return Status::OK();
  };
  if (!o.unix_socket.empty()) {
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    if (o.unix_socket.size() >= sizeof a.sun_path) return Status::InvalidArgument("socket path too long");
    std::memcpy(a.sun_path, o.unix_socket.data(), o.unix_socket.size());
    return try_connect(AF_UNIX, reinterpret_cast<sockaddr*>(&a), sizeof a);
  }
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const int rc = ::getaddrinfo(o.host.c_str(), std::to_string(o.port).c_str(), &hints, &res);
  if (rc != 0) return Status::Unavailable("resolve " + o.host + ": " + gai_strerror(rc));
  Status st = Status::Unavailable("no address for " + o.host);
  for (addrinfo* ai = res; ai; ai = ai->ai_next) {
    st = try_connect(ai->ai_family, ai->ai_addr, ai->ai_addrlen);
    if (st.ok()) break;
  }
  ::freeaddrinfo(res);
  return st;
}

}  // namespace

// --- URI --------------------------------------------------------------------------------

Status ParseNbdUri(const std::string& uri, NbdClientOptions* opts) {
  std::string_view rest(uri);
  auto starts = [&](std::string_view p) { return rest.substr(0, p.size()) == p; };
  if (starts("nbds://") || starts("nbds+unix://"))
    return Status::NotSupported("NBD over TLS is not supported: " + uri);
  if (starts("nbd+unix://")) {
    rest.remove_prefix(std::string_view("nbd+unix://").size());
    if (rest.empty() || rest.front() != '/')
      return Status::InvalidArgument("nbd+unix URI must have an empty host (nbd+unix:///name?socket=PATH): " + uri);
    rest.remove_prefix(1);
    const std::size_t q = rest.find('?');
    if (q == std::string_view::npos) return Status::InvalidArgument("nbd+unix URI lacks ?socket=PATH: " + uri);
    std::string name, sock;
    if (!PercentDecode(rest.substr(0, q), &name)) return Status::InvalidArgument("bad %-escape in URI: " + uri);
    std::string_view query = rest.substr(q + 1);
    while (!query.empty()) {
      const std::size_t amp = query.find('&');
      std::string_view kv = query.substr(0, amp);
      query = amp == std::string_view::npos ? std::string_view() : query.substr(amp + 1);
      if (kv.substr(0, 7) == "socket=") {
        if (!PercentDecode(kv.substr(7), &sock)) return Status::InvalidArgument("bad %-escape in URI: " + uri);
      } else {
        return Status::InvalidArgument("unsupported URI parameter \"" + std::string(kv) + "\": " + uri);
      }
    }
    if (sock.empty()) return Status::InvalidArgument("nbd+unix URI lacks ?socket=PATH: " + uri);
    if (name.size() > kMaxStringLen) return Status::InvalidArgument("export name too long: " + uri);
    if (sock.size() >= sizeof(sockaddr_un::sun_path)) return Status::InvalidArgument("socket path too long: " + uri);
    opts->unix_socket = sock;
    opts->export_name = name;
    return Status::OK();
  }
  if (!starts("nbd://")) return Status::InvalidArgument("NBD URI must start with nbd:// or nbd+unix://: " + uri);
  rest.remove_prefix(6);
  if (rest.find('?') != std::string_view::npos)
    return Status::InvalidArgument("query parameters are not supported in nbd:// URIs: " + uri);
  const std::size_t slash = rest.find('/');
  std::string_view authority = rest.substr(0, slash);
  std::string_view name = slash == std::string_view::npos ? std::string_view() : rest.substr(slash + 1);
  std::string_view host, port_str;
  bool has_port = false;
  if (!authority.empty() && authority.front() == '[') {
    const std::size_t close = authority.find(']');
    if (close == std::string_view::npos) return Status::InvalidArgument("unbalanced [ in URI: " + uri);
    host = authority.substr(1, close - 1);
    std::string_view after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':') return Status::InvalidArgument("junk after ] in URI: " + uri);
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
  if (host.empty()) return Status::InvalidArgument("NBD URI lacks a host: " + uri);
  if (host.find('@') != std::string_view::npos) return Status::InvalidArgument("user names are not supported: " + uri);
  for (char c : host)
    if (static_cast<unsigned char>(c) <= 0x20 || static_cast<unsigned char>(c) > 0x7e || c == '/' || c == '[' || c == ']')
      return Status::InvalidArgument("bad character in URI host: " + uri);
  std::uint32_t port = nbd::kDefaultPort;
  if (has_port) {
    if (port_str.empty() || port_str.size() > 5) return Status::InvalidArgument("bad port in URI: " + uri);
    port = 0;
    for (char c : port_str) {
      if (c < '0' || c > '9') return Status::InvalidArgument("bad port in URI: " + uri);
      port = port * 10 + static_cast<std::uint32_t>(c - '0');
    }
    if (port == 0 || port > 65535) return Status::InvalidArgument("port out of range in URI: " + uri);
  }
  std::string decoded;
  if (!PercentDecode(name, &decoded)) return Status::InvalidArgument("bad %-escape in URI: " + uri);
  if (decoded.size() > kMaxStringLen) return Status::InvalidArgument("export name too long: " + uri);
  opts->host.assign(host);
  opts->port = static_cast<std::uint16_t>(port);
  opts->unix_socket.clear();
  opts->export_name = decoded;
  return Status::OK();
}

// --- Impl -------------------------------------------------------------------------------

class NbdClientDevice::Impl : public std::enable_shared_from_this<Impl> {
 public:
  enum class State : int { kConnecting, kConnected, kReconnecting, kFailing, kClosed };

  Impl(asio::io_context& io, const NbdClientOptions& opts);
  ~Impl();

  Status Start();
  DeviceInfo Info() const {
    std::lock_guard<std::mutex> l(mu_);
    return info_;
  }
  void Submit(IoRequest* req);
  std::string Describe() const {
    if (!opts_.unix_socket.empty()) return "nbd+unix:///" + opts_.export_name + "?socket=" + opts_.unix_socket;
    return "nbd://" + opts_.host + ":" + std::to_string(opts_.port) + "/" + opts_.export_name;
  }
  NbdClientStats Stats() const;
  void Close();
  bool SetConnectCheck(const ConnectCheck& c) {
    gate_.Set(c);
    return true;
  }
  DeviceHealth Health() const {
    const auto st = static_cast<State>(stat_state_.load(std::memory_order_relaxed));
    return health_.Get(st == State::kConnected, st == State::kClosed);
  }

 private:
  template <class> friend struct ClientCheckHooks;
  struct Slot {
    TxFrame frame;
    Impl* impl = nullptr;
    IoRequest* req = nullptr;  // null: free
    std::uint32_t index = 0;
    std::uint32_t gen = 0;
    std::uint64_t seq = 0;
    Clock::time_point start;
    bool on_wire = false;
    bool tx_queued = false;
    bool early_done = false;
    Status early_status;
    Status chunk_error;        // first error chunk of a structured reply
    // READ bytes filled by structured chunks: disjoint [off, end) ranges relative to the
    // request, adjacent ones merged (in-order chunks stay one range).
    struct Filled { std::uint32_t off, end; };
    static constexpr int kMaxFilled = 16;
    Filled filled[kMaxFilled];
    int nfilled = 0;
    // Records [off, off + len); false if it overlaps an earlier chunk or the table is full.
    bool AddFilled(std::uint32_t off, std::uint32_t len);
    bool FilledExactly(std::uint32_t len) const {
      return nfilled == 1 && filled[0].off == 0 && filled[0].end == len;
    }
  };

  // Connection management (strand only).
  void StartAttempt();
  void OnAttemptDone(std::uint64_t ep, int fd, const Negotiated& n, Status st);
  void AttemptFailed(Status st);
  void OnHandshake(int fd, const Negotiated& n);
  void ConnectionLost(const char* why, Clock::time_point outage_start);
  bool StartCheck();
  void FinishCheck(Status read_status);
  void Admit();
  void FailLying(Slot& s, const char* why);
  void SetState(State s);
  void CloseSockets() {
    boost::system::error_code ec;
    tx_socket_.close(ec);
    socket_.close(ec);
  }
  void ReportFirst(Status st);
  void JoinConnector();

  // Data path (strand only).
  void ArmKick();
  void OnKick(const boost::system::error_code& ec);
  void TakePending();
  void Pump();
  void Dispatch(IoRequest* req);
  void SendSlot(Slot& s);
  void SendProbe();
  void FlushTx();
  void StartRead();
  void OnSimpleHeader(const boost::system::error_code& ec);
  void OnChunkHeader(const boost::system::error_code& ec);
  void OnChunkPrefix(const boost::system::error_code& ec);
  void ReadData(char* dst, std::size_t total, std::size_t done);
  void AfterData();
  void Drain();
  void FinishReply(Slot& s, Status st);
  void CompleteSlot(Slot& s, Status st);
  void FreeSlot(Slot& s);
  void FailAll(const Status& st, bool count_timeouts);
  void ArmTick();
  void OnTick(const boost::system::error_code& ec);
  void DoClose();
  Slot* Lookup(std::uint64_t cookie);
  bool IsProbe(const Slot& s) const { return &s == &slots_.back(); }
  bool Outstanding() const { return on_wire_ > 0 || probe_outstanding_; }
  void Lost(const char* why) { ConnectionLost(why, Clock::now()); }
  static void OnFrameSent(TxFrame* f, bool ok);
  static void OnTxError(void* ctx);

  using Strand = asio::strand<asio::io_context::executor_type>;
  using Proto = asio::generic::stream_protocol;
  asio::io_context& io_;
  const NbdClientOptions opts_;
  Strand strand_;
  asio::basic_stream_socket<Proto, Strand> socket_;  // receive side
  asio::ip::tcp::socket tx_socket_;  // dup() of socket_'s fd for the Transmitter (works for AF_UNIX too)
  asio::basic_waitable_timer<Clock, asio::wait_traits<Clock>, Strand> tick_timer_;
  asio::posix::basic_stream_descriptor<Strand> kick_;
  const milliseconds tick_;

  mutable std::mutex mu_;
  DeviceInfo info_;
  IoRequest* pending_head_ = nullptr;
  IoRequest* pending_tail_ = nullptr;
  bool kick_pending_ = false;
  bool accepting_ = false;
  bool closed_ = false;
  int kick_fd_ = -1;

  std::mutex first_mu_;
  std::condition_variable first_cv_;
  bool first_done_ = false;
  Status first_status_;
  bool close_done_ = false;

  // Connector thread.
  std::thread connector_;
  int cancel_fd_ = -1;  // eventfd: wakes a connector stuck in poll()
  std::mutex conn_mu_;

  // Strand-only state.
  State state_ = State::kConnecting;
  bool initial_ = true;
  Clock::time_point initial_deadline_;
  std::uint64_t epoch_ = 0;
  bool attempt_active_ = false;
  Clock::time_point next_attempt_;
  milliseconds backoff_;
  Clock::time_point outage_start_;
  bool in_outage_ = false;
  Status last_error_;
  bool structured_ = false;
  std::unique_ptr<Transmitter> tx_;
  std::vector<Slot> slots_;  // queue_depth request slots + the keepalive probe slot (last)
  std::vector<std::uint32_t> free_;
  std::vector<std::uint32_t> order_;
  struct Range { std::uint64_t off, len; };
  std::vector<Range> blocked_;
  IoRequest* wait_head_ = nullptr;
  IoRequest* wait_tail_ = nullptr;
  std::uint64_t dispatch_seq_ = 0;  // order in which requests got a slot
  std::uint32_t busy_ = 0;
  std::uint32_t busy_writes_ = 0;
  std::uint32_t on_wire_ = 0;
  Clock::time_point last_rx_;
  Clock::time_point last_probe_;
  bool probe_outstanding_ = false;
  IoRequest probe_req_;
  std::unique_ptr<char[]> probe_buf_;
  // Connect check: runs in the probe slot (probe_outstanding_ keeps probes away meanwhile).
  ConnectGate gate_;
  bool checking_ = false;
  Clock::time_point check_start_;
  std::uint32_t check_cap_ = 0;
  std::unique_ptr<char[]> check_buf_;  // grows once per larger check, never per I/O
  HealthClock health_;
  TxFrame disc_frame_;

  // Receive state.
  std::uint8_t rx_hdr_[kChunkHeaderSize];
  std::uint8_t rx_prefix_[16];
  Slot* rx_slot_ = nullptr;
  std::uint16_t rx_flags_ = 0;
  std::uint16_t rx_type_ = 0;
  std::uint32_t rx_len_ = 0;
  std::uint32_t rx_data_len_ = 0;
  bool rx_simple_ = false;
  std::size_t drain_left_ = 0;
  bool drain_then_finish_ = false;
  std::unique_ptr<char[]> drain_buf_;

  TxStats tx_stats_;
  std::atomic<int> stat_state_{0};
  std::atomic<bool> stat_structured_{false};
  std::atomic<std::uint64_t> reconnects_{0}, resent_{0}, timeouts_{0}, requests_{0}, probes_{0};
  std::atomic<std::uint64_t> bad_replies_{0}, check_failures_{0};
  std::atomic<std::uint32_t> inflight_{0};
};

NbdClientDevice::Impl::Impl(asio::io_context& io, const NbdClientOptions& opts)
    : io_(io),
      opts_(opts),
      strand_(asio::make_strand(io)),
      socket_(strand_),
      tx_socket_(strand_),
      tick_timer_(strand_),
      kick_(strand_),
      tick_(std::clamp<milliseconds>(
          std::min({opts.keepalive_interval / 2, opts.keepalive_timeout / 4, opts.reconnect_min,
                    opts.io_timeout / 8}),
          milliseconds(10), milliseconds(250))),
      backoff_(opts.reconnect_min) {
  const std::uint32_t qd = std::clamp<std::uint32_t>(opts_.queue_depth, 1, 65536);
  slots_.resize(qd + 1);
  free_.reserve(qd);
  order_.reserve(qd);
  blocked_.reserve(qd);
  for (std::uint32_t i = qd + 1; i-- > 0;) {
    slots_[i].index = i;
    slots_[i].impl = this;
    slots_[i].frame.owner = &slots_[i];
    slots_[i].frame.on_sent = &Impl::OnFrameSent;
    slots_[i].frame.header_len = kRequestSize;
    if (i < qd) free_.push_back(i);
  }
  probe_buf_.reset(new char[64u << 10]);
  drain_buf_.reset(new char[kDrainBufSize]);
  disc_frame_.header_len = kRequestSize;
  kick_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  cancel_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
}

NbdClientDevice::Impl::~Impl() {
  JoinConnector();
  boost::system::error_code ec;
  if (kick_.is_open()) kick_.close(ec);
  if (kick_fd_ >= 0) ::close(kick_fd_);
  if (cancel_fd_ >= 0) ::close(cancel_fd_);
}

void NbdClientDevice::Impl::JoinConnector() {
  std::lock_guard<std::mutex> l(conn_mu_);
  if (connector_.joinable() && connector_.get_id() != std::this_thread::get_id()) connector_.join();
}

void NbdClientDevice::Impl::SetState(State s) {
  state_ = s;
  stat_state_.store(static_cast<int>(s), std::memory_order_relaxed);
  std::lock_guard<std::mutex> l(mu_);
  accepting_ = !closed_ && (s == State::kConnected || s == State::kReconnecting);
}

// --- connect -------------------------------------------------------------------------------

Status NbdClientDevice::Impl::Start() {
  if (kick_fd_ < 0 || cancel_fd_ < 0) return Status::FromErrno(errno, "eventfd");
  if (opts_.export_name.size() > kMaxStringLen) return Status::InvalidArgument("export name too long");
  {
    boost::system::error_code ec;
    kick_.assign(::dup(kick_fd_), ec);
    if (ec) return Status::IoError("eventfd assign: " + ec.message());
  }
  auto self = shared_from_this();
  asio::dispatch(strand_, [self] {
    self->initial_deadline_ = Clock::now() + self->opts_.connect_timeout;
    self->ArmKick();
    self->ArmTick();
    self->StartAttempt();
  });
  std::unique_lock<std::mutex> l(first_mu_);
  if (!first_cv_.wait_for(l, opts_.connect_timeout + milliseconds(2000), [&] { return first_done_; }))
    return Status::TimedOut("connecting to " + Describe() + " (is the io_context running?)");
  return first_status_;
}

void NbdClientDevice::Impl::ReportFirst(Status st) {
  std::lock_guard<std::mutex> l(first_mu_);
  if (first_done_) return;
  first_done_ = true;
  first_status_ = std::move(st);
  first_cv_.notify_all();
}

void NbdClientDevice::Impl::StartAttempt() {
  if (state_ == State::kClosed) return;
  JoinConnector();  // the previous connector has posted its result and is exiting
  ++epoch_;
  attempt_active_ = true;
  CloseSockets();
  const std::uint64_t ep = epoch_;
  const auto deadline = Clock::now() + opts_.connect_timeout;
  std::lock_guard<std::mutex> l(conn_mu_);
  // The thread uses `this` only while the Impl is alive: DoClose() and ~Impl() join it.
  connector_ = std::thread([this, ep, deadline] {
    int fd = -1;
    Negotiated n;
    Status st = OpenSocket(opts_, cancel_fd_, deadline, &fd);
    if (st.ok()) {
      st = Handshake(fd, cancel_fd_, opts_, deadline, &n);
      if (!st.ok()) {
        ::close(fd);
        fd = -1;
      }
    }
    auto sp = weak_from_this().lock();
    if (!sp) {  // the device is being destroyed (its destructor joins us)
      if (fd >= 0) ::close(fd);
      return;
    }
    Impl* raw = sp.get();
    asio::post(raw->strand_, [sp = std::move(sp), ep, fd, n, st = std::move(st)]() mutable {
      sp->OnAttemptDone(ep, fd, n, std::move(st));
    });
  });
}

void NbdClientDevice::Impl::OnAttemptDone(std::uint64_t ep, int fd, const Negotiated& n, Status st) {
  if (ep != epoch_ || state_ == State::kClosed) {
    if (fd >= 0) ::close(fd);
    return;
  }
  attempt_active_ = false;
  if (!st.ok()) return AttemptFailed(std::move(st));
  OnHandshake(fd, n);
}

void NbdClientDevice::Impl::AttemptFailed(Status st) {
  ++epoch_;
  attempt_active_ = false;
  CloseSockets();
  const auto now = Clock::now();
  const bool hard = st.code() == Status::Code::kNotFound || st.code() == Status::Code::kProtocolError ||
                    st.code() == Status::Code::kInvalidArgument;
  if (initial_) {
    if (hard || now + backoff_ >= initial_deadline_) {
      ReportFirst(st);
      DoClose();
      return;
    }
  } else if (last_error_.ToString() != st.ToString()) {
    Log(Describe(), "reconnect failed: " + st.ToString());
  }
  if (!initial_) health_.Detail("reconnecting: " + st.ToString());
  last_error_ = std::move(st);
  next_attempt_ = now + backoff_;
  backoff_ = std::min<milliseconds>(backoff_ * 2, opts_.reconnect_max);
}

void NbdClientDevice::Impl::OnHandshake(int fd, const Negotiated& n) {
  DeviceInfo ni;
  ni.size = n.size;
  ni.logical_block_size = std::max<std::uint32_t>(n.min_block, 512);
  std::uint32_t maxp = n.max_payload == 0 ? kMaxIoBytes : std::min(n.max_payload, kMaxIoBytes);
  maxp -= maxp % ni.logical_block_size;
  if (maxp == 0) maxp = ni.logical_block_size;
  ni.max_io_bytes = maxp;
  ni.read_only = n.tx_flags & kTxReadOnly;
  ni.can_flush = n.tx_flags & kTxSendFlush;
  ni.can_fua = n.tx_flags & kTxSendFua;
  ni.can_trim = n.tx_flags & kTxSendTrim;
  ni.can_write_zeroes = n.tx_flags & kTxSendWriteZeroes;

  if (!initial_) {
    DeviceInfo old = Info();
    bool writes_waiting = busy_writes_ > 0 || [&] {
      for (IoRequest* q = wait_head_; q; q = q->link)
        if (IsWriteType(q->op)) return true;
      std::lock_guard<std::mutex> l(mu_);
      for (IoRequest* q = pending_head_; q; q = q->link)
        if (IsWriteType(q->op)) return true;
      return false;
    }();
    const char* why = nullptr;
    if (ni.size != old.size) why = "export size changed";
    else if (ni.read_only && !old.read_only && writes_waiting) why = "write permission lost";
    else if (ni.logical_block_size > old.logical_block_size) why = "block size grew";
    if (why) {
      ::close(fd);
      Log(Describe(), std::string(why) + " across reconnect; failing the device");
      ++epoch_;
      SetState(State::kFailing);
      FailAll(Status::IoError(why), false);
      next_attempt_ = Clock::now() + opts_.reconnect_max;
      return;
    }
    ni.max_io_bytes = std::min(ni.max_io_bytes, old.max_io_bytes);
    ni.logical_block_size = old.logical_block_size;
  }
  boost::system::error_code ec;
  sockaddr_storage ss{};
  socklen_t sl = sizeof ss;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &sl);
  socket_.assign(Proto(ss.ss_family, 0), fd, ec);
  if (ec) {
    ::close(fd);
    return AttemptFailed(Status::IoError("socket assign: " + ec.message()));
  }
  const int dup_fd = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (dup_fd < 0) return AttemptFailed(Status::FromErrno(errno, "dup"));
  // asio only stores the descriptor; the Transmitter uses sendmsg() and a writable-wait, both
  // protocol-agnostic, so an AF_UNIX descriptor works behind the tcp::socket type.
  tx_socket_.assign(asio::ip::tcp::v4(), dup_fd, ec);
  if (ec) {
    ::close(dup_fd);
    return AttemptFailed(Status::IoError("socket assign: " + ec.message()));
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    info_ = ni;
  }
  structured_ = n.structured;
  stat_structured_.store(structured_, std::memory_order_relaxed);
  tx_ = std::make_unique<Transmitter>(tx_socket_, opts_.batching, &tx_stats_);
  tx_->set_error_handler(&Impl::OnTxError, this);
  const bool was_initial = initial_;
  if (!initial_) {
    reconnects_.fetch_add(1, std::memory_order_relaxed);
    Log(Describe(), "reconnected");
  }
  initial_ = false;
  backoff_ = opts_.reconnect_min;
  last_error_ = Status::OK();
  last_rx_ = Clock::now();
  last_probe_ = last_rx_;
  SetState(State::kConnected);
  StartRead();
  if (was_initial) {
    ReportFirst(Status::OK());
    return Admit();
  }
  if (!StartCheck()) Admit();
}

// Re-sends the held requests in submission order, then starts new ones.
void NbdClientDevice::Impl::Admit() {
  if (state_ != State::kConnected) return;
  checking_ = false;
  health_.Up();
  order_.clear();
  for (std::size_t i = 0; i + 1 < slots_.size(); ++i)
    if (slots_[i].req) order_.push_back(static_cast<std::uint32_t>(i));
  std::sort(order_.begin(), order_.end(),
            [this](std::uint32_t a, std::uint32_t b) { return slots_[a].seq < slots_[b].seq; });
  for (std::uint32_t i : order_) SendSlot(slots_[i]);
  resent_.fetch_add(order_.size(), std::memory_order_relaxed);
  Pump();
  FlushTx();
}

bool NbdClientDevice::Impl::StartCheck() {
  const ConnectCheck c = gate_.Begin();
  if (!c.verify) return false;
  checking_ = true;
  const DeviceInfo& info = info_;  // written on this strand only
  const std::uint32_t bs = info.logical_block_size;
  Slot& p = slots_.back();
  if (c.length == 0 || c.length > info.max_io_bytes || c.offset > info.size ||
      c.length > info.size - c.offset || c.offset % bs || c.length % bs) {
    FinishCheck(Status::InvalidArgument("connect check range outside the export or misaligned"));
    return true;
  }
  if (p.tx_queued) {  // restarted before the Transmitter let go of the slot (rare): reconnect
    Lost("connect check restarted while its frame was still queued");
    return true;
  }
  if (check_cap_ < c.length) {
    check_buf_.reset(new char[c.length]);
    check_cap_ = c.length;
  }
  probe_req_ = IoRequest{};
  probe_req_.op = IoOp::kRead;
  probe_req_.offset = c.offset;
  probe_req_.length = c.length;
  probe_req_.data = check_buf_.get();
  p.req = &probe_req_;
  p.early_done = false;
  if (!Outstanding()) last_rx_ = Clock::now();
  probe_outstanding_ = true;
  check_start_ = Clock::now();
  SendSlot(p);
  FlushTx();
  return true;
}

void NbdClientDevice::Impl::FinishCheck(Status read_status) {
  gate_.Finish(ClientCheckHooks<Impl>{this, &Log}, std::move(read_status), check_buf_.get(),
               probe_req_.length);
}

bool NbdClientDevice::Impl::Slot::AddFilled(std::uint32_t off, std::uint32_t len) {
  const std::uint32_t end = off + len;  // the caller checked off + len <= request length
  int at = 0;  // ranges are kept sorted by offset
  while (at < nfilled && filled[at].off < off) ++at;
  if (at > 0 && filled[at - 1].end > off) return false;
  if (at < nfilled && filled[at].off < end) return false;
  const bool join_prev = at > 0 && filled[at - 1].end == off;
  const bool join_next = at < nfilled && filled[at].off == end;
  if (join_prev && join_next) {
    filled[at - 1].end = filled[at].end;
    for (int i = at; i + 1 < nfilled; ++i) filled[i] = filled[i + 1];
    --nfilled;
  } else if (join_prev) {
    filled[at - 1].end = end;
  } else if (join_next) {
    filled[at].off = off;
  } else {
    if (nfilled == kMaxFilled) return false;  // too fragmented to track: refuse, never guess
    for (int i = nfilled; i > at; --i) filled[i] = filled[i - 1];
    filled[at] = {off, end};
    ++nfilled;
  }
  return true;
}

// The server broke the structured-reply rules for this read: the read fails (never re-sent:
// the same server would lie again) and the connection, whose stream can no longer be trusted,
// is replaced.
void NbdClientDevice::Impl::FailLying(Slot& s, const char* why) {
  bad_replies_.fetch_add(1, std::memory_order_relaxed);
  Log(Describe(), std::string("server broke the protocol: ") + why + "; failing the read with EIO");
  Lost(why);
  if (s.req && !IsProbe(s)) CompleteSlot(s, Status::IoError(why));  // last: done() may re-enter
}

void NbdClientDevice::Impl::ConnectionLost(const char* why, Clock::time_point outage_start) {
  if (state_ != State::kConnected) return;
  Log(Describe(), std::string("connection lost: ") + why);
  ++epoch_;
  tx_.reset();
  CloseSockets();
  for (auto& s : slots_) {
    s.on_wire = false;
    s.chunk_error = Status::OK();
    s.nfilled = 0;
  }
  slots_.back().req = nullptr;
  ++slots_.back().gen;
  on_wire_ = 0;
  probe_outstanding_ = false;
  checking_ = false;  // the next connection runs the check again
  rx_slot_ = nullptr;
  if (!in_outage_ || outage_start < outage_start_) outage_start_ = outage_start;
  in_outage_ = true;
  SetState(State::kReconnecting);
  health_.Down(outage_start_, std::string("reconnecting: connection lost: ") + why);
  next_attempt_ = Clock::now();
  backoff_ = opts_.reconnect_min;
}

// --- submit path ---------------------------------------------------------------------------

void NbdClientDevice::Impl::Submit(IoRequest* req) {
  Status st;
  bool kick = false;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!accepting_) {
      st = Status::IoError();
    } else if (req->op == IoOp::kFlush && !info_.can_flush) {
      st = Status::NotSupported();
    } else if (st = ValidateRequest(info_, *req); st.ok()) {
      req->link = nullptr;
      if (pending_tail_) pending_tail_->link = req; else pending_head_ = req;
      pending_tail_ = req;
      if (!kick_pending_) kick = kick_pending_ = true;
    }
  }
  requests_.fetch_add(1, std::memory_order_relaxed);
  if (!st.ok()) {
    req->done(req, std::move(st));
    return;
  }
  if (kick) {
    const std::uint64_t one = 1;
    ssize_t w = ::write(kick_fd_, &one, sizeof one);
    (void)w;
  }
}

void NbdClientDevice::Impl::ArmKick() {
  auto self = shared_from_this();
  kick_.async_wait(asio::posix::descriptor_base::wait_read,
                   [self](const boost::system::error_code& ec) { self->OnKick(ec); });
}

void NbdClientDevice::Impl::OnKick(const boost::system::error_code& ec) {
  if (ec || state_ == State::kClosed) return;
  std::uint64_t v;
  ssize_t r = ::read(kick_fd_, &v, sizeof v);
  (void)r;
  TakePending();
  Pump();
  FlushTx();
  if (state_ != State::kClosed) ArmKick();
}

void NbdClientDevice::Impl::TakePending() {
  IoRequest* head;
  IoRequest* tail;
  {
    std::lock_guard<std::mutex> l(mu_);
    head = pending_head_;
    tail = pending_tail_;
    pending_head_ = pending_tail_ = nullptr;
    kick_pending_ = false;
  }
  if (!head) return;
  if (wait_tail_) wait_tail_->link = head; else wait_head_ = head;
  wait_tail_ = tail;
}

// Same ordering rules as RemoteDevice::Pump: overlapping write-type requests reach the server
// in submission order (one in flight at a time per range), a flush waits for every older
// write-type request, reads pass everything.  Unlike RemoteDevice this never touches the
// caller's IoRequest::scratch (so a caller that wrongly keeps its own data there survives):
// the FIFO order is the submission order, and write-type requests behind a waiting flush wait
// too, so every write in a slot is older than any flush still waiting.
void NbdClientDevice::Impl::Pump() {
  if (state_ != State::kConnected || checking_) return;
  blocked_.clear();
  bool older_write_waiting = false;
  bool flush_waiting = false;
  IoRequest* prev = nullptr;
  IoRequest* r = wait_head_;
  while (r && !free_.empty()) {
    IoRequest* next = r->link;
    bool go = true;
    if (IsWriteType(r->op)) {
      if (flush_waiting) go = false;
      if (go && busy_writes_) {
        for (std::size_t i = 0; i + 1 < slots_.size(); ++i) {
          const Slot& s = slots_[i];
          if (s.req && IsWriteType(s.req->op) && Overlaps(s.req->offset, s.req->length, r->offset, r->length)) {
            go = false;
            break;
          }
        }
      }
      if (go)
        for (const auto& b : blocked_)
          if (Overlaps(b.off, b.len, r->offset, r->length)) { go = false; break; }
      if (!go) {
        older_write_waiting = true;
        if (blocked_.size() == blocked_.capacity()) break;
        blocked_.push_back({r->offset, r->length});
      }
    } else if (r->op == IoOp::kFlush) {
      if (older_write_waiting || busy_writes_) {
        go = false;
        flush_waiting = true;
      }
    }
    if (go) {
      if (prev) prev->link = next; else wait_head_ = next;
      if (wait_tail_ == r) wait_tail_ = prev;
      r->link = nullptr;
      Dispatch(r);
    } else {
      prev = r;
    }
    r = next;
  }
}

void NbdClientDevice::Impl::Dispatch(IoRequest* req) {
  const std::uint32_t i = free_.back();
  free_.pop_back();
  Slot& s = slots_[i];
  s.req = req;
  s.seq = ++dispatch_seq_;
  s.start = Clock::now();
  s.early_done = false;
  ++busy_;
  if (IsWriteType(req->op)) ++busy_writes_;
  inflight_.store(busy_, std::memory_order_relaxed);
  SendSlot(s);
}

void NbdClientDevice::Impl::SendSlot(Slot& s) {
  if (s.tx_queued) return;
  IoRequest* req = s.req;
  NbdReq r;
  r.type = ToNbdCmd(req->op);
  const DeviceInfo& info = info_;  // strand writes info_ only; reading without the lock is safe here
  if ((req->flags & kIoFua) && info.can_fua && req->op != IoOp::kRead && req->op != IoOp::kFlush)
    r.flags |= kCmdFlagFua;
  if (req->op == IoOp::kWriteZeroes && (req->flags & kIoNoUnmap)) r.flags |= kCmdFlagNoHole;
  if (req->op != IoOp::kFlush) {
    r.offset = req->offset;
    r.length = req->length;
  }
  r.cookie = std::uint64_t(s.gen) << 32 | s.index;
  EncodeReq(r, s.frame.header);
  if (req->op == IoOp::kWrite) {
    s.frame.payload = req->data;
    s.frame.payload_len = req->length;
  } else {
    s.frame.payload = nullptr;
    s.frame.payload_len = 0;
  }
  s.chunk_error = Status::OK();
  s.nfilled = 0;
  if (!Outstanding()) last_rx_ = Clock::now();
  s.on_wire = true;
  if (!IsProbe(s)) ++on_wire_;
  s.tx_queued = true;
  tx_->Enqueue(&s.frame);
}

// Keepalive probe: a one-block READ at offset 0 into probe_buf_ (see the header).
void NbdClientDevice::Impl::SendProbe() {
  Slot& p = slots_.back();
  if (probe_outstanding_ || p.tx_queued || !tx_) return;
  const DeviceInfo& info = info_;
  if (info.size < info.logical_block_size) return;  // nothing to read: silence is all we can watch
  probe_req_ = IoRequest{};
  probe_req_.op = IoOp::kRead;
  probe_req_.length = std::min<std::uint32_t>(info.logical_block_size, 64u << 10);
  probe_req_.data = probe_buf_.get();
  p.req = &probe_req_;
  p.early_done = false;
  if (!Outstanding()) last_rx_ = Clock::now();
  probe_outstanding_ = true;
  last_probe_ = Clock::now();
  probes_.fetch_add(1, std::memory_order_relaxed);
  SendSlot(p);
}

void NbdClientDevice::Impl::FlushTx() {
  if (state_ != State::kConnected || !tx_) return;
  if (!tx_->Flush()) Lost("send failed");
}

void NbdClientDevice::Impl::OnFrameSent(TxFrame* f, bool) {
  Slot& s = *static_cast<Slot*>(f->owner);
  s.tx_queued = false;
  if (s.early_done) {
    s.early_done = false;
    s.impl->CompleteSlot(s, std::move(s.early_status));
  }
}

void NbdClientDevice::Impl::OnTxError(void* ctx) {
  auto* self = static_cast<Impl*>(ctx);
  auto sp = self->shared_from_this();
  const std::uint64_t ep = self->epoch_;
  asio::post(self->strand_, [sp, ep] {
    if (ep == sp->epoch_) sp->Lost("send failed");
  });
}

// --- receive path --------------------------------------------------------------------------
//
//   StartRead: 16 bytes --simple magic--> OnSimpleHeader --READ ok--> ReadData --> FinishReply
//                       --structured magic--> +4 bytes --> OnChunkHeader
//        OFFSET_DATA: 8-byte offset --> ReadData into the buffer --> AfterData
//        OFFSET_HOLE: 12 bytes --> memset --> AfterData
//        ERROR*: payload into drain_buf_ --> remember the error --> AfterData
//        NONE / unknown: (drain) --> AfterData
//   AfterData: DONE flag --> FinishReply; otherwise StartRead.

NbdClientDevice::Impl::Slot* NbdClientDevice::Impl::Lookup(std::uint64_t cookie) {
  const std::uint32_t idx = static_cast<std::uint32_t>(cookie);
  const std::uint32_t gen = static_cast<std::uint32_t>(cookie >> 32);
  if (idx >= slots_.size()) return nullptr;
  Slot& s = slots_[idx];
  if (!s.req || s.gen != gen || !s.on_wire) return nullptr;
  return &s;
}

void NbdClientDevice::Impl::StartRead() {
  auto self = shared_from_this();
  const std::uint64_t ep = epoch_;
  asio::async_read(socket_, asio::buffer(rx_hdr_, kSimpleReplySize),
                   [self, ep](const boost::system::error_code& ec, std::size_t) {
                     if (ep != self->epoch_) return;
                     self->OnSimpleHeader(ec);
                   });
}

void NbdClientDevice::Impl::OnSimpleHeader(const boost::system::error_code& ec) {
  if (state_ != State::kConnected) return;
  if (ec) return Lost(ec == asio::error::eof ? "closed by server" : "receive failed");
  last_rx_ = Clock::now();
  in_outage_ = false;
  const std::uint32_t magic = Get32(rx_hdr_);
  if (magic == kStructuredReplyMagic) {
    if (!structured_) return Lost("structured reply without negotiation");
    auto self = shared_from_this();
    const std::uint64_t ep = epoch_;
    asio::async_read(socket_, asio::buffer(rx_hdr_ + kSimpleReplySize, kChunkHeaderSize - kSimpleReplySize),
                     [self, ep](const boost::system::error_code& e, std::size_t) {
                       if (ep != self->epoch_) return;
                       self->OnChunkHeader(e);
                     });
    return;
  }
  if (magic != kSimpleReplyMagic) return Lost("bad reply magic");
  const std::uint32_t err = Get32(rx_hdr_ + 4);
  Slot* s = Lookup(Get64(rx_hdr_ + 8));
  // A simple reply does not say how much data follows, so an unknown cookie desynchronises the
  // stream: only a new connection recovers.
  if (!s) return Lost("simple reply with an unknown cookie");
  rx_slot_ = s;
  rx_simple_ = true;
  if (err == 0 && s->req->op == IoOp::kRead) {
    rx_flags_ = kReplyFlagDone;
    return ReadData(s->req->data, s->req->length, 0);
  }
  rx_slot_ = nullptr;
  if (err == kEshutdown && !IsProbe(*s)) {
    // The server is going away: keep the request for the next connection (soft disconnect).
    s->on_wire = false;
    --on_wire_;
    return Lost("server shutting down (ESHUTDOWN)");
  }
  StartRead();
  FinishReply(*s, FromNbdError(err));
}

void NbdClientDevice::Impl::OnChunkHeader(const boost::system::error_code& ec) {
  if (state_ != State::kConnected) return;
  if (ec) return Lost("receive failed");
  last_rx_ = Clock::now();
  rx_flags_ = Get16(rx_hdr_ + 4);
  rx_type_ = Get16(rx_hdr_ + 6);
  rx_len_ = Get32(rx_hdr_ + 16);
  rx_simple_ = false;
  if (rx_len_ > kMaxPayloadHard + 64) return Lost("oversized reply chunk");
  Slot* s = Lookup(Get64(rx_hdr_ + 8));
  rx_slot_ = s;
  if (!s) {  // late reply for an earlier use of a slot: drain it
    drain_left_ = rx_len_;
    drain_then_finish_ = false;
    if (drain_left_) return Drain();
    return StartRead();
  }
  const bool is_read = s->req->op == IoOp::kRead;
  switch (rx_type_) {
    case kChunkNone:
      if (rx_len_ != 0 || !(rx_flags_ & kReplyFlagDone)) return Lost("bad NONE chunk");
      return AfterData();
    case kChunkOffsetData:
      if (!is_read || rx_len_ < 9) return Lost("bad OFFSET_DATA chunk");
      [[fallthrough]];
    case kChunkOffsetHole: {
      if (rx_type_ == kChunkOffsetHole && (!is_read || rx_len_ != 12)) return Lost("bad OFFSET_HOLE chunk");
      auto self = shared_from_this();
      const std::uint64_t ep = epoch_;
      const std::size_t n = rx_type_ == kChunkOffsetHole ? 12 : 8;
      asio::async_read(socket_, asio::buffer(rx_prefix_, n),
                       [self, ep](const boost::system::error_code& e, std::size_t) {
                         if (ep != self->epoch_) return;
                         self->OnChunkPrefix(e);
                       });
      return;
    }
    default:
      // ERROR, ERROR_OFFSET, BLOCK_STATUS (never requested) and unknown types: read the payload
      // into the drain buffer; errors are remembered, anything else fails the request.
      if (rx_len_ > kDrainBufSize) return Lost("oversized reply chunk");
      drain_left_ = rx_len_;
      drain_then_finish_ = true;
      if (drain_left_) return Drain();
      return AfterData();
  }
}

void NbdClientDevice::Impl::OnChunkPrefix(const boost::system::error_code& ec) {
  if (state_ != State::kConnected) return;
  if (ec) return Lost("receive failed");
  last_rx_ = Clock::now();
  Slot& s = *rx_slot_;
  const std::uint64_t off = Get64(rx_prefix_);
  const std::uint64_t len = rx_type_ == kChunkOffsetHole ? Get32(rx_prefix_ + 8) : rx_len_ - 8;
  const IoRequest& q = *s.req;
  if (off < q.offset || len > q.length || off - q.offset > q.length - len)
    return FailLying(s, "reply chunk outside the request");
  if (len == 0 || !s.AddFilled(static_cast<std::uint32_t>(off - q.offset), static_cast<std::uint32_t>(len)))
    return FailLying(s, "reply chunk overlaps an earlier one");
  char* dst = q.data + (off - q.offset);
  if (rx_type_ == kChunkOffsetHole) {
    std::memset(dst, 0, len);
    return AfterData();
  }
  ReadData(dst, len, 0);
}

void NbdClientDevice::Impl::ReadData(char* dst, std::size_t total, std::size_t done) {
  const std::size_t n = std::min(kPayloadChunk, total - done);
  auto self = shared_from_this();
  const std::uint64_t ep = epoch_;
  asio::async_read(socket_, asio::buffer(dst + done, n),
                   [self, ep, dst, total, done](const boost::system::error_code& ec, std::size_t got) {
                     if (ep != self->epoch_ || self->state_ != State::kConnected) return;
                     if (ec) return self->Lost("receive failed");
                     self->last_rx_ = Clock::now();
                     if (done + got < total) return self->ReadData(dst, total, done + got);
                     self->AfterData();
                   });
}

void NbdClientDevice::Impl::AfterData() {
  Slot* s = rx_slot_;
  rx_slot_ = nullptr;
  if (s && !rx_simple_ && (rx_type_ & 0x8000)) {  // error chunk: payload is in drain_buf_
    if (s->chunk_error.ok()) {
      const std::uint32_t err = rx_len_ >= 4 ? Get32(reinterpret_cast<std::uint8_t*>(drain_buf_.get())) : kEio;
      s->chunk_error = FromNbdError(err == 0 ? kEio : err);
    }
  } else if (s && !rx_simple_ && rx_type_ != kChunkNone && rx_type_ != kChunkOffsetData &&
             rx_type_ != kChunkOffsetHole) {
    if (s->chunk_error.ok()) s->chunk_error = Status::IoError();  // unexpected chunk type
  }
  if (s && (rx_flags_ & kReplyFlagDone) && s->chunk_error.ok() && !rx_simple_ &&
      s->req->op == IoOp::kRead && !s->FilledExactly(s->req->length))
    return FailLying(*s, "structured reply did not fill every byte of the read");
  StartRead();
  if (s && (rx_flags_ & kReplyFlagDone)) {
    Status st = s->chunk_error;
    if (rx_simple_ && s->req->op == IoOp::kRead) st = Status::OK();
    FinishReply(*s, std::move(st));
  }
}

void NbdClientDevice::Impl::Drain() {
  const std::size_t n = std::min(drain_left_, kDrainBufSize);
  auto self = shared_from_this();
  const std::uint64_t ep = epoch_;
  // For an error chunk (drain_then_finish_) the whole payload fits and lands at the start.
  asio::async_read(socket_, asio::buffer(drain_buf_.get(), n),
                   [self, ep](const boost::system::error_code& ec, std::size_t got) {
                     if (ep != self->epoch_ || self->state_ != State::kConnected) return;
                     if (ec) return self->Lost("receive failed");
                     self->last_rx_ = Clock::now();
                     self->drain_left_ -= got;
                     if (self->drain_left_) return self->Drain();
                     if (self->drain_then_finish_) return self->AfterData();
                     self->StartRead();
                   });
}

void NbdClientDevice::Impl::FinishReply(Slot& s, Status st) {
  if (IsProbe(s)) {
    s.on_wire = false;
    probe_outstanding_ = false;
    if (!s.tx_queued) {  // else OnFrameSent clears it; the slot is reused only when idle
      s.req = nullptr;
      ++s.gen;
    }
    if (checking_) FinishCheck(std::move(st));  // the probe slot carried the connect check
    return;
  }
  CompleteSlot(s, std::move(st));
  Pump();
  FlushTx();
}

void NbdClientDevice::Impl::CompleteSlot(Slot& s, Status st) {
  if (IsProbe(s)) {
    s.req = nullptr;
    ++s.gen;
    return;
  }
  if (s.on_wire) {
    s.on_wire = false;
    --on_wire_;
  }
  if (s.tx_queued) {
    s.early_done = true;
    s.early_status = std::move(st);
    return;
  }
  IoRequest* req = s.req;
  FreeSlot(s);
  req->done(req, std::move(st));
}

void NbdClientDevice::Impl::FreeSlot(Slot& s) {
  if (IsWriteType(s.req->op)) --busy_writes_;
  --busy_;
  inflight_.store(busy_, std::memory_order_relaxed);
  s.req = nullptr;
  ++s.gen;
  free_.push_back(s.index);
}

void NbdClientDevice::Impl::FailAll(const Status& st, bool count_timeouts) {
  IoRequest* head = nullptr;
  IoRequest* tail = nullptr;
  auto append = [&](IoRequest* r) {
    r->link = nullptr;
    if (tail) tail->link = r; else head = r;
    tail = r;
  };
  order_.clear();
  for (std::size_t i = 0; i + 1 < slots_.size(); ++i) {
    const Slot& s = slots_[i];
    if (s.req && !s.tx_queued && &s != rx_slot_) order_.push_back(static_cast<std::uint32_t>(i));
  }
  std::sort(order_.begin(), order_.end(),
            [this](std::uint32_t a, std::uint32_t b) { return slots_[a].seq < slots_[b].seq; });
  for (std::uint32_t i : order_) {
    Slot& s = slots_[i];
    if (s.on_wire) {
      s.on_wire = false;
      --on_wire_;
    }
    IoRequest* r = s.req;
    FreeSlot(s);
    append(r);
  }
  TakePending();
  for (IoRequest* r = wait_head_; r;) {
    IoRequest* next = r->link;
    append(r);
    r = next;
  }
  wait_head_ = wait_tail_ = nullptr;
  if (count_timeouts) {
    std::uint64_t n = 0;
    for (IoRequest* r = head; r; r = r->link) ++n;
    timeouts_.fetch_add(n, std::memory_order_relaxed);
  }
  for (IoRequest* r = head; r;) {
    IoRequest* next = r->link;
    r->done(r, st);
    r = next;
  }
}

// --- timers --------------------------------------------------------------------------------

void NbdClientDevice::Impl::ArmTick() {
  tick_timer_.expires_after(tick_);
  auto self = shared_from_this();
  tick_timer_.async_wait([self](const boost::system::error_code& ec) { self->OnTick(ec); });
}

void NbdClientDevice::Impl::OnTick(const boost::system::error_code& ec) {
  if (ec == asio::error::operation_aborted || state_ == State::kClosed) return;
  const auto now = Clock::now();
  switch (state_) {
    case State::kConnected: {
      if (Outstanding() && now - last_rx_ >= opts_.keepalive_timeout) {
        ConnectionLost("keepalive timeout", last_rx_);
        break;
      }
      if (now - last_rx_ >= opts_.keepalive_interval && now - last_probe_ >= opts_.keepalive_interval) {
        SendProbe();
        FlushTx();
        if (state_ != State::kConnected) break;
      }
      bool stuck = checking_ && now - check_start_ >= opts_.io_timeout;
      for (std::size_t i = 0; i + 1 < slots_.size(); ++i) {
        const Slot& s = slots_[i];
        if (s.req && s.on_wire && now - s.start >= opts_.io_timeout) {
          stuck = true;
          break;
        }
      }
      if (stuck) {
        // Drop the connection before failing, so nothing more is read into the callers' buffers.
        ConnectionLost("request exceeded io_timeout", now);
        Log(Describe(), "request exceeded io_timeout: failing requests with EIO");
        SetState(State::kFailing);
        FailAll(Status::IoError(), true);
        break;
      }
      Pump();
      FlushTx();
      break;
    }
    case State::kConnecting:
    case State::kReconnecting:
    case State::kFailing: {
      if (state_ == State::kReconnecting && now - outage_start_ >= opts_.io_timeout) {
        Log(Describe(), "outage longer than io_timeout: failing requests with EIO");
        SetState(State::kFailing);
        FailAll(Status::IoError(), true);
        if (state_ == State::kClosed) return;
      }
      if (!attempt_active_ && now >= next_attempt_) StartAttempt();
      break;
    }
    case State::kClosed:
      return;
  }
  if (state_ != State::kClosed) ArmTick();
}

// --- close ---------------------------------------------------------------------------------

void NbdClientDevice::Impl::Close() {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (closed_) {
      if (io_.stopped()) JoinConnector();
      return;
    }
    closed_ = true;
    accepting_ = false;
  }
  if (strand_.running_in_this_thread() || io_.stopped()) {
    DoClose();
    return;
  }
  auto self = shared_from_this();
  asio::post(strand_, [self] {
    self->DoClose();
    std::lock_guard<std::mutex> l(self->first_mu_);
    self->close_done_ = true;
    self->first_cv_.notify_all();
  });
  std::unique_lock<std::mutex> l(first_mu_);
  first_cv_.wait_for(l, std::chrono::seconds(5), [&] { return close_done_; });
}

void NbdClientDevice::Impl::DoClose() {
  if (state_ == State::kClosed) return;
  {
    std::lock_guard<std::mutex> l(mu_);
    closed_ = true;
  }
  if (state_ == State::kConnected && tx_) {  // polite goodbye; best effort, never waits
    NbdReq r;
    r.type = kCmdDisc;
    EncodeReq(r, disc_frame_.header);
    tx_->Enqueue(&disc_frame_);
    tx_->Flush();
  }
  ++epoch_;
  SetState(State::kClosed);
  health_.Down(Clock::now(), "closed");
  checking_ = false;
  const std::uint64_t one = 1;
  ssize_t w = ::write(cancel_fd_, &one, sizeof one);  // wake a connector stuck in poll()
  (void)w;
  JoinConnector();
  boost::system::error_code ec;
  tx_.reset();
  CloseSockets();
  tick_timer_.cancel();
  kick_.cancel(ec);
  rx_slot_ = nullptr;
  FailAll(Status::IoError("device closed"), false);
}

NbdClientStats NbdClientDevice::Impl::Stats() const {
  NbdClientStats st;
  switch (static_cast<State>(stat_state_.load(std::memory_order_relaxed))) {
    case State::kConnecting: st.state = "connecting"; break;
    case State::kConnected: st.state = "connected"; break;
    case State::kReconnecting: st.state = "reconnecting"; break;
    case State::kFailing: st.state = "failing"; break;
    case State::kClosed: st.state = "closed"; break;
  }
  st.structured_replies = stat_structured_.load(std::memory_order_relaxed);
  st.reconnects = reconnects_.load(std::memory_order_relaxed);
  st.resent = resent_.load(std::memory_order_relaxed);
  st.timeouts = timeouts_.load(std::memory_order_relaxed);
  st.probes = probes_.load(std::memory_order_relaxed);
  st.bad_replies = bad_replies_.load(std::memory_order_relaxed);
  st.check_failures = check_failures_.load(std::memory_order_relaxed);
  st.inflight = inflight_.load(std::memory_order_relaxed);
  st.requests = requests_.load(std::memory_order_relaxed);
  st.frames_sent = tx_stats_.frames.load(std::memory_order_relaxed);
  st.send_calls = tx_stats_.syscalls.load(std::memory_order_relaxed);
  st.frames_per_call = tx_stats_.FramesPerCall();
  return st;
}

// --- public wrapper --------------------------------------------------------------------------

Result<std::shared_ptr<NbdClientDevice>> NbdClientDevice::Connect(asio::io_context& io,
                                                                  const NbdClientOptions& opts) {
  if (io.get_executor().running_in_this_thread())
    return Status::InvalidArgument("NbdClientDevice::Connect called on an io_context thread");
  if (opts.queue_depth == 0) return Status::InvalidArgument("queue_depth must be > 0");
  auto impl = std::make_shared<Impl>(io, opts);
  Status st = impl->Start();
  if (!st.ok()) {
    impl->Close();
    return st;
  }
  return std::shared_ptr<NbdClientDevice>(new NbdClientDevice(std::move(impl)));
}

NbdClientDevice::NbdClientDevice(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
NbdClientDevice::~NbdClientDevice() { impl_->Close(); }
DeviceInfo NbdClientDevice::Info() const { return impl_->Info(); }
void NbdClientDevice::Submit(IoRequest* req) { impl_->Submit(req); }
std::string NbdClientDevice::Describe() const { return impl_->Describe(); }
NbdClientStats NbdClientDevice::Stats() const { return impl_->Stats(); }
void NbdClientDevice::Close() { impl_->Close(); }
bool NbdClientDevice::SetConnectCheck(const ConnectCheck& check) { return impl_->SetConnectCheck(check); }
DeviceHealth NbdClientDevice::Health() const { return impl_->Health(); }

}  // namespace dst::net
