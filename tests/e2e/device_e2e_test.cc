// F1 end to end: the real daemon, guests in separate processes, real sockets and mmaps.
#include <doctest.h>

#include <cstring>

#include "guest/guest.h"
#include "tests/e2e/harness.h"

using namespace vg;
using namespace vg::e2e;

TEST_CASE("two guest processes run the bring-up selftest against two vGPUs at once") {
  Daemon d({std::string(kUuidA) + ":small", std::string(kUuidB) + ":small"});
  REQUIRE(d.Alive());
  std::string guest = EnvOr("VGPU_GUEST", "tools/vgpu-guest");
  pid_t a = Spawn({guest, "--socket", d.Socket(0), "selftest"}, "/dev/null");
  pid_t b = Spawn({guest, "--socket", d.Socket(1), "--no-fd", "selftest"}, "/dev/null");
  CHECK(WaitExit(a) == 0);
  CHECK(WaitExit(b) == 0);
  CHECK(d.Alive());
  CHECK(d.Shutdown() == 0);
}

TEST_CASE("handshake, region layout, shared mmaps and IRQs through the guest library") {
  Daemon d({std::string(kUuidA) + ":small"});
  guest::DeviceOptions o;
  o.socket = d.Socket(0);
  o.ram_size = 4 << 20;
  auto dev = guest::Device::Open(o);
  REQUIRE(dev.ok());
  guest::Device& g = **dev;

  auto info = g.client().GetDeviceInfo();
  REQUIRE(info.ok());
  CHECK(info->num_regions == 9);
  CHECK(info->num_irqs == 5);
  CHECK(g.client().caps().twin_socket);

  // PCI identity through config-space REGION_READ.
  CHECK(g.ConfigRead32(0).value() == (uint32_t{abi::kDeviceId} << 16 | abi::kVendorId));
  CHECK(g.aperture().size() == 64ull << 20);

  // The aperture mmap and the device see the same bytes, both ways.
  std::memcpy(g.aperture().data() + 4096, "guest->device", 13);
  auto back = g.client().RegionRead(vfio_user::kBar2Region, 4096, 13);
  REQUIRE(back.ok());
  CHECK(std::memcmp(back->data(), "guest->device", 13) == 0);
  REQUIRE(g.client().RegionWrite(vfio_user::kBar2Region, 8192, std::as_bytes(std::span("device->guest", 13))).ok());
  CHECK(std::memcmp(g.aperture().data() + 8192, "device->guest", 13) == 0);

  // A daemon write to the status page is seen through the guest's mapping.
  REQUIRE(g.Write32(abi::reg::kScratch, 0x1234abcd).ok());
  CHECK(g.Status32(abi::status::kScratch) == 0x1234abcd);

  // Posted writes are not answered and are never overtaken by a later read.
  for (uint32_t i = 1; i <= 100; ++i) REQUIRE(g.Write32(abi::reg::kScratch, i, /*posted=*/true).ok());
  CHECK(g.Read32(abi::reg::kScratch).value() == 100);

  // A test interrupt arrives on the vector's eventfd; a masked one waits for unmask.
  REQUIRE(g.Write32(abi::reg::kIrqTest, abi::kVectorFence).ok());
  CHECK(g.WaitIrq(abi::kVectorFence, 2000).ok());
  REQUIRE(g.Write32(abi::reg::kIrqMask, 1u << abi::kVectorFence).ok());
  REQUIRE(g.Write32(abi::reg::kIrqTest, abi::kVectorFence).ok());
  CHECK(g.WaitIrq(abi::kVectorFence, 100).code() == Errc::kTimeout);
  REQUIRE(g.Write32(abi::reg::kIrqMask, 0).ok());
  CHECK(g.WaitIrq(abi::kVectorFence, 2000).ok());

  // Reset scrubs the aperture under the guest's mapping.
  REQUIRE(g.Reset().ok());
  CHECK(g.aperture()[4096] == std::byte{0});
  CHECK(g.Read32(abi::reg::kScratch).value() == 0);
  CHECK(g.Status32(abi::status::kResets) == 1);
}

TEST_CASE("device state survives a disconnect; DMA mappings and IRQs do not") {
  Daemon d({std::string(kUuidA) + ":small"});
  guest::DeviceOptions o;
  o.socket = d.Socket(0);
  o.ram_size = 1 << 20;
  {
    auto dev = guest::Device::Open(o);
    REQUIRE(dev.ok());
    REQUIRE((*dev)->Write32(abi::reg::kScratch, 0xfeed).ok());
    std::memcpy((*dev)->aperture().data(), "kept", 4);
    // A GTT entry into guest RAM is valid while the RAM is mapped...
    REQUIRE((*dev)->Write64(abi::kGttOffset, (*dev)->ram_base().v | abi::kGttValid | abi::kGttWritable).ok());
  }
  auto dev = guest::Device::Open(o);
  REQUIRE(dev.ok());
  CHECK((*dev)->Read32(abi::reg::kScratch).value() == 0xfeed);
  CHECK(std::memcmp((*dev)->aperture().data(), "kept", 4) == 0);
  // ...and was invalidated when the connection (and its DMA mapping) went away.
  CHECK((*dev)->Read64(abi::kGttOffset).value() == 0);
}

TEST_CASE("a second client on a busy vGPU is turned away; the first keeps working") {
  Daemon d({std::string(kUuidA) + ":small"});
  guest::DeviceOptions o;
  o.socket = d.Socket(0);
  o.ram_size = 1 << 20;
  auto first = guest::Device::Open(o);
  REQUIRE(first.ok());
  o.timeout_ms = 1000;
  auto second = guest::Device::Open(o);
  CHECK_FALSE(second.ok());
  REQUIRE((*first)->Write32(abi::reg::kScratch, 7).ok());
  CHECK((*first)->Read32(abi::reg::kScratch).value() == 7);
}

TEST_CASE("a guest that reconnects right after closing gets the vGPU (the slot frees on hang-up)") {
  Daemon d({std::string(kUuidA) + ":small"});
  guest::DeviceOptions o;
  o.socket = d.Socket(0);
  o.ram_size = 1 << 20;
  o.timeout_ms = 2000;
  for (int i = 0; i < 20; ++i) {
    auto dev = guest::Device::Open(o);
    REQUIRE_MESSAGE(dev.ok(), "reconnect " << i << ": " << dev.error().ToString());
    REQUIRE((*dev)->Write32(abi::reg::kScratch, static_cast<uint32_t>(i)).ok());
  }
}
