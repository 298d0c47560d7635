// Scan-out (F10, docs/device-spec.md §Scan-out): one emulated plane per vGPU. The guest
// stages a plane in the DISPLAY_* registers of the privileged page and commits it with
// ENABLE or FLIP; the commit is checked as a whole against this vGPU's aperture there and
// then, and takes effect at the next boundary of the vGPU's frame clock (a timer on the
// daemon's loop), which raises the display vector. Nothing here waits: the clock is armed,
// never slept on, and a frame is read only as a bounded copy out of the aperture.
#include <cstring>

#include "mediator/vgpu_impl.h"

namespace vg::mediator {

namespace disp = abi::display;

uint32_t Vgpu::Impl::ReadDisplayStatus() const {
  uint32_t s = 0;
  if (regs_.display_live.valid) s |= disp::kStatusScanning;
  if (regs_.display_pending.valid) s |= disp::kStatusFlipPending;
  return s;
}

// FORMAT alone decides whether it is known: refused at once, so a staged format is always one
// the device can scan out.
Result<> Vgpu::Impl::WriteDisplayFormat(uint32_t v) {
  VG_ERROR_IF(disp::BytesPerPixel(v) == 0, Errc::kUnsupported, "pixel format {} unknown", v);
  regs_.display_format = v;
  return Ok();
}

// The staged registers are checked together (a plane is only wrong as a whole: a stride is
// too small for a width, a base too high for a height). A refusal reports the register at
// fault (ERR_ADDR its offset, ERR_INFO its value), not the commit register.
Result<DisplayPlane> Vgpu::Impl::CheckStagedPlane() {
  const DisplayPlane p{1, regs_.display_base, regs_.display_stride, regs_.display_format, regs_.display_width,
                       regs_.display_height};
  auto fault = [&](uint32_t reg, uint32_t v) { write_fault_ = WriteFault{abi::kErrSourceMmio, reg, v}; };
  const uint32_t bpp = disp::BytesPerPixel(p.format);
  if (bpp == 0) fault(abi::priv::kDisplayFormat, p.format);
  VG_ERROR_IF(bpp == 0, Errc::kUnsupported, "no pixel format staged ({})", p.format);
  if (p.width == 0 || p.width > disp::kMaxWidth) fault(abi::priv::kDisplayWidth, p.width);
  VG_ERROR_IF(p.width == 0, Errc::kInvalidArgument, "plane width 0");
  VG_ERROR_IF(p.width > disp::kMaxWidth, Errc::kLimitExceeded, "plane width {} > {}", p.width, disp::kMaxWidth);
  if (p.height == 0 || p.height > disp::kMaxHeight) fault(abi::priv::kDisplayHeight, p.height);
  VG_ERROR_IF(p.height == 0, Errc::kInvalidArgument, "plane height 0");
  VG_ERROR_IF(p.height > disp::kMaxHeight, Errc::kLimitExceeded, "plane height {} > {}", p.height,
              disp::kMaxHeight);
  const uint64_t row = uint64_t{p.width} * bpp;
  if (p.stride % disp::kStrideAlign != 0 || p.stride < row) fault(abi::priv::kDisplayStride, p.stride);
  VG_ERROR_IF(p.stride % disp::kStrideAlign != 0, Errc::kMisaligned, "stride {} not a multiple of {}", p.stride,
              disp::kStrideAlign);
  VG_ERROR_IF(p.stride < row, Errc::kInvalidArgument, "stride {} < {} bytes of a row", p.stride, row);
  if (p.base % disp::kStrideAlign != 0) fault(abi::priv::kDisplayBase, p.base);
  VG_ERROR_IF(p.base % disp::kStrideAlign != 0, Errc::kMisaligned, "base {:#x} not {}-byte aligned", p.base,
              disp::kStrideAlign);
  // 64-bit: base + stride × (height - 1) + row cannot wrap (each term < 2^32 × 2^12).
  const uint64_t end = uint64_t{p.base} + uint64_t{p.stride} * (p.height - 1) + row;
  if (end > cfg_.aperture_size) fault(abi::priv::kDisplayBase, p.base);
  VG_ERROR_IF(end > cfg_.aperture_size, Errc::kOutOfBounds, "plane [{:#x}, {:#x}) leaves the aperture ({:#x})",
              p.base, end, cfg_.aperture_size);
  return p;
}

// A commit replaces one still pending (mailbox): the latest wins at the frame boundary, and a
// guest that commits faster than the clock is not refused for it.
Result<> Vgpu::Impl::CommitStagedPlane() {
  VG_TRY_ASSIGN(DisplayPlane p, CheckStagedPlane());
  regs_.display_pending = p;
  RunFrameClock(true);
  return Ok();
}

Result<> Vgpu::Impl::WriteDisplayEnable(uint32_t v) {
  VG_ERROR_IF(v & ~disp::kEnable, Errc::kBadFlags, "DISPLAY_ENABLE bits {:#x} unknown", v & ~disp::kEnable);
  if (v & disp::kEnable) {
    VG_TRY(CommitStagedPlane());
  } else {
    // Off at once: nothing more is scanned out, a pending commit is dropped.
    regs_.display_pending = DisplayPlane{};
    regs_.display_live = DisplayPlane{};
  }
  regs_.display_enable = v;
  return Ok();
}

Result<> Vgpu::Impl::WriteDisplayFlip(uint32_t v) {
  VG_INVALID_IF(v != disp::kFlipMagic, "DISPLAY_FLIP takes {}, not {:#x}", disp::kFlipMagic, v);
  VG_ERROR_IF(!(regs_.display_enable & disp::kEnable), Errc::kBadState, "flip with the plane disabled");
  return CommitStagedPlane();
}

void Vgpu::Impl::RunFrameClock(bool run) {
  if (run == frame_clock_running_ || !cfg_.frame_clock) return;
  frame_clock_running_ = run;
  cfg_.frame_clock(run);
}

void Vgpu::Impl::FrameTick() {
  if (regs_.display_live.valid) ++regs_.display_frames;
  if (regs_.display_pending.valid) {
    regs_.display_live = regs_.display_pending;
    regs_.display_pending = DisplayPlane{};
    ++regs_.display_flips;
    Store32(abi::status::kDisplayFlips, regs_.display_flips);
    RaiseIrq(abi::kVectorDisplay);
  }
  // Nothing to scan out (disabled, reset): the clock stops until the next commit.
  if (!regs_.display_live.valid) RunFrameClock(false);
}

void Vgpu::OnFrameTick() {
  std::lock_guard lk(impl_->mu_);
  impl_->FrameTick();
}

// Copy, then use: rows are copied out of the aperture (the guest may be writing them; a torn
// frame is the guest's own business, never ours) into memory of our own. The plane was checked
// against the aperture when committed and the aperture never changes size (sealed), so every
// row lies inside it; the copy is at most kMaxWidth × kMaxHeight × 4 bytes (64 MiB).
Result<ScanoutFrame> Vgpu::CaptureScanout() const {
  std::lock_guard lk(impl_->mu_);
  const DisplayPlane p = impl_->regs_.display_live;
  VG_ERROR_IF(!p.valid, Errc::kBadState, "no plane is being scanned out");
  const uint32_t bpp = disp::BytesPerPixel(p.format);
  const uint64_t row = uint64_t{p.width} * bpp;
  const uint64_t end = uint64_t{p.base} + uint64_t{p.stride} * (p.height - 1) + row;
  VG_ERROR_IF(bpp == 0 || end > impl_->aperture_.size().v, Errc::kInternal, "live plane outside the aperture");
  ScanoutFrame f;
  f.width = p.width;
  f.height = p.height;
  f.format = p.format;
  f.flips = impl_->regs_.display_flips;
  try {
    f.pixels.resize(row * p.height);
  } catch (const std::bad_alloc&) {
    return Error{Errc::kOutOfMemory, fmt::format("{} bytes for a frame", row * p.height)};
  }
  const std::byte* src = impl_->aperture_.data() + p.base;
  for (uint32_t y = 0; y < p.height; ++y) std::memcpy(f.pixels.data() + y * row, src + uint64_t{y} * p.stride, row);
  return f;
}

}  // namespace vg::mediator
