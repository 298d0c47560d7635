// Host-memory wraps: zero-copy import where the device and the alignment allow it,
// staging where not. The counters prove which path ran.
#include <sys/mman.h>

#include <thread>

#include "base/fd.h"
#include "fixture.h"

using namespace std::chrono_literals;

using namespace vg;
using namespace vg::engine;
using namespace vg::engine::testing;
using namespace vg::shaders;

namespace {

// A memfd mapping, like a guest DMA region or an aperture.
struct Region {
  UniqueFd fd;
  Mapping map;
};
Region MakeRegion(uint64_t size) {
  auto fd = CreateMemFd("engine-test", ByteSize{size});
  REQUIRE(fd.ok());
  auto m = Mapping::Map(*fd, ByteSize{size}, 0);
  REQUIRE(m.ok());
  return {std::move(fd).value(), std::move(m).value()};
}

// Copies `n` words from src to dst with the copy kernel and a fill of the first word.
void CopyAndCheck(Engine& e, const BufferRef& src, const BufferRef& dst, uint32_t n) {
  auto words = RandomU32(n, n);
  std::memcpy(src->Map().data(), words.data(), n * 4);
  Submission s;
  s.Dispatch(2, Groups1D(*FindKernel(KernelId::kCopy), n), {Whole(src), Whole(dst)}, PushBytes(CopyPush{n}));
  s.Fill(dst, ByteSize{0}, ByteSize{4}, 0x600d);
  auto r = e.SubmitAndWait(std::move(s));
  REQUIRE_MESSAGE(r.ok(), r.error().ToString());
  words[0] = 0x600d;
  CHECK(FromBytes<uint32_t>(dst->Map()) == words);
}

}  // namespace

TEST_CASE("device reports what it offers") {
  const DeviceInfo& i = TheEngine().Info();
  MESSAGE(i.ToString());
  CHECK(!i.name.empty());
  CHECK(i.max_storage_buffer_range > 0);
  CHECK(i.max_group_count[0] >= 65535);
  CHECK(i.min_storage_offset_alignment > 0);
  if (i.external_memory_host) CHECK(i.host_import_alignment > 0);
}

TEST_CASE("CreateBuffer is zeroed and host-visible") {
  auto b = TheEngine().CreateBuffer(ByteSize{10000});
  REQUIRE(b.ok());
  CHECK((*b)->path() == MemoryPath::kDevice);
  CHECK((*b)->size().v == 10000);
  auto m = (*b)->Map();
  CHECK(std::all_of(m.begin(), m.end(), [](std::byte x) { return x == std::byte{0}; }));
  CHECK(TheEngine().CreateBuffer(ByteSize{0}).code() == Errc::kInvalidArgument);
  CHECK(TheEngine().CreateBuffer(ByteSize{uint64_t{1} << 60}).code() == Errc::kLimitExceeded);
}

TEST_CASE("page-aligned host memory is imported zero-copy") {
  Engine& e = TheEngine();
  if (!e.Info().external_memory_host) {
    MESSAGE("device lacks VK_EXT_external_memory_host; zero-copy not tested");
    return;
  }
  Region r = MakeRegion(256 * 1024);
  auto before = e.Counters();
  auto src = e.WrapHostMemory(r.map.bytes().first(64 * 1024));
  // 16-byte aligned but not page-aligned, odd length: rounded out internally.
  auto dst = e.WrapHostMemory(r.map.bytes().subspan(128 * 1024 + 16, 4000 * 4));
  REQUIRE(src.ok());
  REQUIRE(dst.ok());
  CHECK((*src)->path() == MemoryPath::kZeroCopy);
  CHECK((*dst)->path() == MemoryPath::kZeroCopy);
  CHECK(e.Counters().bytes_zero_copy - before.bytes_zero_copy == 64 * 1024 + 4000 * 4);
  // Guard bytes just outside the wrapped span must survive.
  std::memset(r.map.data() + 128 * 1024, 0x5a, 16);
  std::memset(r.map.data() + 128 * 1024 + 16 + 16000, 0x5a, 16);
  CopyAndCheck(e, *src, *dst, 4000);
  auto after = e.Counters();
  CHECK(after.bytes_staged_in == before.bytes_staged_in);
  CHECK(after.bytes_staged_out == before.bytes_staged_out);
  for (int i = 0; i < 16; ++i) {
    CHECK(r.map.data()[128 * 1024 + i] == std::byte{0x5a});
    CHECK(r.map.data()[128 * 1024 + 16 + 16000 + i] == std::byte{0x5a});
  }
  // The GPU wrote straight into the caller's mapping: visible through the memfd too.
  uint32_t w0;
  REQUIRE(pread(r.fd.Get(), &w0, 4, 128 * 1024 + 16) == 4);
  CHECK(w0 == 0x600d);
}

TEST_CASE("a misaligned host pointer is staged, counted both ways") {
  Engine& e = TheEngine();
  Region r = MakeRegion(64 * 1024);
  auto before = e.Counters();
  auto src = e.WrapHostMemory(r.map.bytes().subspan(4, 1000 * 4));
  auto dst = e.WrapHostMemory(r.map.bytes().subspan(32 * 1024 + 4, 1000 * 4));
  REQUIRE(src.ok());
  REQUIRE(dst.ok());
  CHECK((*src)->path() == MemoryPath::kStaged);
  CHECK((*dst)->path() == MemoryPath::kStaged);
  std::memset(r.map.data() + 32 * 1024, 0x5a, 4);
  CopyAndCheck(e, *src, *dst, 1000);
  auto after = e.Counters();
  CHECK(after.bytes_zero_copy == before.bytes_zero_copy);
  // In: src binding + dst binding + fill range; out: dst binding + fill range.
  CHECK(after.bytes_staged_in - before.bytes_staged_in == 4000 + 4000 + 4);
  CHECK(after.bytes_staged_out - before.bytes_staged_out == 4000 + 4);
  for (int i = 0; i < 4; ++i) CHECK(r.map.data()[32 * 1024 + i] == std::byte{0x5a});
}

TEST_CASE("pipelined submissions through one staged buffer see each other's writes") {
  Engine& e = TheEngine();
  Region r = MakeRegion(64 * 1024);
  const uint32_t n = 1000;
  auto staged = e.WrapHostMemory(r.map.bytes().subspan(4, n * 4));
  REQUIRE(staged.ok());
  REQUIRE((*staged)->path() == MemoryPath::kStaged);
  auto sum = e.CreateBuffer(ByteSize{4});
  REQUIRE(sum.ok());
  const KernelDesc& red = *FindKernel(KernelId::kReduceSum);
  std::vector<TokenRef> tokens;
  for (uint32_t i = 1; i <= 5; ++i) {
    // A slow completion callback holds up the completion thread, so the fill below has
    // run on the device but is not yet copied back when the reduction is submitted. The
    // reduction must still see the fill's device writes, not the stale host bytes.
    Submission z, w, s;
    auto t0 = e.Submit(std::move(z), {[](const Result<>&) { std::this_thread::sleep_for(20ms); }});
    w.Fill(*staged, ByteSize{0}, ByteSize{n * 4}, i);
    auto t1 = e.Submit(std::move(w));
    std::this_thread::sleep_for(5ms);
    s.Dispatch(5, Groups1D(red, n), {Whole(*staged), Whole(*sum)}, PushBytes(ReduceSumPush{n}));
    auto t2 = e.Submit(std::move(s));
    REQUIRE(t0.ok());
    REQUIRE(t1.ok());
    REQUIRE(t2.ok());
    tokens.push_back(*t2);
  }
  for (auto& t : tokens) CHECK(t->Wait(30s).ok());
  CHECK(FromBytes<uint32_t>((*sum)->Map())[0] == n * (5 * 6 / 2));
  CHECK(FromBytes<uint32_t>((*staged)->Map())[n - 1] == 5);
}

TEST_CASE("overlapping zero-copy wraps of the same pages") {
  Engine& e = TheEngine();
  Region r = MakeRegion(16 * 1024);
  auto a = e.WrapHostMemory(r.map.bytes().subspan(0, 4096 + 64));
  auto b = e.WrapHostMemory(r.map.bytes().subspan(4096, 4096));
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  Submission s;
  s.Fill(*a, ByteSize{4096}, ByteSize{64}, 0x77);
  s.Copy(*b, ByteSize{0}, *a, ByteSize{0}, ByteSize{64});
  REQUIRE(e.SubmitAndWait(std::move(s)).ok());
  auto w = FromBytes<uint32_t>(r.map.bytes().first(64));
  CHECK(w == std::vector<uint32_t>(16, 0x77));
}

TEST_CASE("allow_zero_copy=false forces staging; buffers are per engine") {
  auto e2 = Engine::Create({.allow_zero_copy = false});
  REQUIRE(e2.ok());
  Region r = MakeRegion(64 * 1024);
  auto b = (*e2)->WrapHostMemory(r.map.bytes().first(4096));
  REQUIRE(b.ok());
  CHECK((*b)->path() == MemoryPath::kStaged);
  CopyAndCheck(**e2, *b, *(*e2)->WrapHostMemory(r.map.bytes().subspan(8192, 4096)), 1024);
  CHECK((*e2)->Counters().bytes_staged_in == 4096 * 2 + 4);
  // A buffer from another engine is refused, not used.
  auto foreign = TheEngine().CreateBuffer(ByteSize{4096});
  REQUIRE(foreign.ok());
  Submission s;
  s.Fill(*foreign, ByteSize{0}, ByteSize{4}, 1);
  CHECK((*e2)->Validate(s).code() == Errc::kInvalidArgument);
  CHECK(TheEngine().WrapHostMemory({}).code() == Errc::kInvalidArgument);
}

TEST_CASE("bindings past maxStorageBufferRange are refused; windows of a big buffer work") {
  Engine& e = TheEngine();
  uint64_t range = e.Info().max_storage_buffer_range;
  if (range > (uint64_t{1} << 30)) return;  // not worth a >1 GiB mapping in a unit test
  // Sparse memfd: nothing is touched unless a submission runs.
  Region r = MakeRegion(range + 2 * kPageSize);
  auto big = e.WrapHostMemory(r.map.bytes());
  REQUIRE(big.ok());
  uint32_t n = static_cast<uint32_t>((range + 4) / 4);
  Submission s;
  s.Dispatch(1, {65535, 2, 1}, {Whole(*big)}, PushBytes(FillPush{n, 1}));
  CHECK(e.Validate(s).code() == Errc::kLimitExceeded);
  // The same buffer bound in pieces: a window at the end.
  Submission w;
  w.Dispatch(1, {1, 1, 1}, {{*big, ByteSize{range}, ByteSize{1024}}}, PushBytes(FillPush{256, 0xabc}));
  REQUIRE(e.SubmitAndWait(std::move(w)).ok());
  uint32_t v;
  std::memcpy(&v, r.map.data() + range + 1020, 4);
  CHECK(v == 0xabc);
}
