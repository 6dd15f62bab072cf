// SshForward (issue 12, "Hosts") with a fake ssh (tests/gui/fake_ssh.py: same arguments, forwards
// unix sockets on this machine, never contacts a host): the command is built from the template,
// a HostSession reaches a real dstd through the forward, a killed forward turns the host offline
// and the supervisor brings both back by themselves, a failing command shows its error, and
// dst-gui's --host / --ssh-command parsing (the template is remembered in QSettings).
#include <QtTest/QtTest>

#include <csignal>
#include <filesystem>

#include <QDir>
#include <QProcess>
#include <QScopeGuard>
#include <QSettings>

#include "daemon_process.h"
#include "device_tree_model.h"
#include "host_session.h"
#include "log_model.h"
#include "main_window.h"
#include "ssh_forward.h"
#include "test_env.h"

using dst::gui::DeviceTreeModel;
using dst::gui::HostSession;
using dst::gui::LogModel;
using dst::gui::SshForward;
using namespace dst::test;

namespace {

QString FakeSsh() { return qEnvironmentVariable("DST_SOURCE_DIR") + "/tests/gui/fake_ssh.py"; }

QString FakeTemplate() {
  return FakeSsh() + " -N -o ExitOnForwardFailure=yes -o ServerAliveInterval=5 -L {local}:{remote} {target}";
}

bool HasExport(const DeviceTreeModel& m, const QString& name) {
  if (m.rowCount() != 1) return false;
  QModelIndex host = m.index(0, 0);
  for (int r = 0; r < m.rowCount(host); ++r)
    if (m.index(r, 0, host).data().toString() == name) return true;
  return false;
}

// The processes whose parent is `pid` (from /proc/*/stat: "pid (comm) state ppid ...").
QList<pid_t> ChildrenOf(qint64 pid) {
  QList<pid_t> kids;
  for (const QString& e : QDir("/proc").entryList(QDir::Dirs)) {
    QFile f("/proc/" + e + "/stat");
    if (!f.open(QIODevice::ReadOnly)) continue;
    QByteArray stat = f.readAll();
    QList<QByteArray> rest = stat.mid(stat.lastIndexOf(')') + 2).split(' ');
    if (rest.size() > 1 && rest[1].toLongLong() == pid) kids << pid_t(e.toInt());
  }
  return kids;
}

// Running: not gone and not a zombie waiting for a reaper.
bool Alive(pid_t pid) {
  QFile f(QString("/proc/%1/stat").arg(pid));
  if (!f.open(QIODevice::ReadOnly)) return false;
  QByteArray stat = f.readAll();
  return stat.mid(stat.lastIndexOf(')') + 2, 1) != "Z";
}

bool LogHas(const LogModel& log, const QString& text) {
  for (int r = 0; r < log.rowCount(); ++r)
    if (log.index(r, LogModel::kMessage).data().toString().contains(text)) return true;
  return false;
}

}  // namespace

class SshForwardTest : public QObject {
  Q_OBJECT
 private:
  QTemporaryDir settings_;

 private slots:
  void initTestCase() {
    QVERIFY(settings_.isValid());
    QSettings::setPath(QSettings::NativeFormat, QSettings::UserScope, settings_.path());
  }

  void commandFromTemplate() {
    QVERIFY(SshForward::IsRemote("alice@db1"));
    QVERIFY(SshForward::IsRemote("alice@db1:/srv/dst/dstd.sock"));
    QVERIFY(!SshForward::IsRemote("/run/dst/dstd.sock"));
    QVERIFY(!SshForward::IsRemote("./a@b/dstd.sock"));
    QVERIFY(!SshForward::IsRemote("dir/a@b.sock"));

    QCOMPARE(SshForward::BuildCommand("ssh -L '{local}:{remote}' -p 22 {target} \"x y\"", "/l", "/r", "u@h"),
             QStringList({"ssh", "-L", "/l:/r", "-p", "22", "u@h", "x y"}));
    QCOMPARE(SshForward::BuildCommand("a\\ b 'it''s' \"q\\\"\" ''", "", "", ""),
             QStringList({"a b", "its", "q\"", ""}));

    SshForward f("alice@db1:/srv/dst/dstd.sock", SshForward::kDefaultTemplate);
    QCOMPARE(f.target(), QStringLiteral("alice@db1"));
    QCOMPARE(f.remoteSocket(), QStringLiteral("/srv/dst/dstd.sock"));
    QString local = f.localSocket();
    QVERIFY(!local.isEmpty());
    QFileInfo dir(QFileInfo(local).path());
    QVERIFY(dir.isDir());
    QCOMPARE(int(dir.permissions() & 0x7077), 0x7000);  // rwx for the owner, nothing for group and others
    QCOMPARE(f.command(), QStringList({"ssh", "-N", "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=5",
                                       "-L", local + ":/srv/dst/dstd.sock", "alice@db1"}));
    QCOMPARE(f.commandLine(), f.command().join(' '));  // nothing to quote
    QCOMPARE(f.state(), SshForward::State::kStopped);

    SshForward d("bob@db2", "\"my ssh\" -L {local}:{remote} {target}");
    QCOMPARE(d.remoteSocket(), QString(SshForward::kDefaultRemoteSocket));
    QCOMPARE(d.command().value(0), QStringLiteral("my ssh"));
    QVERIFY(d.commandLine().startsWith("'my ssh' -L "));
    QVERIFY(d.commandLine().endsWith(":/run/dst/dstd.sock bob@db2"));
    QVERIFY(d.localSocket() != local);  // a private directory each
    // The displayed line splits back into the same words.
    QCOMPARE(SshForward::BuildCommand(d.commandLine(), "", "", ""), d.command());
  }

  void argumentsAndRememberedTemplate() {
    QCOMPARE(SshForward::SavedTemplate(), QString(SshForward::kDefaultTemplate));
    QStringList hosts = dst::gui::HostsFromArgs(
        {"dst-gui", "--host", "alice@db1", "--host", "/tmp/x/dstd.sock", "--ssh-command", "ssh -F cfg -L {local}:{remote} {target}"},
        QString());
    QCOMPARE(hosts, QStringList({"alice@db1", "/tmp/x/dstd.sock"}));
    QCOMPARE(SshForward::SavedTemplate(), QStringLiteral("ssh -F cfg -L {local}:{remote} {target}"));
    // Remembered: a later run without the option keeps it.
    dst::gui::HostsFromArgs({"dst-gui", "--host", "alice@db1"}, QString());
    QCOMPARE(SshForward::SavedTemplate(), QStringLiteral("ssh -F cfg -L {local}:{remote} {target}"));
    // A plain socket path is used as is, no forward.
    QObject owner;
    SshForward* f = nullptr;
    QCOMPARE(dst::gui::HostSocket("/tmp/x/dstd.sock", &owner, nullptr, &f), QStringLiteral("/tmp/x/dstd.sock"));
    QVERIFY(f == nullptr);
    QCOMPARE(owner.findChildren<SshForward*>().size(), 0);
  }

  void onlineThroughForwardAndBackAfterKill() {
    DST_REQUIRE(std::filesystem::exists(BinPath("dstd")) && std::filesystem::exists(BinPath("dstctl")),
                "dstd and dstctl not built");
    DST_REQUIRE(!QStandardPaths::findExecutable("python3").isEmpty(), "python3 (the fake ssh) not installed");
    QTemporaryDir dir;
    QVERIFY(dir.isValid());
    DaemonProcess d(dir.path() + "/a");
    QVERIFY2(d.Start(), d.Log().right(2000).constData());

    // The way dst-gui does it: the remembered template, the forward's log rows.
    SshForward::SaveTemplate(FakeTemplate());
    const QString spec = "tester@fakehost:" + d.control_socket();
    QObject owner;
    LogModel log;
    SshForward* f = nullptr;
    QString local = dst::gui::HostSocket(spec, &owner, &log, &f);
    QVERIFY(f != nullptr);
    QCOMPARE(local, f->localSocket());
    QVERIFY(local != d.control_socket());
    QVERIFY(LogHas(log, "ssh forward: " + f->commandLine()));
    QVERIFY(f->commandLine().contains("-L " + local + ":" + d.control_socket() + " tester@fakehost"));
    f->setBackoff(50, 400);

    HostSession session(spec, local);
    session.setBackoff(50, 400);
    DeviceTreeModel tree;
    tree.attach(&session);
    session.start();
    QTRY_COMPARE_WITH_TIMEOUT(f->state(), SshForward::State::kUp, 10000);
    QTRY_VERIFY_WITH_TIMEOUT(session.state() == HostSession::State::kOnline, 10000);
    QVERIFY(LogHas(log, "ssh forward up"));
    QCOMPARE(tree.index(0, 0).data().toString(), spec);  // shown by its spec, not the local socket
    QByteArray out, err;
    QCOMPARE(d.Ctl({"export", "add", "fx", dir.path() + "/fx.img", "--size", "1M"}, &out, &err), 0);
    QTRY_VERIFY_WITH_TIMEOUT(HasExport(tree, "fx"), 5000);

    // The forward dies: the host goes offline, the supervisor restarts the forward, and the
    // session comes back through it by itself.
    QSignalSpy states(f, &SshForward::stateChanged);
    const qint64 pid = f->processId();
    QVERIFY(pid > 0);
    const int reconnects = session.reconnects();
    QCOMPARE(::kill(pid_t(pid), SIGKILL), 0);
    QTRY_VERIFY_WITH_TIMEOUT(!session.online(), 5000);
    QTRY_COMPARE_WITH_TIMEOUT(f->state(), SshForward::State::kUp, 10000);
    QVERIFY(f->processId() != pid);
    QCOMPARE(f->restarts(), 1);
    QVERIFY(states.size() >= 3);  // restarting, starting, up
    QCOMPARE(states[0][0].value<SshForward::State>(), SshForward::State::kRestarting);
    QVERIFY(LogHas(log, "ssh forward down"));
    QTRY_VERIFY_WITH_TIMEOUT(session.state() == HostSession::State::kOnline, 10000);
    QVERIFY(session.reconnects() > reconnects);
    QVERIFY(HasExport(tree, "fx"));
    QCOMPARE(d.Ctl({"export", "add", "fy", dir.path() + "/fy.img", "--size", "1M"}, &out, &err), 0);
    QTRY_VERIFY_WITH_TIMEOUT(HasExport(tree, "fy"), 5000);

    // dstd itself goes away behind a live forward: offline, forward still up; back when it is.
    d.Kill9();
    QTRY_VERIFY_WITH_TIMEOUT(!session.online(), 5000);
    QCOMPARE(f->state(), SshForward::State::kUp);
    QVERIFY2(d.Start(), d.Log().right(2000).constData());
    QTRY_VERIFY_WITH_TIMEOUT(session.state() == HostSession::State::kOnline, 10000);
  }

  // dst-gui itself: --host user@host with --ssh-command runs the forward against the real dstd,
  // and killing the GUI (no destructor runs) takes its forward with it.
  void dstGuiForwardsAndDiesWithIt() {
    DST_REQUIRE(std::filesystem::exists(BinPath("dstd")) && std::filesystem::exists(BinPath("dst-gui")),
                "dstd and dst-gui not built");
    DST_REQUIRE(!QStandardPaths::findExecutable("python3").isEmpty(), "python3 (the fake ssh) not installed");
    QTemporaryDir dir;
    QVERIFY(dir.isValid());
    DaemonProcess d(dir.path() + "/a");
    QVERIFY2(d.Start(), d.Log().right(2000).constData());
    QProcess gui;
    QProcessEnvironment env = QProcessEnvironment::systemEnvironment();
    env.insert("XDG_CONFIG_HOME", dir.path() + "/config");
    env.insert("QT_QPA_PLATFORM", "offscreen");
    env.remove("XDG_RUNTIME_DIR");  // the private directory goes under TMPDIR, removed with `dir`
    env.insert("TMPDIR", dir.path());
    gui.setProcessEnvironment(env);
    gui.setProcessChannelMode(QProcess::ForwardedErrorChannel);
    gui.start(QString::fromStdString(BinPath("dst-gui")),
              {"--host", "tester@fakehost:" + d.control_socket(), "--ssh-command", FakeTemplate()});
    QVERIFY(gui.waitForStarted(5000));
    QList<pid_t> kids;
    auto reap = qScopeGuard([&] {  // a failed check leaves no forward behind
      for (pid_t k : kids)
        if (Alive(k)) ::kill(k, SIGKILL);
    });
    QTRY_VERIFY_WITH_TIMEOUT((kids = ChildrenOf(gui.processId())).size() == 1, 10000);
    // The child is visible from fork on, but until its exec its cmdline is still dst-gui's own
    // (which holds "tester@fakehost:<socket>", not the ssh target): wait for the exec.
    QList<QByteArray> argv;
    auto read_argv = [&] {
      QFile cmdline(QString("/proc/%1/cmdline").arg(kids[0]));
      argv = cmdline.open(QIODevice::ReadOnly) ? cmdline.readAll().split('\0') : QList<QByteArray>{};
      return argv;
    };
    QTRY_VERIFY2_WITH_TIMEOUT(read_argv().contains("tester@fakehost"), argv.join(' ').constData(), 10000);
    QByteArray forward;
    for (qsizetype i = 0; i + 1 < argv.size(); ++i)
      if (argv[i] == "-L") forward = argv[i + 1];
    QVERIFY2(forward.endsWith(":" + QFile::encodeName(d.control_socket())), forward.constData());
    QVERIFY2(forward.startsWith(QFile::encodeName(dir.path() + "/dst-gui-")), forward.constData());
    QSettings saved(dir.path() + "/config/dst/dst-gui.conf", QSettings::IniFormat);
    QCOMPARE(saved.value("ssh/command").toString(), FakeTemplate());
    ::kill(pid_t(gui.processId()), SIGKILL);
    QVERIFY(gui.waitForFinished(5000));
    QTRY_VERIFY_WITH_TIMEOUT(!Alive(kids[0]), 5000);
  }

  void failingCommandShowsError() {
    DST_REQUIRE(!QStandardPaths::findExecutable("python3").isEmpty(), "python3 (the fake ssh) not installed");
    // The fake ssh fails like ssh does for a host it cannot resolve (stderr line, status 255).
    SshForward f("tester@nowhere.invalid", FakeTemplate());
    f.setBackoff(50, 200);
    QSignalSpy errors(&f, &SshForward::errorChanged);
    HostSession session("tester@nowhere.invalid", f.localSocket());
    session.setBackoff(50, 200);
    f.start();
    session.start();
    QTRY_VERIFY_WITH_TIMEOUT(f.restarts() >= 2, 10000);  // supervised: tried again
    QCOMPARE(f.lastError(),
             QStringLiteral("ssh: Could not resolve hostname nowhere.invalid: Name or service not known"));
    QVERIFY(!errors.isEmpty());
    QVERIFY(f.state() != SshForward::State::kUp);
    QVERIFY(!session.online());

    // A command that cannot be started at all says why.
    SshForward g("tester@fakehost", "/nonexistent/dst-ssh -L {local}:{remote} {target}");
    g.setBackoff(50, 200);
    g.start();
    QTRY_VERIFY_WITH_TIMEOUT(g.restarts() >= 2, 10000);
    QVERIFY2(g.lastError().startsWith("/nonexistent/dst-ssh: "), qPrintable(g.lastError()));
    QVERIFY(g.state() != SshForward::State::kUp);

    // A command that exits at once without a word: its exit status is the error.
    SshForward h("tester@fakehost", "false {local} {remote} {target}");
    h.setBackoff(50, 200);
    h.start();
    QTRY_VERIFY_WITH_TIMEOUT(h.restarts() >= 1, 10000);
    QCOMPARE(h.lastError(), QStringLiteral("false exited with status 1"));
  }
};

DST_TEST_MAIN(SshForwardTest)
#include "ssh_forward_test.moc"
