// Shell completion for dstctl (issue 14 item 2), through bash itself: the installed script
// (packaging/completion/dstctl.bash) is sourced, COMP_WORDS/COMP_CWORD are set as readline
// would, and the completion function (compgen over `dstctl __complete`) fills COMPREPLY.
// Verbs and options come from dstctl's command tree; live names from a real dstd.
#include <QDir>
#include <QElapsedTimer>
#include <QFile>
#include <QProcess>
#include <QStandardPaths>
#include <QTemporaryDir>
#include <QtTest/QtTest>

#include <filesystem>

#include "array_helpers.h"
#include "daemon_process.h"
#include "test_env.h"

using namespace dst::test;

namespace {

QString Script() { return qEnvironmentVariable("DST_SOURCE_DIR") + "/packaging/completion/dstctl.bash"; }

// COMPREPLY for `line` (the words after "dstctl"; a trailing space means an empty current word).
QStringList Complete(const QString& line, qint64* ms = nullptr) {
  QStringList words = line.split(' ');
  QString arr = "dstctl";
  for (const QString& w : words) arr += " '" + w + "'";
  const QString script = QString("source '%1' || exit 3\n"
                                 "complete -p dstctl | grep -q -- '-F _dstctl' || exit 4\n"
                                 "COMP_WORDS=(%2); COMP_CWORD=%3\n"
                                 "_dstctl\n"
                                 "printf '%s\\n' \"${COMPREPLY[@]}\"\n")
                             .arg(Script(), arr)
                             .arg(words.size());
  QProcess p;
  QProcessEnvironment env = QProcessEnvironment::systemEnvironment();
  env.insert("PATH", QString::fromStdString(std::filesystem::path(BinPath("dstctl")).parent_path().string()) +
                         ":" + env.value("PATH"));
  p.setProcessEnvironment(env);
  QElapsedTimer t;
  t.start();
  p.start("bash", {"--norc", "-c", script});
  if (!p.waitForFinished(20000) || p.exitCode() != 0) return {"<bash failed: " + QString::number(p.exitCode()) + " " + p.readAllStandardError() + ">"};
  if (ms) *ms = t.elapsed();
  QStringList out = QString::fromUtf8(p.readAllStandardOutput()).split('\n', Qt::SkipEmptyParts);
  out.sort();
  return out;
}

}  // namespace

class CompletionTest : public QObject {
  Q_OBJECT

 private slots:
  void init() {
    DST_REQUIRE(!QStandardPaths::findExecutable("bash").isEmpty(), "needs bash");
    DST_REQUIRE(QFile::exists(Script()), "packaging/completion/dstctl.bash missing (DST_SOURCE_DIR)");
    DST_REQUIRE(std::filesystem::exists(BinPath("dstctl")), "dstctl binary not built");
  }

  // Verbs, sub-verbs and options from dstctl's own command tree; no daemon needed.
  void verbsAndOptions() {
    QCOMPARE(Complete("ar"), QStringList{"array"});
    QCOMPARE(Complete("e"), (QStringList{"events", "export"}));
    const QStringList array = Complete("array ");
    for (const char* v : {"create", "add-leg", "fail-leg", "re-add-leg", "detach-leg", "verify",
                          "resync-rate", "pause-resync", "resume-resync"})
      QVERIFY2(array.contains(v), qPrintable(array.join(' ')));
    QVERIFY(!array.contains("export"));
    QCOMPARE(Complete("array create m --le"), QStringList{"--level"});
    QCOMPARE(Complete("--so"), QStringList{"--socket"});
    // Global options are offered inside subcommands too; an option value is skipped.
    QVERIFY(Complete("export list --socket /x -").contains("--json"));
    QCOMPARE(Complete("volume import v /img --keep"), QStringList{"--keepalive"});
    QCOMPARE(Complete("nonsense"), QStringList{});
  }

  // Names of exports, volumes, arrays, layers and leg slots, asked from a running dstd.
  void liveNamesFromTheDaemon() {
    DST_REQUIRE(IsRoot(), "needs root (dstd's FUSE mount)");
    DST_REQUIRE(std::filesystem::exists(BinPath("dstd")), "dstd binary not built");
    QTemporaryDir dir;
    DaemonProcess d(dir.path() + "/d");
    QDir().mkpath(dir.path() + "/d");
    for (const char* f : {"alpha", "beta", "l0", "l1", "v"})
      QVERIFY(MakeSparse(dir.path() + "/" + f + ".img", 16u << 20));
    d.config() = ExportToml("alpha", dir.path() + "/alpha.img", "") + ExportToml("beta", dir.path() + "/beta.img", "") +
                 ArrayToml("m0", "mirror", {dir.path() + "/l0.img", dir.path() + "/l1.img"});
    QVERIFY2(d.Start(), d.Log().right(2000).constData());
    QByteArray err;
    QVERIFY2(d.Ctl({"volume", "import", "vol1", dir.path() + "/v.img"}, nullptr, &err) == 0, err.constData());
    const QString s = "--socket " + d.control_socket() + " ";

    QCOMPARE(Complete(s + "export remove "), (QStringList{"alpha", "beta"}));
    QCOMPARE(Complete(s + "export remove a"), QStringList{"alpha"});
    QCOMPARE(Complete(s + "export allow b"), QStringList{"beta"});
    QCOMPARE(Complete(s + "volume remove "), QStringList{"vol1"});  // not m0's own volume
    QCOMPARE(Complete(s + "loop attach "), (QStringList{"m0", "vol1"}));  // every file on the mount
    QCOMPARE(Complete(s + "loop detach v"), QStringList{"vol1"});
    QCOMPARE(Complete(s + "detail "), QStringList{"m0"});
    QCOMPARE(Complete(s + "array fail-leg "), QStringList{"m0"});
    QCOMPARE(Complete(s + "array fail-leg m0 "), (QStringList{"0", "1"}));
    QCOMPARE(Complete(s + "array resolve m0 --keep "), (QStringList{"0", "1"}));
    QCOMPARE(Complete(s + "export add e --array "), QStringList{"m0"});
    const QStringList layers = Complete(s + "array create x --level ");
    QVERIFY2(layers.contains("mirror") && layers.contains("linear"), qPrintable(layers.join(' ')));
    // A new name is not completed from existing ones.
    QCOMPARE(Complete(s + "array create "), QStringList{});
    // --socket=PATH works as well as --socket PATH.
    QCOMPARE(Complete("--socket=" + d.control_socket() + " export remove "), (QStringList{"alpha", "beta"}));

    // A stopped daemon: no names, and no hang beyond the 1 s limit.
    d.Stop();
    qint64 ms = 0;
    QCOMPARE(Complete(s + "export remove ", &ms), QStringList{});
    d.Cont();
    QVERIFY2(ms < 5000, qPrintable(QString("completion against a stopped dstd took %1 ms").arg(ms)));
    // No daemon at all: nothing, at once.
    QCOMPARE(Complete("--socket " + dir.path() + "/none.sock export remove "), QStringList{});
  }
};

DST_TEST_MAIN(CompletionTest)
#include "completion_test.moc"
