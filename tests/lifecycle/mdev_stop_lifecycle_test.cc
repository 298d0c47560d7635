// F8: mdevctl's stop, through the live mdev tree, with a guest attached: the same stop as
// vgpuctl's (docs/management.md "Stop with a VM attached"). A write of 1 to the instance's
// `remove` (what mdevctl's stop does) and the real mdevctl through tools/mdevctl-ns both
// signal REQ; the guest releases the device and the vGPU is gone; the victim sees nothing.
// Runs in a private mount namespace (tests/mdev/ns_main.cc): skipped without FUSE or root.
#include <fcntl.h>

#include "tests/lifecycle/lifecycle_common.h"

using namespace vg;
using namespace vg::lifecycle;

namespace {

int Store(const mgmt::fs::path& p, const std::string& v) {
  int fd = ::open(p.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return errno;
  ssize_t n = ::write(fd, v.data(), v.size());
  int e = n == static_cast<ssize_t>(v.size()) ? 0 : errno;
  ::close(fd);
  return e;
}

}  // namespace

TEST_CASE("mdevctl stop (the tree's remove, and the real mdevctl) with a guest attached: REQ, the guest releases") {
  mgmt::DaemonProc d;
  const mgmt::fs::path root = d.dir() / "root";
  mgmt::fs::create_directories(root);
  REQUIRE_MESSAGE(d.Start({"--root", root.string()}), d.Log());
  StartVgpu(d, kUuidB);
  e2e::Victim v(d.Socket(kUuidB));
  const bool real_mdevctl = std::getenv("MDEVCTL") != nullptr;
  for (int round = 0; round < (real_mdevctl ? 2 : 1); ++round) {
    CAPTURE(round);
    StartVgpu(d, kUuidA);
    const std::string socket = d.Socket(kUuidA);
    GuestProc g([&](GuestProc::Shared& s) { return WorkingGuest(s, socket, /*listen=*/true); });
    REQUIRE(g.WaitFor([](const auto& s) { return s.rounds.load() > 0 || s.note[0] != 0; }, 30000));
    REQUIRE_MESSAGE(g.shared().rounds.load() > 0, g.note());
    auto t0 = Clock::now();
    if (round == 0) {
      CHECK(Store(root / "sys/bus/mdev/devices" / kUuidA / "remove", "1") == 0);
    } else {
      std::vector<std::string> argv{mgmt::Env("MDEVCTL_NS", "tools/mdevctl-ns"), "--root", root.string(), "--",
                                    "stop", "-u", kUuidA};
      mgmt::Ran r = mgmt::RunCapture(argv);
      CHECK_MESSAGE(r.code == 0, r.err << r.out);
    }
    const double stop_ms = MsSince(t0);
    const int code = g.Wait(static_cast<int>(4000 * SlowFactor()));
    INFO("guest: exit ", code, " after ", MsSince(t0), " ms: ", g.note());
    MESSAGE(std::string(round == 0 ? "remove" : "mdevctl stop"), " returned in ", stop_ms, " ms; the guest released after ",
            MsSince(t0), " ms");
    CHECK(code == kReleased);
    CHECK(stop_ms < 2000 * SlowFactor());
    CHECK(!mgmt::fs::exists(socket));
  }
  e2e::CheckVictim(v.Stop());
  CheckShutdown(d);
}
