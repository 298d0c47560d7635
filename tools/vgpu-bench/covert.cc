#include "tools/vgpu-bench/covert.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <thread>

#include "shaders/samples.h"

namespace vg::bench {

namespace {

using Clock = std::chrono::steady_clock;

// steady_clock is CLOCK_MONOTONIC: one time base for the sender and receiver processes.
uint64_t NowNs() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count());
}
void SleepUntilNs(uint64_t t) {
  std::this_thread::sleep_until(Clock::time_point{std::chrono::nanoseconds(t)});
}

Result<std::unique_ptr<Path>> MakeCovertPath(const std::string& path, const PathConfig& c) {
  if (path == "mediated") return MakeMediatedPath(c);
  if (path == "remoting") return MakeRemotingPath(c);
  return MakeError(Errc::kInvalidArgument, "covert: no path '{}' (mediated, remoting)", path);
}

// `elements`: 4096, sixteen workgroups the executor may cut into pieces; 256, one workgroup,
// a piece that cannot be cut.
Workload SpinWork(uint32_t iterations, uint32_t elements = 4096) {
  Workload w{"covert", fmt::format("spin {}x{}", elements, iterations), Kind::kKernel};
  w.sample = shaders::MakeSample(shaders::KernelId::kSpin, elements, 1);
  shaders::SpinPush p{elements, iterations, 1};
  w.sample.push.assign(shaders::PushBytes(p).begin(), shaders::PushBytes(p).end());
  return w;
}

// What the sender reports after its run, on the ready pipe (one write, atomic).
struct SenderRecord {
  uint64_t submissions;
  uint64_t iterations;
  double chunk_p50_us;
};

Workload ProbeWork() {
  Workload w{"covert", "copy 4 KiB", Kind::kKernel};
  w.sample = shaders::MakeSample(shaders::KernelId::kCopy, 1024, 3);
  return w;
}

// The sender's unit of busy work: a spin of about a quarter of a bit period (timed on its own
// vGPU before the run), so a busy bit is a few submissions back to back and the last one
// overruns its bit by little.
// `elements` 256 (the overrun sender's one workgroup): sized by its time alone, best of
// twelve, an upper bound on the time per iteration (it includes the fixed cost), so the piece
// is no longer than asked; the difference of two sizes, as for the load sender, is thrown off
// when one size's best run still waited for a time slot and the other's did not.
Result<uint32_t> SizeChunk(Path& p, double chunk_us, Workload& w, uint32_t elements = 4096) {
  const bool one_group = elements <= 256;
  auto time_of = [&](uint32_t iters) -> Result<double> {
    w = SpinWork(iters, elements);
    VG_TRY(p.Prepare(w));
    double best = 1e30;
    for (int i = 0; i < (one_group ? 12 : 3); ++i) {
      // (One group: a pause of a varying length first, so that some run starts as the
      // engine is free for it, whatever the host's time slots.)
      if (one_group) std::this_thread::sleep_for(std::chrono::microseconds(700 + 900 * i));
      auto t0 = Clock::now();
      VG_TRY(p.RunOnce());
      best = std::min(best, std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    }
    return best;
  };
  constexpr uint32_t kLo = 2000, kHi = 20000;
  if (one_group) {
    VG_TRY_ASSIGN(double hi, time_of(kHi));
    return static_cast<uint32_t>(std::clamp(chunk_us / (hi / kHi), 16.0, double(1u << 20)));
  }
  VG_TRY_ASSIGN(double lo, time_of(kLo));
  VG_TRY_ASSIGN(double hi, time_of(kHi));
  const double per_iter = (hi - lo) / (kHi - kLo);
  if (per_iter <= 0) return kHi;
  return static_cast<uint32_t>(std::clamp(chunk_us / per_iter, 16.0, double(1u << 20)));
}

}  // namespace

double BinaryEntropy(double p) {
  if (p <= 0 || p >= 1) return 0;
  return -p * std::log2(p) - (1 - p) * std::log2(1 - p);
}

namespace {
// The three decoders' BERs over the payload bits, and the capacity from the best of them (an
// attacker uses whichever works; worse than chance after the preamble chose the polarity is
// noise, which carries nothing): one rule for a run (CovertRun) and for a cell of pooled runs
// (CovertCell).
template <typename Figures>
void SetBerAndCapacity(Figures& x) {
  auto ber = [&](int errors) { return x.payload_bits > 0 ? static_cast<double>(errors) / x.payload_bits : 0.0; };
  x.ber = ber(x.errors);
  x.ber_longest = ber(x.errors_longest);
  x.ber_early = ber(x.errors_early);
  x.capacity_bps = (1 - BinaryEntropy(std::min({x.ber, x.ber_longest, x.ber_early, 0.5}))) * x.raw_bps;
}
}  // namespace

double MedianThreshold(std::vector<double> metrics) {
  if (metrics.empty()) return 0;
  std::sort(metrics.begin(), metrics.end());
  const size_t n = metrics.size();
  return n % 2 ? metrics[n / 2] : (metrics[n / 2 - 1] + metrics[n / 2]) / 2;
}

int CovertSender(const std::string& path, const PathConfig& c, const std::string& bits, double bit_us, int ready_fd,
                 int go_fd, const std::string& mode, double overrun_us) {
  const bool overrun = mode == "overrun";
  auto p = MakeCovertPath(path, c);
  for (int i = 0; i < 100 && !p.ok(); ++i) {  // the vGPU's last client may still be leaving
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    p = MakeCovertPath(path, c);
  }
  if (!p.ok()) {
    std::fprintf(stderr, "vgpu-bench covert sender: %s\n", p.error().ToString().c_str());
    return 3;
  }
  Workload w;
  // load: spins of a quarter of a bit, cut into pieces, back to back. overrun: one spin of a
  // single workgroup (a piece nothing can cut) of 0.4 of a bit, longer than a time slot.
  const uint32_t elements = overrun ? 256 : 4096;
  auto iters = SizeChunk(**p, overrun ? (overrun_us > 0 ? overrun_us : bit_us * 0.4) : bit_us / 4, w, elements);
  if (!iters.ok()) {
    std::fprintf(stderr, "vgpu-bench covert sender: %s\n", iters.error().ToString().c_str());
    return 4;
  }
  w = SpinWork(*iters, elements);
  if (!(*p)->Prepare(w).ok() || !(*p)->RunOnce().ok()) return 4;
  char b = 'r';
  uint64_t t0 = 0;
  if (::write(ready_fd, &b, 1) != 1 || ::read(go_fd, &t0, sizeof t0) != static_cast<ssize_t>(sizeof t0)) return 5;
  const uint64_t period = static_cast<uint64_t>(bit_us * 1000);
  double chunk_ns = 0;  // the last busy submission's time: stop before one would overrun the bit
  std::vector<double> chunks_us;
  for (size_t i = 0; i < bits.size(); ++i) {
    const uint64_t end = t0 + (i + 1) * period;
    SleepUntilNs(t0 + i * period);
    if (bits[i] != '1') continue;
    if (overrun) {  // one long piece at the bit's start
      const uint64_t st = NowNs();
      if (!(*p)->RunOnce().ok()) return 6;
      chunks_us.push_back(static_cast<double>(NowNs() - st) / 1000);
      continue;
    }
    while (NowNs() + static_cast<uint64_t>(chunk_ns / 2) < end) {
      const uint64_t s = NowNs();
      if (!(*p)->RunOnce().ok()) return 6;
      chunk_ns = static_cast<double>(NowNs() - s);
      chunks_us.push_back(chunk_ns / 1000);
    }
  }
  SleepUntilNs(t0 + bits.size() * period);
  const SenderRecord rec{chunks_us.size(), *iters, Summarize(chunks_us).p50};
  if (::write(ready_fd, &rec, sizeof rec) != static_cast<ssize_t>(sizeof rec)) return 7;
  auto out = (*p)->ReadBack();
  return out.ok() && shaders::CheckSample(w.sample, *out).ok() ? 0 : 1;
}

namespace {

// One run: a sender process on guest 0, this process the receiver on guest 1.
CovertRun RunOne(const CovertOptions& o, const std::string& path, uint64_t g_us, const std::string& policy,
                 const CovertHost& host, const std::string& bits) {
  CovertRun run;
  run.path = path;
  run.granularity_us = g_us;
  run.policy = policy;
  run.bits = static_cast<int>(bits.size());
  run.bit_us = o.bit_us;
  run.raw_bps = 1e6 / o.bit_us;
  auto fail = [&](std::string why) {
    run.error = std::move(why);
    return run;
  };
  auto rx = MakeCovertPath(path, host.receiver);
  if (!rx.ok()) return fail("receiver: " + rx.error().ToString());
  Workload probe = ProbeWork();
  if (o.probe_us > 0) {
    auto iters = SizeChunk(**rx, o.probe_us, probe);
    if (!iters.ok()) return fail("receiver: " + iters.error().ToString());
    probe = SpinWork(*iters);
  }
  if (auto r = (*rx)->Prepare(probe); !r.ok()) return fail("receiver: " + r.error().ToString());
  for (int i = 0; i < 5; ++i)
    if (auto r = (*rx)->RunOnce(); !r.ok()) return fail("receiver: " + r.error().ToString());

  int ready[2], go[2];
  if (::pipe(ready) != 0) return fail("pipe");
  if (::pipe(go) != 0) {
    ::close(ready[0]);
    ::close(ready[1]);
    return fail("pipe");
  }
  const pid_t pid = ::fork();
  if (pid == 0) {
    std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
    const PathConfig& c = host.sender;
    std::vector<std::string> a{self, "--covert-send", path, "--socket", c.socket, "--remote-socket", c.remote_socket,
                               "--covert-bit-string", bits, "--covert-bit-us", fmt::format("{}", o.bit_us),
                               "--ready-fd", std::to_string(ready[1]), "--go-fd", std::to_string(go[0]),
                               "--guest-ram-mib", std::to_string(o.guest_ram >> 20), "--covert-sender",
                               o.sender, "--covert-overrun-us", fmt::format("{}", o.overrun_us)};
    if (!c.gpu.empty()) a.insert(a.end(), {"--gpu", c.gpu});
    std::vector<char*> argv;
    for (auto& s : a) argv.push_back(s.data());
    argv.push_back(nullptr);
    ::execv(argv[0], argv.data());
    std::_Exit(127);
  }
  // Only the sender writes "ready": if it dies, the read sees EOF instead of hanging.
  ::close(ready[1]);
  ::close(go[0]);
  auto reap = [&](bool kill) {
    if (kill) ::kill(pid, SIGKILL);
    int st = 0;
    ::waitpid(pid, &st, 0);
    ::close(ready[0]);
    ::close(go[1]);
    return WIFEXITED(st) && WEXITSTATUS(st) == 0;
  };
  char b;
  if (::read(ready[0], &b, 1) != 1) {
    reap(true);
    return fail("the sender died before starting");
  }
  // Both start at the same instant of CLOCK_MONOTONIC, a moment from now.
  const uint64_t t0 = NowNs() + 50'000'000;
  if (::write(go[1], &t0, sizeof t0) != static_cast<ssize_t>(sizeof t0)) {
    reap(true);
    return fail("go pipe");
  }
  const uint64_t period = static_cast<uint64_t>(o.bit_us * 1000);
  const uint64_t end = t0 + bits.size() * period;
  struct Sample {
    uint64_t done_ns;
    double rtt_us;
  };
  std::vector<Sample> samples;
  samples.reserve(1 << 16);
  SleepUntilNs(t0);
  std::string rx_error;
  while (NowNs() < end) {
    const uint64_t s = NowNs();
    if (auto r = (*rx)->RunOnce(); !r.ok()) {
      rx_error = r.error().ToString();
      break;
    }
    const uint64_t e = NowNs();
    samples.push_back({e, static_cast<double>(e - s) / 1000.0});
  }
  SenderRecord rec{};
  const bool sent = ::read(ready[0], &rec, sizeof rec) == static_cast<ssize_t>(sizeof rec);
  const bool sender_ok = reap(!rx_error.empty()) && sent;
  if (!rx_error.empty()) return fail("receiver: " + rx_error);
  if (!sender_ok) return fail("the sender failed or computed a wrong result");
  run.sender_submissions = rec.submissions;
  run.sender_iterations = rec.iterations;
  run.sender_chunk_us = rec.chunk_p50_us;
  if (auto out = (*rx)->ReadBack(); !out.ok() || !shaders::CheckSample(probe.sample, *out).ok())
    return fail("the receiver's work differs from the CPU reference");

  // Per bit, three metrics of the receiver's work. Over what completed in the bit's window
  // after a guard of a tenth of the period (the sender's last chunk of a busy bit may run
  // over): the median round trip, so one hiccup of the machine does not decide a bit; and the
  // longest, which sees a single late grant (a sender that overruns its time slot once a bit
  // delays a few round trips, not the median). And the longest of what completed in the
  // bit's first 30 ms, no guard: where a sender that overruns once, at the bit's start, puts
  // its pulse; over a long bit the longest of the whole window is the machine's worst hiccup
  // instead. A window with no completion reads as the whole window.
  std::vector<double> metric(bits.size(), 0), longest(bits.size(), 0), early(bits.size(), 0), rtts;
  const uint64_t guard = period / 10, early_span = std::min<uint64_t>(period, 30'000'000);
  size_t k = 0;
  for (size_t i = 0; i < bits.size(); ++i) {
    const uint64_t start = t0 + i * period, lo = start + guard, hi = t0 + (i + 1) * period;
    std::vector<double> in;
    double first = -1;
    for (; k < samples.size() && samples[k].done_ns < hi; ++k) {
      const Sample& x = samples[k];
      if (x.done_ns >= start && x.done_ns < start + early_span) first = std::max(first, x.rtt_us);
      if (x.done_ns >= lo) in.push_back(x.rtt_us);
    }
    const double whole = static_cast<double>(hi - lo) / 1000.0;
    longest[i] = in.empty() ? whole : *std::max_element(in.begin(), in.end());
    metric[i] = in.empty() ? whole : Summarize(std::move(in)).p50;
    early[i] = first < 0 ? static_cast<double>(early_span) / 1000.0 : first;
  }
  for (const Sample& s : samples) rtts.push_back(s.rtt_us);
  run.receiver_rtt_us = Summarize(rtts);
  // Each metric decoded alike: the threshold is the median of its per-bit values; the
  // polarity comes from the preamble (a busy sender may make the receiver's work faster, not
  // slower: a machine whose idle cores sleep deeper); errors count over the payload only.
  struct Decoded {
    double threshold = 0;
    bool inverted = false;
    int errors = 0;
  };
  auto decode = [&](const std::vector<double>& m) {
    Decoded d;
    d.threshold = MedianThreshold(m);
    int preamble_wrong = 0;
    for (size_t i = 0; i < kCovertPreamble.size(); ++i) preamble_wrong += (m[i] > d.threshold) != (bits[i] == '1');
    d.inverted = 2 * preamble_wrong > static_cast<int>(kCovertPreamble.size());
    for (size_t i = kCovertPreamble.size(); i < bits.size(); ++i)
      d.errors += ((m[i] > d.threshold) != d.inverted) != (bits[i] == '1');
    return d;
  };
  const Decoded by_median = decode(metric), by_longest = decode(longest), by_early = decode(early);
  run.threshold_us = by_median.threshold;
  run.inverted = by_median.inverted;
  run.errors = by_median.errors;
  run.errors_longest = by_longest.errors;
  run.errors_early = by_early.errors;
  std::vector<double> idle, busy;
  for (size_t i = 0; i < bits.size(); ++i) (bits[i] == '1' ? busy : idle).push_back(metric[i]);
  run.idle_metric_us = idle.empty() ? 0 : Summarize(idle).p50;
  run.busy_metric_us = busy.empty() ? 0 : Summarize(busy).p50;
  run.payload_bits = run.bits - static_cast<int>(kCovertPreamble.size());
  SetBerAndCapacity(run);
  return run;
}

}  // namespace

CovertReport MeasureCovert(const CovertOptions& o, const CovertHostFactory& make_host) {
  CovertReport r;
  r.ran = true;
  r.bits = o.bits;
  r.preamble = static_cast<int>(kCovertPreamble.size());
  r.bit_us = o.bit_us;
  std::mt19937 rng(o.seed);
  std::string bits(kCovertPreamble);
  for (int i = 0; i < o.bits; ++i) bits.push_back(rng() & 1 ? '1' : '0');
  r.probe_us = o.probe_us;
  r.sender = o.sender;
  r.reps = o.reps;
  // Every host first, then the repetitions, each running every (host, path) in an order that
  // rotates from one to the next: drift of the shared machine falls on all of them alike.
  struct Host {
    uint64_t g;
    std::string policy;
    Result<CovertHost> host;
  };
  std::vector<Host> hosts;
  for (const std::string& pol : o.policies)
    for (uint64_t g : o.granularities_us) hosts.push_back(Host{g, pol, make_host(g, pol)});
  std::vector<std::pair<size_t, std::string>> order;
  for (size_t h = 0; h < hosts.size(); ++h)
    for (const std::string& p : o.paths) order.emplace_back(h, p);
  for (int rep = 0; rep < o.reps && !order.empty(); ++rep) {
    std::rotate(order.begin(), order.begin() + (rep % order.size()), order.end());
    for (const auto& [h, p] : order) {
      const Host& host = hosts[h];
      if (o.progress)
        std::fprintf(stderr, "\rvgpu-bench: covert rep %d: %s, %s, granularity %llu us   ", rep + 1, p.c_str(),
                     host.policy.c_str(), static_cast<unsigned long long>(host.g));
      CovertRun run;
      if (!host.host.ok()) {
        run.path = p;
        run.granularity_us = host.g;
        run.policy = host.policy;
        run.error = "vgpud: " + host.host.error().ToString();
      } else {
        run = RunOne(o, p, host.g, host.policy, *host.host, bits);
      }
      run.rep = rep;
      r.runs.push_back(std::move(run));
    }
  }
  if (o.progress) std::fprintf(stderr, "\n");
  for (const Host& host : hosts)
    for (const std::string& p : o.paths) {
      const uint64_t g = host.g;
      CovertCell c;
      c.path = p;
      c.granularity_us = g;
      c.policy = host.policy;
      std::vector<double> cap, idle, busy, rtt;
      for (const CovertRun& x : r.runs) {
        if (x.path != p || x.granularity_us != g || x.policy != host.policy || !x.error.empty()) continue;
        ++c.runs;
        c.payload_bits += x.payload_bits;
        c.errors += x.errors;
        c.errors_longest += x.errors_longest;
        c.errors_early += x.errors_early;
        c.raw_bps = x.raw_bps;
        cap.push_back(x.capacity_bps);
        idle.push_back(x.idle_metric_us);
        busy.push_back(x.busy_metric_us);
        rtt.push_back(x.receiver_rtt_us.p50);
      }
      if (c.runs) {
        SetBerAndCapacity(c);
        c.capacity_per_rep = SummarizeRatio(cap);
        c.idle_metric_us = SummarizeRatio(idle).median;
        c.busy_metric_us = SummarizeRatio(busy).median;
        c.rtt_p50_us = SummarizeRatio(rtt).median;
      }
      r.cells.push_back(std::move(c));
    }
  return r;
}

std::string FormatCovert(const CovertReport& r) {
  if (!r.ran) return "";
  std::string out = fmt::format(
      "\n== covert channel: {} known + {} random bits at {:.1f} ms a bit, sender {} / idle, receiver timing its own "
      "work\n",
      r.preamble, r.bits, r.bit_us / 1000,
      r.sender == "overrun" ? "overrunning its slot (one piece nothing can cut)" : "busy (back to back)");
  out += fmt::format("receiver's work: {}; {} repetitions, interleaved\n",
                     r.probe_us > 0 ? fmt::format("a spin of about {:.0f} us", r.probe_us) : std::string("a 4 KiB copy"),
                     r.reps);
  out += fmt::format("{:<9} {:<11} {:>8} {:>5} {:>6} {:>9} {:>7} {:>7} {:>7} {:>9} {:>21} {:>10} {:>10} {:>9}\n",
                     "path", "sched", "G us", "runs", "bits", "raw b/s", "BER", "BER max", "BER 1st", "cap b/s",
                     "cap/rep [min-max]", "idle us", "busy us", "rtt p50");
  for (const CovertCell& c : r.cells)
    out += fmt::format(
        "{:<9} {:<11} {:>8} {:>5} {:>6} {:>9.1f} {:>7.3f} {:>7.3f} {:>7.3f} {:>9.1f} {:>21} {:>10.1f} {:>10.1f} {:>9.1f}\n",
        c.path, c.policy, c.granularity_us, c.runs, c.payload_bits, c.raw_bps, c.ber, c.ber_longest, c.ber_early,
        c.capacity_bps,
        fmt::format("{:.1f} [{:.1f}-{:.1f}]", c.capacity_per_rep.median, c.capacity_per_rep.min, c.capacity_per_rep.max),
        c.idle_metric_us, c.busy_metric_us, c.rtt_p50_us);
  out += "per run:\n";
  out += fmt::format(
      "{:<9} {:<11} {:>8} {:>9} {:>7} {:>7} {:>7} {:>9} {:>10} {:>10} {:>10} {:>4} {:>9} {:>7} {:>7} {:>9}\n", "path",
      "sched", "G us", "raw b/s", "BER", "BER max", "BER 1st", "cap b/s", "idle us", "busy us", "thresh us", "pol",
      "rtt p50", "rtt n", "spins", "spin us");
  for (const CovertRun& c : r.runs) {
    if (!c.error.empty()) {
      out += fmt::format("{:<9} {:<11} {:>8} COVERT RUN FAILED: {}\n", c.path, c.policy, c.granularity_us, c.error);
      continue;
    }
    out += fmt::format(
        "{:<9} {:<11} {:>8} {:>9.1f} {:>7.3f} {:>7.3f} {:>7.3f} {:>9.1f} {:>10.1f} {:>10.1f} {:>10.1f} {:>4} {:>9.1f} "
        "{:>7} {:>7} {:>9.1f}\n",
        c.path, c.policy, c.granularity_us, c.raw_bps, c.ber, c.ber_longest, c.ber_early, c.capacity_bps,
        c.idle_metric_us,
        c.busy_metric_us, c.threshold_us, c.inverted ? "inv" : "+", c.receiver_rtt_us.p50, c.receiver_rtt_us.n,
        c.sender_submissions, c.sender_chunk_us);
  }
  out += "(sched: the host's --sched (partitioned: time slots, the timing defence). G 0: coarsening off. BER: the "
         "median decoder (per bit, the receiver's median round trip), BER max: the longest-round-trip decoder, BER "
         "1st: the longest round trip of the bit's first 30 ms; each pooled over every payload bit of the "
         "repetitions; cap from the best of the three (chosen knowing the payload: an upper bound); cap/rep: each repetition's own. idle/busy: the receiver's median round trip per "
         "bit, median over the bits the sender idled / was busy. Polarity (pol: inv = a busy sender made the "
         "receiver faster) from the known bits. cap: (1 - H(min(BER, 0.5))) x raw. spins: the sender's busy "
         "submissions, spin us their p50 as it saw them)\n";
  return out;
}

nlohmann::json CovertJson(const CovertReport& r) {
  nlohmann::json j;
  j["bits"] = r.bits;
  j["preamble_bits"] = r.preamble;
  j["bit_us"] = r.bit_us;
  j["complete"] = r.complete();
  j["probe_us"] = r.probe_us;
  j["sender"] = r.sender;
  j["reps"] = r.reps;
  j["cells"] = nlohmann::json::array();
  for (const CovertCell& c : r.cells)
    j["cells"].push_back({{"path", c.path},
                          {"granularity_us", c.granularity_us},
                          {"policy", c.policy},
                          {"runs", c.runs},
                          {"payload_bits", c.payload_bits},
                          {"errors", c.errors},
                          {"ber", c.ber},
                          {"ber_longest", c.ber_longest},
                          {"errors_longest", c.errors_longest},
                          {"ber_early", c.ber_early},
                          {"errors_early", c.errors_early},
                          {"raw_bps", c.raw_bps},
                          {"capacity_bps", c.capacity_bps},
                          {"capacity_per_rep", {{"median", c.capacity_per_rep.median},
                                                {"min", c.capacity_per_rep.min},
                                                {"max", c.capacity_per_rep.max},
                                                {"n", c.capacity_per_rep.n}}},
                          {"idle_metric_us", c.idle_metric_us},
                          {"busy_metric_us", c.busy_metric_us},
                          {"receiver_rtt_p50_us", c.rtt_p50_us}});
  j["runs"] = nlohmann::json::array();
  for (const CovertRun& c : r.runs) {
    nlohmann::json x{{"path", c.path},
                     {"granularity_us", c.granularity_us},
                     {"policy", c.policy},
                     {"rep", c.rep},
                     {"bits", c.bits}};
    if (!c.error.empty()) {
      x["error"] = c.error;
    } else {
      x.update({{"errors", c.errors},
                {"payload_bits", c.payload_bits},
                {"inverted", c.inverted},
                {"raw_bps", c.raw_bps},
                {"ber", c.ber},
                {"errors_longest", c.errors_longest},
                {"ber_longest", c.ber_longest},
                {"errors_early", c.errors_early},
                {"ber_early", c.ber_early},
                {"capacity_bps", c.capacity_bps},
                {"idle_metric_us", c.idle_metric_us},
                {"busy_metric_us", c.busy_metric_us},
                {"threshold_us", c.threshold_us},
                {"receiver_rtt_us", {{"n", c.receiver_rtt_us.n}, {"p50", c.receiver_rtt_us.p50},
                                     {"p99", c.receiver_rtt_us.p99}, {"min", c.receiver_rtt_us.min}}},
                {"sender_submissions", c.sender_submissions},
                {"sender_spin_iterations", c.sender_iterations},
                {"sender_spin_p50_us", c.sender_chunk_us}});
    }
    j["runs"].push_back(std::move(x));
  }
  return j;
}

}  // namespace vg::bench
