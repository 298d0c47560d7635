#include "base/types.h"

#include <fcntl.h>
#include <sys/random.h>
#include <unistd.h>

namespace vg {
namespace {
int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}
}  // namespace

Result<Uuid> Uuid::Parse(std::string_view text) {
  VG_INVALID_IF(text.size() != 36, "uuid '{}' is not 36 characters", text);
  Uuid u;
  size_t byte = 0;
  for (size_t i = 0; i < text.size();) {
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      VG_INVALID_IF(text[i] != '-', "uuid '{}' has no dash at {}", text, i);
      ++i;
      continue;
    }
    int hi = HexValue(text[i]);
    int lo = HexValue(text[i + 1]);
    VG_INVALID_IF(hi < 0 || lo < 0, "uuid '{}' has a non-hex digit at {}", text, i);
    u.b[byte++] = static_cast<uint8_t>(hi << 4 | lo);
    i += 2;
  }
  return u;
}

Uuid Uuid::Random() {
  Uuid u;
  size_t got = 0;
  while (got < u.b.size()) {
    ssize_t n = getrandom(u.b.data() + got, u.b.size() - got, 0);
    if (n > 0) got += static_cast<size_t>(n);
  }
  u.b[6] = static_cast<uint8_t>((u.b[6] & 0x0f) | 0x40);  // RFC 4122 version 4
  u.b[8] = static_cast<uint8_t>((u.b[8] & 0x3f) | 0x80);
  return u;
}

std::string Uuid::ToString() const {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string s;
  s.reserve(36);
  for (size_t i = 0; i < b.size(); ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) s.push_back('-');
    s.push_back(kHex[b[i] >> 4]);
    s.push_back(kHex[b[i] & 0xf]);
  }
  return s;
}

bool Uuid::IsNil() const {
  for (auto x : b)
    if (x) return false;
  return true;
}

}  // namespace vg
