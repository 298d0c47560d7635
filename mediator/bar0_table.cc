// The BAR0 router and register map. Kept apart because BAR0 is the widest surface a guest
// touches (every REGION_READ/WRITE on it lands here), and its rule is structural: one table
// decides what each offset is, for reads and writes alike.
#include <cstring>

#include "mediator/vgpu_impl.h"

namespace vg::mediator {

uint32_t Vgpu::Impl::ReadStatus() const {
  uint32_t s = 0;
  if (regs_.ctrl & abi::kCtrlRingEnable) s |= abi::kStatusRingEnabled;
  if (regs_.err_code != 0) s |= abi::kStatusErrorLatched;
  // In D3hot by either door: POWER_STATE or the PM capability's PMCSR (F8).
  if (regs_.power_state == 3 || config_space_.PowerState() == 3) s |= abi::kStatusD3;
  if (scrubs_pending_ != 0) s |= abi::kStatusResetting;
  return s;
}

Result<> Vgpu::Impl::WriteCtrl(uint32_t v) {
  VG_ERROR_IF(v & ~abi::kCtrlKnownBits, Errc::kBadFlags, "CTRL bits {:#x} unknown", v & ~abi::kCtrlKnownBits);
  if ((v & abi::kCtrlRingEnable) && !(regs_.ctrl & abi::kCtrlRingEnable)) {
    VG_ERROR_IF(regs_.ring_size == 0, Errc::kBadState, "ring enabled before RING_SIZE was set");
    regs_.ring_head = 0;
    regs_.ring_tail = 0;
  }
  // Started or stopped, the ring's head and tail are no longer what the shadow last said:
  // no re-read until the guest kicks again, and idle = 1 so that it does (idle notify).
  if ((v ^ regs_.ctrl) & abi::kCtrlRingEnable) StopShadowRereads();
  regs_.ctrl = v;
  PublishStatus();
  return Ok();
}
Result<> Vgpu::Impl::WriteReset(uint32_t v) {
  VG_INVALID_IF(v != abi::kResetMagic, "RESET takes {:#x}, not {:#x}", abi::kResetMagic, v);
  // Carried out by RegionWrite once the lock is dropped: in-flight work must drain first,
  // and it needs the lock to finish.
  reset_pending_ = true;
  return Ok();
}
Result<> Vgpu::Impl::WritePowerState(uint32_t v) {
  VG_INVALID_IF(v != 0 && v != 3, "POWER_STATE {} is neither D0 (0) nor D3hot (3)", v);
  regs_.power_state = v;
  PublishStatus();
  return Ok();
}
Result<> Vgpu::Impl::WriteScratch(uint32_t v) {
  regs_.scratch = v;
  Store32(abi::status::kScratch, v);
  return Ok();
}

const Vgpu::Impl::RegDesc* Vgpu::Impl::FindReg(uint32_t off) const {
  for (const RegDesc& r : Registers())
    if (r.off == off) return &r;
  return nullptr;
}

Result<uint32_t> Vgpu::Impl::RegRead32(uint32_t off) {
  const RegDesc* r = FindReg(off);
  if (!r) return uint32_t{0};  // unimplemented registers read as zero, as on hardware
  if (r->access == Access::kWO) return uint32_t{0};
  if (r->read) return (this->*r->read)();
  // A refused privileged global has no storage. Its null member pointer must never be
  // dereferenced: it would read the bytes just before regs_ (found by fuzz_device_regions).
  if (!r->field) return uint32_t{0};
  return regs_.*(r->field);
}

Result<> Vgpu::Impl::RegWrite32(uint32_t off, uint32_t v) {
  const RegDesc* r = FindReg(off);
  if (!r) return Refuse(abi::kErrSourceMmio, off, v, Error{Errc::kNotFound, fmt::format("no register at {:#x}", off)});
  if (r->policy == Policy::kRefused)
    return Refuse(abi::kErrSourceMmio, off, v,
                  Error{Errc::kPrivileged, fmt::format("{} is a privileged global register", r->name)});
  if (r->access == Access::kRO)
    return Refuse(abi::kErrSourceMmio, off, v, Error{Errc::kReadOnly, fmt::format("{} is read-only", r->name)});
  if (r->write) {
    write_fault_.reset();
    Result<> res = (this->*r->write)(v);
    if (!res.ok()) {
      Error e = std::move(res).error();
      if (write_fault_) return Refuse(write_fault_->source, write_fault_->addr, write_fault_->info, std::move(e));
      e.what = fmt::format("{} <- {:#x}: {}", r->name, v, e.what);
      return Refuse(abi::kErrSourceMmio, off, v, std::move(e));
    }
    return Ok();
  }
  regs_.*(r->field) = v;
  return Ok();
}

// --- GTT window ---
Result<> Vgpu::Impl::CheckGuestPage(Gpa page, bool writable) const {
  uint32_t prot = vu::kDmaRead | (writable ? vu::kDmaWrite : 0);
  VG_ERROR_IF(!dma_.Contains(page, ByteSize{kPageSize}, vu::kDmaRead), Errc::kNotMapped,
              "page {} is not guest memory this vGPU was given", page);
  VG_ERROR_IF(!dma_.Contains(page, ByteSize{kPageSize}, prot), Errc::kAccessDenied,
              "page {} is mapped read-only", page);
  return Ok();
}
Result<> Vgpu::Impl::GttWrite(uint32_t off, std::span<const std::byte> data) {
  uint32_t rel = off - abi::kGttOffset;
  uint32_t index = rel / 8;
  uint64_t entry;
  if (data.size() == 8 && rel % 8 == 0) {
    std::memcpy(&entry, data.data(), 8);
  } else if (data.size() == 4 && rel % 4 == 0) {
    // 32-bit halves: the low half latches, the high half commits the pair.
    uint32_t half;
    std::memcpy(&half, data.data(), 4);
    if (rel % 8 == 0) {
      gtt_.Latch(index, half);
      return Ok();
    }
    entry = uint64_t{half} << 32 | gtt_.TakeLatch(index);
  } else {
    return Refuse(abi::kErrSourceGtt, off, 0,
                  Error{Errc::kMisaligned, fmt::format("GTT access of {} bytes at {:#x}", data.size(), off)});
  }
  auto check = [this](Gpa p, bool w) { return CheckGuestPage(p, w); };
  Result<> r = gtt_.Write(index, entry, check);
  if (!r.ok()) return Refuse(abi::kErrSourceGtt, entry & ~abi::kGttFlagMask, index, std::move(r).error());
  return Ok();
}

// --- GTT batch (docs/device-spec.md §GTT batch) ---
Result<> Vgpu::Impl::WriteGttBatchAddrLo(uint32_t v) {
  VG_ERROR_IF(!IsAligned(v, abi::kGttBatchAlign), Errc::kMisaligned, "GTT_BATCH_ADDR {:#x} not {}-byte aligned", v,
              abi::kGttBatchAlign);
  regs_.gtt_batch_lo = v;
  return Ok();
}

// Copy, then check, then use: the array is copied out of guest memory once, into memory of
// our own, and only that copy is checked and applied; a guest that rewrites its array during
// or after the write changes nothing. All or nothing: one bad record and no entry changes.
// Never waits on the guest: the copy is a memcpy from fd-backed memory (sealed, so it cannot
// SIGBUS); an array in memory shared without an fd would need a DMA_READ round trip to the
// client, which the loop never waits for, so it is refused (kWouldBlock), not fetched.
Result<> Vgpu::Impl::WriteGttBatchGo(uint32_t count) {
  Gpa at{uint64_t{regs_.gtt_batch_hi} << 32 | regs_.gtt_batch_lo};
  write_fault_ = WriteFault{abi::kErrSourceGttBatch, at.v, abi::kGttBatchWhole};
  VG_INVALID_IF(count == 0, "GTT batch of 0 records");
  VG_ERROR_IF(count > abi::kGttBatchMaxRecords, Errc::kLimitExceeded, "GTT batch of {} records (at most {})", count,
              abi::kGttBatchMaxRecords);
  VG_TRY(CheckDmaAllowed());  // reading the array is DMA by the function
  ByteSize bytes{uint64_t{count} * sizeof(abi::GttBatchRecord)};
  VG_TRY(CheckedEnd(at, bytes));
  std::vector<abi::GttBatchRecord> records(count);
  VG_TRY_CTX(dma_.Read(at, std::as_writable_bytes(std::span(records)), vu::DmaWait::kNever),
             "GTT batch array {}+{:#x}", at, bytes.v);
  uint32_t bad = 0;
  auto check = [this](Gpa p, bool w) { return CheckGuestPage(p, w); };
  Result<> r = gtt_.WriteBatch(records, check, &bad);
  if (!r.ok()) write_fault_ = WriteFault{abi::kErrSourceGttBatch, records[bad].entry & ~abi::kGttFlagMask, bad};
  return r;
}

// --- the BAR0 page table (docs/device-spec.md §BAR0 layout) ---
// F11 finding 1: the MSI-X table's write path was bounded and its read path was not, so a
// read at 0x3020-0x37FC copied daemon memory to the guest. Now every BAR0 access, in both
// directions, goes through one lookup in this table: a row owns [begin, end) and the access
// must lie wholly inside it, so each handler only ever sees offsets of its own range. An
// access in no row (a gap, a straddle, past the GTT) reads 0 and refuses writes (kNotFound)
// by construction: there is no fall-through path left to forget a bound on.
std::array<Vgpu::Impl::Bar0Row, Vgpu::Impl::kBar0Rows> Vgpu::Impl::BuildBar0Table(uint32_t gtt_entries) {
  return {{
      {abi::kRegsBase, abi::kPrivBase, "registers", &Impl::RegsRead, &Impl::RegsWrite},
      {abi::kPrivBase, abi::kStatusPageOffset, "privileged globals", &Impl::RegsRead, &Impl::RegsWrite},
      {abi::kStatusPageOffset, abi::kStatusPageOffset + kPageSize, "status page", &Impl::StatusPageRead,
       &Impl::StatusPageWrite},
      {abi::kMsixTableOffset, abi::kMsixTableOffset + kMsixTableDwords * 4, "MSI-X table", &Impl::MsixTableRead,
       &Impl::MsixTableWrite},
      {abi::kMsixPbaOffset, abi::kMsixPbaOffset + 8, "MSI-X PBA", &Impl::MsixPbaRead, &Impl::MsixPbaWrite},
      {abi::kGttOffset, abi::kGttOffset + uint64_t{gtt_entries} * 8, "GTT", &Impl::GttRead, &Impl::GttWrite},
  }};
}

const Vgpu::Impl::Bar0Row* Vgpu::Impl::FindBar0Row(uint64_t off, size_t len) const {
  for (const Bar0Row& r : bar0_rows_)
    if (off >= r.begin && RangeWithin(off - r.begin, len, r.end - r.begin)) return &r;
  return nullptr;
}

Result<> Vgpu::Impl::Bar0Read(uint64_t off, std::span<std::byte> out) {
  const Bar0Row* row = FindBar0Row(off, out.size());
  if (!row) {
    std::memset(out.data(), 0, out.size());  // no row: reads as zero, as on hardware
    return Ok();
  }
  return (this->*row->read)(static_cast<uint32_t>(off), out);
}

Result<> Vgpu::Impl::Bar0Write(uint64_t off, std::span<const std::byte> data) {
  const Bar0Row* row = FindBar0Row(off, data.size());
  if (!row)
    return Refuse(abi::kErrSourceMmio, off, 0,
                  Error{Errc::kNotFound, fmt::format("no BAR0 row holds {} bytes at {:#x}", data.size(), off)});
  return (this->*row->write)(static_cast<uint32_t>(off), data);
}

// Rows: registers and privileged globals (one register map covers both pages).
Result<> Vgpu::Impl::RegsRead(uint32_t off, std::span<std::byte> out) {
  return ForEachDword(off, out.size(), [&](uint32_t o, size_t i) -> Result<> {
    VG_TRY_ASSIGN(uint32_t v, RegRead32(o));
    std::memcpy(out.data() + i, &v, 4);
    return Ok();
  });
}
Result<> Vgpu::Impl::RegsWrite(uint32_t off, std::span<const std::byte> data) {
  return ForEachDword(off, data.size(), [&](uint32_t o, size_t i) -> Result<> {
    uint32_t v;
    std::memcpy(&v, data.data() + i, 4);
    return RegWrite32(o, v);
  });
}

// Row: the status page. Mapped into the guest with no trap; trapped reads see the same bytes.
Result<> Vgpu::Impl::StatusPageRead(uint32_t off, std::span<std::byte> out) {
  std::memcpy(out.data(), bar0_map_.data() + off, out.size());
  return Ok();
}
Result<> Vgpu::Impl::StatusPageWrite(uint32_t off, std::span<const std::byte>) {
  return Refuse(abi::kErrSourceMmio, off, 0, Error{Errc::kReadOnly, "the status page is written by the device only"});
}

// Row: the GTT window, entries [0, GTT_ENTRIES).
Result<> Vgpu::Impl::GttRead(uint32_t off, std::span<std::byte> out) {
  uint32_t rel = off - abi::kGttOffset;
  VG_ERROR_IF(!((out.size() == 8 && rel % 8 == 0) || (out.size() == 4 && rel % 4 == 0)), Errc::kMisaligned,
              "GTT read of {} bytes at {:#x}", out.size(), off);
  uint64_t e = gtt_.Entry(rel / 8);
  const auto* src = reinterpret_cast<const std::byte*>(&e) + (rel % 8);
  std::memcpy(out.data(), src, out.size());
  return Ok();
}

// The BAR0 register map (docs/device-spec.md §BAR0). Data, not a switch.
#define VG_RO_CONST(off, name, fn) {off, name, Access::kRO, Policy::kNormal, nullptr, &Vgpu::Impl::fn, nullptr}
#define VG_RW(off, name, field, wr) {off, name, Access::kRW, Policy::kNormal, &RegState::field, nullptr, wr}
#define VG_RO(off, name, field) {off, name, Access::kRO, Policy::kNormal, &RegState::field, nullptr, nullptr}
#define VG_WO(off, name, wr) {off, name, Access::kWO, Policy::kNormal, nullptr, nullptr, wr}
#define VG_EMUL(off, name, field) {off, name, Access::kRW, Policy::kEmulated, &RegState::field, nullptr, nullptr}
#define VG_EMUL_CHECKED(off, name, field, wr) {off, name, Access::kRW, Policy::kEmulated, &RegState::field, nullptr, wr}
#define VG_REFUSED(off, name) {off, name, Access::kRW, Policy::kRefused, nullptr, nullptr, nullptr}
const Vgpu::Impl::RegDesc Vgpu::Impl::kRegisters[] = {
    VG_RO_CONST(abi::reg::kId, "ID", ReadId),
    VG_RO_CONST(abi::reg::kVersion, "VERSION", ReadVersion),
    VG_RO_CONST(abi::reg::kCaps, "CAPS", ReadCaps),
    VG_RO_CONST(abi::reg::kApertureSizeLo, "APERTURE_SIZE_LO", ReadApertureLo),
    VG_RO_CONST(abi::reg::kApertureSizeHi, "APERTURE_SIZE_HI", ReadApertureHi),
    VG_RO_CONST(abi::reg::kGttEntries, "GTT_ENTRIES", ReadGttEntries),
    VG_RO_CONST(abi::reg::kKernelCount, "KERNEL_COUNT", ReadKernelCount),
    VG_RW(abi::reg::kCtrl, "CTRL", ctrl, &Vgpu::Impl::WriteCtrl),
    VG_RO_CONST(abi::reg::kStatus, "STATUS", ReadStatus),
    VG_WO(abi::reg::kReset, "RESET", &Vgpu::Impl::WriteReset),
    VG_RW(abi::reg::kPowerState, "POWER_STATE", power_state, &Vgpu::Impl::WritePowerState),
    {abi::reg::kIrqStatus, "IRQ_STATUS", Access::kRW1C, Policy::kNormal, &RegState::irq_status, nullptr,
     &Vgpu::Impl::WriteIrqStatus},
    VG_RW(abi::reg::kIrqMask, "IRQ_MASK", irq_mask, &Vgpu::Impl::WriteIrqMask),
    VG_WO(abi::reg::kIrqTest, "IRQ_TEST", &Vgpu::Impl::WriteIrqTest),
    VG_RW(abi::reg::kScratch, "SCRATCH", scratch, &Vgpu::Impl::WriteScratch),
    VG_RW(abi::reg::kRingBaseLo, "RING_BASE_LO", ring_base_lo, &Vgpu::Impl::WriteRingBaseLo),
    VG_RW(abi::reg::kRingBaseHi, "RING_BASE_HI", ring_base_hi, &Vgpu::Impl::WriteRingBaseHi),
    VG_RW(abi::reg::kRingSize, "RING_SIZE", ring_size, &Vgpu::Impl::WriteRingSize),
    VG_RO(abi::reg::kRingHead, "RING_HEAD", ring_head),
    VG_RW(abi::reg::kRingTail, "RING_TAIL", ring_tail, &Vgpu::Impl::WriteRingTail),
    VG_WO(abi::reg::kDoorbellKick, "DOORBELL_KICK", &Vgpu::Impl::WriteKick),
    VG_RW(abi::reg::kTailShadowLo, "TAIL_SHADOW_LO", tail_shadow_lo, &Vgpu::Impl::WriteTailShadowLo),
    VG_RW(abi::reg::kTailShadowHi, "TAIL_SHADOW_HI", tail_shadow_hi, &Vgpu::Impl::WriteTailShadowHi),
    VG_RO(abi::reg::kErrCode, "ERR_CODE", err_code),
    VG_RO(abi::reg::kErrSource, "ERR_SOURCE", err_source),
    VG_RO(abi::reg::kErrAddrLo, "ERR_ADDR_LO", err_addr_lo),
    VG_RO(abi::reg::kErrAddrHi, "ERR_ADDR_HI", err_addr_hi),
    VG_RO(abi::reg::kErrInfo, "ERR_INFO", err_info),
    VG_RO(abi::reg::kErrCount, "ERR_COUNT", err_count),
    VG_WO(abi::reg::kErrClear, "ERR_CLEAR", &Vgpu::Impl::WriteErrClear),
    VG_RW(abi::reg::kGttBatchAddrLo, "GTT_BATCH_ADDR_LO", gtt_batch_lo, &Vgpu::Impl::WriteGttBatchAddrLo),
    VG_RW(abi::reg::kGttBatchAddrHi, "GTT_BATCH_ADDR_HI", gtt_batch_hi, nullptr),
    VG_WO(abi::reg::kGttBatchGo, "GTT_BATCH_GO", &Vgpu::Impl::WriteGttBatchGo),
    VG_REFUSED(abi::priv::kGlobalReset, "GLOBAL_RESET"),
    VG_EMUL(abi::priv::kClockMhz, "CLOCK_MHZ", clock_mhz),
    VG_REFUSED(abi::priv::kGlobalGttBaseLo, "GLOBAL_GTT_BASE_LO"),
    VG_REFUSED(abi::priv::kGlobalGttBaseHi, "GLOBAL_GTT_BASE_HI"),
    VG_REFUSED(abi::priv::kPowerGate, "POWER_GATE"),
    VG_REFUSED(abi::priv::kFenceWatchdogMs, "FENCE_WATCHDOG_MS"),
    // Scan-out (display.cc): the host's display is emulated per vGPU as one plane of its own.
    VG_EMUL(abi::priv::kDisplayBase, "DISPLAY_BASE", display_base),
    VG_EMUL(abi::priv::kDisplayStride, "DISPLAY_STRIDE", display_stride),
    VG_EMUL_CHECKED(abi::priv::kDisplayFormat, "DISPLAY_FORMAT", display_format, &Vgpu::Impl::WriteDisplayFormat),
    VG_EMUL(abi::priv::kDisplayWidth, "DISPLAY_WIDTH", display_width),
    VG_EMUL(abi::priv::kDisplayHeight, "DISPLAY_HEIGHT", display_height),
    VG_EMUL_CHECKED(abi::priv::kDisplayEnable, "DISPLAY_ENABLE", display_enable, &Vgpu::Impl::WriteDisplayEnable),
    VG_WO(abi::priv::kDisplayFlip, "DISPLAY_FLIP", &Vgpu::Impl::WriteDisplayFlip),
    VG_RO_CONST(abi::priv::kDisplayStatus, "DISPLAY_STATUS", ReadDisplayStatus),
    VG_RO(abi::priv::kDisplayFrames, "DISPLAY_FRAMES", display_frames),
    VG_RO(abi::priv::kDisplayFlips, "DISPLAY_FLIPS", display_flips),
    VG_RO_CONST(abi::priv::kDisplayLiveBase, "DISPLAY_LIVE_BASE", ReadDisplayLiveBase),
};
std::span<const Vgpu::Impl::RegDesc> Vgpu::Impl::Registers() { return kRegisters; }
#undef VG_RO_CONST
#undef VG_RW
#undef VG_RO
#undef VG_WO
#undef VG_EMUL
#undef VG_REFUSED
#undef VG_EMUL_CHECKED

}  // namespace vg::mediator
