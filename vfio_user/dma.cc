#include "vfio_user/dma.h"

#include <fcntl.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>

#include "vfio_user/messages.h"

namespace vg::vfio_user {

namespace {
std::atomic<uint64_t> g_budget_total{DmaBudget::kDefaultTotal};
std::atomic<uint64_t> g_budget_used{0};
}  // namespace

void DmaBudget::SetTotal(uint64_t bytes) { g_budget_total = bytes; }
uint64_t DmaBudget::Total() { return g_budget_total.load(); }
uint64_t DmaBudget::Used() { return g_budget_used.load(); }
bool DmaBudget::TryCharge(uint64_t bytes) {
  uint64_t used = g_budget_used.load();
  do {
    if (bytes > g_budget_total.load() || used > g_budget_total.load() - bytes) return false;
  } while (!g_budget_used.compare_exchange_weak(used, used + bytes));
  return true;
}
void DmaBudget::Release(uint64_t bytes) { g_budget_used -= bytes; }

struct DmaLedger {
  std::atomic<uint32_t> regions{0};
  std::atomic<uint64_t> bytes{0};
};

// One DMA_MAP'd range. Held by the translation map, by Pins and by in-flight copies; the
// mapping and the client's charge for it end with the last holder, whenever that is.
struct DmaRegion {
  // Declared first, so destroyed last: a DmaDrain sees the region gone only once its
  // mapping is unmapped and its charge released (a DMA_MAP right after the DMA_UNMAP reply
  // must find the quota free).
  std::shared_ptr<const int> gone_token = std::make_shared<const int>(0);
  uint64_t iova = 0;
  uint64_t size = 0;
  uint32_t prot = 0;
  std::shared_ptr<DmaLedger> ledger;
  uint64_t charged_bytes = 0;  // fd-backed bytes, also charged to DmaBudget
  std::atomic<bool> live{true};  // in translation
  Mapping map;  // invalid for fd-less regions (served by the messenger)

  ~DmaRegion() {
    map = Mapping();  // unmapped before the charge is released
    if (ledger) {
      --ledger->regions;
      ledger->bytes -= charged_bytes;
    }
    if (charged_bytes) DmaBudget::Release(charged_bytes);
  }
};

struct DmaSpace::Segment {
  std::shared_ptr<DmaRegion> region;  // keeps the region's memory mapped for the copy
  uint64_t gpa = 0;
  uint64_t offset = 0;  // inside the region
  uint64_t len = 0;
};

Pin::~Pin() = default;
Pin::Pin(Pin&& o) noexcept : region_(std::move(o.region_)), bytes_(o.bytes_), gpa_(o.gpa_) { o.bytes_ = {}; }
Pin& Pin::operator=(Pin&& o) noexcept {
  if (this != &o) {
    region_ = std::move(o.region_);
    bytes_ = o.bytes_;
    gpa_ = o.gpa_;
    o.bytes_ = {};
  }
  return *this;
}
bool Pin::Live() const { return region_ && region_->live.load(); }

DmaSpace::DmaSpace() : ledger_(std::make_shared<DmaLedger>()) {}
DmaSpace::~DmaSpace() = default;

void DmaSpace::SetMessenger(DmaMessenger* m) {
  std::unique_lock lk(messenger_mu_);
  messenger_ = m;
}

void DmaSpace::SetLimits(const DmaLimits& l) {
  std::lock_guard lk(mu_);
  limits_ = l;
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
  {
    // Charged before anything is mapped; the region gives the charge back when it dies
    // (here on a refusal below, or at its last use after DMA_UNMAP).
    std::lock_guard lk(mu_);
    VG_ERROR_IF(ledger_->regions.load() >= limits_.max_regions, Errc::kLimitExceeded,
                "DMA_MAP [{}, +{}): already {} regions charged (limit {}, including regions still in use after "
                "their DMA_UNMAP)",
                args.iova, args.size, ledger_->regions.load(), limits_.max_regions);
    if (fd.Valid()) {
      uint64_t have = ledger_->bytes.load();
      VG_ERROR_IF(args.size.v > limits_.max_bytes || have > limits_.max_bytes - args.size.v, Errc::kLimitExceeded,
                  "DMA_MAP [{}, +{}): {:#x} bytes already mapped for this client (limit {:#x})", args.iova, args.size,
                  have, limits_.max_bytes);
      VG_ERROR_IF(!DmaBudget::TryCharge(args.size.v), Errc::kLimitExceeded,
                  "DMA_MAP [{}, +{}): the daemon already maps {:#x} bytes of guest memory (limit {:#x})", args.iova,
                  args.size, DmaBudget::Used(), DmaBudget::Total());
      region->charged_bytes = args.size.v;
      ledger_->bytes += args.size.v;
    }
    ++ledger_->regions;
    region->ledger = ledger_;
  }
  if (fd.Valid()) {
    // mmap past the end of a file "succeeds" and then raises SIGBUS on access: check first.
    struct stat st {};
    VG_ERROR_IF(::fstat(fd.Get(), &st) != 0, Errc::kIo, "fstat DMA fd: {}", std::strerror(errno));
    VG_ERROR_IF(!S_ISREG(st.st_mode), Errc::kIo, "DMA fd is not a regular file or memfd");
    // A client that shrinks the file afterwards would turn our next access into SIGBUS, on
    // the loop, in the executor or inside the engine, where no copy can be made fault-safe.
    // So only memory the client can no longer shrink is mapped: a memfd sealed against
    // shrinking (QEMU's memory-backend-memfd seals by default: seal=on), or one that still
    // allows sealing, which we seal now (the client cannot undo a seal). Anything else (a
    // memfd without MFD_ALLOW_SEALING, a tmpfs, hugetlbfs or disk file) is refused by name;
    // memory shared without an fd is served by DMA_READ/DMA_WRITE instead.
    (void)::fcntl(fd.Get(), F_ADD_SEALS, F_SEAL_SHRINK);
    int seals = ::fcntl(fd.Get(), F_GET_SEALS);
    VG_ERROR_IF(seals < 0 || !(seals & F_SEAL_SHRINK), Errc::kUnsupported,
                "DMA_MAP [{}, +{}): the fd cannot be sealed against shrinking (not a memfd created with "
                "MFD_ALLOW_SEALING); use memory-backend-memfd",
                args.iova, args.size);
    // Sealed: the size checked here can no longer go down.
    VG_ERROR_IF(::fstat(fd.Get(), &st) != 0, Errc::kIo, "fstat DMA fd: {}", std::strerror(errno));
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

Result<DmaDrain> DmaSpace::Unmap(const DmaUnmapArgs& args) {
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
  // Out of translation above; whoever still holds a region keeps it mapped until done.
  std::vector<std::weak_ptr<const void>> tokens;
  for (auto& r : gone) {
    r->live = false;
    tokens.emplace_back(r->gone_token);
  }
  return DmaDrain(std::move(tokens));
}

void DmaSpace::Clear() {
  std::lock_guard lk(mu_);
  for (auto& [iova, r] : regions_) r->live = false;
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
    segs.push_back(Segment{r, at, off, n});
    at += n;
  }
  return segs;
}

Result<> DmaSpace::Read(Gpa addr, std::span<std::byte> out, DmaWait wait) const {
  VG_TRY_ASSIGN(auto segs, Plan(addr, out.size(), kDmaRead));
  if (wait == DmaWait::kNever)
    for (const auto& s : segs)
      VG_ERROR_IF(!s.region->map.Valid(), Errc::kWouldBlock,
                  "guest address {:#x} is shared without an fd: a DMA_READ round trip, never done here", s.gpa);
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

Result<> DmaSpace::Write(Gpa addr, std::span<const std::byte> data, DmaWait wait) const {
  VG_TRY_ASSIGN(auto segs, Plan(addr, data.size(), kDmaWrite));
  if (wait == DmaWait::kNever)
    for (const auto& s : segs)
      VG_ERROR_IF(!s.region->map.Valid(), Errc::kWouldBlock,
                  "guest address {:#x} is shared without an fd: a DMA_WRITE round trip, never done here", s.gpa);
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
  p.region_ = s.region;
  p.bytes_ = {s.region->map.data() + s.offset, s.len};
  p.gpa_ = addr;
  return p;
}

bool DmaSpace::Contains(Gpa addr, ByteSize size, uint32_t prot) const {
  if (size.v == 0) return false;
  return Plan(addr, size.v, prot).ok();
}

bool DmaSpace::FdBacked(Gpa addr, ByteSize size, uint32_t prot) const {
  if (size.v == 0) return false;
  auto segs = Plan(addr, size.v, prot);
  if (!segs.ok()) return false;
  return std::all_of(segs->begin(), segs->end(), [](const Segment& s) { return s.region->map.Valid(); });
}

size_t DmaSpace::RegionCount() const {
  std::lock_guard lk(mu_);
  return regions_.size();
}
uint32_t DmaSpace::ChargedRegions() const { return ledger_->regions.load(); }
uint64_t DmaSpace::ChargedBytes() const { return ledger_->bytes.load(); }

}  // namespace vg::vfio_user
