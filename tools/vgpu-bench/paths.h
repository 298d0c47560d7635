#pragma once
// The paths of the A/B study behind one interface, so every workload runs the same
// way on each: native (the engine in this process), mediated (a guest through vfio-user:
// GTT, ring, doorbell, fence IRQ) and remoting (serialized API calls over shared memory).

#include <sys/types.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/base.h"
#include "engine/engine.h"
#include "shaders/samples.h"
#include "tools/vgpu-bench/floors.h"

namespace vg::bench {

enum class Kind { kEmpty, kKernel, kFills, kChurn, kCopyCmd };

struct Workload {
  std::string group;  // empty, small, kernel_time, cmds, data, churn
  std::string name;
  Kind kind = Kind::kEmpty;
  shaders::KernelSample sample;  // kKernel
  uint32_t commands = 1;         // kFills: FILL commands per submission
  uint64_t bytes = 0;            // data a submission touches (throughput), 0: count submissions
  double x = 0;                  // plot abscissa: kernel time in us, or bytes
  uint32_t churn_bytes = 64 << 10;
  uint64_t copy_bytes = 0;  // kCopyCmd: one COPY of this many bytes between two buffers
  uint32_t stream = 0;      // >0: timed as `stream` fire-and-forget submissions, last one waited
};

// What crossed the boundary between guest and host, cumulative.
struct Crossings {
  uint64_t messages = 0;    // request/reply messages on a socket
  uint64_t doorbells = 0;   // one-way notifications guest -> host
  uint64_t interrupts = 0;  // one-way notifications host -> guest consumed
  uint64_t replies = 0;     // waits for an answer through shared memory
  uint64_t bytes = 0;       // command/serialized bytes written for the host
};

class Path {
 public:
  virtual ~Path() = default;
  virtual std::string name() const = 0;
  virtual Result<> Prepare(const Workload& w) = 0;
  // One submission of the prepared workload, waited to completion.
  virtual Result<> RunOnce() = 0;
  // `n` submissions back to back, only the last waited (fire and forget).
  virtual Result<> RunStream(uint32_t n) = 0;
  // The kernel bindings' contents after the runs so far (kKernel).
  virtual Result<std::vector<std::vector<std::byte>>> ReadBack() = 0;
  virtual void Release() = 0;
  virtual Crossings crossings() const = 0;
  // Process whose CPU time is host-side work (the daemon); 0 when it is this process.
  virtual pid_t host_pid() const { return 0; }
  // The VMM process between this guest and the daemon (QEMU for mediated-qemu), 0 when
  // none: its CPU time is counted on the guest side, as a VM's exits are.
  virtual pid_t vmm_pid() const { return 0; }
  // Floors that belong to this path's own transport, measured when it was made (the
  // study reports them beside the machine's floors): e.g. the qtest hop of mediated-qemu.
  virtual std::vector<NamedStats> floors() const { return {}; }
};

// How a mediated guest tells the device its ring has new work: the doorbell ablation's rows
// (docs/ab-methodology.md "Ablations").
enum class Doorbell {
  kDefault,     // the guest driver's own default (DriverOptions untouched): what "mediated" runs
  kIoeventfd,   // the tail in the shadow and an ioeventfd kick at every submission
  kShadow,      // idle notify: the device polls the tail shadow while busy; a kick only when idle
  kPostedMmio,  // RING_TAIL as a posted REGION_WRITE (no reply awaited): what QEMU 10.1 sends
  kSyncMmio,    // RING_TAIL as a REGION_WRITE request/reply: what QEMU 10.2 sends
};

// Whether this build's guest driver has the idle-notify switch (DriverOptions::idle_notify):
// true since f12-idle. Without it the kShadow row cannot run and kIoeventfd is the default.
bool DriverHasIdleNotify();
// --gtt's modes, the default first.
inline constexpr std::array<std::string_view, 4> kGttModes{"ring", "batch", "multi", "per-entry"};
inline bool KnownGttMode(std::string_view m) { return std::find(kGttModes.begin(), kGttModes.end(), m) != kGttModes.end(); }

struct PathConfig {
  std::string socket;         // mediated: the vGPU's vfio-user socket
  std::string remote_socket;  // remoting: the vGPU's remoting socket
  pid_t daemon = 0;
  std::string gpu;            // native: engine device override
  uint64_t guest_ram = 256ull << 20;  // mediated: guest RAM shared with the vGPU
  std::string qemu;                   // mediated-qemu: qemu-system-x86_64 with vfio-user-pci
  std::string qemu_firmware;          // mediated-qemu: its -L directory ("" : built in)
  // mediated, mediated-mmio: how the driver updates the GTT (KnownGttMode). ring:
  // GTT_UPDATE commands ahead of the next submission when the device offers them (the
  // default); batch: GTT_BATCH_GO; multi: posted writes batched into REGION_WRITE_MULTI;
  // per-entry: one posted REGION_WRITE per entry (the F12 study's baseline).
  std::string gtt = "ring";
  // mediated variants (MakeMediatedVariantPath): the doorbell.
  Doorbell doorbell = Doorbell::kDefault;
  // remoting variants (MakeRemotingVariantPath): RemotingOptions::batch and ::idle_notify.
  bool remoting_batch = true;
  bool remoting_idle_notify = true;
};

Result<std::unique_ptr<Path>> MakeNativePath(const PathConfig& c);
// Native paths sharing one engine (concurrent submitters in one process).
std::unique_ptr<Path> MakeNativePathOn(std::shared_ptr<engine::Engine> engine);
Result<std::unique_ptr<Path>> MakeMediatedPath(const PathConfig& c);
// The mediated path with the doorbell as a RING_TAIL REGION_WRITE (no ioeventfd).
Result<std::unique_ptr<Path>> MakeMediatedMmioPath(const PathConfig& c);
// The mediated path through a real QEMU under qtest (F12 "mediated, posted MMIO doorbell,
// through QEMU"); kUnsupported without c.qemu.
Result<std::unique_ptr<Path>> MakeMediatedQemuPath(const PathConfig& c);
// A mediated guest named `name` with c.doorbell and c.gtt: the ablations' rows.
Result<std::unique_ptr<Path>> MakeMediatedVariantPath(const PathConfig& c, const std::string& name);
Result<std::unique_ptr<Path>> MakeRemotingPath(const PathConfig& c);
// A remoting guest named `name` with c.remoting_batch and c.remoting_idle_notify: the
// remoting ablation's rows.
Result<std::unique_ptr<Path>> MakeRemotingVariantPath(const PathConfig& c, const std::string& name);

}  // namespace vg::bench
