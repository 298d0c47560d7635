// Scan-out (F10, docs/device-spec.md §Scan-out): one emulated plane per vGPU. The guest
// stages a plane in the DISPLAY_* registers of the privileged page and commits it with
// ENABLE or FLIP; the commit is checked as a whole against this vGPU's aperture there and
// then, and takes effect at the next boundary of the vGPU's frame clock (a timer on the
// daemon's loop), which raises the display vector. Nothing here waits: the clock is armed,
// never slept on, and a frame is read only as a bounded copy out of the aperture.
#include <algorithm>
#include <chrono>
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
// guest that commits faster than the clock, or than its frame limit, is not refused for it (a
// refusal would count as a fault, F7, and throttle an honest spinning desktop).
Result<> Vgpu::Impl::CommitStagedPlane() {
  VG_TRY_ASSIGN(DisplayPlane p, CheckStagedPlane());
  ++counters_.flips_requested;
  if (regs_.display_pending.valid) ++counters_.flips_replaced;
  regs_.display_pending = p;
  pending_held_ = false;
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
  const auto now = std::chrono::steady_clock::now();
  if (run) {
    // The boundaries that would have passed while it was stopped earn their credit, so that
    // turning the plane off and on again neither bypasses the limit nor is punished by it.
    const auto idle = now - clock_stopped_at_;
    AddFrameCredit(static_cast<uint64_t>(idle / std::chrono::microseconds(1000000 / disp::kFrameHz)));
    frame_credit_ = std::min(frame_credit_, disp::kFrameHz);
    fps_window_start_ = now;
    fps_window_presented_ = 0;
  } else {
    clock_stopped_at_ = now;
    counters_.display_fps = 0;  // nothing is presented while the clock is stopped
  }
  cfg_.frame_clock(run);
}

// Capped at one presentation and one boundary's earning: a boundary may spend what it just
// earned on top of a whole presentation's worth (so 24 a second is 24, not 20); FrameTick
// then caps what is left at one presentation, so nothing banks into a burst.
void Vgpu::Impl::AddFrameCredit(uint64_t frames) {
  if (frame_limit_ == 0) {
    frame_credit_ = disp::kFrameHz;
    return;
  }
  const uint64_t c = frame_credit_ + std::min<uint64_t>(frames, disp::kFrameHz) * frame_limit_;
  frame_credit_ = static_cast<uint32_t>(std::min<uint64_t>(c, disp::kFrameHz + frame_limit_));
}

// Frame pacing: a commit waits for a boundary at which the vGPU has a presentation's credit
// (the limit accrues limit/kFrameHz of one per boundary). Counting boundaries, not reading a
// clock, makes the pattern exact whatever the timer's jitter: limit 30 presents at every
// other boundary, 24 at 3, 2, 3, 2 ... boundaries apart. A held commit stays pending
// (DISPLAY_STATUS bit1) and the display vector fires only when it takes effect, so a guest
// that waits for flip-done is paced without a refusal or a wait of the daemon's.
void Vgpu::Impl::FrameTick() {
  if (regs_.display_live.valid) ++regs_.display_frames;
  AddFrameCredit(1);
  if (regs_.display_pending.valid) {
    if (frame_credit_ < disp::kFrameHz) {
      if (!pending_held_) ++counters_.flips_deferred;
      pending_held_ = true;
    } else {
      if (frame_limit_) frame_credit_ -= disp::kFrameHz;
      regs_.display_live = regs_.display_pending;
      regs_.display_pending = DisplayPlane{};
      pending_held_ = false;
      ++regs_.display_flips;
      ++counters_.flips_presented;
      ++fps_window_presented_;
      Store32(abi::status::kDisplayFlips, regs_.display_flips);
      RaiseIrq(abi::kVectorDisplay);
    }
  }
  frame_credit_ = std::min(frame_credit_, disp::kFrameHz);
  const auto now = std::chrono::steady_clock::now();
  if (now - fps_window_start_ >= std::chrono::seconds(1)) {
    const double secs = std::chrono::duration<double>(now - fps_window_start_).count();
    counters_.display_fps = static_cast<uint64_t>(static_cast<double>(fps_window_presented_) / secs + 0.5);
    fps_window_start_ = now;
    fps_window_presented_ = 0;
  }
  // Nothing to scan out and nothing waiting (disabled, reset): the clock stops until the
  // next commit. A commit the limit holds keeps it running.
  if (!regs_.display_live.valid && !regs_.display_pending.valid) RunFrameClock(false);
}

Result<> Vgpu::SetFrameLimit(uint32_t fps) {
  VG_INVALID_IF(fps > kMaxFrameLimit, "frame limit {} > {} (the frame clock)", fps, kMaxFrameLimit);
  std::lock_guard lk(impl_->mu_);
  Impl& i = *impl_;
  // From none to a limit: the first presentation is not held (the credit was full).
  if (i.frame_limit_ == 0) i.frame_credit_ = disp::kFrameHz;
  i.frame_limit_ = fps;
  return Ok();
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
