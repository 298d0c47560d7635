#pragma once
// The contract between the vfio-user protocol layer (vfio_user/) and a device model
// (mediator/). The protocol layer validates every message's framing and payload sizes,
// then calls exactly one of these methods with already-parsed arguments. A device never
// sees raw message bytes; the protocol layer never sees device state (STYLE.md §2,
// libvfio-user's split of transport, protocol and device).

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "base/base.h"

namespace vg::vfio_user {

// VFIO PCI region and IRQ indices (linux/vfio.h), which vfio-user reuses.
inline constexpr uint32_t kBar0Region = 0;
inline constexpr uint32_t kBar2Region = 2;
inline constexpr uint32_t kRomRegion = 6;
inline constexpr uint32_t kConfigRegion = 7;
inline constexpr uint32_t kVgaRegion = 8;
inline constexpr uint32_t kNumPciRegions = 9;

inline constexpr uint32_t kIrqIntx = 0;
inline constexpr uint32_t kIrqMsi = 1;
inline constexpr uint32_t kIrqMsix = 2;
inline constexpr uint32_t kIrqErr = 3;
inline constexpr uint32_t kIrqReq = 4;
inline constexpr uint32_t kNumPciIrqs = 5;

// VFIO_REGION_INFO_FLAG_*
inline constexpr uint32_t kRegionRead = 1u << 0;
inline constexpr uint32_t kRegionWrite = 1u << 1;
inline constexpr uint32_t kRegionMmap = 1u << 2;
inline constexpr uint32_t kRegionCaps = 1u << 3;

// VFIO_DEVICE_FLAGS_*
inline constexpr uint32_t kDeviceFlagReset = 1u << 0;
inline constexpr uint32_t kDeviceFlagPci = 1u << 1;

// VFIO_IRQ_INFO_*
inline constexpr uint32_t kIrqInfoEventfd = 1u << 0;
inline constexpr uint32_t kIrqInfoMaskable = 1u << 1;
inline constexpr uint32_t kIrqInfoAutomasked = 1u << 2;
inline constexpr uint32_t kIrqInfoNoresize = 1u << 3;

// VFIO_IRQ_SET_*
inline constexpr uint32_t kIrqSetDataNone = 1u << 0;
inline constexpr uint32_t kIrqSetDataBool = 1u << 1;
inline constexpr uint32_t kIrqSetDataEventfd = 1u << 2;
inline constexpr uint32_t kIrqSetActionMask = 1u << 3;
inline constexpr uint32_t kIrqSetActionUnmask = 1u << 4;
inline constexpr uint32_t kIrqSetActionTrigger = 1u << 5;

// vfio-user DMA_MAP flags
inline constexpr uint32_t kDmaRead = 1u << 0;
inline constexpr uint32_t kDmaWrite = 1u << 1;

struct SparseArea {
  uint64_t offset = 0;  // inside the region
  uint64_t size = 0;
};

struct RegionInfo {
  uint32_t flags = 0;  // kRegion*
  ByteSize size{0};
  // Parts of the region the client may mmap with no trap (sparse-mmap capability).
  // Empty with kRegionMmap set means the whole region is mappable.
  std::vector<SparseArea> sparse_areas;
  // Borrowed fd sent with the reply when the region has mappable parts. Offsets inside
  // the region equal offsets inside this fd plus fd_offset.
  const UniqueFd* mmap_fd = nullptr;
  uint64_t fd_offset = 0;
};

// One ioeventfd offered by DEVICE_GET_REGION_IO_FDS (sub-region type 0: plain eventfd).
struct IoFd {
  uint64_t offset = 0;
  uint64_t size = 0;  // access width in bytes
  uint32_t flags = 0; // bit 0: datamatch valid
  uint64_t datamatch = 0;
  const EventFd* fd = nullptr;  // borrowed; the protocol layer dups it into the reply
};

struct IrqInfo {
  uint32_t flags = 0;  // kIrqInfo*
  uint32_t count = 0;
};

struct SetIrqsArgs {
  uint32_t flags = 0;  // exactly one kIrqSetData* and one kIrqSetAction*
  uint32_t index = 0;
  uint32_t start = 0;
  uint32_t count = 0;
};

struct DmaMapArgs {
  Gpa iova{0};
  ByteSize size{0};
  uint64_t fd_offset = 0;
  uint32_t prot = 0;  // kDmaRead | kDmaWrite
};

struct DmaUnmapArgs {
  Gpa iova{0};
  ByteSize size{0};
  uint32_t flags = 0;
};

class DmaMessenger;

// What a DMA_UNMAP leaves behind: the regions it removed from translation (at once, so no
// new work can start on them) that work already in flight still uses. The daemon's mapping
// of a region, and its charge against the client's DMA quota, end with its last use; the
// server replies to the DMA_UNMAP when Idle(), from the event loop, which never waits for it.
class DmaDrain {
 public:
  DmaDrain() = default;
  explicit DmaDrain(std::vector<std::weak_ptr<const void>> regions) : regions_(std::move(regions)) {}
  bool Idle() const {
    for (const auto& r : regions_)
      if (!r.expired()) return false;
    return true;
  }
  size_t Busy() const {
    size_t n = 0;
    for (const auto& r : regions_) n += !r.expired();
    return n;
  }

 private:
  std::vector<std::weak_ptr<const void>> regions_;
};

class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;

  // A client connected. `messenger` (valid until OnDisconnect) sends DMA_READ/DMA_WRITE to
  // that client, for memory it shared without an fd.
  virtual void OnConnect(DmaMessenger* messenger) = 0;

  virtual uint32_t DeviceFlags() const { return kDeviceFlagPci | kDeviceFlagReset; }
  virtual uint32_t NumRegions() const { return kNumPciRegions; }
  virtual uint32_t NumIrqs() const { return kNumPciIrqs; }

  virtual Result<RegionInfo> GetRegionInfo(uint32_t index) = 0;
  virtual Result<std::vector<IoFd>> GetRegionIoFds(uint32_t index) = 0;
  virtual Result<IrqInfo> GetIrqInfo(uint32_t index) = 0;
  // fds: one per vector for kIrqSetDataEventfd (an fd of -1 in the message arrives as an
  // invalid UniqueFd and means "de-assign"); bools: one per vector for kIrqSetDataBool.
  virtual Result<> SetIrqs(const SetIrqsArgs& args, std::vector<UniqueFd> fds, std::span<const uint8_t> bools) = 0;

  // offset/size already checked against GetRegionInfo(index).size.
  virtual Result<> RegionRead(uint32_t index, uint64_t offset, std::span<std::byte> out) = 0;
  virtual Result<> RegionWrite(uint32_t index, uint64_t offset, std::span<const std::byte> data) = 0;

  // fd is invalid when the client shares memory without an fd (DMA_READ/DMA_WRITE then).
  virtual Result<> DmaMap(const DmaMapArgs& args, UniqueFd fd) = 0;
  // Removes the range from translation at once and never waits: the drain says when the
  // work still using it has ended.
  virtual Result<DmaDrain> DmaUnmap(const DmaUnmapArgs& args) = 0;

  virtual Result<> Reset() = 0;

  // The client went away: drop DMA mappings and IRQ eventfds, keep device state for the
  // next connection (vfio-user spec, "Disconnect").
  virtual void OnDisconnect() = 0;
};

}  // namespace vg::vfio_user
