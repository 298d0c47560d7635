#include "tools/vgpud/workers.h"

#include <event2/event.h>
#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <csignal>
#include <cstring>
#include <thread>

#include <nlohmann/json.hpp>

#include "sandbox/cgroup.h"
#include "sandbox/sandbox.h"

extern char** environ;

namespace vg::daemon {
namespace ch = channel;
using Clock = std::chrono::steady_clock;

namespace {

int64_t MsSince(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t).count();
}

int64_t UnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

timeval Tv(int ms) { return timeval{ms / 1000, (ms % 1000) * 1000}; }

// Exit statuses of vgpud-worker (tools/vgpud-worker/main.cc).
constexpr int kWorkerExitStartup = 1;
constexpr int kWorkerExitOutOfMemory = 3;

// A descriptor copy far above 0..5, so that posix_spawn's dup2s to 3, 4 and 5 can never
// clobber a source that happens to sit at one of those numbers.
Result<UniqueFd> HighCopy(int fd) {
  UniqueFd c(::fcntl(fd, F_DUPFD_CLOEXEC, 64));
  VG_ERROR_IF(!c.Valid(), Errc::kIo, "fcntl(F_DUPFD_CLOEXEC): {}", std::strerror(errno));
  return c;
}

struct SpawnFds {
  std::vector<std::pair<int, int>> dup2s;  // source → target in the child
};

// posix_spawn (vfork + exec: safe in a threaded process, no allocation in the child) with
// the given descriptors at fixed numbers, default signal dispositions and an empty mask.
Result<pid_t> SpawnProcess(const std::vector<std::string>& argv, const SpawnFds& fds) {
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t attr;
  posix_spawn_file_actions_init(&fa);
  posix_spawnattr_init(&attr);
  for (const auto& [from, to] : fds.dup2s) posix_spawn_file_actions_adddup2(&fa, from, to);
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &all);  // the supervisor ignores SIGPIPE; exec keeps "ignored"
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = 0;
  const int rc = ::posix_spawn(&pid, args[0], &fa, &attr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  VG_ERROR_IF(rc != 0, Errc::kIo, "spawn {}: {}", argv[0], std::strerror(rc));
  return pid;
}

// The reason a worker ended, from its wait status (and what the supervisor did to it).
std::pair<std::string, EndKind> NameEnd(int status) {
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    if (sig == SIGSYS) return {"killed by its seccomp filter (a forbidden system call)", EndKind::kSeccomp};
    if (sig == SIGKILL)
      return {"killed by SIGKILL, not by vgpud (the kernel's OOM killer, or an operator)", EndKind::kKilled};
    return {fmt::format("crashed ({}, signal {})", sigabbrev_np(sig) ? sigabbrev_np(sig) : "?", sig), EndKind::kCrash};
  }
  const int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  if (code == kWorkerExitOutOfMemory)
    return {"out of memory: its memory limit refused an allocation", EndKind::kOutOfMemory};
  if (code == kWorkerExitStartup) return {"failed to start (exit status 1; its log says why)", EndKind::kExit};
  return {fmt::format("exited unexpectedly with status {}", code), EndKind::kExit};
}

}  // namespace

std::string_view RestartPolicyName(RestartPolicy p) { return p == RestartPolicy::kNever ? "never" : "on-failure"; }

Result<RestartPolicy> ParseRestartPolicy(std::string_view s) {
  if (s == "on-failure") return RestartPolicy::kOnFailure;
  if (s == "never") return RestartPolicy::kNever;
  return MakeError(Errc::kInvalidArgument, "restart policy '{}': on-failure or never", s);
}

std::string_view EndKindName(EndKind k) {
  static constexpr std::string_view kNames[] = {"crash", "seccomp", "watchdog", "out_of_memory", "killed", "exit"};
  return kNames[static_cast<size_t>(k)];
}

// What Start() waits for: set once, by the loop, when the worker says Ready or ends.
struct WorkerPool::Waiter {
  std::mutex mu;
  std::condition_variable cv;
  std::optional<Result<>> result;
  void Set(Result<> r) {
    std::lock_guard lk(mu);
    if (!result) result = std::move(r);
    cv.notify_all();
  }
  bool Done() {
    std::lock_guard lk(mu);
    return result.has_value();
  }
};

struct WorkerPool::Worker {
  enum class State { kStarting, kRunning, kRestarting, kFailed, kStopping };
  WorkerPool* pool = nullptr;
  WorkerSpec spec;
  std::string vfio_path, remoting_path;
  UniqueFd vfio_listen, remoting_listen;  // the supervisor's copies, kept across restarts
  State state = State::kStarting;
  pid_t pid = 0;  // while a process runs (and until it is reaped)
  UniqueFd pidfd, channel;
  event* pid_ev = nullptr;
  event* channel_ev = nullptr;
  event* restart_ev = nullptr;
  event* stop_ev = nullptr;
  std::unique_ptr<sandbox::CgroupSlot> cgroup;
  Clock::time_point spawned_at, last_pong;
  uint64_t ping_seq = 0;
  bool pinged = false;
  bool stop_asked_client = false;  // Stop() sent kStopRequest instead of SIGTERM
  bool late_sigterm = false;       // and the shutdown sent SIGTERM after it (StopAll)
  // Set when the supervisor kills the worker, so the exit is named after the cause.
  std::optional<std::pair<std::string, EndKind>> kill_reason;
  std::deque<Clock::time_point> restart_times;
  uint32_t consecutive_failures = 0;
  std::shared_ptr<Waiter> waiter;  // while Start() waits
  WorkerStatus status;

  ~Worker() {
    for (event* e : {pid_ev, channel_ev, restart_ev, stop_ev})
      if (e) event_free(e);
  }
  static std::string_view StateName(State s) {
    static constexpr std::string_view kNames[] = {"starting", "running", "restarting", "failed", "stopping"};
    return kNames[static_cast<size_t>(s)];
  }
};

Result<std::unique_ptr<WorkerPool>> WorkerPool::Create(event_base* base, LoopTasks& loop, WorkerPolicy policy) {
  VG_ERROR_IF(::access(policy.binary.c_str(), X_OK) != 0, Errc::kNotFound, "worker binary {}: {}",
              policy.binary.string(), std::strerror(errno));
  std::unique_ptr<WorkerPool> p(new WorkerPool(base, loop, std::move(policy)));
  auto cg = sandbox::CgroupParent::Detect();
  if (cg) {
    p->cgroups_ = std::make_unique<sandbox::CgroupParent>(std::move(cg).value());
    VG_LOGI("workers: cgroup v2 slots under {}", p->cgroups_->path().string());
  } else {
    p->cgroup_note_ = cg.error().what;
    VG_LOGI("workers: no cgroup v2 ({}); memory bounded by RLIMIT_AS, CPU not capped", cg.error().what);
  }
  WorkerPool* raw = p.get();
  p->sched_ = std::make_unique<Scheduler>(
      p->policy_.sched,
      SchedActions{[raw](const Uuid& u, uint64_t grant) {
                     if (Worker* w = raw->Find(u); w && w->channel.Valid())
                       if (!ch::Send(w->channel.Get(), ch::Make(ch::Kind::kSchedGrant, grant)))
                         VG_LOGW("worker for {}: channel full, grant {} not sent", u, grant);
                   },
                   [raw](const Uuid& u, uint64_t grant) {
                     if (Worker* w = raw->Find(u); w && w->channel.Valid())
                       (void)ch::Send(w->channel.Get(), ch::Make(ch::Kind::kSchedPreempt, grant));
                   },
                   [raw](const Uuid& u, std::string why) {
                     if (Worker* w = raw->Find(u)) raw->Kill(*w, std::move(why), EndKind::kWatchdog);
                   }});
  p->sched_ev_ = event_new(base, -1, 0, &WorkerPool::OnSchedTimer, p.get());
  VG_ERROR_IF(!p->sched_ev_, Errc::kInternal, "scheduler timer");
  p->heartbeat_ev_ = event_new(base, -1, EV_PERSIST, &WorkerPool::OnHeartbeat, p.get());
  const timeval hb = Tv(p->policy_.heartbeat_ms);
  VG_ERROR_IF(!p->heartbeat_ev_ || event_add(p->heartbeat_ev_, &hb) != 0, Errc::kInternal, "heartbeat timer");
  return p;
}

WorkerPool::WorkerPool(event_base* base, LoopTasks& loop, WorkerPolicy policy)
    : base_(base), loop_(loop), policy_(std::move(policy)) {}

WorkerPool::~WorkerPool() {
  StopAll();
  if (heartbeat_ev_) event_free(heartbeat_ev_);
  if (sched_ev_) event_free(sched_ev_);
}

WorkerPool::Worker* WorkerPool::Find(const Uuid& uuid) {
  auto it = workers_.find(uuid);
  return it == workers_.end() ? nullptr : it->second.get();
}

void WorkerPool::ArmSched() {
  event_del(sched_ev_);
  if (auto at = sched_->NextDeadline()) {
    const auto us = std::max<int64_t>(
        0, std::chrono::duration_cast<std::chrono::microseconds>(*at - Clock::now()).count());
    timeval tv{static_cast<time_t>(us / 1'000'000), static_cast<suseconds_t>(us % 1'000'000)};
    event_add(sched_ev_, &tv);
  }
}

void WorkerPool::OnSchedTimer(int, short, void* arg) {
  auto* self = static_cast<WorkerPool*>(arg);
  self->sched_->OnTimer(Clock::now());
  self->ArmSched();
}

void WorkerPool::SendSchedConfig(Worker& w) {
  if (!w.channel.Valid()) return;
  ch::Record r = ch::Make(ch::Kind::kSchedConfig);
  auto set = [&](ch::SchedConfigSlot s, uint64_t v) { r.values[static_cast<size_t>(s)] = v; };
  set(ch::SchedConfigSlot::kScheduled, policy_.sched.enabled ? 1 : 0);
  set(ch::SchedConfigSlot::kRateLimit, w.spec.sched.rate_limit);
  set(ch::SchedConfigSlot::kRateBurst, w.spec.sched.rate_burst);
  set(ch::SchedConfigSlot::kGpuTimeLimitNs, w.spec.sched.gpu_time_limit_ns);
  set(ch::SchedConfigSlot::kGpuTimeBurstNs, w.spec.sched.gpu_time_burst_ns);
  if (!ch::Send(w.channel.Get(), r)) VG_LOGW("worker for {}: channel full, scheduling config not sent", w.spec.uuid);
}

Result<> WorkerPool::Reconfigure(const Uuid& uuid, const SchedParams& p) {
  return loop_.Call<void>([&]() -> Result<> {
    Worker* w = Find(uuid);
    VG_ERROR_IF(!w, Errc::kNotFound, "vGPU {} has no worker", uuid);
    w->spec.sched = p;
    w->status.sched_params = p;
    sched_->SetWeight(uuid, p.weight);
    SendSchedConfig(*w);
    Publish(*w);
    return Ok();
  });
}

std::string WorkerPool::SocketPath(const Uuid& uuid) const {
  return policy_.runtime_dir + "/" + uuid.ToString() + ".sock";
}
std::string WorkerPool::RemotingSocketPath(const Uuid& uuid) const {
  return policy_.runtime_dir + "/" + uuid.ToString() + ".remote.sock";
}
std::string WorkerPool::cgroup_root() const { return cgroups_ ? cgroups_->path().string() : std::string(); }

// ---- start ----------------------------------------------------------------------------------

Result<std::string> WorkerPool::Start(const WorkerSpec& spec) {
  auto waiter = std::make_shared<Waiter>();
  VG_TRY(loop_.Call<void>([&]() -> Result<> { return BeginStart(spec, waiter); }));
  // The heartbeat kills a worker that is not Ready within start_timeout_ms, which ends the
  // wait; the margin only covers a loop that stopped turning.
  const auto deadline = Clock::now() + std::chrono::milliseconds(policy_.start_timeout_ms + 2000);
  if (loop_.OnLoopThread()) {
    // main(), before the loop runs: turn it here until the worker answers.
    while (!waiter->Done() && Clock::now() < deadline) event_base_loop(base_, EVLOOP_ONCE);
  } else {
    std::unique_lock lk(waiter->mu);
    waiter->cv.wait_until(lk, deadline, [&] { return waiter->result.has_value(); });
  }
  if (!waiter->Done()) {
    (void)Stop(spec.uuid);
    return MakeError(Errc::kTimeout, "worker for {} did not start within {} ms", spec.uuid, policy_.start_timeout_ms);
  }
  std::lock_guard lk(waiter->mu);
  VG_TRY(*waiter->result);
  return SocketPath(spec.uuid);
}

Result<> WorkerPool::BeginStart(const WorkerSpec& spec, std::shared_ptr<Waiter> waiter) {
  VG_ERROR_IF(workers_.count(spec.uuid) != 0, Errc::kAlreadyExists, "vGPU {} already has a worker", spec.uuid);
  auto w = std::make_unique<Worker>();
  w->pool = this;
  w->spec = spec;
  w->vfio_path = SocketPath(spec.uuid);
  w->remoting_path = RemotingSocketPath(spec.uuid);
  VG_TRY_ASSIGN(w->remoting_listen, ListenUnix(w->remoting_path, SOCK_SEQPACKET, 16));
  auto vfio = ListenUnix(w->vfio_path, SOCK_STREAM, 4);
  if (!vfio) {
    ::unlink(w->remoting_path.c_str());
    return std::move(vfio).error();
  }
  w->vfio_listen = std::move(vfio).value();
  w->waiter = std::move(waiter);
  if (cgroups_) {
    sandbox::CgroupLimits l;
    l.memory_max_bytes = policy_.memory_bytes + spec.aperture;
    l.cpu_max_percent = policy_.cpu_percent;
    auto slot = cgroups_->CreateSlot("vgpu-" + spec.uuid.ToString(), l);
    if (!slot) {
      CloseSockets(*w);
      return std::move(slot).error();
    }
    w->cgroup = std::make_unique<sandbox::CgroupSlot>(std::move(slot).value());
  }
  if (auto r = Spawn(*w); !r) {
    CloseSockets(*w);
    return r;
  }
  Worker& ref = *w;
  workers_.emplace(spec.uuid, std::move(w));
  Publish(ref);
  return Ok();
}

Result<> WorkerPool::Spawn(Worker& w) {
  int sv[2];
  VG_ERROR_IF(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0, Errc::kIo, "socketpair: {}",
              std::strerror(errno));
  UniqueFd mine(sv[0]), theirs(sv[1]);
  VG_TRY_ASSIGN(UniqueFd c3, HighCopy(theirs.Get()));
  VG_TRY_ASSIGN(UniqueFd c4, HighCopy(w.vfio_listen.Get()));
  VG_TRY_ASSIGN(UniqueFd c5, HighCopy(w.remoting_listen.Get()));
  SpawnFds fds;
  fds.dup2s = {{c3.Get(), ch::kChannelFd}, {c4.Get(), ch::kVfioUserFd}, {c5.Get(), ch::kRemotingFd}};
  const uint64_t address_space =
      cgroups_ ? 0 : policy_.memory_bytes + w.spec.aperture + policy_.dma_max_bytes;
  std::vector<std::string> argv = {policy_.binary.string(),
                                   "--uuid", w.spec.uuid.ToString(),
                                   "--type", w.spec.type,
                                   "--aperture", std::to_string(w.spec.aperture),
                                   "--gtt-entries", std::to_string(w.spec.gtt_entries),
                                   "--socket-name", w.vfio_path,
                                   "--remoting-name", w.remoting_path,
                                   "--dma-max-bytes", std::to_string(policy_.dma_max_bytes),
                                   "--address-space", std::to_string(address_space),
                                   "--open-files", std::to_string(policy_.open_files)};
  if (!policy_.seccomp) argv.push_back("--no-seccomp");
  const FaultThresholds& f = policy_.faults;
  const std::pair<const char*, uint32_t> fault_args[] = {{"--fault-window-ms", f.window_ms},
                                                         {"--fault-throttle-per-s", f.throttle_per_s},
                                                         {"--fault-quarantine-per-s", f.quarantine_per_s},
                                                         {"--throttle-rate", f.throttle_rate},
                                                         {"--fault-quiet-ms", f.quiet_ms}};
  for (const auto& [flag, v] : fault_args) {
    argv.emplace_back(flag);
    argv.push_back(std::to_string(v));
  }
  // Held from its first submission until the scheduler grants it the engine.
  if (policy_.sched.enabled) argv.push_back("--scheduled");
  argv.insert(argv.end(), policy_.worker_args.begin(), policy_.worker_args.end());
  VG_TRY_ASSIGN(pid_t pid, SpawnProcess(argv, fds));
  w.pid = pid;
  w.spawned_at = Clock::now();
  w.last_pong = w.spawned_at;
  w.pinged = false;
  w.kill_reason.reset();
  w.state = Worker::State::kStarting;
  // A pidfd: readable once the process ends; the pid cannot be reused before it is reaped.
  w.pidfd = UniqueFd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!w.pidfd.Valid()) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    w.pid = 0;
    return MakeError(Errc::kIo, "pidfd_open: {}", std::strerror(errno));
  }
  w.channel = std::move(mine);
  w.status.address_space_limit = address_space;
  w.status.open_files_limit = policy_.open_files;
  if (w.cgroup) {
    if (auto r = w.cgroup->AddProcess(pid); !r) {
      Kill(w, "could not be placed in its cgroup: " + r.error().what, EndKind::kExit);
    } else {
      w.status.cgroup = w.cgroup->path().string();
      w.status.memory_max = policy_.memory_bytes + w.spec.aperture;
      w.status.cpu_percent = policy_.cpu_percent;
    }
  }
  (void)ch::Send(w.channel.Get(), ch::Make(ch::Kind::kGo));
  SendSchedConfig(w);  // read once its loop runs, before it says Ready
  w.pid_ev = event_new(base_, w.pidfd.Get(), EV_READ, &WorkerPool::OnPidfd, &w);
  w.channel_ev = event_new(base_, w.channel.Get(), EV_READ | EV_PERSIST, &WorkerPool::OnChannel, &w);
  if (!w.pid_ev || !w.channel_ev || event_add(w.pid_ev, nullptr) != 0 || event_add(w.channel_ev, nullptr) != 0) {
    // Not watched, so not kept: reaped here (SIGKILL is immediate).
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    w.pid = 0;
    Forget(w);
    return MakeError(Errc::kInternal, "event_add for worker {}", w.spec.uuid);
  }
  VG_LOGI("worker {} for {}: pid {}", w.status.restarts ? "restarted" : "started", w.spec.uuid, pid);
  return Ok();
}

// ---- watching -------------------------------------------------------------------------------

void WorkerPool::Kill(Worker& w, std::string reason, EndKind kind) {
  if (w.pid <= 0) return;
  if (!w.kill_reason) w.kill_reason = std::make_pair(std::move(reason), kind);
  ::kill(w.pid, SIGKILL);  // not yet reaped: the pid is still this worker's
}

void WorkerPool::OnHeartbeat(int, short, void* arg) {
  auto* self = static_cast<WorkerPool*>(arg);
  for (auto& [uuid, wp] : self->workers_) {
    Worker& w = *wp;
    if (w.pid <= 0 || w.kill_reason) continue;
    if (w.state == Worker::State::kStarting) {
      if (MsSince(w.spawned_at) > self->policy_.start_timeout_ms)
        self->Kill(w, fmt::format("not ready within {} ms of its start", self->policy_.start_timeout_ms),
                   EndKind::kWatchdog);
      continue;
    }
    if (w.state != Worker::State::kRunning) continue;
    const int64_t age = MsSince(w.last_pong);
    if (age > self->policy_.watchdog_ms) {
      self->Kill(w, fmt::format("watchdog: no heartbeat for {} ms (bound {} ms)", age, self->policy_.watchdog_ms),
                 EndKind::kWatchdog);
      continue;
    }
    // One ping outstanding at a time: a worker that answers slower than the heartbeat still
    // gets credit for each answer, and only silence for watchdog_ms counts. A full queue (a
    // worker that does not read) is not an error by itself: the missing pongs are.
    (void)self->Ping(w);
  }
}

// One ping outstanding at a time; false when none is (the channel's queue was full).
bool WorkerPool::Ping(Worker& w) {
  if (!w.pinged && ch::Send(w.channel.Get(), ch::Make(ch::Kind::kPing, w.ping_seq + 1))) {
    ++w.ping_seq;
    w.pinged = true;
  }
  return w.pinged;
}

void WorkerPool::OnChannel(int fd, short, void* arg) {
  auto& w = *static_cast<Worker*>(arg);
  WorkerPool* self = w.pool;
  for (int i = 0; i < 16 && w.channel.Valid(); ++i) {
    ch::Record r;
    switch (ch::Recv(fd, r)) {
      case ch::RecvStatus::kEmpty: return;
      case ch::RecvStatus::kClosed:
        // The process is ending (or closed its end): the pidfd tells how. Stop reading.
        event_del(w.channel_ev);
        return;
      case ch::RecvStatus::kMalformed:
        self->Kill(w, "broke the channel protocol (a malformed record)", EndKind::kCrash);
        event_del(w.channel_ev);
        return;
      case ch::RecvStatus::kRecord: self->OnRecord(w, r); break;
    }
  }
}

void WorkerPool::OnRecord(Worker& w, const ch::Record& r) {
  switch (r.kind) {
    case ch::Kind::kReady:
      if (w.state != Worker::State::kStarting) return Kill(w, "said Ready twice", EndKind::kCrash);
      w.state = Worker::State::kRunning;
      w.last_pong = Clock::now();
      w.status.start_latency_us = static_cast<uint64_t>(
          std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - w.spawned_at).count());
      VG_LOGI("worker for {} ready in {} ms (pid {})", w.spec.uuid, w.status.start_latency_us / 1000, w.pid);
      if (policy_.sched.enabled) sched_->Add(w.spec.uuid, w.spec.sched.weight, Clock::now());
      if (w.waiter) {
        w.waiter->Set(Ok());
        w.waiter.reset();
      }
      break;
    case ch::Kind::kPong:
      // Only an answer to the last ping counts: a worker cannot bank pongs ahead.
      if (w.state != Worker::State::kRunning || !w.pinged || r.seq != w.ping_seq) return;
      w.pinged = false;
      w.last_pong = Clock::now();
      w.consecutive_failures = 0;
      w.status.counters = r.values;
      w.status.pong_seq = r.seq;
      break;
    case ch::Kind::kSchedRequest:
      if (w.state != Worker::State::kRunning || !policy_.sched.enabled) return;
      sched_->OnRequest(w.spec.uuid, Clock::now());
      return ArmSched();
    case ch::Kind::kSchedRelease: {
      if (w.state != Worker::State::kRunning || !policy_.sched.enabled) return;
      auto at = [&](ch::SchedReleaseSlot s) { return r.values[static_cast<size_t>(s)]; };
      sched_->OnRelease(w.spec.uuid, r.seq, at(ch::SchedReleaseSlot::kUsedNs), at(ch::SchedReleaseSlot::kWants) != 0,
                        Clock::now());
      return ArmSched();
    }
    default:
      return Kill(w, fmt::format("sent a record it may not send (kind {})", static_cast<uint32_t>(r.kind)),
                  EndKind::kCrash);
  }
  Publish(w);
}

void WorkerPool::OnPidfd(int, short, void* arg) {
  auto& w = *static_cast<Worker*>(arg);
  w.pool->OnExit(w);
}

void WorkerPool::OnExit(Worker& w) {
  int status = 0;
  const pid_t got = ::waitpid(w.pid, &status, WNOHANG);
  if (got == 0) {  // spurious: not ended yet
    event_add(w.pid_ev, nullptr);
    return;
  }
  const pid_t pid = w.pid;
  w.pid = 0;
  auto [reason, kind] = w.kill_reason ? *w.kill_reason : NameEnd(status);
  Forget(w);
  if (w.state == Worker::State::kStopping) {
    NoteStopped(w.spec.uuid, pid, status, w.late_sigterm);
    std::erase_if(stopping_, [&](const std::unique_ptr<Worker>& p) { return p.get() == &w; });
    return;  // w is gone
  }
  ++w.status.ends[static_cast<size_t>(kind)];
  w.status.last_end = reason;
  w.status.last_end_unix_ms = UnixMs();
  w.status.counters.reset();
  VG_LOGE("worker for {} (pid {}) {}", w.spec.uuid, pid, reason);
  if (w.waiter) {
    // A start that never got Ready fails by name; the Manager records nothing.
    w.waiter->Set(MakeError(Errc::kDeviceLost, "worker for {} {}", w.spec.uuid, reason));
    w.waiter.reset();
    const Uuid u = w.spec.uuid;
    CloseSockets(w);
    workers_.erase(u);
    std::lock_guard lk(snap_mu_);
    snaps_.erase(u);
    return;
  }
  ScheduleRestart(w);
}

void WorkerPool::ScheduleRestart(Worker& w) {
  const auto now = Clock::now();
  while (!w.restart_times.empty() && now - w.restart_times.front() > std::chrono::seconds(policy_.restart_window_s))
    w.restart_times.pop_front();
  if (policy_.restart == RestartPolicy::kNever || w.restart_times.size() >= policy_.max_restarts) {
    Fail(w);
    return;
  }
  // 250 ms, 500 ms, 1 s, ... 5 s between restarts that keep failing.
  const int delay = std::min(5000, 250 << std::min<uint32_t>(w.consecutive_failures, 5));
  ++w.consecutive_failures;
  w.restart_times.push_back(now);
  w.state = Worker::State::kRestarting;
  w.restart_ev = evtimer_new(base_, &WorkerPool::OnRestart, &w);
  const timeval tv = Tv(delay);
  if (!w.restart_ev || evtimer_add(w.restart_ev, &tv) != 0) {
    Fail(w);
    return;
  }
  VG_LOGW("worker for {}: restart {} of {} within {} s in {} ms", w.spec.uuid, w.restart_times.size(),
          policy_.max_restarts, policy_.restart_window_s, delay);
  Publish(w);
}

void WorkerPool::OnRestart(int, short, void* arg) {
  auto& w = *static_cast<Worker*>(arg);
  event_free(w.restart_ev);
  w.restart_ev = nullptr;
  ++w.status.restarts;
  if (auto r = w.pool->Spawn(w); !r) {
    VG_LOGE("worker for {}: restart failed: {}", w.spec.uuid, r.error().ToString());
    w.status.last_end = "restart failed: " + r.error().what;
    w.pool->Fail(w);
    return;
  }
  w.pool->Publish(w);
}

void WorkerPool::Fail(Worker& w) {
  w.state = Worker::State::kFailed;
  // Nobody serves the sockets any more: a guest must be refused, not queued forever.
  CloseSockets(w);
  VG_LOGE("worker for {}: left failed ({} policy, {} restarts within {} s); `vgpuctl stop` then `start` to retry",
          w.spec.uuid, RestartPolicyName(policy_.restart), w.restart_times.size(), policy_.restart_window_s);
  Publish(w);
}

// New connections are refused at once (a queued guest would wait for nobody).
void WorkerPool::CloseSockets(Worker& w) {
  ::unlink(w.vfio_path.c_str());
  ::unlink(w.remoting_path.c_str());
  w.vfio_listen = UniqueFd();
  w.remoting_listen = UniqueFd();
}

void WorkerPool::Forget(Worker& w) {
  // Its grant (if it held one) goes to the next vGPU; a restarted worker is added again
  // when it says Ready. A stopping worker left the scheduler when it was retired: the
  // entry of its UUID now, if any, is a new worker's.
  if (w.state != Worker::State::kStopping) {
    sched_->Remove(w.spec.uuid, Clock::now());
    ArmSched();
  }
  for (event** e : {&w.pid_ev, &w.channel_ev, &w.stop_ev}) {
    if (*e) event_free(*e);
    *e = nullptr;
  }
  w.pidfd = UniqueFd();
  w.channel = UniqueFd();
  w.pinged = false;
}

// ---- stop -----------------------------------------------------------------------------------

// Out of the pool: sockets closed, no restart, a waiting start failed, and the process (if
// one runs) asked to stop and moved to stopping_. Null when nothing runs.
WorkerPool::Worker* WorkerPool::Retire(const Uuid& uuid, bool ask_client) {
  auto it = workers_.find(uuid);
  std::unique_ptr<Worker> w = std::move(it->second);
  workers_.erase(it);
  // Out of the scheduler now, not when the process is reaped: a stop that waits for its
  // client (REQ) must not hold the engine grant meanwhile, and the same UUID may be started
  // again before the old process is gone.
  sched_->Remove(uuid, Clock::now());
  ArmSched();
  {
    std::lock_guard lk(snap_mu_);
    snaps_.erase(uuid);
  }
  CloseSockets(*w);
  if (w->restart_ev) event_free(w->restart_ev);
  w->restart_ev = nullptr;
  if (w->waiter) w->waiter->Set(MakeError(Errc::kBadState, "vGPU {} was stopped while starting", uuid));
  w->waiter.reset();
  if (w->pid <= 0) return nullptr;  // failed or between restarts: nothing runs
  // A serving worker asks its client to let go first (REQ, bounded); one still starting, or
  // whose channel is full, gets SIGTERM (it stops at once, disconnecting its client).
  ch::Record req = ch::Make(ch::Kind::kStopRequest);
  req.values[0] = static_cast<uint64_t>(std::max(0, policy_.stop_request_timeout_ms));
  const bool asked = ask_client && w->state == Worker::State::kRunning && w->channel.Valid() &&
                     ch::Send(w->channel.Get(), req);
  w->state = Worker::State::kStopping;
  if (!asked) ::kill(w->pid, SIGTERM);
  w->stop_asked_client = asked;
  stopping_.push_back(std::move(w));
  return stopping_.back().get();
}

Result<> WorkerPool::Stop(const Uuid& uuid) {
  return loop_.Call<void>([this, uuid]() -> Result<> {
    VG_ERROR_IF(workers_.count(uuid) == 0, Errc::kNotFound, "vGPU {} has no worker", uuid);
    if (Worker* w = Retire(uuid, /*ask_client=*/true)) {
      w->stop_ev = evtimer_new(base_, &WorkerPool::OnStopDeadline, w);
      const timeval tv =
          Tv(policy_.stop_grace_ms + (w->stop_asked_client ? std::max(0, policy_.stop_request_timeout_ms) : 0));
      if (w->stop_ev) evtimer_add(w->stop_ev, &tv);
    }
    return Ok();
  });
}

// A worker asked to stop exits 0. A crash on the way out or a sanitizer's report is a bug in
// the worker: logged, and counted so that the supervisor's own exit status says so. One that
// was too slow and got SIGKILL after the grace period is only logged: a loaded host is not a bug.
void WorkerPool::NoteStopped(const Uuid& uuid, pid_t pid, int status, bool late_sigterm) {
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
    VG_LOGI("worker for {} (pid {}) stopped", uuid, pid);
    return;
  }
  // Shutdown's SIGTERM to a worker that was asked to stop on its channel may land while it is
  // already exiting (its handler gone): our own signal, not a bug in the worker.
  if (late_sigterm && WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM) {
    VG_LOGW("worker for {} (pid {}) ended by the shutdown's SIGTERM while stopping", uuid, pid);
    return;
  }
  if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) {
    VG_LOGW("worker for {} (pid {}) killed after the {} ms stop grace period", uuid, pid, policy_.stop_grace_ms);
    return;
  }
  ++unclean_stops_;
  VG_LOGE("worker for {} (pid {}) did not stop cleanly: {}", uuid, pid,
          WIFSIGNALED(status) ? fmt::format("signal {}", WTERMSIG(status))
                              : fmt::format("exit status {}", WEXITSTATUS(status)));
}

void WorkerPool::OnStopDeadline(int, short, void* arg) {
  auto& w = *static_cast<Worker*>(arg);
  VG_LOGW("worker for {} (pid {}) did not stop within {} ms: SIGKILL", w.spec.uuid, w.pid, w.pool->policy_.stop_grace_ms);
  if (w.pid > 0) ::kill(w.pid, SIGKILL);
}

Result<> WorkerPool::Reset(const Uuid& uuid) {
  return loop_.Call<void>([&]() -> Result<> {
    Worker* w = Find(uuid);
    VG_ERROR_IF(!w, Errc::kNotFound, "vGPU {} has no worker", uuid);
    VG_ERROR_IF(w->state != Worker::State::kRunning || !w->channel.Valid(), Errc::kBadState,
                "vGPU {} is {}, not running", uuid, Worker::StateName(w->state));
    VG_ERROR_IF(!ch::Send(w->channel.Get(), ch::Make(ch::Kind::kReset)), Errc::kBusy, "worker channel full");
    VG_LOGI("vGPU {}: host reset asked", uuid);
    return Ok();
  });
}

Result<> WorkerPool::Fault(const Uuid& uuid, ch::Fault f) {
  return loop_.Call<void>([&]() -> Result<> {
    auto it = workers_.find(uuid);
    VG_ERROR_IF(it == workers_.end() || !it->second->channel.Valid(), Errc::kNotFound, "vGPU {} has no worker",
                uuid);
    ch::Record r = ch::Make(ch::Kind::kFault);
    r.values[0] = static_cast<uint64_t>(f);
    VG_ERROR_IF(!ch::Send(it->second->channel.Get(), r), Errc::kBusy, "worker channel full");
    return Ok();
  });
}

void WorkerPool::StopAll() {
  std::vector<Uuid> ids;
  for (const auto& [u, w] : workers_) ids.push_back(u);
  // The loop has exited: LoopTasks runs nothing any more, so this is done inline.
  for (const Uuid& u : ids) (void)Retire(u);
  // Workers still waiting for their client to release the device (REQ) stop now: the daemon
  // is going away, its shutdown is bounded by the grace period alone.
  for (auto& w : stopping_)
    if (w->stop_asked_client && w->pid > 0) {
      w->late_sigterm = true;
      ::kill(w->pid, SIGTERM);
    }
  const auto deadline = Clock::now() + std::chrono::milliseconds(policy_.stop_grace_ms);
  for (auto& w : stopping_) {
    int status = 0;
    while (w->pid > 0) {
      if (::waitpid(w->pid, &status, WNOHANG) == w->pid) break;
      if (Clock::now() >= deadline) {
        ::kill(w->pid, SIGKILL);
        ::waitpid(w->pid, &status, 0);
        break;
      }
      pollfd p{w->pidfd.Get(), POLLIN, 0};
      (void)::poll(&p, 1, 50);
    }
    if (w->pid > 0) NoteStopped(w->spec.uuid, w->pid, status, w->late_sigterm);
    w->pid = 0;
    Forget(*w);
  }
  stopping_.clear();
}

// ---- status ---------------------------------------------------------------------------------

void WorkerPool::Publish(const Worker& w) {
  WorkerStatus s = w.status;
  s.type = w.spec.type;
  s.state = std::string(Worker::StateName(w.state));
  s.pid = w.pid;
  if (w.state == Worker::State::kRunning) s.last_heartbeat = w.last_pong;
  s.sched_params = w.spec.sched;
  s.sched = sched_->Status(w.spec.uuid);
  {
    std::lock_guard lk(snap_mu_);
    snaps_[w.spec.uuid] = std::move(s);
  }
  snap_cv_.notify_all();
}

std::optional<WorkerStatus> WorkerPool::Status(const Uuid& uuid, int fresh_ms) {
  if (fresh_ms > 0 && !loop_.OnLoopThread()) {
    // A ping now (unless one is out already); the loop never waits for its answer, we do.
    auto asked = loop_.Call<uint64_t>([&]() -> Result<uint64_t> {
      auto it = workers_.find(uuid);
      if (it == workers_.end()) return uint64_t{0};
      Worker& w = *it->second;
      if (w.state != Worker::State::kRunning || !w.channel.Valid() || w.kill_reason) return uint64_t{0};
      return Ping(w) ? w.ping_seq : uint64_t{0};
    });
    if (asked.ok() && *asked != 0) {
      std::unique_lock lk(snap_mu_);
      snap_cv_.wait_for(lk, std::chrono::milliseconds(fresh_ms), [&] {
        auto it = snaps_.find(uuid);
        return it == snaps_.end() || it->second.pong_seq >= *asked;
      });
    }
  }
  WorkerStatus s;
  {
    std::lock_guard lk(snap_mu_);
    auto it = snaps_.find(uuid);
    if (it == snaps_.end()) return std::nullopt;
    s = it->second;
  }
  if (s.state == "running") s.heartbeat_age_ms = static_cast<uint64_t>(std::max<int64_t>(0, MsSince(s.last_heartbeat)));
  if (s.pid > 0) {
    // Read from /proc by the supervisor: a worker cannot misreport its own size.
    if (auto p = sandbox::Inspect(s.pid)) {
      s.rss_bytes = p->rss_bytes;
      s.fds = p->open_fds;
      s.threads = p->threads;
      s.seccomp = p->seccomp_mode == 2;
      s.no_new_privs = p->no_new_privs;
    }
  }
  return s;
}

std::vector<Uuid> WorkerPool::List() const {
  std::lock_guard lk(snap_mu_);
  std::vector<Uuid> out;
  out.reserve(snaps_.size());
  for (const auto& [u, s] : snaps_) out.push_back(u);
  return out;
}

// ---- probe ----------------------------------------------------------------------------------

Result<ProbedDevice> ProbeDevice(const std::filesystem::path& binary, const std::vector<std::string>& args,
                                 int timeout_ms) {
  int pfd[2];
  VG_ERROR_IF(::pipe2(pfd, O_CLOEXEC) != 0, Errc::kIo, "pipe: {}", std::strerror(errno));
  UniqueFd rd(pfd[0]), wr(pfd[1]);
  std::vector<std::string> argv = {binary.string(), "--probe"};
  argv.insert(argv.end(), args.begin(), args.end());
  SpawnFds fds;
  VG_TRY_ASSIGN(UniqueFd out, HighCopy(wr.Get()));
  fds.dup2s = {{out.Get(), 1}};
  VG_TRY_ASSIGN(pid_t pid, SpawnProcess(argv, fds));
  wr = UniqueFd();
  out = UniqueFd();
  std::string text;
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    const int64_t left = -MsSince(deadline);
    if (left <= 0) break;
    pollfd p{rd.Get(), POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left)) <= 0) continue;
    char buf[4096];
    const ssize_t n = ::read(rd.Get(), buf, sizeof buf);
    if (n <= 0) break;
    text.append(buf, static_cast<size_t>(n));
    if (text.size() > 64 * 1024) break;
  }
  // Its stdout closes just before it exits: give it the rest of the bound to finish.
  int status = 0;
  pid_t got = 0;
  while ((got = ::waitpid(pid, &status, WNOHANG)) == 0 && MsSince(deadline) < 0)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  if (got == 0) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
    return MakeError(Errc::kTimeout, "{} --probe did not answer within {} ms", binary.string(), timeout_ms);
  }
  VG_ERROR_IF(!WIFEXITED(status) || WEXITSTATUS(status) != 0, Errc::kUnsupported,
              "{} --probe: no usable Vulkan device (its log says why)", binary.string());
  auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  VG_ERROR_IF(j.is_discarded() || !j.is_object(), Errc::kBadMessage, "{} --probe printed no JSON", binary.string());
  ProbedDevice d;
  try {
    d.name = j.value("name", "");
    d.driver = j.value("driver", "");
    d.summary = j.value("summary", "");
    d.kind = j.value("kind", 0);
    d.vendor_id = j.value("vendor_id", 0u);
    d.device_id = j.value("device_id", 0u);
  } catch (const nlohmann::json::exception& e) {  // a field of another type
    return MakeError(Errc::kBadMessage, "{} --probe: {}", binary.string(), e.what());
  }
  return d;
}

}  // namespace vg::daemon
