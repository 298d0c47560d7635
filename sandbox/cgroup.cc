#include "sandbox/cgroup.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "base/fd.h"
#include "base/log.h"

namespace vg::sandbox {
namespace fs = std::filesystem;
namespace {

Result<std::string> ReadText(const fs::path& p) {
  UniqueFd fd(::open(p.c_str(), O_RDONLY | O_CLOEXEC));
  VG_ERROR_IF(!fd.Valid(), errno == ENOENT ? Errc::kNotFound : Errc::kIo, "open {}: {}", p.string(),
              std::strerror(errno));
  std::string out;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd.Get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    VG_ERROR_IF(n < 0, Errc::kIo, "read {}: {}", p.string(), std::strerror(errno));
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

// One write(2): cgroup files take a whole value per write, and report refusal from it.
Result<> WriteText(const fs::path& p, std::string_view v) {
  UniqueFd fd(::open(p.c_str(), O_WRONLY | O_CLOEXEC));
  VG_ERROR_IF(!fd.Valid(), errno == ENOENT ? Errc::kNotFound : Errc::kIo, "open {}: {}", p.string(),
              std::strerror(errno));
  ssize_t n = ::write(fd.Get(), v.data(), v.size());
  if (n != static_cast<ssize_t>(v.size())) {
    const int e = n < 0 ? errno : EIO;
    return MakeError(e == EBUSY ? Errc::kBusy : e == EACCES || e == EPERM ? Errc::kAccessDenied : Errc::kIo,
                     "write '{}' to {}: {}", v, p.string(), std::strerror(e));
  }
  return Ok();
}

bool HasWord(std::string_view list, std::string_view word) {
  size_t pos = 0;
  while (pos < list.size()) {
    size_t end = list.find_first_of(" \n", pos);
    if (end == std::string_view::npos) end = list.size();
    if (list.substr(pos, end - pos) == word) return true;
    pos = end + 1;
  }
  return false;
}

std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

const char* FsName(long magic) {
  switch (magic) {
    case TMPFS_MAGIC: return " (tmpfs: the cgroup v1 layout)";
    case CGROUP_SUPER_MAGIC: return " (cgroup v1)";
    case SYSFS_MAGIC: return " (sysfs: nothing mounted)";
    default: return "";
  }
}

// Our cgroup v2 path from /proc/self/cgroup ("0::/system.slice/vgpud.service").
Result<std::string> OwnCgroupPath() {
  VG_TRY_ASSIGN(std::string text, ReadText("/proc/self/cgroup"));
  size_t pos = 0;
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string::npos) eol = text.size();
    std::string_view line(text.data() + pos, eol - pos);
    if (line.substr(0, 3) == "0::") return std::string(line.substr(3));
    pos = eol + 1;
  }
  return MakeError(Errc::kUnsupported, "/proc/self/cgroup has no '0::' line: a cgroup v1-only host");
}

}  // namespace

// ---------------------------------------------------------------------------------------

CgroupSlot::~CgroupSlot() { Remove(); }

CgroupSlot::CgroupSlot(CgroupSlot&& o) noexcept : path_(std::move(o.path_)) { o.path_.clear(); }

CgroupSlot& CgroupSlot::operator=(CgroupSlot&& o) noexcept {
  if (this != &o) {
    Remove();
    path_ = std::move(o.path_);
    o.path_.clear();
  }
  return *this;
}

void CgroupSlot::Remove() noexcept {
  if (path_.empty()) return;
  // A reaped worker leaves its cgroup a moment later (the css goes offline asynchronously),
  // so EBUSY right after waitpid() is normal; a live process in it is the caller's bug.
  for (int i = 0; i < 20; ++i) {
    if (::rmdir(path_.c_str()) == 0 || errno == ENOENT) {
      path_.clear();
      return;
    }
    if (errno != EBUSY) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  VG_LOGW("cgroup {}: not removed ({}); processes still in it?", path_.string(), std::strerror(errno));
  path_.clear();
}

Result<> CgroupSlot::AddProcess(pid_t pid) {
  VG_ERROR_IF(!Valid(), Errc::kBadState, "no cgroup slot");
  VG_INVALID_IF(pid <= 0, "pid {}", pid);
  return WriteText(path_ / "cgroup.procs", std::to_string(pid));
}

Result<uint64_t> CgroupSlot::MemoryCurrent() const {
  VG_ERROR_IF(!Valid(), Errc::kBadState, "no cgroup slot");
  VG_TRY_ASSIGN(std::string s, ReadText(path_ / "memory.current"));
  s = Trim(std::move(s));
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  VG_ERROR_IF(ec != std::errc() || p != s.data() + s.size(), Errc::kBadMessage, "memory.current: '{}'", s);
  return v;
}

Result<uint64_t> CgroupSlot::OomKills() const {
  VG_ERROR_IF(!Valid(), Errc::kBadState, "no cgroup slot");
  VG_TRY_ASSIGN(std::string s, ReadText(path_ / "memory.events"));
  const size_t at = s.find("oom_kill ");
  VG_ERROR_IF(at == std::string::npos, Errc::kBadMessage, "memory.events has no oom_kill");
  uint64_t v = 0;
  const char* b = s.data() + at + 9;
  auto [p, ec] = std::from_chars(b, s.data() + s.size(), v);
  VG_ERROR_IF(ec != std::errc(), Errc::kBadMessage, "memory.events: bad oom_kill");
  return v;
}

Result<> CgroupSlot::KillAll() {
  VG_ERROR_IF(!Valid(), Errc::kBadState, "no cgroup slot");
  auto r = WriteText(path_ / "cgroup.kill", "1");
  VG_ERROR_IF(r.code() == Errc::kNotFound, Errc::kUnsupported, "cgroup.kill needs Linux >= 5.14");
  return r;
}

// ---------------------------------------------------------------------------------------

namespace {

// Checks one candidate directory and makes it a parent of slots.
Result<std::pair<fs::path, bool>> Prepare(const fs::path& dir) {
  struct statfs sfs {};
  VG_ERROR_IF(::statfs(dir.c_str(), &sfs) != 0, Errc::kUnsupported, "{}: {}", dir.string(), std::strerror(errno));
  VG_ERROR_IF(sfs.f_type != CGROUP2_SUPER_MAGIC, Errc::kUnsupported, "{} is not cgroup2 (filesystem magic {:#x}{})",
              dir.string(), static_cast<unsigned long>(sfs.f_type), FsName(sfs.f_type));
  VG_TRY_ASSIGN(std::string controllers, ReadText(dir / "cgroup.controllers"));
  controllers = Trim(std::move(controllers));
  std::string missing;
  for (const char* c : {"memory", "cpu"})
    if (!HasWord(controllers, c)) missing += fmt::format("{}{}", missing.empty() ? "" : ", ", c);
  // On a hybrid host the v1 hierarchies hold memory and cpu; v2 gets what is left.
  VG_ERROR_IF(!missing.empty(), Errc::kUnsupported,
              "{}: controller(s) {} not offered (cgroup.controllers: '{}'; on a hybrid host they are bound to "
              "cgroup v1)",
              dir.string(), missing, controllers);
  for (const char* f : {"", "cgroup.subtree_control", "cgroup.procs"})
    VG_ERROR_IF(::access((dir / f).c_str(), W_OK) != 0, Errc::kAccessDenied,
                "{}{}{}: not writable by uid {} (cgroup not delegated: systemd Delegate=yes)", dir.string(),
                *f ? "/" : "", f, ::getuid());
  const bool has_pids = HasWord(controllers, "pids");

  // "No internal processes": a non-root cgroup with processes cannot hand controllers to its
  // children (EBUSY on subtree_control). The root cgroup, which has no cgroup.type, is exempt.
  const bool is_root = ::access((dir / "cgroup.type").c_str(), F_OK) != 0;
  if (!is_root) {
    VG_TRY_ASSIGN(std::string procs, ReadText(dir / "cgroup.procs"));
    const std::string self = std::to_string(::getpid());
    std::string others;
    bool holds_self = false;
    for (size_t pos = 0; pos < procs.size();) {
      size_t eol = procs.find('\n', pos);
      if (eol == std::string::npos) eol = procs.size();
      std::string pid = procs.substr(pos, eol - pos);
      if (pid == self)
        holds_self = true;
      else if (!pid.empty())
        others += fmt::format("{}{}", others.empty() ? "" : " ", pid);
      pos = eol + 1;
    }
    // Other processes are not ours to move (they may be a shell, or another service).
    VG_ERROR_IF(!others.empty(), Errc::kBusy,
                "{} holds processes other than us ({}), so its controllers cannot be given to worker "
                "cgroups (cgroup v2 'no internal processes' rule)",
                dir.string(), others);
    if (holds_self) {
      const fs::path leaf = dir / CgroupParent::kSupervisorLeaf;
      if (::mkdir(leaf.c_str(), 0755) != 0 && errno != EEXIST)
        return MakeError(Errc::kIo, "mkdir {}: {}", leaf.string(), std::strerror(errno));
      VG_TRY_CTX(WriteText(leaf / "cgroup.procs", self), "moving the supervisor into a leaf cgroup");
      VG_LOGI("cgroup: moved the supervisor into {} (no internal processes rule)", leaf.string());
    }
  }
  VG_TRY_ASSIGN(std::string enabled, ReadText(dir / "cgroup.subtree_control"));
  for (const char* c : {"memory", "cpu", "pids"}) {
    if (HasWord(Trim(enabled), c) || (std::string_view(c) == "pids" && !has_pids)) continue;
    VG_TRY_CTX(WriteText(dir / "cgroup.subtree_control", fmt::format("+{}", c)), "enabling {} for worker cgroups",
               c);
  }
  return std::pair{dir, has_pids};
}

}  // namespace

Result<CgroupParent> CgroupParent::Detect(const fs::path& override_dir) {
  std::vector<fs::path> candidates;
  if (!override_dir.empty()) {
    candidates.push_back(override_dir);
  } else {
    VG_TRY_ASSIGN(std::string own, OwnCgroupPath());
    // Detect ran before in this process and moved us into the leaf: the parent is above it.
    const std::string leaf_suffix = fmt::format("/{}", kSupervisorLeaf);
    if (own.size() > leaf_suffix.size() && own.ends_with(leaf_suffix)) own.resize(own.size() - leaf_suffix.size());
    const fs::path rel = fs::path(own).relative_path();
    for (const char* mount : {"/sys/fs/cgroup", "/sys/fs/cgroup/unified"})  // unified: the hybrid layout
      candidates.push_back(rel.empty() ? fs::path(mount) : fs::path(mount) / rel);
  }
  std::string why;
  Errc code = Errc::kUnsupported;
  for (const fs::path& c : candidates) {
    auto r = Prepare(c);
    if (r) return CgroupParent(r->first, r->second);
    // The most telling failure is the deepest one: "not delegated" beats "not cgroup2".
    if (r.code() != Errc::kUnsupported || why.empty()) code = r.code();
    why += fmt::format("{}{}", why.empty() ? "" : "; ", r.error().what);
  }
  return MakeError(code, "no usable cgroup v2 parent for worker cgroups: {}", why);
}

Result<CgroupSlot> CgroupParent::CreateSlot(std::string_view name, const CgroupLimits& l) {
  // One path component that cannot be mistaken for a control file or climb out.
  VG_INVALID_IF(name.empty() || name.size() > 200 || name == "." || name == ".." ||
                    name.find('/') != std::string_view::npos || name.find('\0') != std::string_view::npos ||
                    name.substr(0, 7) == "cgroup." || name == kSupervisorLeaf,
                "'{}' is not a worker cgroup name", name);
  VG_ERROR_IF(l.pids_max != 0 && !has_pids_, Errc::kUnsupported, "{}: no pids controller for pids_max",
              path_.string());
  const fs::path dir = path_ / name;
  if (::mkdir(dir.c_str(), 0755) != 0) {
    VG_ERROR_IF(errno != EEXIST, Errc::kIo, "mkdir {}: {}", dir.string(), std::strerror(errno));
    // A leftover from a supervisor that died: rmdir succeeds only if no process is in it.
    VG_ERROR_IF(::rmdir(dir.c_str()) != 0, Errc::kAlreadyExists, "{} exists and is in use: {}", dir.string(),
                std::strerror(errno));
    VG_ERROR_IF(::mkdir(dir.c_str(), 0755) != 0, Errc::kIo, "mkdir {}: {}", dir.string(), std::strerror(errno));
  }
  CgroupSlot slot(dir);  // removed again if a limit below cannot be set
  if (l.memory_max_bytes != 0) {
    VG_TRY(WriteText(dir / "memory.max", std::to_string(l.memory_max_bytes)));
    // Without swap.max 0 the limit only moves the excess to swap instead of bounding it.
    if (::access((dir / "memory.swap.max").c_str(), F_OK) == 0) VG_TRY(WriteText(dir / "memory.swap.max", "0"));
    // The whole worker dies on OOM, not one of its threads' victims picked at random.
    if (::access((dir / "memory.oom.group").c_str(), F_OK) == 0) VG_TRY(WriteText(dir / "memory.oom.group", "1"));
  }
  if (l.cpu_max_percent != 0) {
    constexpr uint64_t kPeriodUs = 100'000;
    const uint64_t quota = std::max<uint64_t>(1'000, uint64_t{l.cpu_max_percent} * kPeriodUs / 100);
    VG_TRY(WriteText(dir / "cpu.max", fmt::format("{} {}", quota, kPeriodUs)));
  }
  if (l.pids_max != 0) VG_TRY(WriteText(dir / "pids.max", std::to_string(l.pids_max)));
  return slot;
}

}  // namespace vg::sandbox
