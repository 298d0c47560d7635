// main() for the tests that mount the FUSE tree: run in a private mount namespace, so
// every mount dies with the process even if a test crashes (no stale mounts left behind).
// Must run before any thread exists: unshare(CLONE_NEWNS) refuses a shared fs_struct.

#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest.h>
#include <sched.h>
#include <sys/mount.h>
#include <unistd.h>

#include <cstdio>

#include "mdev/mdev.h"

int main(int argc, char** argv) {
  constexpr int kSkip = 77;  // meson's "skipped"
  if (!vg::mdev::TreeSupported()) {
    fprintf(stderr, "SKIP: built without libfuse3\n");
    return kSkip;
  }
  if (access("/dev/fuse", R_OK | W_OK) != 0 || unshare(CLONE_NEWNS) != 0 ||
      mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
    perror("SKIP: need /dev/fuse and CAP_SYS_ADMIN for a private mount namespace");
    return kSkip;
  }
  doctest::Context ctx(argc, argv);
  return ctx.run();
}
