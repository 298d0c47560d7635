#include "base/fd.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <csignal>
#include <cstring>
#include <ctime>
#include <mutex>

namespace vg {

UniqueFd::~UniqueFd() {
  if (fd_ >= 0) ::close(fd_);
}

UniqueFd& UniqueFd::operator=(UniqueFd&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.Release();
  }
  return *this;
}

Result<UniqueFd> UniqueFd::Dup() const {
  int d = ::fcntl(fd_, F_DUPFD_CLOEXEC, 0);
  VG_ERROR_IF(d < 0, Errc::kIo, "dup({}): {}", fd_, std::strerror(errno));
  return UniqueFd(d);
}

Mapping::~Mapping() {
  if (!bytes_.empty()) ::munmap(bytes_.data(), bytes_.size());
}
Mapping::Mapping(Mapping&& o) noexcept : bytes_(o.bytes_) { o.bytes_ = {}; }
Mapping& Mapping::operator=(Mapping&& o) noexcept {
  if (this != &o) {
    if (!bytes_.empty()) ::munmap(bytes_.data(), bytes_.size());
    bytes_ = o.bytes_;
    o.bytes_ = {};
  }
  return *this;
}

Result<Mapping> Mapping::Map(const UniqueFd& fd, ByteSize size, uint64_t offset, Prot prot) {
  return MapRaw(fd.Get(), size, offset, prot);
}

Result<Mapping> Mapping::MapRaw(int fd, ByteSize size, uint64_t offset, Prot prot) {
  VG_INVALID_IF(size.v == 0, "zero-size mapping");
  VG_ERROR_IF(!IsAligned(offset, kPageSize), Errc::kMisaligned, "mapping offset {:#x} not page aligned", offset);
  int p = prot == Prot::kRead ? PROT_READ : PROT_READ | PROT_WRITE;
  void* addr = ::mmap(nullptr, size.v, p, MAP_SHARED, fd, static_cast<off_t>(offset));
  VG_ERROR_IF(addr == MAP_FAILED, Errc::kIo, "mmap(fd {}, {:#x} bytes at {:#x}): {}", fd, size.v, offset,
              std::strerror(errno));
  Mapping m;
  m.bytes_ = {static_cast<std::byte*>(addr), size.v};
  return m;
}

Result<EventFd> EventFd::Create(bool nonblocking) {
  int fd = ::eventfd(0, EFD_CLOEXEC | (nonblocking ? EFD_NONBLOCK : 0));
  VG_ERROR_IF(fd < 0, Errc::kIo, "eventfd: {}", std::strerror(errno));
  return EventFd(UniqueFd(fd));
}

Result<> EventFd::Signal(uint64_t n) const {
  ssize_t w = ::write(fd_.Get(), &n, sizeof n);
  VG_ERROR_IF(w != sizeof n && errno != EAGAIN, Errc::kIo, "eventfd write: {}", std::strerror(errno));
  return Ok();
}

Result<uint64_t> EventFd::Drain() const {
  uint64_t v = 0;
  ssize_t r = ::read(fd_.Get(), &v, sizeof v);
  if (r == sizeof v) return v;
  if (r < 0 && errno == EAGAIN) return uint64_t{0};
  return MakeError(Errc::kIo, "eventfd read: {}", std::strerror(errno));
}

Result<uint64_t> EventFd::Wait(int timeout_ms) const {
  pollfd p{fd_.Get(), POLLIN, 0};
  for (;;) {
    int r = ::poll(&p, 1, timeout_ms);
    if (r < 0 && errno == EINTR) continue;
    VG_ERROR_IF(r < 0, Errc::kIo, "poll: {}", std::strerror(errno));
    VG_ERROR_IF(r == 0, Errc::kTimeout, "eventfd not signalled within {} ms", timeout_ms);
    return Drain();
  }
}

namespace {

// The guard for a guest-held eventfd's read or write: a per-thread POSIX timer that sends
// kGuardSignal to this thread every kGuardMs while armed. The handler does nothing and is
// installed without SA_RESTART, so a read or write the guest made block returns EINTR at
// the next tick. Periodic, not one-shot: a tick that lands just before the syscall (this
// thread preempted) is followed by another while the syscall blocks.
int GuardSignal() { return SIGRTMIN + 7; }

void NoOpHandler(int) {}

class GuardTimer {
 public:
  GuardTimer() {
    static std::once_flag once;
    std::call_once(once, [] {
      struct sigaction sa {};
      sa.sa_handler = &NoOpHandler;
      sigemptyset(&sa.sa_mask);
      sa.sa_flags = 0;  // no SA_RESTART: the blocked syscall must return EINTR
      ::sigaction(GuardSignal(), &sa, nullptr);
    });
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, GuardSignal());
    ::pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
    sigevent sev{};
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = GuardSignal();
    sev._sigev_un._tid = static_cast<pid_t>(::syscall(SYS_gettid));
    ok_ = ::timer_create(CLOCK_MONOTONIC, &sev, &timer_) == 0;
  }
  ~GuardTimer() {
    if (ok_) ::timer_delete(timer_);
  }
  GuardTimer(const GuardTimer&) = delete;
  GuardTimer& operator=(const GuardTimer&) = delete;

  bool ok() const { return ok_; }
  void Arm(bool on) {
    itimerspec its{};
    if (on) its.it_value = its.it_interval = timespec{0, EventFd::kGuardMs * 1'000'000L};
    ::timer_settime(timer_, 0, &its, nullptr);
  }

 private:
  timer_t timer_{};
  bool ok_ = false;
};

GuardTimer& ThreadGuard() {
  thread_local GuardTimer t;
  return t;
}

// One read or write of 8 bytes that returns within kGuardMs even on a blocking fd.
ssize_t GuardedIo(int fd, uint64_t* v, bool write) {
  GuardTimer& g = ThreadGuard();
  if (!g.ok()) {
    errno = EAGAIN;  // no timer, no blocking syscall: report "nothing done"
    return -1;
  }
  g.Arm(true);
  ssize_t r = write ? ::write(fd, v, sizeof *v) : ::read(fd, v, sizeof *v);
  const int e = errno;
  g.Arm(false);
  errno = e;
  return r;
}

}  // namespace

Result<uint64_t> EventFd::TryDrain() const {
  uint64_t v = 0;
  iovec iov{&v, sizeof v};
  ssize_t r = ::preadv2(fd_.Get(), &iov, 1, -1, RWF_NOWAIT);
  if (r < 0 && errno == EOPNOTSUPP) {
    // No IOCB_NOWAIT for eventfd on this kernel: poll first (the common empty case costs
    // no timer), then the guarded read (the guest may drain it between the two).
    pollfd p{fd_.Get(), POLLIN, 0};
    if (::poll(&p, 1, 0) <= 0 || !(p.revents & POLLIN)) return uint64_t{0};
    r = GuardedIo(fd_.Get(), &v, false);
  }
  if (r == sizeof v) return v;
  if (r < 0 && (errno == EAGAIN || errno == EINTR)) return uint64_t{0};
  return MakeError(Errc::kIo, "eventfd read: {}", r < 0 ? std::strerror(errno) : "short read");
}

Result<> EventFd::TrySignal(int fd) {
  // Readable already (counter > 0): the waiter will wake; a write could only add to a
  // counter the guest may have filled to the brim.
  pollfd p{fd, POLLIN, 0};
  int n = ::poll(&p, 1, 0);
  VG_ERROR_IF(n < 0 && errno != EINTR, Errc::kIo, "poll: {}", std::strerror(errno));
  if (n > 0 && (p.revents & POLLIN)) return Ok();
  VG_ERROR_IF(n > 0 && (p.revents & (POLLERR | POLLNVAL)), Errc::kIo, "eventfd in error state");
  uint64_t one = 1;
  ssize_t r = GuardedIo(fd, &one, true);
  // EINTR/EAGAIN: the guest raced the counter up to its maximum; it is readable.
  VG_ERROR_IF(r != sizeof one && errno != EAGAIN && errno != EINTR, Errc::kIo, "eventfd write: {}",
              std::strerror(errno));
  return Ok();
}

Result<UniqueFd> AcceptConnection(int listen_fd) {
  // One spare descriptor per process, taken while the table has room, so that at EMFILE
  // there is one to give up. The loop thread is the only caller.
  static UniqueFd reserve;
  if (!reserve.Valid()) reserve = UniqueFd(::eventfd(0, EFD_CLOEXEC));
  for (;;) {
    int c = ::accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (c >= 0) return UniqueFd(c);
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return MakeError(Errc::kBusy, "no connection waiting");
    if (errno == EMFILE || errno == ENFILE) {
      const int e = errno;
      if (reserve.Valid()) {
        reserve = UniqueFd();
        UniqueFd shed(::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC));
        shed = UniqueFd();
        reserve = UniqueFd(::eventfd(0, EFD_CLOEXEC));
      }
      return MakeError(Errc::kLimitExceeded, "accept: {} (one waiting connection shed; backing off {} ms)",
                       std::strerror(e), kAcceptBackoffMs);
    }
    return MakeError(Errc::kIo, "accept: {}", std::strerror(errno));
  }
}

Result<> CheckIsEventFd(int fd) {
  struct Identity {
    bool ok = false;
    dev_t dev = 0;
    ino_t ino = 0;
  };
  static const Identity kEventFd = [] {
    Identity id;
    UniqueFd probe(::eventfd(0, EFD_CLOEXEC));
    struct stat st {};
    if (probe.Valid() && ::fstat(probe.Get(), &st) == 0) id = {true, st.st_dev, st.st_ino};
    return id;
  }();
  struct stat st {};
  VG_ERROR_IF(::fstat(fd, &st) != 0, Errc::kNotEventFd, "fd {}: cannot tell what it is: {}", fd, std::strerror(errno));
  VG_ERROR_IF(!kEventFd.ok || (st.st_mode & S_IFMT) != 0 || st.st_dev != kEventFd.dev || st.st_ino != kEventFd.ino,
              Errc::kNotEventFd, "an interrupt fd must be an eventfd, not a {}",
              S_ISFIFO(st.st_mode) ? "pipe" : S_ISSOCK(st.st_mode) ? "socket" : S_ISREG(st.st_mode) ? "file" : "other fd");
  return Ok();
}

Result<UniqueFd> ListenUnix(const std::string& path, int type, int backlog) {
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  VG_INVALID_IF(path.empty() || path.size() >= sizeof(sa.sun_path), "socket path '{}' too long", path);
  std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    VG_ERROR_IF(!S_ISSOCK(st.st_mode), Errc::kAlreadyExists, "{} exists and is not a socket", path);
    UniqueFd probe(::socket(AF_UNIX, type | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    VG_ERROR_IF(!probe.Valid(), Errc::kIo, "socket: {}", std::strerror(errno));
    const int c = ::connect(probe.Get(), reinterpret_cast<sockaddr*>(&sa), sizeof sa);
    // EAGAIN: a live listener whose backlog is full.
    VG_ERROR_IF(c == 0 || errno == EAGAIN, Errc::kAlreadyExists, "{} is in use by a live server", path);
    ::unlink(path.c_str());
  }
  UniqueFd sock(::socket(AF_UNIX, type | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  VG_ERROR_IF(!sock.Valid(), Errc::kIo, "socket: {}", std::strerror(errno));
  VG_ERROR_IF(::bind(sock.Get(), reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0, Errc::kIo, "bind {}: {}", path,
              std::strerror(errno));
  VG_ERROR_IF(::listen(sock.Get(), backlog) != 0, Errc::kIo, "listen {}: {}", path, std::strerror(errno));
  return sock;
}

Result<UniqueFd> CreateMemFd(const std::string& name, ByteSize size) {
  int fd = ::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
  VG_ERROR_IF(fd < 0, Errc::kIo, "memfd_create({}): {}", name, std::strerror(errno));
  UniqueFd owned(fd);
  VG_ERROR_IF(::ftruncate(fd, static_cast<off_t>(size.v)) != 0, Errc::kOutOfMemory, "ftruncate memfd {} to {:#x}: {}",
              name, size.v, std::strerror(errno));
  return owned;
}

}  // namespace vg
