#pragma once
// A DeviceBackend for the vfio_user tests: a few regions with distinct rules, an IrqSet,
// a DmaSpace, and a log of what the protocol layer asked for.

#include <atomic>
#include <cstring>
#include <mutex>
#include <new>
#include <vector>

#include "vfio_user/vfio_user.h"

namespace vg::vfio_user::test {

inline constexpr uint32_t kRoRegion = 3;       // read-only, 0x100 bytes
inline constexpr uint64_t kBar0Size = 0x1000;  // trapped registers
inline constexpr uint64_t kBar2Size = 0x4000;  // memfd, sparse areas
inline constexpr uint64_t kDoorbell = 0x40;

struct WriteRecord {
  uint32_t region;
  uint64_t offset;
  std::vector<std::byte> data;
};

class FakeDevice : public DeviceBackend {
 public:
  FakeDevice() : irqs_({0, 1, 4, 1, 1}) {
    bar0_.resize(kBar0Size);
    config_.resize(256);
    ro_.resize(0x100);
    for (size_t i = 0; i < ro_.size(); ++i) ro_[i] = std::byte(i);
    bar2_fd_ = std::move(CreateMemFd("fake-bar2", ByteSize{kBar2Size}).value());
    doorbell_ = std::move(EventFd::Create().value());
  }

  void OnConnect(DmaMessenger* m) override {
    ++connects;
    dma.SetMessenger(m);
  }
  void OnDisconnect() override {
    ++disconnects;
    dma.SetMessenger(nullptr);
    dma.Clear();
    irqs_.Clear();
  }

  Result<RegionInfo> GetRegionInfo(uint32_t index) override {
    RegionInfo ri;
    switch (index) {
      case kBar0Region: ri.flags = kRegionRead | kRegionWrite; ri.size = ByteSize{kBar0Size}; break;
      case kBar2Region:
        ri.flags = kRegionRead | kRegionWrite | kRegionMmap;
        ri.size = ByteSize{kBar2Size};
        ri.sparse_areas = {{0, 0x1000}, {0x2000, 0x2000}};
        ri.mmap_fd = &bar2_fd_;
        break;
      case kRoRegion: ri.flags = kRegionRead; ri.size = ByteSize{ro_.size()}; break;
      case kConfigRegion: ri.flags = kRegionRead | kRegionWrite; ri.size = ByteSize{config_.size()}; break;
      default: break;  // absent: size 0
    }
    return ri;
  }
  Result<std::vector<IoFd>> GetRegionIoFds(uint32_t index) override {
    if (index != kBar0Region) return std::vector<IoFd>{};
    return std::vector<IoFd>{IoFd{kDoorbell, 4, 0, 0, &doorbell_}};
  }
  Result<IrqInfo> GetIrqInfo(uint32_t index) override { return irqs_.Info(index); }
  Result<> SetIrqs(const SetIrqsArgs& a, std::vector<UniqueFd> fds, std::span<const uint8_t> bools) override {
    return irqs_.Set(a, std::move(fds), bools);
  }
  std::vector<std::byte>* Backing(uint32_t index) {
    if (index == kBar0Region) return &bar0_;
    if (index == kConfigRegion) return &config_;
    if (index == kRoRegion) return &ro_;
    return nullptr;
  }
  Result<> RegionRead(uint32_t index, uint64_t offset, std::span<std::byte> out) override {
    std::lock_guard lk(mu);
    ++reads;
    if (index == kBar2Region) {
      VG_TRY_ASSIGN(Mapping m, Mapping::Map(bar2_fd_, ByteSize{kBar2Size}, 0));
      std::memcpy(out.data(), m.data() + offset, out.size());
      return Ok();
    }
    auto* b = Backing(index);
    VG_ERROR_IF(!b, Errc::kBadRegion, "no region {}", index);
    std::memcpy(out.data(), b->data() + offset, out.size());
    return Ok();
  }
  // A write to BAR0 kDmaKick makes the device read 4 bytes of guest memory at dma_probe
  // synchronously (in the loop thread: refused with kWouldBlock when that memory has no fd)
  // and latch them at BAR0 kDmaKick + 4.
  static constexpr uint64_t kDmaKick = 0x100;
  uint64_t dma_probe = 0;
  Result<> RegionWrite(uint32_t index, uint64_t offset, std::span<const std::byte> data) override {
    if (index == kBar0Region && offset == kDmaKick) {
      std::byte got[4];
      VG_TRY(dma.Read(Gpa{dma_probe}, got));
      std::lock_guard lk(mu);
      std::memcpy(bar0_.data() + kDmaKick + 4, got, 4);
      return Ok();
    }
    std::lock_guard lk(mu);
    writes.push_back({index, offset, {data.begin(), data.end()}});
    auto* b = Backing(index);
    VG_ERROR_IF(!b || index == kRoRegion, Errc::kReadOnly, "region {} read-only", index);
    std::memcpy(b->data() + offset, data.data(), data.size());
    return Ok();
  }
  Result<> DmaMap(const DmaMapArgs& a, UniqueFd fd) override { return dma.Map(a, std::move(fd)); }
  Result<DmaDrain> DmaUnmap(const DmaUnmapArgs& a) override { return dma.Unmap(a); }
  Result<> Reset() override {
    // A device model whose allocation fails (the engine, a big vector): the protocol layer
    // must turn it into kOutOfMemory for this client, not let it unwind the loop.
    if (reset_throws_bad_alloc) throw std::bad_alloc();
    ++resets;
    std::lock_guard lk(mu);
    std::fill(bar0_.begin(), bar0_.end(), std::byte{0});
    return Ok();
  }

  IrqSet& irqs() { return irqs_; }
  const EventFd& doorbell() const { return doorbell_; }
  const UniqueFd& bar2_fd() const { return bar2_fd_; }

  bool reset_throws_bad_alloc = false;
  std::mutex mu;
  DmaSpace dma;
  std::vector<WriteRecord> writes;
  std::atomic<int> connects{0}, disconnects{0}, resets{0}, reads{0};

 private:
  IrqSet irqs_;
  std::vector<std::byte> bar0_, config_, ro_;
  UniqueFd bar2_fd_;
  EventFd doorbell_;
};

inline std::vector<std::byte> Bytes(std::initializer_list<uint8_t> v) {
  std::vector<std::byte> out;
  for (auto b : v) out.push_back(std::byte(b));
  return out;
}

}  // namespace vg::vfio_user::test
