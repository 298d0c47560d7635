#pragma once
// A real QEMU (VGPUD_QEMU, built by tools/vm/build-qemu.sh) driven through its qtest
// accelerator: no guest kernel and no firmware runs, the test itself plays the guest by
// speaking QEMU's qtest text protocol (system/qtest.c) over a unix socket. Guest-physical
// reads and writes go through QEMU's memory map, so BAR accesses take QEMU's vfio-user
// client path (trapped REGION_READ/WRITE, or the sparse-mmap areas QEMU maps directly).

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace vg::vm {

namespace fs = std::filesystem;

// POSIX shell word splitting for what `vgpuctl qemu-args` prints (ShellJoin: plain words
// and single-quoted words; double quotes and backslashes handled too for robustness).
inline std::optional<std::vector<std::string>> ShellSplit(std::string_view s) {
  std::vector<std::string> out;
  std::string cur;
  bool in_word = false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (c == ' ' || c == '\t' || c == '\n') {
      if (in_word) out.push_back(cur);
      cur.clear();
      in_word = false;
      continue;
    }
    in_word = true;
    if (c == '\'') {
      const size_t end = s.find('\'', i + 1);
      if (end == std::string_view::npos) return std::nullopt;
      cur.append(s.substr(i + 1, end - i - 1));
      i = end;
    } else if (c == '"') {
      for (++i; i < s.size() && s[i] != '"'; ++i) {
        if (s[i] == '\\' && i + 1 < s.size() && std::string_view("\"\\$`").find(s[i + 1]) != std::string_view::npos) ++i;
        cur += s[i];
      }
      if (i >= s.size()) return std::nullopt;
    } else if (c == '\\') {
      if (++i >= s.size()) return std::nullopt;
      cur += s[i];
    } else {
      cur += c;
    }
  }
  if (in_word) out.push_back(cur);
  return out;
}

// One QEMU process with -accel qtest, connected to the test's qtest socket.
class QemuQtest {
 public:
  explicit QemuQtest(fs::path dir) : dir_(std::move(dir)) {}
  ~QemuQtest() { Stop(); }
  QemuQtest(const QemuQtest&) = delete;
  QemuQtest& operator=(const QemuQtest&) = delete;

  // Starts `qemu argv... -qtest unix:<sock>` and waits until QEMU finished machine init
  // (the first qtest command is answered only then). False when QEMU exits or times out.
  bool Start(std::vector<std::string> argv, int timeout_ms = 60000) {
    const std::string sock = (dir_ / "qtest.sock").string();
    unlink(sock.c_str());
    listen_fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof(a.sun_path), "%s", sock.c_str());
    if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 || listen(listen_fd_, 1) != 0) return false;
    argv.push_back("-qtest");
    argv.push_back("unix:" + sock);
    argv_ = argv;
    const std::string err = stderr_path().string();
    pid_ = fork();
    if (pid_ == 0) {
      int fd = open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      dup2(fd, 1);
      dup2(fd, 2);
      std::vector<char*> args;
      for (const auto& s : argv) args.push_back(const_cast<char*>(s.c_str()));
      args.push_back(nullptr);
      execv(args[0], args.data());
      _exit(127);
    }
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (fd_ < 0) {
      if (!Alive() || std::chrono::steady_clock::now() > deadline) return false;
      pollfd p{listen_fd_, POLLIN, 0};
      if (poll(&p, 1, 50) > 0) fd_ = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    }
    // Any command is answered only once the main loop runs, i.e. after every device realized.
    const int remaining = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                               deadline - std::chrono::steady_clock::now())
                                               .count());
    return Cmd("readb 0x0", std::max(remaining, 1000)).rfind("OK", 0) == 0;  // guest RAM
  }

  // One command line, one reply line ("OK ..." or "FAIL ..."/"ERR ..."); "" on EOF/timeout.
  std::string Cmd(const std::string& line, int timeout_ms = 30000) {
    if (fd_ < 0) return "";
    std::string out = line + "\n";
    size_t done = 0;
    while (done < out.size()) {
      ssize_t n = send(fd_, out.data() + done, out.size() - done, MSG_NOSIGNAL);
      if (n <= 0) return "";
      done += static_cast<size_t>(n);
    }
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      size_t nl = in_.find('\n');
      if (nl != std::string::npos) {
        std::string reply = in_.substr(0, nl);
        in_.erase(0, nl + 1);
        if (reply.rfind("IRQ", 0) == 0) continue;  // asynchronous IRQ notifications (intercept only)
        return reply;
      }
      if (std::chrono::steady_clock::now() > deadline) return "";
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, 50) <= 0) continue;
      char buf[8192];
      ssize_t n = read(fd_, buf, sizeof(buf));
      if (n <= 0) return "";
      in_.append(buf, static_cast<size_t>(n));
    }
  }

  // Typed accessors; a failed command records the reply in last_error() and reads as all ones.
  uint64_t In(char w, uint16_t port) { return Value(Fmt("in%c 0x%x", w, port)); }
  bool Out(char w, uint16_t port, uint32_t v) { return Ok(Fmt("out%c 0x%x 0x%x", w, port, v)); }
  uint64_t Read(char w, uint64_t addr) { return Value(Fmt("read%c 0x%llx", w, static_cast<unsigned long long>(addr))); }
  uint32_t Readl(uint64_t addr) { return static_cast<uint32_t>(Read('l', addr)); }
  uint64_t Readq(uint64_t addr) { return Read('q', addr); }
  bool Write(char w, uint64_t addr, uint64_t v) {
    return Ok(Fmt("write%c 0x%llx 0x%llx", w, static_cast<unsigned long long>(addr), static_cast<unsigned long long>(v)));
  }
  bool Writel(uint64_t addr, uint32_t v) { return Write('l', addr, v); }
  bool Writeq(uint64_t addr, uint64_t v) { return Write('q', addr, v); }
  bool Memset(uint64_t addr, uint64_t size, uint8_t v) {
    return Ok(Fmt("memset 0x%llx 0x%llx 0x%x", static_cast<unsigned long long>(addr),
                  static_cast<unsigned long long>(size), v));
  }
  bool WriteBytes(uint64_t addr, std::span<const std::byte> data) {
    std::string cmd = Fmt("write 0x%llx 0x%zx 0x", static_cast<unsigned long long>(addr), data.size());
    static constexpr char kHex[] = "0123456789abcdef";
    for (std::byte b : data) {
      cmd += kHex[static_cast<uint8_t>(b) >> 4];
      cmd += kHex[static_cast<uint8_t>(b) & 0xf];
    }
    return Ok(cmd);
  }
  std::vector<std::byte> ReadBytes(uint64_t addr, size_t size) {
    std::string r = Cmd(Fmt("read 0x%llx 0x%zx", static_cast<unsigned long long>(addr), size));
    std::vector<std::byte> out;
    if (r.rfind("OK 0x", 0) != 0) {
      last_error_ = r;
      return out;
    }
    for (size_t i = 5; i + 1 < r.size() && out.size() < size; i += 2)
      out.push_back(static_cast<std::byte>(std::stoul(r.substr(i, 2), nullptr, 16)));
    return out;
  }

  // QEMU's process id while it runs (-1 after it exited).
  pid_t pid() const { return pid_; }

  bool Alive() {
    if (pid_ <= 0) return false;
    int st = 0;
    pid_t w = waitpid(pid_, &st, WNOHANG);
    if (w == pid_) {
      exit_code_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      pid_ = -1;
      return false;
    }
    return true;
  }

  // SIGTERM (QEMU's orderly shutdown: it closes the vfio-user socket) and the exit code.
  int Stop(int timeout_ms = 20000) {
    if (fd_ >= 0) close(fd_);
    if (listen_fd_ >= 0) close(listen_fd_);
    fd_ = listen_fd_ = -1;
    if (pid_ > 0) {
      kill(pid_, SIGTERM);
      auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
      while (Alive() && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      if (pid_ > 0) {
        kill(pid_, SIGKILL);
        waitpid(pid_, nullptr, 0);
        pid_ = -1;
        exit_code_ = -1;
      }
    }
    return exit_code_;
  }

  std::string Stderr() const {
    std::string s;
    if (FILE* f = std::fopen(stderr_path().c_str(), "r")) {
      char buf[4096];
      size_t n;
      while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) s.append(buf, n);
      std::fclose(f);
    }
    return s;
  }
  std::string CommandLine() const {
    std::string s;
    for (const auto& a : argv_) s += (s.empty() ? "" : " ") + a;
    return s;
  }
  const std::string& last_error() const { return last_error_; }
  fs::path stderr_path() const { return dir_ / "qemu.stderr"; }

 private:
  template <class... A>
  static std::string Fmt(const char* f, A... a) {
    char buf[256];
    std::snprintf(buf, sizeof(buf), f, a...);
    return buf;
  }
  bool Ok(const std::string& cmd) {
    std::string r = Cmd(cmd);
    if (r == "OK") return true;
    last_error_ = cmd + " -> " + (r.empty() ? "<no reply>" : r);
    return false;
  }
  uint64_t Value(const std::string& cmd) {
    std::string r = Cmd(cmd);
    if (r.rfind("OK ", 0) != 0) {
      last_error_ = cmd + " -> " + (r.empty() ? "<no reply>" : r);
      return ~0ull;
    }
    return std::stoull(r.substr(3), nullptr, 0);
  }

  fs::path dir_;
  std::vector<std::string> argv_;
  pid_t pid_ = -1;
  int listen_fd_ = -1;
  int fd_ = -1;
  int exit_code_ = -1;
  std::string in_;
  std::string last_error_;
};

// PCI configuration mechanism #1 (0xCF8 address, 0xCFC data), bus 0, function 0.
class PciConfig {
 public:
  PciConfig(QemuQtest& q, uint8_t devfn) : q_(q), devfn_(devfn) {}
  static constexpr uint16_t kAddrPort = 0xCF8;
  static constexpr uint16_t kDataPort = 0xCFC;

  uint32_t Read32(uint8_t off) { return static_cast<uint32_t>(Access('l', off, std::nullopt)); }
  uint16_t Read16(uint8_t off) { return static_cast<uint16_t>(Access('w', off, std::nullopt)); }
  uint8_t Read8(uint8_t off) { return static_cast<uint8_t>(Access('b', off, std::nullopt)); }
  void Write32(uint8_t off, uint32_t v) { Access('l', off, v); }
  void Write16(uint8_t off, uint16_t v) { Access('w', off, v); }
  void Write8(uint8_t off, uint8_t v) { Access('b', off, v); }

  static std::optional<uint8_t> Find(QemuQtest& q, uint16_t vendor, uint16_t device) {
    for (uint8_t slot = 0; slot < 32; ++slot) {
      PciConfig c(q, static_cast<uint8_t>(slot << 3));
      if (c.Read32(0) == (static_cast<uint32_t>(device) << 16 | vendor)) return static_cast<uint8_t>(slot << 3);
    }
    return std::nullopt;
  }

 private:
  uint64_t Access(char w, uint8_t off, std::optional<uint32_t> v) {
    q_.Out('l', kAddrPort, 0x80000000u | static_cast<uint32_t>(devfn_) << 8 | (off & 0xFCu));
    const auto port = static_cast<uint16_t>(kDataPort + (off & 3));
    if (v) return q_.Out(w, port, *v) ? 0 : ~0ull;
    return q_.In(w, port);
  }
  QemuQtest& q_;
  uint8_t devfn_;
};

}  // namespace vg::vm
