#pragma once
// The A/B study: workloads x paths, interleaved repetitions, floors, ratios, reports.

#include <functional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/base.h"
#include "tools/bench/stats.h"
#include "tools/vgpu-bench/agreement.h"
#include "tools/vgpu-bench/calibration.h"
#include "tools/vgpu-bench/covert.h"
#include "tools/vgpu-bench/desktop.h"
#include "tools/vgpu-bench/fairness.h"
#include "tools/vgpu-bench/floors.h"
#include "tools/vgpu-bench/lifecycle.h"
#include "tools/vgpu-bench/paths.h"
#include "tools/vgpu-bench/verdict.h"

namespace vg::bench {

// An ablation (docs/ab-methodology.md "Ablations"): rows of the mediated path that differ
// from its reference row in one factor, run on the workload groups where that factor
// matters, side by side and interleaved with every other path of those workloads (the same
// native baseline, the same rotation).
struct AblationRow {
  std::string path;   // the path's name, e.g. "mediated-posted"
  std::string label;  // what it is, e.g. "posted MMIO: RING_TAIL REGION_WRITE, no reply (QEMU 10.1)"
};
struct Ablation {
  std::string name;                  // doorbell, executor, memory, gtt
  std::string factor;                // what varies, in words
  std::set<std::string> groups;      // the workload groups it runs on
  std::vector<AblationRow> rows;     // the reference row first
  std::vector<std::string> not_run;  // rows this run could not make, each with why
  // Within those groups, only the workloads whose name starts with one of these (empty: all).
  std::vector<std::string> cases;
  const std::string& reference() const { return rows.front().path; }
  bool RunsOn(const Workload& w) const;
};

struct StudyOptions {
  enum class Size { kSmoke, kQuick, kFull } size = Size::kQuick;
  std::set<std::string> groups;  // empty: all
  std::set<std::string> paths;   // empty: all
  int reps = 5;
  int iters = 0;                 // 0: by size
  std::string out_dir = "study-out";
  bool progress = true;
  // Test hook (tests/bench/smoke_test.cc): every calibration attempt reads a spin iteration
  // as 1 s, as a burst of load during the long timing would, so every spin row gets the same
  // clamped count (1) and the calibration check must fail the run.
  bool disturb_calibration = false;
  std::vector<Ablation> ablations;  // their rows are made by the PathFactory like any path
};

// One (workload, path) cell.
struct Cell {
  std::string path;
  Stats us;                  // per-submission latency over every repetition
  double throughput = 0;     // workload bytes/s (GB/s) or submissions/s
  std::string unit;
  double host_cpu_us = 0;    // per submission: the daemon (or, native, this process)
  double guest_cpu_us = 0;   // per submission: this process, for the guest-side paths
  Crossings per_sub;         // per submission, averaged (scaled by 1000 in `per_sub_milli`)
  double messages = 0, doorbells = 0, interrupts = 0, replies = 0, bytes = 0;
  Ratio latency_ratio;       // p50(path) / p50(native), per repetition
  Ratio throughput_ratio;    // native time / path time, per repetition
  bool correct = true;       // kernel results equal the CPU reference
  std::string error;
  // Per repetition, in repetition order, so any two paths of a workload pair up rep by rep
  // (they ran in the same repetition): the p50, the CPU per submission (host + guest side)
  // and the boundary crossings per submission.
  std::vector<double> rep_p50_us, rep_cpu_us, rep_crossings;
};

struct Result_ {
  Workload workload;
  std::vector<Cell> cells;
};

// What the daemon saw of one concurrency run's guests (not for native, which has none):
// why a path does or does not scale, from the device's side.
struct DeviceSide {
  bool measured = false;
  // The guests' vGPUs' device time (`gpu_time_ns`, summed) over the run's wall time: 1.0 is
  // one device kept busy; above 1, vGPUs' work overlapped on it (sched off or concurrent grants).
  double busy = 0;
  double grants_per_submission = 0;  // scheduler grants; 0 under --sched off
  double grant_wait_us = 0;          // time waited for a grant, per submission
};

struct Concurrency {
  std::string path;
  uint32_t guests = 0;
  double submissions_per_s = 0;  // median over repetitions
  double speedup = 0;            // over 1 guest on the same path, median of the per-rep ratios
  // Per repetition (the paths and guest counts interleave within one): the aggregate rate
  // and the CPU per submission, host side (daemon, or this process for native threads) plus
  // the guests' own loops.
  std::vector<double> rep_rate, rep_cpu_us;
  // Per repetition, a daemon's guests only (DeviceSide); empty for native.
  std::vector<double> rep_device_busy, rep_grants_per_submission, rep_grant_wait_us;
};

// A figure the summary reads, measured once per repetition: its median and spread. The key
// is stable across runs of the same options, so two runs pair their figures by it.
struct SummaryFigure {
  std::string key;
  Ratio value;       // median, min, max, n over repetitions
  std::string unit;  // "ratio", "us", "crossings"
  std::string what;
};

struct StudyReport {
  std::string device;
  Floors floors;
  // The spin calibration and its check (ran = false: no kernel_time rows in this run).
  CalibrationReport calibration;
  std::vector<Result_> results;
  std::vector<Concurrency> concurrency;
  LifecycleReport lifecycle;         // its own section: not a path ratio (ran = false: not run)
  CovertReport covert;               // its own section: a covert channel, coarsening off and on
  DesktopReport desktop;             // its own section: frames composited per path (ran = false: not run)
  SchedReport sched;                 // fairness and noisy (F7): their own sections (ran = false: not run)
  std::vector<Ablation> ablations;   // as run: rows that could not be made are in not_run
  std::vector<std::string> summary;  // sentences; one starting with two spaces continues the last
  std::vector<SummaryFigure> figures;  // every figure the summary reads, with its spread
  std::vector<ClassVerdict> verdicts;  // one per workload class
  bool compared = false;               // --compare-with: the agreement section below is filled
  AgreementReport agreement;
  bool all_correct = true;
};

// CPU time so far of this process (all threads), and of a daemon: its supervisor and its
// per-vGPU worker processes.
double SelfCpuUs();
double ProcessCpuUs(pid_t pid);
double DaemonCpuUs(pid_t pid);

// num / den per repetition, over repetitions both cells ran in full (no ratio otherwise):
// latency from the per-rep p50s, CPU from the per-rep CPU per submission.
Ratio PairedLatency(const Cell& num, const Cell& den);
Ratio PairedCpu(const Cell& num, const Cell& den);

// The summary beyond the targets (summary.cc): the ablations' lines and the verdicts per
// workload class, each figure added to report.figures with its spread.
void SummarizeAblations(StudyReport& r);
void SummarizeVerdicts(StudyReport& r, const std::vector<std::string>& paths);
void AddFigure(StudyReport& r, std::string key, const Ratio& value, std::string unit, std::string what);

// Starts paths with `make(path name)` (called once per path, and per guest for concurrency).
using PathFactory = std::function<Result<std::unique_ptr<Path>>(const std::string& path, int guest)>;

Result<StudyReport> RunStudy(const StudyOptions& o, const PathFactory& make, const std::vector<std::string>& paths,
                             const std::string& device);

// The cell of `path` in a result, null when that path did not run it.
const Cell* FindCell(const Result_& r, const std::string& path);

std::string FormatReport(const StudyReport& r);
nlohmann::json ToJson(const StudyReport& r);
// One row per workload and path; the lifecycle figures go to LifecycleCsv (their own file).
std::string ToCsv(const StudyReport& r);
// gnuplot scripts + data under dir; returns the PNG paths written.
Result<std::vector<std::string>> WritePlots(const StudyReport& r, const std::string& dir);

}  // namespace vg::bench
