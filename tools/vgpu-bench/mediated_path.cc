#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <functional>

#include "guest/guest.h"
#include "tools/vgpu-bench/paths.h"

namespace vg::bench {
namespace {

using namespace vg::guest;

uint32_t AccessOf(shaders::Access a) {
  return (a != shaders::Access::kWrite ? abi::cmd::kAccessRead : 0) |
         (shaders::Writes(a) ? abi::cmd::kAccessWrite : 0);
}

// A guest driving its vGPU: buffers in its RAM through the GTT, commands in its ring, a
// doorbell, a fence. Three variants share this code and differ only in the backend and the
// driver options:
//   mediated       in-process vfio-user client; doorbell = one ioeventfd signal; fence IRQ
//   mediated-mmio  the same client; doorbell = RING_TAIL as a REGION_WRITE round trip
//   mediated-qemu  a real QEMU under qtest (QtestDevice); doorbell = RING_TAIL as an MMIO
//                  write that QEMU forwards as a synchronous REGION_WRITE; fence polled in RAM
class MediatedPath final : public Path {
 public:
  MediatedPath(std::string name, std::unique_ptr<DeviceBackend> dev, std::unique_ptr<Driver> drv, pid_t daemon,
               std::function<uint64_t()> messages, WaitMode wait, std::vector<NamedStats> floors = {},
               pid_t vmm = 0)
      : name_(std::move(name)), dev_(std::move(dev)), drv_(std::move(drv)), daemon_(daemon),
        messages_(std::move(messages)), wait_(wait), floors_(std::move(floors)), vmm_(vmm) {}
  std::string name() const override { return name_; }
  pid_t host_pid() const override { return daemon_; }
  pid_t vmm_pid() const override { return vmm_; }
  std::vector<NamedStats> floors() const override { return floors_; }

  Result<> Prepare(const Workload& w) override {
    Release();
    w_ = &w;
    cmds_.Clear();
    switch (w.kind) {
      case Kind::kEmpty:
        break;
      case Kind::kKernel: {
        const auto* k = shaders::FindKernel(w.sample.kernel);
        std::vector<Binding> binds;
        for (size_t i = 0; i < w.sample.bindings.size(); ++i) {
          VG_TRY_ASSIGN(GpuBuffer b, drv_->Alloc(w.sample.bindings[i].size()));
          std::memcpy(b.host.data(), w.sample.bindings[i].data(), w.sample.bindings[i].size());
          binds.push_back(Bind(b, AccessOf(k->bindings[i].access)));
          bufs_.push_back(b);
        }
        cmds_.Dispatch(w.sample.kernel, w.sample.groups, binds, w.sample.push);
        break;
      }
      case Kind::kFills: {
        VG_TRY_ASSIGN(GpuBuffer b, drv_->Alloc(uint64_t{w.commands} * 64));
        for (uint32_t i = 0; i < w.commands; ++i) cmds_.Fill(GpuVa{b.va.v + uint64_t{i} * 64}, 64, i);
        bufs_.push_back(b);
        break;
      }
      case Kind::kCopyCmd: {
        VG_TRY_ASSIGN(GpuBuffer a, drv_->Alloc(w.copy_bytes));
        VG_TRY_ASSIGN(GpuBuffer b, drv_->Alloc(w.copy_bytes));
        cmds_.Copy(a.va, b.va, w.copy_bytes);
        bufs_.push_back(a);
        bufs_.push_back(b);
        break;
      }
      case Kind::kChurn:
        break;
    }
    return Ok();
  }

  Result<uint64_t> Submit(bool irq = true) {
    if (w_->kind != Kind::kChurn) return drv_->Submit(cmds_, irq);
    // Object churn: a buffer is allocated and mapped through the GTT, used, unmapped.
    VG_TRY_ASSIGN(GpuBuffer b, drv_->Alloc(w_->churn_bytes));
    CommandBuilder cb;
    cb.Fill(b.va, w_->churn_bytes, 1);
    VG_TRY_ASSIGN(uint64_t seq, drv_->Submit(cb));
    VG_TRY(drv_->Wait(seq, wait_));
    VG_TRY(drv_->Free(b));
    return seq;
  }

  Result<> RunOnce() override {
    VG_TRY_ASSIGN(uint64_t seq, Submit());
    return drv_->Wait(seq, wait_);
  }
  Result<> RunStream(uint32_t n) override {
    uint64_t seq = 0;
    for (uint32_t i = 0; i < n; ++i) {
      VG_TRY_ASSIGN(seq, Submit(/*irq=*/i + 1 == n));
    }
    return drv_->Wait(seq, wait_);
  }

  Result<std::vector<std::vector<std::byte>>> ReadBack() override {
    std::vector<std::vector<std::byte>> out;
    for (auto& b : bufs_) out.emplace_back(b.host.begin(), b.host.end());
    return out;
  }
  void Release() override {
    for (auto& b : bufs_) (void)drv_->Free(b);
    bufs_.clear();
  }
  Crossings crossings() const override {
    const DriverCounters& c = drv_->counters();
    return {messages_(), c.doorbells, c.interrupts, 0, c.ring_bytes};
  }

 private:
  std::string name_;
  std::unique_ptr<DeviceBackend> dev_;
  std::unique_ptr<Driver> drv_;
  pid_t daemon_;
  std::function<uint64_t()> messages_;
  WaitMode wait_;
  std::vector<NamedStats> floors_;
  pid_t vmm_;
  const Workload* w_ = nullptr;
  std::vector<GpuBuffer> bufs_;
  CommandBuilder cmds_;
};

using Clock = std::chrono::steady_clock;

// Round trips of one qtest command, in us, after a short warm-up.
Result<Stats> TimeQtest(vm::QemuQtest& q, const std::string& cmd, int iters) {
  std::vector<double> us;
  for (int i = 0; i < iters + 20; ++i) {
    auto t0 = Clock::now();
    const std::string r = q.Cmd(cmd);
    VG_ERROR_IF(r.rfind("OK", 0) != 0, Errc::kDeviceLost, "qtest '{}': '{}'", cmd, r);
    if (i >= 20) us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  return Summarize(std::move(us));
}

// The doorbell a VM under QEMU 10.1 has: its store to RING_TAIL traps, and QEMU forwards it
// as a REGION_WRITE with the no-reply flag (posted) and resumes the vCPU without waiting.
// The guest driver writes RING_TAIL non-posted (it cannot know its VMM posts), so this
// backend posts exactly that register and forwards everything else unchanged.
class PostedTailBackend final : public DeviceBackend {
 public:
  explicit PostedTailBackend(std::unique_ptr<Device> d) : d_(std::move(d)) {}
  const Device& device() const { return *d_; }
  uint64_t posted_tail_writes() const { return posted_; }

  Result<uint32_t> Read32(uint32_t off) override { return d_->Read32(off); }
  Result<uint64_t> Read64(uint32_t off) override { return d_->Read64(off); }
  Result<> Write32(uint32_t off, uint32_t v, bool posted) override {
    if (off == abi::reg::kRingTail) {
      ++posted_;
      posted = true;
    }
    return d_->Write32(off, v, posted);
  }
  Result<> Write64(uint32_t off, uint64_t v, bool posted) override { return d_->Write64(off, v, posted); }
  Result<> WriteGttEntries(std::span<const abi::GttBatchRecord> records) override {
    return d_->WriteGttEntries(records);
  }
  // A posted RING_TAIL reports no refusal; the driver's waits read ERR_COUNT for it anyway.
  bool write_reports_refusal() const override { return d_->write_reports_refusal(); }
  bool ram_shared_with_fd() const override { return d_->ram_shared_with_fd(); }
  std::span<std::byte> ram() const override { return d_->ram(); }
  Gpa ram_base() const override { return d_->ram_base(); }
  uint32_t Status32(uint32_t off) const override { return d_->Status32(off); }
  uint64_t Status64(uint32_t off) const override { return d_->Status64(off); }
  std::span<std::byte> aperture() const override { return d_->aperture(); }
  uint32_t gtt_entries() const override { return d_->gtt_entries(); }
  Result<> Kick() override { return d_->Kick(); }
  const EventFd* irq_eventfd(uint32_t vector) const override { return d_->irq_eventfd(vector); }
  int status_poll_interval_us() const override { return d_->status_poll_interval_us(); }
  int hangup_fd() const override { return d_->hangup_fd(); }

 private:
  std::unique_ptr<Device> d_;
  uint64_t posted_ = 0;
};

Result<std::unique_ptr<Path>> MakeClientPath(const PathConfig& c, std::string name, Doorbell doorbell) {
  DeviceOptions o;
  o.socket = c.socket;
  o.ram_size = c.guest_ram;
  VG_INVALID_IF(!KnownGttMode(c.gtt), "--gtt {} is not ring, batch, multi or per-entry", c.gtt);
  o.write_multi = c.gtt != "per-entry";
  DriverOptions d;
  d.gtt_batch = c.gtt == "batch" || c.gtt == "ring";  // ring: the driver's own set-up mappings
  d.gtt_in_ring = c.gtt == "ring";
  d.ring_size = 256 << 10;  // 4096 FILL commands in one submission
  d.use_ioeventfd = doorbell == Doorbell::kDefault || doorbell == Doorbell::kIoeventfd || doorbell == Doorbell::kShadow;
  // kDefault leaves the driver's own choice; the others say theirs, so the ioeventfd row
  // kicks at every submission whatever the default becomes.
  if (doorbell == Doorbell::kIoeventfd || doorbell == Doorbell::kShadow) d.idle_notify = doorbell == Doorbell::kShadow;
  VG_TRY_ASSIGN(auto dev, Device::Open(o));
  if (doorbell == Doorbell::kPostedMmio) {
    auto posted = std::make_unique<PostedTailBackend>(std::move(dev));
    VG_TRY_ASSIGN(auto drv, Driver::Create(*posted, d));
    const PostedTailBackend* raw = posted.get();
    // The posted tail write is a one-way notification, counted as the driver's doorbell;
    // `msgs` counts request/reply messages, so it is taken out there.
    return std::unique_ptr<Path>(new MediatedPath(
        std::move(name), std::move(posted), std::move(drv), c.daemon,
        [raw] { return raw->device().messages() - raw->posted_tail_writes(); }, WaitMode::kIrq));
  }
  VG_TRY_ASSIGN(auto drv, Driver::Create(*dev, d));
  const Device* raw = dev.get();
  return std::unique_ptr<Path>(new MediatedPath(std::move(name), std::move(dev), std::move(drv), c.daemon,
                                                [raw] { return raw->messages(); }, WaitMode::kIrq));
}

}  // namespace

bool DriverHasIdleNotify() { return true; }  // DriverOptions::idle_notify (docs/device-spec.md "Idle notify")

Result<std::unique_ptr<Path>> MakeMediatedPath(const PathConfig& c) {
  return MakeClientPath(c, "mediated", c.doorbell);
}
Result<std::unique_ptr<Path>> MakeMediatedMmioPath(const PathConfig& c) {
  return MakeClientPath(c, "mediated-mmio", Doorbell::kSyncMmio);
}
Result<std::unique_ptr<Path>> MakeMediatedVariantPath(const PathConfig& c, const std::string& name) {
  return MakeClientPath(c, name, c.doorbell);
}

Result<std::unique_ptr<Path>> MakeMediatedQemuPath(const PathConfig& c) {
  VG_ERROR_IF(c.qemu.empty(), Errc::kUnsupported, "mediated-qemu needs QEMU (VGPUD_QEMU or --qemu)");
  QtestDeviceOptions o;
  o.qemu = c.qemu;
  o.firmware = c.qemu_firmware;
  o.socket = c.socket;
  o.work_dir = (std::filesystem::temp_directory_path() / fmt::format("vgpu-bench-qemu-{}", ::getpid())).string();
  o.driver_ram_size = c.guest_ram;
  constexpr uint64_t k2M = 2ull << 20;
  o.qemu_ram = (o.driver_ram_base.v + c.guest_ram + k2M - 1) / k2M * k2M;
  VG_TRY_ASSIGN(auto dev, QtestDevice::Open(o));
  // The floors of this hop, measured on this QEMU before the study: what a qtest command
  // costs with no device behind it (a write to plain guest RAM), and a trapped register
  // read (qtest + QEMU's vfio-user REGION_READ round trip to the daemon).
  std::vector<NamedStats> floors;
  VG_TRY_ASSIGN(Stats ram_rtt, TimeQtest(dev->qtest(), fmt::format("writel {:#x} 0x1", dev->scratch_gpa()), 1000));
  floors.push_back({"qtest writel to guest RAM (the qtest floor)", ram_rtt});
  VG_TRY_ASSIGN(Stats reg_rtt,
                TimeQtest(dev->qtest(), fmt::format("readl {:#x}", dev->bar0_gpa() + abi::reg::kId), 1000));
  floors.push_back({"qtest readl of a BAR0 register (qtest + REGION_READ)", reg_rtt});
  DriverOptions d;
  d.ring_size = 256 << 10;
  // QEMU never wires the doorbell ioeventfd (no DEVICE_GET_REGION_IO_FDS): a VM's doorbell
  // is the RING_TAIL write.
  d.use_ioeventfd = false;
  VG_TRY_ASSIGN(auto drv, Driver::Create(*dev, d));
  const QtestDevice* raw = dev.get();
  const pid_t qemu = dev->qemu_pid();
  return std::unique_ptr<Path>(new MediatedPath("mediated-qemu", std::move(dev), std::move(drv), c.daemon,
                                                [raw] { return raw->commands(); }, WaitMode::kPoll,
                                                std::move(floors), qemu));
}

}  // namespace vg::bench
