#pragma once
// 2-D drawing with the catalogue's 2-D kernels (F10, docs/device-spec.md §2-D kernels):
// fill-rect, blit, blend and RGB565 -> XRGB8888 convert, as DISPATCH commands a guest puts in
// its ring like any other (or remoting calls, or engine dispatches: the ops are path-neutral).
//
// A surface is a layout (stride, width, height, bytes per pixel) the caller places somewhere:
// a GTT-mapped buffer or the aperture on the mediated path, a remote buffer, an engine
// buffer. An op names its surfaces by the caller's index; an emitter turns each binding into
// that surface's base plus the op's byte offset. The kernels take each rectangle as a
// binding that starts at its first pixel, so x and y never reach the device: the bounds are
// the binding's, which the auditor checks against the push constants.

#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "base/base.h"
#include "guest/driver.h"
#include "guest/remoting_client.h"

namespace vg::guest {

struct Surface {
  uint64_t size = 0;    // bytes from the first pixel that the surface may use
  uint32_t stride = 0;  // pixels from one row to the next
  uint32_t width = 0, height = 0;
  uint32_t bpp = 4;     // 4: XRGB8888 / ARGB8888; 2: RGB565 (a convert source only)
};

struct Rect {
  uint32_t x = 0, y = 0, w = 0, h = 0;
};

struct Binding2D {
  uint32_t surface = 0;  // the caller's index
  uint64_t offset = 0;   // bytes from the surface's first pixel
  uint64_t size = 0;
  uint32_t access = 0;   // abi::cmd::kAccess*
};

struct Op2D {
  uint32_t kernel = 0;
  std::array<uint32_t, 3> groups{1, 1, 1};
  std::array<uint32_t, 4> push{};
  uint32_t nbind = 0;
  std::array<Binding2D, 2> bind{};
  std::span<const std::byte> push_bytes() const { return std::as_bytes(std::span(push)); }
  std::span<const Binding2D> bindings() const { return std::span(bind).first(nbind); }
};

// The binding of rectangle `r` of `s`: kInvalidArgument for an empty rectangle or a stride
// below the width, kOutOfBounds for one that leaves the surface or its bytes, kMisaligned for
// a start that is not on a dword (an odd column of an RGB565 surface with an odd stride).
Result<Binding2D> RectBinding(uint32_t id, const Surface& s, Rect r, uint32_t access);

Result<Op2D> FillRect(uint32_t dst_id, const Surface& dst, Rect r, uint32_t value);
// src rectangle (sx, sy, r.w, r.h) onto dst rectangle r. The kernel alone does not promise
// the result for overlapping rectangles (its invocations run in parallel): for the same
// surface and intersecting rectangles this returns kOverlap; use Blit.
Result<Op2D> BlitOnce(uint32_t src_id, const Surface& src, uint32_t sx, uint32_t sy, uint32_t dst_id,
                      const Surface& dst, Rect r);
// Blit with the memmove result in every case: when the rectangles intersect in one surface,
// two passes through `scratch` (at least r.w * r.h * 4 bytes; kOverlap without one), which
// run in order (the engine puts a barrier between ops).
Result<std::vector<Op2D>> Blit(uint32_t src_id, const Surface& src, uint32_t sx, uint32_t sy, uint32_t dst_id,
                               const Surface& dst, Rect r, const Surface* scratch = nullptr,
                               uint32_t scratch_id = 0);
// Premultiplied ARGB8888 src-over: dst rectangle r = src (sx, sy) over dst.
Result<Op2D> Blend(uint32_t src_id, const Surface& src, uint32_t sx, uint32_t sy, uint32_t dst_id,
                   const Surface& dst, Rect r);
// RGB565 src (sx, sy) widened into XRGB8888 dst rectangle r.
Result<Op2D> Convert565(uint32_t src_id, const Surface& src, uint32_t sx, uint32_t sy, uint32_t dst_id,
                        const Surface& dst, Rect r);

// Emitters. `va[i]` / `buf[i]`: where surface i's first pixel is.
void Emit(CommandBuilder& cb, const Op2D& op, std::span<const GpuVa> va);
Result<> Emit(RemotingClient& rc, const Op2D& op, std::span<const RemoteBuffer> buf,
              std::span<const uint64_t> base_offset);

}  // namespace vg::guest
