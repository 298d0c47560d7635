// libFuzzer target for the command auditor: random command streams over a random GTT.
// Input: 8 bytes per GTT entry for the first 16 entries, then the command stream (whose
// bytes also serve as the memory batches are read from). Invariants checked on success:
// every resolved range covers exactly its size, writes land only on writable pages, and
// no span leaves the aperture.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "abi/device.h"
#include "mediator/auditor.h"

using namespace vg;
using namespace vg::mediator;

namespace {
constexpr uint32_t kEntries = 32;
constexpr uint64_t kAperture = 64 * 1024;

void CheckRange(const ResolvedRange& r) {
  uint64_t total = 0;
  for (const GttSpan& s : r.spans) {
    total += s.size.v;
    if (r.write && !s.target.writable) __builtin_trap();
    if (s.target.aperture && (s.target.page_addr >= kAperture || s.size.v > kAperture - s.target.page_addr))
      __builtin_trap();
  }
  if (total != r.size.v) __builtin_trap();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Gtt gtt(kEntries, kAperture);
  size_t at = 0;
  // Entries into "guest memory" are accepted when their page is below 1 MiB.
  auto check = [](Gpa page, bool) -> Result<> {
    VG_ERROR_IF(page.v >= (1u << 20), Errc::kNotMapped, "not guest memory");
    return Ok();
  };
  for (uint32_t i = 0; i < 16 && at + 8 <= size; ++i, at += 8) {
    uint64_t e;
    std::memcpy(&e, data + at, 8);
    (void)gtt.Write(i, e, check);
  }
  std::vector<uint32_t> stream((size - at) / 4);
  if (!stream.empty()) std::memcpy(stream.data(), data + at, stream.size() * 4);
  Auditor auditor(gtt, [&](const ResolvedRange& r) -> Result<std::vector<uint32_t>> {
    std::vector<uint32_t> out(r.size.v / 4);
    // Batches read back from the stream itself, offset by the VA: deterministic per input.
    for (size_t i = 0; i < out.size() && !stream.empty(); ++i) out[i] = stream[(r.va.v / 4 + i) % stream.size()];
    return out;
  }, check);
  AuditFault fault;
  auto plan = auditor.Audit(stream, 0, 4096, &fault);
  if (!plan.ok()) return 0;
  for (const PlanOp& op : plan->ops) {
    if (auto* d = std::get_if<PlanDispatch>(&op))
      for (const auto& b : d->bindings) CheckRange(b);
    if (auto* c = std::get_if<PlanCopy>(&op)) {
      CheckRange(c->src);
      CheckRange(c->dst);
    }
    if (auto* f = std::get_if<PlanFill>(&op)) CheckRange(f->dst);
    if (auto* f = std::get_if<PlanFence>(&op)) CheckRange(f->target);
    if (auto* t = std::get_if<PlanTimestamp>(&op)) CheckRange(t->target);
  }
  // GTT_UPDATE records the audit passed are ones the store accepts, all of them.
  uint32_t bad = 0;
  if (!plan->gtt_updates.empty() && !gtt.WriteBatch(plan->gtt_updates, check, &bad).ok()) __builtin_trap();
  return 0;
}
