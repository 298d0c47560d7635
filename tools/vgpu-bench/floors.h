#pragma once
// The machine's floors, measured in the same run as the paths so each path's overhead can
// be read against the physical limit: a cross-process eventfd round trip, a shared-memory
// polling round trip, and memcpy bandwidth.

#include <string>
#include <vector>

#include "base/base.h"
#include "tools/bench/stats.h"

namespace vg::bench {

struct NamedStats {
  std::string name;
  Stats us;
};

struct Floors {
  // Both round trips are between two processes pinned to two different CPUs (`placement`
  // says which; "one CPU" where only one is allowed).
  Stats eventfd_rtt_us;
  Stats shm_poll_rtt_us;
  std::string placement;
  double memcpy_gbps = 0;
  // A path's own transport floors ("<path>: <what>"), e.g. mediated-qemu's qtest hop.
  std::vector<NamedStats> path_floors;
};

Result<Floors> MeasureFloors(int iters, uint64_t memcpy_bytes);

}  // namespace vg::bench
