#include "mediator/auditor.h"

#include <cstring>

#include "abi/device.h"
#include "mediator/work_split.h"
#include "shaders/catalogue.h"

namespace vg::mediator {

namespace {
enum class LengthRule : uint8_t { kFixed, kAtLeast };

struct CmdSpec {
  uint32_t opcode;
  const char* name;
  LengthRule rule;
  uint32_t dwords;
  Result<> (Auditor::*audit)(Auditor::Ctx&, std::span<const uint32_t>, uint32_t) const;
};

uint64_t U64(std::span<const uint32_t> c, size_t i) { return uint64_t{c[i + 1]} << 32 | c[i]; }

constexpr uint32_t kLoadRegWhitelist[] = {
    abi::reg::kScratch,           abi::priv::kClockMhz,        abi::priv::kDisplayBase,
    abi::priv::kDisplayStride,    abi::priv::kDisplayFormat,   abi::priv::kDisplayWidth,
    abi::priv::kDisplayHeight,    abi::priv::kDisplayEnable,   abi::priv::kDisplayFlip,
};
}  // namespace

struct Auditor::Ctx {
  Plan plan;
  uint64_t offset = 0;  // of the command being audited, for the fault report
  uint32_t opcode = 0;
  uint32_t depth = 0;
  uint64_t pages = 0;  // GTT pages translated so far (upper bound), batches included
  uint64_t spans = 0;  // spans built so far
  GttOverlay staged;   // the GTT_UPDATE entries so far: later commands translate through them
};

bool LoadRegAllowed(uint32_t reg) {
  for (uint32_t r : kLoadRegWhitelist)
    if (r == reg) return true;
  return false;
}

struct Auditor::CommandTable {
#define VG_CMD(name, op, rule, dw) {op, #name, LengthRule::rule, dw, &Auditor::Audit##name},
  static constexpr CmdSpec kRows[] = {
#include "abi/commands.def"
  };
#undef VG_CMD
  static const CmdSpec* Find(uint32_t opcode) {
    for (const CmdSpec& c : kRows)
      if (c.opcode == opcode) return &c;
    return nullptr;
  }
};

Result<ResolvedRange> Auditor::Resolve(Ctx& ctx, uint64_t va, uint64_t size, bool write) const {
  // Charged before the walk: the walk is the cost being bounded.
  ctx.pages += size / kPageSize + 2;
  VG_ERROR_IF(ctx.pages > kMaxTranslatedPages, Errc::kLimitExceeded,
              "submission translates more than {} GTT pages (bound per submission)", kMaxTranslatedPages);
  ResolvedRange r{GpuVa{va}, ByteSize{size}, write, {}};
  VG_TRY_ASSIGN(r.spans, gtt_.Translate(GpuVa{va}, ByteSize{size}, write ? GttAccess::kReadWrite : GttAccess::kRead,
                                        kMaxSpansPerSubmission - ctx.spans, &ctx.staged));
  ctx.spans += r.spans.size();
  return r;
}

Result<Plan> Auditor::Audit(std::span<const uint32_t> stream, uint64_t base, uint64_t ring_size,
                            AuditFault* fault) const {
  Ctx ctx;
  ctx.offset = base;
  Result<> r = AuditStream(ctx, stream, 0);
  if (!r.ok()) {
    if (fault) {
      fault->source = abi::kErrSourceCommand;
      fault->addr = ctx.depth == 0 && ring_size ? ctx.offset % ring_size : ctx.offset;
      fault->opcode = ctx.opcode;
    }
    return std::move(r).error();
  }
  return std::move(ctx.plan);
}

Result<> Auditor::AuditStream(Ctx& ctx, std::span<const uint32_t> stream, uint32_t depth) const {
  const uint64_t base = ctx.offset;
  size_t i = 0;
  while (i < stream.size()) {
    ctx.offset = base + i * 4;
    ctx.depth = depth;
    uint32_t hdr = stream[i];
    ctx.opcode = abi::cmd::Opcode(hdr);
    VG_ERROR_IF(++ctx.plan.commands > abi::cmd::kMaxCommandsPerSubmission, Errc::kLimitExceeded,
                "more than {} commands in one submission", abi::cmd::kMaxCommandsPerSubmission);
    const CmdSpec* spec = CommandTable::Find(ctx.opcode);
    VG_ERROR_IF(!spec, Errc::kUnknownCommand, "opcode {:#x} is not a command", ctx.opcode);
    uint32_t len = abi::cmd::LengthDw(hdr);
    VG_ERROR_IF(spec->rule == LengthRule::kFixed && len != spec->dwords, Errc::kBadLength,
                "{} is {} dwords, not {}", spec->name, spec->dwords, len);
    VG_ERROR_IF(spec->rule == LengthRule::kAtLeast && len < spec->dwords, Errc::kBadLength,
                "{} needs at least {} dwords, has {}", spec->name, spec->dwords, len);
    VG_ERROR_IF(len > stream.size() - i, Errc::kTruncated, "{} of {} dwords runs past the end of the stream ({} left)",
                spec->name, len, stream.size() - i);
    VG_TRY((this->*spec->audit)(ctx, stream.subspan(i, len), depth));
    i += len;
  }
  ctx.plan.stream_bytes += stream.size() * 4;
  return Ok();
}

Result<> Auditor::AuditNop(Ctx&, std::span<const uint32_t>, uint32_t) const { return Ok(); }

Result<> Auditor::AuditFence(Ctx& ctx, std::span<const uint32_t> c, uint32_t) const {
  uint32_t flags = abi::cmd::Flags(c[0]);
  VG_ERROR_IF(flags & ~abi::cmd::kFenceFlagIrq, Errc::kBadFlags, "FENCE flags {:#x}", flags);
  uint64_t va = U64(c, 1);
  VG_ERROR_IF(!IsAligned(va, 8), Errc::kMisaligned, "FENCE target {:#x} not 8-byte aligned", va);
  PlanFence f;
  VG_TRY_ASSIGN(f.target, Resolve(ctx, va, 8, true));
  f.value = U64(c, 3);
  f.irq = flags & abi::cmd::kFenceFlagIrq;
  ctx.plan.ops.emplace_back(std::move(f));
  return Ok();
}

Result<> Auditor::AuditCopy(Ctx& ctx, std::span<const uint32_t> c, uint32_t) const {
  VG_ERROR_IF(abi::cmd::Flags(c[0]), Errc::kBadFlags, "COPY takes no flags");
  uint64_t src = U64(c, 1), dst = U64(c, 3), size = U64(c, 5);
  VG_INVALID_IF(size == 0, "COPY of 0 bytes");
  VG_ERROR_IF(size > abi::cmd::kMaxTransferBytes, Errc::kLimitExceeded, "COPY of {:#x} bytes over the {:#x} limit", size,
              abi::cmd::kMaxTransferBytes);
  VG_ERROR_IF(!IsAligned(src | dst | size, 4), Errc::kMisaligned, "COPY addresses and size must be dword aligned");
  VG_ERROR_IF(RangesOverlap(src, size, dst, size), Errc::kOverlap, "COPY source and destination overlap");
  PlanCopy p;
  VG_TRY_ASSIGN(p.src, Resolve(ctx, src, size, false));
  VG_TRY_ASSIGN(p.dst, Resolve(ctx, dst, size, true));
  ctx.plan.ops.emplace_back(std::move(p));
  return Ok();
}

Result<> Auditor::AuditFill(Ctx& ctx, std::span<const uint32_t> c, uint32_t) const {
  VG_ERROR_IF(abi::cmd::Flags(c[0]), Errc::kBadFlags, "FILL takes no flags");
  uint64_t dst = U64(c, 1), size = U64(c, 3);
  VG_INVALID_IF(size == 0, "FILL of 0 bytes");
  VG_ERROR_IF(size > abi::cmd::kMaxTransferBytes, Errc::kLimitExceeded, "FILL of {:#x} bytes over the {:#x} limit", size,
              abi::cmd::kMaxTransferBytes);
  VG_ERROR_IF(!IsAligned(dst | size, 4), Errc::kMisaligned, "FILL address and size must be dword aligned");
  PlanFill p;
  VG_TRY_ASSIGN(p.dst, Resolve(ctx, dst, size, true));
  p.value = c[5];
  ctx.plan.ops.emplace_back(std::move(p));
  return Ok();
}

Result<> Auditor::AuditDispatch(Ctx& ctx, std::span<const uint32_t> c, uint32_t) const {
  VG_ERROR_IF(abi::cmd::Flags(c[0]), Errc::kBadFlags, "DISPATCH takes no flags");
  uint32_t kernel = c[1];
  std::array<uint32_t, 3> groups{c[2], c[3], c[4]};
  uint32_t nbind = c[5], npush = c[6];
  const shaders::KernelDesc* k = shaders::FindKernel(kernel);
  VG_ERROR_IF(!k, Errc::kBadKernel, "kernel {} is not in the catalogue", kernel);
  VG_ERROR_IF(nbind != k->binding_count, Errc::kBadKernel, "kernel {} takes {} bindings, not {}", k->name,
              k->binding_count, nbind);
  VG_ERROR_IF(npush * 4 != k->push_size, Errc::kBadKernel, "kernel {} takes {} push bytes, not {}", k->name,
              k->push_size, uint64_t{npush} * 4);
  uint64_t want = abi::cmd::kDispatchFixedDwords + uint64_t{nbind} * abi::cmd::kBindingDwords + npush;
  VG_ERROR_IF(c.size() != want, Errc::kBadLength, "DISPATCH with {} bindings and {} push dwords is {} dwords, not {}",
              nbind, npush, want, c.size());
  PlanDispatch d;
  d.kernel = kernel;
  d.groups = groups;
  auto push = c.subspan(abi::cmd::kDispatchFixedDwords + nbind * abi::cmd::kBindingDwords, npush);
  d.push.resize(npush * 4);
  std::memcpy(d.push.data(), push.data(), d.push.size());
  std::vector<uint64_t> sizes;
  for (uint32_t b = 0; b < nbind; ++b) {
    auto bind = c.subspan(abi::cmd::kDispatchFixedDwords + b * abi::cmd::kBindingDwords, abi::cmd::kBindingDwords);
    uint64_t va = U64(bind, 0), size = U64(bind, 2);
    uint32_t access = bind[4];
    shaders::Access ka = k->bindings[b].access;
    uint32_t need = (ka != shaders::Access::kWrite ? abi::cmd::kAccessRead : 0) |
                    (shaders::Writes(ka) ? abi::cmd::kAccessWrite : 0);
    VG_ERROR_IF((access & ~(abi::cmd::kAccessRead | abi::cmd::kAccessWrite)) != 0, Errc::kBadFlags,
                "binding {} access {:#x}", b, access);
    VG_ERROR_IF((access & need) != need, Errc::kAccessDenied, "kernel {} binding {} ({}) needs access {:#x}, given {:#x}",
                k->name, b, k->bindings[b].name, need, access);
    VG_INVALID_IF(size == 0, "binding {} is empty", b);
    VG_ERROR_IF(!IsAligned(va | size, 4), Errc::kMisaligned, "binding {} not dword aligned", b);
    ResolvedRange r;
    VG_TRY_ASSIGN(r, Resolve(ctx, va, size, shaders::Writes(k->bindings[b].access)));
    d.bindings.push_back(std::move(r));
    sizes.push_back(size);
  }
  VG_TRY(shaders::ValidateKernelArgs(*k, d.push, sizes, groups));
  // The executor cuts the grid into bounded pieces; a grid whose smallest piece is still
  // over the bound is refused here, by name, rather than run for hours.
  VG_TRY(DispatchCut::Make(kernel, groups, d.push));
  ctx.plan.ops.emplace_back(std::move(d));
  return Ok();
}

Result<> Auditor::AuditBatch(Ctx& ctx, std::span<const uint32_t> c, uint32_t depth) const {
  VG_ERROR_IF(abi::cmd::Flags(c[0]), Errc::kBadFlags, "BATCH takes no flags");
  VG_ERROR_IF(depth + 1 > abi::cmd::kMaxBatchDepth, Errc::kRecursion, "BATCH nested deeper than {}",
              abi::cmd::kMaxBatchDepth);
  uint64_t va = U64(c, 1);
  uint32_t size = c[3];
  VG_INVALID_IF(size == 0, "empty BATCH");
  VG_ERROR_IF(size > abi::cmd::kMaxBatchBytes, Errc::kLimitExceeded, "BATCH of {:#x} bytes over {:#x}", size,
              abi::cmd::kMaxBatchBytes);
  VG_ERROR_IF(!IsAligned(va | size, 4), Errc::kMisaligned, "BATCH not dword aligned");
  ResolvedRange r;
  VG_TRY_ASSIGN(r, Resolve(ctx, va, size, false));
  // The batch is copied once; its commands are audited from the copy, so rewriting the
  // batch in guest memory after the doorbell changes nothing.
  std::vector<uint32_t> shadow;
  VG_TRY_ASSIGN(shadow, read_batch_(r));
  VG_ERROR_IF(shadow.size() * 4 != size, Errc::kInternal, "batch reader returned {} dwords", shadow.size());
  uint64_t saved_offset = ctx.offset;
  ctx.offset = va;
  VG_TRY(AuditStream(ctx, shadow, depth + 1));
  ctx.offset = saved_offset;
  return Ok();
}

Result<> Auditor::AuditLoadReg(Ctx& ctx, std::span<const uint32_t> c, uint32_t) const {
  VG_ERROR_IF(abi::cmd::Flags(c[0]), Errc::kBadFlags, "LOAD_REG takes no flags");
  uint32_t reg = c[1];
  if (!LoadRegAllowed(reg)) {
    bool privileged = reg >= abi::kPrivBase && reg < abi::kPrivBase + kPageSize;
    return MakeError(privileged ? Errc::kPrivileged : Errc::kAccessDenied, "LOAD_REG to {:#x} is not whitelisted", reg);
  }
  ctx.plan.ops.emplace_back(PlanLoadReg{reg, c[2]});
  return Ok();
}

Result<> Auditor::AuditTimestamp(Ctx& ctx, std::span<const uint32_t> c, uint32_t) const {
  VG_ERROR_IF(abi::cmd::Flags(c[0]), Errc::kBadFlags, "TIMESTAMP takes no flags");
  uint64_t va = U64(c, 1);
  VG_ERROR_IF(!IsAligned(va, 8), Errc::kMisaligned, "TIMESTAMP target {:#x} not 8-byte aligned", va);
  PlanTimestamp t;
  VG_TRY_ASSIGN(t.target, Resolve(ctx, va, 8, true));
  ctx.plan.ops.emplace_back(std::move(t));
  return Ok();
}

// GTT updates in ring order (F12): checked record by record with the rules of an MMIO GTT
// write, staged for the rest of this submission's translations, and stored by the ring only
// when the whole submission is accepted. Bounded per command and per submission.
Result<> Auditor::AuditGttUpdate(Ctx& ctx, std::span<const uint32_t> c, uint32_t) const {
  VG_ERROR_IF(abi::cmd::Flags(c[0]), Errc::kBadFlags, "GTT_UPDATE takes no flags");
  VG_ERROR_IF(!page_check_, Errc::kUnsupported, "GTT_UPDATE is not offered here");
  const uint32_t count = c[1];
  VG_INVALID_IF(count == 0, "GTT_UPDATE of 0 records");
  VG_ERROR_IF(count > abi::cmd::kGttUpdateMaxRecords, Errc::kLimitExceeded, "GTT_UPDATE of {} records (at most {})",
              count, abi::cmd::kGttUpdateMaxRecords);
  const uint64_t want = abi::cmd::kGttUpdateFixedDwords + uint64_t{count} * abi::cmd::kGttRecordDwords;
  VG_ERROR_IF(c.size() != want, Errc::kBadLength, "GTT_UPDATE of {} records is {} dwords, not {}", count, want,
              c.size());
  VG_ERROR_IF(ctx.plan.gtt_updates.size() + count > abi::cmd::kMaxGttRecordsPerSubmission, Errc::kLimitExceeded,
              "more than {} GTT_UPDATE records in one submission", abi::cmd::kMaxGttRecordsPerSubmission);
  const size_t first = ctx.plan.gtt_updates.size();
  ctx.plan.gtt_updates.resize(first + count);
  std::memcpy(static_cast<void*>(ctx.plan.gtt_updates.data() + first), c.data() + abi::cmd::kGttUpdateFixedDwords,
              size_t{count} * sizeof(abi::GttBatchRecord));
  for (uint32_t i = 0; i < count; ++i) {
    const abi::GttBatchRecord& r = ctx.plan.gtt_updates[first + i];
    VG_TRY_CTX(gtt_.CheckRecord(r, page_check_), "GTT_UPDATE record {}", i);
    ctx.staged[r.index] = r.entry;
  }
  return Ok();
}

}  // namespace vg::mediator
