// Interrupts: which vector fires, through which mode, and what the guest sees of it in
// the MSI-X table and PBA. Kept apart because every interrupt the device raises funnels
// through RaiseIrq()/Deliver(), and the PCI rules that gate delivery live in one place.
#include <cstring>

#include "mediator/vgpu_impl.h"

namespace vg::mediator {

std::array<uint32_t, vu::kNumPciIrqs> Vgpu::Impl::IrqLayout() {
  std::array<uint32_t, vu::kNumPciIrqs> counts{};  // no INTx
  counts[vu::kIrqMsi] = abi::kNumMsiVectors;
  counts[vu::kIrqMsix] = abi::kNumVectors;
  // VFIO's error interrupt: a VMM registers it for error recovery (QEMU warns when it is
  // missing) and stops the VM when it fires. Fired only when the vGPU is lost for good.
  counts[vu::kIrqErr] = 1;
  // VFIO's device-request interrupt (F8): the host asks the VMM to release the device
  // (QEMU hot-unplugs it from its guest) before a stop forces the disconnect.
  counts[vu::kIrqReq] = 1;
  return counts;
}

void Vgpu::Impl::RaiseIrq(uint32_t vector) {
  regs_.irq_status |= 1u << vector;
  ++counters_.irqs_raised;
  if (regs_.irq_mask & (1u << vector)) return;  // the device's own mask: IRQ_MASK
  Deliver(vector);
}

// An MSI or MSI-X message is a memory write by the function (PCI Local Bus 3.0 §6.8), so the
// PCI rules gate every interrupt here, whoever raised it (F11 finding 16):
//  - nothing is sent without Bus Master Enable, or in D3hot (PMCSR or POWER_STATE): dropped;
//  - MSI-X, when enabled, wins: a vector masked in its table entry, or all of them under the
//    function mask, latches its PBA bit instead, and is sent when unmasked (MsixUnmasked);
//  - else MSI, when enabled: a vector masked in the capability latches its pending bit;
//  - neither enabled: no interrupt (IRQ_STATUS still records the vector).
// Delivery itself never blocks: IrqSet queues it for its signaller thread.
bool Vgpu::Impl::MessagesAllowed() const {
  return config_space_.BusMasterEnabled() && config_space_.PowerState() != 3 && regs_.power_state != 3;
}

namespace {
// Set while RunHeldOnLoop runs: an interrupt raised then is written on this thread.
thread_local bool t_irq_now = false;
// An interrupt is written by the thread that raises it when that is the loop completing
// inline, or one of the executor's threads (this vGPU's own: a guest that makes its eventfd
// block delays its own completions, by at most EventFd::kGuardMs each); otherwise it is
// queued for the signaller thread, so the loop never waits on it.
bool WriteIrqHere() { return t_irq_now || Executor::OnExecutorThread(); }
// Set while a plan_done hook running inside RunHeldOnLoop may hold the next plan.
thread_local bool t_chain_ok = false;
}  // namespace

bool Vgpu::Impl::MayChainInline() { return t_chain_ok; }

void Vgpu::Impl::RunHeldOnLoop() {
  t_irq_now = true;
  // The plan's plan_done settles idle notify and may find the guest's next tail (a guest
  // that resubmits as soon as its fence lands reads busy and does not kick): that plan is
  // held too and completed in the next round, up to kMaxInlineChain plans per doorbell, so
  // one busy guest cannot keep the loop from its other events. The last round holds none:
  // whatever it finds goes to the submit thread.
  for (int left = kMaxInlineChain; left > 0; --left) {
    t_chain_ok = left > 1;
    if (!exec_->RunHeld()) break;
  }
  t_chain_ok = false;
  t_irq_now = false;
}

void Vgpu::Impl::Deliver(uint32_t vector) {
  if (!MessagesAllowed()) return;
  if (config_space_.MsixEnabled()) {
    if (config_space_.MsixFunctionMasked() || (msix_table_[vector * 4 + 3] & 1)) {
      regs_.msix_pending |= 1u << vector;
      return;
    }
    (void)(WriteIrqHere() ? irqs_.TriggerNow(vu::kIrqMsix, vector) : irqs_.Trigger(vu::kIrqMsix, vector));
    return;
  }
  if (config_space_.MsiEnabled()) {
    // With fewer vectors enabled than raised, the message data's low bits are the vector's
    // low bits (MSI multiple message): vectors fold onto the enabled ones.
    uint32_t msi_vector = vector & (config_space_.MsiVectorsEnabled() - 1);
    if (config_space_.MsiMasked(msi_vector)) {
      config_space_.SetMsiPending(config_space_.MsiPending() | 1u << msi_vector);
      return;
    }
    (void)(WriteIrqHere() ? irqs_.TriggerNow(vu::kIrqMsi, msi_vector) : irqs_.Trigger(vu::kIrqMsi, msi_vector));
  }
}

// Sends what was latched pending and is no longer masked: called after every write that can
// unmask (MSI-X table, config space, SET_IRQS) or re-allow messages (BME, leaving D3hot).
void Vgpu::Impl::DeliverUnmaskedPending() {
  if (!MessagesAllowed()) return;
  if (config_space_.MsixEnabled() && !config_space_.MsixFunctionMasked()) {
    for (uint32_t v = 0; v < abi::kNumVectors; ++v) {
      if (!(regs_.msix_pending & (1u << v)) || (msix_table_[v * 4 + 3] & 1)) continue;
      regs_.msix_pending &= ~(1u << v);
      (void)irqs_.Trigger(vu::kIrqMsix, v);
    }
  }
  if (config_space_.MsiEnabled() && !config_space_.MsixEnabled()) {
    uint32_t pending = config_space_.MsiPending();
    for (uint32_t v = 0; v < abi::kNumMsiVectors; ++v) {
      if (!(pending & (1u << v)) || config_space_.MsiMasked(v)) continue;
      pending &= ~(1u << v);
      (void)irqs_.Trigger(vu::kIrqMsi, v);
    }
    config_space_.SetMsiPending(pending);
  }
}

// VFIO semantics: a client that assigns a trigger eventfd to an MSI-X vector has the host
// program that vector, unmasked, as the kernel does for a VFIO device. QEMU emulates the
// table in its own memory and never writes ours; a client that does (the guest library,
// tests) can mask the vector again through BAR0.
void Vgpu::Impl::OnMsixTriggerAssigned(uint32_t first, uint32_t count) {
  for (uint32_t v = first; v < first + count && v < abi::kNumVectors; ++v)
    if (irqs_.HasEventFd(vu::kIrqMsix, v)) msix_table_[v * 4 + 3] &= ~1u;
  DeliverUnmaskedPending();
}

Result<> Vgpu::Impl::WriteIrqStatus(uint32_t v) {
  regs_.irq_status &= ~v;
  return Ok();
}

Result<> Vgpu::Impl::WriteIrqMask(uint32_t v) {
  VG_ERROR_IF(v >> abi::kNumVectors, Errc::kBadFlags, "IRQ_MASK bits {:#x} name no vector", v);
  uint32_t unmasked = regs_.irq_mask & ~v;
  regs_.irq_mask = v;
  // A vector raised while masked is delivered when unmasked (then through the PCI rules).
  for (uint32_t vec = 0; vec < abi::kNumVectors; ++vec)
    if ((unmasked & regs_.irq_status) & (1u << vec)) Deliver(vec);
  return Ok();
}

Result<> Vgpu::Impl::WriteIrqTest(uint32_t v) {
  VG_ERROR_IF(v >= abi::kNumVectors, Errc::kOutOfBounds, "IRQ_TEST vector {} past {}", v, abi::kNumVectors);
  RaiseIrq(v);
  return Ok();
}

// --- MSI-X table and PBA: rows of the BAR0 page table, so `off` lies inside them ---
Result<> Vgpu::Impl::MsixTableRead(uint32_t off, std::span<std::byte> out) {
  return ForEachDword(off, out.size(), [&](uint32_t o, size_t i) -> Result<> {
    uint32_t v = msix_table_[(o - abi::kMsixTableOffset) / 4];
    std::memcpy(out.data() + i, &v, 4);
    return Ok();
  });
}
Result<> Vgpu::Impl::MsixTableWrite(uint32_t off, std::span<const std::byte> data) {
  VG_TRY(ForEachDword(off, data.size(), [&](uint32_t o, size_t i) -> Result<> {
    uint32_t v;
    std::memcpy(&v, data.data() + i, 4);
    msix_table_[(o - abi::kMsixTableOffset) / 4] = v;
    return Ok();
  }));
  DeliverUnmaskedPending();  // a vector control write may have unmasked a pending vector
  return Ok();
}
Result<> Vgpu::Impl::MsixPbaRead(uint32_t off, std::span<std::byte> out) {
  return ForEachDword(off, out.size(), [&](uint32_t o, size_t i) -> Result<> {
    uint32_t value = o == abi::kMsixPbaOffset ? regs_.msix_pending : 0u;
    std::memcpy(out.data() + i, &value, 4);
    return Ok();
  });
}
Result<> Vgpu::Impl::MsixPbaWrite(uint32_t off, std::span<const std::byte>) {
  return Refuse(abi::kErrSourceMmio, off, 0, Error{Errc::kReadOnly, "the MSI-X PBA is read-only"});
}

void Vgpu::Impl::ResetMsixTable() {
  msix_table_.fill(0);
  for (uint32_t v = 0; v < abi::kNumVectors; ++v) msix_table_[v * 4 + 3] = 1;  // vectors start masked
}

}  // namespace vg::mediator
