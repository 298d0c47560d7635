#include "base/fd.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

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

Result<UniqueFd> CreateMemFd(const std::string& name, ByteSize size) {
  int fd = ::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
  VG_ERROR_IF(fd < 0, Errc::kIo, "memfd_create({}): {}", name, std::strerror(errno));
  UniqueFd owned(fd);
  VG_ERROR_IF(::ftruncate(fd, static_cast<off_t>(size.v)) != 0, Errc::kOutOfMemory, "ftruncate memfd {} to {:#x}: {}",
              name, size.v, std::strerror(errno));
  return owned;
}

}  // namespace vg
