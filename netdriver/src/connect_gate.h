// Used by the reconnecting-client core (client_core.h): the connect check of
// block_device.h and the Health() bookkeeping.  Internal header.
//
// ConnectGate: the installed ConnectCheck and its version, under a recursive mutex that is also
// held while verify()/rejected() run (on the device's strand).  Set() takes the same mutex, so
// when it returns no old callback is running and none runs again; calling Set() from inside a
// callback is allowed (same thread), calling it while holding a lock the callbacks take is not.
//
// HealthClock: when the backing became unreachable (0 = reachable) and why, readable from any
// thread without I/O.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>

#include "dst/block_device.h"
#include "dst/status.h"

namespace dst::net {

class ConnectGate {
 public:
  void Set(const ConnectCheck& c) {
    std::lock_guard<std::recursive_mutex> l(mu_);
    check_ = c.verify ? c : ConnectCheck{};
    ++version_;
  }
  // The check to run on a new connection (verify == nullptr: none installed).
  ConnectCheck Begin() {
    std::lock_guard<std::recursive_mutex> l(mu_);
    used_ = version_;
    return check_;
  }
  enum class Verdict { kRestart, kOk, kRejected };
  // kRestart: the check was replaced or removed while its READ ran (begin again).
  Verdict Verify(Status read_status, const char* data, std::uint32_t len, Status* why) {
    {
      std::lock_guard<std::recursive_mutex> l(mu_);
      if (version_ != used_) return Verdict::kRestart;
      if (read_status.ok()) read_status = check_.verify(check_.arg, data, len);
    }
    *why = std::move(read_status);
    return why->ok() ? Verdict::kOk : Verdict::kRejected;
  }
  // After the held requests failed: tell the owner, unless it removed the check meanwhile.
  void Rejected(const Status& why) {
    std::lock_guard<std::recursive_mutex> l(mu_);
    if (version_ == used_ && check_.rejected) check_.rejected(check_.arg, why);
  }
  // The common end of a check READ on a reconnecting client.  `dev` supplies:
  //   RestartCheck()  the check was replaced or removed while its READ ran: begin again
  //   FailHeld(why)   fail the requests held for this connection with EIO (count, log)
  //   Closed()        the device was closed meanwhile (by FailHeld's completions or rejected())
  //   Admit()         send the held requests and new ones on this connection
  template <class Dev>
  void Finish(Dev&& dev, Status read_status, const char* data, std::uint32_t len) {
    Status why;
    switch (Verify(std::move(read_status), data, len, &why)) {
      case Verdict::kRestart:
        dev.RestartCheck();
        return;
      case Verdict::kRejected:
        dev.FailHeld(why);
        if (dev.Closed()) return;
        Rejected(why);
        if (dev.Closed()) return;
        break;
      case Verdict::kOk:
        break;
    }
    dev.Admit();
  }

 private:
  std::recursive_mutex mu_;
  ConnectCheck check_;
  std::uint64_t version_ = 0;
  std::uint64_t used_ = 0;
};

// ConnectGate::Finish's `dev` for ClientCore (client_core.h), which befriends this template:
// the members it names (checking_, StartCheck, Admit, check_failures_, FailAll, state_, Log).
template <class Core>
struct ClientCheckHooks {
  Core* d;
  void RestartCheck() {
    d->checking_ = false;
    if (!d->StartCheck()) d->Admit();
  }
  void FailHeld(const Status& why) {
    d->check_failures_.fetch_add(1, std::memory_order_relaxed);
    d->Log("connect check failed: " + why.ToString() + "; failing held requests");
    d->FailAll(Status::IoError("connect check failed: " + why.ToString()), false);
  }
  bool Closed() const { return d->state_ == Core::State::kClosed; }
  void Admit() { d->Admit(); }
};

class HealthClock {
 public:
  using Clock = std::chrono::steady_clock;
  // Keeps the earliest start of an outage.
  void Down(Clock::time_point since, std::string detail) {
    std::int64_t t = std::max<std::int64_t>(1, since.time_since_epoch().count());
    std::int64_t expected = 0;
    since_.compare_exchange_strong(expected, t, std::memory_order_relaxed);
    std::lock_guard<std::mutex> l(mu_);
    detail_ = std::move(detail);
  }
  void Detail(std::string detail) {
    std::lock_guard<std::mutex> l(mu_);
    detail_ = std::move(detail);
  }
  void Up() { since_.store(0, std::memory_order_relaxed); }
  DeviceHealth Get(bool connected, bool closed) const {
    DeviceHealth h;
    const std::int64_t since = since_.load(std::memory_order_relaxed);
    if (since == 0 && connected) return h;
    h.reachable = false;
    if (since != 0) {
      const auto d = Clock::now() - Clock::time_point(Clock::duration(since));
      h.outage_ms = static_cast<std::uint64_t>(
          std::max<std::int64_t>(0, std::chrono::duration_cast<std::chrono::milliseconds>(d).count()));
    }
    std::lock_guard<std::mutex> l(mu_);
    h.detail = closed ? std::string("closed") : detail_;
    return h;
  }

 private:
  std::atomic<std::int64_t> since_{0};
  mutable std::mutex mu_;
  std::string detail_;
};

}  // namespace dst::net
