#pragma once
// The lifecycle group (F13): how long a vGPU takes to start and stop under the supervisor,
// and what an idle worker process costs in memory. Not a native/mediated/remoting ratio:
// it has its own section in every output (docs/ab-methodology.md, "Lifecycle").

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/base.h"
#include "tools/bench/stats.h"

namespace vg::bench {

struct LifecycleOptions {
  std::string control;     // the daemon's control socket
  pid_t supervisor = 0;    // the daemon (its RSS/PSS is reported)
  std::string type = "small";
  int cycles = 30;         // start/stop cycles measured, after the warm-up
  int warmup = 3;          // cycles run first and discarded
  int idle_workers = 4;    // vGPUs started and left idle for the memory figures
  int control_timeout_ms = 30000;  // per control request; a start may wait for a worker
  int vfio_timeout_ms = 5000;      // connect + VERSION
  int exit_timeout_ms = 10000;     // stop -> worker gone (vgpud's SIGKILL comes after 3 s)
  bool progress = true;
};

// Memory of one process, from /proc/<pid>/status and /proc/<pid>/smaps_rollup (0: unreadable).
struct ProcessMemory {
  pid_t pid = 0;
  uint64_t rss_bytes = 0;        // VmRSS
  uint64_t pss_bytes = 0;        // Pss: shared pages (lavapipe, LLVM) divided among their users
  uint64_t pss_anon_bytes = 0;   // Pss_Anon
  uint64_t pss_file_bytes = 0;   // Pss_File
  uint64_t pss_shmem_bytes = 0;  // Pss_Shmem (memfds: the aperture, once touched)
  uint64_t show_rss_bytes = 0;   // the supervisor's own reading (show: worker.usage.rss_bytes)
  uint32_t fds = 0;              // show: worker.usage.fds
  uint32_t threads = 0;          // show: worker.usage.threads
};

// mean and max of one per-worker figure.
struct MeanMax {
  double mean = 0, max = 0;
};

struct LifecycleReport {
  bool ran = false;
  std::string type;
  int requested_cycles = 0;
  int warmup = 0;
  int succeeded_cycles = 0;         // measured cycles that completed (warm-up not counted)
  Stats start_reply_us;             // (a) "start" sent -> its reply read
  Stats start_to_version_us;        // (b) "start" sent -> vfio-user VERSION answered on the socket
  Stats spawn_to_ready_us;          // (c) show: worker.start_latency_us (the supervisor's clock)
  Stats stop_reply_us;              // (d) "stop" sent -> its reply read (the supervisor has sent SIGTERM)
  Stats stop_to_exit_us;            // (e) "stop" sent -> the worker process has exited (its pidfd)
  int idle_requested = 0;
  std::vector<ProcessMemory> idle;  // one per idle worker measured
  MeanMax rss, pss, pss_anon, pss_shmem, fds, threads;
  ProcessMemory supervisor;         // with the idle workers running
  std::vector<std::string> errors;  // every failed precondition, loudly
  bool complete() const {
    return ran && errors.empty() && succeeded_cycles == requested_cycles &&
           static_cast<int>(idle.size()) == idle_requested;
  }
};

// One request on a daemon's control socket and its reply line, on a fresh connection, all of
// it bounded by timeout_ms; a refusal ({"ok": false}) is an error with the daemon's words.
// (The scheduler groups start, show and stop their vGPUs with it too.)
Result<nlohmann::json> ControlRequest(const std::string& path, const nlohmann::json& req, int timeout_ms);

// What the daemon says about one running vGPU (`show` on its control socket): its effective
// weight and scheduling mode, the device time charged to it so far, and the scheduler's view.
struct Shown {
  std::string scheduling;
  double weight = 0;
  uint64_t gpu_time_ns = 0;
  std::string state;
  // The scheduler's view (weighted only): grants, preemptions, device and waiting time.
  uint64_t grants = 0, preemptions = 0;
  double used_ms = 0, wait_ms = 0, charged_ms = 0;
  std::string sched_state;    // idle, waiting, running
  uint64_t queue_wait_ns = 0;  // the worker: time its work was held back (counts a hold in progress)
};
Result<Shown> ShowVgpu(const std::string& control, const std::string& uuid);

// Runs the cycles, then the idle measurement, on a running daemon. Failures of single
// cycles are recorded in the report (errors) rather than returned: the caller decides.
LifecycleReport MeasureLifecycle(const LifecycleOptions& o);

std::string FormatLifecycle(const LifecycleReport& r);
nlohmann::json LifecycleJson(const LifecycleReport& r);
std::string LifecycleCsv(const LifecycleReport& r);

}  // namespace vg::bench
