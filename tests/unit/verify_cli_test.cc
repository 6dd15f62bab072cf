// Online verify outside the engine (issue 9 item 9): the verify_interval config key, dstctl's
// exit codes for `array verify`, and the text rendered from the verify JSON (result block,
// detail lines, the mdstat "check" line, event lines).
#include <QtTest/QtTest>

#include "dst/daemon/config.h"
#include "dst/control/render.h"

using namespace dst::daemon;
using namespace dst::control;
using nlohmann::json;

namespace {
const char* kArray =
    "[[array]]\nname = \"m0\"\nlevel = \"mirror\"\nlegs = [\"/a.img\", \"/b.img\"]\n";

json Verify(const char* state, std::uint64_t mismatches, bool repair) {
  json mism = json::array();
  for (std::uint64_t i = 0; i < mismatches && i < 64; ++i)
    mism.push_back(json{{"offset", i * 65536 + 1048576}, {"legs", {1}}});
  return json{{"run", 1}, {"state", state}, {"repair", repair}, {"mismatch_regions", mismatches},
              {"mismatch_bytes", mismatches * 65536}, {"repaired_regions", repair ? mismatches : 0},
              {"mismatches", mism}, {"mismatches_max_listed", 64}, {"source_leg", 0},
              {"legs_compared", {0, 1}}, {"bytes_done", 1 << 20}, {"bytes_total", 2 << 20},
              {"percent", 50.0}, {"rate", 1 << 20}, {"eta_seconds", 1.0}, {"read_errors", 0},
              {"started", 1796527843.0}, {"finished", 1796527844.5}, {"error", nullptr}};
}
}  // namespace

class VerifyCliTest : public QObject {
  Q_OBJECT
 private slots:
  void durations() {
    QCOMPARE(ParseDuration("7d").value(), std::uint64_t{7 * 86400});
    QCOMPARE(ParseDuration("12h").value(), std::uint64_t{12 * 3600});
    QCOMPARE(ParseDuration("30m").value(), std::uint64_t{1800});
    QCOMPARE(ParseDuration("90s").value(), std::uint64_t{90});
    QCOMPARE(ParseDuration("2w").value(), std::uint64_t{14 * 86400});
    QCOMPARE(ParseDuration("3600").value(), std::uint64_t{3600});
    QCOMPARE(ParseDuration("0").value(), std::uint64_t{0});
    for (const char* bad : {"", "d", "7x", "-1", "7 d", "1.5h", "99999999999999w"})
      QVERIFY2(!ParseDuration(bad).ok(), bad);
  }

  void configKeys() {
    auto c = ParseConfig(std::string("[daemon]\nverify_interval = \"7d\"\n") + kArray +
                             "verify_interval = 3600\n",
                         "t.toml", {false});
    QVERIFY2(c.ok(), c.status().ToString().c_str());
    QCOMPARE(c->verify_interval_s, std::uint64_t{7 * 86400});
    QCOMPARE(c->arrays[0].verify_interval_s, std::int64_t{3600});
    auto d = ParseConfig(kArray, "t.toml", {false});
    QVERIFY(d.ok());
    QCOMPARE(d->verify_interval_s, std::uint64_t{0});        // default: no periodic verify
    QCOMPARE(d->arrays[0].verify_interval_s, std::int64_t{-1});  // [daemon]'s applies
    auto e = ParseConfig(std::string(kArray) + "verify_interval = \"7 days\"\n", "t.toml", {false});
    QVERIFY(!e.ok());
    QVERIFY2(e.status().message().find("verify_interval") != std::string::npos &&
                 e.status().message().find("bad duration") != std::string::npos,
             e.status().message().c_str());
    auto f = ParseConfig("[daemon]\nverify_interval = true\n", "t.toml", {false});
    QVERIFY(!f.ok());
  }

  void exitCodes() {
    QCOMPARE(VerifyExitCode(Verify("done", 0, false)), 0);
    QCOMPARE(VerifyExitCode(Verify("done", 3, false)), kExVerifyMismatch);
    QCOMPARE(kExVerifyMismatch, 1);
    QCOMPARE(VerifyExitCode(Verify("done", 3, true)), 0);  // repaired
    QCOMPARE(VerifyExitCode(Verify("cancelled", 0, false)), 75);
    QCOMPARE(VerifyExitCode(Verify("failed", 0, false)), 74);
    QCOMPARE(VerifyExitCode(json()), 74);
  }

  void resultText() {
    std::string t = RenderVerify(Verify("done", 2, false), "m0");
    QVERIFY2(t.find("2 mismatching regions (128 KiB)") != std::string::npos, t.c_str());
    QVERIFY2(t.find("offset 1048576 (1.0 MiB): leg 1 differs from leg 0") != std::string::npos ||
                 t.find("offset 1048576 (1 MiB): leg 1 differs from leg 0") != std::string::npos,
             t.c_str());
    QVERIFY(t.find("--repair") != std::string::npos);
    json many = Verify("done", 100, false);
    t = RenderVerify(many, "m0");
    QVERIFY2(t.find("and 36 more") != std::string::npos, t.c_str());
    t = RenderVerify(Verify("done", 0, false), "m0");
    QVERIFY2(t.find("legs identical") != std::string::npos, t.c_str());
    t = RenderVerify(Verify("done", 1, true), "m0");
    QVERIFY2(t.find("repaired: 1 region") != std::string::npos, t.c_str());
  }

  void detailStatusAndEvents() {
    json a{{"name", "m0"}, {"level", "mirror"}, {"state", "clean"}, {"assembled", true},
           {"size", 2 << 20}, {"legs", json::array()}, {"resync", nullptr},
           {"verify", Verify("done", 1, false)},
           {"verify_schedule", {{"interval", 7 * 86400}, {"next", 1797132644.5}}}};
    std::string d = RenderDetail(a);
    QVERIFY2(d.find("Last Verify : 2026-12-06") != std::string::npos, d.c_str());
    QVERIFY2(d.find("1 mismatching region (64 KiB)") != std::string::npos, d.c_str());
    QVERIFY2(d.find("Mismatches : 1048576 (leg 1)") != std::string::npos, d.c_str());
    QVERIFY2(d.find("Verify Every : 7d") != std::string::npos, d.c_str());
    a["verify"] = Verify("running", 0, false);
    d = RenderDetail(a);
    QVERIFY2(d.find("Verify Status : verify 50.0%") != std::string::npos, d.c_str());
    QVERIFY2(d.find("State : clean, checking") != std::string::npos, d.c_str());
    std::string md = RenderMdstat(a);
    QVERIFY2(md.find("check = 50.0%") != std::string::npos, md.c_str());
    a["verify"]["repair"] = true;
    QVERIFY(RenderMdstat(a).find("repair = 50.0%") != std::string::npos);
    json ev = Verify("done", 1, false);
    ev["type"] = "verify_done";
    ev["array"] = "m0";
    ev["ts"] = 1796527844.5;
    std::string line = RenderEvent(ev);
    QVERIFY2(line.find("m0 verify done: 1 mismatching region") != std::string::npos, line.c_str());
    ev["type"] = "verify_progress";
    line = RenderEvent(ev);
    QVERIFY2(line.find("m0 verify 50.0%") != std::string::npos, line.c_str());
  }
};

QTEST_GUILESS_MAIN(VerifyCliTest)
#include "verify_cli_test.moc"
