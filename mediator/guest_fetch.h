#pragma once
// Guest memory the event loop may not read itself. Memory a client shares without an fd is
// read by a DMA_READ round trip to that client, which may answer late or never; the loop
// serves every tenant and never waits (docs/device-spec.md, "Guest memory: bounds and
// blocking"). So the loop's ring pass reads through a GuestFetch: fd-backed memory is
// copied at once; a range in fd-less memory is served from bytes this vGPU's fetch thread
// already read, or else recorded as wanted and refused with kWouldBlock. The pass then
// stops with no effect, and the fetch thread reads what was wanted (waiting on the client
// there, not on the loop) and runs the pass again, under the vGPU's mutex, until it
// completes. Fetched bytes serve one pass only (copy, then check, then use).

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <span>
#include <thread>
#include <utility>
#include <vector>

#include "base/base.h"
#include "vfio_user/dma.h"

namespace vg::mediator {

class GuestFetch {
 public:
  // Bounds on one ring pass's fetched memory: the ranges a pass may want in all, and how
  // often it may come back wanting more (a ring that wraps, nested batches).
  static constexpr uint64_t kMaxBytesPerPass = 4ull << 20;
  static constexpr int kMaxRoundsPerPass = 16;

  // `replay` runs on the fetch thread once what was wanted is fetched; it takes the vGPU's
  // mutex and runs the pass again.
  GuestFetch(const vfio_user::DmaSpace& dma, std::function<void()> replay);
  ~GuestFetch();  // joins the thread; replay is never called after it returns
  GuestFetch(const GuestFetch&) = delete;
  GuestFetch& operator=(const GuestFetch&) = delete;

  // For the pass (vGPU mutex held). kWouldBlock when the range must be fetched first.
  Result<> Read(Gpa gpa, std::span<std::byte> out);
  // The pass stopped on kWouldBlock: fetch what it wanted, then replay.
  void Start();
  // The pass completed: fetched bytes are spent.
  void Finish();
  // Reset or disconnect: forget wanted and fetched bytes; a replay in flight does nothing.
  void Cancel();
  // A fetch or its replay is under way: a new pass must wait for it (it runs after it).
  // (Between Start() and the end of the replay that finishes or restarts it.)
  bool Busy() const;
  uint64_t fetches() const;  // ranges fetched so far (counters, tests)

 private:
  struct Fetched {
    Result<std::vector<std::byte>> bytes;
  };
  using Key = std::pair<uint64_t, uint64_t>;  // gpa, length
  void Loop();

  const vfio_user::DmaSpace& dma_;
  std::function<void()> replay_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Key> wanted_;
  uint64_t wanted_bytes_ = 0;
  std::map<Key, Fetched> fetched_;
  int rounds_ = 0;
  bool started_ = false;  // between Start() and the end of the replay that follows
  uint64_t epoch_ = 0;    // Cancel() bumps it: a fetch begun before does not replay
  uint64_t fetches_ = 0;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace vg::mediator
