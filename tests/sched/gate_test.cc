// The worker's gate between its engine and the host scheduler (tools/vgpud-worker/
// sched_gate.h), driven directly: what it admits to the device under a grant, contended
// or not, and what it tells the executor about piece sizes. The daemon-level behaviour is
// tests/sched/share_test.cc.
#include <doctest/doctest.h>

#include <chrono>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "mediator/work_split.h"
#include "tools/vgpud-worker/sched_gate.h"

namespace vg::worker {
namespace {

namespace ch = daemon::channel;

struct Rig {
  std::vector<ch::Record> sent;
  SchedGate gate{[this](const ch::Record& r) { sent.push_back(r); }};
  explicit Rig(uint64_t slice_ns = 0) {
    GateConfig c;
    c.scheduled = true;
    c.idle_grace_ns = 200'000;
    c.slice_ns = slice_ns;
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

// Whether the gate has given its grant back.
bool released(const Rig& r) {
  for (const ch::Record& x : r.sent)
    if (x.kind == ch::Kind::kSchedRelease) return true;
  return false;
}

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

TEST_CASE("a grant younger than a slice keeps one piece on the device, uncontended too; then two") {
  // A grant that follows another vGPU's release often meets it again within the slice (a
  // thinking or closed-loop tenant back a few hundred microseconds later): what is on the
  // device then is its wait.
  Rig r(/*slice_ns=*/5'000'000);
  SchedGate& gate = r.gate;
  gate.OnGrant(1, /*contended=*/false);
  CHECK(gate.Admit(Piece(kPiece)));
  CHECK_FALSE(gate.Admit(Piece(kPiece)));  // young: one piece
  std::this_thread::sleep_for(std::chrono::milliseconds(6));
  gate.Ran(1'000'000, true, kPiece);
  CHECK(gate.Admit(Piece(kPiece)));
  CHECK(gate.Admit(Piece(kPiece)));  // a slice old: the pipeline of two
  CHECK_FALSE(gate.Admit(Piece(kPiece)));
  // A new grant is young again.
  gate.OnPreempt(1);
  gate.Ran(1'000'000, false, kPiece);
  gate.Ran(1'000'000, true, kPiece);
  gate.OnGrant(2, /*contended=*/false);
  CHECK(gate.Admit(Piece(kPiece)));
  CHECK_FALSE(gate.Admit(Piece(kPiece)));
}

TEST_CASE("a preempt sent ahead takes effect at its time, at the first piece boundary after it") {
  Rig r;
  r.gate.OnGrant(1, /*contended=*/true);
  REQUIRE(r.gate.Admit(Piece(kPiece)));
  r.gate.OnPreempt(1, std::chrono::steady_clock::now() + std::chrono::milliseconds(3));
  CHECK_FALSE(released(r));
  r.gate.Ran(100'000, true, kPiece);
  CHECK_FALSE(released(r));
  CHECK(r.gate.Admit(Piece(kPiece)));  // before its time: the next piece still goes
  std::this_thread::sleep_for(std::chrono::milliseconds(4));
  CHECK_FALSE(r.gate.Admit(Piece(kPiece)));  // its time has come: nothing more to the device
  CHECK_FALSE(released(r));                   // one piece still on it
  r.gate.Ran(100'000, true, kPiece);
  REQUIRE(released(r));                       // the piece boundary
  CHECK(r.sent.back().values[static_cast<size_t>(ch::SchedReleaseSlot::kWants)] == 1);  // a piece is held
  CHECK(r.gate.Stats().preempts == 1);
  // A preempt whose time has passed, or that has none, is at once.
  Rig now;
  now.gate.OnGrant(7, /*contended=*/true);
  now.gate.OnPreempt(7, std::chrono::steady_clock::now() - std::chrono::milliseconds(1));
  CHECK(released(now));
}

TEST_CASE("a contended grant keeps one piece on the device") {
  Rig r;
  r.gate.OnGrant(1, /*contended=*/true);
  CHECK(r.gate.Admit(Piece(4096)));
  CHECK_FALSE(r.gate.Admit(Piece(4096)));
  r.gate.Ran(100'000, true, 4096);
  CHECK(r.gate.Admit(Piece(4096)));
}

TEST_CASE("a contended holder that leaves the device idle more than a third of the time gives the grant back at once") {
  // A closed-loop guest of small work: between its submissions the device waits for the
  // guest's own turnaround, shorter than the idle grace, so the grace alone would let it keep
  // the grant for a slice while the others wait and the device idles.
  Rig sparse;
  sparse.gate.OnGrant(1, /*contended=*/true);
  REQUIRE(sparse.gate.Admit(Piece(4096)));
  std::this_thread::sleep_for(std::chrono::milliseconds(3));
  sparse.gate.Ran(100'000, true, 4096);  // 0.1 ms of device time in 3 ms of grant
  CHECK(released(sparse));  // no grace: nothing of it is on the device
  CHECK(sparse.gate.Stats().idle_releases == 1);
  // A busy holder (the device ran its work the whole time) keeps the grace: work may follow.
  Rig busy;
  busy.gate.OnGrant(1, /*contended=*/true);
  REQUIRE(busy.gate.Admit(Piece(kPiece)));
  std::this_thread::sleep_for(std::chrono::milliseconds(3));
  busy.gate.Ran(3'000'000, true, kPiece);
  CHECK_FALSE(released(busy));
  CHECK(busy.gate.Admit(Piece(kPiece)));  // its next piece, under the same grant
  // A fresh grant that has run nothing yet is not judged: what it asked for is on its way.
  Rig fresh;
  fresh.gate.OnGrant(1, /*contended=*/true);
  std::this_thread::sleep_for(std::chrono::milliseconds(1));
  CHECK(fresh.gate.Admit(Piece(4096)));
  CHECK_FALSE(released(fresh));
}

TEST_CASE("partitioned (fit_pieces): a piece goes only if the vGPU's recent pieces say it completes before the preempt") {
  using std::chrono::milliseconds;
  using Clock = std::chrono::steady_clock;
  auto make = [](bool fit) {
    auto r = std::make_unique<Rig>();
    GateConfig c;
    c.scheduled = true;
    c.idle_grace_ns = 200'000;
    c.fit_pieces = fit;
    r->gate.Configure(c);
    return r;
  };
  auto wants = [](const Rig& r) { return r.sent.back().values[static_cast<size_t>(ch::SchedReleaseSlot::kWants)]; };
  // A fresh grant `g`: its preempt `left` from now, its window begun `into` ago. Whether a
  // piece goes.
  auto grant = [](Rig& x, uint64_t g, Clock::duration left, Clock::duration into) {
    const auto now = Clock::now();
    x.sent.clear();
    x.gate.OnGrant(g, true, now + left, now - into);
    return x.gate.Admit(Piece(kPiece));
  };
  auto r = make(true);
  auto t = Clock::now();
  // (Generous times: a loaded host's stalls must not decide a check.)
  r->gate.OnGrant(1, true, t + milliseconds(40), t);
  REQUIRE(r->gate.Admit(Piece(kPiece)));  // nothing known yet: it goes
  r->gate.Ran(10'000'000, true, kPiece);  // a 10 ms piece
  CHECK(r->gate.Admit(Piece(kPiece)));    // (about) 40 ms left: fits
  r->gate.Ran(10'000'000, true, kPiece);
  std::this_thread::sleep_for(milliseconds(32));
  CHECK_FALSE(r->gate.Admit(Piece(kPiece)));  // 8 ms left at most: would run past it
  REQUIRE(released(*r));
  CHECK(wants(*r) == 1);  // the piece is still held: it asks again
  // Longer than the whole window: no window would ever fit it, so it goes first in a grant
  // that came early in its window (the overrun is the scheduler's debt), and only first.
  CHECK(grant(*r, 2, milliseconds(5), {}));
  std::this_thread::sleep_for(milliseconds(6));
  r->gate.Ran(10'000'000, true, kPiece);  // it completes past the grant's preempt time
  CHECK_FALSE(r->gate.Admit(Piece(kPiece)));
  CHECK(released(*r));
  // ... not in a grant that came late in its window (the next one's start is its turn).
  CHECK_FALSE(grant(*r, 3, milliseconds(3), milliseconds(3)));
  CHECK(released(*r));
  CHECK(wants(*r) == 1);
  // ... and not within a second of a piece that ran past its grant's preempt time, early or
  // not: each runs into the next owner's slot, the overrun a sender makes on purpose.
  CHECK_FALSE(grant(*r, 4, milliseconds(5), {}));
  CHECK(released(*r));
  std::this_thread::sleep_for(std::chrono::milliseconds(1050));
  CHECK(grant(*r, 5, std::chrono::microseconds(300), {}));  // still longer than the window (its fixed cost), and its turn has come
  // Needing most of a window, not more: a late grant lets it go after one given back with
  // nothing run (grants that always come late, a loaded host, must still make progress).
  auto late = make(true);
  t = Clock::now();
  late->gate.OnGrant(1, true, t + milliseconds(40), t);
  REQUIRE(late->gate.Admit(Piece(kPiece)));
  late->gate.Ran(10'000'000, true, kPiece);  // 10 ms pieces
  late->gate.OnPreempt(1);                    // nothing on the device: released at once
  CHECK_FALSE(grant(*late, 2, milliseconds(8), milliseconds(17)));  // 8 of 25 ms left
  CHECK(released(*late));
  CHECK(grant(*late, 3, milliseconds(8), milliseconds(17)));
  CHECK_FALSE(released(*late));
  // Small pieces, then one far dearer: estimated at its cost (at their rate), not at their
  // length; else a guest could have a long piece admitted at its slot's end on purpose.
  auto big = make(true);
  t = Clock::now();
  big->gate.OnGrant(1, true, t + milliseconds(40), t);
  for (int i = 0; i < 8; ++i) {
    REQUIRE(big->gate.Admit(Piece(4096)));
    big->gate.Ran(100'000, true, 4096);  // 0.1 ms each
  }
  CHECK(big->gate.Admit(Piece(4096)));  // its like still fits
  big->gate.Ran(100'000, true, 4096);
  CHECK_FALSE(big->gate.Admit(Piece(4096 * 1000)));  // about 100 ms at that rate: not in 40
  CHECK(released(*big));
  // Without fit_pieces (every other policy) a preempt time lets pieces go until it comes.
  auto plain = make(false);
  t = Clock::now();
  plain->gate.OnGrant(1, true, t + milliseconds(40), t);
  REQUIRE(plain->gate.Admit(Piece(kPiece)));
  plain->gate.Ran(10'000'000, true, kPiece);
  std::this_thread::sleep_for(milliseconds(32));
  CHECK(plain->gate.Admit(Piece(kPiece)));
  CHECK_FALSE(released(*plain));
}

// The last kCarry the gate sent: the levels a successor would start from.
std::optional<GateConfig::Carried> LastCarry(const std::vector<ch::Record>& sent) {
  std::optional<GateConfig::Carried> c;
  for (const ch::Record& x : sent)
    if (x.kind == ch::Kind::kCarry)
      c = GateConfig::Carried{
          static_cast<double>(static_cast<int64_t>(x.values[static_cast<size_t>(ch::CarrySlot::kRateMilliTokens)])) / 1000,
          static_cast<double>(static_cast<int64_t>(x.values[static_cast<size_t>(ch::CarrySlot::kGpuTokensNs)]))};
  return c;
}

TEST_CASE("rate-limit buckets: full at first, a live change refills nothing, a successor starts where the last kCarry left them") {
  GateConfig c;
  c.rate_limit = 1;  // a submission a second: nothing refills within the test
  c.rate_burst = 5;
  std::vector<ch::Record> sent;
  SchedGate gate{[&](const ch::Record& r) { sent.push_back(r); }};
  gate.Configure(c);
  for (int i = 0; i < 5; ++i) CHECK(gate.Admit(Piece(4096)));
  CHECK_FALSE(gate.Admit(Piece(4096)));  // the burst is spent
  gate.Configure(c);                     // a live change (modify --live): still spent
  CHECK_FALSE(gate.Admit(Piece(4096)));
  auto carry = LastCarry(sent);
  REQUIRE(carry);
  CHECK(carry->rate_tokens < 1.0);  // told as it emptied, not 10 ms later
  // The worker dies; its successor's first config carries the level.
  GateConfig next = c;
  next.carried = carry;
  SchedGate successor{[](const ch::Record&) {}};
  successor.Configure(next);
  CHECK_FALSE(successor.Admit(Piece(4096)));
  // The contrast: started fresh, a crash would have refilled the burst.
  SchedGate fresh{[](const ch::Record&) {}};
  fresh.Configure(c);
  CHECK(fresh.Admit(Piece(4096)));
}

TEST_CASE("GPU-time bucket: a long piece's debt is told at once and a successor inherits it, never more than a full bucket") {
  GateConfig c;
  c.gpu_time_limit_ns = 100'000'000;  // 10 % of the engine
  c.gpu_time_burst_ns = 10'000'000;
  std::vector<ch::Record> sent;
  SchedGate gate{[&](const ch::Record& r) { sent.push_back(r); }};
  gate.Configure(c);
  REQUIRE(gate.Admit(Piece(kPiece)));
  gate.Ran(2'000'000'000, true, kPiece);  // 2 s of one uncut piece: 20 s of the limit in debt
  auto carry = LastCarry(sent);
  REQUIRE(carry);
  CHECK(carry->gpu_tokens_ns < -1.9e9);
  GateConfig next = c;
  next.carried = carry;
  SchedGate successor{[](const ch::Record&) {}};
  successor.Configure(next);
  CHECK_FALSE(successor.Admit(Piece(kPiece)));
  // A predecessor's word above a full bucket (a worker may lie) buys no more than the burst.
  next.carried = GateConfig::Carried{1e12, 1e18};
  SchedGate liar{[](const ch::Record&) {}};
  liar.Configure(next);
  REQUIRE(liar.Admit(Piece(kPiece)));
  liar.Ran(20'000'000, true, kPiece);  // 20 ms: twice the burst
  CHECK_FALSE(liar.Admit(Piece(kPiece)));
}

}  // namespace
}  // namespace vg::worker
