// RemoteDevice: the DST protocol half of the self-healing client.  The reconnecting machinery
// (slots, ordering, re-send, keepalive, backoff, io_timeout, connect check, health) is
// ClientCore (client_core.h); this file is the handshake, the request encoding and the reply
// decoding.
//
// Reply handling:
//
//   header --PING reply for the keepalive--> core Finish (progress only while nothing waits)
//          --READ ok, right length--> payload into the caller's buffer (or the check buffer)
//                --digest ok--> Finish(OK) | --digest mismatch--> Reissue (§4.1)
//          --WRITE EBADMSG with digests--> Reissue (the exporter saw a corrupted payload)
//          --ESHUTDOWN--> Requeue: re-sent on the next connection
//          --other status--> Finish(mapped status)
//          --late or unknown id--> payload drained
//          --wrong READ length, malformed frame, HELLO--> connection lost, no progress
//
// Poison requests (docs/protocol.md §8.4): a request the server cannot even parse must not be
// re-sent forever, since each reconnect succeeds and so the outage clock never runs out.
//
//   IN FLIGHT --error reply (not ESHUTDOWN)--> done(mapped status)          never re-sent
//   IN FLIGHT --EPROTO frame naming its id--> connection lost, done(EIO)    never re-sent
//   IN FLIGHT --connection lost before the server answered any request on it, and this request
//              was the first one sent on it--> suspect; 3rd time in a row --> done(EIO)
//              (the core's poison backstop, enabled for DST)
//
// The server fences a reconnecting session (docs/protocol.md §6.3, session_id in HELLO), so an
// old re-sent write can never land after a newer one (the original DST's defect D4).
#include "dst/net/remote_device.h"

#include <atomic>
#include <random>

#include "client_core.h"
#include "dst/net/codec.h"
#include "dst/net/uri.h"

namespace dst::net {

namespace {

Cmd ToCmd(IoOp op) {
  switch (op) {
    case IoOp::kRead: return Cmd::kRead;
    case IoOp::kWrite: return Cmd::kWrite;
    case IoOp::kFlush: return Cmd::kFlush;
    case IoOp::kTrim: return Cmd::kTrim;
    case IoOp::kWriteZeroes: return Cmd::kWriteZeroes;
  }
  return Cmd::kRead;
}

std::uint64_t RandomSessionId() {
  std::random_device rd;
  std::uint64_t v = 0;
  while (v == 0) v = (std::uint64_t(rd()) << 32) ^ rd();
  return v;
}

constexpr std::uint64_t kNegotiatedDigest = 1;  // Negotiated::features bit

}  // namespace

// --- protocol ------------------------------------------------------------------------------

class RemoteDevice::Protocol final : public ClientProtocol {
 public:
  explicit Protocol(const RemoteOptions& opts) : opts_(opts), session_id_(RandomSessionId()) {}

  std::atomic<std::uint64_t> digest_errors_{0};
  std::atomic<bool> stat_digest_{false};

 std::string Describe() const override {
    if (!opts_.uri.empty()) return opts_.uri;
    return "dst://" + opts_.host + ":" + std::to_string(opts_.port) + "/" + opts_.export_name;
  }
  Task<Status> Handshake(HandshakeIo& io, Negotiated* n, bool* hard) override;
  void OnConnection(std::uint64_t features) override {
    digest_ = features & kNegotiatedDigest;
    stat_digest_.store(digest_, std::memory_order_relaxed);
  }
  void Encode(ClientSlot& s, ControlUse use) override;
  RxStep Parse(RxBuffer& rx) override;
  RxStep OnRest() override { return ReadDone(); }
  bool CheckDataOk(const char* data, std::uint32_t len) override { return DigestOk(data, len); }

 private:
  RxStep OnReply(RxBuffer& rx, ClientSlot* s);
  RxStep ReadDone();
  void OnServerDisconnect();
  bool DigestOk(const char* data, std::size_t len);
  RxStep Drain(RxBuffer& rx);

  const RemoteOptions opts_;
  const std::uint64_t session_id_;
  bool digest_ = false;         // payload digests negotiated on this connection (§4.1)
  std::uint8_t rx_hdr_[kHeaderSize];
  Header rx_;
  bool rx_has_digest_ = false;  // the READ reply being received carried one
  std::uint64_t rx_digest_ = 0;
  ClientSlot* rx_slot_ = nullptr;  // READ whose payload is being received
};

// HELLO (a task on the strand): a protocol refusal is hard (a first connect fails at once),
// an I/O error is not (retried until connect_timeout).
Task<Status> RemoteDevice::Protocol::Handshake(HandshakeIo& io, Negotiated* n, bool* hard) {
  std::uint8_t buf[kHeaderSize + kMaxHelloPayload];
  HelloRequest hr;
  hr.session_id = session_id_;
  hr.features = opts_.checksum ? kFeatureDigestXxh3 : 0;
  hr.export_name = opts_.export_name;
  const std::size_t len = EncodeHelloRequest(hr, buf + kHeaderSize, kMaxHelloPayload);
  Header h;
  h.cmd = static_cast<std::uint16_t>(Cmd::kHello);
  h.length = static_cast<std::uint32_t>(len);
  EncodeHeader(h, buf);
  Status st = co_await io.Write(buf, kHeaderSize + len);
  if (!st.ok()) co_return Status::Unavailable("sending HELLO: " + st.ToString());
  st = co_await io.Read(buf, kHeaderSize);
  if (!st.ok()) co_return Status::Unavailable("reading HELLO reply: " + st.ToString());
  *hard = true;
  Header rh;
  st = DecodeHeader(buf, &rh);
  if (!st.ok()) co_return st.WithContext("HELLO reply");
  if (!rh.is_reply() || rh.command() != Cmd::kHello) co_return Status::ProtocolError("expected a HELLO reply");
  if (rh.status == static_cast<std::uint32_t>(WireStatus::kAcces))  // EACCES: the access list
    co_return FromWireStatus(rh.status, "export " + opts_.export_name +
                                            ": this client's identity is not in its allow list (access denied by the server)");
  if (rh.status != 0) co_return FromWireStatus(rh.status, "export " + opts_.export_name + " refused by server");
  if (rh.length < kHelloReplySize || rh.length > kMaxHelloPayload)
    co_return Status::ProtocolError("bad HELLO reply length");
  st = co_await io.Read(buf, rh.length);
  if (!st.ok()) {
    *hard = false;
    co_return Status::Unavailable("reading HELLO reply: " + st.ToString());
  }
  HelloReply r;
  if (st = DecodeHelloReply(buf, rh.length, &r); !st.ok()) co_return st.WithContext("HELLO reply");
  // A size of 0, 2^63 or not a whole number of blocks is refused (hard), not served (§6).
  if (st = CheckExportSize(r.size, r.block_size); !st.ok()) co_return st.WithContext("HELLO reply");
  *hard = false;
  DeviceInfo& ni = n->info;
  ni.size = r.size;
  ni.logical_block_size = r.block_size;
  ni.max_io_bytes = r.max_payload;
  ni.read_only = (r.export_flags & kExportReadOnly) || !(r.permissions & kPermWrite);
  ni.can_flush = r.export_flags & kExportCanFlush;
  ni.can_fua = r.export_flags & kExportCanFua;
  ni.can_trim = r.export_flags & kExportCanTrim;
  ni.can_write_zeroes = r.export_flags & kExportCanWriteZeroes;
  n->features = opts_.checksum && (r.features & kFeatureDigestXxh3) ? kNegotiatedDigest : 0;
  co_return Status::OK();
}

void RemoteDevice::Protocol::Encode(ClientSlot& s, ControlUse use) {
  Header h;
  h.id = s.id();
  s.frame.payload = nullptr;
  s.frame.payload_len = 0;
  if (use == ControlUse::kKeepalive) {
    h.cmd = static_cast<std::uint16_t>(Cmd::kPing);
    EncodeHeader(h, s.frame.header);
    return;
  }
  const IoRequest* req = s.req;
  h.cmd = static_cast<std::uint16_t>(ToCmd(req->op));
  if ((req->flags & kIoFua) && req->op != IoOp::kRead && req->op != IoOp::kFlush) h.flags |= kFlagFua;
  if ((req->flags & kIoNoUnmap) && req->op == IoOp::kWriteZeroes) h.flags |= kFlagNoUnmap;
  if (req->op != IoOp::kFlush) {
    h.length = req->length;
    h.offset = req->offset;
  }
  if (req->op == IoOp::kWrite) {
    if (digest_) {  // §4.1: computed on every send (defect D2: headers are re-encoded)
      h.flags |= kFlagDigest;
      h.digest = PayloadDigest(req->data, req->length);
    }
    s.frame.payload = req->data;
    s.frame.payload_len = req->length;
  }
  EncodeHeader(h, s.frame.header);
}

// §4.1: a READ payload is handed to the caller only when its digest matches; otherwise the
// READ is sent again (the caller's buffer is simply overwritten by the next reply).
bool RemoteDevice::Protocol::DigestOk(const char* data, std::size_t len) {
  if (!digest_ || (rx_has_digest_ && PayloadDigest(data, len) == rx_digest_)) return true;
  digest_errors_.fetch_add(1, std::memory_order_relaxed);
  core_->Log("corrupted READ payload (digest mismatch): reading again");
  return false;
}

RxStep RemoteDevice::Protocol::Parse(RxBuffer& rx) {
  if (rx.size() < kHeaderSize) return RxStep::kNeedMore;
  rx.Take(rx_hdr_, kHeaderSize);
  if (!DecodeHeader(rx_hdr_, &rx_).ok() || !rx_.is_reply()) {
    core_->Lost("malformed frame from server");
    return RxStep::kStop;
  }
  const Cmd cmd = rx_.command();
  if (cmd == Cmd::kDisconnect) {
    OnServerDisconnect();
    return RxStep::kStop;
  }
  if (cmd == Cmd::kHello) {
    core_->Lost("unexpected HELLO reply");
    return RxStep::kStop;
  }
  ClientSlot* s = core_->Lookup(rx_.id);
  const bool keepalive = s && core_->IsControl(*s) && core_->control_use() == ControlUse::kKeepalive;
  if (cmd == Cmd::kPing) {
    if (keepalive) core_->Finish(*s, Status::OK());
    return RxStep::kNext;
  }
  if (!s || keepalive || ToCmd(s->req->op) != cmd) return Drain(rx);
  return OnReply(rx, s);
}

// Late or duplicated reply (a slot's earlier generation, or an unknown id): drop it, but drain
// its payload so the stream stays in sync.
RxStep RemoteDevice::Protocol::Drain(RxBuffer& rx) {
  if (!HasPayload(rx_) || rx_.length == 0) return RxStep::kNext;
  const std::size_t left = rx_.length - rx.Skip(rx_.length);
  if (left == 0) return RxStep::kNext;
  core_->DrainRest(left);
  return RxStep::kAsync;
}

// Only a correct answer ends an outage (Progress); an EPROTO frame before a close or a reply
// of the wrong length does not, or a peer that answers wrongly would reconnect forever without
// io_timeout.
RxStep RemoteDevice::Protocol::OnReply(RxBuffer& rx, ClientSlot* s) {
  const bool check = core_->IsControl(*s);
  if (HasPayload(rx_)) {  // successful READ: payload goes into the caller's buffer
    if (rx_.length != s->req->length) {
      core_->CountBadReply();
      core_->Lost("READ reply length mismatch");
      return RxStep::kStop;
    }
    if (!check) core_->Progress(true);  // the check's progress comes with its verdict
    rx_has_digest_ = rx_.flags & kFlagDigest;
    rx_digest_ = rx_.digest;
    rx_slot_ = s;
    const std::size_t have = rx.TakeInto(s->req->data, rx_.length);
    if (have < rx_.length) {  // the rest comes from the socket straight into the buffer
      core_->ReadRest(s, s->req->data, rx_.length, have);
      return RxStep::kAsync;
    }
    return ReadDone();
  }
  if (check) {  // the server refused the check READ
    core_->Finish(*s, FromWireStatus(rx_.status, "connect check READ"));
    return RxStep::kCompleted;
  }
  core_->Progress(true);
  const Cmd cmd = rx_.command();
  if (digest_ && rx_.status == static_cast<std::uint32_t>(WireStatus::kBadMsg) && cmd == Cmd::kWrite) {
    digest_errors_.fetch_add(1, std::memory_order_relaxed);
    core_->Log("exporter saw a corrupted WRITE payload: re-sending it");
    core_->Reissue(*s);
    return RxStep::kCompleted;
  }
  if (rx_.status == static_cast<std::uint32_t>(WireStatus::kShutdown)) {
    // The server is draining and will close: keep the request, re-send it on the next connection.
    core_->Requeue(*s);
    return RxStep::kNext;
  }
  core_->Finish(*s, FromWireStatus(rx_.status));
  return RxStep::kCompleted;
}

RxStep RemoteDevice::Protocol::ReadDone() {
  ClientSlot& s = *rx_slot_;
  rx_slot_ = nullptr;
  // The connect check verifies its digest in CheckDataOk (a mismatch reads it again).
  if (!core_->IsControl(s) && !DigestOk(s.req->data, s.req->length)) {
    core_->Reissue(s);
    return RxStep::kCompleted;
  }
  core_->Finish(s, Status::OK());
  return RxStep::kCompleted;
}

// DISCONNECT|reply: the server found a framing error and closes (§8.1).  When it names one of
// our requests, that request can never succeed: fail it rather than re-send it on every new
// connection (§8.4).  The others are re-sent as after any connection loss.
void RemoteDevice::Protocol::OnServerDisconnect() {
  ClientSlot* s = rx_.id != 0 ? core_->Lookup(rx_.id) : nullptr;
  if (!s || core_->IsControl(*s)) return core_->Lost("server reported a protocol error");
  const Status why = FromWireStatus(rx_.status, "server closed the connection");
  const std::uint32_t gen = s->gen;
  const char* name = CmdName(static_cast<std::uint16_t>(ToCmd(s->req->op)));
  core_->Log(std::string("server rejected a ") + name + " request (" + why.ToString() +
             "): failing it with EIO, not re-sending it");
  core_->MarkAnswered();  // the loss is explained: do not blame the first request sent (backstop)
  core_->Lost("server reported a protocol error");
  if (core_->closed() || !s->req || s->gen != gen) return;  // already ended by the backstop
  core_->Finish(*s, Status::IoError(std::string("server rejected the ") + name + " request"));
}

// --- public wrapper --------------------------------------------------------------------------

Result<std::shared_ptr<RemoteDevice>> RemoteDevice::Connect(boost::asio::io_context& io,
                                                            const RemoteOptions& opts) {
  if (opts.export_name.empty() || opts.export_name.size() > kMaxExportNameLen)
    return Status::InvalidArgument("bad export name");
  ClientCoreOptions co(opts, opts.port, "remote");
  co.poison_backstop = true;
  return ConnectClient<RemoteDevice, Protocol>(io, opts, co, "RemoteDevice");
}

RemoteStats RemoteDevice::Stats() const {
  RemoteStats st;
  static_cast<ClientStats&>(st) = CoreStats();
  st.digest_errors = proto_->digest_errors_.load(std::memory_order_relaxed);
  st.checksum = proto_->stat_digest_.load(std::memory_order_relaxed);
  return st;
}

// --- URI --------------------------------------------------------------------------------

Status ParseDstUri(const std::string& uri, RemoteOptions* opts) {
  BlockUri u;
  DST_RETURN_IF_ERROR(ParseBlockUri(uri, &u));
  if (u.scheme != UriScheme::kDst || u.eth)
    return Status::InvalidArgument("remote URI must start with dst://: " + uri);
  opts->host = u.host;
  opts->port = u.port;
  opts->export_name = u.export_name;
  return Status::OK();
}

}  // namespace dst::net
