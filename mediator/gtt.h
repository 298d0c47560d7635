#pragma once
// The vGPU's graphics translation table: GPU page -> guest-physical page or aperture page.
// Every entry is validated when written; every translation re-checks rights page by page.

#include <cstdint>
#include <functional>
#include <span>
#include <unordered_map>
#include <vector>

#include "abi/device.h"
#include "base/base.h"

namespace vg::mediator {

enum class GttAccess : uint8_t { kRead = 1, kWrite = 2, kReadWrite = 3 };

// Where a GPU page lands.
struct GttTarget {
  bool aperture = false;  // false: guest-physical page
  uint64_t page_addr = 0; // GPA (guest memory) or byte offset in the aperture
  bool writable = false;
};

// One contiguous run of a translated GPU VA range.
struct GttSpan {
  GpuVa va{0};
  GttTarget target;  // page_addr already includes the offset inside the first page
  ByteSize size{0};
};

// GTT entries a submission's GTT_UPDATE commands have staged and not yet stored (index ->
// entry): the auditor translates the rest of that submission through them, and the ring
// stores them only once the whole submission has passed (docs/device-spec.md "GTT_UPDATE").
using GttOverlay = std::unordered_map<uint32_t, uint64_t>;

class Gtt {
 public:
  // Asks the owner whether [gpa, gpa+4K) is guest memory the vGPU may map (DMA regions),
  // and with which rights; aperture pages are checked against aperture_size.
  using GuestPageCheck = std::function<Result<>(Gpa page, bool writable)>;

  Gtt(uint32_t entries, uint64_t aperture_size) : entries_(entries, 0), aperture_size_(aperture_size) {}

  uint32_t size() const { return static_cast<uint32_t>(entries_.size()); }
  uint64_t Entry(uint32_t index) const { return index < entries_.size() ? entries_[index] : 0; }

  // Validates then stores. Errors: kOutOfBounds (index), kBadFlags (reserved bits),
  // kMisaligned, kNotMapped / kAccessDenied (from check), kOutOfBounds (aperture page).
  Result<> ValidateEntry(uint64_t entry, const GuestPageCheck& check) const;
  Result<> Write(uint32_t index, uint64_t entry, const GuestPageCheck& check);
  // One record of a GTT batch or a GTT_UPDATE command, checked as Write checks one entry
  // (index, reserved bits, pad 0, guest page or aperture page); stores nothing.
  Result<> CheckRecord(const abi::GttBatchRecord& r, const GuestPageCheck& check) const;
  // A GTT batch (GTT_BATCH_GO), already copied out of guest memory: every record is checked
  // as Write checks one entry (index, reserved bits, pad 0, guest page or aperture page),
  // then all are stored in order; on the first bad record nothing is stored and *bad is its
  // position. Nothing else caches translations of an entry (the auditor translates at audit
  // time, plans hold pinned DMA ranges), so storing is all a single write does too.
  Result<> WriteBatch(std::span<const abi::GttBatchRecord> records, const GuestPageCheck& check, uint32_t* bad);

  // Translates [va, va+size) page by page, merging runs that stay contiguous in the
  // same target space. Every page must be valid and, for kWrite, writable. More than
  // `max_spans` runs: kLimitExceeded (the caller's per-submission span bound). `staged`:
  // entries that stand in for the stored ones (the auditor's, for a submission's own
  // GTT_UPDATEs).
  Result<std::vector<GttSpan>> Translate(GpuVa va, ByteSize size, GttAccess access, uint64_t max_spans = UINT64_MAX,
                                         const GttOverlay* staged = nullptr) const;

  // Invalidates every guest-memory entry whose page lies in [gpa, gpa+size): no
  // translation outlives its DMA mapping. Returns how many entries were dropped.
  uint32_t InvalidateGuestRange(Gpa gpa, ByteSize size);
  // Empties the table and drops the latch.
  void Clear();

  // 32-bit halves: a guest without 64-bit MMIO writes the low half (latched here) and then
  // the high half, which commits the pair. The latch is GTT state, so every path that
  // resets or replaces the table (Clear, Restore) drops it: a half written before a reset
  // can never be committed after it (F11 finding 17).
  void Latch(uint32_t index, uint32_t lo) {
    latch_index_ = index;
    latch_lo_ = lo;
  }
  // The low half a high-half write at `index` commits with: the latched one when it was for
  // this entry, else the entry's current low half. Consumes the latch.
  uint32_t TakeLatch(uint32_t index);
  void DropLatch() { latch_index_ = kNoLatch; }

  const std::vector<uint64_t>& entries() const { return entries_; }
  Result<> Restore(const std::vector<uint64_t>& entries);

 private:
  static constexpr uint32_t kNoLatch = UINT32_MAX;
  std::vector<uint64_t> entries_;
  uint64_t aperture_size_;
  uint32_t latch_index_ = kNoLatch;
  uint32_t latch_lo_ = 0;
};

}  // namespace vg::mediator
