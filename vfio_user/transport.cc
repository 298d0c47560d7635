#include "vfio_user/transport.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>

namespace vg::vfio_user {
namespace {

// SCM_MAX_FD on Linux: the most a peer can send in one go. The receive buffer holds all of
// them so none is silently truncated (an over-limit message is then refused by count).
constexpr size_t kMaxCmsgFds = 253;

int RemainingMs(std::chrono::steady_clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
  return left.count() < 0 ? 0 : static_cast<int>(left.count());
}

Result<> PollFor(int fd, short events, int timeout_ms) {
  pollfd p{fd, events, 0};
  for (;;) {
    int r = ::poll(&p, 1, timeout_ms);
    if (r < 0 && errno == EINTR) continue;
    VG_ERROR_IF(r < 0, Errc::kIo, "poll: {}", std::strerror(errno));
    VG_ERROR_IF(r == 0, Errc::kTimeout, "no progress on socket within {} ms", timeout_ms);
    return Ok();
  }
}

}  // namespace

std::vector<std::byte> EncodeMessage(Header hdr, std::span<const std::byte> payload) {
  hdr.msg_size = static_cast<uint32_t>(kHeaderSize + payload.size());
  // Sized once and filled with memcpy: GCC 12 at -O3 (release builds) misreads reserve()
  // followed by two insert()s as a write past a 16-byte allocation (-Wstringop-overflow).
  std::vector<std::byte> out(hdr.msg_size);
  std::memcpy(out.data(), &hdr, kHeaderSize);
  if (!payload.empty()) std::memcpy(out.data() + kHeaderSize, payload.data(), payload.size());
  return out;
}

Connection::Connection(UniqueFd sock, uint32_t max_msg_size, uint32_t max_fds)
    : sock_(std::move(sock)), max_msg_size_(max_msg_size), max_fds_(max_fds) {
  int fl = ::fcntl(sock_.Get(), F_GETFL);
  if (fl >= 0) ::fcntl(sock_.Get(), F_SETFL, fl | O_NONBLOCK);
}

Connection::~Connection() = default;

// Reads at most `len` bytes, never past the current message, so fds that arrive belong to
// the message being assembled.
Result<size_t> Connection::RecvSome(std::byte* dst, size_t len) {
  alignas(cmsghdr) char cbuf[CMSG_SPACE(sizeof(int) * kMaxCmsgFds)];
  iovec iov{dst, len};
  msghdr mh{};
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  mh.msg_control = cbuf;
  mh.msg_controllen = sizeof cbuf;
  ssize_t n;
  do {
    n = ::recvmsg(sock_.Get(), &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return size_t{0};
  VG_ERROR_IF(n < 0 && errno == ECONNRESET, Errc::kPeerClosed, "peer reset the connection");
  VG_ERROR_IF(n < 0, Errc::kIo, "recvmsg: {}", std::strerror(errno));
  // Take ownership of every fd first so an early return below cannot leak one.
  for (cmsghdr* c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t nfd = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < nfd; ++i) {
      int f;
      std::memcpy(&f, CMSG_DATA(c) + i * sizeof(int), sizeof f);
      UniqueFd owned(f);
      ++fds_seen_;
      if (cur_.fds.size() < max_fds_) cur_.fds.push_back(std::move(owned));  // else closed here
    }
  }
  if (fds_seen_ > max_fds_) cur_.too_many_fds = true;
  if (mh.msg_flags & MSG_CTRUNC) cur_.too_many_fds = true;  // the kernel dropped the rest
  VG_ERROR_IF(n == 0, Errc::kPeerClosed, "peer closed the connection");
  return static_cast<size_t>(n);
}

Result<std::optional<Message>> Connection::Receive() {
  for (;;) {
    switch (state_) {
      case State::kHeader: {
        VG_TRY_ASSIGN(size_t n, RecvSome(hdr_buf_ + have_, kHeaderSize - have_));
        if (n == 0) return std::optional<Message>{};
        have_ += n;
        if (have_ < kHeaderSize) continue;
        std::memcpy(&cur_.hdr, hdr_buf_, kHeaderSize);
        have_ = 0;
        // A size below the header cannot be framed: there is no way to find the next message.
        VG_ERROR_IF(cur_.hdr.msg_size < kHeaderSize, Errc::kBadMessage, "msg_size {} below the {}-byte header",
                    cur_.hdr.msg_size, kHeaderSize);
        uint32_t body = cur_.hdr.msg_size - kHeaderSize;
        if (cur_.hdr.msg_size > max_msg_size_) {
          cur_.oversized = true;
          discard_left_ = body;
          state_ = State::kDiscard;
          continue;
        }
        cur_.payload.resize(body);
        state_ = State::kBody;
        continue;
      }
      case State::kBody: {
        if (have_ < cur_.payload.size()) {
          VG_TRY_ASSIGN(size_t n, RecvSome(cur_.payload.data() + have_, cur_.payload.size() - have_));
          if (n == 0) return std::optional<Message>{};
          have_ += n;
          if (have_ < cur_.payload.size()) continue;
        }
        break;
      }
      case State::kDiscard: {
        if (discard_left_ > 0) {
          std::byte sink[4096];
          size_t want = discard_left_ < sizeof sink ? static_cast<size_t>(discard_left_) : sizeof sink;
          VG_TRY_ASSIGN(size_t n, RecvSome(sink, want));
          if (n == 0) return std::optional<Message>{};
          discard_left_ -= n;
          if (discard_left_ > 0) continue;
        }
        break;
      }
    }
    // A complete message.
    Message done = std::move(cur_);
    cur_ = Message{};
    have_ = 0;
    fds_seen_ = 0;
    state_ = State::kHeader;
    if (done.too_many_fds) done.fds.clear();
    return std::optional<Message>(std::move(done));
  }
}

Result<Message> Connection::ReceiveBlocking(int timeout_ms) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    VG_TRY_ASSIGN(std::optional<Message> m, Receive());
    if (m) return std::move(*m);
    VG_TRY(PollFor(sock_.Get(), POLLIN, RemainingMs(deadline)));
  }
}

Result<> Connection::Send(Header hdr, std::span<const std::byte> payload, std::span<const int> fds) {
  VG_ERROR_IF(payload.size() > UINT32_MAX - kHeaderSize, Errc::kMessageTooLarge, "payload of {} bytes",
              payload.size());
  return SendBytes(EncodeMessage(hdr, payload), fds);
}

Result<> Connection::SendBytes(std::span<const std::byte> bytes, std::span<const int> fds) {
  VG_INVALID_IF(bytes.empty() && !fds.empty(), "fds need at least one byte to travel with");
  OutChunk c;
  c.bytes.assign(bytes.begin(), bytes.end());
  for (int f : fds) {
    // Dup so a borrowed fd (a device's mmap fd) may close before the bytes leave.
    int d = ::fcntl(f, F_DUPFD_CLOEXEC, 0);
    VG_ERROR_IF(d < 0, Errc::kIo, "dup({}) for sending: {}", f, std::strerror(errno));
    c.fds.emplace_back(d);
  }
  out_bytes_ += c.bytes.size();
  out_.push_back(std::move(c));
  return Flush();
}

Result<> Connection::Flush() {
  while (!out_.empty()) {
    OutChunk& c = out_.front();
    iovec iov{c.bytes.data() + c.sent, c.bytes.size() - c.sent};
    msghdr mh{};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    std::vector<char> cbuf;
    if (c.sent == 0 && !c.fds.empty()) {
      cbuf.assign(CMSG_SPACE(sizeof(int) * c.fds.size()), 0);
      mh.msg_control = cbuf.data();
      mh.msg_controllen = cbuf.size();
      cmsghdr* cm = CMSG_FIRSTHDR(&mh);
      cm->cmsg_level = SOL_SOCKET;
      cm->cmsg_type = SCM_RIGHTS;
      cm->cmsg_len = CMSG_LEN(sizeof(int) * c.fds.size());
      for (size_t i = 0; i < c.fds.size(); ++i) {
        int f = c.fds[i].Get();
        std::memcpy(CMSG_DATA(cm) + i * sizeof(int), &f, sizeof f);
      }
    }
    ssize_t n;
    do {
      n = ::sendmsg(sock_.Get(), &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return Ok();
    VG_ERROR_IF(n < 0 && (errno == EPIPE || errno == ECONNRESET), Errc::kPeerClosed, "peer closed: {}",
                std::strerror(errno));
    VG_ERROR_IF(n < 0, Errc::kIo, "sendmsg: {}", std::strerror(errno));
    if (n > 0) c.fds.clear();  // the kernel now holds its own references
    c.sent += static_cast<size_t>(n);
    out_bytes_ -= static_cast<size_t>(n);
    if (c.sent == c.bytes.size()) out_.pop_front();
  }
  return Ok();
}

Result<> Connection::FlushBlocking(int timeout_ms) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    VG_TRY(Flush());
    if (out_.empty()) return Ok();
    VG_TRY(PollFor(sock_.Get(), POLLOUT, RemainingMs(deadline)));
  }
}

}  // namespace vg::vfio_user
