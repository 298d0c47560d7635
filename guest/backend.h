#pragma once
// The one interface the guest driver (driver.h) programs a vGPU through. Two backends
// implement it: Device (device.h), a vfio-user client in a test process, and PciDevice
// (pci_device.h), the real PCI function inside a Linux VM. Everything the driver does
// (GTT, ring, commands, fences) goes through these few calls, so the same driver code runs
// in both places.

#include <cstdint>
#include <span>

#include "base/base.h"
#include "abi/device.h"

namespace vg::guest {

struct ErrorReport {
  Errc code = Errc::kOk;
  uint32_t source = 0;
  uint64_t addr = 0;
  uint32_t info = 0;
  uint32_t count = 0;
};

class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;

  // BAR0 registers. `posted`: the caller wants no completion (the vfio-user backend skips
  // the reply; MMIO writes are posted anyway).
  virtual Result<uint32_t> Read32(uint32_t off) = 0;
  virtual Result<uint64_t> Read64(uint32_t off) = 0;
  virtual Result<> Write32(uint32_t off, uint32_t v, bool posted = false) = 0;
  virtual Result<> Write64(uint32_t off, uint64_t v, bool posted = false) = 0;
  // GTT entries as posted 8-byte writes to the GTT window, in order (record.pad ignored).
  // The default sends them one by one; a backend that can batch posted writes does
  // (Device: REGION_WRITE_MULTI when the server offered write_multiple). Like any posted
  // write, a refusal is reported only in the error report.
  virtual Result<> WriteGttEntries(std::span<const abi::GttBatchRecord> records);
  // True when a non-posted Write32/Write64 completes only once the device has handled it
  // and fails with the device's refusal (a vfio-user REGION_WRITE's reply). False for a
  // real MMIO write, which reports nothing: the driver then reads ERR_COUNT.
  virtual bool write_reports_refusal() const { return false; }
  // False when the device cannot read guest RAM without waiting on this side (memory shared
  // without an fd): the device then refuses a GTT batch (kWouldBlock) and the driver does
  // not offer it one.
  virtual bool ram_shared_with_fd() const { return true; }

  // Guest RAM the driver may hand to the device: physically contiguous, seen by the device
  // at ram_base() .. ram_base() + ram().size().
  virtual std::span<std::byte> ram() const = 0;
  virtual Gpa ram_base() const = 0;

  // The status page (no trap) and the aperture (BAR2).
  virtual uint32_t Status32(uint32_t off) const = 0;
  virtual uint64_t Status64(uint32_t off) const = 0;
  virtual std::span<std::byte> aperture() const = 0;
  virtual uint32_t gtt_entries() const = 0;

  // Doorbell without a value (the device reads the tail shadow): the ioeventfd where the
  // backend has one, a DOORBELL_KICK write otherwise.
  virtual Result<> Kick() = 0;
  // The eventfd of an interrupt vector, or nullptr when the backend has no interrupts
  // (the driver then waits by polling the status page).
  virtual const EventFd* irq_eventfd(uint32_t /*vector*/) const { return nullptr; }
  // How often a polling wait may read the status page, in us (0: every iteration). A
  // backend whose status read is a round trip (QtestDevice) asks for less; the driver then
  // watches the fence in guest RAM, a plain load, in between.
  virtual int status_poll_interval_us() const { return 0; }
  // An fd that reports POLLHUP/POLLRDHUP once the device has gone away (the vfio-user socket:
  // its worker ended or the vGPU was stopped), or -1. A wait watches it, so a guest whose
  // device disappears gets kPeerClosed at once instead of waiting out its timeout.
  virtual int hangup_fd() const { return -1; }

  Result<ErrorReport> ReadError();
  Result<> ClearError() { return Write32(abi::reg::kErrClear, 0); }
};

}  // namespace vg::guest
