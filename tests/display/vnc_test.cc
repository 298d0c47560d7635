// F10: the VNC console of a vGPU, through the real daemon and a real VNC client from Debian
// (vncsnapshot). vgpuctl show names the console (loopback); a guest process draws a frame
// through the mediated path (fill_rect DISPATCHes in its ring, onto a plane the CPU first
// painted with the complement of every colour) and flips; vncsnapshot connects (with the
// console's password; a wrong one is refused) and saves the frame the guest drew.
// vncsnapshot writes JPEG (quality 100, lossless transport): the frame is made of 16 x 16
// blocks of one colour each, aligned to JPEG's blocks, which it brings back exactly, so the
// image is compared pixel for pixel with the CPU's reference. A daemon without a password
// file serves two vGPUs on two ports, both listening on 127.0.0.1 only (/proc/net/tcp), each
// showing its own guest's frame to a client without a password. vncsnapshot is installed by
// tools/install-deps.sh: without it the test fails.
#include <doctest.h>

#include <cstddef>
#include <cstdio>
// jpeglib.h needs size_t and FILE first.
#include <jpeglib.h>
extern "C" {
int rfbEncryptAndStorePasswd(char* passwd, char* fname);  // libvncserver's, declared without C linkage in rfbproto.h
}

#include <cstring>
#include <filesystem>
#include <fstream>
#include <vector>

#include "guest/display.h"
#include "guest/draw2d.h"
#include "tests/lifecycle/lifecycle_common.h"

using namespace vg;
using namespace vg::guest;
using namespace vg::lifecycle;
namespace disp = vg::abi::display;

namespace {

uint32_t Block(uint32_t x, uint32_t y) {  // 0x00RRGGBB, one colour per 16 x 16 block
  const uint32_t bx = x / 16, by = y / 16;
  return ((bx * 53 + 17) & 0xFF) << 16 | ((by * 71 + 40) & 0xFF) << 8 | (((bx + by) * 29 + 90) & 0xFF);
}

struct Rgb {
  uint32_t width = 0, height = 0;
  std::vector<uint8_t> px;
};

Rgb ReadJpeg(const std::string& path) {
  Rgb out;
  FILE* f = std::fopen(path.c_str(), "rb");
  REQUIRE_MESSAGE(f, "no ", path);
  jpeg_decompress_struct ci{};
  jpeg_error_mgr jerr{};
  ci.err = jpeg_std_error(&jerr);
  jpeg_create_decompress(&ci);
  jpeg_stdio_src(&ci, f);
  jpeg_read_header(&ci, TRUE);
  ci.out_color_space = JCS_RGB;
  jpeg_start_decompress(&ci);
  out.width = ci.output_width;
  out.height = ci.output_height;
  out.px.resize(size_t{out.width} * out.height * 3);
  while (ci.output_scanline < ci.output_height) {
    JSAMPROW row = out.px.data() + size_t{ci.output_scanline} * out.width * 3;
    jpeg_read_scanlines(&ci, &row, 1);
  }
  jpeg_finish_decompress(&ci);
  jpeg_destroy_decompress(&ci);
  std::fclose(f);
  return out;
}

int DisplayNumber(const std::string& vnc, uint16_t* port) {
  *port = static_cast<uint16_t>(std::stoi(vnc.substr(vnc.rfind(':') + 1)));
  return *port - 5900;
}

mgmt::Ran Snapshot(const std::string& passwd_file, int display, const std::string& out) {
  std::vector<std::string> argv{"/usr/bin/vncsnapshot", "-quiet", "-nojpeg", "-quality", "100", "-nocursor"};
  if (!passwd_file.empty()) {
    argv.push_back("-passwd");
    argv.push_back(passwd_file);
  }
  argv.push_back("127.0.0.1:" + std::to_string(display));
  argv.push_back(out);
  return mgmt::RunCapture(argv, {}, 20000);
}

}  // namespace

TEST_CASE("the vGPU's VNC console serves the frame the guest flipped to a real VNC client") {
  REQUIRE_MESSAGE(std::filesystem::exists("/usr/bin/vncsnapshot"),
                  "vncsnapshot is not installed: run tools/install-deps.sh");
  mgmt::DaemonProc d;
  const std::string pw_plain = (d.dir() / "vnc.pw").string();
  { std::ofstream(pw_plain) << "s3cret\n"; }
  // Ports from 5900 + an offset of our own, so that parallel runs do not meet (the daemon
  // takes the next free one anyway).
  const int base = 5900 + 100 + (::getpid() % 800);
  REQUIRE(d.Start({"--vnc-port", std::to_string(base), "--vnc-password-file", pw_plain}));
  StartVgpu(d, kUuidA);
  mgmt::Json show = d.CtlJson({"show", kUuidA});
  REQUIRE(show["vnc"].is_string());
  const std::string vnc = show["vnc"].get<std::string>();
  CHECK(vnc.rfind("127.0.0.1:", 0) == 0);  // loopback by default
  CHECK(show["vnc_password"] == true);
  uint16_t port = 0;
  const int display = DisplayNumber(vnc, &port);
  CHECK(port >= base);
  CHECK(port < base + 1000);
  // vgpuctl show (human) names it too.
  mgmt::Ran shown = d.Ctl({"show", kUuidA});
  CHECK(shown.out.find(vnc) != std::string::npos);

  DeviceOptions o;
  o.socket = d.Socket(kUuidA);
  o.ram_size = 8 << 20;
  auto dev = Device::Open(o);
  REQUIRE(dev.ok());
  constexpr uint32_t kW = 320, kH = 160, kStride = 1344, kBase = 128 * 1024;  // stride with padding
  // The CPU paints the plane with the complement of the frame (and its padding white), so
  // that whatever the engine does not draw is far from the reference.
  auto ap = (*dev)->aperture();
  for (uint32_t y = 0; y < kH; ++y) {
    for (uint32_t x = 0; x < kW; ++x) {
      const uint32_t v = ~Block(x, y) & 0xFFFFFFu;
      std::memcpy(ap.data() + kBase + uint64_t{y} * kStride + 4ull * x, &v, 4);
    }
    std::memset(ap.data() + kBase + uint64_t{y} * kStride + 4ull * kW, 0xFF, kStride - 4 * kW);
  }
  // The frame itself through the mediated path: one fill_rect per block, in the ring, onto the
  // plane mapped into the GTT; a submission per row of blocks.
  auto drv = Driver::Create(**dev);
  REQUIRE(drv.ok());
  const Surface plane{uint64_t{kStride} * kH, kStride / 4, kW, kH, 4};
  auto plane_va = (*drv)->MapAperture(kBase, uint64_t{kStride} * kH, true);
  REQUIRE(plane_va.ok());
  const GpuVa va[] = {*plane_va};
  uint32_t fills = 0;
  for (uint32_t by = 0; by < kH / 16; ++by) {
    CommandBuilder cb;
    for (uint32_t bx = 0; bx < kW / 16; ++bx) {
      auto op = FillRect(0, plane, {bx * 16, by * 16, 16, 16}, Block(bx * 16, by * 16));
      REQUIRE(op.ok());
      Emit(cb, *op, va);
      ++fills;
    }
    auto seq = (*drv)->Submit(cb);
    REQUIRE(seq.ok());
    auto w = (*drv)->Wait(*seq, WaitMode::kIrq, 20000);
    REQUIRE_MESSAGE(w.ok(), "row ", by, ": ", w.ok() ? std::string() : w.error().ToString());
  }
  CHECK(fills == (kW / 16) * (kH / 16));
  // What the engine wrote is the reference frame, exactly (the CPU side of the comparison
  // below: the console must show this).
  uint32_t engine_wrong = 0;
  for (uint32_t y = 0; y < kH; ++y)
    for (uint32_t x = 0; x < kW; ++x) {
      uint32_t v = 0;
      std::memcpy(&v, ap.data() + kBase + uint64_t{y} * kStride + 4ull * x, 4);
      engine_wrong += (v & 0xFFFFFFu) != Block(x, y);
    }
  CHECK(engine_wrong == 0);
  guest::Display display_api(**dev);
  REQUIRE(display_api.Configure({kBase, kStride, disp::kFormatXrgb8888, kW, kH}).ok());
  REQUIRE(display_api.WaitFlip(1, 2000).ok());

  // The password file vncsnapshot reads is VNC's obfuscated format.
  const std::string pw_vnc = (d.dir() / "vnc.passwd").string();
  std::string pw = "s3cret";
  REQUIRE(rfbEncryptAndStorePasswd(pw.data(), const_cast<char*>(pw_vnc.c_str())) == 0);
  const std::string out = (d.dir() / "vnc.jpg").string();
  mgmt::Ran r = Snapshot(pw_vnc, display, out);
  REQUIRE_MESSAGE(r.code == 0, "vncsnapshot: ", r.out, r.err);
  const Rgb img = ReadJpeg(out);
  CHECK(img.width == kW);
  CHECK(img.height == kH);
  if (img.width == kW && img.height == kH) {
    int worst = 0;
    uint64_t total = 0;
    for (uint32_t y = 0; y < kH; ++y)
      for (uint32_t x = 0; x < kW; ++x) {
        const uint32_t want = Block(x, y);
        const uint8_t* got = &img.px[(size_t{y} * kW + x) * 3];
        for (int c = 0; c < 3; ++c) {
          const int e = std::abs(int{got[c]} - int((want >> (16 - 8 * c)) & 0xFF));
          worst = std::max(worst, e);
          total += static_cast<uint64_t>(e);
        }
      }
    MESSAGE("worst channel error ", worst, ", mean ", double(total) / (kW * kH * 3));
    // Pixel for pixel: at quality 100 a flat 16 x 16 block aligned to JPEG's MCU keeps only
    // its DC term, which Debian 12's libjpeg-turbo brings back exactly for these colours.
    CHECK(worst == 0);
  }

  // A wrong password: refused, nothing saved.
  const std::string bad_vnc = (d.dir() / "bad.passwd").string();
  std::string bad = "wrong";
  REQUIRE(rfbEncryptAndStorePasswd(bad.data(), const_cast<char*>(bad_vnc.c_str())) == 0);
  const std::string out2 = (d.dir() / "bad.jpg").string();
  r = Snapshot(bad_vnc, display, out2);
  CHECK(r.code != 0);
  CHECK(!std::filesystem::exists(out2));
  // The guest's device still answers while clients come and go.
  CHECK((*dev)->Read32(abi::reg::kId).value_or(0) == abi::kIdMagic);
  CheckShutdown(d);
}

namespace {

// A frame of 16 x 16 blocks per vGPU, told apart by `salt`.
uint32_t BlockOf(uint32_t x, uint32_t y, uint32_t salt) { return salt ? Block(x + 16 * salt, y + 32 * salt) : Block(x, y); }

// The listening TCP sockets on `port` in /proc/net/tcp: their local addresses, as the kernel
// prints them (hex, 0100007F for 127.0.0.1).
std::vector<std::string> ListenersOn(uint16_t port) {
  std::vector<std::string> out;
  std::ifstream in("/proc/net/tcp");
  std::string line;
  std::getline(in, line);  // the header
  const std::string want_port = fmt::format("{:04X}", port);
  while (std::getline(in, line)) {
    char local[64] = {}, remote[64] = {};
    unsigned state = 0;
    if (std::sscanf(line.c_str(), " %*d: %63s %63s %x", local, remote, &state) != 3) continue;
    const std::string l(local);
    if (state == 0x0A && l.size() > 5 && l.substr(l.size() - 4) == want_port) out.push_back(l.substr(0, l.size() - 5));
  }
  return out;
}

}  // namespace

TEST_CASE("without a password file: two vGPUs, two loopback consoles, each serving its own frame without a password") {
  REQUIRE_MESSAGE(std::filesystem::exists("/usr/bin/vncsnapshot"),
                  "vncsnapshot is not installed: run tools/install-deps.sh");
  mgmt::DaemonProc d;
  const int base = 5900 + 100 + ((::getpid() + 400) % 800);
  REQUIRE(d.Start({"--vnc-port", std::to_string(base)}));
  StartVgpu(d, kUuidA);
  StartVgpu(d, kUuidC);
  constexpr uint32_t kW = 256, kH = 128, kStride = 1024, kBase = 64 * 1024;
  const char* uuids[] = {kUuidA, kUuidC};
  uint16_t ports[2] = {};
  int displays[2] = {};
  std::vector<std::unique_ptr<Device>> devs;
  for (int i = 0; i < 2; ++i) {
    CAPTURE(i);
    mgmt::Json show = d.CtlJson({"show", uuids[i]});
    REQUIRE(show["vnc"].is_string());
    const std::string vnc = show["vnc"].get<std::string>();
    CHECK(vnc.rfind("127.0.0.1:", 0) == 0);
    CHECK(show["vnc_password"] == false);
    displays[i] = DisplayNumber(vnc, &ports[i]);
    CHECK(ports[i] >= base);
    // Bound to loopback only: one listener on the port, at 127.0.0.1, none on any address.
    const auto listeners = ListenersOn(ports[i]);
    CHECK(listeners.size() == 1);
    for (const std::string& a : listeners) CHECK(a == "0100007F");

    DeviceOptions o;
    o.socket = d.Socket(uuids[i]);
    o.ram_size = 4 << 20;
    auto dev = Device::Open(o);
    REQUIRE(dev.ok());
    auto ap = (*dev)->aperture();
    for (uint32_t y = 0; y < kH; ++y)
      for (uint32_t x = 0; x < kW; ++x) {
        const uint32_t v = BlockOf(x, y, static_cast<uint32_t>(i));
        std::memcpy(ap.data() + kBase + uint64_t{y} * kStride + 4ull * x, &v, 4);
      }
    guest::Display display_api(**dev);
    REQUIRE(display_api.Configure({kBase, kStride, disp::kFormatXrgb8888, kW, kH}).ok());
    REQUIRE(display_api.WaitFlip(1, 2000).ok());
    devs.push_back(std::move(dev).value());
  }
  CHECK(ports[0] != ports[1]);

  // No password: vncsnapshot connects without one, and each console shows its own guest's
  // frame (compared with both references: close to its own, far from the other's).
  for (int i = 0; i < 2; ++i) {
    CAPTURE(i);
    const std::string out = (d.dir() / fmt::format("console{}.jpg", i)).string();
    mgmt::Ran r = Snapshot("", displays[i], out);
    REQUIRE_MESSAGE(r.code == 0, "vncsnapshot: ", r.out, r.err);
    const Rgb img = ReadJpeg(out);
    REQUIRE(img.width == kW);
    REQUIRE(img.height == kH);
    double mean_err[2] = {};
    for (uint32_t ref = 0; ref < 2; ++ref) {
      uint64_t total = 0;
      for (uint32_t y = 0; y < kH; ++y)
        for (uint32_t x = 0; x < kW; ++x) {
          const uint32_t want = BlockOf(x, y, ref);
          const uint8_t* got = &img.px[(size_t{y} * kW + x) * 3];
          for (int c = 0; c < 3; ++c) total += static_cast<uint64_t>(std::abs(int{got[c]} - int((want >> (16 - 8 * c)) & 0xFF)));
        }
      mean_err[ref] = double(total) / (kW * kH * 3);
    }
    INFO("mean channel error against frame 0: ", mean_err[0], ", against frame 1: ", mean_err[1]);
    CHECK(mean_err[i] < 1.0);
    CHECK(mean_err[1 - i] > 20.0);
  }
  CheckShutdown(d);
}
