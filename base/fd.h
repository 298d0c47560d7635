#pragma once
// RAII owners for fds, mappings, eventfds and memfds. Move-only; there is no close():
// an owner releases its resource when it dies or is assigned over.

#include <sys/types.h>

#include <cstddef>
#include <span>
#include <string>

#include "base/result.h"
#include "base/types.h"

namespace vg {

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) noexcept : fd_(fd) {}
  ~UniqueFd();
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.Release()) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  int Get() const { return fd_; }
  bool Valid() const { return fd_ >= 0; }
  int Release() noexcept {
    int f = fd_;
    fd_ = -1;
    return f;
  }
  Result<UniqueFd> Dup() const;

 private:
  int fd_ = -1;
};

// A shared mapping of an fd. Unmapped on destruction.
class Mapping {
 public:
  Mapping() = default;
  ~Mapping();
  Mapping(Mapping&& o) noexcept;
  Mapping& operator=(Mapping&& o) noexcept;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  enum class Prot { kRead, kReadWrite };
  static Result<Mapping> Map(const UniqueFd& fd, ByteSize size, uint64_t offset, Prot prot = Prot::kReadWrite);
  static Result<Mapping> MapRaw(int fd, ByteSize size, uint64_t offset, Prot prot);

  std::byte* data() const { return bytes_.data(); }
  ByteSize size() const { return ByteSize{bytes_.size()}; }
  std::span<std::byte> bytes() const { return bytes_; }
  bool Valid() const { return !bytes_.empty(); }

 private:
  std::span<std::byte> bytes_;
};

// An eventfd: the doorbell ioeventfd, IRQ vectors, engine completions.
class EventFd {
 public:
  static Result<EventFd> Create(bool nonblocking = true);
  static EventFd Adopt(UniqueFd fd) { return EventFd(std::move(fd)); }
  EventFd() = default;

  Result<> Signal(uint64_t n = 1) const;
  // Reads and clears the counter; 0 when nothing was pending (non-blocking fds).
  Result<uint64_t> Drain() const;
  // Blocks up to timeout_ms (-1 forever) for the fd to become readable, then drains.
  Result<uint64_t> Wait(int timeout_ms) const;

  // For an eventfd a guest also holds (the remoting wake and reply eventfds, the doorbell
  // ioeventfd): the guest shares the open file description, so it can clear O_NONBLOCK at
  // any time (F_SETFL acts on the description) and turn Drain()/Signal() into reads and
  // writes that block forever. These never block, whatever the fd's flags say:
  // - TryDrain reads with preadv2(RWF_NOWAIT) (eventfd honours IOCB_NOWAIT, Linux >= 5.12);
  //   0 when nothing was pending.
  // - TrySignal makes the fd readable: nothing to write when it already is (counter > 0);
  //   otherwise one write under a per-thread interval timer whose signal interrupts a
  //   write the guest made block (eventfd has no write_iter, so RWF_NOWAIT is refused),
  //   bounding it to kGuardMs. A write that could not land means the guest filled the
  //   counter, so the fd is readable anyway: still Ok.
  // Older kernels without RWF_NOWAIT on eventfd take the timer path for reads too.
  static constexpr int kGuardMs = 2;
  Result<uint64_t> TryDrain() const;
  Result<> TrySignal() const { return TrySignal(fd_.Get()); }
  // The same for any eventfd (an interrupt's trigger fd, held as a UniqueFd).
  static Result<> TrySignal(int fd);
  int Get() const { return fd_.Get(); }
  bool Valid() const { return fd_.Valid(); }
  const UniqueFd& fd() const { return fd_; }
  Result<UniqueFd> DupFd() const { return fd_.Dup(); }

 private:
  explicit EventFd(UniqueFd fd) : fd_(std::move(fd)) {}
  UniqueFd fd_;
};

// accept4(SOCK_NONBLOCK | SOCK_CLOEXEC) for a level-triggered listener on the loop.
// kBusy: nothing waiting (EAGAIN). kLimitExceeded: the fd table is full (EMFILE/ENFILE):
// the waiting connection cannot be taken, so the listener stays readable and would spin
// the loop at full CPU; the oldest waiting connection is shed (a reserve fd is given up,
// the connection accepted and closed at once, so its peer sees EOF, and the reserve
// retaken) and the caller stops accepting for kAcceptBackoffMs before it tries again.
inline constexpr int kAcceptBackoffMs = 100;
Result<UniqueFd> AcceptConnection(int listen_fd);

// kNotEventFd unless `fd` is an anonymous-inode file like an eventfd: its fstat identity
// (device and inode) is that of an eventfd of our own. Decided by fstat alone, because a
// sandboxed worker cannot read /proc (docs/isolation.md). The shared anonymous inode also
// backs timerfd, signalfd and epoll fds: none of them can block a write or a nonblocking
// read, which is what the check is for; pipes, sockets, memfds and files are refused.
Result<> CheckIsEventFd(int fd);

// A listening unix socket at `path` (SOCK_STREAM or SOCK_SEQPACKET; nonblocking, cloexec).
// A socket file there that nobody answers on is left over from a dead process and is
// replaced; a live one is kAlreadyExists; anything else at the path is not touched.
Result<UniqueFd> ListenUnix(const std::string& path, int type, int backlog);

// An anonymous shared-memory file (guest RAM, apertures, status pages), sized at creation.
Result<UniqueFd> CreateMemFd(const std::string& name, ByteSize size);

}  // namespace vg
