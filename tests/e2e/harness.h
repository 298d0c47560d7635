#pragma once
// End-to-end harness: runs the real vgpud binary and real guest processes.
// Paths of the built binaries come from the environment meson sets (VGPUD, VGPU_GUEST).

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "base/base.h"

namespace vg::e2e {

inline std::string EnvOr(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v ? v : fallback;
}

// The socket file exists once the daemon has bound it. Probing with a connection would
// occupy the vGPU's single client slot, so the clients' own connect retry covers the
// short gap between bind and listen.
inline bool SocketExists(const std::string& path) {
  std::error_code ec;
  return std::filesystem::is_socket(path, ec);
}

// fork + exec; returns the child's pid.
inline pid_t Spawn(const std::vector<std::string>& argv, const std::string& stdout_path = "") {
  pid_t pid = ::fork();
  if (pid == 0) {
    if (!stdout_path.empty()) {
      FILE* f = std::freopen(stdout_path.c_str(), "w", stdout);
      (void)f;
    }
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    std::_Exit(127);
  }
  return pid;
}

// Waits for a child; returns its exit code, 128+signal when killed, -1 on timeout.
inline int WaitExit(pid_t pid, int timeout_ms = 60000) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    int status = 0;
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (std::chrono::steady_clock::now() > deadline) return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

inline bool Alive(pid_t pid) { return ::waitpid(pid, nullptr, WNOHANG) == 0 && ::kill(pid, 0) == 0; }

// One vgpud process serving the given "UUID:TYPE" vGPUs in a fresh runtime dir.
class Daemon {
 public:
  explicit Daemon(std::vector<std::string> vgpus, std::vector<std::string> extra = {}) {
    dir_ = std::filesystem::temp_directory_path() / ("vgpud-e2e-" + std::to_string(::getpid()) + "-" +
                                                     std::to_string(counter_++));
    std::filesystem::create_directories(dir_);
    std::vector<std::string> argv{EnvOr("VGPUD", "tools/vgpud"), "--runtime-dir", dir_.string()};
    for (auto& v : vgpus) {
      argv.push_back("--vgpu");
      argv.push_back(v);
      uuids_.push_back(v.substr(0, v.find(':')));
    }
    for (auto& e : extra) argv.push_back(e);
    pid_ = Spawn(argv);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    for (const auto& u : uuids_)
      while (!SocketExists(Socket(u)) && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ~Daemon() {
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      if (WaitExit(pid_, 10000) < 0) {
        ::kill(pid_, SIGKILL);
        WaitExit(pid_, 5000);
      }
    }
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  std::string Socket(const std::string& uuid) const { return (dir_ / (uuid + ".sock")).string(); }
  std::string Socket(size_t i) const { return Socket(uuids_.at(i)); }
  bool Alive() const { return e2e::Alive(pid_); }
  // SIGTERM and the exit code (0 = clean shutdown, no sanitizer report).
  int Shutdown() {
    ::kill(pid_, SIGTERM);
    int rc = WaitExit(pid_, 20000);
    pid_ = -1;
    return rc;
  }
  pid_t pid() const { return pid_; }
  const std::filesystem::path& dir() const { return dir_; }

 private:
  static inline int counter_ = 0;
  std::filesystem::path dir_;
  std::vector<std::string> uuids_;
  pid_t pid_ = -1;
};

inline constexpr const char* kUuidA = "aaaaaaaa-0000-4000-8000-000000000001";
inline constexpr const char* kUuidB = "bbbbbbbb-0000-4000-8000-000000000002";

}  // namespace vg::e2e
