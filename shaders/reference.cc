#include "shaders/reference.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace vg::shaders {
namespace {

// Bindings may alias each other (copy in place, saxpy with x == y), so every access is
// a memcpy of one element rather than a typed pointer.
template <class T>
T Load(std::span<std::byte> b, uint64_t i) {
  T v;
  std::memcpy(&v, b.data() + i * sizeof(T), sizeof(T));
  return v;
}
template <class T>
void Store(std::span<std::byte> b, uint64_t i, T v) {
  std::memcpy(b.data() + i * sizeof(T), &v, sizeof(T));
}
template <class P>
P ReadPush(std::span<const std::byte> push) {
  P p;
  std::memcpy(&p, push.data(), sizeof(P));
  return p;
}

// Elements a 1-D dispatch reaches: the shader computes i = gid.x + gid.y * (groups.x * wg).
uint64_t Covered1D(const KernelDesc& k, std::array<uint32_t, 3> g, uint64_t count) {
  return std::min<uint64_t>(count, uint64_t{g[0]} * k.workgroup_size[0] * g[1]);
}

using Bindings = std::span<const std::span<std::byte>>;
using RefFn = void (*)(const KernelDesc&, std::span<const std::byte>, Bindings, std::array<uint32_t, 3>);

void RefFill(const KernelDesc& k, std::span<const std::byte> push, Bindings b, std::array<uint32_t, 3> g) {
  auto p = ReadPush<FillPush>(push);
  for (uint64_t i = 0, n = Covered1D(k, g, p.count); i < n; ++i) Store<uint32_t>(b[0], i, p.value);
}
void RefCopy(const KernelDesc& k, std::span<const std::byte> push, Bindings b, std::array<uint32_t, 3> g) {
  auto p = ReadPush<CopyPush>(push);
  for (uint64_t i = 0, n = Covered1D(k, g, p.count); i < n; ++i) Store(b[1], i, Load<uint32_t>(b[0], i));
}
void RefSaxpy(const KernelDesc& k, std::span<const std::byte> push, Bindings b, std::array<uint32_t, 3> g) {
  auto p = ReadPush<SaxpyPush>(push);
  for (uint64_t i = 0, n = Covered1D(k, g, p.count); i < n; ++i)
    Store(b[1], i, p.a * Load<float>(b[0], i) + Load<float>(b[1], i));
}
void RefMatmul(const KernelDesc& k, std::span<const std::byte> push, Bindings b, std::array<uint32_t, 3> g) {
  auto p = ReadPush<MatmulPush>(push);
  uint64_t rows = std::min<uint64_t>(p.m, uint64_t{g[1]} * k.workgroup_size[1]);
  uint64_t cols = std::min<uint64_t>(p.n, uint64_t{g[0]} * k.workgroup_size[0]);
  for (uint64_t r = 0; r < rows; ++r) {
    for (uint64_t c = 0; c < cols; ++c) {
      float acc = 0.0f;
      for (uint64_t i = 0; i < p.k; ++i) acc += Load<float>(b[0], r * p.k + i) * Load<float>(b[1], i * p.n + c);
      Store(b[2], r * p.n + c, acc);
    }
  }
}
void RefReduceSum(const KernelDesc&, std::span<const std::byte> push, Bindings b, std::array<uint32_t, 3>) {
  auto p = ReadPush<ReduceSumPush>(push);
  uint32_t sum = Load<uint32_t>(b[1], 0);
  // Grid-stride in the shader: all `count` elements whatever the group count.
  for (uint64_t i = 0, n = p.count; i < n; ++i) sum += Load<uint32_t>(b[0], i);
  Store(b[1], 0, sum);
}
void RefBlur3x3(const KernelDesc& k, std::span<const std::byte> push, Bindings b, std::array<uint32_t, 3> g) {
  auto p = ReadPush<Blur3x3Push>(push);
  uint64_t h = std::min<uint64_t>(p.height, uint64_t{g[1]} * k.workgroup_size[1]);
  uint64_t w = std::min<uint64_t>(p.width, uint64_t{g[0]} * k.workgroup_size[0]);
  auto clampi = [](int64_t v, int64_t hi) { return static_cast<uint64_t>(std::clamp<int64_t>(v, 0, hi - 1)); };
  for (uint64_t y = 0; y < h; ++y) {
    for (uint64_t x = 0; x < w; ++x) {
      uint32_t acc = 0;
      for (int dy = -1; dy <= 1; ++dy) {
        for (int dx = -1; dx <= 1; ++dx) {
          uint64_t sx = clampi(static_cast<int64_t>(x) + dx, p.width);
          uint64_t sy = clampi(static_cast<int64_t>(y) + dy, p.height);
          uint32_t wgt = (dx == 0 ? 2u : 1u) * (dy == 0 ? 2u : 1u);
          acc += wgt * Load<uint32_t>(b[0], sy * p.width + sx);
        }
      }
      Store(b[1], y * p.width + x, acc >> 4);
    }
  }
}
void RefSpin(const KernelDesc& k, std::span<const std::byte> push, Bindings b, std::array<uint32_t, 3> g) {
  auto p = ReadPush<SpinPush>(push);
  for (uint64_t i = 0, n = Covered1D(k, g, p.count); i < n; ++i) {
    uint32_t x = p.seed ^ static_cast<uint32_t>(i);
    for (uint32_t it = 0; it < p.iterations; ++it) {
      x = x * 1664525u + 1013904223u;
      x ^= x >> 13;
    }
    Store(b[0], i, x);
  }
}

// The part of a 2-D kernel's width x height rectangle its group counts reach.
struct Extent {
  uint64_t w, h;
};
Extent Covered2D(const KernelDesc& k, std::array<uint32_t, 3> g, uint32_t width, uint32_t height) {
  return {std::min<uint64_t>(width, uint64_t{g[0]} * k.workgroup_size[0]),
          std::min<uint64_t>(height, uint64_t{g[1]} * k.workgroup_size[1])};
}
void RefFillRect(const KernelDesc& k, std::span<const std::byte> push, Bindings b, std::array<uint32_t, 3> g) {
  auto p = ReadPush<FillRectPush>(push);
  Extent e = Covered2D(k, g, p.width, p.height);
  for (uint64_t y = 0; y < e.h; ++y)
    for (uint64_t x = 0; x < e.w; ++x) Store(b[0], y * p.stride + x, p.value);
}
// The memmove result: every source pixel read before any destination pixel is written, so
// overlapping bindings give what guest::Blit's two passes give (the GPU kernel alone does
// not promise that, see blit.comp).
void RefBlit(const KernelDesc& k, std::span<const std::byte> push, Bindings b, std::array<uint32_t, 3> g) {
  auto p = ReadPush<RectPush>(push);
  Extent e = Covered2D(k, g, p.width, p.height);
  std::vector<uint32_t> tmp(e.w * e.h);
  for (uint64_t y = 0; y < e.h; ++y)
    for (uint64_t x = 0; x < e.w; ++x) tmp[y * e.w + x] = Load<uint32_t>(b[0], y * p.src_stride + x);
  for (uint64_t y = 0; y < e.h; ++y)
    for (uint64_t x = 0; x < e.w; ++x) Store(b[1], y * p.dst_stride + x, tmp[y * e.w + x]);
}
void RefBlend(const KernelDesc& k, std::span<const std::byte> push, Bindings b, std::array<uint32_t, 3> g) {
  auto p = ReadPush<RectPush>(push);
  Extent e = Covered2D(k, g, p.width, p.height);
  for (uint64_t y = 0; y < e.h; ++y)
    for (uint64_t x = 0; x < e.w; ++x)
      Store(b[1], y * p.dst_stride + x,
            BlendPixel(Load<uint32_t>(b[0], y * p.src_stride + x), Load<uint32_t>(b[1], y * p.dst_stride + x)));
}
void RefConvert565(const KernelDesc& k, std::span<const std::byte> push, Bindings b, std::array<uint32_t, 3> g) {
  auto p = ReadPush<RectPush>(push);
  Extent e = Covered2D(k, g, p.width, p.height);
  for (uint64_t y = 0; y < e.h; ++y)
    for (uint64_t x = 0; x < e.w; ++x)
      Store(b[1], y * p.dst_stride + x, Widen565(Load<uint16_t>(b[0], y * p.src_stride + x)));
}

// Indexed by kernel id (0 unused), parallel to the catalogue.
constexpr RefFn kRefs[] = {nullptr,    RefFill,     RefCopy, RefSaxpy, RefMatmul,    RefReduceSum,
                           RefBlur3x3, RefSpin,     RefFillRect, RefBlit, RefBlend, RefConvert565};

}  // namespace

uint32_t BlendPixel(uint32_t src, uint32_t dst) {
  const uint32_t inv = 255u - (src >> 24);
  uint32_t out = 0;
  for (uint32_t sh = 0; sh < 32; sh += 8) {
    const uint32_t t = ((dst >> sh) & 255u) * inv + 128u;
    const uint32_t c = ((src >> sh) & 255u) + ((t + (t >> 8)) >> 8);
    out |= std::min<uint32_t>(c, 255u) << sh;
  }
  return out;
}

uint32_t Widen565(uint16_t p) {
  uint32_t r = (p >> 11) & 31u, g = (p >> 5) & 63u, b = p & 31u;
  r = (r << 3) | (r >> 2);
  g = (g << 2) | (g >> 4);
  b = (b << 3) | (b >> 2);
  return 0xFF000000u | r << 16 | g << 8 | b;
}

Result<> RunReference(uint32_t id, std::span<const std::byte> push, std::span<const std::span<std::byte>> bindings,
                      std::array<uint32_t, 3> groups) {
  const KernelDesc* k = FindKernel(id);
  VG_ERROR_IF(k == nullptr || id >= std::size(kRefs), Errc::kBadKernel, "no kernel {}", id);
  VG_ERROR_IF(bindings.size() != k->binding_count, Errc::kBadKernel, "{}: {} bindings, want {}", k->name,
              bindings.size(), k->binding_count);
  uint64_t sizes[kMaxBindings] = {};
  for (size_t i = 0; i < bindings.size(); ++i) sizes[i] = bindings[i].size();
  VG_TRY(ValidateKernelArgs(*k, push, std::span(sizes, bindings.size()), groups));
  kRefs[id](*k, push, bindings, groups);
  return Ok();
}

}  // namespace vg::shaders
