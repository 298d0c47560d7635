#pragma once
// A process's fds, RSS and mappings, from /proc (the F8 hygiene, soak and stop tests).

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <string>
#include <thread>

#include "tests/mdev/daemon_harness.h"

namespace vg::lifecycle {

struct Usage {
  size_t fds = 0;
  uint64_t rss_kib = 0;
  size_t maps = 0;  // lines of /proc/PID/maps: a guest's DMA mapping left behind shows here
};
inline Usage UsageOf(int64_t pid) {
  Usage u;
  std::error_code ec;
  for (auto it = std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec))
    ++u.fds;
  const std::string status = mgmt::ReadFile("/proc/" + std::to_string(pid) + "/status");
  if (auto at = status.find("VmRSS:"); at != std::string::npos) u.rss_kib = std::stoull(status.substr(at + 6));
  const std::string maps = mgmt::ReadFile("/proc/" + std::to_string(pid) + "/maps");
  u.maps = static_cast<size_t>(std::count(maps.begin(), maps.end(), '\n'));
  return u;
}

// The same once `settle` has passed: after what the caller just did (a hang-up, a control
// connection closed) has reached the process (its loop, a heartbeat later).
inline Usage SettledUsageOf(int64_t pid, std::chrono::milliseconds settle) {
  std::this_thread::sleep_for(settle);
  return UsageOf(pid);
}

}  // namespace vg::lifecycle
