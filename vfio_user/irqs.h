#pragma once
// VFIO SET_IRQS semantics for one device, reusable by any DeviceBackend: per IRQ index a
// fixed number of vectors, each with an optional trigger eventfd, a mask bit and a pending
// bit (a vector triggered while masked latches pending; unmask delivers it).
//
// Blocking (F11 finding 4): a trigger fd is the guest's open file description. The guest can
// clear O_NONBLOCK on it or fill its counter at any time, so a write() to it may block,
// whatever was checked before. The caller's thread (the daemon's loop) therefore never
// blocks on one: Trigger() only marks the vector queued (at most one entry per vector: the
// queue is bounded by the vector count, and signals coalesce as an eventfd counter does),
// and this set's own signaller thread does the writes. (TriggerNow() writes on the caller's
// thread, bounded to EventFd::kGuardMs: for a vGPU's own threads that complete a fence
// themselves, its worker's loop and executor threads.) A write that blocks stalls only this
// device's interrupts; replacing or dropping the fd, Clear() and destruction interrupt it
// (a signal to the signaller thread, retried every kInterruptRetryMs until it leaves).

#include <array>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "base/base.h"
#include "vfio_user/device.h"

namespace vg::vfio_user {

class IrqSet {
 public:
  static constexpr int kInterruptRetryMs = 10;

  // counts[i]: vectors of IRQ index i (kIrqIntx..kIrqReq); 0 means the index is unsupported.
  explicit IrqSet(std::array<uint32_t, kNumPciIrqs> counts);
  ~IrqSet();
  IrqSet(const IrqSet&) = delete;
  IrqSet& operator=(const IrqSet&) = delete;

  // GET_IRQ_INFO for `index`: eventfd-capable, maskable, NORESIZE for MSI/MSI-X.
  Result<IrqInfo> Info(uint32_t index) const;

  // No side effects. nfds/nbools: what the message carried.
  Result<> Validate(const SetIrqsArgs& args, size_t nfds, size_t nbools) const;
  // The same, and every valid fd must be an eventfd (kNotEventFd).
  Result<> Validate(const SetIrqsArgs& args, std::span<const UniqueFd> fds, size_t nbools) const;
  // Assumes Validate passed. fds: one per vector for DATA_EVENTFD (invalid = de-assign), or
  // empty to de-assign the whole range.
  Result<> Apply(const SetIrqsArgs& args, std::vector<UniqueFd> fds, std::span<const uint8_t> bools);
  Result<> Set(const SetIrqsArgs& args, std::vector<UniqueFd> fds, std::span<const uint8_t> bools) {
    VG_TRY(Validate(args, fds, bools.size()));
    return Apply(args, std::move(fds), bools);
  }

  // Fires a vector without blocking: queues it for the signaller. Thread-safe. Returns true
  // when an eventfd will be signalled, false when the vector is masked (pending is latched)
  // or has no eventfd.
  Result<bool> Trigger(uint32_t index, uint32_t vector);
  // The same, but a signal that would be queued is written here, on the caller's thread,
  // the way EventFd::TrySignal writes one: nothing when the eventfd already reads as
  // pending, else one write bounded to EventFd::kGuardMs even if the guest made the fd
  // blocking (a write that could not land means the counter is full: pending anyway). Only
  // for a thread of this vGPU's own worker that may wait that long: its loop completing a
  // fence inline (mediator ExecOptions::inline_complete) or its executor's threads, which
  // saves the signaller thread's wake-up. A vector already queued is left to the signaller.
  Result<bool> TriggerNow(uint32_t index, uint32_t vector);

  // Disconnect: drops every eventfd, unmasks, clears pending. Does not wait.
  void Clear();

  bool HasEventFd(uint32_t index, uint32_t vector) const;
  bool IsMasked(uint32_t index, uint32_t vector) const;
  bool IsPending(uint32_t index, uint32_t vector) const;
  // Signals written so far (tests).
  uint64_t Delivered() const;

 private:
  struct Vector {
    std::shared_ptr<const UniqueFd> fd;  // shared with a write in progress
    bool masked = false;
    bool pending = false;
    bool queued = false;
  };
  bool Signal(uint32_t index, uint32_t vector);  // mu_ held
  void Kick();                                   // mu_ held: interrupt a blocked write
  void SignallerLoop();

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::array<std::vector<Vector>, kNumPciIrqs> vecs_;
  std::deque<std::pair<uint32_t, uint32_t>> queue_;  // at most one entry per vector
  uint64_t generation_ = 0;                          // bumped when any fd is replaced
  uint64_t delivered_ = 0;
  bool stop_ = false;
  std::thread signaller_;  // started with the first eventfd
};

}  // namespace vg::vfio_user
