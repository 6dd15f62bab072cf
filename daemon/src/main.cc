// dstd: the dst storage daemon.  See dstd(8).
//
// Exit status (sysexits): 0 clean shutdown after SIGTERM/SIGINT; 64 bad arguments; 69 a needed
// resource is unavailable (listen address, FUSE, control socket); 74 an export image cannot be
// opened; 75 another dstd holds the state directory or control socket; 78 bad configuration.
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <string>

#include <cerrno>
#include <chrono>

#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>
#include <systemd/sd-daemon.h>

#include "daemon.h"
#include "dst/daemon/config.h"
#include "dst/control/control_protocol.h"

namespace {

constexpr const char* kVersion = "0.1.0";

void SetupLogging(bool verbose) {
  auto logger = spdlog::stderr_logger_mt("dstd");
  // One line per event: time, level, message (journald adds its own timestamp; keep ours for
  // plain files and tests).
  logger->set_pattern("%Y-%m-%dT%H:%M:%S.%e %l %v");
  logger->set_level(verbose ? spdlog::level::debug : spdlog::level::info);
  logger->flush_on(spdlog::level::trace);
  spdlog::set_default_logger(logger);
}

}  // namespace

int main(int argc, char** argv) {
  namespace ctl = dst::control;
  // Signals are taken synchronously by the main thread (sigwait below); every thread created
  // afterwards (io, workers, FileDevice, FUSE) inherits the blocked mask.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);

  dst::daemon::DaemonOptions opts;
  std::string listen, mount;
  bool no_batching = false;

  CLI::App app{"dstd - dst network block storage daemon (exporter, volumes, FUSE mount)"};
  app.set_version_flag("--version", kVersion);
  // Not CLI::ExistingFile: a missing or unreadable config is a config error (78), not usage.
  app.add_option("-c,--config", opts.config_path, "TOML configuration file");
  app.add_option("-s,--state-dir", opts.state_dir, "State directory (pid lock)")
      ->capture_default_str();
  app.add_option("-C,--control", opts.control_path, "Control socket path")->capture_default_str();
  app.add_option("-l,--listen", listen, "Exporter address HOST:PORT (overrides [daemon] listen)");
  std::string nbd_listen;
  app.add_option("--nbd-listen", nbd_listen,
                 "NBD server address HOST:PORT, \"\" disables (overrides [daemon] nbd_listen)");
  app.add_option("-m,--mount", mount, "FUSE mount point (overrides [daemon] mountpoint)");
  app.add_flag("--no-batching", no_batching, "One frame per send call (overrides [daemon] batching)");
  app.add_flag("-v,--verbose", opts.verbose, "Debug logging");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "dstd: %s (see dstd --help)\n", e.what());
    return ctl::kExUsage;
  }

  dst::daemon::Config cfg;
  if (!opts.config_path.empty()) {
    auto r = dst::daemon::LoadConfigFile(opts.config_path);
    if (!r.ok()) {
      std::fprintf(stderr, "dstd: config error: %s\n", r.status().message().c_str());
      return ctl::kExConfig;
    }
    cfg = std::move(r.value());
  }
  if (!listen.empty()) {
    if (auto st = dst::daemon::ParseListen(listen, &cfg.listen_host, &cfg.listen_port); !st.ok()) {
      std::fprintf(stderr, "dstd: --listen: %s\n", st.message().c_str());
      return ctl::kExUsage;
    }
  }
  if (app.count("--nbd-listen") > 0) {
    cfg.nbd_listen_set = true;
    cfg.nbd_enabled = !nbd_listen.empty();
    if (cfg.nbd_enabled) {
      if (auto st = dst::daemon::ParseListen(nbd_listen, &cfg.nbd_host, &cfg.nbd_port); !st.ok()) {
        std::fprintf(stderr, "dstd: --nbd-listen: %s\n", st.message().c_str());
        return ctl::kExUsage;
      }
    }
  }
  // Again after --listen / --nbd-listen: they may name an address others can reach.
  {
    std::string key;
    if (auto st = dst::daemon::CheckListenSecurity(cfg, &key); !st.ok()) {
      std::fprintf(stderr, "dstd: [daemon] %s: %s\n", key.c_str(), st.message().c_str());
      return ctl::kExConfig;
    }
  }
  if (!mount.empty()) {
    if (mount[0] != '/') {
      std::fprintf(stderr, "dstd: --mount: \"%s\" must be an absolute path\n", mount.c_str());
      return ctl::kExUsage;
    }
    cfg.mountpoint = mount;
  }
  if (no_batching) cfg.batching = false;

  SetupLogging(opts.verbose);
  spdlog::info("dstd {} starting (config {}, state dir {})", kVersion,
               opts.config_path.empty() ? "none" : opts.config_path, opts.state_dir);

  dst::daemon::Daemon daemon(std::move(cfg), opts);
  if (int rc = daemon.Start(); rc != 0) {
    daemon.Shutdown();
    return rc;
  }

  // systemd (Type=notify): ready once the control socket answers; under WatchdogSec= a ping
  // every half period, but only while the event loop still runs a posted no-op, so a hung loop
  // gets the service restarted.  Without NOTIFY_SOCKET these calls do nothing.
  sd_notifyf(0, "READY=1\nSTATUS=serving\nMAINPID=%lu", static_cast<unsigned long>(::getpid()));
  std::uint64_t wd_usec = 0;
  const bool watchdog = sd_watchdog_enabled(0, &wd_usec) > 0 && wd_usec > 0;
  if (watchdog) spdlog::info("systemd watchdog: {} ms", wd_usec / 1000);
  for (;;) {
    int sig = 0;
    if (watchdog) {
      const std::uint64_t half = wd_usec / 2;
      timespec ts{static_cast<time_t>(half / 1000000), static_cast<long>(half % 1000000) * 1000};
      sig = sigtimedwait(&sigs, nullptr, &ts);
      if (sig < 0) {
        if (errno != EAGAIN) continue;
        if (daemon.LoopAlive(std::chrono::milliseconds(wd_usec / 4000 + 1)))
          sd_notify(0, "WATCHDOG=1");
        else
          spdlog::warn("watchdog: the event loop did not answer within {} ms; no ping", wd_usec / 4000 + 1);
        continue;
      }
    } else if (sigwait(&sigs, &sig) != 0) {
      continue;
    }
    if (sig == SIGHUP) {
      spdlog::info("SIGHUP ignored (configuration reload is not supported; use dstctl)");
      continue;
    }
    spdlog::info("received {}, draining", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    break;
  }
  sd_notify(0, "STOPPING=1\nSTATUS=draining");
  daemon.Shutdown();
  return 0;
}
