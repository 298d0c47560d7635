#include <fcntl.h>
#include <linux/falloc.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>

#include "mediator/auditor.h"
#include "mediator/config_space.h"
#include "mediator/executor.h"
#include "mediator/gtt.h"
#include "mediator/mediator.h"
#include "vfio_user/dma.h"
#include "vfio_user/irqs.h"
#include "vfio_user/messages.h"
#include "shaders/catalogue.h"

namespace vg::mediator {

namespace vu = vfio_user;

namespace {

// Guest-visible register state. Every field is one dword so a snapshot is a flat array.
struct RegState {
  uint32_t ctrl = 0;
  uint32_t power_state = 0;
  uint32_t irq_status = 0;
  uint32_t irq_mask = 0;
  uint32_t scratch = 0;
  uint32_t ring_base_lo = 0, ring_base_hi = 0;
  uint32_t ring_size = 0;
  uint32_t ring_head = 0;
  uint32_t ring_tail = 0;
  uint32_t tail_shadow_lo = 0, tail_shadow_hi = 0;
  uint32_t err_code = 0, err_source = 0, err_addr_lo = 0, err_addr_hi = 0, err_info = 0, err_count = 0;
  uint32_t clock_mhz = 1000;
  uint32_t display_base = 0, display_stride = 0, display_format = 0, display_width = 0, display_height = 0,
           display_enable = 0;
  uint32_t resets = 0;
};
constexpr size_t kRegStateDwords = sizeof(RegState) / sizeof(uint32_t);
static_assert(sizeof(RegState) % sizeof(uint32_t) == 0);

enum class Access : uint8_t { kRO, kRW, kWO, kRW1C };
// kNormal: a vGPU register. kEmulated: a privileged global shadowed per vGPU. kRefused:
// a privileged global no guest may write.
enum class Policy : uint8_t { kNormal, kEmulated, kRefused };

constexpr uint32_t kMsixTableDwords = abi::kNumVectors * 4;

}  // namespace

class Vgpu::Impl {
 public:
  using ReadFn = uint32_t (Impl::*)() const;
  using WriteFn = Result<> (Impl::*)(uint32_t);
  struct RegDesc {
    uint32_t off;
    const char* name;
    Access access;
    Policy policy;
    uint32_t RegState::*field;  // storage, when the register is plain state
    ReadFn read;                // computed value, when it is not
    WriteFn write;              // validation + side effects; null: store into field
  };
  static const RegDesc kRegisters[];
  static std::span<const RegDesc> Registers();

  Impl(const VgpuConfig& cfg, UniqueFd status_fd, Mapping status, UniqueFd aperture_fd, Mapping aperture,
       EventFd doorbell)
      : cfg_(cfg),
        config_space_(cfg.aperture_size),
        gtt_(cfg.gtt_entries, cfg.aperture_size),
        bar0_fd_(std::move(status_fd)),
        bar0_map_(std::move(status)),
        aperture_fd_(std::move(aperture_fd)),
        aperture_(std::move(aperture)),
        doorbell_(std::move(doorbell)),
        irqs_(IrqLayout()) {
    PublishStatus();
  }

  static std::array<uint32_t, vu::kNumPciIrqs> IrqLayout() {
    std::array<uint32_t, vu::kNumPciIrqs> counts{};  // no INTx, ERR or REQ
    counts[vu::kIrqMsi] = abi::kNumVectors;
    counts[vu::kIrqMsix] = abi::kNumVectors;
    return counts;
  }

  // --- status page: device-written, guest-readable, never read back by the daemon ---
  std::byte* StatusPage() const { return bar0_map_.data() + abi::kStatusPageOffset; }
  void Store32(uint32_t off, uint32_t v) const {
    __atomic_store_n(reinterpret_cast<uint32_t*>(StatusPage() + off), v, __ATOMIC_RELEASE);
  }
  void Store64(uint32_t off, uint64_t v) const {
    __atomic_store_n(reinterpret_cast<uint64_t*>(StatusPage() + off), v, __ATOMIC_RELEASE);
  }
  void PublishStatus() {
    Store32(abi::status::kMagic, abi::kIdMagic);
    Store32(abi::status::kStateFlags, ReadStatus());
    Store64(abi::status::kCompletedFence, completed_fence_);
    Store32(abi::status::kRingHead, regs_.ring_head);
    Store32(abi::status::kErrCount, regs_.err_count);
    Store64(abi::status::kDoorbells, counters_.doorbells);
    Store64(abi::status::kSubmissions, submissions_);
    Store32(abi::status::kScratch, regs_.scratch);
    Store32(abi::status::kResets, regs_.resets);
  }

  // --- error report ---
  Error Refuse(uint32_t source, uint64_t addr, uint32_t info, Error e) {
    regs_.err_code = static_cast<uint32_t>(e.code);
    regs_.err_source = source;
    regs_.err_addr_lo = static_cast<uint32_t>(addr);
    regs_.err_addr_hi = static_cast<uint32_t>(addr >> 32);
    regs_.err_info = info;
    ++regs_.err_count;
    if (source == abi::kErrSourceMmio || source == abi::kErrSourceGtt)
      ++counters_.mmio_refusals;
    else
      ++counters_.command_refusals;
    VG_LOGW("vgpu {}: refused ({}) at {:#x}: {}", cfg_.uuid, ErrcName(e.code), addr, e.what);
    RaiseIrq(abi::kVectorError);
    PublishStatus();
    return e;
  }

  void RaiseIrq(uint32_t vector) {
    regs_.irq_status |= 1u << vector;
    ++counters_.irqs_raised;
    if (regs_.irq_mask & (1u << vector)) return;
    Deliver(vector);
  }
  // One interrupt mode is live at a time: MSI-X when the client wired it, else MSI.
  void Deliver(uint32_t vector) {
    uint32_t index = irqs_.HasEventFd(vu::kIrqMsix, vector) ? vu::kIrqMsix : vu::kIrqMsi;
    (void)irqs_.Trigger(index, vector);
  }

  // --- register handlers (data table below) ---
  uint32_t ReadId() const { return abi::kIdMagic; }
  uint32_t ReadVersion() const { return abi::kAbiVersion; }
  uint32_t ReadCaps() const {
    return abi::kCapStatusPage | abi::kCapDoorbellIoFd | abi::kCapMsix | abi::kCapMsi | abi::kCapRing;
  }
  uint32_t ReadApertureLo() const { return static_cast<uint32_t>(cfg_.aperture_size); }
  uint32_t ReadApertureHi() const { return static_cast<uint32_t>(cfg_.aperture_size >> 32); }
  uint32_t ReadGttEntries() const { return cfg_.gtt_entries; }
  uint32_t ReadKernelCount() const { return kernel_count_; }
  uint32_t ReadStatus() const {
    uint32_t s = 0;
    if (regs_.ctrl & abi::kCtrlRingEnable) s |= abi::kStatusRingEnabled;
    if (regs_.err_code != 0) s |= abi::kStatusErrorLatched;
    if (regs_.power_state == 3) s |= abi::kStatusD3;
    if (scrubs_pending_ != 0) s |= abi::kStatusResetting;
    return s;
  }

  Result<> WriteCtrl(uint32_t v) {
    VG_ERROR_IF(v & ~abi::kCtrlKnownBits, Errc::kBadFlags, "CTRL bits {:#x} unknown", v & ~abi::kCtrlKnownBits);
    if ((v & abi::kCtrlRingEnable) && !(regs_.ctrl & abi::kCtrlRingEnable)) {
      VG_ERROR_IF(regs_.ring_size == 0, Errc::kBadState, "ring enabled before RING_SIZE was set");
      regs_.ring_head = 0;
      regs_.ring_tail = 0;
    }
    regs_.ctrl = v;
    PublishStatus();
    return Ok();
  }
  Result<> WriteReset(uint32_t v) {
    VG_INVALID_IF(v != abi::kResetMagic, "RESET takes {:#x}, not {:#x}", abi::kResetMagic, v);
    // Carried out by RegionWrite once the lock is dropped: in-flight work must drain first,
    // and it needs the lock to finish.
    reset_pending_ = true;
    return Ok();
  }
  Result<> WritePowerState(uint32_t v) {
    VG_INVALID_IF(v != 0 && v != 3, "POWER_STATE {} is neither D0 (0) nor D3hot (3)", v);
    regs_.power_state = v;
    PublishStatus();
    return Ok();
  }
  Result<> WriteIrqStatus(uint32_t v) {
    regs_.irq_status &= ~v;
    return Ok();
  }
  Result<> WriteIrqMask(uint32_t v) {
    VG_ERROR_IF(v >> abi::kNumVectors, Errc::kBadFlags, "IRQ_MASK bits {:#x} name no vector", v);
    uint32_t unmasked = regs_.irq_mask & ~v;
    regs_.irq_mask = v;
    // A vector raised while masked is delivered when unmasked, as MSI-X pending bits are.
    for (uint32_t vec = 0; vec < abi::kNumVectors; ++vec)
      if ((unmasked & regs_.irq_status) & (1u << vec)) Deliver(vec);
    return Ok();
  }
  Result<> WriteIrqTest(uint32_t v) {
    VG_ERROR_IF(v >= abi::kNumVectors, Errc::kOutOfBounds, "IRQ_TEST vector {} past {}", v, abi::kNumVectors);
    RaiseIrq(v);
    return Ok();
  }
  Result<> WriteScratch(uint32_t v) {
    regs_.scratch = v;
    Store32(abi::status::kScratch, v);
    return Ok();
  }
  Result<> RingConfigWritable() const {
    VG_ERROR_IF(regs_.ctrl & abi::kCtrlRingEnable, Errc::kBusy, "ring registers are locked while the ring runs");
    return Ok();
  }
  Result<> WriteRingBaseLo(uint32_t v) {
    VG_TRY(RingConfigWritable());
    VG_ERROR_IF(!IsAligned(v, kPageSize), Errc::kMisaligned, "RING_BASE {:#x} not page aligned", v);
    regs_.ring_base_lo = v;
    return Ok();
  }
  Result<> WriteRingBaseHi(uint32_t v) {
    VG_TRY(RingConfigWritable());
    regs_.ring_base_hi = v;
    return Ok();
  }
  Result<> WriteRingSize(uint32_t v) {
    VG_TRY(RingConfigWritable());
    VG_INVALID_IF(!IsPowerOfTwo(v) || v < kPageSize || v > (1u << 20), "RING_SIZE {:#x} is not a power of two in [4 KiB, 1 MiB]", v);
    regs_.ring_size = v;
    return Ok();
  }
  Result<> WriteRingTail(uint32_t v) {
    VG_ERROR_IF(!(regs_.ctrl & abi::kCtrlRingEnable), Errc::kBadState, "doorbell rung with the ring disabled");
    VG_ERROR_IF(v >= regs_.ring_size, Errc::kOutOfBounds, "tail {:#x} past ring size {:#x}", v, regs_.ring_size);
    VG_ERROR_IF(!IsAligned(v, 4), Errc::kMisaligned, "tail {:#x} not dword aligned", v);
    regs_.ring_tail = v;
    Doorbell();
    ProcessRing();
    return Ok();
  }
  Result<> WriteKick(uint32_t) {
    Doorbell();
    return ReadTailShadowAndProcess();
  }
  Result<> WriteTailShadowLo(uint32_t v) {
    VG_ERROR_IF(!IsAligned(v, 4), Errc::kMisaligned, "TAIL_SHADOW {:#x} not dword aligned", v);
    regs_.tail_shadow_lo = v;
    return Ok();
  }
  Result<> WriteErrClear(uint32_t) {
    regs_.err_code = regs_.err_source = regs_.err_addr_lo = regs_.err_addr_hi = regs_.err_info = 0;
    PublishStatus();
    return Ok();
  }

  void Doorbell() {
    ++counters_.doorbells;
    Store64(abi::status::kDoorbells, counters_.doorbells);
  }

  uint64_t RingBase() const { return uint64_t{regs_.ring_base_hi} << 32 | regs_.ring_base_lo; }

  // A kick carries no value: the tail is read, once, from the guest's tail shadow.
  Result<> ReadTailShadowAndProcess() {
    VG_ERROR_IF(!(regs_.ctrl & abi::kCtrlRingEnable), Errc::kBadState, "doorbell kicked with the ring disabled");
    uint64_t va = uint64_t{regs_.tail_shadow_hi} << 32 | regs_.tail_shadow_lo;
    uint32_t tail = 0;
    auto range = gtt_.Translate(GpuVa{va}, ByteSize{4}, GttAccess::kRead);
    Result<> read = range.ok() ? view_.Read(ResolvedRange{GpuVa{va}, ByteSize{4}, false, *range},
                                            std::as_writable_bytes(std::span(&tail, 1)))
                               : Result<>(range.error());
    if (!read.ok()) {
      Refuse(abi::kErrSourceRing, va, 0, std::move(read).error());
      return Ok();  // the kick itself was fine; the report names the bad shadow
    }
    if (tail >= regs_.ring_size || !IsAligned(tail, 4)) {
      Refuse(abi::kErrSourceRing, tail, 0,
             Error{Errc::kOutOfBounds, fmt::format("tail shadow {:#x} outside a ring of {:#x}", tail, regs_.ring_size)});
      return Ok();
    }
    regs_.ring_tail = tail;
    ProcessRing();
    return Ok();
  }

  // Copy, then check, then use: the span [head, tail) is copied out of guest memory once,
  // the copy is audited, and only the resulting Plan is executed. The ring moves on to the
  // tail whatever the audit says, so a refused submission never wedges the vGPU.
  void ProcessRing() {
    uint32_t head = regs_.ring_head, tail = regs_.ring_tail, size = regs_.ring_size;
    if (head == tail) return;
    uint32_t bytes = (tail - head) & (size - 1);
    std::vector<uint32_t> shadow(bytes / 4);
    auto* out = reinterpret_cast<std::byte*>(shadow.data());
    uint32_t first = std::min(bytes, size - head);
    Result<> copied = CopyRing(head, first, out);
    if (copied.ok() && first < bytes) copied = CopyRing(0, bytes - first, out + first);
    regs_.ring_head = tail;
    Store32(abi::status::kRingHead, tail);
    if (!copied.ok()) {
      Refuse(abi::kErrSourceRing, RingBase() + head, 0, std::move(copied).error());
      return;
    }
    // A full executor queue refuses before the audit: no span building for work that
    // could not be queued anyway.
    if (Result<> room = exec_->Admit(); !room.ok()) {
      Refuse(abi::kErrSourceRing, head, 0, std::move(room).error());
      return;
    }
    Auditor auditor(gtt_, [this](const ResolvedRange& r) -> Result<std::vector<uint32_t>> {
      std::vector<uint32_t> batch(r.size.v / 4);
      VG_TRY(view_.Read(r, std::as_writable_bytes(std::span(batch))));
      return batch;
    });
    AuditFault fault;
    Result<Plan> plan = auditor.Audit(shadow, head, size, &fault);
    if (!plan.ok()) {
      Refuse(fault.source, fault.addr, fault.opcode, std::move(plan).error());
      return;
    }
    uint32_t commands = plan->commands;
    // Bounded per vGPU (count and bytes): past it the submission is refused by name.
    if (Result<> queued = exec_->Enqueue(std::move(plan).value()); !queued.ok()) {
      Refuse(abi::kErrSourceRing, head, 0, std::move(queued).error());
      return;
    }
    counters_.commands_audited += commands;
    ++submissions_;
    Store64(abi::status::kSubmissions, submissions_);
  }

  Result<> CopyRing(uint32_t offset, uint32_t len, std::byte* out) {
    VG_TRY_ASSIGN(uint64_t va, CheckedAdd(RingBase(), offset));
    VG_TRY_ASSIGN(auto spans, gtt_.Translate(GpuVa{va}, ByteSize{len}, GttAccess::kRead));
    return view_.Read(ResolvedRange{GpuVa{va}, ByteSize{len}, false, std::move(spans)}, std::span(out, len));
  }

  // --- executor hooks: called from the executor thread ---
  void OnFence(uint64_t value, bool irq) {
    std::lock_guard lk(mu_);
    completed_fence_ = value;
    Store64(abi::status::kCompletedFence, value);
    if (irq) RaiseIrq(abi::kVectorFence);
  }
  void OnLoadReg(uint32_t reg, uint32_t value) {
    std::lock_guard lk(mu_);
    (void)RegWrite32(reg, value);  // whitelisted by the auditor; a refusal reports itself
  }
  void OnExecFailure(const Error& e) {
    std::lock_guard lk(mu_);
    Refuse(abi::kErrSourceCommand, 0, 0, e);
  }

  // Reset without waiting for the engine (called without mu_): the executor is cancelled
  // (queued plans dropped, the running one stopped at its next submission boundary, none
  // of its hooks run), the registers reset at once, and the aperture scrub runs once the
  // submission in flight has ended: at once when there is none, else on the executor
  // thread with STATUS.RESETTING set until it has (docs/device-spec.md, reset).
  Result<> CancelAndReset(bool config_too) {
    bool deferred = exec_->Cancel([this] {
      std::lock_guard lk(mu_);
      (void)ScrubAperture();
      --scrubs_pending_;
      PublishStatus();
    });
    std::lock_guard lk(mu_);
    if (config_too) config_space_.Reset();
    if (deferred) ++scrubs_pending_;
    return DoReset(!deferred);
  }

  Result<> DoReset(bool scrub = true) {
    // Per-vGPU reset: registers, GTT and aperture back to creation state. IRQ wiring and
    // DMA mappings belong to the connection, not to the device, and stay.
    uint32_t resets = regs_.resets + 1;
    regs_ = RegState{};
    regs_.resets = resets;
    gtt_.Clear();
    msix_table_.fill(0);
    for (uint32_t v = 0; v < abi::kNumVectors; ++v) msix_table_[v * 4 + 3] = 1;  // vectors start masked
    completed_fence_ = 0;
    submissions_ = 0;
    ++counters_.resets;
    if (scrub) VG_TRY(ScrubAperture());
    PublishStatus();
    return Ok();
  }

  Result<> ScrubAperture() {
    // Punching the whole file drops every page: the guest's mapping and ours read zeros
    // afterwards, and nothing of the previous contents survives in host memory.
    if (::fallocate(aperture_fd_.Get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                    static_cast<off_t>(cfg_.aperture_size)) != 0) {
      std::memset(aperture_.data(), 0, aperture_.size().v);
    }
    return Ok();
  }

  const RegDesc* FindReg(uint32_t off) const {
    for (const RegDesc& r : Registers())
      if (r.off == off) return &r;
    return nullptr;
  }

  Result<uint32_t> RegRead32(uint32_t off) {
    const RegDesc* r = FindReg(off);
    if (!r) return uint32_t{0};  // unimplemented registers read as zero, as on hardware
    if (r->access == Access::kWO) return uint32_t{0};
    if (r->read) return (this->*r->read)();
    return regs_.*(r->field);
  }

  Result<> RegWrite32(uint32_t off, uint32_t v) {
    const RegDesc* r = FindReg(off);
    if (!r) return Refuse(abi::kErrSourceMmio, off, v, Error{Errc::kNotFound, fmt::format("no register at {:#x}", off)});
    if (r->policy == Policy::kRefused)
      return Refuse(abi::kErrSourceMmio, off, v,
                    Error{Errc::kPrivileged, fmt::format("{} is a privileged global register", r->name)});
    if (r->access == Access::kRO)
      return Refuse(abi::kErrSourceMmio, off, v, Error{Errc::kReadOnly, fmt::format("{} is read-only", r->name)});
    if (r->write) {
      Result<> res = (this->*r->write)(v);
      if (!res.ok()) {
        Error e = std::move(res).error();
        e.what = fmt::format("{} <- {:#x}: {}", r->name, v, e.what);
        return Refuse(abi::kErrSourceMmio, off, v, std::move(e));
      }
      return Ok();
    }
    regs_.*(r->field) = v;
    return Ok();
  }

  // --- MSI-X table (trapped): 4 dwords per vector; PBA read-only ---
  Result<uint32_t> MsixRead32(uint32_t off) const {
    if (off >= abi::kMsixPbaOffset) {
      uint32_t pending = 0;
      for (uint32_t v = 0; v < abi::kNumVectors; ++v)
        if ((regs_.irq_status & (1u << v)) && (msix_table_[v * 4 + 3] & 1)) pending |= 1u << v;
      return off == abi::kMsixPbaOffset ? pending : 0u;
    }
    return msix_table_[(off - abi::kMsixTableOffset) / 4];
  }

  // --- GTT window ---
  Result<> CheckGuestPage(Gpa page, bool writable) const {
    uint32_t prot = vu::kDmaRead | (writable ? vu::kDmaWrite : 0);
    VG_ERROR_IF(!dma_.Contains(page, ByteSize{kPageSize}, vu::kDmaRead), Errc::kNotMapped,
                "page {} is not guest memory this vGPU was given", page);
    VG_ERROR_IF(!dma_.Contains(page, ByteSize{kPageSize}, prot), Errc::kAccessDenied,
                "page {} is mapped read-only", page);
    return Ok();
  }
  Result<> GttWrite(uint32_t off, std::span<const std::byte> data) {
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
        gtt_latch_ = half;
        gtt_latch_index_ = index;
        return Ok();
      }
      uint32_t lo = gtt_latch_index_ == index ? gtt_latch_ : static_cast<uint32_t>(gtt_.Entry(index));
      entry = uint64_t{half} << 32 | lo;
      gtt_latch_index_ = UINT32_MAX;
    } else {
      return Refuse(abi::kErrSourceGtt, off, 0,
                    Error{Errc::kMisaligned, fmt::format("GTT access of {} bytes at {:#x}", data.size(), off)});
    }
    auto check = [this](Gpa p, bool w) { return CheckGuestPage(p, w); };
    Result<> r = gtt_.Write(index, entry, check);
    if (!r.ok()) return Refuse(abi::kErrSourceGtt, entry & ~abi::kGttFlagMask, index, std::move(r).error());
    return Ok();
  }

  Result<> Bar0Read(uint64_t off, std::span<std::byte> out) {
    if (off >= abi::kStatusPageOffset && off + out.size() <= abi::kStatusPageOffset + kPageSize) {
      std::memcpy(out.data(), bar0_map_.data() + off, out.size());
      return Ok();
    }
    if (off >= abi::kGttOffset) {
      uint32_t rel = static_cast<uint32_t>(off - abi::kGttOffset);
      VG_ERROR_IF(rel / 8 >= cfg_.gtt_entries, Errc::kOutOfBounds, "GTT read at {:#x} past {} entries", off,
                  cfg_.gtt_entries);
      VG_ERROR_IF(!((out.size() == 8 && rel % 8 == 0) || (out.size() == 4 && rel % 4 == 0)), Errc::kMisaligned,
                  "GTT read of {} bytes at {:#x}", out.size(), off);
      uint64_t e = gtt_.Entry(rel / 8);
      const auto* src = reinterpret_cast<const std::byte*>(&e) + (rel % 8);
      std::memcpy(out.data(), src, out.size());
      return Ok();
    }
    return ForEachDword(off, out.size(), [&](uint32_t o, size_t i) -> Result<> {
      uint32_t v;
      if (o >= abi::kMsixTableOffset && o < abi::kMsixTableOffset + 0x1000) {
        VG_TRY_ASSIGN(v, MsixRead32(o));
      } else {
        VG_TRY_ASSIGN(v, RegRead32(o));
      }
      std::memcpy(out.data() + i, &v, 4);
      return Ok();
    });
  }

  Result<> Bar0Write(uint64_t off, std::span<const std::byte> data) {
    if (off >= abi::kGttOffset) {
      uint32_t rel = static_cast<uint32_t>(off - abi::kGttOffset);
      if (rel / 8 >= cfg_.gtt_entries)
        return Refuse(abi::kErrSourceGtt, off, 0,
                      Error{Errc::kOutOfBounds, fmt::format("GTT index {} past {} entries", rel / 8, cfg_.gtt_entries)});
      return GttWrite(static_cast<uint32_t>(off), data);
    }
    if (off >= abi::kStatusPageOffset && off < abi::kStatusPageOffset + kPageSize)
      return Refuse(abi::kErrSourceMmio, off, 0,
                    Error{Errc::kReadOnly, "the status page is written by the device only"});
    if (off >= abi::kMsixPbaOffset && off < abi::kMsixPbaOffset + 0x800)
      return Refuse(abi::kErrSourceMmio, off, 0, Error{Errc::kReadOnly, "the MSI-X PBA is read-only"});
    return ForEachDword(off, data.size(), [&](uint32_t o, size_t i) -> Result<> {
      uint32_t v;
      std::memcpy(&v, data.data() + i, 4);
      if (o >= abi::kMsixTableOffset && o < abi::kMsixTableOffset + kMsixTableDwords * 4) {
        msix_table_[(o - abi::kMsixTableOffset) / 4] = v;
        return Ok();
      }
      return RegWrite32(o, v);
    });
  }

  // Registers are dwords; a qword access is two dword accesses, low first.
  template <class Fn>
  Result<> ForEachDword(uint64_t off, size_t len, Fn&& fn) {
    if (!((len == 4 || len == 8) && IsAligned(off, 4))) {
      Error e{Errc::kMisaligned, fmt::format("register access of {} bytes at {:#x}", len, off)};
      return Refuse(abi::kErrSourceMmio, off, 0, std::move(e));
    }
    for (size_t i = 0; i < len; i += 4) VG_TRY(fn(static_cast<uint32_t>(off + i), i));
    return Ok();
  }

  VgpuConfig cfg_;
  mutable std::mutex mu_;
  RegState regs_;
  ConfigSpace config_space_;
  Gtt gtt_;
  std::array<uint32_t, kMsixTableDwords> msix_table_{};
  uint32_t gtt_latch_ = 0;
  uint32_t gtt_latch_index_ = UINT32_MAX;
  uint64_t completed_fence_ = 0;
  uint64_t submissions_ = 0;
  uint32_t kernel_count_ = 0;
  VgpuCounters counters_;
  bool reset_pending_ = false;
  int32_t scrubs_pending_ = 0;  // deferred aperture scrubs (CancelAndReset), under mu_

  UniqueFd bar0_fd_;  // backs the status page (sparse mmap)
  Mapping bar0_map_;
  UniqueFd aperture_fd_;
  Mapping aperture_;
  EventFd doorbell_;
  vu::DmaSpace dma_;
  vu::IrqSet irqs_;
  GuestView view_{dma_, aperture_.bytes()};
  // Last: destroyed first, while everything it uses is still alive.
  std::unique_ptr<Executor> exec_;
};

// The BAR0 register map (docs/device-spec.md §BAR0). Data, not a switch.
#define VG_RO_CONST(off, name, fn) {off, name, Access::kRO, Policy::kNormal, nullptr, &Vgpu::Impl::fn, nullptr}
#define VG_RW(off, name, field, wr) {off, name, Access::kRW, Policy::kNormal, &RegState::field, nullptr, wr}
#define VG_RO(off, name, field) {off, name, Access::kRO, Policy::kNormal, &RegState::field, nullptr, nullptr}
#define VG_WO(off, name, wr) {off, name, Access::kWO, Policy::kNormal, nullptr, nullptr, wr}
#define VG_EMUL(off, name, field) {off, name, Access::kRW, Policy::kEmulated, &RegState::field, nullptr, nullptr}
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
    VG_RW(abi::reg::kTailShadowHi, "TAIL_SHADOW_HI", tail_shadow_hi, nullptr),
    VG_RO(abi::reg::kErrCode, "ERR_CODE", err_code),
    VG_RO(abi::reg::kErrSource, "ERR_SOURCE", err_source),
    VG_RO(abi::reg::kErrAddrLo, "ERR_ADDR_LO", err_addr_lo),
    VG_RO(abi::reg::kErrAddrHi, "ERR_ADDR_HI", err_addr_hi),
    VG_RO(abi::reg::kErrInfo, "ERR_INFO", err_info),
    VG_RO(abi::reg::kErrCount, "ERR_COUNT", err_count),
    VG_WO(abi::reg::kErrClear, "ERR_CLEAR", &Vgpu::Impl::WriteErrClear),
    VG_REFUSED(abi::priv::kGlobalReset, "GLOBAL_RESET"),
    VG_EMUL(abi::priv::kClockMhz, "CLOCK_MHZ", clock_mhz),
    VG_REFUSED(abi::priv::kGlobalGttBaseLo, "GLOBAL_GTT_BASE_LO"),
    VG_REFUSED(abi::priv::kGlobalGttBaseHi, "GLOBAL_GTT_BASE_HI"),
    VG_REFUSED(abi::priv::kPowerGate, "POWER_GATE"),
    VG_REFUSED(abi::priv::kFenceWatchdogMs, "FENCE_WATCHDOG_MS"),
    VG_EMUL(abi::priv::kDisplayBase, "DISPLAY_BASE", display_base),
    VG_EMUL(abi::priv::kDisplayStride, "DISPLAY_STRIDE", display_stride),
    VG_EMUL(abi::priv::kDisplayFormat, "DISPLAY_FORMAT", display_format),
    VG_EMUL(abi::priv::kDisplayWidth, "DISPLAY_WIDTH", display_width),
    VG_EMUL(abi::priv::kDisplayHeight, "DISPLAY_HEIGHT", display_height),
    VG_EMUL(abi::priv::kDisplayEnable, "DISPLAY_ENABLE", display_enable),
};
std::span<const Vgpu::Impl::RegDesc> Vgpu::Impl::Registers() { return kRegisters; }
#undef VG_RO_CONST
#undef VG_RW
#undef VG_RO
#undef VG_WO
#undef VG_EMUL
#undef VG_REFUSED

// ---------------------------------------------------------------------------------------

Result<std::unique_ptr<Vgpu>> Vgpu::Create(const VgpuConfig& cfg) {
  VG_INVALID_IF(!IsPowerOfTwo(cfg.aperture_size) || cfg.aperture_size < kPageSize,
                "aperture size {:#x} must be a power of two >= 4 KiB", cfg.aperture_size);
  VG_INVALID_IF(cfg.gtt_entries == 0 || cfg.gtt_entries > abi::kGttMaxEntries, "GTT of {} entries not in [1, {}]",
                cfg.gtt_entries, abi::kGttMaxEntries);
  std::string tag = cfg.uuid.ToString();
  // BAR0's fd only backs the status page; the pages before it are never offered for mmap.
  ByteSize bar0_backing{abi::kStatusPageOffset + kPageSize};
  VG_TRY_ASSIGN(UniqueFd status_fd, CreateMemFd("vgpud-bar0-" + tag, bar0_backing));
  VG_TRY_ASSIGN(Mapping status_map, Mapping::Map(status_fd, bar0_backing, 0));
  // A fresh memfd reads as zeros: the aperture is scrubbed at creation by construction.
  VG_TRY_ASSIGN(UniqueFd ap_fd, CreateMemFd("vgpud-aperture-" + tag, ByteSize{cfg.aperture_size}));
  VG_TRY_ASSIGN(Mapping ap_map, Mapping::Map(ap_fd, ByteSize{cfg.aperture_size}, 0));
  VG_TRY_ASSIGN(EventFd doorbell, EventFd::Create());
  auto impl = std::make_unique<Impl>(cfg, std::move(status_fd), std::move(status_map), std::move(ap_fd),
                                     std::move(ap_map), std::move(doorbell));
  {
    std::lock_guard lk(impl->mu_);
    for (uint32_t v = 0; v < abi::kNumVectors; ++v) impl->msix_table_[v * 4 + 3] = 1;
    impl->kernel_count_ = static_cast<uint32_t>(shaders::AllKernels().size());
  }
  engine::BufferRef aperture_buffer;
  if (cfg.engine) {
    // The aperture is the vGPU's device memory: the engine uses it in place.
    auto wrapped = cfg.engine->WrapHostMemory(impl->aperture_.bytes());
    if (wrapped.ok()) aperture_buffer = std::move(wrapped).value();
  }
  Impl* raw = impl.get();
  impl->exec_ = std::make_unique<Executor>(
      cfg.engine, impl->dma_, impl->aperture_.bytes(), std::move(aperture_buffer),
      ExecHooks{[raw](uint64_t v, bool irq) { raw->OnFence(v, irq); },
                [raw](uint32_t reg, uint32_t v) { raw->OnLoadReg(reg, v); },
                [raw](const Error& e) { raw->OnExecFailure(e); }});
  return std::unique_ptr<Vgpu>(new Vgpu(std::move(impl)));
}

Vgpu::Vgpu(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Vgpu::~Vgpu() = default;

const VgpuConfig& Vgpu::config() const { return impl_->cfg_; }
const EventFd& Vgpu::doorbell() const { return impl_->doorbell_; }

void Vgpu::OnDoorbellKick() {
  std::lock_guard lk(impl_->mu_);
  impl_->Doorbell();
  Result<> r = impl_->ReadTailShadowAndProcess();
  if (!r.ok()) impl_->Refuse(abi::kErrSourceRing, abi::reg::kDoorbellKick, 0, std::move(r).error());
}

void Vgpu::WaitIdle() { impl_->exec_->WaitIdle(); }

void Vgpu::OnConnect(vu::DmaMessenger* messenger) { impl_->dma_.SetMessenger(messenger); }

void Vgpu::OnDisconnect() {
  // The guest is gone: its queued work goes with it, and the running plan stops at its
  // next submission boundary (its pins keep guest memory mapped until then). No wait.
  impl_->exec_->Cancel();
  impl_->exec_->DropImports(Gpa{0}, ByteSize{~0ull});
  std::lock_guard lk(impl_->mu_);
  impl_->dma_.SetMessenger(nullptr);
  impl_->dma_.Clear();
  impl_->irqs_.Clear();
  // Guest memory is gone with the connection; GTT entries into it would dangle.
  impl_->gtt_.InvalidateGuestRange(Gpa{0}, ByteSize{~0ull});
}

Result<vu::RegionInfo> Vgpu::GetRegionInfo(uint32_t index) {
  vu::RegionInfo info;
  switch (index) {  // VFIO region indices are the protocol's, not the device's registers
    case vu::kBar0Region:
      info.flags = vu::kRegionRead | vu::kRegionWrite | vu::kRegionMmap;  // CAPS: the server's, with the sparse areas
      info.size = ByteSize{abi::kBar0Size};
      info.sparse_areas = {{abi::kStatusPageOffset, kPageSize}};
      info.mmap_fd = &impl_->bar0_fd_;
      break;
    case vu::kBar2Region:
      info.flags = vu::kRegionRead | vu::kRegionWrite | vu::kRegionMmap;
      info.size = ByteSize{impl_->cfg_.aperture_size};
      info.mmap_fd = &impl_->aperture_fd_;
      break;
    case vu::kConfigRegion:
      info.flags = vu::kRegionRead | vu::kRegionWrite;
      info.size = ByteSize{ConfigSpace::kSize};
      break;
    default:
      VG_ERROR_IF(index >= NumRegions(), Errc::kBadRegion, "region {} past {}", index, NumRegions());
      break;  // unimplemented BARs, ROM and VGA: size 0
  }
  return info;
}

Result<std::vector<vu::IoFd>> Vgpu::GetRegionIoFds(uint32_t index) {
  VG_ERROR_IF(index >= NumRegions(), Errc::kBadRegion, "region {} past {}", index, NumRegions());
  std::vector<vu::IoFd> fds;
  if (index == vu::kBar0Region)
    fds.push_back({abi::reg::kDoorbellKick, 4, 0, 0, &impl_->doorbell_});
  return fds;
}

Result<vu::IrqInfo> Vgpu::GetIrqInfo(uint32_t index) { return impl_->irqs_.Info(index); }

Result<> Vgpu::SetIrqs(const vu::SetIrqsArgs& args, std::vector<UniqueFd> fds, std::span<const uint8_t> bools) {
  std::lock_guard lk(impl_->mu_);
  VG_TRY(impl_->irqs_.Validate(args, fds.size(), bools.size()));
  return impl_->irqs_.Apply(args, std::move(fds), bools);
}

Result<> Vgpu::RegionRead(uint32_t index, uint64_t offset, std::span<std::byte> out) {
  std::lock_guard lk(impl_->mu_);
  switch (index) {
    case vu::kConfigRegion:
      return impl_->config_space_.Read(static_cast<uint32_t>(offset), out);
    case vu::kBar0Region:
      VG_ERROR_IF(!RangeWithin(offset, out.size(), abi::kBar0Size), Errc::kOutOfBounds, "BAR0 read past end");
      return impl_->Bar0Read(offset, out);
    case vu::kBar2Region:
      VG_ERROR_IF(!RangeWithin(offset, out.size(), impl_->cfg_.aperture_size), Errc::kOutOfBounds,
                  "aperture read past end");
      std::memcpy(out.data(), impl_->aperture_.data() + offset, out.size());
      return Ok();
    default:
      return MakeError(Errc::kBadRegion, "region {} is not readable", index);
  }
}

Result<> Vgpu::RegionWrite(uint32_t index, uint64_t offset, std::span<const std::byte> data) {
  Result<> r = RegionWriteLocked(index, offset, data);
  if (impl_->reset_pending_) {
    impl_->reset_pending_ = false;
    VG_TRY(impl_->CancelAndReset(false));
  }
  return r;
}

Result<> Vgpu::RegionWriteLocked(uint32_t index, uint64_t offset, std::span<const std::byte> data) {
  std::lock_guard lk(impl_->mu_);
  switch (index) {
    case vu::kConfigRegion:
      return impl_->config_space_.Write(static_cast<uint32_t>(offset), data);
    case vu::kBar0Region:
      VG_ERROR_IF(!RangeWithin(offset, data.size(), abi::kBar0Size), Errc::kOutOfBounds, "BAR0 write past end");
      return impl_->Bar0Write(offset, data);
    case vu::kBar2Region:
      VG_ERROR_IF(!RangeWithin(offset, data.size(), impl_->cfg_.aperture_size), Errc::kOutOfBounds,
                  "aperture write past end");
      std::memcpy(impl_->aperture_.data() + offset, data.data(), data.size());
      return Ok();
    default:
      return MakeError(Errc::kBadRegion, "region {} is not writable", index);
  }
}

Result<> Vgpu::DmaMap(const vu::DmaMapArgs& args, UniqueFd fd) { return impl_->dma_.Map(args, std::move(fd)); }

Result<> Vgpu::DmaUnmap(const vu::DmaUnmapArgs& args) {
  // QEMU's unmap-all names no range: everything goes.
  bool all = args.flags & vu::kDmaUnmapAll;
  Gpa from = all ? Gpa{0} : args.iova;
  ByteSize size = all ? ByteSize{~0ull} : args.size;
  impl_->exec_->DropImports(from, size);
  // kBusy still removed the region from translation (work in flight keeps only its own
  // pin): the GTT forgets it either way, then the error is reported.
  Result<> unmapped = impl_->dma_.Unmap(args);
  if (!unmapped.ok() && unmapped.code() != Errc::kBusy) return unmapped;
  std::lock_guard lk(impl_->mu_);
  uint32_t dropped = impl_->gtt_.InvalidateGuestRange(from, size);
  if (dropped) VG_LOGI("vgpu {}: DMA_UNMAP {}+{:#x} invalidated {} GTT entries", impl_->cfg_.uuid, args.iova,
                       args.size.v, dropped);
  return unmapped;
}

Result<> Vgpu::Reset() {
  return impl_->CancelAndReset(true);  // no work lands in the aperture after the scrub
}

DeviceSnapshot Vgpu::Snapshot() const {
  std::lock_guard lk(impl_->mu_);
  DeviceSnapshot s;
  auto cfg = impl_->config_space_.Bytes();
  s.config.assign(cfg.begin(), cfg.end());
  s.regs.resize(kRegStateDwords);
  std::memcpy(s.regs.data(), &impl_->regs_, sizeof(RegState));
  s.gtt = impl_->gtt_.entries();
  s.msix_table.assign(impl_->msix_table_.begin(), impl_->msix_table_.end());
  auto ap = impl_->aperture_.bytes();
  s.aperture.resize(ap.size());
  std::memcpy(s.aperture.data(), ap.data(), ap.size());
  return s;
}

Result<> Vgpu::Restore(const DeviceSnapshot& s) {
  std::lock_guard lk(impl_->mu_);
  VG_INVALID_IF(s.regs.size() != kRegStateDwords, "snapshot has {} register dwords, want {}", s.regs.size(),
                kRegStateDwords);
  VG_INVALID_IF(s.msix_table.size() != kMsixTableDwords, "snapshot MSI-X table size {}", s.msix_table.size());
  VG_INVALID_IF(s.aperture.size() != impl_->cfg_.aperture_size, "snapshot aperture of {:#x} bytes, want {:#x}",
                s.aperture.size(), impl_->cfg_.aperture_size);
  VG_INVALID_IF(s.config.size() != ConfigSpace::kSize, "snapshot config space of {} bytes", s.config.size());
  VG_INVALID_IF(s.gtt.size() != impl_->cfg_.gtt_entries, "snapshot GTT of {} entries", s.gtt.size());
  // Every size was checked above, so nothing below can fail half-way.
  VG_TRY(impl_->config_space_.RestoreBytes(s.config));
  VG_TRY(impl_->gtt_.Restore(s.gtt));
  std::memcpy(static_cast<void*>(&impl_->regs_), s.regs.data(), sizeof(RegState));
  std::copy(s.msix_table.begin(), s.msix_table.end(), impl_->msix_table_.begin());
  std::memcpy(impl_->aperture_.data(), s.aperture.data(), s.aperture.size());
  impl_->PublishStatus();
  return Ok();
}

VgpuCounters Vgpu::Counters() const {
  ExecCounters ec = impl_->exec_->Counters();
  std::lock_guard lk(impl_->mu_);
  VgpuCounters c = impl_->counters_;
  c.submissions = impl_->submissions_;
  c.plans_executed = ec.plans;
  c.bytes_zero_copy = ec.bytes_zero_copy;
  c.bytes_gathered = ec.bytes_gathered;
  return c;
}

ErrorReport Vgpu::LastError() const {
  std::lock_guard lk(impl_->mu_);
  const RegState& r = impl_->regs_;
  return {r.err_code, r.err_source, uint64_t{r.err_addr_hi} << 32 | r.err_addr_lo, r.err_info, r.err_count};
}

}  // namespace vg::mediator
