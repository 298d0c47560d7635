#pragma once
// Byte and fd transport for vfio-user over a unix stream socket. Knows the 16-byte header
// and msg_size framing, nothing about commands (STYLE.md: transport apart from protocol).
//
// Receive is non-blocking and resumable: a peer may send half a header and stall, and the
// daemon's single event loop must not wait for the rest. Send queues what the socket does
// not take at once, so a peer that never reads cannot block the loop either.

#include <cstddef>
#include <cstdint>
#include <deque>
#include <cstring>
#include <optional>
#include <span>
#include <vector>

#include "base/base.h"
#include "vfio_user/messages.h"

namespace vg::vfio_user {

struct Message {
  Header hdr;
  std::vector<std::byte> payload;  // msg_size - 16 bytes (empty when `oversized`)
  std::vector<UniqueFd> fds;       // SCM_RIGHTS received with this message
  // msg_size was over the receiver's limit: the body was read and discarded, so the stream
  // stays framed and the protocol can answer with an error.
  bool oversized = false;
  // More fds arrived than the receiver accepts per message; all were closed.
  bool too_many_fds = false;

  uint32_t type() const { return hdr.flags & kFlagTypeMask; }
  bool no_reply() const { return (hdr.flags & kFlagNoReply) != 0; }
  bool is_error() const { return (hdr.flags & kFlagError) != 0; }
};

// Serializes header + payload into one buffer (msg_size filled in).
std::vector<std::byte> EncodeMessage(Header hdr, std::span<const std::byte> payload);

template <class T>
  requires std::is_trivially_copyable_v<T>
std::span<const std::byte> AsBytes(const T& v) {
  return std::as_bytes(std::span<const T, 1>(&v, 1));
}
// Copies a T out of `bytes` at `off` (copy, then check, then use). Caller checked the size.
template <class T>
  requires std::is_trivially_copyable_v<T>
T LoadAt(std::span<const std::byte> bytes, size_t off = 0) {
  T v;
  std::memcpy(&v, bytes.data() + off, sizeof(T));
  return v;
}
template <class T>
  requires std::is_trivially_copyable_v<T>
void Append(std::vector<std::byte>& out, const T& v) {
  // resize + memcpy, not insert: GCC 12 at -O3 (release builds) misreads an insert into a
  // fresh vector as a write past its allocation (-Wstringop-overflow false positive).
  size_t at = out.size();
  out.resize(at + sizeof(T));
  std::memcpy(out.data() + at, &v, sizeof(T));
}

class Connection {
 public:
  // `sock` is made non-blocking. max_msg_size bounds what Receive() buffers; max_fds bounds
  // the fds accepted per message.
  Connection(UniqueFd sock, uint32_t max_msg_size, uint32_t max_fds);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  int fd() const { return sock_.Get(); }
  void SetLimits(uint32_t max_msg_size, uint32_t max_fds) {
    max_msg_size_ = max_msg_size;
    max_fds_ = max_fds;
  }
  uint32_t max_msg_size() const { return max_msg_size_; }

  // Reads what the socket has, never blocking. Returns a message once one is complete,
  // nullopt when more bytes are needed. kPeerClosed on EOF (also mid-message), kBadMessage
  // when the stream cannot be framed (msg_size < 16), kIo on socket errors.
  Result<std::optional<Message>> Receive();
  // Polls and receives until one message is complete or timeout_ms passes (kTimeout).
  Result<Message> ReceiveBlocking(int timeout_ms);

  // Queues header+payload with dup'ed fds and sends what the socket takes now. msg_size is
  // computed here.
  Result<> Send(Header hdr, std::span<const std::byte> payload, std::span<const int> fds = {});
  // Queues pre-encoded bytes as-is (hostile tests send malformed framing this way).
  Result<> SendBytes(std::span<const std::byte> bytes, std::span<const int> fds = {});
  // Non-blocking flush; ok when the queue is empty or the socket is full.
  Result<> Flush();
  // Polls until the queue is empty (kTimeout otherwise).
  Result<> FlushBlocking(int timeout_ms);
  bool HasPendingOutput() const { return !out_.empty(); }
  size_t PendingOutputBytes() const { return out_bytes_; }

 private:
  struct OutChunk {
    std::vector<std::byte> bytes;
    std::vector<UniqueFd> fds;  // sent with the first byte
    size_t sent = 0;
  };
  Result<size_t> RecvSome(std::byte* dst, size_t len);

  enum class State { kHeader, kBody, kDiscard };
  UniqueFd sock_;
  uint32_t max_msg_size_;
  uint32_t max_fds_;
  State state_ = State::kHeader;
  std::byte hdr_buf_[kHeaderSize];
  size_t have_ = 0;       // bytes of the current part received
  uint64_t discard_left_ = 0;
  Message cur_;
  size_t fds_seen_ = 0;   // fds that arrived for the current message, kept or not
  std::deque<OutChunk> out_;
  size_t out_bytes_ = 0;
};

}  // namespace vg::vfio_user
