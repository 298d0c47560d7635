// sandbox::Enter in real forked children: what /proc says afterwards, which calls kill,
// which fail with an errno, and that a worker's ordinary work still runs inside.

#include "sandbox/sandbox.h"

#include <doctest.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <pthread.h>
#include <sched.h>
#include <seccomp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>

#include <atomic>
#include <cstring>
#include <set>
#include <string_view>

#include "base/fd.h"
#include "base/log.h"
#include "tests/sandbox/child.h"

using namespace vg;
using namespace vg::sandbox;
using namespace vg::sandbox::test;

namespace {

// Whether this process holds any capability (the suite runs as root here: then dropping
// them is really observed, not vacuous).
bool HaveCapabilities() {
  auto s = Inspect(::getpid());
  return s && (s->cap_eff != 0 || s->cap_prm != 0);
}

int EnterOrDie(const Policy& p = {}) {
  auto r = Enter(p);
  if (!r) {
    std::fprintf(stderr, "child: Enter: %s\n", r.error().ToString().c_str());
    ::_exit(2);
  }
  return 0;
}

}  // namespace

TEST_CASE("Enter: /proc shows no_new_privs, seccomp filter, no capabilities, the rlimits") {
  if (!HaveCapabilities()) MESSAGE("not running with capabilities: the capability checks are vacuous here");
  Gate ready = Gate::Make(), done = Gate::Make();
  pid_t pid = Spawn([&] {
    Policy p;
    p.limits.open_files = 64;
    EnterOrDie(p);
    ready.Open();
    done.AwaitOpen(30'000);  // the parent inspects us meanwhile
    return 0;
  });
  ready.w = UniqueFd();
  REQUIRE_MESSAGE(ready.AwaitOpen(), "the child did not get through Enter");
  auto s = Inspect(pid);
  done.Open();
  ChildEnd end = Wait(pid);
  REQUIRE_MESSAGE(s.ok(), s.error().ToString());
  CHECK(s->no_new_privs);
  CHECK(s->seccomp_mode == 2);
  CHECK(s->cap_eff == 0);
  CHECK(s->cap_prm == 0);
  if (HaveCapabilities()) CHECK(s->cap_bnd == 0);  // we had CAP_SETPCAP, so the bounding set went too
  CHECK(s->rlimit_core == 0);
  CHECK(s->rlimit_nofile == 64);
  CHECK(s->threads == 1);
  CHECK(s->open_fds > 0);
  CHECK(s->rss_bytes > 0);
  CHECK(s->vm_peak_bytes >= s->rss_bytes);
  CHECK_MESSAGE(end.Exited(0), end.Describe());

  // And ourselves, unsandboxed, for contrast.
  auto me = Inspect(::getpid());
  REQUIRE(me.ok());
  CHECK(me->seccomp_mode == 0);
  rlimit core{};
  REQUIRE(::getrlimit(RLIMIT_CORE, &core) == 0);
  CHECK(me->rlimit_core == (core.rlim_cur == RLIM_INFINITY ? ProcessState::kUnlimited : core.rlim_cur));
}

TEST_CASE("Enter: forbidden calls kill the whole process with SIGSYS") {
  struct Forbidden {
    const char* what;
    bool in_sanitizer_builds;  // the runtimes need some of these (docs/isolation.md)
    std::function<void()> call;
  };
  static char buf[16];
  const Forbidden forbidden[] = {
      {"process_vm_readv", true,
       [] {
         iovec local{buf, sizeof buf}, remote{buf, sizeof buf};
         ::syscall(SYS_process_vm_readv, ::getppid(), &local, 1, &remote, 1, 0);
       }},
      {"unshare(CLONE_NEWUSER)", true, [] { ::syscall(SYS_unshare, CLONE_NEWUSER); }},
      {"mount", true, [] { ::syscall(SYS_mount, "none", "/tmp", "tmpfs", 0, nullptr); }},
      {"setuid", true, [] { ::syscall(SYS_setuid, 0); }},
      {"bpf", true, [] { ::syscall(SYS_bpf, 0, nullptr, 0); }},
      {"prctl(PR_SET_DUMPABLE)", false, [] { ::prctl(PR_SET_DUMPABLE, 1, 0, 0, 0); }},
      {"kill(parent)", true, [] { ::syscall(SYS_kill, ::getppid(), 0); }},
      {"tgkill(parent)", true, [] { ::syscall(SYS_tgkill, ::getppid(), ::getppid(), 0); }},
      {"clone with CLONE_NEWNET", true, [] { ::syscall(SYS_clone, CLONE_NEWNET | SIGCHLD, 0, 0, 0, 0); }},
      {"execve", false,
       [] {
         char* const argv[] = {const_cast<char*>("/bin/true"), nullptr};
         ::syscall(SYS_execve, "/bin/true", argv, nullptr);
       }},
      {"ptrace", false, [] { ::syscall(SYS_ptrace, PTRACE_TRACEME, 0, 0, 0); }},
      {"fork (clone without CLONE_THREAD)", false, [] { ::syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0); }},
  };
  for (const Forbidden& f : forbidden) {
    if (kSanitizerBuild && !f.in_sanitizer_builds) {
      MESSAGE("sanitizer build: ", std::string(f.what), " is allowed or refused with an errno for the runtimes; not checked");
      continue;
    }
    ChildEnd end = RunChild([&] {
      EnterOrDie();
      f.call();
      return 0;  // still alive: the filter let it through
    });
    CHECK_MESSAGE(end.KilledBy(SIGSYS), std::string(f.what), ": ", end.Describe());
  }
}

TEST_CASE("Enter: files, new sockets and clone3 fail with an errno, and the process lives") {
  int listen_pair[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, listen_pair) == 0);
  UniqueFd a(listen_pair[0]), b(listen_pair[1]);
  ChildEnd end = RunChild([&] {
    EnterOrDie();
    errno = 0;
    CHILD_EXPECT(::openat(AT_FDCWD, "/tmp/vgpud-sandbox-test", O_RDWR | O_CREAT, 0600) == -1 && errno == EACCES);
    CHILD_EXPECT(::open("/tmp/vgpud-sandbox-test", O_WRONLY | O_CREAT | O_TRUNC, 0600) == -1 && errno == EACCES);
    if (!kSanitizerBuild)  // read-only opens of /proc pass there, for the runtimes
      CHILD_EXPECT(::open("/proc/self/status", O_RDONLY) == -1 && errno == EACCES);
    CHILD_EXPECT(::unlink("/tmp/vgpud-sandbox-test") == -1 && errno == EACCES);
    CHILD_EXPECT(::socket(AF_INET, SOCK_STREAM, 0) == -1 && errno == EPERM);
    CHILD_EXPECT(::socket(AF_UNIX, SOCK_STREAM, 0) == -1 && errno == EPERM);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    CHILD_EXPECT(::connect(a.Get(), reinterpret_cast<sockaddr*>(&sa), sizeof sa) == -1 && errno == EPERM);
    CHILD_EXPECT(::syscall(SYS_clone3, nullptr, 0) == -1 && errno == ENOSYS);
    struct stat st {};
    CHILD_EXPECT(::stat("/etc/passwd", &st) == -1 && errno == EACCES);  // by path: refused like open
    CHILD_EXPECT(::fstat(2, &st) == 0);                                 // by fd: allowed
    int sv[2];
    CHILD_EXPECT(::socketpair(AF_INET, SOCK_STREAM, 0, sv) == -1 && errno == EPERM);
    CHILD_EXPECT(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    cpu_set_t cpus;
    CPU_ZERO(&cpus);
    CPU_SET(0, &cpus);
    CHILD_EXPECT(::sched_setaffinity(::getppid(), sizeof cpus, &cpus) == -1 && errno == EPERM);
    CHILD_EXPECT(::setpriority(PRIO_PROCESS, static_cast<id_t>(::getppid()), 19) == -1 && errno == EPERM);
    rlimit lim{};
    CHILD_EXPECT(::prlimit(::getppid(), RLIMIT_NOFILE, nullptr, &lim) == -1 && errno == EPERM);
    CHILD_EXPECT(::getrlimit(RLIMIT_NOFILE, &lim) == 0);
    CHILD_EXPECT(::prctl(PR_SET_NAME, "sandboxed", 0, 0, 0) == 0);
    return 0;
  });
  CHECK_MESSAGE(end.Exited(0), end.Describe());
  CHECK(::access("/tmp/vgpud-sandbox-test", F_OK) != 0);  // nothing was created
}

TEST_CASE("Enter: a thread created before Enter is filtered too (TSYNC)") {
  ChildEnd end = RunChild([] {
    // Capabilities are per thread: drop them before the thread exists, as a worker does.
    if (auto r = DropCapabilities(); !r) return 3;
    static int wake[2];
    CHILD_EXPECT(::pipe2(wake, O_CLOEXEC) == 0);
    pthread_t t;
    CHILD_EXPECT(::pthread_create(
                     &t, nullptr,
                     [](void*) -> void* {
                       char c;
                       if (::read(wake[0], &c, 1) != 1) return nullptr;
                       ::syscall(SYS_mount, "none", "/tmp", "tmpfs", 0, nullptr);  // forbidden
                       return nullptr;
                     },
                     nullptr) == 0);
    EnterOrDie();
    CHILD_EXPECT(::write(wake[1], "x", 1) == 1);
    ::pthread_join(t, nullptr);
    return 0;  // the thread's call went through
  });
  CHECK_MESSAGE(end.KilledBy(SIGSYS), end.Describe());
}

TEST_CASE("Enter: refuses while another thread still holds capabilities") {
  if (!HaveCapabilities()) {
    MESSAGE("skipped: not running with capabilities, so no thread can hold one");
    return;
  }
  ChildEnd end = RunChild([] {
    static int wake[2];
    CHILD_EXPECT(::pipe2(wake, O_CLOEXEC) == 0);
    pthread_t t;
    CHILD_EXPECT(::pthread_create(
                     &t, nullptr,
                     [](void*) -> void* {
                       char c;
                       (void)::read(wake[0], &c, 1);
                       return nullptr;
                     },
                     nullptr) == 0);
    auto r = Enter({});
    CHILD_EXPECT(!r.ok() && r.code() == Errc::kBadState);
    CHILD_EXPECT(r.error().what.find("DropCapabilities") != std::string::npos);
    CHILD_EXPECT(::write(wake[1], "x", 1) == 1);
    ::pthread_join(t, nullptr);
    return 0;
  });
  CHECK_MESSAGE(end.Exited(0), end.Describe());
}

namespace {
std::atomic<int> g_signals{0};
void CountSignal(int) { g_signals.fetch_add(1); }
}  // namespace

TEST_CASE("Enter: a worker's ordinary work runs inside the sandbox") {
  ChildEnd end = RunChild([] {
    // Made before Enter, as a worker's listeners and client connections are.
    int sp[2];
    CHILD_EXPECT(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) == 0);
    UniqueFd s0(sp[0]), s1(sp[1]);
    UniqueFd listener(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::snprintf(sa.sun_path + 1, sizeof sa.sun_path - 1, "vgpud-sandbox-test-%d", ::getpid());  // abstract
    const socklen_t sl = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + std::strlen(sa.sun_path + 1));
    CHILD_EXPECT(::bind(listener.Get(), reinterpret_cast<sockaddr*>(&sa), sl) == 0);
    CHILD_EXPECT(::listen(listener.Get(), 4) == 0);
    UniqueFd client(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    CHILD_EXPECT(::connect(client.Get(), reinterpret_cast<sockaddr*>(&sa), sl) == 0);

    EnterOrDie();

    // Accept a client on a listener.
    auto conn = AcceptConnection(listener.Get());
    CHILD_EXPECT(conn.ok());

    // A thread, named.
    std::atomic<int> ran{0};
    std::thread t([&] {
      ::pthread_setname_np(::pthread_self(), "vg-worker");
      ran = 1;
    });
    t.join();
    CHILD_EXPECT(ran == 1);

    // Guest RAM: a memfd, sized, mapped, passed with SCM_RIGHTS and mapped again.
    auto mem = CreateMemFd("guest-ram", ByteSize{1 << 20});
    CHILD_EXPECT(mem.ok());
    auto map = Mapping::Map(*mem, ByteSize{1 << 20}, 0);
    CHILD_EXPECT(map.ok());
    std::memcpy(map->data(), "hello", 5);
    CHILD_EXPECT(::madvise(map->data(), 4096, MADV_DONTNEED) == 0 || errno == EINVAL);
    {
      char byte = 'm';
      iovec iov{&byte, 1};
      alignas(cmsghdr) char ctl[CMSG_SPACE(sizeof(int))] = {};
      msghdr m{};
      m.msg_iov = &iov;
      m.msg_iovlen = 1;
      m.msg_control = ctl;
      m.msg_controllen = sizeof ctl;
      cmsghdr* c = CMSG_FIRSTHDR(&m);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int));
      const int fd = mem->Get();
      std::memcpy(CMSG_DATA(c), &fd, sizeof fd);
      CHILD_EXPECT(::sendmsg(s0.Get(), &m, MSG_NOSIGNAL) == 1);
    }
    {
      char byte = 0;
      iovec iov{&byte, 1};
      alignas(cmsghdr) char ctl[CMSG_SPACE(sizeof(int))] = {};
      msghdr m{};
      m.msg_iov = &iov;
      m.msg_iovlen = 1;
      m.msg_control = ctl;
      m.msg_controllen = sizeof ctl;
      CHILD_EXPECT(::recvmsg(s1.Get(), &m, MSG_CMSG_CLOEXEC) == 1);
      cmsghdr* c = CMSG_FIRSTHDR(&m);
      CHILD_EXPECT(c && c->cmsg_type == SCM_RIGHTS);
      int fd = -1;
      std::memcpy(&fd, CMSG_DATA(c), sizeof fd);
      UniqueFd got(fd);
      struct stat st {};
      CHILD_EXPECT(::fstat(got.Get(), &st) == 0 && st.st_size == (1 << 20));
      auto again = Mapping::Map(got, ByteSize{1 << 20}, 0);
      CHILD_EXPECT(again.ok());
      CHILD_EXPECT(std::memcmp(again->data() + 4096, map->data() + 4096, 16) == 0);
      void* grown = ::mremap(again->data(), 1 << 20, 1 << 20, 0);  // same size: a no-op that must pass
      CHILD_EXPECT(grown != MAP_FAILED);
    }

    // JIT-style code: write, then make executable (what LLVM does for lavapipe's pipelines).
    void* code = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHILD_EXPECT(code != MAP_FAILED);
#if defined(__x86_64__)
    static const unsigned char kRet42[] = {0xb8, 42, 0, 0, 0, 0xc3};  // mov eax, 42; ret
    std::memcpy(code, kRet42, sizeof kRet42);
    CHILD_EXPECT(::mprotect(code, 4096, PROT_READ | PROT_EXEC) == 0);
    CHILD_EXPECT(reinterpret_cast<int (*)()>(code)() == 42);
#else
    CHILD_EXPECT(::mprotect(code, 4096, PROT_READ | PROT_EXEC) == 0);
#endif
    CHILD_EXPECT(::munmap(code, 4096) == 0);

    // Eventfds, including the guarded paths for guest-shared ones (preadv2 RWF_NOWAIT, timers).
    auto ev = EventFd::Create();
    CHILD_EXPECT(ev.ok());
    CHILD_EXPECT(ev->TrySignal().ok());
    auto drained = ev->TryDrain();
    CHILD_EXPECT(drained.ok() && *drained == 1);
    UniqueFd blocking(::eventfd(0, EFD_CLOEXEC));
    auto shared = EventFd::Adopt(std::move(blocking));
    CHILD_EXPECT(shared.TrySignal().ok());  // the timer-guarded write
    CHILD_EXPECT(shared.Signal(2).ok());

    // epoll, as libevent uses it.
    UniqueFd ep(::epoll_create1(EPOLL_CLOEXEC));
    CHILD_EXPECT(ep.Valid());
    epoll_event e{};
    e.events = EPOLLIN;
    CHILD_EXPECT(::epoll_ctl(ep.Get(), EPOLL_CTL_ADD, shared.Get(), &e) == 0);
    epoll_event out{};
    CHILD_EXPECT(::epoll_wait(ep.Get(), &out, 1, 1000) == 1);

    // Signals to ourselves; the time; randomness; logging to stderr.
    struct sigaction sa_usr {};
    sa_usr.sa_handler = &CountSignal;
    CHILD_EXPECT(::sigaction(SIGUSR1, &sa_usr, nullptr) == 0);
    CHILD_EXPECT(::raise(SIGUSR1) == 0);
    CHILD_EXPECT(::kill(::getpid(), SIGUSR1) == 0);
    CHILD_EXPECT(g_signals == 2);
    timespec ts{};
    CHILD_EXPECT(::clock_gettime(CLOCK_MONOTONIC, &ts) == 0);
    const timespec nap{0, 1000};
    CHILD_EXPECT(::nanosleep(&nap, nullptr) == 0);
    unsigned char rnd[8];
    CHILD_EXPECT(::getrandom(rnd, sizeof rnd, 0) == sizeof rnd);
    VG_LOGI("sandboxed child {} still logs", ::getpid());
    return 0;
  });
  CHECK_MESSAGE(end.Exited(0), end.Describe());
}

TEST_CASE("Enter: RLIMIT_AS makes a big allocation fail with ENOMEM") {
  if (kSanitizerBuild) {
    MESSAGE("skipped: sanitizer build, where Enter ignores RLIMIT_AS (ASan's shadow needs terabytes)");
    return;
  }
  ChildEnd end = RunChild([] {
    auto me = Inspect(::getpid());
    CHILD_EXPECT(me.ok());
    // Current size plus 256 MiB: room for ordinary work, none for a 1 GiB mapping.
    Policy p;
    p.limits.address_space_bytes = me->vm_peak_bytes + (256ull << 20);
    EnterOrDie(p);
    errno = 0;
    void* big = ::mmap(nullptr, 1ull << 30, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHILD_EXPECT(big == MAP_FAILED && errno == ENOMEM);
    void* huge = std::malloc(1ull << 30);
    CHILD_EXPECT(huge == nullptr);
    void* small = ::mmap(nullptr, 16 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHILD_EXPECT(small != MAP_FAILED);
    rlimit l{};
    CHILD_EXPECT(::getrlimit(RLIMIT_AS, &l) == 0 && l.rlim_cur == p.limits.address_space_bytes);
    return 0;
  });
  CHECK_MESSAGE(end.Exited(0), end.Describe());
}

TEST_CASE("Enter: limits the kernel would accept but a worker cannot live with are refused") {
  ChildEnd end = RunChild([] {
    Policy p;
    p.limits.open_files = 1;  // below the fds already open
    auto r = Enter(p);
    CHILD_EXPECT(!r.ok() && r.code() == Errc::kLimitExceeded);
    rlimit hard{};
    CHILD_EXPECT(::getrlimit(RLIMIT_NOFILE, &hard) == 0);
    if (hard.rlim_max != RLIM_INFINITY) {
      p.limits.open_files = hard.rlim_max + 1;  // raising needs the capability just dropped
      r = Enter(p);
      CHILD_EXPECT(!r.ok() && r.code() == Errc::kInvalidArgument);
    }
    return 0;
  });
  CHECK_MESSAGE(end.Exited(0), end.Describe());
}

TEST_CASE("AllowedSyscalls: no duplicates, every name a syscall of this arch") {
  std::set<std::string_view> seen;
  for (const char* name : AllowedSyscalls()) {
    CHECK_MESSAGE(seen.insert(name).second, "duplicate: ", name);
    CHECK_MESSAGE(seccomp_syscall_resolve_name(name) != __NR_SCMP_ERROR, "unknown syscall: ", name);
  }
  CHECK(seen.count("accept4") == 1);
  CHECK(seen.count("execve") == 0);
  CHECK(seen.count("openat") == 0);
  CHECK(seen.count("socket") == 0);
  CHECK(seen.count("ptrace") == (kSanitizerBuild ? 1 : 0));
}
