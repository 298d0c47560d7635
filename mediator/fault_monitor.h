#pragma once
// F7: a vGPU's fault health. One FaultMonitor per vGPU counts what its guest gets refused or
// makes fault, on both paths of its worker (the mediated device model and the remoting
// server), over a sliding window, and decides the vGPU's health from the rates:
//
//   ok ── faults/s over the window >= throttle_per_s ──▶ throttled
//   throttled ── throttled for a whole window, and faults/s over it >= quarantine_per_s ──▶ quarantined
//   throttled ── quiet_ms without a fault ──▶ ok
//   quarantined ── a reset of the vGPU ──▶ throttled (probation: a fresh window, quiet_ms to ok)
//
// Throttled: each submission (a mediated ring pass, a remoting command) must be admitted,
// at most throttle_rate per second; the caller defers the rest with a timer (never a sleep).
// Quarantined: every new submission is refused with kQuarantined, and nothing but a reset
// lifts it (docs/management.md, "Fault health"). Refusals of kQuarantined itself, and
// flow control (a full queue), are not faults.
//
// Thread-safe (the loop, the fetch thread and the executor's retire thread all report); its
// lock is a leaf: nothing is called while it is held.

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>

#include "base/base.h"

namespace vg::mediator {

struct FaultPolicy {
  // The sliding window the rates are measured over.
  uint32_t window_ms = 1000;
  // ok -> throttled at this many faults per second over the window. 0: never throttled
  // (and so never quarantined); faults are still counted.
  uint32_t throttle_per_s = 100;
  // throttled -> quarantined at this many faults per second over a window spent wholly
  // throttled. Below the throttle threshold on purpose: a throttled vGPU is on probation,
  // and its submissions are admitted at throttle_rate at most. 0: never quarantined.
  uint32_t quarantine_per_s = 25;
  // Submissions admitted per second while throttled. 0: throttled vGPUs are not slowed.
  uint32_t throttle_rate = 50;
  // throttled -> ok after this long without a fault.
  uint32_t quiet_ms = 2000;
};

enum class FaultKind : uint8_t {
  kCommandRefusal,  // the auditor or the ring refused a submission (mediated)
  kMmioRefusal,     // a register, GTT or GTT batch write refused (mediated)
  kDmaFault,        // guest memory faulted while a plan executed (mediated)
  kRemotingError,   // a refused remoting command, a failed submission, a bad handshake
  kCount,
};
inline constexpr size_t kFaultKinds = static_cast<size_t>(FaultKind::kCount);

enum class Health : uint8_t { kOk, kThrottled, kQuarantined };

// Why the vGPU is where it is: the kind with the most faults in the window that moved it,
// or that a reset lifted its quarantine (it is then throttled on probation).
enum class HealthCause : uint8_t { kNone, kFaults, kQuarantineLifted };

struct HealthReport {
  Health health = Health::kOk;
  HealthCause cause = HealthCause::kNone;
  FaultKind kind = FaultKind::kCommandRefusal;  // the dominant kind (cause kFaults)
  // The highest faults/s over the window since that transition (cause kFaults), and `kind`
  // the dominant kind then.
  uint32_t rate_per_s = 0;
  uint64_t faults = 0;                           // every fault counted since creation
  std::array<uint64_t, kFaultKinds> by_kind{};
  uint64_t throttled_ns = 0;    // time spent throttled (so far, the current stretch included)
  uint64_t quarantined_ns = 0;  // time spent quarantined
};

// What a submission may do now.
struct Admission {
  Errc code = Errc::kOk;                // kOk, or kQuarantined: refuse it
  std::chrono::nanoseconds wait{0};     // kOk and > 0: throttled, try again after this long
  bool go() const { return code == Errc::kOk && wait.count() == 0; }
};

class FaultMonitor {
 public:
  using Clock = std::function<int64_t()>;  // monotonic nanoseconds
  static int64_t SteadyNs();

  explicit FaultMonitor(FaultPolicy policy = {}, Clock now = &FaultMonitor::SteadyNs);
  FaultMonitor(const FaultMonitor&) = delete;
  FaultMonitor& operator=(const FaultMonitor&) = delete;

  void OnFault(FaultKind kind);
  // One submission: admitted (a throttle token taken), to wait, or refused.
  Admission Admit();
  bool Quarantined();
  // The vGPU was reset (RESET, DEVICE_RESET): a quarantine is lifted to probation.
  void OnReset();
  // A restarted worker's monitor takes its predecessor's health (the supervisor carries it):
  // a worker's crash is no way out of a quarantine or a throttle. The state is carried, not
  // the window's faults; a throttle's quiet time starts again.
  void Restore(Health h, HealthCause cause, FaultKind kind, uint32_t rate_per_s);
  HealthReport Report();
  const FaultPolicy& policy() const { return policy_; }
  // Told, under the monitor's lock, of every move to throttled or quarantined and of a
  // reset's probation (not of the quiet decay to ok): the worker tells its supervisor at
  // once, so a successor of a worker that dies right after starts so too. Must not block
  // nor call back into the monitor. Set before any fault comes.
  using Observer = std::function<void(const HealthReport&)>;
  void SetObserver(Observer o) { observer_ = std::move(o); }

 private:
  // The window in kBuckets buckets; a bucket is reused once its epoch has left the window.
  static constexpr uint32_t kBuckets = 10;
  struct Bucket {
    int64_t epoch = -1;
    std::array<uint32_t, kFaultKinds> count{};
  };
  void Advance(int64_t now);  // time-driven transitions (the quiet decay)
  void Enter(Health h, int64_t now);
  HealthReport ReportLocked(int64_t now) const;
  void Notify(int64_t now) const {
    if (observer_) observer_(ReportLocked(now));
  }
  uint64_t InWindow(int64_t now, std::array<uint64_t, kFaultKinds>* by_kind = nullptr) const;
  uint64_t Limit(uint32_t per_s) const;  // faults in a window that make per_s
  uint32_t Rate(uint64_t in_window) const;

  const FaultPolicy policy_;
  const Clock now_;
  Observer observer_;
  const int64_t window_ns_;
  const int64_t bucket_ns_;
  std::mutex mu_;
  std::array<Bucket, kBuckets> buckets_{};
  Health health_ = Health::kOk;
  // health_ for Admit's fast path: a healthy vGPU's submission costs one load, no lock and no
  // clock read (every mediated ring pass and every remoting command asks). Written under mu_.
  std::atomic<Health> health_seen_{Health::kOk};
  HealthCause cause_ = HealthCause::kNone;
  FaultKind kind_ = FaultKind::kCommandRefusal;
  uint32_t rate_ = 0;
  int64_t since_ = 0;        // when health_ was entered
  int64_t last_fault_ = 0;
  int64_t next_admit_ = 0;   // throttled: the earliest time the next submission goes
  uint64_t faults_ = 0;
  std::array<uint64_t, kFaultKinds> by_kind_{};
  uint64_t throttled_ns_ = 0, quarantined_ns_ = 0;  // stretches that have ended
};

const char* FaultKindName(FaultKind k);

}  // namespace vg::mediator
