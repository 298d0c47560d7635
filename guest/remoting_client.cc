#include "guest/remoting_client.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

namespace vg::guest {

namespace w = remoting::wire;

namespace {

template <class T>
std::span<const std::byte> Bytes(const T& v) {
  return std::as_bytes(std::span<const T, 1>(&v, 1));
}

using Clock = std::chrono::steady_clock;

}  // namespace

Result<std::unique_ptr<RemotingClient>> RemotingClient::Connect(const RemotingOptions& opts) {
  std::unique_ptr<RemotingClient> c(new RemotingClient(opts));
  VG_TRY(c->Init());
  return c;
}

Result<std::unique_ptr<RemotingClient>> RemotingClient::Connect(UniqueFd sock, const RemotingOptions& opts) {
  std::unique_ptr<RemotingClient> c(new RemotingClient(opts));
  c->sock_ = std::move(sock);
  VG_TRY(c->Init());
  return c;
}

RemotingClient::~RemotingClient() { (void)Flush(); }

Result<> RemotingClient::Init() {
  VG_INVALID_IF(!IsPowerOfTwo(opts_.ring_size) || opts_.ring_size < w::kMinRingSize, "ring size {:#x}",
                opts_.ring_size);
  VG_INVALID_IF(opts_.heap_size % kPageSize != 0, "heap size {:#x}", opts_.heap_size);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  VG_INVALID_IF(opts_.socket.size() >= sizeof(addr.sun_path), "socket path too long");
  std::memcpy(addr.sun_path, opts_.socket.c_str(), opts_.socket.size());
  auto deadline = Clock::now() + std::chrono::milliseconds(opts_.connect_timeout_ms);
  while (!sock_.Valid()) {
    UniqueFd s(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    VG_ERROR_IF(!s.Valid(), Errc::kIo, "socket: {}", std::strerror(errno));
    if (::connect(s.Get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
      sock_ = std::move(s);
      break;
    }
    VG_ERROR_IF(Clock::now() > deadline, Errc::kIo, "connect {}: {}", opts_.socket, std::strerror(errno));
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }

  const uint64_t area_size = w::AreaSize(opts_.ring_size, opts_.heap_size);
  VG_TRY_ASSIGN(memfd_, CreateMemFd("vgpu-remoting", ByteSize{area_size}));
  // The daemon maps this area for our whole life: promise it cannot shrink under it.
  VG_ERROR_IF(::fcntl(memfd_.Get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0, Errc::kIo,
              "seal memfd: {}", std::strerror(errno));
  VG_TRY_ASSIGN(area_, Mapping::Map(memfd_, ByteSize{area_size}, 0));
  VG_TRY_ASSIGN(wake_, EventFd::Create(true));

  w::Hello hello{w::kMagic, w::kVersion, opts_.ring_size, 0, opts_.heap_size};
  iovec iov{&hello, sizeof(hello)};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char cbuf[CMSG_SPACE(2 * sizeof(int))] = {};
  msg.msg_control = cbuf;
  msg.msg_controllen = sizeof(cbuf);
  cmsghdr* cm = CMSG_FIRSTHDR(&msg);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(2 * sizeof(int));
  int fds[2] = {memfd_.Get(), wake_.Get()};
  std::memcpy(CMSG_DATA(cm), fds, sizeof(fds));
  VG_ERROR_IF(::sendmsg(sock_.Get(), &msg, MSG_NOSIGNAL) != sizeof(hello), Errc::kIo, "send hello: {}",
              std::strerror(errno));

  pollfd p{sock_.Get(), POLLIN, 0};
  int left = std::max(1, static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                              deadline - Clock::now()).count()));
  VG_ERROR_IF(::poll(&p, 1, left) <= 0, Errc::kTimeout, "no welcome from {}", opts_.socket);
  w::Welcome wl{};
  iovec riov{&wl, sizeof(wl)};
  msghdr rmsg{};
  rmsg.msg_iov = &riov;
  rmsg.msg_iovlen = 1;
  alignas(cmsghdr) char rbuf[CMSG_SPACE(sizeof(int))] = {};
  rmsg.msg_control = rbuf;
  rmsg.msg_controllen = sizeof(rbuf);
  ssize_t n = ::recvmsg(sock_.Get(), &rmsg, MSG_CMSG_CLOEXEC);
  UniqueFd reply_fd;
  for (cmsghdr* c = CMSG_FIRSTHDR(&rmsg); c; c = CMSG_NXTHDR(&rmsg, c))
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS && c->cmsg_len >= CMSG_LEN(sizeof(int))) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c), sizeof(int));
      reply_fd = UniqueFd(fd);
    }
  VG_ERROR_IF(n == 0, Errc::kPeerClosed, "daemon closed the handshake");
  VG_ERROR_IF(n != sizeof(wl) || wl.magic != w::kMagic, Errc::kBadMessage, "bad welcome ({} bytes)", n);
  VG_ERROR_IF(wl.status != 0, ErrcFromValue(wl.status), "daemon refused the handshake: {}",
              ErrcName(ErrcFromValue(wl.status)));
  VG_ERROR_IF(!reply_fd.Valid(), Errc::kBadFdCount, "welcome without a reply eventfd");
  reply_ = EventFd::Adopt(std::move(reply_fd));
  return Ok();
}

std::span<std::byte> RemotingClient::heap() const {
  return area_.bytes().subspan(w::HeapOffset(opts_.ring_size), opts_.heap_size);
}
std::span<std::byte> RemotingClient::ring() const {
  return area_.bytes().subspan(w::kRingOffset, opts_.ring_size);
}
uint32_t RemotingClient::Head() const { return w::LoadShared<uint32_t>(area_.data(), w::kHeadOffset); }
uint64_t RemotingClient::completed() const { return w::LoadShared<uint64_t>(area_.data(), w::kStatusFenceOffset); }
bool RemotingClient::Dead() const {
  return (w::LoadShared<uint32_t>(area_.data(), w::kStatusFlagsOffset) & w::kStatusDead) != 0;
}
RemoteError RemotingClient::LastError() const {
  // error_count is stored last by the daemon: read it first, then the fields it covers.
  uint32_t count = w::LoadShared<uint32_t>(area_.data(), w::kStatusErrorCountOffset);
  return {ErrcFromValue(w::LoadShared<uint32_t>(area_.data(), w::kStatusErrorCodeOffset)),
          w::LoadShared<uint32_t>(area_.data(), w::kStatusErrorOffsetOffset), count};
}

Result<> RemotingClient::CheckErrors() {
  RemoteError e = LastError();
  if (e.count == errors_seen_ && Dead()) {
    // The daemon raises DEAD just before it publishes why: give the reason a moment to land
    // so the caller gets the named error, not a bare "dropped".
    auto until = Clock::now() + std::chrono::milliseconds(100);
    while ((e = LastError()).count == errors_seen_ && Clock::now() < until) std::this_thread::yield();
  }
  if (e.count != errors_seen_) {
    errors_seen_ = e.count;
    return MakeError(e.code, "daemon refused the command at ring offset {:#x}{}", e.offset,
                     Dead() ? " and dropped this client" : "");
  }
  VG_ERROR_IF(Dead(), Errc::kPeerClosed, "daemon dropped this client");
  return Ok();
}

void RemotingClient::Kick() {
  // Notification suppression (Venus vn_ring / virtio): store the tail, full fence, then look
  // at the daemon's IDLE flag. The daemon sets IDLE, fences and re-reads the tail before it
  // sleeps, so one of the two always sees the other.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (!opts_.idle_notify ||
      (w::LoadShared<uint32_t>(area_.data(), w::kStatusFlagsOffset, std::memory_order_seq_cst) & w::kStatusIdle)) {
    (void)wake_.Signal();
    ++counters_.wakes_sent;
  } else {
    ++counters_.wakes_suppressed;
  }
}

Result<> RemotingClient::Flush() {
  if (!area_.Valid() || tail_ == published_) return Ok();
  w::StoreShared<uint32_t>(area_.data(), w::kTailOffset, tail_, std::memory_order_seq_cst);
  published_ = tail_;
  ++counters_.publishes;
  Kick();
  return Ok();
}

void RemotingClient::StoreTail(uint32_t tail) {
  w::StoreShared<uint32_t>(area_.data(), w::kTailOffset, tail, std::memory_order_seq_cst);
  published_ = tail_ = tail;
  Kick();
}
void RemotingClient::StoreHead(uint32_t head) { w::StoreShared<uint32_t>(area_.data(), w::kHeadOffset, head); }

Result<> RemotingClient::WaitForSpace(uint32_t bytes) {
  if (opts_.ring_size - (tail_ - Head()) >= bytes) return Ok();
  ++counters_.ring_full_waits;
  VG_TRY(Flush());
  auto deadline = Clock::now() + std::chrono::seconds(10);
  while (opts_.ring_size - (tail_ - Head()) < bytes) {
    VG_ERROR_IF(Dead(), Errc::kPeerClosed, "daemon dropped this client");
    VG_ERROR_IF(Clock::now() > deadline, Errc::kTimeout, "ring full: daemon consumed nothing");
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
  return Ok();
}

Result<> RemotingClient::AppendRaw(std::span<const std::byte> bytes) {
  VG_INVALID_IF(bytes.size() % w::kAlign != 0 || bytes.size() > opts_.ring_size, "raw append of {} bytes",
                bytes.size());
  VG_TRY(WaitForSpace(static_cast<uint32_t>(bytes.size())));
  auto r = ring();
  const uint32_t start = tail_ & (opts_.ring_size - 1);
  const size_t first = std::min<size_t>(bytes.size(), opts_.ring_size - start);
  std::memcpy(r.data() + start, bytes.data(), first);
  std::memcpy(r.data(), bytes.data() + first, bytes.size() - first);
  tail_ += static_cast<uint32_t>(bytes.size());
  counters_.ring_bytes += bytes.size();
  ++counters_.commands;
  return Ok();
}

Result<> RemotingClient::Append(w::Op op, std::span<const std::byte> payload) {
  const uint32_t size = w::AlignUp8(static_cast<uint32_t>(sizeof(w::CmdHeader) + payload.size()));
  VG_ERROR_IF(size > w::kMaxCommandSize, Errc::kMessageTooLarge, "command of {} bytes", size);
  std::byte buf[w::kMaxCommandSize] = {};
  w::CmdHeader h{static_cast<uint16_t>(op), 0, size};
  std::memcpy(buf, &h, sizeof(h));
  std::memcpy(buf + sizeof(h), payload.data(), payload.size());
  VG_TRY(AppendRaw(std::span<const std::byte>(buf, size)));
  // Unbatched (the ablation): published as soon as it is recorded.
  if (!opts_.batch) VG_TRY(Flush());
  return Ok();
}

Result<uint64_t> RemotingClient::HeapAlloc(uint64_t size) {
  VG_ERROR_IF(size > opts_.heap_size, Errc::kMessageTooLarge, "{} bytes > heap", size);
  if (opts_.heap_size - heap_top_ < size) {
    // Bump allocator: reuse the heap once the daemon has executed everything published
    // (head == tail), so no WRITE source or READ destination is still referenced.
    ++counters_.ring_full_waits;
    VG_TRY(Flush());
    auto deadline = Clock::now() + std::chrono::seconds(10);
    while (Head() != tail_) {
      VG_ERROR_IF(Dead(), Errc::kPeerClosed, "daemon dropped this client");
      VG_ERROR_IF(Clock::now() > deadline, Errc::kTimeout, "heap full: daemon consumed nothing");
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
    heap_top_ = 0;
  }
  uint64_t off = heap_top_;
  heap_top_ += (size + 63) & ~uint64_t{63};  // keep payloads cache-line apart
  if (heap_top_ > opts_.heap_size) heap_top_ = opts_.heap_size;
  return off;
}

Result<RemoteBuffer> RemotingClient::CreateBufferWithId(uint32_t id, uint64_t size) {
  w::CreateBufferCmd c{id, 0, size};
  VG_TRY(Append(w::Op::kCreateBuffer, Bytes(c)));
  return RemoteBuffer{id, size};
}

Result<RemoteBuffer> RemotingClient::CreateBuffer(uint64_t size) { return CreateBufferWithId(next_id_++, size); }

Result<> RemotingClient::DestroyBuffer(const RemoteBuffer& b) {
  w::DestroyBufferCmd c{b.id, 0};
  return Append(w::Op::kDestroyBuffer, Bytes(c));
}

Result<> RemotingClient::Write(const RemoteBuffer& b, uint64_t offset, std::span<const std::byte> data) {
  // Chunks of at most half the heap, so a large write streams instead of stalling.
  const uint64_t chunk = std::max<uint64_t>(opts_.heap_size / 2, 4096);
  for (uint64_t done = 0; done < data.size();) {
    uint64_t n = std::min<uint64_t>(chunk, data.size() - done);
    VG_TRY_ASSIGN(uint64_t at, HeapAlloc(n));
    std::memcpy(heap().data() + at, data.data() + done, n);
    w::WriteCmd c{b.id, 0, offset + done, at, n};
    VG_TRY(Append(w::Op::kWrite, Bytes(c)));
    counters_.heap_bytes_in += n;
    done += n;
  }
  return Ok();
}

Result<> RemotingClient::Read(const RemoteBuffer& b, uint64_t offset, std::span<std::byte> out, int timeout_ms) {
  const uint64_t chunk = std::max<uint64_t>(opts_.heap_size / 2, 4096);
  for (uint64_t done = 0; done < out.size();) {
    uint64_t n = std::min<uint64_t>(chunk, out.size() - done);
    VG_TRY_ASSIGN(uint64_t at, HeapAlloc(n));
    w::ReadCmd c{b.id, 0, offset + done, at, n, ++read_seq_};
    VG_TRY(Append(w::Op::kRead, Bytes(c)));
    VG_TRY(Flush());
    auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    bool blocked = false;
    while (w::LoadShared<uint64_t>(area_.data(), w::kStatusReplyOffset) < read_seq_) {
      VG_TRY(CheckErrors());
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
      VG_ERROR_IF(left <= 0, Errc::kTimeout, "no reply to read {}", read_seq_);
      blocked = true;
      (void)reply_.Wait(static_cast<int>(std::min<int64_t>(left, 100)));
    }
    if (blocked) ++counters_.replies_waited;
    VG_TRY(CheckErrors());
    std::memcpy(out.data() + done, heap().data() + at, n);
    counters_.heap_bytes_out += n;
    done += n;
  }
  return Ok();
}

Result<> RemotingClient::Dispatch(uint32_t kernel, std::array<uint32_t, 3> groups,
                                  std::span<const RemoteBinding> bindings, std::span<const std::byte> push) {
  std::vector<std::byte> p;
  w::DispatchCmd d{kernel, {groups[0], groups[1], groups[2]}, static_cast<uint32_t>(bindings.size()),
                   static_cast<uint32_t>(push.size())};
  auto hb = Bytes(d);
  p.insert(p.end(), hb.begin(), hb.end());
  for (const auto& b : bindings) {
    w::DispatchBinding wb{b.id, 0, b.offset, b.size};
    auto bb = Bytes(wb);
    p.insert(p.end(), bb.begin(), bb.end());
  }
  p.insert(p.end(), push.begin(), push.end());
  return Append(w::Op::kDispatch, p);
}

Result<> RemotingClient::Copy(const RemoteBuffer& src, uint64_t src_offset, const RemoteBuffer& dst,
                              uint64_t dst_offset, uint64_t size) {
  w::CopyCmd c{src.id, dst.id, src_offset, dst_offset, size};
  return Append(w::Op::kCopy, Bytes(c));
}

Result<> RemotingClient::Fill(const RemoteBuffer& dst, uint64_t offset, uint64_t size, uint32_t value) {
  w::FillCmd c{dst.id, value, offset, size};
  return Append(w::Op::kFill, Bytes(c));
}

Result<uint64_t> RemotingClient::Submit() {
  w::FenceCmd c{fence_seq_ + 1};
  VG_TRY(Append(w::Op::kFence, Bytes(c)));
  ++fence_seq_;
  ++counters_.submissions;
  VG_TRY(Flush());
  return fence_seq_;
}

Result<> RemotingClient::Wait(uint64_t seq, int timeout_ms) {
  VG_TRY(Flush());
  auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  bool blocked = false;
  while (completed() < seq) {
    VG_TRY(CheckErrors());
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    VG_ERROR_IF(left <= 0, Errc::kTimeout, "fence {} not reached (completed {})", seq, completed());
    blocked = true;
    (void)reply_.Wait(static_cast<int>(std::min<int64_t>(left, 100)));
  }
  if (blocked) ++counters_.replies_waited;
  return CheckErrors();
}

}  // namespace vg::guest
