// Hostile guests against guest memory and DMA (F11 findings 2, 3, 8, 9, 14): each attack
// goes through the real daemon's public socket from this process while a victim tenant, in
// another process on vGPU B, runs catalogue kernels with bit-exact checks and times its
// register reads (tests/e2e/victim.h). The daemon must survive, the attacker get a named
// refusal, and the victim notice nothing.
#include <doctest.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "guest/guest.h"
#include "shaders/samples.h"
#include "tests/e2e/control.h"
#include "tests/e2e/guest_checks.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/victim.h"

using namespace vg;
using namespace vg::e2e;
using namespace vg::guest;
namespace vu = vg::vfio_user;

namespace {

struct Guest {
  std::unique_ptr<Device> dev;
  std::unique_ptr<Driver> drv;
  explicit Guest(const std::string& socket, DeviceOptions o = {}) {
    o.socket = socket;
    if (o.ram_size == DeviceOptions{}.ram_size) o.ram_size = 16 << 20;
    auto d = Device::Open(o);
    REQUIRE_MESSAGE(d.ok(), Why(d.ok() ? Ok() : Result<>(d.error())));
    dev = std::move(d).value();
    auto r = Driver::Create(*dev);
    REQUIRE_MESSAGE(r.ok(), Why(r.ok() ? Ok() : Result<>(r.error())));
    drv = std::move(r).value();
  }
};


double MsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// The victim's figures go into the log even when they pass (the report quotes them).
void CheckVictimReport(const VictimReport& r) {
  MESSAGE("victim: ", r.rounds, " rounds, ", r.reads, " reads, slowest read ", r.max_read_ms, " ms");
  CheckVictim(r);
}

std::vector<std::string> TwoVgpus() { return {std::string(kUuidA) + ":small", std::string(kUuidB) + ":small"}; }

}  // namespace

TEST_CASE("hostile DMA_MAP of memory the guest can truncate: refused by name, never a SIGBUS") {
  Daemon daemon(TwoVgpus());
  Victim v(daemon.Socket(1));
  Guest g(daemon.Socket(0));
  const uint64_t size = 2 << 20;
  Gpa at{0x4000'0000};
  // A memfd created without MFD_ALLOW_SEALING: the daemon cannot stop the guest shrinking it.
  UniqueFd mem(::memfd_create("unsealable", MFD_CLOEXEC));
  REQUIRE(mem.Valid());
  REQUIRE(::ftruncate(mem.Get(), size) == 0);
  auto mapped = g.dev->client().DmaMap({at, ByteSize{size}, 0, vu::kDmaRead | vu::kDmaWrite}, mem);
  CHECK_MESSAGE(mapped.code() == Errc::kUnsupported, "DMA_MAP of an unsealable memfd: " << Why(mapped));
  // The guest truncates it anyway and drives copies through it: the ring's commands name
  // memory there (a FILL and a COPY out of it), and a ring whose tail shadow sits there.
  auto va = g.drv->MapPages(at, size, true);
  REQUIRE(::ftruncate(mem.Get(), 0) == 0);
  if (va.ok()) {
    auto dst = g.drv->Alloc(4096);
    REQUIRE(dst.ok());
    CommandBuilder cb;
    cb.Fill(*va, 4096, 0xbad);
    cb.Copy(*va, dst->va, 4096);
    auto seq = g.drv->Submit(cb);
    if (seq.ok()) (void)g.drv->Wait(*seq, WaitMode::kIrq, 5000);
  } else {
    CHECK(va.code() == Errc::kNotMapped);  // the GTT refuses pages in no DMA region, by name
  }
  // A plain file (here on /dev/shm, tmpfs) cannot be sealed either.
  std::string path = "/dev/shm/vgpu-hostile-" + std::to_string(::getpid());
  UniqueFd file(::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
  REQUIRE(file.Valid());
  ::unlink(path.c_str());
  REQUIRE(::ftruncate(file.Get(), size) == 0);
  CHECK(g.dev->client().DmaMap({Gpa{0x8000'0000}, ByteSize{size}, 0, vu::kDmaRead}, file).code() ==
        Errc::kUnsupported);
  REQUIRE(daemon.Alive());
  REQUIRE(g.dev->ClearError().ok());
  ExpectStillWorks(g);
  CheckVictimReport(v.Stop());
  CHECK(daemon.Alive());
}

TEST_CASE("hostile sparse 16 TiB DMA_MAPs: refused by name once past the byte bound, the victim unaffected") {
  Daemon daemon(TwoVgpus());
  Victim v(daemon.Socket(1));
  Guest g(daemon.Socket(0));
  const uint64_t huge = 16ull << 40;
  UniqueFd sparse = std::move(CreateMemFd("sparse", ByteSize{huge}).value());  // no pages, 16 TiB long
  int accepted = 0;
  Errc refused = Errc::kOk;
  for (int i = 0; i < 16 && refused == Errc::kOk; ++i) {
    auto r = g.dev->client().DmaMap({Gpa{(uint64_t(i) + 1) * huge}, ByteSize{huge}, 0, vu::kDmaRead}, sparse);
    if (r.ok())
      ++accepted;
    else
      refused = r.code();
  }
  INFO("accepted ", accepted, " maps of 16 TiB");
  // kLimitExceeded travels as E2BIG, which the client reads back as kMessageTooLarge.
  CHECK(refused == Errc::kMessageTooLarge);
  CHECK(accepted == 0);  // 16 TiB is over the default 64 GiB per client
  // Smaller sparse maps up to the bound are accepted, the one past it refused.
  UniqueFd part = std::move(CreateMemFd("sparse16g", ByteSize{16ull << 30}).value());
  int small = 0;
  for (int i = 0; i < 8; ++i) {
    auto r = g.dev->client().DmaMap({Gpa{(uint64_t(i) + 1) << 41}, ByteSize{16ull << 30}, 0, vu::kDmaRead}, part);
    if (!r.ok()) {
      CHECK(r.code() == Errc::kMessageTooLarge);
      break;
    }
    ++small;
  }
  CHECK(small == 3);  // 16 MiB of guest RAM + 48 GiB fit in 64 GiB; the fourth 16 GiB do not
  REQUIRE(daemon.Alive());
  ExpectStillWorks(g);
  CheckVictimReport(v.Stop());
  CHECK(daemon.Alive());
}

TEST_CASE("hostile DMA_UNMAP while work on the memory is in flight: the loop never waits for it") {
  Daemon daemon(TwoVgpus());
  Victim v(daemon.Socket(1));
  Guest g(daemon.Socket(0));
  const uint64_t size = 1 << 20;
  auto mem = CreateMemFd("extra", ByteSize{size});
  REQUIRE(mem.ok());
  Gpa at{0x4000'0000};
  double slowest_unmap = 0;
  for (int round = 0; round < 3; ++round) {
    REQUIRE(g.dev->client().DmaMap({at, ByteSize{size}, 0, vu::kDmaRead | vu::kDmaWrite}, *mem).ok());
    auto va = g.drv->MapPages(at, size, true);
    REQUIRE(va.ok());
    shaders::SpinPush p{size / 4, 3000, 9};  // long enough to be running at the unmap
    Binding b{*va, size, abi::cmd::kAccessRead | abi::cmd::kAccessWrite};
    CommandBuilder cb;
    cb.Dispatch(static_cast<uint32_t>(shaders::KernelId::kSpin), {256, 1, 1}, std::span(&b, 1),
                shaders::PushBytes(p));
    auto seq = g.drv->Submit(cb);
    REQUIRE(seq.ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    auto t0 = std::chrono::steady_clock::now();
    auto unmapped = g.dev->client().DmaUnmap({at, ByteSize{size}, 0});
    slowest_unmap = std::max(slowest_unmap, MsSince(t0));
    uint64_t done_at_reply = g.drv->completed();
    auto w = g.drv->Wait(*seq, WaitMode::kIrq, 60000);
    // The reply came when the work let go of the memory (ok, the fence had passed), or after
    // the stated bound with kBusy; never an early "ok" while the work still used it.
    if (unmapped.ok() && w.ok()) CHECK(done_at_reply >= *seq);
    if (!unmapped.ok()) CHECK_MESSAGE(unmapped.code() == Errc::kBusy, Why(unmapped));
    CHECK(g.dev->Read64(abi::kGttOffset + (va->v >> kPageShift) * 8).value() == 0);
    REQUIRE(g.dev->ClearError().ok());
  }
  MESSAGE("slowest DMA_UNMAP reply ", slowest_unmap, " ms");
  ExpectStillWorks(g);
  // Meanwhile every other tenant was served: the waits were not on the loop.
  CheckVictimReport(v.Stop());
  CHECK(daemon.Alive());
}

TEST_CASE("hostile kBusy DMA_UNMAPs do not leak the region count") {
  // Small bounds so the attack is short: 3 regions, kBusy after 1 ms (work on the memory is
  // cancelled by the DMA_UNMAP, but the engine submission in flight still holds it longer).
  Daemon daemon(TwoVgpus(), {"--dma-max-regions", "3", "--dma-unmap-timeout-ms", "1"});
  Victim v(daemon.Socket(1));
  Guest g(daemon.Socket(0));  // its RAM is region 1
  const uint64_t size = 1 << 20;
  auto mem = CreateMemFd("extra", ByteSize{size});
  REQUIRE(mem.ok());
  Gpa at{0x4000'0000};
  int busy = 0;
  double slowest_release = 0;
  for (int round = 0; round < 4; ++round) {
    // A region whose DMA_UNMAP was answered kBusy stays charged until the engine submission
    // that uses it ends. The guest's Wait below returns at the cancellation's error report,
    // which can come before that end (a submission on the device cannot be cut): the map is
    // refused by name (kLimitExceeded, read back as kMessageTooLarge) until then, and must
    // be accepted soon after. A leaked count refuses it for ever.
    auto t0 = std::chrono::steady_clock::now();
    Result<> mapped = g.dev->client().DmaMap({at, ByteSize{size}, 0, vu::kDmaRead | vu::kDmaWrite}, *mem);
    while (!mapped.ok() && mapped.code() == Errc::kMessageTooLarge && MsSince(t0) < 20000 * SlowFactor()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      mapped = g.dev->client().DmaMap({at, ByteSize{size}, 0, vu::kDmaRead | vu::kDmaWrite}, *mem);
    }
    slowest_release = std::max(slowest_release, MsSince(t0));
    REQUIRE_MESSAGE(mapped.ok(), "round ", round, ": DMA_MAP refused: the region count leaked: ", Why(mapped));
    auto va = g.drv->MapPages(at, size, true);
    REQUIRE(va.ok());
    shaders::SpinPush p{size / 4, 3000, 9};
    Binding b{*va, size, abi::cmd::kAccessRead | abi::cmd::kAccessWrite};
    CommandBuilder cb;
    cb.Dispatch(static_cast<uint32_t>(shaders::KernelId::kSpin), {256, 1, 1}, std::span(&b, 1),
                shaders::PushBytes(p));
    auto seq = g.drv->Submit(cb);
    REQUIRE(seq.ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    auto unmapped = g.dev->client().DmaUnmap({at, ByteSize{size}, 0});
    busy += unmapped.code() == Errc::kBusy;
    (void)g.drv->Wait(*seq, WaitMode::kIrq, 60000);  // the work ends: its region is released
    REQUIRE(g.dev->ClearError().ok());
  }
  MESSAGE(busy, " of 4 DMA_UNMAPs answered kBusy; the region came back at most ", slowest_release, " ms after the wait");
  CHECK(busy > 0);
  ExpectStillWorks(g);
  CheckVictimReport(v.Stop());
  CHECK(daemon.Alive());
}

TEST_CASE("hostile guest memory without an fd, a client that never answers DMA_READ: nobody else waits") {
  Daemon daemon(TwoVgpus());
  Victim v(daemon.Socket(1));
  DeviceOptions o;
  o.share_ram_fd = false;  // every ring copy is a DMA_READ round trip to the client
  o.twin_socket = false;   // over the main socket, which this client does not read while idle
  Guest g(daemon.Socket(0), o);
  // Six kicks of the ioeventfd doorbell, each needing guest memory the client never serves.
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 6; ++i) {
    auto buf = g.drv->Alloc(4096);
    REQUIRE(buf.ok());
    CommandBuilder cb;
    cb.Fill(buf->va, 4096, 0x5eed);
    REQUIRE(g.drv->Submit(cb).ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  MESSAGE("attack ran ", MsSince(t0), " ms");
  CheckVictimReport(v.Stop());
  CHECK(daemon.Alive());
}

TEST_CASE("hostile guest memory without an fd on the twin socket, a slow client: nobody else waits") {
  Daemon daemon(TwoVgpus());
  Victim v(daemon.Socket(1));
  DeviceOptions o;
  o.share_ram_fd = false;
  o.dma_delay_ms = 400;  // each DMA_READ answered late (a slow or hostile client)
  Guest g(daemon.Socket(0), o);
  auto buf = g.drv->Alloc(4096);
  REQUIRE(buf.ok());
  for (int i = 0; i < 3; ++i) {
    CommandBuilder cb;
    cb.Fill(buf->va, 4096, 0x5100 + i);
    auto seq = g.drv->Submit(cb);
    REQUIRE(seq.ok());
    auto w = g.drv->Wait(*seq, WaitMode::kIrq, 30000);
    CHECK_MESSAGE(w.ok(), Why(w));  // slow, but served: the ring pass was fetched off the loop
    CHECK(reinterpret_cast<uint32_t*>(buf->host.data())[0] == uint32_t(0x5100 + i));
  }
  CheckVictimReport(v.Stop());
  CHECK(daemon.Alive());
}
