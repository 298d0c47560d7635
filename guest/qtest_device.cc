#include "guest/qtest_device.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include <nlohmann/json.hpp>

namespace vg::guest {

namespace {

// PCI config space (type-0 header) offsets and bits.
constexpr uint8_t kCfgCommand = 0x04, kCfgBar0 = 0x10, kCfgBar2 = 0x18, kCfgBar3 = 0x1C;
constexpr uint16_t kCmdMemory = 1u << 1, kCmdBusMaster = 1u << 2;

}  // namespace

Result<std::unique_ptr<QtestDevice>> QtestDevice::Open(const QtestDeviceOptions& opts) {
  std::unique_ptr<QtestDevice> d(new QtestDevice());
  d->opts_ = opts;
  VG_TRY(d->Init());
  return d;
}

QtestDevice::~QtestDevice() {
  q_.reset();  // QEMU first: it holds the RAM file open
  if (created_work_dir_) {
    std::error_code ec;
    std::filesystem::remove_all(opts_.work_dir, ec);  // the qtest socket and QEMU's stderr
  }
}

Result<> QtestDevice::Init() {
  VG_INVALID_IF(opts_.qemu.empty(), "no QEMU binary (VGPUD_QEMU)");
  VG_INVALID_IF(opts_.qemu_ram > (2ull << 30) || !IsAligned(opts_.qemu_ram, 2ull << 20),
                "guest RAM {:#x} must be 2 MiB aligned and at most 2 GiB (below the PCI hole)", opts_.qemu_ram);
  VG_INVALID_IF(opts_.driver_ram_base.v < kScratchGpa + kPageSize ||
                    !IsAligned(opts_.driver_ram_base.v, kPageSize) ||
                    opts_.driver_ram_base.v + opts_.driver_ram_size > opts_.qemu_ram,
                "driver window {:#x}+{:#x} is not inside guest RAM {:#x} above the scratch page",
                opts_.driver_ram_base.v, opts_.driver_ram_size, opts_.qemu_ram);
  std::error_code ec;
  created_work_dir_ = std::filesystem::create_directories(opts_.work_dir, ec);
  VG_ERROR_IF(ec, Errc::kIo, "mkdir {}: {}", opts_.work_dir, ec.message());

  // Guest RAM is a memfd this process creates and seals against shrinking, as QEMU's
  // memory-backend-memfd does (vgpud refuses to DMA_MAP memory a client could truncate).
  // QEMU reaches the same file through this process's /proc fd link with its file backend,
  // so both sides map one memfd and QEMU's DMA_MAP passes the sealed file on.
  ram_fd_ = UniqueFd(::memfd_create("vgpud-qtest-ram", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  VG_ERROR_IF(!ram_fd_.Valid(), Errc::kIo, "memfd_create: {}", std::strerror(errno));
  VG_ERROR_IF(::ftruncate(ram_fd_.Get(), static_cast<off_t>(opts_.qemu_ram)) != 0, Errc::kIo, "truncate RAM: {}",
              std::strerror(errno));
  VG_ERROR_IF(::fcntl(ram_fd_.Get(), F_ADD_SEALS, F_SEAL_SHRINK) != 0, Errc::kIo, "seal RAM: {}",
              std::strerror(errno));
  ram_path_ = fmt::format("/proc/{}/fd/{}", ::getpid(), ram_fd_.Get());
  VG_TRY_ASSIGN(ram_map_, Mapping::Map(ram_fd_, ByteSize{opts_.qemu_ram}, 0));
  driver_ram_ = ram_map_.bytes().subspan(opts_.driver_ram_base.v, opts_.driver_ram_size);

  nlohmann::ordered_json dev;
  dev["driver"] = "vfio-user-pci";
  dev["id"] = "vgpu0";
  dev["socket"] = {{"path", opts_.socket}, {"type", "unix"}};
  const std::string mem = std::to_string(opts_.qemu_ram >> 20) + "M";
  std::vector<std::string> argv{opts_.qemu, "-machine", "q35", "-accel", "qtest", "-display", "none", "-nodefaults",
                                "-no-user-config", "-m", mem, "-object",
                                "memory-backend-file,id=vgpud-ram,size=" + mem + ",mem-path=" + ram_path_ + ",share=on",
                                "-machine", "memory-backend=vgpud-ram", "-device", dev.dump()};
  if (!opts_.firmware.empty()) argv.insert(argv.begin() + 1, {"-L", opts_.firmware});
  q_ = std::make_unique<vm::QemuQtest>(opts_.work_dir);
  const bool up = q_->Start(argv, opts_.start_timeout_ms);
  // QEMU opened the file during machine init, before its first qtest answer.
  ram_path_.clear();
  VG_ERROR_IF(!up, Errc::kDeviceLost, "QEMU did not attach: {}", Diagnostics());
  return Place();
}

// Enumerate bus 0, size and place BAR0 and BAR2/3, turn on memory decoding and bus master
// (QEMU DMA_MAPs guest RAM to the daemon regardless; bus master is what a driver sets).
Result<> QtestDevice::Place() {
  auto devfn = vm::PciConfig::Find(*q_, abi::kVendorId, abi::kDeviceId);
  VG_ERROR_IF(!devfn, Errc::kNotFound, "no vGPU on QEMU's bus 0: {}", Diagnostics());
  vm::PciConfig cfg(*q_, *devfn);
  cfg.Write16(kCfgCommand, 0);
  cfg.Write32(kCfgBar0, static_cast<uint32_t>(kBar0Gpa));
  cfg.Write32(kCfgBar2, static_cast<uint32_t>(kBar2Gpa));
  cfg.Write32(kCfgBar3, static_cast<uint32_t>(kBar2Gpa >> 32));
  cfg.Write16(kCfgCommand, kCmdMemory | kCmdBusMaster);
  VG_TRY_ASSIGN(uint32_t id, Read32(abi::reg::kId));
  VG_ERROR_IF(id != abi::kIdMagic, Errc::kUnsupported, "BAR0 ID {:#x} is not a vgpud vGPU: {}", id, Diagnostics());
  VG_TRY_ASSIGN(gtt_entries_, Read32(abi::reg::kGttEntries));
  VG_ERROR_IF(gtt_entries_ > abi::kGttMaxEntries, Errc::kUnsupported, "GTT_ENTRIES {} over the ABI's {}",
              gtt_entries_, abi::kGttMaxEntries);
  return Ok();
}

Result<uint32_t> QtestDevice::Read32(uint32_t off) {
  VG_ERROR_IF(!IsAligned(off, 4) || off + 4 > abi::kBar0Size, Errc::kOutOfBounds, "register {:#x}", off);
  ++commands_;
  // readl answers all ones on failure; the reply text says which.
  const std::string r = q_->Cmd(fmt::format("readl {:#x}", kBar0Gpa + off));
  VG_ERROR_IF(r.rfind("OK ", 0) != 0, Errc::kDeviceLost, "qtest readl {:#x}: '{}'", off, r);
  return static_cast<uint32_t>(std::stoull(r.substr(3), nullptr, 0));
}

Result<uint64_t> QtestDevice::Read64(uint32_t off) {
  // Two dword reads, low first (device-spec §BAR0), as PciDevice does.
  VG_TRY_ASSIGN(uint32_t lo, Read32(off));
  VG_TRY_ASSIGN(uint32_t hi, Read32(off + 4));
  return uint64_t{lo} | uint64_t{hi} << 32;
}

Result<> QtestDevice::Write32(uint32_t off, uint32_t v, bool /*posted*/) {
  VG_ERROR_IF(!IsAligned(off, 4) || off + 4 > abi::kBar0Size, Errc::kOutOfBounds, "register {:#x}", off);
  // The driver's stores to the shared RAM file happen before this message is sent; QEMU
  // forwards the write only after reading it, so the daemon sees them (socket ordering).
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  ++commands_;
  const std::string r = q_->Cmd(fmt::format("writel {:#x} {:#x}", kBar0Gpa + off, v));
  VG_ERROR_IF(r != "OK", Errc::kDeviceLost, "qtest writel {:#x}: '{}'", off, r);
  return Ok();
}

Result<> QtestDevice::Write64(uint32_t off, uint64_t v, bool posted) {
  // A GTT entry commits on its high half: low dword first.
  VG_TRY(Write32(off, static_cast<uint32_t>(v), posted));
  return Write32(off + 4, static_cast<uint32_t>(v >> 32), posted);
}

uint32_t QtestDevice::Status32(uint32_t off) const {
  ++commands_;
  return q_->Readl(kBar0Gpa + abi::kStatusPageOffset + off);
}
uint64_t QtestDevice::Status64(uint32_t off) const {
  ++commands_;
  // One 8-byte read: QEMU's mmap of the status page serves it whole.
  return q_->Readq(kBar0Gpa + abi::kStatusPageOffset + off);
}

std::string QtestDevice::Diagnostics() const {
  if (!q_) return "QEMU not started";
  std::string err = q_->Stderr();
  if (err.size() > 4000) err = "..." + err.substr(err.size() - 4000);
  return "qemu: " + q_->CommandLine() + "\nqemu stderr:\n" + err + "\nlast qtest error: " + q_->last_error();
}

}  // namespace vg::guest
