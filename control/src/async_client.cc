#include "dst/control/async_client.h"

#include <array>
#include <atomic>
#include <deque>
#include <map>

#include <boost/asio/bind_executor.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>

namespace dst::control {

namespace asio = boost::asio;
using local = asio::local::stream_protocol;
using nlohmann::json;

// Everything below runs on strand_ (public methods post to it).
class AsyncControlClient::Impl : public std::enable_shared_from_this<Impl> {
 public:
  explicit Impl(asio::any_io_executor ex) : strand_(asio::make_strand(ex)), sock_(strand_) {}

  void Connect(std::string path, ConnectHandler done) {
    asio::post(strand_, [self = shared_from_this(), path = std::move(path),
                         done = std::move(done)]() mutable {
      if (self->state_ != State::kIdle) {
        done(std::make_error_code(std::errc::already_connected));
        return;
      }
      self->state_ = State::kConnecting;
      self->sock_.async_connect(
          local::endpoint(path),
          asio::bind_executor(self->strand_, [self, done = std::move(done)](
                                                 boost::system::error_code ec) {
            if (self->state_ != State::kConnecting) ec = asio::error::operation_aborted;
            if (ec) {
              self->state_ = State::kClosed;
              done(std::error_code(ec.value(), std::system_category()));
              return;
            }
            self->state_ = State::kOpen;
            done({});
            self->Read();
            self->Write();  // requests queued while connecting
          }));
    });
  }

  std::uint64_t Call(std::string method, json params, ReplyHandler done) {
    const std::uint64_t id = next_id_.fetch_add(1);
    std::string line = EncodeRequest(id, method, params);
    asio::post(strand_, [self = shared_from_this(), id, line = std::move(line),
                         done = std::move(done)]() mutable {
      if (self->state_ == State::kClosed || self->state_ == State::kIdle) {
        CallResult r;
        r.error = self->state_ == State::kIdle ? "not connected" : self->closed_why_;
        done(std::move(r));
        return;
      }
      self->pending_.emplace(id, std::move(done));
      self->out_.push_back(std::move(line));
      if (self->state_ == State::kOpen) self->Write();
    });
    return id;
  }

  void SetEvents(EventHandler fn) {
    asio::post(strand_, [self = shared_from_this(), fn = std::move(fn)]() mutable {
      self->on_event_ = std::move(fn);
    });
  }

  void OnClose(CloseHandler fn) {
    asio::post(strand_, [self = shared_from_this(), fn = std::move(fn)]() mutable {
      self->on_close_ = std::move(fn);
    });
  }

  void Close() {
    asio::post(strand_, [self = shared_from_this()] { self->Shut("closed by the client"); });
  }

  std::uint64_t last_seq() const { return last_seq_.load(std::memory_order_acquire); }

 private:
  enum class State { kIdle, kConnecting, kOpen, kClosed };

  void Read() {
    sock_.async_read_some(
        asio::buffer(buf_), asio::bind_executor(strand_, [self = shared_from_this()](
                                                             boost::system::error_code ec,
                                                             std::size_t n) {
          if (self->state_ != State::kOpen) return;
          if (ec) {
            self->Shut(ec == asio::error::eof ? "dstd closed the connection"
                                              : "cannot read from dstd: " + ec.message());
            return;
          }
          self->splitter_.Append(self->buf_.data(), n);
          std::string line;
          for (;;) {
            auto r = self->splitter_.Pop(&line);
            if (r == LineSplitter::Next::kNeedMore) break;
            if (r == LineSplitter::Next::kTooLong) return self->Shut("line from dstd too long");
            if (!self->OnLine(line)) return;
          }
          self->Read();
        }));
  }

  // false after closing the connection (a line that is neither a reply nor an event).
  bool OnLine(const std::string& line) {
    if (line.empty()) return true;
    json j = json::parse(line, nullptr, false);
    if (!j.is_object()) {
      Shut("dstd sent a line that is not a JSON object");
      return false;
    }
    // An event has a "type" and no "id" (an apply_step event of a failed step has an "error"
    // member too: it is no reply).
    const bool event = j.contains("type") && !j.contains("id");
    if (event || (!j.contains("result") && !j.contains("error"))) {
      if (!event) {
        Shut("dstd sent a line that is neither a reply nor an event");
        return false;
      }
      if (auto s = j.find("seq"); s != j.end() && s->is_number_unsigned() &&
                                  s->get<std::uint64_t>() > last_seq())
        last_seq_.store(s->get<std::uint64_t>(), std::memory_order_release);
      if (on_event_) on_event_(j);
      return true;
    }
    CallResult r;
    r.delivered = true;
    std::string why;
    if (!ParseReply(line, &r.reply, &why)) {
      Shut("malformed reply from dstd: " + why);
      return false;
    }
    // Our ids are integers; a reply to an unknown id (or id null: dstd could not parse a
    // request, which this client never sends) is a protocol error.
    auto it = r.reply.id.is_number_unsigned() ? pending_.find(r.reply.id.get<std::uint64_t>())
                                              : pending_.end();
    if (it == pending_.end()) {
      Shut("dstd replied to an unknown request id " + r.reply.id.dump() +
           (r.reply.ok ? "" : ": " + r.reply.error_message));
      return false;
    }
    ReplyHandler done = std::move(it->second);
    pending_.erase(it);
    done(std::move(r));
    return true;
  }

  void Write() {
    if (writing_ || out_.empty() || state_ != State::kOpen) return;
    writing_ = true;
    asio::async_write(sock_, asio::buffer(out_.front()),
                      asio::bind_executor(strand_, [self = shared_from_this()](
                                                       boost::system::error_code ec, std::size_t) {
                        self->writing_ = false;
                        if (self->state_ != State::kOpen) return;
                        if (ec) return self->Shut("cannot send to dstd: " + ec.message());
                        self->out_.pop_front();
                        self->Write();
                      }));
  }

  void Shut(const std::string& why) {
    if (state_ == State::kClosed) return;
    const bool was_open = state_ == State::kOpen;
    state_ = State::kClosed;
    closed_why_ = why;
    boost::system::error_code ignored;
    sock_.shutdown(local::socket::shutdown_both, ignored);
    sock_.close(ignored);
    auto pending = std::move(pending_);
    pending_.clear();
    for (auto& [id, done] : pending) {
      CallResult r;
      r.error = why;
      done(std::move(r));
    }
    on_event_ = nullptr;
    if (was_open && on_close_) {
      CloseHandler fn = std::move(on_close_);
      fn(why);
    }
  }

  asio::strand<asio::any_io_executor> strand_;
  local::socket sock_;
  State state_ = State::kIdle;
  std::string closed_why_ = "connection closed";
  std::array<char, 16384> buf_;
  LineSplitter splitter_;
  std::deque<std::string> out_;  // out_.front() is being written while writing_
  bool writing_ = false;
  std::map<std::uint64_t, ReplyHandler> pending_;
  EventHandler on_event_;
  CloseHandler on_close_;
  std::atomic<std::uint64_t> next_id_{1};
  std::atomic<std::uint64_t> last_seq_{0};
};

std::shared_ptr<AsyncControlClient> AsyncControlClient::Create(asio::any_io_executor ex) {
  return std::shared_ptr<AsyncControlClient>(
      new AsyncControlClient(std::make_shared<Impl>(std::move(ex))));
}

AsyncControlClient::AsyncControlClient(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

AsyncControlClient::~AsyncControlClient() { impl_->Close(); }

void AsyncControlClient::Connect(std::string path, ConnectHandler done) {
  impl_->Connect(std::move(path), std::move(done));
}

std::uint64_t AsyncControlClient::Call(std::string method, json params, ReplyHandler done) {
  return impl_->Call(std::move(method), std::move(params), std::move(done));
}

void AsyncControlClient::Subscribe(std::optional<std::uint64_t> since, EventHandler on_event,
                                   ReplyHandler done) {
  // The handler is installed (on the strand) before the request goes out, so no event line
  // can arrive without it.
  impl_->SetEvents(std::move(on_event));
  json p = json::object();
  if (since) p["since"] = *since;
  impl_->Call("events", std::move(p), std::move(done));
}

void AsyncControlClient::OnClose(CloseHandler fn) { impl_->OnClose(std::move(fn)); }

void AsyncControlClient::Close() { impl_->Close(); }

std::uint64_t AsyncControlClient::last_seq() const { return impl_->last_seq(); }

}  // namespace dst::control
