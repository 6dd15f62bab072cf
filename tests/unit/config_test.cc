// dstd configuration parsing and validation (daemon/src/config.cc).
#include <QTemporaryDir>
#include <QtTest/QtTest>

#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "dst/daemon/config.h"
#include "dst/mirror_device.h"
#include "test_env.h"

using dst::daemon::Config;
using dst::daemon::LoadConfigFile;
using dst::daemon::ParseConfig;
using dst::daemon::ParseListen;
using dst::daemon::ParseSize;
using dst::daemon::ParseVolumeUri;

class ConfigTest : public QObject {
  Q_OBJECT

 private:
  // Parses `text` as "test.toml" (file checks off) and returns the error message, or "" if OK.
  static std::string Error(const std::string& text, bool check_files = false) {
    auto r = ParseConfig(text, "test.toml", {check_files});
    return r.ok() ? std::string() : r.status().message();
  }

 private slots:
  void FullConfig() {
    auto r = ParseConfig("\n"
        "[daemon]\n"
        "listen = \"127.0.0.1:7401\"\n"
        "mountpoint = \"/run/dst/volumes\"\n"
        "batching = false\n"
        "\n"
        "[[export]]\n"
        "name = \"disk1\"\n"
        "path = \"/var/lib/dst/disk1.img\"\n"
        "size = \"1G\"\n"
        "read_only = true\n"
        "direct_io = true\n"
        "\n"
        "[[export]]\n"
        "name = \"disk2\"\n"
        "path = \"/var/lib/dst/disk2.img\"\n"
        "size = 1048576\n"
        "\n"
        "[[volume]]\n"
        "name = \"vol1\"\n"
        "remote = \"dst://127.0.0.2:7400/disk1\"\n"
        "queue_depth = 32\n"
        "io_timeout = 30\n"
        "keepalive_timeout = 3\n"
        "checksum = \"xxh3\"\n"
        "\n"
        "[[volume]]\n"
        "name = \"local\"\n"
        "path = \"/srv/local.img\"\n", "x.toml", {false});
    QVERIFY2(r.ok(), r.status().message().c_str());
    const Config& c = r.value();
    QCOMPARE(c.listen_host, std::string("127.0.0.1"));
    QCOMPARE(c.listen_port, std::uint16_t(7401));
    QCOMPARE(c.mountpoint, std::string("/run/dst/volumes"));
    QCOMPARE(c.batching, false);
    QCOMPARE(c.exports.size(), std::size_t(2));
    QCOMPARE(c.exports[0].name, std::string("disk1"));
    QCOMPARE(c.exports[0].size, std::uint64_t(1) << 30);
    QVERIFY(c.exports[0].read_only);
    QVERIFY(c.exports[0].direct_io);
    QCOMPARE(c.exports[1].size, std::uint64_t(1) << 20);
    QVERIFY(!c.exports[1].read_only);
    QCOMPARE(c.volumes.size(), std::size_t(2));
    QCOMPARE(c.volumes[0].host, std::string("127.0.0.2"));
    QCOMPARE(c.volumes[0].port, std::uint16_t(7400));
    QCOMPARE(c.volumes[0].export_name, std::string("disk1"));
    QCOMPARE(c.volumes[0].queue_depth, 32u);
    QCOMPARE(c.volumes[0].io_timeout_s, 30u);
    QCOMPARE(c.volumes[0].keepalive_timeout_s, 3u);
    QCOMPARE(c.volumes[0].checksum, std::string("xxh3"));
    QVERIFY(c.volumes[1].checksum.empty());  // default: off
    QVERIFY(!ParseConfig("[[volume]]\nname = \"v\"\nremote = \"dst://h/e\"\nchecksum = \"crc\"\n", "c.toml",
                         {false}).ok());
    // The same key on an array applies to its dst:// legs.
    auto arr = ParseConfig("[[array]]\nname = \"m\"\nlegs = [\"dst://h/a\", \"dst://h/b\"]\nchecksum = \"xxh3\"\n",
                           "c.toml", {false});
    QVERIFY2(arr.ok(), arr.status().ToString().c_str());
    QCOMPARE(arr->arrays[0].checksum, std::string("xxh3"));
    QVERIFY(!ParseConfig("[[array]]\nname = \"m\"\nlegs = [\"dst://h/a\", \"dst://h/b\"]\nchecksum = 1\n",
                         "c.toml", {false}).ok());
    QCOMPARE(c.volumes[1].path, std::string("/srv/local.img"));
    QCOMPARE(c.volumes[1].queue_depth, 64u);  // default
  }

  void Defaults() {
    auto r = ParseConfig("", "empty.toml", {false});
    QVERIFY(r.ok());
    QCOMPARE(r.value().listen_host, std::string("127.0.0.1"));
    QCOMPARE(r.value().listen_port, std::uint16_t(7400));
    QVERIFY(r.value().batching);
    QVERIFY(r.value().mountpoint.empty());
    auto p0 = ParseConfig("[daemon]\nlisten = \"[::1]:0\"\n", "v6.toml", {false});
    QVERIFY(p0.ok());
    QCOMPARE(p0.value().listen_host, std::string("::1"));
    QCOMPARE(p0.value().listen_port, std::uint16_t(0));
  }

  void Sizes() {
    QCOMPARE(ParseSize("4096").value(), std::uint64_t(4096));
    QCOMPARE(ParseSize("512K").value(), std::uint64_t(512) << 10);
    QCOMPARE(ParseSize("512M").value(), std::uint64_t(512) << 20);
    QCOMPARE(ParseSize("1G").value(), std::uint64_t(1) << 30);
    QCOMPARE(ParseSize("2T").value(), std::uint64_t(2) << 40);
    QCOMPARE(ParseSize("1GiB").value(), std::uint64_t(1) << 30);
    QCOMPARE(ParseSize("3g").value(), std::uint64_t(3) << 30);
    for (const char* bad : {"", "1X", "G", "-1", "0", "1.5G", "100", "1 G", "1Gb", "99999999999T"}) {
      auto r = ParseSize(bad);
      QVERIFY2(!r.ok(), bad);
      QVERIFY2(r.status().message().find("bad size") != std::string::npos, bad);
    }
  }

  void Uris() {
    std::string host, name;
    std::uint16_t port = 0;
    QVERIFY(ParseVolumeUri("dst://host.example:7500/disk1", &host, &port, &name).ok());
    QCOMPARE(host, std::string("host.example"));
    QCOMPARE(port, std::uint16_t(7500));
    QCOMPARE(name, std::string("disk1"));
    QVERIFY(ParseVolumeUri("dst://127.0.0.1/d", &host, &port, &name).ok());
    QCOMPARE(port, std::uint16_t(7400));
    QVERIFY(ParseVolumeUri("dst://[::1]:7401/d", &host, &port, &name).ok());
    QCOMPARE(host, std::string("::1"));
    for (const char* bad : {"nbd://h/d", "dst://h", "dst:///d", "dst://h:0/d", "dst://h:70000/d",
                            "dst://h:x/d", "dst://h/", "dst://h/a/b", "dst://[::1/d"}) {
      QVERIFY2(!ParseVolumeUri(bad, &host, &port, &name).ok(), bad);
    }
    QVERIFY(!ParseListen("nohostport", &host, &port).ok());
    QVERIFY(!ParseListen("h:65536", &host, &port).ok());
    QVERIFY(!ParseListen("::1:80", &host, &port).ok());
  }

  // Each invalid config fails with one line naming the file, line, key and problem.
  void Invalid_data() {
    QTest::addColumn<QString>("text");
    QTest::addColumn<QString>("expected");
    QTest::newRow("unknown top-level key") << "[deamon]\nlisten = \"x:1\"\n"
                                           << "test.toml:1: deamon: unknown top-level key";
    QTest::newRow("unknown daemon key") << "[daemon]\nlisten = \"127.0.0.1:1\"\nbatch = true\n"
                                        << "test.toml:3: [daemon]: batch: unknown key";
    QTest::newRow("bad listen") << "[daemon]\nlisten = \"127.0.0.1\"\n"
                                << "test.toml:2: [daemon]: listen: bad address \"127.0.0.1\"";
    QTest::newRow("bad size suffix") << "[[export]]\nname = \"d\"\npath = \"/x\"\nsize = \"1X\"\n"
                                     << "test.toml:4: export \"d\": size: bad size \"1X\"";
    QTest::newRow("size not multiple of 512") << "[[export]]\nname = \"d\"\npath = \"/x\"\nsize = 1000\n"
                                              << "test.toml:4: export \"d\": size: bad size 1000";
    QTest::newRow("duplicate export") << "[[export]]\nname = \"d\"\npath = \"/x\"\nsize = \"1M\"\n"
                                         "[[export]]\nname = \"d\"\npath = \"/y\"\nsize = \"1M\"\n"
                                      << "test.toml:5: export \"d\": name: duplicate name";
    QTest::newRow("duplicate volume") << "[[volume]]\nname = \"v\"\npath = \"/a\"\n"
                                         "[[volume]]\nname = \"v\"\npath = \"/b\"\n"
                                      << "volume \"v\": name: duplicate name";
    QTest::newRow("bad uri") << "[[volume]]\nname = \"v\"\nremote = \"http://h/d\"\n"
                             << "test.toml:3: volume \"v\": remote: bad URI \"http://h/d\"";
    QTest::newRow("remote and path") << "[[volume]]\nname = \"v\"\nremote = \"dst://h/d\"\npath = \"/x\"\n"
                                     << "volume \"v\": remote/path: give either remote or path, not both";
    QTest::newRow("neither remote nor path") << "[[volume]]\nname = \"v\"\n"
                                             << "volume \"v\": remote/path: one of remote or path is required";
    QTest::newRow("export without name") << "[[export]]\npath = \"/x\"\n"
                                         << "[[export]] #1: name: missing";
    QTest::newRow("export without path") << "[[export]]\nname = \"d\"\nsize = \"1M\"\n"
                                         << "export \"d\": path: missing";
    QTest::newRow("bad name") << "[[export]]\nname = \"a/b\"\npath = \"/x\"\n"
                              << "[[export]] #1: name: bad name \"a/b\"";
    QTest::newRow("wrong type") << "[[export]]\nname = \"d\"\npath = \"/x\"\nread_only = \"yes\"\n"
                                << "test.toml:4: export \"d\": read_only: expected true or false, got a string";
    QTest::newRow("queue depth range") << "[[volume]]\nname = \"v\"\nremote = \"dst://h/d\"\nqueue_depth = 0\n"
                                       << "test.toml:4: volume \"v\": queue_depth: 0 is out of range (1..1024)";
    QTest::newRow("unknown export key") << "[[export]]\nname = \"d\"\npath = \"/x\"\nsize = \"1M\"\nreadonly = true\n"
                                        << "test.toml:5: export \"d\": readonly: unknown key";
    QTest::newRow("export not an array of tables") << "export = \"d\"\n"
                                                   << "export: must be written as [[export]] tables";
    QTest::newRow("toml syntax") << "[daemon\nlisten = 1\n" << "test.toml:1: TOML syntax:";
    QTest::newRow("relative mountpoint") << "[daemon]\nmountpoint = \"mnt\"\n"
                                         << "mountpoint: \"mnt\" must be an absolute path";
  }

  void Invalid() {
    QFETCH(QString, text);
    QFETCH(QString, expected);
    std::string err = Error(text.toStdString());
    QVERIFY2(!err.empty(), "config was accepted");
    QVERIFY2(err.find('\n') == std::string::npos, err.c_str());
    QVERIFY2(err.find(expected.toStdString()) != std::string::npos,
             ("got: " + err + "\nexpected to contain: " + expected.toStdString()).c_str());
  }

  // check_files: a missing export image needs a size; a missing local volume is an error.
  void FileChecks() {
    QTemporaryDir dir;
    std::string img = dir.path().toStdString() + "/a.img";
    std::string missing_export = "[[export]]\nname = \"d\"\npath = \"" + img + "\"\n";
    std::string err = Error(missing_export, true);
    QVERIFY2(err.find("does not exist and no size is given") != std::string::npos, err.c_str());
    QVERIFY(Error(missing_export + "size = \"1M\"\n", true).empty());
    { std::ofstream(img) << "x"; }
    QVERIFY(Error(missing_export, true).empty());
    // An image is never shrunk; growing it needs grow = true (issue 9, 11a).
    {
      std::ofstream f(img, std::ios::trunc);
      f << std::string(1 << 20, 'x');
    }
    err = Error(missing_export + "size = \"4K\"\n", true);
    QVERIFY2(err.find("1048576 bytes and size is 4096 bytes: an image is never shrunk") !=
                 std::string::npos, err.c_str());
    err = Error(missing_export + "size = \"2M\"\n", true);
    QVERIFY2(err.find("set grow = true") != std::string::npos, err.c_str());
    QVERIFY(Error(missing_export + "size = \"2M\"\ngrow = true\n", true).empty());
    QVERIFY(Error(missing_export + "size = \"1M\"\n", true).empty());
    err = Error(missing_export + "grow = true\n", true);
    QVERIFY2(err.find("needs a size") != std::string::npos, err.c_str());
    std::string vol = "[[volume]]\nname = \"v\"\npath = \"" + img + ".nope\"\n";
    err = Error(vol, true);
    QVERIFY2(err.find("does not exist") != std::string::npos, err.c_str());
  }

  // [[array]] tables, leg specs, and exports of arrays/volumes.
  void Arrays() {
    auto r = ParseConfig("\n"
        "[[volume]]\nname = \"v1\"\nremote = \"dst://127.0.0.1:7401/d1\"\n"
        "[[array]]\n"
        "name = \"m0\"\nlevel = \"mirror\"\n"
        "legs = [\"dst://127.0.0.1:7402/d2\", \"volume:v1\", \"/srv/leg.img\"]\n"
        "region_size = \"128K\"\nresync_rate_min = \"5M\"\nresync_rate_max = 0\n"
        "write_intent = false\nleg_timeout = 3\n"
        "[[array]]\nname = \"l0\"\nlevel = \"linear\"\nlegs = [\"array:m0\", \"nbd://h:10809/x\"]\n"
        "[[export]]\nname = \"e0\"\narray = \"l0\"\n"
        "[[export]]\nname = \"e1\"\nvolume = \"v1\"\nread_only = true\n",
        "test.toml", {false});
    QVERIFY2(r.ok(), r.status().message().c_str());
    const Config& c = r.value();
    QCOMPARE(c.arrays.size(), std::size_t(2));
    const auto& m = c.arrays[0];
    QCOMPARE(m.name, std::string("m0"));
    QCOMPARE(m.level, std::string("mirror"));
    QCOMPARE(m.legs.size(), std::size_t(3));
    QCOMPARE(m.legs[1], std::string("volume:v1"));
    // The mirror's keys are registry keys (dst/layer.h): canonical text in params.
    QCOMPARE(m.params.at("region_size"), std::string("131072"));
    QCOMPARE(dst::MirrorKeysFrom(m.params).region_size, 128u * 1024);
    QCOMPARE(dst::MirrorKeysFrom(m.params).resync_rate_min, std::uint64_t(5) << 20);
    QCOMPARE(dst::MirrorKeysFrom(m.params).resync_rate_max, std::uint64_t(0));
    QVERIFY(!dst::MirrorKeysFrom(m.params).write_intent);
    QCOMPARE(m.params.at("write_intent"), std::string("false"));
    QCOMPARE(m.leg_timeout_s, 3u);
    QCOMPARE(c.arrays[1].level, std::string("linear"));
    QCOMPARE(c.exports[0].array, std::string("l0"));
    QVERIFY(c.exports[0].path.empty());
    QCOMPARE(c.exports[1].volume, std::string("v1"));
    // Defaults.
    auto d = ParseConfig("[[array]]\nname = \"a\"\nlegs = [\"/a\", \"/b\"]\n", "t", {false});
    QVERIFY2(d.ok(), d.status().message().c_str());
    QCOMPARE(d.value().arrays[0].level, std::string("mirror"));
    const auto& dp = d.value().arrays[0].params;  // defaults filled in from the registry
    QCOMPARE(dp.at("region_size"), std::string("65536"));
    QCOMPARE(dst::MirrorKeysFrom(dp).resync_rate_min, std::uint64_t(10) << 20);
    QCOMPARE(dst::MirrorKeysFrom(dp).resync_rate_max, std::uint64_t(200) << 20);
    QVERIFY(dst::MirrorKeysFrom(dp).write_intent);
    // A mirror key on a layer without it is refused, naming the keys that layer has.
    auto lin = ParseConfig("[[array]]\nname = \"l\"\nlevel = \"linear\"\nlegs = [\"/a\", \"/b\"]\n"
                           "region_size = \"64K\"\n", "t", {false});
    QVERIFY(!lin.ok());
    QVERIFY2(lin.status().message().find("region_size: unknown key") != std::string::npos,
             lin.status().message().c_str());
  }

  void LegSpecs() {
    using dst::daemon::LegSpec;
    LegSpec ls;
    QVERIFY(dst::daemon::ParseLegSpec("dst://127.0.0.1:7401/d1", &ls).ok());
    QVERIFY(ls.kind == LegSpec::Kind::kDst);
    QVERIFY(dst::daemon::ParseLegSpec("dsts://127.0.0.1:7401/d1", &ls).ok());  // DST inside TLS
    QVERIFY(ls.kind == LegSpec::Kind::kDst);
    QVERIFY(dst::daemon::ParseLegSpec("nbd://h/x", &ls).ok());
    QVERIFY(ls.kind == LegSpec::Kind::kNbd);
    QVERIFY(dst::daemon::ParseLegSpec("/dev/sdb", &ls).ok());
    QVERIFY(ls.kind == LegSpec::Kind::kPath);
    QVERIFY(dst::daemon::ParseLegSpec("volume:v1", &ls).ok());
    QVERIFY(ls.kind == LegSpec::Kind::kVolume);
    QCOMPARE(ls.ref, std::string("v1"));
    QVERIFY(dst::daemon::ParseLegSpec("array:m0", &ls).ok());
    QVERIFY(ls.kind == LegSpec::Kind::kArray);
    for (const char* bad : {"", "rel/path", "volume:", "array:a/b", "dst://h", "dst://h:0/x", "dsts://h",
                            "http://h/x", "nbd:///x"})
      QVERIFY2(!dst::daemon::ParseLegSpec(bad, &ls).ok(), bad);
    QCOMPARE(dst::daemon::ParseRate("0").value(), std::uint64_t(0));
    QCOMPARE(dst::daemon::ParseRate("500K").value(), std::uint64_t(500) << 10);
    QCOMPARE(dst::daemon::ParseRate("10MB/s").value(), std::uint64_t(10) << 20);
    QVERIFY(!dst::daemon::ParseRate("fast").ok());
    QVERIFY(!dst::daemon::ParseRate("10X").ok());
  }

  void ArrayInvalid_data() {
    QTest::addColumn<QString>("text");
    QTest::addColumn<QString>("expected");
    QTest::newRow("bad level") << "[[array]]\nname = \"a\"\nlevel = \"raid5\"\nlegs = [\"/a\", \"/b\"]\n"
                               << "test.toml:3: array \"a\": level: unknown level \"raid5\"";
    QTest::newRow("mirror one leg") << "[[array]]\nname = \"a\"\nlegs = [\"/a\"]\n"
                                    << "array \"a\": legs: a mirror needs at least 2 legs, got 1";
    QTest::newRow("mirror nine legs")
        << "[[array]]\nname = \"a\"\nlegs = [\"/1\",\"/2\",\"/3\",\"/4\",\"/5\",\"/6\",\"/7\",\"/8\",\"/9\"]\n"
        << "a mirror has at most 8 legs";
    QTest::newRow("linear no legs") << "[[array]]\nname = \"a\"\nlevel = \"linear\"\nlegs = []\n"
                                    << "array \"a\": legs: a linear needs at least 1 leg";
    QTest::newRow("legs missing") << "[[array]]\nname = \"a\"\n" << "array \"a\": legs: missing";
    QTest::newRow("legs not array") << "[[array]]\nname = \"a\"\nlegs = \"/a\"\n"
                                    << "legs: expected an array of strings, got a string";
    QTest::newRow("bad leg spec") << "[[array]]\nname = \"a\"\nlegs = [\"/a\", \"tcp://h/x\"]\n"
                                  << "test.toml:3: array \"a\": legs: bad leg \"tcp://h/x\"";
    QTest::newRow("leg twice") << "[[array]]\nname = \"a\"\nlegs = [\"/a\", \"/a\"]\n"
                               << "leg \"/a\" is listed twice";
    QTest::newRow("region not power of 2") << "[[array]]\nname = \"a\"\nlegs = [\"/a\", \"/b\"]\nregion_size = \"96K\"\n"
                                           << "test.toml:4: array \"a\": region_size: must be a power of two";
    QTest::newRow("region too small") << "[[array]]\nname = \"a\"\nlegs = [\"/a\", \"/b\"]\nregion_size = 512\n"
                                      << "region_size: must be a power of two between 4K and 1G";
    QTest::newRow("bad rate") << "[[array]]\nname = \"a\"\nlegs = [\"/a\", \"/b\"]\nresync_rate_max = \"fast\"\n"
                              << "resync_rate_max: bad rate \"fast\"";
    QTest::newRow("min above max") << "[[array]]\nname = \"a\"\nlegs = [\"/a\", \"/b\"]\nresync_rate_min = \"20M\"\nresync_rate_max = \"10M\"\n"
                                   << "resync_rate_min: must not exceed resync_rate_max";
    QTest::newRow("unknown array key") << "[[array]]\nname = \"a\"\nlegs = [\"/a\", \"/b\"]\nchunk = 4\n"
                                       << "test.toml:4: array \"a\": chunk: unknown key";
    QTest::newRow("unknown volume ref") << "[[array]]\nname = \"a\"\nlegs = [\"/a\", \"volume:nope\"]\n"
                                        << "array \"a\": leg \"volume:nope\": no [[volume]] named \"nope\"";
    QTest::newRow("unknown array ref") << "[[array]]\nname = \"a\"\nlevel = \"linear\"\nlegs = [\"array:nope\"]\n"
                                       << "no [[array]] named \"nope\"";
    QTest::newRow("self stack") << "[[array]]\nname = \"a\"\nlevel = \"linear\"\nlegs = [\"array:a\"]\n"
                                << "arrays stack in a cycle";
    QTest::newRow("cycle")
        << "[[array]]\nname = \"a\"\nlevel = \"linear\"\nlegs = [\"array:b\"]\n"
           "[[array]]\nname = \"b\"\nlevel = \"linear\"\nlegs = [\"array:a\"]\n"
        << "arrays stack in a cycle: a -> b -> a";
    QTest::newRow("leg shared by two arrays")
        << "[[array]]\nname = \"a\"\nlegs = [\"/x\", \"/y\"]\n"
           "[[array]]\nname = \"b\"\nlegs = [\"/x\", \"/z\"]\n"
        << "leg \"/x\" is used by both array \"a\" and array \"b\"";
    QTest::newRow("array named like a volume")
        << "[[volume]]\nname = \"v\"\npath = \"/a\"\n[[array]]\nname = \"v\"\nlegs = [\"/x\", \"/y\"]\n"
        << "array \"v\": name is also a [[volume]]";
    QTest::newRow("duplicate array") << "[[array]]\nname = \"a\"\nlegs = [\"/x\", \"/y\"]\n"
                                        "[[array]]\nname = \"a\"\nlegs = [\"/z\", \"/w\"]\n"
                                     << "array \"a\": name: duplicate name";
    QTest::newRow("export of unknown array") << "[[export]]\nname = \"e\"\narray = \"nope\"\n"
                                             << "export \"e\": array: no [[array]] named \"nope\"";
    QTest::newRow("export of unknown volume") << "[[export]]\nname = \"e\"\nvolume = \"nope\"\n"
                                              << "export \"e\": volume: no [[volume]] named \"nope\"";
    QTest::newRow("export path and array") << "[[array]]\nname = \"a\"\nlegs = [\"/x\", \"/y\"]\n"
                                              "[[export]]\nname = \"e\"\npath = \"/p\"\narray = \"a\"\n"
                                           << "export \"e\": path/array/volume: give only one of them";
    QTest::newRow("export array with size") << "[[array]]\nname = \"a\"\nlegs = [\"/x\", \"/y\"]\n"
                                               "[[export]]\nname = \"e\"\narray = \"a\"\nsize = \"1M\"\n"
                                            << "export \"e\": size: only valid with path";
    // fuzz_config: grow without size dereferenced the missing size node (UBSan, null member call).
    QTest::newRow("export array with grow") << "[[array]]\nname = \"a\"\nlegs = [\"/x\", \"/y\"]\n"
                                               "[[export]]\nname = \"e\"\ngrow = true\narray = \"a\"\n"
                                            << "export \"e\": grow: only valid with path";
  }

  void ArrayInvalid() {
    QFETCH(QString, text);
    QFETCH(QString, expected);
    std::string err = Error(text.toStdString());
    QVERIFY2(!err.empty(), "config was accepted");
    QVERIFY2(err.find('\n') == std::string::npos, err.c_str());
    QVERIFY2(err.find(expected.toStdString()) != std::string::npos,
             ("got: " + err + "\nexpected to contain: " + expected.toStdString()).c_str());
  }

  void LoadFile() {
    QTemporaryDir dir;
    std::string path = dir.path().toStdString() + "/dstd.toml";
    auto missing = LoadConfigFile(path);
    QVERIFY(!missing.ok());
    QVERIFY(missing.status().message().find(path) != std::string::npos);
    { std::ofstream(path) << "[daemon]\nlisten = \"127.0.0.1:0\"\nfoo = 1\n"; }
    auto bad = LoadConfigFile(path);
    QVERIFY(!bad.ok());
    QVERIFY2(bad.status().message().rfind(path + ":3: [daemon]: foo: unknown key", 0) == 0,
             bad.status().message().c_str());
  }

  // [daemon] export_roots and the path policy (issue 11): canonical paths, so neither ".." nor a
  // symlink leads out of a root; files named in the config stay allowed; the default root is
  // the state directory.
  // [daemon] TLS keys, and no clear-text listener on an address other hosts reach unless
  // insecure = true (issue 11).
  void TlsAndInsecure() {
    auto r = ParseConfig("[daemon]\nlisten = \"0.0.0.0:7400\"\ntls_psk_file = \"/etc/dst/lab.psk\"\n"
                         "tls_identity = \"host-a\"\n[[volume]]\nname = \"v\"\nremote = \"dsts://h:7401/e\"\n",
                         "t.toml", {false});
    QVERIFY2(r.ok(), r.status().message().c_str());
    QVERIFY(r.value().tls());
    QCOMPARE(r.value().tls_identity, std::string("host-a"));
    QCOMPARE(r.value().volumes[0].port, std::uint16_t(7401));
    QVERIFY(ParseConfig("[daemon]\nlisten = \"192.0.2.1:7400\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\n"
                        "tls_ca = \"/ca\"\n", "t.toml", {false}).ok());
    QVERIFY(ParseConfig("[daemon]\nlisten = \"0.0.0.0:7400\"\ninsecure = true\n", "t.toml", {false}).ok());
    // Raw Ethernet: keys (the PSK file) or an explicit insecure_segment; eth:// volumes parse.
    auto eth = ParseConfig("[daemon]\neth_interfaces = [\"veth0\"]\n", "t.toml", {false});
    QVERIFY(!eth.ok());
    QVERIFY2(eth.status().message().find("insecure_segment") != std::string::npos, eth.status().message().c_str());
    eth = ParseConfig("[daemon]\neth_interfaces = [\"veth0\"]\ninsecure_segment = true\n[[volume]]\nname = \"v\"\n"
                    "remote = \"eth://veth0/02:00:00:00:00:01/e\"\n", "t.toml", {false});
    QVERIFY2(eth.ok(), eth.status().message().c_str());
    QVERIFY(eth.value().insecure_segment);
    QCOMPARE(eth.value().eth_interfaces, std::vector<std::string>{"veth0"});
    QCOMPARE(eth.value().volumes[0].host, std::string("veth0"));
    QCOMPARE(eth.value().volumes[0].export_name, std::string("e"));
    QVERIFY(ParseConfig("[daemon]\ntls_psk_file = \"/etc/dst/lab.psk\"\neth_interfaces = [\"veth0\"]\n", "t.toml",
                        {false}).ok());
    QVERIFY(!ParseConfig("[daemon]\ninsecure_segment = true\neth_interfaces = [\"a/b\"]\n", "t.toml", {false}).ok());
    QVERIFY(ParseConfig("[daemon]\nlisten = \"127.0.0.2:7400\"\n", "t.toml", {false}).ok());

    std::string e = Error("[daemon]\nlisten = \"0.0.0.0:7400\"\n");
    QVERIFY2(e.find("test.toml:2") != std::string::npos && e.find("insecure = true") != std::string::npos &&
                 e.find("tls_psk_file") != std::string::npos,
             e.c_str());
    // NBD on a non-loopback address: fine when it requires TLS (the default with keys), refused
    // when it would also serve clear text.
    auto nbd = ParseConfig("[daemon]\nnbd_listen = \"0.0.0.0:10809\"\ntls_psk_file = \"/k\"\n", "t.toml", {false});
    QVERIFY2(nbd.ok(), nbd.status().message().c_str());
    QCOMPARE(nbd.value().nbd_tls_mode(), std::string("require"));
    QVERIFY(ParseConfig("[daemon]\nnbd_listen = \"0.0.0.0:10809\"\ntls_psk_file = \"/k\"\nnbd_tls = \"require\"\n",
                        "t.toml", {false}).ok());
    QCOMPARE(ParseConfig("[daemon]\n", "t.toml", {false}).value().nbd_tls_mode(), std::string("off"));
    e = Error("[daemon]\nnbd_listen = \"0.0.0.0:10809\"\ntls_psk_file = \"/k\"\nnbd_tls = \"allow\"\n");
    QVERIFY2(e.find("nbd_listen") != std::string::npos && e.find("without TLS") != std::string::npos, e.c_str());
    e = Error("[daemon]\nnbd_listen = \"0.0.0.0:10809\"\n");
    QVERIFY2(e.find("nbd_listen") != std::string::npos && e.find("insecure = true") != std::string::npos, e.c_str());
    QVERIFY(ParseConfig("[daemon]\nnbd_listen = \"0.0.0.0:10809\"\ninsecure = true\n", "t.toml", {false}).ok());
    e = Error("[daemon]\nnbd_tls = \"require\"\n");
    QVERIFY2(e.find("nbd_tls") != std::string::npos && e.find("needs TLS keys") != std::string::npos, e.c_str());
    e = Error("[daemon]\ntls_psk_file = \"/k\"\nnbd_tls = \"yes\"\n");
    QVERIFY2(e.find("expected \"require\", \"allow\" or \"off\"") != std::string::npos, e.c_str());
    e = Error("[daemon]\ntls_cert = \"/c\"\n");
    QVERIFY2(e.find("tls_key and tls_ca") != std::string::npos, e.c_str());
    e = Error("[daemon]\ntls_psk_file = \"/k\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\ntls_ca = \"/ca\"\n");
    QVERIFY2(e.find("not both") != std::string::npos, e.c_str());
    e = Error("[daemon]\ntls_psk_file = \"lab.psk\"\n");
    QVERIFY2(e.find("absolute path") != std::string::npos, e.c_str());
  }

  void ExportRoots() {
    QTemporaryDir tmp;
    const std::string d = std::filesystem::canonical(tmp.path().toStdString()).string();
    std::filesystem::create_directories(d + "/roots/sub");
    std::filesystem::create_directories(d + "/state");
    std::filesystem::create_directories(d + "/rootsx");
    { std::ofstream(d + "/roots/a.img") << "x"; }
    { std::ofstream(d + "/named.img") << "x"; }
    std::filesystem::create_symlink("/etc/shadow", d + "/roots/shadow");
    std::filesystem::create_symlink(d, d + "/roots/up");

    auto r = ParseConfig("[daemon]\nexport_roots = [\"" + d + "/roots\", \"/nonexistent\"]\n"
                         "[[export]]\nname = \"n\"\npath = \"" + d + "/named.img\"\n",
                         "test.toml", {false});
    QVERIFY2(r.ok(), r.status().message().c_str());
    QCOMPARE(r.value().export_roots.size(), std::size_t(2));
    std::vector<std::string> skipped;
    auto pp = dst::daemon::MakePathPolicy(r.value(), d + "/state", &skipped);
    QCOMPARE(skipped, std::vector<std::string>{"/nonexistent"});
    auto ok = [&](const std::string& p) { return dst::daemon::CheckPathAllowed(pp, p).ok(); };
    QVERIFY(ok(d + "/roots/a.img"));
    QVERIFY(ok(d + "/roots/new.img"));        // to be created
    QVERIFY(ok(d + "/roots/sub/../a.img"));   // ".." that stays inside
    QVERIFY(ok(d + "/named.img"));            // named in the config file
    QVERIFY(!ok(d + "/roots/../named2.img"));
    QVERIFY(!ok(d + "/roots/../state/x.img"));
    QVERIFY(!ok(d + "/rootsx/x.img"));        // a prefix of the name is not a parent
    QVERIFY(!ok(d + "/roots/shadow"));        // symlink out
    QVERIFY(!ok(d + "/roots/up/named2.img"));  // symlinked directory out
    QVERIFY(!ok(d + "/roots/.."));
    QVERIFY(!ok("relative.img"));
    auto shadow = dst::daemon::CheckPathAllowed(pp, "/etc/shadow");
    QVERIFY(!shadow.ok());
    QVERIFY2(shadow.message().find("/etc/shadow is outside export_roots (" + d + "/roots)") !=
                 std::string::npos,
             shadow.message().c_str());
    // Default: the state directory only.
    auto def = dst::daemon::MakePathPolicy(Config{}, d + "/state");
    QVERIFY(dst::daemon::CheckPathAllowed(def, d + "/state/v.img").ok());
    QVERIFY(!dst::daemon::CheckPathAllowed(def, d + "/roots/a.img").ok());

    QVERIFY(Error("[daemon]\nexport_roots = \"/srv\"\n").find("expected an array") !=
            std::string::npos);
    QVERIFY(Error("[daemon]\nexport_roots = [\"srv\"]\n").find("must be an absolute path") !=
            std::string::npos);
  }

  // [limits] (issue 11 item 3) and the FUSE access keys (item 4): defaults, values, errors.
  // [[export]] allow: access rules (default deny: none given, none allowed).
  void ExportAllow() {
    auto r = ParseConfig("[[export]]\nname = \"e\"\npath = \"/x.img\"\nsize = \"1M\"\n"
                         "allow = [\"hostc:rw\", \"backup:ro\", \"anonymous:ro\"]\n"
                         "[[export]]\nname = \"f\"\npath = \"/y.img\"\nsize = \"1M\"\n",
                         "c.toml", {false});
    QVERIFY2(r.ok(), r.status().ToString().c_str());
    QCOMPARE(r.value().exports[0].allow.size(), std::size_t(3));
    QCOMPARE(r.value().exports[0].allow[1].identity, std::string("backup"));
    QVERIFY(r.value().exports[0].allow[1].read_only);
    QVERIFY(r.value().exports[1].allow.empty());
    for (const char* bad : {"allow = \"hostc:rw\"", "allow = [\"hostc\"]", "allow = [\"hostc:rx\"]", "allow = [1]"}) {
      auto b = ParseConfig(std::string("[[export]]\nname = \"e\"\npath = \"/x.img\"\nsize = \"1M\"\n") + bad + "\n",
                           "c.toml", {false});
      QVERIFY2(!b.ok(), bad);
      QVERIFY2(b.status().message().find("allow") != std::string::npos, b.status().ToString().c_str());
    }
  }

  void LimitsAndFuseAccess() {
    auto def = ParseConfig("", "test.toml", {false});
    QVERIFY(def.ok());
    const auto& dl = def.value().limits;
    QCOMPARE(dl.handshake_timeout_s, 10ull);
    QCOMPARE(dl.idle_timeout_s, 600ull);
    QCOMPARE(dl.nbd_idle_timeout_s, 0ull);
    QCOMPARE(dl.max_connections, 256u);
    QCOMPARE(dl.max_connections_per_address, 32u);
    QCOMPARE(dl.min_drain_rate, 262144u);
    QVERIFY(!def.value().fuse_allow_other);

    auto r = ParseConfig("[daemon]\nfuse_allow_other = true\n"
                         "[limits]\nhandshake_timeout = 5\nidle_timeout = \"2m\"\nnbd_idle_timeout = \"1h\"\n"
                         "stall_timeout = 20\nmax_connections = 1000\nmax_connections_per_address = 0\n"
                         "max_connections_per_identity = 4\nnbd_max_option_length = 4096\nnbd_max_options = 16\n"
                         "nbd_max_meta_queries = 8\nnbd_max_meta_query_length = 256\nmin_drain_rate = 65536\ndrain_window = 5\n"
                         "[[volume]]\nname = \"a\"\npath = \"/x\"\nmode = \"0640\"\nowner = \"root:root\"\n"
                         "[[volume]]\nname = \"b\"\npath = \"/y\"\nowner = \"65534:100\"\n"
                         "[[volume]]\nname = \"c\"\npath = \"/z\"\n",
                         "test.toml", {false});
    QVERIFY2(r.ok(), r.status().message().c_str());
    const auto& c = r.value();
    QVERIFY(c.fuse_allow_other);
    QCOMPARE(c.limits.handshake_timeout_s, 5ull);
    QCOMPARE(c.limits.idle_timeout_s, 120ull);
    QCOMPARE(c.limits.nbd_idle_timeout_s, 3600ull);
    QCOMPARE(c.limits.stall_timeout_s, 20ull);
    QCOMPARE(c.limits.max_connections, 1000u);
    QCOMPARE(c.limits.max_connections_per_address, 0u);
    QCOMPARE(c.limits.max_connections_per_identity, 4u);
    QCOMPARE(c.limits.min_drain_rate, 65536u);
    QCOMPARE(c.limits.drain_window_s, 5ull);
    QCOMPARE(c.limits.nbd_max_option_length, 4096u);
    QCOMPARE(c.limits.nbd_max_options, 16u);
    QCOMPARE(c.limits.nbd_max_meta_queries, 8u);
    QCOMPARE(c.limits.nbd_max_meta_query_length, 256u);
    QCOMPARE(c.volumes[0].mode, 0640u);
    QCOMPARE(c.volumes[0].owner_uid, 0ll);
    QCOMPARE(c.volumes[0].owner_gid, 0ll);
    QCOMPARE(c.volumes[1].owner_uid, 65534ll);
    QCOMPARE(c.volumes[1].owner_gid, 100ll);
    QCOMPARE(c.volumes[2].mode, 0600u);  // the default: the daemon's user only
    QCOMPARE(c.volumes[2].owner_uid, -1ll);

    QVERIFY(Error("[limits]\nmax_conns = 3\n").find("[limits]: max_conns: unknown key") != std::string::npos);
    QVERIFY(Error("[limits]\nnbd_max_options = 0\n").find("out of range") != std::string::npos);
    QVERIFY(Error("[limits]\nidle_timeout = \"soon\"\n").find("[limits]: idle_timeout") != std::string::npos);
    QVERIFY(Error("[limits]\nmax_connections = -1\n").find("out of range") != std::string::npos);
    const std::string vol = "[[volume]]\nname = \"v\"\npath = \"/x\"\n";
    QVERIFY(Error(vol + "mode = \"0x1ff\"\n").find("volume \"v\": mode: bad mode") != std::string::npos);
    QVERIFY(Error(vol + "mode = \"4755\"\n").find("above 0777") != std::string::npos);
    QVERIFY(Error(vol + "owner = \"no-such-user-dst\"\n").find("no such user") != std::string::npos);
    QVERIFY(Error(vol + "owner = \"root:no-such-group-dst\"\n").find("no such group") != std::string::npos);
    QVERIFY(Error(vol + "owner = \"root:\"\n").find("bad owner") != std::string::npos);
    QVERIFY(Error("[daemon]\nfuse_allow_other = \"yes\"\n").find("expected true or false") != std::string::npos);
  }
};

DST_TEST_MAIN(ConfigTest)
#include "config_test.moc"
