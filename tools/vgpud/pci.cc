#include "tools/vgpud/pci.h"

#include <cctype>
#include <charconv>
#include <fstream>
#include <set>
#include <system_error>

namespace vg::daemon {
namespace fs = std::filesystem;
namespace {

std::optional<uint32_t> ReadHex(const fs::path& p) {
  std::ifstream in(p);
  std::string s;
  if (!(in >> s)) return std::nullopt;
  if (s.rfind("0x", 0) == 0) s = s.substr(2);
  uint32_t v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v, 16);
  if (ec != std::errc() || end != s.data() + s.size()) return std::nullopt;
  return v;
}

// "0000:01:00.0": domain:bus:device.function, hex digits.
bool LooksLikePciAddress(const std::string& s) {
  if (s.size() != 12 || s[4] != ':' || s[7] != ':' || s[10] != '.') return false;
  for (size_t i = 0; i < s.size(); ++i) {
    if (i == 4 || i == 7 || i == 10) continue;
    if (!std::isxdigit(static_cast<unsigned char>(s[i]))) return false;
  }
  return true;
}

}  // namespace

std::optional<std::string> FindPciAddress(const engine::DeviceInfo& info, const fs::path& sysfs) {
  if (info.kind == engine::DeviceKind::kCpu || info.kind == engine::DeviceKind::kVirtual) return std::nullopt;
  std::set<std::string> matches;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(sysfs / "class/drm", ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("renderD", 0) != 0) continue;
    const fs::path dev = e.path() / "device";
    if (ReadHex(dev / "vendor") != info.vendor_id || ReadHex(dev / "device") != info.device_id) continue;
    std::error_code ec2;
    const std::string addr = fs::canonical(dev, ec2).filename().string();
    if (!ec2 && LooksLikePciAddress(addr)) matches.insert(addr);
  }
  if (matches.size() != 1) return std::nullopt;
  return *matches.begin();
}

}  // namespace vg::daemon
