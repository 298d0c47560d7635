// The live FUSE tree through real file I/O: what the kernel's mdev sysfs would do.

#include <doctest.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>
#include <set>
#include <sstream>

#include "mdev/mdev.h"
#include "tests/mdev/test_host.h"

namespace vg::mdev {
namespace {
using testing::IsListening;
using testing::Slurp;
using testing::TempDir;
using testing::TestHost;
namespace fs = std::filesystem;
constexpr uint64_t kMiB = 1ull << 20;


// One write(2), as `echo` or mdevctl's fs::write does; returns 0 or the errno.
int Store(const fs::path& p, std::string_view data) {
  int fd = open(p.c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC);
  if (fd < 0) return errno;
  ssize_t n = write(fd, data.data(), data.size());
  int e = n < 0 ? errno : 0;
  close(fd);
  return e;
}

std::set<std::string> List(const fs::path& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.insert(e.path().filename().string());
  return out;
}

struct Tree {
  TempDir tmp;
  TestHost host{tmp.path() / "run"};
  std::unique_ptr<Manager> mgr;
  std::unique_ptr<MdevTree> tree;
  fs::path sys;
  explicit Tree(ByteSize budget = ByteSize{512 * kMiB}) {
    auto m = Manager::Create({tmp.path(), {}, std::nullopt, budget}, host);
    REQUIRE(m.ok());
    mgr = std::move(m).value();
    sys = tmp.path() / "sys";
    auto t = MdevTree::Mount(*mgr, sys);
    if (!t.ok()) FAIL(t.error().ToString());
    tree = std::move(t).value();
  }
  ~Tree() {
    tree.reset();  // unmount before the temp dir goes
    mgr->StopAll();
  }
  fs::path Type(std::string_view t) const {
    return sys / "class/mdev_bus/vgpud0/mdev_supported_types" / std::string(t);
  }
};

TEST_CASE("layout: parent, types and their files") {
  Tree t;
  CHECK(List(t.sys) == std::set<std::string>{"bus", "class", "devices", "vgpud"});
  CHECK(fs::is_symlink(t.sys / "class/mdev_bus/vgpud0"));
  CHECK(fs::canonical(t.sys / "class/mdev_bus/vgpud0") == t.sys / "devices/vgpud/vgpud0");
  CHECK(List(t.sys / "class/mdev_bus/vgpud0/mdev_supported_types") ==
        std::set<std::string>{"vgpud-large", "vgpud-medium", "vgpud-small"});
  CHECK(List(t.Type("vgpud-small")) ==
        std::set<std::string>{"available_instances", "create", "description", "device_api", "devices", "name"});
  CHECK(Slurp(t.Type("vgpud-small") / "device_api") == "vfio-pci\n");
  CHECK(Slurp(t.Type("vgpud-small") / "name") == "vgpud small\n");
  CHECK(Slurp(t.Type("vgpud-small") / "available_instances") == "8\n");
  CHECK(Slurp(t.Type("vgpud-large") / "available_instances") == "0\n");
  CHECK(!fs::exists(t.Type("vgpud-huge")));
  CHECK(fs::is_empty(t.sys / "bus/mdev/devices"));
  // Read-only files refuse writes; nothing can be created.
  CHECK(Store(t.Type("vgpud-small") / "available_instances", "9") == EACCES);
  CHECK(open((t.Type("vgpud-small") / "newfile").c_str(), O_WRONLY | O_CREAT, 0644) < 0);
}

TEST_CASE("create and remove act before the write returns") {
  Tree t;
  const std::string u = "0f1e2d3c-4b5a-4697-8877-665544332211";
  REQUIRE(Store(t.Type("vgpud-medium") / "create", u + "\n") == 0);
  // Done when write() returned: the socket listens, the device is in the tree.
  const fs::path dev = t.sys / "bus/mdev/devices" / u;
  REQUIRE(fs::is_symlink(dev));
  CHECK(fs::canonical(dev) == t.sys / "devices/vgpud/vgpud0" / u);
  CHECK(fs::canonical(dev / "mdev_type").filename() == "vgpud-medium");
  CHECK(!fs::exists(t.sys / "bus/mdev/devices/0F1E2D3C-4B5A-4697-8877-665544332211"));  // one spelling only
  const std::string sock = Slurp(dev / "vfio_user_socket");
  REQUIRE(!sock.empty());
  CHECK(IsListening(sock.substr(0, sock.size() - 1)));
  CHECK(List(t.Type("vgpud-medium") / "devices") == std::set<std::string>{u});
  CHECK(Slurp(t.Type("vgpud-medium") / "available_instances") == "1\n");
  CHECK(Slurp(t.Type("vgpud-small") / "available_instances") == "4\n");
  for (const char* f : {"mdev_type", "remove", "vfio_user_socket", "sched_weight", "rate_limit"})
    CHECK_MESSAGE(fs::exists(dev / f), f);

  // Attributes: validated, applied to the running instance.
  CHECK(Store(dev / "sched_weight", "300") == 0);
  CHECK(Slurp(dev / "sched_weight") == "300\n");
  CHECK(t.host.attrs(*Uuid::Parse(u)) == Attributes{{"sched_weight", "300"}});
  CHECK(Store(dev / "sched_weight", "0") == EINVAL);
  CHECK(Store(dev / "rate_limit", "fast") == EINVAL);

  // The kernel's errnos.
  CHECK(Store(t.Type("vgpud-medium") / "create", u) == EEXIST);
  CHECK(Store(t.Type("vgpud-medium") / "create", "not-a-uuid") == EINVAL);
  CHECK(Store(t.Type("vgpud-medium") / "create", "0f1e2d3c-4b5a-4697-8877-66554433221z") == EINVAL);
  CHECK(Store(t.Type("vgpud-medium") / "create", u + "\n\n") == EINVAL);
  CHECK(Store(t.Type("vgpud-large") / "create", Uuid::Random().ToString()) == EUSERS);
  const std::string u2 = Uuid::Random().ToString();
  REQUIRE(Store(t.Type("vgpud-medium") / "create", u2) == 0);
  CHECK(Store(t.Type("vgpud-small") / "create", Uuid::Random().ToString()) == EUSERS);  // budget spent
  CHECK(t.host.running() == 2);

  CHECK(Store(dev / "remove", "x") == EINVAL);
  CHECK(Store(dev / "remove", "0") == 0);  // a zero store is a no-op, as in the kernel
  CHECK(fs::exists(dev));
  REQUIRE(Store(dev / "remove", "1\n") == 0);
  CHECK(!fs::exists(dev));
  CHECK(!IsListening(sock.substr(0, sock.size() - 1)));
  CHECK(List(t.sys / "bus/mdev/devices") == std::set<std::string>{u2});
  CHECK(Slurp(t.Type("vgpud-medium") / "available_instances") == "1\n");
}

TEST_CASE("a reader sees the file as it was at open(), never half-changed") {
  Tree t;
  const fs::path avail = t.Type("vgpud-small") / "available_instances";
  int fd = open(avail.c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  char c = 0;
  REQUIRE(read(fd, &c, 1) == 1);  // first byte of "8\n"
  REQUIRE(Store(t.Type("vgpud-small") / "create", Uuid::Random().ToString()) == 0);
  char rest[8] = {};
  CHECK(read(fd, rest, sizeof(rest)) == 1);
  CHECK(std::string(1, c) + rest == "8\n");
  close(fd);
  CHECK(Slurp(avail) == "7\n");  // a new open sees the new state
}

TEST_CASE("the callout question file") {
  Tree t(ByteSize{64 * kMiB});
  auto ask = [&](const std::string& q) {
    int fd = open((t.sys / "vgpud/callout").c_str(), O_RDWR | O_CLOEXEC);
    REQUIRE(fd >= 0);
    REQUIRE(write(fd, q.data(), q.size()) == static_cast<ssize_t>(q.size()));
    char buf[512] = {};
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    return std::string(buf, n > 0 ? static_cast<size_t>(n) : 0);
  };
  const std::string u = Uuid::Random().ToString();
  CHECK(ask("pre start vgpud0 vgpud-small " + u + "\n") == "ok\n");
  CHECK(ask("pre start vgpud0 vgpud-medium " + u + "\n").rfind("veto no instances", 0) == 0);
  CHECK(ask("pre define vgpud0 vgpud-huge " + u + "\n").rfind("veto unknown type", 0) == 0);
  CHECK(ask("pre define other vgpud-small " + u + "\n") == "skip\n");
  CHECK(ask("garbage") == "veto malformed callout question\n");
}

TEST_CASE("a mount left by a dead daemon is replaced") {
  TempDir tmp;
  TestHost host(tmp.path() / "run");
  auto m = Manager::Create({tmp.path(), {}, std::nullopt, ByteSize{512 * kMiB}}, host);
  REQUIRE(m.ok());
  const fs::path sys = tmp.path() / "sys";
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    auto t = MdevTree::Mount(**m, sys);
    _exit(t.ok() ? 0 : 1);  // dies with the tree mounted: the mount goes stale
  }
  int st = 0;
  REQUIRE(waitpid(pid, &st, 0) == pid);
  REQUIRE(WIFEXITED(st));
  REQUIRE(WEXITSTATUS(st) == 0);
  std::error_code ec;
  CHECK(!fs::exists(sys / "class", ec));
  auto t = MdevTree::Mount(**m, sys);
  if (!t.ok()) FAIL(t.error().ToString());
  CHECK(fs::is_directory(sys / "class/mdev_bus/vgpud0"));
  t->reset();
}

}  // namespace
}  // namespace vg::mdev
