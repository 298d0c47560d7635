#pragma once
// The kernel catalogue: every compute kernel a guest may name, as data (STYLE.md §2).
// Kernel ids are ABI (guests put them in DISPATCH commands and remoting calls): append
// only, never renumber. The engine, the mediator's command auditor and the remoting
// validator all check kernel ids, binding counts, push-constant sizes and argument
// limits against this one table through FindKernel() and ValidateKernelArgs().

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "base/result.h"
#include "base/types.h"

namespace vg::shaders {

enum class KernelId : uint32_t {
  kFill = 1,       // dst[i] = value                          (u32)
  kCopy = 2,       // dst[i] = src[i]                         (u32 words)
  kSaxpy = 3,      // y[i] = a * x[i] + y[i]                  (f32)
  kMatmul = 4,     // C = A * B, row-major, shared-memory tiles (f32)
  kReduceSum = 5,  // out[0] += sum(in[i]), grid-stride        (u32, wrapping: exact)
  kBlur3x3 = 6,    // 3x3 binomial blur, clamp-to-edge        (u32, exact)
  kSpin = 7,       // `iterations` ALU rounds per element     (u32)
  // F10 2-D kernels (docs/device-spec.md §2-D kernels): rectangles of pixels, each binding
  // starting at its rectangle's first pixel, rows `stride` pixels apart.
  kFillRect = 8,   // rect = value                            (u32 pixels)
  kBlit = 9,       // dst rect = src rect                     (u32 pixels; no overlap, see guest::Blit)
  kBlend = 10,     // dst rect = src rect over dst rect       (premultiplied ARGB8888, exact)
  kConvert565 = 11,  // dst rect = widen(src rect)            (RGB565 -> XRGB8888)
};

enum class Access : uint8_t { kRead, kWrite, kReadWrite };
constexpr bool Writes(Access a) { return a != Access::kRead; }

// Push constants, exactly as the shaders declare them (std430 scalars, no padding).
struct FillPush { uint32_t count; uint32_t value; };
struct CopyPush { uint32_t count; };
struct SaxpyPush { uint32_t count; float a; };
struct MatmulPush { uint32_t m; uint32_t n; uint32_t k; };
struct ReduceSumPush { uint32_t count; };
struct Blur3x3Push { uint32_t width; uint32_t height; };
struct SpinPush { uint32_t count; uint32_t iterations; uint32_t seed; };
struct FillRectPush { uint32_t stride; uint32_t width; uint32_t height; uint32_t value; };
// Blit, Blend and Convert565: strides in pixels of each surface.
struct RectPush { uint32_t src_stride; uint32_t dst_stride; uint32_t width; uint32_t height; };

// Index of a u32 push-constant word, or kOne for the constant 1.
inline constexpr uint8_t kOne = 0xff;

// A binding's minimum size in bytes = push[a] * push[b] * elem_bytes, so that the
// kernel's bounds checks (which trust the push constants) never step past the binding.
// With `rows` set (2-D kernels) it is a rectangle instead: a = the row stride, b = the
// width, rows = the height, all in elements, and the size is ((height - 1) * stride +
// width) * elem_bytes rounded up to a dword (0 for an empty rectangle); width must not pass
// the stride (a stride that lies: kInvalidArgument).
struct MinSizeRule {
  uint8_t a = kOne;
  uint8_t b = kOne;
  uint32_t elem_bytes = 4;
  uint8_t rows = kOne;
};

struct BindingDesc {
  std::string_view name;
  Access access;
  MinSizeRule min_size;
};

// An upper bound on one push-constant word: work a single dispatch may ask for.
struct PushLimit {
  uint8_t word = kOne;  // kOne: unused slot
  uint32_t max = 0;
  std::string_view name;
};

inline constexpr size_t kMaxBindings = 4;
inline constexpr size_t kMaxPushBytes = 16;
inline constexpr size_t kMaxPushLimits = 4;

struct KernelDesc {
  KernelId id;
  std::string_view name;
  std::span<const uint32_t> spirv;
  uint32_t binding_count;
  std::array<BindingDesc, kMaxBindings> bindings;
  uint32_t push_size;                          // bytes; a dispatch must pass exactly this many
  std::array<uint32_t, 3> workgroup_size;      // local_size_{x,y,z} in the GLSL
  std::array<uint32_t, 3> max_groups;          // also capped by the device's limits
  std::array<PushLimit, kMaxPushLimits> push_limits;
  std::string_view summary;

  uint32_t raw_id() const { return static_cast<uint32_t>(id); }
};

// nullptr for an id not in the catalogue.
const KernelDesc* FindKernel(uint32_t id);
inline const KernelDesc* FindKernel(KernelId id) { return FindKernel(static_cast<uint32_t>(id)); }
// Every kernel, in id order.
std::span<const KernelDesc> AllKernels();

// The one argument check shared by the engine, the auditor, the remoting validator and
// the CPU reference. No side effects. Codes: kBadKernel (binding count or push size
// differ from the table), kLimitExceeded (a push word over its limit, groups over
// max_groups), kOutOfBounds (a binding smaller than its MinSizeRule asks),
// kInvalidArgument (a zero group count).
Result<> ValidateKernelArgs(const KernelDesc& k, std::span<const std::byte> push,
                            std::span<const uint64_t> binding_sizes, std::array<uint32_t, 3> groups);

// Bytes binding `i` needs for these push constants (push already size-checked).
Result<uint64_t> MinBindingBytes(const KernelDesc& k, size_t i, std::span<const std::byte> push);

// Group counts that cover `elements` invocations of a 1-D kernel, spilling into y when
// x alone would pass 65535 groups.
std::array<uint32_t, 3> Groups1D(const KernelDesc& k, uint64_t elements);
// Group counts that cover a width x height grid of a 2-D kernel.
std::array<uint32_t, 3> Groups2D(const KernelDesc& k, uint32_t width, uint32_t height);

template <class P>
std::span<const std::byte> PushBytes(const P& p) {
  return std::as_bytes(std::span<const P, 1>(&p, 1));
}

}  // namespace vg::shaders
