// The mdev parent's name: the GPU's PCI address found through a (fake) sysfs DRM tree.
#include <doctest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "tools/vgpud/pci.h"

namespace fs = std::filesystem;
using vg::daemon::FindPciAddress;
using vg::engine::DeviceInfo;
using vg::engine::DeviceKind;

namespace {

struct FakeSys {
  fs::path root = fs::temp_directory_path() / ("vgpud-pci-" + std::to_string(getpid()));
  FakeSys() { fs::create_directories(root / "class/drm"); }
  ~FakeSys() {
    std::error_code ec;
    fs::remove_all(root, ec);
  }
  // renderD<n> -> ../../devices/pci0000:00/<addr>, as the kernel lays it out
  void Gpu(int n, const std::string& addr, const char* vendor, const char* device) {
    const fs::path dev = root / "devices/pci0000:00" / addr;
    fs::create_directories(dev);
    std::ofstream(dev / "vendor") << vendor << "\n";
    std::ofstream(dev / "device") << device << "\n";
    const fs::path node = root / "class/drm" / ("renderD" + std::to_string(n));
    fs::create_directories(node);
    fs::create_directory_symlink("../../../devices/pci0000:00/" + addr, node / "device");
  }
};

DeviceInfo Info(DeviceKind kind, uint32_t vendor, uint32_t device) {
  DeviceInfo i;
  i.kind = kind;
  i.vendor_id = vendor;
  i.device_id = device;
  return i;
}

}  // namespace

TEST_CASE("the render node matching the engine's vendor/device names the parent") {
  FakeSys s;
  s.Gpu(128, "0000:00:02.0", "0x8086", "0x46a6");
  s.Gpu(129, "0000:01:00.0", "0x10de", "0x2684");
  CHECK(FindPciAddress(Info(DeviceKind::kDiscrete, 0x10de, 0x2684), s.root) == "0000:01:00.0");
  CHECK(FindPciAddress(Info(DeviceKind::kIntegrated, 0x8086, 0x46a6), s.root) == "0000:00:02.0");
  // no match, a CPU device (lavapipe) or no sysfs: no address, the parent stays vgpud0
  CHECK(!FindPciAddress(Info(DeviceKind::kDiscrete, 0x1002, 0x744c), s.root));
  CHECK(!FindPciAddress(Info(DeviceKind::kCpu, 0x10de, 0x2684), s.root));
  CHECK(!FindPciAddress(Info(DeviceKind::kDiscrete, 0x10de, 0x2684), s.root / "nowhere"));
}

TEST_CASE("two GPUs of one model are ambiguous without VK_EXT_pci_bus_info") {
  FakeSys s;
  s.Gpu(128, "0000:01:00.0", "0x10de", "0x2684");
  s.Gpu(129, "0000:02:00.0", "0x10de", "0x2684");
  CHECK(!FindPciAddress(Info(DeviceKind::kDiscrete, 0x10de, 0x2684), s.root));
}
