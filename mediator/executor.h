#pragma once
// Runs audited Plans for one vGPU on the engine, in order. Only Plans reach it: every
// address in them was translated and checked by the auditor. Guest memory is pinned for the
// life of the work that uses it, so a DMA_UNMAP of that memory waits for the work (the
// pin -> map -> unmap -> invalidate contract).
//
// Pipelined: a submit thread materializes and submits plan N+1's work while plan N's runs
// on the engine; a retire thread completes what was submitted strictly in order (waits for
// each engine submission, scatters gathered ranges back, then runs the host ops that
// followed it: FENCE, LOAD_REG, TIMESTAMP), so fences complete in order and exactly once.
// Whatever the host writes into guest memory happens-before any later engine access of the
// same bytes: a submission that touches bytes a pending host op or scatter will write, or
// that gathers or stages guest memory, first waits for everything before it to retire.

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <functional>
#include <mutex>
#include <optional>
#include <span>
#include <thread>

#include "abi/device.h"
#include "base/base.h"
#include "engine/engine.h"
#include "mediator/auditor.h"
#include "mediator/work_split.h"
#include "vfio_user/dma.h"

namespace vg::mediator {

// Copies between a resolved GPU VA range and service memory, span by span. The only way
// the mediator touches guest memory after an audit.
class GuestView {
 public:
  // Reads guest memory outside the aperture; the default reads the DmaSpace and may wait on
  // the client (worker threads only). The event loop's view reads through a GuestFetch.
  using GuestReader = std::function<Result<>(Gpa, std::span<std::byte>)>;
  GuestView(const vfio_user::DmaSpace& dma, std::span<std::byte> aperture, GuestReader reader = {})
      : dma_(dma), aperture_(aperture), reader_(std::move(reader)) {}
  Result<> Read(const ResolvedRange& r, std::span<std::byte> out) const;
  Result<> Write(const ResolvedRange& r, std::span<const std::byte> in,
                 vfio_user::DmaWait wait = vfio_user::DmaWait::kMayWait) const;

 private:
  const vfio_user::DmaSpace& dma_;
  std::span<std::byte> aperture_;
  GuestReader reader_;
};

struct ExecHooks {
  std::function<void(uint64_t value, bool irq)> fence;          // publish + fence vector
  std::function<void(uint32_t reg, uint32_t value)> load_reg;   // whitelisted, audited
  std::function<void(const Error& e)> fail;                     // error report + error vector
  // Asked before each engine submission and each host op: the device may have lost Bus
  // Master Enable or entered D3hot since the plan was queued (PCI: no DMA then). An error
  // abandons the rest of the plan and is reported through `fail`. Null: always allowed.
  std::function<Result<>()> may_dma;
  // After each plan has ended (ran or failed) and stopped counting against the queue, on
  // the retire thread, under the hook lock like the other hooks (not for a cancelled plan;
  // must not call Cancel). Null: nothing.
  std::function<void()> plan_done;
};

// Engine submissions of one vGPU in flight at once, at most.
inline constexpr uint32_t kMaxExecutorDepth = 16;
// Cost (work_split.h units) in flight at once when more than one submission is: small work
// pipelines deep, while dear work goes one submission at a time, so what still runs after
// a cancel (and holds guest memory a DMA_UNMAP waits for) is what the serial executor left
// running: one submission of at most kSubmissionCostBudget, or one unsplittable piece.
inline constexpr uint64_t kMaxInFlightCost = kSubmissionCostBudget;

struct ExecOptions {
  // 1: serial (each plan starts once the previous one has retired; the study's ablation).
  uint32_t depth = 4;
  // While the engine is saturated (depth or cost in flight reached), the submit thread packs
  // the next queued plans' work into the engine submission it holds instead of waiting, and
  // their host ops (FENCE, LOAD_REG, TIMESTAMP) follow that submission in order: a stream
  // of small plans costs one engine round trip per batch, not per plan. Off: one plan's
  // work never shares an engine submission with another's (the study's ablation).
  bool coalesce = true;
  // G: what a plan makes visible to the guest when it completes (FENCE and its interrupt,
  // TIMESTAMP, LOAD_REG, a failure report, the plan's end) is held until the next multiple
  // of G of CLOCK_MONOTONIC, and TIMESTAMP writes multiples of G. 0: off (the study).
  // Clamped to abi::cmd::kMaxTimeGranularityNs.
  uint64_t time_granularity_ns = abi::cmd::kDefaultTimeGranularityNs;
  // A plan of host ops only (FENCE, LOAD_REG, TIMESTAMP; at most kMaxInlineHostOps) that
  // writes only fd-backed guest memory or the aperture, queued while the executor is idle
  // (nothing queued, running or retiring), completes on the thread that queued it
  // (Enqueue with InlineOk::kYes, then RunHeld) instead of waking the submit thread: a
  // fence-only submission costs no thread hop. Never with time coarsening (G > 0: the
  // hold is the retire thread's). Off: every plan goes through the submit thread (the
  // study's ablation).
  bool inline_complete = true;
  // With inline_complete, also a plan that starts with a little engine work (at most
  // kMaxInlineGpuOps DISPATCH/COPY/FILL, then host ops only) into the aperture or guest
  // memory already imported, queued while the executor is idle: the caller materializes it
  // and hands it to the engine (Engine::Submit never waits), and the retire thread completes
  // it as usual. Saves the loop -> submit thread hop of a small submission; allowed with
  // time coarsening (nothing completes on the caller's thread). Anything that would make
  // the caller wait (an import to make, a gather, a second engine submission) sends the
  // untouched plan to the submit thread instead.
  bool inline_submit = true;
};

// Host ops of a plan completed inline, at most: a longer one goes through the threads.
inline constexpr size_t kMaxInlineHostOps = 4;
// Engine commands of a plan submitted inline (ExecOptions::inline_submit), at most.
inline constexpr size_t kMaxInlineGpuOps = 4;

// Whether the caller of Enqueue may complete the plan itself (ExecOptions::inline_complete):
// it then holds no lock a hook takes by the time it calls RunHeld, and does call it.
// kSubmitOnly: only a plan that would be submitted inline (ExecOptions::inline_submit) is
// held; the retire thread asks so from a plan_done hook, and runs it once the hook returns.
enum class InlineOk : uint8_t { kNo, kYes, kSubmitOnly };

struct ExecCounters {
  uint64_t plans = 0;
  uint64_t import_hits = 0;    // guest ranges found already imported
  uint64_t import_misses = 0;  // guest ranges imported (VK_EXT_external_memory_host)
  uint64_t engine_submissions = 0;
  uint64_t bytes_zero_copy = 0;  // guest bytes the engine used in place
  uint64_t bytes_gathered = 0;   // guest bytes copied to or from engine buffers
  uint64_t plans_cancelled = 0;  // dropped from the queue or stopped between submissions
  uint64_t drains = 0;           // submissions that waited for earlier work to retire (hazards)
  uint64_t max_in_flight = 0;    // most engine submissions in flight at once
  uint64_t plans_coalesced = 0;  // plans whose work joined an engine submission already holding another's
  uint64_t plans_inline = 0;     // plans completed on the thread that queued them (inline_complete)
  uint64_t plans_inline_submitted = 0;  // plans whose engine work that thread submitted (inline_submit)
};

// Runs audited Plans in engine submissions of bounded cost (mediator/work_split.h): a
// DISPATCH is cut into group ranges, a COPY or FILL into chunks, and cancellation is
// checked between submissions. Nothing here makes the caller wait for the engine.
class Executor {
 public:
  Executor(engine::Engine* engine, const vfio_user::DmaSpace& dma, std::span<std::byte> aperture,
           engine::BufferRef aperture_buffer, ExecHooks hooks, ExecOptions options = {});
  // Waits for the engine submissions in flight (bounded by kMaxInFlightCost plus one piece).
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // kLimitExceeded, nothing queued, past kMaxQueuedPlans plans or kMaxQueuedPlanBytes
  // bytes queued or running on this vGPU (charged until the plan has finished running).
  Result<> Enqueue(Plan plan);
  // The same; with InlineOk::kYes a plan that may complete inline (ExecOptions::
  // inline_complete) is held instead of handed to the submit thread: true, and the caller
  // must call RunHeld() once it holds no lock a hook takes. Nothing queued later, on any
  // thread, runs before the held plan has (the submit thread waits for it).
  Result<bool> Enqueue(Plan plan, InlineOk inline_ok);
  // Completes the held plan, if any, on this thread: its host ops and end run here as the
  // retire thread would run them (same hooks, same epoch checks under the hook lock, the
  // same pinned writes), then the submit thread may take what was queued behind it. A plan
  // cancelled meanwhile is gone (nothing runs); one whose memory is no longer all fd-backed
  // goes to the submit thread. No-op when nothing is held. True when it completed a plan
  // here: its plan_done hook may have held the next one (InlineOk::kYes from that hook, on
  // this thread), so the caller calls it again.
  bool RunHeld();
  // Whether the calling thread is an executor's submit or retire thread: a vGPU's own
  // worker threads, which may write its interrupt eventfd themselves (bounded, see
  // IrqSet::TriggerNow) instead of waking the signaller thread.
  static bool OnExecutorThread();
  // The retire thread, where a plan_done hook may hold a plan with InlineOk::kSubmitOnly.
  static bool OnRetireThread();
  // Whether a new submission may be audited at all: kLimitExceeded while the queue is full
  // by count, or since a submission was refused for bytes until a queued plan has finished.
  // The loop checks it before auditing, so a flood of doorbells against a full queue costs
  // no audit (span building) each.
  Result<> Admit() const;
  // Forgets cached imports of guest memory overlapping [gpa, gpa+size), so a DMA_UNMAP of
  // it waits only for work actually in flight, not for the cache.
  void DropImports(Gpa gpa, ByteSize size);
  // Drops the queued plans and stops the running one at its next submission boundary;
  // no hook (fence, LOAD_REG, failure) of a cancelled plan runs once this returns. Never
  // waits for the engine. Returns true when an engine submission may still be running:
  // then `after`, if given, runs on the executor thread once it has ended, before any plan
  // queued later (a reset's aperture scrub). False: nothing runs; `after` is not called.
  // Must not be called with a lock a hook takes.
  bool Cancel(std::function<void()> after = {});
  // Waits until every plan queued so far has run and retired.
  void WaitIdle();
  // No plan queued, running or retiring (a snapshot; true inside the plan_done hook of the
  // last plan).
  bool Idle() const;
  // Plans queued or running (not yet retired): lock-free, for the scheduler's gate, which
  // asks it under its own lock (docs/management.md "Scheduling").
  bool HasBacklog() const { return backlog_.load(std::memory_order_relaxed) > 0; }
  // Lock-free snapshot: every counter is an atomic written by the executor thread only.
  ExecCounters Counters() const;

 private:
  struct Materialized;
  using MatRef = std::shared_ptr<Materialized>;
  struct Batch;
  struct PlanState;
  // A guest range imported into the engine, kept for the next submissions that use the
  // same range (a guest reuses its buffers). The Pin keeps the guest memory mapped.
  struct Import {
    vfio_user::Pin pin;
    engine::BufferRef buffer;
  };
  struct ImportKey {
    uint64_t gpa, size;
    bool write;
    auto operator<=>(const ImportKey&) const = default;
  };
  struct Item {
    std::optional<Plan> plan;    // a plan, or
    std::function<void()> task;  // work queued by Cancel(after)
    uint64_t bytes = 0;          // charged against kMaxQueuedPlanBytes
    uint64_t epoch = 0;
  };
  // Bytes of guest memory (guest-physical) or of the aperture, for hazard checks.
  struct Extent {
    bool aperture;
    uint64_t addr, size;
  };
  // One entry of the in-order completion queue (the retire thread's).
  struct Retiring {
    enum class Kind : uint8_t { kSubmission, kHostOp, kFailure, kPlanEnd };
    Kind kind;
    std::shared_ptr<PlanState> plan;
    engine::TokenRef token;          // kSubmission
    std::vector<MatRef> mats;        // kSubmission: what it holds until it has run
    uint64_t cost = 0;               // kSubmission
    // kSubmission: every other plan with work in it (coalesced); an engine failure fails each.
    std::vector<std::shared_ptr<PlanState>> also;
    std::optional<PlanOp> op;        // kHostOp
    std::optional<Error> error;      // kFailure
    std::vector<Extent> writes;      // bytes the host writes when this retires (hazards)
    uint64_t ready_ns = 0;           // not kSubmission, coarsened time: when it was handed over
  };
  struct Counters_ {
    std::atomic<uint64_t> plans{0}, import_hits{0}, import_misses{0}, engine_submissions{0}, bytes_zero_copy{0},
        bytes_gathered{0}, plans_cancelled{0}, drains{0}, max_in_flight{0}, plans_coalesced{0}, plans_inline{0},
        plans_inline_submitted{0};
  };
  static constexpr size_t kMaxImports = 64;
  static constexpr uint64_t kImportWindow = 2ull << 20;
  // `hits_only`: a range not imported yet is kWouldBlock (inline submission: no import on
  // the caller's thread).
  Result<std::shared_ptr<Import>> ImportGuestRange(Gpa gpa, ByteSize size, bool write, bool hits_only = false);
  void SubmitLoop();
  void RetireLoop();
  void Retire(Retiring& r);
  // Packs the plan's work into `batch` (which may hold earlier plans' work, and is left
  // open for the next plan); its host ops and end follow the batch's submission.
  Result<> Run(Plan& plan, const std::shared_ptr<PlanState>& ps, Batch& batch);
  Result<> RunGpuOps(std::span<PlanOp> ops, const std::shared_ptr<PlanState>& ps, Batch& batch);
  // An entry in plan order: straight to the retire queue, or after the open batch's
  // submission when that holds work.
  void Follow(Batch& batch, Retiring r);
  // Whether the submit thread should pack the next queued plan into `batch` rather than
  // submit it now: the engine is saturated (Flush would wait) and a plan of the same epoch
  // is next. mu_ held.
  bool ShouldCoalesce(const Batch& batch, uint64_t epoch) const;
  // Coarsened time: holds a non-submission entry until its tick (retire thread only).
  void HoldUntilTick(const Retiring& r);
  Result<MatRef> Materialize(const ResolvedRange& r, Batch& batch, const std::shared_ptr<PlanState>& ps);
  // Submits what the batch holds (waiting for depth, cost and hazards), then hands the
  // entries that followed it to the retire thread.
  Result<> Flush(Batch& batch);
  Result<> Submit(Batch& batch);
  // Whether `touched` overlaps what is written once the batch has run (its following host
  // ops, its scatters).
  static bool BatchWrites(const Batch& batch, std::span<const Extent> touched);
  // Hands an entry to the retire thread (in order).
  void PushRetire(Retiring r);
  // The bookkeeping after an entry has retired (counts, charges, the plan_done hook); mu_
  // held on entry and on return.
  void Finished(const Retiring& r, std::unique_lock<std::mutex>& lk);
  // Waits until everything handed to the retire thread so far has retired.
  void Drain();
  void DrainLocked(std::unique_lock<std::mutex>& lk);  // the same, mu_ held
  bool HostWritePending(std::span<const Extent> touched) const;  // mu_
  bool Cancelled(uint64_t epoch) const { return epoch_.load(std::memory_order_acquire) != epoch; }
  // Whether `plan` may complete inline (kComplete: host ops only, few, into fd-backed guest
  // memory or the aperture) or be submitted inline (kSubmit: a few engine commands on such
  // memory, then such host ops). Asks the DmaSpace, whose lock is a leaf: callable under mu_.
  enum class InlineKind : uint8_t { kNo, kComplete, kSubmit };
  InlineKind Inlinable(const Plan& plan) const;
  // Runs `fn` (a hook and the guest write that goes with it) unless `epoch` was cancelled.
  template <class Fn>
  void IfCurrent(uint64_t epoch, Fn&& fn);

  engine::Engine* engine_;
  const vfio_user::DmaSpace& dma_;
  GuestView view_;
  std::span<std::byte> aperture_;
  engine::BufferRef aperture_buffer_;
  ExecHooks hooks_;
  const uint32_t depth_;
  const bool coalesce_;
  const bool inline_;  // inline_complete, and G == 0
  const bool inline_submit_;  // inline_complete and inline_submit
  const uint64_t granularity_ns_;  // G; 0: time is not coarsened
  // Coarsened time, retire thread only: the instant by which everything retired so far had
  // really completed (engine completion stamps, hand-over times), in steady_clock ns.
  uint64_t frontier_ns_ = 0;

  // Order: hook_mu_ before any lock a hook takes; mu_ and imports_mu_ are leaves.
  std::mutex hook_mu_;
  std::atomic<uint64_t> epoch_{0};  // bumped under hook_mu_ by Cancel
  mutable std::mutex mu_;
  std::condition_variable cv_;        // submit thread: queue_ or stop_
  std::condition_variable retire_cv_; // retire thread: retiring_ or stop_
  std::condition_variable idle_cv_;   // progress of the retire thread, and idleness
  std::deque<Item> queue_;
  std::deque<Retiring> retiring_;   // submitted, not yet retired, in order (mu_)
  uint64_t retire_seq_ = 0;         // entries handed to the retire thread (mu_)
  uint64_t retired_seq_ = 0;        // entries retired (mu_)
  uint32_t in_flight_ = 0;          // engine submissions not yet retired (mu_)
  uint64_t in_flight_cost_ = 0;     // their cost (mu_)
  uint32_t plans_open_ = 0;         // plans taken by the submit thread, not yet ended (mu_)
  std::atomic<uint32_t> backlog_{0};  // plans queued + open; written under mu_, read anywhere
  uint64_t charged_bytes_ = 0;  // queued + running plans (mu_)
  bool saturated_ = false;      // a submission was refused for bytes; cleared as plans finish (mu_)
  bool running_ = false;        // the submit thread, or RunHeld, holds an item (mu_)
  // A plan held for RunHeld (Enqueue with InlineOk::kYes), counted as queued; or RunHeld
  // running it. While either is set the submit thread takes nothing: only one thread adds
  // retire entries, and nothing queued behind the plan runs before it (mu_).
  std::optional<Item> held_;
  bool inline_running_ = false;
  bool stop_ = false;
  bool retire_stop_ = false;
  std::atomic<uint64_t> gather_bytes_{0};  // engine buffers gathering guest ranges
  Counters_ counters_;
  std::mutex imports_mu_;
  std::map<ImportKey, std::shared_ptr<Import>> imports_;
  std::thread retire_thread_;
  std::thread thread_;
};

}  // namespace vg::mediator
