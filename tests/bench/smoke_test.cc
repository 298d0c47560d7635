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
  // The lifecycle group (F13): vGPU start/stop cycles and idle worker memory, its own section.
  REQUIRE(j.contains("lifecycle"));
  const auto& l = j["lifecycle"];
  CHECK(l["complete"] == true);
  CHECK(l["errors"].empty());
  CHECK(l["cycles_succeeded"].get<int>() == l["cycles_requested"].get<int>());
  CHECK(l["cycles_succeeded"].get<int>() > 0);
  for (const char* k : {"start_reply_us", "start_to_version_us", "spawn_to_ready_us", "stop_reply_us", "stop_to_exit_us"})
    CHECK(l[k]["p50"].get<double>() > 0);
  // Usable comes after the reply: the client connects only once start has answered.
  CHECK(l["start_to_version_us"]["p50"].get<double>() >= l["start_reply_us"]["p50"].get<double>());
  CHECK(l["idle_worker"]["measured"].get<int>() > 0);
  CHECK(l["idle_worker"]["rss_bytes"]["mean"].get<double>() > 0);
  CHECK(l["idle_worker"]["pss_bytes"]["mean"].get<double>() > 0);
  CHECK(l["supervisor"]["rss_bytes"].get<uint64_t>() > 0);
  CHECK(text.find("== lifecycle") != std::string::npos);
  CHECK(std::filesystem::exists(out / "lifecycle.csv"));
  std::filesystem::remove_all(out);
  std::filesystem::remove(out.string() + ".txt");
}
