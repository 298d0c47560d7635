// IrqSet: VFIO SET_IRQS semantics.
#include <doctest/doctest.h>

#include <unistd.h>

#include <chrono>
#include <thread>

#include "vfio_user/irqs.h"

namespace vg::vfio_user {
namespace {
constexpr uint32_t kTrigEv = kIrqSetDataEventfd | kIrqSetActionTrigger;

std::vector<UniqueFd> Dups(std::initializer_list<const EventFd*> evs) {
  std::vector<UniqueFd> out;
  for (auto* e : evs) out.push_back(e ? e->DupFd().value() : UniqueFd());
  return out;
}
}  // namespace

TEST_CASE("info: counts and flags, unsupported INTx") {
  IrqSet s({0, 1, 8, 1, 1});
  CHECK(s.Info(kIrqIntx)->count == 0);
  CHECK(s.Info(kIrqIntx)->flags == 0);
  auto msix = s.Info(kIrqMsix).value();
  CHECK(msix.count == 8);
  CHECK((msix.flags & (kIrqInfoEventfd | kIrqInfoMaskable | kIrqInfoNoresize)) ==
        (kIrqInfoEventfd | kIrqInfoMaskable | kIrqInfoNoresize));
  CHECK(s.Info(9).code() == Errc::kOutOfBounds);
}

TEST_CASE("validate is separate and side-effect free") {
  IrqSet s({0, 1, 8, 1, 1});
  CHECK(s.Validate({kTrigEv, kIrqMsix, 0, 2}, 2, 0).ok());
  CHECK(s.Validate({kTrigEv, kIrqMsix, 0, 2}, 1, 0).code() == Errc::kBadFdCount);
  CHECK(s.Validate({kTrigEv, kIrqMsix, 0, 2}, 0, 0).ok());  // de-assign
  CHECK(s.Validate({kIrqSetDataNone | kIrqSetActionTrigger, kIrqMsix, 0, 1}, 1, 0).code() == Errc::kBadFdCount);
  CHECK(s.Validate({kTrigEv | kIrqSetDataNone, kIrqMsix, 0, 1}, 1, 0).code() == Errc::kBadFlags);
  CHECK(s.Validate({kIrqSetDataNone, kIrqMsix, 0, 1}, 0, 0).code() == Errc::kBadFlags);
  CHECK(s.Validate({kTrigEv | (1u << 9), kIrqMsix, 0, 1}, 1, 0).code() == Errc::kBadFlags);
  CHECK(s.Validate({kTrigEv, kIrqMsix, 7, 2}, 2, 0).code() == Errc::kOutOfBounds);
  CHECK(s.Validate({kTrigEv, kIrqMsix, 0xffffffff, 2}, 2, 0).code() == Errc::kOutOfBounds);
  CHECK(s.Validate({kTrigEv, kIrqIntx, 0, 1}, 1, 0).code() == Errc::kUnsupported);
  CHECK(s.Validate({kTrigEv, 7, 0, 1}, 1, 0).code() == Errc::kOutOfBounds);
  CHECK(s.Validate({kIrqSetDataBool | kIrqSetActionMask, kIrqMsix, 0, 4}, 0, 3).code() == Errc::kTruncated);
  CHECK(s.Validate({kIrqSetDataEventfd | kIrqSetActionMask, kIrqMsix, 0, 1}, 1, 0).code() == Errc::kUnsupported);
}

TEST_CASE("eventfd per vector, trigger, de-assign, disable all") {
  IrqSet s({0, 1, 4, 1, 1});
  auto e0 = EventFd::Create().value();
  auto e1 = EventFd::Create().value();
  REQUIRE(s.Set({kTrigEv, kIrqMsix, 0, 2}, Dups({&e0, &e1}), {}).ok());
  CHECK(s.Trigger(kIrqMsix, 1).value());
  CHECK(e1.Wait(1000).value() == 1);  // written by the set's signaller thread
  CHECK(e0.Drain().value() == 0);
  CHECK(!s.Trigger(kIrqMsix, 3).value());  // no eventfd
  CHECK(s.Trigger(kIrqMsix, 4).code() == Errc::kOutOfBounds);
  // -1 (invalid) de-assigns vector 0 only.
  REQUIRE(s.Set({kTrigEv, kIrqMsix, 0, 2}, Dups({nullptr, &e1}), {}).ok());
  CHECK(!s.HasEventFd(kIrqMsix, 0));
  CHECK(s.HasEventFd(kIrqMsix, 1));
  // count 0, DATA_NONE|TRIGGER: disable all.
  REQUIRE(s.Set({kIrqSetDataNone | kIrqSetActionTrigger, kIrqMsix, 0, 0}, {}, {}).ok());
  CHECK(!s.HasEventFd(kIrqMsix, 1));
}

TEST_CASE("mask latches pending; unmask delivers; bools select vectors; loopback trigger") {
  IrqSet s({0, 1, 4, 1, 1});
  auto e = EventFd::Create().value();
  auto f = EventFd::Create().value();
  REQUIRE(s.Set({kTrigEv, kIrqMsix, 2, 2}, Dups({&e, &f}), {}).ok());
  REQUIRE(s.Set({kIrqSetDataNone | kIrqSetActionMask, kIrqMsix, 2, 1}, {}, {}).ok());
  CHECK(s.IsMasked(kIrqMsix, 2));
  CHECK(!s.Trigger(kIrqMsix, 2).value());
  CHECK(s.IsPending(kIrqMsix, 2));
  CHECK(e.Drain().value() == 0);
  REQUIRE(s.Set({kIrqSetDataNone | kIrqSetActionUnmask, kIrqMsix, 2, 1}, {}, {}).ok());
  CHECK(!s.IsPending(kIrqMsix, 2));
  CHECK(e.Wait(1000).value() == 1);
  // Bools: mask vector 3 only.
  uint8_t b[2] = {0, 1};
  REQUIRE(s.Set({kIrqSetDataBool | kIrqSetActionMask, kIrqMsix, 2, 2}, {}, b).ok());
  CHECK(!s.IsMasked(kIrqMsix, 2));
  CHECK(s.IsMasked(kIrqMsix, 3));
  // Client loopback trigger on an unmasked vector fires it.
  REQUIRE(s.Set({kIrqSetDataNone | kIrqSetActionTrigger, kIrqMsix, 2, 1}, {}, {}).ok());
  CHECK(e.Wait(1000).value() == 1);
  // Clear drops everything.
  s.Clear();
  CHECK(!s.HasEventFd(kIrqMsix, 2));
  CHECK(!s.IsMasked(kIrqMsix, 3));
}

TEST_CASE("trigger is thread-safe against set") {
  IrqSet s({0, 1, 4, 1, 1});
  auto e = EventFd::Create().value();
  std::atomic<bool> stop{false};
  std::thread t([&] {
    while (!stop) (void)s.Trigger(kIrqMsix, 0);
  });
  for (int i = 0; i < 2000; ++i) {
    REQUIRE(s.Set({kTrigEv, kIrqMsix, 0, 1}, Dups({&e}), {}).ok());
    REQUIRE(s.Set({kTrigEv, kIrqMsix, 0, 1}, Dups({nullptr}), {}).ok());
  }
  stop = true;
  t.join();
  CHECK(!s.HasEventFd(kIrqMsix, 0));
}

TEST_CASE("only eventfds are taken; a write that would block never blocks Trigger") {
  IrqSet s({0, 1, 4, 1, 1});
  int p[2];
  REQUIRE(::pipe(p) == 0);
  UniqueFd rd(p[0]);
  std::vector<UniqueFd> pipe_fd;
  pipe_fd.emplace_back(p[1]);
  CHECK(s.Set({kTrigEv, kIrqMsix, 0, 1}, std::move(pipe_fd), {}).code() == Errc::kNotEventFd);
  CHECK(!s.HasEventFd(kIrqMsix, 0));
  // A blocking eventfd at its maximum count: the guest's own description, made to block.
  auto blocking = EventFd::Create(false).value();
  REQUIRE(blocking.Signal(0xfffffffffffffffeull).ok());
  REQUIRE(s.Set({kTrigEv, kIrqMsix, 0, 1}, Dups({&blocking}), {}).ok());
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 1000; ++i) CHECK(s.Trigger(kIrqMsix, 0).value());
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(500));
  CHECK(s.Delivered() == 0);
  // Read by the guest: the queued signal goes out (coalesced: one write for 1000 triggers).
  CHECK(blocking.Drain().value() == 0xfffffffffffffffeull);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (s.Delivered() == 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  CHECK(s.Delivered() >= 1);
  // Stuck again, then de-assigned and destroyed: neither waits for the stuck write.
  CHECK(blocking.Drain().value() >= 1);  // the late signal; the counter is non-zero, so no block
  REQUIRE(blocking.Signal(0xfffffffffffffffeull).ok());
  CHECK(s.Trigger(kIrqMsix, 0).value());
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  t0 = std::chrono::steady_clock::now();
  REQUIRE(s.Set({kTrigEv, kIrqMsix, 0, 1}, Dups({nullptr}), {}).ok());
  s.Clear();
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(100));
}

TEST_CASE("TriggerNow writes on the caller's thread, never twice into a pending fd, never while masked") {
  IrqSet s({0, 1, 4, 1, 1});
  auto e0 = EventFd::Create().value();
  REQUIRE(s.Set({kTrigEv, kIrqMsix, 0, 1}, Dups({&e0}), {}).ok());
  CHECK(s.TriggerNow(kIrqMsix, 0).value());
  CHECK(s.Delivered() == 1);  // written before it returned, not by the signaller later
  CHECK(e0.Drain().value() == 1);
  // Already pending: nothing more is written (the waiter wakes once, as for a coalesced signal).
  CHECK(s.TriggerNow(kIrqMsix, 0).value());
  CHECK(s.TriggerNow(kIrqMsix, 0).value());
  CHECK(e0.Drain().value() == 1);
  // The guest's blocking description at its maximum count: reads as pending, so no write.
  auto blocking = EventFd::Create(false).value();
  REQUIRE(blocking.Signal(0xfffffffffffffffeull).ok());
  REQUIRE(s.Set({kTrigEv, kIrqMsix, 1, 1}, Dups({&blocking}), {}).ok());
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 100; ++i) CHECK(s.TriggerNow(kIrqMsix, 1).value());
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(500));
  // Masked: latched pending, nothing written; no eventfd: false.
  REQUIRE(s.Set({kIrqSetDataNone | kIrqSetActionMask, kIrqMsix, 0, 1}, {}, {}).ok());
  CHECK(!s.TriggerNow(kIrqMsix, 0).value());
  CHECK(s.IsPending(kIrqMsix, 0));
  CHECK(e0.Drain().value() == 0);
  CHECK(!s.TriggerNow(kIrqMsix, 3).value());
  CHECK(s.TriggerNow(kIrqMsix, 4).code() == Errc::kOutOfBounds);
}

}  // namespace vg::vfio_user
