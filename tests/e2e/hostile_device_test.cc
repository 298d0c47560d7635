// Hostile guests against the device model itself (F11 findings 1, 4, 16, 17): BAR0 reads
// that used to leak daemon memory, interrupt fds that used to freeze the loop, interrupts and
// DMA that ignored the PCI enables, and a GTT half-write that survived a reset. Every attack
// goes through vGPU A's public socket while a victim tenant (tests/e2e/victim.h) runs kernels
// on vGPU B and checks its results and its register latency throughout.
#include <doctest.h>

#include <fcntl.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "guest/guest.h"
#include "tests/e2e/guest_checks.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/victim.h"

using namespace vg;
using namespace vg::e2e;
using namespace vg::guest;
namespace vu = vg::vfio_user;

namespace {

uint32_t Dword(const std::vector<std::byte>& b, size_t i) {
  uint32_t v;
  std::memcpy(&v, b.data() + i, 4);
  return v;
}

// Reads [from, to) of BAR0 in `chunk`-byte accesses and returns the first offset that is
// not zero (or `to`). Every access must succeed: an offset in no row of the page table reads
// 0 whatever the width.
uint64_t FirstNonZero(vu::Client& c, uint64_t from, uint64_t to, uint32_t chunk) {
  for (uint64_t off = from; off < to; off += chunk) {
    auto r = c.RegionRead(vu::kBar0Region, off, chunk);
    REQUIRE_MESSAGE(r.ok(), "BAR0 read of ", chunk, " bytes at ", off, ": ", Why(r.ok() ? Ok() : Result<>(r.error())));
    for (size_t i = 0; i < r->size(); ++i)
      if ((*r)[i] != std::byte{0}) return off + i;
  }
  return to;
}

constexpr uint32_t kMsixCtrl = abi::kCapMsixOffset;  // dword: cap id, next, message control
constexpr uint32_t kMsixEnable = 1u << 31;          // message control bit 15, in the dword
constexpr uint32_t kMsixFunctionMask = 1u << 30;    // bit 14
constexpr uint32_t kCommand = 0x04;                 // dword: command (lo), status (hi)
constexpr uint32_t kBusMaster = 1u << 2;
constexpr uint32_t kPmcsr = abi::kCapPmOffset + 4;

uint64_t WaitIrq(Device& d, uint32_t vector, int ms) {
  auto r = d.WaitIrq(vector, ms);
  return r.ok() ? *r : 0;
}

}  // namespace

TEST_CASE("hostile BAR0 reads: the MSI-X table, the PBA and every gap read 0, never daemon memory") {
  Daemon daemon({std::string(kUuidA) + ":small", std::string(kUuidB) + ":small"});
  Victim victim(daemon.Socket(1));
  auto a = OpenGuest(daemon.Socket(0));
  vu::Client& c = a->client();

  // The MSI-X page, dword by dword and qword by qword: only the 2 table entries and the
  // PBA are defined; 0x3020-0x37FF and 0x3808-0x3FFF are in no row.
  CHECK(FirstNonZero(c, abi::kMsixTableOffset + abi::kNumVectors * 16, abi::kMsixPbaOffset, 4) ==
        abi::kMsixPbaOffset);
  CHECK(FirstNonZero(c, abi::kMsixTableOffset + abi::kNumVectors * 16, abi::kMsixPbaOffset, 8) ==
        abi::kMsixPbaOffset);
  CHECK(FirstNonZero(c, abi::kMsixPbaOffset + 8, 0x4000, 4) == 0x4000);
  auto pba = c.RegionRead(vu::kBar0Region, abi::kMsixPbaOffset, 8);
  REQUIRE(pba.ok());
  CHECK(Dword(*pba, 0) == 0);  // nothing raised yet
  CHECK(Dword(*pba, 4) == 0);
  // An access that straddles the table's end is in no row either.
  CHECK(FirstNonZero(c, abi::kMsixTableOffset + abi::kNumVectors * 16 - 4, abi::kMsixTableOffset + abi::kNumVectors * 16 + 4, 8) ==
        abi::kMsixTableOffset + abi::kNumVectors * 16 + 4);
  // The gap up to the GTT window and the window past GTT_ENTRIES, a page per access.
  CHECK(FirstNonZero(c, 0x4000, abi::kGttOffset, 4096) == abi::kGttOffset);
  uint32_t entries = a->Read32(abi::reg::kGttEntries).value();
  uint64_t gtt_end = abi::kGttOffset + uint64_t{entries} * 8;
  CHECK(FirstNonZero(c, gtt_end, abi::kBar0Size, 4096) == abi::kBar0Size);
  // Writes to the gaps are refused with the named error, and change nothing.
  uint32_t junk = 0xdeadbeef;
  CHECK(!c.RegionWrite(vu::kBar0Region, 0x3400, std::as_bytes(std::span(&junk, 1))).ok());
  CHECK(a->ReadError()->code == Errc::kNotFound);
  CHECK(FirstNonZero(c, 0x3400, 0x3404, 4) == 0x3404);
  CHECK(daemon.Alive());
  VictimReport report = victim.Stop();
  MESSAGE("victim: ", report.rounds, " rounds, ", report.reads, " register reads, slowest ", report.max_read_ms, " ms");
  CheckVictim(report);
}

TEST_CASE("hostile SET_IRQS: a pipe, a regular file and a blocking eventfd with a full counter never stall the daemon") {
  Daemon daemon({std::string(kUuidA) + ":small", std::string(kUuidB) + ":small"});
  Victim victim(daemon.Socket(1));
  auto a = OpenGuest(daemon.Socket(0));
  vu::Client& c = a->client();
  const vu::SetIrqsArgs one{vu::kIrqSetDataEventfd | vu::kIrqSetActionTrigger, vu::kIrqMsix, 0, 1};

  SUBCASE("a full pipe and a regular file are refused by name") {
    int p[2];
    REQUIRE(::pipe(p) == 0);  // blocking, as the attacker wants it
    UniqueFd rd(p[0]), wr(p[1]);
    ::fcntl(wr.Get(), F_SETFL, O_NONBLOCK);
    char fill[4096] = {};
    while (::write(wr.Get(), fill, sizeof fill) > 0) {
    }
    ::fcntl(wr.Get(), F_SETFL, 0);
    int pfd[] = {wr.Get()};
    CHECK(c.SetIrqs(one, pfd).code() == Errc::kInvalidArgument);  // kNotEventFd, seen through its errno
    auto path = std::filesystem::temp_directory_path() / ("vgpud-irq-file-" + std::to_string(::getpid()));
    UniqueFd file(::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    std::filesystem::remove(path);
    REQUIRE(file.Valid());
    int ffd[] = {file.Get()};
    CHECK(c.SetIrqs(one, ffd).code() == Errc::kInvalidArgument);
    // Had either been taken, these would write to it from the loop.
    for (int i = 0; i < 64; ++i) REQUIRE(a->Write32(abi::reg::kIrqTest, abi::kVectorFence).ok());
  }

  SUBCASE("a blocking eventfd whose counter is at its maximum, or made blocking after SET_IRQS") {
    bool flip_later = false;
    SUBCASE("blocking from the start") {}
    SUBCASE("non-blocking at SET_IRQS, O_NONBLOCK cleared on the shared description afterwards") { flip_later = true; }
    UniqueFd efd(::eventfd(0, EFD_CLOEXEC | (flip_later ? EFD_NONBLOCK : 0)));
    REQUIRE(efd.Valid());
    int fds[] = {efd.Get()};
    REQUIRE(c.SetIrqs(one, fds).ok());
    if (flip_later) ::fcntl(efd.Get(), F_SETFL, 0);
    uint64_t max = 0xfffffffffffffffeull;
    REQUIRE(::write(efd.Get(), &max, 8) == 8);  // the next write of 1 would block
    // Each of these used to block the loop, holding vGPU A's lock, until someone read.
    for (int i = 0; i < 32; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      REQUIRE(a->Write32(abi::reg::kIrqTest, abi::kVectorFence).ok());
      double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      CHECK(ms < VictimReadBoundMs());
    }
    // The device answers registers meanwhile, and the vGPU's own signaller catches up once
    // the counter is read: the interrupt arrives late, not lost.
    CHECK(a->Read32(abi::reg::kId).value() == abi::kIdMagic);
    uint64_t got = 0;
    REQUIRE(::read(efd.Get(), &got, 8) == 8);
    CHECK(got == max);
    ::fcntl(efd.Get(), F_SETFL, O_NONBLOCK);
    uint64_t later = 0;
    for (int i = 0; i < 200 && later == 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      if (::read(efd.Get(), &later, 8) != 8) later = 0;
    }
    CHECK(later >= 1);
    // Wedge it again, then hang up: the disconnect must not wait on the stuck write.
    ::fcntl(efd.Get(), F_SETFL, 0);
    REQUIRE(::write(efd.Get(), &max, 8) == 8);
    REQUIRE(a->Write32(abi::reg::kIrqTest, abi::kVectorFence).ok());
    a.reset();
    auto t0 = std::chrono::steady_clock::now();
    auto again = OpenGuest(daemon.Socket(0));
    CHECK(again->Read32(abi::reg::kId).value() == abi::kIdMagic);
    CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));
  }
  CHECK(daemon.Alive());
  VictimReport report = victim.Stop();
  MESSAGE("victim: ", report.rounds, " rounds, ", report.reads, " register reads, slowest ", report.max_read_ms, " ms");
  CheckVictim(report);
}

TEST_CASE("hostile interrupts: MSI-X disabled or masked delivers nothing (pending, then delivered on unmask)") {
  Daemon daemon({std::string(kUuidA) + ":small", std::string(kUuidB) + ":small"});
  Victim victim(daemon.Socket(1));
  auto a = OpenGuest(daemon.Socket(0));
  uint32_t ctrl = a->ConfigRead32(kMsixCtrl).value();
  REQUIRE((ctrl & kMsixEnable) != 0);  // the guest library enables MSI-X as a driver does
  auto pba = [&] { return a->Read32(abi::kMsixPbaOffset).value(); };
  const uint32_t vec0_ctrl = abi::kMsixTableOffset + 12;

  // MSI-X disabled (and MSI never enabled): no interrupt at all.
  REQUIRE(a->ConfigWrite32(kMsixCtrl, ctrl & ~kMsixEnable).ok());
  REQUIRE(a->Write32(abi::reg::kIrqTest, abi::kVectorFence).ok());
  CHECK(WaitIrq(*a, abi::kVectorFence, 200) == 0);
  REQUIRE(a->ConfigWrite32(kMsixCtrl, ctrl | kMsixEnable).ok());
  CHECK(WaitIrq(*a, abi::kVectorFence, 200) == 0);  // enabling later does not replay it

  // Vector masked in the table: pending in the PBA, delivered on unmask.
  REQUIRE(a->Write32(vec0_ctrl, 1).ok());
  REQUIRE(a->Write32(abi::reg::kIrqTest, abi::kVectorFence).ok());
  CHECK(WaitIrq(*a, abi::kVectorFence, 200) == 0);
  CHECK(pba() == 1u << abi::kVectorFence);
  REQUIRE(a->Write32(vec0_ctrl, 0).ok());
  CHECK(WaitIrq(*a, abi::kVectorFence, 2000) == 1);
  CHECK(pba() == 0);

  // Function mask: the same, for every vector at once.
  REQUIRE(a->ConfigWrite32(kMsixCtrl, ctrl | kMsixEnable | kMsixFunctionMask).ok());
  REQUIRE(a->Write32(abi::reg::kIrqTest, abi::kVectorFence).ok());
  CHECK(WaitIrq(*a, abi::kVectorFence, 200) == 0);
  CHECK(pba() == 1u << abi::kVectorFence);
  REQUIRE(a->ConfigWrite32(kMsixCtrl, (ctrl | kMsixEnable) & ~kMsixFunctionMask).ok());
  CHECK(WaitIrq(*a, abi::kVectorFence, 2000) == 1);
  CHECK(pba() == 0);

  // Bus Master Enable clear: an MSI-X message is a memory write, so nothing is sent.
  uint32_t cmd = a->ConfigRead32(kCommand).value();
  REQUIRE((cmd & kBusMaster) != 0);
  REQUIRE(a->ConfigWrite32(kCommand, cmd & ~kBusMaster).ok());
  REQUIRE(a->Write32(abi::reg::kIrqTest, abi::kVectorFence).ok());
  CHECK(WaitIrq(*a, abi::kVectorFence, 200) == 0);
  REQUIRE(a->ConfigWrite32(kCommand, cmd).ok());
  REQUIRE(a->Write32(abi::reg::kIrqTest, abi::kVectorFence).ok());
  CHECK(WaitIrq(*a, abi::kVectorFence, 2000) == 1);  // and the vGPU works again
  CHECK(daemon.Alive());
  VictimReport report = victim.Stop();
  MESSAGE("victim: ", report.rounds, " rounds, ", report.reads, " register reads, slowest ", report.max_read_ms, " ms");
  CheckVictim(report);
}

TEST_CASE("hostile DMA: no ring processing with Bus Master Enable clear or in D3hot") {
  Daemon daemon({std::string(kUuidA) + ":small", std::string(kUuidB) + ":small"});
  Victim victim(daemon.Socket(1));
  auto a = OpenGuest(daemon.Socket(0));
  auto drv = Driver::Create(*a);
  REQUIRE(drv.ok());
  auto buf = (*drv)->Alloc(4096);
  REQUIRE(buf.ok());
  std::memset(buf->host.data(), 0, 4096);
  uint32_t cmd = a->ConfigRead32(kCommand).value();
  uint32_t pmcsr = a->ConfigRead32(kPmcsr).value();

  struct Case {
    const char* name;
    std::function<Result<>()> off, on;
  } cases[] = {
      {"bus master clear", [&] { return a->ConfigWrite32(kCommand, cmd & ~kBusMaster); },
       [&] { return a->ConfigWrite32(kCommand, cmd); }},
      {"PMCSR D3hot", [&] { return a->ConfigWrite32(kPmcsr, (pmcsr & ~3u) | 3u); },
       [&] { return a->ConfigWrite32(kPmcsr, pmcsr & ~3u); }},
      {"POWER_STATE D3hot", [&] { return a->Write32(abi::reg::kPowerState, 3); },
       [&] { return a->Write32(abi::reg::kPowerState, 0); }},
  };
  uint32_t value = 0x1000;
  for (auto& k : cases) {
    CAPTURE(k.name);
    ++value;
    REQUIRE(a->ClearError().ok());
    REQUIRE(k.off().ok());
    CommandBuilder cb;
    cb.Fill(buf->va, 4096, value);
    auto seq = (*drv)->Submit(cb, false);
    // The doorbell is refused by name; nothing of the submission runs.
    auto err = a->ReadError();
    REQUIRE(err.ok());
    for (int i = 0; i < 100 && err->code != Errc::kDmaDisabled; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      err = a->ReadError();
    }
    CHECK(err->code == Errc::kDmaDisabled);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    uint32_t first;
    std::memcpy(&first, buf->host.data(), 4);
    CHECK(first != value);
    if (seq.ok()) CHECK((*drv)->completed() < *seq);
    // Back in D0 with bus mastering: the device fetches the ring again at the next doorbell.
    REQUIRE(k.on().ok());
    REQUIRE(a->ClearError().ok());
    auto next = (*drv)->Submit(CommandBuilder{}.Nop(), false);
    REQUIRE(next.ok());
    CHECK((*drv)->Wait(*next, WaitMode::kPoll, 10000).ok());
    std::memcpy(&first, buf->host.data(), 4);
    CHECK(first == value);
  }
  CHECK(daemon.Alive());
  VictimReport report = victim.Stop();
  MESSAGE("victim: ", report.rounds, " rounds, ", report.reads, " register reads, slowest ", report.max_read_ms, " ms");
  CheckVictim(report);
}

TEST_CASE("hostile GTT latch: a low half written before a reset is not committed after it") {
  Daemon daemon({std::string(kUuidA) + ":small", std::string(kUuidB) + ":small"});
  Victim victim(daemon.Socket(1));
  auto a = OpenGuest(daemon.Socket(0));
  const uint32_t index = 7;
  const uint32_t lo_off = abi::kGttOffset + index * 8;
  // An aperture page entry: valid without any DMA mapping, so only the latch can make it.
  const uint32_t lo = 0x3000 | abi::kGttValid | abi::kGttAperture;
  for (bool device_reset : {false, true}) {
    CAPTURE(device_reset);
    REQUIRE(a->Write32(lo_off, lo).ok());  // latched, not committed
    if (device_reset)
      REQUIRE(a->Reset().ok());  // DEVICE_RESET
    else
      REQUIRE(a->Write32(abi::reg::kReset, abi::kResetMagic).ok());
    REQUIRE(a->Write32(lo_off + 4, 0).ok());  // commits (entry's low half, 0)
    CHECK(a->Read64(lo_off).value() == 0);
  }
  CHECK(daemon.Alive());
  VictimReport report = victim.Stop();
  MESSAGE("victim: ", report.rounds, " rounds, ", report.reads, " register reads, slowest ", report.max_read_ms, " ms");
  CheckVictim(report);
}
