// Idle notify on the device model (docs/device-spec.md, "Idle notify"): DEVICE_IDLE in the
// status page, the re-read of the tail shadow when the last plan finishes, and the paths that
// must leave idle = 1 published. No engine: plans of FENCE commands run on the host. A plan
// is held "running" by a FENCE whose target is guest memory shared without an fd: its write
// goes to a messenger that blocks until the test lets it go, so "busy" is a state the test
// controls, not a race it hopes to win.
#include <doctest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>

#include "mediator/mediator.h"
#include "vfio_user/dma.h"

using namespace vg;
using namespace vg::mediator;
namespace vu = vg::vfio_user;

namespace {

// The client side of memory shared without an fd: a buffer, whose writes can be held.
class SlowMemory final : public vu::DmaMessenger {
 public:
  static constexpr uint64_t kBase = 0x800000, kSize = 0x10000;
  Result<> DmaRead(Gpa addr, std::span<std::byte> out) override {
    std::lock_guard lk(mu_);
    std::memcpy(out.data(), bytes_.data() + (addr.v - kBase), out.size());
    return Ok();
  }
  Result<> DmaWrite(Gpa addr, std::span<const std::byte> data) override {
    std::unique_lock lk(mu_);
    ++writes_waiting_;
    cv_.notify_all();
    cv_.wait(lk, [&] { return !hold_; });
    --writes_waiting_;
    std::memcpy(bytes_.data() + (addr.v - kBase), data.data(), data.size());
    return Ok();
  }
  void Hold() {
    std::lock_guard lk(mu_);
    hold_ = true;
  }
  void Release() {
    {
      std::lock_guard lk(mu_);
      hold_ = false;
    }
    cv_.notify_all();
  }
  // A write is blocked in DmaWrite: the executor is inside a plan.
  bool WaitForHeldWrite(std::chrono::milliseconds limit = std::chrono::seconds(5)) {
    std::unique_lock lk(mu_);
    return cv_.wait_for(lk, limit, [&] { return writes_waiting_ > 0; });
  }
  void Store32(uint64_t gpa, uint32_t v) {
    std::lock_guard lk(mu_);
    std::memcpy(bytes_.data() + (gpa - kBase), &v, 4);
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::byte> bytes_ = std::vector<std::byte>(kSize);
  bool hold_ = false;
  int writes_waiting_ = 0;
};

Result<> Wr32(Vgpu& v, uint32_t region, uint64_t off, uint32_t x) {
  return v.RegionWrite(region, off, std::as_bytes(std::span(&x, 1)));
}
Result<> Wr64(Vgpu& v, uint32_t region, uint64_t off, uint64_t x) {
  return v.RegionWrite(region, off, std::as_bytes(std::span(&x, 1)));
}
uint32_t Reg(Vgpu& v, uint32_t off) {
  uint32_t x = 0xdeadbeef;
  REQUIRE(v.RegionRead(vu::kBar0Region, off, std::as_writable_bytes(std::span(&x, 1))).ok());
  return x;
}

// One vGPU, guest RAM (fd-backed) at kRam, the slow memory at SlowMemory::kBase, and a ring.
// GPU VA layout: ring at kRingVa, the tail shadow at kShadowVa (RAM) or kSlowShadowVa (slow
// memory), fences at kFenceVa + 8 i (RAM), the held FENCE target at kSlowVa.
struct Rig {
  static constexpr uint64_t kRam = 0x100000, kRamSize = 1 << 20;
  static constexpr uint64_t kRingVa = 0x1000, kShadowVa = 0x3000, kFenceVa = 0x4000;
  static constexpr uint64_t kSlowVa = 0x8000, kSlowShadowVa = 0x9000;
  static constexpr uint32_t kRingSize = 4096;

  std::unique_ptr<Vgpu> v;
  Mapping ram;
  Mapping page;  // the status page, as the guest maps it
  SlowMemory slow;
  uint32_t tail = 0;
  bool slow_shadow = false;

  explicit Rig(bool shadow_in_slow_memory = false,
               uint64_t time_granularity_ns = abi::cmd::kDefaultTimeGranularityNs, bool inline_complete = true,
               engine::Engine* engine = nullptr)
      : slow_shadow(shadow_in_slow_memory) {
    VgpuConfig cfg;
    cfg.engine = engine;
    cfg.time_granularity_ns = time_granularity_ns;
    cfg.executor_inline = inline_complete;
    cfg.uuid = Uuid::Random();
    cfg.aperture_size = 1 << 16;
    cfg.gtt_entries = 64;
    auto created = Vgpu::Create(cfg);
    REQUIRE(created.ok());
    v = std::move(created).value();
    auto info = v->GetRegionInfo(vu::kBar0Region);
    REQUIRE(info.ok());
    auto mapped = Mapping::Map(*info->mmap_fd, ByteSize{info->sparse_areas[0].size},
                               info->fd_offset + info->sparse_areas[0].offset, Mapping::Prot::kRead);
    REQUIRE(mapped.ok());
    page = std::move(mapped).value();
    Connect();
  }
  // The vGPU goes before the slow memory it may still be reading (a fetched re-read can be in
  // flight after WaitIdle): the guest leaves as in production, where disconnect waits for a
  // messenger call in progress, then the vGPU's threads end while `slow` is still alive.
  ~Rig() {
    slow.Release();
    v->OnDisconnect();
    v.reset();
  }

  // What a guest does after it connects: memory, bus mastering, GTT, ring.
  void Connect() {
    auto fd = CreateMemFd("ram", ByteSize{kRamSize});
    REQUIRE(fd.ok());
    auto mapped = Mapping::Map(*fd, ByteSize{kRamSize}, 0);
    REQUIRE(mapped.ok());
    ram = std::move(mapped).value();
    v->OnConnect(&slow);
    REQUIRE(v->DmaMap({Gpa{kRam}, ByteSize{kRamSize}, 0, vu::kDmaRead | vu::kDmaWrite}, std::move(fd).value()).ok());
    REQUIRE(v->DmaMap({Gpa{SlowMemory::kBase}, ByteSize{SlowMemory::kSize}, 0, vu::kDmaRead | vu::kDmaWrite},
                      UniqueFd{})
                .ok());
    StartRing();
  }
  void StartRing() {
    REQUIRE(Wr32(*v, vu::kConfigRegion, 0x04, 0x6).ok());  // memory + bus master: the ring is DMA
    for (uint64_t va = 0x1000; va < 0x8000; va += 0x1000) Map(va, kRam + va, true);
    Map(kSlowVa, SlowMemory::kBase, true);
    Map(kSlowShadowVa, SlowMemory::kBase + 0x1000, true);
    REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kCtrl, 0).ok());
    REQUIRE(Wr64(*v, vu::kBar0Region, abi::reg::kRingBaseLo, kRingVa).ok());
    REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kRingSize, kRingSize).ok());
    REQUIRE(Wr64(*v, vu::kBar0Region, abi::reg::kTailShadowLo, slow_shadow ? kSlowShadowVa : kShadowVa).ok());
    REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kCtrl, abi::kCtrlRingEnable).ok());
    tail = 0;
    std::memset(ram.data() + kFenceVa, 0, 4096);
  }
  void Map(uint64_t va, uint64_t gpa, bool writable) {
    uint64_t e = gpa | abi::kGttValid | (writable ? abi::kGttWritable : 0);
    REQUIRE(Wr64(*v, vu::kBar0Region, abi::kGttOffset + (va >> 12) * 8, e).ok());
  }

  uint32_t Status32(uint32_t off) const {
    return __atomic_load_n(reinterpret_cast<const uint32_t*>(page.data() + off), __ATOMIC_ACQUIRE);
  }
  // Ring space frees as the device's head (status page) moves, as for the guest driver.
  void WaitSpace(uint32_t bytes) {
    auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (kRingSize - ((tail - Status32(abi::status::kRingHead)) & (kRingSize - 1)) <= bytes) {
      REQUIRE_MESSAGE(std::chrono::steady_clock::now() < until, "the ring never drained");
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  void Append(std::initializer_list<uint32_t> dws) {
    WaitSpace(static_cast<uint32_t>(dws.size() * 4));
    auto* ring = reinterpret_cast<uint32_t*>(ram.data() + kRingVa);
    for (uint32_t d : dws) {
      ring[tail / 4] = d;
      tail = (tail + 4) % kRingSize;
    }
  }
  void Fence(uint64_t va, uint64_t value) {
    Append({abi::cmd::Header(abi::cmd::kFence, 5), uint32_t(va), uint32_t(va >> 32), uint32_t(value),
            uint32_t(value >> 32)});
  }
  // A submission whose plan stays running while the slow memory holds its writes.
  void HeldSubmission(uint64_t fence_slot, uint64_t value) {
    Fence(kSlowVa, value);
    Fence(FenceVa(fence_slot), value);
  }
  static uint64_t FenceVa(uint64_t slot) { return kFenceVa + 8 * slot; }
  uint64_t FenceValue(uint64_t slot) {
    return __atomic_load_n(reinterpret_cast<uint64_t*>(ram.data() + FenceVa(slot)), __ATOMIC_ACQUIRE);
  }
  // The guest's side of the protocol: store the tail, full fence; the caller reads idle.
  void Publish(uint32_t value) {
    if (slow_shadow) {
      slow.Store32(SlowMemory::kBase + 0x1000, value);
    } else {
      __atomic_store_n(reinterpret_cast<uint32_t*>(ram.data() + kShadowVa), value, __ATOMIC_RELEASE);
    }
    std::atomic_thread_fence(std::memory_order_seq_cst);
  }
  void Publish() { Publish(tail); }
  void Kick() { v->OnDoorbellKick(); }  // what the loop does when the ioeventfd fires
  uint32_t Idle() const { return Status32(abi::status::kDeviceIdle); }
  bool WaitFence(uint64_t slot, uint64_t value, std::chrono::milliseconds limit = std::chrono::seconds(5)) {
    auto until = std::chrono::steady_clock::now() + limit;
    while (FenceValue(slot) != value) {
      if (std::chrono::steady_clock::now() > until) return false;
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    return true;
  }
  // Idle published and the executor drained (plan_done has run for every plan).
  bool WaitIdleWord(std::chrono::milliseconds limit = std::chrono::seconds(5)) {
    auto until = std::chrono::steady_clock::now() + limit;
    while (Idle() != 1) {
      if (std::chrono::steady_clock::now() > until) return false;
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    return true;
  }
};

// Lets the held write go after `ms`, from another thread: a cancel waits for the hook the
// held write sits in, so the test thread cannot release it itself.
std::thread ReleaseAfter(SlowMemory& m, int ms) {
  return std::thread([&m, ms] {
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    m.Release();
  });
}

}  // namespace

TEST_CASE("idle notify: offered in CAPS; DEVICE_IDLE reads 1 at creation and when work runs out") {
  Rig r;
  CHECK((Reg(*r.v, abi::reg::kCaps) & abi::kCapIdleNotify) != 0);
  CHECK(r.Idle() == 1);
  // Trapped reads of the status page see the same word.
  CHECK(Reg(*r.v, abi::kStatusPageOffset + abi::status::kDeviceIdle) == 1);
  r.Fence(Rig::FenceVa(0), 7);
  r.Publish();
  r.Kick();
  REQUIRE(r.WaitFence(0, 7));
  REQUIRE(r.WaitIdleWord());
  r.v->WaitIdle();
  CHECK(r.Idle() == 1);
  CHECK(Reg(*r.v, abi::reg::kErrCount) == 0);
}

TEST_CASE("idle notify: a tail published while the device is busy is found without a kick") {
  for (bool slow_shadow : {false, true}) {
    CAPTURE(slow_shadow);  // true: the re-read itself goes through the fetch thread
    Rig r(slow_shadow);
    r.slow.Hold();
    r.HeldSubmission(0, 1);
    r.Publish();
    r.Kick();
    REQUIRE(r.slow.WaitForHeldWrite());
    // The plan is running and the shadow is the doorbell: busy, the guest may skip its kick.
    CHECK(r.Idle() == 0);
    for (uint64_t i = 1; i <= 3; ++i) r.Fence(Rig::FenceVa(i), 10 + i);  // three submissions, no kick
    r.Publish();
    REQUIRE(r.Idle() == 0);  // the guest would skip the kick here
    CHECK(r.FenceValue(1) == 0);
    r.slow.Release();
    // The device re-reads the shadow when the held plan finishes, and runs what it found.
    for (uint64_t i = 1; i <= 3; ++i) CHECK(r.WaitFence(i, 10 + i));
    CHECK(r.WaitFence(0, 1));
    REQUIRE(r.WaitIdleWord());
    r.v->WaitIdle();
    VgpuCounters c = r.v->Counters();
    CHECK(c.doorbells == 1);
    CHECK(c.submissions == 2);
    CHECK(c.tail_rereads >= 1);
    if (!slow_shadow) CHECK(c.tail_rereads_found == 1);  // a fetched re-read completes later
    CHECK(Reg(*r.v, abi::reg::kRingHead) == r.tail);
    CHECK(Reg(*r.v, abi::reg::kErrCount) == 0);
  }
}

TEST_CASE("idle notify: engine work the retire thread's re-read finds is submitted by that thread") {
  static auto engine = engine::Engine::Create();  // one per process, as a worker has
  REQUIRE(engine.ok());
  Rig r(false, 0, true, engine->get());  // time coarsening off, as the study runs
  auto fill = [&](uint64_t va, uint32_t value) {
    r.Append({abi::cmd::Header(abi::cmd::kFill, 6), uint32_t(va), uint32_t(va >> 32),
              256, 0, value});
  };
  auto word = [&](uint64_t va) {
    uint32_t w;
    std::memcpy(&w, r.ram.data() + va, 4);
    return w;
  };
  // First use of the memory: imported by the submit thread.
  fill(0x2000, 0x11);
  r.Fence(Rig::FenceVa(0), 1);
  r.Publish();
  r.Kick();
  REQUIRE(r.WaitFence(0, 1));
  REQUIRE(r.WaitIdleWord());
  r.v->WaitIdle();
  CHECK(word(0x2000) == 0x11);
  // A plan held running, its end on the retire thread (engine work first); behind it,
  // published without a kick, a FILL and its fence. Its end is the retire thread's unless
  // the engine finished the FILL before the submit thread queued the host ops behind it
  // (then that thread ends the plan and takes what the settle found itself, no wake-up
  // either): rounds until one is the retire thread's. Under the sanitizers on a loaded host
  // the engine's completion thread, which wakes at once (base/cpu_slice.h), beat the submit
  // thread in all of 8 rounds once; 64 leave room.
  const uint64_t before = r.v->Counters().plans_inline_submitted;
  uint64_t fence = 3, by_retire = 0;
  for (int round = 0; round < 64 && by_retire == 0; ++round, fence += 2) {
    CAPTURE(round);
    const VgpuCounters c0 = r.v->Counters();
    r.slow.Hold();
    fill(0x2000, 0x33);
    r.HeldSubmission(1, fence - 1);
    r.Publish();
    r.Kick();
    REQUIRE(r.slow.WaitForHeldWrite());
    REQUIRE(r.Idle() == 0);
    fill(0x2000, 0x22);  // the same range: imported (this RAM is smaller than an import window)
    r.Fence(Rig::FenceVa(2), fence);
    r.Publish();
    r.slow.Release();
    // The held plan's end re-reads the shadow, and the FILL it finds runs.
    REQUIRE(r.WaitFence(2, fence));
    CHECK(r.FenceValue(1) == fence - 1);
    CHECK(word(0x2000) == 0x22);
    REQUIRE(r.WaitIdleWord());
    r.v->WaitIdle();
    const VgpuCounters c = r.v->Counters();
    CHECK(c.tail_rereads_found == c0.tail_rereads_found + 1);
    CHECK(c.doorbells == c0.doorbells + 1);
    by_retire = c.plans_inline_submitted - before;
  }
  CHECK(by_retire == 1);
  CHECK(Reg(*r.v, abi::reg::kErrCount) == 0);
}

TEST_CASE("idle notify: the handshake under a racing guest loses no submission") {
  // Submissions land at every point of the device's settle: before, during and after the
  // store of 1. The guest follows the protocol exactly (store tail, fence, read, kick if 1);
  // every fence must arrive without a kick the protocol did not call for.
  Rig r;
  uint64_t skipped = 0, kicked = 0;
  for (uint64_t i = 0; i < 2000; ++i) {
    const uint64_t slot = i % 256;
    r.Fence(Rig::FenceVa(slot), i + 1);
    r.Publish();
    if (r.Idle() == 1) {
      r.Kick();
      ++kicked;
    } else {
      ++skipped;
    }
    if (i % 3 == 2) {  // now and then wait, so the device goes idle between submissions
      INFO("submission ", i, " kicked ", kicked, " skipped ", skipped);
      REQUIRE(r.WaitFence(slot, i + 1));
    } else if (i % 7 == 0) {
      std::this_thread::sleep_for(std::chrono::microseconds(i % 50));
    }
  }
  REQUIRE(r.WaitFence(1999 % 256, 2000));
  MESSAGE("2000 submissions: ", kicked, " kicks, ", skipped, " skipped");
  CHECK(skipped > 0);
  CHECK(Reg(*r.v, abi::reg::kErrCount) == 0);
}

TEST_CASE("idle notify: a guest that kicks every time is served as before") {
  Rig r;
  for (uint64_t i = 0; i < 300; ++i) {
    r.Fence(Rig::FenceVa(i % 256), i + 1);
    r.Publish();
    r.Kick();  // whatever DEVICE_IDLE says
    // Now and then wait: each kick queues a plan at once, and the queue holds 256.
    if (i % 64 == 63) REQUIRE(r.WaitFence(i % 256, i + 1));
  }
  REQUIRE(r.WaitFence(299 % 256, 300));
  r.v->WaitIdle();
  CHECK(r.v->Counters().doorbells == 300);
  CHECK(Reg(*r.v, abi::reg::kErrCount) == 0);
  CHECK(Reg(*r.v, abi::reg::kRingHead) == r.tail);
}

TEST_CASE("idle notify: a RING_TAIL guest's shadow is never read on the device's own") {
  Rig r;
  r.slow.Hold();
  r.HeldSubmission(0, 1);
  REQUIRE(Wr32(*r.v, vu::kBar0Region, abi::reg::kRingTail, r.tail).ok());
  REQUIRE(r.slow.WaitForHeldWrite());
  // The doorbell is RING_TAIL: the device promises nothing about the shadow.
  CHECK(r.Idle() == 1);
  // A stale value in the shadow (here: a span of junk) must not be taken for a tail.
  auto* ring = reinterpret_cast<uint32_t*>(r.ram.data() + Rig::kRingVa);
  for (uint32_t i = r.tail / 4; i < r.tail / 4 + 64; ++i) ring[i] = 0xFFFFFFFF;
  r.Publish(r.tail + 256);
  r.slow.Release();
  REQUIRE(r.WaitFence(0, 1));
  r.v->WaitIdle();
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(r.v->Counters().tail_rereads == 0);
  CHECK(Reg(*r.v, abi::reg::kErrCount) == 0);
  CHECK(Reg(*r.v, abi::reg::kRingHead) == r.tail);
  CHECK(r.Idle() == 1);
}

TEST_CASE("idle notify: a bad tail found by the re-read is refused by name; the ring moves on") {
  Rig r;
  r.slow.Hold();
  r.HeldSubmission(0, 1);
  r.Publish();
  r.Kick();
  REQUIRE(r.slow.WaitForHeldWrite());
  r.Publish(6);  // not dword aligned
  r.slow.Release();
  REQUIRE(r.WaitFence(0, 1));
  REQUIRE(r.WaitIdleWord());
  r.v->WaitIdle();
  CHECK(Reg(*r.v, abi::reg::kErrCode) == static_cast<uint32_t>(Errc::kOutOfBounds));
  CHECK(Reg(*r.v, abi::reg::kErrSource) == abi::kErrSourceRing);
  // The next submission, kicked because the word says idle, runs.
  r.Fence(Rig::FenceVa(1), 2);
  r.Publish();
  REQUIRE(r.Idle() == 1);
  r.Kick();
  CHECK(r.WaitFence(1, 2));
}

TEST_CASE("idle notify: reset, DEVICE_RESET, ring stop, a moved shadow and disconnect leave idle = 1") {
  enum Path { kReset, kDeviceReset, kRingStop, kShadowMoved, kDisconnect, kPaths };
  const std::string names[] = {"RESET", "DEVICE_RESET", "CTRL ring stop", "TAIL_SHADOW write", "disconnect"};
  for (int path = 0; path < kPaths; ++path) {
    CAPTURE(names[path]);
    Rig r;
    r.slow.Hold();
    r.HeldSubmission(0, 1);
    r.Publish();
    r.Kick();
    REQUIRE(r.slow.WaitForHeldWrite());
    REQUIRE(r.Idle() == 0);
    r.Fence(Rig::FenceVa(1), 2);  // published while busy, not kicked
    r.Publish();
    const uint64_t rereads = r.v->Counters().tail_rereads;
    // A cancel waits for the hook the held write sits in: let it go from another thread.
    std::thread release = ReleaseAfter(r.slow, 50);
    switch (path) {
      case kReset: REQUIRE(Wr32(*r.v, vu::kBar0Region, abi::reg::kReset, abi::kResetMagic).ok()); break;
      case kDeviceReset: REQUIRE(r.v->Reset().ok()); break;
      case kRingStop: REQUIRE(Wr32(*r.v, vu::kBar0Region, abi::reg::kCtrl, 0).ok()); break;
      case kShadowMoved: REQUIRE(Wr64(*r.v, vu::kBar0Region, abi::reg::kTailShadowLo, Rig::kShadowVa + 64).ok()); break;
      case kDisconnect: r.v->OnDisconnect(); break;
    }
    // Published at once: a guest never waits on a device that will not look.
    CHECK(r.Idle() == 1);
    release.join();
    r.v->WaitIdle();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // any plan_done has run
    CHECK(r.Idle() == 1);
    // The tail published before the cut was not taken by a re-read of its own.
    CHECK(r.v->Counters().tail_rereads == rereads);
    CHECK(r.FenceValue(1) == 0);
    // The device works again once the guest sets up and kicks.
    if (path == kDisconnect)
      r.Connect();
    else
      r.StartRing();
    r.Fence(Rig::FenceVa(2), 3);
    r.Publish();
    REQUIRE(r.Idle() == 1);
    r.Kick();
    CHECK(r.WaitFence(2, 3));
    CHECK(r.WaitIdleWord());
  }
}

// Inline completion (docs/device-spec.md "Execution"): with time coarsening off, a fence-only
// submission kicked while the executor is idle completes on the thread that ran the kick
// (the worker's loop), before OnDoorbellKick returns; anything else goes the threads' way.
TEST_CASE("inline completion: a fence-only kick to an idle vGPU completes before the kick returns") {
  Rig r(false, 0);
  for (uint64_t i = 1; i <= 20; ++i) {
    r.Fence(Rig::FenceVa(0), i);
    r.Publish();
    r.Kick();
    // No wait: the fence and the settle (DEVICE_IDLE back to 1) already happened.
    REQUIRE(r.FenceValue(0) == i);
    CHECK(r.Idle() == 1);
  }
  // The same through a RING_TAIL write (a trapped or posted MMIO doorbell).
  r.Fence(Rig::FenceVa(1), 99);
  REQUIRE(Wr32(*r.v, vu::kBar0Region, abi::reg::kRingTail, r.tail).ok());
  CHECK(r.FenceValue(1) == 99);
  CHECK(r.v->Counters().plans_inline == 21);
  CHECK(Reg(*r.v, abi::reg::kErrCount) == 0);
}

TEST_CASE("inline completion: not behind a running plan, not into memory without an fd, not when off") {
  {
    // A plan is running (its write to the slow memory is held): a fence-only submission
    // behind it must wait for it, not complete on the kick.
    Rig r(false, 0);
    r.slow.Hold();
    r.HeldSubmission(0, 1);
    r.Publish();
    r.Kick();
    REQUIRE(r.slow.WaitForHeldWrite());
    r.Fence(Rig::FenceVa(1), 2);
    r.Publish();
    r.Kick();
    CHECK_MESSAGE(r.FenceValue(1) == 0, "a fence-only plan completed before the plan ahead of it");
    CHECK(r.FenceValue(0) == 0);
    r.slow.Release();
    CHECK(r.WaitFence(0, 1));
    CHECK(r.WaitFence(1, 2));
    r.v->WaitIdle();
    CHECK(r.v->Counters().plans_inline == 0);
    CHECK(Reg(*r.v, abi::reg::kErrCount) == 0);
  }
  {
    // A fence into memory shared without an fd is a DMA_WRITE to the client: never on the loop.
    Rig r(false, 0);
    for (uint64_t i = 1; i <= 5; ++i) {
      r.Fence(Rig::kSlowVa, i);
      r.Fence(Rig::FenceVa(0), i);
      r.Publish();
      r.Kick();
      REQUIRE(r.WaitFence(0, i));
    }
    r.v->WaitIdle();
    uint64_t slow_value = 0;
    REQUIRE(r.slow.DmaRead(Gpa{SlowMemory::kBase}, std::as_writable_bytes(std::span(&slow_value, 1))).ok());
    CHECK(slow_value == 5);
    CHECK(r.v->Counters().plans_inline == 0);
    CHECK(Reg(*r.v, abi::reg::kErrCount) == 0);
  }
  for (auto [granularity, on] : {std::pair<uint64_t, bool>{0, false}, {abi::cmd::kDefaultTimeGranularityNs, true}}) {
    // Off (vgpud --no-inline-complete), or time coarsening on (the hold is the retire thread's).
    CAPTURE(granularity);
    Rig r(false, granularity, on);
    for (uint64_t i = 1; i <= 5; ++i) {
      r.Fence(Rig::FenceVa(0), i);
      r.Publish();
      r.Kick();
      REQUIRE(r.WaitFence(0, i));
    }
    r.v->WaitIdle();
    CHECK(r.v->Counters().plans_inline == 0);
  }
}

TEST_CASE("inline completion: a reset or a DMA_UNMAP between inline and threaded plans keeps the ring sane") {
  // Fence-only kicks (inline) and held plans (threaded) alternate with host resets and an
  // unmap of the slow memory; after each, a fence-only kick still completes inline and no
  // refusal is reported but the unmap's own.
  Rig r(false, 0);
  uint64_t v = 0;
  for (int round = 0; round < 10; ++round) {
    r.Fence(Rig::FenceVa(0), ++v);
    r.Publish();
    r.Kick();
    REQUIRE(r.FenceValue(0) == v);
    r.slow.Hold();
    r.HeldSubmission(1, ++v);
    r.Publish();
    r.Kick();
    REQUIRE(r.slow.WaitForHeldWrite());
    r.Fence(Rig::FenceVa(2), ++v);  // queued behind the held plan: must not complete
    r.Publish();
    r.Kick();
    CHECK(r.FenceValue(2) == 0);
    std::thread releaser = ReleaseAfter(r.slow, 5);
    // Cancels what is queued and running; the held write is let go meanwhile (the cancel
    // waits for the hook it sits in, and what runs before the cancel takes the hook lock
    // may still complete: once it has returned, nothing more does).
    if (round % 2 == 0) {
      REQUIRE(r.v->HostReset().ok());
    } else {
      REQUIRE(r.v->DmaUnmap({Gpa{SlowMemory::kBase}, ByteSize{SlowMemory::kSize}, 0}).ok());
    }
    const uint64_t f1 = r.FenceValue(1), f2 = r.FenceValue(2);
    releaser.join();
    r.v->WaitIdle();
    CHECK_MESSAGE(r.FenceValue(1) == f1, "a fence of cancelled work completed after the cancel returned");
    CHECK_MESSAGE(r.FenceValue(2) == f2, "a fence of cancelled work completed after the cancel returned");
    CHECK((f2 == 0 || f1 == v - 1));  // never the later fence without the earlier one
    if (round % 2 == 0) {
      r.StartRing();
    } else {
      REQUIRE(r.v->DmaMap({Gpa{SlowMemory::kBase}, ByteSize{SlowMemory::kSize}, 0, vu::kDmaRead | vu::kDmaWrite},
                          UniqueFd{})
                  .ok());
      r.StartRing();
    }
    std::memset(r.ram.data() + Rig::kFenceVa, 0, 64);
    r.Fence(Rig::FenceVa(3), ++v);
    r.Publish();
    r.Kick();
    CHECK(r.FenceValue(3) == v);  // inline again
  }
  CHECK(r.v->Counters().plans_inline >= 20);
}
