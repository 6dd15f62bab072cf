// tools/get-maintainer and MAINTAINERS (issue 14 item 4): the git ranking on a throwaway
// repository with several authors, the kernel's F:/X:/N: matching rules, and that every file of
// dst's own tree has an owner.
#include <QDir>
#include <QFile>
#include <QJsonArray>
#include <QJsonDocument>
#include <QJsonObject>
#include <QProcess>
#include <QStandardPaths>
#include <QTemporaryDir>
#include <QtTest/QtTest>

#include <ctime>

#include "run_tool.h"
#include "test_env.h"

using dst::test::RunTool;
using dst::test::ToolResult;

namespace {

QString SourceDir() { return qEnvironmentVariable("DST_SOURCE_DIR"); }
QString Tool() { return SourceDir() + "/tools/get-maintainer"; }

bool WriteText(const QString& path, const QByteArray& text) {
  QDir().mkpath(QFileInfo(path).absolutePath());
  QFile f(path);
  return f.open(QIODevice::WriteOnly | QIODevice::Truncate) && f.write(text) == text.size();
}

// Runs git in `dir` as `author`, dated `days_ago` days before now (author and committer date:
// `git log --since` looks at the committer's).
bool Git(const QString& dir, const QStringList& args, const QString& author = {}, int days_ago = 0) {
  QProcess p;
  p.setWorkingDirectory(dir);
  QProcessEnvironment env = QProcessEnvironment::systemEnvironment();
  if (!author.isEmpty()) {
    const QString date = QString::number(std::time(nullptr) - std::int64_t(days_ago) * 86400) + " +0000";
    const QString email = author.toLower() + "@example.org";
    for (const char* who : {"AUTHOR", "COMMITTER"}) {
      env.insert(QString("GIT_%1_NAME").arg(who), author);
      env.insert(QString("GIT_%1_EMAIL").arg(who), email);
      env.insert(QString("GIT_%1_DATE").arg(who), date);
    }
  }
  p.setProcessEnvironment(env);
  p.start("git", args);
  return p.waitForFinished(30000) && p.exitStatus() == QProcess::NormalExit && p.exitCode() == 0;
}

// One commit that changes `file` (appends a line), by `author`, `days_ago` days ago.
bool Commit(const QString& repo, const QString& file, const QString& author, int days_ago) {
  QFile f(repo + "/" + file);
  QDir().mkpath(QFileInfo(f).absolutePath());
  if (!f.open(QIODevice::Append)) return false;
  f.write(QString("%1 %2\n").arg(author).arg(days_ago).toUtf8());
  f.close();
  return Git(repo, {"add", file}, author, days_ago) &&
         Git(repo, {"commit", "-q", "-m", QString("%1, %2 days ago").arg(author).arg(days_ago)}, author, days_ago);
}

QJsonArray RunJson(const QStringList& args, ToolResult* r) {
  *r = RunTool(Tool(), QStringList(args) << "--json");
  return QJsonDocument::fromJson(r->out).array();
}

// Entry titles that match `path` under MAINTAINERS file `m`.
QStringList Titles(const QString& m, const QString& path) {
  ToolResult r;
  const QJsonArray a = RunJson({"--maintainers-only", "--maintainers", m, path}, &r);
  QStringList t;
  if (r.rc != 0 || a.size() != 1) return {"<failed: " + QString::fromUtf8(r.err) + ">"};
  for (const auto& e : a[0].toObject()["entries"].toArray()) t << e.toObject()["title"].toString();
  return t;
}

}  // namespace

class MaintainersTest : public QObject {
  Q_OBJECT

 private slots:
  void init() {
    DST_REQUIRE(QFile::exists(Tool()), "tools/get-maintainer missing (DST_SOURCE_DIR)");
    DST_REQUIRE(!QStandardPaths::findExecutable("python3").isEmpty(), "needs python3");
    DST_REQUIRE(!QStandardPaths::findExecutable("git").isEmpty(), "needs git");
  }

  // Recent work outranks more but older work; a commit outside the window does not count;
  // shares are of the commits in the window; merges are not counted.
  void gitRankingByCommitsAndRecency() {
    QTemporaryDir dir;
    const QString repo = dir.path();
    QVERIFY(Git(repo, {"init", "-q", "-b", "main"}));
    QVERIFY(Commit(repo, "src/a.c", "Carol", 400));  // outside the one-year window
    for (int d : {330, 320, 310, 300}) QVERIFY(Commit(repo, "src/a.c", "Bob", d));
    for (int d : {40, 20, 5}) QVERIFY(Commit(repo, "src/a.c", "Alice", d));
    QVERIFY(Commit(repo, "src/other.c", "Dave", 1));  // another file: not in a.c's picture
    // A merge commit by Erin touching a.c through its branch's commit by Frank.
    QVERIFY(Git(repo, {"checkout", "-q", "-b", "side"}));
    QVERIFY(Commit(repo, "src/a.c", "Frank", 3));
    QVERIFY(Git(repo, {"checkout", "-q", "main"}));
    QVERIFY(Commit(repo, "src/b.c", "Erin", 2));
    QVERIFY(Git(repo, {"merge", "-q", "--no-ff", "-m", "merge side", "side"}, "Erin", 2));

    ToolResult r;
    const QJsonArray a = RunJson({"--git-only", repo + "/src/a.c"}, &r);
    QVERIFY2(r.rc == 0, r.err.constData());
    QCOMPARE(a.size(), 1);
    QCOMPARE(a[0].toObject()["file"].toString(), QString("src/a.c"));
    const QJsonArray people = a[0].toObject()["git"].toArray();
    QStringList names;
    for (const auto& p : people) names << p.toObject()["name"].toString();
    // Alice: 3 commits of the last 40 days; Bob: 4 of 300..330 days ago; Frank: 1, 3 days ago.
    QCOMPARE(names, (QStringList{"Alice", "Bob", "Frank"}));
    QCOMPARE(people[0].toObject()["commits"].toInt(), 3);
    QCOMPARE(people[1].toObject()["commits"].toInt(), 4);
    QCOMPARE(people[2].toObject()["commits"].toInt(), 1);
    QCOMPARE(people[0].toObject()["share"].toInt(), 38);  // 3 of 8
    QCOMPARE(people[1].toObject()["share"].toInt(), 50);  // 4 of 8
    QVERIFY(people[0].toObject()["score"].toDouble() > people[1].toObject()["score"].toDouble());

    // Text output names the same people, in the same order.
    const ToolResult t = RunTool(Tool(), {"--git-only", repo + "/src/a.c"});
    QCOMPARE(t.rc, 0);
    const QString text = QString::fromUtf8(t.out);
    QVERIFY2(text.indexOf("Alice") < text.indexOf("Bob") && text.indexOf("Bob") < text.indexOf("Frank"), t.out.constData());
    QVERIFY2(text.contains("Alice <alice@example.org> (git: 3 commits in 365 days"), t.out.constData());
    QVERIFY(!text.contains("Carol") && !text.contains("Dave") && !text.contains("Erin"));

    // A shorter window drops Bob.
    const QJsonArray b = RunJson({"--git-only", "--since-days", "100", repo + "/src/a.c"}, &r);
    QCOMPARE(b[0].toObject()["git"].toArray().size(), 2);
    QCOMPARE(b[0].toObject()["git"].toArray()[0].toObject()["name"].toString(), QString("Alice"));
  }

  // The kernel's rules: "dir/" matches below, "dir/*" only one level, wildcards, X: wins in
  // its entry, N: regexes; --check lists unowned tracked files and fails.
  void kernelPatternRules() {
    QTemporaryDir dir;
    const QString repo = dir.path();
    QVERIFY(Git(repo, {"init", "-q", "-b", "main"}));
    QVERIFY(WriteText(repo + "/MAINTAINERS",
                      "Prose before the first entry.\n"
                      "\tF:\tnot/a/pattern/of/any/entry\n"
                      "\n"
                      "DEEP\n"
                      "M:\tDee <dee@example.org>\n"
                      "F:\tlib/\n"
                      "X:\tlib/vendor/\n"
                      "\n"
                      "SHALLOW\n"
                      "M:\tSam <sam@example.org>\n"
                      "R:\tRae <rae@example.org>\n"
                      "F:\tlib/*\n"
                      "F:\tdocs/*.md\n"
                      "\n"
                      "TESTS\n"
                      "M:\tTess <tess@example.org>\n"
                      "N:\t_test\\.cc$\n"));
    for (const char* f : {"lib/x.c", "lib/sub/y.c", "lib/vendor/z.c", "docs/a.md", "docs/deep/b.md",
                          "src/foo_test.cc"})
      QVERIFY(WriteText(repo + "/" + f, "x\n"));
    QVERIFY(Git(repo, {"add", "-A"}, "Dee", 1));
    QVERIFY(Git(repo, {"commit", "-q", "-m", "tree"}, "Dee", 1));
    const QString m = repo + "/MAINTAINERS";
    QCOMPARE(Titles(m, repo + "/lib/x.c"), (QStringList{"DEEP", "SHALLOW"}));
    QCOMPARE(Titles(m, repo + "/lib/sub/y.c"), (QStringList{"DEEP"}));
    QCOMPARE(Titles(m, repo + "/lib/vendor/z.c"), QStringList{});
    QCOMPARE(Titles(m, repo + "/docs/a.md"), (QStringList{"SHALLOW"}));
    QCOMPARE(Titles(m, repo + "/docs/deep/b.md"), QStringList{});
    QCOMPARE(Titles(m, repo + "/src/foo_test.cc"), (QStringList{"TESTS"}));

    const ToolResult t = RunTool(Tool(), {"--maintainers-only", "--maintainers", m, repo + "/lib/x.c"});
    QCOMPARE(t.rc, 0);
    QVERIFY2(t.out.contains("Dee <dee@example.org> (maintainer: DEEP)") &&
                 t.out.contains("Rae <rae@example.org> (reviewer: SHALLOW)"),
             t.out.constData());

    const ToolResult c = RunTool(Tool(), {"--check", "--maintainers", m, repo + "/lib/x.c"});
    QCOMPARE(c.rc, 1);
    QVERIFY2(c.out.contains("unowned: lib/vendor/z.c") && c.out.contains("unowned: docs/deep/b.md") &&
                 c.out.contains("unowned: MAINTAINERS") && !c.out.contains("unowned: lib/x.c"),
             c.out.constData());
  }

  // dst's own tree: every tracked file matches an entry of MAINTAINERS, so a new file cannot go
  // unowned (add an F: pattern for it).
  void everyFileOfTheTreeHasAnOwner() {
    DST_REQUIRE(QFileInfo::exists(SourceDir() + "/.git"), "the source tree is not a git checkout");
    const ToolResult r = RunTool(Tool(), {"--check", SourceDir()});
    QVERIFY2(r.rc == 0, (r.out + r.err).constData());
    QVERIFY2(r.out.contains(" tracked files match an entry"), r.out.constData());
  }
};

DST_TEST_MAIN(MaintainersTest)
#include "maintainers_test.moc"
