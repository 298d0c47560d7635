#pragma once
// The spin kernel's calibration as a checked precondition of the kernel_time rows (F12 item
// 5, docs/ab-methodology.md "Calibration check"). A `spin ~N us` row is only evidence about
// work of N us if (a) the calibration gave it its own iteration count, larger than every
// shorter target's and not clamped, and (b) native, in the run itself, took at least
// kCalibrationTolerance x N us for it. Pure functions over numbers: no engine, so the checks
// are tested on synthetic data (tests/bench/calibration_test.cc).

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace vg::bench {

// The iteration counts the plan may give a row: below 1 there is no kernel, above the top
// the CPU reference check of every row (4096 invocations x iterations) gets too slow.
inline constexpr uint32_t kSpinMinIterations = 1;
inline constexpr uint32_t kSpinMaxIterations = 1u << 20;
// A row whose native p50 is below this fraction of its target holds too little work to be
// read as that target (measured < 0.5 x target fails). Above the target is not a failure:
// load only adds time, and a row with more work than its name still holds the work the
// targets ask for.
inline constexpr double kCalibrationTolerance = 0.5;

// One two-point fit on the native path: the minimum submission time at two iteration counts.
struct SpinFit {
  uint32_t lo_iterations = 0, hi_iterations = 0;
  double lo_us = 0, hi_us = 0;  // min over the runs at each count
  double us_per_iteration = 0;  // (hi_us - lo_us) / (hi - lo)
  double fixed_us = 0;          // lo_us - slope x lo, >= 0: reported, not used by the plan
};

// Fits slope and fixed cost from the two measured points. A non-positive slope (the long
// run no slower than the short one: load disturbed one of them) is kept as measured, not
// floored, so CheckSpinPlan sees it and fails it.
SpinFit FitSpin(uint32_t lo_iterations, double lo_us, uint32_t hi_iterations, double hi_us);

struct SpinPoint {
  double target_us = 0;
  uint32_t iterations = 0;
  bool clamped = false;  // the count is at kSpinMinIterations or kSpinMaxIterations
};

// Iteration counts for the targets (in the order given): target = slope x iterations, the
// spin kernel's time on top of the fixed submission cost, so native's submission time for a
// row is about fixed + target (and at least the target).
std::vector<SpinPoint> PlanSpin(const std::vector<double>& targets_us, const SpinFit& fit);

// Why the plan cannot be trusted, one sentence per problem (empty: it can): a fit with no
// positive slope, a count at the clamp limit, or counts not strictly increasing with the
// target (two targets with the same count hold the same work).
std::vector<std::string> CheckSpinPlan(const std::vector<SpinPoint>& plan, const SpinFit& fit);

// One kernel_time row after the run: its target next to what native measured.
struct CalibratedRow {
  std::string name;  // "spin ~N us"
  double target_us = 0;
  uint32_t iterations = 0;
  double native_p50_us = 0;  // 0 with native_n == 0: native did not run the row
  uint64_t native_n = 0;
  std::string failure;       // empty: the row holds the work its target says
  bool ok() const { return failure.empty(); }
};

struct CalibrationReport {
  bool ran = false;                    // false: no kernel_time rows in this run, nothing checked
  double tolerance = kCalibrationTolerance;
  std::vector<SpinFit> attempts;       // every fit made; the last one planned the rows
  std::vector<std::vector<std::string>> attempt_problems;  // CheckSpinPlan of each attempt
  std::vector<CalibratedRow> rows;
  std::vector<std::string> failures;   // every failed check, row-named: "CALIBRATION FAILED: <this>"
  bool ok() const { return !ran || failures.empty(); }
  const CalibratedRow* Row(const std::string& name) const;
};

// Fills each row's failure from its count (at a clamp limit, or not above a shorter target's
// count: both rows fail, as either may be the wrong one) and from its measured native time
// (< tolerance x target, or not measured), and collects report.failures.
void CheckCalibratedRows(CalibrationReport& report);

// The text section (target, iterations, native p50 side by side) and, when a check failed,
// the loud CALIBRATION FAILED block naming each row and why.
std::string FormatCalibration(const CalibrationReport& r);
nlohmann::json CalibrationJson(const CalibrationReport& r);

// vgpu-bench's exit status: 1 when a kernel result was wrong, the lifecycle group ran
// incomplete, or the calibration failed; else 0.
int StudyExitStatus(bool all_correct, bool lifecycle_ok, const CalibrationReport& calibration);

}  // namespace vg::bench
