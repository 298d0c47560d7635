#include "tools/vgpud-worker/sched_gate.h"

#include <algorithm>
#include <cmath>

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
  if (at(ch::SchedConfigSlot::kCarried) == 1)
    c.carried = Carried{static_cast<double>(static_cast<int64_t>(at(ch::SchedConfigSlot::kCarriedRateMilliTokens))) / 1000.0,
                        static_cast<double>(static_cast<int64_t>(at(ch::SchedConfigSlot::kCarriedGpuTokensNs)))};
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
  const GateConfig was = cfg_;
  cfg_ = c;
  if (cfg_.rate_limit && !cfg_.rate_burst) cfg_.rate_burst = std::max<uint64_t>(1, cfg_.rate_limit / 10);
  if (cfg_.gpu_time_limit_ns && !cfg_.gpu_time_burst_ns)
    cfg_.gpu_time_burst_ns = std::max<uint64_t>(1'000'000, cfg_.gpu_time_limit_ns / 10);
  // A bucket starts full when its limit is set (or where a predecessor left it: never more
  // than full, nor further in debt than a minute of its rate), then keeps its level through
  // changes, never above its burst: a live change of the limit refills nothing.
  auto level = [](uint64_t limit, uint64_t was_limit, double burst, double tokens, std::optional<double> carried) {
    if (!limit) return 0.0;
    if (was_limit) return std::min(burst, tokens);
    if (carried) return std::clamp(*carried, -60.0 * static_cast<double>(limit), burst);
    return burst;
  };
  sub_tokens_ = level(cfg_.rate_limit, was.rate_limit, static_cast<double>(cfg_.rate_burst), sub_tokens_,
                      c.carried ? std::optional(c.carried->rate_tokens) : std::nullopt);
  gpu_tokens_ns_ = level(cfg_.gpu_time_limit_ns, was.gpu_time_limit_ns, static_cast<double>(cfg_.gpu_time_burst_ns),
                         gpu_tokens_ns_, c.carried ? std::optional(c.carried->gpu_tokens_ns) : std::nullopt);
  cfg_.carried.reset();
  CarryLocked(now, true);
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
  preempt_deadline_ = preempt_at;
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
    if (!preempt_deadline_ || *from < *preempt_deadline_) preempt_deadline_ = from;
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

void SchedGate::CarryLocked(Clock::time_point now, bool now_or_never) {
  // A record per 10 ms at most, unless a bucket fell by an eighth of its burst since the last
  // one: a crash then gains less than that and 10 ms of the rate, and a worker that dies right
  // after a long piece does not take the piece's debt with it. (A capped busy tenant goes a
  // little into debt at every piece: a record each would be thousands a second. Work on the
  // device when it dies is never charged here; the scheduler charges its grant as held.)
  if (!cfg_.rate_limit && !cfg_.gpu_time_limit_ns) return;
  const bool fell = carried_sub_ - sub_tokens_ >= static_cast<double>(cfg_.rate_burst) / 8 ||
                    carried_gpu_ns_ - gpu_tokens_ns_ >= static_cast<double>(cfg_.gpu_time_burst_ns) / 8;
  if (!now_or_never && !fell && now - carried_at_ < std::chrono::milliseconds(10)) return;
  carried_at_ = now;
  carried_sub_ = sub_tokens_;
  carried_gpu_ns_ = gpu_tokens_ns_;
  ch::Record r = ch::Make(ch::Kind::kCarry);
  r.values[static_cast<size_t>(ch::CarrySlot::kWhat)] = ch::kCarryBuckets;
  r.values[static_cast<size_t>(ch::CarrySlot::kRateMilliTokens)] =
      static_cast<uint64_t>(static_cast<int64_t>(std::llround(sub_tokens_ * 1000.0)));
  r.values[static_cast<size_t>(ch::CarrySlot::kGpuTokensNs)] =
      static_cast<uint64_t>(static_cast<int64_t>(std::llround(gpu_tokens_ns_)));
  send_(r);
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
  if (cfg_.scheduled && cfg_.fit_pieces && granted_ && !preempting_) {
    DecayEstimatesLocked(now);
    const Fit fit = FitsLocked(now, s.cost);
    overlong_on_device_ = fit == Fit::kOverlong;
    if (fit == Fit::kNo) {
      unfit_release_ = grant_ran_ == 0 && on_device_ == 0;
      HoldLocked(now);  // first: the release says the work is still held
      BeginPreemptLocked();
    }
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
  if (counts) {
    sub_tokens_ -= s.guest_submissions;  // a coalesced batch may go into debt
    CarryLocked(now, false);
  }
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

void SchedGate::DecayEstimatesLocked(Clock::time_point now) {
  // Besides 1/64 a piece, the estimates halve every kEstimateHalfLife of wall time: one slow
  // piece (a host stall, lavapipe compiling a pipeline) would otherwise price the vGPU's
  // next pieces out of its slots until 64 more had run, and out of a slot they do not run.
  if (estimates_at_ != Clock::time_point{} && now > estimates_at_) {
    const double f = std::exp2(-std::chrono::duration<double>(now - estimates_at_).count() /
                               std::chrono::duration<double>(kEstimateHalfLife).count());
    piece_max_ns_ = static_cast<uint64_t>(static_cast<double>(piece_max_ns_) * f);
    ns_per_cost_ *= f;
    slope_ *= f;  // (not the dearest cost: a tenant back from idle is no dearer than before)
  }
  estimates_at_ = now;
}

SchedGate::Fit SchedGate::FitsLocked(Clock::time_point now, uint64_t next_cost) const {
  if (!preempt_from_) return Fit::kYes;
  // The next piece's time, at most. No dearer than the dearest piece seen lately: a piece's
  // fixed cost plus its cost at the slowest rate per unit over that (fixed cost: the least
  // time of a piece), and never more than the longest piece seen lately. Dearer than all of
  // them: its cost at the slowest rate per unit of whole pieces, which a small piece's fixed
  // cost makes high: a guest that ran small pieces and then a big one would otherwise have it
  // estimated at its small ones' length, and overrun its slot on purpose by the difference.
  const double cost = static_cast<double>(next_cost);
  const auto est = std::chrono::nanoseconds(static_cast<uint64_t>(std::min(
      1e18, next_cost <= cost_max_
                ? std::min(static_cast<double>(piece_max_ns_), static_cast<double>(fixed_ns_) + slope_ * cost)
                : ns_per_cost_ * cost)));
  if (now + est <= *preempt_from_) return Fit::kYes;
  // It would not fit. Only a grant's first piece may still go:
  if (grant_ran_ != 0 || on_device_ != 0) return Fit::kNo;
  const auto window = *preempt_from_ - window_start_;
  // - longer than the whole window, so no slot would ever fit it: it runs past its slot
  //   whenever it runs, into the next owner's, which is what a sender that overruns on
  //   purpose wants. It goes at the start of a grant early in its slot (or after one given
  //   back with nothing run), and, once such a piece has run past its grant's preempt time,
  //   not again for kOverlongInterval; the overrun is charged as debt by the scheduler.
  //   (An estimate that was only pessimistic costs nothing more than a grant per piece.)
  const bool early = granted_at_ - window_start_ <= window / 4;
  if (est > window)
    return (early || unfit_release_) && now - last_overrun_ >= kOverlongInterval ? Fit::kOverlong : Fit::kNo;
  // - it needs most of a slot: it goes if the grant came in the first quarter of its window,
  //   or if the last grant was given back without running anything (its grants come late: a
  //   loaded host), so every vGPU makes progress.
  return early || unfit_release_ ? Fit::kYes : Fit::kNo;
}

void SchedGate::Ran(uint64_t busy_ns, bool, uint64_t cost) {
  std::lock_guard lk(mu_);
  // The fit rule's estimates decay slowly (1/64 a piece): a guest's work mixes kernels of
  // very different lengths, and a fast decay forgot the long one between its turns (a
  // tenant cycling through the catalogue overran one grant in six).
  // One piece raises them at most fourfold: a single outlier (a host stall, a pipeline
  // compiled at first use: 10-60 ms where 1 ms was usual) otherwise priced every next
  // piece out of the slot for the better part of a second (sched_share's tenant lost two
  // thirds of its share); a piece that is long every time still gets there in a few.
  DecayEstimatesLocked(Clock::now());
  auto raise = [](double old, double sample) { return old > 0 ? std::min(sample, 4 * old) : sample; };
  piece_max_ns_ = std::max(static_cast<uint64_t>(raise(static_cast<double>(piece_max_ns_), static_cast<double>(busy_ns))),
                           piece_max_ns_ - piece_max_ns_ / 64);
  cost_max_ = std::max(cost, cost_max_ - cost_max_ / 64);
  // A piece's fixed cost (submission, fence, lavapipe's dispatch): the least time of one,
  // drifting up by 1/64 a piece; the rate per unit is what is left over it. (Rates taken
  // from whole times made small pieces' overhead the rate of big ones: a 1.8 M-unit piece of
  // 4 ms estimated at 11.)
  fixed_ns_ = fixed_ns_ == 0 ? busy_ns : std::min(busy_ns, fixed_ns_ + fixed_ns_ / 64 + 1);
  // A piece let on as longer than its whole window that then ran past the grant's preempt
  // time: the next such piece waits kOverlongInterval. (A piece estimated to fit that ran
  // long, a host stall or a pipeline compiled at first use, does not count: honest tenants
  // meet those, and the estimate learns from them anyway.)
  if (overlong_on_device_ && preempt_deadline_ && Clock::now() > *preempt_deadline_) last_overrun_ = Clock::now();
  overlong_on_device_ = false;
  if (cost > 0) {
    const double whole = static_cast<double>(busy_ns) / static_cast<double>(cost);
    const double over = static_cast<double>(busy_ns - std::min(busy_ns, fixed_ns_)) / static_cast<double>(cost);
    ns_per_cost_ = std::max(raise(ns_per_cost_, whole), ns_per_cost_ - ns_per_cost_ / 64);
    slope_ = std::max(raise(slope_, over), slope_ - slope_ / 64);
  }
  on_device_cost_ -= std::min(on_device_cost_, cost);
  stats_.gpu_time_ns += busy_ns;
  grant_used_ns_ += busy_ns;
  ++grant_ran_;
  if (cfg_.gpu_time_limit_ns) {
    RefillLocked(Clock::now());
    gpu_tokens_ns_ -= static_cast<double>(busy_ns);  // debt: the next work waits it off
    CarryLocked(Clock::now(), false);
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
  preempt_deadline_.reset();
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
