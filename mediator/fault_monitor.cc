// F7: the fault monitor's window, thresholds and states (fault_monitor.h has the diagram).
#include "mediator/fault_monitor.h"

#include <algorithm>

namespace vg::mediator {

namespace {
constexpr int64_t kNsPerMs = 1000000;
}

const char* FaultKindName(FaultKind k) {
  switch (k) {
    case FaultKind::kCommandRefusal: return "command refusals";
    case FaultKind::kMmioRefusal: return "MMIO refusals";
    case FaultKind::kDmaFault: return "DMA faults";
    case FaultKind::kRemotingError: return "remoting errors";
    case FaultKind::kCount: break;
  }
  return "faults";
}

int64_t FaultMonitor::SteadyNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// A window shorter than one bucket per millisecond would make buckets of less than 1 ms:
// clamped (the daemon refuses such a flag anyway).
FaultMonitor::FaultMonitor(FaultPolicy policy, Clock now)
    : policy_([&] {
        policy.window_ms = std::max<uint32_t>(policy.window_ms, kBuckets);
        return policy;
      }()),
      now_(std::move(now)),
      window_ns_(int64_t{policy_.window_ms} * kNsPerMs),
      bucket_ns_(window_ns_ / kBuckets) {
  const int64_t t = now_();
  since_ = t;
  last_fault_ = t;
  next_admit_ = t;
}

uint64_t FaultMonitor::Limit(uint32_t per_s) const {
  const uint64_t n = (uint64_t{per_s} * policy_.window_ms + 999) / 1000;
  return std::max<uint64_t>(n, 1);
}

uint32_t FaultMonitor::Rate(uint64_t in_window) const {
  return static_cast<uint32_t>(std::min<uint64_t>(in_window * 1000 / policy_.window_ms, UINT32_MAX));
}

uint64_t FaultMonitor::InWindow(int64_t now, std::array<uint64_t, kFaultKinds>* by_kind) const {
  const int64_t cur = now / bucket_ns_;
  uint64_t total = 0;
  for (const Bucket& b : buckets_) {
    if (b.epoch < 0 || b.epoch <= cur - kBuckets || b.epoch > cur) continue;
    for (size_t k = 0; k < kFaultKinds; ++k) {
      total += b.count[k];
      if (by_kind) (*by_kind)[k] += b.count[k];
    }
  }
  return total;
}

void FaultMonitor::Enter(Health h, int64_t now) {
  const uint64_t stretch = static_cast<uint64_t>(std::max<int64_t>(now - since_, 0));
  if (health_ == Health::kThrottled) throttled_ns_ += stretch;
  if (health_ == Health::kQuarantined) quarantined_ns_ += stretch;
  health_ = h;
  health_seen_.store(h, std::memory_order_relaxed);
  since_ = now;
  next_admit_ = now;
  if (h == Health::kOk) {
    cause_ = HealthCause::kNone;
    rate_ = 0;
  }
}

void FaultMonitor::Advance(int64_t now) {
  // Only a throttled vGPU decays on its own; a quarantined one waits for its reset.
  if (health_ == Health::kThrottled && now - last_fault_ >= int64_t{policy_.quiet_ms} * kNsPerMs) {
    VG_LOGI("fault health: ok again ({} ms without a fault)", policy_.quiet_ms);
    Enter(Health::kOk, now);
  }
}

void FaultMonitor::OnFault(FaultKind kind) {
  if (kind >= FaultKind::kCount) return;
  const int64_t now = now_();
  std::lock_guard lk(mu_);
  Advance(now);
  ++faults_;
  ++by_kind_[static_cast<size_t>(kind)];
  last_fault_ = now;
  const int64_t epoch = now / bucket_ns_;
  Bucket& b = buckets_[static_cast<size_t>(epoch % kBuckets)];
  if (b.epoch != epoch) b = Bucket{epoch, {}};
  ++b.count[static_cast<size_t>(kind)];

  if (policy_.throttle_per_s == 0) return;
  std::array<uint64_t, kFaultKinds> k{};
  const uint64_t n = InWindow(now, &k);
  auto dominant = [&] { return static_cast<FaultKind>(std::max_element(k.begin(), k.end()) - k.begin()); };
  // The worst rate since the state was entered says more than the threshold it crossed.
  if (health_ != Health::kOk && cause_ == HealthCause::kFaults && Rate(n) > rate_) {
    rate_ = Rate(n);
    kind_ = dominant();
  }
  if (health_ == Health::kQuarantined) return;
  uint32_t threshold = 0;
  Health next = health_;
  if (health_ == Health::kOk && n >= Limit(policy_.throttle_per_s)) {
    next = Health::kThrottled;
    threshold = policy_.throttle_per_s;
  } else if (health_ == Health::kThrottled && policy_.quarantine_per_s != 0 && now - since_ >= window_ns_ &&
             n >= Limit(policy_.quarantine_per_s)) {
    // A whole window spent throttled: every fault in it came while on probation.
    next = Health::kQuarantined;
    threshold = policy_.quarantine_per_s;
  }
  if (next == health_) return;
  cause_ = HealthCause::kFaults;
  kind_ = dominant();
  rate_ = Rate(n);
  Enter(next, now);
  VG_LOGW("fault health: {}: {} faults/s over {} ms, mostly {} (threshold {}/s)",
          next == Health::kThrottled ? "throttled" : "quarantined", rate_, policy_.window_ms, FaultKindName(kind_),
          threshold);
  Notify(now);
}

Admission FaultMonitor::Admit() {
  // ok is left only in OnFault. The same path's faults are ordered before this load (the
  // loop thread for remoting, the vGPU's lock for the ring); the other path's become visible
  // a moment later at worst, which admits a submission or so more, no more.
  if (health_seen_.load(std::memory_order_relaxed) == Health::kOk) return {};
  const int64_t now = now_();
  std::lock_guard lk(mu_);
  Advance(now);
  if (health_ == Health::kQuarantined) return {Errc::kQuarantined, {}};
  if (health_ == Health::kOk || policy_.throttle_rate == 0) return {};
  if (now < next_admit_) return {Errc::kOk, std::chrono::nanoseconds(next_admit_ - now)};
  // Strictly spaced: no burst is saved up while nothing is submitted.
  next_admit_ = now + 1000000000 / int64_t{policy_.throttle_rate};
  return {};
}

bool FaultMonitor::Quarantined() {
  std::lock_guard lk(mu_);
  return health_ == Health::kQuarantined;
}

void FaultMonitor::OnReset() {
  const int64_t now = now_();
  std::lock_guard lk(mu_);
  Advance(now);
  if (health_ != Health::kQuarantined) return;
  // Probation: throttled, with a window of its own, so it takes a whole window of new
  // faults to be quarantined again and quiet_ms without one to be ok.
  buckets_ = {};
  last_fault_ = now;
  Enter(Health::kThrottled, now);
  cause_ = HealthCause::kQuarantineLifted;
  rate_ = 0;
  VG_LOGI("fault health: a reset lifted the quarantine; throttled until {} ms without a fault", policy_.quiet_ms);
  Notify(now);
}

void FaultMonitor::Restore(Health h, HealthCause cause, FaultKind kind, uint32_t rate_per_s) {
  if (h == Health::kOk || h > Health::kQuarantined || kind >= FaultKind::kCount) return;
  const int64_t now = now_();
  std::lock_guard lk(mu_);
  last_fault_ = now;
  Enter(h, now);
  cause_ = cause == HealthCause::kNone ? HealthCause::kFaults : cause;
  kind_ = kind;
  rate_ = rate_per_s;
  VG_LOGI("fault health: {} as its worker's predecessor left it", h == Health::kQuarantined ? "quarantined" : "throttled");
}

HealthReport FaultMonitor::Report() {
  const int64_t now = now_();
  std::lock_guard lk(mu_);
  Advance(now);
  return ReportLocked(now);
}

HealthReport FaultMonitor::ReportLocked(int64_t now) const {
  HealthReport r;
  r.health = health_;
  r.cause = cause_;
  r.kind = kind_;
  r.rate_per_s = rate_;
  r.faults = faults_;
  r.by_kind = by_kind_;
  const uint64_t stretch = static_cast<uint64_t>(std::max<int64_t>(now - since_, 0));
  r.throttled_ns = throttled_ns_ + (health_ == Health::kThrottled ? stretch : 0);
  r.quarantined_ns = quarantined_ns_ + (health_ == Health::kQuarantined ? stretch : 0);
  return r;
}

}  // namespace vg::mediator
