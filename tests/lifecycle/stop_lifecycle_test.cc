// F8, the host's side of a vGPU's lifecycle with a guest attached, through the real daemon,
// vgpuctl and guest processes, beside a victim tenant whose results stay bit-exact:
//  - stop with a VM attached: the device offers REQ; `vgpuctl stop` signals it; a guest that
//    listens releases the device and the stop completes early; one that ignores it is
//    disconnected with a named error after --stop-request-timeout-ms; the supervisor answers
//    throughout; the worker and every mapping go; the vGPU starts again, and the supervisor's
//    fds and mappings come back to what they were before the stop;
//  - hot-plug: a guest waiting for a vGPU that does not exist yet attaches when it starts.
#include <signal.h>

#include "tests/lifecycle/lifecycle_common.h"
#include "tests/lifecycle/usage.h"

using namespace vg;
using namespace vg::lifecycle;
using namespace vg::guest;

namespace {

bool WaitForLog(const mgmt::DaemonProc& d, const std::string& what, int timeout_ms) {
  auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  while (Clock::now() < deadline) {
    if (d.Log().find(what) != std::string::npos) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

pid_t WorkerPid(const mgmt::DaemonProc& d, const std::string& uuid) {
  mgmt::Json j = d.CtlJson({"show", uuid});
  if (!j.contains("worker") || !j["worker"].contains("pid")) return -1;
  return j["worker"]["pid"].get<pid_t>();
}

bool WaitGone(pid_t pid, int timeout_ms) {
  auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  while (Clock::now() < deadline) {
    if (::kill(pid, 0) != 0 && errno == ESRCH) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

void ExpectWorks(const std::string& socket) {
  auto dev = Device::Open(GuestOptions(socket));
  REQUIRE(dev.ok());
  auto drv = Driver::Create(**dev);
  REQUIRE(drv.ok());
  Result<> r = RunRounds(**drv, 2, 99);
  CHECK_MESSAGE(r.ok(), e2e::Why(r));
}

}  // namespace

TEST_CASE("stop with a guest attached that honours REQ: it releases the device, the stop ends early, the vGPU starts again") {
  mgmt::DaemonProc d;
  REQUIRE(d.Start());  // default --stop-request-timeout-ms: 5000
  StartVgpu(d, kUuidA);
  StartVgpu(d, kUuidB);
  e2e::Victim v(d.Socket(kUuidB));
  const std::string socket = d.Socket(kUuidA);
  GuestProc g([&](GuestProc::Shared& s) { return WorkingGuest(s, socket, /*listen=*/true); });
  REQUIRE_MESSAGE(g.WaitFor([](const auto& s) { return s.rounds.load() > 0 || s.note[0] != 0; }, 30000), g.note());
  REQUIRE_MESSAGE(g.shared().rounds.load() > 0, g.note());
  const pid_t worker = WorkerPid(d, kUuidA);
  REQUIRE(worker > 0);
  // The supervisor with the vGPU running and its guest attached (settled: no vgpuctl
  // connection open).
  const Usage before = SettledUsageOf(d.pid(), std::chrono::milliseconds(300));

  auto t0 = Clock::now();
  mgmt::Ran st = d.Ctl({"stop", kUuidA});
  const double stop_ms = MsSince(t0);
  CHECK_MESSAGE(st.code == 0, st.err);
  CHECK(stop_ms < 2000 * SlowFactor());  // the stop is asked, not waited for
  const int code = g.Wait(static_cast<int>(4000 * SlowFactor()));
  const double released_ms = MsSince(t0);
  INFO("guest: exit ", code, " after ", released_ms, " ms: ", g.note());
  MESSAGE("stop answered in ", stop_ms, " ms; the guest released the device after ", released_ms, " ms");
  CHECK(code == kReleased);
  // The worker ends because its client let go, not because the timeout passed; with it go
  // every mapping and fd it held.
  const bool gone = WaitGone(worker, static_cast<int>(3000 * SlowFactor()));
  CHECK_MESSAGE(gone, d.Log());
  CHECK(MsSince(t0) < 4500 * SlowFactor());
  CHECK(d.Log().find("the client released the device") != std::string::npos);
  CHECK(!mgmt::fs::exists(socket));
  // Stopped: the supervisor let go of what it held for that vGPU (its worker's channel,
  // the frame memfd, the console's listener): fewer fds than with it running.
  const Usage stopped = SettledUsageOf(d.pid(), std::chrono::milliseconds(300));
  CHECK(stopped.fds < before.fds);
  StartVgpu(d, kUuidA);
  ExpectWorks(socket);
  // Started again, a guest attached and gone: the supervisor's fds are back to what they
  // were, exactly; its mappings within a few (its allocator's arenas). A stop that leaked
  // the vGPU's fds or mappings would show here.
  const Usage after = SettledUsageOf(d.pid(), std::chrono::milliseconds(300));
  MESSAGE("supervisor: ", before.fds, " fds, ", before.maps, " mappings running; ", stopped.fds, " fds, ",
          stopped.maps, " mappings stopped; ", after.fds, " fds, ", after.maps, " mappings started again");
  CHECK(after.fds == before.fds);
  CHECK(after.maps <= before.maps + 8);
  e2e::CheckVictim(v.Stop());
  CheckShutdown(d);
}

TEST_CASE("stop with a guest attached that ignores REQ: disconnected by name after the timeout; the supervisor answers meanwhile") {
  mgmt::DaemonProc d;
  constexpr int kTimeoutMs = 1500;
  REQUIRE(d.Start({"--stop-request-timeout-ms", std::to_string(kTimeoutMs)}));
  StartVgpu(d, kUuidA);
  StartVgpu(d, kUuidB);
  e2e::Victim v(d.Socket(kUuidB));
  const std::string socket = d.Socket(kUuidA);
  GuestProc g([&](GuestProc::Shared& s) { return WorkingGuest(s, socket, /*listen=*/false); });
  REQUIRE_MESSAGE(g.WaitFor([](const auto& s) { return s.rounds.load() > 0 || s.note[0] != 0; }, 30000), g.note());
  REQUIRE_MESSAGE(g.shared().rounds.load() > 0, g.note());
  const pid_t worker = WorkerPid(d, kUuidA);
  REQUIRE(worker > 0);

  auto t0 = Clock::now();
  mgmt::Ran st = d.Ctl({"stop", kUuidA});
  CHECK_MESSAGE(st.code == 0, st.err);
  CHECK(MsSince(t0) < 1000 * SlowFactor());
  // While the worker waits for its client, the supervisor's loop serves: ping, list, show.
  double max_ping_ms = 0;
  while (MsSince(t0) < kTimeoutMs * 0.8) {
    auto p0 = Clock::now();
    CHECK(d.Ping());
    CHECK(d.CtlJson({"list"})["ok"] == true);
    max_ping_ms = std::max(max_ping_ms, MsSince(p0));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  CHECK(max_ping_ms < 1000 * SlowFactor());
  // The guest has not been cut off before the timeout.
  CHECK(g.Wait(0) == -1);
  const int code = g.Wait(static_cast<int>(kTimeoutMs + 4000 * SlowFactor()));
  const double gone_ms = MsSince(t0);
  INFO("guest: exit ", code, " after ", gone_ms, " ms: ", g.note());
  MESSAGE("an ignoring guest was disconnected ", gone_ms, " ms after the stop (timeout ", kTimeoutMs, " ms): ", g.note());
  CHECK(code == kDisconnected);
  CHECK(g.note().find("kPeerClosed after REQ") != std::string::npos);
  CHECK(gone_ms >= kTimeoutMs * 0.9);
  CHECK(gone_ms < kTimeoutMs + 1500 * SlowFactor());  // by the worker, not the SIGKILL after the grace period
  CHECK(WaitGone(worker, static_cast<int>(3000 * SlowFactor())));
  CHECK(WaitForLog(d, "did not release the device in time", 2000));
  StartVgpu(d, kUuidA);
  ExpectWorks(socket);
  e2e::CheckVictim(v.Stop());
  CheckShutdown(d);
}

TEST_CASE("hot-plug: a guest waiting for a vGPU that is not started yet attaches when it starts; stop without a guest is at once") {
  mgmt::DaemonProc d;
  REQUIRE(d.Start());
  StartVgpu(d, kUuidB);
  e2e::Victim v(d.Socket(kUuidB));
  const std::string socket = d.Socket(kUuidA);
  GuestProc g([&](GuestProc::Shared& s) {
    auto dev = Device::Open(GuestOptions(socket, /*timeout_ms=*/30000));  // retries until the socket serves
    if (!dev.ok()) {
      GuestProc::Note(s, dev.error().ToString());
      return kOpenFailed;
    }
    s.phase.store(1);
    auto drv = Driver::Create(**dev);
    if (!drv.ok()) return kOpenFailed;
    Result<> r = RunRounds(**drv, 3, 5);
    GuestProc::Note(s, e2e::Why(r));
    return r.ok() ? 0 : kOtherError;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK(g.shared().phase.load() == 0);  // still waiting: nothing to attach to
  StartVgpu(d, kUuidA);
  const int code = g.Wait(static_cast<int>(30000 * SlowFactor()));
  INFO(g.note());
  CHECK(code == 0);
  // No client: the stop does not wait for anyone.
  const pid_t worker = WorkerPid(d, kUuidA);
  REQUIRE(worker > 0);
  auto t0 = Clock::now();
  REQUIRE(d.Ctl({"stop", kUuidA}).code == 0);
  CHECK(WaitGone(worker, static_cast<int>(3000 * SlowFactor())));
  MESSAGE("stop without a client: worker gone after ", MsSince(t0), " ms");
  CHECK(MsSince(t0) < 3000 * SlowFactor());
  e2e::CheckVictim(v.Stop());
  CheckShutdown(d);
}
