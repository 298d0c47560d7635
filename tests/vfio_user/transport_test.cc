// Connection framing: partial messages, fds, limits, EOF, queued output.
#include <doctest/doctest.h>
#include <sys/socket.h>
#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>

#include "vfio_user/transport.h"

namespace vg::vfio_user {
namespace {

struct Pair {
  std::unique_ptr<Connection> a, b;
  explicit Pair(uint32_t max = 4096, uint32_t fds = 4) {
    int sv[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    a = std::make_unique<Connection>(UniqueFd(sv[0]), max, fds);
    b = std::make_unique<Connection>(UniqueFd(sv[1]), max, fds);
  }
};

size_t OpenFds() {
  size_t n = 0;
  DIR* d = ::opendir("/proc/self/fd");
  while (::readdir(d)) ++n;
  ::closedir(d);
  return n;
}

}  // namespace

TEST_CASE("a message arriving byte by byte is assembled, never blocking") {
  Pair p;
  Header h{42, 9, 0, 0, 0};
  std::vector<std::byte> body(20);
  for (size_t i = 0; i < body.size(); ++i) body[i] = std::byte(i);
  auto bytes = EncodeMessage(h, body);
  for (size_t i = 0; i < bytes.size(); ++i) {
    auto r = p.b->Receive();
    REQUIRE(r.ok());
    CHECK(!r->has_value());
    REQUIRE(::write(p.a->fd(), &bytes[i], 1) == 1);
  }
  auto r = p.b->Receive();
  REQUIRE(r.ok());
  REQUIRE(r->has_value());
  Message m = std::move(**r);
  CHECK(m.hdr.msg_id == 42);
  CHECK(m.hdr.command == 9);
  CHECK(m.hdr.msg_size == 36);
  CHECK(m.payload == body);
  // Nothing more.
  CHECK(!p.b->Receive()->has_value());
}

TEST_CASE("two messages back to back are split at msg_size") {
  Pair p;
  REQUIRE(p.a->Send(Header{1, 4, 0, 0, 0}, std::vector<std::byte>(3)).ok());
  REQUIRE(p.a->Send(Header{2, 5, 0, 0, 0}, std::vector<std::byte>(5)).ok());
  auto m1 = p.b->ReceiveBlocking(1000);
  auto m2 = p.b->ReceiveBlocking(1000);
  REQUIRE(m1.ok());
  REQUIRE(m2.ok());
  CHECK(m1->hdr.msg_id == 1);
  CHECK(m1->payload.size() == 3);
  CHECK(m2->hdr.msg_id == 2);
  CHECK(m2->payload.size() == 5);
}

TEST_CASE("fds travel with their message") {
  Pair p;
  auto e = EventFd::Create().value();
  int fd = e.Get();
  REQUIRE(p.a->Send(Header{1, 8, 0, 0, 0}, std::vector<std::byte>(4), std::span<const int>(&fd, 1)).ok());
  REQUIRE(p.a->Send(Header{2, 8, 0, 0, 0}, std::vector<std::byte>(4)).ok());
  auto m1 = p.b->ReceiveBlocking(1000);
  auto m2 = p.b->ReceiveBlocking(1000);
  REQUIRE(m1.ok());
  REQUIRE(m1->fds.size() == 1);
  CHECK(m2->fds.empty());
  // Same eventfd: a signal on the received one is seen on the original.
  uint64_t one = 1;
  REQUIRE(::write(m1->fds[0].Get(), &one, 8) == 8);
  CHECK(e.Drain().value() == 1);
}

TEST_CASE("more fds than allowed: all closed, message flagged") {
  Pair p(4096, 2);
  std::vector<EventFd> evs;
  std::vector<int> fds;
  for (int i = 0; i < 5; ++i) {
    evs.push_back(EventFd::Create().value());
    fds.push_back(evs.back().Get());
  }
  REQUIRE(p.a->Send(Header{1, 8, 0, 0, 0}, std::vector<std::byte>(4), fds).ok());
  size_t before = OpenFds();
  auto m = p.b->ReceiveBlocking(1000);
  REQUIRE(m.ok());
  CHECK(m->too_many_fds);
  CHECK(m->fds.empty());
  CHECK(OpenFds() == before);  // every received fd was closed again
}

TEST_CASE("msg_size below the header cannot be framed") {
  Pair p;
  Header h{1, 4, 15, 0, 0};
  REQUIRE(::write(p.a->fd(), &h, sizeof h) == sizeof h);
  auto r = p.b->Receive();
  CHECK(r.code() == Errc::kBadMessage);
}

TEST_CASE("msg_size over the limit: body discarded, message flagged, stream still framed") {
  Pair p(64);
  REQUIRE(p.a->Send(Header{1, 10, 0, 0, 0}, std::vector<std::byte>(1000)).ok());
  REQUIRE(p.a->Send(Header{2, 4, 0, 0, 0}, std::vector<std::byte>(16)).ok());
  auto m1 = p.b->ReceiveBlocking(1000);
  REQUIRE(m1.ok());
  CHECK(m1->oversized);
  CHECK(m1->payload.empty());
  CHECK(m1->hdr.msg_size == 1016);
  auto m2 = p.b->ReceiveBlocking(1000);
  REQUIRE(m2.ok());
  CHECK(!m2->oversized);
  CHECK(m2->hdr.msg_id == 2);
}

TEST_CASE("EOF mid-message is kPeerClosed; timeout is kTimeout") {
  Pair p;
  auto r0 = p.b->ReceiveBlocking(20);
  CHECK(r0.code() == Errc::kTimeout);
  Header h{1, 4, 100, 0, 0};
  REQUIRE(::write(p.a->fd(), &h, sizeof h) == sizeof h);
  CHECK(!p.b->Receive()->has_value());
  p.a.reset();
  CHECK(p.b->Receive().code() == Errc::kPeerClosed);
}

TEST_CASE("a peer that does not read: output is queued, not blocking") {
  Pair p(1u << 24);
  std::vector<std::byte> big(1u << 20);
  for (int i = 0; i < 4; ++i) REQUIRE(p.a->Send(Header{uint16_t(i), 9, 0, 0, 0}, big).ok());
  CHECK(p.a->HasPendingOutput());
  CHECK(p.a->PendingOutputBytes() > 0);
  CHECK(p.a->FlushBlocking(20).code() == Errc::kTimeout);
  // Reader catches up: everything arrives intact.
  int got = 0;
  while (got < 4) {
    REQUIRE(p.a->Flush().ok());
    auto m = p.b->Receive();
    REQUIRE(m.ok());
    if (*m) {
      CHECK((*m)->payload.size() == big.size());
      CHECK((*m)->hdr.msg_id == got);
      ++got;
    }
  }
  CHECK(!p.a->HasPendingOutput());
}

}  // namespace vg::vfio_user
