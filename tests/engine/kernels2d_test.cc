// F10: the 2-D kernels (fill_rect, blit, blend, convert_565) on the engine's device against
// their CPU references, pixel for pixel, with row padding that must stay untouched; blits
// that overlap within one surface in every direction through guest::Blit's two passes,
// against memmove; and the bounds rule that stands between push constants and a binding.
#include "fixture.h"
#include "guest/draw2d.h"
#include "shaders/samples.h"

using namespace vg;
using namespace vg::engine;
using namespace vg::engine::testing;
using namespace vg::shaders;

namespace {

// The error's words for a failed assertion's message (doctest evaluates the message of a
// passing assertion too, under -s: it must not touch a Result that holds a value).
template <class R>
std::string Why(const R& r) {
  return r.ok() ? std::string() : r.error().ToString();
}

const KernelDesc& K(KernelId id) { return *FindKernel(id); }

// Runs a sample on the GPU and checks it with CheckSample (the CPU reference, exact).
void RunSample(const KernelSample& s) {
  Engine& e = TheEngine();
  std::vector<BufferRange> bindings;
  for (auto& d : s.bindings) bindings.push_back(Whole(MakeBuffer(e, d)));
  Submission sub;
  sub.Dispatch(s.kernel, s.groups, bindings, s.push);
  auto r = e.SubmitAndWait(std::move(sub));
  REQUIRE_MESSAGE(r.ok(), Why(r));
  std::vector<std::vector<std::byte>> out;
  for (auto& b : bindings) {
    auto m = b.buffer->Map();
    out.emplace_back(m.begin(), m.end());
  }
  auto c = CheckSample(s, out);
  CHECK_MESSAGE(c.ok(), Why(c));
}

// guest::Op2D on engine buffers: surface i is buffers[i] from byte 0.
void Run(std::span<const guest::Op2D> ops, std::span<const BufferRef> buffers) {
  Engine& e = TheEngine();
  Submission sub;
  for (const guest::Op2D& op : ops) {
    std::vector<BufferRange> b;
    for (const guest::Binding2D& x : op.bindings())
      b.push_back({buffers[x.surface], ByteSize{x.offset}, ByteSize{x.size}});
    sub.Dispatch(op.kernel, op.groups, b, op.push_bytes().first(K(static_cast<KernelId>(op.kernel)).push_size));
  }
  auto r = e.SubmitAndWait(std::move(sub));
  REQUIRE_MESSAGE(r.ok(), Why(r));
}

}  // namespace

TEST_CASE("2-D kernels match the CPU reference, padding untouched") {
  for (KernelId id : {KernelId::kFillRect, KernelId::kBlit, KernelId::kBlend, KernelId::kConvert565})
    for (uint32_t n : {1u, 17u, 255u, 256u, 1000u, 5000u}) {
      CAPTURE(K(id).name);
      CAPTURE(n);
      RunSample(MakeSample(id, n, n * 3 + 1));
    }
}

TEST_CASE("2-D kernels: fewer groups than the rectangle leave the rest as it was") {
  KernelSample s = MakeSample(KernelId::kBlit, 4000, 5);
  s.groups = {1, 2, 1};
  RunSample(s);
  KernelSample f = MakeSample(KernelId::kFillRect, 4000, 6);
  f.groups = {2, 1, 1};
  RunSample(f);
}

TEST_CASE("blend: every alpha over every destination byte, exact") {
  // 256 source alphas x 256 destination values in each channel, premultiplied sources.
  constexpr uint32_t kW = 256, kH = 256;
  std::vector<uint32_t> src(kW * kH), dst(kW * kH), want(kW * kH);
  for (uint32_t a = 0; a < kH; ++a)
    for (uint32_t d = 0; d < kW; ++d) {
      const uint32_t c = a * ((d * 37) & 255) / 255;  // a colour no brighter than its alpha
      src[a * kW + d] = a << 24 | c << 16 | (a / 2) << 8 | (a - c);
      dst[a * kW + d] = d << 24 | d << 16 | (255 - d) << 8 | ((d * 91) & 255);
      want[a * kW + d] = BlendPixel(src[a * kW + d], dst[a * kW + d]);
    }
  // Spot values: opaque source replaces, clear source keeps.
  CHECK(BlendPixel(0xFF123456u, 0xAABBCCDDu) == 0xFF123456u);
  CHECK(BlendPixel(0x00000000u, 0xAABBCCDDu) == 0xAABBCCDDu);
  CHECK(BlendPixel(0x80400000u, 0xFF00FF00u) == 0xFF407F00u);
  Engine& e = TheEngine();
  auto a = MakeBuffer(e, ToBytes(src)), b = MakeBuffer(e, ToBytes(dst));
  Submission sub;
  sub.Dispatch(static_cast<uint32_t>(KernelId::kBlend), Groups2D(K(KernelId::kBlend), kW, kH), {Whole(a), Whole(b)},
               PushBytes(RectPush{kW, kW, kW, kH}));
  REQUIRE(e.SubmitAndWait(std::move(sub)).ok());
  CHECK(FromBytes<uint32_t>(b->Map()) == want);
}

TEST_CASE("convert_565: all 65536 pixel values, odd and even halves") {
  std::vector<uint16_t> src(65536);
  for (uint32_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint16_t>(i * 40503u);
  std::vector<uint32_t> want(src.size());
  for (size_t i = 0; i < src.size(); ++i) want[i] = Widen565(src[i]);
  CHECK(Widen565(0xFFFF) == 0xFFFFFFFFu);
  CHECK(Widen565(0x0000) == 0xFF000000u);
  CHECK(Widen565(0xF800) == 0xFFFF0000u);
  Engine& e = TheEngine();
  auto a = MakeBuffer(e, ToBytes(src));
  auto b = MakeBuffer(e, ToBytes(std::vector<uint32_t>(src.size(), 0)));
  Submission sub;
  sub.Dispatch(static_cast<uint32_t>(KernelId::kConvert565), Groups2D(K(KernelId::kConvert565), 256, 256),
               {Whole(a), Whole(b)}, PushBytes(RectPush{256, 256, 256, 256}));
  REQUIRE(e.SubmitAndWait(std::move(sub)).ok());
  CHECK(FromBytes<uint32_t>(b->Map()) == want);
}

TEST_CASE("blit within one surface: overlapping in every direction gives the memmove result") {
  constexpr uint32_t kStride = 100, kW = 96, kH = 70;
  const guest::Surface surf{uint64_t{kStride} * kH * 4, kStride, kW, kH, 4};
  const guest::Surface scratch{uint64_t{kW} * kH * 4, kW, kW, kH, 4};
  // Offsets that keep every binding on the device's 16-byte storage alignment: x by 4.
  const int shifts[][2] = {{4, 3}, {-4, -3}, {8, 0}, {-8, 0}, {0, 5}, {0, -5}, {4, -2}, {-4, 2}};
  for (auto [dx, dy] : shifts) {
    CAPTURE(dx);
    CAPTURE(dy);
    const uint32_t w = 60, h = 40;
    const uint32_t sx = 16, sy = 12, x = sx + dx, y = sy + dy;
    auto init = RandomU32(size_t{kStride} * kH, 77 + dx * 13 + dy);
    // memmove reference: read the whole source, then write.
    std::vector<uint32_t> want = init, tmp;
    for (uint32_t r = 0; r < h; ++r)
      for (uint32_t c = 0; c < w; ++c) tmp.push_back(init[(sy + r) * kStride + sx + c]);
    for (uint32_t r = 0; r < h; ++r)
      for (uint32_t c = 0; c < w; ++c) want[(y + r) * kStride + x + c] = tmp[r * w + c];
    // The one-pass op refuses the overlap by name; Blit without scratch too.
    CHECK(guest::BlitOnce(0, surf, sx, sy, 0, surf, {x, y, w, h}).code() == Errc::kOverlap);
    CHECK(guest::Blit(0, surf, sx, sy, 0, surf, {x, y, w, h}).code() == Errc::kOverlap);
    auto ops = guest::Blit(0, surf, sx, sy, 0, surf, {x, y, w, h}, &scratch, 1);
    REQUIRE(ops.ok());
    CHECK(ops->size() == 2);
    Engine& e = TheEngine();
    BufferRef bufs[] = {MakeBuffer(e, ToBytes(init)), MakeBuffer(e, ToBytes(std::vector<uint32_t>(kW * kH)))};
    Run(*ops, bufs);
    CHECK(FromBytes<uint32_t>(bufs[0]->Map()) == want);
  }
}

TEST_CASE("2-D bounds: the rectangle rule refuses what would reach past a binding, by name") {
  const KernelDesc& fr = K(KernelId::kFillRect);
  auto check = [&](FillRectPush p, uint64_t size) {
    uint64_t sizes[] = {size};
    return ValidateKernelArgs(fr, PushBytes(p), sizes, Groups2D(fr, std::max(p.width, 1u) % 65536,
                                                              std::max(p.height, 1u) % 65536))
        .code();
  };
  // Exact fit: (h - 1) * stride + w pixels.
  CHECK(check({100, 64, 10, 0}, (9 * 100 + 64) * 4) == Errc::kOk);
  CHECK(check({100, 64, 10, 0}, (9 * 100 + 64) * 4 - 4) == Errc::kOutOfBounds);
  // A stride that lies (rows overlap).
  CHECK(check({10, 64, 10, 0}, 1 << 20) == Errc::kInvalidArgument);
  // Huge sides and strides: limits, never a wrapped product.
  CHECK(check({0xFFFFFFFFu, 64, 10, 0}, 1 << 20) == Errc::kLimitExceeded);
  CHECK(check({65536, 65536, 2, 0}, 1ull << 40) == Errc::kLimitExceeded);
  CHECK(check({65536, 16384, 0xFFFFFFFFu, 0}, 1ull << 40) == Errc::kLimitExceeded);
  CHECK(check({65536, 16384, 16384, 0}, uint64_t{16383} * 65536 * 4) == Errc::kOutOfBounds);
  CHECK(check({65536, 16384, 16384, 0}, (uint64_t{16383} * 65536 + 16384) * 4) == Errc::kOk);
  // Two-surface kernels: each binding against its own stride; RGB565 in 16-bit pixels.
  const KernelDesc& bl = K(KernelId::kBlit);
  uint64_t ok[] = {(3 * 50 + 40) * 4, (3 * 64 + 40) * 4};
  CHECK(ValidateKernelArgs(bl, PushBytes(RectPush{50, 64, 40, 4}), ok, {3, 1, 1}).ok());
  uint64_t short_src[] = {(3 * 50 + 40) * 4 - 4, (3 * 64 + 40) * 4};
  CHECK(ValidateKernelArgs(bl, PushBytes(RectPush{50, 64, 40, 4}), short_src, {3, 1, 1}).code() ==
        Errc::kOutOfBounds);
  const KernelDesc& cv = K(KernelId::kConvert565);
  uint64_t cv_ok[] = {(3 * 51 + 40) * 2 + 2, (3 * 64 + 40) * 4};  // odd pixel count: rounded to a dword
  CHECK(ValidateKernelArgs(cv, PushBytes(RectPush{51, 64, 40, 4}), cv_ok, {3, 1, 1}).ok());
  uint64_t cv_short[] = {(3 * 51 + 40) * 2, (3 * 64 + 40) * 4};
  CHECK(ValidateKernelArgs(cv, PushBytes(RectPush{51, 64, 40, 4}), cv_short, {3, 1, 1}).code() ==
        Errc::kOutOfBounds);
  // The engine refuses the same before recording anything.
  Engine& e = TheEngine();
  auto b = MakeBuffer(e, ToBytes(std::vector<uint32_t>(64)));
  Submission sub;
  sub.Dispatch(static_cast<uint32_t>(KernelId::kFillRect), {1, 1, 1}, {Whole(b)}, PushBytes(FillRectPush{16, 16, 5, 1}));
  CHECK(e.SubmitAndWait(std::move(sub)).code() == Errc::kOutOfBounds);
}

TEST_CASE("guest::RectBinding: rectangles outside their surface are refused before the device sees them") {
  const guest::Surface s{100 * 50 * 4, 100, 90, 50, 4};
  CHECK(guest::RectBinding(0, s, {0, 0, 90, 50}, 1).ok());
  CHECK(guest::RectBinding(0, s, {1, 0, 90, 50}, 1).code() == Errc::kOutOfBounds);
  CHECK(guest::RectBinding(0, s, {0, 0xFFFFFFFFu, 1, 2}, 1).code() == Errc::kOutOfBounds);
  CHECK(guest::RectBinding(0, s, {0, 0, 0, 5}, 1).code() == Errc::kInvalidArgument);
  const guest::Surface rgb{101 * 4 * 2 + 2, 101, 100, 4, 2};
  CHECK(guest::RectBinding(0, rgb, {1, 0, 10, 2}, 1).code() == Errc::kMisaligned);
  CHECK(guest::RectBinding(0, rgb, {0, 1, 10, 2}, 1).code() == Errc::kMisaligned);
  CHECK(guest::RectBinding(0, rgb, {0, 0, 100, 4}, 1).ok());
}
