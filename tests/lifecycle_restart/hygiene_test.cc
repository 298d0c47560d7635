// F8, resource hygiene: connect/work/disconnect cycles and guests killed at random points,
// through real vfio-user clients (in this process) and real guest processes (forked, killed
// with SIGKILL mid-open, mid-map, mid-submit or mid-wait). Neither the supervisor nor the
// vGPU's worker may grow in fds or RSS; a victim tenant on another vGPU keeps its results
// bit-exact throughout.
//
// The default suite runs 200 of each (under a minute); LIFECYCLE_CYCLES=1000 (what
// `./run.sh soak` sets) runs the full 1,000 of each.

#include <random>

#include "tests/e2e/victim.h"
#include "tests/lifecycle_restart/common.h"

using namespace vg;
using namespace vg::lifecycle;

namespace {

constexpr const char* kA = "aaaaaaaa-0000-4000-8000-0000000000a9";
constexpr const char* kB = "bbbbbbbb-0000-4000-8000-0000000000b9";

int Cycles() {
  const char* c = std::getenv("LIFECYCLE_CYCLES");
  const int n = c ? std::atoi(c) : 200;
  return n > 0 ? n : 200;
}

// After the guest's hang-up has reached the worker (its client slot free again) and the
// supervisor (a heartbeat later).
Usage Settled(int64_t pid) {
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  return UsageOf(pid);
}

// A guest process that opens the vGPU and runs kernels until it is killed.
pid_t GuestProcess(const std::string& socket) {
  const pid_t pid = ::fork();
  if (pid != 0) return pid;
  guest::DeviceOptions o;
  o.socket = socket;
  o.ram_size = 16 << 20;
  auto d = guest::Device::Open(o);
  if (!d) std::_Exit(3);
  auto drv = guest::Driver::Create(**d);
  if (!drv) std::_Exit(4);
  for (uint32_t i = 0;; ++i)
    if (auto r = RunOne(**drv, i); !r) std::_Exit(r.error().what.find("differs") != std::string::npos ? 1 : 5);
}

void Report(const std::string& what, const Usage& warm, const Usage& end) {
  MESSAGE(what, ": ", warm.fds, " fds, ", warm.maps, " mappings, ", warm.rss_kib, " KiB after warm-up; ", end.fds,
          " fds, ", end.maps, " mappings, ", end.rss_kib, " KiB at the end");
}

// Mappings may differ by a few: the engine's allocator splits and merges its arenas. ASan's
// allocator maps new regions while its quarantine of freed memory fills.
#if defined(__SANITIZE_ADDRESS__)
constexpr size_t kMapSlack = 512;
#else
constexpr size_t kMapSlack = 8;
#endif

// Tolerances, from measurement (docs/isolation.md, "Resource hygiene"): fds exactly as after
// the warm-up; RSS within 1 MiB for the supervisor and 4 MiB for the worker (its engine's
// allocator and the driver's caches settle over the first cycles; a leak of one 16 MiB guest
// mapping or of a few KiB per cycle over 1,000 cycles exceeds them). ASan's quarantine keeps
// freed memory, so its build gets more room.
#if defined(__SANITIZE_ADDRESS__)
constexpr uint64_t kSupervisorSlackKib = 64 * 1024, kWorkerSlackKib = 256 * 1024;
#else
constexpr uint64_t kSupervisorSlackKib = 1024, kWorkerSlackKib = 4 * 1024;
#endif

}  // namespace

TEST_CASE("connect/work/disconnect cycles and guests killed at random points: no fd or memory growth") {
  const int n = Cycles();
  DaemonProc d;
  REQUIRE(d.Start(Args({"--vgpu", std::string(kA) + ":small", "--vgpu", std::string(kB) + ":small"})));
  const int64_t worker = WorkerPid(d, kA);
  REQUIRE(worker > 0);
  e2e::Victim v(d.Socket(kB));
  std::mt19937 rng(0x5eed);
  const auto t0 = Clock::now();

  // 1. Connect, run a kernel, disconnect.
  Usage sup_warm, wrk_warm;
  for (int i = 0; i < n; ++i) {
    {
      Guest g(d.Socket(kA));
      auto r = RunOne(*g.drv, static_cast<uint32_t>(i));
      REQUIRE_MESSAGE(r.ok(), "cycle ", i, ": ", e2e::Why(r));
    }
    if (i == 19) {
      sup_warm = Settled(d.pid());
      wrk_warm = Settled(worker);
    }
  }
  const Usage sup_cycles = Settled(d.pid()), wrk_cycles = Settled(worker);
  MESSAGE(n, " connect/work/disconnect cycles in ", MsSince(t0) / 1000, " s");
  Report("supervisor", sup_warm, sup_cycles);
  Report("worker", wrk_warm, wrk_cycles);
  CHECK(sup_cycles.fds <= sup_warm.fds);
  CHECK(wrk_cycles.fds <= wrk_warm.fds);
  CHECK(wrk_cycles.maps <= wrk_warm.maps + kMapSlack);
  CHECK(sup_cycles.rss_kib <= sup_warm.rss_kib + kSupervisorSlackKib);
  CHECK(wrk_cycles.rss_kib <= wrk_warm.rss_kib + kWorkerSlackKib);

  // 2. Guest processes killed at random points: before, during or after the open, the DMA
  //    mapping, a submission or a wait.
  const auto t1 = Clock::now();
  std::uniform_int_distribution<int> delay_us(0, 60000);
  int mismatches = 0;
  for (int i = 0; i < n; ++i) {
    const pid_t g = GuestProcess(d.Socket(kA));
    REQUIRE(g > 0);
    std::this_thread::sleep_for(std::chrono::microseconds(delay_us(rng)));
    ::kill(g, SIGKILL);
    int st = 0;
    ::waitpid(g, &st, 0);
    if (WIFEXITED(st) && WEXITSTATUS(st) == 1) ++mismatches;
  }
  MESSAGE(n, " guests killed at random points in ", MsSince(t1) / 1000, " s");
  CHECK(mismatches == 0);
  // The vGPU still serves, and the worker is the same process (no guest death cost it).
  {
    Guest g(d.Socket(kA));
    CHECK(RunOne(*g.drv, 7).ok());
  }
  CHECK(WorkerPid(d, kA) == worker);
  const Usage sup_end = Settled(d.pid()), wrk_end = Settled(worker);
  Report("supervisor after the kills", sup_warm, sup_end);
  Report("worker after the kills", wrk_warm, wrk_end);
  CHECK(sup_end.fds <= sup_warm.fds);
  CHECK(wrk_end.fds <= wrk_warm.fds);
  CHECK(wrk_end.maps <= wrk_warm.maps + kMapSlack);
  CHECK(sup_end.rss_kib <= sup_warm.rss_kib + kSupervisorSlackKib);
  CHECK(wrk_end.rss_kib <= wrk_warm.rss_kib + kWorkerSlackKib);
  e2e::CheckVictim(v.Stop());
  CHECK(d.Shutdown() == 0);
}
