// cgroup v2 slots. Where the host has no delegated cgroup v2 with memory and cpu (this CI
// host: cgroup v1, with a hybrid v2 holding only hugetlb), Detect must say why; where it has
// one, a slot's memory.max must really OOM-kill a child that goes past it.

#include "sandbox/cgroup.h"

#include <doctest.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/statfs.h>

#include <cstring>
#include <filesystem>
#include <string>

#include "tests/sandbox/child.h"

using namespace vg;
using namespace vg::sandbox;
using namespace vg::sandbox::test;
namespace fs = std::filesystem;

namespace {
bool IsCgroup2(const char* path) {
  struct statfs s {};
  return ::statfs(path, &s) == 0 && s.f_type == CGROUP2_SUPER_MAGIC;
}
}  // namespace

TEST_CASE("Detect: a directory that is not cgroup2 is refused, saying so") {
  auto r = CgroupParent::Detect(fs::temp_directory_path());
  REQUIRE_FALSE(r.ok());
  CHECK(r.code() == Errc::kUnsupported);
  CHECK_MESSAGE(r.error().what.find("is not cgroup2") != std::string::npos, r.error().what);
}

TEST_CASE("Detect: a hybrid host's cgroup v2 without memory and cpu is refused, naming them") {
  if (!IsCgroup2("/sys/fs/cgroup/unified")) {
    MESSAGE("skipped: no hybrid /sys/fs/cgroup/unified here");
    return;
  }
  auto r = CgroupParent::Detect("/sys/fs/cgroup/unified");
  if (r.ok()) {
    MESSAGE("the hybrid v2 hierarchy offers memory and cpu here: nothing to refuse");
    return;
  }
  MESSAGE("refused: ", r.error().what);
  CHECK(r.code() == Errc::kUnsupported);
  CHECK(r.error().what.find("not offered") != std::string::npos);
}

TEST_CASE("Detect on this host: a named error on cgroup v1, a slot that OOM-kills on delegated v2") {
  if (!IsCgroup2("/sys/fs/cgroup")) {
    // cgroup v1 or hybrid: the supervisor must hear why, then fall back to rlimits.
    auto r = CgroupParent::Detect();
    REQUIRE_FALSE(r.ok());
    CHECK(r.code() == Errc::kUnsupported);
    CHECK_MESSAGE(r.error().what.find("/sys/fs/cgroup") != std::string::npos, r.error().what);
    MESSAGE("cgroup v1 host; Detect says: ", r.error().what);
    MESSAGE("skipped: the memory.max OOM test needs a delegated cgroup v2 hierarchy");
    return;
  }
  auto parent = CgroupParent::Detect();
  if (!parent.ok()) {
    MESSAGE("skipped: cgroup v2 here, but not usable for slots: ", parent.error().what);
    return;
  }
  CgroupLimits l;
  l.memory_max_bytes = 64ull << 20;
  l.pids_max = parent->has_pids() ? 64 : 0;
  l.cpu_max_percent = 50;
  auto slot = parent->CreateSlot("vgpud-sandbox-test-" + std::to_string(::getpid()), l);
  REQUIRE_MESSAGE(slot.ok(), slot.error().ToString());
  CHECK(fs::exists(slot->path() / "memory.max"));

  Gate moved = Gate::Make();
  pid_t pid = Spawn([&] {
    if (!moved.AwaitOpen(30'000)) return 3;
    // 256 MiB touched, four times the slot's memory.max; swap is off for the slot.
    const size_t n = 256ull << 20;
    auto* p = static_cast<unsigned char*>(::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (p == MAP_FAILED) return 4;
    for (size_t i = 0; i < n; i += 4096) p[i] = 1;
    return 0;  // survived: the limit did nothing
  });
  auto added = slot->AddProcess(pid);
  moved.Open();
  ChildEnd end = Wait(pid);
  REQUIRE_MESSAGE(added.ok(), added.error().ToString());
  CHECK_MESSAGE(end.KilledBy(SIGKILL), end.Describe());
  auto kills = slot->OomKills();
  REQUIRE(kills.ok());
  CHECK(*kills >= 1);
  auto cur = slot->MemoryCurrent();
  CHECK(cur.ok());

  CHECK_FALSE(parent->CreateSlot("../escape", {}).ok());
  CHECK_FALSE(parent->CreateSlot("cgroup.procs", {}).ok());
  CHECK_FALSE(parent->CreateSlot(CgroupParent::kSupervisorLeaf, {}).ok());
  const fs::path where = slot->path();
  *slot = CgroupSlot();  // the destructor's rmdir
  CHECK_FALSE(fs::exists(where));
}
