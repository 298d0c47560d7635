#include "tools/vgpu-bench/fairness.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <new>
#include <numeric>
#include <string_view>
#include <thread>
#include <tuple>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "guest/guest.h"
#include "shaders/samples.h"
#include "tools/vgpu-bench/calibration.h"
#include "tools/vgpu-bench/lifecycle.h"
#include "tools/vgpu-bench/paths.h"

namespace vg::bench {
namespace {

using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr std::string_view kTenantFlag = "--sched-tenant";

uint64_t NowNs() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count());
}
double Seconds(uint64_t ns) { return static_cast<double>(ns) / 1e9; }

// ---- Shared memory between the runner and its tenants --------------------------------------
// One memfd per configuration, inherited by each tenant process across exec: the control
// words, each tenant's configuration (written by the runner before it starts), its state and
// its completion records (written by the tenant, read by the runner once it has exited).
// steady_clock is CLOCK_MONOTONIC, one clock for every process of the machine, so a
// tenant's completion times and the runner's window are on one axis.

enum class TenantKind : uint32_t {
  kBacklog = 1,     // keeps in_flight spin dispatches submitted, resubmits each as it completes
  kClosedLoop = 2,  // one small dispatch, waits for its fence, [thinks,] again: the light tenant
};
constexpr int kTenantNice = -5;
enum Phase : uint32_t { kStarting = 0, kReady = 1, kFinished = 2, kFailed = 3 };

struct alignas(64) SharedControl {
  std::atomic<uint32_t> go{0};
  std::atomic<uint32_t> stop{0};
  uint32_t tenants = 0;
  uint32_t capacity = 0;  // records per tenant
};
struct alignas(64) TenantConfig {
  char socket[256] = {};
  TenantKind kind = TenantKind::kBacklog;
  uint32_t spin_iterations = 0;  // kBacklog
  uint32_t in_flight = 1;        // kBacklog
  uint32_t think_us = 0;         // kClosedLoop: pause after each completion
  uint64_t guest_ram = 16ull << 20;
};
struct alignas(64) TenantState {
  std::atomic<uint32_t> phase{kStarting};
  std::atomic<uint64_t> records{0};   // records written, at most capacity
  std::atomic<uint64_t> observed{0};  // completions seen after go, past the capacity too
  std::atomic<uint64_t> dry{0};       // completions seen with nothing else of this tenant's queued
  std::atomic<uint32_t> niced{0};     // the tenant runs at kTenantNice
  char why[256] = {};
};
struct TenantRecord {
  uint64_t done_ns;     // when the tenant saw the fence
  uint64_t latency_ns;  // since that dispatch's submission
};
static_assert(std::atomic<uint64_t>::is_always_lock_free && std::atomic<uint32_t>::is_always_lock_free);

size_t Align64(size_t n) { return (n + 63) & ~size_t{63}; }

// The layout both sides compute from (tenants, capacity).
class SharedView {
 public:
  static size_t Bytes(uint32_t tenants, uint32_t capacity) {
    return Align64(sizeof(SharedControl)) + tenants * (sizeof(TenantConfig) + sizeof(TenantState)) +
           size_t{tenants} * capacity * sizeof(TenantRecord);
  }
  SharedView(void* base, size_t bytes) : base_(static_cast<std::byte*>(base)), bytes_(bytes) {}
  bool Valid() const {
    return bytes_ >= sizeof(SharedControl) && Bytes(control().tenants, control().capacity) <= bytes_;
  }
  SharedControl& control() const { return *reinterpret_cast<SharedControl*>(base_); }
  TenantConfig& config(uint32_t i) const {
    return reinterpret_cast<TenantConfig*>(base_ + Align64(sizeof(SharedControl)))[i];
  }
  TenantState& state(uint32_t i) const {
    return reinterpret_cast<TenantState*>(base_ + Align64(sizeof(SharedControl)) +
                                          control().tenants * sizeof(TenantConfig))[i];
  }
  TenantRecord* records(uint32_t i) const {
    return reinterpret_cast<TenantRecord*>(base_ + Align64(sizeof(SharedControl)) +
                                           control().tenants * (sizeof(TenantConfig) + sizeof(TenantState))) +
           size_t{i} * control().capacity;
  }

 private:
  std::byte* base_;
  size_t bytes_;
};

shaders::KernelSample SpinSample(uint32_t iterations) {
  auto s = shaders::MakeSample(shaders::KernelId::kSpin, 4096, 1);
  shaders::SpinPush p{4096, iterations, 1};
  s.push.assign(shaders::PushBytes(p).begin(), shaders::PushBytes(p).end());
  return s;
}
// The light tenant's dispatch: the study's `small` workload.
shaders::KernelSample LightSample() { return shaders::MakeSample(shaders::KernelId::kCopy, 1024, 3); }

uint32_t AccessOf(shaders::Access a) {
  return (a != shaders::Access::kWrite ? abi::cmd::kAccessRead : 0) |
         (shaders::Writes(a) ? abi::cmd::kAccessWrite : 0);
}

// ---- The tenant process -------------------------------------------------------------------

class Tenant {
 public:
  Tenant(const SharedView& v, uint32_t index)
      : ctl_(v.control()), cfg_(v.config(index)), st_(v.state(index)), rec_(v.records(index)) {}

  int Run() {
    const int rc = Body();
    if (rc) st_.phase.store(kFailed);
    return rc;
  }

 private:
  int Fail(int code, const std::string& why) {
    std::snprintf(st_.why, sizeof st_.why, "%s", why.c_str());
    return code;
  }

  void Record(uint64_t done_ns, uint64_t submitted_ns) {
    st_.observed.fetch_add(1);
    const uint64_t n = st_.records.load();
    if (n >= ctl_.capacity) return;  // counted in observed; the runner reports the overflow
    rec_[n] = {done_ns, done_ns - submitted_ns};
    st_.records.store(n + 1);
  }

  // The fence of `seq`, waited in steps so a stop is seen; kTimeout only past `limit_ms`.
  Result<> WaitFor(uint64_t seq, int limit_ms) {
    const auto deadline = Clock::now() + std::chrono::milliseconds(limit_ms);
    for (;;) {
      Result<> r = drv_->Wait(seq, guest::WaitMode::kIrq, 200);
      if (r.ok() || r.code() != Errc::kTimeout || Clock::now() > deadline) return r;
    }
  }

  int Body() {
    using namespace vg::guest;
    // On lavapipe the "GPU" is the CPU the guests run on: a guest process that waits behind
    // the engines' threads for its turn on a core resubmits late and runs dry, which a guest
    // on its own vCPU does not. Its priority a little above them (it runs for microseconds
    // per completion) keeps the queue full; best effort (needs CAP_SYS_NICE), said in the report.
    st_.niced.store(::setpriority(PRIO_PROCESS, 0, kTenantNice) == 0 ? 1 : 0);
    const std::string socket(cfg_.socket, strnlen(cfg_.socket, sizeof cfg_.socket));
    DeviceOptions o;
    o.socket = socket;
    o.ram_size = cfg_.guest_ram;
    // A tenant of the previous configuration may have just left this vGPU: the worker frees
    // its single client slot when it notices, so give it a moment (as the concurrency Worker).
    auto dev = Device::Open(o);
    for (int i = 0; i < 100 && !dev.ok(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      dev = Device::Open(o);
    }
    if (!dev.ok()) return Fail(3, "open " + socket + ": " + dev.error().ToString());
    dev_ = std::move(*dev);
    auto drv = Driver::Create(*dev_);
    if (!drv.ok()) return Fail(3, "driver: " + drv.error().ToString());
    drv_ = std::move(*drv);

    const bool backlog = cfg_.kind == TenantKind::kBacklog;
    sample_ = backlog ? SpinSample(cfg_.spin_iterations) : LightSample();
    const auto* k = shaders::FindKernel(sample_.kernel);
    const uint32_t slots = backlog ? std::clamp<uint32_t>(cfg_.in_flight, 1, 64) : 1;
    for (uint32_t s = 0; s < slots; ++s) {
      std::vector<GpuBuffer> bufs;
      std::vector<Binding> binds;
      for (size_t i = 0; i < sample_.bindings.size(); ++i) {
        auto b = drv_->Alloc(sample_.bindings[i].size());
        if (!b.ok()) return Fail(4, "alloc: " + b.error().ToString());
        std::memcpy(b->host.data(), sample_.bindings[i].data(), sample_.bindings[i].size());
        binds.push_back(Bind(*b, AccessOf(k->bindings[i].access)));
        bufs.push_back(*b);
      }
      CommandBuilder cb;
      cb.Dispatch(sample_.kernel, sample_.groups, binds, sample_.push);
      slot_bufs_.push_back(std::move(bufs));
      slot_cmds_.push_back(std::move(cb));
    }
    // Warm-up, untimed: the worker builds the kernel's pipeline on its first dispatch.
    for (uint32_t s = 0; s < slots; ++s) {
      auto seq = drv_->Submit(slot_cmds_[s]);
      if (!seq.ok()) return Fail(5, "submit: " + seq.error().ToString());
      if (auto w = WaitFor(*seq, 60000); !w.ok()) return Fail(5, "warm-up: " + w.error().ToString());
    }
    st_.phase.store(kReady);
    const auto give_up = Clock::now() + std::chrono::seconds(300);
    while (!ctl_.go.load() && !ctl_.stop.load()) {
      if (Clock::now() > give_up) return Fail(7, "no go within 300 s");
      std::this_thread::sleep_for(std::chrono::microseconds(500));
    }
    if (int rc = backlog ? Backlog(slots) : ClosedLoop()) return rc;
    // Every dispatch has completed: results, checked bit for bit against the CPU reference
    // once (slot 0) and against slot 0 for the others (the same dispatch on the same input).
    if (auto w = WaitFor(drv_->last_submitted(), 120000); !w.ok()) return Fail(5, "drain: " + w.error().ToString());
    std::vector<std::vector<std::byte>> first;
    for (const GpuBuffer& b : slot_bufs_[0]) first.emplace_back(b.host.begin(), b.host.end());
    if (auto c = shaders::CheckSample(sample_, first); !c.ok()) return Fail(1, "wrong result: " + c.error().ToString());
    for (size_t s = 1; s < slot_bufs_.size(); ++s)
      for (size_t i = 0; i < first.size(); ++i)
        if (std::memcmp(slot_bufs_[s][i].host.data(), first[i].data(), first[i].size()) != 0)
          return Fail(1, fmt::format("wrong result: slot {} binding {} differs from slot 0", s, i));
    st_.phase.store(kFinished);
    return 0;
  }

  // Backlogged: `slots` dispatches submitted at all times; each completion seen is recorded
  // and its slot submitted again at once. Fences complete in order on one vGPU, so waiting
  // for the oldest is waiting for the next.
  int Backlog(uint32_t slots) {
    struct InFlight {
      uint64_t seq;
      uint32_t slot;
      uint64_t submitted_ns;
    };
    std::deque<InFlight> q;
    auto submit = [&](uint32_t slot) -> Result<> {
      const uint64_t t = NowNs();
      VG_TRY_ASSIGN(uint64_t seq, drv_->Submit(slot_cmds_[slot]));
      q.push_back({seq, slot, t});
      return Ok();
    };
    for (uint32_t s = 0; s < slots; ++s)
      if (auto r = submit(s); !r.ok()) return Fail(5, "submit: " + r.error().ToString());
    while (!ctl_.stop.load()) {
      Result<> w = drv_->Wait(q.front().seq, guest::WaitMode::kIrq, 200);
      if (!w.ok()) {
        if (w.code() == Errc::kTimeout) continue;  // starved for now: see whether it is over
        return Fail(5, "wait: " + w.error().ToString());
      }
      const uint64_t now = NowNs();
      const uint64_t done = drv_->completed();
      // Nothing of ours left on the device or in its queue: this tenant ran dry for a moment
      // (the runner checks that it stays rare: the figures assume every tenant is busy).
      if (done >= drv_->last_submitted()) st_.dry.fetch_add(1);
      while (!q.empty() && q.front().seq <= done) {
        Record(now, q.front().submitted_ns);
        const uint32_t slot = q.front().slot;
        q.pop_front();
        if (auto r = submit(slot); !r.ok()) return Fail(5, "submit: " + r.error().ToString());
      }
    }
    return 0;
  }

  // The light tenant: submit, wait for the fence, again; each round trip recorded.
  int ClosedLoop() {
    while (!ctl_.stop.load()) {
      const uint64_t t0 = NowNs();
      auto seq = drv_->Submit(slot_cmds_[0]);
      if (!seq.ok()) return Fail(5, "submit: " + seq.error().ToString());
      if (auto w = WaitFor(*seq, 60000); !w.ok()) return Fail(5, "wait: " + w.error().ToString());
      Record(NowNs(), t0);
      if (cfg_.think_us) std::this_thread::sleep_for(std::chrono::microseconds(cfg_.think_us));
    }
    return 0;
  }

  SharedControl& ctl_;
  TenantConfig& cfg_;
  TenantState& st_;
  TenantRecord* rec_;
  std::unique_ptr<guest::Device> dev_;
  std::unique_ptr<guest::Driver> drv_;
  shaders::KernelSample sample_;
  std::vector<std::vector<guest::GpuBuffer>> slot_bufs_;
  std::vector<guest::CommandBuilder> slot_cmds_;
};

// ---- The runner ---------------------------------------------------------------------------

// The spin kernel's counts for the targets, on the native path (the study's two-point fit:
// the fixed submission cost is not counted as kernel time), then native's own p50 at each.
Result<std::vector<SchedSpin>> CalibrateSpin(const std::string& gpu, const std::vector<double>& targets,
                                             std::vector<std::string>& errors) {
  PathConfig c;
  c.gpu = gpu;
  VG_TRY_ASSIGN(auto native, MakeNativePath(c));
  auto time_of = [&](uint32_t iters, int runs, bool min) -> Result<double> {
    Workload w;
    w.kind = Kind::kKernel;
    w.sample = SpinSample(iters);
    VG_TRY(native->Prepare(w));
    VG_TRY(native->RunOnce());  // the pipeline
    std::vector<double> us;
    for (int i = 0; i < runs; ++i) {
      auto t0 = Clock::now();
      VG_TRY(native->RunOnce());
      us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    }
    native->Release();
    const Stats s = Summarize(us);
    return min ? s.min : s.p50;
  };
  std::vector<SpinPoint> plan;
  std::vector<std::string> problems;
  for (int attempt = 0; attempt < 2; ++attempt) {
    VG_TRY_ASSIGN(double lo, time_of(2000, 9, true));
    VG_TRY_ASSIGN(double hi, time_of(20000, 9, true));
    const SpinFit fit = FitSpin(2000, lo, 20000, hi);
    plan = PlanSpin(targets, fit);
    problems = CheckSpinPlan(plan, fit);
    if (problems.empty()) break;
  }
  std::vector<SchedSpin> out;
  for (const SpinPoint& p : plan) {
    SchedSpin s{p.target_us, p.iterations, 0, false};
    // The fit's two points may each have met a burst of the machine's load: the count is
    // checked against native's time at that count, and scaled (up to twice) until native
    // says it is within 0.7-1.5x its target. The tenants only need identical dispatches of
    // about that length; the check says whether they got them.
    for (int round = 0;; ++round) {
      VG_TRY_ASSIGN(s.native_p50_us, time_of(s.iterations, p.target_us >= 5000 ? 5 : 15, false));
      const double ratio = s.native_p50_us / p.target_us;
      if (round == 2 || (ratio >= 0.7 && ratio <= 1.5) || s.native_p50_us <= 0) break;
      s.iterations = std::clamp<uint32_t>(static_cast<uint32_t>(s.iterations / ratio), kSpinMinIterations,
                                          kSpinMaxIterations);
    }
    s.ok = s.native_p50_us >= kCalibrationTolerance * p.target_us;
    if (!s.ok)
      errors.push_back(fmt::format("SPIN NOT CALIBRATED: ~{:.0f} us target: {} iterations took {:.0f} us on native "
                                   "(needs >= {:.0f} us){}",
                                   p.target_us, p.iterations, s.native_p50_us, kCalibrationTolerance * p.target_us,
                                   problems.empty() ? "" : "; the fit: " + fmt::format("{}", fmt::join(problems, "; "))));
    out.push_back(s);
  }
  return out;
}

// One vgpud of the group's and the vGPUs it runs now.
struct Host {
  bool weighted = false;
  std::string mode;  // ModeName: what `show` must report as its scheduling
  SchedDaemon d;
  std::vector<std::string> uuids, sockets;
  std::vector<uint32_t> weights;
};

// The "on" daemon's policy (SchedOptions::policy), or "off".
std::string ModeName(const SchedOptions& o, bool weighted) { return weighted ? o.policy : "off"; }

std::string SetUuid(int set, size_t i) { return fmt::format("5c4ed000-0000-4000-8{:03x}-{:012x}", set, i); }

// Starts one transient small vGPU per weight, each with its weight as the instance attribute
// sched_weight (the built-in types have the same weights, 100/200/400 for small/medium/large,
// but 16 tenants of the mix would pass the large type's max_instances and the aperture
// budget; the attribute is what the scheduler reads either way).
Result<> StartSet(Host& h, int set, const std::vector<uint32_t>& weights) {
  for (size_t i = 0; i < weights.size(); ++i) {
    const std::string u = SetUuid(set, i);
    Json req{{"op", "start"},
             {"uuid", u},
             {"type", "small"},
             {"attrs", Json::array({Json{{"sched_weight", std::to_string(weights[i])}}})}};
    VG_TRY_ASSIGN(Json r, ControlRequest(h.d.control, req, 60000));
    VG_ERROR_IF(!r.contains("socket") || !r["socket"].is_string(), Errc::kBadMessage, "start {}: no socket", u);
    h.uuids.push_back(u);
    h.sockets.push_back(r["socket"].get<std::string>());
    h.weights.push_back(weights[i]);
  }
  return Ok();
}

void StopSet(Host& h) {
  for (const auto& u : h.uuids) (void)ControlRequest(h.d.control, Json{{"op", "stop"}, {"uuid", u}}, 30000);
  h.uuids.clear();
  h.sockets.clear();
  h.weights.clear();
}

struct TenantSpec {
  size_t vgpu = 0;  // index into the host's set
  TenantKind kind = TenantKind::kBacklog;
  uint32_t spin_iterations = 0;
  uint32_t in_flight = 1;
  uint32_t think_us = 0;
};

// What one configuration left behind: per tenant its records and counts, the daemon's view
// at the interval's two ends.
struct Ran {
  uint64_t go_ns = 0, begin_ns = 0, end_ns = 0;
  std::vector<std::vector<TenantRecord>> records;
  std::vector<uint64_t> observed, dry;
  uint32_t niced = 0;  // tenants that ran at kTenantNice
  std::vector<Shown> at_begin, at_end;
  std::vector<std::string> errors;
};

// Starts the tenants (each this program in tenant mode, on its vGPU), waits until every one
// is ready, says go, measures [go + warm-up, + measure], says stop, and collects.
Ran RunTenants(const Host& h, const std::vector<TenantSpec>& specs, double warmup_s, double measure_s,
               uint32_t capacity, uint64_t guest_ram) {
  Ran out;
  const auto n = static_cast<uint32_t>(specs.size());
  const size_t bytes = SharedView::Bytes(n, capacity);
  // Inherited across exec on purpose (no MFD_CLOEXEC): the tenants map it by number.
  UniqueFd mfd(::memfd_create("vgpu-bench-sched", 0));
  if (!mfd.Valid() || ::ftruncate(mfd.Get(), static_cast<off_t>(bytes)) != 0) {
    out.errors.push_back(fmt::format("shared memory: {}", std::strerror(errno)));
    return out;
  }
  void* base = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, mfd.Get(), 0);
  if (base == MAP_FAILED) {
    out.errors.push_back(fmt::format("mmap: {}", std::strerror(errno)));
    return out;
  }
  SharedView v(base, bytes);
  auto* ctl = new (base) SharedControl();
  ctl->tenants = n;
  ctl->capacity = capacity;
  for (uint32_t i = 0; i < n; ++i) {
    auto* c = new (&v.config(i)) TenantConfig();
    std::snprintf(c->socket, sizeof c->socket, "%s", h.sockets[specs[i].vgpu].c_str());
    c->kind = specs[i].kind;
    c->spin_iterations = specs[i].spin_iterations;
    c->in_flight = specs[i].in_flight;
    c->think_us = specs[i].think_us;
    c->guest_ram = guest_ram;
    new (&v.state(i)) TenantState();
  }
  const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
  // Every argv built before the forks: this process has threads (the engine's, from the
  // calibration), so the child does nothing but exec.
  std::vector<std::vector<std::string>> args;
  std::vector<std::vector<char*>> argvs(n);
  for (uint32_t i = 0; i < n; ++i)
    args.push_back({self, std::string(kTenantFlag), std::to_string(mfd.Get()), std::to_string(i)});
  for (uint32_t i = 0; i < n; ++i) {
    for (auto& a : args[i]) argvs[i].push_back(a.data());
    argvs[i].push_back(nullptr);
  }
  std::vector<pid_t> kids;
  for (uint32_t i = 0; i < n; ++i) {
    pid_t pid = ::fork();
    if (pid == 0) {
      ::execv(argvs[i][0], argvs[i].data());
      std::_Exit(127);
    }
    kids.push_back(pid);
  }
  std::vector<bool> exited(n, false);
  std::vector<int> status(n, 0);
  for (uint32_t i = 0; i < n; ++i)
    if (kids[i] <= 0) {  // fork failed: never signal or wait for a pid we do not have
      exited[i] = true;
      status[i] = 127 << 8;
      std::snprintf(v.state(i).why, sizeof v.state(i).why, "fork: %s", std::strerror(errno));
    }
  auto reap = [&](bool block) {
    for (uint32_t i = 0; i < n; ++i)
      if (!exited[i] && kids[i] > 0 && ::waitpid(kids[i], &status[i], block ? 0 : WNOHANG) == kids[i]) exited[i] = true;
  };
  auto why = [&](uint32_t i) {
    const TenantState& s = v.state(i);
    std::string w(s.why, strnlen(s.why, sizeof s.why));
    if (exited[i] && !(WIFEXITED(status[i]) && WEXITSTATUS(status[i]) == 0))
      w += fmt::format(" (exit {})", WIFEXITED(status[i]) ? WEXITSTATUS(status[i]) : 128 + WTERMSIG(status[i]));
    return w;
  };
  // Ready: every tenant has opened its vGPU and completed its warm-up dispatches.
  const auto ready_by = Clock::now() + std::chrono::seconds(120);
  bool ready = false;
  while (!ready) {
    reap(false);
    ready = true;
    bool dead = false;
    for (uint32_t i = 0; i < n; ++i) {
      ready &= v.state(i).phase.load() == kReady;
      dead |= exited[i] || v.state(i).phase.load() == kFailed;
    }
    if (dead || (!ready && Clock::now() > ready_by)) break;
    if (!ready) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (ready) {
    auto show_all = [&](std::vector<Shown>& into) {
      for (const TenantSpec& s : specs) {
        auto r = ShowVgpu(h.d.control, h.uuids[s.vgpu]);
        if (!r.ok()) out.errors.push_back(fmt::format("show {}: {}", h.uuids[s.vgpu], r.error().ToString()));
        into.push_back(r.ok() ? *r : Shown{});
      }
    };
    out.go_ns = NowNs();
    ctl->go.store(1);
    std::this_thread::sleep_for(std::chrono::duration<double>(warmup_s));
    show_all(out.at_begin);
    // The interval starts after the first snapshot: its shows (one ping of each worker) are
    // then outside it, and the device time from the snapshots covers about the same span.
    out.begin_ns = NowNs();
    std::this_thread::sleep_for(std::chrono::duration<double>(measure_s));
    out.end_ns = NowNs();
    show_all(out.at_end);
  } else {
    for (uint32_t i = 0; i < n; ++i)
      if (v.state(i).phase.load() != kReady)
        out.errors.push_back(fmt::format("tenant {} ({}) never became ready: {}", i, h.uuids[specs[i].vgpu],
                                         why(i).empty() ? "timed out" : why(i)));
  }
  ctl->stop.store(1);
  // Each tenant drains what it has in flight and checks its results (the heavy ones' spin
  // reference takes a moment of CPU): bounded, then killed.
  const auto exit_by = Clock::now() + std::chrono::seconds(180);
  for (;;) {
    reap(false);
    if (std::all_of(exited.begin(), exited.end(), [](bool e) { return e; }) || Clock::now() > exit_by) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  for (uint32_t i = 0; i < n; ++i)
    if (!exited[i] && kids[i] > 0) {
      ::kill(kids[i], SIGKILL);
      ::waitpid(kids[i], &status[i], 0);
      exited[i] = true;
      out.errors.push_back(fmt::format("tenant {} ({}) did not finish within 180 s after stop; killed", i,
                                       h.uuids[specs[i].vgpu]));
    }
  for (uint32_t i = 0; i < n; ++i) {
    const TenantState& s = v.state(i);
    const bool clean = WIFEXITED(status[i]) && WEXITSTATUS(status[i]) == 0 && s.phase.load() == kFinished;
    if (ready && !clean)
      out.errors.push_back(fmt::format("tenant {} ({}) failed: {}", i, h.uuids[specs[i].vgpu], why(i)));
    const uint64_t recs = std::min<uint64_t>(s.records.load(), capacity);
    out.records.emplace_back(v.records(i), v.records(i) + recs);
    out.observed.push_back(s.observed.load());
    out.dry.push_back(s.dry.load());
    out.niced += s.niced.load();
  }
  ::munmap(base, bytes);
  return out;
}

// A backlogged tenant has work all along: on the device or held back by its worker's gate
// (show: counters.gpu_time_ns + queue_wait_ns; the scheduler's own wait_ms is only added
// up when a grant comes, so a tenant starved through the interval would read 0 there).
// A hold and device work can overlap, and the snapshots cut one hold or grant at each end:
// a busy tenant reads about 1, a little under or over.
constexpr double kMinBusy = 0.85;

// Per tenant: completions in the interval, device time from the snapshots, and the checks
// every configuration shares (the daemon's mode and weight as asked, every tenant completed
// work, every busy tenant was backlogged, no record lost).
std::vector<TenantFigures> TenantFiguresOf(const Host& h, const std::vector<TenantSpec>& specs, const Ran& ran,
                                           uint32_t capacity, std::vector<std::string>& errors) {
  const double interval_ms = static_cast<double>(ran.end_ns - ran.begin_ns) / 1e6;
  std::vector<TenantFigures> out;
  for (size_t i = 0; i < specs.size(); ++i) {
    TenantFigures t;
    t.uuid = h.uuids[specs[i].vgpu];
    if (i < ran.at_begin.size() && i < ran.at_end.size()) {
      const Shown &a = ran.at_begin[i], &b = ran.at_end[i];
      t.weight = b.weight;
      t.device_ms = static_cast<double>(b.gpu_time_ns - std::min(a.gpu_time_ns, b.gpu_time_ns)) / 1e6;
      t.grants = b.grants - std::min(a.grants, b.grants);
      t.preemptions = b.preemptions - std::min(a.preemptions, b.preemptions);
      t.sched_used_ms = std::max(0.0, b.used_ms - a.used_ms);
      t.wait_ms = std::max(0.0, b.wait_ms - a.wait_ms);
      t.charged_ms = std::max(0.0, b.charged_ms - a.charged_ms);
      t.held_ms = static_cast<double>(b.queue_wait_ns - std::min(a.queue_wait_ns, b.queue_wait_ns)) / 1e6;
      t.sched_state_at_end = b.sched_state;
      if (b.scheduling != h.mode)
        errors.push_back(fmt::format("{}: the daemon says scheduling '{}', the run asked for '{}'", t.uuid,
                                     b.scheduling, h.mode));
      if (b.weight != h.weights[specs[i].vgpu])
        errors.push_back(fmt::format("{}: effective weight {} (show), the run set {}", t.uuid, b.weight,
                                     h.weights[specs[i].vgpu]));
      if (b.state != "running")
        errors.push_back(fmt::format("{}: state '{}' at the end of the interval (a worker restarted?)", t.uuid, b.state));
    }
    if (i < ran.records.size()) {
      for (const TenantRecord& r : ran.records[i])
        if (r.done_ns >= ran.begin_ns && r.done_ns < ran.end_ns) ++t.completions;
      t.observed = ran.observed[i];
      t.dry = ran.dry[i];
      if (t.observed > capacity)
        errors.push_back(fmt::format("{}: {} completions, only {} recorded (record capacity)", t.uuid, t.observed,
                                     capacity));
    }
    if (t.completions) t.device_per_dispatch_us = t.device_ms * 1e3 / static_cast<double>(t.completions);
    if (ran.begin_ns && t.completions == 0)
      errors.push_back(fmt::format("{}: completed no work in the measured interval{}", t.uuid,
                                   h.weighted ? fmt::format(" ({} grants; work held {:.0f} ms; scheduler state at the end: {})",
                                                            t.grants, t.held_ms, t.sched_state_at_end)
                                              : std::string()));
    // Backlogged: the share of a tenant that was not busy, or the latency beside a neighbour
    // that was not, is not the scheduler's doing. (`dry` is a figure, not this check: a grant
    // that completes a tenant's whole queue leaves it seen empty for a moment, busy as it is.)
    if (ran.begin_ns && interval_ms > 0) {
      t.busy = (t.held_ms + t.device_ms) / interval_ms;
      if (specs[i].kind == TenantKind::kBacklog && t.busy < kMinBusy)
        errors.push_back(fmt::format("{}: NOT BACKLOGGED: work held or on the device only {:.0f}% of the interval "
                                     "(needs >= {:.0f}%)",
                                     t.uuid, t.busy * 100, kMinBusy * 100));
    }
    out.push_back(std::move(t));
  }
  return out;
}

const SchedSpin* SpinFor(const SchedReport& r, double target) {
  for (const SchedSpin& s : r.spin)
    if (s.target_us == target) return &s;
  return nullptr;
}

void Progress(const SchedOptions& o, const std::string& what) {
  if (o.progress) std::fprintf(stderr, "\rvgpu-bench: %-60s", what.c_str());
}

FairnessRun RunFairness(Host& h, const std::string& weights, int n, const SchedOptions& o, const SchedSpin& spin) {
  FairnessRun run;
  run.weights = weights;
  run.weighted = h.weighted;
  run.tenants = n;
  std::vector<TenantSpec> specs;
  for (int i = 0; i < n; ++i)
    specs.push_back({static_cast<size_t>(i), TenantKind::kBacklog, spin.iterations, o.in_flight});
  // Records: a tenant alone completes at most about one dispatch per kernel time; 4x that
  // over the whole run, at least 4096.
  const double total_s = o.warmup_s + o.measure_s + 2;
  const auto capacity =
      static_cast<uint32_t>(std::max(4096.0, 4 * total_s * 1e6 / std::max(spin.target_us, 10.0)));
  Ran ran = RunTenants(h, specs, o.warmup_s, o.measure_s, capacity, o.guest_ram);
  run.errors = ran.errors;
  run.tenant = TenantFiguresOf(h, specs, ran, capacity, run.errors);
  run.niced = ran.niced;
  if (!ran.begin_ns) return run;
  uint64_t grants = 0;
  double used = 0;
  for (const TenantFigures& t : run.tenant) {
    grants += t.grants;
    used += t.sched_used_ms;
  }
  run.grant_ms = grants ? used / static_cast<double>(grants) : 0;
  run.measured_s = Seconds(ran.end_ns - ran.begin_ns);
  std::vector<std::vector<double>> done(specs.size());
  std::vector<double> w;
  for (size_t i = 0; i < specs.size(); ++i) {
    for (const TenantRecord& r : ran.records[i]) done[i].push_back(Seconds(r.done_ns - ran.go_ns));
    w.push_back(h.weights[specs[i].vgpu]);
  }
  run.shares = AnalyzeShares(done, w, Seconds(ran.begin_ns - ran.go_ns), Seconds(ran.end_ns - ran.go_ns), o.window_s,
                             o.tolerance_pct);
  double device = 0;
  std::vector<double> per_weight;
  for (size_t i = 0; i < run.tenant.size(); ++i) {
    device += run.tenant[i].device_ms;
    per_weight.push_back(run.tenant[i].device_ms / w[i]);
  }
  for (const TenantFigures& t : run.tenant) run.device_share.push_back(device > 0 ? t.device_ms / device : 0);
  run.device_jain = JainIndex(per_weight);
  if (run.shares.windows && run.shares.empty_windows * 2 > run.shares.windows)
    run.errors.push_back(fmt::format("{} of {} windows saw no completion at all", run.shares.empty_windows,
                                     run.shares.windows));
  return run;
}

NoisyRun RunNoisy(Host& h, int heavy, uint32_t think_us, const SchedOptions& o, const SchedSpin& spin) {
  NoisyRun run;
  run.weighted = h.weighted;
  run.heavy = heavy;
  run.think_us = think_us;
  std::vector<TenantSpec> specs{{0, TenantKind::kClosedLoop, 0, 1, think_us}};
  for (int i = 1; i <= heavy; ++i)
    specs.push_back({static_cast<size_t>(i), TenantKind::kBacklog, spin.iterations, o.heavy_in_flight});
  // The light tenant alone completes a small dispatch in a few hundred us at best.
  const auto capacity = static_cast<uint32_t>(std::max(16384.0, (o.warmup_s + o.noisy_s + 2) * 20000));
  Ran ran = RunTenants(h, specs, o.warmup_s, o.noisy_s, capacity, o.guest_ram);
  run.errors = ran.errors;
  run.tenant = TenantFiguresOf(h, specs, ran, capacity, run.errors);
  run.niced = ran.niced;
  if (!ran.begin_ns) return run;
  const double interval_ms = static_cast<double>(ran.end_ns - ran.begin_ns) / 1e6;
  uint64_t grants = 0;
  double used = 0, device = 0;
  for (size_t i = 1; i < run.tenant.size(); ++i) {
    grants += run.tenant[i].grants;
    used += run.tenant[i].sched_used_ms;
    device += run.tenant[i].device_ms;
  }
  run.heavy_grant_ms = grants ? used / static_cast<double>(grants) : 0;
  run.heavy_busy = interval_ms > 0 ? device / interval_ms : 0;
  const TenantFigures& light = run.tenant.front();
  run.light_wait_per_grant_ms = light.grants ? light.wait_ms / static_cast<double>(light.grants) : 0;
  double charged = 0;
  for (const TenantFigures& t : run.tenant) charged += t.charged_ms;
  run.light_charged_per_grant_ms = light.grants ? light.charged_ms / static_cast<double>(light.grants) : 0;
  run.light_charged_share = charged > 0 ? light.charged_ms / charged : 0;
  // Whether the engine was busy is a figure, not a precondition (each heavy tenant's backlog
  // is): a scheduler that idles the engine while a busy neighbour waits is what the group shows.
  std::vector<double> us;
  for (const TenantRecord& r : ran.records[0])
    if (r.done_ns >= ran.begin_ns && r.done_ns < ran.end_ns) us.push_back(static_cast<double>(r.latency_ns) / 1e3);
  run.light_us = Summarize(std::move(us));
  return run;
}

std::string Pct(double x) { return fmt::format("{:.0f}%", x * 100); }

bool NotNiced(const SchedReport& r) {
  for (const FairnessRun& f : r.fairness)
    if (f.niced < static_cast<uint32_t>(f.tenants)) return true;
  for (const NoisyRun& n : r.noisy)
    if (n.niced < n.tenant.size()) return true;
  return false;
}
std::string NotNicedNote() {
  return fmt::format("NOTE: some tenants could not run at nice {} (no CAP_SYS_NICE): they compete with the "
                     "engines' threads for the cores, and may run dry (see the dry column)",
                     kTenantNice);
}

const NoisyRun* FindNoisy(const SchedReport& r, bool weighted, int heavy, uint32_t think_us) {
  for (const NoisyRun& n : r.noisy)
    if (n.weighted == weighted && n.heavy == heavy && n.think_us == think_us) return &n;
  return nullptr;
}

}  // namespace

bool SchedReport::complete() const {
  if (!ran) return true;
  if (!errors.empty()) return false;
  for (const FairnessRun& f : fairness)
    if (!f.ok()) return false;
  for (const NoisyRun& n : noisy)
    if (!n.ok()) return false;
  return true;
}

bool IsSchedTenant(int argc, char** argv) { return argc >= 2 && std::string_view(argv[1]) == kTenantFlag; }

int SchedTenantMain(int argc, char** argv) {
  if (argc != 4) return 2;
  int fd = -1;
  uint32_t index = 0;
  const std::string_view a(argv[2]), b(argv[3]);
  if (std::from_chars(a.data(), a.data() + a.size(), fd).ec != std::errc{} ||
      std::from_chars(b.data(), b.data() + b.size(), index).ec != std::errc{})
    return 2;
  struct stat st {};
  if (::fstat(fd, &st) != 0 || st.st_size < static_cast<off_t>(sizeof(SharedControl))) return 2;
  const auto bytes = static_cast<size_t>(st.st_size);
  void* base = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  if (base == MAP_FAILED) return 2;
  SharedView v(base, bytes);
  if (!v.Valid() || index >= v.control().tenants) return 2;
  return Tenant(v, index).Run();
}

SchedReport MeasureSched(const SchedOptions& o, const SchedDaemonFactory& make_daemon) {
  SchedReport r;
  r.ran = true;
  r.options = o;
  Progress(o, "scheduler groups: calibrating the spin kernel");
  auto spin = CalibrateSpin(o.gpu, {o.kernel_us, o.heavy_kernel_us}, r.errors);
  if (!spin.ok()) {
    r.errors.push_back("calibration: " + spin.error().ToString());
    return r;
  }
  r.spin = *spin;
  const SchedSpin* fair_spin = SpinFor(r, o.kernel_us);
  const SchedSpin* heavy_spin = SpinFor(r, o.heavy_kernel_us);
  // Two daemons side by side: the scheduler on, and off as the baseline.
  std::vector<Host> hosts(2);
  for (int m = 0; m < 2; ++m) {
    hosts[m].weighted = m == 0;
    hosts[m].mode = ModeName(o, hosts[m].weighted);
    auto d = make_daemon(hosts[m].weighted, o.slice_us);
    if (!d.ok()) {
      r.errors.push_back(fmt::format("vgpud --sched {}: {}", hosts[m].mode, d.error().ToString()));
      return r;
    }
    hosts[m].d = std::move(*d);
  }
  int max_n = 0;
  if (o.fairness)
    for (int n : o.tenant_counts) max_n = std::max(max_n, n);
  int max_heavy = 0;
  if (o.noisy)
    for (int n : o.heavy_counts) max_heavy = std::max(max_heavy, n);
  // One set of vGPUs per weight mix on both daemons; each configuration uses its first N.
  // The configurations alternate between the daemons, the order flipping each time, so drift
  // on the machine falls on both modes alike.
  int flip = 0;
  auto each_mode = [&](const std::function<void(Host&)>& f) {
    for (int k = 0; k < 2; ++k) f(hosts[static_cast<size_t>((k + flip) % 2)]);
    ++flip;
  };
  auto start_sets = [&](int set, const std::vector<uint32_t>& weights) {
    bool ok = true;
    for (Host& h : hosts) {
      Progress(o, fmt::format("scheduler groups: starting {} vGPUs on the {} daemon", weights.size(),
                              h.mode));
      if (auto s = StartSet(h, set, weights); !s.ok()) {
        r.errors.push_back(fmt::format("vgpud --sched {}: {}", h.mode, s.error().ToString()));
        ok = false;
      }
    }
    return ok;
  };
  const int equal_n = std::max(max_n, max_heavy + 1);
  if (equal_n > 0 && start_sets(0, std::vector<uint32_t>(static_cast<size_t>(equal_n), 100))) {
    if (o.fairness && fair_spin)
      for (int n : o.tenant_counts)
        each_mode([&](Host& h) {
          Progress(o, fmt::format("fairness: {} tenants, equal weights, sched {}", n, h.mode));
          r.fairness.push_back(RunFairness(h, "equal", n, o, *fair_spin));
        });
    if (o.noisy && heavy_spin)
      for (uint32_t think : o.light_think_us)
        for (int heavy : o.heavy_counts)
          each_mode([&](Host& h) {
            Progress(o, fmt::format("noisy: light tenant (think {} us) + {} heavy, sched {}", think, heavy,
                                    h.mode));
            r.noisy.push_back(RunNoisy(h, heavy, think, o, *heavy_spin));
          });
  }
  for (Host& h : hosts) StopSet(h);
  if (o.fairness && fair_spin && max_n > 0) {
    // 1:2:4, cycling as the types small, medium, large weigh.
    std::vector<uint32_t> mix;
    for (int i = 0; i < max_n; ++i) mix.push_back(100u << (i % 3));
    if (start_sets(1, mix))
      for (int n : o.tenant_counts)
        each_mode([&](Host& h) {
          Progress(o, fmt::format("fairness: {} tenants, weights 1:2:4, sched {}", n, h.mode));
          r.fairness.push_back(RunFairness(h, "mixed", n, o, *fair_spin));
        });
    for (Host& h : hosts) StopSet(h);
  }
  if (o.progress) std::fprintf(stderr, "\n");
  // Report order: by weights, tenants, then weighted before off.
  auto fkey = [](const FairnessRun& f) { return std::make_tuple(f.weights, f.tenants, !f.weighted); };
  std::stable_sort(r.fairness.begin(), r.fairness.end(),
                   [&](const FairnessRun& a, const FairnessRun& b) { return fkey(a) < fkey(b); });
  auto nkey = [](const NoisyRun& n) { return std::make_tuple(n.think_us, n.heavy, !n.weighted); };
  std::stable_sort(r.noisy.begin(), r.noisy.end(), [&](const NoisyRun& a, const NoisyRun& b) { return nkey(a) < nkey(b); });
  return r;
}

std::string FormatSched(const SchedReport& r) {
  if (!r.ran) return "";
  const SchedOptions& o = r.options;
  std::string out;
  out += fmt::format("== scheduler: spin kernel (native, before the tenants)\n{:>10} {:>11} {:>14}  {}\n", "target us",
                     "iterations", "native p50 us", "ok");
  for (const SchedSpin& s : r.spin)
    out += fmt::format("{:>10.0f} {:>11} {:>14.0f}  {}\n", s.target_us, s.iterations, s.native_p50_us,
                       s.ok ? "yes" : "NO: SPIN NOT CALIBRATED");
  if (!r.fairness.empty()) {
    out += fmt::format(
        "== fairness ({} busy tenants each keeping {} spin dispatches of ~{:.0f} us in flight; shares of completed "
        "work per {:.0f} ms window against weight / sum(weights); pp = percentage points, rel = relative to the "
        "entitled share; within = windows with every tenant within ±{:.0f})\n",
        fmt::join(o.tenant_counts, "/"), o.in_flight, o.kernel_us, o.window_s * 1e3, o.tolerance_pct);
    out += fmt::format("{:<7} {:>3} {:<8} {:>5} {:>9} {:>8} {:>8} {:>9} {:>9} {:>10} {:>10} {:>8} {:>8} {:>9} {:>8} "
                       "{:>6} {:>5} {:>8}  {}\n",
                       "weights", "N", "sched", "wins", "n/win", "mean pp", "max pp", "within pp", "mean rel",
                       "max rel", "within rel", "Jain", "dev Jain", "disp/s", "dev us", "dry", "busy", "grant ms", "ok");
    for (const FairnessRun& f : r.fairness) {
      uint64_t done = 0, dry = 0, observed = 0;
      double dev_us = 0, busy = f.tenant.empty() ? 0 : 1e9;
      for (const TenantFigures& t : f.tenant) {
        done += t.completions;
        dev_us += t.device_per_dispatch_us;
        dry += t.dry;
        observed += t.observed;
        busy = std::min(busy, t.busy);
      }
      if (!f.tenant.empty()) dev_us /= static_cast<double>(f.tenant.size());
      const ShareFigures& s = f.shares;
      out += fmt::format(
          "{:<7} {:>3} {:<8} {:>5} {:>9} {:>8.1f} {:>8.1f} {:>9} {:>8.1f}% {:>9.1f}% {:>10} {:>8.4f} {:>8.4f} "
          "{:>9.0f} {:>8.0f} {:>5.1f}% {:>4.0f}% {:>8}  {}\n",
          f.weights, f.tenants, ModeName(o, f.weighted), s.windows,
          fmt::format("{}/{}", s.min_window_total, s.median_window_total), s.mean_abs_pp, s.max_abs_pp,
          Pct(s.within_pp), s.mean_abs_rel_pct, s.max_abs_rel_pct, Pct(s.within_rel), s.jain, f.device_jain,
          f.measured_s > 0 ? static_cast<double>(done) / f.measured_s : 0.0, dev_us,
          observed ? 100.0 * static_cast<double>(dry) / static_cast<double>(observed) : 0.0, busy * 100,
          f.weighted ? fmt::format("{:.1f}", f.grant_ms) : std::string("-"), f.ok() ? "yes" : "NO (see below)");
    }
    out += "per tenant (weighted and off): weight, share of completions [entitled], share of device time\n";
    for (const FairnessRun& f : r.fairness) {
      std::string line = fmt::format("  {:<5} {:>2} {:<8}", f.weights, f.tenants, ModeName(o, f.weighted));
      for (size_t i = 0; i < f.tenant.size(); ++i)
        line += fmt::format(" {:.0f}:{:.1f}[{:.1f}]/{:.1f}", f.tenant[i].weight,
                            i < f.shares.share.size() ? f.shares.share[i] * 100 : 0.0,
                            i < f.shares.entitled.size() ? f.shares.entitled[i] * 100 : 0.0,
                            i < f.device_share.size() ? f.device_share[i] * 100 : 0.0);
      out += line + "\n";
    }
    for (const FairnessRun& f : r.fairness)
      for (const std::string& e : f.errors)
        out += fmt::format("FAIRNESS PRECONDITION FAILED: {} x{} sched {}: {}\n", f.weights, f.tenants,
                           ModeName(o, f.weighted), e);
  }
  if (!r.noisy.empty()) {
    out += fmt::format(
        "== noisy neighbours (light tenant: copy 4 KiB, wait for its fence, think `think` us, again (0: closed loop, "
        "as busy as it can be); heavy: {} spin dispatches of ~{:.0f} us in flight each; target: p99 with - p99 alone "
        "<= 2 x slice = {:.1f} ms)\n",
        o.heavy_in_flight, o.heavy_kernel_us, 2.0 * static_cast<double>(o.slice_us) / 1e3);
    out += fmt::format("{:>5} {:>5} {:<11} {:>7} {:>10} {:>10} {:>10} {:>9} {:>12} {:>8} {:>6} {:>10} {:>11}  {}\n",
                       "think", "heavy", "sched", "n", "p50 us", "p99 us", "max us", "p99/alone", "p99-alone us", "heavy/s",
                       "busy", "wait/grant", "heavy grant", "ok");
    for (const NoisyRun& n : r.noisy) {
      const NoisyRun* alone = FindNoisy(r, n.weighted, 0, n.think_us);
      const bool have = alone && alone->light_us.n && n.light_us.n;
      double heavy_rate = 0;
      for (size_t i = 1; i < n.tenant.size(); ++i) heavy_rate += static_cast<double>(n.tenant[i].completions);
      heavy_rate /= o.noisy_s;
      out += fmt::format("{:>5} {:>5} {:<11} {:>7} {:>10.0f} {:>10.0f} {:>10.0f} {:>9} {:>12} {:>8.1f} {:>5.0f}% {:>10} "
                         "{:>11}  {}{}\n",
                         n.think_us, n.heavy, ModeName(o, n.weighted), n.light_us.n, n.light_us.p50, n.light_us.p99, n.light_us.max,
                         have && n.heavy ? fmt::format("{:.2f}", n.light_us.p99 / alone->light_us.p99) : "-",
                         have && n.heavy ? fmt::format("{:.0f}", n.light_us.p99 - alone->light_us.p99) : "-",
                         heavy_rate, n.heavy_busy * 100,
                         n.weighted && n.heavy ? fmt::format("{:.2f} ms", n.light_wait_per_grant_ms) : "-",
                         n.weighted && n.heavy ? fmt::format("{:.1f} ms", n.heavy_grant_ms) : "-",
                         n.ok() ? "yes" : "NO (see below)",
                         n.light_us.n && n.light_us.n < 100 ? " (p99 of < 100 samples: the max)" : "");
    }
    for (const NoisyRun& n : r.noisy)
      for (const std::string& e : n.errors)
        out += fmt::format("NOISY PRECONDITION FAILED: think {} us, {} heavy, sched {}: {}\n", n.think_us, n.heavy,
                           ModeName(o, n.weighted), e);
  }
  if (NotNiced(r)) out += NotNicedNote() + "\n";
  for (const std::string& e : r.errors) out += fmt::format("SCHEDULER GROUPS FAILED: {}\n", e);
  return out;
}

void AddSchedJson(const SchedReport& r, nlohmann::json& j) {
  if (!r.ran) return;
  const SchedOptions& o = r.options;
  Json spin = Json::array();
  for (const SchedSpin& s : r.spin)
    spin.push_back({{"target_us", s.target_us}, {"iterations", s.iterations}, {"native_p50_us", s.native_p50_us},
                    {"ok", s.ok}});
  auto tenants = [](const std::vector<TenantFigures>& ts) {
    Json a = Json::array();
    for (const TenantFigures& t : ts)
      a.push_back({{"uuid", t.uuid},
                   {"weight", t.weight},
                   {"completions", t.completions},
                   {"observed", t.observed},
                   {"dry", t.dry},
                   {"device_ms", t.device_ms},
                   {"device_per_dispatch_us", t.device_per_dispatch_us},
                   {"grants", t.grants},
                   {"preemptions", t.preemptions},
                   {"sched_used_ms", t.sched_used_ms},
                   {"wait_ms", t.wait_ms},
                   {"charged_ms", t.charged_ms},
                   {"held_ms", t.held_ms},
                   {"sched_state_at_end", t.sched_state_at_end},
                   {"busy", t.busy}});
    return a;
  };
  if (o.fairness) {
    Json runs = Json::array();
    for (const FairnessRun& f : r.fairness) {
      const ShareFigures& s = f.shares;
      runs.push_back({{"weights", f.weights},
                      {"sched", ModeName(o, f.weighted)},
                      {"tenants", f.tenants},
                      {"measured_s", f.measured_s},
                      {"windows", s.windows},
                      {"empty_windows", s.empty_windows},
                      {"mean_abs_error_pp", s.mean_abs_pp},
                      {"max_abs_error_pp", s.max_abs_pp},
                      {"within_pp", s.within_pp},
                      {"mean_abs_error_rel_pct", s.mean_abs_rel_pct},
                      {"max_abs_error_rel_pct", s.max_abs_rel_pct},
                      {"within_rel", s.within_rel},
                      {"jain", s.jain},
                      {"min_window_completions", s.min_window_total},
                      {"median_window_completions", s.median_window_total},
                      {"per_window", s.per_window},
                      {"device_jain", f.device_jain},
                      {"grant_ms", f.grant_ms},
                      {"share", s.share},
                      {"entitled", s.entitled},
                      {"device_share", f.device_share},
                      {"tenant", tenants(f.tenant)},
                      {"tenants_niced", f.niced},
                      {"errors", f.errors},
                      {"ok", f.ok()}});
    }
    j["fairness"] = {{"window_ms", o.window_s * 1e3},
                     {"tolerance_pct", o.tolerance_pct},
                     {"warmup_s", o.warmup_s},
                     {"measure_s", o.measure_s},
                     {"kernel_us", o.kernel_us},
                     {"in_flight", o.in_flight},
                     {"slice_us", o.slice_us},
                     {"spin", spin},
                     {"runs", runs},
                     {"errors", r.errors},
                     {"complete", r.complete()}};
  }
  if (o.noisy) {
    Json runs = Json::array();
    for (const NoisyRun& n : r.noisy) {
      const NoisyRun* alone = FindNoisy(r, n.weighted, 0, n.think_us);
      Json x{{"sched", ModeName(o, n.weighted)},
             {"heavy", n.heavy},
             {"think_us", n.think_us},
             {"light_us",
              {{"n", n.light_us.n},
               {"p50", n.light_us.p50},
               {"p99", n.light_us.p99},
               {"max", n.light_us.max},
               {"mean", n.light_us.mean}}},
             {"light_wait_per_grant_ms", n.light_wait_per_grant_ms},
             {"light_charged_per_grant_ms", n.light_charged_per_grant_ms},
             {"light_charged_share", n.light_charged_share},
             {"heavy_grant_ms", n.heavy_grant_ms},
             {"heavy_busy", n.heavy_busy},
             {"tenant", tenants(n.tenant)},
             {"tenants_niced", n.niced},
             {"errors", n.errors},
             {"ok", n.ok()}};
      if (n.heavy && alone && alone->light_us.n && n.light_us.n) {
        x["p99_ratio_to_alone"] = n.light_us.p99 / alone->light_us.p99;
        x["p99_over_alone_us"] = n.light_us.p99 - alone->light_us.p99;
        x["target_met"] = n.light_us.p99 - alone->light_us.p99 <= 2.0 * static_cast<double>(o.slice_us);
      }
      runs.push_back(std::move(x));
    }
    j["noisy"] = {{"slice_us", o.slice_us},
                  {"target_over_alone_us", 2 * o.slice_us},
                  {"heavy_kernel_us", o.heavy_kernel_us},
                  {"heavy_in_flight", o.heavy_in_flight},
                  {"measure_s", o.noisy_s},
                  {"spin", spin},
                  {"runs", runs},
                  {"errors", r.errors},
                  {"complete", r.complete()}};
  }
}

void SummarizeSched(const SchedReport& r, std::vector<std::string>& s) {
  if (!r.ran) return;
  const SchedOptions& o = r.options;
  const double tol = o.tolerance_pct;
  auto find = [&](const std::string& weights, int n, bool weighted) -> const FairnessRun* {
    for (const FairnessRun& f : r.fairness)
      if (f.weights == weights && f.tenants == n && f.weighted == weighted) return &f;
    return nullptr;
  };
  for (const std::string weights : {"equal", "mixed"})
    for (int n : o.tenant_counts) {
      const FairnessRun* on = find(weights, n, true);
      const FairnessRun* off = find(weights, n, false);
      if (!on) continue;
      const ShareFigures& a = on->shares;
      // The target, read both ways (docs/ab-methodology.md): every window within ±5
      // percentage points, and within ±5 % of the entitled share; Jain >= 0.99 for equal weights.
      const bool pp_met = a.windows > a.empty_windows && a.within_pp >= 1.0;
      const bool rel_met = a.windows > a.empty_windows && a.within_rel >= 1.0;
      const bool jain_met = a.jain >= 0.99;
      std::string line = fmt::format(
          "fairness, {} weights, {} tenants, sched {}: |share error| mean {:.1f} pp, max {:.1f} pp, {} of {:.0f} ms "
          "windows within ±{:.0f} pp ({}); relative to the entitled share mean {:.1f}%, max {:.1f}%, {} within ±{:.0f}% "
          "({}); Jain {:.4f}{}",
          weights == "equal" ? "equal" : "1:2:4", n, o.policy, a.mean_abs_pp, a.max_abs_pp, Pct(a.within_pp),
          o.window_s * 1e3,
          tol, pp_met ? "MET" : "MISSED", a.mean_abs_rel_pct, a.max_abs_rel_pct, Pct(a.within_rel), tol,
          rel_met ? "MET" : "MISSED", a.jain,
          weights == "equal" ? fmt::format(" (target >= 0.99: {})", jain_met ? "MET" : "MISSED") : " (of completions / weight)");
      line += fmt::format("; {:.1f} ms of device time per grant (slice {:.1f} ms)", on->grant_ms,
                          static_cast<double>(o.slice_us) / 1e3);
      // What a window can resolve (docs/ab-methodology.md): a tenant's share of one window
      // moves by a whole grant (n tenants taking turns: n x grant / window of its share), and
      // it is counted in whole completions (one of its completions per window).
      if (on->grant_ms > 0 && a.median_window_total > 0)
        line += fmt::format("; granularity of a window's share, relative: one grant {:.0f}%, one completion {:.0f}%",
                            100.0 * n * on->grant_ms / (o.window_s * 1e3),
                            100.0 * n / static_cast<double>(a.median_window_total));
      if (off)
        line += fmt::format("; sched off: mean {:.1f} pp, max {:.1f} pp, {} within ±{:.0f} pp, Jain {:.4f}",
                            off->shares.mean_abs_pp, off->shares.max_abs_pp, Pct(off->shares.within_pp), tol,
                            off->shares.jain);
      if (!on->ok() || (off && !off->ok())) line += " (PRECONDITION FAILED: see the fairness section)";
      s.push_back(line);
    }
  for (const NoisyRun& n : r.noisy) {
    if (!n.heavy || !n.weighted) continue;
    const NoisyRun* alone = FindNoisy(r, true, 0, n.think_us);
    const NoisyRun* off = FindNoisy(r, false, n.heavy, n.think_us);
    const NoisyRun* off_alone = FindNoisy(r, false, 0, n.think_us);
    if (!alone || !alone->light_us.n || !n.light_us.n) continue;
    const double over = n.light_us.p99 - alone->light_us.p99;
    const double limit = 2.0 * static_cast<double>(o.slice_us);
    std::string line = fmt::format(
        "noisy neighbours, light tenant ({}) next to {} heavy, sched {}: p50 {:.0f} us, p99 {:.0f} us; alone p50 "
        "{:.0f} us, p99 {:.0f} us; p99 ratio {:.2f}, p99 over alone {:.0f} us (target <= 2 x slice = {:.0f} us): {}",
        n.think_us ? fmt::format("thinks {} us", n.think_us) : std::string("closed loop"), n.heavy,
        ModeName(o, true), n.light_us.p50, n.light_us.p99, alone->light_us.p50, alone->light_us.p99,
        n.light_us.p99 / alone->light_us.p99, over, limit, over <= limit ? "MET" : "MISSED");
    line += fmt::format(
        " (it waited {:.1f} ms per grant; the heavy ones used {:.1f} ms of device time per grant and kept the device "
        "busy {:.0f}% of the time{})",
        n.light_wait_per_grant_ms, n.heavy_grant_ms, n.heavy_busy * 100,
        off ? fmt::format(", {:.0f}% with sched off", off->heavy_busy * 100) : std::string());
    // Whether the light tenant is under its share by the scheduler's own measure: the time it
    // held the engine while others waited (grant delivery, its work, what its worker took to
    // hand it back), against 1 / (heavy + 1) at equal weights. At or over it, a fair
    // scheduler makes it wait its turn behind the busy ones.
    line += fmt::format("; it was charged {:.2f} ms per grant, {:.1f}% of all charged time against a share of {:.1f}%",
                        n.light_charged_per_grant_ms, n.light_charged_share * 100, 100.0 / (n.heavy + 1));
    if (off && off_alone && off->light_us.n && off_alone->light_us.n)
      line += fmt::format("; sched off: p50 {:.0f} us, p99 {:.0f} us, ratio {:.2f}, over alone {:.0f} us",
                          off->light_us.p50, off->light_us.p99, off->light_us.p99 / off_alone->light_us.p99,
                          off->light_us.p99 - off_alone->light_us.p99);
    if (!n.ok() || !alone->ok() || (off && !off->ok())) line += " (PRECONDITION FAILED: see the noisy section)";
    s.push_back(line);
  }
  for (const SchedSpin& sp : r.spin)
    if (!sp.ok)
      s.push_back(fmt::format("SCHEDULER GROUPS: SPIN NOT CALIBRATED for ~{:.0f} us: the dispatches hold {:.0f} us of "
                              "native work",
                              sp.target_us, sp.native_p50_us));
  size_t failed = 0;
  for (const FairnessRun& f : r.fairness) failed += !f.ok();
  for (const NoisyRun& n : r.noisy) failed += !n.ok();
  if (failed)
    s.push_back(fmt::format("SCHEDULER GROUPS: {} configuration(s) failed a precondition (tenant not backlogged, no "
                            "work, wrong result, mode or weight not as asked): their figures are not evidence",
                            failed));
  if (NotNiced(r)) s.push_back("SCHEDULER GROUPS: " + NotNicedNote());
  for (const std::string& e : r.errors) s.push_back("SCHEDULER GROUPS FAILED: " + e);
}

}  // namespace vg::bench
