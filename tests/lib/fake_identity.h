// Fake authenticated peers for the server unit tests (header only): a Listener that wraps TCP and
// gives each accepted transport an identity() chosen by its source address, the way TLS would
// after a handshake.  Clients pick their identity by binding 127.0.0.x (DialLoopbackFrom).
//
//   std::atomic<std::uint16_t> port{0};
//   opts.listener = IdentityListenerFactory(io, {{"127.0.0.2", "alice"}, {"127.0.0.3", "bob"}}, &port);
//   // 127.0.0.1 (or any address not in the map) stays unauthenticated ("anonymous").
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <string>

#include "dst/net/tcp_transport.h"
#include "dst/net/transport.h"

namespace dst::test {

// Forwards everything to the wrapped transport; identity() is fixed at accept.
class IdentityTransport final : public net::Transport {
 public:
  IdentityTransport(std::unique_ptr<net::Transport> t, std::string identity)
      : t_(std::move(t)), identity_(std::move(identity)) {}
  std::size_t SendFrames(const net::TxFrame* head, std::size_t offset, const net::SendLimits& lim,
                         boost::system::error_code& ec) override {
    return t_->SendFrames(head, offset, lim, ec);
  }
  void AsyncWaitWritable(net::IoCallback done) override { t_->AsyncWaitWritable(std::move(done)); }
  const net::Strand& strand() const override { return t_->strand(); }
  void AsyncReadSome(boost::asio::mutable_buffer b, net::IoCallback done) override { t_->AsyncReadSome(b, std::move(done)); }
  void AsyncRead(boost::asio::mutable_buffer b, net::IoCallback done) override { t_->AsyncRead(b, std::move(done)); }
  void AsyncWrite(boost::asio::const_buffer b, net::IoCallback done) override { t_->AsyncWrite(b, std::move(done)); }
  void Shutdown(ShutdownHow how) override { t_->Shutdown(how); }
  void Close() override { t_->Close(); }
  bool is_open() const override { return t_->is_open(); }
  const std::string& peer() const override { return t_->peer(); }
  const std::string& identity() const override { return identity_; }

 private:
  std::unique_ptr<net::Transport> t_;
  const std::string identity_;
};

class IdentityListener final : public net::Listener {
 public:
  IdentityListener(std::unique_ptr<net::TcpListener> l, std::map<std::string, std::string> ids)
      : l_(std::move(l)), ids_(std::move(ids)) {}
  void AsyncAccept(AcceptCallback done) override {
    l_->AsyncAccept([this, done = std::move(done)](const boost::system::error_code& ec,
                                                  std::unique_ptr<net::Transport> t) {
      if (ec) return done(ec, nullptr);
      const std::string& peer = t->peer();
      auto it = ids_.find(peer.substr(0, peer.rfind(':')));
      std::string id = it == ids_.end() ? std::string() : it->second;
      done(ec, std::make_unique<IdentityTransport>(std::move(t), std::move(id)));
    });
  }
  void Close() override { l_->Close(); }
  std::string local_name() const override { return l_->local_name(); }

 private:
  std::unique_ptr<net::TcpListener> l_;
  const std::map<std::string, std::string> ids_;
};

// A ListenerFactory on 127.0.0.1 (any free port, stored in *port when the server starts) whose
// peers from the addresses in `ids` authenticate as the mapped identities.
inline net::ListenerFactory IdentityListenerFactory(boost::asio::io_context& io,
                                                    std::map<std::string, std::string> ids,
                                                    std::atomic<std::uint16_t>* port) {
  return [&io, ids = std::move(ids), port](const net::Strand& ex) -> std::unique_ptr<net::Listener> {
    auto l = net::TcpListener::Open(io, ex, "127.0.0.1", 0);
    if (!l.ok()) return nullptr;
    port->store(l.value()->port());
    return std::make_unique<IdentityListener>(std::move(l.value()), ids);
  };
}

}  // namespace dst::test
