#pragma once
// The channel between the vgpud supervisor and one vGPU worker: a SOCK_SEQPACKET socketpair,
// the worker's end at fd 3. Every message is one fixed-size record; the supervisor reads
// what a worker says as hostile (a worker serves a guest and may be its puppet), so a record
// of another size, magic or kind, or a pong for a ping never sent, is a protocol violation
// that costs the worker its life, never the supervisor anything.
//
//   supervisor → worker   kGo (after the worker is placed in its cgroup; values[0..3]: the
//                         worker's adoption token), kAdopt (a new supervisor's first record
//                         on the adoption socket, values[0..3]: the token), kPing (seq),
//                         kFault (test builds only act on it), kSchedConfig (scheduling and
//                         rate limits, at start and when changed), kSchedGrant and
//                         kSchedPreempt (seq: the grant; a grant's values[0]: 1 when another
//                         vGPU already waits; a preempt's values[0]: 0 now, else the
//                         CLOCK_MONOTONIC ns from which it takes effect), kSchedContended
//                         (seq: the grant; another vGPU began to wait: one piece on the
//                         device, release once idle),
//                         kStopRequest (F8: values[0] the ms its client has to let go
//                         after REQ), kReset (F8: vgpuctl reset), kScreenshot (F10:
//                         seq; copy the plane being scanned out into the frame fd)
//   worker → supervisor   kReady (serving; sandboxed), kPong (seq, counters),
//                         kSchedRequest (it has work held for want of a grant),
//                         kSchedRelease (seq: the grant; device ns used, still wants),
//                         kScreenshotDone (seq: the kScreenshot's; ScreenshotSlot values),
//                         kCarry (its rate-limit buckets' levels, for a successor)

#include <sys/socket.h>

#include <array>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <optional>
#include <string_view>

namespace vg::daemon::channel {

// Fixed descriptor numbers in the worker (posix_spawn dup2's them there).
inline constexpr int kChannelFd = 3;
inline constexpr int kVfioUserFd = 4;   // listening SOCK_STREAM, <uuid>.sock
inline constexpr int kRemotingFd = 5;   // listening SOCK_SEQPACKET, <uuid>.remote.sock
// Bound, not listening, SOCK_SEQPACKET <uuid>.adopt.sock (mode 0600): the worker calls
// listen() itself, so that a connecting supervisor's SO_PEERCRED names the worker's pid.
inline constexpr int kAdoptFd = 6;
// F10: a memfd of kFrameFdBytes the supervisor creates (and keeps a copy of): the worker
// writes the frame a kScreenshot asks for at offset 0 with pwrite (no mapping: nothing of
// its address-space allowance), the supervisor reads it back with pread, sizes checked.
inline constexpr int kFrameFd = 7;
inline constexpr uint64_t kFrameFdBytes = uint64_t{4096} * 4096 * 4;
// F10: the vGPU's VNC console, a listening TCP socket (loopback by default) the supervisor
// bound; absent when the daemon serves no console (--vnc off).
inline constexpr int kVncFd = 8;
// kGo's values, by slot: the token, then the console's password (up to 8 bytes, little
// endian, and its length; 0: no password).
enum class GoSlot : uint32_t { kToken0, kToken1, kToken2, kToken3, kVncPassword, kVncPasswordLen };
// The adoption token: 256 random bits the supervisor hands its worker in kGo and records
// in the worker's state file (0600, in the private runtime directory).
inline constexpr size_t kTokenWords = 4;

inline constexpr uint32_t kMagic = 0x76677731;  // "vgw1"

enum class Kind : uint32_t {
  kGo = 1,
  kPing = 2,
  kPong = 3,
  kReady = 4,
  kFault = 5,
  kSchedConfig = 6,
  kSchedRequest = 7,
  kSchedGrant = 8,
  kSchedPreempt = 9,
  kSchedRelease = 10,
  kSchedContended = 11,
  kAdopt = 12,
  kStopRequest = 13,
  kReset = 14,
  kScreenshot = 15,
  kScreenshotDone = 16,
  kCarry = 17,
};
// kCarry's values, by slot (worker → supervisor): what its successor starts from if it dies
// (the supervisor sends them back in the successor's first kSchedConfig), so a crash refills
// no bucket, forgives no debt and lifts no quarantine. kWhat says which: kCarryBuckets (its
// rate-limit buckets changed; signed levels, as int64 bits), kCarryHealth (its fault health
// moved to throttled or quarantined, or a reset put it on probation; as Counter::kHealth,
// kHealthReason, kHealthRate).
enum class CarrySlot : uint32_t { kWhat, kRateMilliTokens, kGpuTokensNs, kHealth, kHealthReason, kHealthRate };
inline constexpr uint64_t kCarryBuckets = 1, kCarryHealth = 2;
// kScreenshotDone's values, by slot: kErrc 0 when the frame was written (else the Errc: no
// plane, say), its size, format (abi::display::kFormat*) and byte count (rows packed).
enum class ScreenshotSlot : uint32_t { kErrc, kWidth, kHeight, kFormat, kBytes, kFlips };

// kSchedConfig's values, by slot.
enum class SchedConfigSlot : uint32_t {
  kScheduled,        // 1: hand work to the device only under a grant; 0: always
  kRateLimit,        // guest submissions per second, 0: none
  kRateBurst,        // bucket size in submissions
  kGpuTimeLimitNs,   // device ns per second, 0: none
  kGpuTimeBurstNs,   // bucket size in ns
  kIdleGraceNs,      // contended and idle this long: the grant goes back
  kFrameLimit,       // F10: scan-out commits presented per second at most, 0: none
  kSliceNs,          // the scheduler's slice: a grant younger than this keeps one piece on the device
  kFitPieces,        // 1: a piece goes to the device only if it can complete before the grant's preempt time
  // A restarted worker's first config only: what its predecessor left (kCarried 1), the
  // buckets' levels (kCarry's) and its fault health (Counter::kHealth, kHealthReason,
  // kHealthRate values of its last pong).
  kCarried,
  kCarriedRateMilliTokens,
  kCarriedGpuTokensNs,
  kCarriedHealth,
  kCarriedHealthReason,
  kCarriedHealthRate,
};
// kSchedGrant's values: [0] 1 when another vGPU waits (contended); [1] the preempt time fixed
// at the grant (steady_clock ns), 0: none; [2] when the grant's window began (partitioned:
// its slot's start), 0: at the grant.
// kSchedRelease's values, by slot.
// kIdleTailNs: how long the vGPU had had no work at all when it gave an idle grant back
// (the idle grace it waited out; the scheduler caps it at its own grace, the worker lies).
enum class SchedReleaseSlot : uint32_t { kUsedNs, kWants, kIdleTailNs };

// What a pong reports, by slot in Record::values.
enum class Counter : uint32_t {
  kDoorbells,
  kSubmissions,
  kMmioRefusals,
  kCommandRefusals,
  kResets,
  kIrqs,
  kCommandsAudited,
  kPlansExecuted,
  kVfioClients,       // 0 or 1
  kRemotingClients,
  kRemotingCommands,
  kRemotingErrors,
  // F7: scheduling, rate limits, fault health (docs/management.md). Times in ns.
  kGpuTimeNs,         // engine time charged to this vGPU (both paths)
  kQueueWaitNs,       // time its work waited for the engine (scheduler, rate limits)
  kBytesRead,         // guest memory the device read for its commands
  kBytesWritten,      // guest memory the device wrote
  kRateLimited,       // submissions a rate limit deferred
  kFaults,            // refused or faulted commands counted by the fault monitor
  kThrottledNs,       // time spent throttled for faults
  kQuarantinedNs,     // time spent quarantined
  kHealth,            // channel::Health
  kHealthReason,      // channel::HealthReason
  kHealthRate,        // the highest faults/s over the window since the health last changed (0 while ok)
  // F12: what the mediated fast path did (docs/device-spec.md "Execution", "Idle notify").
  kPlansInline,           // host-op-only plans completed on the loop
  kPlansInlineSubmitted,  // small engine plans submitted by the loop
  kPlansCoalesced,        // plans whose work joined another's engine submission
  kTailRereads,           // tail shadow re-reads (idle notify)
  // F10 scan-out and frame pacing (docs/management.md, "Frame pacing").
  kFlipsRequested,    // commits the guest made (ENABLE or FLIP) that passed the checks
  kFlipsPresented,    // commits that took effect at a frame boundary
  kFlipsDeferred,     // commits the frame limit held past at least one boundary
  kFlipsReplaced,     // commits a later one replaced before they took effect (mailbox)
  kDisplayFps,        // commits presented per second over the last whole second (gauge)
  kCount,
};

// What `vgpuctl show` and the metrics endpoint call each counter: one table, so a counter
// added here reaches both. kHealth/kHealthReason are states, not counters (gauge).
struct CounterName {
  Counter counter;
  std::string_view name;
  bool gauge;
};
inline constexpr CounterName kCounterNames[] = {
    {Counter::kDoorbells, "doorbells", false},
    {Counter::kSubmissions, "submissions", false},
    {Counter::kMmioRefusals, "mmio_refusals", false},
    {Counter::kCommandRefusals, "command_refusals", false},
    {Counter::kResets, "resets", false},
    {Counter::kIrqs, "irqs", false},
    {Counter::kCommandsAudited, "commands_audited", false},
    {Counter::kPlansExecuted, "plans_executed", false},
    {Counter::kVfioClients, "vfio_user_clients", true},
    {Counter::kRemotingClients, "remoting_clients", true},
    {Counter::kRemotingCommands, "remoting_commands", false},
    {Counter::kRemotingErrors, "remoting_errors", false},
    {Counter::kGpuTimeNs, "gpu_time_ns", false},
    {Counter::kQueueWaitNs, "queue_wait_ns", false},
    {Counter::kBytesRead, "bytes_read", false},
    {Counter::kBytesWritten, "bytes_written", false},
    {Counter::kRateLimited, "rate_limited", false},
    {Counter::kFaults, "faults", false},
    {Counter::kThrottledNs, "throttled_ns", false},
    {Counter::kQuarantinedNs, "quarantined_ns", false},
    {Counter::kHealth, "health", true},
    {Counter::kHealthReason, "health_reason", true},
    {Counter::kHealthRate, "health_fault_rate", true},
    {Counter::kPlansInline, "plans_inline", false},
    {Counter::kPlansInlineSubmitted, "plans_inline_submitted", false},
    {Counter::kPlansCoalesced, "plans_coalesced", false},
    {Counter::kTailRereads, "tail_rereads", false},
    {Counter::kFlipsRequested, "flips_requested", false},
    {Counter::kFlipsPresented, "flips_presented", false},
    {Counter::kFlipsDeferred, "flips_deferred", false},
    {Counter::kFlipsReplaced, "flips_replaced", false},
    {Counter::kDisplayFps, "display_fps", true},
};
static_assert(std::size(kCounterNames) == static_cast<size_t>(Counter::kCount));

// A vGPU's fault health (F7): ok, throttled for a high fault rate, or quarantined (its
// submissions refused with kQuarantined until a reset).
enum class Health : uint64_t { kOk = 0, kThrottled = 1, kQuarantined = 2 };
// Which fault rate put it there: the kind with the most faults in the window that moved it
// (kNone while ok), or kQuarantineLifted: a reset lifted its quarantine and it is throttled
// on probation.
enum class HealthReason : uint64_t {
  kNone = 0,
  kCommandRefusals = 1,
  kMmioRefusals = 2,
  kDmaFaults = 3,
  kRemotingErrors = 4,
  kQuarantineLifted = 5,
};

// Test-only faults (a worker built with VGPUD_TEST_HOOKS acts on them; others log and ignore).
enum class Fault : uint64_t {
  kForbiddenSyscall = 1,  // a system call the seccomp filter kills for
  kHangLoop = 2,          // the event loop stops turning (as F11's blocking reads once made it)
  kCrash = 3,             // SIGSEGV
  kExhaustMemory = 4,     // allocates until the address-space limit refuses
  kDeviceLost = 5,        // the engine reports its device lost (engine::Engine::SimulateDeviceLost)
  kFloodChannel = 6,      // sends records to the supervisor as fast as the channel takes them
};

struct Record {
  uint32_t magic = kMagic;
  Kind kind = Kind::kPing;
  uint64_t seq = 0;
  std::array<uint64_t, 32> values{};
};
static_assert(static_cast<size_t>(Counter::kCount) <= std::tuple_size_v<decltype(Record::values)>);
static_assert(sizeof(Record) == 272);

inline Record Make(Kind k, uint64_t seq = 0) {
  Record r;
  r.kind = k;
  r.seq = seq;
  return r;
}

// Nonblocking send of one record. False when the peer's queue is full or gone.
inline bool Send(int fd, const Record& r) {
  ssize_t n;
  do {
    n = ::send(fd, &r, sizeof r, MSG_NOSIGNAL | MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  return n == static_cast<ssize_t>(sizeof r);
}

enum class RecvStatus { kRecord, kEmpty, kClosed, kMalformed };

// One record, checked for size, magic and a known kind. MSG_TRUNC reports the real size of
// an oversized record, which is then refused whole.
inline RecvStatus Recv(int fd, Record& out) {
  Record r;
  ssize_t n;
  do {
    n = ::recv(fd, &r, sizeof r, MSG_DONTWAIT | MSG_TRUNC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? RecvStatus::kEmpty : RecvStatus::kClosed;
  if (n == 0) return RecvStatus::kClosed;
  if (n != static_cast<ssize_t>(sizeof r) || r.magic != kMagic) return RecvStatus::kMalformed;
  switch (r.kind) {
    case Kind::kGo: case Kind::kPing: case Kind::kPong: case Kind::kReady: case Kind::kFault:
    case Kind::kSchedConfig: case Kind::kSchedRequest: case Kind::kSchedGrant: case Kind::kSchedPreempt:
    case Kind::kSchedRelease: case Kind::kSchedContended: case Kind::kAdopt:
    case Kind::kStopRequest: case Kind::kReset: case Kind::kScreenshot: case Kind::kScreenshotDone:
    case Kind::kCarry: break;
    default: return RecvStatus::kMalformed;
  }
  out = r;
  return RecvStatus::kRecord;
}

}  // namespace vg::daemon::channel
