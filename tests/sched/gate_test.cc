// The worker's gate between its engine and the host scheduler (tools/vgpud-worker/
// sched_gate.h), driven directly: what it admits to the device under a grant, contended
// or not, and what it tells the executor about piece sizes. The daemon-level behaviour is
// tests/sched/share_test.cc.
#include <doctest/doctest.h>

#include <vector>

#include "mediator/work_split.h"
#include "tools/vgpud-worker/sched_gate.h"

namespace vg::worker {
namespace {

namespace ch = daemon::channel;

struct Rig {
  std::vector<ch::Record> sent;
  SchedGate gate{[this](const ch::Record& r) { sent.push_back(r); }};
  Rig() {
    GateConfig c;
    c.scheduled = true;
    c.idle_grace_ns = 200'000;
    gate.Configure(c);
  }
};

engine::Submission Piece(uint64_t cost) {
  engine::Submission s;
  s.guest_submissions = 1;
  s.cost = cost;
  return s;
}

constexpr uint64_t kPiece = mediator::kSharedSubmissionCostBudget;

TEST_CASE("under the scheduler the executor is asked for small submissions; unscheduled it is not") {
  Rig r;
  CHECK(r.gate.PrefersSmallSubmissions());
  r.gate.Configure(GateConfig{});
  CHECK_FALSE(r.gate.PrefersSmallSubmissions());
}

TEST_CASE("without a grant nothing is admitted and the grant is asked for once") {
  Rig r;
  CHECK_FALSE(r.gate.Admit(Piece(kPiece)));
  CHECK_FALSE(r.gate.Admit(Piece(kPiece)));
  REQUIRE(r.sent.size() == 1);
  CHECK(r.sent[0].kind == ch::Kind::kSchedRequest);
}

TEST_CASE("an uncontended grant keeps about two pieces on the device, not the executor's whole pipeline") {
  Rig r;
  r.gate.OnGrant(1, /*contended=*/false);
  CHECK(r.gate.Admit(Piece(kPiece)));
  CHECK(r.gate.Admit(Piece(kPiece)));
  CHECK_FALSE(r.gate.Admit(Piece(kPiece)));  // a third would be a waiter's extra wait
  r.gate.Ran(1'000'000, false, kPiece);
  CHECK(r.gate.Admit(Piece(kPiece)));
  // Small work pipelines deeper: the bound is cost, not count.
  for (int i = 0; i < 2; ++i) r.gate.Ran(1'000'000, i == 1, kPiece);
  for (int i = 0; i < 16; ++i) CHECK(r.gate.Admit(Piece(4096)));
}

TEST_CASE("an uncontended grant lets two dear pieces on, not one: no gap after each") {
  // Pieces of workgroups that cannot be cut may cost more than the budget each.
  Rig r;
  r.gate.OnGrant(1, /*contended=*/false);
  CHECK(r.gate.Admit(Piece(3 * kPiece)));
  CHECK(r.gate.Admit(Piece(3 * kPiece)));
  CHECK_FALSE(r.gate.Admit(Piece(3 * kPiece)));
  r.gate.Ran(1'000'000, false, 3 * kPiece);
  CHECK(r.gate.Admit(Piece(3 * kPiece)));
}

TEST_CASE("a contended grant keeps one piece on the device") {
  Rig r;
  r.gate.OnGrant(1, /*contended=*/true);
  CHECK(r.gate.Admit(Piece(4096)));
  CHECK_FALSE(r.gate.Admit(Piece(4096)));
  r.gate.Ran(100'000, true, 4096);
  CHECK(r.gate.Admit(Piece(4096)));
}

}  // namespace
}  // namespace vg::worker
