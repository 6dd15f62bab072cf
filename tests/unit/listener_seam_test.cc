// The ListenerFactory seam of the DST exporter and the NBD server (issue 11 item 6: the fuzz
// targets serve in-memory transports through it): a server started with a factory accepts from
// that listener, binds no port, and speaks its protocol over the injected transport unchanged.
#include <chrono>
#include <cstring>
#include <memory>
#include <string>

#include <boost/asio/io_context.hpp>

#include "dst/net/codec.h"
#include "dst/net/exporter.h"
#include "dst/net/nbd_server.h"
#include "fake_device.h"
#include "mem_transport.h"
#include "test_env.h"

using namespace dst;
using namespace dst::net;

namespace {

std::string DstHeader(Cmd cmd, std::uint32_t length, std::uint64_t id, std::uint64_t offset) {
  Header h;
  h.cmd = static_cast<std::uint16_t>(cmd);
  h.length = length;
  h.id = id;
  h.offset = offset;
  std::uint8_t b[kHeaderSize];
  EncodeHeader(h, b);
  return std::string(reinterpret_cast<char*>(b), sizeof b);
}

// The factory hands the server a MemListener and keeps a pointer to it for the test.
template <typename Options>
void UseMemListener(Options* o, fuzz::MemListener** out) {
  o->stall_timeout = std::chrono::milliseconds(0);  // no sweep timer: io.run() ends with the input
  o->limits = ServerLimits::None();
  o->listener = [out](const Strand& ex) {
    auto l = std::make_unique<fuzz::MemListener>(ex);
    *out = l.get();
    return l;
  };
}

// Destroys the server and runs what its Shutdown posted: closing the MemListener hands back the
// pending accept callback (which holds the server), as a socket's cancelled accept would.
template <typename S>
void StopServer(boost::asio::io_context& io, std::unique_ptr<S> s) {
  s.reset();
  io.restart();
  io.run();
}

}  // namespace

class ListenerSeamTest : public QObject {
  Q_OBJECT

 private slots:
  void ExporterServesAnInjectedTransport() {
    boost::asio::io_context io;
    ExporterOptions o;
    fuzz::MemListener* listener = nullptr;
    UseMemListener(&o, &listener);
    auto owned = std::make_unique<Exporter>(io, o);
    Exporter& ex = *owned;
    auto dev = std::make_shared<test::FakeDevice>();
    const char pattern[] = "seam";
    dev->Poke(512, pattern, 4);
    QVERIFY(ex.AddExport({.name = "disk0", .device = dev}).ok());
    QVERIFY(ex.Start().ok());
    QVERIFY(listener != nullptr);
    QCOMPARE(int(ex.port()), 0);

    HelloRequest hello;
    hello.export_name = "disk0";
    std::uint8_t hb[kHelloRequestFixed + 5];
    const std::size_t hn = EncodeHelloRequest(hello, hb, sizeof hb);
    std::string in = DstHeader(Cmd::kHello, std::uint32_t(hn), 1, 0) + std::string(reinterpret_cast<char*>(hb), hn) +
                     DstHeader(Cmd::kRead, 512, 2, 512);
    std::string out;
    listener->Push(in, &out);
    io.run();

    // HELLO reply (header + payload), then the READ reply with the device's bytes.
    QCOMPARE(out.size(), kHeaderSize + kHelloReplySize + kHeaderSize + 512);
    Header h;
    QVERIFY(DecodeHeader(reinterpret_cast<const std::uint8_t*>(out.data()), &h).ok());
    QCOMPARE(h.cmd, std::uint16_t(std::uint16_t(Cmd::kHello) | kReplyBit));
    QCOMPARE(h.status, 0u);
    const std::size_t read_at = kHeaderSize + kHelloReplySize;
    QVERIFY(DecodeHeader(reinterpret_cast<const std::uint8_t*>(out.data()) + read_at, &h).ok());
    QCOMPARE(h.id, std::uint64_t(2));
    QCOMPARE(h.status, 0u);
    QCOMPARE(out.substr(read_at + kHeaderSize, 4), std::string("seam"));
    QCOMPARE(ex.Stats().connections_total, std::uint64_t(1));
    QCOMPARE(ex.Stats().connections_open, 0);
    StopServer(io, std::move(owned));
  }

  void NbdServerGreetsAnInjectedTransport() {
    boost::asio::io_context io;
    NbdServerOptions o;
    fuzz::MemListener* listener = nullptr;
    UseMemListener(&o, &listener);
    auto owned = std::make_unique<NbdServer>(io, o);
    NbdServer& srv = *owned;
    QVERIFY(srv.AddExport({.name = "disk0", .device = std::make_shared<test::FakeDevice>()}).ok());
    QVERIFY(srv.Start().ok());
    QCOMPARE(int(srv.port()), 0);
    std::string out;
    listener->Push(std::string(), &out);  // connects and hangs up at once
    io.run();
    // The fixed-newstyle greeting: NBDMAGIC, IHAVEOPT, handshake flags.
    QCOMPARE(out.size(), nbd::kGreetingSize);
    QCOMPARE(out.substr(0, 8), std::string("NBDMAGIC"));
    QCOMPARE(out.substr(8, 8), std::string("IHAVEOPT"));
    QCOMPARE(srv.Stats().connections_open, 0);
    StopServer(io, std::move(owned));
  }
};

DST_TEST_MAIN(ListenerSeamTest)
#include "listener_seam_test.moc"
