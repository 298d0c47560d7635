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
