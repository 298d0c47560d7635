#include <cstring>

#include "guest/guest.h"
#include "tools/vgpu-bench/paths.h"

namespace vg::bench {
namespace {

using namespace vg::guest;

uint32_t AccessOf(shaders::Access a) {
  return (a != shaders::Access::kWrite ? abi::cmd::kAccessRead : 0) |
         (shaders::Writes(a) ? abi::cmd::kAccessWrite : 0);
}

// A guest driving its vGPU: buffers in its RAM through the GTT, commands in its ring, the
// doorbell as one ioeventfd signal, completion by the fence interrupt.
class MediatedPath final : public Path {
 public:
  MediatedPath(std::unique_ptr<Device> dev, std::unique_ptr<Driver> drv, pid_t daemon)
      : dev_(std::move(dev)), drv_(std::move(drv)), daemon_(daemon) {}
  std::string name() const override { return "mediated"; }
  pid_t host_pid() const override { return daemon_; }

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
    VG_TRY(drv_->Wait(seq));
    VG_TRY(drv_->Free(b));
    return seq;
  }

  Result<> RunOnce() override {
    VG_TRY_ASSIGN(uint64_t seq, Submit());
    return drv_->Wait(seq);
  }
  Result<> RunStream(uint32_t n) override {
    uint64_t seq = 0;
    for (uint32_t i = 0; i < n; ++i) {
      VG_TRY_ASSIGN(seq, Submit(/*irq=*/i + 1 == n));
    }
    return drv_->Wait(seq);
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
    return {dev_->messages(), c.doorbells, c.interrupts, 0, c.ring_bytes};
  }

 private:
  std::unique_ptr<Device> dev_;
  std::unique_ptr<Driver> drv_;
  pid_t daemon_;
  const Workload* w_ = nullptr;
  std::vector<GpuBuffer> bufs_;
  CommandBuilder cmds_;
};

}  // namespace

Result<std::unique_ptr<Path>> MakeMediatedPath(const PathConfig& c) {
  DeviceOptions o;
  o.socket = c.socket;
  o.ram_size = c.guest_ram;
  VG_TRY_ASSIGN(auto dev, Device::Open(o));
  DriverOptions d;
  d.ring_size = 256 << 10;  // 4096 FILL commands in one submission
  VG_TRY_ASSIGN(auto drv, Driver::Create(*dev, d));
  return std::unique_ptr<Path>(new MediatedPath(std::move(dev), std::move(drv), c.daemon));
}

}  // namespace vg::bench
