// F7, coarsened time: everything a guest can read of time is coarsened to the host's
// granularity G (vgpud --time-granularity-us). This process is the guest of a real vgpud:
// it times its own fences, TIMESTAMPs and remoting replies with its own CLOCK_MONOTONIC, as
// a tenant who wants to time its neighbours' load would, and checks that it only ever sees
// steps of G: TIMESTAMP values are multiples of G, and the instant a completion becomes
// visible lies just after a multiple of G however the work itself was placed in the tick.
// With --time-granularity-us 0 (the study's setting) the same measurements are not
// quantized, which is what shows these tests can tell the difference.
#include <doctest.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <random>
#include <set>
#include <thread>

#include "guest/guest.h"
#include "guest/remoting_client.h"
#include "tests/e2e/guest_checks.h"
#include "tests/e2e/harness.h"

using namespace vg;
using namespace vg::e2e;
using namespace vg::guest;

namespace {

// Large beside the lateness of a loaded machine (a wake-up, a descheduled poller), so
// "just after the tick" is a clear band; small enough that a test takes a few seconds.
constexpr uint64_t kG = 20'000'000;  // 20 ms
constexpr int kSamples = 48;
// A completion counts as "at the tick" when it shows in the first quarter of the period:
// uniform phases (no coarsening) land there a quarter of the time.
constexpr uint64_t kBand = kG / 4;
constexpr double kAtTickShare = 0.75;

uint64_t NowNs() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

std::vector<std::string> GranularityFlag(uint64_t g_ns) {
  return {"--time-granularity-us", std::to_string(g_ns / 1000)};
}

// Sleeps a random part of a period, so the work is submitted at every phase of the tick.
void RandomPhase(std::mt19937& rng) {
  std::this_thread::sleep_for(std::chrono::nanoseconds(std::uniform_int_distribution<uint64_t>(0, kG - 1)(rng)));
}

double ShareAtTick(const std::vector<uint64_t>& visible) {
  size_t n = 0;
  for (uint64_t t : visible) n += t % kG < kBand;
  return static_cast<double>(n) / static_cast<double>(visible.size());
}

struct Guest {
  std::unique_ptr<Device> dev;
  std::unique_ptr<Driver> drv;
  explicit Guest(const std::string& socket) {
    dev = OpenGuest(socket, 16 << 20);
    auto r = Driver::Create(*dev);
    REQUIRE_MESSAGE(r.ok(), r.error().ToString());
    drv = std::move(r).value();
  }
};

// What the mediated guest saw: each submission's TIMESTAMP and the instant (its own clock)
// the fence showed in the status page.
struct MediatedRun {
  std::vector<uint64_t> timestamps, visible;
};

MediatedRun RunMediated(const Daemon& d, int samples, uint32_t seed) {
  Guest g(d.Socket(0));
  auto buf = g.drv->Alloc(64 << 10);
  auto ts = g.drv->Alloc(kPageSize);
  REQUIRE(buf.ok());
  REQUIRE(ts.ok());
  std::mt19937 rng(seed);
  MediatedRun run;
  uint64_t last_seen = 0;
  for (int i = 0; i < samples; ++i) {
    RandomPhase(rng);
    CommandBuilder cb;
    // GPU work, then TIMESTAMP: both the engine's completion and the host op are coarsened.
    cb.Fill(buf->va, 64 << 10, static_cast<uint32_t>(i)).Timestamp(ts->va);
    auto seq = g.drv->Submit(cb, /*irq=*/i % 2 == 0);
    REQUIRE_MESSAGE(seq.ok(), Why(seq.ok() ? Ok() : Result<>(seq.error())));
    // The guest's own clock on the status page: the finest view it has of the completion.
    const uint64_t deadline = NowNs() + 10'000'000'000ull;
    uint64_t seen = 0;
    while ((seen = g.drv->completed()) < *seq) {
      REQUIRE(NowNs() < deadline);
      std::this_thread::yield();
    }
    run.visible.push_back(NowNs());
    CHECK(seen >= last_seen);  // in order
    last_seen = seen;
    uint64_t t;
    std::memcpy(&t, ts->host.data(), 8);
    run.timestamps.push_back(t);
    CHECK(reinterpret_cast<const uint32_t*>(buf->host.data())[(16 << 10) - 1] == static_cast<uint32_t>(i));
    // Exactly once and in order, also as the fence interrupt and the wait say it.
    REQUIRE(g.drv->Wait(*seq, i % 2 == 0 ? WaitMode::kIrq : WaitMode::kPoll).ok());
  }
  CHECK(g.dev->Read32(abi::reg::kErrCount).value() == 0);
  return run;
}

std::string RemoteSocket(const Daemon& d) { return (d.dir() / (std::string(kUuidA) + ".remote.sock")).string(); }

// What the remoting guest saw: the instants its FENCE and its READ replies showed.
struct RemotingRun {
  std::vector<uint64_t> fences, reads;
};

RemotingRun RunRemoting(const Daemon& d, int samples, uint32_t seed) {
  RemotingOptions o;
  o.socket = RemoteSocket(d);
  auto c = RemotingClient::Connect(o);
  REQUIRE_MESSAGE(c.ok(), c.error().ToString());
  RemotingClient& rc = **c;
  auto buf = rc.CreateBuffer(64 << 10);
  REQUIRE(buf.ok());
  std::mt19937 rng(seed);
  RemotingRun run;
  for (int i = 0; i < samples; ++i) {
    RandomPhase(rng);
    REQUIRE(rc.Fill(*buf, 0, 64 << 10, static_cast<uint32_t>(i) + 1).ok());
    auto seq = rc.Submit();
    REQUIRE(seq.ok());
    const uint64_t deadline = NowNs() + 10'000'000'000ull;
    while (rc.completed() < *seq) {
      REQUIRE(NowNs() < deadline);
      std::this_thread::yield();
    }
    run.fences.push_back(NowNs());
    REQUIRE(rc.Wait(*seq).ok());
    if (i % 2 == 0) {
      // A READ after GPU work: its reply (data + reply_seq) is an answer too.
      RandomPhase(rng);
      REQUIRE(rc.Fill(*buf, 0, 64 << 10, 0x5eed0000u + static_cast<uint32_t>(i)).ok());
      uint32_t word = 0;
      REQUIRE(rc.Read(*buf, 4096, std::as_writable_bytes(std::span(&word, 1))).ok());
      run.reads.push_back(NowNs());
      CHECK(word == 0x5eed0000u + static_cast<uint32_t>(i));
    }
  }
  CHECK(rc.LastError().count == 0);
  return run;
}

}  // namespace

TEST_CASE("mediated: TIMESTAMP values are multiples of G and fences show only just after a tick") {
  Daemon d({std::string(kUuidA) + ":small"}, GranularityFlag(kG));
  REQUIRE(d.Alive());
  MediatedRun run = RunMediated(d, kSamples, 7);
  for (size_t i = 0; i < run.timestamps.size(); ++i) {
    CAPTURE(i);
    CHECK(run.timestamps[i] % kG == 0);
    // The value is the tick the fence after it was held to: never after the guest saw it.
    CHECK(run.timestamps[i] <= run.visible[i]);
  }
  const double share = ShareAtTick(run.visible);
  MESSAGE("mediated fences visible within G/4 after a tick: " << share);
  CHECK(share >= kAtTickShare);
  CHECK(d.Shutdown() == 0);
}

TEST_CASE("remoting: FENCE and READ replies show only just after a tick") {
  Daemon d({std::string(kUuidA) + ":small"}, GranularityFlag(kG));
  REQUIRE(d.Alive());
  RemotingRun run = RunRemoting(d, kSamples, 11);
  const double fences = ShareAtTick(run.fences), reads = ShareAtTick(run.reads);
  MESSAGE("remoting fences visible within G/4 after a tick: " << fences << ", reads: " << reads);
  CHECK(fences >= kAtTickShare);
  CHECK(reads >= kAtTickShare);
  CHECK(d.Shutdown() == 0);
}

TEST_CASE("completions due at the same tick show together: a burst is not spread one per tick") {
  Daemon d({std::string(kUuidA) + ":small"}, GranularityFlag(kG));
  Guest g(d.Socket(0));
  auto buf = g.drv->Alloc(4096);
  REQUIRE(buf.ok());
  // 24 small plans at once, each done on the engine in well under a tick. While a fence is
  // held for its tick the executor's depth (4) bounds the submissions behind it, so about 4
  // plans show per tick: 6 or 7 ticks in all, in order, each value exactly once; held one
  // tick each they would take 24.
  constexpr int kBurst = 24;
  uint64_t last = 0;
  for (int i = 0; i < kBurst; ++i) {
    CommandBuilder cb;
    cb.Fill(buf->va, 4096, static_cast<uint32_t>(i));
    auto seq = g.drv->Submit(cb, /*irq=*/false);
    REQUIRE(seq.ok());
    last = *seq;
  }
  std::set<uint64_t> ticks;
  uint64_t prev = 0;
  const uint64_t deadline = NowNs() + 10'000'000'000ull;
  while (prev < last) {
    REQUIRE(NowNs() < deadline);
    const uint64_t v = g.drv->completed();
    if (v != prev) {
      CHECK(v > prev);
      ticks.insert(NowNs() / kG);
      prev = v;
    }
    std::this_thread::yield();
  }
  MESSAGE(kBurst << " fences showed in " << ticks.size() << " ticks");
  CHECK(ticks.size() <= kBurst / 3);
  CHECK(reinterpret_cast<const uint32_t*>(buf->host.data())[1023] == kBurst - 1);
  CHECK(g.dev->Read32(abi::reg::kErrCount).value() == 0);
}

TEST_CASE("--time-granularity-us 0 turns coarsening off: time is the engine's own") {
  Daemon d({std::string(kUuidA) + ":small"}, GranularityFlag(0));
  REQUIRE(d.Alive());
  MediatedRun med = RunMediated(d, kSamples, 7);
  // Raw CLOCK_MONOTONIC nanoseconds: not all of them multiples of even a microsecond.
  CHECK(std::any_of(med.timestamps.begin(), med.timestamps.end(), [](uint64_t t) { return t % 1000 != 0; }));
  const double med_share = ShareAtTick(med.visible);
  RemotingRun rem = RunRemoting(d, kSamples, 11);
  const double rem_share = ShareAtTick(rem.fences);
  MESSAGE("off: visible within G/4 after a multiple of G: mediated " << med_share << ", remoting " << rem_share);
  // Uniform phases: about a quarter. Far below what coarsening gives.
  CHECK(med_share < kAtTickShare);
  CHECK(rem_share < kAtTickShare);
  CHECK(d.Shutdown() == 0);
}
