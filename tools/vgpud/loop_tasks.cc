#include "tools/vgpud/loop_tasks.h"

#include <event2/event.h>

namespace vg::daemon {

Result<std::unique_ptr<LoopTasks>> LoopTasks::Create(event_base* base) {
  std::unique_ptr<LoopTasks> t(new LoopTasks());
  t->owner_ = std::this_thread::get_id();
  t->ev_ = event_new(base, -1, 0, &LoopTasks::OnActive, t.get());
  VG_ERROR_IF(!t->ev_, Errc::kInternal, "event_new for loop tasks failed");
  return t;
}

LoopTasks::~LoopTasks() {
  Stop();
  if (ev_) event_free(ev_);
}

bool LoopTasks::Enqueue(Task t) {
  {
    std::lock_guard lk(mu_);
    if (stopped_) return false;
    queue_.push_back(std::move(t));
  }
  // Several activations before the loop gets to it coalesce; OnActive drains everything.
  event_active(ev_, EV_READ, 0);
  return true;
}

void LoopTasks::Post(std::function<void()> fn) {
  (void)Enqueue([fn = std::move(fn)](bool run) {
    if (run) fn();
  });
}

void LoopTasks::Stop() {
  std::deque<Task> dropped;
  {
    std::lock_guard lk(mu_);
    stopped_ = true;
    dropped.swap(queue_);
  }
  for (Task& t : dropped) t(false);
}

void LoopTasks::OnActive(int, short, void* arg) {
  auto* self = static_cast<LoopTasks*>(arg);
  std::deque<Task> batch;
  {
    std::lock_guard lk(self->mu_);
    batch.swap(self->queue_);
  }
  for (Task& t : batch) t(true);
}

}  // namespace vg::daemon
