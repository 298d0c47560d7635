// vgpu-guest: drives one vGPU from its own process, as a VM's driver would.
//   vgpu-guest --socket PATH info       device identity and layout, as JSON
//   vgpu-guest --socket PATH selftest   bring-up checks (registers, mmaps, IRQs, doorbell, reset)

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include "guest/guest.h"

using namespace vg;
using json = nlohmann::json;

namespace {

Result<json> Info(guest::Device& d) {
  json j;
  VG_TRY_ASSIGN(uint32_t id, d.ConfigRead32(0x00));
  VG_TRY_ASSIGN(uint32_t cls, d.ConfigRead32(0x08));
  VG_TRY_ASSIGN(uint32_t ver, d.Read32(abi::reg::kVersion));
  VG_TRY_ASSIGN(uint32_t caps, d.Read32(abi::reg::kCaps));
  j["pci_id"] = fmt::format("{:04x}:{:04x}", id & 0xffff, id >> 16);
  j["class"] = fmt::format("{:06x}", cls >> 8);
  j["abi_version"] = fmt::format("{:#x}", ver);
  j["caps"] = caps;
  j["aperture_bytes"] = d.aperture().size();
  j["gtt_entries"] = d.gtt_entries();
  j["ram_bytes"] = d.ram().size();
  j["resets"] = d.Status32(abi::status::kResets);
  return j;
}

struct Check {
  std::string name;
  bool ok;
  std::string detail;
};

Result<std::vector<Check>> SelfTest(guest::Device& d) {
  std::vector<Check> checks;
  auto add = [&](std::string name, bool ok, std::string detail = {}) {
    checks.push_back({std::move(name), ok, std::move(detail)});
  };
  VG_TRY_ASSIGN(uint32_t id, d.Read32(abi::reg::kId));
  add("id", id == abi::kIdMagic, fmt::format("{:#x}", id));
  add("status_page_magic", d.Status32(abi::status::kMagic) == abi::kIdMagic);

  bool zero = true;
  for (std::byte b : d.aperture()) zero &= b == std::byte{0};
  add("aperture_zeroed", zero);

  uint32_t pattern = static_cast<uint32_t>(::getpid()) * 2654435761u;
  VG_TRY(d.Write32(abi::reg::kScratch, pattern));
  add("status_page_shared", d.Status32(abi::status::kScratch) == pattern,
      fmt::format("scratch {:#x}, status page {:#x}", pattern, d.Status32(abi::status::kScratch)));

  VG_TRY(d.Write32(abi::reg::kIrqTest, abi::kVectorFence));
  auto fired = d.WaitIrq(abi::kVectorFence, 2000);
  add("irq_fence_vector", fired.ok() && *fired >= 1, fired.ok() ? "" : fired.error().ToString());
  VG_TRY(d.Write32(abi::reg::kIrqStatus, 1u << abi::kVectorFence));

  uint64_t before = d.Status64(abi::status::kDoorbells);
  VG_TRY(d.Kick());
  bool seen = false;
  for (int i = 0; i < 2000 && !seen; ++i) {
    seen = d.Status64(abi::status::kDoorbells) == before + 1;
    if (!seen) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  add("doorbell_ioeventfd", seen);

  auto refused = d.Write32(abi::reg::kId, 0);
  VG_TRY_ASSIGN(auto err, d.ReadError());
  add("readonly_refused", refused.code() == Errc::kReadOnly && err.code == Errc::kReadOnly,
      std::string(ErrcName(err.code)));
  auto err_irq = d.WaitIrq(abi::kVectorError, 2000);
  add("irq_error_vector", err_irq.ok());

  std::memset(d.aperture().data(), 0x5A, std::min<size_t>(d.aperture().size(), 1 << 16));
  uint32_t resets = d.Status32(abi::status::kResets);
  VG_TRY(d.Reset());
  zero = true;
  for (std::byte b : d.aperture()) zero &= b == std::byte{0};
  VG_TRY_ASSIGN(uint32_t scratch, d.Read32(abi::reg::kScratch));
  add("reset", zero && scratch == 0 && d.Status32(abi::status::kResets) == resets + 1);
  return checks;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"vgpu-guest: drive a vGPU from a separate process"};
  guest::DeviceOptions opts;
  uint64_t ram_mib = 16;
  bool no_fd = false;
  app.add_option("--socket", opts.socket, "the vGPU's vfio-user socket")->required();
  app.add_option("--ram-mib", ram_mib, "guest RAM to share")->capture_default_str();
  app.add_flag("--no-fd", no_fd, "share RAM without an fd (DMA_READ/DMA_WRITE)");
  app.require_subcommand(1);
  auto* info = app.add_subcommand("info", "print the device's identity and layout");
  auto* selftest = app.add_subcommand("selftest", "bring-up checks; exit 1 if any fails");
  CLI11_PARSE(app, argc, argv);
  opts.ram_size = ram_mib << 20;
  opts.share_ram_fd = !no_fd;

  auto dev = guest::Device::Open(opts);
  if (!dev.ok()) {
    std::fprintf(stderr, "vgpu-guest: open %s: %s\n", opts.socket.c_str(), dev.error().ToString().c_str());
    return 2;
  }
  if (info->parsed()) {
    auto j = Info(**dev);
    if (!j.ok()) {
      std::fprintf(stderr, "vgpu-guest: %s\n", j.error().ToString().c_str());
      return 1;
    }
    std::printf("%s\n", j->dump(2).c_str());
    return 0;
  }
  if (selftest->parsed()) {
    auto checks = SelfTest(**dev);
    if (!checks.ok()) {
      std::fprintf(stderr, "vgpu-guest: selftest: %s\n", checks.error().ToString().c_str());
      return 1;
    }
    json out = json::array();
    bool all = true;
    for (const auto& c : *checks) {
      out.push_back({{"check", c.name}, {"ok", c.ok}, {"detail", c.detail}});
      all &= c.ok;
    }
    std::printf("%s\n", out.dump(2).c_str());
    return all ? 0 : 1;
  }
  return 0;
}
