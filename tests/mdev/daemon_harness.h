#pragma once
// Runs the real vgpud and the real vgpuctl as processes (paths from VGPUD / VGPUCTL, set by
// meson) for the management tests: a daemon in its own temp dir, vgpuctl with its stdout,
// stderr and exit code captured, raw control-socket clients.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

namespace vg::mgmt {

namespace fs = std::filesystem;
using Json = nlohmann::json;

inline std::string Env(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v && *v ? v : fallback;
}

// vgpuctl as the tests run it: a copy in a fresh directory every user can enter, because
// some tests run it as nobody and the checkout (so the build) may sit under a directory
// nobody cannot enter (cloned as root into a 0700 home). Removed when the test exits.
inline const std::string& StagedVgpuctl() {
  static const std::string path = [] {
    const std::string src = Env("VGPUCTL", "tools/vgpuctl");
    char tmpl[] = "/tmp/vgpuctl-stage-XXXXXX";
    if (!::mkdtemp(tmpl)) return src;
    static std::string dir = tmpl;
    std::atexit([] {
      std::error_code ec;
      fs::remove_all(dir, ec);
    });
    const std::string dst = dir + "/vgpuctl";
    std::error_code ec;
    fs::copy_file(src, dst, ec);
    if (ec || ::chmod(dir.c_str(), 0755) != 0 || ::chmod(dst.c_str(), 0755) != 0) return src;
    return dst;
  }();
  return path;
}

struct Ran {
  int code = -1;  // exit code, 128+signal, -1 on timeout
  std::string out;
  std::string err;
  Json json() const {
    Json j = Json::parse(out, nullptr, false);
    return j;
  }
};

// fork/exec argv with stdout and stderr captured; `child_setup` runs in the child first.
inline Ran RunCapture(const std::vector<std::string>& argv, const std::function<void()>& child_setup = {},
                      int timeout_ms = 60000) {
  int po[2], pe[2];
  if (pipe2(po, O_CLOEXEC) != 0 || pipe2(pe, O_CLOEXEC) != 0) return {};
  pid_t pid = fork();
  if (pid == 0) {
    dup2(po[1], 1);
    dup2(pe[1], 2);
    if (child_setup) child_setup();
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  close(po[1]);
  close(pe[1]);
  Ran r;
  pollfd p[2] = {{po[0], POLLIN, 0}, {pe[0], POLLIN, 0}};
  int open_fds = 2;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (open_fds > 0 && std::chrono::steady_clock::now() < deadline) {
    if (poll(p, 2, 100) <= 0) continue;
    for (int i = 0; i < 2; ++i) {
      if (p[i].fd < 0 || !(p[i].revents & (POLLIN | POLLHUP))) continue;
      char buf[4096];
      ssize_t n = read(p[i].fd, buf, sizeof(buf));
      if (n <= 0) {
        close(p[i].fd);
        p[i].fd = -1;
        --open_fds;
      } else {
        (i == 0 ? r.out : r.err).append(buf, static_cast<size_t>(n));
      }
    }
  }
  for (auto& x : p)
    if (x.fd >= 0) close(x.fd);
  for (;;) {
    int st = 0;
    pid_t w = waitpid(pid, &st, WNOHANG);
    if (w == pid) {
      r.code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      break;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
      r.code = -1;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return r;
}

inline int ConnectUnix(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::memcpy(a.sun_path, path.c_str(), std::min(path.size() + 1, sizeof(a.sun_path) - 1));
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    int e = errno;
    close(fd);
    errno = e;
    return -1;
  }
  return fd;
}

inline bool IsListening(const std::string& path) {
  int fd = ConnectUnix(path);
  if (fd < 0) return false;
  close(fd);
  return true;
}

// Reads until `lines` newlines or EOF/timeout.
inline std::string ReadLines(int fd, int lines, int timeout_ms = 20000) {
  std::string in;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (std::count(in.begin(), in.end(), '\n') < lines && std::chrono::steady_clock::now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 100) <= 0) continue;
    char buf[4096];
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n <= 0) break;
    in.append(buf, static_cast<size_t>(n));
  }
  return in;
}

inline void SendAll(int fd, std::string_view s) {
  size_t done = 0;
  while (done < s.size()) {
    ssize_t n = send(fd, s.data() + done, s.size() - done, MSG_NOSIGNAL);
    if (n <= 0) return;
    done += static_cast<size_t>(n);
  }
}

// One vgpud process. The runtime dir is <dir>/run; --root (when given) is the caller's.
class DaemonProc {
 public:
  explicit DaemonProc(fs::path dir = {}) {
    static int counter = 0;
    dir_ = dir.empty() ? fs::temp_directory_path() / ("vgpud-mgmt-" + std::to_string(getpid()) + "-" +
                                                       std::to_string(counter++))
                       : dir;
    fs::create_directories(dir_);
  }
  ~DaemonProc() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (own_dir_) {
      std::error_code ec;
      fs::remove_all(dir_, ec);
    }
  }
  DaemonProc(const DaemonProc&) = delete;
  DaemonProc& operator=(const DaemonProc&) = delete;

  // Starts vgpud and waits until its control socket answers a ping. False on failure.
  bool Start(std::vector<std::string> extra = {}) {
    std::vector<std::string> argv{Env("VGPUD", "tools/vgpud"), "--runtime-dir", runtime().string()};
    for (auto& e : extra) argv.push_back(e);
    const std::string log = (dir_ / "vgpud.log").string();
    pid_ = fork();
    if (pid_ == 0) {
      int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
      dup2(fd, 1);
      dup2(fd, 2);
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execv(args[0], args.data());
      _exit(127);
    }
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (std::chrono::steady_clock::now() < deadline) {
      if (!Alive()) return false;
      if (Ping()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return false;
  }

  bool Ping() const {
    int fd = ConnectUnix(control());
    if (fd < 0) return false;
    SendAll(fd, "{\"op\":\"ping\"}\n");
    std::string r = ReadLines(fd, 1, 5000);
    close(fd);
    return r.find("\"ok\":true") != std::string::npos;
  }

  bool Alive() const {
    if (pid_ <= 0) return false;
    int st = 0;
    return waitpid(pid_, &st, WNOHANG) == 0;
  }

  // SIGTERM and the exit code (0: clean, and no sanitizer report).
  int Shutdown(int sig = SIGTERM) {
    if (pid_ <= 0) return -1;
    kill(pid_, sig);
    int code = -1;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (std::chrono::steady_clock::now() < deadline) {
      int st = 0;
      if (waitpid(pid_, &st, WNOHANG) == pid_) {
        code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (code < 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    pid_ = -1;
    return code;
  }

  Ran Ctl(std::vector<std::string> args, const std::function<void()>& setup = {}) const {
    std::vector<std::string> argv{StagedVgpuctl(), "--control", control()};
    for (auto& a : args) argv.push_back(a);
    return RunCapture(argv, setup);
  }
  // vgpuctl --json ...: the parsed reply (null when stdout is not JSON).
  Json CtlJson(std::vector<std::string> args, int* code = nullptr) const {
    args.insert(args.begin(), "--json");
    Ran r = Ctl(args);
    if (code) *code = r.code;
    return r.json();
  }

  std::string Log() const {
    std::ifstream in(dir_ / "vgpud.log");
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

  void KeepDir(bool keep) { own_dir_ = !keep; }
  const fs::path& dir() const { return dir_; }
  fs::path runtime() const { return dir_ / "run"; }
  std::string control() const { return (runtime() / "control.sock").string(); }
  std::string Socket(const std::string& uuid) const { return (runtime() / (uuid + ".sock")).string(); }
  pid_t pid() const { return pid_; }

 private:
  fs::path dir_;
  bool own_dir_ = true;
  pid_t pid_ = -1;
};

inline std::string ReadFile(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace vg::mgmt
