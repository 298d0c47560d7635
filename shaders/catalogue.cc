#include "shaders/catalogue.h"

#include <algorithm>
#include <cstring>

namespace vg::shaders {
namespace {

// SPIR-V words produced by glslc at build time (see meson.build).
constexpr uint32_t kFillSpv[] = {
#include "fill.spv.inc"
};
constexpr uint32_t kCopySpv[] = {
#include "copy.spv.inc"
};
constexpr uint32_t kSaxpySpv[] = {
#include "saxpy.spv.inc"
};
constexpr uint32_t kMatmulSpv[] = {
#include "matmul.spv.inc"
};
constexpr uint32_t kReduceSumSpv[] = {
#include "reduce_sum.spv.inc"
};
constexpr uint32_t kBlur3x3Spv[] = {
#include "blur3x3.spv.inc"
};
constexpr uint32_t kSpinSpv[] = {
#include "spin.spv.inc"
};
constexpr uint32_t kFillRectSpv[] = {
#include "fill_rect.spv.inc"
};
constexpr uint32_t kBlitSpv[] = {
#include "blit.spv.inc"
};
constexpr uint32_t kBlendSpv[] = {
#include "blend.spv.inc"
};
constexpr uint32_t kConvert565Spv[] = {
#include "convert_565.spv.inc"
};

// 1-D kernels index with u32 gid.x + gid.y * groups.x * 256: y <= 256 keeps every index
// below 2^32 (65535 * 256 * 256 < 2^32), so no invocation aliases another.
constexpr std::array<uint32_t, 3> k1DGroups = {65535, 256, 1};
constexpr std::array<uint32_t, 3> k2DGroups = {65535, 65535, 1};

// 2-D kernels: a rectangle's sides and strides. The shaders index with u32 y * stride + x:
// (2^14 - 1) * 2^16 + 2^14 < 2^31, so no index wraps whatever the guest passes within them.
inline constexpr uint32_t kMaxRectSide = 16384;
inline constexpr uint32_t kMaxRectStride = 65536;
// Push words of RectPush.
constexpr MinSizeRule kRectSrc{0, 2, 4, 3};
constexpr MinSizeRule kRectDst{1, 2, 4, 3};
constexpr std::array<PushLimit, kMaxPushLimits> kRectLimits = {
    {{0, kMaxRectStride, "src_stride"}, {1, kMaxRectStride, "dst_stride"}, {2, kMaxRectSide, "width"},
     {3, kMaxRectSide, "height"}}};

// Kept in id order: FindKernel indexes it directly.
const KernelDesc kKernels[] = {
    {KernelId::kFill, "fill", kFillSpv, 1,
     {{{"dst", Access::kWrite, {0}}}},
     sizeof(FillPush), {256, 1, 1}, k1DGroups, {}, "dst[i] = value (u32)"},
    {KernelId::kCopy, "copy", kCopySpv, 2,
     {{{"src", Access::kRead, {0}}, {"dst", Access::kWrite, {0}}}},
     sizeof(CopyPush), {256, 1, 1}, k1DGroups, {}, "dst[i] = src[i] (u32 words)"},
    {KernelId::kSaxpy, "saxpy", kSaxpySpv, 2,
     {{{"x", Access::kRead, {0}}, {"y", Access::kReadWrite, {0}}}},
     sizeof(SaxpyPush), {256, 1, 1}, k1DGroups, {}, "y[i] = a*x[i] + y[i] (f32)"},
    {KernelId::kMatmul, "matmul", kMatmulSpv, 3,
     {{{"a", Access::kRead, {0, 2}}, {"b", Access::kRead, {2, 1}}, {"c", Access::kWrite, {0, 1}}}},
     sizeof(MatmulPush), {16, 16, 1}, k2DGroups,
     {{{0, 4096, "m"}, {1, 4096, "n"}, {2, 4096, "k"}}},
     "C[m x n] = A[m x k] * B[k x n], row-major f32, 16x16 shared-memory tiles"},
    {KernelId::kReduceSum, "reduce_sum", kReduceSumSpv, 2,
     {{{"in", Access::kRead, {0}}, {"out", Access::kReadWrite, {}}}},
     sizeof(ReduceSumPush), {256, 1, 1}, k1DGroups, {}, "out[0] += sum(in[0..count)) (u32, wrapping; grid-stride: any group count covers all)"},
    {KernelId::kBlur3x3, "blur3x3", kBlur3x3Spv, 2,
     {{{"src", Access::kRead, {0, 1}}, {"dst", Access::kWrite, {0, 1}}}},
     sizeof(Blur3x3Push), {16, 16, 1}, k2DGroups,
     {{{0, 16384, "width"}, {1, 16384, "height"}}},
     "3x3 binomial blur of u32 pixels, clamp-to-edge, >> 4"},
    {KernelId::kSpin, "spin", kSpinSpv, 1,
     {{{"result", Access::kWrite, {0}}}},
     sizeof(SpinPush), {256, 1, 1}, k1DGroups,
     {{{1, 1u << 20, "iterations"}}},
     "result[i] = `iterations` LCG+xorshift rounds of (seed ^ i) (u32)"},
    {KernelId::kFillRect, "fill_rect", kFillRectSpv, 1,
     {{{"dst", Access::kWrite, {0, 1, 4, 2}}}},
     sizeof(FillRectPush), {16, 16, 1}, k2DGroups,
     {{{0, kMaxRectStride, "stride"}, {1, kMaxRectSide, "width"}, {2, kMaxRectSide, "height"}}},
     "dst[y * stride + x] = value for x < width, y < height (u32 pixels)"},
    {KernelId::kBlit, "blit", kBlitSpv, 2,
     {{{"src", Access::kRead, kRectSrc}, {"dst", Access::kWrite, kRectDst}}},
     sizeof(RectPush), {16, 16, 1}, k2DGroups, kRectLimits,
     "copy a width x height rectangle of u32 pixels (source and destination must not overlap)"},
    {KernelId::kBlend, "blend", kBlendSpv, 2,
     {{{"src", Access::kRead, kRectSrc}, {"dst", Access::kReadWrite, kRectDst}}},
     sizeof(RectPush), {16, 16, 1}, k2DGroups, kRectLimits,
     "src-over of premultiplied ARGB8888 rectangles, exact integer rounding"},
    {KernelId::kConvert565, "convert_565", kConvert565Spv, 2,
     {{{"src", Access::kRead, {0, 2, 2, 3}}, {"dst", Access::kWrite, kRectDst}}},
     sizeof(RectPush), {16, 16, 1}, k2DGroups, kRectLimits,
     "RGB565 rectangle -> XRGB8888 rectangle (alpha 0xFF), bit replication"},
};

uint32_t PushWord(std::span<const std::byte> push, uint8_t word) {
  if (word == kOne) return 1;
  uint32_t v = 0;
  std::memcpy(&v, push.data() + size_t{word} * 4, 4);
  return v;
}

}  // namespace

const KernelDesc* FindKernel(uint32_t id) {
  if (id == 0 || id > std::size(kKernels)) return nullptr;
  return &kKernels[id - 1];
}

std::span<const KernelDesc> AllKernels() { return kKernels; }

Result<uint64_t> MinBindingBytes(const KernelDesc& k, size_t i, std::span<const std::byte> push) {
  VG_ERROR_IF(i >= k.binding_count, Errc::kBadKernel, "{}: no binding {}", k.name, i);
  VG_ERROR_IF(push.size() != k.push_size, Errc::kBadKernel, "{}: push constants are {} bytes, want {}", k.name,
              push.size(), k.push_size);
  const MinSizeRule& r = k.bindings[i].min_size;
  if (r.rows != kOne) {
    // A rectangle: the last element is (height - 1) * stride + width - 1. u32 words in u64:
    // no product here can overflow, and no wrap can make a huge height look small.
    const uint64_t stride = PushWord(push, r.a), width = PushWord(push, r.b), height = PushWord(push, r.rows);
    if (width == 0 || height == 0) return uint64_t{0};
    VG_INVALID_IF(width > stride, "{}: binding {} ({}): width {} is more than the stride {}", k.name, i,
                  k.bindings[i].name, width, stride);
    VG_TRY_ASSIGN(uint64_t rows_span, CheckedMul(height - 1, stride));
    VG_TRY_ASSIGN(uint64_t bytes, CheckedMul(rows_span + width, r.elem_bytes));
    return (bytes + 3) & ~uint64_t{3};
  }
  // Two u32 factors times a small element size cannot overflow u64, but check anyway:
  // this is the line that stands between a guest's push constants and a wild read.
  VG_TRY_ASSIGN(uint64_t n, CheckedMul(PushWord(push, r.a), PushWord(push, r.b)));
  return CheckedMul(n, r.elem_bytes);
}

Result<> ValidateKernelArgs(const KernelDesc& k, std::span<const std::byte> push,
                            std::span<const uint64_t> binding_sizes, std::array<uint32_t, 3> groups) {
  VG_ERROR_IF(binding_sizes.size() != k.binding_count, Errc::kBadKernel, "{}: {} bindings, want {}", k.name,
              binding_sizes.size(), k.binding_count);
  VG_ERROR_IF(push.size() != k.push_size, Errc::kBadKernel, "{}: push constants are {} bytes, want {}", k.name,
              push.size(), k.push_size);
  for (size_t d = 0; d < 3; ++d) {
    VG_INVALID_IF(groups[d] == 0, "{}: group count {} is zero", k.name, "xyz"[d]);
    VG_ERROR_IF(groups[d] > k.max_groups[d], Errc::kLimitExceeded, "{}: group count {} = {} > {}", k.name,
                "xyz"[d], groups[d], k.max_groups[d]);
  }
  for (const PushLimit& l : k.push_limits) {
    if (l.word == kOne) continue;
    uint32_t v = PushWord(push, l.word);
    VG_ERROR_IF(v > l.max, Errc::kLimitExceeded, "{}: {} = {} > {}", k.name, l.name, v, l.max);
  }
  for (size_t i = 0; i < k.binding_count; ++i) {
    VG_TRY_ASSIGN(uint64_t need, MinBindingBytes(k, i, push));
    VG_ERROR_IF(binding_sizes[i] < need, Errc::kOutOfBounds, "{}: binding {} ({}) is {} bytes, needs {}", k.name, i,
                k.bindings[i].name, binding_sizes[i], need);
  }
  return Ok();
}

std::array<uint32_t, 3> Groups1D(const KernelDesc& k, uint64_t elements) {
  uint64_t wg = k.workgroup_size[0];
  uint64_t g = std::max<uint64_t>(1, (elements + wg - 1) / wg);
  if (g <= k.max_groups[0]) return {static_cast<uint32_t>(g), 1, 1};
  uint64_t y = (g + k.max_groups[0] - 1) / k.max_groups[0];
  uint64_t x = (g + y - 1) / y;
  // Past max_groups[1] the elements cannot be covered by one dispatch (nor fit one
  // binding); the caller splits the work, and Validate refuses these counts.
  return {static_cast<uint32_t>(x), static_cast<uint32_t>(std::min<uint64_t>(y, UINT32_MAX)), 1};
}

std::array<uint32_t, 3> Groups2D(const KernelDesc& k, uint32_t width, uint32_t height) {
  auto up = [](uint64_t n, uint64_t d) { return static_cast<uint32_t>(std::max<uint64_t>(1, (n + d - 1) / d)); };
  return {up(width, k.workgroup_size[0]), up(height, k.workgroup_size[1]), 1};
}

}  // namespace vg::shaders
