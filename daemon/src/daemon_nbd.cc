// Daemon's NBD glue (declared in daemon.h): keeps daemon.cc's edits to one-line calls, and
// nbd_frontend.cc free of Daemon so tests can link it on its own.
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "daemon.h"
#include "nbd_frontend.h"

namespace dst::daemon {

using nlohmann::json;

net::ServerLimits ServerLimitsOf(const LimitsConfig& l, bool nbd) {
  net::ServerLimits s;
  s.handshake_timeout = std::chrono::seconds(l.handshake_timeout_s);
  s.idle_timeout = std::chrono::seconds(nbd ? l.nbd_idle_timeout_s : l.idle_timeout_s);
  s.max_connections = l.max_connections;
  s.max_connections_per_address = l.max_connections_per_address;
  s.max_connections_per_identity = l.max_connections_per_identity;
  s.min_drain_rate = l.min_drain_rate;
  s.drain_window = std::chrono::seconds(l.drain_window_s);
  return s;
}

Status Daemon::UseNbdTls(const std::string& uri, net::NbdClientOptions* no) {
  if (!no->tls) return Status::OK();
  if (!tls_client_)
    return Status::InvalidArgument(
        fmt::format("{}: nbds:// needs TLS keys ([daemon] tls_psk_file, or tls_cert/tls_key/tls_ca)", uri));
  no->tls_context = tls_client_;
  return Status::OK();
}

int Daemon::StartNbd() {
  if (!cfg_.nbd_enabled) {
    spdlog::info("NBD server disabled (nbd_listen = \"\")");
    return 0;
  }
  net::NbdServerOptions no;
  no.listen_address = cfg_.nbd_host;
  no.port = cfg_.nbd_port;
  no.batching = cfg_.batching;
  no.stall_timeout = std::chrono::seconds(cfg_.limits.stall_timeout_s);
  no.limits = ServerLimitsOf(cfg_.limits, true);
  no.max_option_length = cfg_.limits.nbd_max_option_length;
  no.max_options = cfg_.limits.nbd_max_options;
  no.max_meta_queries = cfg_.limits.nbd_max_meta_queries;
  no.max_meta_query_length = cfg_.limits.nbd_max_meta_query_length;
  // STARTTLS with the DST listener's context (the same PSK file or certificates).
  const std::string tls_mode = cfg_.nbd_tls_mode();
  if (tls_mode != "off" && tls_server_) {
    no.tls = tls_server_;
    no.tls_mode = tls_mode == "allow" ? net::NbdTls::kAllow : net::NbdTls::kRequire;
  }
  auto fe = std::make_unique<NbdFrontend>(io_, no);
  if (Status st = fe->Start(); !st.ok()) {
    std::string m = st.message().empty() ? std::string(Status::CodeName(st.code())) : st.message();
    if (m.find(cfg_.nbd_host) == std::string::npos)
      m = fmt::format("cannot listen on {}:{}: {}", cfg_.nbd_host, cfg_.nbd_port, m);
    if (!cfg_.nbd_listen_set) {
      // Default address: another NBD server (or dstd) may own 10809; DST service goes on.
      spdlog::warn("NBD server not started: {} (set [daemon] nbd_listen)", m);
      return 0;
    }
    spdlog::error("NBD server: {}", m);
    return control::kExUnavailable;
  }
  spdlog::info("NBD server listening on {}:{} ({})", cfg_.nbd_host, fe->port(),
               !no.tls ? "no TLS" : tls_mode == "allow" ? "STARTTLS allowed" : "STARTTLS required");
  if (!IsLoopbackHost(cfg_.nbd_host) && tls_mode != "require")
    spdlog::warn("insecure = true: NBD on {}:{} serves clients without TLS", cfg_.nbd_host, fe->port());
  std::lock_guard<std::mutex> l(mu_);
  nbd_ = std::move(fe);
  return 0;
}

void Daemon::NbdExportAdded(const ExportConfig& e, const std::shared_ptr<BlockDevice>& dev,
                            const std::shared_ptr<BlockDevice>& served, const std::string& path) {
  if (!nbd_ || !dev) return;
  std::shared_ptr<MirrorDevice> mirror;
  if (!e.array.empty())
    if (auto a = FindArray(e.array)) mirror = a->mirror;
  if (!mirror) mirror = std::dynamic_pointer_cast<MirrorDevice>(dev);
  Status st = nbd_->AddExport(e.name, served, e.read_only, e.allow, path, mirror);
  if (!st.ok() && st.code() != Status::Code::kExists)
    spdlog::warn("export \"{}\": not served over NBD: {}", e.name, st.message());
}

Status Daemon::NbdExportRemove(const std::string& name) {
  if (!nbd_) return Status::OK();
  Status st = nbd_->RemoveExport(name);
  return st.IsNotFound() ? Status::OK() : st;
}

void Daemon::NbdExportRemoveDone(const std::string& name, bool removed) {
  if (!nbd_) return;
  if (removed) {
    nbd_->Forget(name);
  } else if (Status st = nbd_->Restore(name); !st.ok() && !st.IsNotFound()) {
    spdlog::warn("export \"{}\": NBD export not restored: {}", name, st.message());
  }
}

void Daemon::StopNbd() {
  if (!nbd_) return;
  if (Status st = nbd_->Drain(std::chrono::seconds(60)); !st.ok())
    spdlog::warn("NBD drain: {}", st.message());
  else
    spdlog::info("NBD server drained");
  std::lock_guard<std::mutex> l(mu_);
  nbd_.reset();  // io threads still run: the server's shutdown handlers complete
}

nlohmann::json Daemon::NbdJson() {
  if (!nbd_) {
    return json{{"enabled", false}, {"listen", nullptr}, {"address", nullptr}, {"port", 0},
                {"connections", 0}};
  }
  return nbd_->StatusJson();
}

}  // namespace dst::daemon
