#include "daemon.h"
#include "metrics.h"
#include "loop_devices.h"

#include <algorithm>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <filesystem>
#include <future>
#include <sstream>

#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "dst/file_device.h"
#include "dst/net/tls.h"
#include "dst/net/uri.h"

#if defined(__SANITIZE_ADDRESS__)
#define DST_ASAN_BUILD 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DST_ASAN_BUILD 1
#endif
#endif
#ifndef DST_ASAN_BUILD
#define DST_ASAN_BUILD 0
#endif

namespace dst::daemon {

namespace asio = boost::asio;
using nlohmann::json;
namespace ctl = dst::control;

// ---------------------------------------------------------------------------------------------
// WorkQueue

WorkQueue::WorkQueue(int threads) {
  for (int i = 0; i < threads; ++i) {
    threads_.emplace_back([this] {
      for (;;) {
        std::function<void()> fn;
        {
          std::unique_lock<std::mutex> l(mu_);
          cv_.wait(l, [this] { return stop_ || !q_.empty(); });
          if (q_.empty()) return;
          fn = std::move(q_.front());
          q_.pop_front();
        }
        fn();
      }
    });
  }
}

WorkQueue::~WorkQueue() { Stop(); }

void WorkQueue::Post(std::function<void()> fn) {
  std::lock_guard<std::mutex> l(mu_);
  if (stop_) return;  // shutting down: the caller's reply is dropped with its connection
  q_.push_back(std::move(fn));
  cv_.notify_one();
}

void WorkQueue::Stop() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_)
    if (t.joinable()) t.join();
  threads_.clear();
}

// ---------------------------------------------------------------------------------------------
// Helpers

namespace {

const char* ErrorCode(const Status& s) {
  switch (s.code()) {
    case Status::Code::kOk: return ctl::kInternal;
    case Status::Code::kInvalidArgument: return ctl::kInvalidParams;
    case Status::Code::kOutOfRange: return ctl::kInvalidParams;
    case Status::Code::kNotFound: return ctl::kNotFound;
    case Status::Code::kExists: return ctl::kExists;
    case Status::Code::kReadOnly: return ctl::kReadOnly;
    case Status::Code::kNotSupported: return ctl::kNotSupported;
    case Status::Code::kTimedOut: return ctl::kTimedOut;
    case Status::Code::kUnavailable: return ctl::kUnavailable;
    case Status::Code::kBusy: return ctl::kBusy;
    case Status::Code::kIoError:
    case Status::Code::kProtocolError:
    case Status::Code::kNoSpace: return ctl::kIoError;
  }
  return ctl::kInternal;
}

std::string Message(const Status& s) {
  return s.message().empty() ? std::string(Status::CodeName(s.code())) : s.message();
}

std::string ErrorLine(const json& id, const Status& s) {
  return ctl::EncodeError(id, ErrorCode(s), Message(s));
}

std::string VolumeSource(const VolumeConfig& c) { return c.remote.empty() ? c.path : c.remote; }

// A flush that gives up after `timeout`: FlushSync would wait forever on a remote that never
// answers, and shutdown must not hang on one bad peer.  The request lives in a shared block the
// completion owns too, so a late completion after we gave up is harmless.
Status FlushWithDeadline(BlockDevice& dev, std::chrono::milliseconds timeout) {
  struct Op {
    IoRequest req;
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    Status st;
  };
  auto op = std::make_shared<Op>();
  op->req.op = IoOp::kFlush;
  op->req.ctx = new std::shared_ptr<Op>(op);
  op->req.done = [](IoRequest* r, Status st) {
    auto* holder = static_cast<std::shared_ptr<Op>*>(r->ctx);
    std::shared_ptr<Op> o = *holder;
    delete holder;
    std::lock_guard<std::mutex> l(o->mu);
    o->st = st;
    o->done = true;
    o->cv.notify_all();
  };
  dev.Submit(&op->req);
  std::unique_lock<std::mutex> l(op->mu);
  if (!op->cv.wait_for(l, timeout, [&] { return op->done; }))
    return Status::TimedOut(fmt::format("flush did not finish within {} ms", timeout.count()));
  return op->st;
}

std::chrono::milliseconds FlushTimeout(const VolumeConfig& c) {
  return std::chrono::seconds(std::min<std::uint32_t>(c.io_timeout_s, 20) + 2);
}

}  // namespace

const char* ControlErrorCode(const Status& s) { return ErrorCode(s); }

// ---------------------------------------------------------------------------------------------
// Daemon

Daemon::Daemon(Config cfg, DaemonOptions opts) : cfg_(std::move(cfg)), opts_(std::move(opts)) {}

Daemon::~Daemon() { Shutdown(); }

Status Daemon::LockStateDir() {
  std::error_code ec;
  // A state directory dstd makes is its own (images may live in it: export_roots' default).
  if (std::filesystem::create_directories(opts_.state_dir, ec) && !ec)
    ::chmod(opts_.state_dir.c_str(), 0700);
  if (ec)
    return Status::FromErrno(ec.value(), fmt::format("cannot create state directory {}",
                                                     opts_.state_dir));
  std::string path = opts_.state_dir + "/dstd.pid";
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return Status::FromErrno(errno, fmt::format("cannot open {}", path));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int err = errno;
    char buf[32] = {};
    ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
    ::close(fd);
    if (err == EWOULDBLOCK) {
      std::string pid = n > 0 ? std::string(buf, std::size_t(n)) : "?";
      while (!pid.empty() && (pid.back() == '\n' || pid.back() == ' ')) pid.pop_back();
      return Status::Busy(fmt::format(
          "state directory {} is in use by another dstd (pid {}, lock {})", opts_.state_dir, pid,
          path));
    }
    return Status::FromErrno(err, fmt::format("cannot lock {}", path));
  }
  std::string pid = fmt::format("{}\n", ::getpid());
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, pid.data(), pid.size(), 0) != ssize_t(pid.size())) {
    int err = errno;
    ::close(fd);
    return Status::FromErrno(err, fmt::format("cannot write {}", path));
  }
  lock_fd_ = fd;
  // The state database (topology, host id, dirty maps): owner only, whatever the umask.
  // SQLite gives the -wal and -shm files the database's mode; older ones are tightened too.
  const std::string db = opts_.state_dir + "/dstd.sqlite";
  DST_RETURN_IF_ERROR(EnsurePrivateFile(db, /*tighten=*/true));
  for (const char* journal : {"-wal", "-shm", "-journal"})
    if (std::string j = db + journal; ::access(j.c_str(), F_OK) == 0)
      DST_RETURN_IF_ERROR(EnsurePrivateFile(j, /*tighten=*/true));
  return Status::OK();
}

int Daemon::Start() {
  if (Status st = LockStateDir(); !st.ok()) {
    spdlog::error("{}", Message(st));
    return st.code() == Status::Code::kBusy ? ctl::kExTempFail : ctl::kExIoErr;
  }

  // Writeback through loop-on-FUSE must never wait for memory dstd itself has to page in.
  // Not under AddressSanitizer: MCL_FUTURE would lock its shadow memory page by page (seconds
  // per start, gigabytes locked), and a sanitized dstd is a test build.
#if DST_ASAN_BUILD
  if (true) {
    spdlog::warn("memory not locked: AddressSanitizer build");
  } else
#endif
  if (::mlockall(MCL_CURRENT | MCL_FUTURE) == 0) {
    memory_locked_ = true;
    spdlog::info("memory locked (mlockall)");
  } else {
    spdlog::warn("mlockall refused ({}); running with pageable memory", std::strerror(errno));
  }

  work_.emplace(io_.get_executor());
  for (std::uint32_t i = 0; i < std::max<std::uint32_t>(1, cfg_.io_threads); ++i)
    io_threads_.emplace_back([this] { io_.run(); });

  if (Status st = LoadTls(); !st.ok()) {
    spdlog::error("tls: {}", Message(st));
    return ctl::kExConfig;
  }
  net::ExporterOptions eo;
  eo.listen_address = cfg_.listen_host;
  eo.port = cfg_.listen_port;
  eo.batching = cfg_.batching;
  eo.stall_timeout = std::chrono::seconds(cfg_.limits.stall_timeout_s);
  eo.limits = ServerLimitsOf(cfg_.limits, false);
  // With TLS the exporter accepts through a TlsListener: DST only after a TLS 1.3 handshake.
  auto tls_port = std::make_shared<std::uint16_t>(0);
  auto tls_error = std::make_shared<Status>();
  if (tls_server_)
    eo.listener = net::MakeTlsListenerFactory(io_, tls_server_, cfg_.listen_host, cfg_.listen_port, tls_port, tls_error);
  // Raw Ethernet: the same exporter also accepts sessions on each eth interface.
  std::vector<std::shared_ptr<net::EthEndpoint>> eth_listen;
  for (const std::string& ifname : cfg_.eth_interfaces) {
    auto ep = EthEndpointFor(ifname);
    if (!ep.ok()) {
      spdlog::error("eth {}: {}", ifname, Message(ep.status()));
      return ep.status().code() == Status::Code::kInvalidArgument ? ctl::kExConfig : ctl::kExUnavailable;
    }
    eth_listen.push_back(ep.value());
  }
  if (!eth_listen.empty()) {
    net::ListenerFactory inner = eo.listener;
    eo.listener = [this, inner, eth_listen, tls_port, tls_error](const net::Strand& ex) -> std::unique_ptr<net::Listener> {
      std::vector<std::unique_ptr<net::Listener>> all;
      if (inner) {
        auto l = inner(ex);
        if (!l) return nullptr;
        all.push_back(std::move(l));
      } else {
        auto l = net::TcpListener::Open(io_, ex, cfg_.listen_host, cfg_.listen_port);
        if (!l.ok()) {
          *tls_error = l.status();
          return nullptr;
        }
        *tls_port = l.value()->port();
        all.push_back(std::move(l).value());
      }
      for (const auto& ep : eth_listen) all.push_back(ep->MakeListener(ex));
      return net::MakeMultiListener(std::move(all), ex);
    };
  }
  exporter_ = std::make_unique<net::Exporter>(io_, eo);
  if (Status st = exporter_->Start(); !st.ok()) {
    if (!tls_error->ok()) st = *tls_error;
    std::string m = Message(st);
    if (m.find(cfg_.listen_host) == std::string::npos)
      m = fmt::format("cannot listen on {}:{}: {}", cfg_.listen_host, cfg_.listen_port, m);
    spdlog::error("exporter: {}", m);
    return ctl::kExUnavailable;
  }
  exporter_started_ = true;
  listen_port_ = tls_server_ || !eth_listen.empty() ? *tls_port : exporter_->port();
  for (const auto& ep : eth_listen) {
    const auto st = ep->Stats();
    spdlog::info("exporter listening on eth://{}/{} (mtu {}, tx {}, rx {}, {})", st.ifname, st.mac, st.mtu,
                 st.tx_mode, st.rx_mode, st.encrypted ? "AES-256-GCM" : "insecure_segment: unencrypted");
  }
  spdlog::info("exporter listening on {}:{} (batching {}, {})", cfg_.listen_host, listen_port_,
               cfg_.batching ? "on" : "off",
               tls_server_ ? (cfg_.tls_psk_file.empty() ? "TLS 1.3, X.509" : "TLS 1.3, PSK") : "no TLS");
  if (!tls_server_ && !IsLoopbackHost(cfg_.listen_host))
    spdlog::warn("insecure = true: DST on {}:{} is neither encrypted nor authenticated", cfg_.listen_host,
                 listen_port_);
  if (int rc = StartNbd(); rc != 0) return rc;

  if (Status st = OpenTopology(); !st.ok()) {
    spdlog::error("{}", Message(st));
    return ctl::kExIoErr;
  }
  RuntimeObjects rt = LoadRuntimeObjects();
  for (const auto& e : cfg_.exports) {
    {
      std::lock_guard<std::mutex> l(mu_);
      exports_[e.name] = e;
    }
    if (e.path.empty()) continue;  // exports of arrays/volumes: once those are up
    if (Status st = OpenExport(e); !st.ok()) {
      spdlog::error("export \"{}\": {}", e.name, Message(st));
      return ctl::kExIoErr;
    }
  }
  // Recorded runtime exports: a failure is logged, the name stays reserved (see persist.cc).
  for (const auto& e : rt.exports) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!exports_.emplace(e.name, e).second) continue;
    }
    if (e.path.empty()) continue;
    if (Status st = OpenExport(e); !st.ok())
      spdlog::error("export \"{}\" (recorded by dstctl): {}; dstctl export remove {} forgets it",
                    e.name, Message(st), e.name);
    else
      spdlog::info("export \"{}\": restored from {}/dstd.sqlite", e.name, opts_.state_dir);
  }

  std::vector<VolumeConfig> volumes = cfg_.volumes;
  volumes.insert(volumes.end(), rt.volumes.begin(), rt.volumes.end());
  for (const auto& vc : volumes) {
    auto vol = std::make_shared<Volume>();
    vol->cfg = vc;
    {
      std::lock_guard<std::mutex> l(mu_);
      volumes_[vc.name] = vol;
    }
    if (Status st = ConnectVolume(vol); !st.ok()) {
      spdlog::warn("volume \"{}\": {}; retrying in the background", vc.name, Message(st));
      ScheduleRetry(vol);
    }
  }

  if (Status st = StartArrays(); !st.ok()) {
    spdlog::error("arrays: {}", Message(st));
    return ctl::kExIoErr;
  }
  TryPendingExports();

  if (!cfg_.mountpoint.empty()) {
    if (Status st = DoMount(cfg_.mountpoint); !st.ok()) {
      spdlog::error("cannot mount FUSE at {}: {}", cfg_.mountpoint, Message(st));
      return ctl::kExUnavailable;
    }
  } else if (!rt.mount.empty()) {
    if (Status st = DoMount(rt.mount); !st.ok())
      spdlog::error("cannot mount FUSE at {} (recorded by dstctl mount): {}", rt.mount,
                    Message(st));
  }

  std::vector<std::string> skipped;
  path_policy_ = MakePathPolicy(cfg_, opts_.state_dir, &skipped);
  for (const auto& r : skipped)
    spdlog::warn("export_roots: {} does not exist; ignored", r);
  std::error_code ec;
  auto parent = std::filesystem::path(opts_.control_path).parent_path();
  if (!parent.empty()) std::filesystem::create_directories(parent, ec);
  control_ = std::make_unique<ControlServer>(
      io_, opts_.control_path, [this](ctl::Request req, Reply reply) {
        Handle(std::move(req), std::move(reply));
      });
  if (Status st = control_->Start(); !st.ok()) {
    spdlog::error("{}", Message(st));
    control_.reset();
    return st.code() == Status::Code::kBusy ? ctl::kExTempFail : ctl::kExUnavailable;
  }
  spdlog::info("control socket {}", opts_.control_path);
  if (cfg_.metrics_enabled) {
    MetricsServerOptions mo;
    mo.host = cfg_.metrics_host;
    mo.port = cfg_.metrics_port;
    // Rendered on the metrics thread from the same snapshot `status` returns.
    auto m = MetricsServer::Start(mo, [this] { return StatusToMetrics(MetricsJson()); });
    if (!m.ok()) {
      spdlog::error("{}", Message(m.status()));
      return ctl::kExUnavailable;
    }
    metrics_ = std::move(m).value();
    spdlog::info("metrics on http://{}:{}/metrics", cfg_.metrics_host, metrics_->port());
  }
  spdlog::info("dstd {} ready (pid {})", "0.1.0", ::getpid());
  return 0;
}

bool Daemon::LoopAlive(std::chrono::milliseconds timeout) {
  auto done = std::make_shared<std::promise<void>>();
  auto f = done->get_future();
  boost::asio::post(io_, [done] { done->set_value(); });
  return f.wait_for(timeout) == std::future_status::ready;
}

void Daemon::Shutdown() {
  if (stopping_.exchange(true)) return;
  spdlog::info("shutting down");
  metrics_.reset();  // its thread renders from the objects torn down below
  if (control_) control_->Stop();
  StopArrayThreads();
  workers_.Stop();

  if (exporter_ && exporter_started_ && !io_threads_.empty()) {
    auto done = std::make_shared<std::promise<Status>>();
    auto fut = done->get_future();
    exporter_->Drain([done](Status st) { done->set_value(st); });
    if (fut.wait_for(std::chrono::seconds(60)) != std::future_status::ready) {
      spdlog::error("exporter drain did not finish within 60 s; closing anyway");
    } else if (Status st = fut.get(); !st.ok()) {
      spdlog::warn("exporter drain: {}", Message(st));
    } else {
      spdlog::info("exporter drained");
    }
  }
  StopNbd();

  std::vector<std::shared_ptr<Volume>> vols;
  std::shared_ptr<fuse::FuseMount> mount;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [name, v] : volumes_) vols.push_back(v);
    mount = std::move(mount_);
  }
  for (auto& v : vols) {
    if (!v->dev) continue;
    if (v->remote && v->remote->Stats().state != "connected") {
      // Say why shutdown pauses: the flush waits for the peer to come back, up to a deadline.
      spdlog::info("volume \"{}\": {} is not connected; waiting up to {} s for it to take the last writes",
                   v->cfg.name, v->remote->Describe(),
                   std::chrono::duration_cast<std::chrono::seconds>(FlushTimeout(v->cfg)).count());
    }
    Status st = FlushWithDeadline(*v->dev, FlushTimeout(v->cfg));
    if (st.ok()) continue;
    spdlog::warn("volume \"{}\": flush failed: {}", v->cfg.name, Message(st));
    if (st.IsTimedOut() && (v->remote || v->nbd)) {
      // Stuck peer: fail its pending requests now so the FUSE unmount below cannot hang on them.
      if (v->remote) v->remote->Close();
      if (v->nbd) v->nbd->Close();
      v->remote.reset();
      v->nbd.reset();
      v->dev.reset();
      v->counter.reset();
    }
  }
  if (mount) {
    spdlog::info("unmounting {}", mount->mountpoint());
    mount->Unmount();
    mount.reset();
  }
  for (auto& v : vols) {
    // The FUSE mount is gone: whatever it still wrote reached the device; make it durable.
    if (v->dev && !v->is_array) (void)FlushWithDeadline(*v->dev, FlushTimeout(v->cfg));
  }
  // Arrays close cleanly (mirror intent maps cleared, marked clean) before their leg volumes go.
  CloseArrays();
  for (auto& v : vols) {
    if (v->remote) v->remote->Close();
    if (v->nbd) v->nbd->Close();
  }
  vols.clear();
  {
    std::lock_guard<std::mutex> l(mu_);
    volumes_.clear();
  }
  CloseEthEndpoints();

  work_.reset();
  io_.stop();
  for (auto& t : io_threads_) t.join();
  io_threads_.clear();
  exporter_.reset();
  control_.reset();
  if (lock_fd_ >= 0) {
    if (::ftruncate(lock_fd_, 0) != 0) { /* stale pid content is harmless */ }
    ::close(lock_fd_);
    lock_fd_ = -1;
  }
  spdlog::info("stopped");
}

// ---------------------------------------------------------------------------------------------
// Devices

Status Daemon::OpenExport(const ExportConfig& e) {
  DST_RETURN_IF_ERROR(CheckExportFree(e));
  if (e.path.empty()) {
    // An array or a volume of this daemon: arrays stack across hosts.
    const std::string& ref = e.array.empty() ? e.volume : e.array;
    std::shared_ptr<BlockDevice> dev;
    {
      std::lock_guard<std::mutex> l(mu_);
      auto it = volumes_.find(ref);
      if (it == volumes_.end() || it->second->is_array != !e.array.empty())
        return Status::NotFound(
            fmt::format("no {} \"{}\"", e.array.empty() ? "volume" : "array", ref));
      dev = it->second->dev;
    }
    if (!dev)
      return Status::Unavailable(fmt::format("{} \"{}\" is not connected yet",
                                             e.array.empty() ? "volume" : "array", ref));
    DST_RETURN_IF_ERROR(ServeExport(e, dev, {}));
    spdlog::info("export \"{}\": {} \"{}\" ({} bytes)", e.name,
                 e.array.empty() ? "volume" : "array", ref, dev->Info().size);
    Emit(json{{"type", "export_added"}, {"export", e.name}, {"size", dev->Info().size}});
    return Status::OK();
  }
  FileDeviceOptions fo;
  fo.read_only = e.read_only;
  fo.direct_io = e.direct_io;
  fo.create = e.size > 0;
  fo.size = e.size;
  fo.grow = e.grow;
  auto dev = FileDevice::Open(e.path, fo);
  if (!dev.ok())  // the size refusals name the path already
    return dev.status().message().rfind(e.path, 0) == 0 ? dev.status()
                                                        : dev.status().WithContext(e.path);
  DST_RETURN_IF_ERROR(ServeExport(e, dev.value(), e.path));
  spdlog::info("export \"{}\": {} ({} bytes{})", e.name, e.path, dev.value()->Info().size,
               e.read_only ? ", read-only" : "");
  Emit(json{{"type", "export_added"}, {"export", e.name}, {"size", dev.value()->Info().size}});
  return Status::OK();
}

Status Daemon::LoadTls() {
  if (!cfg_.tls()) return Status::OK();
  net::TlsConfig tc;
  tc.psk_file = cfg_.tls_psk_file;
  tc.psk_identity = cfg_.tls_identity;
  tc.cert_file = cfg_.tls_cert;
  tc.key_file = cfg_.tls_key;
  tc.ca_file = cfg_.tls_ca;
  tc.server_name = cfg_.tls_server_name;
  tc.server = true;
  auto server = net::TlsContext::Create(tc);
  if (!server.ok()) return server.status();
  tc.server = false;
  auto client = net::TlsContext::Create(tc);
  if (!client.ok()) return client.status();
  tls_server_ = server.value();
  tls_client_ = client.value();
  return Status::OK();
}

Status Daemon::UseTls(const std::string& uri, const std::string& host, std::uint16_t port, net::RemoteOptions* co) {
  net::BlockUri u;
  if (!net::ParseBlockUri(uri, &u).ok()) return Status::OK();
  if (u.eth) {
    auto ep = EthEndpointFor(u.host);
    if (!ep.ok()) return ep.status().WithContext(uri);
    std::array<std::uint8_t, 6> mac{};
    DST_RETURN_IF_ERROR(net::ParseMac(u.mac, &mac));
    co->connector = [ep = ep.value(), mac](const net::Strand& s) { return ep->MakeConnector(s, mac); };
    co->uri = u.Canonical();
    return Status::OK();
  }
  if (!u.tls) return Status::OK();
  if (!tls_client_)
    return Status::InvalidArgument(
        fmt::format("{}: dsts:// needs TLS keys ([daemon] tls_psk_file, or tls_cert/tls_key/tls_ca)", uri));
  co->connector = [ctx = tls_client_, host, port](const net::Strand& s) -> std::unique_ptr<net::Connector> {
    return std::make_unique<net::TlsConnector>(std::make_unique<net::TcpConnector>(s, host, port), ctx, host);
  };
  return Status::OK();
}

Result<std::shared_ptr<net::EthEndpoint>> Daemon::EthEndpointFor(const std::string& ifname) {
  std::lock_guard<std::mutex> l(eth_mu_);
  if (auto it = eth_.find(ifname); it != eth_.end()) return it->second;
  if (stopping_) return Status::Unavailable("dstd is stopping");
  net::EthEndpointOptions o;
  o.link.ifname = ifname;
  o.insecure_segment = cfg_.insecure_segment;
  // On dstd's io_context: the sessions' owners (remote devices, the exporter) run there, so the
  // endpoint hands them completions without waking another thread (docs/architecture.md).
  o.io = &io_;
  if (!cfg_.tls_psk_file.empty()) {
    auto psks = net::LoadPskFile(cfg_.tls_psk_file);
    if (!psks.ok()) return psks.status();
    for (auto& e : psks.value()) o.psks.emplace_back(e.identity, e.key);
    o.identity = cfg_.tls_identity;
  }
  auto ep = net::EthEndpoint::Open(std::move(o));
  if (!ep.ok()) return ep.status();
  if (cfg_.insecure_segment && cfg_.tls_psk_file.empty())
    spdlog::warn("insecure_segment = true: DST frames on {} are neither encrypted nor authenticated", ifname);
  // Only a listening interface answers DISCOVER: elsewhere there is nothing to dial.
  if (std::find(cfg_.eth_interfaces.begin(), cfg_.eth_interfaces.end(), ifname) != cfg_.eth_interfaces.end())
    // The listing takes dstd's locks: build it on a worker, never on the io thread.
    ep.value()->SetDiscoveryResponder([this](const std::string& identity, net::EthEndpoint::DiscoveryAnswer answer) {
      workers_.Post([this, identity, answer = std::move(answer)] { answer(DiscoveryListing(identity)); });
    });
  eth_[ifname] = ep.value();
  return ep.value();
}

std::string Daemon::DiscoveryListing(const std::string& identity) {
  if (!exporter_ || stopping_) return {};
  std::string out;
  const std::vector<net::ExportStatus> list = exporter_->ListExports();
  std::lock_guard<std::mutex> l(mu_);
  for (const auto& e : list) {
    auto it = exports_.find(e.name);
    const net::Access a = it == exports_.end() ? net::Access::kNone : net::AccessFor(it->second.allow, identity);
    if (a == net::Access::kNone) continue;  // the peer could not open it: do not name it
    out += fmt::format("{} {} {}\n", e.name, e.size, e.read_only || a == net::Access::kReadOnly ? "ro" : "rw");
  }
  return out;
}

// eth.discover {interface, timeout_ms}: who exports what on that segment (docs/protocol.md §12.8).
void Daemon::DiscoverRpc(const json& p, Finish finish) {
  auto i = p.find("interface");
  if (i == p.end() || !i->is_string() || i->get<std::string>().empty())
    return finish(Status::InvalidArgument("parameter \"interface\" must name a network interface"));
  std::uint64_t wait_ms = 1000;
  if (auto t = p.find("timeout_ms"); t != p.end()) {
    if (!t->is_number_unsigned() || t->get<std::uint64_t>() < 10 || t->get<std::uint64_t>() > 60000)
      return finish(Status::InvalidArgument("parameter \"timeout_ms\" must be 10..60000"));
    wait_ms = t->get<std::uint64_t>();
  }
  const std::string ifname = i->get<std::string>();
  workers_.Post([this, ifname, wait_ms, finish] {
    auto ep = EthEndpointFor(ifname);
    if (!ep.ok()) return finish(ep.status());
    auto found = ep.value()->Discover(std::chrono::milliseconds(wait_ms));
    if (!found.ok()) return finish(found.status());
    json stations = json::array();
    for (const auto& s : found.value()) {
      json exports = json::array();
      std::size_t pos = 0;
      while (pos < s.listing.size()) {
        std::size_t nl = s.listing.find('\n', pos);
        if (nl == std::string::npos) nl = s.listing.size();
        const std::string line = s.listing.substr(pos, nl - pos);
        pos = nl + 1;
        char name[256] = {}, mode[3] = {};
        unsigned long long size = 0;
        if (std::sscanf(line.c_str(), "%255s %llu %2s", name, &size, mode) != 3) continue;  // not ours to trust
        exports.push_back({{"name", name}, {"size", std::uint64_t(size)}, {"read_only", std::string(mode) == "ro"},
                           {"uri", fmt::format("eth://{}/{}/{}", ifname, s.mac, name)}});
      }
      stations.push_back({{"mac", s.mac}, {"exports", exports}});
    }
    const auto st = ep.value()->Stats();
    finish(json{{"interface", ifname}, {"mac", st.mac}, {"encrypted", st.encrypted}, {"stations", stations}});
  });
}

void Daemon::CloseEthEndpoints() {
  std::map<std::string, std::shared_ptr<net::EthEndpoint>> all;
  {
    std::lock_guard<std::mutex> l(eth_mu_);
    all.swap(eth_);
  }
  for (auto& [n, ep] : all) ep->Close();
}

nlohmann::json Daemon::EthStatusJson() {
  json out = json::array();
  std::lock_guard<std::mutex> l(eth_mu_);
  for (const auto& [n, ep] : eth_) {
    const auto s = ep->Stats();
    out.push_back({{"interface", s.ifname}, {"mac", s.mac}, {"mtu", s.mtu}, {"tx_mode", s.tx_mode},
                   {"rx_mode", s.rx_mode}, {"encrypted", s.encrypted}, {"insecure_segment", s.insecure_segment},
                   {"listening", std::find(cfg_.eth_interfaces.begin(), cfg_.eth_interfaces.end(), n) !=
                                     cfg_.eth_interfaces.end()},
                   {"sessions", s.sessions}, {"frames_sent", s.frames_sent}, {"send_calls", s.send_calls},
                   {"frames_per_send_call", s.frames_per_send_call}, {"tx_ring_occupancy", s.tx_ring_occupancy},
                   {"tx_ring_peak", s.tx_ring_peak}, {"frames_received", s.frames_received},
                   {"receive_calls", s.receive_calls}, {"frames_per_receive_call", s.frames_per_receive_call},
                   {"retransmits", s.retransmits}, {"timeouts", s.timeouts}, {"duplicates", s.duplicates},
                   {"out_of_order", s.out_of_order}, {"malformed", s.malformed}, {"bad_tag", s.bad_tag},
                   {"replayed", s.replayed}, {"dead_sessions", s.dead_sessions}});
  }
  return out;
}

Status Daemon::ConnectVolume(const std::shared_ptr<Volume>& vol) {
  const VolumeConfig& c = vol->cfg;
  std::shared_ptr<BlockDevice> dev;
  std::shared_ptr<net::RemoteDevice> remote;
  std::shared_ptr<net::NbdClientDevice> nbd;
  if (Status free = CheckVolumeFree(c); !free.ok()) {
    std::lock_guard<std::mutex> l(mu_);
    vol->error = Message(free);
    return free;
  }
  // Options both network clients take from the volume config.
  net::ClientOptions co;
  co.queue_depth = c.queue_depth;
  co.batching = cfg_.batching;
  co.keepalive_timeout = std::chrono::seconds(c.keepalive_timeout_s);
  co.keepalive_interval = std::min<std::chrono::milliseconds>(
      std::chrono::milliseconds(1000), co.keepalive_timeout / 3);
  co.io_timeout = std::chrono::seconds(c.io_timeout_s);
  auto connected = [&](const Status& st) {
    std::lock_guard<std::mutex> l(mu_);
    ++vol->attempts;
    if (!st.ok()) vol->error = Message(st);
    if (st.ok() || st.message().find(c.remote) != std::string::npos) return st;
    return st.WithContext(c.remote);
  };
  if (!c.remote.empty() && !IsDstUri(c.remote)) {  // nbd:// or nbd+unix://
    net::NbdClientOptions no;
    static_cast<net::ClientOptions&>(no) = co;
    Status st = net::ParseNbdUri(c.remote, &no);
    if (st.ok()) st = UseNbdTls(c.remote, &no);
    auto r = st.ok() ? net::NbdClientDevice::Connect(io_, no) : Result<std::shared_ptr<net::NbdClientDevice>>(st);
    if (Status done = connected(r.ok() ? Status::OK() : r.status()); !done.ok()) return done;
    nbd = r.value();
    dev = nbd;
  } else if (!c.remote.empty()) {
    net::RemoteOptions ro;
    static_cast<net::ClientOptions&>(ro) = co;
    ro.host = c.host;
    ro.port = c.port;
    ro.export_name = c.export_name;
    ro.checksum = c.checksum == "xxh3";
    if (Status tls = UseTls(c.remote, ro.host, ro.port, &ro); !tls.ok()) return connected(tls);
    auto r = net::RemoteDevice::Connect(io_, ro);
    if (Status done = connected(r.ok() ? Status::OK() : r.status()); !done.ok()) return done;
    remote = r.value();
    dev = remote;
  } else {
    auto r = FileDevice::Open(c.path, FileDeviceOptions{});
    if (!r.ok()) {
      std::lock_guard<std::mutex> l(mu_);
      vol->error = Message(r.status());
      return r.status().WithContext(c.path);
    }
    dev = r.value();
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    if (vol->removed || stopping_) {
      if (remote) remote->Close();
      if (nbd) nbd->Close();
      return Status::NotFound(fmt::format("volume \"{}\" was removed while connecting", c.name));
    }
    vol->counter = std::make_shared<CountingDevice>(dev);
    vol->dev = vol->counter;
    vol->remote = remote;
    vol->nbd = nbd;
    vol->state = remote || nbd ? "connected" : "ready";
    vol->error.clear();
  }
  spdlog::info("volume \"{}\": {} ({} bytes)", c.name, dev->Describe(), dev->Info().size);
  if (remote || nbd) WatchVolume(c.name, remote ? static_cast<net::ClientDevice&>(*remote) : *nbd);
  AddToMount(vol);
  TryPendingExports();
  return Status::OK();
}

void Daemon::ScheduleRetry(const std::shared_ptr<Volume>& vol) {
  int attempts;
  {
    std::lock_guard<std::mutex> l(mu_);
    attempts = vol->attempts;
  }
  auto delay = std::chrono::milliseconds(std::min(10000, 1000 * (1 << std::min(attempts, 4))));
  auto timer = std::make_shared<asio::steady_timer>(io_, delay);
  timer->async_wait([this, vol, timer](boost::system::error_code ec) {
    if (ec || stopping_) return;
    workers_.Post([this, vol] {
      {
        std::lock_guard<std::mutex> l(mu_);
        if (vol->removed || stopping_) return;
      }
      if (Status st = ConnectVolume(vol); !st.ok()) {
        spdlog::debug("volume \"{}\": {}", vol->cfg.name, Message(st));
        ScheduleRetry(vol);
      }
    });
  });
}

void Daemon::AddToMount(const std::shared_ptr<Volume>& vol) {
  std::shared_ptr<fuse::FuseMount> m;
  std::shared_ptr<BlockDevice> dev;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!mount_ || vol->in_mount || !vol->dev || vol->removed || vol->removing) return;
    m = mount_;
    dev = vol->dev;
    vol->in_mount = true;
  }
  fuse::FileAccess access;
  access.mode = vol->cfg.mode;
  access.uid = vol->cfg.owner_uid;
  access.gid = vol->cfg.owner_gid;
  if (Status st = m->AddVolume(vol->cfg.name, dev, access); !st.ok()) {
    spdlog::warn("volume \"{}\": cannot add to FUSE mount: {}", vol->cfg.name, Message(st));
    std::lock_guard<std::mutex> l(mu_);
    vol->in_mount = false;
  }
}

namespace {

// The /proc/self/mountinfo entry whose mount point is `dir` (the last one: the top of a stack).
struct MountEntry {
  bool found = false;
  std::string fstype, source;
};

std::string Unescape(const std::string& s) {  // mountinfo escapes space, tab, \n, \ as \ooo
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size()) {
      out.push_back(char(std::stoi(s.substr(i + 1, 3), nullptr, 8)));
      i += 3;
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}

MountEntry FindMount(const std::string& dir) {
  MountEntry e;
  std::FILE* f = std::fopen("/proc/self/mountinfo", "re");
  if (!f) return e;
  char* line = nullptr;
  std::size_t cap = 0;
  while (::getline(&line, &cap, f) > 0) {
    std::istringstream in(line);
    std::string id, parent, devno, root, mp, tok;
    in >> id >> parent >> devno >> root >> mp;
    if (Unescape(mp) != dir) continue;
    while (in >> tok && tok != "-") {}
    e.found = true;
    in >> e.fstype >> e.source;
  }
  std::free(line);
  std::fclose(f);
  return e;
}

}  // namespace

// After kill -9 the kernel keeps dstd's FUSE mount with a dead connection: every access fails
// with ENOTCONN ("Transport endpoint is not connected") and mounting again on top would fail or
// stack.  Such a stale dst mount of our mount point is detached lazily (MNT_DETACH, or
// fusermount3 -uz without CAP_SYS_ADMIN); a loop device still on it keeps its own reference.
// A FUSE mount point that answers (a live dstd or another server) is never touched: refused.
// The probe is statfs(), which FUSE always sends to the server (stat() may be answered from
// cached attributes for a second after the server died); it runs on a helper thread with a
// deadline, so a stopped server cannot hang dstd's start.
Status Daemon::PrepareMountpoint(const std::string& dir) {
  MountEntry e = FindMount(dir);
  if (!e.found || e.fstype.rfind("fuse", 0) != 0) return Status::OK();
  auto probe = std::make_shared<std::promise<int>>();
  auto answer = probe->get_future();
  std::thread([dir, probe] {
    struct statfs sfs;
    probe->set_value(::statfs(dir.c_str(), &sfs) == 0 ? 0 : errno);
  }).detach();
  if (answer.wait_for(std::chrono::seconds(3)) != std::future_status::ready)
    return Status::Busy(fmt::format("{} is a {} mount (from {}) whose server does not answer "
                                    "(stopped?); refusing to touch it", dir, e.fstype, e.source));
  int err = answer.get();
  if (err == 0)
    return Status::Busy(fmt::format(
        "{} is already a mount point ({} from {}) served by a live process; unmount it first "
        "or choose another mount point", dir, e.fstype, e.source));
  if (err != ENOTCONN) return Status::FromErrno(err, fmt::format("statfs {}", dir));
  if (e.fstype != "fuse.dst")
    return Status::Busy(fmt::format("{} is a dead {} mount that dstd did not make; unmount it "
                                    "yourself (fusermount3 -uz {})", dir, e.fstype, dir));
  spdlog::warn("{}: stale FUSE mount (Transport endpoint is not connected) left by a dstd that "
               "died; detaching it", dir);
  if (::umount2(dir.c_str(), MNT_DETACH) != 0) {
    int uerr = errno;
    std::string cmd = "fusermount3 -uz '" + dir + "' 2>&1";
    if (std::system(cmd.c_str()) != 0)
      return Status::FromErrno(uerr, fmt::format("cannot detach the stale mount at {} "
                                                 "(umount2: {}; fusermount3 -uz failed too)",
                                                 dir, std::strerror(uerr)));
  }
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0)
    return Status::FromErrno(errno, fmt::format("{} is still unusable after detaching the stale "
                                                "mount", dir));
  spdlog::info("{}: stale mount detached", dir);
  return Status::OK();
}

Status Daemon::DoMount(const std::string& dir) {
  DST_RETURN_IF_ERROR(PrepareMountpoint(dir));
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return Status::FromErrno(ec.value(), fmt::format("cannot create {}", dir));
  fuse::FuseOptions fo;
  fo.mountpoint = dir;
  fo.allow_other = cfg_.fuse_allow_other;
  auto r = fuse::FuseMount::Mount(fo);
  if (!r.ok()) return r.status();
  std::shared_ptr<fuse::FuseMount> m(std::move(r.value()));
  std::vector<std::shared_ptr<Volume>> vols;
  {
    std::lock_guard<std::mutex> l(mu_);
    mount_ = m;
    for (auto& [name, v] : volumes_) {
      v->in_mount = false;
      vols.push_back(v);
    }
  }
  spdlog::info("FUSE mounted at {}", dir);
  Emit(json{{"type", "mount"}, {"state", "mounted"}, {"path", dir}});
  for (auto& v : vols) AddToMount(v);
  return Status::OK();
}

// ---------------------------------------------------------------------------------------------
// Control requests

void Daemon::Handle(ctl::Request req, Reply reply) {
  if (stopping_) {
    reply(ctl::EncodeError(req.id, ctl::kShuttingDown, "dstd is shutting down"));
    return;
  }
  const std::string& m = req.method;
  const json& p = req.params;
  spdlog::debug("control: {} {}", m, p.dump(-1, ' ', false, json::error_handler_t::replace));
  if (ctl::IsOperationMethod(m)) return OperationRpc(req, std::move(reply));  // operations.cc
  Reply reply_copy = reply;  // `events` keeps replying after its result
  Finish finish = [id = req.id, reply = std::move(reply), m](Result<json> r) {
    if (!r.ok()) spdlog::info("control: {} failed: {}", m, Message(r.status()));
    reply(r.ok() ? ctl::EncodeResult(id, r.value()) : ErrorLine(id, r.status()));
  };
  if (m == "status") {
    finish(StatusJson());
  } else if (m == "hello") {
    finish(HelloJson());
  } else if (m == "export.list") {
    finish(json{{"exports", ExportsJson()}});
  } else if (m == "volume.list") {
    finish(json{{"volumes", VolumesJson()}});
  } else if (m == "unmount") {
    UnmountRpc(std::move(finish));
  } else if (m == "loop.attach" || m == "loop.detach") {
    LoopRpc(m, p, std::move(finish));
  } else if (m == "eth.discover") {
    DiscoverRpc(p, std::move(finish));
  } else if (m.rfind("array.", 0) == 0) {
    ArrayRpc(m, p, std::move(finish));
  } else if (m == "apply") {
    ApplyRpc(req, std::move(reply_copy));
  } else if (m == "batch") {
    BatchRpc(req, std::move(reply_copy));
  } else if (m == "events") {
    EventsRpc(p, std::move(reply_copy), req.id);
  } else {
    // ParseRequest only lets known methods through; this is a Methods()/dispatch mismatch.
    finish(Status::NotSupported(fmt::format("method \"{}\" is not implemented", m)));
  }
}

Status Daemon::ServeExport(const ExportConfig& e, const std::shared_ptr<BlockDevice>& dev, const std::string& path) {
  auto served = std::make_shared<CountingDevice>(dev);
  net::ExportSpec spec;
  spec.name = e.name;
  spec.device = served;
  spec.read_only = e.read_only;
  spec.allow = e.allow;
  DST_RETURN_IF_ERROR(exporter_->AddExport(std::move(spec)));
  {
    std::lock_guard<std::mutex> l(mu_);
    export_io_[e.name] = served;
  }
  NbdExportAdded(e, dev, served, path);
  if (e.allow.empty())
    spdlog::warn("export \"{}\" has no allow list: nobody can connect (add allow = [\"identity:rw\"])", e.name);
  else
    spdlog::info("export \"{}\" allows {}", e.name, fmt::join(net::FormatAccessList(e.allow), ", "));
  return Status::OK();
}

// Operation steps (operations.cc validates first; these re-check only what must be atomic).

Status Daemon::AddExport(const ExportConfig& e) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!exports_.emplace(e.name, e).second)
      return Status::Exists(fmt::format("export \"{}\" already exists", e.name));
  }
  if (Status s = OpenExport(e); !s.ok()) {
    std::lock_guard<std::mutex> l(mu_);
    exports_.erase(e.name);
    return s;
  }
  RecordExport(e);
  return Status::OK();
}

json Daemon::ExportJsonOf(const std::string& name) {
  for (auto& j : ExportsJson())
    if (j["name"] == name) return j;
  return json::object();
}

Status Daemon::RemoveExport(const std::string& name) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!exports_.count(name)) return Status::NotFound(fmt::format("no export \"{}\"", name));
  }
  DST_RETURN_IF_ERROR(NbdExportRemove(name));
  Status st = exporter_->RemoveExport(name);
  NbdExportRemoveDone(name, st.ok() || st.IsNotFound());
  if (st.ok() || st.IsNotFound()) {
    {
      std::lock_guard<std::mutex> l(mu_);
      exports_.erase(name);
      export_io_.erase(name);
    }
    ForgetObject("export", name);
    if (st.IsNotFound()) st = Status::OK();  // reserved but never opened (see persist.cc)
  }
  if (st.ok()) {
    spdlog::info("export \"{}\" removed", name);
    Emit(json{{"type", "export_removed"}, {"export", name}});
  }
  if (st.code() == Status::Code::kBusy && st.message().empty())
    st = Status::Busy(fmt::format("export \"{}\" has connected clients", name));
  return st;
}

Status Daemon::SetExportAccess(const std::string& name, const net::AccessList& allow) {
  ExportConfig e;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = exports_.find(name);
    if (it == exports_.end()) return Status::NotFound(fmt::format("no export \"{}\"", name));
    it->second.allow = allow;
    e = it->second;
  }
  DST_RETURN_IF_ERROR(exporter_->SetAccess(name, allow));
  if (nbd_) {
    Status st = nbd_->SetAccess(name, allow);
    if (!st.ok() && !st.IsNotFound()) return st;
  }
  RecordExport(e);
  spdlog::info("export \"{}\" now allows {}", name,
               allow.empty() ? std::string("nobody") : fmt::format("{}", fmt::join(net::FormatAccessList(allow), ", ")));
  Emit(json{{"type", "export_access_changed"}, {"export", name}, {"allow", net::FormatAccessList(allow)}});
  return Status::OK();
}

Status Daemon::ImportVolume(const VolumeConfig& c) {
  auto vol = std::make_shared<Volume>();
  vol->cfg = c;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!volumes_.emplace(c.name, vol).second)
      return Status::Exists(fmt::format("volume \"{}\" already exists", c.name));
  }
  if (Status s = ConnectVolume(vol); !s.ok()) {
    std::lock_guard<std::mutex> l(mu_);
    auto it = volumes_.find(c.name);
    if (it != volumes_.end() && it->second == vol) volumes_.erase(it);
    vol->removed = true;
    return s;
  }
  RecordVolume(vol->cfg);
  return Status::OK();
}

json Daemon::VolumeJsonOf(const std::string& name) {
  for (auto& j : VolumesJson())
    if (j["name"] == name) return j;
  return json::object();
}

Status Daemon::RemoveVolume(const std::string& name) {
  std::shared_ptr<Volume> vol;
  std::shared_ptr<fuse::FuseMount> m;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = volumes_.find(name);
    if (it == volumes_.end() || it->second->is_array)
      return Status::NotFound(fmt::format("no volume \"{}\"", name));
    vol = it->second;
    if (vol->removing) return Status::Busy(fmt::format("volume \"{}\" is being removed", name));
    if (!vol->dev) {
      // Still connecting: the retry loop sees `removed` and stops.
      vol->removed = true;
      volumes_.erase(it);
      spdlog::info("volume \"{}\" removed (was not connected)", name);
      ForgetObject("volume", name);
      return Status::OK();
    }
    vol->removing = true;
    if (vol->in_mount) m = mount_;
  }
  if (m) {
    Status st = m->RemoveVolume(name);
    if (!st.ok() && !st.IsNotFound()) {
      std::lock_guard<std::mutex> l(mu_);
      vol->removing = false;
      if (st.code() == Status::Code::kBusy)
        st = Status::Busy(fmt::format("volume \"{}\" is in use ({}/{}.img is open)", name,
                                      m->mountpoint(), name));
      return st;
    }
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    vol->in_mount = false;
    vol->removed = true;
    volumes_.erase(name);
  }
  if (Status st = FlushWithDeadline(*vol->dev, FlushTimeout(vol->cfg)); !st.ok())
    spdlog::warn("volume \"{}\": flush before removal failed: {}", name, Message(st));
  if (vol->remote) vol->remote->Close();
  if (vol->nbd) vol->nbd->Close();
  ForgetObject("volume", name);
  spdlog::info("volume \"{}\" removed", name);
  Emit(json{{"type", "volume_removed"}, {"volume", name}});
  return Status::OK();
}

Status Daemon::Mount(const std::string& dir) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (mount_) return Status::Exists(fmt::format("already mounted at {}", mount_->mountpoint()));
    if (mount_busy_) return Status::Busy("a mount or unmount is in progress");
    mount_busy_ = true;
  }
  Status s = DoMount(dir);
  {
    std::lock_guard<std::mutex> l(mu_);
    mount_busy_ = false;
  }
  if (!s.ok()) return s.WithContext(fmt::format("cannot mount {}", dir));
  RecordObject("mount", "mount", json{{"path", dir}});
  return Status::OK();
}

void Daemon::UnmountRpc(Finish finish) {
  std::shared_ptr<fuse::FuseMount> m;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (mount_busy_) return finish(Status::Busy("a mount or unmount is in progress"));
    if (!mount_) return finish(Status::NotFound("nothing is mounted"));
    m = mount_;
    mount_busy_ = true;  // until the worker decides
  }
  // On a worker: a file closed just now is still open until its FUSE_RELEASE arrives, and
  // WaitUnused waits for that (up to 2 s), which must not hold the control thread.
  workers_.Post([this, m, finish]() mutable {
    for (const auto& f : m->ListVolumes()) {
      if (f.open_count > 0 && !m->WaitUnused(f.name)) {
        {
          std::lock_guard<std::mutex> l(mu_);
          mount_busy_ = false;
        }
        return finish(Status::Busy(fmt::format("{}/{}.img is open ({} users)", m->mountpoint(), f.name,
                                               f.open_count)));
      }
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      mount_.reset();
      for (auto& [name, v] : volumes_) v->in_mount = false;
    }
    std::string dir = m->mountpoint();
    m->Unmount();
    m.reset();
    ForgetObject("mount", "mount");
    {
      std::lock_guard<std::mutex> l(mu_);
      mount_busy_ = false;
    }
    spdlog::info("FUSE unmounted from {}", dir);
    Emit(json{{"type", "mount"}, {"state", "unmounted"}, {"path", dir}});
    finish(json::object());
  });
}

// loop.attach / loop.detach: a loop device over a volume's or array's FUSE file (loop_devices.h).
// The file is dstd's own FUSE file, so opening it needs dstd's FUSE threads: a worker runs it.
void Daemon::LoopRpc(const std::string& m, const json& p, Finish finish) {
  auto n = p.find("name");
  if (n == p.end() || !n->is_string() || n->get<std::string>().empty())
    return finish(Status::InvalidArgument("parameter \"name\" must be a volume or array name"));
  const std::string name = n->get<std::string>();
  bool read_only = false;
  if (auto it = p.find("read_only"); it != p.end()) {
    if (!it->is_boolean()) return finish(Status::InvalidArgument("parameter \"read_only\" must be a boolean"));
    read_only = it->get<bool>();
  }
  std::shared_ptr<fuse::FuseMount> mnt;
  {
    std::lock_guard<std::mutex> l(mu_);
    mnt = mount_;
  }
  if (!mnt)
    return finish(Status::NotFound("nothing is mounted: a loop device sits on a FUSE file (dstctl mount DIR first)"));
  bool shown = false;
  for (const auto& f : mnt->ListVolumes()) shown = shown || f.name == name;
  if (!shown)
    return finish(Status::NotFound(fmt::format("no volume or array \"{}\" in the mount at {}", name, mnt->mountpoint())));
  const std::string file = mnt->mountpoint() + "/" + name + ".img";
  const bool attach = m == "loop.attach";
  workers_.Post([this, name, file, read_only, attach, finish] {
    if (attach) {
      // One file, one loop device: a second one would be a second writer behind the same cache.
      auto existing = LoopDevicesFor(file);
      if (!existing.empty())
        return finish(Status::Exists(fmt::format("{} is already attached to {}", file, existing.front().device)));
      Result<std::string> dev = AttachLoop(file, read_only);
      if (!dev.ok()) return finish(dev.status().WithContext(fmt::format("cannot attach {}", file)));
      spdlog::info("loop device {} attached to {}{}", dev.value(), file, read_only ? " (read-only)" : "");
      PokeEvents();  // the events thread reports the change (it reads sysfs, as status does)
      return finish(json{{"device", dev.value()}, {"file", file}, {"read_only", read_only}});
    }
    auto devs = LoopDevicesFor(file);
    if (devs.empty()) return finish(Status::NotFound(fmt::format("no loop device uses {}", file)));
    json detached = json::array();
    for (const auto& d : devs) {
      if (Status st = DetachLoop(d); !st.ok()) {
        if (!detached.empty()) PokeEvents();
        return finish(st.WithContext(fmt::format("cannot detach {}", d.device)));
      }
      spdlog::info("loop device {} detached from {}", d.device, file);
      detached.push_back(d.device);
    }
    // The loop driver lets go of the file without a close() (no FUSE_FLUSH), and its
    // FUSE_RELEASE comes a moment later: wait for it (up to 2 s), so a `volume remove` right
    // after this is not refused.
    std::shared_ptr<fuse::FuseMount> mnt;
    {
      std::lock_guard<std::mutex> l(mu_);
      mnt = mount_;
    }
    if (mnt) (void)mnt->WaitUnused(name, /*release_expected=*/true);
    PokeEvents();
    finish(json{{"detached", detached}, {"file", file}});
  });
}

// ---------------------------------------------------------------------------------------------
// Status

// Per-export transmit counters, when the Exporter's ExportStatus provides them (a template, so
// the requires-expression is checked only on instantiation).
template <typename S>
static void AddExportCounters(json& j, const S& s) {
  if constexpr (requires { s.frames_sent; s.send_calls; s.requests; }) {
    j["requests"] = s.requests;
    j["frames_sent"] = s.frames_sent;
    j["send_calls"] = s.send_calls;
    j["frames_per_call"] = s.send_calls ? double(s.frames_sent) / double(s.send_calls) : 0.0;
  }
  if constexpr (requires { s.digest_errors; }) j["digest_errors"] = s.digest_errors;
}

json Daemon::ExportsJson() {
  std::map<std::string, ExportConfig> cfgs;
  {
    std::lock_guard<std::mutex> l(mu_);
    cfgs = exports_;
  }
  json arr = json::array();
  if (!exporter_) return arr;
  for (const auto& s : exporter_->ListExports()) {
    json j{{"name", s.name},         {"device", s.device},           {"size", s.size},
           {"read_only", s.read_only}, {"connections", s.connections}};
    auto c = cfgs.find(s.name);
    j["path"] = c != cfgs.end() && !c->second.path.empty() ? json(c->second.path) : json();
    j["array"] = c != cfgs.end() && !c->second.array.empty() ? json(c->second.array) : json();
    j["volume"] = c != cfgs.end() && !c->second.volume.empty() ? json(c->second.volume) : json();
    j["direct_io"] = c != cfgs.end() && c->second.direct_io;
    j["allow"] = c != cfgs.end() ? net::FormatAccessList(c->second.allow) : std::vector<std::string>();
    AddExportCounters(j, s);
    if (nbd_) j["nbd"] = nbd_->ExportJson(s.name);
    arr.push_back(std::move(j));
  }
  return arr;
}

json Daemon::VolumeJson(const std::string& name, const Volume& v) {
  json j{{"name", name},
         {"uri", v.cfg.remote.empty() ? json() : json(v.cfg.remote)},
         {"path", v.cfg.path.empty() ? json() : json(v.cfg.path)},
         {"source", VolumeSource(v.cfg)},
         {"queue_depth", v.cfg.queue_depth},
         {"io_timeout", v.cfg.io_timeout_s},
         {"keepalive_timeout", v.cfg.keepalive_timeout_s}};
  std::string state = v.state;
  std::uint64_t size = 0;
  bool ro = false;
  if (v.dev) {
    DeviceInfo info = v.dev->Info();
    size = info.size;
    ro = info.read_only;
  }
  net::RemoteStats rs;
  if (v.remote) {
    rs = v.remote->Stats();
    state = rs.state;
  } else if (v.nbd) {
    static_cast<net::ClientStats&>(rs) = v.nbd->Stats();
    state = rs.state;
  }
  if (v.removing) state = "removing";
  // Truthful health: what I/O to this volume would meet now (no I/O is done to find out).
  if (v.dev) {
    DeviceHealth h = v.dev->Health();
    if (h.reachable && (v.remote || v.nbd) && rs.state != "connected") {
      h.reachable = false;
      if (h.detail.empty()) h.detail = rs.state;
    }
    j["reachable"] = h.reachable;
    j["outage_ms"] = h.outage_ms;
    j["health"] = h.detail.empty() ? json() : json(h.detail);
  } else {
    j["reachable"] = false;
    j["outage_ms"] = 0;
    j["health"] = v.error.empty() ? json() : json(v.error);
  }
  j["state"] = state;
  j["size"] = size;
  j["read_only"] = ro;
  j["reconnects"] = rs.reconnects;
  j["resent"] = rs.resent;
  j["timeouts"] = rs.timeouts;
  j["checksum"] = rs.checksum ? "xxh3" : "none";
  j["digest_errors"] = rs.digest_errors;
  j["bad_replies"] = rs.bad_replies;
  j["inflight"] = rs.inflight;
  j["requests"] = rs.requests;
  j["frames_sent"] = rs.frames_sent;
  j["send_calls"] = rs.send_calls;
  j["frames_per_call"] = rs.frames_per_call;
  j["error"] = v.error.empty() ? json() : json(v.error);
  j["file"] = nullptr;
  j["open_count"] = 0;
  j["loop_devices"] = json::array();
  return j;
}

json Daemon::VolumesJson() {
  std::vector<std::pair<std::string, Volume>> snap;
  std::shared_ptr<fuse::FuseMount> m;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [name, v] : volumes_) snap.emplace_back(name, *v);
    m = mount_;
  }
  std::vector<fuse::VolumeEntry> files;
  if (m) files = m->ListVolumes();
  json arr = json::array();
  for (auto& [name, v] : snap) {
    json j = VolumeJson(name, v);
    for (const auto& f : files) {
      if (f.name != name) continue;
      j["file"] = m->mountpoint() + "/" + name + ".img";
      j["open_count"] = f.open_count;
      j["loop_devices"] = LoopDevicesJson(j["file"].get<std::string>());
    }
    arr.push_back(std::move(j));
  }
  return arr;
}

json Daemon::StatusJson() {
  json st;
  st["version"] = ctl::kProtocolVersion;
  double uptime =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
  st["daemon"] = {
      {"pid", ::getpid()},
      {"version", DaemonVersion()},
      {"listen", {{"address", cfg_.listen_host}, {"port", exporter_ ? listen_port_ : 0}}},
      {"tls", tls_server_ ? (cfg_.tls_psk_file.empty() ? "x509" : "psk") : "off"},
      // A clear-text listener others can reach ([daemon] insecure = true): status warns.
      {"insecure", cfg_.insecure && ((!IsLoopbackHost(cfg_.listen_host) && !tls_server_) ||
                                     (cfg_.nbd_enabled && !IsLoopbackHost(cfg_.nbd_host) &&
                                      cfg_.nbd_tls_mode() != "require"))},
      {"uptime_s", uptime},
      {"batching", cfg_.batching},
      {"memory_locked", memory_locked_},
      {"state_dir", opts_.state_dir},
      {"control", opts_.control_path},
  };
  if (exporter_) {
    net::ExporterStats s = exporter_->Stats();
    st["exporter"] = {{"connections_total", s.connections_total},
                      {"connections_open", s.connections_open},
                      {"requests", s.requests},
                      {"errors_replied", s.errors_replied},
                      {"protocol_errors", s.protocol_errors},
                      {"connections_refused", s.connections_refused},
                      {"connections_timed_out", s.connections_timed_out},
                      {"digest_errors", s.digest_errors},
                      {"frames_sent", s.frames_sent},
                      {"send_calls", s.send_calls},
                      {"frames_per_call", s.frames_per_call}};
  }
  st["eth"] = EthStatusJson();
  // Raw-Ethernet sessions run unencrypted ([daemon] insecure_segment = true, no PSK): status warns.
  st["daemon"]["insecure_segment"] = cfg_.tls_psk_file.empty() && cfg_.insecure_segment && !st["eth"].empty();
  st["nbd"] = NbdJson();
  st["exports"] = ExportsJson();
  st["volumes"] = VolumesJson();
  st["arrays"] = ArraysJson();
  std::shared_ptr<fuse::FuseMount> m;
  {
    std::lock_guard<std::mutex> l(mu_);
    m = mount_;
  }
  st["mount"] = m ? json(m->mountpoint()) : json();
  return st;
}

}  // namespace dst::daemon
