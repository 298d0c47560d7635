#include "tools/bench/native.h"

#include <chrono>
#include <cstring>
#include <algorithm>
#include <functional>
#include <random>

#include "base/fd.h"
#include "engine/engine.h"
#include "shaders/catalogue.h"

namespace vg::bench {
namespace {

using namespace vg::engine;
using namespace vg::shaders;
using Clock = std::chrono::steady_clock;

double Us(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }

Result<BufferRef> RandomBuffer(Engine& e, uint64_t bytes, uint32_t seed) {
  VG_TRY_ASSIGN(BufferRef b, e.CreateBuffer(ByteSize{bytes}));
  std::mt19937 rng(seed);
  auto m = b->Map();
  for (uint64_t i = 0; i + 4 <= bytes; i += 4) {
    float f = std::uniform_real_distribution<float>(-1, 1)(rng);
    std::memcpy(m.data() + i, &f, 4);
  }
  return b;
}

// Times `iters` synchronous round trips of `s` (after 3 warm-up runs, which also build
// the pipeline) and fills a row.
Result<Row> Time(Engine& e, std::string group, std::string name, const Submission& s, int iters, double work,
                 std::string unit, double unit_scale) {
  for (int i = 0; i < 3; ++i) VG_TRY_CTX(e.SubmitAndWait(s), "{} warm-up", name);
  std::vector<double> us;
  us.reserve(iters);
  for (int i = 0; i < iters; ++i) {
    Submission copy = s;
    auto t0 = Clock::now();
    VG_TRY_CTX(e.SubmitAndWait(std::move(copy)), "{}", name);
    us.push_back(Us(Clock::now() - t0));
  }
  Row r{std::move(group), std::move(name), Summarize(std::move(us)), 0, std::move(unit), ""};
  if (work > 0) r.rate = work / (r.us.p50 * 1e-6) / unit_scale;
  return r;
}

struct KernelCase {
  std::string name;
  Submission sub;
  double work = 0;  // units per submission (bytes, flops, pixels, iterations)
};

// One dispatch of `id` sized by `n` (elements, or the side of a square for 2-D kernels).
Result<KernelCase> MakeKernelCase(Engine& e, KernelId id, uint32_t n, uint32_t spin_iters = 0) {
  const KernelDesc& k = *FindKernel(id);
  KernelCase c;
  c.name = std::string(k.name);
  uint32_t kid = k.raw_id();
  uint64_t bytes = uint64_t{n} * 4;
  switch (id) {  // setup only: what each kernel needs is not expressible as one table row
    case KernelId::kFill: {
      VG_TRY_ASSIGN(auto b, e.CreateBuffer(ByteSize{bytes}));
      c.sub.Dispatch(kid, Groups1D(k, n), {Whole(b)}, PushBytes(FillPush{n, 7}));
      c.work = static_cast<double>(bytes);
      break;
    }
    case KernelId::kCopy: {
      VG_TRY_ASSIGN(auto a, RandomBuffer(e, bytes, 1));
      VG_TRY_ASSIGN(auto b, e.CreateBuffer(ByteSize{bytes}));
      c.sub.Dispatch(kid, Groups1D(k, n), {Whole(a), Whole(b)}, PushBytes(CopyPush{n}));
      c.work = 2.0 * static_cast<double>(bytes);
      break;
    }
    case KernelId::kSaxpy: {
      VG_TRY_ASSIGN(auto x, RandomBuffer(e, bytes, 1));
      VG_TRY_ASSIGN(auto y, RandomBuffer(e, bytes, 2));
      c.sub.Dispatch(kid, Groups1D(k, n), {Whole(x), Whole(y)}, PushBytes(SaxpyPush{n, 0.5f}));
      c.work = 3.0 * static_cast<double>(bytes);
      break;
    }
    case KernelId::kMatmul: {
      uint64_t sq = uint64_t{n} * n * 4;
      VG_TRY_ASSIGN(auto a, RandomBuffer(e, sq, 1));
      VG_TRY_ASSIGN(auto b, RandomBuffer(e, sq, 2));
      VG_TRY_ASSIGN(auto cc, e.CreateBuffer(ByteSize{sq}));
      c.sub.Dispatch(kid, Groups2D(k, n, n), {Whole(a), Whole(b), Whole(cc)}, PushBytes(MatmulPush{n, n, n}));
      c.work = 2.0 * n * n * n;
      break;
    }
    case KernelId::kReduceSum: {
      VG_TRY_ASSIGN(auto a, RandomBuffer(e, bytes, 1));
      VG_TRY_ASSIGN(auto out, e.CreateBuffer(ByteSize{4}));
      // Grid-stride kernel: a few groups amortise the shared-memory tree over many elements.
      auto g = Groups1D(k, n);
      g = {std::min<uint32_t>(g[0] * g[1], 64), 1, 1};
      c.sub.Dispatch(kid, g, {Whole(a), Whole(out)}, PushBytes(ReduceSumPush{n}));
      c.work = static_cast<double>(bytes);
      break;
    }
    case KernelId::kBlur3x3: {
      uint64_t sq = uint64_t{n} * n * 4;
      VG_TRY_ASSIGN(auto a, RandomBuffer(e, sq, 1));
      VG_TRY_ASSIGN(auto b, e.CreateBuffer(ByteSize{sq}));
      c.sub.Dispatch(kid, Groups2D(k, n, n), {Whole(a), Whole(b)}, PushBytes(Blur3x3Push{n, n}));
      c.work = static_cast<double>(n) * n;
      break;
    }
    case KernelId::kFillRect: {
      VG_TRY_ASSIGN(auto b, e.CreateBuffer(ByteSize{uint64_t{n} * n * 4}));
      c.sub.Dispatch(kid, Groups2D(k, n, n), {Whole(b)}, PushBytes(FillRectPush{n, n, n, 7}));
      c.work = static_cast<double>(n) * n;
      break;
    }
    case KernelId::kBlit:
    case KernelId::kBlend:
    case KernelId::kConvert565: {
      uint64_t sq = uint64_t{n} * n * 4;
      VG_TRY_ASSIGN(auto a, RandomBuffer(e, sq, 1));
      VG_TRY_ASSIGN(auto b, RandomBuffer(e, sq, 2));
      c.sub.Dispatch(kid, Groups2D(k, n, n), {Whole(a), Whole(b)}, PushBytes(RectPush{n, n, n, n}));
      c.work = static_cast<double>(n) * n;
      break;
    }
    case KernelId::kSpin: {
      VG_TRY_ASSIGN(auto b, e.CreateBuffer(ByteSize{bytes}));
      c.sub.Dispatch(kid, Groups1D(k, n), {Whole(b)}, PushBytes(SpinPush{n, spin_iters, 1}));
      c.work = static_cast<double>(n) * spin_iters;
      break;
    }
  }
  return c;
}

struct Sized {
  KernelId id;
  uint32_t small, large, large_quick;
  const char* unit;
  double scale;
  uint32_t spin_iters;
};
// The workload table: small sizes for latency, large ones for throughput.
constexpr Sized kSized[] = {
    {KernelId::kFill, 1024, 8u << 20, 1u << 20, "GB/s", 1e9, 0},
    {KernelId::kCopy, 1024, 8u << 20, 1u << 20, "GB/s", 1e9, 0},
    {KernelId::kSaxpy, 1024, 8u << 20, 1u << 20, "GB/s", 1e9, 0},
    {KernelId::kMatmul, 32, 256, 128, "GFLOP/s", 1e9, 0},
    {KernelId::kReduceSum, 1024, 8u << 20, 1u << 20, "GB/s", 1e9, 0},
    {KernelId::kBlur3x3, 64, 1024, 256, "Mpix/s", 1e6, 0},
    {KernelId::kSpin, 256, 65536, 16384, "Giter/s", 1e9, 1000},
    {KernelId::kFillRect, 64, 1024, 256, "Mpix/s", 1e6, 0},
    {KernelId::kBlit, 64, 1024, 256, "Mpix/s", 1e6, 0},
    {KernelId::kBlend, 64, 1024, 256, "Mpix/s", 1e6, 0},
    {KernelId::kConvert565, 64, 1024, 256, "Mpix/s", 1e6, 0},
};

std::string SizeName(KernelId id, uint32_t n) {
  if (id == KernelId::kMatmul) return fmt::format("{}^3", n);
  if (id == KernelId::kBlur3x3 || id == KernelId::kFillRect || id == KernelId::kBlit || id == KernelId::kBlend ||
      id == KernelId::kConvert565)
    return fmt::format("{}x{}", n, n);
  if (n >= (1u << 20)) return fmt::format("{}Mi", n >> 20);
  if (n >= 1024) return fmt::format("{}Ki", n >> 10);
  return fmt::format("{}", n);
}

// Zero-copy vs staged: the same copy kernel over two windows of one memfd mapping (a
// guest DMA region), wrapped by an engine that imports and by one that stages. The two
// run interleaved, one sample each per round, so load from other processes hits both
// alike; a third column runs the same copy on engine-allocated buffers.
Result<> ImportRows(const NativeOptions& o, std::vector<Row>& rows) {
  uint64_t half = o.quick ? (2u << 20) : (16u << 20);
  VG_TRY_ASSIGN(UniqueFd fd, CreateMemFd("bench-dma", ByteSize{2 * half}));
  VG_TRY_ASSIGN(Mapping map, Mapping::Map(fd, ByteSize{2 * half}, 0));
  std::memset(map.data(), 1, 2 * half);
  uint32_t n = static_cast<uint32_t>(half / 4);
  const KernelDesc& copy = *FindKernel(KernelId::kCopy);
  constexpr const char* kNames[] = {"zero-copy", "staged", "device buffers"};
  struct Arm {
    std::unique_ptr<Engine> e;
    BufferRef src, dst;
    Submission sub;
    std::vector<double> us, wrap_us;
  };
  Arm arms[3];
  for (int a = 0; a < 3; ++a) {
    VG_TRY_ASSIGN(arms[a].e, Engine::Create({.gpu = o.gpu, .allow_zero_copy = a == 0}));
    Engine& e = *arms[a].e;
    if (a < 2) {
      VG_TRY_ASSIGN(arms[a].src, e.WrapHostMemory(map.bytes().first(half)));
      VG_TRY_ASSIGN(arms[a].dst, e.WrapHostMemory(map.bytes().subspan(half, half)));
    } else {
      VG_TRY_ASSIGN(arms[a].src, e.CreateBuffer(ByteSize{half}));
      VG_TRY_ASSIGN(arms[a].dst, e.CreateBuffer(ByteSize{half}));
    }
    arms[a].sub.Dispatch(copy.raw_id(), Groups1D(copy, n), {Whole(arms[a].src), Whole(arms[a].dst)},
                         PushBytes(CopyPush{n}));
    for (int i = 0; i < 2; ++i) VG_TRY(e.SubmitAndWait(arms[a].sub));
  }
  for (int i = 0; i < o.import_iters; ++i) {
    for (int a = 0; a < 3; ++a) {
      Submission s = arms[a].sub;
      auto t0 = Clock::now();
      VG_TRY(arms[a].e->SubmitAndWait(std::move(s)));
      arms[a].us.push_back(Us(Clock::now() - t0));
      if (a == 2) continue;
      // Per-submission wrap: what it costs to wrap a region on demand.
      t0 = Clock::now();
      VG_TRY_ASSIGN(auto w, arms[a].e->WrapHostMemory(map.bytes().first(half)));
      arms[a].wrap_us.push_back(Us(Clock::now() - t0));
    }
  }
  double p50[3] = {}, wrap_p50[2] = {};
  for (int a = 0; a < 3; ++a) {
    Row r{"import", fmt::format("copy kernel {} MiB, {}", half >> 20, kNames[a]), Summarize(arms[a].us), 0, "GB/s",
          fmt::format("path={}", MemoryPathName(arms[a].src->path()))};
    r.rate = 2.0 * static_cast<double>(half) / (r.us.p50 * 1e-6) / 1e9;
    p50[a] = r.us.p50;
    rows.push_back(std::move(r));
  }
  for (int a = 0; a < 2; ++a) {
    Row w{"import", fmt::format("WrapHostMemory {} MiB, {}", half >> 20, kNames[a]), Summarize(arms[a].wrap_us), 0,
          "", ""};
    wrap_p50[a] = w.us.p50;
    rows.push_back(std::move(w));
  }
  rows.push_back({"import", "ratio staged/zero-copy (copy p50)", {}, p50[1] / p50[0], "x", ""});
  rows.push_back({"import", "ratio zero-copy/device (copy p50)", {}, p50[0] / p50[2], "x", ""});
  rows.push_back({"import", "ratio staged/zero-copy (wrap p50)", {}, wrap_p50[1] / wrap_p50[0], "x", ""});
  return Ok();
}

}  // namespace

Result<std::vector<Row>> RunNative(const NativeOptions& o, std::string* device_line) {
  VG_TRY_ASSIGN(auto e, Engine::Create({.gpu = o.gpu}));
  if (device_line) *device_line = e->Info().ToString();
  std::vector<Row> rows;

  VG_TRY_ASSIGN(Row empty, Time(*e, "latency", "empty submission (fence only)", Submission{}, o.latency_iters, 0, "", 1));
  rows.push_back(std::move(empty));
  {
    VG_TRY_ASSIGN(auto c, MakeKernelCase(*e, KernelId::kSpin, 1, 0));
    VG_TRY_ASSIGN(Row r, Time(*e, "latency", "empty dispatch (spin 1 invocation x0)", c.sub, o.latency_iters, 0, "", 1));
    rows.push_back(std::move(r));
  }
  for (const Sized& z : kSized) {
    VG_TRY_ASSIGN(auto c, MakeKernelCase(*e, z.id, z.small, z.spin_iters));
    VG_TRY_ASSIGN(Row r, Time(*e, "latency", fmt::format("{} {}", c.name, SizeName(z.id, z.small)), c.sub,
                              o.latency_iters, c.work, z.unit, z.scale));
    rows.push_back(std::move(r));
  }
  {
    VG_TRY_ASSIGN(auto b, e->CreateBuffer(ByteSize{4096}));
    VG_TRY_ASSIGN(auto b2, e->CreateBuffer(ByteSize{4096}));
    Submission f, c;
    f.Fill(b, ByteSize{0}, ByteSize{4096}, 1);
    c.Copy(b, ByteSize{0}, b2, ByteSize{0}, ByteSize{4096});
    VG_TRY_ASSIGN(Row rf, Time(*e, "latency", "FillOp 4 KiB (transfer)", f, o.latency_iters, 0, "", 1));
    VG_TRY_ASSIGN(Row rc, Time(*e, "latency", "CopyOp 4 KiB (transfer)", c, o.latency_iters, 0, "", 1));
    rows.push_back(std::move(rf));
    rows.push_back(std::move(rc));
  }
  for (const Sized& z : kSized) {
    uint32_t n = o.quick ? z.large_quick : z.large;
    VG_TRY_ASSIGN(auto c, MakeKernelCase(*e, z.id, n, z.spin_iters));
    VG_TRY_ASSIGN(Row r, Time(*e, "throughput", fmt::format("{} {}", c.name, SizeName(z.id, n)), c.sub,
                              o.large_iters, c.work, z.unit, z.scale));
    rows.push_back(std::move(r));
  }
  {
    uint64_t big = o.quick ? (4u << 20) : (32u << 20);
    VG_TRY_ASSIGN(auto a, e->CreateBuffer(ByteSize{big}));
    VG_TRY_ASSIGN(auto b, e->CreateBuffer(ByteSize{big}));
    Submission c;
    c.Copy(a, ByteSize{0}, b, ByteSize{0}, ByteSize{big});
    VG_TRY_ASSIGN(Row r, Time(*e, "throughput", fmt::format("CopyOp {} MiB (transfer)", big >> 20), c, o.large_iters,
                              2.0 * static_cast<double>(big), "GB/s", 1e9));
    rows.push_back(std::move(r));
  }
  e.reset();
  VG_TRY(ImportRows(o, rows));
  return rows;
}

}  // namespace vg::bench
