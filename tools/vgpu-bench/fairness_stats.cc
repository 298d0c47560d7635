// The fairness group's figures from completion times: numbers only, no engine or daemon,
// so tests/bench/fairness_test.cc checks them on synthetic data.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "tools/vgpu-bench/fairness.h"

namespace vg::bench {

double JainIndex(std::span<const double> x) {
  double sum = 0, sq = 0;
  for (double v : x) {
    sum += v;
    sq += v * v;
  }
  if (x.empty() || sq <= 0) return 0;
  return sum * sum / (static_cast<double>(x.size()) * sq);
}

ShareFigures AnalyzeShares(const std::vector<std::vector<double>>& done_s, const std::vector<double>& weights,
                           double begin_s, double end_s, double window_s, double tolerance_pct) {
  ShareFigures f;
  const size_t n = std::min(done_s.size(), weights.size());
  if (n == 0 || window_s <= 0 || end_s <= begin_s) return f;
  const double total_weight = std::accumulate(weights.begin(), weights.begin() + static_cast<ptrdiff_t>(n), 0.0);
  if (total_weight <= 0 || std::any_of(weights.begin(), weights.begin() + static_cast<ptrdiff_t>(n),
                                       [](double w) { return w <= 0; }))
    return f;
  f.entitled.resize(n);
  for (size_t i = 0; i < n; ++i) f.entitled[i] = weights[i] / total_weight;
  // A whole number of windows: a partial last one would be judged on less time than the rest.
  f.windows = static_cast<uint32_t>(std::floor((end_s - begin_s) / window_s + 1e-9));
  std::vector<std::vector<uint32_t>>& per = f.per_window;
  per.assign(f.windows, std::vector<uint32_t>(n, 0));
  f.completions.assign(n, 0);
  for (size_t i = 0; i < n; ++i)
    for (double t : done_s[i]) {
      if (t < begin_s || t >= end_s) continue;
      ++f.completions[i];
      const auto w = static_cast<size_t>((t - begin_s) / window_s);
      if (w < f.windows) ++per[w][i];
    }
  const double all = static_cast<double>(std::accumulate(f.completions.begin(), f.completions.end(), uint64_t{0}));
  f.share.assign(n, 0);
  if (all > 0)
    for (size_t i = 0; i < n; ++i) f.share[i] = static_cast<double>(f.completions[i]) / all;

  double sum_pp = 0, sum_rel = 0;
  uint64_t samples = 0;
  uint32_t judged = 0, ok_pp = 0, ok_rel = 0;
  std::vector<uint32_t> totals;
  for (const auto& w : per) {
    const uint64_t total = std::accumulate(w.begin(), w.end(), uint64_t{0});
    totals.push_back(static_cast<uint32_t>(total));
    if (total == 0) {
      ++f.empty_windows;
      continue;
    }
    ++judged;
    bool in_pp = true, in_rel = true;
    for (size_t i = 0; i < n; ++i) {
      const double share = static_cast<double>(w[i]) / static_cast<double>(total);
      const double pp = std::abs(share - f.entitled[i]) * 100;
      const double rel = pp / f.entitled[i];
      sum_pp += pp;
      sum_rel += rel;
      ++samples;
      f.max_abs_pp = std::max(f.max_abs_pp, pp);
      f.max_abs_rel_pct = std::max(f.max_abs_rel_pct, rel);
      in_pp &= pp <= tolerance_pct;
      in_rel &= rel <= tolerance_pct;
    }
    ok_pp += in_pp;
    ok_rel += in_rel;
  }
  if (samples) {
    f.mean_abs_pp = sum_pp / static_cast<double>(samples);
    f.mean_abs_rel_pct = sum_rel / static_cast<double>(samples);
  }
  if (!totals.empty()) {
    std::sort(totals.begin(), totals.end());
    f.min_window_total = totals.front();
    f.median_window_total = totals[totals.size() / 2];
  }
  if (judged) {
    f.within_pp = static_cast<double>(ok_pp) / judged;
    f.within_rel = static_cast<double>(ok_rel) / judged;
  }
  std::vector<double> normalized(n);
  for (size_t i = 0; i < n; ++i) normalized[i] = static_cast<double>(f.completions[i]) / weights[i];
  f.jain = JainIndex(normalized);
  return f;
}

}  // namespace vg::bench
