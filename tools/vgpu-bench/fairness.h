#pragma once
// The host scheduler's groups (F7, docs/ab-methodology.md "Fairness and noisy neighbours"):
//   fairness  N busy vGPUs on one daemon, equal weights and a 1:2:4 mix: each tenant's share
//             of the completed work per 100 ms window against weight / sum(weights), and
//             Jain's index over the run;
//   noisy     a light tenant's closed-loop latency alone, next to 1 and next to 7 heavy
//             tenants, against "p99 with neighbours <= p99 alone + 2 x time slice".
// Each configuration runs on a vgpud with `--sched weighted` and, as the baseline, on a second
// vgpud with `--sched off`, one after the other in the same run. Every tenant is a separate
// guest process (this program in its tenant mode) driving its own vGPU through the guest
// library, and records the time of each completion in shared memory. Not a path ratio: its
// own section in every output, like lifecycle.

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/base.h"
#include "tools/bench/stats.h"

namespace vg::bench {

// ---- Analysis: numbers in, figures out (fairness_stats.cc, tested on synthetic data) --------

// Shares of completed work per window against each tenant's entitlement, weight / sum(weights).
// Every tenant is busy throughout (the runner checks it is backlogged), so every tenant is
// entitled in every window. A window in which nothing completed is counted, not judged.
struct ShareFigures {
  uint32_t windows = 0;        // whole windows of window_s in [begin, end)
  uint32_t empty_windows = 0;  // of them, windows in which no tenant completed anything
  // |share - entitled| over every (tenant, judged window): in percentage points of the
  // engine's work, and relative to the tenant's entitled share (in %).
  double mean_abs_pp = 0, max_abs_pp = 0;
  double mean_abs_rel_pct = 0, max_abs_rel_pct = 0;
  // Fraction of judged windows in which every tenant is within ±tolerance: in percentage
  // points, and relative to its entitled share.
  double within_pp = 0, within_rel = 0;
  // Jain's fairness index of completions / weight over [begin, end): 1 when every tenant got
  // exactly its weight's share, 1/n when one got everything.
  double jain = 0;
  std::vector<uint64_t> completions;  // per tenant in [begin, end)
  std::vector<double> share;          // per tenant, of all completions in [begin, end)
  std::vector<double> entitled;       // per tenant: weight / sum(weights)
  std::vector<std::vector<uint32_t>> per_window;  // [window][tenant] completions
  uint32_t min_window_total = 0, median_window_total = 0;  // completions per window, all tenants
};

// done_s[i]: tenant i's completion times (s, any common origin; any order). Windows of
// window_s from begin_s; a partial last window is left out.
ShareFigures AnalyzeShares(const std::vector<std::vector<double>>& done_s, const std::vector<double>& weights,
                           double begin_s, double end_s, double window_s, double tolerance_pct);

// (sum x)^2 / (n sum x^2); 0 for no samples or all zero.
double JainIndex(std::span<const double> x);

// ---- The runner ------------------------------------------------------------------------

// A vgpud of the group's, started by the caller (vgpu-bench's main) with no vGPU and the
// scheduling mode asked for; the group starts and stops its vGPUs on the control socket.
struct SchedDaemon {
  std::string control;
  pid_t pid = 0;
  std::shared_ptr<void> keep;  // the daemon runs until the last copy goes
};
// weighted: `--sched <SchedOptions::policy> --sched-slice-us slice_us`; else `--sched off`.
using SchedDaemonFactory = std::function<Result<SchedDaemon>(bool weighted, uint64_t slice_us)>;

struct SchedOptions {
  bool fairness = true, noisy = true;
  std::vector<int> tenant_counts{2, 4, 8, 16};  // fairness: busy vGPUs per configuration
  double warmup_s = 0.5;   // after "go", before the measured interval (not judged)
  double measure_s = 3.0;  // fairness: the measured interval
  double window_s = 0.1;
  double tolerance_pct = 5;
  double kernel_us = 1000;        // fairness: the spin dispatch each tenant keeps in flight
  // fairness: dispatches each tenant keeps submitted (vgpu-bench --fairness-in-flight): a
  // queue of several slices, so the tenant is still busy when it is preempted. The work a
  // grant admits to the device grows with it (docs/ab-methodology.md).
  uint32_t in_flight = 8;
  std::vector<int> heavy_counts{0, 1, 7};  // noisy: heavy neighbours of the light tenant
  // noisy: the light tenant's pause after each completion. 0: a closed loop, as busy as a
  // tenant of small work can be (it wants more than its share next to 7 busy ones, and the
  // scheduler makes it wait for it); 1000: an interactive tenant, well under its share.
  std::vector<uint32_t> light_think_us{0, 1000};
  double noisy_s = 3.0;           // noisy: the measured interval
  double heavy_kernel_us = 10000;  // noisy: each heavy tenant's spin dispatch
  uint32_t heavy_in_flight = 3;
  uint64_t slice_us = 2000;       // vgpud --sched-slice-us (its default)
  // The "on" daemon's --sched (vgpu-bench --sched-policy): best-effort, the default the
  // targets are for; partitioned etc. to measure what another policy costs the same tenants.
  std::string policy = "best-effort";
  uint64_t guest_ram = 16ull << 20;
  std::string gpu;                // the native engine's device, for the calibration
  bool progress = true;
};

// The spin kernel's iteration counts for the group's targets, measured on the native path
// before any tenant runs (the calibration module's two-point fit), and native's own time for
// each count: the precondition that a "~1 ms" dispatch holds about 1 ms of work.
struct SchedSpin {
  double target_us = 0;
  uint32_t iterations = 0;
  double native_p50_us = 0;
  bool ok = false;  // native_p50_us >= kCalibrationTolerance x target_us, and the plan checked
};

// One tenant of a configuration, as measured.
struct TenantFigures {
  std::string uuid;
  double weight = 0;        // as the daemon reports it (show: scheduler.weight)
  uint64_t completions = 0;  // in the measured interval
  uint64_t observed = 0;     // completions seen after go (all of them, warm-up included)
  uint64_t dry = 0;          // of those, seen with nothing of this tenant's still queued
  double device_ms = 0;      // show: counters.gpu_time_ns, over the measured interval
  double device_per_dispatch_us = 0;  // device_ms / completions
  // The scheduler's view over the interval (show: scheduler; --sched weighted only).
  uint64_t grants = 0, preemptions = 0;
  double sched_used_ms = 0;  // device time reported at the releases of its grants
  double wait_ms = 0;        // time waiting for a grant (added up when the grant comes)
  double charged_ms = 0;     // show: scheduler.charged_ms (held while others were busy)
  double held_ms = 0;        // counters.queue_wait_ns: its work held back by the gate (grant, limits)
  std::string sched_state_at_end;
  // The part of the interval it had work: (held_ms + device_ms) / interval (fairness.cc
  // kMinBusy: the backlog check).
  double busy = 0;
};

struct FairnessRun {
  std::string weights;  // "equal" or "mixed"
  bool weighted = false;
  int tenants = 0;
  double measured_s = 0;
  ShareFigures shares;
  double device_jain = 0;                // Jain of device time / weight (the daemon's accounting)
  double grant_ms = 0;                   // weighted: device time per grant (sum used / sum grants)
  std::vector<double> device_share;      // per tenant: device time / all tenants' device time
  std::vector<TenantFigures> tenant;
  uint32_t niced = 0;                    // tenants that ran at nice -5 (fairness.cc kTenantNice)
  std::vector<std::string> errors;       // failed preconditions of this run, loudly
  bool ok() const { return errors.empty(); }
};

struct NoisyRun {
  bool weighted = false;
  int heavy = 0;
  uint32_t think_us = 0;              // the light tenant's pause after each completion
  Stats light_us;                     // the light tenant's submit -> fence seen, in the interval
  double light_wait_per_grant_ms = 0;  // weighted: the light tenant's wait for a grant, per grant
  double light_charged_per_grant_ms = 0;  // weighted: the time it was charged per grant
  double light_charged_share = 0;         // weighted: its part of all tenants' charged time
  double heavy_grant_ms = 0;           // weighted: the heavy tenants' device time per grant
  double heavy_busy = 0;               // the heavy tenants' device time / the interval
  std::vector<TenantFigures> tenant;  // the light tenant first, then the heavy ones
  uint32_t niced = 0;
  std::vector<std::string> errors;
  bool ok() const { return errors.empty(); }
};

struct SchedReport {
  bool ran = false;
  SchedOptions options;
  std::vector<SchedSpin> spin;      // fairness kernel, heavy kernel
  std::vector<FairnessRun> fairness;
  std::vector<NoisyRun> noisy;
  std::vector<std::string> errors;  // failures outside a run (a daemon, the calibration)
  bool complete() const;            // ran, nothing failed
};

SchedReport MeasureSched(const SchedOptions& o, const SchedDaemonFactory& make_daemon);

std::string FormatSched(const SchedReport& r);
// Adds "fairness" and/or "noisy" (whichever ran) to the study's JSON.
void AddSchedJson(const SchedReport& r, nlohmann::json& j);
// The summary's sentences: the targets, MET/MISSED, and every failed precondition.
void SummarizeSched(const SchedReport& r, std::vector<std::string>& summary);

// The tenant mode: `vgpu-bench --sched-tenant FD INDEX` (started by the runner, never by hand).
bool IsSchedTenant(int argc, char** argv);
int SchedTenantMain(int argc, char** argv);

}  // namespace vg::bench
