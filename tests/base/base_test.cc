#include <doctest.h>

#include <sys/mman.h>

#include <cstring>
#include <fstream>
#include <string>
#include <thread>

#include "base/base.h"
#include "base/cpu_slice.h"

using namespace vg;

namespace {
Result<int> Half(int x) {
  VG_INVALID_IF(x % 2 != 0, "{} is odd", x);
  return x / 2;
}
Result<int> Quarter(int x) {
  VG_TRY_ASSIGN(int h, Half(x));
  VG_TRY_CTX(Half(h), "second halving of {}", x);
  return h / 2;
}
}  // namespace

TEST_CASE("Result carries values and named errors") {
  CHECK(Quarter(8).value() == 2);
  auto r = Quarter(6);
  REQUIRE_FALSE(r.ok());
  CHECK(r.code() == Errc::kInvalidArgument);
  CHECK(r.error().what == "second halving of 6: 3 is odd");
  CHECK(ErrcName(Errc::kOutOfBounds) == "kOutOfBounds");
  CHECK(ErrcToErrno(Errc::kOverlap) == EEXIST);
  CHECK(ErrcFromValue(static_cast<uint32_t>(Errc::kPrivileged)) == Errc::kPrivileged);
  CHECK(ErrcFromValue(0xffff) == Errc::kInternal);
}

TEST_CASE("checked address arithmetic refuses wrap-around") {
  CHECK(CheckedAdd(~0ull, 1).code() == Errc::kOutOfBounds);
  CHECK(CheckedEnd(Gpa{0x1000}, ByteSize{0x1000}).value() == Gpa{0x2000});
  CHECK_FALSE(CheckedEnd(Gpa{~0ull - 10}, ByteSize{11}).ok());
  CHECK(RangeWithin(0, 16, 16));
  CHECK_FALSE(RangeWithin(1, 16, 16));
  CHECK_FALSE(RangeWithin(8, ~0ull, 16));
  CHECK(RangesOverlap(0, 10, 9, 1));
  CHECK_FALSE(RangesOverlap(0, 10, 10, 1));
  CHECK_FALSE(RangesOverlap(0, 0, 0, 10));
}

TEST_CASE("uuid parse and print round-trip") {
  auto u = Uuid::Parse("83B8F4F2-509F-382F-3C1E-E6BFE0FA1001");
  REQUIRE(u.ok());
  CHECK(u->ToString() == "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001");
  CHECK_FALSE(Uuid::Parse("83b8f4f2-509f-382f-3c1e-e6bfe0fa100").ok());
  CHECK_FALSE(Uuid::Parse("83b8f4f2x509f-382f-3c1e-e6bfe0fa1001").ok());
  CHECK_FALSE(Uuid::Parse("g3b8f4f2-509f-382f-3c1e-e6bfe0fa1001").ok());
  auto a = Uuid::Random(), b = Uuid::Random();
  CHECK(a != b);
  CHECK(Uuid::Parse(a.ToString()).value() == a);
}

TEST_CASE("memfd mappings share bytes and eventfds count") {
  auto fd = CreateMemFd("t", ByteSize{8192});
  REQUIRE(fd.ok());
  auto m1 = Mapping::Map(*fd, ByteSize{8192}, 0);
  auto m2 = Mapping::Map(*fd, ByteSize{4096}, 4096);
  REQUIRE(m1.ok());
  REQUIRE(m2.ok());
  std::memcpy(m1->data() + 4096, "hello", 5);
  CHECK(std::memcmp(m2->data(), "hello", 5) == 0);
  CHECK(Mapping::Map(*fd, ByteSize{4096}, 7).code() == Errc::kMisaligned);
  CHECK(Mapping::Map(*fd, ByteSize{0}, 0).code() == Errc::kInvalidArgument);

  auto ev = EventFd::Create();
  REQUIRE(ev.ok());
  CHECK(ev->Drain().value() == 0);
  REQUIRE(ev->Signal(2).ok());
  REQUIRE(ev->Signal(3).ok());
  CHECK(ev->Wait(1000).value() == 5);
  CHECK(ev->Wait(10).code() == Errc::kTimeout);
}

namespace {
// The calling thread's slice as the scheduler reports it (/proc/thread-self/sched, se.slice in
// ns); 0 where the kernel does not say.
uint64_t ThreadSliceNs() {
  std::ifstream in("/proc/thread-self/sched");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("se.slice", 0) == 0) return std::stoull(line.substr(line.find(':') + 1));
  return 0;
}
}  // namespace

TEST_CASE("a short CPU slice is the calling thread's and its new threads'; the default comes back") {
  std::thread([] {  // a thread of its own: the test binary's other cases keep their slice
    const uint64_t before = ThreadSliceNs();
    if (!SetThreadCpuSlice(CpuSlice::kShort)) {
      MESSAGE("custom CPU slices not supported by this kernel (Linux 6.12+): nothing changed");
      CHECK(ThreadSliceNs() == before);
      return;
    }
    CHECK(ThreadSliceNs() == 100'000);
    uint64_t child = 0;
    std::thread([&] { child = ThreadSliceNs(); }).join();
    CHECK(child == 100'000);  // inherited: why the engine is created before a thread asks
    REQUIRE(SetThreadCpuSlice(CpuSlice::kDefault));
    CHECK(ThreadSliceNs() != 100'000);
    CHECK(ThreadSliceNs() == before);
    std::thread([&] { child = ThreadSliceNs(); }).join();
    CHECK(child == before);
  }).join();
}
