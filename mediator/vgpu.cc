// One vGPU as a vfio-user DeviceBackend: creation, the backend entry points, reset and
// snapshot. The guest-facing surfaces live beside it (see vgpu_impl.h for the map); this
// file only takes the lock and routes.
#include <fcntl.h>
#include <linux/falloc.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <new>

#include "mediator/vgpu_impl.h"
#include "shaders/catalogue.h"

namespace vg::mediator {

Vgpu::Impl::Impl(const VgpuConfig& cfg, UniqueFd status_fd, Mapping status, UniqueFd aperture_fd, Mapping aperture,
                 EventFd doorbell)
    : cfg_(cfg),
      config_space_(cfg.aperture_size),
      gtt_(cfg.gtt_entries, cfg.aperture_size),
      bar0_rows_(BuildBar0Table(cfg.gtt_entries)),
      bar0_fd_(std::move(status_fd)),
      bar0_map_(std::move(status)),
      aperture_fd_(std::move(aperture_fd)),
      aperture_(std::move(aperture)),
      doorbell_(std::move(doorbell)),
      irqs_(IrqLayout()) {
  PublishStatus();
}

Vgpu::Impl::~Impl() {
  std::lock_guard lk(mu_);
  dying_ = true;
}

Result<> Vgpu::Impl::CancelAndReset(bool function_level) {
  {
    // Before the cancel: the running plan's plan_done must not re-read the shadow of a ring
    // that is being reset (and queue work from before the reset after it).
    std::lock_guard lk(mu_);
    StopShadowRereads();
  }
  bool deferred = exec_->Cancel([this] {
    std::lock_guard lk(mu_);
    (void)ScrubAperture();
    --scrubs_pending_;
    PublishStatus();
  });
  std::lock_guard lk(mu_);
  if (deferred) ++scrubs_pending_;
  if (function_level) {
    config_space_.Reset();
    ResetMsixTable();
  }
  VG_TRY(DoReset(!deferred));
  if (function_level) regs_.msix_pending = 0;
  return Ok();
}

Result<> Vgpu::Impl::DoReset(bool scrub) {
  // Per-vGPU reset: registers, GTT and aperture back to creation state. IRQ wiring and
  // DMA mappings belong to the connection, not to the device, and stay.
  // The MSI-X table and PBA are PCI function state: only a function-level reset
  // (DEVICE_RESET, Vgpu::Reset) returns them to power-on, as config space.
  uint32_t resets = regs_.resets + 1;
  uint32_t msix_pending = regs_.msix_pending;
  regs_ = RegState{};
  regs_.resets = resets;
  regs_.msix_pending = msix_pending;
  gtt_.Clear();
  completed_fence_ = 0;
  submissions_ = 0;
  ++counters_.resets;
  fetch_.Cancel();  // a ring pass waiting for guest memory belongs to the old ring
  kick_pending_ = false;
  // The executor was cancelled (or is empty): nothing will report plan_done for the plans it
  // dropped, and the ring is off. Idle, so a guest never waits for a device that won't look.
  plans_outstanding_ = 0;
  shadow_doorbell_ = false;
  device_idle_ = true;
  // F7: a reset is what lifts a quarantine (to probation); a doorbell the throttle deferred
  // belonged to the old ring.
  throttle_pending_ = false;
  faults_.OnReset();
  if (scrub) VG_TRY(ScrubAperture());
  PublishStatus();
  return Ok();
}

Result<> Vgpu::Impl::ScrubAperture() {
  // Punching the whole file drops every page: the guest's mapping and ours read zeros
  // afterwards, and nothing of the previous contents survives in host memory.
  if (::fallocate(aperture_fd_.Get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                  static_cast<off_t>(cfg_.aperture_size)) != 0) {
    std::memset(aperture_.data(), 0, aperture_.size().v);
  }
  return Ok();
}

// ---------------------------------------------------------------------------------------

Result<std::unique_ptr<Vgpu>> Vgpu::Create(const VgpuConfig& cfg) {
  VG_INVALID_IF(!IsPowerOfTwo(cfg.aperture_size) || cfg.aperture_size < kPageSize,
                "aperture size {:#x} must be a power of two >= 4 KiB", cfg.aperture_size);
  VG_INVALID_IF(cfg.gtt_entries == 0 || cfg.gtt_entries > abi::kGttMaxEntries, "GTT of {} entries not in [1, {}]",
                cfg.gtt_entries, abi::kGttMaxEntries);
  VG_INVALID_IF(cfg.time_granularity_ns > abi::cmd::kMaxTimeGranularityNs, "time granularity of {} ns over {} ns",
                cfg.time_granularity_ns, abi::cmd::kMaxTimeGranularityNs);
  VG_INVALID_IF(cfg.frame_limit > kMaxFrameLimit, "frame limit {} > {} (the frame clock)", cfg.frame_limit,
                kMaxFrameLimit);
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
  impl->dma_.SetLimits(cfg.dma_limits);
  {
    std::lock_guard lk(impl->mu_);
    impl->ResetMsixTable();
    impl->kernel_count_ = static_cast<uint32_t>(shaders::AllKernels().size());
    impl->frame_limit_ = cfg.frame_limit;
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
                [raw](const Error& e) { raw->OnExecFailure(e); },
                [raw]() -> Result<> {
                  std::lock_guard lk(raw->mu_);
                  return raw->CheckDmaAllowed();
                },
                [raw] { raw->OnPlanDone(); }},
      ExecOptions{cfg.executor_depth, cfg.executor_coalesce, cfg.time_granularity_ns, cfg.executor_inline});
  return std::unique_ptr<Vgpu>(new Vgpu(std::move(impl)));
}

Vgpu::Vgpu(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Vgpu::~Vgpu() = default;

const VgpuConfig& Vgpu::config() const { return impl_->cfg_; }
const EventFd& Vgpu::doorbell() const { return impl_->doorbell_; }

void Vgpu::OnDoorbellKick() {
  {
    std::lock_guard lk(impl_->mu_);
    Impl::InlineSite site(*impl_);
    OnDoorbellKickLocked();
  }
  impl_->RunHeldOnLoop();  // a plan held by the pass completes here, mu_ released (hooks take it)
}

void Vgpu::OnDoorbellKickLocked() {
  impl_->shadow_doorbell_ = true;
  impl_->Doorbell();
  // Called from the loop's doorbell event, outside the vfio-user dispatch boundary: an
  // allocation failure in the pass is this vGPU's kOutOfMemory, not the daemon's abort.
  Result<> r = [&]() -> Result<> {
    try {
      return impl_->RingPass(true);
    } catch (const std::bad_alloc&) {
      return MakeError(Errc::kOutOfMemory, "ring pass: allocation failed");
    }
  }();
  if (!r.ok()) impl_->Refuse(abi::kErrSourceRing, abi::reg::kDoorbellKick, 0, std::move(r).error());
  impl_->AfterShadowPass();
}

FaultMonitor& Vgpu::faults() { return impl_->faults_; }

void Vgpu::OnThrottleTimer() {
  {
    std::lock_guard lk(impl_->mu_);
    Impl::InlineSite site(*impl_);
    OnThrottleTimerLocked();
  }
  impl_->RunHeldOnLoop();
}

void Vgpu::OnThrottleTimerLocked() {
  impl_->throttle_armed_ = false;
  if (!impl_->throttle_pending_ || impl_->dying_) return;
  impl_->throttle_pending_ = false;
  const bool shadow = impl_->throttle_shadow_;
  // The ring was stopped, or DMA turned off, since that doorbell: as for a doorbell now, the
  // span waits for the first doorbell once both allow it again.
  if (!(impl_->regs_.ctrl & abi::kCtrlRingEnable) || !impl_->CheckDmaAllowed().ok()) return;
  // As OnDoorbellKick: on the loop, outside the vfio-user dispatch boundary. A pass that is
  // still early (another submission took the turn) is deferred again.
  Result<> r = [&]() -> Result<> {
    try {
      return impl_->RingPass(shadow);
    } catch (const std::bad_alloc&) {
      return MakeError(Errc::kOutOfMemory, "ring pass: allocation failed");
    }
  }();
  if (!r.ok())
    impl_->Refuse(abi::kErrSourceRing, shadow ? abi::reg::kDoorbellKick : abi::reg::kRingTail, 0,
                  std::move(r).error());
  if (shadow) impl_->AfterShadowPass();
}

void Vgpu::WaitIdle() { impl_->exec_->WaitIdle(); }
bool Vgpu::HasBacklog() const { return impl_->exec_->HasBacklog(); }

Result<> Vgpu::HostReset() { return impl_->CancelAndReset(false); }

bool Vgpu::RequestRelease() {
  // Not an MSI: VFIO signals REQ to the VMM itself, whatever the PCI state (a guest in
  // D3hot or with bus mastering off is still asked to let go). Queued for the signaller
  // thread; never a write on the caller's thread.
  return impl_->irqs_.Trigger(vu::kIrqReq, 0).value_or(false);
}

void Vgpu::OnConnect(vu::DmaMessenger* messenger) { impl_->dma_.SetMessenger(messenger); }

void Vgpu::OnDisconnect() {
  // The guest is gone: its queued work goes with it, and the running plan stops at its
  // next submission boundary (its pins keep guest memory mapped until then). No wait.
  {
    std::lock_guard lk(impl_->mu_);
    impl_->StopShadowRereads();  // the shadow is in memory that is going away
  }
  impl_->exec_->Cancel();
  impl_->dma_.Clear();  // out of translation before out of the import cache (as DmaUnmap)
  impl_->exec_->DropImports(Gpa{0}, ByteSize{~0ull});
  std::lock_guard lk(impl_->mu_);
  impl_->dma_.SetMessenger(nullptr);
  impl_->fetch_.Cancel();
  impl_->kick_pending_ = false;
  impl_->throttle_pending_ = false;
  impl_->ForgetOutstanding();
  impl_->irqs_.Clear();
  impl_->gtt_.DropLatch();  // a half-written entry belongs to the connection that wrote it
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
  // Every fd must be an eventfd (kNotEventFd): the only kind the daemon ever signals, and
  // then only from the IrqSet's signaller thread, never from the loop.
  VG_TRY(impl_->irqs_.Validate(args, fds, bools.size()));
  bool assigns = (args.flags & vu::kIrqSetDataEventfd) && args.index == vu::kIrqMsix;
  VG_TRY(impl_->irqs_.Apply(args, std::move(fds), bools));
  if (assigns) impl_->OnMsixTriggerAssigned(args.start, args.count);
  return Ok();
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
  // A plan a RING_TAIL or kick write held completes here, mu_ released (hooks take it).
  impl_->RunHeldOnLoop();
  if (impl_->flr_pending_) {
    // AF_CTRL Initiate FLR (F8): the function-level reset DEVICE_RESET is.
    impl_->flr_pending_ = false;
    impl_->reset_pending_ = false;
    VG_TRY(impl_->CancelAndReset(true));
  }
  if (impl_->reset_pending_) {
    impl_->reset_pending_ = false;
    VG_TRY(impl_->CancelAndReset(false));
  }
  return r;
}

Result<> Vgpu::RegionWriteLocked(uint32_t index, uint64_t offset, std::span<const std::byte> data) {
  std::lock_guard lk(impl_->mu_);
  switch (index) {
    case vu::kConfigRegion: {
      VG_TRY(impl_->config_space_.Write(static_cast<uint32_t>(offset), data));
      impl_->DeliverUnmaskedPending();  // the write may have unmasked, enabled BME or left D3hot
      impl_->PublishStatus();           // STATUS bit3 follows PMCSR too
      if (impl_->config_space_.TakeFlrRequest()) impl_->flr_pending_ = true;  // run by RegionWrite, unlocked
      return Ok();
    }
    case vu::kBar0Region: {
      VG_ERROR_IF(!RangeWithin(offset, data.size(), abi::kBar0Size), Errc::kOutOfBounds, "BAR0 write past end");
      Impl::InlineSite site(*impl_);  // RegionWrite calls RunHeld
      return impl_->Bar0Write(offset, data);
    }
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

Result<vu::DmaDrain> Vgpu::DmaUnmap(const vu::DmaUnmapArgs& args) {
  // QEMU's unmap-all names no range: everything goes.
  bool all = args.flags & vu::kDmaUnmapAll;
  Gpa from = all ? Gpa{0} : args.iova;
  ByteSize size = all ? ByteSize{~0ull} : args.size;
  // Out of translation first, then out of every cache of translations (the import cache):
  // in the other order an import made in between would outlive the mapping. Never waits:
  // the drain tells the protocol layer when work in flight has let go.
  VG_TRY_ASSIGN(vu::DmaDrain unmapped, impl_->dma_.Unmap(args));
  impl_->exec_->DropImports(from, size);
  // Work in flight still holds the memory: it is cancelled at its next engine submission
  // boundary (bounded, docs/device-spec.md "Bounds and blocking: the executor"), so the
  // reply, sent once the drain is idle, really means the device no longer touches it.
  // Queued work goes too and the error report names why.
  bool cancelled = false;
  if (!unmapped.Idle()) {
    impl_->exec_->Cancel();
    cancelled = true;
  }
  std::lock_guard lk(impl_->mu_);
  if (cancelled)
    impl_->Refuse(abi::kErrSourceCommand, from.v, 0,
                  Error{Errc::kBusy, "DMA_UNMAP of memory in use: the vGPU's work in flight was cancelled"},
                  FaultClass::kFlowControl);  // a VMM unmaps at its own reset too
  uint32_t dropped = impl_->gtt_.InvalidateGuestRange(from, size);
  if (dropped) VG_LOGI("vgpu {}: DMA_UNMAP {}+{:#x} invalidated {} GTT entries", impl_->cfg_.uuid, args.iova,
                       args.size.v, dropped);
  if (cancelled) {
    // The dropped plans never report plan_done. The guest may have published a tail while
    // it read idle = 0: settle now (idle = 1, re-read), audited against the GTT as it is
    // after this unmap, as a kick arriving now would be.
    impl_->plans_outstanding_ = 0;
    impl_->SettleGuarded();
  }
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
  // The ring registers may be another ring's now: the guest kicks before the device reads
  // its shadow again.
  impl_->shadow_doorbell_ = false;
  impl_->device_idle_ = true;
  // A restored plane (live or pending) is scanned out from the next frame on.
  if (impl_->regs_.display_live.valid || impl_->regs_.display_pending.valid) impl_->RunFrameClock(true);
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
  c.engine_submissions = ec.engine_submissions;
  c.plans_coalesced = ec.plans_coalesced;
  c.plans_inline = ec.plans_inline;
  c.plans_inline_submitted = ec.plans_inline_submitted;
  return c;
}

ErrorReport Vgpu::LastError() const {
  std::lock_guard lk(impl_->mu_);
  const RegState& r = impl_->regs_;
  return {r.err_code, r.err_source, uint64_t{r.err_addr_hi} << 32 | r.err_addr_lo, r.err_info, r.err_count};
}

}  // namespace vg::mediator
