#include "tools/vgpud/supervisor.h"

#include <event2/event.h>
#include <event2/thread.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>

#include <cerrno>
#include <csignal>
#include <cstring>

#include "base/cpu_slice.h"
#include "tools/vgpud/event_base.h"

namespace vg::daemon {

Result<std::unique_ptr<Supervisor>> Supervisor::Create(SupervisorOptions opts) {
  if (::mkdir(opts.runtime_dir.c_str(), 0755) != 0 && errno != EEXIST)
    return MakeError(Errc::kIo, "mkdir {}: {}", opts.runtime_dir, std::strerror(errno));
  // One supervisor per runtime directory, for its life: a second one must not adopt (or, when
  // the adoption handshake gets no answer, kill) workers a live supervisor runs. flock's lock
  // belongs to this open file description, which no worker inherits (O_CLOEXEC), and the
  // kernel drops it when this process dies, however it dies.
  const std::string lock_path = opts.runtime_dir + "/vgpud.lock";
  UniqueFd lock(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600));
  VG_ERROR_IF(!lock.Valid(), Errc::kIo, "{}: {}", lock_path, std::strerror(errno));
  VG_ERROR_IF(::flock(lock.Get(), LOCK_EX | LOCK_NB) != 0, Errc::kAlreadyExists,
              "another vgpud runs on {} ({} is locked)", opts.runtime_dir, lock_path);
  // Other threads (the mdev tree's FUSE thread, the management thread) wake the loop with
  // event_active() to hand it work (LoopTasks): libevent's locking must be on before the base exists.
  static const int threads_ok = evthread_use_pthreads();
  VG_ERROR_IF(threads_ok != 0, Errc::kInternal, "evthread_use_pthreads failed");
  // Precise timers: the scheduler's deadlines are its latency (without them a light tenant
  // owed the engine waited a late preempt out on every turn; tools/vgpud/event_base.h).
  VG_TRY_ASSIGN(event_base* base, NewPreciseEventBase());
  // A short CPU slice for this thread and every thread the supervisor starts after it: its
  // timers are deadlines, and beside busy lavapipe threads a waking thread otherwise waits
  // out the running one's slice (base/cpu_slice.h). Workers ask for the default back before
  // they create their engine.
  if (SetThreadCpuSlice(CpuSlice::kShort))
    VG_LOGI("short CPU slices (100 us) for the supervisor's threads");
  else
    VG_LOGI("short CPU slices not in effect (needs Linux 6.12 or later): timers may fire a slice late under load");
  opts.workers.runtime_dir = opts.runtime_dir;
  std::unique_ptr<Supervisor> s(new Supervisor(std::move(opts), base));
  s->lock_ = std::move(lock);
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
