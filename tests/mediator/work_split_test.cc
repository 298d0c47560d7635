// The executor's cutting rules (mediator/work_split.h), no device: every DISPATCH is cut
// into group ranges that tile its grid exactly, each within the submission budget (or one
// unsplittable piece), and a grid whose smallest piece is over the bound is refused by name.
#include <doctest.h>

#include <set>
#include <tuple>
#include <vector>

#include "mediator/work_split.h"
#include "shaders/catalogue.h"

using namespace vg;
using namespace vg::mediator;
using shaders::KernelId;

namespace {

uint32_t Id(KernelId k) { return static_cast<uint32_t>(k); }

// Checks that the pieces cover [0,gx) x [0,gy) once each; returns the piece count.
uint64_t CheckTiles(const DispatchCut& cut, std::array<uint32_t, 3> g) {
  uint64_t covered = 0;
  std::set<std::tuple<uint32_t, uint32_t>> starts;
  for (uint64_t i = 0; i < cut.pieces(); ++i) {
    DispatchPiece p = cut.Piece(i);
    CHECK(p.groups[0] >= 1);
    CHECK(p.groups[1] >= 1);
    CHECK(p.base[0] + p.groups[0] <= g[0]);
    CHECK(p.base[1] + p.groups[1] <= g[1]);
    CHECK(starts.insert({p.base[0], p.base[1]}).second);
    covered += uint64_t{p.groups[0]} * p.groups[1];
  }
  CHECK(covered == uint64_t{g[0]} * g[1]);
  return cut.pieces();
}

}  // namespace

TEST_CASE("the largest legal spin is cut one workgroup per piece, each at most kMaxPieceCost") {
  shaders::SpinPush p{61440u * 256, 1u << 20, 1};
  auto cut = DispatchCut::Make(Id(KernelId::kSpin), {61440, 1, 1}, shaders::PushBytes(p));
  REQUIRE(cut.ok());
  CHECK(cut->piece_cost() <= kMaxPieceCost);
  CHECK(CheckTiles(*cut, {61440, 1, 1}) == 61440);
}

TEST_CASE("cheap grids are one piece; dear ones are cut along x or by rows") {
  shaders::SpinPush cheap{4096, 16, 1};
  auto one = DispatchCut::Make(Id(KernelId::kSpin), {16, 1, 1}, shaders::PushBytes(cheap));
  REQUIRE(one.ok());
  CHECK(one->pieces() == 1);
  shaders::SpinPush dear{32768, 4096, 1};  // a group costs 2^20
  auto x = DispatchCut::Make(Id(KernelId::kSpin), {128, 1, 1}, shaders::PushBytes(dear));
  REQUIRE(x.ok());
  CHECK(CheckTiles(*x, {128, 1, 1}) == 2);
  CHECK(x->piece_cost() <= kSubmissionCostBudget);
  auto rows = DispatchCut::Make(Id(KernelId::kSpin), {64, 2, 1}, shaders::PushBytes(dear));
  REQUIRE(rows.ok());
  CHECK(CheckTiles(*rows, {64, 2, 1}) == 2);
  CHECK(rows->Piece(1).base[1] == 1);
  CHECK(rows->Piece(1).groups[0] == 64);  // whole rows: LinearIndex reads the grid width
  shaders::MatmulPush mm{4096, 4096, 4096};  // tiles: cut anywhere
  auto tiles = DispatchCut::Make(Id(KernelId::kMatmul), {256, 256, 1}, shaders::PushBytes(mm));
  REQUIRE(tiles.ok());
  CheckTiles(*tiles, {256, 256, 1});
  CHECK(tiles->piece_cost() <= kSubmissionCostBudget);
}

TEST_CASE("on a shared engine the same dispatch is cut to the smaller budget (F7 pieces)") {
  // The noisy-neighbour study's heavy kernel: 16 groups of ~2^19 each, one piece alone.
  shaders::SpinPush heavy{4096, 2048, 1};
  auto alone = DispatchCut::Make(Id(KernelId::kSpin), {16, 1, 1}, shaders::PushBytes(heavy));
  REQUIRE(alone.ok());
  CHECK(alone->pieces() == 1);
  auto shared = DispatchCut::Make(Id(KernelId::kSpin), {16, 1, 1}, shaders::PushBytes(heavy), kSharedSubmissionCostBudget);
  REQUIRE(shared.ok());
  CHECK(shared->piece_cost() <= kSharedSubmissionCostBudget);
  CHECK(CheckTiles(*shared, {16, 1, 1}) == 8);
  CHECK(shared->total_cost() == alone->total_cost());
  // A group dearer than the budget is still one piece (a workgroup is never cut).
  shaders::SpinPush dear{32768, 8192, 1};  // a group costs 2^21
  auto one_group = DispatchCut::Make(Id(KernelId::kSpin), {4, 1, 1}, shaders::PushBytes(dear), kSharedSubmissionCostBudget);
  REQUIRE(one_group.ok());
  CHECK(CheckTiles(*one_group, {4, 1, 1}) == 4);
}

TEST_CASE("a shared engine's pieces hold a workgroup for each lane of the device, so they still fill it") {
  CHECK(SubmissionBudget(false, 2) == kSubmissionCostBudget);
  CHECK(SubmissionBudget(true, 1) == kSharedSubmissionCostBudget);
  CHECK(SubmissionBudget(true, 0) == kSharedSubmissionCostBudget);  // unknown: one lane
  CHECK(SubmissionBudget(true, 4) == 4 * kSharedSubmissionCostBudget);
  CHECK(SubmissionBudget(true, 1000) == 64 * kSharedSubmissionCostBudget);  // bounded
  // The study's spin ~3000 us: 16 groups of 256 x 4096 rounds, 2^20 a group. One lane's
  // budget makes 16 pieces of one group (one of two lavapipe threads idle while each runs);
  // two lanes' make 8 of two.
  shaders::SpinPush p{4096, 4096, 1};
  auto one = DispatchCut::Make(Id(KernelId::kSpin), {16, 1, 1}, shaders::PushBytes(p), SubmissionBudget(true, 1));
  REQUIRE(one.ok());
  CHECK(CheckTiles(*one, {16, 1, 1}) == 16);
  auto two = DispatchCut::Make(Id(KernelId::kSpin), {16, 1, 1}, shaders::PushBytes(p), SubmissionBudget(true, 2));
  REQUIRE(two.ok());
  CHECK(CheckTiles(*two, {16, 1, 1}) == 8);
  // spin ~10000 us: a group costs 2^22, over any budget here. One group a piece leaves a
  // lane idle; min_groups keeps one group per lane in each piece (no longer in time).
  shaders::SpinPush dear{4096, 16384, 1};
  auto lone = DispatchCut::Make(Id(KernelId::kSpin), {16, 1, 1}, shaders::PushBytes(dear), SubmissionBudget(true, 2));
  REQUIRE(lone.ok());
  CHECK(CheckTiles(*lone, {16, 1, 1}) == 16);
  auto paired =
      DispatchCut::Make(Id(KernelId::kSpin), {16, 1, 1}, shaders::PushBytes(dear), SubmissionBudget(true, 2), 2);
  REQUIRE(paired.ok());
  CHECK(CheckTiles(*paired, {16, 1, 1}) == 8);
  CHECK(paired->piece_cost() == 2 * (256ull * 16384));
  auto three = DispatchCut::Make(Id(KernelId::kSpin), {2, 1, 1}, shaders::PushBytes(dear), SubmissionBudget(true, 4), 4);
  REQUIRE(three.ok());
  CHECK(CheckTiles(*three, {2, 1, 1}) == 1);  // never more groups than the row has
}

TEST_CASE("a shared engine's pieces are whole rounds of its lanes, evened out") {
  // The study's spin ~3000 us (1598 iterations): a group costs 256 x 1598, two lanes' budget
  // fits 5. Pieces of 5,5,5,1 would take 3+3+3+1 = 10 rounds of the two lanes where the grid
  // needs 8; pieces of 4 take 8.
  shaders::SpinPush p{4096, 1598, 1};
  auto cut = DispatchCut::Make(Id(KernelId::kSpin), {16, 1, 1}, shaders::PushBytes(p), SubmissionBudget(true, 2), 2);
  REQUIRE(cut.ok());
  CHECK(CheckTiles(*cut, {16, 1, 1}) == 4);
  uint64_t rounds = 0;
  for (uint64_t i = 0; i < cut->pieces(); ++i) {
    CHECK(cut->Piece(i).groups[0] % 2 == 0);
    rounds += (cut->Piece(i).groups[0] + 1) / 2;
  }
  CHECK(rounds == 8);
  CHECK(cut->piece_cost() <= SubmissionBudget(true, 2));
  // Evened out: 18 groups of 2^18, of which two lanes' budget fits 8: 6,6,6 rather than 8,8,2.
  shaders::SpinPush cheap{18 * 256, 1024, 1};
  auto even = DispatchCut::Make(Id(KernelId::kSpin), {18, 1, 1}, shaders::PushBytes(cheap), SubmissionBudget(true, 2), 2);
  REQUIRE(even.ok());
  CHECK(CheckTiles(*even, {18, 1, 1}) == 3);
  for (uint64_t i = 0; i < even->pieces(); ++i) CHECK(even->Piece(i).groups[0] == 6);
  // One lane: any count is a whole round; still evened (16 groups, 5 fit: 4,4,4,4).
  auto lone = DispatchCut::Make(Id(KernelId::kSpin), {16, 1, 1}, shaders::PushBytes(p), SubmissionBudget(true, 2), 1);
  REQUIRE(lone.ok());
  CHECK(CheckTiles(*lone, {16, 1, 1}) == 4);
  // Fewer groups than lanes' budget allows: the whole row, one piece, as before.
  auto whole = DispatchCut::Make(Id(KernelId::kSpin), {4, 1, 1}, shaders::PushBytes(p), SubmissionBudget(true, 2), 2);
  REQUIRE(whole.ok());
  CHECK(CheckTiles(*whole, {4, 1, 1}) == 1);
}

TEST_CASE("a multi-row spin whose row is over the piece bound is refused kLimitExceeded") {
  shaders::SpinPush p{65535u * 256 * 2, 1u << 20, 1};
  auto cut = DispatchCut::Make(Id(KernelId::kSpin), {65535, 2, 1}, shaders::PushBytes(p));
  CHECK(cut.code() == Errc::kLimitExceeded);
}

TEST_CASE("SliceRange cuts spans at the slice's edges") {
  ResolvedRange r{GpuVa{0x1000}, ByteSize{3 * kPageSize}, true, {}};
  for (uint64_t i = 0; i < 3; ++i)
    r.spans.push_back({GpuVa{0x1000 + i * kPageSize}, GttTarget{true, 0x10000 * (i + 1), true}, ByteSize{kPageSize}});
  ResolvedRange s = SliceRange(r, kPageSize - 8, kPageSize + 16);
  REQUIRE(s.spans.size() == 3);
  CHECK(s.spans[0].target.page_addr == 0x10000 + kPageSize - 8);
  CHECK(s.spans[0].size.v == 8);
  CHECK(s.spans[1].size.v == kPageSize);
  CHECK(s.spans[2].target.page_addr == 0x30000);
  CHECK(s.spans[2].size.v == 8);
  CHECK(s.va.v == 0x1000 + kPageSize - 8);
}

TEST_CASE("every catalogue kernel has a cost rule; the largest 2-D rectangle is cut within the budget") {
  // A kernel without a row cannot be dispatched, so a new kernel cannot run unbounded by omission.
  for (const shaders::KernelDesc& k : shaders::AllKernels()) {
    CAPTURE(k.name);
    std::vector<std::byte> push(k.push_size);
    CHECK(DispatchCut::Make(k.raw_id(), {1, 1, 1}, push).ok());
  }
  // F10: a 16384 x 16384 fill_rect (the push limits' largest) is 1024 x 1024 groups of 256 pixels.
  shaders::FillRectPush p{16384, 16384, 16384, 7};
  const std::array<uint32_t, 3> g = shaders::Groups2D(*shaders::FindKernel(KernelId::kFillRect), 16384, 16384);
  CHECK(g == std::array<uint32_t, 3>{1024, 1024, 1});
  for (uint64_t budget : {kSubmissionCostBudget, kSharedSubmissionCostBudget}) {
    auto cut = DispatchCut::Make(Id(KernelId::kFillRect), g, shaders::PushBytes(p), budget);
    REQUIRE(cut.ok());
    CHECK(cut->piece_cost() <= budget);
    CHECK(cut->total_cost() == uint64_t{16384} * 16384);
    CheckTiles(*cut, g);
  }
}
