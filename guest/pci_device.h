#pragma once
// The vGPU as a real PCI function, for the guest driver inside a Linux VM (vgpu-vm-guest):
// found under /sys/bus/pci/devices by vendor and device id, enabled, made bus master, BAR0
// and BAR2 mmapped through sysfs `resourceN`, registers accessed as volatile MMIO. The
// driver's "guest RAM" is a physically contiguous window the kernel was told to leave alone
// at boot (`memmap=SIZE$ADDR`), mapped through /dev/mem, so every guest-physical address is
// known without a kernel module. No interrupts: the driver polls the status page.
//
// Paths are options so the unit tests run it against a fake sysfs tree and a plain file.

#include <memory>
#include <string>
#include <string_view>

#include "base/base.h"
#include "guest/backend.h"

namespace vg::guest {

// A physically contiguous range of guest memory: [base, base + size).
struct RamWindow {
  Gpa base{0};
  ByteSize size{0};
};

// The `memmap=SIZE$ADDR` argument (sizes take K/M/G suffixes, numbers C-style bases) of a
// kernel command line such as /proc/cmdline. The last one wins, as for the kernel.
// kNotFound when there is none; kInvalidArgument when it does not parse, is not page
// aligned, or wraps.
Result<RamWindow> ParseMemmap(std::string_view cmdline);

struct PciDeviceOptions {
  std::string sysfs_devices = "/sys/bus/pci/devices";
  uint16_t vendor = abi::kVendorId;
  uint16_t device = abi::kDeviceId;
  std::string mem_path = "/dev/mem";  // what the RAM window is mapped from, at its GPA
  RamWindow ram;                      // size 0: no RAM (registers only)
};

// The sysfs directory of the first function whose vendor and device files match, e.g.
// "/sys/bus/pci/devices/0000:00:03.0". kNotFound when none does.
Result<std::string> FindPciFunction(const std::string& sysfs_devices, uint16_t vendor, uint16_t device);

class PciDevice final : public DeviceBackend {
 public:
  static Result<std::unique_ptr<PciDevice>> Open(const PciDeviceOptions& opts);
  ~PciDevice() override = default;
  PciDevice(const PciDevice&) = delete;
  PciDevice& operator=(const PciDevice&) = delete;

  const std::string& sysfs_path() const { return path_; }

  // Registers are dwords; a 64-bit access is two dword accesses, low first (device-spec
  // §BAR0), so a GTT entry commits on its high half whatever the VMM does with 8-byte MMIO.
  Result<uint32_t> Read32(uint32_t off) override;
  Result<uint64_t> Read64(uint32_t off) override;
  Result<> Write32(uint32_t off, uint32_t v, bool posted = false) override;
  Result<> Write64(uint32_t off, uint64_t v, bool posted = false) override;

  std::span<std::byte> ram() const override { return ram_map_.bytes(); }
  Gpa ram_base() const override { return opts_.ram.base; }
  uint32_t Status32(uint32_t off) const override;
  uint64_t Status64(uint32_t off) const override;
  std::span<std::byte> aperture() const override { return aperture_map_.bytes(); }
  uint32_t gtt_entries() const override { return gtt_entries_; }
  Result<> Kick() override { return Write32(abi::reg::kDoorbellKick, 0, true); }

  // BAR0 register accesses made (Read32 and Write32; a 64-bit access is two). Outside the
  // status page every one traps to the VMM: under QEMU's vfio-user-pci each is one
  // REGION_READ or posted REGION_WRITE on the socket, the VM's boundary crossings.
  uint64_t register_accesses() const { return register_accesses_; }

  // PCI config space through the sysfs `config` file.
  Result<uint16_t> ConfigRead16(uint32_t off) const;
  Result<> ConfigWrite16(uint32_t off, uint16_t v) const;

 private:
  PciDevice() = default;
  Result<> Init();
  Result<> CheckRegister(uint32_t off, uint32_t width) const;

  PciDeviceOptions opts_;
  std::string path_;
  UniqueFd config_fd_;
  UniqueFd bar0_fd_;
  Mapping bar0_map_;
  UniqueFd aperture_fd_;
  Mapping aperture_map_;
  UniqueFd ram_fd_;
  Mapping ram_map_;
  uint32_t gtt_entries_ = 0;
  uint64_t register_accesses_ = 0;
};

}  // namespace vg::guest
