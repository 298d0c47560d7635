// Client <-> Listener over a real unix socket: the server's libevent loop on its own thread
// (or in the parent while a forked child is the client).
#include <doctest/doctest.h>
#include <event2/event.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>

#include "tests/vfio_user/fake_device.h"

namespace vg::vfio_user::test {
namespace {

std::string SocketPath(const char* tag) { return fmt::format("/tmp/vgpud-vfio-test-{}-{}.sock", tag, ::getpid()); }

// Runs a Listener's loop on a thread; a 5 ms timer checks the stop flag (no cross-thread
// loopbreak needed).
struct ServerThread {
  FakeDevice dev;
  event_base* base = event_base_new();
  std::unique_ptr<Listener> listener;
  std::atomic<bool> stop{false};
  event* tick = nullptr;
  std::thread t;

  explicit ServerThread(const std::string& path, ServerLimits l = {}) {
    auto r = Listener::Create(base, path, dev, l);
    REQUIRE(r.ok());
    listener = std::move(*r);
    tick = event_new(base, -1, EV_PERSIST, &ServerThread::OnTick, this);
    timeval tv{0, 5000};
    event_add(tick, &tv);
    t = std::thread([this] { event_base_dispatch(base); });
  }
  static void OnTick(int, short, void* arg) {
    auto* self = static_cast<ServerThread*>(arg);
    if (self->stop) event_base_loopbreak(self->base);
  }
  ~ServerThread() {
    stop = true;
    t.join();
    listener.reset();
    event_free(tick);
    event_base_free(base);
  }
};

bool WaitFor(const std::function<bool()>& pred, int ms = 2000) {
  for (int i = 0; i < ms; ++i) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return pred();
}

// Guest RAM for fd-less DMA: what the client's DMA handler serves.
struct GuestRam {
  std::mutex mu;
  std::vector<std::byte> mem = std::vector<std::byte>(0x4000);
  uint64_t base = 0x800000;
  DmaHandler Handler() {
    return [this](bool is_write, Gpa a, std::span<std::byte> buf) -> Result<> {
      std::lock_guard lk(mu);
      VG_ERROR_IF(a.v < base || !RangeWithin(a.v - base, buf.size(), mem.size()), Errc::kOutOfBounds, "bad dma");
      if (is_write)
        std::memcpy(mem.data() + (a.v - base), buf.data(), buf.size());
      else
        std::memcpy(buf.data(), mem.data() + (a.v - base), buf.size());
      return Ok();
    };
  }
};

}  // namespace

TEST_CASE("client drives every command against a real listener") {
  std::string path = SocketPath("all");
  ServerThread srv(path);
  GuestRam ram;  // outlives the client's twin thread
  auto c = Client::Connect(path, 2000);
  REQUIRE(c.ok());
  Client& cl = **c;
  auto caps = cl.Negotiate({}, ram.Handler());
  REQUIRE(caps.ok());
  CHECK(caps->twin_socket);
  CHECK(caps->write_multiple);
  CHECK(!caps->migration);
  CHECK(caps->max_msg_fds == 16);
  CHECK(WaitFor([&] { return srv.dev.connects == 1; }));

  // DEVICE_GET_INFO
  auto info = cl.GetDeviceInfo();
  REQUIRE(info.ok());
  CHECK(info->num_regions == kNumPciRegions);

  // DEVICE_GET_REGION_INFO: two round trips (argsz), sparse areas, shared fd.
  auto bar2 = cl.GetRegionInfo(kBar2Region);
  REQUIRE(bar2.ok());
  REQUIRE(bar2->sparse.size() == 2);
  CHECK(bar2->sparse[1].offset == 0x2000);
  REQUIRE(bar2->fd.Valid());
  auto map = Mapping::Map(bar2->fd, ByteSize{kBar2Size}, bar2->info.offset).value();
  auto dev_map = Mapping::Map(srv.dev.bar2_fd(), ByteSize{kBar2Size}, 0).value();
  dev_map.data()[0x2100] = std::byte{0x5c};  // a write by the "daemon"...
  CHECK(map.data()[0x2100] == std::byte{0x5c});  // ...is seen by the guest
  CHECK(cl.GetRegionInfo(42).code() == Errc::kInvalidArgument);  // kBadRegion -> EINVAL

  // DEVICE_GET_REGION_IO_FDS
  auto iofds = cl.GetRegionIoFds(kBar0Region);
  REQUIRE(iofds.ok());
  REQUIRE(iofds->subregions.size() == 1);
  REQUIRE(iofds->fds.size() == 1);
  uint64_t one = 1;
  REQUIRE(::write(iofds->fds[0].Get(), &one, 8) == 8);
  CHECK(srv.dev.doorbell().Wait(1000).value() == 1);

  // DEVICE_GET_IRQ_INFO + DEVICE_SET_IRQS: the device's trigger reaches the guest's eventfd.
  auto irq = cl.GetIrqInfo(kIrqMsix);
  REQUIRE(irq.ok());
  CHECK(irq->count == 4);
  auto ev = EventFd::Create().value();
  int evfd = ev.Get();
  REQUIRE(cl.SetIrqs({kIrqSetDataEventfd | kIrqSetActionTrigger, kIrqMsix, 0, 1}, std::span<const int>(&evfd, 1))
              .ok());
  CHECK(srv.dev.irqs().Trigger(kIrqMsix, 0).value());
  CHECK(ev.Wait(1000).value() == 1);
  // Vectors beyond the index: kOutOfBounds travels as EFAULT and maps back.
  CHECK(cl.SetIrqs({kIrqSetDataEventfd | kIrqSetActionTrigger, kIrqMsix, 3, 2}, {}).code() == Errc::kOutOfBounds);

  // REGION_WRITE posted, then REGION_READ: ordered.
  for (uint8_t i = 1; i <= 10; ++i)
    REQUIRE(cl.RegionWrite(kBar0Region, 0x80, Bytes({i, 0, 0, 0}), /*posted=*/true).ok());
  auto rd = cl.RegionRead(kBar0Region, 0x80, 4);
  REQUIRE(rd.ok());
  CHECK((*rd)[0] == std::byte{10});
  CHECK(cl.RegionRead(kBar0Region, kBar0Size, 4).code() == Errc::kOutOfBounds);
  CHECK(cl.RegionWrite(kRoRegion, 0, Bytes({1})).code() == Errc::kAccessDenied);

  // REGION_WRITE_MULTI
  std::vector<MultiWrite> mw = {{kBar0Region, 0x90, Bytes({1, 2})}, {kConfigRegion, 0x10, Bytes({3})}};
  REQUIRE(cl.RegionWriteMulti(mw).ok());
  CHECK((*cl.RegionRead(kConfigRegion, 0x10, 1))[0] == std::byte{3});

  // DMA_MAP with a memfd: the device writes guest RAM directly.
  auto ramfd = CreateMemFd("guest-ram", ByteSize{0x4000}).value();
  auto ram_map = Mapping::Map(ramfd, ByteSize{0x4000}, 0).value();
  REQUIRE(cl.DmaMap({Gpa{0x100000}, ByteSize{0x4000}, 0, kDmaRead | kDmaWrite}, ramfd).ok());
  CHECK(cl.DmaMap({Gpa{0x101000}, ByteSize{0x1000}, 0, kDmaRead}, ramfd).code() == Errc::kOverlap);
  uint32_t fence = 0xfeedf00d;
  REQUIRE(srv.dev.dma.Write(Gpa{0x100010}, AsBytes(fence)).ok());
  uint32_t seen;
  std::memcpy(&seen, ram_map.data() + 0x10, 4);
  CHECK(seen == fence);

  // DMA_MAP without an fd: the device's reads and writes become DMA_READ/DMA_WRITE on the
  // twin socket, served by the client's thread.
  REQUIRE(cl.DmaMap({Gpa{ram.base}, ByteSize{0x4000}, 0, kDmaRead | kDmaWrite}).ok());
  std::vector<std::byte> pattern(3000);
  for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = std::byte(i * 7);
  REQUIRE(srv.dev.dma.Write(Gpa{ram.base + 0x100}, pattern).ok());
  {
    std::lock_guard lk(ram.mu);
    CHECK(std::memcmp(ram.mem.data() + 0x100, pattern.data(), pattern.size()) == 0);
  }
  std::vector<std::byte> back(pattern.size());
  REQUIRE(srv.dev.dma.Read(Gpa{ram.base + 0x100}, back).ok());
  CHECK(back == pattern);
  CHECK(cl.dma_requests_served() >= 2);

  // DMA_UNMAP
  REQUIRE(cl.DmaUnmap({Gpa{0x100000}, ByteSize{0x4000}, 0}).ok());
  CHECK(cl.DmaUnmap({Gpa{0x100000}, ByteSize{0x4000}, 0}).code() == Errc::kNotFound);
  CHECK(!srv.dev.dma.Contains(Gpa{0x100000}, ByteSize{1}, kDmaRead));

  // DEVICE_RESET
  REQUIRE(cl.Reset().ok());
  CHECK(srv.dev.resets == 1);
  CHECK((*cl.RegionRead(kBar0Region, 0x80, 1))[0] == std::byte{0});
}

TEST_CASE("a second concurrent client is refused; the first keeps working") {
  std::string path = SocketPath("second");
  ServerThread srv(path);
  auto a = Client::Connect(path, 2000);
  REQUIRE(a.ok());
  REQUIRE((*a)->Negotiate().ok());
  auto b = Client::Connect(path, 2000);
  REQUIRE(b.ok());
  CHECK(!(*b)->Negotiate().ok());
  CHECK(srv.listener->refused() == 1);
  CHECK((*a)->GetDeviceInfo().ok());
}

TEST_CASE("a hostile or dying client is dropped alone; the next one is served") {
  std::string path = SocketPath("hostile");
  ServerThread srv(path);
  {
    auto bad = Client::Connect(path, 2000).value();
    REQUIRE(bad->Negotiate().ok());
    // Unframeable: msg_size 4.
    Header h{1, static_cast<uint16_t>(Command::kDeviceGetInfo), 4, 0, 0};
    REQUIRE(bad->SendRaw(AsBytes(h)).ok());
    CHECK(bad->ReceiveRaw(2000).code() == Errc::kPeerClosed);
  }
  CHECK(WaitFor([&] { return srv.dev.disconnects == 1 && !srv.listener->HasClient(); }));
  {
    // Dies mid-message.
    auto half = Client::Connect(path, 2000).value();
    REQUIRE(half->Negotiate().ok());
    Header h{2, static_cast<uint16_t>(Command::kRegionRead), 32, 0, 0};
    REQUIRE(half->SendRaw(AsBytes(h)).ok());
  }
  CHECK(WaitFor([&] { return srv.dev.disconnects == 2 && !srv.listener->HasClient(); }));
  auto good = Client::Connect(path, 2000).value();
  REQUIRE(good->Negotiate().ok());
  auto rd = good->RegionRead(kConfigRegion, 0, 4);
  CHECK(rd.ok());
  // A refused message does not end the session.
  std::vector<std::byte> junk(8);
  CHECK(good->Request(static_cast<Command>(77), junk).code() == Errc::kUnsupported);
  CHECK(good->GetDeviceInfo().ok());
}

TEST_CASE("without a twin socket, server DMA goes over the main socket (worker threads only)") {
  std::string path = SocketPath("notwin");
  ServerLimits lim;
  lim.dma_timeout_ms = 2000;
  ServerThread srv(path, lim);
  GuestRam ram;
  auto c = Client::Connect(path, 2000).value();
  ClientOptions o;
  o.twin_socket = false;
  auto caps = c->Negotiate(o, ram.Handler());
  REQUIRE(caps.ok());
  CHECK(!caps->twin_socket);
  REQUIRE(c->DmaMap({Gpa{ram.base}, ByteSize{0x4000}, 0, kDmaRead | kDmaWrite}).ok());
  {
    std::lock_guard lk(ram.mu);
    for (int i = 0; i < 16; ++i) ram.mem[0x40 + i] = std::byte(0xa0 + i);
  }

  // A worker thread (the engine) reads guest memory: the loop routes the reply to it.
  std::vector<std::byte> got(16);
  Result<> wr = Ok();
  std::thread worker([&] { wr = srv.dev.dma.Read(Gpa{ram.base + 0x40}, got); });
  REQUIRE(c->ServeOneServerRequest(2000).ok());
  worker.join();
  REQUIRE(wr.ok());
  CHECK(got[15] == std::byte{0xaf});

  // The loop thread itself needs guest memory inside a REGION_WRITE handler: refused at once
  // with kWouldBlock and no DMA_READ sent (the loop never waits on a client); the session
  // goes on.
  srv.dev.dma_probe = ram.base + 0x40;
  CHECK(!c->RegionWrite(kBar0Region, FakeDevice::kDmaKick, Bytes({1, 0, 0, 0})).ok());  // EAGAIN
  CHECK(c->dma_requests_served() == 1);
  CHECK(c->GetDeviceInfo().ok());

  // Two worker requests in a row: each reply routed by the loop to its worker.
  for (int i = 0; i < 2; ++i) {
    std::vector<std::byte> got2(4);
    Result<> wr2 = Ok();
    std::thread worker2([&] { wr2 = srv.dev.dma.Read(Gpa{ram.base + 0x4c}, got2); });
    REQUIRE(c->ServeOneServerRequest(2000).ok());
    worker2.join();
    REQUIRE(wr2.ok());
    CHECK(got2[0] == std::byte{0xac});
  }

  // A client that does not answer: the worker gets kTimeout, the session survives.
  std::byte b[4];
  CHECK(srv.dev.dma.Read(Gpa{ram.base}, b).code() == Errc::kTimeout);
}

TEST_CASE("twin socket: DMA from a worker is served; from a loop-thread handler it is refused") {
  std::string path = SocketPath("twinkick");
  ServerThread srv(path);
  GuestRam ram;
  auto c = Client::Connect(path, 2000).value();
  REQUIRE(c->Negotiate({}, ram.Handler())->twin_socket);
  REQUIRE(c->DmaMap({Gpa{ram.base}, ByteSize{0x4000}, 0, kDmaRead | kDmaWrite}).ok());
  {
    std::lock_guard lk(ram.mu);
    ram.mem[0x10] = std::byte{0x99};
  }
  srv.dev.dma_probe = ram.base + 0x10;
  CHECK(!c->RegionWrite(kBar0Region, FakeDevice::kDmaKick, Bytes({1, 0, 0, 0})).ok());  // EAGAIN
  std::byte got[1];
  REQUIRE(srv.dev.dma.Read(Gpa{ram.base + 0x10}, got).ok());
  CHECK(got[0] == std::byte{0x99});
}

TEST_CASE("a client that never sends VERSION loses the device slot") {
  std::string path = SocketPath("idle");
  ServerLimits lim;
  lim.version_timeout_ms = 100;
  ServerThread srv(path, lim);
  auto idle = Client::Connect(path, 2000).value();
  CHECK(WaitFor([&] { return srv.dev.connects == 1; }));
  CHECK(WaitFor([&] { return srv.dev.disconnects == 1; }));
  CHECK(idle->ReceiveRaw(1000).code() == Errc::kPeerClosed);
  auto next = Client::Connect(path, 2000).value();
  REQUIRE(next->Negotiate().ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // past the timeout: still served
  CHECK(next->GetDeviceInfo().ok());
}

TEST_CASE("client in a forked process") {
  std::string path = SocketPath("fork");
  FakeDevice dev;
  event_base* base = event_base_new();
  auto l = Listener::Create(base, path, dev);
  REQUIRE(l.ok());
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    auto c = Client::Connect(path, 2000);
    bool ok = c.ok() && (*c)->Negotiate().ok() && (*c)->RegionWrite(kBar0Region, 8, Bytes({9, 8, 7, 6})).ok();
    auto rd = ok ? (*c)->RegionRead(kBar0Region, 8, 4) : Result<std::vector<std::byte>>(Error{});
    ok = ok && rd.ok() && (*rd)[1] == std::byte{8};
    ::_exit(ok ? 0 : 1);
  }
  int status = -1;
  for (int i = 0; i < 5000; ++i) {
    event_base_loop(base, EVLOOP_NONBLOCK);
    if (::waitpid(pid, &status, WNOHANG) == pid) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  for (int i = 0; i < 50; ++i) event_base_loop(base, EVLOOP_NONBLOCK);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK(dev.writes.size() == 1);
  l->reset();
  event_base_free(base);
}

TEST_CASE("listener replaces a stale socket file and refuses a live one") {
  std::string path = SocketPath("stale");
  FakeDevice dev;
  event_base* base = event_base_new();
  {
    auto l1 = Listener::Create(base, path, dev);
    REQUIRE(l1.ok());
    CHECK(Listener::Create(base, path, dev).code() == Errc::kAlreadyExists);
    // Leave a stale file behind: a bound socket that nobody listens on.
    (*l1).reset();
  }
  {
    int s = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::strcpy(sa.sun_path, path.c_str());
    REQUIRE(::bind(s, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0);
    ::close(s);
  }
  auto l2 = Listener::Create(base, path, dev);
  CHECK(l2.ok());
  l2 = Result<std::unique_ptr<Listener>>(Error{});
  event_base_free(base);
}

}  // namespace vg::vfio_user::test
