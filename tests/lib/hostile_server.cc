#include "hostile_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace dst::test {

namespace nb = net::nbd;

namespace {
constexpr int kPollMs = 20;  // how often a blocked helper looks at the stop flag
}

// --- raw bytes -------------------------------------------------------------------------------

bool HostilePeer::Read(void* buf, std::size_t n) {
  auto* p = static_cast<char*>(buf);
  while (n > 0) {
    if (stop_->load()) return false;
    pollfd pfd{fd_, POLLIN, 0};
    const int r = ::poll(&pfd, 1, kPollMs);
    if (r < 0 && errno != EINTR) return false;
    if (r <= 0) continue;
    const ssize_t got = ::recv(fd_, p, n, 0);
    if (got == 0) return false;
    if (got < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return false;
    }
    p += got;
    n -= static_cast<std::size_t>(got);
    read_ += static_cast<std::uint64_t>(got);
  }
  return true;
}

bool HostilePeer::Write(std::string_view bytes) {
  const char* p = bytes.data();
  std::size_t n = bytes.size();
  while (n > 0) {
    if (stop_->load()) return false;
    pollfd pfd{fd_, POLLOUT, 0};
    const int r = ::poll(&pfd, 1, kPollMs);
    if (r < 0 && errno != EINTR) return false;
    if (r <= 0) continue;
    const ssize_t w = ::send(fd_, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return false;
    }
    p += w;
    n -= static_cast<std::size_t>(w);
  }
  return true;
}

void HostilePeer::Hold() {
  char sink[4096];
  while (!stop_->load()) {
    pollfd pfd{fd_, POLLIN, 0};
    if (::poll(&pfd, 1, kPollMs) <= 0) continue;
    const ssize_t got = ::recv(fd_, sink, sizeof sink, 0);
    if (got == 0 || (got < 0 && errno != EINTR && errno != EAGAIN)) return;
  }
}

bool HostilePeer::WaitClosed(int ms) {
  char sink[4096];
  for (int waited = 0; waited < ms && !stop_->load(); waited += kPollMs) {
    pollfd pfd{fd_, POLLIN, 0};
    if (::poll(&pfd, 1, kPollMs) <= 0) continue;
    const ssize_t got = ::recv(fd_, sink, sizeof sink, 0);
    if (got == 0 || (got < 0 && errno != EINTR && errno != EAGAIN)) return true;
  }
  return false;
}

// --- DST -------------------------------------------------------------------------------------

bool HostilePeer::DstHello(const net::HelloReply& reply, net::HelloRequest* got) {
  std::uint8_t hb[net::kHeaderSize];
  net::Header h;
  if (!Read(hb, sizeof hb) || !net::DecodeHeader(hb, &h).ok() || h.command() != net::Cmd::kHello) return false;
  std::string body(h.length, '\0');
  if (!Read(body.data(), body.size())) return false;
  net::HelloRequest req;
  if (!net::DecodeHelloRequest(reinterpret_cast<const std::uint8_t*>(body.data()), body.size(), &req).ok())
    return false;
  if (got) *got = req;
  std::uint8_t rb[net::kHelloReplySize];
  net::EncodeHelloReply(reply, rb, sizeof rb);
  net::Header rh;
  rh.cmd = static_cast<std::uint16_t>(net::Cmd::kHello) | net::kReplyBit;
  rh.length = net::kHelloReplySize;
  rh.id = h.id;
  return DstFrame(rh, std::string_view(reinterpret_cast<const char*>(rb), sizeof rb));
}

bool HostilePeer::DstReadRequest(net::Header* h) {
  std::uint8_t hb[net::kHeaderSize];
  if (!Read(hb, sizeof hb) || !net::DecodeHeader(hb, h).ok()) return false;
  if (!net::HasPayload(*h) || h->length == 0) return true;
  std::string payload(h->length, '\0');
  return Read(payload.data(), payload.size());
}

bool HostilePeer::DstReply(const net::Header& req, std::uint32_t status, std::string_view payload,
                           std::int64_t length) {
  net::Header r;
  r.cmd = req.cmd | net::kReplyBit;
  r.status = status;
  r.id = req.id;
  r.offset = req.offset;
  r.length = length >= 0 ? static_cast<std::uint32_t>(length)
                         : (req.command() == net::Cmd::kRead && status == 0 ? static_cast<std::uint32_t>(payload.size())
                                                                             : req.length);
  return DstFrame(r, payload);
}

bool HostilePeer::DstFrame(const net::Header& h, std::string_view payload) {
  std::uint8_t hb[net::kHeaderSize];
  net::EncodeHeader(h, hb);
  std::string out(reinterpret_cast<const char*>(hb), sizeof hb);
  out.append(payload);
  return Write(out);
}

// --- NBD -------------------------------------------------------------------------------------

bool HostilePeer::NbdGreet(std::uint16_t flags) {
  std::uint8_t g[nb::kGreetingSize];
  nb::EncodeGreeting(flags, g);
  if (!Write(std::string_view(reinterpret_cast<const char*>(g), sizeof g))) return false;
  std::uint8_t cf[4];
  return Read(cf, sizeof cf);
}

bool HostilePeer::NbdReadOption(std::uint32_t* opt, std::string* data) {
  std::uint8_t h[nb::kOptionHeaderSize];
  nb::OptionHeader oh;
  if (!Read(h, sizeof h) || !nb::DecodeOptionHeader(h, &oh).ok() || oh.length > (1u << 20)) return false;
  *opt = oh.option;
  data->assign(oh.length, '\0');
  return Read(data->data(), data->size());
}

bool HostilePeer::NbdOptReply(std::uint32_t opt, std::uint32_t type, std::string_view data) {
  std::string out;
  nb::AppendOptionReply(&out, opt, type, data);
  return Write(out);
}

bool HostilePeer::NbdHandshake(std::uint64_t size, bool structured, std::uint16_t tx_flags) {
  if (!NbdGreet()) return false;
  for (;;) {
    std::uint32_t opt = 0;
    std::string data;
    if (!NbdReadOption(&opt, &data)) return false;
    if (opt == nb::kOptStructuredReply) {
      if (!NbdOptReply(opt, structured ? nb::kRepAck : nb::kRepErrUnsup)) return false;
    } else if (opt == nb::kOptGo) {
      return NbdOptReply(opt, nb::kRepInfo, nb::InfoExportPayload(size, tx_flags)) && NbdOptReply(opt, nb::kRepAck);
    } else if (!NbdOptReply(opt, nb::kRepErrUnsup)) {
      return false;
    }
  }
}

bool HostilePeer::NbdReadRequest(nb::Request* r) {
  std::uint8_t b[nb::kRequestSize];
  if (!Read(b, sizeof b) || !nb::DecodeRequest(b, r).ok()) return false;
  if (!nb::RequestHasPayload(*r) || r->length == 0) return true;
  std::string payload(r->length, '\0');
  return Read(payload.data(), payload.size());
}

bool HostilePeer::NbdSimple(std::uint64_t cookie, std::uint32_t error, std::string_view data) {
  std::uint8_t h[nb::kSimpleReplySize];
  nb::EncodeSimpleReply(error, cookie, h);
  std::string out(reinterpret_cast<const char*>(h), sizeof h);
  out.append(data);
  return Write(out);
}

bool HostilePeer::NbdChunk(std::uint64_t cookie, std::uint16_t flags, std::uint16_t type, std::string_view payload) {
  std::uint8_t h[nb::kChunkHeaderSize];
  nb::EncodeChunkHeader(flags, type, cookie, static_cast<std::uint32_t>(payload.size()), h);
  std::string out(reinterpret_cast<const char*>(h), sizeof h);
  out.append(payload);
  return Write(out);
}

bool HostilePeer::NbdData(std::uint64_t cookie, std::uint16_t flags, std::uint64_t offset, std::string_view data) {
  std::string payload(8, '\0');
  nb::Put64(reinterpret_cast<std::uint8_t*>(payload.data()), offset);
  payload.append(data);
  return NbdChunk(cookie, flags, nb::kChunkOffsetData, payload);
}

// --- server ----------------------------------------------------------------------------------

HostileServer::HostileServer(Script script) : script_(std::move(script)) {
  listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
    socklen_t len = sizeof a;
    ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    ::listen(listen_fd_, 16);
  }
  accept_thread_ = std::thread([this] { AcceptLoop(); });
}

HostileServer::~HostileServer() {
  stop_ = true;
  accept_thread_.join();
  ::close(listen_fd_);
  std::lock_guard<std::mutex> l(mu_);
  for (auto& t : conn_threads_) t.join();
}

void HostileServer::AcceptLoop() {
  while (!stop_.load()) {
    pollfd pfd{listen_fd_, POLLIN, 0};
    if (::poll(&pfd, 1, kPollMs) <= 0) continue;
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    const int n = connections_++;
    std::lock_guard<std::mutex> l(mu_);
    conn_threads_.emplace_back([this, fd, n] {
      HostilePeer peer(fd, &stop_);
      script_(peer, n);
      ::close(fd);
    });
  }
}

net::HelloReply DstExport(std::uint64_t size) {
  net::HelloReply r;
  r.export_flags = net::kExportCanFlush | net::kExportCanTrim | net::kExportCanWriteZeroes;
  r.size = size;
  r.block_size = 512;
  r.max_payload = 1u << 20;
  r.permissions = net::kPermRead | net::kPermWrite;
  return r;
}

std::string Pattern(std::uint64_t off, std::size_t len) {
  std::string s(len, '\0');
  for (std::size_t i = 0; i < len; ++i) {
    const std::uint64_t x = (off + i) * 0x9E3779B97F4A7C15ull;
    s[i] = static_cast<char>(x >> 56);
  }
  return s;
}

}  // namespace dst::test
