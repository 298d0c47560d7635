#pragma once
// Helpers of the lifecycle tests that restart the supervisor (F8): the real vgpud with its
// real workers, real guests (in-process vfio-user clients and forked guest processes), the
// control socket and vgpuctl. The test process is a child subreaper, so that workers a
// killed supervisor leaves behind become its children: it can reap them, and a test never
// leaves one running (they are this test's processes).

#include <doctest.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <thread>

#include "guest/guest.h"
#include "shaders/samples.h"
#include "tests/e2e/guest_checks.h"
#include "tests/lifecycle/usage.h"
#include "tests/mdev/daemon_harness.h"

namespace vg::lifecycle {

using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;
using mgmt::DaemonProc;

inline double Slow() {
  const char* f = std::getenv("VG_SLOW_FACTOR");
  const double k = f ? std::atof(f) : 1.0;
  return k > 0 ? k : 1.0;
}
inline int Ms(double ms) { return static_cast<int>(ms * Slow()); }
inline double MsSince(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

inline void BecomeSubreaper() { REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0); }

// The supervisor's arguments every test uses: a short heartbeat, a short orphan grace (a
// worker left without supervisor and guest by a failing test goes on its own), `extra`.
inline std::vector<std::string> Args(std::vector<std::string> extra = {}, int orphan_grace_s = 20) {
  std::vector<std::string> a{"--heartbeat-ms", "100", "--watchdog-ms", std::to_string(Ms(2000)), "--orphan-grace-s",
                             std::to_string(orphan_grace_s)};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

inline Json Control(const DaemonProc& d, const Json& req) {
  int fd = mgmt::ConnectUnix(d.control());
  if (fd < 0) return Json();
  mgmt::SendAll(fd, req.dump() + "\n");
  const std::string line = mgmt::ReadLines(fd, 1, 20000);
  ::close(fd);
  return Json::parse(line, nullptr, false);
}
inline bool Answered(const Json& j) { return j.is_object() && j.value("ok", false); }
inline Json Show(const DaemonProc& d, const std::string& uuid) { return Control(d, {{"op", "show"}, {"uuid", uuid}}); }
inline Json Worker(const DaemonProc& d, const std::string& uuid) {
  Json s = Show(d, uuid);
  return s.is_object() && s.contains("worker") ? s["worker"] : Json();
}
inline int64_t WorkerPid(const DaemonProc& d, const std::string& uuid) {
  Json w = Worker(d, uuid);
  return w.is_object() && w["pid"].is_number() ? w["pid"].get<int64_t>() : -1;
}

inline bool WaitFor(const std::function<bool()>& pred, int ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(ms);
  while (Clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return pred();
}

// Gone for good: reaped if it was ours (a subreaper's orphan), and no process left.
inline bool ProcessGone(int64_t pid) {
  (void)::waitpid(static_cast<pid_t>(pid), nullptr, WNOHANG);
  return ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
}

// Orphaned workers that are this test's children now: killed and reaped at the end.
inline void ReapOrphans(const std::vector<int64_t>& pids) {
  for (int64_t p : pids) {
    if (p <= 0 || ProcessGone(p)) continue;
    ::kill(static_cast<pid_t>(p), SIGKILL);
    (void)::waitpid(static_cast<pid_t>(p), nullptr, 0);
  }
}

// One vfio-user guest in this process.
struct Guest {
  std::unique_ptr<guest::Device> dev;
  std::unique_ptr<guest::Driver> drv;
  explicit Guest(const std::string& socket, uint64_t ram = 16 << 20) {
    guest::DeviceOptions o;
    o.socket = socket;
    o.ram_size = ram;
    auto d = guest::Device::Open(o);
    REQUIRE_MESSAGE(d.ok(), e2e::Why(d.ok() ? Result<>(vg::Ok()) : Result<>(d.error())));
    dev = std::move(d).value();
    auto r = guest::Driver::Create(*dev);
    REQUIRE(r.ok());
    drv = std::move(r).value();
  }
};

// The steps of RunOne, for a caller that records where its guest is (the hygiene test's
// guest processes, killed at random points).
enum class RunStep { kGttMap, kSubmit, kWait, kCheck };

// One kernel of the catalogue through the mediated path, checked bit-exactly against the
// CPU reference (kDataLoss on a mismatch). `step`, if set, is told each step as it begins.
inline Result<> RunOne(guest::Driver& drv, uint32_t round, int timeout_ms = 30000,
                       const std::function<void(RunStep)>& step = nullptr) {
  auto enter = [&](RunStep st) {
    if (step) step(st);
  };
  auto kernels = shaders::AllKernels();
  const auto& k = kernels[round % kernels.size()];
  auto s = shaders::MakeSample(k.id, 100 + round % 97, round);
  std::vector<guest::GpuBuffer> bufs;
  std::vector<guest::Binding> binds;
  auto free_all = [&] {
    for (auto& b : bufs) (void)drv.Free(b);
  };
  enter(RunStep::kGttMap);
  for (size_t i = 0; i < s.bindings.size(); ++i) {
    auto b = drv.Alloc(s.bindings[i].size());
    if (!b) {
      free_all();
      return std::move(b).error();
    }
    std::memcpy(b->host.data(), s.bindings[i].data(), s.bindings[i].size());
    binds.push_back(guest::Bind(*b, e2e::AccessOf(k.bindings[i].access)));
    bufs.push_back(*b);
  }
  guest::CommandBuilder cb;
  cb.Dispatch(s.kernel, s.groups, binds, s.push);
  enter(RunStep::kSubmit);
  auto seq = drv.Submit(cb);
  if (!seq) {
    free_all();
    return std::move(seq).error();
  }
  enter(RunStep::kWait);
  if (auto w = drv.Wait(*seq, guest::WaitMode::kIrq, timeout_ms); !w) {
    free_all();
    return w;
  }
  enter(RunStep::kCheck);
  std::vector<std::vector<std::byte>> out;
  for (auto& b : bufs) out.emplace_back(b.host.begin(), b.host.end());
  free_all();
  return shaders::CheckSample(s, out);
}
}  // namespace vg::lifecycle
