#include "guest/device.h"

#include <algorithm>
#include <chrono>
#include <thread>

#include <cstring>

namespace vg::guest {

namespace vu = vfio_user;

Result<std::unique_ptr<Device>> Device::Open(const DeviceOptions& opts) {
  std::unique_ptr<Device> d(new Device());
  d->opts_ = opts;
  VG_TRY(d->Init());
  return d;
}

// The client goes first: its twin-socket thread may be serving a DMA_READ of our RAM (the
// device re-reads the tail shadow on its own when its work runs out), and must be joined
// before the RAM mapping it copies from is unmapped.
Device::~Device() { client_.reset(); }

Result<> Device::ServeDma(bool is_write, Gpa addr, std::span<std::byte> buf) {
  if (opts_.dma_delay_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(opts_.dma_delay_ms));
  uint64_t base = opts_.ram_base.v;
  VG_ERROR_IF(addr.v < base || !RangeWithin(addr.v - base, buf.size(), ram_map_.size().v), Errc::kOutOfBounds,
              "DMA {} at {}+{:#x} outside guest RAM", is_write ? "write" : "read", addr, buf.size());
  std::byte* p = ram_map_.data() + (addr.v - base);
  if (is_write)
    std::memcpy(p, buf.data(), buf.size());
  else
    std::memcpy(buf.data(), p, buf.size());
  return Ok();
}

Result<> Device::Init() {
  VG_TRY_ASSIGN(client_, vu::Client::Connect(opts_.socket, opts_.timeout_ms));
  vu::ClientOptions co;
  co.twin_socket = opts_.twin_socket;
  co.dma_rw_layout = opts_.dma_rw_layout;
  co.timeout_ms = opts_.timeout_ms;
  VG_TRY_ASSIGN(auto caps, client_->Negotiate(co, [this](bool w, Gpa a, std::span<std::byte> b) {
    return ServeDma(w, a, b);
  }));
  (void)caps;

  // Guest RAM: a memfd, exactly what a VMM with shared memory backing has.
  VG_TRY_ASSIGN(ram_fd_, CreateMemFd("vgpu-guest-ram", ByteSize{opts_.ram_size}));
  VG_TRY_ASSIGN(ram_map_, Mapping::Map(ram_fd_, ByteSize{opts_.ram_size}, 0));
  vu::DmaMapArgs map{opts_.ram_base, ByteSize{opts_.ram_size}, 0, vu::kDmaRead | vu::kDmaWrite};
  if (opts_.share_ram_fd) {
    VG_TRY_CTX(client_->DmaMap(map, ram_fd_), "DMA_MAP guest RAM");
  } else {
    VG_TRY_CTX(client_->DmaMap(map), "DMA_MAP guest RAM without fd");
  }

  // Status page: the sparse-mmap area of BAR0.
  VG_TRY_ASSIGN(auto bar0, client_->GetRegionInfo(vu::kBar0Region));
  VG_ERROR_IF(bar0.sparse.size() != 1 || !bar0.fd.Valid(), Errc::kUnsupported, "BAR0 offers no status page mmap");
  const vu::SparseArea& area = bar0.sparse[0];
  VG_ERROR_IF(area.offset != abi::kStatusPageOffset, Errc::kUnsupported, "status page at {:#x}", area.offset);
  status_fd_ = std::move(bar0.fd);
  VG_TRY_ASSIGN(status_map_, Mapping::Map(status_fd_, ByteSize{area.size}, bar0.info.offset + area.offset,
                                          Mapping::Prot::kRead));
  status_ = status_map_.data();

  VG_TRY_ASSIGN(auto bar2, client_->GetRegionInfo(vu::kBar2Region));
  VG_ERROR_IF(!bar2.fd.Valid(), Errc::kUnsupported, "BAR2 offers no mmap");
  aperture_fd_ = std::move(bar2.fd);
  VG_TRY_ASSIGN(aperture_map_, Mapping::Map(aperture_fd_, ByteSize{bar2.info.size}, bar2.info.offset));

  // MSI-X: one eventfd per vector.
  std::array<int, abi::kNumVectors> fds{};
  for (uint32_t v = 0; v < abi::kNumVectors; ++v) {
    VG_TRY_ASSIGN(irqs_[v], EventFd::Create());
    fds[v] = irqs_[v].Get();
  }
  vu::SetIrqsArgs irq{vu::kIrqSetDataEventfd | vu::kIrqSetActionTrigger, vu::kIrqMsix, 0, abi::kNumVectors};
  VG_TRY_CTX(client_->SetIrqs(irq, fds), "SET_IRQS MSI-X");
  // A single-vector interrupt the device may offer: an eventfd of ours on it when it does.
  auto optional_irq = [&](uint32_t index, EventFd& ev, const char* name) -> Result<> {
    auto info = client_->GetIrqInfo(index);
    if (!info.ok() || info->count < 1) return Ok();
    VG_TRY_ASSIGN(ev, EventFd::Create());
    const int fd = ev.Get();
    vu::SetIrqsArgs args{vu::kIrqSetDataEventfd | vu::kIrqSetActionTrigger, index, 0, 1};
    VG_TRY_CTX(client_->SetIrqs(args, std::span<const int>(&fd, 1)), "SET_IRQS {}", name);
    return Ok();
  };
  // REQ: the host's request to release the device (a stop). ERR: the device is lost and can
  // run nothing more (VFIO's error interrupt).
  VG_TRY(optional_irq(vu::kIrqReq, req_, "REQ"));
  VG_TRY(optional_irq(vu::kIrqErr, err_, "ERR"));
  VG_TRY(EnablePci());

  VG_TRY_ASSIGN(auto io, client_->GetRegionIoFds(vu::kBar0Region));
  for (size_t i = 0; i < io.subregions.size(); ++i) {
    if (io.subregions[i].offset == abi::reg::kDoorbellKick && io.subregions[i].fd_index < io.fds.size())
      doorbell_ = EventFd::Adopt(std::move(io.fds[io.subregions[i].fd_index]));
  }
  VG_ERROR_IF(!doorbell_.Valid(), Errc::kUnsupported, "no doorbell ioeventfd offered");

  VG_TRY_ASSIGN(uint32_t id, Read32(abi::reg::kId));
  VG_ERROR_IF(id != abi::kIdMagic, Errc::kUnsupported, "device ID {:#x} is not a vgpud vGPU", id);
  VG_TRY_ASSIGN(gtt_entries_, Read32(abi::reg::kGttEntries));
  return Ok();
}

// A driver's bring-up, as a guest kernel's is: memory decoding and bus mastering on, MSI-X
// enabled and its function mask clear. Without them the device sends no interrupt and
// fetches no ring (PCI rules, docs/device-spec.md §Interrupts, §DMA and power).
Result<> Device::EnablePci() {
  constexpr uint32_t kCommand = 0x04, kMemory = 1u << 1, kBusMaster = 1u << 2;
  constexpr uint32_t kMsixEnable = 1u << 31, kMsixFunctionMask = 1u << 30;  // message control, in the dword
  VG_TRY_ASSIGN(uint32_t cmd, ConfigRead32(kCommand));
  VG_TRY(ConfigWrite32(kCommand, (cmd & 0xFFFF) | kMemory | kBusMaster));  // status half: RW1C, written 0
  VG_TRY_ASSIGN(uint32_t msix, ConfigRead32(abi::kCapMsixOffset));
  VG_TRY(ConfigWrite32(abi::kCapMsixOffset, (msix | kMsixEnable) & ~kMsixFunctionMask));
  // Vector control: unmasked (SET_IRQS did this at open; after an FLR the table is masked).
  for (uint32_t v = 0; v < abi::kNumVectors; ++v) VG_TRY(Write32(abi::kMsixTableOffset + 16 * v + 12, 0));
  return Ok();
}

Result<> Device::Reset() {
  VG_TRY(client_->Reset());
  return EnablePci();  // a function-level reset clears the command register and MSI-X enable
}

// PCI PM: PMCSR is the word at +4 of the PM capability; power state in bits 1:0.
Result<> Device::Sleep() {
  VG_TRY_ASSIGN(uint32_t pm, ConfigRead32(abi::kCapPmOffset + 4));
  return ConfigWrite32(abi::kCapPmOffset + 4, (pm & ~0x3u & ~0x8000u) | 0x3u);  // PME_Status (RW1C) written 0
}

Result<> Device::Wake() {
  VG_TRY_ASSIGN(uint32_t pm, ConfigRead32(abi::kCapPmOffset + 4));
  VG_TRY(ConfigWrite32(abi::kCapPmOffset + 4, pm & ~0x3u & ~0x8000u));
  return Reset();
}

// Every register and config access is one request (a reply unless posted) on the socket.
template <class T>
Result<T> Device::ReadValue(uint32_t region, uint32_t off) {
  ++messages_;
  VG_TRY_ASSIGN(auto bytes, client_->RegionRead(region, off, sizeof(T)));
  VG_ERROR_IF(bytes.size() != sizeof(T), Errc::kBadMessage, "read of {} bytes returned {}", sizeof(T), bytes.size());
  T v;
  std::memcpy(&v, bytes.data(), sizeof(T));
  return v;
}
template <class T>
Result<> Device::WriteValue(uint32_t region, uint32_t off, T v, bool posted) {
  ++messages_;
  return client_->RegionWrite(region, off, std::as_bytes(std::span(&v, 1)), posted);
}

Result<uint32_t> Device::Read32(uint32_t off) { return ReadValue<uint32_t>(vu::kBar0Region, off); }
Result<uint64_t> Device::Read64(uint32_t off) { return ReadValue<uint64_t>(vu::kBar0Region, off); }
Result<> Device::Write32(uint32_t off, uint32_t v, bool posted) { return WriteValue(vu::kBar0Region, off, v, posted); }
Result<> Device::Write64(uint32_t off, uint64_t v, bool posted) { return WriteValue(vu::kBar0Region, off, v, posted); }
// Posted GTT writes: up to kWriteMultiMax (QEMU's VFIO_USER_MULTI_MAX) per REGION_WRITE_MULTI,
// one message each. The server applies them in order with the same checks as REGION_WRITE;
// a refused one stops the message there (docs/device-spec.md §GTT, multi-write).
Result<> Device::WriteGttEntries(std::span<const abi::GttBatchRecord> records) {
  if (!opts_.write_multi || !client_->caps().write_multiple) return DeviceBackend::WriteGttEntries(records);
  std::vector<vu::MultiWrite> batch;
  for (size_t at = 0; at < records.size(); at += vu::kWriteMultiMax) {
    size_t n = std::min<size_t>(vu::kWriteMultiMax, records.size() - at);
    batch.clear();
    for (size_t i = at; i < at + n; ++i) {
      vu::MultiWrite w;
      w.region = vu::kBar0Region;
      w.offset = abi::kGttOffset + uint64_t{records[i].index} * 8;
      w.data.resize(8);
      std::memcpy(w.data.data(), &records[i].entry, 8);
      batch.push_back(std::move(w));
    }
    ++messages_;
    VG_TRY(client_->RegionWriteMulti(batch, /*posted=*/true));
  }
  return Ok();
}

Result<uint32_t> Device::ConfigRead32(uint32_t off) { return ReadValue<uint32_t>(vu::kConfigRegion, off); }
Result<> Device::ConfigWrite32(uint32_t off, uint32_t v) { return WriteValue(vu::kConfigRegion, off, v, false); }

Gpa Device::GpaOf(const void* p) const {
  return Gpa{opts_.ram_base.v + static_cast<uint64_t>(static_cast<const std::byte*>(p) - ram_map_.data())};
}

uint32_t Device::Status32(uint32_t off) const {
  return __atomic_load_n(reinterpret_cast<const uint32_t*>(status_ + off), __ATOMIC_ACQUIRE);
}
uint64_t Device::Status64(uint32_t off) const {
  return __atomic_load_n(reinterpret_cast<const uint64_t*>(status_ + off), __ATOMIC_ACQUIRE);
}

Result<uint64_t> Device::WaitIrq(uint32_t vector, int timeout_ms) {
  VG_ERROR_IF(vector >= abi::kNumVectors, Errc::kOutOfBounds, "vector {}", vector);
  return irqs_[vector].Wait(timeout_ms);
}

}  // namespace vg::guest
