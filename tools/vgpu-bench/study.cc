#include "tools/vgpu-bench/study.h"

#include <dirent.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <thread>

#include <fmt/format.h>

namespace vg::bench {
namespace {

using Clock = std::chrono::steady_clock;
double Us(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }

struct SizePlan {
  int iters;
  std::vector<double> kernel_us;      // spin kernel targets
  std::vector<uint32_t> commands;     // FILLs per submission
  std::vector<uint64_t> data_bytes;   // per binding
  uint64_t matmul_max_bytes;
  uint64_t blur_max_bytes;
  std::vector<uint64_t> copy_cmd_bytes;
  uint32_t stream;
};

SizePlan PlanFor(StudyOptions::Size s) {
  switch (s) {
    case StudyOptions::Size::kSmoke:
      return {4, {20, 200}, {1, 16}, {4096, 65536}, 65536, 65536, {65536}, 8};
    case StudyOptions::Size::kQuick:
      return {25, {10, 100, 1000, 3000}, {1, 16, 256, 4096}, {4096, 262144, 4u << 20, 16u << 20},
              256 << 10, 4u << 20, {1u << 20, 16u << 20}, 64};
    case StudyOptions::Size::kFull:
      return {60,
              {10, 30, 100, 300, 1000, 3000, 10000, 30000},
              {1, 4, 16, 64, 256, 1024, 4096},
              {4096, 65536, 1u << 20, 16u << 20, 64u << 20},
              1u << 20,
              16u << 20,
              {1u << 20, 16u << 20, 64u << 20, 256u << 20},
              256};
  }
  return {};
}

bool Want(const std::set<std::string>& filter, const std::string& v) { return filter.empty() || filter.count(v); }

shaders::KernelSample SpinSample(uint32_t iterations) {
  auto s = shaders::MakeSample(shaders::KernelId::kSpin, 4096, 1);
  shaders::SpinPush p{4096, iterations, 1};
  s.push.assign(shaders::PushBytes(p).begin(), shaders::PushBytes(p).end());
  return s;
}

// Native submission time against spin iterations, fitted on two points (so the
// fixed submission cost does not count as kernel time).
constexpr uint32_t kCalLoIterations = 2000, kCalHiIterations = 20000;
Result<SpinFit> Calibrate(Path& native) {
  auto time_of = [&](uint32_t iters) -> Result<double> {
    Workload w;
    w.kind = Kind::kKernel;
    w.sample = SpinSample(iters);
    VG_TRY(native.Prepare(w));
    std::vector<double> us;
    for (int i = 0; i < 15; ++i) {
      auto t0 = Clock::now();
      VG_TRY(native.RunOnce());
      us.push_back(Us(Clock::now() - t0));
    }
    native.Release();
    // The minimum is the run least disturbed by the rest of the machine.
    return Summarize(us).min;
  };
  VG_TRY_ASSIGN(double t1, time_of(kCalLoIterations));
  VG_TRY_ASSIGN(double t2, time_of(kCalHiIterations));
  return FitSpin(kCalLoIterations, t1, kCalHiIterations, t2);
}

// Calibrates, and once more if the plan fails its check: a burst of load during one of the
// two timings skews the slope, and a second fit a moment later usually does not share it.
// A second failure is reported, not retried again: the rows run with the second plan and are
// marked (CheckCalibratedRows), so the run exits 1 with its data.
Result<std::vector<SpinPoint>> CalibrateChecked(Path& native, const std::vector<double>& targets, bool disturb,
                                                CalibrationReport& cal) {
  cal.ran = true;
  std::vector<SpinPoint> plan;
  for (int attempt = 0; attempt < 2; ++attempt) {
    if (attempt) std::this_thread::sleep_for(std::chrono::milliseconds(250));
    VG_TRY_ASSIGN(SpinFit fit, Calibrate(native));
    if (disturb) fit.us_per_iteration = 1e6;
    plan = PlanSpin(targets, fit);
    cal.attempts.push_back(fit);
    cal.attempt_problems.push_back(CheckSpinPlan(plan, fit));
    if (cal.attempt_problems.back().empty()) break;
  }
  return plan;
}

std::vector<Workload> BuildWorkloads(const StudyOptions& o, const SizePlan& plan,
                                     const std::vector<SpinPoint>& spin) {
  std::vector<Workload> ws;
  auto add = [&](Workload w) {
    if (Want(o.groups, w.group)) ws.push_back(std::move(w));
  };
  add({"empty", "fence only", Kind::kEmpty});
  {
    Workload w{"small", "copy 4 KiB", Kind::kKernel};
    w.sample = shaders::MakeSample(shaders::KernelId::kCopy, 1024, 3);
    w.bytes = 8192;
    add(w);
  }
  for (const SpinPoint& p : spin) {
    Workload w{"kernel_time", fmt::format("spin ~{} us", p.target_us), Kind::kKernel};
    w.sample = SpinSample(p.iterations);
    w.x = p.target_us;
    add(w);
  }
  for (uint32_t n : plan.commands) {
    Workload w{"cmds", fmt::format("{} FILLs", n), Kind::kFills};
    w.commands = n;
    w.x = n;
    add(w);
  }
  for (uint64_t bytes : plan.data_bytes) {
    uint32_t n = static_cast<uint32_t>(bytes / 4);
    struct K {
      shaders::KernelId id;
      const char* name;
      double traffic;  // bytes moved per element byte
      uint64_t max;
    };
    for (K k : {K{shaders::KernelId::kCopy, "copy", 2, ~0ull}, K{shaders::KernelId::kSaxpy, "saxpy", 3, ~0ull},
                K{shaders::KernelId::kMatmul, "matmul", 3, plan.matmul_max_bytes},
                K{shaders::KernelId::kBlur3x3, "blur", 2, plan.blur_max_bytes}}) {
      if (bytes > k.max) continue;
      Workload w{"data", fmt::format("{} {} KiB", k.name, bytes >> 10), Kind::kKernel};
      w.sample = shaders::MakeSample(k.id, n, 11);
      w.bytes = static_cast<uint64_t>(k.traffic * static_cast<double>(bytes));
      w.x = static_cast<double>(bytes);
      add(w);
    }
  }
  for (uint64_t bytes : plan.copy_cmd_bytes) {
    // KiB below 1 MiB: --smoke's 64 KiB read "0 MiB".
    Workload w{"data", bytes < (1u << 20) ? fmt::format("COPY cmd {} KiB", bytes >> 10) : fmt::format("COPY cmd {} MiB", bytes >> 20),
               Kind::kCopyCmd};
    w.copy_bytes = bytes;
    w.bytes = 2 * bytes;
    w.x = static_cast<double>(bytes);
    add(w);
  }
  {
    Workload w{"churn", "create+fill+destroy 64 KiB", Kind::kChurn};
    w.bytes = 64 << 10;
    add(w);
  }
  {
    Workload w{"stream", fmt::format("{} fire-and-forget FILLs", plan.stream), Kind::kFills};
    w.commands = 1;
    w.stream = plan.stream;
    add(w);
  }
  return ws;
}

}  // namespace

double SelfCpuUs() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e6 +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

// CPU time of every thread of `pid`, from schedstat (ns resolution).
double ProcessCpuUs(pid_t pid) {
  std::string dir = fmt::format("/proc/{}/task", pid);
  DIR* d = ::opendir(dir.c_str());
  if (!d) return 0;
  double ns = 0;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    std::ifstream f(dir + "/" + e->d_name + "/schedstat");
    double v = 0;
    if (f >> v) ns += v;
  }
  ::closedir(d);
  return ns / 1e3;
}

// The daemon's CPU: the supervisor and its children, the per-vGPU workers (docs/isolation.md)
// that do the device's work since F13. A child's threads count while it lives, which every
// worker of a run does.
double DaemonCpuUs(pid_t pid) {
  double us = ProcessCpuUs(pid);
  std::string dir = fmt::format("/proc/{}/task", pid);
  DIR* d = ::opendir(dir.c_str());
  if (!d) return us;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    std::ifstream f(dir + "/" + e->d_name + "/children");
    for (pid_t child = 0; f >> child;) us += ProcessCpuUs(child);
  }
  ::closedir(d);
  return us;
}

bool Ablation::RunsOn(const Workload& w) const {
  if (!groups.count(w.group)) return false;
  return cases.empty() ||
         std::any_of(cases.begin(), cases.end(), [&](const std::string& c) { return w.name.rfind(c, 0) == 0; });
}

const Cell* FindCell(const Result_& r, const std::string& path) {
  for (const Cell& c : r.cells)
    if (c.path == path) return &c;
  return nullptr;
}

Result<StudyReport> RunStudy(const StudyOptions& o, const PathFactory& make, const std::vector<std::string>& paths,
                             const std::string& device) {
  StudyReport rep;
  rep.device = device;
  SizePlan plan = PlanFor(o.size);
  int iters = o.iters > 0 ? o.iters : plan.iters;
  if (o.progress) std::fprintf(stderr, "vgpu-bench: measuring floors...\n");
  VG_TRY_ASSIGN(rep.floors, MeasureFloors(o.size == StudyOptions::Size::kSmoke ? 200 : 2000,
                                          o.size == StudyOptions::Size::kSmoke ? (4u << 20) : (64u << 20)));

  std::map<std::string, std::unique_ptr<Path>> live;
  for (const auto& p : paths) {
    VG_TRY_ASSIGN(live[p], make(p, 0));
    for (const NamedStats& f : live[p]->floors()) rep.floors.path_floors.push_back({p + ": " + f.name, f.us});
  }
  VG_ERROR_IF(!live.count("native"), Errc::kInvalidArgument, "the native path is the baseline and must run");
  // Only a run with kernel_time rows calibrates: the plan is checked before they run, the
  // rows' measured native times after (docs/ab-methodology.md, "Calibration check").
  std::vector<SpinPoint> spin;
  if (Want(o.groups, "kernel_time")) {
    if (o.progress) std::fprintf(stderr, "vgpu-bench: calibrating the spin kernel...\n");
    VG_TRY_ASSIGN(spin, CalibrateChecked(*live["native"], plan.kernel_us, o.disturb_calibration, rep.calibration));
  }
  auto workloads = BuildWorkloads(o, plan, spin);

  // The ablations' rows, made once a workload of their groups is in this run. A row that
  // cannot be made is the ablation's loss, not the study's: it goes to not_run, named.
  rep.ablations = o.ablations;
  for (Ablation& a : rep.ablations) {
    const bool wanted = std::any_of(workloads.begin(), workloads.end(), [&](const Workload& w) { return a.RunsOn(w); });
    std::vector<AblationRow> kept;
    for (const AblationRow& row : a.rows) {
      if (!wanted || live.count(row.path)) {
        kept.push_back(row);
        continue;
      }
      auto made = make(row.path, 0);
      if (!made.ok()) {
        a.not_run.push_back(fmt::format("{} ({}): NOT RUN: {}", row.path, row.label, made.error().ToString()));
        continue;
      }
      live[row.path] = std::move(*made);
      for (const NamedStats& f : live[row.path]->floors())
        rep.floors.path_floors.push_back({row.path + ": " + f.name, f.us});
      kept.push_back(row);
    }
    a.rows = std::move(kept);
  }
  // The paths of a workload: every base path, then the rows of each ablation of its group.
  auto paths_of = [&](const Workload& w) {
    std::vector<std::string> ps = paths;
    for (const Ablation& a : rep.ablations)
      if (a.RunsOn(w))
        for (const AblationRow& row : a.rows)
          if (live.count(row.path) && std::find(ps.begin(), ps.end(), row.path) == ps.end()) ps.push_back(row.path);
    return ps;
  };

  size_t done = 0;
  for (const Workload& w : workloads) {
    if (o.progress)
      std::fprintf(stderr, "\rvgpu-bench: [%zu/%zu] %-32s", ++done, workloads.size(), w.name.c_str());
    Result_ res{w, {}};
    const std::vector<std::string> wpaths = paths_of(w);
    std::map<std::string, std::vector<double>> samples;
    std::map<std::string, double> host_cpu, guest_cpu;
    std::map<std::string, Crossings> cross;
    std::map<std::string, uint64_t> subs;
    std::map<std::string, Cell> cells;
    for (const auto& p : wpaths) {
      Cell& c = cells[p];
      c.path = p;
      Path& path = *live[p];
      Result<> prep = path.Prepare(w);
      if (prep.ok() && w.kind == Kind::kKernel) {
        prep = path.RunOnce();
        if (prep.ok()) {
          auto out = path.ReadBack();
          Result<> check = out.ok() ? shaders::CheckSample(w.sample, *out) : Result<>(out.error());
          c.correct = check.ok();
          if (!check.ok()) c.error = check.error().ToString();
        }
      }
      for (int i = 0; prep.ok() && i < 2; ++i) prep = path.RunOnce();
      if (!prep.ok()) {
        c.correct = false;
        c.error = prep.error().ToString();
      }
    }
    for (int r = 0; r < o.reps; ++r) {
      // Rotate the order each repetition so drift on the machine hits every path alike.
      std::vector<std::string> order = wpaths;
      std::rotate(order.begin(), order.begin() + (r % order.size()), order.end());
      for (const auto& p : order) {
        Cell& c = cells[p];
        if (!c.error.empty()) continue;
        Path& path = *live[p];
        // One untimed submission first: the path that ran before this one drove another
        // vGPU, which kept the host scheduler's grant (a lone holder keeps it until someone
        // asks), so this path's first submission of the repetition would wait for the grant
        // to come over: one sample in each repetition's --iters (25 in --quick), enough to set
        // the p99 of every daemon path (mediated copy 4 KiB p99 526-911 us in the full study,
        // 257 us with this). Switching tenants is what the fairness and noisy groups measure.
        if (Result<> warm = w.stream ? path.RunStream(w.stream) : path.RunOnce(); !warm.ok()) {
          c.error = warm.error().ToString();
          continue;
        }
        pid_t host = path.host_pid();
        const pid_t vmm = path.vmm_pid();
        double host0 = host ? DaemonCpuUs(host) : 0, self0 = SelfCpuUs(), vmm0 = vmm ? ProcessCpuUs(vmm) : 0;
        Crossings c0 = path.crossings();
        std::vector<double> rs;
        uint32_t per = w.stream ? w.stream : 1;
        for (int i = 0; i < iters; ++i) {
          auto t0 = Clock::now();
          Result<> run = w.stream ? path.RunStream(w.stream) : path.RunOnce();
          double us = Us(Clock::now() - t0) / per;
          if (!run.ok()) {
            c.error = run.error().ToString();
            break;
          }
          rs.push_back(us);
        }
        Crossings c1 = path.crossings();
        double self = SelfCpuUs() - self0 + (vmm ? ProcessCpuUs(vmm) - vmm0 : 0);
        const double host_d = host ? DaemonCpuUs(host) - host0 : self, guest_d = host ? self : 0;
        host_cpu[p] += host_d;
        guest_cpu[p] += guest_d;
        Crossings d{c1.messages - c0.messages, c1.doorbells - c0.doorbells, c1.interrupts - c0.interrupts,
                    c1.replies - c0.replies, c1.bytes - c0.bytes};
        Crossings& acc = cross[p];
        acc.messages += d.messages;
        acc.doorbells += d.doorbells;
        acc.interrupts += d.interrupts;
        acc.replies += d.replies;
        acc.bytes += d.bytes;
        const uint64_t n = rs.size() * per;
        subs[p] += n;
        // A repetition cut short by an error is not one the paths can be paired on.
        if (c.error.empty() && n) {
          c.rep_p50_us.push_back(Summarize(rs).p50);
          c.rep_cpu_us.push_back((host_d + guest_d) / static_cast<double>(n));
          c.rep_crossings.push_back(static_cast<double>(d.messages + d.doorbells + d.interrupts + d.replies) /
                                    static_cast<double>(n));
        }
        samples[p].insert(samples[p].end(), rs.begin(), rs.end());
      }
    }
    const std::vector<double>& native_reps = cells["native"].rep_p50_us;
    for (const auto& p : wpaths) {
      Path& path = *live[p];
      path.Release();
      Cell& c = cells[p];
      if (!c.correct) rep.all_correct = false;
      c.us = Summarize(samples[p]);
      double n = static_cast<double>(std::max<uint64_t>(1, subs[p]));
      c.host_cpu_us = host_cpu[p] / n;
      c.guest_cpu_us = guest_cpu[p] / n;
      c.messages = static_cast<double>(cross[p].messages) / n;
      c.doorbells = static_cast<double>(cross[p].doorbells) / n;
      c.interrupts = static_cast<double>(cross[p].interrupts) / n;
      c.replies = static_cast<double>(cross[p].replies) / n;
      c.bytes = static_cast<double>(cross[p].bytes) / n;
      if (c.us.p50 > 0) {
        c.throughput = w.bytes ? static_cast<double>(w.bytes) / (c.us.p50 * 1e-6) / 1e9 : 1e6 / c.us.p50;
        c.unit = w.bytes ? "GB/s" : "sub/s";
      }
      // Paired only when both ran every repetition: rep r of each is then the same repetition.
      if (c.rep_p50_us.size() == native_reps.size()) {
        c.latency_ratio = PairedRatio(c.rep_p50_us, native_reps);
        c.throughput_ratio = PairedRatio(native_reps, c.rep_p50_us);
      }
      res.cells.push_back(c);
    }
    rep.results.push_back(std::move(res));
  }
  if (o.progress) std::fprintf(stderr, "\n");
  for (const Result_& res : rep.results) {
    if (res.workload.group != "kernel_time") continue;
    CalibratedRow row{res.workload.name, res.workload.x};
    for (const SpinPoint& p : spin)
      if (p.target_us == res.workload.x) row.iterations = p.iterations;
    if (const Cell* native = FindCell(res, "native")) {
      row.native_p50_us = native->us.p50;
      row.native_n = native->us.n;
    }
    rep.calibration.rows.push_back(row);
  }
  if (rep.calibration.ran) CheckCalibratedRows(rep.calibration);
  return rep;
}

Ratio PairedLatency(const Cell& num, const Cell& den) {
  // Paired only when both ran every repetition: rep r of each is then the same repetition.
  if (num.rep_p50_us.size() != den.rep_p50_us.size()) return {};
  return PairedRatio(num.rep_p50_us, den.rep_p50_us);
}
Ratio PairedCpu(const Cell& num, const Cell& den) {
  if (num.rep_cpu_us.size() != den.rep_cpu_us.size()) return {};
  return PairedRatio(num.rep_cpu_us, den.rep_cpu_us);
}

// --- reports ---

namespace {

// Each ablation's rows side by side per workload: against native and against its reference.
std::string FormatAblations(const StudyReport& r) {
  std::string out;
  for (const Ablation& a : r.ablations) {
    out += fmt::format("== ablation {}: {}\n", a.name, a.factor);
    for (const AblationRow& row : a.rows) out += fmt::format("   {:<18} {}\n", row.path, row.label);
    for (const std::string& n : a.not_run) out += "   " + n + "\n";
    if (a.rows.size() < 2) continue;
    out += fmt::format("{:<30} {:<18} {:>9} {:>22} {:>22} {:>9} {:>22} {:>5} {:>5} {:>5}\n", "case", "path", "p50 us",
                       "x native [min-max]", "x " + a.reference() + " [min-max]", "cpu us", "cpu x ref [min-max]",
                       "msgs", "dbell", "irqs");
    for (const Result_& res : r.results) {
      if (!a.RunsOn(res.workload)) continue;
      const Cell* ref = FindCell(res, a.reference());
      for (const AblationRow& row : a.rows) {
        const Cell* c = FindCell(res, row.path);
        if (!c) continue;
        if (!c->error.empty() && c->us.n == 0) {
          out += fmt::format("{:<30} {:<18} error: {}\n", res.workload.name, c->path, c->error);
          continue;
        }
        const bool is_ref = row.path == a.reference();
        out += fmt::format("{:<30} {:<18} {:>9.1f} {:>22} {:>22} {:>9.1f} {:>22} {:>5.2f} {:>5.2f} {:>5.2f}\n",
                           res.workload.name, c->path, c->us.p50, RatioText(c->latency_ratio),
                           is_ref ? std::string("1") : ref ? RatioText(PairedLatency(*c, *ref)) : std::string("-"),
                           c->host_cpu_us + c->guest_cpu_us,
                           is_ref ? std::string("1") : ref ? RatioText(PairedCpu(*c, *ref)) : std::string("-"),
                           c->messages, c->doorbells, c->interrupts);
      }
    }
  }
  return out;
}

}  // namespace

std::string FormatReport(const StudyReport& r) {
  std::string out = fmt::format("device: {}\n", r.device);
  // A lifecycle-only run (--groups lifecycle) measures no floors.
  if (r.floors.eventfd_rtt_us.n) {
    out += fmt::format("floors: eventfd round trip p50 {:.1f} us (p99 {:.1f}), shared-memory poll round trip p50 {:.2f} us "
                       "(two processes on {}), memcpy {:.1f} GB/s\n\n",
                       r.floors.eventfd_rtt_us.p50, r.floors.eventfd_rtt_us.p99, r.floors.shm_poll_rtt_us.p50,
                       r.floors.placement, r.floors.memcpy_gbps);
  }
  if (!r.floors.path_floors.empty()) {
    // Printed above the table so the rows of that path are read against them.
    out.resize(out.size() - 1);
    for (const NamedStats& f : r.floors.path_floors)
      out += fmt::format("floor {}: p50 {:.1f} us (p99 {:.1f})\n", f.name, f.us.p50, f.us.p99);
    out += "\n";
  }
  out += FormatCalibration(r.calibration);
  std::string group;
  for (const Result_& res : r.results) {
    if (res.workload.group != group) {
      group = res.workload.group;
      out += fmt::format("== {}\n{:<30} {:<18} {:>9} {:>9} {:>9} {:>10} {:>6} {:>8} {:>8} {:>5} {:>5} {:>5} {:>5} {:>8}  {:<24} {}\n",
                         group, "case", "path", "p50 us", "p99 us", "p99.9 us", "thruput", "unit", "host cpu",
                         "gst cpu", "msgs", "dbell", "irqs", "repl", "bytes", "lat ratio [min-max]", "ok");
    }
    for (const Cell& c : res.cells) {
      if (!c.error.empty() && c.us.n == 0) {
        out += fmt::format("{:<30} {:<18} error: {}\n", res.workload.name, c.path, c.error);
        continue;
      }
      out += fmt::format("{:<30} {:<18} {:>9.1f} {:>9.1f} {:>9.1f} {:>10.3g} {:>6} {:>8.1f} {:>8.1f} {:>5.2f} {:>5.2f} "
                         "{:>5.2f} {:>5.2f} {:>8.0f}  {:<24} {}\n",
                         res.workload.name, c.path, c.us.p50, c.us.p99, c.us.p999, c.throughput, c.unit,
                         c.host_cpu_us, c.guest_cpu_us, c.messages, c.doorbells, c.interrupts, c.replies, c.bytes,
                         c.path == "native" ? std::string("1") : RatioText(c.latency_ratio),
                         c.correct ? "yes" : "NO " + c.error);
    }
  }
  out += FormatAblations(r);
  if (!r.concurrency.empty()) {
    // The device's side (a daemon's guests): its vGPUs' device time over wall time, and the
    // scheduler's grants and grant waits per submission; "-" for native.
    out += fmt::format("== concurrency (small dispatch per guest; median over repetitions)\n{:<22} {:>7} {:>12} {:>8} "
                       "{:>10} {:>5} {:>9} {:>10} {:>12}\n",
                       "path", "guests", "sub/s", "speedup", "cpu us", "reps", "dev busy", "grants/sub",
                       "grant wait us");
    for (const auto& c : r.concurrency) {
      out += fmt::format("{:<22} {:>7} {:>12.0f} {:>8.2f} {:>10.1f} {:>5}", c.path, c.guests, c.submissions_per_s,
                         c.speedup, SummarizeRatio(c.rep_cpu_us).median, c.rep_rate.size());
      if (c.rep_device_busy.empty()) {
        out += fmt::format(" {:>9} {:>10} {:>12}\n", "-", "-", "-");
      } else {
        out += fmt::format(" {:>9.2f} {:>10.2f} {:>12.1f}\n", SummarizeRatio(c.rep_device_busy).median,
                           SummarizeRatio(c.rep_grants_per_submission).median,
                           SummarizeRatio(c.rep_grant_wait_us).median);
      }
    }
  }
  out += FormatLifecycle(r.lifecycle);
  out += FormatCovert(r.covert);
  out += FormatDesktop(r.desktop);
  out += FormatSched(r.sched);
  out += "\n== summary\n";
  // An entry starting with two spaces continues the one before it (a verdict's rows).
  for (const auto& s : r.summary) out += (s.rfind("  ", 0) == 0 ? "  " + s : "- " + s) + "\n";
  if (r.compared) out += FormatAgreement(r.agreement);
  return out;
}

nlohmann::json ToJson(const StudyReport& r) {
  using nlohmann::json;
  auto stats = [](const Stats& s) {
    return json{{"n", s.n}, {"p50", s.p50}, {"p90", s.p90}, {"p99", s.p99}, {"p999", s.p999}, {"min", s.min},
                {"max", s.max}, {"mean", s.mean}};
  };
  auto ratio = [](const Ratio& x) { return json{{"median", x.median}, {"min", x.min}, {"max", x.max}, {"n", x.n}}; };
  json j;
  j["device"] = r.device;
  j["floors"] = {{"placement", r.floors.placement},
                 {"eventfd_rtt_us", stats(r.floors.eventfd_rtt_us)},
                 {"shm_poll_rtt_us", stats(r.floors.shm_poll_rtt_us)},
                 {"memcpy_gbps", r.floors.memcpy_gbps}};
  for (const NamedStats& f : r.floors.path_floors) j["floors"]["path_floors"][f.name] = stats(f.us);
  for (const Result_& res : r.results) {
    json w{{"group", res.workload.group}, {"case", res.workload.name}, {"x", res.workload.x},
           {"bytes_per_submission", res.workload.bytes}};
    // A kernel_time row carries its target next to what native measured for it.
    if (const CalibratedRow* row = r.calibration.Row(res.workload.name); row && res.workload.group == "kernel_time") {
      w["target_us"] = row->target_us;
      w["iterations"] = row->iterations;
      w["native_p50_us"] = row->native_p50_us;
      w["calibration"] = row->ok() ? "ok" : "calibration failed: " + row->failure;
    }
    for (const Cell& c : res.cells) {
      w["paths"][c.path] = {{"latency_us", stats(c.us)},
                            {"throughput", c.throughput},
                            {"unit", c.unit},
                            {"host_cpu_us_per_submission", c.host_cpu_us},
                            {"guest_cpu_us_per_submission", c.guest_cpu_us},
                            {"crossings_per_submission",
                             {{"messages", c.messages},
                              {"doorbells", c.doorbells},
                              {"interrupts", c.interrupts},
                              {"replies", c.replies}}},
                            {"bytes_per_submission", c.bytes},
                            {"latency_ratio_to_native", ratio(c.latency_ratio)},
                            {"throughput_ratio_to_native", ratio(c.throughput_ratio)},
                            {"correct", c.correct},
                            {"error", c.error},
                            {"per_rep",
                             {{"p50_us", c.rep_p50_us}, {"cpu_us_per_submission", c.rep_cpu_us},
                              {"crossings_per_submission", c.rep_crossings}}}};
    }
    j["results"].push_back(w);
  }
  for (const auto& c : r.concurrency)
    j["concurrency"].push_back({{"path", c.path},
                                {"guests", c.guests},
                                {"submissions_per_s", c.submissions_per_s},
                                {"speedup", c.speedup},
                                {"per_rep",
                                 {{"submissions_per_s", c.rep_rate},
                                  {"cpu_us_per_submission", c.rep_cpu_us},
                                  {"device_busy", c.rep_device_busy},
                                  {"grants_per_submission", c.rep_grants_per_submission},
                                  {"grant_wait_us_per_submission", c.rep_grant_wait_us}}}});
  for (const Ablation& a : r.ablations) {
    json rows = json::array();
    for (const AblationRow& row : a.rows) rows.push_back({{"path", row.path}, {"label", row.label}});
    j["ablations"].push_back({{"name", a.name},
                              {"factor", a.factor},
                              {"groups", a.groups},
                              {"cases", a.cases},
                              {"reference", a.rows.empty() ? std::string() : a.reference()},
                              {"rows", rows},
                              {"not_run", a.not_run}});
  }
  // Every figure the summary reads, with its spread: what two runs are compared on.
  j["summary_ratios"] = json::object();
  for (const SummaryFigure& f : r.figures) {
    json v = ratio(f.value);
    v["unit"] = f.unit;
    v["what"] = f.what;
    j["summary_ratios"][f.key] = v;
  }
  j["verdicts"] = json::array();
  for (const ClassVerdict& v : r.verdicts) j["verdicts"].push_back(VerdictJson(v));
  if (r.compared) j["agreement"] = AgreementJson(r.agreement);
  if (r.lifecycle.ran) j["lifecycle"] = LifecycleJson(r.lifecycle);
  if (r.covert.ran) j["covert"] = CovertJson(r.covert);
  if (r.desktop.ran) j["desktop"] = DesktopJson(r.desktop);
  AddSchedJson(r.sched, j);
  if (r.calibration.ran) j["calibration"] = CalibrationJson(r.calibration);
  j["summary"] = r.summary;
  j["all_correct"] = r.all_correct;
  return j;
}

std::string ToCsv(const StudyReport& r) {
  std::string out =
      "group,case,path,p50_us,p99_us,p999_us,throughput,unit,host_cpu_us,guest_cpu_us,messages,doorbells,interrupts,"
      "replies,bytes,latency_ratio,latency_ratio_min,latency_ratio_max,throughput_ratio,correct,"
      "target_us,native_p50_us,spin_iterations,calibration\n";
  for (const Result_& res : r.results) {
    // kernel_time rows only: the target and native's measured p50 beside it on every path's line.
    const CalibratedRow* row = res.workload.group == "kernel_time" ? r.calibration.Row(res.workload.name) : nullptr;
    std::string cal = row ? fmt::format("{:.0f},{:.3f},{},{}", row->target_us, row->native_p50_us, row->iterations,
                                        row->ok() ? "ok" : "failed")
                          : std::string(",,,");
    for (const Cell& c : res.cells)
      out += fmt::format("{},\"{}\",{},{:.3f},{:.3f},{:.3f},{:.6g},{},{:.3f},{:.3f},{:.3f},{:.3f},{:.3f},{:.3f},{:.1f},"
                         "{:.4f},{:.4f},{:.4f},{:.4f},{},{}\n",
                         res.workload.group, res.workload.name, c.path, c.us.p50, c.us.p99, c.us.p999, c.throughput,
                         c.unit, c.host_cpu_us, c.guest_cpu_us, c.messages, c.doorbells, c.interrupts, c.replies,
                         c.bytes, c.latency_ratio.median, c.latency_ratio.min, c.latency_ratio.max,
                         c.throughput_ratio.median, c.correct ? 1 : 0, cal);
  }
  return out;
}

Result<std::vector<std::string>> WritePlots(const StudyReport& r, const std::string& dir) {
  // Each plot has the paths that ran its rows: an ablation row runs only on its own
  // workloads and would be an empty series elsewhere.
  std::map<std::string, std::vector<std::string>> plot_paths;  // .dat file -> its columns
  auto write_dat = [&](const std::string& file, const std::string& group, const std::string& prefix, bool gbps) {
    auto mine = [&](const Result_& res) {
      return res.workload.group == group && res.workload.name.rfind(prefix, 0) == 0;
    };
    std::vector<std::string>& paths = plot_paths[file];
    for (const Result_& res : r.results)
      if (mine(res))
        for (const Cell& c : res.cells)
          if (std::find(paths.begin(), paths.end(), c.path) == paths.end()) paths.push_back(c.path);
    int rows = 0;
    std::ofstream f(dir + "/" + file);
    f << "# x";
    for (auto& p : paths) f << " " << p;
    f << "\n";
    for (const Result_& res : r.results) {
      if (!mine(res)) continue;
      const Cell* native = FindCell(res, "native");
      f << (group == "kernel_time" && native ? native->us.p50 : res.workload.x);
      for (auto& p : paths) {
        const Cell* c = FindCell(res, p);
        f << " " << (c ? (gbps ? c->throughput : c->us.p50) : 0);
      }
      f << "\n";
      ++rows;
    }
    return rows;
  };
  // A filtered run (--groups) may leave a plot without data: it is skipped, not an error.
  bool kt = write_dat("kernel_time.dat", "kernel_time", "", false) > 0;
  bool cp = write_dat("copy_throughput.dat", "data", "copy ", true) > 0;
  bool sx = write_dat("saxpy_throughput.dat", "data", "saxpy ", true) > 0;
  std::string script = "set terminal pngcairo size 900,600\nset grid\nset key top left\nset logscale xy\n";
  auto plot = [&](const std::string& png, const std::string& dat, const std::string& title, const std::string& xl,
                  const std::string& yl) {
    script += fmt::format("set output '{}/{}'\nset title '{}'\nset xlabel '{}'\nset ylabel '{}'\nplot ", dir, png,
                          title, xl, yl);
    const std::vector<std::string>& paths = plot_paths[dat];
    for (size_t i = 0; i < paths.size(); ++i)
      script += fmt::format("{}'{}/{}' using 1:{} with linespoints title '{}'", i ? ", " : "", dir, dat, i + 2,
                            paths[i]);
    script += "\n";
  };
  std::vector<std::string> pngs;
  if (kt) {
    plot("latency_vs_kernel_time.png", "kernel_time.dat", "Submission latency vs kernel time (p50)",
         "native kernel time (us)", "latency (us)");
    pngs.push_back(dir + "/latency_vs_kernel_time.png");
  }
  if (cp) {
    plot("copy_throughput_vs_size.png", "copy_throughput.dat", "copy kernel throughput vs size (p50)",
         "bytes per buffer", "GB/s");
    pngs.push_back(dir + "/copy_throughput_vs_size.png");
  }
  if (sx) {
    plot("saxpy_throughput_vs_size.png", "saxpy_throughput.dat", "saxpy throughput vs size (p50)", "bytes per buffer",
         "GB/s");
    pngs.push_back(dir + "/saxpy_throughput_vs_size.png");
  }
  if (pngs.empty()) return pngs;
  std::ofstream(dir + "/plots.gnuplot") << script;
  int rc = std::system(fmt::format("gnuplot '{}/plots.gnuplot' 2>'{}/gnuplot.log'", dir, dir).c_str());
  VG_ERROR_IF(rc != 0, Errc::kIo, "gnuplot failed (see {}/gnuplot.log)", dir);
  return pngs;
}

}  // namespace vg::bench
