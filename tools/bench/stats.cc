#include "tools/bench/stats.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include <fmt/format.h>

namespace vg::bench {

Stats Summarize(std::vector<double> s) {
  Stats r;
  r.n = s.size();
  if (s.empty()) return r;
  std::sort(s.begin(), s.end());
  auto rank = [&](double p) {
    size_t i = static_cast<size_t>(std::ceil(p * static_cast<double>(s.size())));
    return s[std::clamp<size_t>(i, 1, s.size()) - 1];
  };
  r.min = s.front();
  r.max = s.back();
  r.p50 = rank(0.50);
  r.p90 = rank(0.90);
  r.p99 = rank(0.99);
  r.p999 = rank(0.999);
  r.mean = std::accumulate(s.begin(), s.end(), 0.0) / static_cast<double>(s.size());
  return r;
}

Ratio SummarizeRatio(std::vector<double> per_rep) {
  Ratio r;
  r.n = per_rep.size();
  if (per_rep.empty()) return r;
  std::sort(per_rep.begin(), per_rep.end());
  // The true median: with an even count, the midpoint of the middle two. The nearest-rank
  // p50 would be the lower one, and with the 2 repetitions of --smoke every median would
  // equal its own minimum.
  const size_t h = per_rep.size() / 2;
  r.median = per_rep.size() % 2 ? per_rep[h] : (per_rep[h - 1] + per_rep[h]) / 2;
  r.min = per_rep.front();
  r.max = per_rep.back();
  return r;
}

std::string FormatTable(std::span<const Row> rows) {
  std::string out = fmt::format("{:<11} {:<40} {:>6} {:>10} {:>10} {:>10}  {:>12} {:<8} {}\n", "group", "case", "n",
                                "p50 us", "p99 us", "mean us", "rate", "unit", "note");
  for (const Row& r : rows) {
    out += fmt::format("{:<11} {:<40} {:>6} {:>10.1f} {:>10.1f} {:>10.1f}  {:>12} {:<8} {}\n", r.group, r.name,
                       r.us.n, r.us.p50, r.us.p99, r.us.mean,
                       r.rate > 0 ? fmt::format("{:.3g}", r.rate) : std::string("-"), r.unit, r.note);
  }
  return out;
}

}  // namespace vg::bench
