#pragma once
// Guest memory as the device sees it: the regions a client registered with DMA_MAP.
// Every access is bounds-checked and copies (copy, then check, then use); zero-copy users
// take a Pin, which keeps the daemon's mapping alive while engine work uses it
// (the pin -> map -> unmap -> invalidate contract of IOMMU-backed DMA).

#include <condition_variable>
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

// Sends server-initiated DMA_READ/DMA_WRITE to the client (for memory without an fd).
// Implemented by the server session; thread-safe; each call is one request/reply.
class DmaMessenger {
 public:
  virtual ~DmaMessenger() = default;
  virtual Result<> DmaRead(Gpa addr, std::span<std::byte> out) = 0;
  virtual Result<> DmaWrite(Gpa addr, std::span<const std::byte> data) = 0;
};

struct DmaRegion;  // internal

// A host view of guest memory [gpa, gpa+size) inside one fd-backed region. Keeps the
// region's mapping alive; DmaSpace::Unmap of that region waits until every Pin is gone.
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

  // Refuses zero size (kInvalidArgument), non-page-aligned iova/size/offset (kMisaligned),
  // wrap-around (kOutOfBounds), overlap with an existing region (kOverlap), unknown prot
  // bits (kBadFlags), an fd that cannot be mapped (kIo).
  Result<> Map(const DmaMapArgs& args, UniqueFd fd);
  // The range must equal one mapped region exactly (kNotFound otherwise). Waits up to
  // `timeout_ms` for outstanding Pins on it to drop (kBusy when they do not; the region is
  // then already gone from translation, so no new work can start on it).
  Result<> Unmap(const DmaUnmapArgs& args, int timeout_ms = 4000);
  void Clear();  // disconnect: forget every region (pins keep their mapping alive)

  // Copies out of / into guest memory. The range may span several adjacent regions.
  // kNotMapped when any byte is not mapped, kAccessDenied without the needed prot.
  Result<> Read(Gpa addr, std::span<std::byte> out) const;
  Result<> Write(Gpa addr, std::span<const std::byte> data) const;
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
  size_t RegionCount() const;

 private:
  struct Segment;  // one region's share of an access, with a use held on the region
  Result<std::vector<Segment>> Plan(Gpa addr, uint64_t len, uint32_t prot) const;

  mutable std::mutex mu_;
  std::map<uint64_t, std::shared_ptr<DmaRegion>> regions_;  // by iova
  DmaMessenger* messenger_ = nullptr;
  // Held shared for the length of a messenger call, exclusive by SetMessenger, so a session
  // never goes away under a worker thread's DMA_READ.
  mutable std::shared_mutex messenger_mu_;
  friend class Pin;
};

}  // namespace vg::vfio_user
