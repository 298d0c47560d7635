#include "mediator/gtt.h"

#include "abi/device.h"

namespace vg::mediator {

Result<> Gtt::ValidateEntry(uint64_t entry, const GuestPageCheck& check) const {
  if (!(entry & abi::kGttValid)) {
    VG_ERROR_IF(entry != 0, Errc::kBadFlags, "invalid GTT entry {:#x} must be written as 0", entry);
    return Ok();
  }
  VG_ERROR_IF((entry & abi::kGttFlagMask & ~abi::kGttKnownFlags) != 0, Errc::kBadFlags,
              "GTT entry {:#x} sets reserved bits {:#x}", entry, entry & abi::kGttFlagMask & ~abi::kGttKnownFlags);
  uint64_t page = entry & ~abi::kGttFlagMask;
  bool writable = entry & abi::kGttWritable;
  if (entry & abi::kGttAperture) {
    VG_ERROR_IF(page >= aperture_size_, Errc::kOutOfBounds, "GTT entry targets aperture page {:#x} past {:#x}", page,
                aperture_size_);
    return Ok();
  }
  return check(Gpa{page}, writable);
}

Result<> Gtt::Write(uint32_t index, uint64_t entry, const GuestPageCheck& check) {
  VG_ERROR_IF(index >= entries_.size(), Errc::kOutOfBounds, "GTT index {} past {}", index, entries_.size());
  VG_TRY_CTX(ValidateEntry(entry, check), "GTT[{}] = {:#x}", index, entry);
  entries_[index] = entry;
  return Ok();
}

Result<> Gtt::CheckRecord(const abi::GttBatchRecord& r, const GuestPageCheck& check) const {
  VG_ERROR_IF(r.index >= entries_.size(), Errc::kOutOfBounds, "GTT index {} past {}", r.index, entries_.size());
  VG_INVALID_IF(r.pad != 0, "pad {:#x} is not 0", r.pad);
  VG_TRY_CTX(ValidateEntry(r.entry, check), "GTT[{}] = {:#x}", r.index, r.entry);
  return Ok();
}

Result<> Gtt::WriteBatch(std::span<const abi::GttBatchRecord> records, const GuestPageCheck& check, uint32_t* bad) {
  for (size_t i = 0; i < records.size(); ++i) {
    *bad = static_cast<uint32_t>(i);
    VG_TRY_CTX(CheckRecord(records[i], check), "record {}", i);
  }
  // Every record passed: nothing below can fail, so the batch is all or nothing.
  for (const abi::GttBatchRecord& r : records) entries_[r.index] = r.entry;
  return Ok();
}

Result<std::vector<GttSpan>> Gtt::Translate(GpuVa va, ByteSize size, GttAccess access, uint64_t max_spans,
                                            const GttOverlay* staged) const {
  if (staged && staged->empty()) staged = nullptr;
  VG_INVALID_IF(size.v == 0, "empty GPU VA range at {}", va);
  VG_TRY_ASSIGN(GpuVa end, CheckedEnd(va, size));
  uint64_t limit = uint64_t{entries_.size()} << kPageShift;
  VG_ERROR_IF(end.v > limit, Errc::kNotMapped, "GPU VA range {}+{:#x} past the GTT ({:#x})", va, size.v, limit);
  std::vector<GttSpan> spans;
  uint64_t cur = va.v;
  while (cur < end.v) {
    uint64_t idx = cur >> kPageShift;
    uint64_t in_page = cur & (kPageSize - 1);
    uint64_t n = std::min(kPageSize - in_page, end.v - cur);
    uint64_t e = entries_[idx];
    if (staged) {
      if (auto it = staged->find(static_cast<uint32_t>(idx)); it != staged->end()) e = it->second;
    }
    VG_ERROR_IF(!(e & abi::kGttValid), Errc::kNotMapped, "GPU VA {:#x} is not mapped (GTT[{}] invalid)", cur, idx);
    bool writable = e & abi::kGttWritable;
    VG_ERROR_IF((static_cast<uint8_t>(access) & static_cast<uint8_t>(GttAccess::kWrite)) && !writable,
                Errc::kAccessDenied, "GPU VA {:#x} is read-only (GTT[{}])", cur, idx);
    GttTarget t{bool(e & abi::kGttAperture), (e & ~abi::kGttFlagMask) + in_page, writable};
    if (!spans.empty()) {
      GttSpan& last = spans.back();
      if (last.target.aperture == t.aperture && last.target.page_addr + last.size.v == t.page_addr &&
          last.target.writable == t.writable) {
        last.size.v += n;
        cur += n;
        continue;
      }
    }
    VG_ERROR_IF(spans.size() >= max_spans, Errc::kLimitExceeded,
                "GPU VA range {}+{:#x} breaks into more than {} runs (what is left of the submission's span bound)", va, size.v,
                max_spans);
    spans.push_back({GpuVa{cur}, t, ByteSize{n}});
    cur += n;
  }
  return spans;
}

uint32_t Gtt::InvalidateGuestRange(Gpa gpa, ByteSize size) {
  uint32_t dropped = 0;
  for (auto& e : entries_) {
    if (!(e & abi::kGttValid) || (e & abi::kGttAperture)) continue;
    uint64_t page = e & ~abi::kGttFlagMask;
    if (RangesOverlap(page, kPageSize, gpa.v, size.v)) {
      e = 0;
      ++dropped;
    }
  }
  return dropped;
}

void Gtt::Clear() {
  std::fill(entries_.begin(), entries_.end(), 0);
  DropLatch();
}

uint32_t Gtt::TakeLatch(uint32_t index) {
  uint32_t lo = latch_index_ == index ? latch_lo_ : static_cast<uint32_t>(Entry(index));
  DropLatch();
  return lo;
}

Result<> Gtt::Restore(const std::vector<uint64_t>& entries) {
  VG_INVALID_IF(entries.size() != entries_.size(), "GTT snapshot has {} entries, want {}", entries.size(),
                entries_.size());
  entries_ = entries;
  DropLatch();
  return Ok();
}

}  // namespace vg::mediator
