#pragma once
// The channel between the vgpud supervisor and one vGPU worker: a SOCK_SEQPACKET socketpair,
// the worker's end at fd 3. Every message is one fixed-size record; the supervisor reads
// what a worker says as hostile (a worker serves a guest and may be its puppet), so a record
// of another size, magic or kind, or a pong for a ping never sent, is a protocol violation
// that costs the worker its life, never the supervisor anything.
//
//   supervisor → worker   kGo (after the worker is placed in its cgroup), kPing (seq),
//                         kFault (test builds only act on it)
//   worker → supervisor   kReady (serving; sandboxed), kPong (seq, counters)

#include <sys/socket.h>

#include <array>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace vg::daemon::channel {

// Fixed descriptor numbers in the worker (posix_spawn dup2's them there).
inline constexpr int kChannelFd = 3;
inline constexpr int kVfioUserFd = 4;   // listening SOCK_STREAM, <uuid>.sock
inline constexpr int kRemotingFd = 5;   // listening SOCK_SEQPACKET, <uuid>.remote.sock

inline constexpr uint32_t kMagic = 0x76677731;  // "vgw1"

enum class Kind : uint32_t {
  kGo = 1,
  kPing = 2,
  kPong = 3,
  kReady = 4,
  kFault = 5,
};

// What a pong reports, by slot in Record::values.
enum class Counter : uint32_t {
  kDoorbells,
  kSubmissions,
  kMmioRefusals,
  kCommandRefusals,
  kResets,
  kIrqs,
  kCommandsAudited,
  kPlansExecuted,
  kVfioClients,       // 0 or 1
  kRemotingClients,
  kRemotingCommands,
  kRemotingErrors,
  kCount,
};

// Test-only faults (a worker built with VGPUD_TEST_HOOKS acts on them; others log and ignore).
enum class Fault : uint64_t {
  kForbiddenSyscall = 1,  // a system call the seccomp filter kills for
  kHangLoop = 2,          // the event loop stops turning (as F11's blocking reads once made it)
  kCrash = 3,             // SIGSEGV
  kExhaustMemory = 4,     // allocates until the address-space limit refuses
};

struct Record {
  uint32_t magic = kMagic;
  Kind kind = Kind::kPing;
  uint64_t seq = 0;
  std::array<uint64_t, 16> values{};
};
static_assert(static_cast<size_t>(Counter::kCount) <= std::tuple_size_v<decltype(Record::values)>);
static_assert(sizeof(Record) == 144);

inline Record Make(Kind k, uint64_t seq = 0) {
  Record r;
  r.kind = k;
  r.seq = seq;
  return r;
}

// Nonblocking send of one record. False when the peer's queue is full or gone.
inline bool Send(int fd, const Record& r) {
  ssize_t n;
  do {
    n = ::send(fd, &r, sizeof r, MSG_NOSIGNAL | MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  return n == static_cast<ssize_t>(sizeof r);
}

enum class RecvStatus { kRecord, kEmpty, kClosed, kMalformed };

// One record, checked for size, magic and a known kind. MSG_TRUNC reports the real size of
// an oversized record, which is then refused whole.
inline RecvStatus Recv(int fd, Record& out) {
  Record r;
  ssize_t n;
  do {
    n = ::recv(fd, &r, sizeof r, MSG_DONTWAIT | MSG_TRUNC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? RecvStatus::kEmpty : RecvStatus::kClosed;
  if (n == 0) return RecvStatus::kClosed;
  if (n != static_cast<ssize_t>(sizeof r) || r.magic != kMagic) return RecvStatus::kMalformed;
  switch (r.kind) {
    case Kind::kGo: case Kind::kPing: case Kind::kPong: case Kind::kReady: case Kind::kFault: break;
    default: return RecvStatus::kMalformed;
  }
  out = r;
  return RecvStatus::kRecord;
}

}  // namespace vg::daemon::channel
