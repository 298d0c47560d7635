#include "tools/vgpu-bench/agreement.h"

#include <map>
#include <set>

#include <fmt/format.h>

namespace vg::bench {
namespace {

using nlohmann::json;

bool Number(const json& j, const char* k) { return j.is_object() && j.contains(k) && j[k].is_number(); }

std::string Spread(const json& f) {
  return fmt::format("{:.3f} [{:.3f}-{:.3f}] n={}", f["median"].get<double>(), f["min"].get<double>(),
                     f["max"].get<double>(), f["n"].get<uint64_t>());
}

}  // namespace

std::vector<std::string> CheckSummaryStructure(const json& run) {
  std::vector<std::string> out;
  if (!run.is_object() || !run.contains("summary_ratios") || !run["summary_ratios"].is_object()) {
    out.push_back("no summary_ratios object");
  } else {
    for (const auto& [key, f] : run["summary_ratios"].items()) {
      if (!Number(f, "median") || !Number(f, "min") || !Number(f, "max") || !Number(f, "n")) {
        out.push_back(fmt::format("{}: not a figure with median, min, max and n", key));
        continue;
      }
      // A spread that does not contain its median was not computed from the repetitions.
      const double lo = f["min"].get<double>(), mid = f["median"].get<double>(), hi = f["max"].get<double>();
      if (f["n"].get<uint64_t>() > 0 && !(lo <= mid && mid <= hi))
        out.push_back(fmt::format("{}: median {} outside its spread [{}, {}]", key, mid, lo, hi));
    }
  }
  if (!run.is_object() || !run.contains("verdicts") || !run["verdicts"].is_array()) {
    out.push_back("no verdicts array");
  } else {
    for (const auto& v : run["verdicts"])
      if (!v.is_object() || !v.contains("class") || !v.contains("claim") || !v.contains("latency") ||
          !v.contains("cpu"))
        out.push_back(fmt::format("a verdict without class, claim, latency or cpu: {}", v.dump()));
  }
  return out;
}

AgreementReport CompareRuns(const json& earlier, const json& later) {
  AgreementReport a;
  for (const std::string& p : CheckSummaryStructure(earlier)) a.structural.push_back("earlier run: " + p);
  for (const std::string& p : CheckSummaryStructure(later)) a.structural.push_back("later run: " + p);
  if (!a.structural.empty()) return a;
  const json& fa = earlier["summary_ratios"];
  const json& fb = later["summary_ratios"];
  for (const auto& [key, f] : fa.items())
    if (!fb.contains(key)) a.structural.push_back(fmt::format("{}: in the earlier run only", key));
  for (const auto& [key, f] : fb.items()) {
    if (!fa.contains(key)) {
      a.structural.push_back(fmt::format("{}: in the later run only", key));
      continue;
    }
    ++a.keys;
    const json& e = fa[key];
    const bool me = e["n"].get<uint64_t>() > 0, ml = f["n"].get<uint64_t>() > 0;
    if (me != ml) {
      a.measured_in_one.push_back(fmt::format("{}: measured in the {} run only", key, me ? "earlier" : "later"));
      continue;
    }
    if (!me) continue;
    ++a.compared;
    // The medians differ by more than the spreads the runs state: the intervals are apart.
    if (e["max"].get<double>() < f["min"].get<double>() || f["max"].get<double>() < e["min"].get<double>())
      a.disagree.push_back(fmt::format("{}: {} vs {}", key, Spread(e), Spread(f)));
  }
  std::map<std::string, json> va, vb;
  for (const auto& v : earlier["verdicts"]) va[v["class"].get<std::string>()] = v;
  for (const auto& v : later["verdicts"]) vb[v["class"].get<std::string>()] = v;
  for (const auto& [c, v] : va)
    if (!vb.count(c)) a.structural.push_back(fmt::format("verdict {}: in the earlier run only", c));
  for (const auto& [c, v] : vb) {
    if (!va.count(c)) {
      a.structural.push_back(fmt::format("verdict {}: in the later run only", c));
      continue;
    }
    const json& e = va[c];
    for (const char* k : {"claim", "latency", "cpu"})
      if (e[k] != v[k])
        a.verdict_changes.push_back(fmt::format("verdict {} {}: {} vs {}", c, k, e[k].get<std::string>(),
                                                v[k].get<std::string>()));
  }
  return a;
}

std::string FormatAgreement(const AgreementReport& a) {
  std::string out = fmt::format("\n== agreement with {}\n", a.earlier.empty() ? "the earlier run" : a.earlier);
  out += fmt::format("structure: {}; {} summary figures in both, {} measured in both, {} of them apart by more than "
                     "their spreads; {} verdict outcomes changed\n",
                     a.structure_ok() ? "SAME" : "DIFFERS", a.keys, a.compared, a.disagree.size(),
                     a.verdict_changes.size());
  for (const auto& s : a.structural) out += "STRUCTURE DIFFERS: " + s + "\n";
  for (const auto& s : a.disagree) out += "DISAGREE: " + s + "\n";
  for (const auto& s : a.measured_in_one) out += "MEASURED IN ONE RUN: " + s + "\n";
  for (const auto& s : a.verdict_changes) out += "VERDICT CHANGED: " + s + "\n";
  return out;
}

json AgreementJson(const AgreementReport& a) {
  return {{"earlier", a.earlier},
          {"structure_ok", a.structure_ok()},
          {"structural", a.structural},
          {"keys", a.keys},
          {"compared", a.compared},
          {"disagree", a.disagree},
          {"measured_in_one", a.measured_in_one},
          {"verdict_changes", a.verdict_changes}};
}

}  // namespace vg::bench
