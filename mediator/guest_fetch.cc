#include "mediator/guest_fetch.h"

#include <cstring>
#include <new>

namespace vg::mediator {

namespace vu = vfio_user;

GuestFetch::GuestFetch(const vu::DmaSpace& dma, std::function<void()> replay)
    : dma_(dma), replay_(std::move(replay)), thread_([this] { Loop(); }) {}

GuestFetch::~GuestFetch() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

Result<> GuestFetch::Read(Gpa gpa, std::span<std::byte> out) {
  Result<> direct = dma_.Read(gpa, out, vu::DmaWait::kNever);
  if (direct.ok() || direct.code() != Errc::kWouldBlock) return direct;
  std::lock_guard lk(mu_);
  Key key{gpa.v, out.size()};
  if (auto it = fetched_.find(key); it != fetched_.end()) {
    VG_TRY(it->second.bytes);
    std::memcpy(out.data(), it->second.bytes->data(), out.size());
    return Ok();
  }
  VG_ERROR_IF(rounds_ >= kMaxRoundsPerPass, Errc::kLimitExceeded,
              "a ring pass wanted guest memory shared without an fd {} times", rounds_);
  VG_ERROR_IF(out.size() > kMaxBytesPerPass || wanted_bytes_ > kMaxBytesPerPass - out.size(), Errc::kLimitExceeded,
              "a ring pass wants more than {} bytes of guest memory shared without an fd", kMaxBytesPerPass);
  wanted_.push_back(key);
  wanted_bytes_ += out.size();
  return MakeError(Errc::kWouldBlock, "guest memory {:#x}+{:#x} is shared without an fd: fetched off the loop",
                   gpa.v, out.size());
}

void GuestFetch::Start() {
  {
    std::lock_guard lk(mu_);
    // Nothing wanted (cannot happen: only Read() says kWouldBlock, and it records the range
    // first): stay idle rather than wait for a fetch that never comes. The head did not
    // move, so the next kick runs the pass again.
    if (wanted_.empty()) return;
    started_ = true;
    ++rounds_;
  }
  cv_.notify_all();
}

void GuestFetch::Finish() {
  std::lock_guard lk(mu_);
  fetched_.clear();
  wanted_.clear();
  wanted_bytes_ = 0;
  rounds_ = 0;
}

void GuestFetch::Cancel() {
  std::lock_guard lk(mu_);
  ++epoch_;
  fetched_.clear();
  wanted_.clear();
  wanted_bytes_ = 0;
  rounds_ = 0;
  started_ = false;
}

bool GuestFetch::Busy() const {
  std::lock_guard lk(mu_);
  // Fetched bytes not yet spent belong to the pass being replayed: a new kick's pass would
  // read a stale tail from them, so it waits for that replay and runs after it.
  return started_ || !fetched_.empty() || !wanted_.empty();
}

uint64_t GuestFetch::fetches() const {
  std::lock_guard lk(mu_);
  return fetches_;
}

void GuestFetch::Loop() {
  std::unique_lock lk(mu_);
  for (;;) {
    cv_.wait(lk, [&] { return stop_ || (started_ && !wanted_.empty()); });
    if (stop_) return;
    uint64_t epoch = epoch_;
    std::vector<Key> want = std::move(wanted_);
    wanted_.clear();
    lk.unlock();
    // Waits on the client here, on this vGPU's thread: at most the messenger's bound per
    // range (ServerLimits::dma_timeout_ms), and only this vGPU waits.
    std::map<Key, Fetched> got;
    for (const Key& k : want) {
      try {
        std::vector<std::byte> buf(k.second);
        Result<> r = dma_.Read(Gpa{k.first}, buf);
        got.emplace(k, Fetched{r.ok() ? Result<std::vector<std::byte>>(std::move(buf))
                                      : Result<std::vector<std::byte>>(std::move(r).error())});
      } catch (const std::bad_alloc&) {
        got.emplace(k, Fetched{MakeError(Errc::kOutOfMemory, "fetching {:#x}+{:#x}: allocation failed", k.first,
                                         k.second)});
      }
    }
    lk.lock();
    if (stop_) return;
    if (epoch != epoch_) continue;  // reset or disconnect meanwhile: nothing replays
    fetches_ += got.size();
    fetched_.merge(got);
    started_ = false;  // the replay is the pass now; it may Start() again
    lk.unlock();
    replay_();
    lk.lock();
  }
}

}  // namespace vg::mediator
