// ClientDevice: what the reconnecting network clients (RemoteDevice over DST, NbdClientDevice
// over NBD) have in common: their options, their counters and their BlockDevice surface.  The
// machinery behind it is one core (netdriver/src/client_core.h; its state diagram is there and
// in docs/architecture.md); each client adds its protocol.
//
// Threading: every method from any thread; the connection lives on the io_context given to
// the client's Connect().
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "dst/block_device.h"
#include "dst/net/transport.h"

namespace dst::net {

class ClientCore;

// Options every client takes (each client's options struct adds its address and protocol).
struct ClientOptions {
  std::string host = "127.0.0.1";
  std::uint32_t queue_depth = 64;
  bool batching = true;
  std::chrono::milliseconds keepalive_interval{1000};
  std::chrono::milliseconds keepalive_timeout{5000};
  std::chrono::milliseconds io_timeout{60000};
  std::chrono::milliseconds connect_timeout{5000};
  std::chrono::milliseconds reconnect_min{100};
  std::chrono::milliseconds reconnect_max{2000};
  // Makes the Connector that dials the peer (called on the client's strand, once per client).
  // Empty: TCP to host:port, or AF_UNIX for a socket path.  TLS and tests plug in here.
  std::function<std::unique_ptr<Connector>(const Strand&)> connector;
};

// Counters every client reports (each client's Stats struct adds its protocol's own).
struct ClientStats {
  std::string state;  // "connected", "reconnecting", "failing", "closed" ("connecting" only inside Connect())
  std::uint64_t reconnects = 0;
  std::uint64_t resent = 0;          // requests re-sent after a reconnect
  std::uint64_t timeouts = 0;        // requests failed with EIO after io_timeout
  std::uint64_t bad_replies = 0;     // replies that broke the protocol (wrong length, lying chunks)
  std::uint64_t check_failures = 0;  // connections whose connect check failed
  std::uint32_t inflight = 0;
  std::uint64_t requests = 0;
  // Send batching: frames, the system calls that carried them, and their ratio.
  std::uint64_t frames_sent = 0, send_calls = 0;
  double frames_per_call = 0;
};

class ClientDevice : public BlockDevice {
 public:
  ~ClientDevice() override;  // Close()

  DeviceInfo Info() const override;
  void Submit(IoRequest* req) override;
  std::string Describe() const override;  // the URI
  // See block_device.h.  The check READ goes out alone on each new connection.  The callbacks
  // run on the connection strand under an internal mutex that SetConnectCheck() also takes: once
  // it returns no old callback runs and none runs again.  Never call it holding a lock that
  // verify()/rejected() take (calling it from inside a callback, on the strand, is fine).
  bool SetConnectCheck(const ConnectCheck& check) override;
  // Called on every connection state change ("connecting", "connected", "reconnecting",
  // "failing", "closed": ClientStats::state), on the connection strand, as it happens (so the
  // daemon pushes volume states instead of polling them).  Keep it short and non-blocking; it
  // runs under an internal mutex that this setter also takes (after it returns, the old one
  // never runs again).  An empty function removes it.
  using StateListener = std::function<void(const char* from, const char* to)>;
  void SetStateListener(StateListener listener);
  // The connection state now (the name the listener and ClientStats::state use).
  const char* State() const;
  DeviceHealth Health() const override;
  // Fails every pending request with EIO and stops reconnecting (after the protocol's goodbye).
  void Close();

 protected:
  explicit ClientDevice(std::shared_ptr<ClientCore> core);
  // The common counters; keepalive probes sent go to *keepalives when given.
  ClientStats CoreStats(std::uint64_t* keepalives = nullptr) const;

 private:
  std::shared_ptr<ClientCore> core_;
};

}  // namespace dst::net
