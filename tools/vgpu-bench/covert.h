#pragma once
// The covert group (F7): how many bits per second one tenant can send another through the
// shared engine, with the host's time coarsening off and on. A sender vGPU modulates its
// load bit by bit (busy: heavy work back to back; idle: nothing) and a receiver vGPU on the
// same vgpud times its own small work, round trip after round trip, with everything it
// observes (its fence interrupt, its remoting reply), then decodes each bit by a threshold.
// Not a native/mediated/remoting ratio: its own section in every output
// (docs/ab-methodology.md, "Covert channel").

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/base.h"
#include "tools/bench/stats.h"
#include "tools/vgpu-bench/paths.h"

namespace vg::bench {

struct CovertOptions {
  std::vector<std::string> paths;             // mediated, remoting
  std::vector<uint64_t> granularities_us;     // one vgpud each; 0: coarsening off
  // The host's scheduling policy (vgpud --sched), one vgpud per policy and granularity:
  // best-effort (work-conserving) and partitioned (time slots: the timing defence).
  std::vector<std::string> policies{"best-effort"};
  int bits = 64;                              // random payload bits per run, after the preamble
  double bit_us = 10000;                      // bit period
  // The receiver's unit of work: 0, a 4 KiB copy kernel (a round trip, latency-bound); else a
  // spin sized to about this many us (compute that shares the engine's time with the sender's).
  double probe_us = 0;
  int reps = 3;                               // runs per path and granularity, interleaved
  uint32_t seed = 1;
  uint64_t guest_ram = 32ull << 20;
  // The sender's busy symbol: "load", spins of a quarter of a bit, cut into pieces, back to
  // back; "overrun", one spin of a single workgroup (a piece nothing can cut) of 0.4 of a
  // bit: longer than a time slot, it runs past the sender's slot into the receiver's.
  std::string sender = "load";
  double overrun_us = 0;  // the overrun sender's piece; 0: 0.4 of a bit
  bool progress = true;
};

// Two vGPUs of one vgpud started with --time-granularity-us `granularity_us` and --sched
// `policy`: guest 0 sends, guest 1 receives. `keep` holds the daemon for as long as the host
// is in use.
struct CovertHost {
  PathConfig sender, receiver;
  std::shared_ptr<void> keep;
};
using CovertHostFactory = std::function<Result<CovertHost>(uint64_t granularity_us, const std::string& policy)>;

// Sent before the payload, known to the receiver: it tells which way the sender's load moves
// the receiver's timing (the decoder's polarity). Both symbols, four times each.
inline constexpr std::string_view kCovertPreamble = "10110100";

struct CovertRun {
  std::string path;
  uint64_t granularity_us = 0;
  std::string policy;
  int rep = 0;
  int bits = 0;              // sent, preamble included
  int payload_bits = 0;
  int errors = 0;            // among the payload bits (the median decoder)
  int errors_longest = 0;    // the same, the longest-round-trip decoder
  int errors_early = 0;      // the same, the longest round trip of the bit's first 30 ms
  bool inverted = false;     // the preamble said: a busy sender makes the receiver faster
  double bit_us = 0;
  double raw_bps = 0;        // bits sent per second: 1 / bit period
  double ber = 0;            // bit errors / payload bits (the median decoder)
  double ber_longest = 0;    // the longest-round-trip decoder's
  double ber_early = 0;      // the first-30-ms decoder's
  // (1 - H(min(ber, 0.5))) * raw_bps with the best decoder's BER: what the channel carries
  // after coding
  double capacity_bps = 0;
  // The receiver's metric (median round trip of its work in a bit's window, us): its median
  // over the bits the sender idled and over those it was busy, and the decision threshold.
  double idle_metric_us = 0, busy_metric_us = 0, threshold_us = 0;
  Stats receiver_rtt_us;     // every round trip the receiver timed (its latency, coarsened or not)
  // The sender's busy work: spins submitted, the spin's iterations (sized to about a quarter
  // of a bit), and the p50 time of one as the sender saw it.
  uint64_t sender_submissions = 0;
  uint64_t sender_iterations = 0;
  double sender_chunk_us = 0;
  std::string error;         // empty: the run completed
};

// One path at one granularity and policy over its repetitions: the errors pooled over every payload bit
// sent (the BER and capacity the summary reads), and the per-repetition capacity's spread.
struct CovertCell {
  std::string path;
  uint64_t granularity_us = 0;
  std::string policy;
  int runs = 0;  // repetitions that completed
  int payload_bits = 0, errors = 0, errors_longest = 0, errors_early = 0;
  double ber = 0, ber_longest = 0, ber_early = 0, raw_bps = 0, capacity_bps = 0;  // capacity: the best decoder's
  Ratio capacity_per_rep;                     // median [min, max] over repetitions
  double idle_metric_us = 0, busy_metric_us = 0;  // medians over repetitions
  double rtt_p50_us = 0;                      // median over repetitions of the receiver's p50
};

struct CovertReport {
  bool ran = false;
  int bits = 0;      // payload bits per run
  int preamble = 0;  // known bits before them
  double bit_us = 0;
  double probe_us = 0;
  std::string sender;  // CovertOptions::sender
  int reps = 0;
  std::vector<CovertRun> runs;    // every run, in the order they ran
  std::vector<CovertCell> cells;  // per policy, granularity and path
  bool complete() const {
    if (!ran) return true;
    for (const CovertRun& r : runs)
      if (!r.error.empty()) return false;
    return true;
  }
};

// Binary entropy, in bits.
double BinaryEntropy(double p);
// The decision threshold over the per-bit metrics: their median. The bits are random, about
// half of each symbol, so the median falls between the two symbols' metrics; unlike a
// two-cluster split it is not pulled by the machine's outliers (one bit whose metric is ten
// times the rest). Which side reads 1 is the preamble's to say.
double MedianThreshold(std::vector<double> metrics);

// Runs every policy and granularity (one host each) and every path on it.
CovertReport MeasureCovert(const CovertOptions& o, const CovertHostFactory& host);

// The sender process (vgpu-bench --covert-send PATH ...): prepares, says ready on `ready_fd`,
// reads the start instant (steady_clock ns, 8 bytes) from `go_fd`, then sends `bits`.
// `mode`, `overrun_us`: CovertOptions::sender, overrun_us.
int CovertSender(const std::string& path, const PathConfig& c, const std::string& bits, double bit_us, int ready_fd,
                 int go_fd, const std::string& mode, double overrun_us);

std::string FormatCovert(const CovertReport& r);
nlohmann::json CovertJson(const CovertReport& r);

}  // namespace vg::bench
