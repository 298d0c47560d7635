#include "tools/vgpud-worker/sched_gate.h"

#include <algorithm>

#include "mediator/work_split.h"

namespace vg::worker {

namespace ch = daemon::channel;

namespace {
uint64_t Ns(std::chrono::steady_clock::duration d) {
  return static_cast<uint64_t>(std::max<int64_t>(0, std::chrono::duration_cast<std::chrono::nanoseconds>(d).count()));
}
}  // namespace

GateConfig GateConfig::FromRecord(const ch::Record& r) {
  auto at = [&](ch::SchedConfigSlot s) { return r.values[static_cast<size_t>(s)]; };
  GateConfig c;
  c.scheduled = at(ch::SchedConfigSlot::kScheduled) != 0;
  c.rate_limit = at(ch::SchedConfigSlot::kRateLimit);
  c.rate_burst = at(ch::SchedConfigSlot::kRateBurst);
  c.gpu_time_limit_ns = at(ch::SchedConfigSlot::kGpuTimeLimitNs);
  c.gpu_time_burst_ns = at(ch::SchedConfigSlot::kGpuTimeBurstNs);
  c.idle_grace_ns = std::min<uint64_t>(at(ch::SchedConfigSlot::kIdleGraceNs), 100'000'000);
  c.slice_ns = std::min<uint64_t>(at(ch::SchedConfigSlot::kSliceNs), 1'000'000'000);
  c.fit_pieces = at(ch::SchedConfigSlot::kFitPieces) != 0;
  return c;
}

SchedGate::SchedGate(Send send) : send_(std::move(send)) {}

SchedGate::~SchedGate() { Stop(); }

void SchedGate::Start(engine::Engine* engine) {
  engine_ = engine;
  // An uncontended holder's pipeline on the device: about two pieces.
  uncontended_on_device_cost_ = 2 * mediator::SubmissionBudget(true, engine->Info().parallel_groups);
  thread_ = std::thread([this] { PumpLoop(); });
}

void SchedGate::Stop() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void SchedGate::Configure(const GateConfig& c) {
  std::lock_guard lk(mu_);
  const Clock::time_point now = Clock::now();
  RefillLocked(now);
  const bool was_scheduled = cfg_.scheduled;
  cfg_ = c;
  if (cfg_.rate_limit && !cfg_.rate_burst) cfg_.rate_burst = std::max<uint64_t>(1, cfg_.rate_limit / 10);
  if (cfg_.gpu_time_limit_ns && !cfg_.gpu_time_burst_ns)
    cfg_.gpu_time_burst_ns = std::max<uint64_t>(1'000'000, cfg_.gpu_time_limit_ns / 10);
  // A bucket starts full and never holds more than its burst.
  sub_tokens_ = cfg_.rate_limit ? std::min<double>(cfg_.rate_burst, sub_tokens_ == 0 ? cfg_.rate_burst : sub_tokens_) : 0;
  gpu_tokens_ns_ = cfg_.gpu_time_limit_ns
                       ? std::min<double>(cfg_.gpu_time_burst_ns, gpu_tokens_ns_ == 0 ? cfg_.gpu_time_burst_ns : gpu_tokens_ns_)
                       : 0;
  if (cfg_.scheduled && !was_scheduled) {
    granted_ = false;
    requested_ = false;
    preempting_ = false;
  }
  PublishLocked();
  WakePumpLocked(std::nullopt);  // limits may have been lifted
}

void SchedGate::OnGrant(uint64_t grant, bool contended, std::optional<Clock::time_point> preempt_at,
                        std::optional<Clock::time_point> window_start) {
  std::lock_guard lk(mu_);
  if (!cfg_.scheduled || revoked_) return;
  granted_ = true;
  grant_ = grant;
  requested_ = false;
  preempting_ = false;
  preempt_from_ = preempt_at;  // due now if already past: Admit and the pump look first
  contended_since_.reset();
  granted_at_ = Clock::now();
  window_start_ = std::min(window_start.value_or(granted_at_), granted_at_);
  if (contended) contended_since_ = granted_at_;
  idle_since_.reset();
  grant_used_ns_ = 0;
  grant_ran_ = 0;
  ++stats_.grants;
  WakePumpLocked(std::nullopt);
  MaybeIdleReleaseLocked();  // what it asked for may be gone (cancelled)
}

void SchedGate::OnPreempt(uint64_t grant, std::optional<Clock::time_point> from) {
  std::lock_guard lk(mu_);
  if (!cfg_.scheduled || !granted_ || grant != grant_ || preempting_) return;
  if (from && *from > Clock::now()) {
    if (!preempt_from_ || *from < *preempt_from_) preempt_from_ = from;
    return WakePumpLocked(*preempt_from_);  // if nothing of it completes by then
  }
  BeginPreemptLocked();
}

void SchedGate::BeginPreemptLocked() {
  ++stats_.preempts;
  preempting_ = true;  // nothing more goes to the device under this grant
  preempt_from_.reset();
  if (on_device_ == 0) ReleaseLocked();
}

void SchedGate::PreemptIfDueLocked(Clock::time_point now) {
  if (preempt_from_ && granted_ && !preempting_ && now >= *preempt_from_) BeginPreemptLocked();
}

void SchedGate::SetBacklogProbe(std::function<bool()> probe) {
  std::lock_guard lk(mu_);
  backlog_ = std::move(probe);
}

void SchedGate::OnContended(uint64_t grant) {
  std::lock_guard lk(mu_);
  if (!cfg_.scheduled || !granted_ || grant != grant_ || preempting_) return;
  if (!contended_since_) contended_since_ = Clock::now();
  MaybeIdleReleaseLocked();
}

void SchedGate::MaybeIdleReleaseLocked() {
  if (!cfg_.scheduled || !granted_ || !contended_since_ || preempting_ || on_device_ != 0 || WantsDeviceLocked()) {
    idle_since_.reset();
    return;
  }
  const Clock::time_point now = Clock::now();
  // A holder that has left the device idle more than a third of the time since another
  // vGPU began to wait (a closed-loop guest of small work: its own turnaround between
  // submissions is shorter than the grace, so it would otherwise keep the grant through
  // every gap for a whole slice while the device idles and the others wait) gives it back
  // as soon as nothing of its is on the device, without a grace: the grant goes where the
  // device will be used, and it is charged the little it held, so it is served again first.
  // (A third, not a half: a closed-loop copy of 4 KiB keeps lavapipe busy 40-50 % of its
  // round trip, so at a half it kept the grant on some turns, ran to the slice, and then
  // waited out a busy tenant's whole slice; a backlogged tenant's pieces keep the device
  // busy over 90 % of its grant.)
  std::optional<Clock::time_point> sparse_at;
  if (grant_ran_ > 0) {
    sparse_at = *contended_since_ + std::chrono::nanoseconds(grant_used_ns_ * 3 / 2);
    if (now > *sparse_at) {
      ++stats_.idle_releases;
      return ReleaseLocked();
    }
  }
  // Not sparse yet: look again when it would be (if nothing of its reached the device by
  // then), rather than a whole grace later: a light tenant's grant then lasts about 1.5
  // times its work, which is what it is charged, not its work and a grace.
  auto look_again = [&](Clock::time_point at) { WakePumpLocked(sparse_at ? std::min(at, *sparse_at) : at); };
  if (backlog_ && backlog_()) {
    // Work on its way to the engine (no event tells when it drains without reaching the
    // engine: look again after a grace). Not idle.
    idle_since_.reset();
    return look_again(now + std::chrono::nanoseconds(std::max<uint64_t>(cfg_.idle_grace_ns, 50'000)));
  }
  if (!idle_since_) idle_since_ = now;
  const Clock::time_point due = *idle_since_ + std::chrono::nanoseconds(cfg_.idle_grace_ns);
  if (now < due) return look_again(due);  // the pump thread looks again then
  ++stats_.idle_releases;
  ReleaseLocked();
}

void SchedGate::Revoke() {
  std::lock_guard lk(mu_);
  revoked_ = true;
  granted_ = false;
  preempting_ = false;
  contended_since_.reset();
  idle_since_.reset();
  requested_ = true;  // asks no more: nobody would answer
}

void SchedGate::OpenForExit() {
  std::lock_guard lk(mu_);
  cfg_.scheduled = false;
  cfg_.rate_limit = 0;
  cfg_.gpu_time_limit_ns = 0;
  preempting_ = false;
  PublishLocked();
  WakePumpLocked(std::nullopt);
}

GateStats SchedGate::Stats() const {
  std::lock_guard lk(mu_);
  GateStats s = stats_;
  s.holding = cfg_.scheduled && granted_;
  if (held_since_) s.queue_wait_ns += Ns(Clock::now() - *held_since_);
  return s;
}

void SchedGate::RefillLocked(Clock::time_point now) {
  if (refilled_at_ != Clock::time_point{}) {
    const double secs = std::chrono::duration<double>(now - refilled_at_).count();
    if (cfg_.rate_limit)
      sub_tokens_ = std::min<double>(cfg_.rate_burst, sub_tokens_ + secs * static_cast<double>(cfg_.rate_limit));
    if (cfg_.gpu_time_limit_ns)
      gpu_tokens_ns_ = std::min<double>(cfg_.gpu_time_burst_ns,
                                        gpu_tokens_ns_ + secs * static_cast<double>(cfg_.gpu_time_limit_ns));
  }
  refilled_at_ = now;
}

void SchedGate::HoldLocked(Clock::time_point now) {
  if (!held_since_) held_since_ = now;
}

bool SchedGate::Admit(const engine::Submission& s) {
  std::lock_guard lk(mu_);
  const Clock::time_point now = Clock::now();
  RefillLocked(now);
  // Rate limits first: work a bucket holds back does not want the engine yet, so it neither
  // asks for a grant nor keeps one another vGPU waits for.
  const bool counts = cfg_.rate_limit && s.guest_submissions > 0;
  std::optional<Clock::duration> refill_in;
  if (counts && sub_tokens_ < 1.0)
    refill_in = std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>((1.0 - sub_tokens_) / static_cast<double>(cfg_.rate_limit)));
  else if (cfg_.gpu_time_limit_ns && gpu_tokens_ns_ <= 0)
    refill_in = std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>((1.0 - gpu_tokens_ns_) / static_cast<double>(cfg_.gpu_time_limit_ns)));
  if (refill_in) {
    if (!rate_held_) {
      rate_held_ = true;
      ++stats_.rate_limited;
    }
    HoldLocked(now);
    WakePumpLocked(now + *refill_in + std::chrono::microseconds(10));
    MaybeIdleReleaseLocked();
    return false;
  }
  rate_held_ = false;
  PreemptIfDueLocked(now);
  // Partitioned: a piece that would run past the grant's preempt time ends the grant here
  // (the work stays held and asks again; the supervisor grants it in its next slot).
  if (cfg_.scheduled && cfg_.fit_pieces && granted_ && !preempting_ && !FitsLocked(now, s.cost)) {
    unfit_release_ = grant_ran_ == 0 && on_device_ == 0;
    HoldLocked(now);  // first: the release says the work is still held
    BeginPreemptLocked();
  }
  // A GPU-time limit charges a piece after it ran: one piece on the device at a time, so
  // the bucket's debt is at most one piece (Ran wakes the pump for the next).
  if (cfg_.gpu_time_limit_ns && on_device_ > 0) {
    HoldLocked(now);
    return false;
  }
  // Contended: one piece on the device at a time (the next goes when it completes: Ran
  // wakes the pump).
  if (cfg_.scheduled && (!granted_ || preempting_ || (contended_since_ && on_device_ > 0))) {
    if (!granted_ && !requested_) {
      requested_ = true;
      send_(ch::Make(ch::Kind::kSchedRequest));
    }
    HoldLocked(now);
    return false;
  }
  // Uncontended: a pipeline of about two pieces on the device (it hides the gap between
  // one piece and the next), not the executor's whole in-flight budget: what is on the
  // device when another vGPU starts to wait is that vGPU's wait.
  // Two pieces are always let on (a piece dearer than the budget, workgroups that cannot
  // be cut, would otherwise run with a gap after each); more only while cheap.
  // While the grant is younger than a slice, one piece's worth only: a grant that follows
  // another vGPU's release often meets that vGPU again within it (a closed-loop or thinking
  // tenant comes back a few hundred microseconds later, owed the engine), and what it then
  // finds on the device is its wait: one piece, not two. Cheap work still pipelines up to a
  // piece's cost; dear pieces go one at a time, with a gap after each, for the grant's first
  // slice only.
  const bool young = cfg_.slice_ns && now - granted_at_ < std::chrono::nanoseconds(cfg_.slice_ns);
  const uint32_t pieces = young ? 1 : 2;
  const uint64_t cost_bound = young ? uncontended_on_device_cost_ / 2 : uncontended_on_device_cost_;
  if (cfg_.scheduled && on_device_ >= pieces && on_device_cost_ + s.cost > cost_bound) {
    HoldLocked(now);
    return false;
  }
  if (counts) sub_tokens_ -= s.guest_submissions;  // a coalesced batch may go into debt
  idle_since_.reset();
  rate_held_ = false;
  if (held_since_) {
    stats_.queue_wait_ns += Ns(now - *held_since_);
    held_since_.reset();
  }
  ++on_device_;
  on_device_cost_ += s.cost;
  unfit_release_ = false;
  return true;
}

bool SchedGate::FitsLocked(Clock::time_point now, uint64_t next_cost) const {
  if (!preempt_from_) return true;
  // The next piece's time, at most: its cost at the slowest rate per unit seen lately; for
  // a piece no dearer than the dearest seen lately, never more than the longest piece seen
  // lately (a small piece's fixed overhead makes its rate per unit high, which would
  // otherwise price every big piece out of every slot). A piece dearer than any lately gets
  // no such cap: a guest that ran small pieces and then one big one would otherwise have it
  // estimated at its small ones' length, and overrun its slot on purpose by the difference.
  const double by_rate = std::min(1e18, ns_per_cost_ * static_cast<double>(next_cost));
  const auto est = std::chrono::nanoseconds(
      next_cost <= cost_max_ ? std::min<uint64_t>(piece_max_ns_, static_cast<uint64_t>(by_rate))
                             : static_cast<uint64_t>(by_rate));
  if (now + est <= *preempt_from_) return true;
  // It would not fit. The first piece of a grant still goes if the grant came in the first
  // quarter of its window (a piece that needs most of a slot, or more than a whole one: the
  // overrun is charged as debt by the scheduler), or if the last grant was given back
  // without running anything (its grants come late: a loaded host), so every vGPU makes
  // progress. Elsewhere it waits for such a grant.
  if (grant_ran_ != 0 || on_device_ != 0) return false;
  const auto window = *preempt_from_ - window_start_;
  return granted_at_ - window_start_ <= window / 4 || unfit_release_;
}

void SchedGate::Ran(uint64_t busy_ns, bool, uint64_t cost) {
  std::lock_guard lk(mu_);
  // The fit rule's estimates decay slowly (1/64 a piece): a guest's work mixes kernels of
  // very different lengths, and a fast decay forgot the long one between its turns (a
  // tenant cycling through the catalogue overran one grant in six).
  piece_max_ns_ = std::max(busy_ns, piece_max_ns_ - piece_max_ns_ / 64);
  cost_max_ = std::max(cost, cost_max_ - cost_max_ / 64);
  if (cost > 0) {
    const double per_unit = static_cast<double>(busy_ns) / static_cast<double>(cost);
    ns_per_cost_ = std::max(per_unit, ns_per_cost_ - ns_per_cost_ / 64);
  }
  on_device_cost_ -= std::min(on_device_cost_, cost);
  stats_.gpu_time_ns += busy_ns;
  grant_used_ns_ += busy_ns;
  ++grant_ran_;
  if (cfg_.gpu_time_limit_ns) {
    RefillLocked(Clock::now());
    gpu_tokens_ns_ -= static_cast<double>(busy_ns);  // debt: the next work waits it off
  }
  if (on_device_) --on_device_;
  PreemptIfDueLocked(Clock::now());  // releases here if this was the last piece on the device
  if (held_since_ && !preempting_) WakePumpLocked(std::nullopt);  // the next piece (room on the device)
  if (!cfg_.scheduled || !granted_) return;
  if (preempting_) {
    if (on_device_ == 0) ReleaseLocked();
    return;
  }
  if (contended_since_ && on_device_ == 0) {
    if (WantsDeviceLocked())
      WakePumpLocked(std::nullopt);  // the next piece, held while this one ran
    else
      MaybeIdleReleaseLocked();
  }
}

void SchedGate::ReleaseLocked() {
  ch::Record r = ch::Make(ch::Kind::kSchedRelease, grant_);
  r.values[static_cast<size_t>(ch::SchedReleaseSlot::kUsedNs)] = grant_used_ns_;
  r.values[static_cast<size_t>(ch::SchedReleaseSlot::kWants)] = WantsDeviceLocked() ? 1 : 0;
  if (idle_since_) r.values[static_cast<size_t>(ch::SchedReleaseSlot::kIdleTailNs)] = Ns(Clock::now() - *idle_since_);
  granted_ = false;
  preempting_ = false;
  preempt_from_.reset();
  contended_since_.reset();
  idle_since_.reset();
  grant_used_ns_ = 0;
  grant_ran_ = 0;
  // Work still held (not by a bucket): the release is its request.
  requested_ = WantsDeviceLocked();
  send_(r);
}

void SchedGate::PublishLocked() {
  // Scheduled: another vGPU may start to wait at any moment, and what is on the device then
  // is its wait (an uncontended holder's pipeline included: see Admit). It follows
  // cfg_.scheduled alone, so Configure and OpenForExit are its only callers.
  small_submissions_.store(cfg_.scheduled, std::memory_order_relaxed);
}

bool SchedGate::PrefersSmallSubmissions() const { return small_submissions_.load(std::memory_order_relaxed); }

void SchedGate::WakePumpLocked(std::optional<Clock::time_point> at) {
  if (!at) {
    pump_now_ = true;
  } else if (!pump_at_ || *at < *pump_at_) {
    pump_at_ = at;
  }
  cv_.notify_one();
}

void SchedGate::PumpLoop() {
  std::unique_lock lk(mu_);
  for (;;) {
    if (stop_) return;
    // Re-read each turn: a nearer refill time may have been set while waiting.
    if (!pump_now_ && !(pump_at_ && Clock::now() >= *pump_at_)) {
      if (pump_at_)
        cv_.wait_until(lk, *pump_at_);
      else
        cv_.wait(lk);
      continue;
    }
    pump_now_ = false;
    pump_at_.reset();
    PreemptIfDueLocked(Clock::now());  // a preempt sent ahead, its time come with nothing completing
    MaybeIdleReleaseLocked();  // an idle grace may have run out, a backlog drained
    lk.unlock();
    engine_->Pump();  // takes the engine's queue lock, then ours (Admit): never with ours held
    lk.lock();
  }
}

}  // namespace vg::worker
