// The live mdev tree, served with libfuse3's high-level API on a thread of its own.
//
// Nothing here is cached: every lookup resolves the path against the Manager (and the
// kernel is told not to cache entries or attributes), so what mdevctl lists is the state
// of this instant. Readable files are generated once per open(), so a reader never sees
// a file half-way through a change. A store to `create`/`remove`/an attribute acts inside
// the write() call, as sysfs does, so the effect is done when write() returns.

#define FUSE_USE_VERSION 35
#include <fuse.h>
#include <fuse_lowlevel.h>
#include <poll.h>
#include <sys/mount.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <functional>
#include <optional>
#include <sstream>
#include <thread>
#include <unordered_map>

#include "base/fd.h"
#include "base/log.h"
#include "mdev/mdev.h"

namespace vg::mdev {
namespace {

constexpr std::string_view kDeviceBase = "devices/vgpud";

enum class Kind { kDir, kFile, kLink };

struct Node {
  Kind kind = Kind::kDir;
  std::vector<std::string> children;             // kDir
  std::string target;                            // kLink
  std::function<std::string()> read;             // kFile; null when write-only
  std::function<int(std::string_view)> write;    // kFile; null when read-only; returns 0 or -errno
  bool query = false;                            // the callout file: write a question, read the answer
};

// Per-open state: the snapshot of a readable file, or a callout question and its answer.
struct Handle {
  std::string content;
  bool query = false;
  std::string request;
  bool answered = false;
  size_t pos = 0;
};

std::vector<std::string> Split(std::string_view path) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i < path.size()) {
    size_t j = path.find('/', i);
    if (j == std::string_view::npos) j = path.size();
    if (j > i) out.emplace_back(path.substr(i, j - i));
    i = j + 1;
  }
  return out;
}

// The kernel's errno for each refusal of a store (drivers/vfio/mdev/mdev_core.c,
// mdev_sysfs.c): a bad uuid string is -EINVAL, a duplicate -EEXIST, a parent with no
// instances left -EUSERS.
int StoreErrno(const Error& e) {
  switch (e.code) {
    case Errc::kLimitExceeded: return EUSERS;
    case Errc::kAlreadyExists: return EEXIST;
    case Errc::kNotFound: return ENODEV;
    default: return ErrcToErrno(e.code);
  }
}

std::string Trim(std::string_view s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ' || s.back() == '\0')) s.remove_suffix(1);
  return std::string(s);
}

}  // namespace

struct MdevTree::Impl {
  Manager& mgr;
  std::filesystem::path mountpoint;
  fuse* f = nullptr;
  EventFd stop;
  std::thread thread;
  // Open files, owned here: a RELEASE still queued when the tree is torn down never comes.
  // Touched only by the FUSE thread (and by the destructor after it has joined).
  std::unordered_map<Handle*, std::unique_ptr<Handle>> handles;

  Impl(Manager& m, std::filesystem::path p) : mgr(m), mountpoint(std::move(p)) {}

  static Impl* Self() { return static_cast<Impl*>(fuse_get_context()->private_data); }

  std::optional<InstanceInfo> ActiveInstance(std::string_view name) const {
    auto u = Uuid::Parse(name);
    // Only the canonical (lower-case) spelling names a device: one path per instance.
    if (!u || u->ToString() != name) return std::nullopt;
    auto i = mgr.Show(*u);
    if (!i || !i->active) return std::nullopt;
    return std::move(*i);
  }

  static Node File(std::function<std::string()> r, std::function<int(std::string_view)> w = nullptr) {
    Node n;
    n.kind = Kind::kFile;
    n.read = std::move(r);
    n.write = std::move(w);
    return n;
  }
  static Node Link(std::string target) {
    Node n;
    n.kind = Kind::kLink;
    n.target = std::move(target);
    return n;
  }
  static Node Dir(std::vector<std::string> children) {
    Node n;
    n.children = std::move(children);
    return n;
  }

  std::vector<std::string> ActiveNames(std::optional<std::string_view> type = std::nullopt) const {
    std::vector<std::string> out;
    for (const auto& i : mgr.ListActive())
      if (!type || i.type == *type) out.push_back(i.uuid.ToString());
    return out;
  }

  std::optional<Node> ResolveType(const VgpuType& t, const std::vector<std::string>& c, size_t at) const {
    if (c.size() == at) return Dir({"available_instances", "create", "description", "device_api", "devices", "name"});
    const std::string& f = c[at];
    if (c.size() == at + 1) {
      const std::string id = t.id;
      if (f == "name") return File([t] { return t.name + "\n"; });
      if (f == "description") return File([t] { return t.description + "\n"; });
      if (f == "device_api") return File([] { return std::string("vfio-pci\n"); });
      if (f == "available_instances")
        return File([this, id] { return fmt::format("{}\n", mgr.AvailableInstances(id)); });
      if (f == "create")
        return File(nullptr, [this, id](std::string_view data) -> int {
          // mdev_core: the store must be a uuid string, optionally newline-terminated.
          if (data.size() != 36 && !(data.size() == 37 && data.back() == '\n')) return -EINVAL;
          auto u = Uuid::Parse(data.substr(0, 36));
          if (!u) return -EINVAL;
          auto r = mgr.StartTransient(*u, id, {});
          if (!r) {
            VG_LOGW("mdev: create {} ({}) refused: {}", data.substr(0, 36), id, r.error().ToString());
            return -StoreErrno(r.error());
          }
          return 0;
        });
      if (f == "devices") return Dir(ActiveNames(t.id));
      return std::nullopt;
    }
    if (f == "devices" && c.size() == at + 2) {
      auto i = ActiveInstance(c[at + 1]);
      if (!i || i->type != t.id) return std::nullopt;
      return Link("../../../" + i->uuid.ToString());
    }
    return std::nullopt;
  }

  std::optional<Node> ResolveDevice(const InstanceInfo& info, const std::vector<std::string>& c, size_t at) const {
    if (c.size() == at) {
      std::vector<std::string> names{"mdev_type", "remove", "vfio_user_socket"};
      for (auto& a : AttributeNames()) names.push_back(a);
      return Dir(std::move(names));
    }
    if (c.size() != at + 1) return std::nullopt;
    const std::string& f = c[at];
    const Uuid u = info.uuid;
    if (f == "mdev_type") return Link("../mdev_supported_types/" + info.type);
    if (f == "vfio_user_socket") return File([s = info.socket_path] { return s + "\n"; });
    if (f == "remove")
      return File(nullptr, [this, u](std::string_view data) -> int {
        // mdev_sysfs remove_store: kstrtoul, then a non-zero value removes.
        const std::string v = Trim(data);
        char* end = nullptr;
        errno = 0;
        unsigned long n = strtoul(v.c_str(), &end, 0);
        if (v.empty() || errno != 0 || *end != '\0') return -EINVAL;
        if (n == 0) return 0;
        auto r = mgr.Stop(u);
        return r ? 0 : -StoreErrno(r.error());
      });
    for (const auto& a : AttributeNames()) {
      if (f != a) continue;
      return File(
          [this, u, a] {
            auto i = mgr.Show(u);
            if (i)
              for (const auto& [k, v] : i->attrs)
                if (k == a) return v + "\n";
            return std::string("\n");  // unset: the type's default applies
          },
          [this, u, a](std::string_view data) -> int {
            auto r = mgr.SetAttribute(u, a, data);
            return r ? 0 : -StoreErrno(r.error());
          });
    }
    return std::nullopt;
  }

  std::optional<Node> Resolve(std::string_view path) const {
    const std::vector<std::string> c = Split(path);
    const std::string& parent = mgr.parent();
    if (c.empty()) return Dir({"bus", "class", "devices", "vgpud"});
    if (c[0] == "class") {
      if (c.size() == 1) return Dir({"mdev_bus"});
      if (c[1] != "mdev_bus") return std::nullopt;
      if (c.size() == 2) return Dir({parent});
      if (c.size() == 3 && c[2] == parent) return Link(fmt::format("../../{}/{}", kDeviceBase, parent));
      return std::nullopt;
    }
    if (c[0] == "bus") {
      if (c.size() == 1) return Dir({"mdev"});
      if (c[1] != "mdev") return std::nullopt;
      if (c.size() == 2) return Dir({"devices"});
      if (c[2] != "devices") return std::nullopt;
      if (c.size() == 3) return Dir(ActiveNames());
      if (c.size() == 4) {
        auto i = ActiveInstance(c[3]);
        if (!i) return std::nullopt;
        return Link(fmt::format("../../../{}/{}/{}", kDeviceBase, parent, i->uuid.ToString()));
      }
      return std::nullopt;
    }
    if (c[0] == "vgpud") {
      if (c.size() == 1) return Dir({"callout"});
      if (c.size() == 2 && c[1] == "callout") {
        Node n = File([] { return std::string(); }, [](std::string_view) { return 0; });
        n.query = true;
        return n;
      }
      return std::nullopt;
    }
    if (c[0] == "devices") {
      if (c.size() == 1) return Dir({"vgpud"});
      if (c[1] != "vgpud") return std::nullopt;
      if (c.size() == 2) return Dir({parent});
      if (c[2] != parent) return std::nullopt;
      if (c.size() == 3) {
        std::vector<std::string> names{"mdev_supported_types"};
        for (auto& n : ActiveNames()) names.push_back(std::move(n));
        return Dir(std::move(names));
      }
      if (c[3] == "mdev_supported_types") {
        if (c.size() == 4) {
          std::vector<std::string> names;
          for (const auto& t : mgr.types()) names.push_back(t.id);
          return Dir(std::move(names));
        }
        auto t = mgr.FindType(c[4]);
        if (!t) return std::nullopt;
        return ResolveType(*t, c, 5);
      }
      auto i = ActiveInstance(c[3]);
      if (!i) return std::nullopt;
      return ResolveDevice(*i, c, 4);
    }
    return std::nullopt;
  }

  // The callout's question: "<event> <action> <parent> <type> <uuid>\n<definition JSON>".
  std::string Answer(const std::string& request) const {
    CalloutQuery q;
    const size_t nl = request.find('\n');
    std::istringstream head(request.substr(0, nl));
    head >> q.event >> q.action >> q.parent >> q.type >> q.uuid;
    if (nl != std::string::npos) q.config_json = Trim(request.substr(nl + 1));
    if (q.event.empty() || q.parent.empty()) return "veto malformed callout question\n";
    CalloutAnswer a = mgr.AnswerCallout(q);
    switch (a.verdict) {
      case CalloutAnswer::Verdict::kOk: return "ok\n" + (a.message.empty() ? "" : a.message + "\n");
      case CalloutAnswer::Verdict::kVeto: return "veto " + a.message + "\n";
      case CalloutAnswer::Verdict::kNotOurs: return "skip\n";
    }
    return "skip\n";
  }

  // ---- FUSE operations ----

  static int GetAttr(const char* path, struct stat* st, fuse_file_info*) {
    auto n = Self()->Resolve(path);
    if (!n) return -ENOENT;
    memset(st, 0, sizeof(*st));
    st->st_uid = 0;
    st->st_gid = 0;
    switch (n->kind) {
      case Kind::kDir:
        st->st_mode = S_IFDIR | 0755;
        st->st_nlink = 2;
        break;
      case Kind::kLink:
        st->st_mode = S_IFLNK | 0777;
        st->st_nlink = 1;
        st->st_size = static_cast<off_t>(n->target.size());
        break;
      case Kind::kFile:
        st->st_mode = S_IFREG | (n->read ? 0444 : 0) | (n->write ? 0200 : 0);
        st->st_nlink = 1;
        st->st_size = 4096;  // like sysfs: the real length is known only when read
        break;
    }
    return 0;
  }

  static int ReadLink(const char* path, char* buf, size_t size) {
    auto n = Self()->Resolve(path);
    if (!n) return -ENOENT;
    if (n->kind != Kind::kLink) return -EINVAL;
    if (size == 0) return -EINVAL;
    const size_t len = std::min(size - 1, n->target.size());
    memcpy(buf, n->target.data(), len);
    buf[len] = '\0';
    return 0;
  }

  static int ReadDir(const char* path, void* buf, fuse_fill_dir_t fill, off_t, fuse_file_info*, fuse_readdir_flags) {
    auto n = Self()->Resolve(path);
    if (!n) return -ENOENT;
    if (n->kind != Kind::kDir) return -ENOTDIR;
    fill(buf, ".", nullptr, 0, static_cast<fuse_fill_dir_flags>(0));
    fill(buf, "..", nullptr, 0, static_cast<fuse_fill_dir_flags>(0));
    for (const auto& c : n->children) fill(buf, c.c_str(), nullptr, 0, static_cast<fuse_fill_dir_flags>(0));
    return 0;
  }

  static int Open(const char* path, fuse_file_info* fi) {
    auto n = Self()->Resolve(path);
    if (!n) return -ENOENT;
    if (n->kind != Kind::kFile) return -EISDIR;
    const int acc = fi->flags & O_ACCMODE;
    if ((acc == O_WRONLY || acc == O_RDWR) && !n->write) return -EACCES;
    if ((acc == O_RDONLY || acc == O_RDWR) && !n->read) return -EACCES;
    auto h = std::make_unique<Handle>();
    h->query = n->query;
    if (n->read && !n->query) h->content = n->read();  // the snapshot this open will read
    fi->direct_io = 1;
    fi->fh = reinterpret_cast<uint64_t>(h.get());
    Handle* raw = h.get();
    Self()->handles.emplace(raw, std::move(h));
    return 0;
  }

  static int Read(const char*, char* buf, size_t size, off_t off, fuse_file_info* fi) {
    auto* h = reinterpret_cast<Handle*>(fi->fh);
    if (h->query) {
      // The callout wrote its question on this fd; the answer is read back from the start
      // whatever the file offset is.
      if (!h->answered) {
        h->content = Self()->Answer(h->request);
        h->answered = true;
        h->pos = 0;
      }
      const size_t n = std::min(size, h->content.size() - h->pos);
      memcpy(buf, h->content.data() + h->pos, n);
      h->pos += n;
      return static_cast<int>(n);
    }
    if (off < 0 || static_cast<size_t>(off) >= h->content.size()) return 0;
    const size_t n = std::min(size, h->content.size() - static_cast<size_t>(off));
    memcpy(buf, h->content.data() + off, n);
    return static_cast<int>(n);
  }

  static int Write(const char* path, const char* data, size_t size, off_t, fuse_file_info* fi) {
    auto* h = reinterpret_cast<Handle*>(fi->fh);
    if (h->query) {
      if (h->request.size() + size > 64 * 1024) return -E2BIG;
      h->request.append(data, size);
      h->answered = false;
      return static_cast<int>(size);
    }
    // Re-resolve: the device may have gone since open().
    auto n = Self()->Resolve(path);
    if (!n || !n->write) return -ENODEV;
    int r = n->write(std::string_view(data, size));
    return r < 0 ? r : static_cast<int>(size);
  }

  static int Release(const char*, fuse_file_info* fi) {
    Self()->handles.erase(reinterpret_cast<Handle*>(fi->fh));
    return 0;
  }

  // O_TRUNC on a store file (`echo 1 > remove`, Rust's fs::write) arrives as a truncate.
  static int Truncate(const char* path, off_t, fuse_file_info*) {
    auto n = Self()->Resolve(path);
    if (!n) return -ENOENT;
    return n->kind == Kind::kFile && n->write ? 0 : -EACCES;
  }

  static int Create(const char*, mode_t, fuse_file_info*) { return -EACCES; }

  static void* Init(fuse_conn_info*, fuse_config* cfg) {
    // No caching anywhere: the tree is live state.
    cfg->entry_timeout = 0;
    cfg->attr_timeout = 0;
    cfg->negative_timeout = 0;
    cfg->direct_io = 1;
    cfg->kernel_cache = 0;
    return fuse_get_context()->private_data;
  }

  void Loop() {
    fuse_session* se = fuse_get_session(f);
    const int fd = fuse_session_fd(se);
    fuse_buf buf{};
    while (!fuse_session_exited(se)) {
      pollfd p[2] = {{fd, POLLIN, 0}, {stop.Get(), POLLIN, 0}};
      if (poll(p, 2, -1) < 0) {
        if (errno == EINTR) continue;
        VG_LOGE("mdev tree: poll: {}", strerror(errno));
        break;
      }
      if (p[1].revents) break;
      int r = fuse_session_receive_buf(se, &buf);
      if (r == -EINTR || r == -EAGAIN) continue;
      if (r <= 0) break;  // unmounted from outside (ENODEV) or fatal
      fuse_session_process_buf(se, &buf);
    }
    free(buf.mem);
  }
};

bool TreeSupported() { return true; }

MdevTree::MdevTree(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

MdevTree::~MdevTree() {
  (void)impl_->stop.Signal();
  if (impl_->thread.joinable()) impl_->thread.join();
  fuse_unmount(impl_->f);
  fuse_destroy(impl_->f);
}

const std::filesystem::path& MdevTree::mountpoint() const { return impl_->mountpoint; }

Result<std::unique_ptr<MdevTree>> MdevTree::Mount(Manager& manager, const std::filesystem::path& mountpoint) {
  auto impl = std::make_unique<Impl>(manager, mountpoint);
  VG_TRY_ASSIGN(impl->stop, EventFd::Create());
  // A daemon that died left its mount behind ("transport endpoint is not connected"):
  // detach it, or the new mount fails.
  struct stat st;
  if (stat(mountpoint.c_str(), &st) != 0 && errno == ENOTCONN) umount2(mountpoint.c_str(), MNT_DETACH);
  std::error_code ec;
  std::filesystem::create_directories(mountpoint, ec);
  VG_ERROR_IF(ec, Errc::kIo, "create mount point {}: {}", mountpoint.string(), ec.message());

  static const fuse_operations kOps = [] {
    fuse_operations o{};
    o.getattr = &Impl::GetAttr;
    o.readlink = &Impl::ReadLink;
    o.readdir = &Impl::ReadDir;
    o.open = &Impl::Open;
    o.read = &Impl::Read;
    o.write = &Impl::Write;
    o.release = &Impl::Release;
    o.truncate = &Impl::Truncate;
    o.create = &Impl::Create;
    o.init = &Impl::Init;
    return o;
  }();
  char arg0[] = "vgpud-mdev";
  char* argv[] = {arg0, nullptr};
  fuse_args args = FUSE_ARGS_INIT(1, argv);
  impl->f = fuse_new(&args, &kOps, sizeof(kOps), impl.get());
  fuse_opt_free_args(&args);
  VG_ERROR_IF(impl->f == nullptr, Errc::kInternal, "fuse_new failed");
  if (fuse_mount(impl->f, mountpoint.c_str()) != 0) {
    fuse_destroy(impl->f);
    return MakeError(Errc::kIo, "cannot mount the mdev tree on {} (need root or fusermount3)", mountpoint.string());
  }
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->Loop(); });
  VG_LOGI("mdev: tree for parent {} mounted on {}", manager.parent(), mountpoint.string());
  return std::unique_ptr<MdevTree>(new MdevTree(std::move(impl)));
}

}  // namespace vg::mdev
