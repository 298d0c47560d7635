// The verdict rules on synthetic numbers (tools/vgpu-bench/verdict.h): a row is won only when
// every repetition says so, a class holds only when mediated wins more rows than are
// undecided and loses none, and the claim needs both latency and CPU.
#include <doctest.h>

#include <vector>

#include "tools/vgpu-bench/verdict.h"

using namespace vg::bench;

namespace {
Ratio R(double median, double min, double max, size_t n = 5) { return {median, min, max, n}; }
}  // namespace

TEST_CASE("per-repetition ratios pair repetition r with repetition r") {
  std::vector<double> m{10, 20, 30}, x{20, 20, 20, 99};
  Ratio r = PairedRatio(m, x);  // 0.5, 1.0, 1.5; the fourth has no partner
  CHECK(r.n == 3);
  CHECK(r.median == doctest::Approx(1.0));
  CHECK(r.min == doctest::Approx(0.5));
  CHECK(r.max == doctest::Approx(1.5));
  // A repetition with no denominator measured nothing.
  CHECK(PairedRatio(std::vector<double>{1, 2}, std::vector<double>{0, 4}).n == 1);
  CHECK(PairedRatio({}, {}).n == 0);
  Ratio d = PairedDifference(std::vector<double>{30, 25}, std::vector<double>{10, 10});
  CHECK(d.min == doctest::Approx(15));
  CHECK(d.max == doctest::Approx(20));
}

TEST_CASE("a row is decided only when every repetition is on one side of 1") {
  CHECK(Decide(R(0.6, 0.5, 0.9)) == Side::kMediated);
  CHECK(Decide(R(1.4, 1.1, 1.6)) == Side::kRemoting);
  // One repetition on the other side: not a difference this run has shown.
  CHECK(Decide(R(0.8, 0.7, 1.02)) == Side::kWithinSpread);
  CHECK(Decide(R(1.0, 1.0, 1.0)) == Side::kWithinSpread);
  CHECK(Decide(Ratio{}) == Side::kNotMeasured);
}

TEST_CASE("class outcomes per axis") {
  auto tally = [](int m, int x, int w) {
    Tally t;
    t.mediated = m;
    t.remoting = x;
    t.within = w;
    return t.outcome();
  };
  CHECK(tally(3, 0, 0) == Outcome::kHolds);
  CHECK(tally(3, 0, 2) == Outcome::kHolds);
  CHECK(tally(2, 0, 2) == Outcome::kMixed);  // as many rows undecided as won: not shown
  CHECK(tally(3, 1, 0) == Outcome::kMixed);  // remoting won a row
  CHECK(tally(0, 2, 1) == Outcome::kFails);
  CHECK(tally(0, 0, 4) == Outcome::kTie);
  CHECK(tally(0, 0, 0) == Outcome::kNotEvaluated);
  CHECK(ClaimOutcome(Outcome::kHolds, Outcome::kHolds) == Outcome::kHolds);
  CHECK(ClaimOutcome(Outcome::kHolds, Outcome::kFails) == Outcome::kFails);
  CHECK(ClaimOutcome(Outcome::kFails, Outcome::kHolds) == Outcome::kFails);
  CHECK(ClaimOutcome(Outcome::kHolds, Outcome::kTie) == Outcome::kMixed);
  CHECK(ClaimOutcome(Outcome::kNotEvaluated, Outcome::kHolds) == Outcome::kNotEvaluated);
  CHECK(std::string(ClaimName(Outcome::kFails)) == "DOES NOT HOLD");
}

TEST_CASE("a verdict line names its rows, their spreads and the floors") {
  ClassVerdict v{"empty", "fixed cost (empty)"};
  v.rows.push_back({"fence only", R(0.61, 0.55, 0.70), R(1.20, 1.10, 1.30), 20.1, 33.0, 9.8});
  v.floors = {"eventfd round trip 11.9 us"};
  Decide(v);
  CHECK(v.latency_outcome == Outcome::kHolds);
  CHECK(v.cpu_outcome == Outcome::kFails);
  CHECK(v.claim == Outcome::kFails);
  const std::string line = VerdictLine(v);
  INFO(line);
  CHECK(line.find("verdict fixed cost (empty): claim DOES NOT HOLD") == 0);
  CHECK(line.find("fence only") != std::string::npos);
  CHECK(line.find("0.61 [0.55-0.70]") != std::string::npos);
  CHECK(line.find("1.20 [1.10-1.30]") != std::string::npos);
  CHECK(line.find("eventfd round trip 11.9 us") != std::string::npos);
  auto j = VerdictJson(v);
  CHECK(j["claim"] == "DOES NOT HOLD");
  CHECK(j["rows"][0]["latency_side"] == "mediated");
  CHECK(j["rows"][0]["latency_mediated_over_remoting"]["min"].get<double>() == doctest::Approx(0.55));

  ClassVerdict none{"long_work", "long work"};
  none.note = "no kernel_time row with a native p50 of 1 ms or more";
  Decide(none);
  CHECK(none.claim == Outcome::kNotEvaluated);
  CHECK(VerdictLine(none).find("NOT EVALUATED: no kernel_time row") != std::string::npos);

  const std::string overall = OverallVerdictLine({v, none});
  CHECK(overall.find("DOES NOT HOLD in any class evaluated") != std::string::npos);
  CHECK(overall.find("not evaluated in long_work") != std::string::npos);
}
