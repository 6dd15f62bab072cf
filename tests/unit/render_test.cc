// dstctl rendering of arrays (control/src/render.cc): the mdstat-like status block with
// clamped percentages, the mdadm --detail text, and the `detail --test` exit-code mapping.
#include <QtTest/QtTest>

#include <string>

#include "dst/control/render.h"
#include "test_env.h"

using nlohmann::json;
namespace ctl = dst::control;

namespace {

json Leg(int slot, const std::string& spec, const std::string& state) {
  return json{{"slot", slot}, {"spec", spec}, {"state", state}, {"generation", "0123456789abcdef"},
              {"out_of_sync_bytes", 0}, {"present", true}};
}

json Mirror(const std::string& state, json resync = nullptr) {
  json legs = json::array({Leg(0, "dst://127.0.0.1:7401/d1", "up-to-date"),
                           Leg(1, "dst://127.0.0.1:7402/d2",
                               state == "clean" ? "up-to-date"
                               : state == "resyncing" ? "resyncing"
                               : "failed")});
  if (state == "failed") legs[0]["state"] = "failed";
  return json{{"name", "m0"}, {"level", "mirror"}, {"size", 1073741824ull}, {"state", state},
              {"assembled", true}, {"legs", legs}, {"resync", resync}, {"id", "uuid-1"},
              {"region_size", 65536}, {"write_intent", true}, {"state_db", "/var/lib/dst/dstd.sqlite"},
              {"resync_rate", {{"min", 10485760}, {"max", 209715200}}},
              {"layer", {{"name", "mirror"}, {"title", "mirror (raid1)"}, {"redundant", true},
                         {"params", json::array()}}},
              {"stats", {{"commits", 12}, {"commits_per_second", 3.5}, {"intent_waits", 7}}}};
}

json Progress(std::uint64_t done, std::uint64_t total, json percent, std::string st = "running") {
  json r{{"leg", 1}, {"state", st}, {"bytes_done", done}, {"bytes_total", total},
         {"rate", 41943040}, {"eta_seconds", 18.0}, {"bytes_resynced_total", done}};
  if (!percent.is_null()) r["percent"] = percent;
  return r;
}

std::vector<std::string> Lines(const std::string& s) {
  std::vector<std::string> out;
  std::size_t pos = 0;
  while (pos < s.size()) {
    std::size_t nl = s.find('\n', pos);
    if (nl == std::string::npos) nl = s.size();
    out.push_back(s.substr(pos, nl - pos));
    pos = nl + 1;
  }
  return out;
}

}  // namespace

class RenderTest : public QObject {
  Q_OBJECT

 private slots:
  void ProgressBarShape() {
    QCOMPARE(ctl::ProgressBar(0), std::string("[>....................]"));
    QCOMPARE(ctl::ProgressBar(273), std::string("[=====>...............]"));
    QCOMPARE(ctl::ProgressBar(1000), std::string("[====================>]"));
    // Out of range is clamped, never longer or shorter.
    QCOMPARE(ctl::ProgressBar(-5), ctl::ProgressBar(0));
    QCOMPARE(ctl::ProgressBar(4294967), ctl::ProgressBar(1000));
    for (int p : {0, 1, 49, 50, 500, 999, 1000}) QCOMPARE(ctl::ProgressBar(p).size(), std::size_t(23));
  }

  void MdstatClean() {
    auto l = Lines(ctl::RenderMdstat(Mirror("clean")));
    QCOMPARE(l.size(), std::size_t(2));
    QCOMPARE(l[0], std::string("m0 : active mirror dst://127.0.0.1:7401/d1[0] dst://127.0.0.1:7402/d2[1]"));
    QCOMPARE(l[1], std::string("      1048576 KiB [2/2] [UU]"));
  }

  void MdstatDegraded() {
    auto l = Lines(ctl::RenderMdstat(Mirror("degraded")));
    QCOMPARE(l.size(), std::size_t(2));
    QVERIFY2(l[0].find("d2[1](F)") != std::string::npos, l[0].c_str());
    QCOMPARE(l[1], std::string("      1048576 KiB [2/1] [U_]"));
  }

  void MdstatResync() {
    // The contract's example: 27.3 %, full pass -> "resync".
    auto a = Mirror("resyncing", Progress(293601280, 1073741824, 27.34));
    auto l = Lines(ctl::RenderMdstat(a));
    QCOMPARE(l.size(), std::size_t(3));
    QCOMPARE(l[2], std::string("      [=====>...............]  resync = 27.3% (286720/1048576) "
                               "finish=0.3min speed=40960K/sec"));
    // Partial pass -> "recovery".
    a = Mirror("resyncing", Progress(1048576, 4194304, nullptr));
    l = Lines(ctl::RenderMdstat(a));
    QVERIFY2(l[2].find("recovery = 25.0% (1024/4096)") != std::string::npos, l[2].c_str());
    QVERIFY2(l[2].find("[=====>") != std::string::npos, l[2].c_str());
    // Queued.
    a = Mirror("resyncing", Progress(0, 4194304, 0.0, "pending"));
    l = Lines(ctl::RenderMdstat(a));
    QCOMPARE(l[2], std::string("      resync=DELAYED"));
  }

  // md once printed "recovery =429496729.3%": every value is clamped to 0..100.
  void MdstatClamping_data() {
    QTest::addColumn<double>("done");
    QTest::addColumn<double>("total");
    QTest::addColumn<double>("percent");  // NAN: field absent
    QTest::addColumn<QString>("expected");
    QTest::newRow("zero") << 0.0 << 4194304.0 << 0.0 << "recovery = 0.0% (0/4096)";
    QTest::newRow("hundred") << 4194304.0 << 4194304.0 << 100.0 << "recovery = 100.0% (4096/4096)";
    QTest::newRow("percent above 100") << 1024.0 << 4194304.0 << 429496729.3 << "recovery = 100.0%";
    QTest::newRow("percent negative") << 1024.0 << 4194304.0 << -3.0 << "recovery = 0.0%";
    QTest::newRow("done above total") << 8388608.0 << 4194304.0 << double(NAN)
                                      << "recovery = 100.0% (4096/4096)";
    QTest::newRow("total zero") << 0.0 << 0.0 << double(NAN) << "= 0.0% (0/0)";
  }

  void MdstatClamping() {
    QFETCH(double, done);
    QFETCH(double, total);
    QFETCH(double, percent);
    QFETCH(QString, expected);
    json p = std::isnan(percent) ? json() : json(percent);
    auto a = Mirror("resyncing", Progress(std::uint64_t(done), std::uint64_t(total), p));
    auto l = Lines(ctl::RenderMdstat(a));
    QCOMPARE(l.size(), std::size_t(3));
    QVERIFY2(l[2].find(expected.toStdString()) != std::string::npos, l[2].c_str());
    // The bar keeps its width whatever the input.
    std::size_t open = l[2].find('['), close = l[2].find(']');
    QCOMPARE(close - open + 1, std::size_t(23));
    QVERIFY(l[2].find('-') == std::string::npos || l[2].find("-") > close);
  }

  void Detail() {
    auto a = Mirror("resyncing", Progress(1048576, 4194304, 25.0));
    std::string d = ctl::RenderDetail(a);
    auto l = Lines(d);
    QCOMPARE(l[0], std::string("m0:"));
    auto has = [&](const std::string& s) {
      QVERIFY2(d.find(s) != std::string::npos, ("missing \"" + s + "\" in:\n" + d).c_str());
    };
    has("        Raid Level : mirror (raid1)\n");
    has("        Array Size : 1048576 KiB (1.00 GiB 1.07 GB)\n");
    has("      Raid Devices : 2\n");
    has("     Intent Bitmap : Internal (64 KiB regions)\n");
    has("             State : clean, degraded, recovering\n");
    has("    Active Devices : 1\n");
    has("   Working Devices : 2\n");
    has("    Failed Devices : 0\n");
    has("Consistency Policy : bitmap\n");
    has("    Rebuild Status : 25% complete\n");
    has("              UUID : uuid-1\n");
    has("Number  State");
    has("active sync");
    has("spare rebuilding");
    // Key column aligned: every "Key : Value" line has " : " at column 18.
    for (std::size_t i = 1; i < l.size() && !l[i].empty(); ++i)
      QVERIFY2(l[i].substr(18, 3) == " : ", l[i].c_str());
    std::string clean = ctl::RenderDetail(Mirror("clean"));
    QVERIFY(clean.find("             State : clean\n") != std::string::npos);
    QVERIFY(clean.find("Rebuild Status") == std::string::npos);
    std::string failed = ctl::RenderDetail(Mirror("failed"));
    QVERIFY2(failed.find("State : FAILED") != std::string::npos, failed.c_str());
    QVERIFY(failed.find("faulty") != std::string::npos);
  }

  // A layer the renderer has never heard of: title, labelled keys and no mirror lines, all
  // from the "layer" object the daemon fills from its registry.
  void DetailOfAnyLayer() {
    json a = Mirror("clean");
    a["level"] = "stripe";
    a["layer"] = {{"name", "stripe"},
                  {"title", "stripe (test)"},
                  {"redundant", false},
                  {"params", json::array({{{"name", "chunk"}, {"type", "size"}, {"label", "Chunk Size"},
                                           {"value", "131072"}},
                                          {{"name", "hidden"}, {"type", "string"}, {"label", ""},
                                           {"value", "x"}}})}};
    std::string d = ctl::RenderDetail(a);
    QVERIFY2(d.find("        Raid Level : stripe (test)\n") != std::string::npos, d.c_str());
    QVERIFY2(d.find("        Chunk Size : 128 KiB\n") != std::string::npos, d.c_str());
    QVERIFY2(d.find("hidden") == std::string::npos, d.c_str());
    for (const char* mirror_only : {"Intent Bitmap", "Consistency Policy", "Resync Rate"})
      QVERIFY2(d.find(mirror_only) == std::string::npos, mirror_only);
    // Without a layer object the level name stands as the title.
    a.erase("layer");
    QVERIFY(ctl::RenderDetail(a).find("        Raid Level : stripe\n") != std::string::npos);
  }

  void Layers() {
    json layers = json::array(
        {{{"name", "stripe"}, {"title", "stripe (test)"}, {"help", "Stripes things."},
          {"redundant", false},
          {"keys", json::array({{{"name", "chunk"}, {"type", "size"}, {"default", "65536"},
                                 {"help", "stripe unit"}, {"label", "Chunk Size"}}})},
          {"legs", {{"min", 2}, {"max", 32}, {"same_size", true}, {"read_only_legs", false},
                    {"change", "fixed"}, {"size", "smallest x legs"}}}}});
    std::string out = ctl::RenderLayers(layers);
    for (const char* s : {"stripe: stripe (test)\n  Stripes things.\n",
                          "  legs: 2..32, same size, live changes: fixed\n  size: smallest x legs\n",
                          "  --set chunk=VALUE  stripe unit (size, default 64 KiB)\n"})
      QVERIFY2(out.find(s) != std::string::npos, out.c_str());
  }

  // mdadm.8: 0 healthy, 1 degraded, 2 unusable, 4 error.
  void TestCodes() {
    QCOMPARE(ctl::DetailTestCode(Mirror("clean")), 0);
    QCOMPARE(ctl::DetailTestCode(Mirror("degraded")), 1);
    QCOMPARE(ctl::DetailTestCode(Mirror("resyncing", Progress(1, 2, 50.0))), 1);
    QCOMPARE(ctl::DetailTestCode(Mirror("failed")), 2);
    QCOMPARE(ctl::DetailTestCode(json()), 4);
    QCOMPARE(ctl::DetailTestCode(json::object()), 4);
    QCOMPARE(ctl::DetailTestCode(json{{"state", "bogus"}}), 4);
  }

  void StatusIncludesArrays() {
    json st{{"daemon", {{"pid", 1}}}, {"arrays", json::array({Mirror("degraded")})}};
    std::string s = ctl::RenderStatus(st);
    QVERIFY2(s.find("m0 : active mirror") != std::string::npos, s.c_str());
    QVERIFY2(s.find("[2/1] [U_]") != std::string::npos, s.c_str());
  }

  void ListAndEvents() {
    std::string list = ctl::RenderArrayList(json::array({Mirror("clean")}));
    QVERIFY2(list.find("m0    mirror  1 GiB  clean  2/2") != std::string::npos, list.c_str());
    QCOMPARE(ctl::RenderArrayList(json::array()), std::string("no arrays\n"));
    std::string ev = ctl::RenderEvent(json{{"ts", 0}, {"type", "leg_state"}, {"array", "m0"},
                                           {"slot", 1}, {"spec", "/x"}, {"state", "failed"},
                                           {"previous", "up-to-date"}});
    QCOMPARE(ev, std::string("1970-01-01T00:00:00Z m0 leg 1 /x: failed (was up-to-date)\n"));
    ev = ctl::RenderEvent(json{{"ts", 0}, {"type", "resync_progress"}, {"array", "m0"}, {"leg", 1},
                               {"percent", 1e9}, {"bytes_done", 1}, {"bytes_total", 2},
                               {"rate", 0}, {"eta_seconds", -1}});
    QVERIFY2(ev.find("resync 100.0%") != std::string::npos, ev.c_str());
    QCOMPARE(ctl::RenderApply(json{{"plan", json::array()}}), std::string("nothing to do\n"));
    QCOMPARE(ctl::RenderApply(json{{"plan", {"array create m0"}}, {"dry_run", true}}),
             std::string("would: array create m0\n"));
    // A dry run with typed steps names each step's kind.
    QCOMPARE(ctl::RenderApply(json{{"plan", {"array create m0", "export add e0"}},
                                   {"dry_run", true},
                                   {"steps", {{{"kind", "create-array"}, {"step", "array create m0"}},
                                              {{"kind", "add-export"}, {"step", "export add e0"}}}}}),
             std::string("would: array create m0  [create-array]\nwould: export add e0  [add-export]\n"));
    // Safe apply: kept objects, and a run that stopped shows every step.
    QCOMPARE(ctl::RenderApply(json{{"plan", json::array()}, {"kept", {"export e1"}}}),
             std::string("nothing to do\nkept (not in the file; --prune removes): export e1\n"));
    json stopped{{"plan", {"volume import v x", "export add e x"}},
                 {"steps", {{{"step", "volume import v x"}, {"status", "failed"}, {"error", "refused"}},
                            {{"step", "export add e x"}, {"status", "not run"}}}},
                 {"done", json::array()},
                 {"failed", true}};
    QCOMPARE(ctl::RenderApply(stopped),
             std::string("FAILED   volume import v x: refused\nnot run  export add e x\n"
                         "apply stopped: 0 of 2 operations done (run it again once the cause is "
                         "fixed)\n"));
    ev = ctl::RenderEvent(json{{"ts", 0}, {"type", "leg_unreachable"}, {"array", "m0"},
                               {"slot", 1}, {"spec", "/x"}, {"outage_ms", 2500}});
    QCOMPARE(ev, std::string("1970-01-01T00:00:00Z m0 leg 1 /x: unreachable for 2500 ms\n"));
  }
};

DST_TEST_MAIN(RenderTest)
#include "render_test.moc"
