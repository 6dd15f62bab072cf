#include "fake_device.h"

#include <chrono>
#include <cstring>
#include <random>

namespace dst::test {

FakeDevice::FakeDevice(FakeDeviceOptions o) : o_(std::move(o)), data_(o_.size, 0) {
  delay_us_ = o_.delay_us;
  ring_.assign(8192, nullptr);
  if (o_.async) worker_ = std::thread([this] { Worker(); });
}

FakeDevice::~FakeDevice() {
  {
    std::lock_guard<std::mutex> l(q_mu_);
    stop_ = true;
    held_ = false;
  }
  q_cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

DeviceInfo FakeDevice::Info() const {
  DeviceInfo i;
  i.size = o_.size;
  i.logical_block_size = o_.block_size;
  i.max_io_bytes = o_.max_io_bytes;
  i.can_flush = o_.can_flush;
  i.can_fua = o_.can_fua;
  i.can_trim = o_.can_trim;
  i.can_write_zeroes = o_.can_write_zeroes;
  return i;
}

std::string FakeDevice::Describe() const { return o_.name; }

void FakeDevice::SetOnSubmit(std::function<void(const IoRequest&)> fn) {
  std::lock_guard<std::mutex> l(hook_mu_);
  on_submit_ = std::move(fn);
  have_hook_ = static_cast<bool>(on_submit_);
}

void FakeDevice::Hold(bool hold) {
  {
    std::lock_guard<std::mutex> l(q_mu_);
    held_ = hold;
  }
  q_cv_.notify_all();
}

int FakeDevice::DropHeld() {
  std::vector<IoRequest*> dropped;
  {
    std::lock_guard<std::mutex> l(q_mu_);
    while (q_count_ > 0) {
      dropped.push_back(ring_[q_head_]);
      q_head_ = (q_head_ + 1) % ring_.size();
      --q_count_;
    }
  }
  for (IoRequest* r : dropped) {
    in_flight_.fetch_sub(1);
    r->done(r, Status::IoError("dropped"));
  }
  return static_cast<int>(dropped.size());
}

void FakeDevice::Submit(IoRequest* req) {
  in_flight_.fetch_add(1);
  // The device owns `scratch` while it holds the request (block_device.h); scribble on it as
  // RemoteDevice does, so a layer that keeps its own state there fails its tests
  // (regression: MirrorDevice kept the leg slot in child->scratch).
  req->scratch = 0xdeadbeefdeadbeefull;
  if (have_hook_) {
    std::lock_guard<std::mutex> l(hook_mu_);
    if (on_submit_) on_submit_(*req);
  }
  if (!o_.async) {
    Handle(req);
    return;
  }
  {
    std::lock_guard<std::mutex> l(q_mu_);
    if (q_count_ == ring_.size()) std::abort();  // test bug: too many in flight
    ring_[(q_head_ + q_count_) % ring_.size()] = req;
    ++q_count_;
  }
  q_cv_.notify_one();
}

void FakeDevice::Worker() {
  std::unique_lock<std::mutex> l(q_mu_);
  while (true) {
    q_cv_.wait(l, [&] { return stop_ || (!held_ && q_count_ > 0); });
    if (q_count_ == 0 && stop_) return;
    if (held_ && !stop_) continue;
    IoRequest* r = ring_[q_head_];
    q_head_ = (q_head_ + 1) % ring_.size();
    --q_count_;
    l.unlock();
    std::uint32_t d = delay_us_;
    if (d) std::this_thread::sleep_for(std::chrono::microseconds(d));
    Handle(r);
    l.lock();
  }
}

void FakeDevice::Handle(IoRequest* req) {
  Status st = ValidateRequest(Info(), *req);
  if (st.ok()) {
    switch (req->op) {
      case IoOp::kRead:
        if (fail_reads_) {
          st = Status::IoError();
          break;
        }
        {
          std::lock_guard<std::mutex> l(data_mu_);
          std::memcpy(req->data, data_.data() + req->offset, req->length);
        }
        reads_.fetch_add(1);
        bytes_read_.fetch_add(req->length);
        break;
      case IoOp::kWrite:
      case IoOp::kTrim:
      case IoOp::kWriteZeroes:
        if (fail_writes_) {
          st = Status::IoError();
          break;
        }
        {
          std::lock_guard<std::mutex> l(data_mu_);
          if (req->op == IoOp::kWrite)
            std::memcpy(data_.data() + req->offset, req->data, req->length);
          else
            std::memset(data_.data() + req->offset, 0, req->length);
        }
        writes_.fetch_add(1);
        bytes_written_.fetch_add(req->length);
        break;
      case IoOp::kFlush:
        if (fail_flush_ || !o_.can_flush) {
          st = fail_flush_ ? Status::IoError() : Status::NotSupported();
          break;
        }
        flushes_.fetch_add(1);
        break;
    }
  }
  in_flight_.fetch_sub(1);
  req->done(req, st);
}

std::vector<char> FakeDevice::Contents() const {
  std::lock_guard<std::mutex> l(data_mu_);
  return data_;
}

void FakeDevice::Poke(std::uint64_t off, const void* p, std::size_t n) {
  std::lock_guard<std::mutex> l(data_mu_);
  std::memcpy(data_.data() + off, p, n);
}

void FakeDevice::Peek(std::uint64_t off, void* p, std::size_t n) const {
  std::lock_guard<std::mutex> l(data_mu_);
  std::memcpy(p, data_.data() + off, n);
}

void FakeDevice::FillRandom(std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::lock_guard<std::mutex> l(data_mu_);
  for (auto& c : data_) c = static_cast<char>(rng());
}

void FakeDevice::ResetCounters() {
  reads_ = writes_ = flushes_ = bytes_written_ = bytes_read_ = 0;
}

void FakeDevice::WaitIdle() {
  while (in_flight_.load() != 0) std::this_thread::sleep_for(std::chrono::microseconds(100));
}

bool FakeDevice::SetConnectCheck(const ConnectCheck& check) {
  if (!o_.reconnects) return false;
  std::lock_guard<std::mutex> l(check_mu_);  // waits for a running callback
  check_ = check.verify ? check : ConnectCheck{};
  return true;
}

bool FakeDevice::HasConnectCheck() const {
  std::lock_guard<std::mutex> l(check_mu_);
  return check_.verify != nullptr;
}

void FakeDevice::SetContents(std::vector<char> bytes) {
  bytes.resize(o_.size, 0);
  std::lock_guard<std::mutex> l(data_mu_);
  data_ = std::move(bytes);
}

Status FakeDevice::Reconnect() {
  std::lock_guard<std::mutex> l(check_mu_);
  if (!check_.verify) return Status::OK();
  std::vector<char> buf(check_.length);
  Peek(check_.offset, buf.data(), buf.size());
  Status st = check_.verify(check_.arg, buf.data(), check_.length);
  if (st.ok()) return st;
  DropHeld();  // requests waiting for this connection fail
  if (check_.rejected) check_.rejected(check_.arg, st);
  return st;
}

}  // namespace dst::test
