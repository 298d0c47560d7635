// Interrupts: which vector fires, through which mode, and what the guest sees of it in
// the MSI-X table and PBA. Kept apart because every interrupt the device raises funnels
// through RaiseIrq()/Deliver(), and the PCI rules that gate delivery live in one place.
#include <cstring>

#include "mediator/vgpu_impl.h"

namespace vg::mediator {

std::array<uint32_t, vu::kNumPciIrqs> Vgpu::Impl::IrqLayout() {
  std::array<uint32_t, vu::kNumPciIrqs> counts{};  // no INTx, ERR or REQ
  counts[vu::kIrqMsi] = abi::kNumVectors;
  counts[vu::kIrqMsix] = abi::kNumVectors;
  return counts;
}

void Vgpu::Impl::RaiseIrq(uint32_t vector) {
  regs_.irq_status |= 1u << vector;
  ++counters_.irqs_raised;
  if (regs_.irq_mask & (1u << vector)) return;
  Deliver(vector);
}

// One interrupt mode is live at a time: MSI-X when the client wired it, else MSI.
void Vgpu::Impl::Deliver(uint32_t vector) {
  uint32_t index = irqs_.HasEventFd(vu::kIrqMsix, vector) ? vu::kIrqMsix : vu::kIrqMsi;
  (void)irqs_.Trigger(index, vector);
}

Result<> Vgpu::Impl::WriteIrqStatus(uint32_t v) {
  regs_.irq_status &= ~v;
  return Ok();
}

Result<> Vgpu::Impl::WriteIrqMask(uint32_t v) {
  VG_ERROR_IF(v >> abi::kNumVectors, Errc::kBadFlags, "IRQ_MASK bits {:#x} name no vector", v);
  uint32_t unmasked = regs_.irq_mask & ~v;
  regs_.irq_mask = v;
  // A vector raised while masked is delivered when unmasked, as MSI-X pending bits are.
  for (uint32_t vec = 0; vec < abi::kNumVectors; ++vec)
    if ((unmasked & regs_.irq_status) & (1u << vec)) Deliver(vec);
  return Ok();
}

Result<> Vgpu::Impl::WriteIrqTest(uint32_t v) {
  VG_ERROR_IF(v >= abi::kNumVectors, Errc::kOutOfBounds, "IRQ_TEST vector {} past {}", v, abi::kNumVectors);
  RaiseIrq(v);
  return Ok();
}

// --- MSI-X table (trapped): 4 dwords per vector; PBA read-only ---
Result<uint32_t> Vgpu::Impl::MsixRead32(uint32_t off) const {
  if (off >= abi::kMsixPbaOffset) {
    uint32_t pending = 0;
    for (uint32_t v = 0; v < abi::kNumVectors; ++v)
      if ((regs_.irq_status & (1u << v)) && (msix_table_[v * 4 + 3] & 1)) pending |= 1u << v;
    return off == abi::kMsixPbaOffset ? pending : 0u;
  }
  return msix_table_[(off - abi::kMsixTableOffset) / 4];
}

void Vgpu::Impl::ResetMsixTable() {
  msix_table_.fill(0);
  for (uint32_t v = 0; v < abi::kNumVectors; ++v) msix_table_[v * 4 + 3] = 1;  // vectors start masked
}

}  // namespace vg::mediator
