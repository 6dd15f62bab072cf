// A server (Exporter or NbdServer) on in-memory transports, for the server fuzz targets: one
// server per process, one connection per fuzz input whose client sends the input bytes.  Run()
// returns once that connection has finished (the input ran out, or the server closed it).
//
// The exports are FakeDevices completing inline, so a run is deterministic and single-threaded.
#pragma once

#include <cstddef>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include "fake_device.h"
#include "mem_transport.h"

namespace dst::fuzz {

template <typename Server>
class ServerHarness {
 public:
  // `opts` gets its listener set here; `add` adds the exports to the new server.
  template <typename Options, typename AddExports>
  ServerHarness(Options opts, AddExports add) {
    opts.listener = [this](const net::Strand& ex) {
      auto l = std::make_unique<MemListener>(ex);
      listener_ = l.get();
      return l;
    };
    opts.stall_timeout = std::chrono::milliseconds(0);  // no timers: io.run() ends with the input
    opts.limits = net::ServerLimits::None();
    // Small pools and few slots: backpressure and the out-of-buffers paths are reached quickly.
    opts.max_payload = 64u << 10;
    opts.buffer_count = 4;
    opts.max_inflight_per_connection = 8;
    server_ = std::make_unique<Server>(io_, std::move(opts));
    add(*server_);
    if (!server_->Start().ok()) __builtin_trap();
  }

  void Run(const std::uint8_t* data, std::size_t size) {
    listener_->Push(std::string(reinterpret_cast<const char*>(data), size));
    ++expected_;
    io_.restart();
    io_.run();
    if (Finished()) return;
    // Work handed to another thread (the NBD server's metadata worker) posts back later: wait
    // for it, with a guard so the io_context does not stop meanwhile.  Ten seconds without the
    // connection finishing is a hang.
    auto guard = boost::asio::make_work_guard(io_);
    io_.restart();
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!Finished()) {
      if (std::chrono::steady_clock::now() > deadline) __builtin_trap();
      io_.run_one_for(std::chrono::milliseconds(1));
    }
  }

  static std::shared_ptr<test::FakeDevice> Device(std::uint64_t size, bool read_only_caps = false) {
    test::FakeDeviceOptions o;
    o.size = size;
    o.max_io_bytes = 64u << 10;
    if (read_only_caps) o.can_trim = o.can_write_zeroes = false;
    return std::make_shared<test::FakeDevice>(o);
  }

 private:
  bool Finished() const {
    const auto st = server_->Stats();
    return st.connections_total == expected_ && st.connections_open == 0;
  }

  boost::asio::io_context io_;
  MemListener* listener_ = nullptr;
  std::unique_ptr<Server> server_;
  std::uint64_t expected_ = 0;
};

}  // namespace dst::fuzz
