// The pipelined executor (F12 item 1): plans overlap on the engine, yet fences complete in
// order and exactly once, and whatever the host writes into guest memory (a FENCE, a
// TIMESTAMP, a gathered range scattered back) is seen by every later engine access of the
// same bytes. Run against the real engine (lavapipe by default) and real memfd guest memory.
#include <doctest/doctest.h>

#include <cstring>
#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>
#include <vector>

#include "engine/engine.h"
#include "mediator/executor.h"
#include "vfio_user/dma.h"

namespace vg::mediator {
namespace {

namespace vu = vfio_user;

constexpr uint64_t kMemBytes = 8ull << 20;
constexpr Gpa kAt{0x4000'0000};

engine::Engine* SharedEngine() {
  // One engine for the process, as a worker has.
  static auto engine = engine::Engine::Create();
  REQUIRE_MESSAGE(engine.ok(), engine.error().ToString());
  return engine->get();
}

struct Guest {
  UniqueFd fd;
  Mapping map;
  vu::DmaSpace dma;
  Guest() {
    fd = std::move(CreateMemFd("guest", ByteSize{kMemBytes}).value());
    map = std::move(Mapping::Map(fd, ByteSize{kMemBytes}, 0).value());
    REQUIRE(dma.Map({kAt, ByteSize{kMemBytes}, 0, vu::kDmaRead | vu::kDmaWrite}, fd.Dup().value()).ok());
  }
  template <class T>
  T At(uint64_t off) const {
    T v;
    std::memcpy(&v, map.data() + off, sizeof v);
    return v;
  }
};

// A range of guest memory at `off`: one span, or one span per `pages` scattered 4 KiB pages
// (every other page), which the executor must gather.
ResolvedRange Range(uint64_t off, uint64_t size, bool write, int scattered_pages = 0) {
  ResolvedRange r;
  r.va = GpuVa{0x100000 + off};
  r.size = ByteSize{size};
  r.write = write;
  if (scattered_pages == 0) {
    r.spans.push_back(GttSpan{r.va, GttTarget{false, kAt.v + off, write}, r.size});
  } else {
    REQUIRE(size == uint64_t(scattered_pages) * 4096);
    for (int i = 0; i < scattered_pages; ++i)
      r.spans.push_back(GttSpan{GpuVa{r.va.v + uint64_t(i) * 4096},
                                GttTarget{false, kAt.v + off + uint64_t(i) * 8192, write}, ByteSize{4096}});
  }
  return r;
}

struct Recorder {
  std::mutex mu;
  std::vector<uint64_t> fences;
  std::vector<std::string> failures;
  ExecHooks Hooks() {
    return ExecHooks{[this](uint64_t v, bool) {
                       std::lock_guard lk(mu);
                       fences.push_back(v);
                     },
                     [](uint32_t, uint32_t) {},
                     [this](const Error& e) {
                       std::lock_guard lk(mu);
                       failures.push_back(e.ToString());
                     },
                     {}};
  }
};

constexpr uint64_t kFenceOff = 0x1000;
constexpr uint64_t kCopyDstOff = 0x3000;
constexpr uint64_t kBigOff = 4ull << 20;  // 2 MiB a slow FILL writes

Plan StreamPlan(uint64_t i) {
  Plan p;
  p.ops.push_back(PlanFill{Range(0x10000 + (i % 64) * 256, 256, true), static_cast<uint32_t>(i)});
  p.ops.push_back(PlanFence{Range(kFenceOff, 8, true), i, true});
  return p;
}

void CheckInOrderOnce(Recorder& rec, uint64_t n) {
  std::lock_guard lk(rec.mu);
  REQUIRE(rec.fences.size() == n);
  for (uint64_t i = 0; i < n; ++i) REQUIRE_MESSAGE(rec.fences[i] == i + 1, "fence #", i, " out of order");
  CHECK(rec.failures.empty());
}

TEST_CASE("pipelined: a stream overlaps on the engine, fences complete in order and exactly once") {
  Guest g;
  Recorder rec;
  std::vector<std::byte> aperture(1 << 20);
  Executor exec(SharedEngine(), g.dma, aperture, {}, rec.Hooks(), ExecOptions{4});
  constexpr uint64_t kPlans = 600;
  for (uint64_t i = 1; i <= kPlans; ++i) {
    // The queue holds 256 plans at most: wait for room the way a guest waits for its ring.
    while (!exec.Admit().ok()) std::this_thread::yield();
    REQUIRE(exec.Enqueue(StreamPlan(i)).ok());
  }
  exec.WaitIdle();
  CheckInOrderOnce(rec, kPlans);
  CHECK(g.At<uint64_t>(kFenceOff) == kPlans);
  for (uint64_t i = kPlans - 63; i <= kPlans; ++i)
    CHECK(g.At<uint32_t>(0x10000 + (i % 64) * 256) == static_cast<uint32_t>(i));
  ExecCounters c = exec.Counters();
  MESSAGE("engine submissions ", c.engine_submissions, ", most in flight at once ", c.max_in_flight, ", drains ",
          c.drains);
  CHECK(c.plans == kPlans);
  CHECK_MESSAGE(c.max_in_flight > 1, "no two submissions were ever in flight together: not pipelined");
  CHECK(c.max_in_flight <= 4);
  CHECK(c.drains == 0);  // the fence page is apart from the filled ranges: no hazard
}

TEST_CASE("pipelined: depth 1 is the serial executor") {
  Guest g;
  Recorder rec;
  std::vector<std::byte> aperture(1 << 20);
  Executor exec(SharedEngine(), g.dma, aperture, {}, rec.Hooks(), ExecOptions{1});
  for (uint64_t i = 1; i <= 100; ++i) REQUIRE(exec.Enqueue(StreamPlan(i)).ok());
  exec.WaitIdle();
  CheckInOrderOnce(rec, 100);
  CHECK(exec.Counters().max_in_flight == 1);
}

TEST_CASE("pipelined: a FENCE write is seen by the next plan's COPY of the same bytes") {
  // Plan A: a slow FILL, then FENCE(v) into X. Plan B: COPY X -> Y. B's COPY must not run
  // before A's fence write lands (the host writes it only once A's FILL has completed), so
  // Y holds v every time; a missing hazard check shows up as a stale Y.
  Guest g;
  Recorder rec;
  std::vector<std::byte> aperture(1 << 20);
  Executor exec(SharedEngine(), g.dma, aperture, {}, rec.Hooks(), ExecOptions{4});
  for (uint64_t v = 1; v <= 40; ++v) {
    Plan a;
    a.ops.push_back(PlanFill{Range(kBigOff, 2ull << 20, true), static_cast<uint32_t>(v)});
    a.ops.push_back(PlanFence{Range(kFenceOff, 8, true), v * 0x1'0000'0001ull, false});
    Plan b;
    b.ops.push_back(PlanCopy{Range(kFenceOff, 8, false), Range(kCopyDstOff, 8, true)});
    b.ops.push_back(PlanFence{Range(kFenceOff + 8, 8, true), v, false});
    REQUIRE(exec.Enqueue(std::move(a)).ok());
    REQUIRE(exec.Enqueue(std::move(b)).ok());
    exec.WaitIdle();
    REQUIRE_MESSAGE(g.At<uint64_t>(kCopyDstOff) == v * 0x1'0000'0001ull, "round ", v,
                    ": the COPY ran before the FENCE it follows had written its bytes");
  }
  // How often B actually had to wait depends on whether A's FILL was still running when B
  // was submitted (timing); the values above are what must hold either way.
  MESSAGE("submissions that waited for a pending host write: ", exec.Counters().drains, " of 40");
  std::lock_guard lk(rec.mu);
  CHECK(rec.failures.empty());
}

TEST_CASE("pipelined: a gathered range scattered back is seen by the next plan's zero-copy read") {
  // Plan A fills a range of scattered pages (gathered into an engine buffer, scattered back
  // when A retires); plan B copies its first page, imported in place. B must see A's bytes.
  Guest g;
  Recorder rec;
  std::vector<std::byte> aperture(1 << 20);
  Executor exec(SharedEngine(), g.dma, aperture, {}, rec.Hooks(), ExecOptions{4});
  for (uint32_t v = 1; v <= 30; ++v) {
    Plan a;
    a.ops.push_back(PlanFill{Range(0x200000, 4 * 4096, true, 4), v});
    Plan b;
    b.ops.push_back(PlanCopy{Range(0x200000, 64, false), Range(kCopyDstOff, 64, true)});
    REQUIRE(exec.Enqueue(std::move(a)).ok());
    REQUIRE(exec.Enqueue(std::move(b)).ok());
    exec.WaitIdle();
    REQUIRE_MESSAGE(g.At<uint32_t>(kCopyDstOff) == v, "round ", v, ": the COPY read the page before the scatter");
    REQUIRE(g.At<uint32_t>(0x200000 + 3 * 8192) == v);  // the last scattered page
  }
  CHECK(exec.Counters().bytes_gathered > 0);
  std::lock_guard lk(rec.mu);
  CHECK(rec.failures.empty());
}

TEST_CASE("pipelined: after Cancel returns no fence of the cancelled work runs, and later work still does") {
  Guest g;
  Recorder rec;
  std::vector<std::byte> aperture(1 << 20);
  Executor exec(SharedEngine(), g.dma, aperture, {}, rec.Hooks(), ExecOptions{4});
  for (uint64_t i = 1; i <= 200; ++i) REQUIRE(exec.Enqueue(StreamPlan(i)).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(2));
  exec.Cancel();
  size_t seen;
  {
    std::lock_guard lk(rec.mu);
    seen = rec.fences.size();
  }
  exec.WaitIdle();
  {
    std::lock_guard lk(rec.mu);
    CHECK_MESSAGE(rec.fences.size() == seen, "a fence of cancelled work ran after Cancel returned");
    for (size_t i = 0; i < rec.fences.size(); ++i) REQUIRE(rec.fences[i] == i + 1);
  }
  REQUIRE(exec.Enqueue(StreamPlan(1000)).ok());
  exec.WaitIdle();
  std::lock_guard lk(rec.mu);
  REQUIRE(!rec.fences.empty());
  CHECK(rec.fences.back() == 1000);
}

TEST_CASE("pipelined: Cancel(after) runs its task once every submission in flight has ended") {
  Guest g;
  Recorder rec;
  std::vector<std::byte> aperture(1 << 20);
  Executor exec(SharedEngine(), g.dma, aperture, {}, rec.Hooks(), ExecOptions{4});
  for (int round = 0; round < 5; ++round) {
    for (uint64_t i = 1; i <= 50; ++i) {
      Plan p;
      p.ops.push_back(PlanFill{Range(kBigOff, 2ull << 20, true), static_cast<uint32_t>(i)});
      REQUIRE(exec.Enqueue(std::move(p)).ok());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    std::atomic<bool> ran{false};
    uint32_t after_value = 0;
    bool in_flight = exec.Cancel([&] {
      // The engine has let go of the memory: what we read now stays.
      after_value = g.At<uint32_t>(kBigOff);
      std::memset(g.map.data() + kBigOff, 0, 2ull << 20);
      ran = true;
    });
    exec.WaitIdle();
    if (in_flight) {
      CHECK(ran.load());
      CHECK(g.At<uint32_t>(kBigOff + (2ull << 20) - 4) == 0);  // nothing wrote after the scrub
    }
    (void)after_value;
  }
}

TEST_CASE("coalescing: a saturated stream shares engine submissions; fences stay in order and exactly once") {
  constexpr uint64_t kPlans = 600;
  for (bool coalesce : {true, false}) {
    CAPTURE(coalesce);
    Guest g;
    Recorder rec;
    std::vector<std::byte> aperture(1 << 20);
    Executor exec(SharedEngine(), g.dma, aperture, {}, rec.Hooks(), ExecOptions{4, coalesce});
    // Queued faster than the engine runs them (a slow FILL first), so the engine saturates.
    Plan slow;
    slow.ops.push_back(PlanFill{Range(kBigOff, 2ull << 20, true), 7});
    REQUIRE(exec.Enqueue(std::move(slow)).ok());
    for (uint64_t i = 1; i <= kPlans; ++i) {
      while (!exec.Admit().ok()) std::this_thread::yield();
      REQUIRE(exec.Enqueue(StreamPlan(i)).ok());
    }
    exec.WaitIdle();
    CheckInOrderOnce(rec, kPlans);
    for (uint64_t i = kPlans - 63; i <= kPlans; ++i)
      CHECK(g.At<uint32_t>(0x10000 + (i % 64) * 256) == static_cast<uint32_t>(i));
    ExecCounters c = exec.Counters();
    MESSAGE("coalesce ", coalesce, ": ", c.plans, " plans in ", c.engine_submissions, " engine submissions, ",
            c.plans_coalesced, " coalesced");
    CHECK(c.plans == kPlans + 1);
    if (coalesce) {
      CHECK_MESSAGE(c.plans_coalesced > 0, "no plan ever joined another's submission");
      CHECK(c.engine_submissions + c.plans_coalesced == kPlans + 1);
    } else {
      CHECK(c.plans_coalesced == 0);
      CHECK(c.engine_submissions == kPlans + 1);
    }
  }
}

TEST_CASE("coalescing: a FENCE that follows an open batch is seen by the next plan's COPY of its bytes") {
  // The engine is saturated by slow FILLs, so plan A (FILL, FENCE v into X) is held open
  // and plan B (COPY X -> Y) would join it: B's COPY must still run after A's fence write.
  Guest g;
  Recorder rec;
  std::vector<std::byte> aperture(1 << 20);
  Executor exec(SharedEngine(), g.dma, aperture, {}, rec.Hooks(), ExecOptions{4});
  for (uint64_t v = 1; v <= 20; ++v) {
    for (int k = 0; k < 4; ++k) {
      Plan slow;
      slow.ops.push_back(PlanFill{Range(kBigOff, 2ull << 20, true), static_cast<uint32_t>(v)});
      REQUIRE(exec.Enqueue(std::move(slow)).ok());
    }
    Plan a;
    a.ops.push_back(PlanFill{Range(0x10000, 256, true), static_cast<uint32_t>(v)});
    a.ops.push_back(PlanFence{Range(kFenceOff, 8, true), v * 0x1'0000'0001ull, false});
    Plan b;
    b.ops.push_back(PlanCopy{Range(kFenceOff, 8, false), Range(kCopyDstOff, 8, true)});
    b.ops.push_back(PlanFence{Range(kFenceOff + 8, 8, true), v, false});
    REQUIRE(exec.Enqueue(std::move(a)).ok());
    REQUIRE(exec.Enqueue(std::move(b)).ok());
    exec.WaitIdle();
    REQUIRE_MESSAGE(g.At<uint64_t>(kCopyDstOff) == v * 0x1'0000'0001ull, "round ", v,
                    ": the COPY ran before the FENCE it follows had written its bytes");
  }
  MESSAGE("plans coalesced ", exec.Counters().plans_coalesced, ", drains ", exec.Counters().drains);
  CHECK_MESSAGE(exec.Counters().plans_coalesced > 0, "the engine never saturated: the case was not exercised");
  std::lock_guard lk(rec.mu);
  CHECK(rec.failures.empty());
}

TEST_CASE("a gathered range is seen by a later command of the same plan") {
  // FILL scattered pages (gathered into an engine buffer, scattered back after), then COPY
  // from them in the same plan: the COPY must read the filled bytes, whether its source is
  // imported in place (one page) or gathered again (all of them).
  Guest g;
  Recorder rec;
  std::vector<std::byte> aperture(1 << 20);
  Executor exec(SharedEngine(), g.dma, aperture, {}, rec.Hooks(), ExecOptions{4});
  for (uint32_t v = 1; v <= 10; ++v) {
    Plan p;
    p.ops.push_back(PlanFill{Range(0x200000, 4 * 4096, true, 4), v});
    p.ops.push_back(PlanCopy{Range(0x200000, 64, false), Range(kCopyDstOff, 64, true)});
    p.ops.push_back(PlanCopy{Range(0x200000, 4 * 4096, false, 4), Range(0x300000, 4 * 4096, true, 4)});
    REQUIRE(exec.Enqueue(std::move(p)).ok());
    exec.WaitIdle();
    REQUIRE_MESSAGE(g.At<uint32_t>(kCopyDstOff) == v, "round ", v, ": the in-place COPY read before the scatter");
    REQUIRE_MESSAGE(g.At<uint32_t>(0x300000 + 3 * 8192 + 4092) == v, "round ", v,
                    ": the gathered COPY read before the scatter");
  }
  // And the other way round: an in-place FILL, then a COPY that gathers the same page.
  for (uint32_t v = 100; v <= 110; ++v) {
    Plan p;
    p.ops.push_back(PlanFill{Range(0x200000, 64, true), v});
    p.ops.push_back(PlanCopy{Range(0x200000, 4 * 4096, false, 4), Range(0x300000, 4 * 4096, true, 4)});
    REQUIRE(exec.Enqueue(std::move(p)).ok());
    exec.WaitIdle();
    REQUIRE_MESSAGE(g.At<uint32_t>(0x300000) == v, "round ", v, ": the gather read before the in-place FILL ran");
  }
  std::lock_guard lk(rec.mu);
  CHECK(rec.failures.empty());
}

}  // namespace
}  // namespace vg::mediator
