#pragma once
// The sandbox a worker enters once its start-up is done (F13, docs/isolation.md "The
// sandbox"): no privileges, rlimits, and a seccomp allow-list. A guest that takes over a
// worker keeps only what serving that one vGPU needs: its own fds, its own memory, threads.

#include <sys/types.h>

#include <cstdint>
#include <span>

#include "base/result.h"

namespace vg::sandbox {

// ASan/LSan/UBSan builds: the runtimes need more than a worker does (see kSanitizerExtras in
// sandbox.cc) and ASan's shadow memory needs terabytes of address space. Tests read this.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_UNDEFINED__)
inline constexpr bool kSanitizerBuild = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(undefined_behavior_sanitizer)
inline constexpr bool kSanitizerBuild = true;
#else
inline constexpr bool kSanitizerBuild = false;
#endif
#else
inline constexpr bool kSanitizerBuild = false;
#endif

struct Limits {
  // RLIMIT_AS (soft and hard); 0 = unlimited. Ignored, with a warning in the log, in
  // sanitizer builds (kSanitizerBuild), whose shadow memory needs terabytes of address space.
  uint64_t address_space_bytes = 0;
  // RLIMIT_NOFILE (soft and hard). Must not exceed the current hard limit (raising it needs
  // CAP_SYS_RESOURCE, which Enter has just dropped) nor be below the fds already open.
  uint64_t open_files = 256;
  // RLIMIT_CORE is always 0: a crashing worker must not write guest memory to disk.
  // RLIMIT_NPROC is not used: it counts per uid, not per process.
};

struct Policy {
  Limits limits;
  bool seccomp = true;  // false only for debugging a worker under gdb/strace
};

// Drops every capability of the calling thread (effective, permitted, inheritable, ambient,
// and the bounding set where CAP_SETPCAP allows). Threads created afterwards inherit the
// empty sets; threads that already exist keep theirs, because capabilities are per thread
// and no syscall changes another thread's (glibc's setxid broadcast covers uid changes
// only, and Mesa's threads block every signal, so a libpsx-style broadcast cannot reach
// them). Call it first thing in a worker's main(), while it has one thread: Enter refuses to
// run while any other thread still holds a capability. Idempotent.
Result<> DropCapabilities();

// Irreversible, process-wide. In this order: PR_SET_NO_NEW_PRIVS; DropCapabilities() and a
// check that no thread of the process holds a capability (kBadState otherwise); rlimits;
// then, if p.seccomp, the allow-list filter (default action: kill the process) installed on
// every thread at once (SECCOMP_FILTER_FLAG_TSYNC), arch-checked (another arch: kill).
// On an error the process is partly sandboxed: the caller must exit.
Result<> Enter(const Policy& p);

// The syscalls the filter lets succeed (some only with given arguments: clone, prctl, kill,
// tgkill...), in sanitizer builds with the runtimes' additions. For docs and tests.
std::span<const char* const> AllowedSyscalls();

// What /proc/<pid>/status, /proc/<pid>/limits and /proc/<pid>/fd say, as the supervisor and
// the tests read them. Rlimits are the soft limits, and kUnlimited (RLIM_INFINITY, what
// the kernel itself uses) where unlimited: RLIMIT_CORE 0 means "no core", not "unlimited".
struct ProcessState {
  static constexpr uint64_t kUnlimited = UINT64_MAX;
  bool no_new_privs = false;
  int seccomp_mode = 0;  // 0 none, 1 strict, 2 filter
  uint64_t cap_eff = 0, cap_prm = 0, cap_bnd = 0;  // of the main thread
  uint64_t rss_bytes = 0;
  uint64_t vm_peak_bytes = 0;
  uint32_t threads = 0;
  uint32_t open_fds = 0;
  uint64_t rlimit_as = kUnlimited, rlimit_nofile = kUnlimited, rlimit_core = kUnlimited;
};
Result<ProcessState> Inspect(pid_t pid);

}  // namespace vg::sandbox
