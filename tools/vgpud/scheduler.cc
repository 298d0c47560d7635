#include "tools/vgpud/scheduler.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace vg::daemon {

namespace {
// Virtual time is device time scaled to weight 100 (a vGPU of weight 200 advances half as fast).
constexpr double kWeightScale = 100.0;
uint64_t Ns(std::chrono::steady_clock::duration d) {
  return static_cast<uint64_t>(std::max<int64_t>(0, std::chrono::duration_cast<std::chrono::nanoseconds>(d).count()));
}
}  // namespace

std::string_view SchedStateName(SchedState s) {
  switch (s) {
    case SchedState::kIdle: return "idle";
    case SchedState::kWaiting: return "waiting";
    case SchedState::kRunning: return "running";
  }
  return "?";
}

std::string_view SchedPolicyName(SchedPolicy p) {
  switch (p) {
    case SchedPolicy::kOff: return "off";
    case SchedPolicy::kBestEffort: return "best-effort";
    case SchedPolicy::kEqualShare: return "equal-share";
    case SchedPolicy::kFixedShare: return "fixed-share";
    case SchedPolicy::kPartitioned: return "partitioned";
  }
  return "?";
}

std::optional<SchedPolicy> ParseSchedPolicy(std::string_view s) {
  if (s == "off") return SchedPolicy::kOff;
  if (s == "best-effort" || s == "weighted") return SchedPolicy::kBestEffort;
  if (s == "equal-share") return SchedPolicy::kEqualShare;
  if (s == "fixed-share") return SchedPolicy::kFixedShare;
  if (s == "partitioned") return SchedPolicy::kPartitioned;
  return std::nullopt;
}

void Scheduler::Add(const Uuid& u, uint32_t weight, Clock::time_point now) {
  if (!epoch_) epoch_ = now;  // the frame's first slot starts here
  Entry e;
  e.weight = std::max<uint32_t>(1, weight);
  e.vruntime = Floor();
  entries_[u] = e;
}

void Scheduler::Remove(const Uuid& u, Clock::time_point now) {
  auto it = entries_.find(u);
  if (it == entries_.end()) return;
  Accrue(now);
  const bool held = it->second.state == SchedState::kRunning;
  entries_.erase(it);
  if (held) Dispatch(now);
}

void Scheduler::Detach(const Uuid& u, Clock::time_point now) {
  auto it = entries_.find(u);
  if (it == entries_.end()) return;
  Entry& e = it->second;
  if (e.state == SchedState::kWaiting) e.state = SchedState::kIdle;
  if (e.state != SchedState::kRunning) return;
  // Its device time during the grant died with it: charged by the time held, as any grant.
  // Ended by the supervisor, not given back idle (counted as neither).
  e.preempted = true;
  OnRelease(u, e.grant, 0, /*wants=*/false, now);
}

void Scheduler::SetWeight(const Uuid& u, uint32_t weight) {
  if (auto it = entries_.find(u); it != entries_.end()) it->second.weight = std::max<uint32_t>(1, weight);
}

double Scheduler::Floor() const {
  double least = std::numeric_limits<double>::infinity();
  for (const auto& [u, e] : entries_)
    if (e.state != SchedState::kIdle) least = std::min(least, e.vruntime);
  // Monotonic: a vGPU that comes back from idle is placed no earlier than where the busy
  // ones were when it left, so idle time is never banked as credit.
  return std::isinf(least) ? floor_ : std::max(floor_, least);
}

bool Scheduler::Accruing() const {
  const size_t running = Count(SchedState::kRunning);
  return running > 0 && running + Count(SchedState::kWaiting) > 1;
}

double Scheduler::Rate(const Entry& e) const {
  const double k = static_cast<double>(std::max<size_t>(1, Count(SchedState::kRunning)));
  return kWeightScale / e.weight / k;
}

void Scheduler::Accrue(Clock::time_point now) {
  if (accrued_at_ && now > *accrued_at_ && Count(SchedState::kRunning) > 0) {
    const bool charged = Accruing();
    const double k = static_cast<double>(Count(SchedState::kRunning));
    const double each = static_cast<double>(Ns(now - *accrued_at_)) / k;
    for (auto& [u, e] : entries_) {
      if (e.state != SchedState::kRunning) continue;
      // Virtual time moves with the engine even for a holder alone, as a CPU scheduler's
      // clock does: otherwise the floor stood still while a busy vGPU ran alone, and a
      // tenant back from a moment's idleness (one that thinks between submissions, or a
      // closed-loop one between its fence and its next doorbell) found itself level with or
      // ahead of the holder, owed nothing, and waited out a whole slice on every return.
      // Only time held while someone else was busy is charged (stats, idle-grace
      // forgiveness): using an idle engine costs a tenant nothing later, since a vGPU back
      // from idle is placed at most half a slice behind the floor (Wait).
      e.vruntime += each * kWeightScale / e.weight;
      if (charged) e.grant_charge_ns += each;
    }
  }
  if (!accrued_at_ || now > *accrued_at_) accrued_at_ = now;
}

double Scheduler::Lag(const Entry& e) const {
  return static_cast<double>(o_.slice.count()) * kWeightScale / e.weight;
}

bool Scheduler::Eligible(const Entry& w) const {
  for (const auto& [u, h] : entries_)
    if (h.state == SchedState::kRunning && w.vruntime > h.vruntime + Lag(w)) return false;
  return true;
}

namespace {
// A deadline `v` of virtual time away at `rate` per ns, a microsecond late so that the timer
// finds the crossing made rather than a rounding short of it.
Scheduler::Clock::time_point After(Scheduler::Clock::time_point from, double v, double rate) {
  const double ns = std::max(0.0, v) / rate;
  return from + std::chrono::duration_cast<Scheduler::Clock::duration>(std::chrono::duration<double, std::nano>(ns)) +
         std::chrono::microseconds(1);
}
}  // namespace

std::optional<Scheduler::Clock::time_point> Scheduler::EligibleAt(const Entry& w) const {
  if (!accrued_at_ || !Accruing()) return std::nullopt;
  std::optional<Clock::time_point> at;
  // Eligible once every holder it is too far ahead of has caught up (holders accrue while
  // it waits).
  for (const auto& [u, h] : entries_) {
    if (h.state != SchedState::kRunning || w.vruntime <= h.vruntime + Lag(w)) continue;
    const auto t = After(*accrued_at_, w.vruntime - Lag(w) - h.vruntime, Rate(h));
    if (!at || t > *at) at = t;
  }
  return at;
}

std::optional<Scheduler::Clock::time_point> Scheduler::LagPreemptAt(const Entry& h) const {
  if (h.state != SchedState::kRunning || h.preempted || !accrued_at_ || !Accruing()) return std::nullopt;
  std::optional<Clock::time_point> at;
  for (const auto& [u, o] : entries_) {
    if (&o == &h || o.state != SchedState::kRunning) continue;
    const double gap = Lag(h) - (h.vruntime - o.vruntime);  // virtual time left before it is too far ahead
    std::optional<Clock::time_point> t;
    if (gap < 0) {
      t = *accrued_at_;
    } else if (Rate(h) > Rate(o)) {
      t = After(*accrued_at_, gap, Rate(h) - Rate(o));
    }
    if (t && (!at || *t < *at)) at = t;
  }
  if (!at) return std::nullopt;
  return std::max(h.granted_at + o_.slice, *at);
}

size_t Scheduler::FreeSlots() const {
  const size_t running = Count(SchedState::kRunning);
  return Slots() > running ? Slots() - running : 0;
}

size_t Scheduler::Count(SchedState s) const {
  return static_cast<size_t>(
      std::count_if(entries_.begin(), entries_.end(), [s](const auto& kv) { return kv.second.state == s; }));
}

std::vector<Uuid> Scheduler::holders() const {
  std::vector<Uuid> out;
  for (const auto& [u, e] : entries_)
    if (e.state == SchedState::kRunning) out.push_back(u);
  return out;
}

std::optional<Uuid> Scheduler::holder() const {
  for (const auto& [u, e] : entries_)
    if (e.state == SchedState::kRunning) return u;
  return std::nullopt;
}

void Scheduler::Wait(const Uuid&, Entry& e, Clock::time_point now) {
  // Back from idle: placed half a slice before the busy ones (a lag bound, as CFS places a
  // waking task), so a tenant that submits a little now and then is next rather than behind
  // a round of busy ones; it can never be more than that ahead, so its long-run share is
  // what its weight says, and what it runs is charged like anyone's.
  const double credit = static_cast<double>(o_.slice.count()) / 2 * kWeightScale / e.weight;
  e.vruntime = std::max(e.vruntime, Floor() - credit);
  e.state = SchedState::kWaiting;
  e.waiting_since = now;
}

void Scheduler::OnRequest(const Uuid& u, Clock::time_point now) {
  auto it = entries_.find(u);
  if (it == entries_.end() || it->second.state != SchedState::kIdle) return;
  Accrue(now);
  Wait(u, it->second, now);
  Dispatch(now);  // a free grant: it runs at once, and may find others waiting
  if (it->second.state != SchedState::kWaiting) return;
  // Every grant held: the holders are contended. (A free grant it may not take yet, being
  // too far ahead of the holders, contends nobody: they are catching up.)
  if (FreeSlots() == 0) {
    MarkContended(now);
    MaybeContend(now);
  }
  MaybePreempt(now);
}

void Scheduler::MarkContended(Clock::time_point now) {
  for (auto& [u, e] : entries_)
    if (e.state == SchedState::kRunning && !e.contended_since) e.contended_since = now;
}

void Scheduler::MaybeContend(Clock::time_point) {
  if (Count(SchedState::kWaiting) == 0) return;
  for (auto& [u, e] : entries_) {
    if (e.state != SchedState::kRunning || !e.contended_since || e.told_contended) continue;
    e.told_contended = true;
    if (a_.contended) a_.contended(u, e.grant);
  }
}

void Scheduler::OnRelease(const Uuid& u, uint64_t grant, uint64_t used_ns, bool wants, Clock::time_point now,
                          uint64_t idle_tail_ns) {
  auto it = entries_.find(u);
  if (it == entries_.end() || it->second.state != SchedState::kRunning || it->second.grant != grant) return;
  Accrue(now);
  Entry& e = it->second;
  if (!e.preempted) e.stats.idle_releases++;
  // Charged (Accrue): the time it held the engine while someone else was busy, device time
  // or not (a holder that keeps the grant through a gap in its work keeps the others out
  // just the same), its 1/k of it beside k - 1 other holders. Before anyone else was busy
  // the engine would have idled (work-conserving), and nobody was owed it.
  double charge = e.grant_charge_ns;
  // Except the idle grace it waited out before an idle release: the others were kept out
  // by the scheduler's anticipation, not by the tenant's work. Charging it made a tenant
  // that submits a little now and then pay a grace per submission, as much as a busy one.
  if (!wants) {
    const double k = static_cast<double>(std::max<size_t>(1, Count(SchedState::kRunning)));
    const double forgiven =
        std::min(charge, static_cast<double>(std::min<uint64_t>(idle_tail_ns, Ns(o_.idle_grace))) / k);
    charge -= forgiven;
    e.vruntime -= forgiven * kWeightScale / e.weight;
  }
  // What this grant asked for, when someone else waited for it (uncontended, a grant says
  // nothing about what it keeps others from): a preempted one wanted more than a slice.
  if (e.contended_since) {
    const double sample = e.preempted ? static_cast<double>(o_.slice.count()) : charge;
    e.request_ns = e.request_ns < 0 ? sample : e.request_ns + (sample - e.request_ns) / 4;
  }
  // Partitioned: a holder that gives the grant back with work still held does so because its
  // next piece does not fit before its slot ends (GateConfig::fit_pieces): not again in this
  // slot (else it is granted and gives it back again until the margin).
  if (o_.partitioned() && wants && !e.preempted) e.barred_until = std::max(e.barred_until, e.slot_end);
  if (o_.partitioned() && now > e.slot_end) {
    // Ran past its slot (a piece longer than its recent ones, or a late release): that time
    // was the next slot's owner's. Debt: no grant until its share has paid it back (the
    // overrun times frame / slot of wall time), so its long-run share stays its slot's.
    const auto over = now - e.slot_end;
    e.stats.overruns++;
    e.stats.overrun_ns += Ns(over);
    const double pay = static_cast<double>(FrameLength().count()) / static_cast<double>(SlotLength(e).count());
    e.barred_until = now + std::chrono::duration_cast<Clock::duration>(over * pay);
  }
  e.stats.used_ns += used_ns;
  e.stats.charged_ns += static_cast<uint64_t>(std::llround(charge));
  e.grant_charge_ns = 0;
  e.state = SchedState::kIdle;
  e.preempted = false;
  e.told_contended = false;
  e.contended_since.reset();
  floor_ = Floor();
  if (wants) {
    // Still busy: it queues at its own virtual time. (Placement at the floor is for a vGPU
    // coming back from idle; here it would forgive what the vGPU just used.)
    e.state = SchedState::kWaiting;
    e.waiting_since = now;
  }
  Dispatch(now);
}

void Scheduler::BeginGrant(Entry& e, Clock::time_point now) {
  e.state = SchedState::kRunning;
  e.grant = next_grant_++;
  e.granted_at = now;
  e.preempted = false;
  e.grant_charge_ns = 0;
  e.stats.grants++;
  e.stats.wait_ns += Ns(now - e.waiting_since);
  floor_ = Floor();
}

void Scheduler::Preempt(const Uuid& u, Entry& e, Clock::time_point now) {
  e.preempted = true;
  e.preempted_at = now;
  e.stats.preemptions++;
  a_.preempt(u, e.grant);
}

void Scheduler::Dispatch(Clock::time_point now) {
  if (o_.partitioned()) return DispatchPartitioned(now);
  while (FreeSlots() > 0) {
    Entry* next = nullptr;
    const Uuid* next_u = nullptr;
    for (auto& [u, e] : entries_) {
      if (e.state != SchedState::kWaiting || !Eligible(e)) continue;
      if (!next || Key(e) < Key(*next) || (Key(e) == Key(*next) && e.waiting_since < next->waiting_since)) {
        next = &e;
        next_u = &u;
      }
    }
    if (!next) return;
    BeginGrant(*next, now);
    // Others still waiting once the free grants are given: every holder is contended from
    // now (told with the grant, so no piece can slip past before it knows).
    const bool others = Count(SchedState::kWaiting) > 0 && FreeSlots() == 0;
    next->contended_since.reset();
    if (others) next->contended_since = now;
    next->told_contended = others;
    a_.grant(*next_u, next->grant, others);
    if (others) {
      MarkContended(now);
      MaybeContend(now);
    }
  }
}

std::optional<Scheduler::Clock::time_point> Scheduler::PreemptAt(const Entry& h) const {
  auto cross = CrossAt(h);
  if (!cross) return std::nullopt;
  // At least a slice, so that busy vGPUs level in the order do not trade the engine per
  // piece; a quarter of one when a waiter is strictly before the holder in the order (Key:
  // one back from idle with its credit, or one whose requests are short): it is owed the
  // engine now, the holder only its first piece. A busy holder (asking for more than half a
  // slice) keeps a quarter too while any waiter asks for half a slice or less, before it in
  // the order or not: a light vGPU that has used its credit then waits out a few short
  // grants of the busy ones before it instead of their whole slices (simulated beside 7
  // busy ones: p99 2.35 ms against 3.6). It costs the busy ones more hand-overs while it
  // waits, never share; a tenant that fakes short requests to cause them still leaves every
  // holder a quarter slice and its piece. Light holders among light waiters keep the slice:
  // they give the engine back once idle anyway, and cutting them short only multiplied
  // hand-overs (four closed-loop small-work guests: 0.58 grants per submission against 0.47).
  const bool owed = LeastWaiting() < Key(h) || (!AsksShort(h) && ShortWaiter());
  return std::max(h.granted_at + (owed ? o_.slice / 4 : o_.slice), *cross);
}

double Scheduler::RequestNs(const Entry& e) const {
  const auto slice = static_cast<double>(o_.slice.count());
  return e.request_ns < 0 ? slice : std::clamp(e.request_ns, slice / 16, slice);
}

double Scheduler::Key(const Entry& e) const {
  return e.vruntime - (static_cast<double>(o_.slice.count()) - RequestNs(e)) * kWeightScale / e.weight;
}

bool Scheduler::AsksShort(const Entry& e) const {
  return RequestNs(e) <= static_cast<double>(o_.slice.count()) / 2;
}

bool Scheduler::ShortWaiter() const {
  return std::any_of(entries_.begin(), entries_.end(),
                     [&](const auto& kv) { return kv.second.state == SchedState::kWaiting && AsksShort(kv.second); });
}

double Scheduler::LeastWaiting() const {
  double least = std::numeric_limits<double>::infinity();
  for (const auto& [u, w] : entries_)
    if (w.state == SchedState::kWaiting) least = std::min(least, Key(w));
  return least;
}

std::optional<Scheduler::Clock::time_point> Scheduler::CrossAt(const Entry& e) const {
  if (e.state != SchedState::kRunning || !e.contended_since || !accrued_at_ || !Accruing()) return std::nullopt;
  const double least = LeastWaiting();
  if (std::isinf(least)) return std::nullopt;
  // When the holder passes the least waiting one in the order (Key; its virtual time moves
  // at the rate it is being charged). Until then it is owed engine time and is not
  // preempted; it is once that has passed and it has had its minimum hold.
  if (least <= Key(e)) return *accrued_at_;
  return After(*accrued_at_, least - Key(e), Rate(e));
}

void Scheduler::MaybePreempt(Clock::time_point now) {
  if (o_.partitioned()) return PreemptPartitioned(now);
  // One holder yields for each vGPU waiting beyond the free grants, those due first
  // (furthest ahead in virtual time among the due ones), counting the holders already asked.
  const size_t free = FreeSlots();
  const size_t queued = Count(SchedState::kWaiting);
  const size_t waiting = queued > free ? queued - free : 0;
  size_t asked = 0;
  std::vector<std::pair<double, Uuid>> due;
  for (const auto& [u, e] : entries_) {
    if (e.state != SchedState::kRunning) continue;
    if (e.preempted) {
      ++asked;
      continue;
    }
    auto at = PreemptAt(e);
    if (at && now >= *at) due.emplace_back(-e.vruntime, u);
  }
  std::sort(due.begin(), due.end());
  auto preempt = [&](const Uuid& u) { Preempt(u, entries_.at(u), now); };
  for (const auto& [neg_vruntime, u] : due) {
    if (asked >= waiting) break;
    ++asked;
    preempt(u);
  }
  // Concurrent holders: one that has run more than its lag ahead of another yields, though
  // nobody waits (weights among holders).
  std::vector<Uuid> ahead;
  for (const auto& [u, e] : entries_) {
    auto at = LagPreemptAt(e);
    if (at && now >= *at) ahead.push_back(u);
  }
  for (const Uuid& u : ahead) preempt(u);
}

void Scheduler::OnTimer(Clock::time_point now) {
  Accrue(now);
  std::vector<std::pair<Uuid, int64_t>> stuck;
  for (const auto& [u, e] : entries_)
    if (e.state == SchedState::kRunning && e.preempted && now - e.preempted_at >= o_.yield_timeout)
      stuck.emplace_back(u, std::chrono::duration_cast<std::chrono::milliseconds>(now - e.preempted_at).count());
  for (const auto& [u, held_ms] : stuck) {
    Detach(u, now);  // charged as held: the worker restarted is owed nothing for it
    a_.kill(u, fmt::format("scheduler: did not yield the engine within {} ms of a preempt", held_ms));
  }
  Dispatch(now);  // a waiter that was too far ahead of the holders may have become eligible
  MaybeContend(now);
  MaybePreempt(now);
}

std::optional<Scheduler::CommittedPreempt> Scheduler::CommittedPreemptAt(const Uuid& u) const {
  auto it = entries_.find(u);
  if (Slots() != 1 || it == entries_.end()) return std::nullopt;
  const Entry& h = it->second;
  if (h.state != SchedState::kRunning || h.preempted) return std::nullopt;
  // Partitioned: its slot's end, fixed at the grant.
  if (o_.partitioned()) return CommittedPreempt{h.grant, h.slot_end - o_.partition_margin, h.slot_start};
  // Until it has passed the least waiting vGPU (none waiting: infinity), when it will
  // depends on the rates to come. After, only its minimum hold is left: a later waiter can
  // make that shorter (owed), never longer, and the preempt action then comes earlier on
  // its own. PreemptAt has no time for a holder nobody contends.
  if (LeastWaiting() > Key(h)) return std::nullopt;
  auto at = PreemptAt(h);
  if (!at) return std::nullopt;
  return CommittedPreempt{h.grant, *at};
}

std::optional<Scheduler::Clock::time_point> Scheduler::NextDeadline() const {
  std::optional<Clock::time_point> next;
  auto consider = [&](std::optional<Clock::time_point> t) {
    if (t && (!next || *t < *next)) next = t;
  };
  const bool free = FreeSlots() > 0;
  if (o_.partitioned()) {
    for (const auto& [u, e] : entries_) {
      if (e.state == SchedState::kRunning)
        consider(e.preempted ? e.preempted_at + o_.yield_timeout : e.slot_end - o_.partition_margin);
      // The next grant: the waiter whose slot comes first (with a holder, its release
      // dispatches, or the holder's preempt time comes first).
      if (e.state == SchedState::kWaiting && free && accrued_at_) consider(NextGrant(u, e, *accrued_at_).at);
    }
    return next;
  }
  for (const auto& [u, e] : entries_) {
    if (e.state == SchedState::kWaiting && free && !Eligible(e)) consider(EligibleAt(e));
    if (e.state != SchedState::kRunning) continue;
    consider(e.preempted ? std::optional(e.preempted_at + o_.yield_timeout) : PreemptAt(e));
    consider(LagPreemptAt(e));
  }
  return next;
}

std::optional<SchedEntryStatus> Scheduler::Status(const Uuid& u) const {
  auto it = entries_.find(u);
  if (it == entries_.end()) return std::nullopt;
  SchedEntryStatus s = it->second.stats;
  s.charged_ns += static_cast<uint64_t>(std::llround(it->second.grant_charge_ns));  // this grant's, so far
  s.weight = it->second.weight;
  s.state = it->second.state;
  s.vruntime = it->second.vruntime - Floor();
  s.request_ns = static_cast<uint64_t>(std::llround(RequestNs(it->second)));
  if (o_.partitioned()) {
    s.slot_ns = Ns(SlotLength(it->second));
    s.frame_ns = Ns(FrameLength());
  }
  return s;
}

Scheduler::Clock::duration Scheduler::SlotLength(const Entry& e) const {
  // slice × weight / 100; never so short that the margin is most of it.
  const auto len = std::chrono::duration_cast<Clock::duration>(o_.slice * e.weight / 100);
  return std::max<Clock::duration>(len, 4 * std::chrono::duration_cast<Clock::duration>(o_.partition_margin) +
                                            std::chrono::microseconds(100));
}

Scheduler::Clock::duration Scheduler::FrameLength() const {
  Clock::duration f{};
  for (const auto& [u, e] : entries_) f += SlotLength(e);
  return f;
}

Scheduler::Window Scheduler::SlotWindow(const Uuid& u, Clock::time_point t) const {
  // Slots in UUID order from the epoch: a vGPU's place in the frame depends on which vGPUs
  // run and their weights (the operator's), never on what any of them does.
  Clock::duration offset{}, len{};
  for (const auto& [v, e] : entries_) {
    if (v == u) {
      len = SlotLength(e);
      break;
    }
    offset += SlotLength(e);
  }
  const Clock::duration frame = FrameLength();
  const Clock::time_point first = epoch_.value_or(t) + offset;
  if (t < first || frame.count() <= 0) return {first, first + len};
  Clock::time_point start = first + frame * ((t - first) / frame);
  if (t >= start + len) start += frame;
  return {start, start + len};
}

Scheduler::GrantTime Scheduler::NextGrant(const Uuid& u, const Entry& e, Clock::time_point t) const {
  Clock::time_point from = std::max(t, e.barred_until);
  for (;;) {
    const Window w = SlotWindow(u, from);
    const Clock::time_point at = std::max(from, w.start);
    if (at < w.end - o_.partition_margin) return {at, w};
    from = w.end;  // too late in this occurrence (inside the margin, or debt): the next one
  }
}

void Scheduler::DispatchPartitioned(Clock::time_point now) {
  if (Count(SchedState::kRunning) > 0) return;  // one grant at a time (vgpud refuses concurrency with it)
  for (auto& [u, e] : entries_) {
    if (e.state != SchedState::kWaiting) continue;
    const GrantTime g = NextGrant(u, e, now);
    if (g.at > now) continue;
    BeginGrant(e, now);
    e.slot_start = g.slot.start;
    e.slot_end = g.slot.end;
    // Always contended: one piece on the device at a time, so what runs past the preempt is
    // one piece, and the grant goes back once idle (its slot stays its own either way).
    e.contended_since = now;
    e.told_contended = true;
    a_.grant(u, e.grant, true);
    return;
  }
}

void Scheduler::PreemptPartitioned(Clock::time_point now) {
  // At its slot's end less the margin, whether anyone waits or not: the next slot's owner
  // may ask at any moment in its slot, and must find the engine free.
  for (auto& [u, e] : entries_) {
    if (e.state == SchedState::kRunning && !e.preempted && now >= e.slot_end - o_.partition_margin) Preempt(u, e, now);
  }
}

}  // namespace vg::daemon
