// F8, resource hygiene: connect/work/disconnect cycles and guests killed at random points,
// through real vfio-user clients (in this process) and real guest processes (forked, killed
// with SIGKILL mid-open, mid-map, mid-submit or mid-wait; each records its phase in a shared
// page, and the test counts the kills per phase and fails if one of those four has none).
// Neither the supervisor nor the vGPU's worker may grow in fds or RSS; a victim tenant on
// another vGPU keeps its results bit-exact throughout.
//
// The default suite runs 200 of each (under a minute); LIFECYCLE_CYCLES=1000 (what
// `./run.sh soak` sets) runs the full 1,000 of each.

#include <sys/mman.h>

#include <array>
#include <cstdio>
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
Usage Settled(int64_t pid) { return SettledUsageOf(pid, std::chrono::milliseconds(400)); }

// Where a guest process is, in the order of its life. The guest writes its phase into a page
// shared with this process (MAP_SHARED, mapped before the fork); this process reads it once
// the guest has been reaped and can no longer change it: the phase the kill interrupted.
enum Phase : int { kForked, kOpen, kDriver, kDmaMap, kGttMap, kSubmit, kWait, kCheck, kDmaUnmap, kPhases };
constexpr const char* kPhaseNames[kPhases] = {"forked",  "open", "driver", "dma-map",  "gtt-map",
                                              "submit", "wait", "check",  "dma-unmap"};

// A scratch region the guest maps and unmaps around each kernel (DMA_MAP, DMA_UNMAP), as a VM
// whose memory changes does; above the guest's RAM.
constexpr Gpa kScratchIova{0x2'0000'0000};
constexpr uint64_t kScratchSize = 1 << 20;

// A guest process that opens the vGPU and runs kernels until it is killed; it records each
// phase as it enters it in `*phase`.
pid_t GuestProcess(const std::string& socket, std::atomic<int>* phase) {
  phase->store(kForked);
  const pid_t pid = ::fork();
  if (pid != 0) return pid;
  auto enter = [phase](Phase p) { phase->store(p); };
  auto scratch = CreateMemFd("hygiene-scratch", ByteSize{kScratchSize});
  if (!scratch) std::_Exit(6);
  guest::DeviceOptions o;
  o.socket = socket;
  o.ram_size = 16 << 20;
  enter(kOpen);
  auto d = guest::Device::Open(o);
  if (!d) std::_Exit(3);
  enter(kDriver);
  auto drv = guest::Driver::Create(**d);
  if (!drv) std::_Exit(4);
  const vfio_user::DmaMapArgs map{kScratchIova, ByteSize{kScratchSize}, 0, vfio_user::kDmaRead | vfio_user::kDmaWrite};
  const vfio_user::DmaUnmapArgs unmap{kScratchIova, ByteSize{kScratchSize}, 0};
  auto step = [&](RunStep st) {
    static constexpr Phase kOf[] = {kGttMap, kSubmit, kWait, kCheck};
    enter(kOf[static_cast<int>(st)]);
  };
  for (uint32_t i = 0;; ++i) {
    enter(kDmaMap);
    if (!(*d)->client().DmaMap(map, *scratch)) std::_Exit(6);
    // A failure in the check step is a wrong result (exit 1); CheckSample names the first
    // word that differs ("kernel K binding B word W: got, reference R"). Anything else: 5.
    if (auto r = RunOne(**drv, i, 30000, step); !r) {
      std::fprintf(stderr, "guest %d round %u: %s\n", static_cast<int>(::getpid()), i, r.error().what.c_str());
      std::_Exit(phase->load() == kCheck ? 1 : 5);
    }
    enter(kDmaUnmap);
    if (!(*d)->client().DmaUnmap(unmap)) std::_Exit(6);
  }
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

  // 2. Guest processes killed at random points: during the open, the DMA mapping, a
  //    submission or a wait (and the steps between). Half the guests are killed 0-60 ms
  //    after the fork, uniformly; as measured, that lands about 70 % of kills in the wait (the
  //    kernel runs there) and one or two of 200 in the submission (a ring write and a
  //    doorbell, tens of microseconds), so a run could miss it. Every fourth guest is
  //    therefore killed as soon as it is seen entering a phase, each phase in turn, and
  //    every other odd one as it enters the submission. Either way the phase counted is the
  //    one the guest recorded last, read once it is reaped.
  const auto t1 = Clock::now();
  std::uniform_int_distribution<int> delay_us(0, 60000);
  void* page = ::mmap(nullptr, kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  REQUIRE(page != MAP_FAILED);
  auto* phase = new (page) std::atomic<int>(kForked);
  std::array<int, kPhases> killed_in{};
  int mismatches = 0, exited = 0;
  for (int i = 0; i < n; ++i) {
    const pid_t g = GuestProcess(d.Socket(kA), phase);
    REQUIRE(g > 0);
    if (i % 2 == 0) {
      std::this_thread::sleep_for(std::chrono::microseconds(delay_us(rng)));
    } else {
      // Every fourth guest: killed the moment it is seen entering a phase, each in turn;
      // every other odd one the moment it enters submit: a kill there, with its plan
      // still being packed when the disconnect cancels it, is where the executor once let
      // the next guest's first kernel ride in the cancelled batch (dropped with it, while
      // its fence still came: a wrong result; about 1 % of such kills).
      const int target = i % 4 == 3 ? kOpen + (i / 4) % (kPhases - kOpen) : kSubmit;
      const auto deadline = Clock::now() + std::chrono::milliseconds(Ms(1000));
      while (phase->load() != target && Clock::now() < deadline) std::this_thread::yield();
    }
    ::kill(g, SIGKILL);
    int st = 0;
    ::waitpid(g, &st, 0);
    const int p = phase->load();  // the guest is reaped: its last phase is final
    REQUIRE(p >= 0);
    REQUIRE(p < kPhases);
    if (WIFSIGNALED(st)) {
      ++killed_in[p];
    } else {
      ++exited;
      MESSAGE("guest ", i, " exited before its kill (wait status ", st, ") in ", std::string(kPhaseNames[p]));
      if (WIFEXITED(st) && WEXITSTATUS(st) == 1) ++mismatches;
    }
  }
  std::string counts;
  for (int p = 0; p < kPhases; ++p) counts += fmt::format(" {} {}", kPhaseNames[p], killed_in[p]);
  MESSAGE(n, " guests killed at random points in ", MsSince(t1) / 1000, " s; killed in:", counts, "; ", exited,
          " exited before the kill");
  CHECK(mismatches == 0);
  CHECK(exited == 0);
  // Every phase of a guest's life was interrupted at least once (with 64 kills or more, each
  // phase is the target of at least 2).
  if (n >= 64)
    for (Phase p : {kOpen, kDmaMap, kSubmit, kWait})
      CHECK_MESSAGE(killed_in[p] > 0, "no kill in ", std::string(kPhaseNames[p]));
  ::munmap(page, kPageSize);
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
