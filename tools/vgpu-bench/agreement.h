#pragma once
// Two runs of the study, compared (F12 item 5, docs/ab-methodology.md "Two-run agreement").
// A run's JSON carries every figure its summary reads under `summary_ratios` (key -> median,
// min, max, n over the repetitions) and its verdicts under `verdicts`. Two runs agree in
// structure when they have the same keys and verdict classes, each well formed; they agree
// in a figure when its two [min, max] spreads overlap. A structural difference is a broken
// study (vgpu-bench --compare-with exits 1); a figure or verdict that moved is what a shared
// machine does, and is reported. Pure functions over JSON: tests/bench/agreement_test.cc.

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace vg::bench {

struct AgreementReport {
  std::string earlier;                        // what the later run was compared with (a file)
  size_t keys = 0;                            // summary figures in both runs
  size_t compared = 0;                        // of them, measured (n > 0) in both
  std::vector<std::string> structural;        // fails: a key or class in one run only, a malformed figure
  std::vector<std::string> disagree;          // spreads that do not overlap: "key: a [..] vs b [..]"
  std::vector<std::string> measured_in_one;   // n > 0 in one run only (e.g. a row >= 1 ms once)
  std::vector<std::string> verdict_changes;   // a class whose claim or axis outcome differs
  bool structure_ok() const { return structural.empty(); }
};

// What is wrong with one run's summary figures and verdicts (empty: well formed): a missing
// `summary_ratios` or `verdicts`, a figure without median/min/max/n, n > 0 with not
// min <= median <= max, a verdict without class/claim/latency/cpu.
std::vector<std::string> CheckSummaryStructure(const nlohmann::json& run);

AgreementReport CompareRuns(const nlohmann::json& earlier, const nlohmann::json& later);

// The report's "== agreement" section and its JSON.
std::string FormatAgreement(const AgreementReport& a);
nlohmann::json AgreementJson(const AgreementReport& a);

}  // namespace vg::bench
