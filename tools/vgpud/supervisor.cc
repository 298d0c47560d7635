#include "tools/vgpud/supervisor.h"

#include <event2/event.h>
#include <event2/thread.h>
#include <sys/stat.h>

#include <cerrno>
#include <csignal>
#include <cstring>

namespace vg::daemon {

Result<std::unique_ptr<Supervisor>> Supervisor::Create(SupervisorOptions opts) {
  if (::mkdir(opts.runtime_dir.c_str(), 0755) != 0 && errno != EEXIST)
    return MakeError(Errc::kIo, "mkdir {}: {}", opts.runtime_dir, std::strerror(errno));
  // Other threads (the mdev tree's FUSE thread, the management thread) wake the loop with
  // event_active() to hand it work (LoopTasks): libevent's locking must be on before the base exists.
  static const int threads_ok = evthread_use_pthreads();
  VG_ERROR_IF(threads_ok != 0, Errc::kInternal, "evthread_use_pthreads failed");
  event_base* base = event_base_new();
  VG_ERROR_IF(!base, Errc::kInternal, "event_base_new failed");
  opts.workers.runtime_dir = opts.runtime_dir;
  std::unique_ptr<Supervisor> s(new Supervisor(std::move(opts), base));
  VG_TRY_ASSIGN(s->loop_, LoopTasks::Create(base));
  VG_TRY_ASSIGN(s->workers_, WorkerPool::Create(base, *s->loop_, s->opts_.workers));
  // A control client dying mid-reply must not kill the supervisor.
  std::signal(SIGPIPE, SIG_IGN);
  s->sigint_ = evsignal_new(base, SIGINT, &Supervisor::OnSignal, s.get());
  s->sigterm_ = evsignal_new(base, SIGTERM, &Supervisor::OnSignal, s.get());
  event_add(s->sigint_, nullptr);
  event_add(s->sigterm_, nullptr);
  return s;
}

Supervisor::~Supervisor() {
  loop_->Stop();
  workers_.reset();  // every worker stopped and reaped (bounded) before the loop goes
  if (sigint_) event_free(sigint_);
  if (sigterm_) event_free(sigterm_);
  loop_.reset();
  event_base_free(base_);
}

void Supervisor::OnSignal(int sig, short, void* arg) {
  VG_LOGI("signal {}: shutting down", sig);
  static_cast<Supervisor*>(arg)->Stop();
}

Result<> Supervisor::Run() {
  VG_ERROR_IF(event_base_dispatch(base_) < 0, Errc::kInternal, "event loop failed");
  return Ok();
}

void Supervisor::Stop() { event_base_loopexit(base_, nullptr); }

}  // namespace vg::daemon
