#include "daemon_process.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <QDir>
#include <QElapsedTimer>
#include <QFileInfo>
#include <QFile>
#include <QProcess>
#include <QThread>

#include "test_env.h"

namespace dst::test {

quint16 FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

DaemonProcess::DaemonProcess(const QString& state_dir, quint16 port)
    : state_dir_(state_dir), port_(port ? port : FreePort()) {
  do nbd_port_ = FreePort(); while (nbd_port_ == port_);
  QDir().mkpath(state_dir_);
  export_roots_ = {QFileInfo(state_dir_).absolutePath(), QDir::tempPath()};
}

DaemonProcess::~DaemonProcess() {
  if (pid_ > 0) {
    ::kill(pid_, SIGCONT);
    // Give a clean shutdown a moment (unmounts FUSE), then force.
    ::kill(pid_, SIGTERM);
    for (int i = 0; i < 100; ++i) {
      if (waitpid(pid_, nullptr, WNOHANG) == pid_) { pid_ = -1; return; }
      QThread::msleep(50);
    }
    ::kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
}

static bool ControlAnswers(const QString& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  QByteArray p = path.toLocal8Bit();
  if (p.size() >= int(sizeof a.sun_path)) { ::close(fd); return false; }
  memcpy(a.sun_path, p.constData(), p.size());
  bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  ::close(fd);
  return ok;
}

QString WithDefaultAllow(const QString& toml, const QStringList& rules) {
  if (rules.isEmpty()) return toml;
  const QString allow = "allow = [\"" + rules.join("\", \"") + "\"]";
  QStringList lines = toml.split('\n');
  for (int i = 0; i < lines.size(); ++i) {
    if (lines[i].trimmed() != "[[export]]") continue;
    bool has = false;
    for (int j = i + 1; j < lines.size() && !lines[j].trimmed().startsWith('['); ++j)
      has = has || lines[j].trimmed().startsWith("allow");
    if (!has) lines.insert(i + 1, allow);
  }
  return lines.join('\n');
}

bool DaemonProcess::Start(int timeout_ms) {
  QString roots;
  for (const auto& r : export_roots_) roots += (roots.isEmpty() ? "\"" : ", \"") + r + "\"";
  QString cfg = QString("[daemon]\nlisten = \"127.0.0.1:%1\"\nnbd_listen = \"127.0.0.1:%2\"\n")
                    .arg(port_)
                    .arg(nbd_port_) +
                (roots.isEmpty() ? QString() : "export_roots = [" + roots + "]\n") + "\n" +
                WithDefaultAllow(extra_config_, default_allow_);
  QFile f(state_dir_ + "/dstd.toml");
  if (!f.open(QIODevice::WriteOnly | QIODevice::Truncate)) return false;
  f.write(cfg.toUtf8());
  f.close();
  QFile::remove(control_socket());

  QStringList args{"--config", state_dir_ + "/dstd.toml", "--state-dir", state_dir_, "--control",
                   control_socket()};
  args += extra_args_;
  std::string bin = BinPath("dstd");
  std::vector<std::string> sargs{bin};
  for (auto& a : args) sargs.push_back(a.toStdString());
  std::string log = log_path().toStdString();
  const pid_t parent = ::getpid();
  pid_t pid = fork();
  if (pid < 0) return false;
  if (pid == 0) {
    // A test that dies without its destructors (Qt Test's watchdog aborts it) takes its daemons
    // along instead of leaving them running and mounted for hours.
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) _exit(127);
    int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) { dup2(fd, 1); dup2(fd, 2); }
    std::vector<char*> argv;
    for (auto& s : sargs) argv.push_back(const_cast<char*>(s.c_str()));
    argv.push_back(nullptr);
    execv(bin.c_str(), argv.data());
    _exit(127);
  }
  pid_ = pid;
  QElapsedTimer t;
  t.start();
  while (t.elapsed() < timeout_ms) {
    if (!Running()) return false;
    if (ControlAnswers(control_socket())) return true;
    QThread::msleep(20);
  }
  return false;
}

bool DaemonProcess::Running() {
  if (pid_ <= 0) return false;
  int st;
  if (waitpid(pid_, &st, WNOHANG) == pid_) {
    pid_ = -1;
    return false;
  }
  return true;
}

void DaemonProcess::Kill9() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

void DaemonProcess::Stop() { if (pid_ > 0) ::kill(pid_, SIGSTOP); }
void DaemonProcess::Cont() { if (pid_ > 0) ::kill(pid_, SIGCONT); }

int DaemonProcess::Terminate(int timeout_ms) {
  if (pid_ <= 0) return -1;
  ::kill(pid_, SIGCONT);
  ::kill(pid_, SIGTERM);
  QElapsedTimer t;
  t.start();
  while (t.elapsed() < timeout_ms) {
    int st;
    if (waitpid(pid_, &st, WNOHANG) == pid_) {
      pid_ = -1;
      const int rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      // A sanitizer report or a shutdown error is only in the log: show it with the failure.
      // DST_TEST_LOG_TAIL (bytes, default 6000) shows more of it, e.g. a whole leak report.
      if (rc != 0) {
        const int tail = qEnvironmentVariableIsSet("DST_TEST_LOG_TAIL") ? qEnvironmentVariableIntValue("DST_TEST_LOG_TAIL") : 6000;
        qWarning("dstd exited with %d; its log ends:\n%s", rc, Log().right(tail).constData());
      }
      return rc;
    }
    QThread::msleep(20);
  }
  return -1;
}

int DaemonProcess::Ctl(const QStringList& args, QByteArray* out, QByteArray* err) {
  QStringList a = args;
  if (a.size() >= 2 && a[0] == "export" && a[1] == "add" && !a.contains("--allow"))
    for (const auto& r : default_allow_) a << "--allow" << r;
  QProcess p;
  p.start(QString::fromStdString(BinPath("dstctl")), QStringList{"--socket", control_socket()} + a);
  if (!p.waitForFinished(60000)) {
    p.kill();
    return -1;
  }
  if (out) *out = p.readAllStandardOutput();
  if (err) *err = p.readAllStandardError();
  return p.exitStatus() == QProcess::NormalExit ? p.exitCode() : -1;
}

QByteArray DaemonProcess::Log() const {
  QFile f(log_path());
  if (!f.open(QIODevice::ReadOnly)) return {};
  return f.readAll();
}

}  // namespace dst::test
