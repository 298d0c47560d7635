#pragma once
// PCI type-0 configuration space, emulated byte by byte from three masks, the way
// hardware behaves: read-only bits ignore writes, RW1C bits clear when written with 1,
// BAR sizing falls out of the writable mask (write all ones, read back ~(size-1) | flags).

#include <array>
#include <cstdint>
#include <span>

#include "base/base.h"

namespace vg::mediator {

class ConfigSpace {
 public:
  static constexpr uint32_t kSize = 256;

  // bar2_size: the aperture (a power of two, at least 4 KiB).
  explicit ConfigSpace(uint64_t bar2_size);

  Result<> Read(uint32_t offset, std::span<std::byte> out) const;
  Result<> Write(uint32_t offset, std::span<const std::byte> data);
  // Function-level reset: command, status, MSI/MSI-X enables and power state return to
  // power-on values; BAR assignments and the interrupt line survive.
  void Reset();

  uint16_t Command() const { return Read16(0x04); }
  bool MemoryEnabled() const { return Command() & 0x2; }
  bool BusMasterEnabled() const { return Command() & 0x4; }
  uint8_t PowerState() const;  // 0 = D0, 3 = D3hot
  // A write set AF_CTRL's Initiate FLR since the last call (the caller resets the function).
  bool TakeFlrRequest() {
    const bool r = flr_requested_;
    flr_requested_ = false;
    return r;
  }

  // Interrupt capabilities as the guest programmed them (PCI Local Bus 3.0 §6.8).
  bool MsixEnabled() const;
  bool MsixFunctionMasked() const;
  bool MsiEnabled() const;
  uint32_t MsiVectorsEnabled() const;  // 1 << Multiple Message Enable, at most the capable count
  bool MsiMasked(uint32_t vector) const;
  uint32_t MsiPending() const;
  // The MSI pending bits are read-only to the guest and set by the device.
  void SetMsiPending(uint32_t bits);
  uint64_t Bar0Address() const;
  uint64_t Bar2Address() const;

  std::span<const uint8_t> Bytes() const { return bytes_; }
  Result<> RestoreBytes(std::span<const uint8_t> bytes);

 private:
  uint16_t Read16(uint32_t off) const { return static_cast<uint16_t>(bytes_[off] | bytes_[off + 1] << 8); }
  void Set8(uint32_t off, uint8_t v, uint8_t wmask = 0, uint8_t w1c = 0);
  void Set16(uint32_t off, uint16_t v, uint16_t wmask = 0, uint16_t w1c = 0);
  void Set32(uint32_t off, uint32_t v, uint32_t wmask = 0, uint32_t w1c = 0);
  void BuildPowerOn();

  uint64_t bar2_size_;
  std::array<uint8_t, kSize> bytes_{};
  std::array<uint8_t, kSize> wmask_{};
  std::array<uint8_t, kSize> w1cmask_{};
  bool flr_requested_ = false;
};

}  // namespace vg::mediator
