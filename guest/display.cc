#include "guest/display.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>

namespace vg::guest {

Result<> Display::Write(uint32_t off, uint32_t v) {
  VG_TRY(dev_.ClearError());
  Result<> w = dev_.Write32(off, v);
  // A real MMIO write reports nothing: the error report says whether it was refused.
  VG_TRY_ASSIGN(ErrorReport e, dev_.ReadError());
  if (e.code != Errc::kOk)
    return Error{e.code, fmt::format("register {:#x} <- {:#x} refused (at {:#x}, info {:#x})", off, v, e.addr, e.info)};
  return w;
}

Result<> Display::Configure(const PlaneConfig& p) {
  VG_TRY(Write(abi::priv::kDisplayFormat, p.format));
  VG_TRY(Write(abi::priv::kDisplayBase, p.base));
  VG_TRY(Write(abi::priv::kDisplayStride, p.stride));
  VG_TRY(Write(abi::priv::kDisplayWidth, p.width));
  VG_TRY(Write(abi::priv::kDisplayHeight, p.height));
  return Write(abi::priv::kDisplayEnable, abi::display::kEnable);
}

Result<uint32_t> Display::Flip(uint32_t base) {
  const uint32_t target = flips() + 1;
  VG_TRY(Write(abi::priv::kDisplayBase, base));
  VG_TRY(Write(abi::priv::kDisplayFlip, abi::display::kFlipMagic));
  return target;
}

Result<> Display::WaitFlip(uint32_t target, int timeout_ms) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  const EventFd* irq = dev_.irq_eventfd(abi::kVectorDisplay);
  // Wrap-safe: the counter is a u32 that the device only increments.
  while (static_cast<int32_t>(flips() - target) < 0) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    VG_ERROR_IF(left.count() <= 0, Errc::kTimeout, "flip {} not done in {} ms (at {})", target, timeout_ms, flips());
    if (irq) {
      // Sliced: an interrupt lost to a masked vector or to PCI state still ends the wait.
      (void)irq->Wait(static_cast<int>(std::min<int64_t>(left.count(), 20)));
    } else {
      ::usleep(1000);
    }
  }
  return dev_.Write32(abi::reg::kIrqStatus, 1u << abi::kVectorDisplay);
}

Result<> Display::Disable() { return Write(abi::priv::kDisplayEnable, 0); }

}  // namespace vg::guest
