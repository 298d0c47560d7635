#include "tools/vgpud/daemon.h"

#include <event2/event.h>
#include <event2/thread.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstring>

namespace vg::daemon {

Result<std::unique_ptr<Daemon>> Daemon::Create(const DaemonOptions& opts) {
  if (::mkdir(opts.runtime_dir.c_str(), 0755) != 0 && errno != EEXIST)
    return MakeError(Errc::kIo, "mkdir {}: {}", opts.runtime_dir, std::strerror(errno));
  // Other threads (the mdev tree's FUSE thread, the management worker) wake the loop with
  // event_active() to hand it work (LoopTasks): libevent's locking must be on before the base exists.
  static const int threads_ok = evthread_use_pthreads();
  VG_ERROR_IF(threads_ok != 0, Errc::kInternal, "evthread_use_pthreads failed");
  event_base* base = event_base_new();
  VG_ERROR_IF(!base, Errc::kInternal, "event_base_new failed");
  std::unique_ptr<Daemon> d(new Daemon(opts, base));
  engine::EngineOptions eo;
  eo.gpu = opts.gpu;
  VG_TRY_ASSIGN(d->engine_, engine::Engine::Create(eo));
  VG_LOGI("engine: {}", d->engine_->Info().ToString());
  // A guest dying mid-write must not kill the daemon.
  std::signal(SIGPIPE, SIG_IGN);
  d->sigint_ = evsignal_new(base, SIGINT, &Daemon::OnSignal, d.get());
  d->sigterm_ = evsignal_new(base, SIGTERM, &Daemon::OnSignal, d.get());
  event_add(d->sigint_, nullptr);
  event_add(d->sigterm_, nullptr);
  return d;
}

Daemon::Daemon(DaemonOptions opts, event_base* base) : opts_(std::move(opts)), base_(base) {}

Daemon::~Daemon() {
  for (Reaper& r : reapers_) r.thread.join();
  for (auto& [uuid, inst] : vgpus_) {
    if (inst.doorbell_ev) event_free(inst.doorbell_ev);
    inst.listener.reset();
    inst.remoting.reset();
  }
  vgpus_.clear();
  if (sigint_) event_free(sigint_);
  if (sigterm_) event_free(sigterm_);
  event_base_free(base_);
}

std::string Daemon::SocketPath(const Uuid& uuid) const { return opts_.runtime_dir + "/" + uuid.ToString() + ".sock"; }
std::string Daemon::RemotingSocketPath(const Uuid& uuid) const {
  return opts_.runtime_dir + "/" + uuid.ToString() + ".remote.sock";
}

mediator::Vgpu* Daemon::Find(const Uuid& uuid) {
  auto it = vgpus_.find(uuid);
  return it == vgpus_.end() ? nullptr : it->second.vgpu.get();
}

Result<std::string> Daemon::StartVgpu(const mediator::VgpuConfig& cfg) {
  VG_ERROR_IF(Has(cfg.uuid), Errc::kAlreadyExists, "vGPU {} is already running", cfg.uuid);
  Instance inst;
  mediator::VgpuConfig with_engine = cfg;
  with_engine.engine = engine_.get();
  with_engine.dma_limits = opts_.dma;
  VG_TRY_ASSIGN(inst.vgpu, mediator::Vgpu::Create(with_engine));
  // Remoting first: the e2e harness waits for the vfio-user socket as "ready".
  VG_TRY_ASSIGN(inst.remoting, remoting::Listener::Create(base_, *engine_, RemotingSocketPath(cfg.uuid)));
  std::string path = SocketPath(cfg.uuid);
  VG_TRY_ASSIGN(inst.listener, vfio_user::Listener::Create(base_, path, *inst.vgpu, opts_.vfio));
  inst.doorbell_ev = event_new(base_, inst.vgpu->doorbell().Get(), EV_READ | EV_PERSIST, &Daemon::OnDoorbell,
                               inst.vgpu.get());
  event_add(inst.doorbell_ev, nullptr);
  VG_LOGI("vGPU {} ({}, aperture {} MiB, {} GTT entries) listening on {}", cfg.uuid, cfg.type_name,
          cfg.aperture_size >> 20, cfg.gtt_entries, path);
  vgpus_.emplace(cfg.uuid, std::move(inst));
  return path;
}

Result<> Daemon::StopVgpu(const Uuid& uuid) {
  auto it = vgpus_.find(uuid);
  VG_ERROR_IF(it == vgpus_.end(), Errc::kNotFound, "vGPU {} is not running", uuid);
  if (it->second.doorbell_ev) event_free(it->second.doorbell_ev);
  it->second.listener.reset();  // drops the client, unlinks the socket
  it->second.remoting.reset();  // drops its remoting clients, unlinks that socket
  // The device goes off the loop: its running work stops at the next submission boundary,
  // which the loop does not wait for.
  std::erase_if(reapers_, [](Reaper& r) {
    if (!r.done->load()) return false;
    r.thread.join();
    return true;
  });
  auto done = std::make_shared<std::atomic<bool>>(false);
  reapers_.push_back({std::thread([v = std::move(it->second.vgpu), done]() mutable {
                        v.reset();
                        done->store(true);
                      }),
                      done});
  vgpus_.erase(it);
  VG_LOGI("vGPU {} stopped", uuid);
  return Ok();
}

void Daemon::OnDoorbell(int, short, void* arg) {
  auto* vgpu = static_cast<mediator::Vgpu*>(arg);
  // The doorbell ioeventfd is shared with the guest (GET_REGION_IO_FDS hands out this very
  // open file description), which may have made it blocking and drained it first: a read
  // that cannot block.
  uint64_t kicks = vgpu->doorbell().TryDrain().value_or(0);
  if (kicks) vgpu->OnDoorbellKick();
}

void Daemon::OnSignal(int sig, short, void* arg) {
  VG_LOGI("signal {}: shutting down", sig);
  static_cast<Daemon*>(arg)->Stop();
}

Result<> Daemon::Run() {
  VG_ERROR_IF(event_base_dispatch(base_) < 0, Errc::kInternal, "event loop failed");
  return Ok();
}

void Daemon::Stop() { event_base_loopexit(base_, nullptr); }

}  // namespace vg::daemon
