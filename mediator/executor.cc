#include "mediator/executor.h"

#include <time.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <map>

#include "abi/device.h"

namespace vg::mediator {

namespace vu = vfio_user;

// One walk over the spans for both directions: `copy(dst_or_src_in_aperture, span)` for
// aperture spans, `dma(gpa, span)` for guest memory.
template <class Bytes, class ApertureCopy, class DmaCopy>
static Result<> WalkSpans(const ResolvedRange& r, Bytes bytes, std::span<std::byte> aperture, ApertureCopy ap,
                          DmaCopy dma) {
  VG_ERROR_IF(bytes.size() != r.size.v, Errc::kInternal, "transfer of {} bytes for a range of {}", bytes.size(),
              r.size.v);
  size_t done = 0;
  for (const GttSpan& s : r.spans) {
    auto part = bytes.subspan(done, s.size.v);
    if (s.target.aperture) {
      VG_ERROR_IF(!RangeWithin(s.target.page_addr, s.size.v, aperture.size()), Errc::kOutOfBounds,
                  "aperture span past the end");
      ap(aperture.data() + s.target.page_addr, part);
    } else {
      VG_TRY(dma(Gpa{s.target.page_addr}, part));
    }
    done += s.size.v;
  }
  return Ok();
}

Result<> GuestView::Read(const ResolvedRange& r, std::span<std::byte> out) const {
  return WalkSpans(
      r, out, aperture_, [](std::byte* ap, std::span<std::byte> dst) { std::memcpy(dst.data(), ap, dst.size()); },
      [this](Gpa gpa, std::span<std::byte> dst) { return reader_ ? reader_(gpa, dst) : dma_.Read(gpa, dst); });
}

Result<> GuestView::Write(const ResolvedRange& r, std::span<const std::byte> in) const {
  return WalkSpans(
      r, in, aperture_, [](std::byte* ap, std::span<const std::byte> src) { std::memcpy(ap, src.data(), src.size()); },
      [this](Gpa gpa, std::span<const std::byte> src) { return dma_.Write(gpa, src); });
}

// How one resolved range reaches the engine: in place (aperture or a pinned DMA region),
// or through an engine buffer gathered before and scattered after the work. A gather
// buffer is charged against kMaxGatherBytes until its last user lets go of it.
struct Executor::Materialized {
  engine::BufferRange range;
  std::shared_ptr<Import> import;  // held until the work completes
  std::optional<ResolvedRange> gathered_from;
  Executor* owner = nullptr;
  uint64_t charged = 0;
  Materialized() = default;
  Materialized(const Materialized&) = delete;
  Materialized& operator=(const Materialized&) = delete;
  ~Materialized() {
    if (owner) owner->gather_bytes_ -= charged;
  }
};

// One engine submission being packed, and what it holds until it has run.
struct Executor::Batch {
  engine::Submission sub;
  std::vector<MatRef> mats;
  uint64_t cost = 0;
  // Whether adding an item of `cost` must first send what is packed.
  bool Full(uint64_t item_cost) const {
    return !sub.ops.empty() &&
           (sub.ops.size() >= engine::kMaxOpsPerSubmission || cost + item_cost > kSubmissionCostBudget);
  }
};

Result<std::shared_ptr<Executor::Import>> Executor::ImportGuestRange(Gpa gpa, ByteSize size, bool write) {
  ImportKey key{gpa.v, size.v, write};
  {
    std::lock_guard lk(imports_mu_);
    auto it = imports_.find(key);
    // A hit is only a hit while its region is still in translation: once DMA_UNMAP removed
    // it, the guest may already have put other memory at this address.
    if (it != imports_.end() && it->second->pin.Live()) {
      counters_.import_hits.fetch_add(1, std::memory_order_relaxed);
      return it->second;
    }
    if (it != imports_.end()) imports_.erase(it);
  }
  // Pinned first: a range unmapped since the audit fails here, by name, and is never used.
  VG_TRY_ASSIGN(vu::Pin pin, dma_.PinRange(gpa, size, vu::kDmaRead | (write ? vu::kDmaWrite : 0)));
  VG_TRY_ASSIGN(engine::BufferRef buf, engine_->WrapHostMemory(pin.bytes()));
  auto imp = std::make_shared<Import>(Import{std::move(pin), std::move(buf)});
  std::lock_guard lk(imports_mu_);
  counters_.import_misses.fetch_add(1, std::memory_order_relaxed);
  // Cached only while live, checked under imports_mu_: DMA_UNMAP takes the region out of
  // translation first and then drops the cache under this mutex, so a pin taken just before
  // the removal is either seen dead here or dropped by that DropImports (the cache never
  // holds a translation past its mapping, nor keeps the unmap waiting for it).
  if (!imp->pin.Live()) return imp;  // used by this work only
  if (imports_.size() >= kMaxImports) imports_.erase(imports_.begin());
  imports_[key] = imp;
  return imp;
}

void Executor::DropImports(Gpa gpa, ByteSize size) {
  std::lock_guard lk(imports_mu_);
  for (auto it = imports_.begin(); it != imports_.end();) {
    if (RangesOverlap(it->first.gpa, it->first.size, gpa.v, size.v))
      it = imports_.erase(it);
    else
      ++it;
  }
}

Executor::Executor(engine::Engine* engine, const vu::DmaSpace& dma, std::span<std::byte> aperture,
                   engine::BufferRef aperture_buffer, ExecHooks hooks)
    : engine_(engine),
      dma_(dma),
      view_(dma, aperture),
      aperture_(aperture),
      aperture_buffer_(std::move(aperture_buffer)),
      hooks_(std::move(hooks)),
      thread_([this] { Loop(); }) {}

Executor::~Executor() {
  {
    std::lock_guard hk(hook_mu_);
    epoch_.fetch_add(1, std::memory_order_acq_rel);
  }
  {
    std::lock_guard lk(mu_);
    stop_ = true;
    queue_.clear();
  }
  cv_.notify_all();
  thread_.join();  // the running plan stops after its current (bounded) engine submission
}

Result<> Executor::Enqueue(Plan plan) {
  uint64_t bytes = PlanBytes(plan);
  {
    std::lock_guard lk(mu_);
    size_t plans = queue_.size() + (running_ ? 1 : 0);
    VG_ERROR_IF(plans >= kMaxQueuedPlans, Errc::kLimitExceeded,
                "executor queue full: {} submissions queued or running (bound {})", plans, kMaxQueuedPlans);
    if (charged_bytes_ + bytes > kMaxQueuedPlanBytes) saturated_ = true;
    VG_ERROR_IF(charged_bytes_ + bytes > kMaxQueuedPlanBytes, Errc::kLimitExceeded,
                "executor queue full: {} plan bytes queued or running, this one {} (bound {})", charged_bytes_, bytes,
                kMaxQueuedPlanBytes);
    charged_bytes_ += bytes;
    queue_.push_back(Item{std::move(plan), {}, bytes, epoch_.load(std::memory_order_acquire)});
  }
  cv_.notify_one();
  return Ok();
}

Result<> Executor::Admit() const {
  std::lock_guard lk(mu_);
  size_t plans = queue_.size() + (running_ ? 1 : 0);
  VG_ERROR_IF(plans >= kMaxQueuedPlans, Errc::kLimitExceeded,
              "executor queue full: {} submissions queued or running (bound {})", plans, kMaxQueuedPlans);
  VG_ERROR_IF(saturated_, Errc::kLimitExceeded,
              "executor queue full: {} plan bytes queued or running (bound {}); room returns as queued work completes",
              charged_bytes_, kMaxQueuedPlanBytes);
  return Ok();
}

bool Executor::Cancel(std::function<void()> after) {
  {
    // A hook runs under hook_mu_ after checking its epoch: once this bump is done, no hook
    // of a plan queued before it can run.
    std::lock_guard hk(hook_mu_);
    epoch_.fetch_add(1, std::memory_order_acq_rel);
  }
  bool in_flight;
  {
    std::lock_guard lk(mu_);
    for (const Item& it : queue_) {
      charged_bytes_ -= it.bytes;
      if (it.plan) counters_.plans_cancelled.fetch_add(1, std::memory_order_relaxed);
    }
    // Queued tasks (an earlier reset's scrub) still run: they follow work already running.
    std::erase_if(queue_, [](const Item& it) { return it.plan.has_value(); });
    saturated_ = false;
    in_flight = running_;
    if (in_flight && after) queue_.push_front(Item{std::nullopt, std::move(after), 0, 0});
  }
  cv_.notify_one();
  return in_flight;
}

void Executor::WaitIdle() {
  std::unique_lock lk(mu_);
  idle_cv_.wait(lk, [&] { return !running_ && queue_.empty(); });
}

ExecCounters Executor::Counters() const {
  auto ld = [](const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  return {ld(counters_.plans),           ld(counters_.import_hits),     ld(counters_.import_misses),
          ld(counters_.engine_submissions), ld(counters_.bytes_zero_copy), ld(counters_.bytes_gathered),
          ld(counters_.plans_cancelled)};
}

template <class Fn>
void Executor::IfCurrent(uint64_t epoch, Fn&& fn) {
  std::lock_guard hk(hook_mu_);
  if (!Cancelled(epoch)) fn();
}

void Executor::Loop() {
  std::unique_lock lk(mu_);
  for (;;) {
    cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
    if (stop_) return;
    Item item = std::move(queue_.front());
    queue_.pop_front();
    running_ = true;
    lk.unlock();
    if (item.task) {
      item.task();
    } else {
      Result<> r = Run(*item.plan, item.epoch);
      if (!r.ok()) IfCurrent(item.epoch, [&] { hooks_.fail(r.error()); });
      if (Cancelled(item.epoch)) counters_.plans_cancelled.fetch_add(1, std::memory_order_relaxed);
      counters_.plans.fetch_add(1, std::memory_order_relaxed);
      item.plan.reset();  // its memory goes before its charge does
    }
    lk.lock();
    charged_bytes_ -= item.bytes;
    if (item.bytes) saturated_ = false;
    running_ = false;
    idle_cv_.notify_all();
    if (!item.task && hooks_.plan_done) {
      lk.unlock();
      hooks_.plan_done();
      lk.lock();
    }
  }
}

namespace {
bool IsGpuOp(const PlanOp& op) {
  return std::holds_alternative<PlanDispatch>(op) || std::holds_alternative<PlanCopy>(op) ||
         std::holds_alternative<PlanFill>(op);
}
uint64_t CoarseNowNs() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  uint64_t ns = uint64_t(ts.tv_sec) * 1'000'000'000ull + uint64_t(ts.tv_nsec);
  // Coarsened so one tenant cannot time another's load through the shared GPU.
  return ns / abi::cmd::kTimestampGranularityNs * abi::cmd::kTimestampGranularityNs;
}
Error CancelledError() { return Error{Errc::kBadState, "cancelled (reset, disconnect or stop)"}; }
}  // namespace

Result<> Executor::Run(Plan& plan, uint64_t epoch) {
  size_t i = 0;
  while (i < plan.ops.size()) {
    if (Cancelled(epoch)) return CancelledError();
    if (hooks_.may_dma) VG_TRY(hooks_.may_dma());
    if (IsGpuOp(plan.ops[i])) {
      size_t j = i;
      while (j < plan.ops.size() && IsGpuOp(plan.ops[j])) ++j;
      VG_TRY(RunGpuOps(std::span(plan.ops).subspan(i, j - i), epoch));
      i = j;
      continue;
    }
    PlanOp& op = plan.ops[i++];
    Result<> r = Ok();
    if (auto* f = std::get_if<PlanFence>(&op)) {
      IfCurrent(epoch, [&] {
        r = view_.Write(f->target, std::as_bytes(std::span(&f->value, 1)));
        if (r.ok()) hooks_.fence(f->value, f->irq);
      });
      VG_TRY_CTX(std::move(r), "FENCE write at {}", f->target.va);
    } else if (auto* l = std::get_if<PlanLoadReg>(&op)) {
      IfCurrent(epoch, [&] { hooks_.load_reg(l->reg, l->value); });
    } else if (auto* t = std::get_if<PlanTimestamp>(&op)) {
      uint64_t now = CoarseNowNs();
      IfCurrent(epoch, [&] { r = view_.Write(t->target, std::as_bytes(std::span(&now, 1))); });
      VG_TRY_CTX(std::move(r), "TIMESTAMP write at {}", t->target.va);
    }
  }
  return Ok();
}

Result<Executor::MatRef> Executor::Materialize(const ResolvedRange& r, Batch& batch, uint64_t epoch) {
  auto m = std::make_shared<Materialized>();
  if (r.spans.size() == 1) {
    const GttSpan& s = r.spans[0];
    if (s.target.aperture && aperture_buffer_) {
      m->range = {aperture_buffer_, ByteSize{s.target.page_addr}, r.size};
      return m;
    }
    if (!s.target.aperture) {
      // Import the aligned window around the range, not the range: a guest's buffers sit
      // in few windows, so one import serves many commands (4096 FILLs of 64 bytes were
      // 4096 imports before). Ranges that straddle a window, or whose offset the device
      // cannot bind, are imported exactly.
      uint64_t gpa = s.target.page_addr;
      uint64_t base = gpa & ~(kImportWindow - 1);
      uint64_t align = std::max<uint64_t>(4, engine_->Info().min_storage_offset_alignment);
      if (gpa - base + r.size.v <= kImportWindow && IsAligned(gpa - base, align)) {
        auto win = ImportGuestRange(Gpa{base}, ByteSize{kImportWindow}, r.write);
        if (win.ok()) {
          m->range = {(*win)->buffer, ByteSize{gpa - base}, r.size};
          m->import = std::move(win).value();
          return m;
        }
      }
      auto imp = ImportGuestRange(Gpa{gpa}, r.size, r.write);
      if (imp.ok()) {
        m->range = engine::Whole((*imp)->buffer);
        m->import = std::move(imp).value();
        return m;
      }
      // Memory shared without an fd cannot be imported: gather it. Anything else (the
      // range was unmapped since the audit) fails by name; it is never touched.
      if (imp.code() != Errc::kUnsupported) return std::move(imp).error();
    }
  }
  // Scattered pages or memory shared without an fd: gather into an engine buffer, within
  // the vGPU's gather bound. What the batch packed so far is sent first if that frees room.
  if (gather_bytes_ + r.size.v > kMaxGatherBytes && !batch.sub.ops.empty()) VG_TRY(Flush(batch, epoch));
  VG_ERROR_IF(gather_bytes_ + r.size.v > kMaxGatherBytes, Errc::kLimitExceeded,
              "gathering {} scattered bytes at {} would pass the vGPU's {} byte gather bound ({} held)", r.size.v, r.va,
              kMaxGatherBytes, gather_bytes_);
  VG_TRY_ASSIGN(engine::BufferRef buf, engine_->CreateBuffer(r.size));
  m->owner = this;
  m->charged = r.size.v;
  gather_bytes_ += r.size.v;
  VG_TRY(view_.Read(r, buf->Map()));
  m->range = engine::Whole(buf);
  m->gathered_from = r;
  return m;
}

Result<> Executor::Flush(Batch& batch, uint64_t epoch) {
  if (batch.sub.ops.empty()) return Ok();
  Result<> ran = engine_->SubmitAndWait(std::move(batch.sub));
  batch.sub = {};
  batch.cost = 0;
  std::vector<MatRef> mats = std::move(batch.mats);
  batch.mats.clear();
  VG_TRY(std::move(ran));
  uint64_t zero_copy = 0, gathered = 0;
  for (const MatRef& m : mats) {
    if (m->gathered_from) {
      gathered += m->range.size.v;
      // Cut at the boundary: a cancelled plan writes nothing more to guest memory.
      if (m->gathered_from->write && !Cancelled(epoch)) VG_TRY(view_.Write(*m->gathered_from, m->range.buffer->Map()));
    } else {
      zero_copy += m->range.size.v;
    }
  }
  counters_.engine_submissions.fetch_add(1, std::memory_order_relaxed);
  counters_.bytes_zero_copy.fetch_add(zero_copy, std::memory_order_relaxed);
  counters_.bytes_gathered.fetch_add(gathered, std::memory_order_relaxed);
  if (Cancelled(epoch)) return CancelledError();
  return Ok();
}

Result<> Executor::RunGpuOps(std::span<PlanOp> ops, uint64_t epoch) {
  VG_ERROR_IF(!engine_, Errc::kUnsupported, "this vGPU has no engine");
  Batch batch;
  // A transfer of `size` bytes in chunks: `add(offset, n)` packs one chunk.
  auto chunks = [&](uint64_t size, auto&& add) -> Result<> {
    for (uint64_t off = 0; off < size; off += kTransferChunkBytes) {
      if (Cancelled(epoch)) return CancelledError();
      uint64_t n = std::min(kTransferChunkBytes, size - off);
      if (batch.Full(n)) VG_TRY(Flush(batch, epoch));
      VG_TRY(add(off, n));
      batch.cost += n;
    }
    return Ok();
  };
  for (PlanOp& op : ops) {
    if (Cancelled(epoch)) return CancelledError();
    if (auto* d = std::get_if<PlanDispatch>(&op)) {
      VG_TRY_ASSIGN(DispatchCut cut, DispatchCut::Make(d->kernel, d->groups, d->push));
      std::vector<MatRef> mats;
      std::vector<engine::BufferRange> bindings;
      for (const ResolvedRange& b : d->bindings) {
        VG_TRY_ASSIGN(MatRef m, Materialize(b, batch, epoch));
        bindings.push_back(m->range);
        mats.push_back(std::move(m));
      }
      bool in_batch = false;  // this dispatch's bindings are held by the batch being packed
      for (uint64_t i = 0; i < cut.pieces(); ++i) {
        if (Cancelled(epoch)) return CancelledError();
        if (batch.Full(cut.piece_cost())) {
          VG_TRY(Flush(batch, epoch));
          in_batch = false;
        }
        if (!in_batch) batch.mats.insert(batch.mats.end(), mats.begin(), mats.end());
        in_batch = true;
        DispatchPiece p = cut.Piece(i);
        batch.sub.Dispatch(d->kernel, p.groups, bindings, d->push, p.base);
        batch.cost += cut.piece_cost();
      }
    } else if (auto* c = std::get_if<PlanCopy>(&op)) {
      VG_TRY(chunks(c->src.size.v, [&](uint64_t off, uint64_t n) -> Result<> {
        VG_TRY_ASSIGN(MatRef src, Materialize(SliceRange(c->src, off, n), batch, epoch));
        VG_TRY_ASSIGN(MatRef dst, Materialize(SliceRange(c->dst, off, n), batch, epoch));
        batch.sub.Copy(src->range.buffer, src->range.offset, dst->range.buffer, dst->range.offset, ByteSize{n});
        batch.mats.push_back(std::move(src));
        batch.mats.push_back(std::move(dst));
        return Ok();
      }));
    } else if (auto* f = std::get_if<PlanFill>(&op)) {
      VG_TRY(chunks(f->dst.size.v, [&](uint64_t off, uint64_t n) -> Result<> {
        VG_TRY_ASSIGN(MatRef dst, Materialize(SliceRange(f->dst, off, n), batch, epoch));
        batch.sub.Fill(dst->range.buffer, dst->range.offset, ByteSize{n}, f->value);
        batch.mats.push_back(std::move(dst));
        return Ok();
      }));
    }
  }
  return Flush(batch, epoch);
}

}  // namespace vg::mediator
