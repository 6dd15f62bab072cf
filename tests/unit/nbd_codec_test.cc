// Unit tests for the NBD codec (nbd_format.h): handshake, option, request and reply encodings,
// option-payload parsers and CheckRequest, with malformed inputs.
#include <cstring>
#include <string>
#include <vector>

#include "dst/net/nbd_format.h"
#include "test_env.h"

using namespace dst;
using namespace dst::net::nbd;

namespace {

std::vector<std::uint8_t> Bytes(std::initializer_list<int> v) {
  std::vector<std::uint8_t> out;
  for (int b : v) out.push_back(static_cast<std::uint8_t>(b));
  return out;
}

// u32 len + name + u16 n + u16 infos
std::vector<std::uint8_t> InfoData(const std::string& name, std::vector<std::uint16_t> infos) {
  std::vector<std::uint8_t> d(4 + name.size() + 2 + 2 * infos.size());
  Put32(d.data(), static_cast<std::uint32_t>(name.size()));
  std::memcpy(d.data() + 4, name.data(), name.size());
  Put16(d.data() + 4 + name.size(), static_cast<std::uint16_t>(infos.size()));
  for (std::size_t i = 0; i < infos.size(); ++i) Put16(d.data() + 6 + name.size() + 2 * i, infos[i]);
  return d;
}

std::vector<std::uint8_t> MetaData(const std::string& name, const std::vector<std::string>& queries) {
  std::vector<std::uint8_t> d;
  auto put32 = [&](std::uint32_t v) {
    std::uint8_t b[4];
    Put32(b, v);
    d.insert(d.end(), b, b + 4);
  };
  put32(static_cast<std::uint32_t>(name.size()));
  d.insert(d.end(), name.begin(), name.end());
  put32(static_cast<std::uint32_t>(queries.size()));
  for (auto& q : queries) {
    put32(static_cast<std::uint32_t>(q.size()));
    d.insert(d.end(), q.begin(), q.end());
  }
  return d;
}

RequestLimits Lim(std::uint16_t extra_flags = 0) {
  RequestLimits l;
  l.size = 1u << 20;
  l.min_block = 512;
  l.max_payload = 65536;
  l.tx_flags = kTxHasFlags | kTxSendFlush | kTxSendFua | kTxSendTrim | kTxSendWriteZeroes | kTxSendFastZero |
               kTxSendCache | extra_flags;
  return l;
}

Request Rq(std::uint16_t type, std::uint64_t off, std::uint32_t len, std::uint16_t flags = 0) {
  Request r;
  r.type = type;
  r.offset = off;
  r.length = len;
  r.flags = flags;
  r.cookie = 7;
  return r;
}

}  // namespace

class NbdCodecTest : public QObject {
  Q_OBJECT
 private slots:
  void greetingLayout() {
    std::uint8_t b[kGreetingSize];
    EncodeGreeting(kFlagFixedNewstyle | kFlagNoZeroes, b);
    QCOMPARE(std::memcmp(b, "NBDMAGICIHAVEOPT", 16), 0);
    QCOMPARE(Get16(b + 16), std::uint16_t(3));
  }

  void optionHeaderRoundTrip() {
    std::uint8_t b[kOptionHeaderSize];
    Put64(b, kOptMagic);
    Put32(b + 8, kOptGo);
    Put32(b + 12, 1234);
    OptionHeader h;
    QVERIFY(DecodeOptionHeader(b, &h).ok());
    QCOMPARE(h.option, kOptGo);
    QCOMPARE(h.length, 1234u);
  }

  void optionReplyLayout() {
    std::string out;
    AppendOptionReply(&out, kOptInfo, kRepInfo, InfoExportPayload(0x123456789aull, 0x0d0d));
    QCOMPARE(out.size(), kOptionReplyHeaderSize + 12);
    auto* p = reinterpret_cast<const std::uint8_t*>(out.data());
    QCOMPARE(Get64(p), kOptReplyMagic);
    QCOMPARE(Get32(p + 8), kOptInfo);
    QCOMPARE(Get32(p + 12), kRepInfo);
    QCOMPARE(Get32(p + 16), 12u);
    QCOMPARE(Get16(p + 20), kInfoExport);
    QCOMPARE(Get64(p + 22), 0x123456789aull);
    QCOMPARE(Get16(p + 30), std::uint16_t(0x0d0d));
  }

  void infoPayloads() {
    std::string bs = InfoBlockSizePayload(512, 4096, 1u << 22);
    QCOMPARE(bs.size(), std::size_t(14));
    auto* p = reinterpret_cast<const std::uint8_t*>(bs.data());
    QCOMPARE(Get16(p), kInfoBlockSize);
    QCOMPARE(Get32(p + 2), 512u);
    QCOMPARE(Get32(p + 6), 4096u);
    QCOMPARE(Get32(p + 10), 1u << 22);
    std::string name = InfoStringPayload(kInfoName, "disk");
    QCOMPARE(name.size(), std::size_t(6));
    QCOMPARE(name.substr(2), std::string("disk"));
    std::string srv = ServerPayload("a", "desc");
    QCOMPARE(Get32(reinterpret_cast<const std::uint8_t*>(srv.data())), 1u);
    QCOMPARE(srv.substr(4), std::string("adesc"));
    std::string mc = MetaContextPayload(9, "base:allocation");
    QCOMPARE(Get32(reinterpret_cast<const std::uint8_t*>(mc.data())), 9u);
    QCOMPARE(mc.substr(4), std::string("base:allocation"));
  }

  void parseInfoRequest() {
    auto d = InfoData("disk", {kInfoName, kInfoBlockSize});
    InfoRequest r;
    QVERIFY(ParseInfoRequest(d.data(), d.size(), &r).ok());
    QCOMPARE(r.name, std::string("disk"));
    QCOMPARE(int(r.infos.size()), 2);
    QCOMPARE(r.infos[1], kInfoBlockSize);
    auto e = InfoData("", {});
    QVERIFY(ParseInfoRequest(e.data(), e.size(), &r).ok());
    QVERIFY(r.name.empty());
  }

  void parseMetaRequest() {
    auto d = MetaData("disk", {"base:allocation", "dst:"});
    MetaRequest r;
    QVERIFY(ParseMetaRequest(d.data(), d.size(), &r).ok());
    QCOMPARE(r.name, std::string("disk"));
    QCOMPARE(int(r.queries.size()), 2);
    QCOMPARE(r.queries[1], std::string("dst:"));
  }

  void requestRoundTripAndReplies() {
    Request r = Rq(kCmdWrite, 4096, 512, kCmdFlagFua);
    std::uint8_t b[kRequestSize];
    EncodeRequest(r, b);
    QCOMPARE(Get32(b), kRequestMagic);
    Request o;
    QVERIFY(DecodeRequest(b, &o).ok());
    QCOMPARE(o.type, kCmdWrite);
    QCOMPARE(o.flags, kCmdFlagFua);
    QCOMPARE(o.cookie, 7ull);
    QCOMPARE(o.offset, 4096ull);
    QCOMPARE(o.length, 512u);
    std::uint8_t s[kSimpleReplySize];
    EncodeSimpleReply(kEio, 0xabcdefull, s);
    QCOMPARE(Get32(s), kSimpleReplyMagic);
    QCOMPARE(Get32(s + 4), kEio);
    QCOMPARE(Get64(s + 8), 0xabcdefull);
    std::uint8_t c[kChunkHeaderSize];
    EncodeChunkHeader(kReplyFlagDone, kChunkOffsetHole, 5, 12, c);
    QCOMPARE(Get32(c), kStructuredReplyMagic);
    QCOMPARE(Get16(c + 4), kReplyFlagDone);
    QCOMPARE(Get16(c + 6), kChunkOffsetHole);
    QCOMPARE(Get64(c + 8), 5ull);
    QCOMPARE(Get32(c + 16), 12u);
  }

  void validRequestsPass() {
    const RequestLimits l = Lim();
    QCOMPARE(CheckRequest(Rq(kCmdRead, 0, 4096), l), 0u);
    QCOMPARE(CheckRequest(Rq(kCmdWrite, (1u << 20) - 512, 512, kCmdFlagFua), l), 0u);
    QCOMPARE(CheckRequest(Rq(kCmdFlush, 0, 0), l), 0u);
    QCOMPARE(CheckRequest(Rq(kCmdTrim, 0, 1u << 20), l), 0u);  // not bound by max payload
    QCOMPARE(CheckRequest(Rq(kCmdWriteZeroes, 0, 1u << 20, kCmdFlagNoHole | kCmdFlagFastZero), l), 0u);
    QCOMPARE(CheckRequest(Rq(kCmdCache, 1, 100), l), 0u);
    RequestLimits s = l;
    s.structured = true;
    s.have_contexts = true;
    QCOMPARE(CheckRequest(Rq(kCmdRead, 0, 4096, kCmdFlagDf), s), 0u);
    QCOMPARE(CheckRequest(Rq(kCmdBlockStatus, 0, 1u << 20, kCmdFlagReqOne), s), 0u);
  }

  // ---- malformed inputs ------------------------------------------------------------------------
  void malformedOptionMagic() {
    std::uint8_t b[kOptionHeaderSize] = {};
    std::memcpy(b, "IHAVEOPX", 8);
    OptionHeader h;
    QCOMPARE(DecodeOptionHeader(b, &h).code(), Status::Code::kProtocolError);
  }

  void malformedRequestMagic() {
    std::uint8_t b[kRequestSize];
    EncodeRequest(Rq(kCmdRead, 0, 512), b);
    b[3] ^= 1;
    Request o;
    QCOMPARE(DecodeRequest(b, &o).code(), Status::Code::kProtocolError);
    Put32(b, kExtendedRequestMagic);  // extended headers were never negotiated
    QCOMPARE(DecodeRequest(b, &o).code(), Status::Code::kProtocolError);
    Put32(b, kSimpleReplyMagic);  // a reply sent as a request
    QVERIFY(!DecodeRequest(b, &o).ok());
  }

  void malformedInfoTruncatedName() {
    auto d = InfoData("disk", {});
    Put32(d.data(), 100);  // name length beyond the data
    InfoRequest r;
    QVERIFY(!ParseInfoRequest(d.data(), d.size(), &r).ok());
    QVERIFY(!ParseInfoRequest(d.data(), 3, &r).ok());  // not even the length
  }

  void malformedInfoCountMismatch() {
    auto d = InfoData("disk", {kInfoName});
    Put16(d.data() + 8, 3);  // claims 3 requests, carries 1
    InfoRequest r;
    QVERIFY(!ParseInfoRequest(d.data(), d.size(), &r).ok());
    auto e = InfoData("disk", {});
    QVERIFY(!ParseInfoRequest(e.data(), e.size() - 1, &r).ok());  // count cut short
    e.push_back(0);
    QVERIFY(!ParseInfoRequest(e.data(), e.size(), &r).ok());  // trailing byte
  }

  void malformedNameTooLong() {
    std::string big(kMaxStringLen + 1, 'x');
    auto d = InfoData(big, {});
    InfoRequest r;
    QVERIFY(!ParseInfoRequest(d.data(), d.size(), &r).ok());
    auto m = MetaData("disk", {big});
    MetaRequest mr;
    QVERIFY(!ParseMetaRequest(m.data(), m.size(), &mr).ok());
  }

  void malformedMetaQueries() {
    MetaRequest r;
    auto d = MetaData("disk", {"base:allocation"});
    QVERIFY(!ParseMetaRequest(d.data(), d.size() - 1, &r).ok());  // query truncated
    d.push_back(1);
    QVERIFY(!ParseMetaRequest(d.data(), d.size(), &r).ok());      // trailing garbage
    auto many = MetaData("disk", {});
    Put32(many.data() + 8, 0xffffffffu);  // absurd count: refused before any allocation
    QVERIFY(!ParseMetaRequest(many.data(), many.size(), &r).ok());
    auto no_count = Bytes({0, 0, 0, 0});
    QVERIFY(!ParseMetaRequest(no_count.data(), no_count.size(), &r).ok());
  }

  void malformedFlags() {
    const RequestLimits l = Lim();
    QCOMPARE(CheckRequest(Rq(kCmdRead, 0, 512, 1u << 7), l), kEinval);            // unknown bit
    QCOMPARE(CheckRequest(Rq(kCmdWrite, 0, 512, kCmdFlagNoHole), l), kEinval);    // wrong command
    QCOMPARE(CheckRequest(Rq(kCmdRead, 0, 512, kCmdFlagDf), l), kEinval);         // DF w/o structured
    QCOMPARE(CheckRequest(Rq(kCmdRead, 0, 512, kCmdFlagReqOne), l), kEinval);     // REQ_ONE on READ
    QCOMPARE(CheckRequest(Rq(kCmdTrim, 0, 512, kCmdFlagFastZero), l), kEinval);   // FAST_ZERO on TRIM
    RequestLimits nofua = l;
    nofua.tx_flags &= ~kTxSendFua;
    QCOMPARE(CheckRequest(Rq(kCmdWrite, 0, 512, kCmdFlagFua), nofua), kEinval);  // not advertised
  }

  void malformedCommands() {
    const RequestLimits l = Lim();
    QCOMPARE(CheckRequest(Rq(8, 0, 0), l), kEinval);       // RESIZE: not offered
    QCOMPARE(CheckRequest(Rq(0xffff, 0, 0), l), kEinval);  // unknown
    QCOMPARE(CheckRequest(Rq(kCmdBlockStatus, 0, 512), l), kEinval);  // no structured/contexts
    RequestLimits s = l;
    s.structured = true;
    QCOMPARE(CheckRequest(Rq(kCmdBlockStatus, 0, 512), s), kEinval);  // no context selected
    RequestLimits notrim = l;
    notrim.tx_flags &= ~kTxSendTrim;
    QCOMPARE(CheckRequest(Rq(kCmdTrim, 0, 512), notrim), kEinval);
  }

  void malformedRanges() {
    const RequestLimits l = Lim();
    QCOMPARE(CheckRequest(Rq(kCmdRead, 100, 512), l), kEinval);            // misaligned offset
    QCOMPARE(CheckRequest(Rq(kCmdWrite, 0, 100), l), kEinval);             // misaligned length
    QCOMPARE(CheckRequest(Rq(kCmdRead, 0, 0), l), kEinval);                // empty
    QCOMPARE(CheckRequest(Rq(kCmdRead, 1u << 20, 512), l), kEinval);       // past the end
    QCOMPARE(CheckRequest(Rq(kCmdWrite, 1u << 20, 512), l), kEnospc);      // write past the end
    QCOMPARE(CheckRequest(Rq(kCmdWriteZeroes, (1u << 20) - 512, 1024), l), kEnospc);
    QCOMPARE(CheckRequest(Rq(kCmdRead, ~0ull - 511, 512), l), kEinval);    // offset overflow
    QCOMPARE(CheckRequest(Rq(kCmdRead, 0, 131072), l), kEinval);           // above max payload
    QCOMPARE(CheckRequest(Rq(kCmdWrite, 0, 131072), l), kEinval);
    RequestLimits s = l;
    s.structured = true;
    QCOMPARE(CheckRequest(Rq(kCmdRead, 0, 131072, kCmdFlagDf), s), kEoverflow);  // DF: too big unfragmented
  }

  void readOnlyExport() {
    RequestLimits l = Lim(kTxReadOnly);
    QCOMPARE(CheckRequest(Rq(kCmdWrite, 0, 512), l), kEperm);
    QCOMPARE(CheckRequest(Rq(kCmdTrim, 0, 512), l), kEperm);
    QCOMPARE(CheckRequest(Rq(kCmdWriteZeroes, 0, 512), l), kEperm);
    QCOMPARE(CheckRequest(Rq(kCmdRead, 0, 512), l), 0u);
  }

  void statusMapping() {
    QCOMPARE(ErrnoFromStatus(Status::OK()), 0u);
    QCOMPARE(ErrnoFromStatus(Status::ReadOnly()), kEperm);
    QCOMPARE(ErrnoFromStatus(Status::OutOfRange()), kEinval);
    QCOMPARE(ErrnoFromStatus(Status::NotSupported()), kEnotsup);
    QCOMPARE(ErrnoFromStatus(Status::NoSpace()), kEnospc);
    QCOMPARE(ErrnoFromStatus(Status::FromErrno(ENOMEM)), kEnomem);
    QCOMPARE(ErrnoFromStatus(Status::TimedOut()), kEio);
    QCOMPARE(ErrnoFromStatus(Status::Unavailable()), kEio);
  }
};

DST_TEST_MAIN(NbdCodecTest)
#include "nbd_codec_test.moc"
