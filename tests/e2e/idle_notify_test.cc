// Idle notify end to end (docs/device-spec.md, "Idle notify"): a guest process drives the
// real daemon through the ioeventfd doorbell and kicks only when DEVICE_IDLE says the device
// will not look at the tail shadow on its own. Fewer doorbells than submissions, every result
// bit-exact, no submission lost when the device goes idle at the moment the guest submits,
// a guest that ignores the protocol still served, and reset and disconnect in the middle of
// a stream leave idle = 1 and the vGPU usable.
#include <doctest.h>

#include <chrono>
#include <cstring>
#include <random>
#include <thread>

#include "guest/guest.h"
#include "shaders/samples.h"
#include "tests/e2e/guest_checks.h"
#include "tests/e2e/harness.h"

using namespace vg;
using namespace vg::e2e;
using namespace vg::guest;

namespace {

struct Guest {
  std::unique_ptr<Device> dev;
  std::unique_ptr<Driver> drv;
  // `driver`: false opens the device only (what the device says before a driver touches it).
  explicit Guest(const std::string& socket, DriverOptions dopts = {}, bool driver = true) {
    DeviceOptions o;
    o.socket = socket;
    o.ram_size = 32 << 20;
    auto d = Device::Open(o);
    REQUIRE_MESSAGE(d.ok(), Why(d.ok() ? Ok() : Result<>(d.error())));
    dev = std::move(d).value();
    if (driver) NewDriver(dopts);
  }
  void NewDriver(DriverOptions dopts = {}) {
    drv.reset();
    auto r = Driver::Create(*dev, dopts);
    REQUIRE_MESSAGE(r.ok(), Why(r.ok() ? Ok() : Result<>(r.error())));
    drv = std::move(r).value();
  }
  uint32_t Idle() const { return dev->Status32(abi::status::kDeviceIdle); }
};

// One catalogue kernel case per submission, each on buffers of its own, so every result
// can be checked against the CPU reference afterwards.
struct Stream {
  std::vector<shaders::KernelSample> samples;
  std::vector<std::vector<GpuBuffer>> bufs;
  std::vector<CommandBuilder> cmds;

  Stream(Guest& g, int n) {
    const shaders::KernelId cheap[] = {shaders::KernelId::kSaxpy, shaders::KernelId::kCopy,
                                       shaders::KernelId::kFill};
    for (int i = 0; i < n; ++i) {
      // Small cases of the cheap kernels: the stream is about doorbells, not GPU time.
      const shaders::KernelDesc& k = *shaders::FindKernel(cheap[i % 3]);
      shaders::KernelSample s = shaders::MakeSample(k.id, 257 + i % 64, 1000 + i);
      std::vector<GpuBuffer> bs;
      std::vector<Binding> binds;
      for (size_t b = 0; b < s.bindings.size(); ++b) {
        auto buf = g.drv->Alloc(s.bindings[b].size());
        REQUIRE_MESSAGE(buf.ok(), Why(buf.ok() ? Ok() : Result<>(buf.error())));
        std::memcpy(buf->host.data(), s.bindings[b].data(), s.bindings[b].size());
        binds.push_back(Bind(*buf, AccessOf(k.bindings[b].access)));
        bs.push_back(*buf);
      }
      CommandBuilder cb;
      cb.Dispatch(s.kernel, s.groups, binds, s.push);
      samples.push_back(std::move(s));
      bufs.push_back(std::move(bs));
      cmds.push_back(std::move(cb));
    }
  }
  // Fire and forget: back to back, an interrupt only for the last one.
  uint64_t SubmitAll(Guest& g) {
    uint64_t last = 0;
    for (size_t i = 0; i < cmds.size(); ++i) {
      auto seq = g.drv->Submit(cmds[i], i + 1 == cmds.size());
      REQUIRE_MESSAGE(seq.ok(), Why(seq.ok() ? Ok() : Result<>(seq.error())));
      last = *seq;
    }
    return last;
  }
  void CheckAll() {
    int bad = 0;
    for (size_t i = 0; i < samples.size(); ++i) {
      std::vector<std::vector<std::byte>> out;
      for (const GpuBuffer& b : bufs[i]) out.emplace_back(b.host.begin(), b.host.end());
      auto check = shaders::CheckSample(samples[i], out);
      if (!check.ok() && bad++ < 3) CHECK_MESSAGE(check.ok(), "submission " << i << ": " << Why(check));
    }
    CHECK(bad == 0);
  }
};

constexpr int kStream = 256;

}  // namespace

TEST_CASE("idle notify: a fire-and-forget stream rings far fewer doorbells than it submits, results exact") {
  Daemon d({std::string(kUuidA) + ":small"});
  Guest g(d.Socket(0));
  REQUIRE(g.drv->uses_idle_notify());
  CHECK(g.Idle() == 1);
  Stream s(g, kStream);
  const DriverCounters before = g.drv->counters();
  const uint64_t device_doorbells = g.dev->Status64(abi::status::kDoorbells);
  const uint64_t last = s.SubmitAll(g);
  auto w = g.drv->Wait(last, WaitMode::kIrq, 30000);
  REQUIRE_MESSAGE(w.ok(), Why(w));
  const DriverCounters& c = g.drv->counters();
  const uint64_t subs = c.submissions - before.submissions;
  const uint64_t kicks = c.doorbells - before.doorbells;
  const uint64_t skipped = c.doorbells_skipped - before.doorbells_skipped;
  const double per_sub = double(kicks) / double(subs);
  MESSAGE("idle notify, ", subs, " dispatches back to back: ", kicks, " doorbells (", per_sub, " per submission), ",
          skipped, " skipped; the device saw ", g.dev->Status64(abi::status::kDoorbells) - device_doorbells,
          " and made ", g.dev->Status64(abi::status::kSubmissions), " ring submissions");
  CHECK(subs == kStream);
  CHECK(kicks + skipped == subs);
  CHECK(per_sub < 0.5);
  // Kicks that arrive together are drained as one.
  CHECK(g.dev->Status64(abi::status::kDoorbells) - device_doorbells <= kicks);
  s.CheckAll();
  // The device runs out of work and says so: the next submission kicks.
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (g.Idle() != 1 && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  CHECK(g.Idle() == 1);
  CHECK(g.dev->Read32(abi::reg::kErrCount).value() == 0);
}

TEST_CASE("idle notify: a racing guest loses no submission when the device goes idle as it submits") {
  Daemon d({std::string(kUuidA) + ":small"});
  Guest g(d.Socket(0));
  REQUIRE(g.drv->uses_idle_notify());
  auto a = g.drv->Alloc(4096);
  auto b = g.drv->Alloc(64 << 10);
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  // A FILL of 64 KiB takes the device about as long as the guest's gaps below, so the second
  // submission of a round lands before, during or after the device's settle (store idle,
  // fence, re-read), all three many times over.
  std::mt19937 rng(12345);
  std::uniform_int_distribution<int> gap_us(0, 400);
  const auto t0 = std::chrono::steady_clock::now();
  constexpr int kRounds = 1000;
  for (int round = 1; round <= kRounds; ++round) {
    CommandBuilder first, second;
    first.Fill(b->va, 64 << 10, round);
    second.Fill(a->va, 4096, round);
    auto s1 = g.drv->Submit(first, false);
    REQUIRE(s1.ok());
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(gap_us(rng));
    while (std::chrono::steady_clock::now() < until) {
    }
    auto s2 = g.drv->Submit(second, round % 2 == 0);
    REQUIRE(s2.ok());
    // Bounded: a lost wakeup shows as a timeout here, never as a hang.
    auto w = g.drv->Wait(*s2, round % 2 == 0 ? WaitMode::kIrq : WaitMode::kPoll, 5000);
    INFO("round ", round, " doorbells ", g.drv->counters().doorbells, " skipped ",
         g.drv->counters().doorbells_skipped);
    REQUIRE_MESSAGE(w.ok(), Why(w));
    REQUIRE(reinterpret_cast<uint32_t*>(a->host.data())[1023] == uint32_t(round));
    REQUIRE(reinterpret_cast<uint32_t*>(b->host.data())[(64 << 10) / 4 - 1] == uint32_t(round));
  }
  const DriverCounters& c = g.drv->counters();
  MESSAGE(kRounds, " racing rounds in ",
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count(), " ms: ",
          c.doorbells, " doorbells, ", c.doorbells_skipped, " skipped");
  // The protocol was exercised both ways: some kicks left out, some needed.
  CHECK(c.doorbells_skipped > 0);
  CHECK(c.doorbells > 0);
  CHECK(g.dev->Read32(abi::reg::kErrCount).value() == 0);
}

TEST_CASE("idle notify: a guest that ignores it and kicks every time still works") {
  Daemon d({std::string(kUuidA) + ":small"});
  DriverOptions always;
  always.idle_notify = false;
  Guest g(d.Socket(0), always);
  CHECK_FALSE(g.drv->uses_idle_notify());
  Stream s(g, kStream);
  const DriverCounters before = g.drv->counters();
  const uint64_t last = s.SubmitAll(g);
  auto w = g.drv->Wait(last, WaitMode::kIrq, 30000);
  REQUIRE_MESSAGE(w.ok(), Why(w));
  const DriverCounters& c = g.drv->counters();
  MESSAGE("kick always, ", kStream, " dispatches: ", c.doorbells - before.doorbells, " doorbells");
  CHECK(c.doorbells - before.doorbells == kStream);
  CHECK(c.doorbells_skipped == 0);
  s.CheckAll();
  // The trapped doorbell (RING_TAIL) never skips either, and is not confused by the shadow.
  DriverOptions trapped;
  trapped.use_ioeventfd = false;
  g.NewDriver(trapped);
  CHECK_FALSE(g.drv->uses_idle_notify());
  ExpectStillWorks(g);
  CHECK(g.drv->counters().doorbells_skipped == 0);
  CHECK(g.dev->Read32(abi::reg::kErrCount).value() == 0);
}

TEST_CASE("idle notify: reset and disconnect in the middle of a stream leave idle = 1 and the vGPU usable") {
  Daemon d({std::string(kUuidA) + ":small"});
  for (int path = 0; path < 3; ++path) {
    const std::string names[] = {"DEVICE_RESET", "RESET register", "disconnect"};
    CAPTURE(names[path]);
    auto g = std::make_unique<Guest>(d.Socket(0));
    REQUIRE(g->drv->uses_idle_notify());
    // Enough queued work that the cut lands while the device is busy.
    auto buf = g->drv->Alloc(1 << 20);
    REQUIRE(buf.ok());
    // The guest outruns the loop's first wake-up, so the device may say idle for a while:
    // submit until it has said busy 16 times, then cut.
    int submitted = 0, busy = 0;
    while (busy < 16 && submitted < 4096) {
      CommandBuilder cb;
      cb.Fill(buf->va, 1 << 20, submitted);
      REQUIRE(g->drv->Submit(cb, false).ok());
      ++submitted;
      busy += g->Idle() == 0;
    }
    INFO("submitted ", submitted);
    REQUIRE(busy == 16);
    if (path == 0) {
      REQUIRE(g->dev->Reset().ok());  // DEVICE_RESET, answered at once
      CHECK(g->Idle() == 1);
    } else if (path == 1) {
      REQUIRE(g->dev->Write32(abi::reg::kReset, abi::kResetMagic).ok());
      CHECK(g->Idle() == 1);
    } else {
      g.reset();  // the guest goes away mid-stream
      g = std::make_unique<Guest>(d.Socket(0), DriverOptions{}, /*driver=*/false);
      CHECK(g->Idle() == 1);  // before any driver wrote CTRL
    }
    // Published at once, and it stays so: nothing of the old stream is re-read.
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    CHECK(g->Idle() == 1);
    // A driver starts over (the reset took the ring and GTT) and the vGPU works, kicking
    // once because the device says idle.
    g->NewDriver();
    const uint64_t kicks = g->drv->counters().doorbells;
    ExpectStillWorks(*g);
    CHECK(g->drv->counters().doorbells == kicks + 1);
  }
  CHECK(d.Alive());
}
