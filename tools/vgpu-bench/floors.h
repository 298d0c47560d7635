#pragma once
// The machine's floors, measured in the same run as the paths so each path's overhead can
// be read against the physical limit: a cross-process eventfd round trip, a shared-memory
// polling round trip, and memcpy bandwidth.

#include "base/base.h"
#include "tools/bench/stats.h"

namespace vg::bench {

struct Floors {
  Stats eventfd_rtt_us;
  Stats shm_poll_rtt_us;
  double memcpy_gbps = 0;
};

Result<Floors> MeasureFloors(int iters, uint64_t memcpy_bytes);

}  // namespace vg::bench
