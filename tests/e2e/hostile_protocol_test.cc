// Hostile vfio-user messages from a separate guest process against the real daemon. Each
// attack gets its named error (an error reply with the code's errno, or a clean disconnect
// where the stream cannot be framed), the daemon keeps running, and a victim guest on
// another vGPU keeps getting exact results throughout.
#include <doctest.h>

#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

#include "guest/guest.h"
#include "tests/e2e/harness.h"
#include "vfio_user/client.h"

using namespace vg;
using namespace vg::e2e;
namespace vu = vg::vfio_user;

namespace {

std::vector<std::byte> Msg(vu::Command cmd, uint16_t id, std::span<const std::byte> payload, uint32_t size_override = 0) {
  vu::Header h;
  h.msg_id = id;
  h.command = static_cast<uint16_t>(cmd);
  h.msg_size = size_override ? size_override : static_cast<uint32_t>(vu::kHeaderSize + payload.size());
  std::vector<std::byte> out(sizeof h + payload.size());
  std::memcpy(out.data(), &h, sizeof h);
  if (!payload.empty()) std::memcpy(out.data() + sizeof h, payload.data(), payload.size());
  return out;
}
template <class T>
std::span<const std::byte> Bytes(const T& v) {
  return std::as_bytes(std::span(&v, 1));
}

// The victim: a guest on vGPU B whose results must stay exact whatever A does.
struct Victim {
  std::unique_ptr<guest::Device> dev;
  uint32_t round = 0;
  explicit Victim(const std::string& socket) {
    guest::DeviceOptions o;
    o.socket = socket;
    o.ram_size = 1 << 20;
    auto d = guest::Device::Open(o);
    REQUIRE(d.ok());
    dev = std::move(d).value();
  }
  void Check() {
    ++round;
    uint32_t pattern = 0x9e3779b9u * round;
    REQUIRE(dev->Write32(abi::reg::kScratch, pattern).ok());
    CHECK(dev->Read32(abi::reg::kScratch).value() == pattern);
    CHECK(dev->Status32(abi::status::kScratch) == pattern);
    std::vector<std::byte> data(256);
    for (size_t i = 0; i < data.size(); ++i) data[i] = std::byte(static_cast<uint8_t>(i * 7 + round));
    REQUIRE(dev->client().RegionWrite(vu::kBar2Region, 4096 * round, data).ok());
    auto back = dev->client().RegionRead(vu::kBar2Region, 4096 * round, 256);
    REQUIRE(back.ok());
    CHECK(*back == data);
    CHECK(std::memcmp(dev->aperture().data() + 4096 * round, data.data(), 256) == 0);
    CHECK(dev->Read32(abi::reg::kErrCount).value() == 0);  // nothing A did reached B
  }
};

std::unique_ptr<vu::Client> Attacker(const std::string& socket, bool negotiate = true) {
  auto c = vu::Client::Connect(socket, 3000);
  REQUIRE(c.ok());
  if (negotiate) {
    vu::ClientOptions o;
    o.twin_socket = false;
    o.timeout_ms = 3000;
    REQUIRE((*c)->Negotiate(o).ok());
  }
  return std::move(c).value();
}

// Sends one raw message and returns the reply's errno (0 for a success reply).
uint32_t ErrnoOf(vu::Client& c, const std::vector<std::byte>& msg, std::span<const int> fds = {}) {
  REQUIRE(c.SendRaw(msg, fds).ok());
  auto reply = c.ReceiveRaw(3000);
  REQUIRE(reply.ok());
  CHECK(reply->type() == vu::kTypeReply);
  return (reply->hdr.flags & vu::kFlagError) ? reply->hdr.error : 0;
}

bool PeerClosed(vu::Client& c) {
  auto r = c.ReceiveRaw(3000);
  return !r.ok() && (r.code() == Errc::kPeerClosed || r.code() == Errc::kIo);
}

}  // namespace

TEST_CASE("hostile framing: truncated header, short body, oversized, mid-message disconnect") {
  Daemon d({std::string(kUuidA) + ":small", std::string(kUuidB) + ":small"});
  Victim victim(d.Socket(1));
  victim.Check();

  SUBCASE("truncated header then disconnect") {
    auto a = Attacker(d.Socket(0), false);
    std::vector<std::byte> half(8, std::byte{0x41});
    REQUIRE(a->SendRaw(half).ok());
    victim.Check();
  }
  SUBCASE("declared size larger than sent: the daemon waits without blocking anyone") {
    auto a = Attacker(d.Socket(0));
    vu::RegionAccessPayload p{0, vu::kBar0Region, 4};
    auto msg = Msg(vu::Command::kRegionRead, 1, Bytes(p), 4096);
    REQUIRE(a->SendRaw(msg).ok());
    for (int i = 0; i < 3; ++i) victim.Check();  // the loop keeps serving B meanwhile
  }
  SUBCASE("size over the negotiated maximum") {
    auto a = Attacker(d.Socket(0));
    vu::RegionAccessPayload p{0, vu::kBar0Region, 4};
    auto msg = Msg(vu::Command::kRegionWrite, 2, Bytes(p), 64u << 20);
    REQUIRE(a->SendRaw(msg).ok());
    // Either refused with E2BIG while the stream stays framed, or dropped: never served.
    auto r = a->ReceiveRaw(3000);
    if (r.ok()) {
      CHECK((r->hdr.flags & vu::kFlagError) != 0);
      CHECK(r->hdr.error == E2BIG);
    }
    victim.Check();
  }
  SUBCASE("header smaller than a header") {
    auto a = Attacker(d.Socket(0));
    auto msg = Msg(vu::Command::kDeviceGetInfo, 3, {}, 8);
    REQUIRE(a->SendRaw(msg).ok());
    CHECK(PeerClosed(*a));
    victim.Check();
  }
  CHECK(d.Alive());
  // The attacked vGPU still serves a well-behaved guest afterwards.
  Victim again(d.Socket(0));
  again.Check();
  CHECK(d.Shutdown() == 0);
}

TEST_CASE("hostile commands: bad payloads, fds, ranges and unknown commands get named errors") {
  Daemon d({std::string(kUuidA) + ":small", std::string(kUuidB) + ":small"});
  Victim victim(d.Socket(1));
  auto a = Attacker(d.Socket(0));
  uint16_t id = 100;

  SUBCASE("a command before VERSION is refused") {
    a.reset();  // frees the vGPU's single client slot
    auto fresh = Attacker(d.Socket(0), false);
    vu::DeviceInfoPayload info{sizeof(vu::DeviceInfoPayload), 0, 0, 0};
    REQUIRE(fresh->SendRaw(Msg(vu::Command::kDeviceGetInfo, 1, Bytes(info))).ok());
    auto r = fresh->ReceiveRaw(3000);
    if (r.ok()) CHECK((r->hdr.flags & vu::kFlagError) != 0);  // refused, or dropped: never served
  }
  SUBCASE("unknown command") {
    std::vector<std::byte> msg = Msg(vu::Command::kVersion, ++id, {});
    uint16_t bogus = 99;
    std::memcpy(msg.data() + 2, &bogus, 2);
    CHECK(ErrnoOf(*a, msg) == ENOTSUP);  // the spec's reply to an unknown command
  }
  SUBCASE("payload shorter than the command needs") {
    std::array<std::byte, 4> tiny{};
    CHECK(ErrnoOf(*a, Msg(vu::Command::kRegionRead, ++id, tiny)) == EINVAL);
    CHECK(ErrnoOf(*a, Msg(vu::Command::kDmaMap, ++id, tiny)) == EINVAL);
  }
  SUBCASE("region access out of range") {
    vu::RegionAccessPayload p{0, 99, 4};
    CHECK(ErrnoOf(*a, Msg(vu::Command::kRegionRead, ++id, Bytes(p))) == EINVAL);
    p = {abi::kBar0Size - 2, vu::kBar0Region, 4};
    CHECK(ErrnoOf(*a, Msg(vu::Command::kRegionRead, ++id, Bytes(p))) != 0);
    p = {~0ull - 1, vu::kBar0Region, 4};
    CHECK(ErrnoOf(*a, Msg(vu::Command::kRegionRead, ++id, Bytes(p))) != 0);
    p = {0, vu::kConfigRegion, 2u << 20};
    CHECK(ErrnoOf(*a, Msg(vu::Command::kRegionRead, ++id, Bytes(p))) != 0);
    // A write whose payload is shorter than its count.
    p = {abi::reg::kScratch, vu::kBar0Region, 8};
    auto msg = Msg(vu::Command::kRegionWrite, ++id, Bytes(p));
    msg.resize(msg.size() + 4);
    uint32_t size = static_cast<uint32_t>(msg.size());
    std::memcpy(msg.data() + 4, &size, 4);
    CHECK(ErrnoOf(*a, msg) == EINVAL);
  }
  SUBCASE("writes to read-only and privileged registers") {
    uint32_t v = 0;
    CHECK(a->RegionWrite(vu::kBar0Region, abi::reg::kId, Bytes(v)).code() != Errc::kOk);
    CHECK(a->RegionWrite(vu::kBar0Region, abi::priv::kGlobalReset, Bytes(v)).code() != Errc::kOk);
    auto code = a->RegionRead(vu::kBar0Region, abi::reg::kErrCode, 4);
    REQUIRE(code.ok());
    uint32_t c;
    std::memcpy(&c, code->data(), 4);
    CHECK(c == static_cast<uint32_t>(Errc::kPrivileged));
  }
  SUBCASE("wrong fd counts") {
    auto ram = CreateMemFd("attacker", ByteSize{1 << 20});
    REQUIRE(ram.ok());
    vu::DmaMapPayload m{sizeof(vu::DmaMapPayload), vu::kDmaRead | vu::kDmaWrite, 0, 0x100000, 1 << 20};
    int two[2] = {ram->Get(), ram->Get()};
    CHECK(ErrnoOf(*a, Msg(vu::Command::kDmaMap, ++id, Bytes(m)), two) == EINVAL);
    vu::RegionAccessPayload p{0, vu::kBar0Region, 4};
    int one[1] = {ram->Get()};
    CHECK(ErrnoOf(*a, Msg(vu::Command::kRegionRead, ++id, Bytes(p)), one) == EINVAL);
    // The refused request changed nothing: the same map then succeeds once.
    CHECK(ErrnoOf(*a, Msg(vu::Command::kDmaMap, ++id, Bytes(m)), one) == 0);
  }
  SUBCASE("bad DMA_MAP and DMA_UNMAP requests") {
    auto ram = CreateMemFd("attacker", ByteSize{1 << 20});
    REQUIRE(ram.ok());
    vu::DmaMapArgs ok_map{Gpa{0x100000}, ByteSize{1 << 20}, 0, vu::kDmaRead | vu::kDmaWrite};
    REQUIRE(a->DmaMap(ok_map, *ram).ok());
    vu::DmaMapArgs overlap{Gpa{0x180000}, ByteSize{1 << 20}, 0, vu::kDmaRead};
    CHECK(a->DmaMap(overlap, *ram).code() == Errc::kOverlap);
    vu::DmaMapArgs misaligned{Gpa{0x400800}, ByteSize{0x1000}, 0, vu::kDmaRead};
    CHECK(a->DmaMap(misaligned, *ram).code() != Errc::kOk);
    vu::DmaMapArgs zero{Gpa{0x500000}, ByteSize{0}, 0, vu::kDmaRead};
    CHECK(a->DmaMap(zero, *ram).code() != Errc::kOk);
    vu::DmaMapArgs wrap{Gpa{~0ull - 0xfff}, ByteSize{0x2000}, 0, vu::kDmaRead};
    CHECK(a->DmaMap(wrap, *ram).code() != Errc::kOk);
    auto ev = EventFd::Create();
    REQUIRE(ev.ok());
    vu::DmaMapArgs badfd{Gpa{0x800000}, ByteSize{0x1000}, 0, vu::kDmaRead};
    CHECK(a->DmaMap(badfd, ev->fd()).code() != Errc::kOk);
    CHECK(a->DmaUnmap({Gpa{0x900000}, ByteSize{0x1000}, 0}).code() != Errc::kOk);
    CHECK(a->DmaUnmap({Gpa{0x100000}, ByteSize{1 << 20}, 0}).ok());
  }
  victim.Check();
  CHECK(d.Alive());
  a.reset();
  CHECK(d.Shutdown() == 0);
}

TEST_CASE("many attackers connecting, spamming and dying leave the daemon and the victim intact") {
  Daemon d({std::string(kUuidA) + ":small", std::string(kUuidB) + ":small"});
  Victim victim(d.Socket(1));
  for (int i = 0; i < 20; ++i) {
    pid_t pid = ::fork();
    if (pid == 0) {
      auto c = vu::Client::Connect(d.Socket(0), 2000);
      if (!c.ok()) std::_Exit(0);
      std::vector<std::byte> junk(64 + i * 13);
      for (size_t k = 0; k < junk.size(); ++k) junk[k] = std::byte(static_cast<uint8_t>(k * 31 + i));
      (void)(*c)->SendRaw(junk);
      if (i % 2) ::kill(::getpid(), SIGKILL);  // die without closing anything
      std::_Exit(0);
    }
    WaitExit(pid, 10000);
    victim.Check();
  }
  CHECK(d.Alive());
  Victim again(d.Socket(0));
  again.Check();
  CHECK(d.Shutdown() == 0);
}
