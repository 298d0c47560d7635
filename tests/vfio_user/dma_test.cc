// DmaSpace: fd-backed and fd-less regions, spans, pins vs unmap, overflow.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include "vfio_user/dma.h"
#include "vfio_user/messages.h"

namespace vg::vfio_user {
namespace {

struct Guest {
  UniqueFd fd;
  Mapping map;
  explicit Guest(uint64_t size) {
    fd = std::move(CreateMemFd("guest", ByteSize{size}).value());
    map = std::move(Mapping::Map(fd, ByteSize{size}, 0).value());
  }
  UniqueFd Dup() const { return fd.Dup().value(); }
};

// Serves fd-less regions from a plain buffer, as the client's DMA handler would.
struct FakeMessenger : DmaMessenger {
  std::vector<std::byte> mem = std::vector<std::byte>(0x10000);
  uint64_t base = 0;
  int calls = 0;
  Result<> DmaRead(Gpa a, std::span<std::byte> out) override {
    ++calls;
    VG_ERROR_IF(!RangeWithin(a.v - base, out.size(), mem.size()), Errc::kOutOfBounds, "bad");
    std::memcpy(out.data(), mem.data() + (a.v - base), out.size());
    return Ok();
  }
  Result<> DmaWrite(Gpa a, std::span<const std::byte> in) override {
    ++calls;
    VG_ERROR_IF(!RangeWithin(a.v - base, in.size(), mem.size()), Errc::kOutOfBounds, "bad");
    std::memcpy(mem.data() + (a.v - base), in.data(), in.size());
    return Ok();
  }
};

constexpr uint32_t kRW = kDmaRead | kDmaWrite;

}  // namespace

TEST_CASE("map refusals") {
  DmaSpace d;
  Guest g(0x4000);
  CHECK(d.Map({Gpa{0x1000}, ByteSize{0}, 0, kRW}, g.Dup()).code() == Errc::kInvalidArgument);
  CHECK(d.Map({Gpa{0x1001}, ByteSize{0x1000}, 0, kRW}, g.Dup()).code() == Errc::kMisaligned);
  CHECK(d.Map({Gpa{0x1000}, ByteSize{0x1000}, 0x800, kRW}, g.Dup()).code() == Errc::kMisaligned);
  CHECK(d.Map({Gpa{~uint64_t{0} - 0xfff}, ByteSize{0x2000}, 0, kRW}, g.Dup()).code() == Errc::kOutOfBounds);
  CHECK(d.Map({Gpa{0x1000}, ByteSize{0x1000}, 0, 4}, g.Dup()).code() == Errc::kBadFlags);
  CHECK(d.Map({Gpa{0x1000}, ByteSize{0x8000}, 0, kRW}, g.Dup()).code() == Errc::kOutOfBounds);  // past EOF
  REQUIRE(d.Map({Gpa{0x10000}, ByteSize{0x4000}, 0, kRW}, g.Dup()).ok());
  CHECK(d.Map({Gpa{0x13000}, ByteSize{0x1000}, 0, kRW}, g.Dup()).code() == Errc::kOverlap);
  CHECK(d.Map({Gpa{0xf000}, ByteSize{0x2000}, 0, kRW}, g.Dup()).code() == Errc::kOverlap);
  CHECK(d.Map({Gpa{0x14000}, ByteSize{0x1000}, 0, kRW}, g.Dup()).ok());  // adjacent is fine
  CHECK(d.RegionCount() == 2);
  CHECK(d.Unmap({Gpa{0x10000}, ByteSize{0x1000}, 0}).code() == Errc::kNotFound);
  CHECK(d.Unmap({Gpa{0x10000}, ByteSize{0x4000}, 0}).ok());
  CHECK(d.RegionCount() == 1);
}

TEST_CASE("read and write across adjacent regions, shared with the guest's memfd") {
  DmaSpace d;
  Guest a(0x2000), b(0x2000);
  REQUIRE(d.Map({Gpa{0x100000}, ByteSize{0x2000}, 0, kRW}, a.Dup()).ok());
  REQUIRE(d.Map({Gpa{0x102000}, ByteSize{0x2000}, 0, kRW}, b.Dup()).ok());
  std::vector<std::byte> data(0x100);
  for (size_t i = 0; i < data.size(); ++i) data[i] = std::byte(i);
  REQUIRE(d.Write(Gpa{0x101f80}, data).ok());
  CHECK(a.map.data()[0x1f80] == std::byte{0});
  CHECK(a.map.data()[0x1fff] == std::byte{0x7f});
  CHECK(b.map.data()[0] == std::byte{0x80});
  std::vector<std::byte> back(0x100);
  REQUIRE(d.Read(Gpa{0x101f80}, back).ok());
  CHECK(back == data);
  CHECK(d.ReadObj<uint32_t>(Gpa{0x102000}).value() == 0x83828180u);
  CHECK(d.Contains(Gpa{0x101000}, ByteSize{0x2000}, kDmaRead));
  CHECK(!d.Contains(Gpa{0x103000}, ByteSize{0x2000}, kDmaRead));
  // Not mapped, partly mapped, overflow.
  CHECK(d.Read(Gpa{0x0}, back).code() == Errc::kNotMapped);
  CHECK(d.Read(Gpa{0x103f80}, back).code() == Errc::kNotMapped);
  CHECK(d.Read(Gpa{~uint64_t{0} - 4}, back).code() == Errc::kOutOfBounds);
}

TEST_CASE("a mapped memfd is sealed against shrinking (no SIGBUS from a truncating client)") {
  DmaSpace d;
  Guest g(0x2000);
  REQUIRE(d.Map({Gpa{0x1000}, ByteSize{0x2000}, 0, kRW}, g.Dup()).ok());
  CHECK(::ftruncate(g.fd.Get(), 0x1000) != 0);
  CHECK(errno == EPERM);
  CHECK(::ftruncate(g.fd.Get(), 0x4000) == 0);  // growing is still allowed
  std::byte b[16];
  CHECK(d.Read(Gpa{0x2ff0}, b).ok());
}

TEST_CASE("prot is honoured") {
  DmaSpace d;
  Guest g(0x1000);
  REQUIRE(d.Map({Gpa{0x1000}, ByteSize{0x1000}, 0, kDmaRead}, g.Dup()).ok());
  std::byte x{1};
  CHECK(d.Write(Gpa{0x1000}, std::span(&x, 1)).code() == Errc::kAccessDenied);
  CHECK(d.Read(Gpa{0x1000}, std::span(&x, 1)).ok());
  CHECK(d.PinRange(Gpa{0x1000}, ByteSize{8}, kDmaWrite).code() == Errc::kAccessDenied);
}

TEST_CASE("unmap never waits: a pin keeps the region mapped and charged until dropped") {
  DmaSpace d;
  Guest g(0x2000);
  REQUIRE(d.Map({Gpa{0x4000}, ByteSize{0x2000}, 0, kRW}, g.Dup()).ok());
  auto pin = d.PinRange(Gpa{0x4800}, ByteSize{0x100}, kRW);
  REQUIRE(pin.ok());
  CHECK(pin->Live());
  CHECK(pin->bytes().size() == 0x100);
  pin->bytes()[0] = std::byte{0x42};
  CHECK(g.map.data()[0x800] == std::byte{0x42});
  CHECK(d.PinRange(Gpa{0x5f00}, ByteSize{0x200}, kRW).code() == Errc::kNotMapped);  // beyond the end

  auto t0 = std::chrono::steady_clock::now();
  auto drain = d.Unmap({Gpa{0x4000}, ByteSize{0x2000}, 0});
  REQUIRE(drain.ok());
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(20));
  CHECK(!drain->Idle());
  CHECK(drain->Busy() == 1);
  // Gone from translation at once; the pin's memory stays valid, and charged.
  CHECK(!d.Contains(Gpa{0x4000}, ByteSize{1}, kDmaRead));
  CHECK(!pin->Live());
  pin->bytes()[1] = std::byte{1};
  CHECK(d.ChargedRegions() == 1);
  CHECK(d.ChargedBytes() == 0x2000);
  { Pin gone = std::move(*pin); }
  CHECK(drain->Idle());
  CHECK(d.ChargedRegions() == 0);
  CHECK(d.ChargedBytes() == 0);
}

TEST_CASE("hostile: an fd that cannot be sealed against shrinking is refused by name") {
  DmaSpace d;
  // A memfd created without MFD_ALLOW_SEALING: the guest could truncate it under us (SIGBUS).
  UniqueFd unsealable(::memfd_create("unsealable", MFD_CLOEXEC));
  REQUIRE(unsealable.Valid());
  REQUIRE(::ftruncate(unsealable.Get(), 0x4000) == 0);
  CHECK(d.Map({Gpa{0x1000}, ByteSize{0x4000}, 0, kRW}, std::move(unsealable)).code() == Errc::kUnsupported);
  // A plain file (tmpfs or disk) cannot be sealed either.
  char path[] = "/tmp/vgpu-dma-test-XXXXXX";
  UniqueFd file(::mkstemp(path));
  REQUIRE(file.Valid());
  ::unlink(path);
  REQUIRE(::ftruncate(file.Get(), 0x4000) == 0);
  CHECK(d.Map({Gpa{0x1000}, ByteSize{0x4000}, 0, kRW}, std::move(file)).code() == Errc::kUnsupported);
  CHECK(d.ChargedRegions() == 0);
  // A sealable memfd is sealed by the map, so the guest can no longer shrink it.
  Guest g(0x4000);
  REQUIRE(d.Map({Gpa{0x1000}, ByteSize{0x4000}, 0, kRW}, g.Dup()).ok());
  CHECK((::fcntl(g.fd.Get(), F_GET_SEALS) & F_SEAL_SHRINK) != 0);
  CHECK(::ftruncate(g.fd.Get(), 0x1000) != 0);
}

TEST_CASE("hostile: mapped bytes and regions are bounded per client and in total") {
  DmaSpace d;
  d.SetLimits({4, 1ull << 40});
  auto sparse = [](uint64_t size) {
    UniqueFd fd = std::move(CreateMemFd("sparse", ByteSize{size}).value());
    return fd;
  };
  // 2 TiB sparse: over the client's 1 TiB.
  CHECK(d.Map({Gpa{0}, ByteSize{2ull << 40}, 0, kDmaRead}, sparse(2ull << 40)).code() == Errc::kLimitExceeded);
  REQUIRE(d.Map({Gpa{0}, ByteSize{512ull << 30}, 0, kDmaRead}, sparse(512ull << 30)).ok());
  CHECK(d.Map({Gpa{1ull << 40}, ByteSize{768ull << 30}, 0, kDmaRead}, sparse(768ull << 30)).code() ==
        Errc::kLimitExceeded);
  CHECK(d.ChargedBytes() == (512ull << 30));
  // fd-less regions cost no address space but count.
  for (uint64_t i = 0; i < 3; ++i) REQUIRE(d.Map({Gpa{(2ull << 40) + i * 0x1000}, ByteSize{0x1000}, 0, kRW}, UniqueFd()).ok());
  CHECK(d.Map({Gpa{3ull << 40}, ByteSize{0x1000}, 0, kRW}, UniqueFd()).code() == Errc::kLimitExceeded);
  // The daemon-wide total binds every client together.
  uint64_t old_total = DmaBudget::Total();
  DmaBudget::SetTotal(DmaBudget::Used() + (256ull << 30));
  DmaSpace other;
  CHECK(other.Map({Gpa{0}, ByteSize{512ull << 30}, 0, kDmaRead}, sparse(512ull << 30)).code() ==
        Errc::kLimitExceeded);
  REQUIRE(other.Map({Gpa{0}, ByteSize{256ull << 30}, 0, kDmaRead}, sparse(256ull << 30)).ok());
  REQUIRE(other.Unmap({Gpa{0}, ByteSize{256ull << 30}, 0})->Idle());
  DmaBudget::SetTotal(old_total);
  REQUIRE(d.Unmap({Gpa{0}, ByteSize{0}, kDmaUnmapAll})->Idle());
  CHECK(d.ChargedBytes() == 0);
  CHECK(d.ChargedRegions() == 0);
}

TEST_CASE("the region count is charged until the last use ends, then released (kBusy unmaps do not leak it)") {
  DmaSpace d;
  d.SetLimits({2, 1ull << 30});
  Guest g(0x1000);
  std::vector<Pin> pins;
  for (int i = 0; i < 50; ++i) {
    REQUIRE(d.Map({Gpa{0x1000}, ByteSize{0x1000}, 0, kRW}, g.Dup()).ok());
    pins.push_back(d.PinRange(Gpa{0x1000}, ByteSize{0x10}, kRW).value());
    auto drain = d.Unmap({Gpa{0x1000}, ByteSize{0x1000}, 0});
    REQUIRE(drain.ok());
    CHECK(!drain->Idle());
    // Still in use: still charged, so a second one fits and a third does not.
    REQUIRE(d.Map({Gpa{0x3000}, ByteSize{0x1000}, 0, kRW}, g.Dup()).ok());
    CHECK(d.Map({Gpa{0x5000}, ByteSize{0x1000}, 0, kRW}, g.Dup()).code() == Errc::kLimitExceeded);
    REQUIRE(d.Unmap({Gpa{0x3000}, ByteSize{0x1000}, 0})->Idle());
    pins.clear();  // the work ends
    CHECK(drain->Idle());
    CHECK(d.ChargedRegions() == 0);
  }
}

TEST_CASE("fd-less regions go through the messenger") {
  DmaSpace d;
  FakeMessenger m;
  m.base = 0x200000;
  Guest g(0x1000);
  REQUIRE(d.Map({Gpa{0x1ff000}, ByteSize{0x1000}, 0, kRW}, g.Dup()).ok());  // fd-backed, just below
  REQUIRE(d.Map({Gpa{0x200000}, ByteSize{0x10000}, 0, kRW}, UniqueFd()).ok());
  std::vector<std::byte> data(0x20, std::byte{0x33});
  CHECK(d.Write(Gpa{0x200010}, data).code() == Errc::kUnsupported);  // no client yet
  d.SetMessenger(&m);
  REQUIRE(d.Write(Gpa{0x1ffff0}, data).ok());  // spans fd-backed and fd-less
  CHECK(g.map.data()[0xff0] == std::byte{0x33});
  CHECK(m.mem[0x0f] == std::byte{0x33});
  CHECK(m.mem[0x10] == std::byte{0});
  std::vector<std::byte> back(0x20);
  REQUIRE(d.Read(Gpa{0x1ffff0}, back).ok());
  CHECK(back == data);
  CHECK(m.calls == 2);
  CHECK(d.PinRange(Gpa{0x200000}, ByteSize{8}, kDmaRead).code() == Errc::kUnsupported);
  d.SetMessenger(nullptr);
  CHECK(d.Read(Gpa{0x200000}, back).code() == Errc::kUnsupported);
}

TEST_CASE("unmap all and clear") {
  DmaSpace d;
  Guest g(0x1000);
  REQUIRE(d.Map({Gpa{0x1000}, ByteSize{0x1000}, 0, kRW}, g.Dup()).ok());
  REQUIRE(d.Map({Gpa{0x3000}, ByteSize{0x1000}, 0, kRW}, g.Dup()).ok());
  auto pin = d.PinRange(Gpa{0x1000}, ByteSize{4}, kDmaRead).value();
  d.Clear();
  CHECK(d.RegionCount() == 0);
  CHECK(pin.bytes().size() == 4);  // still mapped for its holder
  REQUIRE(d.Map({Gpa{0x1000}, ByteSize{0x1000}, 0, kRW}, g.Dup()).ok());
  CHECK(d.Unmap({Gpa{0}, ByteSize{0}, kDmaUnmapAll}).ok());
  CHECK(d.RegionCount() == 0);
}

TEST_CASE("concurrent reads while the loop maps and unmaps") {
  DmaSpace d;
  Guest g(0x1000);
  std::atomic<bool> stop{false};
  std::atomic<int> ok{0};
  std::thread t([&] {
    std::byte buf[64];
    while (!stop)
      if (d.Read(Gpa{0x8000}, buf).ok()) ++ok;
  });
  for (int i = 0; i < 500; ++i) {
    REQUIRE(d.Map({Gpa{0x8000}, ByteSize{0x1000}, 0, kRW}, g.Dup()).ok());
    REQUIRE(d.Unmap({Gpa{0x8000}, ByteSize{0x1000}, 0}).ok());  // (the reader's copy may still hold it)
  }
  stop = true;
  t.join();
  CHECK(d.RegionCount() == 0);
}

}  // namespace vg::vfio_user
