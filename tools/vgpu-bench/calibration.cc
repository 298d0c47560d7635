#include "tools/vgpu-bench/calibration.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

namespace vg::bench {

SpinFit FitSpin(uint32_t lo_iterations, double lo_us, uint32_t hi_iterations, double hi_us) {
  SpinFit f;
  f.lo_iterations = lo_iterations;
  f.hi_iterations = hi_iterations;
  f.lo_us = lo_us;
  f.hi_us = hi_us;
  double span = static_cast<double>(hi_iterations) - static_cast<double>(lo_iterations);
  f.us_per_iteration = span > 0 ? (hi_us - lo_us) / span : 0;
  f.fixed_us = std::max(0.0, lo_us - f.us_per_iteration * lo_iterations);
  return f;
}

std::vector<SpinPoint> PlanSpin(const std::vector<double>& targets_us, const SpinFit& fit) {
  std::vector<SpinPoint> plan;
  for (double target : targets_us) {
    SpinPoint p{target, kSpinMaxIterations, true};
    if (fit.us_per_iteration > 0) {
      // The target is spin time on top of the fixed submission cost: the fixed cost is not
      // subtracted. It is the difference of two large, noisy timings (ms each on lavapipe);
      // under load it read as 1.6 ms once, above every short target, and every row fell to the
      // same clamped count. The slope, a ratio over 18000 iterations, is the stable part.
      double want = target / fit.us_per_iteration;
      double lo = kSpinMinIterations, hi = kSpinMaxIterations;
      p.iterations = static_cast<uint32_t>(std::clamp(std::isnan(want) ? hi : want, lo, hi));
      // A count at either limit is a clamp, even where the fit asked for exactly it: the
      // row-level check (CheckCalibratedRows) sees only the count.
      p.clamped = p.iterations <= kSpinMinIterations || p.iterations >= kSpinMaxIterations;
    }
    plan.push_back(p);
  }
  return plan;
}

std::vector<std::string> CheckSpinPlan(const std::vector<SpinPoint>& plan, const SpinFit& fit) {
  std::vector<std::string> out;
  if (!(fit.us_per_iteration > 0))
    out.push_back(fmt::format("no positive slope: {} iterations took {:.1f} us, {} took {:.1f} us", fit.lo_iterations,
                              fit.lo_us, fit.hi_iterations, fit.hi_us));
  for (size_t i = 0; i < plan.size(); ++i) {
    const SpinPoint& p = plan[i];
    if (p.clamped && fit.us_per_iteration > 0) {
      bool low = p.iterations == kSpinMinIterations;
      out.push_back(low ? fmt::format("spin ~{} us: not more than one iteration ({:.3g} us each): clamped to {}",
                                      p.target_us, fit.us_per_iteration, kSpinMinIterations)
                        : fmt::format("spin ~{} us: needs more than {} iterations at {:.3g} us each: clamped",
                                      p.target_us, kSpinMaxIterations, fit.us_per_iteration));
    }
    for (size_t j = 0; j < plan.size(); ++j) {
      const SpinPoint& q = plan[j];
      if (q.target_us < p.target_us && q.iterations >= p.iterations)
        out.push_back(fmt::format("spin ~{} us has {} iterations, not more than spin ~{} us ({})", p.target_us,
                                  p.iterations, q.target_us, q.iterations));
    }
  }
  return out;
}

const CalibratedRow* CalibrationReport::Row(const std::string& name) const {
  for (const CalibratedRow& r : rows)
    if (r.name == name) return &r;
  return nullptr;
}

void CheckCalibratedRows(CalibrationReport& report) {
  report.failures.clear();
  const SpinFit* fit = report.attempts.empty() ? nullptr : &report.attempts.back();
  if (fit && !(fit->us_per_iteration > 0))
    report.failures.push_back(fmt::format("the fit has no positive slope ({} iterations: {:.1f} us, {}: {:.1f} us)",
                                          fit->lo_iterations, fit->lo_us, fit->hi_iterations, fit->hi_us));
  for (CalibratedRow& r : report.rows) {
    std::vector<std::string> why;
    if (r.iterations <= kSpinMinIterations || r.iterations >= kSpinMaxIterations)
      why.push_back(fmt::format("{} iterations is at the clamp limit", r.iterations));
    // Not above a shorter target's count (or a longer target's count not above this one):
    // the two rows hold the same work at most, so neither can be read as its own target.
    for (const CalibratedRow& q : report.rows) {
      if (q.target_us < r.target_us && q.iterations >= r.iterations)
        why.push_back(fmt::format("{} iterations, not more than {} ({})", r.iterations, q.name, q.iterations));
      if (q.target_us > r.target_us && q.iterations <= r.iterations)
        why.push_back(fmt::format("{} iterations, not fewer than {} ({})", r.iterations, q.name, q.iterations));
    }
    if (r.native_n == 0)
      why.push_back("native did not measure it");
    else if (r.native_p50_us < report.tolerance * r.target_us)
      why.push_back(fmt::format("native p50 {:.1f} us < {} x target = {:.1f} us", r.native_p50_us, report.tolerance,
                                report.tolerance * r.target_us));
    r.failure.clear();
    for (size_t i = 0; i < why.size(); ++i) r.failure += (i ? "; " : "") + why[i];
    if (!r.ok()) report.failures.push_back(fmt::format("{}: {}", r.name, r.failure));
  }
}

std::string FormatCalibration(const CalibrationReport& r) {
  if (!r.ran) return "";
  std::string out = "== calibration (spin kernel on the native path; a row fails below "
                    + fmt::format("{} x its target)\n", r.tolerance);
  for (size_t i = 0; i < r.attempts.size(); ++i) {
    const SpinFit& f = r.attempts[i];
    out += fmt::format("attempt {}: {} iterations {:.1f} us, {} iterations {:.1f} us (min): {:.4g} us/iteration, "
                       "fixed {:.1f} us",
                       i + 1, f.lo_iterations, f.lo_us, f.hi_iterations, f.hi_us, f.us_per_iteration, f.fixed_us);
    const auto& problems = r.attempt_problems[i];
    if (problems.empty())
      out += ": plan ok\n";
    else
      out += fmt::format(": plan rejected{}\n", i + 1 < r.attempts.size() ? ", calibrated again" : "");
    for (const auto& p : problems) out += "  " + p + "\n";
  }
  out += fmt::format("{:<30} {:>10} {:>10} {:>15} {:>9}  {}\n", "case", "target us", "iterations", "native p50 us",
                     "/target", "calibration");
  for (const CalibratedRow& row : r.rows)
    out += fmt::format("{:<30} {:>10.0f} {:>10} {:>15.1f} {:>9.2f}  {}\n", row.name, row.target_us, row.iterations,
                       row.native_p50_us, row.target_us > 0 ? row.native_p50_us / row.target_us : 0,
                       row.ok() ? "ok" : "calibration failed: " + row.failure);
  if (!r.failures.empty()) {
    out += "\n!!!!!!!! CALIBRATION FAILED: the kernel_time rows named below do not hold the work their targets say;\n"
           "!!!!!!!! no target is read from them, and vgpu-bench exits 1\n";
    for (const auto& f : r.failures) out += "CALIBRATION FAILED: " + f + "\n";
  }
  return out + "\n";
}

nlohmann::json CalibrationJson(const CalibrationReport& r) {
  using nlohmann::json;
  json j{{"ran", r.ran}, {"ok", r.ok()}, {"tolerance", r.tolerance}, {"failures", r.failures}};
  j["attempts"] = json::array();
  for (size_t i = 0; i < r.attempts.size(); ++i) {
    const SpinFit& f = r.attempts[i];
    j["attempts"].push_back({{"lo_iterations", f.lo_iterations},
                             {"lo_us", f.lo_us},
                             {"hi_iterations", f.hi_iterations},
                             {"hi_us", f.hi_us},
                             {"us_per_iteration", f.us_per_iteration},
                             {"fixed_us", f.fixed_us},
                             {"problems", r.attempt_problems[i]}});
  }
  j["rows"] = json::array();
  for (const CalibratedRow& row : r.rows)
    j["rows"].push_back({{"case", row.name},
                         {"target_us", row.target_us},
                         {"iterations", row.iterations},
                         {"native_p50_us", row.native_p50_us},
                         {"ok", row.ok()},
                         {"failure", row.failure}});
  return j;
}

int StudyExitStatus(bool all_correct, bool lifecycle_ok, const CalibrationReport& calibration) {
  return all_correct && lifecycle_ok && calibration.ok() ? 0 : 1;
}

}  // namespace vg::bench
