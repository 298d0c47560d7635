#pragma once
// Public header of mediator/: one vGPU as a vfio-user device model. Device state lives
// here, apart from the transport (vfio_user/) and from the daemon that wires the two.

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "base/base.h"
#include "engine/engine.h"
#include "abi/device.h"
#include "mediator/fault_monitor.h"
#include "vfio_user/device.h"
#include "vfio_user/dma.h"

namespace vg::mediator {

struct VgpuConfig {
  Uuid uuid;
  std::string type_name = "vgpud-small";
  uint64_t aperture_size = 64ull << 20;  // power of two, >= 4 KiB
  uint32_t gtt_entries = 16384;          // <= abi::kGttMaxEntries
  // Runs audited work; shared by every vGPU of the daemon. Null: commands that need the
  // GPU fail with kUnsupported (device-model tests).
  engine::Engine* engine = nullptr;
  // What the client may map into the daemon (docs/device-spec.md, "Guest memory: bounds and
  // blocking").
  vfio_user::DmaLimits dma_limits;
  // Engine submissions of this vGPU that may be in flight at once (1: each plan's work is
  // submitted only once the previous submission has completed, the serial executor the
  // study keeps as an ablation). Clamped to [1, kMaxExecutorDepth].
  uint32_t executor_depth = 4;
  // Plans queued while the engine is saturated share engine submissions (ExecOptions).
  bool executor_coalesce = true;
  // A host-op-only plan queued while the executor is idle completes on the loop, and a plan
  // with a little engine work on imported memory is submitted there: no thread hop
  // (ExecOptions::inline_complete and inline_submit; vgpud --no-inline-complete turns both off).
  bool executor_inline = true;
  // The host's time granularity G (vgpud --time-granularity-us): completions become visible
  // to the guest (fence, fence interrupt, DEVICE_IDLE) at multiples of G of CLOCK_MONOTONIC,
  // and TIMESTAMP writes multiples of G. 0: off. At most abi::cmd::kMaxTimeGranularityNs.
  uint64_t time_granularity_ns = abi::cmd::kDefaultTimeGranularityNs;
  // F7: when this vGPU is throttled and quarantined for faults (docs/management.md, "Fault
  // health"). The worker shares the monitor with its remoting server (Vgpu::faults()).
  FaultPolicy faults;
  // Asks the daemon's loop to call OnThrottleTimer() once this long has passed: a throttled
  // vGPU's doorbell waits for its turn on a timer, never in a sleep. Called from any thread,
  // with the vGPU's lock held: it must only arm the timer. Null (tests without a loop):
  // a throttled vGPU's ring passes are not deferred.
  std::function<void(std::chrono::nanoseconds)> throttle_timer;
  // F10: starts (true) or stops the vGPU's frame clock: the daemon's loop then calls
  // OnFrameTick() every 1/abi::display::kFrameHz s. Called with the vGPU's lock held: it must
  // only arm or disarm a timer. Null (tests without a loop): call OnFrameTick() by hand.
  std::function<void(bool run)> frame_clock;
  // F10 frame pacing (docs/device-spec.md §Scan-out, "Frame pacing"): commits presented per
  // second at most, 0: no limit but the frame clock. 0..kMaxFrameLimit; SetFrameLimit changes it.
  uint32_t frame_limit = 0;
};

// A limit above the frame clock could never bind (a commit takes effect at a frame boundary):
// refused rather than accepted and meaningless.
inline constexpr uint32_t kMaxFrameLimit = abi::display::kFrameHz;

// The frame being scanned out, copied out of the aperture (rows packed: width × bytes per
// pixel each). Guest-controlled memory: this is a copy, checked bounds, taken under the lock.
struct ScanoutFrame {
  uint32_t width = 0, height = 0, format = 0;
  uint64_t flips = 0;  // commits that had taken effect when it was copied
  std::vector<uint8_t> pixels;
};

struct ErrorReport {
  uint32_t code = 0;  // Errc value
  uint32_t source = abi::kErrSourceNone;
  uint64_t addr = 0;
  uint32_t info = 0;
  uint32_t count = 0;
};

// Everything a guest can observe through registers, plus the config space and GTT:
// what Snapshot() captures and Restore() puts back (crosvm's Suspendable).
struct DeviceSnapshot {
  std::vector<uint8_t> config;
  std::vector<uint32_t> regs;  // RegState as dwords
  std::vector<uint64_t> gtt;
  std::vector<uint32_t> msix_table;
  std::vector<uint8_t> aperture;
  bool operator==(const DeviceSnapshot&) const = default;
};

struct VgpuCounters {
  uint64_t doorbells = 0;
  uint64_t mmio_refusals = 0;
  uint64_t command_refusals = 0;
  uint64_t irqs_raised = 0;
  uint64_t resets = 0;
  uint64_t submissions = 0;       // audited and queued
  uint64_t commands_audited = 0;
  uint64_t plans_executed = 0;
  uint64_t bytes_zero_copy = 0;   // guest bytes the engine used in place
  uint64_t bytes_gathered = 0;    // guest bytes copied through engine buffers
  uint64_t engine_submissions = 0;
  uint64_t plans_coalesced = 0;   // plans whose work joined another's engine submission
  uint64_t plans_inline = 0;      // plans completed on the loop (ExecOptions::inline_complete)
  uint64_t plans_inline_submitted = 0;  // plans whose engine work the loop submitted (ExecOptions::inline_submit)
  // Idle notify: times the device re-read the tail shadow on its own after its last plan
  // finished, and how many of those found a new tail (submissions no kick announced).
  uint64_t tail_rereads = 0;
  uint64_t tail_rereads_found = 0;
  // F10 scan-out and its pacing (host counters: a device reset does not zero them).
  uint64_t flips_requested = 0;  // commits accepted (ENABLE or FLIP)
  uint64_t flips_presented = 0;  // commits that took effect at a frame boundary
  uint64_t flips_deferred = 0;   // commits the frame limit held past at least one boundary
  uint64_t flips_replaced = 0;   // commits a later one replaced before they took effect (mailbox)
  uint64_t display_fps = 0;      // commits presented per second, over the last whole second of the clock
};

class Vgpu : public vfio_user::DeviceBackend {
 public:
  static Result<std::unique_ptr<Vgpu>> Create(const VgpuConfig& config);
  ~Vgpu() override;

  const VgpuConfig& config() const;
  // The doorbell ioeventfd offered by GET_REGION_IO_FDS; the daemon's loop watches it and
  // calls OnDoorbellKick() when it fires.
  const EventFd& doorbell() const;
  void OnDoorbellKick();
  // F7: this vGPU's fault monitor (thread-safe), and the turn of a doorbell the throttle
  // deferred (VgpuConfig::throttle_timer; on the daemon's loop).
  FaultMonitor& faults();
  void OnThrottleTimer();
  // F10: one frame boundary of the scan-out (VgpuConfig::frame_clock; on the daemon's loop):
  // a pending commit takes effect and raises the display vector.
  void OnFrameTick();
  // F10 frame pacing: the limit from now on (0: none). kInvalidArgument above kMaxFrameLimit.
  Result<> SetFrameLimit(uint32_t fps);
  // The frame being scanned out (kBadState when no plane is), copied out of the aperture.
  Result<ScanoutFrame> CaptureScanout() const;

  // Waits until every submission queued so far has executed (tests, snapshot).
  void WaitIdle();
  // Plans queued or running in the executor (lock-free; the scheduler's gate asks).
  bool HasBacklog() const;

  // F8, the host's side of the lifecycle (docs/device-spec.md "Reset", "Stop"):
  // HostReset resets the device model as the guest's RESET register does (registers, GTT,
  // ring, error state, queued work, aperture scrub; PCI function state stays), without
  // waiting for the engine. RequestRelease fires VFIO's device-request interrupt (REQ):
  // true when the client registered an eventfd for it, so a VMM will be asked to let go.
  Result<> HostReset();
  bool RequestRelease();

  DeviceSnapshot Snapshot() const;
  Result<> Restore(const DeviceSnapshot& snap);
  VgpuCounters Counters() const;
  ErrorReport LastError() const;

  // vfio_user::DeviceBackend
  void OnConnect(vfio_user::DmaMessenger* messenger) override;
  Result<vfio_user::RegionInfo> GetRegionInfo(uint32_t index) override;
  Result<std::vector<vfio_user::IoFd>> GetRegionIoFds(uint32_t index) override;
  Result<vfio_user::IrqInfo> GetIrqInfo(uint32_t index) override;
  Result<> SetIrqs(const vfio_user::SetIrqsArgs& args, std::vector<UniqueFd> fds,
                   std::span<const uint8_t> bools) override;
  Result<> RegionRead(uint32_t index, uint64_t offset, std::span<std::byte> out) override;
  Result<> RegionWrite(uint32_t index, uint64_t offset, std::span<const std::byte> data) override;
  Result<> DmaMap(const vfio_user::DmaMapArgs& args, UniqueFd fd) override;
  Result<vfio_user::DmaDrain> DmaUnmap(const vfio_user::DmaUnmapArgs& args) override;
  Result<> Reset() override;
  void OnDisconnect() override;

  class Impl;

 private:
  Result<> RegionWriteLocked(uint32_t index, uint64_t offset, std::span<const std::byte> data);
  void OnDoorbellKickLocked();   // Impl::mu_ held
  void OnThrottleTimerLocked();  // Impl::mu_ held
  explicit Vgpu(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace vg::mediator
