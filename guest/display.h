#pragma once
// The guest's scan-out (F10, docs/device-spec.md §Scan-out): configure the vGPU's plane, flip
// to a new base, wait for the flip to take effect. Works on any DeviceBackend (a test
// process's vfio-user Device, or the PCI function inside a VM).

#include <cstdint>

#include "base/base.h"
#include "guest/backend.h"

namespace vg::guest {

struct PlaneConfig {
  uint32_t base = 0;    // byte offset in the aperture
  uint32_t stride = 0;  // bytes per row, a multiple of abi::display::kStrideAlign
  uint32_t format = abi::display::kFormatXrgb8888;
  uint32_t width = 0, height = 0;
};

class Display {
 public:
  explicit Display(DeviceBackend& dev) : dev_(dev) {}

  // Stages the plane and enables it; it is scanned out from the next frame boundary. A plane
  // the device refuses is returned as the error the device recorded (ERR_CODE), by name.
  Result<> Configure(const PlaneConfig& p);
  // Stages `base` and flips; the rest of the plane stays as configured. Returns the flip count
  // WaitFlip waits for.
  Result<uint32_t> Flip(uint32_t base);
  // Waits until `target` flips have taken effect (the status page's DISPLAY_FLIPS), on the
  // display vector's eventfd when the backend has one, else by polling; clears the vector's
  // IRQ_STATUS bit. kTimeout past timeout_ms.
  Result<> WaitFlip(uint32_t target, int timeout_ms);
  Result<> Disable();
  uint32_t flips() const { return dev_.Status32(abi::status::kDisplayFlips); }

 private:
  // A register write the device may refuse: the refusal by its name (ERR_CODE).
  Result<> Write(uint32_t off, uint32_t v);
  DeviceBackend& dev_;
};

}  // namespace vg::guest
