#include "vfio_user/dma.h"

#include <fcntl.h>
#include <sys/stat.h>

#include <chrono>
#include <cstring>

#include "vfio_user/messages.h"

namespace vg::vfio_user {

// One DMA_MAP'd range. `uses` counts Pins and in-flight copies; Unmap waits for it to reach
// zero so no access lands in memory the client has taken back.
struct DmaRegion {
  uint64_t iova = 0;
  uint64_t size = 0;
  uint32_t prot = 0;
  Mapping map;  // invalid for fd-less regions (served by the messenger)
  std::mutex mu;
  std::condition_variable idle;
  uint64_t uses = 0;

  void Acquire() {
    std::lock_guard lk(mu);
    ++uses;
  }
  void Release() {
    std::lock_guard lk(mu);
    if (--uses == 0) idle.notify_all();
  }
};

struct DmaSpace::Segment {
  std::shared_ptr<DmaRegion> region;
  uint64_t gpa = 0;
  uint64_t offset = 0;  // inside the region
  uint64_t len = 0;

  Segment(std::shared_ptr<DmaRegion> r, uint64_t g, uint64_t o, uint64_t l)
      : region(std::move(r)), gpa(g), offset(o), len(l) {
    region->Acquire();
  }
  ~Segment() {
    if (region) region->Release();
  }
  Segment(Segment&& o) noexcept : region(std::move(o.region)), gpa(o.gpa), offset(o.offset), len(o.len) {}
  Segment& operator=(Segment&&) = delete;
};

Pin::~Pin() {
  if (region_) region_->Release();
}
Pin::Pin(Pin&& o) noexcept : region_(std::move(o.region_)), bytes_(o.bytes_), gpa_(o.gpa_) { o.bytes_ = {}; }
Pin& Pin::operator=(Pin&& o) noexcept {
  if (this != &o) {
    if (region_) region_->Release();
    region_ = std::move(o.region_);
    bytes_ = o.bytes_;
    gpa_ = o.gpa_;
    o.bytes_ = {};
  }
  return *this;
}

DmaSpace::DmaSpace() = default;
DmaSpace::~DmaSpace() = default;

void DmaSpace::SetMessenger(DmaMessenger* m) {
  std::unique_lock lk(messenger_mu_);
  messenger_ = m;
}

Result<> DmaSpace::Map(const DmaMapArgs& args, UniqueFd fd) {
  VG_INVALID_IF(args.size.v == 0, "DMA_MAP of zero bytes at {}", args.iova);
  VG_ERROR_IF(!IsAligned(args.iova.v, kPageSize) || !IsAligned(args.size.v, kPageSize) ||
                  !IsAligned(args.fd_offset, kPageSize),
              Errc::kMisaligned, "DMA_MAP iova {} size {} offset {:#x} not page aligned", args.iova, args.size,
              args.fd_offset);
  VG_TRY_ASSIGN(uint64_t end, CheckedAdd(args.iova.v, args.size.v));
  (void)end;
  VG_ERROR_IF((args.prot & ~(kDmaRead | kDmaWrite)) != 0, Errc::kBadFlags, "DMA_MAP prot {:#x}", args.prot);

  auto region = std::make_shared<DmaRegion>();
  region->iova = args.iova.v;
  region->size = args.size.v;
  region->prot = args.prot;
  if (fd.Valid()) {
    // mmap past the end of a file "succeeds" and then raises SIGBUS on access: check first.
    struct stat st {};
    VG_ERROR_IF(::fstat(fd.Get(), &st) != 0, Errc::kIo, "fstat DMA fd: {}", std::strerror(errno));
    VG_ERROR_IF(!S_ISREG(st.st_mode), Errc::kIo, "DMA fd is not a regular file or memfd");
    // A client that shrinks the file afterwards would turn our accesses into SIGBUS. Seal a
    // memfd against shrinking (the client cannot undo a seal); a file that cannot be sealed
    // (hugetlbfs, a plain file) is accepted as QEMU's file backends need, with that risk logged.
    if (::fcntl(fd.Get(), F_ADD_SEALS, F_SEAL_SHRINK) != 0) {
      int seals = ::fcntl(fd.Get(), F_GET_SEALS);
      if (seals < 0 || !(seals & F_SEAL_SHRINK))
        VG_LOGW("DMA_MAP {}: fd cannot be sealed against shrinking ({})", args.iova, std::strerror(errno));
    }
    VG_TRY_ASSIGN(uint64_t fd_end, CheckedAdd(args.fd_offset, args.size.v));
    VG_ERROR_IF(fd_end > static_cast<uint64_t>(st.st_size), Errc::kOutOfBounds,
                "DMA_MAP [{:#x}, {:#x}) beyond the fd's {:#x} bytes", args.fd_offset, fd_end, st.st_size);
    auto p = (args.prot & kDmaWrite) ? Mapping::Prot::kReadWrite : Mapping::Prot::kRead;
    VG_TRY_ASSIGN(region->map, Mapping::Map(fd, args.size, args.fd_offset, p));
  }

  std::lock_guard lk(mu_);
  auto next = regions_.lower_bound(args.iova.v);
  if (next != regions_.end())
    VG_ERROR_IF(RangesOverlap(args.iova.v, args.size.v, next->second->iova, next->second->size), Errc::kOverlap,
                "DMA_MAP [{}, +{}) overlaps region at {:#x}", args.iova, args.size, next->second->iova);
  if (next != regions_.begin()) {
    auto prev = std::prev(next);
    VG_ERROR_IF(RangesOverlap(args.iova.v, args.size.v, prev->second->iova, prev->second->size), Errc::kOverlap,
                "DMA_MAP [{}, +{}) overlaps region at {:#x}", args.iova, args.size, prev->second->iova);
  }
  regions_.emplace(args.iova.v, std::move(region));
  return Ok();
}

Result<> DmaSpace::Unmap(const DmaUnmapArgs& args, int timeout_ms) {
  std::vector<std::shared_ptr<DmaRegion>> gone;
  {
    std::lock_guard lk(mu_);
    if (args.flags & kDmaUnmapAll) {
      for (auto& [iova, r] : regions_) gone.push_back(std::move(r));
      regions_.clear();
    } else {
      auto it = regions_.find(args.iova.v);
      VG_ERROR_IF(it == regions_.end() || it->second->size != args.size.v, Errc::kNotFound,
                  "DMA_UNMAP [{}, +{}) matches no mapped region", args.iova, args.size);
      gone.push_back(std::move(it->second));
      regions_.erase(it);
    }
  }
  // Removed from translation above; now wait for work already using the memory.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (auto& r : gone) {
    std::unique_lock lk(r->mu);
    if (!r->idle.wait_until(lk, deadline, [&] { return r->uses == 0; }))
      return MakeError(Errc::kBusy, "DMA_UNMAP of {:#x}: {} users still hold it after {} ms", r->iova, r->uses,
                       timeout_ms);
  }
  return Ok();
}

void DmaSpace::Clear() {
  std::lock_guard lk(mu_);
  regions_.clear();
}

Result<std::vector<DmaSpace::Segment>> DmaSpace::Plan(Gpa addr, uint64_t len, uint32_t prot) const {
  VG_TRY_ASSIGN(uint64_t end, CheckedAdd(addr.v, len));
  std::vector<Segment> segs;
  std::lock_guard lk(mu_);
  uint64_t at = addr.v;
  while (at < end) {
    auto it = regions_.upper_bound(at);
    VG_ERROR_IF(it == regions_.begin(), Errc::kNotMapped, "guest address {:#x} is not mapped", at);
    --it;
    const auto& r = it->second;
    uint64_t off = at - r->iova;
    VG_ERROR_IF(off >= r->size, Errc::kNotMapped, "guest address {:#x} is not mapped", at);
    VG_ERROR_IF((r->prot & prot) != prot, Errc::kAccessDenied, "guest address {:#x} mapped without access {:#x}",
                at, prot);
    uint64_t n = std::min(end - at, r->size - off);
    segs.emplace_back(r, at, off, n);
    at += n;
  }
  return segs;
}

Result<> DmaSpace::Read(Gpa addr, std::span<std::byte> out) const {
  VG_TRY_ASSIGN(auto segs, Plan(addr, out.size(), kDmaRead));
  size_t done = 0;
  for (const auto& s : segs) {
    auto dst = out.subspan(done, s.len);
    if (s.region->map.Valid()) {
      std::memcpy(dst.data(), s.region->map.data() + s.offset, s.len);
    } else {
      std::shared_lock lk(messenger_mu_);
      VG_ERROR_IF(!messenger_, Errc::kUnsupported, "no client to serve DMA_READ at {:#x}", s.gpa);
      VG_TRY(messenger_->DmaRead(Gpa{s.gpa}, dst));
    }
    done += s.len;
  }
  return Ok();
}

Result<> DmaSpace::Write(Gpa addr, std::span<const std::byte> data) const {
  VG_TRY_ASSIGN(auto segs, Plan(addr, data.size(), kDmaWrite));
  size_t done = 0;
  for (const auto& s : segs) {
    auto src = data.subspan(done, s.len);
    if (s.region->map.Valid()) {
      std::memcpy(s.region->map.data() + s.offset, src.data(), s.len);
    } else {
      std::shared_lock lk(messenger_mu_);
      VG_ERROR_IF(!messenger_, Errc::kUnsupported, "no client to serve DMA_WRITE at {:#x}", s.gpa);
      VG_TRY(messenger_->DmaWrite(Gpa{s.gpa}, src));
    }
    done += s.len;
  }
  return Ok();
}

Result<Pin> DmaSpace::PinRange(Gpa addr, ByteSize size, uint32_t prot) const {
  VG_INVALID_IF(size.v == 0, "pin of zero bytes at {}", addr);
  VG_TRY_ASSIGN(auto segs, Plan(addr, size.v, prot));
  VG_ERROR_IF(segs.size() != 1, Errc::kNotMapped, "pin [{}, +{}) spans {} regions", addr, size, segs.size());
  auto& s = segs.front();
  VG_ERROR_IF(!s.region->map.Valid(), Errc::kUnsupported, "pin [{}, +{}) in memory shared without an fd", addr,
              size);
  Pin p;
  s.region->Acquire();  // the Pin's own use; the Segment's is released when segs dies
  p.region_ = s.region;
  p.bytes_ = {s.region->map.data() + s.offset, s.len};
  p.gpa_ = addr;
  return p;
}

bool DmaSpace::Contains(Gpa addr, ByteSize size, uint32_t prot) const {
  if (size.v == 0) return false;
  return Plan(addr, size.v, prot).ok();
}

size_t DmaSpace::RegionCount() const {
  std::lock_guard lk(mu_);
  return regions_.size();
}

}  // namespace vg::vfio_user
