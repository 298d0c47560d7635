#include "vfio_user/irqs.h"

#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstdio>
#include <string_view>

// glibc before 2.37 names the SIGEV_THREAD_ID target only through the union member.
#ifndef sigev_notify_thread_id
#define sigev_notify_thread_id _sigev_un._tid
#endif

namespace vg::vfio_user {
namespace {
constexpr uint32_t kDataMask = kIrqSetDataNone | kIrqSetDataBool | kIrqSetDataEventfd;
constexpr uint32_t kActionMask = kIrqSetActionMask | kIrqSetActionUnmask | kIrqSetActionTrigger;

// The signal that interrupts a signaller's blocked write(): delivered only to that thread, by
// its own timer, and handled by doing nothing. Installed without SA_RESTART, so the write
// returns EINTR and the signaller re-checks whether it should still be writing.
int WakeSignal() { return SIGRTMIN + 7; }
void IgnoreWake(int) {}
void InstallWakeHandler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_handler = IgnoreWake;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    ::sigaction(WakeSignal(), &sa, nullptr);
  });
}

// A periodic per-thread timer armed only around a write that may block: each tick turns a
// blocked write() into EINTR, so no wake-up can be lost between a check and the syscall.
class WriteWatchdog {
 public:
  WriteWatchdog() {
    sigevent sev{};
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = WakeSignal();
    sev.sigev_notify_thread_id = static_cast<pid_t>(::gettid());
    ok_ = ::timer_create(CLOCK_MONOTONIC, &sev, &timer_) == 0;
  }
  ~WriteWatchdog() {
    if (ok_) ::timer_delete(timer_);
  }
  void Arm(bool on) {
    if (!ok_) return;
    long ns = on ? long{IrqSet::kInterruptRetryMs} * 1'000'000 : 0;
    itimerspec its{{0, ns}, {0, ns}};
    ::timer_settime(timer_, 0, &its, nullptr);
  }
  bool ok() const { return ok_; }

 private:
  timer_t timer_{};
  bool ok_ = false;
};
}  // namespace

IrqSet::IrqSet(std::array<uint32_t, kNumPciIrqs> counts) {
  for (uint32_t i = 0; i < kNumPciIrqs; ++i) vecs_[i].resize(counts[i]);
}

IrqSet::~IrqSet() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  // A signaller stuck in write() leaves within kInterruptRetryMs (its watchdog's next tick).
  if (signaller_.joinable()) signaller_.join();
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

Result<> IrqSet::Validate(const SetIrqsArgs& a, std::span<const UniqueFd> fds, size_t nbools) const {
  VG_TRY(Validate(a, fds.size(), nbools));
  for (size_t i = 0; i < fds.size(); ++i)
    if (fds[i].Valid()) VG_TRY_CTX(CheckIsEventFd(fds[i].Get()), "SET_IRQS vector {}", a.start + i);
  return Ok();
}

bool IrqSet::Signal(uint32_t index, uint32_t vector) {
  Vector& v = vecs_[index][vector];
  if (v.masked) {
    v.pending = true;
    return false;
  }
  if (!v.fd) return false;
  if (!v.queued) {  // coalesce: one queued signal per vector, as one eventfd counter would
    v.queued = true;
    queue_.emplace_back(index, vector);
    cv_.notify_one();
  }
  return true;
}

void IrqSet::SignallerLoop() {
  sigset_t wake;
  sigemptyset(&wake);
  sigaddset(&wake, WakeSignal());
  ::pthread_sigmask(SIG_UNBLOCK, &wake, nullptr);
  WriteWatchdog watchdog;
  std::unique_lock lk(mu_);
  for (;;) {
    cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
    if (stop_) break;
    auto [index, vector] = queue_.front();
    queue_.pop_front();
    Vector& v = vecs_[index][vector];
    v.queued = false;
    std::shared_ptr<const UniqueFd> fd = v.fd;
    if (!fd) continue;
    lk.unlock();
    uint64_t one = 1;
    bool written = false;
    watchdog.Arm(true);
    for (;;) {
      ssize_t w = ::write(fd->Get(), &one, sizeof one);
      if (w == static_cast<ssize_t>(sizeof one)) {
        written = true;
        break;
      }
      if (w < 0 && errno == EINTR) {
        std::lock_guard g(mu_);
        if (stop_ || vecs_[index][vector].fd != fd) break;  // shutting down, or the fd was replaced
        continue;
      }
      break;  // EAGAIN: the counter is full, and a full counter already reads as pending
    }
    watchdog.Arm(false);
    lk.lock();
    if (written) ++delivered_;
  }
}

Result<> IrqSet::Apply(const SetIrqsArgs& a, std::vector<UniqueFd> fds, std::span<const uint8_t> bools) {
  uint32_t data = a.flags & kDataMask;
  uint32_t action = a.flags & kActionMask;
  std::lock_guard lk(mu_);
  auto& vv = vecs_[a.index];
  // VFIO: count 0 with DATA_NONE|ACTION_TRIGGER disables every vector of the index.
  if (a.count == 0) {
    if (data == kIrqSetDataNone && action == kIrqSetActionTrigger)
      for (auto& v : vv) {
        bool queued = v.queued;  // its queue entry stays; the signaller finds no fd and skips it
        v = Vector{};
        v.queued = queued;
      }
    return Ok();
  }
  for (uint32_t i = 0; i < a.count; ++i) {
    Vector& v = vv[a.start + i];
    if (data == kIrqSetDataEventfd) {
      if (fds.empty() || !fds[i].Valid()) {
        v.fd.reset();
      } else {
        v.fd = std::make_shared<const UniqueFd>(std::move(fds[i]));
        if (!signaller_.joinable()) {
          InstallWakeHandler();
          signaller_ = std::thread([this] { SignallerLoop(); });
        }
      }
      continue;
    }
    if (data == kIrqSetDataBool && !bools[i]) continue;
    if (action == kIrqSetActionMask) {
      v.masked = true;
    } else if (action == kIrqSetActionUnmask) {
      v.masked = false;
      if (v.pending) {
        v.pending = false;
        Signal(a.index, a.start + i);
      }
    } else {
      Signal(a.index, a.start + i);  // loopback trigger from the client
    }
  }
  return Ok();
}

Result<bool> IrqSet::Trigger(uint32_t index, uint32_t vector) {
  std::lock_guard lk(mu_);
  VG_ERROR_IF(index >= kNumPciIrqs || vector >= vecs_[index].size(), Errc::kOutOfBounds, "irq {}:{} out of range",
              index, vector);
  return Signal(index, vector);
}

Result<bool> IrqSet::TriggerNow(uint32_t index, uint32_t vector) {
  std::shared_ptr<const UniqueFd> fd;
  {
    std::lock_guard lk(mu_);
    VG_ERROR_IF(index >= kNumPciIrqs || vector >= vecs_[index].size(), Errc::kOutOfBounds, "irq {}:{} out of range",
                index, vector);
    Vector& v = vecs_[index][vector];
    if (v.masked || !v.fd || v.queued) return Signal(index, vector);
    fd = v.fd;  // kept open for the write, as the signaller keeps it
  }
  // Without mu_, as the signaller writes: SET_IRQS and Clear never wait for this write.
  if (!EventFd::TrySignal(fd->Get()).ok()) {
    std::lock_guard lk(mu_);  // an fd in error state: the signaller's way, which skips it
    return Signal(index, vector);
  }
  std::lock_guard lk(mu_);
  ++delivered_;
  return true;
}

void IrqSet::Clear() {
  std::lock_guard lk(mu_);
  queue_.clear();
  for (auto& vv : vecs_)
    for (auto& v : vv) v = Vector{};
}

bool IrqSet::HasEventFd(uint32_t index, uint32_t vector) const {
  std::lock_guard lk(mu_);
  return index < kNumPciIrqs && vector < vecs_[index].size() && vecs_[index][vector].fd != nullptr;
}
bool IrqSet::IsMasked(uint32_t index, uint32_t vector) const {
  std::lock_guard lk(mu_);
  return index < kNumPciIrqs && vector < vecs_[index].size() && vecs_[index][vector].masked;
}
bool IrqSet::IsPending(uint32_t index, uint32_t vector) const {
  std::lock_guard lk(mu_);
  return index < kNumPciIrqs && vector < vecs_[index].size() && vecs_[index][vector].pending;
}
uint64_t IrqSet::Delivered() const {
  std::lock_guard lk(mu_);
  return delivered_;
}

}  // namespace vg::vfio_user
