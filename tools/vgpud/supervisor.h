#pragma once
// The vgpud supervisor's loop: one libevent loop that owns the worker pool (one sandboxed
// vgpud-worker process per running vGPU, docs/isolation.md), the control socket and the
// signals. It never parses guest input and never loads a GPU driver.

#include <memory>
#include <string>

#include "base/base.h"
#include "tools/vgpud/loop_tasks.h"
#include "tools/vgpud/workers.h"

struct event_base;
struct event;

namespace vg::daemon {

struct SupervisorOptions {
  std::string runtime_dir = "/run/vgpud";
  WorkerPolicy workers;  // runtime_dir is filled in from above
};

class Supervisor {
 public:
  static Result<std::unique_ptr<Supervisor>> Create(SupervisorOptions opts);
  ~Supervisor();
  Supervisor(const Supervisor&) = delete;
  Supervisor& operator=(const Supervisor&) = delete;

  // Runs until SIGINT/SIGTERM or Stop().
  Result<> Run();
  void Stop();
  event_base* base() const { return base_; }
  LoopTasks& loop() { return *loop_; }
  WorkerPool& workers() { return *workers_; }
  const std::string& runtime_dir() const { return opts_.runtime_dir; }

 private:
  Supervisor(SupervisorOptions opts, event_base* base) : opts_(std::move(opts)), base_(base) {}
  static void OnSignal(int sig, short what, void* arg);

  SupervisorOptions opts_;
  UniqueFd lock_;  // <runtime_dir>/vgpud.lock, flock'd for this supervisor's life
  event_base* base_;
  std::unique_ptr<LoopTasks> loop_;
  std::unique_ptr<WorkerPool> workers_;
  event* sigint_ = nullptr;
  event* sigterm_ = nullptr;
};

}  // namespace vg::daemon
