#pragma once
// vGPU management (DESIGN.md "Management"): types, instances by UUID, definitions in
// mdevctl's own JSON format, and a live sysfs-shaped mdev tree served with FUSE so the
// real `mdevctl` binary (and libvirt, Nova, KubeVirt above it) drive vgpud like any mdev
// parent. The daemon plugs the real vGPU creation in through InstanceHost.

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "base/result.h"
#include "base/types.h"

namespace vg::mdev {

// Ordered (name, value) pairs, exactly as mdevctl keeps them: order is the order the
// attribute files are written after `create`, and `--index` addresses this list.
using Attributes = std::vector<std::pair<std::string, std::string>>;

struct VgpuType {
  std::string id;           // "vgpud-small": the mdev_supported_types/<id> directory name
  std::string name;         // short human name (the `name` file)
  std::string description;  // the `description` file
  ByteSize aperture;        // BAR2 size, charged against the host budget while active
  uint32_t gtt_entries = 0;
  uint32_t sched_weight = 0;
  uint32_t max_instances = 0;  // per-type cap, on top of the aperture budget
  // Defaults of the instances' limits (attributes of the same names override them).
  uint32_t rate_limit = 0;      // submissions per second; 0: none
  uint32_t rate_burst = 0;
  uint32_t gpu_time_limit = 0;  // GPU ms per second; 0: none
  uint32_t gpu_time_burst = 0;  // GPU ms
  uint32_t frame_limit = 0;     // F10: scan-out commits presented per second; 0: none
};

enum class StartMode { kManual, kAuto };

struct Definition {
  Uuid uuid;
  std::string type;  // type id
  StartMode start = StartMode::kManual;
  Attributes attrs;
};

struct InstanceInfo {
  Uuid uuid;
  std::string type;
  Attributes attrs;         // as applied to the running instance
  std::string socket_path;  // vfio-user socket, listening while active
  bool active = false;
  bool defined = false;
  StartMode start = StartMode::kManual;  // from the definition, when defined
};

// Implemented by the daemon: brings a vGPU instance up and down. StopInstance and
// SetAttribute are called with the Manager's lock held and must return promptly;
// StartInstance is called without it (the instance is charged to the budget beforehand,
// shown as active, and Stop refuses it kBusy until the start ends), so it may take as long
// as a worker process needs to come up. Called from the FUSE thread or the caller of
// Manager; none may call back into the Manager or touch the mdev tree.
class InstanceHost {
 public:
  virtual ~InstanceHost() = default;
  // Returns once the vfio-user socket is listening; returns its path.
  virtual Result<std::string> StartInstance(const Uuid& uuid, const VgpuType& type, const Attributes& attrs) = 0;
  virtual Result<> StopInstance(const Uuid& uuid) = 0;
  // A validated attribute written to a running instance (mdevctl writes them after create).
  virtual Result<> SetAttribute(const Uuid& uuid, std::string_view name, std::string_view value);
};

struct Config {
  std::filesystem::path root;           // definitions live in <root>/etc/mdevctl.d/<parent>/<uuid>
  std::filesystem::path types_file;     // JSON types file; empty or missing -> built-in defaults
  std::optional<std::string> parent;    // host GPU PCI address ("0000:01:00.0"); nullopt -> "vgpud0"
  ByteSize aperture_budget{4ull << 30};  // device memory all active instances may share
};

struct ModifyRequest {
  std::optional<std::string> type;
  std::optional<StartMode> start;
  std::optional<std::pair<std::string, std::string>> add_attr;  // inserted at `index`, else appended
  bool del_attr = false;                                        // removes at `index`, else the last
  std::optional<uint32_t> index;
};

// A question from the mdevctl callout (tools/mdev-callout), answered by the daemon's policy.
struct CalloutQuery {
  std::string event;   // pre | post | get | notify
  std::string action;  // define | start | stop | modify | undefine | attributes
  std::string parent;
  std::string type;
  std::string uuid;
  std::string config_json;  // the definition mdevctl passes on the callout's stdin (may be empty)
};
struct CalloutAnswer {
  enum class Verdict { kOk, kVeto, kNotOurs } verdict = Verdict::kOk;
  std::string message;  // veto reason, or the attributes JSON for a `get`
};

// Built-in types, used when no types file is given.
std::vector<VgpuType> DefaultTypes();
// Parses a types file: {"types": [{"name": "small", "aperture_mib": 64, "gtt_entries": 16384,
// "sched_weight": 100, "max_instances": 8, "description": "..."}]}. Ids become "vgpud-<name>".
Result<std::vector<VgpuType>> ParseTypes(std::string_view json);
Result<std::vector<VgpuType>> LoadTypes(const std::filesystem::path& file);

// mdevctl definition JSON ({"mdev_type", "start", "attrs": [{"k": "v"}]}).
Result<Definition> ParseDefinition(const Uuid& uuid, std::string_view json);
std::string FormatDefinition(const Definition& d);
// write temp, fsync, rename, fsync dir: a crash never leaves a half-written file.
Result<> WriteFileAtomic(const std::filesystem::path& path, std::string_view contents);

// Checks one attribute against the table of attributes a vGPU understands.
Result<> ValidateAttribute(std::string_view name, std::string_view value);
std::vector<std::string> AttributeNames();

class Manager {
 public:
  static Result<std::unique_ptr<Manager>> Create(Config config, InstanceHost& host);
  ~Manager();
  Manager(const Manager&) = delete;
  Manager& operator=(const Manager&) = delete;

  const std::string& parent() const;
  const std::filesystem::path& definitions_dir() const;  // <root>/etc/mdevctl.d/<parent>
  const std::vector<VgpuType>& types() const;
  Result<VgpuType> FindType(std::string_view id) const;
  // min(per-type max - active of that type, remaining aperture budget / type aperture).
  uint32_t AvailableInstances(std::string_view type_id) const;

  // Persistent definitions. Define with a nil uuid picks a random one.
  Result<Uuid> Define(const Definition& d);
  Result<> Undefine(const Uuid& uuid);
  Result<> Modify(const Uuid& uuid, const ModifyRequest& req);
  Result<Definition> GetDefinition(const Uuid& uuid) const;
  Result<std::vector<Definition>> ListDefined() const;  // re-read from disk: mdevctl writes there too

  // Starts from the definition; returns the vfio-user socket path.
  Result<std::string> Start(const Uuid& uuid);
  // Transient start (no definition needed): what a write of a UUID to `create` does.
  Result<std::string> StartTransient(const Uuid& uuid, std::string_view type_id, const Attributes& attrs);
  Result<> Stop(const Uuid& uuid);
  Result<> SetAttribute(const Uuid& uuid, std::string_view name, std::string_view value);
  std::vector<InstanceInfo> ListActive() const;
  Result<InstanceInfo> Show(const Uuid& uuid) const;

  // At daemon start: starts every `start: auto` definition of this parent. Returns the failures.
  std::vector<Error> StartAutoInstances();
  // At daemon stop: stops every active instance (definitions stay).
  void StopAll();

  CalloutAnswer AnswerCallout(const CalloutQuery& q) const;

 private:
  struct Impl;
  explicit Manager(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The live mdev tree, served with FUSE on its own thread until destroyed (which unmounts).
// Layout (docs/management.md): class/mdev_bus/<parent>, devices/vgpud/<parent>/...,
// bus/mdev/devices/<uuid>, vgpud/callout.
class MdevTree {
 public:
  static Result<std::unique_ptr<MdevTree>> Mount(Manager& manager, const std::filesystem::path& mountpoint);
  ~MdevTree();
  MdevTree(const MdevTree&) = delete;
  MdevTree& operator=(const MdevTree&) = delete;
  const std::filesystem::path& mountpoint() const;

  struct Impl;

 private:
  explicit MdevTree(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Whether this build serves the tree (libfuse3 found at configure time).
bool TreeSupported();

}  // namespace vg::mdev
