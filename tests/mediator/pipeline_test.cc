// The pipelined executor (F12 item 1): plans overlap on the engine, yet fences complete in
// order and exactly once, and whatever the host writes into guest memory (a FENCE, a
// TIMESTAMP, a gathered range scattered back) is seen by every later engine access of the
// same bytes. Run against the real engine (lavapipe by default) and real memfd guest memory.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <chrono>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "engine/engine.h"
#include "mediator/executor.h"
#include "shaders/samples.h"
#include "vfio_user/dma.h"

namespace vg::mediator {
namespace {

namespace vu = vfio_user;

// Room for a FILL of two shared budgets past 2 MiB on a device of up to 16 lanes (the
// budget is 1 MiB a lane, engine::DeviceInfo::parallel_groups); sparse until touched.
constexpr uint64_t kMemBytes = 40ull << 20;
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
  std::vector<std::thread::id> fence_threads;  // the thread each fence completed on
  std::vector<std::string> failures;
  ExecHooks Hooks() {
    return ExecHooks{[this](uint64_t v, bool) {
                       std::lock_guard lk(mu);
                       fences.push_back(v);
                       fence_threads.push_back(std::this_thread::get_id());
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

TEST_CASE("pipelined: a plan cancelled before its first piece does not take the next plan's work down with it") {
  // Found by lifecycle_hygiene (a guest killed as it submitted, the disconnect's Cancel
  // coming while its DISPATCH waited to gather a binding): the DISPATCH had named its plan
  // in the open batch before packing a piece, so the batch stayed empty with the cancelled
  // plan at its head; the next plan's work was packed behind it, the batch was dropped
  // whole as cancelled, and that plan's FENCE still came, over work that never ran.
  struct HoldGate : engine::SubmitGate {
    std::atomic<bool> open{false};
    bool Admit(const engine::Submission&) override { return open.load(); }
    void Ran(uint64_t, bool, uint64_t) override {}
  } gate;
  auto held = engine::Engine::Create();
  REQUIRE(held.ok());
  (*held)->SetGate(&gate);
  Guest g;
  Recorder rec;
  std::vector<std::byte> aperture(1 << 20);
  Executor exec(held->get(), g.dma, aperture, {}, rec.Hooks(), ExecOptions{4});
  // Engine work the gate holds: a gather behind it waits for it to retire.
  Plan first;
  first.ops.push_back(PlanFill{Range(0x10000, 256, true), 1});
  REQUIRE(exec.Enqueue(std::move(first)).ok());
  // A DISPATCH with gathered bindings: its plan waits in that drain.
  const shaders::KernelSample k = shaders::MakeSample(shaders::KernelId::kCopy, 1024, 3);
  Plan doomed;
  PlanDispatch d{k.kernel, k.groups, {}, k.push};
  for (size_t i = 0; i < k.bindings.size(); ++i) d.bindings.push_back(Range(0x20000 + i * 0x4000, 2 * 4096, true, 2));
  doomed.ops.push_back(std::move(d));
  REQUIRE(exec.Enqueue(std::move(doomed)).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // in the drain by now
  exec.Cancel();
  // The next connection's first plan: a FILL and its fence.
  Plan next;
  next.ops.push_back(PlanFill{Range(0x30000, 256, true), 0x77});
  next.ops.push_back(PlanFence{Range(kFenceOff, 8, true), 2, true});
  REQUIRE(exec.Enqueue(std::move(next)).ok());
  gate.open = true;
  (*held)->Pump();
  exec.WaitIdle();
  std::lock_guard lk(rec.mu);
  REQUIRE(rec.fences == std::vector<uint64_t>{2});
  CHECK_MESSAGE(g.At<uint32_t>(0x30000) == 0x77u, "the fence came, but the FILL before it never ran");
  CHECK(g.At<uint32_t>(0x30000 + 252) == 0x77u);
  CHECK(rec.failures.empty());
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

// --- inline completion (ExecOptions::inline_complete) ---
// A plan of host ops only, queued while the executor is idle, completes on the thread that
// queued it (Enqueue with InlineOk::kYes, then RunHeld), as the worker's loop does.

constexpr ExecOptions kInline{4, true, 0, true};  // time coarsening off: inline completion applies

Plan FenceOnly(uint64_t v, uint64_t off = kFenceOff) {
  Plan p;
  p.ops.push_back(PlanFence{Range(off, 8, true), v, true});
  return p;
}

// Enqueues as the loop does: held plans complete here. Returns whether it was held.
bool EnqueueAsLoop(Executor& exec, Plan p) {
  Result<bool> held = exec.Enqueue(std::move(p), InlineOk::kYes);
  REQUIRE(held.ok());
  if (*held) exec.RunHeld();
  return *held;
}

TEST_CASE("inline completion: a host-op plan to an idle executor completes on the caller's thread, once") {
  Guest g;
  Recorder rec;
  std::vector<std::byte> aperture(1 << 20);
  Executor exec(SharedEngine(), g.dma, aperture, {}, rec.Hooks(), kInline);
  // Held, not run, until RunHeld: nothing completes behind the caller's back.
  Result<bool> held = exec.Enqueue(FenceOnly(1), InlineOk::kYes);
  REQUIRE(held.ok());
  REQUIRE(*held);
  {
    std::lock_guard lk(rec.mu);
    CHECK(rec.fences.empty());
  }
  CHECK(!exec.Idle());
  exec.RunHeld();
  exec.RunHeld();  // nothing held: a no-op
  {
    std::lock_guard lk(rec.mu);
    REQUIRE(rec.fences == std::vector<uint64_t>{1});
    CHECK(rec.fence_threads[0] == std::this_thread::get_id());
  }
  CHECK(g.At<uint64_t>(kFenceOff) == 1);
  CHECK(exec.Idle());
  // A fence into the aperture, a LOAD_REG and a TIMESTAMP: inline too.
  Plan mixed;
  ResolvedRange ap;
  ap.va = GpuVa{0x900000};
  ap.size = ByteSize{8};
  ap.write = true;
  ap.spans.push_back(GttSpan{ap.va, GttTarget{true, 0x100, true}, ap.size});
  mixed.ops.push_back(PlanLoadReg{0x40, 1});
  mixed.ops.push_back(PlanTimestamp{Range(kFenceOff + 16, 8, true)});
  mixed.ops.push_back(PlanFence{ap, 2, true});
  CHECK(EnqueueAsLoop(exec, std::move(mixed)));
  uint64_t in_aperture = 0;
  std::memcpy(&in_aperture, aperture.data() + 0x100, 8);
  CHECK(in_aperture == 2);
  CHECK(g.At<uint64_t>(kFenceOff + 16) != 0);
  // More host ops than kMaxInlineHostOps, engine work, or InlineOk::kNo: the threads' way.
  Plan many;
  for (uint64_t i = 0; i <= kMaxInlineHostOps; ++i) many.ops.push_back(PlanFence{Range(kFenceOff, 8, true), 3, false});
  CHECK(!EnqueueAsLoop(exec, std::move(many)));
  exec.WaitIdle();
  Plan host_then_engine;  // engine work behind a host op: neither completed nor submitted inline
  host_then_engine.ops.push_back(PlanFence{Range(kFenceOff, 8, true), 4, true});
  host_then_engine.ops.push_back(PlanFill{Range(0x10000, 256, true), 4});
  CHECK(!EnqueueAsLoop(exec, std::move(host_then_engine)));
  exec.WaitIdle();
  REQUIRE(exec.Enqueue(FenceOnly(5)).ok());
  exec.WaitIdle();
  {
    std::lock_guard lk(rec.mu);
    REQUIRE(rec.fences.size() == 2 + kMaxInlineHostOps + 1 + 2);
    CHECK(rec.fences.back() == 5);
    CHECK(rec.fence_threads.back() != std::this_thread::get_id());
  }
  // What is queued behind a held plan (another thread's pass) waits for it.
  held = exec.Enqueue(FenceOnly(6), InlineOk::kYes);
  REQUIRE(held.ok());
  REQUIRE(*held);
  REQUIRE(exec.Enqueue(FenceOnly(7)).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  {
    std::lock_guard lk(rec.mu);
    CHECK_MESSAGE(rec.fences.back() == 5, "a plan queued behind a held one completed first");
  }
  exec.RunHeld();
  exec.WaitIdle();
  std::lock_guard lk(rec.mu);
  REQUIRE(rec.fences.size() == 2 + kMaxInlineHostOps + 1 + 4);
  CHECK(rec.fences[rec.fences.size() - 2] == 6);
  CHECK(rec.fences.back() == 7);
  CHECK(exec.Counters().plans_inline == 3);
  CHECK(rec.failures.empty());
}

// --- inline submission (ExecOptions::inline_submit) ---
// A plan whose little engine work uses memory already imported, queued while the executor is
// idle, is submitted by the thread that queued it; the retire thread completes it, in order
// and once. Whatever would make that thread wait hands the untouched plan to the threads.

TEST_CASE("inline submission: engine work on imported memory is submitted by the caller; anything that would wait goes to the threads") {
  Guest g;
  Recorder rec;
  std::vector<std::byte> aperture(1 << 20);
  Executor exec(SharedEngine(), g.dma, aperture, {}, rec.Hooks(), kInline);
  uint64_t seq = 0;
  auto fenced_fill = [&](uint64_t off, uint64_t size) {
    Plan p;
    p.ops.push_back(PlanFill{Range(off, size, true), static_cast<uint32_t>(seq + 1)});
    p.ops.push_back(PlanFence{Range(kFenceOff, 8, true), ++seq, true});
    return p;
  };
  auto submitted_inline = [&] { return exec.Counters().plans_inline_submitted; };
  // The first use of the window imports it: the caller may not, so the threads run it.
  CHECK(EnqueueAsLoop(exec, fenced_fill(0x10000, 256)));
  exec.WaitIdle();
  CHECK(submitted_inline() == 0);
  CHECK(exec.Counters().import_misses >= 1);
  CHECK(g.At<uint32_t>(0x10000) == 1);
  // Imported now: submitted here, completed by the retire thread (the fence is not this
  // thread's), and the FILL ran before the fence was written.
  for (int i = 0; i < 20; ++i) {
    CHECK(EnqueueAsLoop(exec, fenced_fill(0x10000 + uint64_t(i) * 256, 256)));
    exec.WaitIdle();
    REQUIRE(g.At<uint32_t>(0x10000 + uint64_t(i) * 256) == seq);
    REQUIRE(g.At<uint64_t>(kFenceOff) == seq);
  }
  CHECK(submitted_inline() == 20);
  {
    // The retire thread writes a fence behind engine work. The caller may write it itself
    // only when the submission has already retired before the caller queues the fence
    // (PushRetire with nothing retiring: the FILL is done, the order holds), which a loaded
    // host makes happen now and then (the engine's completion thread wakes at once, base/cpu_slice.h): so
    // not every one, but never all of them.
    std::lock_guard lk(rec.mu);
    REQUIRE(rec.fence_threads.size() >= 20);
    const auto here = std::count(rec.fence_threads.end() - 20, rec.fence_threads.end(), std::this_thread::get_id());
    CHECK(here < 20);
  }
  // More than one engine submission's worth (a shared engine cuts a FILL of twice its
  // budget into two pieces or more): handed back whole, and run once.
  {
    struct SharedGate : engine::SubmitGate {
      bool Admit(const engine::Submission&) override { return true; }
      void Ran(uint64_t, bool, uint64_t) override {}
      bool PrefersSmallSubmissions() const override { return true; }
    } gate;
    auto shared = engine::Engine::Create();
    REQUIRE(shared.ok());
    (*shared)->SetGate(&gate);
    Recorder rec3;
    Executor small(shared->get(), g.dma, aperture, {}, rec3.Hooks(), kInline);
    auto plan = [&](uint64_t off, uint64_t size, uint64_t v) {
      Plan p;
      p.ops.push_back(PlanFill{Range(off, size, true), static_cast<uint32_t>(v)});
      p.ops.push_back(PlanFence{Range(kFenceOff + 64, 8, true), v, true});
      return p;
    };
    CHECK(EnqueueAsLoop(small, plan(0x200000, 4096, 1)));  // imports the window
    small.WaitIdle();
    CHECK(EnqueueAsLoop(small, plan(0x200000, 4096, 2)));
    small.WaitIdle();
    CHECK(small.Counters().plans_inline_submitted == 1);
    const uint64_t big = 2 * SubmissionBudget(true, (*shared)->Info().parallel_groups);
    REQUIRE(0x200000 + big <= kMemBytes);
    CHECK(EnqueueAsLoop(small, plan(0x200000, big, 3)));
    small.WaitIdle();
    CHECK(small.Counters().plans_inline_submitted == 1);
    CHECK(small.Counters().engine_submissions >= 4);
    CHECK(g.At<uint32_t>(0x200000) == 3);
    CHECK(g.At<uint32_t>(0x200000 + big - 4) == 3);
    CheckInOrderOnce(rec3, 3);
  }
  // Scattered memory (a gather), too many engine ops, or engine work after a host op: never held.
  Plan scattered;
  scattered.ops.push_back(PlanFill{Range(0x20000, 2 * 4096, true, 2), 7});
  CHECK(!EnqueueAsLoop(exec, std::move(scattered)));
  Plan many;
  for (size_t i = 0; i <= kMaxInlineGpuOps; ++i) many.ops.push_back(PlanFill{Range(0x10000, 256, true), 9});
  CHECK(!EnqueueAsLoop(exec, std::move(many)));
  exec.WaitIdle();
  // Behind work still running (not idle): queued, not held.
  for (int i = 0; i < 4; ++i) REQUIRE(exec.Enqueue(fenced_fill(0x10000, 256)).ok());
  Result<bool> behind = exec.Enqueue(fenced_fill(0x10000, 256), InlineOk::kYes);
  REQUIRE(behind.ok());
  if (*behind) exec.RunHeld();  // the four may all have retired already
  exec.WaitIdle();
  CheckInOrderOnce(rec, seq);
  CHECK(submitted_inline() <= 21);
  // Off: nothing is submitted by the caller.
  Guest g2;
  Recorder rec2;
  Executor off(SharedEngine(), g2.dma, aperture, {}, rec2.Hooks(), ExecOptions{4, true, 0, true, false});
  for (int i = 0; i < 3; ++i) {
    Plan p;
    p.ops.push_back(PlanFill{Range(0x10000, 256, true), 1});
    p.ops.push_back(PlanFence{Range(kFenceOff, 8, true), uint64_t(i) + 1, true});
    EnqueueAsLoop(off, std::move(p));
    off.WaitIdle();
  }
  CHECK(off.Counters().plans_inline_submitted == 0);
  CheckInOrderOnce(rec2, 3);
}

TEST_CASE("inline submission: with time coarsening, and cancelled while its work runs") {
  Guest g;
  Recorder rec;
  std::vector<std::byte> aperture(1 << 20);
  // Coarsened: completion stays the retire thread's, submission may still be the caller's.
  Executor exec(SharedEngine(), g.dma, aperture, {}, rec.Hooks(), ExecOptions{4, true, 1'000'000, true, true});
  for (uint64_t i = 1; i <= 3; ++i) {
    Plan p;
    p.ops.push_back(PlanFill{Range(0x10000, 256, true), static_cast<uint32_t>(i)});
    p.ops.push_back(PlanFence{Range(kFenceOff, 8, true), i, true});
    EnqueueAsLoop(exec, std::move(p));
    exec.WaitIdle();
  }
  CHECK(exec.Counters().plans_inline_submitted == 2);  // the first imported the window
  CHECK(exec.Counters().plans_inline == 0);
  CheckInOrderOnce(rec, 3);
  // Cancelled right after the caller submitted it: its fence never arrives.
  Plan p;
  p.ops.push_back(PlanFill{Range(0x10000, 256, true), 4});
  p.ops.push_back(PlanFence{Range(kFenceOff, 8, true), 4, true});
  CHECK(EnqueueAsLoop(exec, std::move(p)));
  CHECK(exec.Counters().plans_inline_submitted == 3);
  exec.Cancel();
  exec.WaitIdle();
  CheckInOrderOnce(rec, 3);
}

TEST_CASE("inline completion: off with inline_complete = false or with time coarsening") {
  for (ExecOptions o : {ExecOptions{4, true, 0, false}, ExecOptions{4, true, 100'000, true}}) {
    CAPTURE(o.inline_complete);
    Guest g;
    Recorder rec;
    std::vector<std::byte> aperture(1 << 20);
    Executor exec(SharedEngine(), g.dma, aperture, {}, rec.Hooks(), o);
    for (uint64_t v = 1; v <= 5; ++v) {
      CHECK(!EnqueueAsLoop(exec, FenceOnly(v)));
      exec.WaitIdle();
    }
    CheckInOrderOnce(rec, 5);
    CHECK(exec.Counters().plans_inline == 0);
  }
}

TEST_CASE("inline completion: a fence-only plan right behind engine work never completes before it") {
  // Each round: a slow FILL + FENCE 2k-1 through the threads, then FENCE 2k as the loop
  // queues it. The executor is busy, so 2k must wait for 2k-1. Every third round the
  // executor drains first, so the fence-only plan completes inline: both kinds interleave.
  Guest g;
  Recorder rec;
  std::vector<std::byte> aperture(1 << 20);
  Executor exec(SharedEngine(), g.dma, aperture, {}, rec.Hooks(), kInline);
  constexpr uint64_t kRounds = 60;
  uint64_t inlined = 0;
  for (uint64_t k = 1; k <= kRounds; ++k) {
    Plan slow;
    slow.ops.push_back(PlanFill{Range(kBigOff, 2ull << 20, true), static_cast<uint32_t>(k)});
    slow.ops.push_back(PlanFence{Range(kFenceOff, 8, true), 2 * k - 1, true});
    REQUIRE(exec.Enqueue(std::move(slow)).ok());
    if (k % 3 == 0) exec.WaitIdle();
    if (EnqueueAsLoop(exec, FenceOnly(2 * k))) ++inlined;
    if (k % 3 == 0) {
      std::lock_guard lk(rec.mu);
      REQUIRE(rec.fences.size() == 2 * k);  // inline: done when RunHeld returned
    }
  }
  exec.WaitIdle();
  CheckInOrderOnce(rec, 2 * kRounds);
  MESSAGE(inlined, " of ", kRounds, " fence-only plans completed inline");
  CHECK(inlined >= kRounds / 3);
  CHECK(inlined < kRounds);
  CHECK(exec.Counters().plans_inline == inlined);
}

// The client side of guest memory shared without an fd: DMA_WRITE lands here.
class ClientMemory final : public vu::DmaMessenger {
 public:
  static constexpr Gpa kBase{0x9000'0000};
  Result<> DmaRead(Gpa a, std::span<std::byte> out) override {
    std::lock_guard lk(mu);
    std::memcpy(out.data(), bytes.data() + (a.v - kBase.v), out.size());
    return Ok();
  }
  Result<> DmaWrite(Gpa a, std::span<const std::byte> in) override {
    std::lock_guard lk(mu);
    std::memcpy(bytes.data() + (a.v - kBase.v), in.data(), in.size());
    writer = std::this_thread::get_id();
    return Ok();
  }
  std::mutex mu;
  std::vector<std::byte> bytes = std::vector<std::byte>(0x10000);
  std::thread::id writer;
};

TEST_CASE("inline completion: never into guest memory shared without an fd") {
  Guest g;
  ClientMemory client;
  g.dma.SetMessenger(&client);
  REQUIRE(g.dma.Map({ClientMemory::kBase, ByteSize{0x10000}, 0, vu::kDmaRead | vu::kDmaWrite}, UniqueFd{}).ok());
  Recorder rec;
  std::vector<std::byte> aperture(1 << 20);
  Executor exec(SharedEngine(), g.dma, aperture, {}, rec.Hooks(), kInline);
  auto no_fd = [](uint64_t off) {
    ResolvedRange r;
    r.va = GpuVa{0xa00000 + off};
    r.size = ByteSize{8};
    r.write = true;
    r.spans.push_back(GttSpan{r.va, GttTarget{false, ClientMemory::kBase.v + off, true}, r.size});
    return r;
  };
  for (uint64_t v = 1; v <= 10; ++v) {
    Plan p;
    // Half of them also fence into fd-backed memory: one no-fd target is enough to refuse.
    if (v % 2) p.ops.push_back(PlanFence{Range(kFenceOff, 8, true), v, false});
    p.ops.push_back(PlanFence{no_fd(0x100), v, true});
    CHECK_MESSAGE(!EnqueueAsLoop(exec, std::move(p)), "a fence into no-fd memory was held for inline completion");
    exec.WaitIdle();
    std::lock_guard lk(client.mu);
    uint64_t got = 0;
    std::memcpy(&got, client.bytes.data() + 0x100, 8);
    CHECK(got == v);
    CHECK(client.writer != std::this_thread::get_id());
  }
  CHECK(exec.Counters().plans_inline == 0);
  std::lock_guard lk(rec.mu);
  CHECK(rec.failures.empty());
  CHECK(rec.fences.size() == 15);
  g.dma.SetMessenger(nullptr);
}

TEST_CASE("inline completion: Cancel and DMA_UNMAP amid interleaved inline and executor completions") {
  // A submitter thread queues as the loop does (fence-only plans, completed inline when the
  // executor is idle, and FILL + FENCE plans into a second region); this thread cancels (a
  // reset) or unmaps that region (cancelling when it is in use, as Vgpu::DmaUnmap does) and
  // maps it again. Fences stay in order, exactly once; none of a plan queued before a Cancel
  // runs after it returned; an unmap's drain empties.
  Guest g;
  constexpr Gpa kR2{0x8000'0000};
  constexpr uint64_t kR2Bytes = 2ull << 20;
  auto map_r2 = [&] {
    auto fd = CreateMemFd("r2", ByteSize{kR2Bytes});
    REQUIRE(fd.ok());
    REQUIRE(g.dma.Map({kR2, ByteSize{kR2Bytes}, 0, vu::kDmaRead | vu::kDmaWrite}, std::move(fd).value()).ok());
  };
  map_r2();
  ResolvedRange r2;
  r2.va = GpuVa{0x4000'0000};
  r2.size = ByteSize{kR2Bytes};
  r2.write = true;
  r2.spans.push_back(GttSpan{r2.va, GttTarget{false, kR2.v, true}, r2.size});
  Recorder rec;
  std::vector<std::byte> aperture(1 << 20);
  Executor exec(SharedEngine(), g.dma, aperture, {}, rec.Hooks(), kInline);
  std::atomic<uint64_t> enqueued{0};  // the last value whose Enqueue has returned
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> inlined{0}, threaded{0};
  std::thread submitter([&] {
    std::mt19937 rng(12345);
    for (uint64_t v = 1; !stop.load(); ++v) {
      Plan p;
      if (rng() % 3 == 0) p.ops.push_back(PlanFill{r2, static_cast<uint32_t>(v)});
      p.ops.push_back(PlanFence{Range(kFenceOff, 8, true), v, true});
      while (!exec.Admit().ok() && !stop.load()) std::this_thread::yield();
      Result<bool> held = exec.Enqueue(std::move(p), InlineOk::kYes);
      if (!held.ok()) continue;  // full for bytes: the ring would refuse it by name
      enqueued.store(v);
      if (*held) {
        // Sometimes late: a Cancel may come between the hold and RunHeld.
        if (rng() % 4 == 0) std::this_thread::sleep_for(std::chrono::microseconds(100));
        exec.RunHeld();
        inlined.fetch_add(1);
      } else {
        threaded.fetch_add(1);
      }
      if (rng() % 8 == 0) std::this_thread::sleep_for(std::chrono::microseconds(300));  // let it go idle
    }
  });
  struct Mark {
    size_t seen;  // fences recorded when the Cancel had returned
    uint64_t before;  // every plan up to this value was queued before the Cancel began
  };
  std::vector<Mark> marks;
  for (int round = 0; round < 40; ++round) {
    std::this_thread::sleep_for(std::chrono::milliseconds(3));
    const uint64_t before = enqueued.load();
    if (round % 2 == 0) {
      exec.Cancel();
    } else {
      Result<vu::DmaDrain> drain = g.dma.Unmap({kR2, ByteSize{kR2Bytes}, 0});
      REQUIRE(drain.ok());
      exec.DropImports(kR2, ByteSize{kR2Bytes});
      const bool busy = !drain->Idle();
      if (busy) exec.Cancel();
      auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      while (!drain->Idle()) {
        REQUIRE_MESSAGE(std::chrono::steady_clock::now() < until, "the unmapped region is still in use");
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      }
      map_r2();
      if (!busy) continue;  // nothing cancelled: no mark
    }
    std::lock_guard lk(rec.mu);
    marks.push_back({rec.fences.size(), before});
  }
  stop = true;
  submitter.join();
  exec.WaitIdle();
  std::lock_guard lk(rec.mu);
  MESSAGE(rec.fences.size(), " fences; plans inline ", inlined.load(), ", through the threads ", threaded.load(),
          "; ", marks.size(), " cancels");
  for (size_t i = 1; i < rec.fences.size(); ++i)
    REQUIRE_MESSAGE(rec.fences[i] > rec.fences[i - 1], "fence ", rec.fences[i], " after ", rec.fences[i - 1]);
  for (const Mark& m : marks)
    for (size_t i = m.seen; i < rec.fences.size(); ++i)
      REQUIRE_MESSAGE(rec.fences[i] > m.before, "fence ", rec.fences[i], " of a plan queued before a Cancel ran after it");
  CHECK(inlined.load() > 0);
  CHECK(threaded.load() > 0);
  CHECK(exec.Counters().plans_inline > 0);
}

}  // namespace
}  // namespace vg::mediator
