// The executor's import cache (guest ranges imported into the engine, kept across
// submissions) against DMA_UNMAP (F11 finding 15): no cached translation may outlive its
// mapping, even when the cache is not told (the window between the removal from the DMA
// space and DropImports): a hit is only taken while the region is still in translation.
#include <doctest/doctest.h>

#include <cstring>
#include <mutex>

#include "engine/engine.h"
#include "mediator/executor.h"
#include "vfio_user/dma.h"

namespace vg::mediator {
namespace {

namespace vu = vfio_user;

constexpr uint64_t kWindow = 2ull << 20;  // the executor's import window
constexpr Gpa kAt{0x4000'0000};

struct Memory {
  UniqueFd fd;
  Mapping map;
  Memory() {
    fd = std::move(CreateMemFd("guest", ByteSize{kWindow}).value());
    map = std::move(Mapping::Map(fd, ByteSize{kWindow}, 0).value());
  }
};

PlanOp Fill(uint32_t value) {
  ResolvedRange r;
  r.va = GpuVa{0x10000};
  r.size = ByteSize{4096};
  r.write = true;
  r.spans.push_back(GttSpan{r.va, GttTarget{false, kAt.v, true}, r.size});
  return PlanFill{std::move(r), value};
}

}  // namespace

TEST_CASE("hostile: an import cached before DMA_UNMAP is never used for memory mapped after it") {
  // One engine for the process, as the daemon has (tests/remoting/rig.h does the same).
  static auto engine = engine::Engine::Create();
  REQUIRE_MESSAGE(engine.ok(), engine.error().ToString());
  vu::DmaSpace dma;
  std::vector<std::byte> aperture(1 << 20);
  std::mutex mu;
  std::vector<std::string> failures;
  Executor exec((*engine).get(), dma, aperture, {},
                ExecHooks{[](uint64_t, bool) {}, [](uint32_t, uint32_t) {},
                          [&](const Error& e) {
                            std::lock_guard lk(mu);
                            failures.push_back(e.ToString());
                          }});
  auto run = [&](uint32_t value) {
    Plan p;
    p.ops.push_back(Fill(value));
    REQUIRE(exec.Enqueue(std::move(p)).ok());
    exec.WaitIdle();
  };

  Memory a, b;
  REQUIRE(dma.Map({kAt, ByteSize{kWindow}, 0, vu::kDmaRead | vu::kDmaWrite}, a.fd.Dup().value()).ok());
  run(0x1111);
  CHECK(reinterpret_cast<uint32_t*>(a.map.data())[0] == 0x1111);
  CHECK(exec.Counters().import_misses >= 1);
  // The guest takes the memory back and maps other memory at the same address. The cache is
  // not told here: that is the window a DropImports ordered before the removal left open.
  auto drain = dma.Unmap({kAt, ByteSize{kWindow}, 0});
  REQUIRE(drain.ok());
  REQUIRE(dma.Map({kAt, ByteSize{kWindow}, 0, vu::kDmaRead | vu::kDmaWrite}, b.fd.Dup().value()).ok());
  run(0x2222);
  CHECK_MESSAGE(reinterpret_cast<uint32_t*>(b.map.data())[0] == 0x2222, "the new memory was not written");
  CHECK_MESSAGE(reinterpret_cast<uint32_t*>(a.map.data())[0] == 0x1111, "the unmapped memory was written");
  // And the stale import let go of the old region: its DMA_UNMAP can be answered.
  CHECK(drain->Idle());
  std::lock_guard lk(mu);
  CHECK(failures.empty());
}

}  // namespace vg::mediator
