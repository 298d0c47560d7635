// vgpud: the supervisor. Manages vGPUs by UUID (mdev/): definitions in mdevctl's format,
// the live mdev tree and the control socket vgpuctl talks to; serves each running vGPU from
// its own sandboxed vgpud-worker process (docs/isolation.md).

#include <CLI/CLI.hpp>
#include <grp.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <charconv>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <unistd.h>

#include "tools/vgpud/metrics.h"
#include "abi/device.h"
#include "tools/vgpud/supervisor.h"
#include "tools/vgpud/pci.h"
#include "tools/vgpud/supervisor.h"
#include "tools/vgpud/service.h"

using namespace vg;
namespace fs = std::filesystem;

namespace {

// "4G", "512M", "65536K" or plain bytes.
Result<uint64_t> ParseSize(std::string_view s) {
  uint64_t mult = 1;
  if (!s.empty()) {
    switch (s.back()) {
      case 'K': case 'k': mult = 1ull << 10; break;
      case 'M': case 'm': mult = 1ull << 20; break;
      case 'G': case 'g': mult = 1ull << 30; break;
      case 'T': case 't': mult = 1ull << 40; break;
      default: break;
    }
    if (mult != 1) s.remove_suffix(1);
  }
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  VG_INVALID_IF(s.empty() || ec != std::errc() || p != s.data() + s.size() || v > (UINT64_MAX / mult),
                "'{}' is not a size (bytes, or a number with K/M/G/T)", s);
  return v * mult;
}

Result<gid_t> ParseGroup(const std::string& name) {
  if (group* g = ::getgrnam(name.c_str())) return g->gr_gid;
  gid_t v = 0;
  auto [p, ec] = std::from_chars(name.data(), name.data() + name.size(), v);
  VG_ERROR_IF(name.empty() || ec != std::errc() || p != name.data() + name.size(), Errc::kNotFound,
              "no group named '{}'", name);
  return v;
}

// systemd's readiness protocol (Type=notify) without libsystemd: one datagram to
// $NOTIFY_SOCKET ("@name" is an abstract socket). A no-op outside systemd.
void NotifySystemd(const char* state) {
  const char* path = std::getenv("NOTIFY_SOCKET");
  if (!path || (path[0] != '/' && path[0] != '@')) return;
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  const size_t len = std::strlen(path);
  if (len >= sizeof(a.sun_path)) return;
  std::memcpy(a.sun_path, path, len);
  if (a.sun_path[0] == '@') a.sun_path[0] = '\0';
  UniqueFd fd(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!fd.Valid()) return;
  (void)::sendto(fd.Get(), state, std::strlen(state), MSG_NOSIGNAL, reinterpret_cast<sockaddr*>(&a),
                 static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + len));
}

int Fail(int code, const Error& e) {
  std::fprintf(stderr, "vgpud: %s\n", e.ToString().c_str());
  return code;
}

// The worker binary installed beside this one.
fs::path DefaultWorkerBinary() {
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  return ec ? fs::path("vgpud-worker") : self.parent_path() / "vgpud-worker";
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"vgpud: mediated GPU virtualization daemon (supervisor)"};
  daemon::SupervisorOptions opts;
  daemon::WorkerPolicy& wp = opts.workers;
  std::string worker_binary = DefaultWorkerBinary().string(), restart = "on-failure", worker_memory = "2G";
  std::string gpu;
  uint32_t dma_max_regions = 1024;
  int unmap_timeout_ms = 4000;
  std::vector<std::string> vgpus;
  std::string log_level = "info";
  std::string root, types_file, budget = "4G", control, control_group, parent;
  std::string dma_client = "64G", dma_total = "64G";
  bool no_tree = false;
  std::string metrics;
  bool metrics_allow_remote = false;
  app.add_option("--runtime-dir", opts.runtime_dir, "where <uuid>.sock sockets are created")->capture_default_str();
  app.add_option("--vgpu", vgpus, "UUID[:TYPE] to start at launch, transient (repeatable; TYPE default small)");
  app.add_option("--root", root,
                 "mdev root: definitions in DIR/etc/mdevctl.d/<parent>, mdev tree at DIR/sys "
                 "(default: definitions under the runtime dir, no tree)");
  app.add_option("--types", types_file, "vGPU types file (JSON, docs/management.md); default: built-in types");
  app.add_option("--aperture-budget", budget, "device memory all running vGPUs may share (4G, 512M, bytes)")
      ->capture_default_str();
  app.add_option("--control", control, "control socket (default: <runtime-dir>/control.sock)");
  app.add_option("--control-group", control_group, "group (name or gid) allowed on the control socket besides root");
  app.add_flag("--no-mdev-tree", no_tree, "do not serve the mdev tree (no FUSE) even with --root");
  app.add_option("--parent", parent, "mdev parent name (default: the GPU's PCI address, else vgpud0)");
  app.add_option("--log-level", log_level, "debug|info|warn|error")->capture_default_str();
  app.add_option("--metrics", metrics,
                 "serve Prometheus metrics (GET /metrics) on PORT (127.0.0.1), HOST:PORT or [V6]:PORT; "
                 "port 0: any free port, see `vgpuctl status` (default: off)");
  app.add_flag("--metrics-allow-remote", metrics_allow_remote,
               "allow --metrics on a non-loopback address (the counters show every tenant's activity, "
               "unauthenticated: docs/management.md)");
  app.add_option("--dma-max-bytes", dma_client,
                 "guest memory (fd-backed DMA_MAP bytes) one client may map into its worker (64G, bytes)")
      ->capture_default_str();
  app.add_option("--dma-total-bytes", dma_total,
                 "guest memory all clients of one worker together may map (a worker serves one vGPU)")
      ->capture_default_str();
  app.add_option("--dma-max-regions", dma_max_regions, "DMA regions per client, charged until their last use")
      ->capture_default_str();
  app.add_option("--dma-unmap-timeout-ms", unmap_timeout_ms,
                 "a DMA_UNMAP whose memory is still in use is answered kBusy after this long")
      ->capture_default_str();
  app.add_option("--gpu", gpu, "Vulkan device: name substring or index (default: a GPU, else lavapipe)");
  app.add_option("--worker-binary", worker_binary, "the vgpud-worker program")->capture_default_str();
  app.add_option("--restart", restart, "when a worker ends unasked: on-failure (restart, bounded) or never")
      ->capture_default_str();
  app.add_option("--max-restarts", wp.max_restarts, "restarts within --restart-window-s before a vGPU is left failed")
      ->capture_default_str();
  app.add_option("--restart-window-s", wp.restart_window_s, "the window --max-restarts counts in")
      ->capture_default_str();
  app.add_option("--heartbeat-ms", wp.heartbeat_ms, "how often the supervisor pings each worker")
      ->capture_default_str();
  app.add_option("--watchdog-ms", wp.watchdog_ms, "a worker that has not answered a ping for this long is killed")
      ->capture_default_str();
  app.add_option("--worker-start-timeout-ms", wp.start_timeout_ms, "spawn to serving, at most")->capture_default_str();
  app.add_option("--worker-stop-grace-ms", wp.stop_grace_ms, "SIGTERM to SIGKILL when a vGPU stops")
      ->capture_default_str();
  app.add_option("--stop-request-timeout-ms", wp.stop_request_timeout_ms,
                 "a stopped vGPU's client has this long to release it after the device request (REQ) before it is "
                 "disconnected")
      ->check(CLI::Range(0, 600000))
      ->capture_default_str();
  app.add_option("--worker-memory", worker_memory,
                 "a worker's own memory besides its aperture and guest RAM (cgroup v2 memory.max, else RLIMIT_AS)")
      ->capture_default_str();
  app.add_option("--worker-cpu-percent", wp.cpu_percent, "cgroup v2 cpu.max of a worker, in % of one CPU (0: none)")
      ->capture_default_str();
  app.add_option("--worker-open-files", wp.open_files, "RLIMIT_NOFILE of a worker")->capture_default_str();
  bool no_seccomp = false, no_zero_copy = false, no_coalesce = false, no_inline = false;
  uint32_t executor_depth = 4;
  app.add_option("--executor-depth", executor_depth,
                 "engine submissions of one vGPU in flight at once (1: serial, the study's ablation)")
      ->check(CLI::Range(1, 16))
      ->capture_default_str();
  uint64_t time_granularity_us = abi::cmd::kDefaultTimeGranularityNs / 1000;
  app.add_option("--time-granularity-us", time_granularity_us,
                 "time a guest can read (TIMESTAMP, when fences, interrupts and remoting replies show) is "
                 "coarsened to multiples of this many us of CLOCK_MONOTONIC (0: off, for the study)")
      ->check(CLI::Range(uint64_t{0}, abi::cmd::kMaxTimeGranularityNs / 1000))
      ->capture_default_str();
  app.add_flag("--no-zero-copy", no_zero_copy,
               "the engine copies guest memory instead of importing it (the study's memory ablation)");
  app.add_flag("--no-coalesce", no_coalesce,
               "each plan's work gets its own engine submission even while the engine is saturated (the study's "
               "executor ablation)");
  app.add_flag("--no-inline-complete", no_inline,
               "a fence-only submission to an idle vGPU goes through the executor's threads instead of completing on "
               "the worker's loop, and a small engine submission is made by the submit thread instead of the loop "
               "(the study's executor ablation)");
  std::string sched_mode = "best-effort";
  uint64_t slice_us = 2000, yield_timeout_ms = 60000, idle_grace_us = 200;
  uint32_t sched_concurrency = 1;
  app.add_option("--sched", sched_mode,
                 "how vGPUs share the engine, in time slices: best-effort (busy vGPUs by sched_weight; "
                 "'weighted' is the same), equal-share (1/N each of N running, never more), fixed-share (1/the "
                 "type's max_instances each, never more), partitioned (a fixed rotation of time slots, one per "
                 "running vGPU of slice x sched_weight / 100, used by its owner or by nobody: no tenant's load "
                 "moves another's timing) or off (first come, first served)")
      ->check(CLI::IsMember({"best-effort", "weighted", "equal-share", "fixed-share", "partitioned", "off"}))
      ->capture_default_str();
  uint64_t partition_margin_us = 150;
  app.add_option("--sched-partition-margin-us", partition_margin_us,
                 "partitioned: the holder is preempted this long before its slot ends, and its worker fits its "
                 "pieces before then")
      ->check(CLI::Range(20, 10000))
      ->capture_default_str();
  app.add_option("--sched-slice-us", slice_us, "time slice: how long a vGPU may keep the engine once another waits")
      ->check(CLI::Range(100, 1000000))
      ->capture_default_str();
  app.add_option("--sched-idle-grace-us", idle_grace_us,
                 "a vGPU holding the engine while another waits gives it back after this long with nothing to run")
      ->check(CLI::Range(0, 100000))
      ->capture_default_str();
  app.add_option("--sched-concurrency", sched_concurrency,
                 "vGPUs that may hold the engine at once: 1 (the default) time-slices it; more let guests whose "
                 "work leaves the device idle between submissions overlap (each holder keeps one piece on the "
                 "device once others wait)")
      ->check(CLI::Range(1u, 16u))
      ->capture_default_str();
  app.add_option("--sched-yield-timeout-ms", yield_timeout_ms,
                 "a worker that has not yielded the engine this long after a preempt is killed")
      ->check(CLI::Range(100, 600000))
      ->capture_default_str();
  // F10: a VNC console per vGPU (docs/management.md "Display").
  bool no_vnc = false;
  std::string vnc_password_file;
  app.add_flag("--no-vnc", no_vnc, "serve no VNC console");
  app.add_option("--vnc-listen", wp.vnc_listen, "IPv4 address the VNC consoles listen on")->capture_default_str();
  app.add_option("--vnc-port", wp.vnc_port,
                 "first port of the VNC consoles (each vGPU takes the next free one); 0: the kernel picks one")
      ->capture_default_str();
  app.add_option("--vnc-password-file", vnc_password_file,
                 "a file whose first line (at most 8 bytes: VNC authentication) every console asks for");
  app.add_option("--orphan-grace-s", wp.orphan_grace_s,
                 "a worker whose supervisor died serves its guest on and waits to be adopted by a new vgpud; "
                 "without a client for this long it exits (the vGPU still comes back with the new vgpud)")
      ->check(CLI::Range(1u, 86400u))
      ->capture_default_str();
  app.add_flag("--no-seccomp", no_seccomp, "workers run without their system-call filter (debugging only)");
  // F7 (docs/management.md, "Fault health"): faults are refused or faulting commands, MMIO
  // refusals and remoting errors, counted per vGPU over a sliding window.
  daemon::FaultThresholds& ft = wp.faults;
  app.add_option("--fault-window-ms", ft.window_ms, "the sliding window fault rates are measured over")
      ->check(CLI::Range(10, 3600000))
      ->capture_default_str();
  app.add_option("--fault-throttle-per-s", ft.throttle_per_s,
                 "a vGPU at this many faults/s is throttled (0: never throttled nor quarantined)")
      ->capture_default_str();
  app.add_option("--fault-quarantine-per-s", ft.quarantine_per_s,
                 "a vGPU throttled for a whole window and still at this many faults/s is quarantined: its "
                 "submissions are refused (kQuarantined) until it is reset (0: never quarantined)")
      ->capture_default_str();
  app.add_option("--throttle-rate", ft.throttle_rate,
                 "submissions/s (mediated ring passes, remoting commands) a throttled vGPU gets (0: not slowed)")
      ->capture_default_str();
  app.add_option("--fault-quiet-ms", ft.quiet_ms, "a throttled vGPU is ok again after this long without a fault")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (log_level == "debug") SetLogLevel(LogLevel::kDebug);
  if (log_level == "warn") SetLogLevel(LogLevel::kWarn);
  if (log_level == "error") SetLogLevel(LogLevel::kError);
  wp.vnc = !no_vnc;
  if (!vnc_password_file.empty()) {
    std::ifstream in(vnc_password_file);
    if (!in || !std::getline(in, wp.vnc_password) || wp.vnc_password.empty() || wp.vnc_password.size() > 8)
      return Fail(2, Error{Errc::kInvalidArgument, "--vnc-password-file: the first line must hold 1 to 8 bytes"});
  }

  std::optional<daemon::MetricsEndpoint> metrics_endpoint;
  if (!metrics.empty()) {
    auto e = daemon::ParseMetricsAddress(metrics, metrics_allow_remote);
    if (!e) return Fail(2, e.error());
    metrics_endpoint = *e;
  } else if (metrics_allow_remote) {
    return Fail(2, Error{Errc::kInvalidArgument, "--metrics-allow-remote needs --metrics"});
  }
  auto dma_client_bytes = ParseSize(dma_client);
  if (!dma_client_bytes) return Fail(2, dma_client_bytes.error());
  auto dma_total_bytes = ParseSize(dma_total);
  if (!dma_total_bytes) return Fail(2, dma_total_bytes.error());
  auto worker_memory_bytes = ParseSize(worker_memory);
  if (!worker_memory_bytes) return Fail(2, worker_memory_bytes.error());
  auto policy = daemon::ParseRestartPolicy(restart);
  if (!policy) return Fail(2, policy.error());
  if (wp.heartbeat_ms < 10 || wp.watchdog_ms < 2 * wp.heartbeat_ms)
    return Fail(2, Error{Errc::kInvalidArgument, "--watchdog-ms must be at least twice --heartbeat-ms (>= 10)"});
  wp.binary = worker_binary;
  wp.restart = *policy;
  wp.memory_bytes = *worker_memory_bytes;
  wp.dma_max_bytes = *dma_client_bytes;
  wp.seccomp = !no_seccomp;
  std::vector<std::string> engine_args;
  if (!gpu.empty()) engine_args = {"--gpu", gpu};
  wp.worker_args = engine_args;
  for (std::string a : {std::string("--dma-total-bytes"), std::to_string(*dma_total_bytes),
                        std::string("--dma-max-regions"), std::to_string(dma_max_regions),
                        std::string("--dma-unmap-timeout-ms"), std::to_string(unmap_timeout_ms),
                        std::string("--log-level"), log_level, std::string("--executor-depth"),
                        std::to_string(executor_depth), std::string("--time-granularity-us"),
                        std::to_string(time_granularity_us)})
    wp.worker_args.push_back(std::move(a));
  if (no_zero_copy) wp.worker_args.push_back("--no-zero-copy");
  if (no_coalesce) wp.worker_args.push_back("--no-coalesce");
  if (no_inline) wp.worker_args.push_back("--no-inline-complete");
  wp.sched.policy = *daemon::ParseSchedPolicy(sched_mode);
  wp.sched.slice = std::chrono::microseconds(slice_us);
  wp.sched.idle_grace = std::chrono::microseconds(idle_grace_us);
  wp.sched.yield_timeout = std::chrono::milliseconds(yield_timeout_ms);
  wp.sched.concurrency = sched_concurrency;
  wp.sched.partition_margin = std::chrono::microseconds(partition_margin_us);
  if (wp.sched.partitioned() && sched_concurrency != 1)
    return Fail(2, Error{Errc::kInvalidArgument, "--sched partitioned gives one vGPU the engine at a time: "
                                                "--sched-concurrency must be 1"});
  if (wp.sched.partitioned() && 4 * partition_margin_us >= slice_us)
    return Fail(2, Error{Errc::kInvalidArgument, "--sched-partition-margin-us must be under a quarter of "
                                                "--sched-slice-us"});

  daemon::ServiceOptions so;
  auto budget_bytes = ParseSize(budget);
  if (!budget_bytes) return Fail(2, budget_bytes.error());
  so.aperture_budget = ByteSize{*budget_bytes};
  so.types_file = types_file;
  so.root = root.empty() ? fs::path(opts.runtime_dir) : fs::path(root);
  so.mount_tree = !root.empty() && !no_tree;
  if (so.mount_tree) {
    std::error_code ec;
    // The tree is a private sysfs look-alike for mdevctl-ns; mounted over the host's /sys it
    // would hide the real one.
    if (fs::weakly_canonical(so.root / "sys", ec) == "/sys")
      return Fail(2, Error{Errc::kInvalidArgument,
                           "--root / would mount the mdev tree over /sys; use another root or --no-mdev-tree"});
  }
  so.control_path = control.empty() ? opts.runtime_dir + "/control.sock" : control;
  if (!control_group.empty()) {
    auto g = ParseGroup(control_group);
    if (!g) return Fail(2, g.error());
    so.control_group = *g;
  }

  // The engine's device, seen from a worker: the supervisor itself never loads a driver.
  auto probed = daemon::ProbeDevice(wp.binary, engine_args, 60000);
  if (!probed) return Fail(1, probed.error());
  VG_LOGI("engine: {}", probed->summary);
  if (!parent.empty()) {
    so.parent = parent;
  } else {
    engine::DeviceInfo info;
    info.kind = static_cast<engine::DeviceKind>(probed->kind);
    info.vendor_id = probed->vendor_id;
    info.device_id = probed->device_id;
    so.parent = daemon::FindPciAddress(info);
  }
  const std::string runtime_dir = opts.runtime_dir;
  auto d = daemon::Supervisor::Create(std::move(opts));
  if (!d) return Fail(1, d.error());

  auto svc = daemon::Service::Create(**d, std::move(so));
  if (!svc) return Fail(1, svc.error());
  // Before any other thread can call in: what an earlier supervisor left running first (its
  // workers adopted), then definitions marked auto, then --vgpu.
  for (const Error& e : (*svc)->RestoreRunning()) VG_LOGW("restore: {}", e.ToString());
  for (const Error& e : (*svc)->StartAutoInstances()) VG_LOGW("auto-start: {}", e.ToString());
  for (const std::string& spec : vgpus) {
    auto started = (*svc)->StartFromSpec(spec);
    if (!started) {
      const int code = started.code() == Errc::kInvalidArgument ? 2 : 1;
      (*svc)->Shutdown();
      return Fail(code, Error{started.code(), "--vgpu " + spec + ": " + started.error().what});
    }
  }
  std::unique_ptr<daemon::MetricsServer> metrics_server;
  if (metrics_endpoint) {
    daemon::MetricsServer::Options mo;
    mo.endpoint = *metrics_endpoint;
    mo.parent = (*svc)->manager().parent();
    mdev::Manager& mgr = (*svc)->manager();
    mo.count_defined = [&mgr]() -> Result<uint64_t> {
      VG_TRY_ASSIGN(std::vector<mdev::Definition> defs, mgr.ListDefined());
      return static_cast<uint64_t>(defs.size());
    };
    auto m = daemon::MetricsServer::Create((*d)->base(), (*d)->workers(), std::move(mo));
    if (!m) {
      (*svc)->Shutdown();
      return Fail(1, m.error());
    }
    metrics_server = std::move(m).value();
    (*svc)->set_metrics_address(metrics_server->address());
    VG_LOGI("metrics at http://{}/metrics", metrics_server->address());
  }
  if (auto r = (*svc)->Open(); !r) {
    (*svc)->Shutdown();
    return Fail(1, r.error());
  }
  VG_LOGI("vgpud ready: {} vGPU(s) under {}, parent {}", (*svc)->manager().ListActive().size(), runtime_dir,
          (*svc)->manager().parent());
  std::fflush(stderr);
  NotifySystemd("READY=1");
  auto r = (*d)->Run();
  NotifySystemd("STOPPING=1");
  (*svc)->Shutdown();
  // After the Service's shutdown: the definitions counter may be waiting for the Manager's
  // lock, which a management thread holds only until Shutdown has joined it.
  metrics_server.reset();
  svc->reset();
  (*d)->workers().StopAll();
  if (const uint64_t n = (*d)->workers().unclean_stops(); n != 0) {
    VG_LOGE("{} worker(s) did not stop cleanly (see above)", n);
    return 1;
  }
  return r.ok() ? 0 : 1;
}
