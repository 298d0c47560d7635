// The summary's ablation lines and verdicts (docs/ab-methodology.md "Ablations", "Verdicts").
// Every figure read here is a per-repetition ratio with its spread, and is also recorded in
// report.figures under a key that depends only on the run's options (the workloads, paths
// and ablation rows), never on what was measured: two runs of the same options have the
// same keys, and the two-run agreement pairs them by it.

#include <algorithm>
#include <map>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "tools/vgpu-bench/study.h"

namespace vg::bench {

void AddFigure(StudyReport& r, std::string key, const Ratio& value, std::string unit, std::string what) {
  r.figures.push_back({std::move(key), value, std::move(unit), std::move(what)});
}

namespace {

std::string EventfdFloor(const Floors& f) { return fmt::format("eventfd round trip {:.1f} us", f.eventfd_rtt_us.p50); }
std::string ShmFloor(const Floors& f) {
  return fmt::format("shared-memory poll round trip {:.2f} us", f.shm_poll_rtt_us.p50);
}

// What each ablation's rows are read against.
std::vector<std::string> AblationFloors(const StudyReport& r, const Ablation& a) {
  if (a.name == "memory") return {fmt::format("memcpy {:.1f} GB/s", r.floors.memcpy_gbps)};
  if (a.name == "doorbell") {
    std::vector<std::string> out{EventfdFloor(r.floors)};
    for (const NamedStats& f : r.floors.path_floors)
      if (f.name.rfind("mediated-qemu: qtest writel", 0) == 0)
        out.push_back(fmt::format("the qtest hop {:.1f} us", f.us.p50));
    return out;
  }
  return {EventfdFloor(r.floors)};
}

}  // namespace

void SummarizeAblations(StudyReport& r) {
  for (const Ablation& a : r.ablations) {
    for (const std::string& n : a.not_run) r.summary.push_back(fmt::format("ablation {}: {}", a.name, n));
    if (a.rows.size() < 2) continue;
    const std::string& ref = a.reference();
    // One line per workload group, in the order the groups ran.
    std::vector<std::string> groups;
    for (const Result_& res : r.results)
      if (a.RunsOn(res.workload) &&
          std::find(groups.begin(), groups.end(), res.workload.group) == groups.end())
        groups.push_back(res.workload.group);
    for (const std::string& g : groups) {
      std::vector<std::string> parts;
      for (const Result_& res : r.results) {
        if (res.workload.group != g || !a.RunsOn(res.workload)) continue;
        const Cell* rc = FindCell(res, ref);
        std::vector<std::string> rows;
        for (const AblationRow& row : a.rows) {
          if (row.path == ref) continue;
          const Cell* c = FindCell(res, row.path);
          if (!c) continue;
          const Ratio lat = rc ? PairedLatency(*c, *rc) : Ratio{};
          const Ratio cpu = rc ? PairedCpu(*c, *rc) : Ratio{};
          const std::string key = fmt::format("ablation.{}.{}/{}.{}/{}", a.name, g, res.workload.name, row.path, ref);
          AddFigure(r, key + ".latency", lat, "ratio", fmt::format("p50 {} / p50 {}, per repetition", row.path, ref));
          AddFigure(r, key + ".cpu", cpu, "ratio",
                    fmt::format("CPU per submission {} / {}, per repetition", row.path, ref));
          rows.push_back(fmt::format("{} lat {} cpu {}", row.path, RatioText(lat, 2), RatioText(cpu, 2)));
        }
        parts.push_back(fmt::format("{} ({} {:.1f} us): {}", res.workload.name, ref, rc ? rc->us.p50 : 0.0,
                                    fmt::join(rows, ", ")));
      }
      r.summary.push_back(fmt::format("ablation {} ({}), {}: x {} per repetition [min-max]; {}; floors: {}", a.name,
                                      a.factor, g, ref, fmt::join(parts, "; "),
                                      fmt::join(AblationFloors(r, a), ", ")));
    }
  }
}

void SummarizeVerdicts(StudyReport& r, const std::vector<std::string>& paths) {
  const bool both = std::find(paths.begin(), paths.end(), "mediated") != paths.end() &&
                    std::find(paths.begin(), paths.end(), "remoting") != paths.end();
  // The figures first, for every workload both paths ran (kernel_time rows below 1 ms
  // included): the keys then do not depend on which rows a class takes.
  std::map<std::pair<std::string, std::string>, VerdictRow> rows;  // (group, case) -> row
  for (const Result_& res : r.results) {
    const Cell* m = FindCell(res, "mediated");
    const Cell* x = FindCell(res, "remoting");
    const Cell* n = FindCell(res, "native");
    if (!m || !x) continue;
    VerdictRow row{res.workload.name, PairedLatency(*m, *x), PairedCpu(*m, *x), m->us.p50, x->us.p50,
                   n ? n->us.p50 : 0};
    const std::string key = fmt::format("verdict.{}/{}", res.workload.group, res.workload.name);
    AddFigure(r, key + ".latency", row.latency, "ratio", "p50 mediated / p50 remoting, per repetition");
    AddFigure(r, key + ".cpu", row.cpu, "ratio", "CPU per submission mediated / remoting, per repetition");
    rows[{res.workload.group, res.workload.name}] = row;
  }

  const Floors& f = r.floors;
  auto from_group = [&](std::string id, std::string title, const std::string& group, std::vector<std::string> floors) {
    ClassVerdict v{std::move(id), std::move(title)};
    v.floors = std::move(floors);
    for (const Result_& res : r.results)
      if (res.workload.group == group)
        if (auto it = rows.find({group, res.workload.name}); it != rows.end()) v.rows.push_back(it->second);
    if (v.rows.empty()) v.note = fmt::format("no {} row ran on both mediated and remoting", group);
    return v;
  };
  std::vector<ClassVerdict> vs;
  vs.push_back(from_group("empty", "fixed cost (empty)", "empty", {EventfdFloor(f), ShmFloor(f)}));
  vs.push_back(from_group("small", "small work (small)", "small", {EventfdFloor(f), ShmFloor(f)}));

  // Long work: what native measured at 1 ms or more, from rows whose calibration held.
  {
    ClassVerdict v{"long_work", "long work (kernel_time, native p50 >= 1 ms)"};
    v.floors = {EventfdFloor(f)};
    std::vector<std::string> short_rows, miscalibrated;
    for (const Result_& res : r.results) {
      if (res.workload.group != "kernel_time") continue;
      auto it = rows.find({"kernel_time", res.workload.name});
      if (it == rows.end()) continue;
      const CalibratedRow* cal = r.calibration.Row(res.workload.name);
      if (cal && !cal->ok())
        miscalibrated.push_back(res.workload.name);
      else if (it->second.native_p50_us < 1000)
        short_rows.push_back(res.workload.name);
      else
        v.rows.push_back(it->second);
    }
    std::vector<std::string> notes;
    if (!short_rows.empty()) notes.push_back(fmt::format("below 1 ms on native: {}", fmt::join(short_rows, ", ")));
    if (!miscalibrated.empty())
      notes.push_back(fmt::format("left out, CALIBRATION FAILED: {}", fmt::join(miscalibrated, ", ")));
    if (v.rows.empty()) notes.insert(notes.begin(), "no kernel_time row with a native p50 of 1 ms or more");
    v.note = fmt::format("{}", fmt::join(notes, "; "));
    vs.push_back(std::move(v));
  }
  {
    uint64_t largest = 0;
    for (const Result_& res : r.results)
      if (res.workload.group == "data") largest = std::max(largest, res.workload.bytes);
    std::vector<std::string> floors{fmt::format("memcpy {:.1f} GB/s", f.memcpy_gbps)};
    if (largest && f.memcpy_gbps > 0)
      floors.push_back(fmt::format("the largest row's {} KiB of traffic copied once at that speed: {:.0f} us", largest >> 10,
                                   static_cast<double>(largest) / (f.memcpy_gbps * 1e3)));
    vs.push_back(from_group("data", "data-heavy (data)", "data", floors));
  }
  vs.push_back(from_group("churn", "object churn (churn)", "churn", {EventfdFloor(f)}));
  {
    std::vector<std::string> floors{EventfdFloor(f), ShmFloor(f)};
    for (const Result_& res : r.results) {
      if (res.workload.group != "stream") continue;
      const Cell* m = FindCell(res, "mediated");
      const Cell* x = FindCell(res, "remoting");
      if (m && x)
        floors.push_back(fmt::format("crossings per submission: mediated {}, remoting {}",
                                     RatioText(SummarizeRatio(m->rep_crossings), 2),
                                     RatioText(SummarizeRatio(x->rep_crossings), 2)));
    }
    vs.push_back(from_group("stream", "streams (stream)", "stream", floors));
  }
  // Concurrency: the aggregate rate of N guests, as time per submission (1 / rate), so a
  // ratio below 1 is mediated doing more work per second, like a latency ratio.
  {
    ClassVerdict v{"concurrency", "concurrency (guests sharing the engine; time per submission = 1 / aggregate rate)"};
    v.floors = {EventfdFloor(f)};
    std::map<uint32_t, const Concurrency*> med, rem, nat;
    for (const Concurrency& c : r.concurrency) {
      if (c.path == "mediated") med[c.guests] = &c;
      if (c.path == "remoting") rem[c.guests] = &c;
      if (c.path == "native") nat[c.guests] = &c;
    }
    for (const auto& [n, m] : med) {
      auto x = rem.find(n);
      if (x == rem.end()) continue;
      VerdictRow row;
      row.name = fmt::format("{} guests", n);
      row.figure = "time per submission";
      row.latency = PairedRatio(x->second->rep_rate, m->rep_rate);  // (1/m) / (1/x)
      row.cpu = PairedRatio(m->rep_cpu_us, x->second->rep_cpu_us);
      auto per_sub = [](const Concurrency* c) { return c && c->submissions_per_s > 0 ? 1e6 / c->submissions_per_s : 0; };
      row.mediated_p50_us = per_sub(m);
      row.remoting_p50_us = per_sub(x->second);
      row.native_p50_us = nat.count(n) ? per_sub(nat[n]) : 0;
      const std::string key = fmt::format("verdict.concurrency/{}", row.name);
      AddFigure(r, key + ".latency", row.latency, "ratio",
                "time per submission mediated / remoting (aggregate rate remoting / mediated), per repetition");
      AddFigure(r, key + ".cpu", row.cpu, "ratio", "CPU per submission mediated / remoting, per repetition");
      v.rows.push_back(row);
    }
    if (v.rows.empty()) v.note = "no concurrency run on both mediated and remoting";
    vs.push_back(std::move(v));
  }
  for (ClassVerdict& v : vs) {
    if (!both) {
      v.rows.clear();
      v.note = "needs both mediated and remoting in --paths";
    }
    Decide(v);
    r.summary.push_back(VerdictLine(v));
  }
  r.summary.push_back(OverallVerdictLine(vs));
  r.verdicts = std::move(vs);
  // Scaling: each path's aggregate rate at its most guests over its own at one (F12's target:
  // the mediated path scales at least as well as native; mediated-sched-off and
  // mediated-sched-shared are the scheduler ablation's, the same guests on a --sched off
  // vgpud and on a --sched-concurrency 2 one).
  {
    uint32_t most = 0;
    for (const Concurrency& c : r.concurrency) most = std::max(most, c.guests);
    std::vector<std::string> parts;
    for (const char* p : {"native", "mediated", "mediated-sched-off", "mediated-sched-shared", "remoting"})
      for (const Concurrency& c : r.concurrency)
        if (c.path == p && c.guests == most && most > 1 && c.speedup > 0)
          parts.push_back(fmt::format("{} {:.2f}", p, c.speedup));
    if (!parts.empty())
      r.summary.push_back(fmt::format("scaling, {} guests over 1 (aggregate rate, median over repetitions): {}", most,
                                      fmt::join(parts, ", ")));
  }
}

}  // namespace vg::bench
