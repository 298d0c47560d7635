#include "guest/draw2d.h"

#include <algorithm>

#include "shaders/catalogue.h"

namespace vg::guest {
namespace {

using shaders::KernelId;

constexpr uint32_t kRW = abi::cmd::kAccessRead | abi::cmd::kAccessWrite;

Op2D Make(KernelId id, uint32_t w, uint32_t h, std::array<uint32_t, 4> push) {
  Op2D op;
  op.kernel = static_cast<uint32_t>(id);
  op.groups = shaders::Groups2D(*shaders::FindKernel(id), w, h);
  op.push = push;
  return op;
}

bool Intersect(Rect a, Rect b) {
  return uint64_t{a.x} < uint64_t{b.x} + b.w && uint64_t{b.x} < uint64_t{a.x} + a.w &&
         uint64_t{a.y} < uint64_t{b.y} + b.h && uint64_t{b.y} < uint64_t{a.y} + a.h;
}

// Two-surface ops: the source rectangle has the destination's size.
Result<Op2D> Pair(KernelId id, uint32_t src_id, const Surface& src, uint32_t sx, uint32_t sy, uint32_t dst_id,
                  const Surface& dst, Rect r, uint32_t dst_access) {
  Op2D op = Make(id, r.w, r.h, {src.stride, dst.stride, r.w, r.h});
  op.nbind = 2;
  VG_TRY_ASSIGN(op.bind[0], RectBinding(src_id, src, {sx, sy, r.w, r.h}, abi::cmd::kAccessRead));
  VG_TRY_ASSIGN(op.bind[1], RectBinding(dst_id, dst, r, dst_access));
  return op;
}

}  // namespace

Result<Binding2D> RectBinding(uint32_t id, const Surface& s, Rect r, uint32_t access) {
  VG_INVALID_IF(r.w == 0 || r.h == 0, "empty rectangle {}x{}", r.w, r.h);
  VG_INVALID_IF(s.width > s.stride || (s.bpp != 4 && s.bpp != 2), "surface stride {} < width {} or {} bytes/pixel",
                s.stride, s.width, s.bpp);
  VG_ERROR_IF(uint64_t{r.x} + r.w > s.width || uint64_t{r.y} + r.h > s.height, Errc::kOutOfBounds,
              "rectangle {}x{} at ({}, {}) leaves the {}x{} surface", r.w, r.h, r.x, r.y, s.width, s.height);
  const uint64_t first = (uint64_t{r.y} * s.stride + r.x) * s.bpp;
  const uint64_t end = ((uint64_t{r.y} + r.h - 1) * s.stride + r.x + r.w) * s.bpp;
  VG_ERROR_IF(first % 4 != 0, Errc::kMisaligned, "rectangle at ({}, {}) does not start on a dword", r.x, r.y);
  const uint64_t size = (end - first + 3) & ~uint64_t{3};
  VG_ERROR_IF(first + size > s.size, Errc::kOutOfBounds, "rectangle ends at byte {} of a {}-byte surface",
              first + size, s.size);
  return Binding2D{id, first, size, access};
}

Result<Op2D> FillRect(uint32_t dst_id, const Surface& dst, Rect r, uint32_t value) {
  VG_INVALID_IF(dst.bpp != 4, "fill_rect writes 32-bit pixels");
  Op2D op = Make(KernelId::kFillRect, r.w, r.h, {dst.stride, r.w, r.h, value});
  op.nbind = 1;
  VG_TRY_ASSIGN(op.bind[0], RectBinding(dst_id, dst, r, abi::cmd::kAccessWrite));
  return op;
}

Result<Op2D> BlitOnce(uint32_t src_id, const Surface& src, uint32_t sx, uint32_t sy, uint32_t dst_id,
                      const Surface& dst, Rect r) {
  VG_INVALID_IF(src.bpp != 4 || dst.bpp != 4, "blit copies 32-bit pixels");
  VG_ERROR_IF(src_id == dst_id && Intersect({sx, sy, r.w, r.h}, r), Errc::kOverlap,
              "blit source ({}, {}) and destination ({}, {}) overlap", sx, sy, r.x, r.y);
  return Pair(KernelId::kBlit, src_id, src, sx, sy, dst_id, dst, r, abi::cmd::kAccessWrite);
}

Result<std::vector<Op2D>> Blit(uint32_t src_id, const Surface& src, uint32_t sx, uint32_t sy, uint32_t dst_id,
                               const Surface& dst, Rect r, const Surface* scratch, uint32_t scratch_id) {
  std::vector<Op2D> ops;
  if (!(src_id == dst_id && Intersect({sx, sy, r.w, r.h}, r))) {
    VG_TRY_ASSIGN(Op2D op, BlitOnce(src_id, src, sx, sy, dst_id, dst, r));
    ops.push_back(op);
    return ops;
  }
  VG_ERROR_IF(scratch == nullptr, Errc::kOverlap, "overlapping blit needs a scratch surface");
  // The scratch holds the rectangle packed (stride = width): pass one reads the whole source
  // before pass two writes any of the destination.
  Surface tmp{scratch->size, r.w, r.w, r.h, 4};
  VG_TRY_ASSIGN(Op2D a, BlitOnce(src_id, src, sx, sy, scratch_id, tmp, {0, 0, r.w, r.h}));
  VG_TRY_ASSIGN(Op2D b, BlitOnce(scratch_id, tmp, 0, 0, dst_id, dst, r));
  ops.push_back(a);
  ops.push_back(b);
  return ops;
}

Result<Op2D> Blend(uint32_t src_id, const Surface& src, uint32_t sx, uint32_t sy, uint32_t dst_id,
                   const Surface& dst, Rect r) {
  VG_INVALID_IF(src.bpp != 4 || dst.bpp != 4, "blend takes ARGB8888");
  VG_ERROR_IF(src_id == dst_id && Intersect({sx, sy, r.w, r.h}, r), Errc::kOverlap, "blend onto its own source");
  return Pair(KernelId::kBlend, src_id, src, sx, sy, dst_id, dst, r, kRW);
}

Result<Op2D> Convert565(uint32_t src_id, const Surface& src, uint32_t sx, uint32_t sy, uint32_t dst_id,
                        const Surface& dst, Rect r) {
  VG_INVALID_IF(src.bpp != 2 || dst.bpp != 4, "convert_565 reads RGB565 and writes XRGB8888");
  VG_ERROR_IF(src_id == dst_id, Errc::kOverlap, "convert within one surface");
  return Pair(KernelId::kConvert565, src_id, src, sx, sy, dst_id, dst, r, abi::cmd::kAccessWrite);
}

void Emit(CommandBuilder& cb, const Op2D& op, std::span<const GpuVa> va) {
  std::array<Binding, 2> b{};
  for (uint32_t i = 0; i < op.nbind; ++i) {
    const Binding2D& x = op.bind[i];
    b[i] = {GpuVa{va[x.surface].v + x.offset}, x.size, x.access};
  }
  const size_t push = shaders::FindKernel(op.kernel)->push_size;
  cb.Dispatch(op.kernel, op.groups, std::span(b).first(op.nbind), op.push_bytes().first(push));
}

Result<> Emit(RemotingClient& rc, const Op2D& op, std::span<const RemoteBuffer> buf,
              std::span<const uint64_t> base_offset) {
  std::array<RemoteBinding, 2> b{};
  for (uint32_t i = 0; i < op.nbind; ++i) {
    const Binding2D& x = op.bind[i];
    b[i] = {buf[x.surface].id, base_offset[x.surface] + x.offset, x.size};
  }
  const size_t push = shaders::FindKernel(op.kernel)->push_size;
  return rc.Dispatch(op.kernel, op.groups, std::span(b).first(op.nbind), op.push_bytes().first(push));
}

}  // namespace vg::guest
