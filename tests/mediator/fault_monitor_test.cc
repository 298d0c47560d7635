// F7: the fault monitor's window, thresholds and states on a clock the test moves
// (mediator/fault_monitor.h), then the device model's use of it: which refusals count, a
// quarantined vGPU's doorbells refused by name before guest memory is read, a throttled
// one's doorbell deferred to the timer the daemon arms, and a reset lifting the quarantine.
#include <doctest.h>

#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "mediator/mediator.h"
#include "vfio_user/dma.h"

using namespace vg;
using namespace vg::mediator;
namespace vu = vg::vfio_user;
using namespace std::chrono_literals;

namespace {

constexpr int64_t kMs = 1000000;

struct Rig {
  int64_t t = 1000 * kMs;
  FaultMonitor m;
  explicit Rig(FaultPolicy p) : m(p, [this] { return t; }) {}
  void Faults(int n, int64_t every_ns, FaultKind k = FaultKind::kCommandRefusal) {
    for (int i = 0; i < n; ++i) {
      m.OnFault(k);
      t += every_ns;
    }
  }
  Health health() { return m.Report().health; }
};

FaultPolicy Policy() {
  FaultPolicy p;
  p.window_ms = 1000;
  p.throttle_per_s = 100;
  p.quarantine_per_s = 25;
  p.throttle_rate = 50;
  p.quiet_ms = 2000;
  return p;
}

}  // namespace

TEST_CASE("fault monitor: an occasional error never throttles; a rate over the threshold does") {
  Rig r(Policy());
  // 99 faults spread over a second, then a quiet second: under 100/s at every instant.
  for (int round = 0; round < 5; ++round) {
    r.Faults(99, 10 * kMs);
    r.t += 1100 * kMs;
  }
  CHECK(r.health() == Health::kOk);
  CHECK(r.m.Report().faults == 5 * 99);
  // One error every 20 ms for a minute: 50/s, steady, half the threshold.
  r.Faults(3000, 20 * kMs);
  CHECK(r.health() == Health::kOk);
  CHECK(r.m.Admit().go());

  // 100 within one window: throttled, named by the kind that dominated, with its rate.
  r.t += 5000 * kMs;
  r.Faults(30, 1 * kMs, FaultKind::kMmioRefusal);
  r.Faults(70, 1 * kMs, FaultKind::kRemotingError);
  HealthReport h = r.m.Report();
  CHECK(h.health == Health::kThrottled);
  CHECK(h.cause == HealthCause::kFaults);
  CHECK(h.kind == FaultKind::kRemotingError);
  CHECK(h.rate_per_s == 100);
  CHECK(h.by_kind[static_cast<size_t>(FaultKind::kMmioRefusal)] == 30);
  // Going on faster (register writes are not slowed): the worst rate and its kind are said.
  r.Faults(300, 1 * kMs, FaultKind::kMmioRefusal);
  h = r.m.Report();
  CHECK(h.health == Health::kThrottled);
  CHECK(h.rate_per_s >= 350);
  CHECK(h.kind == FaultKind::kMmioRefusal);
}

TEST_CASE("fault monitor: the window slides (old faults leave it)") {
  Rig r(Policy());
  r.Faults(60, 1 * kMs);   // 60 now
  r.t += 950 * kMs;        // the first ones are about to leave the window
  r.Faults(39, 1 * kMs);   // 99 within a second: not yet
  CHECK(r.health() == Health::kOk);
  r.t += 200 * kMs;        // the 60 have left
  r.Faults(60, 1 * kMs);   // 39 + 60 = 99 in the window
  CHECK(r.health() == Health::kOk);
  r.Faults(1, 1 * kMs);    // 100
  CHECK(r.health() == Health::kThrottled);
}

TEST_CASE("fault monitor: throttled admits at most throttle_rate per second, by waiting, never refusing") {
  Rig r(Policy());
  r.Faults(100, 1 * kMs);
  REQUIRE(r.health() == Health::kThrottled);
  int went = 0;
  int64_t waited = 0;
  const int64_t start = r.t;
  while (r.t - start < 1000 * kMs) {
    Admission a = r.m.Admit();
    CHECK(a.code == Errc::kOk);
    if (a.go()) {
      ++went;
      continue;
    }
    CHECK(a.wait.count() > 0);
    CHECK(a.wait.count() <= 20 * kMs);
    waited += a.wait.count();
    r.t += a.wait.count();
  }
  CHECK(went >= 49);
  CHECK(went <= 51);
  CHECK(waited > 900 * kMs);
}

TEST_CASE("fault monitor: throttled decays to ok after the quiet period, not before") {
  Rig r(Policy());
  r.Faults(100, 1 * kMs);
  REQUIRE(r.health() == Health::kThrottled);
  // A fault every 1.5 s keeps it throttled (and far below the quarantine rate).
  for (int i = 0; i < 6; ++i) {
    r.t += 1500 * kMs;
    r.m.OnFault(FaultKind::kCommandRefusal);
    CHECK(r.health() == Health::kThrottled);
  }
  r.t += 1999 * kMs;
  CHECK(r.health() == Health::kThrottled);
  r.t += 2 * kMs;
  HealthReport h = r.m.Report();
  CHECK(h.health == Health::kOk);
  CHECK(h.cause == HealthCause::kNone);
  CHECK(h.throttled_ns >= 9000 * kMs);
  CHECK(r.m.Admit().go());
}

TEST_CASE("fault monitor: quarantined after a whole window throttled at the quarantine rate; a reset puts it on probation") {
  Rig r(Policy());
  r.Faults(100, 1 * kMs);
  REQUIRE(r.health() == Health::kThrottled);
  // Within the first window of the throttle, whatever the rate: still throttled (the faults
  // that throttled it are in that window).
  r.Faults(200, 4 * kMs);
  CHECK(r.health() == Health::kThrottled);
  // A pause (shorter than the quiet period), then 30/s, of another kind: over 25/s for a
  // whole window spent throttled, and that kind is named.
  r.t += 1000 * kMs;
  r.Faults(40, 33 * kMs, FaultKind::kDmaFault);
  HealthReport h = r.m.Report();
  REQUIRE(h.health == Health::kQuarantined);
  CHECK(h.kind == FaultKind::kDmaFault);
  CHECK(h.rate_per_s >= 25);
  CHECK(r.m.Admit().code == Errc::kQuarantined);
  CHECK(r.m.Quarantined());
  // Time alone lifts nothing.
  r.t += 60000 * kMs;
  CHECK(r.health() == Health::kQuarantined);
  CHECK(r.m.Report().quarantined_ns >= 60000 * kMs);
  // Faults while quarantined are counted, and change nothing.
  const uint64_t before = r.m.Report().faults;
  r.Faults(10, 1 * kMs);
  CHECK(r.m.Report().faults == before + 10);
  CHECK(r.health() == Health::kQuarantined);

  r.m.OnReset();
  h = r.m.Report();
  CHECK(h.health == Health::kThrottled);
  CHECK(h.cause == HealthCause::kQuarantineLifted);
  CHECK(r.m.Admit().go());  // admitted again, at the throttled rate
  // Back to faulting at 30/s: quarantined again after a window.
  r.Faults(40, 33 * kMs);
  CHECK(r.health() == Health::kQuarantined);
  r.m.OnReset();
  // Quiet: ok after quiet_ms.
  r.t += 2001 * kMs;
  CHECK(r.health() == Health::kOk);
  r.m.OnReset();  // a reset of a healthy vGPU changes nothing
  CHECK(r.health() == Health::kOk);
}

TEST_CASE("fault monitor: every move to throttled or quarantined is told at once; a successor restores it") {
  Rig r(Policy());
  std::vector<HealthReport> told;
  r.m.SetObserver([&](const HealthReport& h) { told.push_back(h); });
  r.Faults(100, 1 * kMs);
  REQUIRE(told.size() == 1);
  CHECK(told[0].health == Health::kThrottled);
  CHECK(told[0].cause == HealthCause::kFaults);
  r.t += 1000 * kMs;
  r.Faults(40, 33 * kMs, FaultKind::kRemotingError);
  REQUIRE(told.size() == 2);
  CHECK(told[1].health == Health::kQuarantined);
  CHECK(told[1].kind == FaultKind::kRemotingError);
  // The worker dies; its successor's monitor starts from what was told.
  Rig next(Policy());
  next.m.Restore(told[1].health, told[1].cause, told[1].kind, told[1].rate_per_s);
  HealthReport h = next.m.Report();
  CHECK(h.health == Health::kQuarantined);
  CHECK(h.kind == FaultKind::kRemotingError);
  CHECK(h.rate_per_s == told[1].rate_per_s);
  CHECK(next.m.Admit().code == Errc::kQuarantined);
  next.t += 60000 * kMs;
  CHECK(next.health() == Health::kQuarantined);  // time lifts nothing, as before the crash
  next.m.OnReset();
  CHECK(next.health() == Health::kThrottled);
  // A throttle restored: its quiet time starts again, then ok.
  Rig third(Policy());
  third.m.Restore(Health::kThrottled, HealthCause::kFaults, FaultKind::kMmioRefusal, 120);
  CHECK(third.health() == Health::kThrottled);
  third.t += 1999 * kMs;
  CHECK(third.health() == Health::kThrottled);
  third.t += 2 * kMs;
  CHECK(third.health() == Health::kOk);
  // The decay to ok is not told (the heartbeat carries it); a reset's probation is.
  r.m.OnReset();
  REQUIRE(told.size() == 3);
  CHECK(told[2].cause == HealthCause::kQuarantineLifted);
  r.t += 2001 * kMs;
  CHECK(r.health() == Health::kOk);
  CHECK(told.size() == 3);
}

TEST_CASE("fault monitor: throttled but under the quarantine rate stays throttled") {
  Rig r(Policy());
  r.Faults(100, 1 * kMs);
  r.Faults(200, 50 * kMs);  // 20/s for 10 s
  CHECK(r.health() == Health::kThrottled);
}

TEST_CASE("fault monitor: 0 disables") {
  SUBCASE("throttle_per_s 0: only counts") {
    FaultPolicy p = Policy();
    p.throttle_per_s = 0;
    Rig r(p);
    r.Faults(100000, 1000);
    CHECK(r.health() == Health::kOk);
    CHECK(r.m.Report().faults == 100000);
    CHECK(r.m.Admit().go());
  }
  SUBCASE("quarantine_per_s 0: throttled at most") {
    FaultPolicy p = Policy();
    p.quarantine_per_s = 0;
    Rig r(p);
    r.Faults(20000, 1 * kMs);
    CHECK(r.health() == Health::kThrottled);
  }
  SUBCASE("throttle_rate 0: throttled, not slowed") {
    FaultPolicy p = Policy();
    p.throttle_rate = 0;
    Rig r(p);
    r.Faults(100, 1 * kMs);
    CHECK(r.health() == Health::kThrottled);
    for (int i = 0; i < 1000; ++i) CHECK(r.m.Admit().go());
  }
}

// ---- the device model --------------------------------------------------------------------

namespace {

struct Device {
  int timers = 0;
  std::chrono::nanoseconds last_wait{0};
  std::unique_ptr<Vgpu> v;
  explicit Device(FaultPolicy p) {
    VgpuConfig cfg;
    cfg.uuid = Uuid::Random();
    cfg.aperture_size = 1 << 20;
    cfg.gtt_entries = 256;
    cfg.faults = p;
    cfg.throttle_timer = [this](std::chrono::nanoseconds w) {
      ++timers;
      last_wait = w;
    };
    auto r = Vgpu::Create(cfg);
    REQUIRE(r.ok());
    v = std::move(r).value();
  }
  Result<> Wr32(uint64_t off, uint32_t x) { return v->RegionWrite(vu::kBar0Region, off, std::as_bytes(std::span(&x, 1))); }
  uint32_t Reg(uint64_t off) {
    uint32_t x = 0;
    REQUIRE(v->RegionRead(vu::kBar0Region, off, std::as_writable_bytes(std::span(&x, 1))).ok());
    return x;
  }
  // A ring in the aperture: the GTT maps GPU page 0 to aperture page 0, no guest memory needed.
  void EnableRing() {
    uint64_t entry = 0 | abi::kGttAperture | abi::kGttWritable | abi::kGttValid;
    REQUIRE(v->RegionWrite(vu::kBar0Region, abi::kGttOffset, std::as_bytes(std::span(&entry, 1))).ok());
    uint32_t cmd = 0x6;  // memory space + bus master
    REQUIRE(v->RegionWrite(vu::kConfigRegion, 0x04, std::as_bytes(std::span(&cmd, 1))).ok());
    REQUIRE(Wr32(abi::reg::kRingBaseLo, 0).ok());
    REQUIRE(Wr32(abi::reg::kRingSize, 4096).ok());
    REQUIRE(Wr32(abi::reg::kCtrl, abi::kCtrlRingEnable).ok());
  }
  // NOPs written straight into the aperture (where the ring is), then RING_TAIL.
  Result<> SubmitNops(uint32_t head, uint32_t n) {
    WriteNops(head, n);
    return Wr32(abi::reg::kRingTail, (head + 4 * n) % 4096);
  }
  void WriteNops(uint32_t head, uint32_t n) {
    for (uint32_t i = 0; i < n; ++i) {
      uint32_t nop = abi::cmd::Header(abi::cmd::kNop, 1);
      REQUIRE(v->RegionWrite(vu::kBar2Region, (head + 4 * i) % 4096, std::as_bytes(std::span(&nop, 1))).ok());
    }
  }
  // The ioeventfd doorbell: the tail published in a shadow (GPU page 1 = aperture page 1).
  void KickNops(uint32_t head, uint32_t n) {
    WriteNops(head, n);
    uint64_t entry = 0x1000 | abi::kGttAperture | abi::kGttWritable | abi::kGttValid;
    REQUIRE(v->RegionWrite(vu::kBar0Region, abi::kGttOffset + 8, std::as_bytes(std::span(&entry, 1))).ok());
    REQUIRE(Wr32(abi::reg::kTailShadowLo, 0x1000).ok());
    const uint32_t tail = (head + 4 * n) % 4096;
    REQUIRE(v->RegionWrite(vu::kBar2Region, 0x1000, std::as_bytes(std::span(&tail, 1))).ok());
    v->OnDoorbellKick();
  }
};

}  // namespace

TEST_CASE("device: MMIO refusals throttle, a throttled doorbell waits for the timer, quarantine refuses by name") {
  FaultPolicy p = Policy();
  p.window_ms = 100;  // rates over 100 ms: the test's real clock moves quickly
  p.throttle_per_s = 1000;
  p.quarantine_per_s = 100;
  p.throttle_rate = 2;  // one turn every 500 ms: the second doorbell must wait
  Device d(p);
  d.EnableRing();
  REQUIRE(d.SubmitNops(0, 4).ok());
  CHECK(d.Reg(abi::reg::kRingHead) == 16);
  CHECK(d.timers == 0);

  // Privileged writes: each refused (kPrivileged) and counted as an MMIO fault.
  for (int i = 0; i < 100; ++i) CHECK(d.Wr32(abi::priv::kGlobalReset, 1).code() == Errc::kPrivileged);
  HealthReport h = d.v->faults().Report();
  REQUIRE(h.health == Health::kThrottled);
  CHECK(h.kind == FaultKind::kMmioRefusal);

  // Throttled: the first doorbell takes the turn, the next one is answered but its span waits
  // for the timer; the timer's turn (OnThrottleTimer) takes it.
  REQUIRE(d.SubmitNops(16, 1).ok());
  CHECK(d.Reg(abi::reg::kRingHead) == 20);
  REQUIRE(d.SubmitNops(20, 2).ok());
  CHECK(d.Reg(abi::reg::kRingHead) == 20);
  CHECK(d.timers == 1);
  CHECK(d.last_wait > 0ns);
  std::this_thread::sleep_for(d.last_wait);
  d.v->OnThrottleTimer();
  CHECK(d.Reg(abi::reg::kRingHead) == 28);
  // The ioeventfd doorbell too: before its turn it waits for the timer, then is taken.
  d.KickNops(28, 1);
  CHECK(d.Reg(abi::reg::kRingHead) == 28);
  CHECK(d.timers == 2);
  std::this_thread::sleep_for(d.last_wait);
  d.v->OnThrottleTimer();
  CHECK(d.Reg(abi::reg::kRingHead) == 32);

  // A whole window throttled with faults at over 100/s: quarantined.
  std::this_thread::sleep_for(120ms);
  for (int i = 0; i < 50; ++i) (void)d.Wr32(abi::priv::kGlobalReset, 1);
  REQUIRE(d.v->faults().Report().health == Health::kQuarantined);
  const uint32_t errs = d.Reg(abi::reg::kErrCount);
  const uint64_t faults = d.v->faults().Report().faults;
  // Its doorbells are refused by name (RING_TAIL in the write's reply, source MMIO; the
  // ioeventfd's in the report, source ring); the ring does not move; no new fault.
  CHECK(d.SubmitNops(32, 1).code() == Errc::kQuarantined);
  CHECK(d.Reg(abi::reg::kErrCode) == static_cast<uint32_t>(Errc::kQuarantined));
  CHECK(d.Reg(abi::reg::kErrSource) == abi::kErrSourceMmio);
  CHECK(d.Reg(abi::reg::kErrCount) == errs + 1);
  d.KickNops(32, 1);
  CHECK(d.Reg(abi::reg::kErrCode) == static_cast<uint32_t>(Errc::kQuarantined));
  CHECK(d.Reg(abi::reg::kErrSource) == abi::kErrSourceRing);
  CHECK(d.Reg(abi::reg::kErrCount) == errs + 2);
  CHECK(d.Reg(abi::reg::kRingHead) == 32);
  CHECK(d.v->faults().Report().faults == faults);
  // Registers other than the doorbell still work.
  REQUIRE(d.Wr32(abi::reg::kScratch, 7).ok());
  CHECK(d.Reg(abi::reg::kScratch) == 7);

  // RESET lifts it to probation: the ring works again (after re-enabling, as after any reset).
  REQUIRE(d.Wr32(abi::reg::kReset, abi::kResetMagic).ok());
  h = d.v->faults().Report();
  CHECK(h.health == Health::kThrottled);
  CHECK(h.cause == HealthCause::kQuarantineLifted);
  d.EnableRing();
  REQUIRE(d.SubmitNops(0, 3).ok());
  CHECK(d.Reg(abi::reg::kRingHead) == 12);
}

TEST_CASE("device: a refusal counts once, as the kind its source names") {
  Device d(Policy());
  d.EnableRing();
  // RING_TAIL with the ring disabled: kBadState through an MMIO write.
  REQUIRE(d.Wr32(abi::reg::kCtrl, 0).ok());
  CHECK(d.Wr32(abi::reg::kRingTail, 4).code() == Errc::kBadState);
  CHECK(d.v->faults().Report().faults == 1);
  CHECK(d.v->faults().Report().by_kind[static_cast<size_t>(FaultKind::kMmioRefusal)] == 1);
}
