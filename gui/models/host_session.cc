#include "host_session.h"

#include <algorithm>
#include <mutex>
#include <optional>
#include <thread>

#include <QMetaObject>
#include <QTimer>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include "dst/control/async_client.h"

using nlohmann::json;

namespace dst::gui {

namespace {

// The io thread reaches its session only through this: the destructor clears `target` first,
// so a late handler never posts to a session being destroyed.  Posted calls that are still
// queued when it is gone are dropped by Qt with the receiver.
struct Bridge {
  std::mutex mu;
  HostSession* target = nullptr;
};

template <typename F>
void PostToQt(const std::shared_ptr<Bridge>& b, F f) {
  std::lock_guard<std::mutex> lock(b->mu);
  if (!b->target) return;
  HostSession* t = b->target;
  QMetaObject::invokeMethod(t, [t, f = std::move(f)]() mutable { f(t); }, Qt::QueuedConnection);
}

QString ErrorText(const control::AsyncControlClient::CallResult& r) {
  if (!r.delivered) return "connection lost: " + QString::fromStdString(r.error);
  return QString::fromStdString(r.reply.error_code + ": " + r.reply.error_message);
}

}  // namespace

struct HostSession::Io {
  boost::asio::io_context ctx;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work{ctx.get_executor()};
  std::shared_ptr<Bridge> bridge = std::make_shared<Bridge>();
  std::shared_ptr<control::AsyncControlClient> client;  // touched on the Qt thread only
  std::thread thread;
};

HostSession::HostSession(QString socket_path, QObject* parent)
    : HostSession(socket_path, socket_path, parent) {}

HostSession::HostSession(QString name, QString socket_path, QObject* parent)
    : QObject(parent), path_(std::move(name)), socket_(std::move(socket_path)), io_(std::make_unique<Io>()) {
  io_->bridge->target = this;
  io_->thread = std::thread([io = io_.get()] { io->ctx.run(); });
}

HostSession::~HostSession() {
  {
    std::lock_guard<std::mutex> lock(io_->bridge->mu);
    io_->bridge->target = nullptr;
  }
  if (io_->client) io_->client->Close();
  io_->work.reset();
  io_->ctx.stop();
  io_->thread.join();
  io_->client.reset();
}

void HostSession::start() {
  if (started_) return;
  started_ = true;
  connectNow();
}

void HostSession::setBackoff(int min_ms, int max_ms) {
  backoff_min_ms_ = backoff_ms_ = std::max(1, min_ms);
  backoff_max_ms_ = std::max(backoff_min_ms_, max_ms);
}

void HostSession::setState(State s) {
  if (s == state_) return;
  bool was_online = online();
  state_ = s;
  emit stateChanged(s);
  if (was_online != online()) emit onlineChanged(online());
}

void HostSession::connectNow() {
  quint64 gen = ++gen_;
  if (io_->client) io_->client->Close();
  io_->client = control::AsyncControlClient::Create(io_->ctx.get_executor());
  refresh_in_flight_ = refresh_again_ = false;
  setState(State::kConnecting);
  auto b = io_->bridge;
  io_->client->OnClose([b, gen](const std::string& why) {
    PostToQt(b, [gen, why](HostSession* s) { s->connectionLost(gen, QString::fromStdString(why)); });
  });
  io_->client->Connect(socket_.toStdString(), [b, gen](std::error_code ec) {
    PostToQt(b, [gen, ec](HostSession* s) {
      if (gen != s->gen_) return;
      if (ec)
        s->connectionLost(gen, QString::fromStdString(ec.message()));
      else
        s->requestSnapshot(gen);
    });
  });
}

void HostSession::connectionLost(quint64 gen, const QString& /*why*/) {
  if (gen != gen_) return;
  ++gen_;  // late replies of this connection are ignored from now on
  if (io_->client) io_->client->Close();
  io_->client.reset();
  setState(State::kOffline);
  int delay = backoff_ms_;
  backoff_ms_ = std::min(backoff_ms_ * 2, backoff_max_ms_);
  QTimer::singleShot(delay, this, [this, g = gen_] {
    if (g != gen_ || state_ != State::kOffline) return;
    ++reconnects_;
    connectNow();
  });
}

void HostSession::requestSnapshot(quint64 gen) {
  if (gen != gen_ || !io_->client) return;
  if (refresh_in_flight_) {
    refresh_again_ = true;
    return;
  }
  refresh_in_flight_ = true;
  if (state_ == State::kConnecting) setState(State::kSnapshot);
  QTimer::singleShot(reply_timeout_ms_, this, [this, gen, req = ++status_req_] {
    if (gen == gen_ && refresh_in_flight_ && req == status_req_) connectionLost(gen, "status timed out");
  });
  auto b = io_->bridge;
  io_->client->Call("status", json::object(), [b, gen](control::AsyncControlClient::CallResult r) {
    PostToQt(b, [gen, r = std::move(r)](HostSession* s) {
      if (gen != s->gen_) return;
      s->refresh_in_flight_ = false;
      if (!r.delivered) return;  // the close handler follows
      if (!r.reply.ok) {
        s->connectionLost(gen, ErrorText(r));
        return;
      }
      s->snapshot_ = r.reply.result;
      emit s->snapshotChanged();
      if (s->state_ == State::kSnapshot) {
        s->setState(State::kSubscribing);
        s->subscribe(gen);
      }
      if (s->refresh_again_) {
        s->refresh_again_ = false;
        s->requestSnapshot(gen);
      }
    });
  });
}

void HostSession::subscribe(quint64 gen) {
  std::optional<std::uint64_t> since;
  if (have_seq_) since = last_seq_;
  bool fresh = !have_seq_;
  auto b = io_->bridge;
  io_->client->Subscribe(
      since,
      [b, gen](const json& e) { PostToQt(b, [gen, e](HostSession* s) { s->handleEvent(gen, e); }); },
      [b, gen, fresh](control::AsyncControlClient::CallResult r) {
        PostToQt(b, [gen, fresh, r = std::move(r)](HostSession* s) {
          if (gen != s->gen_ || !r.delivered) return;
          if (!r.reply.ok) {
            s->connectionLost(gen, ErrorText(r));
            return;
          }
          s->backoff_ms_ = s->backoff_min_ms_;
          s->setState(State::kOnline);
          // Without `since`, what changed between `status` and now is only partly in the
          // snapshot lines (no export_added): take the snapshot once more.
          if (fresh) s->requestSnapshot(gen);
        });
      });
}

void HostSession::handleEvent(quint64 gen, const json& e) {
  if (gen != gen_ || !e.is_object()) return;
  auto seq = e.find("seq");
  // Assigned, not maxed: after a `gap` (dstd restarted) the numbers start again.
  if (seq != e.end() && seq->is_number_unsigned()) {
    last_seq_ = seq->get<std::uint64_t>();
    have_seq_ = true;
  }
  emit eventReceived(e);
  if (e.value("initial", false)) return;  // snapshot lines: `status` already says this
  const std::string type = e.value("type", "");
  if ((type == "resync_progress" || type == "verify_progress") && patchProgress(e)) {
    emit snapshotChanged();
    return;
  }
  requestSnapshot(gen);  // any other change, and `gap`: a fresh snapshot
}

bool HostSession::patchProgress(const json& e) {
  auto arrays = snapshot_.find("arrays");
  if (arrays == snapshot_.end() || !arrays->is_array()) return false;
  const std::string name = e.value("array", "");
  for (json& a : *arrays) {
    if (a.value("name", "") != name) continue;
    static const char* const kFields[] = {"bytes_done", "bytes_total", "percent", "rate",
                                          "eta_seconds"};
    if (e.value("type", "") == "verify_progress") {
      json& v = a["verify"];
      if (!v.is_object()) v = json::object();
      for (const char* f : kFields)
        if (e.contains(f)) v[f] = e[f];
      v["state"] = "running";
      return true;
    }
    json& progress = a["progress"];
    if (!progress.is_array()) progress = json::array();
    json* entry = nullptr;
    for (json& p : progress)
      if (p.value("leg", -1) == e.value("leg", -2)) entry = &p;
    if (!entry) {
      progress.push_back({{"leg", e.value("leg", -1)}, {"leg_state", "resyncing"}});
      entry = &progress.back();
    }
    for (const char* f : kFields)
      if (e.contains(f)) (*entry)[f] = e[f];
    if (e.contains("state")) (*entry)["state"] = e["state"];
    return true;
  }
  return false;
}

void HostSession::call(const QString& method, const json& params, CallDone done) {
  if (!io_->client || !online()) {
    QTimer::singleShot(0, this, [done = std::move(done)] { done(false, json(), "offline"); });
    return;
  }
  auto b = io_->bridge;
  io_->client->Call(method.toStdString(), params,
                    [b, done = std::move(done)](control::AsyncControlClient::CallResult r) {
                      PostToQt(b, [done, r = std::move(r)](HostSession*) {
                        bool ok = r.delivered && r.reply.ok;
                        done(ok, ok ? r.reply.result : json(), ok ? QString() : ErrorText(r));
                      });
                    });
}

}  // namespace dst::gui
