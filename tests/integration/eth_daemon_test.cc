// Integration: dstd over raw Ethernet.  Two daemons, each in a network namespace of a veth pair
// the test creates and removes.  Host A exports over eth (and TCP); host B imports an eth://
// volume and assembles a mirror with one Ethernet leg (on A) and one TCP leg (its own export,
// over TLS on 127.0.0.1 inside its namespace), writes through FUSE, survives kill -9 of A and
// resyncs when A comes back.  Also: status and --json report the Ethernet counters and an
// unencrypted segment, and a config without keys is refused naming insecure_segment.
#include <sys/stat.h>

#include <QFile>
#include <QTemporaryDir>
#include <QtTest/QtTest>

#include <memory>

#include "array_helpers.h"
#include "daemon_process.h"
#include "test_env.h"
#include "veth_netns.h"

using dst::test::DaemonProcess;
using dst::test::InNetns;
using nlohmann::json;

namespace {

void RequireNetns() {
  DST_REQUIRE(dst::test::IsRoot(), "network namespaces and AF_PACKET sockets need root");
  DST_REQUIRE(dst::test::HaveTool("ip"), "iproute2 (ip) not installed");
  DST_REQUIRE(std::filesystem::exists(dst::test::BinPath("dstd")), "dstd binary not built");
}

bool StartIn(const dst::test::VethNetns& v, int side, DaemonProcess& d) {
  InNetns in(v.ns(side));
  return in.ok() && d.Start();
}

bool WritePsk(const QString& path) {
  QFile f(path);
  if (!f.open(QIODevice::WriteOnly | QIODevice::Truncate)) return false;
  f.write("host-a:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n"
          "host-b:f0e0d0c0b0a090807060504030201000f0e0d0c0b0a0908070605040302010ff\n");
  f.close();
  return ::chmod(path.toLocal8Bit().constData(), 0600) == 0;
}

json Status(DaemonProcess& d) { return dst::test::CtlJson(d, {"status", "--json"}); }

}  // namespace

class EthDaemonTest : public QObject {
  Q_OBJECT

 private slots:
  void importAndMixedMirror() {
    RequireNetns();
    QTemporaryDir dir;
    QVERIFY(dir.isValid());
    dst::test::FuseGuard fuse_guard;
    fuse_guard.path = dir.path() + "/mnt";
    dst::test::VethNetns v;
    std::string err;
    QVERIFY2(v.Create(&err), err.c_str());
    const QString psk = dir.path() + "/psk";
    QVERIFY(WritePsk(psk));

    DaemonProcess a(dir.path() + "/a");
    a.config() = QString("tls_psk_file = \"%1\"\ntls_identity = \"host-a\"\neth_interfaces = [\"%2\"]\n")
                     .arg(psk, QString::fromStdString(v.ifname(0))) +
                 dst::test::ExportToml("disk", dir.path() + "/a-disk.img", "32M") +
                 dst::test::ExportToml("leg", dir.path() + "/a-leg.img", "32M");
    QVERIFY2(StartIn(v, 0, a), a.Log().right(3000).constData());
    const json sa = Status(a);
    QVERIFY2(sa.contains("eth") && sa["eth"].size() == 1, sa.dump().c_str());
    const std::string mac_a = sa["eth"][0]["mac"];
    QVERIFY(sa["eth"][0]["listening"].get<bool>());
    QVERIFY(sa["eth"][0]["encrypted"].get<bool>());
    QVERIFY(!sa["daemon"]["insecure_segment"].get<bool>());

    DaemonProcess b(dir.path() + "/b");
    b.config() = QString("tls_psk_file = \"%1\"\ntls_identity = \"host-b\"\n").arg(psk) +
                 dst::test::ExportToml("local", dir.path() + "/b-local.img", "32M");
    b.extra_args() << "--mount" << fuse_guard.path;
    QVERIFY2(StartIn(v, 1, b), b.Log().right(3000).constData());

    const QString ifb = QString::fromStdString(v.ifname(1));
    // dstctl discover: A answers B's (sealed) DISCOVER with its exports.
    QByteArray out, e;
    const json disc = dst::test::CtlJson(b, {"discover", ifb, "--json"});
    QVERIFY2(disc.is_object() && disc["stations"].size() == 1, disc.dump().c_str());
    QCOMPARE(disc["stations"][0]["mac"].get<std::string>(), mac_a);
    QCOMPARE(disc["stations"][0]["exports"].size(), std::size_t(2));
    QVERIFY(disc["encrypted"].get<bool>());
    const QString disk_uri = QString("eth://%1/%2/disk").arg(ifb, QString::fromStdString(mac_a));
    QCOMPARE(QString::fromStdString(disc["stations"][0]["exports"][0]["uri"]), disk_uri);
    QVERIFY(b.Ctl({"discover", ifb}, &out) == 0);
    QVERIFY2(out.contains(disk_uri.toUtf8()) && out.contains("32 MiB"), out.constData());
    const QString eth_disk = QString("eth://%1/%2/disk").arg(ifb, QString::fromStdString(mac_a));
    QVERIFY2(b.Ctl({"volume", "import", "v", eth_disk}, &out, &e) == 0, e.constData());
    QVERIFY(dst::test::WaitUntil(
        [&] {
          json s = Status(b);
          for (auto& vol : s.value("volumes", json::array()))
            if (vol.value("name", "") == "v") return vol.value("state", "") == "connected";
          return false;
        },
        20000));
    // Data written through the FUSE file of the eth volume lands in A's image.
    const QByteArray pat = dst::test::Pattern(5, 0, 1 << 20);
    QVERIFY(dst::test::PwriteDirect(fuse_guard.path + "/v.img", 4 << 20, pat));
    QByteArray back;
    QVERIFY(dst::test::PreadDirect(fuse_guard.path + "/v.img", 4 << 20, 1 << 20, &back));
    QVERIFY(back == pat);
    QCOMPARE(dst::test::FirstDiffRange(dir.path() + "/a-disk.img", 4 << 20, fuse_guard.path + "/v.img", 4 << 20,
                                       1 << 20),
             std::int64_t(-1));

    // A mirror of one Ethernet leg and one TCP (TLS) leg.
    const QString eth_leg = QString("eth://%1/%2/leg").arg(ifb, QString::fromStdString(mac_a));
    const QString tcp_leg = QString("dsts://127.0.0.1:%1/local").arg(b.port());
    QVERIFY2(b.Ctl({"array", "create", "m", "--level", "mirror", eth_leg, tcp_leg}, &out, &e) == 0, e.constData());
    json last;
    QVERIFY2(dst::test::WaitArrayClean(b, "m", 60000, &last), last.dump().c_str());
    const QString mfile = fuse_guard.path + "/m.img";
    QVERIFY(dst::test::WaitFileExists(mfile, 10000));
    const QByteArray p1 = dst::test::Pattern(7, 0, 2 << 20);
    QVERIFY(dst::test::PwriteDirect(mfile, 1 << 20, p1));

    // kill -9 of A: the mirror goes on with its TCP leg; writes land there.
    a.Kill9();
    const QByteArray p2 = dst::test::Pattern(8, 0, 1 << 20);
    QVERIFY(dst::test::PwriteDirect(mfile, 8 << 20, p2));
    QVERIFY(dst::test::WaitUntil([&] { return dst::test::ArrayState(dst::test::ArrayDetail(b, "m")) != "clean"; },
                                 30000));
    // A comes back: the Ethernet leg reconnects by itself and gets the regions it missed.
    QVERIFY2(StartIn(v, 0, a), a.Log().right(3000).constData());
    QVERIFY2(dst::test::WaitArrayClean(b, "m", 90000, &last), last.dump().c_str());
    QVERIFY(dst::test::PreadDirect(mfile, 1 << 20, 2 << 20, &back));
    QVERIFY(back == p1);
    QVERIFY(dst::test::PreadDirect(mfile, 8 << 20, 1 << 20, &back));
    QVERIFY(back == p2);

    // The counters: batching on the Ethernet side, nothing forged.
    const json sb = Status(b);
    QVERIFY2(sb["eth"].size() == 1, sb.dump().c_str());
    const json& eb = sb["eth"][0];
    qInfo("B eth: %s", eb.dump().c_str());
    QCOMPARE(QString::fromStdString(eb["interface"]), ifb);
    QVERIFY(eb["frames_sent"].get<std::uint64_t>() > 0);
    QVERIFY(eb["frames_per_send_call"].get<double>() >= 1.0);
    QCOMPARE(eb["bad_tag"].get<std::uint64_t>(), std::uint64_t(0));
    QVERIFY(b.Ctl({"status"}, &out) == 0);
    QVERIFY2(out.contains("eth " + ifb.toUtf8()) && out.contains("aes-256-gcm"), out.constData());
    QCOMPARE(b.Terminate(), 0);
    QCOMPARE(a.Terminate(), 0);
  }

  // Without keys dstd refuses an Ethernet listener unless insecure_segment says so; then status
  // warns.
  void insecureSegmentIsExplicit() {
    RequireNetns();
    QTemporaryDir dir;
    QVERIFY(dir.isValid());
    dst::test::VethNetns v;
    std::string err;
    QVERIFY2(v.Create(&err), err.c_str());
    DaemonProcess a(dir.path() + "/a");
    a.config() = QString("eth_interfaces = [\"%1\"]\n").arg(QString::fromStdString(v.ifname(0)));
    QVERIFY(!StartIn(v, 0, a));
    QVERIFY2(a.Log().contains("insecure_segment"), a.Log().right(2000).constData());

    a.config() = QString("eth_interfaces = [\"%1\"]\ninsecure_segment = true\n").arg(QString::fromStdString(v.ifname(0)));
    QVERIFY2(StartIn(v, 0, a), a.Log().right(3000).constData());
    const json s = Status(a);
    QVERIFY(s["daemon"]["insecure_segment"].get<bool>());
    QVERIFY(!s["eth"][0]["encrypted"].get<bool>());
    QByteArray out;
    QVERIFY(a.Ctl({"status"}, &out) == 0);
    QVERIFY2(out.contains("insecure_segment") && out.contains("UNENCRYPTED"), out.constData());
    QCOMPARE(a.Terminate(), 0);
  }
};

QTEST_GUILESS_MAIN(EthDaemonTest)
#include "eth_daemon_test.moc"
