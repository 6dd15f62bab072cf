// nbd_serve: a bench-only NBD server.  Runs dst::net::NbdServer in-process over a FileDevice,
// the same code dstd serves NBD with, so the protocol rows of bench/nbd_bench.sh can run before
// (or without) dstd's NBD port.  Not a product binary.
//
//   nbd_serve --file PATH [--port N] [--name NAME] [--io-threads N] [--file-threads N]
//
// Prints "port N" on stdout once it listens; runs until SIGTERM/SIGINT, then drains.
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>

#include "dst/file_device.h"
#include "dst/net/nbd_server.h"

int main(int argc, char** argv) {
  std::string file, name = "vol";
  int port = 0, io_threads = 2, file_threads = 4;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "nbd_serve: %s needs a value\n", a.c_str());
        std::exit(64);
      }
      return argv[++i];
    };
    if (a == "--file") file = next();
    else if (a == "--port") port = std::atoi(next());
    else if (a == "--name") name = next();
    else if (a == "--io-threads") io_threads = std::atoi(next());
    else if (a == "--file-threads") file_threads = std::atoi(next());
    else {
      std::fprintf(stderr, "usage: nbd_serve --file PATH [--port N] [--name NAME] [--io-threads N] [--file-threads N]\n");
      return 64;
    }
  }
  if (file.empty() || io_threads < 1 || port < 0 || port > 65535) {
    std::fprintf(stderr, "nbd_serve: --file is required\n");
    return 64;
  }
  dst::FileDeviceOptions fo;
  fo.io_threads = file_threads;
  auto dev = dst::FileDevice::Open(file, fo);
  if (!dev.ok()) {
    std::fprintf(stderr, "nbd_serve: %s\n", dev.status().ToString().c_str());
    return 74;
  }
  boost::asio::io_context io;
  dst::net::NbdServerOptions o;
  o.port = static_cast<std::uint16_t>(port);
  dst::net::NbdServer srv(io, o);
  dst::Status st = srv.Start();
  if (st.ok()) {
    dst::net::NbdExportSpec spec;
    spec.name = name;
    spec.device = *dev;
    st = srv.AddExport(std::move(spec));
  }
  if (!st.ok()) {
    std::fprintf(stderr, "nbd_serve: %s\n", st.ToString().c_str());
    return 69;
  }
  std::printf("port %u\n", srv.port());
  std::fflush(stdout);

  auto work = boost::asio::make_work_guard(io);
  boost::asio::signal_set sigs(io, SIGTERM, SIGINT);
  sigs.async_wait([&](const boost::system::error_code&, int) {
    srv.Drain([&](dst::Status) {
      work.reset();
      io.stop();
    });
  });
  std::vector<std::thread> threads;
  for (int i = 1; i < io_threads; ++i) threads.emplace_back([&] { io.run(); });
  io.run();
  for (auto& t : threads) t.join();
  return 0;
}
