#pragma once
// The vGPU's graphics translation table: GPU page -> guest-physical page or aperture page.
// Every entry is validated when written; every translation re-checks rights page by page.

#include <cstdint>
#include <functional>
#include <vector>

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

  // Translates [va, va+size) page by page, merging runs that stay contiguous in the
  // same target space. Every page must be valid and, for kWrite, writable. More than
  // `max_spans` runs: kLimitExceeded (the caller's per-submission span bound).
  Result<std::vector<GttSpan>> Translate(GpuVa va, ByteSize size, GttAccess access,
                                         uint64_t max_spans = UINT64_MAX) const;

  // Invalidates every guest-memory entry whose page lies in [gpa, gpa+size): no
  // translation outlives its DMA mapping. Returns how many entries were dropped.
  uint32_t InvalidateGuestRange(Gpa gpa, ByteSize size);
  void Clear();

  const std::vector<uint64_t>& entries() const { return entries_; }
  Result<> Restore(const std::vector<uint64_t>& entries);

 private:
  std::vector<uint64_t> entries_;
  uint64_t aperture_size_;
};

}  // namespace vg::mediator
