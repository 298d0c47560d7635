// Device-model tests: the vGPU driven through its DeviceBackend interface with no socket
// (STYLE.md: device state apart from transport).
#include <doctest.h>

#include <atomic>
#include <cstring>
#include <thread>

#include "mediator/mediator.h"
#include "vfio_user/dma.h"

using namespace vg;
using namespace vg::mediator;
namespace vu = vg::vfio_user;

namespace {

std::unique_ptr<Vgpu> MakeVgpu(uint64_t aperture = 1 << 20, uint32_t gtt = 256) {
  VgpuConfig cfg;
  cfg.uuid = Uuid::Random();
  cfg.aperture_size = aperture;
  cfg.gtt_entries = gtt;
  auto v = Vgpu::Create(cfg);
  REQUIRE(v.ok());
  return std::move(v).value();
}

uint32_t Rd32(Vgpu& v, uint32_t region, uint64_t off) {
  uint32_t x = 0xdeadbeef;
  auto r = v.RegionRead(region, off, std::as_writable_bytes(std::span(&x, 1)));
  REQUIRE(r.ok());
  return x;
}
Result<> Wr32(Vgpu& v, uint32_t region, uint64_t off, uint32_t x) {
  return v.RegionWrite(region, off, std::as_bytes(std::span(&x, 1)));
}
Result<> Wr64(Vgpu& v, uint32_t region, uint64_t off, uint64_t x) {
  return v.RegionWrite(region, off, std::as_bytes(std::span(&x, 1)));
}
uint32_t Cfg32(Vgpu& v, uint32_t off) { return Rd32(v, vu::kConfigRegion, off); }
uint32_t Reg(Vgpu& v, uint32_t off) { return Rd32(v, vu::kBar0Region, off); }

// Maps the status page the way a guest would: from the region's fd and sparse area.
Mapping MapStatusPage(Vgpu& v) {
  auto info = v.GetRegionInfo(vu::kBar0Region);
  REQUIRE(info.ok());
  REQUIRE(info->sparse_areas.size() == 1);
  REQUIRE(info->mmap_fd != nullptr);
  auto m = Mapping::Map(*info->mmap_fd, ByteSize{info->sparse_areas[0].size},
                        info->fd_offset + info->sparse_areas[0].offset, Mapping::Prot::kRead);
  REQUIRE(m.ok());
  return std::move(m).value();
}

template <class T>
T At(const Mapping& m, uint32_t off) {
  T v;
  std::memcpy(&v, m.data() + off, sizeof v);
  return v;
}

}  // namespace

TEST_CASE("config space: identity, BAR sizing, read-only fields, capabilities") {
  auto v = MakeVgpu(1 << 20);
  CHECK(Cfg32(*v, 0x00) == (uint32_t{abi::kDeviceId} << 16 | abi::kVendorId));
  CHECK((Cfg32(*v, 0x08) >> 8) == abi::kClassCode);
  // Writes to vendor/device id are ignored as hardware ignores them.
  REQUIRE(Wr32(*v, vu::kConfigRegion, 0x00, 0x12345678).ok());
  CHECK(Cfg32(*v, 0x00) == (uint32_t{abi::kDeviceId} << 16 | abi::kVendorId));
  // BAR sizing: all ones reads back ~(size-1) | flags.
  REQUIRE(Wr32(*v, vu::kConfigRegion, 0x10, 0xFFFFFFFF).ok());
  CHECK(Cfg32(*v, 0x10) == static_cast<uint32_t>(~(abi::kBar0Size - 1)));
  REQUIRE(Wr32(*v, vu::kConfigRegion, 0x18, 0xFFFFFFFF).ok());
  REQUIRE(Wr32(*v, vu::kConfigRegion, 0x1C, 0xFFFFFFFF).ok());
  CHECK(Cfg32(*v, 0x18) == (static_cast<uint32_t>(~((1u << 20) - 1)) | 0xC));
  CHECK(Cfg32(*v, 0x1C) == 0xFFFFFFFF);
  // Unimplemented BARs read zero after sizing.
  REQUIRE(Wr32(*v, vu::kConfigRegion, 0x14, 0xFFFFFFFF).ok());
  CHECK(Cfg32(*v, 0x14) == 0);
  // Command register: only the implemented bits stick.
  REQUIRE(Wr32(*v, vu::kConfigRegion, 0x04, 0x0000FFFF).ok());
  CHECK((Cfg32(*v, 0x04) & 0xFFFF) == 0x0546);
  // Capability list: PM -> MSI -> MSI-X -> end.
  uint32_t ptr = Cfg32(*v, 0x34) & 0xFF;
  std::vector<uint32_t> ids;
  while (ptr) {
    uint32_t hdr = Cfg32(*v, ptr);
    ids.push_back(hdr & 0xFF);
    ptr = (hdr >> 8) & 0xFF;
  }
  CHECK(ids == std::vector<uint32_t>{0x01, 0x05, 0x11, 0x13});  // PM, MSI, MSI-X, Advanced Features (FLR)
  CHECK(((Cfg32(*v, 0x04) >> 16) & 0x10) != 0);  // capability list bit
  // Out-of-range config access is refused.
  uint32_t x;
  CHECK(v->RegionRead(vu::kConfigRegion, 254, std::as_writable_bytes(std::span(&x, 1))).code() ==
        Errc::kOutOfBounds);
}

TEST_CASE("config space: function reset keeps BAR assignment, clears command") {
  auto v = MakeVgpu();
  REQUIRE(Wr32(*v, vu::kConfigRegion, 0x10, 0xFE000000).ok());
  REQUIRE(Wr32(*v, vu::kConfigRegion, 0x04, 0x6).ok());
  REQUIRE(v->Reset().ok());
  CHECK(Cfg32(*v, 0x10) == 0xFE000000);
  CHECK((Cfg32(*v, 0x04) & 0xFFFF) == 0);
}

TEST_CASE("BAR0: identity registers and read-only refusals with an error report") {
  auto v = MakeVgpu(1 << 20, 512);
  CHECK(Reg(*v, abi::reg::kId) == abi::kIdMagic);
  CHECK(Reg(*v, abi::reg::kVersion) == abi::kAbiVersion);
  CHECK(Reg(*v, abi::reg::kApertureSizeLo) == (1u << 20));
  CHECK(Reg(*v, abi::reg::kGttEntries) == 512);
  auto r = Wr32(*v, vu::kBar0Region, abi::reg::kId, 1);
  CHECK(r.code() == Errc::kReadOnly);
  CHECK(Reg(*v, abi::reg::kId) == abi::kIdMagic);
  CHECK(Reg(*v, abi::reg::kErrCode) == static_cast<uint32_t>(Errc::kReadOnly));
  CHECK(Reg(*v, abi::reg::kErrSource) == abi::kErrSourceMmio);
  CHECK(Reg(*v, abi::reg::kErrAddrLo) == abi::reg::kId);
  CHECK(Reg(*v, abi::reg::kErrCount) == 1);
  CHECK((Reg(*v, abi::reg::kStatus) & abi::kStatusErrorLatched) != 0);
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kErrClear, 0).ok());
  CHECK(Reg(*v, abi::reg::kErrCode) == 0);
  CHECK(Reg(*v, abi::reg::kErrCount) == 1);  // the count survives a clear
  CHECK(Wr32(*v, vu::kBar0Region, 0x0F0, 1).code() == Errc::kNotFound);
  // Byte and misaligned accesses to registers are refused.
  uint8_t b = 1;
  CHECK(v->RegionWrite(vu::kBar0Region, abi::reg::kScratch, std::as_bytes(std::span(&b, 1))).code() ==
        Errc::kMisaligned);
  CHECK(Wr32(*v, vu::kBar0Region, abi::reg::kScratch + 2, 1).code() == Errc::kMisaligned);
  CHECK(v->Counters().mmio_refusals == 4);
}

TEST_CASE("BAR0: privileged globals are refused or emulated per vGPU") {
  auto a = MakeVgpu();
  auto b = MakeVgpu();
  CHECK(Wr32(*a, vu::kBar0Region, abi::priv::kGlobalReset, 1).code() == Errc::kPrivileged);
  CHECK(Reg(*a, abi::reg::kErrCode) == static_cast<uint32_t>(Errc::kPrivileged));
  CHECK(Reg(*a, abi::reg::kErrAddrLo) == abi::priv::kGlobalReset);
  CHECK(Wr32(*a, vu::kBar0Region, abi::priv::kGlobalGttBaseLo, 0x1000).code() == Errc::kPrivileged);
  CHECK(Wr32(*a, vu::kBar0Region, abi::priv::kPowerGate, 1).code() == Errc::kPrivileged);
  // Emulated: a's clock shadow changes, b's does not.
  REQUIRE(Wr32(*a, vu::kBar0Region, abi::priv::kClockMhz, 333).ok());
  CHECK(Reg(*a, abi::priv::kClockMhz) == 333);
  CHECK(Reg(*b, abi::priv::kClockMhz) == 1000);
  CHECK(Reg(*b, abi::reg::kErrCount) == 0);
}

TEST_CASE("status page is shared memory the device writes") {
  auto v = MakeVgpu();
  Mapping page = MapStatusPage(*v);
  CHECK(At<uint32_t>(page, abi::status::kMagic) == abi::kIdMagic);
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kScratch, 0xC0FFEE).ok());
  CHECK(At<uint32_t>(page, abi::status::kScratch) == 0xC0FFEE);
  CHECK(Wr32(*v, vu::kBar0Region, abi::kStatusPageOffset, 1).code() == Errc::kReadOnly);
  CHECK(Reg(*v, abi::kStatusPageOffset + abi::status::kScratch) == 0xC0FFEE);
}

TEST_CASE("IRQs: test vector fires its eventfd, device mask latches, unmask delivers") {
  auto v = MakeVgpu();
  auto info = v->GetIrqInfo(vu::kIrqMsix);
  REQUIRE(info.ok());
  CHECK(info->count == abi::kNumVectors);
  CHECK(v->GetIrqInfo(vu::kIrqIntx)->count == 0);
  CHECK(v->GetIrqInfo(vu::kIrqReq)->count == 1);  // F8: device request, for a stop
  // ERR is offered (a VMM wires it for error recovery) with one eventfd-capable vector.
  auto err = v->GetIrqInfo(vu::kIrqErr);
  REQUIRE(err.ok());
  CHECK(err->count == 1);
  CHECK((err->flags & vu::kIrqInfoEventfd) != 0);
  auto ev = EventFd::Create();
  REQUIRE(ev.ok());
  std::vector<UniqueFd> fds;
  fds.push_back(UniqueFd());
  fds.push_back(std::move(ev->DupFd()).value());
  vu::SetIrqsArgs args{vu::kIrqSetDataEventfd | vu::kIrqSetActionTrigger, vu::kIrqMsix, 0, 2};
  REQUIRE(v->SetIrqs(args, std::move(fds), {}).ok());
  // PCI: no message before bus mastering and MSI-X are enabled (then nothing is replayed).
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kIrqTest, abi::kVectorError).ok());
  CHECK(ev->Wait(50).code() == Errc::kTimeout);
  REQUIRE(Wr32(*v, vu::kConfigRegion, 0x04, 0x6).ok());
  REQUIRE(Wr32(*v, vu::kConfigRegion, abi::kCapMsixOffset, Cfg32(*v, abi::kCapMsixOffset) | 0x80000000u).ok());
  CHECK(ev->Wait(50).code() == Errc::kTimeout);
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kIrqTest, abi::kVectorError).ok());
  CHECK(ev->Wait(1000).value() == 1);
  CHECK(Reg(*v, abi::reg::kIrqStatus) == (1u << abi::kVectorError));
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kIrqStatus, 1u << abi::kVectorError).ok());
  CHECK(Reg(*v, abi::reg::kIrqStatus) == 0);
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kIrqMask, 1u << abi::kVectorError).ok());
  // A refusal raises the error vector; masked, so nothing arrives yet.
  CHECK(Wr32(*v, vu::kBar0Region, abi::reg::kId, 0).code() == Errc::kReadOnly);
  CHECK(ev->Wait(50).code() == Errc::kTimeout);
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kIrqMask, 0).ok());
  CHECK(ev->Wait(1000).value() == 1);
  CHECK(Wr32(*v, vu::kBar0Region, abi::reg::kIrqTest, 7).code() == Errc::kOutOfBounds);
  CHECK(Wr32(*v, vu::kBar0Region, abi::reg::kIrqMask, 0x100).code() == Errc::kBadFlags);
}

TEST_CASE("F8: REQ fires only with an eventfd, whatever the PCI state; a host reset is the RESET register's") {
  auto v = MakeVgpu();
  CHECK(!v->RequestRelease());  // nobody to ask: a stop need not wait
  auto ev = EventFd::Create();
  REQUIRE(ev.ok());
  std::vector<UniqueFd> fds;
  fds.push_back(std::move(ev->DupFd()).value());
  REQUIRE(v->SetIrqs({vu::kIrqSetDataEventfd | vu::kIrqSetActionTrigger, vu::kIrqReq, 0, 1}, std::move(fds), {}).ok());
  // Bus mastering is off and MSI-X disabled: REQ is not an MSI, it is signalled anyway.
  CHECK(v->RequestRelease());
  CHECK(ev->Wait(1000).value() == 1);
  // A host reset: registers back, PCI state (the command register) kept, counter moved.
  REQUIRE(Wr32(*v, vu::kConfigRegion, 0x04, 0x6).ok());
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kScratch, 0x5EC2E7A5).ok());
  const uint64_t resets = v->Counters().resets;
  REQUIRE(v->HostReset().ok());
  CHECK(Reg(*v, abi::reg::kScratch) == 0);
  CHECK((Cfg32(*v, 0x04) & 0x6) == 0x6);
  CHECK(v->Counters().resets == resets + 1);
  // PCI FLR through the Advanced Features capability (chained after MSI-X): the
  // function-level reset, config space included (the command register clears).
  CHECK((Cfg32(*v, abi::kCapMsixOffset) >> 8 & 0xFF) == abi::kCapAfOffset);
  const uint32_t af = Cfg32(*v, abi::kCapAfOffset);
  CHECK((af & 0xFF) == 0x13);
  CHECK((af >> 24 & 0x2) != 0);  // FLR capable
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kScratch, 0x5EC2E7A5).ok());
  REQUIRE(Wr32(*v, vu::kConfigRegion, abi::kCapAfOffset + 4, 0x1).ok());
  CHECK(Reg(*v, abi::reg::kScratch) == 0);
  CHECK((Cfg32(*v, 0x04) & 0x6) == 0);
  CHECK((Cfg32(*v, abi::kCapAfOffset + 4) & 0xFF) == 0);  // Initiate FLR reads 0
  CHECK(v->Counters().resets == resets + 2);
}

TEST_CASE("ring registers validate and lock while the ring runs") {
  auto v = MakeVgpu();
  CHECK(Wr32(*v, vu::kBar0Region, abi::reg::kCtrl, abi::kCtrlRingEnable).code() == Errc::kBadState);
  CHECK(Wr32(*v, vu::kBar0Region, abi::reg::kRingSize, 3000).code() == Errc::kInvalidArgument);
  CHECK(Wr32(*v, vu::kBar0Region, abi::reg::kRingSize, 2u << 20).code() == Errc::kInvalidArgument);
  CHECK(Wr32(*v, vu::kBar0Region, abi::reg::kRingBaseLo, 0x1234).code() == Errc::kMisaligned);
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kRingSize, 8192).ok());
  REQUIRE(Wr64(*v, vu::kBar0Region, abi::reg::kRingBaseLo, 0x1'0000'2000ull).ok());
  CHECK(Reg(*v, abi::reg::kRingBaseHi) == 1);
  CHECK(Wr32(*v, vu::kBar0Region, abi::reg::kRingTail, 16).code() == Errc::kBadState);
  CHECK(Wr32(*v, vu::kBar0Region, abi::reg::kCtrl, 0x80).code() == Errc::kBadFlags);
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kCtrl, abi::kCtrlRingEnable).ok());
  CHECK((Reg(*v, abi::reg::kStatus) & abi::kStatusRingEnabled) != 0);
  CHECK(Wr32(*v, vu::kBar0Region, abi::reg::kRingSize, 4096).code() == Errc::kBusy);
  CHECK(Wr32(*v, vu::kBar0Region, abi::reg::kRingTail, 8192).code() == Errc::kOutOfBounds);
  CHECK(Wr32(*v, vu::kBar0Region, abi::reg::kRingTail, 6).code() == Errc::kMisaligned);
  // Fetching the ring is DMA: refused by name without bus mastering or in D3hot.
  CHECK(Wr32(*v, vu::kBar0Region, abi::reg::kRingTail, 64).code() == Errc::kDmaDisabled);
  CHECK(Reg(*v, abi::reg::kRingTail) == 0);
  REQUIRE(Wr32(*v, vu::kConfigRegion, 0x04, 0x6).ok());
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kPowerState, 3).ok());
  CHECK(Wr32(*v, vu::kBar0Region, abi::reg::kRingTail, 64).code() == Errc::kDmaDisabled);
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kPowerState, 0).ok());
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kRingTail, 64).ok());
  CHECK(Reg(*v, abi::reg::kRingTail) == 64);
}

TEST_CASE("doorbell ioeventfd is offered on DOORBELL_KICK and counted") {
  auto v = MakeVgpu();
  auto fds = v->GetRegionIoFds(vu::kBar0Region);
  REQUIRE(fds.ok());
  REQUIRE(fds->size() == 1);
  CHECK((*fds)[0].offset == abi::reg::kDoorbellKick);
  CHECK((*fds)[0].fd == &v->doorbell());
  Mapping page = MapStatusPage(*v);
  REQUIRE(v->doorbell().Signal().ok());
  CHECK(v->doorbell().Drain().value() == 1);
  // Both kinds of kick are counted; with the ring disabled both are refused by name.
  v->OnDoorbellKick();
  CHECK(Reg(*v, abi::reg::kErrCode) == static_cast<uint32_t>(Errc::kBadState));
  CHECK(Wr32(*v, vu::kBar0Region, abi::reg::kDoorbellKick, 0).code() == Errc::kBadState);
  CHECK(At<uint64_t>(page, abi::status::kDoorbells) == 2);
  CHECK(v->GetRegionIoFds(vu::kBar2Region)->empty());
  CHECK(v->GetRegionIoFds(99).code() == Errc::kBadRegion);
}

TEST_CASE("region info: sparse status page, mappable aperture, config space") {
  auto v = MakeVgpu(1 << 16);
  auto b0 = v->GetRegionInfo(vu::kBar0Region);
  REQUIRE(b0.ok());
  CHECK(b0->size.v == abi::kBar0Size);
  CHECK(IsPowerOfTwo(b0->size.v));
  CHECK(b0->sparse_areas[0].offset == abi::kStatusPageOffset);
  auto b2 = v->GetRegionInfo(vu::kBar2Region);
  REQUIRE(b2.ok());
  CHECK(b2->size.v == (1u << 16));
  CHECK((b2->flags & vu::kRegionMmap) != 0);
  CHECK(v->GetRegionInfo(vu::kConfigRegion)->size.v == 256);
  CHECK(v->GetRegionInfo(1)->size.v == 0);
  CHECK(v->GetRegionInfo(vu::kNumPciRegions).code() == Errc::kBadRegion);
  // The aperture starts zeroed.
  auto ap = Mapping::Map(*b2->mmap_fd, b2->size, 0);
  REQUIRE(ap.ok());
  for (auto byte : ap->bytes()) REQUIRE(byte == std::byte{0});
}

TEST_CASE("GTT entries are validated against guest memory and the aperture") {
  auto v = MakeVgpu(1 << 16, 64);
  auto ram = CreateMemFd("ram", ByteSize{1 << 20});
  REQUIRE(ram.ok());
  REQUIRE(v->DmaMap({Gpa{0x100000}, ByteSize{1 << 20}, 0, vu::kDmaRead | vu::kDmaWrite}, std::move(ram).value()).ok());
  auto ro = CreateMemFd("ro", ByteSize{0x10000});
  REQUIRE(ro.ok());
  REQUIRE(v->DmaMap({Gpa{0x400000}, ByteSize{0x10000}, 0, vu::kDmaRead}, std::move(ro).value()).ok());
  auto gtt = [](uint32_t i) { return abi::kGttOffset + i * 8; };

  REQUIRE(Wr64(*v, vu::kBar0Region, gtt(0), 0x100000 | abi::kGttValid | abi::kGttWritable).ok());
  CHECK(Rd32(*v, vu::kBar0Region, gtt(0)) == (0x100000 | abi::kGttValid | abi::kGttWritable));
  REQUIRE(Wr64(*v, vu::kBar0Region, gtt(1), 0x1000 | abi::kGttValid | abi::kGttAperture).ok());
  CHECK(Wr64(*v, vu::kBar0Region, gtt(2), 0x900000 | abi::kGttValid).code() == Errc::kNotMapped);
  CHECK(Reg(*v, abi::reg::kErrSource) == abi::kErrSourceGtt);
  CHECK(Reg(*v, abi::reg::kErrAddrLo) == 0x900000);
  CHECK(Wr64(*v, vu::kBar0Region, gtt(2), 0x100000 | abi::kGttValid | 0x10).code() == Errc::kBadFlags);
  CHECK(Wr64(*v, vu::kBar0Region, gtt(2), 0x400000 | abi::kGttValid | abi::kGttWritable).code() ==
        Errc::kAccessDenied);
  REQUIRE(Wr64(*v, vu::kBar0Region, gtt(2), 0x400000 | abi::kGttValid).ok());
  CHECK(Wr64(*v, vu::kBar0Region, gtt(3), 0x10000 | abi::kGttValid | abi::kGttAperture).code() ==
        Errc::kOutOfBounds);
  CHECK(Wr64(*v, vu::kBar0Region, gtt(64), 0).code() == Errc::kNotFound);  // past GTT_ENTRIES: in no BAR0 row
  CHECK(v->RegionWrite(vu::kBar0Region, gtt(4) + 2, std::as_bytes(std::span("ab", 2))).code() == Errc::kMisaligned);
  // 32-bit halves: low latches, high commits.
  REQUIRE(Wr32(*v, vu::kBar0Region, gtt(5), 0x101000 | abi::kGttValid).ok());
  CHECK(Rd32(*v, vu::kBar0Region, gtt(5)) == 0);
  REQUIRE(Wr32(*v, vu::kBar0Region, gtt(5) + 4, 0).ok());
  CHECK(Rd32(*v, vu::kBar0Region, gtt(5)) == (0x101000 | abi::kGttValid));
  // DMA_UNMAP invalidates every entry into the range: no translation outlives its mapping.
  REQUIRE(v->DmaUnmap({Gpa{0x100000}, ByteSize{1 << 20}, 0}).ok());
  CHECK(Rd32(*v, vu::kBar0Region, gtt(0)) == 0);
  CHECK(Rd32(*v, vu::kBar0Region, gtt(5)) == 0);
  CHECK(Rd32(*v, vu::kBar0Region, gtt(1)) == (0x1000 | abi::kGttValid | abi::kGttAperture));
  CHECK(Rd32(*v, vu::kBar0Region, gtt(2)) == (0x400000 | abi::kGttValid));
}

TEST_CASE("reset scrubs the aperture and returns registers to creation state") {
  auto v = MakeVgpu(1 << 16);
  auto b2 = v->GetRegionInfo(vu::kBar2Region);
  auto ap = Mapping::Map(*b2->mmap_fd, b2->size, 0);
  REQUIRE(ap.ok());
  std::memset(ap->data(), 0xAB, ap->size().v);
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kScratch, 5).ok());
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::kGttOffset + 0, 0).ok());
  Mapping page = MapStatusPage(*v);
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kReset, 2).code() == Errc::kInvalidArgument);
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kReset, abi::kResetMagic).ok());
  for (auto byte : ap->bytes()) REQUIRE(byte == std::byte{0});
  CHECK(Reg(*v, abi::reg::kScratch) == 0);
  CHECK(Reg(*v, abi::reg::kErrCount) == 0);
  CHECK(At<uint32_t>(page, abi::status::kResets) == 1);
  CHECK(v->Counters().resets == 1);
}

TEST_CASE("snapshot, modify, restore: the device state comes back exactly") {
  auto v = MakeVgpu(1 << 16, 32);
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kScratch, 77).ok());
  REQUIRE(Wr64(*v, vu::kBar0Region, abi::kGttOffset + 8, 0x2000 | abi::kGttValid | abi::kGttAperture).ok());
  REQUIRE(v->RegionWrite(vu::kBar2Region, 100, std::as_bytes(std::span("payload", 7))).ok());
  REQUIRE(Wr32(*v, vu::kConfigRegion, 0x04, 0x6).ok());
  DeviceSnapshot before = v->Snapshot();

  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kScratch, 78).ok());
  REQUIRE(Wr64(*v, vu::kBar0Region, abi::kGttOffset + 8, 0).ok());
  REQUIRE(v->RegionWrite(vu::kBar2Region, 100, std::as_bytes(std::span("PAYLOAD", 7))).ok());
  REQUIRE(Wr32(*v, vu::kConfigRegion, 0x04, 0x0).ok());
  CHECK_FALSE(v->Snapshot() == before);

  REQUIRE(v->Restore(before).ok());
  CHECK(v->Snapshot() == before);
  CHECK(Reg(*v, abi::reg::kScratch) == 77);

  DeviceSnapshot bad = before;
  bad.gtt.pop_back();
  CHECK(v->Restore(bad).code() == Errc::kInvalidArgument);
  CHECK(v->Snapshot() == before);  // a refused restore changes nothing
}

TEST_CASE("BAR0 page table: an access in no row reads 0 at any width and refuses writes") {
  auto v = MakeVgpu(1 << 16, 32);
  const uint64_t gtt_end = abi::kGttOffset + 32 * 8;
  for (uint64_t off : {uint64_t{abi::kMsixTableOffset + abi::kNumVectors * 16}, uint64_t{0x3100}, uint64_t{0x37F8}, uint64_t{0x3808}, uint64_t{0x3FFC},
                       uint64_t{0x4000}, uint64_t{0xFFFF8}, gtt_end, uint64_t{abi::kBar0Size - 8}}) {
    CAPTURE(off);
    for (size_t width : {1, 4, 8, 64}) {
      if (off + width > abi::kBar0Size) continue;
      std::vector<std::byte> out(width, std::byte{0xA5});
      REQUIRE(v->RegionRead(vu::kBar0Region, off, out).ok());
      for (std::byte b : out) CHECK(b == std::byte{0});
    }
    CHECK(Wr32(*v, vu::kBar0Region, off, 1).code() == Errc::kNotFound);
  }
  // A refused privileged global has no storage and reads 0.
  CHECK(Reg(*v, abi::priv::kGlobalReset) == 0);
  CHECK(Reg(*v, abi::priv::kGlobalGttBaseHi) == 0);
  // Straddling the end of the MSI-X table, or of the GTT: in no row.
  uint64_t q = ~0ull;
  REQUIRE(v->RegionRead(vu::kBar0Region, abi::kMsixTableOffset + abi::kNumVectors * 16 - 4, std::as_writable_bytes(std::span(&q, 1))).ok());
  CHECK(q == 0);
  q = ~0ull;
  REQUIRE(v->RegionRead(vu::kBar0Region, gtt_end - 4, std::as_writable_bytes(std::span(&q, 1))).ok());
  CHECK(q == 0);
  // Inside the rows the handlers still answer: the table, the PBA (read-only), the GTT.
  CHECK(Reg(*v, abi::kMsixTableOffset + 12) == 1);  // vector 0 starts masked
  CHECK(Wr32(*v, vu::kBar0Region, abi::kMsixPbaOffset, 1).code() == Errc::kReadOnly);
  REQUIRE(Wr64(*v, vu::kBar0Region, gtt_end - 8, 0x1000 | abi::kGttValid | abi::kGttAperture).ok());
}

TEST_CASE("MSI-X: a masked vector sets its PBA bit and is sent on unmask; the function mask too") {
  auto v = MakeVgpu();
  auto ev = EventFd::Create().value();
  std::vector<UniqueFd> fds;
  fds.push_back(std::move(ev.DupFd()).value());
  REQUIRE(v->SetIrqs({vu::kIrqSetDataEventfd | vu::kIrqSetActionTrigger, vu::kIrqMsix, 0, 1}, std::move(fds), {}).ok());
  CHECK(Reg(*v, abi::kMsixTableOffset + 12) == 0);  // assigning the trigger unmasked the entry
  REQUIRE(Wr32(*v, vu::kConfigRegion, 0x04, 0x6).ok());
  uint32_t ctrl = Cfg32(*v, abi::kCapMsixOffset) | 0x80000000u;
  REQUIRE(Wr32(*v, vu::kConfigRegion, abi::kCapMsixOffset, ctrl).ok());
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::kMsixTableOffset + 12, 1).ok());
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kIrqTest, 0).ok());
  CHECK(ev.Wait(50).code() == Errc::kTimeout);
  CHECK(Reg(*v, abi::kMsixPbaOffset) == 1);
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::kMsixTableOffset + 12, 0).ok());
  CHECK(ev.Wait(1000).value() == 1);
  CHECK(Reg(*v, abi::kMsixPbaOffset) == 0);
  REQUIRE(Wr32(*v, vu::kConfigRegion, abi::kCapMsixOffset, ctrl | 0x40000000u).ok());
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kIrqTest, 0).ok());
  CHECK(ev.Wait(50).code() == Errc::kTimeout);
  CHECK(Reg(*v, abi::kMsixPbaOffset) == 1);
  REQUIRE(Wr32(*v, vu::kConfigRegion, abi::kCapMsixOffset, ctrl).ok());
  CHECK(ev.Wait(1000).value() == 1);
  // D3hot: dropped, not pending.
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kPowerState, 3).ok());
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kIrqTest, 0).ok());
  CHECK(ev.Wait(50).code() == Errc::kTimeout);
  CHECK(Reg(*v, abi::kMsixPbaOffset) == 0);
  // The table is PCI function state: RESET keeps it, a function-level reset masks it again.
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kReset, abi::kResetMagic).ok());
  CHECK(Reg(*v, abi::kMsixTableOffset + 12) == 0);
  REQUIRE(v->Reset().ok());
  CHECK(Reg(*v, abi::kMsixTableOffset + 12) == 1);
  CHECK((Cfg32(*v, abi::kCapMsixOffset) & 0x80000000u) == 0);
  // SET_IRQS takes eventfds only.
  int p[2];
  REQUIRE(::pipe(p) == 0);
  std::vector<UniqueFd> bad;
  bad.emplace_back(p[1]);
  UniqueFd keep(p[0]);
  CHECK(v->SetIrqs({vu::kIrqSetDataEventfd | vu::kIrqSetActionTrigger, vu::kIrqMsix, 1, 1}, std::move(bad), {}).code() ==
        Errc::kNotEventFd);
}

TEST_CASE("the GTT latch does not survive a reset, a restore or a disconnect") {
  auto v = MakeVgpu(1 << 16, 32);
  const uint32_t lo = 0x2000 | abi::kGttValid | abi::kGttAperture;
  DeviceSnapshot clean = v->Snapshot();
  for (int path = 0; path < 4; ++path) {
    CAPTURE(path);
    REQUIRE(Wr32(*v, vu::kBar0Region, abi::kGttOffset + 8, lo).ok());  // latched
    if (path == 0) REQUIRE(Wr32(*v, vu::kBar0Region, abi::reg::kReset, abi::kResetMagic).ok());
    if (path == 1) REQUIRE(v->Reset().ok());
    if (path == 2) REQUIRE(v->Restore(clean).ok());
    if (path == 3) v->OnDisconnect();
    REQUIRE(Wr32(*v, vu::kBar0Region, abi::kGttOffset + 12, 0).ok());  // commits the pair
    uint64_t e = ~0ull;
    REQUIRE(v->RegionRead(vu::kBar0Region, abi::kGttOffset + 8, std::as_writable_bytes(std::span(&e, 1))).ok());
    CHECK(e == 0);
  }
  // Without a reset in between the latch still works.
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::kGttOffset + 8, lo).ok());
  REQUIRE(Wr32(*v, vu::kBar0Region, abi::kGttOffset + 12, 0).ok());
  CHECK(Reg(*v, abi::kGttOffset + 8) == lo);
}

// --- GTT batch (docs/device-spec.md §GTT batch) ---
namespace {
struct BatchRig {
  static constexpr uint64_t kRam = 0x100000, kRamSize = 1 << 20, kRo = 0x400000, kArray = kRam + 0x80000;
  std::unique_ptr<Vgpu> v = MakeVgpu(1 << 16, 64);
  Mapping ram;
  BatchRig() {
    auto fd = CreateMemFd("ram", ByteSize{kRamSize});
    REQUIRE(fd.ok());
    auto m = Mapping::Map(*fd, ByteSize{kRamSize}, 0);
    REQUIRE(m.ok());
    ram = std::move(m).value();
    REQUIRE(v->DmaMap({Gpa{kRam}, ByteSize{kRamSize}, 0, vu::kDmaRead | vu::kDmaWrite}, std::move(fd).value()).ok());
    auto ro = CreateMemFd("ro", ByteSize{0x10000});
    REQUIRE(ro.ok());
    REQUIRE(v->DmaMap({Gpa{kRo}, ByteSize{0x10000}, 0, vu::kDmaRead}, std::move(ro).value()).ok());
    REQUIRE(Wr32(*v, vu::kConfigRegion, 0x04, 0x6).ok());  // memory + bus master: the array is read by DMA
    REQUIRE(Wr64(*v, vu::kBar0Region, abi::reg::kGttBatchAddrLo, kArray).ok());
  }
  abi::GttBatchRecord* array(uint64_t gpa = kArray) {
    return reinterpret_cast<abi::GttBatchRecord*>(ram.data() + (gpa - kRam));
  }
  void Put(std::vector<abi::GttBatchRecord> recs, uint64_t gpa = kArray) {
    std::memcpy(static_cast<void*>(array(gpa)), recs.data(), recs.size() * sizeof recs[0]);
  }
  Result<> Go(uint32_t n) { return Wr32(*v, vu::kBar0Region, abi::reg::kGttBatchGo, n); }
  uint64_t Entry(uint32_t i) {
    uint64_t e = 0;
    REQUIRE(v->RegionRead(vu::kBar0Region, abi::kGttOffset + i * 8, std::as_writable_bytes(std::span(&e, 1))).ok());
    return e;
  }
  std::vector<uint64_t> Gtt() {
    std::vector<uint64_t> g;
    for (uint32_t i = 0; i < 64; ++i) g.push_back(Entry(i));
    return g;
  }
};
constexpr uint64_t kV = abi::kGttValid, kW = abi::kGttWritable, kAp = abi::kGttAperture;
}  // namespace

TEST_CASE("GTT batch: offered in CAPS; applied in order, all of it") {
  BatchRig r;
  CHECK((Reg(*r.v, abi::reg::kCaps) & abi::kCapGttBatch) != 0);
  CHECK(Reg(*r.v, abi::reg::kGttBatchAddrLo) == BatchRig::kArray);
  r.Put({{0, 0, 0x101000 | kV | kW}, {1, 0, 0x2000 | kV | kAp}, {2, 0, BatchRig::kRo | kV}, {0, 0, 0x102000 | kV}});
  REQUIRE(r.Go(4).ok());
  CHECK(r.Entry(0) == (0x102000 | kV));  // in order: the later record for the same entry wins
  CHECK(r.Entry(1) == (0x2000 | kV | kAp));
  CHECK(r.Entry(2) == (BatchRig::kRo | kV));
  CHECK(Reg(*r.v, abi::reg::kErrCount) == 0);
  // Entries written as 0 unmap.
  r.Put({{0, 0, 0}, {1, 0, 0}});
  REQUIRE(r.Go(2).ok());
  CHECK(r.Entry(0) == 0);
  CHECK(r.Entry(1) == 0);
}

TEST_CASE("GTT batch: one bad record anywhere and nothing changes; the report names the record") {
  BatchRig r;
  REQUIRE(Wr64(*r.v, vu::kBar0Region, abi::kGttOffset + 8 * 3, 0x103000 | kV).ok());
  const std::vector<uint64_t> before = r.Gtt();
  struct Bad {
    abi::GttBatchRecord rec;
    Errc code;
  };
  const Bad bads[] = {
      {{5, 0, 0x900000 | kV}, Errc::kNotMapped},                   // not this guest's memory
      {{5, 0, BatchRig::kRo | kV | kW}, Errc::kAccessDenied},      // writable into a read-only region
      {{5, 0, 0x101000 | kV | 0x10}, Errc::kBadFlags},             // reserved bits
      {{5, 0, 0x101000}, Errc::kBadFlags},                         // invalid but not 0
      {{5, 0, 0x10000 | kV | kAp}, Errc::kOutOfBounds},            // past the aperture
      {{64, 0, 0x101000 | kV}, Errc::kOutOfBounds},                // index past GTT_ENTRIES
      {{5, 7, 0x101000 | kV}, Errc::kInvalidArgument},             // pad not 0
  };
  uint32_t errs = 0;
  for (const Bad& b : bads) {
    CAPTURE(static_cast<int>(b.code));
    std::vector<abi::GttBatchRecord> recs;
    for (uint32_t i = 0; i < 10; ++i) recs.push_back({i, 0, (0x110000 + i * 0x1000) | kV | kW});
    recs[6] = b.rec;  // in the middle: the five before it were valid
    r.Put(recs);
    CHECK(r.Go(10).code() == b.code);
    CHECK(r.Gtt() == before);
    CHECK(Reg(*r.v, abi::reg::kErrCode) == static_cast<uint32_t>(b.code));
    CHECK(Reg(*r.v, abi::reg::kErrSource) == abi::kErrSourceGttBatch);
    CHECK(Reg(*r.v, abi::reg::kErrInfo) == 6);
    CHECK(Reg(*r.v, abi::reg::kErrAddrLo) == static_cast<uint32_t>(b.rec.entry & ~abi::kGttFlagMask));
    CHECK(Reg(*r.v, abi::reg::kErrCount) == ++errs);
  }
}

TEST_CASE("GTT batch: the array itself is checked: count, alignment, memory, DMA") {
  BatchRig r;
  const std::vector<uint64_t> before = r.Gtt();
  auto whole = [&](Result<> res, Errc code) {
    CHECK(res.code() == code);
    CHECK(Reg(*r.v, abi::reg::kErrCode) == static_cast<uint32_t>(code));
    CHECK(Reg(*r.v, abi::reg::kErrSource) == abi::kErrSourceGttBatch);
    CHECK(Reg(*r.v, abi::reg::kErrInfo) == abi::kGttBatchWhole);
    CHECK(r.Gtt() == before);
  };
  std::vector<abi::GttBatchRecord> good(4096, abi::GttBatchRecord{7, 0, 0x101000 | kV});
  r.Put(good);
  whole(r.Go(0), Errc::kInvalidArgument);
  whole(r.Go(abi::kGttBatchMaxRecords + 1), Errc::kLimitExceeded);
  whole(r.Go(UINT32_MAX), Errc::kLimitExceeded);
  // Misaligned address: refused at the address write, the old one stays.
  CHECK(Wr32(*r.v, vu::kBar0Region, abi::reg::kGttBatchAddrLo, BatchRig::kArray + 8).code() == Errc::kMisaligned);
  CHECK(Reg(*r.v, abi::reg::kGttBatchAddrLo) == BatchRig::kArray);
  // Memory this guest did not map.
  REQUIRE(Wr64(*r.v, vu::kBar0Region, abi::reg::kGttBatchAddrLo, 0x800000).ok());
  whole(r.Go(1), Errc::kNotMapped);
  CHECK(Reg(*r.v, abi::reg::kErrAddrLo) == 0x800000);
  // An array that runs off the end of its DMA region.
  const uint64_t tail = BatchRig::kRam + BatchRig::kRamSize - 16;
  r.Put({{7, 0, 0x101000 | kV}}, tail);
  REQUIRE(Wr64(*r.v, vu::kBar0Region, abi::reg::kGttBatchAddrLo, tail).ok());
  REQUIRE(r.Go(1).ok());  // the last record of the region is fine
  REQUIRE(Wr64(*r.v, vu::kBar0Region, abi::kGttOffset + 7 * 8, 0).ok());
  whole(r.Go(2), Errc::kNotMapped);
  // An address whose array would wrap around.
  REQUIRE(Wr64(*r.v, vu::kBar0Region, abi::reg::kGttBatchAddrLo, ~uint64_t{0xF}).ok());
  CHECK(r.Go(2).code() != Errc::kOk);
  CHECK(r.Gtt() == before);
  // Without bus mastering the function does no DMA.
  REQUIRE(Wr64(*r.v, vu::kBar0Region, abi::reg::kGttBatchAddrLo, BatchRig::kArray).ok());
  REQUIRE(Wr32(*r.v, vu::kConfigRegion, 0x04, 0x2).ok());
  whole(r.Go(1), Errc::kDmaDisabled);
  REQUIRE(Wr32(*r.v, vu::kConfigRegion, 0x04, 0x6).ok());
  // Memory shared without an fd would need a DMA_READ round trip: refused, never waited for.
  REQUIRE(r.v->DmaMap({Gpa{0x600000}, ByteSize{0x10000}, 0, vu::kDmaRead | vu::kDmaWrite}, UniqueFd{}).ok());
  REQUIRE(Wr64(*r.v, vu::kBar0Region, abi::reg::kGttBatchAddrLo, 0x600000).ok());
  whole(r.Go(1), Errc::kWouldBlock);
  // A reset returns the address to 0.
  REQUIRE(Wr32(*r.v, vu::kBar0Region, abi::reg::kReset, abi::kResetMagic).ok());
  CHECK(Reg(*r.v, abi::reg::kGttBatchAddrLo) == 0);
}

TEST_CASE("GTT batch: copied once; rewriting the array after or during GO changes nothing unchecked") {
  BatchRig r;
  r.Put({{0, 0, 0x101000 | kV}, {1, 0, 0x102000 | kV}});
  REQUIRE(r.Go(2).ok());
  // After GO: the device kept no pointer into the array.
  r.Put({{0, 0, 0x900000 | kV}, {1, 0, 0x105000 | kV}});
  CHECK(r.Entry(0) == (0x101000 | kV));
  CHECK(r.Entry(1) == (0x102000 | kV));
  // During GO: another thread flips a record between a valid entry and one into memory the
  // guest never mapped. Whatever the copy caught, only a checked copy is applied: the GTT
  // never holds the unmapped page, and a GO either applies the valid one or refuses.
  auto* rec = r.array();
  rec[0] = {0, 0, 0x101000 | kV};
  rec[1] = {1, 0, 0x102000 | kV};
  std::atomic<bool> stop{false};
  std::thread flipper([&] {
    uint64_t* e = &rec[1].entry;
    for (uint64_t i = 0; !stop.load(std::memory_order_relaxed); ++i)
      __atomic_store_n(e, (i & 1) ? (0x900000 | kV) : (0x102000 | kV), __ATOMIC_RELAXED);
  });
  int applied = 0, refused = 0;
  for (int i = 0; i < 2000; ++i) {
    Result<> g = r.Go(2);
    if (g.ok()) {
      ++applied;
    } else {
      CHECK(g.code() == Errc::kNotMapped);
      CHECK(Reg(*r.v, abi::reg::kErrInfo) == 1);
      ++refused;
    }
    CHECK(r.Entry(1) == (0x102000 | kV));
  }
  stop = true;
  flipper.join();
  CHECK(applied + refused == 2000);
}

TEST_CASE("GTT batch: another vGPU's memory is not this one's, as array or as target") {
  BatchRig a;
  auto b = MakeVgpu(1 << 16, 64);
  auto fd = CreateMemFd("b-ram", ByteSize{1 << 20});
  REQUIRE(fd.ok());
  auto bmap = Mapping::Map(*fd, ByteSize{1 << 20}, 0);
  REQUIRE(bmap.ok());
  REQUIRE(b->DmaMap({Gpa{0x2000000}, ByteSize{1 << 20}, 0, vu::kDmaRead | vu::kDmaWrite}, std::move(fd).value()).ok());
  abi::GttBatchRecord valid{0, 0, 0x101000 | kV};
  std::memcpy(bmap->data(), &valid, sizeof valid);
  // The array at an address only B mapped.
  REQUIRE(Wr64(*a.v, vu::kBar0Region, abi::reg::kGttBatchAddrLo, 0x2000000).ok());
  CHECK(a.Go(1).code() == Errc::kNotMapped);
  CHECK(a.Entry(0) == 0);
  // A record whose page only B mapped.
  REQUIRE(Wr64(*a.v, vu::kBar0Region, abi::reg::kGttBatchAddrLo, BatchRig::kArray).ok());
  a.Put({{0, 0, 0x101000 | kV}, {1, 0, 0x2000000 | kV}});
  CHECK(a.Go(2).code() == Errc::kNotMapped);
  CHECK(Reg(*a.v, abi::reg::kErrInfo) == 1);
  CHECK(a.Entry(0) == 0);
  CHECK(Reg(*b, abi::reg::kErrCount) == 0);
}

TEST_CASE("GTT batch registers survive a snapshot and restore") {
  BatchRig r;
  DeviceSnapshot s = r.v->Snapshot();
  REQUIRE(Wr64(*r.v, vu::kBar0Region, abi::reg::kGttBatchAddrLo, 0x200000).ok());
  REQUIRE(r.v->Restore(s).ok());
  CHECK(Reg(*r.v, abi::reg::kGttBatchAddrLo) == BatchRig::kArray);
}
