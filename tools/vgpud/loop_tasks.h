#pragma once
// Runs work on the libevent loop thread for other threads (the FUSE tree's thread, the
// management worker). Every vGPU's listener, doorbell event and device model belong to the
// loop thread; touching them from elsewhere would race the loop's own callbacks, so other
// threads hand the work over and wait for its result instead.

#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <thread>

#include "base/base.h"

struct event_base;
struct event;

namespace vg::daemon {

class LoopTasks {
 public:
  // `base` must have been created after evthread_use_pthreads(): event_active() is called
  // from other threads. The creating thread is the loop's thread (it will run the loop).
  static Result<std::unique_ptr<LoopTasks>> Create(event_base* base);
  ~LoopTasks();
  LoopTasks(const LoopTasks&) = delete;
  LoopTasks& operator=(const LoopTasks&) = delete;

  // Runs fn on the loop thread and waits for its result. On the loop thread itself it runs
  // inline (no self-deadlock). After Stop() it fails with kBadState instead of waiting for
  // a loop that will never run again.
  template <class T>
  Result<T> Call(std::function<Result<T>()> fn) {
    if (OnLoopThread()) return fn();
    auto p = std::make_shared<std::promise<Result<T>>>();
    auto fut = p->get_future();
    bool queued = Enqueue([p, fn = std::move(fn)](bool run) {
      if (run)
        p->set_value(fn());
      else
        p->set_value(MakeError(Errc::kBadState, "daemon is shutting down"));
    });
    if (!queued) return MakeError(Errc::kBadState, "daemon is shutting down");
    return fut.get();
  }

  // Fire and forget: fn runs on the loop thread later, or never once Stop() is called.
  void Post(std::function<void()> fn);

  // Called when the loop has exited: fails every queued and future Call.
  void Stop();

  bool OnLoopThread() const { return std::this_thread::get_id() == owner_; }

 private:
  using Task = std::function<void(bool run)>;
  LoopTasks() = default;
  bool Enqueue(Task t);
  static void OnActive(int, short, void* arg);

  std::thread::id owner_;
  event* ev_ = nullptr;
  std::mutex mu_;
  std::deque<Task> queue_;
  bool stopped_ = false;
};

}  // namespace vg::daemon
