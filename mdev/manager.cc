// The Manager: types, the active-instance table and the definition files.
//
// Definitions live only on disk: mdevctl writes the same files behind our back, so every
// read of a definition goes to the file, never to a cache. Active instances live only in
// memory (they die with the daemon, like mdevs die with the kernel).

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <system_error>

#include <nlohmann/json.hpp>

#include "base/fd.h"
#include "base/log.h"
#include "mdev/mdev.h"

namespace vg::mdev {
namespace fs = std::filesystem;

namespace {

constexpr std::string_view kVirtualParent = "vgpud0";

// A parent name becomes a directory name under mdevctl.d and class/mdev_bus.
bool ValidParentName(std::string_view p) {
  if (p.empty() || p.size() > 64 || p == "." || p == ".." || p == "scripts.d") return false;
  for (char c : p)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == ':' || c == '.' ||
          c == '_' || c == '-'))
      return false;
  return true;
}

Result<> FsyncDir(const fs::path& dir) {
  UniqueFd dfd(open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  VG_ERROR_IF(!dfd.Valid() || fsync(dfd.Get()) != 0, Errc::kIo, "fsync dir {}: {}", dir.string(), strerror(errno));
  return Ok();
}

void SetAttr(Attributes& attrs, std::string_view name, std::string_view value) {
  for (auto& [k, v] : attrs) {
    if (k == name) {
      v = std::string(value);
      return;
    }
  }
  attrs.emplace_back(std::string(name), std::string(value));
}

std::string StripNewline(std::string_view v) {
  while (!v.empty() && (v.back() == '\n' || v.back() == ' ')) v.remove_suffix(1);
  return std::string(v);
}

}  // namespace

struct Manager::Impl {
  struct Active {
    VgpuType type;
    Attributes attrs;
    std::string socket;
    bool starting = false;  // charged, its host still starting it (the lock is not held)
  };

  Config cfg;
  InstanceHost& host;
  std::string parent;
  fs::path defs_dir;
  std::vector<VgpuType> types;

  mutable std::mutex mu;
  std::map<Uuid, Active> active;

  Impl(Config c, InstanceHost& h) : cfg(std::move(c)), host(h) {}

  const VgpuType* Type(std::string_view id) const {
    for (const auto& t : types)
      if (t.id == id) return &t;
    return nullptr;
  }

  uint32_t AvailLocked(const VgpuType& t) const {
    uint64_t used = 0;
    uint32_t same = 0;
    for (const auto& [u, a] : active) {
      used += a.type.aperture.v;
      if (a.type.id == t.id) ++same;
    }
    const uint64_t left = used >= cfg.aperture_budget.v ? 0 : cfg.aperture_budget.v - used;
    const uint64_t by_budget = left / t.aperture.v;
    const uint64_t by_type = same >= t.max_instances ? 0 : t.max_instances - same;
    return static_cast<uint32_t>(std::min(by_budget, by_type));
  }

  fs::path DefPath(const Uuid& u) const { return defs_dir / u.ToString(); }

  // nullopt when there is no definition file.
  Result<std::optional<Definition>> ReadDef(const Uuid& u) const {
    std::ifstream in(DefPath(u));
    if (!in) return std::optional<Definition>{};
    std::stringstream ss;
    ss << in.rdbuf();
    VG_TRY_ASSIGN(Definition d, ParseDefinition(u, ss.str()));
    return std::optional<Definition>(std::move(d));
  }

  Result<> ValidateDef(const Definition& d) const {
    VG_ERROR_IF(Type(d.type) == nullptr, Errc::kNotFound, "unknown type '{}' on parent {}", d.type, parent);
    for (const auto& [k, v] : d.attrs) VG_TRY(ValidateAttribute(k, v));
    return Ok();
  }

  // No side effects; the callout's pre-start veto asks exactly this question.
  Result<const VgpuType*> ValidateStartLocked(const Uuid& u, std::string_view type_id, const Attributes& attrs) const {
    VG_INVALID_IF(u.IsNil(), "nil uuid");
    VG_ERROR_IF(active.count(u) != 0, Errc::kAlreadyExists, "instance {} is already active", u);
    const VgpuType* t = Type(type_id);
    VG_ERROR_IF(t == nullptr, Errc::kNotFound, "unknown type '{}' on parent {}", type_id, parent);
    for (const auto& [k, v] : attrs) VG_TRY(ValidateAttribute(k, v));
    VG_ERROR_IF(AvailLocked(*t) == 0, Errc::kLimitExceeded, "no instances of {} left on {}", t->id, parent);
    return t;
  }

  // Never over-commit: the budget is checked and charged under the same lock, as a
  // placeholder entry; the host starts the instance (a worker process: up to seconds) with
  // the lock released, so other starts, lists and the tree go on meanwhile.
  Result<std::string> StartLocked(std::unique_lock<std::mutex>& lk, const Uuid& u, std::string_view type_id,
                                  const Attributes& attrs) {
    VG_TRY_ASSIGN(const VgpuType* t, ValidateStartLocked(u, type_id, attrs));
    const VgpuType type = *t;
    active.emplace(u, Active{type, attrs, "", true});
    lk.unlock();
    auto sock = host.StartInstance(u, type, attrs);
    lk.lock();
    auto it = active.find(u);
    if (!sock) {
      active.erase(it);
      return std::move(sock).error();
    }
    it->second.socket = *sock;
    it->second.starting = false;
    VG_LOGI("mdev: started {} ({}) at {}", u, type.id, *sock);
    return std::move(sock).value();
  }
};

Manager::Manager(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Manager::~Manager() = default;

Result<std::unique_ptr<Manager>> Manager::Create(Config config, InstanceHost& host) {
  auto impl = std::make_unique<Impl>(std::move(config), host);
  impl->parent = impl->cfg.parent.value_or(std::string(kVirtualParent));
  VG_INVALID_IF(!ValidParentName(impl->parent), "invalid parent name '{}'", impl->parent);
  VG_INVALID_IF(impl->cfg.root.empty(), "no root directory");
  if (impl->cfg.types_file.empty() || !fs::exists(impl->cfg.types_file)) {
    if (!impl->cfg.types_file.empty())
      VG_LOGW("mdev: types file {} missing, using built-in types", impl->cfg.types_file.string());
    impl->types = DefaultTypes();
  } else {
    VG_TRY_ASSIGN(impl->types, LoadTypes(impl->cfg.types_file));
  }
  const fs::path base = impl->cfg.root / "etc/mdevctl.d";
  impl->defs_dir = base / impl->parent;
  std::error_code ec;
  // mdevctl's self-check refuses to run unless the scripts directories exist.
  for (const fs::path& d : {impl->defs_dir, base / "scripts.d/callouts", base / "scripts.d/notifiers"}) {
    fs::create_directories(d, ec);
    VG_ERROR_IF(ec, Errc::kIo, "create {}: {}", d.string(), ec.message());
  }
  return std::unique_ptr<Manager>(new Manager(std::move(impl)));
}

const std::string& Manager::parent() const { return impl_->parent; }
const fs::path& Manager::definitions_dir() const { return impl_->defs_dir; }
const std::vector<VgpuType>& Manager::types() const { return impl_->types; }

Result<VgpuType> Manager::FindType(std::string_view id) const {
  const VgpuType* t = impl_->Type(id);
  VG_ERROR_IF(t == nullptr, Errc::kNotFound, "unknown type '{}'", id);
  return *t;
}

uint32_t Manager::AvailableInstances(std::string_view type_id) const {
  std::lock_guard lk(impl_->mu);
  const VgpuType* t = impl_->Type(type_id);
  return t ? impl_->AvailLocked(*t) : 0;
}

Result<Uuid> Manager::Define(const Definition& in) {
  Definition d = in;
  if (d.uuid.IsNil()) d.uuid = Uuid::Random();
  VG_TRY(impl_->ValidateDef(d));
  std::lock_guard lk(impl_->mu);
  VG_ERROR_IF(fs::exists(impl_->DefPath(d.uuid)), Errc::kAlreadyExists, "{} is already defined on {}", d.uuid,
              impl_->parent);
  VG_TRY(WriteFileAtomic(impl_->DefPath(d.uuid), FormatDefinition(d)));
  return d.uuid;
}

Result<> Manager::Undefine(const Uuid& uuid) {
  std::lock_guard lk(impl_->mu);
  const fs::path p = impl_->DefPath(uuid);
  if (unlink(p.c_str()) != 0) {
    VG_ERROR_IF(errno == ENOENT, Errc::kNotFound, "{} is not defined on {}", uuid, impl_->parent);
    return MakeError(Errc::kIo, "remove {}: {}", p.string(), strerror(errno));
  }
  return FsyncDir(impl_->defs_dir);
}

Result<> Manager::Modify(const Uuid& uuid, const ModifyRequest& req) {
  std::lock_guard lk(impl_->mu);
  VG_TRY_ASSIGN(std::optional<Definition> cur, impl_->ReadDef(uuid));
  VG_ERROR_IF(!cur, Errc::kNotFound, "{} is not defined on {}", uuid, impl_->parent);
  Definition d = std::move(*cur);
  if (req.type) d.type = *req.type;
  if (req.start) d.start = *req.start;
  // Same index rules as mdevctl's add_attribute/delete_attribute.
  if (req.add_attr) {
    const size_t i = req.index.value_or(static_cast<uint32_t>(d.attrs.size()));
    VG_INVALID_IF(i > d.attrs.size(), "attribute index {} is invalid", i);
    d.attrs.insert(d.attrs.begin() + static_cast<ptrdiff_t>(i), *req.add_attr);
  } else if (req.del_attr) {
    VG_INVALID_IF(d.attrs.empty(), "no attribute to delete");
    const size_t i = req.index.value_or(static_cast<uint32_t>(d.attrs.size() - 1));
    VG_INVALID_IF(i >= d.attrs.size(), "attribute index {} is invalid", i);
    d.attrs.erase(d.attrs.begin() + static_cast<ptrdiff_t>(i));
  }
  VG_TRY(impl_->ValidateDef(d));
  return WriteFileAtomic(impl_->DefPath(uuid), FormatDefinition(d));
}

Result<Definition> Manager::GetDefinition(const Uuid& uuid) const {
  VG_TRY_ASSIGN(std::optional<Definition> d, impl_->ReadDef(uuid));
  VG_ERROR_IF(!d, Errc::kNotFound, "{} is not defined on {}", uuid, impl_->parent);
  return std::move(*d);
}

Result<std::vector<Definition>> Manager::ListDefined() const {
  std::vector<Definition> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(impl_->defs_dir, ec)) {
    if (!e.is_regular_file()) continue;
    auto u = Uuid::Parse(e.path().filename().string());
    if (!u) continue;  // temp files of an atomic write, stray files: not definitions
    auto d = impl_->ReadDef(*u);
    if (!d || !d.value()) {
      VG_LOGW("mdev: skipping unreadable definition {}: {}", e.path().string(),
              d ? std::string("vanished") : d.error().ToString());
      continue;
    }
    out.push_back(std::move(*d.value()));
  }
  VG_ERROR_IF(ec, Errc::kIo, "list {}: {}", impl_->defs_dir.string(), ec.message());
  std::sort(out.begin(), out.end(), [](const Definition& a, const Definition& b) { return a.uuid < b.uuid; });
  return out;
}

Result<std::string> Manager::Start(const Uuid& uuid) {
  std::unique_lock lk(impl_->mu);
  VG_TRY_ASSIGN(std::optional<Definition> d, impl_->ReadDef(uuid));
  VG_ERROR_IF(!d, Errc::kNotFound, "{} is not defined on {}", uuid, impl_->parent);
  return impl_->StartLocked(lk, uuid, d->type, d->attrs);
}

Result<std::string> Manager::StartTransient(const Uuid& uuid, std::string_view type_id, const Attributes& attrs) {
  std::unique_lock lk(impl_->mu);
  return impl_->StartLocked(lk, uuid, type_id, attrs);
}

Result<> Manager::Stop(const Uuid& uuid) {
  std::lock_guard lk(impl_->mu);
  auto it = impl_->active.find(uuid);
  VG_ERROR_IF(it == impl_->active.end(), Errc::kNotFound, "{} is not active", uuid);
  VG_ERROR_IF(it->second.starting, Errc::kBusy, "{} is still starting", uuid);
  VG_TRY_CTX(impl_->host.StopInstance(uuid), "stop {}", uuid);
  impl_->active.erase(it);
  VG_LOGI("mdev: stopped {}", uuid);
  return Ok();
}

Result<> Manager::SetAttribute(const Uuid& uuid, std::string_view name, std::string_view value) {
  const std::string v = StripNewline(value);
  VG_TRY(ValidateAttribute(name, v));
  std::lock_guard lk(impl_->mu);
  auto it = impl_->active.find(uuid);
  VG_ERROR_IF(it == impl_->active.end(), Errc::kNotFound, "{} is not active", uuid);
  VG_TRY(impl_->host.SetAttribute(uuid, name, v));
  SetAttr(it->second.attrs, name, v);
  return Ok();
}

std::vector<InstanceInfo> Manager::ListActive() const {
  std::vector<InstanceInfo> out;
  std::lock_guard lk(impl_->mu);
  for (const auto& [u, a] : impl_->active) {
    InstanceInfo i{u, a.type.id, a.attrs, a.socket, true, false, StartMode::kManual};
    if (auto d = impl_->ReadDef(u); d && d.value()) {
      i.defined = true;
      i.start = d.value()->start;
    }
    out.push_back(std::move(i));
  }
  return out;
}

Result<InstanceInfo> Manager::Show(const Uuid& uuid) const {
  std::lock_guard lk(impl_->mu);
  InstanceInfo i;
  i.uuid = uuid;
  if (auto it = impl_->active.find(uuid); it != impl_->active.end()) {
    i.active = true;
    i.type = it->second.type.id;
    i.attrs = it->second.attrs;
    i.socket_path = it->second.socket;
  }
  VG_TRY_ASSIGN(std::optional<Definition> d, impl_->ReadDef(uuid));
  if (d) {
    i.defined = true;
    i.start = d->start;
    if (!i.active) {
      i.type = d->type;
      i.attrs = d->attrs;
    }
  }
  VG_ERROR_IF(!i.active && !i.defined, Errc::kNotFound, "{} is neither active nor defined", uuid);
  return i;
}

std::vector<Error> Manager::StartAutoInstances() {
  std::vector<Error> failures;
  auto defs = ListDefined();
  if (!defs) return {std::move(defs).error()};
  for (const Definition& d : *defs) {
    if (d.start != StartMode::kAuto) continue;
    std::unique_lock lk(impl_->mu);
    if (impl_->active.count(d.uuid)) continue;
    auto r = impl_->StartLocked(lk, d.uuid, d.type, d.attrs);
    if (!r) {
      VG_LOGW("mdev: auto-start of {} failed: {}", d.uuid, r.error().ToString());
      failures.push_back(std::move(r).error());
    }
  }
  return failures;
}

void Manager::StopAll() {
  std::lock_guard lk(impl_->mu);
  for (auto it = impl_->active.begin(); it != impl_->active.end();) {
    if (it->second.starting) {  // its StartInstance fails once the host is shut down
      ++it;
      continue;
    }
    auto r = impl_->host.StopInstance(it->first);
    if (!r) VG_LOGW("mdev: stop {} failed: {}", it->first, r.error().ToString());
    it = impl_->active.erase(it);
  }
}

CalloutAnswer Manager::AnswerCallout(const CalloutQuery& q) const {
  using V = CalloutAnswer::Verdict;
  if (q.parent != impl_->parent) return {V::kNotOurs, ""};
  auto uuid = Uuid::Parse(q.uuid);
  if (q.event == "get") {
    // mdevctl asks for the live attributes of an active device it has no definition for.
    nlohmann::ordered_json attrs = nlohmann::ordered_json::array();
    if (uuid) {
      std::lock_guard lk(impl_->mu);
      if (auto it = impl_->active.find(*uuid); it != impl_->active.end())
        for (const auto& [k, v] : it->second.attrs) attrs.push_back({{k, v}});
    }
    return {V::kOk, attrs.dump()};
  }
  if (q.event != "pre") return {V::kOk, ""};
  if (q.action != "define" && q.action != "start" && q.action != "modify") return {V::kOk, ""};
  VG_LOGD("mdev: callout pre-{} {} {}", q.action, q.type, q.uuid);
  Definition d;
  d.type = q.type;
  if (!q.config_json.empty()) {
    auto parsed = ParseDefinition(uuid.value_or(Uuid{}), q.config_json);
    if (!parsed) return {V::kVeto, parsed.error().what};
    d = std::move(*parsed);
  }
  if (q.action == "start") {
    std::lock_guard lk(impl_->mu);
    auto r = impl_->ValidateStartLocked(uuid.value_or(Uuid::Random()), d.type, d.attrs);
    return r ? CalloutAnswer{V::kOk, ""} : CalloutAnswer{V::kVeto, r.error().what};
  }
  if (auto r = impl_->ValidateDef(d); !r) return {V::kVeto, r.error().what};
  return {V::kOk, ""};
}

}  // namespace vg::mdev
