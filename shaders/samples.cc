#include "shaders/samples.h"

#include <cmath>
#include <cstring>
#include <random>

#include "shaders/reference.h"

namespace vg::shaders {
namespace {

template <class T>
std::vector<std::byte> Bytes(const std::vector<T>& v) {
  std::vector<std::byte> out(v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(out.data(), v.data(), out.size());
  return out;
}
template <class T>
std::vector<T> As(std::span<const std::byte> b) {
  std::vector<T> out(b.size() / sizeof(T));
  if (!out.empty()) std::memcpy(out.data(), b.data(), out.size() * sizeof(T));
  return out;
}
std::vector<uint32_t> U32s(size_t n, uint32_t seed, uint32_t shift = 0) {
  std::mt19937 rng(seed);
  std::vector<uint32_t> v(n);
  for (auto& x : v) x = rng() >> shift;
  return v;
}
std::vector<float> F32s(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-2.0f, 2.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}
template <class P>
std::vector<std::byte> Push(const P& p) {
  auto b = PushBytes(p);
  return {b.begin(), b.end()};
}
uint32_t Side(uint32_t elements, uint32_t lo) {
  uint32_t s = static_cast<uint32_t>(std::sqrt(static_cast<double>(elements)));
  return std::max(lo, s | 1u);  // odd: never a multiple of the tile
}

}  // namespace

KernelSample MakeSample(KernelId id, uint32_t n, uint32_t seed) {
  const KernelDesc& k = *FindKernel(id);
  KernelSample s;
  s.kernel = k.raw_id();
  n = std::max(n, 1u);
  switch (id) {  // one case per catalogue entry; the data each kernel needs differs
    case KernelId::kFill:
      s.push = Push(FillPush{n, 0x5a5a0000u ^ seed});
      s.groups = Groups1D(k, n);
      s.bindings = {Bytes(U32s(n, seed))};
      break;
    case KernelId::kCopy:
      s.push = Push(CopyPush{n});
      s.groups = Groups1D(k, n);
      s.bindings = {Bytes(U32s(n, seed)), Bytes(U32s(n, seed + 1))};
      break;
    case KernelId::kSaxpy:
      s.push = Push(SaxpyPush{n, 1.25f});
      s.groups = Groups1D(k, n);
      s.bindings = {Bytes(F32s(n, seed)), Bytes(F32s(n, seed + 1))};
      break;
    case KernelId::kMatmul: {
      uint32_t side = Side(n, 3);
      uint32_t m = side, nn = side + 2, kk = side + 4;
      s.push = Push(MatmulPush{m, nn, kk});
      s.groups = Groups2D(k, nn, m);
      s.bindings = {Bytes(F32s(size_t{m} * kk, seed)), Bytes(F32s(size_t{kk} * nn, seed + 1)),
                    Bytes(F32s(size_t{m} * nn, seed + 2))};
      break;
    }
    case KernelId::kReduceSum:
      s.push = Push(ReduceSumPush{n});
      s.groups = Groups1D(k, n);
      s.bindings = {Bytes(U32s(n, seed)), Bytes(std::vector<uint32_t>{seed, 0})};
      break;
    case KernelId::kBlur3x3: {
      uint32_t w = Side(n, 2), h = std::max(1u, n / w);
      s.push = Push(Blur3x3Push{w, h});
      s.groups = Groups2D(k, w, h);
      s.bindings = {Bytes(U32s(size_t{w} * h, seed, 8)), Bytes(U32s(size_t{w} * h, seed + 1))};
      break;
    }
    case KernelId::kSpin:
      s.push = Push(SpinPush{n, 16, seed});
      s.groups = Groups1D(k, n);
      s.bindings = {Bytes(U32s(n, seed))};
      break;
    // 2-D kernels: a rectangle inside surfaces whose rows are padded (the padding, what lies
    // between one row's end and the next row's start, must come back untouched), bindings
    // exactly as large as the bounds rule asks.
    case KernelId::kFillRect: {
      uint32_t w = Side(n, 2), h = std::max(1u, n / w), stride = w + 3;
      s.push = Push(FillRectPush{stride, w, h, 0xff000000u ^ seed});
      s.groups = Groups2D(k, w, h);
      s.bindings = {Bytes(U32s(size_t{h - 1} * stride + w, seed))};
      break;
    }
    case KernelId::kBlit:
    case KernelId::kBlend: {
      uint32_t w = Side(n, 2), h = std::max(1u, n / w), ss = w + 3, ds = w + 5;
      s.push = Push(RectPush{ss, ds, w, h});
      s.groups = Groups2D(k, w, h);
      auto src = U32s(size_t{h - 1} * ss + w, seed);
      if (id == KernelId::kBlend)  // premultiplied: no colour above its alpha; some opaque, some clear
        for (size_t i = 0; i < src.size(); ++i) {
          uint32_t a = i % 7 == 0 ? 255u : i % 11 == 0 ? 0u : src[i] >> 24;
          uint32_t v = a << 24;
          for (uint32_t sh = 0; sh < 24; sh += 8) v |= (((src[i] >> sh) & 255u) * a / 255u) << sh;
          src[i] = v;
        }
      s.bindings = {Bytes(src), Bytes(U32s(size_t{h - 1} * ds + w, seed + 1))};
      break;
    }
    case KernelId::kConvert565: {
      uint32_t w = Side(n, 2), h = std::max(1u, n / w), ss = w + 1, ds = w + 5;
      s.push = Push(RectPush{ss, ds, w, h});
      s.groups = Groups2D(k, w, h);
      size_t src_words = (size_t{h - 1} * ss + w + 1) / 2;
      s.bindings = {Bytes(U32s(src_words, seed)), Bytes(U32s(size_t{h - 1} * ds + w, seed + 1))};
      break;
    }
  }
  return s;
}

Result<> CheckSample(const KernelSample& input, std::span<const std::vector<std::byte>> result) {
  VG_ERROR_IF(result.size() != input.bindings.size(), Errc::kInternal, "{} bindings back, {} expected", result.size(),
              input.bindings.size());
  std::vector<std::vector<std::byte>> ref = input.bindings;
  std::vector<std::span<std::byte>> spans(ref.begin(), ref.end());
  VG_TRY(RunReference(input.kernel, input.push, spans, input.groups));
  auto id = static_cast<KernelId>(input.kernel);
  for (size_t b = 0; b < ref.size(); ++b) {
    VG_ERROR_IF(result[b].size() != ref[b].size(), Errc::kInternal, "binding {} has {} bytes, want {}", b,
                result[b].size(), ref[b].size());
    if (id != KernelId::kSaxpy && id != KernelId::kMatmul) {
      if (result[b] != ref[b]) {
        auto got = As<uint32_t>(result[b]), want = As<uint32_t>(ref[b]);
        for (size_t i = 0; i < got.size(); ++i)
          VG_ERROR_IF(got[i] != want[i], Errc::kInternal, "kernel {} binding {} word {}: {:#x}, reference {:#x}",
                      input.kernel, b, i, got[i], want[i]);
        return MakeError(Errc::kInternal, "kernel {} binding {} differs", input.kernel, b);
      }
      continue;
    }
    auto got = As<float>(result[b]), want = As<float>(ref[b]);
    auto in = As<float>(input.bindings[b]);
    bool matmul_out = id == KernelId::kMatmul && b == 2;
    MatmulPush mp{};
    std::vector<float> a, bm;
    if (matmul_out) {
      mp = As<MatmulPush>(input.push)[0];
      a = As<float>(input.bindings[0]);
      bm = As<float>(input.bindings[1]);
    }
    for (size_t i = 0; i < got.size(); ++i) {
      // Magnitude of what was summed bounds the rounding difference an FMA may make.
      float mag = std::fabs(want[i]) + std::fabs(in.empty() ? 0.0f : in[i]);
      if (matmul_out && mp.n) {
        size_t r = i / mp.n, c = i % mp.n;
        mag = 0;
        for (uint32_t j = 0; j < mp.k; ++j) mag += std::fabs(a[r * mp.k + j] * bm[j * mp.n + c]);
      }
      float tol = (id == KernelId::kMatmul ? kMatmulRelTol : kSaxpyRelTol * 4) * mag + kAbsTol;
      VG_ERROR_IF(!(std::fabs(got[i] - want[i]) <= tol), Errc::kInternal,
                  "kernel {} binding {} element {}: {}, reference {}", input.kernel, b, i, got[i], want[i]);
    }
  }
  return Ok();
}

}  // namespace vg::shaders
