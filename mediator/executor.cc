#include "mediator/executor.h"

#include <algorithm>
#include <chrono>
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

Result<> GuestView::Write(const ResolvedRange& r, std::span<const std::byte> in, vu::DmaWait wait) const {
  return WalkSpans(
      r, in, aperture_, [](std::byte* ap, std::span<const std::byte> src) { std::memcpy(ap, src.data(), src.size()); },
      [this, wait](Gpa gpa, std::span<const std::byte> src) { return dma_.Write(gpa, src, wait); });
}

namespace {
// Set while RunHeld completes a plan on its caller's thread (the daemon's loop): a guest
// write there must never wait on the client (Inlinable checked it is all fd-backed; this
// makes a copy that would wait fail instead of blocking the loop).
thread_local bool t_inline = false;
// Set while RunHeld submits a plan's engine work on its caller's thread (inline_submit):
// nothing there may wait, so an import to make, a gather or a submission before the plan's
// last one is kWouldBlock, and RunHeld gives the untouched plan to the submit thread.
thread_local bool t_inline_submit = false;
thread_local bool t_inline_flush_ok = false;  // RunHeld's one submission, at the plan's end
thread_local bool t_executor_thread = false;  // SubmitLoop's and RetireLoop's threads
thread_local bool t_retire_thread = false;    // RetireLoop's
// Set when this thread's Enqueue held a plan with InlineOk::kSubmitOnly: the retire thread
// runs only what it held itself, never a plan the loop held for its own RunHeld.
thread_local bool t_held_here = false;
Error WouldBlockInline(const char* what) {
  return Error{Errc::kWouldBlock, fmt::format("inline submission would wait: {}", what)};
}
}  // namespace

// How one resolved range reaches the engine: in place (aperture or a pinned DMA region),
// or through an engine buffer gathered before and scattered after the work. A gather
// buffer is charged against kMaxGatherBytes until its last user lets go of it.
struct Executor::Materialized {
  engine::BufferRange range;
  std::shared_ptr<Import> import;  // held until the work completes
  std::optional<ResolvedRange> gathered_from;
  std::vector<Extent> extents;  // the guest or aperture bytes the engine touches through it
  // A gathered range's plan: its scatter is skipped once that plan has failed.
  std::shared_ptr<PlanState> plan;
  Executor* owner = nullptr;
  uint64_t charged = 0;
  Materialized() = default;
  Materialized(const Materialized&) = delete;
  Materialized& operator=(const Materialized&) = delete;
  ~Materialized() {
    if (owner) owner->gather_bytes_.fetch_sub(charged, std::memory_order_acq_rel);
  }
};

// What one plan's entries share on their way through the submit and retire threads.
struct Executor::PlanState {
  uint64_t epoch = 0;
  uint64_t bytes = 0;  // charged against kMaxQueuedPlanBytes until the plan has ended
  // Set by the first failure (either thread); the rest of the plan is skipped.
  std::atomic<bool> failed{false};
};

// One engine submission being packed, and what it holds until it has run.
struct Executor::Batch {
  engine::Submission sub;
  std::vector<MatRef> mats;
  uint64_t cost = 0;
  // What one submission may cost: kSubmissionCostBudget, or kSharedSubmissionCostBudget
  // while another vGPU holds or waits for the engine (set per op: SubmissionBudget()).
  uint64_t budget = kSubmissionCostBudget;
  // Plans with work packed in `sub`, in order (the first is the Retiring's `plan`).
  std::vector<std::shared_ptr<PlanState>> plans;
  // Entries that follow the submission in plan order (host ops and ends of plans whose
  // work is in it), pushed right after it; their guest writes are checked against what
  // is packed next (Executor::Materialize).
  std::vector<Retiring> after;
  bool Empty() const { return sub.ops.empty(); }
  // Notes that `ps` has work in the batch.
  void Holds(const std::shared_ptr<PlanState>& ps) {
    if (plans.empty() || plans.back() != ps) {
      plans.push_back(ps);
      ++sub.guest_submissions;  // what a rate limit counts (F7)
    }
  }
  // Whether adding an item of `cost` must first send what is packed.
  bool Full(uint64_t item_cost) const {
    return !sub.ops.empty() &&
           (sub.ops.size() >= engine::kMaxOpsPerSubmission || cost + item_cost > budget);
  }
};

Result<std::shared_ptr<Executor::Import>> Executor::ImportGuestRange(Gpa gpa, ByteSize size, bool write,
                                                                     bool hits_only) {
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
  if (hits_only) return WouldBlockInline("guest range not imported yet");
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
                   engine::BufferRef aperture_buffer, ExecHooks hooks, ExecOptions options)
    : engine_(engine),
      dma_(dma),
      view_(dma, aperture),
      aperture_(aperture),
      aperture_buffer_(std::move(aperture_buffer)),
      hooks_(std::move(hooks)),
      depth_(std::clamp<uint32_t>(options.depth, 1, kMaxExecutorDepth)),
      coalesce_(options.coalesce && depth_ > 1),
      inline_(options.inline_complete && options.time_granularity_ns == 0),
      inline_submit_(options.inline_complete && options.inline_submit),
      granularity_ns_(std::min(options.time_granularity_ns, abi::cmd::kMaxTimeGranularityNs)),
      retire_thread_([this] { RetireLoop(); }),
      thread_([this] { SubmitLoop(); }) {}

Executor::~Executor() {
  {
    std::lock_guard hk(hook_mu_);
    epoch_.fetch_add(1, std::memory_order_acq_rel);
  }
  {
    std::lock_guard lk(mu_);
    stop_ = true;
    queue_.clear();
    held_.reset();
  }
  cv_.notify_all();
  idle_cv_.notify_all();
  retire_cv_.notify_all();  // an entry held for its tick is cancelled now: no need to wait
  thread_.join();  // the plan being submitted stops at its next submission boundary
  {
    std::lock_guard lk(mu_);
    retire_stop_ = true;
  }
  retire_cv_.notify_all();
  retire_thread_.join();  // waits for the (bounded) engine submissions in flight
}

Result<> Executor::Enqueue(Plan plan) {
  Result<bool> queued = Enqueue(std::move(plan), InlineOk::kNo);
  if (!queued.ok()) return std::move(queued).error();
  return Ok();
}

Result<bool> Executor::Enqueue(Plan plan, InlineOk inline_ok) {
  uint64_t bytes = PlanBytes(plan);
  InlineKind kind = inline_ok == InlineOk::kNo ? InlineKind::kNo : Inlinable(plan);
  // Not from inside a RunHeld on this thread (a plan that failed at once and ended there):
  // the outer one would not run what this holds.
  if (inline_ok == InlineOk::kSubmitOnly && (kind != InlineKind::kSubmit || t_inline)) kind = InlineKind::kNo;
  const bool inlinable = kind != InlineKind::kNo;
  bool held = false;
  {
    std::lock_guard lk(mu_);
    size_t plans = queue_.size() + plans_open_ + (held_ ? 1 : 0);
    VG_ERROR_IF(plans >= kMaxQueuedPlans, Errc::kLimitExceeded,
                "executor queue full: {} submissions queued or running (bound {})", plans, kMaxQueuedPlans);
    if (charged_bytes_ + bytes > kMaxQueuedPlanBytes) saturated_ = true;
    VG_ERROR_IF(charged_bytes_ + bytes > kMaxQueuedPlanBytes, Errc::kLimitExceeded,
                "executor queue full: {} plan bytes queued or running, this one {} (bound {})", charged_bytes_, bytes,
                kMaxQueuedPlanBytes);
    charged_bytes_ += bytes;
    Item item{std::move(plan), {}, bytes, epoch_.load(std::memory_order_acquire)};
    // Idle (nothing queued, held, running or retiring): nothing is before this plan in ring
    // order, so completing it on the caller's thread keeps the order and every fence's
    // exactly-once, and the submit thread takes nothing until it has completed.
    // Or queued from the plan_done hook of the plan RunHeld is completing on this thread
    // (the idle-notify settle found the guest's next tail): that plan has ended, and nothing
    // else can run while RunHeld holds the executor.
    const bool runner_free = !running_ || (inline_running_ && t_inline);
    held = inlinable && !stop_ && queue_.empty() && !held_ && runner_free && plans_open_ == 0 && retiring_.empty();
    if (held) {
      held_ = std::move(item);
      if (inline_ok == InlineOk::kSubmitOnly) t_held_here = true;
    } else {
      queue_.push_back(std::move(item));
    }
    backlog_.fetch_add(1, std::memory_order_relaxed);
  }
  if (!held) cv_.notify_one();
  return held;
}

Executor::InlineKind Executor::Inlinable(const Plan& plan) const {
  if (!inline_ && !inline_submit_) return InlineKind::kNo;
  // Written by a memcpy: the aperture, or guest memory with an fd. Memory shared without
  // an fd takes a DMA_WRITE round trip to the client, which the loop never waits for.
  auto in_place = [&](const ResolvedRange& r, uint32_t access) {
    for (const GttSpan& sp : r.spans) {
      if (sp.target.aperture ? !RangeWithin(sp.target.page_addr, sp.size.v, aperture_.size())
                             : !dma_.FdBacked(Gpa{sp.target.page_addr}, sp.size, access))
        return false;
    }
    return true;
  };
  // Engine work: one span each (the engine uses it in place, no gather), at the front.
  size_t gpu = 0;
  for (; gpu < plan.ops.size(); ++gpu) {
    const PlanOp& op = plan.ops[gpu];
    // The aperture in place only at an offset the device can bind (else gathered, F10).
    auto usable = [&](const ResolvedRange& r, bool write) {
      if (r.spans.size() != 1 || !engine_) return false;
      const GttTarget& t = r.spans[0].target;
      const uint64_t align = std::max<uint64_t>(4, engine_->Info().min_storage_offset_alignment);
      if (t.aperture && (!aperture_buffer_ || !IsAligned(t.page_addr, align))) return false;
      return in_place(r, vu::kDmaRead | (write ? vu::kDmaWrite : 0));
    };
    if (const auto* d = std::get_if<PlanDispatch>(&op)) {
      for (const ResolvedRange& b : d->bindings)
        if (!usable(b, b.write)) return InlineKind::kNo;
    } else if (const auto* c = std::get_if<PlanCopy>(&op)) {
      if (!usable(c->src, false) || !usable(c->dst, true)) return InlineKind::kNo;
    } else if (const auto* f = std::get_if<PlanFill>(&op)) {
      if (!usable(f->dst, true)) return InlineKind::kNo;
    } else {
      break;
    }
  }
  if (gpu > kMaxInlineGpuOps || plan.ops.size() - gpu > kMaxInlineHostOps) return InlineKind::kNo;
  if (gpu ? !inline_submit_ : !inline_) return InlineKind::kNo;
  for (size_t i = gpu; i < plan.ops.size(); ++i) {
    const PlanOp& op = plan.ops[i];
    if (const auto* f = std::get_if<PlanFence>(&op)) {
      if (!in_place(f->target, vu::kDmaWrite)) return InlineKind::kNo;
    } else if (const auto* t = std::get_if<PlanTimestamp>(&op)) {
      if (!in_place(t->target, vu::kDmaWrite)) return InlineKind::kNo;
    } else if (!std::holds_alternative<PlanLoadReg>(op)) {
      return InlineKind::kNo;  // engine work after a host op: the threads'
    }
  }
  return gpu ? InlineKind::kSubmit : InlineKind::kComplete;
}

bool Executor::RunHeld() {
  std::unique_lock lk(mu_);
  if (!held_) return false;
  // Checked again where the writes happen (the DmaSpace's lock is a leaf below mu_): memory
  // unmapped or remapped without an fd since Enqueue sends the plan the threads' way.
  const InlineKind kind = Inlinable(*held_->plan);
  if (kind == InlineKind::kNo) {
    queue_.push_front(std::move(*held_));  // first: everything in the queue came after it
    held_.reset();
    lk.unlock();
    cv_.notify_one();
    return false;
  }
  Item item = std::move(*held_);
  held_.reset();
  inline_running_ = true;
  running_ = true;  // a Cancel meanwhile queues its `after` behind this plan, as for the submit thread's
  ++plans_open_;
  lk.unlock();
  bool handed_back = false;
  {
    // What the submit thread does with a plan, here. Host ops only (kComplete): nothing is
    // packed and each entry retires at once through PushRetire (nothing is retiring),
    // under the same epoch checks and hooks. Engine work first (kSubmit): packed into one
    // batch, sent at the plan's end; its entries go to the retire thread.
    t_inline = true;
    t_inline_submit = kind == InlineKind::kSubmit;
    auto ps = std::make_shared<PlanState>();
    ps->epoch = item.epoch;
    ps->bytes = item.bytes;
    Batch batch;
    Result<> r = Run(*item.plan, ps, batch);
    if (!r.ok() && r.code() == Errc::kWouldBlock && t_inline_submit && batch.after.empty()) {
      // Nothing was sent and no host op of the plan taken (they follow its engine work):
      // dropping the batch lets go of its imports, and the threads run the plan whole.
      handed_back = true;
    } else {
      if (!r.ok()) Follow(batch, Retiring{.kind = Retiring::Kind::kFailure, .plan = ps, .error = std::move(r).error()});
      item.plan.reset();
      Follow(batch, Retiring{.kind = Retiring::Kind::kPlanEnd, .plan = ps});
      if (!batch.Empty()) {
        t_inline_flush_ok = true;
        (void)Flush(batch);  // a failure to submit is the plan's (Submit reports it)
        t_inline_flush_ok = false;
      }
    }
    t_inline = false;
    t_inline_submit = false;
  }
  if (handed_back) {
    lk.lock();
    --plans_open_;
    inline_running_ = false;
    running_ = false;
    queue_.push_front(std::move(item));  // first: everything in the queue came after it
    lk.unlock();
    cv_.notify_one();
    return false;
  }
  (kind == InlineKind::kSubmit ? counters_.plans_inline_submitted : counters_.plans_inline)
      .fetch_add(1, std::memory_order_relaxed);
  lk.lock();
  inline_running_ = false;
  running_ = false;
  const bool more = !queue_.empty();
  idle_cv_.notify_all();
  lk.unlock();
  if (more) cv_.notify_one();
  return true;
}

Result<> Executor::Admit() const {
  std::lock_guard lk(mu_);
  size_t plans = queue_.size() + plans_open_ + (held_ ? 1 : 0);
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
    backlog_.fetch_sub(static_cast<uint32_t>(std::erase_if(queue_, [](const Item& it) { return it.plan.has_value(); })),
                       std::memory_order_relaxed);
    if (held_) {  // the plan held for RunHeld: queued, and dropped like the rest
      charged_bytes_ -= held_->bytes;
      counters_.plans_cancelled.fetch_add(1, std::memory_order_relaxed);
      backlog_.fetch_sub(1, std::memory_order_relaxed);
      held_.reset();
    }
    saturated_ = false;
    in_flight = running_ || !retiring_.empty();
    // The submit thread drains the retire queue before it runs a task: `after` follows
    // every engine submission in flight now.
    if (in_flight && after) queue_.push_front(Item{std::nullopt, std::move(after), 0, 0});
  }
  cv_.notify_one();
  retire_cv_.notify_all();  // an entry held for its tick is cancelled now: no need to wait
  return in_flight;
}

void Executor::WaitIdle() {
  std::unique_lock lk(mu_);
  idle_cv_.wait(lk, [&] { return !running_ && !held_ && queue_.empty() && retiring_.empty() && plans_open_ == 0; });
}

bool Executor::Idle() const {
  std::lock_guard lk(mu_);
  // Plans only: a plan_done hook asking this sees its own plan ended even before the submit
  // thread has let go of it (running_ may still be set) — and tasks are no guest work.
  return queue_.empty() && !held_ && plans_open_ == 0;
}

ExecCounters Executor::Counters() const {
  auto ld = [](const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  return {ld(counters_.plans),           ld(counters_.import_hits),     ld(counters_.import_misses),
          ld(counters_.engine_submissions), ld(counters_.bytes_zero_copy), ld(counters_.bytes_gathered),
          ld(counters_.plans_cancelled), ld(counters_.drains),          ld(counters_.max_in_flight),
          ld(counters_.plans_coalesced), ld(counters_.plans_inline), ld(counters_.plans_inline_submitted)};
}

template <class Fn>
void Executor::IfCurrent(uint64_t epoch, Fn&& fn) {
  std::lock_guard hk(hook_mu_);
  if (!Cancelled(epoch)) fn();
}

namespace {
uint64_t SteadyNs(std::chrono::steady_clock::time_point t) {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count());
}
// steady_clock is CLOCK_MONOTONIC (libstdc++ on Linux): the clock a guest times itself with.
uint64_t NowNs() { return SteadyNs(std::chrono::steady_clock::now()); }
}  // namespace

void Executor::PushRetire(Retiring r) {
  if (granularity_ns_ && r.kind != Retiring::Kind::kSubmission) r.ready_ns = NowNs();
  std::unique_lock lk(mu_);
  // Coarsened time: a host op may be held for its tick, which the retire thread does; this
  // thread goes on submitting.
  if (r.kind != Retiring::Kind::kSubmission && retiring_.empty() && !granularity_ns_) {
    // Nothing before it is still retiring: a host op (or a plan's end) completes here, on
    // the submit thread (or RunHeld's), one thread hop sooner. Only that thread adds
    // entries, so nothing can overtake it meanwhile.
    ++retire_seq_;
    lk.unlock();
    Retire(r);
    lk.lock();
    Finished(r, lk);
    return;
  }
  if (r.kind == Retiring::Kind::kSubmission) {
    ++in_flight_;
    in_flight_cost_ += r.cost;
    if (in_flight_ > counters_.max_in_flight.load(std::memory_order_relaxed))
      counters_.max_in_flight.store(in_flight_, std::memory_order_relaxed);
  }
  retiring_.push_back(std::move(r));
  ++retire_seq_;
  lk.unlock();
  retire_cv_.notify_one();
}

void Executor::Finished(const Retiring& r, std::unique_lock<std::mutex>& lk) {
  std::shared_ptr<PlanState> ended;
  if (r.kind == Retiring::Kind::kSubmission) {
    --in_flight_;
    in_flight_cost_ -= r.cost;
  } else if (r.kind == Retiring::Kind::kPlanEnd) {
    charged_bytes_ -= r.plan->bytes;
    if (r.plan->bytes) saturated_ = false;
    --plans_open_;
    backlog_.fetch_sub(1, std::memory_order_relaxed);
    ended = r.plan;
  }
  ++retired_seq_;
  idle_cv_.notify_all();
  if (ended && hooks_.plan_done) {
    lk.unlock();
    IfCurrent(ended->epoch, [&] { hooks_.plan_done(); });
    // The hook's idle-notify settle may have found the guest's next submission and held it
    // (InlineOk::kSubmitOnly): this thread submits it now, one wake-up sooner than the
    // submit thread would. Its entries join this thread's queue; nothing recurses.
    if (t_retire_thread && !t_inline && t_held_here) {
      t_held_here = false;
      RunHeld();
    }
    lk.lock();
  }
}

void Executor::Drain() {
  std::unique_lock lk(mu_);
  DrainLocked(lk);
}

void Executor::DrainLocked(std::unique_lock<std::mutex>& lk) {
  const uint64_t target = retire_seq_;
  idle_cv_.wait(lk, [&] { return retired_seq_ >= target; });
}

bool Executor::HostWritePending(std::span<const Extent> touched) const {
  for (const Retiring& r : retiring_)
    for (const Extent& w : r.writes)
      for (const Extent& t : touched)
        if (w.aperture == t.aperture && RangesOverlap(w.addr, w.size, t.addr, t.size)) return true;
  return false;
}

bool Executor::OnExecutorThread() { return t_executor_thread; }
bool Executor::OnRetireThread() { return t_retire_thread; }

void Executor::SubmitLoop() {
  t_executor_thread = true;
  // Stays open across plans while the engine is saturated (ShouldCoalesce); sent before
  // the thread waits for work, takes a task or stops. While it holds work running_ stays
  // set, so a Cancel meanwhile queues its `after` behind it.
  Batch batch;
  std::unique_lock lk(mu_);
  for (;;) {
    if (!batch.Empty() && !ShouldCoalesce(batch, batch.plans.front()->epoch)) {
      lk.unlock();
      // A failure to submit is the batch's plans' (Flush reports it to each); cancelled,
      // nothing of it runs.
      (void)Flush(batch);
      lk.lock();
      continue;
    }
    if (batch.Empty()) {
      running_ = false;
      idle_cv_.notify_all();
    }
    // With a batch open the next item is a plan that joins it (ShouldCoalesce, under this
    // same hold of mu_).
    // Not while a plan is held for RunHeld or completing there: it comes first in ring
    // order, and only one thread at a time adds retire entries.
    cv_.wait(lk, [&] { return stop_ || (!queue_.empty() && !held_ && !inline_running_); });
    if (stop_) return;
    // The wait may have let go of mu_ (a plan held for RunHeld): the queue can have changed
    // meanwhile. A Cancel dropped the plan that was to join the open batch and put its task
    // first, or a new epoch's plan came. What is open is sent first, alone: a plan joins
    // only a batch of its own epoch (a cancelled batch is dropped whole, and with it any
    // later plan's work packed into it, whose fence would still have come).
    if (!batch.Empty() && !ShouldCoalesce(batch, batch.plans.front()->epoch)) continue;
    Item item = std::move(queue_.front());
    queue_.pop_front();
    running_ = true;
    if (item.plan) ++plans_open_;
    lk.unlock();
    if (item.task) {
      Drain();  // after every engine submission in flight when it was queued
      item.task();
    } else {
      // Plans named by a batch that packed nothing (each stopped before its first engine op)
      // are no part of the next submission.
      if (batch.Empty()) batch.plans.clear();
      auto ps = std::make_shared<PlanState>();
      ps->epoch = item.epoch;
      ps->bytes = item.bytes;
      if (depth_ == 1) Drain();  // serial: nothing of the previous plan is still running
      if (!batch.Empty()) counters_.plans_coalesced.fetch_add(1, std::memory_order_relaxed);
      Result<> r = Run(*item.plan, ps, batch);
      if (!r.ok()) Follow(batch, Retiring{.kind = Retiring::Kind::kFailure, .plan = ps, .error = std::move(r).error()});
      item.plan.reset();  // its memory goes before its charge does
      Follow(batch, Retiring{.kind = Retiring::Kind::kPlanEnd, .plan = ps});
    }
    lk.lock();
  }
}

bool Executor::ShouldCoalesce(const Batch& batch, uint64_t epoch) const {
  if (!coalesce_ || stop_ || queue_.empty()) return false;
  const Item& next = queue_.front();
  if (!next.plan || next.epoch != epoch || Cancelled(epoch)) return false;
  // On a scheduled engine (F7) a submission can not be cut once on the device and is
  // another vGPU's wait: plans are packed only up to the shared budget.
  if (batch.cost >= batch.budget) return false;
  // Only while the submission would have to wait for the engine anyway: an idle engine
  // gets the work at once (latency), a busy one gets it in fewer, larger submissions.
  return !(in_flight_ == 0 || (in_flight_ < depth_ && in_flight_cost_ + batch.cost <= kMaxInFlightCost));
}

void Executor::Follow(Batch& batch, Retiring r) {
  if (batch.Empty()) return PushRetire(std::move(r));
  batch.after.push_back(std::move(r));
}

void Executor::RetireLoop() {
  t_executor_thread = true;
  t_retire_thread = true;
  std::unique_lock lk(mu_);
  for (;;) {
    retire_cv_.wait(lk, [&] { return retire_stop_ || !retiring_.empty(); });
    if (retiring_.empty()) return;  // stopping, and everything submitted has retired
    // Retired in place: until it is popped, its host writes still count as pending for
    // the submit thread's hazard check (references into a deque survive push_back).
    Retiring& r = retiring_.front();
    lk.unlock();
    Retire(r);
    lk.lock();
    Retiring done = std::move(r);
    retiring_.pop_front();
    Finished(done, lk);
  }
}

namespace {
bool IsGpuOp(const PlanOp& op) {
  return std::holds_alternative<PlanDispatch>(op) || std::holds_alternative<PlanCopy>(op) ||
         std::holds_alternative<PlanFill>(op);
}
Error CancelledError() { return Error{Errc::kBadState, "cancelled (reset, disconnect or stop)"}; }
}  // namespace

template <class Extent>
static void AppendExtents(const ResolvedRange& r, std::vector<Extent>& out) {
  for (const GttSpan& sp : r.spans) out.push_back({sp.target.aperture, sp.target.page_addr, sp.size.v});
}

Result<> Executor::Run(Plan& plan, const std::shared_ptr<PlanState>& ps, Batch& batch) {
  size_t i = 0;
  while (i < plan.ops.size()) {
    if (Cancelled(ps->epoch)) return CancelledError();
    if (ps->failed.load(std::memory_order_acquire)) return Ok();  // reported by the retire thread
    if (hooks_.may_dma) VG_TRY(hooks_.may_dma());
    if (IsGpuOp(plan.ops[i])) {
      size_t j = i;
      while (j < plan.ops.size() && IsGpuOp(plan.ops[j])) ++j;
      VG_TRY(RunGpuOps(std::span(plan.ops).subspan(i, j - i), ps, batch));
      i = j;
      continue;
    }
    // A host op runs once everything before it has retired; what it writes into guest
    // memory counts as pending until then.
    Retiring r{.kind = Retiring::Kind::kHostOp, .plan = ps, .op = std::move(plan.ops[i++])};
    if (auto* f = std::get_if<PlanFence>(&*r.op)) AppendExtents(f->target, r.writes);
    if (auto* t = std::get_if<PlanTimestamp>(&*r.op)) AppendExtents(t->target, r.writes);
    Follow(batch, std::move(r));
  }
  return Ok();
}

void Executor::HoldUntilTick(const Retiring& r) {
  // It really completed once everything before it had (frontier_ns_) and it had been handed
  // over. Entries that completed before the same tick go out together at that tick: the hold
  // is reckoned from when they completed, not from when this thread got to them.
  const uint64_t real = std::max(frontier_ns_, r.ready_ns);
  frontier_ns_ = real;
  const uint64_t due = (real + granularity_ns_ - 1) / granularity_ns_ * granularity_ns_;
  const std::chrono::steady_clock::time_point deadline{std::chrono::nanoseconds(due)};
  std::unique_lock lk(mu_);
  // A worker thread, never the loop; at most G; Cancel and the destructor cut it short.
  retire_cv_.wait_until(lk, deadline, [&] { return Cancelled(r.plan->epoch) || NowNs() >= due; });
}

void Executor::Retire(Retiring& r) {
  PlanState& ps = *r.plan;
  const uint64_t epoch = ps.epoch;
  // Coarsened time (docs/device-spec.md "Time a guest can read"): whatever this entry shows
  // the guest (fence write and interrupt, TIMESTAMP, LOAD_REG, error report, and through the
  // plan's end DEVICE_IDLE) shows at a tick, so a tenant timing its own completions learns
  // their time only to G, and with it the load of its neighbours on the shared engine.
  if (granularity_ns_ && r.kind != Retiring::Kind::kSubmission) HoldUntilTick(r);
  auto fail = [&](const Error& e) {
    // Only a plan's first failure is reported; the rest of it is skipped.
    if (!ps.failed.exchange(true, std::memory_order_acq_rel)) IfCurrent(epoch, [&] { hooks_.fail(e); });
  };
  switch (r.kind) {
    case Retiring::Kind::kSubmission: {
      Result<> ran = r.token->Wait();
      if (granularity_ns_) {
        const auto at = r.token->DoneAt();
        frontier_ns_ = std::max(frontier_ns_, at ? SteadyNs(*at) : NowNs());
      }
      uint64_t zero_copy = 0, gathered = 0;
      for (const MatRef& m : r.mats) (m->gathered_from ? gathered : zero_copy) += m->range.size.v;
      counters_.engine_submissions.fetch_add(1, std::memory_order_relaxed);
      counters_.bytes_zero_copy.fetch_add(zero_copy, std::memory_order_relaxed);
      counters_.bytes_gathered.fetch_add(gathered, std::memory_order_relaxed);
      if (!ran.ok()) {
        // Every plan with work in the submission failed with it.
        fail(ran.error());
        for (const std::shared_ptr<PlanState>& p : r.also)
          if (!p->failed.exchange(true, std::memory_order_acq_rel)) IfCurrent(p->epoch, [&] { hooks_.fail(ran.error()); });
      } else if (!Cancelled(epoch)) {
        // Cut at the boundary: a cancelled or failed plan writes nothing more to guest memory.
        for (const MatRef& m : r.mats) {
          if (!m->gathered_from || !m->gathered_from->write) continue;
          if (m->plan && m->plan->failed.load(std::memory_order_acquire)) continue;
          if (Result<> w = view_.Write(*m->gathered_from, m->range.buffer->Map()); !w.ok()) {
            PlanState& owner = m->plan ? *m->plan : ps;
            if (!owner.failed.exchange(true, std::memory_order_acq_rel))
              IfCurrent(epoch, [&] { hooks_.fail(w.error()); });
          }
        }
      }
      r.mats.clear();  // pins and gather buffers go now: a Drain() waiter counts on it
      r.token.reset();
      return;
    }
    case Retiring::Kind::kHostOp: {
      if (Cancelled(epoch) || ps.failed.load(std::memory_order_acquire)) return;
      // Bus mastering or power may have changed since the op was queued.
      if (hooks_.may_dma) {
        if (Result<> ok = hooks_.may_dma(); !ok.ok()) return fail(ok.error());
      }
      Result<> res = Ok();
      if (auto* f = std::get_if<PlanFence>(&*r.op)) {
        IfCurrent(epoch, [&] {
          res = view_.Write(f->target, std::as_bytes(std::span(&f->value, 1)),
                            t_inline ? vu::DmaWait::kNever : vu::DmaWait::kMayWait);
          if (res.ok()) hooks_.fence(f->value, f->irq);
        });
        if (!res.ok()) fail(Error{res.code(), fmt::format("FENCE write at {}: {}", f->target.va, res.error().what)});
      } else if (auto* l = std::get_if<PlanLoadReg>(&*r.op)) {
        IfCurrent(epoch, [&] { hooks_.load_reg(l->reg, l->value); });
      } else if (auto* t = std::get_if<PlanTimestamp>(&*r.op)) {
        // A multiple of G: the tick this op was held to (the hold above).
        uint64_t now = NowNs();
        if (granularity_ns_) now = now / granularity_ns_ * granularity_ns_;
        IfCurrent(epoch, [&] {
          res = view_.Write(t->target, std::as_bytes(std::span(&now, 1)),
                            t_inline ? vu::DmaWait::kNever : vu::DmaWait::kMayWait);
        });
        if (!res.ok())
          fail(Error{res.code(), fmt::format("TIMESTAMP write at {}: {}", t->target.va, res.error().what)});
      }
      return;
    }
    case Retiring::Kind::kFailure:
      if (r.error) fail(*r.error);
      return;
    case Retiring::Kind::kPlanEnd:
      if (Cancelled(epoch)) counters_.plans_cancelled.fetch_add(1, std::memory_order_relaxed);
      counters_.plans.fetch_add(1, std::memory_order_relaxed);
      return;
  }
}

Result<Executor::MatRef> Executor::Materialize(const ResolvedRange& r, Batch& batch,
                                               const std::shared_ptr<PlanState>& ps) {
  auto m = std::make_shared<Materialized>();
  AppendExtents(r, m->extents);
  // Bytes a host op or scatter that follows the open batch will write: the engine work
  // that touches them belongs after those writes, so the batch goes first (and Flush's
  // hazard check then orders this work behind them).
  if (BatchWrites(batch, m->extents)) VG_TRY(Flush(batch));
  if (r.spans.size() == 1) {
    const GttSpan& s = r.spans[0];
    // An aperture range is bound in place when the device can bind its offset; one it
    // cannot (a 2-D kernel's rectangle starting mid-row, F10) is gathered like scattered
    // guest memory below, and written back after.
    if (s.target.aperture && aperture_buffer_ &&
        IsAligned(s.target.page_addr, std::max<uint64_t>(4, engine_->Info().min_storage_offset_alignment))) {
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
        auto win = ImportGuestRange(Gpa{base}, ByteSize{kImportWindow}, r.write, t_inline_submit);
        if (win.ok()) {
          m->range = {(*win)->buffer, ByteSize{gpa - base}, r.size};
          m->import = std::move(win).value();
          return m;
        }
      }
      auto imp = ImportGuestRange(Gpa{gpa}, r.size, r.write, t_inline_submit);
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
  // the vGPU's gather bound. The host reads guest memory now, so everything packed or
  // submitted before must have run and retired (its scatters and fence writes landed, its
  // gather buffers freed).
  if (t_inline_submit) return WouldBlockInline("a gather");
  VG_TRY(Flush(batch));
  Drain();
  const uint64_t held = gather_bytes_.load(std::memory_order_acquire);
  VG_ERROR_IF(held + r.size.v > kMaxGatherBytes, Errc::kLimitExceeded,
              "gathering {} scattered bytes at {} would pass the vGPU's {} byte gather bound ({} held)", r.size.v, r.va,
              kMaxGatherBytes, held);
  VG_TRY_ASSIGN(engine::BufferRef buf, engine_->CreateBuffer(r.size));
  m->owner = this;
  m->charged = r.size.v;
  gather_bytes_.fetch_add(r.size.v, std::memory_order_acq_rel);
  VG_TRY(view_.Read(r, buf->Map()));
  m->range = engine::Whole(buf);
  m->gathered_from = r;
  m->plan = ps;
  return m;
}

bool Executor::BatchWrites(const Batch& batch, std::span<const Extent> touched) {
  auto hits = [&](std::span<const Extent> writes) {
    for (const Extent& w : writes)
      for (const Extent& t : touched)
        if (w.aperture == t.aperture && RangesOverlap(w.addr, w.size, t.addr, t.size)) return true;
    return false;
  };
  for (const Retiring& a : batch.after)
    if (hits(a.writes)) return true;
  for (const MatRef& m : batch.mats)
    if (m->gathered_from && m->gathered_from->write && hits(m->extents)) return true;
  return false;
}

Result<> Executor::Flush(Batch& batch) {
  if (t_inline_submit && !t_inline_flush_ok) return WouldBlockInline("more than one engine submission");
  std::vector<Retiring> after = std::move(batch.after);
  batch.after.clear();
  Result<> sent = Submit(batch);
  // The entries that followed the batch in plan order follow its submission (or its
  // plans' failures) now, whatever became of it.
  for (Retiring& r : after) PushRetire(std::move(r));
  return sent;
}

Result<> Executor::Submit(Batch& batch) {
  std::vector<std::shared_ptr<PlanState>> plans = std::move(batch.plans);
  batch.plans.clear();
  if (batch.sub.ops.empty()) {
    batch.mats.clear();
    batch.cost = 0;
    return Ok();
  }
  Retiring r{.kind = Retiring::Kind::kSubmission, .plan = plans.front(), .mats = std::move(batch.mats),
             .cost = batch.cost, .also = {plans.begin() + 1, plans.end()}};
  engine::Submission sub = std::move(batch.sub);
  sub.cost = batch.cost;
  batch.sub = {};
  batch.mats.clear();
  batch.cost = 0;
  // Hazards: the engine must see every host write that comes before it in the plan order,
  // and the host must not read (gather, staging) what the engine may still be writing.
  std::vector<Extent> touched;
  bool host_copies = false;  // the host copies guest bytes at Submit (staging) or scatters them after
  for (const MatRef& m : r.mats) {
    touched.insert(touched.end(), m->extents.begin(), m->extents.end());
    if (m->range.buffer->path() == engine::MemoryPath::kStaged) host_copies = true;
    if (m->gathered_from) {
      host_copies = true;
      if (m->gathered_from->write) r.writes.insert(r.writes.end(), m->extents.begin(), m->extents.end());
    }
  }
  {
    std::unique_lock lk(mu_);
    if (!retiring_.empty() && (host_copies || HostWritePending(touched))) {
      counters_.drains.fetch_add(1, std::memory_order_relaxed);
      DrainLocked(lk);
    }
    // Depth and cost in flight: small work pipelines deep, dear work about one piece at a time.
    idle_cv_.wait(lk, [&] {
      return in_flight_ == 0 || (in_flight_ < depth_ && in_flight_cost_ + r.cost <= kMaxInFlightCost);
    });
  }
  // Cancelled: nothing of it runs, and no hook of its plans will.
  if (Cancelled(r.plan->epoch)) return CancelledError();
  Result<engine::TokenRef> token = engine_->Submit(std::move(sub));
  if (!token.ok()) {
    // Nothing of it runs: each plan with work in it fails, before any host op of theirs.
    for (const std::shared_ptr<PlanState>& p : plans)
      PushRetire(Retiring{.kind = Retiring::Kind::kFailure, .plan = p, .error = token.error()});
    return std::move(token).error();
  }
  r.token = std::move(token).value();
  PushRetire(std::move(r));
  return Ok();
}

Result<> Executor::RunGpuOps(std::span<PlanOp> ops, const std::shared_ptr<PlanState>& ps, Batch& batch) {
  const uint64_t epoch = ps->epoch;
  VG_ERROR_IF(!engine_, Errc::kUnsupported, "this vGPU has no engine");
  // A transfer of `size` bytes in chunks: `add(offset, n)` packs one chunk.
  auto chunks = [&](uint64_t size, auto&& add) -> Result<> {
    const uint64_t chunk = std::min(kTransferChunkBytes, batch.budget);
    for (uint64_t off = 0; off < size; off += chunk) {
      if (Cancelled(epoch)) return CancelledError();
      uint64_t n = std::min(chunk, size - off);
      if (batch.Full(n)) VG_TRY(Flush(batch));
      VG_TRY(add(off, n));
      batch.cost += n;
    }
    return Ok();
  };
  for (PlanOp& op : ops) {
    if (Cancelled(epoch)) return CancelledError();
    // Shared engine (F7): pieces and submissions of about a millisecond, so a preempted
    // vGPU yields within one; alone, larger submissions cost fewer round trips.
    batch.budget = SubmissionBudget(engine_->PrefersSmallSubmissions(), engine_->Info().parallel_groups);
    if (auto* d = std::get_if<PlanDispatch>(&op)) {
      VG_TRY_ASSIGN(DispatchCut cut, DispatchCut::Make(d->kernel, d->groups, d->push, batch.budget,
                                                       engine_->Info().parallel_groups));
      std::vector<MatRef> mats;
      std::vector<engine::BufferRange> bindings;
      for (const ResolvedRange& b : d->bindings) {
        VG_TRY_ASSIGN(MatRef m, Materialize(b, batch, ps));
        bindings.push_back(m->range);
        mats.push_back(std::move(m));
      }
      // Held by the batch only once a piece is packed (below): a plan named in an empty batch
      // (cancelled before its first piece) would head the next plan's work, and a batch whose
      // first plan is cancelled is dropped whole.
      bool in_batch = false;  // this dispatch's bindings are held by the batch being packed
      for (uint64_t i = 0; i < cut.pieces(); ++i) {
        if (Cancelled(epoch)) return CancelledError();
        if (batch.Full(cut.piece_cost())) {
          VG_TRY(Flush(batch));
          in_batch = false;
        }
        if (!in_batch) {
          batch.mats.insert(batch.mats.end(), mats.begin(), mats.end());
          batch.Holds(ps);
        }
        in_batch = true;
        DispatchPiece p = cut.Piece(i);
        batch.sub.Dispatch(d->kernel, p.groups, bindings, d->push, p.base);
        batch.cost += cut.piece_cost();
      }
    } else if (auto* c = std::get_if<PlanCopy>(&op)) {
      VG_TRY(chunks(c->src.size.v, [&](uint64_t off, uint64_t n) -> Result<> {
        VG_TRY_ASSIGN(MatRef src, Materialize(SliceRange(c->src, off, n), batch, ps));
        VG_TRY_ASSIGN(MatRef dst, Materialize(SliceRange(c->dst, off, n), batch, ps));
        batch.Holds(ps);
        batch.sub.Copy(src->range.buffer, src->range.offset, dst->range.buffer, dst->range.offset, ByteSize{n});
        batch.mats.push_back(std::move(src));
        batch.mats.push_back(std::move(dst));
        return Ok();
      }));
    } else if (auto* f = std::get_if<PlanFill>(&op)) {
      VG_TRY(chunks(f->dst.size.v, [&](uint64_t off, uint64_t n) -> Result<> {
        VG_TRY_ASSIGN(MatRef dst, Materialize(SliceRange(f->dst, off, n), batch, ps));
        batch.Holds(ps);
        batch.sub.Fill(dst->range.buffer, dst->range.offset, ByteSize{n}, f->value);
        batch.mats.push_back(std::move(dst));
        return Ok();
      }));
    }
  }
  // Left open: the submit thread sends it at the plan's end unless the next plan joins it.
  return Ok();
}

}  // namespace vg::mediator
