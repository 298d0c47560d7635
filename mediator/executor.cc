#include "mediator/executor.h"

#include <time.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <map>

#include "mediator/abi.h"

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
// or through an engine buffer gathered before and scattered after the work.
struct Executor::Materialized {
  engine::BufferRange range;
  std::shared_ptr<Import> import;  // held until the work completes
  const ResolvedRange* gathered_from = nullptr;
};

Result<std::shared_ptr<Executor::Import>> Executor::ImportGuestRange(Gpa gpa, ByteSize size, bool write) {
  ImportKey key{gpa.v, size.v, write};
  {
    std::lock_guard lk(imports_mu_);
    auto it = imports_.find(key);
    // A hit is only a hit while its region is still in translation: once DMA_UNMAP removed
    // it, the guest may already have put other memory at this address.
    if (it != imports_.end() && it->second->pin.Live()) {
      ++counters_.import_hits;
      return it->second;
    }
    if (it != imports_.end()) imports_.erase(it);
  }
  // Pinned first: a range unmapped since the audit fails here, by name, and is never used.
  VG_TRY_ASSIGN(vu::Pin pin, dma_.PinRange(gpa, size, vu::kDmaRead | (write ? vu::kDmaWrite : 0)));
  VG_TRY_ASSIGN(engine::BufferRef buf, engine_->WrapHostMemory(pin.bytes()));
  auto imp = std::make_shared<Import>(Import{std::move(pin), std::move(buf)});
  std::lock_guard lk(imports_mu_);
  ++counters_.import_misses;
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
    std::lock_guard lk(mu_);
    stop_ = true;
    queue_.clear();
  }
  cv_.notify_all();
  thread_.join();
}

void Executor::Enqueue(Plan plan) {
  {
    std::lock_guard lk(mu_);
    queue_.push_back(std::move(plan));
  }
  cv_.notify_one();
}

void Executor::CancelAndDrain() {
  std::unique_lock lk(mu_);
  queue_.clear();
  idle_cv_.wait(lk, [&] { return !running_; });
}

void Executor::WaitIdle() {
  std::unique_lock lk(mu_);
  idle_cv_.wait(lk, [&] { return !running_ && queue_.empty(); });
}

ExecCounters Executor::Counters() const {
  std::lock_guard lk(mu_);
  return counters_;
}

void Executor::Loop() {
  std::unique_lock lk(mu_);
  for (;;) {
    cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
    if (stop_) return;
    Plan plan = std::move(queue_.front());
    queue_.pop_front();
    running_ = true;
    lk.unlock();
    Result<> r = Run(plan);
    if (!r.ok()) hooks_.fail(r.error());
    lk.lock();
    ++counters_.plans;
    running_ = false;
    idle_cv_.notify_all();
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
}  // namespace

Result<> Executor::Run(Plan& plan) {
  size_t i = 0;
  while (i < plan.ops.size()) {
    if (IsGpuOp(plan.ops[i])) {
      size_t j = i;
      while (j < plan.ops.size() && IsGpuOp(plan.ops[j]) && j - i < engine::kMaxOpsPerSubmission) ++j;
      VG_TRY(RunGpuOps(std::span(plan.ops).subspan(i, j - i)));
      i = j;
      continue;
    }
    PlanOp& op = plan.ops[i++];
    if (auto* f = std::get_if<PlanFence>(&op)) {
      VG_TRY_CTX(view_.Write(f->target, std::as_bytes(std::span(&f->value, 1))), "FENCE write at {}", f->target.va);
      hooks_.fence(f->value, f->irq);
    } else if (auto* l = std::get_if<PlanLoadReg>(&op)) {
      hooks_.load_reg(l->reg, l->value);
    } else if (auto* t = std::get_if<PlanTimestamp>(&op)) {
      uint64_t now = CoarseNowNs();
      VG_TRY_CTX(view_.Write(t->target, std::as_bytes(std::span(&now, 1))), "TIMESTAMP write at {}", t->target.va);
    }
  }
  return Ok();
}

Result<Executor::Materialized> Executor::Materialize(const ResolvedRange& r) {
  Materialized m;
  if (r.spans.size() == 1) {
    const GttSpan& s = r.spans[0];
    if (s.target.aperture && aperture_buffer_) {
      m.range = {aperture_buffer_, ByteSize{s.target.page_addr}, r.size};
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
          m.range = {(*win)->buffer, ByteSize{gpa - base}, r.size};
          m.import = std::move(win).value();
          return m;
        }
      }
      auto imp = ImportGuestRange(Gpa{gpa}, r.size, r.write);
      if (imp.ok()) {
        m.range = engine::Whole((*imp)->buffer);
        m.import = std::move(imp).value();
        return m;
      }
      // Memory shared without an fd cannot be imported: gather it. Anything else (the
      // range was unmapped since the audit) fails by name; it is never touched.
      if (imp.code() != Errc::kUnsupported) return std::move(imp).error();
    }
  }
  // Scattered pages or memory shared without an fd: gather into an engine buffer.
  VG_TRY_ASSIGN(engine::BufferRef buf, engine_->CreateBuffer(r.size));
  VG_TRY(view_.Read(r, buf->Map()));
  m.range = engine::Whole(buf);
  m.gathered_from = &r;
  return m;
}

Result<> Executor::RunGpuOps(std::span<PlanOp> ops) {
  VG_ERROR_IF(!engine_, Errc::kUnsupported, "this vGPU has no engine");
  std::vector<Materialized> mats;
  auto use = [&](const ResolvedRange& r) -> Result<engine::BufferRange> {
    VG_TRY_ASSIGN(Materialized m, Materialize(r));
    engine::BufferRange range = m.range;
    mats.push_back(std::move(m));
    return range;
  };
  engine::Submission sub;
  for (PlanOp& op : ops) {
    if (auto* d = std::get_if<PlanDispatch>(&op)) {
      std::vector<engine::BufferRange> bindings;
      for (const ResolvedRange& b : d->bindings) {
        VG_TRY_ASSIGN(auto br, use(b));
        bindings.push_back(std::move(br));
      }
      sub.Dispatch(d->kernel, d->groups, std::move(bindings), d->push);
    } else if (auto* c = std::get_if<PlanCopy>(&op)) {
      VG_TRY_ASSIGN(auto src, use(c->src));
      VG_TRY_ASSIGN(auto dst, use(c->dst));
      sub.Copy(src.buffer, src.offset, dst.buffer, dst.offset, c->src.size);
    } else if (auto* f = std::get_if<PlanFill>(&op)) {
      VG_TRY_ASSIGN(auto dst, use(f->dst));
      sub.Fill(dst.buffer, dst.offset, f->dst.size, f->value);
    }
  }
  VG_TRY(engine_->SubmitAndWait(std::move(sub)));
  uint64_t zero_copy = 0, gathered = 0;
  for (const Materialized& m : mats) {
    if (m.gathered_from) {
      gathered += m.range.size.v;
      if (m.gathered_from->write) VG_TRY(view_.Write(*m.gathered_from, m.range.buffer->Map()));
    } else {
      zero_copy += m.range.size.v;
    }
  }
  std::lock_guard lk(mu_);
  ++counters_.engine_submissions;
  counters_.bytes_zero_copy += zero_copy;
  counters_.bytes_gathered += gathered;
  return Ok();
}

}  // namespace vg::mediator
