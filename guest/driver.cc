#include "guest/driver.h"

#include "abi/commands.h"

#include <poll.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

namespace vg::guest {

// --- CommandBuilder ---

CommandBuilder& CommandBuilder::Nop(uint32_t dwords) {
  dw_.push_back(abi::cmd::Header(abi::cmd::kNop, dwords));
  for (uint32_t i = 1; i < dwords; ++i) dw_.push_back(0);
  return *this;
}
CommandBuilder& CommandBuilder::Fence(GpuVa target, uint64_t value, bool irq) {
  dw_.push_back(abi::cmd::Header(abi::cmd::kFence, abi::cmd::Dwords(abi::cmd::kFence), irq ? abi::cmd::kFenceFlagIrq : 0));
  U64(target.v);
  U64(value);
  return *this;
}
CommandBuilder& CommandBuilder::Copy(GpuVa src, GpuVa dst, uint64_t size) {
  dw_.push_back(abi::cmd::Header(abi::cmd::kCopy, abi::cmd::Dwords(abi::cmd::kCopy)));
  U64(src.v);
  U64(dst.v);
  U64(size);
  return *this;
}
CommandBuilder& CommandBuilder::Fill(GpuVa dst, uint64_t size, uint32_t value) {
  dw_.push_back(abi::cmd::Header(abi::cmd::kFill, abi::cmd::Dwords(abi::cmd::kFill)));
  U64(dst.v);
  U64(size);
  dw_.push_back(value);
  return *this;
}
CommandBuilder& CommandBuilder::Dispatch(uint32_t kernel, std::array<uint32_t, 3> groups,
                                         std::span<const Binding> bindings, std::span<const std::byte> push) {
  uint32_t npush = static_cast<uint32_t>((push.size() + 3) / 4);
  uint32_t len = abi::cmd::Dwords(abi::cmd::kDispatch) + static_cast<uint32_t>(bindings.size()) * abi::cmd::kBindingDwords + npush;
  dw_.push_back(abi::cmd::Header(abi::cmd::kDispatch, len));
  dw_.push_back(kernel);
  for (uint32_t g : groups) dw_.push_back(g);
  dw_.push_back(static_cast<uint32_t>(bindings.size()));
  dw_.push_back(npush);
  for (const Binding& b : bindings) {
    U64(b.va.v);
    U64(b.size);
    dw_.push_back(b.access);
  }
  size_t at = dw_.size();
  dw_.resize(at + npush, 0);
  std::memcpy(dw_.data() + at, push.data(), push.size());
  return *this;
}
CommandBuilder& CommandBuilder::Batch(GpuVa va, uint32_t size_bytes) {
  dw_.push_back(abi::cmd::Header(abi::cmd::kBatch, abi::cmd::Dwords(abi::cmd::kBatch)));
  U64(va.v);
  dw_.push_back(size_bytes);
  return *this;
}
CommandBuilder& CommandBuilder::LoadReg(uint32_t reg, uint32_t value) {
  dw_.push_back(abi::cmd::Header(abi::cmd::kLoadReg, abi::cmd::Dwords(abi::cmd::kLoadReg)));
  dw_.push_back(reg);
  dw_.push_back(value);
  return *this;
}
CommandBuilder& CommandBuilder::Timestamp(GpuVa target) {
  dw_.push_back(abi::cmd::Header(abi::cmd::kTimestamp, abi::cmd::Dwords(abi::cmd::kTimestamp)));
  U64(target.v);
  return *this;
}
CommandBuilder& CommandBuilder::GttUpdate(std::span<const abi::GttBatchRecord> records) {
  dw_.push_back(abi::cmd::Header(abi::cmd::kGttUpdate,
                                 static_cast<uint32_t>(abi::cmd::kGttUpdateFixedDwords +
                                                       records.size() * abi::cmd::kGttRecordDwords)));
  dw_.push_back(static_cast<uint32_t>(records.size()));
  const size_t at = dw_.size();
  dw_.resize(at + records.size() * abi::cmd::kGttRecordDwords);
  std::memcpy(dw_.data() + at, records.data(), records.size() * sizeof(abi::GttBatchRecord));
  return *this;
}
CommandBuilder& CommandBuilder::Raw(std::span<const uint32_t> dwords) {
  dw_.insert(dw_.end(), dwords.begin(), dwords.end());
  return *this;
}

// --- Driver ---

Result<std::unique_ptr<Driver>> Driver::Create(DeviceBackend& dev, DriverOptions opts) {
  VG_INVALID_IF(!IsPowerOfTwo(opts.ring_size) || opts.ring_size < kPageSize, "ring size {:#x}", opts.ring_size);
  std::unique_ptr<Driver> d(new Driver(dev, opts));
  VG_TRY(d->Init());
  return d;
}

Result<> Driver::Init() {
  free_ram_[0] = dev_.ram().size();
  // GPU VA 0 stays unmapped so a null VA always faults.
  free_va_[kPageSize] = (uint64_t{dev_.gtt_entries()} << kPageShift) - kPageSize;
  VG_TRY_ASSIGN(uint32_t caps, dev_.Read32(abi::reg::kCaps));
  VG_TRY(InitGttBatch(caps));
  // Idle notify is about the shadow: a RING_TAIL doorbell carries its tail and is never
  // skipped.
  idle_notify_ = opts_.idle_notify && opts_.use_ioeventfd && (caps & abi::kCapIdleNotify);
  VG_TRY_ASSIGN(ring_, Alloc(opts_.ring_size, false));
  VG_TRY_ASSIGN(fence_, Alloc(kPageSize, true));
  // A previous driver instance (or a guest that died) may have left the ring running.
  VG_TRY(dev_.Write32(abi::reg::kCtrl, 0));
  VG_TRY(dev_.Write64(abi::reg::kRingBaseLo, ring_.va.v));
  VG_TRY(dev_.Write32(abi::reg::kRingSize, opts_.ring_size));
  VG_TRY(dev_.Write64(abi::reg::kTailShadowLo, fence_.va.v + 64));
  VG_TRY(dev_.Write32(abi::reg::kCtrl, abi::kCtrlRingEnable));
  errors_seen_ = dev_.Status32(abi::status::kErrCount);
  // From here on (the ring runs) every GTT change goes through the ring, so none can
  // overtake one queued there (a register write and the doorbell are not ordered).
  gtt_ring_ = opts_.gtt_in_ring && (caps & abi::kCapGttRing);
  // Fence values continue from whatever the device last completed, so a fence left by an
  // earlier driver instance can never satisfy a wait on one of ours.
  seq_ = completed();
  return Ok();
}

Result<uint64_t> Driver::AllocRange(std::map<uint64_t, uint64_t>& free, uint64_t size) {
  for (auto it = free.begin(); it != free.end(); ++it) {
    if (it->second < size) continue;
    uint64_t off = it->first, left = it->second - size;
    free.erase(it);
    if (left) free[off + size] = left;
    return off;
  }
  return MakeError(Errc::kOutOfMemory, "no free range of {:#x} bytes", size);
}

void Driver::FreeRange(std::map<uint64_t, uint64_t>& free, uint64_t off, uint64_t size) {
  auto [it, inserted] = free.emplace(off, size);
  auto next = std::next(it);
  if (next != free.end() && off + size == next->first) {
    it->second += next->second;
    free.erase(next);
  }
  if (it != free.begin()) {
    auto prev = std::prev(it);
    if (prev->first + prev->second == off) {
      prev->second += it->second;
      free.erase(it);
    }
  }
}

Result<GpuVa> Driver::ReserveVa(uint64_t size) {
  VG_TRY_ASSIGN(uint64_t va, AllocRange(free_va_, (size + kPageSize - 1) & ~(kPageSize - 1)));
  return GpuVa{va};
}

Result<> Driver::WriteGtt(uint32_t index, uint64_t entry) {
  return dev_.Write64(abi::kGttOffset + index * 8, entry, /*posted=*/true);
}

// The GTT batch array: 64 KiB at the end of guest RAM (so buffers keep the offsets they had
// before), never GTT-mapped: the device reads it by guest-physical address. Not used when
// the device cannot read this RAM without waiting on us (shared without an fd), or when the
// RAM is too small to spare it.
Result<> Driver::InitGttBatch(uint32_t caps) {
  if (!opts_.gtt_batch || !dev_.ram_shared_with_fd()) return Ok();
  if (!(caps & abi::kCapGttBatch)) return Ok();
  constexpr uint64_t kBytes = uint64_t{abi::kGttBatchMaxRecords} * sizeof(abi::GttBatchRecord);
  const uint64_t ram = dev_.ram().size();
  if (ram < 8 * kBytes) return Ok();
  free_ram_.clear();
  free_ram_[0] = ram - kBytes;
  batch_.host = dev_.ram().subspan(ram - kBytes, kBytes);
  batch_.gpa = Gpa{dev_.ram_base().v + ram - kBytes};
  batch_.size = ByteSize{kBytes};
  return dev_.Write64(abi::reg::kGttBatchAddrLo, batch_.gpa.v);
}

Result<> Driver::ApplyGtt(std::span<const abi::GttBatchRecord> records, bool check) {
  if (records.empty()) return Ok();
  if (uses_gtt_batch()) {
    Result<> r = ApplyGttBatch(records, check);
    if (r.ok() || r.code() != Errc::kWouldBlock) return r;
    // The device refused the batch as a whole without changing anything: it cannot read our
    // RAM without waiting on us. Posted writes from now on.
    batch_ = GpuBuffer{};
  }
  return ApplyGttWrites(records, check);
}

// One GTT_BATCH_GO per 4096 records: one message each, whatever the page count. Each GO is
// all or nothing on the device; a refusal names the record (ERR_INFO).
Result<> Driver::ApplyGttBatch(std::span<const abi::GttBatchRecord> records, bool check) {
  auto* array = reinterpret_cast<abi::GttBatchRecord*>(batch_.host.data());
  const size_t cap = batch_.size.v / sizeof(abi::GttBatchRecord);
  bool readdressed = false;
  for (size_t at = 0; at < records.size();) {
    const size_t n = std::min(cap, records.size() - at);
    std::memcpy(static_cast<void*>(array), records.data() + at, n * sizeof(abi::GttBatchRecord));
    std::atomic_thread_fence(std::memory_order_release);  // the array before the MMIO write
    const uint32_t before = dev_.Status32(abi::status::kErrCount);
    ++counters_.gtt_batches;
    Result<> w = dev_.Write32(abi::reg::kGttBatchGo, static_cast<uint32_t>(n));
    bool refused = !w.ok();
    if (w.ok() && check && !dev_.write_reports_refusal()) {
      VG_TRY_ASSIGN(uint32_t after, dev_.Read32(abi::reg::kErrCount));
      refused = after != before;
    }
    if (!refused) {
      at += n;
      continue;
    }
    auto err = dev_.ReadError();
    if (!err.ok()) return w.ok() ? std::move(err).error() : std::move(w).error();
    if (err->count == before && !w.ok()) return w;  // not a refusal: the transport failed
    errors_seen_ = err->count;
    if (err->source == abi::kErrSourceGttBatch && err->info == abi::kGttBatchWhole && err->addr != batch_.gpa.v &&
        !readdressed) {
      // GTT_BATCH_ADDR is not ours any more (a reset returned it to 0): set it again, once.
      readdressed = true;
      VG_TRY(dev_.Write64(abi::reg::kGttBatchAddrLo, batch_.gpa.v));
      continue;
    }
    if (err->info == abi::kGttBatchWhole)
      return MakeError(err->code, "GTT batch of {} records refused as a whole", n);
    return MakeError(err->code, "GTT batch refused at record {} (GTT[{}] = {:#x}); nothing of it applied",
                     at + err->info, records[at + std::min<size_t>(err->info, n - 1)].index,
                     records[at + std::min<size_t>(err->info, n - 1)].entry);
  }
  return Ok();
}

// Posted writes: the backend batches them where it can (REGION_WRITE_MULTI). Each is an
// independent register write; one read of ERR_COUNT both orders them and says whether any
// was refused.
Result<> Driver::ApplyGttWrites(std::span<const abi::GttBatchRecord> records, bool check) {
  const uint32_t before = dev_.Status32(abi::status::kErrCount);
  counters_.gtt_writes += records.size();
  VG_TRY(dev_.WriteGttEntries(records));
  if (!check) return Ok();
  VG_TRY_ASSIGN(uint32_t after, dev_.Read32(abi::reg::kErrCount));
  if (after == before) return Ok();
  VG_TRY_ASSIGN(auto err, dev_.ReadError());
  errors_seen_ = after;
  return MakeError(err.code, "GTT update refused at {:#x} (GTT[{}])", err.addr, err.info);
}

Result<> Driver::MapRange(GpuVa va, uint64_t first, uint64_t pages, uint64_t flags) {
  if (gtt_ring_) {
    // In ring order with everything else: a VA whose clear is still queued is cleared, then
    // mapped anew, by the device in that order.
    for (uint64_t p = 0; p < pages; ++p)
      ring_gtt_.push_back({static_cast<uint32_t>((va.v >> kPageShift) + p), 0, (first + p * kPageSize) | flags});
    if (ring_gtt_.size() >= kMaxPendingClears) return FlushRingGtt();
    return Ok();
  }
  // The clears Free left pending go first, in the same update: a VA freed and reused here is
  // cleared and then mapped anew, in record order.
  std::vector<abi::GttBatchRecord> records = std::move(pending_clears_);
  pending_clears_.clear();
  const size_t clears = records.size();
  records.resize(clears + pages);
  for (uint64_t p = 0; p < pages; ++p)
    records[clears + p] = {static_cast<uint32_t>((va.v >> kPageShift) + p), 0, (first + p * kPageSize) | flags};
  Result<> r = ApplyGtt(records);
  if (!r.ok()) {
    FreeRange(free_va_, va.v, pages * kPageSize);
    // Nothing of a refused update applied (a batch is all or nothing): the clears stay due.
    // Posted writes may have applied some of them; clearing twice is harmless.
    records.resize(clears);
    pending_clears_ = std::move(records);
  }
  return r;
}

size_t Driver::RingGttPerSubmission() const {
  // A quarter of the ring: a submission must fit it, with room for the commands after.
  return std::max<size_t>(1, opts_.ring_size / 4 / sizeof(abi::GttBatchRecord));
}

size_t Driver::EmitRingGtt(CommandBuilder& out, size_t max) const {
  const size_t n = std::min(max, ring_gtt_.size());
  for (size_t at = 0; at < n; at += abi::cmd::kGttUpdateMaxRecords)
    out.GttUpdate(std::span(ring_gtt_).subspan(at, std::min<size_t>(abi::cmd::kGttUpdateMaxRecords, n - at)));
  return n;
}

Result<> Driver::FlushRingGtt() {
  while (!ring_gtt_.empty()) {
    CommandBuilder cb;
    const size_t n = EmitRingGtt(cb, RingGttPerSubmission());
    VG_TRY(WriteRing(cb.dwords()));
    VG_TRY(Doorbell(static_cast<uint32_t>(cb.size_bytes())));
    counters_.gtt_ring_records += n;
    ring_gtt_.erase(ring_gtt_.begin(), ring_gtt_.begin() + static_cast<ptrdiff_t>(n));
  }
  return Ok();
}

Result<> Driver::FlushFrees() {
  if (gtt_ring_) return FlushRingGtt();
  if (pending_clears_.empty()) return Ok();
  std::vector<abi::GttBatchRecord> records = std::move(pending_clears_);
  pending_clears_.clear();
  // Invalid entries are always valid to write: no ERR_COUNT read (posted).
  return ApplyGtt(records, /*check=*/false);
}

Result<GpuVa> Driver::MapPages(Gpa gpa, uint64_t size, bool writable) {
  uint64_t pages = (size + kPageSize - 1) / kPageSize;
  VG_TRY_ASSIGN(GpuVa va, ReserveVa(size));
  VG_TRY_CTX(MapRange(va, gpa.v, pages, abi::kGttValid | (writable ? abi::kGttWritable : 0)),
             "GTT mapping of {}+{:#x}", gpa, size);
  return va;
}

Result<GpuVa> Driver::MapAperture(uint64_t offset, uint64_t size, bool writable) {
  uint64_t pages = (size + kPageSize - 1) / kPageSize;
  VG_TRY_ASSIGN(GpuVa va, ReserveVa(size));
  VG_TRY_CTX(MapRange(va, offset, pages, abi::kGttValid | abi::kGttAperture | (writable ? abi::kGttWritable : 0)),
             "aperture mapping of {:#x}+{:#x}", offset, size);
  return va;
}

Result<GpuBuffer> Driver::Alloc(uint64_t size, bool writable) {
  VG_INVALID_IF(size == 0, "empty allocation");
  uint64_t rounded = (size + kPageSize - 1) & ~(kPageSize - 1);
  VG_TRY_ASSIGN(uint64_t off, AllocRange(free_ram_, rounded));
  GpuBuffer b;
  b.host = dev_.ram().subspan(off, size);
  b.gpa = Gpa{dev_.ram_base().v + off};
  b.size = ByteSize{size};
  b.writable = writable;
  auto va = MapPages(b.gpa, rounded, writable);
  if (!va.ok()) {
    FreeRange(free_ram_, off, rounded);
    return std::move(va).error();
  }
  b.va = *va;
  return b;
}

Result<> Driver::Free(const GpuBuffer& b) {
  uint64_t rounded = (b.size.v + kPageSize - 1) & ~(kPageSize - 1);
  const uint64_t pages = rounded / kPageSize;
  std::vector<abi::GttBatchRecord> records(pages);
  for (uint64_t p = 0; p < pages; ++p) records[p] = {static_cast<uint32_t>((b.va.v >> kPageShift) + p), 0, 0};
  if (gtt_ring_) {
    // Cleared with the next submission, before anything submitted after this Free (lazy or
    // not, the device sees it in ring order).
    ring_gtt_.insert(ring_gtt_.end(), records.begin(), records.end());
    if (ring_gtt_.size() >= kMaxPendingClears) VG_TRY(FlushRingGtt());
  } else if (opts_.lazy_free && pending_clears_.size() + pages <= kMaxPendingClears) {
    pending_clears_.insert(pending_clears_.end(), records.begin(), records.end());
  } else {
    VG_TRY(FlushFrees());
    // Invalid entries are always valid to write: no ERR_COUNT read (as before, posted).
    VG_TRY(ApplyGtt(records, /*check=*/false));
  }
  FreeRange(free_va_, b.va.v, rounded);
  FreeRange(free_ram_, b.gpa.v - dev_.ram_base().v, rounded);
  return Ok();
}

Result<> Driver::WriteRing(std::span<const uint32_t> dwords) {
  uint32_t bytes = static_cast<uint32_t>(dwords.size() * 4);
  VG_ERROR_IF(bytes >= opts_.ring_size, Errc::kLimitExceeded, "{} bytes of commands do not fit a {:#x} ring", bytes,
              opts_.ring_size);
  // The device consumes the whole span at each doorbell, so space frees as soon as the
  // ring head (published in the status page) reaches our tail.
  // The head only moves forward, toward our tail, so the copy last read understates the
  // free space and is safe to use: the status page is read only when that copy says the
  // commands do not fit (where a status read is a round trip, as through qtest, this keeps
  // it off the submission path).
  auto fits = [&] { return opts_.ring_size - ((tail_ - ring_head_) & (opts_.ring_size - 1)) > bytes; };
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!fits()) {
    ring_head_ = dev_.Status32(abi::status::kRingHead);
    if (fits()) break;
    VG_ERROR_IF(std::chrono::steady_clock::now() > deadline, Errc::kTimeout, "ring full");
    std::this_thread::yield();
  }
  auto* ring = reinterpret_cast<uint32_t*>(ring_.host.data());
  uint32_t at = tail_ / 4, n = opts_.ring_size / 4;
  for (uint32_t d : dwords) {
    ring[at] = d;
    at = (at + 1) % n;
  }
  tail_ = at * 4;
  counters_.ring_bytes += bytes;
  return Ok();
}

// Idle notify lets published work pile up while the device is busy, and the device takes
// the pile as one span, to which the per-submission bounds apply (16384 commands, ...). So
// the driver kicks anyway once this many bytes went out unkicked: the loop then takes them
// at once, in spans no bigger than this plus one submission.
static constexpr uint32_t kMaxUnkickedBytes = 16 << 10;

Result<> Driver::Doorbell(uint32_t bytes) {
  if (opts_.use_ioeventfd) {
    // Release: the commands before the tail that announces them.
    __atomic_store_n(reinterpret_cast<uint32_t*>(fence_.host.data() + 64), tail_, __ATOMIC_RELEASE);
    if (idle_notify_) {
      unkicked_bytes_ += bytes;
      // Store the tail, full fence, then read DEVICE_IDLE (Dekker with the device, which
      // stores idle, fences, then re-reads the tail): without the fence the read could pass
      // the store, and a device going idle meanwhile would miss the tail and we the kick.
      std::atomic_thread_fence(std::memory_order_seq_cst);
      const bool idle = dev_.Status32(abi::status::kDeviceIdle) != 0;
      // Our last kick is still pending when the device's doorbell count has not moved since
      // we read it before that kick: the device stores the count (and fences) before its
      // pass reads the shadow, so that pass will see this tail too. This covers the time
      // between a kick and the device's wake-up, when DEVICE_IDLE still reads 1.
      const uint64_t seen = dev_.Status64(abi::status::kDoorbells);
      const bool kick_pending = kicked_ && seen == kick_mark_;
      if ((!idle || kick_pending) && unkicked_bytes_ <= std::min(kMaxUnkickedBytes, opts_.ring_size / 4)) {
        ++counters_.doorbells_skipped;
        return Ok();
      }
      unkicked_bytes_ = 0;
      kicked_ = true;
      kick_mark_ = seen;
    }
    ++counters_.doorbells;
    return dev_.Kick();
  }
  ++counters_.doorbells;
  return dev_.Write32(abi::reg::kRingTail, tail_);
}

Result<uint64_t> Driver::Submit(const CommandBuilder& cmds, bool irq) {
  // Refusals reported before this submission are not about it.
  errors_seen_ = dev_.Status32(abi::status::kErrCount);
  CommandBuilder all;
  size_t gtt_taken = 0;
  if (!ring_gtt_.empty()) {
    // The GTT updates queued since the last submission go first, in the same submission,
    // unless they and the commands would fill more than half the ring.
    const uint64_t gtt_bytes = ring_gtt_.size() * sizeof(abi::GttBatchRecord) + 64;
    if (ring_gtt_.size() > RingGttPerSubmission() || gtt_bytes + cmds.size_bytes() >= opts_.ring_size / 2) {
      VG_TRY(FlushRingGtt());
    } else {
      gtt_taken = EmitRingGtt(all, ring_gtt_.size());
    }
  }
  all.Raw(cmds.dwords()).Fence(fence_.va, seq_ + 1, irq);
  VG_TRY(WriteRing(all.dwords()));
  counters_.gtt_ring_records += gtt_taken;
  ring_gtt_.erase(ring_gtt_.begin(), ring_gtt_.begin() + static_cast<ptrdiff_t>(gtt_taken));
  VG_TRY(Doorbell(static_cast<uint32_t>(all.size_bytes())));
  ++counters_.submissions;
  return ++seq_;
}

Result<> Driver::SubmitRaw(std::span<const uint32_t> dwords) {
  errors_seen_ = dev_.Status32(abi::status::kErrCount);
  VG_TRY(FlushRingGtt());  // exactly these dwords: the queued GTT updates go before them
  VG_TRY(WriteRing(dwords));
  return Doorbell(static_cast<uint32_t>(dwords.size() * 4));
}

Result<> Driver::Wait(uint64_t seq, WaitMode mode, int timeout_ms) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  const auto status_every = std::chrono::microseconds(dev_.status_poll_interval_us());
  auto next_status = std::chrono::steady_clock::now() + status_every;
  auto next_hangup_check = std::chrono::steady_clock::now();
  for (;;) {
    if (status_every.count() > 0) {
      // Every submission's FENCE writes its seq into fence_ in guest RAM as well as into the
      // status page: a load here sees completion without a round trip. Errors still come
      // from the status page, read at the backend's pace.
      const uint64_t in_ram = __atomic_load_n(reinterpret_cast<const uint64_t*>(fence_.host.data()), __ATOMIC_ACQUIRE);
      if (in_ram >= seq) return Ok();
      if (std::chrono::steady_clock::now() < next_status) {
        std::this_thread::yield();
        continue;
      }
      next_status = std::chrono::steady_clock::now() + status_every;
    }
    if (completed() >= seq) return Ok();
    uint32_t errs = dev_.Status32(abi::status::kErrCount);
    if (errs != errors_seen_) {
      errors_seen_ = errs;
      VG_TRY_ASSIGN(auto err, dev_.ReadError());
      return MakeError(err.code, "the device refused a submission (source {}, address {:#x})", err.source, err.addr);
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    VG_ERROR_IF(left.count() <= 0, Errc::kTimeout, "fence {} not reached (completed {})", seq, completed());
    const EventFd* fence_irq = dev_.irq_eventfd(abi::kVectorFence);
    const EventFd* error_irq = dev_.irq_eventfd(abi::kVectorError);
    const int hangup = dev_.hangup_fd();
    // A backend without interrupts (PciDevice in a VM) is waited on by polling.
    if (mode == WaitMode::kPoll || !fence_irq || !error_irq) {
      // Every 10 ms: a polling wait spins, and the check is a system call.
      if (hangup >= 0 && std::chrono::steady_clock::now() >= next_hangup_check) {
        next_hangup_check = std::chrono::steady_clock::now() + std::chrono::milliseconds(10);
        pollfd h{hangup, POLLRDHUP, 0};
        VG_ERROR_IF(::poll(&h, 1, 0) > 0 && (h.revents & (POLLHUP | POLLRDHUP | POLLERR)), Errc::kPeerClosed,
                    "the device went away before fence {} (completed {})", seq, completed());
      }
      std::this_thread::yield();
      continue;
    }
    // The socket is watched for hang-up only: its messages are the client's to read.
    pollfd fds[3] = {{fence_irq->Get(), POLLIN, 0}, {error_irq->Get(), POLLIN, 0}, {hangup, POLLRDHUP, 0}};
    int r = ::poll(fds, hangup >= 0 ? 3 : 2, static_cast<int>(std::min<int64_t>(left.count(), 100)));
    if (r > 0) {
      if (fds[0].revents) counters_.interrupts += fence_irq->Drain().value_or(0);
      if (fds[1].revents) (void)error_irq->Drain();
      if (hangup >= 0 && (fds[2].revents & (POLLHUP | POLLRDHUP | POLLERR)) && completed() < seq)
        return MakeError(Errc::kPeerClosed, "the device went away before fence {} (completed {})", seq, completed());
    }
  }
}

}  // namespace vg::guest
