#pragma once
// A stand-in for the daemon's vGPU host: each instance is a real listening unix socket,
// so a test can check "listening before the write returned" with connect().

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <map>
#include <mutex>
#include <string>

#include "base/fd.h"
#include "mdev/mdev.h"

namespace vg::mdev::testing {

// The whole file as one string ("" when it cannot be read).
inline std::string Slurp(const std::filesystem::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline bool IsListening(const std::string& path) {
  UniqueFd s(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (path.size() >= sizeof(a.sun_path)) return false;
  memcpy(a.sun_path, path.c_str(), path.size() + 1);
  return connect(s.Get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
}

class TestHost : public InstanceHost {
 public:
  explicit TestHost(std::filesystem::path dir) : dir_(std::move(dir)) { std::filesystem::create_directories(dir_); }

  Result<std::string> StartInstance(const Uuid& uuid, const VgpuType&, const Attributes& attrs) override {
    std::lock_guard lk(mu_);
    const std::string path = (dir_ / (uuid.ToString() + ".sock")).string();
    UniqueFd s(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    VG_INVALID_IF(path.size() >= sizeof(a.sun_path), "socket path too long");
    memcpy(a.sun_path, path.c_str(), path.size() + 1);
    unlink(path.c_str());
    VG_ERROR_IF(bind(s.Get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 || listen(s.Get(), 4) != 0, Errc::kIo,
                "bind {}: {}", path, strerror(errno));
    socks_[uuid] = std::move(s);
    attrs_[uuid] = attrs;
    ++starts_;
    return path;
  }
  Result<> StopInstance(const Uuid& uuid) override {
    std::lock_guard lk(mu_);
    auto it = socks_.find(uuid);
    VG_ERROR_IF(it == socks_.end(), Errc::kNotFound, "host has no {}", uuid);
    unlink((dir_ / (uuid.ToString() + ".sock")).c_str());
    socks_.erase(it);
    attrs_.erase(uuid);
    return Ok();
  }
  Result<> SetAttribute(const Uuid& uuid, std::string_view name, std::string_view value) override {
    std::lock_guard lk(mu_);
    attrs_[uuid].emplace_back(std::string(name), std::string(value));
    return Ok();
  }

  size_t running() const {
    std::lock_guard lk(mu_);
    return socks_.size();
  }
  Attributes attrs(const Uuid& u) const {
    std::lock_guard lk(mu_);
    auto it = attrs_.find(u);
    return it == attrs_.end() ? Attributes{} : it->second;
  }
  int starts() const {
    std::lock_guard lk(mu_);
    return starts_;
  }

 private:
  std::filesystem::path dir_;
  mutable std::mutex mu_;
  std::map<Uuid, UniqueFd> socks_;
  std::map<Uuid, Attributes> attrs_;
  int starts_ = 0;
};

// A fresh directory under /tmp, removed with everything in it.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/vgpud-mdev-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

}  // namespace vg::mdev::testing
