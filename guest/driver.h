#pragma once
// The guest driver API for the mediated path: guest-memory buffers mapped into the vGPU's
// GTT, a command ring, command recording, submission by doorbell and fence waits by IRQ or
// by polling the status page. This is what a guest kernel driver would do; the bench's
// mediated path and the e2e tests use it, through a vfio-user Device; vgpu-vm-guest uses it
// inside a VM through a PciDevice (backend.h).

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <vector>

#include "base/base.h"
#include "guest/backend.h"

namespace vg::guest {

struct GpuBuffer {
  std::span<std::byte> host;  // the guest's view (its RAM)
  Gpa gpa{0};
  GpuVa va{0};
  ByteSize size{0};
  bool writable = true;
};

struct Binding {
  GpuVa va{0};
  uint64_t size = 0;
  uint32_t access = abi::cmd::kAccessRead | abi::cmd::kAccessWrite;
};
inline Binding Bind(const GpuBuffer& b, uint32_t access = abi::cmd::kAccessRead | abi::cmd::kAccessWrite) {
  return {b.va, b.size.v, access};
}

// Records a dword command stream (docs/device-spec.md §Commands).
class CommandBuilder {
 public:
  CommandBuilder& Nop(uint32_t dwords = 1);
  CommandBuilder& Fence(GpuVa target, uint64_t value, bool irq);
  CommandBuilder& Copy(GpuVa src, GpuVa dst, uint64_t size);
  CommandBuilder& Fill(GpuVa dst, uint64_t size, uint32_t value);
  CommandBuilder& Dispatch(uint32_t kernel, std::array<uint32_t, 3> groups, std::span<const Binding> bindings,
                           std::span<const std::byte> push);
  CommandBuilder& Batch(GpuVa va, uint32_t size_bytes);
  CommandBuilder& LoadReg(uint32_t reg, uint32_t value);
  CommandBuilder& Timestamp(GpuVa target);
  CommandBuilder& GttUpdate(std::span<const abi::GttBatchRecord> records);  // at most kGttUpdateMaxRecords
  CommandBuilder& Raw(std::span<const uint32_t> dwords);

  std::span<const uint32_t> dwords() const { return dw_; }
  size_t size_bytes() const { return dw_.size() * 4; }
  void Clear() { dw_.clear(); }

 private:
  void U64(uint64_t v) {
    dw_.push_back(static_cast<uint32_t>(v));
    dw_.push_back(static_cast<uint32_t>(v >> 32));
  }
  std::vector<uint32_t> dw_;
};

struct DriverOptions {
  uint32_t ring_size = 64 << 10;
  // true: publish the tail in the shadow and kick the ioeventfd (one one-way signal);
  // false: write RING_TAIL (a trapped REGION_WRITE round trip).
  bool use_ioeventfd = true;
  // Update the GTT with one GTT batch (GTT_BATCH_GO, a record array in guest RAM) per
  // Alloc/Free when the device offers it (CAPS bit 5); false, or not offered: posted GTT
  // writes, which the backend may batch (REGION_WRITE_MULTI).
  bool gtt_batch = true;
  // With the ioeventfd doorbell, kick only when the status page says the device is idle
  // (DEVICE_IDLE) and otherwise let the device find the tail in the shadow when its work
  // runs out (CAPS bit 6, docs/device-spec.md "Idle notify"). false, or not offered: kick at
  // every submission (the ablation, and what a guest that ignores the protocol does).
  bool idle_notify = true;
  // Free clears its GTT entries lazily: with the next GTT update (the next Alloc or
  // mapping), at FlushFrees(), or at once when kMaxPendingClears would be passed, so an
  // Alloc/use/Free cycle costs one GTT update, not two (what an OS driver does with lazy
  // unmapping). Until then the freed pages stay reachable through the old VA, by this
  // guest's own commands only; its VA and RAM are free for reuse at once (a reused VA is
  // cleared and mapped in one update, in order). false: Free clears at once.
  bool lazy_free = true;
  // Alloc/Free update the GTT with GTT_UPDATE commands in the ring, ahead of the next
  // submission's commands, when the device offers it (CAPS bit 8, docs/device-spec.md
  // "GTT_UPDATE"): no register write, no round trip; an Alloc/use/Free cycle crosses only
  // with the submission's doorbell. The entries take effect in ring order, so a buffer is
  // mapped for every command submitted after its Alloc, and the device sees the change only
  // then (MMIO reads of the GTT window show it after that submission). A refused update is
  // reported with that submission (Wait returns the named error), not by Alloc. Once the
  // ring runs, MapPages and MapAperture go the same way (a register write could overtake
  // an update still queued in the ring); WriteGtt stays a register write.
  bool gtt_in_ring = false;
};

enum class WaitMode { kIrq, kPoll };

// What crossed the guest/host boundary, for the A/B study.
struct DriverCounters {
  uint64_t submissions = 0;
  uint64_t doorbells = 0;   // ioeventfd kicks or RING_TAIL writes
  uint64_t doorbells_skipped = 0;  // kicks left out because the device said it was busy
  uint64_t interrupts = 0;  // IRQ eventfd wake-ups consumed while waiting
  uint64_t ring_bytes = 0;  // command bytes written to the ring
  uint64_t gtt_batches = 0;  // GTT_BATCH_GO writes
  uint64_t gtt_writes = 0;   // GTT entries written through the GTT window
  uint64_t gtt_ring_records = 0;  // GTT entries updated by GTT_UPDATE commands in the ring
};

class Driver {
 public:
  static Result<std::unique_ptr<Driver>> Create(DeviceBackend& dev, DriverOptions opts = {});
  DeviceBackend& device() { return dev_; }

  // Guest RAM, page granular and contiguous, mapped at a fresh GPU VA.
  Result<GpuBuffer> Alloc(uint64_t size, bool writable = true);
  Result<> Free(const GpuBuffer& b);
  // Applies the GTT clears lazy Frees left pending (DriverOptions::lazy_free).
  Result<> FlushFrees();
  size_t pending_clears() const { return pending_clears_.size(); }
  static constexpr size_t kMaxPendingClears = 4096;
  // Raw GTT mappings, for tests that need unusual layouts.
  Result<GpuVa> MapPages(Gpa gpa, uint64_t size, bool writable);
  Result<GpuVa> MapAperture(uint64_t offset, uint64_t size, bool writable);
  Result<> WriteGtt(uint32_t index, uint64_t entry);
  // GTT updates the way Alloc/Free make them: one GTT batch per 4096 records when the device
  // offers it, else posted writes (batched by the backend where it can). `check`: find out
  // whether the device refused any (an ERR_COUNT read where the write does not say).
  Result<> ApplyGtt(std::span<const abi::GttBatchRecord> records, bool check = true);
  bool uses_gtt_batch() const { return batch_.host.size() != 0; }
  bool uses_idle_notify() const { return idle_notify_; }
  bool uses_gtt_ring() const { return gtt_ring_; }
  // GTT_UPDATE records waiting for the next submission (DriverOptions::gtt_in_ring).
  size_t pending_ring_gtt() const { return ring_gtt_.size(); }
  // Submits the waiting GTT_UPDATE records now, with no fence (they take effect in ring
  // order whatever comes next).
  Result<> FlushRingGtt();
  const GpuBuffer& gtt_batch() const { return batch_; }  // the array (tests)
  Result<GpuVa> ReserveVa(uint64_t size);

  // Appends FENCE(next seqno) and rings the doorbell. Returns the seqno. Without `irq` the
  // fence is still written (status page, Wait by polling or by a later IRQ) but raises no
  // interrupt: fire-and-forget streams ask for one only at their end.
  Result<uint64_t> Submit(const CommandBuilder& cmds, bool irq = true);
  // Exactly these dwords, no fence (hostile tests).
  Result<> SubmitRaw(std::span<const uint32_t> dwords);
  // Ok once the fence passed seq; the device's named error if a refusal was reported
  // meanwhile; kTimeout otherwise.
  Result<> Wait(uint64_t seq, WaitMode mode = WaitMode::kIrq, int timeout_ms = 10000);
  uint64_t completed() const { return dev_.Status64(abi::status::kCompletedFence); }
  uint64_t last_submitted() const { return seq_; }
  GpuVa fence_va() const { return fence_.va; }
  const GpuBuffer& ring() const { return ring_; }
  const DriverCounters& counters() const { return counters_; }

 private:
  Driver(DeviceBackend& dev, DriverOptions opts) : dev_(dev), opts_(opts) {}
  Result<> Init();
  Result<> InitGttBatch(uint32_t caps);
  Result<> ApplyGttBatch(std::span<const abi::GttBatchRecord> records, bool check);
  Result<> ApplyGttWrites(std::span<const abi::GttBatchRecord> records, bool check);
  Result<> MapRange(GpuVa va, uint64_t first, uint64_t pages, uint64_t flags);
  // GTT_UPDATE commands for up to `max` of ring_gtt_'s first records, appended to `out`;
  // returns how many it took.
  size_t EmitRingGtt(CommandBuilder& out, size_t max) const;
  size_t RingGttPerSubmission() const;
  Result<uint64_t> AllocRange(std::map<uint64_t, uint64_t>& free, uint64_t size);
  void FreeRange(std::map<uint64_t, uint64_t>& free, uint64_t off, uint64_t size);
  Result<> WriteRing(std::span<const uint32_t> dwords);
  Result<> Doorbell(uint32_t bytes);

  DeviceBackend& dev_;
  DriverOptions opts_;
  std::map<uint64_t, uint64_t> free_ram_;  // offset in RAM -> bytes
  std::map<uint64_t, uint64_t> free_va_;   // GPU VA -> bytes
  GpuBuffer ring_;
  GpuBuffer fence_;  // u64 fence at +0, u32 tail shadow at +64
  GpuBuffer batch_;  // the GTT batch array (guest RAM, never GTT-mapped); empty: not used
  std::vector<abi::GttBatchRecord> pending_clears_;  // lazy Frees' GTT clears, not yet applied
  bool gtt_ring_ = false;                        // DriverOptions::gtt_in_ring, and offered
  std::vector<abi::GttBatchRecord> ring_gtt_;    // GTT_UPDATE records for the next submission
  uint32_t tail_ = 0;
  uint32_t ring_head_ = 0;  // RING_HEAD as last read from the status page (stale is safe)
  uint64_t seq_ = 0;
  uint32_t errors_seen_ = 0;
  bool idle_notify_ = false;
  uint32_t unkicked_bytes_ = 0;  // published since the last kick (idle notify)
  bool kicked_ = false;          // kick_mark_ holds the device's doorbell count before our last kick
  uint64_t kick_mark_ = 0;
  DriverCounters counters_;
};

}  // namespace vg::guest
