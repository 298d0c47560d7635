#pragma once
// The verdict on the claim "mediated pass-through beats API remoting on latency and
// efficiency", one per workload class, and the rules it follows (F12 item 5,
// docs/ab-methodology.md "Verdicts"). Every figure a verdict reads is a ratio measured once
// per repetition, side by side in that repetition, and carries its spread (min-max over the
// repetitions): a side wins a row only if every repetition says so. Pure functions over
// numbers, so the rules are tested on synthetic data (tests/bench/verdict_test.cc).

#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tools/bench/stats.h"

namespace vg::bench {

// num[r] / den[r] for every repetition both measured (the shorter length; a zero or
// negative denominator is no measurement): the median and the min-max around it.
Ratio PairedRatio(std::span<const double> num, std::span<const double> den);
// The same for a difference num[r] - den[r] (the fixed-cost target reads "over native").
Ratio PairedDifference(std::span<const double> num, std::span<const double> den);

// Which side a cost ratio mediated / remoting (below 1: mediated costs less) is on in
// every repetition. One repetition on the other side of 1 makes the row kWithinSpread: on a
// shared machine that is not a difference the run has shown.
enum class Side { kMediated, kRemoting, kWithinSpread, kNotMeasured };
Side Decide(const Ratio& cost);
const char* SideName(Side s);

// One axis (latency or CPU) of one class: how many rows each side won.
enum class Outcome { kHolds, kFails, kTie, kMixed, kNotEvaluated };
struct Tally {
  int mediated = 0, remoting = 0, within = 0;
  void Add(Side s);
  // kNotEvaluated: no row measured; kHolds: mediated won more rows than were within the
  // spread and remoting none; kFails: the reverse; kTie: every row within the spread;
  // kMixed: anything else (each side won a row, or too many rows undecided).
  Outcome outcome() const;
};
// Per axis: "HOLDS", "FAILS" (remoting costs less), "TIE", "MIXED", "NOT EVALUATED".
const char* AxisName(Outcome o);
// The claim in a class needs both axes: kHolds if both hold, kFails if either fails,
// kNotEvaluated if latency was not evaluated, else kMixed (not shown either way).
Outcome ClaimOutcome(Outcome latency, Outcome cpu);
// For the claim: "HOLDS", "DOES NOT HOLD", "NOT SHOWN", "NOT EVALUATED".
const char* ClaimName(Outcome o);

// A row of a class: one workload (or one guest count), its cost ratios mediated / remoting.
struct VerdictRow {
  std::string name;
  Ratio latency;  // p50 latency (concurrency: time per submission, the inverse of the rate)
  Ratio cpu;      // CPU per submission, host + guest side (n == 0: not measured)
  double mediated_p50_us = 0, remoting_p50_us = 0, native_p50_us = 0;  // medians, for the line
  std::string figure = "p50";  // what the three times are (concurrency: "time per submission")
};

struct ClassVerdict {
  std::string id;     // empty, small, long_work, data, churn, stream, concurrency
  std::string title;  // "fixed cost (empty)"
  std::vector<VerdictRow> rows;
  std::vector<std::string> floors;  // what the rows are read against: "eventfd round trip 11.9 us"
  std::string note;                 // rows left out and why, or why nothing was evaluated
  Tally latency, cpu;
  Outcome latency_outcome = Outcome::kNotEvaluated, cpu_outcome = Outcome::kNotEvaluated,
          claim = Outcome::kNotEvaluated;
};
// Tallies the rows and sets the three outcomes.
void Decide(ClassVerdict& v);

// "verdict <title>: claim HOLDS; latency ... ; CPU ... ; rows: ...; floors: ...". Every row
// is named with both ratios and their spreads: they are what decides.
std::string VerdictLine(const ClassVerdict& v);
// The overall line: the claim in which classes it holds, fails, is not shown, not evaluated.
std::string OverallVerdictLine(const std::vector<ClassVerdict>& vs);
nlohmann::json VerdictJson(const ClassVerdict& v);

// "0.612 [0.550-0.701]", "-" when not measured.
std::string RatioText(const Ratio& r, int decimals = 3);
nlohmann::json RatioJson(const Ratio& r);

}  // namespace vg::bench
