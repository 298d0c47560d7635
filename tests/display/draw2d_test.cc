// F10 2-D acceleration through the real daemon. A guest composes a frame in its scan-out
// plane with the catalogue's 2-D kernels only (fill_rect, blit, blend, convert_565, and
// overlapping blits within the plane in both directions through a scratch surface), flips it,
// and the PNG `vgpuctl screenshot` writes equals the CPU-rendered reference pixel for pixel.
// A hostile neighbour's 2-D commands with lying rectangles, strides and sizes are refused by
// name while that frame, redrawn, and a kernel-running victim stay bit-exact.
#include <doctest.h>
#include <png.h>

#include <cstring>
#include <random>
#include <vector>

#include "guest/display.h"
#include "guest/draw2d.h"
#include "shaders/reference.h"
#include "tests/e2e/guest_checks.h"
#include "tests/lifecycle/lifecycle_common.h"

using namespace vg;
using namespace vg::guest;
using namespace vg::lifecycle;
namespace disp = vg::abi::display;

namespace {

// The error's words for a failed assertion's message (doctest evaluates the message of a
// passing assertion too, under -s: it must not touch a Result that holds a value).
template <class R>
std::string Why(const R& r) {
  return r.ok() ? std::string() : r.error().ToString();
}

constexpr uint32_t kW = 200, kH = 120, kStridePx = 208;  // 832-byte rows: a multiple of 64
constexpr uint32_t kPlaneBase = 64 * 1024;
constexpr uint64_t Up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// Surfaces by index: 0 the plane (aperture), 1 a window, 2 an overlay (premultiplied ARGB),
// 3 an RGB565 window, 4 scratch.
struct Scene {
  std::vector<Surface> surf;
  std::vector<std::vector<std::byte>> init;  // initial contents of 1..3 (0 and 4 start zeroed)
  std::vector<Op2D> ops;
};

std::vector<std::byte> Random(size_t bytes, uint32_t seed, bool premultiply = false) {
  std::mt19937 rng(seed);
  std::vector<uint32_t> v((bytes + 3) / 4);
  for (size_t i = 0; i < v.size(); ++i) {
    uint32_t x = rng();
    if (premultiply) {
      const uint32_t a = i % 5 == 0 ? 255u : (x >> 24);
      uint32_t p = a << 24;
      for (uint32_t sh = 0; sh < 24; sh += 8) p |= (((x >> sh) & 255u) * a / 255u) << sh;
      x = p;
    }
    v[i] = x;
  }
  std::vector<std::byte> out(bytes);
  std::memcpy(out.data(), v.data(), bytes);
  return out;
}

Scene MakeScene(uint32_t salt) {
  Scene s;
  s.surf = {
      {uint64_t{kStridePx} * kH * 4, kStridePx, kW, kH, 4},
      {64 * 50 * 4, 64, 64, 50, 4},
      {80 * 40 * 4, 80, 80, 40, 4},
      {uint64_t{45} * 30 * 2 + 2, 45, 44, 30, 2},  // odd stride: rows alternate halves of a dword
      {uint64_t{kW} * kH * 4, kW, kW, kH, 4},
  };
  s.init = {{}, Random(s.surf[1].size, salt + 1), Random(s.surf[2].size, salt + 2, true),
            Random(s.surf[3].size, salt + 3)};
  auto add = [&](Result<Op2D> op) {
    REQUIRE_MESSAGE(op.ok(), Why(op));
    s.ops.push_back(*op);
  };
  auto add_all = [&](Result<std::vector<Op2D>> ops) {
    REQUIRE_MESSAGE(ops.ok(), Why(ops));
    s.ops.insert(s.ops.end(), ops->begin(), ops->end());
  };
  add(FillRect(0, s.surf[0], {0, 0, kW, kH}, 0xFF203040u + salt));   // desktop
  add(FillRect(0, s.surf[0], {10, 100, 180, 16}, 0xFFC0C0C0u));       // a task bar
  add_all(Blit(1, s.surf[1], 0, 0, 0, s.surf[0], {13, 7, 64, 50}));   // a window at an odd column
  add_all(Blit(1, s.surf[1], 4, 2, 0, s.surf[0], {120, 20, 60, 48}));  // part of it, aligned
  add(Convert565(3, s.surf[3], 0, 2, 0, s.surf[0], {90, 70, 44, 28}));  // a 16-bit window
  add(Blend(2, s.surf[2], 0, 0, 0, s.surf[0], {40, 30, 80, 40}));       // a translucent overlay
  // Scrolls within the plane, overlapping: down-right and up-left.
  add_all(Blit(0, s.surf[0], 12, 8, 0, s.surf[0], {15, 11, 70, 45}, &s.surf[4], 4));
  add_all(Blit(0, s.surf[0], 110, 30, 0, s.surf[0], {106, 26, 70, 60}, &s.surf[4], 4));
  return s;
}

// The same ops on the CPU references, surface by surface.
std::vector<uint32_t> Reference(const Scene& s) {
  std::vector<std::vector<std::byte>> mem(s.surf.size());
  for (size_t i = 0; i < mem.size(); ++i)
    mem[i] = i < s.init.size() && !s.init[i].empty() ? s.init[i] : std::vector<std::byte>(s.surf[i].size);
  for (const Op2D& op : s.ops) {
    std::vector<std::span<std::byte>> b;
    for (const Binding2D& x : op.bindings()) b.push_back(std::span(mem[x.surface]).subspan(x.offset, x.size));
    auto r = shaders::RunReference(op.kernel, op.push_bytes().first(shaders::FindKernel(op.kernel)->push_size), b,
                                   op.groups);
    REQUIRE_MESSAGE(r.ok(), Why(r));
  }
  std::vector<uint32_t> frame(uint64_t{kW} * kH);
  for (uint32_t y = 0; y < kH; ++y) std::memcpy(&frame[y * kW], &mem[0][uint64_t{y} * kStridePx * 4], kW * 4);
  return frame;
}

// A guest that draws scenes into its plane through its ring.
struct Desktop {
  std::unique_ptr<Device> dev;
  std::unique_ptr<Driver> drv;
  std::unique_ptr<Display> display;
  std::vector<GpuVa> va;

  explicit Desktop(const std::string& socket) {
    dev = e2e::OpenGuest(socket, 8 << 20);
    auto r = Driver::Create(*dev);
    REQUIRE(r.ok());
    drv = std::move(r).value();
    display = std::make_unique<Display>(*dev);
  }

  Result<> Draw(const Scene& s) {
    // The plane: its bytes in the aperture, zeroed, mapped into the GTT.
    const uint64_t plane_bytes = Up(s.surf[0].size, kPageSize);
    std::memset(dev->aperture().data() + kPlaneBase, 0, plane_bytes);
    va.clear();
    VG_TRY_ASSIGN(GpuVa plane, drv->MapAperture(kPlaneBase, plane_bytes, true));
    va.push_back(plane);
    for (size_t i = 1; i < s.surf.size(); ++i) {
      VG_TRY_ASSIGN(GpuBuffer b, drv->Alloc(Up(s.surf[i].size, kPageSize)));
      if (i < s.init.size()) std::memcpy(b.host.data(), s.init[i].data(), s.init[i].size());
      va.push_back(b.va);
    }
    return Run(s.ops);
  }

  // More ops on the surfaces Draw placed.
  Result<> Run(std::span<const Op2D> ops) {
    CommandBuilder cb;
    for (const Op2D& op : ops) Emit(cb, op, va);
    VG_TRY_ASSIGN(uint64_t seq, drv->Submit(cb));
    return drv->Wait(seq, WaitMode::kIrq, 20000);
  }
};

std::vector<uint32_t> ReadPng(const std::string& path, uint32_t& w, uint32_t& h) {
  png_image im{};
  im.version = PNG_IMAGE_VERSION;
  REQUIRE_MESSAGE(png_image_begin_read_from_file(&im, path.c_str()), "not a PNG: ", path);
  im.format = PNG_FORMAT_BGRA;  // B, G, R, A bytes: 0xAARRGGBB as a little-endian u32
  w = im.width;
  h = im.height;
  std::vector<uint32_t> px(uint64_t{w} * h);
  REQUIRE(png_image_finish_read(&im, nullptr, px.data(), 0, nullptr));
  return px;
}

// The screenshot against the reference frame (XRGB8888: the X byte shows as opaque).
std::string CompareShot(mgmt::DaemonProc& d, const std::string& uuid, const std::vector<uint32_t>& want) {
  const std::string out = (d.dir() / "shot.png").string();
  mgmt::Ran r = d.Ctl({"screenshot", uuid, out});
  if (r.code != 0) return "screenshot: " + r.err;
  uint32_t w = 0, h = 0;
  auto got = ReadPng(out, w, h);
  if (w != kW || h != kH) return fmt::format("size {}x{}", w, h);
  for (size_t i = 0; i < got.size(); ++i)
    if (got[i] != (want[i] | 0xFF000000u))
      return fmt::format("pixel ({}, {}) is {:08x}, want {:08x}", i % kW, i / kW, got[i], want[i] | 0xFF000000u);
  return "";
}

void ExpectRefused(Desktop& g, const CommandBuilder& cb, Errc code, const char* what) {
  CAPTURE(std::string(what));
  auto seq = g.drv->Submit(cb);
  REQUIRE(seq.ok());
  auto w = g.drv->Wait(*seq, WaitMode::kIrq, 5000);
  CHECK_MESSAGE(w.code() == code, std::string(what), ": got ", ErrcName(w.code()), ", want ", ErrcName(code));
  auto err = g.dev->ReadError();
  REQUIRE(err.ok());
  CHECK(err->code == code);
  REQUIRE(g.dev->ClearError().ok());
}

}  // namespace

TEST_CASE("2-D kernels draw a frame in the scan-out plane that the screenshot shows pixel for pixel") {
  mgmt::DaemonProc d;
  REQUIRE(d.Start());
  StartVgpu(d, kUuidA);
  StartVgpu(d, kUuidB);
  StartVgpu(d, kUuidC);
  e2e::Victim victim(d.Socket(kUuidB));

  Desktop a(d.Socket(kUuidA));
  const Scene scene = MakeScene(1);
  const std::vector<uint32_t> want = Reference(scene);
  auto drawn = a.Draw(scene);
  REQUIRE_MESSAGE(drawn.ok(), Why(drawn));
  REQUIRE(a.display->Configure({kPlaneBase, kStridePx * 4, disp::kFormatXrgb8888, kW, kH}).ok());
  REQUIRE(a.display->WaitFlip(1, 2000).ok());
  CHECK(CompareShot(d, kUuidA, want) == "");

  // One small submission whose plane rectangle starts mid-row (16-byte unaligned: gathered
  // and written back, never bound in place), alone in its plan.
  {
    Scene more = scene;
    auto fill = FillRect(0, scene.surf[0], {13, 3, 31, 9}, 0xFF00FF00u);
    REQUIRE(fill.ok());
    more.ops.push_back(*fill);
    auto ran = a.Run(std::span(&*fill, 1));
    REQUIRE_MESSAGE(ran.ok(), Why(ran));
    CHECK(CompareShot(d, kUuidA, Reference(more)) == "");
  }
  REQUIRE(a.Run(scene.ops).ok());
  CHECK(CompareShot(d, kUuidA, want) == "");

  SUBCASE("a hostile neighbour's lying 2-D commands are refused by name; the frame stays exact") {
    Desktop c(d.Socket(kUuidC));
    auto buf = c.drv->Alloc(64 * 1024);
    REQUIRE(buf.ok());
    auto ro = c.drv->Alloc(64 * 1024, false);
    REQUIRE(ro.ok());
    using shaders::FillRectPush;
    using shaders::KernelId;
    using shaders::PushBytes;
    using shaders::RectPush;
    const uint32_t fr = static_cast<uint32_t>(KernelId::kFillRect), bl = static_cast<uint32_t>(KernelId::kBlit),
                   be = static_cast<uint32_t>(KernelId::kBlend), cv = static_cast<uint32_t>(KernelId::kConvert565);
    const Binding whole = Bind(*buf);
    struct Attack {
      const char* what;
      uint32_t kernel;
      std::array<uint32_t, 3> groups;
      std::vector<Binding> b;
      std::array<uint32_t, 4> push;
      Errc code;
    };
    const Attack attacks[] = {
        {"rectangle past its binding", fr, {13, 8, 1}, {whole}, {208, 200, 120, 1}, Errc::kOutOfBounds},
        {"huge height", fr, {1, 1, 1}, {whole}, {64, 64, 0xFFFFFFFFu, 1}, Errc::kLimitExceeded},
        {"height that wraps a u32 product", fr, {1, 1, 1}, {whole}, {65536, 16, 65537, 1}, Errc::kLimitExceeded},
        {"huge stride", fr, {1, 1, 1}, {whole}, {0x40000000u, 16, 2, 1}, Errc::kLimitExceeded},
        {"stride below the width", fr, {1, 1, 1}, {whole}, {8, 64, 2, 1}, Errc::kInvalidArgument},
        {"widest legal rectangle, small binding", fr, {1024, 1, 1}, {whole}, {16384, 16384, 2, 1},
         Errc::kOutOfBounds},
        {"blit source stride lies", bl, {1, 1, 1}, {whole, whole}, {65536, 16, 16, 16}, Errc::kOutOfBounds},
        {"blit destination too short", bl, {4, 4, 1}, {whole, {buf->va, 4096, abi::cmd::kAccessWrite}}, {64, 64, 64, 64},
         Errc::kOutOfBounds},
        {"blend into read-only memory", be, {1, 1, 1}, {whole, Bind(*ro)}, {16, 16, 16, 16}, Errc::kAccessDenied},
        {"blend with a read-only binding access", be, {1, 1, 1}, {whole, {buf->va, 4096, abi::cmd::kAccessRead}}, {16, 16, 16, 16},
         Errc::kAccessDenied},
        {"convert source past its binding", cv, {1, 1, 1}, {{buf->va, 64, abi::cmd::kAccessRead}, whole}, {16, 16, 16, 16},
         Errc::kOutOfBounds},
        {"binding past the mapped buffer", bl, {1, 1, 1}, {{buf->va, 1 << 20, abi::cmd::kAccessRead}, whole}, {16, 16, 16, 16},
         Errc::kNotMapped},
    };
    for (const Attack& at : attacks) {
      CommandBuilder cb;
      cb.Dispatch(at.kernel, at.groups, at.b,
                  std::as_bytes(std::span(at.push)).first(shaders::FindKernel(at.kernel)->push_size));
      ExpectRefused(c, cb, at.code, at.what);
    }
    // The victim's frame, and the victim's redraw of it, stay exact.
    CHECK(CompareShot(d, kUuidA, want) == "");
    const Scene again = MakeScene(2);
    REQUIRE(a.Draw(again).ok());
    CHECK(CompareShot(d, kUuidA, Reference(again)) == "");
  }

  CheckVictim(victim.Stop());
  CheckShutdown(d);
}
