#pragma once
// Internal to mediator/: the state of one vGPU and the declarations its concerns share.
// Vgpu::Impl is one object (one mutex guards it all), but its code is split by concern so
// that each guest-facing surface can be read and reviewed alone:
//   vgpu.cc          the DeviceBackend glue, creation, reset, snapshot
//   bar0_table.cc    the BAR0 page table and register map: every BAR0 access is routed here
//   msix.cc          interrupts: MSI-X table and PBA, MSI, the device's own mask
//   ring.cc          doorbell, ring copy and audit, executor hooks
//   error_report.cc  refusals: the error report registers and the status page
// Nothing outside mediator/ includes this file; mediator/mediator.h is the public header.

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>

#include "mediator/auditor.h"
#include "mediator/config_space.h"
#include "mediator/executor.h"
#include "mediator/gtt.h"
#include "mediator/guest_fetch.h"
#include "mediator/mediator.h"
#include "vfio_user/dma.h"
#include "vfio_user/irqs.h"
#include "vfio_user/messages.h"

namespace vg::mediator {

namespace vu = vfio_user;

// One scan-out plane as committed: checked against the aperture when it was committed.
struct DisplayPlane {
  uint32_t valid = 0;  // 1: a plane (pending: a commit waits; live: being scanned out)
  uint32_t base = 0, stride = 0, format = 0, width = 0, height = 0;
};

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
  // Scan-out (display.cc): the staged plane as written, ...
  uint32_t display_base = 0, display_stride = 0, display_format = 0, display_width = 0, display_height = 0,
           display_enable = 0;
  uint32_t resets = 0;
  uint32_t msix_pending = 0;  // the MSI-X PBA: vectors raised while masked
  uint32_t gtt_batch_lo = 0, gtt_batch_hi = 0;  // GTT_BATCH_ADDR
  // ... the commit waiting for the next frame boundary (checked when committed) and the plane
  // being scanned out (a commit that took effect). Appended: snapshots are flat dwords.
  DisplayPlane display_pending;
  DisplayPlane display_live;
  uint32_t display_frames = 0, display_flips = 0;
};
inline constexpr size_t kRegStateDwords = sizeof(RegState) / sizeof(uint32_t);
static_assert(sizeof(RegState) % sizeof(uint32_t) == 0);

enum class Access : uint8_t { kRO, kRW, kWO, kRW1C };
// What a refusal tells the fault monitor (F7). kBySource: a guest fault of the kind its
// error source names (MMIO, GTT and GTT batch: MMIO refusals; ring and command: command
// refusals). kExecution: guest memory faulted while a plan ran. kFlowControl: not a fault
// (a full queue, an unmap of memory in use): a busy, honest guest gets these too.
enum class FaultClass : uint8_t { kBySource, kExecution, kFlowControl };
// kNormal: a vGPU register. kEmulated: a privileged global shadowed per vGPU. kRefused:
// a privileged global no guest may write.
enum class Policy : uint8_t { kNormal, kEmulated, kRefused };

inline constexpr uint32_t kMsixTableDwords = abi::kNumVectors * 4;

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
       EventFd doorbell);
  // Marks the vGPU dying before its members go: the executor's last plan_done may still run
  // while exec_ joins, after fetch_ is gone, and must then touch nothing.
  ~Impl();

  // --- error_report.cc: status page and refusals ---
  std::byte* StatusPage() const { return bar0_map_.data() + abi::kStatusPageOffset; }
  void Store32(uint32_t off, uint32_t v) const;
  void Store64(uint32_t off, uint64_t v) const;
  void PublishStatus();
  Error Refuse(uint32_t source, uint64_t addr, uint32_t info, Error e, FaultClass fault = FaultClass::kBySource);
  Result<> WriteErrClear(uint32_t);

  // --- msix.cc: interrupts ---
  static std::array<uint32_t, vu::kNumPciIrqs> IrqLayout();
  void RaiseIrq(uint32_t vector);
  void Deliver(uint32_t vector);
  bool MessagesAllowed() const;
  void DeliverUnmaskedPending();
  void OnMsixTriggerAssigned(uint32_t first, uint32_t count);
  // DMA (ring fetch, tail shadow) needs Bus Master Enable and D0: kDmaDisabled otherwise.
  Result<> CheckDmaAllowed() const;
  Result<> WriteIrqStatus(uint32_t v);
  Result<> WriteIrqMask(uint32_t v);
  Result<> WriteIrqTest(uint32_t v);
  Result<> MsixTableRead(uint32_t off, std::span<std::byte> out);
  Result<> MsixTableWrite(uint32_t off, std::span<const std::byte> data);
  Result<> MsixPbaRead(uint32_t off, std::span<std::byte> out);
  Result<> MsixPbaWrite(uint32_t off, std::span<const std::byte> data);
  void ResetMsixTable();

  // --- bar0_table.cc: identity and control registers, the BAR0 router, the GTT window ---
  uint32_t ReadId() const { return abi::kIdMagic; }
  uint32_t ReadVersion() const { return abi::kAbiVersion; }
  uint32_t ReadCaps() const {
    return abi::kCapStatusPage | abi::kCapDoorbellIoFd | abi::kCapMsix | abi::kCapMsi | abi::kCapRing |
           abi::kCapGttBatch | abi::kCapIdleNotify | abi::kCapDisplay | abi::kCapGttRing;
  }
  uint32_t ReadApertureLo() const { return static_cast<uint32_t>(cfg_.aperture_size); }
  uint32_t ReadApertureHi() const { return static_cast<uint32_t>(cfg_.aperture_size >> 32); }
  uint32_t ReadGttEntries() const { return cfg_.gtt_entries; }
  uint32_t ReadKernelCount() const { return kernel_count_; }
  uint32_t ReadStatus() const;
  Result<> WriteCtrl(uint32_t v);
  Result<> WriteReset(uint32_t v);
  Result<> WritePowerState(uint32_t v);
  Result<> WriteScratch(uint32_t v);
  const RegDesc* FindReg(uint32_t off) const;
  Result<uint32_t> RegRead32(uint32_t off);
  Result<> RegWrite32(uint32_t off, uint32_t v);
  Result<> CheckGuestPage(Gpa page, bool writable) const;
  Result<> GttWrite(uint32_t off, std::span<const std::byte> data);
  Result<> WriteGttBatchAddrLo(uint32_t v);
  Result<> WriteGttBatchGo(uint32_t count);
  // A write handler whose refusal is not about the MMIO write itself (GTT_BATCH_GO: a record
  // of the batch) sets this; RegWrite32 then reports it instead of source MMIO.
  struct WriteFault {
    uint32_t source;
    uint64_t addr;
    uint32_t info;
  };
  std::optional<WriteFault> write_fault_;
  // One row of the BAR0 page table: [begin, end) and the handlers that own it. Handlers get
  // the BAR0 offset of an access that lies wholly inside their row.
  struct Bar0Row {
    uint64_t begin, end;
    const char* name;
    Result<> (Impl::*read)(uint32_t off, std::span<std::byte> out);
    Result<> (Impl::*write)(uint32_t off, std::span<const std::byte> data);
  };
  static constexpr size_t kBar0Rows = 6;
  static std::array<Bar0Row, kBar0Rows> BuildBar0Table(uint32_t gtt_entries);
  const Bar0Row* FindBar0Row(uint64_t off, size_t len) const;
  Result<> Bar0Read(uint64_t off, std::span<std::byte> out);
  Result<> Bar0Write(uint64_t off, std::span<const std::byte> data);
  Result<> RegsRead(uint32_t off, std::span<std::byte> out);
  Result<> RegsWrite(uint32_t off, std::span<const std::byte> data);
  Result<> StatusPageRead(uint32_t off, std::span<std::byte> out);
  Result<> StatusPageWrite(uint32_t off, std::span<const std::byte> data);
  Result<> GttRead(uint32_t off, std::span<std::byte> out);
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

  // --- ring.cc: ring registers, doorbell, copy-audit-queue, executor hooks ---
  Result<> RingConfigWritable() const;
  Result<> WriteRingBaseLo(uint32_t v);
  Result<> WriteRingBaseHi(uint32_t v);
  Result<> WriteRingSize(uint32_t v);
  Result<> WriteRingTail(uint32_t v);
  Result<> WriteKick(uint32_t);
  Result<> WriteTailShadowLo(uint32_t v);
  Result<> WriteTailShadowHi(uint32_t v);
  void Doorbell();
  // F7: a quarantined vGPU's doorbell is refused before guest memory is read; a throttled
  // one's pass waits for its turn (the pass is remembered, the throttle timer armed). False:
  // the pass is not to run now (`refusal` set when it is refused).
  bool AdmitPass(bool shadow, std::optional<Error>& refusal);
  uint64_t RingBase() const { return uint64_t{regs_.ring_base_hi} << 32 | regs_.ring_base_lo; }
  Result<> RingPass(bool shadow);
  void ReplayRing();
  // The pass stopped to fetch fd-less memory off the loop: no effect yet; replayed later.
  static bool Fetching(const Error& e) { return e.code == Errc::kWouldBlock; }
  Result<> ReadTailShadowAndProcess();
  void ProcessRing();
  Result<> CopyRing(uint32_t offset, uint32_t len, std::byte* out);
  void OnFence(uint64_t value, bool irq);
  void OnLoadReg(uint32_t reg, uint32_t value);
  void OnExecFailure(const Error& e);

  // --- ring.cc: idle notify (docs/device-spec.md, "Idle notify"), all under mu_ ---
  // The status page's DEVICE_IDLE word. 0 is a promise: the device will re-read the tail
  // shadow once nothing is queued or running (SettleIdle). So it is 0 only while the
  // guest's doorbell is the shadow and a plan is outstanding, or a pass that found a new
  // tail is under way (it settles after); every path that ends the promise publishes 1.
  void SetIdle(bool idle);
  // The guest rang through the shadow (a kick) and the device may read it now (ring enabled,
  // DMA allowed): the re-read reads what the guest publishes, and nothing else.
  bool ShadowReadable() const;
  // The doorbell is no longer the shadow (RING_TAIL written, shadow moved, ring enabled or
  // disabled, reset, disconnect): stop re-reading it and say so (idle = 1).
  void StopShadowRereads();
  // Executor hook: one plan finished. When it was the last one, SettleIdle.
  void OnPlanDone();
  // After a pass that read the shadow (kick, replay): a pass that said busy but queued
  // nothing settles, so the 0 it published is followed by a re-read.
  void AfterShadowPass();
  // No plan outstanding: publish idle = 1, fence, re-read the tail shadow and process a new
  // tail as a kick would (the race-free order; the guest stores, fences, then reads). At
  // most kSettleRounds rounds, the last one quiet (see ring.cc).
  void SettleIdle();
  void SettleGuarded();  // SettleIdle, with an allocation failure reported, not thrown
  // The tail shadow's value when it can be read at once (fd-backed memory or the aperture),
  // without side effects; nullopt otherwise. Only decides whether to look before storing 1:
  // what is processed is read again by the pass (copy, then check).
  std::optional<uint32_t> PeekTailShadow() const;
  static constexpr int kSettleRounds = 2;
  // A cancel dropped queued plans (they never report plan_done): forget them, publish idle.
  void ForgetOutstanding();

  // --- display.cc: the scan-out plane and its frame clock (docs/device-spec.md §Scan-out) ---
  uint32_t ReadDisplayStatus() const;
  uint32_t ReadDisplayLiveBase() const { return regs_.display_live.base; }
  Result<> WriteDisplayFormat(uint32_t v);
  Result<> WriteDisplayEnable(uint32_t v);
  Result<> WriteDisplayFlip(uint32_t v);
  // Checks the staged plane as a whole; a refusal names the register at fault (write_fault_).
  Result<DisplayPlane> CheckStagedPlane();
  Result<> CommitStagedPlane();
  void FrameTick();
  // The frame clock runs while a plane is scanned out or a commit waits; it is only armed
  // here (VgpuConfig::frame_clock), never waited for.
  void RunFrameClock(bool run);
  bool frame_clock_running_ = false;
  // Frame pacing (host state, not the guest's: kept across a device reset, never in a
  // snapshot). Credit in 1/kFrameHz of a presentation: each frame boundary adds the limit,
  // a presentation costs kFrameHz, and between boundaries it never holds more than one
  // presentation (no banked burst). Boundaries missed while the clock was stopped are added when it starts again, so
  // a plane turned off and on is paced as if the clock had run.
  uint32_t frame_limit_ = 0;
  uint32_t frame_credit_ = abi::display::kFrameHz;
  bool pending_held_ = false;  // the pending commit was held by the limit at a boundary
  std::chrono::steady_clock::time_point clock_stopped_at_{};
  std::chrono::steady_clock::time_point fps_window_start_{};
  uint64_t fps_window_presented_ = 0;
  void AddFrameCredit(uint64_t frames);

  // --- vgpu.cc: reset ---
  // Reset without waiting for the engine (called without mu_): the executor is cancelled
  // (queued plans dropped, the running one stopped at its next submission boundary, none
  // of its hooks run), the registers reset at once, and the aperture scrub runs once the
  // submission in flight has ended: at once when there is none, else on the executor
  // thread with STATUS.RESETTING set until it has (docs/device-spec.md, reset).
  // `function_level`: DEVICE_RESET (config space and the MSI-X table too).
  Result<> CancelAndReset(bool function_level);
  Result<> DoReset(bool scrub = true);
  Result<> ScrubAperture();

  VgpuConfig cfg_;
  mutable std::mutex mu_;
  RegState regs_;
  ConfigSpace config_space_;
  Gtt gtt_;
  std::array<Bar0Row, kBar0Rows> bar0_rows_;
  std::array<uint32_t, kMsixTableDwords> msix_table_{};
  uint64_t completed_fence_ = 0;
  uint64_t submissions_ = 0;
  uint32_t kernel_count_ = 0;
  VgpuCounters counters_;
  bool reset_pending_ = false;
  bool flr_pending_ = false;  // AF_CTRL Initiate FLR written (F8): RegionWrite resets unlocked
  int32_t scrubs_pending_ = 0;  // deferred aperture scrubs (CancelAndReset), under mu_

  UniqueFd bar0_fd_;  // backs the status page (sparse mmap)
  Mapping bar0_map_;
  UniqueFd aperture_fd_;
  Mapping aperture_;
  EventFd doorbell_;
  vu::DmaSpace dma_;
  vu::IrqSet irqs_;
  // The loop's view of guest memory: never waits on the client (GuestFetch).
  GuestView view_{dma_, aperture_.bytes(), [this](Gpa gpa, std::span<std::byte> out) { return fetch_.Read(gpa, out); }};
  bool in_replay_ = false;      // the fetch thread is running a pass (mu_ held)
  bool replay_shadow_ = false;  // what the pass being fetched for reads its tail from
  bool kick_pending_ = false;   // a kick came while a fetch was under way
  bool kick_shadow_ = false;
  // Idle notify (mu_). Outstanding plans are counted here, not asked of the executor: the
  // count may only under-state them (a cancel zeroes it, whether or not the plan that was
  // running still reports plan_done), which errs toward publishing idle = 1 and an extra
  // kick, never a lost one.
  uint32_t plans_outstanding_ = 0;
  bool shadow_doorbell_ = false;  // the last doorbell was a kick: the shadow holds the tail
  bool device_idle_ = true;       // what DEVICE_IDLE says
  bool announce_busy_ = true;     // a shadow pass that finds a new tail says 0 before its audit
  bool dying_ = false;
  // kYes (mu_) while a pass runs for an entry point on the loop that calls Executor::RunHeld
  // once it has let go of mu_ (InlineSite): a plan queued then may complete on the loop
  // (ExecOptions::inline_complete). kSubmitOnly in a plan_done on the retire thread, which
  // submits such a plan after the hook. Never on the fetch thread, which does not.
  InlineOk inline_site_ = InlineOk::kNo;
  // RunHeld on the loop, with the interrupts it raises written there too (IrqSet::TriggerNow,
  // bounded to EventFd::kGuardMs) rather than by the signaller thread: a fence-only
  // submission then wakes no thread of the daemon at all. mu_ not held.
  void RunHeldOnLoop();
  static constexpr int kMaxInlineChain = 8;
  // Inside RunHeldOnLoop, before its last round: a pass now may hold a plan for it.
  static bool MayChainInline();
  struct InlineSite {
    explicit InlineSite(Impl& i) : impl(i) { impl.inline_site_ = InlineOk::kYes; }
    ~InlineSite() { impl.inline_site_ = InlineOk::kNo; }
    InlineSite(const InlineSite&) = delete;
    InlineSite& operator=(const InlineSite&) = delete;
    Impl& impl;
  };
  // F7 (mu_): a doorbell the throttle deferred, what its pass reads the tail from, and
  // whether the throttle timer is armed.
  bool throttle_pending_ = false;
  bool throttle_shadow_ = false;
  bool throttle_armed_ = false;
  FaultMonitor faults_{cfg_.faults};
  // Last: destroyed first, while everything they use is still alive (the fetch thread
  // replays into the executor, so it goes first).
  std::unique_ptr<Executor> exec_;
  GuestFetch fetch_{dma_, [this] { ReplayRing(); }};
};

}  // namespace vg::mediator
