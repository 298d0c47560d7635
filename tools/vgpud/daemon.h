#pragma once
// The vgpud daemon: one libevent loop that owns every vGPU's device model, its vfio-user
// listener (<runtime-dir>/<uuid>.sock) and its doorbell ioeventfd.

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "base/base.h"
#include "engine/engine.h"
#include "mediator/mediator.h"
#include "remoting/remoting.h"
#include "vfio_user/server.h"

struct event_base;
struct event;

namespace vg::daemon {

struct DaemonOptions {
  std::string runtime_dir = "/run/vgpud";
  std::string gpu;  // engine device override (name substring or index); empty: policy
  vfio_user::ServerLimits vfio;  // per vfio-user client
  vfio_user::DmaLimits dma;      // per client's DMA space (the total: vfio_user::DmaBudget)
};

class Daemon {
 public:
  static Result<std::unique_ptr<Daemon>> Create(const DaemonOptions& opts);
  ~Daemon();
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  // Creates the device and starts listening before returning.
  Result<std::string> StartVgpu(const mediator::VgpuConfig& cfg);
  Result<> StopVgpu(const Uuid& uuid);
  bool Has(const Uuid& uuid) const { return vgpus_.count(uuid) != 0; }
  std::string SocketPath(const Uuid& uuid) const;
  // API remoting (F4) beside the vfio-user socket: <runtime-dir>/<uuid>.remote.sock
  std::string RemotingSocketPath(const Uuid& uuid) const;
  mediator::Vgpu* Find(const Uuid& uuid);

  // Runs until SIGINT/SIGTERM or Stop().
  Result<> Run();
  void Stop();
  event_base* base() const { return base_; }
  engine::Engine& engine() { return *engine_; }

 private:
  struct Instance {
    std::unique_ptr<mediator::Vgpu> vgpu;
    std::unique_ptr<vfio_user::Listener> listener;
    std::unique_ptr<remoting::Listener> remoting;
    event* doorbell_ev = nullptr;
  };
  explicit Daemon(DaemonOptions opts, event_base* base);
  static void OnDoorbell(int fd, short what, void* arg);
  static void OnSignal(int sig, short what, void* arg);

  DaemonOptions opts_;
  event_base* base_;
  std::unique_ptr<engine::Engine> engine_;  // outlives every vGPU (declared before them)
  std::map<Uuid, Instance> vgpus_;
  // Stopped vGPUs finish off the loop: their executor waits for the engine submission in
  // flight (bounded, docs/device-spec.md) on a reaper thread, joined at the latest in
  // ~Daemon, before the engine goes.
  struct Reaper {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  std::vector<Reaper> reapers_;
  event* sigint_ = nullptr;
  event* sigterm_ = nullptr;
};

}  // namespace vg::daemon
