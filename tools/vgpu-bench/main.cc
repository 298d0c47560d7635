// vgpu-bench: the A/B study of native, mediated and remoting on one engine.
//   vgpu-bench [--quick|--full|--smoke] [--groups a,b] [--paths native,mediated,remoting]
//              [--ablations doorbell,executor,memory,gtt,remoting,scheduler|none] [--compare-with EARLIER.json]
//              [--reps N] [--iters N] [--gpu NAME|INDEX] [--out DIR] [--json FILE] [--csv FILE]
//              [--qemu BIN] [--qemu-firmware DIR] [--lifecycle-cycles N] [--idle-workers K]
//              [--covert-bits N] [--covert-bit-us P] [--covert-granularities-us 0,100]
//              [--covert-policies best-effort,partitioned] [--covert-sender load|overrun]
// Paths: native, mediated (ioeventfd doorbell), mediated-mmio (RING_TAIL REGION_WRITE),
// mediated-qemu (a real QEMU's vfio-user-pci under qtest: needs --qemu or VGPUD_QEMU,
// skipped with a note otherwise), remoting. The ablations run more mediated rows beside
// them on the workloads where their factor matters (posted MMIO doorbell, serial executor,
// gathered memory, GTT update modes), and remoting rows without batching or idle notify, and the summary gives the verdict on "mediated beats
// remoting" per workload class, every figure with its spread over the repetitions.
// It starts its own vgpud with the vGPUs it needs, runs every workload on every path side by
// side (interleaved, rotating order), and removes what it created. The lifecycle group
// (vGPU start/stop latency, idle worker memory) runs first, on a vgpud of its own; then the
// covert group (a covert channel between two vGPUs, time coarsening off and on), on a vgpud
// of its own per granularity. The scheduler groups (fairness, noisy; opt-in with --groups)
// run next on two vgpuds of their own, --sched weighted and --sched off (fairness.h). The
// study's vgpuds run with --time-granularity-us 0: the A/B study measures the paths, not the
// timing defence (whose cost the covert group shows).
// docs/ab-methodology.md says what each number means.

#include <CLI/CLI.hpp>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <thread>

#include <fmt/ranges.h>

#include "abi/device.h"
#include "tools/vgpu-bench/covert.h"
#include "tools/vgpu-bench/desktop.h"
#include "tools/vgpu-bench/lifecycle.h"
#include "tools/vgpu-bench/study.h"

using namespace vg;
using namespace vg::bench;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

constexpr int kMaxGuests = 8;

std::string GuestUuid(int i) { return fmt::format("b0b0b0b0-0000-4000-8000-{:012x}", 0xbe0c + i); }

struct DaemonProc {
  pid_t pid = -1;
  fs::path dir;
  ~DaemonProc() {
    if (pid > 0) {
      ::kill(pid, SIGTERM);
      ::waitpid(pid, nullptr, 0);
    }
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  std::string Control() const { return (dir / "control.sock").string(); }
  std::string Socket(int i) const { return (dir / (GuestUuid(i) + ".sock")).string(); }
  std::string RemoteSocket(int i) const { return (dir / (GuestUuid(i) + ".remote.sock")).string(); }
};

// types[i]: the vGPU type of guest i (none: a daemon for the lifecycle group, which starts
// its own). `tag` keeps the runtime dirs of daemons apart; `extra`: more vgpud flags (the
// executor and memory ablations' daemon-wide switches).
Result<std::unique_ptr<DaemonProc>> StartDaemon(const std::string& vgpud, const std::vector<std::string>& types,
                                                const std::string& gpu, const std::string& tag = "",
                                                const std::vector<std::string>& extra = {}) {
  const int guests = static_cast<int>(types.size());
  auto d = std::make_unique<DaemonProc>();
  d->dir = fs::temp_directory_path() / fmt::format("vgpu-bench-{}{}", ::getpid(), tag);
  fs::create_directories(d->dir);
  std::vector<std::string> args{vgpud, "--runtime-dir", d->dir.string(), "--log-level", "error"};
  if (!gpu.empty()) args.insert(args.end(), {"--gpu", gpu});
  args.insert(args.end(), extra.begin(), extra.end());
  for (int i = 0; i < guests; ++i) args.insert(args.end(), {"--vgpu", GuestUuid(i) + ":" + types[static_cast<size_t>(i)]});
  d->pid = ::fork();
  if (d->pid == 0) {
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv(argv[0], argv.data());
    std::_Exit(127);
  }
  auto deadline = Clock::now() + std::chrono::seconds(30);
  for (int i = 0; i < guests; ++i) {
    while (!fs::is_socket(d->Socket(i))) {
      VG_ERROR_IF(Clock::now() > deadline || ::waitpid(d->pid, nullptr, WNOHANG) != 0, Errc::kTimeout,
                  "vgpud ({}) did not come up", vgpud);
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  // The control socket opens after every --vgpu has started (vgpud/main.cc).
  while (!fs::is_socket(d->Control())) {
    VG_ERROR_IF(Clock::now() > deadline || ::waitpid(d->pid, nullptr, WNOHANG) != 0, Errc::kTimeout,
                "vgpud ({}) did not open its control socket", vgpud);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return d;
}

Result<std::unique_ptr<Path>> MakePath(const std::string& name, const PathConfig& c) {
  if (name == "native") return MakeNativePath(c);
  if (name == "mediated") return MakeMediatedPath(c);
  if (name == "mediated-mmio") return MakeMediatedMmioPath(c);
  if (name == "mediated-qemu") return MakeMediatedQemuPath(c);
  if (name == "remoting") return MakeRemotingPath(c);
  return MakeError(Errc::kInvalidArgument, "unknown path '{}'", name);
}

// The ablations' rows (docs/ab-methodology.md "Ablations"). Each is its own guest on a vGPU
// of its own (a vGPU takes one mediated client; the remoting rows get one each too, so no
// two sessions share a worker's loop); the executor and memory factors are vgpud-wide flags,
// so their rows are guests of a vgpud of their own.
// kGtt: a vgpud like the main one, for the gtt ablation's guests (a type has at most 8
// instances on one vgpud, and the main one's are the concurrency and doorbell guests').
enum class Host { kMain, kSerial, kUncoalesced, kNoInline, kGathered, kSchedOff, kSchedShared, kGtt };
// The scheduler ablation's vgpuds: a row name each, and the concurrency rows they also run.
const std::vector<std::pair<std::string, Host>> kSchedulerHosts{{"mediated-sched-off", Host::kSchedOff},
                                                                {"mediated-sched-shared", Host::kSchedShared}};
struct Variant {
  Host host = Host::kMain;
  Doorbell doorbell = Doorbell::kDefault;
  std::string gtt;  // empty: --gtt
  // A remoting guest (MakeRemotingVariantPath) with these client switches, not a mediated one.
  bool remoting = false;
  bool batch = true;
  bool idle_notify = true;
};

const std::vector<std::string> kAblations{"doorbell", "executor", "memory", "gtt", "remoting", "scheduler"};

// The ablations asked for (`which`), and the variant behind each of their rows but the
// reference ("mediated", which every ablation shares: one row, not one per ablation).
std::vector<Ablation> PlanAblations(const std::set<std::string>& which, const std::string& gtt,
                                    const std::vector<std::string>& paths, std::map<std::string, Variant>& variants) {
  std::vector<Ablation> out;
  auto in_paths = [&](const std::string& p) { return std::find(paths.begin(), paths.end(), p) != paths.end(); };
  if (which.count("doorbell")) {
    Ablation a{"doorbell", "how the guest tells the device its ring has new work", {"empty", "small", "stream"}};
    if (DriverHasIdleNotify()) {
      a.rows.push_back({"mediated", "polled shadow (idle notify): the device re-reads the tail shadow while busy; an "
                                    "ioeventfd kick only when it says idle (the driver's default)"});
      a.rows.push_back({"mediated-kick", "ioeventfd: the tail in the shadow and a kick at every submission"});
      variants["mediated-kick"] = {Host::kMain, Doorbell::kIoeventfd, ""};
    } else {
      a.rows.push_back({"mediated", "ioeventfd: the tail in the shadow and a kick at every submission (the driver's "
                                    "default)"});
      // A guest driver without DriverOptions::idle_notify (this branch before f12-idle):
      // kept so the study can be built against one for comparison.
      a.not_run.push_back("mediated-shadow (polled shadow, idle notify): NOT RUN: this build's guest driver has no "
                          "DriverOptions::idle_notify (branch f12-idle)");
    }
    a.rows.push_back({"mediated-posted", "posted MMIO: RING_TAIL as a REGION_WRITE with no reply awaited (QEMU 10.1)"});
    variants["mediated-posted"] = {Host::kMain, Doorbell::kPostedMmio, ""};
    a.rows.push_back({"mediated-mmio", "synchronous MMIO: RING_TAIL as a REGION_WRITE request/reply (QEMU 10.2)"});
    variants["mediated-mmio"] = {Host::kMain, Doorbell::kSyncMmio, ""};
    if (in_paths("mediated-qemu"))
      a.rows.push_back({"mediated-qemu", "through QEMU under qtest: synchronous REGION_WRITE, fence polled in RAM"});
    out.push_back(std::move(a));
  }
  if (which.count("executor")) {
    Ablation a{"executor", "how the executor runs a vGPU's plans (in flight, coalesced, completed inline)",
               {"empty", "small", "stream", "churn"}};
    a.rows.push_back({"mediated", "pipelined and coalescing: --executor-depth 4, plans queued while the engine is "
                                  "saturated share engine submissions (the default)"});
    a.rows.push_back({"mediated-uncoalesced",
                      "pipelined, one engine submission per plan: --no-coalesce (a vgpud of its own)"});
    variants["mediated-uncoalesced"] = {Host::kUncoalesced, Doorbell::kDefault, ""};
    a.rows.push_back({"mediated-no-inline",
                      "nothing inline: a fence-only plan to an idle vGPU goes through the executor's threads instead of "
                      "completing on the worker's loop, and a small engine plan is submitted by the submit thread "
                      "instead of the loop: --no-inline-complete (a vgpud of its own)"});
    variants["mediated-no-inline"] = {Host::kNoInline, Doorbell::kDefault, ""};
    a.rows.push_back({"mediated-serial", "serial: --executor-depth 1 (a vgpud of its own)"});
    variants["mediated-serial"] = {Host::kSerial, Doorbell::kDefault, ""};
    out.push_back(std::move(a));
  }
  if (which.count("memory")) {
    Ablation a{"memory", "how guest memory reaches the engine", {"data"}};
    // The rows that move data: matmul and blur are compute-bound on lavapipe (a 256 KiB
    // matmul takes most of a second), where import against copy is lost in the kernel's
    // time, and a row there costs --quick minutes.
    a.cases = {"copy ", "saxpy ", "COPY cmd"};
    a.rows.push_back({"mediated", "zero-copy: guest pages imported into the engine (the default)"});
    a.rows.push_back({"mediated-gathered", "gathered: guest memory copied in and out (a vgpud with --no-zero-copy)"});
    variants["mediated-gathered"] = {Host::kGathered, Doorbell::kDefault, ""};
    out.push_back(std::move(a));
  }
  if (which.count("scheduler")) {
    // The host scheduler (F7) on a vGPU alone: a scheduled worker cuts its engine work into
    // pieces of about a millisecond even with nobody else on the host, so that a tenant who
    // arrives waits one piece, not one long submission. What that costs long work is this row;
    // with two grants at once it should cost nothing more alone (a control). The concurrency
    // rows of both vgpuds show what one grant at a time costs guests that share the engine.
    Ablation a{"scheduler", "the host scheduler's pieces on a vGPU alone", {"kernel_time"}};
    a.rows.push_back({"mediated", "scheduled (--sched best-effort, the default): work cut into ~1 ms pieces"});
    a.rows.push_back({"mediated-sched-off", "unscheduled: --sched off, one submission per plan (a vgpud of its own)"});
    a.rows.push_back({"mediated-sched-shared",
                      "scheduled with two grants at once: --sched-concurrency 2 (a vgpud of its own)"});
    for (const auto& [name, host] : kSchedulerHosts) variants[name] = {host, Doorbell::kDefault, ""};
    out.push_back(std::move(a));
  }
  if (which.count("gtt")) {
    Ablation a{"gtt", "how the driver updates the GTT on Alloc/Free", {"churn"}};
    const std::vector<std::array<std::string, 3>> modes{
        {"ring", "mediated-gtt-ring", "in the ring: GTT_UPDATE commands ahead of the next submission"},
        {"batch", "mediated-gtt-batch", "in-memory batch: GTT_BATCH_GO over a record array in guest RAM"},
        {"multi", "mediated-gtt-multi", "multi-write: posted entries batched in REGION_WRITE_MULTI"},
        {"per-entry", "mediated-gtt-entry", "per-entry MMIO: one posted REGION_WRITE per entry"}};
    // The reference is the mode "mediated" runs (--gtt); the others are rows of their own.
    for (const auto& [mode, path, label] : modes)
      if (mode == gtt) a.rows.push_back({"mediated", label + " (--gtt " + mode + ")"});
    for (const auto& [mode, path, label] : modes)
      if (mode != gtt) {
        a.rows.push_back({path, label});
        variants[path] = {Host::kGtt, Doorbell::kDefault, mode};
      }
    out.push_back(std::move(a));
  }
  if (which.count("remoting")) {
    // The remoting client's own two switches (RemotingOptions), each off in a row of its own.
    Ablation a{"remoting", "how the remoting client publishes commands and wakes the daemon",
               {"empty", "small", "stream", "churn"}};
    a.rows.push_back({"remoting", "batched, idle notify: one tail store per submission, a wake only when the daemon "
                                  "says idle (the client's default)"});
    a.rows.push_back({"remoting-unbatched", "unbatched: a tail store (and a wake if idle) per command as recorded"});
    variants["remoting-unbatched"] = {Host::kMain, Doorbell::kDefault, "", true, false, true};
    a.rows.push_back({"remoting-no-idle-notify", "no idle notify: a wake eventfd signal at every publish"});
    variants["remoting-no-idle-notify"] = {Host::kMain, Doorbell::kDefault, "", true, true, false};
    out.push_back(std::move(a));
  }
  return out;
}

Workload SmallDispatch() {
  Workload w{"small", "copy 4 KiB", Kind::kKernel};
  w.sample = shaders::MakeSample(shaders::KernelId::kCopy, 1024, 3);
  return w;
}

// Worker process for the concurrency runs: one guest, `iters` small dispatches after "go".
int Worker(const std::string& path, const PathConfig& c, int iters, int ready_fd, int go_fd) {
  auto p = MakePath(path, c);
  // The study's own guest may have just left this vGPU; the daemon frees its single
  // client slot when it notices, so give it a moment.
  for (int i = 0; i < 100 && !p.ok(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    p = MakePath(path, c);
  }
  if (!p.ok()) {
    std::fprintf(stderr, "vgpu-bench worker: %s\n", p.error().ToString().c_str());
    return 3;
  }
  Workload w = SmallDispatch();
  if (!(*p)->Prepare(w).ok() || !(*p)->RunOnce().ok()) return 4;
  char b = 'r';
  if (::write(ready_fd, &b, 1) != 1 || ::read(go_fd, &b, 1) != 1) return 5;
  const double cpu0 = SelfCpuUs();
  for (int i = 0; i < iters; ++i)
    if (!(*p)->RunOnce().ok()) return 6;
  // The guest side's CPU of the timed loop, one 8-byte record (atomic on a pipe) after the
  // ready byte: the parent adds it to the daemon's for the CPU per submission.
  const double cpu = SelfCpuUs() - cpu0;
  if (::write(ready_fd, &cpu, sizeof cpu) != sizeof cpu) return 7;
  auto out = (*p)->ReadBack();
  return out.ok() && shaders::CheckSample(w.sample, *out).ok() ? 0 : 1;
}

// One concurrency measurement: the aggregate rate and the CPU per submission (host side plus
// the guests' own timed loops), and for a daemon's guests what the daemon saw of them.
struct ConcurrentRun {
  double rate = 0;
  double cpu_us = 0;
  DeviceSide device;
};

// The daemon's counters of the concurrency guests' vGPUs (`vgpuctl show`), summed: device
// time, and the scheduler's grants and grant waits (zero under --sched off, which has none).
struct GuestCounters {
  uint64_t gpu_time_ns = 0, grants = 0;
  double wait_ms = 0;
};
Result<GuestCounters> ShowGuests(const DaemonProc& d, int guests) {
  GuestCounters sum;
  for (int g = 0; g < guests; ++g) {
    VG_TRY_ASSIGN(Shown s, ShowVgpu(d.Control(), GuestUuid(g)));
    sum.gpu_time_ns += s.gpu_time_ns;
    sum.grants += s.grants;
    sum.wait_ms += s.wait_ms;
  }
  return sum;
}

Result<ConcurrentRun> RunConcurrentProcesses(const std::string& path, const DaemonProc& d, int guests, int iters,
                                             uint64_t ram) {
  int ready[2], go[2];
  VG_ERROR_IF(::pipe(ready) != 0 || ::pipe(go) != 0, Errc::kIo, "pipe");
  std::vector<pid_t> kids;
  for (int g = 0; g < guests; ++g) {
    pid_t pid = ::fork();
    if (pid == 0) {
      std::string self = fs::read_symlink("/proc/self/exe").string();
      std::vector<std::string> a{self, "--worker", path, "--socket", d.Socket(g), "--remote-socket",
                                 d.RemoteSocket(g), "--iters", std::to_string(iters), "--ready-fd",
                                 std::to_string(ready[1]), "--go-fd", std::to_string(go[0]),
                                 "--guest-ram-mib", std::to_string(ram >> 20)};
      std::vector<char*> argv;
      for (auto& s : a) argv.push_back(s.data());
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      std::_Exit(127);
    }
    kids.push_back(pid);
  }
  // Only the workers write "ready": a worker that dies is then seen as EOF, not a hang.
  ::close(ready[1]);
  ready[1] = -1;
  for (int g = 0; g < guests; ++g) {
    char b;
    if (::read(ready[0], &b, 1) != 1) {
      for (pid_t k : kids) {
        ::kill(k, SIGKILL);
        ::waitpid(k, nullptr, 0);
      }
      for (int fd : {ready[0], go[0], go[1]}) ::close(fd);
      return MakeError(Errc::kIo, "a {} worker died before starting", path);
    }
  }
  // Read before "go" and after the last guest has exited, so the interval holds all of the
  // timed loops (and the guests' warm-up submission before it does not count).
  Result<GuestCounters> shown0 = ShowGuests(d, guests);
  const double host0 = DaemonCpuUs(d.pid);
  auto t0 = Clock::now();
  for (int g = 0; g < guests; ++g) VG_ERROR_IF(::write(go[1], "g", 1) != 1, Errc::kIo, "go pipe");
  bool ok = true;
  for (pid_t k : kids) {
    int st = 0;
    ::waitpid(k, &st, 0);
    ok &= WIFEXITED(st) && WEXITSTATUS(st) == 0;
  }
  double s = std::chrono::duration<double>(Clock::now() - t0).count();
  const double host = DaemonCpuUs(d.pid) - host0;
  Result<GuestCounters> shown1 = ShowGuests(d, guests);
  // Every worker has exited: the pipe holds their CPU records, then EOF.
  double guest = 0, one = 0;
  int records = 0;
  while (::read(ready[0], &one, sizeof one) == static_cast<ssize_t>(sizeof one)) {
    guest += one;
    ++records;
  }
  for (int fd : {ready[0], go[0], go[1]}) ::close(fd);
  VG_ERROR_IF(!ok, Errc::kInternal, "a {} worker failed or computed a wrong result", path);
  VG_ERROR_IF(records != guests, Errc::kInternal, "{} of {} {} workers reported their CPU", records, guests, path);
  const double subs = static_cast<double>(guests) * iters;
  ConcurrentRun run{subs / s, (host + guest) / subs, {}};
  VG_TRY_CTX(shown0, "vgpuctl show of the {} guests' vGPUs", path);
  VG_TRY_CTX(shown1, "vgpuctl show of the {} guests' vGPUs", path);
  run.device.measured = true;
  run.device.busy = static_cast<double>(shown1->gpu_time_ns - shown0->gpu_time_ns) / 1e9 / s;
  run.device.grants_per_submission = static_cast<double>(shown1->grants - shown0->grants) / subs;
  run.device.grant_wait_us = (shown1->wait_ms - shown0->wait_ms) * 1e3 / subs;
  return run;
}

Result<ConcurrentRun> RunConcurrentThreads(const PathConfig& c, int guests, int iters) {
  engine::EngineOptions eo;
  eo.gpu = c.gpu;
  VG_TRY_ASSIGN(auto e, engine::Engine::Create(eo));
  std::shared_ptr<engine::Engine> shared(std::move(e));
  std::vector<std::unique_ptr<Path>> paths;
  Workload w = SmallDispatch();
  for (int g = 0; g < guests; ++g) {
    paths.push_back(MakeNativePathOn(shared));
    VG_TRY(paths.back()->Prepare(w));
    VG_TRY(paths.back()->RunOnce());  // warm: the pipeline is built before the clock starts
  }
  std::atomic<bool> failed{false};
  const double cpu0 = SelfCpuUs();
  auto t0 = Clock::now();
  std::vector<std::thread> ts;
  for (auto& p : paths)
    ts.emplace_back([&, pp = p.get()] {
      for (int i = 0; i < iters; ++i)
        if (!pp->RunOnce().ok()) failed = true;
    });
  for (auto& t : ts) t.join();
  double s = std::chrono::duration<double>(Clock::now() - t0).count();
  const double cpu = SelfCpuUs() - cpu0;  // the submitters and the engine's threads
  VG_ERROR_IF(failed.load(), Errc::kInternal, "a native submitter failed");
  const double subs = static_cast<double>(guests) * iters;
  return ConcurrentRun{subs / s, cpu / subs};
}

const Cell* CellOf(const StudyReport& r, const std::string& group, const std::string& path, double min_x = -1,
                   const Result_** res_out = nullptr) {
  for (const Result_& res : r.results) {
    if (res.workload.group != group || res.workload.x < min_x) continue;
    for (const Cell& c : res.cells)
      if (c.path == path) {
        if (res_out) *res_out = &res;
        return &c;
      }
  }
  return nullptr;
}

void Summarize(StudyReport& r, const std::vector<std::string>& paths) {
  auto has = [&](const std::string& p) { return std::find(paths.begin(), paths.end(), p) != paths.end(); };
  std::vector<std::string>& s = r.summary;
  // Target 1 and 3: throughput ratios for work of 1 ms and more, read only from rows whose
  // calibration held (docs/ab-methodology.md, "Calibration check").
  const CalibrationReport& cal = r.calibration;
  auto calibration_failed = [&](const Result_& res) {
    const CalibratedRow* row = cal.Row(res.workload.name);
    return res.workload.group == "kernel_time" && row && !row->ok();
  };
  for (const std::string p : {"mediated", "remoting"}) {
    if (!has(p)) continue;
    Ratio worst;
    std::string worst_row;
    int n = 0;
    std::vector<std::string> left_out;
    for (const Result_& res : r.results) {
      // "Work of 1 ms and more" is what native measured, not what the calibration aimed at.
      const Cell* native = FindCell(res, "native");
      if (res.workload.group != "kernel_time" || !native || native->us.p50 < 1000) continue;
      if (calibration_failed(res)) {
        left_out.push_back(res.workload.name);
        continue;
      }
      for (const Cell& c : res.cells)
        if (c.path == p && c.throughput_ratio.n) {
          if (!n || c.throughput_ratio.median < worst.median) {
            worst = c.throughput_ratio;
            worst_row = res.workload.name;
          }
          ++n;
        }
    }
    double target = p == std::string("mediated") ? 0.98 : 0.90;
    std::string excluded =
        left_out.empty() ? "" : fmt::format(" ({} left out: CALIBRATION FAILED)", fmt::join(left_out, ", "));
    // The key does not depend on which row was worst: two runs compare the target itself.
    if (cal.ran)
      AddFigure(r, fmt::format("target.{}/native.throughput.work_1ms", p), worst, "ratio",
                "the worst kernel_time row >= 1 ms: native time / path time, per repetition");
    if (n)
      s.push_back(fmt::format("{}/native throughput for work >= 1 ms: worst median {} [min-max over reps] ({}; "
                              "target >= {:.2f}): {}{}",
                              p, RatioText(worst), worst_row, target, worst.median >= target ? "MET" : "MISSED",
                              excluded));
    else if (cal.ran)
      // Said, not skipped: a run whose rows held no such work has not shown the target either way.
      s.push_back(fmt::format("{}/native throughput for work >= 1 ms: NOT EVALUATED: no kernel_time row with a native "
                              "p50 of 1 ms or more and its calibration held{}",
                              p, excluded));
  }
  // Target 2: mediated empty-submission overhead against the eventfd round trip.
  const Cell* me = CellOf(r, "empty", "mediated");
  const Cell* ne = CellOf(r, "empty", "native");
  if (me && ne) {
    const Ratio over = PairedDifference(me->rep_p50_us, ne->rep_p50_us);
    const double limit = 1.2 * r.floors.eventfd_rtt_us.p50;
    AddFigure(r, "target.mediated_empty_over_native_us", over, "us", "p50 mediated - p50 native, empty, per repetition");
    s.push_back(fmt::format("mediated empty-submission latency over native: {} us [min-max over reps]; 1.2 x eventfd "
                            "round trip = {:.1f} us: {}",
                            RatioText(over, 1), limit, over.n && over.median <= limit ? "MET" : "MISSED"));
  }
  // Target 3b: crossings per fire-and-forget submission.
  for (const std::string p : {"mediated", "remoting"}) {
    const Cell* c = CellOf(r, "stream", p);
    if (!c) continue;
    const Ratio crossings = SummarizeRatio(c->rep_crossings);
    AddFigure(r, fmt::format("stream.{}.crossings_per_submission", p), crossings, "crossings",
              "messages + doorbells + interrupts + replies per submission, per repetition");
    s.push_back(fmt::format("{}: {} boundary crossings per fire-and-forget submission [min-max over reps]{}", p,
                            RatioText(crossings), p == std::string("remoting")
                                                      ? (crossings.n && crossings.median <= 1.0 ? " (target <= 1: MET)"
                                                                                                : " (target <= 1: MISSED)")
                                                      : ""));
  }
  // Who wins where, counted over every row (the verdicts below read them per class, with spreads).
  if (has("mediated") && has("remoting")) {
    int med_lat = 0, rem_lat = 0, med_cpu = 0, rem_cpu = 0, miscalibrated = 0;
    for (const Result_& res : r.results) {
      if (calibration_failed(res)) {
        ++miscalibrated;
        continue;
      }
      const Cell *m = nullptr, *x = nullptr;
      for (const Cell& c : res.cells) {
        if (c.path == "mediated") m = &c;
        if (c.path == "remoting") x = &c;
      }
      if (!m || !x || !m->us.n || !x->us.n) continue;
      (m->us.p50 <= x->us.p50 ? med_lat : rem_lat)++;
      (m->host_cpu_us + m->guest_cpu_us <= x->host_cpu_us + x->guest_cpu_us ? med_cpu : rem_cpu)++;
    }
    s.push_back(fmt::format("lower p50 latency: mediated in {} cases, remoting in {}; lower CPU per submission: "
                            "mediated in {}, remoting in {}{}",
                            med_lat, rem_lat, med_cpu, rem_cpu,
                            miscalibrated ? fmt::format(" ({} kernel_time rows left out: CALIBRATION FAILED)", miscalibrated)
                                          : std::string()));
  }
  // A lifecycle-only run has no row to judge.
  if (!r.results.empty() || !r.concurrency.empty()) {
    SummarizeVerdicts(r, paths);
    SummarizeAblations(r);
  }
  // mediated-qemu: what a VM under QEMU pays, read against the qtest floor (ab-methodology).
  const NamedStats* qfloor = nullptr;
  for (const NamedStats& f : r.floors.path_floors)
    if (f.name.rfind("mediated-qemu: qtest writel", 0) == 0) qfloor = &f;
  for (const std::string g : {"empty", "small"}) {
    const Cell* q = CellOf(r, g, "mediated-qemu");
    if (!q || !qfloor || !q->us.n) continue;
    const Cell* m = CellOf(r, g, "mediated");
    const Cell* mm = CellOf(r, g, "mediated-mmio");
    s.push_back(fmt::format(
        "{} submission, p50: mediated (ioeventfd) {}, mediated-mmio {}, mediated-qemu {:.1f} us with {:.2f} qtest "
        "commands per submission at a floor of {:.1f} us each: {:.1f} us beyond the qtest hops",
        g, m ? fmt::format("{:.1f} us", m->us.p50) : std::string("-"),
        mm ? fmt::format("{:.1f} us", mm->us.p50) : std::string("-"), q->us.p50, q->messages, qfloor->us.p50,
        q->us.p50 - q->messages * qfloor->us.p50));
  }
  SummarizeSched(r.sched, s);
  if (r.lifecycle.ran) {
    const LifecycleReport& l = r.lifecycle;
    s.push_back(fmt::format("lifecycle: start p50 {:.1f} ms, p99 {:.1f} ms to the reply; {:.1f} ms p50 until VERSION "
                            "is answered; an idle worker holds {:.1f} MiB RSS, {:.1f} MiB PSS (mean of {}); the "
                            "supervisor {:.1f} MiB RSS",
                            l.start_reply_us.p50 / 1e3, l.start_reply_us.p99 / 1e3, l.start_to_version_us.p50 / 1e3,
                            l.rss.mean / 1048576.0, l.pss.mean / 1048576.0, l.idle.size(),
                            static_cast<double>(l.supervisor.rss_bytes) / 1048576.0));
    if (!l.complete())
      s.push_back(fmt::format("LIFECYCLE INCOMPLETE: {} of {} cycles, {} of {} idle workers; {}", l.succeeded_cycles,
                              l.requested_cycles, l.idle.size(), l.idle_requested,
                              l.errors.empty() ? std::string("no error recorded") : l.errors.front()));
  }
  if (r.covert.ran) {
    for (const CovertRun& c : r.covert.runs)
      if (!c.error.empty())
        s.push_back(fmt::format("COVERT RUN FAILED: {} under {} at granularity {} us, rep {}: {}", c.path, c.policy,
                                c.granularity_us, c.rep + 1, c.error));
    for (const CovertCell& c : r.covert.cells) {
      if (!c.runs) continue;
      s.push_back(fmt::format("covert channel, {}, {}, time granularity {}: {:.1f} bit/s raw, BER {:.3f} ({} of {} "
                              "bits over {} runs), capacity {:.1f} bit/s (per run {:.1f} [{:.1f}-{:.1f}]); receiver "
                              "p50 round trip {:.1f} us",
                              c.path, c.policy, c.granularity_us ? fmt::format("{} us", c.granularity_us) : std::string("off"),
                              c.raw_bps, c.ber, c.errors, c.payload_bits, c.runs, c.capacity_bps,
                              c.capacity_per_rep.median, c.capacity_per_rep.min, c.capacity_per_rep.max,
                              c.rtt_p50_us));
    }
  }
  for (const DesktopCell& c : r.desktop.cells) {
    if (!c.error.empty()) {
      s.push_back(fmt::format("DESKTOP RUN FAILED: {}: {}", c.path, c.error));
      continue;
    }
    s.push_back(fmt::format("desktop, {}: {} windows into {}x{}, frame p50 {:.0f} us, p99 {:.0f} us; {:.1f} frames/s "
                            "achieved{}",
                            c.path, r.desktop.windows, r.desktop.width, r.desktop.height, c.frame_us.p50,
                            c.frame_us.p99, c.fps,
                            c.path == "mediated"           ? " (one flip per frame, waited)"
                            : c.path == "mediated-limited" ? fmt::format(" under frame_limit {}", c.frame_limit)
                                                           : std::string()));
    // The limiter may give less on a loaded host (a late frame clock costs frames), never more.
    if (c.frame_limit && c.fps > c.frame_limit * 1.1)
      s.push_back(fmt::format("FRAME LIMIT NOT HELD: {} frames/s under frame_limit {}", c.fps, c.frame_limit));
  }
  if (!r.all_correct) s.push_back("SOME RESULTS DIFFER FROM THE CPU REFERENCE (see the ok column)");
  if (!cal.ok())
    s.push_back(fmt::format("CALIBRATION FAILED: {} of {} kernel_time rows do not hold the work their targets say (see "
                            "the calibration section): {}",
                            std::count_if(cal.rows.begin(), cal.rows.end(), [](const CalibratedRow& x) { return !x.ok(); }),
                            cal.rows.size(), fmt::join(cal.failures, "; ")));
}

std::set<std::string> Split(const std::string& csv) {
  std::set<std::string> out;
  size_t at = 0;
  while (at <= csv.size() && !csv.empty()) {
    size_t comma = csv.find(',', at);
    out.insert(csv.substr(at, comma == std::string::npos ? std::string::npos : comma - at));
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  return out;
}

int Emit(const StudyReport& r, const StudyOptions& o, bool smoke, const std::string& json_file,
         const std::string& csv_file);

}  // namespace

// vgpud's --sched policies that schedule (and "off", which does not): vgpu-bench does not
// link the daemon, so its names are here.
const std::vector<std::string> kScheduledPolicies{"best-effort", "equal-share", "fixed-share", "partitioned"};

int main(int argc, char** argv) {
  // A tenant of the scheduler groups (fairness.h), started by this program itself.
  if (IsSchedTenant(argc, argv)) return SchedTenantMain(argc, argv);
  CLI::App app{"vgpu-bench: native vs mediated vs remoting, side by side"};
  bool quick = false, full = false, smoke = false;
  std::string groups, paths_csv = "native,mediated,remoting", gpu, vgpud, json_file, csv_file;
  const char* env_qemu = std::getenv("VGPUD_QEMU");
  const char* env_fw = std::getenv("VGPUD_QEMU_FIRMWARE");
  std::string qemu = env_qemu ? env_qemu : "", qemu_firmware = env_fw ? env_fw : "";
  StudyOptions o;
  // Worker mode (internal): one guest of a concurrency run.
  std::string worker, socket, remote_socket;
  int worker_iters = 0, ready_fd = -1, go_fd = -1;
  uint64_t guest_ram_mib = 0;
  app.add_flag("--quick", quick, "a few minutes on 2 cores (default)");
  app.add_flag("--full", full, "every size and kernel time");
  app.add_flag("--smoke", smoke, "tiny sizes and few repetitions (the test suite's run)");
  app.add_option("--groups", groups,
                 "only these workload groups: empty,small,kernel_time,cmds,data,churn,stream,concurrency,lifecycle,"
                 "covert,desktop; fairness,noisy only when named here");
  app.add_option("--paths", paths_csv, "paths to run (native is always the baseline)")->capture_default_str();
  app.add_option("--reps", o.reps, "interleaved repetitions per workload")->capture_default_str();
  app.add_option("--iters", o.iters, "submissions per path per repetition (default by size)");
  app.add_option("--gpu", gpu, "Vulkan device for the engine (daemon and native)");
  app.add_option("--vgpud", vgpud, "the vgpud binary (default: next to this one)");
  app.add_option("--out", o.out_dir, "directory for JSON, CSV, plots and the report")->capture_default_str();
  app.add_option("--json", json_file, "also write the JSON here");
  app.add_option("--csv", csv_file, "also write the CSV here");
  app.add_option("--qemu", qemu, "qemu-system-x86_64 with vfio-user-pci, for mediated-qemu (default: $VGPUD_QEMU)");
  app.add_option("--qemu-firmware", qemu_firmware, "QEMU's -L firmware dir (default: $VGPUD_QEMU_FIRMWARE)");
  std::string gtt = "ring";
  app.add_option("--gtt", gtt,
                 "mediated paths: GTT updates in the ring (GTT_UPDATE), by batch (GTT_BATCH_GO), multi "
                 "(REGION_WRITE_MULTI) or per-entry")
      ->capture_default_str();
  std::string ablations_csv = "doorbell,executor,memory,gtt,remoting,scheduler", compare_with;
  app.add_option("--ablations", ablations_csv,
                 "ablation row groups to run beside the paths: doorbell,executor,memory,gtt,remoting,scheduler, or none")
      ->capture_default_str();
  app.add_option("--compare-with", compare_with,
                 "an earlier run's results.json: report where this run's summary figures agree with it (exit 1 if "
                 "the two differ in structure)");
  uint32_t fairness_in_flight = 0;
  app.add_option("--fairness-in-flight", fairness_in_flight,
                 "fairness: spin dispatches each busy tenant keeps submitted (default 8)");
  int lifecycle_cycles = 0, idle_workers = -1;
  app.add_option("--lifecycle-cycles", lifecycle_cycles,
                 "lifecycle: measured start/stop cycles after 3 warm-up ones (default 5 smoke, 30 quick, 100 full)");
  app.add_option("--idle-workers", idle_workers, "lifecycle: vGPUs left idle for the memory figures (default 4)");
  int covert_bits = 0;
  double covert_bit_us = 10000;
  std::string covert_granularities =
      fmt::format("0,{}", abi::cmd::kDefaultTimeGranularityNs / 1000);
  app.add_option("--covert-bits", covert_bits, "covert: random bits per run (default 16 smoke, 64 quick, 128 full)");
  int covert_reps = 0;
  app.add_option("--covert-reps", covert_reps, "covert: runs per path and granularity (default 1 smoke, 3 quick, 5 full)");
  app.add_option("--covert-bit-us", covert_bit_us, "covert: the bit period in us")->capture_default_str();
  double covert_probe_us = 0;
  app.add_option("--covert-probe-us", covert_probe_us,
                 "covert: the receiver's work, 0: a 4 KiB copy; else a spin of about this many us")
      ->capture_default_str();
  std::string sched_policy = "best-effort";
  app.add_option("--sched-policy", sched_policy,
                 "fairness, noisy: the scheduled daemon's --sched (the baseline stays off); the targets are "
                 "best-effort's")
      ->check(CLI::IsMember(kScheduledPolicies))
      ->capture_default_str();
  std::string covert_sender = "load";
  app.add_option("--covert-sender", covert_sender,
                 "covert: the sender's busy symbol: load (spins back to back) or overrun (one piece nothing can cut, "
                 "longer than a time slot)")
      ->check(CLI::IsMember({"load", "overrun"}))
      ->capture_default_str();
  double covert_overrun_us = 0;
  app.add_option("--covert-overrun-us", covert_overrun_us,
                 "covert: the overrun sender's piece in us (0: 0.4 of a bit)")
      ->check(CLI::Range(0.0, 100000.0));
  std::string covert_policies = "best-effort,partitioned";
  app.add_option("--covert-policies", covert_policies,
                 "covert: one vgpud per --sched policy (and granularity): best-effort, partitioned, ...")
      ->capture_default_str();
  app.add_option("--covert-granularities-us", covert_granularities,
                 "covert: one vgpud per --time-granularity-us value (0: coarsening off)")
      ->capture_default_str();
  std::string covert_send, covert_bit_string;
  app.add_option("--covert-send", covert_send)->group("");
  app.add_option("--covert-bit-string", covert_bit_string)->group("");
  app.add_option("--worker", worker)->group("");
  app.add_option("--socket", socket)->group("");
  app.add_option("--remote-socket", remote_socket)->group("");
  app.add_option("--ready-fd", ready_fd)->group("");
  app.add_option("--go-fd", go_fd)->group("");
  app.add_option("--guest-ram-mib", guest_ram_mib)->group("");
  app.add_option("--worker-iters,--iters-worker", worker_iters)->group("");
  app.add_flag("--test-disturb-calibration", o.disturb_calibration)->group("");
  CLI11_PARSE(app, argc, argv);
  SetLogLevel(LogLevel::kError);

  if (!worker.empty()) {
    PathConfig c{socket, remote_socket, 0, gpu};
    if (guest_ram_mib) c.guest_ram = guest_ram_mib << 20;
    return Worker(worker, c, o.iters, ready_fd, go_fd);
  }
  if (!covert_send.empty()) {
    PathConfig c{socket, remote_socket, 0, gpu};
    if (guest_ram_mib) c.guest_ram = guest_ram_mib << 20;
    return CovertSender(covert_send, c, covert_bit_string, covert_bit_us, ready_fd, go_fd, covert_sender,
                        covert_overrun_us);
  }
  (void)worker_iters;

  o.size = smoke ? StudyOptions::Size::kSmoke : full ? StudyOptions::Size::kFull : StudyOptions::Size::kQuick;
  if (smoke) o.reps = std::min(o.reps, 2);
  o.groups = Split(groups);
  bool want_concurrency = o.groups.empty() || o.groups.count("concurrency");
  const bool want_lifecycle = o.groups.empty() || o.groups.count("lifecycle");
  const bool want_covert = o.groups.empty() || o.groups.count("covert");
  const bool want_desktop = o.groups.empty() || o.groups.count("desktop");
  // The scheduler groups cost minutes and daemons of their own: only when named.
  const bool want_fairness = o.groups.count("fairness") > 0, want_noisy = o.groups.count("noisy") > 0;
  // Everything but lifecycle, covert and the scheduler groups needs the study's daemon, its
  // floors and its calibration.
  const bool want_study = o.groups.empty() || o.groups.size() > o.groups.count("lifecycle") + o.groups.count("covert") + o.groups.count("desktop") +
                                                                     want_fairness + want_noisy;
  std::vector<std::string> paths{"native"};
  std::vector<std::string> skipped;
  for (const auto& p : Split(paths_csv)) {
    if (p == "native") continue;
    if (p == "mediated-qemu" && qemu.empty()) {
      // Loud, in the report too: a run that silently lost a path reads as complete.
      std::fprintf(stderr,
                   "vgpu-bench: NOTE: path mediated-qemu SKIPPED: no QEMU (set VGPUD_QEMU or --qemu; ./run.sh vm "
                   "builds one)\n");
      skipped.push_back("mediated-qemu SKIPPED: no QEMU (set VGPUD_QEMU or --qemu; ./run.sh vm builds one)");
      continue;
    }
    paths.push_back(p);
  }
  if (vgpud.empty()) vgpud = (fs::read_symlink("/proc/self/exe").parent_path() / "vgpud").string();
  if (!KnownGttMode(gtt)) {
    std::fprintf(stderr, "vgpu-bench: --gtt %s is not ring, batch, multi or per-entry\n", gtt.c_str());
    return 2;
  }
  std::set<std::string> which_ablations = Split(ablations_csv);
  which_ablations.erase("none");
  for (const auto& a : which_ablations)
    if (std::find(kAblations.begin(), kAblations.end(), a) == kAblations.end()) {
      std::fprintf(stderr, "vgpu-bench: --ablations: unknown '%s' (doorbell, executor, memory, gtt, remoting, none)\n", a.c_str());
      return 2;
    }
  std::map<std::string, Variant> variants;
  o.ablations = PlanAblations(which_ablations, gtt, paths, variants);
  // An ablation whose groups are all filtered out (--groups) makes no rows and needs no vgpud.
  std::erase_if(o.ablations, [&](const Ablation& a) {
    return !o.groups.empty() &&
           std::none_of(a.groups.begin(), a.groups.end(), [&](const std::string& g) { return o.groups.count(g) > 0; });
  });
  std::erase_if(variants, [&](const auto& v) {
    return std::none_of(o.ablations.begin(), o.ablations.end(), [&](const Ablation& a) {
      return std::any_of(a.rows.begin(), a.rows.end(), [&](const AblationRow& r) { return r.path == v.first; });
    });
  });
  // A base path that is also a variant (mediated-mmio) is one guest, made the variant's way.
  for (const auto& p : paths)
    if (p == "mediated-mmio" && !variants.count(p)) variants[p] = {Host::kMain, Doorbell::kSyncMmio, ""};

  std::string device = "unknown";
  if (auto list = engine::Engine::ListDevices(); list.ok()) {
    engine::EngineOptions eo;
    eo.gpu = gpu;
    if (auto e = engine::Engine::Create(eo); e.ok()) device = (*e)->Info().name + " (" + (*e)->Info().driver_name + ")";
  }

  // Lifecycle first, on a daemon of its own with no vGPU of the study's: the supervisor's
  // memory is then its own plus the lifecycle vGPUs', and no study worker shares the cores.
  LifecycleReport lifecycle;
  if (want_lifecycle) {
    auto ld = StartDaemon(vgpud, {}, gpu, "-lifecycle");
    if (!ld.ok()) {
      std::fprintf(stderr, "vgpu-bench: lifecycle: %s\n", ld.error().ToString().c_str());
      return 3;
    }
    LifecycleOptions lo;
    lo.control = (*ld)->Control();
    lo.supervisor = (*ld)->pid;
    lo.cycles = lifecycle_cycles > 0 ? lifecycle_cycles : smoke ? 5 : full ? 100 : 30;
    lo.idle_workers = idle_workers >= 0 ? idle_workers : 4;
    lo.progress = o.progress;
    lifecycle = MeasureLifecycle(lo);
  }
  // Covert next, before the study's daemons exist: per granularity a vgpud of its own with two
  // vGPUs, the sender's and the receiver's (docs/ab-methodology.md "Covert channel").
  CovertReport covert;
  if (want_covert) {
    CovertOptions co;
    for (const std::string p : {"mediated", "remoting"})
      if (std::find(paths.begin(), paths.end(), p) != paths.end()) co.paths.push_back(p);
    for (const auto& g : Split(covert_granularities)) {
      uint64_t v = 0;
      if (std::from_chars(g.data(), g.data() + g.size(), v).ec != std::errc{} ||
          v > abi::cmd::kMaxTimeGranularityNs / 1000) {
        std::fprintf(stderr, "vgpu-bench: --covert-granularities-us: '%s' is not a granularity in us\n", g.c_str());
        return 2;
      }
      co.granularities_us.push_back(v);
    }
    std::sort(co.granularities_us.begin(), co.granularities_us.end());
    co.policies.clear();
    for (const auto& p : Split(covert_policies)) {
      if (p != "off" && std::find(kScheduledPolicies.begin(), kScheduledPolicies.end(), p) == kScheduledPolicies.end()) {
        std::fprintf(stderr, "vgpu-bench: --covert-policies: '%s' is not a vgpud --sched policy\n", p.c_str());
        return 2;
      }
      co.policies.push_back(p);
    }
    co.bits = covert_bits > 0 ? covert_bits : smoke ? 16 : full ? 128 : 64;
    co.reps = covert_reps > 0 ? covert_reps : smoke ? 1 : full ? 5 : 3;
    co.bit_us = covert_bit_us;
    co.probe_us = covert_probe_us;
    co.sender = covert_sender;
    co.overrun_us = covert_overrun_us;
    co.progress = o.progress;
    auto make_host = [&](uint64_t g_us, const std::string& policy) -> Result<CovertHost> {
      VG_TRY_ASSIGN(auto cd, StartDaemon(vgpud, {"small", "small"}, gpu, fmt::format("-covert-{}-{}", policy, g_us),
                                         {"--time-granularity-us", std::to_string(g_us), "--sched", policy}));
      std::shared_ptr<DaemonProc> keep(std::move(cd));
      CovertHost h;
      h.sender = PathConfig{keep->Socket(0), keep->RemoteSocket(0), keep->pid, gpu, co.guest_ram};
      h.receiver = PathConfig{keep->Socket(1), keep->RemoteSocket(1), keep->pid, gpu, co.guest_ram};
      h.keep = keep;
      return h;
    };
    covert = MeasureCovert(co, make_host);
  }
  // Desktop next, on a vgpud of its own: one vGPU for the mediated guest, one for the remoting
  // one (docs/ab-methodology.md "Desktop").
  DesktopReport desktop;
  if (want_desktop) {
    DesktopOptions dopt;
    dopt.paths.clear();
    for (const std::string p : {"native", "mediated", "remoting"})
      if (std::find(paths.begin(), paths.end(), p) != paths.end()) dopt.paths.push_back(p);
    if (std::find(paths.begin(), paths.end(), "mediated") != paths.end()) dopt.paths.push_back("mediated-limited");
    if (smoke) {
      dopt.width = 320, dopt.height = 200, dopt.frames = 20;
    } else if (full) {
      dopt.width = 1280, dopt.height = 720, dopt.frames = 600;
    }
    dopt.progress = o.progress;
    desktop = MeasureDesktop(
        dopt,
        [&]() -> Result<DesktopHost> {
          VG_TRY_ASSIGN(auto dd, StartDaemon(vgpud, {"small", "small", "small"}, gpu, "-desktop"));
          std::shared_ptr<DaemonProc> keep(std::move(dd));
          // The third vGPU's frame limit, set live as an operator would (vgpuctl modify --live).
          VG_TRY_ASSIGN(nlohmann::json m,
                        ControlRequest(keep->Control(),
                                       nlohmann::json{{"op", "modify"},
                                                      {"uuid", GuestUuid(2)},
                                                      {"live", true},
                                                      {"addattrs", nlohmann::json::array({nlohmann::json{
                                                                       {"frame_limit", std::to_string(dopt.frame_limit)}}})}},
                                       10000));
          VG_ERROR_IF(!m.value("ok", false), Errc::kInternal, "setting frame_limit: {}", m.dump());
          return DesktopHost{PathConfig{keep->Socket(0), keep->RemoteSocket(0), keep->pid, gpu, dopt.guest_ram},
                             PathConfig{keep->Socket(1), keep->RemoteSocket(1), keep->pid, gpu, dopt.guest_ram},
                             PathConfig{keep->Socket(2), keep->RemoteSocket(2), keep->pid, gpu, dopt.guest_ram}, keep};
        },
        gpu);
  }
  // The scheduler groups next, before the study's daemons exist: two vgpuds of their own,
  // --sched weighted and --sched off, whose vGPUs they start and stop (fairness.h).
  SchedReport sched;
  if (want_fairness || want_noisy) {
    SchedOptions so;
    so.fairness = want_fairness;
    so.noisy = want_noisy;
    so.gpu = gpu;
    so.progress = o.progress;
    if (fairness_in_flight) so.in_flight = fairness_in_flight;
    so.policy = sched_policy;
    if (smoke) {
      so.tenant_counts = {2, 4};
      so.heavy_counts = {0, 1};
      so.warmup_s = 0.3;
      so.measure_s = so.noisy_s = 1.0;
    } else if (full) {
      so.measure_s = so.noisy_s = 10.0;
    }
    sched = MeasureSched(so, [&](bool weighted, uint64_t slice_us) -> Result<SchedDaemon> {
      std::vector<std::string> flags{"--sched", weighted ? so.policy : "off"};
      if (weighted) flags.insert(flags.end(), {"--sched-slice-us", std::to_string(slice_us)});
      VG_TRY_ASSIGN(auto sd, StartDaemon(vgpud, {}, gpu, weighted ? "-sched-weighted" : "-sched-off", flags));
      std::shared_ptr<DaemonProc> keep(std::move(sd));
      return SchedDaemon{keep->Control(), keep->pid, keep};
    });
  }
  if (!want_study) {
    StudyReport report;
    report.device = device;
    report.lifecycle = std::move(lifecycle);
    report.covert = std::move(covert);
    report.desktop = std::move(desktop);
    report.sched = std::move(sched);
    Summarize(report, {});
    return Emit(report, o, smoke, json_file, csv_file);
  }

  int guests = want_concurrency ? (smoke ? 2 : o.size == StudyOptions::Size::kFull ? 8 : 4) : 1;
  // The first vGPU carries the data workloads: its GTT must map every buffer at once.
  std::string type0 = o.size == StudyOptions::Size::kFull ? "large" : "medium";
  // Each mediated variant is its own guest (a vGPU takes one client): vGPUs after the
  // concurrency guests, of the first one's type, since they run the same workloads.
  std::vector<std::string> types(static_cast<size_t>(guests), "small");
  types[0] = type0;
  // Every other mediated guest is a vGPU of its own, of the first one's type, since it runs
  // the same workloads: on the main vgpud after the concurrency guests, or on the vgpud of
  // its host (the executor and memory ablations' switches are vgpud-wide).
  std::map<std::string, int> guest_of{{"mediated", 0}};
  std::map<Host, std::vector<std::string>> host_types;
  for (const auto& p : paths)
    if (p == "mediated-qemu") {
      guest_of[p] = static_cast<int>(types.size());
      types.push_back(type0);
    }
  for (const auto& [name, v] : variants) {
    std::vector<std::string>& t = v.host == Host::kMain ? types : host_types[v.host];
    guest_of[name] = static_cast<int>(t.size());
    t.push_back(type0);
  }
  // The scheduler ablation also runs the concurrency rows on its vgpuds (unscheduled, and
  // two grants at once): the guests after its first on each, as on the main one.
  const bool sched_concurrency_rows = want_concurrency && variants.count("mediated-sched-off");
  if (sched_concurrency_rows)
    for (const auto& [name, host] : kSchedulerHosts) host_types[host].resize(static_cast<size_t>(guests), "small");
  uint64_t ram = o.size == StudyOptions::Size::kFull ? (1536ull << 20) : o.size == StudyOptions::Size::kSmoke ? (32ull << 20) : (160ull << 20);
  // The A/B study measures the paths with time coarsening off (docs/ab-methodology.md).
  const std::vector<std::string> no_coarsening{"--time-granularity-us", "0"};
  auto daemon = StartDaemon(vgpud, types, gpu, "", no_coarsening);
  if (!daemon.ok()) {
    std::fprintf(stderr, "vgpu-bench: %s\n", daemon.error().ToString().c_str());
    return 3;
  }
  const DaemonProc& d = **daemon;
  std::map<Host, std::unique_ptr<DaemonProc>> hosts;
  for (const auto& [host, t] : host_types) {
    struct HostFlags {
      const char* suffix;
      const char* ablation;
      std::vector<std::string> args;
    };
    const HostFlags f = host == Host::kSerial        ? HostFlags{"-serial", "executor", {"--executor-depth", "1", "--time-granularity-us", "0"}}
                        : host == Host::kUncoalesced ? HostFlags{"-uncoalesced", "executor", {"--no-coalesce", "--time-granularity-us", "0"}}
                        : host == Host::kNoInline    ? HostFlags{"-no-inline", "executor", {"--no-inline-complete", "--time-granularity-us", "0"}}
                        : host == Host::kSchedOff    ? HostFlags{"-sched-off", "scheduler", {"--sched", "off", "--time-granularity-us", "0"}}
                        : host == Host::kSchedShared ? HostFlags{"-sched-shared", "scheduler", {"--sched-concurrency", "2", "--time-granularity-us", "0"}}
                        : host == Host::kGtt         ? HostFlags{"-gtt", "gtt", {"--time-granularity-us", "0"}}
                                                     : HostFlags{"-gathered", "memory", {"--no-zero-copy", "--time-granularity-us", "0"}};
    auto hd = StartDaemon(vgpud, t, gpu, f.suffix, f.args);
    if (!hd.ok()) {
      std::fprintf(stderr, "vgpu-bench: the %s ablation's vgpud: %s\n", f.ablation, hd.error().ToString().c_str());
      return 3;
    }
    hosts[host] = std::move(*hd);
  }
  PathConfig base{d.Socket(0), d.RemoteSocket(0), d.pid, gpu, ram, qemu, qemu_firmware, gtt};
  auto factory = [&](const std::string& name, int) -> Result<std::unique_ptr<Path>> {
    PathConfig c = base;
    if (auto it = guest_of.find(name); it != guest_of.end()) {
      c.socket = d.Socket(it->second);
      c.remote_socket = d.RemoteSocket(it->second);
    }
    auto v = variants.find(name);
    if (v == variants.end()) return MakePath(name, c);
    if (v->second.remoting) {
      c.remoting_batch = v->second.batch;
      c.remoting_idle_notify = v->second.idle_notify;
      return MakeRemotingVariantPath(c, name);
    }
    if (v->second.host != Host::kMain) {
      const DaemonProc& h = *hosts.at(v->second.host);
      c.socket = h.Socket(guest_of.at(name));
      c.daemon = h.pid;
    }
    c.doorbell = v->second.doorbell;
    if (!v->second.gtt.empty()) c.gtt = v->second.gtt;
    return MakeMediatedVariantPath(c, name);
  };

  auto report = RunStudy(o, factory, paths, device);
  if (!report.ok()) {
    std::fprintf(stderr, "vgpu-bench: %s\n", report.error().ToString().c_str());
    return 1;
  }
  if (want_concurrency) {
    // Repetitions, interleaved like the rest (every path at every guest count, in an order
    // that rotates), so each ratio of the verdict has a spread.
    const int reps = smoke ? 2 : o.size == StudyOptions::Size::kFull ? 5 : 3;
    const int iters = smoke ? 10 : o.size == StudyOptions::Size::kFull ? 160 : 60;
    std::vector<int> counts = smoke ? std::vector<int>{1, 2} : o.size == StudyOptions::Size::kFull ? std::vector<int>{1, 2, 4, 8} : std::vector<int>{1, 2, 4};
    // The variants are ablations of the single-guest rows; concurrency compares the designs.
    std::vector<std::string> cpaths;
    for (const auto& p : paths)
      if (p == "native" || p == "mediated" || p == "remoting") cpaths.push_back(p);
    // Except the scheduler's: the same mediated guests on a --sched off vgpud and on one
    // with two grants at once, what the host scheduler's one-vGPU-at-a-time grants cost
    // guests that share the engine.
    std::map<std::string, Host> sched_rows;
    if (sched_concurrency_rows && std::count(cpaths.begin(), cpaths.end(), "mediated"))
      for (const auto& [name, host] : kSchedulerHosts) {
        cpaths.push_back(name);
        sched_rows[name] = host;
      }
    std::map<std::pair<std::string, int>, Concurrency> runs;
    std::set<std::pair<std::string, int>> failed;
    for (int r = 0; r < reps; ++r)
      for (int n : counts) {
        std::vector<std::string> order = cpaths;
        std::rotate(order.begin(), order.begin() + (r % order.size()), order.end());
        for (const auto& p : order) {
          if (failed.count({p, n})) continue;
          if (o.progress) std::fprintf(stderr, "\rvgpu-bench: concurrency rep %d: %s x%d   ", r + 1, p.c_str(), n);
          auto run = p == "native"          ? RunConcurrentThreads(base, n, iters)
                     : sched_rows.count(p) ? RunConcurrentProcesses("mediated", *hosts.at(sched_rows.at(p)), n, iters,
                                                                    32ull << 20)
                                           : RunConcurrentProcesses(p, d, n, iters, 32ull << 20);
          if (!run.ok()) {
            report->summary.push_back(fmt::format("concurrency {} x{}: {}", p, n, run.error().ToString()));
            report->all_correct = false;
            failed.insert({p, n});
            continue;
          }
          Concurrency& c = runs[{p, n}];
          c.rep_rate.push_back(run->rate);
          c.rep_cpu_us.push_back(run->cpu_us);
          if (run->device.measured) {
            c.rep_device_busy.push_back(run->device.busy);
            c.rep_grants_per_submission.push_back(run->device.grants_per_submission);
            c.rep_grant_wait_us.push_back(run->device.grant_wait_us);
          }
        }
      }
    if (o.progress) std::fprintf(stderr, "\n");
    for (const auto& p : cpaths)
      for (int n : counts) {
        if (failed.count({p, n}) || !runs.count({p, n})) continue;
        Concurrency c = runs[{p, n}];
        c.path = p;
        c.guests = static_cast<uint32_t>(n);
        c.submissions_per_s = SummarizeRatio(c.rep_rate).median;
        // Over 1 guest of the same path in the same repetition.
        if (!failed.count({p, 1}) && runs.count({p, 1})) c.speedup = PairedRatio(c.rep_rate, runs[{p, 1}].rep_rate).median;
        report->concurrency.push_back(std::move(c));
      }
  }
  report->lifecycle = std::move(lifecycle);
  report->covert = std::move(covert);
  report->desktop = std::move(desktop);
  report->sched = std::move(sched);
  Summarize(*report, paths);
  for (const auto& n : skipped) report->summary.push_back(n);
  if (!compare_with.empty()) {
    // Two-run agreement (docs/ab-methodology.md): this run's figures against an earlier one's.
    std::ifstream f(compare_with);
    const auto earlier = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
    report->compared = true;
    report->agreement = CompareRuns(earlier, ToJson(*report));
    report->agreement.earlier = compare_with;
    if (earlier.is_discarded())
      report->agreement.structural.insert(report->agreement.structural.begin(),
                                          fmt::format("{}: not a JSON file", compare_with));
  }
  const int rc = Emit(*report, o, smoke, json_file, csv_file);
  // Runs that differ in structure are not two runs of one study: said, and the run fails.
  return rc ? rc : report->compared && !report->agreement.structure_ok() ? 1 : 0;
}

namespace {

// Writes the report, JSON, CSVs (and plots unless smoke); the exit status of the run.
int Emit(const StudyReport& r, const StudyOptions& o, bool smoke, const std::string& json_file,
         const std::string& csv_file) {
  fs::create_directories(o.out_dir);
  std::string text = FormatReport(r);
  std::printf("%s", text.c_str());
  std::ofstream(o.out_dir + "/report.txt") << text;
  std::string js = ToJson(r).dump(2);
  std::ofstream(o.out_dir + "/results.json") << js;
  if (!json_file.empty()) std::ofstream(json_file) << js;
  std::string csv = ToCsv(r);
  std::ofstream(o.out_dir + "/results.csv") << csv;
  if (!csv_file.empty()) std::ofstream(csv_file) << csv;
  if (r.lifecycle.ran) std::ofstream(o.out_dir + "/lifecycle.csv") << LifecycleCsv(r.lifecycle);
  if (!smoke) {
    auto plots = WritePlots(r, o.out_dir);
    if (plots.ok())
      for (auto& p : *plots) std::printf("plot: %s\n", p.c_str());
    else
      std::fprintf(stderr, "vgpu-bench: %s\n", plots.error().ToString().c_str());
  }
  std::printf("results: %s/{report.txt,results.json,results.csv%s}\n", o.out_dir.c_str(),
              r.lifecycle.ran ? ",lifecycle.csv" : "");
  // A lifecycle run that lost cycles or idle workers is a failed run, like a wrong result, and
  // so is one whose kernel_time rows do not hold the work their targets say.
  // So is a covert run that failed (a sender or receiver that broke, a wrong result), and a
  // scheduler group with a failed precondition (fairness.h): their figures are not evidence.
  return StudyExitStatus(r.all_correct,
                         (!r.lifecycle.ran || r.lifecycle.complete()) && r.covert.complete() && r.sched.complete() &&
                             r.desktop.complete(),
                         r.calibration);
}

}  // namespace
