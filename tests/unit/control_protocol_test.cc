// dstd control protocol codec, line splitting and human rendering (control/).
#include <QtTest/QtTest>

#include "dst/control/control_protocol.h"
#include "dst/control/render.h"
#include "test_env.h"

namespace ctl = dst::control;
using nlohmann::json;

class ControlProtocolTest : public QObject {
  Q_OBJECT

 private slots:
  void RoundTrip() {
    std::string line = ctl::EncodeRequest(7, "volume.import", json{{"name", "v"}, {"uri", "dst://h/d"}});
    QVERIFY(line.back() == '\n');
    QCOMPARE(std::count(line.begin(), line.end(), '\n'), 1);
    line.pop_back();
    ctl::Request req;
    ctl::ErrorInfo err;
    QVERIFY2(ctl::ParseRequest(line, &req, &err), err.message.c_str());
    QCOMPARE(req.id, json(7));
    QCOMPARE(req.method, std::string("volume.import"));
    QCOMPARE(req.params["uri"], json("dst://h/d"));

    // String ids and missing params are fine.
    QVERIFY(ctl::ParseRequest("{\"id\":\"abc\",\"method\":\"status\"}", &req, &err));
    QCOMPARE(req.id, json("abc"));
    QVERIFY(req.params.is_object() && req.params.empty());
    QVERIFY(ctl::ParseRequest("{\"id\":1,\"method\":\"status\",\"params\":null}", &req, &err));
  }

  void Replies() {
    ctl::Reply r;
    std::string why;
    std::string ok = ctl::EncodeResult(3, json{{"x", 1}});
    QVERIFY(ctl::ParseReply(ok.substr(0, ok.size() - 1), &r, &why));
    QVERIFY(r.ok);
    QCOMPARE(r.id, json(3));
    QCOMPARE(r.result["x"], json(1));
    std::string bad = ctl::EncodeError(4, ctl::kNotFound, "no volume \"x\"");
    QVERIFY(ctl::ParseReply(bad, &r, &why));
    QVERIFY(!r.ok);
    QCOMPARE(r.error_code, std::string("not_found"));
    QCOMPARE(r.error_message, std::string("no volume \"x\""));
    QVERIFY(!ctl::ParseReply("garbage", &r, &why));
    QVERIFY(!ctl::ParseReply("{\"id\":1}", &r, &why));
    QVERIFY(!ctl::ParseReply("{\"id\":1,\"result\":{},\"error\":{\"code\":\"x\"}}", &r, &why));
    QVERIFY(!ctl::ParseReply("{\"id\":1,\"error\":{\"message\":\"no code\"}}", &r, &why));
    // Invalid UTF-8 in a message is replaced, not thrown.
    std::string odd = ctl::EncodeError(1, ctl::kIoError, std::string("bad \xff byte"));
    QVERIFY(ctl::ParseReply(odd, &r, &why));
  }

  void BadRequests_data() {
    QTest::addColumn<QString>("line");
    QTest::addColumn<QString>("code");
    QTest::addColumn<bool>("id_known");
    QTest::newRow("not json") << "{\"id\":1,\"method\":" << "parse_error" << false;
    QTest::newRow("binary garbage") << QString::fromLatin1("\x01\x02\xff\xfe") << "parse_error" << false;
    QTest::newRow("empty object") << "{}" << "invalid_request" << false;
    QTest::newRow("array") << "[1,2]" << "invalid_request" << false;
    QTest::newRow("number") << "42" << "invalid_request" << false;
    QTest::newRow("missing id") << "{\"method\":\"status\"}" << "invalid_request" << false;
    QTest::newRow("float id") << "{\"id\":1.5,\"method\":\"status\"}" << "invalid_request" << false;
    QTest::newRow("object id") << "{\"id\":{},\"method\":\"status\"}" << "invalid_request" << false;
    QTest::newRow("missing method") << "{\"id\":1}" << "invalid_request" << true;
    QTest::newRow("method not string") << "{\"id\":1,\"method\":5}" << "invalid_request" << true;
    QTest::newRow("params not object") << "{\"id\":1,\"method\":\"status\",\"params\":[1]}"
                                       << "invalid_request" << true;
    QTest::newRow("extra member") << "{\"id\":1,\"method\":\"status\",\"x\":1}" << "invalid_request" << true;
    QTest::newRow("unknown method") << "{\"id\":2,\"method\":\"format_disk\"}" << "unknown_method" << true;
  }

  void BadRequests() {
    QFETCH(QString, line);
    QFETCH(QString, code);
    QFETCH(bool, id_known);
    ctl::Request req;
    ctl::ErrorInfo err;
    QByteArray bytes = line.toLatin1();
    QVERIFY(!ctl::ParseRequest(std::string_view(bytes.constData(), bytes.size()), &req, &err));
    QCOMPARE(QString::fromStdString(err.code), code);
    QVERIFY(!err.message.empty());
    QCOMPARE(!err.id.is_null(), id_known);
    // The error reply for it is itself a valid reply line.
    ctl::Reply r;
    std::string why;
    QVERIFY(ctl::ParseReply(ctl::EncodeError(err.id, err.code, err.message), &r, &why));
  }

  void Methods() {
    for (const char* m : {"status", "export.add", "export.list", "export.remove", "volume.import",
                          "volume.list", "volume.remove", "mount", "unmount", "array.create",
                          "array.detail", "apply", "events"})
      QVERIFY2(ctl::IsKnownMethod(m), m);
    QVERIFY(!ctl::IsKnownMethod("Status"));
    QVERIFY(!ctl::IsKnownMethod(""));
  }

  // hello (issue 10 item 6): a client refuses a daemon too old for it, with a sentence.
  void HelloCheck() {
    QVERIFY(ctl::IsKnownMethod("hello"));
    json good{{"protocol", ctl::kProtocolVersion},
              {"daemon", {{"name", "dstd"}, {"version", "0.1.0"}}},
              {"methods", {"hello", "status"}},
              {"layers", {"linear", "mirror"}},
              {"features", {"events", "events_since"}}};
    ctl::Reply r;
    r.ok = true;
    r.result = good;
    ctl::Hello h;
    QCOMPARE(ctl::CheckHello(r, "", &h), std::string());
    QCOMPARE(h.daemon_version, std::string("0.1.0"));
    QVERIFY(h.Has("events_since") && !h.Has("nbd"));
    QCOMPARE(ctl::CheckHello(r, "events_since"), std::string());
    // A feature it lacks.
    std::string why = ctl::CheckHello(r, "tls");
    QVERIFY2(why.find("does not support tls") != std::string::npos, why.c_str());
    // Too old a protocol.
    r.result["protocol"] = ctl::kMinDaemonProtocol - 1;
    why = ctl::CheckHello(r, "");
    QVERIFY2(why.find("upgrade dstd") != std::string::npos, why.c_str());
    // A daemon from before hello.
    ctl::Reply old;
    old.ok = false;
    old.error_code = ctl::kUnknownMethod;
    old.error_message = "unknown method \"hello\"";
    why = ctl::CheckHello(old, "");
    QVERIFY2(why.find("too old") != std::string::npos, why.c_str());
    // Malformed results are refused, not half-parsed.
    r.result = good;
    r.result.erase("layers");
    QVERIFY(!ctl::CheckHello(r, "").empty());
    r.result = good;
    r.result["methods"] = {1, 2};
    QVERIFY(!ctl::CheckHello(r, "").empty());
  }

  void LineSplitting() {
    ctl::LineSplitter s(64);
    std::string line;
    QVERIFY(s.Pop(&line) == ctl::LineSplitter::Next::kNeedMore);
    s.Append("abc", 3);
    QVERIFY(s.Pop(&line) == ctl::LineSplitter::Next::kNeedMore);
    s.Append("\r\nde", 4);
    QVERIFY(s.Pop(&line) == ctl::LineSplitter::Next::kLine);
    QCOMPARE(line, std::string("abc"));
    s.Append("f\n\nxyz\n", 7);
    QVERIFY(s.Pop(&line) == ctl::LineSplitter::Next::kLine);
    QCOMPARE(line, std::string("def"));
    QVERIFY(s.Pop(&line) == ctl::LineSplitter::Next::kLine);
    QCOMPARE(line, std::string(""));
    QVERIFY(s.Pop(&line) == ctl::LineSplitter::Next::kLine);
    QCOMPARE(line, std::string("xyz"));
    QVERIFY(s.Pop(&line) == ctl::LineSplitter::Next::kNeedMore);
    QCOMPARE(s.buffered(), std::size_t(0));
  }

  void OversizedLine() {
    // Without a newline: rejected as soon as more than the limit is buffered.
    ctl::LineSplitter s(64);
    std::string line, chunk(50, 'x');
    s.Append(chunk.data(), chunk.size());
    QVERIFY(s.Pop(&line) == ctl::LineSplitter::Next::kNeedMore);
    s.Append(chunk.data(), chunk.size());
    QVERIFY(s.Pop(&line) == ctl::LineSplitter::Next::kTooLong);
    QVERIFY(s.Pop(&line) == ctl::LineSplitter::Next::kTooLong);  // stays poisoned
    // With a newline, in one chunk.
    ctl::LineSplitter t(64);
    std::string big(100, 'y');
    big += "\nok\n";
    t.Append(big.data(), big.size());
    QVERIFY(t.Pop(&line) == ctl::LineSplitter::Next::kTooLong);
    // Exactly at the limit is fine.
    ctl::LineSplitter u(64);
    std::string exact(64, 'z');
    exact += "\n";
    u.Append(exact.data(), exact.size());
    QVERIFY(u.Pop(&line) == ctl::LineSplitter::Next::kLine);
    QCOMPARE(line.size(), std::size_t(64));
    // The default limit is the protocol's.
    ctl::LineSplitter d;
    std::string huge(ctl::kMaxLineBytes + 1, '{');
    d.Append(huge.data(), huge.size());
    QVERIFY(d.Pop(&line) == ctl::LineSplitter::Next::kTooLong);
  }

  void ExitCodes() {
    QCOMPARE(ctl::ExitCodeForError(ctl::kNotFound), 65);
    QCOMPARE(ctl::ExitCodeForError(ctl::kExists), 65);
    QCOMPARE(ctl::ExitCodeForError(ctl::kInvalidParams), 65);
    QCOMPARE(ctl::ExitCodeForError(ctl::kBusy), 75);
    QCOMPARE(ctl::ExitCodeForError(ctl::kUnavailable), 69);
    QCOMPARE(ctl::ExitCodeForError(ctl::kIoError), 74);
    QCOMPARE(ctl::ExitCodeForError(ctl::kUnknownMethod), 76);
    QCOMPARE(ctl::ExitCodeForError("something_new"), 70);
    QCOMPARE(ctl::ExitCodeForError(ctl::kPermissionDenied), 77);
    QCOMPARE(ctl::ExitCodeForError(ctl::kTooSlow), 76);
  }

  // A request nested deeper than kMaxJsonDepth is refused by a byte scan, before nlohmann
  // builds (and recursively copies) it; brackets inside strings do not count.
  void NestingDepth() {
    QVERIFY(ctl::JsonDepthWithin("{\"a\":[[1]]}", 3));
    QVERIFY(!ctl::JsonDepthWithin("{\"a\":[[1]]}", 2));
    QVERIFY(ctl::JsonDepthWithin("{\"a\":\"[[[[[[\\\"[[[\"}", 1));
    std::string at_limit = "{\"id\":1,\"method\":\"status\",\"params\":{\"x\":" +
                           std::string(ctl::kMaxJsonDepth - 2, '[') +
                           std::string(ctl::kMaxJsonDepth - 2, ']') + "}}";
    ctl::Request req;
    ctl::ErrorInfo err;
    QVERIFY2(ctl::ParseRequest(at_limit, &req, &err), err.message.c_str());
    const int kDeep = 400000;
    std::string deep = "{\"id\":1,\"method\":\"status\",\"params\":{\"x\":" +
                       std::string(kDeep, '[') + std::string(kDeep, ']') + "}}";
    QVERIFY(deep.size() < ctl::kMaxLineBytes);
    QVERIFY(!ctl::ParseRequest(deep, &req, &err));
    QCOMPARE(err.code, std::string(ctl::kInvalidRequest));
    QVERIFY2(err.message.find("nested deeper than 64") != std::string::npos, err.message.c_str());
    ctl::Reply r;
    std::string why;
    QVERIFY(!ctl::ParseReply("{\"id\":1,\"result\":" + std::string(100, '[') +
                                 std::string(100, ']') + "}",
                             &r, &why));
  }

  void ReadOnlyMethods() {
    for (const char* m : {"status", "hello", "export.list", "volume.list", "array.list",
                          "array.detail", "array.layers", "events"})
      QVERIFY2(ctl::IsReadOnlyMethod(m), m);
    for (const char* m : {"export.add", "export.remove", "volume.import", "volume.remove",
                          "mount", "unmount", "array.create", "array.verify", "apply",
                          "array.fail_leg", "array.resolve"})
      QVERIFY2(!ctl::IsReadOnlyMethod(m), m);
    // Every read-only method is a real one (a typo would silently deny it).
    int known = 0;
    for (const auto& m : ctl::Methods()) known += ctl::IsReadOnlyMethod(m);
    QCOMPARE(known, 8);
  }

  void Rendering() {
    QCOMPARE(ctl::FormatSize(512), std::string("512 B"));
    QCOMPARE(ctl::FormatSize(512ull << 20), std::string("512 MiB"));
    QCOMPARE(ctl::FormatSize(3ull << 29), std::string("1.5 GiB"));
    QCOMPARE(ctl::FormatDuration(62), std::string("1m02s"));
    QCOMPARE(ctl::FormatDuration(3 * 3600 + 120), std::string("3h02m"));

    std::string t = ctl::RenderTable({"NAME", "SIZE"}, {{"a", "1"}, {"longname", "22"}});
    QCOMPARE(t, std::string("NAME      SIZE\na         1\nlongname  22\n"));

    json st = json::parse("{\n"
        "      \"version\": 1,\n"
        "      \"daemon\": {\"pid\": 42, \"listen\": {\"address\": \"127.0.0.1\", \"port\": 7400}, \"uptime_s\": 75,\n"
        "                 \"batching\": true, \"memory_locked\": false},\n"
        "      \"exporter\": {\"connections_open\": 1, \"requests\": 10, \"errors_replied\": 0, \"frames_per_call\": 2.5},\n"
        "      \"exports\": [{\"name\": \"disk1\", \"device\": \"file /x.img\", \"size\": 1073741824, \"read_only\": false,\n"
        "                   \"connections\": 1, \"allow\": [\"hostc:rw\", \"backup:ro\"]}],\n"
        "      \"volumes\": [{\"name\": \"vol\", \"uri\": \"dst://h:7400/disk1\", \"path\": null, \"size\": 1048576,\n"
        "                   \"state\": \"reconnecting\", \"reconnects\": 3, \"resent\": 2, \"timeouts\": 0,\n"
        "                   \"inflight\": 4, \"requests\": 9, \"frames_per_call\": 1.75,\n"
        "                   \"file\": \"/mnt/vol.img\", \"open_count\": 1, \"error\": null}],\n"
        "      \"mount\": \"/mnt\"\n"
        "    }");
    std::string out = ctl::RenderStatus(st);
    for (const char* want : {"dstd pid:42 listen:127.0.0.1:7400 uptime:1m15s batching:on memlock:no",
                             "  mount:/mnt", "frames/call:2.50", "export disk1 size:1 GiB read-write",
                             "volume vol state:reconnecting size:1 MiB",
                             "  remote:dst://h:7400/disk1",
                             "    connection:reconnecting reconnects:3 resent:2 timeouts:0 inflight:4",
                             "frames/call:1.75", "  file:/mnt/vol.img open:1", "  allow:hostc:rw,backup:ro"}) {
      QVERIFY2(out.find(want) != std::string::npos, (std::string(want) + "\n---\n" + out).c_str());
    }
    std::string vols = ctl::RenderVolumeList(st["volumes"]);
    QVERIFY2(vols.rfind("NAME  SIZE   STATE         RECONNECTS  INFLIGHT  SOURCE\n", 0) == 0,
             vols.c_str());
    QCOMPARE(ctl::RenderExportList(json::array()), std::string("no exports\n"));
    std::string exps = ctl::RenderExportList(st["exports"]);
    QVERIFY2(exps.find("ALLOW") != std::string::npos && exps.find("hostc:rw,backup:ro") != std::string::npos, exps.c_str());
    exps = ctl::RenderExportList(json::array({json{{"name", "e"}, {"allow", json::array()}}}));
    QVERIFY2(exps.find("nobody") != std::string::npos, exps.c_str());
    // Missing members never throw.
    QVERIFY(!ctl::RenderStatus(json::object()).empty());
  }
};

DST_TEST_MAIN(ControlProtocolTest)
#include "control_protocol_test.moc"
