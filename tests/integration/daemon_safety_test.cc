// dstd refusals that keep data safe (issue 9), through dstctl against real daemons:
//
//   * NeverShrinkImage (11a): `export add --size` below an image's size is refused naming both
//     sizes, above it needs --grow; a config `size` below the image's makes dstd refuse to start.
//     The image keeps every byte.
//   * ExclusiveLegs (item 3): a leg of one array cannot be a leg of another, exported, or
//     imported as a volume (also under another path: hard link, symlink); one file is exported
//     read-write once; a detached leg that is still exported is not re-added.
//   * PersistentTopology (item 5): exports and volumes added with dstctl survive a restart.
//   * SafeApply (item 6): apply validates the whole plan first, removes only with --prune, and
//     converges when run again.
#include <QtTest/QtTest>

#include <filesystem>

#include "array_helpers.h"
#include "test_env.h"

using namespace dst::test;
using nlohmann::json;

namespace {

bool WriteAll(const QString& path, const QByteArray& data) {
  QFile f(path);
  return f.open(QIODevice::ReadWrite) && f.write(data) == data.size();
}

QByteArray ReadAll(const QString& path) {
  QFile f(path);
  return f.open(QIODevice::ReadOnly) ? f.readAll() : QByteArray();
}

bool Has(const QByteArray& err, const char* what) { return err.contains(what); }

}  // namespace

class DaemonSafetyTest : public QObject {
  Q_OBJECT

 private slots:
  void init() {
    DST_REQUIRE(std::filesystem::exists(BinPath("dstd")), "dstd binary not built");
  }

  void NeverShrinkImage() {
    QTemporaryDir dir;
    DaemonProcess d(dir.path() + "/d");
    QVERIFY(d.Start());
    const QString img = dir.path() + "/data.img";
    QByteArray out, err;
    QCOMPARE(d.Ctl({"export", "add", "e1", img, "--size", "1M"}, &out, &err), 0);
    const QByteArray data = Pattern(7, 0, 1 << 20);
    QVERIFY(WriteAll(img, data));
    QCOMPARE(d.Ctl({"export", "remove", "e1"}, &out, &err), 0);

    // Below the image: refused, both sizes named, nothing changed.
    QVERIFY(d.Ctl({"export", "add", "e1", img, "--size", "4K"}, &out, &err) != 0);
    QVERIFY2(Has(err, "1048576") && Has(err, "4096") && Has(err, "never shrunk"), err.constData());
    QVERIFY(d.Ctl({"export", "add", "e1", img, "--size", "4K", "--grow"}, &out, &err) != 0);
    QCOMPARE(QFileInfo(img).size(), qint64(1) << 20);
    // Above it: only with --grow.
    QVERIFY(d.Ctl({"export", "add", "e1", img, "--size", "2M"}, &out, &err) != 0);
    QVERIFY2(Has(err, "--grow"), err.constData());
    QCOMPARE(QFileInfo(img).size(), qint64(1) << 20);
    // The same size, or none: fine.
    QCOMPARE(d.Ctl({"export", "add", "e1", img, "--size", "1M"}, &out, &err), 0);
    QCOMPARE(d.Ctl({"export", "remove", "e1"}, &out, &err), 0);
    QCOMPARE(d.Ctl({"export", "add", "e1", img, "--size", "2M", "--grow"}, &out, &err), 0);
    QCOMPARE(QFileInfo(img).size(), qint64(2) << 20);
    QVERIFY(ReadAll(img).left(1 << 20) == data);
    QCOMPARE(d.Terminate(), 0);

    // A config size below the image's: dstd refuses to start (EX_CONFIG), naming both sizes.
    DaemonProcess c(dir.path() + "/c");
    c.config() = ExportToml("e1", img, "4K");
    QVERIFY(!c.Start(5000));
    QByteArray log = c.Log();
    QVERIFY2(log.contains("2097152") && log.contains("4096") && log.contains("never shrunk"),
             log.constData());
    QCOMPARE(QFileInfo(img).size(), qint64(2) << 20);
    QVERIFY(ReadAll(img).left(1 << 20) == data);
  }

  void ExclusiveLegs() {
    QTemporaryDir dir;
    DaemonProcess d(dir.path() + "/d");
    QVERIFY(d.Start());
    const QString l0 = dir.path() + "/l0.img", l1 = dir.path() + "/l1.img",
                  l2 = dir.path() + "/l2.img", l3 = dir.path() + "/l3.img";
    for (auto& p : {l0, l1, l2, l3}) QVERIFY(MakeSparse(p, 16 << 20));
    QByteArray out, err;
    QCOMPARE(d.Ctl({"array", "create", "m", "--level", "mirror", l0, l1}, &out, &err), 0);

    // Another array over a live leg; the same file under another name (hard link, symlink).
    const QString hard = dir.path() + "/hard.img", sym = dir.path() + "/sym.img";
    QVERIFY(::link(l0.toUtf8().constData(), hard.toUtf8().constData()) == 0);
    QVERIFY(QFile::link(l1, sym));
    QVERIFY(d.Ctl({"array", "create", "m2", "--level", "mirror", l0, l2}, &out, &err) != 0);
    QVERIFY2(Has(err, "leg 0 of array \"m\""), err.constData());
    QVERIFY(d.Ctl({"array", "create", "m2", "--level", "mirror", hard, l2}, &out, &err) != 0);
    QVERIFY2(Has(err, "leg 0 of array \"m\""), err.constData());
    QVERIFY(d.Ctl({"array", "create", "m2", "--level", "linear", l2, l3, sym}, &out, &err) != 0);
    QVERIFY2(Has(err, "leg 1 of array \"m\""), err.constData());
    const QString l2link = dir.path() + "/l2link.img";
    QVERIFY(QFile::link(l2, l2link));
    QVERIFY(d.Ctl({"array", "create", "m2", "--level", "mirror", l2, l2link}, &out, &err) != 0);
    QVERIFY2(Has(err, "same file"), err.constData());
    QVERIFY(d.Ctl({"array", "add-leg", "m", hard}, &out, &err) != 0);
    QVERIFY2(Has(err, "leg 0 of array \"m\""), err.constData());

    // An export or a volume over a live leg, in any mode.
    QVERIFY(d.Ctl({"export", "add", "x", hard, "--read-only"}, &out, &err) != 0);
    QVERIFY2(Has(err, "leg 0 of array \"m\""), err.constData());
    QVERIFY(d.Ctl({"volume", "import", "v", sym}, &out, &err) != 0);
    QVERIFY2(Has(err, "leg 1 of array \"m\""), err.constData());

    // One read-write export per file; read-only ones may join it.
    QCOMPARE(d.Ctl({"export", "add", "e1", l2}, &out, &err), 0);
    QVERIFY(d.Ctl({"export", "add", "e2", l2}, &out, &err) != 0);
    QVERIFY2(Has(err, "exported as \"e1\""), err.constData());
    QCOMPARE(d.Ctl({"export", "add", "e3", l2, "--read-only"}, &out, &err), 0);
    QVERIFY(d.Ctl({"volume", "import", "v", l2}, &out, &err) != 0);
    QVERIFY2(Has(err, "exported as \"e1\""), err.constData());
    // ...and an exported file is not taken as a leg.
    QVERIFY(d.Ctl({"array", "add-leg", "m", l2}, &out, &err) != 0);
    QVERIFY2(Has(err, "export remove"), err.constData());

    // A detached leg may be exported (the snapshot), but is not re-added while exported.
    QVERIFY(WaitArrayClean(d, "m", 60000));
    QCOMPARE(d.Ctl({"array", "detach-leg", "m", "1"}, &out, &err), 0);
    QCOMPARE(d.Ctl({"export", "add", "snap", sym, "--read-only"}, &out, &err), 0);
    QVERIFY(d.Ctl({"array", "re-add-leg", "m", "1"}, &out, &err) != 0);
    QVERIFY2(Has(err, "exported read-only as \"snap\"") && Has(err, "export remove snap"),
             err.constData());
    QCOMPARE(LegStateOf(ArrayDetail(d, "m"), 1), std::string("detached"));
    QCOMPARE(d.Ctl({"export", "remove", "snap"}, &out, &err), 0);
    QCOMPARE(d.Ctl({"array", "re-add-leg", "m", "1"}, &out, &err), 0);
    QVERIFY(WaitArrayClean(d, "m", 60000));
    QCOMPARE(d.Terminate(), 0);
  }

  void PersistentTopology() {
    QTemporaryDir dir;
    const QString a = dir.path() + "/a.img", b = dir.path() + "/b.img", v = dir.path() + "/v.img";
    QVERIFY(MakeSparse(v, 4 << 20));
    QByteArray out, err;
    {
      DaemonProcess d(dir.path() + "/d");
      QVERIFY(d.Start());
      QCOMPARE(d.Ctl({"export", "add", "e1", a, "--size", "1M"}, &out, &err), 0);
      QCOMPARE(d.Ctl({"export", "add", "e2", b, "--size", "1M"}, &out, &err), 0);
      QCOMPARE(d.Ctl({"volume", "import", "v1", v}, &out, &err), 0);
      QCOMPARE(d.Ctl({"export", "remove", "e2"}, &out, &err), 0);  // forgotten too
      QCOMPARE(d.Terminate(), 0);
      QVERIFY(d.Start());  // the same state dir: e1 and v1 come back, e2 does not
      json ex = CtlJson(d, {"export", "list", "--json"});
      QCOMPARE(ex["exports"].size(), std::size_t(1));
      QCOMPARE(ex["exports"][0]["name"], json("e1"));
      QCOMPARE(ex["exports"][0]["path"], json(a.toStdString()));
      json vo = CtlJson(d, {"volume", "list", "--json"});
      QCOMPARE(vo["volumes"].size(), std::size_t(1));
      QCOMPARE(vo["volumes"][0]["name"], json("v1"));
      QCOMPARE(vo["volumes"][0]["size"], json(4u << 20));
      // Also after kill -9 (the record is written when the add succeeds).
      QCOMPARE(d.Ctl({"export", "add", "e3", b}, &out, &err), 0);
      d.Kill9();
      QVERIFY(d.Start());
      ex = CtlJson(d, {"export", "list", "--json"});
      QCOMPARE(ex["exports"].size(), std::size_t(2));
      QCOMPARE(d.Ctl({"volume", "remove", "v1"}, &out, &err), 0);
      QCOMPARE(d.Terminate(), 0);
    }
    // The config file wins for the names it defines; the conflict is reported.
    const QString c = dir.path() + "/c.img";
    DaemonProcess d(dir.path() + "/d");
    d.config() = ExportToml("e1", c, "1M");
    QVERIFY(d.Start());
    json ex = CtlJson(d, {"export", "list", "--json"});
    QCOMPARE(ex["exports"].size(), std::size_t(2));
    for (auto& e : ex["exports"])
      if (e["name"] == "e1") QCOMPARE(e["path"], json(c.toStdString()));
    QVERIFY2(d.Log().contains("the config file wins"), d.Log().constData());
    QCOMPARE(CtlJson(d, {"volume", "list", "--json"})["volumes"].size(), std::size_t(0));
    QCOMPARE(d.Terminate(), 0);
  }

  // Regression (issue 9 item 6): an apply with a file that omitted existing objects removed
  // them, then failed halfway ("2 of 4 steps done").
  void SafeApply() {
    QTemporaryDir dir;
    DaemonProcess d(dir.path() + "/d");
    QVERIFY(d.Start());
    const QString e1 = dir.path() + "/e1.img", e2 = dir.path() + "/e2.img",
                  e3 = dir.path() + "/e3.img", file = dir.path() + "/apply.toml";
    QByteArray out, err;
    QCOMPARE(d.Ctl({"export", "add", "e1", e1, "--size", "1M"}, &out, &err), 0);
    QCOMPARE(d.Ctl({"export", "add", "e2", e2, "--size", "1M"}, &out, &err), 0);
    auto write_file = [&](const QString& text) {
      QFile f(file);
      return f.open(QIODevice::WriteOnly | QIODevice::Truncate) &&
             f.write(text.toUtf8()) == text.toUtf8().size();
    };
    auto names = [&] {
      QStringList n;
      json list = CtlJson(d, {"export", "list", "--json"});  // named: a temporary would dangle
      for (auto& e : list["exports"])
        n << QString::fromStdString(e["name"].get<std::string>());
      n.sort();
      return n;
    };
    // Objects absent from the file are kept without --prune.
    QVERIFY(write_file(ExportToml("e3", e3, "1M")));
    QCOMPARE(d.Ctl({"apply", file}, &out, &err), 0);
    QVERIFY2(out.contains("export add e3") && out.contains("kept") && out.contains("export e1"),
             out.constData());
    QCOMPARE(names(), (QStringList{"e1", "e2", "e3"}));
    // --prune --dry-run shows the removals and changes nothing.
    QCOMPARE(d.Ctl({"apply", file, "--dry-run", "--prune"}, &out, &err), 0);
    QVERIFY2(out.contains("would: export remove e1") && out.contains("would: export remove e2"),
             out.constData());
    QCOMPARE(names(), (QStringList{"e1", "e2", "e3"}));

    // A plan that would fail is refused whole: nothing of it runs.
    const QString e4 = dir.path() + "/e4.img";
    QVERIFY(write_file(ExportToml("e3", e3, "1M") + ExportToml("e4", e4, "1M") +
                       ArrayToml("m", "linear", {dir.path() + "/missing.img"}) +
                       ArrayToml("m2", "linear", {e2})));
    QVERIFY(d.Ctl({"apply", file}, &out, &err) != 0);
    QVERIFY2(err.contains("nothing changed") && err.contains("missing.img does not exist") &&
                 err.contains("exported as \"e2\""),
             err.constData());
    QCOMPARE(names(), (QStringList{"e1", "e2", "e3"}));
    QVERIFY(!QFile::exists(e4));
    // A second read-write export of a live read-write export's file (another spelling).
    QVERIFY(write_file(ExportToml("e3", e3, "1M") +
                       ExportToml("e5", dir.path() + "/./e1.img", "")));
    QVERIFY(d.Ctl({"apply", file}, &out, &err) != 0);
    QVERIFY2(err.contains("exported as \"e1\""), err.constData());
    // A size below the image's.
    QVERIFY(write_file(ExportToml("e3", e3, "4K")));
    QVERIFY(d.Ctl({"apply", file}, &out, &err) != 0);
    QVERIFY2(err.contains("1048576") && err.contains("4096") && err.contains("never shrunk"),
             err.constData());
    QCOMPARE(names(), (QStringList{"e1", "e2", "e3"}));
    QCOMPARE(QFileInfo(e3).size(), qint64(1) << 20);

    // What cannot be checked first (a peer that is down) fails at its step; every step is
    // reported, and running apply again converges.
    const quint16 port = FreePort();
    const QString uri = QString("dst://127.0.0.1:%1/x").arg(port);
    const QString e6 = dir.path() + "/e6.img";
    QVERIFY(write_file(ExportToml("e3", e3, "1M") + VolumeToml("rv", uri, 2, 2) +
                       ExportToml("e6", e6, "1M")));
    int rc = d.Ctl({"apply", file}, &out, &err);
    QVERIFY2(rc != 0 && out.contains("FAILED   volume import rv") &&
                 out.contains("not run  export add e6") && out.contains("0 of 2"),
             (out + err).constData());
    QCOMPARE(names(), (QStringList{"e1", "e2", "e3"}));
    DaemonProcess peer(dir.path() + "/p", port);
    peer.config() = ExportToml("x", dir.path() + "/x.img", "1M");
    QVERIFY(peer.Start());
    QVERIFY2(d.Ctl({"apply", file}, &out, &err) == 0, (out + err).constData());
    QVERIFY2(out.contains("done     volume import rv") && out.contains("done     export add e6"),
             out.constData());
    QCOMPARE(names(), (QStringList{"e1", "e2", "e3", "e6"}));
    QCOMPARE(d.Ctl({"apply", file}, &out, &err), 0);
    QVERIFY2(out.contains("nothing to do"), out.constData());
    // --prune removes what the file does not name.
    QCOMPARE(d.Ctl({"apply", file, "--prune"}, &out, &err), 0);
    QCOMPARE(names(), (QStringList{"e3", "e6"}));
    QCOMPARE(d.Terminate(), 0);
  }
};

DST_TEST_MAIN(DaemonSafetyTest)
#include "daemon_safety_test.moc"
