#pragma once
// Guest memory as the device sees it: the regions a client registered with DMA_MAP.
// Every access is bounds-checked and copies (copy, then check, then use); zero-copy users
// take a Pin, which keeps the daemon's mapping alive while engine work uses it
// (the pin -> map -> unmap -> invalidate contract of IOMMU-backed DMA).

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <vector>

#include "base/base.h"
#include "vfio_user/device.h"

namespace vg::vfio_user {

// Bounds on what one client may map into the daemon (docs/device-spec.md, "Guest memory:
// bounds and blocking"). A region is charged from DMA_MAP until its last use ends, not
// until DMA_UNMAP: work in flight keeps the mapping, so it keeps the charge.
struct DmaLimits {
  uint32_t max_regions = 1024;       // regions, fd-backed or not, including ones still draining
  uint64_t max_bytes = 4ull << 40;   // bytes of fd-backed regions mapped into the daemon
};

// The process-wide bound on guest memory mapped into the daemon, all clients together, so
// that sparse files cannot exhaust the daemon's address space (x86-64 user space is 128 TiB;
// the engine, heaps and stacks need the rest).
class DmaBudget {
 public:
  static constexpr uint64_t kDefaultTotal = 32ull << 40;
  static void SetTotal(uint64_t bytes);
  static uint64_t Total();
  static uint64_t Used();
  // False when `bytes` more would pass the total.
  static bool TryCharge(uint64_t bytes);
  static void Release(uint64_t bytes);
};

// Whether a copy may wait on the client (DMA_READ/DMA_WRITE for memory without an fd). The
// event loop never may: there such a copy is refused with kWouldBlock.
enum class DmaWait : uint8_t { kMayWait, kNever };

// Sends server-initiated DMA_READ/DMA_WRITE to the client (for memory without an fd).
// Implemented by the server session; thread-safe; each call is one request/reply.
class DmaMessenger {
 public:
  virtual ~DmaMessenger() = default;
  virtual Result<> DmaRead(Gpa addr, std::span<std::byte> out) = 0;
  virtual Result<> DmaWrite(Gpa addr, std::span<const std::byte> data) = 0;
};

struct DmaRegion;  // internal
struct DmaLedger;  // internal: one client's charges, shared with its regions (they may outlive the space)

// A host view of guest memory [gpa, gpa+size) inside one fd-backed region. Keeps the
// region's mapping alive; a DMA_UNMAP of that region is answered once every Pin is gone.
class Pin {
 public:
  Pin() = default;
  ~Pin();
  Pin(Pin&&) noexcept;
  Pin& operator=(Pin&&) noexcept;
  Pin(const Pin&) = delete;
  Pin& operator=(const Pin&) = delete;

  std::span<std::byte> bytes() const { return bytes_; }
  Gpa gpa() const { return gpa_; }
  // False once the region was removed from translation (DMA_UNMAP, disconnect): a cache of
  // translations must not hand this pin to new work (the memory is still mapped for work
  // that holds it, but the guest may already have put other memory at that address).
  bool Live() const;

 private:
  friend class DmaSpace;
  std::shared_ptr<DmaRegion> region_;
  std::span<std::byte> bytes_;
  Gpa gpa_{0};
};

class DmaSpace {
 public:
  DmaSpace();
  ~DmaSpace();
  DmaSpace(const DmaSpace&) = delete;
  DmaSpace& operator=(const DmaSpace&) = delete;

  void SetMessenger(DmaMessenger* m);  // nullptr on disconnect
  void SetLimits(const DmaLimits& l);
  const DmaLimits& limits() const { return limits_; }

  // Refuses zero size (kInvalidArgument), non-page-aligned iova/size/offset (kMisaligned),
  // wrap-around (kOutOfBounds), overlap with an existing region (kOverlap), unknown prot
  // bits (kBadFlags), an fd that cannot be mapped (kIo), an fd that is not sealed (or
  // sealable) against shrinking (kUnsupported: a client that truncates it would turn the
  // daemon's next access into SIGBUS), more regions or bytes than the limits or the
  // process-wide DmaBudget allow (kLimitExceeded).
  Result<> Map(const DmaMapArgs& args, UniqueFd fd);
  // The range must equal one mapped region exactly (kNotFound otherwise). Removes it from
  // translation at once and never waits; the drain says when the last use has ended.
  Result<DmaDrain> Unmap(const DmaUnmapArgs& args);
  void Clear();  // disconnect: forget every region (pins keep their mapping alive)

  // Copies out of / into guest memory. The range may span several adjacent regions.
  // kNotMapped when any byte is not mapped, kAccessDenied without the needed prot,
  // kWouldBlock with DmaWait::kNever when a byte lies in memory shared without an fd.
  Result<> Read(Gpa addr, std::span<std::byte> out, DmaWait wait = DmaWait::kMayWait) const;
  Result<> Write(Gpa addr, std::span<const std::byte> data, DmaWait wait = DmaWait::kMayWait) const;
  template <class T>
    requires std::is_trivially_copyable_v<T>
  Result<T> ReadObj(Gpa addr) const {
    T v;
    VG_TRY(Read(addr, std::as_writable_bytes(std::span(&v, 1))));
    return v;
  }

  // Zero-copy view: the whole range must lie inside one fd-backed region with `prot`.
  Result<Pin> PinRange(Gpa addr, ByteSize size, uint32_t prot) const;

  // True when [addr, addr+size) is fully mapped (any backing) with `prot`.
  bool Contains(Gpa addr, ByteSize size, uint32_t prot) const;
  // True when it is, and every byte lies in fd-backed memory: a copy there is a memcpy,
  // never a DMA_READ/DMA_WRITE round trip to the client (a snapshot: an unmap may follow).
  bool FdBacked(Gpa addr, ByteSize size, uint32_t prot) const;
  size_t RegionCount() const;  // in translation
  // Charged to this client: regions and fd-backed bytes, including removed regions whose
  // last use has not ended yet.
  uint32_t ChargedRegions() const;
  uint64_t ChargedBytes() const;

 private:
  struct Segment;  // one region's share of an access, with a use held on the region
  Result<std::vector<Segment>> Plan(Gpa addr, uint64_t len, uint32_t prot) const;

  mutable std::mutex mu_;
  std::map<uint64_t, std::shared_ptr<DmaRegion>> regions_;  // by iova
  DmaLimits limits_;
  std::shared_ptr<DmaLedger> ledger_;
  DmaMessenger* messenger_ = nullptr;
  // Held shared for the length of a messenger call, exclusive by SetMessenger, so a session
  // never goes away under a worker thread's DMA_READ.
  mutable std::shared_mutex messenger_mu_;
};

}  // namespace vg::vfio_user
