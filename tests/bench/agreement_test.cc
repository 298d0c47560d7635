// Two-run agreement on synthetic results (tools/vgpu-bench/agreement.h): a difference in
// structure fails, a figure whose spreads do not overlap is reported, not failed.
#include <doctest.h>

#include <nlohmann/json.hpp>

#include "tools/vgpu-bench/agreement.h"

using namespace vg::bench;
using nlohmann::json;

namespace {

json Figure(double median, double min, double max, int n = 5) {
  return {{"median", median}, {"min", min}, {"max", max}, {"n", n}, {"unit", "ratio"}};
}

json Run(double empty_latency = 0.6) {
  json j;
  j["summary_ratios"] = {{"verdict.empty/fence only.latency", Figure(empty_latency, empty_latency - 0.05, empty_latency + 0.05)},
                         {"verdict.empty/fence only.cpu", Figure(1.2, 1.1, 1.3)},
                         {"target.mediated/native.throughput.work_1ms", Figure(0, 0, 0, 0)}};
  j["verdicts"] = json::array({{{"class", "empty"}, {"claim", "DOES NOT HOLD"}, {"latency", "HOLDS"}, {"cpu", "FAILS"}},
                               {{"class", "long_work"}, {"claim", "NOT EVALUATED"}, {"latency", "NOT EVALUATED"},
                                {"cpu", "NOT EVALUATED"}}});
  return j;
}

}  // namespace

TEST_CASE("two runs of the same shape whose spreads overlap agree") {
  AgreementReport a = CompareRuns(Run(0.60), Run(0.62));
  CHECK(a.structure_ok());
  CHECK(a.keys == 3);
  CHECK(a.compared == 2);  // the unevaluated target is in both, measured in neither
  CHECK(a.disagree.empty());
  CHECK(a.verdict_changes.empty());
  CHECK(FormatAgreement(a).find("structure: SAME") != std::string::npos);
}

TEST_CASE("medians apart by more than their spreads are reported, not a structural failure") {
  json later = Run(0.90);
  later["verdicts"][0]["latency"] = "TIE";
  AgreementReport a = CompareRuns(Run(0.60), later);
  CHECK(a.structure_ok());
  REQUIRE(a.disagree.size() == 1);
  CHECK(a.disagree[0].find("verdict.empty/fence only.latency") == 0);
  REQUIRE(a.verdict_changes.size() == 1);
  CHECK(a.verdict_changes[0].find("verdict empty latency: HOLDS vs TIE") == 0);
  auto j = AgreementJson(a);
  CHECK(j["structure_ok"] == true);
  CHECK(j["disagree"].size() == 1);
}

TEST_CASE("a figure measured in one run only is reported, not a structural failure") {
  json later = Run();
  later["summary_ratios"]["target.mediated/native.throughput.work_1ms"] = Figure(0.99, 0.97, 1.0);
  AgreementReport a = CompareRuns(Run(), later);
  CHECK(a.structure_ok());
  CHECK(a.measured_in_one.size() == 1);
}

TEST_CASE("a difference in structure fails") {
  SUBCASE("a figure in one run only") {
    json later = Run();
    later["summary_ratios"].erase("verdict.empty/fence only.cpu");
    AgreementReport a = CompareRuns(Run(), later);
    CHECK_FALSE(a.structure_ok());
    CHECK(a.structural.size() == 1);
    CHECK(a.structural[0].find("in the earlier run only") != std::string::npos);
  }
  SUBCASE("a figure without its spread") {
    json later = Run();
    later["summary_ratios"]["verdict.empty/fence only.cpu"].erase("max");
    CHECK_FALSE(CompareRuns(Run(), later).structure_ok());
  }
  SUBCASE("a median outside its own spread") {
    json later = Run();
    later["summary_ratios"]["verdict.empty/fence only.cpu"] = Figure(2.0, 1.1, 1.3);
    CHECK_FALSE(CompareRuns(Run(), later).structure_ok());
  }
  SUBCASE("a verdict class in one run only") {
    json later = Run();
    later["verdicts"].erase(1);
    AgreementReport a = CompareRuns(Run(), later);
    CHECK_FALSE(a.structure_ok());
    CHECK(a.structural[0].find("verdict long_work") == 0);
  }
  SUBCASE("no summary figures at all") {
    AgreementReport a = CompareRuns(Run(), json::object());
    CHECK_FALSE(a.structure_ok());
    CHECK(FormatAgreement(a).find("STRUCTURE DIFFERS") != std::string::npos);
  }
}
