#include "vfio_user/irqs.h"

#include <unistd.h>

#include <bit>

namespace vg::vfio_user {
namespace {
constexpr uint32_t kDataMask = kIrqSetDataNone | kIrqSetDataBool | kIrqSetDataEventfd;
constexpr uint32_t kActionMask = kIrqSetActionMask | kIrqSetActionUnmask | kIrqSetActionTrigger;
}  // namespace

IrqSet::IrqSet(std::array<uint32_t, kNumPciIrqs> counts) {
  for (uint32_t i = 0; i < kNumPciIrqs; ++i) vecs_[i].resize(counts[i]);
}

Result<IrqInfo> IrqSet::Info(uint32_t index) const {
  VG_ERROR_IF(index >= kNumPciIrqs, Errc::kOutOfBounds, "irq index {} out of range", index);
  std::lock_guard lk(mu_);
  IrqInfo info;
  info.count = static_cast<uint32_t>(vecs_[index].size());
  if (info.count) {
    info.flags = kIrqInfoEventfd | kIrqInfoMaskable;
    if (index == kIrqMsi || index == kIrqMsix) info.flags |= kIrqInfoNoresize;
  }
  return info;
}

Result<> IrqSet::Validate(const SetIrqsArgs& a, size_t nfds, size_t nbools) const {
  VG_ERROR_IF((a.flags & ~(kDataMask | kActionMask)) != 0, Errc::kBadFlags, "SET_IRQS flags {:#x}", a.flags);
  uint32_t data = a.flags & kDataMask;
  uint32_t action = a.flags & kActionMask;
  VG_ERROR_IF(std::popcount(data) != 1 || std::popcount(action) != 1, Errc::kBadFlags,
              "SET_IRQS flags {:#x}: need exactly one DATA and one ACTION", a.flags);
  VG_ERROR_IF(a.index >= kNumPciIrqs, Errc::kOutOfBounds, "SET_IRQS index {} out of range", a.index);
  std::lock_guard lk(mu_);
  uint32_t n = static_cast<uint32_t>(vecs_[a.index].size());
  VG_ERROR_IF(n == 0, Errc::kUnsupported, "SET_IRQS on unsupported irq index {}", a.index);
  VG_ERROR_IF(static_cast<uint64_t>(a.start) + a.count > n, Errc::kOutOfBounds,
              "SET_IRQS vectors [{}, +{}) beyond the {} of index {}", a.start, a.count, n, a.index);
  VG_ERROR_IF(data == kIrqSetDataEventfd && action != kIrqSetActionTrigger, Errc::kUnsupported,
              "SET_IRQS: mask/unmask notification eventfds are not supported");
  VG_ERROR_IF(data == kIrqSetDataEventfd && nfds != 0 && nfds != a.count, Errc::kBadFdCount,
              "SET_IRQS: {} fds for {} vectors", nfds, a.count);
  VG_ERROR_IF(data != kIrqSetDataEventfd && nfds != 0, Errc::kBadFdCount, "SET_IRQS: {} fds without DATA_EVENTFD",
              nfds);
  VG_ERROR_IF(data == kIrqSetDataBool && nbools < a.count, Errc::kTruncated, "SET_IRQS: {} bools for {} vectors",
              nbools, a.count);
  return Ok();
}

bool IrqSet::Signal(Vector& v) {
  if (v.masked) {
    v.pending = true;
    return false;
  }
  if (!v.fd.Valid()) return false;
  uint64_t one = 1;
  // A full eventfd counter (EAGAIN) still means "pending" to the reader: not an error.
  ssize_t w = ::write(v.fd.Get(), &one, sizeof one);
  (void)w;
  return true;
}

Result<> IrqSet::Apply(const SetIrqsArgs& a, std::vector<UniqueFd> fds, std::span<const uint8_t> bools) {
  uint32_t data = a.flags & kDataMask;
  uint32_t action = a.flags & kActionMask;
  std::lock_guard lk(mu_);
  auto& vv = vecs_[a.index];
  // VFIO: count 0 with DATA_NONE|ACTION_TRIGGER disables every vector of the index.
  if (a.count == 0) {
    if (data == kIrqSetDataNone && action == kIrqSetActionTrigger)
      for (auto& v : vv) v = Vector{};
    return Ok();
  }
  for (uint32_t i = 0; i < a.count; ++i) {
    Vector& v = vv[a.start + i];
    if (data == kIrqSetDataEventfd) {
      v.fd = fds.empty() ? UniqueFd() : std::move(fds[i]);
      continue;
    }
    if (data == kIrqSetDataBool && !bools[i]) continue;
    if (action == kIrqSetActionMask) {
      v.masked = true;
    } else if (action == kIrqSetActionUnmask) {
      v.masked = false;
      if (v.pending) {
        v.pending = false;
        Signal(v);
      }
    } else {
      Signal(v);  // loopback trigger from the client
    }
  }
  return Ok();
}

Result<bool> IrqSet::Trigger(uint32_t index, uint32_t vector) {
  std::lock_guard lk(mu_);
  VG_ERROR_IF(index >= kNumPciIrqs || vector >= vecs_[index].size(), Errc::kOutOfBounds, "irq {}:{} out of range",
              index, vector);
  return Signal(vecs_[index][vector]);
}

void IrqSet::Clear() {
  std::lock_guard lk(mu_);
  for (auto& vv : vecs_)
    for (auto& v : vv) v = Vector{};
}

bool IrqSet::HasEventFd(uint32_t index, uint32_t vector) const {
  std::lock_guard lk(mu_);
  return index < kNumPciIrqs && vector < vecs_[index].size() && vecs_[index][vector].fd.Valid();
}
bool IrqSet::IsMasked(uint32_t index, uint32_t vector) const {
  std::lock_guard lk(mu_);
  return index < kNumPciIrqs && vector < vecs_[index].size() && vecs_[index][vector].masked;
}
bool IrqSet::IsPending(uint32_t index, uint32_t vector) const {
  std::lock_guard lk(mu_);
  return index < kNumPciIrqs && vector < vecs_[index].size() && vecs_[index][vector].pending;
}

}  // namespace vg::vfio_user
