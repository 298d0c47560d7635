#include "mediator/config_space.h"

#include <algorithm>

#include "abi/device.h"

namespace vg::mediator {
namespace {
// PCI header offsets (PCI Local Bus spec 3.0, §6.1).
constexpr uint32_t kCommand = 0x04, kStatus = 0x06, kRevision = 0x08, kClass = 0x09, kCacheLine = 0x0C,
                   kLatency = 0x0D, kHeaderType = 0x0E, kBar0 = 0x10, kBar2 = 0x18, kBar3 = 0x1C,
                   kSubVendor = 0x2C, kSubId = 0x2E, kCapPtr = 0x34, kIntLine = 0x3C, kIntPin = 0x3D;
constexpr uint16_t kCommandWritable = 0x0546;  // memory, bus master, parity, SERR#, INTx disable
constexpr uint16_t kStatusCapList = 1u << 4;
constexpr uint16_t kStatusW1c = 0xF900;
}  // namespace

ConfigSpace::ConfigSpace(uint64_t bar2_size) : bar2_size_(bar2_size) { BuildPowerOn(); }

void ConfigSpace::Set8(uint32_t off, uint8_t v, uint8_t wmask, uint8_t w1c) {
  bytes_[off] = v;
  wmask_[off] = wmask;
  w1cmask_[off] = w1c;
}
void ConfigSpace::Set16(uint32_t off, uint16_t v, uint16_t wmask, uint16_t w1c) {
  for (uint32_t i = 0; i < 2; ++i)
    Set8(off + i, static_cast<uint8_t>(v >> (8 * i)), static_cast<uint8_t>(wmask >> (8 * i)),
         static_cast<uint8_t>(w1c >> (8 * i)));
}
void ConfigSpace::Set32(uint32_t off, uint32_t v, uint32_t wmask, uint32_t w1c) {
  for (uint32_t i = 0; i < 4; ++i)
    Set8(off + i, static_cast<uint8_t>(v >> (8 * i)), static_cast<uint8_t>(wmask >> (8 * i)),
         static_cast<uint8_t>(w1c >> (8 * i)));
}

void ConfigSpace::BuildPowerOn() {
  bytes_.fill(0);
  wmask_.fill(0);
  w1cmask_.fill(0);
  Set16(0x00, abi::kVendorId);
  Set16(0x02, abi::kDeviceId);
  Set16(kCommand, 0, kCommandWritable);
  Set16(kStatus, kStatusCapList, 0, kStatusW1c);
  Set8(kRevision, abi::kRevision);
  Set8(kClass, abi::kClassCode & 0xff);
  Set8(kClass + 1, (abi::kClassCode >> 8) & 0xff);
  Set8(kClass + 2, (abi::kClassCode >> 16) & 0xff);
  Set8(kCacheLine, 0, 0xff);
  Set8(kLatency, 0);
  Set8(kHeaderType, 0x00);  // type 0, single function
  // BAR0: 32-bit non-prefetchable memory, kBar0Size. Flags bits are read-only, and the
  // size bits below the BAR's alignment are hard-wired zero: that is the sizing protocol.
  Set32(kBar0, 0x0, static_cast<uint32_t>(~(abi::kBar0Size - 1)));
  // BAR2/3: 64-bit prefetchable memory, the aperture.
  uint64_t mask2 = ~(bar2_size_ - 1);
  Set32(kBar2, 0xC, static_cast<uint32_t>(mask2) & ~0xFu);
  Set32(kBar3, 0x0, static_cast<uint32_t>(mask2 >> 32));
  Set16(kSubVendor, abi::kSubsystemVendorId);
  Set16(kSubId, abi::kSubsystemId);
  Set8(kCapPtr, abi::kCapPmOffset);
  Set8(kIntLine, 0xff, 0xff);
  Set8(kIntPin, 0);  // no INTx: MSI-X or MSI only

  // Power management capability v3: D3hot supported, No_Soft_Reset.
  constexpr uint32_t pm = abi::kCapPmOffset;
  Set8(pm + 0, 0x01);
  Set8(pm + 1, abi::kCapMsiOffset);
  Set16(pm + 2, 0x0003);
  Set16(pm + 4, 0x0008, 0x0103, 0x8000);  // PMCSR: state[1:0], PME_En RW, PME_Status RW1C

  // MSI: 64-bit, per-vector masking, 2 vectors capable (log2 = 1).
  constexpr uint32_t msi = abi::kCapMsiOffset;
  Set8(msi + 0, 0x05);
  Set8(msi + 1, abi::kCapMsixOffset);
  Set16(msi + 2, 0x0180 | (1u << 1), 0x0071);  // enable + multiple-message-enable RW
  Set32(msi + 4, 0, 0xFFFFFFFC);                // address low, dword aligned
  Set32(msi + 8, 0, 0xFFFFFFFF);                // address high
  Set16(msi + 12, 0, 0xFFFF);                   // data
  Set32(msi + 16, 0, (1u << abi::kNumMsiVectors) - 1);  // mask bits
  Set32(msi + 20, 0);                                // pending bits (RO)

  // MSI-X: table and PBA in BAR0.
  constexpr uint32_t msix = abi::kCapMsixOffset;
  Set8(msix + 0, 0x11);
  Set8(msix + 1, abi::kCapAfOffset);
  Set16(msix + 2, abi::kNumVectors - 1, 0xC000);  // enable, function mask RW
  Set32(msix + 4, abi::kMsixTableOffset | 0);     // BIR 0
  Set32(msix + 8, abi::kMsixPbaOffset | 0);

  // Advanced Features: TP and FLR capable. AF_CTRL bit0 (Initiate FLR) reads 0 and is taken
  // by Write(); AF_STATUS TP reads 0: a reset never waits for the engine (the aperture
  // scrub's wait shows in the vGPU's STATUS bit4 instead).
  constexpr uint32_t af = abi::kCapAfOffset;
  Set8(af + 0, 0x13);
  Set8(af + 1, 0x00);
  Set8(af + 2, 0x06);
  Set8(af + 3, 0x03);
  Set8(af + 4, 0x00);
  Set8(af + 5, 0x00);
}

Result<> ConfigSpace::Read(uint32_t offset, std::span<std::byte> out) const {
  VG_ERROR_IF(!RangeWithin(offset, out.size(), kSize), Errc::kOutOfBounds, "config read {:#x}+{} past {}", offset,
              out.size(), kSize);
  for (size_t i = 0; i < out.size(); ++i) out[i] = std::byte{bytes_[offset + i]};
  return Ok();
}

Result<> ConfigSpace::Write(uint32_t offset, std::span<const std::byte> data) {
  VG_ERROR_IF(!RangeWithin(offset, data.size(), kSize), Errc::kOutOfBounds, "config write {:#x}+{} past {}", offset,
              data.size(), kSize);
  for (size_t i = 0; i < data.size(); ++i) {
    uint32_t o = offset + static_cast<uint32_t>(i);
    uint8_t v = static_cast<uint8_t>(data[i]);
    if (o == abi::kCapAfOffset + 4u && (v & 0x1)) flr_requested_ = true;  // Initiate FLR
    uint8_t b = static_cast<uint8_t>((bytes_[o] & ~wmask_[o]) | (v & wmask_[o]));
    b = static_cast<uint8_t>(b & ~(v & w1cmask_[o]));
    bytes_[o] = b;
  }
  return Ok();
}

void ConfigSpace::Reset() {
  std::array<uint8_t, 12> keep_bars;
  std::copy_n(bytes_.begin() + kBar0, 12, keep_bars.begin());
  uint8_t line = bytes_[kIntLine];
  BuildPowerOn();
  std::copy_n(keep_bars.begin(), 12, bytes_.begin() + kBar0);
  bytes_[kIntLine] = line;
}

uint8_t ConfigSpace::PowerState() const { return bytes_[abi::kCapPmOffset + 4] & 0x3; }

bool ConfigSpace::MsixEnabled() const { return Read16(abi::kCapMsixOffset + 2) & 0x8000; }
bool ConfigSpace::MsixFunctionMasked() const { return Read16(abi::kCapMsixOffset + 2) & 0x4000; }
bool ConfigSpace::MsiEnabled() const { return Read16(abi::kCapMsiOffset + 2) & 0x0001; }
uint32_t ConfigSpace::MsiVectorsEnabled() const {
  uint32_t mme = (Read16(abi::kCapMsiOffset + 2) >> 4) & 0x7;
  return std::min<uint32_t>(1u << mme, abi::kNumMsiVectors);
}
bool ConfigSpace::MsiMasked(uint32_t vector) const {
  return vector < 32 && (bytes_[abi::kCapMsiOffset + 16 + vector / 8] >> (vector % 8)) & 1;
}
uint32_t ConfigSpace::MsiPending() const {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = v << 8 | bytes_[abi::kCapMsiOffset + 20 + static_cast<uint32_t>(i)];
  return v;
}
void ConfigSpace::SetMsiPending(uint32_t bits) {
  for (uint32_t i = 0; i < 4; ++i) bytes_[abi::kCapMsiOffset + 20 + i] = static_cast<uint8_t>(bits >> (8 * i));
}

uint64_t ConfigSpace::Bar0Address() const {
  return (bytes_[kBar0] | bytes_[kBar0 + 1] << 8 | bytes_[kBar0 + 2] << 16 | uint32_t{bytes_[kBar0 + 3]} << 24) &
         ~0xFull;
}
uint64_t ConfigSpace::Bar2Address() const {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = v << 8 | bytes_[kBar2 + i];
  return v & ~0xFull;
}

Result<> ConfigSpace::RestoreBytes(std::span<const uint8_t> bytes) {
  VG_INVALID_IF(bytes.size() != kSize, "config snapshot has {} bytes, want {}", bytes.size(), kSize);
  std::copy(bytes.begin(), bytes.end(), bytes_.begin());
  return Ok();
}

}  // namespace vg::mediator
