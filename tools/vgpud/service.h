#pragma once
// vGPU management inside the daemon: mdev's Manager with the daemon as its InstanceHost,
// the live mdev tree, and the control socket's ops (vgpuctl's protocol, docs/management.md).
//
// Threads. The libevent loop thread owns the worker pool (one process per running vGPU).
// The Manager is called from the FUSE thread (mdevctl) and from one management thread
// (control requests), never from the loop: the Manager holds its lock while it calls
// InstanceHost::StopInstance, which hands the work to the loop and waits for it, so a loop
// that waited for the Manager's lock would deadlock. Nothing here waits on a worker process
// beyond WorkerPolicy's bounds: a start waits for Ready (start_timeout_ms) without the
// Manager's lock, a stop only signals, and `show` reads the pool's snapshot.

#include <sys/types.h>

#include <condition_variable>
#include <deque>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "mdev/mdev.h"
#include "tools/vgpud/control.h"
#include "tools/vgpud/supervisor.h"
#include "tools/vgpud/loop_tasks.h"

namespace vg::daemon {

// The supervisor as mdev's InstanceHost: a running instance is a worker process.
class VgpuHost : public mdev::InstanceHost {
 public:
  explicit VgpuHost(WorkerPool& pool) : pool_(pool) {}
  Result<std::string> StartInstance(const Uuid& uuid, const mdev::VgpuType& type, const mdev::Attributes& attrs) override;
  Result<> StopInstance(const Uuid& uuid) override;
  // Kept for the scheduler (weights, rate limits); `show` reports the effective values.
  Result<> SetAttribute(const Uuid& uuid, std::string_view name, std::string_view value) override;

  struct Live {
    mdev::Attributes attrs;
    mdev::VgpuType type;
  };
  // The type's weight and limits, overridden by the instance's attributes.
  static SchedParams Effective(const mdev::VgpuType& type, const mdev::Attributes& attrs);
  std::optional<Live> Get(const Uuid& uuid) const;

 private:
  WorkerPool& pool_;
  mutable std::mutex mu_;
  std::map<Uuid, Live> live_;
};

struct ServiceOptions {
  std::filesystem::path root;        // definitions under <root>/etc/mdevctl.d/<parent>
  bool mount_tree = false;           // serve the mdev tree at <root>/sys
  std::filesystem::path types_file;  // empty: built-in types
  ByteSize aperture_budget{4ull << 30};
  std::optional<std::string> parent;  // PCI address; nullopt: "vgpud0"
  std::string control_path;
  std::optional<gid_t> control_group;
};

class Service {
 public:
  static Result<std::unique_ptr<Service>> Create(Supervisor& sup, ServiceOptions opts);
  ~Service();
  Service(const Service&) = delete;
  Service& operator=(const Service&) = delete;

  // Before the loop runs (single-threaded): brings back every `start: auto` definition.
  std::vector<Error> StartAutoInstances();
  // Before StartAutoInstances: every vGPU an earlier supervisor left running (it was killed,
  // it crashed) comes back, its live worker adopted (docs/isolation.md). Returns the failures.
  std::vector<Error> RestoreRunning();
  // --vgpu UUID[:TYPE]: a transient start; TYPE may omit the "vgpud-" prefix.
  Result<std::string> StartFromSpec(std::string_view spec);
  // Opens the control socket and mounts the tree; from here on other threads call in.
  Result<> Open();
  // After the loop has exited: unmounts, stops every vGPU, closes the control socket.
  void Shutdown();

  mdev::Manager& manager() { return *manager_; }
  // The metrics endpoint's bound address (vgpud --metrics), reported by `ping`; before Open().
  void set_metrics_address(std::string address) { metrics_address_ = std::move(address); }
  // One control request line in, one reply line out (no newline). Runs on the worker.
  std::string Handle(std::string_view request);

 private:
  Service(Supervisor& sup, ServiceOptions opts) : sup_(sup), opts_(std::move(opts)) {}
  void WorkerMain();
  void Submit(std::string request, ControlServer::Reply reply);
  std::string ResolveType(std::string_view name) const;

  // The control ops (a table in service.cc) reach the members directly.
  friend struct ServiceOps;

  Supervisor& sup_;
  ServiceOptions opts_;
  std::unique_ptr<VgpuHost> host_;
  std::unique_ptr<mdev::Manager> manager_;
  std::unique_ptr<mdev::MdevTree> tree_;
  std::unique_ptr<ControlServer> control_;
  std::string metrics_address_;  // "" when not serving metrics

  std::mutex wmu_;
  std::condition_variable wcv_;
  std::deque<std::pair<std::string, ControlServer::Reply>> jobs_;
  bool wstop_ = false;
  // Management threads: requests of different clients run at once (16 starts wait for
  // their workers side by side); one client's requests stay in order (ControlServer).
  static constexpr int kManagementThreads = 4;
  std::vector<std::thread> workers_;
  bool shut_down_ = false;
};

}  // namespace vg::daemon
