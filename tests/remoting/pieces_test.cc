// F7 on the remoting path: under the host scheduler a client's DISPATCH, COPY and FILL
// reach the engine in pieces of bounded cost (mediator/work_split.h, the mediated path's
// rules), so a preempt waits for one piece, not a whole kernel; alone (a gate that does not
// ask for small submissions) they go as before. The engine is real; the gate in front of it
// is this test's, counting what it is asked to admit.
#include <doctest.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "mediator/work_split.h"
#include "shaders/samples.h"
#include "tests/remoting/rig.h"
#include "tests/remoting/run_sample.h"

using namespace vg;
using namespace vg::remoting::testing;

namespace {

class CountingGate final : public engine::SubmitGate {
 public:
  explicit CountingGate(bool small) : small_(small) {}
  bool Admit(const engine::Submission& s) override {
    admitted_.fetch_add(1);
    uint64_t seen = max_cost_.load();
    while (s.cost > seen && !max_cost_.compare_exchange_weak(seen, s.cost)) {
    }
    return true;
  }
  void Ran(uint64_t, bool, uint64_t) override {}
  bool PrefersSmallSubmissions() const override { return small_; }
  uint64_t admitted() const { return admitted_.load(); }
  uint64_t max_cost() const { return max_cost_.load(); }

 private:
  const bool small_;
  std::atomic<uint64_t> admitted_{0}, max_cost_{0};
};

struct GatedEngine {
  CountingGate gate;
  std::unique_ptr<engine::Engine> engine;
  explicit GatedEngine(bool small) : gate(small) {
    auto e = engine::Engine::Create({});
    REQUIRE_MESSAGE(e.ok(), e.error().ToString());
    engine = std::move(e).value();
    engine->SetGate(&gate);
  }
  ~GatedEngine() { (void)engine->WaitIdle(); }
  // What one submission may cost under the scheduler on this engine.
  uint64_t Budget() const { return mediator::SubmissionBudget(true, engine->Info().parallel_groups); }
};

// 16 groups of 256 x 2048 spin rounds: 2^19 cost units a group, 2^23 in all.
shaders::KernelSample HeavySpin() {
  auto s = shaders::MakeSample(shaders::KernelId::kSpin, 4096, 7);
  shaders::SpinPush p{4096, 2048, 7};
  s.push.assign(shaders::PushBytes(p).begin(), shaders::PushBytes(p).end());
  return s;
}

uint64_t AdmittedFor(GatedEngine& g, guest::RemotingClient& c, const shaders::KernelSample& s) {
  const uint64_t before = g.gate.admitted();
  auto out = RunSample(c, s);
  REQUIRE_MESSAGE(out.ok(), out.error().ToString());
  auto chk = shaders::CheckSample(s, *out);
  CHECK_MESSAGE(chk.ok(), (chk.ok() ? std::string() : chk.error().ToString()));
  return g.gate.admitted() - before;
}

}  // namespace

TEST_CASE("under the scheduler a remoting DISPATCH is cut into pieces of the shared budget; results exact") {
  GatedEngine g(/*small=*/true);
  Rig rig(1, {}, *g.engine);
  auto c = rig.Connect(0);
  // 16 groups of 2^19: pieces of budget / 2^19 groups (2 per lane the device has), at
  // least that many submissions (the writes before it are host copies).
  INFO("budget ", g.Budget(), ", parallel groups ", g.engine->Info().parallel_groups);
  const uint64_t per_piece = std::clamp<uint64_t>(g.Budget() >> 19, 1, 16);
  CHECK(AdmittedFor(g, *c, HeavySpin()) >= (16 + per_piece - 1) / per_piece);
  CHECK(g.gate.max_cost() <= g.Budget());
}

TEST_CASE("alone (no small submissions asked) the same DISPATCH is one submission") {
  GatedEngine g(/*small=*/false);
  Rig rig(1, {}, *g.engine);
  auto c = rig.Connect(0);
  CHECK(AdmittedFor(g, *c, HeavySpin()) == 1);
  CHECK(g.gate.max_cost() == 16ull << 19);
}

TEST_CASE("under the scheduler COPY and FILL go in chunks of the shared budget, bytes exact") {
  GatedEngine g(/*small=*/true);
  Rig rig(1, {}, *g.engine);
  auto c = rig.Connect(0);
  const uint64_t bytes = 3 * g.Budget() + 4096;
  auto a = c->CreateBuffer(bytes);
  auto b = c->CreateBuffer(bytes);
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  REQUIRE(c->Fill(*a, 0, bytes, 0x5a5a5a5au).ok());
  REQUIRE(c->Copy(*a, 0, *b, 0, bytes).ok());
  auto seq = c->Submit();
  REQUIRE(seq.ok());
  REQUIRE(c->Wait(*seq).ok());
  CHECK(g.gate.admitted() >= 8);  // 4 chunks each
  CHECK(g.gate.max_cost() <= g.Budget());
  std::vector<std::byte> back(64 << 10);
  for (uint64_t off : {uint64_t{0}, bytes / 2, bytes - back.size()}) {
    REQUIRE(c->Read(*b, off, back).ok());
    CHECK(std::all_of(back.begin(), back.end(), [](std::byte x) { return x == std::byte{0x5a}; }));
  }
}
