#include "client_harness.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>

#include <boost/asio/error.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/post.hpp>

#include "mem_transport.h"

namespace dst::fuzz {

namespace asio = boost::asio;

const std::vector<ClientOp> kClientOps = {
    {IoOp::kFlush, 0, 0},
    {IoOp::kRead, 0, 4096},
    {IoOp::kWrite, 4096, 4096, kIoFua},
    {IoOp::kRead, 8192, 8192},
    {IoOp::kTrim, 16384, 4096},
    {IoOp::kWriteZeroes, 20480, 4096, kIoNoUnmap},
    {IoOp::kRead, 512, 512},
};

namespace {

class GatedTransport;

// Holds the data phase's first receive until the requests are on the wire.
struct Gate {
  std::atomic<std::size_t> expected{SIZE_MAX};  // request bytes to wait for (set by the rig)
  std::size_t sent = 0;                         // strand: request bytes sent so far
  GatedTransport* transport = nullptr;          // strand: the run's connection, while it lives
};

// A MemTransport whose AsyncReadSome (used only after the handshake) waits for the gate.
class GatedTransport final : public net::Transport {
 public:
  GatedTransport(const net::Strand& s, std::string input, std::shared_ptr<Gate> gate)
      : mem_(s, std::move(input)), gate_(std::move(gate)) {
    gate_->transport = this;
  }
  ~GatedTransport() override {
    if (gate_->transport == this) gate_->transport = nullptr;
  }

  const net::Strand& strand() const override { return mem_.strand(); }
  void AsyncReadSome(asio::mutable_buffer buf, net::IoCallback done) override {
    if (open_) return mem_.AsyncReadSome(buf, std::move(done));
    parked_buf_ = buf;
    parked_ = std::move(done);
  }
  void AsyncRead(asio::mutable_buffer buf, net::IoCallback done) override { mem_.AsyncRead(buf, std::move(done)); }
  void AsyncWrite(asio::const_buffer buf, net::IoCallback done) override { mem_.AsyncWrite(buf, std::move(done)); }
  std::size_t SendFrames(const net::TxFrame* head, std::size_t offset, const net::SendLimits& lim,
                         boost::system::error_code& ec) override {
    const std::size_t n = mem_.SendFrames(head, offset, lim, ec);
    gate_->sent += n;
    MaybeOpen();
    return n;
  }
  void AsyncWaitWritable(net::IoCallback done) override { mem_.AsyncWaitWritable(std::move(done)); }
  void Shutdown(ShutdownHow how) override {
    mem_.Shutdown(how);
    Abort();
  }
  void Close() override {
    mem_.Close();
    Abort();
  }
  bool is_open() const override { return mem_.is_open(); }
  const std::string& peer() const override { return mem_.peer(); }

  void MaybeOpen() {
    if (open_ || gate_->sent < gate_->expected.load()) return;
    open_ = true;
    if (parked_) mem_.AsyncReadSome(parked_buf_, std::move(parked_));
  }

 private:
  // A parked receive ends like a socket's would: with an error, posted.
  void Abort() {
    if (!parked_) return;
    asio::post(mem_.strand(), [done = std::move(parked_)]() mutable { done(asio::error::operation_aborted, 0); });
  }

  MemTransport mem_;
  std::shared_ptr<Gate> gate_;
  bool open_ = false;
  asio::mutable_buffer parked_buf_;
  net::IoCallback parked_;
};

// Hands out one GatedTransport over the input; every later connect is refused.
class OneShotConnector final : public net::Connector {
 public:
  OneShotConnector(const net::Strand& s, std::string input, std::shared_ptr<Gate> gate)
      : strand_(s), input_(std::move(input)), gate_(std::move(gate)) {}
  ~OneShotConnector() override { Cancel(); }

  void AsyncConnect(std::chrono::milliseconds, ConnectCallback done) override {
    auto t = std::make_shared<std::unique_ptr<net::Transport>>();
    Status st = Status::InvalidArgument("fuzz: one connection per input");
    if (!used_) {
      used_ = true;
      *t = std::make_unique<GatedTransport>(strand_, std::move(input_), gate_);
      st = Status::OK();
    }
    asio::post(strand_, [epoch = epoch_, ep = *epoch_, done = std::move(done), t, st]() {
      if (*epoch == ep) done(st, std::move(*t));
    });
  }
  void Cancel() override { ++*epoch_; }
  std::string target() const override { return "fuzz input"; }

 private:
  net::Strand strand_;
  std::string input_;
  std::shared_ptr<Gate> gate_;
  bool used_ = false;
  std::shared_ptr<std::uint64_t> epoch_ = std::make_shared<std::uint64_t>(0);
};

[[noreturn]] void Hang() { __builtin_trap(); }

}  // namespace

struct ClientRig::Impl {
  asio::io_context io;
  asio::executor_work_guard<asio::io_context::executor_type> guard{io.get_executor()};
  std::thread thread{[this] { io.run(); }};
  std::shared_ptr<Gate> gate;
  const bool verbose = std::getenv("DST_FUZZ_VERBOSE") != nullptr;  // for checking seeds

  std::mutex mu;
  std::condition_variable cv;
  bool gone = false;        // the connection is no longer "connected"
  std::size_t left = 0;     // requests not completed yet
  std::vector<int> completions;
  std::vector<std::string> outcomes;  // DST_FUZZ_VERBOSE: what each request ended with

  struct Req {
    IoRequest q;
    Impl* rig;
    std::size_t index;
  };
  static void Done(IoRequest* r, Status st) {
    auto* req = static_cast<Req*>(r->ctx);
    Impl* rig = req->rig;
    std::lock_guard<std::mutex> l(rig->mu);
    if (++rig->completions[req->index] != 1) __builtin_trap();  // completed twice
    if (rig->verbose) rig->outcomes[req->index] = st.ToString();
    --rig->left;
    rig->cv.notify_all();
  }
};

ClientRig::ClientRig() : impl_(new Impl) {}

ClientRig::~ClientRig() {
  impl_->guard.reset();
  impl_->io.stop();
  impl_->thread.join();
  delete impl_;
}

boost::asio::io_context& ClientRig::io() { return impl_->io; }

void ClientRig::Prepare(net::ClientOptions* o, std::string input) {
  auto gate = std::make_shared<Gate>();
  impl_->gate = gate;
  o->connector = [input = std::move(input), gate](const net::Strand& s) {
    return std::make_unique<OneShotConnector>(s, input, gate);
  };
  // No timer may decide anything within a run: no keepalive, no io_timeout.  A failed first
  // connect gives up at once (connect_timeout at the backoff) instead of retrying.
  o->queue_depth = 8;
  o->keepalive_interval = std::chrono::hours(1);
  o->keepalive_timeout = std::chrono::hours(1);
  o->io_timeout = std::chrono::hours(1);
  o->connect_timeout = std::chrono::milliseconds(1);
  o->reconnect_min = std::chrono::milliseconds(1);
  o->reconnect_max = std::chrono::milliseconds(1);
}

void ClientRig::Run(net::ClientDevice& dev, const std::vector<ClientOp>& ops, FrameBytesFn frame_bytes) {
  Impl& r = *impl_;
  {
    std::lock_guard<std::mutex> l(r.mu);
    r.gone = false;
    r.left = ops.size();
    r.completions.assign(ops.size(), 0);
    r.outcomes.assign(ops.size(), "");
  }
  dev.SetStateListener([&r](const char*, const char* to) {
    if (std::strcmp(to, "connected") == 0) return;
    std::lock_guard<std::mutex> l(r.mu);
    r.gone = true;
    r.cv.notify_all();
  });
  if (std::strcmp(dev.State(), "connected") != 0) {
    std::lock_guard<std::mutex> l(r.mu);
    r.gone = true;
  }
  std::vector<Impl::Req> reqs(ops.size());
  std::vector<std::vector<char>> bufs(ops.size());
  std::size_t expected = 0;
  for (std::size_t i = 0; i < ops.size(); ++i) {
    bufs[i].assign(ops[i].length, 'w');
    Impl::Req& q = reqs[i];
    q.rig = &r;
    q.index = i;
    q.q.op = ops[i].op;
    q.q.flags = ops[i].flags;
    q.q.offset = ops[i].offset;
    q.q.length = ops[i].length;
    q.q.data = bufs[i].data();
    q.q.done = &Impl::Done;
    q.q.ctx = &q;
    dev.Submit(&q.q);
    // Refused at submission (done already ran): nothing goes on the wire for it.  Nothing else
    // can complete a request yet, since no reply is read before the gate opens.
    std::lock_guard<std::mutex> l(r.mu);
    if (r.completions[i] == 0) expected += frame_bytes(ops[i]);
  }
  r.gate->expected = expected;
  asio::post(r.io, [gate = r.gate] {
    // Not on the connection's strand, but the rig's io_context has one thread.
    if (gate->transport) gate->transport->MaybeOpen();
  });
  {
    std::unique_lock<std::mutex> l(r.mu);
    if (!r.cv.wait_for(l, std::chrono::seconds(10), [&] { return r.left == 0 || r.gone; })) Hang();
  }
  dev.SetStateListener(nullptr);
  dev.Close();  // fails what is left, synchronously
  std::lock_guard<std::mutex> l(r.mu);
  if (r.left != 0) Hang();  // a request Close() did not end
  if (r.verbose) {
    for (std::size_t i = 0; i < ops.size(); ++i) std::fprintf(stderr, "op %zu: %s\n", i, r.outcomes[i].c_str());
  }
}

}  // namespace dst::fuzz
