// audit-bench: what copy-then-check costs. For command streams of several shapes it times,
// interleaved in one run, (a) a plain memcpy of the stream's bytes out of guest memory and
// (b) the mediator's shadow copy (GTT translation + DmaSpace read) plus the audit, and
// reports ns/command, GB/s of command stream and the ratio to the memcpy.

#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>

#include "abi/device.h"
#include "mediator/auditor.h"
#include "mediator/executor.h"
#include "shaders/catalogue.h"
#include "tools/bench/stats.h"
#include "vfio_user/dma.h"

using namespace vg;
using namespace vg::mediator;
namespace cmd = vg::abi::cmd;
using Clock = std::chrono::steady_clock;

namespace {

constexpr uint64_t kRam = 64ull << 20;
constexpr uint32_t kEntries = 16384;
constexpr uint64_t kRamBase = 0x1'0000'0000;

struct Shape {
  const char* name;
  std::vector<uint32_t> one;  // one command
};

std::vector<Shape> Shapes() {
  auto lo = [](uint64_t v) { return static_cast<uint32_t>(v); };
  uint64_t a = 16 * kPageSize, b = 32 * kPageSize;
  std::vector<uint32_t> dispatch = {cmd::Header(cmd::kDispatch, 18), static_cast<uint32_t>(shaders::KernelId::kCopy),
                                    4, 1, 1, 2, 1, lo(a), 0, 4096, 0, cmd::kAccessRead, lo(b), 0, 4096, 0,
                                    cmd::kAccessWrite, 1024};
  return {
      {"nop", {cmd::Header(cmd::kNop, 1)}},
      {"fill", {cmd::Header(cmd::kFill, 6), lo(a), 0, 4096, 0, 7}},
      {"copy", {cmd::Header(cmd::kCopy, 7), lo(a), 0, lo(b), 0, 4096, 0}},
      {"dispatch", dispatch},
      {"fence", {cmd::Header(cmd::kFence, 5), lo(b), 0, 1, 0}},
  };
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"audit-bench: shadow copy + audit cost against memcpy"};
  int reps = 30;
  uint32_t commands = 4096;
  app.add_option("--reps", reps)->capture_default_str();
  app.add_option("--commands", commands, "commands per stream")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  vfio_user::DmaSpace dma;
  auto ram = CreateMemFd("bench-ram", ByteSize{kRam});
  if (!ram.ok() || !dma.Map({Gpa{kRamBase}, ByteSize{kRam}, 0, vfio_user::kDmaRead | vfio_user::kDmaWrite},
                            std::move(ram).value())
                        .ok())
    return 1;
  Gtt gtt(kEntries, 1 << 20);
  auto any = [](Gpa, bool) { return Ok(); };
  for (uint32_t i = 0; i < kEntries; ++i)
    (void)gtt.Write(i, (kRamBase + uint64_t{i} * kPageSize) | abi::kGttValid | abi::kGttWritable, any);
  auto pin = dma.PinRange(Gpa{kRamBase}, ByteSize{kRam}, vfio_user::kDmaRead);
  if (!pin.ok()) return 1;
  GuestView view(dma, {});

  std::vector<bench::Row> rows;
  std::printf("%-10s %8s %12s %12s %12s %12s %8s\n", "stream", "cmds", "memcpy ns/c", "audit ns/c", "memcpy GB/s",
              "audit GB/s", "ratio");
  for (const Shape& shape : Shapes()) {
    std::vector<uint32_t> stream;
    while (stream.size() / shape.one.size() < commands) stream.insert(stream.end(), shape.one.begin(), shape.one.end());
    size_t bytes = stream.size() * 4;
    std::memcpy(pin->bytes().data(), stream.data(), bytes);  // the ring, at GPU VA 0
    std::vector<uint32_t> shadow(stream.size());
    std::vector<double> copy_ns, audit_ns;
    for (int r = 0; r < reps; ++r) {
      auto t0 = Clock::now();
      std::memcpy(shadow.data(), pin->bytes().data(), bytes);
      auto t1 = Clock::now();
      auto spans = gtt.Translate(GpuVa{0}, ByteSize{bytes}, GttAccess::kRead);
      Result<> copied = spans.ok() ? view.Read(ResolvedRange{GpuVa{0}, ByteSize{bytes}, false, *spans},
                                               std::as_writable_bytes(std::span(shadow)))
                                   : Result<>(spans.error());
      Auditor auditor(gtt, [](const ResolvedRange&) -> Result<std::vector<uint32_t>> {
        return MakeError(Errc::kUnsupported, "no batches here");
      });
      auto plan = auditor.Audit(shadow, 0, 0, nullptr);
      auto t2 = Clock::now();
      if (!copied.ok() || !plan.ok()) {
        std::fprintf(stderr, "audit-bench: %s refused: %s\n", shape.name,
                     (!copied.ok() ? copied.error() : plan.error()).ToString().c_str());
        return 1;
      }
      copy_ns.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count());
      audit_ns.push_back(std::chrono::duration<double, std::nano>(t2 - t1).count());
    }
    auto c = bench::Summarize(copy_ns), a = bench::Summarize(audit_ns);
    std::printf("%-10s %8u %12.1f %12.1f %12.2f %12.2f %8.1f\n", shape.name, commands, c.p50 / commands,
                a.p50 / commands, bytes / c.p50, bytes / a.p50, a.p50 / c.p50);
  }
  std::printf("(p50 over %d interleaved repetitions; 'audit' = GTT translation + shadow copy + audit)\n", reps);
  return 0;
}
