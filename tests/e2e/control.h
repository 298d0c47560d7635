#pragma once
// The daemon's control socket as tests drive it: one JSON request, one JSON line back, and a
// vgpud with its control socket up that starts and shows transient vGPUs. One copy here for
// the tests that manage vGPUs at run time (sched, display).

#include <doctest.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/e2e/harness.h"

namespace vg::e2e {

// VG_SLOW_FACTOR (the ASan+UBSan run sets 3): timing bounds scale by it, never below 1.
inline double SlowFactor() {
  const char* f = std::getenv("VG_SLOW_FACTOR");
  return f ? std::max(1.0, std::atof(f)) : 1.0;
}

// One request on the control socket, one JSON line back.
inline nlohmann::json Control(const std::string& path, const nlohmann::json& req) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::snprintf(a.sun_path, sizeof a.sun_path, "%s", path.c_str());
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  std::string line = req.dump() + "\n";
  REQUIRE(::send(fd, line.data(), line.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(line.size()));
  std::string got;
  char buf[4096];
  while (got.find('\n') == std::string::npos) {
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    got.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  nlohmann::json j = nlohmann::json::parse(got, nullptr, false);
  REQUIRE_MESSAGE(!j.is_discarded(), got);
  return j;
}

// A vgpud with no --vgpu of its own, once its control socket is up.
struct ControlHost {
  Daemon daemon;
  std::string control;
  explicit ControlHost(std::vector<std::string> extra = {}) : daemon({}, std::move(extra)) {
    control = (std::filesystem::path(daemon.Socket("x")).parent_path() / "control.sock").string();
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (!SocketExists(control) && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    REQUIRE(SocketExists(control));
  }
  nlohmann::json TryStart(const std::string& uuid, const std::string& type, const nlohmann::json& attrs) {
    return Control(control, nlohmann::json{{"op", "start"}, {"uuid", uuid}, {"type", type}, {"attrs", attrs}});
  }
  // A transient vGPU of `type` with these attributes; its vfio-user socket.
  std::string Start(const std::string& uuid, const nlohmann::json& attrs, const std::string& type = "small") {
    nlohmann::json r = TryStart(uuid, type, attrs);
    REQUIRE_MESSAGE(r.value("ok", false), r.dump());
    return daemon.Socket(uuid);
  }
  nlohmann::json Show(const std::string& uuid) {
    nlohmann::json r = Control(control, nlohmann::json{{"op", "show"}, {"uuid", uuid}});
    REQUIRE_MESSAGE(r.value("ok", false), r.dump());
    return r.contains("result") ? r["result"] : r;
  }
};

}  // namespace vg::e2e
