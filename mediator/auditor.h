#pragma once
// Audit of a shadowed submission: the command stream has already been copied out of guest
// memory; the auditor checks that copy against the command table, the GTT, the register
// whitelist, the shader catalogue and fixed bounds, and turns it into a Plan whose every
// address is resolved. Only a Plan reaches execution (copy, then check, then use).

#include <cstdint>
#include <functional>
#include <span>
#include <variant>
#include <vector>

#include "base/base.h"
#include "mediator/gtt.h"

namespace vg::mediator {

// A GPU VA range resolved through the GTT at audit time.
struct ResolvedRange {
  GpuVa va{0};
  ByteSize size{0};
  bool write = false;
  std::vector<GttSpan> spans;
};

struct PlanDispatch {
  uint32_t kernel = 0;
  std::array<uint32_t, 3> groups{};
  std::vector<ResolvedRange> bindings;
  std::vector<std::byte> push;
};
struct PlanCopy {
  ResolvedRange src, dst;
};
struct PlanFill {
  ResolvedRange dst;
  uint32_t value = 0;
};
struct PlanFence {
  ResolvedRange target;  // 8 bytes
  uint64_t value = 0;
  bool irq = false;
};
struct PlanLoadReg {
  uint32_t reg = 0;
  uint32_t value = 0;
};
struct PlanTimestamp {
  ResolvedRange target;  // 8 bytes
};
using PlanOp = std::variant<PlanDispatch, PlanCopy, PlanFill, PlanFence, PlanLoadReg, PlanTimestamp>;

struct Plan {
  std::vector<PlanOp> ops;
  // The submission's GTT_UPDATE records, checked, in order: the ring stores them once the
  // whole submission has passed and been queued (a refused submission changes nothing).
  std::vector<abi::GttBatchRecord> gtt_updates;
  uint32_t commands = 0;       // commands audited, batches' included
  uint64_t stream_bytes = 0;   // command bytes audited
};

// Where the first refusal happened: what the error report shows the guest.
struct AuditFault {
  uint32_t source = 0;  // abi::kErrSourceCommand or kErrSourceRing
  uint64_t addr = 0;    // ring byte offset (depth 0) or GPU VA (inside a batch)
  uint32_t opcode = 0;
};

// Copies a batch buffer out of guest memory (through the GTT), once.
using BatchReader = std::function<Result<std::vector<uint32_t>>(const ResolvedRange& range)>;

// Registers a LOAD_REG may write. Everything else is refused: kPrivileged for the
// privileged page, kAccessDenied for the rest.
bool LoadRegAllowed(uint32_t reg);

class Auditor {
 public:
  // `page_check`: the guest-memory rule for GTT entries (the one MMIO GTT writes use); null:
  // GTT_UPDATE is refused (kUnsupported).
  Auditor(const Gtt& gtt, BatchReader read_batch, Gtt::GuestPageCheck page_check = nullptr)
      : gtt_(gtt), read_batch_(std::move(read_batch)), page_check_(std::move(page_check)) {}

  // `stream`: the shadow copy. `base`: ring byte offset of stream[0], for fault reports.
  // `ring_size`: offsets wrap at it (0: no wrapping, e.g. tests).
  Result<Plan> Audit(std::span<const uint32_t> stream, uint64_t base, uint64_t ring_size, AuditFault* fault) const;

  struct Ctx;
  struct CommandTable;  // the data table built from commands.def

 private:
  Result<> AuditStream(Ctx& ctx, std::span<const uint32_t> stream, uint32_t depth) const;
  // Charges the submission's translation bounds (mediator/work_split.h): GTT pages walked
  // and spans built, both on the daemon's loop thread. kLimitExceeded past either.
  Result<ResolvedRange> Resolve(Ctx& ctx, uint64_t va, uint64_t size, bool write) const;

#define VG_CMD(name, op, rule, dw) \
  Result<> Audit##name(Ctx& ctx, std::span<const uint32_t> c, uint32_t depth) const;
#include "abi/commands.def"
#undef VG_CMD

  const Gtt& gtt_;
  BatchReader read_batch_;
  Gtt::GuestPageCheck page_check_;
};

}  // namespace vg::mediator
