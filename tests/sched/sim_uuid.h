#pragma once
// The simulated vGPUs of the scheduler's unit tests (scheduler_test.cc, partition_test.cc):
// U(i), UUIDs that sort as i does (the partitioned frame is in UUID order).
#include <fmt/format.h>

#include "base/base.h"

namespace vg::daemon {
inline Uuid U(int i) { return *Uuid::Parse(fmt::format("00000000-0000-0000-0000-{:012d}", i)); }
}  // namespace vg::daemon
