// F4 end to end: this process is a remoting guest of the real vgpud. Every catalogue
// kernel through the remoting socket must match the CPU reference, beside the mediated
// path on the same vGPU and engine, and the daemon must shut down cleanly afterwards.
#include <doctest.h>

#include <cstring>

#include "guest/guest.h"
#include "guest/remoting_client.h"
#include "shaders/samples.h"
#include "tests/e2e/guest_checks.h"
#include "tests/e2e/harness.h"
#include "tests/remoting/run_sample.h"

using namespace vg;
using namespace vg::e2e;
using namespace vg::guest;
using vg::remoting::testing::RunSample;

namespace {

std::string RemoteSocket(const Daemon& d, const char* uuid) {
  return (d.dir() / (std::string(uuid) + ".remote.sock")).string();
}

std::unique_ptr<RemotingClient> Connect(const std::string& socket) {
  RemotingOptions o;
  o.socket = socket;
  auto c = RemotingClient::Connect(o);
  REQUIRE_MESSAGE(c.ok(), c.error().ToString());
  return std::move(c).value();
}

}  // namespace

TEST_CASE("every catalogue kernel through remoting equals the CPU reference") {
  Daemon daemon({std::string(kUuidA) + ":small"});
  REQUIRE(daemon.Alive());
  auto c = Connect(RemoteSocket(daemon, kUuidA));
  uint32_t seed = 11;
  for (uint32_t elements : {1u, 1000u, 70000u}) {
    for (const auto& k : shaders::AllKernels()) {
      CAPTURE(std::string(k.name));
      CAPTURE(elements);
      auto s = shaders::MakeSample(k.id, elements, seed++);
      auto out = RunSample(*c, s);
      REQUIRE_MESSAGE(out.ok(), out.error().ToString());
      auto chk = shaders::CheckSample(s, *out);
      CHECK_MESSAGE(chk.ok(), Why(chk));
    }
  }
  CHECK(c->LastError().count == 0);
  c.reset();
  CHECK(daemon.Shutdown() == 0);
}

TEST_CASE("remoting and mediated guests share one vGPU's engine; two remoting clients per vGPU") {
  Daemon daemon({std::string(kUuidA) + ":small", std::string(kUuidB) + ":small"});
  auto r1 = Connect(RemoteSocket(daemon, kUuidA));
  auto r2 = Connect(RemoteSocket(daemon, kUuidA));
  auto r3 = Connect(RemoteSocket(daemon, kUuidB));
  DeviceOptions o;
  o.socket = daemon.Socket(0);
  o.ram_size = 16 << 20;
  auto dev = Device::Open(o);
  REQUIRE_MESSAGE(dev.ok(), Why(dev.ok() ? Ok() : Result<>(dev.error())));
  auto drv = Driver::Create(**dev);
  REQUIRE(drv.ok());
  for (int round = 0; round < 3; ++round) {
    for (const auto& k : shaders::AllKernels()) {
      CAPTURE(std::string(k.name));
      auto s = shaders::MakeSample(k.id, 3000 + round, round);
      for (RemotingClient* c : {r1.get(), r2.get(), r3.get()}) {
        auto out = RunSample(*c, s);
        REQUIRE_MESSAGE(out.ok(), out.error().ToString());
        CHECK(shaders::CheckSample(s, *out).ok());
      }
      // The mediated path on the same vGPU, same case.
      std::vector<GpuBuffer> bufs;
      std::vector<Binding> binds;
      for (const auto& init : s.bindings) {
        auto b = (*drv)->Alloc(init.size());
        REQUIRE(b.ok());
        std::memcpy(b->host.data(), init.data(), init.size());
        binds.push_back(Bind(*b));
        bufs.push_back(*b);
      }
      CommandBuilder cb;
      cb.Dispatch(s.kernel, s.groups, binds, s.push);
      auto seq = (*drv)->Submit(cb);
      REQUIRE(seq.ok());
      REQUIRE((*drv)->Wait(*seq).ok());
      std::vector<std::vector<std::byte>> out;
      for (auto& b : bufs) {
        out.emplace_back(b.host.begin(), b.host.end());
        REQUIRE((*drv)->Free(b).ok());
      }
      CHECK(shaders::CheckSample(s, out).ok());
    }
  }
}

TEST_CASE("fire-and-forget through the daemon: crossings and bytes per submission") {
  Daemon daemon({std::string(kUuidA) + ":small"});
  auto c = Connect(RemoteSocket(daemon, kUuidA));
  auto s = shaders::MakeSample(shaders::KernelId::kSaxpy, 4096, 5);
  std::vector<RemoteBuffer> bufs;
  std::vector<RemoteBinding> binds;
  for (const auto& init : s.bindings) {
    auto b = c->CreateBuffer(init.size());
    REQUIRE(b.ok());
    REQUIRE(c->Write(*b, 0, init).ok());
    bufs.push_back(*b);
    binds.push_back(Bind(*b));
  }
  REQUIRE(c->Wait(*c->Submit()).ok());
  c->ResetCounters();
  constexpr int kN = 1000;
  uint64_t seq = 0;
  for (int i = 0; i < kN; ++i) {
    REQUIRE(c->Dispatch(s.kernel, s.groups, binds, s.push).ok());
    seq = *c->Submit();
  }
  REQUIRE(c->Wait(seq, 60000).ok());
  const auto& n = c->counters();
  MESSAGE("fire-and-forget dispatch+fence x" << kN << ": wakes/sub " << double(n.wakes_sent) / kN
                                             << ", replies/sub " << double(n.replies_waited) / kN << ", ring B/sub "
                                             << double(n.ring_bytes) / kN << ", heap B/sub "
                                             << double(n.heap_bytes_in + n.heap_bytes_out) / kN);
  // Suppression depends on timing (a daemon faster than the client idles between
  // submissions), so only the bound is asserted; the figure is in the MESSAGE above.
  CHECK(n.wakes_sent <= n.publishes);
  CHECK(n.ring_bytes == uint64_t(kN) * (8 + 24 + 2 * 24 + 8 + 16));
}
