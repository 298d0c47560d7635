// libFuzzer target: arbitrary bytes as the client -> server byte stream of one vfio-user
// session, through the real transport (socketpair) and ServerSession, with a fake device.
// Byte 0 picks the mode: bit 0 set = a valid VERSION is sent first, so the fuzzer reaches
// every handler without having to discover the handshake; bits 1-3 = write chunk size, so
// messages also arrive split at odd places.
#include <sys/socket.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>

#include "tests/vfio_user/fake_device.h"

using namespace vg;
using namespace vg::vfio_user;

namespace {

void Drain(Connection& peer) {
  for (int i = 0; i < 1024; ++i) {
    auto m = peer.Receive();  // replies and their fds are dropped (fds closed)
    if (!m.ok() || !*m) return;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static bool quiet = [] {
    SetLogLevel(LogLevel::kError);
    return true;
  }();
  (void)quiet;
  if (size == 0) return 0;
  uint8_t mode = data[0];
  ++data;
  --size;

  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) != 0) return 0;
  test::FakeDevice dev;
  ServerLimits limits;
  limits.max_data_xfer_size = 64 * 1024;
  limits.max_dma_maps = 64;
  ServerSession session(dev, UniqueFd(sv[0]), limits);
  Connection peer(UniqueFd(sv[1]), 1u << 24, 64);

  if (mode & 1) {
    std::vector<std::byte> v;
    Append(v, VersionPayload{0, 0});
    static const char kJson[] = R"({"capabilities":{"max_msg_fds":4,"twin_socket":{"supported":true}}})";
    auto jb = std::as_bytes(std::span(kJson, sizeof kJson));
    v.insert(v.end(), jb.begin(), jb.end());
    Header h{1, static_cast<uint16_t>(Command::kVersion), 0, 0, 0};
    (void)peer.Send(h, v);
  }
  size_t chunk = size_t{1} << (((mode >> 1) & 7) * 2);  // 1, 4, 16, ... 16384 bytes
  size_t off = 0;
  bool shut = false;
  for (int iter = 0; iter < 200000; ++iter) {
    if (peer.HasPendingOutput()) (void)peer.Flush();
    if (!peer.HasPendingOutput() && off < size) {
      size_t n = std::min(chunk, size - off);
      ssize_t w = ::send(peer.fd(), data + off, n, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (w > 0) off += static_cast<size_t>(w);
    }
    if (off == size && !peer.HasPendingOutput() && !shut) {
      ::shutdown(peer.fd(), SHUT_WR);
      shut = true;
    }
    auto r = session.OnReadable();
    (void)session.OnWritable();
    Drain(peer);
    if (!r.ok()) break;  // EOF, unframeable stream or fatal VERSION: the session ends
  }
  return 0;
}
