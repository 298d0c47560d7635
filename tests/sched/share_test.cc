// The host scheduler and rate limits against the real daemon (F7): busy tenants on the
// mediated path, each checking its results bit for bit (tests/e2e/victim.h), and the
// device time each got as the daemon reports it (`show`, counters.gpu_time_ns).
#include <doctest/doctest.h>

#include <csignal>
#include <chrono>
#include <filesystem>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "tests/e2e/control.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/victim.h"

namespace vg::e2e {
namespace {

using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;

struct Host : ControlHost {
  using ControlHost::ControlHost;
  uint64_t GpuTimeNs(const std::string& uuid) {
    Json s = Show(uuid);
    REQUIRE_MESSAGE(s.contains("counters"), s.dump());
    return s["counters"]["gpu_time_ns"].get<uint64_t>();
  }
};

constexpr const char* kA = "5c4e0000-0000-4000-8000-00000000000a";
constexpr const char* kB = "5c4e0000-0000-4000-8000-00000000000b";

// What each of two always-busy tenants, weights 100 and 400, got over `secs`: device time
// as the daemon counts it, and rounds completed (from start to stop).
struct TwoShares {
  double a_ns = 0, b_ns = 0;
  uint64_t a_rounds = 0, b_rounds = 0;
};
TwoShares Shares(Host& h, double secs) {
  // Rounds of a few milliseconds of device work each (the kernels' pieces are far shorter
  // than the window, as the executor's cost budget keeps them), so the window holds many
  // grants; a tenant whose pieces are a sizeable part of it shows its debt in lumps. Both
  // backlogged (three rounds in flight, inputs and references made once): shares are
  // shares of backlogged time, and a tenant that thinks with nothing queued gives the
  // engine up meanwhile.
  Victim a(h.Start(kA, Json::array({Json{{"sched_weight", "100"}}})), 1 << 14, 6, true);
  Victim b(h.Start(kB, Json::array({Json{{"sched_weight", "400"}}})), 1 << 14, 6, true);
  const uint64_t a0 = h.GpuTimeNs(kA), b0 = h.GpuTimeNs(kB);
  std::this_thread::sleep_for(std::chrono::duration<double>(secs));
  const uint64_t a1 = h.GpuTimeNs(kA), b1 = h.GpuTimeNs(kB);
  MESSAGE("scheduler A ", h.Show(kA)["scheduler"].dump(), "\nscheduler B ", h.Show(kB)["scheduler"].dump());
  VictimReport ra = a.Stop(), rb = b.Stop();
  CheckVictim(ra);  // bit-exact results throughout, and answered
  CheckVictim(rb);
  MESSAGE("rounds: A ", ra.rounds, ", B ", rb.rounds, "; device ms: A ", (a1 - a0) / 1e6, ", B ", (b1 - b0) / 1e6);
  return {static_cast<double>(a1 - a0), static_cast<double>(b1 - b0), ra.rounds, rb.rounds};
}

TEST_CASE("weights: two busy tenants at 100 and 400 get about 1:4 of the engine's time") {
  // Backlogged from the scheduler's view: a gap in a tenant's work shorter than the idle
  // grace keeps its grant. On this 2-core machine the "device" (lavapipe) and the guests
  // share the cores, so a guest's resubmission can come a few ms after its last piece
  // even with rounds queued; the grace is set to cover that (default 200 us).
  Host h({"--sched-idle-grace-us", "3000"});
  const TwoShares shares = Shares(h, 4.0 * SlowFactor());
  const double a = shares.a_ns, b = shares.b_ns;
  REQUIRE(a > 0);
  // The premise: both were engine-bound, so the engine was busy most of the window (it
  // was 3.6 of 4 s here); an idle engine gives every tenant what it asks, whatever the
  // weights.
  REQUIRE_MESSAGE(a + b >= 0.6 * 4.0 * SlowFactor() * 1e9, "the engine was not the bottleneck: weights untestable");
  const double ratio = b / a;
  MESSAGE("device time B / A = ", ratio, " (weights 400 / 100)");
  // Tolerance from measurement on the loaded 2-core CI machine (lavapipe): 3.6-5.3 seen;
  // without the scheduler (--sched off) the same run gives about 1.
  CHECK(ratio >= 2.5);
  CHECK(ratio <= 7.0);
  // Both were served: the light one is not starved.
  CHECK(a > 0.05 * (a + b));
}

TEST_CASE("rate limit: 20 submissions per second hold while the tenant submits as fast as it can") {
  Host h;
  const std::string socket = h.Start(kA, Json::array({Json{{"rate_limit", "20"}}, Json{{"rate_burst", "2"}}}));
  Victim v(socket, 256);
  const uint64_t r0 = v.rounds();
  const auto t0 = Clock::now();
  std::this_thread::sleep_for(std::chrono::seconds(3));
  const uint64_t r1 = v.rounds();
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  Json s = h.Show(kA);
  CheckVictim(v.Stop());
  const double rate = (r1 - r0) / secs;
  MESSAGE("submissions per second under rate_limit 20: ", rate, "; rate_limited ", s["counters"]["rate_limited"]);
  CHECK(rate <= 20 * 1.15 + 2 / secs);
  CHECK(rate >= 20 * 0.5);  // limited, not stopped
  CHECK(s["counters"]["rate_limited"].get<uint64_t>() > 0);
  CHECK(s["scheduler"]["rate_limit"] == 20);
}

// The worker serving `uuid` killed (SIGKILL, as a crash), and its successor running.
void KillWorker(Host& h, const std::string& uuid) {
  const Json w = h.Show(uuid)["worker"];
  REQUIRE(w["pid"].is_number());
  const int64_t pid = w["pid"].get<int64_t>();
  REQUIRE(::kill(static_cast<pid_t>(pid), SIGKILL) == 0);
  const auto deadline = Clock::now() + std::chrono::duration<double>(20 * SlowFactor());
  while (Clock::now() < deadline) {
    const Json a = h.Show(uuid)["worker"];
    if (a["state"] == "running" && a["pid"].is_number() && a["pid"].get<int64_t>() != pid) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  FAIL("the worker did not come back");
}

TEST_CASE("rate limit: a worker's crash refills no bucket (its successor starts where it left off)") {
  // A burst of 30, then one submission a second: a tenant that spent its burst and crashed
  // its worker had a new burst at once when a new worker started with full buckets.
  Host h;
  const std::string socket = h.Start(kA, Json::array({Json{{"rate_limit", "1"}}, Json{{"rate_burst", "30"}}}));
  {
    Victim v(socket, 256);
    const auto deadline = Clock::now() + std::chrono::duration<double>(20 * SlowFactor());
    while (v.rounds() < 30 && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    REQUIRE(v.rounds() >= 30);
    CheckVictim(v.Stop());
  }
  const auto killed = Clock::now();
  KillWorker(h, kA);
  Victim v(socket, 256);
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  const uint64_t rounds = v.rounds();
  const double since_kill = std::chrono::duration<double>(Clock::now() - killed).count();
  CheckVictim(v.Stop());
  MESSAGE("rounds in the successor's first 1.5 s: ", rounds, " (", since_kill, " s since the kill)");
  // What the bucket refilled since the burst was spent (a round in flight at the kill, one a
  // second since), not a new burst of 30.
  CHECK(rounds >= 1);
  CHECK(static_cast<double>(rounds) <= 3 + since_kill);
}

// Device time a busy tenant got over `secs` on `h`, beside `idle_others` running vGPUs
// that do nothing.
double BusyAlone(Host& h, int idle_others, double secs, uint32_t elements = 1 << 14) {
  for (int i = 0; i < idle_others; ++i) h.Start(fmt::format("5c4e0000-0000-4000-8000-0000000001{:02x}", i), Json::array());
  // Backlogged (rounds in flight, inputs and references made once), as in Shares(): one
  // round at a time made the guest's own CPU work the bottleneck on a 2-core host (the
  // engine was busy 46-59 % of the time here, so the premise below failed).
  Victim v(h.Start(kA, Json::array()), elements, 3, true);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // past the bucket's burst
  const uint64_t t0 = h.GpuTimeNs(kA);
  const auto c0 = Clock::now();
  std::this_thread::sleep_for(std::chrono::duration<double>(secs));
  const uint64_t t1 = h.GpuTimeNs(kA);
  const double wall = std::chrono::duration<double>(Clock::now() - c0).count();
  Json s = h.Show(kA)["scheduler"];
  CheckVictim(v.Stop());
  MESSAGE("busy tenant beside ", idle_others, " idle: ", (t1 - t0) / 1e6, " device ms in ", wall * 1e3, " ms; ",
          s.dump());
  return static_cast<double>(t1 - t0) / (wall * 1e9);
}

TEST_CASE("policies: best-effort gives a lone busy vGPU the engine; equal-share, fixed-share and partitioned cap it at its share") {
  // Premise for each cap: the same tenant alone under best-effort keeps the engine busy
  // well past the cap (else a cap would be untestable here).
  double free_share = 0;
  {
    Host h({"--sched", "best-effort"});
    free_share = BusyAlone(h, 1, 2.0 * SlowFactor());
    REQUIRE_MESSAGE(free_share >= 0.6, "the engine was not the bottleneck: caps untestable");
  }
  SUBCASE("equal-share: 1/2 with one idle neighbour (its share is kept for it)") {
    Host h({"--sched", "equal-share"});
    const double got = BusyAlone(h, 1, 3.0 * SlowFactor());
    CHECK(h.Show(kA)["scheduler"]["scheduling"] == "equal-share");
    CHECK(h.Show(kA)["scheduler"]["share_cap_ms_per_s"].get<double>() == doctest::Approx(500.0));
    // Bucket: 1/2 s per s with a 50 ms burst, charged after each piece (debt): within a
    // piece of the cap over 3 s.
    CHECK(got <= 0.5 * 1.1);
    CHECK(got >= 0.5 * 0.6);  // capped, not stopped
  }
  SUBCASE("fixed-share: 1/16 for the small type (max_instances 16), whatever else runs") {
    Host h({"--sched", "fixed-share"});
    // Small rounds: pieces of about a millisecond, so 3 s hold many (a cap is met to
    // within a piece of debt).
    const double got = BusyAlone(h, 0, 3.0 * SlowFactor(), 1 << 10);
    CHECK(h.Show(kA)["scheduler"]["share_cap_ms_per_s"].get<double>() == doctest::Approx(62.5));
    // Measured 0.07-0.09 on the loaded 2-core machine (best-effort gives the same tenant
    // 0.9-1.0): the bucket is charged after each piece, and the counters are read from the
    // worker's last pong (up to 250 ms old at either end of the window).
    CHECK(got <= 0.0625 * 1.6);
    CHECK(got >= 0.0625 * 0.5);
  }
  SUBCASE("partitioned: its own slot only, 1/2 with one idle neighbour (the idle slot is nobody's)") {
    // Slots of 8 ms: several of this tenant's pieces (1-4 ms each here) fit in one. Its
    // worker's gate ends each grant before the slot does (fit_pieces); what runs past is a
    // piece slower than its recent ones (the loaded host), charged as debt.
    Host h({"--sched", "partitioned", "--sched-slice-us", "8000"});
    const double got = BusyAlone(h, 1, 3.0 * SlowFactor());
    Json s = h.Show(kA)["scheduler"];
    CHECK(s["scheduling"] == "partitioned");
    CHECK(s["slot_ms"].get<double>() == doctest::Approx(8.0));
    CHECK(s["frame_ms"].get<double>() == doctest::Approx(16.0));
    // Measured 0.12-0.15 on the loaded 2-core machine (best-effort: 0.8): the guest's own
    // turnaround leaves part of each slot idle, nothing else may use it, and a piece whose
    // estimate does not fit what is left of a slot waits for the next.
    CHECK(got <= 0.5 * 1.1);
    CHECK(got >= 0.04);  // served
    const double grants = s["grants"].get<double>();
    MESSAGE("partitioned: ", s["overruns"], " overruns (", s["overrun_ms"], " ms) in ", grants, " grants");
    CHECK(grants > 50);
    CHECK(s["overruns"].get<double>() <= 0.2 * grants);
  }
}

TEST_CASE("partitioned: a vGPU whose worker crashes keeps its slot and counters while it restarts; the others' frame does not move") {
  // A frame without it would move every other vGPU's slots for the restart's while: a timing
  // signal a tenant could send by crashing its own worker.
  Host h({"--sched", "partitioned"});
  const std::string socket_a = h.Start(kA, Json::array());
  h.Start(kB, Json::array());
  REQUIRE(h.Show(kB)["scheduler"]["frame_ms"].get<double>() == doctest::Approx(4.0));
  {
    Victim v(socket_a, 1024);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    CheckVictim(v.Stop());
  }
  // Its scheduler entry outlives the worker (Scheduler::Detach): the counters, and the debt
  // with them, are not shed by a crash.
  const double grants_before = h.Show(kA)["scheduler"]["grants"].get<double>();
  REQUIRE(grants_before > 0);
  const Json w = h.Show(kA)["worker"];
  REQUIRE(w["pid"].is_number());
  const int64_t pid = w["pid"].get<int64_t>();
  REQUIRE(::kill(static_cast<pid_t>(pid), SIGKILL) == 0);
  // Until it runs again (a new process, 250 ms of back-off first): B's frame stays 4 ms,
  // A's slot with it.
  bool saw_restarting = false, back = false;
  const auto deadline = Clock::now() + std::chrono::seconds(15);
  while (Clock::now() < deadline && !back) {
    const Json a = h.Show(kA), b = h.Show(kB);
    CHECK(b["scheduler"]["frame_ms"].get<double>() == doctest::Approx(4.0));
    const Json& aw = a["worker"];
    saw_restarting |= aw["state"] == "restarting";
    back = aw["state"] == "running" && aw["pid"].is_number() && aw["pid"].get<int64_t>() != pid;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CHECK(saw_restarting);
  REQUIRE(back);
  CHECK(h.Show(kA)["scheduler"]["slot_ms"].get<double>() == doctest::Approx(2.0));
  CHECK(h.Show(kA)["scheduler"]["grants"].get<double>() >= grants_before);
  // And it serves again, in its slot, bit-exact.
  Victim v(socket_a, 1024);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CheckVictim(v.Stop());
}

TEST_CASE("modify --live reaches the running worker; a plain modify of a transient vGPU is refused") {
  Host h;
  h.Start(kA, Json::array({Json{{"sched_weight", "100"}}}));
  CHECK(h.Show(kA)["scheduler"]["weight"] == 100);
  Json r = Control(h.control, Json{{"op", "modify"},
                                   {"uuid", kA},
                                   {"live", true},
                                   {"addattrs", Json::array({Json{{"sched_weight", "300"}}, Json{{"rate_limit", "50"}}})}});
  REQUIRE_MESSAGE(r.value("ok", false), r.dump());
  Json s = h.Show(kA);
  CHECK(s["scheduler"]["weight"] == 300);
  CHECK(s["scheduler"]["rate_limit"] == 50);
  // Checked like the attribute file: a value out of range changes nothing.
  r = Control(h.control, Json{{"op", "modify"},
                              {"uuid", kA},
                              {"live", true},
                              {"addattrs", Json::array({Json{{"sched_weight", "0"}}})}});
  CHECK_FALSE(r.value("ok", true));
  CHECK(h.Show(kA)["scheduler"]["weight"] == 300);
  // Without --live, modify changes a definition, and a transient vGPU has none.
  r = Control(h.control, Json{{"op", "modify"}, {"uuid", kA}, {"addattrs", Json::array({Json{{"sched_weight", "200"}}})}});
  CHECK_FALSE(r.value("ok", true));
  CHECK(h.Show(kA)["scheduler"]["weight"] == 300);
}

TEST_CASE("--sched-concurrency 2: two busy tenants hold the engine at once, unpreempted; a third is served in turn") {
  constexpr const char* kC = "5c4e0000-0000-4000-8000-00000000000c";
  auto preemptions = [](Host& h, const char* u) { return h.Show(u)["scheduler"]["preemptions"].get<uint64_t>(); };
  const auto window = std::chrono::duration<double>(1.5 * SlowFactor());
  // The control: one grant at a time, so two busy tenants take turns by preemption.
  {
    Host h;
    Victim a(h.Start(kA, Json::array()), 1 << 14, 6, true);
    Victim b(h.Start(kB, Json::array()), 1 << 14, 6, true);
    std::this_thread::sleep_for(window);
    const uint64_t turns = preemptions(h, kA) + preemptions(h, kB);
    MESSAGE("one grant at a time: ", turns, " preemptions in ", window.count(), " s");
    CHECK(turns > 0);
    CheckVictim(a.Stop());
    CheckVictim(b.Stop());
  }
  Host h({"--sched-concurrency", "2"});
  Victim a(h.Start(kA, Json::array()), 1 << 14, 6, true);
  Victim b(h.Start(kB, Json::array()), 1 << 14, 6, true);
  std::this_thread::sleep_for(window);
  // Nobody ever waited: no preemption, and both are running (each holds a grant).
  CHECK(preemptions(h, kA) == 0);
  CHECK(preemptions(h, kB) == 0);
  CHECK(h.Show(kA)["scheduler"]["state"] == "running");
  CHECK(h.Show(kB)["scheduler"]["state"] == "running");
  const uint64_t a0 = h.GpuTimeNs(kA), b0 = h.GpuTimeNs(kB);
  std::this_thread::sleep_for(window);
  CHECK(h.GpuTimeNs(kA) > a0);  // both got device time side by side
  CHECK(h.GpuTimeNs(kB) > b0);
  // A third busy tenant waits for a grant: a holder yields for it, and it is served.
  Victim c(h.Start(kC, Json::array()), 1 << 14, 6, true);
  std::this_thread::sleep_for(window);
  const uint64_t c0 = h.GpuTimeNs(kC);
  std::this_thread::sleep_for(window);
  MESSAGE("three busy, two grants: A ", h.Show(kA)["scheduler"].dump(), "\nC ", h.Show(kC)["scheduler"].dump());
  CHECK(h.GpuTimeNs(kC) > c0);
  CHECK(preemptions(h, kA) + preemptions(h, kB) + preemptions(h, kC) > 0);
  CheckVictim(c.Stop());
  CheckVictim(a.Stop());
  CheckVictim(b.Stop());
}

TEST_CASE("--sched-concurrency 2: two busy holders at 100 and 400 still get about 1:4 of the work") {
  // Both hold a grant at once, so nobody waits: the weights are kept by lag (the one ahead
  // yields, and waits out a free grant while the other catches up). Judged by rounds
  // completed: the daemon's device time counts each holder's whole wall time on a device
  // that runs both side by side.
  Host h({"--sched-concurrency", "2", "--sched-idle-grace-us", "3000"});
  const TwoShares s = Shares(h, 4.0 * SlowFactor());
  REQUIRE(s.a_rounds > 0);
  const double ratio = static_cast<double>(s.b_rounds) / static_cast<double>(s.a_rounds);
  MESSAGE("rounds B / A = ", ratio, " (weights 400 / 100), preemptions A ",
          h.Show(kA)["scheduler"]["preemptions"].get<uint64_t>());
  // Without the lag rule both share the device as it shares itself: about 1.
  CHECK(ratio >= 2.5);
  CHECK(ratio <= 7.0);
}

TEST_CASE("a noisy neighbour cannot starve a quiet one") {
  // Same weight. The heavy tenant's rounds are big kernels (pieces of tens to hundreds of
  // ms) back to back; the quiet one submits small kernels and waits for each. It keeps
  // being served, its results bit-exact, and no round of it waits for more than a bounded
  // number of the heavy one's pieces.
  Host h;
  Victim heavy(h.Start(kB, Json::array({Json{{"sched_weight", "100"}}})), 1 << 16);
  Victim quiet(h.Start(kA, Json::array({Json{{"sched_weight", "100"}}})), 1024);
  const uint64_t q0 = quiet.rounds(), h0 = heavy.rounds();
  std::this_thread::sleep_for(std::chrono::duration<double>(4.0 * SlowFactor()));
  const uint64_t q1 = quiet.rounds(), h1 = heavy.rounds();
  Json qs = h.Show(kA)["scheduler"], hs = h.Show(kB)["scheduler"];
  VictimReport rq = quiet.Stop(), rh = heavy.Stop();
  CheckVictim(rq);
  CheckVictim(rh);
  MESSAGE("quiet: ", q1 - q0, " rounds, slowest ", rq.max_round_ms, " ms, ", qs.dump(), "\nheavy: ", h1 - h0,
          " rounds, slowest ", rh.max_round_ms, " ms, ", hs.dump());
  // The quiet tenant is charged only the little it uses, so its virtual time stays behind
  // and each of its requests is granted after at most the heavy tenant's current piece.
  CHECK(q1 - q0 >= 10);
  CHECK(rq.max_round_ms <= 5 * rh.max_round_ms + 100);
  // What each asks of a grant, as `vgpuctl show` reports it: a slice/16 to a slice. (Which
  // of the two asks less moves from moment to moment here: both end grants idle between
  // rounds, and both are preempted; scheduler_test checks what the order does with it.)
  for (const Json* j : {&qs, &hs}) {
    CHECK((*j)["request_ms"].get<double>() >= 0.125);
    CHECK((*j)["request_ms"].get<double>() <= 2.0);
  }
}

}  // namespace
}  // namespace vg::e2e
