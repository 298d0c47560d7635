#include "mediator/work_split.h"

#include <algorithm>
#include <cstring>

#include "shaders/catalogue.h"

namespace vg::mediator {

namespace {

using shaders::KernelId;

// How a kernel's grid may be cut. kLinear: indexes with LinearIndex() (gid.x + gid.y *
// grid width), so whole rows may be cut anywhere and a one-row grid anywhere along x.
// kTiles: every group is independent of the grid size, cut anywhere. kWhole: grid-stride
// (the stride is the grid size), never cut; its cost is the elements it walks.
enum class Shape : uint8_t { kLinear, kTiles, kWhole };

struct KernelCost {
  KernelId id;
  Shape shape;
  uint8_t word;     // push word that scales an invocation's cost (shaders::kOne: none)
  uint32_t factor;  // cost units per invocation per unit of that word
};

// One row per catalogue kernel; a kernel missing here cannot be dispatched (kBadKernel),
// so a new kernel cannot run unbounded by omission.
constexpr KernelCost kCosts[] = {
    {KernelId::kFill, Shape::kLinear, shaders::kOne, 1},
    {KernelId::kCopy, Shape::kLinear, shaders::kOne, 1},
    {KernelId::kSaxpy, Shape::kLinear, shaders::kOne, 1},
    {KernelId::kMatmul, Shape::kTiles, 2, 1},      // k multiply-adds per output element
    {KernelId::kReduceSum, Shape::kWhole, 0, 1},   // count elements, whatever the grid
    {KernelId::kBlur3x3, Shape::kTiles, shaders::kOne, 9},
    {KernelId::kSpin, Shape::kLinear, 1, 1},       // iterations per element
    // 2-D kernels: one pixel per invocation, indexed by gid x/y alone (any group is a piece).
    {KernelId::kFillRect, Shape::kTiles, shaders::kOne, 1},
    {KernelId::kBlit, Shape::kTiles, shaders::kOne, 1},
    {KernelId::kBlend, Shape::kTiles, shaders::kOne, 1},
    {KernelId::kConvert565, Shape::kTiles, shaders::kOne, 1},
};

uint32_t PushWord(std::span<const std::byte> push, uint8_t word) {
  if (word == shaders::kOne || (size_t{word} + 1) * 4 > push.size()) return 1;
  uint32_t v = 0;
  std::memcpy(&v, push.data() + size_t{word} * 4, 4);
  return v;
}

uint64_t CeilDiv(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

}  // namespace

Result<DispatchCut> DispatchCut::Make(uint32_t kernel, std::array<uint32_t, 3> groups,
                                      std::span<const std::byte> push, uint64_t budget, uint32_t min_groups) {
  budget = std::max<uint64_t>(1, budget);
  min_groups = std::max<uint32_t>(1, min_groups);
  const shaders::KernelDesc* k = shaders::FindKernel(kernel);
  const KernelCost* cost = nullptr;
  for (const KernelCost& c : kCosts)
    if (k && c.id == k->id) cost = &c;
  VG_ERROR_IF(!k || !cost, Errc::kBadKernel, "kernel {} has no cost rule", kernel);
  VG_INVALID_IF(groups[0] == 0 || groups[1] == 0 || groups[2] == 0, "{}: empty grid", k->name);
  VG_ERROR_IF(groups[2] != 1, Errc::kLimitExceeded, "{}: group count z = {} (only 1 is cut)", k->name, groups[2]);
  const uint64_t invocations_per_group =
      uint64_t{k->workgroup_size[0]} * k->workgroup_size[1] * k->workgroup_size[2];
  const uint64_t gx = groups[0], gy = groups[1];
  DispatchCut c;
  c.groups_ = groups;
  if (cost->shape == Shape::kWhole) {
    c.rows_ = true;
    c.per_piece_ = static_cast<uint32_t>(gy);
    c.total_cost_ = c.piece_cost_ =
        uint64_t{PushWord(push, cost->word)} * cost->factor + gx * gy * invocations_per_group;
    VG_ERROR_IF(c.piece_cost_ > kMaxPieceCost, Errc::kLimitExceeded,
                "{}: a grid-stride dispatch of cost {} over the {} bound", k->name, c.piece_cost_, kMaxPieceCost);
    return c;
  }
  // <= 256 invocations x 2^32 x 9: no overflow in u64; a row is <= 65535 of those... which
  // can pass 2^64 only past every limit the catalogue sets, so saturate rather than wrap.
  const uint64_t group_cost =
      std::max<uint64_t>(1, invocations_per_group * std::max<uint64_t>(1, PushWord(push, cost->word)) * cost->factor);
  const uint64_t row_cost = group_cost > UINT64_MAX / gx ? UINT64_MAX : group_cost * gx;
  c.total_cost_ = row_cost > UINT64_MAX / gy ? UINT64_MAX : row_cost * gy;
  if (row_cost <= budget) {
    c.rows_ = true;
    c.per_piece_ = static_cast<uint32_t>(std::min<uint64_t>(gy, budget / row_cost));
    c.pieces_ = CeilDiv(gy, c.per_piece_);
    c.piece_cost_ = row_cost * c.per_piece_;
  } else if (cost->shape == Shape::kTiles || gy == 1) {
    VG_ERROR_IF(group_cost > kMaxPieceCost, Errc::kLimitExceeded, "{}: one workgroup costs {}, over the {} bound",
                k->name, group_cost, kMaxPieceCost);
    c.rows_ = false;
    uint64_t per = std::clamp<uint64_t>(budget / group_cost, std::min<uint64_t>(min_groups, gx), gx);
    if (per < gx) {
      // A whole number of rounds of the device's lanes per piece: 5 groups on 2 lanes take
      // as long as 6, so pieces of 5,5,5,1 cost 10 rounds where the grid needs 8 (the
      // study's spin ~3000 us ran 1.3x native while scheduled). Then as few pieces as that
      // allows, evened out: 18 groups at most 8 a piece are 6,6,6, not 8,8,2 (as many
      // rounds, and the longest piece, another tenant's worst wait, is shorter).
      per = std::max<uint64_t>(min_groups, per / min_groups * min_groups);
      const uint64_t n = CeilDiv(gx, per);
      per = std::min(per, CeilDiv(CeilDiv(gx, n), min_groups) * min_groups);
    }
    c.per_piece_ = static_cast<uint32_t>(per);
    c.x_pieces_ = CeilDiv(gx, c.per_piece_);
    c.pieces_ = gy * c.x_pieces_;
    c.piece_cost_ = group_cost * c.per_piece_;
  } else {
    // LinearIndex() reads the grid width: a row of a multi-row grid is the smallest piece.
    VG_ERROR_IF(row_cost > kMaxPieceCost, Errc::kLimitExceeded,
                "{}: one row of {} groups costs {}, over the {} bound (use groups y = 1, or fewer per row)", k->name,
                gx, row_cost, kMaxPieceCost);
    c.rows_ = true;
    c.per_piece_ = 1;
    c.pieces_ = gy;
    c.piece_cost_ = row_cost;
  }
  return c;
}

DispatchPiece DispatchCut::Piece(uint64_t i) const {
  DispatchPiece p;
  if (rows_) {
    uint64_t y = i * per_piece_;
    p.base = {0, static_cast<uint32_t>(y), 0};
    p.groups = {groups_[0], static_cast<uint32_t>(std::min<uint64_t>(per_piece_, groups_[1] - y)), 1};
  } else {
    uint64_t row = i / x_pieces_, x = (i % x_pieces_) * per_piece_;
    p.base = {static_cast<uint32_t>(x), static_cast<uint32_t>(row), 0};
    p.groups = {static_cast<uint32_t>(std::min<uint64_t>(per_piece_, groups_[0] - x)), 1, 1};
  }
  return p;
}

ResolvedRange SliceRange(const ResolvedRange& r, uint64_t offset, uint64_t size) {
  ResolvedRange out{GpuVa{r.va.v + offset}, ByteSize{size}, r.write, {}};
  uint64_t at = 0;  // offset of the current span in r
  for (const GttSpan& s : r.spans) {
    uint64_t lo = std::max(at, offset), hi = std::min(at + s.size.v, offset + size);
    if (lo < hi) {
      GttSpan cut = s;
      cut.va = GpuVa{s.va.v + (lo - at)};
      cut.target.page_addr += lo - at;
      cut.size = ByteSize{hi - lo};
      out.spans.push_back(cut);
    }
    at += s.size.v;
    if (at >= offset + size) break;
  }
  return out;
}

uint64_t PlanBytes(const Plan& plan) {
  auto range = [](const ResolvedRange& r) { return r.spans.capacity() * sizeof(GttSpan); };
  uint64_t bytes = sizeof(Plan) + plan.ops.capacity() * sizeof(PlanOp);
  for (const PlanOp& op : plan.ops) {
    if (auto* d = std::get_if<PlanDispatch>(&op)) {
      bytes += d->bindings.capacity() * sizeof(ResolvedRange) + d->push.capacity();
      for (const ResolvedRange& b : d->bindings) bytes += range(b);
    } else if (auto* c = std::get_if<PlanCopy>(&op)) {
      bytes += range(c->src) + range(c->dst);
    } else if (auto* f = std::get_if<PlanFill>(&op)) {
      bytes += range(f->dst);
    } else if (auto* e = std::get_if<PlanFence>(&op)) {
      bytes += range(e->target);
    } else if (auto* t = std::get_if<PlanTimestamp>(&op)) {
      bytes += range(t->target);
    }
  }
  return bytes;
}

}  // namespace vg::mediator
