// The study end to end at tiny sizes: vgpu-bench starts its own vgpud, runs every workload
// on every path, and every kernel result must equal the CPU reference.
#include <doctest.h>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

#include "tests/e2e/harness.h"

using namespace vg::e2e;

TEST_CASE("vgpu-bench --smoke: every path produces results equal to the reference") {
  auto out = std::filesystem::temp_directory_path() / ("vgpu-bench-smoke-" + std::to_string(::getpid()));
  std::string paths = EnvOr("BENCH_PATHS", "native,mediated,remoting");
  pid_t pid = Spawn({EnvOr("VGPU_BENCH", "tools/vgpu-bench"), "--smoke", "--paths", paths, "--out", out.string()},
                    (out.string() + ".txt"));
  int rc = WaitExit(pid, 280000);
  std::ifstream report(out / "report.txt");
  std::string text((std::istreambuf_iterator<char>(report)), {});
  INFO(text);
  REQUIRE(rc == 0);
  std::ifstream f(out / "results.json");
  auto j = nlohmann::json::parse(f);
  CHECK(j["all_correct"] == true);
  CHECK(j["floors"]["eventfd_rtt_us"]["p50"].get<double>() > 0);
  std::set<std::string> groups;
  for (const auto& w : j["results"]) {
    groups.insert(w["group"].get<std::string>());
    for (const auto& p : {"native", "mediated", "remoting"}) {
      REQUIRE(w["paths"].contains(p));
      CHECK(w["paths"][p]["correct"] == true);
      CHECK(w["paths"][p]["latency_us"]["n"].get<int>() > 0);
    }
    // The mediated path crosses the boundary: one doorbell per submission at least.
    CHECK(w["paths"]["mediated"]["crossings_per_submission"]["doorbells"].get<double>() > 0);
    // Remoting moves serialized bytes through shared memory for every submission.
    CHECK(w["paths"]["remoting"]["bytes_per_submission"].get<double>() > 0);
  }
  for (const char* g : {"empty", "small", "kernel_time", "cmds", "data", "churn", "stream"}) CHECK(groups.count(g) == 1);
  CHECK(j["concurrency"].size() >= 2);
  std::filesystem::remove_all(out);
  std::filesystem::remove(out.string() + ".txt");
}
