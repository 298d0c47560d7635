#include "guest/pci_device.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>
#include <vector>

namespace vg::guest {

namespace {

// The kernel's memparse(): a C-style number (0x.. hex, 0.. octal, else decimal) and an
// optional K/M/G/T binary suffix. Returns what it consumed.
Result<uint64_t> MemParse(std::string_view& s) {
  VG_INVALID_IF(s.empty(), "empty number");
  int base = 10;
  size_t i = 0;
  if (s.size() > 1 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
    base = 16;
    i = 2;
  } else if (s[0] == '0') {
    base = 8;
  }
  uint64_t v = 0;
  size_t digits = 0;
  for (; i < s.size(); ++i, ++digits) {
    char c = s[i];
    int d;
    if (c >= '0' && c <= '9') d = c - '0';
    else if (base == 16 && c >= 'a' && c <= 'f') d = c - 'a' + 10;
    else if (base == 16 && c >= 'A' && c <= 'F') d = c - 'A' + 10;
    else break;
    VG_INVALID_IF(d >= base, "digit '{}' in base {}", c, base);
    VG_INVALID_IF(v > (UINT64_MAX - static_cast<uint64_t>(d)) / static_cast<uint64_t>(base), "number overflows");
    v = v * static_cast<uint64_t>(base) + static_cast<uint64_t>(d);
  }
  VG_INVALID_IF(digits == 0 && base != 8, "no digits in '{}'", s);
  unsigned shift = 0;
  if (i < s.size()) {
    switch (s[i]) {
      case 'K': case 'k': shift = 10; break;
      case 'M': case 'm': shift = 20; break;
      case 'G': case 'g': shift = 30; break;
      case 'T': case 't': shift = 40; break;
      default: break;
    }
    if (shift) ++i;
  }
  VG_INVALID_IF(shift && (v >> (64 - shift)) != 0, "number overflows");
  s.remove_prefix(i);
  return v << shift;
}

Result<std::string> ReadSmallFile(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  VG_ERROR_IF(!fd.Valid(), Errc::kIo, "open {}: {}", path, std::strerror(errno));
  char buf[256];
  ssize_t n = ::read(fd.Get(), buf, sizeof buf);
  VG_ERROR_IF(n < 0, Errc::kIo, "read {}: {}", path, std::strerror(errno));
  return std::string(buf, static_cast<size_t>(n));
}

// sysfs prints ids as "0x5647\n".
bool IdMatches(const std::string& path, uint16_t want) {
  auto s = ReadSmallFile(path);
  if (!s.ok()) return false;
  std::string_view v(*s);
  while (!v.empty() && (v.back() == '\n' || v.back() == ' ')) v.remove_suffix(1);
  if (v.size() < 3 || v.substr(0, 2) != "0x") return false;
  auto n = MemParse(v);
  return n.ok() && v.empty() && *n == want;
}

Result<UniqueFd> OpenRw(const std::string& path, int extra = 0) {
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC | extra));
  VG_ERROR_IF(!fd.Valid(), Errc::kIo, "open {}: {}", path, std::strerror(errno));
  return fd;
}

Result<uint64_t> FileSize(const UniqueFd& fd, const std::string& path) {
  struct stat st {};
  VG_ERROR_IF(::fstat(fd.Get(), &st) != 0, Errc::kIo, "stat {}: {}", path, std::strerror(errno));
  return static_cast<uint64_t>(st.st_size);
}

}  // namespace

Result<RamWindow> ParseMemmap(std::string_view cmdline) {
  std::optional<RamWindow> found;
  while (!cmdline.empty()) {
    size_t sp = cmdline.find_first_of(" \t\n");
    std::string_view tok = cmdline.substr(0, sp);
    cmdline.remove_prefix(sp == std::string_view::npos ? cmdline.size() : sp + 1);
    constexpr std::string_view kKey = "memmap=";
    if (tok.substr(0, kKey.size()) != kKey) continue;
    tok.remove_prefix(kKey.size());
    size_t dollar = tok.find('$');
    if (dollar == std::string_view::npos) continue;  // memmap=nn@ss, nn#ss, exactmap: not ours
    std::string_view size_s = tok.substr(0, dollar), addr_s = tok.substr(dollar + 1);
    VG_TRY_ASSIGN(uint64_t size, MemParse(size_s));
    VG_INVALID_IF(!size_s.empty(), "memmap size has trailing '{}'", size_s);
    VG_TRY_ASSIGN(uint64_t addr, MemParse(addr_s));
    VG_INVALID_IF(!addr_s.empty(), "memmap address has trailing '{}'", addr_s);
    VG_INVALID_IF(size == 0 || !IsAligned(size, kPageSize) || !IsAligned(addr, kPageSize),
                  "memmap={:#x}${:#x} is not page aligned", size, addr);
    VG_INVALID_IF(addr + size < addr, "memmap={:#x}${:#x} wraps", size, addr);
    found = RamWindow{Gpa{addr}, ByteSize{size}};
  }
  VG_ERROR_IF(!found, Errc::kNotFound, "no memmap=SIZE$ADDR on the command line");
  return *found;
}

Result<std::string> FindPciFunction(const std::string& sysfs_devices, uint16_t vendor, uint16_t device) {
  DIR* dir = ::opendir(sysfs_devices.c_str());
  VG_ERROR_IF(!dir, Errc::kNotFound, "opendir {}: {}", sysfs_devices, std::strerror(errno));
  std::vector<std::string> names;
  while (dirent* e = ::readdir(dir)) {
    if (e->d_name[0] != '.') names.emplace_back(e->d_name);
  }
  ::closedir(dir);
  std::sort(names.begin(), names.end());  // the same function first on every boot
  for (const std::string& n : names) {
    std::string p = sysfs_devices + "/" + n;
    if (IdMatches(p + "/vendor", vendor) && IdMatches(p + "/device", device)) return p;
  }
  return MakeError(Errc::kNotFound, "no PCI function {:04x}:{:04x} under {}", vendor, device, sysfs_devices);
}

Result<std::unique_ptr<PciDevice>> PciDevice::Open(const PciDeviceOptions& opts) {
  std::unique_ptr<PciDevice> d(new PciDevice());
  d->opts_ = opts;
  VG_TRY(d->Init());
  return d;
}

Result<> PciDevice::Init() {
  VG_TRY_ASSIGN(path_, FindPciFunction(opts_.sysfs_devices, opts_.vendor, opts_.device));

  // Enable the function (the kernel assigns and turns on its memory decoding), then let it
  // master the bus: without Bus Master the device may not DMA into guest RAM.
  {
    VG_TRY_ASSIGN(UniqueFd en, OpenRw(path_ + "/enable"));
    VG_ERROR_IF(::pwrite(en.Get(), "1", 1, 0) != 1, Errc::kIo, "enable {}: {}", path_, std::strerror(errno));
  }
  VG_TRY_ASSIGN(config_fd_, OpenRw(path_ + "/config"));
  VG_TRY_ASSIGN(uint16_t cmd, ConfigRead16(0x04));
  constexpr uint16_t kMemorySpace = 0x2, kBusMaster = 0x4;
  VG_TRY(ConfigWrite16(0x04, static_cast<uint16_t>(cmd | kMemorySpace | kBusMaster)));

  // O_SYNC: the kernel maps the BARs uncached (it does so for resourceN anyway).
  std::string r0 = path_ + "/resource0";
  VG_TRY_ASSIGN(bar0_fd_, OpenRw(r0, O_SYNC));
  VG_TRY_ASSIGN(uint64_t bar0_size, FileSize(bar0_fd_, r0));
  VG_ERROR_IF(bar0_size < abi::kBar0Size, Errc::kUnsupported, "BAR0 is {:#x} bytes, want {:#x}", bar0_size,
              abi::kBar0Size);
  VG_TRY_ASSIGN(bar0_map_, Mapping::Map(bar0_fd_, ByteSize{abi::kBar0Size}, 0));

  std::string r2 = path_ + "/resource2";
  VG_TRY_ASSIGN(aperture_fd_, OpenRw(r2, O_SYNC));
  VG_TRY_ASSIGN(uint64_t ap_size, FileSize(aperture_fd_, r2));
  VG_ERROR_IF(ap_size == 0, Errc::kUnsupported, "BAR2 (aperture) is empty");
  VG_TRY_ASSIGN(aperture_map_, Mapping::Map(aperture_fd_, ByteSize{ap_size}, 0));

  if (opts_.ram.size.v != 0) {
    // The window is the guest-physical range itself, so its offset in /dev/mem is its GPA.
    VG_TRY_ASSIGN(ram_fd_, OpenRw(opts_.mem_path));
    VG_TRY_ASSIGN(ram_map_, Mapping::Map(ram_fd_, opts_.ram.size, opts_.ram.base.v));
  }

  VG_TRY_ASSIGN(uint32_t id, Read32(abi::reg::kId));
  VG_ERROR_IF(id != abi::kIdMagic, Errc::kUnsupported, "{}: device ID {:#x} is not a vgpud vGPU", path_, id);
  VG_TRY_ASSIGN(gtt_entries_, Read32(abi::reg::kGttEntries));
  VG_ERROR_IF(gtt_entries_ > abi::kGttMaxEntries, Errc::kUnsupported, "GTT_ENTRIES {} over the ABI's {}",
              gtt_entries_, abi::kGttMaxEntries);
  return Ok();
}

Result<> PciDevice::CheckRegister(uint32_t off, uint32_t width) const {
  VG_ERROR_IF(!IsAligned(off, 4), Errc::kMisaligned, "register {:#x} not dword aligned", off);
  VG_ERROR_IF(!RangeWithin(off, width, bar0_map_.size().v), Errc::kOutOfBounds, "register {:#x} outside BAR0", off);
  return Ok();
}

// Every access is one volatile dword load or store: the compiler may neither merge, split
// nor drop it, and each one is a trapped MMIO access the VMM forwards to the daemon.
Result<uint32_t> PciDevice::Read32(uint32_t off) {
  VG_TRY(CheckRegister(off, 4));
  ++register_accesses_;
  return *reinterpret_cast<const volatile uint32_t*>(bar0_map_.data() + off);
}
Result<uint64_t> PciDevice::Read64(uint32_t off) {
  VG_TRY_ASSIGN(uint32_t lo, Read32(off));
  VG_TRY_ASSIGN(uint32_t hi, Read32(off + 4));
  return uint64_t{lo} | uint64_t{hi} << 32;
}
Result<> PciDevice::Write32(uint32_t off, uint32_t v, bool /*posted*/) {
  VG_TRY(CheckRegister(off, 4));
  // What the driver wrote to guest RAM (ring, tail shadow, buffers) is visible before the
  // doorbell or GTT write that tells the device to look at it.
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  ++register_accesses_;
  *reinterpret_cast<volatile uint32_t*>(bar0_map_.data() + off) = v;
  return Ok();
}
Result<> PciDevice::Write64(uint32_t off, uint64_t v, bool posted) {
  VG_TRY(CheckRegister(off, 8));
  VG_TRY(Write32(off, static_cast<uint32_t>(v), posted));
  return Write32(off + 4, static_cast<uint32_t>(v >> 32), posted);
}

uint32_t PciDevice::Status32(uint32_t off) const {
  return *reinterpret_cast<const volatile uint32_t*>(bar0_map_.data() + abi::kStatusPageOffset + off);
}
uint64_t PciDevice::Status64(uint32_t off) const {
  // The device writes the u64 whole; one 8-byte load of an aligned u64 is atomic on x86-64.
  return *reinterpret_cast<const volatile uint64_t*>(bar0_map_.data() + abi::kStatusPageOffset + off);
}

Result<uint16_t> PciDevice::ConfigRead16(uint32_t off) const {
  uint16_t v = 0;
  VG_ERROR_IF(::pread(config_fd_.Get(), &v, 2, off) != 2, Errc::kIo, "config read at {:#x}: {}", off,
              std::strerror(errno));
  return v;
}
Result<> PciDevice::ConfigWrite16(uint32_t off, uint16_t v) const {
  VG_ERROR_IF(::pwrite(config_fd_.Get(), &v, 2, off) != 2, Errc::kIo, "config write at {:#x}: {}", off,
              std::strerror(errno));
  return Ok();
}

}  // namespace vg::guest
