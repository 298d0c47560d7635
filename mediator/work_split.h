#pragma once
// How the mediated executor cuts audited work into engine submissions of bounded cost, and
// the per-vGPU byte and count bounds it charges (docs/device-spec.md "Bounds and blocking:
// the executor"). One engine queue serves every tenant, so one submission's duration is
// every other tenant's worst wait, and the wait of a RESET, a disconnect or a stop: it is
// bounded here, not by what a guest asks for.

#include <algorithm>
#include <array>
#include <cstdint>
#include <span>

#include "base/base.h"
#include "mediator/auditor.h"

namespace vg::mediator {

// Cost units: one kernel invocation-round (one spin iteration, one matmul k step, one
// element of a simple kernel), or one byte of COPY/FILL.
inline constexpr uint64_t kSubmissionCostBudget = 1ull << 26;  // packed into one engine submission
// The same while another vGPU holds or waits for the engine (F7: engine::Engine::
// PrefersSmallSubmissions): a submission cannot be cut once on the device, so its length is
// the others' wait. 2^20 is about a millisecond of the catalogue's spin or a MiB of COPY on
// lavapipe (docs/management.md "Scheduling": pieces).
inline constexpr uint64_t kSharedSubmissionCostBudget = 1ull << 20;
// What one engine submission may cost: kSubmissionCostBudget alone; while scheduled
// (shared), kSharedSubmissionCostBudget for each workgroup the device runs at once
// (engine::DeviceInfo::parallel_groups), so that a piece still fills the device (a piece of
// one workgroup runs on one of lavapipe's threads and leaves the others idle: long work on
// a vGPU alone lost 30 % to it) and takes about a millisecond however wide the device is.
inline constexpr uint64_t SubmissionBudget(bool shared, uint32_t parallel_groups) {
  return shared ? kSharedSubmissionCostBudget * std::clamp<uint64_t>(parallel_groups, 1, 64) : kSubmissionCostBudget;
}
// The smallest piece of a dispatch that cannot be cut further (one workgroup, or one row
// of groups for kernels that index with the grid width, or a whole grid-stride dispatch)
// may cost this much; a DISPATCH with a dearer piece is refused kLimitExceeded at audit.
// It equals one workgroup of the catalogue's dearest legal spin (256 x 2^20 rounds).
inline constexpr uint64_t kMaxPieceCost = 1ull << 28;
// COPY and FILL are cut into chunks of at most this many bytes.
inline constexpr uint64_t kTransferChunkBytes = 16ull << 20;
// Engine buffers that gather scattered guest ranges, held at once by one vGPU.
inline constexpr uint64_t kMaxGatherBytes = 64ull << 20;
// Audited plans queued or running on one vGPU's executor: count and bytes (PlanBytes).
inline constexpr uint32_t kMaxQueuedPlans = 256;
inline constexpr uint64_t kMaxQueuedPlanBytes = 16ull << 20;
// Per ring submission (batches included), built on the daemon's loop thread by the
// auditor: GTT pages translated and spans produced.
inline constexpr uint64_t kMaxTranslatedPages = 1ull << 20;  // 4 GiB of GPU VA
inline constexpr uint64_t kMaxSpansPerSubmission = 16384;    // a whole small vGPU GTT, page by page

// A group range of one DISPATCH.
struct DispatchPiece {
  std::array<uint32_t, 3> base{};
  std::array<uint32_t, 3> groups{};
};

// Cuts one DISPATCH into group ranges of at most `budget` each (or one unsplittable piece).
// Lazy: a 65535-group dispatch is not a vector of 65535 pieces.
class DispatchCut {
 public:
  // kLimitExceeded: an unsplittable piece costs more than kMaxPieceCost. kBadKernel: not
  // in the catalogue. The arguments are otherwise assumed validated (the auditor's).
  // min_groups: a piece cut from a row holds at least this many workgroups (the device's
  // parallel_groups) even past the budget: they run side by side, so the piece takes no
  // longer than one of them would alone, and the device's other lanes are not left idle.
  static Result<DispatchCut> Make(uint32_t kernel, std::array<uint32_t, 3> groups, std::span<const std::byte> push,
                                  uint64_t budget = kSubmissionCostBudget, uint32_t min_groups = 1);

  uint64_t pieces() const { return pieces_; }
  DispatchPiece Piece(uint64_t i) const;
  uint64_t piece_cost() const { return piece_cost_; }  // upper bound of any piece
  uint64_t total_cost() const { return total_cost_; }

 private:
  std::array<uint32_t, 3> groups_{};
  bool rows_ = false;        // pieces are runs of whole rows (y)
  uint32_t per_piece_ = 1;   // rows (rows_) or groups along x per piece
  uint64_t x_pieces_ = 1;    // pieces per row, when cutting along x
  uint64_t pieces_ = 1;
  uint64_t piece_cost_ = 0;
  uint64_t total_cost_ = 0;
};

// A sub-range [offset, offset + size) of a resolved range, spans cut to match.
ResolvedRange SliceRange(const ResolvedRange& r, uint64_t offset, uint64_t size);

// Bytes a queued Plan holds (what kMaxQueuedPlanBytes charges).
uint64_t PlanBytes(const Plan& plan);

}  // namespace vg::mediator
