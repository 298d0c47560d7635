// The command ring: ring registers, the doorbell (trapped and ioeventfd), and the path
// copy -> audit -> queue that every guest submission takes. Kept apart because this is
// where guest memory is read, and the rule "copy once, check the copy, use only the copy"
// must be visible in one short file.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <optional>

#include <new>

#include "mediator/vgpu_impl.h"

namespace vg::mediator {

// F11 finding 16: fetching the ring and the tail shadow is DMA, and a function without Bus
// Master Enable, or in D3hot, does none. The doorbell is refused by name and the ring stays
// where it was: the span is fetched at the first doorbell once DMA is allowed again.
Result<> Vgpu::Impl::CheckDmaAllowed() const {
  VG_ERROR_IF(!config_space_.BusMasterEnabled(), Errc::kDmaDisabled, "bus mastering is off (PCI command bit 2)");
  VG_ERROR_IF(config_space_.PowerState() == 3 || regs_.power_state == 3, Errc::kDmaDisabled, "the vGPU is in D3hot");
  return Ok();
}

Result<> Vgpu::Impl::RingConfigWritable() const {
  VG_ERROR_IF(regs_.ctrl & abi::kCtrlRingEnable, Errc::kBusy, "ring registers are locked while the ring runs");
  return Ok();
}
Result<> Vgpu::Impl::WriteRingBaseLo(uint32_t v) {
  VG_TRY(RingConfigWritable());
  VG_ERROR_IF(!IsAligned(v, kPageSize), Errc::kMisaligned, "RING_BASE {:#x} not page aligned", v);
  regs_.ring_base_lo = v;
  return Ok();
}
Result<> Vgpu::Impl::WriteRingBaseHi(uint32_t v) {
  VG_TRY(RingConfigWritable());
  regs_.ring_base_hi = v;
  return Ok();
}
Result<> Vgpu::Impl::WriteRingSize(uint32_t v) {
  VG_TRY(RingConfigWritable());
  VG_INVALID_IF(!IsPowerOfTwo(v) || v < kPageSize || v > (1u << 20),
                "RING_SIZE {:#x} is not a power of two in [4 KiB, 1 MiB]", v);
  regs_.ring_size = v;
  return Ok();
}
Result<> Vgpu::Impl::WriteRingTail(uint32_t v) {
  VG_ERROR_IF(!(regs_.ctrl & abi::kCtrlRingEnable), Errc::kBadState, "doorbell rung with the ring disabled");
  VG_ERROR_IF(v >= regs_.ring_size, Errc::kOutOfBounds, "tail {:#x} past ring size {:#x}", v, regs_.ring_size);
  VG_ERROR_IF(!IsAligned(v, 4), Errc::kMisaligned, "tail {:#x} not dword aligned", v);
  VG_TRY(CheckDmaAllowed());
  regs_.ring_tail = v;
  // The tail came with the write, not through the shadow: whatever the shadow holds is not
  // this guest's tail, so the device must not re-read it (idle notify).
  StopShadowRereads();
  Doorbell();
  return RingPass(false);
}
Result<> Vgpu::Impl::WriteKick(uint32_t) {
  shadow_doorbell_ = true;
  Doorbell();
  Result<> r = RingPass(true);
  AfterShadowPass();
  return r;
}
Result<> Vgpu::Impl::WriteTailShadowLo(uint32_t v) {
  VG_ERROR_IF(!IsAligned(v, 4), Errc::kMisaligned, "TAIL_SHADOW {:#x} not dword aligned", v);
  regs_.tail_shadow_lo = v;
  StopShadowRereads();  // a moved shadow holds no tail until the guest publishes and kicks
  return Ok();
}
Result<> Vgpu::Impl::WriteTailShadowHi(uint32_t v) {
  regs_.tail_shadow_hi = v;
  StopShadowRereads();
  return Ok();
}

void Vgpu::Impl::Doorbell() {
  ++counters_.doorbells;
  Store64(abi::status::kDoorbells, counters_.doorbells);
  // The count is visible before the pass reads the shadow: a guest that still reads the
  // count it saw before its kick knows that kick's pass has yet to read the shadow, so a
  // tail it publishes meanwhile needs no kick of its own (idle notify). Store, full fence,
  // load, as for DEVICE_IDLE.
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

// One pass over the ring: on the loop for a kick (shadow: the tail comes from the tail
// shadow; else from RING_TAIL), on the fetch thread for its replay. While a fetch of
// fd-less guest memory is under way the kick waits for it and runs after it.
Result<> Vgpu::Impl::RingPass(bool shadow) {
  if (!in_replay_ && fetch_.Busy()) {
    kick_pending_ = true;
    kick_shadow_ = shadow;
    return Ok();
  }
  // A replay finishes a pass that was admitted already.
  if (!in_replay_) {
    std::optional<Error> refusal;
    if (!AdmitPass(shadow, refusal)) return refusal ? Result<>(std::move(*refusal)) : Ok();
  }
  replay_shadow_ = shadow;
  if (shadow) return ReadTailShadowAndProcess();
  ProcessRing();
  return Ok();
}

// F7. Each pass is one submission to the fault monitor. Throttled, a pass that comes before
// its turn is remembered (one pending pass covers every doorbell until it runs: it takes
// [head, tail) as it finds it) and the throttle timer brings it back on the loop
// (Vgpu::OnThrottleTimer). RING_TAIL's write is answered at once then; the guest learns
// when its span was taken from RING_HEAD (docs/device-spec.md, "Fault health").
bool Vgpu::Impl::AdmitPass(bool shadow, std::optional<Error>& refusal) {
  const Admission a = faults_.Admit();
  if (a.code != Errc::kOk) {
    throttle_pending_ = false;
    refusal = Error{a.code, "the vGPU is quarantined for its fault rate; a reset lifts it"};
    return false;
  }
  if (a.go() || !cfg_.throttle_timer) {
    throttle_pending_ = false;  // this pass takes whatever the deferred one would have
    return true;
  }
  throttle_pending_ = true;
  throttle_shadow_ = shadow;
  if (!throttle_armed_) {
    throttle_armed_ = true;
    cfg_.throttle_timer(a.wait);
  }
  return false;
}

// The fetch thread has what the last pass wanted: run it again, then any kick that came
// meanwhile.
void Vgpu::Impl::ReplayRing() {
  std::lock_guard lk(mu_);
  in_replay_ = true;
  Result<> r = [&]() -> Result<> {
    try {
      return RingPass(replay_shadow_);
    } catch (const std::bad_alloc&) {  // on the fetch thread: nothing above would catch it
      fetch_.Finish();
      return MakeError(Errc::kOutOfMemory, "ring pass: allocation failed");
    }
  }();
  if (!r.ok()) Refuse(abi::kErrSourceRing, abi::reg::kDoorbellKick, 0, std::move(r).error());
  in_replay_ = false;
  if (kick_pending_ && !fetch_.Busy()) {
    kick_pending_ = false;
    Result<> k = RingPass(kick_shadow_);
    if (!k.ok()) Refuse(abi::kErrSourceRing, abi::reg::kDoorbellKick, 0, std::move(k).error());
  }
  AfterShadowPass();
}

// A kick carries no value: the tail is read, once, from the guest's tail shadow.
Result<> Vgpu::Impl::ReadTailShadowAndProcess() {
  if (!(regs_.ctrl & abi::kCtrlRingEnable)) {
    fetch_.Finish();
    return MakeError(Errc::kBadState, "doorbell kicked with the ring disabled");
  }
  if (Result<> allowed = CheckDmaAllowed(); !allowed.ok()) {
    fetch_.Finish();
    return allowed;
  }
  uint64_t va = uint64_t{regs_.tail_shadow_hi} << 32 | regs_.tail_shadow_lo;
  uint32_t tail = 0;
  auto range = gtt_.Translate(GpuVa{va}, ByteSize{4}, GttAccess::kRead);
  Result<> read = range.ok() ? view_.Read(ResolvedRange{GpuVa{va}, ByteSize{4}, false, *range},
                                          std::as_writable_bytes(std::span(&tail, 1)))
                             : Result<>(range.error());
  if (!read.ok() && Fetching(read.error())) {
    fetch_.Start();
    return Ok();
  }
  if (!read.ok()) {
    fetch_.Finish();
    Refuse(abi::kErrSourceRing, va, 0, std::move(read).error());
    return Ok();  // the kick itself was fine; the report names the bad shadow
  }
  if (tail >= regs_.ring_size || !IsAligned(tail, 4)) {
    fetch_.Finish();
    Refuse(abi::kErrSourceRing, tail, 0,
           Error{Errc::kOutOfBounds, fmt::format("tail shadow {:#x} outside a ring of {:#x}", tail, regs_.ring_size)});
    return Ok();
  }
  regs_.ring_tail = tail;
  // A new tail: say busy now, before the copy and the audit, so that the guest's submissions
  // meanwhile need no kick. The pass is followed by a settle (AfterShadowPass) unless it
  // queues a plan, whose plan_done settles.
  if (tail != regs_.ring_head && announce_busy_ && ShadowReadable()) SetIdle(false);
  ProcessRing();
  return Ok();
}

// Copy, then check, then use: the span [head, tail) is copied out of guest memory once,
// the copy is audited, and only the resulting Plan is executed. The ring moves on to the
// tail whatever the audit says, so a refused submission never wedges the vGPU.
void Vgpu::Impl::ProcessRing() {
  uint32_t head = regs_.ring_head, tail = regs_.ring_tail, size = regs_.ring_size;
  if (head == tail) {
    fetch_.Finish();
    return;
  }
  uint32_t bytes = (tail - head) & (size - 1);
  std::vector<uint32_t> shadow(bytes / 4);
  auto* out = reinterpret_cast<std::byte*>(shadow.data());
  uint32_t first = std::min(bytes, size - head);
  Result<> copied = CopyRing(head, first, out);
  if (copied.ok() && first < bytes) copied = CopyRing(0, bytes - first, out + first);
  if (!copied.ok() && Fetching(copied.error())) {
    fetch_.Start();  // nothing moved: the replay copies again
    return;
  }
  Result<Plan> plan = MakeError(Errc::kInternal, "not audited");
  AuditFault fault;
  // A full executor queue refuses before the audit: no span building for work that could
  // not be queued anyway.
  Result<> room = copied.ok() ? exec_->Admit() : Ok();
  bool flow_control = false;  // a full queue: not the guest's fault (F7)
  if (!room.ok()) {
    plan = Unexpected{std::move(room).error()};
    fault = AuditFault{abi::kErrSourceRing, head, 0};
    flow_control = true;
  } else if (copied.ok()) {
    Auditor auditor(
        gtt_,
        [this](const ResolvedRange& r) -> Result<std::vector<uint32_t>> {
          std::vector<uint32_t> batch(r.size.v / 4);
          VG_TRY(view_.Read(r, std::as_writable_bytes(std::span(batch))));
          return batch;
        },
        [this](Gpa p, bool w) { return CheckGuestPage(p, w); });
    plan = auditor.Audit(shadow, head, size, &fault);
    if (!plan.ok() && Fetching(plan.error())) {
      fetch_.Start();  // a batch in fd-less memory: the replay audits again
      return;
    }
  }
  fetch_.Finish();
  regs_.ring_head = tail;
  Store32(abi::status::kRingHead, tail);
  if (!copied.ok()) {
    Refuse(abi::kErrSourceRing, RingBase() + head, 0, std::move(copied).error());
    return;
  }
  if (!plan.ok()) {
    Refuse(fault.source, fault.addr, fault.opcode, std::move(plan).error(),
           flow_control ? FaultClass::kFlowControl : FaultClass::kBySource);
    return;
  }
  uint32_t commands = plan->commands;
  std::vector<abi::GttBatchRecord> gtt_updates = std::move(plan->gtt_updates);
  // Bounded per vGPU (count and bytes): past it the submission is refused by name. On the
  // loop, a host-op-only plan queued while the executor is idle is held and completed there
  // by the entry point once it has let go of mu_ (Executor::RunHeld).
  if (Result<bool> queued = exec_->Enqueue(std::move(plan).value(), inline_site_);
      !queued.ok()) {
    Refuse(abi::kErrSourceRing, head, 0, std::move(queued).error(), FaultClass::kFlowControl);
    return;
  }
  // The submission is in: its GTT_UPDATEs take effect now, in ring order, before the next
  // pass audits anything (the plan holds its own translations already). Checked at audit
  // under this same hold of mu_, so nothing can have changed what they were checked against.
  if (!gtt_updates.empty()) {
    uint32_t bad = 0;
    auto check = [this](Gpa p, bool w) { return CheckGuestPage(p, w); };
    if (Result<> stored = gtt_.WriteBatch(gtt_updates, check, &bad); !stored.ok())
      Refuse(abi::kErrSourceCommand, head, abi::cmd::kGttUpdate,
             Error{Errc::kInternal, fmt::format("GTT_UPDATE checked at audit, refused at store: {}", stored.error().what)});
  }
  // Busy from here: this plan's plan_done needs mu_, which this pass holds, so the word
  // reads 0 before the plan can finish, and the re-read that 0 promises follows it.
  ++plans_outstanding_;
  if (ShadowReadable()) SetIdle(false);
  counters_.commands_audited += commands;
  ++submissions_;
  Store64(abi::status::kSubmissions, submissions_);
}

Result<> Vgpu::Impl::CopyRing(uint32_t offset, uint32_t len, std::byte* out) {
  VG_TRY_ASSIGN(uint64_t va, CheckedAdd(RingBase(), offset));
  VG_TRY_ASSIGN(auto spans, gtt_.Translate(GpuVa{va}, ByteSize{len}, GttAccess::kRead));
  return view_.Read(ResolvedRange{GpuVa{va}, ByteSize{len}, false, std::move(spans)}, std::span(out, len));
}

// --- idle notify (docs/device-spec.md, "Idle notify") ---
// The guest stores its tail in the shadow, fences, then reads DEVICE_IDLE and kicks only if
// it reads 1. The device publishes 0 (while the doorbell is the shadow) when a pass finds a
// new tail or queues a plan, and every 0 is followed by a settle: once nothing is queued or
// running, it stores 1, fences, then re-reads the shadow. Either the guest's read sees that 1
// (and it kicks), or the device's re-read sees the tail.
void Vgpu::Impl::SetIdle(bool idle) {
  device_idle_ = idle;
  Store32(abi::status::kDeviceIdle, idle ? 1 : 0);
}

bool Vgpu::Impl::ShadowReadable() const {
  return shadow_doorbell_ && (regs_.ctrl & abi::kCtrlRingEnable) && CheckDmaAllowed().ok();
}

void Vgpu::Impl::StopShadowRereads() {
  shadow_doorbell_ = false;
  SetIdle(true);
}

void Vgpu::Impl::ForgetOutstanding() {
  plans_outstanding_ = 0;
  SetIdle(true);
}

// On the executor's retire thread, under its hook lock (hook_mu_ before mu_, as for the
// other hooks). Ring passes are serialized by mu_, not by thread (the fetch thread's replay
// runs them too), and a pass never waits on the guest (GuestFetch), so the re-read runs here
// rather than waking the loop; Enqueue takes only the executor's leaf mutex.
void Vgpu::Impl::OnPlanDone() {
  std::lock_guard lk(mu_);
  if (dying_) return;  // fetch_ is gone or going
  if (plans_outstanding_ > 0) --plans_outstanding_;
  // Completing inline on the loop (RunHeldOnLoop): a tail the settle finds may be held for
  // its next round, as a kick's would.
  const InlineOk site = inline_site_;
  inline_site_ = MayChainInline()              ? InlineOk::kYes
                 : Executor::OnRetireThread() ? InlineOk::kSubmitOnly
                                              : InlineOk::kNo;
  SettleGuarded();
  inline_site_ = site;
}

void Vgpu::Impl::AfterShadowPass() {
  // Said busy (a new tail was announced) but queued nothing: the promise is kept by a settle.
  // Said idle: nothing was promised; a guest that publishes now reads 1 and kicks.
  if (!device_idle_) SettleGuarded();
}

void Vgpu::Impl::SettleGuarded() {
  try {
    SettleIdle();
  } catch (const std::bad_alloc&) {  // off the dispatch boundary: nothing above would catch it
    fetch_.Finish();
    SetIdle(true);  // no re-read possible now: the guest's next submission kicks
    Refuse(abi::kErrSourceRing, abi::reg::kDoorbellKick, 0,
           Error{Errc::kOutOfMemory, "tail shadow re-read: allocation failed"});
  }
}

std::optional<uint32_t> Vgpu::Impl::PeekTailShadow() const {
  uint64_t va = uint64_t{regs_.tail_shadow_hi} << 32 | regs_.tail_shadow_lo;
  auto spans = gtt_.Translate(GpuVa{va}, ByteSize{4}, GttAccess::kRead);
  if (!spans.ok() || spans->size() != 1) return std::nullopt;
  const GttTarget& t = (*spans)[0].target;
  uint32_t tail = 0;
  auto out = std::as_writable_bytes(std::span(&tail, 1));
  if (t.aperture) {
    if (!RangeWithin(t.page_addr, 4, aperture_.size().v)) return std::nullopt;
    std::memcpy(out.data(), aperture_.data() + t.page_addr, 4);
    return tail;
  }
  // kNever: memory shared without an fd is not peeked at (no fetch, no wait).
  if (!dma_.Read(Gpa{t.page_addr}, out, vu::DmaWait::kNever).ok()) return std::nullopt;
  return tail;
}

void Vgpu::Impl::SettleIdle() {
  // Each round: peek while still 0 and take a new tail; else store 1, fence, re-read. A
  // round that finds a new tail says busy again before processing it
  // (ReadTailShadowAndProcess), so a 0 is always followed by another round: the next one
  // here, or the one the queued plan's plan_done runs.
  for (int round = 0; round < kSettleRounds; ++round) {
    // A plan outstanding settles at its plan_done; a fetch under way at its replay.
    if (plans_outstanding_ > 0 || fetch_.Busy()) return;
    const bool last = round + 1 == kSettleRounds;
    // Still saying 0: look first. A new tail is taken without a 1 in between, which a
    // guest submitting at that moment would read as "kick" (a kick for nothing). Only when
    // the shadow holds no new tail is 1 stored and the shadow read again (the race-free
    // order). Not in the last round (it must leave 1 standing), and not for memory shared
    // without an fd (a peek there would be a fetch, and a fetch a round of its own).
    if (!device_idle_ && !last && ShadowReadable()) {
      if (std::optional<uint32_t> t = PeekTailShadow(); t && *t != regs_.ring_head) {
        ++counters_.tail_rereads;
        const uint32_t head = regs_.ring_head;
        Result<> r = RingPass(true);
        if (!r.ok()) Refuse(abi::kErrSourceRing, abi::reg::kDoorbellKick, 0, std::move(r).error());
        if (regs_.ring_head != head) ++counters_.tail_rereads_found;
        continue;  // queued: the next round returns; refused: store 1 and look again
      }
    }
    SetIdle(true);
    // Store idle, then load the tail (Dekker with the guest's store tail, then load idle):
    // without the full fence the load could pass the store and both sides miss each other.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    // Not the guest's doorbell, or no DMA now: nothing to read; idle = 1 tells it to kick.
    if (!ShadowReadable()) return;
    ++counters_.tail_rereads;
    const uint32_t head = regs_.ring_head;
    // The same pass a kick runs (copy, audit, queue; a fetch off the loop for fd-less memory),
    // except that it is not a doorbell and is not counted as one. The last round does not
    // say busy first: it leaves 1 standing unless it queues a plan, so a guest that keeps
    // publishing spans the audit refuses cannot hold this thread and mu_ round after round.
    announce_busy_ = !last;
    Result<> r = RingPass(true);
    announce_busy_ = true;
    if (!r.ok()) Refuse(abi::kErrSourceRing, abi::reg::kDoorbellKick, 0, std::move(r).error());
    if (regs_.ring_head != head) ++counters_.tail_rereads_found;
    if (device_idle_) return;  // 1 stands, and the shadow was read after it was stored
  }
}

// --- executor hooks: called from the executor thread ---
void Vgpu::Impl::OnFence(uint64_t value, bool irq) {
  std::lock_guard lk(mu_);
  completed_fence_ = value;
  Store64(abi::status::kCompletedFence, value);
  if (irq) RaiseIrq(abi::kVectorFence);
}
void Vgpu::Impl::OnLoadReg(uint32_t reg, uint32_t value) {
  std::lock_guard lk(mu_);
  (void)RegWrite32(reg, value);  // whitelisted by the auditor; a refusal reports itself
}
void Vgpu::Impl::OnExecFailure(const Error& e) {
  std::lock_guard lk(mu_);
  Refuse(abi::kErrSourceCommand, 0, 0, e, FaultClass::kExecution);
}

}  // namespace vg::mediator
