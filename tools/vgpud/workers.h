#pragma once
// The supervisor's side of the worker processes (docs/isolation.md): one sandboxed
// vgpud-worker per running vGPU. The pool binds each vGPU's sockets itself and keeps them
// across restarts (a guest that reconnects finds the same path), hands them to the worker
// it spawns, watches it through a heartbeat on its channel and through its pidfd, names
// every end (crash, seccomp kill, missed heartbeat, memory), and restarts it per policy.
//
// Threads. Everything here belongs to the supervisor's loop thread; Start/Stop/Fault hand
// their work to it (LoopTasks) and only Start waits, off the loop, for the worker's Ready,
// bounded. Status() reads a snapshot under its own lock and never waits on a worker.

#include <sys/types.h>

#include <array>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "base/base.h"
#include "tools/vgpud/loop_tasks.h"
#include "tools/vgpud/scheduler.h"
#include "tools/vgpud/worker_channel.h"

struct event_base;
struct event;

namespace vg::sandbox {
class CgroupParent;
}

namespace vg::daemon {

enum class RestartPolicy { kOnFailure, kNever };
std::string_view RestartPolicyName(RestartPolicy p);
Result<RestartPolicy> ParseRestartPolicy(std::string_view s);

// F7: when a vGPU is throttled and quarantined for its fault rate (docs/management.md, "Fault
// health"). Every worker gets these (--fault-*, --throttle-rate); the defaults are the
// device model's (mediator::FaultPolicy), which the supervisor does not link.
struct FaultThresholds {
  uint32_t window_ms = 1000;
  uint32_t throttle_per_s = 100;   // 0: the monitor only counts
  uint32_t quarantine_per_s = 25;  // 0: never quarantined
  uint32_t throttle_rate = 50;     // submissions/s while throttled; 0: not slowed
  uint32_t quiet_ms = 2000;
};

struct WorkerPolicy {
  std::filesystem::path binary;  // vgpud-worker
  std::string runtime_dir;
  std::vector<std::string> worker_args;  // every worker gets these (--gpu, --dma-*, --log-level)
  int heartbeat_ms = 250;
  int watchdog_ms = 4000;       // no pong for this long: killed, reported, restarted
  int start_timeout_ms = 20000;  // spawn to Ready
  int stop_grace_ms = 3000;     // SIGTERM to SIGKILL
  // F8: Stop() of a vGPU whose client registered REQ: how long the client has to release the
  // device after REQ before the worker disconnects it (then stop_grace_ms before SIGKILL).
  int stop_request_timeout_ms = 5000;
  RestartPolicy restart = RestartPolicy::kOnFailure;
  uint32_t max_restarts = 3;     // within restart_window_s; then the vGPU is left failed
  int restart_window_s = 60;
  // Per worker. Memory: cgroup v2 memory.max where the host delegates one to vgpud, else
  // RLIMIT_AS of (own allowance + aperture + --dma-max-bytes), since guest RAM mapped by
  // DMA_MAP is address space of the worker's too.
  uint64_t memory_bytes = 2ull << 30;
  uint64_t dma_max_bytes = 64ull << 30;
  uint32_t cpu_percent = 0;     // cgroup v2 cpu.max; 0: no cap
  uint64_t open_files = 1024;
  bool seccomp = true;
  // A worker whose supervisor died serves on; without a client for this long it exits
  // (docs/isolation.md, "Supervisor restart").
  uint32_t orphan_grace_s = 60;
  FaultThresholds faults;
  SchedOptions sched;
  // F10: a VNC console per vGPU (docs/management.md "Display"), on vnc_listen (loopback by
  // default), port vnc_port (0: the kernel picks one; else the first free one from it on);
  // vnc_password (at most 8 bytes, VNC authentication's limit), empty: none.
  bool vnc = true;
  std::string vnc_listen = "127.0.0.1";
  uint16_t vnc_port = 0;
  std::string vnc_password;
};

// A vGPU's share and limits (type, overridden per instance; changeable while it runs).
struct SchedParams {
  uint32_t weight = 100;
  uint64_t rate_limit = 0;         // guest submissions per second; 0: none
  uint64_t rate_burst = 0;         // 0: rate_limit / 10, at least 1
  uint64_t gpu_time_limit_ns = 0;  // device ns per second; 0: none
  uint64_t gpu_time_burst_ns = 0;  // 0: a tenth of a second's worth, at least 1 ms
  uint32_t frame_limit = 0;        // F10: scan-out commits presented per second; 0: none
  bool operator==(const SchedParams&) const = default;
};

struct WorkerSpec {
  Uuid uuid;
  std::string type;
  uint64_t aperture = 0;
  uint32_t gtt_entries = 0;
  SchedParams sched;
  // The instance's attributes as applied (mdev::Attributes), kept in the worker's state file
  // so that a new supervisor brings a transient vGPU back as it was. Opaque to the pool.
  std::vector<std::pair<std::string, std::string>> attrs;
  // fixed-share: the vGPU's share of the engine is 1 / this (its type's max_instances).
  uint32_t fixed_share_of = 1;
};

// Why worker processes ended, by kind (a counter per kind per vGPU).
enum class EndKind : uint8_t { kCrash, kSeccomp, kWatchdog, kOutOfMemory, kKilled, kExit, kCount };
std::string_view EndKindName(EndKind k);

struct WorkerStatus {
  std::string type;   // the vGPU's type id
  std::string state;  // starting, running, restarting, failed, stopping
  pid_t pid = 0;      // 0 when no process runs
  uint32_t restarts = 0;
  std::array<uint64_t, static_cast<size_t>(EndKind::kCount)> ends{};
  std::string last_end;  // the reason, "" when none
  int64_t last_end_unix_ms = 0;
  std::optional<uint64_t> heartbeat_age_ms;  // since the last pong, while running
  std::chrono::steady_clock::time_point last_heartbeat;
  uint64_t pong_seq = 0;  // the ping the counters answer
  std::optional<std::array<uint64_t, std::tuple_size_v<decltype(channel::Record::values)>>> counters;  // the last pong's (channel::Counter)
  uint64_t start_latency_us = 0;  // spawn to Ready, the last start
  // Limits as applied, and usage as the supervisor reads it from /proc (never the worker).
  uint64_t address_space_limit = 0;  // 0: none
  uint64_t open_files_limit = 0;
  std::string cgroup;  // "" without one
  uint64_t memory_max = 0;
  uint32_t cpu_percent = 0;
  uint64_t rss_bytes = 0;
  uint32_t fds = 0;
  uint32_t threads = 0;
  bool seccomp = false;
  bool no_new_privs = false;
  SchedParams sched_params;
  std::optional<SchedEntryStatus> sched;  // while the scheduler knows it (running)
  uint64_t share_cap_ns = 0;              // equal-/fixed-share: engine ns per second it may use
  std::string vnc;                        // F10: the console's "ADDR:PORT", "" when none
};

// Supervisor restart (docs/isolation.md, "Supervisor restart"). For each vGPU it runs, the
// pool keeps a state file <runtime_dir>/<uuid>.worker (0600): the spec, the worker's pid and
// binary, a random adoption token, its restart and end counts. A worker whose supervisor
// dies keeps serving and listens on <uuid>.adopt.sock; a new supervisor reads the state
// files at start-up and, for each, adopts the live worker (its identity checked: pidfd,
// /proc/PID/exe, owner, SO_PEERCRED pid of the adoption socket, the token) or starts a
// fresh one. A clean stop removes the state file; a crash leaves it.
// F10: a frame copied out of a vGPU's scan-out (rows packed; abi::display formats).
struct ScanoutImage {
  uint32_t width = 0, height = 0, format = 0;
  uint64_t flips = 0;
  std::vector<uint8_t> pixels;
};

class WorkerPool {
 public:
  static Result<std::unique_ptr<WorkerPool>> Create(event_base* base, LoopTasks& loop, WorkerPolicy policy);
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // Binds <uuid>.sock and <uuid>.remote.sock, spawns the worker and returns the vfio-user
  // socket's path once the worker serves it (Ready), or the named reason it did not within
  // start_timeout_ms. Any thread; on the loop thread only before the loop runs (main).
  Result<std::string> Start(const WorkerSpec& spec);
  // Unlinks the sockets (new connections are refused at once), asks the worker to stop and
  // returns. A running worker is asked on its channel: it signals REQ to its vfio-user client
  // and stops once the client has gone or stop_request_timeout_ms passed, then has
  // stop_grace_ms before SIGKILL; a worker not yet running gets SIGTERM and stop_grace_ms.
  // Never waits for the process.
  Result<> Stop(const Uuid& uuid);
  // F8: vgpuctl reset: the running worker resets its device model (as the RESET register).
  // Returns once asked; the reset itself never waits for the engine.
  Result<> Reset(const Uuid& uuid);
  // F10: vgpuctl screenshot: the frame the running vGPU scans out, rows packed. Waits (on the
  // caller's thread, never the loop) at most timeout_ms for the worker.
  Result<ScanoutImage> Screenshot(const Uuid& uuid, int timeout_ms);
  // Test builds' workers act on it (docs/isolation.md); others log it.
  Result<> Fault(const Uuid& uuid, channel::Fault f);
  // New weight and limits for a vGPU, applied to its running worker at once and kept for
  // its restarts. Any thread.
  Result<> Reconfigure(const Uuid& uuid, const SchedParams& p,
                       std::optional<std::vector<std::pair<std::string, std::string>>> attrs = std::nullopt);
  // The vGPUs an earlier supervisor left running (their state files), before the loop runs.
  // Start() with the same uuid adopts the worker if it is alive, verified and of the same
  // spec; else it stops a verified one of another spec and starts afresh.
  std::vector<WorkerSpec> Adoptable() const;
  // After the restore: what no Start() took is dropped (a verified live worker is stopped,
  // the state file removed). Before the loop runs.
  void DropAdoptable();
  // The pool's snapshot plus /proc. fresh_ms > 0: first asks a running worker for a pong
  // and waits for it at most that long (never from the loop thread), so the counters are
  // the worker's of now, not of the last heartbeat; past the bound, the last ones.
  std::optional<WorkerStatus> Status(const Uuid& uuid, int fresh_ms = 0);
  // The vGPUs the pool holds, in any state, from its snapshot: any thread, never waits on
  // the loop or on a worker (the metrics endpoint lists them on the loop thread).
  std::vector<Uuid> List() const;
  // Shutdown, after the loop has exited: every worker stopped and reaped (bounded).
  void StopAll();
  // Workers asked to stop that did not exit 0 (crashed on the way out, a sanitizer
  // report; not those killed after the grace period): the supervisor's exit status reports them.
  uint64_t unclean_stops() const { return unclean_stops_; }

  std::string SocketPath(const Uuid& uuid) const;
  std::string RemotingSocketPath(const Uuid& uuid) const;
  const WorkerPolicy& policy() const { return policy_; }
  // "" when workers get rlimits only (with the reason in cgroup_note()).
  std::string cgroup_root() const;
  const std::string& cgroup_note() const { return cgroup_note_; }

  struct Worker;
  struct Waiter;
  struct Adoptee;

 private:
  WorkerPool(event_base* base, LoopTasks& loop, WorkerPolicy policy);
  Result<> BeginStart(const WorkerSpec& spec, std::shared_ptr<Waiter> waiter);
  Result<> BeginAdopt(const WorkerSpec& spec, Adoptee& a, std::shared_ptr<Waiter> waiter);
  void LoadStates();
  void WriteState(const Worker& w);
  void RemoveState(const Uuid& uuid);
  std::string StatePath(const Uuid& uuid) const;
  std::string AdoptPath(const Uuid& uuid) const;
  void Signal(Worker& w, int sig);
  Result<> Spawn(Worker& w);
  void Kill(Worker& w, std::string reason, EndKind kind);
  void OnExit(Worker& w);
  void OnRecord(Worker& w, const channel::Record& r);
  void Forget(Worker& w);  // closes the worker's process-side fds and events
  void CloseSockets(Worker& w);
  bool Ping(Worker& w);
  Worker* Retire(const Uuid& uuid, bool ask_client = false);
  void ScheduleRestart(Worker& w);
  void Fail(Worker& w);
  void Publish(const Worker& w);
  void NoteStopped(const Uuid& uuid, pid_t pid, int status, bool late_sigterm = false);
  static void OnHeartbeat(int, short, void* arg);
  static void OnChannel(int fd, short, void* arg);
  static void OnPidfd(int fd, short, void* arg);
  static void OnRestart(int, short, void* arg);
  static void OnStopDeadline(int, short, void* arg);
  static void OnSchedTimer(int, short, void* arg);
  void SendSchedConfig(Worker& w);
  void NoteBacklog(Worker& w, bool backlogged);
  uint64_t ShareCap(const Worker& w) const;  // ns per second; 0: no cap (best-effort, off)
  void ResendShares();                       // equal-share: the running set changed
  void ArmSched();
  Worker* Find(const Uuid& uuid);

  event_base* base_;
  LoopTasks& loop_;
  WorkerPolicy policy_;
  std::unique_ptr<sandbox::CgroupParent> cgroups_;
  std::string cgroup_note_;
  event* heartbeat_ev_ = nullptr;
  event* sched_ev_ = nullptr;
  std::unique_ptr<Scheduler> sched_;  // loop thread
  std::map<Uuid, std::unique_ptr<Worker>> workers_;   // loop thread
  std::vector<std::unique_ptr<Worker>> stopping_;     // loop thread: stopped, not yet reaped
  uint64_t unclean_stops_ = 0;  // loop thread
  mutable std::mutex snap_mu_;
  std::condition_variable snap_cv_;  // a snapshot changed
  std::map<Uuid, WorkerStatus> snaps_;  // under snap_mu_
  std::map<Uuid, std::unique_ptr<Adoptee>> adoptable_;  // loop thread (main, before the loop runs)
};

// `vgpud-worker --probe`: the engine's device as the worker sees it, in a child process, so
// the supervisor never loads a GPU driver. Bounded by timeout_ms.
struct ProbedDevice {
  std::string name, driver, summary;
  int kind = 0;  // engine::DeviceKind
  uint32_t vendor_id = 0, device_id = 0;
};
Result<ProbedDevice> ProbeDevice(const std::filesystem::path& binary, const std::vector<std::string>& args,
                                 int timeout_ms);

}  // namespace vg::daemon
