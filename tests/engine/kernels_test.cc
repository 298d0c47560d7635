// Every catalogue kernel on the engine's device against its CPU reference, over sizes
// that are and are not multiples of the workgroup size. Integer kernels must match
// exactly; float kernels within the tolerances stated in shaders/reference.h.
#include <cmath>

#include "fixture.h"

using namespace vg;
using namespace vg::engine;
using namespace vg::engine::testing;
using namespace vg::shaders;

namespace {

// Runs `id` on the GPU over buffers initialised from `data` and on the CPU over copies;
// returns {gpu, cpu} contents of every binding.
struct Outputs {
  std::vector<std::vector<std::byte>> gpu, cpu;
};
Outputs RunBoth(KernelId id, std::span<const std::byte> push, std::array<uint32_t, 3> groups,
                std::vector<std::vector<std::byte>> data) {
  Engine& e = TheEngine();
  std::vector<BufferRange> bindings;
  for (auto& d : data) bindings.push_back(Whole(MakeBuffer(e, d)));
  Submission s;
  s.Dispatch(static_cast<uint32_t>(id), groups, bindings, push);
  auto r = e.SubmitAndWait(std::move(s));
  REQUIRE_MESSAGE(r.ok(), r.error().ToString());
  Outputs out;
  for (auto& b : bindings) {
    auto m = b.buffer->Map();
    out.gpu.emplace_back(m.begin(), m.end());
  }
  std::vector<std::span<std::byte>> spans;
  for (auto& d : data) spans.emplace_back(d);
  auto rr = RunReference(static_cast<uint32_t>(id), push, spans, groups);
  REQUIRE_MESSAGE(rr.ok(), rr.error().ToString());
  out.cpu = std::move(data);
  return out;
}

const KernelDesc& K(KernelId id) { return *FindKernel(id); }

constexpr uint32_t kSizes1D[] = {1, 3, 255, 256, 257, 1000, 4099, 65537};

}  // namespace

TEST_CASE("fill") {
  for (uint32_t n : kSizes1D) {
    CAPTURE(n);
    FillPush p{n, 0xa5a5a5a5u ^ n};
    // One spare word past `count` must stay untouched.
    auto o = RunBoth(KernelId::kFill, PushBytes(p), Groups1D(K(KernelId::kFill), n), {ToBytes(RandomU32(n + 1, n))});
    CHECK(o.gpu == o.cpu);
  }
}

TEST_CASE("fill: fewer groups than elements, and groups spilling into y") {
  FillPush p{1500, 9};
  auto partial = RunBoth(KernelId::kFill, PushBytes(p), {2, 1, 1}, {ToBytes(RandomU32(1500, 1))});
  CHECK(partial.gpu == partial.cpu);
  auto spill = RunBoth(KernelId::kFill, PushBytes(p), {2, 3, 1}, {ToBytes(RandomU32(1500, 2))});
  CHECK(spill.gpu == spill.cpu);
  CHECK(FromBytes<uint32_t>(spill.gpu[0])[1499] == 9);
}

TEST_CASE("copy") {
  for (uint32_t n : kSizes1D) {
    CAPTURE(n);
    CopyPush p{n};
    auto o = RunBoth(KernelId::kCopy, PushBytes(p), Groups1D(K(KernelId::kCopy), n),
                     {ToBytes(RandomU32(n, n)), ToBytes(RandomU32(n + 1, n + 7))});
    CHECK(o.gpu == o.cpu);
  }
}

TEST_CASE("saxpy (f32, tolerance kSaxpyRelTol)") {
  for (uint32_t n : kSizes1D) {
    CAPTURE(n);
    SaxpyPush p{n, 1.75f};
    auto x = RandomF32(n, n), y = RandomF32(n, n + 1);
    auto o = RunBoth(KernelId::kSaxpy, PushBytes(p), Groups1D(K(KernelId::kSaxpy), n), {ToBytes(x), ToBytes(y)});
    auto g = FromBytes<float>(o.gpu[1]), c = FromBytes<float>(o.cpu[1]);
    REQUIRE(g.size() == n);
    for (uint32_t i = 0; i < n; ++i) {
      float tol = kSaxpyRelTol * (std::fabs(p.a * x[i]) + std::fabs(y[i])) + kAbsTol;
      if (std::fabs(g[i] - c[i]) > tol) FAIL_CHECK("i=" << i << " gpu=" << g[i] << " cpu=" << c[i]);
    }
    CHECK(o.gpu[0] == o.cpu[0]);  // x is read-only
  }
}

TEST_CASE("matmul (f32 tiled, tolerance kMatmulRelTol)") {
  struct Dims {
    uint32_t m, n, k;
  };
  for (Dims d : {Dims{1, 1, 1}, Dims{16, 16, 16}, Dims{17, 15, 33}, Dims{5, 40, 3}, Dims{64, 48, 70}}) {
    CAPTURE(d.m);
    CAPTURE(d.n);
    CAPTURE(d.k);
    MatmulPush p{d.m, d.n, d.k};
    auto a = RandomF32(size_t{d.m} * d.k, d.m), b = RandomF32(size_t{d.k} * d.n, d.n);
    auto o = RunBoth(KernelId::kMatmul, PushBytes(p), Groups2D(K(KernelId::kMatmul), d.n, d.m),
                     {ToBytes(a), ToBytes(b), ToBytes(RandomF32(size_t{d.m} * d.n, 3))});
    auto g = FromBytes<float>(o.gpu[2]), c = FromBytes<float>(o.cpu[2]);
    for (uint32_t r = 0; r < d.m; ++r)
      for (uint32_t col = 0; col < d.n; ++col) {
        float mag = 0;
        for (uint32_t i = 0; i < d.k; ++i) mag += std::fabs(a[r * d.k + i] * b[i * d.n + col]);
        float gv = g[r * d.n + col], cv = c[r * d.n + col];
        if (std::fabs(gv - cv) > kMatmulRelTol * mag + kAbsTol)
          FAIL_CHECK("r=" << r << " c=" << col << " gpu=" << gv << " cpu=" << cv);
      }
  }
}

TEST_CASE("reduce_sum (u32, exact, accumulates into out[0])") {
  for (uint32_t n : kSizes1D) {
    CAPTURE(n);
    ReduceSumPush p{n};
    std::vector<uint32_t> out = {7, 0xdeadbeef};
    auto o = RunBoth(KernelId::kReduceSum, PushBytes(p), Groups1D(K(KernelId::kReduceSum), n),
                     {ToBytes(RandomU32(n, n)), ToBytes(out)});
    CHECK(o.gpu == o.cpu);
  }
}

TEST_CASE("reduce_sum: grid-stride covers every element with few groups") {
  for (auto [n, g] : {std::pair{65537u, 1u}, {65537u, 3u}, {1000u, 2u}, {100u, 7u}}) {
    CAPTURE(n);
    CAPTURE(g);
    ReduceSumPush p{n};
    auto o = RunBoth(KernelId::kReduceSum, PushBytes(p), {g, 1, 1}, {ToBytes(RandomU32(n, n)), ToBytes(std::vector<uint32_t>{0})});
    CHECK(o.gpu == o.cpu);
  }
}

TEST_CASE("blur3x3 (u32, exact)") {
  for (auto [w, h] : {std::pair{1u, 1u}, {2u, 3u}, {16u, 16u}, {15u, 17u}, {64u, 33u}}) {
    CAPTURE(w);
    CAPTURE(h);
    Blur3x3Push p{w, h};
    auto src = RandomU32(size_t{w} * h, w * 100 + h);
    for (auto& v : src) v >>= 8;  // room for the weighted sum, so the test is about the stencil
    auto o = RunBoth(KernelId::kBlur3x3, PushBytes(p), Groups2D(K(KernelId::kBlur3x3), w, h),
                     {ToBytes(src), ToBytes(RandomU32(size_t{w} * h, 5))});
    CHECK(o.gpu == o.cpu);
  }
}

TEST_CASE("spin (u32, exact)") {
  for (uint32_t n : {1u, 300u, 1000u}) {
    for (uint32_t it : {0u, 1u, 100u}) {
      CAPTURE(n);
      CAPTURE(it);
      SpinPush p{n, it, 0x1234u + it};
      auto o = RunBoth(KernelId::kSpin, PushBytes(p), Groups1D(K(KernelId::kSpin), n), {ToBytes(RandomU32(n, 1))});
      CHECK(o.gpu == o.cpu);
    }
  }
}

TEST_CASE("ops run in order within a submission") {
  Engine& e = TheEngine();
  const uint32_t n = 3000;
  auto a = MakeBuffer(e, ToBytes(std::vector<uint32_t>(n, 0)));
  auto b = MakeBuffer(e, ToBytes(std::vector<uint32_t>(n, 0)));
  auto sum = MakeBuffer(e, ToBytes(std::vector<uint32_t>(1, 0)));
  Submission s;
  s.Fill(a, ByteSize{0}, ByteSize{n * 4}, 3);
  s.Dispatch(2, Groups1D(K(KernelId::kCopy), n), {Whole(a), Whole(b)}, PushBytes(CopyPush{n}));
  s.Dispatch(5, Groups1D(K(KernelId::kReduceSum), n), {Whole(b), Whole(sum)},
             PushBytes(ReduceSumPush{n}));
  s.Copy(b, ByteSize{0}, a, ByteSize{4}, ByteSize{4});
  REQUIRE(e.SubmitAndWait(std::move(s)).ok());
  CHECK(FromBytes<uint32_t>(sum->Map())[0] == 3 * n);
  CHECK(FromBytes<uint32_t>(a->Map())[1] == 3);
}
