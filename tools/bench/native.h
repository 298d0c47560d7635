#pragma once
// `vgpu-bench native`: the workloads run in-process on the engine, the baseline the
// mediated and remoting paths are compared against.

#include <string>
#include <vector>

#include "base/result.h"
#include "tools/bench/stats.h"

namespace vg::bench {

struct NativeOptions {
  std::string gpu;           // EngineOptions::gpu
  int latency_iters = 200;   // samples per latency case (after warm-up)
  int large_iters = 5;       // samples per throughput case
  int import_iters = 30;     // samples per import case (interleaved rounds)
  bool quick = false;        // smaller sizes (CI smoke run)
};

Result<std::vector<Row>> RunNative(const NativeOptions& o, std::string* device_line = nullptr);

}  // namespace vg::bench
