#pragma once
// The command table of the guest-visible contract (docs/device-spec.md §Commands), as data:
// every opcode with its length rule and dword count, from abi/commands.def. The device's
// auditor checks a command's length against it; the guest's command builder takes the
// lengths it writes from it, so both sides read one row.

#include <cstdint>
#include <optional>

#include "abi/device.h"

namespace vg::abi::cmd {

enum class Length : uint8_t {
  kFixed,    // exactly `dwords`
  kAtLeast,  // `dwords` or more; the payload's own counts say how many
};

struct CommandInfo {
  uint32_t opcode;
  const char* name;
  Length rule;
  uint32_t dwords;
};

inline constexpr CommandInfo kCommands[] = {
#define VG_CMD(name, op, rule, dw) {op, #name, Length::rule, dw},
#include "abi/commands.def"
#undef VG_CMD
};

constexpr std::optional<CommandInfo> Info(uint32_t opcode) {
  for (const auto& c : kCommands)
    if (c.opcode == opcode) return c;
  return std::nullopt;
}

// The table's dword count of `opcode`: the whole length of a kFixed command, the fixed
// part of a kAtLeast one. Compile-time for the builder's constants.
constexpr uint32_t Dwords(uint32_t opcode) { return Info(opcode)->dwords; }

static_assert(Dwords(kFence) == 5 && Dwords(kDispatch) == kDispatchFixedDwords);
static_assert(Dwords(kGttUpdate) == kGttUpdateFixedDwords && kGttRecordDwords == 4);

}  // namespace vg::abi::cmd
