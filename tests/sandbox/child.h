#pragma once
// Forked children for the sandbox tests. Enter is irreversible, so every test sandboxes a
// child, never the test process. Children end with _exit: no doctest teardown, and no
// LeakSanitizer check in sanitizer builds (its report is not what these tests are about).

#include <fcntl.h>
#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <thread>

#include "base/fd.h"

namespace vg::sandbox::test {

// In a child: a failed expectation ends it with exit code 1 and a line on stderr.
#define CHILD_EXPECT(cond)                                                                  \
  do {                                                                                      \
    if (!(cond)) {                                                                          \
      std::fprintf(stderr, "child %d: %s:%d: failed: %s (errno %d)\n", ::getpid(), __FILE__, \
                   __LINE__, #cond, errno);                                                 \
      ::_exit(1);                                                                           \
    }                                                                                       \
  } while (0)

// How a child ended, readable in a doctest message.
struct ChildEnd {
  int status = 0;
  bool timed_out = false;
  bool Exited(int code) const { return !timed_out && WIFEXITED(status) && WEXITSTATUS(status) == code; }
  bool KilledBy(int sig) const { return !timed_out && WIFSIGNALED(status) && WTERMSIG(status) == sig; }
  std::string Describe() const {
    if (timed_out) return "timed out (killed)";
    if (WIFEXITED(status)) return "exit " + std::to_string(WEXITSTATUS(status));
    if (WIFSIGNALED(status)) return std::string("signal ") + ::strsignal(WTERMSIG(status));
    return "status " + std::to_string(status);
  }
};

inline ChildEnd Wait(pid_t pid, std::chrono::seconds limit = std::chrono::seconds(30)) {
  ChildEnd end;
  const auto deadline = std::chrono::steady_clock::now() + limit;
  for (;;) {
    pid_t r = ::waitpid(pid, &end.status, WNOHANG);
    if (r == pid) return end;
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &end.status, 0);
      end.timed_out = true;
      return end;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

// Forks; the child runs body and _exits with what it returns.
inline pid_t Spawn(const std::function<int()>& body) {
  std::fflush(nullptr);  // no buffered doctest output duplicated into the child
  pid_t pid = ::fork();
  if (pid == 0) {
    // doctest's crash handlers report into the parent's test state; in a child (an abort
    // from a sanitizer, say) they would only muddle what the parent sees in waitpid.
    for (int sig : {SIGABRT, SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTERM, SIGINT}) ::signal(sig, SIG_DFL);
    ::_exit(body());
  }
  return pid;
}

inline ChildEnd RunChild(const std::function<int()>& body) { return Wait(Spawn(body)); }

// A one-byte handshake between parent and child (pipes made before fork).
struct Gate {
  UniqueFd r, w;
  static Gate Make() {
    int p[2];
    if (::pipe2(p, O_CLOEXEC) != 0) return {};
    return Gate{UniqueFd(p[0]), UniqueFd(p[1])};
  }
  bool Open() const { return ::write(w.Get(), "x", 1) == 1; }
  // True when a byte came within timeout_ms; false on EOF (the other side died) or timeout.
  bool AwaitOpen(int timeout_ms = 10'000) const {
    pollfd p{r.Get(), POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) != 1) return false;
    char c;
    return ::read(r.Get(), &c, 1) == 1;
  }
};

}  // namespace vg::sandbox::test
