// Two-run agreement end to end (F12 item 5, docs/ab-methodology.md "Two-run agreement"):
// vgpu-bench --smoke twice, the second with --compare-with the first. The two must agree in
// structure: the same summary figures, each with a median and a spread over its
// repetitions, the same verdict classes; the second run's report must carry the comparison.
// Figures whose spreads do not overlap are what a shared 2-core machine does to a smoke run:
// they are printed, not failed.
#include <doctest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

#include "tests/e2e/harness.h"
#include "tools/vgpu-bench/agreement.h"

using namespace vg::e2e;
using nlohmann::json;

namespace {

// Every group but lifecycle (no ratios; its own test covers it): the run stays short.
const char* kGroups = "empty,small,kernel_time,cmds,data,churn,stream,concurrency";

struct Run {
  int rc = -1;
  std::string text;
  json j;
};

Run RunSmoke(const std::filesystem::path& out, const std::string& compare_with = "") {
  std::vector<std::string> argv{EnvOr("VGPU_BENCH", "tools/vgpu-bench"), "--smoke", "--groups", kGroups,
                                "--out", out.string(), "--json", (out.string() + ".json")};
  if (!compare_with.empty()) argv.insert(argv.end(), {"--compare-with", compare_with});
  Run r;
  r.rc = WaitExit(Spawn(argv, out.string() + ".txt"), 110000);
  std::ifstream report(out / "report.txt");
  r.text.assign(std::istreambuf_iterator<char>(report), {});
  std::ifstream f(out.string() + ".json");
  r.j = json::parse(f, nullptr, /*allow_exceptions=*/false);
  return r;
}

// Figures that need a kernel_time row of 1 ms or more on native: a smoke run has none.
bool MayBeUnmeasured(const std::string& key) { return key.find("work_1ms") != std::string::npos; }

void CheckOneRun(const Run& r, const char* which) {
  INFO(which << " run:\n" << r.text);
  REQUIRE(r.rc == 0);
  REQUIRE_FALSE(r.j.is_discarded());
  const auto problems = vg::bench::CheckSummaryStructure(r.j);
  for (const auto& p : problems) MESSAGE(p);
  CHECK(problems.empty());
  const json& figs = r.j["summary_ratios"];
  CHECK(figs.size() >= 20);
  for (const auto& [key, f] : figs.items()) {
    INFO(key);
    // Every figure the summary reads carries a spread over the repetitions (2 in --smoke).
    if (!MayBeUnmeasured(key)) CHECK(f["n"].get<int>() >= 2);
    CHECK(f.contains("unit"));
  }
  std::set<std::string> classes;
  for (const auto& v : r.j["verdicts"]) classes.insert(v["class"].get<std::string>());
  CHECK(classes == std::set<std::string>{"empty", "small", "long_work", "data", "churn", "stream", "concurrency"});
  // Every ablation ran (the shadow row may be left out, named, until idle notify lands).
  std::set<std::string> ablations;
  for (const auto& a : r.j["ablations"]) {
    ablations.insert(a["name"].get<std::string>());
    CHECK(a["rows"].size() >= 2);
  }
  CHECK(ablations == std::set<std::string>{"doorbell", "executor", "memory", "gtt", "remoting", "scheduler"});
  CHECK(r.text.find("verdict fixed cost (empty): claim ") != std::string::npos);
}

}  // namespace

TEST_CASE("vgpu-bench --smoke twice: the two runs agree in structure, and timing disagreement is reported") {
  auto base = std::filesystem::temp_directory_path() / ("vgpu-bench-agree-" + std::to_string(::getpid()));
  Run a = RunSmoke(base / "a");
  CheckOneRun(a, "first");
  Run b = RunSmoke(base / "b", base.string() + "/a.json");
  CheckOneRun(b, "second");

  // The test's own comparison, and the one the second run reported: they must say the same.
  const vg::bench::AgreementReport cmp = vg::bench::CompareRuns(a.j, b.j);
  for (const auto& s : cmp.structural) MESSAGE("structure differs: " << s);
  CHECK(cmp.structure_ok());
  CHECK(cmp.keys == a.j["summary_ratios"].size());
  CHECK(cmp.compared > 0);
  REQUIRE(b.j.contains("agreement"));
  const json& rep = b.j["agreement"];
  CHECK(rep["structure_ok"] == true);
  CHECK(rep["keys"].get<size_t>() == cmp.keys);
  // The second run's report flags each figure apart by more than the stated spreads.
  CHECK(rep["disagree"].size() == cmp.disagree.size());
  CHECK(b.text.find("== agreement with") != std::string::npos);
  for (const auto& s : cmp.disagree) CHECK(b.text.find("DISAGREE: " + s.substr(0, s.find(':'))) != std::string::npos);
  // Reported, not failed: two smoke runs on a loaded 2-core machine move.
  MESSAGE(cmp.compared << " figures measured in both runs, " << cmp.disagree.size()
                       << " apart by more than their spreads, " << cmp.verdict_changes.size()
                       << " verdict outcomes changed");
  for (const auto& s : cmp.disagree) MESSAGE("timing disagreement: " << s);
  for (const auto& s : cmp.verdict_changes) MESSAGE("verdict changed: " << s);
  std::filesystem::remove_all(base);
}
