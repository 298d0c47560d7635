// Hostile guests against the mediated path (F3). Each attack goes through the real
// daemon from this process; each must end in its named error in the error report, leave
// the daemon running and the attacker's vGPU usable, while a victim guest in another
// process runs kernels on its own vGPU and checks every result bit-exactly.
#include <doctest.h>

#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include "guest/guest.h"
#include "shaders/samples.h"
#include "tests/e2e/guest_checks.h"
#include "tests/e2e/harness.h"

using namespace vg;
using namespace vg::e2e;
using namespace vg::guest;
namespace vu = vg::vfio_user;

namespace {

// A spin kernel over 1 MiB (262144 invocations) with this many rounds each runs for
// several seconds on llvmpipe: longer than any bound the daemon might put on a wait.
constexpr uint32_t kLongSpinIterations = 60000;

struct Guest {
  std::unique_ptr<Device> dev;
  std::unique_ptr<Driver> drv;
  explicit Guest(const std::string& socket, DriverOptions dopts = {}, int reply_timeout_ms = 5000) {
    DeviceOptions o;
    o.socket = socket;
    o.ram_size = 16 << 20;
    o.timeout_ms = reply_timeout_ms;
    auto d = Device::Open(o);
    REQUIRE_MESSAGE(d.ok(), Why(d.ok() ? Ok() : Result<>(d.error())));
    dev = std::move(d).value();
    auto r = Driver::Create(*dev, dopts);
    REQUIRE(r.ok());
    drv = std::move(r).value();
  }
};

// The victim: a separate process running kernels on vGPU B until `stop` exists. Exit 0:
// every result matched the reference (and at least one ran); 1: a mismatch or an error.
pid_t StartVictim(const std::string& socket, const std::filesystem::path& stop) {
  pid_t pid = ::fork();
  if (pid != 0) return pid;
  int rounds = 0;
  {
    DeviceOptions o;
    o.socket = socket;
    o.ram_size = 16 << 20;
    auto dev = Device::Open(o);
    if (!dev.ok()) std::_Exit(3);
    auto drv = Driver::Create(**dev);
    if (!drv.ok()) std::_Exit(3);
    auto kernels = shaders::AllKernels();
    while (!std::filesystem::exists(stop) || rounds < 3) {
      const auto& k = kernels[rounds % kernels.size()];
      auto s = shaders::MakeSample(k.id, 500 + rounds, rounds);
      std::vector<GpuBuffer> bufs;
      std::vector<Binding> binds;
      for (size_t i = 0; i < s.bindings.size(); ++i) {
        auto b = (*drv)->Alloc(s.bindings[i].size());
        if (!b.ok()) std::_Exit(4);
        std::memcpy(b->host.data(), s.bindings[i].data(), s.bindings[i].size());
        binds.push_back(Bind(*b, AccessOf(k.bindings[i].access)));
        bufs.push_back(*b);
      }
      CommandBuilder cb;
      cb.Dispatch(s.kernel, s.groups, binds, s.push);
      auto seq = (*drv)->Submit(cb);
      // Generous: the DMA_UNMAP test's kernel holds the one engine queue for seconds
      // (fair sharing of GPU time is the scheduler's business, not this victim's).
      if (!seq.ok() || !(*drv)->Wait(*seq, WaitMode::kIrq, 60000).ok()) std::_Exit(5);
      std::vector<std::vector<std::byte>> out;
      for (auto& b : bufs) {
        out.emplace_back(b.host.begin(), b.host.end());
        (void)(*drv)->Free(b);
      }
      if (!shaders::CheckSample(s, out).ok()) std::_Exit(1);
      ++rounds;
    }
  }
  std::_Exit(0);
}

struct Fixture {
  Daemon daemon{{std::string(kUuidA) + ":small", std::string(kUuidB) + ":small"}};
  std::filesystem::path stop = daemon.dir() / "stop-victim";
  pid_t victim = StartVictim(daemon.Socket(1), stop);

  ~Fixture() {
    std::ofstream(stop.string()).put('x');
    int rc = WaitExit(victim, 60000);
    CHECK_MESSAGE(rc == 0, "victim exit code " << rc);
    CHECK(daemon.Alive());
  }
};

// Submits `cb` (plus the driver's fence) and expects the device to refuse it with `code`.
void ExpectRefused(Guest& g, const CommandBuilder& cb, Errc code, uint32_t source = abi::kErrSourceCommand) {
  auto seq = g.drv->Submit(cb);
  REQUIRE(seq.ok());
  auto w = g.drv->Wait(*seq, WaitMode::kIrq, 5000);
  CHECK_MESSAGE(w.code() == code, "got " << ErrcName(w.code()) << ", want " << ErrcName(code));
  auto err = g.dev->ReadError();
  REQUIRE(err.ok());
  CHECK(err->code == code);
  CHECK(err->source == source);
  REQUIRE(g.dev->ClearError().ok());
}


}  // namespace

TEST_CASE("toctou: rewriting the ring and a batch after the doorbell changes nothing") {
  Fixture f;
  DriverOptions trapped;
  trapped.use_ioeventfd = false;  // the doorbell reply means the shadow copy is taken
  Guest g(f.daemon.Socket(0), trapped);
  auto buf = g.drv->Alloc(4096);
  auto buf2 = g.drv->Alloc(4096);
  REQUIRE(buf.ok());
  REQUIRE(buf2.ok());

  // A batch that fills with 1, followed in the ring by a fill of buf2 with 2.
  CommandBuilder batch;
  batch.Fill(buf->va, 4096, 1);
  auto bb = g.drv->Alloc(batch.size_bytes(), false);
  REQUIRE(bb.ok());
  std::memcpy(bb->host.data(), batch.dwords().data(), batch.size_bytes());
  CommandBuilder cb;
  cb.Batch(bb->va, static_cast<uint32_t>(batch.size_bytes())).Fill(buf2->va, 4096, 2);
  // Slow the executor down with a spin so the rewrite lands before execution.
  auto spin_buf = g.drv->Alloc(64 * 1024);
  REQUIRE(spin_buf.ok());
  shaders::SpinPush sp{16384, 20000, 1};
  CommandBuilder slow;
  Binding sb = Bind(*spin_buf);
  slow.Dispatch(static_cast<uint32_t>(shaders::KernelId::kSpin), {64, 1, 1}, std::span(&sb, 1), shaders::PushBytes(sp));
  slow.Raw(cb.dwords());
  uint32_t ring_at = g.dev->Status32(abi::status::kRingHead);
  auto seq = g.drv->Submit(slow);
  REQUIRE(seq.ok());
  // After the doorbell: rewrite the batch to fill with 0xBAD, and the ring's fill value,
  // and turn the ring's dispatch into garbage.
  batch.Clear();
  batch.Fill(buf->va, 4096, 0xBAD);
  std::memcpy(bb->host.data(), batch.dwords().data(), batch.size_bytes());
  auto* ring = reinterpret_cast<uint32_t*>(g.drv->ring().host.data());
  size_t value_dw = (ring_at / 4 + slow.dwords().size() - 1) % (g.drv->ring().size.v / 4);
  ring[value_dw] = 0xBAD;
  ring[ring_at / 4] = 0xFF000001;  // unknown opcode where the dispatch was
  REQUIRE_MESSAGE(g.drv->Wait(*seq, WaitMode::kIrq, 20000).ok(), "audited work did not run");
  CHECK(reinterpret_cast<uint32_t*>(buf->host.data())[0] == 1);
  CHECK(reinterpret_cast<uint32_t*>(buf2->host.data())[1023] == 2);
  CHECK(g.dev->Read32(abi::reg::kErrCount).value() == 0);

  // A thread rewriting a fill's value as fast as it can while we ring: every result is a
  // value some audit saw; nothing unaudited runs.
  std::atomic<bool> stop{false};
  auto race_buf = g.drv->Alloc(4096);
  REQUIRE(race_buf.ok());
  for (int round = 0; round < 50; ++round) {
    CommandBuilder fill;
    fill.Fill(race_buf->va, 4096, 7);
    uint32_t at = g.dev->Status32(abi::status::kRingHead) / 4;
    std::thread flipper([&] {
      uint32_t n = static_cast<uint32_t>(g.drv->ring().size.v / 4);
      while (!stop.load()) {
        ring[(at + 5) % n] = 8;
        ring[(at + 5) % n] = 7;
      }
    });
    auto s = g.drv->Submit(fill);
    stop = true;
    flipper.join();
    stop = false;
    REQUIRE(s.ok());
    REQUIRE(g.drv->Wait(*s).ok());
    uint32_t v = reinterpret_cast<uint32_t*>(race_buf->host.data())[1023];
    CHECK((v == 7 || v == 8));
  }
}

TEST_CASE("hostile GTT: outside guest memory, another guest's memory, unaligned, bad flags") {
  Fixture f;
  Guest g(f.daemon.Socket(0));
  uint64_t ram_end = g.dev->ram_base().v + g.dev->ram().size();
  const uint32_t index = g.dev->gtt_entries() - 1;  // a slot the driver never used
  auto entry_err = [&](uint64_t entry) {
    (void)g.drv->WriteGtt(index, entry);
    return g.dev->ReadError();
  };
  auto e = entry_err(ram_end | abi::kGttValid);  // right past this guest's RAM
  REQUIRE(e.ok());
  CHECK(e->code == Errc::kNotMapped);
  CHECK(e->source == abi::kErrSourceGtt);
  CHECK(e->addr == ram_end);
  // The victim's RAM sits at the same guest-physical addresses in its own DMA space; the
  // only way to name memory outside ours is an address we were not given.
  e = entry_err((g.dev->ram_base().v - kPageSize) | abi::kGttValid);
  CHECK(e->code == Errc::kNotMapped);
  e = entry_err((g.dev->ram_base().v + 0x800) | abi::kGttValid);  // unaligned page
  CHECK(e->code == Errc::kBadFlags);
  e = entry_err(g.dev->ram_base().v | abi::kGttValid | 0x40);
  CHECK(e->code == Errc::kBadFlags);
  e = entry_err((uint64_t{1} << 40) | abi::kGttValid | abi::kGttAperture);
  CHECK(e->code == Errc::kOutOfBounds);
  CHECK(g.dev->Read64(abi::kGttOffset + index * 8).value() == 0);  // nothing refused was stored
  REQUIRE(g.dev->ClearError().ok());
  ExpectStillWorks(g);
}

TEST_CASE("hostile VA ranges and commands: each refusal named, the ring moves on") {
  Fixture f;
  Guest g(f.daemon.Socket(0));
  auto buf = g.drv->Alloc(2 * kPageSize);
  REQUIRE(buf.ok());
  uint64_t va_limit = uint64_t{g.dev->gtt_entries()} << kPageShift;

  SUBCASE("VA outside the GTT") {
    CommandBuilder cb;
    cb.Fill(GpuVa{va_limit}, 4096, 1);
    ExpectRefused(g, cb, Errc::kNotMapped);
  }
  SUBCASE("VA range straddling an unmapped page") {
    auto hole = g.drv->ReserveVa(kPageSize);  // reserved, never mapped
    REQUIRE(hole.ok());
    CommandBuilder cb;
    cb.Copy(buf->va, GpuVa{hole->v - 8}, 16);
    ExpectRefused(g, cb, Errc::kNotMapped);
  }
  SUBCASE("VA range wrapping around") {
    CommandBuilder cb;
    cb.Fill(GpuVa{~0ull - 7}, 64, 1);
    ExpectRefused(g, cb, Errc::kOutOfBounds);
  }
  SUBCASE("write to a read-only mapping") {
    auto ro = g.drv->Alloc(4096, /*writable=*/false);
    REQUIRE(ro.ok());
    CommandBuilder cb;
    cb.Fill(ro->va, 4096, 1);
    ExpectRefused(g, cb, Errc::kAccessDenied);
  }
  SUBCASE("unknown opcode") {
    CommandBuilder cb;
    uint32_t bad[] = {abi::cmd::Header(0x7f, 1)};
    cb.Raw(bad);
    ExpectRefused(g, cb, Errc::kUnknownCommand);
  }
  SUBCASE("length shorter and longer than the table allows") {
    CommandBuilder shorter;
    uint32_t s[] = {abi::cmd::Header(abi::cmd::kFill, 5), 0, 0, 0, 0};
    shorter.Raw(s);
    ExpectRefused(g, shorter, Errc::kBadLength);
    CommandBuilder longer;
    uint32_t l[] = {abi::cmd::Header(abi::cmd::kCopy, 8), 0, 0, 0, 0, 0, 0, 0};
    longer.Raw(l);
    ExpectRefused(g, longer, Errc::kBadLength);
    // A dispatch whose length disagrees with its own binding count.
    shaders::CopyPush p{16};
    Binding b2[2] = {Bind(*buf), Bind(*buf)};
    CommandBuilder d;
    d.Dispatch(static_cast<uint32_t>(shaders::KernelId::kCopy), {1, 1, 1}, b2, shaders::PushBytes(p));
    std::vector<uint32_t> dw(d.dwords().begin(), d.dwords().end());
    dw[0] = abi::cmd::Header(abi::cmd::kDispatch, static_cast<uint32_t>(dw.size() + 1));
    dw.push_back(0);
    CommandBuilder lying;
    lying.Raw(dw);
    ExpectRefused(g, lying, Errc::kBadLength);
  }
  SUBCASE("truncated command at the tail") {
    uint32_t t[] = {abi::cmd::Header(abi::cmd::kCopy, 7), 0, 0};
    REQUIRE(g.drv->SubmitRaw(t).ok());
    auto w = g.drv->Wait(1, WaitMode::kIrq, 5000);
    CHECK(w.code() == Errc::kTruncated);
    REQUIRE(g.dev->ClearError().ok());
  }
  SUBCASE("batch that starts itself, and nesting past the limit") {
    auto bb = g.drv->Alloc(4096, false);
    REQUIRE(bb.ok());
    CommandBuilder self;
    self.Batch(bb->va, 16);
    std::memcpy(bb->host.data(), self.dwords().data(), self.size_bytes());
    CommandBuilder cb;
    cb.Batch(bb->va, 16);
    ExpectRefused(g, cb, Errc::kRecursion);
  }
  SUBCASE("privileged registers through LOAD_REG") {
    CommandBuilder cb;
    cb.LoadReg(abi::priv::kGlobalReset, 1);
    ExpectRefused(g, cb, Errc::kPrivileged);
    CommandBuilder ring;
    ring.LoadReg(abi::reg::kRingBaseLo, 0);
    ExpectRefused(g, ring, Errc::kAccessDenied);
  }
  SUBCASE("enormous group counts, binding counts and copy sizes") {
    shaders::FillPush p{16, 1};
    Binding one = Bind(*buf);
    CommandBuilder groups;
    groups.Dispatch(static_cast<uint32_t>(shaders::KernelId::kFill), {0xffffffffu, 0xffffffffu, 1}, std::span(&one, 1),
                    shaders::PushBytes(p));
    ExpectRefused(g, groups, Errc::kLimitExceeded);
    Binding many[3] = {one, one, one};
    CommandBuilder binds;
    binds.Dispatch(static_cast<uint32_t>(shaders::KernelId::kFill), {1, 1, 1}, many, shaders::PushBytes(p));
    ExpectRefused(g, binds, Errc::kBadKernel);
    CommandBuilder kernel;
    kernel.Dispatch(999, {1, 1, 1}, std::span(&one, 1), shaders::PushBytes(p));
    ExpectRefused(g, kernel, Errc::kBadKernel);
    CommandBuilder copy;
    copy.Copy(buf->va, GpuVa{buf->va.v + (1ull << 40)}, 1ull << 40);
    ExpectRefused(g, copy, Errc::kLimitExceeded);
    // A binding smaller than what the push constants make the kernel touch.
    shaders::FillPush big{1u << 20, 1};
    CommandBuilder small;
    small.Dispatch(static_cast<uint32_t>(shaders::KernelId::kFill), {1, 1, 1}, std::span(&one, 1),
                   shaders::PushBytes(big));
    ExpectRefused(g, small, Errc::kOutOfBounds);
  }
  ExpectStillWorks(g);
}

TEST_CASE("hostile registers: privileged MMIO, ring outside memory, tail past the ring, doorbell storms") {
  Fixture f;
  Guest g(f.daemon.Socket(0));
  CHECK(g.dev->Write32(abi::priv::kGlobalReset, 1).code() != Errc::kOk);
  CHECK(g.dev->ReadError()->code == Errc::kPrivileged);
  CHECK(g.dev->Write32(abi::priv::kPowerGate, 1).code() != Errc::kOk);
  CHECK(g.dev->Write32(abi::reg::kRingTail, 1u << 30).code() != Errc::kOk);
  CHECK(g.dev->ReadError()->code == Errc::kOutOfBounds);
  REQUIRE(g.dev->ClearError().ok());

  // Doorbell storms: thousands of kicks, posted tail writes and ioeventfd signals.
  for (int i = 0; i < 3000; ++i) {
    REQUIRE(g.dev->Kick().ok());
    REQUIRE(g.dev->Write32(abi::reg::kDoorbellKick, 0, /*posted=*/true).ok());
  }
  for (int i = 0; i < 500; ++i) REQUIRE(g.dev->Write32(abi::reg::kRingTail, 0, /*posted=*/true).ok());
  CHECK(g.dev->Read32(abi::reg::kId).value() == abi::kIdMagic);
  ExpectStillWorks(g);

  // A ring whose base points at unmapped GPU VA: the doorbell is refused by name.
  REQUIRE(g.dev->Write32(abi::reg::kCtrl, 0).ok());
  REQUIRE(g.dev->Write64(abi::reg::kRingBaseLo, uint64_t{g.dev->gtt_entries() - 1} << kPageShift).ok());
  REQUIRE(g.dev->Write32(abi::reg::kCtrl, abi::kCtrlRingEnable).ok());
  REQUIRE(g.dev->Write32(abi::reg::kRingTail, 64).ok());
  auto err = g.dev->ReadError();
  CHECK(err->code == Errc::kNotMapped);
  CHECK(err->source == abi::kErrSourceRing);
}

TEST_CASE("hostile DMA_UNMAP of memory while work on it is in flight") {
  Fixture f;
  // A client that waits as long as the daemon takes to answer DMA_UNMAP: the rule is about
  // what the device does after the answer, however late it comes.
  Guest g(f.daemon.Socket(0), {}, 120000);
  // Extra guest memory in its own DMA region, written by a kernel that runs for longer
  // than any wait the daemon might bound DMA_UNMAP by.
  const uint64_t size = 1 << 20;
  auto mem = CreateMemFd("extra", ByteSize{size});
  REQUIRE(mem.ok());
  auto mine = Mapping::Map(*mem, ByteSize{size}, 0);  // the guest's own view of that memory
  REQUIRE(mine.ok());
  Gpa at{0x4000'0000};
  REQUIRE(g.dev->client().DmaMap({at, ByteSize{size}, 0, vu::kDmaRead | vu::kDmaWrite}, *mem).ok());
  auto va = g.drv->MapPages(at, size, true);
  REQUIRE(va.ok());
  shaders::SpinPush p{size / 4, kLongSpinIterations, 9};
  Binding b{*va, size, abi::cmd::kAccessRead | abi::cmd::kAccessWrite};
  CommandBuilder cb;
  cb.Dispatch(static_cast<uint32_t>(shaders::KernelId::kSpin), {256, 1, 1}, std::span(&b, 1), shaders::PushBytes(p));
  auto seq = g.drv->Submit(cb);
  REQUIRE(seq.ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the kernel is running
  auto unmapped = g.dev->client().DmaUnmap({at, ByteSize{size}, 0});
  // The rule under test: once DMA_UNMAP is answered (whatever it says), the device never
  // reads or writes that memory again. The guest now owns it: it writes a canary over all
  // of it, and the kernel, if it were still using the memory, would overwrite it.
  const bool answered = unmapped.ok() || (unmapped.code() != Errc::kTimeout && unmapped.code() != Errc::kPeerClosed);
  constexpr uint32_t kCanary = 0xC0FFEE11;
  auto words = std::span(reinterpret_cast<uint32_t*>(mine->data()), size / 4);
  if (answered) std::fill(words.begin(), words.end(), kCanary);
  auto w = g.drv->Wait(*seq, WaitMode::kIrq, 120000);
  INFO("DMA_UNMAP: " << ErrcName(unmapped.code()) << ", work: " << ErrcName(w.code()));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  REQUIRE_MESSAGE(answered, "DMA_UNMAP got no answer from the daemon");
  const size_t touched = static_cast<size_t>(std::count_if(words.begin(), words.end(), [](uint32_t x) { return x != kCanary; }));
  CHECK_MESSAGE(touched == 0, touched << " words of unmapped memory were written after DMA_UNMAP was answered");
  // The GTT entries into the unmapped region were invalidated.
  CHECK(g.dev->Read64(abi::kGttOffset + (va->v >> kPageShift) * 8).value() == 0);
  REQUIRE(g.dev->ClearError().ok());
  ExpectStillWorks(g);
}

TEST_CASE("hostile guest killed mid-submission") {
  Fixture f;
  for (int round = 0; round < 3; ++round) {
    pid_t pid = ::fork();
    if (pid == 0) {
      DeviceOptions o;
      o.socket = f.daemon.Socket(0);
      o.ram_size = 8 << 20;
      auto dev = Device::Open(o);
      if (!dev.ok()) std::_Exit(2);
      auto drv = Driver::Create(**dev);
      if (!drv.ok()) std::_Exit(3);
      auto buf = (*drv)->Alloc(1 << 20);
      if (!buf.ok()) std::_Exit(4);
      shaders::SpinPush p{(1 << 20) / 4, 2000, 1};
      Binding b = Bind(*buf);
      for (int i = 0; i < 4; ++i) {
        CommandBuilder cb;
        cb.Dispatch(static_cast<uint32_t>(shaders::KernelId::kSpin), {256, 1, 1}, std::span(&b, 1),
                    shaders::PushBytes(p));
        (void)(*drv)->Submit(cb);
      }
      ::kill(::getpid(), SIGKILL);
    }
    CHECK(WaitExit(pid, 30000) == 128 + SIGKILL);
  }
  // The vGPU comes back for the next guest.
  Guest g(f.daemon.Socket(0));
  ExpectStillWorks(g);
}
