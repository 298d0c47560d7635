#include "base/cpu_slice.h"

#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace vg {
namespace {

// The kernel's struct sched_attr (uapi linux/sched/types.h, SCHED_ATTR_SIZE_VER0): glibc 2.36
// has no wrapper for sched_setattr/sched_getattr.
struct SchedAttr {
  uint32_t size;
  uint32_t sched_policy;
  uint64_t sched_flags;
  int32_t sched_nice;
  uint32_t sched_priority;
  uint64_t sched_runtime;  // for SCHED_OTHER (6.12+): the slice in ns; 0 asks for the default
  uint64_t sched_deadline;
  uint64_t sched_period;
};

constexpr uint64_t kShortSliceNs = 100'000;  // the kernel clamps a custom slice to 0.1-100 ms

}  // namespace

bool SetThreadCpuSlice(CpuSlice slice) {
  SchedAttr a{};
  if (::syscall(SYS_sched_getattr, 0, &a, sizeof a, 0) != 0) return false;
  // Only SCHED_OTHER and SCHED_BATCH have a slice; an operator's real-time or idle policy
  // for the daemon is theirs to keep.
  if (a.sched_policy != SCHED_OTHER && a.sched_policy != SCHED_BATCH) return false;
  const uint64_t want = slice == CpuSlice::kShort ? kShortSliceNs : 0;
  SchedAttr set{};
  set.size = sizeof set;
  set.sched_policy = a.sched_policy;
  set.sched_nice = a.sched_nice;  // unchanged (the call sets it too)
  set.sched_runtime = want;
  if (::syscall(SYS_sched_setattr, 0, &set, 0) != 0) return false;
  SchedAttr got{};
  if (::syscall(SYS_sched_getattr, 0, &got, sizeof got, 0) != 0) return false;
  // 6.12+ reads back the slice in effect (the base slice, 1.4 ms on 2 cores, once the custom
  // one is dropped); 6.1 reads back 0 for SCHED_OTHER whatever was asked.
  return slice == CpuSlice::kShort ? got.sched_runtime == kShortSliceNs : got.sched_runtime != kShortSliceNs;
}

}  // namespace vg
