#pragma once
// The A/B study: workloads x paths, interleaved repetitions, floors, ratios, reports.

#include <functional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/base.h"
#include "tools/bench/stats.h"
#include "tools/vgpu-bench/calibration.h"
#include "tools/vgpu-bench/floors.h"
#include "tools/vgpu-bench/lifecycle.h"
#include "tools/vgpu-bench/paths.h"

namespace vg::bench {

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
};

struct Result_ {
  Workload workload;
  std::vector<Cell> cells;
};

struct Concurrency {
  std::string path;
  uint32_t guests = 0;
  double submissions_per_s = 0;
  double speedup = 0;  // over 1 guest on the same path
};

struct StudyReport {
  std::string device;
  Floors floors;
  // The spin calibration and its check (ran = false: no kernel_time rows in this run).
  CalibrationReport calibration;
  std::vector<Result_> results;
  std::vector<Concurrency> concurrency;
  LifecycleReport lifecycle;         // its own section: not a path ratio (ran = false: not run)
  std::vector<std::string> summary;  // sentences
  bool all_correct = true;
};

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
