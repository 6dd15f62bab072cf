// DaemonProcess: runs a real `dstd` for integration tests and guarantees cleanup (RAII: the
// destructor SIGKILLs a process still running and removes nothing the test did not create).
//
//   TempDir dir;                                   // QTemporaryDir
//   DaemonProcess d(dir.path() + "/a");            // state dir, control socket inside it
//   d.config() = "[[export]]\nname = \"disk\"\n..."; // TOML appended after [daemon]
//   QVERIFY(d.Start());                            // waits until the control socket answers
//   d.Kill9(); d.Stop(); d.Cont(); d.Terminate();  // faults and shutdown
#pragma once

#include <sys/types.h>

#include <QByteArray>
#include <QString>
#include <QStringList>

namespace dst::test {

// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
quint16 FreePort();

// `toml` with `allow = [rules]` added to every [[export]] table that has no allow key.
QString WithDefaultAllow(const QString& toml, const QStringList& rules);

class DaemonProcess {
 public:
  explicit DaemonProcess(const QString& state_dir, quint16 port = 0);
  ~DaemonProcess();

  // Extra TOML appended to the generated config (exports, volumes...).
  QString& config() { return extra_config_; }
  QStringList& extra_args() { return extra_args_; }
  // [daemon] export_roots written into the config: by default the state directory's parent
  // (the test's temporary directory) and the system temp directory, so tests may name their
  // images in control requests.  Empty: the key is left out (dstd's default, the state dir).
  QStringList& export_roots() { return export_roots_; }
  // Exports are default deny (docs/security.md): every [[export]] in config() without an allow
  // key, and every `Ctl({"export", "add", ...})` without --allow, gets these rules, so tests that
  // are not about access control can connect.  By default plaintext loopback peers (anonymous)
  // and any TLS identity, read-write.  Clear it to test the daemon's own default.
  QStringList& default_allow() { return default_allow_; }
  quint16 port() const { return port_; }
  // dstd's NBD server port ([daemon] nbd_listen, a free port chosen like port()).
  quint16 nbd_port() const { return nbd_port_; }
  QString control_socket() const { return state_dir_ + "/dstd.sock"; }
  QString state_dir() const { return state_dir_; }
  QString log_path() const { return state_dir_ + "/dstd.log"; }
  pid_t pid() const { return pid_; }

  bool Start(int timeout_ms = 10000);  // (re)starts with the same config and port
  bool Running();
  void Kill9();                         // SIGKILL and reap
  void Stop();                          // SIGSTOP
  void Cont();                          // SIGCONT
  int Terminate(int timeout_ms = 30000);  // SIGTERM, wait; returns the exit status or -1

  // Runs `dstctl --socket <control socket> args...`; returns exit code, fills stdout.
  int Ctl(const QStringList& args, QByteArray* out = nullptr, QByteArray* err = nullptr);
  QByteArray Log() const;

 private:
  QString state_dir_;
  quint16 port_;
  quint16 nbd_port_ = 0;
  QString extra_config_;
  QStringList extra_args_;
  QStringList export_roots_;
  QStringList default_allow_{"anonymous:rw", "*:rw"};
  pid_t pid_ = -1;
};

}  // namespace dst::test
