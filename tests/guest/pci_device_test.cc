// The PCI backend of the guest driver (F14) without a VM: the memmap= window parsing, the
// sysfs discovery against a fake /sys/bus/pci/devices tree, and the whole backend (enable,
// bus master, BAR mmaps, register accesses, the RAM window at its GPA) against plain files
// standing in for `config`, `resource0`, `resource2` and /dev/mem, driven by guest::Driver.
#include <doctest.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "guest/driver.h"
#include "guest/pci_device.h"

using namespace vg;
using namespace vg::guest;
namespace fs = std::filesystem;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    char tmpl[] = "/tmp/vgpu-pci-test-XXXXXX";
    REQUIRE(::mkdtemp(tmpl) != nullptr);
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

void WriteText(const fs::path& p, const std::string& s) { std::ofstream(p) << s; }
std::string ReadText(const fs::path& p) {
  std::ifstream f(p);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// A file of `size` bytes (sparse), with `init` at offset 0.
void MakeFile(const fs::path& p, uint64_t size) {
  int fd = ::open(p.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
  REQUIRE(fd >= 0);
  REQUIRE(::ftruncate(fd, static_cast<off_t>(size)) == 0);
  ::close(fd);
}
template <class T>
void Poke(const fs::path& p, uint64_t off, T v) {
  int fd = ::open(p.c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  REQUIRE(::pwrite(fd, &v, sizeof v, static_cast<off_t>(off)) == sizeof v);
  ::close(fd);
}
template <class T>
T Peek(const fs::path& p, uint64_t off) {
  T v{};
  int fd = ::open(p.c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  REQUIRE(::pread(fd, &v, sizeof v, static_cast<off_t>(off)) == sizeof v);
  ::close(fd);
  return v;
}

void MakeFunction(const fs::path& devices, const std::string& bdf, const std::string& vendor,
                  const std::string& device) {
  fs::create_directories(devices / bdf);
  WriteText(devices / bdf / "vendor", vendor + "\n");
  WriteText(devices / bdf / "device", device + "\n");
}

// A fake sysfs tree with a host bridge, a NIC and the vGPU at 0000:00:04.0, whose BAR0 says
// it is a vGPU with 1024 GTT entries and whose RAM window "/dev/mem" holds [2 MiB, 3 MiB).
struct FakeVm {
  TempDir dir;
  fs::path devices = dir.path / "devices";
  fs::path fn = devices / "0000:00:04.0";
  fs::path mem = dir.path / "mem";
  static constexpr uint64_t kRamBase = 2 << 20, kRamSize = 1 << 20;
  FakeVm() {
    MakeFunction(devices, "0000:00:00.0", "0x8086", "0x1237");
    MakeFunction(devices, "0000:00:03.0", "0x1af4", "0x1000");
    MakeFunction(devices, "0000:00:04.0", "0x5647", "0x0001");
    WriteText(fn / "enable", "0\n");
    MakeFile(fn / "config", 256);
    Poke<uint16_t>(fn / "config", 0, abi::kVendorId);
    Poke<uint16_t>(fn / "config", 4, 0x0400);  // INTx disable, memory and bus master off
    MakeFile(fn / "resource0", abi::kBar0Size);
    Poke<uint32_t>(fn / "resource0", abi::reg::kId, abi::kIdMagic);
    Poke<uint32_t>(fn / "resource0", abi::reg::kGttEntries, 1024);
    Poke<uint32_t>(fn / "resource0", abi::kStatusPageOffset, abi::kIdMagic);
    Poke<uint64_t>(fn / "resource0", abi::kStatusPageOffset + abi::status::kCompletedFence, 41);
    MakeFile(fn / "resource2", 1 << 20);
    MakeFile(mem, kRamBase + kRamSize + (1 << 20));
  }
  PciDeviceOptions Options() const {
    PciDeviceOptions o;
    o.sysfs_devices = devices;
    o.mem_path = mem;
    o.ram = RamWindow{Gpa{kRamBase}, ByteSize{kRamSize}};
    return o;
  }
};

}  // namespace

TEST_CASE("memmap=SIZE$ADDR on the kernel command line is the RAM window") {
  auto w = ParseMemmap("console=ttyS0 memmap=64M$0x10000000 panic=-1");
  REQUIRE_MESSAGE(w.ok(), w.error().ToString());
  CHECK(w->base.v == 0x10000000);
  CHECK(w->size.v == 64ull << 20);

  w = ParseMemmap("memmap=1G$4G\n");
  REQUIRE(w.ok());
  CHECK(w->base.v == 4ull << 30);
  CHECK(w->size.v == 1ull << 30);

  // The last memmap=...$... wins, as for the kernel; other memmap forms are not ours.
  w = ParseMemmap("memmap=16M$0x8000000 memmap=32M@0x4000000 memmap=0x200000$0x20000000 quiet");
  REQUIRE(w.ok());
  CHECK(w->base.v == 0x20000000);
  CHECK(w->size.v == 0x200000);

  CHECK(ParseMemmap("console=ttyS0 panic=-1").error().code == Errc::kNotFound);
  CHECK(ParseMemmap("memmap=64M@0x10000000").error().code == Errc::kNotFound);
  CHECK(ParseMemmap("memmap=64M$0x10000001").error().code == Errc::kInvalidArgument);  // not page aligned
  CHECK(ParseMemmap("memmap=1000$0x10000000").error().code == Errc::kInvalidArgument);
  CHECK(ParseMemmap("memmap=0$0x10000000").error().code == Errc::kInvalidArgument);
  CHECK(ParseMemmap("memmap=64M$0xzz").error().code == Errc::kInvalidArgument);
  CHECK(ParseMemmap("memmap=64Q$0x1000").error().code == Errc::kInvalidArgument);
  CHECK(ParseMemmap("memmap=8G$0xfffffffe00000000").error().code == Errc::kInvalidArgument);  // wraps
  CHECK(ParseMemmap("memmap=99999999999999999999$0").error().code == Errc::kInvalidArgument);
  CHECK(ParseMemmap("memmap=64G$0xffffffffffffff000").error().code == Errc::kInvalidArgument);
}

TEST_CASE("the vGPU is found by vendor and device id in sysfs") {
  FakeVm vm;
  auto p = FindPciFunction(vm.devices, abi::kVendorId, abi::kDeviceId);
  REQUIRE_MESSAGE(p.ok(), p.error().ToString());
  CHECK(*p == vm.fn.string());
  CHECK(FindPciFunction(vm.devices, abi::kVendorId, 0x0002).error().code == Errc::kNotFound);
  CHECK(FindPciFunction(vm.dir.path / "nothing", abi::kVendorId, abi::kDeviceId).error().code == Errc::kNotFound);
  // A vendor file that does not parse is skipped, not trusted.
  MakeFunction(vm.devices, "0000:00:02.0", "5647", "0x0001");
  CHECK(*FindPciFunction(vm.devices, abi::kVendorId, abi::kDeviceId) == vm.fn.string());
}

TEST_CASE("PciDevice: enable, bus master, BAR mmaps, registers and the RAM window at its GPA") {
  FakeVm vm;
  auto d = PciDevice::Open(vm.Options());
  REQUIRE_MESSAGE(d.ok(), d.error().ToString());
  PciDevice& dev = **d;
  CHECK(ReadText(vm.fn / "enable").substr(0, 1) == "1");
  CHECK(Peek<uint16_t>(vm.fn / "config", 4) == 0x0406);  // memory space + bus master, INTx disable kept
  CHECK(dev.gtt_entries() == 1024);
  CHECK(dev.aperture().size() == 1 << 20);
  CHECK(dev.Status32(0) == abi::kIdMagic);
  CHECK(dev.Status64(abi::status::kCompletedFence) == 41);
  CHECK(dev.irq_eventfd(abi::kVectorFence) == nullptr);

  // Every trapped dword access counts, a 64-bit one as two; status page loads do not.
  const uint64_t accesses = dev.register_accesses();
  REQUIRE(dev.Write32(abi::reg::kScratch, 0x5151).ok());
  CHECK(Peek<uint32_t>(vm.fn / "resource0", abi::reg::kScratch) == 0x5151);
  REQUIRE(dev.Write64(abi::kGttOffset + 8 * 3, 0x1234'5678'9abc'd003ull).ok());
  CHECK(Peek<uint64_t>(vm.fn / "resource0", abi::kGttOffset + 8 * 3) == 0x1234'5678'9abc'd003ull);
  CHECK(dev.Read64(abi::kGttOffset + 8 * 3).value() == 0x1234'5678'9abc'd003ull);
  (void)dev.Status64(abi::status::kCompletedFence);
  CHECK(dev.register_accesses() == accesses + 5);
  CHECK(dev.Write32(abi::reg::kScratch + 2, 1).error().code == Errc::kMisaligned);
  CHECK(dev.Read32(static_cast<uint32_t>(abi::kBar0Size)).error().code == Errc::kOutOfBounds);
  CHECK(dev.Write64(static_cast<uint32_t>(abi::kBar0Size) - 4, 1).error().code == Errc::kOutOfBounds);
  CHECK(dev.register_accesses() == accesses + 5);  // refused accesses never reach the bus

  // The window: byte i of ram() is byte kRamBase + i of "/dev/mem".
  CHECK(dev.ram_base().v == FakeVm::kRamBase);
  REQUIRE(dev.ram().size() == FakeVm::kRamSize);
  std::memcpy(dev.ram().data() + 0x1230, "vgpu", 4);
  CHECK(Peek<uint32_t>(vm.mem, FakeVm::kRamBase + 0x1230) == 0x75706776);  // "vgpu"
}

TEST_CASE("guest::Driver programs the ring and the GTT through the PCI backend") {
  FakeVm vm;
  auto d = PciDevice::Open(vm.Options());
  REQUIRE_MESSAGE(d.ok(), d.error().ToString());
  auto drv = Driver::Create(**d);
  REQUIRE_MESSAGE(drv.ok(), drv.error().ToString());
  const fs::path bar0 = vm.fn / "resource0";
  CHECK(Peek<uint32_t>(bar0, abi::reg::kRingSize) == DriverOptions{}.ring_size);
  CHECK(Peek<uint32_t>(bar0, abi::reg::kCtrl) == abi::kCtrlRingEnable);
  CHECK(Peek<uint64_t>(bar0, abi::reg::kRingBaseLo) == (*drv)->ring().va.v);
  CHECK((*drv)->last_submitted() == 41);  // fences continue from the status page's

  auto b = (*drv)->Alloc(2 * kPageSize + 1);
  REQUIRE_MESSAGE(b.ok(), b.error().ToString());
  // Buffers come from the window and carry their guest-physical address.
  CHECK(b->gpa.v >= FakeVm::kRamBase);
  CHECK(b->gpa.v + 3 * kPageSize <= FakeVm::kRamBase + FakeVm::kRamSize);
  CHECK(b->host.data() == (**d).ram().data() + (b->gpa.v - FakeVm::kRamBase));
  for (uint64_t p = 0; p < 3; ++p) {
    uint64_t entry = Peek<uint64_t>(bar0, abi::kGttOffset + 8 * ((b->va.v >> kPageShift) + p));
    CHECK(entry == ((b->gpa.v + p * kPageSize) | abi::kGttValid | abi::kGttWritable));
  }
  // No interrupts: a wait polls the status page and times out cleanly.
  CHECK((*drv)->Wait(42, WaitMode::kIrq, 50).error().code == Errc::kTimeout);
  Poke<uint64_t>(bar0, abi::kStatusPageOffset + abi::status::kCompletedFence, 42);
  CHECK((*drv)->Wait(42, WaitMode::kIrq, 1000).ok());

  REQUIRE((*drv)->Free(*b).ok());
  // Free clears lazily (with the next GTT update): FlushFrees applies the clears now.
  CHECK(Peek<uint64_t>(bar0, abi::kGttOffset + 8 * (b->va.v >> kPageShift)) != 0);
  REQUIRE((*drv)->FlushFrees().ok());
  CHECK(Peek<uint64_t>(bar0, abi::kGttOffset + 8 * (b->va.v >> kPageShift)) == 0);
}

TEST_CASE("PciDevice refuses what is not a vGPU") {
  FakeVm vm;
  Poke<uint32_t>(vm.fn / "resource0", abi::reg::kId, 0xdeadbeef);
  CHECK(PciDevice::Open(vm.Options()).error().code == Errc::kUnsupported);
  Poke<uint32_t>(vm.fn / "resource0", abi::reg::kId, abi::kIdMagic);
  MakeFile(vm.fn / "resource0", 4096);  // a BAR0 too small for the GTT window
  CHECK(PciDevice::Open(vm.Options()).error().code == Errc::kUnsupported);
}
