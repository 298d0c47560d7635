// F14: a real QEMU attaches. QEMU's vfio-user-pci client (QEMU >= 10.1, VGPUD_QEMU) attaches
// to the real vgpud with the options `vgpuctl qemu-args` prints, used verbatim, under the
// qtest accelerator: no guest kernel and no firmware run; this test is the guest. It
// enumerates PCI through 0xCF8/0xCFC, sizes and places the BARs, and drives the vGPU through
// QEMU's memory map: trapped registers (REGION_READ/WRITE), the status page and the aperture
// (sparse-mmap areas QEMU maps into the guest), the GTT, a ring in guest RAM (the memfd
// QEMU shares with DMA_MAP), the doorbell, a fence, a refused command, MSI-X interrupts
// (SET_IRQS eventfds, seen as MSI-X DMA writes into guest RAM), reset, and a second
// QEMU after the first exits.
//
// Skipped (77) unless VGPUD_QEMU is set (./run.sh vm sets it). VGPUD_QEMU_FIRMWARE: -L dir.
// VGPUD_VM_TRACE=1 logs QEMU's vfio_user* and vfio_region* trace events to qemu-trace.log;
// VGPUD_VM_KEEP=1 keeps the temp dir (vgpud log, QEMU stderr and trace) after a pass.

#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest.h>

#include <array>
#include <cstdio>
#include <cstdlib>

#include "base/base.h"
#include "guest/driver.h"
#include "abi/device.h"
#include "tests/mdev/daemon_harness.h"
#include "tests/vm/qtest.h"

namespace {

using namespace vg;
using vg::mgmt::DaemonProc;
using vg::vm::PciConfig;
using vg::vm::QemuQtest;
namespace fs = std::filesystem;
namespace reg = vg::abi::reg;
namespace status = vg::abi::status;

constexpr const char* kUuid = "f1400000-0000-4000-8000-00000000f14a";
constexpr const char* kGuestRam = "256M";  // vgpuctl qemu-args --memory

// Where this test places things. The BARs go into q35's 32-bit PCI hole (RAM ends at
// 256 MiB, MMCONFIG is 0xB0000000-0xBFFFFFFF, the APIC/HPET/BIOS from 0xFEC00000).
constexpr uint64_t kBar0Gpa = 0xC0000000;
constexpr uint64_t kBar2Gpa = 0xD0000000;
constexpr uint64_t kRingGpa = 0x00100000;   // guest RAM: the ring (one page)
constexpr uint64_t kFenceGpa = 0x00101000;  // guest RAM: the fence target page
constexpr uint32_t kRingSize = 4096;
// GTT: GPU page 16 -> ring page (read-only), 17 -> fence page (writable), 18 -> aperture page 0.
constexpr uint32_t kRingGttIndex = 16;
constexpr uint32_t kFenceGttIndex = 17;
constexpr uint32_t kApertureGttIndex = 18;
constexpr GpuVa VaOf(uint32_t gtt_index) { return GpuVa{uint64_t{gtt_index} << 12}; }

// PCI config space (type-0 header) offsets and bits this test uses.
namespace pci {
constexpr uint8_t kVendorDevice = 0x00, kCommand = 0x04, kStatus = 0x06, kRevisionClass = 0x08,
                  kHeaderType = 0x0E, kBar0 = 0x10, kBar1 = 0x14, kBar2 = 0x18, kBar3 = 0x1C, kBar4 = 0x20,
                  kBar5 = 0x24, kSubsystem = 0x2C, kCapPtr = 0x34, kInterruptPin = 0x3D;
constexpr uint16_t kCmdMemory = 1u << 1, kCmdBusMaster = 1u << 2;
constexpr uint16_t kStatusCapList = 1u << 4;
constexpr uint8_t kCapIdPm = 0x01, kCapIdMsi = 0x05, kCapIdMsix = 0x11, kCapIdAf = 0x13;
constexpr uint32_t kBarMem64 = 0x4, kBarPrefetch = 0x8;
}  // namespace pci

std::string Env(const char* n) {
  const char* v = std::getenv(n);
  return v ? v : "";
}

// Everything a failed check needs to explain itself: both sides' logs.
std::string Diag(const DaemonProc& d, const QemuQtest& q) {
  std::string err = q.Stderr();  // includes QEMU's qtest log: keep the end
  if (err.size() > 8000) err = "...\n" + err.substr(err.size() - 8000);
  std::string s = "--- qemu: " + q.CommandLine() + "\n--- qemu stderr:\n" + err;
  std::string log = d.Log();
  if (log.size() > 6000) log = "...\n" + log.substr(log.size() - 6000);
  return s + "\n--- vgpud log (tail):\n" + log + "\n--- last qtest error: " + q.last_error();
}

// The QEMU command line: the test's own options, then `vgpuctl qemu-args` word for word.
std::vector<std::string> QemuArgv(const DaemonProc& d, const fs::path& dir) {
  vg::mgmt::Ran r = d.Ctl({"qemu-args", kUuid, "--memory", kGuestRam});
  REQUIRE_MESSAGE(r.code == 0, r.err);
  auto words = vg::vm::ShellSplit(r.out);
  REQUIRE_MESSAGE(words.has_value(), "vgpuctl qemu-args printed unbalanced quotes: " << r.out);
  std::vector<std::string> argv{Env("VGPUD_QEMU"), "-machine", "q35", "-accel", "qtest", "-display", "none",
                                "-nodefaults", "-no-user-config"};
  if (!Env("VGPUD_QEMU_FIRMWARE").empty()) {
    argv.push_back("-L");
    argv.push_back(Env("VGPUD_QEMU_FIRMWARE"));
  }
  if (Env("VGPUD_VM_TRACE") == "1") {
    argv.push_back("-trace");
    argv.push_back("vfio_user*");
    argv.push_back("-trace");
    argv.push_back("vfio_region*");
    argv.push_back("-D");
    argv.push_back((dir / "qemu-trace.log").string());
  }
  argv.insert(argv.end(), words->begin(), words->end());
  return argv;
}

// The vGPU as the test (the "guest") sees it once it enumerated and placed the BARs.
struct Placed {
  uint8_t devfn = 0;
  uint64_t bar0_size = 0;
  uint64_t bar2_size = 0;
};

// Enumerate bus 0, size BAR0 and BAR2/3, place them, enable memory decoding and bus master.
Placed EnumerateAndPlace(QemuQtest& q, const DaemonProc& d) {
  auto devfn = PciConfig::Find(q, abi::kVendorId, abi::kDeviceId);
  REQUIRE_MESSAGE(devfn.has_value(), "no vGPU on bus 0\n" << Diag(d, q));
  PciConfig cfg(q, *devfn);
  Placed p;
  p.devfn = *devfn;

  cfg.Write16(pci::kCommand, 0);  // decoding off while sizing
  cfg.Write32(pci::kBar0, 0xFFFFFFFF);
  const uint32_t bar0 = cfg.Read32(pci::kBar0);
  CHECK((bar0 & 0xF) == 0);  // 32-bit memory, non-prefetchable
  p.bar0_size = (uint64_t{~(bar0 & ~0xFu)} + 1) & 0xFFFFFFFFull;
  cfg.Write32(pci::kBar2, 0xFFFFFFFF);
  cfg.Write32(pci::kBar3, 0xFFFFFFFF);
  const uint32_t bar2 = cfg.Read32(pci::kBar2);
  const uint32_t bar3 = cfg.Read32(pci::kBar3);
  CHECK((bar2 & 0xF) == (pci::kBarMem64 | pci::kBarPrefetch));
  p.bar2_size = ~(uint64_t{bar3} << 32 | (bar2 & ~0xFull)) + 1;
  for (uint8_t unimplemented : {pci::kBar1, pci::kBar4, pci::kBar5}) {
    cfg.Write32(unimplemented, 0xFFFFFFFF);
    CHECK_MESSAGE(cfg.Read32(unimplemented) == 0, "BAR at config offset " << int{unimplemented});
  }

  cfg.Write32(pci::kBar0, static_cast<uint32_t>(kBar0Gpa));
  cfg.Write32(pci::kBar2, static_cast<uint32_t>(kBar2Gpa));
  cfg.Write32(pci::kBar3, static_cast<uint32_t>(kBar2Gpa >> 32));
  cfg.Write16(pci::kCommand, pci::kCmdMemory | pci::kCmdBusMaster);
  CHECK(cfg.Read32(pci::kBar0) == kBar0Gpa);
  CHECK((cfg.Read16(pci::kCommand) & (pci::kCmdMemory | pci::kCmdBusMaster)) == (pci::kCmdMemory | pci::kCmdBusMaster));
  REQUIRE_MESSAGE(q.Readl(kBar0Gpa + reg::kId) == abi::kIdMagic, "BAR0 does not answer\n" << Diag(d, q));
  return p;
}

void WriteGtt(QemuQtest& q, uint32_t index, uint64_t entry) {
  REQUIRE(q.Writeq(kBar0Gpa + abi::kGttOffset + uint64_t{index} * 8, entry));
}

// Copies `cb` into the ring in guest RAM at byte offset `at` and returns the new tail.
uint32_t PutInRing(QemuQtest& q, uint32_t at, const guest::CommandBuilder& cb) {
  auto dw = cb.dwords();
  REQUIRE(at + cb.size_bytes() <= kRingSize);
  REQUIRE(q.WriteBytes(kRingGpa + at, std::as_bytes(dw)));
  return static_cast<uint32_t>(at + cb.size_bytes());
}

bool WaitFor(const std::function<bool()>& cond, int timeout_ms = 20000) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (std::chrono::steady_clock::now() < deadline) {
    if (cond()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return cond();
}

// GTT for the ring and fence page, ring enabled; returns nothing, checks as it goes.
void SetUpRing(QemuQtest& q) {
  const uint64_t b = kBar0Gpa;
  WriteGtt(q, kRingGttIndex, kRingGpa | abi::kGttValid);
  // the fence page's entry as two dword writes, low half latched, high half commits
  const uint64_t fence_entry = kFenceGpa | abi::kGttValid | abi::kGttWritable;
  REQUIRE(q.Writel(b + abi::kGttOffset + kFenceGttIndex * 8, static_cast<uint32_t>(fence_entry)));
  REQUIRE(q.Writel(b + abi::kGttOffset + kFenceGttIndex * 8 + 4, static_cast<uint32_t>(fence_entry >> 32)));
  CHECK(q.Readq(b + abi::kGttOffset + kRingGttIndex * 8) == (kRingGpa | abi::kGttValid));
  CHECK(q.Readq(b + abi::kGttOffset + kFenceGttIndex * 8) == fence_entry);

  REQUIRE(q.Memset(kRingGpa, kRingSize, 0));
  REQUIRE(q.Memset(kFenceGpa, 4096, 0));
  REQUIRE(q.Writel(b + reg::kCtrl, 0));
  REQUIRE(q.Writeq(b + reg::kRingBaseLo, VaOf(kRingGttIndex).v));
  REQUIRE(q.Writel(b + reg::kRingSize, kRingSize));
  REQUIRE(q.Writel(b + reg::kCtrl, abi::kCtrlRingEnable));
  CHECK((q.Readl(b + reg::kStatus) & abi::kStatusRingEnabled) != 0);
  CHECK(q.Readl(b + reg::kRingHead) == 0);
}

// One fenced submission through the trapped doorbell; returns the new tail.
uint32_t SubmitAndWait(QemuQtest& q, const DaemonProc& d, uint32_t tail, guest::CommandBuilder cb, uint64_t fence) {
  cb.Fence(VaOf(kFenceGttIndex), fence, /*irq=*/false);
  const uint32_t new_tail = PutInRing(q, tail, cb);
  REQUIRE(q.Writel(kBar0Gpa + reg::kRingTail, new_tail));
  const bool done = WaitFor([&] { return q.Readq(kFenceGpa) == fence; });
  CHECK_MESSAGE(done, "fence " << fence << " not written to guest RAM\n" << Diag(d, q));
  // The executor writes the fence into guest RAM first and the status page just after
  // (mediator/executor.cc): a read between the two sees the old value, so wait for it.
  CHECK(WaitFor([&] { return q.Readq(kBar0Gpa + abi::kStatusPageOffset + status::kCompletedFence) == fence; }));
  CHECK(q.Readl(kBar0Gpa + reg::kRingHead) == new_tail);
  CHECK(q.Readl(kBar0Gpa + abi::kStatusPageOffset + status::kRingHead) == new_tail);
  return new_tail;
}

struct Fixture {
  fs::path dir;
  DaemonProc d;
  Fixture() : dir(MakeDir()), d(dir / "daemon") {
    REQUIRE(d.Start());
    vg::mgmt::Ran r = d.Ctl({"start", "-t", "small", "-u", kUuid});
    REQUIRE_MESSAGE(r.code == 0, r.err);
  }
  static fs::path MakeDir() {
    static int n = 0;
    fs::path p = fs::temp_directory_path() / ("vgpud-vm-" + std::to_string(getpid()) + "-" + std::to_string(n++));
    fs::create_directories(p);
    return p;
  }
  ~Fixture() {
    if (keep || Env("VGPUD_VM_KEEP") == "1") {
      d.KeepDir(true);
      std::fprintf(stderr, "logs kept in %s\n", dir.c_str());
    } else {
      std::error_code ec;
      fs::remove_all(dir, ec);
    }
  }
  // Starts one QEMU in <dir>/<name>; REQUIREs that it attached.
  std::unique_ptr<QemuQtest> Qemu(const std::string& name) {
    fs::create_directories(dir / name);
    auto q = std::make_unique<QemuQtest>(dir / name);
    const bool up = q->Start(QemuArgv(d, dir / name));
    if (!up) keep = true;
    REQUIRE_MESSAGE(up, "QEMU did not attach\n" << Diag(d, *q));
    return q;
  }
  bool keep = false;
};

}  // namespace

TEST_CASE("QEMU vfio-user-pci attaches under qtest: config space, BARs, registers, mmaps, GTT, ring, refusal, MSI-X, reset") {
  Fixture f;
  auto q1 = f.Qemu("qemu1");
  QemuQtest& q = *q1;
  const Placed p = EnumerateAndPlace(q, f.d);
  PciConfig cfg(q, p.devfn);
  const uint64_t b0 = kBar0Gpa;

  // Config space identity and the capability list
  CHECK(cfg.Read32(pci::kVendorDevice) == (uint32_t{abi::kDeviceId} << 16 | abi::kVendorId));
  CHECK(cfg.Read32(pci::kRevisionClass) == (abi::kClassCode << 8 | abi::kRevision));
  CHECK(cfg.Read32(pci::kSubsystem) == (uint32_t{abi::kSubsystemId} << 16 | abi::kSubsystemVendorId));
  CHECK((cfg.Read8(pci::kHeaderType) & 0x7F) == 0);
  CHECK(cfg.Read8(pci::kInterruptPin) == 0);
  CHECK((cfg.Read16(pci::kStatus) & pci::kStatusCapList) != 0);
  CHECK(cfg.Read8(pci::kCapPtr) == abi::kCapPmOffset);
  std::vector<std::pair<uint8_t, uint8_t>> caps;  // (offset, id)
  for (uint8_t off = cfg.Read8(pci::kCapPtr); off != 0 && caps.size() < 16; off = cfg.Read8(off + 1))
    caps.emplace_back(off, cfg.Read8(off));
  const std::vector<std::pair<uint8_t, uint8_t>> want{
      {abi::kCapPmOffset, pci::kCapIdPm}, {abi::kCapMsiOffset, pci::kCapIdMsi}, {abi::kCapMsixOffset, pci::kCapIdMsix},
      {abi::kCapAfOffset, pci::kCapIdAf}};  // PCI Advanced Features: FLR (F8)
  CHECK(caps == want);
  // MSI-X: 2 vectors, table and PBA in BAR0 at the ABI's offsets
  CHECK((cfg.Read16(abi::kCapMsixOffset + 2) & 0x7FF) + 1 == abi::kNumVectors);
  CHECK(cfg.Read32(abi::kCapMsixOffset + 4) == (abi::kMsixTableOffset | 0));
  CHECK(cfg.Read32(abi::kCapMsixOffset + 8) == (abi::kMsixPbaOffset | 0));

  // BAR sizes: BAR0 is the ABI's, BAR2 is the aperture the registers report
  CHECK(p.bar0_size == abi::kBar0Size);
  const uint64_t aperture = uint64_t{q.Readl(b0 + reg::kApertureSizeHi)} << 32 | q.Readl(b0 + reg::kApertureSizeLo);
  CHECK(p.bar2_size == aperture);
  CHECK(aperture == 64ull << 20);  // vgpud-small

  // BAR0 registers through MMIO (trapped REGION_READ/WRITE)
  CHECK(q.Readl(b0 + reg::kId) == abi::kIdMagic);
  CHECK(q.Readl(b0 + reg::kVersion) == abi::kAbiVersion);
  const uint32_t caps_reg = q.Readl(b0 + reg::kCaps);
  CHECK((caps_reg & (abi::kCapStatusPage | abi::kCapRing | abi::kCapMsix)) ==
        (abi::kCapStatusPage | abi::kCapRing | abi::kCapMsix));
  CHECK(q.Readl(b0 + reg::kGttEntries) == 16384);
  REQUIRE(q.Writel(b0 + reg::kScratch, 0x1234ABCD));
  CHECK(q.Readl(b0 + reg::kScratch) == 0x1234ABCD);
  CHECK(q.Readq(b0 + reg::kRingBaseLo) == 0);  // an 8-byte access at a dword-aligned offset

  // The status page: a sparse-mmap area QEMU maps straight into the guest
  const uint64_t sp = b0 + abi::kStatusPageOffset;
  CHECK(q.Readl(sp + status::kMagic) == abi::kIdMagic);
  CHECK(q.Readl(sp + status::kScratch) == 0x1234ABCD);  // the SCRATCH mirror
  const uint32_t resets_before = q.Readl(sp + status::kResets);

  // The aperture (BAR2): one mmap area; zero when created, guest writes read back
  CHECK(q.Readq(kBar2Gpa) == 0);
  CHECK(q.Readq(kBar2Gpa + aperture - 8) == 0);
  REQUIRE(q.Writeq(kBar2Gpa + 0x2000, 0x0123456789ABCDEFull));
  CHECK(q.Readq(kBar2Gpa + 0x2000) == 0x0123456789ABCDEFull);
  CHECK(q.Readl(kBar2Gpa + 0x2004) == 0x01234567u);

  // GTT through MMIO, a ring in guest RAM, the doorbell, the fence in guest RAM
  SetUpRing(q);
  WriteGtt(q, kApertureGttIndex, 0 | abi::kGttValid | abi::kGttWritable | abi::kGttAperture);
  guest::CommandBuilder fill;
  fill.Fill(VaOf(kApertureGttIndex), 4096, 0xA5A5A5A5);
  uint32_t tail = SubmitAndWait(q, f.d, 0, fill, 1);
  // the engine's FILL is visible through the guest's direct mapping of the aperture
  CHECK(q.Readl(kBar2Gpa) == 0xA5A5A5A5);
  CHECK(q.Readl(kBar2Gpa + 4092) == 0xA5A5A5A5);
  CHECK(q.Readl(kBar2Gpa + 4096) == 0);
  CHECK(q.Readq(sp + status::kSubmissions) >= 1);
  CHECK(q.Readq(sp + status::kDoorbells) >= 1);

  // A refused command: an opcode not in the table; ERR_CODE names it, the ring moves on
  const uint32_t err_count = q.Readl(b0 + reg::kErrCount);
  guest::CommandBuilder bad;
  const std::array<uint32_t, 1> unknown{abi::cmd::Header(0x7F, 1)};
  bad.Raw(unknown);
  const uint32_t bad_at = tail;
  tail = PutInRing(q, tail, bad);
  q.Writel(b0 + reg::kRingTail, tail);  // the refusal may also come back as a write error
  CHECK(WaitFor([&] { return q.Readl(b0 + reg::kErrCode) != 0; }));
  CHECK(q.Readl(b0 + reg::kErrCode) == static_cast<uint32_t>(Errc::kUnknownCommand));
  CHECK(q.Readl(b0 + reg::kErrSource) == abi::kErrSourceCommand);
  CHECK(q.Readl(b0 + reg::kErrAddrLo) == bad_at);
  CHECK(q.Readl(b0 + reg::kErrInfo) == 0x7F);
  CHECK(q.Readl(b0 + reg::kErrCount) == err_count + 1);
  CHECK((q.Readl(b0 + reg::kStatus) & abi::kStatusErrorLatched) != 0);
  CHECK(q.Readl(b0 + reg::kRingHead) == tail);
  CHECK(q.Readl(sp + status::kErrCount) == err_count + 1);
  // a refused privileged register, named too
  q.Writel(b0 + abi::priv::kGlobalReset, 1);
  CHECK(q.Readl(b0 + reg::kErrCode) == static_cast<uint32_t>(Errc::kPrivileged));
  CHECK(q.Readl(b0 + reg::kErrSource) == abi::kErrSourceMmio);
  REQUIRE(q.Writel(b0 + reg::kErrClear, 1));
  CHECK(q.Readl(b0 + reg::kErrCode) == 0);
  // and a good submission right after works
  tail = SubmitAndWait(q, f.d, tail, guest::CommandBuilder{}.Nop(2), 2);

  // MSI-X: enabling it and unmasking the entries makes QEMU wire the vectors with SET_IRQS
  // (eventfds). An MSI-X message is a DMA write of `data` to `address`; with the address in
  // guest RAM instead of the APIC's window the test sees each interrupt QEMU delivers.
  {
    constexpr uint64_t kMsiGpa = 0x00102000;
    constexpr uint32_t kMsiData = 0xF1400000;
    const uint64_t table = b0 + abi::kMsixTableOffset;
    REQUIRE(q.Memset(kMsiGpa, 4096, 0));
    const uint16_t msix_ctrl = cfg.Read16(abi::kCapMsixOffset + 2);
    cfg.Write16(abi::kCapMsixOffset + 2, static_cast<uint16_t>(msix_ctrl | 0x8000));  // MSI-X enable
    for (uint32_t v = 0; v < abi::kNumVectors; ++v) {
      REQUIRE(q.Writel(table + v * 16 + 0, static_cast<uint32_t>(kMsiGpa + v * 4)));  // address lo
      REQUIRE(q.Writel(table + v * 16 + 4, 0));                                     // address hi
      REQUIRE(q.Writel(table + v * 16 + 8, kMsiData | v));                          // data
      REQUIRE(q.Writel(table + v * 16 + 12, 0));                                    // unmask
    }
    CHECK((cfg.Read16(abi::kCapMsixOffset + 2) & 0x8000) != 0);
    REQUIRE(q.Writel(b0 + reg::kIrqStatus, 0xFFFFFFFF));  // RW1C: start clean
    REQUIRE(q.Writel(b0 + reg::kIrqTest, abi::kVectorFence));
    CHECK_MESSAGE(WaitFor([&] { return q.Readl(kMsiGpa) == (kMsiData | abi::kVectorFence); }),
                  "IRQ_TEST: the fence vector's MSI-X message did not arrive\n" << Diag(f.d, q));
    // a refusal raises the error vector
    q.Writel(b0 + abi::priv::kGlobalReset, 1);
    CHECK_MESSAGE(WaitFor([&] { return q.Readl(kMsiGpa + 4) == (kMsiData | abi::kVectorError); }),
                  "refusal: the error vector's MSI-X message did not arrive\n" << Diag(f.d, q));
    REQUIRE(q.Writel(b0 + reg::kErrClear, 1));
    // a FENCE with its IRQ flag raises the fence vector once the fence is written
    REQUIRE(q.Writel(kMsiGpa, 0));
    guest::CommandBuilder irq_fence;
    irq_fence.Fence(VaOf(kFenceGttIndex), 3, /*irq=*/true);
    tail = PutInRing(q, tail, irq_fence);
    REQUIRE(q.Writel(b0 + reg::kRingTail, tail));
    CHECK(WaitFor([&] { return q.Readq(kFenceGpa) == 3; }));
    CHECK_MESSAGE(WaitFor([&] { return q.Readl(kMsiGpa) == (kMsiData | abi::kVectorFence); }),
                  "FENCE irq: the fence vector's MSI-X message did not arrive\n" << Diag(f.d, q));
  }

  // Reset (the RESET register) scrubs the aperture, clears the GTT and the registers
  REQUIRE(q.Writel(b0 + reg::kReset, abi::kResetMagic));
  CHECK(q.Readl(sp + status::kResets) == resets_before + 1);
  CHECK(q.Readl(kBar2Gpa) == 0);                 // the FILL is gone ...
  CHECK(q.Readq(kBar2Gpa + 0x2000) == 0);        // ... and so is what the guest wrote
  CHECK(q.Readq(b0 + abi::kGttOffset + kFenceGttIndex * 8) == 0);
  CHECK(q.Readl(b0 + reg::kScratch) == 0);
  CHECK((q.Readl(b0 + reg::kStatus) & abi::kStatusRingEnabled) == 0);
  CHECK(q.Readq(sp + status::kCompletedFence) == 0);
  // the device works again after the reset
  SetUpRing(q);
  SubmitAndWait(q, f.d, 0, guest::CommandBuilder{}.Nop(1), 7);

  CHECK(q.Alive());
  const int code = q.Stop();
  CHECK_MESSAGE(code == 0, "QEMU exit " << code << "\n" << Diag(f.d, q));
  CHECK(f.d.Alive());

  // A second QEMU attaches after the first exited
  std::unique_ptr<QemuQtest> q2;
  for (int attempt = 0; attempt < 3 && !q2; ++attempt) {
    // vgpud serves one client at a time; give it a moment to see the first one go
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    fs::create_directories(f.dir / "qemu2");
    auto c = std::make_unique<QemuQtest>(f.dir / "qemu2");
    if (c->Start(QemuArgv(f.d, f.dir / "qemu2"))) q2 = std::move(c);
    else if (attempt == 2) FAIL("second QEMU did not attach\n" << Diag(f.d, *c));
  }
  const Placed p2 = EnumerateAndPlace(*q2, f.d);
  CHECK(p2.bar2_size == aperture);
  SetUpRing(*q2);
  SubmitAndWait(*q2, f.d, 0, guest::CommandBuilder{}.Nop(1), 9);
  CHECK(q2->Stop() == 0);
  CHECK(f.d.Shutdown() == 0);
}

TEST_CASE("a machine reset (0xCF9) reaches vgpud as DEVICE_RESET: aperture scrubbed, BARs placed again") {
  Fixture f;
  auto q1 = f.Qemu("qemu1");
  QemuQtest& q = *q1;
  const Placed p = EnumerateAndPlace(q, f.d);
  PciConfig cfg(q, p.devfn);
  const uint64_t sp = kBar0Gpa + abi::kStatusPageOffset;
  const uint32_t resets_before = q.Readl(sp + status::kResets);
  REQUIRE(q.Writeq(kBar2Gpa + 0x3000, 0x5A5A5A5A5A5A5A5Aull));
  REQUIRE(q.Writel(kBar0Gpa + reg::kScratch, 0xBEEF));

  // ICH9's reset control register: hard reset. QEMU resets the machine from its main loop:
  // every device, so vfio-user-pci sends DEVICE_RESET, and PCI config returns to power-on
  // values (BARs unassigned, decoding off).
  constexpr uint16_t kResetControlPort = 0xCF9;
  REQUIRE(q.Out('b', kResetControlPort, 0x06));
  CHECK_MESSAGE(WaitFor([&] { return (cfg.Read16(pci::kCommand) & pci::kCmdMemory) == 0; }),
                "the machine did not reset\n" << Diag(f.d, q));
  REQUIRE(q.Alive());

  const Placed again = EnumerateAndPlace(q, f.d);
  CHECK(again.devfn == p.devfn);
  CHECK(q.Readl(sp + status::kResets) == resets_before + 1);
  CHECK(q.Readq(kBar2Gpa + 0x3000) == 0);
  CHECK(q.Readl(kBar0Gpa + reg::kScratch) == 0);
  SetUpRing(q);
  SubmitAndWait(q, f.d, 0, guest::CommandBuilder{}.Nop(1), 11);
  CHECK(q.Stop() == 0);
  CHECK(f.d.Shutdown() == 0);
}

int main(int argc, char** argv) {
  constexpr int kSkip = 77;  // meson's "skipped"
  if (Env("VGPUD_QEMU").empty()) {
    std::fprintf(stderr, "SKIP: VGPUD_QEMU is not set (./run.sh vm builds QEMU and sets it)\n");
    return kSkip;
  }
  if (access(Env("VGPUD_QEMU").c_str(), X_OK) != 0) {
    std::fprintf(stderr, "SKIP: VGPUD_QEMU=%s is not executable\n", Env("VGPUD_QEMU").c_str());
    return kSkip;
  }
  doctest::Context ctx(argc, argv);
  return ctx.run();
}
