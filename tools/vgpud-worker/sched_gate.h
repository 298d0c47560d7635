#pragma once
// The worker's side of the host scheduler and of its vGPU's rate limits (F7,
// docs/management.md "Scheduling"): an engine::SubmitGate in front of the worker's engine,
// so both paths (the mediated ring's executor and the remoting server) are held by it,
// and neither ever waits for it: held work stays queued in the engine, in order, and a
// pump thread hands it to the device when the gate opens (a grant arrives, a bucket
// refills).
//
// - Grant: with scheduling on, work reaches the device only while this worker holds the
//   supervisor's grant. Held work sends one kSchedRequest. A preempt closes the gate at
//   once; the release goes when the work already on the device has completed, with the
//   device time the grant used and whether work is still held.
// - Contended (another vGPU waits, the supervisor says): at most one submission is on the
//   device at a time, so a preempt waits for one piece, not for a pipeline of them; and the
//   grant goes back once the vGPU has had no work for the idle grace: nothing on the device,
//   nothing held, nothing queued in the device model (the backlog probe). The engine would
//   otherwise idle under this grant while another vGPU has work. A holder whose work kept
//   the device busy less than two thirds of the time since then gives it back with no
//   grace as soon as nothing of its is on the device or held (a closed-loop guest of small
//   work).
// - Preempt: at once, or from a time the supervisor sends with it (the preempt goes ahead
//   once its time is fixed); then nothing more goes to the device, and the release follows
//   the last piece on it.
// - Uncontended: about two pieces on the device (it hides the gap between pieces), one
//   while the grant is younger than the scheduler's slice (a vGPU that just gave the grant
//   up is often back within it, and what is on the device is its wait).
// - Rate limits: token buckets on guest submissions per second and on device time per
//   second, each with a burst. A submission needs one token per guest submission it
//   carries; device time is charged after it ran (so a long piece goes into debt and the
//   next work waits until the bucket is positive again).

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>

#include "engine/engine.h"
#include "mediator/work_split.h"
#include "tools/vgpud/worker_channel.h"

namespace vg::worker {

struct GateConfig {
  bool scheduled = false;
  uint64_t rate_limit = 0;      // guest submissions per second; 0: none
  uint64_t rate_burst = 0;      // 0: rate_limit / 10, at least 1
  uint64_t gpu_time_limit_ns = 0;  // device ns per second; 0: none
  uint64_t gpu_time_burst_ns = 0;  // 0: gpu_time_limit_ns / 10, at least 1 ms
  uint64_t idle_grace_ns = 0;      // contended with nothing to run this long: release
  // The scheduler's slice: until its grant is this old, even an uncontended holder keeps one
  // piece on the device (0: no such rule).
  uint64_t slice_ns = 0;
  // Partitioned scheduling: a piece goes to the device only if it completes, by the vGPU's
  // recent pieces (its cost at their slowest rate; at most their longest unless it is dearer
  // than all of them; the estimates decay by 1/64 a piece and by half every 250 ms), before
  // the grant's preempt time (the slot's end less a margin); otherwise the grant goes back
  // with the work still held. Except a grant's first piece: one that needs most of a slot
  // goes if the grant came early in its slot (or after a grant given back with nothing
  // run), and may run a little past; one longer than the whole slot (no slot would ever fit
  // it) goes early in a slot too, but not within a second of another such piece that ran
  // past its grant's preempt time: an overrun into the next owner's slot is what a tenant
  // that signals on purpose makes, and the scheduler charges it as debt.
  bool fit_pieces = false;
  // A restarted worker's first config: the buckets' levels its predecessor left (kCarry),
  // which they start from instead of full, so a crash refills no burst and forgives no debt.
  struct Carried {
    double rate_tokens = 0;
    double gpu_tokens_ns = 0;
  };
  std::optional<Carried> carried;
  static GateConfig FromRecord(const daemon::channel::Record& r);
};

struct GateStats {
  uint64_t gpu_time_ns = 0;    // device time of this vGPU's work
  uint64_t queue_wait_ns = 0;  // time work was held (grant or rate limits)
  uint64_t rate_limited = 0;   // times a rate limit held work
  uint64_t grants = 0;
  uint64_t preempts = 0;
  uint64_t idle_releases = 0;  // grants given back because it had nothing to run while another waited
  bool holding = false;
};

class SchedGate final : public engine::SubmitGate {
 public:
  using Send = std::function<void(const daemon::channel::Record&)>;
  explicit SchedGate(Send send);
  ~SchedGate() override;
  SchedGate(const SchedGate&) = delete;
  SchedGate& operator=(const SchedGate&) = delete;

  // Starts the pump thread (before the sandbox forbids new threads? threads are allowed;
  // before serving, in any case). The engine must outlive the gate's use.
  void Start(engine::Engine* engine);
  void Stop();

  // From the worker's loop (channel records).
  void Configure(const GateConfig& c);
  // contended: another vGPU waits (one piece on the device at a time; the grant goes back
  // once the vGPU has had no work for the idle grace).
  // preempt_at: the preempt time fixed at the grant, if any (from then, as OnPreempt's
  // `from`); window_start: when the grant's window began (partitioned: its slot's start).
  void OnGrant(uint64_t grant, bool contended, std::optional<std::chrono::steady_clock::time_point> preempt_at = std::nullopt,
               std::optional<std::chrono::steady_clock::time_point> window_start = std::nullopt);
  // engine::SubmitGate: under the scheduler the executor keeps submissions to the shared
  // budget (mediator::kSharedSubmissionCostBudget, about a millisecond): whatever is on the
  // device when another vGPU starts to wait is that vGPU's wait.
  bool PrefersSmallSubmissions() const override;
  // `from`: the preempt takes effect then (the supervisor sends it ahead once its time is
  // fixed): until then work still goes to the device, and from then the first piece
  // boundary is where it stops. Unset or past: now.
  void OnPreempt(uint64_t grant, std::optional<std::chrono::steady_clock::time_point> from = std::nullopt);
  void OnContended(uint64_t grant);
  // Whether the vGPU has work queued that has not reached the engine yet (the device
  // model's queued and running plans). Called with the gate's lock held, from any thread:
  // must be lock-free. Null: none; once this returns the old probe is not called again
  // (clear it before what it reads goes away).
  void SetBacklogProbe(std::function<bool()> probe);
  // F8: the vGPU is being stopped and the supervisor's scheduler has forgotten it. Under
  // scheduling, no more work reaches the device (what is on it completes; what waits for a
  // grant stays held until the worker exits); without scheduling, nothing changes.
  void Revoke();
  // The worker is exiting: what the gate still holds goes to the device unscheduled and
  // unlimited, so the engine can drain and be destroyed (the plans behind it are cancelled;
  // what remains is bounded engine submissions). Nothing is held afterwards.
  void OpenForExit();

  GateStats Stats() const;

  // engine::SubmitGate
  bool Admit(const engine::Submission& s) override;
  void Ran(uint64_t busy_ns, bool device_idle, uint64_t cost) override;

 private:
  using Clock = std::chrono::steady_clock;
  void RefillLocked(Clock::time_point now);
  void HoldLocked(Clock::time_point now);
  void ReleaseLocked();
  void PublishLocked();  // small_submissions_ from cfg_.scheduled
  void MaybeIdleReleaseLocked();
  void BeginPreemptLocked();  // nothing more to the device; release once it has drained
  void PreemptIfDueLocked(Clock::time_point now);  // a preempt sent ahead whose time has come
  // fit_pieces: whether the next piece (of `next_cost`) may go: it completes before the
  // preempt (kYes), it is a first piece that may run a little past (kYes), it is longer
  // than the whole window and its once-a-kOverlongInterval turn has come (kOverlong), or not.
  enum class Fit : uint8_t { kNo, kYes, kOverlong };
  Fit FitsLocked(Clock::time_point now, uint64_t next_cost) const;
  void DecayEstimatesLocked(Clock::time_point now);
  static constexpr std::chrono::milliseconds kEstimateHalfLife{250};
  static constexpr std::chrono::seconds kOverlongInterval{1};
  // Work is held for want of the grant (not by a rate limit's bucket).
  bool WantsDeviceLocked() const { return held_since_.has_value() && !rate_held_; }  // contended, nothing on the device, nothing held: give it back
  void PumpLoop();
  void WakePumpLocked(std::optional<Clock::time_point> at);

  Send send_;
  engine::Engine* engine_ = nullptr;
  // An uncontended holder's pipeline on the device: two pieces' cost (set by Start); one
  // while its grant is younger than a slice.
  uint64_t uncontended_on_device_cost_ = 2 * mediator::kSharedSubmissionCostBudget;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  GateConfig cfg_;
  bool granted_ = false;
  bool requested_ = false;
  bool preempting_ = false;
  std::optional<Clock::time_point> preempt_from_;  // a preempt sent ahead, from then
  // Another vGPU waits (told with the grant, or by OnContended), since when. Unset: not contended.
  std::optional<Clock::time_point> contended_since_;
  Clock::time_point granted_at_{};  // when this grant arrived
  std::atomic<bool> small_submissions_{false};  // PublishLocked(), read without the lock
  std::optional<Clock::time_point> idle_since_;  // contended, nothing on the device nor held, since
  std::function<bool()> backlog_;
  bool revoked_ = false;
  uint64_t grant_ = 0;
  uint64_t grant_used_ns_ = 0;
  uint64_t grant_ran_ = 0;  // submissions completed under this grant
  Clock::time_point window_start_{};  // the grant's window (OnGrant)
  // The longest of the vGPU's recent pieces on the device (ns), the dearest (cost), and the
  // slowest rate per cost unit of a whole piece (ns), each decaying by 1/64 a piece: the fit
  // rule's estimate, with the two below.
  uint64_t piece_max_ns_ = 0;
  uint64_t cost_max_ = 0;
  double ns_per_cost_ = 0;
  bool unfit_release_ = false;  // the last grant went back by the fit rule, nothing run
  Clock::time_point estimates_at_{};  // the estimates' last decay
  // The preempt time this grant was given (it stays after the preempt begins), and when a
  // piece of the vGPU last completed past its grant's.
  std::optional<Clock::time_point> preempt_deadline_;
  Clock::time_point last_overrun_{};  // of a piece let on as longer than its window
  bool overlong_on_device_ = false;   // the piece on the device was let on as such
  uint64_t fixed_ns_ = 0;  // a piece's fixed cost: the least time of one, drifting up
  double slope_ = 0;       // the slowest rate per cost unit over the fixed cost (ns)
  uint32_t on_device_ = 0;
  uint64_t on_device_cost_ = 0;  // Submission::cost of what is on the device
  std::optional<Clock::time_point> held_since_;
  bool rate_held_ = false;
  double sub_tokens_ = 0;
  double gpu_tokens_ns_ = 0;
  Clock::time_point refilled_at_{};
  // The levels as last told the supervisor (kCarry), and when.
  void CarryLocked(Clock::time_point now, bool now_or_never);
  Clock::time_point carried_at_{};
  double carried_sub_ = 0, carried_gpu_ns_ = 0;
  // The pump thread: runs engine->Pump() when asked, or at a refill time.
  bool pump_now_ = false;
  std::optional<Clock::time_point> pump_at_;
  bool stop_ = false;
  GateStats stats_;
  std::thread thread_;
};

}  // namespace vg::worker
