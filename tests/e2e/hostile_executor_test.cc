// Hostile guests against the mediated executor (F11 findings 7 and 12), through the real
// daemon's public sockets, each with a victim tenant on its own vGPU (tests/e2e/victim.h):
//  - the largest legal spin DISPATCH, then RESET / DEVICE_RESET / disconnect / stop: each
//    completes within the documented bound (docs/device-spec.md "Bounds and blocking: the
//    executor"), and the victim's register reads stay within theirs;
//  - GTT entries alternating between aperture pages (a 60 MiB range in 15360 spans) and a
//    flood of FILL submissions over them: refused by name (kLimitExceeded) while the
//    daemon's resident memory stays within the executor's byte bounds.
#include <doctest.h>

#include <sys/socket.h>
#include <sys/un.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>

#include "guest/guest.h"
#include "shaders/catalogue.h"
#include "tests/e2e/guest_checks.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/victim.h"

using namespace vg;
using namespace vg::e2e;
using namespace vg::guest;

namespace {

using Clock = std::chrono::steady_clock;
double MsSince(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}
double SlowFactor() {
  const char* f = std::getenv("VG_SLOW_FACTOR");
  double k = f ? std::atof(f) : 1.0;
  return k > 0 ? k : 1.0;
}
// docs/device-spec.md "Bounds and blocking: the executor": the loop thread answers a
// reset, a disconnect or a stop without waiting for the engine; the guest-visible end of a
// reset (the aperture scrub) waits for at most one engine submission.
constexpr double kLoopBoundMs = 100;
constexpr double kResetCompleteBoundMs = 2000;

struct Guest {
  std::unique_ptr<Device> dev;
  std::unique_ptr<Driver> drv;
  DriverOptions dopts;
  explicit Guest(const std::string& socket, uint64_t ram = 16 << 20, DriverOptions opts = {}) : dopts(opts) {
    DeviceOptions o;
    o.socket = socket;
    o.ram_size = ram;
    auto d = Device::Open(o);
    REQUIRE_MESSAGE(d.ok(), Why(d.ok() ? Ok() : Result<>(d.error())));
    dev = std::move(d).value();
    NewDriver();
  }
  void NewDriver() {
    drv.reset();
    auto r = Driver::Create(*dev, dopts);
    REQUIRE_MESSAGE(r.ok(), Why(r.ok() ? Ok() : Result<>(r.error())));
    drv = std::move(r).value();
  }
};

// The largest legal spin DISPATCH a small vGPU can name: iterations at the catalogue's
// limit (2^20) over a 60 MiB binding (15.7 M elements, 61440 groups: most of the GTT).
// Hours of work on lavapipe if run whole. Returns once it is running (its fence not passed).
constexpr uint64_t kSpinBytes = 60ull << 20;
constexpr uint64_t kAttackerRam = 80ull << 20;
void StartLargestSpin(Guest& g) {
  auto buf = g.drv->Alloc(kSpinBytes);
  REQUIRE(buf.ok());
  uint32_t count = static_cast<uint32_t>(kSpinBytes / 4);
  shaders::SpinPush p{count, 1u << 20, 7};
  Binding b = Bind(*buf, abi::cmd::kAccessWrite | abi::cmd::kAccessRead);
  CommandBuilder cb;
  cb.Dispatch(static_cast<uint32_t>(shaders::KernelId::kSpin), {count / 256, 1, 1}, std::span(&b, 1),
              shaders::PushBytes(p));
  auto seq = g.drv->Submit(cb);
  REQUIRE(seq.ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  auto err = g.dev->ReadError();
  REQUIRE(err.ok());
  REQUIRE_MESSAGE(err->code == Errc::kOk, "the spin was refused: " << ErrcName(err->code));
  REQUIRE(g.drv->completed() < *seq);
}

// Polls STATUS until RESETTING clears; returns the ms it took (or -1 past the bound).
double WaitResetComplete(Guest& g, double bound_ms) {
  auto t0 = Clock::now();
  while (MsSince(t0) <= bound_ms) {
    auto s = g.dev->Read32(abi::reg::kStatus);
    if (!s.ok()) return -1;
    if (!(*s & abi::kStatusResetting)) return MsSince(t0);
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return -1;
}

// After a reset the vGPU runs work again (a fresh driver: the ring registers were reset).
void ExpectWorks(Guest& g) {
  g.NewDriver();
  auto buf = g.drv->Alloc(4096);
  REQUIRE(buf.ok());
  CommandBuilder cb;
  cb.Fill(buf->va, 4096, 0x600d);
  auto seq = g.drv->Submit(cb);
  REQUIRE(seq.ok());
  auto w = g.drv->Wait(*seq, WaitMode::kIrq, static_cast<int>(5000 * SlowFactor()));
  REQUIRE_MESSAGE(w.ok(), Why(w));
  CHECK(reinterpret_cast<uint32_t*>(buf->host.data())[1023] == 0x600d);
}

// A fresh guest connects and runs one FILL; errors as values (runs on a helper thread).
Result<> TryWorks(const std::string& socket) {
  DeviceOptions o;
  o.socket = socket;
  o.ram_size = 16 << 20;
  VG_TRY_ASSIGN(auto dev, Device::Open(o));
  VG_TRY_ASSIGN(auto drv, Driver::Create(*dev));
  VG_TRY_ASSIGN(GpuBuffer buf, drv->Alloc(4096));
  CommandBuilder cb;
  cb.Fill(buf.va, 4096, 0x600d);
  VG_TRY_ASSIGN(uint64_t seq, drv->Submit(cb));
  VG_TRY(drv->Wait(seq, WaitMode::kIrq, static_cast<int>(5000 * SlowFactor())));
  VG_ERROR_IF(reinterpret_cast<uint32_t*>(buf.host.data())[1023] != 0x600d, Errc::kInternal, "FILL not seen");
  return Ok();
}

// Runs `op` on a thread; fails (and frees the thread by killing the daemon) past `bound_ms`.
template <class Fn>
double TimedOrKill(Daemon& d, double bound_ms, Fn&& op) {
  std::atomic<bool> done{false};
  auto t0 = Clock::now();
  std::thread t([&] {
    op();
    done = true;
  });
  while (!done && MsSince(t0) < bound_ms * 20 + 2000) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  double ms = MsSince(t0);
  if (!done) ::kill(d.pid(), SIGKILL);  // the daemon is stuck: unblock the client thread
  t.join();
  return done ? ms : -1;
}

uint64_t VmRssKiB(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6));
  return 0;
}

// One request on the daemon's control socket; the reply line, or "" past `timeout_ms`.
std::string Control(const Daemon& d, const std::string& request, int timeout_ms) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return "";
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::string path = (d.dir() / "control.sock").string();
  std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
  timeval tv{timeout_ms / 1000, (timeout_ms % 1000) * 1000};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::string reply;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
      ::send(fd, request.data(), request.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(request.size())) {
    char c;
    while (::recv(fd, &c, 1, 0) == 1 && c != '\n') reply.push_back(c);
  }
  ::close(fd);
  return reply;
}

}  // namespace

TEST_CASE("hostile executor: RESET and DEVICE_RESET during the largest legal spin DISPATCH") {
  Daemon daemon{{std::string(kUuidA) + ":small", std::string(kUuidB) + ":small"}};
  Victim v(daemon.Socket(1));
  Guest g(daemon.Socket(0), kAttackerRam);
  const double loop_bound = kLoopBoundMs * SlowFactor();
  const double reset_bound = kResetCompleteBoundMs * SlowFactor();

  StartLargestSpin(g);
  Result<> w = Ok();
  double write_ms = TimedOrKill(daemon, loop_bound, [&] { w = g.dev->Write32(abi::reg::kReset, abi::kResetMagic); });
  INFO("RESET register write took ", write_ms, " ms (", Why(w), ")");
  REQUIRE(write_ms >= 0);
  CHECK(w.ok());
  CHECK(write_ms <= loop_bound);
  double done_ms = WaitResetComplete(g, reset_bound);
  INFO("reset completed (RESETTING clear) after ", done_ms, " ms more");
  MESSAGE("RESET write answered in ", write_ms, " ms; complete ", done_ms, " ms later");
  CHECK(done_ms >= 0);
  ExpectWorks(g);

  StartLargestSpin(g);
  double reset_ms = TimedOrKill(daemon, loop_bound, [&] { w = g.dev->Reset(); });
  INFO("DEVICE_RESET took ", reset_ms, " ms (", Why(w), ")");
  REQUIRE(reset_ms >= 0);
  CHECK(w.ok());
  CHECK(reset_ms <= loop_bound);
  done_ms = WaitResetComplete(g, reset_bound);
  INFO("DEVICE_RESET completed after ", done_ms, " ms more");
  MESSAGE("DEVICE_RESET answered in ", reset_ms, " ms; complete ", done_ms, " ms later");
  CHECK(done_ms >= 0);
  // The scrub ran after the cancelled work: the aperture reads as zeros.
  auto ap = g.dev->aperture();
  CHECK(std::all_of(ap.begin(), ap.begin() + (1 << 20), [](std::byte b) { return b == std::byte{0}; }));
  ExpectWorks(g);
  VictimReport vr = v.Stop();
  MESSAGE("victim: rounds ", vr.rounds, ", max read ", vr.max_read_ms, " ms, max round ", vr.max_round_ms, " ms");
  CheckVictim(vr);
  CHECK(daemon.Alive());
}

TEST_CASE("hostile executor: disconnect during the largest legal spin DISPATCH") {
  Daemon daemon{{std::string(kUuidA) + ":small", std::string(kUuidB) + ":small"}};
  Victim v(daemon.Socket(1));
  {
    Guest g(daemon.Socket(0), kAttackerRam);
    StartLargestSpin(g);
  }  // the guest goes away with the spin running
  // The next guest of vGPU A connects and runs work: the slot was freed without waiting for
  // the spin (which stops at its next submission boundary).
  const double bound = (kLoopBoundMs + kResetCompleteBoundMs) * SlowFactor();
  Result<> worked = Ok();
  double ms = TimedOrKill(daemon, bound, [&] { worked = TryWorks(daemon.Socket(0)); });
  INFO("reconnect + first FILL after the disconnect took ", ms, " ms (", Why(worked), ")");
  CHECK(worked.ok());
  MESSAGE("reconnect + first FILL after the disconnect: ", ms, " ms");
  REQUIRE(ms >= 0);
  CHECK(ms <= bound);
  VictimReport vr = v.Stop();
  MESSAGE("victim: rounds ", vr.rounds, ", max read ", vr.max_read_ms, " ms, max round ", vr.max_round_ms, " ms");
  CheckVictim(vr);
  CHECK(daemon.Alive());
}

TEST_CASE("hostile executor: stop during the largest legal spin DISPATCH") {
  Daemon daemon{{std::string(kUuidA) + ":small", std::string(kUuidB) + ":small"}};
  Victim v(daemon.Socket(1));
  Guest g(daemon.Socket(0), kAttackerRam);
  StartLargestSpin(g);
  const double bound = kLoopBoundMs * SlowFactor() + 1000;  // + the control socket's round trip
  auto t0 = Clock::now();
  std::string reply = Control(daemon, std::string("{\"op\":\"stop\",\"uuid\":\"") + kUuidA + "\"}\n",
                              static_cast<int>(bound * 5));
  double ms = MsSince(t0);
  INFO("stop replied after ", ms, " ms: ", reply);
  MESSAGE("stop answered in ", ms, " ms");
  CHECK(reply.find("\"ok\":true") != std::string::npos);
  CHECK(ms <= bound);
  if (reply.empty()) ::kill(daemon.pid(), SIGKILL);  // stuck: let the victim's reads fail now
  VictimReport vr = v.Stop();
  MESSAGE("victim: rounds ", vr.rounds, ", max read ", vr.max_read_ms, " ms, max round ", vr.max_round_ms, " ms");
  CheckVictim(vr);
}

namespace {

// Maps `pages` GTT entries, from a fresh VA, to every other aperture page: no two
// neighbours are contiguous, so a range over them is one span per page.
GpuVa MapAlternating(Guest& g, uint64_t pages, uint64_t aperture_pages) {
  auto va = g.drv->ReserveVa(pages * kPageSize);
  REQUIRE(va.ok());
  for (uint64_t p = 0; p < pages; ++p) {
    uint64_t ap = (2 * p) % aperture_pages + ((2 * p) / aperture_pages) % 2;
    uint64_t entry = (ap * kPageSize) | abi::kGttValid | abi::kGttAperture | abi::kGttWritable;
    REQUIRE(g.drv->WriteGtt(static_cast<uint32_t>((va->v >> kPageShift) + p), entry).ok());
  }
  // The GTT writes are posted: one read orders them before the doorbell (an ioeventfd
  // kick takes another path) and tells whether any was refused.
  auto errs = g.dev->Read32(abi::reg::kErrCount);
  REQUIRE(errs.ok());
  REQUIRE(*errs == 0);
  return *va;
}

// One legal FILL over the range, waited for: the aperture pages it touches (device memory,
// shared, counted in VmRSS) and the engine's first gather buffers belong to the baseline.
void WarmUp(Guest& g, GpuVa va, uint64_t bytes) {
  CommandBuilder cb;
  cb.Fill(va, bytes, 0x5a);
  auto seq = g.drv->Submit(cb);
  REQUIRE(seq.ok());
  auto w = g.drv->Wait(*seq, WaitMode::kIrq, static_cast<int>(30000 * SlowFactor()));
  REQUIRE_MESSAGE(w.ok(), Why(w));
}

constexpr uint64_t kAltBytes = 60ull << 20;
constexpr uint64_t kApertureBytes = 64ull << 20;  // vgpud-small
// The executor's byte bounds (plans 16 MiB + gathers 64 MiB) plus slack for the engine.
constexpr uint64_t kRssGrowthBoundKiB = 144ull << 10;

// Under ASan freed memory sits in the allocator's quarantine (256 MiB by default) and
// still counts in VmRSS; the RSS tests start their daemon with a small one so that what
// they measure is what the daemon holds.
void SmallAsanQuarantine() {
#if defined(__SANITIZE_ADDRESS__)
  const char* cur = std::getenv("ASAN_OPTIONS");
  std::string opts = cur ? std::string(cur) + ":" : std::string();
  ::setenv("ASAN_OPTIONS", (opts + "quarantine_size_mb=8").c_str(), 1);
#endif
}

// Highest VmRSS of the daemon seen while polling for `ms`.
uint64_t PeakRss(pid_t pid, int ms) {
  uint64_t peak = VmRssKiB(pid);
  auto t0 = Clock::now();
  while (MsSince(t0) < ms) {
    peak = std::max(peak, VmRssKiB(pid));
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return peak;
}

}  // namespace

TEST_CASE("hostile executor: FILLs over alternating aperture pages are refused by name, RSS bounded") {
  SmallAsanQuarantine();
  Daemon daemon{{std::string(kUuidA) + ":small", std::string(kUuidB) + ":small"}};
  Victim v(daemon.Socket(1));
  Guest g(daemon.Socket(0));
  GpuVa va = MapAlternating(g, kAltBytes / kPageSize, kApertureBytes / kPageSize);
  WarmUp(g, va, kAltBytes);
  uint64_t before = VmRssKiB(daemon.pid());
  // 16 FILLs of the 60 MiB range in one submission: 245760 spans, and (unbounded) 960 MiB
  // of gather buffers in one engine submission.
  CommandBuilder cb;
  for (int i = 0; i < 16; ++i) cb.Fill(va, kAltBytes, 0x1000 + i);
  auto seq = g.drv->Submit(cb);
  REQUIRE(seq.ok());
  auto w = g.drv->Wait(*seq, WaitMode::kIrq, static_cast<int>(5000 * SlowFactor()));
  uint64_t peak = PeakRss(daemon.pid(), 3000);
  auto err = g.dev->ReadError();
  REQUIRE(err.ok());
  INFO("wait: ", Why(w), "; error ", ErrcName(err->code), "; RSS ", before, " -> peak ", peak, " KiB");
  MESSAGE("alternating GTT: ", ErrcName(err->code), "; RSS ", before, " -> peak ", peak, " KiB");
  CHECK(w.code() == Errc::kLimitExceeded);
  CHECK(err->code == Errc::kLimitExceeded);
  CHECK(peak - std::min(peak, before) <= kRssGrowthBoundKiB);
  VictimReport vr = v.Stop();
  MESSAGE("victim: rounds ", vr.rounds, ", max read ", vr.max_read_ms, " ms, max round ", vr.max_round_ms, " ms");
  CheckVictim(vr);
  CHECK(daemon.Alive());
}

TEST_CASE("hostile executor: a flood of queued FILL plans is refused by name, RSS bounded") {
  SmallAsanQuarantine();
  Daemon daemon{{std::string(kUuidA) + ":small", std::string(kUuidB) + ":small"}};
  Victim v(daemon.Socket(1));
  DriverOptions trapped;
  trapped.use_ioeventfd = false;  // one ring submission per doorbell: kicks do not coalesce
  Guest g(daemon.Socket(0), 16 << 20, trapped);
  GpuVa va = MapAlternating(g, kAltBytes / kPageSize, kApertureBytes / kPageSize);
  WarmUp(g, va, kAltBytes);
  uint64_t before = VmRssKiB(daemon.pid());
  // 400 submissions of one legal FILL each (15360 spans, ~600 KiB of plan apiece), rung
  // back to back without waiting: unbounded, 240 MiB of queued plans.
  CommandBuilder cb;
  cb.Fill(va, kAltBytes, 0xf1);
  for (int i = 0; i < 400; ++i) REQUIRE(g.drv->Submit(cb, /*irq=*/false).ok());
  uint64_t peak = PeakRss(daemon.pid(), 2000);
  auto err = g.dev->ReadError();
  REQUIRE(err.ok());
  INFO("error ", ErrcName(err->code), "; RSS ", before, " -> peak ", peak, " KiB");
  MESSAGE("FILL flood: ", ErrcName(err->code), "; RSS ", before, " -> peak ", peak, " KiB");
  CHECK(err->code == Errc::kLimitExceeded);
  CHECK(peak - std::min(peak, before) <= kRssGrowthBoundKiB);
  VictimReport vr = v.Stop();
  MESSAGE("victim: rounds ", vr.rounds, ", max read ", vr.max_read_ms, " ms, max round ", vr.max_round_ms, " ms");
  CheckVictim(vr);
  CHECK(daemon.Alive());
}

// Not an attack: the cutting itself. Spins dear enough to be cut into several engine
// submissions (along x for a one-row grid, by rows for a multi-row one) compute exactly
// what the CPU reference computes for the whole dispatch.
TEST_CASE("executor: a DISPATCH cut into group ranges computes exactly what it would whole") {
  Daemon daemon{{std::string(kUuidA) + ":small"}};
  Guest g(daemon.Socket(0));
  struct Case {
    std::array<uint32_t, 3> groups;
    uint32_t iterations;
  };
  // 128 groups x 256 x 4096 = 2^27 units: 2 pieces of 64 groups; 128 x 8192: 4 pieces of 32;
  // 64 x 2 groups x 4096: 2 row pieces (LinearIndex reads the grid width).
  for (Case c : {Case{{1, 1, 1}, 4096}, Case{{128, 1, 1}, 4096}, Case{{128, 1, 1}, 8192}, Case{{64, 2, 1}, 4096}}) {
    auto s = shaders::MakeSample(shaders::KernelId::kSpin, 32768, 5);
    s.groups = c.groups;
    shaders::SpinPush p{32768, c.iterations, 5};
    s.push.assign(shaders::PushBytes(p).begin(), shaders::PushBytes(p).end());
    auto buf = g.drv->Alloc(s.bindings[0].size());
    REQUIRE(buf.ok());
    std::memcpy(buf->host.data(), s.bindings[0].data(), s.bindings[0].size());
    Binding b = Bind(*buf, abi::cmd::kAccessRead | abi::cmd::kAccessWrite);
    CommandBuilder cb;
    cb.Dispatch(s.kernel, s.groups, std::span(&b, 1), s.push);
    auto seq = g.drv->Submit(cb);
    REQUIRE(seq.ok());
    auto w = g.drv->Wait(*seq, WaitMode::kIrq, static_cast<int>(30000 * SlowFactor()));
    REQUIRE_MESSAGE(w.ok(), Why(w));
    std::vector<std::vector<std::byte>> out{{buf->host.begin(), buf->host.end()}};
    auto check = shaders::CheckSample(s, out);
    uint32_t first = 0;
    std::memcpy(&first, s.bindings[0].data(), 4);
    CHECK_MESSAGE(check.ok(), Why(check) << " (word 0 was " << std::hex << first << " before)");
    REQUIRE(g.drv->Free(*buf).ok());
  }
}
