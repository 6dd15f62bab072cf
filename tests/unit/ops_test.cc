// Typed operations of the control protocol (control/include/dst/control/ops.h): every request
// survives ToParams -> FromParams, every operation method is recognised, param errors are the
// protocol's invalid_params texts, and refusals and step reports keep their typed fields in JSON
// (also through an error reply line).
#include <QtTest/QtTest>

#include <set>

#include "dst/control/control_protocol.h"
#include "dst/control/ops.h"
#include "test_env.h"

namespace ctl = dst::control;
using nlohmann::json;

namespace {

std::vector<ctl::OpRequest> Samples() {
  ctl::ArrayCreateOp create;
  create.name = "m";
  create.level = "mirror";
  create.legs = {"/a", "dst://h:1/x"};
  create.region_size = "64K";
  create.resync_rate_max = "200M";
  create.write_intent = false;
  create.force = true;
  ctl::VolumeImportOp vol{"v", "dst://h/e", 32, {}, 5};
  return {create,
          ctl::ArrayRemoveOp{"m"},
          ctl::LegAddOp{"m", "/b", false},
          ctl::LegAddOp{"lin", "/c", true},
          ctl::LegChangeOp{"m", ctl::LegAction::kFail, 1, "", false},
          ctl::LegChangeOp{"m", ctl::LegAction::kRemove, 0, "", true},
          ctl::LegChangeOp{"m", ctl::LegAction::kReAdd, 2, "/d", false},
          ctl::LegChangeOp{"m", ctl::LegAction::kDetach, 3, "", false},
          ctl::ExportAddOp{"e", "/img", "", "", "1M", true, false, true, {}},
          ctl::ExportAddOp{"e2", "", "m", "", "", false, false, false, {"hostc:rw", "backup:ro"}},
          ctl::ExportAllowOp{"e2", {"anonymous:ro"}},
          ctl::ExportAllowOp{"e2", {}},
          ctl::ExportRemoveOp{"e"},
          vol,
          ctl::VolumeRemoveOp{"v"},
          ctl::MountOp{"/mnt/dst"},
          ctl::SetResyncRateOp{"m", "10M", ""},
          ctl::VerifyOp{"m", true, false},
          ctl::PauseResyncOp{"m", true},
          ctl::PauseResyncOp{"m", false}};
}

}  // namespace

class OpsTest : public QObject {
  Q_OBJECT

 private slots:
  void RoundTrip() {
    for (auto& op : Samples()) {
      const std::string method = ctl::MethodOf(op);
      QVERIFY2(ctl::IsOperationMethod(method), method.c_str());
      QVERIFY2(ctl::IsKnownMethod(method), method.c_str());
      const json params = ctl::ToParams(op);
      ctl::OpRequest back;
      std::string why;
      QVERIFY2(ctl::FromParams(method, params, &back, &why), (method + ": " + why).c_str());
      QCOMPARE(back.index(), op.index());
      QCOMPARE(ctl::ToParams(back), params);
      QCOMPARE(ctl::MethodOf(back), method);
    }
    QVERIFY(!ctl::IsOperationMethod("status"));
    QVERIFY(!ctl::IsOperationMethod("apply"));
    QVERIFY(!ctl::IsOperationMethod("array.detail"));
  }

  void ParamErrors() {
    ctl::OpRequest op;
    std::string why;
    QVERIFY(!ctl::FromParams("array.create", json{{"name", "m"}, {"level", "mirror"}}, &op, &why));
    QCOMPARE(why, std::string("parameter \"legs\" must be an array of leg specs"));
    QVERIFY(!ctl::FromParams("export.add", json{{"name", "e"}}, &op, &why));
    QCOMPARE(why, std::string("missing parameter \"path\""));
    QVERIFY(!ctl::FromParams("export.add", json{{"name", "e"}, {"path", "rel"}}, &op, &why));
    QCOMPARE(why, std::string("path \"rel\" must be absolute"));
    QVERIFY(!ctl::FromParams("export.allow", json{{"name", "e"}}, &op, &why));  // [] is explicit
    QVERIFY(why.find("allow") != std::string::npos);
    QVERIFY(!ctl::FromParams("export.add", json{{"name", "e"}, {"path", "/x"}, {"allow", "a:rw"}}, &op, &why));
    QVERIFY(why.find("allow") != std::string::npos);
    QVERIFY(!ctl::FromParams("array.fail_leg", json{{"name", "m"}, {"slot", -1}}, &op, &why));
    QVERIFY(why.find("slot") != std::string::npos);
    QVERIFY(!ctl::FromParams("volume.import", json{{"name", "v"}, {"uri", "/x"}, {"queue_depth", 0}},
                             &op, &why));
    QCOMPARE(why, std::string("parameter \"queue_depth\" must be an integer in 1..1024"));
    QVERIFY(!ctl::FromParams("array.verify", json{{"name", "m"}, {"repair", true}, {"cancel", true}},
                             &op, &why));
    QCOMPARE(why, std::string("give repair or cancel, not both"));
    QVERIFY(!ctl::FromParams("array.set_resync_rate", json{{"name", "m"}}, &op, &why));
    QCOMPARE(why, std::string("give min and/or max"));
    QVERIFY(!ctl::FromParams("mount", json{{"path", "mnt"}}, &op, &why));
    // A size given as a number is kept as its decimal text.
    QVERIFY(ctl::FromParams("export.add", json{{"name", "e"}, {"path", "/x"}, {"size", 4096}}, &op, &why));
    QCOMPARE(std::get<ctl::ExportAddOp>(op).size, std::string("4096"));
  }

  void Refusals() {
    const ctl::RefusalCode all[] = {
        ctl::RefusalCode::kInvalid,     ctl::RefusalCode::kUnknownName, ctl::RefusalCode::kExists,
        ctl::RefusalCode::kBusy,        ctl::RefusalCode::kLegInUse,    ctl::RefusalCode::kCycle,
        ctl::RefusalCode::kDoesNotFit,  ctl::RefusalCode::kReadOnlyLeg, ctl::RefusalCode::kLastGoodLeg,
        ctl::RefusalCode::kNotAssembled};
    std::set<std::string> names;
    for (auto c : all) {
      ctl::Refusal r{c, "leg:/x", c == ctl::RefusalCode::kLegInUse ? "array:m/slot:0" : "", "why"};
      json j = ctl::ToJson(r);
      ctl::Refusal back;
      QVERIFY(ctl::FromJson(j, &back));
      QCOMPARE(int(back.code), int(c));
      QCOMPARE(back.object, r.object);
      QCOMPARE(back.owner, r.owner);
      QCOMPARE(back.message, r.message);
      QVERIFY(names.insert(ctl::RefusalCodeName(c)).second);  // distinct names
      // The error code is one dstctl maps to an exit code other than "internal".
      QVERIFY(ctl::ExitCodeForError(ctl::ErrorCodeForRefusal(c)) != ctl::kExSoftware);
    }
    QCOMPARE(std::string(ctl::ErrorCodeForRefusal(ctl::RefusalCode::kLegInUse)), std::string("busy"));
    QCOMPARE(std::string(ctl::ErrorCodeForRefusal(ctl::RefusalCode::kUnknownName)),
             std::string("not_found"));
    QVERIFY(ctl::ToJson(ctl::Refusal{ctl::RefusalCode::kBusy, "array:m", "", "x"})["owner"].is_null());

    // Through an error reply.
    json reasons = json::array({ctl::ToJson(ctl::Refusal{ctl::RefusalCode::kLegInUse, "leg:/a",
                                                         "export:e1", "in use"})});
    std::string line = ctl::EncodeError(3, "busy", "in use", reasons);
    line.pop_back();
    ctl::Reply reply;
    std::string why;
    QVERIFY2(ctl::ParseReply(line, &reply, &why), why.c_str());
    QVERIFY(!reply.ok);
    QCOMPARE(reply.error_code, std::string("busy"));
    QCOMPARE(reply.error_reasons.size(), std::size_t(1));
    ctl::Refusal r;
    QVERIFY(ctl::FromJson(reply.error_reasons[0], &r));
    QCOMPARE(r.owner, std::string("export:e1"));
    // An error without reasons parses with none.
    line = ctl::EncodeError(4, "not_found", "no");
    line.pop_back();
    QVERIFY(ctl::ParseReply(line, &reply, &why));
    QVERIFY(reply.error_reasons.empty());
  }

  void Steps() {
    ctl::StepReport r{{ctl::StepKind::kImportVolume, "volume:v", "volume import v dst://h/x"},
                      ctl::StepStatus::kFailed, "connection refused", "unavailable"};
    json j = ctl::ToJson(r);
    QCOMPARE(j["kind"], json("import_volume"));
    QCOMPARE(j["step"], json("volume import v dst://h/x"));
    QCOMPARE(j["status"], json("failed"));
    ctl::StepReport back;
    QVERIFY(ctl::FromJson(j, &back));
    QCOMPARE(int(back.step.kind), int(r.step.kind));
    QCOMPARE(back.error_code, r.error_code);
    r.status = ctl::StepStatus::kNotRun;
    j = ctl::ToJson(r);
    QCOMPARE(j["status"], json("not run"));
    QVERIFY(!j.contains("error"));
    for (int k = 0; k <= int(ctl::StepKind::kVerify); ++k) {
      ctl::StepKind parsed;
      QVERIFY(ctl::ParseStepKind(ctl::StepKindName(ctl::StepKind(k)), &parsed));
      QCOMPARE(int(parsed), k);
    }
  }
};

DST_TEST_MAIN(OpsTest)
#include "ops_test.moc"
