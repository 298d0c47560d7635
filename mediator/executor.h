#pragma once
// Runs audited Plans for one vGPU on the engine, in order, on its own thread. Only Plans
// reach it: every address in them was translated and checked by the auditor. Guest memory
// is pinned for the life of the work that uses it, so a DMA_UNMAP of that memory waits for
// the work (the pin -> map -> unmap -> invalidate contract).

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <functional>
#include <mutex>
#include <span>
#include <thread>

#include "base/base.h"
#include "engine/engine.h"
#include "mediator/auditor.h"
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
};

struct ExecCounters {
  uint64_t plans = 0;
  uint64_t import_hits = 0;    // guest ranges found already imported
  uint64_t import_misses = 0;  // guest ranges imported (VK_EXT_external_memory_host)
  uint64_t engine_submissions = 0;
  uint64_t bytes_zero_copy = 0;  // guest bytes the engine used in place
  uint64_t bytes_gathered = 0;   // guest bytes copied to or from engine buffers
};

class Executor {
 public:
  Executor(engine::Engine* engine, const vfio_user::DmaSpace& dma, std::span<std::byte> aperture,
           engine::BufferRef aperture_buffer, ExecHooks hooks);
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  void Enqueue(Plan plan);
  // Forgets cached imports of guest memory overlapping [gpa, gpa+size), so a DMA_UNMAP of
  // it waits only for work actually in flight, not for the cache.
  void DropImports(Gpa gpa, ByteSize size);
  // Drops queued plans and waits for the one running, if any (reset, teardown).
  void CancelAndDrain();
  // Waits until every plan queued so far has run.
  void WaitIdle();
  ExecCounters Counters() const;

 private:
  struct Materialized;
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
  static constexpr size_t kMaxImports = 64;
  static constexpr uint64_t kImportWindow = 2ull << 20;
  Result<std::shared_ptr<Import>> ImportGuestRange(Gpa gpa, ByteSize size, bool write);
  void Loop();
  Result<> Run(Plan& plan);
  Result<> RunGpuOps(std::span<PlanOp> ops);
  Result<Materialized> Materialize(const ResolvedRange& r);

  engine::Engine* engine_;
  const vfio_user::DmaSpace& dma_;
  GuestView view_;
  std::span<std::byte> aperture_;
  engine::BufferRef aperture_buffer_;
  ExecHooks hooks_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::condition_variable idle_cv_;
  std::deque<Plan> queue_;
  bool running_ = false;
  bool stop_ = false;
  ExecCounters counters_;
  std::mutex imports_mu_;
  std::map<ImportKey, std::shared_ptr<Import>> imports_;
  std::thread thread_;
};

}  // namespace vg::mediator
