#pragma once
// The vGPU behind a real QEMU (>= 10.1, vfio-user-pci) under the qtest accelerator, as a
// DeviceBackend: the third backend beside Device (vfio-user client) and PciDevice (inside a
// VM). No guest kernel runs; this process plays the guest CPU. BAR0 register accesses are
// qtest readl/writel to the BAR's guest-physical address, which QEMU turns into vfio-user
// REGION_READ/REGION_WRITE. QEMU 10.2 turns posted writes off for a device with an
// mmappable region and never uses the doorbell ioeventfd, so every MMIO write (the doorbell
// included) is one synchronous REGION_WRITE: what a VM's MMIO exit costs on the device side.
//
// Guest RAM is a memory-backend-file (share=on) that this process maps too, so the driver
// writes rings and buffers directly, and QEMU hands the same file to the daemon with
// DMA_MAP. No interrupts: the driver polls (the fence in RAM; the status page, read through
// qtest, only now and then: status_poll_interval_us()).

#include <memory>
#include <string>
#include <vector>

#include "base/base.h"
#include "guest/backend.h"
#include "guest/qemu_qtest.h"

namespace vg::guest {

struct QtestDeviceOptions {
  std::string qemu;      // qemu-system-x86_64 with vfio-user-pci
  std::string firmware;  // -L dir ("" : QEMU's default)
  std::string socket;    // the vGPU's vfio-user socket
  std::string work_dir;  // qtest socket and QEMU's stderr; removed at the end if Open created it
  uint64_t qemu_ram = 256ull << 20;
  // The part of guest RAM handed to the driver: [driver_ram_base, + driver_ram_size).
  Gpa driver_ram_base{16ull << 20};
  uint64_t driver_ram_size = 128ull << 20;
  int start_timeout_ms = 60000;
};

class QtestDevice final : public DeviceBackend {
 public:
  static Result<std::unique_ptr<QtestDevice>> Open(const QtestDeviceOptions& opts);
  ~QtestDevice() override;
  QtestDevice(const QtestDevice&) = delete;
  QtestDevice& operator=(const QtestDevice&) = delete;

  Result<uint32_t> Read32(uint32_t off) override;
  Result<uint64_t> Read64(uint32_t off) override;
  Result<> Write32(uint32_t off, uint32_t v, bool posted = false) override;
  Result<> Write64(uint32_t off, uint64_t v, bool posted = false) override;

  std::span<std::byte> ram() const override { return driver_ram_; }
  Gpa ram_base() const override { return opts_.driver_ram_base; }
  // Through qtest (QEMU maps the status page from the daemon: no vfio-user message).
  uint32_t Status32(uint32_t off) const override;
  uint64_t Status64(uint32_t off) const override;
  // Not mapped here: the aperture is reachable only through qtest reads and writes.
  std::span<std::byte> aperture() const override { return {}; }
  uint32_t gtt_entries() const override { return gtt_entries_; }
  // DOORBELL_KICK as an MMIO write: QEMU has no ioeventfd for it.
  Result<> Kick() override { return Write32(abi::reg::kDoorbellKick, 0, true); }
  // A status read is a qtest round trip (tens of us), not a load: poll it rarely.
  int status_poll_interval_us() const override { return 1000; }

  vm::QemuQtest& qtest() { return *q_; }
  pid_t qemu_pid() const { return q_->pid(); }
  uint64_t bar0_gpa() const { return kBar0Gpa; }
  // A guest-RAM address outside the driver's window, for floor measurements.
  uint64_t scratch_gpa() const { return kScratchGpa; }
  // qtest commands sent so far (each one a round trip to QEMU).
  uint64_t commands() const { return commands_; }
  std::string Diagnostics() const;

 private:
  // q35's 32-bit PCI hole; RAM ends at qemu_ram (<= 2 GiB), MMCONFIG is 0xB0000000.
  static constexpr uint64_t kBar0Gpa = 0xC0000000;
  static constexpr uint64_t kBar2Gpa = 0xD0000000;
  static constexpr uint64_t kScratchGpa = 0x1000;

  QtestDevice() = default;
  Result<> Init();
  Result<> Place();

  QtestDeviceOptions opts_;
  std::unique_ptr<vm::QemuQtest> q_;
  UniqueFd ram_fd_;
  Mapping ram_map_;
  std::span<std::byte> driver_ram_;
  std::string ram_path_;
  bool created_work_dir_ = false;  // removed again on destruction
  uint32_t gtt_entries_ = 0;
  mutable uint64_t commands_ = 0;
};

}  // namespace vg::guest
