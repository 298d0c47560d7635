// Daemon-side sessions with real clients, in-process over socketpairs, on the real engine:
// results equal the CPU reference, each refusal reaches the client by name and the stream
// resynchronises, a corrupt ring drops that client alone, and fire-and-forget batches
// cross the boundary rarely.
#include <doctest.h>

#include <cstring>
#include <functional>
#include <thread>

#include "shaders/samples.h"
#include "tests/remoting/rig.h"
#include "tests/remoting/run_sample.h"
#include "tests/remoting/stream.h"

using namespace vg;
using namespace vg::remoting;
using namespace vg::remoting::testing;
using guest::RemoteBuffer;
using guest::RemotingClient;
namespace w = vg::remoting::wire;

namespace {
std::string Why(const Result<>& r) { return r.ok() ? std::string("ok") : r.error().ToString(); }
template <class T>
std::vector<std::byte> Words(std::initializer_list<T> v) {
  std::vector<std::byte> b(v.size() * sizeof(T));
  std::memcpy(b.data(), std::data(v), b.size());
  return b;
}
uint32_t U32At(const std::vector<std::byte>& b, size_t i) {
  uint32_t v;
  std::memcpy(&v, b.data() + 4 * i, 4);
  return v;
}
}  // namespace

TEST_CASE("every catalogue kernel through remoting equals the CPU reference") {
  Rig rig(1);
  auto c = rig.Connect(0);
  uint32_t seed = 1;
  for (const auto& k : shaders::AllKernels()) {
    CAPTURE(std::string(k.name));
    auto s = shaders::MakeSample(k.id, 1000, seed++);
    auto out = RunSample(*c, s);
    REQUIRE_MESSAGE(out.ok(), out.error().ToString());
    auto chk = shaders::CheckSample(s, *out);
    CHECK_MESSAGE(chk.ok(), Why(chk));
  }
}

TEST_CASE("write, fill, copy, read and fences keep stream order") {
  Rig rig(1);
  auto c = rig.Connect(0);
  auto a = c->CreateBuffer(4096);
  auto b = c->CreateBuffer(4096);
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  std::vector<std::byte> init(4096);
  for (size_t i = 0; i < init.size(); ++i) init[i] = std::byte(i * 7);
  REQUIRE(c->Write(*a, 0, init).ok());
  REQUIRE(c->Fill(*a, 1024, 1024, 0xdeadbeef).ok());  // GPU after the host write
  REQUIRE(c->Copy(*a, 0, *b, 0, 4096).ok());          // GPU after the fill
  REQUIRE(c->Write(*a, 0, Words<uint32_t>({1, 2, 3, 4})).ok());  // host, after the GPU ops
  std::vector<std::byte> ra(16), rb(4096);
  REQUIRE(c->Read(*a, 0, ra).ok());
  REQUIRE(c->Read(*b, 0, rb).ok());
  CHECK(U32At(ra, 0) == 1);
  CHECK(U32At(ra, 3) == 4);
  CHECK(std::memcmp(rb.data(), init.data(), 1024) == 0);
  CHECK(U32At(rb, 256) == 0xdeadbeef);
  CHECK(U32At(rb, 511) == 0xdeadbeef);
  CHECK(std::memcmp(rb.data() + 2048, init.data() + 2048, 2048) == 0);
  auto seq = c->Submit();
  REQUIRE(seq.ok());
  CHECK(c->Wait(*seq).ok());
  CHECK(c->completed() >= *seq);
  // A write larger than the heap streams in chunks.
  auto big = c->CreateBuffer(3 << 20);
  REQUIRE(big.ok());
  std::vector<std::byte> bytes(3 << 20), back(3 << 20);
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = std::byte(i ^ (i >> 9));
  REQUIRE(c->Write(*big, 0, bytes).ok());
  REQUIRE(c->Read(*big, 0, back).ok());
  CHECK(bytes == back);
}

namespace {

struct Attack {
  const char* name;
  Errc want;
  std::function<Result<>(RemotingClient&, const RemoteBuffer& mine)> run;
};

Result<> Raw(RemotingClient& c, const Stream& s) { return c.AppendRaw(s.bytes()); }

std::vector<Attack> Attacks() {
  using K = shaders::KernelId;
  static const shaders::FillPush kFillPush{1024, 5};  // outlives the spans below
  auto fill_push = shaders::PushBytes(kFillPush);
  std::vector<Attack> a;
  a.push_back({"unknown opcode", Errc::kUnknownCommand,
               [](auto& c, auto&) { return Raw(c, Stream().Raw(0x55, 0, std::vector<std::byte>(16))); }});
  a.push_back({"truncated command", Errc::kTruncated, [](auto& c, auto&) {
                 // A header claiming 64 bytes, published with 16: resync skips to the tail.
                 return Raw(c, Stream().Raw(1, 0, std::vector<std::byte>(8), 64));
               }});
  a.push_back({"bad length", Errc::kBadLength,
               [](auto& c, auto&) { return Raw(c, Stream().Raw(8, 0, std::vector<std::byte>(24))); }});
  a.push_back({"id never created", Errc::kNotFound,
               [](auto& c, auto&) { return c.Fill(RemoteBuffer{4242, 4096}, 0, 64, 1); }});
  a.push_back({"use after destroy", Errc::kBadState, [](auto& c, auto&) -> Result<> {
                 VG_TRY_ASSIGN(auto b, c.CreateBuffer(64));
                 VG_TRY(c.DestroyBuffer(b));
                 return c.Fill(b, 0, 64, 1);
               }});
  a.push_back({"double create", Errc::kAlreadyExists,
               [](auto& c, auto& mine) -> Result<> {
                 VG_TRY(c.CreateBufferWithId(mine.id, 64));
                 return Ok();
               }});
  a.push_back({"heap offset past heap", Errc::kOutOfBounds, [](auto& c, auto& mine) {
                 return Raw(c, Stream().Cmd(w::Op::kWrite, w::WriteCmd{mine.id, 0, 0, c.heap_size() - 8, 16}));
               }});
  a.push_back({"heap size wraps", Errc::kOutOfBounds, [](auto& c, auto& mine) {
                 return Raw(c, Stream().Cmd(w::Op::kWrite, w::WriteCmd{mine.id, 0, 0, 64, ~uint64_t{0} - 32}));
               }});
  a.push_back({"range past the buffer", Errc::kOutOfBounds,
               [](auto& c, auto& mine) { return c.Copy(mine, 0, mine, mine.size - 64, 4096); }});
  a.push_back({"unknown kernel", Errc::kBadKernel, [fill_push](auto& c, auto& mine) {
                 guest::RemoteBinding b = guest::Bind(mine);
                 return c.Dispatch(77, {1, 1, 1}, std::span(&b, 1), fill_push);
               }});
  a.push_back({"kernel argument count", Errc::kBadKernel, [fill_push](auto& c, auto& mine) {
                 guest::RemoteBinding b[2] = {guest::Bind(mine), guest::Bind(mine)};
                 return c.Dispatch(static_cast<uint32_t>(K::kFill), {4, 1, 1}, b, fill_push);
               }});
  a.push_back({"kernel push limit", Errc::kOutOfBounds, [](auto& c, auto& mine) {
                 guest::RemoteBinding b = guest::Bind(mine);
                 return c.Dispatch(static_cast<uint32_t>(K::kFill), {64, 1, 1}, std::span(&b, 1),
                                   shaders::PushBytes(shaders::FillPush{1 << 20, 5}));
               }});
  return a;
}

}  // namespace

TEST_CASE("each refusal reaches the client by name; the stream resynchronises") {
  Rig rig(1);
  auto c = rig.Connect(0);
  auto mine = c->CreateBuffer(8192);
  REQUIRE(mine.ok());
  for (const auto& at : Attacks()) {
    CAPTURE(std::string(at.name));
    REQUIRE(at.run(*c, *mine).ok());
    auto seq = c->Submit();
    REQUIRE(seq.ok());
    auto r = c->Wait(*seq);
    CHECK_MESSAGE(r.code() == at.want, Why(r));
    CHECK_FALSE(c->Dead());
    // The same client keeps working after the refusal.
    REQUIRE(c->Fill(*mine, 0, 8192, 0x01010101).ok());
    std::vector<std::byte> back(8192);
    auto rr = c->Read(*mine, 0, back);
    REQUIRE_MESSAGE(rr.ok(), Why(rr));
    CHECK(U32At(back, 2047) == 0x01010101);
  }
}

TEST_CASE("a read of another client's id is refused and still answered") {
  Rig rig(2);
  auto a = rig.Connect(0);
  auto b = rig.Connect(1);
  auto theirs = b->CreateBuffer(4096);
  REQUIRE(theirs.ok());
  REQUIRE(b->Fill(*theirs, 0, 4096, 0x5a5a5a5a).ok());
  REQUIRE(b->Wait(*b->Submit()).ok());
  std::vector<std::byte> out(4096);
  auto r = a->Read(*theirs, 0, out);  // the same id number means nothing in a's namespace
  CHECK_MESSAGE(r.code() == Errc::kNotFound, Why(r));
  CHECK(U32At(out, 0) == 0);
}

TEST_CASE("per-client caps on objects and bytes") {
  Limits l;
  l.max_objects = 4;
  l.max_bytes = 64 << 10;
  Rig rig(1, l);
  auto c = rig.Connect(0);
  for (int i = 0; i < 4; ++i) REQUIRE(c->CreateBuffer(4096).ok());
  REQUIRE(c->CreateBuffer(4096).ok());  // encoded; refused by the daemon
  CHECK(c->Wait(*c->Submit()).code() == Errc::kLimitExceeded);
}

TEST_CASE("a corrupt tail drops that client alone") {
  struct Case {
    const char* name;
    std::function<void(RemotingClient&)> corrupt;
    Errc want;
  };
  std::vector<Case> cases{
      {"misaligned tail", [](RemotingClient& c) { c.StoreTail(c.tail() + 4); }, Errc::kMisaligned},
      {"ring overflow", [](RemotingClient& c) { c.StoreTail(c.tail() + c.ring_size() + 8); }, Errc::kOutOfBounds},
      {"tail behind head", [](RemotingClient& c) { c.StoreTail(c.tail() - 8); }, Errc::kOutOfBounds},
  };
  for (const auto& t : cases) {
    CAPTURE(std::string(t.name));
    Rig rig(2);
    auto bad = rig.Connect(0);
    auto good = rig.Connect(1);
    auto gb = good->CreateBuffer(4096);
    REQUIRE(gb.ok());
    REQUIRE(bad->Wait(*bad->Submit()).ok());
    t.corrupt(*bad);
    auto r = bad->Wait(bad->last_submitted() + 1, 5000);
    CHECK_MESSAGE(r.code() == t.want, Why(r));
    CHECK(bad->Dead());
    // The other client's results are exact.
    auto s = shaders::MakeSample(shaders::KernelId::kSaxpy, 777, 3);
    auto out = RunSample(*good, s);
    REQUIRE_MESSAGE(out.ok(), out.error().ToString());
    CHECK(shaders::CheckSample(s, *out).ok());
  }
}

TEST_CASE("a scribbled head line changes nothing: the daemon keeps its own") {
  Rig rig(1);
  auto c = rig.Connect(0);
  c->StoreHead(0x12345678);
  auto s = shaders::MakeSample(shaders::KernelId::kFill, 300, 1);
  c->StoreHead(0);  // the client's own space accounting reads the head; restore it
  auto out = RunSample(*c, s);
  REQUIRE_MESSAGE(out.ok(), out.error().ToString());
  CHECK(shaders::CheckSample(s, *out).ok());
}

TEST_CASE("fire-and-forget batches: wake-ups only when the daemon is idle") {
  Rig rig(1);
  auto c = rig.Connect(0);
  auto b = c->CreateBuffer(4096);
  REQUIRE(b.ok());
  REQUIRE(c->Wait(*c->Submit()).ok());
  c->ResetCounters();
  constexpr int kSubmissions = 500;
  uint64_t seq = 0;
  for (int i = 0; i < kSubmissions; ++i) {
    REQUIRE(c->Fill(*b, 0, 4096, static_cast<uint32_t>(i)).ok());
    auto s = c->Submit();
    REQUIRE(s.ok());
    seq = *s;
  }
  REQUIRE(c->Wait(seq).ok());
  const auto& n = c->counters();
  MESSAGE("per submission: wakes " << double(n.wakes_sent) / kSubmissions << ", replies waited "
                                   << double(n.replies_waited) / kSubmissions << ", ring bytes "
                                   << double(n.ring_bytes) / kSubmissions << " (" << n.wakes_sent << " wakes, "
                                   << n.wakes_suppressed << " suppressed)");
  CHECK(n.submissions == kSubmissions);
  CHECK(n.ring_bytes == kSubmissions * (32 + 16));
  CHECK(n.wakes_sent + n.wakes_suppressed == n.publishes);
  CHECK(n.replies_waited <= 1);
  std::vector<std::byte> back(4);
  REQUIRE(c->Read(*b, 0, back).ok());
  CHECK(U32At(back, 0) == kSubmissions - 1);

  // The synchronous pattern for contrast: submit, then wait for each fence.
  c->ResetCounters();
  constexpr int kSync = 100;
  for (int i = 0; i < kSync; ++i) {
    REQUIRE(c->Fill(*b, 0, 4096, static_cast<uint32_t>(i)).ok());
    REQUIRE(c->Wait(*c->Submit()).ok());
  }
  MESSAGE("submit+wait per submission: wakes " << double(n.wakes_sent) / kSync << ", replies waited "
                                               << double(n.replies_waited) / kSync);
  CHECK(n.wakes_sent <= kSync);
  CHECK(n.replies_waited <= kSync);
}

TEST_CASE("a minimum-size ring wraps many times; commands split across its end decode whole") {
  Rig rig(1);
  guest::RemotingOptions o;
  o.ring_size = w::kMinRingSize;
  auto c = rig.Connect(0, o);
  auto b = c->CreateBuffer(4096);
  REQUIRE(b.ok());
  // 40-byte COPY + 16-byte FENCE: 56 does not divide 4096, so commands straddle the end.
  auto b2 = c->CreateBuffer(4096);
  REQUIRE(b2.ok());
  for (int i = 0; i < 300; ++i) {
    REQUIRE(c->Fill(*b, 0, 4096, static_cast<uint32_t>(i)).ok());
    REQUIRE(c->Copy(*b, 0, *b2, 0, 4096).ok());
    REQUIRE(c->Submit().ok());
  }
  std::vector<std::byte> back(4096);
  REQUIRE(c->Read(*b2, 0, back).ok());
  CHECK(U32At(back, 1023) == 299);
  CHECK(c->tail() > 4 * w::kMinRingSize);  // wrapped several times
  for (const auto& k : shaders::AllKernels()) {
    auto s = shaders::MakeSample(k.id, 2000, 77);
    auto out = RunSample(*c, s);
    REQUIRE_MESSAGE(out.ok(), out.error().ToString());
    CHECK(shaders::CheckSample(s, *out).ok());
  }
  CHECK(c->LastError().count == 0);
}

TEST_CASE("publishes while the daemon is awake send no wake-up; one after it idles does") {
  // wakes_sent + wakes_suppressed == publishes holds whatever the client does; this checks
  // the rule itself. While the daemon works (here: waits on a long kernel, its IDLE flag
  // clear), a client that kicked on every publish would send one wake per submission.
  Rig rig(1);
  auto c = rig.Connect(0);
  auto spin = c->CreateBuffer(1 << 20);
  auto b = c->CreateBuffer(4096);
  REQUIRE(spin.ok());
  REQUIRE(b.ok());
  REQUIRE(c->Wait(*c->Submit()).ok());
  guest::RemoteBinding bind = guest::Bind(*spin);
  REQUIRE(c->Dispatch(static_cast<uint32_t>(shaders::KernelId::kSpin), {1024, 1, 1}, std::span(&bind, 1),
                      shaders::PushBytes(shaders::SpinPush{1 << 18, 40000, 7}))
              .ok());
  auto long_seq = c->Submit();
  REQUIRE(long_seq.ok());
  // Let the daemon take the kernel and wait on it (awake: its IDLE flag stays clear).
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  c->ResetCounters();
  constexpr int kBusy = 100;
  uint64_t seq = 0;
  for (int i = 0; i < kBusy; ++i) {
    REQUIRE(c->Fill(*b, 0, 4096, static_cast<uint32_t>(i)).ok());
    auto s = c->Submit();
    REQUIRE(s.ok());
    seq = *s;
  }
  const guest::RemotingCounters busy = c->counters();
  const bool still_running = c->completed() < *long_seq;
  MESSAGE("while busy: " << busy.wakes_sent << " wakes, " << busy.wakes_suppressed << " suppressed of "
                         << busy.publishes << " publishes");
  REQUIRE_MESSAGE(still_running, "the long kernel ended before the publishes: the test needs a longer one");
  CHECK(busy.publishes == kBusy);
  CHECK(busy.wakes_sent == 0);
  REQUIRE(c->Wait(seq, 120000).ok());
  // Now idle (the daemon stores IDLE just after its last reply: give it time to): the next
  // publish must kick, or it would never run.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  c->ResetCounters();
  REQUIRE(c->Fill(*b, 0, 4096, 0xabcd).ok());
  REQUIRE(c->Wait(*c->Submit(), 10000).ok());
  CHECK(c->counters().wakes_sent == 1);
  std::vector<std::byte> back(4);
  REQUIRE(c->Read(*b, 0, back).ok());
  CHECK(U32At(back, 0) == 0xabcd);
}
