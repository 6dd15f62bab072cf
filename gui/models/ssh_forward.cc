#include "ssh_forward.h"

#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstring>

#include <QDir>
#include <QFile>
#include <QSettings>
#include <QStandardPaths>

#include "log_model.h"

namespace dst::gui {

namespace {

constexpr int kProbeMaxMs = 1000;

// One non-blocking connect(): a unix socket answers at once (accepted, refused or absent).
bool Accepts(const QString& path) {
  QByteArray p = QFile::encodeName(path);
  sockaddr_un a{};
  if (p.isEmpty() || std::size_t(p.size()) >= sizeof(a.sun_path)) return false;
  a.sun_family = AF_UNIX;
  std::memcpy(a.sun_path, p.constData(), std::size_t(p.size()));
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  int rc = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  bool ok = rc == 0 || errno == EAGAIN || errno == EINPROGRESS;  // EAGAIN: backlog full, but alive
  ::close(fd);
  return ok;
}

QString ShellQuote(const QString& w) {
  static const QString kSafe = "@%+=:,./-_";
  bool safe = !w.isEmpty() && std::all_of(w.begin(), w.end(), [](QChar c) {
    return c.isLetterOrNumber() || kSafe.contains(c);
  });
  if (safe) return w;
  QString q = w;
  q.replace("'", "'\\''");
  return "'" + q + "'";
}

// Words split like a POSIX shell does for plain arguments: '...' literal, "..." with \" and \\,
// a backslash outside quotes escapes the next character (QProcess::splitCommand knows no '...').
QStringList SplitWords(const QString& line) {
  QStringList words;
  QString w;
  bool in_word = false;
  QChar quote;
  for (qsizetype i = 0; i < line.size(); ++i) {
    QChar c = line[i];
    if (quote == '\'') {
      if (c == '\'') quote = QChar();
      else w += c;
    } else if (quote == '"') {
      if (c == '"') quote = QChar();
      else if (c == '\\' && i + 1 < line.size() && (line[i + 1] == '"' || line[i + 1] == '\\')) w += line[++i];
      else w += c;
    } else if (c.isSpace()) {
      if (in_word) words << w;
      w.clear();
      in_word = false;
    } else {
      in_word = true;
      if (c == '\'' || c == '"') quote = c;
      else if (c == '\\' && i + 1 < line.size()) w += line[++i];
      else w += c;
    }
  }
  if (in_word) words << w;
  return words;
}

// $XDG_RUNTIME_DIR (a per-user 0700 directory), else the temp directory.
QString RuntimeBase() {
  if (qEnvironmentVariableIsEmpty("XDG_RUNTIME_DIR")) return QDir::tempPath();
  return QStandardPaths::writableLocation(QStandardPaths::RuntimeLocation);
}

}  // namespace

bool SshForward::IsRemote(const QString& spec) {
  if (spec.startsWith('/') || spec.startsWith('.')) return false;
  int at = spec.indexOf('@');
  int slash = spec.indexOf('/');
  return at > 0 && (slash < 0 || at < slash);
}

QString SshForward::SavedTemplate() {
  QSettings s("dst", "dst-gui");
  QString t = s.value("ssh/command").toString();
  return t.trimmed().isEmpty() ? QString(kDefaultTemplate) : t;
}

void SshForward::SaveTemplate(const QString& command_template) {
  QSettings s("dst", "dst-gui");
  s.setValue("ssh/command", command_template);
}

QStringList SshForward::BuildCommand(const QString& command_template, const QString& local,
                                     const QString& remote, const QString& target) {
  QStringList words = SplitWords(command_template);
  for (QString& w : words) {
    w.replace("{local}", local);
    w.replace("{remote}", remote);
    w.replace("{target}", target);
  }
  return words;
}

SshForward::SshForward(const QString& spec, const QString& command_template, QObject* parent)
    : QObject(parent), spec_(spec), dir_(RuntimeBase() + "/dst-gui-XXXXXX") {
  // user@host[:remote-socket]; the remote path is everything after the first ':' past the '@'.
  int colon = spec.indexOf(':', std::max<qsizetype>(0, spec.indexOf('@')));
  target_ = colon < 0 ? spec : spec.left(colon);
  remote_ = colon < 0 ? QString(kDefaultRemoteSocket) : spec.mid(colon + 1);
  if (remote_.isEmpty()) remote_ = kDefaultRemoteSocket;
  if (dir_.isValid()) {
    QFile::setPermissions(dir_.path(), QFile::ReadOwner | QFile::WriteOwner | QFile::ExeOwner);
    local_ = dir_.path() + "/dstd.sock";
  } else {
    setError("cannot create a private directory in " + RuntimeBase() + ": " + dir_.errorString());
  }
  command_ = BuildCommand(command_template, local_, remote_, target_);

  // A GUI that crashes or is killed must not leave its forwards running.
  proc_.setChildProcessModifier([] { ::prctl(PR_SET_PDEATHSIG, SIGTERM); });
  probe_timer_.setSingleShot(true);
  restart_timer_.setSingleShot(true);
  connect(&probe_timer_, &QTimer::timeout, this, &SshForward::probe);
  connect(&restart_timer_, &QTimer::timeout, this, &SshForward::launch);
  connect(&proc_, &QProcess::finished, this, &SshForward::exited);
  connect(&proc_, &QProcess::errorOccurred, this, [this](QProcess::ProcessError e) {
    if (e != QProcess::FailedToStart) return;  // the others end in finished()
    setError(command_.value(0) + ": " + proc_.errorString());
    exited();
  });
  connect(&proc_, &QProcess::readyReadStandardError, this, [this] {
    stderr_tail_ += proc_.readAllStandardError();
    QList<QByteArray> lines = stderr_tail_.split('\n');
    stderr_tail_ = lines.takeLast();  // an unfinished line waits for the rest
    for (auto it = lines.crbegin(); it != lines.crend(); ++it)
      if (!it->trimmed().isEmpty()) {
        setError(QString::fromLocal8Bit(it->trimmed()));
        break;
      }
  });
}

SshForward::~SshForward() {
  proc_.disconnect(this);
  if (proc_.state() != QProcess::NotRunning) {
    proc_.kill();
    proc_.waitForFinished(2000);
  }
}

void SshForward::setBackoff(int min_ms, int max_ms) {
  backoff_min_ms_ = backoff_ms_ = std::max(1, min_ms);
  backoff_max_ms_ = std::max(backoff_min_ms_, max_ms);
}

QString SshForward::commandLine() const {
  QStringList q;
  for (const QString& w : command_) q << ShellQuote(w);
  return q.join(' ');
}

void SshForward::start() {
  if (state_ != State::kStopped) return;
  launch();
}

void SshForward::launch() {
  if (local_.isEmpty() || command_.isEmpty()) {
    if (command_.isEmpty()) setError("empty ssh command template");
    setState(State::kRestarting);  // nothing to run; stays down
    return;
  }
  QFile::remove(local_);  // a stale socket would make the forward fail to bind
  stderr_tail_.clear();
  setState(State::kStarting);
  probe_ms_ = 20;
  proc_.setProgram(command_.first());
  proc_.setArguments(command_.mid(1));
  proc_.setStandardInputFile(QProcess::nullDevice());
  proc_.setStandardOutputFile(QProcess::nullDevice());
  proc_.start();
  probe_timer_.start(probe_ms_);
}

void SshForward::probe() {
  if (state_ != State::kStarting || proc_.state() == QProcess::NotRunning) return;
  if (Accepts(local_)) {
    backoff_ms_ = backoff_min_ms_;
    setError(QString());
    setState(State::kUp);
    return;
  }
  probe_ms_ = std::min(probe_ms_ * 2, kProbeMaxMs);
  probe_timer_.start(probe_ms_);
}

void SshForward::exited() {
  if (state_ == State::kRestarting) return;  // FailedToStart and finished() both reported
  probe_timer_.stop();
  if (!stderr_tail_.trimmed().isEmpty()) setError(QString::fromLocal8Bit(stderr_tail_.trimmed()));
  if (last_error_.isEmpty() && proc_.exitStatus() == QProcess::NormalExit)
    setError(QString("%1 exited with status %2").arg(command_.value(0)).arg(proc_.exitCode()));
  else if (last_error_.isEmpty())
    setError(command_.value(0) + " was killed");
  QFile::remove(local_);
  setState(State::kRestarting);
  ++restarts_;
  restart_timer_.start(backoff_ms_);
  backoff_ms_ = std::min(backoff_ms_ * 2, backoff_max_ms_);
}

void SshForward::setState(State s) {
  if (s == state_) return;
  state_ = s;
  emit stateChanged(s);
}

void SshForward::setError(const QString& e) {
  if (e == last_error_) return;
  last_error_ = e;
  emit errorChanged(e);
}

QString HostSocket(const QString& spec, QObject* owner, LogModel* log, SshForward** forward) {
  if (forward) *forward = nullptr;
  if (!SshForward::IsRemote(spec)) return spec;
  auto* f = new SshForward(spec, SshForward::SavedTemplate(), owner);
  if (log) {
    log->append(LogModel::kInfo, spec, "ssh forward: " + f->commandLine());
    QObject::connect(f, &SshForward::stateChanged, log, [f, log](SshForward::State st) {
      if (st == SshForward::State::kUp)
        log->append(LogModel::kInfo, f->spec(), "ssh forward up");
      else if (st == SshForward::State::kRestarting)
        log->append(LogModel::kWarning, f->spec(), "ssh forward down: " + f->lastError());
    });
  }
  f->start();
  if (forward) *forward = f;
  return f->localSocket();
}

}  // namespace dst::gui
