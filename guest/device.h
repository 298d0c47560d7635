#pragma once
// The guest side of one vGPU, as a VM's driver would see it: a vfio-user client that shares
// guest RAM (a memfd, DMA_MAP'd), maps the status page and the aperture, wires the MSI-X
// vectors to eventfds and reads and writes registers. Used by vgpu-guest, the tests and the
// bench, each from its own process.

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "base/base.h"
#include "mediator/abi.h"
#include "vfio_user/client.h"

namespace vg::guest {

struct DeviceOptions {
  std::string socket;
  uint64_t ram_size = 64ull << 20;
  Gpa ram_base{0x1'0000'0000};  // where guest RAM sits in the device's DMA space
  bool share_ram_fd = true;     // false: DMA_MAP without an fd; the daemon uses DMA_READ/WRITE
  bool twin_socket = true;
  int timeout_ms = 5000;
  int dma_delay_ms = 0;  // tests: answer each server DMA request this late (a slow client)
};

struct ErrorReport {
  Errc code = Errc::kOk;
  uint32_t source = 0;
  uint64_t addr = 0;
  uint32_t info = 0;
  uint32_t count = 0;
};

class Device {
 public:
  static Result<std::unique_ptr<Device>> Open(const DeviceOptions& opts);
  ~Device();
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  vfio_user::Client& client() { return *client_; }
  const DeviceOptions& options() const { return opts_; }

  // BAR0 registers (trapped).
  Result<uint32_t> Read32(uint32_t off);
  Result<uint64_t> Read64(uint32_t off);
  Result<> Write32(uint32_t off, uint32_t v, bool posted = false);
  Result<> Write64(uint32_t off, uint64_t v, bool posted = false);
  // PCI config space.
  Result<uint32_t> ConfigRead32(uint32_t off);
  Result<> ConfigWrite32(uint32_t off, uint32_t v);

  // Guest RAM: what the device sees at ram_base() .. ram_base() + ram().size().
  std::span<std::byte> ram() const { return ram_map_.bytes(); }
  Gpa ram_base() const { return opts_.ram_base; }
  Gpa GpaOf(const void* p) const;

  // The status page (mmapped, no trap) and the aperture (mmapped BAR2).
  uint32_t Status32(uint32_t off) const;
  uint64_t Status64(uint32_t off) const;
  std::span<std::byte> aperture() const { return aperture_map_.bytes(); }
  uint32_t gtt_entries() const { return gtt_entries_; }

  // MSI-X vectors wired to eventfds at open.
  Result<uint64_t> WaitIrq(uint32_t vector, int timeout_ms);
  const EventFd& irq(uint32_t vector) const { return irqs_[vector]; }
  // The doorbell's ioeventfd: one one-way signal, no reply.
  Result<> Kick() const { return doorbell_.Signal(); }

  Result<ErrorReport> ReadError();
  // vfio-user request/reply messages this device sent (register and config accesses).
  uint64_t messages() const { return messages_; }
  Result<> ClearError() { return Write32(abi::reg::kErrClear, 0); }
  Result<> Reset() { return client_->Reset(); }

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
  uint32_t gtt_entries_ = 0;
  uint64_t messages_ = 0;
};

}  // namespace vg::guest
