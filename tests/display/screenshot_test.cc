// F10: `vgpuctl screenshot` through the real daemon. A guest process draws a known frame into
// its aperture with CPU writes, configures its plane and flips; the PNG vgpuctl writes equals a
// CPU-rendered reference pixel for pixel, in XRGB8888, ARGB8888 (alpha kept) and RGB565
// (widened by bit replication). A flip to another buffer changes what is saved; a
// vGPU that scans nothing out is refused by name; the victim tenant stays exact.
#include <doctest.h>
#include <png.h>

#include <cstring>
#include <filesystem>
#include <vector>

#include "guest/display.h"
#include "tests/lifecycle/lifecycle_common.h"

using namespace vg;
using namespace vg::guest;
using namespace vg::lifecycle;
namespace disp = vg::abi::display;

namespace {

// The reference frame, in the guest's pixel format (XRGB8888: 0x00RRGGBB in a u32).
uint32_t Pixel(uint32_t x, uint32_t y, uint32_t salt) {
  const uint32_t r = (x * 7 + salt) & 0xFF, g = (y * 5 + 3 * salt) & 0xFF, b = ((x ^ y) + salt) & 0xFF;
  return r << 16 | g << 8 | b;
}

void Draw(Device& d, uint32_t base, uint32_t stride, uint32_t w, uint32_t h, uint32_t salt, uint32_t alpha) {
  auto ap = d.aperture();
  REQUIRE(uint64_t{base} + uint64_t{stride} * h <= ap.size());
  for (uint32_t y = 0; y < h; ++y)
    for (uint32_t x = 0; x < w; ++x) {
      const uint32_t v = Pixel(x, y, salt) | alpha << 24;
      std::memcpy(ap.data() + base + uint64_t{y} * stride + 4ull * x, &v, 4);
    }
  // Padding between rows that must not show: a stride that is honoured, not assumed.
  for (uint32_t y = 0; y < h; ++y)
    std::memset(ap.data() + base + uint64_t{y} * stride + 4ull * w, 0xEE, stride - 4 * w);
}

struct Png {
  uint32_t width = 0, height = 0;
  std::vector<uint8_t> rgba;  // 8-bit RGBA, as libpng reads it
};

Png ReadPng(const std::string& path) {
  png_image im{};
  im.version = PNG_IMAGE_VERSION;
  REQUIRE_MESSAGE(png_image_begin_read_from_file(&im, path.c_str()), "not a PNG: ", path, ": ", im.message);
  im.format = PNG_FORMAT_RGBA;
  Png p;
  p.width = im.width;
  p.height = im.height;
  p.rgba.resize(PNG_IMAGE_SIZE(im));
  REQUIRE(png_image_finish_read(&im, nullptr, p.rgba.data(), 0, nullptr));
  return p;
}

// Pixel for pixel: the first difference, or "" when equal.
std::string Compare(const Png& p, uint32_t w, uint32_t h, uint32_t salt, int alpha) {
  if (p.width != w || p.height != h) return fmt::format("size {}x{}, want {}x{}", p.width, p.height, w, h);
  for (uint32_t y = 0; y < h; ++y)
    for (uint32_t x = 0; x < w; ++x) {
      const uint32_t want = Pixel(x, y, salt);
      const uint8_t* got = &p.rgba[(uint64_t{y} * w + x) * 4];
      const uint8_t a = alpha < 0 ? 0xFF : static_cast<uint8_t>(alpha);
      if (got[0] != ((want >> 16) & 0xFF) || got[1] != ((want >> 8) & 0xFF) || got[2] != (want & 0xFF) || got[3] != a)
        return fmt::format("pixel ({}, {}) is {:02x}{:02x}{:02x}{:02x}, want {:06x} alpha {:02x}", x, y, got[0],
                           got[1], got[2], got[3], want, a);
    }
  return "";
}

}  // namespace

TEST_CASE("vgpuctl screenshot saves the frame the guest flipped, pixel for pixel") {
  mgmt::DaemonProc d;
  REQUIRE(d.Start());
  StartVgpu(d, kUuidA);
  StartVgpu(d, kUuidB);
  e2e::Victim victim(d.Socket(kUuidB));
  const std::string out = (d.dir() / "shot.png").string();

  // Nothing scanned out yet: refused by name.
  mgmt::Ran r = d.Ctl({"screenshot", kUuidA, out});
  CHECK(r.code != 0);
  CHECK(r.err.find("kBadState") != std::string::npos);

  DeviceOptions o;
  o.socket = d.Socket(kUuidA);
  o.ram_size = 4 << 20;
  auto dev = Device::Open(o);
  REQUIRE(dev.ok());
  Display display(**dev);
  constexpr uint32_t kW = 200, kH = 120, kStride = 832;  // 800 bytes of row, 32 of padding
  constexpr uint32_t kFront = 64 * 1024, kBack = 256 * 1024;
  Draw(**dev, kFront, kStride, kW, kH, 1, 0);
  Draw(**dev, kBack, kStride, kW, kH, 2, 0);
  REQUIRE(display.Configure({kFront, kStride, disp::kFormatXrgb8888, kW, kH}).ok());
  REQUIRE(display.WaitFlip(1, 2000).ok());

  r = d.Ctl({"screenshot", kUuidA, out});
  REQUIRE_MESSAGE(r.code == 0, r.err);
  CHECK(Compare(ReadPng(out), kW, kH, 1, -1) == "");

  // Flip to the back buffer: the screenshot follows the flip.
  auto t = display.Flip(kBack);
  REQUIRE(t.ok());
  REQUIRE(display.WaitFlip(*t, 2000).ok());
  r = d.Ctl({"screenshot", kUuidA, out});
  REQUIRE_MESSAGE(r.code == 0, r.err);
  CHECK(Compare(ReadPng(out), kW, kH, 2, -1) == "");

  // ARGB8888 keeps its alpha.
  Draw(**dev, kFront, kStride, kW, kH, 3, 0x80);
  const uint32_t n = display.flips();
  REQUIRE(display.Configure({kFront, kStride, disp::kFormatArgb8888, kW, kH}).ok());
  REQUIRE(display.WaitFlip(n + 1, 2000).ok());
  r = d.Ctl({"screenshot", kUuidA, out});
  REQUIRE_MESSAGE(r.code == 0, r.err);
  CHECK(Compare(ReadPng(out), kW, kH, 3, 0x80) == "");

  // RGB565 widened to 8 bits a channel by bit replication (the high bits repeated into the
  // low ones, so 0x1F is 0xFF and 0 is 0), with a stride that pads each row.
  {
    constexpr uint32_t kStride565 = 448;  // 400 bytes of row, 48 of padding
    auto ap = (*dev)->aperture();
    auto pix565 = [](uint32_t x, uint32_t y) {
      // The first row holds the corners of each channel, then a pattern that sets every bit.
      constexpr uint16_t kEdges[] = {0x0000, 0xFFFF, 0xF800, 0x07E0, 0x001F, 0x8410, 0x0821, 0x7BEF};
      if (y == 0 && x < 8) return kEdges[x];
      return static_cast<uint16_t>((x * 0x0841u) ^ (y * 0x1003u) ^ 0x5A5Au);
    };
    for (uint32_t y = 0; y < kH; ++y) {
      for (uint32_t x = 0; x < kW; ++x) {
        const uint16_t v = pix565(x, y);
        std::memcpy(ap.data() + kBack + uint64_t{y} * kStride565 + 2ull * x, &v, 2);
      }
      std::memset(ap.data() + kBack + uint64_t{y} * kStride565 + 2ull * kW, 0xEE, kStride565 - 2 * kW);
    }
    const uint32_t m = display.flips();
    REQUIRE(display.Configure({kBack, kStride565, disp::kFormatRgb565, kW, kH}).ok());
    REQUIRE(display.WaitFlip(m + 1, 2000).ok());
    r = d.Ctl({"screenshot", kUuidA, out});
    REQUIRE_MESSAGE(r.code == 0, r.err);
    const Png p = ReadPng(out);
    REQUIRE(p.width == kW);
    REQUIRE(p.height == kH);
    auto widen = [](uint32_t v, int bits) { return static_cast<uint8_t>(v << (8 - bits) | v >> (2 * bits - 8)); };
    uint32_t wrong = 0;
    std::string first;
    for (uint32_t y = 0; y < kH; ++y)
      for (uint32_t x = 0; x < kW; ++x) {
        const uint16_t v = pix565(x, y);
        const uint8_t want[4] = {widen(v >> 11, 5), widen((v >> 5) & 0x3F, 6), widen(v & 0x1F, 5), 0xFF};
        const uint8_t* got = &p.rgba[(uint64_t{y} * kW + x) * 4];
        if (std::memcmp(got, want, 4) != 0 && wrong++ == 0)
          first = fmt::format("pixel ({}, {}) {:04x} is {:02x}{:02x}{:02x}{:02x}, want {:02x}{:02x}{:02x}ff", x, y, v,
                              got[0], got[1], got[2], got[3], want[0], want[1], want[2]);
      }
    CHECK_MESSAGE(wrong == 0, first);
    // The corners by hand: full scale is 0xFF, and 0x8410 (each channel's top bit) is 84 82 84.
    CHECK(std::memcmp(&p.rgba[1 * 4], "\xff\xff\xff\xff", 4) == 0);
    CHECK(std::memcmp(&p.rgba[2 * 4], "\xff\x00\x00\xff", 4) == 0);
    CHECK(std::memcmp(&p.rgba[3 * 4], "\x00\xff\x00\xff", 4) == 0);
    CHECK(std::memcmp(&p.rgba[4 * 4], "\x00\x00\xff\xff", 4) == 0);
    CHECK(std::memcmp(&p.rgba[5 * 4], "\x84\x82\x84\xff", 4) == 0);
  }

  // Off again: refused again.
  REQUIRE(display.Disable().ok());
  r = d.Ctl({"screenshot", kUuidA, out});
  CHECK(r.code != 0);
  CHECK(r.err.find("kBadState") != std::string::npos);

  CheckVictim(victim.Stop());
  CheckShutdown(d);
}
