// SshForward: reaches another host's control socket through `ssh -L` (issue 12, "Hosts").  For
// a `user@host[:remote-socket]` spec it runs the command built from a template (shown in the
// GUI, configurable with --ssh-command, remembered in QSettings), forwarding a local socket in
// a private 0700 directory to the remote one, and supervises it:
//
//   STOPPED --start()--> STARTING --local socket accepts--> UP
//                           ^  |                             |
//                           |  +------ process exits --------+
//                           |  v
//                        RESTARTING (backoff min..max, doubling; reset once UP)
//
// Readiness is probed with a non-blocking connect() on a QTimer with backoff, so the UI thread
// never waits.  A HostSession on localSocket() shows the host offline while the forward is down
// and reconnects by itself when it is back (its own backoff).
#pragma once

#include <QObject>
#include <QProcess>
#include <QString>
#include <QStringList>
#include <QTemporaryDir>
#include <QTimer>

namespace dst::gui {

class SshForward : public QObject {
  Q_OBJECT
 public:
  enum class State { kStopped, kStarting, kUp, kRestarting };
  Q_ENUM(State)

  // {local}, {remote} and {target} are substituted in each word (split like a shell would).
  static constexpr const char* kDefaultTemplate =
      "ssh -N -o ExitOnForwardFailure=yes -o ServerAliveInterval=5 -L {local}:{remote} {target}";
  static constexpr const char* kDefaultRemoteSocket = "/run/dst/dstd.sock";

  // True for `user@host[:path]`; a control-socket path (absolute or relative) is not remote.
  static bool IsRemote(const QString& spec);
  // The template stored in QSettings (dst/dst-gui, ssh/command), else kDefaultTemplate.
  static QString SavedTemplate();
  static void SaveTemplate(const QString& command_template);
  // The words of `command_template` with the placeholders filled in.
  static QStringList BuildCommand(const QString& command_template, const QString& local,
                                  const QString& remote, const QString& target);

  SshForward(const QString& spec, const QString& command_template, QObject* parent = nullptr);
  ~SshForward() override;

  void start();
  void setBackoff(int min_ms, int max_ms);

  QString spec() const { return spec_; }
  QString target() const { return target_; }
  QString remoteSocket() const { return remote_; }
  // Where HostSession connects; empty if the private directory could not be made.
  QString localSocket() const { return local_; }
  QStringList command() const { return command_; }
  // The command as one shell-quoted line, for display.
  QString commandLine() const;
  State state() const { return state_; }
  // The last non-empty stderr line of the command, or why it did not start.
  QString lastError() const { return last_error_; }
  int restarts() const { return restarts_; }
  qint64 processId() const { return proc_.processId(); }

 signals:
  void stateChanged(dst::gui::SshForward::State state);
  void errorChanged(const QString& error);

 private:
  void launch();
  void probe();
  void exited();
  void setState(State s);
  void setError(const QString& e);

  QString spec_, target_, remote_, local_;
  QStringList command_;
  QTemporaryDir dir_;
  QProcess proc_;
  QTimer probe_timer_, restart_timer_;
  State state_ = State::kStopped;
  QString last_error_;
  QByteArray stderr_tail_;
  int probe_ms_ = 20;
  int backoff_min_ms_ = 500, backoff_max_ms_ = 10000, backoff_ms_ = 500;
  int restarts_ = 0;
};

class LogModel;

// The socket a HostSession should use for a --host spec: the path itself, or for `user@host`
// the local end of an SshForward (child of `owner`, started, template from SavedTemplate()).
// With `log`, the forward's command and every up / down (with its error) go to the log pane.
QString HostSocket(const QString& spec, QObject* owner, LogModel* log = nullptr,
                   SshForward** forward = nullptr);

}  // namespace dst::gui
