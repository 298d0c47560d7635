// vgpu-vm-guest: the guest driver inside a Linux VM (F14). Runs as a static binary from the
// initramfs that tools/vm/make-initramfs.sh builds: finds the vGPU on the VM's PCI bus,
// takes its RAM from the `memmap=SIZE$ADDR` window on the kernel command line, programs
// the GTT and the ring through guest::Driver (PciDevice backend), runs every catalogue
// kernel plus FILL, COPY and FENCE, checks each result against the CPU reference, then
// measures what buffer churn costs a VM in trapped register accesses (each one a vfio-user
// message under QEMU) with each way of updating the GTT, and prints one line per check and
// a final
//   VGPU-VM-GUEST: N passed, M failed
// to the console (tests/vm/ looks for it). With --poweroff it then powers the VM off.
//
//   vgpu-vm-guest [--poweroff] [--memmap SIZE$ADDR] [--sysfs DIR] [--mem PATH] [--elements N]
//                 [--gtt ring|batch|mmio]
//   vgpu-vm-guest --count      the number of checks a full run makes (for the host-side test)
//
// --gtt: how the catalogue run's driver updates the GTT (DriverOptions): GTT_UPDATE commands
// in the ring (default: no crossing of its own), one in-memory batch per update
// (GTT_BATCH_GO), or one trapped write per half entry.
#include <fcntl.h>
#include <sys/reboot.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "guest/driver.h"
#include "guest/pci_device.h"
#include "shaders/catalogue.h"
#include "shaders/samples.h"

using namespace vg;
using namespace vg::guest;

namespace {

// FILL, COPY and FENCE, beside one check per catalogue kernel, and a churn check per GTT mode.
enum class GttMode { kRing, kBatch, kMmio };
constexpr GttMode kGttModes[] = {GttMode::kRing, GttMode::kBatch, GttMode::kMmio};
constexpr size_t kFixedChecks = 3 + std::size(kGttModes);
constexpr int kWaitMs = 60000;  // TCG without KVM is slow; the daemon's engine is lavapipe

uint32_t AccessOf(shaders::Access a) {
  switch (a) {
    case shaders::Access::kRead: return abi::cmd::kAccessRead;
    case shaders::Access::kWrite: return abi::cmd::kAccessWrite;
    case shaders::Access::kReadWrite: return abi::cmd::kAccessRead | abi::cmd::kAccessWrite;
  }
  return 0;
}

// Buffers freed when the check ends, whatever it returned.
struct Buffers {
  Driver& drv;
  std::vector<GpuBuffer> bufs;
  explicit Buffers(Driver& d) : drv(d) {}
  ~Buffers() {
    for (auto& b : bufs) (void)drv.Free(b);
  }
  Result<GpuBuffer> Alloc(uint64_t size) {
    VG_TRY_ASSIGN(GpuBuffer b, drv.Alloc(size));
    bufs.push_back(b);
    return b;
  }
};

Result<> SubmitAndWait(Driver& drv, const CommandBuilder& cb) {
  VG_TRY_ASSIGN(uint64_t seq, drv.Submit(cb, /*irq=*/false));
  return drv.Wait(seq, WaitMode::kPoll, kWaitMs);
}

Result<> RunKernel(Driver& drv, const shaders::KernelDesc& k, uint32_t elements) {
  auto s = shaders::MakeSample(k.id, elements, elements * 7 + k.raw_id());
  Buffers bufs(drv);
  std::vector<Binding> binds;
  for (size_t i = 0; i < s.bindings.size(); ++i) {
    VG_TRY_ASSIGN(GpuBuffer b, bufs.Alloc(s.bindings[i].size()));
    std::memcpy(b.host.data(), s.bindings[i].data(), s.bindings[i].size());
    binds.push_back(Bind(b, AccessOf(k.bindings[i].access)));
  }
  CommandBuilder cb;
  cb.Dispatch(s.kernel, s.groups, binds, s.push);
  VG_TRY(SubmitAndWait(drv, cb));
  std::vector<std::vector<std::byte>> out;
  for (const GpuBuffer& b : bufs.bufs) out.emplace_back(b.host.begin(), b.host.end());
  return shaders::CheckSample(s, out);
}

Result<> RunFill(Driver& drv) {
  constexpr uint64_t kSize = 3 * kPageSize + 256;
  constexpr uint32_t kValue = 0xa5c3e1f0;
  Buffers bufs(drv);
  VG_TRY_ASSIGN(GpuBuffer b, bufs.Alloc(kSize + kPageSize));
  std::memset(b.host.data(), 0x11, b.host.size());
  CommandBuilder cb;
  cb.Fill(b.va, kSize, kValue);
  VG_TRY(SubmitAndWait(drv, cb));
  for (uint64_t i = 0; i < kSize / 4; ++i) {
    uint32_t v;
    std::memcpy(&v, b.host.data() + i * 4, 4);
    VG_ERROR_IF(v != kValue, Errc::kInternal, "word {} is {:#x}, want {:#x}", i, v, kValue);
  }
  VG_ERROR_IF(b.host[kSize] != std::byte{0x11}, Errc::kInternal, "FILL wrote past its end");
  return Ok();
}

Result<> RunCopy(Driver& drv) {
  constexpr uint64_t kSize = 5 * kPageSize + 12;
  Buffers bufs(drv);
  VG_TRY_ASSIGN(GpuBuffer src, bufs.Alloc(kSize));
  VG_TRY_ASSIGN(GpuBuffer dst, bufs.Alloc(kSize));
  for (uint64_t i = 0; i < kSize / 4; ++i) {
    uint32_t v = static_cast<uint32_t>(i * 2654435761u);
    std::memcpy(src.host.data() + i * 4, &v, 4);
  }
  std::memset(dst.host.data(), 0, kSize);
  CommandBuilder cb;
  cb.Copy(src.va, dst.va, kSize);
  VG_TRY(SubmitAndWait(drv, cb));
  VG_ERROR_IF(std::memcmp(src.host.data(), dst.host.data(), kSize) != 0, Errc::kInternal,
              "destination differs from source");
  return Ok();
}

Result<> RunFence(Driver& drv, DeviceBackend& dev) {
  constexpr uint64_t kValue = 0x0123456789abcdefull;
  Buffers bufs(drv);
  VG_TRY_ASSIGN(GpuBuffer b, bufs.Alloc(kPageSize));
  std::memset(b.host.data(), 0, 8);
  CommandBuilder cb;
  cb.Fence(b.va, kValue, false);
  VG_TRY_ASSIGN(uint64_t seq, drv.Submit(cb, false));
  VG_TRY(drv.Wait(seq, WaitMode::kPoll, kWaitMs));
  uint64_t v;
  std::memcpy(&v, b.host.data(), 8);
  VG_ERROR_IF(v != kValue, Errc::kInternal, "fence target holds {:#x}, want {:#x}", v, kValue);
  uint64_t done = dev.Status64(abi::status::kCompletedFence);
  VG_ERROR_IF(done != seq, Errc::kInternal, "status page fence {} after waiting for {}", done, seq);
  return Ok();
}

const char* GttModeName(GttMode m) {
  switch (m) {
    case GttMode::kRing: return "ring";
    case GttMode::kBatch: return "batch";
    case GttMode::kMmio: return "mmio";
  }
  return "?";
}

DriverOptions OptionsFor(GttMode m) {
  DriverOptions o;
  o.gtt_in_ring = m == GttMode::kRing;
  o.gtt_batch = m != GttMode::kMmio;
  return o;
}

// The study's churn cycle (docs/ab-methodology.md): create a 64 KiB buffer, FILL it, wait,
// check, destroy it, on a driver of its own in `mode`. Counts the trapped register accesses
// per cycle, the VM's boundary crossings (polling the status page is not one), and holds
// each mode to what it promises: the ring and the batch at most 3 per cycle (F12's target),
// per-entry writes at least two per page, which also shows the count is real.
Result<> RunChurn(PciDevice& dev, GttMode mode) {
  constexpr int kCycles = 32;
  constexpr uint64_t kSize = 64 << 10, kPages = kSize / kPageSize;
  VG_TRY_ASSIGN(auto drv, Driver::Create(dev, OptionsFor(mode)));
  // (A ring driver keeps the batch for what it maps before its ring runs.)
  const bool offered = mode == GttMode::kRing    ? drv->uses_gtt_ring()
                       : mode == GttMode::kBatch ? drv->uses_gtt_batch() && !drv->uses_gtt_ring()
                                                 : !drv->uses_gtt_batch() && !drv->uses_gtt_ring();
  VG_ERROR_IF(!offered, Errc::kUnsupported, "the device does not offer GTT mode {}", GttModeName(mode));
  auto cycle = [&](uint32_t value) -> Result<> {
    VG_TRY_ASSIGN(GpuBuffer b, drv->Alloc(kSize));
    CommandBuilder cb;
    cb.Fill(b.va, kSize, value);
    Result<> r = SubmitAndWait(*drv, cb);
    for (uint64_t i = 0; r.ok() && i < kSize / 4; i += 1021) {
      uint32_t v;
      std::memcpy(&v, b.host.data() + i * 4, 4);
      if (v != value) r = MakeError(Errc::kInternal, "cycle {:#x}: word {} is {:#x}", value, i, v);
    }
    VG_TRY(drv->Free(b));
    return r;
  };
  VG_TRY(cycle(0x100));  // warm-up: the first Alloc also maps the ring's neighbours
  const uint64_t before = dev.register_accesses();
  for (uint32_t i = 0; i < kCycles; ++i) VG_TRY(cycle(0x200 + i));
  const double per_cycle = static_cast<double>(dev.register_accesses() - before) / kCycles;
  std::printf("VGPU-VM-GUEST: churn gtt=%s: %.2f trapped register accesses per create/fill/destroy of %llu pages\n",
              GttModeName(mode), per_cycle, static_cast<unsigned long long>(kPages));
  if (mode == GttMode::kMmio) {
    VG_ERROR_IF(per_cycle < 2.0 * kPages, Errc::kInternal, "{:.2f} accesses per cycle: fewer than two per page",
                per_cycle);
  } else {
    VG_ERROR_IF(per_cycle > 3.0, Errc::kInternal, "{:.2f} accesses per cycle, target at most 3", per_cycle);
  }
  return drv->FlushFrees();
}

// Maps the window on its own and checks that a write reads back at both ends, before any
// device is involved: tells "the kernel kept /dev/mem from us" (STRICT_DEVMEM refuses
// System RAM; a memmap=$ range is reserved, not RAM) apart from a device problem.
Result<> ProbeRamWindow(const PciDeviceOptions& po) {
  UniqueFd fd(::open(po.mem_path.c_str(), O_RDWR | O_CLOEXEC));
  VG_ERROR_IF(!fd.Valid(), Errc::kIo, "open {}: {}", po.mem_path, std::strerror(errno));
  VG_TRY_ASSIGN(Mapping m, Mapping::Map(fd, po.ram.size, po.ram.base.v));
  for (uint64_t off : {uint64_t{0}, po.ram.size.v - 8}) {
    auto* p = reinterpret_cast<volatile uint64_t*>(m.data() + off);
    const uint64_t want = 0x5647505500000000ull | off;
    *p = want;
    VG_ERROR_IF(*p != want, Errc::kIo, "RAM window byte {:#x} does not read back", off);
    *p = 0;
  }
  return Ok();
}

Result<std::string> ReadCmdline() {
  FILE* f = std::fopen("/proc/cmdline", "r");
  VG_ERROR_IF(!f, Errc::kIo, "/proc/cmdline: {}", std::strerror(errno));
  char buf[4096];
  size_t n = std::fread(buf, 1, sizeof buf, f);
  std::fclose(f);
  return std::string(buf, n);
}

void PowerOff() {
  std::fflush(stdout);
  ::sync();
  ::reboot(RB_POWER_OFF);
}

int Usage() {
  std::fprintf(stderr,
               "usage: vgpu-vm-guest [--poweroff] [--memmap SIZE$ADDR] [--sysfs DIR] [--mem PATH] [--elements N]\n"
               "                     [--gtt ring|batch|mmio]\n"
               "       vgpu-vm-guest --count\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  bool poweroff = false;
  std::string memmap;
  uint32_t elements = 1000;
  GttMode gtt = GttMode::kRing;
  PciDeviceOptions po;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    bool has_value = i + 1 < argc;
    if (a == "--count") {
      std::printf("%zu\n", shaders::AllKernels().size() + kFixedChecks);
      return 0;
    } else if (a == "--poweroff") {
      poweroff = true;
    } else if (a == "--memmap" && has_value) {
      memmap = std::string("memmap=") + argv[++i];
    } else if (a == "--sysfs" && has_value) {
      po.sysfs_devices = argv[++i];
    } else if (a == "--mem" && has_value) {
      po.mem_path = argv[++i];
    } else if (a == "--elements" && has_value) {
      elements = static_cast<uint32_t>(std::strtoul(argv[++i], nullptr, 0));
    } else if (a == "--gtt" && has_value) {
      std::string_view m = argv[++i];
      bool known = false;
      for (GttMode g : kGttModes) {
        if (m == GttModeName(g)) gtt = g, known = true;
      }
      if (!known) return Usage();
    } else {
      return Usage();
    }
  }
  std::setvbuf(stdout, nullptr, _IOLBF, 0);

  size_t passed = 0, failed = 0;
  auto report = [&](const char* name, const Result<>& r) {
    if (r.ok()) {
      ++passed;
      std::printf("VGPU-VM-GUEST: %-12s ok\n", name);
    } else {
      ++failed;
      std::printf("VGPU-VM-GUEST: %-12s FAIL %s\n", name, r.error().ToString().c_str());
    }
  };
  auto run = [&]() -> Result<> {
    if (memmap.empty()) {
      VG_TRY_ASSIGN(memmap, ReadCmdline());
    }
    VG_TRY_ASSIGN(po.ram, ParseMemmap(memmap));
    VG_TRY_CTX(ProbeRamWindow(po), "RAM window {}+{:#x} through {}", po.ram.base, po.ram.size.v, po.mem_path);
    std::printf("VGPU-VM-GUEST: RAM window %#llx+%#llx mapped through %s\n",
                static_cast<unsigned long long>(po.ram.base.v), static_cast<unsigned long long>(po.ram.size.v),
                po.mem_path.c_str());
    VG_TRY_ASSIGN(auto dev, PciDevice::Open(po));
    std::printf("VGPU-VM-GUEST: device %s, %u GTT entries, %zu KiB aperture\n", dev->sysfs_path().c_str(),
                dev->gtt_entries(), dev->aperture().size() >> 10);
    {
      VG_TRY_ASSIGN(auto drv, Driver::Create(*dev, OptionsFor(gtt)));
      std::printf("VGPU-VM-GUEST: GTT updates: %s\n",
                  drv->uses_gtt_ring() ? "ring" : drv->uses_gtt_batch() ? "batch" : "mmio");
      for (const shaders::KernelDesc& k : shaders::AllKernels()) {
        std::string name(k.name);
        report(name.c_str(), RunKernel(*drv, k, elements));
      }
      report("FILL", RunFill(*drv));
      report("COPY", RunCopy(*drv));
      report("FENCE", RunFence(*drv, *dev));
      VG_TRY(drv->FlushFrees());
    }
    for (GttMode m : kGttModes) {
      const std::string name = std::string("CHURN-") + GttModeName(m);
      report(name.c_str(), RunChurn(*dev, m));
    }
    VG_TRY_ASSIGN(uint32_t errs, dev->Read32(abi::reg::kErrCount));
    std::printf("VGPU-VM-GUEST: device refusals %u, submissions %llu\n", errs,
                static_cast<unsigned long long>(dev->Status64(abi::status::kSubmissions)));
    return Ok();
  };
  if (auto r = run(); !r.ok()) {
    ++failed;
    std::printf("VGPU-VM-GUEST: setup FAIL %s\n", r.error().ToString().c_str());
  }
  std::printf("VGPU-VM-GUEST: %zu passed, %zu failed\n", passed, failed);
  if (poweroff) PowerOff();
  return failed == 0 ? 0 : 1;
}
