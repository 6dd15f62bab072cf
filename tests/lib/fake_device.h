// FakeDevice: an in-memory BlockDevice for unit tests, with injectable failures, delays,
// completion on a worker thread, a submit hook and I/O counters.
//
// Inline mode completes every request inside Submit(); async mode queues it to one worker thread
// (fixed ring, no allocation per I/O) that optionally sleeps delay_us first.  Hold(true) parks
// async requests until Hold(false).
//
// Threading: all methods are thread-safe.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "dst/block_device.h"

namespace dst::test {

struct FakeDeviceOptions {
  std::uint64_t size = 1 << 20;
  std::uint32_t block_size = 512;
  std::uint32_t max_io_bytes = 1u << 20;
  bool async = false;
  std::uint32_t delay_us = 0;
  bool can_flush = true;
  bool can_fua = true;
  bool can_trim = true;
  bool can_write_zeroes = true;
  std::string name = "fake";
  bool reconnects = false;  // accepts a ConnectCheck (as a network device does); see Reconnect()
};

class FakeDevice : public BlockDevice {
 public:
  explicit FakeDevice(FakeDeviceOptions o = {});
  ~FakeDevice() override;

  DeviceInfo Info() const override;
  void Submit(IoRequest* req) override;
  std::string Describe() const override;

  // Failures: the matching requests complete with EIO without touching data.
  void SetFailReads(bool f) { fail_reads_ = f; }
  void SetFailWrites(bool f) { fail_writes_ = f; }
  void SetFailFlush(bool f) { fail_flush_ = f; }
  void SetFailAll(bool f) { fail_reads_ = fail_writes_ = fail_flush_ = f; }
  void SetDelayMicros(std::uint32_t us) { delay_us_ = us; }
  void Hold(bool hold);
  // Completes every parked (held) request with EIO without applying it, as if the machine died
  // before the device saw it.  Returns how many were dropped.
  int DropHeld();
  // Called in Submit() before the request is handled (any thread).
  void SetOnSubmit(std::function<void(const IoRequest&)> fn);

  // Reconnecting devices (opts.reconnects): SetConnectCheck stores the check; Reconnect() acts
  // as a new connection to a peer that now serves the current contents: it runs verify() on the
  // checked range and, on an error, fails every held (queued) request with EIO and calls
  // rejected().  Returns verify()'s answer (OK without a check).
  bool SetConnectCheck(const ConnectCheck& check) override;
  Status Reconnect();
  bool HasConnectCheck() const;
  // Replaces the whole contents (e.g. a blank or foreign image behind the same address).
  void SetContents(std::vector<char> bytes);

  // Direct access to the backing bytes (bypasses counters and failures).
  std::vector<char> Contents() const;
  void Poke(std::uint64_t off, const void* p, std::size_t n);
  void Peek(std::uint64_t off, void* p, std::size_t n) const;
  void FillRandom(std::uint64_t seed);

  std::uint64_t reads() const { return reads_; }
  std::uint64_t writes() const { return writes_; }
  std::uint64_t flushes() const { return flushes_; }
  std::uint64_t bytes_written() const { return bytes_written_; }
  std::uint64_t bytes_read() const { return bytes_read_; }
  std::uint32_t in_flight() const { return in_flight_; }
  void ResetCounters();
  // Waits until no request is queued or in progress.
  void WaitIdle();

 private:
  void Handle(IoRequest* req);
  void Worker();

  FakeDeviceOptions o_;
  mutable std::mutex data_mu_;
  std::vector<char> data_;
  std::atomic<bool> fail_reads_{false}, fail_writes_{false}, fail_flush_{false};
  std::atomic<std::uint32_t> delay_us_{0};
  std::atomic<std::uint64_t> reads_{0}, writes_{0}, flushes_{0}, bytes_written_{0}, bytes_read_{0};
  std::atomic<std::uint32_t> in_flight_{0};
  std::mutex hook_mu_;
  std::function<void(const IoRequest&)> on_submit_;
  std::atomic<bool> have_hook_{false};
  mutable std::mutex check_mu_;  // held while a check callback runs
  ConnectCheck check_;

  std::mutex q_mu_;
  std::condition_variable q_cv_;
  std::vector<IoRequest*> ring_;
  std::size_t q_head_ = 0, q_count_ = 0;
  bool held_ = false;
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace dst::test
