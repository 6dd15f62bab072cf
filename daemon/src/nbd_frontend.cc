#include "nbd_frontend.h"

#include <sys/stat.h>

#include <future>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace dst::daemon {

using nlohmann::json;

// ---------------------------------------------------------------------------------------------
// dst:dirty:<slot>

DirtyMapContext::DirtyMapContext(std::weak_ptr<MirrorDevice> mirror, int slot)
    : mirror_(std::move(mirror)), slot_(slot), name_(fmt::format("dst:dirty:{}", slot)) {}

Status DirtyMapContext::Query(std::uint64_t offset, std::uint64_t length, net::ExtentSink& sink) {
  std::shared_ptr<MirrorDevice> m = mirror_.lock();
  if (!m) return Status::Unavailable("the array is gone");
  // The sink only appends to the reply buffer: safe under the array's lock.
  auto add = [](void* arg, std::uint64_t run, bool dirty) {
    return static_cast<net::ExtentSink*>(arg)->Add(run, dirty ? kDirty : 0);
  };
  Status st = m->VisitOutOfSync(slot_, offset, length, add, &sink);
  if (st.IsNotFound()) {
    // The slot was removed after the export was added: nothing is out of sync on it.
    sink.Add(length, 0);
    return Status::OK();
  }
  return st;
}

std::vector<std::shared_ptr<net::MetaContextProvider>> DirtyMapContexts(
    const std::shared_ptr<MirrorDevice>& mirror) {
  std::vector<std::shared_ptr<net::MetaContextProvider>> v;
  if (!mirror) return v;
  for (const LegStatus& l : mirror->Legs())
    v.push_back(std::make_shared<DirtyMapContext>(mirror, l.slot));
  return v;
}

// ---------------------------------------------------------------------------------------------
// NbdFrontend

NbdFrontend::NbdFrontend(boost::asio::io_context& io, net::NbdServerOptions opts)
    : opts_(std::move(opts)), server_(std::make_unique<net::NbdServer>(io, opts_)) {}

NbdFrontend::~NbdFrontend() = default;

Status NbdFrontend::Start() { return server_->Start(); }

std::uint16_t NbdFrontend::port() const { return server_->port(); }

Status NbdFrontend::AddExport(const std::string& name, std::shared_ptr<BlockDevice> device,
                              bool read_only, const net::AccessList& allow, const std::string& path,
                              std::shared_ptr<MirrorDevice> mirror) {
  net::NbdExportSpec spec;
  spec.name = name;
  spec.read_only = read_only;
  spec.allow = allow;
  // LIST and INFO go to unauthenticated peers: no host paths (a device's Describe() names its
  // file or legs), only what the client already knows.
  spec.description = fmt::format("dst export {}{}", name, read_only ? " (read-only)" : "");
  if (!path.empty()) {
    struct stat st;
    if (::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
      auto map = net::FileAllocationMap::Open(path);
      if (map.ok()) spec.allocation = map.value();
      else spdlog::warn("nbd export \"{}\": no allocation map: {}", name, map.status().message());
      spec.fast_zero = net::FileSupportsFastZero(path);
    }
  }
  if (!mirror) mirror = std::dynamic_pointer_cast<MirrorDevice>(device);
  spec.contexts = DirtyMapContexts(mirror);
  std::vector<std::string> names;
  for (auto& c : spec.contexts) names.push_back(c->name());
  spec.device = std::move(device);
  net::NbdExportSpec copy = spec;
  DST_RETURN_IF_ERROR(server_->AddExport(std::move(spec)));
  {
    std::lock_guard<std::mutex> l(mu_);
    specs_[name] = std::move(copy);
    removed_.erase(name);
  }
  spdlog::info("nbd export \"{}\" on port {}{}", name, port(),
               names.empty() ? std::string() : fmt::format(" (contexts {})", fmt::join(names, ", ")));
  return Status::OK();
}

Status NbdFrontend::RemoveExport(const std::string& name) {
  Status st = server_->RemoveExport(name);
  if (st.ok() || st.IsNotFound()) {
    std::lock_guard<std::mutex> l(mu_);
    auto it = specs_.find(name);
    if (it != specs_.end()) {
      removed_[name] = std::move(it->second);
      specs_.erase(it);
    }
  }
  if (st.code() == Status::Code::kBusy)
    st = Status::Busy(fmt::format("export \"{}\" has connected NBD clients", name));
  return st;
}

Status NbdFrontend::Restore(const std::string& name) {
  net::NbdExportSpec spec;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = removed_.find(name);
    if (it == removed_.end()) return Status::NotFound("nothing to restore");
    spec = std::move(it->second);
    removed_.erase(it);
  }
  net::NbdExportSpec copy = spec;
  DST_RETURN_IF_ERROR(server_->AddExport(std::move(spec)));
  std::lock_guard<std::mutex> l(mu_);
  specs_[name] = std::move(copy);
  return Status::OK();
}

Status NbdFrontend::SetAccess(const std::string& name, const net::AccessList& allow) {
  DST_RETURN_IF_ERROR(server_->SetAccess(name, allow));
  std::lock_guard<std::mutex> l(mu_);
  if (auto it = specs_.find(name); it != specs_.end()) it->second.allow = allow;
  return Status::OK();
}

void NbdFrontend::Forget(const std::string& name) {
  net::NbdExportSpec drop;  // released outside the lock
  std::lock_guard<std::mutex> l(mu_);
  auto it = removed_.find(name);
  if (it == removed_.end()) return;
  drop = std::move(it->second);
  removed_.erase(it);
}

Status NbdFrontend::Drain(std::chrono::milliseconds timeout) {
  auto done = std::make_shared<std::promise<Status>>();
  auto fut = done->get_future();
  server_->Drain([done](Status st) { done->set_value(st); });
  if (fut.wait_for(timeout) != std::future_status::ready)
    return Status::TimedOut(fmt::format("NBD drain did not finish within {} ms", timeout.count()));
  return fut.get();
}

json NbdFrontend::StatusJson() const {
  net::NbdServerStats s = server_->Stats();
  return json{{"enabled", true},
              {"address", opts_.listen_address},
              {"port", port()},
              {"listen", fmt::format("{}:{}", opts_.listen_address, port())},
              {"connections", s.connections_open},
              {"connections_total", s.connections_total},
              {"requests", s.requests},
              {"errors_replied", s.errors_replied},
              {"protocol_errors", s.protocol_errors},
              {"connections_refused", s.connections_refused},
              {"connections_timed_out", s.connections_timed_out},
              {"tls", !opts_.tls                               ? "off"
                      : opts_.tls_mode == net::NbdTls::kRequire ? "require"
                      : opts_.tls_mode == net::NbdTls::kAllow   ? "allow"
                                                                : "off"},
              {"tls_handshakes", s.tls_handshakes},
              {"frames_sent", s.frames_sent},
              {"send_calls", s.send_calls},
              {"frames_per_call", s.frames_per_call}};
}

json NbdFrontend::ExportJson(const std::string& name) const {
  for (const auto& e : server_->ListExports()) {
    if (e.name != name) continue;
    json ctx = json::array({"base:allocation"});
    {
      std::lock_guard<std::mutex> l(mu_);
      auto it = specs_.find(name);
      if (it != specs_.end())
        for (auto& c : it->second.contexts) ctx.push_back(c->name());
    }
    return json{{"connections", e.connections}, {"contexts", ctx}};
  }
  return nullptr;
}

}  // namespace dst::daemon
