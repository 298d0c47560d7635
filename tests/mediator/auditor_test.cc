// The command auditor on hand-built streams over a hand-built GTT, no device, no socket.
#include <doctest.h>

#include <cstring>
#include <map>

#include "abi/device.h"
#include "mediator/auditor.h"
#include "shaders/catalogue.h"

using namespace vg;
using namespace vg::mediator;
namespace cmd = vg::abi::cmd;

namespace {

// GPU pages 1..8 map guest pages 0x100000.. writable; page 9 read-only; page 10 aperture.
struct World {
  Gtt gtt{64, 1 << 20};
  std::map<uint64_t, std::vector<uint32_t>> batches;  // by GPU VA
  World() {
    auto any = [](Gpa, bool) { return Ok(); };
    for (uint32_t p = 1; p <= 8; ++p)
      REQUIRE(gtt.Write(p, (0x100000 + (p - 1) * kPageSize) | abi::kGttValid | abi::kGttWritable, any).ok());
    REQUIRE(gtt.Write(9, 0x200000 | abi::kGttValid, any).ok());
    REQUIRE(gtt.Write(10, 0x3000 | abi::kGttValid | abi::kGttWritable | abi::kGttAperture, any).ok());
  }
  Auditor MakeAuditor() {
    return Auditor(gtt, [this](const ResolvedRange& r) -> Result<std::vector<uint32_t>> {
      auto it = batches.find(r.va.v);
      VG_ERROR_IF(it == batches.end(), Errc::kNotMapped, "no batch at {}", r.va);
      std::vector<uint32_t> out = it->second;
      out.resize(r.size.v / 4);
      return out;
    });
  }
  Result<Plan> Audit(const std::vector<uint32_t>& s, AuditFault* f = nullptr) {
    return MakeAuditor().Audit(s, 0, 0, f);
  }
};

constexpr uint64_t kVa = 1 * kPageSize;  // first mapped page
uint32_t Lo(uint64_t v) { return static_cast<uint32_t>(v); }
uint32_t Hi(uint64_t v) { return static_cast<uint32_t>(v >> 32); }

std::vector<uint32_t> Fill(uint64_t va, uint64_t size, uint32_t value) {
  return {cmd::Header(cmd::kFill, 6), Lo(va), Hi(va), Lo(size), Hi(size), value};
}
std::vector<uint32_t> Cat(std::initializer_list<std::vector<uint32_t>> parts) {
  std::vector<uint32_t> out;
  for (auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

}  // namespace

TEST_CASE("a clean stream becomes a plan with every range resolved page by page") {
  World w;
  uint64_t fence_va = 2 * kPageSize + 8;
  auto s = Cat({{cmd::Header(cmd::kNop, 3), 0, 0},
                Fill(kVa + 4092, 8, 5),  // straddles pages 1 and 2: contiguous guest pages, one span
                {cmd::Header(cmd::kFence, 5, cmd::kFenceFlagIrq), Lo(fence_va), Hi(fence_va), 42, 0},
                {cmd::Header(cmd::kLoadReg, 3), abi::reg::kScratch, 9},
                {cmd::Header(cmd::kCopy, 7), Lo(9 * kPageSize), 0, Lo(10 * kPageSize), 0, 64, 0}});
  auto plan = w.Audit(s);
  REQUIRE_MESSAGE(plan.ok(), plan.error().ToString());
  CHECK(plan->commands == 5);
  CHECK(plan->stream_bytes == s.size() * 4);
  REQUIRE(plan->ops.size() == 4);
  auto& fill = std::get<PlanFill>(plan->ops[0]);
  REQUIRE(fill.dst.spans.size() == 1);
  CHECK(fill.dst.spans[0].target.page_addr == 0x100000 + 4092);
  auto& fence = std::get<PlanFence>(plan->ops[1]);
  CHECK(fence.value == 42);
  CHECK(fence.irq);
  CHECK(fence.target.spans[0].target.page_addr == 0x101008);
  CHECK(std::get<PlanLoadReg>(plan->ops[2]).value == 9);
  auto& copy = std::get<PlanCopy>(plan->ops[3]);
  CHECK_FALSE(copy.src.spans[0].target.aperture);
  CHECK(copy.dst.spans[0].target.aperture);
  CHECK(copy.dst.spans[0].target.page_addr == 0x3000);
}

TEST_CASE("each refusal has its name and the fault points at the command") {
  World w;
  struct Case {
    const char* what;
    std::vector<uint32_t> stream;
    Errc code;
    uint64_t fault;
  };
  std::vector<Case> cases = {
      {"unknown opcode", {cmd::Header(cmd::kNop, 1), cmd::Header(0x55, 1)}, Errc::kUnknownCommand, 4},
      {"fixed length too short", {cmd::Header(cmd::kFill, 5), 0, 0, 0, 0}, Errc::kBadLength, 0},
      {"fixed length too long", {cmd::Header(cmd::kFence, 6), 0, 0, 0, 0, 0}, Errc::kBadLength, 0},
      {"zero length", {cmd::Header(cmd::kNop, 0)}, Errc::kBadLength, 0},
      {"truncated at the tail", {cmd::Header(cmd::kCopy, 7), 0, 0}, Errc::kTruncated, 0},
      {"unmapped VA", Fill(20 * kPageSize, 4, 0), Errc::kNotMapped, 0},
      {"VA past the GTT", Fill(64 * kPageSize, 4, 0), Errc::kNotMapped, 0},
      {"straddles into an unmapped page", Fill(10 * kPageSize + 4092, 8, 0), Errc::kNotMapped, 0},
      {"wraps around", Fill(~0ull - 3, 8, 0), Errc::kOutOfBounds, 0},
      {"write to a read-only page", Fill(9 * kPageSize, 4, 0), Errc::kAccessDenied, 0},
      {"fill of zero bytes", Fill(kVa, 0, 0), Errc::kInvalidArgument, 0},
      {"misaligned fill", Fill(kVa + 2, 4, 0), Errc::kMisaligned, 0},
      {"fill over the transfer limit", Fill(kVa, cmd::kMaxTransferBytes + 4, 0), Errc::kLimitExceeded, 0},
      {"overlapping copy", {cmd::Header(cmd::kCopy, 7), Lo(kVa), 0, Lo(kVa + 8), 0, 64, 0}, Errc::kOverlap, 0},
      {"fence flags", {cmd::Header(cmd::kFence, 5, 0x80), Lo(kVa), 0, 0, 0}, Errc::kBadFlags, 0},
      {"fence misaligned", {cmd::Header(cmd::kFence, 5), Lo(kVa + 4), 0, 0, 0}, Errc::kMisaligned, 0},
      {"load_reg privileged", {cmd::Header(cmd::kLoadReg, 3), abi::priv::kGlobalReset, 1}, Errc::kPrivileged, 0},
      {"load_reg not whitelisted", {cmd::Header(cmd::kLoadReg, 3), abi::reg::kCtrl, 1}, Errc::kAccessDenied, 0},
      {"dispatch unknown kernel", {cmd::Header(cmd::kDispatch, 7), 999, 1, 1, 1, 0, 0}, Errc::kBadKernel, 0},
      {"timestamp misaligned", {cmd::Header(cmd::kTimestamp, 3), Lo(kVa + 4), 0}, Errc::kMisaligned, 0},
  };
  for (const Case& c : cases) {
    CAPTURE(c.what);
    AuditFault fault;
    auto plan = w.Audit(c.stream, &fault);
    REQUIRE_FALSE(plan.ok());
    CHECK(plan.code() == c.code);
    CHECK(fault.addr == c.fault);
    CHECK(fault.source == abi::kErrSourceCommand);
  }
}

TEST_CASE("dispatch: kernel table decides binding count, push size, access and sizes") {
  World w;
  auto copy = static_cast<uint32_t>(shaders::KernelId::kCopy);
  auto d = [&](uint32_t nbind, uint32_t src_access, uint32_t dst_access, uint32_t count, uint32_t gx) {
    std::vector<uint32_t> s = {cmd::Header(cmd::kDispatch, 7 + nbind * 5 + 1), copy, gx, 1, 1, nbind, 1};
    uint32_t acc[2] = {src_access, dst_access};
    for (uint32_t b = 0; b < nbind; ++b) {
      uint64_t va = kVa + b * 2 * kPageSize;
      s.insert(s.end(), {Lo(va), Hi(va), 2 * kPageSize, 0, acc[b % 2]});
    }
    s.push_back(count);
    return s;
  };
  uint32_t R = cmd::kAccessRead, W = cmd::kAccessWrite, RW = R | W;
  CHECK(w.Audit(d(2, R, W, 100, 1)).ok());
  CHECK(w.Audit(d(2, RW, RW, 2048, 8)).ok());
  CHECK(w.Audit(d(1, R, W, 100, 1)).code() == Errc::kBadKernel);
  CHECK(w.Audit(d(3, R, W, 100, 1)).code() == Errc::kBadKernel);
  CHECK(w.Audit(d(2, W, W, 100, 1)).code() == Errc::kAccessDenied);  // src needs read
  CHECK(w.Audit(d(2, R, R, 100, 1)).code() == Errc::kAccessDenied);  // dst needs write
  CHECK(w.Audit(d(2, R, W, 100000, 1)).code() == Errc::kOutOfBounds);  // bindings too small for count
  CHECK(w.Audit(d(2, R, W, 100, 0)).code() == Errc::kInvalidArgument);  // zero groups
  CHECK(w.Audit(d(2, R, W, 100, 0xffffffff)).code() == Errc::kLimitExceeded);
  auto bad_access = d(2, R | 8, W, 100, 1);
  CHECK(w.Audit(bad_access).code() == Errc::kBadFlags);
  auto wrong_push = d(2, R, W, 100, 1);
  wrong_push[6] = 2;
  CHECK(w.Audit(wrong_push).code() == Errc::kBadKernel);
}

TEST_CASE("batches are audited from their copy, bounded in depth and size") {
  World w;
  uint64_t b1 = 3 * kPageSize, b2 = 4 * kPageSize;
  w.batches[b1] = Fill(kVa, 16, 1);
  auto plan = w.Audit({cmd::Header(cmd::kBatch, 4), Lo(b1), 0, 24});
  REQUIRE(plan.ok());
  CHECK(plan->commands == 2);
  CHECK(std::get<PlanFill>(plan->ops[0]).value == 1);

  // Depth: ring -> b2 -> b1 is allowed (2 levels); b1 calling a batch is one too many.
  w.batches[b2] = {cmd::Header(cmd::kBatch, 4), Lo(b1), 0, 24};
  CHECK(w.Audit({cmd::Header(cmd::kBatch, 4), Lo(b2), 0, 16}).ok());
  w.batches[b1] = {cmd::Header(cmd::kBatch, 4), Lo(b1), 0, 16};  // starts itself
  AuditFault fault;
  auto self = w.Audit({cmd::Header(cmd::kBatch, 4), Lo(b1), 0, 16}, &fault);
  CHECK(self.code() == Errc::kRecursion);
  CHECK(fault.addr == b1);  // inside a batch the fault is the command's GPU VA
  CHECK(w.Audit({cmd::Header(cmd::kBatch, 4), Lo(b1), 0, cmd::kMaxBatchBytes + 4}).code() == Errc::kLimitExceeded);
  CHECK(w.Audit({cmd::Header(cmd::kBatch, 4), Lo(b1), 0, 0}).code() == Errc::kInvalidArgument);
  CHECK(w.Audit({cmd::Header(cmd::kBatch, 4), Lo(60 * kPageSize), 0, 16}).code() == Errc::kNotMapped);
  // A batch that lies about its length inside is refused like a ring would be.
  w.batches[b1] = {cmd::Header(cmd::kFill, 6), 0};
  CHECK(w.Audit({cmd::Header(cmd::kBatch, 4), Lo(b1), 0, 8}).code() == Errc::kTruncated);
}

TEST_CASE("commands per submission are bounded") {
  World w;
  std::vector<uint32_t> s(cmd::kMaxCommandsPerSubmission, cmd::Header(cmd::kNop, 1));
  CHECK(w.Audit(s).ok());
  s.push_back(cmd::Header(cmd::kNop, 1));
  CHECK(w.Audit(s).code() == Errc::kLimitExceeded);
}

TEST_CASE("ring offsets in fault reports wrap at the ring size") {
  World w;
  AuditFault fault;
  auto r = w.MakeAuditor().Audit(std::vector<uint32_t>{cmd::Header(cmd::kNop, 1), cmd::Header(0x66, 1)}, 4092, 4096,
                                 &fault);
  CHECK(r.code() == Errc::kUnknownCommand);
  CHECK(fault.addr == 0);  // 4092 + 4 wrapped
}
