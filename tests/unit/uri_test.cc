// Unit tests for the one block-device URI parser (netdriver/include/dst/net/uri.h).
#include <string>

#include "dst/net/uri.h"
#include "test_env.h"

using namespace dst;
using namespace dst::net;

class UriTest : public QObject {
  Q_OBJECT
 private slots:
  void goodUris() {
    BlockUri u;
    QVERIFY(ParseBlockUri("dst://127.0.0.1:7500/disk1", &u).ok());
    QVERIFY(u.scheme == UriScheme::kDst);
    QCOMPARE(u.host, std::string("127.0.0.1"));
    QCOMPARE(u.port, std::uint16_t(7500));
    QCOMPARE(u.export_name, std::string("disk1"));
    QVERIFY(ParseBlockUri("dst://h/e", &u).ok());
    QCOMPARE(u.port, std::uint16_t(7400));
    QCOMPARE(u.Canonical(), std::string("dst://h:7400/e"));
    QVERIFY(ParseBlockUri("dst://[::1]:7401/x", &u).ok());
    QCOMPARE(u.host, std::string("::1"));
    QCOMPARE(u.Canonical(), std::string("dst://[::1]:7401/x"));
    QVERIFY(!u.tls);
    // dsts://: the same DST, inside TLS 1.3.
    QVERIFY(ParseBlockUri("dsts://h:7500/e", &u).ok());
    QVERIFY(u.scheme == UriScheme::kDst && u.tls);
    QCOMPARE(u.host, std::string("h"));
    QCOMPARE(u.export_name, std::string("e"));
    QCOMPARE(u.Canonical(), std::string("dsts://h:7500/e"));
    QVERIFY(HasBlockUriScheme("dsts://h/e"));
    QVERIFY(!ParseBlockUri("dsts://h", &u).ok());

    QVERIFY(ParseBlockUri("nbd://localhost/disk", &u).ok());
    QVERIFY(u.scheme == UriScheme::kNbd);
    QCOMPARE(u.port, std::uint16_t(10809));
    QCOMPARE(u.export_name, std::string("disk"));
    QCOMPARE(u.Canonical(), std::string("nbd://localhost:10809/disk"));
    QVERIFY(ParseBlockUri("nbd://h:10900", &u).ok());  // the server's default export
    QVERIFY(u.export_name.empty());
    QVERIFY(ParseBlockUri("nbd://h/a%20b", &u).ok());
    QCOMPARE(u.export_name, std::string("a b"));

    QVERIFY(ParseBlockUri("nbd+unix:///vol?socket=/tmp/x.sock", &u).ok());
    QVERIFY(u.scheme == UriScheme::kNbdUnix);
    QCOMPARE(u.socket, std::string("/tmp/x.sock"));
    QCOMPARE(u.export_name, std::string("vol"));
    QVERIFY(u.host.empty());
    QCOMPARE(u.Canonical(), std::string("nbd+unix:///vol?socket=/tmp/x.sock"));
    QVERIFY(HasBlockUriScheme("nbd+unix:///?socket=/s"));
    QVERIFY(!HasBlockUriScheme("/srv/disk.img"));
  }

  // Each bad URI fails with InvalidArgument, a message naming the problem, and *out untouched.
  void badUris() {
    struct Case {
      const char* uri;
      const char* why;
    } cases[] = {
        {"dst:///x", "empty host"},
        {"nbd://", "empty host"},
        {"nbd://:10809/x", "empty host"},
        {"dst://h:/x", "bad port"},
        {"dst://h:0/x", "bad port"},
        {"nbd://h:65536/x", "bad port"},
        {"nbd://h:12a/x", "bad port"},
        {"dst://h:123456/x", "bad port"},
        {"dst://h", "missing export"},
        {"dst://h/", "missing export"},
        {"http://h/x", "unknown scheme"},
        {"", "unknown scheme"},
        {"/srv/disk.img", "unknown scheme"},
        {"nbd+unix:///x", "missing ?socket"},
        {"nbd+unix://host/x?socket=/s", "empty host"},
        {"nbd+unix:///x?sock=/s", "unsupported parameter"},
        {"nbd://h/%zz", "bad %-escape"},
        {"dst://[::1/x", "unbalanced ["},
        {"dst://[::1]x/x", "junk after ]"},
        {"nbd://u@h/x", "user names"},
        {"dst://h/with space", "printable ASCII"},
        {"nbd://h/x?tls=on", "query parameters"},
        {"eth://eth0/02:00:00:00:00:01", "expected eth://"},
        {"eth:///02:00:00:00:00:01/x", "interface name"},
        {"eth://e:0/02:00:00:00:00:01/x", "bad interface name"},
        {"eth://eth0/02:00:00:00:01/x", "bad MAC"},
        {"eth://eth0/ff:ff:ff:ff:ff:ff/x", "multicast"},
        {"eth://eth0/02:00:00:00:00:01/", "missing export"},
        {"eth://eth0/02:00:00:00:00:01/a b", "printable ASCII"},
    };
    for (const Case& c : cases) {
      BlockUri u;
      u.host = "unchanged";
      Status st = ParseBlockUri(c.uri, &u);
      QVERIFY2(!st.ok(), c.uri);
      QCOMPARE(st.code(), Status::Code::kInvalidArgument);
      QVERIFY2(st.message().find(c.why) != std::string::npos, (std::string(c.uri) + ": " + st.message()).c_str());
      QVERIFY2(st.message().find(c.uri) != std::string::npos, st.message().c_str());
      QCOMPARE(u.host, std::string("unchanged"));
    }
    BlockUri u;
    QCOMPARE(ParseBlockUri("nbds+unix:///x?socket=/s", &u).code(), Status::Code::kNotSupported);
    QVERIFY(ParseBlockUri("nbds://h:10900/x", &u).ok());
    QVERIFY(u.tls && u.scheme == UriScheme::kNbd && u.host == "h" && u.port == 10900 && u.export_name == "x");
    QCOMPARE(u.Canonical(), std::string("nbds://h:10900/x"));
    QVERIFY(!ParseBlockUri("dst://h/" + std::string(256, 'a'), &u).ok());
    // eth://IFACE/PEER-MAC/EXPORT: DST over raw Ethernet; the MAC is normalised.
    QVERIFY(ParseBlockUri("eth://veth0/02:AB:cd:00:00:0F/disk", &u).ok());
    QVERIFY(u.eth && !u.tls && u.scheme == UriScheme::kDst && u.host == "veth0" && u.port == 0);
    QCOMPARE(u.mac, std::string("02:ab:cd:00:00:0f"));
    QCOMPARE(u.export_name, std::string("disk"));
    QCOMPARE(u.Canonical(), std::string("eth://veth0/02:ab:cd:00:00:0f/disk"));
    QVERIFY(HasBlockUriScheme("eth://veth0/02:00:00:00:00:01/d"));
  }
};

DST_TEST_MAIN(UriTest)
#include "uri_test.moc"
