#pragma once
// Decoder and validator for the remoting command stream: engine-free, so the unit tests
// and the fuzz target drive exactly the code the daemon runs. Input is always a private
// copy of the ring (never the shared mapping): the client may rewrite the ring at any time.

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <variant>
#include <vector>

#include "base/base.h"
#include "remoting/remoting.h"
#include "abi/remoting.h"

namespace vg::remoting {

struct DispatchCommand {
  wire::DispatchCmd head;
  std::vector<wire::DispatchBinding> bindings;
  std::vector<std::byte> push;
};
using Payload = std::variant<std::monostate, wire::CreateBufferCmd, wire::DestroyBufferCmd, wire::WriteCmd,
                             wire::ReadCmd, DispatchCommand, wire::CopyCmd, wire::FillCmd, wire::FenceCmd>;

struct Command {
  wire::Op op = wire::Op::kNop;
  uint32_t size = 0;  // bytes in the stream, header included
  Payload payload;
};

// How the server treats an op: host ops run on the loop thread, GPU ops join the pending
// engine submission, ordered ops need every earlier GPU op finished first.
enum class OpKind : uint8_t { kHost, kGpu, kOrdered };
enum class SizeRule : uint8_t { kAtLeast, kExact, kDispatch };

struct OpDesc {
  wire::Op op;
  const char* name;
  SizeRule rule;
  uint32_t payload;  // fixed payload bytes (kExact), minimum (kAtLeast), head (kDispatch)
  OpKind kind;
  // It answers the client through the status line (completed_fence, reply_seq): with time
  // coarsened the answer is published only at a tick (docs/remoting-protocol.md).
  bool replies;
};
// Indexed by opcode.
inline constexpr OpDesc kOpTable[wire::kOpCount] = {
    {wire::Op::kNop, "NOP", SizeRule::kAtLeast, 0, OpKind::kHost, false},
    {wire::Op::kCreateBuffer, "CREATE_BUFFER", SizeRule::kExact, sizeof(wire::CreateBufferCmd), OpKind::kHost, false},
    {wire::Op::kDestroyBuffer, "DESTROY_BUFFER", SizeRule::kExact, sizeof(wire::DestroyBufferCmd), OpKind::kHost,
     false},
    {wire::Op::kWrite, "WRITE", SizeRule::kExact, sizeof(wire::WriteCmd), OpKind::kOrdered, false},
    {wire::Op::kRead, "READ", SizeRule::kExact, sizeof(wire::ReadCmd), OpKind::kOrdered, true},
    {wire::Op::kDispatch, "DISPATCH", SizeRule::kDispatch, sizeof(wire::DispatchCmd), OpKind::kGpu, false},
    {wire::Op::kCopy, "COPY", SizeRule::kExact, sizeof(wire::CopyCmd), OpKind::kGpu, false},
    {wire::Op::kFill, "FILL", SizeRule::kExact, sizeof(wire::FillCmd), OpKind::kGpu, false},
    {wire::Op::kFence, "FENCE", SizeRule::kExact, sizeof(wire::FenceCmd), OpKind::kOrdered, true},
};
const OpDesc* FindOp(uint16_t opcode);

// Result of decoding the command at `off` of a stream copy. `advance` is how far the stream
// may be skipped to resynchronise after an error: the command's size when its header was
// sane, 0 when nothing after `off` can be trusted (skip to the published tail).
struct Decoded {
  Result<Command> cmd;
  uint32_t advance = 0;
};
// Codes: kTruncated (fewer bytes than a header or than `size`), kBadFlags, kBadLength
// (size not a multiple of 8, < 8, > kMaxCommandSize, or not what the opcode needs),
// kUnknownCommand, kBadKernel (dispatch binding count or push size over the catalogue's
// maximum).
Decoded DecodeCommand(std::span<const std::byte> stream, size_t off);

// One client's objects. Ids are client-chosen and live in that client's namespace only:
// another client's id is simply not found here.
class ObjectTable {
 public:
  struct Object {
    uint64_t size = 0;
    bool alive = false;  // false: a tombstone, so use-after-destroy is told apart
  };
  explicit ObjectTable(const Limits& limits) : limits_(limits) {}

  // kNotFound (never created), kBadState (destroyed), ok with the object otherwise.
  Result<const Object*> Lookup(uint32_t id) const;
  size_t live() const { return live_; }
  uint64_t bytes() const { return bytes_; }
  // Bytes of destroyed buffers whose last use has not ended (work still holds them):
  // charged against max_bytes like live ones until Release().
  uint64_t held() const { return held_; }
  void Retain(uint64_t bytes) { held_ += bytes; }
  void Release(uint64_t bytes) { held_ -= std::min(bytes, held_); }

  Result<> ValidateCreate(const wire::CreateBufferCmd& c) const;
  void DoCreate(const wire::CreateBufferCmd& c);
  void DoDestroy(uint32_t id);

 private:
  Limits limits_;
  std::map<uint32_t, Object> objects_;
  size_t live_ = 0;
  size_t tombstones_ = 0;
  uint64_t bytes_ = 0;
  uint64_t held_ = 0;
};

// Validates one decoded command against the client's objects and heap. No side effects,
// engine-free (the server adds engine::Engine::Validate for device limits). Codes:
// kInvalidArgument (id 0, zero sizes, nonzero reserved), kAlreadyExists, kNotFound,
// kBadState (destroyed id), kLimitExceeded (caps), kBusy (a CREATE that fits the byte cap
// only once held() bytes are released: the server waits), kOutOfBounds (heap or buffer range),
// kMisaligned (fill), kOverlap (copy), kBadKernel / ValidateKernelArgs' codes.
Result<> ValidateCommand(const Command& c, const ObjectTable& objects, uint64_t heap_size);

}  // namespace vg::remoting
