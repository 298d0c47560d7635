// F10: the device model's scan-out alone, with the frame clock driven by hand (no loop): a
// commit waits for the frame boundary, commits within one frame make one flip, the display
// vector is raised at the boundary and not before, and a reset turns the plane off.
#include <doctest.h>

#include <cstring>

#include "mediator/mediator.h"

using namespace vg;
using namespace vg::mediator;
namespace vu = vg::vfio_user;
namespace disp = vg::abi::display;

namespace {

std::unique_ptr<Vgpu> Make(int* clock_runs) {
  VgpuConfig cfg;
  cfg.uuid = Uuid::Random();
  cfg.aperture_size = 1 << 20;
  cfg.gtt_entries = 64;
  cfg.frame_clock = [clock_runs](bool run) { *clock_runs += run ? 1 : -1; };
  auto v = Vgpu::Create(cfg);
  REQUIRE(v.ok());
  return std::move(v).value();
}
uint32_t Rd(Vgpu& v, uint32_t off) {
  uint32_t x = 0;
  REQUIRE(v.RegionRead(vu::kBar0Region, off, std::as_writable_bytes(std::span(&x, 1))).ok());
  return x;
}
Result<> Wr(Vgpu& v, uint32_t off, uint32_t x) {
  return v.RegionWrite(vu::kBar0Region, off, std::as_bytes(std::span(&x, 1)));
}

}  // namespace

TEST_CASE("a commit takes effect at the next frame boundary, the latest of a frame wins") {
  int clock = 0;
  auto v = Make(&clock);
  REQUIRE(Wr(*v, abi::priv::kDisplayFormat, disp::kFormatXrgb8888).ok());
  REQUIRE(Wr(*v, abi::priv::kDisplayStride, 256).ok());
  REQUIRE(Wr(*v, abi::priv::kDisplayWidth, 64).ok());
  REQUIRE(Wr(*v, abi::priv::kDisplayHeight, 64).ok());
  REQUIRE(Wr(*v, abi::priv::kDisplayBase, 4096).ok());
  CHECK(clock == 0);
  REQUIRE(Wr(*v, abi::priv::kDisplayEnable, disp::kEnable).ok());
  CHECK(clock == 1);  // the clock runs once something waits for a frame
  CHECK(Rd(*v, abi::priv::kDisplayStatus) == disp::kStatusFlipPending);
  CHECK(Rd(*v, abi::priv::kDisplayFlips) == 0);
  CHECK((Rd(*v, abi::reg::kIrqStatus) & (1u << abi::kVectorDisplay)) == 0);
  CHECK(v->CaptureScanout().code() == Errc::kBadState);  // nothing scanned out yet
  v->OnFrameTick();
  CHECK(Rd(*v, abi::priv::kDisplayStatus) == disp::kStatusScanning);
  CHECK(Rd(*v, abi::priv::kDisplayFlips) == 1);
  CHECK(Rd(*v, abi::priv::kDisplayLiveBase) == 4096);
  CHECK((Rd(*v, abi::reg::kIrqStatus) & (1u << abi::kVectorDisplay)) != 0);
  REQUIRE(Wr(*v, abi::reg::kIrqStatus, 1u << abi::kVectorDisplay).ok());

  // Two flips within one frame: one takes effect, the last.
  REQUIRE(Wr(*v, abi::priv::kDisplayBase, 8192).ok());
  REQUIRE(Wr(*v, abi::priv::kDisplayFlip, disp::kFlipMagic).ok());
  REQUIRE(Wr(*v, abi::priv::kDisplayBase, 16384).ok());
  REQUIRE(Wr(*v, abi::priv::kDisplayFlip, disp::kFlipMagic).ok());
  CHECK(Rd(*v, abi::priv::kDisplayLiveBase) == 4096);  // until the boundary
  CHECK((Rd(*v, abi::reg::kIrqStatus) & (1u << abi::kVectorDisplay)) == 0);
  v->OnFrameTick();
  CHECK(Rd(*v, abi::priv::kDisplayLiveBase) == 16384);
  CHECK(Rd(*v, abi::priv::kDisplayFlips) == 2);
  v->OnFrameTick();
  CHECK(Rd(*v, abi::priv::kDisplayFlips) == 2);
  CHECK(Rd(*v, abi::priv::kDisplayFrames) == 2);  // boundaries while scanning out

  // The copy a screenshot takes: rows STRIDE apart, packed.
  auto f = v->CaptureScanout();
  REQUIRE(f.ok());
  CHECK(f->width == 64);
  CHECK(f->pixels.size() == 64u * 64 * 4);

  // Reset: off; the clock stops at its next tick.
  REQUIRE(Wr(*v, abi::reg::kReset, abi::kResetMagic).ok());
  CHECK(Rd(*v, abi::priv::kDisplayStatus) == 0);
  v->OnFrameTick();
  CHECK(clock == 0);
  CHECK(Rd(*v, abi::priv::kDisplayFlips) == 0);
}

namespace {

// A plane on, its first commit taken, the display vector cleared.
void PlaneOn(Vgpu& v) {
  REQUIRE(Wr(v, abi::priv::kDisplayFormat, disp::kFormatXrgb8888).ok());
  REQUIRE(Wr(v, abi::priv::kDisplayStride, 256).ok());
  REQUIRE(Wr(v, abi::priv::kDisplayWidth, 64).ok());
  REQUIRE(Wr(v, abi::priv::kDisplayHeight, 64).ok());
  REQUIRE(Wr(v, abi::priv::kDisplayBase, 0).ok());
  REQUIRE(Wr(v, abi::priv::kDisplayEnable, disp::kEnable).ok());
  v.OnFrameTick();
  REQUIRE(Rd(v, abi::priv::kDisplayFlips) == 1);
}

// A guest that commits before every frame boundary and never waits: flips presented over
// `ticks` boundaries.
uint32_t Spin(Vgpu& v, int ticks) {
  const uint32_t f0 = Rd(v, abi::priv::kDisplayFlips);
  for (int t = 0; t < ticks; ++t) {
    REQUIRE(Wr(v, abi::priv::kDisplayBase, (t % 2) * 65536).ok());
    REQUIRE(Wr(v, abi::priv::kDisplayFlip, disp::kFlipMagic).ok());
    REQUIRE(Wr(v, abi::priv::kDisplayFlip, disp::kFlipMagic).ok());  // replaces the first (mailbox)
    v.OnFrameTick();
  }
  return Rd(v, abi::priv::kDisplayFlips) - f0;
}

}  // namespace

TEST_CASE("frame pacing: a limit presents that many commits per 60 boundaries, exactly, whatever the guest does") {
  int clock = 0;
  auto v = Make(&clock);
  PlaneOn(*v);
  CHECK(Spin(*v, 60) == 60);  // no limit: every boundary
  for (uint32_t limit : {30u, 24u, 20u, 1u, 60u}) {
    CAPTURE(limit);
    REQUIRE(v->SetFrameLimit(limit).ok());
    Spin(*v, 60);  // settle the credit
    CHECK(Spin(*v, 120) == 2 * limit);
  }
  // Limit 30: presentations alternate with held boundaries; the display vector fires only
  // for a presentation, and a held commit stays pending (DISPLAY_STATUS bit1).
  REQUIRE(v->SetFrameLimit(30).ok());
  Spin(*v, 3);
  int presented = 0;
  for (int t = 0; t < 6; ++t) {
    REQUIRE(Wr(*v, abi::reg::kIrqStatus, 1u << abi::kVectorDisplay).ok());
    const uint32_t before = Rd(*v, abi::priv::kDisplayFlips);
    REQUIRE(Wr(*v, abi::priv::kDisplayFlip, disp::kFlipMagic).ok());
    v->OnFrameTick();
    const bool took = Rd(*v, abi::priv::kDisplayFlips) != before;
    presented += took;
    CHECK(((Rd(*v, abi::reg::kIrqStatus) & (1u << abi::kVectorDisplay)) != 0) == took);
    CHECK(((Rd(*v, abi::priv::kDisplayStatus) & disp::kStatusFlipPending) != 0) == !took);
  }
  CHECK(presented == 3);

  // The host's counters: every commit requested is presented, replaced, or still pending.
  const VgpuCounters c = v->Counters();
  CHECK(c.flips_deferred > 0);
  CHECK(c.flips_replaced > 0);
  CHECK(c.flips_requested == c.flips_presented + c.flips_replaced + ((Rd(*v, abi::priv::kDisplayStatus) & 2) ? 1 : 0));
  CHECK(c.flips_presented == Rd(*v, abi::priv::kDisplayFlips));

  // Limit 0: off again; every boundary.
  REQUIRE(v->SetFrameLimit(0).ok());
  CHECK(Spin(*v, 30) == 30);
}

TEST_CASE("frame pacing: out-of-range limits are refused; turning the plane off and on does not bypass the limit") {
  int clock = 0;
  auto v = Make(&clock);
  CHECK(v->SetFrameLimit(kMaxFrameLimit + 1).code() == Errc::kInvalidArgument);
  CHECK(v->SetFrameLimit(UINT32_MAX).code() == Errc::kInvalidArgument);
  VgpuConfig bad;
  bad.uuid = Uuid::Random();
  bad.aperture_size = 1 << 20;
  bad.gtt_entries = 64;
  bad.frame_limit = 61;
  CHECK(Vgpu::Create(bad).code() == Errc::kInvalidArgument);

  REQUIRE(v->SetFrameLimit(6).ok());  // one presentation per 10 boundaries
  PlaneOn(*v);
  // Off and on at once, again and again: each ENABLE is a commit like a flip, paced the same.
  const uint32_t f0 = Rd(*v, abi::priv::kDisplayFlips);
  for (int t = 0; t < 60; ++t) {
    REQUIRE(Wr(*v, abi::priv::kDisplayEnable, 0).ok());
    REQUIRE(Wr(*v, abi::priv::kDisplayEnable, disp::kEnable).ok());
    v->OnFrameTick();
  }
  CHECK(Rd(*v, abi::priv::kDisplayFlips) - f0 <= 7);
  CHECK(Rd(*v, abi::priv::kDisplayFlips) - f0 >= 5);
  CHECK(clock == 1);  // a held commit keeps the clock running
}
