#pragma once
// Percentile statistics and the result table shared by every vgpu-bench mode.

#include <span>
#include <string>
#include <vector>

namespace vg::bench {

struct Stats {
  size_t n = 0;
  double min = 0, p50 = 0, p90 = 0, p99 = 0, p999 = 0, max = 0, mean = 0;
};
// Nearest-rank percentiles over the samples (any unit).
Stats Summarize(std::vector<double> samples);

// A ratio measured once per repetition (path vs native, side by side in that repetition):
// its median over repetitions (the midpoint of the middle two for an even count) and the
// spread (min, max) around it.
struct Ratio {
  double median = 0, min = 0, max = 0;
  size_t n = 0;
};
Ratio SummarizeRatio(std::vector<double> per_rep);

struct Row {
  std::string group;  // "latency", "throughput", "import"
  std::string name;
  Stats us;           // per-submission wall time, microseconds
  double rate = 0;    // throughput in `unit`, 0 when not meaningful
  std::string unit;
  std::string note;
};
std::string FormatTable(std::span<const Row> rows);

}  // namespace vg::bench
