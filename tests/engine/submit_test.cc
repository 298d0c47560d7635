// Submission paths: asynchronous completion (callback, eventfd, token), several
// submitters at once, every named refusal, device loss reaching every pending submitter.
#include <atomic>
#include <cstdlib>
#include <thread>

#include "base/fd.h"
#include "fixture.h"

using namespace vg;
using namespace vg::engine;
using namespace vg::engine::testing;
using namespace vg::shaders;
using namespace std::chrono_literals;

namespace {
const KernelDesc& K(KernelId id) { return *FindKernel(id); }
}  // namespace

TEST_CASE("completion reaches the callback, the eventfd and the token") {
  Engine& e = TheEngine();
  auto b = e.CreateBuffer(ByteSize{4096});
  REQUIRE(b.ok());
  auto efd = EventFd::Create();
  REQUIRE(efd.ok());
  std::atomic<int> calls{0};
  std::atomic<bool> cb_ok{false};
  Submission s;
  s.Fill(*b, ByteSize{0}, ByteSize{4096}, 42);
  auto t = e.Submit(std::move(s), {[&](const Result<>& r) {
                                      cb_ok = r.ok();
                                      ++calls;
                                    },
                                    &*efd});
  REQUIRE(t.ok());
  auto n = efd->Wait(10000);
  REQUIRE(n.ok());
  CHECK(*n == 1);
  CHECK((*t)->Done());
  CHECK((*t)->Status().ok());
  CHECK(calls == 1);
  CHECK(cb_ok);
  CHECK(FromBytes<uint32_t>((*b)->Map())[1023] == 42);
  // An empty submission is a bare fence.
  auto empty = e.Submit({});
  REQUIRE(empty.ok());
  CHECK((*empty)->Wait(10s).ok());
  CHECK((*empty)->serial() > (*t)->serial());
  CHECK(e.WaitIdle().ok());
}

TEST_CASE("several submitters at once, each with its own buffers") {
  Engine& e = TheEngine();
  constexpr int kThreads = 4, kPerThread = 12;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      const uint32_t n = 1000 + 37 * t;
      auto src = e.CreateBuffer(ByteSize{n * 4});
      auto sum = e.CreateBuffer(ByteSize{4});
      if (!src.ok() || !sum.ok()) {
        ++failures;
        return;
      }
      for (int i = 0; i < kPerThread; ++i) {
        uint32_t v = static_cast<uint32_t>(t * 1000 + i);
        Submission s;
        s.Fill(*src, ByteSize{0}, ByteSize{n * 4}, v);
        s.Fill(*sum, ByteSize{0}, ByteSize{4}, 0);
        s.Dispatch(5, Groups1D(K(KernelId::kReduceSum), n), {Whole(*src), Whole(*sum)}, PushBytes(ReduceSumPush{n}));
        // Alternate the synchronous and the asynchronous path.
        Result<> r = Ok();
        if (i % 2) {
          r = e.SubmitAndWait(std::move(s));
        } else {
          auto tok = e.Submit(std::move(s));
          r = tok.ok() ? (*tok)->Wait(30s) : Result<>(tok.error());
        }
        if (!r.ok() || FromBytes<uint32_t>((*sum)->Map())[0] != v * n) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(failures == 0);
}

TEST_CASE("refusals are named errors and queue nothing") {
  Engine& e = TheEngine();
  auto b = e.CreateBuffer(ByteSize{4096});
  auto small = e.CreateBuffer(ByteSize{64});
  REQUIRE(b.ok());
  REQUIRE(small.ok());
  auto one = [](auto&& build) {
    Submission s;
    build(s);
    return s;
  };
  auto fill_dispatch = [&](std::array<uint32_t, 3> g, BufferRange r, uint32_t count) {
    return one([&](Submission& s) { s.Dispatch(1, g, {std::move(r)}, PushBytes(FillPush{count, 1})); });
  };
  struct Case {
    const char* what;
    Submission s;
    Errc want;
  };
  std::vector<Case> cases;
  cases.push_back({"unknown kernel 0", one([&](Submission& s) { s.Dispatch(0, {1, 1, 1}, {Whole(*b)}, {}); }),
                   Errc::kBadKernel});
  cases.push_back({"unknown kernel 99", one([&](Submission& s) {
                     s.Dispatch(99, {1, 1, 1}, {Whole(*b)}, PushBytes(FillPush{1, 1}));
                   }),
                   Errc::kBadKernel});
  cases.push_back({"binding count", one([&](Submission& s) {
                     s.Dispatch(1, {1, 1, 1}, {Whole(*b), Whole(*b)}, PushBytes(FillPush{1, 1}));
                   }),
                   Errc::kBadKernel});
  cases.push_back({"push size", one([&](Submission& s) {
                     s.Dispatch(1, {1, 1, 1}, {Whole(*b)}, PushBytes(CopyPush{1}));
                   }),
                   Errc::kBadKernel});
  cases.push_back({"null buffer", fill_dispatch({1, 1, 1}, {nullptr, ByteSize{0}, ByteSize{4}}, 1),
                   Errc::kInvalidArgument});
  cases.push_back({"zero groups", fill_dispatch({0, 1, 1}, Whole(*b), 1), Errc::kInvalidArgument});
  cases.push_back({"too many groups (device)", fill_dispatch({70000, 1, 1}, Whole(*b), 1), Errc::kLimitExceeded});
  cases.push_back({"too many groups (kernel z)", fill_dispatch({1, 1, 2}, Whole(*b), 1), Errc::kLimitExceeded});
  cases.push_back({"range past buffer", fill_dispatch({1, 1, 1}, {*b, ByteSize{4096}, ByteSize{16}}, 1),
                   Errc::kOutOfBounds});
  cases.push_back({"range wraps", fill_dispatch({1, 1, 1}, {*b, ByteSize{~uint64_t{0} - 3}, ByteSize{16}}, 1),
                   Errc::kOutOfBounds});
  cases.push_back({"binding smaller than count", fill_dispatch({1, 1, 1}, Whole(*small), 17), Errc::kOutOfBounds});
  cases.push_back({"binding offset alignment", fill_dispatch({1, 1, 1}, {*b, ByteSize{4}, ByteSize{64}}, 1),
                   Errc::kMisaligned});
  cases.push_back({"spin iterations", one([&](Submission& s) {
                     s.Dispatch(7, {1, 1, 1}, {Whole(*b)}, PushBytes(SpinPush{1, 1u << 30, 0}));
                   }),
                   Errc::kLimitExceeded});
  cases.push_back({"fill misaligned", one([&](Submission& s) { s.Fill(*b, ByteSize{2}, ByteSize{4}, 0); }),
                   Errc::kMisaligned});
  cases.push_back({"fill past end", one([&](Submission& s) { s.Fill(*b, ByteSize{4092}, ByteSize{8}, 0); }),
                   Errc::kOutOfBounds});
  cases.push_back({"copy past end", one([&](Submission& s) {
                     s.Copy(*b, ByteSize{0}, *small, ByteSize{32}, ByteSize{64});
                   }),
                   Errc::kOutOfBounds});
  cases.push_back({"copy overlap", one([&](Submission& s) {
                     s.Copy(*b, ByteSize{0}, *b, ByteSize{8}, ByteSize{64});
                   }),
                   Errc::kOverlap});
  cases.push_back({"zero-sized copy", one([&](Submission& s) {
                     s.Copy(*b, ByteSize{0}, *small, ByteSize{0}, ByteSize{0});
                   }),
                   Errc::kInvalidArgument});
  Submission many;
  for (size_t i = 0; i <= kMaxOpsPerSubmission; ++i) many.Fill(*b, ByteSize{0}, ByteSize{4}, 0);
  cases.push_back({"too many ops", std::move(many), Errc::kLimitExceeded});
  // The bad op is the second one: nothing of the first may run either.
  cases.push_back({"second op bad", one([&](Submission& s) {
                     s.Fill(*b, ByteSize{0}, ByteSize{4}, 0xbad);
                     s.Fill(*b, ByteSize{4096}, ByteSize{4}, 0);
                   }),
                   Errc::kOutOfBounds});

  auto before = e.Counters();
  for (auto& c : cases) {
    CAPTURE(c.what);
    auto v = e.Validate(c.s);
    CHECK(v.code() == c.want);
    auto r = e.Submit(std::move(c.s));
    CHECK(r.code() == c.want);
  }
  auto after = e.Counters();
  CHECK(after.submissions == before.submissions);
  CHECK(FromBytes<uint32_t>((*b)->Map())[0] == 0);
}

TEST_CASE("device selection: option and VGPUD_GPU") {
  CHECK(Engine::Create({.gpu = "no-such-gpu"}).code() == Errc::kNotFound);
  CHECK(Engine::Create({.gpu = "999"}).code() == Errc::kNotFound);
  auto list = Engine::ListDevices();
  REQUIRE(list.ok());
  REQUIRE(!list->empty());
  setenv("VGPUD_GPU", "no-such-gpu", 1);
  CHECK(Engine::Create({}).code() == Errc::kNotFound);
  CHECK(Engine::Create({.use_env = false}).ok());
  setenv("VGPUD_GPU", list->front().name.substr(0, 4).c_str(), 1);
  auto e = Engine::Create({});
  unsetenv("VGPUD_GPU");
  REQUIRE(e.ok());
  CHECK((*e)->Info().index == 0);
}

TEST_CASE("device loss reaches every pending submitter") {
  auto made = Engine::Create({});
  REQUIRE(made.ok());
  Engine& e = **made;
  const uint32_t n = 256 * 32;
  std::vector<BufferRef> bufs;
  std::vector<TokenRef> tokens;
  std::atomic<int> callbacks{0}, lost_callbacks{0};
  for (int i = 0; i < 4; ++i) {
    auto b = e.CreateBuffer(ByteSize{n * 4});
    REQUIRE(b.ok());
    Submission s;
    s.Dispatch(7, Groups1D(K(KernelId::kSpin), n), {Whole(*b)}, PushBytes(SpinPush{n, 20000, 1}));
    auto t = e.Submit(std::move(s), {[&](const Result<>& r) {
      ++callbacks;
      if (r.code() == Errc::kDeviceLost) ++lost_callbacks;
    }});
    REQUIRE(t.ok());
    tokens.push_back(*t);
  }
  e.SimulateDeviceLost();
  for (auto& t : tokens) {
    auto r = t->Wait(60s);
    CHECK((r.ok() || r.code() == Errc::kDeviceLost));
  }
  CHECK(tokens.back()->Status().code() == Errc::kDeviceLost);
  CHECK(e.WaitIdle().code() == Errc::kDeviceLost);
  CHECK(callbacks == 4);
  CHECK(lost_callbacks >= 1);
  CHECK(e.Counters().device_lost_reports == static_cast<uint64_t>(lost_callbacks.load()));
  Submission after;
  after.Fill(bufs.empty() ? *e.CreateBuffer(ByteSize{16}) : bufs[0], ByteSize{0}, ByteSize{4}, 0);
  CHECK(e.Submit(std::move(after)).code() == Errc::kDeviceLost);
}
