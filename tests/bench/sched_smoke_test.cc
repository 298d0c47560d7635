// The scheduler groups end to end at smoke size (F7, docs/ab-methodology.md "Fairness and
// noisy neighbours"): vgpu-bench starts two vgpuds of their own (--sched weighted and off),
// busy tenants as guest processes on each, and every precondition must hold. A test of its
// own (not a case of bench_smoke): each has the suite's time limit to itself.
#include <doctest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

#include "tests/e2e/harness.h"

using namespace vg::e2e;

TEST_CASE("vgpu-bench --smoke --groups fairness,noisy: the scheduler groups, weighted and off side by side") {
  // F7 (docs/ab-methodology.md "Fairness and noisy neighbours"): busy tenants as guest
  // processes on two vgpuds of the group's own, every precondition checked (rc 0 says none
  // failed: every tenant backlogged and completing work, results exact, mode and weights as asked).
  auto out = std::filesystem::temp_directory_path() / ("vgpu-bench-sched-" + std::to_string(::getpid()));
  pid_t pid = Spawn({EnvOr("VGPU_BENCH", "tools/vgpu-bench"), "--smoke", "--groups", "fairness,noisy", "--out",
                     out.string()},
                    (out.string() + ".txt"));
  int rc = WaitExit(pid, 280000);
  std::ifstream report(out / "report.txt");
  std::string text((std::istreambuf_iterator<char>(report)), {});
  INFO(text);
  REQUIRE(rc == 0);
  std::ifstream f(out / "results.json");
  auto j = nlohmann::json::parse(f);
  CHECK_FALSE(j.contains("results"));  // no study daemon, no path rows
  REQUIRE(j.contains("fairness"));
  REQUIRE(j.contains("noisy"));
  const auto& fa = j["fairness"];
  CHECK(fa["complete"] == true);
  for (const auto& s : fa["spin"]) CHECK(s["ok"] == true);
  std::set<std::string> seen;
  for (const auto& run : fa["runs"]) {
    INFO(run.dump());
    CHECK(run["ok"] == true);
    seen.insert(run["weights"].get<std::string>() + "/" + run["sched"].get<std::string>() + "/" +
                std::to_string(run["tenants"].get<int>()));
    CHECK(run["windows"].get<int>() >= 5);
    CHECK(run["jain"].get<double>() > 0.25);
    CHECK(run["tenant"].size() == run["tenants"].get<size_t>());
    double shares = 0;
    for (const auto& t : run["tenant"]) CHECK(t["completions"].get<uint64_t>() > 0);
    for (const auto& s : run["share"]) shares += s.get<double>();
    CHECK(shares == doctest::Approx(1.0));
    if (run["sched"] == "best-effort") CHECK(run["grant_ms"].get<double>() > 0);
  }
  for (const char* w : {"equal", "mixed"})
    for (const char* m : {"best-effort", "off"})
      for (int n : {2, 4}) CHECK(seen.count(std::string(w) + "/" + m + "/" + std::to_string(n)) == 1);
  const auto& no = j["noisy"];
  CHECK(no["complete"] == true);
  CHECK(no["runs"].size() == 8);  // closed loop and thinking, alone and beside 1 heavy, best-effort and off
  std::set<std::string> noisy_seen;
  for (const auto& run : no["runs"]) {
    INFO(run.dump());
    CHECK(run["ok"] == true);
    CHECK(run["light_us"]["n"].get<uint64_t>() > 0);
    noisy_seen.insert(fmt::format("{}/{}/{}", run["think_us"].get<uint32_t>(), run["heavy"].get<int>(),
                                  run["sched"].get<std::string>()));
    if (run["heavy"].get<int>() > 0) {
      CHECK(run.contains("p99_over_alone_us"));
      CHECK(run["tenant"][1]["completions"].get<uint64_t>() > 0);
    }
  }
  CHECK(noisy_seen.size() == 8);
  CHECK(text.find("== fairness") != std::string::npos);
  CHECK(text.find("== noisy neighbours") != std::string::npos);
  CHECK(text.find("fairness, equal weights, 2 tenants, sched best-effort") != std::string::npos);
  CHECK(text.find("noisy neighbours, light tenant (closed loop) next to 1 heavy, sched best-effort") != std::string::npos);
  CHECK(text.find("noisy neighbours, light tenant (thinks 1000 us) next to 1 heavy, sched best-effort") !=
        std::string::npos);
  CHECK(text.find("PRECONDITION FAILED") == std::string::npos);
  std::filesystem::remove_all(out);
  std::filesystem::remove(out.string() + ".txt");
}
