// F10 scan-out through the real daemon: a guest process programs its vGPU's plane through
// BAR0. Every plane that lies (outside the aperture, an unknown format, a stride too small or
// misaligned, zero or oversized dimensions, a flip with nothing enabled) is refused by name in
// the error report, and nothing of it is scanned out, while a victim tenant on vGPU B keeps
// running kernels bit-exact. A good plane flips at a frame boundary and raises the display
// vector. The same registers written by LOAD_REG in the ring are checked the same way: a lying
// plane is refused by name and flips nothing, a good flip lands.
#include <doctest.h>

#include <chrono>
#include <thread>

#include "guest/display.h"
#include "guest/guest.h"
#include "tests/e2e/guest_checks.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/victim.h"

using namespace vg;
using namespace vg::e2e;
using namespace vg::guest;
namespace disp = vg::abi::display;

namespace {

uint32_t Reg(Device& d, uint32_t off) {
  auto r = d.Read32(off);
  REQUIRE(r.ok());
  return *r;
}

struct Attack {
  const char* what;
  PlaneConfig plane;
  Errc code;
  uint32_t reg_at_fault;  // ERR_ADDR
};

}  // namespace

TEST_CASE("scan-out: lying planes are refused by name, nothing is scanned out, the victim stays exact") {
  Daemon daemon({std::string(kUuidA) + ":small", std::string(kUuidB) + ":small"});
  Victim victim(daemon.Socket(1));
  auto a = OpenGuest(daemon.Socket(0));
  REQUIRE((Reg(*a, abi::reg::kCaps) & abi::kCapDisplay) != 0);
  const uint32_t ap = Reg(*a, abi::reg::kApertureSizeLo);
  REQUIRE(ap >= (1u << 20));
  Display disp(*a);

  const Attack attacks[] = {
      {"last row past the aperture", {ap - 64 * 4, 256, disp::kFormatXrgb8888, 64, 2}, Errc::kOutOfBounds,
       abi::priv::kDisplayBase},
      {"base past the aperture", {ap, 256, disp::kFormatXrgb8888, 64, 1}, Errc::kOutOfBounds, abi::priv::kDisplayBase},
      {"base + stride x height wraps 32 bits", {0xFFFFFFC0u, 0x10000, disp::kFormatXrgb8888, 64, 4096},
       Errc::kOutOfBounds, abi::priv::kDisplayBase},
      {"stride x height past the aperture", {0, 0xFFFFFFC0u, disp::kFormatXrgb8888, 64, 2}, Errc::kOutOfBounds,
       abi::priv::kDisplayBase},
      {"stride smaller than a row", {0, 512, disp::kFormatXrgb8888, 256, 16}, Errc::kInvalidArgument,
       abi::priv::kDisplayStride},
      {"stride smaller than a row (16 bpp)", {0, 448, disp::kFormatRgb565, 256, 16}, Errc::kInvalidArgument,
       abi::priv::kDisplayStride},
      {"stride not aligned", {0, 1028, disp::kFormatXrgb8888, 256, 16}, Errc::kMisaligned, abi::priv::kDisplayStride},
      {"base not aligned", {4, 1024, disp::kFormatXrgb8888, 256, 16}, Errc::kMisaligned, abi::priv::kDisplayBase},
      {"width 0", {0, 1024, disp::kFormatXrgb8888, 0, 16}, Errc::kInvalidArgument, abi::priv::kDisplayWidth},
      {"height 0", {0, 1024, disp::kFormatXrgb8888, 256, 0}, Errc::kInvalidArgument, abi::priv::kDisplayHeight},
      {"width over the limit", {0, 32768, disp::kFormatXrgb8888, disp::kMaxWidth + 1, 1}, Errc::kLimitExceeded,
       abi::priv::kDisplayWidth},
      {"height over the limit", {0, 64, disp::kFormatXrgb8888, 16, disp::kMaxHeight + 1}, Errc::kLimitExceeded,
       abi::priv::kDisplayHeight},
      {"unknown format", {0, 1024, 99, 256, 16}, Errc::kUnsupported, abi::priv::kDisplayFormat},
      {"format 0", {0, 1024, 0, 256, 16}, Errc::kUnsupported, abi::priv::kDisplayFormat},
  };
  for (const Attack& t : attacks) {
    CAPTURE(t.what);
    Result<> r = disp.Configure(t.plane);
    REQUIRE(!r.ok());
    CHECK(r.code() == t.code);
    auto e = a->ReadError();
    REQUIRE(e.ok());
    CHECK(e->code == t.code);
    CHECK(e->source == abi::kErrSourceMmio);
    CHECK(e->addr == t.reg_at_fault);
    // Nothing was committed: no plane, no flip, no display interrupt.
    CHECK(Reg(*a, abi::priv::kDisplayStatus) == 0);
    CHECK(Reg(*a, abi::priv::kDisplayEnable) == 0);
    CHECK(disp.flips() == 0);
  }
  // A flip with the plane off, a flip with a bad value, unknown ENABLE bits.
  REQUIRE(a->ClearError().ok());
  CHECK(!a->Write32(abi::priv::kDisplayFlip, disp::kFlipMagic).ok());
  CHECK(a->ReadError()->code == Errc::kBadState);
  CHECK(!a->Write32(abi::priv::kDisplayEnable, 2).ok());
  CHECK(a->ReadError()->code == Errc::kBadFlags);
  CHECK(disp.flips() == 0);
  CHECK(Reg(*a, abi::priv::kDisplayStatus) == 0);

  // A good plane after all of that: enabled at the next frame boundary, display vector raised.
  REQUIRE(a->ClearError().ok());
  const PlaneConfig good{0, 256, disp::kFormatXrgb8888, 64, 64};
  REQUIRE(disp.Configure(good).ok());
  REQUIRE(disp.WaitFlip(1, 2000).ok());
  CHECK(Reg(*a, abi::priv::kDisplayStatus) == disp::kStatusScanning);
  CHECK(Reg(*a, abi::priv::kDisplayLiveBase) == 0);
  // A refused flip leaves the plane being scanned out as it was.
  const auto refused = disp.Flip(ap);
  CHECK(refused.code() == Errc::kOutOfBounds);
  CHECK(Reg(*a, abi::priv::kDisplayLiveBase) == 0);
  CHECK(Reg(*a, abi::priv::kDisplayStatus) == disp::kStatusScanning);
  CHECK(disp.flips() == 1);

  CheckVictim(victim.Stop());
  CHECK(daemon.Alive());
}

TEST_CASE("scan-out: a flip takes effect at the next frame boundary and raises the display vector") {
  Daemon daemon({std::string(kUuidA) + ":small"});
  auto a = OpenGuest(daemon.Socket(0));
  Display disp(*a);
  const PlaneConfig p{0, 1024, disp::kFormatArgb8888, 256, 64};
  const EventFd& irq = a->irq(abi::kVectorDisplay);
  const uint32_t display_bit = 1u << abi::kVectorDisplay;
  // Nothing has raised the display vector before the first commit.
  CHECK(irq.Drain().value_or(1) == 0);
  CHECK((Reg(*a, abi::reg::kIrqStatus) & display_bit) == 0);
  REQUIRE(disp.Configure(p).ok());
  // Committed, not yet scanned out until a frame boundary: pending, or already taken.
  const uint32_t st = Reg(*a, abi::priv::kDisplayStatus);
  CHECK((st == disp::kStatusFlipPending || st == disp::kStatusScanning));
  // Flip-done is an interrupt, not only a counter: the display vector's eventfd fires (waited
  // on directly, not through WaitFlip, which would also pass by polling DISPLAY_FLIPS), and by
  // then the flip has taken effect and IRQ_STATUS bit 2 is set.
  auto fired = irq.Wait(2000);
  REQUIRE(fired.ok());
  CHECK(*fired >= 1);
  CHECK(disp.flips() == 1);
  CHECK((Reg(*a, abi::reg::kIrqStatus) & display_bit) != 0);
  CHECK(Reg(*a, abi::priv::kDisplayLiveBase) == 0);
  // RW1C clears it; frame boundaries without a commit raise nothing (the vector is flip-done,
  // not every vblank): six frames later neither the eventfd nor the bit has fired again.
  REQUIRE(a->Write32(abi::reg::kIrqStatus, display_bit).ok());
  CHECK((Reg(*a, abi::reg::kIrqStatus) & display_bit) == 0);
  const uint32_t frames_before = Reg(*a, abi::priv::kDisplayFrames);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  CHECK(Reg(*a, abi::priv::kDisplayFrames) > frames_before);
  CHECK(irq.Drain().value_or(1) == 0);
  CHECK((Reg(*a, abi::reg::kIrqStatus) & display_bit) == 0);
  REQUIRE(disp.WaitFlip(1, 2000).ok());

  // Flip to the second buffer: the old base is scanned out until the boundary.
  auto target = disp.Flip(64 * 1024);
  REQUIRE(target.ok());
  CHECK(*target == 2);
  REQUIRE(disp.WaitFlip(*target, 2000).ok());
  CHECK(Reg(*a, abi::priv::kDisplayLiveBase) == 64 * 1024);
  // A refused flip raises the error vector, never flip-done. (WaitFlip may have seen the
  // counter before the eventfd: drain what the good flip left.)
  (void)irq.Drain();
  const uint32_t flips_before_refusal = disp.flips();
  CHECK(disp.Flip(0xFFFFFFC0u).code() == Errc::kOutOfBounds);
  REQUIRE(a->ClearError().ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK(disp.flips() == flips_before_refusal);
  CHECK(irq.Drain().value_or(1) == 0);
  CHECK((Reg(*a, abi::reg::kIrqStatus) & display_bit) == 0);
  CHECK(Reg(*a, abi::priv::kDisplayFlips) == 2);
  // The frame clock runs at about 60 Hz while the plane is on (the bound is loose: a count,
  // not a timing assertion).
  const uint32_t f0 = Reg(*a, abi::priv::kDisplayFrames);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const uint32_t f1 = Reg(*a, abi::priv::kDisplayFrames);
  CHECK(f1 > f0);
  CHECK(f1 - f0 <= 60);
  // Several commits within one frame: the last one wins, one flip.
  const uint32_t before = disp.flips();
  REQUIRE(disp.Flip(0).ok());
  REQUIRE(disp.Flip(128 * 1024).ok());
  REQUIRE(disp.WaitFlip(before + 1, 2000).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK(Reg(*a, abi::priv::kDisplayLiveBase) == 128 * 1024);
  // Off at once; a reset turns it off too.
  REQUIRE(disp.Disable().ok());
  CHECK(Reg(*a, abi::priv::kDisplayStatus) == 0);
  const uint32_t n = disp.flips();
  REQUIRE(disp.Configure(p).ok());
  REQUIRE(disp.WaitFlip(n + 1, 2000).ok());
  REQUIRE(a->Write32(abi::reg::kReset, abi::kResetMagic).ok());
  CHECK(Reg(*a, abi::priv::kDisplayStatus) == 0);
  CHECK(a->Status32(abi::status::kDisplayFlips) == 0);
  CHECK(daemon.Alive());
}

TEST_CASE("scan-out by LOAD_REG in the ring: lying planes are refused by name, flips unchanged; a good flip lands") {
  Daemon daemon({std::string(kUuidA) + ":small"});
  auto a = OpenGuest(daemon.Socket(0), 8 << 20);
  auto drv = Driver::Create(*a);
  REQUIRE(drv.ok());
  Display disp(*a);
  const uint32_t ap = Reg(*a, abi::reg::kApertureSizeLo);
  // Submits and waits for the fence; the refusal reported on the way, if any (Wait returns
  // a refusal it sees before the fence: then it waits on for the fence).
  auto run = [&](const CommandBuilder& cb) -> Result<> {
    VG_TRY_ASSIGN(uint64_t seq, (*drv)->Submit(cb));
    Result<> first = Ok();
    for (int i = 0; i < 4; ++i) {
      Result<> w = (*drv)->Wait(seq, WaitMode::kIrq, 5000);
      if (w.ok()) return first;
      if (w.code() == Errc::kTimeout) return w;
      if (first.ok()) first = std::move(w);
    }
    return first;
  };

  // The whole plane staged and enabled from the ring, no register written by MMIO.
  CommandBuilder on;
  on.LoadReg(abi::priv::kDisplayFormat, disp::kFormatXrgb8888)
      .LoadReg(abi::priv::kDisplayBase, 0)
      .LoadReg(abi::priv::kDisplayStride, 1024)
      .LoadReg(abi::priv::kDisplayWidth, 256)
      .LoadReg(abi::priv::kDisplayHeight, 64)
      .LoadReg(abi::priv::kDisplayEnable, disp::kEnable);
  REQUIRE(run(on).ok());
  REQUIRE(disp.WaitFlip(1, 2000).ok());
  CHECK(Reg(*a, abi::priv::kDisplayStatus) == disp::kStatusScanning);
  CHECK(Reg(*a, abi::priv::kDisplayLiveBase) == 0);
  CHECK(Reg(*a, abi::priv::kDisplayStride) == 1024);
  CHECK(Reg(*a, abi::priv::kDisplayHeight) == 64);

  // A flip by LOAD_REG, ordered after the rendering before it: a new base, then FLIP.
  CommandBuilder flip;
  flip.LoadReg(abi::priv::kDisplayBase, 256 * 1024).LoadReg(abi::priv::kDisplayFlip, disp::kFlipMagic);
  REQUIRE(run(flip).ok());
  REQUIRE(disp.WaitFlip(2, 2000).ok());
  CHECK(Reg(*a, abi::priv::kDisplayLiveBase) == 256 * 1024);

  // Lying planes committed by LOAD_REG: refused by name (the register at fault, as for MMIO),
  // nothing flips, the plane scanned out stays as it was.
  struct RingAttack {
    const char* what;
    uint32_t reg, value;  // staged by LOAD_REG, then (flip) FLIP by LOAD_REG
    Errc code;
    uint32_t reg_at_fault;
    bool flip = true;
  };
  const RingAttack attacks[] = {
      {"base past the aperture", abi::priv::kDisplayBase, ap, Errc::kOutOfBounds, abi::priv::kDisplayBase},
      {"last row past the aperture", abi::priv::kDisplayBase, ap - 1024 * 32, Errc::kOutOfBounds,
       abi::priv::kDisplayBase},
      {"stride smaller than a row", abi::priv::kDisplayStride, 512, Errc::kInvalidArgument,
       abi::priv::kDisplayStride},
      {"stride not aligned", abi::priv::kDisplayStride, 1028, Errc::kMisaligned, abi::priv::kDisplayStride},
      {"height over the limit", abi::priv::kDisplayHeight, disp::kMaxHeight + 1, Errc::kLimitExceeded,
       abi::priv::kDisplayHeight},
      {"unknown format (refused at once, as it is staged)", abi::priv::kDisplayFormat, 99, Errc::kUnsupported,
       abi::priv::kDisplayFormat, false},
  };
  const uint32_t good[] = {256 * 1024, 1024, 64};  // BASE, STRIDE, HEIGHT as staged above
  for (const RingAttack& t : attacks) {
    CAPTURE(t.what);
    REQUIRE(a->ClearError().ok());
    (void)a->irq(abi::kVectorDisplay).Drain();
    const uint32_t flips = disp.flips();
    const uint32_t errors = Reg(*a, abi::reg::kErrCount);
    CommandBuilder cb;
    cb.LoadReg(t.reg, t.value);
    if (t.flip) cb.LoadReg(abi::priv::kDisplayFlip, disp::kFlipMagic);
    Result<> r = run(cb);
    // The fence may pass (the refusal is the register write's, reported as its own) or the
    // wait may return the refusal; either way the error report names it, once.
    CHECK_MESSAGE((r.ok() || r.code() == t.code), "got ", ErrcName(r.code()), ", want ", ErrcName(t.code));
    CHECK(Reg(*a, abi::reg::kErrCount) == errors + 1);
    auto e = a->ReadError();
    REQUIRE(e.ok());
    CHECK(e->code == t.code);
    CHECK(e->source == abi::kErrSourceMmio);
    CHECK(e->addr == t.reg_at_fault);
    // Two frames later: no flip took effect, no flip-done, the same plane scanned out.
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    CHECK(disp.flips() == flips);
    CHECK(a->irq(abi::kVectorDisplay).Drain().value_or(1) == 0);
    CHECK(Reg(*a, abi::priv::kDisplayStatus) == disp::kStatusScanning);
    CHECK(Reg(*a, abi::priv::kDisplayLiveBase) == 256 * 1024);
    // Stage the good values again (by MMIO: staging commits nothing).
    REQUIRE(a->Write32(abi::priv::kDisplayBase, good[0]).ok());
    REQUIRE(a->Write32(abi::priv::kDisplayStride, good[1]).ok());
    REQUIRE(a->Write32(abi::priv::kDisplayHeight, good[2]).ok());
  }
  // After all of that, a good flip by LOAD_REG still lands, and the ring still runs.
  REQUIRE(a->ClearError().ok());
  const uint32_t n = disp.flips();
  CommandBuilder back;
  back.LoadReg(abi::priv::kDisplayBase, 0).LoadReg(abi::priv::kDisplayFlip, disp::kFlipMagic);
  REQUIRE(run(back).ok());
  REQUIRE(disp.WaitFlip(n + 1, 2000).ok());
  CHECK(Reg(*a, abi::priv::kDisplayLiveBase) == 0);
  CHECK(daemon.Alive());
}
