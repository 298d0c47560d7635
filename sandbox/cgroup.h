#pragma once
// Per-worker cgroup v2 slots (F13): a memory, CPU and pid bound per vGPU that the kernel
// enforces, where the host offers cgroup v2 with a delegated, writable subtree. Elsewhere
// CgroupParent::Detect says why not and the supervisor falls back to rlimits (sandbox.h).

#include <sys/types.h>

#include <cstdint>
#include <filesystem>
#include <string_view>

#include "base/result.h"

namespace vg::sandbox {

struct CgroupLimits {
  uint64_t memory_max_bytes = 0;  // memory.max (swap off for the slot where memory.swap.max exists); 0 = no limit
  uint32_t cpu_max_percent = 0;   // cpu.max quota per 100 ms period, % of one CPU (200 = two CPUs); 0 = no limit
  uint32_t pids_max = 0;          // pids.max (threads count); 0 = no limit
};

// One worker's cgroup. Move-only; the destructor removes the directory, which the kernel
// allows only once every process in it has exited and been reaped.
class CgroupSlot {
 public:
  CgroupSlot() = default;
  ~CgroupSlot();
  CgroupSlot(CgroupSlot&& o) noexcept;
  CgroupSlot& operator=(CgroupSlot&& o) noexcept;
  CgroupSlot(const CgroupSlot&) = delete;
  CgroupSlot& operator=(const CgroupSlot&) = delete;

  // Moves a process (all its threads) into the slot. Do it before the worker starts serving
  // a guest: memory charged before the move stays with the old cgroup.
  Result<> AddProcess(pid_t pid);
  // memory.current: what the slot's processes are charged now (page cache and memfds included).
  Result<uint64_t> MemoryCurrent() const;
  // memory.events "oom_kill": how many processes the slot's memory.max has killed.
  Result<uint64_t> OomKills() const;
  // cgroup.kill (Linux >= 5.14): SIGKILL to every process in the slot, at once.
  Result<> KillAll();

  const std::filesystem::path& path() const { return path_; }
  bool Valid() const { return !path_.empty(); }

 private:
  friend class CgroupParent;
  explicit CgroupSlot(std::filesystem::path p) : path_(std::move(p)) {}
  void Remove() noexcept;
  std::filesystem::path path_;
};

class CgroupParent {
 public:
  // The cgroup the slots are created in. Default: our own cgroup (the "0::/path" line of
  // /proc/self/cgroup) under /sys/fs/cgroup, or under /sys/fs/cgroup/unified on a hybrid
  // host. It must be cgroup2 (statfs), writable by us, and offer "memory" and "cpu" in
  // cgroup.controllers. Detect then enables +memory +cpu (and +pids where offered) in
  // cgroup.subtree_control. cgroup v2's "no internal processes" rule forbids that while the
  // cgroup holds processes (outside the root cgroup), so if it holds only us, Detect first
  // moves us into a leaf child named kSupervisorLeaf; if it holds other processes too, it
  // refuses (kBusy) rather than move processes it does not own.
  // kUnsupported: no usable cgroup v2 here (the message says why); kAccessDenied: not
  // delegated to us. Either way the caller falls back to rlimits.
  static Result<CgroupParent> Detect(const std::filesystem::path& override_dir = {});

  static constexpr std::string_view kSupervisorLeaf = "supervisor";

  // A child cgroup named `name` (one path component) with the limits set. A leftover of the
  // same name with no processes (a supervisor that crashed) is removed and made afresh.
  Result<CgroupSlot> CreateSlot(std::string_view name, const CgroupLimits& l);

  const std::filesystem::path& path() const { return path_; }
  bool has_pids() const { return has_pids_; }

 private:
  CgroupParent(std::filesystem::path p, bool pids) : path_(std::move(p)), has_pids_(pids) {}
  std::filesystem::path path_;
  bool has_pids_ = false;
};

}  // namespace vg::sandbox
