// Unit tests for the DST v1 codec: header and HELLO round trips, malformed input, CheckRequest.
#include <cstring>
#include <string>

#include "dst/net/codec.h"
#include "test_env.h"

using namespace dst;
using namespace dst::net;

namespace {

Header Req(Cmd c, std::uint64_t off = 0, std::uint32_t len = 0, std::uint16_t flags = 0) {
  Header h;
  h.cmd = static_cast<std::uint16_t>(c);
  h.offset = off;
  h.length = len;
  h.flags = flags;
  h.id = 1;
  return h;
}

// Encodes `h`, applies `mutate` to the bytes, decodes.
template <typename F>
Status DecodeMutated(const Header& h, F mutate) {
  std::uint8_t b[kHeaderSize];
  EncodeHeader(h, b);
  mutate(b);
  Header out;
  return DecodeHeader(b, &out);
}

ExportLimits Limits(std::uint64_t size = 1u << 20, bool ro = false) {
  ExportLimits l;
  l.size = size;
  l.block_size = 512;
  l.max_payload = 65536;
  l.read_only = ro;
  return l;
}

}  // namespace

class CodecTest : public QObject {
  Q_OBJECT
 private slots:
  void headerRoundTrip() {
    Header h;
    h.cmd = static_cast<std::uint16_t>(Cmd::kWrite);
    h.flags = kFlagFua;
    h.length = 4096;
    h.id = 0x0102030405060708ull;
    h.offset = 0x1122334455667700ull;
    std::uint8_t b[kHeaderSize];
    EncodeHeader(h, b);
    // Big-endian layout (§2).
    QCOMPARE(int(b[0]), 'D');
    QCOMPARE(int(b[3]), '1');
    QCOMPARE(int(b[5]), 3);
    QCOMPARE(int(b[7]), 1);
    QCOMPARE(int(b[14]), 0x10);
    QCOMPARE(int(b[16]), 0x01);
    QCOMPARE(int(b[23]), 0x08);
    for (int i = 32; i < 48; ++i) QCOMPARE(int(b[i]), 0);
    Header d;
    QVERIFY(DecodeHeader(b, &d).ok());
    QCOMPARE(d.cmd, h.cmd);
    QCOMPARE(d.flags, h.flags);
    QCOMPARE(d.length, h.length);
    QCOMPARE(d.id, h.id);
    QCOMPARE(d.offset, h.offset);
    QVERIFY(!d.is_reply());
    QVERIFY(HasPayload(d));

    Header r;
    r.cmd = static_cast<std::uint16_t>(Cmd::kRead) | kReplyBit;
    r.status = static_cast<std::uint32_t>(WireStatus::kRange);
    r.id = 9;
    EncodeHeader(r, b);
    QVERIFY(DecodeHeader(b, &d).ok());
    QVERIFY(d.is_reply());
    QCOMPARE(d.command(), Cmd::kRead);
    QCOMPARE(d.status, 34u);
    QVERIFY(!HasPayload(d));  // failed READ: no data
    r.status = 0;
    r.length = 512;
    EncodeHeader(r, b);
    QVERIFY(DecodeHeader(b, &d).ok());
    QVERIFY(HasPayload(d));
    QVERIFY(!HasPayload(Req(Cmd::kRead, 0, 512)));
    QVERIFY(!HasPayload(Req(Cmd::kTrim, 0, 512)));
    QCOMPARE(std::string(CmdName(0x8003)), std::string("WRITE"));
  }

  void helloRoundTrip() {
    HelloRequest q;
    q.session_id = 0xdeadbeefcafef00dull;
    q.features = 0x5;
    q.export_name = "disk-1_a.b";
    std::uint8_t b[kMaxHelloPayload];
    std::size_t n = EncodeHelloRequest(q, b, sizeof b);
    QCOMPARE(n, std::size_t(kHelloRequestFixed + q.export_name.size()));
    HelloRequest d;
    QVERIFY(DecodeHelloRequest(b, n, &d).ok());
    QCOMPARE(d.version, kProtocolVersion);
    QCOMPARE(d.session_id, q.session_id);
    QCOMPARE(d.features, q.features);
    QCOMPARE(d.export_name, q.export_name);
    QCOMPARE(EncodeHelloRequest(q, b, 5), std::size_t(0));  // too small a buffer

    HelloReply r;
    r.export_flags = kExportCanFlush | kExportReadOnly;
    r.size = 1ull << 40;
    r.block_size = 4096;
    r.max_payload = 1u << 20;
    r.permissions = kPermRead;
    QCOMPARE(EncodeHelloReply(r, b, sizeof b), std::size_t(kHelloReplySize));
    HelloReply e;
    QVERIFY(DecodeHelloReply(b, kHelloReplySize, &e).ok());
    QCOMPARE(e.size, r.size);
    QCOMPARE(e.block_size, r.block_size);
    QCOMPARE(e.max_payload, r.max_payload);
    QCOMPARE(e.permissions, r.permissions);
    QCOMPARE(e.export_flags, r.export_flags);
    // Block sizes outside 512..65536 or not a power of two are refused (protocol.md §6.2).
    for (std::uint32_t bad : {0u, 1u, 256u, 768u, 131072u}) {
      r.block_size = bad;
      QCOMPARE(EncodeHelloReply(r, b, sizeof b), std::size_t(kHelloReplySize));
      QVERIFY2(!DecodeHelloReply(b, kHelloReplySize, &e).ok(), qPrintable(QString::number(bad)));
    }
    r.block_size = 512;
    QCOMPARE(EncodeHelloReply(r, b, sizeof b), std::size_t(kHelloReplySize));
    QVERIFY(DecodeHelloReply(b, kHelloReplySize, &e).ok());
  }

  void malformedHeaders() {
    const Header read = Req(Cmd::kRead, 0, 512);
    int rejected = 0;
    auto expect_bad = [&](const char* what, Status s) {
      if (s.ok()) qWarning("accepted: %s", what);
      QVERIFY2(!s.ok(), what);
      QCOMPARE(s.code(), Status::Code::kProtocolError);
      ++rejected;
    };
    expect_bad("bad magic", DecodeMutated(read, [](std::uint8_t* b) { b[0] = 'X'; }));
    expect_bad("nonzero reserved", DecodeMutated(read, [](std::uint8_t* b) { b[40] = 1; }));
    expect_bad("last reserved byte", DecodeMutated(read, [](std::uint8_t* b) { b[47] = 0x80; }));
    expect_bad("cmd 0", DecodeMutated(read, [](std::uint8_t* b) { PutU16(b + 4, 0); }));
    expect_bad("cmd 9", DecodeMutated(read, [](std::uint8_t* b) { PutU16(b + 4, 9); }));
    expect_bad("cmd 0x8000", DecodeMutated(read, [](std::uint8_t* b) { PutU16(b + 4, 0x8000); }));
    expect_bad("unknown flag", DecodeMutated(read, [](std::uint8_t* b) { PutU16(b + 6, 0x0100); }));
    expect_bad("FUA on READ", DecodeMutated(Req(Cmd::kRead, 0, 512, kFlagFua), [](std::uint8_t*) {}));
    expect_bad("NO_UNMAP on WRITE", DecodeMutated(Req(Cmd::kWrite, 0, 512, kFlagNoUnmap), [](std::uint8_t*) {}));
    expect_bad("status in request", DecodeMutated(read, [](std::uint8_t* b) { PutU32(b + 8, 5); }));
    expect_bad("length > 32 MiB", DecodeMutated(Req(Cmd::kWrite, 0, kAbsoluteMaxPayload + 1), [](std::uint8_t*) {}));
    expect_bad("FLUSH with length", DecodeMutated(Req(Cmd::kFlush, 0, 512), [](std::uint8_t*) {}));
    expect_bad("PING with offset", DecodeMutated(Req(Cmd::kPing, 4096, 0), [](std::uint8_t*) {}));
    expect_bad("oversized HELLO", DecodeMutated(Req(Cmd::kHello, 0, kMaxHelloPayload + 1), [](std::uint8_t*) {}));
    expect_bad("DIGEST on a READ request", DecodeMutated(Req(Cmd::kRead, 0, 512, kFlagDigest), [](std::uint8_t*) {}));
    expect_bad("digest bytes without DIGEST", DecodeMutated(Req(Cmd::kWrite, 0, 512), [](std::uint8_t* b) { b[33] = 1; }));
    expect_bad("reserved after digest", DecodeMutated(Req(Cmd::kWrite, 0, 512, kFlagDigest), [](std::uint8_t* b) { b[44] = 1; }));
    {
      Header wr = Req(Cmd::kWrite, 0, 512);
      wr.cmd |= kReplyBit;
      wr.flags = kFlagDigest;
      expect_bad("DIGEST on a WRITE reply", DecodeMutated(wr, [](std::uint8_t*) {}));
    }
    QVERIFY(rejected >= 12);
    // The limits themselves are accepted.
    Header d;
    std::uint8_t b[kHeaderSize];
    EncodeHeader(Req(Cmd::kWrite, 0, kAbsoluteMaxPayload, kFlagFua), b);
    QVERIFY(DecodeHeader(b, &d).ok());
    EncodeHeader(Req(Cmd::kWriteZeroes, 0, 512, kFlagNoUnmap | kFlagFua), b);
    QVERIFY(DecodeHeader(b, &d).ok());
    // §4.1: the digest travels in bytes 32..39, big-endian.
    Header dw = Req(Cmd::kWrite, 0, 512, kFlagDigest | kFlagFua);
    dw.digest = 0x0102030405060708ull;
    EncodeHeader(dw, b);
    QCOMPARE(int(b[32]), 1);
    QCOMPARE(int(b[39]), 8);
    QVERIFY(DecodeHeader(b, &d).ok());
    QCOMPARE(d.digest, dw.digest);
    Header rr = Req(Cmd::kRead, 0, 512, kFlagDigest);
    rr.cmd |= kReplyBit;
    rr.digest = 42;
    EncodeHeader(rr, b);
    QVERIFY(DecodeHeader(b, &d).ok());
    QCOMPARE(d.digest, std::uint64_t(42));
    QCOMPARE(PayloadDigest("", 0), std::uint64_t(0x2D06800538D394C2ull));  // XXH3-64 of nothing
  }

  void malformedHello() {
    HelloRequest q;
    q.export_name = "disk";
    std::uint8_t b[64];
    std::size_t n = EncodeHelloRequest(q, b, sizeof b);
    HelloRequest d;
    QVERIFY(!DecodeHelloRequest(b, kHelloRequestFixed - 1, &d).ok());  // short hello
    QVERIFY(!DecodeHelloRequest(b, n - 1, &d).ok());                   // name length mismatch
    QVERIFY(!DecodeHelloRequest(b, n + 1, &d).ok());                   // trailing byte
    std::uint8_t c[64];
    std::memcpy(c, b, n);
    c[19] = '\n';  // non-printable name
    QVERIFY(!DecodeHelloRequest(c, n, &d).ok());
    std::memcpy(c, b, n);
    c[19] = ' ';  // space is not allowed either
    QVERIFY(!DecodeHelloRequest(c, n, &d).ok());
    std::memcpy(c, b, n);
    PutU16(c + 2, 1);  // reserved field
    QVERIFY(!DecodeHelloRequest(c, n, &d).ok());
    std::memcpy(c, b, n);
    PutU16(c + 16, 0);  // empty name
    QVERIFY(!DecodeHelloRequest(c, kHelloRequestFixed, &d).ok());
    q.export_name = std::string(256, 'a');  // too long to encode
    std::uint8_t big[400];
    QCOMPARE(EncodeHelloRequest(q, big, sizeof big), std::size_t(0));

    HelloReply r;
    std::uint8_t rb[kHelloReplySize];
    EncodeHelloReply(r, rb, sizeof rb);
    HelloReply e;
    QVERIFY(DecodeHelloReply(rb, sizeof rb, &e).ok());
    QVERIFY(!DecodeHelloReply(rb, sizeof rb - 1, &e).ok());
    std::uint8_t x[kHelloReplySize];
    std::memcpy(x, rb, sizeof x);
    PutU16(x, 2);  // bad version
    QVERIFY(!DecodeHelloReply(x, sizeof x, &e).ok());
    std::memcpy(x, rb, sizeof x);
    PutU32(x + 16, 1000);  // block size not a power of two
    QVERIFY(!DecodeHelloReply(x, sizeof x, &e).ok());
    PutU32(x + 16, 0);
    QVERIFY(!DecodeHelloReply(x, sizeof x, &e).ok());
    std::memcpy(x, rb, sizeof x);
    PutU32(x + 20, kAbsoluteMaxPayload + 1);  // max payload above the cap
    QVERIFY(!DecodeHelloReply(x, sizeof x, &e).ok());
  }

  void checkRequest() {
    const ExportLimits l = Limits();
    QCOMPARE(CheckRequest(Req(Cmd::kRead, 0, 4096), l), WireStatus::kOk);
    QCOMPARE(CheckRequest(Req(Cmd::kWrite, l.size - 512, 512), l), WireStatus::kOk);
    QCOMPARE(CheckRequest(Req(Cmd::kRead, l.size, 512), l), WireStatus::kRange);
    QCOMPARE(CheckRequest(Req(Cmd::kRead, l.size - 512, 1024), l), WireStatus::kRange);
    QCOMPARE(CheckRequest(Req(Cmd::kWrite, ~0ull - 511, 1024), l), WireStatus::kRange);  // overflow
    QCOMPARE(CheckRequest(Req(Cmd::kRead, 0xfffffffffffffe00ull, 512), l), WireStatus::kRange);
    QCOMPARE(CheckRequest(Req(Cmd::kTrim, l.size - 512, 1024), l), WireStatus::kRange);
    QCOMPARE(CheckRequest(Req(Cmd::kRead, 100, 512), l), WireStatus::kInval);    // misaligned offset
    QCOMPARE(CheckRequest(Req(Cmd::kWrite, 0, 100), l), WireStatus::kInval);     // misaligned length
    QCOMPARE(CheckRequest(Req(Cmd::kRead, 0, 0), l), WireStatus::kInval);        // empty
    QCOMPARE(CheckRequest(Req(Cmd::kWrite, 0, 65536 + 512), l), WireStatus::kMsgSize);
    QCOMPARE(CheckRequest(Req(Cmd::kRead, 0, 65536 + 512), l), WireStatus::kMsgSize);
    QCOMPARE(CheckRequest(Req(Cmd::kTrim, 0, 1u << 20), l), WireStatus::kOk);  // ranges may exceed max payload
    const ExportLimits ro = Limits(1u << 20, true);
    QCOMPARE(CheckRequest(Req(Cmd::kWrite, 0, 512), ro), WireStatus::kPerm);
    QCOMPARE(CheckRequest(Req(Cmd::kTrim, 0, 512), ro), WireStatus::kPerm);
    QCOMPARE(CheckRequest(Req(Cmd::kWriteZeroes, 0, 512), ro), WireStatus::kPerm);
    QCOMPARE(CheckRequest(Req(Cmd::kRead, 0, 512), ro), WireStatus::kOk);
    ExportLimits notrim = l;
    notrim.can_trim = false;
    QCOMPARE(CheckRequest(Req(Cmd::kTrim, 0, 512), notrim), WireStatus::kNotSup);
    QCOMPARE(CheckRequest(Req(Cmd::kFlush), l), WireStatus::kOk);
    QCOMPARE(CheckRequest(Req(Cmd::kPing), l), WireStatus::kOk);
  }

  // Regression: FuseMount sends punch-hole/zero-range as TRIM/WRITE_ZEROES of up to 1 GiB; the
  // 32 MiB framing cap made the server drop the connection and the client re-send forever.
  void largeRangeCommands() {
    constexpr std::uint32_t kGiB = 1u << 30;
    const std::uint32_t kMaxAligned = 0xffffffffu & ~511u;
    Header d;
    std::uint8_t b[kHeaderSize];
    for (Cmd c : {Cmd::kTrim, Cmd::kWriteZeroes}) {
      for (std::uint32_t len : {kAbsoluteMaxPayload + 512, kGiB, kMaxAligned, 0xffffffffu}) {
        EncodeHeader(Req(c, 4096, len), b);
        const Status st = DecodeHeader(b, &d);
        QVERIFY2(st.ok(), qPrintable(QString("%1 length %2: %3").arg(CmdName(std::uint16_t(c))).arg(len)
                                         .arg(QString::fromStdString(st.ToString()))));
        QCOMPARE(d.length, len);
        QVERIFY(!HasPayload(d));
        // The reply frame of the same command is accepted too (the client decodes it).
        Header r = Req(c, 4096, len);
        r.cmd |= kReplyBit;
        EncodeHeader(r, b);
        QVERIFY(DecodeHeader(b, &d).ok());
      }
    }
    EncodeHeader(Req(Cmd::kWriteZeroes, 0, kGiB, kFlagNoUnmap | kFlagFua), b);
    QVERIFY(DecodeHeader(b, &d).ok());
    // Payload-carrying frames keep the framing cap.
    for (Cmd c : {Cmd::kWrite, Cmd::kRead}) {
      EncodeHeader(Req(c, 0, 33u << 20), b);
      const Status st = DecodeHeader(b, &d);
      QCOMPARE(st.code(), Status::Code::kProtocolError);
      EncodeHeader(Req(c, 0, kGiB), b);
      QCOMPARE(DecodeHeader(b, &d).code(), Status::Code::kProtocolError);
    }
    Header rr = Req(Cmd::kRead, 0, 33u << 20);
    rr.cmd |= kReplyBit;  // a READ reply would carry 33 MiB
    EncodeHeader(rr, b);
    QCOMPARE(DecodeHeader(b, &d).code(), Status::Code::kProtocolError);
    EncodeHeader(Req(Cmd::kHello, 0, 33u << 20), b);
    QCOMPARE(DecodeHeader(b, &d).code(), Status::Code::kProtocolError);
    EncodeHeader(Req(Cmd::kFlush, 0, kGiB), b);
    QCOMPARE(DecodeHeader(b, &d).code(), Status::Code::kProtocolError);
    QVERIFY(IsRangeOnly(Cmd::kTrim) && IsRangeOnly(Cmd::kWriteZeroes));
    QVERIFY(!IsRangeOnly(Cmd::kRead) && !IsRangeOnly(Cmd::kWrite) && !IsRangeOnly(Cmd::kHello));

    // CheckRequest still applies the range rules to such lengths.
    ExportLimits big = Limits(std::uint64_t(4) << 30);  // 4 GiB export, 64 KiB max payload
    QCOMPARE(CheckRequest(Req(Cmd::kTrim, 0, kGiB), big), WireStatus::kOk);
    QCOMPARE(CheckRequest(Req(Cmd::kWriteZeroes, 3ull << 30, kGiB), big), WireStatus::kOk);
    QCOMPARE(CheckRequest(Req(Cmd::kWriteZeroes, 0, kMaxAligned), big), WireStatus::kOk);
    QCOMPARE(CheckRequest(Req(Cmd::kTrim, (3ull << 30) + 512, kGiB), big), WireStatus::kRange);
    QCOMPARE(CheckRequest(Req(Cmd::kTrim, 0, 0xffffffffu), big), WireStatus::kInval);  // misaligned
    QCOMPARE(CheckRequest(Req(Cmd::kTrim, ~0ull - 511, kGiB), big), WireStatus::kRange);  // overflow
    QCOMPARE(CheckRequest(Req(Cmd::kTrim, 0, kGiB), Limits()), WireStatus::kRange);  // 1 MiB export
    QCOMPARE(CheckRequest(Req(Cmd::kWriteZeroes, 0, kGiB), Limits(std::uint64_t(4) << 30, true)),
             WireStatus::kPerm);
    QCOMPARE(CheckRequest(Req(Cmd::kRead, 0, 32u << 20), big), WireStatus::kMsgSize);
  }

  void statusMapping() {
    QCOMPARE(ToWireStatus(Status::OK()), WireStatus::kOk);
    QCOMPARE(ToWireStatus(Status::OutOfRange()), WireStatus::kRange);
    QCOMPARE(ToWireStatus(Status::ReadOnly()), WireStatus::kPerm);
    QCOMPARE(ToWireStatus(Status::IoError()), WireStatus::kIo);
    QVERIFY(FromWireStatus(0).ok());
    QCOMPARE(FromWireStatus(34).code(), Status::Code::kOutOfRange);
    QCOMPARE(FromWireStatus(71).code(), Status::Code::kProtocolError);
    QCOMPARE(FromWireStatus(12345).code(), Status::Code::kIoError);  // unknown -> EIO
  }
};

DST_TEST_MAIN(CodecTest)
#include "codec_test.moc"
