// F14/F12: vgpu-bench's "mediated, posted MMIO doorbell, through QEMU" path against the
// real QEMU (VGPUD_QEMU) that ./run.sh vm built, beside the in-process client's two
// doorbells. Checks the structure, not the speed: every row ran and was correct, the qtest
// floor was measured on that QEMU, each mediated-qemu submission crossed through qtest
// (RING_TAIL as an MMIO write), and mediated-mmio wrote RING_TAIL as a vfio-user message.
// Skipped (77) without VGPUD_QEMU.
#include <doctest.h>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "tests/e2e/harness.h"

using namespace vg::e2e;

TEST_CASE("vgpu-bench --smoke runs mediated-qemu through the real QEMU, with its qtest floor") {
  if (std::getenv("VGPUD_QEMU") == nullptr) {
    MESSAGE("VGPUD_QEMU is not set (./run.sh vm sets it): skipped");
    std::exit(77);
  }
  auto out = std::filesystem::temp_directory_path() / ("vgpu-bench-qemu-" + std::to_string(::getpid()));
  pid_t pid = Spawn({EnvOr("VGPU_BENCH", "tools/vgpu-bench"), "--smoke", "--groups", "empty,small", "--paths",
                     "native,mediated,mediated-mmio,mediated-qemu", "--out", out.string()},
                    out.string() + ".txt");
  int rc = WaitExit(pid, 280000);
  std::ifstream report(out / "report.txt");
  std::string text((std::istreambuf_iterator<char>(report)), {});
  INFO(text);
  REQUIRE(rc == 0);
  std::ifstream f(out / "results.json");
  auto j = nlohmann::json::parse(f);
  CHECK(j["all_correct"] == true);
  const auto& pf = j["floors"]["path_floors"];
  REQUIRE(pf.contains("mediated-qemu: qtest writel to guest RAM (the qtest floor)"));
  CHECK(pf["mediated-qemu: qtest writel to guest RAM (the qtest floor)"]["p50"].get<double>() > 0);
  int rows = 0;
  for (const auto& w : j["results"]) {
    ++rows;
    for (const char* p : {"native", "mediated", "mediated-mmio", "mediated-qemu"}) {
      REQUIRE(w["paths"].contains(p));
      CHECK(w["paths"][p]["correct"] == true);
      CHECK(w["paths"][p]["latency_us"]["n"].get<int>() > 0);
    }
    const auto& q = w["paths"]["mediated-qemu"]["crossings_per_submission"];
    CHECK(q["doorbells"].get<double>() == doctest::Approx(1.0));
    CHECK(q["messages"].get<double>() >= 1.0);  // at least the RING_TAIL write
    CHECK(w["paths"]["mediated-mmio"]["crossings_per_submission"]["messages"].get<double>() >= 1.0);
    CHECK(w["paths"]["mediated"]["crossings_per_submission"]["messages"].get<double>() == doctest::Approx(0.0));
  }
  CHECK(rows == 2);
  std::filesystem::remove_all(out);
  std::filesystem::remove(out.string() + ".txt");
}
