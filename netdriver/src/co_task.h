// Task<T>: a minimal C++20 coroutine type for connection handshakes.  Internal header.
//
// Handshakes are short conversations (a greeting, a few options, a reply) that read best as
// straight-line code.  Written as a Task they run on the connection's strand, suspended while a
// Transport read or write is outstanding, so no thread blocks on a peer and a TLS or raw-Ethernet
// Transport is used exactly like TCP.  Frames are allocated once per connection, never per I/O.
//
//   Task<Status> Negotiate(HandshakeIo& io) { Status st = co_await io.Read(buf, n); ... co_return st; }
//
// Life cycle of a task:
//
//   created (suspended) --Start(done) / co_await--> RUNNING <--resume-- I/O completion
//                                                      |
//                                                co_return v --> FINAL (v kept; the awaiting
//                                                                 task resumes, or done(ctx) runs)
//   ~Task destroys the frame (and with it every nested task it is awaiting) in any state.
//
// Lazy start and symmetric transfer: a nested `co_await Child()` starts the child and resumes
// the parent from the child's final suspend, without growing the stack.
#pragma once

#include <coroutine>
#include <exception>
#include <utility>

// DST_RETURN_IF_ERROR for tasks: DST_CO_RETURN_IF_ERROR(co_await io.Read(buf, n));
#define DST_CO_RETURN_IF_ERROR(expr)       \
  do {                                     \
    ::dst::Status _dst_st = (expr);        \
    if (!_dst_st.ok()) co_return _dst_st;  \
  } while (0)

namespace dst::net {

template <typename T>
class [[nodiscard]] Task {
 public:
  struct promise_type;
  using Handle = std::coroutine_handle<promise_type>;

  struct promise_type {
    T value{};
    std::coroutine_handle<> continuation;  // the awaiting task, if any
    void (*on_done)(void* ctx) = nullptr;   // the root's completion, if started with Start()
    void* ctx = nullptr;

    Task get_return_object() { return Task(Handle::from_promise(*this)); }
    std::suspend_always initial_suspend() noexcept { return {}; }
    struct FinalAwaiter {
      bool await_ready() noexcept { return false; }
      std::coroutine_handle<> await_suspend(Handle h) noexcept {
        promise_type& p = h.promise();
        if (p.continuation) return p.continuation;
        if (p.on_done) p.on_done(p.ctx);  // the frame is suspended: done() may read value()
        return std::noop_coroutine();
      }
      void await_resume() noexcept {}
    };
    FinalAwaiter final_suspend() noexcept { return {}; }
    template <typename U>
    void return_value(U&& v) {
      value = std::forward<U>(v);
    }
    void unhandled_exception() { std::terminate(); }  // handshakes report errors as values
  };

  Task() = default;
  Task(Task&& o) noexcept : h_(std::exchange(o.h_, {})) {}
  Task& operator=(Task&& o) noexcept {
    if (this != &o) {
      Reset();
      h_ = std::exchange(o.h_, {});
    }
    return *this;
  }
  Task(const Task&) = delete;
  Task& operator=(const Task&) = delete;
  ~Task() { Reset(); }

  // Runs a root task until its first suspension; done(ctx) runs when it returns (possibly inside
  // Start, possibly later from an I/O completion).
  void Start(void (*done)(void* ctx), void* ctx) {
    h_.promise().on_done = done;
    h_.promise().ctx = ctx;
    h_.resume();
  }
  bool valid() const { return static_cast<bool>(h_); }
  bool done() const { return h_ && h_.done(); }
  T& value() { return h_.promise().value; }
  void Reset() {
    if (h_) h_.destroy();
    h_ = {};
  }

  // Awaiting a task starts it and yields its value.
  bool await_ready() const noexcept { return false; }
  std::coroutine_handle<> await_suspend(std::coroutine_handle<> awaiting) noexcept {
    h_.promise().continuation = awaiting;
    return h_;
  }
  T await_resume() { return std::move(h_.promise().value); }

 private:
  explicit Task(Handle h) : h_(h) {}
  Handle h_;
};

}  // namespace dst::net
