// F8, supervisor restart (docs/isolation.md, "Supervisor restart"): a kill -9 of vgpud must
// not cost a running VM its vGPU. Workers keep serving their guests without a supervisor,
// a new vgpud adopts them (same process, same sockets, the guest never disconnected), its
// view comes back (running vGPUs, workers, counters, scheduling), `start: auto` definitions
// that were not running start, nothing defined is lost, stale sockets block nothing, and a
// state file that names a process that is not the worker adopts nothing and kills nothing.

#include <fcntl.h>
#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "tests/e2e/victim.h"
#include "tests/lifecycle_restart/common.h"

using namespace vg;
using namespace vg::lifecycle;
using vg::e2e::CheckVictim;
using vg::e2e::Victim;

namespace {

constexpr const char* kA = "aaaaaaaa-0000-4000-8000-0000000000a8";  // the tenant mid-workload
constexpr const char* kB = "bbbbbbbb-0000-4000-8000-0000000000b8";  // the victim's

// A tenant in this process running kernels back to back on its vGPU, each checked against
// the reference; any failure (an error, a mismatch, a disconnect) is recorded and ends it.
struct Tenant {
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> rounds{0};
  std::atomic<bool> failed{false};
  std::string why;
  std::thread t;
  explicit Tenant(const std::string& socket) {
    t = std::thread([this, socket] {
      Guest g(socket);
      for (uint32_t i = 0; !stop; ++i) {
        if (auto r = RunOne(*g.drv, i); !r) {
          why = fmt::format("round {}: {}", i, r.error().ToString());
          failed = true;
          return;
        }
        ++rounds;
      }
    });
  }
  void Stop() {
    stop = true;
    if (t.joinable()) t.join();
  }
  ~Tenant() { Stop(); }
};

}  // namespace

TEST_CASE("kill -9 of the supervisor mid-workload: guests keep their vGPUs bit-exact; the new vgpud adopts the workers") {
  BecomeSubreaper();
  DaemonProc d;
  const std::vector<std::string> vgpus{"--vgpu", std::string(kA) + ":small", "--vgpu", std::string(kB) + ":small"};
  std::vector<std::string> args = Args(vgpus);
  REQUIRE(d.Start(args));
  const int64_t pid_a = WorkerPid(d, kA), pid_b = WorkerPid(d, kB);
  REQUIRE(pid_a > 0);
  REQUIRE(pid_b > 0);
  Victim v(d.Socket(kB));  // a guest process on B
  Tenant t(d.Socket(kA));
  REQUIRE(WaitFor([&] { return t.rounds >= 3 || t.failed; }, Ms(30000)));
  REQUIRE_MESSAGE(!t.failed, t.why);
  // Counters before: the worker's own (its pong), and the supervisor's (restarts).
  const uint64_t subs_before = Show(d, kA)["counters"].value("submissions", uint64_t{0});
  CHECK(subs_before > 0);

  REQUIRE(d.Shutdown(SIGKILL) == 128 + SIGKILL);
  // No supervisor: the workers serve on (a VM under QEMU would not reconnect).
  const uint64_t at_kill = t.rounds;
  REQUIRE(WaitFor([&] { return t.rounds >= at_kill + 3 || t.failed; }, Ms(20000)));
  CHECK_MESSAGE(!t.failed, t.why);
  CHECK(!ProcessGone(pid_a));
  CHECK(!ProcessGone(pid_b));

  // The new supervisor, started as systemd would (the same arguments, --vgpu included).
  const auto t0 = Clock::now();
  REQUIRE(d.Start(args));
  MESSAGE("new supervisor answering after ", MsSince(t0), " ms");
  // vgpuctl list/show: both running, served by the same processes.
  Json list = d.CtlJson({"list"});
  INFO("list: ", list.dump());
  REQUIRE(list["instances"].size() == 2);
  for (const char* u : {kA, kB}) {
    Json s = d.CtlJson({"show", u});
    INFO("show ", u, ": ", s.dump());
    CHECK(s["state"] == "running");
    CHECK(s["worker"]["state"] == "running");
    CHECK(s["worker"]["restarts"] == 0);
  }
  CHECK(WorkerPid(d, kA) == pid_a);
  CHECK(WorkerPid(d, kB) == pid_b);
  CHECK(d.Log().find("adopted in") != std::string::npos);
  // Still the same guest, never disconnected, results bit-exact; the worker's counters run
  // on from where they were, and the scheduler grants it the engine again.
  const uint64_t at_restart = t.rounds;
  REQUIRE(WaitFor([&] { return t.rounds >= at_restart + 5 || t.failed; }, Ms(30000)));
  CHECK_MESSAGE(!t.failed, t.why);
  Json s = Show(d, kA);
  INFO("show A: ", s.dump());
  CHECK(s["counters"].value("submissions", uint64_t{0}) > subs_before);
  CHECK(s["counters"].value("vfio_user_clients", uint64_t{0}) == 1);
  CHECK(s["scheduler"].value("grants", uint64_t{0}) > 0);
  t.Stop();
  CHECK_MESSAGE(!t.failed, t.why);
  MESSAGE("tenant: ", t.rounds.load(), " kernels checked, ", at_restart - at_kill, " of them without a supervisor");
  CheckVictim(v.Stop());
  // An adopted worker is stopped as any: its guest sees the socket hang up, the process ends.
  CHECK(Answered(Control(d, {{"op", "stop"}, {"uuid", kA}})));
  CHECK(WaitFor([&] { return ProcessGone(pid_a); }, Ms(10000)));
  CHECK(d.Shutdown() == 0);
  CHECK(WaitFor([&] { return ProcessGone(pid_b); }, Ms(10000)));
  ReapOrphans({pid_a, pid_b});
}

TEST_CASE("after kill -9: auto definitions start, manual ones stay defined, a transient vGPU comes back as it was") {
  BecomeSubreaper();
  DaemonProc d;
  REQUIRE(d.Start(Args()));
  const std::string kAuto = "cccccccc-0000-4000-8000-0000000000c1", kManual = "cccccccc-0000-4000-8000-0000000000c2",
                    kRunning = "cccccccc-0000-4000-8000-0000000000c3", kTransient = "cccccccc-0000-4000-8000-0000000000c4",
                    kDead = "cccccccc-0000-4000-8000-0000000000c5";
  REQUIRE(Answered(Control(d, {{"op", "define"}, {"uuid", kAuto}, {"type", "small"}, {"auto", true}})));
  REQUIRE(Answered(Control(d, {{"op", "define"}, {"uuid", kManual}, {"type", "small"}})));
  REQUIRE(Answered(Control(d, {{"op", "define"}, {"uuid", kRunning}, {"type", "medium"}})));
  REQUIRE(Answered(Control(d, {{"op", "start"}, {"uuid", kRunning}})));
  REQUIRE(Answered(Control(d, {{"op", "start"}, {"uuid", kTransient}, {"type", "small"},
                         {"attrs", Json::array({Json{{"sched_weight", "300"}}})}})));
  REQUIRE(Answered(Control(d, {{"op", "start"}, {"uuid", kDead}, {"type", "small"}})));
  const int64_t running_pid = WorkerPid(d, kRunning), transient_pid = WorkerPid(d, kTransient),
                dead_pid = WorkerPid(d, kDead);
  REQUIRE(d.Shutdown(SIGKILL) == 128 + SIGKILL);
  // One worker also dies while no supervisor runs: its vGPU must still come back.
  REQUIRE(::kill(static_cast<pid_t>(dead_pid), SIGKILL) == 0);
  REQUIRE(WaitFor([&] { return ProcessGone(dead_pid); }, Ms(5000)));
  // What a kill -9 leaves: the control socket, the sockets of the dead worker.
  CHECK(std::filesystem::exists(d.control()));
  CHECK(std::filesystem::exists(d.Socket(kDead)));

  REQUIRE(d.Start(Args()));
  Json defined = d.CtlJson({"list", "--defined"});
  INFO("defined: ", defined.dump());
  CHECK(defined["instances"].size() == 3);
  Json show_auto = Show(d, kAuto);
  CHECK(show_auto["state"] == "running");
  CHECK(Show(d, kManual)["state"] == "stopped");
  Json run = Show(d, kRunning);
  INFO("running: ", run.dump());
  CHECK(run["state"] == "running");
  CHECK(run["type"] == "vgpud-medium");
  CHECK(run["worker"]["pid"] == running_pid);
  Json tr = Show(d, kTransient);
  INFO("transient: ", tr.dump());
  CHECK(tr["state"] == "running");
  CHECK(tr["worker"]["pid"] == transient_pid);
  CHECK(tr["sched_weight"] == 300);  // its attribute as it ran, and the scheduler's weight
  CHECK(tr["scheduler"]["weight"] == 300);
  Json dead = Show(d, kDead);
  INFO("dead: ", dead.dump());
  CHECK(dead["state"] == "running");
  CHECK(dead["worker"]["pid"] != dead_pid);
  // Each one serves a guest.
  for (const std::string& u : {kAuto, kRunning, kTransient, kDead}) {
    Guest g(d.Socket(u));
    CHECK_MESSAGE(RunOne(*g.drv, 1).ok(), u);
  }
  // A clean stop stops them all; nothing comes back but the auto definition.
  CHECK(d.Shutdown() == 0);
  CHECK(WaitFor([&] { return ProcessGone(running_pid) && ProcessGone(transient_pid); }, Ms(10000)));
  REQUIRE(d.Start(Args()));
  Json list = d.CtlJson({"list"});
  INFO("list after a clean restart: ", list.dump());
  REQUIRE(list["instances"].size() == 1);
  CHECK(list["instances"][0]["uuid"] == kAuto);
  CHECK(d.Shutdown() == 0);
  ReapOrphans({running_pid, transient_pid});
}

TEST_CASE("a state file naming another process adopts nothing and kills nothing; a wrong token is refused") {
  BecomeSubreaper();
  DaemonProc d;
  REQUIRE(d.Start(Args({"--vgpu", std::string(kA) + ":small"})));
  const int64_t pid_a = WorkerPid(d, kA);
  REQUIRE(d.Shutdown(SIGKILL) == 128 + SIGKILL);
  const std::filesystem::path state = d.runtime() / (std::string(kA) + ".worker");
  REQUIRE(std::filesystem::exists(state));

  // 1. The worker is gone and its pid now names an unrelated process of ours (a sleep).
  REQUIRE(::kill(static_cast<pid_t>(pid_a), SIGKILL) == 0);
  REQUIRE(WaitFor([&] { return ProcessGone(pid_a); }, Ms(5000)));
  const pid_t other = ::fork();
  if (other == 0) {
    ::execl("/bin/sleep", "sleep", "60", static_cast<char*>(nullptr));
    std::_Exit(127);
  }
  REQUIRE(other > 0);
  Json j = Json::parse(mgmt::ReadFile(state));
  j["pid"] = other;
  { std::ofstream(state) << j.dump(); }
  REQUIRE(d.Start(Args({"--vgpu", std::string(kA) + ":small"})));
  const int64_t fresh = WorkerPid(d, kA);
  CHECK(fresh > 0);
  CHECK(fresh != other);
  CHECK(Worker(d, kA)["state"] == "running");
  CHECK(d.Log().find("not adopted") != std::string::npos);
  CHECK(::kill(other, 0) == 0);  // untouched
  ::kill(other, SIGKILL);
  (void)::waitpid(other, nullptr, 0);
  {
    Guest g(d.Socket(kA));
    CHECK(RunOne(*g.drv, 2).ok());
  }

  // 2. A live worker, but the state file's token is not its own: the worker refuses the
  //    adoption, and the supervisor replaces it rather than leave the vGPU unmanaged.
  REQUIRE(d.Shutdown(SIGKILL) == 128 + SIGKILL);
  j = Json::parse(mgmt::ReadFile(state));
  CHECK(j["pid"] == fresh);
  j["token"] = std::string(64, '0');
  { std::ofstream(state) << j.dump(); }
  REQUIRE(d.Start(Args({"--vgpu", std::string(kA) + ":small"})));
  const int64_t replaced = WorkerPid(d, kA);
  CHECK(replaced > 0);
  CHECK(replaced != fresh);
  CHECK(d.Log().find("adoption refused: wrong token") != std::string::npos);
  CHECK(WaitFor([&] { return ProcessGone(fresh); }, Ms(10000)));
  {
    Guest g(d.Socket(kA));
    CHECK(RunOne(*g.drv, 3).ok());
  }

  // 3. Another user's process may not adopt: the adoption socket is 0600, owner only.
  struct stat st {};
  REQUIRE(::stat((d.runtime() / (std::string(kA) + ".adopt.sock")).c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  CHECK(d.Shutdown() == 0);
  ReapOrphans({pid_a, fresh, replaced});
}

TEST_CASE("an orphaned worker without a guest exits after its grace; its vGPU still comes back") {
  BecomeSubreaper();
  DaemonProc d;
  REQUIRE(d.Start(Args({"--vgpu", std::string(kA) + ":small"}, 1)));
  const int64_t pid_a = WorkerPid(d, kA);
  REQUIRE(d.Shutdown(SIGKILL) == 128 + SIGKILL);
  CHECK(WaitFor([&] { return ProcessGone(pid_a); }, Ms(10000)));
  CHECK(d.Log().find("orphaned and without a client") != std::string::npos);
  REQUIRE(d.Start(Args()));
  Json s = Show(d, kA);
  INFO("show: ", s.dump());
  CHECK(s["state"] == "running");
  CHECK(s["worker"]["pid"] != pid_a);
  CHECK(d.Shutdown() == 0);
  ReapOrphans({pid_a});
}

TEST_CASE("a second vgpud on the same runtime directory refuses to start and touches nothing of the first's") {
  BecomeSubreaper();
  DaemonProc d;
  REQUIRE(d.Start(Args({"--vgpu", std::string(kA) + ":small"})));
  const int64_t pid_a = WorkerPid(d, kA);
  Tenant t(d.Socket(kA));
  REQUIRE(WaitFor([&] { return t.rounds >= 2 || t.failed; }, Ms(30000)));
  // The second one, as an operator's mistake would start it: it must not adopt (nor, when the
  // busy worker does not answer, kill) the first one's workers.
  mgmt::Ran second = mgmt::RunCapture({mgmt::Env("VGPUD", "tools/vgpud"), "--runtime-dir", d.runtime().string(),
                                       "--heartbeat-ms", "100"});
  INFO("second vgpud: ", second.out, second.err);
  CHECK(second.code != 0);
  CHECK((second.out + second.err).find("another vgpud runs on") != std::string::npos);
  const uint64_t before = t.rounds;
  REQUIRE(WaitFor([&] { return t.rounds >= before + 3 || t.failed; }, Ms(20000)));
  CHECK_MESSAGE(!t.failed, t.why);
  CHECK(WorkerPid(d, kA) == pid_a);
  CHECK(Worker(d, kA)["state"] == "running");
  t.Stop();
  CHECK(d.Shutdown() == 0);
  ReapOrphans({pid_a});
}

TEST_CASE("kill -9 with the mdev tree mounted (--root): the stale FUSE mount does not block the restart") {
  // Registered as a meson test of its own (lifecycle_restart_fuse, this case alone), so that
  // a host without FUSE reports it as skipped (exit 77) rather than as passed.
  if (!mgmt::fs::exists("/dev/fuse")) {
    std::fputs("SKIP: no /dev/fuse here\n", stderr);
    std::_Exit(77);
  }
  BecomeSubreaper();
  DaemonProc d;
  const mgmt::fs::path root = d.dir() / "root";
  mgmt::fs::create_directories(root);
  const std::vector<std::string> args = Args({"--root", root.string()});
  REQUIRE(d.Start(args));
  REQUIRE(Answered(Control(d, {{"op", "define"}, {"uuid", kA}, {"type", "small"}})));
  REQUIRE(Answered(Control(d, {{"op", "start"}, {"uuid", kA}})));
  const int64_t pid_a = WorkerPid(d, kA);
  Tenant t(d.Socket(kA));
  REQUIRE(WaitFor([&] { return t.rounds >= 2 || t.failed; }, Ms(30000)));
  REQUIRE(d.Shutdown(SIGKILL) == 128 + SIGKILL);
  REQUIRE(d.Start(args));
  CHECK(WorkerPid(d, kA) == pid_a);
  CHECK(mgmt::fs::exists(root / "sys/bus/mdev/devices" / kA));
  const uint64_t before = t.rounds;
  REQUIRE(WaitFor([&] { return t.rounds >= before + 3 || t.failed; }, Ms(20000)));
  t.Stop();
  CHECK_MESSAGE(!t.failed, t.why);
  CHECK(d.Shutdown() == 0);
  ReapOrphans({pid_a});
}

TEST_CASE("an adopted worker that dies is restarted on the same socket paths, its end named and counted") {
  BecomeSubreaper();
  DaemonProc d;
  REQUIRE(d.Start(Args({"--vgpu", std::string(kA) + ":small"})));
  const int64_t pid_a = WorkerPid(d, kA);
  REQUIRE(d.Shutdown(SIGKILL) == 128 + SIGKILL);
  REQUIRE(d.Start(Args()));
  REQUIRE(WorkerPid(d, kA) == pid_a);
  REQUIRE(::kill(static_cast<pid_t>(pid_a), SIGKILL) == 0);
  REQUIRE(WaitFor(
      [&] {
        Json w = Worker(d, kA);
        return w.is_object() && w["state"] == "running" && w["pid"].is_number() && w["pid"] != pid_a;
      },
      Ms(15000)));
  Json w = Worker(d, kA);
  INFO("worker: ", w.dump());
  CHECK(w["restarts"] == 1);
  CHECK(w["ends"]["exit"] == 1);
  CHECK(w["last_exit"].get<std::string>().find("adopted") != std::string::npos);
  CHECK(WaitFor([&] { return ProcessGone(pid_a); }, Ms(5000)));
  {
    Guest g(d.Socket(kA));
    CHECK(RunOne(*g.drv, 4).ok());
  }
  CHECK(d.Shutdown() == 0);
  ReapOrphans({pid_a});
}
