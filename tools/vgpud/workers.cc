#include "tools/vgpud/workers.h"

#include <event2/event.h>
#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <condition_variable>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "abi/device.h"
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
// F10: a vGPU's VNC console socket, bound and listening here (the worker may not: its
// sandbox refuses socket/bind/listen). Port 0: the kernel picks one; else the first free
// port from `port` on (at most 1000 tried). Returns the socket and "ADDR:PORT".
Result<std::pair<UniqueFd, std::string>> ListenTcp(const std::string& addr, uint16_t port) {
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  VG_ERROR_IF(::inet_pton(AF_INET, addr.c_str(), &sa.sin_addr) != 1, Errc::kInvalidArgument,
              "--vnc-listen {}: not an IPv4 address", addr);
  for (uint32_t i = 0; i < (port == 0 ? 1u : 1000u); ++i) {
    UniqueFd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    VG_ERROR_IF(!s.Valid(), Errc::kIo, "socket: {}", std::strerror(errno));
    const int one = 1;
    (void)::setsockopt(s.Get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sa.sin_port = htons(static_cast<uint16_t>(port == 0 ? 0 : port + i));
    if (::bind(s.Get(), reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
      if (errno == EADDRINUSE && port != 0) continue;
      return MakeError(Errc::kIo, "bind {}:{}: {}", addr, ntohs(sa.sin_port), std::strerror(errno));
    }
    VG_ERROR_IF(::listen(s.Get(), 8) != 0, Errc::kIo, "listen: {}", std::strerror(errno));
    sockaddr_in got{};
    socklen_t len = sizeof got;
    VG_ERROR_IF(::getsockname(s.Get(), reinterpret_cast<sockaddr*>(&got), &len) != 0, Errc::kIo, "getsockname: {}",
                std::strerror(errno));
    return std::make_pair(std::move(s), fmt::format("{}:{}", addr, ntohs(got.sin_port)));
  }
  return MakeError(Errc::kBusy, "no free port for a VNC console from {}", port);
}

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

using Token = std::array<uint64_t, ch::kTokenWords>;

Result<Token> NewToken() {
  Token t{};
  VG_ERROR_IF(::getrandom(t.data(), sizeof t, 0) != static_cast<ssize_t>(sizeof t), Errc::kIo, "getrandom: {}",
              std::strerror(errno));
  return t;
}

// The adoption socket: bound (mode 0600), not listening; the worker calls listen() itself so
// that SO_PEERCRED of a connection to it names the worker (the listener's credentials are
// those of whoever called listen()).
Result<UniqueFd> BindAdoptSocket(const std::string& path) {
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  VG_INVALID_IF(path.size() >= sizeof(sa.sun_path), "socket path '{}' too long", path);
  std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);
  // Whatever is there is a leftover: a live worker of this vGPU would hold its vfio-user
  // socket, which the caller bound first.
  ::unlink(path.c_str());
  UniqueFd sock(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  VG_ERROR_IF(!sock.Valid(), Errc::kIo, "socket: {}", std::strerror(errno));
  const mode_t old = ::umask(0177);
  const int rc = ::bind(sock.Get(), reinterpret_cast<sockaddr*>(&sa), sizeof sa);
  ::umask(old);
  VG_ERROR_IF(rc != 0, Errc::kIo, "bind {}: {}", path, std::strerror(errno));
  VG_ERROR_IF(::chmod(path.c_str(), 0600) != 0, Errc::kIo, "chmod {}: {}", path, std::strerror(errno));
  return sock;
}

int PidfdSignal(int pidfd, int sig) { return static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0)); }

bool PidfdExited(int pidfd, int timeout_ms) {
  pollfd p{pidfd, POLLIN, 0};
  return ::poll(&p, 1, timeout_ms) > 0;
}

// How long a new supervisor waits for an adopted worker's Ready.
constexpr int kAdoptTimeoutMs = 3000;

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

// A worker an earlier supervisor left running, from its state file.
struct WorkerPool::Adoptee {
  WorkerSpec spec;
  pid_t pid = 0;
  Token token{};
  std::string binary;
  uint32_t restarts = 0;
  std::array<uint64_t, static_cast<size_t>(EndKind::kCount)> ends{};
  uint64_t address_space = 0;  // its RLIMIT_AS as applied at spawn
};

// A worker whose channel the supervisor's loop left undrained this long in a window is
// flooding it (WorkerPool::NoteBacklog).
constexpr auto kChannelFloodWindow = std::chrono::seconds(2);
constexpr auto kChannelFloodShare = std::chrono::milliseconds(500);

struct WorkerPool::Worker {
  enum class State { kStarting, kRunning, kRestarting, kFailed, kStopping };
  WorkerPool* pool = nullptr;
  WorkerSpec spec;
  Token token{};
  // Adopted from an earlier supervisor: not our child, so its exit status cannot be read
  // (waitpid); the pidfd still says when it ends.
  bool adopted = false;
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
  uint64_t committed_preempt_grant = 0;  // the grant whose preempt went ahead with its time
  bool stop_asked_client = false;  // Stop() sent kStopRequest instead of SIGTERM
  bool late_sigterm = false;       // and the shutdown sent SIGTERM after it (StopAll)
  // Set when the supervisor kills the worker, so the exit is named after the cause.
  std::optional<std::pair<std::string, EndKind>> kill_reason;
  std::deque<Clock::time_point> restart_times;
  uint32_t consecutive_failures = 0;
  // What a successor starts from (kSchedConfig's kCarried slots): the rate-limit buckets'
  // levels as the worker last told them (kCarry) and when, and its fault health as its last
  // pong or kCarry said.
  struct Buckets {
    int64_t rate_milli_tokens = 0;
    int64_t gpu_tokens_ns = 0;
    Clock::time_point at{};
  };
  std::optional<Buckets> carry;
  std::optional<std::array<uint64_t, 3>> carried_health;  // Counter::kHealth, kHealthReason, kHealthRate
  bool send_carried = false;  // the next kSchedConfig is a new process's first
  // The flood guard (NoteBacklog): since when the loop has left records unread (unset once
  // drained), and how long it did so in the current window.
  std::optional<Clock::time_point> backlogged_since;
  Clock::time_point flood_window_start{};
  Clock::duration backlogged_in_window{};
  std::shared_ptr<Waiter> waiter;  // while Start() waits
  WorkerStatus status;
  // F10: our copy of the worker's frame fd (none for an adopted worker: the spawning
  // supervisor had it), and the screenshot waiting for its kScreenshotDone.
  UniqueFd frame;
  UniqueFd vnc_listen;  // the console's listening socket, kept across restarts
  uint64_t shot_seq = 0;
  std::shared_ptr<std::promise<ch::Record>> shot;

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
      SchedActions{[raw](const Uuid& u, uint64_t grant, bool contended) {
                     ch::Record r = ch::Make(ch::Kind::kSchedGrant, grant);
                     r.values[0] = contended ? 1 : 0;
                     // A preempt time already fixed at the grant (partitioned: the slot's
                     // end) rides with it, so the worker knows it before its first piece.
                     const auto c = raw->sched_->CommittedPreemptAt(u);
                     auto ns = [](Clock::time_point t) {
                       return static_cast<uint64_t>(
                           std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count());
                     };
                     if (c && c->grant == grant) {
                       r.values[1] = ns(c->at);
                       if (c->window_start) r.values[2] = ns(*c->window_start);
                     }
                     if (Worker* w = raw->Find(u); w && w->channel.Valid()) {
                       if (!ch::Send(w->channel.Get(), r))
                         VG_LOGW("worker for {}: channel full, grant {} not sent", u, grant);
                       else if (r.values[1])
                         w->committed_preempt_grant = grant;
                     }
                   },
                   [raw](const Uuid& u, uint64_t grant) {
                     if (Worker* w = raw->Find(u); w && w->channel.Valid())
                       (void)ch::Send(w->channel.Get(), ch::Make(ch::Kind::kSchedPreempt, grant));
                   },
                   [raw](const Uuid& u, std::string why) {
                     if (Worker* w = raw->Find(u)) raw->Kill(*w, std::move(why), EndKind::kWatchdog);
                   },
                   [raw](const Uuid& u, uint64_t grant) {
                     if (Worker* w = raw->Find(u); w && w->channel.Valid())
                       (void)ch::Send(w->channel.Get(), ch::Make(ch::Kind::kSchedContended, grant));
                   }});
  p->LoadStates();
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
  // A preempt whose time is already fixed goes to the worker now, with that time
  // (Scheduler::CommittedPreemptAt, one grant at a time only): it stops at its first piece
  // boundary after it, however late this loop's timer fires. Every scheduler event ends
  // here, so none is missed.
  const std::optional<Uuid> holder = sched_->holder();
  const auto c = holder ? sched_->CommittedPreemptAt(*holder) : std::nullopt;
  if (Worker* w = c ? Find(*holder) : nullptr; w && w->channel.Valid() && w->committed_preempt_grant != c->grant) {
    ch::Record r = ch::Make(ch::Kind::kSchedPreempt, c->grant);
    r.values[0] = static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(c->at.time_since_epoch()).count());
    if (ch::Send(w->channel.Get(), r)) w->committed_preempt_grant = c->grant;
  }
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
  set(ch::SchedConfigSlot::kScheduled, policy_.sched.enabled() ? 1 : 0);
  set(ch::SchedConfigSlot::kRateLimit, w.spec.sched.rate_limit);
  set(ch::SchedConfigSlot::kRateBurst, w.spec.sched.rate_burst);
  // equal-share and fixed-share cap the vGPU at its share: the GPU-time bucket enforces it,
  // together with the vGPU's own gpu_time_limit (the lower of the two).
  uint64_t limit = w.spec.sched.gpu_time_limit_ns, burst = w.spec.sched.gpu_time_burst_ns;
  w.status.share_cap_ns = ShareCap(w);
  if (w.status.share_cap_ns && (!limit || w.status.share_cap_ns < limit)) {
    limit = w.status.share_cap_ns;
    burst = 0;  // the gate's default: a tenth of a second's worth
  }
  set(ch::SchedConfigSlot::kGpuTimeLimitNs, limit);
  set(ch::SchedConfigSlot::kGpuTimeBurstNs, burst);
  set(ch::SchedConfigSlot::kIdleGraceNs, static_cast<uint64_t>(policy_.sched.idle_grace.count()));
  set(ch::SchedConfigSlot::kFrameLimit, w.spec.sched.frame_limit);
  set(ch::SchedConfigSlot::kSliceNs, static_cast<uint64_t>(policy_.sched.slice.count()));
  set(ch::SchedConfigSlot::kFitPieces, policy_.sched.partitioned() ? 1 : 0);
  if (std::exchange(w.send_carried, false) && (w.carry || w.carried_health)) {
    // A restarted worker starts where its predecessor left off: a crash refills no bucket,
    // forgives no debt and lifts no throttle or quarantine. The buckets refill for the time
    // since their last report, at the limits as they are now (the worker caps them).
    set(ch::SchedConfigSlot::kCarried, 1);
    if (w.carry) {
      const double secs = std::chrono::duration<double>(Clock::now() - w.carry->at).count();
      auto refilled = [&](int64_t level, double per_s) {  // (the worker's word: saturating)
        const double v = std::clamp(static_cast<double>(level) + std::min(secs * per_s, 1e15), -4e18, 4e18);
        return static_cast<uint64_t>(static_cast<int64_t>(v));
      };
      set(ch::SchedConfigSlot::kCarriedRateMilliTokens,
          refilled(w.carry->rate_milli_tokens, 1000.0 * static_cast<double>(w.spec.sched.rate_limit)));
      set(ch::SchedConfigSlot::kCarriedGpuTokensNs, refilled(w.carry->gpu_tokens_ns, static_cast<double>(limit)));
    } else {
      // Limits set while no report came (none had one): full, as for a first start.
      constexpr uint64_t kFull = uint64_t{1} << 62;
      set(ch::SchedConfigSlot::kCarriedRateMilliTokens, kFull);
      set(ch::SchedConfigSlot::kCarriedGpuTokensNs, kFull);
    }
    if (w.carried_health) {
      set(ch::SchedConfigSlot::kCarriedHealth, (*w.carried_health)[0]);
      set(ch::SchedConfigSlot::kCarriedHealthReason, (*w.carried_health)[1]);
      set(ch::SchedConfigSlot::kCarriedHealthRate, (*w.carried_health)[2]);
    }
  }
  if (!ch::Send(w.channel.Get(), r)) VG_LOGW("worker for {}: channel full, scheduling config not sent", w.spec.uuid);
}

uint64_t WorkerPool::ShareCap(const Worker& w) const {
  constexpr uint64_t kSecondNs = 1'000'000'000;
  switch (policy_.sched.policy) {
    case SchedPolicy::kEqualShare: {
      // The running vGPUs and those on their way (a starting one is asked its share before
      // it says Ready; everyone's is sent again when it does).
      const auto running = std::count_if(workers_.begin(), workers_.end(), [](const auto& kv) {
        return kv.second->state == Worker::State::kRunning || kv.second->state == Worker::State::kStarting;
      });
      return kSecondNs / static_cast<uint64_t>(std::max<std::ptrdiff_t>(1, running));
    }
    case SchedPolicy::kFixedShare: return kSecondNs / std::max<uint32_t>(1, w.spec.fixed_share_of);
    default: return 0;
  }
}

void WorkerPool::ResendShares() {
  if (policy_.sched.policy != SchedPolicy::kEqualShare) return;
  for (auto& [u, w] : workers_)
    if (w->state == Worker::State::kRunning) {
      SendSchedConfig(*w);
      Publish(*w);
    }
}

Result<> WorkerPool::Reconfigure(const Uuid& uuid, const SchedParams& p,
                                 std::optional<std::vector<std::pair<std::string, std::string>>> attrs) {
  return loop_.Call<void>([&]() -> Result<> {
    Worker* w = Find(uuid);
    VG_ERROR_IF(!w, Errc::kNotFound, "vGPU {} has no worker", uuid);
    w->spec.sched = p;
    if (attrs) {
      w->spec.attrs = std::move(*attrs);
      WriteState(*w);
    }
    w->status.sched_params = p;
    if (policy_.sched.policy != SchedPolicy::kEqualShare) sched_->SetWeight(uuid, p.weight);
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
std::string WorkerPool::StatePath(const Uuid& uuid) const {
  return policy_.runtime_dir + "/" + uuid.ToString() + ".worker";
}
std::string WorkerPool::AdoptPath(const Uuid& uuid) const {
  return policy_.runtime_dir + "/" + uuid.ToString() + ".adopt.sock";
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
  if (auto it = adoptable_.find(spec.uuid); it != adoptable_.end()) {
    std::unique_ptr<Adoptee> a = std::move(it->second);
    adoptable_.erase(it);
    auto r = BeginAdopt(spec, *a, waiter);
    if (r) return Ok();
    // Not adopted: a fresh worker below (the sockets of a dead one are stale and rebound).
    VG_LOGW("vGPU {}: worker pid {} not adopted ({}); starting a new one", spec.uuid, a->pid, r.error().what);
    RemoveState(spec.uuid);
  }
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
  if (!w.vfio_listen.Valid()) {
    // An adopted worker that ended: the earlier supervisor's copies of its sockets died with
    // it, so they are bound afresh (the paths stay the same for a guest that reconnects).
    VG_TRY_ASSIGN(w.remoting_listen, ListenUnix(w.remoting_path, SOCK_SEQPACKET, 16));
    VG_TRY_ASSIGN(w.vfio_listen, ListenUnix(w.vfio_path, SOCK_STREAM, 4));
  }
  VG_TRY_ASSIGN(w.token, NewToken());
  VG_TRY_ASSIGN(UniqueFd adopt, BindAdoptSocket(AdoptPath(w.spec.uuid)));
  int sv[2];
  VG_ERROR_IF(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0, Errc::kIo, "socketpair: {}",
              std::strerror(errno));
  UniqueFd mine(sv[0]), theirs(sv[1]);
  VG_TRY_ASSIGN(UniqueFd c3, HighCopy(theirs.Get()));
  VG_TRY_ASSIGN(UniqueFd c4, HighCopy(w.vfio_listen.Get()));
  VG_TRY_ASSIGN(UniqueFd c5, HighCopy(w.remoting_listen.Get()));
  VG_TRY_ASSIGN(UniqueFd c6, HighCopy(adopt.Get()));
  // F10: the frame fd, a sparse memfd (pages exist only once a screenshot writes them).
  VG_TRY_ASSIGN(w.frame, CreateMemFd("vgpud-frame-" + w.spec.uuid.ToString(), ByteSize{ch::kFrameFdBytes}));
  VG_TRY_ASSIGN(UniqueFd c7, HighCopy(w.frame.Get()));
  // F10: the console's socket, kept across restarts like the others (the port stays).
  if (policy_.vnc && !w.vnc_listen.Valid()) {
    VG_TRY_ASSIGN(auto vnc, ListenTcp(policy_.vnc_listen, policy_.vnc_port));
    w.vnc_listen = std::move(vnc.first);
    w.status.vnc = std::move(vnc.second);
  }
  UniqueFd c8;
  if (w.vnc_listen.Valid()) {
    VG_TRY_ASSIGN(c8, HighCopy(w.vnc_listen.Get()));
  }
  SpawnFds fds;
  fds.dup2s = {{c3.Get(), ch::kChannelFd},
               {c4.Get(), ch::kVfioUserFd},
               {c5.Get(), ch::kRemotingFd},
               {c6.Get(), ch::kAdoptFd},
               {c7.Get(), ch::kFrameFd}};
  if (c8.Valid()) fds.dup2s.push_back({c8.Get(), ch::kVncFd});
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
  argv.emplace_back("--orphan-grace-s");
  argv.push_back(std::to_string(policy_.orphan_grace_s));
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
  if (policy_.sched.enabled()) argv.push_back("--scheduled");
  argv.insert(argv.end(), policy_.worker_args.begin(), policy_.worker_args.end());
  VG_TRY_ASSIGN(pid_t pid, SpawnProcess(argv, fds));
  w.pid = pid;
  w.spawned_at = Clock::now();
  w.last_pong = w.spawned_at;
  w.pinged = false;
  w.kill_reason.reset();
  w.adopted = false;
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
  ch::Record go = ch::Make(ch::Kind::kGo);
  std::copy(w.token.begin(), w.token.end(), go.values.begin());
  // F10: the console's password in Go, never on the command line (/proc/PID/cmdline).
  const std::string& pw = policy_.vnc_password;
  uint64_t packed = 0;
  for (size_t i = 0; i < pw.size() && i < 8; ++i) packed |= uint64_t{static_cast<uint8_t>(pw[i])} << (8 * i);
  go.values[static_cast<size_t>(ch::GoSlot::kVncPassword)] = packed;
  go.values[static_cast<size_t>(ch::GoSlot::kVncPasswordLen)] = std::min<size_t>(pw.size(), 8);
  (void)ch::Send(w.channel.Get(), go);
  w.backlogged_since.reset();  // a new process: its own flood guard
  w.flood_window_start = Clock::now();
  w.backlogged_in_window = {};
  w.send_carried = true;  // (a new Worker has nothing to carry)
  SendSchedConfig(w);    // read once its loop runs, before it says Ready
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
  WriteState(w);
  VG_LOGI("worker {} for {}: pid {}", w.status.restarts ? "restarted" : "started", w.spec.uuid, pid);
  return Ok();
}

// ---- adoption (docs/isolation.md, "Supervisor restart") ---------------------------------------

namespace {

std::string TokenHex(const Token& t) {
  std::string s;
  for (uint64_t v : t) s += fmt::format("{:016x}", v);
  return s;
}

Result<Token> ParseToken(const std::string& s) {
  Token t{};
  VG_ERROR_IF(s.size() != 16 * t.size(), Errc::kBadMessage, "token of {} characters", s.size());
  for (size_t i = 0; i < t.size(); ++i) {
    auto [p, ec] = std::from_chars(s.data() + 16 * i, s.data() + 16 * (i + 1), t[i], 16);
    VG_ERROR_IF(ec != std::errc() || p != s.data() + 16 * (i + 1), Errc::kBadMessage, "token is not hex");
  }
  return t;
}

// The process at pid, checked to be the worker the state file names: a pidfd (so the pid
// cannot be reused under us from here on), its executable, its owner. A pid reused by
// another process fails here or, at the latest, at the adoption socket's SO_PEERCRED.
Result<UniqueFd> OpenVerified(pid_t pid, const std::string& binary) {
  VG_ERROR_IF(pid <= 1, Errc::kBadMessage, "pid {}", pid);
  UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  VG_ERROR_IF(!pidfd.Valid(), Errc::kNotFound, "pid {} is gone", pid);
  struct stat st {};
  VG_ERROR_IF(::stat(fmt::format("/proc/{}", pid).c_str(), &st) != 0 || st.st_uid != ::geteuid(), Errc::kAccessDenied,
              "pid {} is not ours", pid);
  std::error_code ec;
  std::string exe = std::filesystem::read_symlink(fmt::format("/proc/{}/exe", pid), ec).string();
  VG_ERROR_IF(ec, Errc::kAccessDenied, "pid {}: its executable: {}", pid, ec.message());
  constexpr std::string_view kDeleted = " (deleted)";  // the binary was replaced (an upgrade) since
  if (exe.size() > kDeleted.size() && exe.ends_with(kDeleted)) exe.resize(exe.size() - kDeleted.size());
  VG_ERROR_IF(exe != binary, Errc::kAccessDenied, "pid {} runs {}, not {}", pid, exe, binary);
  VG_ERROR_IF(PidfdExited(pidfd.Get(), 0), Errc::kNotFound, "pid {} has ended", pid);
  return pidfd;
}

}  // namespace

void WorkerPool::WriteState(const Worker& w) {
  nlohmann::json attrs = nlohmann::json::array();
  for (const auto& [k, v] : w.spec.attrs) attrs.push_back({k, v});
  nlohmann::json ends = nlohmann::json::array();
  for (uint64_t e : w.status.ends) ends.push_back(e);
  const nlohmann::json j{{"uuid", w.spec.uuid.ToString()},
                         {"type", w.spec.type},
                         {"aperture", w.spec.aperture},
                         {"gtt_entries", w.spec.gtt_entries},
                         {"attrs", attrs},
                         {"pid", w.pid},
                         {"binary", policy_.binary.string()},
                         {"token", TokenHex(w.token)},
                         {"restarts", w.status.restarts},
                         {"address_space", w.status.address_space_limit},
                         {"ends", ends}};
  const std::string path = StatePath(w.spec.uuid), tmp = path + ".tmp";
  UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600));
  const std::string text = j.dump();
  if (!fd.Valid() || ::write(fd.Get(), text.data(), text.size()) != static_cast<ssize_t>(text.size()) ||
      ::rename(tmp.c_str(), path.c_str()) != 0) {
    VG_LOGW("worker for {}: state file {}: {} (a new supervisor could not adopt it)", w.spec.uuid, path,
            std::strerror(errno));
    ::unlink(tmp.c_str());
  }
}

void WorkerPool::RemoveState(const Uuid& uuid) {
  ::unlink(StatePath(uuid).c_str());
  ::unlink(AdoptPath(uuid).c_str());
}

void WorkerPool::LoadStates() {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(policy_.runtime_dir, ec)) {
    const std::string name = e.path().filename().string();
    if (!name.ends_with(".worker")) continue;
    auto uuid = Uuid::Parse(name.substr(0, name.size() - 7));
    struct stat st {};
    UniqueFd fd(::open(e.path().c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
    auto drop = [&](std::string_view why) {
      VG_LOGW("state file {}: {}: removed", e.path().string(), why);
      ::unlink(e.path().c_str());
    };
    if (!uuid) { drop("not a vGPU's"); continue; }
    if (!fd.Valid() || ::fstat(fd.Get(), &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != ::geteuid() ||
        st.st_size > 64 * 1024) {
      drop("not a state file of ours");
      continue;
    }
    std::string text(static_cast<size_t>(st.st_size), '\0');
    if (::read(fd.Get(), text.data(), text.size()) != static_cast<ssize_t>(text.size())) { drop("unreadable"); continue; }
    auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    auto a = std::make_unique<Adoptee>();
    try {
      if (j.is_discarded() || j.value("uuid", "") != uuid->ToString()) throw std::runtime_error("not its vGPU's");
      a->spec.uuid = *uuid;
      a->spec.type = j.at("type").get<std::string>();
      a->spec.aperture = j.at("aperture").get<uint64_t>();
      a->spec.gtt_entries = j.at("gtt_entries").get<uint32_t>();
      for (const auto& kv : j.at("attrs")) a->spec.attrs.emplace_back(kv.at(0).get<std::string>(), kv.at(1).get<std::string>());
      a->pid = j.at("pid").get<pid_t>();
      a->binary = j.at("binary").get<std::string>();
      auto t = ParseToken(j.at("token").get<std::string>());
      if (!t) throw std::runtime_error(t.error().what);
      a->token = *t;
      a->restarts = j.value("restarts", 0u);
      a->address_space = j.value("address_space", uint64_t{0});
      const auto& ends = j.at("ends");
      for (size_t k = 0; k < a->ends.size() && k < ends.size(); ++k) a->ends[k] = ends[k].get<uint64_t>();
    } catch (const std::exception& ex) {
      drop(ex.what());
      continue;
    }
    VG_LOGI("vGPU {} ({}) was running under an earlier supervisor (worker pid {})", *uuid, a->spec.type, a->pid);
    adoptable_.emplace(*uuid, std::move(a));
  }
}

std::vector<WorkerSpec> WorkerPool::Adoptable() const {
  std::vector<WorkerSpec> out;
  for (const auto& [u, a] : adoptable_) out.push_back(a->spec);
  return out;
}

void WorkerPool::DropAdoptable() {
  for (auto& [u, a] : adoptable_) {
    if (auto pidfd = OpenVerified(a->pid, a->binary)) {
      VG_LOGW("vGPU {}: not restored; stopping its worker pid {}", u, a->pid);
      (void)PidfdSignal(pidfd->Get(), SIGKILL);
      (void)PidfdExited(pidfd->Get(), 2000);
    }
    RemoveState(u);
  }
  adoptable_.clear();
}

Result<> WorkerPool::BeginAdopt(const WorkerSpec& spec, Adoptee& a, std::shared_ptr<Waiter> waiter) {
  VG_TRY_ASSIGN(UniqueFd pidfd, OpenVerified(a.pid, a.binary));
  if (a.spec.type != spec.type || a.spec.aperture != spec.aperture || a.spec.gtt_entries != spec.gtt_entries) {
    // Its definition changed while no supervisor ran: the worker serves the old one. It
    // goes (verified to be ours), and a new one serves what is defined now.
    (void)PidfdSignal(pidfd.Get(), SIGKILL);
    (void)PidfdExited(pidfd.Get(), 2000);
    return MakeError(Errc::kBadState, "it serves type {}, the vGPU is now {}", a.spec.type, spec.type);
  }
  // The adoption socket: only the worker listens on it (it called listen()), so the
  // listener's SO_PEERCRED pid must be the one the state file names.
  UniqueFd c(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  VG_ERROR_IF(!c.Valid(), Errc::kIo, "socket: {}", std::strerror(errno));
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  const std::string path = AdoptPath(spec.uuid);
  VG_ERROR_IF(path.size() >= sizeof(sa.sun_path), Errc::kInvalidArgument, "{} too long", path);
  std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);
  VG_ERROR_IF(::connect(c.Get(), reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0, Errc::kNotFound,
              "connect {}: {}", path, std::strerror(errno));
  ucred cred{};
  socklen_t len = sizeof cred;
  VG_ERROR_IF(::getsockopt(c.Get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0, Errc::kIo, "SO_PEERCRED: {}",
              std::strerror(errno));
  VG_ERROR_IF(cred.pid != a.pid || cred.uid != ::geteuid(), Errc::kAccessDenied,
              "{} is served by pid {} uid {}, not the worker's pid {}", path, cred.pid, cred.uid, a.pid);
  VG_ERROR_IF(PidfdExited(pidfd.Get(), 0), Errc::kNotFound, "pid {} has ended", a.pid);
  ch::Record adopt = ch::Make(ch::Kind::kAdopt);
  std::copy(a.token.begin(), a.token.end(), adopt.values.begin());
  VG_ERROR_IF(!ch::Send(c.Get(), adopt), Errc::kIo, "{}: cannot send", path);

  auto w = std::make_unique<Worker>();
  w->pool = this;
  w->spec = spec;
  w->vfio_path = SocketPath(spec.uuid);
  w->remoting_path = RemotingSocketPath(spec.uuid);
  w->token = a.token;
  w->adopted = true;
  w->pid = a.pid;
  w->pidfd = std::move(pidfd);
  w->channel = std::move(c);
  w->state = Worker::State::kStarting;
  w->spawned_at = w->last_pong = Clock::now();
  w->status.restarts = a.restarts;
  w->status.ends = a.ends;
  w->status.open_files_limit = policy_.open_files;
  w->status.address_space_limit = a.address_space;
  w->waiter = std::move(waiter);
  // Queued behind kAdopt: the gate switches from ungated (orphaned) to scheduled, which
  // gives it a fresh grant state; the scheduler adds it when it says Ready.
  SendSchedConfig(*w);
  Worker& ref = *w;
  ref.pid_ev = event_new(base_, ref.pidfd.Get(), EV_READ, &WorkerPool::OnPidfd, &ref);
  ref.channel_ev = event_new(base_, ref.channel.Get(), EV_READ | EV_PERSIST, &WorkerPool::OnChannel, &ref);
  VG_ERROR_IF(!ref.pid_ev || !ref.channel_ev || event_add(ref.pid_ev, nullptr) != 0 ||
                  event_add(ref.channel_ev, nullptr) != 0,
              Errc::kInternal, "event_add for worker {}", spec.uuid);
  workers_.emplace(spec.uuid, std::move(w));
  WriteState(ref);  // this supervisor's binary from now on
  Publish(ref);
  VG_LOGI("vGPU {}: adopting worker pid {}", spec.uuid, ref.pid);
  return Ok();
}

// ---- watching -------------------------------------------------------------------------------

void WorkerPool::Kill(Worker& w, std::string reason, EndKind kind) {
  if (w.pid <= 0) return;
  if (!w.kill_reason) w.kill_reason = std::make_pair(std::move(reason), kind);
  Signal(w, SIGKILL);
}

// Through the pidfd: an adopted worker is not our child, so only the pidfd guarantees the
// pid still names it. A child is not reaped yet either way.
void WorkerPool::Signal(Worker& w, int sig) {
  if (w.pid <= 0) return;
  if (w.pidfd.Valid()) {
    (void)PidfdSignal(w.pidfd.Get(), sig);
  } else if (!w.adopted) {
    ::kill(w.pid, sig);
  }
}

void WorkerPool::OnHeartbeat(int, short, void* arg) {
  auto* self = static_cast<WorkerPool*>(arg);
  for (auto& [uuid, wp] : self->workers_) {
    Worker& w = *wp;
    if (w.pid <= 0 || w.kill_reason) continue;
    if (w.state == Worker::State::kStarting) {
      const int bound = w.adopted ? kAdoptTimeoutMs : self->policy_.start_timeout_ms;
      if (MsSince(w.spawned_at) > bound)
        self->Kill(w, fmt::format("not ready within {} ms of its {}", bound, w.adopted ? "adoption" : "start"),
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
      case ch::RecvStatus::kEmpty:
        self->NoteBacklog(w, false);  // drained
        return;
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
  // A turn's worth read: more left (backlogged), or drained after all.
  if (!w.channel.Valid() || w.kill_reason) return;
  char next;
  self->NoteBacklog(w, ::recv(fd, &next, 1, MSG_PEEK | MSG_DONTWAIT) > 0);
}

// A worker's records cost the loop every vGPU shares. One whose channel this loop left
// undrained (more than a turn's 16 records queued) for kChannelFloodShare of a
// kChannelFloodWindow sends faster than the supervisor reads, which no worker serving a guest
// does (its records drain within a turn or two, however fast its device: a closed-loop
// tenant of tiny work under contention sends a request and a release per submission): a
// puppet flooding the loop. Killed. (Between turns the loop serves the other workers' events,
// so meanwhile the others are delayed by a turn, not stopped.) Time, not a count: what a
// worker may legitimately send depends on the device, and what the loop reads on the host.
void WorkerPool::NoteBacklog(Worker& w, bool backlogged) {
  const auto now = Clock::now();
  if (now - w.flood_window_start >= kChannelFloodWindow) {
    w.flood_window_start = now;
    w.backlogged_in_window = {};
    if (w.backlogged_since) w.backlogged_since = now;
  }
  if (backlogged && !w.backlogged_since) w.backlogged_since = now;
  if (!backlogged && w.backlogged_since) {
    w.backlogged_in_window += now - *w.backlogged_since;
    w.backlogged_since.reset();
  }
  const auto total = w.backlogged_in_window + (w.backlogged_since ? now - *w.backlogged_since : Clock::duration{});
  if (total < kChannelFloodShare) return;
  Kill(w,
       fmt::format("flooded the channel (records faster than the supervisor reads, {} ms of the last {} ms)",
                   std::chrono::duration_cast<std::chrono::milliseconds>(total).count(),
                   std::chrono::duration_cast<std::chrono::milliseconds>(now - w.flood_window_start).count()),
       EndKind::kCrash);
  event_del(w.channel_ev);
}

void WorkerPool::OnRecord(Worker& w, const ch::Record& r) {
  switch (r.kind) {
    case ch::Kind::kReady:
      if (w.state != Worker::State::kStarting) return Kill(w, "said Ready twice", EndKind::kCrash);
      w.state = Worker::State::kRunning;
      w.last_pong = Clock::now();
      w.status.start_latency_us = static_cast<uint64_t>(
          std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - w.spawned_at).count());
      VG_LOGI("worker for {} {} in {} ms (pid {})", w.spec.uuid, w.adopted ? "adopted" : "ready",
              w.status.start_latency_us / 1000, w.pid);
      // (A restarted worker finds its entry kept: Forget.)
      if (policy_.sched.enabled() && !sched_->Status(w.spec.uuid))
        sched_->Add(w.spec.uuid, policy_.sched.policy == SchedPolicy::kEqualShare ? 100 : w.spec.sched.weight,
                    Clock::now());
      ResendShares();  // equal-share: one more running vGPU, a smaller share each
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
      w.carried_health = {r.values[static_cast<size_t>(ch::Counter::kHealth)],
                          r.values[static_cast<size_t>(ch::Counter::kHealthReason)],
                          r.values[static_cast<size_t>(ch::Counter::kHealthRate)]};
      break;
    case ch::Kind::kCarry: {
      // Believed as far as it goes: a successor of this worker starts from it, nobody else.
      if (w.state != Worker::State::kRunning && w.state != Worker::State::kStarting) return;
      auto at = [&](ch::CarrySlot k) { return r.values[static_cast<size_t>(k)]; };
      if (at(ch::CarrySlot::kWhat) & ch::kCarryBuckets)
        w.carry = Worker::Buckets{static_cast<int64_t>(at(ch::CarrySlot::kRateMilliTokens)),
                                  static_cast<int64_t>(at(ch::CarrySlot::kGpuTokensNs)), Clock::now()};
      // (The channel keeps order: this and the pongs, the latest wins.)
      if (at(ch::CarrySlot::kWhat) & ch::kCarryHealth)
        w.carried_health = {at(ch::CarrySlot::kHealth), at(ch::CarrySlot::kHealthReason), at(ch::CarrySlot::kHealthRate)};
      return;
    }
    case ch::Kind::kSchedRequest:
      // (A worker being killed asks for nothing: its entry stays, idle, for its successor.)
      if (w.state != Worker::State::kRunning || w.kill_reason || !policy_.sched.enabled()) return;
      sched_->OnRequest(w.spec.uuid, Clock::now());
      return ArmSched();
    case ch::Kind::kSchedRelease: {
      if (w.state != Worker::State::kRunning || !policy_.sched.enabled()) return;
      auto at = [&](ch::SchedReleaseSlot s) { return r.values[static_cast<size_t>(s)]; };
      sched_->OnRelease(w.spec.uuid, r.seq, at(ch::SchedReleaseSlot::kUsedNs), at(ch::SchedReleaseSlot::kWants) != 0,
                        Clock::now(), at(ch::SchedReleaseSlot::kIdleTailNs));
      return ArmSched();
    }
    case ch::Kind::kScreenshotDone:
      // An answer to the screenshot waiting, or a late one whose caller gave up: dropped.
      if (w.shot && r.seq == w.shot_seq) {
        w.shot->set_value(r);
        w.shot.reset();
      }
      return;
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
  // An adopted worker's parent is init (or a subreaper), which reaps it: its pidfd said it
  // ended, and that is all this supervisor can know.
  const bool known = !w.adopted;
  if (known) {
    const pid_t got = ::waitpid(w.pid, &status, WNOHANG);
    if (got == 0) {  // spurious: not ended yet
      event_add(w.pid_ev, nullptr);
      return;
    }
  }
  const pid_t pid = w.pid;
  w.pid = 0;
  auto [reason, kind] = w.kill_reason ? *w.kill_reason
                        : known       ? NameEnd(status)
                                      : std::make_pair(std::string("ended (adopted from an earlier supervisor: its exit "
                                                                   "status is not ours to read)"),
                                                       EndKind::kExit);
  Forget(w);
  if (w.state == Worker::State::kStopping) {
    if (known) NoteStopped(w.spec.uuid, pid, status, w.late_sigterm);
    else VG_LOGI("worker for {} (pid {}, adopted) stopped", w.spec.uuid, pid);
    std::erase_if(stopping_, [&](const std::unique_ptr<Worker>& p) { return p.get() == &w; });
    return;  // w is gone
  }
  ++w.status.ends[static_cast<size_t>(kind)];
  w.status.last_end = reason;
  w.status.last_end_unix_ms = UnixMs();
  w.status.counters.reset();
  VG_LOGE("worker for {} (pid {}) {}", w.spec.uuid, pid, reason);
  if (w.waiter && w.adopted) {
    // The adoption failed after all: the vGPU is still brought back, by a new worker (its
    // guest reconnects, or its VM loses the device: logged above).
    w.adopted = false;
    if (auto r = Spawn(w); r) {
      Publish(w);
      return;
    } else {
      reason = "adoption failed, and a new worker could not start: " + r.error().what;
    }
  }
  if (w.waiter) {
    // A start that never got Ready fails by name; the Manager records nothing.
    w.waiter->Set(MakeError(Errc::kDeviceLost, "worker for {} {}", w.spec.uuid, reason));
    w.waiter.reset();
    const Uuid u = w.spec.uuid;
    sched_->Remove(u, Clock::now());
    ArmSched();
    CloseSockets(w);
    RemoveState(u);
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
  sched_->Remove(w.spec.uuid, Clock::now());  // (the entry it kept while restarting: Forget)
  ArmSched();
  ResendShares();
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
  w.vnc_listen = UniqueFd();
}

void WorkerPool::Forget(Worker& w) {
  // Its grant (if it held one) goes to the next vGPU. Its scheduler entry stays while a new
  // worker is started (Scheduler::Detach): its debt and counters, and under partitioned its
  // slot, idle (otherwise every other vGPU's slots would move for the restart's while,
  // something a tenant could make happen by crashing its own worker: a timing channel of its
  // own). Fail and a failed start remove it. A stopping worker left the scheduler when it was
  // retired: the entry of its UUID now, if any, is a new worker's.
  if (w.state != Worker::State::kStopping) {
    sched_->Detach(w.spec.uuid, Clock::now());
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
  RemoveState(uuid);  // stopped on purpose: a new supervisor does not bring it back
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
  if (!asked) Signal(*w, SIGTERM);
  w->stop_asked_client = asked;
  stopping_.push_back(std::move(w));
  return stopping_.back().get();
}

Result<> WorkerPool::Stop(const Uuid& uuid) {
  return loop_.Call<void>([this, uuid]() -> Result<> {
    VG_ERROR_IF(workers_.count(uuid) == 0, Errc::kNotFound, "vGPU {} has no worker", uuid);
    Worker* w = Retire(uuid, /*ask_client=*/true);
    ResendShares();  // equal-share: one fewer running vGPU (a restarting one still counts)
    if (w) {
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
  w.pool->Signal(w, SIGKILL);
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

// F10: the frame the vGPU scans out. The worker is asked on the channel and writes the frame
// to the frame fd; we wait here, on the control thread (never the loop), at most timeout_ms,
// and read it back with pread after checking every size the worker claims: it may lie.
Result<ScanoutImage> WorkerPool::Screenshot(const Uuid& uuid, int timeout_ms) {
  // One at a time: the frame fd holds one frame.
  static std::mutex one_at_a_time;
  std::lock_guard lk(one_at_a_time);
  struct Asked {
    std::future<ch::Record> done;
    UniqueFd frame;
    uint64_t seq;
  };
  VG_TRY_ASSIGN(Asked asked, loop_.Call<Asked>([&]() -> Result<Asked> {
    Worker* w = Find(uuid);
    VG_ERROR_IF(!w, Errc::kNotFound, "vGPU {} has no worker", uuid);
    VG_ERROR_IF(w->state != Worker::State::kRunning || !w->channel.Valid(), Errc::kBadState,
                "vGPU {} is {}, not running", uuid, Worker::StateName(w->state));
    VG_ERROR_IF(!w->frame.Valid(), Errc::kUnsupported,
                "vGPU {}'s worker was adopted from an earlier supervisor: no frame fd (restart the vGPU)", uuid);
    VG_TRY_ASSIGN(UniqueFd copy, w->frame.Dup());
    w->shot = std::make_shared<std::promise<ch::Record>>();
    Asked a{w->shot->get_future(), std::move(copy), ++w->shot_seq};
    VG_ERROR_IF(!ch::Send(w->channel.Get(), ch::Make(ch::Kind::kScreenshot, a.seq)), Errc::kBusy,
                "worker channel full");
    return a;
  }));
  VG_ERROR_IF(asked.done.wait_for(std::chrono::milliseconds(timeout_ms)) != std::future_status::ready,
              Errc::kTimeout, "vGPU {}: no frame within {} ms", uuid, timeout_ms);
  ch::Record r;
  try {
    r = asked.done.get();
  } catch (const std::future_error&) {  // the worker ended meanwhile: its promise went with it
    return MakeError(Errc::kPeerClosed, "vGPU {}: the worker ended before it sent the frame", uuid);
  }
  auto at = [&](ch::ScreenshotSlot s) { return r.values[static_cast<size_t>(s)]; };
  const uint64_t code = at(ch::ScreenshotSlot::kErrc);
  VG_ERROR_IF(code == static_cast<uint64_t>(Errc::kBadState), Errc::kBadState,
              "vGPU {} scans nothing out (its guest has not enabled a display plane)", uuid);
  VG_ERROR_IF(code != 0, ErrcFromValue(static_cast<uint32_t>(std::min<uint64_t>(code, 0xFFFF))),
              "vGPU {}: the worker could not copy the frame", uuid);
  ScanoutImage img;
  const uint64_t w = at(ch::ScreenshotSlot::kWidth), h = at(ch::ScreenshotSlot::kHeight);
  const uint64_t fmt_ = at(ch::ScreenshotSlot::kFormat), bytes = at(ch::ScreenshotSlot::kBytes);
  const uint32_t bpp = fmt_ <= 0xFFFF ? abi::display::BytesPerPixel(static_cast<uint32_t>(fmt_)) : 0;
  VG_ERROR_IF(w == 0 || h == 0 || w > abi::display::kMaxWidth || h > abi::display::kMaxHeight || bpp == 0 ||
                  bytes != w * h * bpp || bytes > ch::kFrameFdBytes,
              Errc::kBadMessage, "vGPU {}: the worker described an impossible frame ({}x{}, format {}, {} bytes)",
              uuid, w, h, fmt_, bytes);
  img.width = static_cast<uint32_t>(w);
  img.height = static_cast<uint32_t>(h);
  img.format = static_cast<uint32_t>(fmt_);
  img.flips = at(ch::ScreenshotSlot::kFlips);
  img.pixels.resize(bytes);
  size_t done = 0;
  while (done < bytes) {
    const ssize_t n = ::pread(asked.frame.Get(), img.pixels.data() + done, bytes - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    VG_ERROR_IF(n <= 0, Errc::kIo, "frame fd of {}: {}", uuid, n == 0 ? "short" : std::strerror(errno));
    done += static_cast<size_t>(n);
  }
  // Give the pages back: the next screenshot writes them again.
  (void)::fallocate(asked.frame.Get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                    static_cast<off_t>(ch::kFrameFdBytes));
  return img;
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
      Signal(*w, SIGTERM);
    }
  const auto deadline = Clock::now() + std::chrono::milliseconds(policy_.stop_grace_ms);
  for (auto& w : stopping_) {
    int status = 0;
    while (w->pid > 0) {
      if (w->adopted ? PidfdExited(w->pidfd.Get(), 0) : ::waitpid(w->pid, &status, WNOHANG) == w->pid) break;
      if (Clock::now() >= deadline) {
        Signal(*w, SIGKILL);
        if (w->adopted) (void)PidfdExited(w->pidfd.Get(), 1000);
        else ::waitpid(w->pid, &status, 0);
        break;
      }
      pollfd p{w->pidfd.Get(), POLLIN, 0};
      (void)::poll(&p, 1, 50);
    }
    if (w->pid > 0 && !w->adopted) NoteStopped(w->spec.uuid, w->pid, status, w->late_sigterm);
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
