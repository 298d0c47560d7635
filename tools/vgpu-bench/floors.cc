#include "tools/vgpu-bench/floors.h"

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

Result<Stats> EventfdRtt(int iters) {
  VG_TRY_ASSIGN(EventFd ping, EventFd::Create(false));
  VG_TRY_ASSIGN(EventFd pong, EventFd::Create(false));
  pid_t child = ::fork();
  VG_ERROR_IF(child < 0, Errc::kIo, "fork failed");
  if (child == 0) {
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

Result<Stats> ShmPollRtt(int iters) {
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
  VG_TRY_ASSIGN(f.eventfd_rtt_us, EventfdRtt(iters));
  VG_TRY_ASSIGN(f.shm_poll_rtt_us, ShmPollRtt(iters));
  f.memcpy_gbps = MemcpyGbps(memcpy_bytes);
  return f;
}

}  // namespace vg::bench
