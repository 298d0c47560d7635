#pragma once
// Strong types for every address and size that crosses an API (STYLE.md §2).
// Arithmetic on addresses goes through the checked helpers below, never a bare '+'.

#include <array>
#include <compare>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include "base/result.h"

namespace vg {

template <class Tag, class Rep = uint64_t>
struct Strong {
  Rep v{};
  constexpr auto operator<=>(const Strong&) const = default;
};

using Gpa = Strong<struct GpaTag>;                    // guest physical address (vfio-user IOVA)
using GpuVa = Strong<struct GpuVaTag>;                // vGPU virtual address (translated by the GTT)
using MmioOffset = Strong<struct MmioTag, uint32_t>;  // offset inside one region
using ByteSize = Strong<struct SizeTag>;
using ApertureOffset = Strong<struct ApertureTag>;    // offset inside BAR2

inline constexpr uint64_t kPageSize = 4096;
inline constexpr uint64_t kPageShift = 12;

// a + b, or nullopt-like error when it wraps.
inline Result<uint64_t> CheckedAdd(uint64_t a, uint64_t b) {
  uint64_t r;
  if (__builtin_add_overflow(a, b, &r)) [[unlikely]]
    return MakeError(Errc::kOutOfBounds, "{:#x} + {:#x} overflows", a, b);
  return r;
}
inline Result<uint64_t> CheckedMul(uint64_t a, uint64_t b) {
  uint64_t r;
  if (__builtin_mul_overflow(a, b, &r)) [[unlikely]]
    return MakeError(Errc::kOutOfBounds, "{:#x} * {:#x} overflows", a, b);
  return r;
}

template <class Tag>
Result<Strong<Tag>> CheckedEnd(Strong<Tag> base, ByteSize n) {
  VG_TRY_ASSIGN(uint64_t end, CheckedAdd(base.v, n.v));
  return Strong<Tag>{end};
}

// True when [off, off+len) lies within [0, limit). Overflow-safe.
constexpr bool RangeWithin(uint64_t off, uint64_t len, uint64_t limit) {
  return off <= limit && len <= limit - off;
}
// True when [a, a+alen) and [b, b+blen) intersect. Assumes neither wraps.
constexpr bool RangesOverlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen) {
  return alen != 0 && blen != 0 && a < b + blen && b < a + alen;
}
constexpr bool IsAligned(uint64_t v, uint64_t align) { return (v & (align - 1)) == 0; }
constexpr bool IsPowerOfTwo(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

struct Uuid {
  std::array<uint8_t, 16> b{};

  static Result<Uuid> Parse(std::string_view text);  // canonical 8-4-4-4-12, case-insensitive
  static Uuid Random();
  std::string ToString() const;                       // lower case, canonical
  bool IsNil() const;
  auto operator<=>(const Uuid&) const = default;
};

}  // namespace vg

template <class Tag, class Rep>
struct fmt::formatter<vg::Strong<Tag, Rep>> : fmt::formatter<Rep> {
  auto format(const vg::Strong<Tag, Rep>& s, format_context& ctx) const {
    return fmt::format_to(ctx.out(), "{:#x}", s.v);
  }
};
template <>
struct fmt::formatter<vg::Uuid> : fmt::formatter<std::string_view> {
  auto format(const vg::Uuid& u, format_context& ctx) const {
    return fmt::formatter<std::string_view>::format(u.ToString(), ctx);
  }
};
