#include "tools/vgpu-bench/floors.h"

#include <sched.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <vector>

namespace vg::bench {
namespace {
using Clock = std::chrono::steady_clock;
double Us(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }

// The two processes of a round trip on two different CPUs, as a guest's vCPU and the
// daemon's worker run on a real host: left to the kernel, a blocking ping-pong is often
// woken onto the waker's own CPU (wake-affine), and the round trip is then two context
// switches (2.8 us on the 2-core dev VM) instead of a cross-CPU wake-up (66-81 us there),
// which made the floor, and the target read against it, change by 20x from run to run.
// The parent's own placement is put back afterwards. One CPU allowed: no pinning.
class CpuPair {
 public:
  CpuPair() {
    if (::sched_getaffinity(0, sizeof saved_, &saved_) != 0) return;
    for (int c = 0; c < CPU_SETSIZE && second_ < 0; ++c) {
      if (!CPU_ISSET(c, &saved_)) continue;
      (first_ < 0 ? first_ : second_) = c;
    }
    if (second_ >= 0) Pin(first_);
  }
  ~CpuPair() {
    if (second_ >= 0) (void)::sched_setaffinity(0, sizeof saved_, &saved_);
  }
  CpuPair(const CpuPair&) = delete;
  CpuPair& operator=(const CpuPair&) = delete;
  void PinChild() const {
    if (second_ >= 0) Pin(second_);
  }
  std::string Where() const {
    return second_ >= 0 ? fmt::format("CPUs {} and {}", first_, second_) : std::string("one CPU");
  }

 private:
  static void Pin(int cpu) {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    (void)::sched_setaffinity(0, sizeof one, &one);
  }
  cpu_set_t saved_{};
  int first_ = -1, second_ = -1;
};

Result<Stats> EventfdRtt(int iters, const CpuPair& cpus) {
  VG_TRY_ASSIGN(EventFd ping, EventFd::Create(false));
  VG_TRY_ASSIGN(EventFd pong, EventFd::Create(false));
  pid_t child = ::fork();
  VG_ERROR_IF(child < 0, Errc::kIo, "fork failed");
  if (child == 0) {
    cpus.PinChild();
    for (int i = 0; i < iters + 10; ++i) {
      if (!ping.Wait(10000).ok() || !pong.Signal().ok()) std::_Exit(1);
    }
    std::_Exit(0);
  }
  std::vector<double> us;
  for (int i = 0; i < iters + 10; ++i) {
    auto t0 = Clock::now();
    VG_TRY(ping.Signal());
    VG_TRY(pong.Wait(10000));
    if (i >= 10) us.push_back(Us(Clock::now() - t0));
  }
  ::waitpid(child, nullptr, 0);
  return Summarize(std::move(us));
}

Result<Stats> ShmPollRtt(int iters, const CpuPair& cpus) {
  void* p = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  VG_ERROR_IF(p == MAP_FAILED, Errc::kIo, "mmap failed");
  // Separate cache lines for each direction, as a well-built ring has.
  auto* ping = static_cast<std::atomic<uint64_t>*>(p);
  auto* pong = reinterpret_cast<std::atomic<uint64_t>*>(static_cast<char*>(p) + 64);
  ping->store(0);
  pong->store(0);
  pid_t child = ::fork();
  VG_ERROR_IF(child < 0, Errc::kIo, "fork failed");
  uint64_t total = static_cast<uint64_t>(iters) + 10;
  if (child == 0) {
    cpus.PinChild();  // two spinners on one CPU would each wait out the other's time slice
    for (uint64_t i = 1; i <= total; ++i) {
      while (ping->load(std::memory_order_acquire) != i) {
      }
      pong->store(i, std::memory_order_release);
    }
    std::_Exit(0);
  }
  std::vector<double> us;
  for (uint64_t i = 1; i <= total; ++i) {
    auto t0 = Clock::now();
    ping->store(i, std::memory_order_release);
    while (pong->load(std::memory_order_acquire) != i) {
    }
    if (i > 10) us.push_back(Us(Clock::now() - t0));
  }
  ::waitpid(child, nullptr, 0);
  ::munmap(p, 4096);
  return Summarize(std::move(us));
}

double MemcpyGbps(uint64_t bytes) {
  std::vector<char> a(bytes, 1), b(bytes, 0);
  double best = 0;
  for (int i = 0; i < 5; ++i) {
    auto t0 = Clock::now();
    std::memcpy(b.data(), a.data(), bytes);
    double s = std::chrono::duration<double>(Clock::now() - t0).count();
    best = std::max(best, static_cast<double>(bytes) / s / 1e9);
    a[i] = b[bytes - 1 - i];  // keep the copies observable
  }
  return best;
}
}  // namespace

Result<Floors> MeasureFloors(int iters, uint64_t memcpy_bytes) {
  Floors f;
  {
    const CpuPair cpus;
    f.placement = cpus.Where();
    VG_TRY_ASSIGN(f.eventfd_rtt_us, EventfdRtt(iters, cpus));
    VG_TRY_ASSIGN(f.shm_poll_rtt_us, ShmPollRtt(iters, cpus));
  }
  f.memcpy_gbps = MemcpyGbps(memcpy_bytes);
  return f;
}

}  // namespace vg::bench
