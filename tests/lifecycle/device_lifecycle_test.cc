// F8, what a guest sees of its device's lifecycle, through the real daemon, vgpuctl and guest
// processes, each beside a victim tenant on its own vGPU whose results stay bit-exact:
//  - reset: RESET, DEVICE_RESET and the host's `vgpuctl reset`, each with work in flight,
//    clear the GTT, ring, error state and registers and scrub the aperture; the vGPU works;
//  - power: D3hot and back (PCI PM), with and without a host reset while asleep: the guest
//    re-initialises as from cold and its workload continues bit-exact; asleep, work is a
//    named refusal;
//  - ordering: no work before bus mastering, the GTT and guest memory: each a named error;
//  - tenant scrubbing: nothing tenant A wrote is readable by the next tenant of the same or
//    another UUID (aperture, GTT, registers, config space, status page, engine output).
#include "tests/lifecycle/lifecycle_common.h"

using namespace vg;
using namespace vg::lifecycle;
using namespace vg::guest;

namespace {

constexpr uint32_t kSecret = 0x5EC2E7A5u;

// STATUS bit4 clear and the reset counter past `resets_before`: the reset has completed
// (docs/device-spec.md "Reset").
bool WaitResetDone(Device& dev, uint32_t resets_before, int timeout_ms) {
  auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  while (Clock::now() < deadline) {
    auto st = dev.Read32(abi::reg::kStatus);
    if (st.ok() && (*st & abi::kStatusResetting) == 0 && dev.Status32(abi::status::kResets) > resets_before) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return false;
}

bool AllZero(std::span<const std::byte> s) {
  return std::all_of(s.begin(), s.end(), [](std::byte b) { return b == std::byte{0}; });
}

// Offsets of every dword-aligned occurrence of the secret.
size_t CountSecret(std::span<const std::byte> s) {
  size_t n = 0;
  for (size_t i = 0; i + 4 <= s.size(); i += 4) {
    uint32_t v;
    std::memcpy(&v, s.data() + i, 4);
    n += v == kSecret;
  }
  return n;
}

uint32_t Reg(Device& dev, uint32_t off) {
  auto v = dev.Read32(off);
  REQUIRE_MESSAGE(v.ok(), "read " << off << ": " << e2e::Why(v.ok() ? Ok() : Result<>(v.error())));
  return *v;
}

}  // namespace

TEST_CASE("reset: RESET, DEVICE_RESET and vgpuctl reset with work in flight clear GTT, ring, errors, registers, aperture") {
  mgmt::DaemonProc d;
  REQUIRE(d.Start());
  StartVgpu(d, kUuidA);
  StartVgpu(d, kUuidB);
  e2e::Victim v(d.Socket(kUuidB));
  auto dev = Device::Open(GuestOptions(d.Socket(kUuidA)));
  REQUIRE_MESSAGE(dev.ok(), e2e::Why(dev.ok() ? Ok() : Result<>(dev.error())));
  Device& g = **dev;
  const char* kKinds[] = {"RESET register", "DEVICE_RESET", "vgpuctl reset", "PCI FLR (Advanced Features)"};
  for (int kind = 0; kind < 4; ++kind) {
    CAPTURE(std::string(kKinds[kind]));
    auto drv = Driver::Create(g);
    REQUIRE(drv.ok());
    Result<> before = RunRounds(**drv, 2, static_cast<uint32_t>(kind));
    REQUIRE_MESSAGE(before.ok(), e2e::Why(before));
    // Dirty what a reset must clear: the aperture through the engine, registers, the error
    // report, and 32 MiB of FILL still queued or running when the reset comes.
    auto ap = (*drv)->MapAperture(0, 32 << 20, true);
    REQUIRE(ap.ok());
    CommandBuilder cb;
    cb.Fill(*ap, 1 << 20, kSecret);
    auto seq = (*drv)->Submit(cb);
    REQUIRE(seq.ok());
    REQUIRE((*drv)->Wait(*seq).ok());
    REQUIRE(CountSecret(g.aperture().first(1 << 20)) == (1 << 18));  // the probe sees what is there
    REQUIRE(g.Write32(abi::reg::kScratch, kSecret).ok());
    REQUIRE(g.Write32(abi::priv::kDisplayBase, 0x1000).ok());
    REQUIRE(g.Write32(abi::priv::kClockMhz, 1234).ok());
    REQUIRE(g.Write32(abi::reg::kIrqMask, 1).ok());
    CHECK(g.Write32(abi::reg::kId, 0).code() == Errc::kReadOnly);
    REQUIRE(Reg(g, abi::reg::kErrCode) == static_cast<uint32_t>(Errc::kReadOnly));
    const uint64_t ring_va = (*drv)->ring().va.v, fence_va = (*drv)->fence_va().v;
    CommandBuilder big;
    big.Fill(*ap, 32 << 20, kSecret);
    const uint64_t doorbells = g.Status64(abi::status::kDoorbells);
    REQUIRE((*drv)->Submit(big, false).ok());
    // The ioeventfd kick travels beside the socket: let the device take it before the reset,
    // or it reaches the reset ring (kBadState, reported after the reset). With idle notify
    // the driver may not kick at all (the device re-reads the tail itself).
    for (auto until = Clock::now() + std::chrono::milliseconds(500);
         g.Status64(abi::status::kDoorbells) == doorbells && Clock::now() < until;)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    const uint32_t resets = g.Status32(abi::status::kResets);

    if (kind == 0) REQUIRE(g.Write32(abi::reg::kReset, abi::kResetMagic).ok());
    if (kind == 1) REQUIRE(g.Reset().ok());
    if (kind == 2) {
      mgmt::Ran r = d.Ctl({"reset", kUuidA});
      REQUIRE_MESSAGE(r.code == 0, r.err);
    }
    if (kind == 3) {
      auto af = g.ConfigRead32(abi::kCapAfOffset);
      REQUIRE(af.ok());
      REQUIRE((*af & 0xFF) == 0x13);       // the capability is there
      REQUIRE((*af >> 24 & 0x2) != 0);     // FLR capable
      REQUIRE(g.ConfigWrite32(abi::kCapAfOffset + 4, 0x1).ok());  // Initiate FLR
      auto cmd = g.ConfigRead32(0x04);
      REQUIRE(cmd.ok());
      CHECK((*cmd & 0x4) == 0);  // a function-level reset: bus mastering off
      REQUIRE(g.EnablePci().ok());
    }
    REQUIRE(WaitResetDone(g, resets, static_cast<int>(5000 * SlowFactor())));
    CHECK(g.Status32(abi::status::kResets) == resets + 1);
    // Registers back to creation values; the error report clear; the ring off.
    CHECK(Reg(g, abi::reg::kScratch) == 0);
    CHECK(Reg(g, abi::reg::kCtrl) == 0);
    CHECK(Reg(g, abi::reg::kRingBaseLo) == 0);
    CHECK(Reg(g, abi::reg::kRingSize) == 0);
    CHECK(Reg(g, abi::reg::kRingHead) == 0);
    auto rerr = g.ReadError();
    REQUIRE(rerr.ok());
    CHECK_MESSAGE(rerr->code == Errc::kOk, ErrcName(rerr->code) << " source " << rerr->source << " addr " << rerr->addr
                                                              << " info " << rerr->info);
    CHECK(Reg(g, abi::reg::kErrCount) == 0);
    CHECK(Reg(g, abi::reg::kIrqMask) == 0);
    CHECK((Reg(g, abi::reg::kStatus) & (abi::kStatusErrorLatched | abi::kStatusRingEnabled)) == 0);
    CHECK(Reg(g, abi::priv::kDisplayBase) == 0);
    CHECK(Reg(g, abi::priv::kClockMhz) == 1000);
    // The GTT: the ring's, the fence's and the aperture's entries are gone.
    for (uint64_t va : {ring_va, fence_va, ap->v}) {
      auto e = g.Read64(abi::kGttOffset + static_cast<uint32_t>((va >> 12) * 8));
      REQUIRE(e.ok());
      CHECK(*e == 0);
    }
    // The status page: fence, error count, scratch.
    CHECK(g.Status64(abi::status::kCompletedFence) == 0);
    CHECK(g.Status32(abi::status::kErrCount) == 0);
    CHECK(g.Status32(abi::status::kScratch) == 0);
    // The aperture: the FILL in flight was cancelled or completed before the scrub.
    CHECK(AllZero(g.aperture()));
    // DEVICE_RESET is a function-level reset: the library's Reset() enabled PCI again; the
    // others left PCI state alone. Either way the vGPU works from a fresh driver.
  }
  auto drv = Driver::Create(g);
  REQUIRE(drv.ok());
  Result<> after = RunRounds(**drv, 3, 7);
  CHECK_MESSAGE(after.ok(), e2e::Why(after));
  // Host reset of a vGPU that is not running is a named refusal.
  mgmt::Ran r = d.Ctl({"reset", kUuidC});
  CHECK(r.code == 1);
  CHECK(r.err.find("kNotFound") != std::string::npos);
  e2e::CheckVictim(v.Stop());
  CheckShutdown(d);
}

TEST_CASE("power: a workload continues bit-exact across D3hot and back, with and without a host reset while asleep") {
  mgmt::DaemonProc d;
  REQUIRE(d.Start());
  StartVgpu(d, kUuidA);
  StartVgpu(d, kUuidB);
  e2e::Victim v(d.Socket(kUuidB));
  auto dev = Device::Open(GuestOptions(d.Socket(kUuidA)));
  REQUIRE(dev.ok());
  Device& g = **dev;
  for (bool host_reset : {false, true}) {
    CAPTURE(host_reset);
    auto drv = Driver::Create(g);
    REQUIRE(drv.ok());
    Result<> r = RunRounds(**drv, 3, host_reset ? 11 : 3);
    REQUIRE_MESSAGE(r.ok(), e2e::Why(r));
    const uint32_t resets = g.Status32(abi::status::kResets);
    auto buf = (*drv)->Alloc(4096);  // GTT updates are DMA (the GTT batch): before sleeping
    REQUIRE(buf.ok());
    REQUIRE(g.Sleep().ok());
    CHECK((Reg(g, abi::reg::kStatus) & abi::kStatusD3) != 0);
    // Asleep, the device does no DMA: a submission is refused by name, not run, not hung.
    CommandBuilder cb;
    cb.Fill(buf->va, 4096, kSecret);
    // The driver may or may not kick (idle notify); the register doorbell is refused by name.
    auto seq = (*drv)->Submit(cb);
    CHECK((seq.ok() || seq.code() == Errc::kDmaDisabled));
    Result<> kick = g.Write32(abi::reg::kDoorbellKick, 0);
    CHECK(!kick.ok());  // EIO on the wire; the error report names it
    auto err = g.ReadError();
    REQUIRE(err.ok());
    CHECK(err->code == Errc::kDmaDisabled);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    CHECK(CountSecret(buf->host) == 0);
    if (host_reset) {
      mgmt::Ran rr = d.Ctl({"reset", kUuidA});
      REQUIRE_MESSAGE(rr.code == 0, rr.err);
      auto deadline = Clock::now() + std::chrono::seconds(5);
      while (g.Status32(abi::status::kResets) == resets && Clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      CHECK(g.Status32(abi::status::kResets) == resets + 1);
      // Still asleep: the host's reset leaves PCI function state (PMCSR) alone.
      CHECK((Reg(g, abi::reg::kStatus) & abi::kStatusD3) != 0);
    }
    // Wake-up is a cold start: the library resets the function and brings PCI up again;
    // the workload builds a fresh driver and continues.
    REQUIRE(g.Wake().ok());
    CHECK((Reg(g, abi::reg::kStatus) & abi::kStatusD3) == 0);
    drv = Driver::Create(g);
    REQUIRE(drv.ok());
    r = RunRounds(**drv, 3, host_reset ? 13 : 5);
    CHECK_MESSAGE(r.ok(), e2e::Why(r));
  }
  e2e::CheckVictim(v.Stop());
  CheckShutdown(d);
}

TEST_CASE("ordering: no work before bus mastering, the GTT and guest memory; each early try is a named error") {
  mgmt::DaemonProc d;
  REQUIRE(d.Start());
  StartVgpu(d, kUuidA);
  StartVgpu(d, kUuidB);
  e2e::Victim v(d.Socket(kUuidB));
  auto dev = Device::Open(GuestOptions(d.Socket(kUuidA)));
  REQUIRE(dev.ok());
  Device& g = **dev;

  // 1. Bus mastering off (the library turned it on at open; a driver that has not yet):
  // the ring is not fetched, the submission is refused kDmaDisabled.
  auto cmd = g.ConfigRead32(0x04);
  REQUIRE(cmd.ok());
  REQUIRE(g.ConfigWrite32(0x04, (*cmd & 0xFFFF) & ~0x4u).ok());
  {
    auto drv = Driver::Create(g);
    if (!drv.ok()) {
      CHECK(drv.code() == Errc::kDmaDisabled);  // the GTT batch is DMA too
    } else {
      auto buf = (*drv)->Alloc(4096);
      REQUIRE(buf.ok());
      CommandBuilder cb;
      cb.Fill(buf->va, 4096, kSecret);
      auto seq = (*drv)->Submit(cb);
      Result<> w = seq.ok() ? (*drv)->Wait(*seq, WaitMode::kIrq, 2000) : Result<>(seq.error());
      CHECK(w.code() == Errc::kDmaDisabled);
      CHECK(CountSecret(buf->host) == 0);
    }
  }
  REQUIRE(g.ConfigWrite32(0x04, (*cmd & 0xFFFF) | 0x6u).ok());
  {
    auto drv = Driver::Create(g);
    REQUIRE(drv.ok());
    Result<> r = RunRounds(**drv, 1, 1);
    CHECK_MESSAGE(r.ok(), e2e::Why(r));
  }

  // 2. The GTT not programmed: a ring at a GPU VA with no entry. The doorbell is refused
  // kNotMapped and the ring does not move.
  REQUIRE(g.Reset().ok());
  const uint32_t far_va = 0x0200'0000;  // entry 8192, never written since the reset
  REQUIRE(g.Write32(abi::reg::kRingBaseLo, far_va).ok());
  REQUIRE(g.Write32(abi::reg::kRingBaseHi, 0).ok());
  REQUIRE(g.Write32(abi::reg::kRingSize, 4096).ok());
  REQUIRE(g.Write32(abi::reg::kCtrl, 1).ok());
  (void)g.Write32(abi::reg::kRingTail, 16);
  auto err = g.ReadError();
  REQUIRE(err.ok());
  CHECK(err->code == Errc::kNotMapped);
  CHECK(g.Status64(abi::status::kCompletedFence) == 0);  // nothing ran

  // 3. Guest memory not mapped: after DMA_UNMAP of guest RAM, a GTT entry into it is
  // refused kNotMapped, and the device never DMAs into nothing.
  REQUIRE(g.Reset().ok());
  REQUIRE(g.client().DmaUnmap({g.ram_base(), ByteSize{g.ram().size()}, 0}).ok());
  Result<> gw = g.Write64(abi::kGttOffset, g.ram_base().v | abi::kGttValid | abi::kGttWritable);
  CHECK(!gw.ok());  // the reply carries only an errno (ENOENT); the error report names it
  auto gerr = g.ReadError();
  REQUIRE(gerr.ok());
  CHECK(gerr->code == Errc::kNotMapped);
  CHECK(gerr->source == 2);  // GTT
  auto e = g.Read64(abi::kGttOffset);
  REQUIRE(e.ok());
  CHECK(*e == 0);
  e2e::CheckVictim(v.Stop());
  CheckShutdown(d);
}

namespace {

// Everything a fresh tenant can read of its vGPU, searched for tenant A's secret: config
// space, every dword of the register pages, the status page, every GTT entry, the whole
// aperture, and what the engine writes into fresh buffers (a COPY out of aperture pages
// nobody wrote, and catalogue kernels' outputs).
void ExpectNothingOf(const std::string& socket) {
  auto dev = Device::Open(GuestOptions(socket));
  REQUIRE(dev.ok());
  Device& g = **dev;
  for (uint32_t off = 0; off < 256; off += 4) {
    auto c = g.ConfigRead32(off);
    REQUIRE(c.ok());
    CHECK(*c != kSecret);
  }
  for (uint32_t off = 0; off < 0x100; off += 4) CHECK(Reg(g, off) != kSecret);
  for (uint32_t off = 0x1000; off < 0x1040; off += 4) {
    if (off == abi::priv::kGlobalReset) continue;  // refused registers read 0 anyway
    CHECK(Reg(g, off) != kSecret);
  }
  CHECK(Reg(g, abi::reg::kScratch) == 0);
  CHECK(Reg(g, abi::priv::kDisplayBase) == 0);
  for (uint32_t off = 0; off < 0x1000; off += 4) CHECK(g.Status32(off) != kSecret);
  CHECK(g.Status32(abi::status::kResets) == 0);  // a new device, not a reset one
  size_t nonzero = 0;
  for (uint32_t i = 0; i < g.gtt_entries(); ++i) {
    auto e = g.Read64(abi::kGttOffset + 8 * i);
    REQUIRE(e.ok());
    nonzero += *e != 0;
  }
  CHECK(nonzero == 0);
  CHECK(AllZero(g.aperture()));
  auto drv = Driver::Create(g);
  REQUIRE(drv.ok());
  auto ap = (*drv)->MapAperture(0, 8 << 20, false);
  REQUIRE(ap.ok());
  auto out = (*drv)->Alloc(8 << 20);
  REQUIRE(out.ok());
  std::memset(out->host.data(), 0xEE, out->host.size());
  CommandBuilder cb;
  cb.Copy(*ap, out->va, 8 << 20);
  auto seq = (*drv)->Submit(cb);
  REQUIRE(seq.ok());
  REQUIRE((*drv)->Wait(*seq).ok());
  CHECK(AllZero(out->host));
  Result<> r = RunRounds(**drv, 3, 21);
  CHECK_MESSAGE(r.ok(), e2e::Why(r));
  CHECK(CountSecret(g.ram()) == 0);
}

}  // namespace

TEST_CASE("tenant scrubbing: nothing of tenant A is readable by the next tenant of the same or another UUID") {
  mgmt::DaemonProc d;
  REQUIRE(d.Start());
  StartVgpu(d, kUuidA);
  StartVgpu(d, kUuidB);
  e2e::Victim v(d.Socket(kUuidB));
  {
    // Tenant A leaves its secret everywhere it can write.
    auto dev = Device::Open(GuestOptions(d.Socket(kUuidA)));
    REQUIRE(dev.ok());
    Device& g = **dev;
    auto drv = Driver::Create(g);
    REQUIRE(drv.ok());
    std::span<std::byte> ap = g.aperture();
    for (size_t i = 0; i + 4 <= ap.size() / 2; i += 4) std::memcpy(ap.data() + i, &kSecret, 4);  // by the CPU
    auto hi = (*drv)->MapAperture(ap.size() / 2, ap.size() / 2, true);
    REQUIRE(hi.ok());
    CommandBuilder cb;
    cb.Fill(*hi, ap.size() / 2, kSecret);  // by the engine
    auto seq = (*drv)->Submit(cb);
    REQUIRE(seq.ok());
    REQUIRE((*drv)->Wait(*seq).ok());
    REQUIRE(g.Write32(abi::reg::kScratch, kSecret).ok());
    for (uint32_t off = abi::priv::kDisplayBase; off <= 0x1034; off += 4) (void)g.Write32(off, kSecret);
    REQUIRE(g.Write32(abi::reg::kGttBatchAddrLo, kSecret & ~0xFu).ok());
    // GTT entries with a recognisable pattern (aperture pages in reverse).
    for (uint32_t i = 0; i < 64; ++i)
      REQUIRE((*drv)->WriteGtt(8000 + i, ((1000 - i) * 4096ull) | abi::kGttValid | abi::kGttAperture).ok());
    // The probe's positive control: the same search finds the secret as A.
    CHECK(CountSecret(g.aperture()) == ap.size() / 4);
    CHECK(Reg(g, abi::reg::kScratch) == kSecret);
    CHECK(g.Status32(abi::status::kScratch) == kSecret);
    CHECK(Reg(g, abi::priv::kDisplayBase) == kSecret);
    CHECK(*g.Read64(abi::kGttOffset + 8 * 8000) != 0);
  }  // A disconnects
  mgmt::Ran st = d.Ctl({"stop", kUuidA});
  REQUIRE(st.code == 0);
  StartVgpu(d, kUuidA);  // the same UUID, a new tenant
  {
    CAPTURE("same UUID");
    ExpectNothingOf(d.Socket(kUuidA));
  }
  REQUIRE(d.Ctl({"stop", kUuidA}).code == 0);
  StartVgpu(d, kUuidC);  // another UUID
  {
    CAPTURE("another UUID");
    ExpectNothingOf(d.Socket(kUuidC));
  }
  e2e::CheckVictim(v.Stop());
  CheckShutdown(d);
}
