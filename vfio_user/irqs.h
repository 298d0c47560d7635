#pragma once
// VFIO SET_IRQS semantics for one device, reusable by any DeviceBackend: per IRQ index a
// fixed number of vectors, each with an optional trigger eventfd, a mask bit and a pending
// bit (a vector triggered while masked latches pending; unmask delivers it).

#include <array>
#include <cstdint>
#include <mutex>
#include <span>
#include <vector>

#include "base/base.h"
#include "vfio_user/device.h"

namespace vg::vfio_user {

class IrqSet {
 public:
  // counts[i]: vectors of IRQ index i (kIrqIntx..kIrqReq); 0 means the index is unsupported.
  explicit IrqSet(std::array<uint32_t, kNumPciIrqs> counts);

  // GET_IRQ_INFO for `index`: eventfd-capable, maskable, NORESIZE for MSI/MSI-X.
  Result<IrqInfo> Info(uint32_t index) const;

  // No side effects. nfds/nbools: what the message carried.
  Result<> Validate(const SetIrqsArgs& args, size_t nfds, size_t nbools) const;
  // Assumes Validate passed. fds: one per vector for DATA_EVENTFD (invalid = de-assign), or
  // empty to de-assign the whole range.
  Result<> Apply(const SetIrqsArgs& args, std::vector<UniqueFd> fds, std::span<const uint8_t> bools);
  Result<> Set(const SetIrqsArgs& args, std::vector<UniqueFd> fds, std::span<const uint8_t> bools) {
    VG_TRY(Validate(args, fds.size(), bools.size()));
    return Apply(args, std::move(fds), bools);
  }

  // Fires a vector. Thread-safe. Returns true when an eventfd was signalled, false when the
  // vector is masked (pending is latched) or has no eventfd.
  Result<bool> Trigger(uint32_t index, uint32_t vector);

  // Disconnect: closes every eventfd, unmasks, clears pending.
  void Clear();

  bool HasEventFd(uint32_t index, uint32_t vector) const;
  bool IsMasked(uint32_t index, uint32_t vector) const;
  bool IsPending(uint32_t index, uint32_t vector) const;

 private:
  struct Vector {
    UniqueFd fd;
    bool masked = false;
    bool pending = false;
  };
  bool Signal(Vector& v);  // mu_ held

  mutable std::mutex mu_;
  std::array<std::vector<Vector>, kNumPciIrqs> vecs_;
};

}  // namespace vg::vfio_user
