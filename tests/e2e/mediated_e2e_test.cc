// F3 end to end: a guest process drives the mediated path of the real daemon: buffers in
// its RAM mapped through the GTT, commands in its ring, doorbells, fences by IRQ and by
// polling. Every catalogue kernel must match the CPU reference.
#include <doctest.h>

#include <cstring>

#include "guest/guest.h"
#include "shaders/samples.h"
#include "tests/e2e/guest_checks.h"
#include "tests/e2e/harness.h"

using namespace vg;
using namespace vg::e2e;
using namespace vg::guest;

namespace {

struct Guest {
  std::unique_ptr<Device> dev;
  std::unique_ptr<Driver> drv;
  Guest(const std::string& socket, bool share_fd = true, DriverOptions dopts = {}) {
    DeviceOptions o;
    o.socket = socket;
    o.ram_size = 32 << 20;
    o.share_ram_fd = share_fd;
    auto d = Device::Open(o);
    REQUIRE_MESSAGE(d.ok(), d.error().ToString());
    dev = std::move(d).value();
    auto r = Driver::Create(*dev, dopts);
    REQUIRE_MESSAGE(r.ok(), r.error().ToString());
    drv = std::move(r).value();
  }
};

// Runs one sample through the mediated path and returns the bindings' final contents.
std::vector<std::vector<std::byte>> RunMediated(Guest& g, const shaders::KernelSample& s, WaitMode mode) {
  const shaders::KernelDesc& k = *shaders::FindKernel(s.kernel);
  std::vector<GpuBuffer> bufs;
  std::vector<Binding> binds;
  for (size_t i = 0; i < s.bindings.size(); ++i) {
    auto b = g.drv->Alloc(s.bindings[i].size());
    REQUIRE_MESSAGE(b.ok(), b.error().ToString());
    std::memcpy(b->host.data(), s.bindings[i].data(), s.bindings[i].size());
    binds.push_back(Bind(*b, AccessOf(k.bindings[i].access)));
    bufs.push_back(*b);
  }
  CommandBuilder cb;
  cb.Dispatch(s.kernel, s.groups, binds, s.push);
  auto seq = g.drv->Submit(cb);
  REQUIRE_MESSAGE(seq.ok(), seq.error().ToString());
  auto w = g.drv->Wait(*seq, mode);
  REQUIRE_MESSAGE(w.ok(), w.error().ToString());
  std::vector<std::vector<std::byte>> out;
  for (auto& b : bufs) {
    out.emplace_back(b.host.begin(), b.host.end());
    REQUIRE(g.drv->Free(b).ok());
  }
  return out;
}

}  // namespace

TEST_CASE("every catalogue kernel through the mediated path equals the CPU reference") {
  Daemon d({std::string(kUuidA) + ":small"});
  Guest g(d.Socket(0));
  for (const auto& k : shaders::AllKernels()) {
    for (uint32_t n : {1u, 257u, 3001u}) {
      CAPTURE(k.name);
      CAPTURE(n);
      auto sample = shaders::MakeSample(k.id, n, n * 7 + k.raw_id());
      auto out = RunMediated(g, sample, n % 2 ? WaitMode::kIrq : WaitMode::kPoll);
      auto check = shaders::CheckSample(sample, out);
      CHECK_MESSAGE(check.ok(), Why(check));
    }
  }
  CHECK(g.dev->Read32(abi::reg::kErrCount).value() == 0);
}

TEST_CASE("guest RAM shared without an fd: the daemon gathers and scatters over DMA_READ/WRITE") {
  Daemon d({std::string(kUuidA) + ":small"});
  Guest g(d.Socket(0), /*share_fd=*/false);
  for (auto id : {shaders::KernelId::kCopy, shaders::KernelId::kSaxpy, shaders::KernelId::kBlur3x3}) {
    auto sample = shaders::MakeSample(id, 999, 5);
    auto out = RunMediated(g, sample, WaitMode::kIrq);
    auto check = shaders::CheckSample(sample, out);
    CHECK_MESSAGE(check.ok(), Why(check));
  }
  CHECK(g.dev->client().dma_requests_served() > 0);
}

TEST_CASE("COPY, FILL, BATCH, LOAD_REG, TIMESTAMP; scattered pages; aperture; trapped doorbell") {
  Daemon d({std::string(kUuidA) + ":small"});
  DriverOptions trapped;
  trapped.use_ioeventfd = false;
  Guest g(d.Socket(0), true, trapped);
  Driver& drv = *g.drv;

  // A 3-page buffer whose pages are mapped in reverse order: not contiguous in guest RAM.
  auto backing = drv.Alloc(3 * kPageSize);
  REQUIRE(backing.ok());
  auto va = drv.ReserveVa(3 * kPageSize);
  REQUIRE(va.ok());
  for (uint32_t p = 0; p < 3; ++p)
    REQUIRE(drv.WriteGtt(static_cast<uint32_t>((va->v >> kPageShift) + p),
                         (backing->gpa.v + (2 - p) * kPageSize) | abi::kGttValid | abi::kGttWritable)
                .ok());
  auto src = drv.Alloc(3 * kPageSize);
  REQUIRE(src.ok());
  for (size_t i = 0; i < 3 * kPageSize / 4; ++i) reinterpret_cast<uint32_t*>(src->host.data())[i] = uint32_t(i * 3);

  // The aperture, mapped through the GTT too.
  auto ap_va = drv.MapAperture(0x10000, 2 * kPageSize, true);
  REQUIRE(ap_va.ok());

  auto ts = drv.Alloc(kPageSize);
  REQUIRE(ts.ok());

  // A second-level batch in guest memory.
  CommandBuilder batch;
  batch.Fill(*ap_va, 2 * kPageSize, 0xabcdef01).LoadReg(abi::reg::kScratch, 0x5151);
  auto bbuf = drv.Alloc(batch.size_bytes(), false);
  REQUIRE(bbuf.ok());
  std::memcpy(bbuf->host.data(), batch.dwords().data(), batch.size_bytes());

  CommandBuilder cb;
  cb.Copy(src->va, *va, 3 * kPageSize).Batch(bbuf->va, static_cast<uint32_t>(batch.size_bytes())).Timestamp(ts->va);
  auto seq = drv.Submit(cb);
  REQUIRE(seq.ok());
  REQUIRE(drv.Wait(*seq).ok());

  // Page p of the VA range is backing page 2-p.
  for (uint32_t p = 0; p < 3; ++p)
    CHECK(std::memcmp(backing->host.data() + (2 - p) * kPageSize, src->host.data() + p * kPageSize, kPageSize) == 0);
  for (size_t i = 0; i < 2 * kPageSize / 4; ++i)
    REQUIRE(reinterpret_cast<uint32_t*>(g.dev->aperture().data() + 0x10000)[i] == 0xabcdef01);
  CHECK(g.dev->aperture()[0x10000 + 2 * kPageSize] == std::byte{0});
  CHECK(g.dev->Read32(abi::reg::kScratch).value() == 0x5151);
  uint64_t t;
  std::memcpy(&t, ts->host.data(), 8);
  CHECK(t != 0);
  CHECK(t % abi::cmd::kDefaultTimeGranularityNs == 0);
  CHECK(g.dev->Status64(abi::status::kSubmissions) == 1);
  CHECK(g.dev->Read32(abi::reg::kErrCount).value() == 0);
}

TEST_CASE("many small submissions complete in order, by IRQ") {
  Daemon d({std::string(kUuidA) + ":small"});
  Guest g(d.Socket(0));
  auto buf = g.drv->Alloc(4096);
  REQUIRE(buf.ok());
  uint64_t last = 0;
  for (uint32_t i = 1; i <= 200; ++i) {
    CommandBuilder cb;
    cb.Fill(buf->va, 4096, i);
    auto seq = g.drv->Submit(cb);
    REQUIRE(seq.ok());
    last = *seq;
    if (i % 50 == 0) REQUIRE(g.drv->Wait(last).ok());
  }
  REQUIRE(g.drv->Wait(last).ok());
  CHECK(reinterpret_cast<uint32_t*>(buf->host.data())[1023] == 200);
  CHECK(g.drv->completed() == 200);
}
