// raid0 through dstctl against a real dstd (issue 10 item 3: the layer registry's proof):
//
//   * `array layers` lists raid0 with its chunk key; `array create --level raid0 --set chunk=128K`
//     over two local file legs of different sizes gives min(leg) rounded to the chunk x 2;
//   * data written through the FUSE file lands striped on the leg files (chunk k on leg k % 2
//     at (k / 2) * chunk) and reads back;
//   * status, array list and detail (text and --json) show the layer, its title and chunk;
//   * refusals: a bad chunk, an unknown level (the message lists the registered layers),
//     growing or failing a leg of a raid0;
//   * after a dstd restart the array is assembled again from the topology table with the same
//     chunk, and the data reads back.
#include <QtTest/QtTest>
#include <sqlite3.h>

#include <filesystem>
#include <set>

#include "array_helpers.h"
#include "test_env.h"

using namespace dst::test;
using nlohmann::json;

namespace {
constexpr std::uint64_t kChunk = 128 << 10;
constexpr std::uint64_t kLeg0 = 8 << 20;
constexpr std::uint64_t kLeg1 = (8 << 20) + 3 * 4096;  // the smaller leg sets the size
constexpr std::uint32_t kData = 1 << 20;              // 8 chunks: 4 stripes over 2 legs

QByteArray ReadRange(const QString& path, std::uint64_t off, std::uint64_t len) {
  QFile f(path);
  if (!f.open(QIODevice::ReadOnly) || !f.seek(qint64(off))) return {};
  return f.read(qint64(len));
}

// The array's data (from 0) is where the striping formula puts it on the leg files.
bool StripedOnLegs(const QByteArray& data, const QString& leg0, const QString& leg1, QString* why) {
  const QString legs[2] = {leg0, leg1};
  for (std::uint64_t k = 0; k * kChunk < std::uint64_t(data.size()); ++k) {
    QByteArray want = data.mid(qsizetype(k * kChunk), qsizetype(kChunk));
    QByteArray got = ReadRange(legs[k % 2], k / 2 * kChunk, kChunk);
    if (got != want) {
      *why = QString("chunk %1 is not at leg %2 offset %3").arg(k).arg(k % 2).arg(k / 2 * kChunk);
      return false;
    }
  }
  return true;
}

const json* FindArray(const json& arrays, const std::string& name) {
  for (auto& a : arrays)
    if (a.value("name", "") == name) return &a;
  return nullptr;
}
}  // namespace

class ArrayRaid0Test : public QObject {
  Q_OBJECT

 private slots:
  void init() {
    DST_REQUIRE(IsRoot() && HaveFuse() && std::filesystem::exists(BinPath("dstd")),
                "needs root, /dev/fuse (the FUSE mount) and a built dstd");
  }

  void createWriteRestart() {
    MirrorRig rig;
    QString why;
    QVERIFY2(rig.StartEmpty(0, 0, &why), qPrintable(why));
    const QString l0 = rig.dir.path() + "/l0.img", l1 = rig.dir.path() + "/l1.img",
                  l2 = rig.dir.path() + "/l2.img";
    QVERIFY(MakeSparse(l0, kLeg0));
    QVERIFY(MakeSparse(l1, kLeg1));
    QVERIFY(MakeSparse(l2, kLeg0));

    // The registry as dstctl sees it through the daemon.
    QByteArray out, err;
    QVERIFY2(rig.as->Ctl({"array", "layers"}, &out, &err) == 0, err.constData());
    QVERIFY2(out.contains("raid0: raid0 (striped)") && out.contains("--set chunk=VALUE") &&
                 out.contains("default 64 KiB"),
             out.constData());
    json layers = CtlJson(*rig.as, {"array", "layers", "--json"}, &why);
    QVERIFY2(layers.is_object(), qPrintable(why));
    const json* r0l = FindArray(layers["layers"], "raid0");
    QVERIFY(r0l);
    QCOMPARE((*r0l)["legs"].value("change", ""), std::string("fixed"));
    // The mirror's keys are registry keys too (issue 10): listed with types and defaults, and
    // refused on a layer that does not have them.
    const json* ml = FindArray(layers["layers"], "mirror");
    QVERIFY(ml);
    std::set<std::string> mkeys;
    for (auto& k : (*ml)["keys"]) mkeys.insert(k.value("name", ""));
    QVERIFY2(mkeys.count("region_size") && mkeys.count("resync_rate_min") &&
                 mkeys.count("resync_rate_max") && mkeys.count("write_intent"),
             (*ml).dump().c_str());
    QVERIFY2(out.contains("--set resync_rate_min=VALUE"), out.constData());
    QVERIFY(rig.as->Ctl({"array", "create", "bad", "--level", "raid0", "--region-size", "64K", l0, l1},
                        &out, &err) != 0);
    QVERIFY2(err.contains("a raid0 array has no key \"region_size\""), err.constData());

    // Refusals, each before anything is created.
    QVERIFY(rig.as->Ctl({"array", "create", "bad", "--level", "raid0", "--set", "chunk=12K", l0, l1},
                        &out, &err) != 0);
    QVERIFY2(err.contains("chunk: must be a power of two"), err.constData());
    QVERIFY(rig.as->Ctl({"array", "create", "bad", "--level", "raid5", l0, l1}, &out, &err) != 0);
    QVERIFY2(err.contains("raid0") && err.contains("mirror") && err.contains("linear"),
             err.constData());
    QVERIFY(rig.as->Ctl({"array", "create", "bad", "--level", "raid0", l0}, &out, &err) != 0);
    QVERIFY2(err.contains("a raid0 needs at least 2 legs"), err.constData());

    QVERIFY2(rig.as->Ctl({"array", "create", "r0", "--level", "raid0", "--set", "chunk=128K", l0, l1},
                         &out, &err) == 0,
             err.constData());
    const std::uint64_t size = kLeg0 / kChunk * kChunk * 2;
    json a = ArrayDetail(*rig.as, "r0", &why);
    QVERIFY2(a.is_object(), qPrintable(why));
    QCOMPARE(a.value("level", ""), std::string("raid0"));
    QCOMPARE(a.value("size", std::uint64_t(0)), size);
    QCOMPARE(a.value("state", ""), std::string("clean"));
    QCOMPARE(a["layer"].value("title", ""), std::string("raid0 (striped)"));
    QCOMPARE(a["layer"]["params"][0].value("value", ""), std::to_string(kChunk));
    QCOMPARE(a["legs"].size(), std::size_t(2));
    QCOMPARE(LegStateOf(a, 0), std::string("up_to_date"));
    QCOMPARE(LegStateOf(a, 1), std::string("up_to_date"));

    // Data through the FUSE file lands striped on the legs and reads back.
    QVERIFY(WaitFileExists(rig.File("r0"), 10000));
    const QByteArray data = Pattern(7, 0, kData);
    int e = 0;
    QVERIFY2(PwriteDirect(rig.File("r0"), 0, data, &e), qPrintable(QString("errno %1").arg(e)));
    const QByteArray tail = Pattern(8, size - 4 * 4096, 4 * 4096);
    QVERIFY(PwriteDirect(rig.File("r0"), size - tail.size(), tail, &e));
    QByteArray back;
    QVERIFY(PreadDirect(rig.File("r0"), 0, kData, &back, &e));
    QVERIFY(back == data);
    QVERIFY(Run("sync", {}).rc == 0);
    QVERIFY2(StripedOnLegs(data, l0, l1, &why), qPrintable(why));
    // The last chunk of the array is the last whole chunk of leg 1.
    QCOMPARE(ReadRange(l1, kLeg0 - tail.size(), std::uint64_t(tail.size())), tail);

    // status, list and detail show it.
    QCOMPARE(rig.as->Ctl({"status"}, &out, &err), 0);
    QVERIFY2(out.contains("r0") && out.contains("raid0"), out.constData());
    QCOMPARE(rig.as->Ctl({"array", "list"}, &out, &err), 0);
    QVERIFY2(out.contains("r0") && out.contains("raid0") && out.contains("clean"), out.constData());
    QCOMPARE(rig.as->Ctl({"detail", "r0"}, &out, &err), 0);
    QVERIFY2(out.contains("Raid Level : raid0 (striped)") && out.contains("Chunk Size : 128 KiB") &&
                 !out.contains("Intent Bitmap"),
             out.constData());
    QCOMPARE(rig.as->Ctl({"detail", "r0", "--test"}, &out, &err), 0);

    // Its legs cannot change live, and it has nothing to verify.
    QVERIFY(rig.as->Ctl({"array", "grow", "r0", l2}, &out, &err) != 0);
    QVERIFY2(err.contains("cannot change live"), err.constData());
    QVERIFY(rig.as->Ctl({"array", "add-leg", "r0", l2}, &out, &err) != 0);
    QVERIFY(rig.as->Ctl({"array", "fail-leg", "r0", "1"}, &out, &err) != 0);
    QVERIFY2(err.contains("no redundancy"), err.constData());
    QVERIFY(rig.as->Ctl({"array", "verify", "r0"}, &out, &err) != 0);

    // A restart assembles it again from the topology table, with its chunk.
    QVERIFY(rig.as->Terminate() == 0);
    QVERIFY2(rig.StartAssembler(nullptr, &why), qPrintable(why));
    QVERIFY2(WaitUntil([&] { return ArrayDetail(*rig.as, "r0").value("state", "") == "clean"; },
                       20000),
             ArrayDetail(*rig.as, "r0").dump().c_str());
    a = ArrayDetail(*rig.as, "r0");
    QCOMPARE(a.value("size", std::uint64_t(0)), size);
    QCOMPARE(a["layer"]["params"][0].value("value", ""), std::to_string(kChunk));
    QVERIFY(WaitFileExists(rig.File("r0"), 10000));
    QVERIFY(PreadDirect(rig.File("r0"), 0, kData, &back, &e));
    QVERIFY(back == data);
    QVERIFY(PreadDirect(rig.File("r0"), size - tail.size(), std::uint32_t(tail.size()), &back, &e));
    QVERIFY(back == tail);
    json st = CtlJson(*rig.as, {"status", "--json"}, &why);
    QVERIFY2(st.is_object(), qPrintable(why));
    const json status_arrays = st.value("arrays", json::array());
    const json* in_status = FindArray(status_arrays, "r0");
    QVERIFY(in_status);
    QCOMPARE(in_status->value("level", ""), std::string("raid0"));

    // An [[array]] in the config file takes the same key (apply plans it with --set).
    const QString file = rig.dir.path() + "/apply.toml";
    {
      QFile f(file);
      QVERIFY(f.open(QIODevice::WriteOnly));
      f.write(ArrayToml("r1", "raid0", {l2, rig.dir.path() + "/l3.img"}, "", "", "", -1,
                        "chunk = \"256K\"\n")
                  .toUtf8());
    }
    QVERIFY(MakeSparse(rig.dir.path() + "/l3.img", kLeg0));
    QCOMPARE(rig.as->Ctl({"apply", file, "--dry-run"}, &out, &err), 0);
    QVERIFY2(out.contains("--level raid0") && out.contains("--set chunk=262144"), out.constData());
  }

  // The mirror's keys go through the registry like raid0's chunk: set with --set or their older
  // flags, kept across a restart, and read back from the SQLite columns for a topology row an
  // older dstd wrote (no mirror keys in its params).
  void mirrorKeysAreRegistryKeys() {
    MirrorRig rig;
    QString why;
    QVERIFY2(rig.StartEmpty(0, 0, &why), qPrintable(why));
    const QString l0 = rig.dir.path() + "/m0.img", l1 = rig.dir.path() + "/m1.img";
    QVERIFY(MakeSparse(l0, kLeg0));
    QVERIFY(MakeSparse(l1, kLeg0));
    QByteArray out, err;
    QVERIFY2(rig.as->Ctl({"array", "create", "mk", "--level", "mirror", "--region-size", "128K",
                          "--set", "resync_rate_min=5M", "--set", "write_intent=false",
                          "--assume-clean", l0, l1},
                         &out, &err) == 0,
             err.constData());
    auto check = [&](const char* when) -> bool {
      json a = ArrayDetail(*rig.as, "mk", &why);
      const bool ok = a.value("region_size", 0u) == 128u * 1024 &&
                      a["resync_rate"].value("min", std::uint64_t(0)) == std::uint64_t(5) << 20 &&
                      a["resync_rate"].value("max", std::uint64_t(0)) == std::uint64_t(200) << 20 &&
                      !a.value("write_intent", true);
      if (!ok) qWarning("%s: %s", when, a.dump().c_str());
      return ok;
    };
    QVERIFY(check("after create"));
    QCOMPARE(rig.as->Ctl({"detail", "mk"}, &out, &err), 0);
    QVERIFY2(out.contains("Intent Bitmap : None") && out.contains("Resync Rate : min 5 MiB/s"),
             out.constData());
    QVERIFY(rig.as->Ctl({"array", "create", "bad", "--level", "mirror", "--set", "region_size=96K",
                         l0, l1},
                        &out, &err) != 0);
    QVERIFY2(err.contains("region_size: must be a power of two"), err.constData());

    QVERIFY(rig.as->Terminate() == 0);
    QVERIFY2(rig.StartAssembler(nullptr, &why), qPrintable(why));
    QVERIFY(WaitUntil([&] { return ArrayDetail(*rig.as, "mk").value("state", "") == "clean"; }, 20000));
    QVERIFY(check("after a restart"));

    // A row as an older dstd wrote it: the mirror keys only in their columns.
    QVERIFY(rig.as->Terminate() == 0);
    {
      sqlite3* db = nullptr;
      const QByteArray path = (rig.as->state_dir() + "/dstd.sqlite").toUtf8();
      QCOMPARE(sqlite3_open(path.constData(), &db), SQLITE_OK);
      char* msg = nullptr;
      const int rc = sqlite3_exec(db, "UPDATE dstd_arrays SET params='{}' WHERE name='mk'", nullptr,
                                  nullptr, &msg);
      const QString m = msg ? msg : "";
      sqlite3_free(msg);
      QCOMPARE(sqlite3_changes(db), 1);
      sqlite3_close(db);
      QVERIFY2(rc == SQLITE_OK, qPrintable(m));
    }
    QVERIFY2(rig.StartAssembler(nullptr, &why), qPrintable(why));
    QVERIFY(WaitUntil([&] { return ArrayDetail(*rig.as, "mk").value("state", "") == "clean"; }, 20000));
    QVERIFY(check("from an older row"));
  }
};

DST_TEST_MAIN(ArrayRaid0Test)
#include "array_raid0_test.moc"
