#pragma once
// The guest side of one vGPU, as a VM's driver would see it: a vfio-user client that shares
// guest RAM (a memfd, DMA_MAP'd), maps the status page and the aperture, wires the MSI-X
// vectors to eventfds and reads and writes registers. Used by vgpu-guest, the tests and the
// bench, each from its own process. It is one DeviceBackend (backend.h); PciDevice is the
// other, for the same driver inside a VM.

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "base/base.h"
#include "guest/backend.h"
#include "abi/device.h"
#include "vfio_user/client.h"

namespace vg::guest {

struct DeviceOptions {
  std::string socket;
  uint64_t ram_size = 64ull << 20;
  Gpa ram_base{0x1'0000'0000};  // where guest RAM sits in the device's DMA space
  bool share_ram_fd = true;     // false: DMA_MAP without an fd; the daemon uses DMA_READ/WRITE
  bool twin_socket = true;
  // kQemu: serve DMA_READ/DMA_WRITE in QEMU's layout, as a VM under QEMU does.
  vfio_user::DmaRwLayout dma_rw_layout = vfio_user::DmaRwLayout::kSpec;
  int timeout_ms = 5000;
  int dma_delay_ms = 0;  // tests: answer each server DMA request this late (a slow client)
  // Batch posted GTT writes into REGION_WRITE_MULTI when the server offers write_multiple;
  // false: one REGION_WRITE each (tests, the bench's comparison).
  bool write_multi = true;
};

class Device final : public DeviceBackend {
 public:
  static Result<std::unique_ptr<Device>> Open(const DeviceOptions& opts);
  ~Device() override;
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  vfio_user::Client& client() { return *client_; }
  const DeviceOptions& options() const { return opts_; }

  // BAR0 registers (trapped).
  Result<uint32_t> Read32(uint32_t off) override;
  Result<uint64_t> Read64(uint32_t off) override;
  Result<> Write32(uint32_t off, uint32_t v, bool posted = false) override;
  Result<> Write64(uint32_t off, uint64_t v, bool posted = false) override;
  Result<> WriteGttEntries(std::span<const abi::GttBatchRecord> records) override;
  bool write_reports_refusal() const override { return true; }
  bool ram_shared_with_fd() const override { return opts_.share_ram_fd; }
  // PCI config space.
  Result<uint32_t> ConfigRead32(uint32_t off);
  Result<> ConfigWrite32(uint32_t off, uint32_t v);

  // Guest RAM: what the device sees at ram_base() .. ram_base() + ram().size().
  std::span<std::byte> ram() const override { return ram_map_.bytes(); }
  Gpa ram_base() const override { return opts_.ram_base; }
  Gpa GpaOf(const void* p) const;

  // The status page (mmapped, no trap) and the aperture (mmapped BAR2).
  uint32_t Status32(uint32_t off) const override;
  uint64_t Status64(uint32_t off) const override;
  std::span<std::byte> aperture() const override { return aperture_map_.bytes(); }
  uint32_t gtt_entries() const override { return gtt_entries_; }

  // MSI-X vectors wired to eventfds at open.
  Result<uint64_t> WaitIrq(uint32_t vector, int timeout_ms);
  const EventFd& irq(uint32_t vector) const { return irqs_[vector]; }
  int hangup_fd() const override { return client_->fd(); }
  const EventFd* irq_eventfd(uint32_t vector) const override {
    return vector < abi::kNumVectors ? &irqs_[vector] : nullptr;
  }
  // The doorbell's ioeventfd: one one-way signal, no reply.
  Result<> Kick() override { return doorbell_.Signal(); }

  // vfio-user request/reply messages this device sent (register and config accesses).
  uint64_t messages() const { return messages_; }
  // DEVICE_RESET, then the PCI bring-up again (as a driver does after an FLR).
  Result<> Reset();
  // The PCI bring-up alone: memory and bus mastering on, MSI-X enabled and unmasked (after
  // an FLR the guest started itself, e.g. through the Advanced Features capability).
  Result<> EnablePci();

  // F8, power states: Sleep puts the function in D3hot (PMCSR); the device then fetches no
  // ring and sends no interrupt. Wake returns it to D0 and treats the wake-up as a cold
  // start: the host may have reset the device while it slept, so nothing of before is
  // trusted (DEVICE_RESET and the PCI bring-up again); the caller creates a new Driver and
  // uploads its data again.
  Result<> Sleep();
  Result<> Wake();

  // F8, the host's device request (REQ, docs/device-spec.md "Stop"): signalled when the
  // host wants the device back (a vgpuctl or mdevctl stop). A guest that sees it finishes
  // or abandons its work and closes the Device; one that does not is disconnected when the
  // host's timeout passes. Null when the device offers no REQ.
  const EventFd* release_request() const { return req_.Valid() ? &req_ : nullptr; }
  // ERR: signalled when the device is lost (it runs nothing more until the host recovers it).
  const EventFd* device_error() const { return err_.Valid() ? &err_ : nullptr; }
  // Non-blocking: whether REQ fired since the last call.
  bool ReleaseRequested() const { return req_.Valid() && req_.TryDrain().value_or(0) != 0; }

 private:
  Device() = default;
  Result<> Init();
  Result<> ServeDma(bool is_write, Gpa addr, std::span<std::byte> buf);
  template <class T>
  Result<T> ReadValue(uint32_t region, uint32_t off);
  template <class T>
  Result<> WriteValue(uint32_t region, uint32_t off, T v, bool posted);

  DeviceOptions opts_;
  std::unique_ptr<vfio_user::Client> client_;
  UniqueFd ram_fd_;
  Mapping ram_map_;
  UniqueFd status_fd_;
  Mapping status_map_;
  const std::byte* status_ = nullptr;
  UniqueFd aperture_fd_;
  Mapping aperture_map_;
  std::array<EventFd, abi::kNumVectors> irqs_;
  EventFd doorbell_;
  EventFd req_;  // REQ (F8), when offered
  EventFd err_;  // ERR (F8), when offered
  uint32_t gtt_entries_ = 0;
  uint64_t messages_ = 0;
};

}  // namespace vg::guest
