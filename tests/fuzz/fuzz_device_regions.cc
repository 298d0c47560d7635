// libFuzzer target: REGION_READ / REGION_WRITE over every region of a real vGPU (config
// space, BAR0, BAR2) at the offsets and widths the input picks, through the DeviceBackend
// entry points the vfio-user server dispatches those messages to. Besides ASan/UBSan, it
// checks the rule of BAR0's page table (F11 finding 1) against the layout written out here
// from docs/device-spec.md, independently of the device's own table: an access that lies
// wholly inside no row reads 0 and succeeds; so does config space past the capabilities;
// an access past a region's end is refused.
//
// Input: 12-byte records [op, region, width, 0, offset u32, value u32]. op bit 0: write.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "mediator/mediator.h"
#include "vfio_user/device.h"

using namespace vg;
using namespace vg::mediator;
namespace vu = vg::vfio_user;

namespace {
constexpr uint64_t kAperture = 64 * 1024;
constexpr uint32_t kGttEntries = 64;
constexpr uint32_t kWidths[] = {4, 8, 1, 2, 3, 16, 64, 4096};
// Advanced Features (last in the list, F8's FLR) is 6 bytes at 0x70: config space reads 0 past it.
constexpr uint32_t kCapsEnd = abi::kCapAfOffset + 6;

struct Row {
  uint64_t begin, end;
};
// docs/device-spec.md §BAR0 layout.
constexpr Row kBar0Rows[] = {
    {0x0000, 0x1000},                                   // vGPU registers
    {0x1000, 0x2000},                                   // privileged globals
    {0x2000, 0x3000},                                   // status page
    {0x3000, 0x3000 + abi::kNumVectors * 16},           // MSI-X table
    {0x3800, 0x3808},                                   // PBA
    {abi::kGttOffset, abi::kGttOffset + kGttEntries * 8ull},  // GTT entries
};
bool InRow(uint64_t off, uint64_t len) {
  for (const Row& r : kBar0Rows)
    if (off >= r.begin && off + len <= r.end) return true;
  return false;
}
bool AllZero(const std::vector<std::byte>& b) {
  for (std::byte x : b)
    if (x != std::byte{0}) return false;
  return true;
}

Vgpu& Device() {
  static std::unique_ptr<Vgpu> dev = [] {
    SetLogLevel(LogLevel::kError);
    VgpuConfig cfg;
    cfg.aperture_size = kAperture;
    cfg.gtt_entries = kGttEntries;
    auto d = Vgpu::Create(cfg);
    if (!d.ok()) __builtin_trap();
    return std::move(d).value();
  }();
  return *dev;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Vgpu& dev = Device();
  if (!dev.Reset().ok()) __builtin_trap();  // every input starts from the reset state
  for (size_t at = 0; at + 12 <= size; at += 12) {
    const uint8_t* r = data + at;
    bool write = r[0] & 1;
    constexpr uint32_t kRegions[] = {vu::kConfigRegion, vu::kBar0Region, vu::kBar2Region};
    uint32_t region = kRegions[r[1] % 3];
    uint32_t width = kWidths[r[2] % 8];
    uint32_t raw, value;
    std::memcpy(&raw, r + 4, 4);
    std::memcpy(&value, r + 8, 4);
    uint64_t region_size = region == vu::kConfigRegion ? 256 : region == vu::kBar0Region ? abi::kBar0Size : kAperture;
    uint64_t off = raw % (region_size * 2);  // past the end too, now and then
    if (region == vu::kBar0Region && (r[1] & 0x80)) off = abi::kMsixTableOffset + raw % 0x1000;  // MSI-X page
    bool inside = off + width <= region_size;
    if (write) {
      std::vector<std::byte> buf(width);
      for (uint32_t i = 0; i < width; ++i) buf[i] = std::byte(static_cast<uint8_t>(value >> (8 * (i % 4))));
      Result<> w = dev.RegionWrite(region, off, buf);
      if (!inside && w.ok()) __builtin_trap();
      if (region == vu::kBar0Region && inside && !InRow(off, width) && w.ok()) __builtin_trap();
      continue;
    }
    std::vector<std::byte> buf(width, std::byte{0xA5});
    Result<> rd = dev.RegionRead(region, off, buf);
    if (!inside) {
      if (rd.ok()) __builtin_trap();
      continue;
    }
    if (region == vu::kBar0Region && !InRow(off, width) && (!rd.ok() || !AllZero(buf))) __builtin_trap();
    if (region == vu::kConfigRegion && off >= kCapsEnd && (!rd.ok() || !AllZero(buf))) __builtin_trap();
    if (region == vu::kBar2Region && !rd.ok()) __builtin_trap();
  }
  return 0;
}
