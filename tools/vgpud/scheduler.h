#pragma once
// The host's GPU time shared between running vGPUs by weight (F7, docs/management.md
// "Scheduling"). One vGPU at a time holds the engine (a grant), as a time-sliced GPU runs
// one context at a time: its worker's engine hands work to the device only while it holds
// the grant. With `concurrency` N > 1, up to N vGPUs hold grants at once (a device that runs
// several contexts side by side: guests whose work leaves the device idle between their
// submissions overlap instead of taking turns); everything below then holds per holder,
// and "another vGPU waits" means all N grants are held. Who gets it next is the waiting vGPU with the least virtual time, which
// advances by the device time a vGPU used divided by its weight (stride scheduling), so
// over time each busy vGPU gets weight / sum-of-busy-weights of the engine.
//
// Short requests first (as EEVDF orders by virtual deadline, virtual time plus the request):
// a vGPU whose contended grants use r < slice of the engine on average is ordered by its
// virtual time less (slice - r) of its own device time. A busy vGPU (its grants run to the
// slice, or are preempted) earns nothing, so busy vGPUs are ordered by virtual time alone,
// at any weights; a light one (a small copy, then its fence) is ahead of a busy one that is
// up to slice - r behind it, and owed the engine (the holder keeps only its minimum hold).
// The credit is bounded by a slice, so long-run shares are still the weights'. While a vGPU
// that asks for half a slice or less waits, every holder keeps only a quarter slice.
//
// Weights among concurrent holders (N > 1): vGPUs that hold grants side by side share the
// device, so while k of them hold and any other vGPU is busy each is charged 1/k of the
// time (its share of the device, as processor sharing). Nobody waits for a grant then, so
// weights are kept by lag instead: a holder whose virtual time runs more than a slice of
// its own ahead of another holder's is asked to yield once it has had a slice, and a
// waiting vGPU that far ahead of every holder does not take a free grant until they catch
// up. The device is never idle for it: the holders it waits for are running.
//
// - Work-conserving: a vGPU alone keeps its grant as long as nobody else asks (no message
//   per submission), and time used while nobody else wanted the engine is not charged.
//   Once another vGPU waits, the holder is told (contended): from then on it keeps at most
//   one submission on the device, and gives the grant back once its vGPU has had no work
//   at all for `idle_grace` — nothing on the device, nothing held, and nothing queued in
//   its device model (a plan being materialized or waiting for a hazard to drain is work:
//   a backlogged tenant keeps its share across such gaps). A tenant that thinks between
//   submissions gives the engine up while it thinks, and its lower virtual time gets it
//   back first when it returns. A holder that says it has work but leaves the engine idle
//   is preempted at the slice like any other, and releases at once.
// - Charge: the time a vGPU held the grant while another was busy, device time or not (a
//   holder that keeps the grant through a gap keeps the others out just the same); 1/k of
//   it beside k - 1 other holders.
// - Bounded slice: once another vGPU waits, the holder is asked to yield (preempted) when
//   its grant is `slice` old; it stops handing new work to the device at once and
//   releases when its device work has drained. Work already on the device cannot be cut,
//   so it is charged in full: a long piece is debt that delays the vGPU's next grant.
// - A worker that does not release within `yield_timeout` of a preempt is killed (a
//   worker is hostile as its guest's puppet; a cooperative one cannot miss it, since its
//   mediated device work is bounded by the executor's cost budget).
//
// Time-partitioned (policy `partitioned`): none of the above decides who runs. Time is a fixed
// rotation of slots (a frame), one per running vGPU in UUID order, slice × weight / 100 long;
// a slot is its owner's whether it has work or not, and nobody else's. The owner holds the
// grant only inside its slot and is preempted `partition_margin` before the slot ends (its
// worker fits its pieces before then: GateConfig::fit_pieces); a grant that runs past its
// slot (a piece longer than the vGPU's recent ones) is charged as debt: the vGPU is not
// granted again until its share has paid it back. What one tenant does then moves nothing
// of another's slots: not when it may run nor how long it waits, so the load of one is not
// something another can time (the covert channel through the shared engine; what is left
// is a grant's overrun, bounded by one piece and paid back as debt). The price is work
// conservation: an idle vGPU's slot stays idle.
//
// Pure logic on the supervisor's loop thread: the caller feeds events with the time, arms
// one timer at NextDeadline() and carries out the actions it is given.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "base/base.h"

namespace vg::daemon {

// The host's policy (vgpud --sched), as production vGPU schedulers offer them:
// - off: no grants; every vGPU hands work to the engine when it has it (first come, first served).
// - best-effort: busy vGPUs share the engine by weight; what idle ones leave goes to busy ones.
// - equal-share: every running vGPU is entitled to 1/N of the engine (N: running vGPUs,
//   busy or not) and never gets more: an idle vGPU's share is kept for it, not given away.
// - fixed-share: every running vGPU gets a share set by its type (1 / the type's
//   max_instances), whatever else runs; never more.
// - partitioned: a fixed rotation of time slots, one per running vGPU (slice × weight / 100
//   long); a vGPU runs only in its own slot, used or not (see above). Not work-conserving;
//   timing-isolated.
// The shares of equal-share and fixed-share are caps the worker's GPU-time bucket enforces
// (the pool computes them); the grant order among busy vGPUs is by weight (equal-share:
// equal).
enum class SchedPolicy : uint8_t { kOff, kBestEffort, kEqualShare, kFixedShare, kPartitioned };
std::string_view SchedPolicyName(SchedPolicy p);
std::optional<SchedPolicy> ParseSchedPolicy(std::string_view s);  // "weighted": best-effort

struct SchedOptions {
  SchedPolicy policy = SchedPolicy::kBestEffort;
  bool enabled() const { return policy != SchedPolicy::kOff; }
  std::chrono::nanoseconds slice{std::chrono::milliseconds(2)};
  // A contended holder with nothing to run gives the grant back after this long.
  std::chrono::nanoseconds idle_grace{std::chrono::microseconds(200)};
  // Long: one workgroup (the piece no path can cut) may legally cost 2^28 units, many
  // seconds on a software device.
  std::chrono::nanoseconds yield_timeout{std::chrono::milliseconds(60000)};
  // vGPUs that may hold the engine at once (vgpud --sched-concurrency).
  uint32_t concurrency = 1;
  // partitioned: the holder's preempt comes this long before its slot ends (the release's
  // way back to the supervisor and the next grant's way out fit in it).
  std::chrono::nanoseconds partition_margin{std::chrono::microseconds(150)};
  bool partitioned() const { return policy == SchedPolicy::kPartitioned; }
};

struct SchedActions {
  // `contended`: another vGPU already waits (told with the grant, so no piece can slip past
  // before the holder knows).
  std::function<void(const Uuid&, uint64_t grant, bool contended)> grant;
  std::function<void(const Uuid&, uint64_t grant)> preempt;
  std::function<void(const Uuid&, std::string why)> kill;
  // Another vGPU began to wait while `grant` is held: keep one piece on the device, give the
  // grant back once idle. Once per grant (may be null).
  std::function<void(const Uuid&, uint64_t grant)> contended;
};

enum class SchedState : uint8_t { kIdle, kWaiting, kRunning };
std::string_view SchedStateName(SchedState s);

struct SchedEntryStatus {
  uint32_t weight = 0;
  SchedState state = SchedState::kIdle;
  uint64_t charged_ns = 0;     // time charged: held while another vGPU was busy (1/k of it beside k - 1 other holders)
  uint64_t used_ns = 0;        // device time reported, all of it
  uint64_t grants = 0;
  uint64_t preemptions = 0;
  uint64_t idle_releases = 0;  // grants given back unused-up because it had nothing to run
  uint64_t wait_ns = 0;        // time spent waiting for a grant
  double vruntime = 0;         // ns / weight, relative to the scheduler's floor
  uint64_t request_ns = 0;     // what its contended grants ask for (the order's credit is slice - this)
  // partitioned: its slot in the frame, and its grants' time past their slot's end (debt).
  uint64_t slot_ns = 0;
  uint64_t frame_ns = 0;
  uint64_t overruns = 0;
  uint64_t overrun_ns = 0;
};

class Scheduler {
 public:
  using Clock = std::chrono::steady_clock;
  Scheduler(SchedOptions o, SchedActions a) : o_(o), a_(std::move(a)) {}

  void Add(const Uuid& u, uint32_t weight, Clock::time_point now);
  void Remove(const Uuid& u, Clock::time_point now);
  // The worker serving `u` is gone and will be restarted: a grant it held ends (charged as
  // held, an overrun counted) and it waits no more, but the entry stays, with its place in
  // virtual time, its debt, its slot and its counters. Removing it instead let a tenant
  // shed the debt of an uncut long piece by crashing its own worker.
  void Detach(const Uuid& u, Clock::time_point now);
  void SetWeight(const Uuid& u, uint32_t weight);
  // The worker has work its engine holds back for want of a grant.
  void OnRequest(const Uuid& u, Clock::time_point now);
  // The worker gave its grant back: `used_ns` device time during it; `wants`: it still has
  // work held back (it waits again at once). A release of a grant it does not hold is
  // ignored (it crossed a preempt of an older grant, or the worker lies: harmless).
  // `idle_tail_ns`: an idle release's trailing idle time (the grace it waited out), not
  // charged: anticipation is the scheduler's choice, not the tenant's use; at most
  // `idle_grace` of it is forgiven, whatever the worker says.
  void OnRelease(const Uuid& u, uint64_t grant, uint64_t used_ns, bool wants, Clock::time_point now,
                 uint64_t idle_tail_ns = 0);
  void OnTimer(Clock::time_point now);
  std::optional<Clock::time_point> NextDeadline() const;
  // With one grant at a time: the holder `u`'s preempt once its time is fixed, whatever the
  // next events short of its own release (a vGPU waits that it has already passed in
  // the order, so only its minimum hold is left). The caller may tell the worker now,
  // with that time: the preempt then takes effect at the worker's first piece boundary
  // after it, not when the caller's timer fires (a loaded host's timers fire late, and a
  // piece admitted meanwhile is another piece the waiter waits for). The preempt action
  // still comes at that time, as for any holder.
  struct CommittedPreempt {
    uint64_t grant = 0;
    Clock::time_point at{};
    std::optional<Clock::time_point> window_start;  // partitioned: the slot's start
  };
  std::optional<CommittedPreempt> CommittedPreemptAt(const Uuid& u) const;

  std::optional<SchedEntryStatus> Status(const Uuid& u) const;
  std::vector<Uuid> holders() const;
  std::optional<Uuid> holder() const;  // the first holder, if any
  const SchedOptions& options() const { return o_; }

 private:
  struct Entry {
    uint32_t weight = 100;
    SchedState state = SchedState::kIdle;
    double vruntime = 0;
    uint64_t grant = 0;                  // the grant it holds (kRunning)
    Clock::time_point granted_at{};      // kRunning
    Clock::time_point waiting_since{};   // kWaiting
    bool preempted = false;              // kRunning: asked to yield
    bool told_contended = false;         // kRunning: told another waits
    Clock::time_point preempted_at{};
    // kRunning: when some vGPU began waiting during this grant (it is then told to keep one
    // piece on the device and to give the grant back once idle).
    std::optional<Clock::time_point> contended_since;
    double grant_charge_ns = 0;  // kRunning: charged during this grant so far
    // What its contended grants use, averaged (ns; negative: none seen yet, taken as a
    // slice). A preempted grant counts a slice: it wanted more.
    double request_ns = -1;
    // partitioned: the end of the slot it holds the grant in (kRunning), and until when it
    // is not granted for having run past a slot's end (debt).
    Clock::time_point slot_start{}, slot_end{};
    Clock::time_point barred_until{};
    SchedEntryStatus stats;
  };
  // partitioned: the frame (slots in UUID order), from the first Add on.
  struct Window {
    Clock::time_point start, end;  // a slot's occurrence
  };
  Clock::duration SlotLength(const Entry& e) const;
  Clock::duration FrameLength() const;
  // The occurrence of `e`'s slot that contains `t`, or its next one after `t`.
  Window SlotWindow(const Uuid& u, Clock::time_point t) const;
  // When `e` may next be granted, from `t` on (inside its slot, short of the margin, not
  // barred by debt), and the slot then.
  struct GrantTime {
    Clock::time_point at;
    Window slot;
  };
  GrantTime NextGrant(const Uuid& u, const Entry& e, Clock::time_point t) const;
  void DispatchPartitioned(Clock::time_point now);
  void PreemptPartitioned(Clock::time_point now);
  std::optional<Clock::time_point> epoch_;
  double Floor() const;  // the least virtual time of a busy vGPU (or the last one's)
  // Charges the holders for the time since the last event: 1/k each of k holders, while
  // any other vGPU is busy. Every event runs it first, so rates are constant in between.
  void Accrue(Clock::time_point now);
  bool Accruing() const;  // the holders are being charged now
  // A waiter may take a free grant: no holder is more than its lag behind it.
  bool Eligible(const Entry& w) const;
  double Lag(const Entry& e) const;  // a slice of e's device time, in virtual time
  // Virtual time per ns of wall time of a holder while Accruing().
  double Rate(const Entry& e) const;
  std::optional<Clock::time_point> EligibleAt(const Entry& w) const;  // a waiter that is not yet
  std::optional<Clock::time_point> LagPreemptAt(const Entry& h) const;  // a holder ahead of another
  void Wait(const Uuid& u, Entry& e, Clock::time_point now);
  void Dispatch(Clock::time_point now);
  // A grant's bookkeeping (the waiting `e` becomes the holder); the caller says whether it is
  // contended and sends it.
  void BeginGrant(Entry& e, Clock::time_point now);
  void Preempt(const Uuid& u, Entry& e, Clock::time_point now);  // ask the holder to yield
  void MaybePreempt(Clock::time_point now);
  void MaybeContend(Clock::time_point now);  // someone waits: tell the holders, once per grant
  void MarkContended(Clock::time_point now);  // someone waits: the holders' charged time starts
  std::optional<Clock::time_point> CrossAt(const Entry& h) const;
  // The order of the grant (one at a time): virtual time less the credit a vGPU earns by
  // asking for less than a slice per grant (Key), as EEVDF orders by virtual deadline.
  double RequestNs(const Entry& e) const;
  double Key(const Entry& e) const;
  double LeastWaiting() const;  // the least Key of a waiting vGPU (infinity: none)
  bool AsksShort(const Entry& e) const;  // its grants ask for half a slice or less
  bool ShortWaiter() const;              // a waiting vGPU AsksShort
  size_t Count(SchedState s) const;
  size_t Slots() const { return std::max<uint32_t>(1, o_.concurrency); }  // grants at once
  size_t FreeSlots() const;
  std::optional<Clock::time_point> PreemptAt(const Entry& h) const;

  SchedOptions o_;
  SchedActions a_;
  std::map<Uuid, Entry> entries_;
  uint64_t next_grant_ = 1;
  double floor_ = 0;  // monotonic
  std::optional<Clock::time_point> accrued_at_;
};

}  // namespace vg::daemon
