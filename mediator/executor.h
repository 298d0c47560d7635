#pragma once
// Runs audited Plans for one vGPU on the engine, in order, on its own thread. Only Plans
// reach it: every address in them was translated and checked by the auditor. Guest memory
// is pinned for the life of the work that uses it, so a DMA_UNMAP of that memory waits for
// the work (the pin -> map -> unmap -> invalidate contract).

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
  Result<> Write(const ResolvedRange& r, std::span<const std::byte> in) const;

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
  // Called once each plan has finished (ran, failed, or was cancelled after it started) and
  // its slot and bytes are released, on the executor thread with no executor lock held, so
  // it may Enqueue. The device uses it to re-read the guest's tail shadow when it runs out of
  // work (idle notify, docs/device-spec.md). Not called for plans dropped from the queue by
  // Cancel, nor for Cancel's tasks. Null: nothing to call.
  std::function<void()> plan_done;
};

struct ExecCounters {
  uint64_t plans = 0;
  uint64_t import_hits = 0;    // guest ranges found already imported
  uint64_t import_misses = 0;  // guest ranges imported (VK_EXT_external_memory_host)
  uint64_t engine_submissions = 0;
  uint64_t bytes_zero_copy = 0;  // guest bytes the engine used in place
  uint64_t bytes_gathered = 0;   // guest bytes copied to or from engine buffers
  uint64_t plans_cancelled = 0;  // dropped from the queue or stopped between submissions
};

// Runs audited Plans in engine submissions of bounded cost (mediator/work_split.h): a
// DISPATCH is cut into group ranges, a COPY or FILL into chunks, and cancellation is
// checked between submissions. Nothing here makes the caller wait for the engine.
class Executor {
 public:
  Executor(engine::Engine* engine, const vfio_user::DmaSpace& dma, std::span<std::byte> aperture,
           engine::BufferRef aperture_buffer, ExecHooks hooks);
  // Waits for at most the one engine submission in flight (bounded: docs/device-spec.md).
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // kLimitExceeded, nothing queued, past kMaxQueuedPlans plans or kMaxQueuedPlanBytes
  // bytes queued or running on this vGPU (charged until the plan has finished running).
  Result<> Enqueue(Plan plan);
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
  // Waits until every plan queued so far has run.
  void WaitIdle();
  // Lock-free snapshot: every counter is an atomic written by the executor thread only.
  ExecCounters Counters() const;

 private:
  struct Materialized;
  using MatRef = std::shared_ptr<Materialized>;
  struct Batch;
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
  struct Counters_ {
    std::atomic<uint64_t> plans{0}, import_hits{0}, import_misses{0}, engine_submissions{0}, bytes_zero_copy{0},
        bytes_gathered{0}, plans_cancelled{0};
  };
  static constexpr size_t kMaxImports = 64;
  static constexpr uint64_t kImportWindow = 2ull << 20;
  Result<std::shared_ptr<Import>> ImportGuestRange(Gpa gpa, ByteSize size, bool write);
  void Loop();
  Result<> Run(Plan& plan, uint64_t epoch);
  Result<> RunGpuOps(std::span<PlanOp> ops, uint64_t epoch);
  Result<MatRef> Materialize(const ResolvedRange& r, Batch& batch, uint64_t epoch);
  Result<> Flush(Batch& batch, uint64_t epoch);
  bool Cancelled(uint64_t epoch) const { return epoch_.load(std::memory_order_acquire) != epoch; }
  // Runs `fn` (a hook and the guest write that goes with it) unless `epoch` was cancelled.
  template <class Fn>
  void IfCurrent(uint64_t epoch, Fn&& fn);

  engine::Engine* engine_;
  const vfio_user::DmaSpace& dma_;
  GuestView view_;
  std::span<std::byte> aperture_;
  engine::BufferRef aperture_buffer_;
  ExecHooks hooks_;

  // Order: hook_mu_ before any lock a hook takes; mu_ and imports_mu_ are leaves.
  std::mutex hook_mu_;
  std::atomic<uint64_t> epoch_{0};  // bumped under hook_mu_ by Cancel
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::condition_variable idle_cv_;
  std::deque<Item> queue_;
  uint64_t charged_bytes_ = 0;  // queued + running plans (mu_)
  bool saturated_ = false;      // a submission was refused for bytes; cleared as plans finish (mu_)
  bool running_ = false;
  bool stop_ = false;
  uint64_t gather_bytes_ = 0;   // engine buffers gathering guest ranges (executor thread only)
  Counters_ counters_;
  std::mutex imports_mu_;
  std::map<ImportKey, std::shared_ptr<Import>> imports_;
  std::thread thread_;
};

}  // namespace vg::mediator
