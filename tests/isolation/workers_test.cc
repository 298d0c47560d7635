// F13: one sandboxed worker process per vGPU. The real vgpud supervisor with the test build
// of its worker (vgpud-worker-testhooks, which acts on the control socket's test-only
// faults), real guests, and the victim tenant of F11 on a second vGPU throughout: whatever
// happens to one worker, the other tenant's results stay bit-exact and its register reads
// prompt, the control socket keeps answering, and the supervisor names, counts and handles
// the end per its restart policy.

#include <doctest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <tuple>
#include <thread>

#include "base/cpu_slice.h"
#include "guest/guest.h"
#include "tests/e2e/guest_checks.h"
#include "tests/e2e/victim.h"
#include "tests/lifecycle/usage.h"
#include "tests/mdev/daemon_harness.h"

using namespace vg;
using namespace vg::guest;
using vg::e2e::CheckVictim;
using vg::e2e::Victim;
using vg::mgmt::DaemonProc;
using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

constexpr const char* kA = "aaaaaaaa-0000-4000-8000-00000000000a";
constexpr const char* kB = "bbbbbbbb-0000-4000-8000-00000000000b";

double Slow() {
  const char* f = std::getenv("VG_SLOW_FACTOR");
  const double k = f ? std::atof(f) : 1.0;
  return k > 0 ? k : 1.0;
}
int Ms(double ms) { return static_cast<int>(ms * Slow()); }

double MsSince(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

std::string TestWorker() { return mgmt::Env("VGPUD_WORKER_TESTHOOKS", "tools/vgpud-worker-testhooks"); }

// The supervisor with the test worker, a watchdog a test can wait out, and `extra`.
std::vector<std::string> Args(std::vector<std::string> extra = {}) {
  std::vector<std::string> a{"--worker-binary", TestWorker(), "--heartbeat-ms", "100",
                             "--watchdog-ms", std::to_string(Ms(1500))};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

// The supervisor serving vGPU A (the one things happen to) and vGPU B (the victim's).
void StartAB(DaemonProc& d, std::vector<std::string> extra = {}) {
  for (const char* u : {kA, kB}) extra.insert(extra.end(), {"--vgpu", std::string(u) + ":small"});
  REQUIRE(d.Start(Args(extra)));
}

// One request on the control socket, and how long the answer took.
Json Control(const DaemonProc& d, const Json& req, double* took_ms = nullptr) {
  const auto t0 = Clock::now();
  int fd = mgmt::ConnectUnix(d.control());
  if (fd < 0) return Json();
  mgmt::SendAll(fd, req.dump() + "\n");
  const std::string line = mgmt::ReadLines(fd, 1, 20000);
  ::close(fd);
  if (took_ms) *took_ms = MsSince(t0);
  return Json::parse(line, nullptr, false);
}

Json Show(const DaemonProc& d, const std::string& uuid) { return Control(d, {{"op", "show"}, {"uuid", uuid}}); }

Json Worker(const DaemonProc& d, const std::string& uuid) {
  Json s = Show(d, uuid);
  return s.is_object() && s.contains("worker") ? s["worker"] : Json();
}

int64_t WorkerPid(const DaemonProc& d, const std::string& uuid) {
  Json w = Worker(d, uuid);
  return w.is_object() && w["pid"].is_number() ? w["pid"].get<int64_t>() : -1;
}

uint64_t Ends(const Json& w, const char* kind) {
  return w.is_object() && w["ends"].is_object() ? w["ends"].value(kind, uint64_t{0}) : 0;
}

// Polls `pred` every 20 ms until it holds or `ms` pass.
bool WaitFor(const std::function<bool()>& pred, int ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(ms);
  while (Clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return pred();
}

// The worker of `uuid` serves again: a new process, running, after `restarts` restarts.
bool Restarted(const DaemonProc& d, const std::string& uuid, int64_t old_pid, uint32_t restarts) {
  return WaitFor(
      [&] {
        Json w = Worker(d, uuid);
        return w.is_object() && w["state"] == "running" && w["pid"].is_number() && w["pid"] != old_pid &&
               w["restarts"] == restarts;
      },
      Ms(15000));
}

bool ProcessGone(int64_t pid) {
  // The supervisor reaps its workers: no process, not even a zombie.
  return ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
}

// A guest of our own on `socket`: runs the catalogue's kernels and checks them bit-exactly.
struct Guest {
  std::unique_ptr<Device> dev;
  std::unique_ptr<Driver> drv;
  explicit Guest(const std::string& socket) {
    dev = e2e::OpenGuest(socket, 16 << 20);
    auto r = Driver::Create(*dev);
    REQUIRE(r.ok());
    drv = std::move(r).value();
  }
};

// One kernel of the catalogue through the mediated path, checked against the reference.
Result<> RunOne(Driver& drv, uint32_t round, int timeout_ms = 30000) {
  auto kernels = shaders::AllKernels();
  const auto& k = kernels[round % kernels.size()];
  auto s = shaders::MakeSample(k.id, 100 + round, round);
  std::vector<GpuBuffer> bufs;
  std::vector<Binding> binds;
  for (size_t i = 0; i < s.bindings.size(); ++i) {
    VG_TRY_ASSIGN(GpuBuffer b, drv.Alloc(s.bindings[i].size()));
    std::memcpy(b.host.data(), s.bindings[i].data(), s.bindings[i].size());
    binds.push_back(Bind(b, e2e::AccessOf(k.bindings[i].access)));
    bufs.push_back(b);
  }
  CommandBuilder cb;
  cb.Dispatch(s.kernel, s.groups, binds, s.push);
  VG_TRY_ASSIGN(uint64_t seq, drv.Submit(cb));
  VG_TRY(drv.Wait(seq, WaitMode::kIrq, timeout_ms));
  std::vector<std::vector<std::byte>> out;
  for (auto& b : bufs) {
    out.emplace_back(b.host.begin(), b.host.end());
    (void)drv.Free(b);
  }
  return shaders::CheckSample(s, out);
}

// The control socket answers while something happens to a worker: `show` of the other vGPU
// and `list`, each within `bound_ms`, for as long as `busy` holds.
struct ControlProbe {
  std::atomic<bool> stop{false};
  std::atomic<int> answered{0}, failed{0};
  std::atomic<int64_t> slowest_us{0};
  std::thread t;
  ControlProbe(const DaemonProc& d, std::string other) {
    t = std::thread([this, &d, other] {
      while (!stop) {
        for (const Json& req : {Json{{"op", "show"}, {"uuid", other}}, Json{{"op", "list"}}}) {
          double took = 0;
          Json r = Control(d, req, &took);
          (r.is_object() && r.value("ok", false) ? answered : failed)++;
          slowest_us = std::max<int64_t>(slowest_us, static_cast<int64_t>(took * 1000));
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    });
  }
  void Check(double bound_ms) {
    stop = true;
    t.join();
    INFO("control: ", answered.load(), " answered, ", failed.load(), " failed, slowest ", slowest_us / 1000.0, " ms");
    CHECK(answered > 0);
    CHECK(failed == 0);
    CHECK(slowest_us / 1000.0 <= bound_ms);
  }
};

}  // namespace

TEST_CASE("kill -9 of a worker mid-workload: its guest sees a clean error, the other tenant nothing; restarted") {
  DaemonProc d;
  StartAB(d);
  Victim v(d.Socket(kB));
  const int64_t victim_worker = WorkerPid(d, kB);
  ControlProbe probe(d, kB);

  // The tenant whose worker dies: kernels back to back until one fails.
  std::atomic<bool> running{false};
  Errc ended_with = Errc::kOk;
  int rounds = 0;
  Clock::time_point ended_at;
  std::thread tenant([&] {
    Guest g(d.Socket(kA));
    for (uint32_t i = 0; i < 100000; ++i) {
      running = true;
      auto r = RunOne(*g.drv, i);
      if (!r.ok()) {
        ended_with = r.code();
        ended_at = Clock::now();
        return;
      }
      ++rounds;
    }
  });
  REQUIRE(WaitFor([&] { return rounds >= 3; }, Ms(20000)));
  const int64_t pid = WorkerPid(d, kA);
  REQUIRE(pid > 0);
  const auto killed_at = Clock::now();
  REQUIRE(::kill(static_cast<pid_t>(pid), SIGKILL) == 0);
  tenant.join();
  const double noticed_ms = std::chrono::duration<double, std::milli>(ended_at - killed_at).count();
  INFO("tenant ran ", rounds, " kernels; ended with ", ErrcName(ended_with), " after ", noticed_ms, " ms");
  // A clean error, at once: the guest library sees its socket hang up, not a timeout.
  CHECK(ended_with != Errc::kOk);
  CHECK(ended_with != Errc::kTimeout);
  CHECK(noticed_ms < Ms(3000));

  REQUIRE(Restarted(d, kA, pid, 1));
  Json w = Worker(d, kA);
  INFO("worker A: ", w.dump());
  CHECK(Ends(w, "killed") == 1);
  CHECK(w["last_exit"].get<std::string>().find("SIGKILL") != std::string::npos);
  CHECK(ProcessGone(pid));
  CHECK(d.Log().find("killed by SIGKILL") != std::string::npos);
  // The restarted worker serves a new guest on the same socket path.
  {
    Guest g(d.Socket(kA));
    for (uint32_t i = 0; i < 4; ++i) CHECK_MESSAGE(RunOne(*g.drv, i).ok(), "kernel ", i, " after the restart");
  }
  probe.Check(Ms(1000));
  CheckVictim(v.Stop());
  CHECK(WorkerPid(d, kB) == victim_worker);  // the other vGPU's worker never restarted
  CHECK(Ends(Worker(d, kB), "killed") == 0);
  CHECK(d.Shutdown() == 0);
}

namespace {
// Each thread of `pid`: its name and CPU slice in ns (/proc/PID/task/TID/sched, se.slice).
std::vector<std::tuple<int64_t, std::string, uint64_t>> ThreadSlices(int64_t pid) {
  std::vector<std::tuple<int64_t, std::string, uint64_t>> out;
  const std::filesystem::path task = "/proc/" + std::to_string(pid) + "/task";
  std::error_code ec;
  for (const auto& t : std::filesystem::directory_iterator(task, ec)) {
    std::string name = mgmt::ReadFile(t.path() / "comm");
    if (!name.empty() && name.back() == '\n') name.pop_back();
    std::istringstream sched(mgmt::ReadFile(t.path() / "sched"));
    uint64_t slice = 0;
    for (std::string line; std::getline(sched, line);)
      if (line.rfind("se.slice", 0) == 0) slice = std::stoull(line.substr(line.find(':') + 1));
    out.emplace_back(std::stoll(t.path().filename().string()), name, slice);
  }
  return out;
}

bool KernelHasCpuSlices() {
  bool ok = false;
  std::thread([&] { ok = SetThreadCpuSlice(CpuSlice::kShort); }).join();
  return ok;
}
}  // namespace

TEST_CASE("CPU slices: the supervisor's and a worker's waiting threads short, the engine's compute threads not") {
  if (!KernelHasCpuSlices()) {
    MESSAGE("custom CPU slices need Linux 6.12 or later: not checked on this kernel");
    return;
  }
  DaemonProc d;
  StartAB(d);
  Victim v(d.Socket(kB));  // B's worker has run work: its executor and engine threads exist
  std::this_thread::sleep_for(std::chrono::milliseconds(Ms(300)));
  for (const auto& [tid, name, slice] : ThreadSlices(d.pid())) {
    INFO("supervisor thread ", tid, " (", name, ")");
    CHECK(slice == 100'000);
  }
  const int64_t pid = WorkerPid(d, kB);
  REQUIRE(pid > 0);
  size_t short_ones = 0, compute = 0;
  for (const auto& [tid, name, slice] : ThreadSlices(pid)) {
    INFO("worker thread ", tid, " (", name, "), slice ", slice);
    if (tid == pid) CHECK(slice == 100'000);  // the loop
    // lavapipe's threads are the GPU's cores here: they keep the default, inherited from
    // before the worker asked for the short one.
    if (name.rfind("llvmpipe", 0) == 0) {
      ++compute;
      CHECK(slice != 100'000);
    }
    short_ones += slice == 100'000;
  }
  CHECK(compute > 0);
  CHECK(short_ones >= 4);  // the loop, the gate's pump, the executor's threads, the completion thread
  CheckVictim(v.Stop());
  CHECK(d.Shutdown() == 0);
}

TEST_CASE("a worker that makes a forbidden system call is killed by its filter and reported as such") {
  DaemonProc d;
  StartAB(d);
  Victim v(d.Socket(kB));
  // The sandbox as the supervisor reports it, and as /proc says it is.
  Json w = Worker(d, kA);
  REQUIRE(w.is_object());
  CHECK(w["sandbox"]["seccomp"] == true);
  CHECK(w["sandbox"]["no_new_privs"] == true);
  const int64_t pid = w["pid"].get<int64_t>();
  const std::string status = mgmt::ReadFile("/proc/" + std::to_string(pid) + "/status");
  CHECK(status.find("CapEff:\t0000000000000000") != std::string::npos);
  CHECK(status.find("Seccomp:\t2") != std::string::npos);
  const std::string limits = mgmt::ReadFile("/proc/" + std::to_string(pid) + "/limits");
  CHECK(limits.find("Max core file size        0") != std::string::npos);
  CHECK(limits.find("Max open files            1024") != std::string::npos);

  Json r = Control(d, {{"op", "fault"}, {"uuid", kA}, {"fault", "syscall"}});
  REQUIRE(r.value("ok", false));
  REQUIRE(Restarted(d, kA, pid, 1));
  w = Worker(d, kA);
  INFO("worker A: ", w.dump());
  CHECK(Ends(w, "seccomp") == 1);
  CHECK(w["last_exit"].get<std::string>().find("seccomp") != std::string::npos);
  CHECK(d.Log().find("killed by its seccomp filter") != std::string::npos);
  CHECK(d.Log().find("the forbidden system call returned") == std::string::npos);
  CheckVictim(v.Stop());
  CHECK(Ends(Worker(d, kB), "seccomp") == 0);
  CHECK(d.Shutdown() == 0);
}

TEST_CASE("a hung worker loop and a SIGSTOPped worker: only that vGPU stops; the watchdog reports and restarts it") {
  DaemonProc d;
  StartAB(d);
  Victim v(d.Socket(kB));
  const int64_t victim_worker = WorkerPid(d, kB);
  ControlProbe probe(d, kB);
  // The bound the supervisor states: no pong for --watchdog-ms, checked every heartbeat.
  const double bound_ms = Ms(1500) + 2 * 100;

  // 1. Its event loop stops turning (as F11's blocking reads once made it), while a guest is
  //    attached: the guest's register read gets no answer, nobody else notices.
  int64_t pid = WorkerPid(d, kA);
  {
    Guest g(d.Socket(kA));
    REQUIRE(RunOne(*g.drv, 0).ok());
    REQUIRE(Control(d, {{"op", "fault"}, {"uuid", kA}, {"fault", "hang"}}).value("ok", false));
    const auto t0 = Clock::now();
    REQUIRE(WaitFor([&] { return Ends(Worker(d, kA), "watchdog") == 1; }, Ms(15000)));
    const double detected_ms = MsSince(t0);
    MESSAGE("hung loop: the watchdog ended the worker after ", detected_ms, " ms (bound ", bound_ms, " ms)");
    CHECK(detected_ms <= bound_ms + Ms(1000));
    // The guest of the hung worker gets an error, not an answer it waits for forever.
    CHECK(!g.dev->Read32(abi::reg::kId).ok());
  }
  REQUIRE(Restarted(d, kA, pid, 1));
  CHECK(Worker(d, kA)["last_exit"].get<std::string>().find("watchdog") != std::string::npos);

  // 2. The whole process stopped by a signal: the same.
  pid = WorkerPid(d, kA);
  REQUIRE(::kill(static_cast<pid_t>(pid), SIGSTOP) == 0);
  REQUIRE(WaitFor([&] { return Ends(Worker(d, kA), "watchdog") == 2; }, Ms(15000)));
  REQUIRE(Restarted(d, kA, pid, 2));
  CHECK(ProcessGone(pid));
  {
    Guest g(d.Socket(kA));
    CHECK(RunOne(*g.drv, 1).ok());
  }
  probe.Check(Ms(1000));
  CheckVictim(v.Stop());
  CHECK(WorkerPid(d, kB) == victim_worker);
  CHECK(d.Shutdown() == 0);
}

TEST_CASE("restarts are bounded: a vGPU that keeps crashing is left failed, its sockets refuse, stop+start recovers") {
  DaemonProc d;
  REQUIRE(d.Start(Args({"--max-restarts", "2", "--vgpu", std::string(kA) + ":small"})));
  for (uint32_t n = 1; n <= 3; ++n) {
    const int64_t pid = WorkerPid(d, kA);
    REQUIRE(pid > 0);
    REQUIRE(Control(d, {{"op", "fault"}, {"uuid", kA}, {"fault", "crash"}}).value("ok", false));
    REQUIRE(WaitFor([&] { return Ends(Worker(d, kA), "crash") == n; }, Ms(15000)));
    if (n < 3) REQUIRE(Restarted(d, kA, pid, n));
  }
  REQUIRE(WaitFor([&] { return Worker(d, kA)["state"] == "failed"; }, Ms(5000)));
  Json s = Show(d, kA);
  INFO("show: ", s.dump());
  CHECK(s["state"] == "failed");
  CHECK(s["worker"]["pid"].is_null());
  CHECK(s["worker"]["last_exit"].get<std::string>().find("crashed") != std::string::npos);
  // Nobody serves it any more: a guest is refused at once rather than queued.
  CHECK(!std::filesystem::exists(d.Socket(kA)));
  CHECK(mgmt::ConnectUnix(d.Socket(kA)) < 0);
  CHECK(d.Log().find("left failed") != std::string::npos);
  // The operator's way back.
  CHECK(Control(d, {{"op", "stop"}, {"uuid", kA}}).value("ok", false));
  CHECK(Control(d, {{"op", "start"}, {"uuid", kA}, {"type", "small"}}).value("ok", false));
  Json w = Worker(d, kA);
  CHECK(w["state"] == "running");
  CHECK(w["restarts"] == 0);
  {
    Guest g(d.Socket(kA));
    CHECK(RunOne(*g.drv, 2).ok());
  }
  CHECK(d.Shutdown() == 0);
}

TEST_CASE("a worker past its memory limit ends by name and comes back; the other tenant keeps its results") {
#if defined(__SANITIZE_ADDRESS__)
  MESSAGE("skipped in the ASan build: its shadow memory needs terabytes of address space, so workers get no RLIMIT_AS");
  return;
#endif
  DaemonProc d;
  // 512 MiB of its own + the 64 MiB aperture + 256 MiB of guest RAM: RLIMIT_AS ~832 MiB.
  StartAB(d, {"--worker-memory", "512M", "--dma-max-bytes", "256M"});
  Victim v(d.Socket(kB));
  Json w = Worker(d, kA);
  const int64_t pid = w["pid"].get<int64_t>();
  CHECK(w["limits"]["address_space_bytes"] == (512ull << 20) + (64ull << 20) + (256ull << 20));
  REQUIRE(Control(d, {{"op", "fault"}, {"uuid", kA}, {"fault", "memory"}}).value("ok", false));
  REQUIRE(Restarted(d, kA, pid, 1));
  w = Worker(d, kA);
  INFO("worker A: ", w.dump());
  CHECK(Ends(w, "out_of_memory") == 1);
  CHECK(w["last_exit"].get<std::string>().find("out of memory") != std::string::npos);
  CheckVictim(v.Stop());
  CHECK(d.Shutdown() == 0);
}

TEST_CASE("a worker that floods the supervisor's channel is killed by name; the loop keeps serving everyone else") {
  DaemonProc d;
  StartAB(d);
  Victim v(d.Socket(kB));
  ControlProbe probe(d, kB);
  const int64_t pid = WorkerPid(d, kA);
  const uint64_t before = v.rounds();
  REQUIRE(Control(d, {{"op", "fault"}, {"uuid", kA}, {"fault", "flood"}}).value("ok", false));
  REQUIRE(Restarted(d, kA, pid, 1));
  Json w = Worker(d, kA);
  INFO("worker A: ", w.dump());
  CHECK(w["last_exit"].get<std::string>().find("flooded the channel") != std::string::npos);
  CHECK(Ends(w, "crash") == 1);
  // Served, and answered, throughout; the flooded vGPU works again on its new worker.
  CHECK(v.rounds() > before);
  probe.Check(Ms(1000));
  {
    Guest g(d.Socket(kA));
    CHECK(RunOne(*g.drv, 0).ok());
  }
  CheckVictim(v.Stop());
  CHECK(d.Shutdown() == 0);
}

TEST_CASE("device lost: the guest's work is refused kDeviceLost, ERR fires for its VMM; the other tenant keeps its results") {
  // F8's ERR interrupt, end to end: the test worker's engine reports its device lost (what a
  // GPU reset or a driver crash looks like to a worker), as a VMM would see it.
  DaemonProc d;
  StartAB(d);
  Victim v(d.Socket(kB));
  {
    Guest g(d.Socket(kA));
    REQUIRE(RunOne(*g.drv, 0).ok());
    const EventFd* err = g.dev->device_error();
    REQUIRE(err != nullptr);  // offered in DEVICE_GET_IRQ_INFO and assigned by the guest library
    CHECK(err->TryDrain().value_or(1) == 0);  // nothing lost so far
    REQUIRE(Control(d, {{"op", "fault"}, {"uuid", kA}, {"fault", "device-lost"}}).value("ok", false));
    // Work after the loss: refused by name, never a result, and ERR signalled.
    Result<> r = RunOne(*g.drv, 1, Ms(10000));
    INFO("after the loss: ", e2e::Why(r));
    CHECK(r.code() == Errc::kDeviceLost);
    auto fired = err->Wait(Ms(5000));
    REQUIRE(fired.ok());
    CHECK(*fired >= 1);
    CHECK(g.dev->Read32(abi::reg::kErrCode).value_or(0) == static_cast<uint32_t>(Errc::kDeviceLost));
  }
  CheckVictim(v.Stop());  // the other vGPU's worker and engine never noticed
  // The host's way back: stop and start give the vGPU a new worker and engine.
  CHECK(Control(d, {{"op", "stop"}, {"uuid", kA}}).value("ok", false));
  CHECK(Control(d, {{"op", "start"}, {"uuid", kA}, {"type", "small"}}).value("ok", false));
  {
    Guest again(d.Socket(kA));
    CHECK(RunOne(*again.drv, 2).ok());
    CHECK(again.dev->device_error()->TryDrain().value_or(1) == 0);
  }
  CHECK(d.Shutdown() == 0);
}

TEST_CASE("16 vGPUs started in parallel within the budget; a 17th refused; every worker reclaimed after stop") {
  DaemonProc d;
  REQUIRE(d.Start(Args({"--aperture-budget", "1G"})));  // 16 x 64 MiB
  std::vector<std::string> uuids;
  for (int i = 0; i < 16; ++i) uuids.push_back(fmt::format("cccccccc-0000-4000-8000-{:012x}", i + 1));
  std::vector<Json> replies(16);
  const auto t0 = Clock::now();
  {
    std::vector<std::thread> ts;
    for (int i = 0; i < 16; ++i)
      ts.emplace_back([&, i] { replies[i] = Control(d, {{"op", "start"}, {"uuid", uuids[i]}, {"type", "small"}}); });
    for (auto& t : ts) t.join();
  }
  MESSAGE("16 parallel starts answered in ", MsSince(t0), " ms");
  std::vector<int64_t> pids;
  for (int i = 0; i < 16; ++i) {
    INFO("start ", i, ": ", replies[i].dump());
    REQUIRE(replies[i].value("ok", false));
    Json w = Worker(d, uuids[i]);
    CHECK(w["state"] == "running");
    pids.push_back(w["pid"].get<int64_t>());
  }
  std::sort(pids.begin(), pids.end());
  CHECK(std::unique(pids.begin(), pids.end()) == pids.end());  // one process each
  Json over = Control(d, {{"op", "start"}, {"uuid", "cccccccc-0000-4000-8000-0000000000ff"}, {"type", "small"}});
  CHECK(over.value("error", std::string()) == "kLimitExceeded");
  // Each serves its own guest.
  for (int i : {0, 7, 15}) {
    Guest g(d.Socket(uuids[i]));
    CHECK(RunOne(*g.drv, static_cast<uint32_t>(i)).ok());
  }
  for (const auto& u : uuids) CHECK(Control(d, {{"op", "stop"}, {"uuid", u}}).value("ok", false));
  CHECK(WaitFor([&] { return std::all_of(pids.begin(), pids.end(), ProcessGone); }, Ms(10000)));
  for (const auto& u : uuids) CHECK(!std::filesystem::exists(d.Socket(u)));
  CHECK(d.Shutdown() == 0);
}

namespace {
using lifecycle::Usage;
// After the last control connection has been closed on the supervisor's side too.
Usage UsageOf(pid_t pid) { return lifecycle::SettledUsageOf(pid, std::chrono::milliseconds(300)); }
}  // namespace

TEST_CASE("200 start/stop cycles: the supervisor's fds and memory stay steady, every worker is reaped") {
  DaemonProc d;
  REQUIRE(d.Start(Args()));
  const std::string u = "dddddddd-0000-4000-8000-000000000001";
  std::vector<int64_t> pids;
  Usage warm;
  const auto t0 = Clock::now();
  for (int i = 0; i < 200; ++i) {
    Json r = Control(d, {{"op", "start"}, {"uuid", u}, {"type", "small"}});
    REQUIRE_MESSAGE(r.value("ok", false), "cycle ", i, ": ", r.dump());
    pids.push_back(WorkerPid(d, u));
    REQUIRE(Control(d, {{"op", "stop"}, {"uuid", u}}).value("ok", false));
    if (i == 19) {
      REQUIRE(WaitFor([&] { return std::all_of(pids.begin(), pids.end(), ProcessGone); }, Ms(10000)));
      warm = UsageOf(d.pid());
    }
  }
  MESSAGE("200 start/stop cycles in ", MsSince(t0), " ms");
  REQUIRE(WaitFor([&] { return std::all_of(pids.begin(), pids.end(), ProcessGone); }, Ms(10000)));
  const Usage end = UsageOf(d.pid());
  MESSAGE("supervisor after 20 cycles: ", warm.fds, " fds, ", warm.rss_kib, " KiB; after 200: ", end.fds, " fds, ",
          end.rss_kib, " KiB");
  CHECK(end.fds <= warm.fds);
  // A leak of a few hundred bytes per cycle shows over 180 cycles in a release build; the
  // ASan build's allocator keeps freed memory in quarantine, so it gets more room.
#if defined(__SANITIZE_ADDRESS__)
  CHECK(end.rss_kib <= warm.rss_kib + 32 * 1024);
#else
  CHECK(end.rss_kib <= warm.rss_kib + 2 * 1024);
#endif
  CHECK(d.Shutdown() == 0);
}
