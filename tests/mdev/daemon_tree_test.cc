// The daemon serving the live mdev tree (--root): vgpuctl and the tree (and the real
// mdevctl through tools/mdevctl-ns) see and drive the same vGPUs. The test process runs in a
// private mount namespace (ns_main.cc) and the daemon inherits it, so the tree's mount
// dies with the test.
#include <doctest.h>
#include <fcntl.h>

#include <atomic>
#include <cerrno>

#include "tests/mdev/daemon_harness.h"

using namespace vg::mgmt;

namespace {

constexpr const char* kU1 = "11111111-2222-4333-8444-555555555555";
constexpr const char* kU2 = "22222222-3333-4444-8555-666666666666";

// A sysfs-style store: one write(); 0 or the errno.
int Store(const fs::path& p, const std::string& v) {
  int fd = open(p.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return errno;
  ssize_t n = write(fd, v.data(), v.size());
  int e = n == static_cast<ssize_t>(v.size()) ? 0 : errno;
  close(fd);
  return e;
}

std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

struct TreeDaemon {
  DaemonProc d;
  fs::path root;
  TreeDaemon() {
    root = d.dir() / "root";
    fs::create_directories(root);
  }
  bool Start(std::vector<std::string> extra = {}) {
    extra.insert(extra.begin(), {"--root", root.string()});
    return d.Start(extra);
  }
  fs::path Parent() const { return root / "sys/devices/vgpud/vgpud0"; }
  fs::path Type(const std::string& t) const { return Parent() / "mdev_supported_types" / t; }
  fs::path Dev(const std::string& u) const { return root / "sys/bus/mdev/devices" / u; }
  Ran Mdevctl(std::vector<std::string> args) const {
    std::vector<std::string> argv{Env("MDEVCTL_NS", "tools/mdevctl-ns"), "--root", root.string(), "--"};
    for (auto& a : args) argv.push_back(a);
    return RunCapture(argv);
  }
};

}  // namespace

TEST_CASE("vgpuctl and the mdev tree drive the same vGPUs") {
  TreeDaemon t;
  REQUIRE_MESSAGE(t.Start(), t.d.Log());
  CHECK(t.d.CtlJson({"types"})["types"].size() == 3);
  CHECK(Trim(ReadFile(t.Type("vgpud-small") / "available_instances")) == "16");

  // vgpuctl start -> the tree shows the device and its socket
  REQUIRE(t.d.Ctl({"start", "-t", "small", "-u", kU1}).code == 0);
  CHECK(fs::exists(t.Dev(kU1)));
  CHECK(Trim(ReadFile(t.Dev(kU1) / "vfio_user_socket")) == t.d.Socket(kU1));
  CHECK(Trim(ReadFile(t.Type("vgpud-small") / "available_instances")) == "15");

  // a write to `create` (the FUSE thread) starts a real vGPU before write() returns
  REQUIRE(Store(t.Type("vgpud-medium") / "create", std::string(kU2) + "\n") == 0);
  CHECK(IsListening(t.d.Socket(kU2)));
  Json l = t.d.CtlJson({"list"});
  CHECK(l["instances"].size() == 2);
  CHECK(t.d.CtlJson({"show", kU2})["type"] == "vgpud-medium");
  // attributes written to the device directory reach the daemon's instance
  REQUIRE(Store(t.Dev(kU2) / "sched_weight", "321\n") == 0);
  CHECK(t.d.CtlJson({"show", kU2})["sched_weight"] == 321);
  CHECK(Store(t.Type("vgpud-medium") / "create", std::string(kU2)) == EEXIST);
  // the kernel's errnos for what the daemon refuses
  CHECK(Store(t.Type("vgpud-medium") / "create", "nonsense") == EINVAL);

  // remove through the tree: gone from vgpuctl, socket closed, before write() returns
  REQUIRE(Store(t.Dev(kU2) / "remove", "1") == 0);
  CHECK(!fs::exists(t.d.Socket(kU2)));
  CHECK(t.d.CtlJson({"list"})["instances"].size() == 1);
  // vgpuctl stop: gone from the tree
  REQUIRE(t.d.Ctl({"stop", kU1}).code == 0);
  CHECK(!fs::exists(t.Dev(kU1)));

  CHECK(t.d.Shutdown() == 0);
  CHECK(!fs::exists(t.Parent()));  // unmounted on the way out
}

TEST_CASE("tree writes and control requests at once: no deadlock, budget kept") {
  TreeDaemon t;
  REQUIRE_MESSAGE(t.Start({"--aperture-budget", "512M"}), t.d.Log());
  std::atomic<bool> stop{false};
  std::atomic<int> tree_ok{0}, tree_full{0};
  std::thread fuse_side([&] {
    // Each iteration: create and remove through the tree (FUSE thread -> loop thread).
    std::vector<std::string> mine;
    for (int i = 0; i < 200 && !stop; ++i) {
      char u[40];
      snprintf(u, sizeof(u), "aaaaaaaa-0000-4000-8000-%012d", i);
      int e = Store(t.Type("vgpud-small") / "create", u);
      if (e == 0) {
        ++tree_ok;
        Store(t.Dev(u) / "remove", "1");
      } else if (e == EUSERS) {
        ++tree_full;
      }
    }
  });
  int ctl_ok = 0;
  for (int i = 0; i < 15; ++i) {
    Ran r = t.d.Ctl({"--json", "start", "-t", "small"});
    if (r.code == 0) {
      ++ctl_ok;
      REQUIRE(t.d.Ctl({"stop", r.json()["uuid"].get<std::string>()}).code == 0);
    } else {
      CHECK(r.json()["error"] == "kLimitExceeded");
    }
    // 512M of budget: 4 mediums fill it and nothing else fits until they go
    CHECK(t.d.Ctl({"list"}).code == 0);
  }
  stop = true;
  fuse_side.join();
  CHECK(ctl_ok > 0);
  CHECK(tree_ok > 0);
  CHECK(t.d.Alive());
  CHECK(t.d.CtlJson({"list"})["instances"].empty());
  // the budget holds across both doors: 8 smalls fit in 512M, the 9th does not
  for (int i = 0; i < 8; ++i) REQUIRE(t.d.Ctl({"start", "-t", "small"}).code == 0);
  CHECK(Store(t.Type("vgpud-small") / "create", "bbbbbbbb-0000-4000-8000-000000000001") == EUSERS);
  CHECK(t.d.Ctl({"start", "-t", "small"}).code == 1);
  CHECK(t.d.Shutdown() == 0);
}

TEST_CASE("the real mdevctl drives the daemon's vGPUs (mdevctl-ns)") {
  if (!std::getenv("MDEVCTL")) {
    MESSAGE("mdevctl not installed: skipped");
    return;
  }
  TreeDaemon t;
  REQUIRE_MESSAGE(t.Start(), t.d.Log());
  Ran types = t.Mdevctl({"types"});
  CHECK_MESSAGE(types.code == 0, types.err);
  CHECK(types.out.find("vgpud-small") != std::string::npos);

  // mdevctl start (transient) -> a real vGPU the daemon serves
  Ran s = t.Mdevctl({"start", "-u", kU1, "-p", "vgpud0", "-t", "vgpud-small"});
  REQUIRE_MESSAGE(s.code == 0, s.err);
  Json show = t.d.CtlJson({"show", kU1});
  CHECK(show["state"] == "running");
  CHECK(IsListening(t.d.Socket(kU1)));
  // vgpuctl's definition is mdevctl's definition
  REQUIRE(t.d.Ctl({"define", "-u", kU2, "-t", "medium", "--auto", "--attr", "rate_limit=10"}).code == 0);
  Ran ld = t.Mdevctl({"list", "--defined"});
  CHECK(ld.out.find(std::string(kU2) + " vgpud0 vgpud-medium auto") != std::string::npos);
  Ran st = t.Mdevctl({"start", "-u", kU2});
  REQUIRE_MESSAGE(st.code == 0, st.err);
  CHECK(t.d.CtlJson({"show", kU2})["rate_limit"] == 10);
  Ran l = t.Mdevctl({"list"});
  CHECK(l.out.find(kU1) != std::string::npos);
  CHECK(l.out.find(kU2) != std::string::npos);
  // the callout asks the daemon: an unknown type is vetoed before anything is written
  Ran bad = t.Mdevctl({"define", "-p", "vgpud0", "-t", "vgpud-huge"});
  CHECK(bad.code != 0);
  REQUIRE(t.Mdevctl({"stop", "-u", kU1}).code == 0);
  CHECK(t.d.Ctl({"show", kU1}).code == 1);  // transient: gone
  CHECK(t.d.CtlJson({"list"})["instances"].size() == 1);

  // restart: mdevctl's auto definition comes back
  t.d.KeepDir(true);
  CHECK(t.d.Shutdown() == 0);
  REQUIRE_MESSAGE(t.d.Start({"--root", t.root.string()}), t.d.Log());
  CHECK(t.d.CtlJson({"show", kU2})["state"] == "running");
  Ran l2 = t.Mdevctl({"list"});
  CHECK(l2.out.find(kU2) != std::string::npos);
  CHECK(t.d.Shutdown() == 0);
  t.d.KeepDir(false);
}
