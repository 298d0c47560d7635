// The fairness group's figures on synthetic completion times (tools/vgpu-bench/fairness.h):
// tenants served exactly by weight must read as fair, a tenant starved for a window or served
// 1:1 against weights 1:4 must not, and the windows, Jain's index and the edge cases must
// come out as defined in docs/ab-methodology.md.
#include <doctest.h>

#include <cmath>
#include <vector>

#include "tools/vgpu-bench/fairness.h"

using namespace vg::bench;

namespace {

// Tenant i completes `rate[i]` dispatches per second, evenly spaced, over [0, secs).
std::vector<std::vector<double>> Even(const std::vector<double>& rate, double secs) {
  std::vector<std::vector<double>> out(rate.size());
  for (size_t i = 0; i < rate.size(); ++i)
    for (double t = 0.5 / rate[i]; t < secs; t += 1 / rate[i]) out[i].push_back(t);
  return out;
}

}  // namespace

TEST_CASE("Jain's index: 1 for equal, 1/n for one taking everything, 0 for nothing") {
  CHECK(JainIndex(std::vector<double>{3, 3, 3, 3}) == doctest::Approx(1.0));
  CHECK(JainIndex(std::vector<double>{5, 0, 0, 0}) == doctest::Approx(0.25));
  CHECK(JainIndex(std::vector<double>{1, 2}) == doctest::Approx(9.0 / 10.0));
  CHECK(JainIndex(std::vector<double>{}) == 0);
  CHECK(JainIndex(std::vector<double>{0, 0}) == 0);
}

TEST_CASE("shares served exactly by weight are fair in every window") {
  // Weights 1:2:4 at 100, 200, 400 completions per second: each 100 ms window holds 10, 20, 40.
  auto done = Even({100, 200, 400}, 2.0);
  ShareFigures f = AnalyzeShares(done, {100, 200, 400}, 0.5, 1.5, 0.1, 5);
  CHECK(f.windows == 10);
  CHECK(f.empty_windows == 0);
  CHECK(f.max_abs_pp < 1e-9);
  CHECK(f.max_abs_rel_pct < 1e-9);
  CHECK(f.within_pp == 1.0);
  CHECK(f.within_rel == 1.0);
  CHECK(f.jain == doctest::Approx(1.0));
  REQUIRE(f.completions.size() == 3);
  CHECK(f.completions[0] == 100);
  CHECK(f.completions[2] == 400);
  CHECK(f.entitled[1] == doctest::Approx(2.0 / 7.0));
  CHECK(f.share[2] == doctest::Approx(4.0 / 7.0));
}

TEST_CASE("equal service against weights 1:4 is unfair by 30 percentage points") {
  auto done = Even({100, 100}, 1.0);
  ShareFigures f = AnalyzeShares(done, {100, 400}, 0, 1.0, 0.1, 5);
  CHECK(f.windows == 10);
  // Shares 50/50 against 20/80: 30 pp off each; relative 150 % (tenant 0) and 37.5 % (tenant 1).
  CHECK(f.mean_abs_pp == doctest::Approx(30));
  CHECK(f.max_abs_pp == doctest::Approx(30));
  CHECK(f.max_abs_rel_pct == doctest::Approx(150));
  CHECK(f.mean_abs_rel_pct == doctest::Approx((150 + 37.5) / 2));
  CHECK(f.within_pp == 0);
  CHECK(f.within_rel == 0);
  // Completions / weight: 100/100 and 100/400.
  CHECK(f.jain == doctest::Approx(JainIndex(std::vector<double>{1.0, 0.25})));
  CHECK(f.jain < 0.99);
}

TEST_CASE("a tenant starved in one window fails that window only; an empty window is not judged") {
  auto done = Even({200, 200}, 1.0);
  // Tenant 1 gets nothing in [0.3, 0.4); nobody completes anything in [0.6, 0.7).
  std::erase_if(done[1], [](double t) { return t >= 0.3 && t < 0.4; });
  for (auto& d : done) std::erase_if(d, [](double t) { return t >= 0.6 && t < 0.7; });
  ShareFigures f = AnalyzeShares(done, {1, 1}, 0, 1.0, 0.1, 5);
  CHECK(f.windows == 10);
  CHECK(f.empty_windows == 1);
  CHECK(f.max_abs_pp == doctest::Approx(50));
  CHECK(f.within_pp == doctest::Approx(8.0 / 9.0));
  CHECK(f.jain < 1.0);
  CHECK(f.jain > 0.99);  // one window of ten: over the run it is nearly fair
}

TEST_CASE("windows: a partial last window and completions outside the interval are left out") {
  std::vector<std::vector<double>> done{{0.05, 0.15, 0.25, 0.99, 1.01}, {0.06, 0.16, 0.26, 0.98}};
  ShareFigures f = AnalyzeShares(done, {1, 1}, 0.1, 0.35, 0.1, 5);
  CHECK(f.windows == 2);  // [0.1, 0.2), [0.2, 0.3); [0.3, 0.35) is partial
  CHECK(f.completions[0] == 2);  // 0.15, 0.25
  CHECK(f.completions[1] == 2);
  CHECK(f.within_pp == 1.0);
}

TEST_CASE("nothing to judge: no tenants, no time, a zero weight") {
  CHECK(AnalyzeShares({}, {}, 0, 1, 0.1, 5).windows == 0);
  CHECK(AnalyzeShares({{0.5}}, {1}, 1, 1, 0.1, 5).windows == 0);
  CHECK(AnalyzeShares({{0.5}, {0.5}}, {1, 0}, 0, 1, 0.1, 5).windows == 0);
  ShareFigures none = AnalyzeShares({{}, {}}, {1, 1}, 0, 1, 0.1, 5);
  CHECK(none.windows == 10);
  CHECK(none.empty_windows == 10);
  CHECK(none.within_pp == 0);
  CHECK(none.jain == 0);
}
