// The error report and the status page: how the device tells the guest what it refused
// and where it stands. Kept apart so that every refusal path (MMIO, GTT, ring, command,
// execution) goes through one Refuse() and records the same fields the same way.
#include "mediator/vgpu_impl.h"

namespace vg::mediator {

// --- status page: device-written, guest-readable, never read back by the daemon ---
void Vgpu::Impl::Store32(uint32_t off, uint32_t v) const {
  __atomic_store_n(reinterpret_cast<uint32_t*>(StatusPage() + off), v, __ATOMIC_RELEASE);
}
void Vgpu::Impl::Store64(uint32_t off, uint64_t v) const {
  __atomic_store_n(reinterpret_cast<uint64_t*>(StatusPage() + off), v, __ATOMIC_RELEASE);
}
void Vgpu::Impl::PublishStatus() {
  Store32(abi::status::kMagic, abi::kIdMagic);
  Store32(abi::status::kStateFlags, ReadStatus());
  Store64(abi::status::kCompletedFence, completed_fence_);
  Store32(abi::status::kRingHead, regs_.ring_head);
  Store32(abi::status::kErrCount, regs_.err_count);
  Store64(abi::status::kDoorbells, counters_.doorbells);
  Store64(abi::status::kSubmissions, submissions_);
  Store32(abi::status::kScratch, regs_.scratch);
  Store32(abi::status::kResets, regs_.resets);
  Store32(abi::status::kDeviceIdle, device_idle_ ? 1 : 0);
  Store32(abi::status::kDisplayFlips, regs_.display_flips);
}

// Errors that are not the guest's doing: the quarantine's own refusals, and the host's
// engine failing. They never count toward the guest's fault rate.
static bool HostOrQuarantine(Errc c) {
  return c == Errc::kQuarantined || c == Errc::kDeviceLost || c == Errc::kInternal;
}

Error Vgpu::Impl::Refuse(uint32_t source, uint64_t addr, uint32_t info, Error e, FaultClass fault) {
  regs_.err_code = static_cast<uint32_t>(e.code);
  regs_.err_source = source;
  regs_.err_addr_lo = static_cast<uint32_t>(addr);
  regs_.err_addr_hi = static_cast<uint32_t>(addr >> 32);
  regs_.err_info = info;
  ++regs_.err_count;
  const bool mmio = source == abi::kErrSourceMmio || source == abi::kErrSourceGtt || source == abi::kErrSourceGttBatch;
  if (source == abi::kErrSourceMmio || source == abi::kErrSourceGtt)
    ++counters_.mmio_refusals;
  else
    ++counters_.command_refusals;
  if (fault != FaultClass::kFlowControl && !HostOrQuarantine(e.code))
    faults_.OnFault(fault == FaultClass::kExecution ? FaultKind::kDmaFault
                    : mmio                          ? FaultKind::kMmioRefusal
                                                    : FaultKind::kCommandRefusal);
  // A quarantined guest that keeps ringing gets one line when it was quarantined (the
  // monitor's), not one per doorbell.
  Log(e.code == Errc::kQuarantined ? LogLevel::kDebug : LogLevel::kWarn, "vgpu {}: refused ({}) at {:#x}: {}",
      cfg_.uuid, ErrcName(e.code), addr, e.what);
  RaiseIrq(abi::kVectorError);
  if (e.code == Errc::kDeviceLost) (void)irqs_.Trigger(vu::kIrqErr, 0);  // unrecoverable: tell the VMM
  PublishStatus();
  return e;
}

Result<> Vgpu::Impl::WriteErrClear(uint32_t) {
  regs_.err_code = regs_.err_source = regs_.err_addr_lo = regs_.err_addr_hi = regs_.err_info = 0;
  PublishStatus();
  return Ok();
}

}  // namespace vg::mediator
