// vgpud-worker: serves one vGPU for the vgpud supervisor (docs/isolation.md). It is started
// by the supervisor only, with the vGPU's two listening sockets and its channel at fixed fd
// numbers (tools/vgpud/worker_channel.h), creates its own engine instance, the device model
// and the listeners, enters its sandbox, says Ready and serves until told to stop. Whatever a
// guest breaks in here ends here.
//
//   vgpud-worker --probe [--gpu X]   prints the engine's device as one JSON line and exits
//                                    (the supervisor names the mdev parent after it)

#include <CLI/CLI.hpp>
#include <event2/event.h>
#include <event2/thread.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <fcntl.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>

#include <nlohmann/json.hpp>

#include "base/cpu_slice.h"
#include "engine/engine.h"
#include "mediator/mediator.h"
#include "remoting/remoting.h"
#include "sandbox/sandbox.h"
#include "tools/vgpud-worker/sched_gate.h"
#include "tools/vgpud-worker/vnc.h"
#include "tools/vgpud/event_base.h"
#include "tools/vgpud/worker_channel.h"
#include "vfio_user/server.h"

using namespace vg;
namespace ch = vg::daemon::channel;

namespace {

// Exit statuses the supervisor names (docs/isolation.md).
constexpr int kExitStartup = 1;       // could not create the engine, device or listeners
constexpr int kExitOutOfMemory = 3;   // an allocation was refused (its address-space limit)
constexpr int kExitSupervisorGone = 4;

struct Options {
  Uuid uuid;
  std::string uuid_text, type = "vgpud-small", socket_name, remoting_name, gpu, log_level = "info";
  uint64_t aperture = 64ull << 20;
  uint32_t gtt_entries = 16384;
  uint64_t dma_max_bytes = 64ull << 30, dma_total_bytes = 64ull << 30;
  uint32_t dma_max_regions = vfio_user::DmaLimits{}.max_regions;
  int unmap_timeout_ms = vfio_user::ServerLimits{}.unmap_timeout_ms;
  uint64_t address_space = 0;
  uint64_t open_files = 1024;
  bool seccomp = true;
  uint32_t executor_depth = mediator::VgpuConfig{}.executor_depth;
  uint64_t time_granularity_us = abi::cmd::kDefaultTimeGranularityNs / 1000;
  bool zero_copy = true;
  bool coalesce = true;
  bool inline_complete = true;
  bool scheduled = false;  // the supervisor's scheduler grants the engine (until kSchedConfig says otherwise)
  uint32_t orphan_grace_s = 60;  // orphaned and without a client this long: exit
  mediator::FaultPolicy faults;
  std::string vnc_password;  // F10: from Go; empty: none
};

// F7: the device model's fault monitor, as the remoting server asks it. One monitor per vGPU,
// so faults on either path throttle and quarantine both.
class RemotingGate final : public remoting::FaultGate {
 public:
  explicit RemotingGate(mediator::FaultMonitor& m) : m_(m) {}
  Admission Admit() override {
    const mediator::Admission a = m_.Admit();
    return {a.code, a.wait};
  }
  void OnFault() override { m_.OnFault(mediator::FaultKind::kRemotingError); }

 private:
  mediator::FaultMonitor& m_;
};

using Token = std::array<uint64_t, ch::kTokenWords>;

class Worker {
 public:
  static Result<std::unique_ptr<Worker>> Create(const Options& o, const Token& token);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  Result<> Serve();

 private:
  explicit Worker(const Options& o) : opts_(o) {}
  static void OnDoorbell(int, short, void* arg);
  static void OnThrottle(int, short, void* arg);
  static void OnFrame(int, short, void* arg);
  static void OnVncRefresh(int, short, void* arg);
  static void OnChannel(int fd, short, void* arg);
  static void OnSignal(int, short, void* arg);
  static void OnAdoptConnect(int fd, short, void* arg);
  static void OnAdoptRecord(int fd, short what, void* arg);
  static void OnOrphanTick(int, short, void* arg);
  static void OnStopPoll(int, short, void* arg);
  void Pong(uint64_t seq);
  void RestoreHealth(const ch::Record& r);
  void OnStopRequest(uint64_t timeout_ms);
  void OnScreenshot(uint64_t seq);
  void OnFault(ch::Fault f);
  // The supervisor is gone (docs/isolation.md, "Supervisor restart"): keep serving the
  // guest, ungated by a scheduler nobody runs, and wait for a new supervisor to adopt us.
  void Orphan();
  void DropAdopter();

  Token token_{};
  bool orphaned_ = false;
  worker::GateConfig gate_cfg_;  // as the supervisor last configured it
  event* channel_ev_ = nullptr;
  event* adopt_ev_ = nullptr;    // the adoption socket, watched only while orphaned
  UniqueFd adopter_;             // one connection at a time, until its kAdopt or a timeout
  event* adopter_ev_ = nullptr;
  event* orphan_ev_ = nullptr;   // once a second while orphaned
  std::chrono::steady_clock::time_point idle_since_;

  Options opts_;
  event_base* base_ = nullptr;
  // Declared before the engine: destroyed after it (the engine's threads call it).
  std::unique_ptr<worker::SchedGate> gate_;
  std::unique_ptr<engine::Engine> engine_;
  // Armed from any thread (VgpuConfig::throttle_timer); freed after vgpu_, whose threads arm it.
  event* throttle_ev_ = nullptr;
  event* frame_ev_ = nullptr;  // F10: the scan-out's frame clock (VgpuConfig::frame_clock), likewise
  std::unique_ptr<mediator::Vgpu> vgpu_;
  std::unique_ptr<RemotingGate> fault_gate_;
  std::unique_ptr<remoting::Listener> remoting_;
  std::unique_ptr<vfio_user::Listener> vfio_;
  // F10: the console (fd 8, when the supervisor gave one) and its 10 Hz refresh.
  std::unique_ptr<worker::VncConsole> vnc_;
  std::vector<event*> events_;
  // F8: a stop that asked the client to let go (REQ) and waits for it, bounded.
  event* stop_poll_ev_ = nullptr;
  std::chrono::steady_clock::time_point stop_deadline_{};
};

// What the fault monitor's report says of why, in the channel's words.
static ch::HealthReason ReasonOf(const mediator::HealthReport& h) {
  if (h.cause == mediator::HealthCause::kQuarantineLifted) return ch::HealthReason::kQuarantineLifted;
  if (h.cause != mediator::HealthCause::kFaults) return ch::HealthReason::kNone;
  static constexpr ch::HealthReason kByKind[] = {ch::HealthReason::kCommandRefusals, ch::HealthReason::kMmioRefusals,
                                                 ch::HealthReason::kDmaFaults, ch::HealthReason::kRemotingErrors};
  static_assert(std::size(kByKind) == mediator::kFaultKinds);
  return kByKind[static_cast<size_t>(h.kind)];
}

Result<std::unique_ptr<Worker>> Worker::Create(const Options& o, const Token& token) {
  // Listener and doorbell events are added from this thread only, but the executor's
  // completion path wakes the loop from its own thread.
  VG_ERROR_IF(evthread_use_pthreads() != 0, Errc::kInternal, "evthread_use_pthreads failed");
  std::unique_ptr<Worker> w(new Worker(o));
  w->token_ = token;
  // Precise timers: the remoting sessions' ticks of coarsened time fall on multiples of the
  // granularity, not on the next millisecond of epoll_wait (tools/vgpud/event_base.h).
  VG_TRY_ASSIGN(w->base_, daemon::NewPreciseEventBase());
  vfio_user::DmaBudget::SetTotal(o.dma_total_bytes);
  engine::EngineOptions eo;
  eo.gpu = o.gpu;
  eo.allow_zero_copy = o.zero_copy;
  VG_TRY_ASSIGN(w->engine_, engine::Engine::Create(eo));
  // The engine's compute threads exist now, with the default slice (main() asked for it);
  // this thread and those it starts from here on (the gate's pump, the executor's threads,
  // the fetcher) only wait and hand on: a short slice wakes them at once beside busy compute
  // threads, whoever's they are (base/cpu_slice.h). Before the sandbox, which refuses it.
  if (!SetThreadCpuSlice(CpuSlice::kShort)) VG_LOGD("short CPU slices not in effect (Linux 6.12 or later)");
  // Every engine submission of both paths passes the gate (grant, rate limits). A record
  // that cannot be sent (the channel full) is lost only if the supervisor stopped reading,
  // and then its watchdog ends this worker anyway.
  w->gate_ = std::make_unique<worker::SchedGate>([](const ch::Record& r) { (void)ch::Send(ch::kChannelFd, r); });
  worker::GateConfig gc;
  gc.scheduled = o.scheduled;
  w->gate_cfg_ = gc;
  w->gate_->Configure(gc);
  w->engine_->SetGate(w->gate_.get());
  w->gate_->Start(w->engine_.get());
  w->throttle_ev_ = evtimer_new(w->base_, &Worker::OnThrottle, w.get());
  VG_ERROR_IF(!w->throttle_ev_, Errc::kInternal, "evtimer_new failed");
  w->frame_ev_ = event_new(w->base_, -1, EV_PERSIST, &Worker::OnFrame, w.get());
  VG_ERROR_IF(!w->frame_ev_, Errc::kInternal, "event_new failed");
  mediator::VgpuConfig cfg;
  cfg.uuid = o.uuid;
  cfg.type_name = o.type;
  cfg.aperture_size = o.aperture;
  cfg.gtt_entries = o.gtt_entries;
  cfg.engine = w->engine_.get();
  cfg.dma_limits.max_bytes = o.dma_max_bytes;
  cfg.dma_limits.max_regions = o.dma_max_regions;
  cfg.executor_depth = o.executor_depth;
  cfg.executor_coalesce = o.coalesce;
  cfg.executor_inline = o.inline_complete;
  cfg.time_granularity_ns = o.time_granularity_us * 1000;
  cfg.faults = o.faults;
  // evtimer_add is thread-safe (evthread_use_pthreads above) and wakes the loop; re-adding a
  // pending timer moves it.
  cfg.throttle_timer = [ev = w->throttle_ev_](std::chrono::nanoseconds wait) {
    const int64_t us = std::max<int64_t>(std::chrono::duration_cast<std::chrono::microseconds>(wait).count(), 1);
    const timeval tv{static_cast<time_t>(us / 1000000), static_cast<suseconds_t>(us % 1000000)};
    evtimer_add(ev, &tv);
  };
  // A persistent timer at the frame rate while a plane is scanned out; event_add and event_del
  // are thread-safe (a flip by LOAD_REG arms it from the executor's thread).
  cfg.frame_clock = [ev = w->frame_ev_](bool run) {
    if (!run) {
      event_del(ev);
      return;
    }
    const timeval tv{0, static_cast<suseconds_t>(1000000 / abi::display::kFrameHz)};
    event_add(ev, &tv);
  };
  VG_TRY_ASSIGN(w->vgpu_, mediator::Vgpu::Create(cfg));
  w->gate_->SetBacklogProbe([v = w->vgpu_.get()] { return v->HasBacklog(); });
  // A move to throttled or quarantined goes to the supervisor at once (kCarry), not with the
  // next heartbeat: a successor of a worker that dies the moment after starts so too.
  w->vgpu_->faults().SetObserver([](const mediator::HealthReport& h) {
    ch::Record r = ch::Make(ch::Kind::kCarry);
    auto set = [&](ch::CarrySlot k, uint64_t v) { r.values[static_cast<size_t>(k)] = v; };
    set(ch::CarrySlot::kWhat, ch::kCarryHealth);
    set(ch::CarrySlot::kHealth, static_cast<uint64_t>(h.health));
    set(ch::CarrySlot::kHealthReason, static_cast<uint64_t>(ReasonOf(h)));
    set(ch::CarrySlot::kHealthRate, h.rate_per_s);
    (void)ch::Send(ch::kChannelFd, r);
  });
  w->fault_gate_ = std::make_unique<RemotingGate>(w->vgpu_->faults());
  remoting::Limits rl;
  rl.time_granularity_ns = cfg.time_granularity_ns;
  VG_TRY_ASSIGN(w->remoting_, remoting::Listener::CreateOnSocket(w->base_, *w->engine_, UniqueFd(ch::kRemotingFd),
                                                                 o.remoting_name, rl));
  w->remoting_->SetFaultGate(w->fault_gate_.get());
  vfio_user::ServerLimits sl;
  sl.max_dma_maps = o.dma_max_regions;
  sl.unmap_timeout_ms = o.unmap_timeout_ms;
  VG_TRY_ASSIGN(w->vfio_, vfio_user::Listener::CreateOnSocket(w->base_, UniqueFd(ch::kVfioUserFd), o.socket_name,
                                                              *w->vgpu_, sl));
  auto add = [&](event* e) -> Result<> {
    VG_ERROR_IF(!e || event_add(e, nullptr) != 0, Errc::kInternal, "event_add failed");
    w->events_.push_back(e);
    return Ok();
  };
  VG_TRY(add(event_new(w->base_, w->vgpu_->doorbell().Get(), EV_READ | EV_PERSIST, &Worker::OnDoorbell,
                       w->vgpu_.get())));
  VG_TRY(add(event_new(w->base_, ch::kChannelFd, EV_READ | EV_PERSIST, &Worker::OnChannel, w.get())));
  w->channel_ev_ = w->events_.back();
  // The adoption socket: listen() here, so that a supervisor connecting to it reads this
  // process's pid and uid as the listener's SO_PEERCRED (the sandbox forbids listen later).
  VG_ERROR_IF(::listen(ch::kAdoptFd, 1) != 0, Errc::kIo, "listen on the adoption socket: {}", std::strerror(errno));
  w->adopt_ev_ = event_new(w->base_, ch::kAdoptFd, EV_READ | EV_PERSIST, &Worker::OnAdoptConnect, w.get());
  w->orphan_ev_ = event_new(w->base_, -1, EV_PERSIST, &Worker::OnOrphanTick, w.get());
  VG_ERROR_IF(!w->adopt_ev_ || !w->orphan_ev_, Errc::kInternal, "event_new failed");
  if (::fcntl(ch::kVncFd, F_GETFD) >= 0) {
    VG_TRY_ASSIGN(w->vnc_, worker::VncConsole::Create(ch::kVncFd, o.vnc_password, *w->vgpu_));
    event* e = event_new(w->base_, -1, EV_PERSIST, &Worker::OnVncRefresh, w.get());
    const timeval tv{0, 100000};
    VG_ERROR_IF(!e || event_add(e, &tv) != 0, Errc::kInternal, "event_add failed");
    w->events_.push_back(e);
  }
  VG_TRY(add(evsignal_new(w->base_, SIGTERM, &Worker::OnSignal, w.get())));
  VG_TRY(add(evsignal_new(w->base_, SIGINT, &Worker::OnSignal, w.get())));
  return w;
}

Worker::~Worker() {
  for (event* e : events_) event_free(e);
  if (adopt_ev_) event_free(adopt_ev_);
  if (adopter_ev_) event_free(adopter_ev_);
  if (orphan_ev_) event_free(orphan_ev_);
  if (stop_poll_ev_) event_free(stop_poll_ev_);
  // Already stopping: a SIGTERM now (the supervisor's shutdown after a stop request) must
  // not end the process half torn down, which the supervisor would count as unclean.
  // Freeing the signal events restored the default action; SIGKILL still ends a stuck exit.
  std::signal(SIGTERM, SIG_IGN);
  std::signal(SIGINT, SIG_IGN);
  // No grant will come any more (the supervisor may have let this vGPU go, or be gone):
  // work the gate holds must still reach the engine, or the engine could not drain below.
  if (gate_) gate_->OpenForExit();
  // Clients first, then the device (its executor finishes or cancels the submission in
  // flight, bounded), then the engine they all used.
  vnc_.reset();  // its threads read the device model
  vfio_.reset();
  remoting_.reset();
  fault_gate_.reset();
  if (gate_) gate_->SetBacklogProbe(nullptr);  // it reads the device model
  vgpu_.reset();
  if (throttle_ev_) event_free(throttle_ev_);
  if (frame_ev_) event_free(frame_ev_);
  // The pump thread goes before the engine it pumps; the engine's completion thread may
  // still call the gate until the engine is gone, and the gate outlives it.
  if (gate_) gate_->Stop();
  engine_.reset();
  gate_.reset();
  if (base_) event_base_free(base_);
}

Result<> Worker::Serve() {
  sandbox::Policy p;
  p.limits.address_space_bytes = opts_.address_space;
  p.limits.open_files = opts_.open_files;
  p.seccomp = opts_.seccomp;
  VG_TRY_CTX(sandbox::Enter(p), "sandbox");
  VG_ERROR_IF(!ch::Send(ch::kChannelFd, ch::Make(ch::Kind::kReady)), Errc::kIo, "channel: cannot say Ready");
  VG_LOGI("serving {} ({}) on {} and {}", opts_.uuid, opts_.type, opts_.socket_name, opts_.remoting_name);
  VG_ERROR_IF(event_base_dispatch(base_) < 0, Errc::kInternal, "event loop failed");
  return Ok();
}

void Worker::OnDoorbell(int, short, void* arg) {
  auto* vgpu = static_cast<mediator::Vgpu*>(arg);
  // The guest holds this very eventfd (GET_REGION_IO_FDS) and may have drained it or made
  // it blocking: a read that cannot block.
  if (vgpu->doorbell().TryDrain().value_or(0)) vgpu->OnDoorbellKick();
}

void Worker::OnThrottle(int, short, void* arg) {
  auto* self = static_cast<Worker*>(arg);
  if (self->vgpu_) self->vgpu_->OnThrottleTimer();
}

void Worker::OnFrame(int, short, void* arg) {
  auto* self = static_cast<Worker*>(arg);
  if (self->vgpu_) self->vgpu_->OnFrameTick();
}

void Worker::OnVncRefresh(int, short, void* arg) {
  auto* self = static_cast<Worker*>(arg);
  if (self->vnc_) self->vnc_->Refresh();
}

void Worker::OnSignal(int sig, short, void* arg) {
  VG_LOGI("signal {}: stopping", sig);
  event_base_loopexit(static_cast<Worker*>(arg)->base_, nullptr);
}

// A restarted worker's first config carries its predecessor's fault health (as its last
// pong or kCarry said): a crash lifts no throttle and no quarantine (FaultMonitor::Restore).
void Worker::RestoreHealth(const ch::Record& r) {
  auto at = [&](ch::SchedConfigSlot s) { return r.values[static_cast<size_t>(s)]; };
  const uint64_t h = at(ch::SchedConfigSlot::kCarriedHealth);
  if (h != static_cast<uint64_t>(ch::Health::kThrottled) && h != static_cast<uint64_t>(ch::Health::kQuarantined)) return;
  mediator::HealthCause cause = mediator::HealthCause::kFaults;
  mediator::FaultKind kind = mediator::FaultKind::kCommandRefusal;
  switch (static_cast<ch::HealthReason>(at(ch::SchedConfigSlot::kCarriedHealthReason))) {
    case ch::HealthReason::kQuarantineLifted: cause = mediator::HealthCause::kQuarantineLifted; break;
    case ch::HealthReason::kMmioRefusals: kind = mediator::FaultKind::kMmioRefusal; break;
    case ch::HealthReason::kDmaFaults: kind = mediator::FaultKind::kDmaFault; break;
    case ch::HealthReason::kRemotingErrors: kind = mediator::FaultKind::kRemotingError; break;
    default: break;
  }
  vgpu_->faults().Restore(h == static_cast<uint64_t>(ch::Health::kQuarantined) ? mediator::Health::kQuarantined
                                                                             : mediator::Health::kThrottled,
                          cause, kind,
                          static_cast<uint32_t>(std::min<uint64_t>(at(ch::SchedConfigSlot::kCarriedHealthRate), UINT32_MAX)));
}

void Worker::Pong(uint64_t seq) {
  ch::Record r = ch::Make(ch::Kind::kPong, seq);
  const mediator::VgpuCounters c = vgpu_->Counters();
  const remoting::ListenerStats rs = remoting_->stats();
  auto set = [&](ch::Counter k, uint64_t v) { r.values[static_cast<size_t>(k)] = v; };
  set(ch::Counter::kDoorbells, c.doorbells);
  set(ch::Counter::kSubmissions, c.submissions);
  set(ch::Counter::kMmioRefusals, c.mmio_refusals);
  set(ch::Counter::kCommandRefusals, c.command_refusals);
  set(ch::Counter::kResets, c.resets);
  set(ch::Counter::kIrqs, c.irqs_raised);
  set(ch::Counter::kCommandsAudited, c.commands_audited);
  set(ch::Counter::kPlansExecuted, c.plans_executed);
  set(ch::Counter::kPlansInline, c.plans_inline);
  set(ch::Counter::kPlansInlineSubmitted, c.plans_inline_submitted);
  set(ch::Counter::kPlansCoalesced, c.plans_coalesced);
  set(ch::Counter::kTailRereads, c.tail_rereads);
  set(ch::Counter::kVfioClients, vfio_->HasClient() ? 1 : 0);
  set(ch::Counter::kRemotingClients, remoting_->clients());
  set(ch::Counter::kRemotingCommands, rs.commands);
  set(ch::Counter::kRemotingErrors, rs.errors);
  const mediator::HealthReport h = vgpu_->faults().Report();
  set(ch::Counter::kFaults, h.faults);
  set(ch::Counter::kThrottledNs, h.throttled_ns);
  set(ch::Counter::kQuarantinedNs, h.quarantined_ns);
  set(ch::Counter::kHealth, static_cast<uint64_t>(h.health));
  set(ch::Counter::kHealthReason, static_cast<uint64_t>(ReasonOf(h)));
  set(ch::Counter::kHealthRate, h.rate_per_s);
  const worker::GateStats gs = gate_->Stats();
  set(ch::Counter::kGpuTimeNs, gs.gpu_time_ns);
  set(ch::Counter::kQueueWaitNs, gs.queue_wait_ns);
  set(ch::Counter::kRateLimited, gs.rate_limited);
  set(ch::Counter::kFlipsRequested, c.flips_requested);
  set(ch::Counter::kFlipsPresented, c.flips_presented);
  set(ch::Counter::kFlipsDeferred, c.flips_deferred);
  set(ch::Counter::kFlipsReplaced, c.flips_replaced);
  set(ch::Counter::kDisplayFps, c.display_fps);
  (void)ch::Send(ch::kChannelFd, r);  // a full queue: the supervisor pings again
}

void Worker::OnChannel(int fd, short, void* arg) {
  auto* self = static_cast<Worker*>(arg);
  for (int i = 0; i < 16; ++i) {
    ch::Record r;
    switch (ch::Recv(fd, r)) {
      case ch::RecvStatus::kEmpty: return;
      case ch::RecvStatus::kClosed:
      case ch::RecvStatus::kMalformed:
        self->Orphan();
        return;
      case ch::RecvStatus::kRecord: break;
    }
    if (r.kind == ch::Kind::kPing) self->Pong(r.seq);
    if (r.kind == ch::Kind::kFault) self->OnFault(static_cast<ch::Fault>(r.values[0]));
    if (r.kind == ch::Kind::kSchedConfig) {
      self->gate_cfg_ = worker::GateConfig::FromRecord(r);
      self->gate_->Configure(self->gate_cfg_);
      // F10 frame pacing rides with the other limits (changed live by the same path). The
      // supervisor checked it; a value out of range keeps the limit as it was.
      const uint64_t fl = r.values[static_cast<size_t>(ch::SchedConfigSlot::kFrameLimit)];
      if (auto fr = self->vgpu_->SetFrameLimit(static_cast<uint32_t>(std::min<uint64_t>(fl, UINT32_MAX))); !fr)
        VG_LOGW("frame limit: {}", fr.error().ToString());
      if (r.values[static_cast<size_t>(ch::SchedConfigSlot::kCarried)] == 1) self->RestoreHealth(r);
    }
    // Times are steady_clock ns (CLOCK_MONOTONIC, one clock for the host); 0: none.
    auto time_at = [](uint64_t ns) -> std::optional<std::chrono::steady_clock::time_point> {
      if (!ns) return std::nullopt;
      return std::chrono::steady_clock::time_point(
          std::chrono::nanoseconds(static_cast<int64_t>(std::min<uint64_t>(ns, static_cast<uint64_t>(INT64_MAX)))));
    };
    if (r.kind == ch::Kind::kSchedGrant)
      self->gate_->OnGrant(r.seq, r.values[0] != 0, time_at(r.values[1]), time_at(r.values[2]));
    if (r.kind == ch::Kind::kSchedPreempt) self->gate_->OnPreempt(r.seq, time_at(r.values[0]));  // 0: now
    if (r.kind == ch::Kind::kSchedContended) self->gate_->OnContended(r.seq);
    if (r.kind == ch::Kind::kStopRequest) self->OnStopRequest(r.values[0]);
    if (r.kind == ch::Kind::kScreenshot) self->OnScreenshot(r.seq);
    if (r.kind == ch::Kind::kReset) {
      // vgpuctl reset: the device model as the guest's RESET register resets it; never
      // waits for the engine (the aperture scrub follows the submission in flight).
      VG_LOGI("host reset of {}", self->opts_.uuid);
      if (auto rr = self->vgpu_->HostReset(); !rr) VG_LOGW("host reset: {}", rr.error().ToString());
    }
  }
}

// F10, vgpuctl screenshot: the plane being scanned out, copied out of the aperture (under the
// device's lock, bounds checked at commit), then written to the frame fd the supervisor
// passed. Bounded work on the loop: at most 64 MiB copied twice, no wait on the guest.
void Worker::OnScreenshot(uint64_t seq) {
  ch::Record r = ch::Make(ch::Kind::kScreenshotDone, seq);
  auto set = [&](ch::ScreenshotSlot s, uint64_t v) { r.values[static_cast<size_t>(s)] = v; };
  Result<mediator::ScanoutFrame> f = vgpu_->CaptureScanout();
  if (f.ok() && f->pixels.size() > ch::kFrameFdBytes) f = MakeError(Errc::kLimitExceeded, "frame too large");
  if (f.ok()) {
    size_t done = 0;
    while (done < f->pixels.size()) {
      const ssize_t n = ::pwrite(ch::kFrameFd, f->pixels.data() + done, f->pixels.size() - done,
                                 static_cast<off_t>(done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        f = MakeError(Errc::kIo, fmt::format("frame fd: {}", std::strerror(errno)));
        break;
      }
      done += static_cast<size_t>(n);
    }
  }
  if (!f.ok()) {
    set(ch::ScreenshotSlot::kErrc, static_cast<uint64_t>(f.code()));
  } else {
    set(ch::ScreenshotSlot::kWidth, f->width);
    set(ch::ScreenshotSlot::kHeight, f->height);
    set(ch::ScreenshotSlot::kFormat, f->format);
    set(ch::ScreenshotSlot::kBytes, f->pixels.size());
    set(ch::ScreenshotSlot::kFlips, f->flips);
  }
  (void)ch::Send(ch::kChannelFd, r);  // lost when the channel is full: the supervisor times out
}

// F8: stop with a client attached, as a host stops a device a VM holds. REQ asks the VMM to
// release it (QEMU hot-unplugs it from its guest); the loop keeps serving meanwhile, and
// exits when the client has gone or the deadline passes (then the client is disconnected
// by the exit). Without a client, or one that registered no REQ eventfd, the stop is at
// once. Nothing here waits: a 10 ms timer looks.
void Worker::OnStopRequest(uint64_t timeout_ms) {
  if (stop_poll_ev_) return;  // asked already
  // The supervisor's scheduler has let this vGPU go: no more engine time under it.
  gate_->Revoke();
  if (!vfio_->HasClient() || !vgpu_->RequestRelease()) {
    VG_LOGI("stop: no client to ask (REQ): stopping");
    event_base_loopexit(base_, nullptr);
    return;
  }
  VG_LOGI("stop: REQ sent, waiting up to {} ms for the client to release the device", timeout_ms);
  stop_deadline_ = std::chrono::steady_clock::now() + std::chrono::milliseconds(std::min<uint64_t>(timeout_ms, 600000));
  stop_poll_ev_ = event_new(base_, -1, EV_PERSIST, &Worker::OnStopPoll, this);
  const timeval tv{0, 10000};
  if (!stop_poll_ev_ || event_add(stop_poll_ev_, &tv) != 0) event_base_loopexit(base_, nullptr);
}

void Worker::OnStopPoll(int, short, void* arg) {
  auto* self = static_cast<Worker*>(arg);
  if (!self->vfio_->HasClient()) {
    VG_LOGI("stop: the client released the device: stopping");
    event_base_loopexit(self->base_, nullptr);
  } else if (std::chrono::steady_clock::now() >= self->stop_deadline_) {
    VG_LOGW("stop: the client did not release the device in time: disconnecting it");
    event_base_loopexit(self->base_, nullptr);
  }
}

void Worker::Orphan() {
  if (orphaned_) return;
  orphaned_ = true;
  // A guest under a VMM does not reconnect: a supervisor that dies (kill -9, a crash, an
  // upgrade) must not cost it its vGPU. This worker keeps its guest, its sandbox and its
  // limits; only the scheduler's grants stop coming, so it runs ungated (rate limits stay)
  // until a new supervisor adopts it and sends its configuration again. A stop signal
  // (SIGTERM) still ends it.
  event_del(channel_ev_);
  // fd 3 stays open (its peer gone, sends fail): closed, the number could be reused by a
  // guest's connection, and the gate's and pong's records would go to the guest.
  worker::GateConfig c = gate_cfg_;
  c.scheduled = false;
  gate_->Configure(c);
  event_add(adopt_ev_, nullptr);
  idle_since_ = std::chrono::steady_clock::now();
  const timeval tick{1, 0};
  event_add(orphan_ev_, &tick);
  VG_LOGW("supervisor channel closed: serving on, waiting to be adopted on {}.adopt.sock", opts_.uuid);
}

// Bounded: an orphan without a guest serves nobody. After the grace it exits; its state file
// stays, so a new supervisor still brings the vGPU back (with a fresh worker).
void Worker::OnOrphanTick(int, short, void* arg) {
  auto* self = static_cast<Worker*>(arg);
  const auto now = std::chrono::steady_clock::now();
  if (self->vfio_->HasClient() || self->remoting_->clients() > 0) {
    self->idle_since_ = now;
    return;
  }
  if (now - self->idle_since_ >= std::chrono::seconds(self->opts_.orphan_grace_s)) {
    VG_LOGW("orphaned and without a client for {} s: exiting", self->opts_.orphan_grace_s);
    event_base_loopexit(self->base_, nullptr);
  }
}

void Worker::DropAdopter() {
  if (adopter_ev_) event_free(adopter_ev_);
  adopter_ev_ = nullptr;
  adopter_ = UniqueFd();
  if (orphaned_) event_add(adopt_ev_, nullptr);
}

// A connection on the adoption socket (mode 0600 in the private runtime directory): one at
// a time, and only while orphaned, so a worker with a live supervisor cannot be taken over.
void Worker::OnAdoptConnect(int fd, short, void* arg) {
  auto* self = static_cast<Worker*>(arg);
  UniqueFd c(::accept4(fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
  if (!c.Valid() || !self->orphaned_ || self->adopter_.Valid()) return;
  ucred cred{};
  socklen_t len = sizeof cred;
  // Only the daemon's own user may adopt (root's processes can do anything anyway).
  if (::getsockopt(c.Get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || (cred.uid != ::geteuid() && cred.uid != 0)) {
    VG_LOGW("adoption refused: peer uid {} is not ours", cred.uid);
    return;
  }
  self->adopter_ = std::move(c);
  self->adopter_ev_ = event_new(self->base_, self->adopter_.Get(), EV_READ, &Worker::OnAdoptRecord, self);
  const timeval tv{2, 0};  // its kAdopt within 2 s, or the next one may try
  if (!self->adopter_ev_ || event_add(self->adopter_ev_, &tv) != 0) return self->DropAdopter();
  event_del(self->adopt_ev_);
}

void Worker::OnAdoptRecord(int fd, short what, void* arg) {
  auto* self = static_cast<Worker*>(arg);
  ch::Record r;
  if ((what & EV_TIMEOUT) || ch::Recv(fd, r) != ch::RecvStatus::kRecord || r.kind != ch::Kind::kAdopt) {
    VG_LOGW("adoption refused: no adoption record in time");
    return self->DropAdopter();
  }
  uint64_t diff = 0;  // compared whole, not to the first difference
  for (size_t i = 0; i < ch::kTokenWords; ++i) diff |= r.values[i] ^ self->token_[i];
  if (diff != 0) {
    VG_LOGW("adoption refused: wrong token");
    return self->DropAdopter();
  }
  // The adopter's connection becomes the channel at fd 3, where everything sends to.
  if (::dup3(fd, ch::kChannelFd, O_CLOEXEC) != ch::kChannelFd) {
    VG_LOGE("adoption: dup3: {}", std::strerror(errno));
    return self->DropAdopter();
  }
  self->orphaned_ = false;
  event_del(self->orphan_ev_);
  self->DropAdopter();
  event_add(self->channel_ev_, nullptr);
  // Ready again: the new supervisor sends its scheduling configuration next (queued behind
  // kAdopt), which gives the gate a fresh grant state.
  (void)ch::Send(ch::kChannelFd, ch::Make(ch::Kind::kReady));
  VG_LOGI("adopted by a new supervisor");
}

void Worker::OnFault(ch::Fault f) {
#ifdef VGPUD_TEST_HOOKS
  VG_LOGW("test hook: fault {}", static_cast<uint64_t>(f));
  switch (f) {
    case ch::Fault::kForbiddenSyscall:
      // acct(NULL) only switches process accounting off, and nothing a worker does needs it:
      // outside the filter (root) it returns, inside the filter it kills.
      (void)::syscall(SYS_acct, nullptr);
      VG_LOGE("test hook: the forbidden system call returned");
      return;
    case ch::Fault::kHangLoop:
      for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
    case ch::Fault::kCrash:
      std::raise(SIGSEGV);
      return;
    case ch::Fault::kDeviceLost:
      // What a GPU reset or a driver crash looks like from here: every submission from now on
      // fails kDeviceLost, which the device reports and signals on ERR (F8).
      engine_->SimulateDeviceLost();
      return;
    case ch::Fault::kFloodChannel:
      // A puppet worker flooding the supervisor's loop with valid records (grant requests),
      // from a thread of its own, so that its loop (and its heartbeat) turns on.
      std::thread([] {
        const ch::Record r = ch::Make(ch::Kind::kSchedRequest);
        for (;;) {
          if (!ch::Send(ch::kChannelFd, r) && errno != EAGAIN && errno != EWOULDBLOCK) return;
        }
      }).detach();
      return;
    case ch::Fault::kExhaustMemory: {
      std::vector<std::unique_ptr<std::byte[]>> hog;
      for (;;) {
        hog.emplace_back(new std::byte[64u << 20]);
        std::memset(hog.back().get(), 1, 64u << 20);
      }
    }
  }
#else
  VG_LOGW("fault {} asked for, but this worker has no test hooks", static_cast<uint64_t>(f));
#endif
}

// The start-up handshake: the supervisor says Go once it has placed this process (its
// cgroup); nothing is created before that, so every byte is charged to the right place.
Result<Token> WaitForGo(std::string* vnc_password) {
  pollfd p{ch::kChannelFd, POLLIN, 0};
  const int n = ::poll(&p, 1, 30000);
  VG_ERROR_IF(n <= 0, Errc::kTimeout, "no Go from the supervisor within 30 s");
  ch::Record r;
  VG_ERROR_IF(ch::Recv(ch::kChannelFd, r) != ch::RecvStatus::kRecord || r.kind != ch::Kind::kGo, Errc::kBadMessage,
              "the supervisor's first record is not Go");
  Token t{};
  for (size_t i = 0; i < t.size(); ++i) t[i] = r.values[i];
  // F10: the console's password travels here, not on the command line (/proc/PID/cmdline).
  const uint64_t len = std::min<uint64_t>(r.values[static_cast<size_t>(ch::GoSlot::kVncPasswordLen)], 8);
  const uint64_t pw = r.values[static_cast<size_t>(ch::GoSlot::kVncPassword)];
  for (uint64_t i = 0; i < len; ++i) vnc_password->push_back(static_cast<char>((pw >> (8 * i)) & 0xFF));
  return t;
}

int Probe(const std::string& gpu) {
  SetLogTag("vgpud-worker probe");
  SetLogLevel(LogLevel::kWarn);  // the supervisor logs the device once
  engine::EngineOptions eo;
  eo.gpu = gpu;
  auto e = engine::Engine::Create(eo);
  if (!e) {
    std::fprintf(stderr, "vgpud-worker: %s\n", e.error().ToString().c_str());
    return kExitStartup;
  }
  const engine::DeviceInfo& i = (*e)->Info();
  nlohmann::json j{{"name", i.name},           {"driver", i.driver_name},  {"kind", static_cast<int>(i.kind)},
                   {"vendor_id", i.vendor_id}, {"device_id", i.device_id}, {"summary", i.ToString()}};
  std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"vgpud-worker: serves one vGPU for the vgpud supervisor (not run by hand)"};
  Options o;
  bool probe = false;
  app.add_flag("--probe", probe, "print the engine's device as JSON and exit");
  app.add_option("--uuid", o.uuid_text);
  app.add_option("--type", o.type);
  app.add_option("--socket-name", o.socket_name);
  app.add_option("--remoting-name", o.remoting_name);
  app.add_option("--aperture", o.aperture);
  app.add_option("--gtt-entries", o.gtt_entries);
  app.add_option("--gpu", o.gpu);
  app.add_option("--dma-max-bytes", o.dma_max_bytes);
  app.add_option("--dma-total-bytes", o.dma_total_bytes);
  app.add_option("--dma-max-regions", o.dma_max_regions);
  app.add_option("--dma-unmap-timeout-ms", o.unmap_timeout_ms);
  app.add_option("--address-space", o.address_space, "RLIMIT_AS in bytes (0: none)");
  app.add_option("--open-files", o.open_files, "RLIMIT_NOFILE");
  app.add_flag("!--no-seccomp", o.seccomp, "no system-call filter (debugging only)");
  app.add_option("--log-level", o.log_level);
  app.add_option("--executor-depth", o.executor_depth);
  app.add_option("--time-granularity-us", o.time_granularity_us)
      ->check(CLI::Range(uint64_t{0}, abi::cmd::kMaxTimeGranularityNs / 1000));
  app.add_flag("!--no-zero-copy", o.zero_copy);
  app.add_flag("!--no-coalesce", o.coalesce);
  app.add_flag("!--no-inline-complete", o.inline_complete);
  app.add_option("--fault-window-ms", o.faults.window_ms)->check(CLI::Range(10, 3600000));
  app.add_option("--fault-throttle-per-s", o.faults.throttle_per_s);
  app.add_option("--fault-quarantine-per-s", o.faults.quarantine_per_s);
  app.add_option("--throttle-rate", o.faults.throttle_rate);
  app.add_option("--fault-quiet-ms", o.faults.quiet_ms);
  app.add_flag("--scheduled", o.scheduled);
  app.add_option("--orphan-grace-s", o.orphan_grace_s);
  CLI11_PARSE(app, argc, argv);
  if (o.log_level == "debug") SetLogLevel(LogLevel::kDebug);
  if (o.log_level == "warn") SetLogLevel(LogLevel::kWarn);
  if (o.log_level == "error") SetLogLevel(LogLevel::kError);
  // Capabilities are per thread: dropped now, while this is the only thread, every thread
  // the engine starts later has none (sandbox::Enter checks that no thread kept any).
  if (auto r = sandbox::DropCapabilities(); !r) {
    std::fprintf(stderr, "vgpud-worker: %s\n", r.error().ToString().c_str());
    return kExitStartup;
  }
  // The supervisor's short CPU slice is inherited through posix_spawn: the engine's compute
  // threads, started from this thread, must have the default one (base/cpu_slice.h).
  (void)SetThreadCpuSlice(CpuSlice::kDefault);
  if (probe) return Probe(o.gpu);

  auto uuid = Uuid::Parse(o.uuid_text);
  if (!uuid) {
    std::fprintf(stderr, "vgpud-worker: --uuid: %s\n", uuid.error().ToString().c_str());
    return kExitStartup;
  }
  o.uuid = *uuid;
  SetLogTag("vgpud-worker " + o.uuid_text.substr(0, 8));
  // Nothing of the supervisor's but the descriptors it meant to hand over (fds 3-7, and 8 when
  // the vGPU has a VNC console).
  ::syscall(SYS_close_range, static_cast<unsigned>(ch::kVncFd) + 1, ~0u, 0u);
  // A guest that dies mid-write must not kill its worker; an allocation refused by the
  // address-space limit ends the worker with a status its supervisor names.
  std::signal(SIGPIPE, SIG_IGN);
  std::set_new_handler([] {
    static const char msg[] = "vgpud-worker: an allocation was refused (address-space limit): exiting\n";
    (void)!::write(2, msg, sizeof msg - 1);
    ::_exit(kExitOutOfMemory);
  });
  std::string vnc_password;
  auto token = WaitForGo(&vnc_password);
  if (!token) {
    VG_LOGE("{}", token.error().ToString());
    return kExitSupervisorGone;
  }
  o.vnc_password = vnc_password;
  auto w = Worker::Create(o, *token);
  if (!w) {
    VG_LOGE("start-up: {}", w.error().ToString());
    return kExitStartup;
  }
  auto r = (*w)->Serve();
  w->reset();
  if (!r) {
    VG_LOGE("{}", r.error().ToString());
    return kExitStartup;
  }
  return 0;
}
