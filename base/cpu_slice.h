#pragma once
// The CPU time slice of the calling thread (Linux's EEVDF scheduler, 6.12 and later).
//
// Why: on lavapipe the GPU is the host's CPUs, so a busy tenant's kernels keep every core
// busy, and a thread that wakes (a timer, a fence, a guest's doorbell) waits for the running
// thread's slice to end: 1.4 ms by default on a 2-core host. Measured 2026-12-03 on the
// 2-core CI VM with six spinning threads: a timer 400 us away fired 3.4-3.6 ms late at p99
// with the default slice, 36-40 us late with a 100 us one. A shorter slice gives a waking
// thread an earlier virtual deadline, and it runs at once (EEVDF's PREEMPT_SHORT). It does
// not give the thread more CPU time: that is still by weight (nice), unchanged.
//
// The daemon's loop, gate, executor and completion threads only wait and hand work on; they
// ask for the short slice. The engine's compute threads (lavapipe's) keep the default: a
// thread's slice is inherited by the threads it starts, so whoever creates the engine does
// so with the default slice and asks for the short one after (vgpud-worker's Create).
//
// Older kernels (Debian 12's 6.1) ignore sched_runtime for SCHED_OTHER: the call succeeds
// and the slice reads back as 0, so the result says "not in effect" and nothing else changes.
// Inside the worker's sandbox the call is refused (seccomp: EPERM): threads set their slice
// before it is entered, or inherit it.

namespace vg {

enum class CpuSlice {
  kShort,    // 100 us, the kernel's shortest: for threads that wait, wake and hand on
  kDefault,  // the kernel's base slice: for threads that compute
};

// Sets the calling thread's slice (and so that of threads it starts afterwards). True when
// the kernel reports the slice asked for in effect (kShort) or no custom slice (kDefault).
bool SetThreadCpuSlice(CpuSlice slice);

}  // namespace vg
