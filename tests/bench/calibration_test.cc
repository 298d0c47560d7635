// The spin calibration check on synthetic numbers (tools/vgpu-bench/calibration.h): what a
// run under load looked like (every row the same clamped count, native "spin ~1000 us" at
// 44 us) must fail, a sound calibration must pass.
#include <doctest.h>

#include <string>

#include "tools/vgpu-bench/calibration.h"

using namespace vg::bench;

namespace {

const std::vector<double> kTargets{10, 100, 1000, 3000};

// 0.05 us per iteration, 40 us fixed: the plan for kTargets is 200, 2000, 20000, 60000.
SpinFit SoundFit() { return FitSpin(2000, 140, 20000, 1040); }

CalibrationReport Report(const std::vector<std::pair<double, uint32_t>>& rows, const std::vector<double>& native_p50,
                         const SpinFit& fit = SoundFit()) {
  CalibrationReport r;
  r.ran = true;
  r.attempts.push_back(fit);
  r.attempt_problems.emplace_back();
  for (size_t i = 0; i < rows.size(); ++i) {
    CalibratedRow row;
    row.name = "spin ~" + std::to_string(static_cast<int>(rows[i].first)) + " us";
    row.target_us = rows[i].first;
    row.iterations = rows[i].second;
    row.native_p50_us = native_p50[i];
    row.native_n = 50;
    r.rows.push_back(row);
  }
  CheckCalibratedRows(r);
  return r;
}

bool Mentions(const std::vector<std::string>& v, const std::string& what) {
  for (const auto& s : v)
    if (s.find(what) != std::string::npos) return true;
  return false;
}

}  // namespace

TEST_CASE("the two-point fit: slope without the fixed cost") {
  SpinFit f = SoundFit();
  CHECK(f.us_per_iteration == doctest::Approx(0.05));
  CHECK(f.fixed_us == doctest::Approx(40));
  // The long run no faster than the short one: no slope, kept as measured so the check sees it.
  SpinFit flat = FitSpin(2000, 900, 20000, 800);
  CHECK(flat.us_per_iteration < 0);
}

TEST_CASE("a sound fit plans strictly increasing counts and passes") {
  std::vector<double> targets{50, 100, 1000, 3000};
  auto plan = PlanSpin(targets, SoundFit());
  REQUIRE(plan.size() == 4);
  CHECK(plan[0].iterations == 1000);
  CHECK(plan[1].iterations == 2000);
  CHECK(plan[2].iterations == 20000);
  CHECK(plan[3].iterations == 60000);
  for (size_t i = 1; i < plan.size(); ++i) CHECK(plan[i].iterations > plan[i - 1].iterations);
  for (const auto& p : plan) CHECK_FALSE(p.clamped);
  CHECK(CheckSpinPlan(plan, SoundFit()).empty());
}

TEST_CASE("a fixed cost misread under load no longer clamps the short targets") {
  // The two timings of a smoke run at load 7 on 2 cores: the fit's fixed cost read 1.6 ms,
  // above both targets, and when it was subtracted both rows got 1 iteration.
  SpinFit loaded = FitSpin(2000, 7851.8, 20000, 63771.1);
  CHECK(loaded.fixed_us > 1000);
  auto plan = PlanSpin({20, 200}, loaded);
  CHECK(plan[0].iterations == 6);
  CHECK(plan[1].iterations == 64);
  CHECK(CheckSpinPlan(plan, loaded).empty());
}

TEST_CASE("clamped or equal counts fail the plan") {
  SUBCASE("a target shorter than one iteration is clamped to one") {
    auto plan = PlanSpin({0.01, 100}, SoundFit());
    CHECK(plan[0].iterations == kSpinMinIterations);
    CHECK(plan[0].clamped);
    CHECK_FALSE(plan[1].clamped);
    auto problems = CheckSpinPlan(plan, SoundFit());
    CHECK(Mentions(problems, "spin ~0.01 us: not more than one iteration"));
  }
  SUBCASE("a fit disturbed by load: no slope, every row at the upper clamp") {
    SpinFit flat = FitSpin(2000, 900, 20000, 800);
    auto plan = PlanSpin(kTargets, flat);
    for (const auto& p : plan) {
      CHECK(p.iterations == kSpinMaxIterations);
      CHECK(p.clamped);
    }
    auto problems = CheckSpinPlan(plan, flat);
    CHECK(Mentions(problems, "no positive slope"));
    CHECK(Mentions(problems, "spin ~1000 us has 1048576 iterations, not more than spin ~100 us"));
  }
  SUBCASE("a slope so small the long targets need more than the clamp") {
    SpinFit slow = FitSpin(2000, 40.02, 20000, 40.2);  // 1e-5 us per iteration
    auto plan = PlanSpin(kTargets, slow);
    CHECK(plan[3].iterations == kSpinMaxIterations);
    CHECK(Mentions(CheckSpinPlan(plan, slow), "spin ~3000 us: needs more than 1048576 iterations"));
  }
  SUBCASE("two targets with the same count") {
    std::vector<SpinPoint> plan{{100, 500, false}, {1000, 500, false}};
    CHECK(Mentions(CheckSpinPlan(plan, SoundFit()), "spin ~1000 us has 500 iterations, not more than spin ~100 us"));
  }
}

TEST_CASE("rows: sound counts and measured native times pass") {
  auto r = Report({{100, 1200}, {1000, 19200}, {3000, 59200}}, {104.0, 980.0, 3100.0});
  CHECK(r.failures.empty());
  CHECK(r.ok());
  for (const auto& row : r.rows) CHECK(row.ok());
  // More work than the target is not a failure: load only adds time.
  CHECK(Report({{1000, 19200}}, {2500.0}).ok());
  // Exactly at the tolerance passes, just below fails.
  CHECK(Report({{1000, 19200}}, {500.0}).ok());
  CHECK_FALSE(Report({{1000, 19200}}, {499.0}).ok());
}

TEST_CASE("rows: the run under load is flagged on every row") {
  // Every row the same clamped count, and native "spin ~1000 us" took 44 us.
  auto r = Report({{10, kSpinMaxIterations}, {100, kSpinMaxIterations}, {1000, kSpinMaxIterations},
                   {3000, kSpinMaxIterations}},
                  {44.0, 44.0, 44.0, 45.0});
  CHECK_FALSE(r.ok());
  for (const auto& row : r.rows) {
    CHECK_FALSE(row.ok());
    CHECK(row.failure.find("clamp limit") != std::string::npos);
  }
  CHECK(r.Row("spin ~1000 us")->failure.find("native p50 44.0 us < 0.5 x target = 500.0 us") != std::string::npos);
  CHECK(Mentions(r.failures, "spin ~3000 us:"));
}

TEST_CASE("rows: a measured time below the target fails only that row") {
  auto r = Report({{100, 1200}, {1000, 19200}, {3000, 59200}}, {110.0, 1050.0, 1200.0});
  CHECK_FALSE(r.ok());
  CHECK(r.Row("spin ~100 us")->ok());
  CHECK(r.Row("spin ~1000 us")->ok());
  CHECK_FALSE(r.Row("spin ~3000 us")->ok());
  REQUIRE(r.failures.size() == 1);
  CHECK(r.failures[0] == "spin ~3000 us: native p50 1200.0 us < 0.5 x target = 1500.0 us");
}

TEST_CASE("rows: equal counts fail both rows, a row native did not run fails") {
  auto r = Report({{100, 1200}, {1000, 1200}, {3000, 59200}}, {110.0, 1000.0, 3000.0});
  CHECK_FALSE(r.Row("spin ~100 us")->ok());
  CHECK_FALSE(r.Row("spin ~1000 us")->ok());
  CHECK(r.Row("spin ~3000 us")->ok());
  // A count that falls as the target grows.
  auto down = Report({{100, 5000}, {1000, 1200}}, {110.0, 1000.0});
  CHECK_FALSE(down.Row("spin ~100 us")->ok());
  CHECK_FALSE(down.Row("spin ~1000 us")->ok());
  CalibrationReport missing = Report({{100, 1200}}, {0.0});
  missing.rows[0].native_n = 0;
  CheckCalibratedRows(missing);
  CHECK(missing.rows[0].failure == "native did not measure it");
}

TEST_CASE("the report: side by side, and loud on failure") {
  auto good = Report({{100, 1200}, {1000, 19200}}, {104.0, 980.0});
  std::string text = FormatCalibration(good);
  CHECK(text.find("spin ~1000 us") != std::string::npos);
  CHECK(text.find("19200") != std::string::npos);
  CHECK(text.find("980.0") != std::string::npos);
  CHECK(text.find("CALIBRATION FAILED") == std::string::npos);
  auto j = CalibrationJson(good);
  CHECK(j["ok"] == true);
  CHECK(j["rows"][1]["target_us"].get<double>() == 1000);
  CHECK(j["rows"][1]["native_p50_us"].get<double>() == 980);

  auto bad = Report({{100, 1200}, {1000, 19200}}, {104.0, 44.0});
  std::string loud = FormatCalibration(bad);
  CHECK(loud.find("CALIBRATION FAILED: spin ~1000 us: native p50 44.0 us") != std::string::npos);
  CHECK(CalibrationJson(bad)["ok"] == false);
  // Not run (no kernel_time rows): nothing to say, nothing failed.
  CHECK(FormatCalibration(CalibrationReport{}).empty());
  CHECK(CalibrationReport{}.ok());
}

TEST_CASE("the exit decision") {
  CalibrationReport none;
  auto good = Report({{100, 1200}, {1000, 19200}}, {104.0, 980.0});
  auto bad = Report({{100, 1200}, {1000, 19200}}, {104.0, 44.0});
  CHECK(StudyExitStatus(true, true, none) == 0);
  CHECK(StudyExitStatus(true, true, good) == 0);
  CHECK(StudyExitStatus(true, true, bad) == 1);
  CHECK(StudyExitStatus(false, true, good) == 1);
  CHECK(StudyExitStatus(true, false, good) == 1);
}
