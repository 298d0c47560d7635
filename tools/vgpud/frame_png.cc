#include "tools/vgpud/frame_png.h"

#include <png.h>

#include "abi/device.h"

namespace vg::daemon {

Result<std::string> EncodePng(const ScanoutImage& img) {
  namespace disp = abi::display;
  const bool alpha = img.format == disp::kFormatArgb8888;
  const uint32_t in_bpp = disp::BytesPerPixel(img.format);
  const uint32_t out_bpp = alpha ? 4 : 3;
  const uint64_t n = uint64_t{img.width} * img.height;
  VG_ERROR_IF(in_bpp == 0 || img.pixels.size() != n * in_bpp, Errc::kInvalidArgument, "frame of {} bytes for {}x{}",
              img.pixels.size(), img.width, img.height);
  std::vector<uint8_t> rgb(n * out_bpp);
  const uint8_t* s = img.pixels.data();
  uint8_t* d = rgb.data();
  for (uint64_t i = 0; i < n; ++i, d += out_bpp) {
    if (in_bpp == 4) {  // memory order B, G, R, X/A (DRM's little-endian formats)
      d[0] = s[4 * i + 2];
      d[1] = s[4 * i + 1];
      d[2] = s[4 * i + 0];
      if (alpha) d[3] = s[4 * i + 3];
    } else {
      const uint16_t p = static_cast<uint16_t>(s[2 * i] | s[2 * i + 1] << 8);
      const uint32_t r = p >> 11, g = (p >> 5) & 0x3F, b = p & 0x1F;
      d[0] = static_cast<uint8_t>(r << 3 | r >> 2);
      d[1] = static_cast<uint8_t>(g << 2 | g >> 4);
      d[2] = static_cast<uint8_t>(b << 3 | b >> 2);
    }
  }
  png_image im{};
  im.version = PNG_IMAGE_VERSION;
  im.width = img.width;
  im.height = img.height;
  im.format = alpha ? PNG_FORMAT_RGBA : PNG_FORMAT_RGB;
  png_alloc_size_t size = 0;
  // First call sizes, second writes (libpng 1.6 simplified API: no setjmp in our code).
  VG_ERROR_IF(!png_image_write_to_memory(&im, nullptr, &size, 0, rgb.data(), 0, nullptr), Errc::kInternal,
              "png: {}", im.message);
  std::string out(size, '\0');
  VG_ERROR_IF(!png_image_write_to_memory(&im, out.data(), &size, 0, rgb.data(), 0, nullptr), Errc::kInternal,
              "png: {}", im.message);
  out.resize(size);
  return out;
}

std::string Base64(std::string_view in) {
  static constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 3 <= in.size(); i += 3) {
    const uint32_t v = uint32_t{static_cast<uint8_t>(in[i])} << 16 | uint32_t{static_cast<uint8_t>(in[i + 1])} << 8 |
                       static_cast<uint8_t>(in[i + 2]);
    for (int k = 18; k >= 0; k -= 6) out.push_back(kAlphabet[(v >> k) & 63]);
  }
  if (i < in.size()) {
    uint32_t v = uint32_t{static_cast<uint8_t>(in[i])} << 16;
    if (i + 1 < in.size()) v |= uint32_t{static_cast<uint8_t>(in[i + 1])} << 8;
    out.push_back(kAlphabet[(v >> 18) & 63]);
    out.push_back(kAlphabet[(v >> 12) & 63]);
    out.push_back(i + 1 < in.size() ? kAlphabet[(v >> 6) & 63] : '=');
    out.push_back('=');
  }
  return out;
}

}  // namespace vg::daemon
