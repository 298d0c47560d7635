#include <doctest.h>

#include "tools/bench/stats.h"

using namespace vg::bench;

TEST_CASE("nearest-rank percentiles") {
  std::vector<double> v;
  for (int i = 1; i <= 1000; ++i) v.push_back(i);
  Stats s = Summarize(v);
  CHECK(s.n == 1000);
  CHECK(s.min == 1);
  CHECK(s.max == 1000);
  CHECK(s.p50 == 500);
  CHECK(s.p90 == 900);
  CHECK(s.p99 == 990);
  CHECK(s.p999 == 999);
  CHECK(s.mean == doctest::Approx(500.5));
  // Order of the samples does not matter.
  std::vector<double> r(v.rbegin(), v.rend());
  CHECK(Summarize(r).p99 == 990);
  // Small samples: the tail percentiles are the maximum.
  Stats three = Summarize({3, 1, 2});
  CHECK(three.p50 == 2);
  CHECK(three.p99 == 3);
  CHECK(three.p999 == 3);
  CHECK(Summarize({}).n == 0);
}

TEST_CASE("ratio spread over repetitions") {
  Ratio r = SummarizeRatio({1.10, 0.90, 1.00, 1.30, 0.95});
  CHECK(r.n == 5);
  CHECK(r.median == doctest::Approx(1.00));
  CHECK(r.min == doctest::Approx(0.90));
  CHECK(r.max == doctest::Approx(1.30));
  CHECK(SummarizeRatio({}).n == 0);
  // Two repetitions (--smoke): the median is between them, not the lower one.
  Ratio two = SummarizeRatio({1.4, 1.0});
  CHECK(two.median == doctest::Approx(1.2));
  CHECK(two.min == doctest::Approx(1.0));
  CHECK(two.max == doctest::Approx(1.4));
}
