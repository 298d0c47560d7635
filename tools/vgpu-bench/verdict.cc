#include "tools/vgpu-bench/verdict.h"

#include <algorithm>

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace vg::bench {

Ratio PairedRatio(std::span<const double> num, std::span<const double> den) {
  std::vector<double> per_rep;
  for (size_t r = 0; r < std::min(num.size(), den.size()); ++r)
    if (den[r] > 0 && num[r] >= 0) per_rep.push_back(num[r] / den[r]);
  return SummarizeRatio(std::move(per_rep));
}

Ratio PairedDifference(std::span<const double> num, std::span<const double> den) {
  std::vector<double> per_rep;
  for (size_t r = 0; r < std::min(num.size(), den.size()); ++r) per_rep.push_back(num[r] - den[r]);
  return SummarizeRatio(std::move(per_rep));
}

Side Decide(const Ratio& cost) {
  if (cost.n == 0) return Side::kNotMeasured;
  if (cost.max < 1) return Side::kMediated;
  if (cost.min > 1) return Side::kRemoting;
  return Side::kWithinSpread;
}

const char* SideName(Side s) {
  switch (s) {
    case Side::kMediated: return "mediated";
    case Side::kRemoting: return "remoting";
    case Side::kWithinSpread: return "within spread";
    case Side::kNotMeasured: return "not measured";
  }
  return "?";
}

void Tally::Add(Side s) {
  if (s == Side::kMediated) ++mediated;
  if (s == Side::kRemoting) ++remoting;
  if (s == Side::kWithinSpread) ++within;
}

Outcome Tally::outcome() const {
  if (mediated + remoting + within == 0) return Outcome::kNotEvaluated;
  if (remoting == 0 && mediated > within) return Outcome::kHolds;
  if (mediated == 0 && remoting > within) return Outcome::kFails;
  if (mediated == 0 && remoting == 0) return Outcome::kTie;
  return Outcome::kMixed;
}

const char* AxisName(Outcome o) {
  switch (o) {
    case Outcome::kHolds: return "HOLDS";
    case Outcome::kFails: return "FAILS";
    case Outcome::kTie: return "TIE";
    case Outcome::kMixed: return "MIXED";
    case Outcome::kNotEvaluated: return "NOT EVALUATED";
  }
  return "?";
}

Outcome ClaimOutcome(Outcome latency, Outcome cpu) {
  if (latency == Outcome::kNotEvaluated) return Outcome::kNotEvaluated;
  if (latency == Outcome::kFails || cpu == Outcome::kFails) return Outcome::kFails;
  if (latency == Outcome::kHolds && cpu == Outcome::kHolds) return Outcome::kHolds;
  return Outcome::kMixed;
}

const char* ClaimName(Outcome o) {
  switch (o) {
    case Outcome::kHolds: return "HOLDS";
    case Outcome::kFails: return "DOES NOT HOLD";
    case Outcome::kTie:
    case Outcome::kMixed: return "NOT SHOWN";
    case Outcome::kNotEvaluated: return "NOT EVALUATED";
  }
  return "?";
}

void Decide(ClassVerdict& v) {
  v.latency = {};
  v.cpu = {};
  for (const VerdictRow& r : v.rows) {
    v.latency.Add(Decide(r.latency));
    v.cpu.Add(Decide(r.cpu));
  }
  v.latency_outcome = v.latency.outcome();
  v.cpu_outcome = v.cpu.outcome();
  v.claim = ClaimOutcome(v.latency_outcome, v.cpu_outcome);
}

std::string RatioText(const Ratio& r, int decimals) {
  if (r.n == 0) return "-";
  return fmt::format("{:.{}f} [{:.{}f}-{:.{}f}]", r.median, decimals, r.min, decimals, r.max, decimals);
}

nlohmann::json RatioJson(const Ratio& r) {
  return {{"median", r.median}, {"min", r.min}, {"max", r.max}, {"n", r.n}};
}

namespace {
std::string TallyText(const Tally& t) {
  return fmt::format("mediated {}, remoting {}, within spread {}", t.mediated, t.remoting, t.within);
}
}  // namespace

std::string VerdictLine(const ClassVerdict& v) {
  std::string out = fmt::format("verdict {}: claim {}", v.title, ClaimName(v.claim));
  if (v.claim == Outcome::kNotEvaluated && v.rows.empty())
    return out + (v.note.empty() ? std::string() : ": " + v.note) +
           (v.floors.empty() ? std::string() : fmt::format("; floors: {}", fmt::join(v.floors, ", ")));
  out += fmt::format("; latency {} ({}), CPU {} ({}); rows, mediated/remoting latency and CPU [min-max over reps]: ",
                     AxisName(v.latency_outcome), TallyText(v.latency), AxisName(v.cpu_outcome), TallyText(v.cpu));
  std::vector<std::string> rows;
  for (const VerdictRow& r : v.rows)
    rows.push_back(fmt::format("{} ({} native {:.1f}, mediated {:.1f}, remoting {:.1f} us) lat {} cpu {}", r.name,
                               r.figure, r.native_p50_us, r.mediated_p50_us, r.remoting_p50_us, RatioText(r.latency, 2),
                               RatioText(r.cpu, 2)));
  out += fmt::format("{}", fmt::join(rows, "; "));
  if (!v.floors.empty()) out += fmt::format("; floors: {}", fmt::join(v.floors, ", "));
  if (!v.note.empty()) out += "; " + v.note;
  return out;
}

std::string OverallVerdictLine(const std::vector<ClassVerdict>& vs) {
  std::vector<std::string> holds, fails, unshown, unevaluated;
  for (const ClassVerdict& v : vs) {
    if (v.claim == Outcome::kHolds) holds.push_back(v.id);
    if (v.claim == Outcome::kFails) fails.push_back(v.id);
    if (v.claim == Outcome::kTie || v.claim == Outcome::kMixed) unshown.push_back(v.id);
    if (v.claim == Outcome::kNotEvaluated) unevaluated.push_back(v.id);
  }
  auto list = [](const std::vector<std::string>& l) { return l.empty() ? std::string("none") : fmt::format("{}", fmt::join(l, ", ")); };
  const size_t evaluated = vs.size() - unevaluated.size();
  const char* overall = evaluated == 0                ? "is NOT EVALUATED"
                        : holds.size() == evaluated   ? "HOLDS in every class evaluated"
                        : fails.size() == evaluated   ? "DOES NOT HOLD in any class evaluated"
                                                      : "holds only in part";
  return fmt::format("the claim that mediated pass-through beats API remoting on latency and efficiency {} on this "
                     "machine: holds in {}; does not hold in {}; not shown in {}; not evaluated in {}",
                     overall, list(holds), list(fails), list(unshown), list(unevaluated));
}

nlohmann::json VerdictJson(const ClassVerdict& v) {
  nlohmann::json rows = nlohmann::json::array();
  for (const VerdictRow& r : v.rows)
    rows.push_back({{"name", r.name},
                    {"latency_mediated_over_remoting", RatioJson(r.latency)},
                    {"cpu_mediated_over_remoting", RatioJson(r.cpu)},
                    {"latency_side", SideName(Decide(r.latency))},
                    {"cpu_side", SideName(Decide(r.cpu))},
                    {"figure", r.figure},
                    {"native_p50_us", r.native_p50_us},
                    {"mediated_p50_us", r.mediated_p50_us},
                    {"remoting_p50_us", r.remoting_p50_us}});
  auto tally = [](const Tally& t) {
    return nlohmann::json{{"mediated", t.mediated}, {"remoting", t.remoting}, {"within_spread", t.within}};
  };
  return {{"class", v.id},
          {"title", v.title},
          {"claim", ClaimName(v.claim)},
          {"latency", AxisName(v.latency_outcome)},
          {"cpu", AxisName(v.cpu_outcome)},
          {"latency_rows", tally(v.latency)},
          {"cpu_rows", tally(v.cpu)},
          {"rows", rows},
          {"floors", v.floors},
          {"note", v.note}};
}

}  // namespace vg::bench
