#include "sandbox/sandbox.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <sched.h>
#include <seccomp.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <string>
#include <string_view>

#include "base/fd.h"
#include "base/log.h"

namespace vg::sandbox {
namespace {

// ---------------------------------------------------------------------------------------
// The filter, as data. Everything not named here kills the process (SCMP_ACT_KILL_PROCESS):
// execve/execveat, ptrace, process_vm_readv/writev, mount, unshare/setns, bpf, perf_event_open,
// keyctl, init_module, reboot, kexec_*, setuid & co, chroot, pivot_root, userfaultfd,
// io_uring_*, fork... A worker that makes one of those calls has been taken over.
//
// The list is what tools/vgpud did after its start-up under strace -f while the e2e and mdev
// suites drove it (docs/isolation.md): steady state, plus shutdown after SIGTERM.

enum class Cond : uint8_t {
  kAny,          // whatever the arguments
  kThreadClone,  // clone: a thread (CLONE_THREAD|CLONE_VM|CLONE_SIGHAND), no namespace flags
  kPrctlName,    // prctl: PR_SET_NAME / PR_GET_NAME only (thread names)
  kSelfPid,      // kill, tgkill: arg0 == our pid (signals to our own threads only)
  kSelfOnly,     // prlimit64: arg0 == 0 (this process), as glibc's getrlimit/setrlimit pass it
  kEmptyPath,    // newfstatat (arg3), statx (arg2): AT_EMPTY_PATH, i.e. fstat() on an fd we hold
  kUnixPair,     // socketpair: AF_UNIX only (the vfio-user twin socket of each client)
};

struct AllowRule {
  const char* name;
  Cond cond;
};

constexpr AllowRule kAllow[] = {
    // I/O on fds the worker already has or receives: sockets, memfds, eventfds, timerfds, pipes.
    {"read", Cond::kAny}, {"write", Cond::kAny}, {"readv", Cond::kAny}, {"writev", Cond::kAny},
    {"pread64", Cond::kAny}, {"pwrite64", Cond::kAny}, {"preadv", Cond::kAny}, {"pwritev", Cond::kAny},
    {"preadv2", Cond::kAny},  // RWF_NOWAIT reads of guest-shared eventfds (base/fd.h TryDrain)
    {"pwritev2", Cond::kAny}, {"lseek", Cond::kAny},
    {"close", Cond::kAny}, {"dup", Cond::kAny}, {"dup3", Cond::kAny}, {"fcntl", Cond::kAny},
    {"fstat", Cond::kAny}, {"newfstatat", Cond::kEmptyPath},  // glibc 2.36 fstat() is newfstatat(fd, "", AT_EMPTY_PATH)
    {"statx", Cond::kEmptyPath}, {"ftruncate", Cond::kAny}, {"fallocate", Cond::kAny},
    {"memfd_create", Cond::kAny}, {"eventfd2", Cond::kAny}, {"pipe2", Cond::kAny},
    {"pipe", Cond::kAny},  // libvncserver's thread wake-ups (F10): glibc's pipe() is this syscall
    {"timerfd_create", Cond::kAny}, {"timerfd_settime", Cond::kAny}, {"timerfd_gettime", Cond::kAny},
    // ioctl stays open: a real GPU's driver is driven through ioctls on its device fds.
    {"ioctl", Cond::kAny},
    // Sockets that exist already: accept clients on the listeners, messages with SCM_RIGHTS.
    {"accept4", Cond::kAny}, {"accept", Cond::kAny}, {"recvmsg", Cond::kAny}, {"sendmsg", Cond::kAny},
    {"recvfrom", Cond::kAny}, {"sendto", Cond::kAny}, {"shutdown", Cond::kAny},
    {"getsockopt", Cond::kAny}, {"setsockopt", Cond::kAny}, {"getsockname", Cond::kAny},
    {"getpeername", Cond::kAny}, {"socketpair", Cond::kUnixPair},
    // Event loops (libevent) and waits.
    {"epoll_create1", Cond::kAny}, {"epoll_ctl", Cond::kAny}, {"epoll_wait", Cond::kAny},
    {"epoll_pwait", Cond::kAny}, {"epoll_pwait2", Cond::kAny}, {"poll", Cond::kAny}, {"ppoll", Cond::kAny},
    {"select", Cond::kAny}, {"pselect6", Cond::kAny},
    // Memory: guest RAM and apertures (memfds), thread stacks, malloc, LLVM's JIT (PROT_EXEC).
    {"mmap", Cond::kAny}, {"munmap", Cond::kAny}, {"mprotect", Cond::kAny}, {"madvise", Cond::kAny},
    {"mremap", Cond::kAny}, {"brk", Cond::kAny}, {"msync", Cond::kAny}, {"mincore", Cond::kAny},
    {"membarrier", Cond::kAny},
    // Threads and their synchronisation.
    {"clone", Cond::kThreadClone}, {"futex", Cond::kAny}, {"set_robust_list", Cond::kAny},
    {"rseq", Cond::kAny}, {"set_tid_address", Cond::kAny},
    {"sched_yield", Cond::kAny}, {"sched_getaffinity", Cond::kAny}, {"sched_getscheduler", Cond::kAny},
    {"sched_getparam", Cond::kAny}, {"sched_getattr", Cond::kAny},
    {"gettid", Cond::kAny}, {"getpid", Cond::kAny}, {"getppid", Cond::kAny},
    {"getuid", Cond::kAny}, {"geteuid", Cond::kAny}, {"getgid", Cond::kAny}, {"getegid", Cond::kAny},
    {"prctl", Cond::kPrctlName},
    {"exit", Cond::kAny}, {"exit_group", Cond::kAny}, {"restart_syscall", Cond::kAny},
    // Signals, to ourselves only. The per-thread POSIX timers guard writes to guest-shared
    // eventfds (base/fd.cc GuardTimer) with SIGEV_THREAD_ID.
    {"rt_sigaction", Cond::kAny}, {"rt_sigprocmask", Cond::kAny}, {"rt_sigreturn", Cond::kAny},
    {"rt_sigtimedwait", Cond::kAny}, {"sigaltstack", Cond::kAny},
    {"tgkill", Cond::kSelfPid}, {"kill", Cond::kSelfPid},
    {"timer_create", Cond::kAny}, {"timer_settime", Cond::kAny}, {"timer_gettime", Cond::kAny},
    {"timer_delete", Cond::kAny},
    // Time and randomness.
    {"clock_gettime", Cond::kAny}, {"clock_getres", Cond::kAny}, {"clock_nanosleep", Cond::kAny},
    {"nanosleep", Cond::kAny}, {"gettimeofday", Cond::kAny}, {"getrandom", Cond::kAny},
    {"getrusage", Cond::kAny}, {"sysinfo", Cond::kAny}, {"uname", Cond::kAny},
    {"getrlimit", Cond::kAny}, {"prlimit64", Cond::kSelfOnly},
};

// Refused with an errno instead of a kill: calls libraries make lazily and survive (Mesa's
// shader cache, /proc reads, a probe for a socket), which must not turn a harmless library
// path into a dead worker. They reach nothing: the kernel never sees them.
struct ErrnoRule {
  const char* name;
  int err;
};

constexpr ErrnoRule kErrno[] = {
    // No path reaches the file system.
    {"open", EACCES}, {"openat", EACCES}, {"openat2", EACCES}, {"creat", EACCES},
    {"stat", EACCES}, {"lstat", EACCES}, {"access", EACCES}, {"faccessat", EACCES},
    {"faccessat2", EACCES}, {"readlink", EACCES}, {"readlinkat", EACCES},
    {"mkdir", EACCES}, {"mkdirat", EACCES}, {"unlink", EACCES}, {"unlinkat", EACCES},
    {"rename", EACCES}, {"renameat", EACCES}, {"renameat2", EACCES},
    {"getdents64", EACCES}, {"chdir", EACCES},
    // No new sockets: a worker's only peers are the clients on its listeners.
    {"socket", EPERM}, {"connect", EPERM}, {"bind", EPERM}, {"listen", EPERM},
    // They take any pid of the same uid, and a worker may run as root like the supervisor:
    // it must not renice or pin the supervisor. Mesa's queues set them on their own threads
    // and ignore a failure.
    {"sched_setaffinity", EPERM}, {"setpriority", EPERM},
    // Mesa's util_queue threads ask for SCHED_BATCH/SCHED_IDLE when they start, which in a
    // worker is lazily, inside the sandbox; same-uid pids again, and a failure is ignored.
    {"sched_setscheduler", EPERM}, {"sched_setparam", EPERM}, {"sched_setattr", EPERM},
    // clone3 passes its flags in memory, where a filter cannot read them: ENOSYS makes
    // glibc (>= 2.34) fall back to clone, whose flags the kThreadClone rule checks.
    {"clone3", ENOSYS},
};

// Sanitizer builds only (tests): what the ASan/LSan/UBSan runtimes do under a worker.
// LeakSanitizer's exit check clones a tracer thread (no CLONE_THREAD), ptrace-attaches to
// every thread, waits for them and reads /proc/self/{maps,task}; error reports read
// /proc/self/maps and fork+exec llvm-symbolizer (exec stays denied, with EPERM here so the
// report prints unsymbolized rather than the process dying before it prints).
constexpr AllowRule kSanitizerExtras[] = {
    {"ptrace", Cond::kAny}, {"wait4", Cond::kAny}, {"waitid", Cond::kAny},
};

constexpr size_t kAllowedCount = std::size(kAllow) + (kSanitizerBuild ? std::size(kSanitizerExtras) : 0);
constexpr std::array<const char*, kAllowedCount> kAllowedNames = [] {
  std::array<const char*, kAllowedCount> a{};
  size_t i = 0;
  for (const AllowRule& r : kAllow) a[i++] = r.name;
  if constexpr (kSanitizerBuild)
    for (const AllowRule& r : kSanitizerExtras) a[i++] = r.name;
  return a;
}();

// Owner of a libseccomp context (released on every path).
class FilterCtx {
 public:
  explicit FilterCtx(scmp_filter_ctx c) : c_(c) {}
  ~FilterCtx() {
    if (c_) seccomp_release(c_);
  }
  FilterCtx(const FilterCtx&) = delete;
  FilterCtx& operator=(const FilterCtx&) = delete;
  scmp_filter_ctx get() const { return c_; }

 private:
  scmp_filter_ctx c_;
};

Result<> AddRule(const FilterCtx& f, uint32_t action, const char* name, std::initializer_list<scmp_arg_cmp> args) {
  const int nr = seccomp_syscall_resolve_name(name);
  // Not a syscall of this arch (open on aarch64...): nothing to allow or refuse.
  if (nr == __NR_SCMP_ERROR) return Ok();
  const int rc = seccomp_rule_add_array(f.get(), action, nr, static_cast<unsigned>(args.size()), args.begin());
  VG_ERROR_IF(rc != 0, Errc::kInternal, "seccomp rule for {}: {}", name, std::strerror(-rc));
  return Ok();
}

// Namespace flags a thread (or, in sanitizer builds, LSan's tracer) never needs.
constexpr uint64_t kCloneNsFlags = CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER |
                                   CLONE_NEWPID | CLONE_NEWNET;
constexpr uint64_t kCloneThreadFlags = CLONE_THREAD | CLONE_VM | CLONE_SIGHAND;

Result<> AddAllow(const FilterCtx& f, const AllowRule& r, pid_t self) {
  const uint32_t allow = SCMP_ACT_ALLOW;
  switch (r.cond) {
    case Cond::kAny:
      return AddRule(f, allow, r.name, {});
    case Cond::kThreadClone:
      if constexpr (kSanitizerBuild)  // LSan's tracer and the symbolizer's fork are not threads
        return AddRule(f, allow, r.name, {SCMP_A0(SCMP_CMP_MASKED_EQ, kCloneNsFlags, 0)});
      return AddRule(f, allow, r.name,
                     {SCMP_A0(SCMP_CMP_MASKED_EQ, kCloneNsFlags | kCloneThreadFlags, kCloneThreadFlags)});
    case Cond::kPrctlName:
      VG_TRY(AddRule(f, allow, r.name, {SCMP_A0(SCMP_CMP_EQ, PR_SET_NAME)}));
      VG_TRY(AddRule(f, allow, r.name, {SCMP_A0(SCMP_CMP_EQ, PR_GET_NAME)}));
      if constexpr (kSanitizerBuild) {
        // LSan's tracer: PR_SET_PDEATHSIG; the traced process: PR_GET/SET_DUMPABLE, PR_SET_PTRACER.
        for (int op : {PR_SET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_DUMPABLE, PR_SET_PTRACER})
          VG_TRY(AddRule(f, allow, r.name, {SCMP_A0(SCMP_CMP_EQ, static_cast<uint64_t>(op))}));
      }
      return Ok();
    case Cond::kSelfPid:
      return AddRule(f, allow, r.name, {SCMP_A0(SCMP_CMP_EQ, static_cast<uint64_t>(self))});
    case Cond::kSelfOnly:
      VG_TRY(AddRule(f, allow, r.name, {SCMP_A0(SCMP_CMP_EQ, 0)}));
      return AddRule(f, SCMP_ACT_ERRNO(EPERM), r.name, {SCMP_A0(SCMP_CMP_NE, 0)});
    case Cond::kEmptyPath: {
      // A path with AT_EMPTY_PATH is still looked up; glibc's stat(path) passes flags 0 and
      // is refused like open, fstat(fd) passes AT_EMPTY_PATH and "".
      const bool statx = std::string_view(r.name) == "statx";
      const scmp_arg_cmp has = statx ? SCMP_A2(SCMP_CMP_MASKED_EQ, AT_EMPTY_PATH, AT_EMPTY_PATH)
                                     : SCMP_A3(SCMP_CMP_MASKED_EQ, AT_EMPTY_PATH, AT_EMPTY_PATH);
      const scmp_arg_cmp lacks = statx ? SCMP_A2(SCMP_CMP_MASKED_EQ, AT_EMPTY_PATH, 0)
                                       : SCMP_A3(SCMP_CMP_MASKED_EQ, AT_EMPTY_PATH, 0);
      VG_TRY(AddRule(f, allow, r.name, {has}));
      return AddRule(f, SCMP_ACT_ERRNO(EACCES), r.name, {lacks});
    }
    case Cond::kUnixPair:
      VG_TRY(AddRule(f, allow, r.name, {SCMP_A0(SCMP_CMP_EQ, AF_UNIX)}));
      return AddRule(f, SCMP_ACT_ERRNO(EPERM), r.name, {SCMP_A0(SCMP_CMP_NE, AF_UNIX)});
  }
  return MakeError(Errc::kInternal, "unknown rule condition for {}", r.name);
}

Result<> InstallFilter() {
  FilterCtx f(seccomp_init(SCMP_ACT_KILL_PROCESS));
  VG_ERROR_IF(!f.get(), Errc::kUnsupported, "seccomp_init failed");
  // Another syscall ABI (int 0x80 i386, x32) would bypass the table: kill.
  VG_ERROR_IF(seccomp_attr_set(f.get(), SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS) != 0, Errc::kInternal,
              "seccomp bad-arch action");
  // Every thread at once: the engine's and libevent's threads exist already.
  VG_ERROR_IF(seccomp_attr_set(f.get(), SCMP_FLTATR_CTL_TSYNC, 1) != 0, Errc::kUnsupported,
              "seccomp TSYNC not supported by this kernel");
  (void)seccomp_attr_set(f.get(), SCMP_FLTATR_API_SYSRAWRC, 1);  // real errnos in the messages below

  const pid_t self = ::getpid();
  for (const AllowRule& r : kAllow) VG_TRY(AddAllow(f, r, self));
  if constexpr (kSanitizerBuild) {
    for (const AllowRule& r : kSanitizerExtras) VG_TRY(AddAllow(f, r, self));
    // The runtimes read /proc/self/maps and /proc/<pid>/task (x86_64's libsanitizer uses
    // open, others openat): read-only opens pass, anything that could write or create is
    // still refused (one rule per flag bit: a filter has no "masked !=").
    constexpr uint64_t kWriteFlags = O_ACCMODE | O_CREAT | O_TRUNC | O_APPEND | __O_TMPFILE;
    VG_TRY(AddRule(f, SCMP_ACT_ALLOW, "openat", {SCMP_A2(SCMP_CMP_MASKED_EQ, kWriteFlags, 0)}));
    for (uint64_t bit : {uint64_t{O_WRONLY}, uint64_t{O_RDWR}, uint64_t{O_CREAT}, uint64_t{O_TRUNC},
                         uint64_t{O_APPEND}, uint64_t{__O_TMPFILE}})
      VG_TRY(AddRule(f, SCMP_ACT_ERRNO(EACCES), "openat", {SCMP_A2(SCMP_CMP_MASKED_EQ, bit, bit)}));
    // LeakSanitizer's tracer (x86_64 libsanitizer) lists /proc/<pid>/task with the legacy
    // open and getdents; seen under SCMP_ACT_LOG, its open matched no flag rule, so both
    // are allowed whole here (test builds only).
    VG_TRY(AddRule(f, SCMP_ACT_ALLOW, "open", {}));
    VG_TRY(AddRule(f, SCMP_ACT_ALLOW, "getdents", {}));
    VG_TRY(AddRule(f, SCMP_ACT_ALLOW, "getdents64", {}));
    VG_TRY(AddRule(f, SCMP_ACT_ERRNO(EPERM), "execve", {}));
  }
  for (const ErrnoRule& r : kErrno) {
    const std::string_view n = r.name;
    if (kSanitizerBuild && (n == "open" || n == "openat" || n == "getdents64"))
      continue;  // handled above
    VG_TRY(AddRule(f, SCMP_ACT_ERRNO(static_cast<uint32_t>(r.err)), r.name, {}));
  }

  const int rc = seccomp_load(f.get());
  VG_ERROR_IF(rc != 0, Errc::kInternal, "seccomp_load: {}", std::strerror(-rc));
  return Ok();
}

// ---------------------------------------------------------------------------------------
// /proc readers.

Result<std::string> ReadSmallFile(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  VG_ERROR_IF(!fd.Valid(), errno == ENOENT ? Errc::kNotFound : Errc::kIo, "open {}: {}", path, std::strerror(errno));
  std::string out;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd.Get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    VG_ERROR_IF(n < 0, Errc::kIo, "read {}: {}", path, std::strerror(errno));
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

// The value after "Key:" in a /proc status file, or empty.
std::string_view Field(std::string_view text, std::string_view key) {
  size_t pos = 0;
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string_view::npos) eol = text.size();
    std::string_view line = text.substr(pos, eol - pos);
    if (line.size() > key.size() && line.substr(0, key.size()) == key && line[key.size()] == ':') {
      line.remove_prefix(key.size() + 1);
      while (!line.empty() && (line.front() == ' ' || line.front() == '\t')) line.remove_prefix(1);
      return line;
    }
    pos = eol + 1;
  }
  return {};
}

Result<uint64_t> ParseNumber(std::string_view s, int base, std::string_view what) {
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v, base);
  VG_ERROR_IF(s.empty() || ec != std::errc(), Errc::kBadMessage, "{}: '{}' is not a number", what, s);
  return v;
}

// "VmRSS:	  1234 kB" -> bytes; absent (kernel threads, zombies) -> 0.
Result<uint64_t> KiloBytes(std::string_view status, std::string_view key) {
  std::string_view v = Field(status, key);
  if (v.empty()) return uint64_t{0};
  VG_TRY_ASSIGN(uint64_t kb, ParseNumber(v.substr(0, v.find(' ')), 10, key));
  return kb * 1024;
}

// The soft limit of one row of /proc/<pid>/limits ("Max open files  256  256  files").
Result<uint64_t> SoftLimit(std::string_view limits, std::string_view row) {
  size_t at = limits.find(row);
  VG_ERROR_IF(at == std::string_view::npos, Errc::kBadMessage, "no '{}' row in limits", row);
  std::string_view rest = limits.substr(at + row.size());
  while (!rest.empty() && rest.front() == ' ') rest.remove_prefix(1);
  std::string_view tok = rest.substr(0, rest.find(' '));
  if (tok == "unlimited") return ProcessState::kUnlimited;
  return ParseNumber(tok, 10, row);
}

uint64_t CapMask(std::string_view status, std::string_view key, bool* ok) {
  auto v = ParseNumber(Field(status, key), 16, key);
  if (!v) *ok = false;
  return v.value_or(0);
}

// Fds open in /proc/<pid>/fd, not counting the one this listing itself uses when pid is us.
Result<uint32_t> CountFds(pid_t pid) {
  const std::string dir = fmt::format("/proc/{}/fd", pid);
  DIR* d = ::opendir(dir.c_str());
  VG_ERROR_IF(!d, Errc::kIo, "opendir {}: {}", dir, std::strerror(errno));
  const int own = pid == ::getpid() ? ::dirfd(d) : -1;
  uint32_t n = 0;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    if (own >= 0 && std::string_view(e->d_name) == std::to_string(own)) continue;
    ++n;
  }
  ::closedir(d);
  return n;
}

// Every thread of this process with a capability left, as "tid (comm): CapEff/CapPrm".
Result<std::string> ThreadsWithCapabilities() {
  DIR* d = ::opendir("/proc/self/task");
  VG_ERROR_IF(!d, Errc::kIo, "opendir /proc/self/task: {}", std::strerror(errno));
  std::string found;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    auto status = ReadSmallFile(fmt::format("/proc/self/task/{}/status", e->d_name));
    if (!status) continue;  // the thread exited meanwhile
    bool ok = true;
    const uint64_t eff = CapMask(*status, "CapEff", &ok), prm = CapMask(*status, "CapPrm", &ok);
    if (!ok || eff != 0 || prm != 0)
      found += fmt::format("{}{} ({}): CapEff {:#x} CapPrm {:#x}", found.empty() ? "" : "; ", e->d_name,
                           Field(*status, "Name"), eff, prm);
  }
  ::closedir(d);
  return found;
}

Result<> SetLimit(int resource, const char* name, uint64_t value) {
  rlimit cur{};
  VG_ERROR_IF(::getrlimit(resource, &cur) != 0, Errc::kIo, "getrlimit {}: {}", name, std::strerror(errno));
  // Without CAP_SYS_RESOURCE (dropped) a hard limit only goes down.
  VG_INVALID_IF(cur.rlim_max != RLIM_INFINITY && value > cur.rlim_max,
                "{} {} is above the hard limit {}, which only a privileged process can raise", name, value,
                cur.rlim_max);
  rlimit l{static_cast<rlim_t>(value), static_cast<rlim_t>(value)};
  VG_ERROR_IF(::setrlimit(resource, &l) != 0, Errc::kIo, "setrlimit {} {}: {}", name, value, std::strerror(errno));
  return Ok();
}

Result<> ApplyLimits(const Limits& l) {
  VG_TRY(SetLimit(RLIMIT_CORE, "RLIMIT_CORE", 0));
  VG_INVALID_IF(l.open_files == 0, "open_files 0 would leave the worker no fd to accept with");
  VG_TRY_ASSIGN(uint32_t open_now, CountFds(::getpid()));
  // The kernel accepts a limit below the fds already open; the worker then could not accept
  // a single client, which is a misconfiguration better reported here.
  VG_ERROR_IF(l.open_files < open_now, Errc::kLimitExceeded, "RLIMIT_NOFILE {} is below the {} fds already open",
              l.open_files, open_now);
  VG_TRY(SetLimit(RLIMIT_NOFILE, "RLIMIT_NOFILE", l.open_files));
  if (l.address_space_bytes != 0) {
    if constexpr (kSanitizerBuild) {
      VG_LOGW("sandbox: RLIMIT_AS {} ignored: sanitizer build (ASan's shadow needs terabytes of address space)",
              l.address_space_bytes);
    } else {
      VG_TRY(SetLimit(RLIMIT_AS, "RLIMIT_AS", l.address_space_bytes));
    }
  }
  return Ok();
}

}  // namespace

Result<> DropCapabilities() {
  // Ambient first (PR_CAP_AMBIENT needs Linux >= 4.3; EINVAL before that means none exist).
  if (::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL)
    return MakeError(Errc::kIo, "clear ambient capabilities: {}", std::strerror(errno));
  // The bounding set while CAP_SETPCAP is still effective: it is what an execve could regain.
  // PR_CAPBSET_READ fails with EINVAL past the kernel's last capability.
  for (unsigned long cap = 0;; ++cap) {
    const int in_set = ::prctl(PR_CAPBSET_READ, cap, 0, 0, 0);
    if (in_set < 0) break;
    if (in_set == 0) continue;
    if (::prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0) {
      // EPERM: no CAP_SETPCAP (an unprivileged worker). What stays in the bounding set cannot
      // be used: nothing is permitted, and NO_NEW_PRIVS and the filter forbid execve.
      VG_ERROR_IF(errno != EPERM, Errc::kIo, "drop capability {} from the bounding set: {}", cap,
                  std::strerror(errno));
      break;
    }
  }
  // Effective, permitted and inheritable, through the raw syscall: no libcap for three words.
  __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {};
  VG_ERROR_IF(::syscall(SYS_capset, &hdr, data) != 0, Errc::kIo, "capset: {}", std::strerror(errno));
  return Ok();
}

Result<> Enter(const Policy& p) {
  VG_ERROR_IF(::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0, Errc::kIo, "PR_SET_NO_NEW_PRIVS: {}",
              std::strerror(errno));
  VG_TRY_CTX(DropCapabilities(), "dropping capabilities");
  VG_TRY_ASSIGN(std::string holders, ThreadsWithCapabilities());
  VG_ERROR_IF(!holders.empty(), Errc::kBadState,
              "threads still hold capabilities ({}); capabilities are per thread: call "
              "sandbox::DropCapabilities() before creating threads",
              holders);
  VG_TRY_CTX(ApplyLimits(p.limits), "rlimits");
  // Dropping permitted capabilities made the process non-dumpable (the kernel's
  // commit_creds): its /proc files become root's and nobody without CAP_SYS_PTRACE may
  // trace it. That is what a production worker keeps. LeakSanitizer's exit check needs its
  // own tracer (a capability-less clone of us) to read /proc/<pid>/task and ptrace us.
  if (kSanitizerBuild)
    VG_ERROR_IF(::prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) != 0, Errc::kIo, "PR_SET_DUMPABLE: {}", std::strerror(errno));
  if (p.seccomp) VG_TRY_CTX(InstallFilter(), "seccomp filter");
  return Ok();
}

std::span<const char* const> AllowedSyscalls() { return kAllowedNames; }

Result<ProcessState> Inspect(pid_t pid) {
  VG_INVALID_IF(pid <= 0, "pid {}", pid);
  VG_TRY_ASSIGN(std::string status, ReadSmallFile(fmt::format("/proc/{}/status", pid)));
  VG_TRY_ASSIGN(std::string limits, ReadSmallFile(fmt::format("/proc/{}/limits", pid)));
  ProcessState s;
  bool ok = true;
  s.no_new_privs = Field(status, "NoNewPrivs") == "1";
  s.seccomp_mode = static_cast<int>(ParseNumber(Field(status, "Seccomp"), 10, "Seccomp").value_or(0));
  s.cap_eff = CapMask(status, "CapEff", &ok);
  s.cap_prm = CapMask(status, "CapPrm", &ok);
  s.cap_bnd = CapMask(status, "CapBnd", &ok);
  VG_ERROR_IF(!ok, Errc::kBadMessage, "/proc/{}/status: unreadable capability masks", pid);
  VG_TRY_ASSIGN(s.rss_bytes, KiloBytes(status, "VmRSS"));
  VG_TRY_ASSIGN(s.vm_peak_bytes, KiloBytes(status, "VmPeak"));
  VG_TRY_ASSIGN(uint64_t threads, ParseNumber(Field(status, "Threads"), 10, "Threads"));
  s.threads = static_cast<uint32_t>(threads);
  VG_TRY_ASSIGN(s.open_fds, CountFds(pid));
  VG_TRY_ASSIGN(s.rlimit_as, SoftLimit(limits, "Max address space"));
  VG_TRY_ASSIGN(s.rlimit_nofile, SoftLimit(limits, "Max open files"));
  VG_TRY_ASSIGN(s.rlimit_core, SoftLimit(limits, "Max core file size"));
  return s;
}

}  // namespace vg::sandbox
