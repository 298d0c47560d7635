// Hostile remoting clients against the real daemon. Each attack goes through the real
// socket and shared ring from this process and must end in its named error (in the status
// line, or the handshake's refusal), with the daemon alive, while a victim remoting client
// on the same vGPU, in another process, runs every kernel and checks each result
// bit-exactly.
#include <doctest.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>

#include "guest/remoting_client.h"
#include "shaders/samples.h"
#include "tests/e2e/harness.h"
#include "tests/remoting/run_sample.h"
#include "tests/remoting/stream.h"

using namespace vg;
using namespace vg::e2e;
using namespace vg::guest;
using vg::remoting::testing::RunSample;
using vg::remoting::testing::Stream;
namespace w = vg::remoting::wire;

namespace {

std::string Why(const Result<>& r) { return r.ok() ? std::string("ok") : r.error().ToString(); }

std::string RemoteSocket(const Daemon& d, const char* uuid) {
  return (d.dir() / (std::string(uuid) + ".remote.sock")).string();
}

Result<std::unique_ptr<RemotingClient>> TryConnect(const std::string& socket) {
  RemotingOptions o;
  o.socket = socket;
  o.ring_size = 64 << 10;
  o.heap_size = 1 << 20;
  return RemotingClient::Connect(o);
}
std::unique_ptr<RemotingClient> Connect(const std::string& socket) {
  auto c = TryConnect(socket);
  REQUIRE_MESSAGE(c.ok(), c.error().ToString());
  return std::move(c).value();
}

// The victim: another process, a remoting client of the same vGPU, running every kernel
// until `stop` exists. Exit 0: every result matched (at least a full round ran).
pid_t StartVictim(const std::string& socket, const std::filesystem::path& stop) {
  pid_t pid = ::fork();
  if (pid != 0) return pid;
  int rounds = 0;
  {
    auto c = TryConnect(socket);
    if (!c.ok()) std::_Exit(3);
    auto kernels = shaders::AllKernels();
    while (!std::filesystem::exists(stop) || rounds < static_cast<int>(kernels.size())) {
      const auto& k = kernels[rounds % kernels.size()];
      auto s = shaders::MakeSample(k.id, 500 + rounds, rounds);
      auto out = RunSample(**c, s);
      if (!out.ok()) std::_Exit(5);
      if (!shaders::CheckSample(s, *out).ok()) std::_Exit(1);
      ++rounds;
    }
  }
  std::_Exit(0);
}

struct Fixture {
  Daemon daemon{{std::string(kUuidA) + ":small"}};
  std::string socket = RemoteSocket(daemon, kUuidA);
  std::filesystem::path stop = daemon.dir() / "stop-victim";
  pid_t victim = StartVictim(socket, stop);

  ~Fixture() {
    std::ofstream(stop.string()).put('x');
    int rc = WaitExit(victim, 90000);
    CHECK_MESSAGE(rc == 0, "victim exit code " << rc);
    CHECK(daemon.Alive());
    // And a fresh client is served after all that. (CHECKs only: this may run while a
    // failed REQUIRE unwinds.)
    auto c = TryConnect(socket);
    CHECK(c.ok());
    if (!c.ok()) return;
    auto s = shaders::MakeSample(shaders::KernelId::kBlur3x3, 900, 9);
    auto out = RunSample(**c, s);
    CHECK(out.ok());
    if (out.ok()) CHECK(shaders::CheckSample(s, *out).ok());
  }
};

void ExpectStillWorks(RemotingClient& c, const RemoteBuffer& b) {
  REQUIRE(c.Fill(b, 0, b.size, 0x600d600d).ok());
  std::vector<std::byte> back(b.size);
  auto r = c.Read(b, 0, back);
  REQUIRE_MESSAGE(r.ok(), "the attacker's stream did not resynchronise: " << Why(r));
  uint32_t last;
  std::memcpy(&last, back.data() + back.size() - 4, 4);
  CHECK(last == 0x600d600d);
}

struct Attack {
  const char* name;
  Errc want;
  std::function<Result<>(RemotingClient&, const RemoteBuffer&)> run;
};

std::vector<Attack> Attacks() {
  std::vector<Attack> a;
  auto raw = [](RemotingClient& c, const Stream& s) { return c.AppendRaw(s.bytes()); };
  a.push_back({"unknown opcode", Errc::kUnknownCommand,
               [raw](auto& c, auto&) { return raw(c, Stream().Raw(0x4242, 0, std::vector<std::byte>(40))); }});
  a.push_back({"truncated command", Errc::kTruncated,
               [raw](auto& c, auto&) { return raw(c, Stream().Raw(5, 0, std::vector<std::byte>(24), 256)); }});
  a.push_back({"command size not a multiple of 8", Errc::kBadLength, [](auto& c, auto&) {
                 w::CmdHeader h{static_cast<uint16_t>(w::Op::kFence), 0, 13};
                 std::vector<std::byte> b(16);
                 std::memcpy(b.data(), &h, sizeof(h));
                 return c.AppendRaw(b);
               }});
  a.push_back({"id never created", Errc::kNotFound,
               [](auto& c, auto&) { return c.Fill(RemoteBuffer{0x7777, 64}, 0, 64, 1); }});
  a.push_back({"another client's id (the victim's first buffer)", Errc::kNotFound, [](auto& c, auto&) {
                 std::vector<std::byte> out(64);
                 auto r = c.Read(RemoteBuffer{1, 64}, 0, out);
                 return r.code() == Errc::kNotFound ? Result<>() : MakeError(Errc::kInternal, "read said {}", Why(r));
               }});
  a.push_back({"use after destroy", Errc::kBadState, [](auto& c, auto&) -> Result<> {
                 VG_TRY_ASSIGN(auto b, c.CreateBufferWithId(1001, 4096));
                 VG_TRY(c.DestroyBuffer(b));
                 RemoteBinding bind = Bind(b);
                 return c.Dispatch(static_cast<uint32_t>(shaders::KernelId::kFill), {4, 1, 1}, std::span(&bind, 1),
                                   shaders::PushBytes(shaders::FillPush{1024, 3}));
               }});
  a.push_back({"heap offset out of range", Errc::kOutOfBounds, [raw](auto& c, auto& mine) {
                 return raw(c, Stream().Cmd(w::Op::kWrite, w::WriteCmd{mine.id, 0, 0, c.heap_size(), 8}));
               }});
  a.push_back({"heap size out of range", Errc::kOutOfBounds, [raw](auto& c, auto& mine) {
                 return raw(c, Stream().Cmd(w::Op::kRead, w::ReadCmd{mine.id, 0, 0, 0, c.heap_size() + 8, 99}));
               }});
  a.push_back({"heap offset + size wraps", Errc::kOutOfBounds, [raw](auto& c, auto& mine) {
                 return raw(c, Stream().Cmd(w::Op::kWrite, w::WriteCmd{mine.id, 0, 0, ~uint64_t{0} - 7, 16}));
               }});
  a.push_back({"range past the buffer", Errc::kOutOfBounds,
               [](auto& c, auto& mine) { return c.Fill(mine, mine.size - 4, 8, 1); }});
  a.push_back({"kernel not in the catalogue", Errc::kBadKernel, [](auto& c, auto& mine) {
                 RemoteBinding bind = Bind(mine);
                 return c.Dispatch(1000, {1, 1, 1}, std::span(&bind, 1), {});
               }});
  a.push_back({"kernel groups over its limit", Errc::kLimitExceeded, [](auto& c, auto& mine) {
                 RemoteBinding bind = Bind(mine);
                 return c.Dispatch(static_cast<uint32_t>(shaders::KernelId::kFill), {1u << 30, 1, 1},
                                   std::span(&bind, 1), shaders::PushBytes(shaders::FillPush{4, 3}));
               }});
  return a;
}

// Sends a hand-made handshake; returns the status the daemon answered with.
Errc RawHandshake(const std::string& socket, w::Hello hello, std::vector<int> fds) {
  UniqueFd s(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, socket.c_str(), socket.size());
  REQUIRE(::connect(s.Get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
  iovec iov{&hello, sizeof(hello)};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char cbuf[CMSG_SPACE(4 * sizeof(int))] = {};
  if (!fds.empty()) {
    msg.msg_control = cbuf;
    msg.msg_controllen = CMSG_SPACE(fds.size() * sizeof(int));
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(fds.size() * sizeof(int));
    std::memcpy(CMSG_DATA(c), fds.data(), fds.size() * sizeof(int));
  }
  REQUIRE(::sendmsg(s.Get(), &msg, MSG_NOSIGNAL) == sizeof(hello));
  w::Welcome wl{};
  ssize_t n = ::recv(s.Get(), &wl, sizeof(wl), 0);
  if (n != sizeof(wl)) return Errc::kPeerClosed;
  return ErrcFromValue(wl.status);
}

}  // namespace

TEST_CASE("hostile commands: each refusal named, the attacker's stream moves on, the victim exact") {
  Fixture f;
  auto c = Connect(f.socket);
  // Ids far from the victim's (it counts from 1), so "another client's id" is one this
  // client never created.
  auto mine = c->CreateBufferWithId(1000, 4096);
  REQUIRE(mine.ok());
  for (const auto& at : Attacks()) {
    CAPTURE(std::string(at.name));
    auto r = at.run(*c, *mine);
    REQUIRE_MESSAGE(r.ok(), Why(r));
    auto seq = c->Submit();
    REQUIRE(seq.ok());
    auto wr = c->Wait(*seq, 5000);
    // The foreign-id read already consumed its error in Read().
    if (std::string(at.name).find("another client") == std::string::npos)
      CHECK_MESSAGE(wr.code() == at.want, Why(wr));
    CHECK(c->LastError().code == at.want);
    CHECK_FALSE(c->Dead());
    ExpectStillWorks(*c, *mine);
  }
  CHECK(f.daemon.Alive());
}

TEST_CASE("hostile ring pointers: head scribbled, tail corrupted, ring overflow") {
  Fixture f;
  {
    // The head line is the daemon's to write; scribbling on it changes nothing there.
    auto c = Connect(f.socket);
    auto b = c->CreateBuffer(4096);
    REQUIRE(b.ok());
    c->StoreHead(0xfff0);
    REQUIRE(c->Wait(*c->Submit()).ok());  // the daemon republishes its own head
    ExpectStillWorks(*c, *b);
  }
  struct Case {
    const char* name;
    std::function<void(RemotingClient&)> corrupt;
    Errc want;
  };
  std::vector<Case> cases{
      {"tail not a multiple of 8", [](RemotingClient& c) { c.StoreTail(c.tail() + 3); }, Errc::kMisaligned},
      {"tail behind the head", [](RemotingClient& c) { c.StoreTail(c.tail() - 16); }, Errc::kOutOfBounds},
      {"ring overflow: tail a ring and more ahead", [](RemotingClient& c) { c.StoreTail(c.tail() + c.ring_size() + 64); },
       Errc::kOutOfBounds},
  };
  for (const auto& t : cases) {
    CAPTURE(std::string(t.name));
    auto c = Connect(f.socket);
    REQUIRE(c->Wait(*c->Submit()).ok());
    t.corrupt(*c);
    auto r = c->Wait(c->last_submitted() + 1, 5000);
    CHECK_MESSAGE(r.code() == t.want, Why(r));
    CHECK(c->Dead());
    CHECK(f.daemon.Alive());
  }
}

TEST_CASE("hostile handshakes: refused by name") {
  Fixture f;
  auto memfd = CreateMemFd("area", ByteSize{w::AreaSize(4096, 4096)});
  REQUIRE(memfd.ok());
  auto ev = EventFd::Create();
  REQUIRE(ev.ok());
  w::Hello good{w::kMagic, w::kVersion, 4096, 0, 4096};
  CHECK(RawHandshake(f.socket, good, {memfd->Get(), ev->Get()}) == Errc::kAccessDenied);  // not sealed
  REQUIRE(::fcntl(memfd->Get(), F_ADD_SEALS, F_SEAL_SHRINK) == 0);
  CHECK(RawHandshake(f.socket, good, {memfd->Get()}) == Errc::kBadFdCount);
  CHECK(RawHandshake(f.socket, good, {memfd->Get(), memfd->Get()}) == Errc::kBadMessage);  // not an eventfd
  w::Hello bad_magic = good;
  bad_magic.magic = 0x1234;
  CHECK(RawHandshake(f.socket, bad_magic, {memfd->Get(), ev->Get()}) == Errc::kUnsupported);
  w::Hello odd_ring = good;
  odd_ring.ring_size = 5000;
  CHECK(RawHandshake(f.socket, odd_ring, {memfd->Get(), ev->Get()}) == Errc::kInvalidArgument);
  w::Hello too_big = good;
  too_big.heap_size = 1 << 20;  // the memfd holds 4 KiB of heap
  CHECK(RawHandshake(f.socket, too_big, {memfd->Get(), ev->Get()}) == Errc::kOutOfBounds);
  CHECK(RawHandshake(f.socket, good, {memfd->Get(), ev->Get()}) == Errc::kOk);
}

TEST_CASE("a client killed mid-batch") {
  Fixture f;
  for (int i = 0; i < 3; ++i) {
    pid_t pid = ::fork();
    if (pid == 0) {
      auto c = TryConnect(f.socket);
      if (!c.ok()) std::_Exit(3);
      auto b = (*c)->CreateBuffer(1 << 20);
      if (!b.ok()) std::_Exit(4);
      RemoteBinding bind = Bind(*b);
      // A long batch of slow kernels, published piecewise, never waited for.
      for (int k = 0;; ++k) {
        (void)(*c)->Dispatch(static_cast<uint32_t>(shaders::KernelId::kSpin), {256, 1, 1}, std::span(&bind, 1),
                             shaders::PushBytes(shaders::SpinPush{65536, 64, static_cast<uint32_t>(k)}));
        if (k % 16 == 0) (void)(*c)->Flush();
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200 + 100 * i));
    ::kill(pid, SIGKILL);
    CHECK(WaitExit(pid, 10000) == 128 + SIGKILL);
    CHECK(f.daemon.Alive());
  }
}
